//! The commands a group's Raft log carries and what applying each one returns.
//!
//! A command is stamped by the group leader (time, skew margin, claim) before it is
//! appended, so every replica applies exactly the same inputs and reaches the same state.

use crate::acceptor::{
    self, CompleteError, ExtendError, ReleaseError, ReserveArgs, ReserveOutcome,
};
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
    Complete {
        fence: Fence,
        response: StoredResponse,
    },
    Release {
        fence: Fence,
    },
    Extend {
        fence: Fence,
        lease_ms: u64,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Reserve { .. } => "reserve",
            Op::Complete { .. } => "complete",
            Op::Release { .. } => "release",
            Op::Extend { .. } => "extend",
        }
    }
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
        } => {
            let d = acceptor::reserve(
                stored,
                &ReserveArgs {
                    now_ms: now,
                    skew_margin_ms: cmd.skew_margin_ms,
                    fingerprint: *fingerprint,
                    claim: cmd.claim,
                    generation: None,
                    lease_ms: *lease_ms,
                    retention_ms: *retention_ms,
                    first_attempt_ms: *first_attempt_ms,
                    region_bit: cmd.region_bit,
                },
            );
            (
                CommandResult::Reserve {
                    outcome: d.outcome,
                    attempt: d.attempt,
                    since_previous_ms: d.since_previous_ms,
                },
                d.write,
            )
        }
        Op::Complete { fence, response } => {
            match acceptor::complete(stored, *fence, response.clone(), now, cmd.region_bit, true) {
                Ok(w) => (CommandResult::Complete(Ok(())), w),
                Err(e) => (CommandResult::Complete(Err(e)), None),
            }
        }
        Op::Release { fence } => match acceptor::release(stored, *fence, now) {
            Ok(w) => (CommandResult::Release(Ok(())), w),
            Err(e) => (CommandResult::Release(Err(e)), None),
        },
        Op::Extend { fence, lease_ms } => match acceptor::extend(stored, *fence, *lease_ms, now) {
            Ok(w) => (CommandResult::Extend(Ok(w.lease_expires_ms)), Some(w)),
            Err(e) => (CommandResult::Extend(Err(e)), None),
        },
    }
}
