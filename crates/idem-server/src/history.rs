//! The last 15 minutes of this node's key numbers, sampled every few seconds into a
//! bounded ring, and the alert rules of `deploy/prometheus/alerts.yml` evaluated on
//! them. The `/dashboard` page and `idem top` read this through `/api/history`, so they
//! work without a Prometheus server.

use crate::metrics::Metrics;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

/// Seconds between samples.
pub const SAMPLE_EVERY_SECS: u64 = 5;
/// Samples kept: 15 minutes.
pub const MAX_SAMPLES: usize = 180;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    /// Cumulative counters.
    pub outcomes: BTreeMap<String, u64>,
    pub attempts: BTreeMap<String, u64>,
    pub classes: BTreeMap<String, u64>,
    /// Cumulative `retry_delay_seconds` buckets (upper bound, count).
    pub delay_buckets: Vec<(f64, u64)>,
    pub conflicts: BTreeMap<String, u64>,
    /// Gauges.
    pub outbox_lag_seconds: BTreeMap<String, f64>,
    pub dead_letters: BTreeMap<String, f64>,
    pub groups_without_leader: Vec<String>,
}

impl Sample {
    pub fn take(m: &Metrics, t_ms: u64) -> Sample {
        let counters = |f: &crate::metrics::Family<crate::metrics::Counter>| {
            f.members()
                .into_iter()
                .map(|(k, v)| (k.join(","), v.get()))
                .collect::<BTreeMap<_, _>>()
        };
        let gauges = |f: &crate::metrics::Family<crate::metrics::Gauge>| {
            f.members()
                .into_iter()
                .map(|(k, v)| (k.join(","), v.get()))
                .collect::<BTreeMap<_, _>>()
        };
        Sample {
            t_ms,
            outcomes: counters(&m.idempotency_key_total),
            attempts: counters(&m.retry_attempt_total),
            classes: counters(&m.http_request_outcome),
            delay_buckets: m.retry_delay_seconds.cumulative(),
            conflicts: counters(&m.cross_region_conflict_total),
            outbox_lag_seconds: gauges(&m.outbox_lag_seconds),
            dead_letters: gauges(&m.dead_letter_queue_depth),
            groups_without_leader: m
                .raft_has_leader
                .members()
                .into_iter()
                .filter(|(_, g)| g.get() < 0.5)
                .map(|(k, _)| k.join(","))
                .collect(),
        }
    }
}

#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Firing {
    pub alert: &'static str,
    pub severity: &'static str,
    pub summary: String,
}

fn sum(m: &BTreeMap<String, u64>) -> u64 {
    m.values().sum()
}

fn get(m: &BTreeMap<String, u64>, k: &str) -> u64 {
    m.get(k).copied().unwrap_or(0)
}

