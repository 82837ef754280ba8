//! The openraft type configuration.

use idem_core::{Command, CommandResult};
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// Idem's Raft types: log entries carry stamped `Command`s; applying one returns a
    /// `CommandResult`.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
);

/// A member of a group: node id and internal gRPC address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub id: u64,
    pub addr: String,
}

pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, idem_storage::SnapshotFile>;
