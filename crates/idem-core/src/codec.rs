//! The versioned byte format of a record.
//!
//! Layout of version 1 (all integers big-endian):
//! `version u8 | expires_ms u64 | created_ms u64 | fingerprint [32] | generation u32 |
//! phase u8 | claim (hlc u64, region u16, node u16, nonce u32) | lease_expires_ms u64 |
//! attempts u32 | last_attempt_ms u64 | first_attempt_ms u64 | witnesses u32 | final u8 |
//! has_response u8 [ status u32 | n_headers u16 { name_len u16 name value_len u32 value }
//! | body_len u32 body ]`.
//!
//! `expires_ms` sits right after the version byte so that the compaction filter can
//! drop expired records by reading nine bytes. A new format gets a new version byte and
//! the decoder keeps reading every older one.

use crate::{ClaimId, Fingerprint, Header, Key, Phase, Record, StoredResponse};
use thiserror::Error;

pub const RECORD_VERSION: u8 = 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("empty input")]
    Empty,
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    #[error("truncated input: needed {needed} more bytes at offset {at}")]
    Truncated { at: usize, needed: usize },
    #[error("invalid {0}")]
    Invalid(&'static str),
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// Read only the expiry of an encoded record (for the compaction filter).
pub fn peek_expires_ms(bytes: &[u8]) -> Option<u64> {
    if bytes.first() != Some(&RECORD_VERSION) || bytes.len() < 9 {
        return None;
    }
    Some(u64::from_be_bytes(bytes[1..9].try_into().ok()?))
}

/// Where an encoded record (version 1) keeps its region-local retry bookkeeping
/// (`attempts`, `last_attempt_ms`, `first_attempt_ms`): `merge::digest_bytes` is the
/// encoding with these bytes zeroed.
pub const BOOKKEEPING_BYTES: std::ops::Range<usize> = 78..98;

/// An encoded record's bytes before and after its bookkeeping, without decoding or
/// copying it: `digest_bytes(&decode_record(b)?)` is `before | [0; 20] | after`.
pub fn replicated_parts(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    // The fields after the bookkeeping: witnesses u32, final u8, has_response u8.
    if bytes.first() != Some(&RECORD_VERSION) || bytes.len() < BOOKKEEPING_BYTES.end + 6 {
        return None;
    }
    Some((
        &bytes[..BOOKKEEPING_BYTES.start],
        &bytes[BOOKKEEPING_BYTES.end..],
    ))
}

pub fn encode_record(r: &Record) -> Vec<u8> {
    let resp_len = r.response.as_ref().map_or(0, |x| x.size() + 16);
    let mut out = Vec::with_capacity(96 + resp_len);
    out.push(RECORD_VERSION);
    out.extend_from_slice(&r.expires_ms.to_be_bytes());
    out.extend_from_slice(&r.created_ms.to_be_bytes());
    out.extend_from_slice(&r.fingerprint.0);
    out.extend_from_slice(&r.generation.to_be_bytes());
    out.push(r.phase as u8);
    put_claim(&mut out, &r.claim);
    out.extend_from_slice(&r.lease_expires_ms.to_be_bytes());
    out.extend_from_slice(&r.attempts.to_be_bytes());
    out.extend_from_slice(&r.last_attempt_ms.to_be_bytes());
    out.extend_from_slice(&r.first_attempt_ms.to_be_bytes());
    out.extend_from_slice(&r.witnesses.to_be_bytes());
    out.push(r.is_final as u8);
    match &r.response {
        None => out.push(0),
        Some(resp) => {
            out.push(1);
            out.extend_from_slice(&resp.status.to_be_bytes());
            // Lengths are bounded by `Limits` before anything is stored.
            out.extend_from_slice(&(resp.headers.len() as u16).to_be_bytes());
            for h in &resp.headers {
                out.extend_from_slice(&(h.name.len() as u16).to_be_bytes());
                out.extend_from_slice(h.name.as_bytes());
                out.extend_from_slice(&(h.value.len() as u32).to_be_bytes());
                out.extend_from_slice(&h.value);
            }
            out.extend_from_slice(&(resp.body.len() as u32).to_be_bytes());
            out.extend_from_slice(&resp.body);
        }
    }
    out
}

pub fn put_claim(out: &mut Vec<u8>, c: &ClaimId) {
    out.extend_from_slice(&c.hlc.to_be_bytes());
    out.extend_from_slice(&c.region.to_be_bytes());
    out.extend_from_slice(&c.node.to_be_bytes());
    out.extend_from_slice(&c.nonce.to_be_bytes());
}

/// A bounds-checked reader over untrusted bytes: never panics, always names what is short.
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, at: 0 }
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.at..end];
                self.at = end;
                Ok(s)
            }
            None => Err(CodecError::Truncated {
                at: self.at,
                needed: n - (self.buf.len() - self.at),
            }),
        }
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    pub fn claim(&mut self) -> Result<ClaimId, CodecError> {
        Ok(ClaimId {
            hlc: self.u64()?,
            region: self.u16()?,
            node: self.u16()?,
            nonce: self.u32()?,
        })
    }
    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.at..];
        self.at = self.buf.len();
        s
    }
    pub fn finish(self) -> Result<(), CodecError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            n => Err(CodecError::Trailing(n)),
        }
    }
}

