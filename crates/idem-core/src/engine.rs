//! The proposer engine (DESIGN §3): one GLOBAL Reserve as a state machine, with no I/O.
//!
//! The driver (`idem-geo` over real region links, the model check and tests over their
//! own) feeds it the call, each region's reply and the timers it asked for, and performs
//! the [`Command`]s it returns: proposals to send to every region, withdraws to
//! broadcast, one timer at a time, and exactly one [`Answer`]. Every rule of the
//! proposer lives here or in [`crate::proposer::Tally`]: the order of verdicts, StaleGen
//! retries, contention retries with randomized back-off, withdraws, the deadline.
//!
//! Time is the driver's lease-judging clock in milliseconds, passed with every input;
//! randomness is a seeded generator in the state, so a run replays from its inputs.

use crate::acceptor::ReserveOutcome;
use crate::proposer::{Reply, Tally, Verdict};
use crate::{ClaimId, CommandResult, Fence, Fingerprint, Op, Phase, Record};

/// The rule that turns replies into NEW.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A majority of regions accepted within the lease (DESIGN §3).
    Majority,
    /// Deliberately broken, for the fault suite and the model check: NEW as soon as the
    /// local region accepted.
    BrokenLocalAccept,
    /// Deliberately broken, for the fault suite: a Complete acknowledged as soon as one
    /// region stored it (the holder engine's rule; Reserves follow `Majority`).
    BrokenEarlyAck,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EngineConfig {
    /// Regions, this one included; replies name a region by its slot `0..regions`.
    pub regions: usize,
    /// This node's region's slot: its record's attempt count is the one reported.
    pub local: Option<usize>,
    /// How long one round of proposals waits for the regions.
    pub round_timeout_ms: u64,
    /// StaleGen retries of one proposal.
    pub max_stale_retries: u32,
    /// Fresh proposals after contention, at most (within the deadline).
    pub max_contention_rounds: u32,
    pub rule: Rule,
}

/// Most fresh proposals after contention, by default. With `k` proposers racing, a
/// round ends with no winner only if no proposer's pause leads all others' by about one
/// proposal time `d`; over a window `w` that is at most `1 - (1 - d/w)^k`, and the
/// window (two proposal times at first) doubles every round up to [`MAX_PAUSE_WINDOWS`]
/// proposal times (see
/// `docs/protocol.md` §3 for the bound on expected rounds).
pub const MAX_CONTENTION_ROUNDS: u32 = 8;

/// The contention pause's window grows to at most this many proposal times.
pub const MAX_PAUSE_WINDOWS: u64 = 32;

/// The shortest proposal time the contention pause is measured in (a faster proposal
/// counts as this long): the pause is at least this, its window at least twice this.
pub const MIN_PAUSE_WINDOW_MS: u64 = 20;

/// An IN_FLIGHT answer caused by contention advises a wait in this range (jittered), never
/// a lease: nobody holds the key.
pub const CONTENDED_HINT_MS: std::ops::Range<u64> = 50..250;

/// One GLOBAL Reserve as the caller asked it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReserveCall {
    pub fingerprint: Fingerprint,
    pub lease_ms: u64,
    pub retention_ms: u64,
    pub first_attempt_ms: u64,
    /// The call is answered by then, whatever the regions do (driver time).
    pub deadline_ms: u64,
}

/// What the driver does next (`A`: the engine's answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command<A = Answer> {
    /// Send `op` to the key's group in every region; report each reply with `round`
    /// (replies of an earlier round are ignored, and its calls need not go on).
    Send { round: u32, op: Op },
    /// Send `op` (an `Op::Withdraw` of the current claim at the highest generation it
    /// was proposed at) to every region; nobody waits for the replies, but the driver
    /// must not drop it (a withdraw that is lost leaves the key held for nobody).
    Withdraw { op: Op },
    /// Send `op` to every region and forget the replies (a completion's final notice:
    /// anti-entropy carries it where the notice is lost).
    Notify { op: Op },
    /// Call the engine's `on_timer` with `token` at `at_ms`; replaces any timer set
    /// before.
    Timer { token: u32, at_ms: u64 },
    /// The call's answer; the engine does nothing more.
    Answer(A),
}

