//! The consumer: reader, claimer and writer tasks of one worker replica.
//!
//! ```text
//! reader  (own pending entries, then new ones) ─┐            ┌─▶ writer 1: enrich → one transaction → XACK+XDEL
//!                                                ├─ by user ──┤   …          poison → DLQ → XACK+XDEL
//! claimer (idle entries of any consumer) ───────┘            └─▶ writer WRITE_CONCURRENCY
//! keep-alive: resets the idle time of entries held longer than a third of CLAIM_IDLE_MS
//! ```
//! The reader fetches the next batches while `WRITE_CONCURRENCY` writers store earlier ones. Each
//! entry goes to the writer of its user (a hash of `distinct_id`), so the transactions of one
//! replica never write the same profile or session rows and never wait for each other's row
//! locks. A writer merges what was queued for it while it was writing into its next batch (at
//! most `BATCH_SIZE` events). Read-ahead is bounded: at most 2 × `WRITE_CONCURRENCY` ×
//! `BATCH_SIZE` entries are queued or being stored. On shutdown the reader and claimer stop, the
//! writers store what was read, and anything still unacknowledged at `SHUTDOWN_TIMEOUT` stays
//! pending for other replicas.

use std::{
    collections::{HashMap, HashSet, hash_map},
    hash::{DefaultHasher, Hash, Hasher},
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use entity::{
    Envelope,
    envelope::{FIELD_EVENT, FIELD_TRACEPARENT},
};
use sea_orm::DatabaseConnection;
use tokio::{
    sync::{Semaphore, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    WorkerError,
    config::Config,
    enrich::Enricher,
    erasure,
    metrics::WorkerMetrics,
    store::{self, StoreError, StoredEvent, Written},
    stream::{Entry, Streams},
    telemetry,
};

/// Longest one batch transaction may take before it counts as failed (and is retried).
const STORE_TIMEOUT: Duration = Duration::from_secs(30);

/// The writer was told to give up (shutdown grace period over): its entries stay pending.
#[derive(Debug)]
struct Aborted;

/// Capped exponential backoff.
struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Self {
            next: first,
            first,
            max,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Entry ids this replica holds (read or claimed, not yet acknowledged), with since when.
#[derive(Default)]
struct Held(Mutex<HashMap<String, Instant>>);

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Holds the entries not held yet and returns them. One this replica holds already is in
    /// flight and is dropped: one entry must not be stored (or dead-lettered) twice at once, and
    /// the reader and the claimer can both return an entry this consumer has pending (a claim
    /// takes entries idle long enough, its own too, while the reader re-reads them after a
    /// restart).
    fn hold_new(&self, entries: Vec<Entry>) -> Vec<Entry> {
        let now = Instant::now();
        let mut held = self.lock();
        entries
            .into_iter()
            .filter(|e| match held.entry(e.id.clone()) {
                hash_map::Entry::Vacant(slot) => {
                    slot.insert(now);
                    true
                }
                hash_map::Entry::Occupied(_) => false,
            })
            .collect()
    }

    fn release(&self, ids: &[String]) {
        let mut held = self.lock();
        for id in ids {
            held.remove(id);
        }
    }

    fn older_than(&self, age: Duration) -> Vec<String> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, since)| now - **since >= age)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

/// What the tasks share.
struct Context {
    config: Config,
    streams: Streams,
    db: DatabaseConnection,
    /// Users whose profiles this replica has seen stored (their batches skip creating them).
    known_profiles: store::KnownProfiles,
    enricher: Arc<dyn Enricher>,
    held: Held,
    metrics: Arc<WorkerMetrics>,
}

/// Runs one replica until `shutdown`, then stores what it has read within `SHUTDOWN_TIMEOUT`.
pub async fn run(
    config: Config,
    enricher: Arc<dyn Enricher>,
    metrics: Arc<WorkerMetrics>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let db = store::connect(&config).await?;
    let streams = Streams::new(&config)?;
    // Health and metrics answer from the start (not ready until Redis and Postgres do).
    let server = match config.metrics_bind {
        Some(addr) => {
            let listener = crate::http::bind(addr, config.metrics_bind_is_default).await?;
            let probe = crate::http::Probe {
                config: config.clone(),
                redis: streams.commands(),
                db: db.clone(),
                rules: enricher.rules(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            };
            Some(tokio::spawn(crate::http::serve(listener, probe)))
        }
        None => None,
    };
    let report_stop = shutdown.child_token();
    let report = enricher.rules().map(|rules| {
        tokio::spawn(crate::unmatched::report_loop(
            rules,
            crate::unmatched::UnmatchedReport::new(streams.commands(), &config.queue_name)
                .with_erasures(db.clone()),
            metrics.clone(),
            report_stop.clone(),
        ))
    });
    let result = consume(config, enricher, metrics, db, streams, shutdown).await;
    report_stop.cancel();
    if let Some(report) = report {
        let _ = report.await;
    }
    if let Some(server) = server {
        server.abort();
    }
    result
}

async fn consume(
    config: Config,
    enricher: Arc<dyn Enricher>,
    metrics: Arc<WorkerMetrics>,
    db: DatabaseConnection,
    streams: Streams,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    if config.migrate_on_start {
        let schema = store::connect_for_migrations(&config).await?;
        let applied = retry_until("apply database migrations", &shutdown, || {
            migration::apply(&schema)
        })
        .await;
        schema.close().await.ok();
        if applied.is_none() {
            return Ok(());
        }
    }
    if retry_until("create the consumer group", &shutdown, || {
        streams.ensure_group()
    })
    .await
    .is_none()
    {
        return Ok(());
    }
    // Connections opened before the first entry is read, within a bound: a replica starting
    // while Postgres is down reads anyway (its writers retry until Postgres is back).
    let warm_up = tokio::time::timeout(
        WARM_UP_LIMIT,
        store::warm_up(&db, config.database_pool_size),
    );
    tokio::select! {
        warmed = warm_up => match warmed {
            Ok(Ok(())) => tracing::debug!(connections = config.database_pool_size, "Postgres connections ready"),
            Ok(Err(error)) => tracing::info!(%error, "Postgres connections not opened ahead: the first batches open them"),
            Err(_) => tracing::info!(limit = ?WARM_UP_LIMIT, "Postgres connections not open within the limit: the first batches open them"),
        },
        _ = shutdown.cancelled() => return Ok(()),
    }
    tracing::info!(
        stream = %config.queue_name,
        group = %config.consumer_group,
        consumer = %config.worker_name,
        batch_size = config.batch_size,
        "worker consuming"
    );
    let ctx = Arc::new(Context {
        config,
        streams,
        db,
        known_profiles: store::KnownProfiles::default(),
        enricher,
        held: Held::default(),
        metrics,
    });
    let (router, queues) = Router::new(ctx.config.write_concurrency, ctx.config.batch_size);
    let hard_stop = CancellationToken::new();

    let mut feeders = JoinSet::new();
    // The claimer starts once this consumer's own pending entries have been re-read: a claim
    // can make them this consumer's, and reading them then counted a delivery of its own.
    let own_pending_read = CancellationToken::new();
    feeders.spawn(read_loop(
        ctx.clone(),
        router.clone(),
        own_pending_read.clone(),
        shutdown.clone(),
    ));
    feeders.spawn(claim_loop(
        ctx.clone(),
        router,
        own_pending_read,
        shutdown.clone(),
    ));
    let keep_alive = tokio::spawn(keep_alive_loop(ctx.clone(), hard_stop.clone()));
    let mut writers = JoinSet::new();
    for queue in queues {
        writers.spawn(write_loop(ctx.clone(), queue, hard_stop.clone()));
    }
    let stopping = shutdown.clone();
    let mut writer = tokio::spawn(async move {
        // Ends when every writer has (their queues closed, or the grace period ran out), or as
        // soon as one ends before shutdown (a panic): its users' entries could not be stored.
        // Answers whether one ended before shutdown.
        while let Some(result) = writers.join_next().await {
            if let Err(error) = result {
                tracing::error!(%error, "writer task failed");
            }
            if !stopping.is_cancelled() {
                return true;
            }
        }
        false
    });

    let early = tokio::select! {
        // A writer that ended early counts even if shutdown came at the same time.
        biased;
        result = &mut writer => Some(result),
        _ = shutdown.cancelled() => None,
    };
    // Every writer may also have finished after shutdown began, before this task looked: a
    // clean stop (it was reported as a writer ending early, an error, on a busy machine).
    let writers_done = matches!(early, Some(Ok(false)));
    if let Some(result) = early.filter(|_| !writers_done) {
        feeders.abort_all();
        hard_stop.cancel();
        return Err(WorkerError::Stopped(format!(
            "writer ended before shutdown: {result:?}"
        )));
    }
    tracing::info!(grace = ?ctx.config.shutdown_timeout, "shutting down: storing what was read");
    let finished = writers_done
        || tokio::time::timeout(ctx.config.shutdown_timeout, &mut writer)
            .await
            .is_ok();
    if !finished {
        tracing::warn!(
            "shutdown grace period over: unfinished entries stay pending for other replicas"
        );
        hard_stop.cancel();
        let _ = writer.await;
    }
    hard_stop.cancel();
    feeders.abort_all();
    while feeders.join_next().await.is_some() {}
    let _ = keep_alive.await;
    ctx.db.close_by_ref().await.ok();
    tracing::info!("worker stopped");
    Ok(())
}

/// Longest a worker waits at start for its Postgres connections to open before it reads.
const WARM_UP_LIMIT: Duration = Duration::from_secs(2);

/// Retries `op` with backoff until it succeeds; `None` if shutdown came first.
async fn retry_until<T, E, F, Fut>(what: &str, shutdown: &CancellationToken, mut op: F) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let result = tokio::select! {
            result = tokio::time::timeout(STORE_TIMEOUT, op()) => result,
            _ = shutdown.cancelled() => return None,
        };
        let error = match result {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {STORE_TIMEOUT:?}"),
        };
        let delay = backoff.next_delay();
        tracing::warn!(
            error,
            retry_in_ms = delay.as_millis() as u64,
            "could not {what}; retrying"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return None,
        }
    }
}

