use super::*;
use crate::engine::MAX_CONTENTION_ROUNDS;
use crate::ClaimId;

const ROUND: u64 = 1_500;

fn cfg(regions: usize, rule: Rule) -> EngineConfig {
    EngineConfig {
        regions,
        local: Some(0),
        round_timeout_ms: ROUND,
        max_stale_retries: 2,
        max_contention_rounds: MAX_CONTENTION_ROUNDS,
        rule,
    }
}

fn fence(n: u32) -> Fence {
    Fence {
        generation: 3,
        claim: ClaimId {
            hlc: 5,
            region: 1,
            node: 1,
            nonce: n,
        },
    }
}

fn response() -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: Vec::new(),
        body: b"charged".to_vec(),
    }
}

fn complete(regions: usize, rule: Rule) -> (HolderEngine, Vec<Command<HolderAnswer>>) {
    let mut e = HolderEngine::new(
        cfg(regions, rule),
        HolderCall::Complete {
            fence: fence(1),
            response: response(),
        },
    );
    let cmds = e.start(1_000);
    (e, cmds)
}

fn release() -> HolderEngine {
    let mut e = HolderEngine::new(
        cfg(3, Rule::Majority),
        HolderCall::Release { fence: fence(1) },
    );
    e.start(1_000);
    e
}

fn extend() -> (HolderEngine, Vec<Command<HolderAnswer>>) {
    let mut e = HolderEngine::new(
        cfg(3, Rule::Majority),
        HolderCall::Extend {
            fence: fence(1),
            lease_ms: 30_000,
            until_ms: 31_000,
        },
    );
    let cmds = e.start(1_000);
    (e, cmds)
}

const DONE: CommandResult = CommandResult::Complete(Ok(()));

fn lost_lease() -> CommandResult {
    CommandResult::Complete(Err(CompleteError::LeaseLost {
        current: Some(fence(2)),
    }))
}

fn answer(cmds: &[Command<HolderAnswer>]) -> Option<HolderAnswer> {
    cmds.iter().find_map(|c| match c {
        Command::Answer(a) => Some(a.clone()),
        _ => None,
    })
}

fn sent(cmds: &[Command<HolderAnswer>]) -> Option<(u32, Op)> {
    cmds.iter().find_map(|c| match c {
        Command::Send { round, op } => Some((*round, op.clone())),
        _ => None,
    })
}

fn timer(cmds: &[Command<HolderAnswer>]) -> Option<(u32, u64)> {
    cmds.iter().find_map(|c| match c {
        Command::Timer { token, at_ms } => Some((*token, *at_ms)),
        _ => None,
    })
}

fn notified(cmds: &[Command<HolderAnswer>]) -> bool {
    cmds.iter()
        .any(|c| matches!(c, Command::Notify { op: Op::Final { fence: f } } if *f == fence(1)))
}

const STORED: HolderAnswer = HolderAnswer::Stored {
    lease_expires_ms: None,
};

#[test]
fn a_complete_goes_to_every_region_with_a_majority_quorum_and_a_round_timer() {
    let (_, cmds) = complete(5, Rule::Majority);
    let (round, op) = sent(&cmds).expect("the completion is sent");
    assert_eq!(round, 1);
    assert_eq!(
        op,
        Op::Complete {
            fence: fence(1),
            response: response(),
            quorum: 3
        }
    );
    assert_eq!(timer(&cmds).map(|t| t.1), Some(1_000 + ROUND));
    assert_eq!(answer(&cmds), None);
}

#[test]
fn a_complete_a_majority_stored_is_acknowledged_after_a_majority_confirms_it_final() {
    let (mut e, _) = complete(3, Rule::Majority);
    assert!(e.on_result(1, 0, Some(&DONE), 1_010).is_empty());
    // A majority stored it: the final notice goes out, with a third of a round to wait.
    let cmds = e.on_result(1, 2, Some(&DONE), 1_020);
    assert_eq!(
        answer(&cmds),
        None,
        "not acknowledged before finality is told"
    );
    assert_eq!(sent(&cmds), Some((2, Op::Final { fence: fence(1) })));
    assert_eq!(timer(&cmds).map(|t| t.1), Some(1_020 + ROUND / 3));
    // The last Complete reply belongs to the first round: ignored.
    assert!(e.on_result(1, 1, Some(&DONE), 1_030).is_empty());
    assert!(e.on_result(2, 1, Some(&DONE), 1_040).is_empty());
    let cmds = e.on_result(2, 0, Some(&DONE), 1_050);
    assert_eq!(answer(&cmds), Some(STORED));
    assert!(notified(&cmds), "every region is told once more");
    assert!(e.is_done());
    assert!(e.on_result(2, 2, Some(&DONE), 1_060).is_empty());
}

