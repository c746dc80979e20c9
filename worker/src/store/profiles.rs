//! The profile and session rows of a batch: which users are known to have a profile, and the
//! statements that create, lock and add to profiles in distinct_id order.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use entity::person_properties::{self, PropertyTimes};
use entity::user_profile::Intents;
use sea_orm::{
    DbErr,
    sqlx::{self, Row, types::Json as SqlJson},
};
use serde_json::Value as Json;

use infra::postgres::StoreError;

use super::{StoredEvent, Txn, column};
use crate::profile::{ProfileDelta, ProfileRow};

/// Users whose profile row this worker has seen committed. Their batches skip creating it (the
/// first step of [`upsert_profiles`]): an insert that finds the row there still probes the
/// table's key, for each user of each batch.
///
/// Never wrong for long: a profile erased since (`DELETE` by the api) is found missing when the
/// batch locks its users' profiles, and created then (as one deleted between the two statements
/// always was). Holds at most [`KNOWN_PROFILES_MAX`] users, and starts again empty when full.
#[derive(Debug, Default)]
pub struct KnownProfiles(std::sync::Mutex<HashSet<String>>);

/// Most users [`KnownProfiles`] holds, which bounds its memory.
pub const KNOWN_PROFILES_MAX: usize = 100_000;

impl KnownProfiles {
    /// The deltas of users not known to have a profile.
    pub(super) fn unknown<'d>(&self, deltas: &'d [ProfileDelta]) -> Vec<&'d ProfileDelta> {
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
    pub(super) fn remember(&self, users: Vec<String>) {
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

/// What the newly stored `events` add to each of their users' profiles, in distinct_id order.
/// Ignored events (no description) add nothing.
pub(super) fn deltas(events: &[&StoredEvent]) -> Vec<ProfileDelta> {
    let mut deltas: BTreeMap<&str, ProfileDelta> = BTreeMap::new();
    for e in events {
        let Some(description) = e.description.as_deref() else {
            continue;
        };
        let delta = deltas
            .entry(&e.distinct_id)
            .or_insert_with(|| ProfileDelta::new(e.distinct_id.clone(), e.timestamp));
        delta.add_event(e.timestamp, &e.intents, description, e.person.clone());
    }
    deltas.into_values().collect()
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
pub(super) const INSERT_NEW_PROFILES: &str = insert_new_profiles!();

/// Sessions of new events, in (distinct_id, session_id) order, with the missing profiles created
/// bare in the same round trip (see [`INSERT_NEW_PROFILES`], its parameters first, and
/// [`upsert_profiles`]).
pub(super) const INSERT_SESSIONS_AND_NEW_PROFILES: &str = concat!(
    "WITH new_profiles AS (",
    insert_new_profiles!(),
    ") INSERT INTO user_sessions (distinct_id, session_id, first_seen) \
     SELECT * FROM unnest($4::text[], $5::text[], $6::timestamptz[]) \
     ON CONFLICT (distinct_id, session_id) DO NOTHING RETURNING distinct_id"
);

/// Records sessions of newly stored events (if any) and creates the missing profiles of `deltas`
/// bare; returns per user how many sessions were new. No round trip when there is neither.
pub(super) async fn insert_sessions_and_new_profiles(
    txn: &mut Txn,
    events: &[&StoredEvent],
    deltas: &[&ProfileDelta],
) -> Result<HashMap<String, i64>, StoreError> {
    let mut sessions: BTreeMap<(&str, &str), DateTime<Utc>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.description.is_some()) {
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

/// A profile write: the delta's counts and times, and the intents and person properties (with
/// their times) to store, JSON encoded once, or `None` to keep the stored ones.
struct ProfileParams<'a> {
    delta: &'a ProfileDelta,
    details: Option<Details>,
}

/// The JSON texts of a profile's intents, person properties and their times.
struct Details {
    intents: String,
    person: Option<String>,
    person_times: Option<String>,
}

impl<'a> ProfileParams<'a> {
    /// Writes `row`'s intents and person properties.
    fn with_details(delta: &'a ProfileDelta, row: &ProfileRow) -> Self {
        fn text<T: serde::Serialize>(value: Option<&T>) -> Option<String> {
            value.and_then(|v| serde_json::to_string(v).ok())
        }
        Self {
            delta,
            details: Some(Details {
                intents: serde_json::to_string(&row.intents).unwrap_or_else(|_| "{}".into()),
                person: text(row.person_properties().as_ref()),
                person_times: text(row.person_property_times.as_ref()),
            }),
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
        self.details.as_ref().map(|d| d.intents.as_str())
    }

    fn person(&self) -> Option<&str> {
        self.details.as_ref().and_then(|d| d.person.as_deref())
    }

    fn person_times(&self) -> Option<&str> {
        self.details
            .as_ref()
            .and_then(|d| d.person_times.as_deref())
    }
}

/// A stored profile's intents and person property times.
struct StoredDetails {
    intents: Intents,
    person: Option<PropertyTimes>,
}

impl StoredDetails {
    /// Columns 1 to 4 of a `LOCK_PROFILES` row: `intents`, `person_property_times`,
    /// `person_properties` and `last_seen`, or `None` when the batch carries no details for this
    /// user (the lock then reads them as NULL; `intents` is never NULL in the table). Properties
    /// stored without times (by a worker of an earlier version) count as set at `last_seen`.
    fn read(row: &sqlx::postgres::PgRow, distinct_id: &str) -> Result<Option<Self>, StoreError> {
        let intents = match row.try_get::<Option<SqlJson<Intents>>, _>(1) {
            Ok(None) => return Ok(None),
            Ok(Some(SqlJson(intents))) => intents,
            Err(err) => {
                tracing::warn!(%distinct_id, error = %err, "stored intents unreadable: starting them afresh");
                Intents::new()
            }
        };
        let person = match row.try_get::<Option<SqlJson<PropertyTimes>>, _>(2) {
            Ok(Some(SqlJson(times))) => Some(times),
            Ok(None) => match row.try_get::<Option<SqlJson<Json>>, _>(3)? {
                Some(SqlJson(Json::Object(map))) => {
                    Some(person_properties::stamped_at(&map, row.try_get(4)?))
                }
                _ => None,
            },
            Err(err) => {
                tracing::warn!(%distinct_id, error = %err, "stored person property times unreadable: starting them afresh");
                None
            }
        };
        Ok(Some(Self { intents, person }))
    }
}

/// Locks the batch's profiles in distinct_id byte order (as Rust sorts; `COLLATE "C"`) and reads
/// the details of those whose delta carries some.
pub const LOCK_PROFILES: &str = "SELECT p.distinct_id, CASE WHEN x.details THEN p.intents END, \
       CASE WHEN x.details THEN p.person_property_times END, \
       CASE WHEN x.details THEN p.person_properties END, p.last_seen \
     FROM user_profiles AS p JOIN unnest($1::text[], $2::bool[]) AS x(d, details) \
       ON p.distinct_id = x.d \
     ORDER BY p.distinct_id COLLATE \"C\" FOR UPDATE OF p";

/// Adds the deltas to the (locked) profiles; details are replaced where given.
pub const UPDATE_PROFILES: &str = "UPDATE user_profiles AS p SET \
       first_seen = LEAST(p.first_seen, x.f), last_seen = GREATEST(p.last_seen, x.l), \
       event_count = p.event_count + x.c, session_count = p.session_count + x.s, \
       intents = CASE WHEN x.m THEN x.i::jsonb ELSE p.intents END, \
       person_properties = CASE WHEN x.m THEN x.pp::jsonb ELSE p.person_properties END, \
       person_property_times = CASE WHEN x.m THEN x.pt::jsonb ELSE p.person_property_times END, \
       updated_at = now() \
     FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[], $4::int8[], $5::int8[], \
                 $6::bool[], $7::text[], $8::text[], $9::text[]) AS x(d, f, l, c, s, m, i, pp, pt) \
     WHERE p.distinct_id = x.d";

/// Adds the deltas of a batch without any details: one sorted pass that locks and updates each
/// row (one missing, deleted since the worker saw it or in between, is created again, and needs
/// no details).
pub(super) const UPSERT_COUNTS: &str = "INSERT INTO user_profiles AS p (distinct_id, first_seen, last_seen, \
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
pub(super) async fn upsert_profiles(
    txn: &mut Txn,
    deltas: &[ProfileDelta],
) -> Result<(), StoreError> {
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
        .bind(column(&updates, ProfileParams::person_times))
        .execute(&mut **txn)
        .await?;
    Ok(())
}
