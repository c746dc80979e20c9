//! Routing entries to the writers: each user's entries to one writer, in the order read, and
//! each writer's queue turned into batches bounded in entries and bytes.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
};

use entity::{Envelope, envelope::FIELD_EVENT};
use tokio::sync::mpsc;

use super::budget::{ReadAhead, Room};
use crate::stream::Entry;

/// Hands entries to the writers: each user's entries to the same writer, in the order read,
/// within the replica's [`ReadAhead`] budget, whichever writer they are for. A slow writer (a hot
/// user, a batch being retried) does not hold up the other writers' queues until that budget is
/// spent.
#[derive(Clone)]
pub(super) struct Router {
    writers: Vec<mpsc::UnboundedSender<Vec<Entry>>>,
    budget: Arc<ReadAhead>,
}

impl Router {
    /// A router to `writers` writers (at least one) and the queue of each, sharing `budget`.
    pub(super) fn new(writers: usize, budget: ReadAhead) -> (Self, Vec<Queue>) {
        let writers = writers.max(1);
        let budget = Arc::new(budget);
        let (senders, queues) = (0..writers)
            .map(|_| {
                let (tx, entries) = mpsc::unbounded_channel();
                let queue = Queue {
                    entries,
                    carry: None,
                    budget: budget.clone(),
                };
                (tx, queue)
            })
            .unzip();
        (
            Self {
                writers: senders,
                budget,
            },
            queues,
        )
    }

    /// Room in the read-ahead budget for a read of up to `at_most` entries (waiting for the
    /// writers to finish entries); `None` once the writers are gone.
    pub(super) async fn room(&self, at_most: usize) -> Option<Room<'_>> {
        self.budget.room(at_most).await
    }

    /// Sends each entry to its writer (their room is held already); `false` once the writers are
    /// gone.
    pub(super) fn send(&self, entries: Vec<Entry>) -> bool {
        if let [writer] = self.writers.as_slice() {
            return writer.send(entries).is_ok();
        }
        let mut pieces: Vec<Vec<Entry>> = self.writers.iter().map(|_| Vec::new()).collect();
        for entry in entries {
            pieces[writer_of(&entry, self.writers.len())].push(entry);
        }
        self.writers
            .iter()
            .zip(pieces)
            .all(|(writer, piece)| piece.is_empty() || writer.send(piece).is_ok())
    }
}

/// Which of `writers` writers stores `entry`: chosen by its user, so that two transactions of
/// one replica never write the same profile or session rows (they would wait for each other's
/// row locks, one at a time). Entries without a readable user (poison) go to the first writer.
fn writer_of(entry: &Entry, writers: usize) -> usize {
    let Some(user) = entry.field(FIELD_EVENT).and_then(Envelope::distinct_id_of) else {
        return 0;
    };
    let mut hasher = DefaultHasher::new();
    user.hash(&mut hasher);
    (hasher.finish() % writers as u64) as usize
}

/// What the router sent one writer, and the part of it left over from its last batch.
pub(super) struct Queue {
    entries: mpsc::UnboundedReceiver<Vec<Entry>>,
    carry: Option<Vec<Entry>>,
    budget: Arc<ReadAhead>,
}

impl Queue {
    /// The next batch: what is left over, or the next piece sent (waiting for one), then whatever
    /// else was sent meanwhile, up to `limit` entries and `limit_bytes` bytes (at least one
    /// entry, whatever it weighs); the rest is kept for the batch after. `None` when the router
    /// is gone and nothing is left. Cancel-safe: nothing is taken out of the queue across an
    /// await.
    pub(super) async fn next(&mut self, limit: usize, limit_bytes: usize) -> Option<Vec<Entry>> {
        let mut batch = match self.carry.take() {
            Some(batch) => batch,
            None => self.entries.recv().await?,
        };
        let mut bytes: usize = batch.iter().map(Entry::bytes).sum();
        while batch.len() < limit && bytes < limit_bytes {
            let Ok(mut more) = self.entries.try_recv() else {
                break;
            };
            bytes += more.iter().map(Entry::bytes).sum::<usize>();
            batch.append(&mut more);
        }
        let mut fits = 0;
        let mut fits_bytes = 0;
        for entry in batch.iter().take(limit.max(1)) {
            fits_bytes += entry.bytes();
            if fits > 0 && fits_bytes > limit_bytes {
                break;
            }
            fits += 1;
        }
        if batch.len() > fits {
            self.carry = Some(batch.split_off(fits));
        }
        Some(batch)
    }

    /// `entries` entries taken from this queue, weighing `bytes`, are finished (stored or
    /// dead-lettered, and acknowledged): room for more in the read-ahead budget.
    pub(super) fn done(&self, entries: usize, bytes: usize) {
        self.budget.give_back(entries, bytes);
    }
}

impl Drop for Queue {
    /// A writer that is gone gives back no more room: close the budget, so that a reader or
    /// claimer waiting for room stops at once (`Router::room` answers `None`) instead of waiting
    /// for entries that will never be finished. In a normal shutdown they have already stopped.
    fn drop(&mut self) {
        self.budget.close();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{HashMap, HashSet},
        time::Duration,
    };

