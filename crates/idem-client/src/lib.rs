//! The Idem Rust SDK.
//!
//! ```text
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7101")).await?;
//! let req = ReserveRequest::new("payments", "order-42", Fingerprint::of_request("POST", "/charge", body));
//! match client.reserve(&req).await? {
//!     Reservation::New(lease) => { /* charge, then */ client.complete(&lease, response).await?; }
//!     Reservation::Replay(resp) => { /* return resp as is */ }
//!     Reservation::InFlight { retry_after } => { /* 409: retry later */ }
//!     Reservation::Mismatch { .. } => { /* 422: the client reused a key */ }
//! }
//! ```
//!
//! Every call retries transient failures (UNAVAILABLE, timeouts, connection errors) with
//! exponential backoff and full jitter, waits at least as long as the server's
//! `grpc-retry-pushback-ms` asks, and draws retries from a budget so that a struggling
//! cluster sees a bounded multiple of its normal load, never a retry storm. A retried
//! Reserve carries the same key, fingerprint and first-attempt time as the first one.

mod retry;

pub use idem_core::{Fence, Fingerprint, Header, StoredResponse};
pub use retry::{RetryBudget, RetryPolicy};

use idem_proto::convert::{from_wire_response, to_wire_fence, to_wire_response};
use idem_proto::errors::{pushback_of, reason_of, ErrorReason};
use idem_proto::v1::idem_client::IdemClient;
use idem_proto::v1::{self, reserve_response};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `HOST:PORT` of nodes (or load balancers in front of regions), in order of
    /// preference: the nearest region's nodes first, then the other regions'. Every call
    /// goes to the first one not recently failed; a connection failure or a timeout
    /// moves it (and the next calls) to the next one.
    pub endpoints: Vec<String>,
    /// Bearer token; the server maps it to the tenant.
    pub token: Option<String>,
    /// Deadline of each attempt.
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl ClientConfig {
    /// One endpoint.
    pub fn new(endpoint: impl Into<String>) -> Self {
        ClientConfig::with_endpoints([endpoint.into()])
    }

    /// Several endpoints, in order of preference.
    pub fn with_endpoints(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            token: None,
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
        }
    }
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid argument `{field}`: {message}")]
    InvalidArgument { field: String, message: String },
    /// The lease ended (or the key was taken over) before the call took effect.
    /// For Complete: the completion was not acknowledged in time; the side effect's
    /// outcome must be reconciled by its owner.
    #[error("lease lost: {0}")]
    LeaseLost(String),
    #[error("the first attempt is too old for this key's retention: {0}")]
    KeyTooOld(String),
    #[error("the key is already completed")]
    AlreadyCompleted,
    #[error("not found: {0}")]
    NotFound(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// Transient failures outlasted the retry policy or its budget.
    #[error("unavailable after {attempts} attempts: {last}")]
    Unavailable { attempts: u32, last: String },
    #[error("server error: {0}")]
    Server(Status),
    #[error("cannot connect: {0}")]
    Connect(String),
}

impl Error {
    fn from_status(st: Status) -> Error {
        let msg = st.message().to_string();
        match reason_of(&st) {
            Some(ErrorReason::InvalidArgument) | Some(ErrorReason::InvalidFingerprint) => {
                Error::InvalidArgument {
                    field: idem_proto::errors::field_of(&st).unwrap_or_default(),
                    message: msg,
                }
            }
            Some(ErrorReason::LeaseLost) => Error::LeaseLost(msg),
            Some(ErrorReason::KeyTooOld) => Error::KeyTooOld(msg),
            Some(ErrorReason::AlreadyCompleted) => Error::AlreadyCompleted,
            Some(ErrorReason::NotFound) => Error::NotFound(msg),
            Some(ErrorReason::Unauthenticated) => Error::Unauthenticated(msg),
            _ => Error::Server(st),
        }
    }
}

fn retryable(st: &Status) -> bool {
    matches!(
        st.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::ResourceExhausted
    ) && !matches!(reason_of(st), Some(ErrorReason::InvalidArgument))
}

/// A Reserve, kept identical across every retry.
#[derive(Clone, Debug)]
pub struct ReserveRequest {
    pub scope: String,
    pub key: Vec<u8>,
    pub fingerprint: Fingerprint,
    /// 0 = server default.
    pub lease_ms: u64,
    /// 0 = server default (30 days).
    pub retention_ms: u64,
    /// When the caller first tried this request (Unix ms); set once, kept on retries.
    pub first_attempt_ms: u64,
}

