//! Reads a user's stored events and profile (erasure: [`super::erase`]).

use chrono::{DateTime, Utc};
use entity::person_properties::{self, PropertyTimes};
use entity::user_profile::Intents;
use sea_orm::{
    DbErr,
    sqlx::{self, Row, types::Json},
};
use serde_json::{Map, Value};

use infra::postgres::db_err;

use super::{HistoryItem, conns::ReadConnections};

/// Which events the history shows.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub limit: u64,
    pub since: Option<DateTime<Utc>>,
    pub session: Option<String>,
}

/// What the context of one person is built from: every id of the person combined.
#[derive(Debug, Clone)]
pub struct UserRecord {
    /// The person's ids, sorted (byte order); the one asked for alone for a person of one id.
    pub distinct_ids: Vec<String>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub event_count: i64,
    pub session_count: i64,
    pub intents: Intents,
    /// The person's properties (`$set`, `$set_once`, `$unset` over all its ids, in PostHog's
    /// order: [`entity::person_properties`]).
    pub person_properties: Map<String, Value>,
    /// Newest first.
    pub history: Vec<HistoryItem>,
}

/// The profile and the newest events of one id in one statement (one round trip, one
/// connection): the history through the `(distinct_id, timestamp DESC)` index, aggregated into
/// one JSON array of `[time, description, event, page, session]`; last, the person the id
/// belongs to (NULL for most users: an id of no person), whose whole context is then read with
/// [`PERSON_CONTEXT_SQL`]. No row: nothing is stored for the id. `{filters}` and `{limit}` are
/// written into the text ([`context_sql`]), not bound: a generic plan for an unknown limit and
/// optional filters would read every event of the user.
pub const CONTEXT_SQL: &str = r#"SELECT p.first_seen, p.last_seen, p.event_count, p.session_count, p.intents,
  (SELECT coalesce(json_agg(json_build_array(h.t, h.d, h.e, h.p, h.s) ORDER BY h.t DESC, h.u DESC), '[]')
     FROM (SELECT "timestamp" AS t, description AS d, event AS e, coalesce(path, url) AS p,
                  session_id AS s, uuid AS u
             FROM events
            WHERE distinct_id = $1 AND description IS NOT NULL{filters}
            ORDER BY "timestamp" DESC, uuid DESC
            LIMIT {limit}) h) AS history,
  (SELECT m.person_id FROM person_distinct_ids m WHERE m.distinct_id = $1) AS person,
  p.person_properties
FROM user_profiles p WHERE p.distinct_id = $1"#;

/// The context of the person `$1` belongs to, its ids combined: the ids by the mapping's person
/// index, their profiles (counts summed, first and last seen, sessions counted once across ids;
/// the intents of each, combined by the caller) and each id's newest events by the
/// `(distinct_id, timestamp DESC)` index, the newest of those kept; last, each id's person
/// property times (properties stored without times count as set at the id's `last_seen`), which
/// the caller combines. No row: `$1` belongs to no person, or nothing is stored for it.
/// Parameters and `{filters}` as [`CONTEXT_SQL`]'s.
pub const PERSON_CONTEXT_SQL: &str = r#"WITH person AS MATERIALIZED (
  SELECT array_agg(o.distinct_id ORDER BY o.distinct_id COLLATE "C") AS ids
    FROM person_distinct_ids o
   WHERE o.person_id = (SELECT m.person_id FROM person_distinct_ids m WHERE m.distinct_id = $1))
SELECT min(p.first_seen), max(p.last_seen), sum(p.event_count)::int8,
  CASE WHEN count(*) = 1 THEN sum(p.session_count)::int8
       ELSE (SELECT count(DISTINCT s.session_id) FROM user_sessions s
              WHERE s.distinct_id = ANY(person.ids)) END,
  json_agg(p.intents),
  (SELECT coalesce(json_agg(json_build_array(h.t, h.d, h.e, h.p, h.s) ORDER BY h.t DESC, h.u DESC), '[]')
     FROM (SELECT x.* FROM unnest(person.ids) AS i(id) CROSS JOIN LATERAL
            (SELECT "timestamp" AS t, description AS d, event AS e, coalesce(path, url) AS p,
                    session_id AS s, uuid AS u
               FROM events
              WHERE distinct_id = i.id AND description IS NOT NULL{filters}
              ORDER BY "timestamp" DESC, uuid DESC
              LIMIT {limit}) x
           ORDER BY x.t DESC, x.u DESC
           LIMIT {limit}) h),
  person.ids,
  json_agg(coalesce(p.person_property_times,
    (SELECT jsonb_object_agg(e.key, jsonb_build_object('s', jsonb_build_array(e.value, to_jsonb(p.last_seen))))
       FROM jsonb_each(CASE WHEN jsonb_typeof(p.person_properties) = 'object'
                            THEN p.person_properties END) AS e)))
    FILTER (WHERE p.person_property_times IS NOT NULL OR p.person_properties IS NOT NULL)
FROM person JOIN user_profiles p ON p.distinct_id = ANY(person.ids)
GROUP BY person.ids"#;

/// [`CONTEXT_SQL`] for `filter`: `since` binds as `$2`, `session` as the next parameter.
pub fn context_sql(filter: &HistoryFilter) -> String {
    with_filters(CONTEXT_SQL, filter)
}

