//! A real cluster for integration tests: `idem server` processes on loopback, each with
//! its own config file and data directory, killed with SIGKILL when asked and when the
//! test ends.

#![allow(dead_code)]

pub mod geo;

use idem_client::{Client, ClientConfig, RetryPolicy};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NodeProc {
    pub id: u64,
    pub grpc: String,
    pub http: String,
    pub config: PathBuf,
    pub data: PathBuf,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
}

/// A free loopback port for a node. Ports come from a per-process block below the
/// kernel's ephemeral range (32768+), so they never collide with ports the kernel hands
/// out for outgoing connections, nor with each other inside one test binary; a port found
/// busy is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        10_000 + (std::process::id() % 400) as u16 * 50,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let p = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(p < 32_000, "no free test port below the ephemeral range");
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

pub struct Options {
    pub nodes: usize,
    pub shards: u32,
    pub skew_margin_ms: u64,
    pub min_retention_ms: u64,
    /// A snapshot every this many entries, with this many kept behind it (`None`: the
    /// defaults).
    pub snapshot_every: Option<(u64, u64)>,
    pub extra: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            shards: 1,
            skew_margin_ms: 100,
            min_retention_ms: 1_000,
            snapshot_every: None,
            extra: String::new(),
        }
    }
}

impl Cluster {
    pub fn start(opts: Options) -> Cluster {
        let mut c = Cluster::configure(opts);
        for i in 0..c.nodes.len() {
            c.spawn(i);
        }
        c.wait_ready(Duration::from_secs(30));
        c
    }

    /// Write every node's config; start nothing (a test that mounts something under a
    /// node's data directory first).
    pub fn configure(opts: Options) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("idem-it-")
            .tempdir()
            .expect("tempdir");
        let ports: Vec<(u16, u16)> = (0..opts.nodes)
            .map(|_| (free_port(), free_port()))
            .collect();
        let members: String = ports
            .iter()
            .enumerate()
            .map(|(i, (g, _))| {
                format!(
                    "[[regions.nodes]]\nid = {}\naddr = \"127.0.0.1:{g}\"\n",
                    i + 1
                )
            })
            .collect();
        let mut nodes = Vec::new();
        for (i, (g, h)) in ports.iter().enumerate() {
            let id = i as u64 + 1;
            let data = dir.path().join(format!("node-{id}"));
            let config = dir.path().join(format!("node-{id}.toml"));
            let text = format!(
                "[node]\nid = {id}\nregion = \"test\"\ndata_dir = \"{}\"\ngrpc_addr = \"127.0.0.1:{g}\"\nhttp_addr = \"127.0.0.1:{h}\"\n\n\
                 [cluster]\nshards = {}\nskew_margin_ms = {}\n\n\
                 [raft]\nheartbeat_ms = 50\nelection_timeout_min_ms = 300\nelection_timeout_max_ms = 600\nrequest_timeout_ms = 3000\n{}\n\
                 [limits]\nmin_retention_ms = {}\n\n{}\n\
                 [[regions]]\nid = 0\nname = \"test\"\n{members}",
                data.display(),
                opts.shards,
                opts.skew_margin_ms,
                opts.snapshot_every
                    .map(|(every, kept)| format!(
                        "snapshot_every_entries = {every}\nlogs_kept_after_snapshot = {kept}\n"
                    ))
                    .unwrap_or_default(),
                opts.min_retention_ms,
                opts.extra,
            );
            std::fs::write(&config, text).expect("write config");
            nodes.push(NodeProc {
                id,
                grpc: format!("127.0.0.1:{g}"),
                http: format!("127.0.0.1:{h}"),
                config,
                data,
                child: None,
            });
        }
        Cluster { dir, nodes }
    }

    pub fn spawn(&mut self, i: usize) {
        self.spawn_with(i, &[]);
    }

    /// Start node `i` with extra arguments to `idem server`.
    pub fn spawn_with(&mut self, i: usize, args: &[&str]) {
        let n = &mut self.nodes[i];
        assert!(n.child.is_none(), "node {} already running", n.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("node-{}.log", n.id)))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(["server", "--config"])
            .arg(&n.config)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn idem server");
        n.child = Some(child);
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("node-{}.log", self.nodes[i].id)),
        )
        .unwrap_or_default()
    }

    /// Wait until every running node reports a leader for all its groups.
    pub fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.child.is_none() {
                continue;
            }
            loop {
                if http_get(&n.http, "/healthz")
                    .map(|(code, _)| code == 200)
                    .unwrap_or(false)
                {
                    break;
                }
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

    /// The node that leads the (single) group, by asking each node.
    pub fn leader(&self) -> Option<usize> {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            if let Some((200, body)) = http_get(&n.http, "/status") {
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                if let Some(l) = v["groups"][0]["leader"].as_u64() {
                    return self.nodes.iter().position(|x| x.id == l);
                }
            }
        }
        None
    }

    pub async fn client(&self, i: usize) -> Client {
        let mut cfg = ClientConfig::new(self.nodes[i].grpc.clone());
        cfg.timeout = Duration::from_secs(5);
        cfg.retry = RetryPolicy {
            max_attempts: 20,
            budget_floor: 1_000.0,
            ..RetryPolicy::default()
        };
        Client::connect(cfg).await.expect("client")
    }

    /// A client with no retries, to see each answer as the server gave it.
    pub async fn raw_client(
        &self,
        i: usize,
    ) -> idem_proto::v1::idem_client::IdemClient<tonic::transport::Channel> {
        idem_proto::v1::idem_client::IdemClient::connect(format!("http://{}", self.nodes[i].grpc))
            .await
            .expect("connect")
    }

    pub fn metrics(&self, i: usize) -> String {
        http_get(&self.nodes[i].http, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// One series (exact name and labels) summed over every node's `/metrics`; 0 where
    /// a node does not export it.
    pub fn metric_sum(&self, series: &str) -> f64 {
        (0..self.nodes.len())
            .filter_map(|i| series_value(&self.metrics(i), series))
            .sum()
    }

    pub fn data_dir(&self, i: usize) -> &Path {
        &self.nodes[i].data
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// The value of one series (exact name and labels) in Prometheus text.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A minimal HTTP/1.1 GET (no client library needed for the node's plain endpoints).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(500))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// A real Prometheus server (Debian's `prometheus` package, which `make deps` installs)
/// scraping `targets` every second and evaluating Idem's shipped rules every second.
pub struct Prometheus {
    child: std::process::Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/prometheus/alerts.yml")
            .canonicalize()
            .unwrap();
        let list = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: idem\n    static_configs:\n      - targets: [{list}]\n",
                rules.display()
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("prometheus not found: install Debian's `prometheus` package (make deps does)");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The value of an instant query that returns one sample, if it does.
    pub fn query_one(&self, q: &str) -> Option<f64> {
        let (code, body) = http_get(&self.addr, &format!("/api/v1/query?query={q}"))?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// Wait until `q` reads `want` (scrapes and rule evaluations run every second).
    pub fn wait_for(&self, q: &str, want: f64, timeout: Duration) {
        let t = std::time::Instant::now();
        loop {
            let got = self.query_one(q);
            if got == Some(want) {
                return;
            }
            assert!(
                t.elapsed() < timeout,
                "Prometheus query {q} reads {got:?}, not {want}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
