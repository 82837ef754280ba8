//! The model's state, and its translation to and from idem-core's types.
//!
//! A state holds compact copies of the records ([`Rec`]) so that it can be hashed and
//! compared cheaply. Every rule is applied by converting the record to a real
//! [`idem_core::Record`], calling idem-core, and converting the record it wrote back.
//! The translation keeps every field the rules read; what it drops is listed on [`Rec`].

use idem_core::engine::ReserveEngine;
use idem_core::holder::HolderEngine;
use idem_core::proposer::Reply;
use idem_core::{ClaimId, Fence, Fingerprint, Phase, Record, StoredResponse};
use std::collections::BTreeSet;
use std::fmt;

/// Regions (each one atomic acceptor: its Raft group).
pub const REGIONS: usize = 3;
/// Concurrent proposers (one Reserve each, with its own claim id).
pub const PROPOSERS: usize = 2;
/// Regions whose accepts or stores make a majority.
pub const QUORUM: u32 = 2;
/// One model clock tick, in ms (as in idem-core's regression tests).
pub const TICK_MS: u64 = 1_000;
/// Clock skew margin: the model's clocks are exact.
pub const SKEW_MS: u64 = 0;
/// Retention: far beyond the model's horizon, so no record ever expires.
pub const RETENTION_MS: u64 = 30 * 24 * 3600 * 1000;

/// Claims per proposer: its first, and one for each fresh proposal after contention
/// (`Config::contention`, at most `TRIES - 1`).
pub const TRIES: usize = 2;

/// The claim id of claim code `c`: proposer `c % PROPOSERS`'s claim of its try
/// `c / PROPOSERS` (the proposer engine varies the nonce of the Reserve's claim for each
/// fresh proposal). Proposer 0's claims are the earlier ones.
pub fn claim_of(c: u8) -> ClaimId {
    let (p, t) = (c % PROPOSERS as u8, c / PROPOSERS as u8);
    assert!(usize::from(t) < TRIES, "claim code {c} beyond the model");
    ClaimId {
        hlc: u64::from(p) + 1,
        region: u16::from(p),
        node: 1,
        nonce: 16 * u32::from(p) + u32::from(t),
    }
}

/// The claim code of a claim id (see [`claim_of`]).
pub fn code_of(c: &ClaimId) -> u8 {
    (0..(PROPOSERS * TRIES) as u8)
        .find(|x| claim_of(*x) == *c)
        .unwrap_or_else(|| panic!("claim {c} is not one of the model's proposers' claims"))
}

/// The proposer of claim code `c`.
pub fn proposer(c: u8) -> usize {
    usize::from(c) % PROPOSERS
}

/// Fingerprint number `fp` (the configuration gives each proposer one).
pub fn fingerprint_of(fp: u8) -> Fingerprint {
    Fingerprint([fp + 1; 32])
}

fn fingerprint_index(f: &Fingerprint) -> u8 {
    let i = f.0[0].wrapping_sub(1);
    assert_eq!(*f, fingerprint_of(i), "not a model fingerprint: {f:?}");
    i
}

/// The response proposer `p` completes with: its own id.
pub fn response_of(p: u8) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![],
        body: vec![b'r', b'0' + p],
    }
}

fn response_index(r: &StoredResponse) -> u8 {
    let i = r.body.get(1).map_or(u8::MAX, |b| b.wrapping_sub(b'0'));
    assert_eq!(*r, response_of(i), "not a model response: {r:?}");
    i
}

/// The fence of claim code `c` at generation `gen`.
pub fn fence_of(c: u8, gen: u8) -> Fence {
    Fence {
        generation: u32::from(gen),
        claim: claim_of(c),
    }
}

pub fn ms(tick: u8) -> u64 {
    u64::from(tick) * TICK_MS
}

/// One region's record of the key, in the model's compact form.
///
/// Dropped in translation (none is read by a decision rule in the model's horizon):
/// `expires_ms` and `created_ms` (retention is never reached), and the region-local
/// retry bookkeeping `attempts`, `last_attempt_ms`, `first_attempt_ms` (not part of
/// `merge::digest_bytes` either). A lease that has ended (`lease <= now`) is stored as
/// 0: every rule only asks whether `now < lease`, a join takes the larger of two leases,
/// and the clock never goes back, so an ended lease is indistinguishable from 0.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rec {
    /// The claim's code (see [`claim_of`]).
    pub claim: u8,
    pub fp: u8,
    pub gen: u8,
    pub phase: Phase,
    /// Lease end, in ticks (0 once ended).
    pub lease: u8,
    pub witnesses: u8,
    pub is_final: bool,
    /// The proposer whose response is stored.
    pub resp: Option<u8>,
}

impl Rec {
    pub fn to_record(&self) -> Record {
        Record {
            expires_ms: RETENTION_MS,
            created_ms: 0,
            fingerprint: fingerprint_of(self.fp),
            generation: u32::from(self.gen),
            phase: self.phase,
            claim: claim_of(self.claim),
            lease_expires_ms: ms(self.lease),
            attempts: 0,
            last_attempt_ms: 0,
            first_attempt_ms: 0,
            witnesses: u32::from(self.witnesses),
            is_final: self.is_final,
            response: self.resp.map(response_of),
        }
    }

