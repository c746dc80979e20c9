//! Erasure: removing a user from everything this system holds, for good.
//!
//! An erasure (the api's `DELETE /context/user/:id`, [`erase_stored`]) records a tombstone
//! (table `erasures`: the SHA-256 of the `distinct_id` and `erased_at`, the api's clock) and
//! deletes the user's rows. Events of the user received (`received_at`, also
//! the api's clock) at or before `erased_at` are dropped wherever they turn up later: a worker
//! batch still holding them, the stream's backlog, a retry, a `dlq replay`. Events received after
//! it are new activity and are stored.
//!
//! Erasures and the writers that could bring a user back are serialised by Postgres advisory
//! locks on buckets of users ([`bucket`]): an erasure holds its users' buckets exclusively, and
//! every worker batch transaction (the worker's `store::write_batch`), dead-lettering and unmatched
//! report flush holds its users' buckets shared, taken first and then reading the tombstones
//! ([`lock_shared`]). So a writer either committed before the erasure took its lock (the erasure
//! then deletes what it wrote) or reads the erasure's tombstone (and drops what it covers); a
//! batch open while the user is erased never resurrects them.
//!
//! Everything that takes user ids takes a list: erasing a person means erasing all their
//! `distinct_id`s at once. [`erase_stored`] finds every id of the persons it is given (table
//! `person_distinct_ids`); [`forget_persons`] drops their mapping once everything else is erased,
//! so an erasure that stops part way (Redis down) and is retried with any one id still finds
//! them all. The workers also read the tombstones of the ids identity calls name, so a merge
//! never maps an erased id again.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    DatabaseConnection,
    sqlx::{self, Row},
};

use crate::postgres::StoreError;

/// First key of the advisory locks on user buckets (the two-key form, a key space apart from
/// the one-key locks such as `migration::MIGRATION_LOCK_KEY`): "ersr" in ASCII.
pub const LOCK_CLASS: i32 = 0x65_72_73_72;

/// Number of user buckets. A batch holds at most this many locks (Postgres' lock table is shared
/// by every connection: about 6,400 entries with the default settings), and an erasure waits
/// only for the batches that hold its bucket.
pub const BUCKETS: u32 = 64;

/// The lock bucket of a `distinct_id`: FNV-1a of its UTF-8 bytes, modulo [`BUCKETS`]. Fixed
/// (not Rust's `DefaultHasher`, which may change between compiler releases): the api and every
/// worker replica must agree on it.
pub fn bucket(distinct_id: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in distinct_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % BUCKETS) as i32
}

/// The buckets of `ids`, sorted and distinct: every transaction takes its locks in this order,
/// so erasures and batches never deadlock.
pub fn buckets<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<i32> {
    let mut buckets: Vec<i32> = ids.into_iter().map(bucket).collect();
    buckets.sort_unstable();
    buckets.dedup();
    buckets
}

/// The tombstones of some users: when each was last erased.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tombstones(HashMap<String, DateTime<Utc>>);

