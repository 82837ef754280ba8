use super::*;
use crate::{ClaimId, Fingerprint, StoredResponse};
use proptest::prelude::*;

fn claim(n: u8) -> ClaimId {
    ClaimId {
        hlc: u64::from(n),
        region: u16::from(n % 3),
        node: 1,
        nonce: u32::from(n),
    }
}

fn rec(c: u8, gen: u32, phase: Phase, lease: u64) -> Record {
    Record {
        expires_ms: 1_000_000,
        created_ms: 10,
        fingerprint: Fingerprint([1; 32]),
        generation: gen,
        phase,
        claim: claim(c),
        lease_expires_ms: lease,
        attempts: 1,
        last_attempt_ms: 10,
        first_attempt_ms: 0,
        witnesses: 0,
        is_final: false,
        response: (phase == Phase::Completed).then(|| StoredResponse {
            status: 200,
            headers: vec![],
            body: vec![c],
        }),
    }
}

fn arb_record() -> impl Strategy<Value = Record> {
    (
        (0u8..3, 1u32..4, 0u8..3, 0u64..6),
        (0u64..5, 0u64..5, 0u8..2, 0u32..8),
        (any::<bool>(), 0u32..4, 0u64..4, 0u64..3),
    )
        .prop_map(
            |((c, gen, ph, lease), (exp, created, fpb, wit), (fin, att, last, first))| {
                let phase = [Phase::Reserved, Phase::Released, Phase::Completed][ph as usize];
                let mut r = rec(c, gen, phase, lease * 10);
                r.expires_ms = 20 + exp * 10;
                r.created_ms = created;
                r.fingerprint = Fingerprint([fpb; 32]);
                r.witnesses = wit;
                r.is_final = fin;
                r.attempts = att;
                r.last_attempt_ms = last;
                r.first_attempt_ms = first;
                r
            },
        )
}

