//! The dead-letter stream: entries the worker could not store, with why, and the operator's tools
//! to look at them, put them back on the main stream, or drop them.

use chrono::{DateTime, Utc};
use entity::envelope::FIELD_EVENT;
use redis::Value;

use crate::redis::RedisConn;

use crate::{
    erasure::{self, Tombstones},
    redis::StreamError,
    shards::StreamShards,
};

/// Stream the entry came from.
pub const FIELD_SOURCE: &str = "dlq_source";
/// Id of the entry in its source stream.
pub const FIELD_ENTRY_ID: &str = "dlq_entry_id";
/// Why it was dead-lettered.
pub const FIELD_ERROR: &str = "dlq_error";
/// Times it had been delivered.
pub const FIELD_DELIVERIES: &str = "dlq_deliveries";
/// Consumer that dead-lettered it.
pub const FIELD_CONSUMER: &str = "dlq_consumer";
/// Consumer group it was read by.
pub const FIELD_GROUP: &str = "dlq_group";
/// When (RFC 3339).
pub const FIELD_AT: &str = "dlq_at";
/// Prefix of the fields the DLQ adds; replay strips them.
pub const FIELD_PREFIX: &str = "dlq_";

/// Entries read per `XRANGE` page.
const PAGE: usize = 500;

/// One entry of the dead-letter stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// Id in the DLQ stream.
    pub id: String,
    pub fields: Vec<(String, Vec<u8>)>,
}

impl DeadLetter {
    pub fn field(&self, name: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// The fields of the original entry, without the `dlq_*` ones.
    pub fn original_fields(&self) -> impl Iterator<Item = &(String, Vec<u8>)> {
        self.fields
            .iter()
            .filter(|(k, _)| !k.starts_with(FIELD_PREFIX))
    }
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    All,
    Ids(Vec<String>),
}

/// What `replay` did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReplayReport {
    /// (DLQ id, stream it went back to, new entry id).
    pub replayed: Vec<(String, String, String)>,
    /// Requested ids not found in the DLQ.
    pub missing: Vec<String>,
}

/// The DLQ of one deployment.
pub struct DeadLetters {
    conn: RedisConn,
    dlq: String,
    /// Where replayed entries go: the shard of their user.
    shards: StreamShards,
}

impl DeadLetters {
    pub fn new(conn: impl Into<RedisConn>, dlq: &str, shards: StreamShards) -> Self {
        Self {
            conn: conn.into(),
            dlq: dlq.to_string(),
            shards,
        }
    }

    /// Where a replayed letter goes: the shard of its user under today's `STREAM_SHARDS` when it
    /// came from this stream (any shard, under any count) or names no source; else its source.
    fn target(&self, letter: &DeadLetter) -> String {
        let source = letter.field(FIELD_SOURCE);
        if let Some(source) = source.as_deref()
            && !self.shards.is_shard_key(source)
        {
            return source.to_string();
        }
        let user = letter
            .fields
            .iter()
            .find(|(k, _)| k == FIELD_EVENT)
            .and_then(|(_, event)| entity::Envelope::distinct_id_of(event));
        match (user, source) {
            (Some(user), _) => self.shards.key_of(&user).to_string(),
            (None, Some(source)) => source,
            (None, None) => self.shards.key(0).to_string(),
        }
    }

    /// Up to `limit` dead letters, oldest first.
    pub async fn list(&self, limit: usize) -> Result<Vec<DeadLetter>, StreamError> {
        self.range("-", "+", limit).await
    }

