//! Idem's Raft layer: one openraft group per (region, shard), each backed by the node's
//! shared RocksDB engines (`idem-storage`) and talking to its peers over tonic.
//!
//! openraft's types stay inside this crate: the rest of Idem sees `Group` (submit a
//! command, read a record linearizably, watch health), `Router` (find a group) and the
//! internal gRPC service that peers call.

/// Largest message a node sends to or accepts from a peer (Raft, forwarding, regions).
pub const MAX_PEER_MESSAGE_BYTES: usize = 64 << 20;
/// Most bytes one batch of requests and the answers it may bring back may take: half a
/// peer message, so that the estimate's slack never reaches the message limit.
pub const MAX_BATCH_BYTES: usize = MAX_PEER_MESSAGE_BYTES / 2;
/// Most entry bytes one AppendEntries carries (the first entry travels whatever its
/// size): a follower catching up on a long backlog of large entries receives it in
/// pieces, each with a deadline it can meet (see [`APPEND_BYTES_PER_MS`]).
pub const MAX_APPEND_BYTES: usize = 1 << 20;
/// The slowest rate at which a follower is expected to receive, decode and persist
/// entry bytes (512 KB/s, far below any build on any disk). openraft hands each
/// AppendEntries a time-to-live of one heartbeat interval; an AppendEntries is given
/// that plus one millisecond per this many bytes it carries, so that a large entry is
/// not cut off, and resent, forever (heartbeats travel separately, so a long
/// AppendEntries does not delay them).
pub const APPEND_BYTES_PER_MS: usize = 512;

pub mod batch;
pub mod clock_health;
pub mod codec;
mod forward;
mod group;
pub mod incarnations;
mod log_store;
mod network;
mod router;
mod service;
mod state_machine;
#[cfg(test)]
mod storage_suite;
mod types;

pub use group::{Group, GroupConfig, GroupError, GroupHealth, LogPosition, NodeIdentity, Stamper};
pub use incarnations::Incarnations;
pub use network::Channels;
pub use router::{GroupId, Router};
pub use service::{Gate, Gates, RaftService};
pub use state_machine::empty_applied_state;
pub use types::Peer;