/// Re-reads this consumer's own pending entries (a restart), then cancels `own_pending_read`
/// (as it does when it ends) and reads new ones.
async fn read_loop(
    ctx: Arc<Context>,
    router: Router,
    own_pending_read: CancellationToken,
    shutdown: CancellationToken,
) {
    let _own_pending_read = own_pending_read.clone().drop_guard();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut history = Some("0".to_string());
    while !shutdown.is_cancelled() {
        match ctx
            .streams
            .read(history.as_deref(), ctx.config.batch_size)
            .await
        {
            Ok(entries) => {
                backoff.reset();
                if let Some(after) = history.as_mut() {
                    match entries.last() {
                        Some(last) => {
                            tracing::info!(count = entries.len(), "re-reading own pending entries");
                            after.clone_from(&last.id);
                        }
                        None => {
                            history = None;
                            own_pending_read.cancel();
                        }
                    }
                }
                let entries = ctx.held.hold_new(entries);
                if entries.is_empty() {
                    continue;
                }
                if !router.send(entries).await {
                    tracing::error!("writers stopped: reading stops");
                    break;
                }
            }
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "reading the stream failed; retrying");
                if error.is_no_group()
                    && let Err(error) = ctx.streams.ensure_group().await
                {
                    tracing::warn!(%error, "could not recreate the consumer group");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
}

/// Every `CLAIM_INTERVAL`, from when `own_pending_read`: takes over entries idle longer than
/// `CLAIM_IDLE_MS` (a crashed or stuck replica's), then removes consumers that are gone and own
/// nothing.
async fn claim_loop(
    ctx: Arc<Context>,
    router: Router,
    own_pending_read: CancellationToken,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = own_pending_read.cancelled() => {}
        _ = shutdown.cancelled() => return,
    }
    let mut ticker = tokio::time::interval(ctx.config.claim_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let consumer_idle = ctx.config.claim_idle.max(ctx.config.flush_interval * 4);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let mut cursor = "0-0".to_string();
        loop {
            match ctx
                .streams
                .claim(ctx.config.claim_idle, &cursor, ctx.config.batch_size)
                .await
            {
                Ok((entries, next)) => {
                    let entries = ctx.held.hold_new(entries);
                    if !entries.is_empty() {
                        tracing::info!(
                            count = entries.len(),
                            "claimed idle entries of other consumers"
                        );
                        ctx.metrics.claimed.inc_by(entries.len() as u64);
                        if !router.send(entries).await {
                            tracing::error!("writers stopped: claiming stops");
                            return;
                        }
                    }
                    if next == "0-0" || shutdown.is_cancelled() {
                        break;
                    }
                    cursor = next;
                }
                Err(error) => {
                    tracing::warn!(%error, "claiming idle entries failed");
                    break;
                }
            }
        }
        match ctx.streams.remove_idle_consumers(consumer_idle).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "removed idle consumers that own nothing")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "removing idle consumers failed"),
        }
    }
}

