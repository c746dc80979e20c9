//! The identity calls of a batch's new events applied to `persons` and `person_distinct_ids`,
//! in the batch's transaction (a redelivered call was stored before, so it changes nothing).
//!
//! Locks, always in this order, so that merges of any replicas never deadlock: advisory locks on
//! the ids the calls name (by a hash, sorted: nobody else creates a mapping row for them), then
//! the rows of the persons those ids belong to (sorted by person id). Moving ids between persons
//! needs both persons' rows. Should a person have been merged away while its row was waited for,
//! the person locks are released (a savepoint) and taken again in order.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{DbErr, sqlx};
use uuid::Uuid;

use infra::postgres::StoreError;

use super::Txn;
use crate::identity::{Merge, is_illegal_id};

/// First key of the advisory locks on the ids identity calls name: "prsn" in ASCII.
pub const PERSON_LOCK_CLASS: i32 = 0x70_72_73_6e;

/// Takes the advisory locks of the ids' keys (`$2`, sorted).
pub(super) const LOCK_IDS: &str =
    "SELECT count(pg_advisory_xact_lock($1, k)) FROM unnest($2::int4[]) AS k";

/// Locks the persons the ids (`$1`) belong to, in person order.
pub(super) const LOCK_PERSONS: &str = "SELECT p.id, p.is_identified FROM persons AS p \
     WHERE p.id IN (SELECT m.person_id FROM person_distinct_ids AS m WHERE m.distinct_id = ANY($1)) \
     ORDER BY p.id FOR UPDATE OF p";

/// Which person each of the ids (`$1`) belongs to (ids of no person have no row).
pub(super) const PERSONS_OF: &str =
    "SELECT distinct_id, person_id FROM person_distinct_ids WHERE distinct_id = ANY($1)";

const NEW_PERSON: &str = "INSERT INTO persons (is_identified) VALUES (true) RETURNING id";
const ADD_IDS: &str = "INSERT INTO person_distinct_ids (distinct_id, person_id) \
     SELECT unnest($1::text[]), $2";
const IDENTIFIED: &str = "UPDATE persons SET is_identified = true WHERE id = $1";
const MOVE_IDS: &str = "UPDATE person_distinct_ids SET person_id = $1 WHERE person_id = $2";
const DELETE_PERSON: &str = "DELETE FROM persons WHERE id = $1";
/// Whether an id had events before the identity call `$2` (PostHog: it has a person already).
const HAD_EVENTS: &str =
    "SELECT EXISTS (SELECT 1 FROM events WHERE distinct_id = $1 AND uuid <> $2)";

/// Rounds of locking persons before giving up (the batch is then retried as a whole).
const LOCK_ROUNDS: usize = 8;

/// One identity call of a new event: `merge.other` joins the person of `into`.
#[derive(Debug, Clone, Copy)]
pub(super) struct MergeCall<'a> {
    pub into: &'a str,
    pub merge: &'a Merge,
    pub at: DateTime<Utc>,
    pub uuid: Uuid,
}

/// What a batch's identity calls did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Merges {
    /// Calls that joined two ids (or found them joined already).
    pub merged: usize,
    /// Refused: the joining id's person is identified (use `$merge_dangerously`).
    pub already_identified: usize,
    /// Refused: an id every user might send (`anonymous`, `null`, …).
    pub illegal_id: usize,
    /// Refused: the joining id was erased after the call was received.
    pub erased: usize,
}

impl Merges {
    pub fn add(&mut self, other: Merges) {
        self.merged += other.merged;
        self.already_identified += other.already_identified;
        self.illegal_id += other.illegal_id;
        self.erased += other.erased;
    }