fn arb_opt() -> impl Strategy<Value = Option<Record>> {
    proptest::option::of(arb_record())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn a_change_to_any_one_replicated_field_is_a_replicated_change(a in arb_record()) {
        let changes: [fn(&mut Record); 10] = [
            |r| r.expires_ms += 1,
            |r| r.created_ms += 1,
            |r| r.fingerprint.0[0] ^= 1,
            |r| r.generation += 1,
            |r| r.phase = if r.phase == Phase::Released { Phase::Reserved } else { Phase::Released },
            |r| r.claim.nonce ^= 1,
            |r| r.lease_expires_ms += 1,
            |r| r.witnesses ^= 1,
            |r| r.is_final = !r.is_final,
            |r| r.response = if r.response.is_some() { None } else { Some(StoredResponse::default()) },
        ];
        for change in changes {
            let mut b = a.clone();
            change(&mut b);
            prop_assert!(!same_replicated(&a, &b), "{:?} vs {:?}", a, b);
            prop_assert!(replicated_change(Some(&a), &b));
        }
    }

    #[test]
    fn same_replicated_is_equality_of_digest_bytes(a in arb_record(), b in arb_record()) {
        prop_assert_eq!(same_replicated(&a, &b), digest_bytes(&a) == digest_bytes(&b));
        prop_assert!(same_replicated(&a, &a));
        let mut bookkept = a.clone();
        bookkept.attempts += 1;
        bookkept.last_attempt_ms += 1;
        prop_assert!(same_replicated(&a, &bookkept));
    }

    /// The CRDT laws of the record join, through `crdts::CvRDT` (no retention).
    #[test]
    fn the_record_is_a_cvrdt(a in arb_record(), b in arb_record(), c in arb_record()) {
        use crdts::CvRDT;
        let merged = |x: &Record, y: &Record| {
            let mut m = x.clone();
            prop_assert!(m.validate_merge(y).is_ok());
            m.merge(y.clone());
            Ok(m)
        };
        prop_assert_eq!(merged(&a, &b)?, merged(&b, &a)?);
        prop_assert_eq!(merged(&merged(&a, &b)?, &c)?, merged(&a, &merged(&b, &c)?)?);
        prop_assert_eq!(merged(&a, &a)?, a.clone());
        // The join is an upper bound: merging either side in again changes nothing.
        let ab = merged(&a, &b)?;
        prop_assert_eq!(merged(&ab, &a)?, ab.clone());
        prop_assert_eq!(merged(&ab, &b)?, ab);
    }

    #[test]
    fn join_is_commutative(a in arb_opt(), b in arb_opt(), now in 0u64..80) {
        prop_assert_eq!(join_at(now, a.as_ref(), b.as_ref()), join_at(now, b.as_ref(), a.as_ref()));
    }

    #[test]
    fn join_is_associative(a in arb_opt(), b in arb_opt(), c in arb_opt(), now in 0u64..80) {
        let ab = join_at(now, a.as_ref(), b.as_ref());
        let bc = join_at(now, b.as_ref(), c.as_ref());
        prop_assert_eq!(
            join_at(now, ab.as_ref(), c.as_ref()),
            join_at(now, a.as_ref(), bc.as_ref())
        );
    }

    #[test]
    fn join_is_idempotent(a in arb_opt(), now in 0u64..80) {
        let live = a.clone().filter(|r| !r.is_expired(now));
        prop_assert_eq!(join_at(now, a.as_ref(), a.as_ref()), live);
    }

    #[test]
    fn completed_is_never_hidden_and_expired_is_absent(a in arb_record(), b in arb_record(), now in 0u64..80) {
        match join_at(now, Some(&a), Some(&b)) {
            None => prop_assert!(a.is_expired(now) && b.is_expired(now)),
            Some(j) => {
                prop_assert!(!j.is_expired(now));
                let completed = [&a, &b].iter().any(|r| !r.is_expired(now) && r.phase == Phase::Completed);
                prop_assert_eq!(j.phase == Phase::Completed, completed);
            }
        }
    }

    /// Merges in any order, repeated, reach one record in every region (convergence),
    /// once no lease is live (the guard only defers, it never decides differently).
    #[test]
    fn guarded_merges_converge_after_leases(rs in proptest::collection::vec(arb_record(), 1..5), order in proptest::collection::vec((0usize..5, 0usize..5), 0..30)) {
        let now = 60; // every lease generated is below 60
        let mut regions: Vec<Option<Record>> = rs.iter().cloned().map(Some).collect();
        let n = regions.len();
        let apply = |dst: usize, src: usize, regions: &mut Vec<Option<Record>>| {
            if let Some(r) = regions[src].clone() {
                let m = merge(regions[dst].as_ref(), &r, now, 0, true);
                let deferred = matches!(m.outcome, MergeOutcome::Deferred { .. });
                prop_assert!(!deferred, "deferred after every lease");
                if let Some(w) = m.write { regions[dst] = Some(w); }
            }
            Ok(())
        };
        for (d, s) in order { apply(d % n, s % n, &mut regions)?; }
        for _ in 0..2 { for d in 0..n { for s in 0..n { apply(d, s, &mut regions)?; } } }
        let want = rs.iter().fold(None, |acc: Option<Record>, r| join_at(now, acc.as_ref(), Some(r)));
        for r in &regions {
            let visible = r.as_ref().filter(|r| !r.is_expired(now));
            prop_assert_eq!(visible.map(digest_bytes), want.as_ref().map(digest_bytes));
        }
    }
}

#[test]
fn the_larger_lease_of_one_claim_survives() {
    let a = rec(1, 1, Phase::Reserved, 100);
    let mut b = a.clone();
    b.lease_expires_ms = 300;
    assert_eq!(join(&a, &b).lease_expires_ms, 300);
    assert_eq!(join(&b, &a).lease_expires_ms, 300);
}

#[test]
fn guard_never_replaces_a_live_reservation_of_another_claim() {
    let local = rec(2, 1, Phase::Reserved, 500);
    let remote = rec(1, 1, Phase::Reserved, 500);
    let m = merge(Some(&local), &remote, 100, 50, true);
    assert_eq!(
        m.outcome,
        MergeOutcome::Deferred {
            retry_after_ms: 450
        }
    );
    // After both leases (and the margin) the earliest claim wins everywhere.
    let m = merge(Some(&local), &remote, 600, 50, true);
    assert_eq!(m.outcome, MergeOutcome::Applied);
    assert_eq!(m.write.unwrap().claim, claim(1));
    // REGIONAL mode merges at once and reports the overturned decision.
    let m = merge(Some(&local), &remote, 100, 50, false);
    assert_eq!(overturned(&m), Some(local.claim));
    assert_eq!(m.write.unwrap().claim, claim(1));
    // The other way round the local grant wins: nothing is overturned here (the other
    // region counts it when this copy reaches it).
    let m = merge(Some(&remote), &local, 100, 50, false);
    assert_eq!(m.conflict, None);
}

