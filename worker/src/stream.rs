//! Redis side: the consumer group on every shard of the stream, reading, claiming,
//! acknowledging and dead-lettering entries.
//!
//! Blocking `XREADGROUP` runs on connections of its own (one per shard reader) whose response
//! timeout exceeds `BLOCK` (redis-rs defaults to 500 ms); every other command shares one.

use std::{collections::HashMap, time::Duration};

use infra::redis::{COMMAND_TIMEOUT, RedisClient, RedisConn};
pub use infra::redis::{Entry, EntryId, StreamError};
use infra::redis::{bytes, info_int, info_string, key_values, parse_entries};
use infra::shards::StreamShards;
use redis::{RedisError, Value};

use crate::config::Config;

/// The group's view of the stream's shards for one consumer.
#[derive(Clone)]
pub struct Streams {
    /// Makes the blocking readers' connections.
    client: RedisClient,
    /// Everything but blocking reads.
    commands: RedisConn,
    pub shards: StreamShards,
    pub group: String,
    pub consumer: String,
    pub dlq: String,
    /// `DLQ_MAXLEN`: the dead-letter stream is trimmed to this many entries.
    dlq_maxlen: u64,
    block: Duration,
}

impl Streams {
    /// Connects lazily: nothing touches the network until the first command.
    pub fn new(config: &Config) -> Result<Self, StreamError> {
        let client = config.redis_client()?;
        let block = config.flush_interval;
        Ok(Self {
            commands: client.connection(COMMAND_TIMEOUT)?,
            client,
            shards: config.shards(),
            group: config.consumer_group.clone(),
            consumer: config.worker_name.clone(),
            dlq: config.dlq_name.clone(),
            dlq_maxlen: config.dlq_maxlen,
            block,
        })
    }

    /// A connection for one reader's blocking reads (its response timeout exceeds `BLOCK`).
    /// On a cluster it goes to the node of the shard's hash slot.
    pub fn reader(&self) -> Result<RedisConn, StreamError> {
        Ok(self.client.connection(self.block + COMMAND_TIMEOUT)?)
    }

    /// Creates the consumer group (and the stream) on every shard where missing, starting from the
    /// stream's beginning so that events queued before the first worker started are not skipped.
    pub async fn ensure_group(&self) -> Result<(), StreamError> {
        for shard in 0..self.shards.count() {
            self.ensure_group_on(shard).await?;
        }
        Ok(())
    }

