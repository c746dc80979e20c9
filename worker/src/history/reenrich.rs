//! Re-enrichment: when the rule set's version changes, stored events described by any other
//! version are described again with the live one, newest first (the context shows the newest
//! events, so they are right first), in batches of one transaction each. The pass's state is one
//! row (`rules_reenrich`): every replica's batches take it `FOR UPDATE SKIP LOCKED`, so two
//! replicas never rewrite the same rows, and a restart continues from its cursor.
//!
//! A batch, in one transaction: lock the state row; read the next events below the cursor; describe
//! those of other versions; insert the sessions events newly visible open (sorted, as the
//! pipeline does); lock the touched users' profiles in the pipeline's order; update the events;
//! recount the touched profiles from their visible events (counts, times, sessions, intents);
//! move the cursor. Idempotent: an event already at the live version is only passed over.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use entity::user_profile::Intents;
use sea_orm::sqlx::{self, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use infra::postgres::StoreError;
use rules_engine::enrich::IntentHit;
use rules_engine::{RuleSet, RulesHandle};

use super::{Description, ROW_COLUMNS, StoredRow, compare::Comparison, walk_sql};
use crate::metrics::WorkerMetrics;
use crate::profile::add_intent;

/// The most of its time a replica's pass spends in batches: after each, it waits at least
/// `1 / WORK_SHARE - 1` times as long as the batch took.
const WORK_SHARE: f64 = 0.1;

/// Keys of events looked at per event described, at most, in one batch: events the live rules
/// described already are passed over reading the index alone.
const KEYS_PER_EVENT: usize = 20;

/// The pass recorded in `rules_reenrich`.
#[derive(Debug, Clone, PartialEq)]
pub struct PassState {
    pub version: String,
    pub cursor: Option<(DateTime<Utc>, Uuid)>,
    pub since: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Events of other versions described again so far.
    pub described: i64,
    /// Of those, events whose sentence, rule or intents changed.
    pub changed: i64,
}

/// What one call of [`step`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A batch was done: events walked past, described again (other versions), changed.
    Batch {
        read: usize,
        described: usize,
        changed: usize,
    },
    /// Nothing left: the pass is finished.
    Finished,
    /// Another replica holds the pass for a batch right now.
    Busy,
    /// The pass describes with another version (started by a replica or an operator with other
    /// rules): this caller leaves it alone.
    OtherVersion(String),
    /// No pass was ever started.
    NoPass,
}

const STATE_COLUMNS: &str =
    "version, cursor_at, cursor_uuid, since, started_at, finished_at, described, changed";

fn read_state(row: &sqlx::postgres::PgRow) -> Result<PassState, StoreError> {
    let at: Option<DateTime<Utc>> = row.try_get(1)?;
    let uuid: Option<Uuid> = row.try_get(2)?;
    Ok(PassState {
        version: row.try_get(0)?,
        cursor: at.zip(uuid),
        since: row.try_get(3)?,
        started_at: row.try_get(4)?,
        finished_at: row.try_get(5)?,
        described: row.try_get(6)?,
        changed: row.try_get(7)?,
    })
}

/// The pass in `rules_reenrich`, if one was ever started.
pub async fn state(pool: &sqlx::PgPool) -> Result<Option<PassState>, StoreError> {
    let sql = format!("SELECT {STATE_COLUMNS} FROM rules_reenrich WHERE id = 1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(read_state).transpose()
}

/// Starts a pass with `version` over the events since `since` (all when `None`), from the newest.
/// With `restart` false, a pass already describing with `version` is kept (two replicas reloading
/// the same rules start it once); with `restart` true (an operator's command) it starts over.
pub async fn begin(
    pool: &sqlx::PgPool,
    version: &str,
    since: Option<DateTime<Utc>>,
    restart: bool,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO rules_reenrich (id, version, since, started_at, updated_at) \
         VALUES (1, $1, $2, now(), now()) \
         ON CONFLICT (id) DO UPDATE SET version = $1, since = $2, cursor_at = NULL, \
           cursor_uuid = NULL, started_at = now(), updated_at = now(), finished_at = NULL, \
           described = 0, changed = 0 \
         WHERE rules_reenrich.version <> $1 OR $3",
    )
    .bind(version)
    .bind(since)
    .bind(restart)
    .execute(pool)
    .await?;
    Ok(())
}

