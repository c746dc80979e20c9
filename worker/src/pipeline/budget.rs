//! The read-ahead budget: how many entries, and how many bytes of them, one replica's feeders
//! may have read and its writers not yet finished.

use std::sync::Mutex;

use prometheus::IntGauge;
use tokio::sync::Notify;

use crate::{metrics::WorkerMetrics, stream::Entry};

/// Bytes an entry holds besides its event's JSON (at most `MAX_EVENT_BYTES`): its id and the field
/// names, the envelope version and the `traceparent`. Reads assume `MAX_EVENT_BYTES` plus this
/// for each entry they ask for.
pub(super) const ENTRY_OVERHEAD_BYTES: usize = 1024;

/// The read-ahead budget of one replica: the entries its reader and claimer have read (or are
/// reading) and its writers have not finished (stored or dead-lettered, and acknowledged),
/// bounded twice: in entries (2 × `WRITE_CONCURRENCY` × `BATCH_SIZE`, as many as when every
/// writer held one batch and had one more waiting) and in bytes (`READ_AHEAD_BYTES`).
///
/// Redis has no byte limit on a read, so a feeder takes room before it reads: for as many entries
/// as the free bytes hold at the largest size an event can have (`MAX_EVENT_BYTES`), never more
/// than one read's worth. Once the read is back, the room taken is set to what the entries
/// actually weigh ([`Entry::bytes`]). An entry larger than `MAX_EVENT_BYTES` (queued before the
/// api refused such events) is still taken, never left stuck: it may take the budget beyond its
/// bound by its own size (after one, reads ask for one entry at a time: [`ReadSize`](super::read::ReadSize)), and the
/// next read waits until what is held is back under the bound.
pub(super) struct ReadAhead {
    taken: Mutex<Taken>,
    /// Wakes the feeder waiting for room when room is given back, or the budget closes.
    room: Notify,
    /// Feeders wait for room one at a time, the others queued behind in order: a reader giving
    /// room back and asking again at once cannot starve the claimer.
    turn: tokio::sync::Mutex<()>,
    max_entries: usize,
    max_bytes: usize,
    /// Bytes assumed for each entry a read asks for.
    entry_bytes: usize,
    held_gauge: IntGauge,
    peak_gauge: IntGauge,
}

#[derive(Default)]
struct Taken {
    /// Entries held, and asked for by reads in flight.
    entries: usize,
    /// Bytes of the entries held, and assumed for reads in flight.
    bytes: usize,
    /// Bytes of the entries held only (what `clickstream_worker_read_ahead_bytes` shows).
    held: usize,
    peak: usize,
    /// A writer is gone: nothing will be given back.
    closed: bool,
}

impl ReadAhead {
    pub(super) fn new(
        max_entries: usize,
        max_bytes: usize,
        max_event_bytes: usize,
        metrics: &WorkerMetrics,
    ) -> Self {
        Self {
            taken: Mutex::default(),
            room: Notify::new(),
            turn: tokio::sync::Mutex::new(()),
            max_entries: max_entries.max(1),
            max_bytes,
            entry_bytes: max_event_bytes + ENTRY_OVERHEAD_BYTES,
            held_gauge: metrics.read_ahead_bytes.clone(),
            peak_gauge: metrics.read_ahead_peak_bytes.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Taken> {
        self.taken
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for room for at least one entry of the largest size (or for nothing to be held) and
    /// takes room for up to `at_most` entries; `None` once the budget is closed.
    pub(super) async fn room(&self, at_most: usize) -> Option<Room<'_>> {
        let _turn = self.turn.lock().await;
        loop {
            {
                let mut taken = self.lock();
                if taken.closed {
                    return None;
                }
                let free_entries = self.max_entries.saturating_sub(taken.entries);
                let free_bytes = self.max_bytes.saturating_sub(taken.bytes);
                if free_entries > 0 && (free_bytes >= self.entry_bytes || taken.bytes == 0) {
                    let count = at_most
                        .min(free_entries)
                        .min(free_bytes / self.entry_bytes)
                        .max(1);
                    let bytes = count * self.entry_bytes;
                    taken.entries += count;
                    taken.bytes += bytes;
                    return Some(Room {
                        budget: self,
                        count,
                        bytes,
                    });
                }
            }
            // A permit stored by a give-back since the check above wakes this at once.
            self.room.notified().await;
        }
    }

    /// `entries` entries weighing `bytes` are finished: room for more.
    pub(super) fn give_back(&self, entries: usize, bytes: usize) {
        let mut taken = self.lock();
        taken.entries = taken.entries.saturating_sub(entries);
        taken.bytes = taken.bytes.saturating_sub(bytes);
        taken.held = taken.held.saturating_sub(bytes);
        self.held_gauge.set(taken.held as i64);
        drop(taken);
        self.room.notify_one();
    }

    /// Nothing more will be given back (a writer is gone): a feeder waiting for room stops.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.room.notify_one();
    }
}

/// Room taken for one read; given back when dropped unless [`Room::hold`] turned it into the
/// entries read.
pub(super) struct Room<'a> {
    budget: &'a ReadAhead,
    count: usize,
    bytes: usize,
}

