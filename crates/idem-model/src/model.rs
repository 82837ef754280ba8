//! The stateright [`Model`]: actions, transitions and properties.

use crate::state::{
    claim_of, code_of, fence_of, fingerprint_of, ms, proposer, response_of, Answer, Msg, Rec, Rep,
    State, Status, PROPOSERS, QUORUM, REGIONS, RETENTION_MS, SKEW_MS, TICK_MS,
};
use idem_core::acceptor::ReserveOutcome;
use idem_core::acceptor::{self, ReserveArgs, WithdrawArgs};
use idem_core::engine::{
    self, Answer as EngineAnswer, Command, Engine, EngineConfig, ReserveCall, ReserveEngine, Rule,
};
use idem_core::holder::{HolderAnswer, HolderCall, HolderEngine};
use idem_core::merge::{digest_bytes, merge, settle_finality, Conflict, Merged};
use idem_core::proposer::Reply;
use idem_core::{ClaimId, Phase, Record};
use idem_core::{CommandResult, Fence, Op};
use stateright::{Model, Property};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// Which decision rule the proposers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The proposer engine's majority rule, as idem-geo runs it.
    Correct,
    /// Deliberately broken: NEW as soon as the proposer's own local region accepted.
    BrokenLocalAccept,
    /// Deliberately broken: a withdraw only takes an accept back (no tombstone), as
    /// before tombstones, so a Propose that arrives after it is accepted.
    BrokenWithdrawWithoutTombstone,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The clock runs 0..=tmax ticks.
    pub tmax: u8,
    /// Lease length in ticks (a Reserve's first lease end is capped at `tmax`).
    pub lease: u8,
    /// StaleGen retries per Reserve.
    pub retries: u8,
    /// Fingerprint number per proposer.
    pub fingerprints: [u8; PROPOSERS],
    /// The region each proposer's client reached.
    pub local: [u8; PROPOSERS],
    /// Whether one region may crash.
    pub crash: bool,
    /// Extend calls each holder may make (0: Extend is not modelled).
    pub extends: u8,
    /// Fresh proposals after contention per Reserve (the engine's
    /// `max_contention_rounds`; below `TRIES`).
    pub contention: u8,
    /// A proposer whose completion was acknowledged may send its Reserve once more, as a
    /// client retrying a request it thinks failed does.
    pub retry_after_ack: bool,
    pub variant: Variant,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            tmax: 2,
            lease: 1,
            retries: 1,
            fingerprints: [0, 0],
            local: [0, 1],
            crash: true,
            extends: 0,
            contention: 0,
            retry_after_ack: false,
            variant: Variant::Correct,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Proposer `p` starts its Reserve at its local region (fast path or Proposes).
    Start(u8),
    /// A region applies a request; for a Propose, the proposer receives the reply.
    Deliver(Msg),
    /// A region applies a Propose and the reply is lost.
    DeliverReplyLost(Msg),
    /// Proposer `p`'s engine round timer fires: it concludes on the replies it has
    /// (`Tally::conclude`).
    Decide(u8),
    /// Holder `p` sends Complete (its response = its own id) to every region.
    SendComplete(u8),
    /// Holder `p` sends Release to every region.
    SendRelease(u8),
    /// Holder `p` sends Extend (new lease end `now + lease`) to every region.
    SendExtend(u8),
    /// Holder `p` stops waiting for its Extend and keeps its current lease.
    GiveUpExtend(u8),
    /// Anti-entropy: region `dst` merges region `src`'s current record (guarded).
    Merge {
        src: u8,
        dst: u8,
    },
    Tick,
    Crash(u8),
}

pub const TWO_LIVE_GRANTS: &str = "never two live grants";
pub const NO_NEW_AFTER_ACK: &str = "no NEW after an acknowledged completion";
pub const REPLAYS_STABLE: &str = "replays return the acknowledged response and never change";
pub const MISMATCH_EXACT: &str = "MISMATCH exactly on another fingerprint";
pub const CONVERGENCE: &str = "convergence";
pub const NO_DUAL_COMPLETION: &str = "no two completions of one generation meet in a merge";
pub const WITHDRAW_STICKS: &str = "a withdrawn claim is not accepted again where it was withdrawn";
pub const SOME_REPLAY: &str = "a REPLAY happens";
pub const SOME_NEW: &str = "a NEW happens";
pub const SOME_ACK: &str = "a completion is acknowledged";
pub const SOME_MISMATCH: &str = "a MISMATCH happens";
pub const SOME_EXTEND: &str = "an Extend is acknowledged";
pub const SOME_TAKEOVER: &str = "both proposers are granted the key in turn";
pub const SOME_NEW_AFTER_CONTENTION: &str = "a fresh proposal after contention is granted";
pub const SOME_RETRY_REPLAYED: &str = "a retry of an acknowledged request is replayed";

