//! The `Geo` service: what other regions call on this node. Every call runs through
//! this region's groups (their Raft logs), never around them.

use crate::wire::{
    ApplyRequest, ApplyResponse, DigestRequest, DigestResponse, EntryResult, FetchRequest,
    FetchResponse, MergeRequest, MergeResponse,
};
use crate::{Geo, Mode};
use futures::future::join_all;
use idem_core::codec::{decode_shipped, encode_shipped, Shipped};
use idem_core::merge::MergeOutcome;
use idem_core::{CommandResult, Key, Op, Record};
use idem_proto::internal::geo_server::Geo as GeoRpc;
use idem_proto::internal::GeoMessage;
use idem_raft::codec::{decode, encode};
use idem_raft::GroupError;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Most commands or entries in one call.
const MAX_BATCH: usize = 4096;
/// How many times a deferred merge is offered again before anti-entropy is left to it.
const MAX_DEFER_ROUNDS: u32 = 8;

pub struct GeoService {
    geo: Geo,
}

impl GeoService {
    pub fn new(geo: Geo) -> GeoService {
        GeoService { geo }
    }

    /// The state engine behind this node's group of `shard` (anti-entropy reads).
    fn engine_of(&self, shard: u32) -> Result<idem_storage::StateEngine, Status> {
        self.geo
            .local_group(shard)
            .map(|g| g.state().clone())
            .ok_or_else(|| Status::unavailable(format!("shard {shard} is not running here")))
    }
}

/// Largest key (tenant, scope and key bytes) a peer may send: far above any configured
/// `limits.max_key_bytes`, so only a corrupt or hostile call meets it.
const MAX_PEER_KEY_BYTES: usize = 64 << 10;

impl Geo {
    /// A peer's call checked against this cluster ([`check_peer_call`]).
    pub(crate) fn check_peer_call(&self, c: &crate::wire::Call) -> Result<(), String> {
        let cfg = self.config();
        check_peer_call(
            c,
            cfg.shards,
            (cfg.regions.len() / 2 + 1) as u32,
            cfg.max_response_bytes,
        )
    }
}

/// Whether `key` belongs to `shard` in a cluster of `shards`.
fn check_shard(key: &Key, shard: u32, shards: u32) -> Result<(), String> {
    let expected = idem_core::shard::shard_of(key, shards);
    if shard != expected {
        return Err(format!(
            "shard {shard} does not hold this key (its shard is {expected})"
        ));
    }
    Ok(())
}

/// What a peer may ask of this region's groups: its part of a proposal, of a holder's
/// call, or the withdraws and final notices that follow; for the key's own shard;
/// within the sizes any node of the cluster sends. Anything else (a Merge, an
/// OutboxAck, a Touch or a Reserve, a completion with a quorum other than the
/// cluster's majority, an Extend without the proposer's lease end) is refused.
fn check_peer_call(
    c: &crate::wire::Call,
    shards: u32,
    majority: u32,
    max_response_bytes: usize,
) -> Result<(), String> {
    check_shard(&c.key, c.shard, shards)?;
    if c.key.tenant.is_empty() {
        return Err("a key without a tenant".into());
    }
    if c.key.approx_bytes() > MAX_PEER_KEY_BYTES {
        return Err(format!("a key of {} bytes", c.key.approx_bytes()));
    }
    match &c.op {
        Op::Propose { .. } | Op::Release { .. } | Op::Withdraw { .. } | Op::Final { .. } => Ok(()),
        Op::Complete {
            quorum, response, ..
        } => {
            if *quorum != majority {
                return Err(format!(
                    "a completion with quorum {quorum}; this cluster's is {majority}"
                ));
            }
            if response.size() > max_response_bytes {
                return Err(format!(
                    "a response of {} bytes, above limits.max_response_bytes ({max_response_bytes})",
                    response.size()
                ));
            }
            Ok(())
        }
        Op::Extend {
            until_ms: Some(_), ..
        } => Ok(()),
        other => Err(format!("a peer may not send `{}`", other.name())),
    }
}

fn bad(what: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{what}: {e}"))
}

fn reply(from: u16, payload: Vec<u8>) -> Response<GeoMessage> {
    Response::new(GeoMessage {
        from_region: from.into(),
        payload,
    })
}

