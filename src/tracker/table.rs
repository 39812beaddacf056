//! A shard's map from tenant id to entry, hashed once per request.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::sync::Arc;

use super::entry::Entry;

/// Tenant entries keyed by the hash the tracker already computed to pick the shard, so a
/// lookup hashes the tenant id once, not twice. Ids whose 64-bit hashes collide (seeded
/// foldhash: vanishingly rare, and not steerable by callers who do not know the seed) share
/// a slot and are told apart by comparing ids.
#[derive(Default)]
pub(crate) struct Table {
    slots: HashMap<u64, Slot, BuildHasherDefault<PassThrough>>,
    len: usize,
}

/// 16 bytes: the rare collision list is boxed so the common case stays small (a bare `Vec`
/// would make every slot 24 bytes).
#[allow(clippy::box_collection)]
enum Slot {
    One(Arc<Entry>),
    Many(Box<Vec<Arc<Entry>>>),
}

impl Table {
    pub(crate) fn get(&self, hash: u64, id: &str) -> Option<&Arc<Entry>> {
        match self.slots.get(&hash)? {
            Slot::One(entry) => (*entry.id == *id).then_some(entry),
            Slot::Many(entries) => entries.iter().find(|entry| *entry.id == *id),
        }
    }

    /// Adds an entry for an id not in the table.
    pub(crate) fn insert(&mut self, hash: u64, entry: Arc<Entry>) -> &Arc<Entry> {
        use std::collections::hash_map::Entry as MapEntry;
        self.len += 1;
        match self.slots.entry(hash) {
            MapEntry::Vacant(vacant) => match vacant.insert(Slot::One(entry)) {
                Slot::One(entry) => entry,
                Slot::Many(_) => unreachable!("just inserted as one"),
            },
            MapEntry::Occupied(occupied) => {
                let slot = occupied.into_mut();
                if let Slot::One(first) = slot {
                    *slot = Slot::Many(Box::new(vec![Arc::clone(first)]));
                }
                match slot {
                    Slot::Many(entries) => {
                        entries.push(entry);
                        entries.last().expect("just pushed")
                    }
                    Slot::One(_) => unreachable!("turned into many above"),
                }
            }
        }
    }

    /// Keeps the entries for which `keep` says so.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Arc<Entry>) -> bool) {
        let mut removed = 0;
        self.slots.retain(|_, slot| match slot {
            Slot::One(entry) => {
                let kept = keep(entry);
                removed += usize::from(!kept);
                kept
            }
            Slot::Many(entries) => {
                let before = entries.len();
                entries.retain(&mut keep);
                removed += before - entries.len();
                !entries.is_empty()
            }
        });
        self.len -= removed;
        if removed > 0 {
            // Give back room the sweep freed, and with it the tombstones that would
            // otherwise make the next inserts grow the table instead of reusing it.
            self.slots.shrink_to_fit();
        }
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.slots.values().flat_map(|slot| match slot {
            Slot::One(entry) => std::slice::from_ref(entry),
            Slot::Many(entries) => entries.as_slice(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn clear(&mut self) {
        self.slots.clear();
        self.len = 0;
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
