//! The internal `Raft` gRPC service: peers' Raft messages, streamed snapshots, and
//! commands forwarded to the leader, each dispatched to its group by the router; and
//! `Identify`, which a node with a new data directory asks before it takes part.
//!
//! Every Raft message names its sender's incarnation: a node id whose incarnation
//! changed lost its data directory, and its messages are refused. A node that rejoins
//! with an empty directory (`--rejoin`) passes a *gate* per group before it votes: a vote
//! only in a term above every term its peers knew when it rejoined (it may have voted in
//! any of those before), and only once its log reaches every peer's last index at that
//! time (it may have acknowledged any of those entries).

use crate::codec::{decode, encode};
use crate::forward::MAX_BATCH;
use crate::group::LogPosition;
use crate::group::{Forwarded, Group};
use crate::incarnations::{AdmitError, Incarnations};
use crate::router::{GroupId, Router};
use crate::types::{Snapshot, SnapshotMeta, TypeConfig, Vote};
use idem_proto::internal::raft_server::Raft as RaftRpc;
use idem_proto::internal::{GroupPosition, IdentifyRequest, IdentifyResponse};
use idem_proto::internal::{RaftMessage, SnapshotChunk};
use idem_storage::SnapshotFile;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status, Streaming};

/// Largest snapshot a node accepts (a guard against a runaway sender).
const MAX_SNAPSHOT_BYTES: u64 = 64 << 30;

/// A rejoining node's gate for one group: `term` and `log` are the highest term and the
/// most advanced last log id among its peers when it rejoined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gate {
    pub term: u64,
    pub log: LogPosition,
}

impl Gate {
    /// Whether a rejoining node may vote in `term` for a candidate whose log ends at
    /// `candidate`. Only in a term above the gate's: it may have voted in any of those
    /// before it lost its data. And only for a candidate whose log is at least the most
    /// advanced of its peers' when it rejoined: it may have acknowledged entries that were
    /// committed with its help and are now on one peer only, and it cannot compare the
    /// candidate with the log it lost; a log at least as advanced as that peer's holds
    /// every entry committed then (Raft's election restriction, with the peers' logs
    /// standing in for its own).
    pub fn allows(&self, candidate: LogPosition, term: u64) -> Result<(), String> {
        if term <= self.term {
            return Err(format!(
                "rejoining: votes only in terms above {} (it may have voted in those before it lost its data)",
                self.term
            ));
        }
        if candidate < self.log {
            return Err(format!(
                "rejoining: votes only for a log at least at {:?}, the candidate's is at {candidate:?}",
                self.log
            ));
        }
        Ok(())
    }
}

/// The gates of a rejoining node's groups, by shard (empty once every one is passed).
#[derive(Clone, Default)]
pub struct Gates(Arc<Mutex<BTreeMap<u32, Gate>>>);

impl Gates {
    pub fn set(&self, gates: BTreeMap<u32, Gate>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = gates;
    }

    pub fn get(&self, shard: u32) -> Option<Gate> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&shard)
            .copied()
    }

    /// Open the gate of `shard` for good.
    pub fn pass(&self, shard: u32) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&shard);
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

#[derive(Clone)]
pub struct RaftService {
    router: Router,
    /// This node's incarnation and its peers' (`None`: a test group that checks none).
    incarnations: Option<Arc<Incarnations>>,
    gates: Gates,
    /// This node's own directory is confirmed (it takes part with its data).
    confirmed: Arc<AtomicBool>,
}

impl RaftService {
    pub fn new(router: Router) -> Self {
        RaftService {
            router,
            incarnations: None,
            gates: Gates::default(),
            confirmed: Arc::new(AtomicBool::new(true)),
        }
    }

