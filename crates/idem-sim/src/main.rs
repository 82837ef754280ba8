//! `idem-sim`: run seeds of the simulator and report what they found.
//!
//! ```text
//! idem-sim --seed 42                 one seed, its trace hash and findings
//! idem-sim --seeds 0..1000           a range of seeds, a summary
//! idem-sim --seeds 0..100 --reserves 5000 --regions 5
//! idem-sim --seeds 0..300 --without rebuild   no seed draws that fault kind
//! ```
//! Exits 1 when a seed found a violation (its seed and findings are printed).

use idem_sim::sim::FaultKind;
use idem_sim::{run_seed, Report, SimConfig};
use std::time::Instant;

fn usage() -> ! {
    eprintln!(
        "usage: idem-sim (--seed N | --seeds A..B) [--reserves N] [--regions 3|5] [--clients N] [--no-faults] [--rebuild-quarantine] [--without KIND,...] [--trace-key K] [--verbose]"
    );
    std::process::exit(2)
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
            "--seeds" => {
                let v = args.next().unwrap_or_default();
                let Some((a, b)) = v.split_once("..") else {
                    eprintln!("--seeds: expected A..B");
                    usage()
                };
                seeds =
                    parse(Some(a.to_string()), "--seeds")..parse(Some(b.to_string()), "--seeds");
            }
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
            "--trace-key" => cfg.trace_key = Some(parse(args.next(), "--trace-key")),
            "--verbose" => verbose = true,
            _ => usage(),
        }
    }
    let started = Instant::now();
    let mut total = Report::default();
    let mut failed = Vec::new();
    for seed in seeds.clone() {
        let r = run_seed(&cfg, seed);
        if verbose {
            print_one(&r);
        }
        if !r.violations.is_empty() {
            if !verbose {
                print_one(&r);
            }
            failed.push(seed);
        }
        total.reserves += r.reserves;
        total.contended += r.contended;
        total.new += r.new;
        total.replay += r.replay;
        total.in_flight += r.in_flight;
        total.mismatch += r.mismatch;
        total.unavailable += r.unavailable;
        total.completions_acked += r.completions_acked;
        total.takeovers += r.takeovers;
        total.events += r.events;
        total.sim_ms += r.sim_ms;
        for (k, v) in r.coverage {
            *total.coverage.entry(k).or_default() += v;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "seeds {}..{}: {} reserves ({} contended during a fault), {} NEW, {} REPLAY, {} IN_FLIGHT, {} MISMATCH, {} UNAVAILABLE, {} completions acknowledged, {} takeovers",
        seeds.start, seeds.end, total.reserves, total.contended, total.new, total.replay,
        total.in_flight, total.mismatch, total.unavailable, total.completions_acked, total.takeovers
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
    if failed.is_empty() {
        println!("no violation");
    } else {
        println!("VIOLATIONS in seeds {failed:?}");
        std::process::exit(1);
    }
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
