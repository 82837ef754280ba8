//! One simulated run: regions, network, clocks, clients and faults, driven by one event
//! queue in simulated time from one seed. Single-threaded; no clock, thread or I/O.
//!
//! What runs for real (idem-core, as the servers run it):
//! * every region's group applies every command through `command::apply`, stamped by
//!   its leader with a clock that never goes back and stays within the clock bound (the
//!   stamper's guarantee), and judged at that stamp;
//! * every GLOBAL Reserve runs in `engine::ReserveEngine` and every Complete, Release and
//!   Extend in `holder::HolderEngine`, driven as idem-geo's `EngineRun::drive` drives
//!   them (a new round replaces the last, withdraws and notices go to every region, the
//!   caller going away abandons the engine), with the fast path of a final local
//!   completion in front, as `Geo::reserve` has it;
//! * every change a region makes is queued for every other region and shipped as a
//!   guarded `Merge` of the record as it is when the relay ships it, acknowledged and
//!   retried; a deferred merge is offered again; anti-entropy merges every record that
//!   differs (`merge::same_replicated`), now and then, both ways;
//! * a region that crashes keeps its records through the record codec
//!   (`codec::encode_record` / `decode_record`); one rebuilt from nothing has none.
//!
//! What is modelled: a region's group is one linearizable log (its Raft group); the
//! stamper's clock bound is a region's skew, drawn within the bound; a clock beyond the
//! bound fences its region (its node stops granting, accepting and acknowledging, as
//! the clock fail-stop does) until it is back.

use crate::oracle::{FenceId, Oracle, Violation};
use crate::rng::{Rng, TraceHash};
use idem_core::codec::{decode_record, encode_record};
use idem_core::engine::{
    first_generation, Answer, Command as Cmd, Engine, EngineConfig, ReserveCall, ReserveEngine,
    Rule,
};
use idem_core::holder::{HolderAnswer, HolderCall, HolderEngine, Refusal};
use idem_core::merge::{same_replicated, MergeOutcome};
use idem_core::{
    command, ClaimId, Command, CommandResult, Fence, Fingerprint, Key, Op, Phase, Record,
    ReserveOutcome, StoredResponse,
};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::hash::{BuildHasherDefault, Hasher};

/// A hash map whose iteration order depends only on what was put in it (no random
/// hasher keys): one seed, one run.
type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FastHasher>>;
type HashSet<K> = std::collections::HashSet<K, BuildHasherDefault<FastHasher>>;

/// A multiply-rotate hasher for the simulator's integer keys (the maps hold keys,
/// proc ids and change numbers that the simulator itself chose, so no flooding
/// resistance is needed, and SipHash was a tenth of the run time).
#[derive(Default)]
struct FastHasher(u64);

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

fn map<K, V>() -> HashMap<K, V> {
    HashMap::default()
}

const RETENTION_MS: u64 = 30 * 24 * 3_600_000;
/// Records per relay batch, as idem-geo's relay ships them.
const RELAY_BATCH: usize = 256;
const RELAY_POLL_MS: u64 = 20;
const RELAY_TIMEOUT_MS: u64 = 5_000;
/// Deferred merges are offered again at most this many times (idem-geo's bound).
const MAX_DEFER_ROUNDS: u32 = 8;
/// Withdraws and final notices are sent this many times to each region.
const BROADCAST_TRIES: u32 = 3;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub regions: usize,
    pub clients: u32,
    /// New requests stop once this many Reserves were made.
    pub reserves: u64,
    /// Keys the clients race for (the rest are fresh).
    pub hot_keys: u32,
    pub lease_ms: u64,
    pub skew_margin_ms: u64,
    pub round_timeout_ms: u64,
    pub reserve_deadline_ms: u64,
    pub anti_entropy_ms: u64,
    /// Draw a fault schedule (off: a fault-free run).
    pub faults: bool,
    pub rule: Rule,
    /// Print every step that touches this key (`idem-sim --seed N --trace-key K`).
    pub trace_key: Option<u32>,
    /// A candidate rule the servers do not have yet (`--rebuild-quarantine`): a region
    /// rebuilt from nothing accepts no proposal until every lease it may have accepted
    /// has ended and it pulled every other region's records but a minority's.
    pub rebuild_quarantine: bool,
    /// Fault kinds no seed draws (`--without rebuild,slow`).
    pub without: Vec<FaultKind>,
    /// Faults of the drawn schedule (by index) that never fire: the shrinker's tool
    /// (`--drop-faults 0,3`). The schedule is drawn as before; the run differs from the
    /// moment the first dropped fault would have started.
    pub drop_faults: Vec<usize>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            regions: 3,
            clients: 24,
            reserves: 2_000,
            hot_keys: 6,
            lease_ms: 4_000,
            skew_margin_ms: 500,
            round_timeout_ms: 1_500,
            reserve_deadline_ms: 6_000,
            anti_entropy_ms: 3_000,
            faults: true,
            rule: if cfg!(feature = "broken-local-accept") {
                Rule::BrokenLocalAccept
            } else if cfg!(feature = "broken-early-ack") {
                Rule::BrokenEarlyAck
            } else {
                Rule::Majority
            },
            trace_key: None,
            rebuild_quarantine: false,
            without: Vec::new(),
            drop_faults: Vec::new(),
        }
    }
}

/// The kinds of fault a run can draw; coverage is counted per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// One region cut off from the others.
    Isolate,
    /// Traffic from one region to another lost, the reverse direction intact.
    OneWay,
    /// Messages between regions lost at random.
    Loss,
    /// Messages between regions duplicated.
    Duplicate,
    /// WAN delays with multi-second tails.
    Slow,
    /// A region down (its records kept), restarted at the window's end.
    Crash,
    /// A region down and its records lost, rebuilt from nothing by anti-entropy.
    Rebuild,
    /// A region's stamping leader skewed within the clock bound.
    Skew,
    /// A region's clock beyond the bound (1 to 10 s either way): its node refuses work.
    ClockJump,
    /// Holders pause longer than their lease.
    Pause,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Isolate => "Isolate",
            FaultKind::OneWay => "OneWay",
            FaultKind::Loss => "Loss",
            FaultKind::Duplicate => "Duplicate",
            FaultKind::Slow => "Slow",
            FaultKind::Crash => "Crash",
            FaultKind::Rebuild => "Rebuild",
            FaultKind::Skew => "Skew",
            FaultKind::ClockJump => "ClockJump",
            FaultKind::Pause => "Pause",
        }
    }
}

impl std::str::FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<FaultKind, String> {
        FAULT_KINDS
            .iter()
            .copied()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = FAULT_KINDS.iter().map(|k| k.name()).collect();
                format!("no fault kind {s:?}; the kinds are {}", names.join(", "))
            })
    }
}

pub const FAULT_KINDS: [FaultKind; 10] = [
    FaultKind::Isolate,
    FaultKind::OneWay,
    FaultKind::Loss,
    FaultKind::Duplicate,
    FaultKind::Slow,
    FaultKind::Crash,
    FaultKind::Rebuild,
    FaultKind::Skew,
    FaultKind::ClockJump,
    FaultKind::Pause,
];

#[derive(Clone, Debug)]
struct Fault {
    kind: FaultKind,
    region: usize,
    other: usize,
    start_ms: u64,
    end_ms: u64,
    /// Skew or jump (ms, signed), loss or duplication rate (per mille).
    amount: i64,
    active: bool,
}

/// What one run did and found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    /// Reserves clients sent, including those a down or fenced region refused.
    pub attempts: u64,
    /// Reserves that reached a region's rules (answered from a final copy, or run by
    /// the proposer engine).
    pub reserves: u64,
    /// Of those, the ones sent while a fault was active on a key a claim held in some
    /// region (its lease running or ended less than a lease ago, or its completion not
    /// yet final): `Sim::key_contended`.
    pub contended: u64,
    pub new: u64,
    pub replay: u64,
    pub in_flight: u64,
    pub mismatch: u64,
    pub unavailable: u64,
    pub completions_acked: u64,
    pub takeovers: u64,
    /// Changes a full outbox skipped (anti-entropy repairs them).
    pub outbox_skipped: u64,
    /// Reserves that met the case of protocol §3, row 3: a region holds the request's
    /// completion while another holds a stale accept of another request for the key.
    pub stale_beside_completion: u64,
    pub events: u64,
    pub sim_ms: u64,
    /// Reserves made while each fault kind was active.
    pub coverage: BTreeMap<String, u64>,
    pub faults: Vec<String>,
    pub violations: Vec<Violation>,
    pub trace_hash: u64,
}

/// What a Reserve met when it was sent.
struct Met {
    contended: bool,
    /// Bit `k as u16` set: a fault of kind `k` was active.
    faults: u16,
    outbox_full: bool,
}

impl Report {
    /// A Reserve reached a region's rules (answered from a final copy, or run by the
    /// engine): it counts, with what it met.
    fn count_reserve(&mut self, met: &Met) {
        self.reserves += 1;
        self.contended += u64::from(met.contended);
        for k in FAULT_KINDS
            .iter()
            .filter(|&&k| met.faults & 1 << k as u16 != 0)
        {
            self.cover(k.name());
        }
        if met.outbox_full {
            self.cover("OutboxFull");
        }
    }

