//! `idem-sim`: run seeds of the simulator and report what they found.
//!
//! ```text
//! idem-sim --seed 42                 one seed, its trace hash and findings
//! idem-sim --seeds 0..1000           a range of seeds, a summary
//! idem-sim --seeds 0..100 --reserves 5000 --regions 5
//! idem-sim --seeds 0..300 --without rebuild   no seed draws that fault kind
//! idem-sim campaign --ledger L --report R [--reserves N] [--contended N] [--jobs N]
//! idem-sim hunt --expect KIND --seeds A..B --record PATH   (a broken build)
//! idem-sim regional [--requests N] [--seed S]   REGIONAL double grants vs the model
//! ```
//! Exits 1 when a seed found a violation (its seed and findings are printed).

use idem_sim::campaign::{self, Hunt, Ledger, Plan, Totals};
use idem_sim::sim::FaultKind;
use idem_sim::{broken_variant, run_seed, Report, SimConfig};
use std::path::PathBuf;
use std::time::Instant;

fn usage() -> ! {
    eprintln!(
        "usage: idem-sim (--seed N | --seeds A..B) [--reserves N] [--regions 3|5] [--clients N] [--no-faults] [--rebuild-quarantine] [--without KIND,...] [--trace-key K] [--verbose]\n       idem-sim campaign --ledger PATH --report PATH [--broken PATH] [--reserves N] [--contended N] [--jobs N] [--label TEXT] [--report-only]\n       idem-sim hunt --expect KIND --seeds A..B --record PATH\n       idem-sim regional [--requests N] [--seed S]"
    );
    std::process::exit(2)
}

fn range(v: Option<String>, what: &str) -> std::ops::Range<u64> {
    let v = v.unwrap_or_default();
    let Some((a, b)) = v.split_once("..") else {
        eprintln!("{what}: expected A..B");
        usage()
    };
    parse(Some(a.to_string()), what)..parse(Some(b.to_string()), what)
}

fn fail(e: String) -> ! {
    eprintln!("idem-sim: {e}");
    std::process::exit(1)
}

/// `idem-sim campaign`: run (or resume) the campaign, then write its report.
fn campaign_main(mut args: impl Iterator<Item = String>) {
    let mut ledger = None;
    let mut report = None;
    let mut broken = None;
    let mut plan = Plan {
        reserves: 3_000_000_000,
        contended: 1_000_000_000,
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        label: String::new(),
    };
    let mut report_only = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ledger" => ledger = args.next().map(PathBuf::from),
            "--report" => report = args.next().map(PathBuf::from),
            "--broken" => broken = args.next().map(PathBuf::from),
            "--reserves" => plan.reserves = parse(args.next(), "--reserves"),
            "--contended" => plan.contended = parse(args.next(), "--contended"),
            "--jobs" => plan.jobs = parse(args.next(), "--jobs"),
            "--label" => plan.label = args.next().unwrap_or_default(),
            "--report-only" => report_only = true,
            _ => usage(),
        }
    }
    let (Some(ledger), Some(report)) = (ledger, report) else {
        eprintln!("campaign: --ledger and --report are required");
        usage()
    };
    if let Some(v) = broken_variant() {
        fail(format!(
            "this build runs the broken rule {v}: the campaign runs only the rules the servers run"
        ));
    }
    let l = if report_only {
        Ledger::read(&ledger).unwrap_or_else(|e| fail(e))
    } else {
        campaign::run(&ledger, &plan).unwrap_or_else(|e| fail(e))
    };
    let hunts: Vec<Hunt> = match &broken {
        None => Vec::new(),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => t.lines().filter_map(Hunt::parse).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => fail(format!("{}: {e}", p.display())),
        },
    };
    let command = format!(
        "idem-sim campaign --ledger {} --report {} --reserves {} --contended {}",
        ledger.display(),
        report.display(),
        plan.reserves,
        plan.contended
    );
    let text = campaign::report(&l, &hunts, &command, &plan);
    if let Err(e) = std::fs::write(&report, &text) {
        fail(format!("{}: {e}", report.display()));
    }
    let t = l.totals();
    println!(
        "campaign: {} Reserves, {} contended, {} seeds, violating seeds {:?}; report in {}",
        t.reserves,
        t.contended,
        t.seeds,
        t.failed,
        report.display()
    );
    if !t.failed.is_empty() {
        std::process::exit(1);
    }
}

