//! The proposer's decision (DESIGN §3): what a Reserve answers, given the replies of the
//! key's group in each region so far. Pure: the fan-out, the timeouts and the retries
//! live in `idem-geo`; the rules live here, where the model check and the tests drive
//! them directly.

use crate::acceptor::ReserveOutcome;
use crate::{ClaimId, Fence, Fingerprint, StoredResponse};

/// One region's answer to a `Propose`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reply {
    /// The region's group committed the accept.
    Accepted,
    /// Another claim's live lease, or a completion that is not final yet: `holder` is
    /// that claim's fence (the completion's, for a completion).
    Held {
        holder: Fence,
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
            ReserveOutcome::InFlight {
                holder,
                retry_after_ms,
            } => Reply::Held {
                holder: *holder,
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
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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
    /// A majority holds one other claim (or one completion not final yet): wait for it.
    InFlight {
        retry_after_ms: u64,
    },
    /// A majority answered but no majority formed either way, or none can form any more
    /// (proposals split the regions between them, or the lease ended first): nobody holds
    /// the key, so waiting for a lease would be wrong. Withdraw and propose again later.
    Contended,
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
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tally {
    replies: Vec<Option<Reply>>,
    /// Regions whose call failed this round (no reply will come from them).
    lost: Vec<bool>,
}

impl Tally {
    pub fn new(regions: usize) -> Tally {
        Tally {
            replies: vec![None; regions],
            lost: vec![false; regions],
        }
    }

    /// Region `i`'s call failed (unreachable, refused): no reply will come this round.
    pub fn lose(&mut self, i: usize) {
        if let (Some(l), Some(None)) = (self.lost.get_mut(i), self.replies.get(i)) {
            *l = true;
        }
    }

    /// Region `i`'s reply may still come (none recorded, its call not lost).
    pub fn is_open(&self, i: usize) -> bool {
        matches!(self.replies.get(i), Some(None)) && !self.lost.get(i).copied().unwrap_or(true)
    }

    /// Regions whose reply may still come.
    fn open(&self) -> usize {
        self.replies
            .iter()
            .zip(&self.lost)
            .filter(|(r, l)| r.is_none() && !**l)
            .count()
    }

    pub fn majority(&self) -> usize {
        self.replies.len() / 2 + 1
    }

    /// Record region `i`'s reply (a duplicate replaces the earlier one).
    pub fn record(&mut self, i: usize, reply: Reply) {
        if let Some(slot) = self.replies.get_mut(i) {
            *slot = Some(reply);
            self.lost[i] = false;
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
        // A majority of regions holding another request (live or completed) is one:
        // a region alone may hold a stale accept of a request that can no longer win,
        // while the key is completed by the caller's own request (its retry must
        // REPLAY, and a majority of replies includes a region that stored it).
        if let Some(Reply::Mismatch { stored }) =
            replies().find(|r| matches!(r, Reply::Mismatch { .. }))
        {
            if self.count(|r| matches!(r, Reply::Mismatch { .. })) >= maj {
                return Some(Verdict::Mismatch { stored: *stored });
            }
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
        if let Some((_, n, retry_after_ms)) = self.top_holder() {
            if n >= maj {
                return Some(Verdict::InFlight { retry_after_ms });
            }
        }
        None
    }

    /// The holder named by the most `Held` replies: its claim, how many named it (at any
    /// generation: one claim moved up by a StaleGen retry that reached only some regions
    /// is still one holder), and the shortest wait they advise (at least 1 ms).
    fn top_holder(&self) -> Option<(ClaimId, usize, u64)> {
        let held = || {
            self.replies.iter().flatten().filter_map(|r| match r {
                Reply::Held {
                    holder,
                    retry_after_ms,
                } => Some((holder.claim, *retry_after_ms)),
                _ => None,
            })
        };
        held()
            .map(|(h, _)| {
                let (n, wait) = held()
                    .filter(|(o, _)| *o == h)
                    .fold((0, u64::MAX), |(n, w), (_, r)| (n + 1, w.min(r)));
                (h, n, wait.max(1))
            })
            .max_by_key(|(_, n, _)| *n)
    }

    /// No reply can come any more, or no verdict can form from the replies still to come: no
    /// majority of accepts (within the lease), no majority naming one holder and no
    /// majority holding another request. A reply that decides alone (a final
    /// completion) would have decided already.
    pub fn settled(&self, lease_live: bool) -> bool {
        let maj = self.majority();
        let open = self.open();
        let can_accept = lease_live && self.accepted() + open >= maj;
        let can_hold = self.top_holder().map_or(0, |(_, n, _)| n) + open >= maj;
        let can_mismatch = self.count(|r| matches!(r, Reply::Mismatch { .. })) + open >= maj;
        open == 0 || !(can_accept || can_hold || can_mismatch)
    }

    /// The highest generation any reply named (a holder's, a stale generation's stored
    /// one): a fresh proposal after contention starts above it.
    pub fn highest_generation(&self) -> u32 {
        self.replies
            .iter()
            .flatten()
            .filter_map(|r| match r {
                Reply::Held { holder, .. } => Some(holder.generation),
                Reply::StaleGen { stored } => Some(*stored),
                Reply::Completed { fence, .. } => Some(fence.generation),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// No decision (the replies are [`settled`](Self::settled), or the round timed out):
    /// retry after a stale generation while retries are left; else contention when a
    /// majority answered; else unavailable.
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
        if self.answered() < self.majority() {
            return Verdict::Unavailable;
        }
        // A majority answered, some region holds another request, and none names the
        // caller's own (a completion of its request, or a live grant of it, would be in
        // any majority of replies as `Completed` or `Held`): MISMATCH, as when a majority
        // says so (a region that holds the other request may be the one silent).
        let own = self.count(|r| matches!(r, Reply::Held { .. } | Reply::Completed { .. }));
        match self.replies.iter().flatten().find_map(|r| match r {
            Reply::Mismatch { stored } => Some(*stored),
            _ => None,
        }) {
            Some(stored) if own == 0 => Verdict::Mismatch { stored },
            _ => Verdict::Contended,
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
        assert!(t.settled(false), "past the lease no verdict can form");
        assert_eq!(t.conclude(1, 0), Verdict::Contended);
    }

    #[test]
    fn regions_holding_different_claims_that_none_can_win_are_contention() {
        // Three proposers, each accepted by one region: nobody holds the key.
        let mut t = Tally::new(3);
        t.record(0, Reply::Accepted);
        t.record(1, held(7, 9_000));
        assert_eq!(t.decide(true), None);
        assert!(
            !t.settled(true),
            "region 2 may still accept or name holder 7"
        );
        t.record(2, held(8, 9_000));
        assert_eq!(
            t.decide(true),
            None,
            "no IN_FLIGHT for a lease nobody holds"
        );
        assert!(t.settled(true));
        assert_eq!(t.conclude(1, 2), Verdict::Contended);
        assert!(Verdict::Contended.withdraws());
        // Four of five split between four claims: the fifth cannot make a majority.
        let mut t = Tally::new(5);
        t.record(0, held(7, 1));
        t.record(1, held(8, 1));
        t.record(2, Reply::Accepted);
        assert!(!t.settled(true));
        t.record(3, held(7, 1));
        assert!(!t.settled(true), "7 can still reach 3 of 5");
        t.record(3, held(9, 1));
        assert!(
            t.settled(true),
            "nobody can reach 3 of 5 with one reply to come"
        );
        // One claim at two generations (a StaleGen retry that reached one region) is one
        // holder.
        let mut t = Tally::new(3);
        t.record(0, held(7, 900));
        let mut moved_up = held(7, 800);
        if let Reply::Held { holder, .. } = &mut moved_up {
            holder.generation = 2;
        }
        t.record(1, moved_up);
        assert_eq!(
            t.decide(true),
            Some(Verdict::InFlight {
                retry_after_ms: 800
            })
        );
        // The same holder named by a majority is IN_FLIGHT.
        let mut t = Tally::new(5);
        t.record(0, held(7, 500));
        t.record(3, held(7, 400));
        t.record(4, held(7, 600));
        assert_eq!(
            t.decide(true),
            Some(Verdict::InFlight {
                retry_after_ms: 400
            })
        );
    }

    #[test]
    fn lost_calls_count_as_replies_that_will_not_come() {
        let mut t = Tally::new(3);
        t.record(0, Reply::Accepted);
        t.lose(1);
        assert!(!t.settled(true));
        t.lose(2);
        assert!(t.settled(true));
        assert_eq!(t.conclude(1, 2), Verdict::Unavailable);
        // A reply replaces a loss.
        t.record(2, Reply::Accepted);
        assert_eq!(t.decide(true), Some(Verdict::New));
    }

    #[test]
    fn the_highest_generation_named_by_any_reply() {
        let mut t = Tally::new(3);
        t.record(0, Reply::StaleGen { stored: 4 });
        t.record(1, held(7, 1));
        assert_eq!(t.highest_generation(), 4);
        t.record(2, done());
        assert_eq!(t.highest_generation(), 4);
    }

    fn held(by: u32, retry_after_ms: u64) -> Reply {
        Reply::Held {
            holder: Fence {
                generation: 1,
                claim: ClaimId {
                    nonce: by,
                    ..ClaimId::default()
                },
            },
            retry_after_ms,
        }
    }

    /// A region's reply that another request holds the key there.
    fn other_request() -> Reply {
        Reply::Mismatch {
            stored: Fingerprint([7; 32]),
        }
    }

    #[test]
    fn replay_beats_mismatch_and_a_mismatch_needs_a_majority() {
        let mut t = Tally::new(3);
        t.record(0, held(1, 70));
        t.record(1, held(1, 30));
        assert_eq!(
            t.decide(true),
            Some(Verdict::InFlight { retry_after_ms: 30 })
        );
        // One region holding another request does not outvote a majority naming the
        // caller's own request.
        t.record(2, other_request());
        assert_eq!(
            t.decide(true),
            Some(Verdict::InFlight { retry_after_ms: 30 })
        );
        t.record(1, other_request());
        assert!(matches!(t.decide(true), Some(Verdict::Mismatch { .. })));
        t.record(1, done());
        assert!(matches!(t.decide(true), Some(Verdict::Replay { .. })));
    }

    #[test]
    fn a_mismatch_whose_majority_is_partly_silent_is_concluded_mismatch() {
        // Another request holds the key at R0 and R1; R1 does not answer; R2 accepted
        // the caller's proposal. At the round's end: MISMATCH, not contention.
        let mut t = Tally::new(3);
        t.record(0, other_request());
        t.record(2, Reply::Accepted);
        assert_eq!(t.decide(true), None);
        assert!(matches!(t.conclude(1, 0), Verdict::Mismatch { .. }));
        // A region naming the caller's own request (its non-final completion, say):
        // contention, so the caller retries and is replayed.
        let mut t = Tally::new(3);
        t.record(0, other_request());
        t.record(1, held(1, 30));
        assert_eq!(t.conclude(1, 0), Verdict::Contended);
        // Fewer than a majority answered: unavailable.
        let mut t = Tally::new(3);
        t.record(0, other_request());
        assert_eq!(t.conclude(1, 0), Verdict::Unavailable);
    }

    #[test]
    fn one_region_holding_another_request_is_no_verdict_while_the_others_may_replay() {
        // The caller's own request is completed (not yet final at R1); R0 holds a stale
        // accept of another request. Before: MISMATCH on R0's reply alone.
        let mut t = Tally::new(3);
        t.record(0, other_request());
        assert_eq!(
            t.decide(true),
            None,
            "one mismatch of three decides nothing"
        );
        assert!(!t.settled(true), "two regions may still say the same");
        t.record(1, held(1, 30));
        assert_eq!(t.decide(true), None);
        assert!(!t.settled(true), "R2 may still name the same holder");
        // R2 has the completion final: REPLAY.
        let mut u = t.clone();
        u.record(2, done());
        assert!(matches!(u.decide(true), Some(Verdict::Replay { .. })));
        // R2 another request: a majority holds another request.
        let mut v = t.clone();
        v.record(2, other_request());
        assert!(matches!(v.decide(true), Some(Verdict::Mismatch { .. })));
        // R2 accepts: no verdict can form any more.
        t.record(2, Reply::Accepted);
        assert_eq!(t.decide(true), None);
        assert!(t.settled(true));
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
        assert_eq!(t.conclude(1, 0), Verdict::Contended);
        assert_eq!(t.accepted_regions(), vec![2]);
    }
}
