//! One Raft group on this node: start it, submit commands (stamped by the leader,
//! forwarded there from followers), read records linearizably, report its health.

use crate::forward::Forwarder;
use crate::log_store::LogStore;
use crate::network::{Channels, NetworkFactory};
use crate::router::GroupId;
use crate::state_machine::StateMachine;
use crate::types::{Peer, TypeConfig};
use idem_core::{ClaimId, Command, CommandResult, Hlc, Key, Op, Record};
use idem_storage::{LogEngine, StateEngine};
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, Config, Raft, ReadPolicy, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// How many times a command follows a leader change before giving up.
const MAX_FORWARD_TRIES: usize = 4;

#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries.
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind a snapshot (for slow followers).
    pub logs_kept_after_snapshot: u64,
    /// How long a write or linearizable read may wait for the group.
    pub request_timeout: Duration,
    /// The largest stored response (`limits.max_response_bytes`): what a forwarded
    /// request's answer may bring back, counted in batch byte bounds.
    pub max_response_bytes: usize,
    /// Whether this node may stand for election (a rejoining node may not until its
    /// log caught up: `Group::allow_elections`).
    pub elect: bool,
    /// Whether an uninitialized group initializes itself with the configured members
    /// (a new cluster), or waits for the leader to replicate them (a rejoining node).
    pub initialize: bool,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1_000,
            snapshot_every_entries: 20_000,
            logs_kept_after_snapshot: 5_000,
            request_timeout: Duration::from_secs(5),
            max_response_bytes: idem_core::Limits::default().max_response_bytes,
            elect: true,
            initialize: true,
        }
    }
}

/// A log id as a plain position, ordered as openraft orders log ids: by the leader that
/// proposed the entry (its term, then its node), then by index. (0, 0, 0): no entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogPosition {
    pub term: u64,
    pub node: u64,
    pub index: u64,
}

impl LogPosition {
    pub(crate) fn of(id: Option<&crate::types::LogId>) -> LogPosition {
        id.map_or(LogPosition::default(), |id| LogPosition {
            term: id.leader_id.term,
            node: id.leader_id.node_id,
            index: id.index,
        })
    }
}

/// Who this node is, for stamping claims.
#[derive(Clone, Copy, Debug)]
pub struct NodeIdentity {
    pub node_id: u64,
    pub region: u16,
}

/// The time a leader stamps on each command, by which every acceptor judges leases.
///
/// It follows the wall clock, except that it never moves away from the monotonic
/// clock by more than `max_step_ms` between two readings: a jump of the wall clock
/// larger than that, forward or back, is not followed (the stamp keeps advancing at the
/// monotonic rate from the last accepted reading), and it never goes backwards. Peers' timestamps
/// never move it: a node with a fast clock cannot make others end leases early.
struct StampClock {
    anchor_wall_ms: u64,
    anchor_mono: Instant,
    last_ms: u64,
    max_step_ms: u64,
}

impl StampClock {
    fn read(&mut self, wall_ms: u64, mono: Instant) -> u64 {
        let elapsed = mono.saturating_duration_since(self.anchor_mono).as_millis() as u64;
        let projected = self.anchor_wall_ms.saturating_add(elapsed);
        // A step of the wall clock beyond the bound, either way, is not followed: the
        // stamp keeps the monotonic rate from the last reading within the bound.
        let t = if wall_ms <= projected.saturating_add(self.max_step_ms)
            && wall_ms.saturating_add(self.max_step_ms) >= projected
        {
            self.anchor_wall_ms = wall_ms;
            self.anchor_mono = mono;
            wall_ms
        } else {
            projected
        };
        self.last_ms = self.last_ms.max(t);
        self.last_ms
    }

    /// Follow the wall clock from now on, whatever the jump (peers confirmed it). Never
    /// backwards: after a backward correction the stamp waits for the wall clock.
    fn reanchor(&mut self, wall_ms: u64, mono: Instant) {
        self.anchor_wall_ms = wall_ms;
        self.anchor_mono = mono;
    }

    /// How far the stamp is ahead of the time it follows (after a backward correction,
    /// it waits for that time to catch up): while beyond the bound, the node must not
    /// stamp. A wall-clock jump that was not followed leaves the followed time where the
    /// stamp is, so it does not count here.
    fn ahead_of_followed_ms(&self, mono: Instant) -> u64 {
        let elapsed = mono.saturating_duration_since(self.anchor_mono).as_millis() as u64;
        self.last_ms
            .saturating_sub(self.anchor_wall_ms.saturating_add(elapsed))
    }
}

