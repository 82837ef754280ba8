//! Idem's cross-region layer (DESIGN §3).
//!
//! - [`Geo::reserve`], [`Geo::complete`], [`Geo::release`], [`Geo::extend`]: the GLOBAL
//!   mode proposer. It sends each call to the key's group in every region at once (the
//!   local group directly, the others over [`link::RegionLink`]) and decides on the
//!   replies with `idem_core::proposer`. Each region's acceptance is committed through
//!   that region's Raft group before it counts.
//! - [`service::GeoService`]: what other regions call on this node.
//! - [`relay`]: ships every group's outbox to the other regions, where it is merged.
//! - [`anti_entropy`]: compares bucket digests with the other regions and pulls what
//!   differs, repairing a region whose outbox overflowed or that was rebuilt.
//!
//! This crate never touches RocksDB itself: records, outbox and digests come through
//! `idem-storage`'s engine API and every change goes through a group's Raft log.

pub mod anti_entropy;
pub mod link;
pub mod relay;
pub mod service;
pub mod wire;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use idem_core::acceptor::{CompleteError, ExtendError, ReleaseError, ReserveOutcome};
use idem_core::command::TouchItem;
use idem_core::engine::{
    self, Answer, Command, Engine, EngineConfig, ReserveCall, ReserveEngine, Rule,
};
use idem_core::holder::{HolderAnswer, HolderCall, HolderEngine, Refusal};
use idem_core::merge::Conflict;
use idem_core::shard::shard_of;
use idem_core::{CommandResult, Fence, Fingerprint, Key, Op, Phase};
use idem_raft::{Channels, Group, GroupError, GroupId, Router, Stamper};
use link::{LinkError, RegionLink};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use wire::Call;

/// How a namespace decides NEW.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// A majority of regions (the default).
    Global,
    /// The local region alone; replicated asynchronously; conflicts are counted.
    Regional,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Global => "global",
            Mode::Regional => "regional",
        }
    }
}

/// A namespace rule: keys of `tenant` (any when `None`) whose scope starts with
/// `scope_prefix` use `mode`. The first matching rule wins; no match is GLOBAL.
#[derive(Clone, Debug)]
pub struct NamespaceRule {
    pub tenant: Option<String>,
    pub scope_prefix: String,
    pub mode: Mode,
}

#[derive(Clone, Debug)]
pub struct RegionInfo {
    pub id: u16,
    pub name: String,
    /// gRPC addresses of the region's nodes, as this node reaches them.
    pub addrs: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct GeoConfig {
    pub my_region: u16,
    /// Every region, this one included.
    pub regions: Vec<RegionInfo>,
    pub shards: u32,
    pub namespaces: Vec<NamespaceRule>,
    /// How long one proposal round waits for the regions.
    pub round_timeout: Duration,
    /// StaleGen retries of one proposal.
    pub max_retries: u32,
    /// A GLOBAL Reserve is answered within this (contention retries included), well
    /// inside a client's deadline.
    pub reserve_deadline: Duration,
    pub max_in_flight_per_region: usize,
    /// Emulated round trip to every other region (`idem demo` only).
    pub emulated_rtt: Duration,
    /// The largest stored response (`limits.max_response_bytes`), for batch bounds.
    pub max_response_bytes: usize,
    pub relay: relay::RelayConfig,
    pub anti_entropy: anti_entropy::AntiEntropyConfig,
}

/// What the server counts about the cross-region layer.
pub trait Observer: Send + Sync + 'static {
    /// A merge met another region's different decision for a key.
    fn conflict(&self, mode: Mode, conflict: &Conflict);
    /// Anti-entropy repaired this many records from `from_region`.
    fn repaired(&self, from_region: u16, records: u64);
    /// What became of one region's copy of a withdraw.
    fn withdrawn(&self, region: u16, result: WithdrawResult);
}

/// What became of one region's copy of a withdraw (`idem_geo_withdraws_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WithdrawResult {
    /// The region applied it.
    Applied,
    /// Every resend failed within its time: the claim's lease (and the tombstones of
    /// the regions that applied it) end the key's hold.
    Failed,
    /// Too many withdraws were in flight on this node: not sent.
    Skipped,
}

