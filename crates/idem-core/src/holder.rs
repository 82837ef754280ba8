//! The holder engine (DESIGN §3): one GLOBAL Complete, Release or Extend as a state
//! machine with no I/O, driven like the proposer engine (see [`Engine`]).
//!
//! A holder's call goes to every region at once. Its verdict, judged here and nowhere
//! else:
//! - stored by a majority of regions: acknowledged (an Extend with the earliest lease end
//!   among the regions that stored it, which every majority now protects);
//! - once the replies still to come can no longer make a majority store it, or the round
//!   timed out: a refusal heard so far that names the key's state wins (the key is held
//!   by another claim or the lease is over, the key is completed); else `NotFound` when
//!   a majority of regions hold no record; else the outcome is unknown. Replies that
//!   come after the verdict are not waited for: a majority without the record answers
//!   `NotFound` even if the last region would have named the key;
//! - a Complete that a majority stored is final. Before acknowledging it, the engine
//!   tells every region it is final and waits up to a third of a round for a majority
//!   to confirm, so that a retry through any surviving majority finds a final copy even
//!   if this region is lost right after the acknowledgement; then it notifies every
//!   region once more without waiting. The wait only bounds how long finality may be
//!   unknown: the answer is an acknowledgement either way.

use crate::engine::{Command, Engine, EngineConfig, Rule};
use crate::{CommandResult, CompleteError, ExtendError, Fence, Op, ReleaseError, StoredResponse};

/// One holder's call as the caller asked it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HolderCall {
    Complete {
        fence: Fence,
        response: StoredResponse,
    },
    Release {
        fence: Fence,
    },
    /// `until_ms`: the new lease end, chosen once by the holder's node so that it is the
    /// same in every region.
    Extend {
        fence: Fence,
        lease_ms: u64,
        until_ms: u64,
    },
}

impl HolderCall {
    pub fn fence(&self) -> Fence {
        match self {
            HolderCall::Complete { fence, .. }
            | HolderCall::Release { fence }
            | HolderCall::Extend { fence, .. } => *fence,
        }
    }
}

/// A region's refusal of a holder's call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The key is held by another claim, or this fence's lease is over.
    LeaseLost { current: Option<Fence> },
    /// Release only: the key is completed.
    AlreadyCompleted,
    /// No record of the key (never reserved, or expired by retention).
    NotFound,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HolderAnswer {
    /// A majority of regions stored it (a Complete is final). Extend: the lease end.
    Stored {
        lease_expires_ms: Option<u64>,
    },
    Refused(Refusal),
    /// Neither stored by a majority nor refused: `answered` of `regions` answered.
    Unknown {
        answered: usize,
        regions: usize,
    },
}

/// What one region said in the current round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Heard {
    Waiting,
    /// The call failed (or the reply was not an answer to it).
    Lost,
    /// Stored (Extend: the region's lease end; 0 otherwise).
    Stored(u64),
    Refused(Refusal),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Stage {
    Idle,
    /// The call itself is out.
    Storing,
    /// A Complete a majority stored: its final notice is out.
    Telling,
    Done,
}

/// The state of one holder's call. `Clone + Eq + Hash`, so a model check can explore it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HolderEngine {
    cfg: EngineConfig,
    call: HolderCall,
    stage: Stage,
    round: u32,
    timer: u32,
    heard: Vec<Heard>,
    /// Extend: the lease end the majority stored.
    lease_expires_ms: Option<u64>,
}

impl HolderEngine {
    pub fn new(cfg: EngineConfig, call: HolderCall) -> Self {
        let heard = vec![Heard::Waiting; cfg.regions];
        HolderEngine {
            cfg,
            call,
            stage: Stage::Idle,
            round: 0,
            timer: 0,
            heard,
            lease_expires_ms: None,
        }
    }

