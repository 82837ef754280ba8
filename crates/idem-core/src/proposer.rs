//! The proposer's decision (DESIGN §3): what a Reserve answers, given the replies of the
//! key's group in each region so far. Pure: the fan-out, the timeouts and the retries
//! live in `idem-geo`; the rules live here, where the model check and the tests drive
//! them directly.

use crate::acceptor::ReserveOutcome;
use crate::{Fence, Fingerprint, StoredResponse};

/// One region's answer to a `Propose`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The region's group committed the accept.
    Accepted,
    /// Another claim's live lease, or a completion that is not final yet.
    Held {
        retry_after_ms: u64,
    },
    /// A final completion: replay it.
    Completed {
        fence: Fence,
        response: StoredResponse,
    },
    Mismatch {
        stored: Fingerprint,
    },
    StaleGen {
        stored: u32,
    },
    TooOld {
        first_attempt_ms: u64,
        limit_ms: u64,
    },
}

impl Reply {
    /// The acceptor's outcome as the proposer counts it.
    pub fn from_outcome(o: &ReserveOutcome) -> Reply {
        match o {
            ReserveOutcome::New { .. } => Reply::Accepted,
            ReserveOutcome::InFlight { retry_after_ms, .. } => Reply::Held {
                retry_after_ms: *retry_after_ms,
            },
            ReserveOutcome::Replay { fence, response } => Reply::Completed {
                fence: *fence,
                response: response.clone(),
            },
            ReserveOutcome::Mismatch { stored } => Reply::Mismatch { stored: *stored },
            ReserveOutcome::StaleGen { stored } => Reply::StaleGen { stored: *stored },
            ReserveOutcome::TooOld {
                first_attempt_ms,
                limit_ms,
            } => Reply::TooOld {
                first_attempt_ms: *first_attempt_ms,
                limit_ms: *limit_ms,
            },
        }
    }
}

/// What the proposer answers (or does next).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A majority accepted within the lease: the caller holds the key.
    New,
    Replay {
        fence: Fence,
        response: StoredResponse,
    },
    Mismatch {
        stored: Fingerprint,
    },
    TooOld {
        first_attempt_ms: u64,
        limit_ms: u64,
    },
    /// A majority holds another claim (or a completion not final yet), or no majority
    /// formed either way among a majority that answered (contention).
    InFlight {
        retry_after_ms: u64,
    },
    /// A generation was stale: propose again with this one.
    Retry {
        generation: u32,
    },
    /// Fewer than a majority of regions answered.
    Unavailable,
}

impl Verdict {
    /// Whether accepts this proposal collected must be withdrawn.
    pub fn withdraws(&self) -> bool {
        !matches!(self, Verdict::New | Verdict::Retry { .. })
    }
}

/// The replies to one round of a proposal, one slot per region.
#[derive(Clone, Debug)]
pub struct Tally {
    replies: Vec<Option<Reply>>,
}

impl Tally {
    pub fn new(regions: usize) -> Tally {
        Tally {
            replies: vec![None; regions],
        }
    }

    pub fn majority(&self) -> usize {
        self.replies.len() / 2 + 1
    }

    /// Record region `i`'s reply (a duplicate replaces the earlier one).
    pub fn record(&mut self, i: usize, reply: Reply) {
        if let Some(slot) = self.replies.get_mut(i) {
            *slot = Some(reply);
        }
    }

    pub fn answered(&self) -> usize {
        self.replies.iter().flatten().count()
    }

    pub fn accepted(&self) -> usize {
        self.count(|r| matches!(r, Reply::Accepted))
    }

