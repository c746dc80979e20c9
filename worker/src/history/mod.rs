//! Rule edits reach history: stored events described again with the live rules
//! ([`reenrich`]), and a candidate rule set compared with the live one on stored events
//! ([`compare`], `worker rules shadow`).

pub mod compare;
pub mod reenrich;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sea_orm::sqlx::{self, Row, postgres::PgRow};
use serde_json::{Map, Value};
use uuid::Uuid;

use infra::postgres::StoreError;
use rules_engine::{EventInput, RuleSet};

use crate::sanitize;

/// A stored event as the rules read it, with what it was described as.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub uuid: Uuid,
    pub distinct_id: String,
    pub event: String,
    pub properties: Map<String, Value>,
    pub elements_chain: Option<String>,
    pub session_id: Option<String>,
    pub timestamp: DateTime<Utc>,
    /// What it was stored as, and by which rule set version.
    pub stored: Description,
    pub rules_version: String,
}

/// The columns [`StoredRow::read`] expects, in its order.
pub const ROW_COLUMNS: &str = "uuid, distinct_id, event, properties::text, elements_chain, \
     session_id, \"timestamp\", description, rule_id, intents::text, rules_version";

impl StoredRow {
    pub fn read(row: &PgRow) -> Result<Self, StoreError> {
        let json = |i: usize| -> Result<String, StoreError> { Ok(row.try_get::<String, _>(i)?) };
        let properties = serde_json::from_str(&json(3)?).unwrap_or_default();
        let intents: BTreeMap<String, f64> = serde_json::from_str(&json(9)?).unwrap_or_default();
        let rule_id: Option<String> = row.try_get(8)?;
        Ok(StoredRow {
            uuid: row.try_get(0)?,
            distinct_id: row.try_get(1)?,
            event: row.try_get(2)?,
            properties,
            elements_chain: row.try_get(4)?,
            session_id: row.try_get(5)?,
            timestamp: row.try_get(6)?,
            stored: Description {
                sentence: row.try_get(7)?,
                matched: rule_id.is_some(),
                rule_id,
                intents,
            },
            rules_version: row.try_get(10)?,
        })
    }

    /// What `set` says about this event now (the webhook's `person` block is not stored, so
    /// `person` conditions see nothing).
    pub fn describe(&self, set: &RuleSet) -> Description {
        let e = set.describe(&EventInput {
            event: &self.event,
            distinct_id: &self.distinct_id,
            properties: &self.properties,
            properties_text: None,
            elements_chain: self.elements_chain.as_deref(),
            person_properties: None,
        });
        let mut intents = BTreeMap::new();
        for hit in &e.intents {
            *intents
                .entry(sanitize::text(hit.name.to_string()))
                .or_insert(0.0) += hit.weight;
        }
        Description {
            sentence: (!e.ignored).then(|| sanitize::text(e.description)),
            rule_id: e.rule_id.map(|r| sanitize::text(r.to_string())),
            intents,
            matched: e.matched,
        }
    }
}

/// What a rule set says about one event, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    /// `None`: ignored.
    pub sentence: Option<String>,
    /// `None`: no rule matched (the fallback sentence).
    pub rule_id: Option<String>,
    /// Weight per intent.
    pub intents: BTreeMap<String, f64>,
    /// A rule described or ignored it.
    pub matched: bool,
}

impl Description {
    /// The `intents` column.
    pub fn intents_json(&self) -> String {
        serde_json::to_string(&self.intents).unwrap_or_else(|_| "{}".into())
    }

    /// The sentence as a reviewer reads it: `(ignored)` for none.
    pub fn shown(&self) -> &str {
        self.sentence.as_deref().unwrap_or("(ignored)")
    }

    /// The rule as a reviewer reads it: `(fallback)` for none.
    pub fn rule_shown(&self) -> &str {
        self.rule_id.as_deref().unwrap_or("(fallback)")
    }
}

/// `SELECT columns FROM events`, newest first below the cursor (`$1`, `$2`; none: from the
/// newest), not older than `$3` (none: all), at most `limit` rows: the one walk that re-enrichment,
/// its dry run and the shadow comparison share, along the (timestamp, uuid) index.
pub(crate) fn walk_sql(columns: &str, limit: &str) -> String {
    format!(
        "SELECT {columns} FROM events \
         WHERE ($1::timestamptz IS NULL OR (\"timestamp\", uuid) < ($1, $2)) \
           AND ($3::timestamptz IS NULL OR \"timestamp\" >= $3) \
         ORDER BY \"timestamp\" DESC, uuid DESC LIMIT {limit}"
    )
}

/// Up to `limit` stored events, newest first, below `cursor` and since `since` (see [`walk_sql`]).
pub async fn page(
    pool: &sqlx::PgPool,
    cursor: Option<(DateTime<Utc>, Uuid)>,
    since: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<StoredRow>, StoreError> {
    let (at, uuid) = cursor.unzip();
    let rows = sqlx::query(sqlx::AssertSqlSafe(walk_sql(ROW_COLUMNS, "$4")))
        .bind(at)
        .bind(uuid)
        .bind(since)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(StoredRow::read).collect()
}

/// The newest stored events, newest first: the last `limit`, or those since `since`.
pub async fn newest(
    pool: &sqlx::PgPool,
    limit: i64,
    since: Option<DateTime<Utc>>,
) -> Result<Vec<StoredRow>, StoreError> {
    page(pool, None, since, limit).await
}