    /// Number of dead letters.
    pub async fn count(&self) -> Result<u64, StreamError> {
        Ok(redis::cmd("XLEN")
            .arg(&self.dlq)
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// Puts dead letters back on their source stream (original fields only) and removes them from
    /// the DLQ. `All` replays what is in the DLQ when it starts, not letters added meanwhile.
    pub async fn replay(&self, selection: &Selection) -> Result<ReplayReport, StreamError> {
        let mut report = ReplayReport::default();
        for letter in self.select(selection, &mut report.missing).await? {
            let target = self.target(&letter);
            let mut xadd = redis::cmd("XADD");
            xadd.arg(&target).arg("*");
            for (k, v) in letter.original_fields() {
                xadd.arg(k).arg(v);
            }
            let mut xdel = redis::cmd("XDEL");
            xdel.arg(&self.dlq).arg(&letter.id);
            let new_id: String = if self.conn.is_cluster() {
                // The stream and the DLQ are in different hash slots: appended, then deleted.
                // Failing in between leaves the letter to replay again (its uuid deduplicates).
                let new_id = xadd.query_async(&mut self.conn.clone()).await?;
                let _: u64 = xdel.query_async(&mut self.conn.clone()).await?;
                new_id
            } else {
                let mut pipe = redis::pipe();
                pipe.atomic().add_command(xadd).add_command(xdel).ignore();
                let (new_id,): (String,) = pipe.query_async(&mut self.conn.clone()).await?;
                new_id
            };
            report.replayed.push((letter.id, target, new_id));
        }
        Ok(report)
    }

    /// Deletes dead letters; returns how many were deleted and the requested ids not found.
    pub async fn purge(&self, selection: &Selection) -> Result<(u64, Vec<String>), StreamError> {
        match selection {
            Selection::All => {
                let (len, _): (u64, Value) = redis::pipe()
                    .atomic()
                    .cmd("XLEN")
                    .arg(&self.dlq)
                    .cmd("DEL")
                    .arg(&self.dlq)
                    .query_async(&mut self.conn.clone())
                    .await?;
                Ok((len, Vec::new()))
            }
            Selection::Ids(_) => {
                let mut missing = Vec::new();
                let letters = self.select(selection, &mut missing).await?;
                let ids: Vec<&str> = letters.iter().map(|l| l.id.as_str()).collect();
                if ids.is_empty() {
                    return Ok((0, missing));
                }
                let deleted: u64 = redis::cmd("XDEL")
                    .arg(&self.dlq)
                    .arg(&ids)
                    .query_async(&mut self.conn.clone())
                    .await?;
                Ok((deleted, missing))
            }
        }
    }

    /// Deletes the dead letters of the users `ids` (their original event's `distinct_id`)
    /// received at or before `erased_at`, or at an unknown time: the dead-letter stream's part of
    /// an erasure. Scans the whole stream, a page at a time. Returns how many were deleted.
    pub async fn erase(&self, ids: &[&str], erased_at: DateTime<Utc>) -> Result<u64, StreamError> {
        let tombstones = Tombstones::of(ids, erased_at);
        let mut deleted = 0;
        let mut pages = Pages::default();
        while let Some(page) = pages.next(self).await? {
            let erased: Vec<&str> = page
                .iter()
                .filter(|letter| {
                    letter
                        .fields
                        .iter()
                        .find(|(k, _)| k == FIELD_EVENT)
                        .and_then(|(_, event)| erasure::event_user(event))
                        .is_some_and(|(id, at)| tombstones.erases(&id, at))
                })
                .map(|letter| letter.id.as_str())
                .collect();
            if !erased.is_empty() {
                let n: u64 = redis::cmd("XDEL")
                    .arg(&self.dlq)
                    .arg(&erased)
                    .query_async(&mut self.conn.clone())
                    .await?;
                deleted += n;
            }
        }
        Ok(deleted)
    }

    async fn select(
        &self,
        selection: &Selection,
        missing: &mut Vec<String>,
    ) -> Result<Vec<DeadLetter>, StreamError> {
        match selection {
            Selection::Ids(ids) => {
                let mut found = Vec::new();
                for id in ids {
                    match self.range(id, id, 1).await?.pop() {
                        Some(letter) => found.push(letter),
                        None => missing.push(id.clone()),
                    }
                }
                Ok(found)
            }
            Selection::All => {
                let mut all = Vec::new();
                let mut pages = Pages::default();
                while let Some(page) = pages.next(self).await? {
                    all.extend(page);
                }
                Ok(all)
            }
        }
    }

    async fn range(
        &self,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<DeadLetter>, StreamError> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(&self.dlq)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn.clone())
            .await?;
        let entries = crate::redis::parse_entries(reply)?;
        Ok(entries
            .into_iter()
            .map(|e| DeadLetter {
                id: e.id,
                fields: e.fields,
            })
            .collect())
    }
}

/// The dead-letter stream read from its start, [`PAGE`] entries at a time.
struct Pages {
    /// Exclusive start of the next page (`-` before the first).
    start: String,
    done: bool,
}

impl Default for Pages {
    fn default() -> Self {
        Pages {
            start: "-".to_string(),
            done: false,
        }
    }
}

impl Pages {
    async fn next(&mut self, dlq: &DeadLetters) -> Result<Option<Vec<DeadLetter>>, StreamError> {
        if self.done {
            return Ok(None);
        }
        let page = dlq.range(&self.start, "+", PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(None);
        };
        self.start = format!("({}", last.id);
        self.done = page.len() < PAGE;
        Ok(Some(page))
    }
}
