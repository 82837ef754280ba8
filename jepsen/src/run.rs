//! One run: set up the namespace, start the proxies and the nodes, run the clients and
//! the nemesis schedule for the time limit, heal, wait for the regions to converge,
//! record their digests, check the history and write the report. The outer process only
//! creates and deletes the namespace; everything else runs inside it.

use crate::cluster::{Cluster, SKEW_MARGIN_MS};
use crate::history::{Call, Op, Outcome};
use crate::nemesis::{self, Window};
use crate::net::{self, proxy_ip, Proxy, GRPC_PORT};
use crate::workload::{self, Recorder, WorkloadConfig};
use anyhow::Context;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How soon after healing (every node ready again) every node's record digest must
/// agree. docs/protocol.md §6 states the bound for a region: the anti-entropy timeout
/// (10 s) plus 1.25 intervals (3 s here) plus the pass itself; a node restarted by the
/// heal also catches up its group's log first. Beyond it the run is unknown and the
/// digests that still differ are a `divergence`.
const CONVERGE_BOUND: Duration = Duration::from_secs(90);

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Nemeses, comma-separated (see `jepsen/README.md`), or `none`.
    #[arg(long, default_value = "partition-region,kill,pause,clock")]
    pub nemesis: String,
    /// Seconds of workload (faults included).
    #[arg(long, default_value_t = 60)]
    pub time_limit: u64,
    #[arg(long, default_value_t = 3)]
    pub regions: usize,
    #[arg(long, default_value_t = 3)]
    pub nodes_per_region: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The `idem` binary to test (default: the release build next to this one).
    #[arg(long)]
    pub bin: Option<PathBuf>,
    /// Where runs are stored.
    #[arg(long, default_value = "jepsen/store")]
    pub store: PathBuf,
    /// Emulated round trip between regions, and its jitter.
    #[arg(long, default_value_t = 70)]
    pub rtt_ms: u64,
    #[arg(long, default_value_t = 10)]
    pub jitter_ms: u64,
    #[arg(long, default_value_t = 9)]
    pub clients: usize,
    /// Share of the Reserves in a REGIONAL namespace.
    #[arg(long, default_value_t = 0.15)]
    pub regional: f64,
    /// Longest side effect between a NEW and its Complete, in milliseconds.
    #[arg(long, default_value_t = 600)]
    pub think_ms: u64,
    /// Keys live at once (the key space is bounded so that keys collide).
    #[arg(long, default_value_t = 12)]
    pub keys: usize,
    /// Seconds between two faults, and how long each lasts.
    #[arg(long, default_value_t = 4)]
    pub quiet_s: u64,
    #[arg(long, default_value_t = 6)]
    pub fault_s: u64,
    /// Most faults in one window: each window adds up to this many minus one more,
    /// drawn by the seed, to the nemesis whose turn it is.
    #[arg(long, default_value_t = 1)]
    pub compose: usize,
    /// Plain data directories instead of the fault filesystem (no disk nemeses).
    #[arg(long)]
    pub no_faultfs: bool,
    /// Exit 0 only if the checker finds a violation of this kind (`double_grant`,
    /// `lost_completion`, ...; without a value: any violation), to prove that a broken
    /// build is caught for its reason.
    #[arg(long, num_args = 0..=1, default_missing_value = "any", value_name = "REASON")]
    pub expect_invalid: Option<String>,
    /// Ask nothing of the run's activity (a run for exploration, not for a verdict).
    #[arg(long)]
    pub no_activity_check: bool,
    /// Internal: the namespace this process already runs in.
    #[arg(long, hide = true)]
    pub inside: Option<String>,
}

fn default_bin() -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name("idem")
}

