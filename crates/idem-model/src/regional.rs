//! An exhaustive model check of REGIONAL mode's double-grant count, driving idem-core's
//! real `command::apply` (the local Reserve, Complete and Release a REGIONAL namespace
//! runs, and the unguarded `Merge` that counts).
//!
//! # What is modelled
//!
//! One key; 3 regions, each one atomic state machine (its Raft group) holding the
//! key's record and the group's double-grant count; one client per region that
//! Reserves once, at any tick, in its own region alone (REGIONAL: no cross-region
//! round), and if granted may Complete or Release while its lease lasts. Any region's
//! current record is merged into any other region at any time, any number of times, or
//! not yet: the outbox relay (which ships a key's record as it is when it ships) and
//! anti-entropy both deliver that. Not modelled: a copy delayed in flight past a newer
//! copy of the same key (see `docs/protocol.md` §4 for what that can hide). The clock
//! ticks to `tmax`.
//!
//! # Properties
//!
//! The ghost state records every grant as it happened (region, tick, lease end,
//! completed or released), and *held at once* from that history:
//!
//! * `COUNTED_ONCE`: no grant is counted twice, by any region, whatever the delivery
//!   order and duplication;
//! * `COUNTED_ONLY_DOUBLE`: a counted grant was held at once with another grant (a
//!   release does not undo that; records judge a `Released` copy as no grant, since
//!   they cannot tell when it was released, so they may count less, never more);
//! * `EXACT_WHEN_ALL_HELD_AT_ONCE`: once the regions agree, if every two grants' leases
//!   overlapped and none was released, `grants - 1` were counted. (The documented
//!   limits, which the search shows are real: a released grant; a grant that overlapped
//!   another only through that one's completion, where the pair met before the
//!   completion did; a pair hidden behind a third record. Each may go uncounted;
//!   nothing is counted twice or without cause.)
//! * `sometimes`: a double grant is counted; two are counted (three grants at once).
//!
//! The variant [`RegionalVariant::CountEveryOverturn`] (every region that merges an
//! overturn counts it, as the metric once did) must break `COUNTED_ONCE`.

use idem_core::acceptor::ReserveOutcome;
use idem_core::command::{apply, Command, CommandResult, Op};
use idem_core::merge::Conflict;
use idem_core::{ClaimId, Fence, Fingerprint, Hlc, Key, Phase, Record};
use stateright::{Model, Property};

use crate::state::{ms, response_of, REGIONS, RETENTION_MS, TICK_MS};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegionalVariant {
    /// The shipped rule: the region whose own grant was overturned counts it.
    Correct,
    /// Broken: every region that merges an overturned grant counts it.
    CountEveryOverturn,
}

#[derive(Clone, Debug)]
pub struct RegionalConfig {
    /// Lease, in ticks.
    pub lease: u8,
    pub tmax: u8,
    pub variant: RegionalVariant,
}

impl Default for RegionalConfig {
    fn default() -> Self {
        RegionalConfig {
            lease: 2,
            tmax: 3,
            variant: RegionalVariant::Correct,
        }
    }
}

/// A record in compact form: the claim is region `claim`'s, minted at tick `minted`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RRec {
    pub claim: u8,
    pub minted: u8,
    pub gen: u8,
    pub phase: Phase,
    pub lease: u8,
}

fn claim_of(region: u8, minted: u8) -> ClaimId {
    ClaimId {
        hlc: Hlc::compose(ms(minted), 0),
        region: u16::from(region),
        node: 1,
        nonce: u32::from(region),
    }
}

impl RRec {
    fn to_record(&self) -> Record {
        let phase = self.phase;
        Record {
            expires_ms: RETENTION_MS,
            created_ms: 0,
            fingerprint: Fingerprint([1; 32]),
            generation: u32::from(self.gen),
            phase,
            claim: claim_of(self.claim, self.minted),
            lease_expires_ms: ms(self.lease),
            attempts: 0,
            last_attempt_ms: 0,
            first_attempt_ms: 0,
            witnesses: 0,
            is_final: phase == Phase::Completed,
            response: (phase == Phase::Completed).then(|| response_of(self.claim)),
        }
    }

    fn from_record(r: &Record) -> RRec {
        assert_eq!(r.lease_expires_ms % TICK_MS, 0, "lease off a tick: {r:?}");
        let rrec = RRec {
            claim: r.claim.region as u8,
            minted: (Hlc::physical_ms(r.claim.hlc) / TICK_MS) as u8,
            gen: r.generation as u8,
            phase: r.phase,
            lease: (r.lease_expires_ms / TICK_MS) as u8,
        };
        assert_eq!(rrec.to_record().claim, r.claim, "not a model claim: {r:?}");
        rrec
    }
}

/// A grant as it happened.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Grant {
    pub region: u8,
    pub at: u8,
    /// The generation its region granted it at.
    pub gen: u8,
    pub lease: u8,
    pub completed: bool,
    pub released: bool,
}