impl Geo {
    /// Merge one record from another region into the local group, offering it again
    /// later while the acceptor rules defer it.
    pub(crate) async fn merge_record(&self, shard: u32, key: Key, record: Record) -> EntryResult {
        let Some(group) = self.local_group(shard) else {
            return EntryResult::Failed(format!("shard {shard} is not running here"));
        };
        let mode = self.mode_of(&key);
        // A record this node's copy already contains changes nothing, so it costs no log
        // entry (a relayed completion usually arrives where the Complete round stored it
        // already; a 1 MiB response would otherwise be written again by every replica).
        // The local copy may be behind the leader's, which only ever contains more.
        if let Ok(Some(local)) = group.read_local(&key) {
            let stamper = self.stamper();
            let m = idem_core::merge::merge(
                Some(&local),
                &record,
                stamper.now_ms(),
                stamper.skew_margin_ms(),
                mode == Mode::Global,
            );
            if matches!(m.outcome, MergeOutcome::Unchanged) && m.conflict.is_none() {
                return EntryResult::Merged;
            }
        }
        let op = Op::Merge {
            record: record.clone(),
            guarded: mode == Mode::Global,
            quorum: self.merge_quorum(mode),
            region: Some(self.my_region()),
        };
        match group.submit(key.clone(), op).await {
            Ok(CommandResult::Merge {
                outcome, conflict, ..
            }) => {
                if let Some(c) = &conflict {
                    self.observer().conflict(mode, c);
                    if mode == Mode::Global
                        && matches!(c, idem_core::merge::Conflict::DualCompletion)
                    {
                        tracing::error!(key = %key, claim = %record.claim, generation = record.generation,
                            "SAFETY VIOLATION: two different completions of one generation met in a merge");
                    }
                }
                match outcome {
                    MergeOutcome::Deferred { retry_after_ms } => {
                        self.defer(shard, key, record, retry_after_ms, 1);
                        EntryResult::Deferred
                    }
                    _ => EntryResult::Merged,
                }
            }
            Ok(other) => EntryResult::Failed(format!("unexpected merge result {other:?}")),
            Err(e) => EntryResult::Failed(e.to_string()),
        }
    }

    /// GLOBAL mode: a majority of regions' witnesses make a completion final.
    fn merge_quorum(&self, mode: Mode) -> u32 {
        match mode {
            Mode::Global => (self.config().regions.len() / 2 + 1) as u32,
            Mode::Regional => 0,
        }
    }

    fn defer(&self, shard: u32, key: Key, record: Record, after_ms: u64, round: u32) {
        if round > MAX_DEFER_ROUNDS {
            return;
        }
        let Some(permit) = self.deferred_permit() else {
            tracing::debug!(key = %key, "deferred merges full; anti-entropy will repair");
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(after_ms.clamp(1, 60_000))).await;
            drop(permit);
            let Some(group) = me.local_group(shard) else {
                return;
            };
            let mode = me.mode_of(&key);
            let op = Op::Merge {
                record: record.clone(),
                guarded: mode == Mode::Global,
                quorum: me.merge_quorum(mode),
                region: Some(me.my_region()),
            };
            if let Ok(CommandResult::Merge {
                outcome: MergeOutcome::Deferred { retry_after_ms },
                ..
            }) = group.submit(key.clone(), op).await
            {
                me.defer(shard, key, record, retry_after_ms, round + 1);
            }
        });
    }
}

#[tonic::async_trait]
impl GeoRpc for GeoService {
    async fn apply(&self, req: Request<GeoMessage>) -> Result<Response<GeoMessage>, Status> {
        let r: ApplyRequest = decode(&req.get_ref().payload).map_err(|e| bad("apply", e))?;
        if r.calls.len() > MAX_BATCH {
            return Err(bad(
                "apply",
                format!("{} calls, at most {MAX_BATCH}", r.calls.len()),
            ));
        }
        for (i, c) in r.calls.iter().enumerate() {
            if let Err(e) = self.geo.check_peer_call(c) {
                tracing::warn!(from_region = req.get_ref().from_region, call = i, error = %e, "refused a peer's call");
                return Err(bad(
                    "apply",
                    format!("call {i}: {e}; none of the {} calls was run", r.calls.len()),
                ));
            }
        }
        let stamper = self.geo.stamper();
        // A clock probe (no calls) is always answered, so that a node whose clock is
        // off can measure by how much, and see when it is back.
        if r.calls.is_empty() {
            let resp = ApplyResponse {
                hlc: idem_core::Hlc::compose(stamper.mint().0, 0),
                results: Vec::new(),
                node: stamper.identity().node_id,
                clock_ms: stamper.now_ms(),
            };
            return Ok(reply(self.geo.my_region(), encode(&resp)));
        }
        // A peer whose clock is further ahead than the bound is not served: its
        // proposals' lease ends are measured on that clock.
        if let Err(e) = stamper.observe(r.hlc) {
            stamper.note_refused(r.from_node);
            tracing::warn!(from_region = req.get_ref().from_region, error = %e, "peer clock refused; its calls are not run");
            return Err(Status::failed_precondition(format!(
                "clock: {e}; none of the {} calls was run",
                r.calls.len()
            )));
        }
        let results = join_all(r.calls.into_iter().map(|c| {
            let geo = self.geo.clone();
            async move {
                match geo.local_group(c.shard) {
                    None => Err(GroupError::Unavailable(format!(
                        "shard {} is not running here",
                        c.shard
                    ))),
                    Some(g) => g.submit(c.key, c.op).await,
                }
            }
        }))
        .await;
        let (now, _) = stamper.mint();
        let resp = ApplyResponse {
            hlc: idem_core::Hlc::compose(now, 0),
            results,
            node: stamper.identity().node_id,
            clock_ms: stamper.now_ms(),
        };
        Ok(reply(self.geo.my_region(), encode(&resp)))
    }

