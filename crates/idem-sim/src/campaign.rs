//! The campaign: seeds run in chunks on every core until a target number of Reserves
//! (and of contended Reserves) has been simulated, every chunk recorded in a ledger so
//! that a stopped campaign resumes where it stopped. The ledger starts with the
//! simulator's behaviour digest (the trace hashes of a fixed set of seeds): a build that
//! behaves differently refuses to add to it, so every chunk of one ledger was judged by
//! the same rules.

use crate::sim::{run_seed, FaultKind, Report, SimConfig};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

/// Seeds per chunk (about two million Reserves, a few seconds on one core).
pub const CHUNK_SEEDS: u64 = 1_000;

/// What many runs did, summed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub seeds: u64,
    pub attempts: u64,
    pub reserves: u64,
    pub contended: u64,
    pub new: u64,
    pub replay: u64,
    pub in_flight: u64,
    pub mismatch: u64,
    pub unavailable: u64,
    pub completions_acked: u64,
    pub takeovers: u64,
    pub outbox_skipped: u64,
    pub events: u64,
    pub sim_ms: u64,
    pub coverage: BTreeMap<String, u64>,
    /// Seeds that found a violation.
    pub failed: Vec<u64>,
}

impl Totals {
    pub fn of(r: &Report) -> Totals {
        Totals {
            seeds: 1,
            attempts: r.attempts,
            reserves: r.reserves,
            contended: r.contended,
            new: r.new,
            replay: r.replay,
            in_flight: r.in_flight,
            mismatch: r.mismatch,
            unavailable: r.unavailable,
            completions_acked: r.completions_acked,
            takeovers: r.takeovers,
            outbox_skipped: r.outbox_skipped,
            events: r.events,
            sim_ms: r.sim_ms,
            coverage: r.coverage.clone(),
            failed: if r.violations.is_empty() {
                Vec::new()
            } else {
                vec![r.seed]
            },
        }
    }

    pub fn add(&mut self, r: &Report) {
        self.merge(&Totals::of(r));
    }

    pub fn merge(&mut self, o: &Totals) {
        self.seeds += o.seeds;
        self.attempts += o.attempts;
        self.reserves += o.reserves;
        self.contended += o.contended;
        self.new += o.new;
        self.replay += o.replay;
        self.in_flight += o.in_flight;
        self.mismatch += o.mismatch;
        self.unavailable += o.unavailable;
        self.completions_acked += o.completions_acked;
        self.takeovers += o.takeovers;
        self.outbox_skipped += o.outbox_skipped;
        self.events += o.events;
        self.sim_ms += o.sim_ms;
        for (k, v) in &o.coverage {
            *self.coverage.entry(k.clone()).or_default() += v;
        }
        self.failed.extend(&o.failed);
    }
}

/// The configuration a chunk runs: three regions, every fourth chunk five; no region is
/// rebuilt from nothing (the open point of docs/protocol.md: `make sim-rebuild`).
pub fn chunk_config(chunk: u64) -> SimConfig {
    SimConfig {
        regions: if chunk % 4 == 3 { 5 } else { 3 },
        without: vec![FaultKind::Rebuild],
        ..SimConfig::default()
    }
}

/// Bumped whenever what a run judges or counts changes without changing its events
/// (an oracle check, an invariant, what counts as a Reserve or as contended): the
/// digest covers it, so such a change starts a new ledger too.
pub const JUDGE_VERSION: u64 = 1;

