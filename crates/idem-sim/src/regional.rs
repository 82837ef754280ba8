//! REGIONAL mode's double-grant rate, measured against a simple analytic model.
//!
//! A REGIONAL key is decided by its local group alone and reaches the other regions
//! only through replication. A double grant needs three things: the first attempt was
//! granted, the client retried anyway (its answer was lost, it timed out, it failed
//! over), and the retry reached another region before the first grant's record did.
//! Each request here is one key: its first Reserve is applied at the home region, its
//! record reaches every other region after a replication lag `L` (exponential, mean
//! `lag_ms`), and with probability `p_retry` the client sends the Reserve again after a
//! delay `D` (uniform in `retry_ms`), to another region with probability `p_other`.
//! Every decision is the real one: `command::apply` with `Op::Reserve` at the region
//! the attempt reaches, and with an unguarded `Op::Merge` when a record arrives (whose
//! `double_grant` flag is the replicated count behind `idem_regional_double_grants_total`).
//!
//! The model: P(double grant per request) = p_retry x p_other x P(L > D), and for `L`
//! exponential with mean m and `D` uniform in [a, b],
//! P(L > D) = m / (b - a) x (e^(-a/m) - e^(-b/m)).

use crate::rng::Rng;
use crate::sim::key_of;
use idem_core::{
    command, ClaimId, Command, CommandResult, Fingerprint, Op, Record, ReserveOutcome,
};

#[derive(Clone, Debug)]
pub struct RegionalConfig {
    pub regions: usize,
    pub requests: u64,
    /// Mean replication lag (ms).
    pub lag_ms: f64,
    /// Probability that a client retries a request whose first attempt was granted.
    pub p_retry: f64,
    /// Probability that a retry reaches another region than the first attempt.
    pub p_other: f64,
    /// The retry's delay after the first attempt (ms, uniform).
    pub retry_ms: (u64, u64),
    pub lease_ms: u64,
}

