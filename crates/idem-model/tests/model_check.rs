//! Exhaustive breadth-first model checks of the GLOBAL protocol (see the crate docs).
//! Run with `-- --nocapture` to see the state counts and traces.

use idem_model::{Config, IdemModel, Variant, TWO_LIVE_GRANTS, WITHDRAW_STICKS};
use stateright::{Checker, HasDiscoveries, Model};
use std::collections::BTreeSet;
use std::time::Instant;

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Bounds a model needs for a multi-threaded breadth-first check.
trait Checked: Model<State = Self::S, Action = Self::A> + Send + Sync + 'static {
    type S: Clone + std::fmt::Debug + Eq + std::hash::Hash + Send + Sync + 'static;
    type A: Clone + std::fmt::Debug + Eq + std::hash::Hash + Send + Sync + 'static;
}

impl<M> Checked for M
where
    M: Model + Send + Sync + 'static,
    M::State: Clone + std::fmt::Debug + Eq + std::hash::Hash + Send + Sync + 'static,
    M::Action: Clone + std::fmt::Debug + Eq + std::hash::Hash + Send + Sync + 'static,
{
    type S = M::State;
    type A = M::Action;
}

/// The whole space: every property holds (and every `sometimes` is reached).
fn check_correct_model<M: Checked>(name: &str, model: M) {
    let t0 = Instant::now();
    let checker = model.checker().threads(threads()).spawn_bfs().join();
    let states = checker.unique_state_count();
    eprintln!(
        "{name}: {states} unique states ({} generated), depth {}, {:.1}s",
        checker.state_count(),
        checker.max_depth(),
        t0.elapsed().as_secs_f64()
    );
    checker.assert_properties();
    assert!(checker.is_done());
    assert!(states > 10_000, "the search is too small to mean anything");
}

fn check_correct(name: &str, cfg: Config) {
    check_correct_model(name, IdemModel::new(cfg));
}

/// A broken variant: breadth-first on one thread, so the counterexample to `property`
/// is a shortest one; prints it and returns its last state.
fn shortest_counterexample<M: Checked>(name: &str, model: M, property: &'static str) -> M::S {
    let t0 = Instant::now();
    let checker = model
        .checker()
        .threads(1)
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([property])))
        .spawn_bfs()
        .join();
    let path = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("{name}: must break \"{property}\""));
    let last = path.last_state().clone();
    let actions = path.into_actions();
    eprintln!(
        "{name}: counterexample of {} steps after {} states, {:.1}s",
        actions.len(),
        checker.unique_state_count(),
        t0.elapsed().as_secs_f64()
    );
    for (i, a) in actions.iter().enumerate() {
        eprintln!("  {:2}. {a:?}", i + 1);
    }
    assert!(!actions.is_empty());
    last
}

#[test]
fn correct_rules_hold_exhaustively() {
    check_correct("correct rules, equal fingerprints", Config::default());
}

#[test]
fn correct_rules_hold_with_different_fingerprints() {
    check_correct(
        "correct rules, fingerprints differ",
        Config {
            fingerprints: [0, 1],
            ..Config::default()
        },
    );
}

#[test]
fn a_retry_of_a_completed_request_is_replayed_never_mismatched() {
    // A holder whose completion was acknowledged sends its Reserve again while another
    // request's proposal may still hold a minority of regions: its own request is the
    // stored one, so MISMATCH would be wrong (MISMATCH_EXACT), and REPLAY is reached.
    check_correct(
        "correct rules, fingerprints differ, a retry after the acknowledgement",
        Config {
            fingerprints: [0, 1],
            retry_after_ack: true,
            crash: false,
            retries: 0,
            ..Config::default()
        },
    );
}

#[test]
fn correct_rules_hold_with_extend() {
    check_correct(
        "correct rules, one Extend per holder (lease 2, tmax 3)",
        Config {
            extends: 1,
            lease: 2,
            tmax: 3,
            ..Config::default()
        },
    );
}

#[test]
fn correct_rules_hold_with_contention_rounds() {
    // A Reserve that meets contention withdraws and, after its pause (the round timer,
    // fired at any step), proposes again with a claim of its own at a higher
    // generation; the check reaches such a fresh proposal being granted.
    check_correct(
        "correct rules, one fresh proposal after contention",
        Config {
            contention: 1,
            crash: false,
            retries: 0,
            tmax: 1,
            ..Config::default()
        },
    );
}

#[test]
fn broken_local_accept_gives_two_live_grants() {
    let last = shortest_counterexample(
        "broken local accept",
        IdemModel::new(Config {
            variant: Variant::BrokenLocalAccept,
            ..Config::default()
        }),
        TWO_LIVE_GRANTS,
    );
    eprintln!("  last state: {last:?}");
}

#[test]
fn a_withdraw_without_a_tombstone_is_undone_by_a_late_propose() {
    shortest_counterexample(
        "withdraw without a tombstone",
        IdemModel::new(Config {
            variant: Variant::BrokenWithdrawWithoutTombstone,
            ..Config::default()
        }),
        WITHDRAW_STICKS,
    );
}

#[test]
fn the_regional_double_grant_count_is_exact_in_every_delivery_order() {
    use idem_model::regional::{RegionalConfig, RegionalModel};
    check_correct_model(
        "REGIONAL count (lease 2, tmax 3)",
        RegionalModel::new(RegionalConfig::default()),
    );
}

#[test]
fn counting_every_overturn_counts_one_double_grant_twice() {
    use idem_model::regional::{RegionalConfig, RegionalModel, RegionalVariant, COUNTED_ONCE};
    shortest_counterexample(
        "counting every overturn",
        RegionalModel::new(RegionalConfig {
            variant: RegionalVariant::CountEveryOverturn,
            ..RegionalConfig::default()
        }),
        COUNTED_ONCE,
    );
}
