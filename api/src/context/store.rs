//! Reads (and erases) a user's stored events and profile.

use chrono::{DateTime, Utc};
use entity::{event, user_profile, user_session};
use sea_orm::{
    ColumnTrait, DatabaseConnection, DbErr, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect, TransactionTrait,
};

use super::HistoryItem;

/// Which events the history shows.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub limit: u64,
    pub since: Option<DateTime<Utc>>,
    pub session: Option<String>,
}

#[derive(FromQueryResult)]
struct HistoryRow {
    timestamp: DateTime<Utc>,
    description: String,
    event: String,
    path: Option<String>,
    url: Option<String>,
    session_id: Option<String>,
}

pub async fn profile(
    db: &DatabaseConnection,
    user_id: &str,
) -> Result<Option<user_profile::Model>, DbErr> {
    user_profile::Entity::find_by_id(user_id.to_string())
        .one(db)
        .await
}

/// Newest first, through the `(distinct_id, timestamp DESC)` index.
pub async fn history(
    db: &DatabaseConnection,
    user_id: &str,
    filter: &HistoryFilter,
) -> Result<Vec<HistoryItem>, DbErr> {
    let mut query = event::Entity::find()
        .select_only()
        .columns([
            event::Column::Timestamp,
            event::Column::Description,
            event::Column::Event,
            event::Column::Path,
            event::Column::Url,
            event::Column::SessionId,
        ])
        .filter(event::Column::DistinctId.eq(user_id));
    if let Some(since) = filter.since {
        query = query.filter(event::Column::Timestamp.gte(since));
    }
    if let Some(session) = &filter.session {
        query = query.filter(event::Column::SessionId.eq(session.as_str()));
    }
    let rows = query
        .order_by_desc(event::Column::Timestamp)
        .order_by_desc(event::Column::Uuid)
        .limit(filter.limit)
        .into_model::<HistoryRow>()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| HistoryItem {
            time: r.timestamp,
            description: r.description,
            event: r.event,
            page: r.path.or(r.url),
            session_id: r.session_id,
        })
        .collect())
}

/// What an erasure removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Erased {
    pub events: u64,
    pub sessions: u64,
    pub profile: bool,
}

/// Deletes every stored row about the user, in one transaction.
pub async fn erase(db: &DatabaseConnection, user_id: &str) -> Result<Erased, DbErr> {
    let txn = db.begin().await?;
    let events = event::Entity::delete_many()
        .filter(event::Column::DistinctId.eq(user_id))
        .exec(&txn)
        .await?;
    let sessions = user_session::Entity::delete_many()
        .filter(user_session::Column::DistinctId.eq(user_id))
        .exec(&txn)
        .await?;
    let profile = user_profile::Entity::delete_by_id(user_id.to_string())
        .exec(&txn)
        .await?;
    txn.commit().await?;
    Ok(Erased {
        events: events.rows_affected,
        sessions: sessions.rows_affected,
        profile: profile.rows_affected > 0,
    })
}
