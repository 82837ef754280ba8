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
        let state = self.info.state.clone();
        tokio::task::spawn_blocking(move || state.compact())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(CompactResponse {}))
    }
}