#[test]
fn a_final_notice_nobody_confirms_in_time_still_acknowledges_the_final_completion() {
    let (mut e, _) = complete(3, Rule::Majority);
    e.on_result(1, 0, Some(&DONE), 1_010);
    let cmds = e.on_result(1, 1, Some(&DONE), 1_020);
    let (token, _) = timer(&cmds).expect("a timer for the notice");
    // A region whose copy is not final yet does not confirm.
    assert!(e
        .on_result(
            2,
            0,
            Some(&CommandResult::Complete(Err(CompleteError::NotFound))),
            1_030
        )
        .is_empty());
    let cmds = e.on_timer(token, 1_520);
    assert_eq!(answer(&cmds), Some(STORED));
    assert!(notified(&cmds));
}

#[test]
fn a_final_notice_that_can_no_longer_reach_a_majority_acknowledges_at_once() {
    let (mut e, _) = complete(3, Rule::Majority);
    e.on_result(1, 0, Some(&DONE), 1_010);
    e.on_result(1, 1, Some(&DONE), 1_020);
    assert!(e.on_result(2, 0, None, 1_030).is_empty());
    let cmds = e.on_result(2, 1, None, 1_040);
    assert_eq!(answer(&cmds), Some(STORED));
}

#[test]
fn a_complete_one_region_stored_is_not_acknowledged_when_the_round_times_out() {
    let (mut e, cmds) = complete(3, Rule::Majority);
    let (token, _) = timer(&cmds).expect("a round timer");
    e.on_result(1, 0, Some(&DONE), 1_010);
    assert!(
        e.on_timer(token + 1, 2_000).is_empty(),
        "a stale timer counts for nothing"
    );
    let cmds = e.on_timer(token, 2_500);
    assert_eq!(
        answer(&cmds),
        Some(HolderAnswer::Unknown {
            answered: 1,
            regions: 3
        })
    );
    assert!(!notified(&cmds), "not final: no final notice");
}

#[test]
fn a_lease_lost_refusal_answers_once_no_majority_can_store_it() {
    let (mut e, _) = complete(3, Rule::Majority);
    assert!(e.on_result(1, 0, Some(&lost_lease()), 1_010).is_empty());
    // Two regions may still store it within the lease: wait for them.
    let cmds = e.on_result(1, 1, None, 1_020);
    assert_eq!(
        answer(&cmds),
        Some(HolderAnswer::Refused(Refusal::LeaseLost {
            current: Some(fence(2))
        }))
    );
}

#[test]
fn a_majority_that_stores_it_wins_over_a_region_that_refused() {
    let (mut e, _) = complete(3, Rule::Majority);
    e.on_result(1, 0, Some(&lost_lease()), 1_010);
    e.on_result(1, 1, Some(&DONE), 1_020);
    let cmds = e.on_result(1, 2, Some(&DONE), 1_030);
    assert_eq!(sent(&cmds), Some((2, Op::Final { fence: fence(1) })));
}

#[test]
fn not_found_needs_a_majority_of_regions_without_the_record() {
    let nf = CommandResult::Complete(Err(CompleteError::NotFound));
    let (mut e, _) = complete(3, Rule::Majority);
    e.on_result(1, 0, Some(&nf), 1_010);
    let cmds = e.on_result(1, 1, Some(&nf), 1_020);
    assert_eq!(
        answer(&cmds),
        Some(HolderAnswer::Refused(Refusal::NotFound))
    );

    let (mut e, _) = complete(3, Rule::Majority);
    e.on_result(1, 0, Some(&nf), 1_010);
    let cmds = e.on_result(1, 1, None, 1_020);
    assert_eq!(
        answer(&cmds),
        Some(HolderAnswer::Unknown {
            answered: 1,
            regions: 3
        }),
        "one region without the record says nothing of the others"
    );
}

#[test]
fn a_reply_of_another_kind_counts_as_a_failed_call() {
    let (mut e, _) = complete(3, Rule::Majority);
    e.on_result(1, 0, Some(&CommandResult::Release(Ok(()))), 1_010);
    assert_eq!(e.awaiting(0), None, "that region's reply is in");
    let cmds = e.on_result(1, 1, Some(&CommandResult::Done), 1_020);
    assert_eq!(
        answer(&cmds),
        Some(HolderAnswer::Unknown {
            answered: 0,
            regions: 3
        })
    );
}

#[test]
fn the_broken_early_ack_rule_acknowledges_after_one_store() {
    let (mut e, _) = complete(3, Rule::BrokenEarlyAck);
    let cmds = e.on_result(1, 0, Some(&DONE), 1_010);
    assert_eq!(sent(&cmds), Some((2, Op::Final { fence: fence(1) })));
    // The final notice still waits for a majority (the rule breaks only the store).
    assert!(e.on_result(2, 0, Some(&DONE), 1_020).is_empty());
    assert_eq!(answer(&e.on_result(2, 1, Some(&DONE), 1_030)), Some(STORED));
}

