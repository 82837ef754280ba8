//! Exhaustive breadth-first model checks of the GLOBAL protocol (see the crate docs).
//! Run with `-- --nocapture` to see the state counts and traces.

use idem_model::{Config, IdemModel, Variant, TWO_LIVE_GRANTS, WITHDRAW_STICKS};
use stateright::{Checker, HasDiscoveries, Model};
use std::collections::BTreeSet;
use std::time::Instant;

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn check_correct(name: &str, cfg: Config) {
    let t0 = Instant::now();
    let checker = IdemModel::new(cfg)
        .checker()
        .threads(threads())
        .spawn_bfs()
        .join();
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
fn broken_local_accept_gives_two_live_grants() {
    let t0 = Instant::now();
    let checker = IdemModel::new(Config {
        variant: Variant::BrokenLocalAccept,
        ..Config::default()
    })
    .checker()
    // One thread: breadth-first order, so the counterexample is a shortest one.
    .threads(1)
    .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([TWO_LIVE_GRANTS])))
    .spawn_bfs()
    .join();
    let path = checker
        .discovery(TWO_LIVE_GRANTS)
        .expect("the broken rule must give two live grants");
    let last = path.last_state().clone();
    let actions = path.into_actions();
    eprintln!(
        "broken local accept: counterexample of {} steps after {} states, {:.1}s",
        actions.len(),
        checker.unique_state_count(),
        t0.elapsed().as_secs_f64()
    );
    for (i, a) in actions.iter().enumerate() {
        eprintln!("  {:2}. {a:?}", i + 1);
    }
    eprintln!("  last state: {last:?}");
    assert!(!actions.is_empty());
}

#[test]
fn a_withdraw_without_a_tombstone_is_undone_by_a_late_propose() {
    let checker = IdemModel::new(Config {
        variant: Variant::BrokenWithdrawWithoutTombstone,
        ..Config::default()
    })
    .checker()
    .threads(1)
    .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([WITHDRAW_STICKS])))
    .spawn_bfs()
    .join();
    let path = checker
        .discovery(WITHDRAW_STICKS)
        .expect("a withdraw that only takes an accept back must be caught");
    let actions = path.into_actions();
    eprintln!(
        "withdraw without a tombstone: counterexample of {} steps after {} states",
        actions.len(),
        checker.unique_state_count()
    );
    for (i, a) in actions.iter().enumerate() {
        eprintln!("  {:2}. {a:?}", i + 1);
    }
    assert!(!actions.is_empty());
}

#[test]
fn the_regional_double_grant_count_is_exact_in_every_delivery_order() {
    use idem_model::regional::{RegionalConfig, RegionalModel};
    let t0 = Instant::now();
    let checker = RegionalModel::new(RegionalConfig::default())
        .checker()
        .threads(threads())
        .spawn_bfs()
        .join();
    let states = checker.unique_state_count();
    eprintln!(
        "REGIONAL count (lease 2, tmax 3): {states} unique states, depth {}, {:.1}s",
        checker.max_depth(),
        t0.elapsed().as_secs_f64()
    );
    checker.assert_properties();
    assert!(checker.is_done());
    assert!(states > 10_000, "the search is too small to mean anything");
}

#[test]
fn counting_every_overturn_counts_one_double_grant_twice() {
    use idem_model::regional::{RegionalConfig, RegionalModel, RegionalVariant, COUNTED_ONCE};
    let checker = RegionalModel::new(RegionalConfig {
        variant: RegionalVariant::CountEveryOverturn,
        ..RegionalConfig::default()
    })
    .checker()
    .threads(1)
    .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([COUNTED_ONCE])))
    .spawn_bfs()
    .join();
    let path = checker
        .discovery(COUNTED_ONCE)
        .expect("a count taken by every region that merges an overturn must be caught");
    let actions = path.into_actions();
    eprintln!(
        "counting every overturn: counterexample of {} steps after {} states",
        actions.len(),
        checker.unique_state_count()
    );
    for (i, a) in actions.iter().enumerate() {
        eprintln!("  {:2}. {a:?}", i + 1);
    }
    assert!(!actions.is_empty());
}