/// The simulator's behaviour digest: the trace hashes, counters and violations of the
/// first eight seeds of chunks 0 and 3 (three and five regions), and `JUDGE_VERSION`.
/// A change to the rules, the fault mix, the clients or the counting changes it.
pub fn behaviour_digest() -> u64 {
    let mut d: u64 = 0xcbf2_9ce4_8422_2325 ^ JUDGE_VERSION;
    let mut mix = |v: u64| d = (d ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(17);
    for chunk in [0u64, 3] {
        let cfg = chunk_config(chunk);
        for seed in 0..8 {
            let r = run_seed(&cfg, chunk * CHUNK_SEEDS + seed);
            for v in Chunk::counters(&Totals::of(&r)) {
                mix(v);
            }
            mix(r.trace_hash);
            mix(r.violations.len() as u64);
        }
    }
    d
}

/// One ledger line: a chunk done.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Chunk {
    pub chunk: u64,
    pub regions: usize,
    pub secs: f64,
    pub totals: Totals,
}

impl Chunk {
    /// The counters of a ledger line, in column order (after chunk and regions).
    fn counters(t: &Totals) -> [u64; 14] {
        [
            t.seeds,
            t.attempts,
            t.reserves,
            t.contended,
            t.new,
            t.replay,
            t.in_flight,
            t.mismatch,
            t.unavailable,
            t.completions_acked,
            t.takeovers,
            t.outbox_skipped,
            t.events,
            t.sim_ms,
        ]
    }

    fn line(&self) -> String {
        let t = &self.totals;
        let failed = if t.failed.is_empty() {
            "-".to_string()
        } else {
            let seeds: Vec<String> = t.failed.iter().map(u64::to_string).collect();
            seeds.join(",")
        };
        let cov: Vec<String> = t.coverage.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let counters: Vec<String> = Chunk::counters(t).iter().map(u64::to_string).collect();
        format!(
            "{}\t{}\t{}\t{:.1}\t{}\t{}",
            self.chunk,
            self.regions,
            counters.join("\t"),
            self.secs,
            failed,
            cov.join(",")
        )
    }

    fn parse(line: &str) -> Option<Chunk> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 19 {
            return None;
        }
        let mut c = [0u64; 14];
        for (i, v) in c.iter_mut().enumerate() {
            *v = f[2 + i].parse().ok()?;
        }
        let [seeds, attempts, reserves, contended, new, replay, in_flight, mismatch, unavailable, completions_acked, takeovers, outbox_skipped, events, sim_ms] =
            c;
        let failed = if f[17] == "-" {
            Vec::new()
        } else {
            f[17]
                .split(',')
                .map(|s| s.parse().ok())
                .collect::<Option<Vec<u64>>>()?
        };
        let mut coverage = BTreeMap::new();
        for kv in f[18].split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=')?;
            coverage.insert(k.to_string(), v.parse().ok()?);
        }
        Some(Chunk {
            chunk: f[0].parse().ok()?,
            regions: f[1].parse().ok()?,
            secs: f[16].parse().ok()?,
            totals: Totals {
                seeds,
                attempts,
                reserves,
                contended,
                new,
                replay,
                in_flight,
                mismatch,
                unavailable,
                completions_acked,
                takeovers,
                outbox_skipped,
                events,
                sim_ms,
                coverage,
                failed,
            },
        })
    }
}

const HEADER: &str = "# idem-sim campaign ledger: one line per chunk of seeds done";
const COLUMNS: &str = "# chunk\tregions\tseeds\tattempts\treserves\tcontended\tnew\treplay\tin_flight\tmismatch\tunavailable\tcompletions_acked\ttakeovers\toutbox_skipped\tevents\tsim_ms\tsecs\tfailed_seeds\tcoverage";

/// A ledger read from disk: its behaviour digest, where it was started, its chunks.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    pub digest: Option<u64>,
    pub started: Vec<String>,
    pub chunks: BTreeMap<u64, Chunk>,
}

