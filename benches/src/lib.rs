//! The load generator behind `idem bench`.
//!
//! Closed loop: `concurrency` workers, each sending its next request when the previous
//! one returns. Open loop: requests start on a fixed schedule whatever the latency, and
//! each latency is measured from the request's scheduled start, so a stall shows up in
//! the percentiles instead of silently lowering the load (coordinated omission).

use hdrhistogram::Histogram;
use idem_client::{
    Client, ClientConfig, Fingerprint, Reservation, ReserveRequest, RetryPolicy, StoredResponse,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most requests in flight in open-loop mode before new ones are counted as dropped.
pub const MAX_OPEN_LOOP_IN_FLIGHT: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Every request a fresh key: Reserve then Complete.
    NewKeys,
    /// Reserves of keys completed beforehand: REPLAY.
    ReplayHeavy,
    /// A small key space shared by all workers: NEW, IN_FLIGHT and REPLAY mixed.
    Mixed,
    /// The seed incident: 10% of requests reuse a completed key with a different body.
    SdkKeyReuse,
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "new-keys" => Ok(Scenario::NewKeys),
            "replay-heavy" => Ok(Scenario::ReplayHeavy),
            "mixed" => Ok(Scenario::Mixed),
            "sdk-key-reuse" => Ok(Scenario::SdkKeyReuse),
            _ => Err(format!(
                "unknown scenario {s:?}: new-keys, replay-heavy, mixed, sdk-key-reuse"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub endpoints: Vec<String>,
    pub scenario: Scenario,
    pub concurrency: usize,
    pub duration: Duration,
    /// Open loop at this many requests per second; None = closed loop.
    pub rate: Option<f64>,
    /// Keys in the shared key space (mixed, replay-heavy, sdk-key-reuse).
    pub keys: usize,
    /// The scope of every key. The cluster's `[[namespaces]]` decide its mode: GLOBAL
    /// (the default) or REGIONAL.
    pub scope: String,
    /// Bytes of each completion's response body (0: a 11-byte JSON body).
    pub response_bytes: usize,
    pub progress: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub mode: String,
    pub concurrency: usize,
    pub seconds: f64,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub outcomes: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// The Complete calls alone (of the requests granted NEW), with this body size.
    pub response_bytes: usize,
    pub completes: u64,
    pub complete_p50_ms: f64,
    pub complete_p99_ms: f64,
    pub complete_max_ms: f64,
}

impl Report {
    pub fn markdown(&self) -> String {
        let outcomes = self
            .outcomes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "| scenario | mode | concurrency | ops/s | p50 ms | p99 ms | p999 ms | max ms | outcomes |\n|---|---|---|---|---|---|---|---|---|\n| {:?} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n\n\
             | Complete | body bytes | calls | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|\n| | {} | {} | {:.2} | {:.2} | {:.2} |\n",
            self.scenario, self.mode, self.concurrency, self.ops_per_sec, self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms, outcomes,
            self.response_bytes, self.completes, self.complete_p50_ms, self.complete_p99_ms, self.complete_max_ms
        )
    }
}

struct Shared {
    hist: Mutex<Histogram<u64>>,
    complete_hist: Mutex<Histogram<u64>>,
    outcomes: Mutex<BTreeMap<String, u64>>,
    response: StoredResponse,
}

fn record_in(hist: &Mutex<Histogram<u64>>, started: Instant) {
    let us = started.elapsed().as_micros().max(1) as u64;
    let _ = hist
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .record(us.min(3_600_000_000));
}

/// `len` bytes that do not compress (xorshift from `seed`): a large binary body.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The response every completion stores: `bytes` of pseudo-random data, or a short
/// JSON body.
fn response_of(bytes: usize) -> StoredResponse {
    let body = if bytes == 0 {
        b"{\"ok\":true}".to_vec()
    } else {
        pseudo_random_bytes(0x2545_f491_4f6c_dd1d, bytes)
    };
    StoredResponse {
        status: 200,
        headers: vec![],
        body,
    }
}

impl Shared {
    fn record(&self, started: Instant, outcome: &str) {
        record_in(&self.hist, started);
        *self
            .outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(outcome.to_string())
            .or_default() += 1;
    }
}

fn fingerprint(key: &str, variant: u32) -> Fingerprint {
    Fingerprint::of_request("POST", "/charge", format!("{key}:{variant}").as_bytes())
}

fn label(r: &Result<Reservation, idem_client::Error>) -> &'static str {
    match r {
        Ok(Reservation::New(_)) => "new",
        Ok(Reservation::InFlight { .. }) => "in_flight",
        Ok(Reservation::Replay(_)) => "replay",
        Ok(Reservation::Mismatch { .. }) => "mismatch",
        Err(_) => "error",
    }
}

