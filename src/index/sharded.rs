//! A hash map split into shards by key hash, so that growing it never stalls one insert.
//!
//! A `HashMap` grows by moving every entry into a table twice the size, all inside the insert
//! that crossed the limit. On the writer thread, under a lock searches also take, that was a
//! 1.5-10 ms pause of every acknowledgement in the group at 30k-60k SKUs (measured with
//! `live_bench`), and it grows with the catalogue. Split [`SHARDS`] ways, one growth moves
//! only one shard's entries.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};

/// Number of shards: a growth moves at most 1/64 of the entries.
pub const SHARDS: usize = 64;

/// See the module docs. Iteration order is unspecified, as for `HashMap`.
#[derive(Debug, Clone)]
pub struct ShardedMap<K, V> {
    hasher: RandomState,
    shards: Vec<HashMap<K, V>>,
    len: usize,
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        Self { hasher: RandomState::new(), shards: (0..SHARDS).map(|_| HashMap::new()).collect(), len: 0 }
    }
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    pub fn new() -> Self {
        Self::default()
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        // The high bits: the shard's own table indexes with (a re-hash of) the low ones.
        (self.hasher.hash_one(key) >> 58) as usize % SHARDS
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard(key)].get(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// Inserts, returning the value `key` had.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let s = self.shard(&key);
        let old = self.shards[s].insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Inserts only if `key` has no value yet.
    pub fn insert_if_absent(&mut self, key: K, value: impl FnOnce() -> V) {
        let s = self.shard(&key);
        if let std::collections::hash_map::Entry::Vacant(e) = self.shards[s].entry(key) {
            e.insert(value());
            self.len += 1;
        }
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let s = self.shard(key);
        let old = self.shards[s].remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(HashMap::iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn behaves_like_a_hash_map(ops in proptest::collection::vec((0u8..3, 0u16..300, any::<u32>()), 0..2000)) {
            let mut sharded = ShardedMap::new();
            let mut plain = HashMap::new();
            for (op, k, v) in ops {
                match op {
                    0 => prop_assert_eq!(sharded.insert(k, v), plain.insert(k, v)),
                    1 => prop_assert_eq!(sharded.remove(&k), plain.remove(&k)),
                    _ => {
                        sharded.insert_if_absent(k, || v);
                        plain.entry(k).or_insert(v);
                    }
                }
                prop_assert_eq!(sharded.len(), plain.len());
                prop_assert_eq!(sharded.get(&k), plain.get(&k));
            }
            let mut all: Vec<_> = sharded.iter().map(|(k, v)| (*k, *v)).collect();
            all.sort();
            let mut want: Vec<_> = plain.into_iter().collect();
            want.sort();
            prop_assert_eq!(all, want);
        }
    }

    #[test]
    fn entries_spread_over_the_shards() {
        let mut m = ShardedMap::new();
        for i in 0..64_000u32 {
            m.insert(format!("SKU-{i}"), i);
        }
        let biggest = m.shards.iter().map(HashMap::len).max().unwrap();
        assert!(biggest < 64_000 / SHARDS * 2, "largest shard holds {biggest} of 64000");
        assert_eq!(m.get("SKU-123"), Some(&123));
    }
}
