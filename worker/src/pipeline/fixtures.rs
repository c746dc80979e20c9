//! Entries and read-ahead budgets for the pipeline's unit tests.

use std::time::Duration;

use entity::envelope::FIELD_EVENT;

use super::budget::{ReadAhead, Room};
use crate::{metrics::WorkerMetrics, stream::Entry};

/// An entry as read from the stream: `event` is its envelope JSON; `None`: no fields at all
/// (a pending entry deleted from the stream).
pub(super) fn entry(i: usize, event: Option<String>) -> Entry {
    let fields = match event {
        Some(event) => vec![
            ("v".to_string(), b"1".to_vec()),
            (FIELD_EVENT.to_string(), event.into_bytes()),
        ],
        None => Vec::new(),
    };
    Entry {
        shard: 0,
        id: format!("{i}-0"),
        fields,
        deliveries: 1,
    }
}

pub(super) fn of_user(i: usize, user: &str) -> Entry {
    let event =
        serde_json::json!({"uuid": uuid::Uuid::now_v7(), "distinct_id": user, "event": "e"});
    entry(i, Some(event.to_string()))
}

pub(super) fn position(entry: &Entry) -> usize {
    entry.id.trim_end_matches("-0").parse().unwrap()
}

pub(super) fn ids(batch: &[Entry]) -> Vec<usize> {
    batch.iter().map(position).collect()
}

/// An entry of `bytes` bytes ([`Entry::bytes`]) for user `user`.
pub(super) fn weighing(i: usize, user: &str, bytes: usize) -> Entry {
    let mut entry = of_user(i, user);
    let pad = bytes
        .checked_sub(entry.bytes() + "pad".len())
        .expect("room for the envelope");
    entry.fields.push(("pad".to_string(), vec![b'x'; pad]));
    assert_eq!(entry.bytes(), bytes);
    entry
}

/// A budget of `entries` entries and `bytes` bytes for events of up to `event` bytes.
pub(super) fn budget(entries: usize, bytes: usize, event: usize) -> (ReadAhead, WorkerMetrics) {
    let metrics = WorkerMetrics::new();
    (ReadAhead::new(entries, bytes, event, &metrics), metrics)
}

/// A read asking for more entries than any test budget holds.
pub(super) const ANY: usize = 1_000_000;

/// The room a feeder gets at once.
pub(super) async fn room_now(budget: &ReadAhead, at_most: usize) -> Room<'_> {
    tokio::time::timeout(Duration::from_secs(5), budget.room(at_most))
        .await
        .expect("room at once")
        .expect("budget open")
}

/// Whether a feeder asking for room still waits once the other tasks have had their turn.
pub(super) async fn waits<F: Future>(asking: &mut std::pin::Pin<&mut F>) -> bool {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    std::future::poll_fn(|cx| std::task::Poll::Ready(asking.as_mut().poll(cx).is_pending())).await
}
