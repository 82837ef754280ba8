//! The public `idem.v1.Idem` service: validate at the edge, route the key to its group,
//! run the command there, answer, and count what happened.

use crate::auth::Auth;
use crate::metrics::{attempt_label, status_class, Metrics};
use idem_core::acceptor::{CompleteError, ExtendError, ReleaseError, ReserveOutcome};
use idem_core::shard::shard_of;
use idem_core::{CommandResult, Key, Limits, Op};
use idem_proto::convert;
use idem_proto::errors::{invalid, status, ErrorReason, RETRY_PUSHBACK_HEADER};
use idem_proto::v1::idem_server::Idem;
use idem_proto::v1::{self, reserve_response};
use idem_raft::{Group, GroupError, GroupId, Router};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// Pushback range (ms) when no leader can take the request right now.
const UNAVAILABLE_PUSHBACK_MS: (u64, u64) = (100, 400);

#[derive(Clone)]
pub struct IdemService {
    pub region: u16,
    pub shards: u32,
    pub router: Router,
    pub limits: Limits,
    pub auth: Auth,
    pub metrics: Arc<Metrics>,
    pub skew_margin_ms: u64,
    pub geo: idem_geo::Geo,
    /// This node's clocks: a first attempt claimed to lie in the future is refused.
    pub stamper: Arc<idem_raft::Stamper>,
    /// This node's disk: once it failed, the node answers nothing but
    /// `NODE_UNAVAILABLE` (another node serves the call).
    pub disk: idem_storage::DiskHealth,
    /// While a node with a new data directory joins, it serves nothing.
    pub joining: crate::join::JoinStatus,
}

pub fn geo_error(e: idem_geo::GeoError) -> Status {
    match e {
        idem_geo::GeoError::Unavailable(m) => {
            status(ErrorReason::Unavailable, m, &[], Some(jittered_pushback()))
        }
        idem_geo::GeoError::Internal(m) => status(ErrorReason::Internal, m, &[], None),
    }
}

fn jittered_pushback() -> Duration {
    let (lo, hi) = UNAVAILABLE_PUSHBACK_MS;
    Duration::from_millis(lo + rand::random::<u64>() % (hi - lo))
}

pub fn group_error(e: GroupError) -> Status {
    match e {
        GroupError::Fatal(m) => status(ErrorReason::Internal, m, &[], None),
        GroupError::Timeout(d) => status(
            ErrorReason::Unavailable,
            format!("the group did not answer within {d:?}; the outcome is unknown, retry with the same key"),
            &[],
            Some(jittered_pushback()),
        ),
        other => status(
            ErrorReason::Unavailable,
            other.to_string(),
            &[],
            Some(jittered_pushback()),
        ),
    }
}

fn not_found() -> Status {
    status(
        ErrorReason::NotFound,
        "no record for this key (never reserved, or expired)",
        &[],
        None,
    )
}

fn unexpected(method: &str) -> Status {
    status(
        ErrorReason::Internal,
        format!("unexpected result for {method}"),
        &[],
        None,
    )
}

fn fence_meta(f: Option<idem_core::Fence>) -> Vec<(&'static str, String)> {
    f.map(|f| vec![("current_fence", f.to_string())])
        .unwrap_or_default()
}

impl IdemService {
    /// Refuse every call once this node's disk failed.
    fn gate(&self) -> Result<(), Status> {
        if let Some(why) = self.joining.get() {
            return Err(status(
                ErrorReason::NodeUnavailable,
                format!("this node is not serving yet ({why}); another node serves the call"),
                &[],
                None,
            ));
        }
        match self.disk.failure() {
            None => Ok(()),
            Some(why) => Err(status(
                ErrorReason::NodeUnavailable,
                format!("this node stopped serving: its disk failed ({why}); another node serves the call"),
                &[],
                None,
            )),
        }
    }

    fn group_for(&self, key: &Key) -> Result<Arc<Group>, Status> {
        let id = GroupId {
            region: self.region,
            shard: shard_of(key, self.shards),
        };
        self.router.get(id).ok_or_else(|| {
            status(
                ErrorReason::Unavailable,
                format!("group {id} is not running on this node"),
                &[],
                Some(jittered_pushback()),
            )
        })
    }

    fn key(&self, tenant: String, scope: String, key: Vec<u8>) -> Key {
        Key { tenant, scope, key }
    }

