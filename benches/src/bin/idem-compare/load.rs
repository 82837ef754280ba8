//! The closed-loop load shared by every system: `concurrency` workers, each with its own
//! connection (or its own handle on a multiplexed channel), each sending its next
//! put-if-absent when the previous one returns. A warm-up runs first and is not
//! recorded; then every operation that starts inside the measured window is timed
//! into the worker's own hdrhistogram (merged at the end: no lock on the hot path).

use crate::{etcd, idem, postgres, redis};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of the value stored with each key (Idem stores its ~100-byte record instead).
pub const VALUE_BYTES: usize = 100;
/// One operation taking longer than this counts as an error (`timeout`).
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed operation before the worker reconnects and goes on.
const ERROR_PAUSE: Duration = Duration::from_millis(20);
/// Latencies above this (microseconds) are clamped into the top bucket.
const MAX_LATENCY_US: u64 = 60_000_000;

/// What one put-if-absent found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The key was absent and is now stored (Idem: NEW).
    Created,
    /// The key was present; the store answered with what it holds (Idem: REPLAY).
    Existed,
    /// Any other answer (Idem: IN_FLIGHT, MISMATCH), counted but unexpected.
    Other(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Put-if-absent of fresh random keys: every operation creates.
    New,
    /// Put-if-absent of keys stored beforehand: every operation finds the key.
    Replay,
}

impl Workload {
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::New => "new",
            Workload::Replay => "replay",
        }
    }
}

/// One worker's handle on the system under test.
pub enum Conn {
    Etcd(etcd::Kv),
    Redis(redis::Conn),
    Postgres(postgres::Conn),
    Idem(idem::Conn),
}

impl Conn {
    pub async fn put_if_absent(&mut self, key: &str, value: &[u8]) -> anyhow::Result<Outcome> {
        match self {
            Conn::Etcd(c) => c.put_if_absent(key, value).await,
            Conn::Redis(c) => c.set_nx(key, value).await,
            Conn::Postgres(c) => c.insert(key, value).await,
            Conn::Idem(c) => c.reserve(key, value).await,
        }
    }

    /// Store a key for the replay workload. For Idem that is a Reserve and a Complete
    /// with the value as the response, so that a later Reserve replays it.
    async fn store(&mut self, key: &str, value: &[u8]) -> anyhow::Result<Outcome> {
        match self {
            Conn::Idem(c) => c.reserve_and_complete(key, value).await,
            other => other.put_if_absent(key, value).await,
        }
    }

    /// After an error: a connection whose reply was cut short is out of step with the
    /// server, so the hand-written clients dial again. gRPC channels recover by
    /// themselves.
    async fn recover(&mut self) -> anyhow::Result<()> {
        match self {
            Conn::Redis(c) => c.reconnect().await,
            Conn::Postgres(c) => c.reconnect().await,
            Conn::Etcd(_) | Conn::Idem(_) => Ok(()),
        }
    }
}

/// A fresh random key (33 bytes), the same shape for every system.
pub fn fresh_key() -> String {
    format!("k{:032x}", rand::random::<u128>())
}

/// The value stored with every key: `VALUE_BYTES` random bytes, drawn once per run. One
/// value for the whole run, so that a replayed put is the same request as the one that
/// stored the key (Idem's fingerprint is computed from it; another value would be a
/// MISMATCH, not a REPLAY).
pub fn value() -> &'static [u8] {
    static VALUE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    VALUE.get_or_init(|| (0..VALUE_BYTES).map(|_| rand::random::<u8>()).collect())
}

pub struct Spec {
    pub workload: Workload,
    pub warmup: Duration,
    pub duration: Duration,
    /// The stored keys the replay workload cycles through.
    pub replay_keys: Arc<Vec<String>>,
}

/// One line of the results.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub system: String,
    pub config: String,
    pub workload: Workload,
    pub concurrency: usize,
    pub seconds: f64,
    pub ops: u64,
    pub errors: u64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Counts of each answer, errors included (`error: ...` by message).
    pub outcomes: BTreeMap<String, u64>,
}