/// The claim of a Reserve that only looks (it is never applied).
const PROBE_CLAIM: ClaimId = ClaimId {
    hlc: 99,
    region: 9,
    node: 9,
    nonce: 9,
};

type ConvergenceKey = (u8, [Option<Rec>; REGIONS], [bool; REGIONS]);

pub struct IdemModel {
    pub cfg: Config,
    converged: Mutex<HashMap<ConvergenceKey, bool>>,
}

impl IdemModel {
    pub fn new(cfg: Config) -> IdemModel {
        assert!(cfg.lease >= 1 && cfg.tmax >= 1);
        assert!(cfg.local.iter().all(|r| usize::from(*r) < REGIONS));
        assert!(usize::from(cfg.contention) < crate::state::TRIES);
        IdemModel {
            cfg,
            converged: Mutex::new(HashMap::new()),
        }
    }

    /// The lease end an Extend sent now asks for (as idem-geo: now + lease).
    fn extend_until(&self, s: &State) -> u8 {
        (s.now + self.cfg.lease).min(self.cfg.tmax)
    }

    /// The tick from which no record of a holder's fence can have a live lease: its
    /// lease end, or, when Extend is modelled, the end of time.
    fn live_until(&self, lease_until: u8) -> u8 {
        if self.cfg.extends > 0 {
            self.cfg.tmax
        } else {
            lease_until
        }
    }

    fn now_ms(s: &State) -> u64 {
        ms(s.now)
    }

    fn all_equal_fingerprints(&self) -> bool {
        self.cfg
            .fingerprints
            .iter()
            .all(|f| *f == self.cfg.fingerprints[0])
    }

    /// The proposer engine's settings for proposer `p`, as idem-geo's
    /// `Geo::engine_config` makes them, with `Config::contention` fresh proposals after
    /// contention (each with a claim of its own) and a round timer the `Decide` action
    /// fires at any time.
    fn engine_config(&self, p: usize) -> EngineConfig {
        EngineConfig {
            regions: REGIONS,
            local: Some(usize::from(self.cfg.local[p])),
            round_timeout_ms: u64::MAX / 4,
            max_stale_retries: u32::from(self.cfg.retries),
            max_contention_rounds: u32::from(self.cfg.contention),
            rule: match self.cfg.variant {
                Variant::Correct | Variant::BrokenWithdrawWithoutTombstone => Rule::Majority,
                Variant::BrokenLocalAccept => Rule::BrokenLocalAccept,
            },
        }
    }

    /// Carry out the engine's commands for proposer `p`: Proposes and Withdraws go to
    /// every region, the answer ends the Reserve (timers are the `Decide` action, which
    /// may fire at any time).
    fn perform(&self, s: &mut State, p: usize, cmds: Vec<Command>) {
        for c in cmds {
            match c {
                Command::Send {
                    round: proposal,
                    op:
                        Op::Propose {
                            generation,
                            lease_until_ms,
                            claim,
                            ..
                        },
                } => {
                    let c = code_of(&claim);
                    assert_eq!(proposer(c), p, "a claim of this proposer");
                    let gen = u8::try_from(generation).expect("generation beyond the model");
                    let proposal = u8::try_from(proposal).expect("proposals beyond the model");
                    for r in 0..REGIONS as u8 {
                        s.net.insert(Msg::Propose {
                            c,
                            region: r,
                            proposal,
                            gen,
                            lease_until: tick_of(lease_until_ms),
                        });
                    }
                }
                Command::Send { op, .. } => panic!("the engine proposed {op:?}"),
                Command::Withdraw {
                    op:
                        Op::Withdraw {
                            claim, generation, ..
                        },
                } => {
                    let c = code_of(&claim);
                    assert_eq!(proposer(c), p, "a claim of this proposer");
                    let gen = u8::try_from(generation).expect("generation beyond the model");
                    for r in 0..REGIONS as u8 {
                        s.net.insert(Msg::Withdraw { c, region: r, gen });
                    }
                }
                Command::Withdraw { op } => panic!("the engine withdrew with {op:?}"),
                Command::Timer { .. } => {}
                Command::Notify { op } => panic!("the proposer engine notified {op:?}"),
                Command::Answer(a) => {
                    let contended = s.engines[p]
                        .take()
                        .is_some_and(|e| e.contention_rounds() > 0);
                    let new = matches!(
                        a,
                        EngineAnswer::Decided {
                            outcome: ReserveOutcome::New { .. },
                            ..
                        }
                    );
                    if contended && new {
                        s.ghost.new_after_contention = true;
                    }
                    self.answered(s, p, a);
                }
            }
        }
    }

    /// Start holder `p`'s call on the holder engine, as idem-geo does.
    fn start_holder(&self, s: &mut State, p: usize, call: HolderCall) {
        let mut e = HolderEngine::new(self.engine_config(p), call);
        let cmds = e.start(Self::now_ms(s));
        s.holders[p] = Some(e);
        self.perform_holder(s, p, cmds);
    }