    /// GLOBAL mode with more than one region: the call goes to every region.
    fn global(&self, key: &Key) -> bool {
        self.geo.mode_of(key) == idem_geo::Mode::Global
    }

    /// Resolve the tenant, route the key to its group (GLOBAL mode: every region's) and
    /// run `op` there.
    async fn run(
        &self,
        md: &tonic::metadata::MetadataMap,
        scope: String,
        key: Vec<u8>,
        op: Op,
    ) -> Result<CommandResult, Status> {
        let key = self.key(self.auth.tenant(md)?, scope, key);
        if self.global(&key) {
            let geo = &self.geo;
            return match op {
                Op::Complete {
                    fence, response, ..
                } => geo
                    .complete(key, fence, response)
                    .await
                    .map(CommandResult::Complete),
                Op::Release { fence } => geo.release(key, fence).await.map(CommandResult::Release),
                Op::Extend {
                    fence, lease_ms, ..
                } => geo
                    .extend(key, fence, lease_ms)
                    .await
                    .map(CommandResult::Extend),
                _ => Err(idem_geo::GeoError::Internal("not a holder call".into())),
            }
            .map_err(geo_error);
        }
        let group = self.group_for(&key)?;
        group.submit(key, op).await.map_err(group_error)
    }

    fn lease_lost(&self, message: &str, current: Option<idem_core::Fence>) -> Status {
        self.metrics.lease_lost_total.inc();
        status(ErrorReason::LeaseLost, message, &fence_meta(current), None)
    }

    /// Count one finished call.
    fn observe<T>(
        &self,
        method: &str,
        started: Instant,
        outcome: &str,
        r: &Result<Response<T>, Status>,
        class: Option<&'static str>,
    ) {
        let class = class.unwrap_or_else(|| match r {
            Ok(_) => "2xx",
            Err(st) => status_class(st.code()),
        });
        self.metrics.http_request_outcome.with(&[class]).inc();
        let outcome = match r {
            Ok(_) => outcome,
            Err(st) => idem_proto::errors::reason_of(st).map_or("error", |r| r.as_str()),
        };
        self.metrics
            .request_duration_seconds
            .with(&[method, outcome])
            .observe(started.elapsed().as_secs_f64());
    }

