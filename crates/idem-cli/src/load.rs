//! `idem load-records`: fill a stopped node's state engine with completed records,
//! through the same apply path the Raft log drives (command by command, in write
//! batches), for the scale benchmark (`benches/scale/run`): how much memory and disk a
//! node needs for N keys, and how long it takes to restart.

use clap::Args;
use idem_core::{ClaimId, Command, Fingerprint, Key, Op, StoredResponse};
use idem_server::Config;
use idem_storage::{ApplyItem, StateEngine};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args)]
pub struct LoadArgs {
    /// The node's config file (its `data_dir` is filled; the node must be stopped).
    #[arg(long)]
    pub config: PathBuf,
    /// Keys to load.
    #[arg(long, default_value_t = 10_000_000)]
    pub keys: u64,
    /// Commands per write batch.
    #[arg(long, default_value_t = 2_000)]
    pub batch: usize,
    /// Bytes of stored response per key (0: the record alone).
    #[arg(long, default_value_t = 0)]
    pub response_bytes: usize,
}

pub fn run(a: LoadArgs) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(Some(&a.config), std::iter::empty())?;
    cfg.validate()?;
    let state = StateEngine::open(&cfg.node.data_dir.join("state"))?;
    let now = idem_client::now_ms();
    let retention = cfg.limits.default_retention_ms;
    let applied = idem_raft::empty_applied_state();
    let started = Instant::now();
    let mut index = 1u64;
    let mut done = 0u64;
    while done < a.keys {
        let n = (a.keys - done).min(a.batch as u64);
        let mut cmds = Vec::with_capacity(2 * n as usize);
        for i in done..done + n {
            let key = Key {
                tenant: "default".into(),
                scope: "payments".into(),
                key: format!("order-{i:010}").into_bytes(),
            };
            let shard = idem_core::shard::shard_of(&key, cfg.cluster.shards);
            let fp = Fingerprint::of_request("POST", "/charge", &i.to_be_bytes());
            let claim = ClaimId {
                hlc: idem_core::Hlc::compose(now, 0) + i,
                region: 0,
                node: cfg.node.id as u16,
                nonce: i as u32,
            };
            let stamp = |op: Op| Command {
                now_ms: now,
                skew_margin_ms: cfg.cluster.skew_margin_ms,
                claim,
                region_bit: 1,
                key: key.clone(),
                op,
            };
            let reserve = stamp(Op::Reserve {
                fingerprint: fp,
                lease_ms: 30_000,
                retention_ms: retention,
                first_attempt_ms: 0,
            });
            let fence = idem_core::Fence {
                generation: 1,
                claim,
            };
            let complete = stamp(Op::Complete {
                fence,
                response: StoredResponse {
                    status: 200,
                    headers: vec![],
                    body: vec![b'x'; a.response_bytes],
                },
                quorum: 1,
            });
            cmds.push((shard, reserve));
            cmds.push((shard, complete));
        }
        // One write batch per shard, as each group's apply does.
        let mut shards: Vec<u32> = cmds.iter().map(|(s, _)| *s).collect();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            let items: Vec<ApplyItem> = cmds
                .iter()
                .filter(|(s, _)| *s == shard)
                .map(|(_, c)| {
                    index += 1;
                    ApplyItem::Command(c, index)
                })
                .collect();
            state.apply(shard, &items, &applied)?;
        }
        done += n;
        if done % 1_000_000 < n {
            eprintln!(
                "{done} keys, {:.0} keys/s",
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    state.compact();
    let stats = state.stats();
    println!(
        "{{\"keys\": {}, \"load_secs\": {:.1}, \"estimated_records\": {}, \"state_disk_bytes\": {}}}",
        a.keys,
        started.elapsed().as_secs_f64(),
        stats.estimated_records,
        stats.disk_bytes
    );
    Ok(ExitCode::SUCCESS)
}