/// The claim a merge reports it overturned (REGIONAL), checking the two agree.
fn overturned(m: &Merged) -> Option<ClaimId> {
    assert_eq!(
        m.conflict == Some(Conflict::Overturned),
        m.overturned.is_some(),
        "{m:?}"
    );
    m.overturned
}

/// A claim minted at `at_ms`.
fn granted(c: u8, gen: u32, phase: Phase, at_ms: u64, lease_until: u64) -> Record {
    let mut r = rec(c, gen, phase, lease_until);
    r.claim.hlc = crate::Hlc::compose(at_ms, 0);
    r
}

#[test]
fn a_double_grant_is_two_grants_held_at_once_in_any_generation() {
    // Granted in two regions 100 ms apart, both within the other's lease: in one
    // generation or in different ones (a region that had seen an older record).
    let a = granted(1, 1, Phase::Reserved, 1_000, 5_000);
    let b = granted(2, 1, Phase::Reserved, 1_100, 5_100);
    let b3 = granted(2, 3, Phase::Reserved, 1_100, 5_100);
    assert!(double_grant(&a, &b) && double_grant(&b, &a));
    assert!(double_grant(&a, &b3));
    let m = merge(Some(&a), &b3, 2_000, 50, false);
    assert_eq!(overturned(&m), Some(a.claim));
    // A takeover after the lease ended is no double grant; after a completion it is
    // (the later region could not have known it, or it would have replayed it).
    let late = granted(2, 2, Phase::Reserved, 6_000, 9_000);
    assert!(!double_grant(&a, &late));
    assert_eq!(merge(Some(&a), &late, 7_000, 50, false).conflict, None);
    let done = granted(1, 1, Phase::Completed, 1_000, 5_000);
    assert!(double_grant(&done, &late));
    assert_eq!(
        overturned(&merge(Some(&late), &done, 7_000, 50, false)),
        Some(late.claim)
    );
    // Two completions of one generation in REGIONAL mode: a double grant like any
    // other (in GLOBAL mode, `DualCompletion`); the later claim is overturned.
    let b_done = granted(2, 1, Phase::Completed, 1_100, 5_100);
    assert_eq!(
        overturned(&merge(Some(&b_done), &done, 7_000, 50, false)),
        Some(b_done.claim)
    );
    assert_eq!(
        merge(Some(&b_done), &done, 7_000, 50, true).conflict,
        Some(Conflict::DualCompletion)
    );
    // A released grant ran nothing; one claim is never a double grant with itself;
    // GLOBAL merges report none.
    let released = granted(1, 1, Phase::Released, 1_000, 5_000);
    assert!(!double_grant(&released, &b));
    assert!(!double_grant(&a, &a));
    assert_eq!(merge(Some(&a), &b3, 2_000, 50, true).conflict, None);
}

#[test]
fn two_completions_of_one_generation_are_reported() {
    let a = rec(1, 1, Phase::Completed, 0);
    let b = rec(2, 1, Phase::Completed, 0);
    let m = merge(Some(&b), &a, 100, 0, true);
    assert_eq!(m.conflict, Some(Conflict::DualCompletion));
    assert_eq!(m.write.unwrap().claim, claim(1));
}

#[test]
fn witnesses_that_meet_in_a_merge_make_the_completion_final() {
    let mut a = rec(1, 1, Phase::Completed, 0);
    a.witnesses = 0b001;
    let mut b = a.clone();
    b.witnesses = 0b010;
    let mut j = join(&a, &b);
    assert!(!j.is_final);
    settle_finality(&mut j, 3);
    assert!(!j.is_final, "two of five regions are not a majority");
    settle_finality(&mut j, 2);
    assert!(j.is_final);
}

#[test]
fn a_late_copy_of_an_expired_record_is_dropped() {
    let mut r = rec(1, 1, Phase::Completed, 0);
    r.expires_ms = 50;
    assert_eq!(merge(None, &r, 50, 0, true).outcome, MergeOutcome::Expired);
}

#[test]
fn bookkeeping_alone_is_not_a_replicated_change() {
    let a = rec(1, 1, Phase::Reserved, 100);
    let mut b = a.clone();
    b.attempts = 9;
    b.last_attempt_ms = 99;
    assert!(!replicated_change(Some(&a), &b));
    b.lease_expires_ms = 200;
    assert!(replicated_change(Some(&a), &b));
}

mod regressions;