    /// [`Self::ensure_group`] on one shard.
    pub async fn ensure_group_on(&self, shard: usize) -> Result<(), StreamError> {
        let result: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.shards.key(shard))
            .arg(&self.group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.commands.clone())
            .await;
        match result {
            Err(e) if e.code() != Some("BUSYGROUP") => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Reads up to `count` entries of `shard` on `reader` (a [`Self::reader`] connection).
    /// `after = None` reads new entries (`>`), waiting at most `FLUSH_INTERVAL`; `Some(id)`
    /// re-reads this consumer's own pending entries after `id`.
    pub async fn read(
        &self,
        reader: &RedisConn,
        shard: usize,
        after: Option<&str>,
        count: usize,
    ) -> Result<Vec<Entry>, StreamError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if after.is_none() {
            cmd.arg("BLOCK").arg(self.block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS")
            .arg(self.shards.key(shard))
            .arg(after.unwrap_or(">"));
        let reply: Value = cmd.query_async(&mut reader.clone()).await?;
        let mut entries = parse_read_reply(reply)?;
        entries.iter_mut().for_each(|e| e.shard = shard);
        if after.is_some() {
            self.fill_deliveries(shard, &mut entries).await?;
        } else {
            entries.iter_mut().for_each(|e| e.deliveries = 1);
        }
        Ok(entries)
    }

    /// Takes over entries of `shard` idle longer than `min_idle` from any consumer
    /// (`XAUTOCLAIM`), one page from `cursor`. Returns the entries and the next cursor (`0-0`
    /// when the sweep is done).
    pub async fn claim(
        &self,
        shard: usize,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<(Vec<Entry>, String), StreamError> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(self.shards.key(shard))
            .arg(&self.group)
            .arg(&self.consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.commands.clone())
            .await?;
        let (next, claimed) = autoclaim_reply(reply)?;
        let mut entries = parse_entries(claimed)?;
        entries.iter_mut().for_each(|e| e.shard = shard);
        self.fill_deliveries(shard, &mut entries).await?;
        Ok((entries, next))
    }

    /// Makes every entry pending in `shard` this consumer's (`XAUTOCLAIM` idle 0, `JUSTID`: not
    /// counted as a delivery), for a replica that just took the shard's lease: the previous
    /// owner's, if it died or left some unacknowledged. Its reader re-reads them first.
    /// Returns how many moved.
    pub async fn take_pending(&self, shard: usize) -> Result<usize, StreamError> {
        let mut cursor = "0-0".to_string();
        let mut moved = 0;
        loop {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(self.shards.key(shard))
                .arg(&self.group)
                .arg(&self.consumer)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(1000)
                .arg("JUSTID")
                .query_async(&mut self.commands.clone())
                .await?;
            let (next, ids) = autoclaim_reply(reply)?;
            if let Value::Array(ids) = ids {
                moved += ids.len();
            }
            if next == "0-0" {
                return Ok(moved);
            }
            cursor = next;
        }
    }

    /// Sets delivery counts from the pending list (`XPENDING`).
    async fn fill_deliveries(
        &self,
        shard: usize,
        entries: &mut [Entry],
    ) -> Result<(), StreamError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let reply: Value = redis::cmd("XPENDING")
            .arg(self.shards.key(shard))
            .arg(&self.group)
            .arg(&first.id)
            .arg(&last.id)
            .arg(entries.len() * 4 + 64)
            .arg(&self.consumer)
            .query_async(&mut self.commands.clone())
            .await?;
        let mut counts = HashMap::new();
        if let Value::Array(rows) = reply {
            for row in rows {
                if let Value::Array(mut cols) = row
                    && cols.len() == 4
                    && let (Value::Int(n), Some(id)) =
                        (cols.swap_remove(3), bytes(cols.swap_remove(0)))
                {
                    counts.insert(String::from_utf8_lossy(&id).into_owned(), n.max(1) as u64);
                }
            }
        }
        for entry in entries {
            entry.deliveries = counts.get(&entry.id).copied().unwrap_or(1);
        }
        Ok(())
    }

    /// Resets the idle time of entries this consumer still holds (`XCLAIM … JUSTID`, which does not
    /// count as a delivery), so other replicas do not take over work that is merely slow.
    pub async fn keep_alive(&self, ids: &[EntryId]) -> Result<(), StreamError> {
        for (shard, ids) in by_shard(ids) {
            for chunk in ids.chunks(1000) {
                let _: Value = redis::cmd("XCLAIM")
                    .arg(self.shards.key(shard))
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg(0)
                    .arg(chunk)
                    .arg("JUSTID")
                    .query_async(&mut self.commands.clone())
                    .await?;
            }
        }
        Ok(())
    }

    /// Acknowledges entries and deletes them from their shard (retention without MAXLEN): one
    /// MULTI/EXEC per shard.
    pub async fn ack(&self, ids: &[EntryId]) -> Result<(), StreamError> {
        for (shard, ids) in by_shard(ids) {
            let key = self.shards.key(shard);
            let _: Value = redis::pipe()
                .atomic()
                .cmd("XACK")
                .arg(key)
                .arg(&self.group)
                .arg(&ids)
                .cmd("XDEL")
                .arg(key)
                .arg(&ids)
                .query_async(&mut self.commands.clone())
                .await?;
        }
        Ok(())
    }

    /// Appends dead-letter entries to the DLQ; each is the original fields plus `dlq_*` fields.
    /// Then trims the DLQ to its newest `DLQ_MAXLEN` entries (exactly) and returns how many of
    /// the oldest it removed.
    pub async fn dead_letter(&self, letters: &[(&Entry, String)]) -> Result<u64, StreamError> {
        if letters.is_empty() {
            return Ok(0);
        }
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut pipe = redis::pipe();
        for (entry, error) in letters {
            let cmd = pipe.cmd("XADD").arg(&self.dlq).arg("*");
            for (field, value) in &entry.fields {
                cmd.arg(field).arg(value);
            }
            cmd.arg(infra::dlq::FIELD_SOURCE)
                .arg(self.shards.key(entry.shard))
                .arg(infra::dlq::FIELD_ENTRY_ID)
                .arg(&entry.id)
                .arg(infra::dlq::FIELD_ERROR)
                .arg(error)
                .arg(infra::dlq::FIELD_DELIVERIES)
                .arg(entry.deliveries)
                .arg(infra::dlq::FIELD_CONSUMER)
                .arg(&self.consumer)
                .arg(infra::dlq::FIELD_GROUP)
                .arg(&self.group)
                .arg(infra::dlq::FIELD_AT)
                .arg(&now)
                .ignore();
        }
        pipe.cmd("XTRIM")
            .arg(&self.dlq)
            .arg("MAXLEN")
            .arg(self.dlq_maxlen);
        let (trimmed,): (u64,) = pipe.query_async(&mut self.commands.clone()).await?;
        Ok(trimmed)
    }

    /// Deletes other consumers of `shard` idle longer than `min_idle` that own no pending
    /// entries (replicas that are gone). Returns their names.
    pub async fn remove_idle_consumers(
        &self,
        shard: usize,
        min_idle: Duration,
    ) -> Result<Vec<String>, StreamError> {
        let reply: Value = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(self.shards.key(shard))
            .arg(&self.group)
            .query_async(&mut self.commands.clone())
            .await?;
        let mut removed = Vec::new();
        let Value::Array(consumers) = reply else {
            return Ok(removed);
        };
        for consumer in consumers {
            let info = key_values(consumer);
            let (Some(name), Some(pending), Some(idle)) = (
                info_string(&info, "name"),
                info_int(&info, "pending"),
                info_int(&info, "idle"),
            ) else {
                continue;
            };
            if name == self.consumer || pending != 0 || (idle as u128) < min_idle.as_millis() {
                continue;
            }
            let had: i64 = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(self.shards.key(shard))
                .arg(&self.group)
                .arg(&name)
                .query_async(&mut self.commands.clone())
                .await?;
            if had > 0 {
                tracing::warn!(consumer = %name, pending = had, "removed consumer owned entries after all");
            }
            removed.push(name);
        }
        Ok(removed)
    }

    /// The connection for non-blocking commands (DLQ tools, tests).
    pub fn commands(&self) -> RedisConn {
        self.commands.clone()
    }
}

/// `ids` grouped by shard, in shard order, each shard's in the order given.
fn by_shard(ids: &[EntryId]) -> Vec<(usize, Vec<&str>)> {
    let mut shards: std::collections::BTreeMap<usize, Vec<&str>> = Default::default();
    for (shard, id) in ids {
        shards.entry(*shard).or_default().push(id);
    }
    shards.into_iter().collect()
}

/// Splits an `XAUTOCLAIM` reply into the next cursor and the claimed part (entries, or ids with
/// `JUSTID`); the deleted-ids part that Redis 7 appends is not needed here.
fn autoclaim_reply(reply: Value) -> Result<(String, Value), StreamError> {
    let bad = |reply: &Value| StreamError::Reply {
        command: "XAUTOCLAIM",
        reply: format!("{reply:?}"),
    };
    let Value::Array(mut items) = reply else {
        return Err(bad(&reply));
    };
    if items.len() < 2 {
        return Err(bad(&Value::Array(items)));
    }
    let claimed = items.swap_remove(1);
    let next = bytes(items.swap_remove(0)).map(|b| String::from_utf8_lossy(&b).into_owned());
    let next = next.ok_or_else(|| bad(&claimed))?;
    Ok((next, claimed))
}

/// Parses an `XREADGROUP` reply (RESP2 array or RESP3 map of streams).
fn parse_read_reply(reply: Value) -> Result<Vec<Entry>, StreamError> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => Some(kv.swap_remove(1)),
                _ => None,
            })
            .collect::<Vec<_>>(),
        Value::Map(streams) => streams.into_iter().map(|(_, v)| v).collect(),
        other => {
            return Err(StreamError::Reply {
                command: "XREADGROUP",
                reply: format!("{other:?}"),
            });
        }
    };
    let mut entries = Vec::new();
    for stream in streams {
        entries.extend(parse_entries(stream)?);
    }
    Ok(entries)
}