    /// Region `r`'s reply to holder `p`'s current call.
    fn holder_reply(&self, s: &mut State, p: usize, r: usize, res: &CommandResult) {
        let now_ms = Self::now_ms(s);
        let Some(e) = s.holders[p].as_mut() else {
            return;
        };
        let Some(round) = e.awaiting(r) else {
            return;
        };
        let cmds = e.on_result(round, r, Some(res), now_ms);
        self.perform_holder(s, p, cmds);
    }

    /// Carry out holder `p`'s engine commands: its calls go to every region. The wait
    /// for a completion's final notice ends at once (the model takes that schedule: the
    /// confirmations it waits for change no record), so its notice and answer follow.
    fn perform_holder(&self, s: &mut State, p: usize, cmds: Vec<Command<HolderAnswer>>) {
        let now_ms = Self::now_ms(s);
        for c in cmds {
            match c {
                Command::Send {
                    op: Op::Final { .. },
                    ..
                } => {
                    let e = s.holders[p].as_mut().expect("a running holder engine");
                    let more = e.on_timer(e.timer_token(), now_ms);
                    self.perform_holder(s, p, more);
                }
                Command::Send { op, .. } | Command::Notify { op } => self.send_holder_op(s, p, &op),
                Command::Timer { .. } => {}
                Command::Answer(a) => {
                    s.holders[p] = None;
                    self.holder_answered(s, p, a);
                }
                c => panic!("the holder engine asked for {c:?}"),
            }
        }
    }

    /// Send holder `p`'s `op` to every region.
    fn send_holder_op(&self, s: &mut State, p: usize, op: &Op) {
        let gen_of = |f: &Fence| u8::try_from(f.generation).expect("generation beyond the model");
        for region in 0..REGIONS as u8 {
            let m = match (op, s.proposers[p]) {
                (Op::Complete { fence, .. }, Status::Completing { lease_until, .. }) => {
                    Msg::Complete {
                        c: code_of(&fence.claim),
                        region,
                        gen: gen_of(fence),
                        live_until: self.live_until(lease_until),
                    }
                }
                (
                    Op::Extend {
                        fence,
                        until_ms: Some(until_ms),
                        ..
                    },
                    Status::Extending { lease_until, .. },
                ) => Msg::Extend {
                    c: code_of(&fence.claim),
                    region,
                    gen: gen_of(fence),
                    until: tick_of(*until_ms),
                    live_until: self.live_until(lease_until),
                },
                (Op::Release { fence }, _) => Msg::Release {
                    c: code_of(&fence.claim),
                    region,
                    gen: gen_of(fence),
                },
                (Op::Final { fence }, _) => Msg::Final {
                    c: code_of(&fence.claim),
                    region,
                    gen: gen_of(fence),
                },
                (op, st) => panic!("the holder engine sent {op:?} while {st:?}"),
            };
            s.net.insert(m);
        }
    }

    /// A holder's call answered: acknowledged, or the holder goes on holding its lease
    /// as it was (it may Complete again with the same fence).
    fn holder_answered(&self, s: &mut State, p: usize, a: HolderAnswer) {
        s.proposers[p] = match (s.proposers[p], a) {
            (Status::Completing { .. }, HolderAnswer::Stored { .. }) => Status::Acked,
            (
                Status::Extending {
                    claim,
                    gen,
                    extends_left,
                    ..
                },
                HolderAnswer::Stored {
                    lease_expires_ms: Some(until_ms),
                },
            ) => {
                s.ghost.extended = true;
                Status::Holder {
                    claim,
                    gen,
                    lease_until: tick_of(until_ms),
                    extends_left,
                }
            }
            (
                Status::Completing {
                    claim,
                    gen,
                    lease_until,
                },
                _,
            ) => Status::Holder {
                claim,
                gen,
                lease_until,
                // It may Complete again, not Extend (its Extends come before it completes).
                extends_left: 0,
            },
            (
                Status::Extending {
                    claim,
                    gen,
                    lease_until,
                    extends_left,
                    ..
                },
                _,
            ) => Status::Holder {
                claim,
                gen,
                lease_until,
                extends_left,
            },
            (st, a) => panic!("the holder engine answered {a:?} while {st:?}"),
        };
    }