impl ReserveRequest {
    pub fn new(
        scope: impl Into<String>,
        key: impl Into<Vec<u8>>,
        fingerprint: Fingerprint,
    ) -> Self {
        ReserveRequest {
            scope: scope.into(),
            key: key.into(),
            fingerprint,
            lease_ms: 0,
            retention_ms: 0,
            first_attempt_ms: now_ms(),
        }
    }
}

/// The right to run the side effect, while [`Lease::is_trusted`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub scope: String,
    pub key: Vec<u8>,
    pub fence: Fence,
    /// The lease end in the servers' time (informational: this host's wall clock is
    /// never compared with it).
    pub expires_at_ms: u64,
    pub skew_margin_ms: u64,
    /// On this host's monotonic clock: when the Reserve (or the latest Extend) was
    /// sent, plus the lease's length, minus the skew margin. `None` for a lease made
    /// from a fence alone (`Lease::from_fence`): only the servers judge it.
    pub trusted_until: Option<Instant>,
    /// The previous holder's fence when this grant took the key over after its lease
    /// expired: that attempt may have had a side effect.
    pub took_over: Option<Fence>,
}

impl Lease {
    /// A lease for a fence obtained elsewhere (a command line, another process): no
    /// local measure of its lease, so only the servers' answers judge it.
    pub fn from_fence(scope: String, key: Vec<u8>, fence: Fence) -> Lease {
        Lease {
            scope,
            key,
            fence,
            expires_at_ms: u64::MAX,
            skew_margin_ms: 0,
            trusted_until: None,
            took_over: None,
        }
    }

    /// The holder may still act on the lease: measured from the moment the request
    /// that granted (or extended) it was sent, on this host's monotonic clock, so a
    /// server's or this host's wall clock being off changes nothing.
    pub fn is_trusted(&self) -> bool {
        self.trusted_until.is_none_or(|t| Instant::now() < t)
    }

    /// How long the lease may still be trusted (`None`: unknown).
    pub fn trusted_for(&self) -> Option<Duration> {
        self.trusted_until
            .map(|t| t.saturating_duration_since(Instant::now()))
    }
}

