//! Judges a history: safety violations by kind, and counts by outcome.
//!
//! - **double grant**: two acknowledged NEWs of one key in one generation for different
//!   claims; or a NEW acknowledged while an earlier holder's lease was still running
//!   (minus the skew margin) and that holder had neither released (a Release invoked
//!   before the second NEW returned) nor lost it;
//! - **lost completion**: a NEW for a key whose Complete was acknowledged before the
//!   Reserve started;
//! - **wrong replay**: a REPLAY whose bytes differ from every acknowledged or possibly
//!   applied (timed-out) completion of the key, or a replay that changes between calls;
//! - **mismatch**: MISMATCH for a request whose fingerprint every stored attempt shared,
//!   or REPLAY of a completion made for another fingerprint;
//! - **divergence**: regions whose digests after healing differ.
//!
//! Timeouts are possible effects: a timed-out Complete (or one the SDK reported as
//! LEASE_LOST, which includes an acknowledgement that came too late to trust) may have
//! stored its bytes, so a
//! replay of them is valid; a timed-out Reserve may hold a lease nobody knows about,
//! which is why another client may see IN_FLIGHT, never why it may see a second NEW.

use crate::history::{Call, Op, Outcome};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub kind: &'static str,
    pub key: String,
    pub ops: Vec<u64>,
    pub detail: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Verdict {
    pub valid: bool,
    pub ops: usize,
    pub outcomes: BTreeMap<String, u64>,
    pub violations: Vec<Violation>,
}

impl Verdict {
    pub fn by_kind(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for v in &self.violations {
            *m.entry(v.kind).or_default() += 1;
        }
        m
    }
}

fn outcome_name(o: &Outcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn check(history: &[Op], skew_margin_ms: u64) -> Verdict {
    let mut v = Verdict {
        ops: history.len(),
        ..Default::default()
    };
    for op in history {
        *v.outcomes
            .entry(format!("{:?}:{}", op.call, outcome_name(&op.outcome)).to_lowercase())
            .or_default() += 1;
    }
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history.iter().filter(|o| o.call != Call::Digest) {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in by_key {
        check_key(key, &ops, skew_margin_ms, &mut v.violations);
    }
    check_digests(history, &mut v.violations);
    v.valid = v.violations.is_empty();
    v
}

fn check_key(key: &str, ops: &[&Op], skew: u64, out: &mut Vec<Violation>) {
    let mut push = |kind, ops: Vec<u64>, detail: String| {
        out.push(Violation {
            kind,
            key: key.to_string(),
            ops,
            detail,
        })
    };
    let grants: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| o.call == Call::Reserve && o.outcome == Outcome::New)
        .collect();
    let acked_completes: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| o.call == Call::Complete && o.outcome == Outcome::Ok)
        .collect();
    let possible_completes: Vec<&Op> = ops
        .iter()
        .copied()
        // LEASE_LOST from the SDK may be an acknowledgement that came too late to trust:
        // the completion may be stored, like a timed-out one.
        .filter(|o| {
            o.call == Call::Complete
                && matches!(
                    o.outcome,
                    Outcome::Ok | Outcome::Timeout | Outcome::LeaseLost
                )
        })
        .collect();

    // Two claims in one generation.
    let mut per_gen: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
    for g in &grants {
        if let Some(gen) = g.generation() {
            per_gen.entry(gen).or_default().insert(g.fence.as_str());
        }
    }
    for (gen, fences) in per_gen.iter().filter(|(_, f)| f.len() > 1) {
        let ids = grants
            .iter()
            .filter(|g| g.generation() == Some(*gen))
            .map(|g| g.id)
            .collect();
        push(
            "double_grant",
            ids,
            format!("generation {gen} granted to {} claims", fences.len()),
        );
    }
    // A grant while an earlier holder's lease was live and not given up.
    for (i, a) in grants.iter().enumerate() {
        for b in grants.iter().skip(i + 1).chain(grants.iter().take(i)) {
            if a.fence == b.fence || b.start_ms < a.start_ms {
                continue;
            }
            let released = ops.iter().any(|o| {
                o.call == Call::Release
                    && o.fence == a.fence
                    && o.outcome != Outcome::Error
                    && o.start_ms < b.end_ms
            });
            let lease_live_until = a.lease_expires_ms.saturating_sub(skew);
            if !released && a.end_ms <= b.start_ms && b.end_ms < lease_live_until {
                push(
                    "double_grant",
                    vec![a.id, b.id],
                    format!(
                        "{} granted while {} held a lease until {}",
                        b.fence, a.fence, a.lease_expires_ms
                    ),
                );
            }
        }
    }
    // NEW after an acknowledged completion.
    for c in &acked_completes {
        for g in grants.iter().filter(|g| g.start_ms > c.end_ms) {
            push(
                "lost_completion",
                vec![c.id, g.id],
                format!(
                    "NEW {} after completion by {} was acknowledged",
                    g.fence, c.fence
                ),
            );
        }
    }
    // Replays: bytes of a possible completion, made for the same fingerprint, never changing.
    let fp_of_fence: BTreeMap<&str, &str> = grants
        .iter()
        .map(|g| (g.fence.as_str(), g.fingerprint.as_str()))
        .collect();
    let mut seen_replay: Option<&Op> = None;
    for r in ops
        .iter()
        .filter(|o| o.call == Call::Reserve && o.outcome == Outcome::Replay)
    {
        let source = possible_completes.iter().find(|c| c.value == r.value);
        match source {
            None => push(
                "wrong_replay",
                vec![r.id],
                "replayed bytes no completion stored".into(),
            ),
            Some(c) => {
                if let Some(fp) = fp_of_fence.get(c.fence.as_str()) {
                    if *fp != r.fingerprint {
                        push(
                            "mismatch",
                            vec![c.id, r.id],
                            "REPLAY for a request with another fingerprint".into(),
                        );
                    }
                }
            }
        }
        if let Some(prev) = seen_replay {
            if prev.value != r.value {
                push(
                    "wrong_replay",
                    vec![prev.id, r.id],
                    "the replayed response changed".into(),
                );
            }
        }
        seen_replay = Some(r);
    }
    // MISMATCH only when some other fingerprint was used on the key.
    let fps: BTreeSet<&str> = ops
        .iter()
        .filter(|o| o.call == Call::Reserve)
        .map(|o| o.fingerprint.as_str())
        .collect();
    for m in ops
        .iter()
        .filter(|o| o.call == Call::Reserve && o.outcome == Outcome::Mismatch)
    {
        if fps.len() < 2 {
            push(
                "mismatch",
                vec![m.id],
                "MISMATCH although every request on the key had the same fingerprint".into(),
            );
        }
    }
}

