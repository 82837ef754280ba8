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
    fn log_keys_sort_by_index() {
        assert!(log_key(0, 9) < log_key(0, 10));
        assert_eq!(log_index(&log_key(3, 77)), Some(77));
    }
}
