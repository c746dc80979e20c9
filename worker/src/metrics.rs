//! Prometheus metrics of a worker replica. Each [`WorkerMetrics`] owns its registry, so replicas
//! running in one process (tests, the api's in-process worker) never share counters.

use infra::metrics::{QueueGauges, counter, counter_vec, register, seconds_histogram};
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

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
    /// Identity calls (`$identify`, `$create_alias`, `$merge_dangerously`) stored, by result:
    /// `merged`, or refused by PostHog's guards (`already_identified`, `illegal_id`, `erased`).
    pub person_merges: IntCounterVec,
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
    /// Stream shards whose lease this replica holds (`STREAM_SHARDS` > 1).
    pub owned_shards: IntGauge,
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
    /// Stored events of other rule set versions described again with the live one.
    pub reenriched: IntCounter,
    /// Of those, events whose sentence, rule or intents changed.
    pub reenrich_changed: IntCounter,
    /// 1 while this replica works on a re-enrichment pass.
    pub reenrich_active: IntGauge,
    pub queue: QueueGauges,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let registry = infra::metrics::registry();
        let r = &registry;
        WorkerMetrics {
            batch_size: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("clickstream_worker_batch_size", "Entries per batch a writer stores")
                        .buckets(vec![
                            1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
                        ]),
                )
                .expect("valid histogram"),
            ),
            db_write_seconds: seconds_histogram(
                r,
                "clickstream_worker_db_write_seconds",
                "Time to store one batch in Postgres, retries included",
            ),
            events_stored: counter(
                r,
                "clickstream_worker_events_stored_total",
                "Events stored (rows the insert created)",
            ),
            events_duplicate: counter(
                r,
                "clickstream_worker_events_duplicate_total",
                "Events delivered again after they were stored (skipped, not counted twice)",
            ),
            events_erased: counter(
                r,
                "clickstream_worker_events_erased_total",
                "Events dropped because their user was erased after they were received",
            ),
            dead_lettered: counter_vec(
                r,
                "clickstream_worker_dead_lettered_total",
                "Entries sent to the dead-letter stream, by reason",
                &["reason"],
            ),
            person_merges: counter_vec(
                r,
                "clickstream_worker_person_merges_total",
                "Identity calls stored, by result (merged, or why not)",
                &["result"],
            ),
            dead_letters_trimmed: counter(
                r,
                "clickstream_worker_dead_letters_trimmed_total",
                "Oldest dead letters removed to keep the dead-letter stream within DLQ_MAXLEN",
            ),
            read_ahead_bytes: register(
                r,
                IntGauge::new(
                    "clickstream_worker_read_ahead_bytes",
                    "Bytes of the entries read or claimed and not yet finished (bounded by READ_AHEAD_BYTES)",
                )
                .expect("valid gauge"),
            ),
            read_ahead_peak_bytes: register(
                r,
                IntGauge::new(
                    "clickstream_worker_read_ahead_peak_bytes",
                    "The most bytes of entries held at once since the worker started",
                )
                .expect("valid gauge"),
            ),
            redeliveries: counter(
                r,
                "clickstream_worker_redeliveries_total",
                "Entries delivered more than once (re-read after a restart or claimed)",
            ),
            owned_shards: register(
                r,
                IntGauge::new(
                    "clickstream_worker_owned_shards",
                    "Stream shards this replica holds the lease of and reads (STREAM_SHARDS > 1)",
                )
                .expect("valid gauge"),
            ),
            claimed: counter(
                r,
                "clickstream_worker_claimed_total",
                "Entries taken over from other consumers (XAUTOCLAIM)",
            ),
            rules_matched: counter_vec(
                r,
                "clickstream_rules_matched_total",
                "Events described by each rule",
                &["rule"],
            ),
            rules_unmatched: counter(
                r,
                "clickstream_rules_unmatched_total",
                "Events no rule described (fallback sentence)",
            ),
            rules_unmatched_unreported: counter(
                r,
                "clickstream_rules_unmatched_unreported_total",
                "Unmatched events left out of the shared report (too many shapes held between flushes)",
            ),
            rules_reloads: counter_vec(
                r,
                "clickstream_rules_reloads_total",
                "Rule reloads by result",
                &["result"],
            ),
            rules_version: register(
                r,
                IntGaugeVec::new(
                    Opts::new("clickstream_rules_version_info", "1 for the ruleset version in force"),
                    &["version"],
                )
                .expect("valid gauge"),
            ),
            reenriched: counter(
                r,
                "clickstream_worker_reenriched_events_total",
                "Stored events of other rule set versions described again with the live one",
            ),
            reenrich_changed: counter(
                r,
                "clickstream_worker_reenrich_changed_events_total",
                "Events described again whose sentence, rule or intents changed",
            ),
            reenrich_active: register(
                r,
                IntGauge::new(
                    "clickstream_worker_reenrich_active",
                    "1 while this replica works on a re-enrichment pass",
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
