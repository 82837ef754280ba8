//! Key layouts. Every key starts with the shard (big-endian u32) so one group's data is
//! one contiguous range, which is what snapshots and range deletes rely on.

use crate::Shard;
use idem_core::Key;

pub fn shard_prefix(shard: Shard) -> [u8; 4] {
    shard.to_be_bytes()
}

/// The first key after every key of `shard`.
pub fn shard_end(shard: Shard) -> Vec<u8> {
    match shard.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 5],
    }
}

/// `shard | tenant_len u16 | tenant | scope_len u16 | scope | key`.
pub fn record_key(shard: Shard, key: &Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.tenant.len() + key.scope.len() + key.key.len());
    out.extend_from_slice(&shard_prefix(shard));
    // Tenant and scope lengths are bounded far below u16::MAX by config and Limits.
    out.extend_from_slice(&(key.tenant.len() as u16).to_be_bytes());
    out.extend_from_slice(key.tenant.as_bytes());
    out.extend_from_slice(&(key.scope.len() as u16).to_be_bytes());
    out.extend_from_slice(key.scope.as_bytes());
    out.extend_from_slice(&key.key);
    out
}

/// The key of a record key (the inverse of [`record_key`] without the shard).
pub fn decode_record_key(k: &[u8]) -> Option<Key> {
    let mut at = 0usize;
    let mut field = |k: &[u8]| -> Option<Vec<u8>> {
        let len = u16::from_be_bytes(k.get(at..at + 2)?.try_into().ok()?) as usize;
        let v = k.get(at + 2..at + 2 + len)?.to_vec();
        at += 2 + len;
        Some(v)
    };
    let tenant = String::from_utf8(field(k)?).ok()?;
    let scope = String::from_utf8(field(k)?).ok()?;
    Some(Key {
        tenant,
        scope,
        key: k.get(at..)?.to_vec(),
    })
}

/// `shard | dest region | seq` for the outbox and the dead-letter queue.
pub fn outbox_key(shard: Shard, dest: u16, seq: u64) -> [u8; 14] {
    let mut k = [0u8; 14];
    k[..4].copy_from_slice(&shard.to_be_bytes());
    k[4..6].copy_from_slice(&dest.to_be_bytes());
    k[6..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// `(dest, seq)` of an outbox or dead-letter key.
pub fn outbox_dest_seq(k: &[u8]) -> Option<(u16, u64)> {
    let dest = u16::from_be_bytes(k.get(4..6)?.try_into().ok()?);
    let seq = u64::from_be_bytes(k.get(6..14)?.try_into().ok()?);
    Some((dest, seq))
}

/// `shard | index` for the Raft log.
pub fn log_key(shard: Shard, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&shard.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

pub fn log_index(key: &[u8]) -> Option<u64> {
    key.get(4..12)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
}

/// `shard | name` for per-group metadata.
pub fn meta_key(shard: Shard, name: &str) -> Vec<u8> {
    let mut k = shard_prefix(shard).to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_of_different_tenants_never_collide() {
        let a = Key {
            tenant: "ab".into(),
            scope: "c".into(),
            key: b"d".to_vec(),
        };
        let b = Key {
            tenant: "a".into(),
            scope: "bc".into(),
            key: b"d".to_vec(),
        };
        assert_ne!(record_key(0, &a), record_key(0, &b));
        assert!(record_key(0, &a).as_slice() < shard_end(0).as_slice());
        assert!(record_key(1, &a).as_slice() >= shard_end(0).as_slice());
    }

    #[test]
    fn record_keys_decode_back() {
        let a = Key {
            tenant: "acme".into(),
            scope: "charges".into(),
            key: b"k\x00\xff".to_vec(),
        };
        assert_eq!(decode_record_key(&record_key(7, &a)[4..]), Some(a));
        assert_eq!(decode_record_key(&[0, 9, b'x']), None);
        assert_eq!(outbox_dest_seq(&outbox_key(1, 2, 3)), Some((2, 3)));
        assert!(outbox_key(1, 2, 255) < outbox_key(1, 2, 256));
    }

    #[test]
    fn log_keys_sort_by_index() {
        assert!(log_key(0, 9) < log_key(0, 10));
        assert_eq!(log_index(&log_key(3, 77)), Some(77));
    }
}
