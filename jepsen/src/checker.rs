//! Judges a history: safety violations by kind, counts by outcome, and whether the run
//! did enough to say anything (`unknown` otherwise).
//!
//! - **double grant**: two NEWs of one key, for different claims, whose trusted windows
//!   overlap, in any generation. A window runs from the moment the client received the
//!   NEW to the moment it stopped trusting the lease (the SDK's monotonic measure from
//!   the send, minus the skew margin, on the harness clock), or to the moment the holder
//!   invoked Release if that came first. Such an overlap is *definite*: two clients
//!   acted on the key at once. A grant that came after the holder stopped trusting its
//!   lease but before that lease could have ended (send + lease) is a *possible* double
//!   grant: no two clients acted at once, but the margin was eaten (listed, not
//!   invalid). Two claims granted in one generation are a double grant whatever the
//!   timing;
//! - **fence reused**: one fence reported as NEW to two calls;
//! - **lost completion**: a NEW for a key whose completion was acknowledged (or proved
//!   stored by a REPLAY of its bytes) before the Reserve started; after healing, a
//!   region whose final read does not hold that completion, final, byte for byte;
//! - **wrong replay**: a REPLAY whose bytes differ from every acknowledged or possibly
//!   applied completion of the key, or a replay that changes between calls;
//! - **mismatch**: MISMATCH for a request whose fingerprint every stored attempt shared,
//!   or REPLAY of a completion made for another fingerprint;
//! - **divergence**: nodes whose digests after healing differ, or regions whose final
//!   reads of one key differ. A node or region that did not answer is reported as
//!   unreachable (the run is then unknown), never as equal.
//!
//! Possible effects: a Complete that timed out, was answered UNAVAILABLE or LEASE_LOST
//! (which includes an acknowledgement that came too late to trust), or was still
//! running at the end may have stored its bytes, so a replay of them is valid; a
//! Reserve that did not answer NEW may hold a lease nobody acts on, which is why another
//! client may see IN_FLIGHT, never why it may see a second NEW.

use crate::history::{Call, Op, Outcome};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

mod faults;
pub use faults::check_no_grant_without_majority;

/// The checks every run's history goes through: the kind a violation of each is
/// reported as, and what it checks (jepsen/README.md, What counts as a violation).
pub const CHECKS: [(&str, &str); 8] = [
    ("double_grant", "no two NEWs of one key whose trusted windows overlap, in any generation; no two claims granted in one generation"),
    ("fence_reused", "no fence reported as NEW to two calls"),
    ("lost_completion", "no NEW after an acknowledged (or replayed) completion; every region holds it, final, byte for byte, after healing"),
    ("wrong_replay", "a REPLAY returns bytes a completion stored, and never changes"),
    ("mismatch", "MISMATCH only when the key saw another fingerprint; no REPLAY of another fingerprint's completion"),
    ("divergence", "every node's record digest and every region's final read agree after healing"),
    ("grant_without_majority", "no NEW for a Reserve sent while every region was cut off from every other (partition-regions)"),
    ("disk_error_ignored", "a node whose fsync failed stops serving (never retries it, never acknowledges)"),
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub kind: &'static str,
    pub key: String,
    pub ops: Vec<u64>,
    pub detail: String,
}

/// How much a run must have done for its verdict to mean something.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Expect {
    pub min_new: u64,
    pub min_replay: u64,
    pub min_takeover: u64,
    pub min_complete: u64,
}

