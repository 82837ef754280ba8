//! etcd: a three-member cluster on loopback (each member its own data dir, etcd's
//! defaults otherwise: the WAL is fsynced before an entry counts towards the commit, the
//! backend quota is the default), and a gRPC client of `etcdserverpb.KV/Txn` generated
//! from the hand-written subset in `proto/etcd/kv_subset.proto`.
//!
//! Put-if-absent is one transaction: `compare create_revision(key) == 0`, then `put`,
//! else `range` (the existing value comes back, as a REPLAY carries the stored response).

use crate::load::Outcome;
use crate::procs::{free_port, Procs};
use anyhow::{bail, Context};
use std::process::Command;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;

pub const MEMBERS: usize = 3;

/// Start the members; returns their client addresses.
pub async fn start(procs: &mut Procs) -> anyhow::Result<Vec<String>> {
    let ports: Vec<(u16, u16)> = (0..MEMBERS)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<anyhow::Result<_>>()?;
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{}=http://127.0.0.1:{peer}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    for (i, (client, peer)) in ports.iter().enumerate() {
        let name = format!("m{}", i + 1);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", &name])
            .arg("--data-dir")
            .arg(procs.path(&format!("etcd-{name}")))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args([
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args(["--initial-cluster", &cluster])
            .args(["--initial-cluster-token", "idem-compare"])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-level", "warn"]);
        // The Debian unit's environment file is not read; no ETCD_* variable leaks in.
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        procs.spawn(&format!("etcd-{name}"), cmd, "TERM")?;
    }
    let addrs: Vec<String> = ports
        .iter()
        .map(|(c, _)| format!("127.0.0.1:{c}"))
        .collect();
    for a in &addrs {
        let kv = Kv::connect(a)?;
        crate::procs::wait_ready("etcd", procs, Duration::from_secs(60), || {
            let mut kv = kv.clone();
            async move { kv.ready().await }
        })
        .await?;
    }
    Ok(addrs)
}

/// A handle on one member's KV service (a multiplexed HTTP/2 channel; cheap to clone).
#[derive(Clone)]
pub struct Kv {
    client: KvClient<Channel>,
}

impl Kv {
    pub fn connect(addr: &str) -> anyhow::Result<Kv> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Kv {
            client: KvClient::new(channel),
        })
    }

    /// A linearizable read: answers once the cluster has a leader.
    async fn ready(&mut self) -> anyhow::Result<()> {
        self.client
            .range(pb::RangeRequest {
                key: b"idem-compare-ready".to_vec(),
                ..Default::default()
            })
            .await
            .context("etcd range")?;
        Ok(())
    }

    pub async fn put_if_absent(&mut self, key: &str, value: &[u8]) -> anyhow::Result<Outcome> {
        use pb::compare::{CompareResult, CompareTarget, TargetUnion};
        use pb::request_op::Request;
        let key = key.as_bytes().to_vec();
        let txn = pb::TxnRequest {
            compare: vec![pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: key.clone(),
                target_union: Some(TargetUnion::CreateRevision(0)),
                range_end: vec![],
            }],
            success: vec![pb::RequestOp {
                request: Some(Request::RequestPut(pb::PutRequest {
                    key: key.clone(),
                    value: value.to_vec(),
                    ..Default::default()
                })),
            }],
            failure: vec![pb::RequestOp {
                request: Some(Request::RequestRange(pb::RangeRequest {
                    key,
                    ..Default::default()
                })),
            }],
        };
        let resp = self.client.txn(txn).await?.into_inner();
        if resp.succeeded {
            return Ok(Outcome::Created);
        }
        match resp.responses.first().and_then(|r| r.response.as_ref()) {
            Some(pb::response_op::Response::ResponseRange(r)) if r.kvs.len() == 1 => {
                Ok(Outcome::Existed)
            }
            other => bail!("txn failed its compare without the stored value: {other:?}"),
        }
    }
}