/// An engine as its driver sees it: [`ReserveEngine`] and
/// [`crate::holder::HolderEngine`]. The driver performs the commands and reports back;
/// it decides nothing.
pub trait Engine {
    type Answer;
    /// Region `region` answered round `round` with `result`; `None`: the call failed
    /// and no reply will come.
    fn on_result(
        &mut self,
        round: u32,
        region: usize,
        result: Option<&CommandResult>,
        now_ms: u64,
    ) -> Vec<Command<Self::Answer>>;
    /// The timer set with `token` fired.
    fn on_timer(&mut self, token: u32, now_ms: u64) -> Vec<Command<Self::Answer>>;
    /// The caller is gone: what must still be sent.
    fn abandon(&mut self) -> Vec<Command<Self::Answer>>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Decided {
        outcome: ReserveOutcome,
        /// Which attempt this is, from the local region's record (0 when unknown).
        attempt: u32,
        since_previous_ms: Option<u64>,
    },
    /// Fewer than a majority of regions answered the last round.
    Unavailable {
        answered: usize,
        regions: usize,
        waited_ms: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Stage {
    Idle,
    Proposing,
    /// Waiting out a contention pause before a fresh proposal.
    Pausing,
    Done,
}

/// The state of one Reserve. `Clone + Eq + Hash`, so a model check can explore it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReserveEngine {
    cfg: EngineConfig,
    call: ReserveCall,
    base_claim: ClaimId,
    /// splitmix64 state: the contention pauses and hints.
    rng: u64,
    stage: Stage,
    /// Rounds sent so far (StaleGen rounds and fresh proposals alike): replies carry it.
    proposal: u32,
    /// The token of the one timer that counts.
    timer: u32,
    /// Fresh proposals made after contention.
    contention_rounds: u32,
    claim: ClaimId,
    generation: u32,
    lease_until_ms: u64,
    stale_left: u32,
    /// When the current fresh proposal (with its StaleGen rounds) started.
    proposal_started_ms: u64,
    round_started_ms: u64,
    /// A majority of regions answered the round before the current one.
    heard_majority: bool,
    tally: Tally,
    facts: Option<(u32, Option<u64>)>,
    takeover: Option<Fence>,
}

/// The generation a fresh proposal starts at, from this node's copy of the record: the
/// record's own while a live lease holds it, else the next (a wrong guess costs one
/// StaleGen round, never safety: acceptors judge generations themselves).
pub fn first_generation(local: Option<&Record>, now_ms: u64) -> u32 {
    match local {
        None => 1,
        Some(r) if r.phase == Phase::Reserved && now_ms < r.lease_expires_ms => r.generation,
        Some(r) => r.generation.saturating_add(1),
    }
}

impl ReserveEngine {
    /// `claim`: a claim no other call uses (its nonce is varied for fresh proposals);
    /// `seed`: randomness for the back-off.
    pub fn new(cfg: EngineConfig, call: ReserveCall, claim: ClaimId, seed: u64) -> Self {
        let regions = cfg.regions;
        ReserveEngine {
            stale_left: cfg.max_stale_retries,
            cfg,
            call,
            base_claim: claim,
            rng: seed,
            stage: Stage::Idle,
            proposal: 0,
            timer: 0,
            contention_rounds: 0,
            claim,
            generation: 1,
            lease_until_ms: 0,
            proposal_started_ms: 0,
            round_started_ms: 0,
            heard_majority: false,
            tally: Tally::new(regions),
            facts: None,
            takeover: None,
        }
    }

    /// Begin: propose at `generation` (see [`first_generation`]).
    pub fn start(&mut self, now_ms: u64, generation: u32) -> Vec<Command> {
        if self.stage != Stage::Idle {
            return Vec::new();
        }
        self.generation = generation.max(1);
        self.fresh_proposal(now_ms)
    }

    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Fresh proposals made after contention so far.
    pub fn contention_rounds(&self) -> u32 {
        self.contention_rounds
    }

    /// The token of the timer that counts (the last one set).
    pub fn timer_token(&self) -> u32 {
        self.timer
    }

    /// The current proposal's number while region `region`'s reply to it may still come
    /// (a driver that delivers one reply per region and proposal asks this first).
    pub fn awaiting(&self, region: usize) -> Option<u32> {
        (self.stage == Stage::Proposing && self.tally.is_open(region)).then_some(self.proposal)
    }

    /// Region `region` answered proposal `proposal`.
    pub fn on_reply(
        &mut self,
        proposal: u32,
        region: usize,
        outcome: &ReserveOutcome,
        attempt: u32,
        since_previous_ms: Option<u64>,
        now_ms: u64,
    ) -> Vec<Command> {
        if self.stage != Stage::Proposing || proposal != self.proposal || region >= self.cfg.regions
        {
            return Vec::new();
        }
        if Some(region) == self.cfg.local || self.facts.is_none() {
            self.facts = Some((attempt, since_previous_ms));
        }
        if let ReserveOutcome::New {
            takeover: Some(t), ..
        } = outcome
        {
            self.takeover = Some(*t);
        }
        let reply = Reply::from_outcome(outcome);
        let live = now_ms < self.lease_until_ms;
        if self.cfg.rule == Rule::BrokenLocalAccept
            && Some(region) == self.cfg.local
            && reply == Reply::Accepted
            && live
        {
            self.tally.record(region, reply);
            return self.finish(Verdict::New, now_ms);
        }
        self.tally.record(region, reply);
        self.judge(now_ms)
    }

    /// Region `region`'s call for proposal `proposal` failed: no reply will come.
    pub fn on_lost(&mut self, proposal: u32, region: usize, now_ms: u64) -> Vec<Command> {
        if self.stage != Stage::Proposing || proposal != self.proposal {
            return Vec::new();
        }
        self.tally.lose(region);
        self.judge(now_ms)
    }

