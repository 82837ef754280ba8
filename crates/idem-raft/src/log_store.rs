//! openraft's log storage over the node's log engine (one key range per group).

use crate::codec::{decode, encode};
use crate::types::{Entry, LogId, TypeConfig, Vote};
use idem_storage::{LogEngine, Shard, COMMITTED, PURGED, VOTE};
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

/// Most entries one read returns; openraft asks again for the rest.
const MAX_READ_ENTRIES: usize = 4096;

#[derive(Clone)]
pub struct LogStore {
    engine: LogEngine,
    shard: Shard,
}

impl LogStore {
    pub fn new(engine: LogEngine, shard: Shard) -> Self {
        LogStore { engine, shard }
    }

    fn blocking<T, F>(&self, f: F) -> impl std::future::Future<Output = io::Result<T>>
    where
        F: FnOnce(LogEngine, Shard) -> io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let engine = self.engine.clone();
        let shard = self.shard;
        async move {
            tokio::task::spawn_blocking(move || f(engine, shard))
                .await
                .map_err(io::Error::other)?
        }
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, name: &str) -> io::Result<Option<T>> {
        match self.engine.get_state(self.shard, name)? {
            None => Ok(None),
            Some(b) => decode(&b),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> io::Result<Vec<Entry>> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => u64::MAX,
        };
        let raw = self
            .engine
            .entries(self.shard, start, end, MAX_READ_ENTRIES)?;
        raw.iter().map(|(_, b)| decode::<Entry>(b)).collect()
    }

    async fn read_vote(&mut self) -> io::Result<Option<Vote>> {
        self.get_meta(VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> io::Result<LogState<TypeConfig>> {
        let last_purged: Option<LogId> = self.get_meta(PURGED)?;
        let last = match self.engine.last_entry(self.shard)? {
            Some((_, b)) => Some(decode::<Entry>(&b)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> io::Result<()> {
        let bytes = encode(vote);
        self.blocking(move |e, s| Ok(e.put_state(s, VOTE, &bytes, true)?))
            .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> io::Result<()> {
        // Not synced: a lost committed index is recovered from the leader.
        self.engine
            .put_state(self.shard, COMMITTED, &encode(&committed), false)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> io::Result<Option<LogId>> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> io::Result<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Encoding and the WAL write (an entry may carry a 1 MiB response) run on a
        // blocking thread, as does the wait for room in the sync queue.
        let entries: Vec<Entry> = entries.into_iter().collect();
        self.blocking(move |engine, shard| {
            let encoded: Vec<(u64, Vec<u8>)> = entries
                .iter()
                .map(|e| (e.log_id.index, encode(e)))
                .collect();
            engine.append_group_commit(
                shard,
                &encoded,
                Box::new(move |r| callback.io_completed(r.map_err(io::Error::other))),
            )?;
            Ok(())
        })
        .await
    }

    async fn truncate_after(&mut self, last: Option<LogId>) -> io::Result<()> {
        let from = last.map_or(0, |l| l.index + 1);
        self.blocking(move |e, s| Ok(e.truncate_from(s, from)?))
            .await
    }

    async fn purge(&mut self, log_id: LogId) -> io::Result<()> {
        let meta = encode(&log_id);
        let upto = log_id.index;
        self.blocking(move |e, s| Ok(e.purge_upto(s, upto, &meta)?))
            .await
    }
}