/// Does one batch of the pass with `set` (see the module's comment).
pub async fn step(pool: &sqlx::PgPool, set: &RuleSet, batch: usize) -> Result<Step, StoreError> {
    let mut txn = pool.begin().await?;
    let sql =
        format!("SELECT {STATE_COLUMNS} FROM rules_reenrich WHERE id = 1 FOR UPDATE SKIP LOCKED");
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_optional(&mut *txn)
        .await?
    else {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT FROM rules_reenrich)")
            .fetch_one(&mut *txn)
            .await?;
        return Ok(if exists { Step::Busy } else { Step::NoPass });
    };
    let pass = read_state(&row)?;
    if pass.version != set.version() {
        return Ok(Step::OtherVersion(pass.version));
    }
    if pass.finished_at.is_some() {
        return Ok(Step::Finished);
    }
    // The next keys below the cursor, with their version (from the index alone), up to `batch`
    // of other versions; then those events in full.
    let (cursor_at, cursor_uuid) = pass.cursor.unzip();
    let sql = walk_sql("\"timestamp\", uuid, rules_version <> $4", "$5");
    let keys = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(cursor_at)
        .bind(cursor_uuid)
        .bind(pass.since)
        .bind(set.version())
        .bind((batch * KEYS_PER_EVENT) as i64)
        .fetch_all(&mut *txn)
        .await?;
    let mut walked = 0;
    let mut wanted = Vec::new();
    let mut last = None;
    for key in &keys {
        walked += 1;
        let (at, uuid, other): (DateTime<Utc>, Uuid, bool) =
            (key.try_get(0)?, key.try_get(1)?, key.try_get(2)?);
        last = Some((at, uuid));
        if other {
            wanted.push(uuid);
            if wanted.len() == batch {
                break;
            }
        }
    }
    let sql = format!("SELECT {ROW_COLUMNS} FROM events WHERE uuid = ANY($1)");
    let rows: Vec<StoredRow> = if wanted.is_empty() {
        Vec::new()
    } else {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&wanted)
            .fetch_all(&mut *txn)
            .await?
            .iter()
            .map(StoredRow::read)
            .collect::<Result<_, _>>()?
    };

    let mut rewrites: Vec<(&StoredRow, Description)> = Vec::new();
    let mut touched = BTreeSet::new();
    for row in rows.iter().filter(|r| r.rules_version != set.version()) {
        let new = row.describe(set);
        if new != row.stored {
            touched.insert(row.distinct_id.as_str());
        }
        rewrites.push((row, new));
    }
    let changed = rewrites.iter().filter(|(r, n)| r.stored != *n).count();
    if !touched.is_empty() {
        open_sessions(&mut txn, &rewrites).await?;
        let users: Vec<&str> = touched.iter().copied().collect();
        sqlx::query(
            "SELECT distinct_id FROM user_profiles WHERE distinct_id = ANY($1) \
             ORDER BY distinct_id COLLATE \"C\" FOR UPDATE",
        )
        .bind(&users)
        .fetch_all(&mut *txn)
        .await?;
    }
    if !rewrites.is_empty() {
        let column =
            |f: &dyn Fn(&(&StoredRow, Description)) -> Option<String>| -> Vec<Option<String>> {
                rewrites.iter().map(f).collect()
            };
        let uuids: Vec<Uuid> = rewrites.iter().map(|(r, _)| r.uuid).collect();
        sqlx::query(
            "UPDATE events AS e SET description = x.d, rule_id = x.r, intents = x.i::jsonb, \
               rules_version = $5 \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS x(u, d, r, i) \
             WHERE e.uuid = x.u",
        )
        .bind(&uuids)
        .bind(column(&|(_, n)| n.sentence.clone()))
        .bind(column(&|(_, n)| n.rule_id.clone()))
        .bind(column(&|(_, n)| Some(n.intents_json())))
        .bind(set.version())
        .execute(&mut *txn)
        .await?;
    }
    if !touched.is_empty() {
        let users: Vec<&str> = touched.iter().copied().collect();
        recount_profiles(&mut txn, set, &users).await?;
    }
    let finished = keys.len() < batch * KEYS_PER_EVENT && walked == keys.len();
    sqlx::query(
        "UPDATE rules_reenrich SET cursor_at = coalesce($1, cursor_at), \
           cursor_uuid = coalesce($2, cursor_uuid), described = described + $3, \
           changed = changed + $4, updated_at = now(), \
           finished_at = CASE WHEN $5 THEN now() END \
         WHERE id = 1",
    )
    .bind(last.map(|l| l.0))
    .bind(last.map(|l| l.1))
    .bind(rewrites.len() as i64)
    .bind(changed as i64)
    .bind(finished)
    .execute(&mut *txn)
    .await?;
    txn.commit().await?;
    Ok(Step::Batch {
        read: walked,
        described: rewrites.len(),
        changed,
    })
}