impl History {
    pub fn push(&self, s: Sample) {
        let mut q = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= MAX_SAMPLES {
            q.pop_front();
        }
        q.push_back(s);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The alert rules, evaluated on this node's samples: the newest sample against the
    /// one about `window_secs` older.
    pub fn firing(&self) -> Vec<Firing> {
        let s = self.samples();
        evaluate(&s)
    }
}

fn back(s: &[Sample], secs: u64) -> Option<&Sample> {
    let last = s.last()?;
    s.iter()
        .rev()
        .find(|x| last.t_ms.saturating_sub(x.t_ms) >= secs * 1000)
        .or_else(|| s.first())
}

pub fn evaluate(s: &[Sample]) -> Vec<Firing> {
    let mut out = Vec::new();
    let Some(now) = s.last() else { return out };
    if let Some(w) = back(s, 300) {
        let total = sum(&now.outcomes).saturating_sub(sum(&w.outcomes));
        let mism = get(&now.outcomes, "mismatch").saturating_sub(get(&w.outcomes, "mismatch"));
        if total > 0 && mism as f64 / total as f64 > 0.001 {
            out.push(Firing {
                alert: "IdemMismatchRatioHigh",
                severity: "page",
                summary: format!(
                    "{:.2}% of Reserves over 5 minutes were MISMATCH (threshold 0.1%)",
                    100.0 * mism as f64 / total as f64
                ),
            });
        }
        let calls = sum(&now.classes).saturating_sub(sum(&w.classes));
        let errs = get(&now.classes, "5xx").saturating_sub(get(&w.classes, "5xx"));
        if calls > 0 && errs as f64 / calls as f64 > 0.01 {
            out.push(Firing {
                alert: "IdemServerErrorRatioHigh",
                severity: "page",
                summary: format!(
                    "{:.2}% of calls over 5 minutes were 5xx (threshold 1%)",
                    100.0 * errs as f64 / calls as f64
                ),
            });
        }
        let conflicts = get(&now.conflicts, "global").saturating_sub(get(&w.conflicts, "global"));
        if conflicts > 0 {
            out.push(Firing {
                alert: "IdemCrossRegionConflictGlobal",
                severity: "page",
                summary: format!("{conflicts} GLOBAL-mode conflicts in 5 minutes (must be 0)"),
            });
        }
        // Attempt-3 rate over 5 minutes against 3x its rate over the whole history.
        if let (Some(first), true) = (s.first(), now.t_ms > w.t_ms) {
            let recent = get(&now.attempts, "3").saturating_sub(get(&w.attempts, "3")) as f64
                / ((now.t_ms - w.t_ms) as f64 / 1000.0);
            let span = (now.t_ms.saturating_sub(first.t_ms)) as f64 / 1000.0;
            let base = if span > 0.0 {
                get(&now.attempts, "3").saturating_sub(get(&first.attempts, "3")) as f64 / span
            } else {
                0.0
            };
            if recent > 0.05 && recent > 3.0 * base {
                out.push(Firing {
                    alert: "IdemRetryAttempt3AboveBaseline",
                    severity: "warn",
                    summary: format!("attempt-3 Reserves at {recent:.2}/s, baseline {base:.2}/s"),
                });
            }
        }
    }
    for (dest, lag) in &now.outbox_lag_seconds {
        if *lag > 30.0 {
            out.push(Firing {
                alert: "IdemOutboxLagHigh",
                severity: "page",
                summary: format!("outbox to {dest} is {lag:.0}s behind (threshold 30s)"),
            });
        }
    }
    if let Some(w) = back(s, 600) {
        for (dest, depth) in &now.dead_letters {
            let before = w.dead_letters.get(dest).copied().unwrap_or(0.0);
            if *depth > before {
                out.push(Firing {
                    alert: "IdemDeadLetterGrowing",
                    severity: "warn",
                    summary: format!(
                        "dead letters for {dest} grew from {before} to {depth} in 10 minutes"
                    ),
                });
            }
        }
    }
    for g in &now.groups_without_leader {
        out.push(Firing {
            alert: "IdemGroupWithoutLeader",
            severity: "page",
            summary: format!("group {g} has no leader"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: u64, new: u64, mismatch: u64) -> Sample {
        let mut s = Sample {
            t_ms: t * 1000,
            ..Default::default()
        };
        s.outcomes.insert("new".into(), new);
        s.outcomes.insert("mismatch".into(), mismatch);
        s
    }

    #[test]
    fn mismatch_alert_fires_above_threshold_only() {
        let fired = evaluate(&[sample(0, 0, 0), sample(300, 995, 5)]);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].alert, "IdemMismatchRatioHigh");
        assert!(evaluate(&[sample(0, 0, 0), sample(300, 9_995, 5)]).is_empty());
    }

    #[test]
    fn ring_is_bounded() {
        let h = History::default();
        for i in 0..(MAX_SAMPLES as u64 + 20) {
            h.push(sample(i, i, 0));
        }
        assert_eq!(h.samples().len(), MAX_SAMPLES);
        assert_eq!(h.samples()[0].t_ms, 20_000);
    }

    #[test]
    fn leaderless_group_and_outbox_lag_fire() {
        let mut s = sample(0, 0, 0);
        s.groups_without_leader.push("r1/s0".into());
        s.outbox_lag_seconds.insert("eu".into(), 45.0);
        let names: Vec<_> = evaluate(&[s]).into_iter().map(|f| f.alert).collect();
        assert_eq!(names, vec!["IdemOutboxLagHigh", "IdemGroupWithoutLeader"]);
    }
}
