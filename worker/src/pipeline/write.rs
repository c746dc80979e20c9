//! The writers: each stores the batches of its share of the users in one transaction (split to
//! find the events Postgres rejects), dead-letters the poison, then acknowledges the batch.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use entity::envelope::{FIELD_EVENT, FIELD_TRACEPARENT};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use infra::{erasure, postgres::StoreError, telemetry};

use super::{
    Context, STORE_TIMEOUT,
    retry::{Backoff, retry, retry_logged},
    route::Queue,
    sort::{self, Poison, Sorted},
};
use crate::{
    config::Config,
    store::{self, StoredEvent, Written},
    stream::{Entry, EntryId},
};

/// The writer was told to give up (shutdown grace period over): its entries stay pending.
#[derive(Debug)]
struct Aborted;

/// One of `WRITE_CONCURRENCY` writers, storing the entries of its share of the users. The
/// writers' transactions run side by side, so one batch's commit (a WAL flush) overlaps the
/// others' statements. Order across batches does not matter: rows are keyed by uuid and profile
/// merges do not depend on arrival order.
pub(super) async fn write_loop(ctx: Arc<Context>, mut queue: Queue, hard_stop: CancellationToken) {
    let batch_bytes = batch_bytes(&ctx.config);
    loop {
        let batch = tokio::select! {
            batch = queue.next(ctx.config.batch_size, batch_bytes) => batch,
            _ = hard_stop.cancelled() => None,
        };
        let Some(batch) = batch else { return };
        let ids: Vec<EntryId> = batch.iter().map(Entry::entry_id).collect();
        let bytes = batch.iter().map(Entry::bytes).sum();
        let span = batch_span(&batch);
        if process(&ctx, batch, &hard_stop)
            .instrument(span)
            .await
            .is_err()
        {
            return;
        }
        ctx.held.release(&ids);
        queue.done(ids.len(), bytes);
    }
}

/// Most bytes of entries in one writer's batch: its share of `READ_AHEAD_BYTES` when every
/// writer holds one batch and has one more waiting, as `BATCH_SIZE` is of the entries bound (a
/// batch and what it is turned into are in memory together while it is stored). A single entry
/// larger than that is a batch of its own.
fn batch_bytes(config: &Config) -> usize {
    config.read_ahead_bytes / (2 * config.write_concurrency.max(1))
}

/// The span of one batch. When spans are exported it continues the trace of the batch's first
/// entry that carries a `traceparent` (the request that queued it, so one trace shows request →
/// XADD → batch → transaction), and links to the traces of the other entries.
fn batch_span(batch: &[Entry]) -> tracing::Span {
    let span = tracing::info_span!(
        "worker.batch",
        otel.kind = "consumer",
        entries = batch.len()
    );
    if telemetry::is_exporting() {
        let mut seen: HashSet<&[u8]> = HashSet::new();
        let mut has_parent = false;
        for traceparent in batch.iter().filter_map(|e| e.field(FIELD_TRACEPARENT)) {
            if !seen.insert(traceparent) {
                continue;
            }
            if has_parent {
                telemetry::link(&span, traceparent);
            } else {
                has_parent = telemetry::continue_trace(&span, traceparent);
            }
        }
    }
    span
}

