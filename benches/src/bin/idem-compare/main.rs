//! `idem-compare`: put-if-absent on Idem, etcd, Redis and PostgreSQL, side by side, on
//! this machine, with the same closed-loop load and the same latency accounting.
//!
//! Each system runs alone: its peers are started in a temp dir on loopback, measured
//! (every concurrency, every workload), and stopped before the next system starts, so
//! no system shares the CPU or the disk with another's background work. Peers are
//! stopped on error and on Ctrl-C too. A system that fails is reported and skipped;
//! the others' rows are still written. `benches/compare/run` is the one command that
//! installs the peers, builds this driver and the server, and runs it.

mod etcd;
mod idem;
mod load;
mod postgres;
mod procs;
mod proxy;
mod redis;
mod report;

use anyhow::Context;
use clap::Parser;
use load::{Conn, Row, Spec, Workload};
use procs::Procs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

const SYSTEMS: [&str; 5] = ["etcd", "redis", "postgres", "idem", "idem-geo"];
/// Workers that store the replay workload's keys before it runs.
const PRELOAD_WORKERS: usize = 16;

#[derive(Parser, Clone)]
#[command(about = "Put-if-absent on Idem, etcd, Redis and PostgreSQL, side by side")]
struct Args {
    /// Short windows (5 s, 1 s warm-up, fewer stored keys): a functional check that
    /// finishes in a few minutes, not a measurement.
    #[arg(long)]
    quick: bool,
    /// Measured seconds per row (default 20; 5 with --quick).
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Warm-up seconds before each row, not recorded (default 3; 1 with --quick).
    #[arg(long)]
    warmup_secs: Option<f64>,
    /// Closed-loop concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Systems to run, of etcd, redis, postgres, idem, idem-geo.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "etcd,redis,postgres,idem,idem-geo"
    )]
    systems: Vec<String>,
    /// Emulated round trip between Idem's regions (idem-geo).
    #[arg(long, default_value_t = 70)]
    rtt_ms: u64,
    /// Keys stored before the replay workload (default 2000; 256 with --quick).
    #[arg(long)]
    replay_keys: Option<usize>,
    /// The `idem` binary (default: next to this one).
    #[arg(long)]
    idem_bin: Option<PathBuf>,
    /// Where compare.json, compare.md and compare.svg go.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out_dir: PathBuf,
}

struct Plan {
    args: Args,
    warmup: Duration,
    duration: Duration,
    replay_keys: usize,
    idem_bin: PathBuf,
}

