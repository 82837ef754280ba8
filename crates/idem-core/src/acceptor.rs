//! The acceptor rules (DESIGN §3): what one region's group decides for each call, given
//! the record it holds and the time stamped on the log entry.
//!
//! These functions are deterministic and side-effect free. They return the outcome and,
//! when the record changes, the new record to write; the state machine writes exactly
//! that. In single-region deployments the local group's decision is final, so a Reserve
//! takes the next generation itself (`generation: None`); the cross-region proposer
//! passes the generation it proposes and reacts to `StaleGen`.

use crate::{ClaimId, Fence, Fingerprint, Phase, Record, StoredResponse};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How close to its retention limit a first attempt may be before a Reserve is refused
/// as too old: an hour, or a tenth of the retention when that is shorter.
pub fn too_old_margin_ms(retention_ms: u64) -> u64 {
    (60 * 60 * 1000u64).min(retention_ms / 10)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveArgs {
    pub now_ms: u64,
    pub skew_margin_ms: u64,
    pub fingerprint: Fingerprint,
    pub claim: ClaimId,
    /// `None`: the local decision is final and the next generation is taken.
    pub generation: Option<u32>,
    pub lease_ms: u64,
    /// GLOBAL mode: the lease end the proposer chose, the same in every region.
    /// `None`: `now + lease_ms`.
    pub lease_until_ms: Option<u64>,
    pub retention_ms: u64,
    /// The caller's first attempt at this request (0 = this is it / unknown).
    pub first_attempt_ms: u64,
    /// Bit of this region in witness sets.
    pub region_bit: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReserveOutcome {
    /// The caller owns the key until `lease_expires_ms`.
    New {
        fence: Fence,
        lease_expires_ms: u64,
        /// The claim whose lease expired before this grant took the key over.
        takeover: Option<Fence>,
    },
    /// Another attempt holds a live lease (or its completion is not final yet).
    InFlight { holder: Fence, retry_after_ms: u64 },
    /// The completed attempt's response, to be returned byte for byte.
    Replay {
        fence: Fence,
        response: StoredResponse,
    },
    /// Same key, different request.
    Mismatch { stored: Fingerprint },
    /// The request's first attempt is too close to the retention limit to guarantee
    /// at-most-once: the original record may already be gone.
    TooOld {
        first_attempt_ms: u64,
        limit_ms: u64,
    },
    /// The proposed generation is not above the stored one.
    StaleGen { stored: u32 },
}

impl ReserveOutcome {
    pub fn label(&self) -> &'static str {
        match self {
            ReserveOutcome::New { .. } => "new",
            ReserveOutcome::InFlight { .. } => "in_flight",
            ReserveOutcome::Replay { .. } => "replay",
            ReserveOutcome::Mismatch { .. } => "mismatch",
            ReserveOutcome::TooOld { .. } => "too_old",
            ReserveOutcome::StaleGen { .. } => "stale_gen",
        }
    }
}

/// A Reserve decision: the outcome, the record to write (if it changed) and the retry
/// facts the server measures from the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub outcome: ReserveOutcome,
    pub write: Option<Record>,
    /// Which attempt at this request this Reserve is (1 = first), from the record.
    pub attempt: u32,
    /// Time since the previous attempt on the same key and fingerprint.
    pub since_previous_ms: Option<u64>,
}

