//! Appends accepted events to the Redis Stream, and watches its backlog.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use entity::envelope::{ENVELOPE_VERSION, FIELD_EVENT, FIELD_TRACEPARENT, FIELD_VERSION};
use infra::{
    redis::{RedisClient, RedisConn},
    telemetry,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use infra::shards::StreamShards;

use super::parse::Queued;
use crate::http::error::ApiError;

/// How often the backlog (stream length) is sampled for back-pressure.
const BACKLOG_POLL: Duration = Duration::from_millis(100);
/// How often the retired shards (of another `STREAM_SHARDS`, up to 1,024 keys) are looked at:
/// they only shrink, but for apis still running the old count during a change.
const RETIRED_POLL: Duration = Duration::from_secs(5);
/// `Retry-After` seconds when Redis is unreachable or slow.
const RETRY_AFTER_UNAVAILABLE: u32 = 2;
/// `Retry-After` seconds when the backlog is over its bound.
const RETRY_AFTER_BACKLOG: u32 = 5;
/// Backlog value meaning "not sampled yet".
const UNKNOWN: u64 = u64::MAX;

/// Longest stream that is scanned to count one user's waiting events.
const PENDING_SCAN_LIMIT: u64 = 2_000;
/// The read path never waits longer than this on Redis for its freshness figures.
const FRESHNESS_TIMEOUT: Duration = Duration::from_millis(250);

/// Events waiting in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// Entries of all users.
    pub backlog: u64,
    /// Entries of one user; `None` when the stream is too long to scan quickly, or while shards
    /// of another `STREAM_SHARDS` still hold entries (the user's may be among them).
    pub for_user: Option<u64>,
}

/// Why events could not be appended.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("stream backlog is {backlog} entries, over the bound of {max}")]
    Backlog { backlog: u64, max: u64 },
    /// On a cluster: the events of some shards were queued, those of others were not.
    #[error("{failed} of {shards} shards' appends failed while others were queued: {error}")]
    Partial {
        failed: usize,
        shards: usize,
        error: Box<PublishError>,
    },
}

impl From<PublishError> for ApiError {
    fn from(err: PublishError) -> Self {
        match err {
            PublishError::Backlog { .. } => ApiError::unavailable(
                "backlog_full",
                format!(
                    "{err}: workers are behind, retry later (nothing of this request was queued)"
                ),
                RETRY_AFTER_BACKLOG,
            ),
            PublishError::Partial { .. } => {
                tracing::warn!(error = %err, "part of a request's events queued");
                ApiError::unavailable(
                    "queue_partially_written",
                    "event queue (Redis Cluster) took this request's events only in part: retry \
                     it whole (events with the same uuid are stored once)",
                    RETRY_AFTER_UNAVAILABLE,
                )
            }
            other => {
                tracing::warn!(error = %other, "event queue unavailable");
                ApiError::unavailable(
                    "queue_unavailable",
                    "event queue (Redis) is unavailable: retry later (nothing of this request was queued)",
                    RETRY_AFTER_UNAVAILABLE,
                )
            }
        }
    }
}

/// The commands that append `events` to their shards of `shards`: one XADD each, inside
/// MULTI/EXEC when there are several so that a request is queued whole or not at all (one Redis
/// runs a transaction over several keys; see [`Publisher::publish`] for a cluster).
pub fn xadd_pipeline(
    shards: &StreamShards,
    events: &[Queued],
    traceparent: Option<&str>,
) -> redis::Pipeline {
    xadd_pipeline_of(shards, events.iter(), traceparent)
}

/// [`xadd_pipeline`] of some of a request's events.
fn xadd_pipeline_of<'a>(
    shards: &StreamShards,
    events: impl ExactSizeIterator<Item = &'a Queued>,
    traceparent: Option<&str>,
) -> redis::Pipeline {
    let mut pipe = redis::Pipeline::with_capacity(events.len());
    if events.len() > 1 {
        pipe.atomic();
    }
    let fixed = [
        "XADD",
        "",
        "*",
        FIELD_VERSION,
        ENVELOPE_VERSION,
        FIELD_EVENT,
    ];
    let fixed_len: usize = fixed.iter().map(|a| a.len()).sum();
    let trace = traceparent.map(|t| [FIELD_TRACEPARENT, t]);
    let trace_len: usize = trace.iter().flatten().map(|a| a.len()).sum();
    for event in events {
        let stream = shards.key(shards.shard_of_hash(event.user_hash));
        // Sized once, not grown arg by arg: packing is on every request's path.
        let mut cmd =
            redis::Cmd::with_capacity(9, fixed_len + stream.len() + event.json.len() + trace_len);
        cmd.arg("XADD")
            .arg(stream)
            .arg(&fixed[2..])
            .arg(&event.json);
        if let Some(trace) = &trace {
            cmd.arg(&trace[..]);
        }
        pipe.add_command(cmd);
    }
    pipe
}

