//! The history format: one JSON object per line, one line per finished client call.

use serde::{Deserialize, Serialize};

/// What a Reserve, Complete or Release call returned, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    New,
    InFlight,
    Replay,
    Mismatch,
    Ok,
    LeaseLost,
    /// No answer in time: the call may or may not have taken effect.
    Timeout,
    /// A definite failure (UNAVAILABLE, INVALID_ARGUMENT, ...): it did not take effect.
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    Reserve,
    Complete,
    Release,
    /// A region's record digest, taken after healing.
    Digest,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    pub id: u64,
    pub client: u32,
    /// The region the call was sent to.
    pub region: u32,
    pub call: Call,
    pub key: String,
    /// Hex fingerprint (Reserve).
    #[serde(default)]
    pub fingerprint: String,
    /// Client clock at invocation and at completion.
    pub start_ms: u64,
    pub end_ms: u64,
    pub outcome: Outcome,
    /// The fence granted (Reserve NEW) or presented (Complete, Release): "GEN:CLAIM".
    #[serde(default)]
    pub fence: String,
    #[serde(default)]
    pub lease_expires_ms: u64,
    /// Hex response bytes: stored (Complete) or replayed (Reserve REPLAY); the digest.
    #[serde(default)]
    pub value: String,
}

impl Op {
    pub fn generation(&self) -> Option<u32> {
        self.fence.split_once(':')?.0.parse().ok()
    }
}

pub fn parse(text: &str) -> Result<Vec<Op>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}