    fn answered(&self, s: &mut State, p: usize, a: EngineAnswer) {
        let outcome = match a {
            EngineAnswer::Unavailable { .. } => return self.answer(s, p, Answer::Unavailable),
            EngineAnswer::Decided { outcome, .. } => outcome,
        };
        match outcome {
            ReserveOutcome::New {
                fence,
                lease_expires_ms,
                ..
            } => {
                self.check_new(s, p);
                s.proposers[p] = Status::Holder {
                    claim: code_of(&fence.claim),
                    gen: u8::try_from(fence.generation).expect("generation beyond the model"),
                    lease_until: tick_of(lease_expires_ms),
                    extends_left: self.cfg.extends,
                };
            }
            ReserveOutcome::Replay { fence, response } => {
                let Rep::Completed { resp, .. } =
                    Rep::from_reply(&Reply::Completed { fence, response })
                else {
                    unreachable!("a Completed reply translates to Rep::Completed")
                };
                self.answer(s, p, Answer::Replay(resp));
            }
            ReserveOutcome::Mismatch { .. } => self.answer(s, p, Answer::Mismatch),
            ReserveOutcome::InFlight { .. } => self.answer(s, p, Answer::InFlight),
            ReserveOutcome::StaleGen { .. } => panic!("the engine answered StaleGen"),
            ReserveOutcome::TooOld { .. } => {
                panic!("TooOld cannot happen within the model's horizon")
            }
        }
    }

    fn check_new(&self, s: &mut State, p: usize) {
        if s.proposers.contains(&Status::Acked) || s.ghost.retried.contains(&true) {
            s.ghost.new_after_ack = true;
        }
        let fp = self.cfg.fingerprints[p];
        for q in 0..PROPOSERS {
            let fq = self.cfg.fingerprints[q];
            if q == p || fq == fp {
                continue;
            }
            let completed = s
                .records
                .iter()
                .flatten()
                .filter(|r| r.fp == fq && r.phase == Phase::Completed)
                .count();
            let live = s
                .records
                .iter()
                .flatten()
                .filter(|r| s.proposers[q].claim() == Some(r.claim) && r.live_reserved(s.now))
                .count();
            if completed >= QUORUM as usize
                || (s.proposers[q].live_grant(s.now) && live >= QUORUM as usize)
            {
                s.ghost.new_over_other_fp = true;
            }
        }
    }

    fn answer(&self, s: &mut State, p: usize, a: Answer) {
        if a == Answer::Mismatch && self.all_equal_fingerprints() {
            s.ghost.mismatch_same_fp = true;
        }
        if a == Answer::Mismatch && s.ghost.retried[p] {
            s.ghost.mismatch_own_request = true;
        }
        s.proposers[p] = Status::Done(a);
    }

    fn start(&self, s: &mut State, p: usize) {
        if s.proposers[p] == Status::Acked {
            s.ghost.retried[p] = true;
        }
        let loc = usize::from(self.cfg.local[p]);
        let fp = self.cfg.fingerprints[p];
        // Fast path (idem-geo): a final completion at the local region answers.
        if let Some(r) = s.records[loc].filter(|r| r.phase == Phase::Completed && r.is_final) {
            let a = if r.fp != fp {
                Answer::Mismatch
            } else {
                Answer::Replay(r.resp.expect("a completed record has a response"))
            };
            self.answer(s, p, a);
            return;
        }
        // The proposer engine, as idem-geo starts it: the generation from the local
        // record, a lease of `lease` ticks (ending at `tmax` at the latest).
        let now_ms = Self::now_ms(s);
        let lease_until = (s.now + self.cfg.lease).min(self.cfg.tmax);
        let mut e = ReserveEngine::new(
            self.engine_config(p),
            ReserveCall {
                fingerprint: fingerprint_of(fp),
                lease_ms: ms(lease_until) - now_ms,
                retention_ms: RETENTION_MS,
                first_attempt_ms: 0,
                deadline_ms: u64::MAX,
            },
            claim_of(p as u8),
            0,
        );
        let gen = engine::first_generation(s.record(loc).as_ref(), now_ms);
        let cmds = e.start(now_ms, gen);
        s.proposers[p] = Status::Proposing;
        s.engines[p] = Some(e);
        self.perform(s, p, cmds);
    }

    /// The engine's round timer fires (at any time: a round may time out early or late).
    fn decide(&self, s: &mut State, p: usize) {
        let now_ms = Self::now_ms(s);
        let Some(e) = s.engines[p].as_mut() else {
            return;
        };
        let cmds = e.on_timer(e.timer_token(), now_ms);
        self.perform(s, p, cmds);
    }

