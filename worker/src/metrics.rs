//! Prometheus metrics of a worker replica, and the queue gauges (stream length, consumer-group
//! lag and pending count, DLQ length) that both binaries report.
//!
//! Each [`WorkerMetrics`] owns its registry, so replicas running in one process (tests, the api's
//! in-process worker) never share counters.

use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use redis::{Value, aio::ConnectionManager};

use crate::stream::{info_int, info_string, key_values};

/// The Prometheus text exposition of `registry`, and its content type.
pub fn render(registry: &Registry) -> (String, &'static str) {
    let encoder = TextEncoder::new();
    let mut out = Vec::with_capacity(8 * 1024);
    // Encoding into a Vec fails only for invalid metric names, which are fixed at compile time.
    let _ = encoder.encode(&registry.gather(), &mut out);
    (
        String::from_utf8(out).unwrap_or_default(),
        "text/plain; version=0.0.4; charset=utf-8",
    )
}

/// Latency buckets from 0.1 ms to 10 s.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ]
}

/// Registers `metric` and hands it back (names and labels are fixed, so registration cannot fail
/// except on a duplicate, which is a programming error caught by every test).
pub fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered twice");
    metric
}

/// A histogram of seconds named `name`.
pub fn seconds_histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))
            .expect("valid histogram"),
    )
}

/// A counter named `name`.
pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).expect("valid counter"),
    )
}

/// A counter named `name` with `labels`.
pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
    )
}

/// The state of the queue, read from Redis when metrics are scraped.
#[derive(Clone)]
pub struct QueueGauges {
    stream_length: IntGauge,
    group_lag: IntGaugeVec,
    group_pending: IntGaugeVec,
    dlq_length: IntGauge,
    scrape_errors: IntCounter,
    /// 1 for each Redis setting under which stream data can be lost (checked once at start; see
    /// [`crate::redis_config`]), 0 when it is safe; absent when it could not be checked.
    pub redis_config_unsafe: IntGaugeVec,
}

/// Longest a scrape waits for Redis.
const QUEUE_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

impl QueueGauges {
    pub fn new(registry: &Registry) -> Self {
        let gauge = |name: &str, help: &str| {
            register(registry, IntGauge::new(name, help).expect("valid gauge"))
        };
        let group_gauge = |name: &str, help: &str| {
            register(
                registry,
                IntGaugeVec::new(Opts::new(name, help), &["group"]).expect("valid gauge"),
            )
        };
        QueueGauges {
            stream_length: gauge(
                "stream_length",
                "Entries in the event stream (XLEN), acknowledged ones included until deleted",
            ),
            group_lag: group_gauge(
                "consumer_group_lag",
                "Entries of the stream not yet delivered to the consumer group",
            ),
            group_pending: group_gauge(
                "consumer_group_pending",
                "Entries delivered to the consumer group and not yet acknowledged",
            ),
            dlq_length: gauge("dlq_length", "Entries in the dead-letter stream"),
            scrape_errors: counter(
                registry,
                "queue_scrape_errors_total",
                "Scrapes that could not read the queue state from Redis",
            ),
            redis_config_unsafe: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "redis_config_unsafe",
                        "1 when a Redis setting lets stream data be lost (maxmemory-policy other \
                         than noeviction; persistence off in production), read at start",
                    ),
                    &["setting"],
                )
                .expect("valid gauge"),
            ),
        }
    }

    /// Reads XLEN of both streams and XINFO GROUPS of the event stream. On failure the gauges keep
    /// their last values and `queue_scrape_errors_total` grows.
    pub async fn refresh(&self, conn: &ConnectionManager, stream: &str, dlq: &str) {
        let read = async {
            let mut pipe = redis::pipe();
            pipe.cmd("XLEN").arg(stream);
            pipe.cmd("XLEN").arg(dlq);
            let (len, dlq_len): (i64, i64) = pipe.query_async(&mut conn.clone()).await?;
            let groups: Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query_async(&mut conn.clone())
                .await
                .unwrap_or(Value::Array(Vec::new()));
            Ok::<_, redis::RedisError>((len, dlq_len, groups))
        };
        match tokio::time::timeout(QUEUE_SCRAPE_TIMEOUT, read).await {
            Ok(Ok((len, dlq_len, groups))) => {
                self.stream_length.set(len);
                self.dlq_length.set(dlq_len);
                let Value::Array(groups) = groups else { return };
                for group in groups {
                    let info = key_values(group);
                    let Some(name) = info_string(&info, "name") else {
                        continue;
                    };
                    if let Some(pending) = info_int(&info, "pending") {
                        self.group_pending.with_label_values(&[&name]).set(pending);
                    }
                    // `lag` is nil when Redis cannot tell (after XDEL of undelivered entries).
                    if let Some(lag) = info_int(&info, "lag") {
                        self.group_lag.with_label_values(&[&name]).set(lag);
                    }
                }
            }
            Ok(Err(error)) => {
                self.scrape_errors.inc();
                tracing::debug!(%error, "reading the queue state for metrics failed");
            }
            Err(_) => {
                self.scrape_errors.inc();
                tracing::debug!("reading the queue state for metrics timed out");
            }
        }
    }
}

