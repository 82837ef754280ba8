//! The history format: JSON lines. Each client call is recorded twice: an `invoke` line
//! when it is sent and a `complete` line when its answer (or its timeout) comes back. A
//! call with no `complete` line was still running when the run ended: its outcome is
//! indeterminate. Lines without a `type` (the earlier format, one line per finished
//! call) are read as completions.

use serde::{Deserialize, Serialize};
use std::sync::OnceLock;
use std::time::Instant;

/// What a call returned, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    New,
    InFlight,
    Replay,
    Mismatch,
    Ok,
    LeaseLost,
    /// The server answered UNAVAILABLE: the call may still have taken effect in some
    /// regions (a proposal's accepts, a Release applied by one region).
    Unavailable,
    /// No answer in time: the call may or may not have taken effect.
    Timeout,
    /// A definite failure (INVALID_ARGUMENT, NOT_FOUND, ...): it did not take effect.
    Error,
    /// Still running when the run ended (no `complete` line).
    Indeterminate,
}

impl Outcome {
    /// The call may have taken effect without the client knowing it did.
    pub fn maybe(&self) -> bool {
        matches!(
            self,
            Outcome::Unavailable | Outcome::Timeout | Outcome::Indeterminate
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    Reserve,
    Complete,
    Release,
    /// A holder's Extend of its lease (`trusted_until_ms`: the trust it extended to).
    Extend,
    /// A client's linearizable read of one key during the run (`phase`, `fence` and
    /// `value` as for `read`).
    Get,
    /// A region's record digest, taken after healing.
    Digest,
    /// The final read after healing: one key's record as one region's group reads it.
    Read,
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
    /// Harness clock (monotonic, in milliseconds since the Unix epoch at the start of
    /// the harness) at invocation and at completion (`u64::MAX`: indeterminate).
    pub start_ms: u64,
    pub end_ms: u64,
    pub outcome: Outcome,
    /// The fence granted (Reserve NEW) or presented (Complete, Release): "GEN:CLAIM";
    /// the record's fence (Read).
    #[serde(default)]
    pub fence: String,
    /// The lease end in the servers' time (informational).
    #[serde(default)]
    pub lease_expires_ms: u64,
    /// Reserve NEW: until when the client trusts the lease, on the harness clock (the
    /// SDK's monotonic measure from the send, minus the skew margin). 0: not recorded
    /// (histories of the earlier format).
    #[serde(default)]
    pub trusted_until_ms: u64,
    /// Reserve NEW: the grant took the key over from an expired holder.
    #[serde(default)]
    pub took_over: bool,
    /// Hex response bytes: stored (Complete), replayed (Reserve REPLAY), read (Read);
    /// the digest (Digest).
    #[serde(default)]
    pub value: String,
    /// Read: the record's phase ("absent", "reserved", "released", "completed",
    /// "completed-final"); Digest: "unreachable" when the node did not answer.
    #[serde(default)]
    pub phase: String,
}

impl Op {
    pub fn generation(&self) -> Option<u32> {
        self.fence.split_once(':')?.0.parse().ok()
    }

    /// The harness-clock time until which the holder of this NEW trusts it.
    pub fn trust_end(&self, skew_margin_ms: u64) -> u64 {
        if self.trusted_until_ms > 0 {
            self.trusted_until_ms
        } else {
            self.lease_expires_ms.saturating_sub(skew_margin_ms)
        }
    }
}

/// One line of the history.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Invoke(Op),
    Complete(Op),
}

/// The harness clock: wall time at the harness's first reading plus monotonic time
/// since, so that nemeses moving wall clocks (and NTP) never bend the history.
pub fn now_ms() -> u64 {
    static BASE: OnceLock<(Instant, u64)> = OnceLock::new();
    let (at, wall) = BASE.get_or_init(|| (Instant::now(), idem_client::now_ms()));
    wall + at.elapsed().as_millis() as u64
}

/// Read a history: events joined into one op per call (invocations without a
/// completion become indeterminate), or lines of the earlier one-op-per-line format.
pub fn parse(text: &str) -> Result<Vec<Op>, String> {
    let mut events = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1))?;
        let event = if value.get("type").is_some() {
            serde_json::from_value::<Event>(value)
        } else {
            serde_json::from_value::<Op>(value).map(Event::Complete)
        };
        events.push(event.map_err(|e| format!("line {}: {e}", i + 1))?);
    }
    Ok(join(events))
}

/// Events joined into one op per call, in id order; an invocation without its
/// completion becomes indeterminate.
pub fn join(events: impl IntoIterator<Item = Event>) -> Vec<Op> {
    let mut ops: Vec<Op> = Vec::new();
    let mut pending: std::collections::BTreeMap<u64, Op> = Default::default();
    for e in events {
        match e {
            Event::Invoke(op) => {
                pending.insert(op.id, op);
            }
            Event::Complete(op) => {
                pending.remove(&op.id);
                ops.push(op);
            }
        }
    }
    for (_, mut op) in pending {
        op.outcome = Outcome::Indeterminate;
        op.end_ms = u64::MAX;
        ops.push(op);
    }
    ops.sort_by_key(|o| o.id);
    ops
}

/// Write a history as events.
pub fn render(events: &[Event]) -> String {
    let mut text = String::new();
    for e in events {
        text.push_str(&serde_json::to_string(e).unwrap_or_default());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: u64, outcome: Outcome, end_ms: u64) -> Op {
        Op {
            id,
            client: 1,
            region: 0,
            call: Call::Complete,
            key: "k".into(),
            fingerprint: String::new(),
            start_ms: 10,
            end_ms,
            outcome,
            fence: "1:c".into(),
            lease_expires_ms: 0,
            trusted_until_ms: 0,
            took_over: false,
            value: "beef".into(),
            phase: String::new(),
        }
    }

    #[test]
    fn an_invocation_without_completion_is_indeterminate_and_earlier_lines_still_parse() {
        let events = vec![
            Event::Invoke(op(1, Outcome::Indeterminate, 0)),
            Event::Invoke(op(2, Outcome::Indeterminate, 0)),
            Event::Complete(op(1, Outcome::Ok, 20)),
        ];
        let mut text = render(&events);
        // A line of the earlier format.
        let mut old = serde_json::to_value(op(3, Outcome::Timeout, 30)).unwrap();
        old.as_object_mut().unwrap().remove("trusted_until_ms");
        old.as_object_mut().unwrap().remove("phase");
        text.push_str(&old.to_string());
        text.push('\n');
        let ops = parse(&text).unwrap();
        assert_eq!(ops.len(), 3);
        assert_eq!(
            (ops[0].id, &ops[0].outcome, ops[0].end_ms),
            (1, &Outcome::Ok, 20)
        );
        assert_eq!(ops[1].id, 2);
        assert_eq!(ops[1].outcome, Outcome::Indeterminate);
        assert_eq!(ops[1].end_ms, u64::MAX);
        assert_eq!(ops[2].outcome, Outcome::Timeout);
    }
}