    /// Region `msg.region()` applies `msg`; `received`: the proposer gets a Propose's reply.
    fn deliver(&self, s: &mut State, msg: Msg, received: bool) {
        let r = msg.region();
        let now_ms = Self::now_ms(s);
        let stored = s.record(r);
        match msg {
            Msg::Propose {
                c,
                proposal,
                gen,
                lease_until,
                region,
            } => {
                let pi = proposer(c);
                let d = acceptor::reserve(
                    stored.as_ref(),
                    &ReserveArgs {
                        now_ms,
                        skew_margin_ms: SKEW_MS,
                        fingerprint: fingerprint_of(self.cfg.fingerprints[pi]),
                        claim: claim_of(c),
                        generation: Some(u32::from(gen)),
                        lease_ms: u64::from(self.cfg.lease) * TICK_MS,
                        lease_until_ms: Some(ms(lease_until)),
                        retention_ms: RETENTION_MS,
                        first_attempt_ms: 0,
                        region_bit: 1 << region,
                    },
                );
                if let Some(w) = &d.write {
                    s.write(r, w);
                }
                // One reply per region and proposal reaches the engine, as in idem-geo.
                let waiting = s.engines[pi].as_ref().and_then(|e| e.awaiting(r));
                if received && waiting == Some(u32::from(proposal)) {
                    let e = s.engines[pi].as_mut().expect("a waiting engine");
                    let cmds =
                        e.on_reply(waiting.unwrap_or(0), r, &d.outcome, d.attempt, None, now_ms);
                    self.perform(s, pi, cmds);
                }
            }
            Msg::Withdraw { c, gen, .. } => {
                let broken = self.cfg.variant == Variant::BrokenWithdrawWithoutTombstone;
                let args = WithdrawArgs {
                    claim: claim_of(c),
                    generation: if broken { 0 } else { u32::from(gen) },
                    fingerprint: fingerprint_of(self.cfg.fingerprints[proposer(c)]),
                    retention_ms: RETENTION_MS,
                    now_ms,
                    skew_margin_ms: SKEW_MS,
                };
                let after = match acceptor::withdraw(stored.as_ref(), &args) {
                    Some(w) => {
                        s.write(r, &w);
                        Some(w)
                    }
                    None => stored,
                };
                // What the withdraw must leave: no generation it covers can be granted
                // to the claim here any more (another claim's live lease is left alone,
                // so there a late Propose waits for that lease like any other).
                let other_live = after.as_ref().is_some_and(|x| {
                    x.claim != args.claim
                        && x.phase == Phase::Reserved
                        && now_ms < x.lease_expires_ms + SKEW_MS
                });
                if !other_live {
                    for g in 1..=gen {
                        let d = acceptor::reserve(
                            after.as_ref(),
                            &ReserveArgs {
                                now_ms,
                                skew_margin_ms: SKEW_MS,
                                fingerprint: args.fingerprint,
                                claim: args.claim,
                                generation: Some(u32::from(g)),
                                lease_ms: u64::from(self.cfg.lease) * TICK_MS,
                                lease_until_ms: Some(ms(s.now + self.cfg.lease)),
                                retention_ms: RETENTION_MS,
                                first_attempt_ms: 0,
                                region_bit: 1 << r,
                            },
                        );
                        if matches!(d.outcome, ReserveOutcome::New { .. }) {
                            s.ghost.withdraw_undone = true;
                        }
                    }
                }
            }
            Msg::Complete { c, gen, .. } => {
                let pi = proposer(c);
                let res = acceptor::complete(
                    stored.as_ref(),
                    fence_of(c, gen),
                    response_of(pi as u8),
                    now_ms,
                    1 << r,
                    QUORUM,
                );
                if let Ok(Some(w)) = &res {
                    s.write(r, w);
                }
                // The reply reaches the holder engine of this fence's Complete.
                if matches!(s.proposers[pi],
                    Status::Completing { claim, gen: g, .. } if claim == c && g == gen)
                {
                    self.holder_reply(s, pi, r, &CommandResult::Complete(res.map(|_| ())));
                }
            }
            Msg::Extend { c, gen, until, .. } => {
                let pi = proposer(c);
                let res = acceptor::extend(
                    stored.as_ref(),
                    fence_of(c, gen),
                    u64::from(self.cfg.lease) * TICK_MS,
                    Some(ms(until)),
                    now_ms,
                );
                if let Ok(w) = &res {
                    s.write(r, w);
                }
                // The reply reaches the holder engine of this Extend (not an earlier one).
                if matches!(s.proposers[pi],
                    Status::Extending { claim, gen: g, until: u, .. }
                        if claim == c && g == gen && u == until)
                {
                    let res = res.map(|w| w.lease_expires_ms);
                    self.holder_reply(s, pi, r, &CommandResult::Extend(res));
                }
            }
            Msg::Release { c, gen, .. } => {
                if let Ok(Some(w)) = acceptor::release(stored.as_ref(), fence_of(c, gen), now_ms) {
                    s.write(r, &w);
                }
            }
            Msg::Final { c, gen, .. } => {
                if let Some(w) = acceptor::finalize(stored.as_ref(), fence_of(c, gen), now_ms) {
                    s.write(r, &w);
                }
            }
        }
    }

    fn anti_entropy(&self, s: &mut State, src: usize, dst: usize) {
        let Some(remote) = s.record(src) else {
            return;
        };
        let m = apply_merge(s.record(dst).as_ref(), &remote, Self::now_ms(s));
        if m.conflict == Some(Conflict::DualCompletion) {
            s.ghost.dual_completion = true;
        }
        if let Some(w) = &m.write {
            s.write(dst, w);
        }
    }

