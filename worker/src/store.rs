//! Postgres side: turning an enriched envelope into a row, and storing a batch exactly once.
//!
//! One transaction per batch: the events insert, then sessions and profile writes for the rows
//! that insert actually created, so a redelivered event is neither stored nor counted twice. The
//! insert (a `COPY`) assumes every event is new and fails if one is stored already; the batch is
//! then written again with `INSERT … ON CONFLICT (uuid) DO NOTHING RETURNING uuid`. Rows are
//! written in key order (events by uuid, profiles by distinct_id) so concurrent replicas lock in
//! the same order and do not deadlock.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use chrono::{DateTime, Utc};
use entity::{
    Envelope, EnvelopeError,
    envelope::scan::{decode_some, has_lone_surrogate},
    user_profile::Intents,
};
use sea_orm::{
    ConnectOptions, Database, DatabaseConnection, DbErr,
    sqlx::{self, Row, types::Json as SqlJson},
};
use serde_json::{Map, Value as Json, value::RawValue};
use uuid::Uuid;

use infra::postgres::StoreError;
use rules_engine::enrich::{Enrichment, IntentHit, Ruleset, url_path};

use crate::{
    config::Config,
    profile::{PersonUpdate, ProfileDelta, ProfileRow},
    sanitize,
};

/// The properties a row is built from (beside those the rules read): page URL and path, session,
/// elements chain, and the person properties an event sets.
pub const STORED_PROPERTIES: [&str; 6] = [
    "$current_url",
    "$pathname",
    "$session_id",
    "elements_chain",
    "$set",
    "$set_once",
];

/// Decodes a stream entry (its fields by name) for [`StoredEvent::new`]: the envelope with only
/// the properties `ruleset` reads and the row is built from ([`STORED_PROPERTIES`]) decoded, and
/// all of them as the entry carries them (stored as they are). Decoding every property (a
/// posthog-js event carries 30 or more), encoding them again and dropping them was about a third
/// of the worker's CPU. Text with an escaped NUL has all of them decoded, to be cleaned.
///
/// Undecodable as before: not UTF-8, not JSON, a field of the wrong type, properties that are not
/// an object or hold a lone UTF-16 surrogate (not Unicode: Postgres would refuse the whole batch).
/// What changed: `"properties": null` is no properties (was undecodable), and a property no rule
/// reads may hold a number beyond a double (`1e400`, was undecodable): Postgres stores it.
pub fn decode<'e>(
    field: impl FnMut(&str) -> Option<&'e [u8]>,
    ruleset: &dyn Ruleset,
) -> Result<(Envelope, Option<&'e str>), EnvelopeError> {
    let envelope: Envelope<Option<&RawValue>> = Envelope::from_fields(field)?;
    let Some(written) = envelope.properties.map(RawValue::get) else {
        return Ok((envelope.with_properties(Map::new()), None));
    };
    if has_lone_surrogate(written.as_bytes()) {
        return Err(EnvelopeError::Json(serde::de::Error::custom(
            "`properties` hold a lone UTF-16 surrogate escape (not Unicode)",
        )));
    }
    let all = sanitize::may_hold_nul(written);
    let properties = decode_some(written, |key| {
        all || STORED_PROPERTIES.contains(&key) || ruleset.reads_property(key)
    })?;
    Ok((envelope.with_properties(properties), Some(written)))
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
    /// The `properties` column: JSON text without NUL characters.
    pub properties: String,
    pub url: Option<String>,
    pub path: Option<String>,
    pub session_id: Option<String>,
    pub elements_chain: Option<String>,
    pub timestamp: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub person: Option<PersonUpdate>,
}