impl Ledger {
    pub fn read(path: &Path) -> Result<Ledger, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ledger::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let mut l = Ledger::default();
        // A last line without its newline was cut short by a killed run: its chunk
        // runs again.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        for line in complete.lines() {
            if let Some(d) = line.strip_prefix("# behaviour ") {
                let hex = d.split_whitespace().next().unwrap_or_default();
                l.digest = Some(
                    u64::from_str_radix(hex, 16)
                        .map_err(|_| format!("{}: bad behaviour digest {d}", path.display()))?,
                );
            } else if let Some(s) = line.strip_prefix("# started ") {
                l.started.push(s.to_string());
            } else if line.starts_with('#') || line.trim().is_empty() {
            } else if let Some(c) = Chunk::parse(line) {
                l.chunks.insert(c.chunk, c);
            } else {
                return Err(format!(
                    "{}: a line that is not a chunk of this format: {line}",
                    path.display()
                ));
            }
        }
        if l.digest.is_none() && !l.chunks.is_empty() {
            return Err(format!(
                "{}: chunks without a behaviour digest: not a ledger this simulator wrote",
                path.display()
            ));
        }
        Ok(l)
    }

    pub fn totals(&self) -> Totals {
        sum(self.chunks.values())
    }
}

/// What a campaign aims at and how it runs.
#[derive(Clone, Debug)]
pub struct Plan {
    pub reserves: u64,
    pub contended: u64,
    pub jobs: usize,
    /// Where the campaign was started from (recorded in the ledger).
    pub label: String,
}

struct Shared {
    next: u64,
    done: BTreeMap<u64, Chunk>,
    file: std::fs::File,
    started: Instant,
    reserves_this_run: u64,
}

/// Run chunks until the ledger holds `plan.reserves` Reserves and `plan.contended`
/// contended ones; returns the ledger as it ends.
pub fn run(path: &Path, plan: &Plan) -> Result<Ledger, String> {
    let digest = behaviour_digest();
    let ledger = Ledger::read(path)?;
    if let Some(d) = ledger.digest {
        if d != digest {
            return Err(format!(
                "{}: this ledger was started by a simulator that behaves differently (digest {d:016x}, this build {digest:016x}); every chunk of one ledger must be judged by the same rules: start a new ledger (another path) or remove this one",
                path.display()
            ));
        }
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let mut head = String::new();
    if !existing.is_empty() && !existing.ends_with('\n') {
        // A line cut short by a killed run: end it, so the next line starts clean.
        head.push('\n');
    }
    if ledger.digest.is_none() {
        let _ = writeln!(head, "{HEADER}");
        let _ = writeln!(head, "# behaviour {digest:016x}");
        let _ = writeln!(head, "{COLUMNS}");
    }
    let _ = writeln!(head, "# started {} {}", utc_now(), plan.label);
    file.write_all(head.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let shared = Mutex::new(Shared {
        next: 0,
        done: ledger.chunks.clone(),
        file,
        started: Instant::now(),
        reserves_this_run: 0,
    });
    let reached = |done: &BTreeMap<u64, Chunk>| {
        let t = sum(done.values());
        t.reserves >= plan.reserves && t.contended >= plan.contended
    };
    let error = Mutex::new(None::<String>);
    std::thread::scope(|s| {
        for _ in 0..plan.jobs.max(1) {
            s.spawn(|| loop {
                let chunk = {
                    let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
                    if reached(&sh.done) || error.lock().map(|e| e.is_some()).unwrap_or(true) {
                        return;
                    }
                    while sh.done.contains_key(&sh.next) {
                        sh.next += 1;
                    }
                    sh.next += 1;
                    sh.next - 1
                };
                let cfg = chunk_config(chunk);
                let t0 = Instant::now();
                let mut totals = Totals::default();
                for seed in chunk * CHUNK_SEEDS..(chunk + 1) * CHUNK_SEEDS {
                    match run_caught(&cfg, seed) {
                        Some(r) => totals.add(&r),
                        // A panic inside the rules or the simulator is a finding: the
                        // seed fails (its message went to stderr).
                        None => {
                            totals.seeds += 1;
                            totals.failed.push(seed);
                        }
                    }
                }
                let c = Chunk {
                    chunk,
                    regions: cfg.regions,
                    secs: t0.elapsed().as_secs_f64(),
                    totals,
                };
                let mut sh = shared.lock().unwrap_or_else(|p| p.into_inner());
                let line = format!("{}\n", c.line());
                if let Err(e) = sh.file.write_all(line.as_bytes()).and_then(|_| sh.file.flush()) {
                    if let Ok(mut slot) = error.lock() {
                        *slot = Some(format!("{}: {e}", path.display()));
                    }
                    return;
                }
                sh.reserves_this_run += c.totals.reserves;
                let rate = sh.reserves_this_run as f64 / sh.started.elapsed().as_secs_f64();
                let failed = c.totals.failed.clone();
                sh.done.insert(chunk, c);
                let t = sum(sh.done.values());
                let left = plan.reserves.saturating_sub(t.reserves) as f64 / rate.max(1.0);
                println!(
                    "chunk {chunk} ({} regions): {} Reserves; total {} of {} ({:.1}%), {} contended; {:.0} Reserves/s on {} cores; about {:.0} min left{}",
                    cfg.regions,
                    sh.done[&chunk].totals.reserves,
                    t.reserves,
                    plan.reserves,
                    100.0 * t.reserves as f64 / plan.reserves as f64,
                    t.contended,
                    rate,
                    plan.jobs,
                    left / 60.0,
                    if failed.is_empty() {
                        String::new()
                    } else {
                        format!("; VIOLATIONS in seeds {failed:?}")
                    }
                );
            });
        }
    });
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ledger::read(path)
}

/// One seed, a panic caught (`None`).
fn run_caught(cfg: &SimConfig, seed: u64) -> Option<Report> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_seed(cfg, seed))).ok()
}