/// When a lease of `lease_ms` asked for at `sent` stops being trustworthy.
fn trust_end(sent: Instant, lease_ms: u64, skew_margin_ms: u64) -> Instant {
    sent + Duration::from_millis(lease_ms.saturating_sub(skew_margin_ms))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    New(Lease),
    InFlight { retry_after: Duration },
    Replay(StoredResponse),
    Mismatch { stored_fingerprint: Vec<u8> },
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long an endpoint that failed is passed over (unless every endpoint failed).
pub const FAILED_ENDPOINT_PAUSE: Duration = Duration::from_secs(2);

/// Which endpoint a call goes to: the first in order of preference that has not failed
/// in the last `FAILED_ENDPOINT_PAUSE`, or, when all have, the one whose pause ends
/// first (etcd's clients do the same).
#[derive(Debug)]
struct Endpoints {
    failed_until: std::sync::Mutex<Vec<Option<Instant>>>,
}

impl Endpoints {
    fn new(n: usize) -> Endpoints {
        Endpoints {
            failed_until: std::sync::Mutex::new(vec![None; n]),
        }
    }

    fn pick(&self, now: Instant) -> usize {
        let f = self.failed_until.lock().unwrap_or_else(|p| p.into_inner());
        f.iter()
            .position(|u| u.is_none_or(|u| u <= now))
            .or_else(|| (0..f.len()).min_by_key(|&i| f[i]))
            .unwrap_or(0)
    }

    fn failed(&self, i: usize, now: Instant) {
        let mut f = self.failed_until.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = f.get_mut(i) {
            *u = Some(now + FAILED_ENDPOINT_PAUSE);
        }
    }

    fn answered(&self, i: usize) {
        let mut f = self.failed_until.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = f.get_mut(i) {
            *u = None;
        }
    }
}

/// The node, not the cluster, failed: no connection, no answer in time, or the node said
/// it cannot serve (`NODE_UNAVAILABLE`: its disk failed). (Any other UNAVAILABLE the
/// server gave carries its reason: another node would say the same.)
fn node_failed(st: &Status) -> bool {
    match st.code() {
        Code::DeadlineExceeded => true,
        Code::Unavailable | Code::Unknown | Code::Cancelled => {
            matches!(reason_of(st), None | Some(ErrorReason::NodeUnavailable))
        }
        _ => false,
    }
}

#[derive(Clone)]
pub struct Client {
    /// One channel per endpoint, in the order of `cfg.endpoints`.
    inner: Arc<Vec<IdemClient<Channel>>>,
    endpoints: Arc<Endpoints>,
    cfg: ClientConfig,
    budget: Arc<RetryBudget>,
}

impl Client {
    /// A client for `cfg.endpoints`. Connects lazily: a node that is down now is
    /// retried by the calls themselves.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, Error> {
        if cfg.endpoints.is_empty() {
            return Err(Error::Connect("no endpoint given".into()));
        }
        let mut inner = Vec::with_capacity(cfg.endpoints.len());
        for e in &cfg.endpoints {
            let url = if e.contains("://") {
                e.clone()
            } else {
                format!("http://{e}")
            };
            let channel = Endpoint::from_shared(url)
                .map_err(|err| Error::Connect(format!("{e}: {err}")))?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .connect_lazy();
            inner.push(
                IdemClient::new(channel)
                    .max_decoding_message_size(8 << 20)
                    .max_encoding_message_size(8 << 20),
            );
        }
        let budget = Arc::new(RetryBudget::new(&cfg.retry));
        Ok(Client {
            inner: Arc::new(inner),
            endpoints: Arc::new(Endpoints::new(cfg.endpoints.len())),
            cfg,
            budget,
        })
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(self.cfg.timeout);
        if let Some(t) = &self.cfg.token {
            if let Ok(v) = format!("Bearer {t}").parse() {
                req.metadata_mut().insert("authorization", v);
            }
        }
        req
    }

    /// Run `call` with the retry policy: backoff with full jitter, server pushback,
    /// bounded attempts and the shared retry budget.
    async fn with_retries<T, F, Fut>(&self, mut call: F) -> Result<T, Error>
    where
        F: FnMut(IdemClient<Channel>, u32) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.budget.deposit();
        let policy = &self.cfg.retry;
        let mut attempt = 1;
        loop {
            let at = self.endpoints.pick(Instant::now());
            match call(self.inner[at].clone(), attempt).await {
                Ok(v) => {
                    self.endpoints.answered(at);
                    return Ok(v);
                }
                Err(st) if retryable(&st) => {
                    if attempt >= policy.max_attempts || !self.budget.withdraw() {
                        return Err(Error::Unavailable {
                            attempts: attempt,
                            last: format!("{}: {}", st.code(), st.message()),
                        });
                    }
                    let failover = node_failed(&st) && {
                        self.endpoints.failed(at, Instant::now());
                        self.endpoints.pick(Instant::now()) != at
                    };
                    // Another node is tried at once; the same one after the backoff.
                    let delay = if failover {
                        Duration::ZERO
                    } else {
                        policy.delay(attempt, pushback_of(&st))
                    };
                    tracing::debug!(attempt, ?delay, code = ?st.code(), "retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(st) => return Err(Error::from_status(st)),
            }
        }
    }

    /// Reserve a key. Transient failures are retried with the same key and fingerprint.
    ///
    /// A NEW is measured from the moment the first attempt was sent (the earliest the
    /// grant can have been made) on this host's monotonic clock; a NEW that arrives
    /// when less than the skew margin of its lease is left is not returned as NEW (it
    /// cannot be acted on safely): the call answers `Unavailable`, to be retried once
    /// the lease has ended.
    pub async fn reserve(&self, r: &ReserveRequest) -> Result<Reservation, Error> {
        let sent = Instant::now();
        let resp = self
            .with_retries(|mut c, attempt| {
                let req = self.request(v1::ReserveRequest {
                    scope: r.scope.clone(),
                    key: r.key.clone(),
                    fingerprint: r.fingerprint.0.to_vec(),
                    lease_ms: r.lease_ms,
                    retention_ms: r.retention_ms,
                    first_attempt_ms: r.first_attempt_ms,
                    attempt,
                });
                async move { c.reserve(req).await.map(|x| x.into_inner()) }
            })
            .await?;
        match resp.outcome {
            Some(reserve_response::Outcome::New(n)) => {
                let fence = idem_proto::convert::fence(n.fence.as_ref())
                    .map_err(|e| Error::Server(Status::internal(e.to_string())))?;
                let took_over = match n.previous.as_ref() {
                    Some(p) if n.takeover => idem_proto::convert::fence(Some(p)).ok(),
                    _ => None,
                };
                // Servers of the previous release do not send the lease's length.
                let lease_ms = if n.lease_ms > 0 {
                    n.lease_ms
                } else {
                    r.lease_ms
                };
                let trusted_until = trust_end(sent, lease_ms, n.skew_margin_ms);
                if Instant::now() >= trusted_until {
                    return Err(Error::Unavailable {
                        attempts: 1,
                        last: format!(
                            "the grant arrived with less than the skew margin ({} ms) of its {lease_ms} ms lease left; retry once the lease has ended",
                            n.skew_margin_ms
                        ),
                    });
                }
                Ok(Reservation::New(Lease {
                    scope: r.scope.clone(),
                    key: r.key.clone(),
                    fence,
                    expires_at_ms: n.lease_expires_ms,
                    skew_margin_ms: n.skew_margin_ms,
                    trusted_until: Some(trusted_until),
                    took_over,
                }))
            }
            Some(reserve_response::Outcome::InFlight(f)) => Ok(Reservation::InFlight {
                retry_after: Duration::from_millis(f.retry_after_ms),
            }),
            Some(reserve_response::Outcome::Replay(p)) => Ok(Reservation::Replay(
                p.response
                    .as_ref()
                    .map(from_wire_response)
                    .unwrap_or_default(),
            )),
            Some(reserve_response::Outcome::Mismatch(m)) => Ok(Reservation::Mismatch {
                stored_fingerprint: m.stored_fingerprint,
            }),
            None => Err(Error::Server(Status::internal(
                "Reserve answered no outcome",
            ))),
        }
    }

    /// Reserve, and while another attempt holds the key, wait (as long as the server's
    /// retry-after says, within `max_wait` in total) for it to finish.
    pub async fn reserve_wait(
        &self,
        r: &ReserveRequest,
        max_wait: Duration,
    ) -> Result<Reservation, Error> {
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            match self.reserve(r).await? {
                Reservation::InFlight { retry_after } => {
                    let now = tokio::time::Instant::now();
                    if now + retry_after.min(Duration::from_millis(200)) > deadline {
                        return Ok(Reservation::InFlight { retry_after });
                    }
                    // Poll at least every 200 ms: the holder may complete early.
                    tokio::time::sleep(
                        retry_after.clamp(Duration::from_millis(20), Duration::from_millis(200)),
                    )
                    .await;
                }
                other => return Ok(other),
            }
        }
    }

    /// Store the response of the side effect. Acknowledged only while the lease holds:
    /// an acknowledgement that arrives after `lease.trust_until_ms()` is reported as
    /// `LeaseLost` (outcome unknown), never as success.
    pub async fn complete(&self, lease: &Lease, response: &StoredResponse) -> Result<(), Error> {
        self.with_retries(|mut c, _| {
            let req = self.request(v1::CompleteRequest {
                scope: lease.scope.clone(),
                key: lease.key.clone(),
                fence: Some(to_wire_fence(&lease.fence)),
                response: Some(to_wire_response(response)),
            });
            async move { c.complete(req).await.map(|_| ()) }
        })
        .await?;
        if !lease.is_trusted() {
            return Err(Error::LeaseLost(
                "the acknowledgement arrived after the lease could be trusted; outcome unknown"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Give the key back after a failure that had no side effect.
    pub async fn release(&self, lease: &Lease) -> Result<(), Error> {
        self.with_retries(|mut c, _| {
            let req = self.request(v1::ReleaseRequest {
                scope: lease.scope.clone(),
                key: lease.key.clone(),
                fence: Some(to_wire_fence(&lease.fence)),
            });
            async move { c.release(req).await.map(|_| ()) }
        })
        .await
    }

    /// Extend the lease by `lease_ms` from now (0 = server default); updates `lease`.
    pub async fn extend(&self, lease: &mut Lease, lease_ms: u64) -> Result<(), Error> {
        let sent = Instant::now();
        let (expires, granted_ms) = self
            .with_retries(|mut c, _| {
                let req = self.request(v1::ExtendRequest {
                    scope: lease.scope.clone(),
                    key: lease.key.clone(),
                    fence: Some(to_wire_fence(&lease.fence)),
                    lease_ms,
                });
                async move {
                    c.extend(req)
                        .await
                        .map(|x| x.into_inner())
                        .map(|x| (x.lease_expires_ms, x.lease_ms))
                }
            })
            .await?;
        lease.expires_at_ms = expires;
        // Servers of the previous release do not send the length.
        let granted_ms = if granted_ms > 0 { granted_ms } else { lease_ms };
        if lease.trusted_until.is_some() && granted_ms > 0 {
            let end = trust_end(sent, granted_ms, lease.skew_margin_ms);
            lease.trusted_until = lease.trusted_until.max(Some(end));
        }
        Ok(())
    }

    /// Read a key's record (linearizable).
    pub async fn get(&self, scope: &str, key: &[u8]) -> Result<v1::GetResponse, Error> {
        self.with_retries(|mut c, _| {
            let req = self.request(v1::GetRequest {
                scope: scope.to_string(),
                key: key.to_vec(),
            });
            async move { c.get(req).await.map(|x| x.into_inner()) }
        })
        .await
    }

    /// Run `work` while keeping the lease alive: the lease is extended every third of
    /// its length. The work always runs to its end (a side effect is never cut off
    /// half-way); its output comes back with `Ok(())` if the lease held throughout, or
    /// with `LeaseLost` if an extension failed or the lease could no longer be trusted
    /// when the work ended (the side effect may then have happened without the key
    /// being held: the caller must not Complete, and should treat the outcome as
    /// unknown).
    pub async fn with_lease<T, Fut>(
        &self,
        lease: &mut Lease,
        lease_ms: u64,
        work: Fut,
    ) -> (T, Result<(), Error>)
    where
        Fut: Future<Output = T>,
    {
        let period = Duration::from_millis((lease_ms.max(300) / 3).max(100));
        tokio::pin!(work);
        let mut lost: Option<Error> = None;
        loop {
            tokio::select! {
                out = &mut work => {
                    if let Some(e) = lost {
                        return (out, Err(e));
                    }
                    if !lease.is_trusted() {
                        return (out, Err(Error::LeaseLost("the lease ran out while the work ran".into())));
                    }
                    return (out, Ok(()));
                }
                _ = tokio::time::sleep(period), if lost.is_none() => {
                    if let Err(e) = self.extend(lease, lease_ms).await {
                        lost = Some(Error::LeaseLost(format!("extending the lease failed while the work ran: {e}")));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_go_to_the_first_endpoint_that_has_not_failed_and_come_back_when_it_answers() {
        let e = Endpoints::new(3);
        let t = Instant::now();
        assert_eq!(e.pick(t), 0);
        e.failed(0, t);
        assert_eq!(e.pick(t), 1, "the next in order of preference");
        e.failed(1, t + Duration::from_millis(10));
        assert_eq!(e.pick(t), 2);
        e.failed(2, t + Duration::from_millis(20));
        assert_eq!(e.pick(t), 0, "all failed: the one whose pause ends first");
        assert_eq!(e.pick(t + FAILED_ENDPOINT_PAUSE), 0, "its pause is over");
        e.answered(1);
        assert_eq!(e.pick(t), 1, "an endpoint that answered is preferred again");
    }

    #[test]
    fn only_a_failure_of_the_node_moves_a_call_to_another() {
        assert!(node_failed(&Status::unavailable("error trying to connect")));
        assert!(node_failed(&Status::deadline_exceeded("timeout")));
        let from_server = idem_proto::errors::status(
            ErrorReason::Unavailable,
            "no majority of regions answered",
            &[],
            None,
        );
        assert_eq!(from_server.code(), Code::Unavailable);
        assert!(
            !node_failed(&from_server),
            "another node would say the same"
        );
        assert!(!node_failed(&Status::invalid_argument("key")));
        let stopped = idem_proto::errors::status(
            ErrorReason::NodeUnavailable,
            "this node's disk failed",
            &[],
            None,
        );
        assert!(node_failed(&stopped), "another node can serve");
    }
}