/// Entry point of `run`: create the namespace, re-run this command inside it, and
/// delete the namespace (and every process in it) whatever happens.
pub fn outer(a: &RunArgs) -> anyhow::Result<bool> {
    nemesis::check_names(&names(a), !a.no_faultfs)?;
    if a.compose == 0 || a.compose > 4 {
        anyhow::bail!("--compose must be 1 to 4");
    }
    let enabled = names(a).into_iter().filter(|n| n != "none").count() as u64;
    let windows = a.time_limit / (a.quiet_s + a.fault_s).max(1);
    if windows < enabled {
        anyhow::bail!(
            "--time-limit {} fits {windows} fault windows of {} s (--quiet-s + --fault-s), \
             fewer than the {enabled} nemeses named: each must fire",
            a.time_limit,
            a.quiet_s + a.fault_s
        );
    }
    if a.regions < 1 || a.regions > 5 || a.nodes_per_region < 1 || a.nodes_per_region > 9 {
        anyhow::bail!("--regions must be 1 to 5 and --nodes-per-region 1 to 9");
    }
    if net::sh("id", &["-u"])?.trim() != "0" {
        anyhow::bail!("the suite needs root (network namespaces and iptables)");
    }
    for tool in ["ip", "iptables"] {
        if net::sh("sh", &["-c", &format!("command -v {tool}")]).is_err() {
            anyhow::bail!("`{tool}` is missing: apt-get install iproute2 iptables");
        }
    }
    if !a.no_faultfs {
        if let Err(why) = crate::faultfs::available() {
            anyhow::bail!("the fault filesystem cannot be mounted: {why} (or pass --no-faultfs)");
        }
    }
    let bin = a.bin.clone().unwrap_or_else(default_bin);
    if !bin.exists() {
        anyhow::bail!(
            "{} does not exist: build it (cargo build --release) or pass --bin",
            bin.display()
        );
    }
    let ns = format!("{}{}", net::NETNS_PREFIX, std::process::id());
    net::create_netns(&ns)?;
    let me = std::env::current_exe()?;
    let store = std::env::current_dir()?.join(&a.store);
    let mut args: Vec<String> = vec!["run".into()];
    let mut opt = |k: &str, v: String| {
        args.push(format!("--{k}"));
        args.push(v);
    };
    opt("nemesis", a.nemesis.clone());
    opt("time-limit", a.time_limit.to_string());
    opt("regions", a.regions.to_string());
    opt("nodes-per-region", a.nodes_per_region.to_string());
    opt("seed", a.seed.to_string());
    opt("bin", std::fs::canonicalize(&bin)?.display().to_string());
    opt("store", store.display().to_string());
    opt("rtt-ms", a.rtt_ms.to_string());
    opt("jitter-ms", a.jitter_ms.to_string());
    opt("clients", a.clients.to_string());
    opt("keys", a.keys.to_string());
    opt("quiet-s", a.quiet_s.to_string());
    opt("fault-s", a.fault_s.to_string());
    opt("compose", a.compose.to_string());
    opt("regional", a.regional.to_string());
    opt("think-ms", a.think_ms.to_string());
    opt("inside", ns.clone());
    if a.no_faultfs {
        args.push("--no-faultfs".into());
    }
    if let Some(reason) = &a.expect_invalid {
        args.push(format!("--expect-invalid={reason}"));
    }
    if a.no_activity_check {
        args.push("--no-activity-check".into());
    }
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(me)
        .args(&args)
        .status();
    net::delete_netns(&ns);
    Ok(status?.success())
}

