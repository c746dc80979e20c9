//! Postgres side: turning an enriched envelope into a row, and storing a batch exactly once.
//!
//! One transaction per batch: a multi-row `INSERT … ON CONFLICT (uuid) DO NOTHING RETURNING uuid`,
//! then sessions and profile upserts for the rows that insert actually created, so a redelivered
//! event is neither stored nor counted twice. Rows are written in key order (events by uuid,
//! profiles by distinct_id) so concurrent replicas lock in the same order and do not deadlock.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    time::Duration,
};

use chrono::{DateTime, Utc};
use entity::{Envelope, user_profile::Intents};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, RuntimeErr, Statement, TransactionTrait, Value,
};
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use crate::{
    config::Config,
    enrich::{Enrichment, IntentHit, url_path},
    profile::{PersonUpdate, ProfileDelta, ProfileRow},
    sanitize,
};

/// Rows per statement, keeping bind parameters under Postgres' 65535.
const ROWS_PER_STATEMENT: usize = 2000;
/// Approximate encoded size per event insert statement. sqlx 0.9.0 leaves Nagle's algorithm on
/// (sqlx issue #4335): a statement larger than the socket's send buffer (16 KiB on Linux by
/// default) is written in two parts and the second waits ~40 ms for a delayed ACK. Several smaller
/// statements cost a round trip each (~0.1 ms) instead.
const STATEMENT_BYTES: usize = 12 * 1024;

/// Why a batch was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    #[error("database did not answer within {0:?}")]
    Timeout(Duration),
}

impl StoreError {
    /// The data of some event was rejected (SQLSTATE class 22 data exception, 23 integrity,
    /// 54 limit exceeded): retrying the same batch cannot succeed. Everything else (connection
    /// lost, timeouts, deadlocks, missing tables) is treated as transient.
    pub fn is_data_error(&self) -> bool {
        let Self::Db(
            DbErr::Exec(RuntimeErr::SqlxError(err)) | DbErr::Query(RuntimeErr::SqlxError(err)),
        ) = self
        else {
            return false;
        };
        match err.as_ref() {
            sea_orm::sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54")),
            _ => false,
        }
    }
}

/// An event ready to be written: enriched, with NUL characters removed.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub uuid: Uuid,
    pub distinct_id: String,
    pub event: String,
    pub description: String,
    pub rule_id: Option<String>,
    pub intents: Vec<IntentHit>,
    pub properties: Map<String, Json>,
    pub url: Option<String>,
    pub path: Option<String>,
    pub session_id: Option<String>,
    pub elements_chain: Option<String>,
    pub timestamp: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub person: Option<PersonUpdate>,
}