/// The leader's stamp on each command: the lease-judging time of a [`StampClock`],
/// the skew margin, and a fresh claim id ordered by the node's hybrid logical clock.
pub struct Stamper {
    identity: NodeIdentity,
    skew_margin_ms: u64,
    hlc: Mutex<Hlc>,
    clock: Mutex<StampClock>,
    health: Mutex<crate::clock_health::ClockHealth>,
    bound_ms: u64,
    /// Test-only offset added to the wall clock, to emulate a skewed node.
    clock_offset_ms: std::sync::atomic::AtomicI64,
}

impl Stamper {
    /// `max_clock_ahead_ms`: the bound on clock differences; a peer timestamp further
    /// ahead is refused, and a forward jump of the wall clock larger than it is not
    /// followed by the stamp clock.
    pub fn new(identity: NodeIdentity, skew_margin_ms: u64, max_clock_ahead_ms: u64) -> Stamper {
        let s = Stamper {
            identity,
            skew_margin_ms,
            hlc: Mutex::new(Hlc::new(max_clock_ahead_ms)),
            clock: Mutex::new(StampClock {
                anchor_wall_ms: 0,
                anchor_mono: Instant::now(),
                last_ms: 0,
                max_step_ms: max_clock_ahead_ms,
            }),
            health: Mutex::new(crate::clock_health::ClockHealth::new(max_clock_ahead_ms)),
            bound_ms: max_clock_ahead_ms,
            clock_offset_ms: std::sync::atomic::AtomicI64::new(0),
        };
        {
            let mut c = s.clock.lock().unwrap_or_else(|p| p.into_inner());
            c.anchor_wall_ms = s.wall_ms();
            c.anchor_mono = Instant::now();
        }
        s
    }

    pub fn identity(&self) -> NodeIdentity {
        self.identity
    }

    pub fn skew_margin_ms(&self) -> u64 {
        self.skew_margin_ms
    }

    /// The bound on clock differences (`cluster.max_clock_ahead_ms`).
    pub fn clock_bound_ms(&self) -> u64 {
        self.bound_ms
    }

    pub fn set_clock_offset_ms(&self, offset: i64) {
        self.clock_offset_ms
            .store(offset, std::sync::atomic::Ordering::Relaxed);
    }

    /// Wall-clock milliseconds (with the test offset, if any).
    pub fn wall_ms(&self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let off = self
            .clock_offset_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        (wall + off).max(0) as u64
    }

    /// The lease-judging time: what commands are stamped with, and what a proposer
    /// measures lease ends from.
    pub fn now_ms(&self) -> u64 {
        let wall = self.wall_ms();
        self.clock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(wall, Instant::now())
    }

    /// Anchor the stamp clock on the wall clock as it reads now (as at start-up).
    #[cfg(test)]
    fn anchor_now(&self) {
        let wall = self.wall_ms();
        let mut c = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        c.anchor_wall_ms = wall;
        c.anchor_mono = Instant::now();
        c.last_ms = wall;
    }

    /// Whether this node has peers in other regions whose clocks it must agree with
    /// before it stamps (set by the geo layer when there are other regions).
    pub fn expect_peers(&self, yes: bool) {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expect_peers(yes);
    }

    /// One exchange with peer node `peer`: its stamp clock read `peer_ms`, between our
    /// readings `sent_ms` and `received_ms`. When a majority of peers see this clock
    /// beyond the bound and the wall clock now agrees with them, the stamp clock
    /// follows the wall clock again (and must be confirmed afresh).
    pub fn record_peer_clock(&self, peer: u64, peer_ms: u64, sent_ms: u64, received_ms: u64) {
        if peer == self.identity.node_id {
            return; // A node never confirms its own clock.
        }
        let now = Instant::now();
        let mid = (sent_ms as i64 + received_ms as i64) / 2;
        let clock = crate::clock_health::PeerClock {
            offset_ms: peer_ms as i64 - mid,
            rtt_ms: received_ms.saturating_sub(sent_ms),
            at: now,
        };
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.record(peer, clock);
        if let Some(median) = h.majority_beyond(now) {
            let wall = self.wall_ms() as i64;
            let peers_now = self.now_ms() as i64 + median;
            if (wall - peers_now).unsigned_abs() <= self.bound_ms / 2 + h.precision_ms(now) {
                tracing::warn!(
                    offset_ms = median,
                    "the wall clock agrees with the peers again; the stamp clock follows it"
                );
                self.clock
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .reanchor(wall.max(0) as u64, now);
                h.reset();
            }
        }
    }