    use super::*;
    use crate::pipeline::fixtures::{ANY, budget, entry, ids, of_user, room_now, waits, weighing};

    /// A queue fed directly, as the router would.
    fn queue() -> (mpsc::UnboundedSender<Vec<Entry>>, Queue) {
        let (tx, entries) = mpsc::unbounded_channel();
        let queue = Queue {
            entries,
            carry: None,
            budget: Arc::new(budget(1, 1 << 20, 1024).0),
        };
        (tx, queue)
    }

    #[tokio::test]
    async fn a_writer_merges_what_is_queued_up_to_the_batch_size() {
        let (tx, mut queue) = queue();
        for range in [0..3, 3..7, 7..9, 9..14, 14..16] {
            tx.send(range.map(|i| entry(i, None)).collect()).unwrap();
        }
        drop(tx);
        let mut batches = Vec::new();
        while let Some(batch) = queue.next(5, usize::MAX).await {
            batches.push(ids(&batch));
        }
        assert_eq!(
            batches,
            vec![
                (0..5).collect::<Vec<_>>(),
                (5..10).collect(),
                (10..15).collect(),
                (15..16).collect()
            ],
            "full batches while entries are queued, in order, none lost or repeated"
        );
    }

    #[tokio::test]
    async fn a_writer_takes_what_is_there_without_waiting_for_a_full_batch() {
        let (tx, mut queue) = queue();
        tx.send(vec![entry(0, None)]).unwrap();
        let batch = tokio::time::timeout(Duration::from_secs(5), queue.next(50, usize::MAX))
            .await
            .expect("a batch at once");
        assert_eq!(ids(&batch.unwrap()), vec![0]);
        assert!(queue.carry.is_none());
    }

    #[tokio::test]
    async fn each_user_goes_to_one_writer_in_the_order_read() {
        let (router, queues) = Router::new(3, budget(1200, 1 << 30, 1024).0);
        let users: Vec<String> = (0..12).map(|u| format!("user_{u}")).collect();
        let poison = |i: usize| match i % 50 {
            46 => Some(None),                                      // no fields
            47 => Some(Some("not json".to_string())),              // undecodable
            48 => Some(Some(r#"{"distinct_id": 7}"#.to_string())), // not a string
            _ => None,
        };
        let batch: Vec<Entry> = (0..200)
            .map(|i| match poison(i) {
                Some(event) => entry(i, event),
                None => of_user(i, &users[i % users.len()]),
            })
            .collect();
        assert!(router.send(batch));
        drop(router);
        let mut seen = Vec::new();
        let mut writer_of_user: HashMap<&str, usize> = HashMap::new();
        for (writer, mut queue) in queues.into_iter().enumerate() {
            let mut got = Vec::new();
            while let Some(batch) = queue.next(1000, usize::MAX).await {
                got.extend(ids(&batch));
            }
            assert!(got.is_sorted(), "writer {writer} got {got:?}");
            for &i in &got {
                if poison(i).is_some() {
                    assert_eq!(writer, 0, "an entry without a readable user: {i}");
                    continue;
                }
                let user = users[i % users.len()].as_str();
                let first = *writer_of_user.entry(user).or_insert(writer);
                assert_eq!(first, writer, "{user} went to two writers");
            }
            seen.extend(got);
        }
        seen.sort();
        assert_eq!(
            seen,
            (0..200).collect::<Vec<_>>(),
            "every entry exactly once"
        );
        assert!(
            writer_of_user.values().collect::<HashSet<_>>().len() > 1,
            "the users are spread over the writers"
        );
    }

    #[tokio::test]
    async fn a_writer_batch_is_bounded_in_bytes_and_holds_at_least_one_entry() {
        let (tx, mut queue) = queue();
        tx.send((0..3).map(|i| weighing(i, "a", 400)).collect())
            .unwrap();
        tx.send(vec![weighing(3, "a", 5_000)]).unwrap();
        tx.send((4..6).map(|i| weighing(i, "a", 400)).collect())
            .unwrap();
        drop(tx);
        let mut batches = Vec::new();
        while let Some(batch) = queue.next(100, 1_000).await {
            batches.push(ids(&batch));
        }
        assert_eq!(
            batches,
            vec![vec![0, 1], vec![2], vec![3], vec![4, 5]],
            "at most 1,000 bytes a batch, but an entry larger than that alone"
        );
    }

    #[tokio::test]
    async fn a_feeder_waiting_for_room_stops_once_a_writer_is_gone() {
        let (router, mut queues) = Router::new(1, budget(1, 1 << 20, 1024).0);
        let room = room_now(&router.budget, ANY).await;
        room.hold(&[of_user(0, "a")]);
        let asking = router.room(ANY);
        tokio::pin!(asking);
        assert!(waits(&mut asking).await, "one entry held, room for one");
        drop(queues.pop());
        let answer = tokio::time::timeout(Duration::from_secs(5), asking)
            .await
            .expect("stops at once");
        assert!(answer.is_none(), "the writers are gone");
        assert!(!router.send(vec![of_user(1, "a")]));
    }
}