    /// The compact form of a record idem-core wrote at tick `now`.
    pub fn from_record(r: &Record, now: u8) -> Rec {
        assert!(!r.is_expired(ms(now)), "a record expired: {r:?}");
        assert_eq!(
            r.lease_expires_ms % TICK_MS,
            0,
            "lease not on a tick: {r:?}"
        );
        let lease = u8::try_from(r.lease_expires_ms / TICK_MS).expect("lease beyond the model");
        Rec {
            claim: code_of(&r.claim),
            fp: fingerprint_index(&r.fingerprint),
            gen: u8::try_from(r.generation).expect("generation beyond the model"),
            phase: r.phase,
            lease: if lease <= now { 0 } else { lease },
            witnesses: u8::try_from(r.witnesses).expect("witness bits beyond the model"),
            is_final: r.is_final,
            resp: r.response.as_ref().map(response_index),
        }
    }

    /// Forget a lease that has ended by tick `now`.
    pub fn at(mut self, now: u8) -> Rec {
        if self.lease <= now {
            self.lease = 0;
        }
        self
    }

    pub fn live_reserved(&self, now: u8) -> bool {
        self.phase == Phase::Reserved && now < self.lease
    }
}

impl fmt::Debug for Rec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(P{}", self.phase.as_str(), proposer(self.claim))?;
        let t = usize::from(self.claim) / PROPOSERS;
        if t > 0 {
            write!(f, "t{t}")?;
        }
        write!(f, ",g{}", self.gen)?;
        if self.fp != 0 {
            write!(f, ",fp{}", self.fp)?;
        }
        if self.lease != 0 {
            write!(f, ",lease<{}", self.lease)?;
        }
        if let Some(r) = self.resp {
            write!(f, ",resp{r}")?;
        }
        if self.witnesses != 0 {
            write!(f, ",wit{:03b}", self.witnesses)?;
        }
        if self.is_final {
            write!(f, ",final")?;
        }
        write!(f, ")")
    }
}

/// One region's reply to a Propose, as the proposer's [`idem_core::proposer::Tally`]
/// counts it (the retry-after hint of `Held` is dropped: it only shapes the answer's
/// retry-after value, never the verdict; its holder is kept: replies naming different
/// holders are contention, not IN_FLIGHT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rep {
    Accepted,
    Held { claim: u8, gen: u8 },
    Completed { claim: u8, gen: u8, resp: u8 },
    Mismatch { fp: u8 },
    StaleGen { stored: u8 },
}

impl Rep {
    pub fn from_reply(r: &Reply) -> Rep {
        match r {
            Reply::Accepted => Rep::Accepted,
            Reply::Held { holder, .. } => Rep::Held {
                claim: code_of(&holder.claim),
                gen: u8::try_from(holder.generation).expect("generation beyond the model"),
            },
            Reply::Completed { fence, response } => Rep::Completed {
                claim: code_of(&fence.claim),
                gen: u8::try_from(fence.generation).expect("generation beyond the model"),
                resp: response_index(response),
            },
            Reply::Mismatch { stored } => Rep::Mismatch {
                fp: fingerprint_index(stored),
            },
            Reply::StaleGen { stored } => Rep::StaleGen {
                stored: u8::try_from(*stored).expect("generation beyond the model"),
            },
            Reply::TooOld { .. } => panic!("TooOld cannot happen within the model's horizon"),
        }
    }

    pub fn to_reply(self) -> Reply {
        match self {
            Rep::Accepted => Reply::Accepted,
            Rep::Held { claim, gen } => Reply::Held {
                holder: fence_of(claim, gen),
                retry_after_ms: 1,
            },
            Rep::Completed { claim, gen, resp } => Reply::Completed {
                fence: fence_of(claim, gen),
                response: response_of(resp),
            },
            Rep::Mismatch { fp } => Reply::Mismatch {
                stored: fingerprint_of(fp),
            },
            Rep::StaleGen { stored } => Reply::StaleGen {
                stored: u32::from(stored),
            },
        }
    }
}

/// What a finished Reserve answered (NEW is not an answer here: it makes a holder).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Answer {
    /// REPLAY of proposer `n`'s response.
    Replay(u8),
    Mismatch,
    InFlight,
    Unavailable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Idle,
    /// Its Reserve runs in the proposer engine (`State::engines`).
    Proposing,
    /// Decided NEW for claim code `claim`: holds the key until `lease_until`.
    Holder {
        claim: u8,
        gen: u8,
        lease_until: u8,
        extends_left: u8,
    },
    /// Its Extend to `until` runs in the holder engine (`State::holders`).
    Extending {
        claim: u8,
        gen: u8,
        lease_until: u8,
        until: u8,
        extends_left: u8,
    },
    /// Its Complete runs in the holder engine (`State::holders`).
    Completing {
        claim: u8,
        gen: u8,
        lease_until: u8,
    },
    /// The holder engine acknowledged the completion (a majority stored it).
    Acked,
    /// Sent Release.
    Released,
    Done(Answer),
    /// The holder's lease ended before it released or got its completion acknowledged.
    LeaseEnded,
}