fn check_digests(history: &[Op], out: &mut Vec<Violation>) {
    let digests: Vec<&Op> = history.iter().filter(|o| o.call == Call::Digest).collect();
    let distinct: BTreeSet<&str> = digests.iter().map(|o| o.value.as_str()).collect();
    if distinct.len() > 1 {
        let regions: BTreeSet<u32> = digests.iter().map(|o| o.region).collect();
        out.push(Violation {
            kind: "divergence",
            key: String::new(),
            ops: digests.iter().map(|o| o.id).collect(),
            detail: format!(
                "{} different record digests across {} nodes of {} regions",
                distinct.len(),
                digests.len(),
                regions.len()
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One row of a history table: the columns read better positionally than as a builder.
    #[allow(clippy::too_many_arguments)]
    fn op(
        id: u64,
        call: Call,
        key: &str,
        fp: &str,
        t: (u64, u64),
        outcome: Outcome,
        fence: &str,
        lease: u64,
        value: &str,
    ) -> Op {
        Op {
            id,
            client: id as u32,
            region: 0,
            call,
            key: key.into(),
            fingerprint: fp.into(),
            start_ms: t.0,
            end_ms: t.1,
            outcome,
            fence: fence.into(),
            lease_expires_ms: lease,
            value: value.into(),
        }
    }

    fn valid_history() -> Vec<Op> {
        vec![
            op(
                1,
                Call::Reserve,
                "k",
                "aa",
                (0, 10),
                Outcome::New,
                "1:c1",
                1_000,
                "",
            ),
            op(
                2,
                Call::Reserve,
                "k",
                "aa",
                (20, 30),
                Outcome::InFlight,
                "",
                0,
                "",
            ),
            op(
                3,
                Call::Complete,
                "k",
                "",
                (40, 50),
                Outcome::Ok,
                "1:c1",
                0,
                "beef",
            ),
            op(
                4,
                Call::Reserve,
                "k",
                "aa",
                (60, 70),
                Outcome::Replay,
                "",
                0,
                "beef",
            ),
            op(
                5,
                Call::Reserve,
                "k",
                "bb",
                (80, 90),
                Outcome::Mismatch,
                "",
                0,
                "",
            ),
            op(
                6,
                Call::Reserve,
                "k2",
                "cc",
                (0, 10),
                Outcome::New,
                "1:c2",
                500,
                "",
            ),
            op(
                7,
                Call::Release,
                "k2",
                "",
                (20, 30),
                Outcome::Ok,
                "1:c2",
                0,
                "",
            ),
            op(
                8,
                Call::Reserve,
                "k2",
                "cc",
                (40, 50),
                Outcome::New,
                "2:c3",
                900,
                "",
            ),
            op(
                9,
                Call::Digest,
                "",
                "",
                (100, 100),
                Outcome::Ok,
                "",
                0,
                "d1",
            ),
            op(
                10,
                Call::Digest,
                "",
                "",
                (100, 100),
                Outcome::Ok,
                "",
                0,
                "d1",
            ),
        ]
    }

    #[test]
    fn a_valid_history_passes() {
        let v = check(&valid_history(), 100);
        assert!(v.valid, "{:?}", v.violations);
        assert_eq!(v.outcomes.get("reserve:new"), Some(&3));
    }

    #[test]
    fn double_grant_is_rejected() {
        let mut h = valid_history();
        // Another client gets NEW while c1's lease (until 1000) runs.
        h.push(op(
            11,
            Call::Reserve,
            "k",
            "aa",
            (15, 25),
            Outcome::New,
            "2:c9",
            2_000,
            "",
        ));
        let v = check(&h, 100);
        assert!(!v.valid);
        assert_eq!(
            v.by_kind().get("double_grant"),
            Some(&1),
            "{:?}",
            v.violations
        );
        // Two claims in one generation.
        let mut h = valid_history();
        h.push(op(
            12,
            Call::Reserve,
            "k2",
            "cc",
            (2_000, 2_010),
            Outcome::New,
            "2:c7",
            3_000,
            "",
        ));
        assert_eq!(check(&h, 100).by_kind().get("double_grant"), Some(&1));
    }

    #[test]
    fn lost_completion_is_rejected() {
        let mut h = valid_history();
        h.push(op(
            11,
            Call::Reserve,
            "k",
            "aa",
            (5_000, 5_010),
            Outcome::New,
            "2:c9",
            6_000,
            "",
        ));
        let v = check(&h, 100);
        assert_eq!(
            v.by_kind().get("lost_completion"),
            Some(&1),
            "{:?}",
            v.violations
        );
    }

    #[test]
    fn wrong_replay_is_rejected() {
        let mut h = valid_history();
        h.push(op(
            11,
            Call::Reserve,
            "k",
            "aa",
            (95, 99),
            Outcome::Replay,
            "",
            0,
            "cafe",
        ));
        let v = check(&h, 100);
        assert!(
            v.by_kind().get("wrong_replay").is_some_and(|n| *n >= 1),
            "{:?}",
            v.violations
        );
    }

    #[test]
    fn mismatch_without_another_fingerprint_and_divergence_are_rejected() {
        let h = vec![
            op(
                1,
                Call::Reserve,
                "k",
                "aa",
                (0, 10),
                Outcome::New,
                "1:c1",
                1_000,
                "",
            ),
            op(
                2,
                Call::Reserve,
                "k",
                "aa",
                (20, 30),
                Outcome::Mismatch,
                "",
                0,
                "",
            ),
            op(
                3,
                Call::Digest,
                "",
                "",
                (100, 100),
                Outcome::Ok,
                "",
                0,
                "d1",
            ),
            Op {
                region: 1,
                ..op(
                    4,
                    Call::Digest,
                    "",
                    "",
                    (100, 100),
                    Outcome::Ok,
                    "",
                    0,
                    "d2",
                )
            },
        ];
        let v = check(&h, 100);
        assert_eq!(v.by_kind().get("mismatch"), Some(&1));
        assert_eq!(v.by_kind().get("divergence"), Some(&1));
    }

    #[test]
    fn a_timed_out_complete_may_be_replayed() {
        let h = vec![
            op(
                1,
                Call::Reserve,
                "k",
                "aa",
                (0, 10),
                Outcome::New,
                "1:c1",
                1_000,
                "",
            ),
            op(
                2,
                Call::Complete,
                "k",
                "",
                (20, 30),
                Outcome::Timeout,
                "1:c1",
                0,
                "beef",
            ),
            op(
                3,
                Call::Reserve,
                "k",
                "aa",
                (40, 50),
                Outcome::Replay,
                "",
                0,
                "beef",
            ),
        ];
        assert!(check(&h, 100).valid);
    }
}
