//! The shortest counterexamples that the executable protocol model
//! (`../shared/protocol-model`) prints for the rules it rejects, replayed step by step
//! against the real acceptor, merge and proposer functions. Each test fails if the
//! rule it guards is weakened again.

use crate::acceptor::{self, CompleteError, ReserveArgs, ReserveOutcome};
use crate::merge::{merge, MergeOutcome};
use crate::proposer::{Reply, Tally, Verdict};
use crate::{ClaimId, Fence, Fingerprint, Record, StoredResponse};

const SKEW: u64 = 0;
/// One model tick, in ms.
const T: u64 = 1_000;
const MAJORITY: u32 = 2;

fn claim(p: u8) -> ClaimId {
    ClaimId {
        hlc: u64::from(p) + 1,
        region: u16::from(p),
        node: 1,
        nonce: u32::from(p),
    }
}

fn resp(p: u8) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![],
        body: vec![b'r', b'0' + p],
    }
}

/// Three regions, each one acceptor (its group), as in the model.
struct World {
    regs: [Option<Record>; 3],
}

impl World {
    fn new() -> World {
        World {
            regs: [None, None, None],
        }
    }

    /// Region `r` applies proposer `p`'s Propose(gen, lease end) at `now`.
    fn propose(&mut self, r: usize, p: u8, gen: u32, lease_until: u64, now: u64) -> Reply {
        let d = acceptor::reserve(
            self.regs[r].as_ref(),
            &ReserveArgs {
                now_ms: now,
                skew_margin_ms: SKEW,
                fingerprint: Fingerprint([1; 32]),
                claim: claim(p),
                generation: Some(gen),
                lease_ms: T,
                lease_until_ms: Some(lease_until),
                retention_ms: 30 * 24 * 3600 * T,
                first_attempt_ms: 0,
                region_bit: 1 << r,
            },
        );
        if let Some(w) = d.write {
            self.regs[r] = Some(w);
        }
        Reply::from_outcome(&d.outcome)
    }

    fn complete(&mut self, r: usize, p: u8, gen: u32, now: u64) -> Result<(), CompleteError> {
        let fence = Fence {
            generation: gen,
            claim: claim(p),
        };
        let w = acceptor::complete(self.regs[r].as_ref(), fence, resp(p), now, 1 << r, MAJORITY)?;
        if let Some(w) = w {
            self.regs[r] = Some(w);
        }
        Ok(())
    }

    fn extend(&mut self, r: usize, p: u8, gen: u32, until: u64, now: u64) -> bool {
        let fence = Fence {
            generation: gen,
            claim: claim(p),
        };
        match acceptor::extend(self.regs[r].as_ref(), fence, T, Some(until), now) {
            Ok(w) => {
                self.regs[r] = Some(w);
                true
            }
            Err(_) => false,
        }
    }

    /// Anti-entropy: region `dst` merges region `src`'s record (GLOBAL mode: guarded).
    fn merge(&mut self, dst: usize, src: usize, now: u64) -> MergeOutcome {
        let Some(remote) = self.regs[src].clone() else {
            return MergeOutcome::Unchanged;
        };
        let m = merge(self.regs[dst].as_ref(), &remote, now, SKEW, true);
        if let Some(w) = m.write {
            self.regs[dst] = Some(w);
        }
        m.outcome
    }

    /// What a Reserve reaching region `r` at `now` would be answered by that region.
    fn local_answer(&self, r: usize, now: u64) -> ReserveOutcome {
        let mut probe = World {
            regs: self.regs.clone(),
        };
        let d = acceptor::reserve(
            probe.regs[r].as_ref(),
            &ReserveArgs {
                now_ms: now,
                skew_margin_ms: SKEW,
                fingerprint: Fingerprint([1; 32]),
                claim: claim(9),
                generation: Some(99),
                lease_ms: T,
                lease_until_ms: Some(now + T),
                retention_ms: 30 * 24 * 3600 * T,
                first_attempt_ms: 0,
                region_bit: 1 << r,
            },
        );
        probe.regs[r] = None;
        d.outcome
    }
}

fn decide(replies: &[(usize, Reply)], lease_live: bool) -> Option<Verdict> {
    let mut t = Tally::new(3);
    for (r, x) in replies {
        t.record(*r, x.clone());
    }
    t.decide(lease_live)
}

/// Blind merge (model variant `current`, 9 steps): R0 accepts P1, a merge then replaces
/// R0's record by P0's earlier claim, R0 accepts P0 too, and both count a majority.
/// The guard defers that merge, so R0 answers P0 "held" and only P1 gets NEW.
#[test]
fn blind_merge_cannot_make_two_majorities() {
    let mut w = World::new();
    let lease = T;
    let r1_p0 = w.propose(1, 0, 1, lease, 0);
    let r0_p1 = w.propose(0, 1, 1, lease, 0);
    assert_eq!(
        (r1_p0.clone(), r0_p1.clone()),
        (Reply::Accepted, Reply::Accepted)
    );
    assert!(matches!(w.merge(0, 1, 0), MergeOutcome::Deferred { .. }));
    let r0_p0 = w.propose(0, 0, 1, lease, 0);
    assert!(matches!(r0_p0, Reply::Held { .. }));
    assert_eq!(decide(&[(0, r0_p0), (1, r1_p0)], true), None);
    let r2_p1 = w.propose(2, 1, 1, lease, 0);
    assert_eq!(decide(&[(0, r0_p1), (2, r2_p1)], true), Some(Verdict::New));
}

