//! A multi-region cluster of real `idem server` processes on loopback. Traffic between
//! regions goes through TCP proxies owned by the test (one per source region and
//! destination node), so a test can cut a region off the others and heal it; traffic
//! inside a region is direct.

use super::{free_port, http_get, series_value};
use idem_client::{Client, ClientConfig, RetryPolicy};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct GeoNode {
    pub id: u64,
    pub region: usize,
    pub grpc: String,
    pub http: String,
    pub config: PathBuf,
    pub data: PathBuf,
    pub child: Option<Child>,
    /// The libfaketime clock file of a node started with a faked wall clock.
    pub clock_file: Option<PathBuf>,
}

/// The cluster's skew margin. Its clock bound (half of it) is what a node's peers must
/// confirm its clock within, from probes whose round trip on a loaded 2-core machine
/// running two 9-node debug clusters can exceed 100 ms: a 100 ms bound stays checkable.
pub const SKEW_MARGIN_MS: u64 = 200;

/// Debian's libfaketime (`make deps` installs the `faketime` package).
pub fn faketime_lib() -> Option<&'static str> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

/// One proxy: listens on `listen`, forwards to `target` unless cut.
struct Link {
    src_region: usize,
    dst_region: usize,
    cut: Arc<AtomicBool>,
    /// Added to every chunk forwarded, each way (a slow WAN link).
    delay_ms: Arc<AtomicU64>,
    /// Bumped on every cut and heal: connections of an older epoch are closed.
    epoch: Arc<AtomicU64>,
}

pub struct GeoCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<GeoNode>,
    pub regions: usize,
    links: Vec<Link>,
    /// Dropped with the cluster: stops the proxies' runtime thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub struct GeoOptions {
    pub regions: usize,
    pub nodes_per_region: usize,
    /// Extra TOML appended to every node's config (e.g. `[[namespaces]]`).
    pub extra: String,
    pub anti_entropy_interval_ms: u64,
    /// Nodes (by index) whose wall clock runs under libfaketime with this offset in
    /// seconds from the start; they are not waited for at start (their peers may rightly
    /// refuse to confirm their clock).
    pub fake_clocks: Vec<(usize, f64)>,
}

impl Default for GeoOptions {
    fn default() -> Self {
        GeoOptions {
            regions: 3,
            nodes_per_region: 3,
            extra: String::new(),
            anti_entropy_interval_ms: 1_000,
            fake_clocks: Vec::new(),
        }
    }
}

