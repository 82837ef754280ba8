//! Which shard a key belongs to: jump consistent hash (Lamping & Veach) of a stable
//! 64-bit FNV-1a hash of the key. Every region uses the same shard count, so a key's
//! shard is the same everywhere.

use crate::Key;

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in (part.len() as u64).to_be_bytes().iter().chain(part.iter()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Jump consistent hash: a bucket in `0..buckets`, moving few keys when buckets grow.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = i64::from(buckets.max(1));
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

pub fn shard_of(key: &Key, shards: u32) -> u32 {
    jump_hash(
        fnv1a(&[key.tenant.as_bytes(), key.scope.as_bytes(), &key.key]),
        shards,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_in_range_and_balanced() {
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            let k = Key {
                tenant: "t".into(),
                scope: "s".into(),
                key: format!("k{i}").into_bytes(),
            };
            let s = shard_of(&k, 4);
            assert_eq!(s, shard_of(&k, 4));
            counts[s as usize] += 1;
            assert_eq!(shard_of(&k, 1), 0);
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn growing_moves_only_a_fraction() {
        let moved = (0..10_000u64)
            .filter(|&i| {
                jump_hash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15), 4)
                    != jump_hash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15), 5)
            })
            .count();
        assert!(moved < 3_000, "{moved} of 10000 moved");
    }
}