impl StoredEvent {
    /// Builds the row for an enriched envelope. `written` is the envelope's `properties` as the
    /// stream entry carries them ([`decode`]), when the caller has them:
    /// - that text is stored as it is, unless it holds an escaped NUL character (encoding the
    ///   decoded map again took about a tenth of the worker's CPU), and `envelope.properties`
    ///   need only hold [`STORED_PROPERTIES`];
    /// - with a NUL, `envelope.properties` must hold them all: they are cleaned and encoded, as
    ///   they are without `written`.
    pub fn new(envelope: Envelope, enrichment: Enrichment, written: Option<&str>) -> Self {
        let written = written.filter(|text| !sanitize::may_hold_nul(text));
        let mut properties = envelope.properties;
        if written.is_none() {
            sanitize::object(&mut properties);
        }
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
        let properties = match written {
            Some(text) => text.to_string(),
            None => serde_json::to_string(&properties).unwrap_or_else(|_| "{}".into()),
        };
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

/// Planner settings of the worker's connections (sent at connect, no round trip): every statement
/// here joins a batch's keys (`unnest` of one array per column) to `user_profiles` by its primary
/// key, which must be an index probe per key.
///
/// - Hash and merge joins off. sqlx keeps the statements prepared, and Postgres plans each once
///   for any batch (a generic plan, guessing 10 keys), from the table's size at that moment:
///   planned while the table was small (a new deployment, the first minutes after a start), the
///   join became a hash join over a full scan of `user_profiles`, kept while the table grew until
///   an ANALYZE of it replanned (autovacuum's, a minute or more apart), and each batch read the
///   whole table twice (lock, update): at 5,000 users, 3–5 ms a statement. Without hash and merge
///   joins the only plan left is the index probe per key.
/// - Generic plans always (`plan_cache_mode`). Postgres otherwise plans a statement again for
///   each execution as long as that looks cheaper than its generic plan, which for the small
///   batches of a quiet stream (a few events each) is always: at 1,000 events/s, planning took
///   about an eighth of Postgres' time. With the joins above the generic plan is the one a
///   custom plan would choose.
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
    INSERT_NEW_EVENTS,
    INSERT_SESSIONS_AND_NEW_PROFILES,
    INSERT_NEW_PROFILES,
    LOCK_PROFILES,
    UPDATE_PROFILES,
    UPSERT_COUNTS,
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
/// and prepares every batch statement on each, so that the first batches after a start do not
/// wait for a connection to open (about 90 ms here, most of it the TLS handshake) or for
/// Postgres to load its catalogs. At 1,000 events/s that cold start delayed the first events by
/// 100–200 ms. Best effort: the caller goes on without it when Postgres is not there yet.
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

/// What storing a batch did with its events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Events stored (new rows; the batch's others were stored before, or erased).
    pub stored: usize,
    /// Events dropped because their user was erased after they were received (a tombstone in
    /// `erasures`, see [`infra::erasure`]): done, not lost.
    pub erased: usize,
}

/// Stores a batch in one transaction. Events already stored (redeliveries) are skipped and not
/// counted again; events of users erased after they were received are dropped (the
/// transaction's first statement waits for any erasure of the batch's users in progress, then
/// reads their tombstones: [`infra::erasure::lock_shared`]).
///
/// Events are written with `COPY` ([`COPY_EVENTS`]). Every other table is written by one statement
/// of fixed text whatever the batch size, its rows passed as one array per column and expanded by
/// `unnest`: Postgres parses and plans each statement once per connection (sqlx keeps it
/// prepared), and a batch costs one round trip per table, where a multi-row `VALUES` list had to
/// be parsed and planned anew for every batch.
#[tracing::instrument(name = "db.transaction", skip_all, fields(otel.kind = "client", db.system = "postgresql", events = events.len()))]
pub async fn write_batch(
    db: &DatabaseConnection,
    known: &KnownProfiles,
    events: &[StoredEvent],
    rules_version: &str,
) -> Result<Written, StoreError> {
    let mut sorted: Vec<&StoredEvent> = events.iter().collect();
    sorted.sort_by_key(|e| e.uuid);
    sorted.dedup_by_key(|e| e.uuid);
    match write_sorted(db, known, &sorted, rules_version, Inserts::AllNew).await {
        Err(error) if error.is_stored_event() => {
            tracing::debug!("batch holds events stored before: writing it again without them");
            write_sorted(db, known, &sorted, rules_version, Inserts::SkipStored).await
        }
        written => written,
    }
}

/// Users whose profile row this worker has seen committed. Their batches skip creating it (the
/// first step of [`upsert_profiles`]): an insert that finds the row there still probes the
/// table's key. With most events of a batch from different users (a drain of 200,000 events of
/// 5,000 users), skipping it took about 7% less CPU per event.
///
/// Never wrong for long: a profile erased since (`DELETE` by the api) is found missing when the
/// batch locks its users' profiles, and created then (as one deleted between the two statements
/// always was). Holds at most [`KNOWN_PROFILES_MAX`] users, and starts again empty when full.
#[derive(Debug, Default)]
pub struct KnownProfiles(std::sync::Mutex<HashSet<String>>);

/// Most users [`KnownProfiles`] holds: about 6 MiB.
pub const KNOWN_PROFILES_MAX: usize = 100_000;

impl KnownProfiles {
    /// The deltas of users not known to have a profile.
    fn unknown<'d>(&self, deltas: &'d [ProfileDelta]) -> Vec<&'d ProfileDelta> {
        let known = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        deltas
            .iter()
            .filter(|d| !known.contains(&d.distinct_id))
            .collect()
    }

    /// Records that these users' profiles are committed.
    fn remember(&self, users: Vec<String>) {
        let mut known = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for user in users {
            if known.len() >= KNOWN_PROFILES_MAX {
                known.clear();
            }
            known.insert(user);
        }
    }
}