fn sum<'a>(chunks: impl Iterator<Item = &'a Chunk>) -> Totals {
    let mut t = Totals::default();
    for c in chunks {
        t.merge(&c.totals);
    }
    t
}

/// The broken-variant ledger: one line per variant hunted (`make sim-broken`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hunt {
    pub variant: String,
    pub expect: String,
    /// The first seed that showed the expected violation, if any within the budget.
    pub seed: Option<u64>,
    pub seeds_run: u64,
    pub budget: u64,
    pub reserves: u64,
    pub kinds: String,
}

impl Hunt {
    pub fn line(&self) -> String {
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.variant,
            self.expect,
            self.seed.map_or("-".to_string(), |s| s.to_string()),
            self.seeds_run,
            self.budget,
            self.reserves,
            self.kinds
        )
    }

    pub fn parse(line: &str) -> Option<Hunt> {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 7 {
            return None;
        }
        Some(Hunt {
            variant: f[0].to_string(),
            expect: f[1].to_string(),
            seed: f[2].parse().ok(),
            seeds_run: f[3].parse().ok()?,
            budget: f[4].parse().ok()?,
            reserves: f[5].parse().ok()?,
            kinds: f[6].to_string(),
        })
    }
}

/// Run seeds from `seeds.start` until one shows a violation of kind `expect`, at most
/// to `seeds.end`.
pub fn hunt(variant: &str, expect: &str, seeds: std::ops::Range<u64>) -> Hunt {
    let cfg = chunk_config(0);
    let mut reserves = 0;
    let mut run = 0;
    for seed in seeds.clone() {
        let Some(r) = run_caught(&cfg, seed) else {
            run += 1;
            continue;
        };
        reserves += r.reserves;
        run += 1;
        if r.violations.iter().any(|v| v.kind == expect) {
            let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
            for v in &r.violations {
                *kinds.entry(v.kind).or_default() += 1;
            }
            let kinds = kinds
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            return Hunt {
                variant: variant.to_string(),
                expect: expect.to_string(),
                seed: Some(seed),
                seeds_run: run,
                budget: seeds.end - seeds.start,
                reserves,
                kinds,
            };
        }
    }
    Hunt {
        variant: variant.to_string(),
        expect: expect.to_string(),
        seed: None,
        seeds_run: run,
        budget: seeds.end - seeds.start,
        reserves,
        kinds: String::new(),
    }
}

