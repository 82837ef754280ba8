//! What this node knows of its peers' incarnations (`idem_storage::Identity`), and which
//! other regions have ever answered it.
//!
//! Every Raft message a node sends or answers names its sender's node id and
//! incarnation. The first time a peer's incarnation is seen it is recorded durably
//! *before* the message is acted on (before a vote or an acknowledgement of that peer is
//! counted); after that, a message from the same node id with another incarnation comes
//! from a node that lost its data directory, and is refused: it forgot what it voted and
//! acknowledged. A region is recorded the first time it answers this node, again before
//! the answer is used, so that a region that lost every node's data can be told from a
//! region that never took part.
//!
//! Kept in the log engine's `raft_state` under a shard number no group uses.

use idem_storage::{LogEngine, Shard, StorageError};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// The `raft_state` shard of node-level values (no group has it).
const NODE_SHARD: Shard = u32::MAX;
const PEER: &str = "peer/";
const REGION: &str = "region/";

/// A message from a node whose incarnation differs from the one recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stale {
    pub node: u64,
    pub known: u64,
    pub got: u64,
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "STALE_INCARNATION: node {} is incarnation {:016x} here, not {:016x}: its data directory was lost and it must rejoin (idem server --rejoin)",
            self.node, self.known, self.got
        )
    }
}

pub struct Incarnations {
    node: u64,
    incarnation: u64,
    log: LogEngine,
    peers: Mutex<BTreeMap<u64, u64>>,
    regions: Mutex<BTreeSet<u16>>,
}

impl Incarnations {
    /// This node (`node`, `incarnation`) and what its log engine recorded of others.
    pub fn open(log: LogEngine, node: u64, incarnation: u64) -> Result<Incarnations, StorageError> {
        let mut peers = BTreeMap::new();
        for (id, v) in log.states_with_prefix(NODE_SHARD, PEER)? {
            if let (Ok(id), Ok(b)) = (id.parse::<u64>(), <[u8; 8]>::try_from(v.as_slice())) {
                peers.insert(id, u64::from_be_bytes(b));
            }
        }
        let regions = log
            .states_with_prefix(NODE_SHARD, REGION)?
            .into_iter()
            .filter_map(|(r, _)| r.parse::<u16>().ok())
            .collect();
        Ok(Incarnations {
            node,
            incarnation,
            log,
            peers: Mutex::new(peers),
            regions: Mutex::new(regions),
        })
    }

    /// This node's id and incarnation, as its messages carry them.
    pub fn me(&self) -> (u64, u64) {
        (self.node, self.incarnation)
    }

    /// The incarnation recorded for `node`, if any.
    pub fn known(&self, node: u64) -> Option<u64> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
    }

    /// Admit a message from `node` of `incarnation` (0: a peer of an earlier release,
    /// which does not say): recorded durably if it is the first, refused if it is not
    /// the one recorded.
    pub fn admit(&self, node: u64, incarnation: u64) -> Result<(), AdmitError> {
        if incarnation == 0 || node == 0 {
            return Ok(());
        }
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match peers.get(&node) {
            Some(&known) if known == incarnation => Ok(()),
            Some(&known) => Err(AdmitError::Stale(Stale {
                node,
                known,
                got: incarnation,
            })),
            None => {
                self.record(node, incarnation)?;
                peers.insert(node, incarnation);
                Ok(())
            }
        }
    }

    /// Replace `node`'s recorded incarnation (it rejoins with a new data directory).
    pub fn replace(&self, node: u64, incarnation: u64) -> Result<(), StorageError> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        self.record(node, incarnation)?;
        peers.insert(node, incarnation);
        Ok(())
    }

    fn record(&self, node: u64, incarnation: u64) -> Result<(), StorageError> {
        self.log.put_state(
            NODE_SHARD,
            &format!("{PEER}{node}"),
            &incarnation.to_be_bytes(),
            true,
        )
    }

    /// Region `region` answered this node: recorded durably the first time, before the
    /// answer is used.
    pub fn region_answered(&self, region: u16) -> Result<(), StorageError> {
        let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        if regions.contains(&region) {
            return Ok(());
        }
        self.log
            .put_state(NODE_SHARD, &format!("{REGION}{region}"), &[1], true)?;
        regions.insert(region);
        Ok(())
    }

    /// Whether `region` ever answered this node.
    pub fn seen_region(&self, region: u16) -> bool {
        self.regions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&region)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("{0}")]
    Stale(Stale),
    #[error("cannot record a peer's incarnation: {0}")]
    Storage(#[from] StorageError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_incarnation_seen_is_kept_across_restarts_and_another_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = LogEngine::open(dir.path()).unwrap();
            let inc = Incarnations::open(log, 1, 0x11).unwrap();
            inc.admit(2, 0x22).unwrap();
            inc.admit(2, 0x22).unwrap();
            // A peer of an earlier release says nothing: admitted, nothing recorded.
            inc.admit(3, 0).unwrap();
            assert_eq!(inc.known(3), None);
            inc.region_answered(4).unwrap();
        }
        let log = LogEngine::open(dir.path()).unwrap();
        let inc = Incarnations::open(log, 1, 0x11).unwrap();
        assert_eq!(inc.known(2), Some(0x22));
        assert!(inc.seen_region(4));
        assert!(!inc.seen_region(5));
        match inc.admit(2, 0x99) {
            Err(AdmitError::Stale(s)) => {
                assert_eq!((s.known, s.got), (0x22, 0x99));
                assert!(s.to_string().contains("--rejoin"));
            }
            other => panic!("{other:?}"),
        }
        // After a rejoin the new incarnation is the one admitted.
        inc.replace(2, 0x99).unwrap();
        inc.admit(2, 0x99).unwrap();
        assert!(inc.admit(2, 0x22).is_err());
    }
}
