//! An exhaustive model check, with [stateright], of Idem's GLOBAL cross-region decision
//! protocol (DESIGN §3), driving idem-core's real rules.
//!
//! It mirrors the structure of the executable Python model in
//! `shared/protocol-model/check_protocol.py`, but no rule is re-implemented here:
//!
//! * every acceptor step calls [`idem_core::acceptor`]: `reserve` with a proposed
//!   generation and lease end, `complete`, `release`, `extend` with a lease end,
//!   `withdraw`, `finalize`;
//! * every anti-entropy step calls [`idem_core::merge::merge`] (guarded) and then
//!   `merge::settle_finality` with a majority quorum, as a region's state machine applies
//!   a GLOBAL-mode `Merge` (`idem_core::command::apply`);
//! * every Reserve runs in the proposer engine, [`idem_core::engine::ReserveEngine`],
//!   the state machine idem-geo's `Geo::reserve` drives: the model delivers its
//!   Proposes, reports one reply per region and proposal, fires its round timer at any
//!   time (the `Decide` action), broadcasts its Withdraws and takes its answer. The first
//!   generation is `engine::first_generation` of the local record. The engine is
//!   configured as idem-geo configures it, with `Config::contention` fresh proposals
//!   after contention (0 by default, 1 in the contention check), each with a claim of
//!   its own (a claim *code*: proposer and try, see `state::claim_of`);
//! * every Complete, Release and Extend runs in the holder engine,
//!   [`idem_core::holder::HolderEngine`], the state machine idem-geo's `Geo::complete`,
//!   `Geo::release` and `Geo::extend` drive: its round goes to every region, each
//!   region's result goes back to it, and its answer acknowledges (or not). Its wait for
//!   a completion's final notice ends at once (a schedule the real timer allows; the
//!   confirmations change no record), so the notice goes out with the acknowledgement.
//!
//! The holder's own choices (fast path on a final local completion, Extend to
//! `now + lease`) follow idem-geo's `Geo::reserve` and `Geo::extend`.
//!
//! # What is modelled
//!
//! One key; 3 regions, each one atomic acceptor (its Raft group); 2 proposers with fixed
//! claim ids (P0's is the earlier one) whose clients reached R0 and R1. Nondeterministic
//! steps, in any interleaving:
//!
//! * a proposer starts its Reserve: the fast path answers REPLAY/MISMATCH from a final
//!   local completion; otherwise it sends `Propose{gen, lease_until}` to every region;
//! * a region applies any request in flight (Propose, Withdraw, Complete, Extend, Release,
//!   Final). Requests are never consumed (a "monotone network"): one request can be
//!   applied any number of times, in any order, or never, which covers loss,
//!   duplication and reordering. A Propose's reply is either received (the proposer
//!   records it in its tally: one reply per region and round, as in idem-geo) or lost;
//! * the engine decides on each reply as it arrives (`Tally::decide(now < lease_until)`,
//!   `Tally::settled`), or, when its round timer fires, on the replies it has
//!   (`Tally::conclude`): NEW makes it the holder, a StaleGen retry sends a new round,
//!   every verdict that withdraws sends Withdraw to every region. Replies can be
//!   delivered late, past a lease end too;
//! * a holder sends Complete (its response is its own id) or Release to every region.
//!   The holder engine acknowledges a Complete once `complete()` returned Ok at a
//!   majority of regions (a holder whose lease ended stops waiting); Final is then sent
//!   to every region. A Complete answered otherwise leaves the holder holding its lease
//!   (it may Complete again with the same fence, no longer Extend);
//! * with `Config::extends > 0`, a holder sends Extend (lease end `now + lease`) to
//!   every region; once `extend()` returned Ok at a majority within its current lease
//!   its lease is the earliest end among them; it may also stop waiting and keep its
//!   lease;
//! * anti-entropy: any up region merges any other region's current record;
//! * the clock ticks (a holder whose lease ended stops acting);
//! * one region crashes, at any time, for good: it applies and answers nothing more.
//!
//! # Properties
//!
//! `always`: never two live grants; no NEW after an acknowledged completion; replays
//! return the acknowledged response and never change; MISMATCH exactly on another
//! fingerprint (never to a retry of the request whose completion was acknowledged);
//! convergence (at `tmax`, once every lease has ended, every merge order
//! between up regions reaches the same identical records); no two completions of one generation meet in a merge;
//! a withdrawn claim is not accepted again where it was withdrawn (unless another
//! claim's live lease stands there). The `BrokenWithdrawWithoutTombstone` variant (a
//! withdraw that only takes an accept back) must break the last one.
//! `sometimes` (so the search is not vacuous): a NEW happens; a completion is
//! acknowledged; both proposers are granted the key in turn; a REPLAY happens (one
//! fingerprint) or a MISMATCH happens (two); an Extend is acknowledged (with Extend); a
//! fresh proposal after contention is granted (with contention rounds); a retry of an
//! acknowledged request is replayed (with `Config::retry_after_ack`: a holder whose
//! completion was acknowledged may send its Reserve once more).
//!
//! # Bounds and abstractions
//!
//! * time: ticks `0..=tmax` (default 2) of [`TICK_MS`] ms, lease 1 tick (default),
//!   a Reserve's first lease end capped at `tmax` (a fresh proposal after contention may end
//!   its lease later), skew margin 0 (exact clocks); at `tmax` every first lease
//!   has ended;
//! * 1 StaleGen retry per Reserve (`Config::retries`); one Reserve per proposer; no
//!   contention rounds by default, one in the contention check (no crash there);
//! * Extend: off by default (as in the Python model); the Extend check runs with one
//!   Extend per holder, lease 2 ticks, `tmax` 3;
//! * a record's retention fields (`expires_ms`, `created_ms`) and retry bookkeeping
//!   (`attempts`, `last_attempt_ms`, `first_attempt_ms`) are dropped between steps, and
//!   an ended lease is stored as 0 (see [`Rec`]): no rule reads them within the horizon;
//! * a request that can provably never change anything again is forgotten (its region
//!   crashed; a Propose nobody waits for, to a record already at or past its
//!   generation; a Complete or Extend once no record of its fence can be live; a
//!   Release, Extend or Final its record has moved past; a Withdraw to a completion,
//!   to a record above its generation, or to a released record at it);
//! * a region's crash stops its proposer from starting (it reads its local record).
//!
//! REGIONAL mode's double-grant count has its own model, [`regional`]: local grants,
//! any region's current record merged into any other at any step (what the relay and
//! anti-entropy deliver), and the replicated count `command::apply` keeps.
//!
//! [stateright]: https://docs.rs/stateright

mod model;
pub mod regional;
mod state;

pub use model::{
    Action, Config, IdemModel, Variant, CONVERGENCE, MISMATCH_EXACT, NO_DUAL_COMPLETION,
    NO_NEW_AFTER_ACK, REPLAYS_STABLE, SOME_ACK, SOME_EXTEND, SOME_MISMATCH, SOME_NEW,
    SOME_NEW_AFTER_CONTENTION, SOME_REPLAY, SOME_RETRY_REPLAYED, SOME_TAKEOVER, TWO_LIVE_GRANTS,
    WITHDRAW_STICKS,
};
pub use state::{Answer, Ghost, Msg, Rec, Rep, State, Status, PROPOSERS, QUORUM, REGIONS, TICK_MS};