impl Expect {
    /// What the fault suite asks of a run.
    pub fn run() -> Expect {
        Expect {
            min_new: 50,
            min_replay: 20,
            min_takeover: 3,
            min_complete: 20,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Verdict {
    /// "valid", "invalid" or "unknown".
    pub status: &'static str,
    pub valid: bool,
    pub ops: usize,
    pub outcomes: BTreeMap<String, u64>,
    pub violations: Vec<Violation>,
    /// Grants that ate the margin without two clients acting at once.
    pub possible: Vec<Violation>,
    /// Why the run cannot be called valid although nothing was violated.
    pub unknown: Vec<String>,
    /// Nodes or regions that did not answer the final digest or read.
    pub unreachable: Vec<String>,
    /// Double grants in REGIONAL namespaces: the documented anomaly of that mode,
    /// counted, not a violation.
    pub regional_double_grants: u64,
}

impl Verdict {
    pub fn by_kind(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for v in &self.violations {
            *m.entry(v.kind).or_default() += 1;
        }
        m
    }

    /// Add a violation found outside the history (by the harness), and settle again.
    pub fn add_violation(&mut self, v: Violation) {
        self.violations.push(v);
        self.settle();
    }

    /// Add a reason the run says nothing, and settle the status again.
    pub fn add_unknown(&mut self, why: String) {
        self.unknown.push(why);
        self.settle();
    }

    fn settle(&mut self) {
        self.valid = self.violations.is_empty() && self.unknown.is_empty();
        self.status = if !self.violations.is_empty() {
            "invalid"
        } else if !self.unknown.is_empty() {
            "unknown"
        } else {
            "valid"
        };
    }
}

fn outcome_name(o: &Outcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Check a history, asking nothing of its size.
pub fn check(history: &[Op], skew_margin_ms: u64) -> Verdict {
    check_with(history, skew_margin_ms, &Expect::default())
}

pub fn check_with(history: &[Op], skew_margin_ms: u64, expect: &Expect) -> Verdict {
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
        check_key(key, &ops, skew_margin_ms, &mut v);
    }
    check_fences(history, &mut v.violations);
    check_digests(history, &mut v);
    // Enough activity to have tested something.
    let count = |f: &dyn Fn(&Op) -> bool| history.iter().filter(|o| f(o)).count() as u64;
    let got = [
        (
            "NEW",
            count(&|o| o.call == Call::Reserve && o.outcome == Outcome::New),
            expect.min_new,
        ),
        (
            "REPLAY",
            count(&|o| o.call == Call::Reserve && o.outcome == Outcome::Replay),
            expect.min_replay,
        ),
        (
            "takeovers",
            count(&|o| o.call == Call::Reserve && o.outcome == Outcome::New && o.took_over),
            expect.min_takeover,
        ),
        (
            "acknowledged completions",
            count(&|o| o.call == Call::Complete && o.outcome == Outcome::Ok),
            expect.min_complete,
        ),
    ];
    for (what, n, min) in got {
        if n < min {
            v.unknown.push(format!(
                "too little activity: {n} {what}, at least {min} needed"
            ));
        }
    }
    if !v.unreachable.is_empty() {
        v.unknown.push(format!(
            "the final read could not reach {}",
            v.unreachable.join(", ")
        ));
    }
    v.settle();
    v
}

/// One grant's trusted window on the harness clock.
struct Grant<'a> {
    op: &'a Op,
    from: u64,
    /// The end of its trust, or its Release if that came first.
    to: u64,
    /// The end of its trust, with every acknowledged Extend.
    trust: u64,
    /// The latest moment its lease could end at the servers: its Reserve's (or latest
    /// acknowledged Extend's) send plus the lease length.
    could_end: u64,
}

fn check_key(key: &str, ops: &[&Op], skew: u64, v: &mut Verdict) {
    // In a REGIONAL namespace a region grants alone: two grants at once, and a replay
    // that changes when the merge picks another winner, are that mode's documented
    // anomaly (counted by the servers); what holds in every mode is still checked.
    let regional = crate::workload::is_regional(key);
    let mut regional_double_grants = 0;
    let out = &mut v.violations;
    let mut push = |kind, ops: Vec<u64>, detail: String| {
        if regional && matches!(kind, "double_grant" | "lost_completion") {
            if kind == "double_grant" {
                regional_double_grants += 1;
            }
            return;
        }
        out.push(Violation {
            kind,
            key: key.to_string(),
            ops,
            detail,
        })
    };
    let reserves = || ops.iter().copied().filter(|o| o.call == Call::Reserve);
    let grants: Vec<Grant> = reserves()
        .filter(|o| o.outcome == Outcome::New)
        .map(|o| {
            let released = ops
                .iter()
                .filter(|r| r.call == Call::Release && r.fence == o.fence && r.start_ms >= o.end_ms)
                .map(|r| r.start_ms)
                .min()
                .unwrap_or(u64::MAX);
            let extends = || {
                ops.iter().filter(|e| {
                    e.call == Call::Extend && e.outcome == Outcome::Ok && e.fence == o.fence
                })
            };
            let trust = extends()
                .map(|e| e.trusted_until_ms)
                .fold(o.trust_end(skew), u64::max);
            let could_end = extends().map(|e| e.start_ms).fold(o.start_ms, u64::max)
                + crate::workload::LEASE_MS;
            Grant {
                op: o,
                from: o.end_ms,
                to: trust.min(released),
                trust,
                could_end,
            }
        })
        .collect();
    let acked_completes: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| o.call == Call::Complete && o.outcome == Outcome::Ok)
        .collect();
    let possible_completes: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| {
            o.call == Call::Complete
                && (matches!(o.outcome, Outcome::Ok | Outcome::LeaseLost) || o.outcome.maybe())
        })
        .collect();

