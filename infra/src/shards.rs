//! The event stream's shards (`STREAM_SHARDS`): which shard a user's events go to, and the
//! shards' key names.
//!
//! An event goes to shard `fnv1a64(distinct_id) mod STREAM_SHARDS`, so one user's events stay in
//! order in one shard. With one shard the key is `QUEUE_NAME` itself (deployments and data from
//! before sharding are unchanged); with several, shard `i` is `{QUEUE_NAME:i}`: the whole name is
//! its Redis Cluster hash tag, so the shards spread over a cluster's slots while a shard and the
//! keys kept beside it (`{QUEUE_NAME:i}:…`) share one.

use std::sync::Arc;

use crate::redis::{RedisConn, query_all};

/// Most shards `STREAM_SHARDS` accepts.
pub const MAX_SHARDS: usize = 1024;

/// The hash that places a user: FNV-1a 64 of the `distinct_id`'s UTF-8 bytes. Fixed (not Rust's
/// `DefaultHasher`, which may change between releases): every api and worker must agree.
pub fn user_hash(distinct_id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in distinct_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The key of shard `shard` of `count` of the stream `queue_name`.
pub fn shard_key(queue_name: &str, shard: usize, count: usize) -> String {
    if count <= 1 {
        queue_name.to_string()
    } else {
        format!("{{{queue_name}:{shard}}}")
    }
}

/// The shards of one stream: the `count` in use, then every key a shard had under another
/// `STREAM_SHARDS` (retired: drained by the workers, written no more).
#[derive(Debug, Clone)]
pub struct StreamShards {
    queue_name: Arc<str>,
    /// The shards in use, then the retired ones.
    keys: Arc<[String]>,
    count: usize,
}

impl StreamShards {
    /// `count` shards of `queue_name` (at least one).
    pub fn new(queue_name: &str, count: usize) -> Self {
        let count = count.clamp(1, MAX_SHARDS);
        let in_use = (0..count).map(|i| shard_key(queue_name, i, count));
        // With one shard the key is `QUEUE_NAME`; with several, `{QUEUE_NAME:i}` whatever the
        // count: the keys no count in use now has are the unsharded one or those past `count`.
        let retired: Vec<String> = if count == 1 {
            (0..MAX_SHARDS)
                .map(|i| shard_key(queue_name, i, MAX_SHARDS))
                .collect()
        } else {
            std::iter::once(queue_name.to_string())
                .chain((count..MAX_SHARDS).map(|i| shard_key(queue_name, i, MAX_SHARDS)))
                .collect()
        };
        Self {
            queue_name: queue_name.into(),
            keys: in_use.chain(retired).collect(),
            count,
        }
    }

    /// `QUEUE_NAME`.
    pub fn queue_name(&self) -> &str {
        &self.queue_name
    }

    /// How many shards are in use (`STREAM_SHARDS`).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Every shard's key in use, shard 0 first.
    pub fn keys(&self) -> &[String] {
        &self.keys[..self.count]
    }

    /// The key of shard `shard`: one in use (below [`Self::count`]) or a retired one.
    pub fn key(&self, shard: usize) -> &str {
        &self.keys[shard]
    }

    /// The retired shards: the keys of any other `STREAM_SHARDS`, which events may still wait in
    /// after the count changed.
    pub fn retired(&self) -> std::ops::Range<usize> {
        self.count..self.keys.len()
    }

    /// The shard of a user whose [`user_hash`] is `hash`.
    pub fn shard_of_hash(&self, hash: u64) -> usize {
        (hash % self.count as u64) as usize
    }

    /// The shard of `distinct_id`'s events.
    pub fn shard_of(&self, distinct_id: &str) -> usize {
        self.shard_of_hash(user_hash(distinct_id))
    }

    /// The lease of `shard` for consumer group `group` (the replica reading it, with a TTL):
    /// `{QUEUE_NAME:i}:owner:<group>`, in the shard's hash slot.
    pub fn lease_key(&self, shard: usize, group: &str) -> String {
        format!("{}:owner:{group}", self.key(shard))
    }

    /// The live replicas of consumer group `group` (sorted set: name → last seen, ms).
    pub fn replicas_key(&self, group: &str) -> String {
        format!("{}:replicas:{group}", self.queue_name)
    }

    /// Whether `key` is a shard of this stream under any `STREAM_SHARDS` (`QUEUE_NAME`, or
    /// `{QUEUE_NAME:i}`).
    pub fn is_shard_key(&self, key: &str) -> bool {
        let queue = &*self.queue_name;
        key == queue
            || key
                .strip_prefix('{')
                .and_then(|k| k.strip_suffix('}'))
                .and_then(|k| k.strip_prefix(queue))
                .and_then(|k| k.strip_prefix(':'))
                .is_some_and(|i| i.parse::<usize>().is_ok())
    }

    /// The key of the shard of `distinct_id`'s events.
    pub fn key_of(&self, distinct_id: &str) -> &str {
        self.key(self.shard_of(distinct_id))
    }
}

/// The length of every shard in use, shard 0 first: one `XLEN` each, pipelined on one Redis
/// (sent at once on a cluster).
pub async fn lengths(
    conn: &RedisConn,
    shards: &StreamShards,
) -> Result<Vec<u64>, redis::RedisError> {
    let xlen = |key: &String| redis::cmd("XLEN").arg(key).clone();
    query_all(conn, shards.keys().iter().map(xlen).collect()).await
}

/// The retired shards that still hold entries, with their lengths: one `XLEN` per retired key,
/// pipelined on one Redis (sent at once on a cluster). Callers sample it every few seconds: a
/// count that changed leaves up to [`MAX_SHARDS`] keys to look at.
pub async fn retired_lengths(
    conn: &RedisConn,
    shards: &StreamShards,
) -> Result<Vec<(usize, u64)>, redis::RedisError> {
    let retired = shards.retired();
    let xlens = retired
        .clone()
        .map(|shard| redis::cmd("XLEN").arg(shards.key(shard)).clone())
        .collect();
    let lens: Vec<u64> = query_all(conn, xlens).await?;
    Ok(retired.zip(lens).filter(|&(_, len)| len > 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shard_is_the_queue_itself_and_several_carry_their_own_hash_tag() {
        let one = StreamShards::new("event_stream", 1);
        assert_eq!(one.keys(), ["event_stream"]);
        assert_eq!(one.key_of("anyone"), "event_stream");
        let four = StreamShards::new("event_stream", 4);
        assert_eq!(
            four.keys(),
            [
                "{event_stream:0}",
                "{event_stream:1}",
                "{event_stream:2}",
                "{event_stream:3}"
            ]
        );
        let retired: Vec<&str> = four.retired().map(|i| four.key(i)).collect();
        assert_eq!(retired.len(), 1 + MAX_SHARDS - 4);
        assert_eq!(retired[..2], ["event_stream", "{event_stream:4}"]);
        assert_eq!(one.key(one.retired().start), "{event_stream:0}");
        for key in ["event_stream", "{event_stream:0}", "{event_stream:17}"] {
            assert!(four.is_shard_key(key), "{key}");
        }
        for key in ["other", "{event_stream}", "{event_stream:x}", "{other:1}"] {
            assert!(!four.is_shard_key(key), "{key}");
        }
    }

    #[test]
    fn a_user_always_maps_to_the_same_shard_and_users_spread_over_all() {
        // FNV-1a 64 published test vectors.
        assert_eq!(user_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(user_hash("a"), 0xaf63_dc4c_8601_ec8c);
        let shards = StreamShards::new("s", 8);
        assert_eq!(shards.shard_of("user-1"), shards.shard_of("user-1"));
        let mut seen = [0usize; 8];
        for i in 0..8_000 {
            seen[shards.shard_of(&format!("user-{i}"))] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "uneven spread: {seen:?}");
    }
}
