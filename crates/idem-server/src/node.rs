//! Node assembly: open the engines, serve gRPC and HTTP, start this node's groups.

use crate::admin::AdminService;
use crate::api::IdemService;
use crate::auth::Auth;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use idem_proto::internal::admin_server::AdminServer;
use idem_proto::internal::geo_server::GeoServer;
use idem_proto::internal::raft_server::RaftServer;
use idem_proto::v1::idem_server::IdemServer;
use idem_raft::{Group, GroupId, NodeIdentity, Peer, RaftService, Router, Stamper};
use idem_storage::{LogEngine, StateEngine};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often Raft health is sampled for the leader-change counter.
const HEALTH_SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Largest gRPC message a node accepts (a 1 MiB response plus headroom).
use crate::config::MAX_GRPC_MESSAGE_BYTES;

#[derive(Debug, Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("storage: {0}")]
    Storage(#[from] idem_storage::StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(#[from] idem_raft::GroupError),
    /// The node must not take part (its data directory was lost): see `join`.
    #[error("{0}")]
    Refused(String),
}

/// What the services and endpoints of a node share.
#[derive(Clone)]
pub struct NodeInfo {
    pub node_id: u64,
    pub region: u16,
    pub region_name: String,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub router: Router,
    pub state: StateEngine,
    pub log: LogEngine,
    pub metrics: Arc<Metrics>,
    pub stamper: Arc<Stamper>,
    /// Groups this node runs once started (one per shard).
    pub expected_groups: usize,
    pub history: Arc<crate::history::History>,
    pub geo: idem_geo::Geo,
    /// While a node with a new data directory joins: what it waits for.
    pub joining: crate::join::JoinStatus,
    last_leaders: Arc<Mutex<BTreeMap<GroupId, Option<u64>>>>,
}

impl NodeInfo {
    /// Why this node stopped serving (its disk failed), if it did.
    pub fn failure(&self) -> Option<String> {
        self.log.disk().failure()
    }

    /// Fail stop after a disk failure: the groups stop (no vote, no append, no
    /// acknowledgement), the public API answers `NODE_UNAVAILABLE`, `/healthz` says why;
    /// the process stays up (live, not ready) until an operator restarts it, which
    /// recovers from what the disk holds.
    async fn fail_stop(&self, why: &str) {
        tracing::error!(
            node = self.node_id,
            reason = %why,
            "the node's disk failed: it has stopped serving and taking part in Raft; \
             restart it once the disk is healthy (it recovers from what the disk holds)"
        );
        for g in self.router.all() {
            g.shutdown().await;
        }
    }