    /// A service that checks its peers' incarnations, answers `Identify`, and holds a
    /// rejoining node's votes behind `gates`.
    pub fn with_identity(
        router: Router,
        incarnations: Arc<Incarnations>,
        gates: Gates,
        confirmed: Arc<AtomicBool>,
    ) -> Self {
        RaftService {
            router,
            incarnations: Some(incarnations),
            gates,
            confirmed,
        }
    }

    /// Refuse a message from a node whose incarnation changed.
    fn admit(&self, node: u64, incarnation: u64) -> Result<(), Status> {
        match self
            .incarnations
            .as_ref()
            .map(|i| i.admit(node, incarnation))
        {
            None | Some(Ok(())) => Ok(()),
            Some(Err(AdmitError::Stale(s))) => Err(Status::failed_precondition(s.to_string())),
            Some(Err(e @ AdmitError::Storage(_))) => Err(Status::unavailable(e.to_string())),
        }
    }

    /// Whether a rejoining node may answer this vote in `g`.
    fn gate(&self, g: &Group, rpc: &VoteRequest<TypeConfig>) -> Result<(), Status> {
        match self.gates.get(g.id().shard) {
            None => Ok(()),
            Some(gate) => gate
                .allows(
                    LogPosition::of(rpc.last_log_id.as_ref()),
                    rpc.vote.leader_id().term,
                )
                .map_err(Status::unavailable),
        }
    }

    fn group(&self, id: Option<&idem_proto::internal::GroupId>) -> Result<Arc<Group>, Status> {
        let id = GroupId::from_wire(id).ok_or_else(|| Status::invalid_argument("group"))?;
        self.router
            .get(id)
            .ok_or_else(|| Status::not_found(format!("group {id} is not on this node")))
    }
}

fn bad_payload(e: std::io::Error) -> Status {
    Status::invalid_argument(format!("payload: {e}"))
}