    fn withdraw(&self) -> Command {
        Command::Withdraw {
            op: Op::Withdraw {
                claim: self.claim,
                generation: self.generation,
                fingerprint: self.call.fingerprint,
                retention_ms: self.call.retention_ms,
            },
        }
    }

    fn judge(&mut self, now_ms: u64) -> Vec<Command> {
        let live = now_ms < self.lease_until_ms;
        if let Some(v) = self.tally.decide(live) {
            return self.finish(v, now_ms);
        }
        if self.tally.settled(live) {
            let v = self.conclusion(now_ms);
            return self.finish(v, now_ms);
        }
        Vec::new()
    }

    /// The round's verdict when no reply decided it; no StaleGen retry past the deadline.
    /// Unavailable only when a round had its whole timeout: a later round that the
    /// deadline cut short, after a round a majority of regions answered, is contention,
    /// so the caller gets a short hint, not an error for regions that are up.
    fn conclusion(&self, now_ms: u64) -> Verdict {
        let left = if now_ms < self.call.deadline_ms {
            self.stale_left
        } else {
            0
        };
        match self.tally.conclude(self.generation, left) {
            Verdict::Unavailable
                if self.heard_majority
                    && now_ms >= self.call.deadline_ms
                    && now_ms.saturating_sub(self.round_started_ms) < self.cfg.round_timeout_ms =>
            {
                Verdict::Contended
            }
            v => v,
        }
    }

    fn random(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The window the next contention pause is drawn from: two of the last proposal's
    /// duration (at least [`MIN_PAUSE_WINDOW_MS`]), doubled for every round of contention
    /// so far, up to [`MAX_PAUSE_WINDOWS`] of it.
    fn pause_window_ms(&self, now_ms: u64) -> u64 {
        let took = now_ms
            .saturating_sub(self.proposal_started_ms)
            .max(MIN_PAUSE_WINDOW_MS);
        let factor = (2u64 << self.contention_rounds.min(16)).min(MAX_PAUSE_WINDOWS);
        took.saturating_mul(factor)
    }

    fn fresh_proposal(&mut self, now_ms: u64) -> Vec<Command> {
        if self.proposal > 0 {
            // A claim of its own, so that late copies of the withdrawn one stay apart.
            self.claim = ClaimId {
                nonce: self.base_claim.nonce.wrapping_add(self.contention_rounds),
                ..self.base_claim
            };
        }
        self.lease_until_ms = now_ms.saturating_add(self.call.lease_ms);
        self.stale_left = self.cfg.max_stale_retries;
        self.proposal_started_ms = now_ms;
        self.round(now_ms)
    }

    fn round(&mut self, now_ms: u64) -> Vec<Command> {
        self.stage = Stage::Proposing;
        self.heard_majority = self.proposal > 0 && self.tally.answered() >= self.tally.majority();
        self.proposal = self.proposal.wrapping_add(1);
        self.round_started_ms = now_ms;
        self.tally = Tally::new(self.cfg.regions);
        let op = Op::Propose {
            fingerprint: self.call.fingerprint,
            claim: self.claim,
            generation: self.generation,
            lease_ms: self.call.lease_ms,
            lease_until_ms: self.lease_until_ms,
            retention_ms: self.call.retention_ms,
            first_attempt_ms: self.call.first_attempt_ms,
        };
        let at_ms = now_ms
            .saturating_add(self.cfg.round_timeout_ms)
            .min(self.call.deadline_ms.max(now_ms));
        vec![
            Command::Send {
                round: self.proposal,
                op,
            },
            self.set_timer(at_ms),
        ]
    }

    fn set_timer(&mut self, at_ms: u64) -> Command {
        self.timer = self.timer.wrapping_add(1);
        Command::Timer {
            token: self.timer,
            at_ms,
        }
    }

    fn finish(&mut self, verdict: Verdict, now_ms: u64) -> Vec<Command> {
        let mut out = Vec::new();
        if verdict.withdraws() {
            out.push(self.withdraw());
        }
        let fence = Fence {
            generation: self.generation,
            claim: self.claim,
        };
        let outcome = match verdict {
            Verdict::Retry { generation } => {
                self.stale_left = self.stale_left.saturating_sub(1);
                self.generation = generation;
                out.extend(self.round(now_ms));
                return out;
            }
            Verdict::Contended => {
                // At least one proposal time, so that the withdraw just sent has
                // most likely landed (a contender that concludes later, on its timer,
                // withdraws later) before this proposer proposes again; then a random
                // share of the window.
                let took = now_ms.saturating_sub(self.proposal_started_ms);
                let pause = took.max(MIN_PAUSE_WINDOW_MS)
                    + self.random() % (self.pause_window_ms(now_ms) + 1);
                let resume = now_ms.saturating_add(pause);
                let next = self.generation.max(self.tally.highest_generation());
                match next.checked_add(1) {
                    Some(g)
                        if self.contention_rounds < self.cfg.max_contention_rounds
                            && resume.saturating_add(took) < self.call.deadline_ms =>
                    {
                        // Nobody holds the key: withdraw, wait a random while, and
                        // propose again above every generation seen.
                        self.contention_rounds += 1;
                        self.generation = g;
                        self.stage = Stage::Pausing;
                        out.push(self.set_timer(resume));
                        return out;
                    }
                    _ => {
                        let span = CONTENDED_HINT_MS.end - CONTENDED_HINT_MS.start;
                        ReserveOutcome::InFlight {
                            holder: fence,
                            retry_after_ms: CONTENDED_HINT_MS.start + self.random() % span,
                        }
                    }
                }
            }
            Verdict::New => ReserveOutcome::New {
                fence,
                lease_expires_ms: self.lease_until_ms,
                takeover: self.takeover,
            },
            Verdict::Replay { fence, response } => ReserveOutcome::Replay { fence, response },
            Verdict::Mismatch { stored } => ReserveOutcome::Mismatch { stored },
            Verdict::TooOld {
                first_attempt_ms,
                limit_ms,
            } => ReserveOutcome::TooOld {
                first_attempt_ms,
                limit_ms,
            },
            Verdict::InFlight { retry_after_ms } => ReserveOutcome::InFlight {
                holder: fence,
                retry_after_ms,
            },
            Verdict::Unavailable => {
                self.stage = Stage::Done;
                out.push(Command::Answer(Answer::Unavailable {
                    answered: self.tally.answered(),
                    regions: self.cfg.regions,
                    waited_ms: now_ms.saturating_sub(self.round_started_ms),
                }));
                return out;
            }
        };
        self.stage = Stage::Done;
        let (attempt, since_previous_ms) = self.facts.unwrap_or((0, None));
        out.push(Command::Answer(Answer::Decided {
            outcome,
            attempt,
            since_previous_ms,
        }));
        out
    }
}

impl Engine for ReserveEngine {
    type Answer = Answer;