fn names(a: &RunArgs) -> Vec<String> {
    a.nemesis
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Inside the namespace.
pub async fn inner(a: RunArgs) -> anyhow::Result<bool> {
    let named = names(&a);
    let label = if named.len() > 4 {
        format!("{}-nemeses", named.len())
    } else {
        named.join("+")
    };
    let run = format!("{}-{label}-seed{}", chrono_like_now(), a.seed);
    let dir = a.store.join(&run);
    std::fs::create_dir_all(&dir)?;
    let bin = a.bin.clone().unwrap_or_else(default_bin);
    let mut cluster = Cluster::configure(
        &bin,
        &dir.join("nodes"),
        a.regions,
        a.nodes_per_region,
        !a.no_faultfs,
        &node_extra_config(),
    )?;
    if crate::cluster::faketime_lib().is_none() {
        eprintln!(
            "note: libfaketime not found (apt-get install faketime); clock nemeses change nothing"
        );
    }
    // Proxies between regions.
    let stop = Arc::new(AtomicBool::new(false));
    let n = cluster.nodes.len();
    let half = Duration::from_millis(a.rtt_ms / 2);
    let jitter = Duration::from_millis(a.jitter_ms);
    for x in 0..n {
        for y in 0..n {
            if cluster.nodes[x].region == cluster.nodes[y].region {
                continue;
            }
            Proxy {
                listen: SocketAddr::new(proxy_ip(x, y).into(), GRPC_PORT),
                target: SocketAddr::new(cluster.nodes[y].ip.into(), GRPC_PORT),
                source: cluster.nodes[x].ip,
                delay: half.saturating_sub(jitter / 2),
                jitter,
                forth: cluster
                    .wan
                    .link(cluster.nodes[x].region, cluster.nodes[y].region),
                back: cluster
                    .wan
                    .link(cluster.nodes[y].region, cluster.nodes[x].region),
            }
            .spawn(stop.clone())
            .await?;
        }
    }
    for i in 0..n {
        cluster.start(i)?;
    }
    cluster.wait_ready(Duration::from_secs(60))?;
    println!("cluster of {n} nodes ready; running {} s", a.time_limit);

    let rec = Recorder::new();
    let endpoints: Vec<Vec<String>> = (0..a.regions)
        .map(|r| {
            cluster
                .region_nodes(r)
                .iter()
                .map(|i| cluster.nodes[*i].grpc())
                .collect()
        })
        .collect();
    let wl = WorkloadConfig {
        clients: a.clients,
        keys: a.keys,
        window_every: Duration::from_secs(1),
        endpoints: endpoints.clone(),
        seed: a.seed,
        flip: 0.1,
        tenants: workload::tenants(),
        regional: a.regional,
        think_ms: a.think_ms,
    };
    let epoch = crate::history::now_ms();
    let client_stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for id in 0..wl.clients {
        clients.push(tokio::spawn(workload::client(
            id,
            wl.clone(),
            rec.clone(),
            client_stop.clone(),
            epoch,
        )));
    }

    // The nemesis schedule: every named nemesis in turn, with others composed into its
    // window; each fault observed.
    let enabled: Vec<String> = names(&a).into_iter().filter(|n| n != "none").collect();
    let mut rng = StdRng::seed_from_u64(a.seed);
    let slots = (a.time_limit / (a.quiet_s + a.fault_s).max(1)) as usize;
    let plan = nemesis::schedule(&enabled, slots, a.compose, &mut rng);
    let mut windows: Vec<Window> = Vec::new();
    let mut disk = DiskTally::default();
    let deadline = Instant::now() + Duration::from_secs(a.time_limit);
    for names in plan {
        tokio::time::sleep(Duration::from_secs(a.quiet_s)).await;
        if Instant::now() >= deadline {
            break;
        }
        let start_ms = crate::history::now_ms();
        let mut claims = nemesis::Claims::default();
        let mut faults = Vec::new();
        for name in names {
            match nemesis::inject(&name, &mut cluster, &mut claims, &mut rng)
                .with_context(|| format!("inject {name}"))?
            {
                Some((active, detail)) => faults.push((name, active, detail, None)),
                None => println!("  {name}: no node left for it in this window, skipped"),
            }
        }
        let fault_end = Instant::now()
            + Duration::from_secs(a.fault_s)
                .min(deadline.saturating_duration_since(Instant::now()));
        loop {
            for (_, active, _, observed) in faults.iter_mut() {
                if observed.is_none() {
                    *observed = nemesis::observe(active, &mut cluster);
                }
            }
            if Instant::now() >= fault_end {
                break;
            }
            tokio::time::sleep(
                Duration::from_millis(300).min(fault_end.saturating_duration_since(Instant::now())),
            )
            .await;
        }
        // Heal in the reverse order of injection.
        while let Some((name, active, detail, observed)) = faults.pop() {
            println!(
                "  {:>5.1}s  {name}: {detail} ({})",
                (start_ms - epoch) as f64 / 1000.0,
                observed.as_deref().unwrap_or("NO EFFECT OBSERVED")
            );
            disk.note(&active, &cluster).await;
            nemesis::heal(active, &mut cluster)?;
            windows.push(Window {
                nemesis: name,
                detail,
                start_ms,
                end_ms: crate::history::now_ms(),
                observed,
            });
        }
    }
    tokio::time::sleep(deadline.saturating_duration_since(Instant::now())).await;
    client_stop.store(true, Ordering::SeqCst);
    // A call still running after 15 s stays indeterminate in the history.
    for mut c in clients {
        if tokio::time::timeout(Duration::from_secs(15), &mut c)
            .await
            .is_err()
        {
            c.abort();
            eprintln!("a client was still running 15 s after the end; its call is indeterminate");
        }
    }

    // Heal everything, let every lease end, and wait for the regions to converge.
    net::heal()?;
    for i in 0..n {
        cluster.signal(i, "-CONT");
        let _ = cluster.set_clock_offset(i, 0.0);
        if let Some(fs) = &cluster.nodes[i].fs {
            fs.set_faults(crate::faultfs::Faults::default());
        }
        // A node that stopped on a disk error is restarted, as an operator would.
        if cluster.failure(i).is_some() {
            cluster.kill(i);
        }
        cluster.start(i)?;
    }
    cluster.wait_ready(Duration::from_secs(90))?;
    let t = Instant::now();
    let converged_after = loop {
        let ds: Vec<Option<(u64, String)>> = (0..n).map(|i| cluster.digest(i)).collect();
        if ds.iter().all(|d| d.is_some() && *d == ds[0]) {
            break Some(t.elapsed());
        }
        if t.elapsed() > CONVERGE_BOUND {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let converged = converged_after.is_some();
    match converged_after {
        Some(d) => eprintln!("regions converged {d:?} after healing"),
        None => {
            eprintln!(
                "regions did not converge within {CONVERGE_BOUND:?} after healing; the nodes say:"
            );
            // What each node's groups say, to see which one is behind and why.
            for i in 0..n {
                let status = crate::cluster::http_get(&cluster.nodes[i].http(), "/status")
                    .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok());
                let groups = status.as_ref().map(|v| v["groups"].to_string());
                let failed = status.as_ref().map(|v| v["failed"].to_string());
                eprintln!(
                    "  node {}: digest {:?}, groups {}, failed {}",
                    cluster.nodes[i].id,
                    cluster.digest(i).map(|d| d.1),
                    groups.unwrap_or_else(|| "unreachable".into()),
                    failed.unwrap_or_default()
                );
            }
        }
    }
    for i in 0..n {
        let now = crate::history::now_ms();
        let digest = cluster.digest(i);
        rec.push(Op {
            id: 0,
            client: 0,
            region: cluster.nodes[i].region as u32,
            call: Call::Digest,
            key: format!("node-{}", cluster.nodes[i].id),
            fingerprint: String::new(),
            start_ms: now,
            end_ms: now,
            outcome: if digest.is_some() {
                Outcome::Ok
            } else {
                Outcome::Timeout
            },
            fence: String::new(),
            lease_expires_ms: 0,
            trusted_until_ms: 0,
            took_over: false,
            phase: if digest.is_some() {
                String::new()
            } else {
                "unreachable".into()
            },
            value: digest.map(|d| d.1).unwrap_or_default(),
        });
    }
    final_read(&rec, &endpoints).await;
    stop.store(true, Ordering::SeqCst);
    cluster.stop_all();

    let history = rec.ops();
    std::fs::write(
        dir.join("history.jsonl"),
        crate::history::render(&rec.events.lock().unwrap_or_else(|p| p.into_inner())),
    )?;
    let expect = if a.no_activity_check {
        crate::checker::Expect::default()
    } else {
        crate::checker::Expect::run()
    };
    let mut verdict = crate::checker::check_with(&history, SKEW_MARGIN_MS, &expect);
    for name in &enabled {
        if !windows
            .iter()
            .any(|w| &w.nemesis == name && w.observed.is_some())
        {
            verdict.add_unknown(format!("nemesis {name} never took effect"));
        }
    }
    disk.judge(&mut verdict);
    crate::checker::check_no_grant_without_majority(&history, &windows, &mut verdict);
    if !converged {
        verdict.add_unknown(format!(
            "the regions did not converge within {CONVERGE_BOUND:?} after healing"
        ));
    }
    let mut results = crate::report::build(
        &run,
        &names(&a),
        a.seed,
        a.time_limit,
        &history,
        &windows,
        &verdict,
    );
    results.converged_after_ms = converged_after.map(|d| d.as_millis() as u64);
    results.power_losses = disk.power_losses;
    results.discarded_bytes = disk.discarded.bytes;
    results.discarded_entries = disk.discarded.entries;
    results.command = std::env::args().collect::<Vec<_>>().join(" ");
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let timeline = crate::report::svg(&history, &windows);
    std::fs::write(
        dir.join("report.html"),
        crate::html::page(&results, &history, &windows, &timeline),
    )?;
    std::fs::write(dir.join("timeline.svg"), timeline)?;
    print!("{}", crate::report::summary(&results));
    println!("\nstored in {}", dir.display());
    Ok(match &a.expect_invalid {
        Some(reason) if reason == "any" => verdict.status == "invalid",
        Some(reason) => {
            let caught = verdict.violations.iter().any(|v| v.kind == reason);
            if !caught {
                println!("expected a violation of kind {reason}; none was found");
            }
            caught
        }
        None => verdict.valid,
    })
}

/// What every node's config adds: the tenants' tokens and the REGIONAL namespace.
fn node_extra_config() -> String {
    use sha2::Digest as _;
    let mut s = String::from("[auth]\nenabled = true\n");
    for t in workload::tenants() {
        s.push_str(&format!(
            "[[auth.tokens]]\ntenant = \"{}\"\nsha256 = \"{}\"\n",
            t.name,
            hex::encode(sha2::Sha256::digest(t.token.as_bytes()))
        ));
    }
    s.push_str(&format!(
        "\n[[namespaces]]\nscope_prefix = \"{}\"\nmode = \"regional\"\n",
        workload::REGIONAL_SCOPE
    ));
    s
}

/// What the disk nemeses did, for the verdict: the bytes their power losses discarded
/// (a run whose power losses discarded nothing tested nothing), and nodes that kept
/// serving after their fsyncs failed.
#[derive(Default)]
struct DiskTally {
    power_losses: u64,
    discarded: crate::faultfs::Discarded,
    ignored: Vec<String>,
}

impl DiskTally {
    /// Called at the end of a fault's window, before it is healed.
    async fn note(&mut self, a: &nemesis::Active, c: &Cluster) {
        let nemesis::Active::Disk(d) = a else {
            return;
        };
        if let Some(lost) = d.discarded() {
            self.power_losses += 1;
            self.discarded.bytes += lost.bytes;
            self.discarded.entries += lost.entries;
        }
        // A node whose fsync failed has a moment to notice and stop before it is judged.
        let mut serving = d.ignored(c);
        for _ in 0..8 {
            if serving.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            serving = d.ignored(c);
        }
        self.ignored.extend(serving);
    }

    fn judge(&self, v: &mut crate::checker::Verdict) {
        if self.power_losses > 0 && self.discarded.bytes == 0 {
            v.add_unknown(format!(
                "{} power losses discarded no unsynced byte: they tested nothing",
                self.power_losses
            ));
        }
        for why in &self.ignored {
            v.add_violation(crate::checker::Violation {
                kind: "disk_error_ignored",
                key: String::new(),
                ops: Vec::new(),
                detail: why.clone(),
            });
        }
    }
}

/// After healing: every key the clients touched, read through each region's group
/// (from the first node of the region that answers).
async fn final_read(rec: &Recorder, endpoints: &[Vec<String>]) {
    let keys: std::collections::BTreeSet<String> = rec
        .ops()
        .into_iter()
        .filter(|o| o.call == Call::Reserve)
        .map(|o| o.key)
        .collect();
    let tenants = workload::tenants();
    for region in 0..endpoints.len() {
        // Each tenant's clients, one per node of the region (the others' nodes after).
        let mut by_tenant = std::collections::BTreeMap::new();
        for t in &tenants {
            if let Ok(c) = workload::connect(0, &endpoints[region..=region], Some(&t.token)).await {
                by_tenant.insert(t.name.clone(), c);
            }
        }
        for key in &keys {
            let mut o = workload::op(Call::Read, 0, region, key);
            o.phase = "unreachable".into();
            o.outcome = Outcome::Timeout;
            let target = workload::split_key(key)
                .and_then(|(t, scope, name)| Some((by_tenant.get(t)?, scope, name)));
            if let Some((cs, scope, name)) = target {
                let r = cs[0].get(scope, name.as_bytes()).await;
                workload::record_read(&mut o, &r);
                if o.outcome != Outcome::Ok {
                    o.phase = "unreachable".into();
                }
            }
            o.end_ms = crate::history::now_ms();
            rec.push(o);
        }
    }
}
/// UTC time as YYYYMMDDTHHMMSS, without a date crate.
fn chrono_like_now() -> String {
    let secs = idem_client::now_ms() / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