/// [`write_batch`] of events sorted by uuid, distinct. A batch dropped part way (timed out, or
/// the worker stopping) may leave its connection inside the `COPY`: sqlx tests each connection
/// given back to the pool, and closes such a one (tested in `tests/pipeline.rs`).
async fn write_sorted(
    db: &DatabaseConnection,
    known: &KnownProfiles,
    sorted: &[&StoredEvent],
    rules_version: &str,
    inserts: Inserts,
) -> Result<Written, StoreError> {
    let started = std::time::Instant::now();
    let mut txn = db.get_postgres_connection_pool().begin().await?;
    let mut users: Vec<&str> = sorted.iter().map(|e| e.distinct_id.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    let tombstones = infra::erasure::lock_shared(&mut txn, &users).await?;
    let received = sorted.len();
    let kept: Vec<&StoredEvent>;
    let sorted = if tombstones.is_empty() {
        sorted
    } else {
        kept = sorted
            .iter()
            .copied()
            .filter(|e| !tombstones.erases(&e.distinct_id, Some(e.received_at)))
            .collect();
        &kept[..]
    };
    let erased = received - sorted.len();
    let new: Vec<&StoredEvent> = if sorted.is_empty() {
        Vec::new()
    } else {
        match insert_events(&mut txn, sorted, rules_version, inserts).await? {
            None => sorted.to_vec(),
            Some(created) => sorted
                .iter()
                .copied()
                .filter(|e| created.contains(&e.uuid))
                .collect(),
        }
    };
    let events_done = started.elapsed();
    let mut sessions_done = events_done;
    let mut created: Vec<String> = Vec::new();
    if !new.is_empty() {
        let mut deltas: BTreeMap<&str, ProfileDelta> = BTreeMap::new();
        for e in &new {
            let delta = deltas
                .entry(&e.distinct_id)
                .or_insert_with(|| ProfileDelta::new(e.distinct_id.clone(), e.timestamp));
            delta.add_event(e.timestamp, &e.intents, &e.description, e.person.clone());
        }
        let mut deltas: Vec<ProfileDelta> = deltas.into_values().collect();
        let unknown = known.unknown(&deltas);
        let new_sessions = insert_sessions_and_new_profiles(&mut txn, &new, &unknown).await?;
        created = unknown.iter().map(|d| d.distinct_id.clone()).collect();
        sessions_done = started.elapsed();
        for delta in &mut deltas {
            delta.new_sessions = new_sessions.get(&delta.distinct_id).copied().unwrap_or(0);
        }
        upsert_profiles(&mut txn, &deltas).await?;
    }
    let profiles_done = started.elapsed();
    txn.commit().await?;
    known.remember(created);
    tracing::trace!(events = ?events_done, sessions = ?sessions_done, profiles = ?profiles_done, total = ?started.elapsed(), "batch transaction");
    Ok(Written {
        stored: new.len(),
        erased,
    })
}

type Txn = sqlx::Transaction<'static, sqlx::Postgres>;

/// Most bytes of column data per events statement: a batch of large events is sent as several
/// statements, as Postgres refuses a message over 1 GiB.
const STATEMENT_BYTES: usize = 32 << 20;

/// The columns of `events` a batch writes, in the order [`COPY_EVENTS`] and [`INSERT_NEW_EVENTS`]
/// take them (and [`copy_events`] and [`insert_event_rows`] give them).
macro_rules! event_columns {
    () => {
        r#"events (rules_version, uuid, distinct_id, event, description, rule_id, intents,
    properties, url, path, session_id, elements_chain, "timestamp", received_at)"#
    };
}

