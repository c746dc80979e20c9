//! Prometheus helpers both binaries use, and the queue gauges (stream length, consumer-group lag
//! and pending count, DLQ length) that both report.

use std::{collections::HashMap, time::Duration};

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use redis::Value;

use crate::redis::{RedisConn, query_all, query_each};

use crate::redis::{info_int, info_string, key_values};
use crate::shards::StreamShards;

/// The application prefix of every series this system exports (`clickstream_http_requests_total`,
/// `clickstream_stream_length`, …); the process collector's `process_*` series keep their
/// conventional names.
pub const PREFIX: &str = "clickstream_";

/// A registry for one api or worker replica, with the process collector (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, `process_start_time_seconds`, … read
/// from /proc at each scrape; Linux only). Register the application's own metrics with names
/// that start with [`PREFIX`].
pub fn registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("the process collector registers once per registry");
    registry
}

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
    for desc in metric.desc() {
        debug_assert!(
            desc.fq_name.starts_with(PREFIX),
            "{} lacks the {PREFIX} prefix",
            desc.fq_name
        );
    }
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
    /// [`crate::redis_settings`]), 0 when it is safe; absent when it could not be checked.
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
                "clickstream_stream_length",
                "Entries in the event stream (XLEN summed over its shards, retired ones still holding entries included), acknowledged ones included until deleted",
            ),
            group_lag: group_gauge(
                "clickstream_consumer_group_lag",
                "Entries of the stream (all shards) not yet delivered to the consumer group",
            ),
            group_pending: group_gauge(
                "clickstream_consumer_group_pending",
                "Entries (all shards) delivered to the consumer group and not yet acknowledged",
            ),
            dlq_length: gauge(
                "clickstream_dlq_length",
                "Entries in the dead-letter stream",
            ),
            scrape_errors: counter(
                registry,
                "clickstream_queue_scrape_errors_total",
                "Scrapes that could not read the queue state from Redis",
            ),
            redis_config_unsafe: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "clickstream_redis_config_unsafe",
                        "1 when a Redis setting lets stream data be lost (maxmemory-policy other \
                         than noeviction; persistence off in production), read at start",
                    ),
                    &["setting"],
                )
                .expect("valid gauge"),
            ),
        }
    }

    /// Reads XLEN of the DLQ and of every shard of the event stream (the shards in use, and the
    /// retired ones still holding entries after a change of `STREAM_SHARDS`), and their XINFO
    /// GROUPS: the stream gauges are sums over those shards. On failure the gauges keep their
    /// last values and `clickstream_queue_scrape_errors_total` grows.
    pub async fn refresh(&self, conn: &RedisConn, shards: &StreamShards, dlq: &str) {
        let read = async {
            let xlen = |key: &str| redis::cmd("XLEN").arg(key).clone();
            let mut lens: Vec<i64> = query_all(
                conn,
                std::iter::once(xlen(dlq))
                    .chain(shards.keys().iter().map(|key| xlen(key)))
                    .collect(),
            )
            .await?;
            let retired = crate::shards::retired_lengths(conn, shards).await?;
            lens.extend(retired.iter().map(|&(_, len)| len as i64));
            let xinfo = shards
                .keys()
                .iter()
                .map(String::as_str)
                .chain(retired.iter().map(|&(shard, _)| shards.key(shard)))
                .map(|key| redis::cmd("XINFO").arg("GROUPS").arg(key).clone())
                .collect();
            // A shard not created yet has no groups.
            let groups: Vec<Value> = query_each(conn, xinfo)
                .await?
                .into_iter()
                .map(|r| r.unwrap_or(Value::Array(Vec::new())))
                .collect();
            Ok::<_, redis::RedisError>((lens, groups))
        };
        match tokio::time::timeout(QUEUE_SCRAPE_TIMEOUT, read).await {
            Ok(Ok((lens, groups))) => {
                self.dlq_length.set(lens[0]);
                self.stream_length.set(lens[1..].iter().sum());
                let mut pending: HashMap<String, i64> = HashMap::new();
                let mut lag: HashMap<String, i64> = HashMap::new();
                for shard in groups {
                    let Value::Array(shard) = shard else { continue };
                    for group in shard {
                        let info = key_values(group);
                        let Some(name) = info_string(&info, "name") else {
                            continue;
                        };
                        if let Some(n) = info_int(&info, "pending") {
                            *pending.entry(name.clone()).or_default() += n;
                        }
                        // `lag` is nil when Redis cannot tell (after XDEL of undelivered entries).
                        if let Some(n) = info_int(&info, "lag") {
                            *lag.entry(name).or_default() += n;
                        }
                    }
                }
                for (name, n) in pending {
                    self.group_pending.with_label_values(&[&name]).set(n);
                }
                for (name, n) in lag {
                    self.group_lag.with_label_values(&[&name]).set(n);
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
