//! The outbox relay: on the leader of each group, ship the group's queued changes to
//! every other region, in bounded batches, one batch in flight per destination, at a
//! bounded rate (so a region coming back after an outage is not flooded by the
//! backlog: the GitHub 2018 lesson), retrying with backoff and jitter. The receiver
//! merges them through its own Raft log. What was shipped is removed from the outbox
//! by an `OutboxAck` command through this group's log, so every replica trims alike;
//! entries the receiver refuses as invalid `dead_after_tries` times move to the
//! dead-letter queue instead.

use crate::link::Kind;
use crate::wire::{EntryResult, MergeRequest, MergeResponse};
use crate::Geo;
use idem_core::{Key, Op};
use idem_raft::codec::{decode, encode};
use idem_storage::{OutboxEntry, Ship};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Entries per shipped batch.
    pub batch: usize,
    /// Entries per second shipped to one destination by one group (catch-up rate).
    pub max_rate: f64,
    /// Entries queued per group and destination before changes are skipped.
    pub max_outbox: u64,
    /// A refused entry moves to the dead-letter queue after this many tries.
    pub dead_after_tries: u32,
    /// How often an idle relay looks for new entries.
    pub idle_poll: Duration,
    pub timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch: 256,
            max_rate: 5_000.0,
            max_outbox: 1_000_000,
            dead_after_tries: 5,
            idle_poll: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
        }
    }
}

/// What is waiting for one destination region on this node.
#[derive(Clone, Debug, Default)]
pub struct Backlog {
    pub queued: u64,
    /// Age of the oldest queued change.
    pub oldest_age: Duration,
    pub dead_letters: u64,
    /// Changes not queued because the outbox was full (anti-entropy repairs them).
    pub skipped: u64,
}

pub(crate) fn backlog(geo: &Geo) -> BTreeMap<u16, Backlog> {
    let now = geo.stamper().wall_ms();
    let mut out: BTreeMap<u16, Backlog> = geo
        .other_regions()
        .into_iter()
        .map(|r| (r, Backlog::default()))
        .collect();
    let mut dlq = BTreeMap::new();
    for shard in 0..geo.config().shards {
        let Some(g) = geo.local_group(shard) else {
            continue;
        };
        let engine = g.state();
        if shard == 0 {
            dlq = engine.dlq_depth().unwrap_or_default();
        }
        for (dest, b) in out.iter_mut() {
            if let Ok((len, skipped)) = engine.outbox_len(shard, *dest) {
                b.queued += len;
                b.skipped += skipped;
            }
            if let Ok(Some(oldest)) = engine.outbox_oldest_ms(shard, *dest) {
                let age = Duration::from_millis(now.saturating_sub(oldest));
                b.oldest_age = b.oldest_age.max(age);
            }
        }
    }
    for (dest, b) in out.iter_mut() {
        b.dead_letters = dlq.get(dest).copied().unwrap_or(0);
    }
    out
}

pub(crate) fn start(geo: &Geo, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for shard in 0..geo.config().shards {
        for dest in geo.other_regions() {
            let (geo, stop) = (geo.clone(), stop.clone());
            tasks.push(tokio::spawn(
                async move { run(geo, shard, dest, stop).await },
            ));
        }
    }
    tasks
}

fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>() * 0.5)
}

