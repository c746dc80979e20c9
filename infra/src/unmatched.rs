//! The unmatched-events report, kept in Redis so that every replica contributes: which kinds of
//! events no rule describes, most frequent first, each with an example, so a rule author knows
//! which translation to write next.
//!
//! Two keys next to the stream: `<QUEUE_NAME>:unmatched` (sorted set: shape id → count) and
//! `<QUEUE_NAME>:unmatched:shapes` (hash: shape id → the shape as JSON, with its first example).
//! Replicas add their in-memory counts every [`FLUSH_INTERVAL`]; after every successful rules
//! reload each replica drops the shapes the new rules describe.
//!
//! Examples are events, so they hold user data: an erasure removes the shapes whose example is
//! the erased user's ([`UnmatchedReport::erase`]), and a replica's flush leaves out the shapes
//! whose example belongs to an erased user (see [`UnmatchedReport::with_erasures`]).

use std::time::Duration;

use crate::redis::RedisConn;
use sea_orm::DatabaseConnection;
use serde_json::Value;
use sha2::{Digest, Sha256};

use rules_engine::{EventInput, RuleSet, UnmatchedShape};

use crate::erasure;

/// How often a replica adds its counts to the shared report.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Most shapes the report keeps; the least frequent are dropped beyond it.
pub const MAX_SHAPES: usize = 1000;

/// The shared report of one stream.
#[derive(Clone)]
pub struct UnmatchedReport {
    conn: RedisConn,
    counts_key: String,
    shapes_key: String,
    /// Where erasures are recorded, when [`Self::add`] must leave out erased users' examples.
    erasures: Option<DatabaseConnection>,
}

/// Why counts could not be added to the report.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("reading the erasures: {0}")]
    Erasures(#[from] crate::postgres::StoreError),
}

/// The user of a shape's example.
fn example_user(shape: &UnmatchedShape) -> Option<&str> {
    shape.example.as_ref()?.get("distinct_id")?.as_str()
}

