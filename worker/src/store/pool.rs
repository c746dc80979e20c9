//! The worker's connections to Postgres: the pool (with its planner settings), the connection
//! migrations run on, and opening the pool's connections ahead of the first batch.

use std::time::Duration;

use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr, sqlx};

use infra::postgres::StoreError;

use super::{events, profiles};
use crate::config::Config;

/// Planner settings of the worker's connections (sent at connect, no round trip): every statement
/// joins a batch's keys (`unnest` of one array per column) to `user_profiles` by its primary key,
/// which must be an index probe per key.
///
/// - Hash and merge joins off: a generic plan made while the table was small would otherwise
///   keep scanning the whole table once it has grown.
/// - Generic plans always (`plan_cache_mode`): planning the small batches of a quiet stream anew
///   each time costs more than the statements, and the generic plan is the one a custom plan
///   would choose anyway.
///
/// Migrations run on a connection of their own ([`connect_for_migrations`]), with the server's
/// planner settings.
const KEYED_PLANS: [(&str, &str); 3] = [
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("plan_cache_mode", "force_generic_plan"),
];

/// Every statement a batch may run, for [`warm_up`].
const STATEMENTS: [&str; 7] = [
    infra::erasure::LOCK_SHARED,
    events::INSERT_NEW_EVENTS,
    profiles::INSERT_SESSIONS_AND_NEW_PROFILES,
    profiles::INSERT_NEW_PROFILES,
    profiles::LOCK_PROFILES,
    profiles::UPDATE_PROFILES,
    profiles::UPSERT_COUNTS,
];

/// A lazily connecting pool: the worker starts (and retries) while Postgres is down.
pub async fn connect(config: &Config) -> Result<DatabaseConnection, StoreError> {
    let mut options = options(config);
    options
        .max_connections(config.database_pool_size)
        .min_connections(config.write_concurrency as u32)
        // No ping round trip before each batch; connections idle for a while are still checked.
        .test_before_acquire_if_idle_for(infra::postgres::CHECK_IF_IDLE_FOR)
        .map_sqlx_postgres_opts(|pg| pg.options(KEYED_PLANS));
    Ok(Database::connect(options).await?)
}

/// One lazily opened connection, as the pool's but with the server's own planner settings, for
/// applying migrations (the pool of [`connect`] turns some plans off, see [`KEYED_PLANS`]).
pub async fn connect_for_migrations(config: &Config) -> Result<DatabaseConnection, StoreError> {
    let mut options = options(config);
    options.max_connections(1).min_connections(0);
    Ok(Database::connect(options).await?)
}

/// Opens the pool's `connections` (all of them: writers finishing and starting transactions
/// overlap, and the pool opens another connection rather than wait for one being given back)
/// and prepares every batch statement on each, so that the first batches after a start wait
/// neither for a connection to open nor for Postgres to load its catalogs. Best effort: the
/// caller goes on without it when Postgres is not there yet.
pub async fn warm_up(db: &DatabaseConnection, connections: u32) -> Result<(), StoreError> {
    use sqlx::{Executor, SqlSafeStr};
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let pool = db.get_postgres_connection_pool().clone();
        tasks.spawn(async move {
            let mut conn = pool.acquire().await?;
            for sql in STATEMENTS {
                (&mut *conn).prepare(sql.into_sql_str()).await?;
            }
            // Returned, not dropped: held until all are open, so each task has its own.
            Ok::<_, sqlx::Error>(conn)
        });
    }
    let mut held = Vec::with_capacity(connections as usize);
    while let Some(result) = tasks.join_next().await {
        let conn = result.map_err(|e| StoreError::Db(DbErr::Custom(e.to_string())))??;
        held.push(conn);
    }
    Ok(())
}

/// What every worker connection to Postgres shares: timeouts, opened lazily, Nagle's algorithm off.
fn options(config: &Config) -> ConnectOptions {
    let mut options = ConnectOptions::new(config.database_url.clone());
    options
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        .statement_timeout(Duration::from_secs(30))
        .connect_lazy(true)
        .sqlx_logging(false);
    infra::postgres::no_delay_on_connect(&mut options);
    options
}
