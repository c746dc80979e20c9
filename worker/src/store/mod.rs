//! Postgres side: storing a batch of events exactly once, in one transaction.
//!
//! The events insert first ([`events`]), then sessions and profile writes ([`profiles`]) for the
//! rows that insert actually created, so a redelivered event is neither stored nor counted twice.
//! The insert (a `COPY`) assumes every event is new and fails if one is stored already; the batch
//! is then written again with `INSERT … ON CONFLICT (uuid) DO NOTHING RETURNING uuid`. Rows are
//! written in key order (events by uuid, profiles by distinct_id) so concurrent replicas lock in
//! the same order and do not deadlock. Last, the identity calls of the new events join their ids
//! into persons ([`persons`]). Rows are built in [`rows`], connections opened in [`pool`].

mod copy;
mod events;
mod persons;
mod pool;
mod profiles;
mod rows;

use sea_orm::{DatabaseConnection, sqlx};

use infra::postgres::StoreError;

use events::Inserts;
pub use persons::{Merges, PERSON_LOCK_CLASS, id_lock_key};
pub use pool::{connect, connect_for_migrations, warm_up};
pub use profiles::{KNOWN_PROFILES_MAX, KnownProfiles, LOCK_PROFILES, UPDATE_PROFILES};
pub use rows::{STORED_PROPERTIES, StoredEvent, decode};

/// What storing a batch did with its events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Events stored (new rows; the batch's others were stored before, or erased).
    pub stored: usize,
    /// Events dropped because their user was erased after they were received (a tombstone in
    /// `erasures`, see [`infra::erasure`]): done, not lost.
    pub erased: usize,
    /// What the new events' identity calls did.
    pub merges: Merges,
}

/// Stores a batch in one transaction. Events already stored (redeliveries) are skipped and not
/// counted again; events of users erased after they were received are dropped (the
/// transaction's first statement waits for any erasure of the batch's users in progress, then
/// reads their tombstones: [`infra::erasure::lock_shared`]).
///
/// Events are written with `COPY` ([`events`]). Every other table is written by one statement of
/// fixed text whatever the batch size, its rows passed as one array per column and expanded by
/// `unnest`: Postgres parses and plans each statement once per connection (sqlx keeps it
/// prepared), and a batch costs one round trip per table.
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
    // The ids identity calls name are locked and read as the events' own are: an erasure of
    // one is never undone by a merge naming it.
    let mut users: Vec<&str> = sorted
        .iter()
        .flat_map(|e| std::iter::once(e.distinct_id.as_str()).chain(e.named_ids()))
        .collect();
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
        match events::insert_events(&mut txn, sorted, rules_version, inserts).await? {
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
        let mut deltas = profiles::deltas(&new);
        let unknown = known.unknown(&deltas);
        let new_sessions =
            profiles::insert_sessions_and_new_profiles(&mut txn, &new, &unknown).await?;
        created = unknown.iter().map(|d| d.distinct_id.clone()).collect();
        sessions_done = started.elapsed();
        for delta in &mut deltas {
            delta.new_sessions = new_sessions.get(&delta.distinct_id).copied().unwrap_or(0);
        }
        profiles::upsert_profiles(&mut txn, &deltas).await?;
    }
    let profiles_done = started.elapsed();
    let merges = merge_persons(&mut txn, &new, &tombstones).await?;
    txn.commit().await?;
    known.remember(created);
    tracing::trace!(events = ?events_done, sessions = ?sessions_done, profiles = ?profiles_done, total = ?started.elapsed(), "batch transaction");
    Ok(Written {
        stored: new.len(),
        erased,
        merges,
    })
}

/// Applies the identity calls of the newly stored `events`, oldest first; a call naming an id
/// erased after the call was received is dropped.
async fn merge_persons(
    txn: &mut Txn,
    events: &[&StoredEvent],
    tombstones: &infra::erasure::Tombstones,
) -> Result<Merges, StoreError> {
    let mut merges = Merges::default();
    let mut calls: Vec<persons::MergeCall> = Vec::new();
    for e in events {
        let Some(merge) = &e.merge else { continue };
        if tombstones.erases(&merge.other, Some(e.received_at)) {
            tracing::info!(into = %e.distinct_id, "identity call naming an erased id: not merged");
            merges.erased += 1;
            continue;
        }
        calls.push(persons::MergeCall {
            into: &e.distinct_id,
            merge,
            at: e.timestamp,
            uuid: e.uuid,
        });
    }
    if calls.is_empty() {
        return Ok(merges);
    }
    calls.sort_by_key(|c| (c.at, c.uuid));
    persons::apply_merges(txn, &calls, merges).await
}

/// The transaction a batch is written in.
type Txn = sqlx::Transaction<'static, sqlx::Postgres>;

/// One value per row, as the array bound for an `unnest` column.
fn column<'a, R, T>(rows: &'a [R], value: impl Fn(&'a R) -> T) -> Vec<T> {
    rows.iter().map(value).collect()
}
