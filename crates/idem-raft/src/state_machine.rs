//! openraft's state machine over the node's state engine. The records live in RocksDB;
//! this struct holds only the group's applied log id and membership (also persisted, in
//! the same write batch as the records they cover).

use crate::codec::{decode, encode};
use crate::types::{LogId, Snapshot, SnapshotMeta, StoredMembership, TypeConfig};
use futures::StreamExt;
use idem_core::CommandResult;
use idem_storage::{ApplyItem, Shard, SnapshotFile, StateEngine};
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend};
use std::io;

/// Most entries applied in one write batch.
const MAX_APPLY_BATCH: usize = 512;
/// Most bytes of commands (their payloads, as `Op::approx_bytes` counts them) gathered
/// into one apply batch; the entry that crosses the bound is the batch's last. A
/// command that rewrites a large stored record without carrying it (a Final notice on
/// a 1 MiB completion) counts as its own few bytes: the records a batch rewrites are
/// bounded by MAX_APPLY_BATCH times the largest record.
const MAX_APPLY_BATCH_BYTES: usize = 16 << 20;

#[derive(Clone)]
pub struct StateMachine {
    engine: StateEngine,
    shard: Shard,
    applied: Option<LogId>,
    membership: StoredMembership,
}

type AppliedState = (Option<LogId>, StoredMembership);

/// The applied-state bytes of a group that has applied no log entry yet (for tools that
/// fill a stopped node's state engine directly).
pub fn empty_applied_state() -> Vec<u8> {
    encode(&(None::<LogId>, StoredMembership::default()))
}

impl StateMachine {
    pub fn open(engine: StateEngine, shard: Shard) -> io::Result<StateMachine> {
        let (applied, membership) = match engine.applied_state(shard)? {
            Some(b) => decode::<AppliedState>(&b)?,
            None => (None, StoredMembership::default()),
        };
        Ok(StateMachine {
            engine,
            shard,
            applied,
            membership,
        })
    }

    async fn apply_batch(&mut self, batch: Vec<EntryResponder<TypeConfig>>) -> io::Result<()> {
        let mut applied = self.applied;
        let mut membership = self.membership.clone();
        for (entry, _) in &batch {
            applied = Some(entry.log_id);
            if let EntryPayload::Membership(m) = &entry.payload {
                membership = StoredMembership::new(Some(entry.log_id), m.clone());
            }
        }
        let state = encode(&(applied, membership.clone()));
        // The write (a WAL append of every record the batch changes) runs on a
        // blocking thread, not on the runtime that carries this node's network traffic.
        let (engine, shard) = (self.engine.clone(), self.shard);
        let (batch, results) = tokio::task::spawn_blocking(move || {
            let items: Vec<ApplyItem<'_>> = batch
                .iter()
                .map(|(entry, _)| match &entry.payload {
                    EntryPayload::Normal(cmd) => ApplyItem::Command(cmd, entry.log_id.index),
                    _ => ApplyItem::Other,
                })
                .collect();
            let results = engine.apply(shard, &items, &state);
            drop(items);
            (batch, results)
        })
        .await
        .map_err(io::Error::other)?;
        let results = results?;
        self.applied = applied;
        self.membership = membership;
        if results.len() != batch.len() {
            return Err(io::Error::other(format!(
                "apply answered {} results for {} entries",
                results.len(),
                batch.len()
            )));
        }
        for ((entry, responder), result) in batch.into_iter().zip(results) {
            let Some(r) = responder else { continue };
            r.send(answer(&entry.payload, result, &entry.log_id)?);
        }
        Ok(())
    }
}

/// What a waiting caller is told for an applied entry. A command that apply did not
/// answer is an error (the group stops), never an answer made up for it.
fn answer(
    payload: &openraft::alias::EntryPayloadOf<TypeConfig>,
    result: Option<CommandResult>,
    log_id: &LogId,
) -> io::Result<CommandResult> {
    match (payload, result) {
        (EntryPayload::Normal(_), Some(result)) => Ok(result),
        (EntryPayload::Normal(cmd), None) => Err(io::Error::other(format!(
            "apply produced no result for {cmd} at {log_id}"
        ))),
        // A membership change (or blank entry) someone waits for: it was applied, and
        // that is all it answers.
        _ => Ok(CommandResult::Done),
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> io::Result<AppliedState> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: futures::Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        while let Some(item) = entries.next().await {
            let item = item?;
            if let EntryPayload::Normal(cmd) = &item.0.payload {
                bytes = bytes.saturating_add(cmd.key.approx_bytes() + cmd.op.approx_bytes());
            }
            batch.push(item);
            if batch.len() >= MAX_APPLY_BATCH || bytes >= MAX_APPLY_BATCH_BYTES {
                self.apply_batch(std::mem::take(&mut batch)).await?;
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.apply_batch(batch).await?;
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> io::Result<()> {
        let state = encode(&(meta.last_log_id, meta.last_membership.clone()));
        let engine = self.engine.clone();
        let shard = self.shard;
        tokio::task::spawn_blocking(move || engine.install_snapshot(shard, &snapshot, &state))
            .await
            .map_err(io::Error::other)??;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> io::Result<Option<Snapshot>> {
        let Some(file) = self.engine.current_snapshot(self.shard)? else {
            return Ok(None);
        };
        let meta: SnapshotMeta = decode(&file.read_meta()?)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: file,
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> io::Result<Snapshot> {
        let engine = self.engine.clone();
        let shard = self.shard;
        // Records and applied state come from one RocksDB snapshot inside the engine, so
        // the metadata describes exactly the records in the file, however far apply has
        // moved since this builder was handed out.
        let (file, meta_bytes) = tokio::task::spawn_blocking(move || {
            engine.build_snapshot(shard, |applied| {
                let (last_log_id, last_membership) = match applied {
                    Some(b) => decode::<AppliedState>(b)?,
                    None => (None, StoredMembership::default()),
                };
                Ok(encode(&SnapshotMeta {
                    last_log_id,
                    last_membership,
                }))
            })
        })
        .await
        .map_err(io::Error::other)??;
        Ok(Snapshot {
            meta: decode(&meta_bytes)?,
            snapshot: file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::{ClaimId, Command, Fence, Key, Op};
    use openraft::vote::RaftLeaderIdExt;

    #[test]
    fn a_command_apply_did_not_answer_is_an_error_never_a_made_up_answer() {
        let leader = <TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(3, 1);
        let log_id = LogId::new(leader, 7);
        let release = EntryPayload::Normal(Command {
            now_ms: 1_700_000_000_000,
            skew_margin_ms: 500,
            claim: ClaimId::default(),
            region_bit: 1,
            key: Key::default(),
            op: Op::Release {
                fence: Fence::default(),
            },
        });
        let err = answer(&release, None, &log_id).expect_err("no answer was made up");
        assert!(
            err.to_string().contains("apply produced no result for"),
            "{err}"
        );
        // What apply answered is passed on as it is.
        let refused = CommandResult::Release(Err(idem_core::ReleaseError::NotFound));
        assert_eq!(
            answer(&release, Some(refused.clone()), &log_id).unwrap(),
            refused
        );
        // A blank entry has nothing to answer but that it was applied.
        assert_eq!(
            answer(&EntryPayload::Blank, None, &log_id).unwrap(),
            CommandResult::Done
        );
    }
}
