//! `find_users`: users by decayed intent score or by recent activity, newest first, from the
//! `user_intents` index (kept by a trigger on `user_profiles` in the worker's batch transaction)
//! and `user_profiles (last_seen)`, never a scan of `events`.

use chrono::{DateTime, Utc};
use infra::postgres::db_err;
use sea_orm::{
    DbErr,
    sqlx::{self, Row},
};

use crate::context::conns::ReadConnections;

/// Users whose score for `$1`, decayed to `$2`, is at least `$3`, active at or after `$4`,
/// newest first: the `(intent, last_seen DESC)` index read in order until `$5` rows pass. The
/// decay stops at 1000 half-lives: 0.5^1000 is still a float (Postgres refuses an underflow)
/// and far below any threshold.
pub const BY_INTENT_SQL: &str = r#"SELECT distinct_id, last_seen,
       CASE WHEN half_life_secs > 0
            THEN score * power(0.5, LEAST(GREATEST(extract(epoch FROM $2 - last_seen), 0) / half_life_secs, 1000))
            ELSE score END AS decayed
  FROM user_intents
 WHERE intent = $1 AND last_seen >= $4
   AND CASE WHEN half_life_secs > 0
            THEN score * power(0.5, LEAST(GREATEST(extract(epoch FROM $2 - last_seen), 0) / half_life_secs, 1000))
            ELSE score END >= $3
 ORDER BY last_seen DESC
 LIMIT $5"#;

/// Users active at or after `$1`, newest first, through the `user_profiles (last_seen DESC)` index.
pub const BY_ACTIVITY_SQL: &str = r#"SELECT distinct_id, last_seen
  FROM user_profiles
 WHERE last_seen >= $1
 ORDER BY last_seen DESC
 LIMIT $2"#;

/// What to look for.
#[derive(Debug, Clone)]
pub struct UserQuery {
    /// With an intent: its decayed score must reach `min_score`.
    pub intent: Option<String>,
    pub min_score: f64,
    /// Only users seen (or, with an intent, who showed it) at or after this.
    pub since: Option<DateTime<Utc>>,
    pub limit: u32,
}

/// One user found.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FoundUser {
    pub user_id: String,
    /// The intent's last signal, or the user's last event without an intent.
    #[serde(serialize_with = "crate::context::json::rfc3339")]
    pub last_seen: DateTime<Utc>,
    /// The intent's score decayed to now (absent without an intent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

/// Runs `query` on the read path's connections.
pub async fn find_users(
    conns: &ReadConnections,
    query: &UserQuery,
    now: DateTime<Utc>,
) -> Result<Vec<FoundUser>, DbErr> {
    let since = query.since.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    let mut conn = conns.acquire().await.map_err(db_err)?;
    let rows = match &query.intent {
        Some(intent) => {
            sqlx::query(BY_INTENT_SQL)
                .bind(intent)
                .bind(now)
                .bind(query.min_score)
                .bind(since)
                .bind(i64::from(query.limit))
                .fetch_all(&mut *conn)
                .await
        }
        None => {
            sqlx::query(BY_ACTIVITY_SQL)
                .bind(since)
                .bind(i64::from(query.limit))
                .fetch_all(&mut *conn)
                .await
        }
    }
    .map_err(db_err)?;
    conn.release();
    let decode = |e: sqlx::Error| DbErr::Type(e.to_string());
    rows.iter()
        .map(|row| {
            Ok(FoundUser {
                user_id: row.try_get(0).map_err(decode)?,
                last_seen: row.try_get(1).map_err(decode)?,
                score: match query.intent {
                    Some(_) => {
                        let score: f64 = row.try_get(2).map_err(decode)?;
                        Some((score * 1000.0).round() / 1000.0)
                    }
                    None => None,
                },
            })
        })
        .collect()
}