#[test]
fn abandoning_a_final_completion_still_sends_its_notice_and_nothing_else_does() {
    let (mut e, _) = complete(3, Rule::Majority);
    assert!(e.abandon().is_empty(), "nothing is final yet");
    let (mut e, _) = complete(3, Rule::Majority);
    e.on_result(1, 0, Some(&DONE), 1_010);
    e.on_result(1, 1, Some(&DONE), 1_020);
    let cmds = e.abandon();
    assert!(notified(&cmds));
    assert!(e.abandon().is_empty());
}

#[test]
fn a_release_is_acknowledged_by_a_majority_without_a_final_notice() {
    let mut e = release();
    let ok = CommandResult::Release(Ok(()));
    e.on_result(1, 2, Some(&ok), 1_010);
    let cmds = e.on_result(1, 0, Some(&ok), 1_020);
    assert_eq!(answer(&cmds), Some(STORED));
    assert!(!notified(&cmds));
}

#[test]
fn a_refusal_that_names_the_key_wins_over_not_found_in_either_order() {
    let done = CommandResult::Release(Err(ReleaseError::AlreadyCompleted));
    let nf = CommandResult::Release(Err(ReleaseError::NotFound));
    // The verdict is taken once no majority can store the call: here after two replies.
    for order in [[&done, &nf, &nf], [&nf, &done, &nf]] {
        let mut e = release();
        let mut all = Vec::new();
        for (i, r) in order.iter().enumerate() {
            all.extend(e.on_result(1, i, Some(r), 1_010 + i as u64));
        }
        assert_eq!(
            answer(&all),
            Some(HolderAnswer::Refused(Refusal::AlreadyCompleted)),
            "order {order:?}"
        );
    }
    // Two regions without the record are a majority: NotFound, without waiting longer.
    let mut e = release();
    e.on_result(1, 0, Some(&nf), 1_010);
    let cmds = e.on_result(1, 1, Some(&nf), 1_020);
    assert_eq!(
        answer(&cmds),
        Some(HolderAnswer::Refused(Refusal::NotFound))
    );
}

#[test]
fn an_extend_sends_the_chosen_lease_end_and_reports_the_earliest_a_majority_stored() {
    let (mut e, cmds) = extend();
    assert_eq!(
        sent(&cmds).map(|s| s.1),
        Some(Op::Extend {
            fence: fence(1),
            lease_ms: 30_000,
            until_ms: Some(31_000)
        })
    );
    // A region whose lease already ran longer keeps it (leases never shorten).
    e.on_result(1, 0, Some(&CommandResult::Extend(Ok(40_000))), 1_010);
    let cmds = e.on_result(1, 1, Some(&CommandResult::Extend(Ok(31_000))), 1_020);
    assert_eq!(
        answer(&cmds),
        Some(HolderAnswer::Stored {
            lease_expires_ms: Some(31_000)
        })
    );
}

#[test]
fn an_extend_refused_for_a_lost_lease_says_who_holds_the_key() {
    let (mut e, _) = extend();
    let lost = CommandResult::Extend(Err(ExtendError::LeaseLost {
        current: Some(fence(2)),
    }));
    e.on_result(1, 0, Some(&lost), 1_010);
    let cmds = e.on_result(1, 1, Some(&lost), 1_020);
    assert_eq!(
        answer(&cmds),
        Some(HolderAnswer::Refused(Refusal::LeaseLost {
            current: Some(fence(2))
        }))
    );
}

#[test]
fn a_second_reply_of_one_region_counts_once() {
    let (mut e, _) = complete(3, Rule::Majority);
    e.on_result(1, 0, Some(&DONE), 1_010);
    assert!(
        e.on_result(1, 0, Some(&DONE), 1_020).is_empty(),
        "one region's two replies are not a majority"
    );
    assert_eq!(e.awaiting(0), None);
    assert_eq!(e.awaiting(1), Some(1));
}

#[test]
fn the_store_rounds_timer_counts_for_nothing_once_the_final_notice_is_out() {
    let (mut e, cmds) = complete(3, Rule::Majority);
    let (store_timer, _) = timer(&cmds).expect("a round timer");
    e.on_result(1, 0, Some(&DONE), 1_010);
    let cmds = e.on_result(1, 1, Some(&DONE), 1_020);
    let (notice_timer, _) = timer(&cmds).expect("a timer for the notice");
    assert_ne!(store_timer, notice_timer);
    assert!(e.on_timer(store_timer, 2_500).is_empty());
    assert_eq!(answer(&e.on_timer(notice_timer, 2_600)), Some(STORED));
}

#[test]
fn abandoning_a_release_or_an_extend_sends_nothing() {
    let mut r = release();
    assert!(r.abandon().is_empty());
    assert!(r.is_done());
    let (mut x, _) = extend();
    x.on_result(1, 0, Some(&CommandResult::Extend(Ok(31_000))), 1_010);
    assert!(x.abandon().is_empty());
    assert!(x
        .on_result(1, 1, Some(&CommandResult::Extend(Ok(31_000))), 1_020)
        .is_empty());
}
