use super::*;
use proptest::prelude::*;

const SKEW: u64 = 500;
const DAY: u64 = 24 * 3600 * 1000;

fn fp(b: u8) -> Fingerprint {
    Fingerprint([b; 32])
}

fn claim(n: u32) -> ClaimId {
    ClaimId {
        hlc: n as u64,
        region: 0,
        node: 1,
        nonce: n,
    }
}

fn args(now: u64, f: u8, c: u32) -> ReserveArgs {
    ReserveArgs {
        now_ms: now,
        skew_margin_ms: SKEW,
        fingerprint: fp(f),
        claim: claim(c),
        generation: None,
        lease_ms: 1_000,
        lease_until_ms: None,
        retention_ms: 30 * DAY,
        first_attempt_ms: 0,
        region_bit: 1,
    }
}

fn resp(body: &str) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![],
        body: body.as_bytes().to_vec(),
    }
}

fn new_fence(d: &Decision) -> Fence {
    match &d.outcome {
        ReserveOutcome::New { fence, .. } => *fence,
        other => panic!("expected NEW, got {other:?}"),
    }
}

#[test]
fn first_reserve_is_new_then_in_flight_then_replay() {
    let d = reserve(None, &args(1_000, 1, 1));
    let fence = new_fence(&d);
    assert_eq!(fence.generation, 1);
    assert_eq!(d.attempt, 1);
    let rec = d.write.unwrap();

    let d2 = reserve(Some(&rec), &args(1_200, 1, 2));
    assert!(
        matches!(d2.outcome, ReserveOutcome::InFlight { holder, retry_after_ms } if holder == fence && retry_after_ms == 2_000 + SKEW - 1_200)
    );
    assert_eq!(d2.attempt, 2);
    assert_eq!(d2.since_previous_ms, Some(200));
    let rec = d2.write.unwrap();

    let done = complete(Some(&rec), fence, resp("charged"), 1_500, 1, 1)
        .unwrap()
        .unwrap();
    let d3 = reserve(Some(&done), &args(1_700, 1, 3));
    assert_eq!(
        d3.outcome,
        ReserveOutcome::Replay {
            fence,
            response: resp("charged")
        }
    );
    assert_eq!(d3.attempt, 3);
}

#[test]
fn mismatch_wins_over_in_flight_and_replay() {
    let rec = reserve(None, &args(1_000, 1, 1)).write.unwrap();
    let d = reserve(Some(&rec), &args(1_100, 2, 2));
    assert!(matches!(d.outcome, ReserveOutcome::Mismatch { stored } if stored == fp(1)));
    assert!(
        d.write.is_none(),
        "a mismatching request must not touch the record"
    );
    let done = complete(Some(&rec), rec.fence(), resp("x"), 1_200, 1, 1)
        .unwrap()
        .unwrap();
    assert!(matches!(
        reserve(Some(&done), &args(90_000, 2, 3)).outcome,
        ReserveOutcome::Mismatch { .. }
    ));
}

#[test]
fn release_then_new_with_next_generation() {
    let rec = reserve(None, &args(1_000, 1, 1)).write.unwrap();
    let rel = release(Some(&rec), rec.fence(), 1_100).unwrap().unwrap();
    assert_eq!(rel.phase, Phase::Released);
    let d = reserve(Some(&rel), &args(1_200, 1, 2));
    let f = new_fence(&d);
    assert_eq!(f.generation, 2);
    assert!(matches!(
        d.outcome,
        ReserveOutcome::New { takeover: None, .. }
    ));
    // A released key may be reserved for a different request.
    let d = reserve(Some(&rel), &args(1_200, 9, 3));
    assert_eq!(new_fence(&d).generation, 2);
}