impl RaftService {
    fn reply<T: serde::Serialize>(&self, group: &Group, value: &T) -> Response<RaftMessage> {
        let (from_node, from_incarnation) = self.incarnations.as_ref().map_or((0, 0), |i| i.me());
        Response::new(RaftMessage {
            group: Some(group.id().to_wire()),
            payload: encode(value),
            from_node,
            from_incarnation,
        })
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let m = req.into_inner();
        self.admit(m.from_node, m.from_incarnation)?;
        let g = self.group(m.group.as_ref())?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&m.payload).map_err(bad_payload)?;
        let r = g
            .raft()
            .append_entries(rpc)
            .await
            .map_err(|e| e.to_string());
        Ok(self.reply(&g, &r))
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = req.into_inner();
        self.admit(m.from_node, m.from_incarnation)?;
        let g = self.group(m.group.as_ref())?;
        let (pre, rpc): (bool, VoteRequest<TypeConfig>) =
            decode(&m.payload).map_err(bad_payload)?;
        // A pre-vote records nothing: only a real vote waits behind the gate.
        if !pre {
            self.gate(&g, &rpc)?;
        }
        let r = if pre {
            g.raft().pre_vote(rpc).await
        } else {
            g.raft().vote(rpc).await
        };
        Ok(self.reply(&g, &r.map_err(|e| e.to_string())))
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.admit(first.from_node, first.from_incarnation)?;
        let g = self.group(first.group.as_ref())?;
        let (vote, meta): (Vote, SnapshotMeta) = decode(&first.meta).map_err(bad_payload)?;
        let file = SnapshotFile::incoming(&g.engine().snapshot_dir(), g.id().shard);
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&file.path).map_err(|e| Status::internal(e.to_string()))?,
        );
        let mut total = 0u64;
        let mut chunk = Some(first);
        while let Some(c) = chunk {
            total += c.data.len() as u64;
            if total > MAX_SNAPSHOT_BYTES {
                let _ = std::fs::remove_file(&file.path);
                return Err(Status::resource_exhausted("snapshot larger than the limit"));
            }
            out.write_all(&c.data)
                .map_err(|e| Status::internal(e.to_string()))?;
            chunk = stream.message().await?;
        }
        let f = out
            .into_inner()
            .map_err(|e| Status::internal(e.to_string()))?;
        f.sync_all().map_err(|e| Status::internal(e.to_string()))?;
        drop(f);
        let snapshot = Snapshot {
            meta,
            snapshot: file,
        };
        let r = g
            .raft()
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| e.to_string());
        Ok(self.reply(&g, &r))
    }

    async fn forward_batch(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let m = req.into_inner();
        let g = self.group(m.group.as_ref())?;
        let batch: Vec<Forwarded> = decode(&m.payload).map_err(bad_payload)?;
        if batch.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "payload: {} forwarded requests, at most {MAX_BATCH}",
                batch.len()
            )));
        }
        // Served here only: a forwarded request is never forwarded again.
        let replies = futures::future::join_all(batch.into_iter().map(|f| g.handle_local(f))).await;
        Ok(self.reply(&g, &replies))
    }

    async fn identify(
        &self,
        req: Request<IdentifyRequest>,
    ) -> Result<Response<IdentifyResponse>, Status> {
        let r = req.into_inner();
        let Some(inc) = &self.incarnations else {
            return Err(Status::unimplemented(
                "this node does not track incarnations",
            ));
        };
        if r.node_id == 0 || r.incarnation == 0 {
            return Err(Status::invalid_argument("node_id and incarnation"));
        }
        let known = inc.known(r.node_id);
        if r.rejoin && known != Some(r.incarnation) {
            // From now on the old incarnation is refused and the new one admitted.
            inc.replace(r.node_id, r.incarnation)
                .map_err(|e| Status::unavailable(e.to_string()))?;
            // The groups this node leads replicate to it from the start: its log went back.
            for g in self.router.all() {
                g.allow_revert(r.node_id).await;
            }
            tracing::warn!(
                node = r.node_id,
                old = ?known.map(|k| format!("{k:016x}")),
                new = %format!("{:016x}", r.incarnation),
                "a node rejoins with a new data directory"
            );
        }
        let groups = self
            .router
            .all()
            .iter()
            .map(|g| {
                let last = g
                    .last_log_position()
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                Ok(GroupPosition {
                    shard: g.id().shard,
                    term: g.health().term,
                    last_log_index: last.index,
                    last_log_term: last.term,
                    last_log_node: last.node,
                })
            })
            .collect::<Result<_, Status>>()?;
        Ok(Response::new(IdentifyResponse {
            known_incarnation: known.unwrap_or(0),
            confirmed: self.confirmed.load(Ordering::SeqCst),
            seen_region: u16::try_from(r.region).is_ok_and(|reg| inc.seen_region(reg)),
            groups,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rejoining_node_votes_only_in_a_later_term_for_a_log_as_advanced_as_its_peers() {
        let at = |term, node, index| LogPosition { term, node, index };
        let gate = Gate {
            term: 7,
            log: at(6, 2, 120),
        };
        assert!(
            gate.allows(at(6, 2, 119), 8).is_err(),
            "the candidate may miss committed entries"
        );
        assert!(
            gate.allows(at(5, 3, 900), 8).is_err(),
            "a longer log of an older leader is behind"
        );
        assert!(
            gate.allows(at(6, 2, 120), 7).is_err(),
            "it may have voted in term 7"
        );
        assert!(gate.allows(at(6, 2, 120), 3).is_err());
        assert!(gate.allows(at(6, 2, 120), 8).is_ok());
        assert!(
            gate.allows(at(7, 1, 3), 9).is_ok(),
            "a later leader's entry is ahead"
        );
        let gates = Gates::default();
        gates.set([(0, gate), (1, gate)].into_iter().collect());
        gates.pass(0);
        assert_eq!(gates.get(0), None);
        assert_eq!(gates.get(1), Some(gate));
        assert!(!gates.is_empty());
        gates.pass(1);
        assert!(gates.is_empty());
    }
}
