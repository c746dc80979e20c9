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
//! most `BATCH_SIZE` events, and a share of the read-ahead bytes). Read-ahead is bounded in
//! entries and in bytes: at most 2 × `WRITE_CONCURRENCY` × `BATCH_SIZE` entries and
//! `READ_AHEAD_BYTES` bytes are being read, queued or stored (see [`ReadAhead`]). On shutdown
//! the reader and claimer stop, the writers store what was read, and anything still
//! unacknowledged at `SHUTDOWN_TIMEOUT` stays pending for other replicas.

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
use prometheus::IntGauge;
use sea_orm::DatabaseConnection;
use tokio::{
    sync::{Notify, mpsc},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use infra::{erasure, postgres::StoreError, telemetry};
use rules_engine::enrich::Enricher;

use crate::{
    WorkerError,
    config::Config,
    metrics::WorkerMetrics,
    store::{self, StoredEvent, Written},
    stream::{Entry, Streams},
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
            let listener = crate::probe::bind(addr, config.metrics_bind_is_default).await?;
            let probe = crate::probe::Probe {
                config: config.clone(),
                redis: streams.commands(),
                db: db.clone(),
                rules: enricher.rules(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            };
            Some(tokio::spawn(crate::probe::serve(listener, probe)))
        }
        None => None,
    };
    let report_stop = shutdown.child_token();
    let report = enricher.rules().map(|rules| {
        tokio::spawn(crate::unmatched::report_loop(
            rules,
            infra::unmatched::UnmatchedReport::new(streams.commands(), &config.queue_name)
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
    let budget = ReadAhead::new(
        2 * ctx.config.write_concurrency * ctx.config.batch_size,
        ctx.config.read_ahead_bytes,
        ctx.config.max_event_bytes,
        &ctx.metrics,
    );
    let (router, queues) = Router::new(ctx.config.write_concurrency, budget);
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
    let mut size = ReadSize::new(ctx.config.batch_size, ctx.config.max_event_bytes);
    while !shutdown.is_cancelled() {
        let room = tokio::select! {
            room = router.room(size.next()) => room,
            _ = shutdown.cancelled() => break,
        };
        let Some(room) = room else {
            tracing::error!("writers stopped: reading stops");
            break;
        };
        match ctx.streams.read(history.as_deref(), room.count()).await {
            Ok(entries) => {
                backoff.reset();
                size.read(&entries);
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
                room.hold(&entries);
                if entries.is_empty() {
                    continue;
                }
                if !router.send(entries) {
                    tracing::error!("writers stopped: reading stops");
                    break;
                }
            }
            Err(error) => {
                drop(room);
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
    let mut size = ReadSize::new(ctx.config.batch_size, ctx.config.max_event_bytes);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let mut cursor = "0-0".to_string();
        loop {
            let room = tokio::select! {
                room = router.room(size.next()) => room,
                _ = shutdown.cancelled() => return,
            };
            let Some(room) = room else {
                tracing::error!("writers stopped: claiming stops");
                return;
            };
            match ctx
                .streams
                .claim(ctx.config.claim_idle, &cursor, room.count())
                .await
            {
                Ok((entries, next)) => {
                    size.read(&entries);
                    let entries = ctx.held.hold_new(entries);
                    room.hold(&entries);
                    if !entries.is_empty() {
                        tracing::info!(
                            count = entries.len(),
                            "claimed idle entries of other consumers"
                        );
                        ctx.metrics.claimed.inc_by(entries.len() as u64);
                        if !router.send(entries) {
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

/// Bytes an entry holds besides its event's JSON (at most `MAX_EVENT_BYTES`): its id and the field
/// names, the envelope version and the `traceparent`. Reads assume `MAX_EVENT_BYTES` plus this
/// for each entry they ask for.
const ENTRY_OVERHEAD_BYTES: usize = 1024;

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
/// bound by its own size (after one, reads ask for one entry at a time: [`ReadSize`]), and the
/// next read waits until what is held is back under the bound.
struct ReadAhead {
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
    /// Bytes of the entries held only (what `worker_read_ahead_bytes` shows).
    held: usize,
    peak: usize,
    /// A writer is gone: nothing will be given back.
    closed: bool,
}

impl ReadAhead {
    fn new(
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
    async fn room(&self, at_most: usize) -> Option<Room<'_>> {
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
    fn give_back(&self, entries: usize, bytes: usize) {
        let mut taken = self.lock();
        taken.entries = taken.entries.saturating_sub(entries);
        taken.bytes = taken.bytes.saturating_sub(bytes);
        taken.held = taken.held.saturating_sub(bytes);
        self.held_gauge.set(taken.held as i64);
        drop(taken);
        self.room.notify_one();
    }

    /// Nothing more will be given back (a writer is gone): a feeder waiting for room stops.
    fn close(&self) {
        self.lock().closed = true;
        self.room.notify_one();
    }
}

/// Room taken for one read; given back when dropped unless [`Room::hold`] turned it into the
/// entries read.
struct Room<'a> {
    budget: &'a ReadAhead,
    count: usize,
    bytes: usize,
}

impl Room<'_> {
    /// How many entries the read may ask for.
    fn count(&self) -> usize {
        self.count
    }

    /// The read returned `entries` to hold (at most [`Room::count`]): the room taken becomes
    /// theirs, at what they weigh.
    fn hold(mut self, entries: &[Entry]) {
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

/// How many entries one feeder's next read asks for at most: one at first, twice as many after
/// each read, up to `BATCH_SIZE`; one again after a read brought an entry larger than
/// `MAX_EVENT_BYTES`. A replica restarting on (or taking over) entries queued before the api
/// refused large events thus reads them one at a time, not a budget's worth at once.
struct ReadSize {
    next: usize,
    max: usize,
    largest_expected: usize,
}

impl ReadSize {
    fn new(batch_size: usize, max_event_bytes: usize) -> Self {
        Self {
            next: 1,
            max: batch_size.max(1),
            largest_expected: max_event_bytes + ENTRY_OVERHEAD_BYTES,
        }
    }

    fn next(&self) -> usize {
        self.next
    }

    /// What the last read brought; logs the entries larger than expected.
    fn read(&mut self, entries: &[Entry]) {
        let mut larger = entries
            .iter()
            .filter(|e| e.bytes() > self.largest_expected)
            .peekable();
        if larger.peek().is_none() {
            self.next = (self.next * 2).min(self.max);
            return;
        }
        self.next = 1;
        for entry in larger {
            tracing::warn!(
                id = %entry.id,
                bytes = entry.bytes(),
                max_event_bytes = self.largest_expected - ENTRY_OVERHEAD_BYTES,
                "entry larger than MAX_EVENT_BYTES (queued before the api refused such events?): \
                 taken anyway; reading one entry at a time for now"
            );
        }
    }
}

/// Hands entries to the writers: each user's entries to the same writer, in the order read,
/// within the replica's [`ReadAhead`] budget, whichever writer they are for. A slow writer (a hot
/// user, a batch being retried) does not hold up the other writers' queues until that budget is
/// spent.
#[derive(Clone)]
struct Router {
    writers: Vec<mpsc::UnboundedSender<Vec<Entry>>>,
    budget: Arc<ReadAhead>,
}

impl Router {
    /// A router to `writers` writers (at least one) and the queue of each, sharing `budget`.
    fn new(writers: usize, budget: ReadAhead) -> (Self, Vec<Queue>) {
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
    async fn room(&self, at_most: usize) -> Option<Room<'_>> {
        self.budget.room(at_most).await
    }

    /// Sends each entry to its writer (their room is held already); `false` once the writers are
    /// gone.
    fn send(&self, entries: Vec<Entry>) -> bool {
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
    budget: Arc<ReadAhead>,
}

impl Queue {
    /// The next batch: what is left over, or the next piece sent (waiting for one), then whatever
    /// else was sent meanwhile, up to `limit` entries and `limit_bytes` bytes (at least one
    /// entry, whatever it weighs); the rest is kept for the batch after. `None` when the router
    /// is gone and nothing is left. Cancel-safe: nothing is taken out of the queue across an
    /// await.
    async fn next(&mut self, limit: usize, limit_bytes: usize) -> Option<Vec<Entry>> {
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
    fn done(&self, entries: usize, bytes: usize) {
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

/// One of `WRITE_CONCURRENCY` writers, storing the entries of its share of the users. The
/// writers' transactions run side by side, so one batch's commit (a WAL flush) overlaps the
/// others' statements. Order across batches does not matter: rows are keyed by uuid and profile
/// merges do not depend on arrival order.
async fn write_loop(ctx: Arc<Context>, mut queue: Queue, hard_stop: CancellationToken) {
    let batch_bytes = batch_bytes(&ctx.config);
    loop {
        let batch = tokio::select! {
            batch = queue.next(ctx.config.batch_size, batch_bytes) => batch,
            _ = hard_stop.cancelled() => None,
        };
        let Some(batch) = batch else { return };
        let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
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
    let ruleset = ctx.enricher.describer();
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
/// Returns which entries were dropped, and how many old dead letters `DLQ_MAXLEN` trimmed. Entries with a readable user are written under the
/// erasure locks of their users ([`erasure::guarded`]), so an erasure that scans the
/// dead-letter stream either finds them or is seen here.
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

    /// An entry of `bytes` bytes ([`Entry::bytes`]) for user `user`.
    fn weighing(i: usize, user: &str, bytes: usize) -> Entry {
        let mut entry = of_user(i, user);
        let pad = bytes
            .checked_sub(entry.bytes() + "pad".len())
            .expect("room for the envelope");
        entry.fields.push(("pad".to_string(), vec![b'x'; pad]));
        assert_eq!(entry.bytes(), bytes);
        entry
    }

    /// A budget of `entries` entries and `bytes` bytes for events of up to `event` bytes.
    fn budget(entries: usize, bytes: usize, event: usize) -> (ReadAhead, WorkerMetrics) {
        let metrics = WorkerMetrics::new();
        (ReadAhead::new(entries, bytes, event, &metrics), metrics)
    }

    /// A read asking for more entries than any budget below holds.
    const ANY: usize = 1_000_000;

    /// The room a feeder gets at once.
    async fn room_now(budget: &ReadAhead, at_most: usize) -> Room<'_> {
        tokio::time::timeout(Duration::from_secs(5), budget.room(at_most))
            .await
            .expect("room at once")
            .expect("budget open")
    }

    /// Whether a feeder asking for room still waits once the other tasks have had their turn.
    async fn waits<F: Future>(asking: &mut std::pin::Pin<&mut F>) -> bool {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        std::future::poll_fn(|cx| std::task::Poll::Ready(asking.as_mut().poll(cx).is_pending()))
            .await
    }

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

    #[test]
    fn reads_start_at_one_entry_and_double_up_to_the_batch_size_and_again_after_a_large_one() {
        let mut size = ReadSize::new(10, 1_000);
        let small = [of_user(0, "a")];
        let mut asked = vec![size.next()];
        for _ in 0..5 {
            size.read(&small);
            asked.push(size.next());
        }
        assert_eq!(asked, [1, 2, 4, 8, 10, 10]);
        let largest = 1_000 + ENTRY_OVERHEAD_BYTES;
        size.read(&[of_user(1, "a"), weighing(2, "a", largest + 1)]);
        assert_eq!(
            size.next(),
            1,
            "a larger entry than expected: one at a time"
        );
        size.read(&[weighing(3, "a", largest)]);
        assert_eq!(
            size.next(),
            2,
            "one of the largest size expected is no surprise"
        );
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