    /// One more Reserve met `what`.
    fn cover(&mut self, what: &str) {
        match self.coverage.get_mut(what) {
            Some(n) => *n += 1,
            None => {
                self.coverage.insert(what.to_string(), 1);
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Ev {
    /// A command reaches a region's group; `reply`: the proposer and round waiting.
    Apply {
        region: usize,
        from: usize,
        key: u32,
        op: Op,
        reply: Option<(u32, u32)>,
    },
    Reply {
        proc: u32,
        round: u32,
        region: usize,
        result: Option<CommandResult>,
    },
    Timer {
        proc: u32,
        token: u32,
    },
    Client {
        client: u32,
        wake: u32,
    },
    Relay {
        from: usize,
        to: usize,
    },
    RelayBatch {
        from: usize,
        to: usize,
        batch: u64,
        records: Vec<(u32, u64, Record)>,
    },
    RelayAck {
        from: usize,
        to: usize,
        batch: u64,
        keys: Vec<(u32, u64)>,
    },
    RelayTimeout {
        from: usize,
        to: usize,
        batch: u64,
    },
    AntiEntropy {
        region: usize,
    },
    Deferred {
        region: usize,
        key: u32,
        record: Record,
        round: u32,
    },
    FaultStart(usize),
    FaultEnd(usize),
}

impl Ev {
    fn code(&self) -> u64 {
        match self {
            Ev::Apply { region, key, .. } => 1 | (*region as u64) << 8 | (*key as u64) << 16,
            Ev::Reply { proc, region, .. } => 2 | (*region as u64) << 8 | (*proc as u64) << 16,
            Ev::Timer { proc, token } => 3 | (*token as u64) << 8 | (*proc as u64) << 32,
            Ev::Client { client, .. } => 4 | (*client as u64) << 8,
            Ev::Relay { from, to } => 5 | (*from as u64) << 8 | (*to as u64) << 16,
            Ev::RelayBatch { batch, .. } => 6 | batch << 8,
            Ev::RelayAck { batch, .. } => 7 | batch << 8,
            Ev::RelayTimeout { batch, .. } => 8 | batch << 8,
            Ev::AntiEntropy { region } => 9 | (*region as u64) << 8,
            Ev::Deferred { region, key, .. } => 10 | (*region as u64) << 8 | (*key as u64) << 16,
            Ev::FaultStart(i) => 11 | (*i as u64) << 8,
            Ev::FaultEnd(i) => 12 | (*i as u64) << 8,
        }
    }
}

/// A queued event: its time, its order among events of one time, and its slot in
/// `Sim::slots` (the heap moves these 24 bytes, not the events, which hold records).
struct Queued {
    at: u64,
    seq: u64,
    slot: u32,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    /// The earliest first (the heap is a max-heap).
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct Region {
    up: bool,
    records: HashMap<u32, Record>,
    /// Records as stored while the region is down.
    on_disk: Vec<(u32, Vec<u8>)>,
    /// The leader's last stamp: stamps never go back in log order.
    stamp: u64,
    skew_ms: i64,
    /// Beyond the clock bound: its node refuses work.
    fenced: bool,
    minted: u32,
    /// The node's hybrid clock for claims (never reset: it lives on the node's disk).
    hlc: u64,
    /// Rebuilt from nothing and kept out of proposals (`SimConfig::rebuild_quarantine`)
    /// until this time and until it pulled from the regions marked here.
    quarantine: Option<(u64, Vec<bool>)>,
    /// Per destination: keys changed here and not yet acknowledged there (key ->
    /// change number), and the batch in flight.
    outbox: Vec<HashMap<u32, u64>>,
    in_flight: Vec<Option<u64>>,
    relay_scheduled: Vec<bool>,
    relay_backoff: Vec<u64>,
    /// Per other region: keys whose copies here and there may differ (anti-entropy
    /// compares only these; a key not listed is held by both alike or not held
    /// there), or `ae_full`: compare every key (after a crash or a rebuild).
    ae_dirty: Vec<HashSet<u32>>,
    ae_full: Vec<bool>,
    /// Claims withdrawn here (key, claim digest) and the generation the withdraw left
    /// a `Released` record of them at: no Propose of them at or below it may be
    /// accepted here again (the model check's `WITHDRAW_STICKS`).
    withdrawn: HashMap<(u32, ClaimId), u32>,
}

enum Eng {
    Reserve(ReserveEngine),
    Holder(HolderEngine),
}

struct Proc {
    client: u32,
    key: u32,
    region: usize,
    eng: Eng,
    timer: Option<u32>,
    /// The client's call that started it, for its answer.
    call: u32,
    /// When the client sent it (true time).
    sent_ms: u64,
}

#[derive(Clone, Debug)]
enum Stage {
    Idle,
    Reserving {
        procs: Vec<u32>,
        sent_ms: u64,
    },
    Working {
        fence: Fence,
        trusted_until: u64,
    },
    Completing {
        proc: u32,
        fence: Fence,
        trusted_until: u64,
        response: u64,
    },
    Releasing,
    Extending {
        fence: Fence,
        sent_ms: u64,
        trusted_until: u64,
    },
}

struct Request {
    key: u32,
    fp: u64,
    first_attempt_ms: u64,
    tries: u32,
}

struct Client {
    home: usize,
    wake: u32,
    /// Counts the calls a client made: an answer to an earlier one is stale.
    call: u32,
    stage: Stage,
    req: Option<Request>,
}

pub struct Sim {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Queued>,
    /// The queued events, by slot; `free` lists the empty slots.
    slots: Vec<Option<Ev>>,
    free: Vec<u32>,
    regions: Vec<Region>,
    procs: HashMap<u32, Proc>,
    next_proc: u32,
    clients: Vec<Client>,
    hot: Vec<u32>,
    next_key: u32,
    faults: Vec<Fault>,
    /// The faults active now (indices into `faults`).
    active_faults: Vec<usize>,
    wan_ms: Vec<Vec<u64>>,
    oracle: Oracle,
    report: Report,
    hash: TraceHash,
    next_batch: u64,
    change: u64,
    /// No new requests once this many Reserves were made.
    stopping: bool,
    /// Keys an outbox holds per destination before changes are skipped: small in some
    /// seeds, so that outboxes overflow and anti-entropy repairs what they skipped.
    outbox_max: usize,
}

/// The key a command names (tenant and scope are empty: nothing in the rules reads them,
/// and an empty `String` costs no allocation).
pub(crate) fn key_of(k: u32) -> Key {
    Key {
        tenant: String::new(),
        scope: String::new(),
        key: k.to_be_bytes().to_vec(),
    }
}

fn fingerprint_of(fp: u64) -> Fingerprint {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&fp.to_le_bytes());
    Fingerprint(b)
}

fn fence_id(f: &Fence) -> FenceId {
    let c = f.claim;
    (
        f.generation,
        c.hlc ^ (c.region as u64) << 48 ^ (c.node as u64) << 32 ^ c.nonce as u64,
    )
}

fn op_summary(op: &Op) -> String {
    match op {
        Op::Propose {
            claim,
            generation,
            lease_until_ms,
            ..
        } => format!("Propose claim {claim} gen {generation} until {lease_until_ms}"),
        Op::Merge { record, .. } => format!("Merge {}", record_summary(record)),
        Op::Withdraw {
            claim, generation, ..
        } => format!("Withdraw claim {claim} gen {generation}"),
        other => format!("{} {:?}", other.name(), other)
            .chars()
            .take(160)
            .collect(),
    }
}

fn record_summary(r: &Record) -> String {
    format!(
        "{:?} gen {} claim {} lease {} witnesses {:b} final {}",
        r.phase, r.generation, r.claim, r.lease_expires_ms, r.witnesses, r.is_final
    )
}

/// The body a holder completes with: its response number and a fixed suffix.
fn body_of(response: u64) -> Vec<u8> {
    let mut body = response.to_le_bytes().to_vec();
    body.extend_from_slice(b"charged");
    body
}

/// The response number a stored response carries, if its whole body is exactly what a
/// holder sent (`u64::MAX` otherwise: a body changed in any byte matches nothing sent).
fn response_id(r: &StoredResponse) -> u64 {
    let id = r
        .body
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(u64::MAX);
    if r.body == body_of(id) && r.status == 200 && r.headers.is_empty() {
        id
    } else {
        u64::MAX
    }
}

impl Sim {
    pub fn new(cfg: SimConfig, seed: u64) -> Sim {
        let mut rng = Rng::new(seed);
        let n = cfg.regions;
        // One-way WAN delays per pair (35 to 150 ms: round trips of 70 to 300 ms).
        let mut wan_ms = vec![vec![1; n]; n];
        let pairs: Vec<(usize, usize)> = (0..n)
            .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
            .collect();
        for (a, b) in pairs {
            let d = rng.between(35, 150);
            wan_ms[a][b] = d;
            wan_ms[b][a] = d;
        }
        let bound = cfg.skew_margin_ms / 2;
        let regions = (0..n)
            .map(|_| Region {
                up: true,
                records: map(),
                on_disk: Vec::new(),
                stamp: 0,
                skew_ms: rng.below(bound + 1) as i64 - (bound / 2) as i64,
                fenced: false,
                minted: 0,
                hlc: 0,
                quarantine: None,
                outbox: vec![map(); n],
                in_flight: vec![None; n],
                relay_scheduled: vec![false; n],
                relay_backoff: vec![100; n],
                ae_dirty: vec![HashSet::default(); n],
                ae_full: vec![false; n],
                withdrawn: map(),
            })
            .collect();
        let clients = (0..cfg.clients)
            .map(|i| Client {
                home: i as usize % n,
                wake: 0,
                call: 0,
                stage: Stage::Idle,
                req: None,
            })
            .collect();
        let hot = (0..cfg.hot_keys).collect();
        let next_key = cfg.hot_keys;
        let mut sim = Sim {
            cfg,
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            regions,
            procs: map(),
            next_proc: 0,
            clients,
            hot,
            next_key,
            faults: Vec::new(),
            active_faults: Vec::new(),
            wan_ms,
            oracle: Oracle::default(),
            report: Report {
                seed,
                ..Report::default()
            },
            hash: TraceHash::default(),
            next_batch: 0,
            change: 0,
            stopping: false,
            outbox_max: usize::MAX,
        };
        // Drawn from a stream of its own, so the rest of the run draws as it did.
        let mut side = Rng::new(seed ^ 0x6f75_7462_6f78);
        if sim.cfg.faults && side.chance(0.25) {
            sim.outbox_max = side.between(2, 32) as usize;
        }
        if sim.cfg.faults {
            sim.draw_faults();
        }
        for c in 0..sim.cfg.clients {
            let at = sim.rng.below(200);
            sim.at(at, Ev::Client { client: c, wake: 0 });
        }
        for r in 0..n {
            let at = sim.rng.below(sim.cfg.anti_entropy_ms);
            sim.at(at, Ev::AntiEntropy { region: r });
        }
        sim
    }

    /// A fault schedule drawn by the seed: which kinds, how often, how long, and
    /// several at once. At most a minority of regions is ever down or rebuilt at once.
    fn draw_faults(&mut self) {
        let n = self.cfg.regions;
        // Which kinds this seed uses, and the rate of windows.
        let without = self.cfg.without.clone();
        let kinds: Vec<FaultKind> = FAULT_KINDS
            .iter()
            .copied()
            .filter(|k| self.rng.chance(0.6) && !without.contains(k))
            .collect();
        if kinds.is_empty() {
            return;
        }
        // Expected run length: the Reserves at about one per client per second.
        let span = (self.cfg.reserves * 1_000 / self.cfg.clients.max(1) as u64).max(10_000);
        let count = 2 + self.rng.below(4 + span / 3_000);
        let mut down_until = vec![0u64; n];
        for _ in 0..count {
            let kind = kinds[self.rng.below(kinds.len() as u64) as usize];
            let start = self.rng.below(span);
            let len = self.rng.between(500, 20_000);
            let region = self.rng.below(n as u64) as usize;
            let mut other = self.rng.below(n as u64 - 1) as usize;
            if other >= region {
                other += 1;
            }
            let amount = match kind {
                FaultKind::Loss | FaultKind::Duplicate => self.rng.between(50, 600) as i64,
                FaultKind::Skew => {
                    let b = self.cfg.skew_margin_ms / 2;
                    self.rng.below(2 * b + 1) as i64 - b as i64
                }
                FaultKind::ClockJump => {
                    let ms = self.rng.between(1_000, 10_000) as i64;
                    if self.rng.chance(0.5) {
                        ms
                    } else {
                        -ms
                    }
                }
                _ => 0,
            };
            if matches!(kind, FaultKind::Crash | FaultKind::Rebuild) {
                // Another region down over this window would take a majority.
                let busy = (0..n)
                    .filter(|&r| r != region && down_until[r] > start)
                    .count();
                if busy + 1 > (n - 1) / 2 || down_until[region] > start {
                    continue;
                }
                down_until[region] = start + len;
            }
            let i = self.faults.len();
            self.faults.push(Fault {
                kind,
                region,
                other,
                start_ms: start,
                end_ms: start + len,
                amount,
                active: false,
            });
            self.report.faults.push(format!(
                "{kind:?} region {region} other {other} {start}..{} ms ({amount})",
                start + len
            ));
            if !self.cfg.drop_faults.contains(&i) {
                self.at(start, Ev::FaultStart(i));
                self.at(start + len, Ev::FaultEnd(i));
            }
        }
    }

    fn at(&mut self, at: u64, ev: Ev) {
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(ev);
                slot
            }
            None => {
                self.slots.push(Some(ev));
                (self.slots.len() - 1) as u32
            }
        };
        self.seq += 1;
        self.queue.push(Queued {
            at: at.max(self.now),
            seq: self.seq,
            slot,
        });
    }

    fn active(&self, kind: FaultKind) -> impl Iterator<Item = &Fault> {
        self.active_faults
            .iter()
            .map(|&i| &self.faults[i])
            .filter(move |f| f.kind == kind)
    }

    fn any_fault(&self) -> bool {
        !self.active_faults.is_empty()
    }

    fn cut(&self, from: usize, to: usize) -> bool {
        if from == to {
            return false;
        }
        self.active(FaultKind::Isolate)
            .any(|f| f.region == from || f.region == to)
            || self
                .active(FaultKind::OneWay)
                .any(|f| f.region == from && f.other == to)
    }

    /// When a message sent now from `from` to `to` arrives; `None`: lost.
    fn delay(&mut self, from: usize, to: usize) -> Option<u64> {
        if from == to {
            return Some(self.rng.between(1, 3));
        }
        if self.cut(from, to) {
            return None;
        }
        let loss: i64 = self
            .active(FaultKind::Loss)
            .map(|f| f.amount)
            .max()
            .unwrap_or(0);
        if loss > 0 && self.rng.below(1_000) < loss as u64 {
            return None;
        }
        let base = self.wan_ms[from][to];
        let mut d = base + self.rng.below(base / 4 + 1);
        // A long tail always; multi-second stalls while the WAN is slow.
        if self.rng.chance(0.01) {
            d += self.rng.between(100, 1_000);
        }
        if self.active(FaultKind::Slow).next().is_some() && self.rng.chance(0.2) {
            d += self.rng.between(200, 3_000);
        }
        Some(d)
    }

    /// Send `ev` over the network (possibly lost, delayed, duplicated).
    fn send(&mut self, from: usize, to: usize, ev: Ev) {
        let Some(d) = self.delay(from, to) else {
            return;
        };
        let dup: i64 = self
            .active(FaultKind::Duplicate)
            .map(|f| f.amount)
            .max()
            .unwrap_or(0);
        if from != to && dup > 0 && self.rng.below(1_000) < dup as u64 {
            let extra = self.rng.below(500);
            self.at(self.now + d + extra, ev.clone());
        }
        self.at(self.now + d, ev);
    }

    /// A region node's clock (its stamp clock: true time plus its skew).
    fn node_ms(&self, r: usize) -> u64 {
        (self.now as i64 + self.regions[r].skew_ms).max(0) as u64
    }

    /// The time a region's proposers read: its node's clock as the stamper gives it,
    /// which never goes back (a skew that changes moves it forward only).
    fn proposer_ms(&mut self, r: usize) -> u64 {
        let t = self.node_ms(r).max(self.regions[r].stamp);
        self.regions[r].stamp = t;
        t
    }

    fn majority(&self) -> usize {
        self.cfg.regions / 2 + 1
    }

    fn engine_config(&self, local: usize) -> EngineConfig {
        EngineConfig {
            regions: self.cfg.regions,
            local: Some(local),
            round_timeout_ms: self.cfg.round_timeout_ms,
            max_stale_retries: 2,
            max_contention_rounds: idem_core::engine::MAX_CONTENTION_ROUNDS,
            rule: self.cfg.rule,
        }
    }

    /// Run until every client is idle after the last Reserve, then heal everything
    /// and let the regions converge; judge the run.
    pub fn run(mut self) -> Report {
        let mut healed_at = None;
        while let Some(Queued { at, slot, .. }) = self.queue.pop() {
            let ev = self.slots[slot as usize]
                .take()
                .expect("a queued slot holds its event");
            self.free.push(slot);
            self.now = at;
            self.report.events += 1;
            self.hash.add(at);
            self.hash.add(ev.code());
            self.step(ev);
            if self.stopping && healed_at.is_none() && self.all_idle() {
                self.heal_all();
                healed_at = Some(self.now);
            }
            if let Some(h) = healed_at {
                // Enough for every lease to end, every deferred merge to be offered
                // again and several anti-entropy passes to run.
                if self.now > h + 4 * self.cfg.lease_ms + 8 * self.cfg.anti_entropy_ms {
                    break;
                }
            }
            if self.now > 3_600_000 * 24 {
                self.report.violations.push(Violation {
                    kind: "no_progress",
                    key: 0,
                    at_ms: self.now,
                    detail: "the run did not end within a simulated day".into(),
                });
                break;
            }
        }
        self.report.sim_ms = self.now;
        if healed_at.is_none() {
            self.report.violations.push(Violation {
                kind: "liveness",
                key: 0,
                at_ms: self.now,
                detail: "clients were still busy when the events ran out".into(),
            });
        }
        self.final_checks();
        self.oracle.finish();
        self.report.violations.append(&mut self.oracle.violations);
        self.report.trace_hash = self.hash.value();
        self.report
    }

    fn all_idle(&self) -> bool {
        self.clients.iter().all(|c| matches!(c.stage, Stage::Idle))
    }

    /// The end of the run: every fault ends, and clients waiting to retry give up (so
    /// nothing new starts while the regions converge and the final checks run).
    fn heal_all(&mut self) {
        for c in &mut self.clients {
            c.req = None;
            c.wake += 1;
        }
        for i in 0..self.faults.len() {
            if self.faults[i].active {
                self.end_fault(i);
            }
            self.faults[i].end_ms = self.faults[i].end_ms.min(self.now);
        }
        // Faults not yet started never will.
        for f in &mut self.faults {
            f.start_ms = u64::MAX;
        }
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Apply {
                region,
                from,
                key,
                op,
                reply,
            } => {
                let result = self.apply(region, key, op);
                if let Some((proc, round)) = reply {
                    // A region that is down or fenced answers with an error.
                    let ev = Ev::Reply {
                        proc,
                        round,
                        region,
                        result,
                    };
                    self.send(region, from, ev);
                }
            }
            Ev::Reply {
                proc,
                round,
                region,
                result,
            } => self.on_reply(proc, round, region, result),
            Ev::Timer { proc, token } => self.on_timer(proc, token),
            Ev::Client { client, wake } => {
                if self.clients[client as usize].wake == wake {
                    self.client_step(client);
                }
            }
            Ev::Relay { from, to } => self.relay(from, to),
            Ev::RelayBatch {
                from,
                to,
                batch,
                records,
            } => {
                if !self.regions[to].up {
                    return;
                }
                let mut keys = Vec::with_capacity(records.len());
                for (k, change, rec) in records {
                    self.merge_in(to, k, rec, 1);
                    keys.push((k, change));
                }
                self.send(
                    to,
                    from,
                    Ev::RelayAck {
                        from,
                        to,
                        batch,
                        keys,
                    },
                );
            }
            Ev::RelayAck {
                from,
                to,
                batch,
                keys,
            } => {
                let reg = &mut self.regions[from];
                if reg.in_flight[to] != Some(batch) {
                    return;
                }
                reg.in_flight[to] = None;
                reg.relay_backoff[to] = 100;
                for (k, change) in keys {
                    if reg.outbox[to].get(&k) == Some(&change) {
                        reg.outbox[to].remove(&k);
                    }
                }
                self.schedule_relay(from, to, 0);
            }
            Ev::RelayTimeout { from, to, batch } => {
                let reg = &mut self.regions[from];
                if reg.in_flight[to] == Some(batch) {
                    reg.in_flight[to] = None;
                    let b = reg.relay_backoff[to];
                    reg.relay_backoff[to] = (b * 2).min(10_000);
                    let wait = b / 2 + self.rng.below(b / 2 + 1);
                    self.schedule_relay(from, to, wait);
                }
            }
            Ev::AntiEntropy { region } => {
                self.anti_entropy(region);
                let i = self.cfg.anti_entropy_ms;
                let next = self.now + i * 3 / 4 + self.rng.below(i / 2 + 1);
                self.at(next, Ev::AntiEntropy { region });
            }
            Ev::Deferred {
                region,
                key,
                record,
                round,
            } => self.merge_in(region, key, record, round),
            Ev::FaultStart(i) => {
                if self.faults[i].start_ms != u64::MAX {
                    self.start_fault(i);
                }
            }
            Ev::FaultEnd(i) => {
                if self.faults[i].active {
                    self.end_fault(i);
                }
            }
        }
    }

    fn start_fault(&mut self, i: usize) {
        self.faults[i].active = true;
        if !self.active_faults.contains(&i) {
            self.active_faults.push(i);
        }
        let f = self.faults[i].clone();
        match f.kind {
            FaultKind::Crash | FaultKind::Rebuild => self.crash(f.region),
            FaultKind::Skew => self.regions[f.region].skew_ms = f.amount,
            // Broken: the jump is followed and nothing notices.
            FaultKind::ClockJump if cfg!(feature = "broken-unbounded-clock") => {
                self.regions[f.region].skew_ms += f.amount
            }
            // The stamper does not follow a clock that jumps: its stamps advance by the
            // monotonic time elapsed. Peers see the offset and the node stops serving.
            FaultKind::ClockJump => self.regions[f.region].fenced = true,
            _ => {}
        }
    }

    fn end_fault(&mut self, i: usize) {
        self.faults[i].active = false;
        self.active_faults.retain(|&a| a != i);
        let f = self.faults[i].clone();
        match f.kind {
            FaultKind::Crash => self.restart(f.region, false),
            FaultKind::Rebuild => self.restart(f.region, true),
            FaultKind::Skew => {
                let b = (self.cfg.skew_margin_ms / 2) as i64;
                self.regions[f.region].skew_ms = self.rng.below(b as u64 + 1) as i64 - b / 2;
            }
            FaultKind::ClockJump if cfg!(feature = "broken-unbounded-clock") => {
                self.regions[f.region].skew_ms -= f.amount
            }
            FaultKind::ClockJump => {
                self.regions[f.region].fenced = self
                    .faults
                    .iter()
                    .any(|g| g.active && g.kind == FaultKind::ClockJump && g.region == f.region)
            }
            _ => {}
        }
        // Outboxes that waited for a link start shipping again.
        for from in 0..self.cfg.regions {
            for to in 0..self.cfg.regions {
                if from != to && !self.regions[from].outbox[to].is_empty() {
                    self.schedule_relay(from, to, 0);
                }
            }
        }
    }

    /// Every node of the region stops: its engines die with it (no withdraw, no notice),
    /// its records stay on disk.
    fn crash(&mut self, r: usize) {
        let reg = &mut self.regions[r];
        reg.up = false;
        let mut on_disk: Vec<(u32, Vec<u8>)> = reg
            .records
            .drain()
            .map(|(k, rec)| (k, encode_record(&rec)))
            .collect();
        on_disk.sort_unstable_by_key(|(k, _)| *k);
        reg.on_disk = on_disk;
        for f in reg.in_flight.iter_mut() {
            *f = None;
        }
        let mut dead: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.region == r)
            .map(|(id, _)| *id)
            .collect();
        // In proc order, not the map's: one seed, one run, whatever the hasher.
        dead.sort_unstable();
        for id in dead {
            if let Some(p) = self.procs.remove(&id) {
                // The client's connection breaks: it sees an error and retries.
                let c = p.client;
                if self.clients[c as usize].call == p.call {
                    self.call_failed(c, id);
                }
            }
        }
    }