struct WorkerResult {
    hist: Histogram<u64>,
    outcomes: BTreeMap<String, u64>,
    errors: u64,
}

/// Run `spec` with one worker per connection.
pub async fn run(system: &str, config: &str, conns: Vec<Conn>, spec: &Spec) -> anyhow::Result<Row> {
    let concurrency = conns.len();
    anyhow::ensure!(concurrency > 0, "no connections");
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let deadline = measure_from + spec.duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for (w, mut conn) in conns.into_iter().enumerate() {
        let workload = spec.workload;
        let keys = spec.replay_keys.clone();
        tasks.push(tokio::spawn(async move {
            let value = value();
            let mut res = WorkerResult {
                hist: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds"),
                outcomes: BTreeMap::new(),
                errors: 0,
            };
            // Workers start at different places in the stored keys.
            let mut next = w.wrapping_mul(7919);
            loop {
                let t = Instant::now();
                if t >= deadline {
                    break;
                }
                let key = match workload {
                    Workload::New => fresh_key(),
                    Workload::Replay => {
                        next = next.wrapping_add(1);
                        keys[next % keys.len()].clone()
                    }
                };
                let r = tokio::time::timeout(OP_TIMEOUT, conn.put_if_absent(&key, value)).await;
                let took = t.elapsed();
                let measured = t >= measure_from;
                let label = match &r {
                    Ok(Ok(Outcome::Created)) => "created".to_string(),
                    Ok(Ok(Outcome::Existed)) => "existed".to_string(),
                    Ok(Ok(Outcome::Other(o))) => (*o).to_string(),
                    Ok(Err(e)) => format!("error: {}", first_line(&e.to_string())),
                    Err(_) => "error: timeout".to_string(),
                };
                let failed = !matches!(r, Ok(Ok(_)));
                if measured {
                    if failed {
                        res.errors += 1;
                    } else {
                        let us = (took.as_micros() as u64).clamp(1, MAX_LATENCY_US);
                        let _ = res.hist.record(us);
                    }
                    *res.outcomes.entry(label).or_default() += 1;
                }
                if failed {
                    tokio::time::sleep(ERROR_PAUSE).await;
                    let _ = conn.recover().await;
                }
            }
            res
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds");
    let mut outcomes = BTreeMap::new();
    let mut errors = 0;
    for t in tasks {
        let r = t.await?;
        hist.add(&r.hist).expect("same bounds");
        for (k, v) in r.outcomes {
            *outcomes.entry(k).or_default() += v;
        }
        errors += r.errors;
    }
    let seconds = spec.duration.as_secs_f64();
    let ok = hist.len();
    let ms = |q: f64| {
        if ok == 0 {
            0.0
        } else {
            hist.value_at_quantile(q) as f64 / 1000.0
        }
    };
    Ok(Row {
        system: system.to_string(),
        config: config.to_string(),
        workload: spec.workload,
        concurrency,
        seconds,
        ops: ok,
        errors,
        ops_per_sec: ok as f64 / seconds,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: if ok == 0 {
            0.0
        } else {
            hist.max() as f64 / 1000.0
        },
        outcomes,
    })
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or_default();
    l.chars().take(120).collect()
}

/// Store `n` fresh keys through `conns` (in parallel), for the replay workload.
pub async fn preload(conns: Vec<Conn>, n: usize) -> anyhow::Result<Arc<Vec<String>>> {
    let keys: Arc<Vec<String>> = Arc::new((0..n).map(|_| fresh_key()).collect());
    let workers = conns.len().max(1);
    let mut tasks = Vec::new();
    for (w, mut conn) in conns.into_iter().enumerate() {
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let value = value();
            for i in (w..keys.len()).step_by(workers) {
                match conn.store(&keys[i], value).await? {
                    Outcome::Created => {}
                    other => anyhow::bail!("preloading {}: {other:?}", keys[i]),
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(keys)
}
