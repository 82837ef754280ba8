//! The record merge: how a region folds in another region's copy of a key's record.
//!
//! [`join`] is a join-semilattice (commutative, associative, idempotent, property-tested
//! below): the larger record under one total order wins, and the fields that only grow
//! are joined. The order (DESIGN §3):
//!
//! 1. **Completed dominates everything**: no later generation (which can only be an
//!    undecided claim) may hide a completion;
//! 2. then the generation;
//! 3. then the phase, Reserved < Released;
//! 4. then the earliest claim id.
//!
//! Two copies of one claim in one phase keep the larger lease (an acknowledged Extend
//! must survive every merge), the union of their witness sets and finality.
//! `expires_ms` is the maximum, `created_ms` the minimum. The retry bookkeeping
//! (`attempts`, `last_attempt_ms`, `first_attempt_ms`) joins too (max, max, earliest),
//! but it is region-local measurement, not replicated decision state: it is not part of
//! [`digest_bytes`] and a change to it alone is not shipped.
//!
//! [`merge`] adds the guard that keeps replication from doing what the acceptor rules
//! forbid: in GLOBAL mode it never replaces a live `Reserved` record of another claim,
//! and installs another claim's live `Reserved` record only where a `Propose` of it
//! would be accepted. Otherwise the merge is deferred and offered again later.

use crate::codec::encode_record;
use crate::{Phase, Record};
use std::cmp::Ordering;

/// The merge order of two records; `Equal` means the same claim, generation and phase.
pub fn order(a: &Record, b: &Record) -> Ordering {
    let rank = |r: &Record| match r.phase {
        Phase::Reserved => 0u8,
        Phase::Released => 1,
        Phase::Completed => 2,
    };
    (a.phase == Phase::Completed)
        .cmp(&(b.phase == Phase::Completed))
        .then(a.generation.cmp(&b.generation))
        .then(rank(a).cmp(&rank(b)))
        // The earliest claim is the larger one.
        .then(b.claim.cmp(&a.claim))
}

fn earliest_nonzero(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (x, y) => x.min(y),
    }
}

/// The join of two records (no expiry, no guard): see the module documentation.
pub fn join(a: &Record, b: &Record) -> Record {
    let mut out = match order(a, b) {
        Ordering::Greater => a.clone(),
        Ordering::Less => b.clone(),
        Ordering::Equal => {
            let mut w = a.clone();
            w.lease_expires_ms = if cfg!(feature = "broken-smaller-lease") {
                a.lease_expires_ms.min(b.lease_expires_ms)
            } else {
                a.lease_expires_ms.max(b.lease_expires_ms)
            };
            w.witnesses = a.witnesses | b.witnesses;
            w.is_final = a.is_final || b.is_final;
            // One claim completes with one request and one response; should two
            // copies ever disagree, both sides still pick the same one.
            w.fingerprint = a.fingerprint.max(b.fingerprint);
            w.response = a.response.clone().max(b.response.clone());
            w
        }
    };
    out.expires_ms = a.expires_ms.max(b.expires_ms);
    out.created_ms = a.created_ms.min(b.created_ms);
    out.attempts = a.attempts.max(b.attempts);
    out.last_attempt_ms = a.last_attempt_ms.max(b.last_attempt_ms);
    out.first_attempt_ms = earliest_nonzero(a.first_attempt_ms, b.first_attempt_ms);
    out
}

/// The unguarded join is the record's state-based CRDT: copies of one key's record merge
/// to their least upper bound under the order above ([`join`]); the laws (commutative,
/// associative, idempotent) are property-tested through this trait. What replication
/// runs is [`merge`], which adds two admission checks before this join: retention (an
/// expired copy is absent, [`join_at`]) and, in GLOBAL mode, the time-dependent guard
/// that defers a copy the acceptor rules forbid now. Every merge validates: two copies
/// of one key always have a join.
impl crdts::CvRDT for Record {
    type Validation = std::convert::Infallible;

