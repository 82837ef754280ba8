//! The `idem.internal.v1.Admin` service: node status and maintenance calls.

use crate::node::NodeInfo;
use idem_proto::internal::admin_server::Admin;
use idem_proto::internal::{
    CompactRequest, CompactResponse, GroupStatus, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

#[derive(Clone)]
pub struct AdminService {
    pub info: NodeInfo,
}

pub fn status_of(info: &NodeInfo) -> StatusResponse {
    let stats = info.state.stats();
    StatusResponse {
        node_id: info.node_id,
        region: info.region.into(),
        region_name: info.region_name.clone(),
        grpc_addr: info.grpc_addr.to_string(),
        http_addr: info.http_addr.to_string(),
        groups: info
            .router
            .all()
            .iter()
            .map(|g| {
                let h = g.health();
                GroupStatus {
                    group: Some(g.id().to_wire()),
                    state: h.state,
                    term: h.term,
                    leader: h.leader.unwrap_or(0),
                    has_leader: h.leader.is_some(),
                    last_log_index: h.last_log_index,
                    applied_index: h.applied_index,
                    voters: h.voters,
                }
            })
            .collect(),
        records: stats.estimated_records,
        state_disk_bytes: stats.disk_bytes,
        log_disk_bytes: info.log.disk_bytes(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(status_of(&self.info)))
    }

    async fn compact(
        &self,
        _req: Request<CompactRequest>,
    ) -> Result<Response<CompactResponse>, Status> {
        // Records are dropped once expired at a group's durable applied stamp, which
        // only commands advance: first let every group on this node apply one entry
        // stamped now (an empty Touch), then make the stamps durable and compact.
        let before = self
            .info
            .stamper
            .now_ms()
            .saturating_sub(self.info.stamper.clock_bound_ms());
        for g in self.info.router.all() {
            g.submit(
                idem_core::Key::default(),
                idem_core::Op::Touch { items: Vec::new() },
            )
            .await
            .map_err(|e| Status::unavailable(format!("group {}: {e}", g.id())))?;
            let shard = g.id().shard;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while self.info.state.applied_stamp(shard).unwrap_or(0) < before
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        let state = self.info.state.clone();
        tokio::task::spawn_blocking(move || {
            state.publish_horizon()?;
            state.compact();
            Ok::<_, idem_storage::StorageError>(())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(CompactResponse {}))
    }
}