/// Non-final replay (model variant `m1-only`, 14 steps): P0's Complete lands at R1 after
/// P0's lease ended, while P1 took the key over and completed with another response.
/// The acceptor refuses the late Complete, and a completion on one region alone is
/// never replayed.
#[test]
fn a_late_or_minority_completion_is_never_replayed() {
    let mut w = World::new();
    assert_eq!(w.propose(1, 0, 1, T, 0), Reply::Accepted);
    assert_eq!(w.propose(2, 0, 1, T, 0), Reply::Accepted);
    // Clock 1: P0's lease is over; P1 proposes generation 2.
    assert_eq!(w.propose(2, 1, 2, 2 * T, T), Reply::Accepted);
    assert!(matches!(
        w.complete(1, 0, 1, T),
        Err(CompleteError::LeaseLost { .. })
    ));
    assert_eq!(w.propose(0, 1, 2, 2 * T, T), Reply::Accepted);
    w.complete(0, 1, 2, T).unwrap();
    w.complete(2, 1, 2, T).unwrap();
    // R1 never replays resp0.
    assert!(!matches!(
        w.local_answer(1, T),
        ReserveOutcome::Replay { ref response, .. } if *response == resp(0)
    ));
    // A completion stored in lease by one region only is not final: IN_FLIGHT, not REPLAY.
    let mut solo = World::new();
    solo.propose(1, 0, 1, T, 0);
    solo.complete(1, 0, 1, 10).unwrap();
    assert!(!solo.regs[1].as_ref().unwrap().is_final);
    assert!(matches!(
        solo.local_answer(1, 20),
        ReserveOutcome::InFlight { .. }
    ));
}

/// Out-of-lease acknowledgement (model variant `m1+C`, 18 steps): a merge brings P0's
/// completion to R0 after P0's lease ended, then P0's own Complete reaches R0 and would
/// count as a second store, acknowledging P0 although P1 completed generation 2.
/// The acceptor answers LEASE_LOST once the lease is over, even for a completion it
/// already holds, so P0's Complete never reaches a majority.
#[test]
fn a_complete_after_the_lease_is_refused_even_if_merged_already() {
    let mut w = World::new();
    assert_eq!(w.propose(1, 0, 1, T, 0), Reply::Accepted);
    assert_eq!(w.propose(2, 0, 1, T, 0), Reply::Accepted);
    w.complete(1, 0, 1, T - 1).unwrap();
    // Clock 2: both leases over; anti-entropy copies R1's completion to R0.
    assert_eq!(w.merge(0, 1, 2 * T), MergeOutcome::Applied);
    assert!(matches!(
        w.complete(0, 0, 1, 2 * T),
        Err(CompleteError::LeaseLost { .. })
    ));
    let r0 = w.regs[0].as_ref().unwrap();
    assert_eq!(
        r0.witnesses.count_ones(),
        1,
        "R0 did not witness it in lease"
    );
    assert!(!r0.is_final);
}

/// Merge losing an Extend (model variant `extend-tie-remote`, 14 steps): R1 stores P0's
/// Extend, then merges R0's older copy of the same claim and forgets the extension;
/// the key is taken over during the acknowledged extended lease. The join keeps the
/// larger lease of one claim, so R1 still holds P0 and answers P1 "held".
#[test]
fn a_merge_never_loses_an_acknowledged_extend() {
    let mut w = World::new();
    assert_eq!(w.propose(0, 0, 1, 2 * T, T), Reply::Accepted);
    assert_eq!(w.propose(1, 0, 1, 2 * T, T), Reply::Accepted);
    assert!(w.extend(1, 0, 1, 3 * T, T));
    w.merge(1, 0, T);
    assert!(w.extend(0, 0, 1, 3 * T, T));
    assert_eq!(w.regs[1].as_ref().unwrap().lease_expires_ms, 3 * T);
    // Clock 2: P1 proposes generation 2; R1 still holds P0's live lease.
    let r1 = w.propose(1, 1, 2, 3 * T, 2 * T);
    let r2 = w.propose(2, 1, 2, 3 * T, 2 * T);
    assert!(matches!(r1, Reply::Held { .. }));
    assert_eq!(decide(&[(1, r1), (2, r2)], true), None);
}

/// NEW on the local accept alone (model variant `broken-local`, 6 steps) is what the
/// proposer must never do: one accept is not a decision.
#[test]
fn one_region_alone_never_decides_new() {
    let mut w = World::new();
    let a = w.propose(0, 0, 1, T, 0);
    let b = w.propose(1, 1, 1, T, 0);
    assert_eq!(decide(&[(0, a)], true), None);
    assert_eq!(decide(&[(1, b)], true), None);
}