pub const SHIPPED_VERSION: u8 = 1;

/// One record change on its way to another region (an outbox entry, and the unit the
/// relay and anti-entropy ship): `version u8 | enqueued_ms u64 | tenant_len u16 tenant
/// | scope_len u16 scope | key_len u32 key | record bytes (versioned themselves)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shipped {
    pub enqueued_ms: u64,
    pub key: Key,
    pub record: Record,
}

pub fn encode_shipped(s: &Shipped) -> Vec<u8> {
    let rec = encode_record(&s.record);
    let k = &s.key;
    let mut out = Vec::with_capacity(24 + k.tenant.len() + k.scope.len() + k.key.len() + rec.len());
    out.push(SHIPPED_VERSION);
    out.extend_from_slice(&s.enqueued_ms.to_be_bytes());
    // Tenant and scope are bounded far below u16::MAX, keys below u32::MAX, by Limits.
    out.extend_from_slice(&(k.tenant.len() as u16).to_be_bytes());
    out.extend_from_slice(k.tenant.as_bytes());
    out.extend_from_slice(&(k.scope.len() as u16).to_be_bytes());
    out.extend_from_slice(k.scope.as_bytes());
    out.extend_from_slice(&(k.key.len() as u32).to_be_bytes());
    out.extend_from_slice(&k.key);
    out.extend_from_slice(&rec);
    out
}

pub fn decode_shipped(bytes: &[u8]) -> Result<Shipped, CodecError> {
    let mut r = Reader::new(bytes);
    match r.u8().map_err(|_| CodecError::Empty)? {
        SHIPPED_VERSION => {}
        v => return Err(CodecError::UnknownVersion(v)),
    }
    let enqueued_ms = r.u64()?;
    let tl = r.u16()? as usize;
    let tenant = std::str::from_utf8(r.take(tl)?)
        .map_err(|_| CodecError::Invalid("tenant"))?
        .to_owned();
    let sl = r.u16()? as usize;
    let scope = std::str::from_utf8(r.take(sl)?)
        .map_err(|_| CodecError::Invalid("scope"))?
        .to_owned();
    let kl = r.u32()? as usize;
    let key = r.take(kl)?.to_vec();
    let rest = r.rest();
    Ok(Shipped {
        enqueued_ms,
        key: Key { tenant, scope, key },
        record: decode_record(rest)?,
    })
}