/// Like [`COPY_EVENTS`], skipping the events already stored; returns the uuids it created.
const INSERT_NEW_EVENTS: &str = concat!(
    "INSERT INTO ",
    event_columns!(),
    r#"
SELECT $1, u, d, e, ds, r, i::jsonb, p::jsonb, url, path, s, ec, t, ra
  FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
              $9::text[], $10::text[], $11::text[], $12::text[], $13::timestamptz[], $14::timestamptz[])
       AS x(u, d, e, ds, r, i, p, url, path, s, ec, t, ra)
ON CONFLICT (uuid) DO NOTHING RETURNING uuid"#
);

/// Rows in `uuid` order (the order they are sent in, so concurrent replicas lock alike), all
/// new: `COPY` fails on the first one already stored (`23505` on `events_pkey`), and the batch
/// is then written again with [`INSERT_NEW_EVENTS`]. Stored events are rare (redeliveries,
/// clients retrying). Postgres takes less time over a `COPY` than over an `INSERT` of the same
/// rows (no arrays to build and expand, rows written to the table in groups): in a one-worker
/// drain, the events of a 500-event batch took 11.7 ms against 15.1 ms with
/// `INSERT … SELECT FROM unnest(…)`.
const COPY_EVENTS: &str = concat!("COPY ", event_columns!(), " FROM STDIN (FORMAT binary)");

/// How a batch's events are inserted.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Inserts {
    /// All are new ([`COPY_EVENTS`]), or the transaction fails with
    /// [`StoreError::is_stored_event`].
    AllNew,
    /// Some may be stored already ([`INSERT_NEW_EVENTS`]).
    SkipStored,
}

/// Inserts the events (sorted by uuid, distinct); returns the uuids the insert created, or
/// `None` for all of them ([`Inserts::AllNew`]).
async fn insert_events(
    txn: &mut Txn,
    events: &[&StoredEvent],
    rules_version: &str,
    inserts: Inserts,
) -> Result<Option<HashSet<Uuid>>, StoreError> {
    // The intents column encoded once.
    let intents: Vec<String> = events
        .iter()
        .map(|e| e.intents_json().to_string())
        .collect();
    if inserts == Inserts::AllNew {
        copy_events(txn, events, &intents, rules_version).await?;
        return Ok(None);
    }
    let size = |i: usize| {
        let e = events[i];
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        64 + intents[i].len()
            + e.properties.len()
            + e.distinct_id.len()
            + e.event.len()
            + e.description.len()
            + text(&e.rule_id)
            + text(&e.url)
            + text(&e.path)
            + text(&e.session_id)
            + text(&e.elements_chain)
    };
    let mut created = HashSet::with_capacity(events.len());
    let mut start = 0;
    while start < events.len() {
        let (mut end, mut bytes) = (start + 1, size(start));
        while end < events.len() && bytes + size(end) <= STATEMENT_BYTES {
            bytes += size(end);
            end += 1;
        }
        let (rows, intents) = (&events[start..end], &intents[start..end]);
        for row in insert_event_rows(rows, intents, rules_version)
            .fetch_all(&mut **txn)
            .await?
        {
            created.insert(row.try_get(0)?);
        }
        start = end;
    }
    Ok(Some(created))
}

/// Bytes of `COPY` data sent to Postgres at a time: what a batch of large events holds in memory
/// beyond the events themselves.
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// Writes `events` (whose intents columns are `intents`) with [`COPY_EVENTS`].
async fn copy_events(
    txn: &mut Txn,
    events: &[&StoredEvent],
    intents: &[String],
    rules_version: &str,
) -> Result<(), StoreError> {
    let mut copy = txn.copy_in_raw(COPY_EVENTS).await?;
    let mut rows = crate::pgcopy::CopyBinary::new(COPY_CHUNK_BYTES + (64 << 10));
    for (e, intents) in events.iter().zip(intents) {
        rows.row(14);
        rows.text(Some(rules_version));
        rows.uuid(e.uuid);
        rows.text(Some(&e.distinct_id));
        rows.text(Some(&e.event));
        rows.text(Some(&e.description));
        rows.text(e.rule_id.as_deref());
        rows.jsonb(intents);
        rows.jsonb(&e.properties);
        rows.text(e.url.as_deref());
        rows.text(e.path.as_deref());
        rows.text(e.session_id.as_deref());
        rows.text(e.elements_chain.as_deref());
        rows.timestamptz(e.timestamp);
        rows.timestamptz(e.received_at);
        if rows.len() >= COPY_CHUNK_BYTES {
            copy.send(rows.take()).await?;
        }
    }
    rows.end();
    copy.send(rows.take()).await?;
    copy.finish().await?;
    Ok(())
}

