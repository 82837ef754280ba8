//! Versioned bytes for everything this crate stores or sends: a version byte, then
//! bincode. A peer or a file with another version is refused with a clear error.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;

pub const VERSION: u8 = 1;

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Serializing our own in-memory types into a Vec cannot fail.
    bincode::serialize_into(&mut out, value).expect("bincode into a Vec");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    match bytes.split_first() {
        Some((&VERSION, rest)) => bincode::deserialize(rest)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
        Some((v, _)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unknown format version {v}"),
        )),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, "empty payload")),
    }
}