/// `idem-sim regional`: REGIONAL mode's double-grant rate against its model.
fn regional_main(mut args: impl Iterator<Item = String>) {
    let mut requests = 1_000_000;
    let mut seed = 1;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--requests" => requests = parse(args.next(), "--requests"),
            "--seed" => seed = parse(args.next(), "--seed"),
            _ => usage(),
        }
    }
    print!("{}", idem_sim::regional::table(requests, seed));
}

/// `idem-sim hunt`: a broken build runs seeds until one shows the violation it must.
fn hunt_main(mut args: impl Iterator<Item = String>) {
    let mut expect = None;
    let mut seeds = 0..2_000;
    let mut record = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--expect" => expect = args.next(),
            "--seeds" => seeds = range(args.next(), "--seeds"),
            "--record" => record = args.next().map(PathBuf::from),
            _ => usage(),
        }
    }
    let Some(expect) = expect else {
        eprintln!("hunt: --expect is required");
        usage()
    };
    let Some(variant) = broken_variant() else {
        fail("hunt needs a broken build (cargo run -p idem-sim --features broken-...)".into())
    };
    let h = campaign::hunt(variant, &expect, seeds);
    if let Some(p) = &record {
        campaign::record_hunt(p, &h).unwrap_or_else(|e| fail(e));
    }
    match h.seed {
        Some(s) => println!(
            "{variant}: caught ({expect}) at seed {s}, after {} seeds and {} Reserves: {}",
            h.seeds_run, h.reserves, h.kinds
        ),
        None => {
            println!(
                "{variant}: NOT caught ({expect}) in {} seeds ({} Reserves)",
                h.seeds_run, h.reserves
            );
            std::process::exit(1);
        }
    }
}