/// Enriches, stores and acknowledges one batch; poison entries go to the DLQ.
async fn process(
    ctx: &Context,
    batch: Vec<Entry>,
    hard_stop: &CancellationToken,
) -> Result<(), Aborted> {
    let describer = ctx.enricher.describer();
    let entries = batch.len();
    let metrics = &ctx.metrics;
    metrics.batch_size.observe(entries as f64);
    let Sorted {
        mut ack,
        mut poison,
        good,
    } = sort::sort(ctx, batch, describer.as_ref()).await;
    let (good, events): (Vec<Entry>, Vec<StoredEvent>) = good.into_iter().unzip();
    let started = Instant::now();
    let (written, rejected) = store_events(ctx, &events, describer.version(), hard_stop).await?;
    if !events.is_empty() {
        metrics
            .db_write_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    let duplicates = events.len() - written.stored - written.erased - rejected.len();
    metrics.events_stored.inc_by(written.stored as u64);
    metrics.events_erased.inc_by(written.erased as u64);
    for (result, n) in written.merges.by_result() {
        if n > 0 {
            metrics
                .person_merges
                .with_label_values(&[result])
                .inc_by(n as u64);
        }
    }
    metrics.events_duplicate.inc_by(duplicates as u64);
    let mut rejected: HashMap<usize, String> = rejected.into_iter().collect();
    for (i, entry) in good.into_iter().enumerate() {
        match rejected.remove(&i) {
            Some(error) => poison.push((
                entry,
                Poison::new(
                    "rejected_by_postgres",
                    format!("rejected by Postgres: {error}"),
                ),
            )),
            None => ack.push(entry.entry_id()),
        }
    }

    if !poison.is_empty() {
        let (erased, trimmed) = retrying(hard_stop, "dead-letter entries", || {
            dead_letter(ctx, &poison)
        })
        .await?;
        for ((entry, Poison { reason, error }), erased) in poison.iter().zip(&erased) {
            if *erased {
                metrics.events_erased.inc();
                tracing::debug!(id = %entry.id, "entry of an erased user dropped, not dead-lettered");
                continue;
            }
            metrics.dead_lettered.with_label_values(&[reason]).inc();
            tracing::warn!(id = %entry.id, deliveries = entry.deliveries, %error, dlq = %ctx.config.dlq_name, "entry dead-lettered");
        }
        if trimmed > 0 {
            metrics.dead_letters_trimmed.inc_by(trimmed);
            tracing::warn!(
                trimmed,
                dlq = %ctx.config.dlq_name,
                max_len = ctx.config.dlq_maxlen,
                "dead-letter stream full (DLQ_MAXLEN): its oldest entries removed"
            );
        }
        ack.extend(poison.into_iter().map(|(e, _)| e.entry_id()));
    }
    retrying(hard_stop, "acknowledge entries", || ctx.streams.ack(&ack)).await?;
    tracing::debug!(
        entries,
        stored = written.stored,
        erased = written.erased,
        duplicates,
        "batch done"
    );
    Ok(())
}

/// Appends the `poison` entries to the dead-letter stream, except those of users erased after
/// the entry was received (or at an unknown time): those are dropped, as their events are.
/// Returns which entries were dropped, and how many old dead letters `DLQ_MAXLEN` trimmed.
/// Entries with a readable user are written under the erasure locks of their users
/// ([`erasure::guarded`]), so an erasure that scans the dead-letter stream either finds them or
/// is seen here.
async fn dead_letter(
    ctx: &Context,
    poison: &[(Entry, Poison)],
) -> Result<(Vec<bool>, u64), BoxError> {
    let users: Vec<Option<(String, Option<DateTime<Utc>>)>> = poison
        .iter()
        .map(|(entry, _)| entry.field(FIELD_EVENT).and_then(erasure::event_user))
        .collect();
    let mut ids: Vec<&str> = users.iter().flatten().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let append = async |tombstones: &erasure::Tombstones| {
        let erased: Vec<bool> = users
            .iter()
            .map(|user| {
                user.as_ref()
                    .is_some_and(|(id, at)| tombstones.erases(id, *at))
            })
            .collect();
        let letters: Vec<(&Entry, String)> = poison
            .iter()
            .zip(&erased)
            .filter(|(_, erased)| !**erased)
            .map(|((entry, p), _)| (entry, p.error.clone()))
            .collect();
        ctx.streams
            .dead_letter(&letters)
            .await
            .map(|trimmed| (erased, trimmed))
    };
    if ids.is_empty() {
        return Ok(append(&erasure::Tombstones::default()).await?);
    }
    Ok(erasure::guarded(&ctx.db, &ids, append).await??)
}

/// Any error of a step retried as a whole.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Stores events; on a data error, stores each half on its own, and so on down to the events
/// Postgres rejects alone (a few bad events among `BATCH_SIZE` take a few dozen transactions,
/// not one per event). Returns how many were stored or erased, and the rejected ones by index
/// with the error.
async fn store_events(
    ctx: &Context,
    events: &[StoredEvent],
    rules_version: &str,
    hard_stop: &CancellationToken,
) -> Result<(Written, Vec<(usize, String)>), Aborted> {
    let mut written = Written::default();
    let mut rejected = Vec::new();
    // Ranges of `events` still to store, the next one last.
    let mut ranges = Vec::new();
    ranges.push(0..events.len());
    while let Some(range) = ranges.pop() {
        if range.is_empty() {
            continue;
        }
        match write_retrying(ctx, &events[range.clone()], rules_version, hard_stop).await? {
            Ok(part) => {
                written.stored += part.stored;
                written.erased += part.erased;
                written.merges.add(part.merges);
            }
            Err(error) if range.len() == 1 => rejected.push((range.start, error.to_string())),
            Err(error) => {
                if range.len() == events.len() {
                    tracing::warn!(%error, count = events.len(), "batch rejected by Postgres: storing it in parts to find the events it rejects");
                }
                let middle = range.start + range.len() / 2;
                ranges.push(middle..range.end);
                ranges.push(range.start..middle);
            }
        }
    }
    Ok((written, rejected))
}

/// Retries transient failures (Postgres down, timeouts, deadlocks) with capped exponential backoff
/// until the batch is stored or rejected for its data. Never acknowledges anything itself.
async fn write_retrying(
    ctx: &Context,
    events: &[StoredEvent],
    rules_version: &str,
    hard_stop: &CancellationToken,
) -> Result<Result<Written, StoreError>, Aborted> {
    let mut failures = 0u32;
    let attempt = || {
        let write = tokio::time::timeout(
            STORE_TIMEOUT,
            store::write_batch(&ctx.db, &ctx.known_profiles, events, rules_version),
        );
        async move {
            match write
                .await
                .unwrap_or(Err(StoreError::Timeout(STORE_TIMEOUT)))
            {
                Ok(written) => Ok(Ok(written)),
                // Rejected for its data: the same batch would be rejected again.
                Err(error) if error.is_data_error() => Ok(Err(error)),
                Err(error) => Err(error),
            }
        }
    };
    let failed = |error: StoreError, delay: Duration| {
        failures += 1;
        tracing::warn!(%error, failures, retry_in_ms = delay.as_millis() as u64, "storing batch failed; retrying");
    };
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let result = retry(backoff, hard_stop, attempt, failed)
        .await
        .ok_or(Aborted)?;
    if failures > 0 && result.is_ok() {
        tracing::info!(failures, "database reachable again: batch stored");
    }
    Ok(result)
}

/// Retries `op` (a Redis or Postgres step of a batch) with capped exponential backoff until it
/// succeeds or the writer is told to give up.
async fn retrying<T, E, Fut>(
    hard_stop: &CancellationToken,
    what: &str,
    op: impl FnMut() -> Fut,
) -> Result<T, Aborted>
where
    E: std::fmt::Display,
    Fut: Future<Output = Result<T, E>>,
{
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    retry_logged(what, backoff, hard_stop, op)
        .await
        .ok_or(Aborted)
}
