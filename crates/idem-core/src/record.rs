//! The stored state of one key in one region.

use crate::{ClaimId, Fence, Fingerprint, StoredResponse};
use serde::{Deserialize, Serialize};

/// Where a key is in its life. The order matters to the merge (Reserved < Released <
/// Completed) and the byte values are part of the on-disk format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    Reserved = 1,
    Released = 2,
    Completed = 3,
}

impl Phase {
    pub fn from_byte(b: u8) -> Option<Phase> {
        match b {
            1 => Some(Phase::Reserved),
            2 => Some(Phase::Released),
            3 => Some(Phase::Completed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Reserved => "reserved",
            Phase::Released => "released",
            Phase::Completed => "completed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When the record stops existing (`created_ms + retention`). First in the encoding so
    /// the compaction filter reads it without decoding the rest.
    pub expires_ms: u64,
    pub created_ms: u64,
    pub fingerprint: Fingerprint,
    /// Increases each time the key is granted again after a Release or a lease expiry.
    pub generation: u32,
    pub phase: Phase,
    /// The claim that holds (Reserved), gave up (Released) or completed the key.
    pub claim: ClaimId,
    pub lease_expires_ms: u64,
    /// Reserves seen for this key with this fingerprint, across all generations.
    pub attempts: u32,
    /// Time of the latest Reserve, for the server-measured retry delay.
    pub last_attempt_ms: u64,
    /// The earliest first-attempt time any caller reported for this key (0 = unknown).
    pub first_attempt_ms: u64,
    /// Bit i set: region i stored the completion while the lease was live there.
    pub witnesses: u32,
    /// The completion is final: it is on a majority and may be replayed.
    pub is_final: bool,
    pub response: Option<StoredResponse>,
}

impl Record {
    pub fn fence(&self) -> Fence {
        Fence {
            generation: self.generation,
            claim: self.claim,
        }
    }

    /// Expired by retention: reads treat the record as absent.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_ms
    }

    /// The holder's lease is still running at `now_ms` (no skew allowance).
    pub fn lease_live(&self, now_ms: u64) -> bool {
        self.phase == Phase::Reserved && now_ms < self.lease_expires_ms
    }
}