fn parse<T: std::str::FromStr>(v: Option<String>, what: &str) -> T {
    match v.as_deref().map(str::parse) {
        Some(Ok(x)) => x,
        _ => {
            eprintln!("{what}: expected a number");
            usage()
        }
    }
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("campaign") => return campaign_main(std::env::args().skip(2)),
        Some("hunt") => return hunt_main(std::env::args().skip(2)),
        Some("regional") => return regional_main(std::env::args().skip(2)),
        _ => {}
    }
    let mut cfg = SimConfig::default();
    let mut seeds = 0..1u64;
    let mut verbose = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => {
                let s: u64 = parse(args.next(), "--seed");
                seeds = s..s + 1;
                verbose = true;
            }
            "--seeds" => seeds = range(args.next(), "--seeds"),
            "--reserves" => cfg.reserves = parse(args.next(), "--reserves"),
            "--regions" => {
                cfg.regions = parse(args.next(), "--regions");
                if !(3..=5).contains(&cfg.regions) {
                    eprintln!("--regions: 3 to 5");
                    usage()
                }
            }
            "--clients" => cfg.clients = parse(args.next(), "--clients"),
            "--no-faults" => cfg.faults = false,
            "--rebuild-quarantine" => cfg.rebuild_quarantine = true,
            "--without" => {
                for name in args.next().unwrap_or_default().split(',') {
                    match name.parse::<FaultKind>() {
                        Ok(k) => cfg.without.push(k),
                        Err(e) => {
                            eprintln!("--without: {e}");
                            usage()
                        }
                    }
                }
            }
            "--drop-faults" => {
                for i in args.next().unwrap_or_default().split(',') {
                    cfg.drop_faults
                        .push(parse(Some(i.to_string()), "--drop-faults"));
                }
            }
            "--trace-key" => cfg.trace_key = Some(parse(args.next(), "--trace-key")),
            "--verbose" => verbose = true,
            _ => usage(),
        }
    }
    let started = Instant::now();
    let mut total = Totals::default();
    for seed in seeds.clone() {
        let r = run_seed(&cfg, seed);
        if verbose {
            print_one(&r);
        }
        if !r.violations.is_empty() && !verbose {
            print_one(&r);
        }
        total.add(&r);
    }
    let secs = started.elapsed().as_secs_f64();
    // One failing seed asked for: shrink it and replay its first violation's key.
    if seeds.end - seeds.start == 1 && !total.failed.is_empty() && cfg.trace_key.is_none() {
        print_shrunk(&cfg, seeds.start);
    }
    println!(
        "seeds {}..{}: {} reserves ({} contended during a fault; {} attempts with those a down or fenced region refused), {} NEW, {} REPLAY, {} IN_FLIGHT, {} MISMATCH, {} UNAVAILABLE, {} completions acknowledged, {} takeovers, {} changes skipped by full outboxes",
        seeds.start, seeds.end, total.reserves, total.contended, total.attempts, total.new, total.replay,
        total.in_flight, total.mismatch, total.unavailable, total.completions_acked, total.takeovers, total.outbox_skipped
    );
    println!(
        "{} events, {:.0} simulated s, {:.1} s: {:.0} reserves/s",
        total.events,
        total.sim_ms as f64 / 1000.0,
        secs,
        total.reserves as f64 / secs.max(1e-9)
    );
    let cov: Vec<String> = total
        .coverage
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("reserves met each fault: {}", cov.join(", "));
    if total.failed.is_empty() {
        println!("no violation");
    } else {
        println!("VIOLATIONS in seeds {:?}", total.failed);
        std::process::exit(1);
    }
}

fn print_shrunk(cfg: &SimConfig, seed: u64) {
    let (small, r, kind) = idem_sim::sim::shrink(cfg, seed);
    let Some(v) = r.violations.iter().find(|v| v.kind == kind) else {
        return;
    };
    let dropped: Vec<String> = small.drop_faults.iter().map(usize::to_string).collect();
    let kept = (0..r.faults.len())
        .filter(|i| !small.drop_faults.contains(i))
        .count();
    let mut replay = format!(
        "idem-sim --seed {seed} --regions {} --clients {} --reserves {}",
        small.regions, small.clients, small.reserves
    );
    if !small.faults {
        replay.push_str(" --no-faults");
    }
    if !dropped.is_empty() {
        replay.push_str(&format!(" --drop-faults {}", dropped.join(",")));
    }
    if !small.without.is_empty() {
        let names: Vec<&str> = small.without.iter().map(|k| k.name()).collect();
        replay.push_str(&format!(" --without {}", names.join(",")));
    }
    if small.rebuild_quarantine {
        replay.push_str(" --rebuild-quarantine");
    }
    println!(
        "shrunk: {kept} of {} faults kept, {} Reserves, still {kind} on key {}; the key's trace:\n  {replay} --trace-key {}",
        r.faults.len(),
        r.reserves,
        v.key,
        v.key
    );
    let traced = SimConfig {
        trace_key: Some(v.key),
        ..small
    };
    run_seed(&traced, seed);
}

fn print_one(r: &Report) {
    println!(
        "seed {}: trace {:016x}, {} reserves ({} contended), {} NEW, {} completions acknowledged, {} events, {:.0} simulated s",
        r.seed,
        r.trace_hash,
        r.reserves,
        r.contended,
        r.new,
        r.completions_acked,
        r.events,
        r.sim_ms as f64 / 1000.0
    );
    for f in &r.faults {
        println!("  fault {f}");
    }
    for v in r.violations.iter().take(10) {
        println!(
            "  VIOLATION {} key {} at {} ms: {}",
            v.kind, v.key, v.at_ms, v.detail
        );
    }
}
