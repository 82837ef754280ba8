//! Idem: real `idem server` processes with configs written here. Two shapes:
//!
//! - one region of three nodes (one Raft group: the same shape as the etcd cluster);
//! - three regions of three nodes, where every node reaches the nodes of other regions
//!   through a delaying proxy run by the driver (one per source region and destination
//!   node), so a round trip between regions takes `rtt` more than on loopback. Traffic
//!   inside a region is direct. The client calls its nearest region (region 0).
//!
//! Everything else is the server's default configuration (`deploy/node.example.toml`):
//! one shard, Raft log appends acknowledged after a WAL sync (group commit), GLOBAL mode
//! (a NEW needs a majority of regions). Put-if-absent is the SDK's `Reserve` alone:
//! `NEW` = created, `REPLAY` = the key exists (the stored response comes back).

use crate::load::Outcome;
use crate::procs::{free_port, Procs};
use anyhow::{bail, Context};
use idem_client::{
    Client, ClientConfig, Fingerprint, Reservation, ReserveRequest, RetryPolicy, StoredResponse,
};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio::task::JoinHandle;

pub const NODES_PER_REGION: usize = 3;
const REGION_NAMES: [&str; 3] = ["us-east", "eu-west", "ap-south"];
pub const SCOPE: &str = "bench";

/// A running Idem cluster: its processes, its proxies and region 0's endpoints.
pub struct Cluster {
    pub procs: Procs,
    proxies: Vec<JoinHandle<()>>,
    /// gRPC addresses of the client's region (region 0).
    pub endpoints: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &self.proxies {
            p.abort();
        }
        self.procs.stop_all();
    }
}

