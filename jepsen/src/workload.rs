//! The workload: clients that each Reserve a key, then Complete it, Release it, or do
//! nothing (a client crash), with the SDK's retry policy, on a bounded key space that
//! moves slowly so keys collide and are retried across regions. Each client prefers its
//! region ("anycast") and flips to another on a schedule or when its region fails to
//! answer, so retries really land elsewhere. Every call and its result (or timeout) is
//! one history entry.

use crate::history::{Call, Event, Op, Outcome};
use idem_client::StoredResponse;
use idem_client::{
    Client, ClientConfig, Error, Fingerprint, Reservation, ReserveRequest, RetryPolicy,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const LEASE_MS: u64 = 2_000;

#[derive(Clone)]
pub struct WorkloadConfig {
    pub clients: usize,
    /// Keys live at once; the window moves on every `window_every`.
    pub keys: usize,
    pub window_every: Duration,
    /// One endpoint per node, grouped by region.
    pub endpoints: Vec<Vec<String>>,
    pub seed: u64,
    /// Chance that a call goes to another region than the client's own.
    pub flip: f64,
}

/// The history as it happens: an invocation event when a call is sent, a completion
/// event when it returns.
pub struct Recorder {
    pub events: Mutex<Vec<Event>>,
    next: AtomicU64,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            events: Mutex::new(Vec::new()),
            next: AtomicU64::new(1),
        })
    }

    fn log(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    /// Record the invocation of `op` (its outcome is ignored); returns its id.
    pub fn invoke(&self, op: &mut Op) -> u64 {
        op.id = self.next.fetch_add(1, Ordering::SeqCst);
        op.outcome = Outcome::Indeterminate;
        self.log(Event::Invoke(op.clone()));
        op.id
    }

    /// Record the completion of an invoked op.
    pub fn complete(&self, op: Op) {
        self.log(Event::Complete(op));
    }

    /// An op invoked and completed at once (digests, final reads).
    pub fn push(&self, mut op: Op) {
        let outcome = op.outcome.clone();
        self.invoke(&mut op);
        op.outcome = outcome;
        self.complete(op);
    }

    pub fn ops(&self) -> Vec<Op> {
        let events = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        crate::history::join(events)
    }
}

fn now_ms() -> u64 {
    crate::history::now_ms()
}

/// How a failed call is recorded: whether it may have taken effect.
pub fn classify(e: &Error) -> Outcome {
    match e {
        Error::LeaseLost(_) => Outcome::LeaseLost,
        Error::Unavailable { .. } | Error::Connect(_) => Outcome::Unavailable,
        Error::Server(st) => match st.code() {
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => Outcome::Timeout,
            _ => Outcome::Unavailable,
        },
        // A retried Complete whose first attempt was stored answers ALREADY_COMPLETED.
        Error::AlreadyCompleted => Outcome::Timeout,
        Error::InvalidArgument { .. }
        | Error::KeyTooOld(_)
        | Error::NotFound(_)
        | Error::Unauthenticated(_) => Outcome::Error,
    }
}

fn fp_of(key: &str, variant: u8) -> Fingerprint {
    Fingerprint::of_request("POST", "/charge", format!("{key}:{variant}").as_bytes())
}

