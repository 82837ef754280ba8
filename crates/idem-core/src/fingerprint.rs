//! The 32-byte request fingerprint: what makes "the same request" the same.
//!
//! SDKs and middleware compute it from the method, the path and the canonical body; the
//! server only compares fingerprints, it never sees the request itself.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of one request. Fields are length-prefixed so that no two different
    /// `(method, path, body)` triples hash the same bytes.
    pub fn of_request(method: &str, path: &str, body: &[u8]) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(b"idem-fingerprint-v1");
        for part in [method.as_bytes(), path.as_bytes(), body] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        Fingerprint(h.finalize().into())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Fingerprint> {
        <[u8; 32]>::try_from(bytes).ok().map(Fingerprint)
    }

    pub fn from_hex(s: &str) -> Option<Fingerprint> {
        hex::decode(s)
            .ok()
            .and_then(|b| Fingerprint::from_slice(&b))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_hex()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_separated() {
        let a = Fingerprint::of_request("POST", "/a", b"bc");
        let b = Fingerprint::of_request("POST", "/ab", b"c");
        assert_ne!(a, b);
        assert_eq!(a, Fingerprint::of_request("POST", "/a", b"bc"));
    }

    #[test]
    fn hex_round_trip() {
        let a = Fingerprint::of_request("GET", "/", b"");
        assert_eq!(Fingerprint::from_hex(&a.to_hex()), Some(a));
        assert_eq!(Fingerprint::from_hex("abcd"), None);
        assert_eq!(Fingerprint::from_hex("zz"), None);
    }
}
