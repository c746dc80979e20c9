//! Rule edits reach history: stored events are described again when the rules change.
//!
//! - `events_timestamp_uuid_idx`: the newest events first, for the re-enrichment pass (a keyset
//!   walk from the newest event down, which reads `rules_version` from the index alone to pass
//!   over events already described by the live rules) and the shadow run (`worker rules shadow`).
//! - `rules_reenrich`: the one pass in progress, shared by every worker replica: which rule set
//!   version it describes with, where it is (`cursor_at`, `cursor_uuid`: every event newer than
//!   this is done), since when (`since`: older events are left alone), and what it did. A replica
//!   locks the row for each batch (`FOR UPDATE SKIP LOCKED`), so replicas never rewrite the same
//!   rows and a restart resumes from the cursor.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE INDEX events_timestamp_uuid_idx ON events ("timestamp" DESC, uuid DESC) INCLUDE (rules_version);

CREATE TABLE rules_reenrich (
    id          smallint    PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    version     text        NOT NULL,
    cursor_at   timestamptz,
    cursor_uuid uuid,
    since       timestamptz,
    started_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    finished_at timestamptz,
    described   bigint      NOT NULL DEFAULT 0,
    changed     bigint      NOT NULL DEFAULT 0
);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS rules_reenrich;
DROP INDEX IF EXISTS events_timestamp_uuid_idx;
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