impl WithdrawResult {
    pub fn as_str(self) -> &'static str {
        match self {
            WithdrawResult::Applied => "applied",
            WithdrawResult::Failed => "failed",
            WithdrawResult::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Error, Clone)]
pub enum GeoError {
    /// Too few regions answered: the outcome of a write may be unknown.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// The answer to a GLOBAL Reserve, as the server reports it.
#[derive(Clone, Debug)]
pub struct ReserveAnswer {
    pub outcome: ReserveOutcome,
    /// Which attempt this is, from the local region's record (0 when unknown).
    pub attempt: u32,
    pub since_previous_ms: Option<u64>,
}

pub struct ReserveRequest {
    pub fingerprint: Fingerprint,
    pub lease_ms: u64,
    pub retention_ms: u64,
    pub first_attempt_ms: u64,
}

struct Inner {
    cfg: GeoConfig,
    /// Index of each region in `cfg.regions` (its slot in a tally).
    index: BTreeMap<u16, usize>,
    links: BTreeMap<u16, Arc<RegionLink>>,
    router: Router,
    stamper: Arc<Stamper>,
    observer: Arc<dyn Observer>,
    deferred: Arc<tokio::sync::Semaphore>,
    /// Attempts answered from final local copies, per shard and key, not yet counted.
    touches: std::sync::Mutex<BTreeMap<u32, std::collections::HashMap<Key, TouchItem>>>,
    /// Final notices in flight (best effort: beyond the bound they are skipped;
    /// replication and anti-entropy make the completion final all the same).
    broadcasts: Arc<tokio::sync::Semaphore>,
    /// Withdraws in flight, apart from final notices so that those never crowd them
    /// out; beyond the bound a withdraw is skipped and counted.
    withdraws: Arc<tokio::sync::Semaphore>,
}

/// Times a failed call to one region is sent again within its round.
const CALL_RETRIES: u32 = 3;
/// The pause before the first resend (doubled for each next one: 15, 30, 60 ms).
const CALL_RETRY_PAUSE: Duration = Duration::from_millis(15);

/// Most final notices in flight on one node.
const MAX_BROADCASTS: usize = 4_096;
/// Most withdraws in flight on one node (each holds one key's op, under 1 KiB).
const MAX_WITHDRAWS: usize = 8_192;

/// Most keys with uncounted local replays per shard; beyond, attempts go uncounted.
const MAX_PENDING_TOUCHES: usize = 100_000;
/// How often local replays' attempts are written (one Raft entry per shard).
const TOUCH_FLUSH_EVERY: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct Geo {
    inner: Arc<Inner>,
}

/// How often every region link's clock offset is measured when no call measured it.
const CLOCK_PROBE_EVERY: Duration = Duration::from_secs(1);

/// Most merges waiting to be offered again on one node; beyond, anti-entropy repairs.
const MAX_DEFERRED: usize = 10_000;

impl Geo {
    pub fn new(
        cfg: GeoConfig,
        router: Router,
        stamper: Arc<Stamper>,
        channels: Channels,
        observer: Arc<dyn Observer>,
    ) -> Geo {
        let mut regions = cfg.regions.clone();
        regions.sort_by_key(|r| r.id);
        let index = regions.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
        let link = |r: &RegionInfo, emulated_rtt: Duration| {
            RegionLink::new(
                cfg.my_region,
                r.id,
                r.name.clone(),
                r.addrs.clone(),
                channels.clone(),
                cfg.max_in_flight_per_region,
                emulated_rtt,
                cfg.round_timeout,
                cfg.max_response_bytes,
                stamper.clone(),
            )
        };
        let links: BTreeMap<u16, Arc<RegionLink>> = regions
            .iter()
            .filter(|r| r.id != cfg.my_region)
            .map(|r| (r.id, link(r, cfg.emulated_rtt)))
            .collect();
        // The nodes of this node's own region are peers too: their clocks are measured by
        // the same probe (with no emulated round trip), so that a cluster of two regions,
        // or one whose other regions are all unreachable or off, still has a majority of
        // peers to confirm a clock by. (A node's answer to itself is not counted.)
        let own: Option<Arc<RegionLink>> = regions
            .iter()
            .find(|r| r.id == cfg.my_region && r.addrs.len() > 1)
            .map(|r| link(r, Duration::ZERO));
        let cfg = GeoConfig { regions, ..cfg };
        stamper.expect_peers(cfg.regions.len() > 1);
        // The probe task holds the own-region link; the others are held by `links`.
        let mut probes: Vec<std::sync::Weak<RegionLink>> =
            links.values().map(Arc::downgrade).collect();
        let own_probe = own.clone();
        if let Some(o) = &own {
            probes.push(Arc::downgrade(o));
        }
        let probe_timeout = cfg.round_timeout;
        tokio::spawn(async move {
            // Every link's clock, measured once a second even without traffic.
            let mut tick = tokio::time::interval(CLOCK_PROBE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let live: Vec<Arc<RegionLink>> =
                    probes.iter().filter_map(|w| w.upgrade()).collect();
                // Only the own-region link left: the Geo is gone.
                if live.len() <= usize::from(own_probe.is_some()) {
                    return;
                }
                futures::future::join_all(live.iter().map(|l| l.probe_clocks(probe_timeout))).await;
            }
        });
        Geo {
            inner: Arc::new(Inner {
                cfg,
                index,
                links,
                router,
                stamper,
                observer,
                deferred: Arc::new(tokio::sync::Semaphore::new(MAX_DEFERRED)),
                touches: Default::default(),
                broadcasts: Arc::new(tokio::sync::Semaphore::new(MAX_BROADCASTS)),
                withdraws: Arc::new(tokio::sync::Semaphore::new(MAX_WITHDRAWS)),
            }),
        }
    }

