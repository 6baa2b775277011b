//! Key groups: the unit in which keyed state is partitioned and moved.
//!
//! A key belongs to key group `hash(key) % maxParallelism`, with a hash that is the same in
//! every build and on every machine (XXH3-64 of the key's bytes, seed 0). Key group `g`
//! belongs to subtask `g * parallelism / maxParallelism`, so subtask `i` owns the contiguous
//! range `[ceil(i*maxP/p), floor(((i+1)*maxP - 1)/p)]`. State keys start with the key group
//! in big-endian (`u16`: maxParallelism is at most 32768), so a range of key groups is one
//! contiguous byte range in RocksDB.

use std::ops::RangeInclusive;

/// A key group: `0..maxParallelism`.
pub type KeyGroup = u16;

/// The key group of a key's bytes.
#[inline]
pub fn key_group_of(key: &[u8], max_parallelism: u32) -> KeyGroup {
    (xxhash_rust::xxh3::xxh3_64(key) % u64::from(max_parallelism)) as KeyGroup
}

/// The subtask that owns key group `g`.
#[inline]
pub fn subtask_of(g: KeyGroup, max_parallelism: u32, parallelism: u32) -> u32 {
    (u64::from(g) * u64::from(parallelism) / u64::from(max_parallelism)) as u32
}

/// A contiguous, inclusive range of key groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyGroupRange {
    pub start: KeyGroup,
    pub end: KeyGroup,
}

impl KeyGroupRange {
    /// The key groups subtask `index` owns at `parallelism` (1 to maxParallelism).
    pub fn of_subtask(max_parallelism: u32, parallelism: u32, index: u32) -> Self {
        assert!(parallelism >= 1 && parallelism <= max_parallelism && index < parallelism);
        let (m, p, i) = (u64::from(max_parallelism), u64::from(parallelism), u64::from(index));
        let start = (i * m).div_ceil(p);
        let end = ((i + 1) * m - 1) / p;
        Self { start: start as KeyGroup, end: end as KeyGroup }
    }

    pub fn contains(&self, g: KeyGroup) -> bool {
        (self.start..=self.end).contains(&g)
    }

    pub fn len(&self) -> u32 {
        u32::from(self.end) - u32::from(self.start) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn iter(&self) -> RangeInclusive<KeyGroup> {
        self.start..=self.end
    }

    /// The byte range of state keys in this range: `[start BE, (end + 1) BE)`.
    pub fn key_bounds(&self) -> ([u8; 2], Option<[u8; 2]>) {
        let upper = self.end.checked_add(1).map(u16::to_be_bytes);
        (self.start.to_be_bytes(), upper)
    }
}

/// The state key of `key` in key group `g`: the key group big-endian, then the key.
#[inline]
pub fn state_key(g: KeyGroup, key: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&g.to_be_bytes());
    out.extend_from_slice(key);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_hash_is_stable() {
        // These values are part of the savepoint format: a change moves every key.
        assert_eq!(key_group_of(b"hello", 128), key_group_of(b"hello", 128));
        assert_eq!(xxhash_rust::xxh3::xxh3_64(b"hello"), 0x9555e8555c62dcfd);
        assert_eq!(key_group_of(b"", 128), (xxhash_rust::xxh3::xxh3_64(b"") % 128) as u16);
    }

    #[test]
    fn every_key_group_has_exactly_one_owner_for_every_parallelism() {
        for max_p in [1u32, 2, 3, 7, 128, 129, 1000] {
            for p in 1..=max_p {
                let ranges: Vec<_> =
                    (0..p).map(|i| KeyGroupRange::of_subtask(max_p, p, i)).collect();
                // Contiguous, in order, covering 0..max_p exactly once.
                assert_eq!(ranges[0].start, 0);
                assert_eq!(u32::from(ranges[p as usize - 1].end), max_p - 1);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end + 1, w[1].start, "max_p {max_p} p {p}");
                }
                for g in 0..max_p {
                    let owner = subtask_of(g as u16, max_p, p);
                    assert!(ranges[owner as usize].contains(g as u16), "g {g} max_p {max_p} p {p}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn ranges_match_the_formulas(max_p in 1u32..=32768, p_seed in any::<u32>(), g_seed in any::<u32>()) {
            let p = 1 + p_seed % max_p;
            let g = (g_seed % max_p) as u16;
            let owner = subtask_of(g, max_p, p);
            prop_assert!(owner < p);
            let r = KeyGroupRange::of_subtask(max_p, p, owner);
            prop_assert!(r.contains(g));
            // The formulas of DESIGN.md, by hand.
            let i = u64::from(owner);
            let (m, pp) = (u64::from(max_p), u64::from(p));
            prop_assert_eq!(u64::from(r.start), (i * m).div_ceil(pp));
            prop_assert_eq!(u64::from(r.end), ((i + 1) * m - 1) / pp);
            // Neighbours do not own it.
            if owner > 0 { prop_assert!(!KeyGroupRange::of_subtask(max_p, p, owner - 1).contains(g)); }
            if owner + 1 < p { prop_assert!(!KeyGroupRange::of_subtask(max_p, p, owner + 1).contains(g)); }
        }

        #[test]
        fn every_owned_range_is_nonempty_and_balanced(max_p in 1u32..=32768, p_seed in any::<u32>()) {
            let p = 1 + p_seed % max_p;
            let lens: Vec<u32> = (0..p).map(|i| KeyGroupRange::of_subtask(max_p, p, i).len()).collect();
            prop_assert_eq!(lens.iter().sum::<u32>(), max_p);
            let (lo, hi) = (lens.iter().min().unwrap(), lens.iter().max().unwrap());
            prop_assert!(hi - lo <= 1, "unbalanced: {} to {}", lo, hi);
        }

        #[test]
        fn state_keys_of_a_range_are_contiguous(g in any::<u16>(), key in proptest::collection::vec(any::<u8>(), 0..32)) {
            let mut k = Vec::new();
            state_key(g, &key, &mut k);
            let r = KeyGroupRange { start: g, end: g };
            let (lo, hi) = r.key_bounds();
            prop_assert!(k.as_slice() >= lo.as_slice());
            if let Some(hi) = hi { prop_assert!(k.as_slice() < hi.as_slice()); }
        }
    }
}
