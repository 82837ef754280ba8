//! The commands a group's Raft log carries and what applying each one returns.
//!
//! A command is stamped by the group leader (time, skew margin, claim) before it is
//! appended, so every replica applies exactly the same inputs and reaches the same state.

use crate::acceptor::{
    self, CompleteError, ExtendError, ReleaseError, ReserveArgs, ReserveOutcome,
};
use crate::merge::{self, Conflict, MergeOutcome};
use crate::{ClaimId, Fence, Fingerprint, Key, Record, StoredResponse};
use serde::{Deserialize, Serialize};
use std::fmt;

/// What a caller asks of a key, before the leader stamps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Reserve {
        fingerprint: Fingerprint,
        lease_ms: u64,
        retention_ms: u64,
        first_attempt_ms: u64,
    },
    /// GLOBAL mode: one region's part of a cross-region proposal, with the claim,
    /// generation and lease end the proposer chose.
    Propose {
        fingerprint: Fingerprint,
        claim: ClaimId,
        generation: u32,
        lease_ms: u64,
        lease_until_ms: u64,
        retention_ms: u64,
        first_attempt_ms: u64,
    },
    Complete {
        fence: Fence,
        response: StoredResponse,
        /// Witnesses that make the completion final: a majority of regions in GLOBAL
        /// mode; 0 or 1 (this region alone) in a single region or REGIONAL mode.
        #[serde(default)]
        quorum: u32,
    },
    Release {
        fence: Fence,
    },
    Extend {
        fence: Fence,
        lease_ms: u64,
        /// GLOBAL mode: the lease end chosen by the proposer.
        #[serde(default)]
        until_ms: Option<u64>,
    },
    /// Attempts answered from final local copies without a Raft round, counted
    /// afterwards in one entry for many keys (retry bookkeeping only, never
    /// replicated). Not about one key: the command's key is empty.
    Touch {
        items: Vec<TouchItem>,
    },
    /// A failed proposal takes its accept back, and no later Propose of the claim at
    /// `generation` or below is accepted (see `acceptor::withdraw`).
    Withdraw {
        claim: ClaimId,
        /// The highest generation the claim was proposed at (0: only take an accept
        /// back, as entries written before tombstones did).
        #[serde(default)]
        generation: u32,
        /// The withdrawn request's, for the tombstone left where no record was.
        #[serde(default)]
        fingerprint: Fingerprint,
        #[serde(default)]
        retention_ms: u64,
    },
    /// The completion reached a majority: mark it final.
    Final {
        fence: Fence,
    },
    /// Another region's copy of the record (outbox relay or anti-entropy).
    Merge {
        record: Record,
        /// GLOBAL mode: never do what the acceptor rules forbid.
        guarded: bool,
        /// GLOBAL mode: witnesses that make a completion final (a majority of regions);
        /// a merged witness set that reaches it makes the completion final here.
        #[serde(default)]
        quorum: u32,
        /// The receiving region: a REGIONAL merge that overturns one of its own grants
        /// by a grant held at the same time counts that double grant (None: entries
        /// written before the count).
        #[serde(default)]
        region: Option<u16>,
    },
    /// The relay shipped this group's outbox entries for `dest` below sequence `upto`;
    /// `dead` were refused as invalid too often and move to the dead-letter queue.
    /// Not about a key: the command's key is empty.
    OutboxAck {
        dest: u16,
        upto: u64,
        dead: Vec<u64>,
    },
}

impl Op {
    /// About how many bytes this op takes on the wire (what batch byte bounds count):
    /// the byte strings it carries plus a fixed allowance for its other fields.
    pub fn approx_bytes(&self) -> usize {
        const FIELDS: usize = 160;
        FIELDS
            + match self {
                Op::Complete { response, .. } => response.size(),
                Op::Merge { record, .. } => record.response.as_ref().map_or(0, |r| r.size()),
                Op::Touch { items } => items.iter().map(|t| t.key.approx_bytes() + FIELDS).sum(),
                Op::OutboxAck { dead, .. } => dead.len() * 9,
                _ => 0,
            }
    }

    /// Bytes this op and its answer may take on the wire: its own, plus the largest
    /// stored response when its answer may carry one (a Reserve's REPLAY).
    pub fn round_trip_bytes(&self, max_response_bytes: usize) -> usize {
        self.approx_bytes()
            + match self {
                Op::Reserve { .. } | Op::Propose { .. } => max_response_bytes,
                _ => 0,
            }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Reserve { .. } => "reserve",
            Op::Propose { .. } => "propose",
            Op::Complete { .. } => "complete",
            Op::Release { .. } => "release",
            Op::Extend { .. } => "extend",
            Op::Touch { .. } => "touch",
            Op::Withdraw { .. } => "withdraw",
            Op::Final { .. } => "final",
            Op::Merge { .. } => "merge",
            Op::OutboxAck { .. } => "outbox_ack",
        }
    }
}

/// Replays of one key answered locally since the last flush.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TouchItem {
    pub key: Key,
    pub fingerprint: Fingerprint,
    pub first_attempt_ms: u64,
    /// The latest of them.
    pub at_ms: u64,
    pub count: u32,
}

