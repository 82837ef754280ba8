//! Plain domain types shared by every layer: keys, claims, fences and stored responses.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The identity of one idempotency key: `(tenant, scope, key bytes)`.
///
/// The tenant always comes from the caller's credentials, never from a request body, so
/// two tenants can use the same scope and key without ever seeing each other's record.
/// `Key::default()` (all empty) is what commands about no key carry (`OutboxAck`,
/// `Touch`); no request can name it: a request's tenant is never empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub tenant: String,
    pub scope: String,
    #[serde(with = "crate::bin_serde")]
    pub key: Vec<u8>,
}

impl Key {
    /// About how many bytes the key takes on the wire.
    pub fn approx_bytes(&self) -> usize {
        self.tenant.len() + self.scope.len() + self.key.len() + 16
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.tenant,
            self.scope,
            String::from_utf8_lossy(&self.key)
        )
    }
}

/// One grant of a key. Unique: the HLC timestamp of the leader that minted it, its region
/// and node, and a random nonce. Ordered field by field (earliest claim first).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ClaimId {
    pub hlc: u64,
    pub region: u16,
    pub node: u16,
    pub nonce: u32,
}

impl fmt::Display for ClaimId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:016x}-{:04x}-{:04x}-{:08x}",
            self.hlc, self.region, self.node, self.nonce
        )
    }
}

impl std::str::FromStr for ClaimId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('-').collect();
        if parts.len() != 4 {
            return Err(format!(
                "claim id {s:?} is not HLC-REGION-NODE-NONCE in hex"
            ));
        }
        let bad = |what: &str| format!("claim id {s:?}: bad {what}");
        Ok(ClaimId {
            hlc: u64::from_str_radix(parts[0], 16).map_err(|_| bad("hlc"))?,
            region: u16::from_str_radix(parts[1], 16).map_err(|_| bad("region"))?,
            node: u16::from_str_radix(parts[2], 16).map_err(|_| bad("node"))?,
            nonce: u32::from_str_radix(parts[3], 16).map_err(|_| bad("nonce"))?,
        })
    }
}

/// The fence token a holder presents with Complete, Release and Extend.
/// A call with a fence that is not the record's current `(generation, claim)` is refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fence {
    pub generation: u32,
    pub claim: ClaimId,
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.generation, self.claim)
    }
}

impl std::str::FromStr for Fence {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (gen, claim) = s
            .split_once(':')
            .ok_or_else(|| format!("fence {s:?} is not GENERATION:CLAIM"))?;
        Ok(Fence {
            generation: gen
                .parse()
                .map_err(|_| format!("fence {s:?}: bad generation"))?,
            claim: claim.parse()?,
        })
    }
}

/// One response header (gRPC metadata or HTTP header) stored with a completion.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    #[serde(with = "crate::bin_serde")]
    pub value: Vec<u8>,
}

/// The response of the completed attempt, replayed byte for byte to every retry.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u32,
    pub headers: Vec<Header>,
    #[serde(with = "crate::bin_serde")]
    pub body: Vec<u8>,
}

impl StoredResponse {
    /// Bytes this response occupies, as counted against `Limits::max_response_bytes`.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|h| h.name.len() + h.value.len())
                .sum::<usize>()
    }
}