#[test]
fn lease_expiry_gives_takeover_and_old_fence_is_lost() {
    let rec = reserve(None, &args(1_000, 1, 1)).write.unwrap();
    let old = rec.fence();
    // Within lease + skew margin: still held.
    assert!(matches!(
        reserve(Some(&rec), &args(2_000 + SKEW - 1, 1, 2)).outcome,
        ReserveOutcome::InFlight { .. }
    ));
    let d = reserve(Some(&rec), &args(2_000 + SKEW, 1, 2));
    match d.outcome {
        ReserveOutcome::New {
            fence, takeover, ..
        } => {
            assert_eq!(fence.generation, 2);
            assert_eq!(takeover, Some(old));
        }
        other => panic!("{other:?}"),
    }
    let new = d.write.unwrap();
    assert!(matches!(
        complete(Some(&new), old, resp("late"), 2_600, 1, 1),
        Err(CompleteError::LeaseLost { current: Some(f) }) if f == new.fence()
    ));
    // A Complete after its own lease ended is refused even with no takeover.
    assert!(matches!(
        complete(Some(&rec), old, resp("late"), 2_000, 1, 1),
        Err(CompleteError::LeaseLost { .. })
    ));
}

#[test]
fn complete_is_idempotent_within_lease() {
    let rec = reserve(None, &args(1_000, 1, 1)).write.unwrap();
    let done = complete(Some(&rec), rec.fence(), resp("a"), 1_100, 1, 1)
        .unwrap()
        .unwrap();
    assert_eq!(
        complete(Some(&done), rec.fence(), resp("a"), 1_200, 1, 1),
        Ok(None)
    );
    assert_eq!(
        release(Some(&done), rec.fence(), 1_300),
        Err(ReleaseError::AlreadyCompleted)
    );
}

#[test]
fn extend_only_live_lease_and_never_shortens() {
    let rec = reserve(None, &args(1_000, 1, 1)).write.unwrap();
    let ext = extend(Some(&rec), rec.fence(), 5_000, None, 1_500).unwrap();
    assert_eq!(ext.lease_expires_ms, 6_500);
    let same = extend(Some(&ext), rec.fence(), 100, None, 1_600).unwrap();
    assert_eq!(same.lease_expires_ms, 6_500);
    assert!(extend(Some(&ext), rec.fence(), 100, None, 6_500).is_err());
    let other = Fence {
        generation: 1,
        claim: claim(77),
    };
    assert!(extend(Some(&ext), other, 100, None, 1_600).is_err());
}

#[test]
fn expired_by_retention_reads_as_absent() {
    let mut a = args(1_000, 1, 1);
    a.retention_ms = 10_000;
    let rec = reserve(None, &a).write.unwrap();
    let done = complete(Some(&rec), rec.fence(), resp("a"), 1_100, 1, 1)
        .unwrap()
        .unwrap();
    let mut later = args(11_000, 2, 2);
    later.retention_ms = 10_000;
    let d = reserve(Some(&done), &later);
    assert_eq!(new_fence(&d).generation, 1);
    assert_eq!(
        complete(Some(&done), rec.fence(), resp("a"), 11_000, 1, 1),
        Err(CompleteError::NotFound)
    );
}

#[test]
fn too_old_first_attempt_is_never_new_but_may_replay() {
    let mut a = args(40 * DAY, 1, 1);
    a.first_attempt_ms = 40 * DAY - 30 * DAY + 1; // inside the margin
    let d = reserve(None, &a);
    assert!(matches!(d.outcome, ReserveOutcome::TooOld { .. }));
    assert!(d.write.is_none());
    a.first_attempt_ms = 40 * DAY - 29 * DAY + 3_600_000;
    assert!(matches!(
        reserve(None, &a).outcome,
        ReserveOutcome::New { .. }
    ));
}

#[test]
fn proposed_generation_must_exceed_released_one() {
    let rec = reserve(None, &args(1_000, 1, 1)).write.unwrap();
    let rel = release(Some(&rec), rec.fence(), 1_100).unwrap().unwrap();
    let mut a = args(1_200, 1, 2);
    a.generation = Some(1);
    assert_eq!(
        reserve(Some(&rel), &a).outcome,
        ReserveOutcome::StaleGen { stored: 1 }
    );
    a.generation = Some(2);
    assert_eq!(new_fence(&reserve(Some(&rel), &a)).generation, 2);
}