    async fn merge(&self, req: Request<GeoMessage>) -> Result<Response<GeoMessage>, Status> {
        let r: MergeRequest = decode(&req.get_ref().payload).map_err(|e| bad("merge", e))?;
        if r.entries.len() > MAX_BATCH {
            return Err(bad(
                "merge",
                format!("{} entries, at most {MAX_BATCH}", r.entries.len()),
            ));
        }
        let results = join_all(r.entries.iter().map(|bytes| {
            let geo = self.geo.clone();
            async move {
                match decode_shipped(bytes) {
                    Err(e) => EntryResult::Invalid(e.to_string()),
                    Ok(s) if s.key.tenant.is_empty() => {
                        EntryResult::Invalid("entry without a tenant".into())
                    }
                    Ok(s) => match check_shard(&s.key, r.shard, geo.config().shards) {
                        Err(e) => EntryResult::Invalid(e),
                        Ok(()) => geo.merge_record(r.shard, s.key, s.record).await,
                    },
                }
            }
        }))
        .await;
        Ok(reply(
            self.geo.my_region(),
            encode(&MergeResponse { results }),
        ))
    }

    async fn digest(&self, req: Request<GeoMessage>) -> Result<Response<GeoMessage>, Status> {
        let r: DigestRequest = decode(&req.get_ref().payload).map_err(|e| bad("digest", e))?;
        let engine = self.engine_of(r.shard)?;
        let now = self.geo.stamper().wall_ms();
        let buckets = r.buckets.clamp(1, 4096);
        let (digests, records) =
            tokio::task::spawn_blocking(move || engine.bucket_digests(r.shard, buckets, now))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(e.to_string()))?;
        Ok(reply(
            self.geo.my_region(),
            encode(&DigestResponse { digests, records }),
        ))
    }

    async fn fetch(&self, req: Request<GeoMessage>) -> Result<Response<GeoMessage>, Status> {
        let r: FetchRequest = decode(&req.get_ref().payload).map_err(|e| bad("fetch", e))?;
        let engine = self.engine_of(r.shard)?;
        let now = self.geo.stamper().wall_ms();
        let limit = r.limit.clamp(1, MAX_BATCH as u32) as usize;
        let (records, next) = tokio::task::spawn_blocking(move || {
            engine.bucket_records(
                r.shard,
                r.bucket,
                r.buckets,
                r.after.as_deref(),
                limit,
                idem_raft::MAX_BATCH_BYTES,
                now,
            )
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        let records = records
            .into_iter()
            .map(|(key, record)| {
                encode_shipped(&Shipped {
                    enqueued_ms: now,
                    key,
                    record,
                })
            })
            .collect();
        Ok(reply(
            self.geo.my_region(),
            encode(&FetchResponse { records, next }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Call;
    use idem_core::{Fence, StoredResponse};

    fn call(op: Op) -> Call {
        let key = Key {
            tenant: "t".into(),
            scope: "s".into(),
            key: b"k".to_vec(),
        };
        Call {
            shard: idem_core::shard::shard_of(&key, 8),
            key,
            op,
        }
    }

    fn complete(quorum: u32, body: usize) -> Op {
        Op::Complete {
            fence: Fence::default(),
            response: StoredResponse {
                status: 200,
                headers: vec![],
                body: vec![0; body],
            },
            quorum,
        }
    }

    #[test]
    fn a_peer_may_send_only_the_calls_of_the_protocol_for_the_keys_own_shard() {
        let check = |c: &Call| check_peer_call(c, 8, 2, 1_000);
        let fence = Fence::default();
        for op in [
            Op::Release { fence },
            Op::Final { fence },
            Op::Extend {
                fence,
                lease_ms: 1_000,
                until_ms: Some(5),
            },
            complete(2, 10),
        ] {
            assert_eq!(check(&call(op.clone())), Ok(()), "{op:?}");
        }
        // Ops a peer never sends, and a completion made final by a quorum of its choosing.
        for op in [
            Op::Touch { items: vec![] },
            Op::OutboxAck {
                dest: 1,
                upto: 9,
                dead: vec![],
            },
            Op::Extend {
                fence,
                lease_ms: 1_000,
                until_ms: None,
            },
            complete(1, 10),
            complete(2, 1_001),
        ] {
            assert!(check(&call(op.clone())).is_err(), "{op:?} was accepted");
        }
        // Another shard than the key's.
        let mut c = call(Op::Release { fence });
        c.shard = (c.shard + 1) % 8;
        assert!(check(&c).unwrap_err().contains("does not hold this key"));
        // A key without a tenant.
        let mut c = call(Op::Release { fence });
        c.key.tenant.clear();
        c.shard = idem_core::shard::shard_of(&c.key, 8);
        assert!(check(&c).is_err());
    }
}
