//! Redis keys of one test's own (its stream, dead-letter stream and the reports kept beside
//! them, deleted when the test ends) and the stream commands tests use to feed and inspect them.

use chrono::Utc;
use entity::{
    Envelope,
    envelope::{FIELD_EVENT, FIELD_VERSION},
};
use redis::{
    Value,
    aio::{ConnectionLike, ConnectionManager},
    streams::StreamRangeReply,
};
use uuid::Uuid;

use crate::redis_url;

/// One test's stream keys; deleted, with every key the services keep beside the stream, when
/// dropped (also when the test panics).
pub struct Keys {
    pub stream: String,
    pub dlq: String,
    /// The consumer group workers join on `stream`.
    pub group: String,
    /// `STREAM_SHARDS` of the services using these keys (1 unless a test sets it).
    pub shards: usize,
}

/// Shards of a test's stream whose keys are deleted with it, whatever its `STREAM_SHARDS`.
const DELETED_SHARDS: usize = 64;

/// Fresh names for a test's stream and dead-letter stream, for a configuration; the [`Keys`]
/// that [`Keys::adopt`]s them deletes them.
pub fn stream_names() -> (String, String) {
    let id = Uuid::new_v4().simple();
    (format!("test:{id}:events"), format!("test:{id}:dlq"))
}

impl Keys {
    pub fn new() -> Self {
        let (stream, dlq) = stream_names();
        Self::adopt(stream, dlq)
    }

    /// Takes over names made elsewhere (e.g. by [`stream_names`]): they are deleted with this.
    pub fn adopt(stream: String, dlq: String) -> Self {
        Self {
            stream,
            dlq,
            group: "enrichers".into(),
            shards: 1,
        }
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        // Every shard key a test may have used (they are only named: no SCAN of the keyspace),
        // and the keys kept beside each.
        let shards: Vec<String> = (0..DELETED_SHARDS)
            .map(|i| infra::shards::shard_key(&self.stream, i, DELETED_SHARDS))
            .flat_map(|key| [format!("{key}:owner"), key])
            .chain([format!("{}:owner", self.stream)])
            .collect();
        // A blocking connection: this may run while an async runtime unwinds.
        let deleted = redis::Client::open(redis_url())
            .and_then(|c| c.get_connection())
            .and_then(|mut conn| {
                redis::cmd("DEL")
                    .arg(&self.stream)
                    .arg(&self.dlq)
                    .arg(&infra::unmatched::report_keys(&self.stream, false)[..])
                    .arg(&shards[..])
                    .query::<()>(&mut conn)
            });
        if let Err(e) = deleted {
            eprintln!("testkit: keys of {} not deleted: {e}", self.stream);
        }
    }
}

/// A connection to the tests' Redis (`REDIS_URL`).
pub async fn redis() -> ConnectionManager {
    redis::Client::open(redis_url())
        .expect("a Redis URL in REDIS_URL")
        .get_connection_manager()
        .await
        .expect("Redis at REDIS_URL answers")
}

/// An event of `distinct_id` happening now, as the api would queue it.
pub fn envelope(distinct_id: &str, event: &str, properties: serde_json::Value) -> Envelope {
    Envelope {
        uuid: Uuid::now_v7(),
        distinct_id: distinct_id.into(),
        event: event.into(),
        properties: properties.as_object().cloned().unwrap_or_default(),
        timestamp: Utc::now(),
        received_at: Utc::now(),
        sent_at: None,
        session_id: None,
        lib: None,
        elements_chain: None,
        person: None,
    }
}

/// Appends `events` to `stream` the way the api does (`v`, `event`); returns the entry ids.
pub async fn publish(
    redis: &(impl ConnectionLike + Clone),
    stream: &str,
    events: &[Envelope],
) -> Vec<String> {
    let mut ids = Vec::with_capacity(events.len());
    for chunk in events.chunks(1_000) {
        let mut pipe = redis::pipe();
        for e in chunk {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg(FIELD_VERSION)
                .arg("1")
                .arg(FIELD_EVENT)
                .arg(e.to_json());
        }
        let chunk_ids: Vec<String> = pipe.query_async(&mut redis.clone()).await.unwrap();
        ids.extend(chunk_ids);
    }
    ids
}