    fn validate_merge(&self, _other: &Self) -> Result<(), Self::Validation> {
        Ok(())
    }

    fn merge(&mut self, other: Self) {
        *self = join(self, &other);
    }
}

/// The join with retention: an expired copy is absent.
pub fn join_at(now_ms: u64, a: Option<&Record>, b: Option<&Record>) -> Option<Record> {
    let a = a.filter(|r| !r.is_expired(now_ms));
    let b = b.filter(|r| !r.is_expired(now_ms));
    match (a, b) {
        (None, None) => None,
        (Some(x), None) | (None, Some(x)) => Some(x.clone()),
        (Some(x), Some(y)) => Some(join(x, y)),
    }
}

/// What a region did with a merged copy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MergeOutcome {
    /// The local record already contains the copy.
    Unchanged,
    /// The local record changed (the new record is written).
    Applied,
    /// The acceptor rules forbid it now: offer it again after `retry_after_ms`.
    Deferred { retry_after_ms: u64 },
    /// The copy expired by retention and was dropped.
    Expired,
}

/// Two regions decided differently for one key, and the merge chose between them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Conflict {
    /// GLOBAL mode: two different claims completed one generation, a safety violation
    /// (two holders both ran the side effect), which must be loud. (In REGIONAL mode
    /// that is a double grant like any other: `Overturned`.)
    DualCompletion,
    /// REGIONAL mode: the merge replaced a grant (its claim is [`Merged::overturned`])
    /// by another claim's grant that was held at the same time ([`double_grant`]), in
    /// any generation: the mode's anomaly. The overturned claim's own region counts it
    /// (`CommandResult::Merge::double_grant`), so one double grant counts once however
    /// the copies travel. (GLOBAL merges are guarded and report no such conflict.) A
    /// unit variant: results travel between nodes of adjacent releases.
    Overturned,
}

/// When a grant started: its claim's mint time (the proposing leader's clock, which
/// the lease-judging clock of every region is within the skew bound of).
fn granted_ms(r: &Record) -> u64 {
    crate::Hlc::physical_ms(r.claim.hlc)
}

