//! Every schema change, as sea-orm-migration files. `cargo run -p migration -- up` applies them;
//! `api` and `worker` call [`apply`] at start when `MIGRATE_ON_START` is set.

pub use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{DatabaseConnection, DbBackend, Statement, TransactionTrait};

mod m20261128_000001_events_and_profiles;
mod m20261210_000001_erasures;
mod m20261211_000001_ignored_events;
mod m20261212_000001_persons;
mod m20261213_000001_intent_index;
mod m20261214_000001_rule_history;
mod m20261215_000001_person_property_times;

/// Advisory lock key held while migrating (`pg_advisory_xact_lock`), so that replicas starting
/// together apply each migration once. Arbitrary but fixed: "ctxmigr" in ASCII.
pub const MIGRATION_LOCK_KEY: i64 = 0x63_74_78_6d_69_67_72;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_events_and_profiles::Migration),
            Box::new(m20261210_000001_erasures::Migration),
            Box::new(m20261211_000001_ignored_events::Migration),
            Box::new(m20261212_000001_persons::Migration),
            Box::new(m20261213_000001_intent_index::Migration),
            Box::new(m20261214_000001_rule_history::Migration),
            Box::new(m20261215_000001_person_property_times::Migration),
        ]
    }
}

/// Runs a migration's SQL text. Migrations from `m20261215_000001` on use it; those shipped
/// before keep their code as it shipped.
async fn run_sql(manager: &SchemaManager<'_>, sql: &str) -> Result<(), DbErr> {
    use sea_orm_migration::sea_orm::ConnectionTrait;
    manager
        .get_connection()
        .execute_unprepared(sql)
        .await
        .map(drop)
}

/// Applies pending migrations in one transaction holding [`MIGRATION_LOCK_KEY`]: concurrent callers
/// wait for the first, then find nothing pending. Returns how many migrations it applied.
pub async fn apply(db: &DatabaseConnection) -> Result<usize, DbErr> {
    let txn = db.begin().await?;
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_advisory_xact_lock($1)",
        [MIGRATION_LOCK_KEY.into()],
    ))
    .await?;
    let pending = Migrator::get_pending_migrations(&txn).await?.len();
    if pending > 0 {
        Migrator::up(&txn, None).await?;
    }
    txn.commit().await?;
    if pending > 0 {
        tracing::info!(applied = pending, "database migrations applied");
    }
    Ok(pending)
}
