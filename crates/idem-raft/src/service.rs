//! The internal `Raft` gRPC service: peers' Raft messages, streamed snapshots, and
//! commands forwarded to the leader, each dispatched to its group by the router.

use crate::codec::{decode, encode};
use crate::forward::MAX_BATCH;
use crate::group::{Forwarded, Group};
use crate::router::{GroupId, Router};
use crate::types::{Snapshot, SnapshotMeta, TypeConfig, Vote};
use idem_proto::internal::raft_server::Raft as RaftRpc;
use idem_proto::internal::{RaftMessage, SnapshotChunk};
use idem_storage::SnapshotFile;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use std::io::Write;
use std::sync::Arc;
use tonic::{Request, Response, Status, Streaming};

/// Largest snapshot a node accepts (a guard against a runaway sender).
const MAX_SNAPSHOT_BYTES: u64 = 64 << 30;

#[derive(Clone)]
pub struct RaftService {
    router: Router,
}

impl RaftService {
    pub fn new(router: Router) -> Self {
        RaftService { router }
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

fn reply<T: serde::Serialize>(group: &Group, value: &T) -> Response<RaftMessage> {
    Response::new(RaftMessage {
        group: Some(group.id().to_wire()),
        payload: encode(value),
    })
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let m = req.into_inner();
        let g = self.group(m.group.as_ref())?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&m.payload).map_err(bad_payload)?;
        let r = g
            .raft()
            .append_entries(rpc)
            .await
            .map_err(|e| e.to_string());
        Ok(reply(&g, &r))
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = req.into_inner();
        let g = self.group(m.group.as_ref())?;
        let (pre, rpc): (bool, VoteRequest<TypeConfig>) =
            decode(&m.payload).map_err(bad_payload)?;
        let r = if pre {
            g.raft().pre_vote(rpc).await
        } else {
            g.raft().vote(rpc).await
        };
        Ok(reply(&g, &r.map_err(|e| e.to_string())))
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
        Ok(reply(&g, &r))
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
        Ok(reply(&g, &replies))
    }
}