/// Appends an entry of `fields` to `stream`; returns its id.
pub async fn publish_raw(
    redis: &(impl ConnectionLike + Clone),
    stream: &str,
    fields: &[(&str, &str)],
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(&mut redis.clone()).await.unwrap()
}

/// The dead-letter stream of `keys`, as the operators' commands see it.
pub fn dead_letters(redis: &ConnectionManager, keys: &Keys) -> infra::dlq::DeadLetters {
    infra::dlq::DeadLetters::new(
        redis.clone(),
        &keys.dlq,
        infra::shards::StreamShards::new(&keys.stream, keys.shards),
    )
}

/// Every entry of `stream`, decoded as envelopes.
pub async fn envelopes(redis: &(impl ConnectionLike + Clone), stream: &str) -> Vec<Envelope> {
    let reply: StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    reply
        .ids
        .iter()
        .map(|entry| {
            Envelope::from_fields(|name| match entry.map.get(name) {
                Some(Value::BulkString(b)) => Some(b.as_slice()),
                _ => None,
            })
            .unwrap_or_else(|e| panic!("entry {} of {stream} decodes: {e}", entry.id))
        })
        .collect()
}

/// The number of entries in stream `key` (0 when it does not exist).
pub async fn xlen(redis: &(impl ConnectionLike + Clone), key: &str) -> i64 {
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut redis.clone())
        .await
        .unwrap()
}

/// Creates the consumer group of `keys` at the stream's beginning, and the stream.
pub async fn create_group(redis: &ConnectionManager, keys: &Keys) {
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&keys.stream)
        .arg(&keys.group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut redis.clone())
        .await
        .unwrap();
}

/// Reads as `consumer` of the group from `start` (`>` for new entries, `0` for its pending
/// ones), acknowledging nothing, as a replica that dies does.
pub async fn read_group(redis: &ConnectionManager, keys: &Keys, consumer: &str, start: &str) {
    let _: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&keys.group)
        .arg(consumer)
        .arg("COUNT")
        .arg(1_000)
        .arg("STREAMS")
        .arg(&keys.stream)
        .arg(start)
        .query_async(&mut redis.clone())
        .await
        .unwrap();
}

/// Entries delivered to the group but not acknowledged (0 before the group exists).
pub async fn pending(redis: &ConnectionManager, keys: &Keys) -> i64 {
    let reply: Value = match redis::cmd("XPENDING")
        .arg(&keys.stream)
        .arg(&keys.group)
        .query_async(&mut redis.clone())
        .await
    {
        Ok(reply) => reply,
        Err(e) if e.code() == Some("NOGROUP") => return 0,
        Err(e) => panic!("XPENDING: {e}"),
    };
    match reply {
        Value::Array(items) => match items.first() {
            Some(Value::Int(n)) => *n,
            other => panic!("XPENDING answered {other:?}"),
        },
        other => panic!("XPENDING answered {other:?}"),
    }
}

/// Whether the stream exists: a worker creates it with its group (`XGROUP CREATE … MKSTREAM`).
pub async fn group_created(redis: &ConnectionManager, keys: &Keys) -> bool {
    redis::cmd("EXISTS")
        .arg(&keys.stream)
        .query_async::<i64>(&mut redis.clone())
        .await
        .unwrap()
        == 1
}

/// The group's consumers; the group must exist ([`group_created`]).
pub async fn consumers(redis: &ConnectionManager, keys: &Keys) -> Vec<String> {
    let reply: Vec<std::collections::HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&keys.stream)
        .arg(&keys.group)
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    reply
        .into_iter()
        .filter_map(|c| match c.get("name") {
            Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
}