impl Status {
    /// A decided grant whose lease is live and that was neither released nor acknowledged.
    pub fn live_grant(&self, now: u8) -> bool {
        match *self {
            Status::Holder { lease_until, .. }
            | Status::Extending { lease_until, .. }
            | Status::Completing { lease_until, .. } => now < lease_until,
            _ => false,
        }
    }

    /// The claim code of the grant it holds (while a holder: `Holder`, `Extending`,
    /// `Completing`).
    pub fn claim(&self) -> Option<u8> {
        match *self {
            Status::Holder { claim, .. }
            | Status::Extending { claim, .. }
            | Status::Completing { claim, .. } => Some(claim),
            _ => None,
        }
    }

    /// The proposer decided NEW at some point.
    pub fn was_granted(&self) -> bool {
        matches!(
            self,
            Status::Holder { .. }
                | Status::Extending { .. }
                | Status::Completing { .. }
                | Status::Acked
                | Status::Released
                | Status::LeaseEnded
        )
    }
}

/// A request in flight to one region, from the holder of claim code `c` (see
/// [`claim_of`]). Requests are never consumed: each can be applied any number of times,
/// in any order, or never (loss, duplication, reordering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg {
    Propose {
        c: u8,
        region: u8,
        /// The engine's proposal number the reply is reported with.
        proposal: u8,
        gen: u8,
        lease_until: u8,
    },
    Withdraw {
        c: u8,
        region: u8,
        /// The highest generation the withdrawn claim was proposed at.
        gen: u8,
    },
    /// `live_until`: no record of this fence can have a live lease from then on.
    Complete {
        c: u8,
        region: u8,
        gen: u8,
        live_until: u8,
    },
    Extend {
        c: u8,
        region: u8,
        gen: u8,
        until: u8,
        live_until: u8,
    },
    Release {
        c: u8,
        region: u8,
        gen: u8,
    },
    Final {
        c: u8,
        region: u8,
        gen: u8,
    },
}

impl Msg {
    pub fn region(&self) -> usize {
        let r = match *self {
            Msg::Propose { region, .. }
            | Msg::Withdraw { region, .. }
            | Msg::Complete { region, .. }
            | Msg::Extend { region, .. }
            | Msg::Release { region, .. }
            | Msg::Final { region, .. } => region,
        };
        usize::from(r)
    }
}

/// History the properties need (set on the transition where it happens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ghost {
    /// The first response that was acknowledged, replayed, or replayable (a Reserve of
    /// the same request reaching some region would be answered REPLAY with it).
    pub first_resp: Option<u8>,
    /// Another response was acknowledged, replayed or replayable after (or with) it.
    pub resp_changed: bool,
    /// A proposer decided NEW while a completion was acknowledged.
    pub new_after_ack: bool,
    /// MISMATCH was answered although every proposer has the same fingerprint.
    pub mismatch_same_fp: bool,
    /// NEW was decided for one fingerprint while another fingerprint's completion (or
    /// live grant) was at a majority.
    pub new_over_other_fp: bool,
    /// A merge met two different Completed claims of one generation.
    pub dual_completion: bool,
    /// A region that applied a withdraw would still accept a Propose of the withdrawn
    /// claim at a generation it was withdrawn at.
    pub withdraw_undone: bool,
    /// An Extend was acknowledged (a holder's lease was extended).
    pub extended: bool,
    /// A Reserve was granted NEW by a fresh proposal after a round of contention.
    pub new_after_contention: bool,
    /// Proposer `p`'s completion was acknowledged and it sent its Reserve again (the
    /// client's retry of a request that is done: `Config::retry_after_ack`).
    pub retried: [bool; PROPOSERS],
    /// Such a retry was answered MISMATCH (its own request is the stored one).
    pub mismatch_own_request: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// The global clock, in ticks.
    pub now: u8,
    pub records: [Option<Rec>; REGIONS],
    /// A crashed region answers and applies nothing more.
    pub down: [bool; REGIONS],
    pub proposers: [Status; PROPOSERS],
    /// The proposer engine of each proposer whose Reserve is running (`Proposing`).
    pub engines: [Option<ReserveEngine>; PROPOSERS],
    /// The holder engine of each holder whose Complete or Extend runs.
    pub holders: [Option<HolderEngine>; PROPOSERS],
    pub net: BTreeSet<Msg>,
    pub ghost: Ghost,
}

impl State {
    pub fn initial() -> State {
        State {
            now: 0,
            records: [None; REGIONS],
            down: [false; REGIONS],
            proposers: [Status::Idle; PROPOSERS],
            engines: [None, None],
            holders: [None, None],
            net: BTreeSet::new(),
            ghost: Ghost::default(),
        }
    }

    pub fn record(&self, r: usize) -> Option<Record> {
        self.records[r].map(|x| x.to_record())
    }

    /// Store what idem-core wrote at region `r`.
    pub fn write(&mut self, r: usize, w: &Record) {
        self.records[r] = Some(Rec::from_record(w, self.now));
    }
}
