//! The node's HTTP port: `/metrics` (Prometheus text), `/healthz` (ready: 200 when every
//! group on the node has a leader and peers confirm the node's clock), `/livez` (200
//! while the process serves HTTP), `/status` (JSON), `/dashboard` (a live page with no
//! external assets) and `/api/history` (what the dashboard and `idem top` draw).

use crate::admin::status_of;
use crate::node::NodeInfo;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

pub fn router(info: NodeInfo) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route(
            "/",
            get(|| async { axum::response::Redirect::temporary("/dashboard") }),
        )
        .route("/dashboard", get(dashboard))
        .route("/api/history", get(history))
        .route("/api/digest", get(digest))
        .with_state(info)
}

async fn metrics(State(info): State<NodeInfo>) -> impl IntoResponse {
    info.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        info.metrics.render(),
    )
}

/// Ready: every group runs and has a leader, and the node's clock is confirmed by its
/// peers (a node whose clock is in doubt stays live, `/livez`, but serves no writes). A
/// node whose disk failed is never ready again until it is restarted (it stays live, so
/// an orchestrator does not restart it in a loop on a broken disk).
async fn healthz(State(info): State<NodeInfo>) -> impl IntoResponse {
    if let Some(why) = info.joining.get() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
    }
    if let Some(why) = info.failure() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("failed: the disk failed ({why}); restart the node once the disk is healthy\n"),
        );
    }
    if let Some(why) = info.stamper.clock_fault() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("clock: {why}\n"));
    }
    let running = info.router.all().len();
    if running < info.expected_groups {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "starting: {running} of {} groups running\n",
                info.expected_groups
            ),
        );
    }
    let leaderless: Vec<String> = info
        .router
        .all()
        .iter()
        .filter(|g| g.health().leader.is_none())
        .map(|g| g.id().to_string())
        .collect();
    if leaderless.is_empty() {
        (StatusCode::OK, "ok\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no leader: {}\n", leaderless.join(", ")),
        )
    }
}

async fn dashboard() -> impl IntoResponse {
    axum::response::Html(include_str!("dashboard.html"))
}

async fn history(State(info): State<NodeInfo>) -> impl IntoResponse {
    let s = status_of(&info);
    axum::Json(serde_json::json!({
        "node_id": s.node_id,
        "region": s.region_name,
        "grpc_addr": s.grpc_addr,
        "groups": groups_json(&s),
        "samples": info.history.samples(),
        "alerts": info.history.firing(),
    }))
}

fn groups_json(s: &idem_proto::internal::StatusResponse) -> Vec<serde_json::Value> {
    s.groups
        .iter()
        .map(|g| {
            serde_json::json!({
                "group": g.group.as_ref().map(|x| format!("r{}/s{}", x.region, x.shard)),
                "state": g.state,
                "term": g.term,
                "leader": g.has_leader.then_some(g.leader),
                "last_log_index": g.last_log_index,
                "applied_index": g.applied_index,
                "voters": g.voters,
            })
        })
        .collect()
}

async fn status(State(info): State<NodeInfo>) -> impl IntoResponse {
    let s = status_of(&info);
    let groups = groups_json(&s);
    axum::Json(serde_json::json!({
        "node_id": s.node_id,
        "region": s.region,
        "region_name": s.region_name,
        "grpc_addr": s.grpc_addr,
        "http_addr": s.http_addr,
        "records": s.records,
        "state_disk_bytes": s.state_disk_bytes,
        "log_disk_bytes": s.log_disk_bytes,
        "version": s.version,
        // Why the node stopped serving (its disk failed), or null.
        "failed": info.failure(),
        "groups": groups,
        // This node's wall clock and the stamp clock leases are judged by: an operator
        // (or the fault suite) compares them with a trusted clock.
        "clock": {
            "wall_ms": info.stamper.wall_ms(),
            "stamp_ms": info.stamper.now_ms(),
        },
    }))
}

/// This node's anti-entropy digest of every shard it holds: equal across the nodes of
/// all regions once they have converged (expired records and the region-local retry
/// counts are left out).
async fn digest(State(info): State<NodeInfo>) -> impl IntoResponse {
    use sha2::Digest as _;
    let now = info.stamper.wall_ms();
    let state = info.state.clone();
    let shards: Vec<u32> = info.router.all().iter().map(|g| g.id().shard).collect();
    let res = tokio::task::spawn_blocking(move || {
        let mut total = 0u64;
        let mut h = sha2::Sha256::new();
        let mut per = Vec::new();
        for shard in shards {
            let (d, n) = state.bucket_digests(shard, 64, now)?;
            total += n;
            let mut hs = sha2::Sha256::new();
            for b in &d {
                hs.update(b);
            }
            let hs = hs.finalize();
            h.update(shard.to_be_bytes());
            h.update(hs);
            per.push(serde_json::json!({"shard": shard, "records": n, "digest": hex::encode(hs)}));
        }
        Ok::<_, idem_storage::StorageError>((total, hex::encode(h.finalize()), per))
    })
    .await;
    match res {
        Ok(Ok((records, digest, shards))) => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"records": records, "digest": digest, "shards": shards})),
        ),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({"error": e.to_string()})),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(serde_json::json!({"error": e.to_string()})),
        ),
    }
}
