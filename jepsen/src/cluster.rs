//! The cluster under test: real `idem server` processes, one per node address, started,
//! killed (SIGKILL), paused (SIGSTOP/SIGCONT) and restarted by the suite. With
//! `libfaketime` installed, every node runs under it with a clock file the clock
//! nemesis rewrites (only wall-clock time is faked; monotonic timers stay true). Each
//! node's data directory is a fault filesystem (`faultfs`) the disk nemeses act on.

use crate::faultfs::{Discarded, FaultFs};
use crate::net::{node_ip, proxy_ip, Wan, GRPC_PORT, HTTP_PORT};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const REGION_NAMES: [&str; 5] = ["us-east", "eu-west", "ap-south", "sa-east", "af-south"];
pub const SKEW_MARGIN_MS: u64 = 300;

const FAKETIME_LIBS: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
];

pub fn faketime_lib() -> Option<&'static str> {
    FAKETIME_LIBS.into_iter().find(|p| Path::new(p).exists())
}

pub struct NodeProc {
    pub index: usize,
    pub id: u64,
    pub region: usize,
    pub ip: std::net::Ipv4Addr,
    pub config: PathBuf,
    pub clock_file: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub paused: bool,
    /// The node's data directory (`None`: a plain directory, no disk faults).
    pub fs: Option<FaultFs>,
}

impl NodeProc {
    pub fn grpc(&self) -> String {
        format!("{}:{GRPC_PORT}", self.ip)
    }
    pub fn http(&self) -> String {
        format!("{}:{HTTP_PORT}", self.ip)
    }
}

pub struct Cluster {
    pub bin: PathBuf,
    pub nodes: Vec<NodeProc>,
    pub regions: usize,
    pub per_region: usize,
    /// The links between regions (their delaying proxies' stalls).
    pub wan: Wan,
}

/// Each node's fault filesystem holds at most this much (in the harness's memory).
pub const DISK_CAPACITY: u64 = 2 << 30;

impl Cluster {
    /// Write every node's config and mount its data directory (a fault filesystem when
    /// `faultfs`); start nothing yet. `extra` is appended to every node's config.
    pub fn configure(
        bin: &Path,
        dir: &Path,
        regions: usize,
        per_region: usize,
        faultfs: bool,
        extra: &str,
    ) -> anyhow::Result<Cluster> {
        let mut nodes = Vec::new();
        for (r, region_name) in REGION_NAMES.iter().enumerate().take(regions) {
            for n in 0..per_region {
                let index = r * per_region + n;
                let id = index as u64 + 1;
                let ip = node_ip(r, n);
                let ndir = dir.join(format!("n{id}"));
                std::fs::create_dir_all(&ndir)?;
                let mut regions_toml = String::new();
                for (r2, name2) in REGION_NAMES.iter().enumerate().take(regions) {
                    regions_toml.push_str(&format!("[[regions]]\nid = {r2}\nname = \"{name2}\"\n"));
                    for n2 in 0..per_region {
                        let b = r2 * per_region + n2;
                        let addr = if r2 == r {
                            node_ip(r2, n2)
                        } else {
                            proxy_ip(index, b)
                        };
                        regions_toml.push_str(&format!(
                            "[[regions.nodes]]\nid = {}\naddr = \"{addr}:{GRPC_PORT}\"\n",
                            b + 1
                        ));
                    }
                }
                let config = ndir.join("node.toml");
                let text = format!(
                    "[node]\nid = {id}\nregion = \"{}\"\ndata_dir = \"{}\"\ngrpc_addr = \"{ip}:{GRPC_PORT}\"\nhttp_addr = \"{ip}:{HTTP_PORT}\"\noutgoing_addr = \"{ip}\"\n\n\
                     [cluster]\nshards = 2\nskew_margin_ms = {SKEW_MARGIN_MS}\n\n\
                     [raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 600\nelection_timeout_max_ms = 1200\nrequest_timeout_ms = 2000\n\n\
                     [geo]\nround_timeout_ms = 1500\nanti_entropy_interval_ms = 3000\n\n\
                     [limits]\nmin_lease_ms = 100\nmin_retention_ms = 60000\n\n\
                     [log]\nlevel = \"warn,idem_geo=info\"\n\n{extra}\n{regions_toml}",
                    region_name,
                    ndir.join("data").display(),
                );
                std::fs::write(&config, text)?;
                let clock_file = ndir.join("clock");
                std::fs::write(&clock_file, "+0\n")?;
                let fs = if faultfs {
                    Some(
                        FaultFs::mount(&ndir.join("data"), DISK_CAPACITY)
                            .with_context(|| format!("mount the fault filesystem of node {id}"))?,
                    )
                } else {
                    None
                };
                nodes.push(NodeProc {
                    index,
                    id,
                    region: r,
                    ip,
                    config,
                    clock_file,
                    log: ndir.join("node.log"),
                    child: None,
                    paused: false,
                    fs,
                });
            }
        }
        Ok(Cluster {
            bin: bin.to_path_buf(),
            nodes,
            regions,
            per_region,
            wan: Wan::new(regions),
        })
    }