/// [`INSERT_NEW_EVENTS`] for `events`, whose intents columns are `intents`.
fn insert_event_rows<'q>(
    events: &'q [&StoredEvent],
    intents: &'q [String],
    rules_version: &'q str,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(INSERT_NEW_EVENTS)
        .bind(rules_version)
        .bind(column(events, |e| e.uuid))
        .bind(column(events, |e| e.distinct_id.as_str()))
        .bind(column(events, |e| e.event.as_str()))
        .bind(column(events, |e| e.description.as_str()))
        .bind(column(events, |e| e.rule_id.as_deref()))
        .bind(column(intents, String::as_str))
        .bind(column(events, |e| e.properties.as_str()))
        .bind(column(events, |e| e.url.as_deref()))
        .bind(column(events, |e| e.path.as_deref()))
        .bind(column(events, |e| e.session_id.as_deref()))
        .bind(column(events, |e| e.elements_chain.as_deref()))
        .bind(column(events, |e| e.timestamp))
        .bind(column(events, |e| e.received_at))
}

/// The text of [`INSERT_NEW_PROFILES`], which [`INSERT_SESSIONS_AND_NEW_PROFILES`] embeds.
macro_rules! insert_new_profiles {
    () => {
        "INSERT INTO user_profiles (distinct_id, first_seen, last_seen) \
         SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) \
         ON CONFLICT (distinct_id) DO NOTHING"
    };
}

/// Creates a bare profile (no events counted yet) for each user that has none; existing ones are
/// neither changed nor locked. Rows go in distinct_id order, as `unnest` yields them.
const INSERT_NEW_PROFILES: &str = insert_new_profiles!();

/// Sessions of new events, in (distinct_id, session_id) order, with the missing profiles created
/// bare in the same round trip (see [`INSERT_NEW_PROFILES`], its parameters first, and
/// [`upsert_profiles`]).
const INSERT_SESSIONS_AND_NEW_PROFILES: &str = concat!(
    "WITH new_profiles AS (",
    insert_new_profiles!(),
    ") INSERT INTO user_sessions (distinct_id, session_id, first_seen) \
     SELECT * FROM unnest($4::text[], $5::text[], $6::timestamptz[]) \
     ON CONFLICT (distinct_id, session_id) DO NOTHING RETURNING distinct_id"
);

/// Records sessions of newly stored events (if any) and creates the missing profiles of `deltas`
/// bare; returns per user how many sessions were new. No round trip when there is neither.
async fn insert_sessions_and_new_profiles(
    txn: &mut Txn,
    events: &[&StoredEvent],
    deltas: &[&ProfileDelta],
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
    if sessions.is_empty() && deltas.is_empty() {
        return Ok(counts);
    }
    let (mut users, mut ids, mut firsts) = (Vec::new(), Vec::new(), Vec::new());
    for ((user, session), first) in sessions {
        users.push(user);
        ids.push(session);
        firsts.push(first);
    }
    let created: Vec<String> = sqlx::query_scalar(INSERT_SESSIONS_AND_NEW_PROFILES)
        .bind(column(deltas, |d| d.distinct_id.as_str()))
        .bind(column(deltas, |d| d.first_seen))
        .bind(column(deltas, |d| d.last_seen))
        .bind(users)
        .bind(ids)
        .bind(firsts)
        .fetch_all(&mut **txn)
        .await?;
    for user in created {
        *counts.entry(user).or_insert(0) += 1;
    }
    Ok(counts)
}

/// One value per row, as the array bound for an `unnest` column.
fn column<'a, R, T>(rows: &'a [R], value: impl Fn(&'a R) -> T) -> Vec<T> {
    rows.iter().map(value).collect()
}

/// A profile write: the delta's counts and times, and the intents and person properties to store
/// (JSON encoded once), or `None` to keep the stored ones.
struct ProfileParams<'a> {
    delta: &'a ProfileDelta,
    details: Option<(String, Option<String>)>,
}

