//! Anti-entropy: on the leader of each group, now and then, compare the group's bucket
//! digests with the same shard's in every other region and pull the records of every
//! bucket that differs, merging each one that differs from the local copy through the
//! group's Raft log. Pull only: every region pulls from every other, so all converge.
//! It repairs what the outbox could not deliver: an overflowed outbox, a dead-lettered
//! entry, a deferred merge given up on, or a region rebuilt from nothing.

use crate::link::Kind;
use crate::wire::{DigestRequest, DigestResponse, EntryResult, FetchRequest, FetchResponse};
use crate::Geo;
use idem_core::codec::decode_shipped;
use idem_core::merge::same_replicated;
use idem_raft::codec::{decode, encode};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Debug)]
pub struct AntiEntropyConfig {
    /// Time between two passes of one group (jittered).
    pub interval: Duration,
    /// Digest buckets per shard.
    pub buckets: u32,
    /// Records per fetched page.
    pub page: u32,
    pub timeout: Duration,
}

impl Default for AntiEntropyConfig {
    fn default() -> Self {
        AntiEntropyConfig {
            interval: Duration::from_secs(30),
            buckets: 64,
            page: 256,
            timeout: Duration::from_secs(10),
        }
    }
}

pub(crate) fn start(geo: &Geo, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    (0..geo.config().shards)
        .map(|shard| {
            let (geo, mut stop) = (geo.clone(), stop.clone());
            tokio::spawn(async move {
                let interval = geo.config().anti_entropy.interval;
                loop {
                    let wait = interval.mul_f64(0.75 + rand::random::<f64>() * 0.5);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    if geo.local_group(shard).is_some_and(|g| g.is_leader()) {
                        for region in geo.other_regions() {
                            match pass(&geo, shard, region).await {
                                Ok(0) => {}
                                Ok(n) => {
                                    tracing::info!(shard, region, records = n, "anti-entropy repaired records");
                                    geo.observer().repaired(region, n);
                                }
                                Err(e) => tracing::debug!(shard, region, error = %e, "anti-entropy pass failed"),
                            }
                        }
                    }
                }
            })
        })
        .collect()
}

/// One comparison with `region`: the number of records merged here.
pub async fn pass(geo: &Geo, shard: u32, region: u16) -> Result<u64, String> {
    let cfg = geo.config().anti_entropy.clone();
    let link = geo.link(region).ok_or("no link to the region")?;
    let group = geo.local_group(shard).ok_or("shard not running here")?;
    let req = DigestRequest {
        shard,
        buckets: cfg.buckets,
    };
    let bytes = link
        .call(Kind::Digest, encode(&req), cfg.timeout)
        .await
        .map_err(|e| e.to_string())?;
    let theirs: DigestResponse = decode(&bytes).map_err(|e| e.to_string())?;
    let engine = group.state().clone();
    let now = geo.stamper().wall_ms();
    let buckets = cfg.buckets;
    let (ours, _) = tokio::task::spawn_blocking(move || engine.bucket_digests(shard, buckets, now))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let differing: Vec<u32> = ours
        .iter()
        .zip(theirs.digests.iter())
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(bucket, _)| bucket as u32)
        .collect();
    // Each pass starts at another bucket and a bucket that fails does not end the pass,
    // so no bucket (one whose page keeps timing out, say) keeps the others from being
    // repaired; a link that fails several buckets in a row ends it.
    let first = (rand::random::<u64>() % differing.len().max(1) as u64) as usize;
    let mut repaired = 0;
    let mut failures = 0;
    let mut last_error = None;
    for &bucket in differing.iter().cycle().skip(first).take(differing.len()) {
        let (n, done) = repair_bucket(geo, &group, link, shard, bucket, buckets, &cfg).await;
        repaired += n;
        match done {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                last_error = Some(e);
                if failures >= MAX_FAILED_BUCKETS_IN_A_ROW {
                    break;
                }
            }
        }
    }
    match last_error {
        Some(e) if repaired == 0 => Err(e),
        Some(e) => {
            tracing::debug!(shard, region, repaired, error = %e, "anti-entropy pass repaired some buckets, not all");
            Ok(repaired)
        }
        None => Ok(repaired),
    }
}

/// Buckets in a row whose repair fails before a pass gives up on the region.
const MAX_FAILED_BUCKETS_IN_A_ROW: u32 = 3;

/// Page through one bucket of the remote region and merge every record that differs
/// from the local copy: the number merged, also when a later page failed.
async fn repair_bucket(
    geo: &Geo,
    group: &idem_raft::Group,
    link: &crate::link::RegionLink,
    shard: u32,
    bucket: u32,
    buckets: u32,
    cfg: &AntiEntropyConfig,
) -> (u64, Result<(), String>) {
    let mut repaired = 0;
    let mut after = None;
    loop {
        let req = FetchRequest {
            shard,
            bucket,
            buckets,
            after: after.take(),
            limit: cfg.page,
        };
        let page = match link.call(Kind::Fetch, encode(&req), cfg.timeout).await {
            Err(e) => return (repaired, Err(e.to_string())),
            Ok(bytes) => match decode::<FetchResponse>(&bytes) {
                Err(e) => return (repaired, Err(e.to_string())),
                Ok(p) => p,
            },
        };
        for raw in &page.records {
            let Ok(s) = decode_shipped(raw) else {
                continue;
            };
            let local = match group.read_local(&s.key) {
                Ok(l) => l,
                Err(e) => return (repaired, Err(e.to_string())),
            };
            if local
                .as_ref()
                .is_some_and(|l| same_replicated(l, &s.record))
            {
                continue;
            }
            if geo.merge_record(shard, s.key, s.record).await == EntryResult::Merged {
                repaired += 1;
            }
        }
        match page.next {
            Some(n) => after = Some(n),
            None => return (repaired, Ok(())),
        }
    }
}
