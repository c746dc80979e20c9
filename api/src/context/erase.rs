//! Erasing users everywhere this system holds them: Postgres (rows, and a tombstone that makes
//! the workers drop the events still on their way), the dead-letter stream and the
//! unmatched-events report. The protocol that keeps an erased user from coming back is
//! `infra::erasure`'s.

use std::time::Duration;

use chrono::{DateTime, Utc};
use infra::{dlq::DeadLetters, erasure, postgres::StoreError};

use crate::state::AppState;

/// Longest the Redis part of an erasure (scanning the dead-letter stream, the report) may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(10);

/// What an erasure removed, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Erased {
    pub erased_at: DateTime<Utc>,
    /// Every id erased: those asked for and the other ids of their persons, sorted.
    pub distinct_ids: Vec<String>,
    pub events: u64,
    pub sessions: u64,
    pub profiles: u64,
    pub dead_letters: u64,
    pub unmatched_examples: u64,
    /// The users' events still in the stream (received before the erasure: workers drop them);
    /// `None` when they could not be counted.
    pub pending_events: Option<u64>,
}

/// Why an erasure did not finish.
#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    /// Nothing was erased.
    #[error("database: {0}")]
    Database(#[from] StoreError),
    /// Postgres is done (rows deleted, tombstones recorded), the Redis part is not: erasing
    /// again finishes it.
    #[error("redis, after the database part was done: {0}")]
    Redis(String),
    /// Everything is erased but the person mapping: erasing again finishes it.
    #[error("database, dropping the person mapping after the rest was erased: {0}")]
    Mapping(StoreError),
}

/// Erases the users `ids` and every other id of their persons as of `erased_at` (now, on the
/// api's clock, the clock that stamps events' `received_at`): events received until then are
/// erased wherever they are, later ones are new activity. Postgres first (rows and tombstones, waiting
/// for the worker batches writing these users); once it has committed, no worker adds the
/// users to the dead-letter stream or the report any more, and what is there is removed; last,
/// the person mapping goes (so a retry after a failure part way still finds every id).
pub async fn erase(
    state: &AppState,
    ids: &[&str],
    erased_at: DateTime<Utc>,
) -> Result<Erased, EraseError> {
    let erased_at = erasure::round_up_to_micros(erased_at);
    let rows = erasure::erase_stored(&state.db, ids, erased_at).await?;
    let ids: Vec<&str> = rows.distinct_ids.iter().map(String::as_str).collect();
    let ids = &ids[..];
    let dead_letters = DeadLetters::new(
        state.publisher.connection(),
        &state.config.dlq_name,
        state.publisher.shards().clone(),
    );
    let redis = async {
        let dead_letters = dead_letters
            .erase(ids, erased_at)
            .await
            .map_err(|e| EraseError::Redis(format!("dead-letter stream: {e}")))?;
        let unmatched = state
            .unmatched
            .erase(ids)
            .await
            .map_err(|e| EraseError::Redis(format!("unmatched-events report: {e}")))?;
        Ok::<_, EraseError>((dead_letters, unmatched))
    };
    let (dead_letters, unmatched_examples) = tokio::time::timeout(REDIS_TIMEOUT, redis)
        .await
        .map_err(|_| EraseError::Redis(format!("no answer within {REDIS_TIMEOUT:?}")))??;
    // Last: until now a retry with any one id finds every id of the person by the mapping.
    erasure::forget_persons(&state.db, &rows.distinct_ids)
        .await
        .map_err(EraseError::Mapping)?;
    let pending_events = state
        .publisher
        .pending_for_users(ids)
        .await
        .ok()
        .and_then(|p| p.for_user);
    Ok(Erased {
        erased_at,
        distinct_ids: rows.distinct_ids.clone(),
        events: rows.events,
        sessions: rows.sessions,
        profiles: rows.profiles,
        dead_letters,
        unmatched_examples,
        pending_events,
    })
}
