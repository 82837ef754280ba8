//! Idem's Raft layer: one openraft group per (region, shard), each backed by the node's
//! shared RocksDB engines (`idem-storage`) and talking to its peers over tonic.
//!
//! openraft's types stay inside this crate: the rest of Idem sees `Group` (submit a
//! command, read a record linearizably, watch health), `Router` (find a group) and the
//! internal gRPC service that peers call.

pub mod batch;
pub mod codec;
mod forward;
mod group;
mod log_store;
mod network;
mod router;
mod service;
mod state_machine;
#[cfg(test)]
mod storage_suite;
mod types;

pub use group::{Group, GroupConfig, GroupError, GroupHealth, NodeIdentity, Stamper};
pub use network::Channels;
pub use router::{GroupId, Router};
pub use service::RaftService;
pub use state_machine::empty_applied_state;
pub use types::Peer;