    /// Refresh the sampled gauges (Raft and RocksDB health) and count leader changes.
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        let mut last = self.last_leaders.lock().unwrap_or_else(|p| p.into_inner());
        for g in self.router.all() {
            let h = g.health();
            let label = g.id().to_string();
            let l = [label.as_str()];
            m.raft_is_leader
                .with(&l)
                .set(f64::from(u8::from(h.leader == Some(self.node_id))));
            m.raft_has_leader
                .with(&l)
                .set(f64::from(u8::from(h.leader.is_some())));
            m.raft_term.with(&l).set(h.term as f64);
            m.raft_last_log_index.with(&l).set(h.last_log_index as f64);
            m.raft_applied_index.with(&l).set(h.applied_index as f64);
            m.raft_commit_index.with(&l).set(h.committed_index as f64);
            if let Ok(n) = self.state.double_grants(g.id().shard) {
                m.regional_double_grants_total.with(&l).store(n);
            }
            let prev = last.insert(g.id(), h.leader);
            if let (Some(Some(a)), Some(b)) = (prev, h.leader) {
                if a != b {
                    m.raft_leader_changes_total.with(&l).inc();
                }
            }
        }
        let names: BTreeMap<u16, String> = self
            .geo
            .config()
            .regions
            .iter()
            .map(|r| (r.id, r.name.clone()))
            .collect();
        for (dest, b) in self.geo.replication_backlog() {
            let name = names
                .get(&dest)
                .cloned()
                .unwrap_or_else(|| dest.to_string());
            let l = [name.as_str()];
            m.outbox_lag_seconds
                .with(&l)
                .set(b.oldest_age.as_secs_f64());
            m.dead_letter_queue_depth
                .with(&l)
                .set(b.dead_letters as f64);
            m.outbox_queued.with(&l).set(b.queued as f64);
            m.outbox_skipped.with(&l).set(b.skipped as f64);
        }
        let s = self.state.stats();
        m.keys_stored.set(s.estimated_records as f64);
        m.state_disk_bytes.set(s.disk_bytes as f64);
        m.log_disk_bytes.set(self.log.disk_bytes() as f64);
        m.rocksdb_pending_compaction_bytes
            .set(s.pending_compaction_bytes as f64);
        m.rocksdb_write_stalled
            .set(f64::from(u8::from(s.write_stalled)));
        for (region, age) in self.geo.region_health() {
            let name = names
                .get(&region)
                .cloned()
                .unwrap_or_else(|| region.to_string());
            m.region_last_answer_age_seconds
                .with(&[name.as_str()])
                .set(age.as_secs_f64());
        }
        for (peer, off) in self.stamper.peer_offsets() {
            m.peer_clock_offset_seconds
                .with(&[peer.to_string().as_str()])
                .set(off as f64 / 1000.0);
        }
        for (peer, n) in self.stamper.clock_refusals() {
            m.clock_refused_total
                .with(&[peer.to_string().as_str()])
                .store(n);
        }
        m.clock_fault
            .set(f64::from(u8::from(self.stamper.clock_fault().is_some())));
        m.node_failed
            .set(f64::from(u8::from(self.failure().is_some())));
    }
}

/// Counts what the cross-region layer reports.
struct GeoObserver {
    metrics: Arc<Metrics>,
    names: BTreeMap<u16, String>,
}

impl idem_geo::Observer for GeoObserver {
    fn conflict(&self, mode: idem_geo::Mode, conflict: &idem_core::merge::Conflict) {
        // REGIONAL double grants are counted exactly in replicated state
        // (`idem_regional_double_grants_total`), not once per merge that meets one.
        if matches!(conflict, idem_core::merge::Conflict::Overturned) {
            return;
        }
        self.metrics
            .cross_region_conflict_total
            .with(&[mode.as_str()])
            .inc();
    }

    fn withdrawn(&self, region: u16, result: idem_geo::WithdrawResult) {
        let name = self
            .names
            .get(&region)
            .cloned()
            .unwrap_or_else(|| region.to_string());
        self.metrics
            .geo_withdraws_total
            .with(&[name.as_str(), result.as_str()])
            .inc();
    }

    fn repaired(&self, from_region: u16, records: u64) {
        let name = self
            .names
            .get(&from_region)
            .cloned()
            .unwrap_or_else(|| from_region.to_string());
        self.metrics
            .anti_entropy_repaired_total
            .with(&[name.as_str()])
            .add(records);
    }
}

/// A rejoining node's directory is confirmed once every group's gate is passed: its log
/// reached what its peers held and its term went past theirs (until then a restart
/// rejoins again, with gates at least as strict).
async fn confirm_when_gates_pass(
    router: Router,
    region: u16,
    gates: idem_raft::Gates,
    mut identity: idem_storage::Identity,
    data: std::path::PathBuf,
    confirmed: Arc<std::sync::atomic::AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        for g in router.all().iter().filter(|g| g.id().region == region) {
            let shard = g.id().shard;
            let Some(gate) = gates.get(shard) else {
                continue;
            };
            // Its own log as advanced as its peers' were: it may stand for election.
            if g.last_log_position().is_ok_and(|own| own >= gate.log) {
                g.allow_elections();
                if g.health().term > gate.term {
                    tracing::info!(group = %g.id(), "rejoined: caught up and past the peers' terms");
                    gates.pass(shard);
                }
            }
        }
        if gates.is_empty() {
            match identity.confirm(&data) {
                Ok(()) => {
                    confirmed.store(true, std::sync::atomic::Ordering::SeqCst);
                    tracing::info!("rejoined: the data directory is confirmed");
                }
                Err(e) => tracing::error!(error = %e, "cannot confirm the data directory"),
            }
            return;
        }
    }
}

