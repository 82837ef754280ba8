//! Versioned bytes for everything this crate stores or sends: a version byte, then
//! MessagePack with named fields. Named fields make the encoding self-describing, which
//! openraft's serde attributes (skipped and defaulted fields) require; a peer or a file
//! with another version byte is refused with a clear error.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;

pub const VERSION: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Serializing our own in-memory types into a Vec cannot fail.
    rmp_serde::encode::write_named(&mut out, value).expect("msgpack into a Vec");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    match bytes.split_first() {
        Some((&VERSION, rest)) => rmp_serde::from_slice(rest)
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
    use crate::types::{LogId, TypeConfig, Vote};
    use openraft::vote::RaftLeaderIdExt;

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
}
