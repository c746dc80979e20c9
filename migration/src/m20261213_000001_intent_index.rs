//! An index of users by intent, for MCP's `find_users` ("who is showing purchase intent in the
//! last hour?") without reading `events` or every profile's `intents` document.
//!
//! - `user_intents` holds one row per user and intent: the score as of `last_seen` and its
//!   half-life, copied from `user_profiles.intents`. A decayed score cannot be indexed (it changes
//!   with the clock), so readers walk `(intent, last_seen DESC)` newest first and decay at read.
//! - Triggers on `user_profiles` keep it in step inside the same transaction as the profile write
//!   (the worker's batch, the erasure's delete): nothing else writes it.
//! - `user_profiles (last_seen DESC)` answers "who was active since …".

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

#[derive(DeriveMigrationName)]
pub struct Migration;

const UP: &str = r#"
CREATE TABLE user_intents (
    distinct_id    text             NOT NULL,
    intent         text             NOT NULL,
    score          double precision NOT NULL,
    last_seen      timestamptz      NOT NULL,
    -- NULL or not positive: no decay (as IntentState::score_at)
    half_life_secs double precision,
    PRIMARY KEY (distinct_id, intent)
);
CREATE INDEX user_intents_intent_last_seen_idx ON user_intents (intent, last_seen DESC);
CREATE INDEX user_profiles_last_seen_idx ON user_profiles (last_seen DESC);

CREATE FUNCTION user_intents_sync() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM user_intents WHERE distinct_id = OLD.distinct_id;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        DELETE FROM user_intents
         WHERE distinct_id = NEW.distinct_id AND NOT (NEW.intents ? intent);
    END IF;
    INSERT INTO user_intents AS u (distinct_id, intent, score, last_seen, half_life_secs)
    SELECT NEW.distinct_id, i.key, (i.value->>'score')::float8,
           (i.value->>'last_seen')::timestamptz, (i.value->>'half_life_secs')::float8
      FROM jsonb_each(NEW.intents) AS i
     WHERE jsonb_typeof(i.value->'score') = 'number' AND i.value->>'last_seen' IS NOT NULL
    ON CONFLICT (distinct_id, intent) DO UPDATE
       SET score = EXCLUDED.score, last_seen = EXCLUDED.last_seen,
           half_life_secs = EXCLUDED.half_life_secs
     WHERE (u.score, u.last_seen, u.half_life_secs)
           IS DISTINCT FROM (EXCLUDED.score, EXCLUDED.last_seen, EXCLUDED.half_life_secs);
    RETURN NULL;
END $$;

CREATE TRIGGER user_intents_on_insert AFTER INSERT ON user_profiles
    FOR EACH ROW WHEN (NEW.intents <> '{}'::jsonb) EXECUTE FUNCTION user_intents_sync();
CREATE TRIGGER user_intents_on_update AFTER UPDATE OF intents ON user_profiles
    FOR EACH ROW WHEN (NEW.intents IS DISTINCT FROM OLD.intents) EXECUTE FUNCTION user_intents_sync();
CREATE TRIGGER user_intents_on_delete AFTER DELETE ON user_profiles
    FOR EACH ROW EXECUTE FUNCTION user_intents_sync();

-- The profiles stored before this migration.
INSERT INTO user_intents (distinct_id, intent, score, last_seen, half_life_secs)
SELECT p.distinct_id, i.key, (i.value->>'score')::float8,
       (i.value->>'last_seen')::timestamptz, (i.value->>'half_life_secs')::float8
  FROM user_profiles AS p, jsonb_each(p.intents) AS i
 WHERE jsonb_typeof(i.value->'score') = 'number' AND i.value->>'last_seen' IS NOT NULL;
"#;

const DOWN: &str = r#"
DROP TRIGGER IF EXISTS user_intents_on_insert ON user_profiles;
DROP TRIGGER IF EXISTS user_intents_on_update ON user_profiles;
DROP TRIGGER IF EXISTS user_intents_on_delete ON user_profiles;
DROP FUNCTION IF EXISTS user_intents_sync();
DROP INDEX IF EXISTS user_profiles_last_seen_idx;
DROP TABLE IF EXISTS user_intents;
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared(UP).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared(DOWN).await?;
        Ok(())
    }
}