    /// A timestamp from peer node `peer` was refused.
    pub fn note_refused(&self, peer: u64) {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused(peer);
    }

    /// How far the stamp clock runs ahead of the corrected wall clock (it waits after
    /// the wall clock jumped back).
    fn stamp_ahead_ms(&self) -> u64 {
        let wall = self.wall_ms();
        let mut c = self.clock.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        c.read(wall, now);
        c.ahead_of_followed_ms(now)
    }

    /// Why this node must not grant, accept or acknowledge now (`None`: it may).
    pub fn clock_fault(&self) -> Option<String> {
        let ahead = self.stamp_ahead_ms();
        if ahead > self.bound_ms {
            return Some(format!(
                "the stamp clock is {ahead} ms ahead of the corrected wall clock; waiting for it"
            ));
        }
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fault(Instant::now())
    }

    /// Whether this node's clock is known to be off (a majority of its peers measure it
    /// beyond the bound, or the stamp clock waits for a wall clock that jumped back): it
    /// should hand its leaderships to nodes that can serve. (A clock not yet confirmed,
    /// at start, is not known to be off: that node may lead, as reads and merges need a
    /// leader, while it grants nothing.)
    pub fn clock_known_off(&self) -> bool {
        self.stamp_ahead_ms() > self.bound_ms
            || self
                .health
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .majority_beyond(Instant::now())
                .is_some()
    }

    /// Each measured peer node's clock offset from ours, in milliseconds.
    pub fn peer_offsets(&self) -> Vec<(u64, i64)> {
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.peers().iter().map(|(p, c)| (*p, c.offset_ms)).collect()
    }

    /// The peer nodes whose clocks agree with the majority of this node's peers.
    pub fn peers_with_the_majority(&self) -> Vec<u64> {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .with_the_majority(Instant::now())
    }

    /// Timestamps refused, per peer node.
    pub fn clock_refusals(&self) -> Vec<(u64, u64)> {
        let h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        h.refusals().iter().map(|(p, n)| (*p, *n)).collect()
    }

    /// A fresh claim id (ordered by the hybrid logical clock) and its HLC time.
    pub fn mint(&self) -> (u64, ClaimId) {
        let ts = self
            .hlc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .now(self.now_ms());
        (
            Hlc::physical_ms(ts),
            ClaimId {
                hlc: ts,
                region: self.identity.region,
                node: self.identity.node_id as u16,
                nonce: rand::random(),
            },
        )
    }

    /// Advance the hybrid clock past a timestamp seen from another node (refused, not
    /// adopted, when it is further ahead than the configured bound). It orders claims
    /// only: the lease-judging time never follows a peer.
    pub fn observe(&self, remote_hlc: u64) -> Result<(), idem_core::HlcError> {
        let wall = self.now_ms();
        self.hlc
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(remote_hlc, wall)
    }