#[derive(Clone, Debug)]
enum Op {
    Reserve { fp: u8 },
    Complete { which: usize },
    Release { which: usize },
    Extend { which: usize },
    Tick { ms: u64 },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..2).prop_map(|fp| Op::Reserve { fp }),
        1 => (0usize..8).prop_map(|which| Op::Complete { which }),
        1 => (0usize..8).prop_map(|which| Op::Release { which }),
        1 => (0usize..8).prop_map(|which| Op::Extend { which }),
        2 => (1u64..2_000).prop_map(|ms| Op::Tick { ms }),
    ]
}

proptest! {
    /// Over any sequence of calls on one key: no two grants with live leases at once,
    /// no NEW after a completion, replays return exactly the stored response, MISMATCH
    /// only for another fingerprint, generations strictly increase.
    #[test]
    fn single_region_safety(ops in proptest::collection::vec(arb_op(), 1..60)) {
        let mut now = 1_000u64;
        let mut rec: Option<Record> = None;
        // Every grant: (fence, fingerprint, ended?)
        let mut grants: Vec<(Fence, u8)> = vec![];
        let mut completed: Option<(Fence, u8, StoredResponse)> = None;
        let mut next_claim = 1u32;
        for op in ops {
            match op {
                Op::Tick { ms } => now += ms,
                Op::Reserve { fp: f } => {
                    next_claim += 1;
                    let d = reserve(rec.as_ref(), &args(now, f, next_claim));
                    match &d.outcome {
                        ReserveOutcome::New { fence, .. } => {
                            prop_assert!(completed.is_none(), "NEW after a completion");
                            if let Some(r) = &rec {
                                prop_assert!(fence.generation > r.generation);
                                prop_assert!(!(r.phase == Phase::Reserved
                                    && now < r.lease_expires_ms + SKEW), "two live grants");
                            }
                            grants.push((*fence, f));
                        }
                        ReserveOutcome::Replay { fence, response } => {
                            let (cf, cfp, cresp) = completed.clone().expect("replay without completion");
                            prop_assert_eq!(*fence, cf);
                            prop_assert_eq!(cfp, f);
                            prop_assert_eq!(response, &cresp);
                        }
                        ReserveOutcome::Mismatch { stored } => {
                            prop_assert_ne!(*stored, fp(f));
                        }
                        ReserveOutcome::InFlight { .. } => {}
                        other => prop_assert!(false, "unexpected {:?}", other),
                    }
                    if let Some(w) = d.write { rec = Some(w); }
                }
                Op::Complete { which } => {
                    if let Some(&(fence, f)) = grants.get(which % grants.len().max(1)) {
                        let body = format!("resp-{}", fence.generation);
                        if let Ok(w) = complete(rec.as_ref(), fence, resp(&body), now, 1, 1) {
                            prop_assert!(completed.is_none() || completed.as_ref().unwrap().0 == fence);
                            if let Some(w) = w {
                                completed = Some((fence, f, resp(&body)));
                                rec = Some(w);
                            }
                        }
                    }
                }
                Op::Release { which } => {
                    if let Some(&(fence, _)) = grants.get(which % grants.len().max(1)) {
                        if let Ok(Some(w)) = release(rec.as_ref(), fence, now) {
                            rec = Some(w);
                        }
                    }
                }
                Op::Extend { which } => {
                    if let Some(&(fence, _)) = grants.get(which % grants.len().max(1)) {
                        if let Ok(w) = extend(rec.as_ref(), fence, 1_500, None, now) {
                            rec = Some(w);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn a_proposal_on_an_empty_region_keeps_its_generation() {
    let mut a = args(1_000, 1, 7);
    a.generation = Some(3);
    a.lease_until_ms = Some(4_000);
    let d = reserve(None, &a);
    let fence = new_fence(&d);
    assert_eq!(fence.generation, 3);
    let rec = d.write.unwrap();
    assert_eq!(rec.lease_expires_ms, 4_000);
    // So the holder's Complete, with that fence, is accepted there too.
    assert!(complete(Some(&rec), fence, resp("ok"), 2_000, 1, 2).is_ok());
}

#[test]
fn another_requests_first_attempt_does_not_make_a_key_too_old() {
    // Request A (fingerprint 1), 2-day retention, first tried at once, then released.
    let mut a = args(1, 1, 1);
    a.retention_ms = 2 * DAY;
    a.first_attempt_ms = 1;
    let d = reserve(None, &a);
    let fence = new_fence(&d);
    let held = d.write.unwrap();
    let released = release(Some(&held), fence, 2).unwrap().unwrap();
    // Near the end of the record's life, request B (fingerprint 2) reuses the key,
    // first tried just now. A's age is not B's: NEW, storing B's own first attempt.
    let now = 2 * DAY - DAY / 100;
    let mut b = args(now, 2, 2);
    b.first_attempt_ms = now - 10;
    let d = reserve(Some(&released), &b);
    assert!(
        matches!(d.outcome, ReserveOutcome::New { .. }),
        "{:?}",
        d.outcome
    );
    assert_eq!(d.write.unwrap().first_attempt_ms, now - 10);
}

#[test]
fn too_old_is_judged_by_the_retention_the_key_was_stored_with() {
    // The key was stored with a 2-day retention, then released.
    let mut first = args(DAY, 1, 1);
    first.retention_ms = 2 * DAY;
    first.first_attempt_ms = DAY;
    let d = reserve(None, &first);
    let fence = new_fence(&d);
    let held = d.write.unwrap();
    let released = release(Some(&held), fence, DAY + 1).unwrap().unwrap();
    // A retry that asks for 30 days, first tried 1.99 days ago: past the 2-day
    // retention's limit (copies elsewhere may already be gone), although well inside 30.
    let mut retry = args(DAY + 2 * DAY - DAY / 100, 1, 2);
    retry.first_attempt_ms = DAY;
    assert!(matches!(
        reserve(Some(&released), &retry).outcome,
        ReserveOutcome::TooOld { .. }
    ));
}

/// A final notice answers whether the completion is final there: a record without it
/// (absent, still reserved, or another grant) must never count as told.
#[test]
fn a_final_notice_answers_whether_the_completion_is_final_there() {
    let rec = reserve(None, &args(1_000, 1, 1)).write.unwrap();
    let fence = rec.fence();
    assert_eq!(final_here(None, fence, 1_100), Err(CompleteError::NotFound));
    assert!(matches!(
        final_here(Some(&rec), fence, 1_100),
        Err(CompleteError::LeaseLost { .. })
    ));
    // Not final yet (quorum 2, one witness), then made final by the notice.
    let done = complete(Some(&rec), fence, resp("a"), 1_100, 1, 2)
        .unwrap()
        .unwrap();
    assert!(!done.is_final);
    assert_eq!(final_here(Some(&done), fence, 1_200), Ok(()));
    assert!(finalize(Some(&done), fence, 1_200).unwrap().is_final);
    let other = Fence {
        generation: fence.generation + 1,
        ..fence
    };
    assert!(matches!(
        final_here(Some(&done), other, 1_200),
        Err(CompleteError::LeaseLost { .. })
    ));
    // Through the command layer, as a peer sees it.
    let cmd = crate::Command {
        now_ms: 1_300,
        skew_margin_ms: SKEW,
        claim: claim(9),
        region_bit: 1,
        key: crate::Key::default(),
        op: crate::command::Op::Final { fence },
    };
    assert_eq!(
        crate::command::apply(None, &cmd).0,
        crate::CommandResult::Complete(Err(CompleteError::NotFound))
    );
}

fn wd(now: u64, c: u32, generation: u32) -> WithdrawArgs {
    WithdrawArgs {
        claim: claim(c),
        generation,
        fingerprint: fp(1),
        retention_ms: 30 * DAY,
        now_ms: now,
        skew_margin_ms: SKEW,
    }
}

fn proposal(now: u64, c: u32, generation: u32) -> ReserveArgs {
    let mut a = args(now, 1, c);
    a.generation = Some(generation);
    a.lease_until_ms = Some(now + 1_000);
    a
}

#[test]
fn a_withdraw_that_overtakes_its_propose_leaves_a_tombstone_the_propose_cannot_take() {
    // The withdraw of claim 1 at generation 3 arrives first, on an empty region.
    let tomb = withdraw(None, &wd(1_000, 1, 3)).expect("a tombstone");
    assert_eq!(
        (tomb.phase, tomb.claim, tomb.generation),
        (Phase::Released, claim(1), 3)
    );
    assert_eq!(tomb.expires_ms, 1_000 + 30 * DAY, "kept for the retention");
    // Its Propose, still on the wire, comes later: refused at every generation it had.
    for g in 1..=3 {
        assert_eq!(
            reserve(Some(&tomb), &proposal(1_010, 1, g)).outcome,
            ReserveOutcome::StaleGen { stored: 3 }
        );
    }
    // Another proposer above it takes the key at once.
    assert_eq!(
        new_fence(&reserve(Some(&tomb), &proposal(1_020, 2, 4))).claim,
        claim(2)
    );
    // A relayed accept of the withdrawn claim does not bring it back.
    let accepted = reserve(None, &proposal(1_000, 1, 3)).write.unwrap();
    let m = crate::merge::merge(Some(&tomb), &accepted, 1_030, SKEW, true);
    let merged = m.write.unwrap_or(tomb);
    assert_eq!(
        (merged.phase, merged.claim, merged.generation),
        (Phase::Released, claim(1), 3)
    );
    assert_eq!(
        reserve(Some(&merged), &proposal(1_040, 1, 3)).outcome,
        ReserveOutcome::StaleGen { stored: 3 }
    );
}

#[test]
fn a_withdrawn_accept_is_released_at_the_highest_generation_proposed() {
    // Accepted at generation 2; the same claim was also proposed at 3 (a StaleGen round
    // elsewhere) before it was withdrawn.
    let rec = reserve(None, &proposal(1_000, 1, 2)).write.unwrap();
    let w = withdraw(Some(&rec), &wd(1_100, 1, 3)).unwrap();
    assert_eq!((w.phase, w.generation), (Phase::Released, 3));
    assert_eq!(
        reserve(Some(&w), &proposal(1_200, 1, 3)).outcome,
        ReserveOutcome::StaleGen { stored: 3 }
    );
    // Withdrawing again changes nothing.
    assert_eq!(withdraw(Some(&w), &wd(1_300, 1, 3)), None);
}

#[test]
fn a_withdraw_never_touches_a_grant_or_a_completion_of_another_claim() {
    // Another claim's live lease, at a lower generation: left alone.
    let live = reserve(None, &proposal(1_000, 2, 1)).write.unwrap();
    assert_eq!(withdraw(Some(&live), &wd(1_100, 1, 2)), None);
    // Within the skew margin after its lease: still left alone.
    assert_eq!(withdraw(Some(&live), &wd(2_000 + SKEW - 1, 1, 2)), None);
    // Its lease over: a late Propose of claim 1 would take it, so the tombstone does.
    let t = withdraw(Some(&live), &wd(2_000 + SKEW, 1, 2)).unwrap();
    assert_eq!(
        (t.phase, t.claim, t.generation),
        (Phase::Released, claim(1), 2)
    );
    assert_eq!(t.expires_ms, live.expires_ms, "the key's retention is kept");
    // Another claim at the same or a higher generation: rule 5 refuses claim 1 anyway.
    let high = reserve(None, &proposal(1_000, 2, 5)).write.unwrap();
    assert_eq!(withdraw(Some(&high), &wd(9_000, 1, 5)), None);
    // A completion: never.
    let done = complete(Some(&live), live.fence(), resp("ok"), 1_100, 1, 1)
        .unwrap()
        .unwrap();
    assert_eq!(withdraw(Some(&done), &wd(9_000, 1, 7)), None);
}

#[test]
fn a_withdraw_written_before_tombstones_only_takes_an_accept_back() {
    let mut old = wd(1_000, 1, 0);
    old.retention_ms = 0;
    assert_eq!(withdraw(None, &old), None);
    let rec = reserve(None, &proposal(1_000, 1, 2)).write.unwrap();
    let w = withdraw(Some(&rec), &old).unwrap();
    assert_eq!((w.phase, w.generation), (Phase::Released, 2));
}