    pub fn start(&mut self, i: usize) -> anyhow::Result<()> {
        self.start_with(i, &[])
    }

    /// Start node `i` with extra arguments to `idem server` (`--rejoin`).
    pub fn start_with(&mut self, i: usize, args: &[&str]) -> anyhow::Result<()> {
        let n = &mut self.nodes[i];
        if n.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(["server", "--config"])
            .arg(&n.config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(lib) = faketime_lib() {
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", &n.clock_file)
                .env("FAKETIME_CACHE_DURATION", "1")
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
        }
        n.child = Some(
            cmd.spawn()
                .with_context(|| format!("start {}", self.bin.display()))?,
        );
        n.paused = false;
        Ok(())
    }

    pub fn kill(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if let Some(mut c) = n.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        n.paused = false;
    }

    /// A power loss of node `i`: killed at once, and its disk keeps only what was synced.
    pub fn power_loss(&mut self, i: usize) -> anyhow::Result<Discarded> {
        self.kill(i);
        let id = self.nodes[i].id;
        let fs = self.nodes[i]
            .fs
            .as_mut()
            .with_context(|| format!("node {id} has no fault filesystem"))?;
        fs.power_loss()
            .with_context(|| format!("remount node {id}'s filesystem"))
    }

    /// Node `i`'s data directory is lost: killed, and its disk replaced by an empty one.
    pub fn lose_data(&mut self, i: usize) -> anyhow::Result<()> {
        self.kill(i);
        let id = self.nodes[i].id;
        let fs = self.nodes[i]
            .fs
            .as_mut()
            .with_context(|| format!("node {id} has no fault filesystem"))?;
        fs.wipe()
            .with_context(|| format!("replace node {id}'s filesystem"))
    }

    /// Node `i`'s exit code, if its process has exited (it is then no longer running).
    pub fn exited(&mut self, i: usize) -> Option<Option<i32>> {
        let n = &mut self.nodes[i];
        let status = n.child.as_mut()?.try_wait().ok()??;
        n.child = None;
        Some(status.code())
    }

    /// Why node `i` says it stopped serving (its disk failed), from its `/status`.
    pub fn failure(&self, i: usize) -> Option<String> {
        let (code, body) = http_get(&self.nodes[i].http(), "/status")?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["failed"].as_str().map(str::to_string)
    }

    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    pub fn signal(&mut self, i: usize, sig: &str) {
        let n = &mut self.nodes[i];
        if let Some(c) = &n.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
            n.paused = sig == "-STOP";
        }
    }

    pub fn set_clock_offset(&self, i: usize, offset_s: f64) -> anyhow::Result<()> {
        let s = if offset_s >= 0.0 {
            format!("+{offset_s:.3}\n")
        } else {
            format!("{offset_s:.3}\n")
        };
        std::fs::write(&self.nodes[i].clock_file, s)?;
        Ok(())
    }

    /// How far node `i`'s wall clock reads from the harness's, in milliseconds (from
    /// its `/status`, the round trip's midpoint taken as the reading's moment).
    pub fn clock_offset_ms(&self, i: usize) -> Option<i64> {
        let before = idem_client::now_ms();
        let (code, body) = http_get(&self.nodes[i].http(), "/status")?;
        let after = idem_client::now_ms();
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let wall = v["clock"]["wall_ms"].as_u64()? as i64;
        Some(wall - (before as i64 + after as i64) / 2)
    }

    pub fn region_nodes(&self, r: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].region == r)
            .collect()
    }

    /// Wait for every running node's /healthz.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            while http_get(&n.http(), "/healthz").is_none_or(|(c, _)| c != 200) {
                if start.elapsed() > timeout {
                    anyhow::bail!(
                        "node {} not ready after {timeout:?}; see {}",
                        n.id,
                        n.log.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// The node that leads shard 0's group of region `r`, as its nodes report it.
    pub fn leader_of(&self, r: usize) -> Option<usize> {
        for i in self.region_nodes(r) {
            if let Some((200, body)) = http_get(&self.nodes[i].http(), "/status") {
                let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                if let Some(l) = v["groups"][0]["leader"].as_u64() {
                    return self.nodes.iter().position(|n| n.id == l);
                }
            }
        }
        None
    }

    /// Node `i`'s record digest.
    pub fn digest(&self, i: usize) -> Option<(u64, String)> {
        let (code, body) = http_get(&self.nodes[i].http(), "/api/digest")?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some((v["records"].as_u64()?, v["digest"].as_str()?.to_string()))
    }

    pub fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.signal(i, "-CONT");
            self.kill(i);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A minimal HTTP/1.0 GET.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(500))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}