    pub fn stamp(&self, key: Key, op: Op) -> Command {
        let (_, claim) = self.mint();
        Command {
            now_ms: self.now_ms(),
            skew_margin_ms: self.skew_margin_ms,
            claim,
            region_bit: 1u32 << (self.identity.region % 32),
            key,
            op,
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupError {
    #[error("no leader is known for group {0}; an election is probably in progress")]
    NoLeader(String),
    #[error("this node is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("the group did not answer within {0:?}; the outcome is unknown")]
    Timeout(Duration),
    #[error("the group is unavailable: {0}")]
    Unavailable(String),
    #[error("fatal group error: {0}")]
    Fatal(String),
}

/// A command or read sent to the leader by a follower.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Forwarded {
    Write { key: Key, op: Op },
    Read { key: Key },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardedReply {
    Write(CommandResult),
    Read(Option<Record>),
}

/// What an operator or a dashboard needs to know about a group.
#[derive(Clone, Debug, Default)]
pub struct GroupHealth {
    pub state: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub committed_index: u64,
    pub voters: Vec<u64>,
}

pub struct Group {
    id: GroupId,
    node_id: u64,
    raft: Raft<TypeConfig, StateMachine>,
    engine: StateEngine,
    log: LogEngine,
    stamper: Arc<Stamper>,
    forwarder: Forwarder,
    timeout: Duration,
    _clock_guard: AbortOnDrop,
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// While this node's clock is known to be off it neither keeps nor seeks leadership of
/// the group: a leader that stamps nothing leaves its group unable to write, so it hands
/// leadership to the voter, among those whose clocks agree with the majority of its
/// peers, that holds most of the log; its election timer stays off until the clock is
/// back (the other voters elect among themselves). When no other voter's clock agrees
/// with the majority, it keeps the leadership it has (granting nothing) rather than pass
/// it round among voters that could not use it either.
async fn clock_guard(
    raft: Raft<TypeConfig, StateMachine>,
    stamper: Arc<Stamper>,
    group: GroupId,
    pause: Duration,
) {
    let me = stamper.identity().node_id;
    let mut off = false;
    let mut handed_over: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let known_off = stamper.clock_known_off();
        if known_off != off {
            off = known_off;
            raft.runtime_config().elect(!off);
            if off {
                tracing::warn!(group = %group, "clock known off: this node stops campaigning and hands over its leadership");
            } else {
                tracing::info!(group = %group, "clock back within the bound: this node campaigns again");
            }
        }
        // Read under the metrics borrow (no copy of the metrics; nothing awaited in it).
        let to = {
            let metrics = raft.metrics();
            let m = metrics.borrow_watched();
            if m.state == ServerState::Shutdown {
                return;
            }
            if !off
                || m.current_leader != Some(me)
                || handed_over.is_some_and(|t| t.elapsed() < pause)
            {
                continue;
            }
            let sound = stamper.peers_with_the_majority();
            let voters: Vec<u64> = m.membership_config.voter_ids().collect();
            m.replication.as_ref().and_then(|r| {
                r.iter()
                    .filter(|(id, _)| **id != me && voters.contains(id) && sound.contains(id))
                    .max_by_key(|(_, matched)| matched.as_ref().map(|l| l.index))
                    .map(|(id, _)| *id)
            })
        };
        if let Some(to) = to {
            tracing::warn!(group = %group, to, "clock known off: handing leadership over");
            if let Err(e) = raft.trigger().transfer_leader(to).await {
                tracing::warn!(group = %group, error = %e, "leadership hand-over failed");
            }
            handed_over = Some(std::time::Instant::now());
        }
    }
}

impl Group {
    /// Start the group on this node, and initialize it with `peers` if it never was.
    pub async fn start(
        id: GroupId,
        stamper: Arc<Stamper>,
        peers: &[Peer],
        log: LogEngine,
        state: StateEngine,
        channels: Channels,
        cfg: &GroupConfig,
    ) -> Result<Group, GroupError> {
        let node_id = stamper.identity().node_id;
        let config = Config {
            cluster_name: format!("idem-{id}"),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_min_ms,
            election_timeout_max: cfg.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every_entries),
            max_in_snapshot_log_to_keep: cfg.logs_kept_after_snapshot,
            purge_batch_size: 256,
            enable_pre_vote: Some(true),
            enable_elect: cfg.elect,
            ..Default::default()
        }
        .validate()
        .map_err(|e| GroupError::Fatal(format!("raft config: {e}")))?;
        let sm = StateMachine::open(state.clone(), id.shard)
            .map_err(|e| GroupError::Fatal(format!("open state machine: {e}")))?;
        let network = NetworkFactory {
            group: id,
            channels: channels.clone(),
        };
        let raft = Raft::new(
            node_id,
            Arc::new(config),
            network,
            LogStore::new(log.clone(), id.shard),
            sm,
        )
        .await
        .map_err(|e| GroupError::Fatal(e.to_string()))?;
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| GroupError::Fatal(e.to_string()))?;
        if !initialized && cfg.initialize {
            let members: BTreeMap<u64, BasicNode> = peers
                .iter()
                .map(|p| (p.id, BasicNode::new(p.addr.clone())))
                .collect();
            // Every member initializes with the same membership; all but the first
            // attempt are refused harmlessly.
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(group = %id, error = %e, "initialize refused");
            }
        }
        let guard = AbortOnDrop(tokio::spawn(clock_guard(
            raft.clone(),
            stamper.clone(),
            id,
            Duration::from_millis(cfg.election_timeout_max_ms),
        )));
        Ok(Group {
            id,
            node_id,
            raft,
            engine: state,
            log,
            _clock_guard: guard,
            stamper,
            forwarder: Forwarder::start(id, channels, cfg.request_timeout, cfg.max_response_bytes),
            timeout: cfg.request_timeout,
        })
    }