/// The id of a shape: a hash of what makes it distinct.
fn shape_id(shape: &UnmatchedShape) -> String {
    let key = serde_json::json!([
        shape.event,
        shape.path,
        shape.element_text,
        shape.element_classes
    ]);
    let digest = Sha256::digest(key.to_string().as_bytes());
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// The report's keys beside the stream `queue_name`: the counts, then the shapes. On a cluster
/// (`cluster`) they share one hash tag.
pub fn report_keys(queue_name: &str, cluster: bool) -> [String; 2] {
    if cluster {
        // One hash slot for both: they are written in one transaction.
        return [
            format!("{{{queue_name}:unmatched}}"),
            format!("{{{queue_name}:unmatched}}:shapes"),
        ];
    }
    [
        format!("{queue_name}:unmatched"),
        format!("{queue_name}:unmatched:shapes"),
    ]
}

impl UnmatchedReport {
    /// The report of the stream `queue_name`.
    pub fn new(conn: impl Into<RedisConn>, queue_name: &str) -> Self {
        let conn = conn.into();
        let [counts_key, shapes_key] = report_keys(queue_name, conn.is_cluster());
        UnmatchedReport {
            conn,
            counts_key,
            shapes_key,
            erasures: None,
        }
    }

    /// This report, whose [`Self::add`] leaves out the shapes whose example belongs to a user
    /// erased in `db` (at any time: an erased user's events are never shown as examples), and
    /// writes the others under the erasure locks of their examples' users
    /// ([`erasure::guarded`]): an erasure either finds the example in the report (and removes it)
    /// or is seen by the flush. What replicas add; the api only reads and erases.
    pub fn with_erasures(mut self, db: DatabaseConnection) -> Self {
        self.erasures = Some(db);
        self
    }

    /// Removes the shapes whose example belongs to one of `ids` (their counts go with them: the
    /// shape comes back, with another example, from the next unmatched event of its kind).
    /// Returns how many were removed.
    pub async fn erase(&self, ids: &[&str]) -> Result<u64, redis::RedisError> {
        let removed = self
            .remove_where(|shape| example_user(shape).is_some_and(|u| ids.contains(&u)))
            .await?;
        Ok(removed as u64)
    }

    /// Adds counts (and, for shapes not seen before, their description and example), all or
    /// none (MULTI/EXEC): an error means nothing was added, so the caller may add the same counts
    /// again (unless Redis applied them and only its answer was lost: then they count twice).
    /// Trimming the report to [`MAX_SHAPES`] afterwards is best effort and never an error.
    /// With [`Self::with_erasures`], shapes whose example belongs to an erased user are left out
    /// (their counts too) and an error may also be Postgres'.
    pub async fn add(&self, shapes: &[UnmatchedShape]) -> Result<(), AddError> {
        if shapes.is_empty() {
            return Ok(());
        }
        let mut users: Vec<&str> = shapes.iter().filter_map(example_user).collect();
        users.sort_unstable();
        users.dedup();
        let Some(db) = self.erasures.as_ref().filter(|_| !users.is_empty()) else {
            return Ok(self.add_shapes(shapes.iter()).await?);
        };
        let write = async |tombstones: &erasure::Tombstones| {
            let kept = shapes.iter().filter(|shape| {
                example_user(shape).is_none_or(|u| tombstones.erased_at(u).is_none())
            });
            self.add_shapes(kept).await
        };
        Ok(erasure::guarded(db, &users, write).await??)
    }

    /// [`Self::add`] without looking at erasures.
    async fn add_shapes(
        &self,
        shapes: impl Iterator<Item = &UnmatchedShape>,
    ) -> Result<(), redis::RedisError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for shape in shapes {
            let id = shape_id(shape);
            pipe.cmd("ZINCRBY")
                .arg(&self.counts_key)
                .arg(shape.count)
                .arg(&id)
                .ignore();
            let stored = UnmatchedShape {
                count: 0,
                ..shape.clone()
            };
            pipe.cmd("HSETNX")
                .arg(&self.shapes_key)
                .arg(&id)
                .arg(serde_json::to_string(&stored).unwrap_or_default())
                .ignore();
        }
        pipe.cmd("ZCARD").arg(&self.counts_key);
        let (len,): (usize,) = pipe.query_async(&mut self.conn.clone()).await?;
        if len > MAX_SHAPES + MAX_SHAPES / 10
            && let Err(error) = self.trim(len).await
        {
            tracing::warn!(%error, "could not trim the unmatched-events report (next flush tries again)");
        }
        Ok(())
    }

    /// Drops the least frequent shapes beyond [`MAX_SHAPES`] of the `len` there are.
    async fn trim(&self, len: usize) -> Result<(), redis::RedisError> {
        let dropped: Vec<String> = redis::cmd("ZRANGE")
            .arg(&self.counts_key)
            .arg(0)
            .arg(len - MAX_SHAPES - 1)
            .query_async(&mut self.conn.clone())
            .await?;
        self.remove(&dropped).await
    }

    async fn remove(&self, ids: &[String]) -> Result<(), redis::RedisError> {
        if ids.is_empty() {
            return Ok(());
        }
        redis::pipe()
            .cmd("ZREM")
            .arg(&self.counts_key)
            .arg(ids)
            .ignore()
            .cmd("HDEL")
            .arg(&self.shapes_key)
            .arg(ids)
            .ignore()
            .query_async::<()>(&mut self.conn.clone())
            .await
    }

    /// The `limit` most frequent shapes, most frequent first, and how many shapes there are.
    pub async fn top(&self, limit: usize) -> Result<(Vec<UnmatchedShape>, u64), redis::RedisError> {
        let (ranked, total): (Vec<(String, f64)>, u64) = redis::pipe()
            .cmd("ZRANGE")
            .arg(&self.counts_key)
            .arg(0)
            .arg(limit.max(1) as i64 - 1)
            .arg("REV")
            .arg("WITHSCORES")
            .cmd("ZCARD")
            .arg(&self.counts_key)
            .query_async(&mut self.conn.clone())
            .await?;
        if ranked.is_empty() || limit == 0 {
            return Ok((Vec::new(), total));
        }
        let ids: Vec<&str> = ranked.iter().map(|(id, _)| id.as_str()).collect();
        let shapes: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&self.shapes_key)
            .arg(&ids)
            .query_async(&mut self.conn.clone())
            .await?;
        let top = ranked
            .iter()
            .zip(shapes)
            .filter_map(|((_, count), json)| {
                let mut shape: UnmatchedShape = serde_json::from_str(&json?).ok()?;
                shape.count = *count as u64;
                Some(shape)
            })
            .collect();
        Ok((top, total))
    }

    /// Drops the shapes whose example `rules` now describe. Returns how many were dropped.
    pub async fn prune(&self, rules: &RuleSet) -> Result<usize, redis::RedisError> {
        self.remove_where(|shape| {
            shape
                .example
                .as_ref()
                .is_some_and(|example| describes(rules, example))
        })
        .await
    }

    /// Removes the shapes (and their counts) for which `remove` holds; shapes that do not parse
    /// are kept. Returns how many were removed.
    async fn remove_where(
        &self,
        remove: impl Fn(&UnmatchedShape) -> bool,
    ) -> Result<usize, redis::RedisError> {
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(&self.shapes_key)
            .query_async(&mut self.conn.clone())
            .await?;
        let ids: Vec<String> = all
            .into_iter()
            .filter(|(_, json)| {
                serde_json::from_str::<UnmatchedShape>(json)
                    .ok()
                    .is_some_and(|shape| remove(&shape))
            })
            .map(|(id, _)| id)
            .collect();
        self.remove(&ids).await?;
        Ok(ids.len())
    }

    /// Deletes the whole report.
    pub async fn clear(&self) -> Result<(), redis::RedisError> {
        redis::cmd("DEL")
            .arg(&self.counts_key)
            .arg(&self.shapes_key)
            .query_async::<()>(&mut self.conn.clone())
            .await
    }
}

/// Whether `rules` describe the example event (without counting it as unmatched).
fn describes(rules: &RuleSet, example: &Value) -> bool {
    example
        .as_object()
        .and_then(EventInput::from_json)
        .is_some_and(|input| rules.describes(&input))
}