/// Whether two records of different claims are grants that were held at the same time,
/// as far as the records tell: neither was given up (`Released`: its holder ran
/// nothing), and the later grant came before the earlier one's lease ended, or at any
/// time after the earlier one completed (a region that had known that completion would
/// have answered REPLAY). A takeover after a lease ended is no double grant.
pub fn double_grant(a: &Record, b: &Record) -> bool {
    if a.claim == b.claim || a.phase == Phase::Released || b.phase == Phase::Released {
        return false;
    }
    let (first, later) = if (granted_ms(a), a.claim) <= (granted_ms(b), b.claim) {
        (a, b)
    } else {
        (b, a)
    };
    first.phase == Phase::Completed || granted_ms(later) < first.lease_expires_ms
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merged {
    pub outcome: MergeOutcome,
    /// The record to write, when `outcome` is `Applied`.
    pub write: Option<Record>,
    pub conflict: Option<Conflict>,
    /// With `Conflict::Overturned`: the claim whose grant the merge replaced.
    pub overturned: Option<crate::ClaimId>,
}

/// Fold `remote` into the local record at time `now_ms`. `guarded`: GLOBAL mode (the
/// merge must never do what the acceptor rules forbid); REGIONAL mode merges at once.
pub fn merge(
    local: Option<&Record>,
    remote: &Record,
    now_ms: u64,
    skew_margin_ms: u64,
    guarded: bool,
) -> Merged {
    let done = |outcome, write, conflict| Merged {
        outcome,
        write,
        conflict,
        overturned: None,
    };
    if remote.is_expired(now_ms) {
        return done(MergeOutcome::Expired, None, None);
    }
    let Some(local) = local.filter(|r| !r.is_expired(now_ms)) else {
        return done(MergeOutcome::Applied, Some(remote.clone()), None);
    };
    let live_until = |r: &Record| r.lease_expires_ms.saturating_add(skew_margin_ms);
    let live = |r: &Record| r.phase == Phase::Reserved && now_ms < live_until(r);
    if guarded && remote.claim != local.claim && !cfg!(feature = "broken-unguarded-merge") {
        // Never replace a live Reserved record of another claim: this region's accept
        // of it may be part of that claim's majority.
        if live(local) {
            let retry = live_until(local).saturating_sub(now_ms).max(1);
            return done(
                MergeOutcome::Deferred {
                    retry_after_ms: retry,
                },
                None,
                None,
            );
        }
        // Install another claim's live record only where a Propose of it would be
        // accepted (acceptor rule 5: a higher generation, and not over a completion).
        if live(remote)
            && !(local.phase != Phase::Completed && remote.generation > local.generation)
        {
            let retry = live_until(remote).saturating_sub(now_ms).max(1);
            return done(
                MergeOutcome::Deferred {
                    retry_after_ms: retry,
                },
                None,
                None,
            );
        }
    }
    let overturned = (local.claim != remote.claim
        && !guarded
        && order(remote, local) == Ordering::Greater
        && double_grant(local, remote))
    .then_some(local.claim);
    let conflict = if overturned.is_some() {
        Some(Conflict::Overturned)
    } else if local.claim != remote.claim
        && guarded
        && local.generation == remote.generation
        && local.phase == Phase::Completed
        && remote.phase == Phase::Completed
    {
        Some(Conflict::DualCompletion)
    } else {
        None
    };
    let joined = join(local, remote);
    let mut m = if joined == *local {
        done(MergeOutcome::Unchanged, None, conflict)
    } else {
        done(MergeOutcome::Applied, Some(joined), conflict)
    };
    m.overturned = overturned;
    m
}

/// A completion whose witness set reached `quorum` regions is final (0: no inference,
/// finality only from the acceptor or a Final notice). Witness sets only grow by merge,
/// so a completion the regions each witnessed alone becomes final once their copies meet.
pub fn settle_finality(r: &mut Record, quorum: u32) {
    if quorum > 0 && r.phase == Phase::Completed && r.witnesses.count_ones() >= quorum {
        r.is_final = true;
    }
}

/// The replicated part of a record, in a fixed layout: what the regions must agree on
/// after they converge (digests are computed over this). The retry bookkeeping is
/// region-local and zeroed.
pub fn digest_bytes(r: &Record) -> Vec<u8> {
    let mut c = r.clone();
    c.attempts = 0;
    c.last_attempt_ms = 0;
    c.first_attempt_ms = 0;
    encode_record(&c)
}

/// Whether two records agree on every replicated field: `digest_bytes(a) ==
/// digest_bytes(b)`, without copying either (a response may be 1 MiB). Every field is
/// named, so a new one must be placed on one side or the other.
pub fn same_replicated(a: &Record, b: &Record) -> bool {
    let Record {
        expires_ms,
        created_ms,
        fingerprint,
        generation,
        phase,
        claim,
        lease_expires_ms,
        attempts: _,
        last_attempt_ms: _,
        first_attempt_ms: _,
        witnesses,
        is_final,
        response,
    } = a;
    *expires_ms == b.expires_ms
        && *created_ms == b.created_ms
        && *fingerprint == b.fingerprint
        && *generation == b.generation
        && *phase == b.phase
        && *claim == b.claim
        && *lease_expires_ms == b.lease_expires_ms
        && *witnesses == b.witnesses
        && *is_final == b.is_final
        && *response == b.response
}

/// Whether a change from `before` to `after` must be shipped to the other regions.
pub fn replicated_change(before: Option<&Record>, after: &Record) -> bool {
    before.is_none_or(|b| !same_replicated(b, after))
}

#[cfg(test)]
mod tests;