    fn tick(&self, s: &mut State) {
        s.now += 1;
        let now = s.now;
        for r in s.records.iter_mut().flatten() {
            *r = r.at(now);
        }
        for (st, holder) in s.proposers.iter_mut().zip(s.holders.iter_mut()) {
            if matches!(
                st,
                Status::Holder { .. } | Status::Extending { .. } | Status::Completing { .. }
            ) && !st.live_grant(now)
            {
                // The lease is over: the holder stops acting (a Complete it sent is
                // refused from now on, so it can never be acknowledged).
                *st = Status::LeaseEnded;
                *holder = None;
            }
        }
    }

    /// Forget requests whose delivery can provably never change anything again, and
    /// update the response history. Records only move up the merge order
    /// (Completed, then generation), which is what makes these rules sound.
    fn normalize(&self, s: &mut State) {
        let dead = |m: &Msg, s: &State| -> bool {
            let r = m.region();
            if s.down[r] {
                return true;
            }
            let rec = s.records[r];
            match *m {
                Msg::Propose {
                    c, proposal, gen, ..
                } => {
                    let waiting = s.engines[proposer(c)].as_ref().and_then(|e| e.awaiting(r))
                        == Some(u32::from(proposal));
                    !waiting && rec.is_some_and(|x| x.phase == Phase::Completed || x.gen >= gen)
                }
                // A withdraw changes a record below its generation, of its claim, or
                // at its generation while not Released (records only move up, and at
                // one generation a Released record never becomes Reserved again).
                Msg::Withdraw { gen, .. } => rec.is_some_and(|x| {
                    x.phase == Phase::Completed
                        || x.gen > gen
                        || (x.gen == gen && x.phase == Phase::Released)
                }),
                Msg::Complete { live_until, .. } => s.now >= live_until,
                Msg::Extend {
                    c, gen, live_until, ..
                } => {
                    s.now >= live_until
                        || rec.is_some_and(|x| {
                            x.phase == Phase::Completed
                                || x.gen > gen
                                || (x.gen == gen && x.claim == c && x.phase == Phase::Released)
                        })
                }
                Msg::Release { c, gen, .. } => rec.is_some_and(|x| {
                    x.phase == Phase::Completed
                        || x.gen > gen
                        || (x.gen == gen && x.claim == c && x.phase == Phase::Released)
                }),
                Msg::Final { c, gen, .. } => rec.is_some_and(|x| {
                    x.phase == Phase::Completed
                        && (x.gen > gen || (x.gen == gen && x.claim == c && x.is_final))
                }),
            }
        };
        let gone: Vec<Msg> = s.net.iter().filter(|m| dead(m, s)).copied().collect();
        for m in gone {
            s.net.remove(&m);
        }

        // Responses acknowledged, replayed, or replayable.
        let mut seen = BTreeSet::new();
        for (p, st) in s.proposers.iter().enumerate() {
            if s.ghost.retried[p] {
                seen.insert(p as u8);
            }
            match st {
                Status::Acked => {
                    seen.insert(p as u8);
                }
                Status::Done(Answer::Replay(x)) => {
                    seen.insert(*x);
                }
                _ => {}
            }
        }
        // A Reserve of the same request reaching any region now: what would it replay?
        // (Only a Completed record can answer REPLAY; the acceptor decides whether it does.)
        for (r, rec) in s.records.iter().enumerate() {
            let Some(rec) = rec.filter(|x| x.phase == Phase::Completed) else {
                continue;
            };
            let d = acceptor::reserve(
                Some(&rec.to_record()),
                &ReserveArgs {
                    now_ms: ms(s.now),
                    skew_margin_ms: SKEW_MS,
                    fingerprint: fingerprint_of(rec.fp),
                    claim: PROBE_CLAIM,
                    generation: Some(u32::from(rec.gen) + 1),
                    lease_ms: u64::from(self.cfg.lease) * TICK_MS,
                    lease_until_ms: Some(ms(s.now + self.cfg.lease)),
                    retention_ms: RETENTION_MS,
                    first_attempt_ms: 0,
                    region_bit: 1 << r,
                },
            );
            if let Rep::Completed { resp, .. } = Rep::from_reply(&Reply::from_outcome(&d.outcome)) {
                seen.insert(resp);
            }
        }
        if s.ghost.first_resp.is_none() {
            s.ghost.first_resp = seen.first().copied();
        }
        if seen.iter().any(|x| Some(*x) != s.ghost.first_resp) {
            s.ghost.resp_changed = true;
        }
    }

