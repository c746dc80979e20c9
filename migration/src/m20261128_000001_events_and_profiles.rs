//! The first schema: stored events, per-user profiles and per-user sessions.
//! Written as SQL because the schema is Postgres-only (jsonb, timestamptz, DESC index).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE TABLE events (
    uuid           uuid        PRIMARY KEY,
    distinct_id    text        NOT NULL,
    event          text        NOT NULL,
    description    text        NOT NULL,
    rule_id        text,
    intents        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    properties     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    url            text,
    path           text,
    session_id     text,
    elements_chain text,
    "timestamp"    timestamptz NOT NULL,
    received_at    timestamptz NOT NULL,
    rules_version  text        NOT NULL
);
-- "Newest events of one user" (the context read path), optionally since a time.
CREATE INDEX events_distinct_id_timestamp_idx ON events (distinct_id, "timestamp" DESC);

CREATE TABLE user_profiles (
    distinct_id       text        PRIMARY KEY,
    first_seen        timestamptz NOT NULL,
    last_seen         timestamptz NOT NULL,
    event_count       bigint      NOT NULL DEFAULT 0,
    session_count     bigint      NOT NULL DEFAULT 0,
    intents           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    person_properties jsonb,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE user_sessions (
    distinct_id text        NOT NULL,
    session_id  text        NOT NULL,
    first_seen  timestamptz NOT NULL,
    PRIMARY KEY (distinct_id, session_id)
);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS user_sessions;
DROP TABLE IF EXISTS user_profiles;
DROP TABLE IF EXISTS events;
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
