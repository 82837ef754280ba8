//! Versioned bytes for everything this crate stores or sends: a version byte, then
//! MessagePack with named fields. Named fields make the encoding self-describing, which
//! openraft's serde attributes (skipped and defaulted fields) require; a peer or a file
//! with another version byte is refused with a clear error.
//!
//! Version 2 writes byte strings (keys, response bodies and headers, shipped records) as
//! MessagePack `bin` values; version 1 wrote them as arrays of integers. Both are read.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;

pub const VERSION: u8 = 2;
/// The oldest version this build still reads.
pub const OLDEST_READ: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Serializing our own in-memory types into a Vec cannot fail.
    rmp_serde::encode::write_named(&mut out, value).expect("msgpack into a Vec");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    match bytes.split_first() {
        Some((v, rest)) if (OLDEST_READ..=VERSION).contains(v) => rmp_serde::from_slice(rest)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        Some((v, _)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown format version {v}"),
        )),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, "empty payload")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Entry, LogId, TypeConfig, Vote};
    use idem_core::{
        ClaimId, Command, CommandResult, Fence, Header, Key, Op, Record, ReserveOutcome,
        StoredResponse,
    };
    use openraft::vote::RaftLeaderIdExt;
    use serde::Serialize;

    #[test]
    fn raft_metadata_round_trips() {
        let vote = Vote::new(3, 2);
        assert_eq!(decode::<Vote>(&encode(&vote)).unwrap(), vote);
        let committed = Vote::new_committed(4, 1);
        assert_eq!(decode::<Vote>(&encode(&committed)).unwrap(), committed);
        let log_id = LogId::new(
            <TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(3, 1),
            9,
        );
        assert_eq!(decode::<LogId>(&encode(&log_id)).unwrap(), log_id);
        assert_eq!(
            decode::<Option<LogId>>(&encode(&Some(log_id))).unwrap(),
            Some(log_id)
        );
        assert!(decode::<Vote>(&[9, 1, 2]).is_err());
        assert!(decode::<Vote>(&[]).is_err());
    }

    /// What format version 1 wrote: byte strings as arrays of integers.
    #[derive(Serialize)]
    struct V1Header {
        name: String,
        value: Vec<u8>,
    }

    #[derive(Serialize)]
    struct V1Response {
        status: u32,
        headers: Vec<V1Header>,
        body: Vec<u8>,
    }

    #[test]
    fn version_1_byte_arrays_are_still_read() {
        let old = V1Response {
            status: 201,
            headers: vec![V1Header {
                name: "x".into(),
                value: vec![0, 200, 255],
            }],
            body: (0..=255u8).collect(),
        };
        let mut bytes = vec![1u8];
        rmp_serde::encode::write_named(&mut bytes, &old).unwrap();
        let new: StoredResponse = decode(&bytes).unwrap();
        assert_eq!(new.status, 201);
        assert_eq!(new.body, old.body);
        assert_eq!(new.headers[0].value, vec![0, 200, 255]);
        // Written now: version 2, and the body as one byte string.
        let again = encode(&new);
        assert_eq!(again[0], 2);
        assert!(again.len() < bytes.len());
        assert_eq!(decode::<StoredResponse>(&again).unwrap(), new);
    }

    fn big_response(seed: u64, len: usize) -> StoredResponse {
        let mut x = seed | 1;
        let body = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        StoredResponse {
            status: 200,
            headers: vec![Header {
                name: "content-type".into(),
                value: b"application/octet-stream".to_vec(),
            }],
            body,
        }
    }

    fn command(key: Key, op: Op) -> Command {
        Command {
            now_ms: 1_700_000_000_000,
            skew_margin_ms: 500,
            claim: ClaimId::default(),
            region_bit: 1,
            key,
            op,
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(6))]

        /// Every Raft payload that can carry a response stays within its bytes plus
        /// 1 KiB: a log entry, an AppendEntries request, a forwarded write and its
        /// answer.
        #[test]
        fn a_1_mib_response_costs_its_bytes_plus_at_most_1_kib(seed in proptest::prelude::any::<u64>()) {
            const MIB: usize = 1 << 20;
            let resp = big_response(seed, MIB);
            let size = resp.size();
            let key = Key { tenant: "t".into(), scope: "s".into(), key: vec![7; 64] };
            let complete = Op::Complete { fence: Fence::default(), response: resp.clone(), quorum: 2 };
            let record = Record {
                expires_ms: 1,
                created_ms: 1,
                fingerprint: idem_core::Fingerprint::default(),
                generation: 1,
                phase: idem_core::Phase::Completed,
                claim: ClaimId::default(),
                lease_expires_ms: 1,
                attempts: 1,
                last_attempt_ms: 1,
                first_attempt_ms: 1,
                witnesses: 1,
                is_final: true,
                response: Some(resp.clone()),
            };
            let merge = Op::Merge { record, guarded: true, quorum: 2, region: Some(1) };
            let leader = <TypeConfig as openraft::RaftTypeConfig>::LeaderId::new_committed(3, 1);
            let entry = Entry {
                log_id: LogId::new(leader, 9),
                payload: openraft::EntryPayload::Normal(command(key.clone(), complete.clone())),
            };
            let append = openraft::raft::AppendEntriesRequest::<TypeConfig> {
                vote: Vote::new_committed(3, 1),
                prev_log_id: None,
                leader_commit: None,
                entries: vec![entry.clone()],
            };
            let replay = CommandResult::Reserve {
                outcome: ReserveOutcome::Replay { fence: Fence::default(), response: resp.clone() },
                attempt: 2,
                since_previous_ms: Some(5),
            };
            let sizes = [
                ("command", encode(&command(key.clone(), complete.clone())).len()),
                ("merge command", encode(&command(key.clone(), merge)).len()),
                ("log entry", encode(&entry).len()),
                ("append entries", encode(&append).len()),
                ("forwarded write", encode(&crate::group::Forwarded::Write { key: key.clone(), op: complete }).len()),
                ("forwarded reply", encode(&crate::group::ForwardedReply::Write(replay)).len()),
            ];
            for (what, n) in sizes {
                proptest::prop_assert!(n <= size + 1024, "{what}: {n} bytes for a {size}-byte response");
            }
        }
    }
}
