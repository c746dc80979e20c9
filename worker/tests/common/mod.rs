//! The worker's test harness on top of `testkit`: worker configurations for a test's own
//! database and keys, the worker run in-process, and an enricher that counts what it describes.

#![allow(dead_code)]

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use entity::Envelope;
use rules_engine::enrich::{Describer, EnrichError, Enricher, Enrichment, NoRules};
use sea_orm::DatabaseConnection;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker::Config;

pub use testkit::*;

/// A worker config for tests: short intervals, its own keys and database.
pub fn config(db_url: &str, keys: &Keys, worker_name: &str) -> Config {
    Config {
        shared: infra::config::Shared {
            environment: "test".into(),
            redis_url: redis_url(),
            redis_cluster: false,
            redis_ca_cert: None,
            database_url: db_url.to_string(),
            queue_name: keys.stream.clone(),
            stream_shards: keys.shards,
            dlq_name: keys.dlq.clone(),
            max_event_bytes: infra::config::DEFAULT_MAX_EVENT_BYTES,
            migrate_on_start: false,
            telemetry: infra::telemetry::TelemetryConfig::local("worker"),
        },
        database_pool_size: 3,
        write_concurrency: 2,
        dlq_maxlen: worker::config::DEFAULT_DLQ_MAXLEN,
        consumer_group: keys.group.clone(),
        worker_name: worker_name.to_string(),
        batch_size: 50,
        read_ahead_bytes: worker::config::DEFAULT_READ_AHEAD_BYTES,
        flush_interval: Duration::from_millis(100),
        claim_interval: Duration::from_millis(100),
        claim_idle: Duration::from_secs(60),
        shard_lease: Duration::from_secs(1),
        max_deliveries: 5,
        shutdown_timeout: Duration::from_secs(5),
        rules_dir: "rules".into(),
        reenrich_on_reload: true,
        reenrich_batch_size: 100,
        reenrich_pause: Duration::from_millis(10),
        metrics_bind: None,
        metrics_bind_is_default: false,
    }
}

/// A pool on `db` opened as the worker opens its own (`worker::store::connect`).
pub async fn worker_pool(db: &TestDb) -> DatabaseConnection {
    worker::store::connect(&config(&db.url, &Keys::new(), "store"))
        .await
        .expect("worker pool")
}

/// `envelope` ready to store, described by the fallback sentence (no rules).
pub fn stored(envelope: &Envelope) -> worker::store::StoredEvent {
    worker::store::StoredEvent::new(
        envelope.clone(),
        rules_engine::enrich::without_rules(envelope),
        None,
    )
}

/// A worker running in this process.
pub struct RunningWorker {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), worker::WorkerError>>,
    _stop: StopOnDrop,
}

impl RunningWorker {
    pub fn start(config: Config) -> Self {
        Self::start_with(config, counting(false).1)
    }

    /// The worker as its binary runs it: the rules of `config.rules_dir`, watched.
    pub fn spawn_run(config: Config) -> Self {
        Self::spawn(|shutdown| worker::run(config, shutdown))
    }

    pub fn start_with(config: Config, enricher: Arc<dyn Enricher>) -> Self {
        Self::spawn(|shutdown| worker::run_with(config, enricher, shutdown))
    }

    /// A worker with the counting enricher, and its metrics (what its `/metrics` would show).
    pub fn start_observed(config: Config) -> (Self, Arc<worker::metrics::WorkerMetrics>) {
        let metrics = Arc::new(worker::metrics::WorkerMetrics::new());
        let observed = metrics.clone();
        let worker = Self::spawn(|shutdown| {
            worker::pipeline::run(config, counting(false).1, observed, shutdown)
        });
        (worker, metrics)
    }

    fn spawn<F>(run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = Result<(), worker::WorkerError>> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(shutdown.clone()));
        Self {
            _stop: StopOnDrop::new(&shutdown, &task),
            shutdown,
            task,
        }
    }

    /// Graceful stop; returns the worker's result.
    pub async fn stop(self) -> Result<(), worker::WorkerError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("worker stops in time")
            .unwrap()
    }
}

/// The fallback sentences; counts events described and fails on events named `boom`.
#[derive(Default)]
pub struct Counting {
    pub described: AtomicUsize,
    pub fail_on_boom: bool,
}

struct CountingRules(Arc<Counting>);

impl Describer for CountingRules {
    fn version(&self) -> &str {
        "test-rules"
    }

    fn enrich(&self, event: &Envelope) -> Result<Enrichment, EnrichError> {
        self.0.described.fetch_add(1, Ordering::SeqCst);
        if self.0.fail_on_boom && event.event == "boom" {
            return Err(EnrichError("rule 'boom' has a bug".into()));
        }
        let mut enrichment = NoRules.enrich(event)?;
        if event.properties.get("$pathname").and_then(|p| p.as_str()) == Some("/pricing") {
            enrichment.intents.push(rules_engine::enrich::IntentHit {
                name: "purchase".into(),
                weight: 1.0,
                summary: "User showing Purchase Intent.".into(),
                half_life_secs: 86_400.0,
            });
        }
        Ok(enrichment)
    }
}

/// An enricher over a shared [`Counting`].
pub struct CountingEnricher(pub Arc<Counting>);

impl Enricher for CountingEnricher {
    fn describer(&self) -> Arc<dyn Describer> {
        Arc::new(CountingRules(self.0.clone()))
    }
}

/// A counting enricher and its counter.
pub fn counting(fail_on_boom: bool) -> (Arc<Counting>, Arc<dyn Enricher>) {
    let counter = Arc::new(Counting {
        described: AtomicUsize::new(0),
        fail_on_boom,
    });
    (counter.clone(), Arc::new(CountingEnricher(counter)))
}