    pub fn config(&self) -> &GeoConfig {
        &self.inner.cfg
    }

    /// More than one region: calls in GLOBAL mode go to every region.
    pub fn is_multi_region(&self) -> bool {
        self.inner.cfg.regions.len() > 1
    }

    pub fn other_regions(&self) -> Vec<u16> {
        self.inner.links.keys().copied().collect()
    }

    pub(crate) fn link(&self, region: u16) -> Option<&RegionLink> {
        self.inner.links.get(&region).map(|l| l.as_ref())
    }

    /// A node whose clock its peers do not confirm neither proposes nor acknowledges:
    /// its lease ends would be measured on that clock.
    fn clock_gate(&self) -> Result<(), GeoError> {
        match self.inner.stamper.clock_fault() {
            Some(why) => Err(GeoError::Unavailable(why)),
            None => Ok(()),
        }
    }

    pub(crate) fn stamper(&self) -> &Arc<Stamper> {
        &self.inner.stamper
    }

    pub(crate) fn observer(&self) -> &Arc<dyn Observer> {
        &self.inner.observer
    }

    pub fn my_region(&self) -> u16 {
        self.inner.cfg.my_region
    }

    /// The mode of the namespace a key belongs to. One region: every decision is local.
    pub fn mode_of(&self, key: &Key) -> Mode {
        if !self.is_multi_region() {
            return Mode::Regional;
        }
        self.inner
            .cfg
            .namespaces
            .iter()
            .find(|r| {
                r.tenant.as_ref().is_none_or(|t| *t == key.tenant)
                    && key.scope.starts_with(&r.scope_prefix)
            })
            .map_or(Mode::Global, |r| r.mode)
    }

    pub(crate) fn local_group(&self, shard: u32) -> Option<Arc<Group>> {
        self.inner.router.get(GroupId {
            region: self.inner.cfg.my_region,
            shard,
        })
    }