    fn restart(&mut self, r: usize, wiped: bool) {
        let n = self.cfg.regions;
        self.mark_all_changed(r);
        let reg = &mut self.regions[r];
        reg.up = true;
        let on_disk = std::mem::take(&mut reg.on_disk);
        if wiped {
            reg.stamp = 0;
            // What it withdrew went with its records.
            reg.withdrawn = map();
            reg.outbox = vec![map(); n];
            if self.cfg.rebuild_quarantine {
                let until = self.now + self.cfg.lease_ms + self.cfg.skew_margin_ms;
                reg.quarantine = Some((until, vec![false; n]));
            }
        } else {
            for (k, bytes) in on_disk {
                match decode_record(&bytes) {
                    Ok(rec) => {
                        reg.records.insert(k, rec);
                    }
                    Err(e) => self.report.violations.push(Violation {
                        kind: "codec",
                        key: k,
                        at_ms: self.now,
                        detail: format!("a stored record did not decode: {e}"),
                    }),
                }
            }
        }
    }

    /// Apply one command to a region's group, as its leader stamps it.
    fn apply(&mut self, r: usize, k: u32, op: Op) -> Option<CommandResult> {
        let reg = &self.regions[r];
        if !reg.up {
            return None;
        }
        // A node whose clock is in doubt stamps, proposes and acknowledges nothing.
        if reg.fenced && !matches!(op, Op::Merge { .. }) {
            return None;
        }
        if matches!(op, Op::Propose { .. }) && self.quarantined(r) {
            return None;
        }
        let (result, _) = self.apply_stamped(r, k, op);
        Some(result)
    }