pub const REGION_NAMES: [&str; 5] = ["us-east", "eu-west", "ap-south", "sa-east", "af-south"];

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    epoch: Arc<AtomicU64>,
    born: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if epoch.load(Ordering::SeqCst) != born { return; }
                continue;
            }
        };
        if epoch.load(Ordering::SeqCst) != born {
            return;
        }
        // Cut: a black hole. The bytes are dropped and the peer hears nothing.
        if cut.load(Ordering::SeqCst) {
            continue;
        }
        let delay = delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl GeoCluster {
    pub fn start(opts: GeoOptions) -> GeoCluster {
        // The proxies run on a runtime of their own, on a thread of their own, so the
        // cluster can be built from inside a test's runtime.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (htx, hrx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("proxy runtime");
            htx.send(rt.handle().clone()).expect("handle");
            rt.block_on(async {
                let _ = stopped.await;
            });
        });
        let rt = hrx.recv().expect("proxy runtime handle");
        let dir = tempfile::Builder::new()
            .prefix("idem-geo-it-")
            .tempdir()
            .expect("tempdir");
        let n = opts.nodes_per_region;
        // Real addresses.
        let real: Vec<Vec<(u16, u16)>> = (0..opts.regions)
            .map(|_| (0..n).map(|_| (free_port(), free_port())).collect())
            .collect();
        // Proxies: (src region, dst region, dst node) -> listen port.
        let mut proxy_port = BTreeMap::new();
        let mut links = Vec::new();
        for src in 0..opts.regions {
            for (dst, dst_nodes) in real.iter().enumerate() {
                if src == dst {
                    continue;
                }
                let cut = Arc::new(AtomicBool::new(false));
                let delay_ms = Arc::new(AtomicU64::new(0));
                let epoch = Arc::new(AtomicU64::new(0));
                for (j, (dst_grpc, _)) in dst_nodes.iter().enumerate() {
                    // Bound at once (no gap between choosing the port and taking it).
                    let (port, listener) = (0..20)
                        .find_map(|_| {
                            let p = free_port();
                            std::net::TcpListener::bind(("127.0.0.1", p))
                                .ok()
                                .map(|l| (p, l))
                        })
                        .expect("a free port for a proxy");
                    proxy_port.insert((src, dst, j), port);
                    let target = format!("127.0.0.1:{dst_grpc}");
                    let (cut, delay_ms, epoch) = (cut.clone(), delay_ms.clone(), epoch.clone());
                    listener.set_nonblocking(true).expect("nonblocking");
                    rt.spawn(async move {
                        let listener =
                            tokio::net::TcpListener::from_std(listener).expect("proxy listener");
                        loop {
                            let Ok((inbound, _)) = listener.accept().await else {
                                continue;
                            };
                            let born = epoch.load(Ordering::SeqCst);
                            let (cut, delay_ms, epoch, target) =
                                (cut.clone(), delay_ms.clone(), epoch.clone(), target.clone());
                            tokio::spawn(async move {
                                let _ = inbound.set_nodelay(true);
                                let Ok(outbound) = tokio::net::TcpStream::connect(&target).await
                                else {
                                    return;
                                };
                                let _ = outbound.set_nodelay(true);
                                let (ri, wi) = inbound.into_split();
                                let (ro, wo) = outbound.into_split();
                                let a = tokio::spawn(pipe(
                                    ri,
                                    wo,
                                    cut.clone(),
                                    delay_ms.clone(),
                                    epoch.clone(),
                                    born,
                                ));
                                let b = tokio::spawn(pipe(ro, wi, cut, delay_ms, epoch, born));
                                let _ = tokio::join!(a, b);
                            });
                        }
                    });
                }
                links.push(Link {
                    src_region: src,
                    dst_region: dst,
                    cut,
                    delay_ms,
                    epoch,
                });
            }
        }
        let mut nodes = Vec::new();
        for r in 0..opts.regions {
            for (j, (g, h)) in real[r].iter().enumerate() {
                let id = (r * n + j) as u64 + 1;
                let data = dir.path().join(format!("node-{id}"));
                let config = dir.path().join(format!("node-{id}.toml"));
                let mut regions_toml = String::new();
                for r2 in 0..opts.regions {
                    regions_toml.push_str(&format!(
                        "[[regions]]\nid = {r2}\nname = \"{}\"\n",
                        REGION_NAMES[r2]
                    ));
                    for j2 in 0..n {
                        let port = if r2 == r {
                            real[r2][j2].0
                        } else {
                            proxy_port[&(r, r2, j2)]
                        };
                        regions_toml.push_str(&format!(
                            "[[regions.nodes]]\nid = {}\naddr = \"127.0.0.1:{port}\"\n",
                            (r2 * n + j2) as u64 + 1
                        ));
                    }
                }
                let text = format!(
                    "[node]\nid = {id}\nregion = \"{}\"\ndata_dir = \"{}\"\ngrpc_addr = \"127.0.0.1:{g}\"\nhttp_addr = \"127.0.0.1:{h}\"\n\n\
                     [cluster]\nshards = 1\nskew_margin_ms = {SKEW_MARGIN_MS}\n\n\
                     [raft]\nheartbeat_ms = 50\nelection_timeout_min_ms = 300\nelection_timeout_max_ms = 600\nrequest_timeout_ms = 3000\n\n\
                     [geo]\nround_timeout_ms = 2000\nreserve_deadline_ms = 4500\nanti_entropy_interval_ms = {}\n\n\
                     [limits]\nmin_lease_ms = 100\nmin_retention_ms = 1000\n\n{}\n{regions_toml}",
                    REGION_NAMES[r],
                    data.display(),
                    opts.anti_entropy_interval_ms,
                    opts.extra,
                );
                std::fs::write(&config, text).expect("write config");
                let index = nodes.len();
                let clock_file =
                    opts.fake_clocks
                        .iter()
                        .find(|(i, _)| *i == index)
                        .map(|(_, off)| {
                            let f = dir.path().join(format!("node-{id}.clock"));
                            std::fs::write(&f, format!("{off:+.3}\n")).expect("clock file");
                            f
                        });
                nodes.push(GeoNode {
                    id,
                    region: r,
                    grpc: format!("127.0.0.1:{g}"),
                    http: format!("127.0.0.1:{h}"),
                    config,
                    data,
                    child: None,
                    clock_file,
                });
            }
        }
        let mut c = GeoCluster {
            dir,
            nodes,
            regions: opts.regions,
            links,
            _stop: stop,
        };
        for i in 0..c.nodes.len() {
            c.spawn(i);
        }
        c.wait_ready(Duration::from_secs(60));
        c
    }

    pub fn spawn(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        assert!(n.child.is_none(), "node {} already running", n.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{}.log", n.id)))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idem"));
        if let Some(f) = &n.clock_file {
            let lib = faketime_lib()
                .expect("libfaketime is missing: apt-get install faketime (make deps does)");
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", f)
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        let child = cmd
            .args(["server", "--config"])
            .arg(&n.config)
            .env("RUST_LOG", "warn,idem_geo=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn idem server");
        n.child = Some(child);
    }

    /// Move node `i`'s faked wall clock to `offset_s` from true time.
    pub fn set_clock(&self, i: usize, offset_s: f64) {
        let f = self.nodes[i]
            .clock_file
            .as_ref()
            .expect("a node with a faked clock");
        std::fs::write(f, format!("{offset_s:+.3}\n")).expect("clock file");
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Indexes of the nodes of region `r`.
    pub fn region_nodes(&self, r: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].region == r)
            .collect()
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("node-{}.log", self.nodes[i].id)),
        )
        .unwrap_or_default()
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child.is_none() || n.clock_file.is_some() {
                continue;
            }
            while http_get(&n.http, "/healthz").is_none_or(|(c, _)| c != 200) {
                if start.elapsed() > timeout {
                    panic!(
                        "node {} not ready after {timeout:?}; log:\n{}",
                        n.id,
                        self.log_of(i)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Cut region `r` off every other region, both directions (a black hole).
    pub fn isolate(&self, r: usize) {
        for l in &self.links {
            if l.src_region == r || l.dst_region == r {
                l.cut.store(true, Ordering::SeqCst);
                l.epoch.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// Delay the calls region `r`'s nodes make to the other regions, and their answers,
    /// by `ms` per chunk each way (0: no delay).
    pub fn delay_from(&self, r: usize, ms: u64) {
        for l in &self.links {
            if l.src_region == r {
                l.delay_ms.store(ms, Ordering::SeqCst);
            }
        }
    }

    /// Restore every link.
    pub fn heal(&self) {
        for l in &self.links {
            if l.cut.swap(false, Ordering::SeqCst) {
                l.epoch.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    pub async fn client(&self, i: usize) -> Client {
        let mut cfg = ClientConfig::new(self.nodes[i].grpc.clone());
        cfg.timeout = Duration::from_secs(5);
        // Retries as a service would make them (UNAVAILABLE is retried with the
        // pushback; Complete and Release with the same fence are idempotent).
        cfg.retry = RetryPolicy {
            max_attempts: 4,
            budget_floor: 10_000.0,
            ..RetryPolicy::default()
        };
        Client::connect(cfg).await.expect("client")
    }

    /// A client that does not retry: to see each answer as the server gave it.
    pub async fn client_once(&self, i: usize) -> Client {
        let mut cfg = ClientConfig::new(self.nodes[i].grpc.clone());
        cfg.timeout = Duration::from_secs(5);
        cfg.retry = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        Client::connect(cfg).await.expect("client")
    }

    pub fn metrics(&self, i: usize) -> String {
        http_get(&self.nodes[i].http, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    pub fn metric_sum(&self, series: &str) -> f64 {
        (0..self.nodes.len())
            .filter_map(|i| series_value(&self.metrics(i), series))
            .sum()
    }

    /// Node `i`'s digest of its shards' records: (records, digest hex).
    pub fn digest(&self, i: usize) -> Option<(u64, String)> {
        let (code, body) = http_get(&self.nodes[i].http, "/api/digest")?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some((v["records"].as_u64()?, v["digest"].as_str()?.to_string()))
    }

    /// Wait until every running node of every region reports the same digest.
    pub fn wait_converged(&self, timeout: Duration) -> (u64, String) {
        let start = Instant::now();
        loop {
            let ds: Vec<Option<(u64, String)>> = (0..self.nodes.len())
                .filter(|i| self.nodes[*i].child.is_some())
                .map(|i| self.digest(i))
                .collect();
            if let Some(Some(first)) = ds.first() {
                if ds.iter().all(|d| d.as_ref() == Some(first)) {
                    return first.clone();
                }
            }
            if start.elapsed() > timeout {
                for i in (0..self.nodes.len()).filter(|i| self.nodes[*i].child.is_some()) {
                    let l = self.log_of(i);
                    let tail = l.char_indices().rev().nth(3_000).map_or(0, |(at, _)| at);
                    eprintln!(
                        "==== node {} log, last lines:\n{}",
                        self.nodes[i].id,
                        &l[tail..]
                    );
                }
                panic!("regions did not converge within {timeout:?}: {ds:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for GeoCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