    /// Regions that accepted (to withdraw from).
    pub fn accepted_regions(&self) -> Vec<usize> {
        self.replies
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Some(Reply::Accepted)))
            .map(|(i, _)| i)
            .collect()
    }

    fn count(&self, f: impl Fn(&Reply) -> bool) -> usize {
        self.replies.iter().flatten().filter(|r| f(r)).count()
    }

    /// Decide on the replies so far, in the order of DESIGN §3; `None`: keep waiting.
    /// `lease_live`: the proposed lease has not ended at the proposer.
    pub fn decide(&self, lease_live: bool) -> Option<Verdict> {
        let maj = self.majority();
        if lease_live && self.accepted() >= maj {
            return Some(Verdict::New);
        }
        let replies = || self.replies.iter().flatten();
        if let Some(Reply::Completed { fence, response }) =
            replies().find(|r| matches!(r, Reply::Completed { .. }))
        {
            return Some(Verdict::Replay {
                fence: *fence,
                response: response.clone(),
            });
        }
        if let Some(Reply::Mismatch { stored }) =
            replies().find(|r| matches!(r, Reply::Mismatch { .. }))
        {
            return Some(Verdict::Mismatch { stored: *stored });
        }
        if let Some(Reply::TooOld {
            first_attempt_ms,
            limit_ms,
        }) = replies().find(|r| matches!(r, Reply::TooOld { .. }))
        {
            return Some(Verdict::TooOld {
                first_attempt_ms: *first_attempt_ms,
                limit_ms: *limit_ms,
            });
        }
        if self.count(|r| matches!(r, Reply::Held { .. })) >= maj {
            return Some(Verdict::InFlight {
                retry_after_ms: self.held_retry_after(),
            });
        }
        None
    }

    fn held_retry_after(&self) -> u64 {
        self.replies
            .iter()
            .flatten()
            .filter_map(|r| match r {
                Reply::Held { retry_after_ms } => Some(*retry_after_ms),
                _ => None,
            })
            .min()
            .unwrap_or(1)
            .max(1)
    }

    /// No decision (every region answered, or the round timed out): retry after a
    /// stale generation while retries are left, else fail.
    pub fn conclude(&self, generation: u32, retries_left: u32) -> Verdict {
        let stale = self
            .replies
            .iter()
            .flatten()
            .filter_map(|r| match r {
                Reply::StaleGen { stored } => Some(*stored),
                _ => None,
            })
            .max();
        if let Some(s) = stale {
            if retries_left > 0 {
                if let Some(g) = s.max(generation).checked_add(1) {
                    return Verdict::Retry { generation: g };
                }
            }
        }
        if self.answered() >= self.majority() {
            Verdict::InFlight {
                retry_after_ms: self.held_retry_after(),
            }
        } else {
            Verdict::Unavailable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClaimId;

    fn done() -> Reply {
        Reply::Completed {
            fence: Fence {
                generation: 1,
                claim: ClaimId::default(),
            },
            response: StoredResponse::default(),
        }
    }

    #[test]
    fn majority_of_accepts_is_new_only_within_the_lease() {
        let mut t = Tally::new(3);
        t.record(0, Reply::Accepted);
        assert_eq!(t.decide(true), None);
        t.record(2, Reply::Accepted);
        assert_eq!(t.decide(true), Some(Verdict::New));
        assert_eq!(t.decide(false), None);
        assert_eq!(t.conclude(1, 0), Verdict::InFlight { retry_after_ms: 1 });
    }

    #[test]
    fn replay_beats_mismatch_beats_in_flight() {
        let mut t = Tally::new(3);
        t.record(0, Reply::Held { retry_after_ms: 70 });
        t.record(1, Reply::Held { retry_after_ms: 30 });
        assert_eq!(
            t.decide(true),
            Some(Verdict::InFlight { retry_after_ms: 30 })
        );
        t.record(
            2,
            Reply::Mismatch {
                stored: Fingerprint([7; 32]),
            },
        );
        assert!(matches!(t.decide(true), Some(Verdict::Mismatch { .. })));
        t.record(1, done());
        assert!(matches!(t.decide(true), Some(Verdict::Replay { .. })));
    }

    #[test]
    fn one_local_accept_is_never_new() {
        // The broken rule the model check rejects: NEW on the local accept alone.
        let mut t = Tally::new(3);
        t.record(0, Reply::Accepted);
        assert_eq!(t.decide(true), None);
        assert_eq!(t.conclude(1, 1), Verdict::Unavailable);
        assert!(Verdict::Unavailable.withdraws());
    }

    #[test]
    fn stale_generation_retries_above_the_highest_seen_then_gives_up() {
        let mut t = Tally::new(3);
        t.record(0, Reply::StaleGen { stored: 4 });
        t.record(1, Reply::StaleGen { stored: 2 });
        t.record(2, Reply::Accepted);
        assert_eq!(t.decide(true), None);
        assert_eq!(t.conclude(1, 2), Verdict::Retry { generation: 5 });
        assert_eq!(t.conclude(1, 0), Verdict::InFlight { retry_after_ms: 1 });
        assert_eq!(t.accepted_regions(), vec![2]);
    }
}
