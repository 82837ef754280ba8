//! Idem's RocksDB engines, two per node and shared by all its groups (as in TiKV):
//!
//! - the **log engine** (`raft_log`, `raft_state`): Raft log entries and per-group Raft
//!   state, every append made durable with one WAL sync per batch;
//! - the **state engine** (`records`, `outbox`, `dlq`, `meta`): the state machine itself.
//!   Records live here, never in a map in memory, so memory stays bounded whatever the
//!   key count. Apply writes records and `last_applied` in one write batch.
//!
//! This crate knows nothing of gRPC or of openraft: Raft metadata arrives as opaque,
//! already-versioned bytes from `idem-raft`.

mod disk;
mod error;
mod identity;
pub mod keys;
mod log_engine;
mod snapshot;
mod state_engine;

pub use disk::{create_dir_durable, sync_dir, sync_parent, DiskHealth};
pub use error::StorageError;
pub use identity::{Found, Identity};
pub use log_engine::{LogEngine, COMMITTED, PURGED, VOTE};
pub use snapshot::SnapshotFile;
pub use state_engine::{
    bucket_of, ApplyItem, EngineStats, OutboxConfig, OutboxEntry, Ship, StateEngine,
};

/// Identifies one group's data inside a node's engines: the shard number. A node belongs
/// to one region, so the shard alone names the group locally.
pub type Shard = u32;
