//! The suite's network: a private network namespace per run (created and deleted by the
//! outer process), per-node loopback addresses, a delaying TCP proxy for WAN latency
//! between regions, and `iptables` rules for partitions and packet loss.
//!
//! Node `n` of region `r` (index `i = r * per_region + n`) listens on `127.0.{r+1}.{n+1}`
//! and leaves from that address (`node.outgoing_addr`). A node reaches a node `b` of
//! another region through the proxy `127.0.{100+a}.{b+1}`, which waits half the round
//! trip (with jitter) in each direction and connects onward *from a's own address*. So
//! every packet that reaches a node carries the true sender's address, and one rule
//! `-s A -d B -j DROP` cuts A -> B whether the traffic is direct or proxied.

use anyhow::{bail, Context};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

pub const GRPC_PORT: u16 = 7000;
pub const HTTP_PORT: u16 = 8000;

pub fn node_ip(region: usize, n: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, region as u8 + 1, n as u8 + 1)
}

/// The proxy node `a` (global index) uses to reach node `b` (global index).
pub fn proxy_ip(a: usize, b: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 100 + a as u8, b as u8 + 1)
}

/// Run a command, failing with its stderr.
pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of the suite's namespaces start with this.
pub const NETNS_PREFIX: &str = "idem-jepsen-";

pub fn create_netns(name: &str) -> anyhow::Result<()> {
    sh("ip", &["netns", "add", name])?;
    sh(
        "ip",
        &["netns", "exec", name, "ip", "link", "set", "lo", "up"],
    )?;
    Ok(())
}

/// Kill every process left in the namespace, then delete it.
pub fn delete_netns(name: &str) {
    for _ in 0..3 {
        let pids = sh("ip", &["netns", "pids", name]).unwrap_or_default();
        let pids: Vec<&str> = pids.split_whitespace().collect();
        if pids.is_empty() {
            break;
        }
        for p in &pids {
            let _ = Command::new("kill").args(["-CONT", p]).status();
            let _ = Command::new("kill").args(["-9", p]).status();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = sh("ip", &["netns", "del", name]);
}

/// Every namespace a run of the suite left behind.
pub fn leftover_netns() -> Vec<String> {
    sh("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .map(str::to_string)
        .collect()
}

/// Drop packets from `a` to `b` (inside the namespace the caller runs in).
pub fn cut(a: Ipv4Addr, b: Ipv4Addr) -> anyhow::Result<()> {
    sh(
        "iptables",
        &[
            "-w",
            "-A",
            "OUTPUT",
            "-s",
            &a.to_string(),
            "-d",
            &b.to_string(),
            "-j",
            "DROP",
        ],
    )?;
    Ok(())
}

/// Drop a share of the packets between nodes.
pub fn lossy(probability: f64) -> anyhow::Result<()> {
    sh(
        "iptables",
        &[
            "-w",
            "-A",
            "OUTPUT",
            "-s",
            "127.0.0.0/17",
            "-d",
            "127.0.0.0/17",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &format!("{probability:.2}"),
            "-j",
            "DROP",
        ],
    )?;
    Ok(())
}

/// Packets the suite's rules have dropped since they were added.
pub fn dropped_packets() -> anyhow::Result<u64> {
    let out = sh("iptables", &["-w", "-L", "OUTPUT", "-v", "-x", "-n"])?;
    Ok(out
        .lines()
        .filter(|l| l.contains("DROP"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

/// Remove every rule.
pub fn heal() -> anyhow::Result<()> {
    sh("iptables", &["-w", "-F", "OUTPUT"])?;
    Ok(())
}

/// A WAN link's stall: until when (harness milliseconds) nothing crosses it, and how
/// many chunks a stall held back.
#[derive(Default)]
pub struct Stall {
    until_ms: AtomicU64,
    held: AtomicU64,
}

impl Stall {
    /// Hold every byte sent on the link until `until_ms`.
    pub fn stall_until(&self, until_ms: u64) {
        self.until_ms.fetch_max(until_ms, Ordering::SeqCst);
    }

    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// How long a chunk read now must wait for the stall to end.
    fn wait(&self) -> Duration {
        let until = self.until_ms.load(Ordering::SeqCst);
        let now = crate::history::now_ms();
        if until > now {
            self.held.fetch_add(1, Ordering::Relaxed);
            Duration::from_millis(until - now)
        } else {
            Duration::ZERO
        }
    }
}

/// The links between regions: one stall control per ordered pair of regions, shared by
/// the proxies of every pair of their nodes.
pub struct Wan {
    regions: usize,
    links: Vec<Arc<Stall>>,
}

impl Wan {
    pub fn new(regions: usize) -> Wan {
        Wan {
            regions,
            links: (0..regions * regions).map(|_| Arc::default()).collect(),
        }
    }

    /// The link from region `a` to region `b`.
    pub fn link(&self, a: usize, b: usize) -> Arc<Stall> {
        self.links[a * self.regions + b].clone()
    }
}

/// One delaying proxy: `listen` -> `target`, leaving from `source`.
pub struct Proxy {
    pub listen: SocketAddr,
    pub target: SocketAddr,
    pub source: Ipv4Addr,
    /// One-way delay and its jitter.
    pub delay: Duration,
    pub jitter: Duration,
    /// The stalls of the link each way: `source`'s region to `target`'s, and back.
    pub forth: Arc<Stall>,
    pub back: Arc<Stall>,
}

impl Proxy {
    pub async fn spawn(self, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
        let listener = TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("proxy listen {}", self.listen))?;
        let p = Arc::new(self);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let p = p.clone();
                tokio::spawn(async move {
                    let _ = p.serve(inbound).await;
                });
            }
        });
        Ok(())
    }

    async fn serve(&self, inbound: tokio::net::TcpStream) -> anyhow::Result<()> {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::new(self.source.into(), 0))?;
        let outbound = tokio::time::timeout(Duration::from_secs(3), sock.connect(self.target))
            .await
            .context("connect timeout")??;
        inbound.set_nodelay(true)?;
        outbound.set_nodelay(true)?;
        let (ri, wi) = inbound.into_split();
        let (ro, wo) = outbound.into_split();
        let (d, j) = (self.delay, self.jitter);
        let a = tokio::spawn(delayed_pipe(ri, wo, d, j, self.forth.clone()));
        let b = tokio::spawn(delayed_pipe(ro, wi, d, j, self.back.clone()));
        let _ = tokio::join!(a, b);
        Ok(())
    }
}

/// Copy bytes one way, each chunk released `delay ± jitter` after it was read (or when
/// the link's stall ends), in order.
async fn delayed_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
    jitter: Duration,
    stall: Arc<Stall>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_due = tokio::time::Instant::now();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let j = if jitter.is_zero() {
            Duration::ZERO
        } else {
            jitter.mul_f64(rand::random::<f64>())
        };
        // Never before an earlier chunk: TCP keeps order.
        let now = tokio::time::Instant::now();
        let due = (now + delay + j).max(now + stall.wait()).max(last_due);
        last_due = due;
        if tx.send((due, buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