/// Decide a Reserve against the stored record.
pub fn reserve(stored: Option<&Record>, a: &ReserveArgs) -> Decision {
    let now = a.now_ms;
    let cur = stored.filter(|r| !r.is_expired(now));
    let same_fp = cur.is_some_and(|r| r.fingerprint == a.fingerprint);
    let attempt = match cur {
        Some(r) if same_fp => r.attempts.saturating_add(1),
        _ => 1,
    };
    let since_previous_ms = match cur {
        Some(r) if same_fp && r.last_attempt_ms > 0 => Some(now.saturating_sub(r.last_attempt_ms)),
        _ => None,
    };
    // The record as it stands after counting this attempt.
    let touched = |r: &Record| {
        let mut t = r.clone();
        t.attempts = attempt;
        t.last_attempt_ms = now;
        t.first_attempt_ms = earliest(t.first_attempt_ms, a.first_attempt_ms);
        t
    };
    let decided = |outcome, write| Decision {
        outcome,
        write,
        attempt,
        since_previous_ms,
    };

    // Rule 6: no record. A proposal keeps its own generation (every region of one
    // proposal must store the same fence).
    let Some(r) = cur else {
        return grant(
            None,
            a,
            a.generation.unwrap_or(1).max(1),
            attempt,
            since_previous_ms,
        );
    };
    let held =
        r.phase == Phase::Reserved && now < r.lease_expires_ms.saturating_add(a.skew_margin_ms);

    // Rule 1: a live record of another request. 422 wins over 409.
    if !same_fp && (held || r.phase == Phase::Completed) {
        return decided(
            ReserveOutcome::Mismatch {
                stored: r.fingerprint,
            },
            None,
        );
    }
    match r.phase {
        // Rule 2: completed. Only a final completion is replayed.
        Phase::Completed => {
            let outcome = match (&r.response, r.is_final) {
                (Some(resp), true) => ReserveOutcome::Replay {
                    fence: r.fence(),
                    response: resp.clone(),
                },
                _ => ReserveOutcome::InFlight {
                    holder: r.fence(),
                    retry_after_ms: a.skew_margin_ms.max(1),
                },
            };
            decided(outcome, Some(touched(r)))
        }
        // Rule 3: the same claim again (a re-applied or retried proposal).
        Phase::Reserved | Phase::Released
            if r.claim == a.claim
                && (r.phase == Phase::Reserved || cfg!(feature = "broken-accept-withdrawn")) =>
        {
            let gen = a.generation.unwrap_or(r.generation);
            if gen < r.generation {
                decided(
                    ReserveOutcome::StaleGen {
                        stored: r.generation,
                    },
                    None,
                )
            } else {
                let mut w = touched(r);
                w.generation = gen;
                w.phase = Phase::Reserved;
                decided(
                    ReserveOutcome::New {
                        fence: w.fence(),
                        lease_expires_ms: w.lease_expires_ms,
                        takeover: None,
                    },
                    Some(w),
                )
            }
        }
        // Rule 4: another claim's live lease.
        Phase::Reserved if held => decided(
            ReserveOutcome::InFlight {
                holder: r.fence(),
                retry_after_ms: r
                    .lease_expires_ms
                    .saturating_add(a.skew_margin_ms)
                    .saturating_sub(now)
                    .max(1),
            },
            Some(touched(r)),
        ),
        // Rule 5: released, or the lease is over: only a higher generation takes it.
        Phase::Reserved | Phase::Released => {
            let next = r.generation.saturating_add(1);
            let gen = a.generation.unwrap_or(next);
            if gen <= r.generation {
                return decided(
                    ReserveOutcome::StaleGen {
                        stored: r.generation,
                    },
                    None,
                );
            }
            grant(Some(r), a, gen, attempt, since_previous_ms)
        }
    }
}

fn earliest(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (x, y) => x.min(y),
    }
}