impl<'a> ProfileParams<'a> {
    /// Writes `row`'s intents and person properties.
    fn with_details(delta: &'a ProfileDelta, row: &ProfileRow) -> Self {
        let intents = serde_json::to_string(&row.intents).unwrap_or_else(|_| "{}".into());
        let person = row
            .person_properties
            .as_ref()
            .and_then(|p| serde_json::to_string(p).ok());
        Self {
            delta,
            details: Some((intents, person)),
        }
    }

    /// Keeps the stored intents and person properties.
    fn counts_only(delta: &'a ProfileDelta) -> Self {
        Self {
            delta,
            details: None,
        }
    }

    fn intents(&self) -> Option<&str> {
        self.details.as_ref().map(|(intents, _)| intents.as_str())
    }

    fn person(&self) -> Option<&str> {
        self.details
            .as_ref()
            .and_then(|(_, person)| person.as_deref())
    }
}

/// A stored profile's intents and person properties.
struct StoredDetails {
    intents: Intents,
    person: Option<Map<String, Json>>,
}

impl StoredDetails {
    /// Columns 1 and 2 of a `LOCK_PROFILES` row: `intents` and `person_properties`, or `None`
    /// when the batch carries no details for this user (the lock then reads them as NULL;
    /// `intents` is never NULL in the table).
    fn read(row: &sqlx::postgres::PgRow, distinct_id: &str) -> Result<Option<Self>, StoreError> {
        let intents = match row.try_get::<Option<SqlJson<Intents>>, _>(1) {
            Ok(None) => return Ok(None),
            Ok(Some(SqlJson(intents))) => intents,
            Err(err) => {
                tracing::warn!(%distinct_id, error = %err, "stored intents unreadable: starting them afresh");
                Intents::new()
            }
        };
        let person = match row.try_get::<Option<SqlJson<Json>>, _>(2)? {
            Some(SqlJson(Json::Object(map))) => Some(map),
            _ => None,
        };
        Ok(Some(Self { intents, person }))
    }
}

/// Locks the batch's profiles in distinct_id byte order (as Rust sorts; `COLLATE "C"`) and reads
/// the details of those whose delta carries some.
pub const LOCK_PROFILES: &str = "SELECT p.distinct_id, CASE WHEN x.details THEN p.intents END, \
       CASE WHEN x.details THEN p.person_properties END \
     FROM user_profiles AS p JOIN unnest($1::text[], $2::bool[]) AS x(d, details) \
       ON p.distinct_id = x.d \
     ORDER BY p.distinct_id COLLATE \"C\" FOR UPDATE OF p";

/// Adds the deltas to the (locked) profiles; details are replaced where given.
pub const UPDATE_PROFILES: &str = "UPDATE user_profiles AS p SET \
       first_seen = LEAST(p.first_seen, x.f), last_seen = GREATEST(p.last_seen, x.l), \
       event_count = p.event_count + x.c, session_count = p.session_count + x.s, \
       intents = CASE WHEN x.m THEN x.i::jsonb ELSE p.intents END, \
       person_properties = CASE WHEN x.m THEN x.pp::jsonb ELSE p.person_properties END, \
       updated_at = now() \
     FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::int8[], $5::int8[], \
                 $6::bool[], $7::text[], $8::text[]) AS x(d, f, l, c, s, m, i, pp) \
     WHERE p.distinct_id = x.d";

/// Adds the deltas of a batch without any details: one sorted pass that locks and updates each
/// row (one missing, deleted since the worker saw it or in between, is created again, and needs
/// no details).
const UPSERT_COUNTS: &str = "INSERT INTO user_profiles AS p (distinct_id, first_seen, last_seen, \
       event_count, session_count) \
     SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::int8[], $5::int8[]) \
     ON CONFLICT (distinct_id) DO UPDATE SET first_seen = LEAST(p.first_seen, EXCLUDED.first_seen), \
       last_seen = GREATEST(p.last_seen, EXCLUDED.last_seen), \
       event_count = p.event_count + EXCLUDED.event_count, \
       session_count = p.session_count + EXCLUDED.session_count, updated_at = now()";

/// Rounds of create-then-lock before giving up on a batch whose profiles keep disappearing
/// (deleted by a cleanup between the two statements); the batch is then retried as a whole.
const PROFILE_ROUNDS: usize = 3;