/// What a worker replica counts.
#[derive(Clone)]
pub struct WorkerMetrics {
    pub registry: Registry,
    /// Entries per batch handed to a writer.
    pub batch_size: Histogram,
    /// Duration of one batch transaction (including retries of failed attempts).
    pub db_write_seconds: Histogram,
    /// Events stored (rows the insert created).
    pub events_stored: IntCounter,
    /// Events already stored (redeliveries after a commit).
    pub events_duplicate: IntCounter,
    /// Events (and dead letters) dropped because their user was erased after they were received.
    pub events_erased: IntCounter,
    /// Entries sent to the dead-letter stream, by reason.
    pub dead_lettered: IntCounterVec,
    /// Dead letters removed from the dead-letter stream to keep it within `DLQ_MAXLEN`.
    pub dead_letters_trimmed: IntCounter,
    /// Bytes of the entries this replica holds: read (or claimed) and not yet finished.
    pub read_ahead_bytes: IntGauge,
    /// The most bytes this replica has held at once since it started.
    pub read_ahead_peak_bytes: IntGauge,
    /// Entries read again: this consumer's pending entries after a restart, or claimed ones.
    pub redeliveries: IntCounter,
    /// Entries taken over from other consumers with XAUTOCLAIM.
    pub claimed: IntCounter,
    /// Events described by each rule.
    pub rules_matched: IntCounterVec,
    /// Events no rule described (they get a fallback sentence).
    pub rules_unmatched: IntCounter,
    /// Unmatched events left out of the shared report: this replica already held the most shapes
    /// it keeps between flushes.
    pub rules_unmatched_unreported: IntCounter,
    /// Rule reloads by result (`ok`, `failed`).
    pub rules_reloads: IntCounterVec,
    /// 1 for the ruleset version in force.
    pub rules_version: IntGaugeVec,
    pub queue: QueueGauges,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        WorkerMetrics {
            batch_size: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("worker_batch_size", "Entries per batch a writer stores")
                        .buckets(vec![
                            1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
                        ]),
                )
                .expect("valid histogram"),
            ),
            db_write_seconds: seconds_histogram(
                r,
                "worker_db_write_seconds",
                "Time to store one batch in Postgres, retries included",
            ),
            events_stored: counter(
                r,
                "worker_events_stored_total",
                "Events stored (rows the insert created)",
            ),
            events_duplicate: counter(
                r,
                "worker_events_duplicate_total",
                "Events delivered again after they were stored (skipped, not counted twice)",
            ),
            events_erased: counter(
                r,
                "worker_events_erased_total",
                "Events dropped because their user was erased after they were received",
            ),
            dead_lettered: counter_vec(
                r,
                "worker_dead_lettered_total",
                "Entries sent to the dead-letter stream, by reason",
                &["reason"],
            ),
            dead_letters_trimmed: counter(
                r,
                "worker_dead_letters_trimmed_total",
                "Oldest dead letters removed to keep the dead-letter stream within DLQ_MAXLEN",
            ),
            read_ahead_bytes: register(
                r,
                IntGauge::new(
                    "worker_read_ahead_bytes",
                    "Bytes of the entries read or claimed and not yet finished (bounded by READ_AHEAD_BYTES)",
                )
                .expect("valid gauge"),
            ),
            read_ahead_peak_bytes: register(
                r,
                IntGauge::new(
                    "worker_read_ahead_peak_bytes",
                    "The most bytes of entries held at once since the worker started",
                )
                .expect("valid gauge"),
            ),
            redeliveries: counter(
                r,
                "worker_redeliveries_total",
                "Entries delivered more than once (re-read after a restart or claimed)",
            ),
            claimed: counter(
                r,
                "worker_claimed_total",
                "Entries taken over from other consumers (XAUTOCLAIM)",
            ),
            rules_matched: counter_vec(
                r,
                "rules_matched_total",
                "Events described by each rule",
                &["rule"],
            ),
            rules_unmatched: counter(
                r,
                "rules_unmatched_total",
                "Events no rule described (fallback sentence)",
            ),
            rules_unmatched_unreported: counter(
                r,
                "rules_unmatched_unreported_total",
                "Unmatched events left out of the shared report (too many shapes held between flushes)",
            ),
            rules_reloads: counter_vec(
                r,
                "rules_reloads_total",
                "Rule reloads by result",
                &["result"],
            ),
            rules_version: register(
                r,
                IntGaugeVec::new(
                    Opts::new("rules_version_info", "1 for the ruleset version in force"),
                    &["version"],
                )
                .expect("valid gauge"),
            ),
            queue: QueueGauges::new(r),
            registry,
        }
    }

    /// Records the ruleset version in force (the previous one drops to 0).
    pub fn set_rules_version(&self, version: &str) {
        self.rules_version.reset();
        self.rules_version.with_label_values(&[version]).set(1);
    }
}