    /// Send the call to every region.
    pub fn start(&mut self, now_ms: u64) -> Vec<Command<HolderAnswer>> {
        if self.stage != Stage::Idle {
            return Vec::new();
        }
        self.stage = Stage::Storing;
        let op = match &mut self.call {
            // The response moves into the op: the engine needs only the fence from now
            // on, and a response can be a MiB.
            HolderCall::Complete { fence, response } => Op::Complete {
                fence: *fence,
                response: std::mem::take(response),
                quorum: self.majority() as u32,
            },
            HolderCall::Release { fence } => Op::Release { fence: *fence },
            HolderCall::Extend {
                fence,
                lease_ms,
                until_ms,
            } => Op::Extend {
                fence: *fence,
                lease_ms: *lease_ms,
                until_ms: Some(*until_ms),
            },
        };
        self.send(op, now_ms.saturating_add(self.cfg.round_timeout_ms))
    }

    pub fn is_done(&self) -> bool {
        self.stage == Stage::Done
    }

    /// The token of the timer that counts (the last one set).
    pub fn timer_token(&self) -> u32 {
        self.timer
    }

    /// The current round while region `region`'s reply to it may still come.
    pub fn awaiting(&self, region: usize) -> Option<u32> {
        let open = matches!(self.stage, Stage::Storing | Stage::Telling)
            && self.heard.get(region) == Some(&Heard::Waiting);
        open.then_some(self.round)
    }

    fn majority(&self) -> usize {
        self.cfg.regions / 2 + 1
    }

    /// Stores that acknowledge the current round.
    fn needed(&self) -> usize {
        let early = self.cfg.rule == Rule::BrokenEarlyAck
            && self.stage == Stage::Storing
            && matches!(self.call, HolderCall::Complete { .. });
        if early {
            1
        } else {
            self.majority()
        }
    }

    fn send(&mut self, op: Op, timer_at_ms: u64) -> Vec<Command<HolderAnswer>> {
        self.round = self.round.wrapping_add(1);
        self.heard = vec![Heard::Waiting; self.cfg.regions];
        self.timer = self.timer.wrapping_add(1);
        vec![
            Command::Send {
                round: self.round,
                op,
            },
            Command::Timer {
                token: self.timer,
                at_ms: timer_at_ms,
            },
        ]
    }

    /// What a region's result says about the current round's op.
    fn hear(&self, result: Option<&CommandResult>) -> Heard {
        let refused = |r: Refusal| Heard::Refused(r);
        match (self.stage, &self.call, result) {
            (Stage::Telling, _, Some(CommandResult::Complete(Ok(())))) => Heard::Stored(0),
            // Not final there (yet): anti-entropy and the later notice carry it.
            (Stage::Telling, _, Some(CommandResult::Complete(Err(_)))) => Heard::Lost,
            (Stage::Storing, HolderCall::Complete { .. }, Some(CommandResult::Complete(r))) => {
                match r {
                    Ok(()) => Heard::Stored(0),
                    Err(CompleteError::LeaseLost { current }) => {
                        refused(Refusal::LeaseLost { current: *current })
                    }
                    Err(CompleteError::NotFound) => refused(Refusal::NotFound),
                }
            }
            (Stage::Storing, HolderCall::Release { .. }, Some(CommandResult::Release(r))) => {
                match r {
                    Ok(()) => Heard::Stored(0),
                    Err(ReleaseError::LeaseLost { current }) => {
                        refused(Refusal::LeaseLost { current: *current })
                    }
                    Err(ReleaseError::AlreadyCompleted) => refused(Refusal::AlreadyCompleted),
                    Err(ReleaseError::NotFound) => refused(Refusal::NotFound),
                }
            }
            (Stage::Storing, HolderCall::Extend { .. }, Some(CommandResult::Extend(r))) => {
                match r {
                    Ok(until) => Heard::Stored(*until),
                    Err(ExtendError::LeaseLost { current }) => {
                        refused(Refusal::LeaseLost { current: *current })
                    }
                    Err(ExtendError::NotFound) => refused(Refusal::NotFound),
                }
            }
            _ => Heard::Lost,
        }
    }