    // Two claims in one generation.
    let mut per_gen: BTreeMap<u32, BTreeSet<&str>> = BTreeMap::new();
    for g in &grants {
        if let Some(gen) = g.op.generation() {
            per_gen.entry(gen).or_default().insert(g.op.fence.as_str());
        }
    }
    for (gen, fences) in per_gen.iter().filter(|(_, f)| f.len() > 1) {
        let ids = grants
            .iter()
            .filter(|g| g.op.generation() == Some(*gen))
            .map(|g| g.op.id)
            .collect();
        push(
            "double_grant",
            ids,
            format!("generation {gen} granted to {} claims", fences.len()),
        );
    }
    // Trusted windows that overlap (definite), or a grant inside the margin (possible).
    let mut possible = Vec::new();
    for (i, a) in grants.iter().enumerate() {
        for b in grants.iter().skip(i + 1) {
            if a.op.fence == b.op.fence {
                continue;
            }
            let (first, second) = if a.from <= b.from { (a, b) } else { (b, a) };
            if second.from < first.to && first.from < second.to {
                push(
                    "double_grant",
                    vec![first.op.id, second.op.id],
                    format!(
                        "{} trusted from {} to {} while {} trusted until {} (overlap {} ms)",
                        second.op.fence,
                        second.from,
                        second.to,
                        first.op.fence,
                        first.to,
                        first.to.min(second.to).saturating_sub(second.from)
                    ),
                );
            } else if first.to < first.trust
                || first.op.trusted_until_ms == 0
                || ops.iter().any(|r| {
                    r.call == Call::Release && r.fence == first.op.fence && r.start_ms < second.from
                })
            {
                // Released before the second grant, or no lease length recorded: nothing
                // to say.
            } else {
                let could_end = first.could_end;
                if second.from < could_end {
                    possible.push(Violation {
                        kind: "possible_double_grant",
                        key: key.to_string(),
                        ops: vec![first.op.id, second.op.id],
                        detail: format!(
                            "{} received {} ms before {}'s lease could have ended",
                            second.op.fence,
                            could_end - second.from,
                            first.op.fence
                        ),
                    });
                }
            }
        }
    }
    // NEW after a completion was acknowledged, or proved stored by a replay.
    let mut stored_by: Vec<(&Op, u64)> = acked_completes.iter().map(|c| (*c, c.end_ms)).collect();
    for r in reserves().filter(|o| o.outcome == Outcome::Replay) {
        if let Some(c) = possible_completes.iter().find(|c| c.value == r.value) {
            stored_by.push((c, r.end_ms));
        }
    }
    let mut flagged = BTreeSet::new();
    for (c, known_at) in &stored_by {
        for g in grants.iter().filter(|g| g.op.start_ms > *known_at) {
            if flagged.insert((c.id, g.op.id)) {
                push(
                    "lost_completion",
                    vec![c.id, g.op.id],
                    format!(
                        "NEW {} after the completion by {} was known stored",
                        g.op.fence, c.fence
                    ),
                );
            }
        }
    }
    // Replays: bytes of a possible completion, made for the same fingerprint, never changing.
    let fp_of_fence: BTreeMap<&str, &str> = grants
        .iter()
        .map(|g| (g.op.fence.as_str(), g.op.fingerprint.as_str()))
        .collect();
    // A Get that reads a final completion sees the key's one answer, as a replay does.
    let mut replays: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| {
            (o.call == Call::Reserve && o.outcome == Outcome::Replay)
                || (o.call == Call::Get && o.outcome == Outcome::Ok && o.phase == "completed-final")
        })
        .collect();
    replays.sort_by_key(|o| (o.start_ms, o.id));
    let mut seen_replay: Option<&Op> = None;
    for r in replays {
        let source = possible_completes.iter().find(|c| c.value == r.value);
        match source {
            None => push(
                "wrong_replay",
                vec![r.id],
                format!("{:?} of bytes no completion stored", r.call).to_lowercase(),
            ),
            Some(c) => {
                if let Some(fp) = fp_of_fence
                    .get(c.fence.as_str())
                    .filter(|_| r.call == Call::Reserve)
                {
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
        if let Some(prev) = seen_replay.filter(|_| !regional) {
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
    let fps: BTreeSet<&str> = reserves().map(|o| o.fingerprint.as_str()).collect();
    for m in reserves().filter(|o| o.outcome == Outcome::Mismatch) {
        if fps.len() < 2 {
            push(
                "mismatch",
                vec![m.id],
                "MISMATCH although every request on the key had the same fingerprint".into(),
            );
        }
    }
    // The final read: every region answers, all the same, holding every known completion.
    let reads: Vec<&Op> = ops
        .iter()
        .copied()
        .filter(|o| o.call == Call::Read)
        .collect();
    if !reads.is_empty() {
        let answered: Vec<&Op> = reads
            .iter()
            .copied()
            .filter(|r| r.outcome == Outcome::Ok)
            .collect();
        for r in reads.iter().filter(|r| r.outcome != Outcome::Ok) {
            v.unreachable
                .push(format!("region {} for key {key}", r.region));
        }
        let states: BTreeSet<(&str, &str, &str)> = answered
            .iter()
            .map(|r| (r.phase.as_str(), r.fence.as_str(), r.value.as_str()))
            .collect();
        let out = &mut v.violations;
        if states.len() > 1 {
            out.push(Violation {
                kind: "divergence",
                key: key.to_string(),
                ops: answered.iter().map(|r| r.id).collect(),
                detail: format!(
                    "regions read the key differently after healing: {}",
                    answered
                        .iter()
                        .map(|r| format!("region {}: {} {}", r.region, r.phase, r.fence))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            });
        }
        for (c, _) in stored_by.iter().filter(|_| !regional) {
            for r in answered
                .iter()
                .filter(|r| r.phase != "completed-final" || r.value != c.value)
            {
                out.push(Violation {
                    kind: "lost_completion",
                    key: key.to_string(),
                    ops: vec![c.id, r.id],
                    detail: format!(
                        "region {} reads {} {} after healing, not the completion by {}",
                        r.region, r.phase, r.fence, c.fence
                    ),
                });
            }
        }
    }
    if !regional {
        v.possible.extend(possible);
    }
    v.regional_double_grants += regional_double_grants;
}

/// One fence reported as NEW to two calls.
fn check_fences(history: &[Op], out: &mut Vec<Violation>) {
    let mut by_fence: BTreeMap<(&str, &str), Vec<u64>> = BTreeMap::new();
    for o in history
        .iter()
        .filter(|o| o.call == Call::Reserve && o.outcome == Outcome::New)
    {
        by_fence
            .entry((o.key.as_str(), o.fence.as_str()))
            .or_default()
            .push(o.id);
    }
    for ((key, fence), ids) in by_fence.into_iter().filter(|(_, ids)| ids.len() > 1) {
        out.push(Violation {
            kind: "fence_reused",
            key: key.to_string(),
            detail: format!("fence {fence} granted to {} calls", ids.len()),
            ops: ids,
        });
    }
}

fn check_digests(history: &[Op], v: &mut Verdict) {
    let digests: Vec<&Op> = history.iter().filter(|o| o.call == Call::Digest).collect();
    for d in digests.iter().filter(|d| d.outcome != Outcome::Ok) {
        v.unreachable
            .push(format!("{} (region {})", d.key, d.region));
    }
    let answered: Vec<&Op> = digests
        .iter()
        .copied()
        .filter(|d| d.outcome == Outcome::Ok)
        .collect();
    let distinct: BTreeSet<&str> = answered.iter().map(|o| o.value.as_str()).collect();
    if distinct.len() > 1 {
        let regions: BTreeSet<u32> = answered.iter().map(|o| o.region).collect();
        v.violations.push(Violation {
            kind: "divergence",
            key: String::new(),
            ops: answered.iter().map(|o| o.id).collect(),
            detail: format!(
                "{} different record digests across {} nodes of {} regions",
                distinct.len(),
                answered.len(),
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
            trusted_until_ms: 0,
            took_over: false,
            value: value.into(),
            phase: String::new(),
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

    fn grant(id: u64, key: &str, t: (u64, u64), fence: &str, trusted_until: u64) -> Op {
        Op {
            trusted_until_ms: trusted_until,
            ..op(id, Call::Reserve, key, "aa", t, Outcome::New, fence, 0, "")
        }
    }

    #[test]
    fn overlapping_trusted_windows_are_a_double_grant_in_any_generation() {
        // Generation 3 granted while generation 2's holder still trusted its lease,
        // the second NEW slower than the first's whole window.
        let h = vec![
            grant(1, "k", (0, 10), "2:a", 1_700),
            grant(2, "k", (5, 1_600), "3:b", 3_300),
        ];
        let v = check(&h, 300);
        assert_eq!(
            v.by_kind().get("double_grant"),
            Some(&1),
            "{:?}",
            v.violations
        );
        assert_eq!(v.status, "invalid");
        // Windows that touch but do not overlap are fine...
        let h = vec![
            grant(1, "k", (0, 10), "2:a", 1_700),
            grant(2, "k", (1_650, 1_900), "3:b", 3_600),
        ];
        let v = check(&h, 300);
        assert!(v.valid, "{:?}", v.violations);
        // ...but a grant before the first lease could have ended ate the margin.
        assert_eq!(v.possible.len(), 1, "{:?}", v.possible);
        // A Release invoked ends the holder's window.
        let h = vec![
            grant(1, "k", (0, 10), "2:a", 1_700),
            op(
                2,
                Call::Release,
                "k",
                "",
                (100, 400),
                Outcome::Timeout,
                "2:a",
                0,
                "",
            ),
            grant(3, "k", (200, 300), "3:b", 2_000),
        ];
        let v = check(&h, 300);
        assert!(v.valid, "{:?}", v.violations);
    }

    #[test]
    fn one_fence_granted_to_two_calls_is_rejected() {
        let h = vec![
            grant(1, "k", (0, 10), "2:a", 1_700),
            grant(2, "k", (5_000, 5_010), "2:a", 6_700),
        ];
        let v = check(&h, 300);
        assert_eq!(
            v.by_kind().get("fence_reused"),
            Some(&1),
            "{:?}",
            v.violations
        );
    }

    #[test]
    fn a_completion_proved_by_a_replay_must_never_be_followed_by_new() {
        let h = vec![
            grant(1, "k", (0, 10), "1:a", 1_700),
            op(
                2,
                Call::Complete,
                "k",
                "",
                (20, 3_000),
                Outcome::Timeout,
                "1:a",
                0,
                "beef",
            ),
            op(
                3,
                Call::Reserve,
                "k",
                "aa",
                (3_100, 3_200),
                Outcome::Replay,
                "",
                0,
                "beef",
            ),
            grant(4, "k", (9_000, 9_010), "2:b", 10_700),
        ];
        let v = check(&h, 300);
        assert_eq!(
            v.by_kind().get("lost_completion"),
            Some(&1),
            "{:?}",
            v.violations
        );
    }

    fn read(id: u64, region: u32, phase: &str, fence: &str, value: &str) -> Op {
        Op {
            region,
            phase: phase.into(),
            ..op(
                id,
                Call::Read,
                "k",
                "",
                (10_000, 10_001),
                Outcome::Ok,
                fence,
                0,
                value,
            )
        }
    }

    #[test]
    fn the_final_read_must_hold_every_acknowledged_completion_in_every_region() {
        let base = vec![
            grant(1, "k", (0, 10), "1:a", 1_700),
            op(
                2,
                Call::Complete,
                "k",
                "",
                (20, 30),
                Outcome::Ok,
                "1:a",
                0,
                "beef",
            ),
        ];
        let mut h = base.clone();
        h.extend([
            read(3, 0, "completed-final", "1:a", "beef"),
            read(4, 1, "completed-final", "1:a", "beef"),
            read(5, 2, "completed-final", "1:a", "beef"),
        ]);
        assert!(check(&h, 300).valid);
        // One region holds it, but not as final: lost there, and the regions differ.
        let mut h = base.clone();
        h.extend([
            read(3, 0, "completed-final", "1:a", "beef"),
            read(4, 1, "completed", "1:a", "beef"),
            read(5, 2, "completed-final", "1:a", "beef"),
        ]);
        let v = check(&h, 300);
        assert_eq!(
            v.by_kind().get("lost_completion"),
            Some(&1),
            "{:?}",
            v.violations
        );
        assert_eq!(
            v.by_kind().get("divergence"),
            Some(&1),
            "{:?}",
            v.violations
        );
        // A region that did not answer is reported, never taken as equal.
        let mut h = base;
        h.extend([
            read(3, 0, "completed-final", "1:a", "beef"),
            Op {
                outcome: Outcome::Timeout,
                ..read(4, 1, "unreachable", "", "")
            },
        ]);
        let v = check(&h, 300);
        assert_eq!(v.status, "unknown", "{:?}", v);
        assert_eq!(v.unreachable.len(), 1);
    }

    #[test]
    fn a_run_with_too_little_activity_is_unknown_not_valid() {
        let v = check_with(&valid_history(), 100, &Expect::run());
        assert_eq!(v.status, "unknown");
        assert!(!v.valid);
        assert!(
            v.unknown.iter().any(|u| u.contains("NEW")),
            "{:?}",
            v.unknown
        );
        // A violation still makes it invalid.
        let mut h = valid_history();
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
        assert_eq!(check_with(&h, 100, &Expect::run()).status, "invalid");
    }

    #[test]
    fn a_still_running_complete_may_be_replayed() {
        let h = vec![
            grant(1, "k", (0, 10), "1:a", 1_700),
            Op {
                end_ms: u64::MAX,
                ..op(
                    2,
                    Call::Complete,
                    "k",
                    "",
                    (20, 0),
                    Outcome::Indeterminate,
                    "1:a",
                    0,
                    "beef",
                )
            },
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
        assert!(check(&h, 300).valid);
    }

    #[test]
    fn an_acknowledged_extend_prolongs_the_holders_window() {
        let extend = |id, t, fence: &str, trusted_until| Op {
            trusted_until_ms: trusted_until,
            ..op(id, Call::Extend, "k", "aa", t, Outcome::Ok, fence, 0, "")
        };
        // Without the Extend the second grant comes after the first trust ended.
        let h = vec![
            grant(1, "k", (0, 10), "2:a", 1_700),
            grant(3, "k", (1_800, 1_900), "3:b", 3_600),
        ];
        assert!(check(&h, 300).valid);
        // With it, the holder still trusted its lease: two clients acted at once.
        let mut h = h;
        h.push(extend(2, (500, 560), "2:a", 2_200));
        let v = check(&h, 300);
        assert_eq!(
            v.by_kind().get("double_grant"),
            Some(&1),
            "{:?}",
            v.violations
        );
        // An Extend that failed extends nothing.
        h[2].outcome = Outcome::LeaseLost;
        assert!(check(&h, 300).valid);
    }

    #[test]
    fn a_get_of_a_final_completion_must_read_the_keys_one_answer() {
        let complete = |id, value| {
            op(
                id,
                Call::Complete,
                "k",
                "aa",
                (20, 30),
                Outcome::Ok,
                "1:a",
                0,
                value,
            )
        };
        let get = |id, t, phase: &str, value: &str| Op {
            phase: phase.into(),
            ..op(id, Call::Get, "k", "", t, Outcome::Ok, "1:a", 0, value)
        };
        let h = vec![
            grant(1, "k", (0, 10), "1:a", 1_700),
            complete(2, "beef"),
            get(3, (40, 50), "completed-final", "beef"),
            // A region that has not heard of the completion yet reads it reserved: fine.
            get(4, (60, 70), "reserved", ""),
        ];
        assert!(check(&h, 300).valid, "{:?}", check(&h, 300).violations);
        let mut bad = h.clone();
        bad.push(get(5, (80, 90), "completed-final", "f00d"));
        let v = check(&bad, 300);
        // Bytes nobody stored, and an answer that changed.
        assert_eq!(
            v.by_kind().get("wrong_replay"),
            Some(&2),
            "{:?}",
            v.violations
        );
        assert!(v.violations.iter().any(|x| x.detail.contains("changed")));
    }

    #[test]
    fn double_grants_in_a_regional_namespace_are_counted_not_violations() {
        let key = crate::workload::history_key("acme", crate::workload::REGIONAL_SCOPE, "k1");
        let h = vec![
            grant(1, &key, (0, 10), "1:a", 1_700),
            grant(2, &key, (5, 20), "1:b", 1_710),
        ];
        let v = check(&h, 300);
        assert!(v.valid, "{:?}", v.violations);
        assert!(v.regional_double_grants >= 1);
        // The same history in the GLOBAL namespace is invalid.
        let key = crate::workload::history_key("acme", crate::workload::GLOBAL_SCOPE, "k1");
        let h = vec![
            grant(1, &key, (0, 10), "1:a", 1_700),
            grant(2, &key, (5, 20), "1:b", 1_710),
        ];
        assert_eq!(check(&h, 300).status, "invalid");
    }
}