impl Tombstones {
    /// The tombstones of `ids`, all erased at `erased_at`.
    pub fn of(ids: &[&str], erased_at: DateTime<Utc>) -> Self {
        Self(ids.iter().map(|id| (id.to_string(), erased_at)).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// When `distinct_id` was last erased, if it was.
    pub fn erased_at(&self, distinct_id: &str) -> Option<DateTime<Utc>> {
        self.0.get(distinct_id).copied()
    }

    /// Whether an event of `distinct_id` received at `received_at` is erased: received at or
    /// before the user's erasure. `None` (unknown time) counts as before.
    pub fn erases(&self, distinct_id: &str, received_at: Option<DateTime<Utc>>) -> bool {
        self.erased_at(distinct_id)
            .is_some_and(|erased_at| received_at.is_none_or(|r| r <= erased_at))
    }
}

/// The first statement of a transaction that may write data of `ids` (distinct): takes the
/// shared locks of their buckets, then reads their tombstones (function `erasures_locked`, one
/// round trip). An erasure of one of them waits until the transaction ends; one that committed
/// while these locks were waited for is in the answer.
pub const LOCK_SHARED: &str = "SELECT distinct_id, erased_at FROM erasures_locked($1, $2, $3)";

/// [`LOCK_SHARED`] on `txn` for the users `ids` (distinct).
pub async fn lock_shared(
    txn: &mut sqlx::PgConnection,
    ids: &[&str],
) -> Result<Tombstones, StoreError> {
    let rows = sqlx::query(LOCK_SHARED)
        .bind(LOCK_CLASS)
        .bind(buckets(ids.iter().copied()))
        .bind(ids)
        .fetch_all(txn)
        .await?;
    let mut tombstones = HashMap::with_capacity(rows.len());
    for row in rows {
        tombstones.insert(row.try_get(0)?, row.try_get(1)?);
    }
    Ok(Tombstones(tombstones))
}

/// Runs `write` (a write outside Postgres, e.g. to Redis, of data of the users `ids`) under the
/// shared locks of their buckets, given their tombstones: an erasure either sees what `write`
/// wrote (it takes its lock once `write` is done) or is in the tombstones. The transaction
/// writes nothing itself. `write`'s own error is returned as its value.
pub async fn guarded<T>(
    db: &DatabaseConnection,
    ids: &[&str],
    write: impl AsyncFnOnce(&Tombstones) -> T,
) -> Result<T, StoreError> {
    let mut txn = db.get_postgres_connection_pool().begin().await?;
    let tombstones = lock_shared(&mut txn, ids).await?;
    let written = write(&tombstones).await;
    txn.commit().await?;
    Ok(written)
}

/// `time` rounded up to the microsecond, Postgres' precision: the time an erasure records, so
/// that every event received before the erasure was asked for (`received_at` carries
/// nanoseconds) counts as received at or before it.
pub fn round_up_to_micros(time: DateTime<Utc>) -> DateTime<Utc> {
    let below = time.timestamp_subsec_nanos() % 1000;
    if below == 0 {
        time
    } else {
        time + chrono::Duration::nanoseconds(i64::from(1000 - below))
    }
}

/// What an erasure removed from Postgres.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErasedRows {
    pub events: u64,
    pub sessions: u64,
    pub profiles: u64,
    /// Every id erased: those asked for and the other ids of their persons, sorted.
    pub distinct_ids: Vec<String>,
}

/// Takes the buckets of the users exclusively (`$2`, sorted), after which [`ERASE_ROWS`] sees
/// every batch that was writing them as committed.
const LOCK_EXCLUSIVE: &str =
    "SELECT count(pg_advisory_xact_lock($1, b)) FROM unnest($2::int4[]) AS b";

/// Records the tombstones (`erased_at` only ever moves forward) and deletes the users' rows;
/// answers how many rows of each table.
const ERASE_ROWS: &str = r#"WITH tombstones AS (
    INSERT INTO erasures (id_sha256, erased_at)
    SELECT DISTINCT sha256(convert_to(d, 'UTF8')), $2::timestamptz FROM unnest($1::text[]) AS d
    ON CONFLICT (id_sha256) DO UPDATE SET erased_at = GREATEST(erasures.erased_at, EXCLUDED.erased_at)
), events AS (
    DELETE FROM events WHERE distinct_id = ANY($1) RETURNING 1
), sessions AS (
    DELETE FROM user_sessions WHERE distinct_id = ANY($1) RETURNING 1
), profiles AS (
    DELETE FROM user_profiles WHERE distinct_id = ANY($1) RETURNING 1
)
SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM sessions),
       (SELECT count(*) FROM profiles)"#;

/// The ids of the persons of `$1` (those of no person are not in the answer).
const PERSON_IDS: &str = "SELECT m.distinct_id FROM person_distinct_ids AS m \
     WHERE m.person_id IN (SELECT o.person_id FROM person_distinct_ids AS o WHERE o.distinct_id = ANY($1))";