    /// Run `op` on the key's group in region `region`.
    async fn call_region(
        &self,
        region: u16,
        shard: u32,
        key: Key,
        op: Op,
    ) -> Result<CommandResult, String> {
        if region == self.inner.cfg.my_region {
            let g = self
                .local_group(shard)
                .ok_or_else(|| format!("group of shard {shard} is not running here"))?;
            return g.submit(key, op).await.map_err(|e| e.to_string());
        }
        let link = self
            .inner
            .links
            .get(&region)
            .ok_or_else(|| format!("unknown region {region}"))?;
        let (hlc_now, _) = self.inner.stamper.mint();
        let answer = link
            .apply(idem_core::Hlc::compose(hlc_now, 0), Call { shard, key, op })
            .await
            .map_err(|e: LinkError| e.to_string())?;
        // An answer stamped by a clock beyond the bound is not counted.
        if let Err(e) = self.inner.stamper.observe(answer.hlc) {
            self.inner.stamper.note_refused(answer.node);
            return Err(format!("region {region}'s clock: {e}"));
        }
        answer.result.map_err(|e| e.to_string())
    }

    /// Send `op` to every region at once; the replies arrive as a stream of
    /// `(region index, result)`.
    fn fan_out(
        &self,
        shard: u32,
        key: &Key,
        op: &Op,
    ) -> FuturesUnordered<impl std::future::Future<Output = (usize, Result<CommandResult, String>)>>
    {
        self.calls(shard, key, op).into_iter().collect()
    }