    fn on_result(
        &mut self,
        round: u32,
        region: usize,
        result: Option<&CommandResult>,
        now_ms: u64,
    ) -> Vec<Command> {
        match result {
            Some(CommandResult::Reserve {
                outcome,
                attempt,
                since_previous_ms,
            }) => self.on_reply(round, region, outcome, *attempt, *since_previous_ms, now_ms),
            // A failed call, or an answer that is no reply to a proposal.
            _ => self.on_lost(round, region, now_ms),
        }
    }

    /// The timer set with `token` fired.
    fn on_timer(&mut self, token: u32, now_ms: u64) -> Vec<Command> {
        if token != self.timer {
            return Vec::new();
        }
        match self.stage {
            // The round timed out (or the deadline came).
            Stage::Proposing => {
                let v = self.conclusion(now_ms);
                self.finish(v, now_ms)
            }
            Stage::Pausing => self.fresh_proposal(now_ms),
            Stage::Idle | Stage::Done => Vec::new(),
        }
    }

    /// The call is abandoned (its caller is gone): withdraw what the current proposal
    /// may have collected. Nothing when it was answered or is between proposals.
    fn abandon(&mut self) -> Vec<Command> {
        let was = std::mem::replace(&mut self.stage, Stage::Done);
        match was {
            Stage::Proposing => vec![self.withdraw()],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoredResponse;

    const LEASE: u64 = 10_000;
    const ROUND: u64 = 1_500;

    fn cfg(regions: usize) -> EngineConfig {
        EngineConfig {
            regions,
            local: Some(0),
            round_timeout_ms: ROUND,
            max_stale_retries: 2,
            max_contention_rounds: MAX_CONTENTION_ROUNDS,
            rule: Rule::Majority,
        }
    }

    fn claim(n: u32) -> ClaimId {
        ClaimId {
            hlc: 77,
            region: 1,
            node: 2,
            nonce: n,
        }
    }

    fn engine(regions: usize, deadline_ms: u64) -> ReserveEngine {
        ReserveEngine::new(
            cfg(regions),
            ReserveCall {
                fingerprint: Fingerprint([1; 32]),
                lease_ms: LEASE,
                retention_ms: 86_400_000,
                first_attempt_ms: 0,
                deadline_ms,
            },
            claim(100),
            42,
        )
    }

    fn accepted(e: &ReserveEngine) -> ReserveOutcome {
        ReserveOutcome::New {
            fence: Fence {
                generation: e.generation,
                claim: e.claim,
            },
            lease_expires_ms: e.lease_until_ms,
            takeover: None,
        }
    }

    fn held(by: u32, generation: u32, retry_after_ms: u64) -> ReserveOutcome {
        ReserveOutcome::InFlight {
            holder: Fence {
                generation,
                claim: claim(by),
            },
            retry_after_ms,
        }
    }

    /// Proposal `p` splits the regions three ways: region 0 accepts it, regions 1 and 2
    /// hold claims 7 and 8 (the last reply comes at `at`): the commands that follow.
    fn split_vote(e: &mut ReserveEngine, p: u32, at: u64) -> Vec<Command> {
        let a = accepted(e);
        e.on_reply(p, 0, &a, 1, None, at.saturating_sub(2));
        e.on_reply(p, 1, &held(7, 1, LEASE), 1, None, at.saturating_sub(1));
        e.on_reply(p, 2, &held(8, 1, LEASE), 1, None, at)
    }

    /// The proposal a command list sends, with its op.
    fn proposed(cmds: &[Command]) -> Option<(u32, Op)> {
        cmds.iter().find_map(|c| match c {
            Command::Send { round, op } => Some((*round, op.clone())),
            _ => None,
        })
    }

    fn timer(cmds: &[Command]) -> Option<(u32, u64)> {
        cmds.iter().find_map(|c| match c {
            Command::Timer { token, at_ms } => Some((*token, *at_ms)),
            _ => None,
        })
    }

    fn answer(cmds: &[Command]) -> Option<Answer> {
        cmds.iter().find_map(|c| match c {
            Command::Answer(a) => Some(a.clone()),
            _ => None,
        })
    }

    fn withdrew(cmds: &[Command]) -> Option<ClaimId> {
        cmds.iter().find_map(|c| match c {
            Command::Withdraw {
                op: Op::Withdraw { claim, .. },
            } => Some(*claim),
            _ => None,
        })
    }

    fn outcome(cmds: &[Command]) -> ReserveOutcome {
        match answer(cmds) {
            Some(Answer::Decided { outcome, .. }) => outcome,
            other => panic!("no decided answer: {other:?} in {cmds:?}"),
        }
    }

    #[test]
    fn a_majority_of_accepts_within_the_lease_is_new_and_nothing_is_withdrawn() {
        let mut e = engine(3, 6_000);
        let c = e.start(0, 1);
        let (p, op) = proposed(&c).unwrap();
        assert!(matches!(
            op,
            Op::Propose {
                generation: 1,
                lease_until_ms: LEASE,
                ..
            }
        ));
        assert_eq!(timer(&c).unwrap().1, ROUND);
        let a = accepted(&e);
        assert!(e.on_reply(p, 0, &a, 1, None, 10).is_empty());
        let c = e.on_reply(p, 2, &a, 3, Some(5), 20);
        assert!(matches!(outcome(&c), ReserveOutcome::New { .. }));
        assert_eq!(withdrew(&c), None);
        assert!(e.is_done());
        // The local region's attempt count is reported, not the last reply's.
        assert!(matches!(
            answer(&c),
            Some(Answer::Decided { attempt: 1, .. })
        ));
        // Nothing after the answer.
        assert!(e.on_reply(p, 1, &a, 1, None, 30).is_empty());
    }

    #[test]
    fn accepts_after_the_lease_ended_are_not_new() {
        let mut e = engine(3, 60_000);
        let c = e.start(0, 1);
        let (p, _) = proposed(&c).unwrap();
        let a = accepted(&e);
        e.on_reply(p, 0, &a, 1, None, LEASE - 1);
        let c = e.on_reply(p, 1, &a, 1, None, LEASE);
        assert!(answer(&c).is_none(), "no NEW past the lease: {c:?}");
        assert_eq!(
            withdrew(&c),
            Some(claim(100)),
            "the late accepts are taken back"
        );
        assert!(!e.is_done(), "contention: a fresh proposal follows");
    }

    #[test]
    fn a_majority_naming_one_holder_is_in_flight_for_that_lease() {
        let mut e = engine(3, 6_000);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        let a = accepted(&e);
        e.on_reply(p, 0, &a, 1, None, 5);
        assert!(e.on_reply(p, 1, &held(7, 1, 9_000), 1, None, 6).is_empty());
        let c = e.on_reply(p, 2, &held(7, 1, 8_000), 1, None, 7);
        assert_eq!(withdrew(&c), Some(claim(100)));
        assert!(matches!(
            outcome(&c),
            ReserveOutcome::InFlight {
                retry_after_ms: 8_000,
                ..
            }
        ));
    }

    #[test]
    fn a_split_vote_is_contention_withdrawn_and_proposed_again_with_a_fresh_claim_above_every_generation_seen(
    ) {
        let mut e = engine(3, 6_000);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        let a = accepted(&e);
        e.on_reply(p, 0, &a, 1, None, 5);
        assert!(e.on_reply(p, 1, &held(7, 3, 9_000), 1, None, 6).is_empty());
        // The third reply cannot make a majority for anyone: contention, no lease to wait.
        let c = e.on_reply(p, 2, &held(8, 1, 9_000), 1, None, 40);
        assert_eq!(withdrew(&c), Some(claim(100)));
        assert!(answer(&c).is_none());
        let (t, at) = timer(&c).unwrap();
        // The first pause is one proposal time (40 ms) and a share of two more.
        assert!((80..=160).contains(&at), "pause ends at {at}");
        assert_eq!(e.contention_rounds(), 1);
        let c = e.on_timer(t, at);
        let (p2, op) = proposed(&c).unwrap();
        assert_ne!(p2, p);
        let Op::Propose {
            claim: c2,
            generation,
            lease_until_ms,
            ..
        } = op
        else {
            unreachable!()
        };
        assert_ne!(c2, claim(100), "a fresh claim");
        assert_eq!(generation, 4, "above the holder's generation 3");
        assert_eq!(lease_until_ms, at + LEASE, "a fresh lease");
        // Replies to the withdrawn proposal no longer count.
        assert!(e.on_reply(p, 1, &a, 1, None, at + 1).is_empty());
        let a = accepted(&e);
        e.on_reply(p2, 1, &a, 1, None, at + 2);
        let c = e.on_reply(p2, 2, &a, 1, None, at + 3);
        assert!(matches!(outcome(&c), ReserveOutcome::New { .. }));
    }

    #[test]
    fn contention_that_outlasts_its_rounds_answers_a_short_jittered_hint_never_a_lease() {
        let mut hints = std::collections::BTreeSet::new();
        for seed in 0..50 {
            let mut e =
                ReserveEngine::new(cfg(3), engine(3, 1_000_000).call.clone(), claim(100), seed);
            let mut c = e.start(0, 1);
            let mut now = 0;
            let mut proposals = 0;
            let hint = loop {
                if let Some(a) = answer(&c) {
                    let Answer::Decided {
                        outcome: ReserveOutcome::InFlight { retry_after_ms, .. },
                        ..
                    } = a
                    else {
                        panic!("{a:?}");
                    };
                    break retry_after_ms;
                }
                if let Some((p, _)) = proposed(&c) {
                    proposals += 1;
                    now += 30;
                    c = split_vote(&mut e, p, now);
                } else {
                    let (t, at) = timer(&c).unwrap();
                    now = at;
                    c = e.on_timer(t, at);
                }
            };
            assert_eq!(proposals, 1 + MAX_CONTENTION_ROUNDS);
            assert!(CONTENDED_HINT_MS.contains(&hint), "hint {hint}");
            hints.insert(hint);
        }
        assert!(hints.len() > 10, "jittered: {hints:?}");
    }

    #[test]
    fn pauses_are_random_within_a_window_that_doubles_and_is_capped() {
        let mut e = engine(3, u64::MAX);
        e.proposal_started_ms = 0;
        let w = |e: &ReserveEngine, rounds| {
            let mut e = e.clone();
            e.contention_rounds = rounds;
            e.pause_window_ms(50)
        };
        assert_eq!(w(&e, 0), 100);
        assert_eq!(w(&e, 1), 200);
        assert_eq!(w(&e, 3), 800);
        assert_eq!(w(&e, 9), 50 * MAX_PAUSE_WINDOWS);
        e.proposal_started_ms = 45;
        assert_eq!(w(&e, 0), 2 * MIN_PAUSE_WINDOW_MS);
    }

    /// Contended with proposal time `took`: the timer the engine sets for its pause.
    fn pause_end(seed: u64, took: u64) -> u64 {
        let mut e = ReserveEngine::new(cfg(3), engine(3, 1_000_000).call.clone(), claim(100), seed);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        let c = split_vote(&mut e, p, took);
        timer(&c).expect("a pause").1
    }

    #[test]
    fn contention_pauses_differ_between_proposers_and_start_after_one_proposal_time() {
        let ends: std::collections::BTreeSet<u64> = (0..40).map(|s| pause_end(s, 100)).collect();
        assert!(ends.len() > 20, "pauses spread: {ends:?}");
        // One proposal time (100) to wait, then up to two more.
        assert!(ends.iter().all(|t| (200..=400).contains(t)), "{ends:?}");
    }

    #[test]
    fn a_call_abandoned_during_its_pause_sends_nothing_more() {
        let mut e = engine(3, 6_000);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        let c = split_vote(&mut e, p, 30);
        let (t, at) = timer(&c).unwrap();
        assert!(e.abandon().is_empty(), "the withdraw was already sent");
        assert!(
            e.on_timer(t, at).is_empty(),
            "no fresh proposal after abandon"
        );
    }

    #[test]
    fn no_fresh_proposal_starts_when_the_deadline_would_cut_it() {
        // The contended proposal took 400 ms; 500 ms are left: not enough for the pause
        // (at least one proposal time) and another 400 ms proposal.
        for seed in 0..20 {
            let mut e = ReserveEngine::new(cfg(3), engine(3, 900).call.clone(), claim(100), seed);
            let (p, _) = proposed(&e.start(0, 1)).unwrap();
            let c = split_vote(&mut e, p, 400);
            assert!(
                matches!(
                    answer(&c),
                    Some(Answer::Decided {
                        outcome: ReserveOutcome::InFlight { retry_after_ms, .. },
                        ..
                    }) if CONTENDED_HINT_MS.contains(&retry_after_ms)
                ),
                "seed {seed}: a fresh proposal the deadline would cut: {c:?}"
            );
        }
    }

    #[test]
    fn no_fresh_proposal_can_start_past_the_deadline() {
        let mut e = engine(3, 50);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        let c = split_vote(&mut e, p, 50);
        assert!(matches!(
            outcome(&c),
            ReserveOutcome::InFlight { retry_after_ms, .. } if CONTENDED_HINT_MS.contains(&retry_after_ms)
        ));
    }

    #[test]
    fn stale_generation_retries_the_same_claim_above_the_highest_then_stops() {
        let mut e = engine(3, 60_000);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        e.on_reply(p, 0, &ReserveOutcome::StaleGen { stored: 4 }, 1, None, 1);
        let c = e.on_reply(p, 1, &ReserveOutcome::StaleGen { stored: 2 }, 1, None, 2);
        assert_eq!(withdrew(&c), None, "a StaleGen retry keeps its accepts");
        let (p2, op) = proposed(&c).unwrap();
        assert!(
            matches!(op, Op::Propose { generation: 5, claim: c, .. } if c == claim(100)),
            "{op:?}"
        );
        let c = e.on_reply(p2, 0, &ReserveOutcome::StaleGen { stored: 6 }, 1, None, 3);
        assert!(c.is_empty());
        let c = e.on_reply(p2, 1, &ReserveOutcome::StaleGen { stored: 6 }, 1, None, 4);
        let (p3, op) = proposed(&c).unwrap();
        assert!(matches!(op, Op::Propose { generation: 7, .. }));
        e.on_reply(p3, 0, &ReserveOutcome::StaleGen { stored: 8 }, 1, None, 5);
        let c = e.on_reply(p3, 1, &ReserveOutcome::StaleGen { stored: 8 }, 1, None, 6);
        // Out of StaleGen retries: nobody holds it at a majority, so contention.
        assert_eq!(withdrew(&c), Some(claim(100)));
        assert!(proposed(&c).is_none() && answer(&c).is_none());
    }

    #[test]
    fn fewer_than_a_majority_answering_in_the_round_is_unavailable() {
        let mut e = engine(3, 6_000);
        let c = e.start(0, 1);
        let (p, _) = proposed(&c).unwrap();
        let (t, at) = timer(&c).unwrap();
        e.on_reply(p, 0, &accepted(&e), 1, None, 5);
        assert!(e.on_timer(t + 1, at).is_empty(), "a stale timer is ignored");
        let c = e.on_timer(t, at);
        assert_eq!(withdrew(&c), Some(claim(100)));
        assert_eq!(
            answer(&c),
            Some(Answer::Unavailable {
                answered: 1,
                regions: 3,
                waited_ms: ROUND
            })
        );
    }

    #[test]
    fn a_stale_generation_round_the_deadline_cuts_short_is_contention_not_unavailable() {
        // Two StaleGen replies 300 ms before the deadline: the retry round gets 300 ms,
        // not a round timeout, and one region answers in it.
        let mut e = engine(3, 1_000);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        e.on_reply(p, 0, &ReserveOutcome::StaleGen { stored: 3 }, 1, None, 690);
        let c = e.on_reply(p, 1, &ReserveOutcome::StaleGen { stored: 3 }, 1, None, 700);
        let (p2, _) = proposed(&c).unwrap();
        let (t, at) = timer(&c).unwrap();
        assert_eq!(at, 1_000, "the retry round ends at the deadline");
        e.on_reply(p2, 0, &accepted(&e), 1, None, 750);
        let c = e.on_timer(t, at);
        assert_eq!(withdrew(&c), Some(claim(100)));
        assert!(
            matches!(
                outcome(&c),
                ReserveOutcome::InFlight { retry_after_ms, .. } if CONTENDED_HINT_MS.contains(&retry_after_ms)
            ),
            "{c:?}"
        );
        // The same round with its whole timeout, or with every call lost before the
        // deadline, is Unavailable.
        let mut e = engine(3, 60_000);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        e.on_reply(p, 0, &ReserveOutcome::StaleGen { stored: 3 }, 1, None, 10);
        let c = e.on_reply(p, 1, &ReserveOutcome::StaleGen { stored: 3 }, 1, None, 20);
        let (p2, _) = proposed(&c).unwrap();
        let (t, at) = timer(&c).unwrap();
        e.on_reply(p2, 0, &accepted(&e), 1, None, 30);
        assert!(matches!(
            answer(&e.on_timer(t, at)),
            Some(Answer::Unavailable { answered: 1, .. })
        ));
        let mut e = engine(3, 1_000);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        e.on_reply(p, 0, &ReserveOutcome::StaleGen { stored: 3 }, 1, None, 690);
        let c = e.on_reply(p, 1, &ReserveOutcome::StaleGen { stored: 3 }, 1, None, 700);
        let (p2, _) = proposed(&c).unwrap();
        e.on_lost(p2, 1, 710);
        assert!(matches!(
            answer(&e.on_lost(p2, 2, 720)),
            Some(Answer::Unavailable { answered: 0, .. })
        ));
        // A retry round after a round only one region answered (the others silent for a
        // whole round timeout), cut short by the deadline: the regions are not shown
        // up, so it is Unavailable.
        let mut e = engine(3, ROUND + 300);
        let c = e.start(0, 1);
        let (p, _) = proposed(&c).unwrap();
        let (t, at) = timer(&c).unwrap();
        e.on_reply(p, 0, &ReserveOutcome::StaleGen { stored: 3 }, 1, None, 10);
        let c = e.on_timer(t, at);
        let (p2, _) = proposed(&c).unwrap();
        let (t2, at2) = timer(&c).unwrap();
        assert_eq!(at2, ROUND + 300, "the retry round ends at the deadline");
        e.on_reply(p2, 0, &accepted(&e), 1, None, ROUND + 10);
        assert!(matches!(
            answer(&e.on_timer(t2, at2)),
            Some(Answer::Unavailable { answered: 1, .. })
        ));
    }

    #[test]
    fn lost_calls_settle_the_round_without_waiting_for_the_timer() {
        let mut e = engine(3, 6_000);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        e.on_reply(p, 0, &accepted(&e), 1, None, 5);
        assert!(e.on_lost(p, 1, 6).is_empty(), "region 2 may still accept");
        let c = e.on_lost(p, 2, 7);
        assert!(matches!(
            answer(&c),
            Some(Answer::Unavailable { answered: 1, .. })
        ));
    }

    #[test]
    fn the_round_timer_never_runs_past_the_deadline() {
        let mut e = engine(3, 700);
        assert_eq!(timer(&e.start(100, 1)).unwrap().1, 700);
    }

    #[test]
    fn replay_beats_mismatch_and_every_such_verdict_withdraws() {
        let replay = ReserveOutcome::Replay {
            fence: Fence {
                generation: 1,
                claim: claim(9),
            },
            response: StoredResponse::default(),
        };
        let mismatch = ReserveOutcome::Mismatch {
            stored: Fingerprint([2; 32]),
        };
        // Replay and Mismatch arriving together (one decision over both): REPLAY.
        let mut t = crate::proposer::Tally::new(3);
        t.record(0, Reply::from_outcome(&mismatch));
        t.record(1, Reply::from_outcome(&replay));
        assert!(matches!(t.decide(true), Some(Verdict::Replay { .. })));
        let too_old = ReserveOutcome::TooOld {
            first_attempt_ms: 1,
            limit_ms: 2,
        };
        for (o, want) in [
            (&replay, "replay"),
            (&mismatch, "mismatch"),
            (&too_old, "too old"),
        ] {
            let mut e = engine(3, 6_000);
            let (p, _) = proposed(&e.start(0, 1)).unwrap();
            if want == "mismatch" {
                // One region holding another request is not enough: a majority is.
                let c = e.on_reply(p, 1, o, 1, None, 2);
                assert!(c.is_empty(), "one mismatch of three decided {c:?}");
            }
            let c = e.on_reply(p, 2, o, 1, None, 3);
            assert_eq!(withdrew(&c), Some(claim(100)), "{want} withdraws");
            assert_eq!(&outcome(&c), o, "{want} is answered as it came");
        }
    }

    #[test]
    fn the_broken_rule_grants_on_the_local_accept_alone() {
        let mut e = engine(3, 6_000);
        e.cfg.rule = Rule::BrokenLocalAccept;
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        let c = e.on_reply(p, 0, &accepted(&e), 1, None, 3);
        assert!(matches!(outcome(&c), ReserveOutcome::New { .. }));
        let mut e = engine(3, 6_000);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        assert!(e.on_reply(p, 0, &accepted(&e), 1, None, 3).is_empty());
    }

    #[test]
    fn an_abandoned_proposal_is_withdrawn_and_the_engine_stops() {
        let mut e = engine(3, 6_000);
        let (p, _) = proposed(&e.start(0, 1)).unwrap();
        let gen = e.generation;
        assert_eq!(
            e.abandon(),
            vec![Command::Withdraw {
                op: Op::Withdraw {
                    claim: claim(100),
                    generation: gen,
                    fingerprint: e.call.fingerprint,
                    retention_ms: e.call.retention_ms,
                }
            }]
        );
        assert!(e.on_reply(p, 0, &accepted(&e), 1, None, 3).is_empty());
        assert!(e.abandon().is_empty());
    }

    #[test]
    fn the_first_generation_follows_the_local_copy() {
        let mut r = Record {
            expires_ms: 1_000,
            created_ms: 0,
            fingerprint: Fingerprint([1; 32]),
            generation: 3,
            phase: Phase::Reserved,
            claim: claim(1),
            lease_expires_ms: 100,
            attempts: 1,
            last_attempt_ms: 0,
            first_attempt_ms: 0,
            witnesses: 0,
            is_final: false,
            response: None,
        };
        assert_eq!(first_generation(None, 0), 1);
        assert_eq!(first_generation(Some(&r), 99), 3);
        assert_eq!(first_generation(Some(&r), 100), 4);
        r.phase = Phase::Released;
        assert_eq!(first_generation(Some(&r), 0), 4);
    }
}
