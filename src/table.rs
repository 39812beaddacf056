//! A map from ids to shared records, hashed once per lookup: the tracker's tenant
//! entries and the windows' buckets.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A record a [`Table`] holds: a shared pointer to something with an id.
pub(crate) trait Keyed {
    /// The id the record is found by.
    fn key(&self) -> &str;
}

/// Records keyed by the hash their owner already computed to pick a shard, so a lookup
/// hashes the id once, not twice. A record whose 64-bit hash another's slot already holds
/// (seeded foldhash: vanishingly rare, and not steerable by callers who do not know the
/// seed) is kept in a list beside the slots, and ids tell records apart. So a slot is
/// the record's pointer alone: 16 bytes with its key, where a slot that could hold a list
/// would take 24.
pub(crate) struct Table<V> {
    slots: HashMap<u64, V, BuildHasherDefault<PassThrough>>,
    /// The records whose hash a slot already held when they came.
    collided: Vec<(u64, V)>,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Table {
            slots: HashMap::default(),
            collided: Vec::new(),
        }
    }
}

impl<V: Keyed> Table<V> {
    /// The record for `id`, whose hash is `hash`.
    #[inline]
    pub(crate) fn get(&self, hash: u64, id: &str) -> Option<&V> {
        match self.slots.get(&hash) {
            Some(record) if record.key() == id => Some(record),
            _ => self.get_collided(hash, id),
        }
    }

    /// [`get`](Self::get) among the records that collided.
    #[cold]
    fn get_collided(&self, hash: u64, id: &str) -> Option<&V> {
        let mut collided = self.collided.iter();
        collided.find_map(|(collided, record)| {
            (*collided == hash && record.key() == id).then_some(record)
        })
    }

    /// Adds a record for an id not in the table.
    pub(crate) fn insert(&mut self, hash: u64, record: V) -> &V {
        use std::collections::hash_map::Entry;
        match self.slots.entry(hash) {
            Entry::Vacant(vacant) => vacant.insert(record),
            Entry::Occupied(_) => {
                self.collided.push((hash, record));
                let (_, record) = self.collided.last().expect("just pushed");
                record
            }
        }
    }

    /// Keeps the records for which `keep` says so.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        let before = self.len();
        self.slots.retain(|_, record| keep(record));
        self.collided.retain(|(_, record)| keep(record));
        if self.len() < before {
            // Give back room the sweep freed, and with it the tombstones that would
            // otherwise make the next inserts grow the table instead of reusing it.
            self.slots.shrink_to_fit();
        }
    }

    /// Every record.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &V> {
        let collided = self.collided.iter().map(|(_, record)| record);
        self.slots.values().chain(collided)
    }

    /// How many records the table holds.
    pub(crate) fn len(&self) -> usize {
        self.slots.len() + self.collided.len()
    }

    /// Drops every record.
    pub(crate) fn clear(&mut self) {
        self.slots.clear();
        self.collided.clear();
    }
}

/// Hands a `u64` key (already a good hash) to the map unchanged.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; stay total for anything else.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

#[cfg(test)]
mod tests {
    use super::{Keyed, Table};
    use std::sync::Arc;

    impl Keyed for Arc<str> {
        fn key(&self) -> &str {
            self
        }
    }

    fn record(id: &str) -> Arc<str> {
        Arc::from(id)
    }

    #[test]
    fn records_whose_hashes_collide_are_told_apart_by_their_ids() {
        let mut table = Table::default();
        table.insert(7, record("a"));
        table.insert(7, record("b"));
        table.insert(9, record("c"));
        assert_eq!(table.len(), 3);
        assert_eq!(table.get(7, "a").map(|r| &**r), Some("a"));
        assert_eq!(table.get(7, "b").map(|r| &**r), Some("b"));
        assert!(table.get(7, "c").is_none());
        assert!(table.get(8, "a").is_none());

        // The record in the slot goes; the one that collided with it is still found.
        table.retain(|r| &**r != "a");
        assert_eq!(table.len(), 2);
        assert!(table.get(7, "a").is_none());
        assert_eq!(table.get(7, "b").map(|r| &**r), Some("b"));
        let mut ids: Vec<&str> = table.entries().map(|r| &**r).collect();
        ids.sort();
        assert_eq!(ids, ["b", "c"]);

        // A record for a hash whose slot is free again takes the slot.
        table.insert(7, record("d"));
        assert_eq!(table.get(7, "d").map(|r| &**r), Some("d"));
        assert_eq!(table.get(7, "b").map(|r| &**r), Some("b"));
        table.clear();
        assert_eq!(table.len(), 0);
        assert!(table.get(7, "b").is_none());
    }
}