/// Keeps entries this replica holds from looking idle to the claimers of other replicas while a
/// batch waits (e.g. for Postgres to come back), without counting a delivery.
async fn keep_alive_loop(ctx: Arc<Context>, stop: CancellationToken) {
    let period = ctx.config.claim_idle / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.cancelled() => return,
        }
        let ids = ctx.held.older_than(period);
        if ids.is_empty() {
            continue;
        }
        match ctx.streams.keep_alive(&ids).await {
            Ok(()) => tracing::debug!(count = ids.len(), "refreshed held entries"),
            Err(error) => tracing::warn!(%error, "refreshing held entries failed"),
        }
    }
}

/// Hands entries to the writers: each user's entries to the same writer, in the order read.
///
/// Read-ahead is bounded in entries, whichever writer they are for: at most
/// 2 × `WRITE_CONCURRENCY` × `BATCH_SIZE` entries are queued or being stored at once (as many as
/// when every writer held one batch and had one more waiting). A slow writer (a hot user, a
/// batch being retried) does not hold up the other writers' queues until that budget is spent.
#[derive(Clone)]
struct Router {
    writers: Vec<mpsc::UnboundedSender<Vec<Entry>>>,
    budget: Arc<Semaphore>,
}

impl Router {
    /// A router to `writers` writers (at least one) and the queue of each.
    fn new(writers: usize, batch_size: usize) -> (Self, Vec<Queue>) {
        let writers = writers.max(1);
        let budget = Arc::new(Semaphore::new(2 * writers * batch_size.max(1)));
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

    /// Sends each entry to its writer once the read-ahead budget has room for them; `false` once
    /// the writers are gone. A read holds at most `BATCH_SIZE` entries, within the budget.
    async fn send(&self, entries: Vec<Entry>) -> bool {
        let Ok(room) = self.budget.acquire_many(entries.len() as u32).await else {
            return false;
        };
        room.forget();
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
struct Queue {
    entries: mpsc::UnboundedReceiver<Vec<Entry>>,
    carry: Option<Vec<Entry>>,
    budget: Arc<Semaphore>,
}

impl Queue {
    /// The next batch: what is left over, or the next piece sent (waiting for one), then whatever
    /// else was sent meanwhile, up to `limit` entries; the rest is kept for the batch after.
    /// `None` when the router is gone and nothing is left. Cancel-safe: nothing is taken out of
    /// the queue across an await.
    async fn next(&mut self, limit: usize) -> Option<Vec<Entry>> {
        let mut batch = match self.carry.take() {
            Some(batch) => batch,
            None => self.entries.recv().await?,
        };
        while batch.len() < limit {
            let Ok(mut more) = self.entries.try_recv() else {
                break;
            };
            batch.append(&mut more);
        }
        if batch.len() > limit {
            self.carry = Some(batch.split_off(limit));
        }
        Some(batch)
    }

    /// `count` entries taken from this queue are finished (stored or dead-lettered, and
    /// acknowledged): room for as many more in the read-ahead budget.
    fn done(&self, count: usize) {
        self.budget.add_permits(count);
    }
}

impl Drop for Queue {
    /// A writer that is gone gives back no more room: close the budget, so that a reader or
    /// claimer waiting for room stops at once (`Router::send` answers `false`) instead of waiting
    /// for entries that will never be finished. In a normal shutdown they have already stopped.
    fn drop(&mut self) {
        self.budget.close();
    }
}

/// One of `WRITE_CONCURRENCY` writers, storing the entries of its share of the users. The
/// writers' transactions run side by side, so one batch's commit (a WAL flush) overlaps the
/// others' statements. Order across batches does not matter: rows are keyed by uuid and profile
/// merges do not depend on arrival order.
async fn write_loop(ctx: Arc<Context>, mut queue: Queue, hard_stop: CancellationToken) {
    loop {
        let batch = tokio::select! {
            batch = queue.next(ctx.config.batch_size) => batch,
            _ = hard_stop.cancelled() => None,
        };
        let Some(batch) = batch else { return };
        let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
        let span = batch_span(&batch);
        if process(&ctx, batch, &hard_stop)
            .instrument(span)
            .await
            .is_err()
        {
            return;
        }
        ctx.held.release(&ids);
        queue.done(ids.len());
    }
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
    let ruleset = ctx.enricher.ruleset();
    let entries = batch.len();
    let metrics = &ctx.metrics;
    metrics.batch_size.observe(entries as f64);
    let mut ack: Vec<String> = Vec::with_capacity(entries);
    let mut poison: Vec<(Entry, Poison)> = Vec::new();
    let mut good: Vec<(Entry, StoredEvent)> = Vec::with_capacity(entries);
    for (i, entry) in batch.into_iter().enumerate() {
        if i > 0 && i % YIELD_EVERY == 0 {
            // Decoding and enriching a large batch is CPU work without an await: let the other
            // writers' transactions move on meanwhile (their backends wait, holding their locks).
            tokio::task::yield_now().await;
        }
        if entry.fields.is_empty() {
            tracing::warn!(id = %entry.id, "pending entry no longer in the stream: acknowledging it");
            ack.push(entry.id);
            continue;
        }
        if entry.deliveries > 1 {
            metrics.redeliveries.inc();
        }
        if entry.deliveries > ctx.config.max_deliveries {
            let error = format!(
                "delivered {} times, more than MAX_DELIVERIES={}",
                entry.deliveries, ctx.config.max_deliveries
            );
            poison.push((entry, Poison::new("max_deliveries", error)));
            continue;
        }
        let described = store::decode(|name| entry.field(name), ruleset.as_ref())
            .map_err(|e| Poison::new("undecodable", format!("undecodable entry: {e}")))
            .and_then(|(envelope, written)| {
                let enrich = || ruleset.enrich_written(&envelope, written);
                match std::panic::catch_unwind(AssertUnwindSafe(enrich)) {
                    Ok(Ok(enrichment)) => Ok(StoredEvent::new(envelope, enrichment, written)),
                    Ok(Err(e)) => Err(Poison::new(
                        "enrichment_failed",
                        format!("enrichment failed: {e}"),
                    )),
                    Err(_) => Err(Poison::new(
                        "enrichment_failed",
                        "enrichment panicked".to_string(),
                    )),
                }
            });
        match described {
            Ok(event) => {
                match &event.rule_id {
                    Some(rule) => metrics.rules_matched.with_label_values(&[rule]).inc(),
                    None => metrics.rules_unmatched.inc(),
                }
                good.push((entry, event))
            }
            Err(error) => poison.push((entry, error)),
        }
    }

    let (good, events): (Vec<Entry>, Vec<StoredEvent>) = good.into_iter().unzip();
    let started = Instant::now();
    let (written, rejected) = store(ctx, &events, ruleset.version(), hard_stop).await?;
    if !events.is_empty() {
        metrics
            .db_write_seconds
            .observe(started.elapsed().as_secs_f64());
    }
    let duplicates = events.len() - written.stored - written.erased - rejected.len();
    metrics.events_stored.inc_by(written.stored as u64);
    metrics.events_erased.inc_by(written.erased as u64);
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
            None => ack.push(entry.id),
        }
    }

    if !poison.is_empty() {
        let erased = retrying(hard_stop, "dead-letter entries", || {
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
        ack.extend(poison.into_iter().map(|(e, _)| e.id));
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
/// Returns which entries were dropped. Entries with a readable user are written under the
/// erasure locks of their users ([`erasure::guarded`]), so an erasure that scans the
/// dead-letter stream either finds them or is seen here.
async fn dead_letter(ctx: &Context, poison: &[(Entry, Poison)]) -> Result<Vec<bool>, BoxError> {
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
        ctx.streams.dead_letter(&letters).await.map(|()| erased)
    };
    if ids.is_empty() {
        return Ok(append(&erasure::Tombstones::default()).await?);
    }
    Ok(erasure::guarded(&ctx.db, &ids, append).await??)
}

/// Any error of a step retried as a whole.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Entries decoded and enriched between two yields to the other tasks (about half a millisecond).
const YIELD_EVERY: usize = 32;

/// Why an entry goes to the dead-letter stream: a metric label and the stored error.
struct Poison {
    reason: &'static str,
    error: String,
}

impl Poison {
    fn new(reason: &'static str, error: String) -> Self {
        Poison { reason, error }
    }
}

/// Stores events; on a data error, stores each half on its own, and so on down to the events
/// Postgres rejects alone (a few bad events among `BATCH_SIZE` take a few dozen transactions,
/// not one per event). Returns how many were stored or erased, and the rejected ones by index
/// with the error.
async fn store(
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
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut failures = 0u32;
    loop {
        let attempt = tokio::time::timeout(
            STORE_TIMEOUT,
            store::write_batch(&ctx.db, &ctx.known_profiles, events, rules_version),
        );
        let result = tokio::select! {
            result = attempt => result.unwrap_or(Err(StoreError::Timeout(STORE_TIMEOUT))),
            _ = hard_stop.cancelled() => return Err(Aborted),
        };
        match result {
            Ok(written) => {
                if failures > 0 {
                    tracing::info!(failures, "database reachable again: batch stored");
                }
                return Ok(Ok(written));
            }
            Err(error) if error.is_data_error() => return Ok(Err(error)),
            Err(error) => {
                failures += 1;
                let delay = backoff.next_delay();
                tracing::warn!(%error, failures, retry_in_ms = delay.as_millis() as u64, "storing batch failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = hard_stop.cancelled() => return Err(Aborted),
                }
            }
        }
    }
}

/// Retries `op` (a Redis or Postgres step of a batch) with capped exponential backoff until it
/// succeeds or the writer is told to give up.
async fn retrying<T, E, F, Fut>(
    hard_stop: &CancellationToken,
    what: &str,
    mut op: F,
) -> Result<T, Aborted>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let error = tokio::select! {
            result = op() => match result {
                Ok(value) => return Ok(value),
                Err(error) => error,
            },
            _ = hard_stop.cancelled() => return Err(Aborted),
        };
        let delay = backoff.next_delay();
        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "could not {what}; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = hard_stop.cancelled() => return Err(Aborted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry as read from the stream: `event` is its envelope JSON; `None`: no fields at all
    /// (a pending entry deleted from the stream).
    fn entry(i: usize, event: Option<String>) -> Entry {
        let fields = match event {
            Some(event) => vec![
                ("v".to_string(), b"1".to_vec()),
                (FIELD_EVENT.to_string(), event.into_bytes()),
            ],
            None => Vec::new(),
        };
        Entry {
            id: format!("{i}-0"),
            fields,
            deliveries: 1,
        }
    }

    fn of_user(i: usize, user: &str) -> Entry {
        let event =
            serde_json::json!({"uuid": uuid::Uuid::now_v7(), "distinct_id": user, "event": "e"});
        entry(i, Some(event.to_string()))
    }

    fn position(entry: &Entry) -> usize {
        entry.id.trim_end_matches("-0").parse().unwrap()
    }

    fn ids(batch: &[Entry]) -> Vec<usize> {
        batch.iter().map(position).collect()
    }

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
        held.release(&["2-0".to_string()]);
        assert_eq!(ids(&held.hold_new(vec![entry(2, None)])), [2]);
    }

    /// A queue fed directly, as the router would.
    fn queue() -> (mpsc::UnboundedSender<Vec<Entry>>, Queue) {
        let (tx, entries) = mpsc::unbounded_channel();
        let queue = Queue {
            entries,
            carry: None,
            budget: Arc::new(Semaphore::new(0)),
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
        while let Some(batch) = queue.next(5).await {
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
        let batch = tokio::time::timeout(Duration::from_secs(5), queue.next(50))
            .await
            .expect("a batch at once");
        assert_eq!(ids(&batch.unwrap()), vec![0]);
        assert!(queue.carry.is_none());
    }

    #[tokio::test]
    async fn each_user_goes_to_one_writer_in_the_order_read() {
        let (router, queues) = Router::new(3, 200);
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
        assert!(router.send(batch).await);
        drop(router);
        let mut seen = Vec::new();
        let mut writer_of_user: HashMap<&str, usize> = HashMap::new();
        for (writer, mut queue) in queues.into_iter().enumerate() {
            let mut got = Vec::new();
            while let Some(batch) = queue.next(1000).await {
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
    async fn read_ahead_waits_for_the_writers_to_finish_entries() {
        // One writer, batches of 2: room for 2 × 1 × 2 = 4 entries.
        let (router, mut queues) = Router::new(1, 2);
        let mut queue = queues.pop().unwrap();
        assert!(router.send(vec![of_user(0, "a"), of_user(1, "a")]).await);
        assert!(router.send(vec![of_user(2, "a"), of_user(3, "a")]).await);
        let blocked = tokio::time::timeout(
            Duration::from_millis(200),
            router.send(vec![of_user(4, "a")]),
        )
        .await;
        assert!(
            blocked.is_err(),
            "a fifth entry waits while four are unfinished"
        );
        let batch = queue.next(2).await.unwrap();
        assert_eq!(ids(&batch), vec![0, 1]);
        queue.done(batch.len());
        let sent = tokio::time::timeout(Duration::from_secs(5), router.send(vec![of_user(4, "a")]))
            .await
            .expect("room once two entries are finished");
        assert!(sent);
        // The budget is spent (entries 2, 3, 4 unfinished, one permit left): a read of two waits.
        let waiting = tokio::spawn({
            let router = router.clone();
            async move { router.send(vec![of_user(5, "a"), of_user(6, "a")]).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "waits for room");
        drop(queue);
        let answer = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a waiting read stops once the writer is gone")
            .unwrap();
        assert!(!answer, "the writers are gone");
        assert!(!router.send(vec![of_user(7, "a")]).await);
    }
}