    fn count(&self, f: impl Fn(&Heard) -> bool) -> usize {
        self.heard.iter().filter(|h| f(h)).count()
    }

    fn final_notice(&self) -> Command<HolderAnswer> {
        Command::Notify {
            op: Op::Final {
                fence: self.call.fence(),
            },
        }
    }

    fn stored_by_majority(&mut self, now_ms: u64) -> Vec<Command<HolderAnswer>> {
        match (self.stage, &self.call) {
            (Stage::Storing, HolderCall::Complete { fence, .. }) => {
                self.stage = Stage::Telling;
                let op = Op::Final { fence: *fence };
                self.send(op, now_ms.saturating_add(self.cfg.round_timeout_ms / 3))
            }
            (Stage::Storing, HolderCall::Extend { .. }) => {
                // The earliest lease end among the regions that stored it.
                self.lease_expires_ms = self
                    .heard
                    .iter()
                    .filter_map(|h| match h {
                        Heard::Stored(until) => Some(*until),
                        _ => None,
                    })
                    .min();
                self.acknowledge()
            }
            _ => self.acknowledge(),
        }
    }

    fn acknowledge(&mut self) -> Vec<Command<HolderAnswer>> {
        let mut out = Vec::new();
        if self.stage == Stage::Telling {
            out.push(self.final_notice());
        }
        self.stage = Stage::Done;
        out.push(Command::Answer(HolderAnswer::Stored {
            lease_expires_ms: self.lease_expires_ms,
        }));
        out
    }

    fn round_over(&mut self) -> Vec<Command<HolderAnswer>> {
        match self.stage {
            Stage::Storing => {}
            // Final whether or not a majority confirmed it in time.
            Stage::Telling => return self.acknowledge(),
            Stage::Idle | Stage::Done => return Vec::new(),
        }
        self.stage = Stage::Done;
        let naming = self.heard.iter().find_map(|h| match h {
            Heard::Refused(r @ (Refusal::LeaseLost { .. } | Refusal::AlreadyCompleted)) => Some(*r),
            _ => None,
        });
        let not_found = self.count(|h| *h == Heard::Refused(Refusal::NotFound));
        let answer = match naming {
            Some(r) => HolderAnswer::Refused(r),
            None if not_found >= self.majority() => HolderAnswer::Refused(Refusal::NotFound),
            None => HolderAnswer::Unknown {
                answered: self.count(|h| !matches!(h, Heard::Waiting | Heard::Lost)),
                regions: self.cfg.regions,
            },
        };
        vec![Command::Answer(answer)]
    }
}

impl Engine for HolderEngine {
    type Answer = HolderAnswer;

    /// Region `region` answered round `round` (`None`: its call failed).
    fn on_result(
        &mut self,
        round: u32,
        region: usize,
        result: Option<&CommandResult>,
        now_ms: u64,
    ) -> Vec<Command<HolderAnswer>> {
        if self.awaiting(region) != Some(round) {
            return Vec::new();
        }
        self.heard[region] = self.hear(result);
        let stored = self.count(|h| matches!(h, Heard::Stored(_)));
        let waiting = self.count(|h| *h == Heard::Waiting);
        if stored >= self.needed() {
            return self.stored_by_majority(now_ms);
        }
        if stored + waiting < self.needed() {
            return self.round_over();
        }
        Vec::new()
    }

    /// The timer set with `token` fired: the round is over.
    fn on_timer(&mut self, token: u32, _now_ms: u64) -> Vec<Command<HolderAnswer>> {
        if token != self.timer {
            return Vec::new();
        }
        self.round_over()
    }

    /// The caller is gone. A final completion's notice still goes out.
    fn abandon(&mut self) -> Vec<Command<HolderAnswer>> {
        let was = std::mem::replace(&mut self.stage, Stage::Done);
        match was {
            Stage::Telling => vec![self.final_notice()],
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