impl Room<'_> {
    /// How many entries the read may ask for.
    pub(super) fn count(&self) -> usize {
        self.count
    }

    /// The read returned `entries` to hold (at most [`Room::count`]): the room taken becomes
    /// theirs, at what they weigh.
    pub(super) fn hold(mut self, entries: &[Entry]) {
        let bytes: usize = entries.iter().map(Entry::bytes).sum();
        let budget = self.budget;
        let mut taken = budget.lock();
        taken.entries = (taken.entries + entries.len()).saturating_sub(self.count);
        taken.bytes = (taken.bytes + bytes).saturating_sub(self.bytes);
        taken.held += bytes;
        taken.peak = taken.peak.max(taken.held);
        budget.held_gauge.set(taken.held as i64);
        budget.peak_gauge.set(taken.peak as i64);
        drop(taken);
        (self.count, self.bytes) = (0, 0);
        budget.room.notify_one();
    }
}

impl Drop for Room<'_> {
    /// A read that failed (or was not made) gives its room back.
    fn drop(&mut self) {
        if self.count > 0 {
            let mut taken = self.budget.lock();
            taken.entries = taken.entries.saturating_sub(self.count);
            taken.bytes = taken.bytes.saturating_sub(self.bytes);
            drop(taken);
            self.budget.room.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::pipeline::fixtures::{ANY, budget, of_user, room_now, waits, weighing};

    #[tokio::test]
    async fn a_read_asks_for_as_many_entries_as_the_free_bytes_hold_at_the_largest_size() {
        let event = 10_000;
        let (budget, metrics) = budget(ANY, 4 * (event + ENTRY_OVERHEAD_BYTES) + 100, event);
        let room = room_now(&budget, ANY).await;
        assert_eq!(room.count(), 4, "never more than the free bytes hold");
        // Small entries come back: their weight is held, the rest of the room given back.
        let read: Vec<Entry> = (0..4).map(|i| weighing(i, "a", 2_000)).collect();
        room.hold(&read);
        assert_eq!(metrics.read_ahead_bytes.get(), 8_000);
        assert_eq!(room_now(&budget, ANY).await.count(), 3);
        assert_eq!(room_now(&budget, 2).await.count(), 2, "nor more than asked");
        budget.give_back(4, 8_000);
        assert_eq!(metrics.read_ahead_bytes.get(), 0);
        assert_eq!(metrics.read_ahead_peak_bytes.get(), 8_000);
        assert_eq!(room_now(&budget, ANY).await.count(), 4);
    }

    #[tokio::test]
    async fn read_ahead_waits_for_the_writers_to_finish_entries() {
        let event = 10_000;
        let (budget, metrics) = budget(ANY, 3 * (event + ENTRY_OVERHEAD_BYTES), event);
        let room = room_now(&budget, ANY).await;
        assert_eq!(room.count(), 3);
        let read: Vec<Entry> = (0..3).map(|i| weighing(i, "a", event)).collect();
        room.hold(&read);
        let asking = budget.room(ANY);
        tokio::pin!(asking);
        assert!(
            waits(&mut asking).await,
            "no room for one more event of the largest size"
        );
        budget.give_back(1, event);
        let room = tokio::time::timeout(Duration::from_secs(5), asking)
            .await
            .expect("room once an entry is finished")
            .unwrap();
        assert_eq!(room.count(), 1);
        assert_eq!(metrics.read_ahead_peak_bytes.get(), 3 * event as i64);
    }

    #[tokio::test]
    async fn read_ahead_is_bounded_in_entries_too() {
        let (budget, _) = budget(4, 1 << 30, 1024);
        let read: Vec<Entry> = (0..4).map(|i| of_user(i, "a")).collect();
        let room = room_now(&budget, ANY).await;
        assert_eq!(room.count(), 4);
        room.hold(&read[..3]);
        let room = room_now(&budget, ANY).await;
        assert_eq!(room.count(), 1);
        room.hold(&read[3..]);
        let asking = budget.room(ANY);
        tokio::pin!(asking);
        assert!(waits(&mut asking).await, "four entries held");
        budget.give_back(2, read[..2].iter().map(Entry::bytes).sum());
        let room = tokio::time::timeout(Duration::from_secs(5), asking)
            .await
            .expect("room once two entries are finished")
            .unwrap();
        assert_eq!(room.count(), 2);
    }

    #[tokio::test]
    async fn an_entry_larger_than_the_budget_is_taken_alone_and_finished_before_the_next_read() {
        let event = 10_000;
        let max = 2 * (event + ENTRY_OVERHEAD_BYTES);
        let (budget, metrics) = budget(ANY, max, event);
        // Queued before the api refused large events: five times the whole budget.
        let huge = weighing(0, "a", 5 * max);
        let room = room_now(&budget, 1).await;
        room.hold(std::slice::from_ref(&huge));
        assert_eq!(
            metrics.read_ahead_bytes.get(),
            5 * max as i64,
            "taken, not stuck"
        );
        let asking = budget.room(ANY);
        tokio::pin!(asking);
        assert!(
            waits(&mut asking).await,
            "nothing more is read while it is held"
        );
        budget.give_back(1, huge.bytes());
        let room = tokio::time::timeout(Duration::from_secs(5), asking)
            .await
            .expect("room once it is finished")
            .unwrap();
        assert_eq!(room.count(), 2, "the whole budget again");
    }

    #[tokio::test]
    async fn a_budget_smaller_than_one_event_reads_one_entry_when_it_holds_nothing() {
        let (budget, _) = budget(ANY, 100, 10_000);
        assert_eq!(room_now(&budget, ANY).await.count(), 1);
    }

    #[tokio::test]
    async fn feeders_get_room_in_the_order_they_asked() {
        let event = 10_000;
        let (budget, _) = budget(ANY, event + ENTRY_OVERHEAD_BYTES, event);
        // The reader's blocking read has the whole budget.
        let reader = room_now(&budget, ANY).await;
        let claimer = budget.room(ANY);
        tokio::pin!(claimer);
        assert!(waits(&mut claimer).await);
        // Its read comes back empty, and it asks again at once.
        drop(reader);
        let reader_again = budget.room(ANY);
        tokio::pin!(reader_again);
        assert!(
            waits(&mut reader_again).await,
            "the reader queues behind the claimer"
        );
        let claimed = tokio::time::timeout(Duration::from_secs(5), claimer)
            .await
            .expect("the claimer first")
            .unwrap();
        drop(claimed);
        tokio::time::timeout(Duration::from_secs(5), reader_again)
            .await
            .expect("then the reader")
            .unwrap();
    }
}