    /// One call of `op` per region, each answering `(region index, result)`. A call
    /// that fails (a leader change, a refused connection, a region's clock refused) is
    /// sent again after a short pause, up to [`CALL_RETRIES`] times: every op a region is
    /// sent is idempotent for its claim or fence. Whoever waits bounds it in time (the
    /// round timer) and stops it by dropping the call.
    fn calls(
        &self,
        shard: u32,
        key: &Key,
        op: &Op,
    ) -> Vec<impl std::future::Future<Output = (usize, Result<CommandResult, String>)>> {
        self.inner
            .cfg
            .regions
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let me = self.clone();
                let (region, key, op) = (r.id, key.clone(), op.clone());
                async move {
                    let mut tries = 0;
                    loop {
                        match me.call_region(region, shard, key.clone(), op.clone()).await {
                            Err(e) if tries < CALL_RETRIES => {
                                tries += 1;
                                tracing::debug!(region, error = %e, tries, "call failed; sending it again");
                                tokio::time::sleep(CALL_RETRY_PAUSE * (1 << (tries - 1))).await;
                            }
                            res => return (i, res),
                        }
                    }
                }
            })
            .collect()
    }

    /// Send a withdraw to every region, each call sent again on failure (see
    /// [`Geo::calls`]) for up to two round timeouts; every region's result is counted.
    /// Called from `Drop` too, so it never waits.
    fn withdraw(&self, shard: u32, key: Key, op: Op) {
        let Ok(permit) = self.inner.withdraws.clone().try_acquire_owned() else {
            tracing::warn!(key = %key, "too many withdraws in flight; skipped");
            for r in &self.inner.cfg.regions {
                self.inner.observer.withdrawn(r.id, WithdrawResult::Skipped);
            }
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut replies = me.fan_out(shard, &key, &op);
            let mut pending: Vec<u16> = me.inner.cfg.regions.iter().map(|r| r.id).collect();
            let deadline = tokio::time::sleep(me.inner.cfg.round_timeout * 2);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    next = replies.next() => match next {
                        None => break,
                        Some((i, res)) => {
                            let region = me.inner.cfg.regions[i].id;
                            pending.retain(|r| *r != region);
                            let result = match res {
                                Ok(_) => WithdrawResult::Applied,
                                Err(e) => {
                                    tracing::debug!(region, error = %e, "a withdraw failed");
                                    WithdrawResult::Failed
                                }
                            };
                            me.inner.observer.withdrawn(region, result);
                        }
                    },
                    _ = &mut deadline => break,
                }
            }
            for region in pending {
                me.inner.observer.withdrawn(region, WithdrawResult::Failed);
            }
        });
    }

    /// Send `op` to every region and forget the answers (final notices).
    fn broadcast(&self, shard: u32, key: Key, op: Op) {
        let Ok(permit) = self.inner.broadcasts.clone().try_acquire_owned() else {
            tracing::debug!(key = %key, op = op.name(), "too many broadcasts in flight; skipped");
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut replies = me.fan_out(shard, &key, &op);
            let deadline = tokio::time::sleep(me.inner.cfg.round_timeout * 2);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    next = replies.next() => if next.is_none() { break },
                    _ = &mut deadline => break,
                }
            }
        });
    }

    /// REPLAY or MISMATCH from this node's copy of a key's record when it is a *final*
    /// completion (which never changes, so any replica's copy answers), in any mode;
    /// `None` otherwise. A replay's attempt is counted afterwards (`touch_later`).
    fn final_answer(
        &self,
        shard: u32,
        key: &Key,
        r: &idem_core::Record,
        now_ms: u64,
        req: &ReserveRequest,
    ) -> Option<ReserveAnswer> {
        if r.phase != Phase::Completed || !r.is_final {
            return None;
        }
        if r.fingerprint != req.fingerprint {
            return Some(ReserveAnswer {
                outcome: ReserveOutcome::Mismatch {
                    stored: r.fingerprint,
                },
                attempt: 1,
                since_previous_ms: None,
            });
        }
        let response = r.response.clone()?;
        self.touch_later(shard, key, req.fingerprint, req.first_attempt_ms);
        Some(ReserveAnswer {
            outcome: ReserveOutcome::Replay {
                fence: r.fence(),
                response,
            },
            attempt: r.attempts.saturating_add(1),
            since_previous_ms: (r.last_attempt_ms > 0)
                .then(|| now_ms.saturating_sub(r.last_attempt_ms)),
        })
    }

    /// The local fast path on its own: this node's final copy of the key, if any
    /// (for keys decided locally: one region, or a REGIONAL namespace).
    pub fn answer_locally(&self, key: &Key, req: &ReserveRequest) -> Option<ReserveAnswer> {
        let shard = shard_of(key, self.inner.cfg.shards);
        let group = self.local_group(shard)?;
        let rec = group.read_local(key).ok()??;
        self.final_answer(shard, key, &rec, self.inner.stamper.now_ms(), req)
    }

    /// The proposer engine's settings for this node.
    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            regions: self.inner.cfg.regions.len(),
            local: self.inner.index.get(&self.inner.cfg.my_region).copied(),
            round_timeout_ms: duration_ms(self.inner.cfg.round_timeout),
            max_stale_retries: self.inner.cfg.max_retries,
            max_contention_rounds: engine::MAX_CONTENTION_ROUNDS,
            // Deliberately broken build for the fault suite: NEW on the local accept
            // alone (the rule the model check rejects).
            // Deliberately broken build: a Complete acknowledged on its first store.
            rule: if cfg!(feature = "broken-local-accept") {
                Rule::BrokenLocalAccept
            } else if cfg!(feature = "broken-early-ack") {
                Rule::BrokenEarlyAck
            } else {
                Rule::Majority
            },
        }
    }

    /// A GLOBAL Reserve (DESIGN §3): answered from this node's final copy when it has
    /// one, else by the proposer engine (`idem_core::engine`), which this drives: its
    /// proposals go to every region, their replies and its timers go back to it, its
    /// withdraws are broadcast, until it answers (by `reserve_deadline` at the latest).
    pub async fn reserve(&self, key: Key, req: ReserveRequest) -> Result<ReserveAnswer, GeoError> {
        let shard = shard_of(&key, self.inner.cfg.shards);
        let local = self
            .local_group(shard)
            .ok_or_else(|| GeoError::Unavailable(format!("shard {shard} is not running here")))?;
        let now = self.inner.stamper.now_ms();
        let rec = local
            .read_local(&key)
            .map_err(|e| GeoError::Unavailable(e.to_string()))?;
        // Fast path: a final completion never changes, so this node's copy answers.
        if let Some(answer) = rec
            .as_ref()
            .and_then(|r| self.final_answer(shard, &key, r, now, &req))
        {
            return Ok(answer);
        }
        // Proposing measures the lease on this node's clock: not while it is in doubt.
        self.clock_gate()?;
        let (_, claim) = self.inner.stamper.mint();
        let call = ReserveCall {
            fingerprint: req.fingerprint,
            lease_ms: req.lease_ms,
            retention_ms: req.retention_ms,
            first_attempt_ms: req.first_attempt_ms,
            deadline_ms: now.saturating_add(duration_ms(self.inner.cfg.reserve_deadline)),
        };
        let mut run = EngineRun {
            geo: self,
            shard,
            key: &key,
            engine: ReserveEngine::new(self.engine_config(), call, claim, rand::random()),
        };
        let cmds = run
            .engine
            .start(now, engine::first_generation(rec.as_ref(), now));
        let answer = run.drive(cmds).await?;
        self.reserve_answer(answer)
    }

    /// The engine's answer as the server reports it.
    fn reserve_answer(&self, a: Answer) -> Result<ReserveAnswer, GeoError> {
        match a {
            Answer::Decided {
                outcome,
                attempt,
                since_previous_ms,
            } => Ok(ReserveAnswer {
                outcome,
                attempt,
                since_previous_ms,
            }),
            Answer::Unavailable {
                answered,
                regions,
                waited_ms,
            } => Err(GeoError::Unavailable(format!(
                "only {answered} of {regions} regions answered within {waited_ms} ms; a majority is needed"
            ))),
        }
    }

    fn unknown(&self, what: &str, answered: usize) -> GeoError {
        GeoError::Unavailable(format!(
            "{what} reached a majority of regions not yet ({answered} of {} answered); the outcome is unknown, retry with the same fence while the lease lasts",
            self.inner.cfg.regions.len()
        ))
    }

    /// Run a holder's call on the holder engine (`idem_core::holder`): sent to every
    /// region, judged there.
    async fn holder_call(&self, key: Key, call: HolderCall) -> Result<HolderAnswer, GeoError> {
        self.clock_gate()?;
        let shard = shard_of(&key, self.inner.cfg.shards);
        let mut run = EngineRun {
            geo: self,
            shard,
            key: &key,
            engine: HolderEngine::new(self.engine_config(), call),
        };
        let cmds = run.engine.start(self.inner.stamper.now_ms());
        run.drive(cmds).await
    }

    /// A GLOBAL Complete: acknowledged only once final (a majority stored it within the
    /// lease), after telling the regions it is final (see `idem_core::holder`).
    pub async fn complete(
        &self,
        key: Key,
        fence: Fence,
        response: idem_core::StoredResponse,
    ) -> Result<Result<(), CompleteError>, GeoError> {
        match self
            .holder_call(key, HolderCall::Complete { fence, response })
            .await?
        {
            HolderAnswer::Stored { .. } => Ok(Ok(())),
            HolderAnswer::Refused(Refusal::LeaseLost { current }) => {
                Ok(Err(CompleteError::LeaseLost { current }))
            }
            HolderAnswer::Refused(Refusal::NotFound) => Ok(Err(CompleteError::NotFound)),
            HolderAnswer::Refused(Refusal::AlreadyCompleted) => Err(GeoError::Internal(
                "the holder engine refused a Complete as already completed".into(),
            )),
            HolderAnswer::Unknown { answered, .. } => Err(self.unknown("the completion", answered)),
        }
    }

    /// A GLOBAL Release: acknowledged after a majority stored it.
    pub async fn release(
        &self,
        key: Key,
        fence: Fence,
    ) -> Result<Result<(), ReleaseError>, GeoError> {
        match self.holder_call(key, HolderCall::Release { fence }).await? {
            HolderAnswer::Stored { .. } => Ok(Ok(())),
            HolderAnswer::Refused(Refusal::LeaseLost { current }) => {
                Ok(Err(ReleaseError::LeaseLost { current }))
            }
            HolderAnswer::Refused(Refusal::AlreadyCompleted) => {
                Ok(Err(ReleaseError::AlreadyCompleted))
            }
            HolderAnswer::Refused(Refusal::NotFound) => Ok(Err(ReleaseError::NotFound)),
            HolderAnswer::Unknown { answered, .. } => Err(self.unknown("the release", answered)),
        }
    }

    /// A GLOBAL Extend: this node picks the new lease end, the same in every region;
    /// acknowledged after a majority stored it.
    pub async fn extend(
        &self,
        key: Key,
        fence: Fence,
        lease_ms: u64,
    ) -> Result<Result<u64, ExtendError>, GeoError> {
        let until_ms = self.inner.stamper.now_ms().saturating_add(lease_ms);
        let call = HolderCall::Extend {
            fence,
            lease_ms,
            until_ms,
        };
        match self.holder_call(key, call).await? {
            HolderAnswer::Stored { lease_expires_ms } => {
                Ok(Ok(lease_expires_ms.unwrap_or(until_ms)))
            }
            HolderAnswer::Refused(Refusal::LeaseLost { current }) => {
                Ok(Err(ExtendError::LeaseLost { current }))
            }
            HolderAnswer::Refused(Refusal::NotFound) => Ok(Err(ExtendError::NotFound)),
            HolderAnswer::Refused(Refusal::AlreadyCompleted) => Err(GeoError::Internal(
                "the holder engine refused an Extend as already completed".into(),
            )),
            HolderAnswer::Unknown { answered, .. } => Err(self.unknown("the extension", answered)),
        }
    }

    /// Age of the oldest unshipped change per destination region, over this node's
    /// groups, and the dead-letter depth per destination.
    /// Per other region: how long since one of its nodes last answered this node.
    pub fn region_health(&self) -> BTreeMap<u16, Duration> {
        self.inner
            .links
            .iter()
            .map(|(r, l)| (*r, l.since_last_answer()))
            .collect()
    }

    pub fn replication_backlog(&self) -> BTreeMap<u16, relay::Backlog> {
        relay::backlog(self)
    }

    /// Count one more attempt on a key answered from this node's final copy without a
    /// Raft round. Attempts are gathered per key and written every
    /// `TOUCH_FLUSH_EVERY`, one Raft entry per shard, so local replays cost no Raft
    /// round each.
    pub fn touch_later(
        &self,
        shard: u32,
        key: &Key,
        fingerprint: Fingerprint,
        first_attempt_ms: u64,
    ) {
        let now = self.inner.stamper.now_ms();
        let mut all = self.inner.touches.lock().unwrap_or_else(|p| p.into_inner());
        let per = all.entry(shard).or_default();
        if per.len() >= MAX_PENDING_TOUCHES && !per.contains_key(key) {
            return;
        }
        let t = per.entry(key.clone()).or_insert_with(|| TouchItem {
            key: key.clone(),
            fingerprint,
            first_attempt_ms,
            at_ms: now,
            count: 0,
        });
        t.count = t.count.saturating_add(1);
        t.at_ms = t.at_ms.max(now);
        if first_attempt_ms != 0
            && (t.first_attempt_ms == 0 || first_attempt_ms < t.first_attempt_ms)
        {
            t.first_attempt_ms = first_attempt_ms;
        }
    }

    /// Write the gathered attempts, one entry per shard; awaited by the flusher, so at
    /// most one flush is in flight (meanwhile attempts gather in the bounded map).
    async fn flush_touches(&self) {
        let all = {
            let mut pending = self.inner.touches.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *pending)
        };
        for (shard, items) in all {
            let Some(group) = self.local_group(shard) else {
                continue;
            };
            let items: Vec<TouchItem> = items.into_values().collect();
            if let Err(e) = group.submit(Key::default(), Op::Touch { items }).await {
                tracing::debug!(shard, error = %e, "attempt counts of local replays not stored");
            }
        }
    }

    /// Start the background tasks (attempt counting; with several regions, the relay
    /// and anti-entropy); they stop when `stop` turns true.
    pub fn start_background(
        &self,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let me = self.clone();
        let mut rx = stop.clone();
        let mut tasks = vec![tokio::spawn(async move {
            let mut tick = tokio::time::interval(TOUCH_FLUSH_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = rx.wait_for(|s| *s) => return,
                }
                me.flush_touches().await;
            }
        })];
        if self.is_multi_region() {
            tasks.extend(relay::start(self, stop.clone()));
            tasks.extend(anti_entropy::start(self, stop));
        }
        tasks
    }

    /// Permit for one deferred merge (none left: drop it, anti-entropy repairs).
    pub(crate) fn deferred_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner.deferred.clone().try_acquire_owned().ok()
    }
}