/// Run one client until `stop`.
pub async fn client(
    id: usize,
    cfg: WorkloadConfig,
    rec: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    epoch_ms: u64,
) {
    let mut rng =
        StdRng::seed_from_u64(cfg.seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let regions = cfg.endpoints.len();
    let home = id % regions;
    let mut clients = Vec::new();
    for (r, eps) in cfg.endpoints.iter().enumerate() {
        let ep = eps[id % eps.len()].clone();
        let mut cc = ClientConfig::new(ep);
        cc.timeout = Duration::from_secs(3);
        cc.retry = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        match Client::connect(cc).await {
            Ok(c) => clients.push((r, c)),
            Err(e) => {
                eprintln!("client {id}: cannot connect to region {r}: {e}");
                return;
            }
        }
    }
    let mut region = home;
    // Redeliveries: a request whose Complete was acknowledged arrives again a few
    // seconds later through another region (a duplicate delivery, a retry after a lost
    // answer): it must replay, whatever happened to the network in between.
    let mut redeliver: std::collections::VecDeque<(u64, String, usize)> = Default::default();
    while !stop.load(Ordering::Relaxed) {
        if rng.random_bool(cfg.flip) {
            region = rng.random_range(0..regions);
        }
        let due = redeliver.front().is_some_and(|(at, _, _)| *at <= now_ms());
        let again = if due { redeliver.pop_front() } else { None };
        let window = (now_ms().saturating_sub(epoch_ms)
            / cfg.window_every.as_millis().max(1) as u64) as usize;
        // Mostly the keys of the moment; one call in four retries a key of the last ten
        // windows (a late retry, after leases have ended and faults have come and gone).
        let w = if window > 0 && rng.random_bool(0.25) {
            window - rng.random_range(1..=window.min(10))
        } else {
            window
        };
        let mut key = format!("k{}", w * cfg.keys / 2 + rng.random_range(0..cfg.keys));
        // One request in fifty reuses the key with another body (a client bug).
        let mut variant = u8::from(rng.random_bool(0.02));
        if let Some((_, k, from)) = again {
            key = k;
            variant = 0;
            if regions > 1 {
                region = (from + 1 + rng.random_range(0..regions - 1)) % regions;
            }
        }
        let fp = fp_of(&key, variant);
        let c = &clients[region].1;
        let mut req = ReserveRequest::new("jepsen", key.clone().into_bytes(), fp);
        req.lease_ms = LEASE_MS;
        let mut op = Op {
            id: 0,
            client: id as u32,
            region: region as u32,
            call: Call::Reserve,
            key: key.clone(),
            fingerprint: hex::encode(fp.0),
            start_ms: now_ms(),
            end_ms: 0,
            outcome: Outcome::Indeterminate,
            fence: String::new(),
            lease_expires_ms: 0,
            trusted_until_ms: 0,
            took_over: false,
            value: String::new(),
            phase: String::new(),
        };
        rec.invoke(&mut op);
        let res = c.reserve(&req).await;
        op.end_ms = now_ms();
        let lease = match &res {
            Ok(Reservation::New(l)) => {
                op.outcome = Outcome::New;
                op.fence = l.fence.to_string();
                op.lease_expires_ms = l.expires_at_ms;
                op.trusted_until_ms = op.end_ms
                    + l.trusted_for()
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or_default();
                op.took_over = l.took_over.is_some();
                Some(l.clone())
            }
            Ok(Reservation::InFlight { .. }) => {
                op.outcome = Outcome::InFlight;
                None
            }
            Ok(Reservation::Replay(r)) => {
                op.outcome = Outcome::Replay;
                op.value = hex::encode(&r.body);
                None
            }
            Ok(Reservation::Mismatch { .. }) => {
                op.outcome = Outcome::Mismatch;
                None
            }
            Err(e) => {
                // A Reserve that failed may still have been granted by a majority after
                // the client gave up: a possible grant (unknown fence, never acted on).
                op.outcome = classify(e);
                // Its region did not answer: the next call goes elsewhere.
                region = (region + 1 + rng.random_range(0..regions.max(2) - 1)) % regions;
                None
            }
        };
        rec.complete(op);
        let Some(lease) = lease else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(5..50))).await;
            continue;
        };
        // The side effect.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..600))).await;
        let choice: f64 = rng.random();
        let fence = lease.fence.to_string();
        let base = Op {
            id: 0,
            client: id as u32,
            region: region as u32,
            call: Call::Complete,
            key: key.clone(),
            fingerprint: hex::encode(fp.0),
            start_ms: 0,
            end_ms: 0,
            outcome: Outcome::Error,
            fence,
            lease_expires_ms: lease.expires_at_ms,
            trusted_until_ms: 0,
            took_over: false,
            value: String::new(),
            phase: String::new(),
        };
        if choice < 0.6 {
            let body = format!("c{id}-{}-{}", key, now_ms()).into_bytes();
            let resp = StoredResponse {
                status: 200,
                headers: vec![],
                body: body.clone(),
            };
            let mut op = base;
            op.start_ms = now_ms();
            op.value = hex::encode(&body);
            rec.invoke(&mut op);
            let r = c.complete(&lease, &resp).await;
            op.end_ms = now_ms();
            op.outcome = match r {
                Ok(()) => Outcome::Ok,
                Err(e) => classify(&e),
            };
            if op.outcome == Outcome::Ok && variant == 0 && redeliver.len() < 64 {
                let at = now_ms() + rng.random_range(2_500..6_000);
                redeliver.push_back((at, key.clone(), region));
            }
            rec.complete(op);
        } else if choice < 0.8 {
            let mut op = base;
            op.call = Call::Release;
            op.start_ms = now_ms();
            rec.invoke(&mut op);
            let r = c.release(&lease).await;
            op.end_ms = now_ms();
            op.outcome = match r {
                Ok(()) => Outcome::Ok,
                Err(e) => classify(&e),
            };
            rec.complete(op);
        }
        // Else: the client "crashed" holding the lease; it expires.
    }
}