    /// Convergence: from these records, merging every pair of up regions in every order
    /// until nothing changes gives identical records (by `digest_bytes`), whatever the
    /// order.
    pub fn converges(
        &self,
        now: u8,
        records: &[Option<Rec>; REGIONS],
        down: &[bool; REGIONS],
    ) -> bool {
        let key = (now, *records, *down);
        if let Some(v) = self.converged.lock().expect("cache").get(&key) {
            return *v;
        }
        let up: Vec<usize> = (0..REGIONS).filter(|r| !down[*r]).collect();
        let now_ms = ms(now);
        let mut seen = BTreeSet::new();
        let mut stack = vec![*records];
        seen.insert(*records);
        let mut fixpoints = BTreeSet::new();
        while let Some(rs) = stack.pop() {
            let mut moved = false;
            for &src in &up {
                for &dst in &up {
                    let Some(remote) = rs[src].filter(|_| src != dst) else {
                        continue;
                    };
                    let local = rs[dst].map(|x| x.to_record());
                    let m = apply_merge(local.as_ref(), &remote.to_record(), now_ms);
                    if let Some(w) = m.write {
                        let mut next = rs;
                        next[dst] = Some(Rec::from_record(&w, now));
                        if next != rs {
                            moved = true;
                            if seen.insert(next) {
                                stack.push(next);
                            }
                        }
                    }
                }
            }
            if !moved {
                fixpoints.insert(rs);
            }
        }
        let digests = |rs: &[Option<Rec>; REGIONS]| -> Vec<Option<Vec<u8>>> {
            up.iter()
                .map(|r| rs[*r].map(|x| digest_bytes(&x.to_record())))
                .collect()
        };
        let ok = fixpoints.len() == 1
            && fixpoints.iter().all(|fx| {
                let d = digests(fx);
                d.iter().all(|x| *x == d[0])
            });
        self.converged.lock().expect("cache").insert(key, ok);
        ok
    }
}

/// A GLOBAL-mode `Merge{record}` as a region's state machine applies it
/// (`idem_core::command::apply`): the guarded merge, then a merged witness set that
/// reaches a majority makes the completion final.
fn apply_merge(local: Option<&Record>, remote: &Record, now_ms: u64) -> Merged {
    let mut m = merge(local, remote, now_ms, SKEW_MS, true);
    if let Some(w) = m.write.as_mut() {
        settle_finality(w, QUORUM);
    }
    m
}

/// The tick a time in ms falls on (the model's times are whole ticks).
fn tick_of(t_ms: u64) -> u8 {
    assert_eq!(t_ms % TICK_MS, 0, "a time off the tick: {t_ms}");
    u8::try_from(t_ms / TICK_MS).expect("time beyond the model")
}