impl Plan {
    fn spec(&self, workload: Workload, keys: &Arc<Vec<String>>) -> Spec {
        Spec {
            workload,
            warmup: self.warmup,
            duration: self.duration,
            replay_keys: keys.clone(),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(bad) = args.systems.iter().find(|s| !SYSTEMS.contains(&s.as_str())) {
        eprintln!("unknown system {bad:?}: one of {}", SYSTEMS.join(", "));
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(async {
        tokio::select! {
            r = run_all(args) => r,
            _ = tokio::signal::ctrl_c() => {
                // Dropping `run_all` stops the peers it started.
                eprintln!("\ninterrupted: stopping the peers");
                ExitCode::from(130)
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    code
}

async fn run_all(args: Args) -> ExitCode {
    let quick = args.quick;
    let idem_bin = args.idem_bin.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("idem")))
            .unwrap_or_else(|| PathBuf::from("idem"))
    });
    let plan = Plan {
        warmup: Duration::from_secs_f64(args.warmup_secs.unwrap_or(if quick { 1.0 } else { 3.0 })),
        duration: Duration::from_secs_f64(args.duration_secs.unwrap_or(if quick {
            5.0
        } else {
            20.0
        })),
        replay_keys: args
            .replay_keys
            .unwrap_or(if quick { 256 } else { 2000 })
            .max(1),
        idem_bin,
        args,
    };
    let conditions = conditions(&plan);
    eprintln!(
        "idem-compare: {} on {} (load average {}); {} s per row after {} s warm-up",
        plan.args.systems.join(", "),
        conditions.machine,
        conditions.load_average,
        plan.duration.as_secs_f64(),
        plan.warmup.as_secs_f64()
    );
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for system in plan.args.systems.clone() {
        eprintln!("== {system}");
        let r = match system.as_str() {
            "etcd" => run_etcd(&plan, &mut rows).await,
            "redis" => run_redis(&plan, &mut rows).await,
            "postgres" => run_postgres(&plan, &mut rows).await,
            "idem" => run_idem(&plan, &mut rows, 1).await,
            "idem-geo" => run_idem(&plan, &mut rows, 3).await,
            _ => unreachable!("checked in main"),
        };
        if let Err(e) = r {
            eprintln!("!! {system} failed: {e:#}");
            failed.push(system);
        }
    }
    println!("\n{}", report::table(&rows));
    if let Err(e) = report::write_all(&plan.args.out_dir, &rows, &conditions) {
        eprintln!("cannot write the results: {e:#}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "results: {0}/compare.json, {0}/compare.md, {0}/compare.svg",
        plan.args.out_dir.display()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("failed: {}", failed.join(", "));
        ExitCode::FAILURE
    }
}

/// The system being measured: its row labels and its processes (checked after each row).
struct Target<'a> {
    system: &'static str,
    config: String,
    procs: &'a mut Procs,
}

/// Measure every concurrency level of `workload`; `conns(c)` gives c worker handles.
async fn measure<F, Fut>(
    plan: &Plan,
    rows: &mut Vec<Row>,
    t: &mut Target<'_>,
    workload: Workload,
    keys: &Arc<Vec<String>>,
    mut conns: F,
) -> anyhow::Result<()>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<Conn>>>,
{
    for &c in &plan.args.concurrency {
        let workers = conns(c.max(1)).await?;
        let row = load::run(t.system, &t.config, workers, &plan.spec(workload, keys)).await?;
        t.procs.check_alive()?;
        eprintln!(
            "  {:<8} {:<44} {:<6} c={:<3} {:>9.0} ops/s  p50 {:>8.2} ms  p99 {:>8.2} ms  p999 {:>8.2} ms  errors {}",
            row.system,
            row.config,
            workload.as_str(),
            c,
            row.ops_per_sec,
            row.p50_ms,
            row.p99_ms,
            row.p999_ms,
            row.errors
        );
        let expected = match workload {
            Workload::New => "created",
            Workload::Replay => "existed",
        };
        if row.outcomes.keys().any(|k| k != expected) {
            eprintln!("    outcomes: {:?}", row.outcomes);
        }
        rows.push(row);
    }
    Ok(())
}

async fn run_etcd(plan: &Plan, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let mut procs = Procs::new("etcd")?;
    let addrs = etcd::start(&mut procs).await?;
    let kvs: Vec<etcd::Kv> = addrs
        .iter()
        .map(|a| etcd::Kv::connect(a))
        .collect::<anyhow::Result<_>>()?;
    // Workers spread over the members; a follower forwards to the leader.
    let conns = |c: usize| {
        let kvs = kvs.clone();
        async move {
            Ok((0..c)
                .map(|w| Conn::Etcd(kvs[w % kvs.len()].clone()))
                .collect())
        }
    };
    let mut t = Target {
        system: "etcd",
        config: format!("{} members, defaults (WAL fsync)", etcd::MEMBERS),
        procs: &mut procs,
    };
    let none = Arc::new(Vec::new());
    measure(plan, rows, &mut t, Workload::New, &none, conns).await?;
    let keys = load::preload(conns(PRELOAD_WORKERS).await?, plan.replay_keys).await?;
    measure(plan, rows, &mut t, Workload::Replay, &keys, conns).await
}

async fn run_redis(plan: &Plan, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    for fsync in [redis::Fsync::Always, redis::Fsync::EverySec] {
        let mut procs = Procs::new("redis")?;
        let addr = redis::start(&mut procs, fsync).await?;
        let conns = |c: usize| {
            let addr = addr.clone();
            async move {
                let mut v = Vec::with_capacity(c);
                for _ in 0..c {
                    v.push(Conn::Redis(redis::Conn::connect(&addr).await?));
                }
                Ok(v)
            }
        };
        let mut t = Target {
            system: "redis",
            config: format!("1 node, appendfsync {}", fsync.as_str()),
            procs: &mut procs,
        };
        let none = Arc::new(Vec::new());
        measure(plan, rows, &mut t, Workload::New, &none, conns).await?;
    }
    Ok(())
}

async fn run_postgres(plan: &Plan, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let mut procs = Procs::new("postgres")?;
    let addr = postgres::start(&mut procs).await?;
    let conns = |c: usize| {
        let addr = addr.clone();
        async move {
            let mut v = Vec::with_capacity(c);
            for _ in 0..c {
                v.push(Conn::Postgres(postgres::Conn::open(&addr).await?));
            }
            Ok(v)
        }
    };
    let mut t = Target {
        system: "postgresql",
        config: "1 node, synchronous_commit=on, fsync=on".into(),
        procs: &mut procs,
    };
    let none = Arc::new(Vec::new());
    measure(plan, rows, &mut t, Workload::New, &none, conns).await
}

async fn run_idem(plan: &Plan, rows: &mut Vec<Row>, regions: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        plan.idem_bin.exists(),
        "no idem binary at {} (cargo build --release -p idem-cli, or --idem-bin)",
        plan.idem_bin.display()
    );
    let rtt = Duration::from_millis(plan.args.rtt_ms);
    let mut cluster = idem::start(&plan.idem_bin, regions, rtt)
        .await
        .context("starting the Idem cluster")?;
    let mut clients = Vec::new();
    for e in &cluster.endpoints {
        clients.push(idem::Conn::connect(e).await?);
    }
    // Workers spread over the client's region's nodes; a follower forwards to the leader.
    let conns = |c: usize| {
        let clients = clients.clone();
        async move {
            Ok((0..c)
                .map(|w| Conn::Idem(clients[w % clients.len()].clone()))
                .collect())
        }
    };
    let config = if regions == 1 {
        format!("1 region x {} nodes", idem::NODES_PER_REGION)
    } else {
        // What the proxies really add (timer granularity, scheduling on a busy machine),
        // so that the geo rows' latency can be read against it rather than the nominal.
        let emulated = crate::proxy::measured_round_trip_ms(rtt / 2, 50)
            .await
            .context("measuring the emulated round trip")?;
        eprintln!("  emulated round trip between regions: {emulated:.2} ms (median of 50)");
        format!(
            "{regions} regions x {} nodes, {} ms RTT (measured {emulated:.1} ms)",
            idem::NODES_PER_REGION,
            plan.args.rtt_ms
        )
    };
    let mut t = Target {
        system: "idem",
        config,
        procs: &mut cluster.procs,
    };
    let none = Arc::new(Vec::new());
    measure(plan, rows, &mut t, Workload::New, &none, conns).await?;
    let keys = load::preload(conns(PRELOAD_WORKERS).await?, plan.replay_keys).await?;
    measure(plan, rows, &mut t, Workload::Replay, &keys, conns).await
}

fn conditions(plan: &Plan) -> report::Conditions {
    let started_utc = procs::version_of("date", "-u").replace("  ", " ");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "unknown OS".into());
    let load_average = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let mut versions = Vec::new();
    for s in &plan.args.systems {
        let v = match s.as_str() {
            "etcd" => procs::version_of("etcd", "--version"),
            "redis" => procs::version_of("redis-server", "--version"),
            "postgres" => postgres::bin_dir()
                .map(|b| procs::version_of(&b.join("postgres").to_string_lossy(), "--version"))
                .unwrap_or_else(|_| "not installed".into()),
            "idem" => procs::version_of(&plan.idem_bin.to_string_lossy(), "--version"),
            _ => continue,
        };
        versions.push((s.clone(), v));
    }
    report::Conditions {
        fsync_ms: fsync_latency_ms(),
        started_utc,
        machine: format!("{cores} cores, {mem_gib:.0} GiB, {os}"),
        load_average,
        quick: plan.args.quick,
        warmup_secs: plan.warmup.as_secs_f64(),
        duration_secs: plan.duration.as_secs_f64(),
        rtt_ms: plan.args.rtt_ms,
        versions,
    }
}

/// The disk's durability cost, for reading the table: the median time of a 4 KiB write
/// followed by `fdatasync`, in a temp dir on the same file system as the peers' data.
fn fsync_latency_ms() -> Option<f64> {
    use std::io::Write;
    const ROUNDS: usize = 200;
    let dir = tempfile::Builder::new()
        .prefix("idem-compare-fsync-")
        .tempdir()
        .ok()?;
    let mut f = std::fs::File::create(dir.path().join("probe")).ok()?;
    let block = [0x5au8; 4096];
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = std::time::Instant::now();
        f.write_all(&block).ok()?;
        f.sync_data().ok()?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Some(times[ROUNDS / 2])
}