/// [`PERSON_CONTEXT_SQL`] for `filter`, bound as [`context_sql`]'s.
pub fn person_context_sql(filter: &HistoryFilter) -> String {
    with_filters(PERSON_CONTEXT_SQL, filter)
}

fn with_filters(sql: &str, filter: &HistoryFilter) -> String {
    let mut filters = String::new();
    let mut next = 2;
    if filter.since.is_some() {
        filters.push_str(&format!(r#" AND "timestamp" >= ${next}"#));
        next += 1;
    }
    if filter.session.is_some() {
        filters.push_str(&format!(" AND session_id = ${next}"));
    }
    sql.replace("{filters}", &filters)
        .replace("{limit}", &filter.limit.to_string())
}

/// One history entry as [`CONTEXT_SQL`] and [`PERSON_CONTEXT_SQL`] write it:
/// `[time, description, event, page, session]`.
pub type HistoryTuple = (
    super::json::PgTime,
    String,
    String,
    Option<String>,
    Option<String>,
);

impl From<HistoryTuple> for HistoryItem {
    fn from((time, description, event, page, session_id): HistoryTuple) -> Self {
        HistoryItem {
            time: time.0,
            description,
            event,
            page,
            session_id,
        }
    }
}

/// The profiles and newest events of the person `user_id` belongs to, or `None` when nothing
/// is stored for them. Most ids belong to no person: one statement. The ids of a person (or an
/// id with nothing stored of its own) take a second, over every id of the person.
pub async fn user_record(
    conns: &ReadConnections,
    user_id: &str,
    filter: &HistoryFilter,
) -> Result<Option<UserRecord>, DbErr> {
    let decode = |e: sqlx::Error| DbErr::Type(e.to_string());
    let row = fetch(conns, context_sql(filter), user_id, filter).await?;
    if let Some(row) = &row
        && row.try_get::<Option<i64>, _>(6).map_err(decode)?.is_none()
    {
        let Json(intents): Json<Intents> = row.try_get(4).map_err(decode)?;
        let person_properties = match row.try_get::<Option<Json<Value>>, _>(7).map_err(decode)? {
            Some(Json(Value::Object(map))) => map,
            _ => Map::new(),
        };
        return record(row, vec![user_id.to_string()], intents, person_properties).map(Some);
    }
    let Some(row) = fetch(conns, person_context_sql(filter), user_id, filter).await? else {
        return Ok(None);
    };
    let Json(intents): Json<Vec<Intents>> = row.try_get(4).map_err(decode)?;
    let distinct_ids = row.try_get(6).map_err(decode)?;
    let times: Option<Json<Vec<Option<PropertyTimes>>>> = row.try_get(7).map_err(decode)?;
    let times = person_properties::combine(times.into_iter().flat_map(|Json(t)| t).flatten());
    record(
        &row,
        distinct_ids,
        super::combine_intents(intents),
        person_properties::resolve(&times),
    )
    .map(Some)
}

/// The record of a row of [`CONTEXT_SQL`] or [`PERSON_CONTEXT_SQL`] (columns by position, in the
/// order of their select lists), given its ids, intents and person properties.
fn record(
    row: &sqlx::postgres::PgRow,
    distinct_ids: Vec<String>,
    intents: Intents,
    person_properties: Map<String, Value>,
) -> Result<UserRecord, DbErr> {
    let decode = |e: sqlx::Error| DbErr::Type(e.to_string());
    let Json(history): Json<Vec<HistoryTuple>> = row.try_get(5).map_err(decode)?;
    Ok(UserRecord {
        distinct_ids,
        first_seen: row.try_get(0).map_err(decode)?,
        last_seen: row.try_get(1).map_err(decode)?,
        event_count: row.try_get(2).map_err(decode)?,
        session_count: row.try_get(3).map_err(decode)?,
        intents,
        person_properties,
        history: history.into_iter().map(HistoryItem::from).collect(),
    })
}

/// Runs `sql` (fixed text and the numeric limit only; values are bound) for `user_id`.
async fn fetch(
    conns: &ReadConnections,
    sql: String,
    user_id: &str,
    filter: &HistoryFilter,
) -> Result<Option<sqlx::postgres::PgRow>, DbErr> {
    let sql: std::sync::Arc<str> = sql.into();
    // Each lost connection is dropped, and a new one's failure is final: at most every kept
    // connection plus one new one are tried.
    let mut attempts = conns.max() + 1;
    loop {
        attempts -= 1;
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(user_id);
        if let Some(since) = filter.since {
            query = query.bind(since);
        }
        if let Some(session) = filter.session.as_deref() {
            query = query.bind(session);
        }
        let mut conn = conns.acquire().await.map_err(db_err)?;
        match query.fetch_optional(&mut *conn).await {
            Ok(row) => {
                conn.release();
                return Ok(row);
            }
            // A kept connection the server closed meanwhile (a restart, an idle timeout): the
            // read is retried on the next one, and at last on a new connection.
            Err(e) if attempts > 0 && conn.reused() && is_connection_lost(&e) => {
                tracing::debug!(error = %e, "context read: kept connection lost, retrying");
            }
            Err(e) => return Err(db_err(e)),
        }
    }
}

/// Errors that mean the connection is gone, not that the statement failed.
fn is_connection_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        // Class 08 (connection exception, e.g. from a pooler) and 57P0x: the backend was
        // terminated (administrator, shutdown, crash, idle_session_timeout).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}
