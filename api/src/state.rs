//! What every request handler shares.

use std::{sync::Arc, time::Duration};

use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    context::conns::ReadConnections,
    http::{auth::Keys, metrics::ApiMetrics},
    ingest::{inflight::InFlight, publish::Publisher},
};

/// Most connections to Postgres of each of the two sets: the context reads' and everything else's.
const DB_MAX_CONNECTIONS: usize = 16;
/// Longest wait to connect to Postgres or for a free connection.
const DB_TIMEOUT: Duration = Duration::from_secs(2);

/// Shared state, cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub keys: Keys,
    pub publisher: Publisher,
    /// Postgres pool, connected lazily so ingest never waits on the database.
    pub db: DatabaseConnection,
    /// The context read path's own connections (see [`ReadConnections`]).
    pub reads: ReadConnections,
    /// Fired when shutdown begins: readiness answers 503 from then on.
    pub shutdown: CancellationToken,
    pub metrics: ApiMetrics,
    /// Bytes ingest requests hold at once (`INGEST_MAX_INFLIGHT_BYTES`).
    pub inflight: InFlight,
    /// The shared report of events no rule describes (written by the workers).
    pub unmatched: infra::unmatched::UnmatchedReport,
    /// The rules of `RULES_DIR`, read by MCP's `explain_event`.
    pub rules: crate::mcp::rules::LiveRules,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Errors building the state (bad URLs).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("REDIS_URL: {0}")]
    Redis(#[from] crate::ingest::publish::PublishError),
    #[error("DATABASE_URL: {0}")]
    Database(#[from] sea_orm::DbErr),
    #[error("DATABASE_URL: {0}")]
    DatabaseUrl(#[from] sea_orm::sqlx::Error),
}

impl AppState {
    pub async fn new(config: Config, shutdown: CancellationToken) -> Result<Self, StateError> {
        let metrics = ApiMetrics::default();
        let publisher = Publisher::new(
            // Nagle's algorithm left on: concurrent requests share this connection, and their
            // appends may go out together.
            &infra::redis::RedisClient::open_with_nodelay(
                &config.redis_url,
                config.redis_cluster,
                config.redis_ca_cert.as_deref(),
                false,
            )
            .map_err(crate::ingest::publish::PublishError::from)?,
            config.shards(),
            config.redis_timeout,
            config.stream_max_backlog,
        )?
        .with_latency_histogram(metrics.xadd_seconds.clone());
        // Warns (log and gauge) when Redis could drop stream data; never holds start up.
        let mut redis = publisher.connection();
        let production = config.environment == "production";
        let gauge = metrics.queue.redis_config_unsafe.clone();
        tokio::spawn(async move {
            infra::redis_settings::check(&mut redis, production, &gauge).await;
        });
        let unmatched =
            infra::unmatched::UnmatchedReport::new(publisher.connection(), &config.queue_name);
        let reads = ReadConnections::new(
            &config.database_url,
            DB_MAX_CONNECTIONS,
            DB_TIMEOUT,
            DB_TIMEOUT,
        )?;
        let mut opts = ConnectOptions::new(config.database_url.clone());
        opts.connect_lazy(true)
            .max_connections(DB_MAX_CONNECTIONS as u32)
            .connect_timeout(DB_TIMEOUT)
            .acquire_timeout(DB_TIMEOUT)
            // No ping round trip before every query: only connections idle for a while.
            .test_before_acquire_if_idle_for(infra::postgres::CHECK_IF_IDLE_FOR)
            .sqlx_logging(false);
        infra::postgres::no_delay_on_connect(&mut opts);
        let db = Database::connect(opts).await?;
        let rules = crate::mcp::rules::LiveRules::load(config.rules_dir.clone(), shutdown.clone());
        Ok(Self(Arc::new(Inner {
            rules,
            keys: Keys::new(&config.api_secret_key, &config.ingest_api_keys),
            inflight: InFlight::new(config.ingest_max_inflight_bytes),
            config,
            publisher,
            db,
            reads,
            shutdown,
            metrics,
            unmatched,
        })))
    }
}
