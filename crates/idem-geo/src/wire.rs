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
    /// The sending node (0: a node of an earlier release).
    #[serde(default)]
    pub from_node: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub hlc: u64,
    pub results: Vec<Result<CommandResult, GroupError>>,
    /// The answering node, and its stamp clock when it answered (0: a node of an
    /// earlier release): the sender measures its clock offset from them.
    #[serde(default)]
    pub node: u64,
    #[serde(default)]
    pub clock_ms: u64,
}

/// Record changes for the group of `shard`: encoded `Shipped` entries (versioned).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MergeRequest {
    pub shard: u32,
    #[serde(with = "idem_core::bin_serde::list")]
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
    #[serde(with = "idem_core::bin_serde::opt")]
    pub after: Option<Vec<u8>>,
    pub limit: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchResponse {
    /// Encoded `Shipped` records.
    #[serde(with = "idem_core::bin_serde::list")]
    pub records: Vec<Vec<u8>>,
    #[serde(with = "idem_core::bin_serde::opt")]
    pub next: Option<Vec<u8>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::codec::{encode_shipped, Shipped};
    use idem_core::{
        ClaimId, CommandResult, Fence, Fingerprint, Header, Phase, Record, ReserveOutcome,
        StoredResponse,
    };
    use idem_raft::codec::{decode, encode};

    fn response(seed: u8, len: usize) -> StoredResponse {
        StoredResponse {
            status: 200,
            headers: vec![Header {
                name: "etag".into(),
                value: vec![seed; 16],
            }],
            body: (0..len)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect(),
        }
    }

    fn record(resp: StoredResponse) -> Record {
        Record {
            expires_ms: 9,
            created_ms: 1,
            fingerprint: Fingerprint::default(),
            generation: 1,
            phase: Phase::Completed,
            claim: ClaimId::default(),
            lease_expires_ms: 5,
            attempts: 1,
            last_attempt_ms: 1,
            first_attempt_ms: 1,
            witnesses: 3,
            is_final: true,
            response: Some(resp),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(6))]

        /// Every Geo payload that can carry a response stays within its bytes plus
        /// 1 KiB, and decodes to what was sent.
        #[test]
        fn a_1_mib_response_costs_its_bytes_plus_at_most_1_kib(seed in proptest::prelude::any::<u8>()) {
            let resp = response(seed, 1 << 20);
            let size = resp.size();
            let key = Key { tenant: "t".into(), scope: "s".into(), key: vec![seed; 64] };
            let shipped = encode_shipped(&Shipped { enqueued_ms: 1, key: key.clone(), record: record(resp.clone()) });
            let apply = ApplyRequest {
                hlc: 1,
                calls: vec![Call {
                    shard: 0,
                    key: key.clone(),
                    op: Op::Complete { fence: Fence::default(), response: resp.clone(), quorum: 2 },
                }],
                from_node: 1,
            };
            let answer = ApplyResponse {
                hlc: 1,
                results: vec![Ok(CommandResult::Reserve {
                    outcome: ReserveOutcome::Replay { fence: Fence::default(), response: resp.clone() },
                    attempt: 1,
                    since_previous_ms: None,
                })],
                node: 4,
                clock_ms: 1,
            };
            let merge = MergeRequest { shard: 0, entries: vec![shipped.clone()] };
            let fetch = FetchResponse { records: vec![shipped.clone()], next: Some(key.key.clone()) };
            let sizes = [
                ("shipped record", shipped.len()),
                ("apply request", encode(&apply).len()),
                ("apply response", encode(&answer).len()),
                ("merge request", encode(&merge).len()),
                ("fetch response", encode(&fetch).len()),
            ];
            for (what, n) in sizes {
                proptest::prop_assert!(n <= size + 1024, "{what}: {n} bytes for a {size}-byte response");
            }
            let back: MergeRequest = decode(&encode(&merge)).unwrap();
            proptest::prop_assert_eq!(back.entries, vec![shipped.clone()]);
            let back: FetchResponse = decode(&encode(&fetch)).unwrap();
            proptest::prop_assert_eq!(back.records, vec![shipped]);
            proptest::prop_assert_eq!(back.next, Some(key.key));
        }
    }

    /// Every decoder of bytes a peer sends, or that a node stored: arbitrary bytes, and
    /// valid encodings with bytes changed, give a value or an error, never a panic or
    /// an allocation the input does not pay for.
    fn decode_everything(bytes: &[u8]) {
        let _ = decode::<ApplyRequest>(bytes);
        let _ = decode::<ApplyResponse>(bytes);
        let _ = decode::<MergeRequest>(bytes);
        let _ = decode::<MergeResponse>(bytes);
        let _ = decode::<DigestRequest>(bytes);
        let _ = decode::<DigestResponse>(bytes);
        let _ = decode::<FetchRequest>(bytes);
        let _ = decode::<FetchResponse>(bytes);
        let _ = decode::<idem_core::Command>(bytes);
        let _ = idem_core::codec::decode_shipped(bytes);
        let _ = idem_core::codec::decode_record(bytes);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        #[test]
        fn peer_and_stored_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            decode_everything(&bytes);
            // With the current version byte, so the payload decoder itself is reached.
            let mut v = vec![2u8];
            v.extend_from_slice(&bytes);
            decode_everything(&v);
        }

        #[test]
        fn changed_valid_encodings_never_panic_a_decoder(
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..8),
        ) {
            let key = Key { tenant: "t".into(), scope: "s".into(), key: b"k".to_vec() };
            let resp = response(7, 64);
            let shipped = encode_shipped(&Shipped { enqueued_ms: 1, key: key.clone(), record: record(resp.clone()) });
            let samples = [
                encode(&ApplyRequest {
                    hlc: 1,
                    calls: vec![Call { shard: 0, key: key.clone(), op: idem_core::Op::Complete { fence: Fence::default(), response: resp.clone(), quorum: 2 } }],
                    from_node: 1,
                }),
                encode(&MergeRequest { shard: 0, entries: vec![shipped.clone()] }),
                encode(&FetchResponse { records: vec![shipped.clone()], next: Some(b"k".to_vec()) }),
                shipped,
                idem_core::codec::encode_record(&record(resp)),
            ];
            for s in samples {
                let mut b = s.clone();
                for (at, x) in &flips {
                    let i = at % b.len();
                    b[i] ^= x | 1;
                }
                decode_everything(&b);
            }
        }
    }
}