    /// Whether a rebuilt region is still kept out of proposals: until every lease it
    /// may have accepted before it lost its records has ended, and until it pulled
    /// from enough regions that every majority it belonged to is among them.
    fn quarantined(&mut self, r: usize) -> bool {
        let n = self.cfg.regions;
        let need = n - self.majority() + 1;
        let now = self.now;
        let reg = &mut self.regions[r];
        let Some((until, pulled)) = &reg.quarantine else {
            return false;
        };
        if now >= *until && pulled.iter().filter(|p| **p).count() >= need {
            reg.quarantine = None;
            return false;
        }
        true
    }

    fn apply_stamped(&mut self, r: usize, k: u32, op: Op) -> (CommandResult, bool) {
        let now = self.node_ms(r);
        let n = self.cfg.regions;
        let reg = &mut self.regions[r];
        reg.stamp = reg.stamp.max(now);
        if cfg!(feature = "broken-unbounded-clock") {
            // Broken: the stamp adopts another region's clock, however far ahead.
            if let Op::Propose { claim, .. } = &op {
                if claim.region as usize != r {
                    reg.stamp = reg.stamp.max(claim.hlc);
                }
            }
        }
        let proposed = match &op {
            Op::Propose {
                claim, generation, ..
            } => Some((*claim, *generation)),
            _ => None,
        };
        let withdrawing = match &op {
            Op::Withdraw {
                claim, generation, ..
            } => Some((*claim, *generation)),
            _ => None,
        };
        reg.minted += 1;
        let is_merge = matches!(op, Op::Merge { .. });
        let cmd = Command {
            now_ms: reg.stamp,
            skew_margin_ms: self.cfg.skew_margin_ms,
            claim: ClaimId {
                hlc: reg.stamp,
                region: r as u16,
                node: r as u16,
                nonce: reg.minted,
            },
            region_bit: 1 << r,
            key: key_of(k),
            op,
        };
        let stored = reg.records.get(&k);
        let (result, write) = command::apply(stored, &cmd);
        if self.cfg.trace_key == Some(k) {
            println!(
                "{:>8} region {r} stamp {} applies {}: {:?}\n{:>8}   before {:?}\n{:>8}   after  {:?}",
                self.now,
                cmd.now_ms,
                op_summary(&cmd.op),
                result,
                "",
                stored.map(record_summary),
                "",
                write.as_ref().map(record_summary)
            );
        }
        if let (
            Some((claim, generation)),
            CommandResult::Reserve {
                outcome: ReserveOutcome::New { fence, .. },
                ..
            },
        ) = (proposed, &result)
        {
            let stuck = reg.withdrawn.get(&(k, claim)).copied();
            if fence.claim == claim && stuck.is_some_and(|g| generation <= g) {
                self.report.violations.push(Violation {
                    kind: "withdrawn_accepted",
                    key: k,
                    at_ms: self.now,
                    detail: format!(
                        "region {r} accepted a Propose at generation {generation} of a claim it had withdrawn at generation {stuck:?}"
                    ),
                });
            }
        }
        if let Some((claim, generation)) = withdrawing {
            let after = write.as_ref().or(stored);
            let stuck = after.is_some_and(|x| {
                x.claim == claim && x.phase == Phase::Released && x.generation >= generation
            });
            if stuck {
                let g = reg.withdrawn.entry((k, claim)).or_default();
                *g = (*g).max(generation);
            }
        }
        let mut changed = false;
        if let Some(w) = write {
            changed = stored.is_none_or(|s| !same_replicated(s, &w));
            reg.records.insert(k, w);
            if changed {
                self.mark_changed(r, k);
            }
            if changed && !is_merge {
                self.change += 1;
                for dest in (0..n).filter(|&d| d != r) {
                    let outbox = &mut self.regions[r].outbox[dest];
                    // A full outbox skips the change (as `relay.max_outbox` does):
                    // anti-entropy repairs it.
                    if outbox.len() >= self.outbox_max && !outbox.contains_key(&k) {
                        self.report.outbox_skipped += 1;
                        continue;
                    }
                    outbox.insert(k, self.change);
                    self.schedule_relay(r, dest, RELAY_POLL_MS);
                }
            }
        }
        (result, changed)
    }

