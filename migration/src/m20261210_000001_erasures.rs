//! Erasure tombstones: which users were erased and when, so that events received before an
//! erasure but stored after it (still in the stream, retried, replayed from the dead-letter
//! stream) are dropped instead of bringing the user back. See `worker::erasure`.
//!
//! - `erasures` is keyed by the SHA-256 of the erased `distinct_id` (its UTF-8 bytes), not the id
//!   itself: the table outlives the erasure, and should not be a list of the erased users' ids.
//! - `erasures_locked(lock_class, buckets, ids)` is the worker's first statement in every batch
//!   transaction: it takes the shared advisory locks of the batch's user buckets (in the order
//!   given: the caller sorts them), then returns the tombstones of `ids`. A VOLATILE PL/pgSQL
//!   function takes a new snapshot for each statement it runs, so the read sees every erasure
//!   that committed while the locks were waited for: one round trip where two statements would
//!   need two.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE TABLE erasures (
    id_sha256 bytea       PRIMARY KEY,
    erased_at timestamptz NOT NULL
);

CREATE FUNCTION erasures_locked(lock_class int4, buckets int4[], ids text[])
RETURNS TABLE (distinct_id text, erased_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(lock_class, b) FROM unnest(buckets) AS b;
    IF NOT EXISTS (SELECT FROM erasures) THEN
        RETURN;
    END IF;
    RETURN QUERY
        SELECT x.d, e.erased_at
          FROM unnest(ids) AS x(d)
          JOIN erasures AS e ON e.id_sha256 = sha256(convert_to(x.d, 'UTF8'));
END
$$;
"#;

const DOWN: &str = r#"
DROP FUNCTION IF EXISTS erasures_locked(int4, int4[], text[]);
DROP TABLE IF EXISTS erasures;
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(UP)
            .await
            .map(drop)
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(DOWN)
            .await
            .map(drop)
    }
}