/// Writes envelopes to the shards of `QUEUE_NAME`.
#[derive(Clone)]
pub struct Publisher {
    conn: RedisConn,
    shards: StreamShards,
    timeout: Duration,
    max_backlog: u64,
    /// Every shard's length, the retired ones' included (the monitor's last samples, raised by
    /// this process's own appends since).
    backlog: Arc<AtomicU64>,
    /// The retired shards' lengths summed, at the monitor's last look (0 until then).
    retired: Arc<AtomicU64>,
    xadd_seconds: Option<prometheus::Histogram>,
}

impl Publisher {
    /// Connects lazily: the api starts (and answers 503 on ingest) while Redis is down.
    pub fn new(
        client: &RedisClient,
        shards: StreamShards,
        timeout: Duration,
        max_backlog: u64,
    ) -> Result<Self, PublishError> {
        let conn = client.connection_with(timeout, timeout, 1, Duration::from_millis(500))?;
        Ok(Self {
            conn,
            shards,
            timeout,
            max_backlog,
            backlog: Arc::new(AtomicU64::new(UNKNOWN)),
            retired: Arc::new(AtomicU64::new(0)),
            xadd_seconds: None,
        })
    }

    /// Records each request's XADD round trip in `histogram`.
    pub fn with_latency_histogram(mut self, histogram: prometheus::Histogram) -> Self {
        self.xadd_seconds = Some(histogram);
        self
    }

    /// The shared connection (other commands on the same Redis).
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// The stream's shards events go to.
    pub fn shards(&self) -> &StreamShards {
        &self.shards
    }