    /// Region `r`'s copy of `k` changed: anti-entropy between `r` and any other region
    /// compares it again.
    fn mark_changed(&mut self, r: usize, k: u32) {
        for o in 0..self.cfg.regions {
            if o != r {
                self.regions[r].ae_dirty[o].insert(k);
                self.regions[o].ae_dirty[r].insert(k);
            }
        }
    }

    /// Region `r`'s records were reloaded or lost: anti-entropy between it and any
    /// other region compares every key once.
    fn mark_all_changed(&mut self, r: usize) {
        for o in 0..self.cfg.regions {
            if o != r {
                self.regions[r].ae_full[o] = true;
                self.regions[o].ae_full[r] = true;
            }
        }
    }

    /// Merge another region's copy here (relay, anti-entropy, a deferred merge).
    fn merge_in(&mut self, r: usize, k: u32, record: Record, round: u32) {
        if !self.regions[r].up {
            return;
        }
        if self.regions[r]
            .records
            .get(&k)
            .is_some_and(|l| same_replicated(l, &record))
        {
            return;
        }
        let op = Op::Merge {
            record: record.clone(),
            guarded: true,
            quorum: self.majority() as u32,
            region: Some(r as u16),
        };
        let (result, _) = self.apply_stamped(r, k, op);
        if let CommandResult::Merge {
            outcome: MergeOutcome::Deferred { retry_after_ms },
            ..
        } = &result
        {
            if round < MAX_DEFER_ROUNDS {
                let at = self.now + retry_after_ms.clamp(&1, &60_000);
                self.at(
                    at,
                    Ev::Deferred {
                        region: r,
                        key: k,
                        record,
                        round: round + 1,
                    },
                );
            }
        }
        if let CommandResult::Merge {
            conflict: Some(idem_core::merge::Conflict::DualCompletion),
            ..
        } = &result
        {
            self.report.violations.push(Violation {
                kind: "dual_completion",
                key: k,
                at_ms: self.now,
                detail: format!("two completions of one generation met in a merge at region {r}"),
            });
        }
    }

    fn schedule_relay(&mut self, from: usize, to: usize, after: u64) {
        let reg = &mut self.regions[from];
        if reg.relay_scheduled[to] || reg.in_flight[to].is_some() || reg.outbox[to].is_empty() {
            return;
        }
        reg.relay_scheduled[to] = true;
        self.at(self.now + after, Ev::Relay { from, to });
    }

    /// Ship a batch of queued changes, each as the record is now.
    fn relay(&mut self, from: usize, to: usize) {
        self.regions[from].relay_scheduled[to] = false;
        let reg = &self.regions[from];
        if !reg.up || reg.in_flight[to].is_some() {
            return;
        }
        let mut keys: Vec<(u32, u64)> = reg.outbox[to].iter().map(|(k, c)| (*k, *c)).collect();
        if keys.is_empty() {
            return;
        }
        // Oldest changes first (deterministic).
        keys.sort_unstable_by_key(|(_, c)| *c);
        keys.truncate(RELAY_BATCH);
        let records: Vec<(u32, u64, Record)> = keys
            .iter()
            .filter_map(|(k, c)| reg.records.get(k).map(|r| (*k, *c, r.clone())))
            .collect();
        self.next_batch += 1;
        let batch = self.next_batch;
        self.regions[from].in_flight[to] = Some(batch);
        // A key whose record is gone ships nothing and is acknowledged with the rest.
        let gone: Vec<u32> = keys
            .iter()
            .filter(|(k, _)| !records.iter().any(|(rk, _, _)| rk == k))
            .map(|(k, _)| *k)
            .collect();
        for k in gone {
            self.regions[from].outbox[to].remove(&k);
        }
        self.send(
            from,
            to,
            Ev::RelayBatch {
                from,
                to,
                batch,
                records,
            },
        );
        self.at(
            self.now + RELAY_TIMEOUT_MS,
            Ev::RelayTimeout { from, to, batch },
        );
    }

    /// Pull from every other region every record that differs (both ways over the
    /// pass: each region runs its own).
    fn anti_entropy(&mut self, r: usize) {
        if !self.regions[r].up {
            return;
        }
        for s in 0..self.cfg.regions {
            if s == r || !self.regions[s].up || self.cut(r, s) || self.cut(s, r) {
                continue;
            }
            // The keys that may differ: all of them after a crash or a rebuild, else
            // those changed on either side since a pass last found them alike.
            let candidates: Vec<u32> = if self.regions[r].ae_full[s] {
                self.regions[r].ae_full[s] = false;
                self.regions[s].records.keys().copied().collect()
            } else {
                self.regions[r].ae_dirty[s].iter().copied().collect()
            };
            let mut differing: Vec<(u32, Record)> = Vec::new();
            let mut dirty = std::mem::take(&mut self.regions[r].ae_dirty[s]);
            for k in candidates {
                let theirs = self.regions[s].records.get(&k);
                let ours = self.regions[r].records.get(&k);
                match theirs {
                    Some(t) if ours.is_none_or(|l| !same_replicated(l, t)) => {
                        dirty.insert(k);
                        differing.push((k, t.clone()));
                    }
                    _ => {
                        dirty.remove(&k);
                    }
                }
            }
            self.regions[r].ae_dirty[s] = dirty;
            differing.sort_unstable_by_key(|(k, _)| *k);
            // Debug builds (the tests) check the marks against a full comparison.
            if cfg!(debug_assertions) {
                let missed = self.regions[s].records.iter().find(|(k, t)| {
                    self.regions[r]
                        .records
                        .get(k)
                        .is_none_or(|l| !same_replicated(l, t))
                        && !differing.iter().any(|(d, _)| d == *k)
                });
                if let Some((k, _)) = missed {
                    self.report.violations.push(Violation {
                        kind: "anti_entropy_skipped",
                        key: *k,
                        at_ms: self.now,
                        detail: format!(
                            "region {r} did not compare a key region {s} holds otherwise"
                        ),
                    });
                }
            }
            for (k, rec) in differing {
                self.merge_in(r, k, rec, 1);
            }
            if let Some((_, pulled)) = &mut self.regions[r].quarantine {
                pulled[s] = true;
            }
        }
    }

    // ---- the proposer side ----

    fn on_reply(&mut self, pid: u32, round: u32, region: usize, result: Option<CommandResult>) {
        let Some(r) = self.procs.get(&pid).map(|p| p.region) else {
            return;
        };
        let now = self.proposer_ms(r);
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        match &mut p.eng {
            Eng::Reserve(e) => {
                let cmds = e.on_result(round, region, result.as_ref(), now);
                self.perform_reserve(pid, cmds);
            }
            Eng::Holder(e) => {
                let cmds = e.on_result(round, region, result.as_ref(), now);
                self.perform_holder(pid, cmds);
            }
        }
    }

    fn on_timer(&mut self, pid: u32, token: u32) {
        let Some(r) = self
            .procs
            .get(&pid)
            .filter(|p| p.timer == Some(token))
            .map(|p| p.region)
        else {
            return;
        };
        let now = self.proposer_ms(r);
        let Some(p) = self.procs.get_mut(&pid) else {
            return;
        };
        p.timer = None;
        match &mut p.eng {
            Eng::Reserve(e) => {
                let cmds = e.on_timer(token, now);
                self.perform_reserve(pid, cmds);
            }
            Eng::Holder(e) => {
                let cmds = e.on_timer(token, now);
                self.perform_holder(pid, cmds);
            }
        }
    }

    /// Perform an engine's sends and timers; what it answers, if it did.
    fn perform<A>(&mut self, pid: u32, cmds: Vec<Cmd<A>>) -> Option<A> {
        let (region, key) = match self.procs.get(&pid) {
            Some(p) => (p.region, p.key),
            None => return None,
        };
        let mut answer = None;
        for c in cmds {
            match c {
                Cmd::Send { round, op } => {
                    // Every proposal fixes a lease on this node's clock: not while it is
                    // in doubt (the engine is abandoned, its withdraws sent).
                    if matches!(op, Op::Propose { .. }) && self.regions[region].fenced {
                        self.abandon(pid);
                        return None;
                    }
                    for to in 0..self.cfg.regions {
                        let ev = Ev::Apply {
                            region: to,
                            from: region,
                            key,
                            op: op.clone(),
                            reply: Some((pid, round)),
                        };
                        self.send(region, to, ev);
                    }
                }
                Cmd::Withdraw { op } | Cmd::Notify { op } => self.broadcast(region, key, op),
                Cmd::Timer { token, at_ms } => {
                    if let Some(p) = self.procs.get_mut(&pid) {
                        p.timer = Some(token);
                    }
                    // Engine time is the node's clock.
                    let skew = self.regions[region].skew_ms;
                    let at = (at_ms as i64 - skew).max(self.now as i64) as u64;
                    self.at(at, Ev::Timer { proc: pid, token });
                }
                Cmd::Answer(a) => answer = Some(a),
            }
        }
        answer
    }