pub struct Node {
    info: NodeInfo,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    pub async fn start(cfg: Config) -> Result<Node, NodeError> {
        cfg.validate()?;
        let region = cfg.my_region().ok_or_else(|| ConfigError::Invalid {
            key: "node.region".into(),
            reason: "unknown region".into(),
        })?;
        let data = &cfg.node.data_dir;
        let data_dir_error = |source| NodeError::DataDir {
            path: data.clone(),
            source,
        };
        idem_storage::create_dir_durable(data).map_err(data_dir_error)?;
        let found = idem_storage::Identity::open(data, cfg.node.id, region.id, rand::random())?;
        let mut dir_identity = found.identity();
        if let idem_storage::Found::New(_) = found {
            tracing::info!(incarnation = %format!("{:016x}", dir_identity.incarnation), "a new data directory");
        }
        // Both engines share one disk: a write or sync that fails in either stops both.
        let disk = idem_storage::DiskHealth::default();
        let log = LogEngine::open_on(&data.join("log"), disk.clone())?;
        let state = StateEngine::open_on(&data.join("state"), disk)?;
        // The engines' directories are names in the data directory: make them durable.
        idem_storage::sync_dir(data).map_err(data_dir_error)?;

        let grpc_listener = TcpListener::bind(cfg.node.grpc_addr)
            .await
            .map_err(|source| NodeError::Bind {
                addr: cfg.node.grpc_addr,
                source,
            })?;
        let http_listener = TcpListener::bind(cfg.node.http_addr)
            .await
            .map_err(|source| NodeError::Bind {
                addr: cfg.node.http_addr,
                source,
            })?;
        let grpc_addr = grpc_listener
            .local_addr()
            .map_err(|source| NodeError::Bind {
                addr: cfg.node.grpc_addr,
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| NodeError::Bind {
                addr: cfg.node.http_addr,
                source,
            })?;

        let identity = NodeIdentity {
            node_id: cfg.node.id,
            region: region.id,
        };
        let stamper = Arc::new(Stamper::new(
            identity,
            cfg.cluster.skew_margin_ms,
            cfg.cluster.clock_bound_ms(),
        ));
        let router = Router::default();
        let metrics = Arc::new(Metrics::default());
        metrics.seed(
            &cfg.effective_regions()
                .iter()
                .filter(|r| r.id != region.id)
                .map(|r| r.name.clone())
                .collect::<Vec<_>>(),
        );
        let incarnations = Arc::new(idem_raft::Incarnations::open(
            log.clone(),
            cfg.node.id,
            dir_identity.incarnation,
        )?);
        let channels = idem_raft::Channels::with_local_address(cfg.node.outgoing_addr)
            .with_incarnations(incarnations.clone());
        let confirmed = Arc::new(std::sync::atomic::AtomicBool::new(dir_identity.confirmed));
        let gates = idem_raft::Gates::default();
        let joining = crate::join::JoinStatus::default();
        if !dir_identity.confirmed {
            joining.set(Some(
                "joining: a new data directory asks its region's nodes".into(),
            ));
        }
        let geo_cfg = cfg.geo_config(region.id);
        state.set_outbox(idem_storage::OutboxConfig {
            destinations: if geo_cfg.regions.len() > 1 {
                geo_cfg
                    .regions
                    .iter()
                    .map(|r| r.id)
                    .filter(|id| *id != region.id)
                    .collect()
            } else {
                Vec::new()
            },
            max_entries: geo_cfg.relay.max_outbox,
        });
        let region_names: BTreeMap<u16, String> = geo_cfg
            .regions
            .iter()
            .map(|r| (r.id, r.name.clone()))
            .collect();
        let geo = idem_geo::Geo::new(
            geo_cfg,
            router.clone(),
            stamper.clone(),
            channels.clone(),
            Arc::new(GeoObserver {
                metrics: metrics.clone(),
                names: region_names,
            }),
        );
        let info = NodeInfo {
            node_id: cfg.node.id,
            region: region.id,
            region_name: region.name.clone(),
            grpc_addr,
            http_addr,
            router: router.clone(),
            state: state.clone(),
            log: log.clone(),
            metrics: metrics.clone(),
            stamper: stamper.clone(),
            expected_groups: cfg.cluster.shards as usize,
            history: Arc::default(),
            geo: geo.clone(),
            joining: joining.clone(),
            last_leaders: Arc::default(),
        };
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        // Serve first: peers must reach this node while its groups elect leaders.
        let idem = IdemService {
            region: region.id,
            shards: cfg.cluster.shards,
            router: router.clone(),
            limits: cfg.effective_limits(),
            auth: Auth::new(&cfg.auth),
            metrics: metrics.clone(),
            skew_margin_ms: cfg.cluster.skew_margin_ms,
            geo: geo.clone(),
            stamper: stamper.clone(),
            disk: log.disk().clone(),
            joining: joining.clone(),
        };
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<IdemServer<IdemService>>()
            .await;
        // Both reflection versions: grpcurl and grpcio-reflection of recent releases ask
        // for v1; older grpcurl, Postman, Evans and many Python tools for v1alpha.
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(idem_proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ConfigError::Parse(format!("reflection: {e}")))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(idem_proto::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| ConfigError::Parse(format!("reflection: {e}")))?;
        let grpc = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(
                IdemServer::new(idem)
                    .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES),
            )
            .add_service(
                RaftServer::new(RaftService::with_identity(
                    router.clone(),
                    incarnations.clone(),
                    gates.clone(),
                    confirmed.clone(),
                ))
                .max_decoding_message_size(idem_raft::MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(idem_raft::MAX_PEER_MESSAGE_BYTES),
            )
            .add_service(
                // A node that is joining answers no other region: an answer would let
                // that region believe this one took part.
                tonic::service::interceptor::InterceptedService::new(
                    GeoServer::new(idem_geo::service::GeoService::new(geo.clone()))
                        .max_decoding_message_size(idem_raft::MAX_PEER_MESSAGE_BYTES)
                        .max_encoding_message_size(idem_raft::MAX_PEER_MESSAGE_BYTES),
                    {
                        let joining = joining.clone();
                        move |req: tonic::Request<()>| match joining.get() {
                            Some(why) => Err(tonic::Status::unavailable(why)),
                            None => Ok(req),
                        }
                    },
                ),
            )
            .add_service(AdminServer::new(AdminService { info: info.clone() }))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha);
        let mut rx = shutdown_rx.clone();
        // Accepted connections get TCP_NODELAY here: `Server::tcp_nodelay` covers only
        // listeners tonic binds itself. Without it a response written in several small
        // frames waits for the peer's delayed ACK (about 40 ms).
        let incoming =
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = grpc.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        }));
        let mut rx = shutdown_rx.clone();
        let app = crate::http::router(info.clone());
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(http_listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }));

        let peers: Vec<Peer> = region
            .nodes
            .iter()
            .map(|n| Peer {
                id: n.id,
                addr: n.addr.clone(),
            })
            .collect();
        // A new data directory joins before its groups start (see `join`).
        if !dir_identity.confirmed {
            let member = |n: &crate::config::PeerConfig| crate::join::Member {
                id: n.id,
                addr: n.addr.clone(),
            };
            let region_peers: Vec<_> = region
                .nodes
                .iter()
                .filter(|n| n.id != cfg.node.id)
                .map(member)
                .collect();
            let others: Vec<_> = cfg
                .effective_regions()
                .iter()
                .filter(|r| r.id != region.id)
                .map(|r| (r.id, r.nodes.iter().map(member).collect()))
                .collect();
            let joined = crate::join::join(
                &dir_identity,
                &region_peers,
                &others,
                &channels,
                cfg.node.rejoin,
                &joining,
            )
            .await;
            match joined {
                Ok(crate::join::Joined::Confirmed) => {
                    dir_identity.confirm(data)?;
                    confirmed.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(crate::join::Joined::Rejoined(g)) => {
                    tracing::warn!(gates = ?g, "rejoining with an empty data directory: votes wait for these logs and terms");
                    gates.set(g);
                    tasks.push(tokio::spawn(confirm_when_gates_pass(
                        router.clone(),
                        region.id,
                        gates.clone(),
                        dir_identity,
                        data.clone(),
                        confirmed.clone(),
                        shutdown_rx.clone(),
                    )));
                }
                Err(refused) => {
                    let _ = shutdown.send(true);
                    for t in tasks {
                        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
                    }
                    return Err(NodeError::Refused(refused.to_string()));
                }
            }
        } else if cfg.node.rejoin {
            tracing::warn!("--rejoin ignored: this data directory has its data");
        }
        let mut group_cfg = cfg.raft.group_config();
        group_cfg.max_response_bytes = cfg.limits.max_response_bytes;
        for shard in 0..cfg.cluster.shards {
            let id = GroupId {
                region: region.id,
                shard,
            };
            // A rejoining node stands for election in a group once its log caught up,
            // and does not initialize the group: its peers' leader replicates to it.
            let rejoining = gates.get(shard).is_some();
            let cfg = idem_raft::GroupConfig {
                elect: !rejoining,
                initialize: !rejoining,
                ..group_cfg.clone()
            };
            let g = Group::start(
                id,
                stamper.clone(),
                &peers,
                log.clone(),
                state.clone(),
                channels.clone(),
                &cfg,
            )
            .await?;
            router.insert(Arc::new(g));
        }

        tasks.extend(geo.start_background(shutdown_rx.clone()));
        let sampler = info.clone();
        let mut rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_SAMPLE_EVERY);
            let per_sample = (crate::history::SAMPLE_EVERY_SECS * 1000 / HEALTH_SAMPLE_EVERY.as_millis() as u64).max(1);
            let mut n = 0u64;
            let mut stopped = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if !stopped {
                            if let Some(why) = sampler.failure() {
                                stopped = true;
                                let node = sampler.clone();
                                tokio::spawn(async move { node.fail_stop(&why).await });
                            }
                        }
                        sampler.refresh_gauges();
                        if n.is_multiple_of(per_sample) {
                            let sample = crate::history::Sample::take(&sampler.metrics, sampler.stamper.wall_ms());
                            sampler.history.push(sample);
                        }
                        n += 1;
                    }
                    _ = rx.wait_for(|s| *s) => return,
                }
            }
        }));
        tracing::info!(node = cfg.node.id, region = %region.name, grpc = %grpc_addr, http = %http_addr, "node started");
        Ok(Node {
            info,
            shutdown,
            tasks,
        })
    }

    pub fn info(&self) -> &NodeInfo {
        &self.info
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.info.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.info.http_addr
    }

    /// Wait until every group of this node knows its leader.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), NodeError> {
        for g in self.info.router.all() {
            g.wait_for_leader(timeout).await?;
        }
        Ok(())
    }

    /// Stop serving, stop the groups, and wait for the background tasks.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for g in self.info.router.all() {
            g.shutdown().await;
        }
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}