/// Whether two grants were held at once, judged from what happened rather than from
/// records (`merge::double_grant` judges the records): the later one was granted before
/// the earlier one's lease ended, or at any time after it completed. A release does
/// not undo that two NEWs were live at once.
fn held_at_once(a: &Grant, b: &Grant) -> bool {
    a.region != b.region && {
        let (first, later) = ordered(a, b);
        first.completed || later.at < first.lease
    }
}

/// Whether the later of two grants came before the earlier one's lease ended.
fn leases_overlap(a: &Grant, b: &Grant) -> bool {
    a.region != b.region && {
        let (first, later) = ordered(a, b);
        later.at < first.lease
    }
}

/// Two grants, the earlier first (in claim order: tick, then region).
fn ordered<'a>(a: &'a Grant, b: &'a Grant) -> (&'a Grant, &'a Grant) {
    if (a.at, a.region) <= (b.at, b.region) {
        (a, b)
    } else {
        (b, a)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RState {
    pub now: u8,
    pub recs: [Option<RRec>; REGIONS],
    pub counts: [u8; REGIONS],
    pub reserved: [bool; REGIONS],
    /// Index into `grants` of each region's grant.
    pub grant_of: [Option<u8>; REGIONS],
    pub grants: Vec<Grant>,
    /// How many times each region's grant was counted, by any region (ghost).
    pub counted: [u8; REGIONS],
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RAction {
    Reserve(u8),
    Complete(u8),
    Release(u8),
    AntiEntropy { src: u8, dst: u8 },
    Tick,
}

pub struct RegionalModel {
    pub cfg: RegionalConfig,
}

fn key() -> Key {
    Key {
        tenant: "t".into(),
        scope: "regional".into(),
        key: b"k".to_vec(),
    }
}

impl RegionalModel {
    pub fn new(cfg: RegionalConfig) -> Self {
        RegionalModel { cfg }
    }

    fn command(&self, s: &RState, region: u8, op: Op) -> Command {
        Command {
            now_ms: ms(s.now),
            skew_margin_ms: 0,
            claim: claim_of(region, s.now),
            region_bit: 1 << region,
            key: key(),
            op,
        }
    }

    /// Apply `op` at `region` and write the record.
    fn run(&self, s: &mut RState, region: u8, op: Op) -> CommandResult {
        let stored = s.recs[region as usize].as_ref().map(RRec::to_record);
        let cmd = self.command(s, region, op);
        let (result, write) = apply(stored.as_ref(), &cmd);
        if let Some(w) = write {
            s.recs[region as usize] = Some(RRec::from_record(&w));
        }
        result
    }

    fn merge(&self, s: &mut RState, dst: u8, rec: &RRec) {
        let op = Op::Merge {
            record: rec.to_record(),
            guarded: false,
            quorum: 0,
            region: Some(u16::from(dst)),
        };
        // What the state engine counts comes from the command result alone; which grant
        // it was, from the merge itself (ghost bookkeeping).
        let local = s.recs[dst as usize].as_ref().map(RRec::to_record);
        let judged = idem_core::merge::merge(local.as_ref(), &rec.to_record(), ms(s.now), 0, false);
        if let CommandResult::Merge {
            conflict,
            double_grant,
            ..
        } = self.run(s, dst, op)
        {
            let loser = judged.overturned.map(|c| c.region as u8);
            let counted = match (self.cfg.variant, &conflict) {
                (RegionalVariant::Correct, Some(Conflict::Overturned)) => {
                    double_grant.then_some(loser).flatten()
                }
                (RegionalVariant::CountEveryOverturn, Some(Conflict::Overturned)) => loser,
                _ => None,
            };
            if let Some(c) = counted {
                s.counts[dst as usize] += 1;
                s.counted[c as usize] += 1;
            }
        }
    }

    /// The live grant of `region`'s client, if it may still act.
    fn holder(&self, s: &RState, region: u8) -> Option<(usize, Fence)> {
        let g = s.grant_of[region as usize]? as usize;
        let grant = &s.grants[g];
        if grant.completed || grant.released || s.now >= grant.lease {
            return None;
        }
        let fence = Fence {
            generation: u32::from(grant.gen),
            claim: claim_of(region, grant.at),
        };
        Some((g, fence))
    }

    /// The clock is at its end and the regions agree.
    fn quiescent(&self, s: &RState) -> bool {
        s.now == self.cfg.tmax && s.recs.windows(2).all(|w| w[0] == w[1])
    }
}

impl Model for RegionalModel {
    type State = RState;
    type Action = RAction;

    fn init_states(&self) -> Vec<RState> {
        vec![RState {
            now: 0,
            recs: [None, None, None],
            counts: [0; REGIONS],
            reserved: [false; REGIONS],
            grant_of: [None; REGIONS],
            grants: Vec::new(),
            counted: [0; REGIONS],
        }]
    }

    fn actions(&self, s: &RState, out: &mut Vec<RAction>) {
        for r in 0..REGIONS as u8 {
            if !s.reserved[r as usize] {
                out.push(RAction::Reserve(r));
            }
            if self.holder(s, r).is_some() {
                out.push(RAction::Complete(r));
                out.push(RAction::Release(r));
            }
            for d in 0..REGIONS as u8 {
                if d != r
                    && s.recs[r as usize].is_some()
                    && s.recs[r as usize] != s.recs[d as usize]
                {
                    out.push(RAction::AntiEntropy { src: r, dst: d });
                }
            }
        }
        if s.now < self.cfg.tmax {
            out.push(RAction::Tick);
        }
    }

    fn next_state(&self, s: &RState, a: RAction) -> Option<RState> {
        let mut s = s.clone();
        match a {
            RAction::Reserve(r) => {
                s.reserved[r as usize] = true;
                let op = Op::Reserve {
                    fingerprint: Fingerprint([1; 32]),
                    lease_ms: ms(self.cfg.lease),
                    retention_ms: RETENTION_MS,
                    first_attempt_ms: 0,
                };
                if let CommandResult::Reserve {
                    outcome: ReserveOutcome::New { fence, .. },
                    ..
                } = self.run(&mut s, r, op)
                {
                    assert_eq!(fence.claim, claim_of(r, s.now));
                    s.grant_of[r as usize] = Some(s.grants.len() as u8);
                    s.grants.push(Grant {
                        region: r,
                        at: s.now,
                        gen: fence.generation as u8,
                        lease: s.now + self.cfg.lease,
                        completed: false,
                        released: false,
                    });
                }
            }
            RAction::Complete(r) | RAction::Release(r) => {
                let (g, fence) = self.holder(&s, r)?;
                let complete = matches!(a, RAction::Complete(_));
                let op = if complete {
                    Op::Complete {
                        fence,
                        response: response_of(r),
                        quorum: 1,
                    }
                } else {
                    Op::Release { fence }
                };
                match self.run(&mut s, r, op) {
                    CommandResult::Complete(Ok(())) => s.grants[g].completed = true,
                    CommandResult::Release(Ok(())) => s.grants[g].released = true,
                    // Its record was overturned by a merge: the holder's call fails.
                    _ => {}
                }
            }
            RAction::AntiEntropy { src, dst } => {
                let rec = s.recs[src as usize].clone()?;
                self.merge(&mut s, dst, &rec);
            }
            RAction::Tick => s.now += 1,
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(COUNTED_ONCE, |_, s: &RState| {
                s.counted.iter().all(|c| *c <= 1)
            }),
            Property::always(COUNTED_ONLY_DOUBLE, |_, s: &RState| {
                (0..REGIONS).filter(|c| s.counted[*c] > 0).all(|c| {
                    let Some(g) = s.grant_of[c] else {
                        return false;
                    };
                    let g = &s.grants[g as usize];
                    s.grants.iter().any(|o| held_at_once(g, o))
                })
            }),
            Property::always(
                EXACT_WHEN_ALL_HELD_AT_ONCE,
                |m: &RegionalModel, s: &RState| {
                    if s.grants.len() < 2 || !m.quiescent(s) {
                        return true;
                    }
                    let clique =
                        s.grants.iter().enumerate().all(|(i, a)| {
                            s.grants.iter().skip(i + 1).all(|b| leases_overlap(a, b))
                        });
                    let released = s.grants.iter().any(|g| g.released);
                    !clique || released || total(s) == s.grants.len() - 1
                },
            ),
            Property::sometimes(SOME_EXACT_CASE, |m: &RegionalModel, s: &RState| {
                s.grants.len() >= 2
                    && m.quiescent(s)
                    && !s.grants.iter().any(|g| g.released)
                    && s.grants
                        .iter()
                        .enumerate()
                        .all(|(i, a)| s.grants.iter().skip(i + 1).all(|b| leases_overlap(a, b)))
            }),
            Property::sometimes(SOME_COUNTED, |_, s: &RState| total(s) >= 1),
            Property::sometimes(TWO_COUNTED, |_, s: &RState| total(s) >= 2),
        ]
    }
}

fn total(s: &RState) -> usize {
    s.counts.iter().map(|c| usize::from(*c)).sum()
}

pub const COUNTED_ONCE: &str = "a double grant is counted once";
pub const COUNTED_ONLY_DOUBLE: &str = "only a grant held at once with another is counted";
pub const EXACT_WHEN_ALL_HELD_AT_ONCE: &str =
    "grants whose leases all overlap count grants - 1 once the regions agree";
pub const SOME_EXACT_CASE: &str =
    "the regions agree on grants whose leases all overlap, none released";
pub const SOME_COUNTED: &str = "a double grant is counted";
pub const TWO_COUNTED: &str = "two double grants are counted";