    /// The counts by the `result` label of `clickstream_worker_person_merges_total`.
    pub fn by_result(&self) -> [(&'static str, usize); 4] {
        [
            ("merged", self.merged),
            ("already_identified", self.already_identified),
            ("illegal_id", self.illegal_id),
            ("erased", self.erased),
        ]
    }
}

/// The advisory lock key of an id: FNV-1a (fixed across releases, unlike Rust's hasher).
pub fn id_lock_key(distinct_id: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in distinct_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash as i32
}

/// The persons of the ids the calls name, locked, and the state the calls change.
struct Persons {
    person_of: HashMap<String, i64>,
    identified: HashMap<i64, bool>,
}

/// Applies `calls` (in event order) as PostHog does: two ids of no person make a new one; an
/// id of no person joins the other's person; two persons become `into`'s, unless `other`'s is
/// identified (only `$merge_dangerously` joins it then). The result is identified.
pub(super) async fn apply_merges(
    txn: &mut Txn,
    calls: &[MergeCall<'_>],
    mut merges: Merges,
) -> Result<Merges, StoreError> {
    let mut named: Vec<&str> = calls
        .iter()
        .flat_map(|c| [c.into, c.merge.other.as_str()])
        .collect();
    named.sort_unstable();
    named.dedup();
    let mut keys: Vec<i32> = named.iter().map(|id| id_lock_key(id)).collect();
    keys.sort_unstable();
    keys.dedup();
    sqlx::query(LOCK_IDS)
        .bind(PERSON_LOCK_CLASS)
        .bind(keys)
        .execute(&mut **txn)
        .await?;
    let mut persons = lock_persons(txn, &named).await?;
    for call in calls {
        let (into, other) = (call.into, call.merge.other.as_str());
        if is_illegal_id(into) || is_illegal_id(other) {
            tracing::warn!(%into, %other, "identity call naming a placeholder id: not merged");
            merges.illegal_id += 1;
            continue;
        }
        let into_person = persons.person_of.get(into).copied();
        let other_person = persons.person_of.get(other).copied();
        let kept = match (into_person, other_person) {
            (None, None) => {
                let id: i64 = sqlx::query_scalar(NEW_PERSON).fetch_one(&mut **txn).await?;
                add_ids(txn, &mut persons, &[into, other], id).await?;
                persons.identified.insert(id, true);
                id
            }
            (Some(a), None) => {
                add_ids(txn, &mut persons, &[other], a).await?;
                a
            }
            (None, Some(b)) => {
                let refused = persons.identified[&b]
                    && !call.merge.overrides_identified()
                    && sqlx::query_scalar::<_, bool>(HAD_EVENTS)
                        .bind(into)
                        .bind(call.uuid)
                        .fetch_one(&mut **txn)
                        .await?;
                if refused {
                    refuse(&mut merges, into, other);
                    continue;
                }
                add_ids(txn, &mut persons, &[into], b).await?;
                b
            }
            (Some(a), Some(b)) if a == b => a,
            (Some(a), Some(b)) => {
                if persons.identified[&b] && !call.merge.overrides_identified() {
                    refuse(&mut merges, into, other);
                    continue;
                }
                sqlx::query(MOVE_IDS)
                    .bind(a)
                    .bind(b)
                    .execute(&mut **txn)
                    .await?;
                sqlx::query(DELETE_PERSON)
                    .bind(b)
                    .execute(&mut **txn)
                    .await?;
                persons
                    .person_of
                    .values_mut()
                    .filter(|p| **p == b)
                    .for_each(|p| *p = a);
                persons.identified.remove(&b);
                a
            }
        };
        if !persons.identified.insert(kept, true).unwrap_or(false) {
            sqlx::query(IDENTIFIED)
                .bind(kept)
                .execute(&mut **txn)
                .await?;
        }
        merges.merged += 1;
    }
    Ok(merges)
}

/// Counts and logs a merge refused by the identified-person guard (PostHog's
/// `cannot_merge_already_identified`).
fn refuse(merges: &mut Merges, into: &str, other: &str) {
    tracing::warn!(
        %into, %other,
        "identity call not merged: the joining id's person is identified already (use $merge_dangerously)"
    );
    merges.already_identified += 1;
}

/// Maps `ids` (of no person so far) to `person`.
async fn add_ids(
    txn: &mut Txn,
    persons: &mut Persons,
    ids: &[&str],
    person: i64,
) -> Result<(), StoreError> {
    sqlx::query(ADD_IDS)
        .bind(ids)
        .bind(person)
        .execute(&mut **txn)
        .await?;
    for id in ids {
        persons.person_of.insert(id.to_string(), person);
    }
    Ok(())
}

/// Locks the persons of `named` in person order and reads which person each id belongs to. An
/// id may have moved to another person while the locks were waited for (that person merged
/// away): the locks are then released and taken again, still in order.
async fn lock_persons(txn: &mut Txn, named: &[&str]) -> Result<Persons, StoreError> {
    sqlx::raw_sql("SAVEPOINT persons_locked")
        .execute(&mut **txn)
        .await?;
    for _ in 0..LOCK_ROUNDS {
        let identified: HashMap<i64, bool> = sqlx::query_as(LOCK_PERSONS)
            .bind(named)
            .fetch_all(&mut **txn)
            .await?
            .into_iter()
            .collect();
        let person_of: HashMap<String, i64> = sqlx::query_as(PERSONS_OF)
            .bind(named)
            .fetch_all(&mut **txn)
            .await?
            .into_iter()
            .collect();
        if person_of.values().all(|p| identified.contains_key(p)) {
            sqlx::raw_sql("RELEASE SAVEPOINT persons_locked")
                .execute(&mut **txn)
                .await?;
            return Ok(Persons {
                person_of,
                identified,
            });
        }
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT persons_locked")
            .execute(&mut **txn)
            .await?;
    }
    Err(StoreError::Db(DbErr::Custom(
        "the persons of this batch's identity calls kept changing".into(),
    )))
}
