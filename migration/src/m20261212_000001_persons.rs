//! Persons: one person across the `distinct_id`s PostHog's identity calls (`$identify`,
//! `$create_alias`, `$merge_dangerously`) join. Rows stay per `distinct_id` (events, profiles,
//! sessions); the read path combines a person's ids, so a merge only rewrites mapping rows.
//!
//! - `persons`: one row per person of two or more ids; `is_identified` is PostHog's guard (an
//!   identified person is not merged into another by `$identify` or `$create_alias`).
//! - `person_distinct_ids`: which person each id belongs to. An id without a row is a person of
//!   one id, not identified. Indexed by person, so reading every id of a person is an index scan.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE TABLE persons (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    is_identified boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE person_distinct_ids (
    distinct_id text        PRIMARY KEY,
    person_id   bigint      NOT NULL REFERENCES persons (id),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX person_distinct_ids_person_id_idx ON person_distinct_ids (person_id);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS person_distinct_ids;
DROP TABLE IF EXISTS persons;
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