/// A stamped command: one Raft log entry's payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub now_ms: u64,
    pub skew_margin_ms: u64,
    /// Minted by the leader; used by Reserve only.
    pub claim: ClaimId,
    /// This region's bit in witness sets.
    pub region_bit: u32,
    pub key: Key,
    pub op: Op,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} @{}", self.op.name(), self.key, self.now_ms)
    }
}

/// What applying a command decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Reserve {
        outcome: ReserveOutcome,
        attempt: u32,
        since_previous_ms: Option<u64>,
    },
    Complete(Result<(), CompleteError>),
    Release(Result<(), ReleaseError>),
    /// The new lease end.
    Extend(Result<u64, ExtendError>),
    Merge {
        outcome: MergeOutcome,
        conflict: Option<Conflict>,
        /// This merge overturned a grant of the receiving region by one held at the same
        /// time: the region's replicated double-grant count goes up by one (every
        /// replica decides it from the log entry alone).
        #[serde(default)]
        double_grant: bool,
    },
    /// Withdraw, Touch and OutboxAck (and a membership change): applied (they answer
    /// nothing else). `Final` answers `Complete`: `Ok` when the record holds that
    /// completion and it is final there (now, or already), an error otherwise.
    Done,
}

/// Apply one command to the stored record: the result and the record to write, if any.
pub fn apply(stored: Option<&Record>, cmd: &Command) -> (CommandResult, Option<Record>) {
    let now = cmd.now_ms;
    match &cmd.op {
        Op::Reserve {
            fingerprint,
            lease_ms,
            retention_ms,
            first_attempt_ms,
        } => reserve(
            stored,
            &ReserveArgs {
                now_ms: now,
                skew_margin_ms: cmd.skew_margin_ms,
                fingerprint: *fingerprint,
                claim: cmd.claim,
                generation: None,
                lease_ms: *lease_ms,
                lease_until_ms: None,
                retention_ms: *retention_ms,
                first_attempt_ms: *first_attempt_ms,
                region_bit: cmd.region_bit,
            },
        ),
        Op::Propose {
            fingerprint,
            claim,
            generation,
            lease_ms,
            lease_until_ms,
            retention_ms,
            first_attempt_ms,
        } => reserve(
            stored,
            &ReserveArgs {
                now_ms: now,
                skew_margin_ms: cmd.skew_margin_ms,
                fingerprint: *fingerprint,
                claim: *claim,
                generation: Some(*generation),
                lease_ms: *lease_ms,
                lease_until_ms: Some(*lease_until_ms),
                retention_ms: *retention_ms,
                first_attempt_ms: *first_attempt_ms,
                region_bit: cmd.region_bit,
            },
        ),
        Op::Complete {
            fence,
            response,
            quorum,
        } => match acceptor::complete(
            stored,
            *fence,
            response.clone(),
            now,
            cmd.region_bit,
            *quorum,
        ) {
            Ok(w) => (CommandResult::Complete(Ok(())), w),
            Err(e) => (CommandResult::Complete(Err(e)), None),
        },
        Op::Release { fence } => match acceptor::release(stored, *fence, now) {
            Ok(w) => (CommandResult::Release(Ok(())), w),
            Err(e) => (CommandResult::Release(Err(e)), None),
        },
        Op::Extend {
            fence,
            lease_ms,
            until_ms,
        } => match acceptor::extend(stored, *fence, *lease_ms, *until_ms, now) {
            Ok(w) => (CommandResult::Extend(Ok(w.lease_expires_ms)), Some(w)),
            Err(e) => (CommandResult::Extend(Err(e)), None),
        },
        // Applied by the state engine itself (many keys in one entry).
        Op::Touch { .. } => (CommandResult::Done, None),
        Op::Withdraw {
            claim,
            generation,
            fingerprint,
            retention_ms,
        } => (
            CommandResult::Done,
            acceptor::withdraw(
                stored,
                &acceptor::WithdrawArgs {
                    claim: *claim,
                    generation: *generation,
                    fingerprint: *fingerprint,
                    retention_ms: *retention_ms,
                    now_ms: now,
                    skew_margin_ms: cmd.skew_margin_ms,
                },
            ),
        ),
        Op::Final { fence } => (
            CommandResult::Complete(acceptor::final_here(stored, *fence, now)),
            acceptor::finalize(stored, *fence, now),
        ),
        Op::Merge {
            record,
            guarded,
            quorum,
            region,
        } => {
            let mut m = merge::merge(stored, record, now, cmd.skew_margin_ms, *guarded);
            if let Some(w) = m.write.as_mut() {
                merge::settle_finality(w, *quorum);
            }
            let double_grant = matches!(
                (m.overturned, region),
                (Some(overturned), Some(r)) if overturned.region == *r
            );
            (
                CommandResult::Merge {
                    outcome: m.outcome,
                    conflict: m.conflict,
                    double_grant,
                },
                m.write,
            )
        }
        // Applied by the state engine itself (it is about the outbox, not a record).
        Op::OutboxAck { .. } => (CommandResult::Done, None),
    }
}

fn reserve(stored: Option<&Record>, args: &ReserveArgs) -> (CommandResult, Option<Record>) {
    let d = acceptor::reserve(stored, args);
    (
        CommandResult::Reserve {
            outcome: d.outcome,
            attempt: d.attempt,
            since_previous_ms: d.since_previous_ms,
        },
        d.write,
    )
}