    /// Send `op` to every region, resent a few times; nobody waits for it.
    fn broadcast(&mut self, from: usize, key: u32, op: Op) {
        for to in 0..self.cfg.regions {
            for i in 0..BROADCAST_TRIES {
                if i > 0 && self.rng.chance(0.5) {
                    continue;
                }
                let ev = Ev::Apply {
                    region: to,
                    from,
                    key,
                    op: op.clone(),
                    reply: None,
                };
                let Some(d) = self.delay(from, to) else {
                    continue;
                };
                let later = i as u64 * self.cfg.round_timeout_ms / 2;
                self.at(self.now + d + later, ev);
            }
        }
    }

    /// The caller is gone (its node lost its clock): what the engine must still send
    /// goes out, the client sees UNAVAILABLE.
    fn abandon(&mut self, pid: u32) {
        let Some(mut p) = self.procs.remove(&pid) else {
            return;
        };
        let sends = match &mut p.eng {
            Eng::Reserve(e) => broadcasts(e.abandon()),
            Eng::Holder(e) => broadcasts(e.abandon()),
        };
        for op in sends {
            self.broadcast(p.region, p.key, op);
        }
        if self.clients[p.client as usize].call == p.call {
            self.call_failed(p.client, pid);
        }
    }

    fn perform_reserve(&mut self, pid: u32, cmds: Vec<Cmd<Answer>>) {
        if let Some(a) = self.perform(pid, cmds) {
            if let Some(p) = self.procs.remove(&pid) {
                self.reserve_answered(p.client, p.call, pid, (p.key, p.sent_ms), Ok(a));
            }
        }
    }

    fn perform_holder(&mut self, pid: u32, cmds: Vec<Cmd<HolderAnswer>>) {
        if let Some(a) = self.perform(pid, cmds) {
            if let Some(p) = self.procs.remove(&pid) {
                self.holder_answered(p.client, p.call, a);
            }
        }
    }

    fn new_proc(&mut self, client: u32, key: u32, region: usize, eng: Eng) -> u32 {
        self.next_proc += 1;
        let id = self.next_proc;
        let call = self.clients[client as usize].call;
        self.procs.insert(
            id,
            Proc {
                client,
                key,
                region,
                eng,
                timer: None,
                call,
                sent_ms: self.now,
            },
        );
        id
    }

    /// Whether a claim holds `key` in some region that is up (its lease running, or
    /// ended less than a lease ago), or its completion is not final yet: a Reserve
    /// sent now meets contention.
    fn key_contended(&self, key: u32) -> bool {
        let recent = self.cfg.lease_ms;
        (0..self.cfg.regions).any(|r| {
            let reg = &self.regions[r];
            reg.up
                && reg.records.get(&key).is_some_and(|rec| match rec.phase {
                    Phase::Reserved => self.node_ms(r) < rec.lease_expires_ms + recent,
                    Phase::Completed => !rec.is_final,
                    Phase::Released => false,
                })
        })
    }

    /// A Reserve at `region`, as `Geo::reserve` runs it; `None` once it was answered
    /// at once (the fast path, or no Propose allowed).
    fn start_reserve(&mut self, client: u32, region: usize) -> Option<u32> {
        let (key, fp, first) = {
            let r = self.clients[client as usize].req.as_ref()?;
            (r.key, r.fp, r.first_attempt_ms)
        };
        self.report.attempts += 1;
        self.oracle.reserve_sent(key, fp);
        if self.report.attempts >= self.cfg.reserves {
            self.stopping = true;
        }
        // What the Reserve meets as it is sent; counted once it reaches the rules.
        let met = Met {
            contended: self.any_fault() && self.key_contended(key),
            faults: self
                .active_faults
                .iter()
                .fold(0, |m, &i| m | 1 << self.faults[i].kind as u16),
            outbox_full: self
                .regions
                .iter()
                .any(|reg| reg.outbox.iter().any(|o| o.len() >= self.outbox_max)),
        };
        if !self.regions[region].up {
            // Connection refused: the client tries again.
            self.call_failed_later(client, 5);
            return None;
        }
        let now = self.proposer_ms(region);
        let fingerprint = fingerprint_of(fp);
        let rec = self.regions[region].records.get(&key).cloned();
        let up = |reg: &&Region| reg.up;
        let completed_here = self.regions.iter().filter(up).any(|reg| {
            reg.records
                .get(&key)
                .is_some_and(|x| x.phase == Phase::Completed && x.fingerprint == fingerprint)
        });
        let stale_other = self.regions.iter().filter(up).any(|reg| {
            reg.records
                .get(&key)
                .is_some_and(|x| x.phase == Phase::Reserved && x.fingerprint != fingerprint)
        });
        if completed_here && stale_other {
            self.report.stale_beside_completion += 1;
        }
        // Fast path: a final completion never changes, so this node's copy answers.
        if let Some(r) = rec
            .as_ref()
            .filter(|r| r.phase == Phase::Completed && r.is_final)
        {
            let outcome = if r.fingerprint != fingerprint {
                Some(ReserveOutcome::Mismatch {
                    stored: r.fingerprint,
                })
            } else {
                r.response.clone().map(|response| ReserveOutcome::Replay {
                    fence: r.fence(),
                    response,
                })
            };
            if let Some(outcome) = outcome {
                self.report.count_reserve(&met);
                let call = self.clients[client as usize].call;
                let a = Answer::Decided {
                    outcome,
                    attempt: 0,
                    since_previous_ms: None,
                };
                self.reserve_answered(client, call, 0, (key, self.now), Ok(a));
                return None;
            }
        }
        if self.regions[region].fenced {
            self.call_failed_later(client, 2);
            return None;
        }
        self.report.count_reserve(&met);
        let nonce = self.rng.next_u64() as u32;
        let reg = &mut self.regions[region];
        // The node's hybrid clock: unique and increasing, like `Group::mint`.
        reg.hlc = (reg.hlc + 1).max(now);
        let claim = ClaimId {
            hlc: reg.hlc,
            region: region as u16,
            node: region as u16,
            nonce,
        };
        let call = ReserveCall {
            fingerprint,
            lease_ms: self.cfg.lease_ms,
            retention_ms: RETENTION_MS,
            first_attempt_ms: first,
            deadline_ms: now + self.cfg.reserve_deadline_ms,
        };
        let seed = self.rng.fork();
        let mut e = ReserveEngine::new(self.engine_config(region), call, claim, seed);
        let cmds = e.start(now, first_generation(rec.as_ref(), now));
        let pid = self.new_proc(client, key, region, Eng::Reserve(e));
        self.perform_reserve(pid, cmds);
        Some(pid)
    }

    fn call_failed_later(&mut self, client: u32, ms: u64) {
        let c = &mut self.clients[client as usize];
        c.stage = Stage::Idle;
        c.wake += 1;
        let wake = c.wake;
        self.at(self.now + ms + 100, Ev::Client { client, wake });
    }

    /// The client's call failed (a broken connection, a node that refused it).
    fn call_failed(&mut self, client: u32, pid: u32) {
        match self.clients[client as usize].stage.clone() {
            Stage::Reserving { procs, .. } => {
                if procs
                    .iter()
                    .any(|p| self.procs.contains_key(p) && *p != pid)
                {
                    return; // a hedged twin is still running
                }
                let call = self.clients[client as usize].call;
                self.reserve_answered(client, call, pid, (0, 0), Err(()));
            }
            Stage::Completing {
                fence,
                trusted_until,
                response,
                ..
            } => self.retry_complete(client, fence, trusted_until, response),
            Stage::Extending {
                fence,
                trusted_until,
                ..
            } => {
                self.clients[client as usize].stage = Stage::Working {
                    fence,
                    trusted_until,
                };
                self.after_work(client);
            }
            Stage::Releasing => self.finish_request(client),
            _ => {}
        }
    }

    // ---- clients ----

    fn client_step(&mut self, client: u32) {
        let c = &self.clients[client as usize];
        match c.stage.clone() {
            Stage::Idle => {
                if c.req.is_none() {
                    if self.stopping {
                        return;
                    }
                    self.new_request(client);
                }
                self.reserve(client);
            }
            Stage::Working { .. } => self.after_work(client),
            Stage::Completing {
                proc: 0,
                fence,
                trusted_until,
                response,
            } => self.retry_complete(client, fence, trusted_until, response),
            _ => {}
        }
    }

    fn new_request(&mut self, client: u32) {
        let hot = !self.hot.is_empty() && self.rng.chance(0.6);
        let key = if hot {
            self.hot[self.rng.below(self.hot.len() as u64) as usize]
        } else {
            self.next_key += 1;
            self.next_key
        };
        // Usually the key's one request; now and then another body under the same key.
        let fp = if self.rng.chance(0.03) {
            (key as u64) << 1 | 1
        } else {
            (key as u64) << 1
        };
        self.clients[client as usize].req = Some(Request {
            key,
            fp,
            first_attempt_ms: self.now,
            tries: 0,
        });
    }

