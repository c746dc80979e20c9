//! The entries this replica holds: read or claimed and not yet acknowledged, so that none is
//! stored twice at once and the held ones can be kept from looking idle.

use std::{
    collections::{HashMap, hash_map},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::stream::{Entry, EntryId};

/// Entries this replica holds (read or claimed, not yet acknowledged), with since when.
#[derive(Default)]
pub(super) struct Held(Mutex<HashMap<EntryId, Instant>>);

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<EntryId, Instant>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Holds the entries not held yet and returns them. One this replica holds already is in
    /// flight and is dropped: one entry must not be stored (or dead-lettered) twice at once, and
    /// the reader and the claimer can both return an entry this consumer has pending (a claim
    /// takes entries idle long enough, its own too, while the reader re-reads them after a
    /// restart).
    pub(super) fn hold_new(&self, entries: Vec<Entry>) -> Vec<Entry> {
        let now = Instant::now();
        let mut held = self.lock();
        entries
            .into_iter()
            .filter(|e| match held.entry(e.entry_id()) {
                hash_map::Entry::Vacant(slot) => {
                    slot.insert(now);
                    true
                }
                hash_map::Entry::Occupied(_) => false,
            })
            .collect()
    }

    pub(super) fn release(&self, ids: &[EntryId]) {
        let mut held = self.lock();
        for id in ids {
            held.remove(id);
        }
    }

    /// How many entries of `shard` are held.
    pub(super) fn count_in(&self, shard: usize) -> usize {
        self.lock().keys().filter(|(s, _)| *s == shard).count()
    }

    pub(super) fn older_than(&self, age: Duration) -> Vec<EntryId> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, since)| now - **since >= age)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fixtures::{entry, ids};

    #[test]
    fn an_entry_held_already_is_not_taken_again_until_released() {
        let held = Held::default();
        let taken = held.hold_new(vec![entry(1, None), entry(2, None)]);
        assert_eq!(ids(&taken), [1, 2]);
        // Claimed, then re-read as this consumer's own pending entry: in flight once.
        assert_eq!(
            ids(&held.hold_new(vec![entry(2, None), entry(3, None)])),
            [3]
        );
        held.release(&[(0, "2-0".to_string())]);
        assert_eq!(ids(&held.hold_new(vec![entry(2, None)])), [2]);
    }
}