/// Replace the line of `h.variant` in the broken-variant ledger (one line per variant).
pub fn record_hunt(path: &Path, h: &Hunt) -> Result<(), String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut out = String::from(
        "# idem-sim broken variants: variant\texpected violation\tfirst seed\tseeds run\tbudget\tReserves run\tviolations of that seed\n",
    );
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        match Hunt::parse(line) {
            Some(o) if o.variant == h.variant => {}
            Some(_) => {
                out.push_str(line);
                out.push('\n');
            }
            None => return Err(format!("{}: not a hunt line: {line}", path.display())),
        }
    }
    out.push_str(&h.line());
    out.push('\n');
    // Written beside it and renamed over it: a killed run leaves the old file whole.
    let tmp = path.with_extension("tsv.tmp");
    std::fs::write(&tmp, out)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The campaign's result as Markdown: totals, the bound, coverage, the broken variants.
pub fn report(ledger: &Ledger, hunts: &[Hunt], command: &str, plan: &Plan) -> String {
    let t = ledger.totals();
    let secs: f64 = ledger.chunks.values().map(|c| c.secs).sum();
    let mut by_regions: BTreeMap<usize, Totals> = BTreeMap::new();
    for c in ledger.chunks.values() {
        by_regions.entry(c.regions).or_default().merge(&c.totals);
    }
    let mut s = String::new();
    let _ = writeln!(s, "# Simulator campaign: result\n");
    let _ = writeln!(
        s,
        "Generated by `idem-sim campaign` from its ledger (`docs/sim-campaign/ledger.tsv`); do not edit by hand.\n"
    );
    let _ = writeln!(s, "- Command: `{command}`");
    if let Some(d) = ledger.digest {
        let _ = writeln!(s, "- Behaviour digest of the simulator: `{d:016x}`");
    }
    for st in &ledger.started {
        let _ = writeln!(s, "- Run started: {st}");
    }
    let _ = writeln!(s, "- Report written: {}\n", utc_now());
    let _ = writeln!(
        s,
        "| | Reserves | contended during a fault | seeds | violating seeds |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for (n, x) in &by_regions {
        let _ = writeln!(
            s,
            "| {n} regions | {} | {} | {} | {} |",
            x.reserves,
            x.contended,
            x.seeds,
            x.failed.len()
        );
    }
    let _ = writeln!(
        s,
        "| **all** | **{}** | **{}** | **{}** | **{}** |\n",
        t.reserves,
        t.contended,
        t.seeds,
        t.failed.len()
    );
    if t.reserves < plan.reserves || t.contended < plan.contended {
        let _ = writeln!(
            s,
            "**In progress**: {} of the {} Reserves and {} of the {} contended Reserves the campaign aims at ({:.1}%); `make sim-campaign` goes on from here.\n",
            t.reserves,
            plan.reserves,
            t.contended,
            plan.contended,
            100.0 * t.reserves as f64 / plan.reserves.max(1) as f64
        );
    }
    if t.failed.is_empty() && t.contended > 0 {
        let _ = writeln!(
            s,
            "No violation. With zero failures in n = {} contended Reserves, the 95% upper bound on the probability that a contended Reserve breaks a promise under this fault mix is 3/n = {:.2e} (over all {} Reserves: {:.2e}).\n",
            t.contended,
            3.0 / t.contended as f64,
            t.reserves,
            3.0 / t.reserves.max(1) as f64
        );
    } else if !t.failed.is_empty() {
        let _ = writeln!(
            s,
            "**VIOLATIONS** in {} seeds: {:?}. Replay one with `idem-sim --seed N --regions R --without rebuild`.\n",
            t.failed.len(),
            t.failed
        );
    }
    let _ = writeln!(
        s,
        "Answers: {} NEW, {} REPLAY, {} IN_FLIGHT, {} MISMATCH, {} UNAVAILABLE; {} completions acknowledged; {} takeovers; {} events; {:.1} simulated days; {:.0} core-seconds ({:.0} Reserves per core-second).\n",
        t.new,
        t.replay,
        t.in_flight,
        t.mismatch,
        t.unavailable,
        t.completions_acked,
        t.takeovers,
        t.events,
        t.sim_ms as f64 / 86_400_000.0,
        secs,
        t.reserves as f64 / secs.max(1e-9)
    );
    let _ = writeln!(s, "Reserves made while each fault kind was active:\n");
    let _ = writeln!(s, "| fault | Reserves |");
    let _ = writeln!(s, "|---|---:|");
    for (k, v) in &t.coverage {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    if !hunts.is_empty() {
        let _ = writeln!(s, "\n## Broken variants (`make sim-broken`)\n");
        let _ = writeln!(
            s,
            "| variant | must show | caught at seed | seeds run (budget) | Reserves run | that seed's violations |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---|");
        for h in hunts {
            let _ = writeln!(
                s,
                "| `{}` | `{}` | {} | {} ({}) | {} | {} |",
                h.variant,
                h.expect,
                h.seed
                    .map_or("**not caught**".to_string(), |x| x.to_string()),
                h.seeds_run,
                h.budget,
                h.reserves,
                h.kinds
            );
        }
    }
    s
}

/// The current UTC date and time, `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc(secs)
}

fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3_600, (secs % 3_600) / 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_line_reads_back_as_written_and_a_cut_line_is_skipped() {
        let mut totals = Totals {
            seeds: 3,
            attempts: 7_100,
            reserves: 6_000,
            contended: 2_500,
            outbox_skipped: 31,
            failed: vec![7, 9],
            ..Totals::default()
        };
        totals.coverage.insert("Crash".into(), 40);
        totals.coverage.insert("Skew".into(), 12);
        let c = Chunk {
            chunk: 12,
            regions: 5,
            secs: 3.5,
            totals,
        };
        assert_eq!(Chunk::parse(&c.line()), Some(c.clone()));
        let dir = std::env::temp_dir().join(format!("idem-sim-ledger-{}", std::process::id()));
        let path = dir.join("ledger.tsv");
        std::fs::create_dir_all(&dir).unwrap();
        // Cut inside its last field: it still has every column, but no newline.
        let other = Chunk {
            chunk: 13,
            ..c.clone()
        };
        let line = other.line();
        let cut = &line[..line.len() - 3];
        std::fs::write(
            &path,
            format!(
                "{HEADER}\n# behaviour 00000000000000ab\n{}\n{cut}",
                c.line()
            ),
        )
        .unwrap();
        let l = Ledger::read(&path).unwrap();
        assert_eq!(l.digest, Some(0xab));
        assert_eq!(l.chunks.len(), 1, "the cut line is not counted");
        assert_eq!(l.totals().failed, vec![7, 9]);
        // Chunks of unknown origin (no digest) are refused, not counted.
        std::fs::write(&path, format!("{}\n", c.line())).unwrap();
        let e = Ledger::read(&path).unwrap_err();
        assert!(e.contains("without a behaviour digest"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_ledger_of_another_behaviour_is_refused() {
        let dir = std::env::temp_dir().join(format!("idem-sim-digest-{}", std::process::id()));
        let path = dir.join("ledger.tsv");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, format!("{HEADER}\n# behaviour 0000000000000001\n")).unwrap();
        let plan = Plan {
            reserves: 1,
            contended: 0,
            jobs: 1,
            label: String::new(),
        };
        let e = run(&path, &plan).unwrap_err();
        assert!(e.contains("behaves differently"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn utc_dates_are_civil_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_796_412_840), "2026-12-04 19:34 UTC");
    }
}