fn grant(
    prev: Option<&Record>,
    a: &ReserveArgs,
    generation: u32,
    attempt: u32,
    since_previous_ms: Option<u64>,
) -> Decision {
    let now = a.now_ms;
    // Only attempts at the same request count: another request's first attempt says
    // nothing about this one's age.
    let same = prev.filter(|p| p.fingerprint == a.fingerprint);
    let first_attempt_ms = earliest(same.map_or(0, |p| p.first_attempt_ms), a.first_attempt_ms);
    // The retention that governs the key: the stored record's own when there is one
    // (what its copies elsewhere were written with), not what this request asks for.
    let retention_ms = prev
        .map(|p| p.expires_ms.saturating_sub(p.created_ms))
        .filter(|r| *r > 0)
        .unwrap_or(a.retention_ms);
    let limit_ms = retention_ms.saturating_sub(too_old_margin_ms(retention_ms));
    if first_attempt_ms != 0 && now.saturating_sub(first_attempt_ms) > limit_ms {
        return Decision {
            outcome: ReserveOutcome::TooOld {
                first_attempt_ms,
                limit_ms,
            },
            write: None,
            attempt,
            since_previous_ms,
        };
    }
    let takeover = prev
        .filter(|p| p.phase == Phase::Reserved && p.claim != a.claim)
        .map(Record::fence);
    let record = Record {
        expires_ms: prev
            .map_or(0, |p| p.expires_ms)
            .max(now.saturating_add(a.retention_ms)),
        created_ms: prev.map_or(now, |p| p.created_ms),
        fingerprint: a.fingerprint,
        generation,
        phase: Phase::Reserved,
        claim: a.claim,
        lease_expires_ms: a.lease_until_ms.unwrap_or(now.saturating_add(a.lease_ms)),
        attempts: attempt,
        last_attempt_ms: now,
        first_attempt_ms,
        witnesses: 0,
        is_final: false,
        response: None,
    };
    Decision {
        outcome: ReserveOutcome::New {
            fence: record.fence(),
            lease_expires_ms: record.lease_expires_ms,
            takeover,
        },
        write: Some(record),
        attempt,
        since_previous_ms,
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompleteError {
    #[error("the lease of this fence is over or the key was granted to another claim")]
    LeaseLost { current: Option<Fence> },
    #[error("no record for this key (never reserved, or expired by retention)")]
    NotFound,
}

/// Store a completion. `Ok(None)`: already completed by this fence and nothing new to
/// record, acknowledge again.
///
/// The region's bit joins the witness set only while the lease is live here; the
/// completion is final once `quorum` regions witnessed it (1 in a single region or in
/// REGIONAL mode, a majority of regions in GLOBAL mode). Once the lease has ended a
/// Complete is refused even if a merge already brought the same completion: an
/// acknowledgement must never arrive after the holder's lease.
pub fn complete(
    stored: Option<&Record>,
    fence: Fence,
    response: StoredResponse,
    now_ms: u64,
    region_bit: u32,
    quorum: u32,
) -> Result<Option<Record>, CompleteError> {
    let r = stored
        .filter(|r| !r.is_expired(now_ms))
        .ok_or(CompleteError::NotFound)?;
    let lost = || CompleteError::LeaseLost {
        current: Some(r.fence()),
    };
    if r.fence() != fence || now_ms >= r.lease_expires_ms {
        return Err(lost());
    }
    let witnessed = |w: &mut Record| {
        w.witnesses |= region_bit;
        w.is_final |= w.witnesses.count_ones() >= quorum.max(1);
    };
    match r.phase {
        Phase::Completed => {
            let mut w = r.clone();
            witnessed(&mut w);
            Ok((w != *r).then_some(w))
        }
        Phase::Released => Err(lost()),
        Phase::Reserved => {
            let mut w = r.clone();
            w.phase = Phase::Completed;
            w.response = Some(response);
            witnessed(&mut w);
            Ok(Some(w))
        }
    }
}

/// Count one more attempt on a record answered without a Raft round (a REPLAY from a
/// final local copy): the retry bookkeeping only, never the decision.
pub fn touch(
    stored: Option<&Record>,
    fingerprint: crate::Fingerprint,
    now_ms: u64,
    first_attempt_ms: u64,
    count: u32,
) -> Option<Record> {
    let r = stored.filter(|r| !r.is_expired(now_ms) && r.fingerprint == fingerprint)?;
    let mut w = r.clone();
    w.attempts = w.attempts.saturating_add(count);
    w.last_attempt_ms = w.last_attempt_ms.max(now_ms);
    w.first_attempt_ms = earliest(w.first_attempt_ms, first_attempt_ms);
    Some(w)
}

/// The proposer's notice that a completion reached a majority: mark it final here
/// without waiting for anti-entropy. Anything else is left alone.
pub fn finalize(stored: Option<&Record>, fence: Fence, now_ms: u64) -> Option<Record> {
    let r = stored.filter(|r| !r.is_expired(now_ms))?;
    if r.phase == Phase::Completed && r.fence() == fence && !r.is_final {
        let mut w = r.clone();
        w.is_final = true;
        return Some(w);
    }
    None
}

/// What a `Final` notice answers: whether, once applied, the record holds the
/// completion of `fence` as final (`Ok`), holds another grant or completion
/// (`LeaseLost`), or nothing (`NotFound`).
pub fn final_here(stored: Option<&Record>, fence: Fence, now_ms: u64) -> Result<(), CompleteError> {
    match stored.filter(|r| !r.is_expired(now_ms)) {
        None => Err(CompleteError::NotFound),
        Some(r) if r.phase == Phase::Completed && r.fence() == fence => Ok(()),
        Some(r) => Err(CompleteError::LeaseLost {
            current: Some(r.fence()),
        }),
    }
}

/// What a withdraw names: the claim, the highest generation it was proposed at, and
/// what a tombstone needs (the request's fingerprint and retention).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WithdrawArgs {
    pub claim: ClaimId,
    /// 0: only take an accept back (no tombstone), as log entries written before
    /// tombstones did.
    pub generation: u32,
    pub fingerprint: Fingerprint,
    pub retention_ms: u64,
    pub now_ms: u64,
    pub skew_margin_ms: u64,
}

/// A failed proposal takes its accept back, and stays withdrawn: no Propose of the
/// claim at `generation` or below is accepted here afterwards, even one still on the
/// wire when the withdraw arrived (a withdraw that overtakes its own Propose must not
/// leave the key reserved for nobody for a whole lease).
///
/// - A `Reserved` or `Released` record of the claim at or below the withdrawn
///   generation becomes `Released` at the withdrawn one (rule 5 then refuses the
///   claim's Propose).
/// - Where there is no record, or a record of another claim at a lower generation
///   whose lease is over (with the skew margin) or that was released, a `Released`
///   tombstone of the claim at the withdrawn generation is written: what the Propose
///   followed by this withdraw would have left. It is replicated and merged like any
///   record (same claim and generation: `Released` dominates `Reserved`).
/// - A completion, a record of another claim at the same or a higher generation (rule 5
///   already refuses the claim there) and another claim's live lease are left alone:
///   the merge order must never let a withdraw hide a grant.
pub fn withdraw(stored: Option<&Record>, a: &WithdrawArgs) -> Option<Record> {
    let now = a.now_ms;
    let tombstone = |prev: Option<&Record>| {
        (a.generation > 0 && (prev.is_some() || a.retention_ms > 0)).then(|| Record {
            expires_ms: prev.map_or(now.saturating_add(a.retention_ms), |p| p.expires_ms),
            created_ms: prev.map_or(now, |p| p.created_ms),
            fingerprint: a.fingerprint,
            generation: a.generation,
            phase: Phase::Released,
            claim: a.claim,
            lease_expires_ms: 0,
            attempts: prev.map_or(0, |p| p.attempts),
            last_attempt_ms: prev.map_or(0, |p| p.last_attempt_ms),
            first_attempt_ms: prev.map_or(0, |p| p.first_attempt_ms),
            witnesses: 0,
            is_final: false,
            response: None,
        })
    };
    let Some(r) = stored.filter(|r| !r.is_expired(now)) else {
        return tombstone(None);
    };
    match r.phase {
        Phase::Completed => None,
        // (A record of the claim above the withdrawn generation is a later proposal of
        // it, which this withdraw does not cover.)
        Phase::Reserved | Phase::Released
            if r.claim == a.claim && (a.generation == 0 || r.generation <= a.generation) =>
        {
            let mut w = r.clone();
            w.phase = Phase::Released;
            w.generation = w.generation.max(a.generation);
            (w != *r).then_some(w)
        }
        _ if r.generation >= a.generation => None,
        Phase::Reserved if now < r.lease_expires_ms.saturating_add(a.skew_margin_ms) => None,
        Phase::Reserved | Phase::Released => tombstone(Some(r)),
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseError {
    #[error("the key was granted to another claim")]
    LeaseLost { current: Option<Fence> },
    #[error("the key is already completed; a completed key cannot be released")]
    AlreadyCompleted,
    #[error("no record for this key (never reserved, or expired by retention)")]
    NotFound,
}

/// Give a key back after a failure that had no side effect. Releasing twice is harmless.
pub fn release(
    stored: Option<&Record>,
    fence: Fence,
    now_ms: u64,
) -> Result<Option<Record>, ReleaseError> {
    let r = stored
        .filter(|r| !r.is_expired(now_ms))
        .ok_or(ReleaseError::NotFound)?;
    if r.fence() != fence {
        return Err(ReleaseError::LeaseLost {
            current: Some(r.fence()),
        });
    }
    match r.phase {
        Phase::Completed => Err(ReleaseError::AlreadyCompleted),
        Phase::Released => Ok(None),
        Phase::Reserved => {
            let mut w = r.clone();
            w.phase = Phase::Released;
            Ok(Some(w))
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExtendError {
    #[error("the lease of this fence is over or the key was granted to another claim")]
    LeaseLost { current: Option<Fence> },
    #[error("no record for this key (never reserved, or expired by retention)")]
    NotFound,
}

/// Extend a live lease to `until_ms` (GLOBAL mode: chosen by the proposer, the same in
/// every region) or else `now + lease_ms`. A lease is never shortened.
pub fn extend(
    stored: Option<&Record>,
    fence: Fence,
    lease_ms: u64,
    until_ms: Option<u64>,
    now_ms: u64,
) -> Result<Record, ExtendError> {
    let r = stored
        .filter(|r| !r.is_expired(now_ms))
        .ok_or(ExtendError::NotFound)?;
    if r.fence() != fence || !r.lease_live(now_ms) {
        return Err(ExtendError::LeaseLost {
            current: Some(r.fence()),
        });
    }
    let mut w = r.clone();
    w.lease_expires_ms = r
        .lease_expires_ms
        .max(until_ms.unwrap_or(now_ms.saturating_add(lease_ms)));
    Ok(w)
}

#[cfg(test)]
mod tests;