    async fn reserve_inner(
        &self,
        req: Request<v1::ReserveRequest>,
    ) -> Result<(Response<v1::ReserveResponse>, &'static str), Status> {
        self.gate()?;
        let tenant = self.auth.tenant(req.metadata())?;
        let r = convert::reserve(req.get_ref(), &self.limits).map_err(|e| invalid(&e))?;
        // A first attempt later than now (beyond what clocks may differ by) is a client
        // bug, or an attempt to make a key look fresh forever.
        let latest = self
            .stamper
            .now_ms()
            .saturating_add(self.stamper.clock_bound_ms());
        if r.first_attempt_ms > latest {
            return Err(invalid(&idem_core::ValidationError::new(
                "first_attempt_ms",
                format!(
                    "{} ms lies in the future (this server's time is about {} ms)",
                    r.first_attempt_ms,
                    self.stamper.now_ms()
                ),
            )));
        }
        // The client's own attempt number: the request field, or `idem-attempt` metadata
        // (for middleware that cannot change the message).
        let client_attempt = match r.client_attempt {
            0 => req
                .metadata()
                .get("idem-attempt")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0),
            n => n,
        };
        if client_attempt > 0 {
            self.metrics
                .client_retry_attempt_total
                .with(&[attempt_label(client_attempt)])
                .inc();
        }
        let granted_lease_ms = r.lease_ms;
        let key = self.key(tenant, r.scope, r.key);
        let req = idem_geo::ReserveRequest {
            fingerprint: r.fingerprint,
            lease_ms: r.lease_ms,
            retention_ms: r.retention_ms,
            first_attempt_ms: r.first_attempt_ms,
        };
        let (outcome, attempt, since_previous_ms) = if self.global(&key) {
            let a = self.geo.reserve(key, req).await.map_err(geo_error)?;
            (a.outcome, a.attempt.max(1), a.since_previous_ms)
        } else if let Some(a) = self.geo.answer_locally(&key, &req) {
            (a.outcome, a.attempt, a.since_previous_ms)
        } else {
            let group = self.group_for(&key)?;
            let op = Op::Reserve {
                fingerprint: r.fingerprint,
                lease_ms: r.lease_ms,
                retention_ms: r.retention_ms,
                first_attempt_ms: r.first_attempt_ms,
            };
            let result = group.submit(key, op).await.map_err(group_error)?;
            let CommandResult::Reserve {
                outcome,
                attempt,
                since_previous_ms,
            } = result
            else {
                return Err(status(
                    ErrorReason::Internal,
                    "unexpected result for Reserve",
                    &[],
                    None,
                ));
            };
            (outcome, attempt, since_previous_ms)
        };
        let label = outcome.label();
        if !matches!(
            outcome,
            ReserveOutcome::TooOld { .. } | ReserveOutcome::StaleGen { .. }
        ) {
            self.metrics.idempotency_key_total.with(&[label]).inc();
        }
        // A mismatch is another request, not an attempt at the stored one: the record
        // is not touched and no attempt is counted.
        if matches!(
            outcome,
            ReserveOutcome::New { .. }
                | ReserveOutcome::InFlight { .. }
                | ReserveOutcome::Replay { .. }
        ) {
            self.metrics
                .retry_attempt_total
                .with(&[attempt_label(attempt)])
                .inc();
            if let Some(ms) = since_previous_ms {
                self.metrics.retry_delay_seconds.observe(ms as f64 / 1000.0);
            }
        }
        let mut pushback = None;
        let out = match outcome {
            ReserveOutcome::New {
                fence,
                lease_expires_ms,
                takeover,
            } => {
                if takeover.is_some() {
                    self.metrics.lease_takeover_total.inc();
                }
                reserve_response::Outcome::New(reserve_response::New {
                    fence: Some(convert::to_wire_fence(&fence)),
                    lease_expires_ms,
                    takeover: takeover.is_some(),
                    previous: takeover.as_ref().map(convert::to_wire_fence),
                    skew_margin_ms: self.skew_margin_ms,
                    lease_ms: granted_lease_ms,
                })
            }
            ReserveOutcome::InFlight { retry_after_ms, .. } => {
                pushback = Some(retry_after_ms);
                reserve_response::Outcome::InFlight(reserve_response::InFlight { retry_after_ms })
            }
            ReserveOutcome::Replay { response, .. } => {
                reserve_response::Outcome::Replay(reserve_response::Replay {
                    response: Some(convert::to_wire_response(&response)),
                    fence: None,
                })
            }
            ReserveOutcome::Mismatch { stored } => {
                reserve_response::Outcome::Mismatch(reserve_response::Mismatch {
                    stored_fingerprint: stored.0.to_vec(),
                })
            }
            ReserveOutcome::TooOld {
                first_attempt_ms,
                limit_ms,
            } => {
                self.metrics.key_too_old_total.inc();
                return Err(status(
                    ErrorReason::KeyTooOld,
                    format!("the first attempt ({first_attempt_ms} ms) is older than this key's retention can guarantee ({limit_ms} ms); it cannot be granted again"),
                    &[("first_attempt_ms", first_attempt_ms.to_string())],
                    None,
                ));
            }
            ReserveOutcome::StaleGen { stored } => {
                return Err(status(
                    ErrorReason::Internal,
                    format!("stale generation (stored {stored})"),
                    &[],
                    None,
                ));
            }
        };
        let mut resp = Response::new(v1::ReserveResponse {
            outcome: Some(out),
            server_attempt: attempt,
        });
        if let Some(ms) = pushback {
            if let Ok(v) = ms.to_string().parse() {
                resp.metadata_mut().insert(RETRY_PUSHBACK_HEADER, v);
            }
        }
        Ok((resp, label))
    }
}

#[tonic::async_trait]
impl Idem for IdemService {
    async fn reserve(
        &self,
        req: Request<v1::ReserveRequest>,
    ) -> Result<Response<v1::ReserveResponse>, Status> {
        let started = Instant::now();
        let (r, label, class) = match self.reserve_inner(req).await {
            Ok((resp, label)) => {
                // As an HTTP gateway maps them: IN_FLIGHT is 409, MISMATCH is 422.
                let class = if matches!(label, "in_flight" | "mismatch") {
                    "4xx"
                } else {
                    "2xx"
                };
                (Ok(resp), label, Some(class))
            }
            Err(st) => (Err(st), "error", None),
        };
        self.observe("reserve", started, label, &r, class);
        r
    }