impl StoredEvent {
    /// Builds the row for an enriched envelope.
    pub fn new(envelope: Envelope, enrichment: Enrichment) -> Self {
        let mut properties = envelope.properties;
        sanitize::object(&mut properties);
        let prop_str = |key: &str| {
            properties
                .get(key)
                .and_then(Json::as_str)
                .filter(|s| !s.is_empty())
        };
        let url = prop_str("$current_url").map(str::to_string);
        let path = prop_str("$pathname")
            .map(str::to_string)
            .or_else(|| url.as_deref().and_then(url_path).map(str::to_string));
        let session_id = envelope
            .session_id
            .or_else(|| prop_str("$session_id").map(str::to_string));
        let elements_chain = envelope
            .elements_chain
            .or_else(|| prop_str("elements_chain").map(str::to_string));

        let mut person = PersonUpdate::default();
        if let Some(p) = envelope.person {
            person.set.extend(p.properties);
        }
        if let Some(Json::Object(set)) = properties.get("$set") {
            person
                .set
                .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        if let Some(Json::Object(once)) = properties.get("$set_once") {
            person
                .set_once
                .extend(once.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        sanitize::object(&mut person.set);
        sanitize::object(&mut person.set_once);

        let intents = enrichment
            .intents
            .into_iter()
            .map(|mut hit| {
                hit.name = sanitize::shared_text(hit.name);
                hit.summary = sanitize::shared_text(hit.summary);
                hit
            })
            .collect();
        Self {
            uuid: envelope.uuid,
            distinct_id: sanitize::text(envelope.distinct_id),
            event: sanitize::text(envelope.event),
            description: sanitize::text(enrichment.description),
            rule_id: enrichment.rule_id.map(|r| sanitize::text(r.to_string())),
            intents,
            properties,
            url: url.map(sanitize::text),
            path: path.map(sanitize::text),
            session_id: session_id.map(sanitize::text),
            elements_chain: elements_chain.map(sanitize::text),
            timestamp: envelope.timestamp,
            received_at: envelope.received_at,
            person: (!person.is_empty()).then_some(person),
        }
    }

    /// The `intents` column: weight per intent name.
    pub fn intents_json(&self) -> Json {
        let mut map = Map::new();
        for hit in &self.intents {
            let total = map.get(&*hit.name).and_then(Json::as_f64).unwrap_or(0.0) + hit.weight;
            map.insert(hit.name.to_string(), Json::from(total));
        }
        Json::Object(map)
    }
}

/// A lazily connecting pool: the worker starts (and retries) while Postgres is down.
pub async fn connect(config: &Config) -> Result<DatabaseConnection, StoreError> {
    let mut options = ConnectOptions::new(config.database_url.clone());
    options
        .max_connections(config.database_pool_size)
        .min_connections(config.write_concurrency as u32)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        .statement_timeout(Duration::from_secs(30))
        // No ping round trip before each batch; connections idle for a while are still checked.
        .test_before_acquire_if_idle_for(Duration::from_secs(10))
        .connect_lazy(true)
        .sqlx_logging(false);
    Ok(Database::connect(options).await?)
}

/// Stores a batch in one transaction; returns how many events were new.
/// Events already stored (redeliveries) are skipped and not counted again.
#[tracing::instrument(name = "db.transaction", skip_all, fields(otel.kind = "client", db.system = "postgresql", events = events.len()))]
pub async fn write_batch(
    db: &DatabaseConnection,
    events: &[StoredEvent],
    rules_version: &str,
) -> Result<usize, StoreError> {
    let mut sorted: Vec<&StoredEvent> = events.iter().collect();
    sorted.sort_by_key(|e| e.uuid);
    sorted.dedup_by_key(|e| e.uuid);
    let started = std::time::Instant::now();
    let txn = db.begin().await?;
    let mut inserted = HashSet::with_capacity(sorted.len());
    let rows: Vec<EventRow> = sorted.iter().map(|e| EventRow::new(e)).collect();
    for chunk in chunks_by_size(&rows, |r| r.bytes) {
        inserted.extend(insert_events(&txn, chunk, rules_version).await?);
    }
    let events_done = started.elapsed();
    let new: Vec<&StoredEvent> = sorted
        .into_iter()
        .filter(|e| inserted.contains(&e.uuid))
        .collect();
    if !new.is_empty() {
        let new_sessions = insert_sessions(&txn, &new).await?;
        let mut deltas: BTreeMap<&str, ProfileDelta> = BTreeMap::new();
        for e in &new {
            let delta = deltas
                .entry(&e.distinct_id)
                .or_insert_with(|| ProfileDelta::new(e.distinct_id.clone(), e.timestamp));
            delta.add_event(e.timestamp, &e.intents, &e.description, e.person.clone());
        }
        for (distinct_id, count) in new_sessions {
            if let Some(delta) = deltas.get_mut(distinct_id.as_str()) {
                delta.new_sessions = count;
            }
        }
        let deltas: Vec<ProfileDelta> = deltas.into_values().collect();
        upsert_profiles(&txn, &deltas).await?;
    }
    let profiles_done = started.elapsed();
    txn.commit().await?;
    tracing::trace!(events = ?events_done, profiles = ?profiles_done, total = ?started.elapsed(), "batch transaction");
    Ok(new.len())
}

/// Consecutive runs of `items` of at most [`STATEMENT_BYTES`] (but at least one item) and at most
/// [`ROWS_PER_STATEMENT`] items each, in order.
fn chunks_by_size<T>(items: &[T], size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        if i > start && (bytes + n > STATEMENT_BYTES || i - start >= ROWS_PER_STATEMENT) {
            chunks.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

/// Opens row `row` of a multi-row `VALUES` list: `,(` (no comma for the first row), then `lead`,
/// then one placeholder per entry of `casts` numbered from `first` (`$7::jsonb`; `""` = no cast).
/// The caller closes the row.
fn open_row(sql: &mut String, row: usize, lead: &str, first: usize, casts: &[&str]) {
    sql.push_str(if row == 0 { "(" } else { ",(" });
    sql.push_str(lead);
    for (j, cast) in casts.iter().enumerate() {
        let _ = write!(sql, "{}${}", if j == 0 { "" } else { "," }, first + j);
        if !cast.is_empty() {
            let _ = write!(sql, "::{cast}");
        }
    }
}

/// An event's column values, encoded once (JSON as text, cast to jsonb by the statement).
struct EventRow<'a> {
    event: &'a StoredEvent,
    intents: String,
    properties: String,
    /// Approximate size on the wire.
    bytes: usize,
}

impl<'a> EventRow<'a> {
    fn new(event: &'a StoredEvent) -> Self {
        let intents = event.intents_json().to_string();
        let properties = serde_json::to_string(&event.properties).unwrap_or_else(|_| "{}".into());
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let bytes = 13 * 8
            + 16
            + 2 * 8
            + event.distinct_id.len()
            + event.event.len()
            + event.description.len()
            + text(&event.rule_id)
            + intents.len()
            + properties.len()
            + text(&event.url)
            + text(&event.path)
            + text(&event.session_id)
            + text(&event.elements_chain);
        Self {
            event,
            intents,
            properties,
            bytes,
        }
    }
}

async fn insert_events(
    txn: &DatabaseTransaction,
    rows: &[EventRow<'_>],
    rules_version: &str,
) -> Result<Vec<Uuid>, StoreError> {
    const COLUMNS: usize = 13;
    let mut sql = String::with_capacity(200 + rows.len() * 120);
    sql.push_str(
        "INSERT INTO events (rules_version, uuid, distinct_id, event, description, rule_id, intents, properties, \
         url, path, session_id, elements_chain, \"timestamp\", received_at) VALUES ",
    );
    let mut values: Vec<Value> = Vec::with_capacity(1 + rows.len() * COLUMNS);
    values.push(rules_version.into());
    for (i, row) in rows.iter().enumerate() {
        open_row(
            &mut sql,
            i,
            "$1,",
            2 + i * COLUMNS,
            &["", "", "", "", "", "jsonb", "jsonb", "", "", "", "", "", ""],
        );
        sql.push(')');
        let e = row.event;
        values.extend([
            e.uuid.into(),
            e.distinct_id.clone().into(),
            e.event.clone().into(),
            e.description.clone().into(),
            e.rule_id.clone().into(),
            row.intents.clone().into(),
            row.properties.clone().into(),
            e.url.clone().into(),
            e.path.clone().into(),
            e.session_id.clone().into(),
            e.elements_chain.clone().into(),
            e.timestamp.into(),
            e.received_at.into(),
        ]);
    }
    sql.push_str(" ON CONFLICT (uuid) DO NOTHING RETURNING uuid");
    let rows = txn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            values,
        ))
        .await?;
    rows.iter()
        .map(|r| r.try_get::<Uuid>("", "uuid").map_err(StoreError::from))
        .collect()
}

/// Records sessions of newly stored events; returns per user how many sessions were new.
async fn insert_sessions(
    txn: &DatabaseTransaction,
    events: &[&StoredEvent],
) -> Result<HashMap<String, i64>, StoreError> {
    let mut sessions: BTreeMap<(&str, &str), DateTime<Utc>> = BTreeMap::new();
    for e in events {
        if let Some(session) = e.session_id.as_deref() {
            let first = sessions
                .entry((&e.distinct_id, session))
                .or_insert(e.timestamp);
            *first = (*first).min(e.timestamp);
        }
    }
    let mut counts = HashMap::new();
    let sessions: Vec<_> = sessions.into_iter().collect();
    for chunk in chunks_by_size(&sessions, |((user, session), _)| {
        40 + user.len() + session.len()
    }) {
        let mut sql =
            String::from("INSERT INTO user_sessions (distinct_id, session_id, first_seen) VALUES ");
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 3);
        for (i, ((user, session), first)) in chunk.iter().enumerate() {
            open_row(&mut sql, i, "", 1 + i * 3, &["", "", ""]);
            sql.push(')');
            values.extend([
                user.to_string().into(),
                session.to_string().into(),
                (*first).into(),
            ]);
        }
        sql.push_str(" ON CONFLICT (distinct_id, session_id) DO NOTHING RETURNING distinct_id");
        for row in txn
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                values,
            ))
            .await?
        {
            *counts
                .entry(row.try_get::<String>("", "distinct_id")?)
                .or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// A profile row's column values, JSON encoded once.
struct ProfileParams {
    distinct_id: String,
    row: ProfileRow,
    intents: String,
    person: Option<String>,
    bytes: usize,
}

impl ProfileParams {
    fn new(distinct_id: String, row: ProfileRow) -> Self {
        let intents = serde_json::to_string(&row.intents).unwrap_or_else(|_| "{}".into());
        let person = row
            .person_properties
            .as_ref()
            .and_then(|p| serde_json::to_string(p).ok());
        let bytes = 64 + distinct_id.len() + intents.len() + person.as_ref().map_or(0, String::len);
        Self {
            distinct_id,
            row,
            intents,
            person,
            bytes,
        }
    }

    /// `$n::text, $n::timestamptz, … $n::jsonb` for row `i`, and its values.
    fn push(&self, i: usize, sql: &mut String, values: &mut Vec<Value>) {
        open_row(
            sql,
            i,
            "",
            1 + i * 7,
            &[
                "text",
                "timestamptz",
                "timestamptz",
                "bigint",
                "bigint",
                "jsonb",
                "jsonb",
            ],
        );
        values.extend([
            self.distinct_id.clone().into(),
            self.row.first_seen.into(),
            self.row.last_seen.into(),
            self.row.event_count.into(),
            self.row.session_count.into(),
            self.intents.clone().into(),
            self.person.clone().into(),
        ]);
    }
}

/// Upserts profiles in one statement per size chunk, in distinct_id order so concurrent replicas
/// lock rows alike: counts and times merge in SQL; for existing users whose delta carries intents
/// or person properties, those are merged here and written back (rows already locked).
async fn upsert_profiles(
    txn: &DatabaseTransaction,
    deltas: &[ProfileDelta],
) -> Result<(), StoreError> {
    let fresh: Vec<ProfileParams> = deltas
        .iter()
        .map(|d| ProfileParams::new(d.distinct_id.clone(), ProfileRow::from_delta(d)))
        .collect();
    let by_id: HashMap<&str, &ProfileDelta> =
        deltas.iter().map(|d| (d.distinct_id.as_str(), d)).collect();
    let mut details: Vec<(String, String, Option<String>)> = Vec::new();
    for chunk in chunks_by_size(&fresh, |p| p.bytes) {
        let mut sql = String::from(
            "INSERT INTO user_profiles AS p (distinct_id, first_seen, last_seen, event_count, session_count, \
             intents, person_properties, updated_at) VALUES ",
        );
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 7);
        for (i, params) in chunk.iter().enumerate() {
            params.push(i, &mut sql, &mut values);
            sql.push_str(",now())");
        }
        sql.push_str(
            " ON CONFLICT (distinct_id) DO UPDATE SET first_seen = LEAST(p.first_seen, EXCLUDED.first_seen), \
             last_seen = GREATEST(p.last_seen, EXCLUDED.last_seen), \
             event_count = p.event_count + EXCLUDED.event_count, \
             session_count = p.session_count + EXCLUDED.session_count, updated_at = now() \
             RETURNING p.distinct_id, (p.xmax = 0) AS created, p.intents, p.person_properties",
        );
        let rows = txn
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                sql,
                values,
            ))
            .await?;
        for row in rows {
            let distinct_id: String = row.try_get("", "distinct_id")?;
            let Some(delta) = by_id.get(distinct_id.as_str()).filter(|d| d.has_details()) else {
                continue;
            };
            if row.try_get::<bool>("", "created")? {
                continue;
            }
            let intents: Intents = serde_json::from_value(row.try_get::<Json>("", "intents")?).unwrap_or_else(|err| {
                tracing::warn!(%distinct_id, error = %err, "stored intents unreadable: starting them afresh");
                Intents::new()
            });
            let person = match row.try_get::<Option<Json>>("", "person_properties")? {
                Some(Json::Object(map)) => Some(map),
                _ => None,
            };
            let mut profile = ProfileRow::from_delta(delta);
            profile.intents = intents;
            profile.person_properties = person;
            profile.apply_details(delta);
            let params = ProfileParams::new(distinct_id, profile);
            details.push((params.distinct_id, params.intents, params.person));
        }
    }
    for chunk in chunks_by_size(&details, |(id, intents, person)| {
        32 + id.len() + intents.len() + person.as_ref().map_or(0, String::len)
    }) {
        let mut sql = String::from(
            "UPDATE user_profiles AS p SET intents = v.intents, person_properties = v.person_properties \
             FROM (VALUES ",
        );
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * 3);
        for (i, (distinct_id, intents, person)) in chunk.iter().enumerate() {
            open_row(&mut sql, i, "", 1 + i * 3, &["text", "jsonb", "jsonb"]);
            sql.push(')');
            values.extend([
                distinct_id.clone().into(),
                intents.clone().into(),
                person.clone().into(),
            ]);
        }
        sql.push_str(
            ") AS v(distinct_id, intents, person_properties) WHERE p.distinct_id = v.distinct_id",
        );
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            sql,
            values,
        ))
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn values_rows_number_their_placeholders() {
        let mut sql = String::new();
        super::open_row(&mut sql, 0, "$1,", 2, &["", "jsonb"]);
        sql.push(')');
        super::open_row(&mut sql, 1, "$1,", 4, &["", "jsonb"]);
        sql.push(')');
        assert_eq!(sql, "($1,$2,$3::jsonb),($1,$4,$5::jsonb)");
    }

    use super::*;
    use crate::enrich::fallback;

    #[test]
    fn statements_are_chunked_by_size_in_order() {
        let sizes = [5_000, 5_000, 5_000, 20_000, 1, 1];
        let chunks = chunks_by_size(&sizes, |n| *n);
        assert_eq!(
            chunks,
            [&sizes[0..2], &sizes[2..3], &sizes[3..4], &sizes[4..6]]
        );
        assert!(chunks_by_size(&[] as &[usize], |n| *n).is_empty());
    }

    #[test]
    fn row_fields_come_from_the_envelope_and_are_sanitised() {
        let envelope: Envelope = serde_json::from_value(serde_json::json!({
            "uuid": Uuid::now_v7(),
            "distinct_id": "u\u{0}1",
            "event": "$pageview",
            "properties": {
                "$current_url": "https://x.test/pricing?x=1",
                "$session_id": "s1",
                "$set": {"email": "a@x.test"},
                "bad\u{0}key": "v\u{0}"
            },
            "timestamp": "2026-11-28T10:00:00Z",
            "received_at": "2026-11-28T10:00:01Z",
            "person": {"properties": {"plan": "pro"}}
        }))
        .unwrap();
        let enrichment = fallback(&envelope);
        let row = StoredEvent::new(envelope, enrichment);
        assert_eq!(row.distinct_id, "u1");
        assert_eq!(row.path.as_deref(), Some("/pricing"));
        assert_eq!(row.url.as_deref(), Some("https://x.test/pricing?x=1"));
        assert_eq!(row.session_id.as_deref(), Some("s1"));
        assert_eq!(row.description, "Viewed page: /pricing");
        assert_eq!(row.properties["badkey"], "v");
        let person = row.person.unwrap();
        assert_eq!(person.set["plan"], "pro");
        assert_eq!(person.set["email"], "a@x.test");
    }
}
