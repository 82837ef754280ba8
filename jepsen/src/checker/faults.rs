//! Checks that need the fault schedule as well as the history.

use super::{Verdict, Violation};
use crate::history::{Call, Op, Outcome};
use crate::nemesis::Window;

/// How long after a partition's rules are in place a Reserve may still have been decided
/// by messages sent before them (a TCP segment already past the firewall).
const SETTLE_MS: u64 = 300;

/// While every region is cut off from every other (`partition-regions`), no majority of
/// regions can answer anyone: a Reserve of a GLOBAL namespace sent inside such a window
/// (after its rules settled) and answered NEW before the window ended was granted
/// without a majority. (A REGIONAL namespace grants on its region alone, by design.)
pub fn check_no_grant_without_majority(history: &[Op], windows: &[Window], v: &mut Verdict) {
    for w in windows.iter().filter(|w| w.nemesis == "partition-regions") {
        for op in history.iter().filter(|o| {
            o.call == Call::Reserve
                && o.outcome == Outcome::New
                && !crate::workload::is_regional(&o.key)
                && o.start_ms >= w.start_ms + SETTLE_MS
                && o.end_ms < w.end_ms
        }) {
            v.add_violation(Violation {
                kind: "grant_without_majority",
                key: op.key.clone(),
                ops: vec![op.id],
                detail: format!(
                    "NEW at {} ms for a Reserve sent at {} ms, while every region was cut off from every other ({} to {} ms)",
                    op.end_ms, op.start_ms, w.start_ms, w.end_ms
                ),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(name: &str, start_ms: u64, end_ms: u64) -> Window {
        Window {
            nemesis: name.into(),
            detail: String::new(),
            start_ms,
            end_ms,
            observed: Some("packets dropped".into()),
        }
    }

    fn reserve(id: u64, start_ms: u64, end_ms: u64, outcome: Outcome) -> Op {
        Op {
            id,
            client: 0,
            region: 0,
            call: Call::Reserve,
            key: format!("k{id}"),
            fingerprint: String::new(),
            start_ms,
            end_ms,
            outcome,
            fence: String::new(),
            lease_expires_ms: 0,
            trusted_until_ms: 0,
            took_over: false,
            value: String::new(),
            phase: String::new(),
        }
    }

    #[test]
    fn a_new_sent_while_no_majority_of_regions_could_meet_is_a_violation() {
        let windows = [
            window("partition-regions", 10_000, 16_000),
            window("kill", 20_000, 26_000),
        ];
        let history = [
            // Decided before the cut settled: fine.
            reserve(1, 9_990, 10_200, Outcome::New),
            // Sent inside, answered NEW inside: impossible without a majority.
            reserve(2, 11_000, 11_100, Outcome::New),
            // Sent inside, answered after the heal: may have been decided after it.
            reserve(3, 15_000, 16_500, Outcome::New),
            // Not granted: fine.
            reserve(4, 12_000, 13_000, Outcome::Unavailable),
            // Another nemesis's window.
            reserve(5, 21_000, 21_100, Outcome::New),
            // A REGIONAL namespace grants on its own region.
            Op {
                key: crate::workload::history_key("acme", crate::workload::REGIONAL_SCOPE, "k6"),
                ..reserve(6, 11_000, 11_100, Outcome::New)
            },
        ];
        let mut v = Verdict::default();
        check_no_grant_without_majority(&history, &windows, &mut v);
        assert_eq!(v.status, "invalid");
        assert_eq!(v.violations.len(), 1);
        assert_eq!(v.violations[0].kind, "grant_without_majority");
        assert_eq!(v.violations[0].ops, vec![2]);
    }
}