/// Records the sessions of events that become visible (no longer ignored), in the pipeline's
/// (distinct_id, session_id) order, before any profile lock is taken (as the pipeline does).
async fn open_sessions(
    txn: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    rewrites: &[(&StoredRow, Description)],
) -> Result<(), StoreError> {
    let mut sessions: BTreeMap<(&str, &str), DateTime<Utc>> = BTreeMap::new();
    for (row, new) in rewrites {
        if let (Some(session), Some(_), None) =
            (&row.session_id, &new.sentence, &row.stored.sentence)
        {
            let first = sessions
                .entry((&row.distinct_id, session))
                .or_insert(row.timestamp);
            *first = (*first).min(row.timestamp);
        }
    }
    if sessions.is_empty() {
        return Ok(());
    }
    let (mut users, mut ids, mut firsts) = (Vec::new(), Vec::new(), Vec::new());
    for ((user, session), first) in sessions {
        users.push(user);
        ids.push(session);
        firsts.push(first);
    }
    sqlx::query(
        "INSERT INTO user_sessions (distinct_id, session_id, first_seen) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(users)
    .bind(ids)
    .bind(firsts)
    .execute(&mut **txn)
    .await?;
    Ok(())
}

/// Recounts the (locked) profiles of `users` from their visible events: counts, times, sessions
/// and intents (folded oldest first with the live set's intent definitions).
async fn recount_profiles(
    txn: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    set: &RuleSet,
    users: &[&str],
) -> Result<(), StoreError> {
    // Sessions whose every event is now ignored.
    sqlx::query(
        "DELETE FROM user_sessions AS s WHERE s.distinct_id = ANY($1) AND NOT EXISTS \
           (SELECT FROM events AS e WHERE e.distinct_id = s.distinct_id \
              AND e.session_id = s.session_id AND e.description IS NOT NULL)",
    )
    .bind(users)
    .execute(&mut **txn)
    .await?;
    let definitions: BTreeMap<&str, (Arc<str>, Arc<str>, f64)> = set
        .intents()
        .iter()
        .map(|d| {
            (
                d.name.as_str(),
                (
                    Arc::from(d.name.as_str()),
                    Arc::from(d.summary.as_str()),
                    d.half_life_secs,
                ),
            )
        })
        .collect();
    let mut intents: BTreeMap<String, Intents> = users
        .iter()
        .map(|u| (u.to_string(), Intents::new()))
        .collect();
    let hits = sqlx::query(
        "SELECT distinct_id, \"timestamp\", description, intents::text FROM events \
         WHERE distinct_id = ANY($1) AND description IS NOT NULL AND intents <> '{}'::jsonb \
         ORDER BY distinct_id, \"timestamp\"",
    )
    .bind(users)
    .fetch_all(&mut **txn)
    .await?;
    for row in &hits {
        let user: String = row.try_get(0)?;
        let at: DateTime<Utc> = row.try_get(1)?;
        let description: String = row.try_get(2)?;
        let weights: BTreeMap<String, f64> =
            serde_json::from_str(&row.try_get::<String, _>(3)?).unwrap_or_default();
        let folded = intents.entry(user).or_default();
        for (name, weight) in weights {
            // An intent no longer declared leaves the profile.
            let Some((name, summary, half_life_secs)) = definitions.get(name.as_str()) else {
                continue;
            };
            let hit = IntentHit {
                name: name.clone(),
                weight,
                summary: summary.clone(),
                half_life_secs: *half_life_secs,
            };
            add_intent(folded, at, &hit, &description);
        }
    }
    let names: Vec<&String> = intents.keys().collect();
    let jsons: Vec<String> = intents
        .values()
        .map(|i| serde_json::to_string(i).unwrap_or_else(|_| "{}".into()))
        .collect();
    sqlx::query(
        "UPDATE user_profiles AS p SET event_count = c.n, \
           first_seen = coalesce(c.f, p.first_seen), last_seen = coalesce(c.l, p.last_seen), \
           session_count = (SELECT count(*) FROM user_sessions AS s WHERE s.distinct_id = p.distinct_id), \
           intents = x.i::jsonb, updated_at = now() \
         FROM unnest($1::text[], $2::text[]) AS x(d, i) \
         CROSS JOIN LATERAL (SELECT count(*) AS n, min(\"timestamp\") AS f, max(\"timestamp\") AS l \
           FROM events AS e WHERE e.distinct_id = x.d AND e.description IS NOT NULL) AS c \
         WHERE p.distinct_id = x.d",
    )
    .bind(names)
    .bind(jsons)
    .execute(&mut **txn)
    .await?;
    Ok(())
}

/// What a pass with `set` would change, without writing: stored events of other versions (since
/// `since`) compared with what `set` says about them, newest first.
pub async fn dry_run(
    pool: &sqlx::PgPool,
    set: &RuleSet,
    since: Option<DateTime<Utc>>,
) -> Result<Comparison, StoreError> {
    const PAGE: usize = 1000;
    let mut comparison = Comparison::default();
    let mut cursor = None;
    loop {
        let rows = super::page(pool, cursor, since, PAGE as i64).await?;
        for row in rows.iter().filter(|r| r.rules_version != set.version()) {
            comparison.add(row, &row.stored, &row.describe(set));
        }
        match rows.last() {
            Some(last) if rows.len() == PAGE => cursor = Some((last.timestamp, last.uuid)),
            _ => return Ok(comparison),
        }
    }
}

/// Runs passes in the background for one replica: at start (a pass left unfinished resumes) and
/// whenever the rules reload, batch after batch with `pause` between them, until `shutdown`.
pub async fn run(
    pool: sqlx::PgPool,
    rules: RulesHandle,
    batch: usize,
    pause: Duration,
    metrics: Arc<WorkerMetrics>,
    shutdown: CancellationToken,
) {
    let mut reloads = rules.subscribe();
    loop {
        let set = rules.current();
        match pass(&pool, &set, batch, pause, &metrics, &shutdown).await {
            Ok(()) => {}
            Err(error) => {
                tracing::warn!(%error, "re-enrichment: batch failed; retrying in 5 s");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        }
        // Wait for the next reload (or a minute: a pass another replica left unfinished).
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = reloads.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

async fn pass(
    pool: &sqlx::PgPool,
    set: &RuleSet,
    batch: usize,
    pause: Duration,
    metrics: &WorkerMetrics,
    shutdown: &CancellationToken,
) -> Result<(), StoreError> {
    match state(pool).await? {
        Some(s) if s.version == set.version() => {}
        _ => begin(pool, set.version(), None, false).await?,
    }
    let mut logged = false;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let wait = match step(pool, set, batch).await? {
            // Only events the live rules described already: no work to pace.
            Step::Batch { described: 0, .. } => Duration::from_millis(1),
            Step::Batch {
                described, changed, ..
            } => {
                if !logged {
                    tracing::info!(
                        version = set.version(),
                        "re-enrichment: describing stored events with the new rules"
                    );
                    logged = true;
                }
                metrics.reenriched.inc_by(described as u64);
                metrics.reenrich_changed.inc_by(changed as u64);
                metrics.reenrich_active.set(1);
                // At least `pause`, and at least WORK_SHARE's complement of the batch's own time:
                // the pass slows down by itself when Postgres is busy with the stream's events.
                pause.max(started.elapsed().mul_f64(1.0 / WORK_SHARE - 1.0))
            }
            Step::Busy => Duration::from_millis(500),
            Step::Finished => {
                if logged {
                    tracing::info!(version = set.version(), "re-enrichment: pass finished");
                }
                metrics.reenrich_active.set(0);
                return Ok(());
            }
            Step::OtherVersion(_) | Step::NoPass => {
                metrics.reenrich_active.set(0);
                return Ok(());
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