async fn run(geo: Geo, shard: u32, dest: u16, mut stop: watch::Receiver<bool>) {
    let cfg = geo.config().relay.clone();
    let mut backoff = Duration::from_millis(100);
    // Token bucket: `max_rate` entries per second, at most one second of burst.
    let mut tokens = cfg.max_rate;
    let mut refilled = Instant::now();
    let mut tries: HashMap<u64, u32> = HashMap::new();
    loop {
        let mut wait = cfg.idle_poll;
        if let Some(group) = geo.local_group(shard).filter(|g| g.is_leader()) {
            match ship_once(
                &geo,
                &group,
                shard,
                dest,
                &cfg,
                &mut tokens,
                &mut refilled,
                &mut tries,
            )
            .await
            {
                Ok(true) => {
                    backoff = Duration::from_millis(100);
                    wait = Duration::ZERO;
                }
                Ok(false) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::debug!(shard, dest, error = %e, "relay batch failed; backing off");
                    wait = jittered(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        if wait.is_zero() {
            tokio::task::yield_now().await;
            if *stop.borrow() {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Ship one batch. `Ok(true)`: something was shipped (look again at once).
#[allow(clippy::too_many_arguments)]
async fn ship_once(
    geo: &Geo,
    group: &idem_raft::Group,
    shard: u32,
    dest: u16,
    cfg: &RelayConfig,
    tokens: &mut f64,
    refilled: &mut Instant,
    tries: &mut HashMap<u64, u32>,
) -> Result<bool, String> {
    let elapsed = refilled.elapsed().as_secs_f64();
    *refilled = Instant::now();
    *tokens = (*tokens + elapsed * cfg.max_rate).min(cfg.max_rate.max(1.0));
    if *tokens < 1.0 {
        let need = (1.0 - *tokens) / cfg.max_rate.max(1.0);
        tokio::time::sleep(Duration::from_secs_f64(need)).await;
        return Ok(true);
    }
    let take = cfg.batch.min(tokens.floor() as usize).max(1);
    let engine = group.state().clone();
    let max_bytes = idem_raft::MAX_BATCH_BYTES;
    let batch =
        tokio::task::spawn_blocking(move || engine.outbox_read(shard, dest, take, max_bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    if batch.is_empty() {
        tries.clear();
        return Ok(false);
    }
    *tokens -= batch.len() as f64;
    let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
    let (ships, entries) = split_ships(batch);
    let answers = if entries.is_empty() {
        Vec::new()
    } else {
        let link = geo.link(dest).ok_or("no link to the destination")?;
        let sent = entries.len();
        let req = MergeRequest { shard, entries };
        let bytes = link
            .call(Kind::Merge, encode(&req), cfg.timeout)
            .await
            .map_err(|e| e.to_string())?;
        let resp: MergeResponse = decode(&bytes).map_err(|e| e.to_string())?;
        if resp.results.is_empty() || resp.results.len() > sent {
            return Err(format!("{} results for {sent} entries", resp.results.len()));
        }
        resp.results
    };
    let results = results_per_entry(&ships, answers);
    let mut upto = None;
    let mut dead = Vec::new();
    for (&seq, r) in seqs.iter().zip(results.iter()) {
        match r {
            EntryResult::Merged | EntryResult::Deferred => {
                tries.remove(&seq);
            }
            EntryResult::Invalid(why) => {
                let n = tries.entry(seq).or_insert(0);
                *n += 1;
                if *n >= cfg.dead_after_tries {
                    tracing::warn!(shard, dest, seq = seq, reason = %why, "outbox entry refused as invalid; moved to the dead-letter queue");
                    tries.remove(&seq);
                    dead.push(seq);
                } else {
                    upto = Some(seq);
                    break;
                }
            }
            EntryResult::Failed(_) => {
                upto = Some(seq);
                break;
            }
        }
    }
    let shipped_all = upto.is_none() && results.len() >= seqs.len();
    let upto = match upto {
        Some(s) => s,
        // Empty only if the first entry sent a record that went unanswered, which the
        // check of the answer's length excludes.
        None => match results.len().checked_sub(1).and_then(|i| seqs.get(i)) {
            Some(last) => last + 1,
            None => return Err("empty answer".into()),
        },
    };
    if seqs.first().is_some_and(|first| upto > *first) || !dead.is_empty() {
        group
            .submit(Key::default(), Op::OutboxAck { dest, upto, dead })
            .await
            .map_err(|e| e.to_string())?;
    }
    if shipped_all {
        Ok(true)
    } else {
        Err(format!("destination could not take entry {upto} yet"))
    }
}

/// What each entry of a read ships, without its bytes (`None`: a record to send, in
/// order), and the records to send.
fn split_ships(batch: Vec<OutboxEntry>) -> (Vec<Option<EntryResult>>, Vec<Vec<u8>>) {
    let mut entries = Vec::new();
    let ships = batch
        .into_iter()
        .map(|e| match e.ship {
            Ship::Record(b) => {
                entries.push(b);
                None
            }
            Ship::Nothing => Some(EntryResult::Merged),
            Ship::Unreadable(why) => Some(EntryResult::Invalid(why)),
        })
        .collect();
    (ships, entries)
}

/// One result per entry of a read, in order, as far as the destination's answers
/// (one per record sent, possibly fewer) reach: an entry that sends nothing has its
/// own result.
fn results_per_entry(ships: &[Option<EntryResult>], answers: Vec<EntryResult>) -> Vec<EntryResult> {
    let mut answers = answers.into_iter();
    let mut out = Vec::with_capacity(ships.len());
    for own in ships {
        match own {
            Some(r) => out.push(r.clone()),
            None => match answers.next() {
                Some(r) => out.push(r),
                None => break,
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_entry_gets_its_own_result_or_the_next_answer_as_far_as_answers_reach() {
        let ships = vec![
            None,
            Some(EntryResult::Merged),
            Some(EntryResult::Invalid("bad key".into())),
            None,
            Some(EntryResult::Merged),
            None,
        ];
        let got = results_per_entry(
            &ships,
            vec![EntryResult::Merged, EntryResult::Failed("no leader".into())],
        );
        assert_eq!(
            got,
            vec![
                EntryResult::Merged,
                EntryResult::Merged,
                EntryResult::Invalid("bad key".into()),
                EntryResult::Failed("no leader".into()),
                EntryResult::Merged,
            ],
            "the last record was not answered: it and nothing after it has a result"
        );
        // Nothing sent: every entry has its own result.
        assert_eq!(
            results_per_entry(&[Some(EntryResult::Merged)], Vec::new()),
            vec![EntryResult::Merged]
        );
    }

    #[test]
    fn only_records_are_sent() {
        let e = |seq, ship| OutboxEntry {
            seq,
            enqueued_ms: 0,
            ship,
        };
        let (ships, sent) = split_ships(vec![
            e(1, Ship::Record(vec![1])),
            e(2, Ship::Nothing),
            e(3, Ship::Unreadable("x".into())),
            e(4, Ship::Record(vec![4])),
        ]);
        assert_eq!(sent, vec![vec![1], vec![4]]);
        assert_eq!(
            ships,
            vec![
                None,
                Some(EntryResult::Merged),
                Some(EntryResult::Invalid("x".into())),
                None
            ]
        );
    }
}