pub fn decode_record(bytes: &[u8]) -> Result<Record, CodecError> {
    let mut r = Reader::new(bytes);
    match r.u8().map_err(|_| CodecError::Empty)? {
        RECORD_VERSION => {}
        v => return Err(CodecError::UnknownVersion(v)),
    }
    let expires_ms = r.u64()?;
    let created_ms = r.u64()?;
    let fingerprint = Fingerprint(r.array()?);
    let generation = r.u32()?;
    let phase = Phase::from_byte(r.u8()?).ok_or(CodecError::Invalid("phase"))?;
    let claim = r.claim()?;
    let lease_expires_ms = r.u64()?;
    let attempts = r.u32()?;
    let last_attempt_ms = r.u64()?;
    let first_attempt_ms = r.u64()?;
    let witnesses = r.u32()?;
    let is_final = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(CodecError::Invalid("final flag")),
    };
    let response = match r.u8()? {
        0 => None,
        1 => {
            let status = r.u32()?;
            let n = r.u16()? as usize;
            let mut headers = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                let nl = r.u16()? as usize;
                let name = std::str::from_utf8(r.take(nl)?)
                    .map_err(|_| CodecError::Invalid("header name"))?
                    .to_owned();
                let vl = r.u32()? as usize;
                let value = r.take(vl)?.to_vec();
                headers.push(Header { name, value });
            }
            let bl = r.u32()? as usize;
            let body = r.take(bl)?.to_vec();
            Some(StoredResponse {
                status,
                headers,
                body,
            })
        }
        _ => return Err(CodecError::Invalid("response flag")),
    };
    r.finish()?;
    Ok(Record {
        expires_ms,
        created_ms,
        fingerprint,
        generation,
        phase,
        claim,
        lease_expires_ms,
        attempts,
        last_attempt_ms,
        first_attempt_ms,
        witnesses,
        is_final,
        response,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn arb_record() -> impl Strategy<Value = Record> {
        (
            (any::<u64>(), any::<u64>(), any::<[u8; 32]>(), any::<u32>()),
            (1u8..=3, any::<(u64, u16, u16, u32)>(), any::<u64>()),
            (
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<bool>(),
            ),
            proptest::option::of((
                any::<u32>(),
                proptest::collection::vec(
                    (
                        "[a-z-]{1,12}",
                        proptest::collection::vec(any::<u8>(), 0..16),
                    ),
                    0..4,
                ),
                proptest::collection::vec(any::<u8>(), 0..64),
            )),
        )
            .prop_map(|(a, b, c, resp)| Record {
                expires_ms: a.0,
                created_ms: a.1,
                fingerprint: Fingerprint(a.2),
                generation: a.3,
                phase: Phase::from_byte(b.0).unwrap(),
                claim: ClaimId {
                    hlc: b.1 .0,
                    region: b.1 .1,
                    node: b.1 .2,
                    nonce: b.1 .3,
                },
                lease_expires_ms: b.2,
                attempts: c.0,
                last_attempt_ms: c.1,
                first_attempt_ms: c.2,
                witnesses: c.3,
                is_final: c.4,
                response: resp.map(|(status, headers, body)| StoredResponse {
                    status,
                    headers: headers
                        .into_iter()
                        .map(|(name, value)| Header { name, value })
                        .collect(),
                    body,
                }),
            })
    }

    proptest! {
        #[test]
        fn round_trip(r in arb_record()) {
            let bytes = encode_record(&r);
            prop_assert_eq!(peek_expires_ms(&bytes), Some(r.expires_ms));
            prop_assert_eq!(decode_record(&bytes).unwrap(), r);
        }

        #[test]
        fn replicated_parts_are_the_digest_bytes_around_zeroed_bookkeeping(r in arb_record()) {
            let bytes = encode_record(&r);
            let (before, after) = replicated_parts(&bytes).unwrap();
            let mut joined = before.to_vec();
            joined.extend_from_slice(&[0; BOOKKEEPING_BYTES.end - BOOKKEEPING_BYTES.start]);
            joined.extend_from_slice(after);
            prop_assert_eq!(joined, crate::merge::digest_bytes(&r));
        }

        #[test]
        fn truncated_or_garbage_never_panics(r in arb_record(), cut in 0usize..200, junk in proptest::collection::vec(any::<u8>(), 0..200)) {
            let bytes = encode_record(&r);
            let cut = cut.min(bytes.len().saturating_sub(1));
            prop_assert!(decode_record(&bytes[..cut]).is_err());
            let _ = decode_record(&junk);
            let _ = decode_shipped(&junk);
        }

        #[test]
        fn shipped_round_trip(r in arb_record(), key in proptest::collection::vec(any::<u8>(), 0..40), t in "[a-z]{0,8}", at in any::<u64>()) {
            let s = Shipped { enqueued_ms: at, key: Key { tenant: t.clone(), scope: "s".into(), key }, record: r };
            let bytes = encode_shipped(&s);
            prop_assert_eq!(decode_shipped(&bytes), Ok(s));
            prop_assert!(decode_shipped(&bytes[..bytes.len() - 1]).is_err());
        }
    }

    /// The version-1 bytes of a known record, frozen: a future format must keep reading them.
    #[test]
    fn reads_frozen_version_1_bytes() {
        let r = Record {
            expires_ms: 10,
            created_ms: 2,
            fingerprint: Fingerprint([7; 32]),
            generation: 3,
            phase: Phase::Completed,
            claim: ClaimId {
                hlc: 1,
                region: 2,
                node: 3,
                nonce: 4,
            },
            lease_expires_ms: 5,
            attempts: 6,
            last_attempt_ms: 7,
            first_attempt_ms: 8,
            witnesses: 1,
            is_final: true,
            response: Some(StoredResponse {
                status: 201,
                headers: vec![Header {
                    name: "a".into(),
                    value: b"b".to_vec(),
                }],
                body: b"ok".to_vec(),
            }),
        };
        let frozen = "01000000000000000a0000000000000002070707070707070707070707070707070707070707070707070707070707070700000003030000000000000001000200030000000400000000000000050000000600000000000000070000000000000008000000010101000000c900010001610000000162000000026f6b";
        assert_eq!(hex::encode(encode_record(&r)), frozen);
        assert_eq!(decode_record(&hex::decode(frozen).unwrap()).unwrap(), r);
        assert_eq!(decode_record(&[9, 0]), Err(CodecError::UnknownVersion(9)));
    }
}