    /// Appends a request's events in one round trip (MULTI/EXEC when there are several, so a
    /// request is queued whole or not at all).
    ///
    /// On a Redis Cluster a transaction cannot span shards (hash slots): one MULTI/EXEC per shard,
    /// all sent at once. If some shards' fail after others' were queued, [`PublishError::Partial`]
    /// (a 503: the client retries the whole request; storage deduplicates by uuid).
    ///
    /// While spans are exported, the append has its own span and every entry carries that span's
    /// `traceparent`, so the worker continues the trace.
    pub async fn publish(&self, events: &[Queued]) -> Result<(), PublishError> {
        let backlog = self.backlog.load(Ordering::Relaxed);
        if backlog != UNKNOWN && backlog > self.max_backlog {
            return Err(PublishError::Backlog {
                backlog,
                max: self.max_backlog,
            });
        }
        let span = if telemetry::is_exporting() {
            tracing::info_span!(
                "redis.xadd",
                otel.kind = "producer",
                stream = %self.shards.queue_name(),
                entries = events.len()
            )
        } else {
            tracing::Span::none()
        };
        let traceparent = telemetry::traceparent(&span);
        let started = std::time::Instant::now();
        if self.conn.is_cluster() {
            self.publish_per_shard(events, traceparent.as_deref())
                .instrument(span)
                .await?;
        } else {
            let pipe = xadd_pipeline(&self.shards, events, traceparent.as_deref());
            let mut conn = self.conn.clone();
            // The entry ids are not needed: `()` skips turning each into a `String`.
            let () = tokio::time::timeout(self.timeout, pipe.query_async(&mut conn))
                .instrument(span)
                .await
                .map_err(|_| PublishError::Timeout(self.timeout))??;
        }
        if let Some(histogram) = &self.xadd_seconds {
            histogram.observe(started.elapsed().as_secs_f64());
        }
        // Count our own appends until the next sample, so reads right after see them.
        let _ = self
            .backlog
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b != UNKNOWN).then(|| b.saturating_add(events.len() as u64))
            });
        Ok(())
    }

    /// A cluster's appends: one MULTI/EXEC per shard the events go to, all sent at once, each
    /// within the timeout (so that which shards were queued is known).
    async fn publish_per_shard(
        &self,
        events: &[Queued],
        traceparent: Option<&str>,
    ) -> Result<(), PublishError> {
        let mut by_shard: std::collections::BTreeMap<usize, Vec<&Queued>> = Default::default();
        for event in events {
            by_shard
                .entry(self.shards.shard_of_hash(event.user_hash))
                .or_default()
                .push(event);
        }
        let appends = by_shard.values().map(|events| {
            let pipe = xadd_pipeline_of(&self.shards, events.iter().copied(), traceparent);
            let mut conn = self.conn.clone();
            async move {
                tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn))
                    .await
                    .map_err(|_| PublishError::Timeout(self.timeout))?
                    .map_err(PublishError::from)
            }
        });
        let results = futures_util::future::join_all(appends).await;
        let shards = results.len();
        let mut errors = results.into_iter().filter_map(Result::err);
        let Some(error) = errors.next() else {
            return Ok(());
        };
        let failed = 1 + errors.count();
        if failed == shards {
            // Nothing was queued: the same answer as on one Redis.
            return Err(error);
        }
        Err(PublishError::Partial {
            failed,
            shards,
            error: Box::new(error),
        })
    }

    /// Length of the stream (every shard in use summed), straight from Redis.
    pub async fn stream_len(&self) -> Result<u64, PublishError> {
        let lens = tokio::time::timeout(
            self.timeout,
            infra::shards::lengths(&self.conn, &self.shards),
        )
        .await
        .map_err(|_| PublishError::Timeout(self.timeout))??;
        Ok(lens.iter().sum())
    }

    /// How many events are still waiting in the stream, in all and for `users` (a person's ids;
    /// the worker deletes entries once stored, so the stream holds only what is not stored yet).
    /// Only the users' shards are scanned.
    pub async fn pending_for_users(&self, users: &[&str]) -> Result<Pending, PublishError> {
        #[derive(serde::Deserialize)]
        struct Who<'a> {
            #[serde(borrow)]
            distinct_id: std::borrow::Cow<'a, str>,
        }
        // The backlog monitor's last sample (at most [`BACKLOG_POLL`] old, and raised by this
        // process's own appends) saying "empty" answers without a round trip.
        if self.backlog.load(Ordering::Relaxed) == 0 {
            return Ok(Pending {
                backlog: 0,
                for_user: Some(0),
            });
        }
        let mut conn = self.conn.clone();
        let mut shards: Vec<usize> = users.iter().map(|u| self.shards.shard_of(u)).collect();
        shards.sort_unstable();
        shards.dedup();
        let retired = self.retired.load(Ordering::Relaxed);
        let work = async {
            let lens = infra::shards::lengths(&self.conn, &self.shards).await?;
            let backlog = lens.iter().sum::<u64>() + retired;
            if retired > 0 {
                // Which retired shard held a user's events depends on the count of then.
                return Ok(Pending {
                    backlog,
                    for_user: None,
                });
            }
            let waiting: u64 = shards.iter().map(|&s| lens[s]).sum();
            if waiting == 0 || shards.iter().any(|&s| lens[s] > PENDING_SCAN_LIMIT) {
                return Ok(Pending {
                    backlog,
                    for_user: (waiting == 0).then_some(0),
                });
            }
            let mut for_user = 0;
            for &shard in shards.iter().filter(|&&s| lens[s] > 0) {
                let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                    .arg(self.shards.key(shard))
                    .arg("-")
                    .arg("+")
                    .arg("COUNT")
                    .arg(PENDING_SCAN_LIMIT)
                    .query_async(&mut conn)
                    .await?;
                for_user += reply
                    .ids
                    .iter()
                    .filter(|entry| match entry.map.get(FIELD_EVENT) {
                        Some(redis::Value::BulkString(json)) => serde_json::from_slice::<Who>(json)
                            .is_ok_and(|w| users.contains(&w.distinct_id.as_ref())),
                        _ => false,
                    })
                    .count() as u64;
            }
            Ok::<_, redis::RedisError>(Pending {
                backlog,
                for_user: Some(for_user),
            })
        };
        let timeout = self.timeout.min(FRESHNESS_TIMEOUT);
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| PublishError::Timeout(timeout))?
            .map_err(Into::into)
    }

    /// Samples the stream length every [`BACKLOG_POLL`] (the retired shards' every
    /// [`RETIRED_POLL`]) until `cancel` fires. Ingest compares the last sample with
    /// `STREAM_MAX_BACKLOG`: one read per tick instead of one per request.
    pub fn spawn_backlog_monitor(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(BACKLOG_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut retired_looked_at: Option<std::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let len = match this.stream_len().await {
                    Ok(len) => len,
                    Err(e) => {
                        tracing::debug!(error = %e, "backlog sample failed");
                        continue;
                    }
                };
                // Only while Redis answers: a thousand commands sent to a Redis (a cluster's
                // nodes) that does not would only queue up behind its reconnection.
                if retired_looked_at.is_none_or(|at| at.elapsed() >= RETIRED_POLL) {
                    retired_looked_at = Some(std::time::Instant::now());
                    let look = infra::shards::retired_lengths(&this.conn, &this.shards);
                    match tokio::time::timeout(this.timeout, look).await {
                        Ok(Ok(lens)) => {
                            let len = lens.iter().map(|(_, len)| len).sum();
                            this.retired.store(len, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "retired shards' sample failed"),
                        Err(_) => tracing::debug!("retired shards' sample timed out"),
                    }
                }
                let retired = this.retired.load(Ordering::Relaxed);
                this.backlog.store(len + retired, Ordering::Relaxed);
            }
        })
    }
}