/// Creates the profiles of `deltas` that do not exist yet, bare.
async fn insert_new_profiles(txn: &mut Txn, deltas: &[&ProfileDelta]) -> Result<(), StoreError> {
    sqlx::query(INSERT_NEW_PROFILES)
        .bind(column(deltas, |d| d.distinct_id.as_str()))
        .bind(column(deltas, |d| d.first_seen))
        .bind(column(deltas, |d| d.last_seen))
        .execute(&mut **txn)
        .await?;
    Ok(())
}

/// Adds the deltas (sorted by distinct_id) to their users' profiles, each row written once:
/// 1. create the missing profiles bare (`ON CONFLICT DO NOTHING`: existing ones are not locked).
///    [`insert_sessions_and_new_profiles`] has done this for the users not in [`KnownProfiles`],
///    in the same statement as the sessions; it is repeated here only for profiles found missing
///    by step 2 (deleted since the worker saw them, or in between);
/// 2. lock all the batch's profiles and read the details of those whose delta carries intents or
///    person properties;
/// 3. one UPDATE adds counts and times in SQL and writes the merged details.
///
/// A batch without any details does 2 and 3 as one sorted upsert of the counts.
///
/// Each statement takes its row locks in distinct_id order, and step 1 only ever waits for
/// another transaction's new rows, never for rows locked in step 2, so concurrent replicas wait
/// for each other without deadlocking.
async fn upsert_profiles(txn: &mut Txn, deltas: &[ProfileDelta]) -> Result<(), StoreError> {
    if !deltas.iter().any(ProfileDelta::has_details) {
        sqlx::query(UPSERT_COUNTS)
            .bind(column(deltas, |d| d.distinct_id.as_str()))
            .bind(column(deltas, |d| d.first_seen))
            .bind(column(deltas, |d| d.last_seen))
            .bind(column(deltas, |d| d.events))
            .bind(column(deltas, |d| d.new_sessions))
            .execute(&mut **txn)
            .await?;
        return Ok(());
    }
    let mut locked: HashMap<String, Option<StoredDetails>> = HashMap::new();
    let mut missing: Vec<&ProfileDelta> = deltas.iter().collect();
    for round in 0..PROFILE_ROUNDS {
        if round > 0 {
            insert_new_profiles(txn, &missing).await?;
        }
        let rows = sqlx::query(LOCK_PROFILES)
            .bind(column(&missing, |d| d.distinct_id.as_str()))
            .bind(column(&missing, |d| d.has_details()))
            .fetch_all(&mut **txn)
            .await?;
        for row in rows {
            let distinct_id: String = row.try_get(0)?;
            let details = StoredDetails::read(&row, &distinct_id)?;
            locked.insert(distinct_id, details);
        }
        missing.retain(|d| !locked.contains_key(&d.distinct_id));
        if missing.is_empty() {
            break;
        }
    }
    if !missing.is_empty() {
        return Err(StoreError::Db(DbErr::Custom(format!(
            "{} profiles were deleted while this batch was adding to them",
            missing.len()
        ))));
    }
    let updates: Vec<ProfileParams> = deltas
        .iter()
        .map(|delta| match locked.remove(&delta.distinct_id).flatten() {
            Some(stored) => ProfileParams::with_details(
                delta,
                &ProfileRow::merged(delta, stored.intents, stored.person),
            ),
            None => ProfileParams::counts_only(delta),
        })
        .collect();
    sqlx::query(UPDATE_PROFILES)
        .bind(column(&updates, |p| p.delta.distinct_id.as_str()))
        .bind(column(&updates, |p| p.delta.first_seen))
        .bind(column(&updates, |p| p.delta.last_seen))
        .bind(column(&updates, |p| p.delta.events))
        .bind(column(&updates, |p| p.delta.new_sessions))
        .bind(column(&updates, |p| p.details.is_some()))
        .bind(column(&updates, ProfileParams::intents))
        .bind(column(&updates, ProfileParams::person))
        .execute(&mut **txn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {

    use super::*;
    use rules_engine::enrich::{Fallback, fallback};

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
        let row = StoredEvent::new(envelope, enrichment, None);
        assert_eq!(row.distinct_id, "u1");
        assert_eq!(row.path.as_deref(), Some("/pricing"));
        assert_eq!(row.url.as_deref(), Some("https://x.test/pricing?x=1"));
        assert_eq!(row.session_id.as_deref(), Some("s1"));
        assert_eq!(row.description, "Viewed page: /pricing");
        let properties: Json = serde_json::from_str(&row.properties).unwrap();
        assert_eq!(properties["badkey"], "v");
        let person = row.person.unwrap();
        assert_eq!(person.set["plan"], "pro");
        assert_eq!(person.set["email"], "a@x.test");
    }

    /// Decoding skips the properties neither the rules nor the row read, and refuses entries that
    /// are not Unicode JSON, whether or not the rules read the offending property.
    #[test]
    fn decoding_skips_unread_properties_and_refuses_what_is_not_unicode_json() {
        struct Reads(&'static str);
        impl Ruleset for Reads {
            fn version(&self) -> &str {
                "test"
            }
            fn enrich(
                &self,
                event: &Envelope,
            ) -> Result<Enrichment, rules_engine::enrich::EnrichError> {
                Ok(fallback(event))
            }
            fn reads_property(&self, key: &str) -> bool {
                key == self.0
            }
        }
        let decode_with = |properties: &[u8]| {
            let mut entry = format!(
                r#"{{"uuid":"{}","distinct_id":"u","event":"e","timestamp":"2026-11-28T10:00:00Z","received_at":"2026-11-28T10:00:01Z","properties":"#,
                Uuid::now_v7()
            )
            .into_bytes();
            entry.extend_from_slice(properties);
            entry.push(b'}');
            let fields = |name: &str| match name {
                "v" => Some(&b"1"[..]),
                _ => Some(&entry[..]),
            };
            decode(fields, &Reads("plan"))
                .map(|(envelope, written)| (envelope.properties, written.map(str::to_owned)))
        };
        let text =
            r#"{"plan": "pro", "big": 1e400, "$pathname": "/p", "other": [{"x": "\ud83d\ude00"}]}"#;
        let (properties, written) = decode_with(text.as_bytes()).unwrap();
        assert_eq!(
            Json::Object(properties),
            serde_json::json!({"plan": "pro", "$pathname": "/p"})
        );
        assert_eq!(written.as_deref(), Some(text));
        assert_eq!(decode_with(b"{}").unwrap().0, Map::new());
        // `null` is no properties, as a missing `properties` is.
        assert_eq!(decode_with(b"null").unwrap(), (Map::new(), None));
        let refused: [&[u8]; 5] = [
            br#"{"other": "\ud800"}"#,
            b"{\"other\": \"\xff\"}",
            b"[1]",
            br#"{"plan": 1e400}"#,
            br#"{"other": "x"#,
        ];
        for bad in refused {
            assert!(decode_with(bad).is_err(), "{}", bad.escape_ascii());
        }
    }

    /// The properties text an entry carries is stored as written (numbers beyond f64, escapes,
    /// spacing), unless it holds an escaped NUL: then the decoded properties are cleaned and
    /// encoded, as without it.
    #[test]
    fn properties_are_stored_as_written_unless_they_hold_a_nul() {
        let row = |text: &str| {
            let entry = format!(
                r#"{{"uuid":"{}","distinct_id":"u","event":"e","properties":{text},"timestamp":"2026-11-28T10:00:00Z","received_at":"2026-11-28T10:00:01Z"}}"#,
                Uuid::now_v7()
            );
            let fields = |name: &str| match name {
                "v" => Some(&b"1"[..]),
                _ => Some(entry.as_bytes()),
            };
            let (envelope, written) = decode(fields, &Fallback).unwrap();
            assert_eq!(written, Some(text));
            let enrichment = fallback(&envelope);
            StoredEvent::new(envelope, enrichment, written)
        };
        let text =
            r#"{ "n": 12345678901234567890, "s": "\u00e9\ud83d\ude00", "$session_id": "s1" }"#;
        let stored = row(text);
        assert_eq!(stored.properties, text);
        assert_eq!(stored.session_id.as_deref(), Some("s1"));

        let stored = row(r#"{"a\u0000": "b\u0000c", "k": 1}"#);
        assert_eq!(stored.properties, r#"{"a":"bc","k":1}"#);
        // An escaped backslash before `u0000` is no NUL, but is taken the careful way: same text.
        let stored = row(r#"{"a": "\\u0000"}"#);
        assert_eq!(stored.properties, r#"{"a":"\\u0000"}"#);
    }
}