/// One request of the scenario: Reserve, and Complete when granted.
async fn one(
    client: &Client,
    cfg: &BenchConfig,
    shared: &Shared,
    seq: u64,
    run: &str,
) -> &'static str {
    let (key, variant) = match cfg.scenario {
        Scenario::NewKeys => (format!("{run}-n{seq}"), 0),
        Scenario::ReplayHeavy => (format!("{run}-k{}", seq % cfg.keys as u64), 0),
        Scenario::Mixed => (
            format!("{run}-k{}", rand::random::<u64>() % cfg.keys as u64),
            0,
        ),
        Scenario::SdkKeyReuse => {
            // 10% of requests reuse an earlier key with a different body.
            if seq >= 10 && rand::random::<u32>().is_multiple_of(10) {
                (format!("{run}-r{}", rand::random::<u64>() % seq), 1)
            } else {
                (format!("{run}-r{seq}"), 0)
            }
        }
    };
    let fp = fingerprint(&key, variant);
    let req = ReserveRequest::new(cfg.scope.clone(), key, fp);
    let r = client.reserve(&req).await;
    if let Ok(Reservation::New(lease)) = &r {
        let t = Instant::now();
        if client.complete(lease, &shared.response).await.is_err() {
            return "error";
        }
        record_in(&shared.complete_hist, t);
    }
    label(&r)
}

/// Complete every key of the shared key space once, so replay-heavy reads replays.
async fn preload(client: &Client, cfg: &BenchConfig, shared: &Shared, run: &str) {
    if cfg.scenario != Scenario::ReplayHeavy {
        return;
    }
    for i in 0..cfg.keys as u64 {
        let _ = one(client, cfg, shared, i, run).await;
    }
}

pub async fn run(cfg: BenchConfig) -> Result<Report, idem_client::Error> {
    let mut clients = Vec::new();
    for e in &cfg.endpoints {
        let mut c = ClientConfig::new(e.clone());
        c.retry = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        clients.push(Client::connect(c).await?);
    }
    let run_id = format!("b{}", idem_client::now_ms());
    let hist =
        || Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"));
    let shared = Arc::new(Shared {
        hist: hist(),
        complete_hist: hist(),
        outcomes: Mutex::new(BTreeMap::new()),
        response: response_of(cfg.response_bytes),
    });
    preload(&clients[0], &cfg, &shared, &run_id).await;
    // What the preload completed is not part of the measurement.
    shared
        .complete_hist
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .reset();
    let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut tasks = Vec::new();
    let progress = {
        let shared = shared.clone();
        let show = cfg.progress;
        tokio::spawn(async move {
            let mut last = 0u64;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n: u64 = shared
                    .outcomes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .sum();
                if show {
                    eprint!(
                        "\r{:>6.1}s  {:>8} ops  {:>8} ops/s",
                        start.elapsed().as_secs_f64(),
                        n,
                        n - last
                    );
                }
                last = n;
            }
        })
    };
    match cfg.rate {
        None => {
            for w in 0..cfg.concurrency {
                let client = clients[w % clients.len()].clone();
                let (cfg, shared, seq, run_id) =
                    (cfg.clone(), shared.clone(), seq.clone(), run_id.clone());
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < deadline {
                        let n = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let t = Instant::now();
                        let outcome = one(&client, &cfg, &shared, n, &run_id).await;
                        shared.record(t, outcome);
                    }
                }));
            }
        }
        Some(rate) => {
            let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_OPEN_LOOP_IN_FLIGHT));
            let mut n = 0u64;
            while Instant::now() < deadline {
                let scheduled = start + period.mul_f64(n as f64);
                tokio::time::sleep_until(scheduled.into()).await;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    shared.record(scheduled, "dropped");
                    n += 1;
                    continue;
                };
                let client = clients[n as usize % clients.len()].clone();
                let (cfg, shared, run_id) = (cfg.clone(), shared.clone(), run_id.clone());
                // Not kept: the semaphore bounds and tracks what is in flight.
                tokio::spawn(async move {
                    let outcome = one(&client, &cfg, &shared, n, &run_id).await;
                    // Measured from the scheduled start: coordinated omission corrected.
                    shared.record(scheduled, outcome);
                    drop(permit);
                });
                n += 1;
            }
            // Wait for the requests still in flight.
            let _ = in_flight.acquire_many(MAX_OPEN_LOOP_IN_FLIGHT as u32).await;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    if cfg.progress {
        eprintln!();
    }
    let secs = start.elapsed().as_secs_f64();
    let hist = shared.hist.lock().unwrap_or_else(|p| p.into_inner());
    let outcomes = shared
        .outcomes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let ops: u64 = outcomes.values().sum();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let chist = shared
        .complete_hist
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let cms = |q: f64| chist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        scenario: cfg.scenario,
        mode: if cfg.rate.is_some() {
            "open-loop".into()
        } else {
            "closed-loop".into()
        },
        concurrency: cfg.concurrency,
        seconds: secs,
        ops,
        ops_per_sec: ops as f64 / secs,
        outcomes,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
        response_bytes: shared.response.body.len(),
        completes: chist.len(),
        complete_p50_ms: cms(0.5),
        complete_p99_ms: cms(0.99),
        complete_max_ms: chist.max() as f64 / 1000.0,
    })
}
