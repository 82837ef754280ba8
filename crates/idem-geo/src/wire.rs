//! The payloads of the `Geo` service. Each travels as versioned bytes (the `idem-raft`
//! codec: a version byte, then MessagePack with named fields), so nodes of adjacent
//! releases understand each other during a rolling upgrade.

use idem_core::{CommandResult, Key, Op};
use idem_raft::GroupError;
use serde::{Deserialize, Serialize};

/// One command for the receiving region's group of `shard`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Call {
    pub shard: u32,
    pub key: Key,
    pub op: Op,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// The sender's hybrid logical clock, to advance the receiver's.
    pub hlc: u64,
    pub calls: Vec<Call>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub hlc: u64,
    pub results: Vec<Result<CommandResult, GroupError>>,
}

/// Record changes for the group of `shard`: encoded `Shipped` entries (versioned).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MergeRequest {
    pub shard: u32,
    pub entries: Vec<Vec<u8>>,
}

/// What the receiver did with one shipped entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryResult {
    /// Merged (or already contained, or expired and dropped).
    Merged,
    /// The acceptor rules forbid it now; the receiver offers it again itself later.
    Deferred,
    /// The entry cannot be read or is not acceptable: sending it again will not help.
    Invalid(String),
    /// The receiving group could not take it now (no leader, timeout): send it again.
    Failed(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MergeResponse {
    pub results: Vec<EntryResult>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DigestRequest {
    pub shard: u32,
    pub buckets: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DigestResponse {
    pub digests: Vec<[u8; 16]>,
    pub records: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchRequest {
    pub shard: u32,
    pub bucket: u32,
    pub buckets: u32,
    /// Continue after this record key (exclusive).
    pub after: Option<Vec<u8>>,
    pub limit: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchResponse {
    /// Encoded `Shipped` records.
    pub records: Vec<Vec<u8>>,
    pub next: Option<Vec<u8>>,
}
