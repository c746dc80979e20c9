//! The worker: consumer-group replicas that take events off the Redis Stream, describe them with
//! the rules, and store them in Postgres exactly once (see [`pipeline`]). Also the operator CLI
//! (`worker dlq …`, `worker rules …`) in [`cli`].

pub mod cli;
pub mod config;
pub mod history;
pub mod identity;
pub mod metrics;
pub mod pipeline;
pub mod probe;
pub mod profile;
pub mod sanitize;
pub mod store;
pub mod stream;
pub mod unmatched;

use std::sync::Arc;

pub use config::Config;
use tokio_util::sync::CancellationToken;

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] infra::config::ConfigError),
    #[error(transparent)]
    Store(#[from] infra::postgres::StoreError),
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    #[error("rules: {0}")]
    Rules(#[from] rules_engine::enrich::EnrichError),
    #[error("{0}")]
    Stopped(String),
}

/// Runs one replica with the rules of `RULES_DIR` (reloaded when they change) until `shutdown`
/// is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let enricher = rules_engine::enrich::load(&config.rules_dir, &shutdown)?;
    run_with(config, enricher, shutdown).await
}

/// Runs one replica with the given enricher until `shutdown` is cancelled.
pub async fn run_with(
    config: Config,
    enricher: Arc<dyn rules_engine::enrich::Enricher>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let metrics = Arc::new(metrics::WorkerMetrics::new());
    infra::redis_settings::spawn_check(
        config.redis_client(),
        config.is_production(),
        metrics.queue.redis_config_unsafe.clone(),
    );
    pipeline::run(config, enricher, metrics, shutdown).await
}