impl Default for RegionalConfig {
    fn default() -> Self {
        RegionalConfig {
            regions: 3,
            requests: 1_000_000,
            lag_ms: 100.0,
            p_retry: 0.05,
            p_other: 0.3,
            retry_ms: (50, 1_000),
            lease_ms: 30_000,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegionalResult {
    pub requests: u64,
    pub retried: u64,
    pub retried_elsewhere: u64,
    /// Requests granted twice (a second NEW while the first grant's lease ran).
    pub double_grants: u64,
    /// Double grants the regions counted in their replicated state (merge results).
    pub counted: u64,
}

impl RegionalResult {
    pub fn rate(&self) -> f64 {
        self.double_grants as f64 / self.requests.max(1) as f64
    }
}

/// The model's double-grant probability per request.
pub fn model(cfg: &RegionalConfig) -> f64 {
    let (a, b) = (cfg.retry_ms.0 as f64, cfg.retry_ms.1 as f64);
    let m = cfg.lag_ms.max(1e-9);
    let beyond = if b > a {
        m / (b - a) * ((-a / m).exp() - (-b / m).exp())
    } else {
        (-a / m).exp()
    };
    cfg.p_retry * cfg.p_other * beyond
}

fn stamp(now_ms: u64, region: usize, nonce: u32, key: u32, op: Op) -> Command {
    Command {
        now_ms,
        skew_margin_ms: 500,
        claim: ClaimId {
            hlc: now_ms,
            region: region as u16,
            node: region as u16,
            nonce,
        },
        region_bit: 1 << region,
        key: key_of(key),
        op,
    }
}

fn reserve_op(cfg: &RegionalConfig) -> Op {
    Op::Reserve {
        fingerprint: Fingerprint([7; 32]),
        lease_ms: cfg.lease_ms,
        retention_ms: 30 * 24 * 3_600_000,
        first_attempt_ms: 0,
    }
}

fn merge_op(record: Record, region: usize) -> Op {
    Op::Merge {
        record,
        guarded: false,
        quorum: 1,
        region: Some(region as u16),
    }
}

fn granted(r: &CommandResult) -> bool {
    matches!(
        r,
        CommandResult::Reserve {
            outcome: ReserveOutcome::New { .. },
            ..
        }
    )
}

/// One request: the first attempt at its home region, replication to the others, and
/// perhaps a retry.
fn request(cfg: &RegionalConfig, rng: &mut Rng, key: u32, out: &mut RegionalResult) {
    let n = cfg.regions;
    let t0 = 1_000_000u64;
    let home = rng.below(n as u64) as usize;
    let mut records: Vec<Option<Record>> = vec![None; n];
    let (first, w) = command::apply(None, &stamp(t0, home, 1, key, reserve_op(cfg)));
    if !granted(&first) {
        return;
    }
    records[home] = w;
    // When the first grant's record reaches each other region.
    let lag: Vec<u64> = (0..n)
        .map(|_| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            (-cfg.lag_ms * (1.0 - u).ln()).round() as u64
        })
        .collect();
    out.requests += 1;
    if !rng.chance(cfg.p_retry) {
        return;
    }
    out.retried += 1;
    let delay = rng.between(cfg.retry_ms.0, cfg.retry_ms.1);
    let target = if rng.chance(cfg.p_other) {
        out.retried_elsewhere += 1;
        (home + 1 + rng.below(n as u64 - 1) as usize) % n
    } else {
        home
    };
    let at = t0 + delay;
    // The first grant's record arrived before the retry did.
    if target != home && lag[target] <= delay {
        if let Some(rec) = records[home].clone() {
            let merge = stamp(t0 + lag[target], target, 2, key, merge_op(rec, target));
            records[target] = command::apply(None, &merge).1;
        }
    }
    let retry = stamp(at, target, 3, key, reserve_op(cfg));
    let (second, w) = command::apply(records[target].as_ref(), &retry);
    if !granted(&second) {
        return;
    }
    out.double_grants += 1;
    // Replication settles it: each region's copy reaches the other, and the region
    // whose grant lost counts the double grant once.
    let (Some(a), Some(b)) = (records[home].clone(), w) else {
        return;
    };
    let later = at + 2 * cfg.lag_ms.round() as u64 + 1;
    let at_home = stamp(later, home, 4, key, merge_op(b.clone(), home));
    let at_target = stamp(later, target, 5, key, merge_op(a.clone(), target));
    for (stored, cmd) in [(a, at_home), (b, at_target)] {
        if let (
            CommandResult::Merge {
                double_grant: true, ..
            },
            _,
        ) = command::apply(Some(&stored), &cmd)
        {
            out.counted += 1;
        }
    }
}

pub fn run(cfg: &RegionalConfig, seed: u64) -> RegionalResult {
    let mut rng = Rng::new(seed);
    let mut out = RegionalResult::default();
    for key in 0..cfg.requests {
        request(cfg, &mut rng, key as u32, &mut out);
    }
    out
}

/// The table `idem-sim regional` prints: measured and modelled rates over a grid of
/// mean lags and retry-elsewhere probabilities.
pub fn table(requests: u64, seed: u64) -> String {
    let mut s = String::from(
        "| mean lag (ms) | P(retry elsewhere) | requests | double grants | measured rate | model | counted by the regions |\n|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for lag in [10.0, 50.0, 100.0, 300.0, 1_000.0, 5_000.0] {
        for p_other in [0.1, 0.3, 1.0] {
            let cfg = RegionalConfig {
                requests,
                lag_ms: lag,
                p_other,
                ..RegionalConfig::default()
            };
            let r = run(&cfg, seed);
            s.push_str(&format!(
                "| {lag:.0} | {p_other} | {} | {} | {:.2e} | {:.2e} | {} |\n",
                r.requests,
                r.double_grants,
                r.rate(),
                model(&cfg),
                r.counted
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measured_rate_follows_the_model_and_every_double_grant_is_counted_once() {
        for (lag, p_other) in [(100.0, 0.3), (1_000.0, 1.0)] {
            let cfg = RegionalConfig {
                requests: 200_000,
                lag_ms: lag,
                p_other,
                ..RegionalConfig::default()
            };
            let r = run(&cfg, 1);
            let m = model(&cfg);
            let expected = m * r.requests as f64;
            // Within five standard deviations of a binomial count.
            let sd = (expected * (1.0 - m)).sqrt();
            assert!(
                (r.double_grants as f64 - expected).abs() < 5.0 * sd + 1.0,
                "lag {lag}: {} double grants, model {expected:.0}",
                r.double_grants
            );
            assert!(r.double_grants > 0);
            assert_eq!(r.counted, r.double_grants, "the replicated count is exact");
        }
    }

    #[test]
    fn without_retries_elsewhere_there_is_no_double_grant() {
        let cfg = RegionalConfig {
            requests: 50_000,
            p_other: 0.0,
            ..RegionalConfig::default()
        };
        let r = run(&cfg, 2);
        assert!(r.retried > 0);
        assert_eq!(r.double_grants, 0);
    }
}