/// Drops the mapping rows of the ids `$1`, then their persons left without any id (an id that
/// joined one after the erasure, as new activity, keeps it).
const DELETE_PERSONS: &str = "WITH mapping AS (\
     DELETE FROM person_distinct_ids WHERE distinct_id = ANY($1) RETURNING person_id) \
     SELECT DISTINCT person_id FROM mapping";
const DELETE_PERSON_ROWS: &str = "DELETE FROM persons AS p WHERE p.id = ANY($1) \
     AND NOT EXISTS (SELECT 1 FROM person_distinct_ids AS m WHERE m.person_id = p.id)";

/// Rounds of locking before an erasure gives up, should merges keep adding ids to the person.
const ERASE_ROUNDS: usize = 8;

/// Deletes the users' events before the locked part of an erasure: the bulk of the work (a
/// user with 100,000 events took 1.2 s here), done while worker batches go on.
const DELETE_EVENTS: &str = "DELETE FROM events WHERE distinct_id = ANY($1)";

/// Erases the users `ids` and every other id of their persons from Postgres as of `erased_at`:
/// records their tombstones and deletes their events, sessions and profiles; the person mapping
/// stays until [`forget_persons`], the last step of an erasure. The
/// events stored so far are deleted first, on their own; then one transaction holding the users'
/// buckets exclusively (it waits for the worker batches writing them, and batches of users of
/// those buckets wait for it: a few milliseconds) records the tombstones and deletes the rest.
/// Should a merge have added an id to the person meanwhile, that transaction starts again with
/// it. Until it commits a read may see the profile without its events; should it fail, the
/// events are gone and erasing again finishes the rest.
pub async fn erase_stored(
    db: &DatabaseConnection,
    ids: &[&str],
    erased_at: DateTime<Utc>,
) -> Result<ErasedRows, StoreError> {
    let pool = db.get_postgres_connection_pool();
    let mut ids = with_person_ids(pool, ids.iter().map(|id| id.to_string()).collect()).await?;
    let mut early = sqlx::query(DELETE_EVENTS)
        .bind(&ids)
        .execute(pool)
        .await?
        .rows_affected();
    for _ in 0..ERASE_ROUNDS {
        let mut txn = pool.begin().await?;
        sqlx::query(LOCK_EXCLUSIVE)
            .bind(LOCK_CLASS)
            .bind(buckets(ids.iter().map(String::as_str)))
            .execute(&mut *txn)
            .await?;
        // Merges that committed while the locks were waited for are seen now; later ones wait.
        let locked = with_person_ids(&mut *txn, ids.clone()).await?;
        if locked.len() > ids.len() {
            txn.rollback().await?;
            ids = locked;
            continue;
        }
        let row = sqlx::query(ERASE_ROWS)
            .bind(&ids)
            .bind(erased_at)
            .fetch_one(&mut *txn)
            .await?;
        txn.commit().await?;
        let count = |i: usize| row.try_get::<i64, _>(i).map(|n| n as u64);
        early += count(0)?;
        return Ok(ErasedRows {
            events: early,
            sessions: count(1)?,
            profiles: count(2)?,
            distinct_ids: ids,
        });
    }
    Err(StoreError::Db(sea_orm::DbErr::Custom(
        "ids kept joining the person being erased".into(),
    )))
}

/// The last step of an erasure of `ids` (all of their persons' ids, as [`erase_stored`] answered):
/// drops their person mapping, holding their buckets as [`erase_stored`] does.
pub async fn forget_persons(db: &DatabaseConnection, ids: &[String]) -> Result<(), StoreError> {
    let mut txn = db.get_postgres_connection_pool().begin().await?;
    sqlx::query(LOCK_EXCLUSIVE)
        .bind(LOCK_CLASS)
        .bind(buckets(ids.iter().map(String::as_str)))
        .execute(&mut *txn)
        .await?;
    let persons: Vec<i64> = sqlx::query_scalar(DELETE_PERSONS)
        .bind(ids)
        .fetch_all(&mut *txn)
        .await?;
    if !persons.is_empty() {
        sqlx::query(DELETE_PERSON_ROWS)
            .bind(&persons)
            .execute(&mut *txn)
            .await?;
    }
    txn.commit().await?;
    Ok(())
}