/// Start `regions` regions of three nodes; `rtt` between regions (unused with one).
pub async fn start(idem_bin: &Path, regions: usize, rtt: Duration) -> anyhow::Result<Cluster> {
    assert!(regions <= REGION_NAMES.len());
    let mut cluster = Cluster {
        procs: Procs::new(if regions == 1 { "idem" } else { "idem-geo" })?,
        proxies: Vec::new(),
        endpoints: Vec::new(),
    };
    let n = NODES_PER_REGION;
    // (grpc, http) per node, by region.
    let real: Vec<Vec<(u16, u16)>> = (0..regions)
        .map(|_| {
            (0..n)
                .map(|_| Ok((free_port()?, free_port()?)))
                .collect::<anyhow::Result<_>>()
        })
        .collect::<anyhow::Result<_>>()?;
    // How node region `src` reaches node `j` of region `dst`: a proxy port, or direct.
    let mut via = std::collections::BTreeMap::new();
    for src in 0..regions {
        for dst in (0..regions).filter(|d| *d != src) {
            for (j, (dst_grpc, _)) in real[dst].iter().enumerate() {
                let port = free_port()?;
                let listen: SocketAddr = ([127, 0, 0, 1], port).into();
                let target: SocketAddr = ([127, 0, 0, 1], *dst_grpc).into();
                cluster
                    .proxies
                    .push(crate::proxy::spawn(listen, target, rtt / 2).await?);
                via.insert((src, dst, j), port);
            }
        }
    }
    for r in 0..regions {
        for (j, (grpc, http)) in real[r].iter().enumerate() {
            let id = r * n + j + 1;
            let mut members = String::new();
            for r2 in 0..regions {
                members.push_str(&format!(
                    "[[regions]]\nid = {r2}\nname = \"{}\"\n",
                    REGION_NAMES[r2]
                ));
                for j2 in 0..n {
                    let port = if r2 == r {
                        real[r2][j2].0
                    } else {
                        via[&(r, r2, j2)]
                    };
                    members.push_str(&format!(
                        "[[regions.nodes]]\nid = {}\naddr = \"127.0.0.1:{port}\"\n",
                        r2 * n + j2 + 1
                    ));
                }
            }
            let data = cluster.procs.path(&format!("node-{id}"));
            let config = cluster.procs.path(&format!("node-{id}.toml"));
            let text = format!(
                "[node]\nid = {id}\nregion = \"{}\"\ndata_dir = \"{}\"\n\
                 grpc_addr = \"127.0.0.1:{grpc}\"\nhttp_addr = \"127.0.0.1:{http}\"\n\n\
                 [log]\nlevel = \"warn\"\n\n{members}",
                REGION_NAMES[r],
                data.display(),
            );
            std::fs::write(&config, text)?;
            let mut cmd = Command::new(idem_bin);
            cmd.args(["server", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn");
            cluster.procs.spawn(&format!("node-{id}"), cmd, "TERM")?;
        }
    }
    for (grpc, _) in &real[0] {
        cluster.endpoints.push(format!("127.0.0.1:{grpc}"));
    }
    for region in &real {
        for (_, http) in region {
            let addr = format!("127.0.0.1:{http}");
            crate::procs::wait_ready(
                "idem node",
                &mut cluster.procs,
                Duration::from_secs(90),
                || {
                    let addr = addr.clone();
                    async move { healthz(&addr).await }
                },
            )
            .await?;
        }
    }
    // Every group has a leader; now wait until a Reserve is decided end to end (in the
    // geo shape, by a majority of regions through the proxies).
    let probe = Conn::connect(&cluster.endpoints[0]).await?;
    crate::procs::wait_ready(
        "idem reserve",
        &mut cluster.procs,
        Duration::from_secs(60),
        || {
            let key = crate::load::fresh_key();
            let mut p = probe.clone();
            async move { p.reserve(&key, b"probe").await.map(|_| ()) }
        },
    )
    .await?;
    Ok(cluster)
}

/// `GET /healthz` answers 200 once every group on the node has a leader.
async fn healthz(addr: &str) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET /healthz HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await?;
    if &head[9..12] != b"200" {
        bail!("healthz: {}", String::from_utf8_lossy(&head));
    }
    Ok(())
}

fn client_config(endpoint: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(endpoint);
    cfg.timeout = crate::load::OP_TIMEOUT;
    // No retries: the hand-written clients of the other systems do not retry either, and
    // an error is counted, not hidden in a latency.
    cfg.retry = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    cfg
}

/// A worker's handle: the SDK client (one HTTP/2 channel per endpoint, cheap to clone).
#[derive(Clone)]
pub struct Conn {
    client: Client,
}

impl Conn {
    pub async fn connect(endpoint: &str) -> anyhow::Result<Conn> {
        Ok(Conn {
            client: Client::connect(client_config(endpoint))
                .await
                .with_context(|| format!("idem {endpoint}"))?,
        })
    }

    fn request(key: &str, value: &[u8]) -> ReserveRequest {
        // The fingerprint of the request the key protects: computed per call, as a
        // service calling Idem does.
        ReserveRequest::new(
            SCOPE,
            key.as_bytes().to_vec(),
            Fingerprint::of_request("PUT", "/kv", value),
        )
    }

    pub async fn reserve(&mut self, key: &str, value: &[u8]) -> anyhow::Result<Outcome> {
        Ok(
            match self.client.reserve(&Conn::request(key, value)).await? {
                Reservation::New(_) => Outcome::Created,
                Reservation::Replay(_) => Outcome::Existed,
                Reservation::InFlight { .. } => Outcome::Other("in_flight"),
                Reservation::Mismatch { .. } => Outcome::Other("mismatch"),
            },
        )
    }

    /// Reserve, then Complete with `value` as the response body: a later Reserve of the
    /// key replays `value`.
    pub async fn reserve_and_complete(
        &mut self,
        key: &str,
        value: &[u8],
    ) -> anyhow::Result<Outcome> {
        match self.client.reserve(&Conn::request(key, value)).await? {
            Reservation::New(lease) => {
                let response = StoredResponse {
                    status: 200,
                    headers: vec![],
                    body: value.to_vec(),
                };
                self.client.complete(&lease, &response).await?;
                Ok(Outcome::Created)
            }
            other => bail!("preload Reserve answered {other:?}"),
        }
    }
}
