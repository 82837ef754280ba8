//! The workload: clients that each Reserve a key, then (sometimes after an Extend)
//! Complete it, Release it, or do nothing (a client crash), with the SDK's retry policy
//! and failover, on a bounded key space that moves slowly so keys collide and are
//! retried across regions. Two tenants share the key names (a tenant never sees the
//! other's records); a share of the keys lives in a REGIONAL namespace; a few calls are
//! linearizable reads (Get). Each client prefers its region ("anycast"): its SDK client
//! lists that region's nodes first and then the others', so a dead node or region moves
//! its calls on; it also flips to another region on a schedule, so retries really land
//! elsewhere. Every call and its result (or timeout) is one history entry, keyed
//! `tenant/scope/key`.

use crate::history::{Call, Event, Op, Outcome};
use idem_client::StoredResponse;
use idem_client::{
    Client, ClientConfig, Error, Fingerprint, Lease, Reservation, ReserveRequest, RetryPolicy,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const LEASE_MS: u64 = 2_000;
/// The GLOBAL namespace (NEW by a majority of regions).
pub const GLOBAL_SCOPE: &str = "jepsen";
/// The REGIONAL namespace (NEW after the local group commits; double grants during
/// partitions are the documented anomaly, counted by the servers).
pub const REGIONAL_SCOPE: &str = "regional";
/// Most redeliveries a client keeps waiting.
const MAX_REDELIVERIES: usize = 64;

/// A tenant and the bearer token its clients present.
#[derive(Clone, Debug)]
pub struct Tenant {
    pub name: String,
    pub token: String,
}

/// The tenants of a run: two, sharing key names.
pub fn tenants() -> Vec<Tenant> {
    ["acme", "globex"]
        .iter()
        .map(|t| Tenant {
            name: t.to_string(),
            token: format!("jepsen-token-{t}"),
        })
        .collect()
}

/// The key of the history: one identity per (tenant, scope, key).
pub fn history_key(tenant: &str, scope: &str, key: &str) -> String {
    format!("{tenant}/{scope}/{key}")
}

/// `(tenant, scope, key)` of a history key.
pub fn split_key(k: &str) -> Option<(&str, &str, &str)> {
    let (tenant, rest) = k.split_once('/')?;
    let (scope, key) = rest.split_once('/')?;
    Some((tenant, scope, key))
}

/// Whether a history key lives in the REGIONAL namespace.
pub fn is_regional(k: &str) -> bool {
    split_key(k).is_some_and(|(_, scope, _)| scope == REGIONAL_SCOPE)
}

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
    pub tenants: Vec<Tenant>,
    /// Share of the Reserves in the REGIONAL namespace.
    pub regional: f64,
    /// Longest side effect between a NEW and its Complete, in milliseconds.
    pub think_ms: u64,
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

    /// Calls recorded so far (invocations).
    pub fn calls(&self) -> u64 {
        self.next.load(Ordering::SeqCst) - 1
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

fn fp_of(history_key: &str, variant: u8) -> Fingerprint {
    Fingerprint::of_request(
        "POST",
        "/charge",
        format!("{history_key}:{variant}").as_bytes(),
    )
}

/// A read's phase as the history writes it.
pub fn phase_name(r: &idem_proto::v1::GetResponse) -> &'static str {
    use idem_proto::v1::Phase;
    match r.phase() {
        Phase::Reserved => "reserved",
        Phase::Released => "released",
        Phase::Completed if r.r#final => "completed-final",
        Phase::Completed => "completed",
        Phase::Unspecified => "unspecified",
    }
}

/// Record a read's answer in `op` (Get during the run, Read after healing).
pub fn record_read(op: &mut Op, r: &Result<idem_proto::v1::GetResponse, Error>) {
    match r {
        Ok(r) => {
            op.outcome = Outcome::Ok;
            op.phase = phase_name(r).into();
            op.fence = idem_proto::convert::fence(r.fence.as_ref())
                .map(|f| f.to_string())
                .unwrap_or_default();
            op.value = r
                .response
                .as_ref()
                .map(|x| hex::encode(&x.body))
                .unwrap_or_default();
        }
        Err(Error::NotFound(_)) => {
            op.outcome = Outcome::Ok;
            op.phase = "absent".into();
        }
        Err(e) => op.outcome = classify(e),
    }
}

/// A blank op of `call` on `key` by `client` through `region`.
pub fn op(call: Call, client: usize, region: usize, key: &str) -> Op {
    Op {
        id: 0,
        client: client as u32,
        region: region as u32,
        call,
        key: key.to_string(),
        fingerprint: String::new(),
        start_ms: now_ms(),
        end_ms: 0,
        outcome: Outcome::Indeterminate,
        fence: String::new(),
        lease_expires_ms: 0,
        trusted_until_ms: 0,
        took_over: false,
        value: String::new(),
        phase: String::new(),
    }
}

/// One SDK client per region for a client of `tenant`: that region's nodes first
/// (starting at a node picked by the client id), then the other regions'.
pub async fn connect(
    id: usize,
    endpoints: &[Vec<String>],
    token: Option<&str>,
) -> Result<Vec<Client>, Error> {
    let mut out = Vec::new();
    for r in 0..endpoints.len() {
        let mut list = Vec::new();
        for k in 0..endpoints.len() {
            let eps = &endpoints[(r + k) % endpoints.len()];
            for n in 0..eps.len() {
                list.push(eps[(id + n) % eps.len()].clone());
            }
        }
        let mut cc = ClientConfig::with_endpoints(list);
        cc.token = token.map(str::to_string);
        cc.timeout = Duration::from_secs(3);
        cc.retry = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        out.push(Client::connect(cc).await?);
    }
    Ok(out)
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
    let tenant = cfg.tenants[id % cfg.tenants.len()].clone();
    let clients = match connect(id, &cfg.endpoints, Some(&tenant.token)).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("client {id}: cannot connect: {e}");
            return;
        }
    };
    let mut region = id % regions;
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
        let scope = if rng.random_bool(cfg.regional) {
            REGIONAL_SCOPE
        } else {
            GLOBAL_SCOPE
        };
        let name = format!("k{}", w * cfg.keys / 2 + rng.random_range(0..cfg.keys));
        let mut key = history_key(&tenant.name, scope, &name);
        let c = &clients[region];
        // A few reads of the key instead of a Reserve.
        if again.is_none() && rng.random_bool(0.08) {
            let mut o = op(Call::Get, id, region, &key);
            rec.invoke(&mut o);
            let r = c.get(scope, name.as_bytes()).await;
            o.end_ms = now_ms();
            record_read(&mut o, &r);
            rec.complete(o);
            continue;
        }
        // One request in fifty reuses the key with another body (a client bug).
        let mut variant = u8::from(rng.random_bool(0.02));
        if let Some((_, k, from)) = again {
            key = k;
            variant = 0;
            if regions > 1 {
                region = (from + 1 + rng.random_range(0..regions - 1)) % regions;
            }
        }
        let Some((_, scope, name)) = split_key(&key) else {
            continue;
        };
        let (scope, name) = (scope.to_string(), name.to_string());
        let c = &clients[region];
        let fp = fp_of(&key, variant);
        let mut req = ReserveRequest::new(scope.clone(), name.clone().into_bytes(), fp);
        req.lease_ms = LEASE_MS;
        let mut o = op(Call::Reserve, id, region, &key);
        o.fingerprint = hex::encode(fp.0);
        rec.invoke(&mut o);
        let res = c.reserve(&req).await;
        o.end_ms = now_ms();
        let lease = match &res {
            Ok(Reservation::New(l)) => {
                o.outcome = Outcome::New;
                o.fence = l.fence.to_string();
                o.lease_expires_ms = l.expires_at_ms;
                o.trusted_until_ms = o.end_ms
                    + l.trusted_for()
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or_default();
                o.took_over = l.took_over.is_some();
                Some(l.clone())
            }
            Ok(Reservation::InFlight { .. }) => {
                o.outcome = Outcome::InFlight;
                None
            }
            Ok(Reservation::Replay(r)) => {
                o.outcome = Outcome::Replay;
                o.value = hex::encode(&r.body);
                None
            }
            Ok(Reservation::Mismatch { .. }) => {
                o.outcome = Outcome::Mismatch;
                None
            }
            Err(e) => {
                // A Reserve that failed may still have been granted by a majority after
                // the client gave up: a possible grant (unknown fence, never acted on).
                o.outcome = classify(e);
                // Its region did not answer: the next call goes elsewhere.
                region = (region + 1 + rng.random_range(0..regions.max(2) - 1)) % regions;
                None
            }
        };
        rec.complete(o);
        let Some(mut lease) = lease else {
            tokio::time::sleep(Duration::from_millis(rng.random_range(5..50))).await;
            continue;
        };
        // The side effect, sometimes long enough to extend the lease first.
        if rng.random_bool(0.15) {
            extend(c, &mut lease, id, region, &key, &fp, &rec).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..=cfg.think_ms))).await;
        let choice: f64 = rng.random();
        let mut o = op(Call::Complete, id, region, &key);
        o.fingerprint = hex::encode(fp.0);
        o.fence = lease.fence.to_string();
        o.lease_expires_ms = lease.expires_at_ms;
        if choice < 0.6 {
            let body = format!("c{id}-{key}-{}", now_ms()).into_bytes();
            let resp = StoredResponse {
                status: 200,
                headers: vec![],
                body: body.clone(),
            };
            o.start_ms = now_ms();
            o.value = hex::encode(&body);
            rec.invoke(&mut o);
            let r = c.complete(&lease, &resp).await;
            o.end_ms = now_ms();
            o.outcome = match r {
                Ok(()) => Outcome::Ok,
                Err(e) => classify(&e),
            };
            if o.outcome == Outcome::Ok && variant == 0 && redeliver.len() < MAX_REDELIVERIES {
                let at = now_ms() + rng.random_range(2_500..6_000);
                redeliver.push_back((at, key.clone(), region));
            }
            rec.complete(o);
        } else if choice < 0.8 {
            o.call = Call::Release;
            o.start_ms = now_ms();
            rec.invoke(&mut o);
            let r = c.release(&lease).await;
            o.end_ms = now_ms();
            o.outcome = match r {
                Ok(()) => Outcome::Ok,
                Err(e) => classify(&e),
            };
            rec.complete(o);
        }
        // Else: the client "crashed" holding the lease; it expires.
    }
}

/// Extend `lease` by another lease length and record it.
async fn extend(
    c: &Client,
    lease: &mut Lease,
    id: usize,
    region: usize,
    key: &str,
    fp: &Fingerprint,
    rec: &Recorder,
) {
    let mut o = op(Call::Extend, id, region, key);
    o.fingerprint = hex::encode(fp.0);
    o.fence = lease.fence.to_string();
    rec.invoke(&mut o);
    let r = c.extend(lease, LEASE_MS).await;
    o.end_ms = now_ms();
    o.outcome = match r {
        Ok(()) => {
            o.lease_expires_ms = lease.expires_at_ms;
            o.trusted_until_ms = o.end_ms
                + lease
                    .trusted_for()
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default();
            Outcome::Ok
        }
        Err(e) => classify(&e),
    };
    rec.complete(o);
}