    pub fn id(&self) -> GroupId {
        self.id
    }

    pub fn stamper(&self) -> &Arc<Stamper> {
        &self.stamper
    }

    pub(crate) fn raft(&self) -> &Raft<TypeConfig, StateMachine> {
        &self.raft
    }

    pub(crate) fn engine(&self) -> &StateEngine {
        &self.engine
    }

    /// The node's state engine (outbox, digests) for the replication layer.
    pub fn state(&self) -> &StateEngine {
        &self.engine
    }

    /// This node's copy of a key's record, without asking the leader (it may be a
    /// little behind). Expired records read as absent.
    pub fn read_local(&self, key: &Key) -> Result<Option<Record>, GroupError> {
        let now = self.stamper.now_ms();
        self.engine
            .get_record(self.id.shard, key)
            .map(|r| r.filter(|r| !r.is_expired(now)))
            .map_err(|e| GroupError::Fatal(e.to_string()))
    }

    /// Whether this node leads the group right now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().current_leader == Some(self.node_id)
    }

    fn leader_addr(&self, leader: u64) -> Option<String> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        let addr = m
            .membership_config
            .nodes()
            .find(|(id, _)| **id == leader)
            .map(|(_, n)| n.addr.clone());
        addr
    }

    async fn current_leader_or_wait(&self) -> Result<u64, GroupError> {
        if let Some(l) = self.raft.current_leader().await {
            return Ok(l);
        }
        // An election is usually a few hundred ms: wait for one before giving up.
        let waited = self
            .raft
            .wait(Some(self.timeout.min(Duration::from_secs(2))))
            .metrics(|m| m.current_leader.is_some(), "leader known")
            .await;
        match waited {
            Ok(m) => m
                .current_leader
                .ok_or_else(|| GroupError::NoLeader(self.id.to_string())),
            Err(_) => Err(GroupError::NoLeader(self.id.to_string())),
        }
    }

    /// Run a command through the group, on whichever node leads it.
    pub async fn submit(&self, key: Key, op: Op) -> Result<CommandResult, GroupError> {
        match self.route(Forwarded::Write { key, op }).await? {
            ForwardedReply::Write(r) => Ok(r),
            ForwardedReply::Read(_) => Err(GroupError::Fatal("read reply to a write".into())),
        }
    }

    /// Read a key's record as of now, linearizably (expired records read as absent).
    pub async fn read(&self, key: Key) -> Result<Option<Record>, GroupError> {
        match self.route(Forwarded::Read { key }).await? {
            ForwardedReply::Read(r) => Ok(r),
            ForwardedReply::Write(_) => Err(GroupError::Fatal("write reply to a read".into())),
        }
    }

    async fn route(&self, req: Forwarded) -> Result<ForwardedReply, GroupError> {
        let mut last = GroupError::NoLeader(self.id.to_string());
        for attempt in 0..MAX_FORWARD_TRIES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 * attempt as u64)).await;
            }
            let leader = self.current_leader_or_wait().await?;
            let result = if leader == self.node_id {
                self.handle_local(req.clone()).await
            } else {
                self.forward(leader, req.clone()).await
            };
            match result {
                Err(e @ GroupError::NotLeader { .. }) | Err(e @ GroupError::NoLeader(_)) => {
                    last = e
                }
                other => return other,
            }
        }
        Err(last)
    }

    async fn forward(&self, leader: u64, req: Forwarded) -> Result<ForwardedReply, GroupError> {
        let addr = self
            .leader_addr(leader)
            .ok_or_else(|| GroupError::NoLeader(self.id.to_string()))?;
        self.forwarder.call(leader, addr, req).await
    }

    /// Serve a write or read on this node, which must be the leader.
    pub(crate) async fn handle_local(&self, req: Forwarded) -> Result<ForwardedReply, GroupError> {
        match req {
            Forwarded::Write { key, op } => {
                // A leader whose clock its peers do not confirm stamps nothing: every
                // acceptor decision of the group is judged by that stamp.
                if let Some(why) = self.stamper.clock_fault() {
                    return Err(GroupError::Unavailable(why));
                }
                let cmd = self.stamper.stamp(key, op);
                let fut = self.raft.client_write(cmd);
                match tokio::time::timeout(self.timeout, fut).await {
                    Err(_) => Err(GroupError::Timeout(self.timeout)),
                    Ok(Ok(resp)) => Ok(ForwardedReply::Write(resp.data)),
                    Ok(Err(e)) => Err(match e.forward_to_leader() {
                        Some(f) => GroupError::NotLeader {
                            leader: f.leader_id,
                        },
                        None => GroupError::Unavailable(e.to_string()),
                    }),
                }
            }
            Forwarded::Read { key } => {
                let fut = self.raft.ensure_linearizable(ReadPolicy::ReadIndex);
                match tokio::time::timeout(self.timeout, fut).await {
                    Err(_) => return Err(GroupError::Timeout(self.timeout)),
                    Ok(Err(e)) => {
                        return Err(match e.forward_to_leader() {
                            Some(f) => GroupError::NotLeader {
                                leader: f.leader_id,
                            },
                            None => GroupError::Unavailable(e.to_string()),
                        })
                    }
                    Ok(Ok(_)) => {}
                }
                let now = self.stamper.now_ms();
                let rec = self
                    .engine
                    .get_record(self.id.shard, &key)
                    .map_err(|e| GroupError::Fatal(e.to_string()))?;
                Ok(ForwardedReply::Read(rec.filter(|r| !r.is_expired(now))))
            }
        }
    }

    pub fn health(&self) -> GroupHealth {
        let m = self.raft.metrics().borrow_watched().clone();
        GroupHealth {
            state: match m.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .to_string(),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
            committed_index: m.local_committed.as_ref().map_or(0, |l| l.index),
            voters: m.membership_config.voter_ids().collect(),
        }
    }

    /// The id of the last entry in this node's log (or of the last purged one), as a
    /// position comparable with a vote request's.
    pub fn last_log_position(&self) -> Result<LogPosition, GroupError> {
        let fatal = |e: std::io::Error| GroupError::Fatal(e.to_string());
        if let Some((_, bytes)) = self
            .log
            .last_entry(self.id.shard)
            .map_err(|e| GroupError::Fatal(e.to_string()))?
        {
            let e: crate::types::Entry = crate::codec::decode(&bytes).map_err(fatal)?;
            return Ok(LogPosition::of(Some(&e.log_id)));
        }
        let purged = self
            .log
            .get_state(self.id.shard, idem_storage::PURGED)
            .map_err(|e| GroupError::Fatal(e.to_string()))?;
        match purged {
            Some(b) => {
                let id: Option<crate::types::LogId> = crate::codec::decode(&b).map_err(fatal)?;
                Ok(LogPosition::of(id.as_ref()))
            }
            None => Ok(LogPosition::default()),
        }
    }

    /// A peer lost its log and rejoins under its id: if this node leads, let that peer's
    /// log go back once and replicate to it from the start (openraft keeps a follower's
    /// matched index from ever going back, as Raft assumes a follower never loses what it
    /// acknowledged). Whether this node led.
    pub async fn allow_revert(&self, peer: u64) -> bool {
        if !self.is_leader() {
            return false;
        }
        match self.raft.trigger().allow_next_revert(&peer, true).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(group = %self.id, peer, error = %e, "cannot reset replication to a rejoining node");
                false
            }
            Err(e) => {
                tracing::warn!(group = %self.id, peer, error = %e, "cannot reset replication to a rejoining node");
                false
            }
        }
    }

    /// Let this node stand for election again (a rejoining node whose log caught up).
    pub fn allow_elections(&self) {
        self.raft.runtime_config().elect(true);
    }

    /// Wait until this group has a leader (for start-up and tests).
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64, GroupError> {
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "leader")
            .await
            .ok()
            .and_then(|m| m.current_leader)
            .ok_or_else(|| GroupError::NoLeader(self.id.to_string()))
    }

    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    fn stamper() -> Stamper {
        Stamper::new(
            NodeIdentity {
                node_id: 1,
                region: 0,
            },
            500,
            250,
        )
    }

    fn real_wall_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    #[test]
    fn a_peer_running_fast_does_not_move_the_stamped_time() {
        let s = stamper();
        // A peer 200 ms ahead (within the bound): adopted by the hybrid clock...
        let ahead = Hlc::compose(real_wall_ms() + 200, 0);
        s.observe(ahead).unwrap();
        let (_, claim) = s.mint();
        assert!(
            claim.hlc > ahead,
            "claims stay ordered after what was observed"
        );
        // ...but the time leases are judged by stays this node's own.
        let cmd = s.stamp(
            Key::default(),
            Op::Withdraw {
                claim,
                generation: 0,
                fingerprint: Default::default(),
                retention_ms: 0,
            },
        );
        assert!(
            cmd.now_ms <= real_wall_ms() + 20,
            "stamped {} ms ahead",
            cmd.now_ms - real_wall_ms()
        );
        // Further ahead than the bound: refused.
        assert!(s.observe(Hlc::compose(real_wall_ms() + 2_000, 0)).is_err());
    }

    #[test]
    fn a_forward_jump_of_the_own_wall_clock_is_not_followed() {
        let s = stamper();
        let before = s.now_ms();
        s.set_clock_offset_ms(2_000);
        let after = s.now_ms();
        assert!(after >= before, "never backwards");
        assert!(
            after <= real_wall_ms() + 20,
            "followed a 2 s jump: {} ms ahead",
            after - real_wall_ms()
        );
        // A small step (within the bound) is followed.
        s.set_clock_offset_ms(0);
        let _ = s.now_ms();
        s.set_clock_offset_ms(100);
        let t = s.now_ms();
        assert!(
            t + 5 >= real_wall_ms() + 100,
            "a 100 ms step was not followed"
        );
    }

    #[test]
    fn a_node_started_with_a_slow_clock_is_fenced_until_peers_confirm_it_then_resumes() {
        let s = stamper();
        s.expect_peers(true);
        // As if started with its wall clock 3 s slow.
        s.set_clock_offset_ms(-3_000);
        s.anchor_now();
        assert!(s.clock_fault().unwrap().contains("not yet confirmed"));
        let mine = s.now_ms();
        for p in [4, 5, 6] {
            s.record_peer_clock(p, mine + 3_000, mine, mine + 2);
        }
        let why = s.clock_fault().unwrap();
        assert!(why.contains("ms off 3 of its 3 peers"), "{why}");
        // Its wall clock is fixed: the stamp clock does not follow a 3 s jump alone...
        s.set_clock_offset_ms(0);
        assert!(s.now_ms() + 2_000 < real_wall_ms());
        assert!(s.clock_fault().is_some());
        // ...but once the peers' readings agree with the wall clock it re-anchors, and
        // must be confirmed afresh.
        let mine = s.now_ms();
        s.record_peer_clock(4, mine + 3_000, mine, mine + 2);
        assert!(
            s.now_ms() + 20 >= real_wall_ms(),
            "re-anchored on the wall clock"
        );
        assert!(s.clock_fault().unwrap().contains("not yet confirmed"));
        let mine = s.now_ms();
        for p in [4, 5, 6] {
            s.record_peer_clock(p, mine, mine, mine + 2);
        }
        assert_eq!(s.clock_fault(), None);
    }

    #[test]
    fn a_wall_clock_jump_that_is_not_followed_is_no_fault() {
        let s = stamper();
        s.set_clock_offset_ms(-5_000);
        let _ = s.now_ms();
        assert_eq!(s.clock_fault(), None);
        s.set_clock_offset_ms(5_000);
        let _ = s.now_ms();
        assert_eq!(s.clock_fault(), None);
    }

    #[test]
    fn a_backward_jump_beyond_the_bound_is_not_followed_and_time_keeps_running() {
        let s = stamper();
        let a = s.now_ms();
        s.set_clock_offset_ms(-5_000);
        let b = s.now_ms();
        assert!(b >= a, "never backwards");
        // A stamp clock that froze until the wall caught up would make this node's
        // proposals carry lease ends 5 s in the past: others would end them early.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let c = s.now_ms();
        assert!(
            c >= b + 190,
            "the stamp clock stood still for {} of 200 ms",
            200 - (c - b)
        );
        assert!(c + 20 >= real_wall_ms(), "fell behind true time");
        // The wall clock coming back is followed again.
        s.set_clock_offset_ms(0);
        let d = s.now_ms();
        assert!(d + 20 >= real_wall_ms() && d <= real_wall_ms() + 20);
    }
}