    async fn complete(
        &self,
        req: Request<v1::CompleteRequest>,
    ) -> Result<Response<v1::CompleteResponse>, Status> {
        let started = Instant::now();
        let r = async {
            self.gate()?;
            let c = convert::complete(req.get_ref(), &self.limits).map_err(|e| invalid(&e))?;
            let op = Op::Complete { fence: c.fence, response: c.response, quorum: 1 };
            match self.run(req.metadata(), c.scope, c.key, op).await? {
                CommandResult::Complete(Ok(())) => Ok(Response::new(v1::CompleteResponse {})),
                CommandResult::Complete(Err(CompleteError::LeaseLost { current })) => Err(self.lease_lost(
                    "the lease is over or the key was granted to another attempt: this completion was not acknowledged, and whether it was stored is unknown (a region may have stored it before the lease ended, and it may still become the key's answer); do not retry it with this fence: reconcile the side effect, then read the key (Get) or Reserve again, which replays it if it was kept",
                    current,
                )),
                CommandResult::Complete(Err(CompleteError::NotFound)) => Err(not_found()),
                _ => Err(unexpected("Complete")),
            }
        }
        .await;
        self.observe("complete", started, "ok", &r, None);
        r
    }

    async fn release(
        &self,
        req: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseResponse>, Status> {
        let started = Instant::now();
        let r = async {
            self.gate()?;
            let c = convert::release(req.get_ref(), &self.limits).map_err(|e| invalid(&e))?;
            let op = Op::Release { fence: c.fence };
            match self.run(req.metadata(), c.scope, c.key, op).await? {
                CommandResult::Release(Ok(())) => Ok(Response::new(v1::ReleaseResponse {})),
                CommandResult::Release(Err(ReleaseError::LeaseLost { current })) => {
                    Err(self.lease_lost("the key was granted to another attempt", current))
                }
                CommandResult::Release(Err(ReleaseError::AlreadyCompleted)) => Err(status(
                    ErrorReason::AlreadyCompleted,
                    "the key is completed; a completed key cannot be released",
                    &[],
                    None,
                )),
                CommandResult::Release(Err(ReleaseError::NotFound)) => Err(not_found()),
                _ => Err(unexpected("Release")),
            }
        }
        .await;
        self.observe("release", started, "ok", &r, None);
        r
    }

    async fn extend(
        &self,
        req: Request<v1::ExtendRequest>,
    ) -> Result<Response<v1::ExtendResponse>, Status> {
        let started = Instant::now();
        let r = async {
            self.gate()?;
            let c = convert::extend(req.get_ref(), &self.limits).map_err(|e| invalid(&e))?;
            let lease_ms = c.lease_ms;
            let op = Op::Extend {
                fence: c.fence,
                lease_ms: c.lease_ms,
                until_ms: None,
            };
            match self.run(req.metadata(), c.scope, c.key, op).await? {
                CommandResult::Extend(Ok(lease_expires_ms)) => {
                    Ok(Response::new(v1::ExtendResponse {
                        lease_expires_ms,
                        lease_ms,
                    }))
                }
                CommandResult::Extend(Err(ExtendError::LeaseLost { current })) => Err(self
                    .lease_lost(
                        "the lease is over or the key was granted to another attempt",
                        current,
                    )),
                CommandResult::Extend(Err(ExtendError::NotFound)) => Err(not_found()),
                _ => Err(unexpected("Extend")),
            }
        }
        .await;
        self.observe("extend", started, "ok", &r, None);
        r
    }

    async fn get(&self, req: Request<v1::GetRequest>) -> Result<Response<v1::GetResponse>, Status> {
        let started = Instant::now();
        let r = async {
            self.gate()?;
            let tenant = self.auth.tenant(req.metadata())?;
            let g = convert::get(req.get_ref(), &self.limits).map_err(|e| invalid(&e))?;
            let key = self.key(tenant, g.scope, g.key);
            let group = self.group_for(&key)?;
            match group.read(key).await.map_err(group_error)? {
                Some(rec) => Ok(Response::new(convert::to_wire_record(&rec))),
                None => Err(status(
                    ErrorReason::NotFound,
                    "no record for this key",
                    &[],
                    None,
                )),
            }
        }
        .await;
        self.observe("get", started, "ok", &r, None);
        r
    }
}