impl Model for IdemModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State::initial()]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.now < self.cfg.tmax {
            actions.push(Action::Tick);
        }
        if self.cfg.crash && !s.down.iter().any(|d| *d) {
            actions.extend((0..REGIONS as u8).map(Action::Crash));
        }
        for (p, st) in s.proposers.iter().enumerate() {
            let p8 = p as u8;
            match st {
                Status::Idle if !s.down[usize::from(self.cfg.local[p])] => {
                    actions.push(Action::Start(p8))
                }
                Status::Acked
                    if self.cfg.retry_after_ack
                        && !s.ghost.retried[p]
                        && !s.down[usize::from(self.cfg.local[p])] =>
                {
                    actions.push(Action::Start(p8))
                }
                Status::Proposing => actions.push(Action::Decide(p8)),
                Status::Holder {
                    lease_until,
                    extends_left,
                    ..
                } => {
                    actions.push(Action::SendComplete(p8));
                    actions.push(Action::SendRelease(p8));
                    if *extends_left > 0 && self.extend_until(s) > *lease_until {
                        actions.push(Action::SendExtend(p8));
                    }
                }
                Status::Extending { .. } => actions.push(Action::GiveUpExtend(p8)),
                _ => {}
            }
        }
        for m in &s.net {
            if s.down[m.region()] {
                continue;
            }
            actions.push(Action::Deliver(*m));
            if matches!(m, Msg::Propose { .. }) {
                actions.push(Action::DeliverReplyLost(*m));
            }
        }
        for src in 0..REGIONS {
            if s.records[src].is_none() {
                continue;
            }
            for dst in 0..REGIONS {
                if dst != src && !s.down[dst] {
                    actions.push(Action::Merge {
                        src: src as u8,
                        dst: dst as u8,
                    });
                }
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Start(p) => self.start(&mut s, usize::from(p)),
            Action::Deliver(m) => self.deliver(&mut s, m, true),
            Action::DeliverReplyLost(m) => self.deliver(&mut s, m, false),
            Action::Decide(p) => self.decide(&mut s, usize::from(p)),
            Action::SendComplete(p) => {
                let pi = usize::from(p);
                if let Status::Holder {
                    claim,
                    gen,
                    lease_until,
                    ..
                } = s.proposers[pi]
                {
                    s.proposers[pi] = Status::Completing {
                        claim,
                        gen,
                        lease_until,
                    };
                    let call = HolderCall::Complete {
                        fence: fence_of(claim, gen),
                        response: response_of(p),
                    };
                    self.start_holder(&mut s, pi, call);
                }
            }
            Action::SendRelease(p) => {
                let pi = usize::from(p);
                if let Status::Holder { claim, gen, .. } = s.proposers[pi] {
                    // The holder stops holding at once; the acknowledgement matters to
                    // no property, so the engine's answer is not waited for.
                    s.proposers[pi] = Status::Released;
                    let mut e = HolderEngine::new(
                        self.engine_config(pi),
                        HolderCall::Release {
                            fence: fence_of(claim, gen),
                        },
                    );
                    for c in e.start(Self::now_ms(&s)) {
                        if let Command::Send { op, .. } = c {
                            self.send_holder_op(&mut s, pi, &op);
                        }
                    }
                }
            }
            Action::SendExtend(p) => {
                let pi = usize::from(p);
                if let Status::Holder {
                    claim,
                    gen,
                    lease_until,
                    extends_left,
                } = s.proposers[pi]
                {
                    let until = self.extend_until(&s);
                    s.proposers[pi] = Status::Extending {
                        claim,
                        gen,
                        lease_until,
                        until,
                        extends_left: extends_left - 1,
                    };
                    let call = HolderCall::Extend {
                        fence: fence_of(claim, gen),
                        lease_ms: u64::from(self.cfg.lease) * TICK_MS,
                        until_ms: ms(until),
                    };
                    self.start_holder(&mut s, pi, call);
                }
            }
            Action::GiveUpExtend(p) => {
                let pi = usize::from(p);
                if let Status::Extending {
                    claim,
                    gen,
                    lease_until,
                    extends_left,
                    ..
                } = s.proposers[pi]
                {
                    s.holders[pi] = None;
                    s.proposers[pi] = Status::Holder {
                        claim,
                        gen,
                        lease_until,
                        extends_left,
                    };
                }
            }
            Action::Merge { src, dst } => {
                self.anti_entropy(&mut s, usize::from(src), usize::from(dst))
            }
            Action::Tick => self.tick(&mut s),
            Action::Crash(r) => s.down[usize::from(r)] = true,
        }
        self.normalize(&mut s);
        (s != *last).then_some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut props = vec![
            Property::always(TWO_LIVE_GRANTS, |_, s: &State| {
                s.proposers.iter().filter(|p| p.live_grant(s.now)).count() < 2
            }),
            Property::always(NO_NEW_AFTER_ACK, |_, s: &State| !s.ghost.new_after_ack),
            Property::always(REPLAYS_STABLE, |_, s: &State| !s.ghost.resp_changed),
            Property::always(MISMATCH_EXACT, |_, s: &State| {
                !s.ghost.mismatch_same_fp
                    && !s.ghost.new_over_other_fp
                    && !s.ghost.mismatch_own_request
            }),
            Property::always(CONVERGENCE, |m: &IdemModel, s: &State| {
                if s.now < m.cfg.tmax {
                    return true;
                }
                // Judged once every lease has ended (a fresh proposal after contention
                // can end its lease past `tmax`): a live lease rightly holds off a merge.
                let end = s
                    .records
                    .iter()
                    .flatten()
                    .map(|r| r.lease)
                    .fold(s.now, u8::max);
                m.converges(end, &s.records.map(|r| r.map(|x| x.at(end))), &s.down)
            }),
            Property::always(NO_DUAL_COMPLETION, |_, s: &State| !s.ghost.dual_completion),
            Property::always(WITHDRAW_STICKS, |_, s: &State| !s.ghost.withdraw_undone),
            Property::sometimes(SOME_NEW, |_, s: &State| {
                s.proposers.iter().any(|p| p.was_granted())
            }),
            Property::sometimes(SOME_ACK, |_, s: &State| {
                s.proposers.contains(&Status::Acked)
            }),
            Property::sometimes(SOME_TAKEOVER, |_, s: &State| {
                s.proposers.iter().all(|p| p.was_granted())
            }),
        ];
        // What a second Reserve can find, so the search is not vacuous: with one
        // fingerprint a REPLAY, with two a MISMATCH.
        if self.all_equal_fingerprints() {
            props.push(Property::sometimes(SOME_REPLAY, |_, s: &State| {
                s.proposers
                    .iter()
                    .any(|p| matches!(p, Status::Done(Answer::Replay(_))))
            }));
        } else {
            props.push(Property::sometimes(SOME_MISMATCH, |_, s: &State| {
                s.proposers.contains(&Status::Done(Answer::Mismatch))
            }));
        }
        if self.cfg.contention > 0 {
            props.push(Property::sometimes(
                SOME_NEW_AFTER_CONTENTION,
                |_, s: &State| s.ghost.new_after_contention,
            ));
        }
        if self.cfg.extends > 0 {
            props.push(Property::sometimes(SOME_EXTEND, |_, s: &State| {
                s.ghost.extended
            }));
        }
        if self.cfg.retry_after_ack {
            props.push(Property::sometimes(SOME_RETRY_REPLAYED, |_, s: &State| {
                (0..PROPOSERS).any(|p| {
                    s.ghost.retried[p] && matches!(s.proposers[p], Status::Done(Answer::Replay(_)))
                })
            }));
        }
        props
    }
}