    fn reserve(&mut self, client: u32) {
        let n = self.cfg.regions;
        let (home, tries) = {
            let c = &mut self.clients[client as usize];
            let Some(r) = c.req.as_mut() else {
                return;
            };
            r.tries += 1;
            (c.home, r.tries)
        };
        if tries > 40 {
            // The SDK's retry budget is spent: the call fails to the application.
            self.finish_request(client);
            return;
        }
        // Retries go through another region now and then (anycast moved, a failover).
        let region = if tries > 1 && self.rng.chance(0.3) {
            self.rng.below(n as u64) as usize
        } else {
            home
        };
        self.clients[client as usize].call += 1;
        let sent_ms = self.now;
        self.clients[client as usize].stage = Stage::Reserving {
            procs: Vec::new(),
            sent_ms,
        };
        let mut procs = Vec::new();
        if let Some(p) = self.start_reserve(client, region) {
            procs.push(p);
        }
        // A hedged request: the same Reserve through a second region at once.
        if matches!(self.clients[client as usize].stage, Stage::Reserving { .. })
            && self.rng.chance(0.05)
        {
            let other = (region + 1 + self.rng.below(n as u64 - 1) as usize) % n;
            if let Some(p) = self.start_reserve(client, other) {
                procs.push(p);
            }
        }
        if let Stage::Reserving { procs: ps, .. } = &mut self.clients[client as usize].stage {
            ps.extend(procs);
        }
    }

    /// A Reserve's answer (`Err`: the call failed without one).
    /// `sent`: the proc's key and when it was sent (a NEW is judged by them).
    fn reserve_answered(
        &mut self,
        client: u32,
        call: u32,
        pid: u32,
        sent: (u32, u64),
        a: Result<Answer, ()>,
    ) {
        let c = &self.clients[client as usize];
        let waiting = match &c.stage {
            Stage::Reserving { procs, sent_ms } if c.call == call => {
                Some((procs.clone(), *sent_ms))
            }
            _ => None,
        };
        let Some((procs, sent_ms)) = waiting else {
            // A hedged twin answering after the first, or a call the client gave up
            // on: a NEW still counts as a grant.
            if let Ok(Answer::Decided {
                outcome: ReserveOutcome::New { fence, .. },
                ..
            }) = &a
            {
                self.late_grant(client, sent, *fence);
            }
            return;
        };
        let Some(req) = c.req.as_ref() else {
            return;
        };
        let (key, fp) = (req.key, req.fp);
        if self.cfg.trace_key == Some(key) {
            println!(
                "{:>8} client {client} proc {pid} (sent {sent_ms}) answered {a:?}",
                self.now
            );
        }
        let twin_running = procs
            .iter()
            .any(|p| *p != pid && self.procs.contains_key(p));
        let now = self.now;
        match a {
            Ok(Answer::Decided { outcome, .. }) => match outcome {
                ReserveOutcome::New {
                    fence, takeover, ..
                } => {
                    self.report.new += 1;
                    if takeover.is_some() {
                        self.report.takeovers += 1;
                    }
                    // The SDK trusts the lease from the moment it sent the Reserve,
                    // less the margin, and never returns a NEW already inside it.
                    let trusted_until = sent_ms + self.cfg.lease_ms - self.cfg.skew_margin_ms;
                    if now >= trusted_until {
                        self.retry_reserve(client, 50);
                        return;
                    }
                    let faulted = self.any_fault();
                    self.oracle
                        .grant(key, fence_id(&fence), client, now, trusted_until, faulted);
                    self.clients[client as usize].stage = Stage::Working {
                        fence,
                        trusted_until,
                    };
                    // The work: usually well inside the lease; now and then a holder
                    // that pauses past it.
                    let lease = self.cfg.lease_ms;
                    let pausing =
                        self.active(FaultKind::Pause).next().is_some() && self.rng.chance(0.3);
                    let work = if pausing {
                        lease + self.rng.below(lease)
                    } else {
                        self.rng.between(1, lease / 3)
                    };
                    self.wake_after(client, work);
                }
                ReserveOutcome::Replay { response, .. } => {
                    self.report.replay += 1;
                    self.oracle.replay(key, fp, response_id(&response), now);
                    self.finish_request(client);
                }
                ReserveOutcome::Mismatch { .. } => {
                    self.report.mismatch += 1;
                    self.oracle.mismatch(key, fp, sent_ms, now);
                    self.finish_request(client);
                }
                ReserveOutcome::InFlight { retry_after_ms, .. } => {
                    self.report.in_flight += 1;
                    if !twin_running {
                        let wait = retry_after_ms.clamp(20, 2_000);
                        self.retry_reserve(client, wait);
                    }
                }
                ReserveOutcome::TooOld { .. } | ReserveOutcome::StaleGen { .. } => {
                    self.finish_request(client)
                }
            },
            Ok(Answer::Unavailable { .. }) | Err(()) => {
                self.report.unavailable += 1;
                if !twin_running {
                    let wait = 50 + self.rng.below(400);
                    self.retry_reserve(client, wait);
                }
            }
        }
    }

    /// A NEW the client no longer waited for (a hedged twin answering second, or the
    /// answer to a call it gave up on): a grant all the same, trusted as the SDK would.
    fn late_grant(&mut self, client: u32, (key, sent_ms): (u32, u64), fence: Fence) {
        self.report.new += 1;
        let trusted_until = sent_ms + self.cfg.lease_ms - self.cfg.skew_margin_ms;
        if self.now >= trusted_until {
            return;
        }
        let faulted = self.any_fault();
        self.oracle.grant(
            key,
            fence_id(&fence),
            client,
            self.now,
            trusted_until,
            faulted,
        );
    }

    fn retry_reserve(&mut self, client: u32, wait: u64) {
        let c = &mut self.clients[client as usize];
        c.stage = Stage::Idle;
        c.wake += 1;
        let wake = c.wake;
        self.at(self.now + wait, Ev::Client { client, wake });
    }

    fn wake_after(&mut self, client: u32, ms: u64) {
        let c = &mut self.clients[client as usize];
        c.wake += 1;
        let wake = c.wake;
        self.at(self.now + ms, Ev::Client { client, wake });
    }

    /// The holder's work is done (or it woke from a pause): Complete, mostly.
    fn after_work(&mut self, client: u32) {
        let Stage::Working {
            fence,
            trusted_until,
        } = self.clients[client as usize].stage.clone()
        else {
            return;
        };
        let Some((key, fp)) = self.clients[client as usize]
            .req
            .as_ref()
            .map(|r| (r.key, r.fp))
        else {
            return;
        };
        let roll = self.rng.below(100);
        let home = self.clients[client as usize].home;
        if roll < 6 {
            // Release: the holder stops trusting its lease as it sends it.
            self.oracle.close(key, fence_id(&fence), self.now);
            self.clients[client as usize].call += 1;
            let pid = self.start_holder(client, key, home, HolderCall::Release { fence });
            match pid {
                Some(_) => self.clients[client as usize].stage = Stage::Releasing,
                None => self.finish_request(client),
            }
        } else if roll < 12 && self.now + self.cfg.skew_margin_ms < trusted_until {
            self.clients[client as usize].call += 1;
            let until_ms = self.proposer_ms(home) + self.cfg.lease_ms;
            let call = HolderCall::Extend {
                fence,
                lease_ms: self.cfg.lease_ms,
                until_ms,
            };
            let sent_ms = self.now;
            match self.start_holder(client, key, home, call) {
                Some(_) => {
                    self.clients[client as usize].stage = Stage::Extending {
                        fence,
                        sent_ms,
                        trusted_until,
                    }
                }
                None => {
                    let w = self.rng.between(1, 100);
                    self.wake_after(client, w);
                }
            }
        } else if roll < 15 {
            // The client crashes: nothing more is sent; its lease runs out.
            self.oracle.close(key, fence_id(&fence), trusted_until);
            self.finish_request(client);
        } else {
            let response = (key as u64) << 32 ^ fence_id(&fence).1 ^ fp;
            self.oracle.completion_sent(key, fp, response);
            self.retry_complete(client, fence, trusted_until, response);
        }
    }

    fn retry_complete(&mut self, client: u32, fence: Fence, trusted_until: u64, response: u64) {
        let Some(key) = self.clients[client as usize].req.as_ref().map(|r| r.key) else {
            return;
        };
        if self.now >= trusted_until {
            // The holder no longer trusts its lease: it stops retrying (the outcome
            // is unknown to it).
            self.oracle.close(key, fence_id(&fence), trusted_until);
            self.finish_request(client);
            return;
        }
        let call = HolderCall::Complete {
            fence,
            response: StoredResponse {
                status: 200,
                headers: Vec::new(),
                body: body_of(response),
            },
        };
        let home = self.clients[client as usize].home;
        self.clients[client as usize].call += 1;
        match self.start_holder(client, key, home, call) {
            Some(proc) => {
                self.clients[client as usize].stage = Stage::Completing {
                    proc,
                    fence,
                    trusted_until,
                    response,
                }
            }
            None => {
                // No node to take it now: the holder tries again shortly.
                self.clients[client as usize].stage = Stage::Completing {
                    proc: 0,
                    fence,
                    trusted_until,
                    response,
                };
                let w = self.rng.between(50, 300);
                self.wake_after(client, w);
            }
        }
    }

    fn start_holder(
        &mut self,
        client: u32,
        key: u32,
        region: usize,
        call: HolderCall,
    ) -> Option<u32> {
        if !self.regions[region].up || self.regions[region].fenced {
            return None;
        }
        let now = self.proposer_ms(region);
        let mut e = HolderEngine::new(self.engine_config(region), call);
        let cmds = e.start(now);
        let pid = self.new_proc(client, key, region, Eng::Holder(e));
        self.perform_holder(pid, cmds);
        Some(pid)
    }