/// Errors from a local group, as a region's reply.
pub fn group_unavailable(e: &GroupError) -> bool {
    !matches!(e, GroupError::Fatal(_))
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One call's engine (a Reserve's or a holder's) and what its commands need.
struct EngineRun<'a, E: Engine> {
    geo: &'a Geo,
    shard: u32,
    key: &'a Key,
    engine: E,
}

/// A region's reply to a round: `(round, region slot, result)`.
type ReplyFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (u32, usize, Result<CommandResult, String>)> + Send>,
>;

impl<E: Engine> EngineRun<'_, E> {
    /// Perform the engine's commands and feed it replies and timers until it answers.
    async fn drive(&mut self, mut cmds: Vec<Command<E::Answer>>) -> Result<E::Answer, GeoError> {
        let geo = self.geo;
        let mut replies: FuturesUnordered<ReplyFuture> = FuturesUnordered::new();
        let mut timer: Option<(u32, u64)> = None;
        loop {
            for c in std::mem::take(&mut cmds) {
                match c {
                    Command::Send { round, op } => {
                        // Every proposal fixes a lease on this node's clock: not once
                        // its peers stopped confirming it (a contended Reserve runs for
                        // seconds). (Returning drops the run, which abandons the engine.)
                        if matches!(op, Op::Propose { .. }) {
                            geo.clock_gate()?;
                        }
                        // The earlier round's calls are no longer waited for.
                        replies = geo
                            .calls(self.shard, self.key, &op)
                            .into_iter()
                            .map(|f| {
                                Box::pin(f.map(move |(i, res)| (round, i, res))) as ReplyFuture
                            })
                            .collect();
                    }
                    Command::Withdraw { op } => {
                        // The proposal is over: none of its calls may be sent again
                        // after its withdraw.
                        replies = FuturesUnordered::new();
                        geo.withdraw(self.shard, self.key.clone(), op)
                    }
                    Command::Notify { op } => geo.broadcast(self.shard, self.key.clone(), op),
                    Command::Timer { token, at_ms } => timer = Some((token, at_ms)),
                    Command::Answer(a) => return Ok(a),
                }
            }
            let Some((token, at_ms)) = timer else {
                return Err(GeoError::Internal(
                    "an engine set no timer while it had not answered".into(),
                ));
            };
            let wait = at_ms.saturating_sub(geo.inner.stamper.now_ms());
            tokio::select! {
                Some((round, i, res)) = replies.next(), if !replies.is_empty() => {
                    let now = geo.inner.stamper.now_ms();
                    let res = res
                        .inspect_err(|e| tracing::debug!(region = i, error = %e, "a region's call failed"))
                        .ok();
                    cmds = self.engine.on_result(round, i, res.as_ref(), now);
                }
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {
                    timer = None;
                    cmds = self.engine.on_timer(token, geo.inner.stamper.now_ms());
                }
            }
        }
    }
}

impl<E: Engine> Drop for EngineRun<'_, E> {
    /// A caller that gives up (its deadline passed, its connection closed) drops the
    /// call midway: what the engine still has to send is sent all the same (a
    /// proposal's withdraw, a final completion's notice).
    fn drop(&mut self) {
        for c in self.engine.abandon() {
            match c {
                Command::Withdraw { op } => self.geo.withdraw(self.shard, self.key.clone(), op),
                Command::Notify { op } => self.geo.broadcast(self.shard, self.key.clone(), op),
                _ => {}
            }
        }
    }
}
