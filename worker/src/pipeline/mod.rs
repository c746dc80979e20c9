//! The consumer: reader, claimer and writer tasks of one worker replica, started and stopped here.
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
//! `READ_AHEAD_BYTES` bytes are being read, queued or stored (see [`budget`]). On shutdown
//! the reader and claimer stop, the writers store what was read, and anything still
//! unacknowledged at `SHUTDOWN_TIMEOUT` stays pending for other replicas.
//!
//! With `STREAM_SHARDS` > 1 a replica reads only the shards whose lease it holds ([`owner`]), one
//! reader and claimer each, and lets go of them after its writers are done on shutdown. Shards
//! of another `STREAM_SHARDS` (retired) that still hold entries are read the same way, whatever
//! the count, until they are empty.
//!
//! [`read`]: the reader, claimer and keep-alive; [`held`]: the entries in flight; [`route`]:
//! entries to writers' queues; [`sort`]: decoding, enriching, sorting out poison; [`write`]: the
//! writers; [`retry`]: the backoff every retried step waits out.

mod budget;
#[cfg(test)]
mod fixtures;
mod held;
mod owner;
mod read;
mod retry;
mod route;
mod sort;
mod write;

use std::{sync::Arc, time::Duration};

use sea_orm::DatabaseConnection;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use rules_engine::enrich::Enricher;

use crate::{WorkerError, config::Config, metrics::WorkerMetrics, store, stream::Streams};
use budget::ReadAhead;
use held::Held;
use retry::Backoff;
use route::Router;

/// Longest one batch transaction (or one start-up step) may take before it counts as failed
/// (and is retried).
const STORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest a worker waits at start for its Postgres connections to open before it reads.
const WARM_UP_LIMIT: Duration = Duration::from_secs(2);

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
        shards = config.stream_shards,
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
    // Stored events described again when the rules change (rules from files only).
    let reenrich = match (ctx.config.reenrich_on_reload, ctx.enricher.rules()) {
        (true, Some(rules)) => Some(tokio::spawn(crate::history::reenrich::run(
            ctx.db.get_postgres_connection_pool().clone(),
            rules,
            ctx.config.reenrich_batch_size,
            ctx.config.reenrich_pause,
            ctx.metrics.clone(),
            shutdown.clone(),
        ))),
        _ => None,
    };
    let budget = ReadAhead::new(
        2 * ctx.config.write_concurrency * ctx.config.batch_size,
        ctx.config.read_ahead_bytes,
        ctx.config.max_event_bytes,
        &ctx.metrics,
    );
    let (router, queues) = Router::new(ctx.config.write_concurrency, budget);
    let hard_stop = CancellationToken::new();

    let mut feeders = JoinSet::new();
    // Each shard's claimer starts once this consumer's own pending entries there have been
    // re-read: a claim can make them this consumer's, and reading them then counted a delivery
    // of its own.
    // With one shard every replica reads it (the group shares it out); with several, each
    // shard is read by the one replica holding its lease, which lets go of it after shutdown,
    // once the writers are done (`release`).
    // Shards of another `STREAM_SHARDS` are read the same way, by lease, until they are empty.
    let release = CancellationToken::new();
    if ctx.streams.shards.count() == 1 {
        feeders.spawn(read::feed_shard(
            ctx.clone(),
            router.clone(),
            0,
            shutdown.clone(),
        ));
    }
    // Aborted with this task (a replica's tasks end with it, as a process's would).
    let owner = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(owner::own_shards(
        ctx.clone(),
        router,
        shutdown.clone(),
        release.clone(),
    )));
    let keep_alive = tokio::spawn(read::keep_alive_loop(ctx.clone(), hard_stop.clone()));
    let mut writers = JoinSet::new();
    for queue in queues {
        writers.spawn(write::write_loop(ctx.clone(), queue, hard_stop.clone()));
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
        if let Some(reenrich) = &reenrich {
            reenrich.abort();
        }
        release.cancel();
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
    release.cancel();
    let _ = owner.await;
    let _ = keep_alive.await;
    if let Some(reenrich) = reenrich {
        let _ = reenrich.await;
    }
    ctx.db.close_by_ref().await.ok();
    tracing::info!("worker stopped");
    Ok(())
}

/// Retries a start-up step with backoff until it succeeds; `None` if shutdown came first.
async fn retry_until<T, E, F, Fut>(what: &str, shutdown: &CancellationToken, mut op: F) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let attempt = || {
        let step = tokio::time::timeout(STORE_TIMEOUT, op());
        async move {
            match step.await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {STORE_TIMEOUT:?}")),
            }
        }
    };
    let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    retry::retry_logged(what, backoff, shutdown, attempt).await
}