/// `ids` and every other id of their persons, sorted and distinct.
async fn with_person_ids<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    mut ids: Vec<String>,
) -> Result<Vec<String>, StoreError> {
    let others: Vec<String> = sqlx::query_scalar(PERSON_IDS)
        .bind(&ids)
        .fetch_all(conn)
        .await?;
    ids.extend(others);
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Reads `distinct_id` and `received_at` of an event's JSON (a stream entry's `event` field)
/// without decoding the rest, which may be broken (a dead letter's). `None` without a string
/// `distinct_id`; the time is `None` when it is missing or unreadable.
pub fn event_user(event: &[u8]) -> Option<(String, Option<DateTime<Utc>>)> {
    let distinct_id = entity::Envelope::distinct_id_of(event)?.into_owned();
    let received_at = entity::envelope::scan::first(event, "received_at")
        .and_then(|raw| serde_json::from_slice::<DateTime<Utc>>(raw).ok());
    Some((distinct_id, received_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_fixed_sorted_and_distinct() {
        // FNV-1a 32 of the empty string and of "a" (published test vectors), modulo 64.
        assert_eq!(bucket(""), (0x811c_9dc5u32 % BUCKETS) as i32);
        assert_eq!(bucket("a"), (0xe40c_292cu32 % BUCKETS) as i32);
        let ids: Vec<String> = (0..500).map(|i| format!("user_{i}")).collect();
        let b = buckets(ids.iter().map(String::as_str));
        assert!(b.is_sorted() && b.windows(2).all(|w| w[0] != w[1]));
        assert_eq!(
            b.len(),
            BUCKETS as usize,
            "500 users spread over every bucket"
        );
        assert!(b.iter().all(|&b| (0..BUCKETS as i32).contains(&b)));
    }

    #[test]
    fn erasure_times_round_up_to_the_microsecond() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        assert_eq!(
            round_up_to_micros(at("2026-12-10T10:00:00.123456001Z")),
            at("2026-12-10T10:00:00.123457Z")
        );
        assert_eq!(
            round_up_to_micros(at("2026-12-10T10:00:00.999999999Z")),
            at("2026-12-10T10:00:01Z")
        );
        let exact = at("2026-12-10T10:00:00.123456Z");
        assert_eq!(round_up_to_micros(exact), exact);
    }

    #[test]
    fn an_event_is_erased_when_received_at_or_before_the_erasure() {
        let at = Utc::now();
        let tombstones = Tombstones(HashMap::from([("u".to_string(), at)]));
        assert!(tombstones.erases("u", Some(at)));
        assert!(tombstones.erases("u", Some(at - chrono::Duration::seconds(1))));
        assert!(tombstones.erases("u", None));
        assert!(!tombstones.erases("u", Some(at + chrono::Duration::microseconds(1))));
        assert!(!tombstones.erases("v", None));
    }

    #[test]
    fn event_user_reads_the_id_and_time_only() {
        let (id, at) = event_user(
            br#"{"uuid": "x", "distinct_id": "u\"1", "properties": {"distinct_id": "no"},
                 "received_at": "2026-12-10T10:00:00.123456Z"}"#,
        )
        .unwrap();
        assert_eq!(id, "u\"1");
        assert_eq!(at.unwrap().to_rfc3339(), "2026-12-10T10:00:00.123456+00:00");
        assert_eq!(
            event_user(br#"{"distinct_id": "u", "received_at": 5}"#),
            Some(("u".into(), None))
        );
        assert_eq!(event_user(br#"{"distinct_id": 5}"#), None);
        assert_eq!(event_user(b"not json"), None);
        // A broken entry whose id comes before the damage.
        assert_eq!(
            event_user(br#"{"distinct_id": "u", "event": "#),
            Some(("u".into(), None))
        );
    }
}