    fn holder_answered(&mut self, client: u32, call: u32, a: HolderAnswer) {
        if self.clients[client as usize].call != call {
            return;
        }
        let Some((key, fp)) = self.clients[client as usize]
            .req
            .as_ref()
            .map(|r| (r.key, r.fp))
        else {
            return;
        };
        let now = self.now;
        match self.clients[client as usize].stage.clone() {
            Stage::Completing {
                fence,
                trusted_until,
                response,
                ..
            } => match a {
                HolderAnswer::Stored { .. } => {
                    self.report.completions_acked += 1;
                    self.oracle
                        .completion_acked(key, fence_id(&fence), fp, response, now);
                    // A hot key that is done: the race moves to a fresh key.
                    if let Some(slot) = self.hot.iter().position(|&k| k == key) {
                        self.next_key += 1;
                        self.hot[slot] = self.next_key;
                    }
                    self.finish_request(client);
                }
                HolderAnswer::Refused(_) => {
                    self.oracle.close(key, fence_id(&fence), now);
                    self.finish_request(client);
                }
                HolderAnswer::Unknown { .. } => {
                    self.retry_complete(client, fence, trusted_until, response)
                }
            },
            Stage::Extending {
                fence,
                sent_ms,
                trusted_until,
                ..
            } => {
                let trusted_until = match a {
                    HolderAnswer::Stored { .. } => {
                        let t = sent_ms + self.cfg.lease_ms - self.cfg.skew_margin_ms;
                        self.oracle.extend(key, fence_id(&fence), t);
                        trusted_until.max(t)
                    }
                    HolderAnswer::Refused(Refusal::LeaseLost { .. }) => {
                        self.oracle.close(key, fence_id(&fence), now);
                        self.finish_request(client);
                        return;
                    }
                    _ => trusted_until,
                };
                self.clients[client as usize].stage = Stage::Working {
                    fence,
                    trusted_until,
                };
                let w = self.rng.between(1, self.cfg.lease_ms / 4);
                self.wake_after(client, w);
            }
            Stage::Releasing => self.finish_request(client),
            _ => {}
        }
    }

    fn finish_request(&mut self, client: u32) {
        let reuse = self.rng.chance(0.1);
        let c = &mut self.clients[client as usize];
        // Now and then the same request again later (a retry after the application
        // thought it failed): it must REPLAY, or be NEW only after a Release.
        if reuse {
            if let Some(r) = c.req.as_mut() {
                r.tries = 0;
            }
        } else {
            c.req = None;
        }
        c.stage = Stage::Idle;
        c.wake += 1;
        let wake = c.wake;
        let think = self.rng.between(10, 1_000);
        self.at(self.now + think, Ev::Client { client, wake });
    }

    /// After healing: every region holds the same records, every acknowledged
    /// completion is final everywhere with its response, and no key is held.
    fn final_checks(&mut self) {
        let n = self.cfg.regions;
        // Every key a region holds, and every key with an acknowledged completion (one
        // lost from every region is a lost completion too).
        let mut keys: Vec<u32> = self
            .regions
            .iter()
            .flat_map(|r| r.records.keys().copied())
            .chain(self.oracle.acked_keys())
            .collect();
        keys.sort_unstable();
        keys.dedup();
        for k in keys {
            let first = self.regions[0].records.get(&k);
            for r in 1..n {
                let other = self.regions[r].records.get(&k);
                let same = match (first, other) {
                    (Some(a), Some(b)) => same_replicated(a, b),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    self.report.violations.push(Violation {
                        kind: "divergence",
                        key: k,
                        at_ms: self.now,
                        detail: format!(
                            "region 0 holds {:?}, region {r} {:?}",
                            first.map(|x| (x.phase, x.generation, x.is_final)),
                            other.map(|x| (x.phase, x.generation, x.is_final))
                        ),
                    });
                    break;
                }
            }
            for r in 0..n {
                if let Some(rec) = self.regions[r].records.get(&k) {
                    let live =
                        rec.phase == Phase::Reserved && rec.lease_expires_ms > self.node_ms(r);
                    if live {
                        self.report.violations.push(Violation {
                            kind: "liveness",
                            key: k,
                            at_ms: self.now,
                            detail: format!("region {r} still holds the key after healing"),
                        });
                    }
                    if let (Phase::Completed, Some(resp)) = (rec.phase, rec.response.as_ref()) {
                        if rec.is_final {
                            self.oracle.final_read(k, r as u32, Some(response_id(resp)));
                        } else {
                            self.oracle.final_read(k, r as u32, None);
                        }
                    } else {
                        self.oracle.final_read(k, r as u32, None);
                    }
                } else {
                    self.oracle.final_read(k, r as u32, None);
                }
            }
        }
    }
}

/// The withdraws and notices among an engine's commands: what an abandoned engine
/// must still send.
fn broadcasts<A>(cmds: Vec<Cmd<A>>) -> Vec<Op> {
    cmds.into_iter()
        .filter_map(|c| match c {
            Cmd::Withdraw { op } | Cmd::Notify { op } => Some(op),
            _ => None,
        })
        .collect()
}

pub fn run_seed(cfg: &SimConfig, seed: u64) -> Report {
    Sim::new(cfg.clone(), seed).run()
}

/// A smaller run of a failing seed that still shows its first violation's kind: fewer
/// Reserves (halved while the violation stays), then the faults of the schedule
/// dropped one at a time while it stays. (The schedule is drawn over the time the
/// Reserves take, so the Reserves are cut first and the faults then dropped from the
/// schedule of that run.) Returns the configuration, its report and the kind.
pub fn shrink(cfg: &SimConfig, seed: u64) -> (SimConfig, Report, &'static str) {
    let first = run_seed(cfg, seed);
    let Some(kind) = first.violations.first().map(|v| v.kind) else {
        return (cfg.clone(), first, "");
    };
    let shows = |r: &Report| r.violations.iter().any(|v| v.kind == kind);
    let mut best = (cfg.clone(), first);
    loop {
        let mut c = best.0.clone();
        c.reserves /= 2;
        if c.reserves < 10 {
            break;
        }
        let r = run_seed(&c, seed);
        if !shows(&r) {
            break;
        }
        best = (c, r);
    }
    for i in 0..best.1.faults.len() {
        let mut c = best.0.clone();
        c.drop_faults.push(i);
        let r = run_seed(&c, seed);
        if shows(&r) {
            best = (c, r);
        }
    }
    (best.0, best.1, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig {
            reserves: 600,
            clients: 12,
            ..SimConfig::default()
        }
    }

    #[test]
    fn one_seed_gives_one_trace_and_another_seed_another() {
        let cfg = small();
        let a = run_seed(&cfg, 11);
        let b = run_seed(&cfg, 11);
        assert_eq!(a.trace_hash, b.trace_hash);
        assert_eq!((a.events, a.reserves, a.new), (b.events, b.reserves, b.new));
        assert_eq!(a.violations, b.violations);
        let c = run_seed(&cfg, 12);
        assert_ne!(a.trace_hash, c.trace_hash);
    }

    #[test]
    fn runs_without_faults_keep_every_promise_and_do_real_work() {
        let cfg = SimConfig {
            faults: false,
            ..small()
        };
        for seed in 0..5 {
            let r = run_seed(&cfg, seed);
            assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
            assert!(
                r.reserves >= cfg.reserves,
                "seed {seed}: {} reserves",
                r.reserves
            );
            assert!(
                r.new > 50 && r.completions_acked > 50 && r.replay > 10,
                "seed {seed}: {r:?}"
            );
        }
    }

    #[test]
    fn a_retry_of_a_completed_request_is_never_told_mismatch_by_a_stale_region() {
        // Seeds once answered a retry of a request whose completion was acknowledged
        // MISMATCH: one region still held another request's stale accept and the
        // proposer took its reply alone (protocol §3, row 3; the tally's unit tests pin
        // the rule). Across these seeds Reserves meet that case and MISMATCH is
        // answered, always rightly.
        let (mut mismatches, mut met) = (0, 0);
        for seed in 0..40 {
            let r = run_seed(&SimConfig::default(), seed);
            let wrong: Vec<_> = r
                .violations
                .iter()
                .filter(|v| v.kind == "wrong_mismatch")
                .collect();
            assert!(wrong.is_empty(), "seed {seed}: {wrong:?}");
            mismatches += r.mismatch;
            met += r.stale_beside_completion;
        }
        assert!(mismatches > 100, "only {mismatches} MISMATCH answers");
        assert!(
            met > 0,
            "no Reserve met a stale accept beside its own completion"
        );
    }

    #[test]
    fn a_rebuilt_region_that_votes_at_once_breaks_promises_and_the_quarantine_rule_does_not() {
        // Seeds 1943, 360 and 2573 rebuild a region from nothing while it holds a lease
        // or a completion others rely on: with the rule the servers run today it votes
        // at once (docs/protocol.md, open points): a second grant (1943), a NEW after an
        // acknowledged completion (360), an acknowledged completion lost (2573). Kept
        // out of proposals until the lease has ended and it pulled the others, it breaks
        // none of these three.
        for (seed, kind) in [
            (1943, "double_grant"),
            (360, "new_after_completion"),
            (2573, "lost_completion"),
        ] {
            let found = |quarantine| {
                let cfg = SimConfig {
                    rebuild_quarantine: quarantine,
                    ..SimConfig::default()
                };
                run_seed(&cfg, seed).violations
            };
            let without = found(false);
            assert!(
                without.iter().any(|v| v.kind == kind),
                "seed {seed} no longer shows {kind}: {without:?}"
            );
            let with = found(true);
            assert!(with.is_empty(), "seed {seed} with the quarantine: {with:?}");
        }
    }

    #[test]
    fn new_on_the_local_accept_alone_is_caught_as_a_double_grant() {
        let cfg = SimConfig {
            rule: Rule::BrokenLocalAccept,
            ..small()
        };
        let caught = (0..20).find(|&seed| {
            run_seed(&cfg, seed)
                .violations
                .iter()
                .any(|v| v.kind == "double_grant")
        });
        assert!(caught.is_some(), "20 seeds found no double grant");
    }
}
