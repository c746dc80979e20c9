//! Shards owned, not shared: each shard is read by one replica at a time, so one user's events
//! are written by one writer in the whole fleet. With `STREAM_SHARDS` > 1 that is every shard in
//! use; with any count, the retired shards (of another `STREAM_SHARDS`) that still hold entries.
//!
//! A replica announces itself every third of `SHARD_LEASE_MS` (a sorted set of live replicas,
//! scored by when each last did), and wants the shards `i` with `i mod replicas == its rank` among
//! the live ones, sorted by name: of the shards in use (when there are several), and of the
//! retired ones whose `XLEN` is not 0 (looked at on the same tick). It takes a shard with a lease
//! (`SET NX PX`), renewed with a compare-and-set; it gives one up (a replica joined, or a retired
//! shard is empty) by stopping its feeders, waiting until the shard's entries it holds are stored
//! and acknowledged, then deleting the lease. A lease it could not renew is lost: its feeders
//! stop at once. A new owner first takes every entry still pending in the shard (`XAUTOCLAIM` idle
//! 0, the previous owner's after a crash), then reads on: a dead replica's shards move after the
//! lease ran out, a stopped one's as soon as it let go.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::Value;
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use super::{Context, read, route::Router};
use crate::stream::StreamError;

/// Renews the lease `KEYS[1]` for `ARGV[2]` ms if `ARGV[1]` holds it.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Deletes the lease `KEYS[1]` if `ARGV[1]` holds it.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
    return redis.call('DEL', KEYS[1]) else return 0 end";

/// A shard this replica holds the lease of.
struct Owned {
    /// Stops its reader and claimer.
    feeding: CancellationToken,
    /// The reader and claimer: done once both have stopped (aborted if this task is).
    feeders: AbortOnDropHandle<()>,
    /// Given up: its feeders are stopping; the lease goes once its held entries are done.
    leaving: bool,
}

/// Whether `shard` is one of another `STREAM_SHARDS` (drained, then let go).
fn is_retired(ctx: &Context, shard: usize) -> bool {
    shard >= ctx.streams.shards.count()
}

/// Takes, keeps and gives up shards until `shutdown`; then keeps renewing the leases it holds
/// (the writers are storing what was read) until `release`, and lets them all go.
pub(super) async fn own_shards(
    ctx: Arc<Context>,
    router: Router,
    shutdown: CancellationToken,
    release: CancellationToken,
) {
    let lease = ctx.config.shard_lease;
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owned: BTreeMap<usize, Owned> = BTreeMap::new();
    // Dropped at shutdown: the writers' queues close once every feeder has stopped.
    let mut router = Some(router);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // At once: the writers' queues close only when this router is dropped too.
            _ = shutdown.cancelled(), if router.is_some() => {}
            _ = release.cancelled() => break,
        }
        renew(&ctx, &mut owned).await;
        let Some(feeding_router) = router.as_ref().filter(|_| !shutdown.is_cancelled()) else {
            router = None;
            continue;
        };
        let wanted = match wanted_shards(&ctx).await {
            Ok(wanted) => wanted,
            Err(error) => {
                tracing::warn!(%error, "reading the live replicas failed");
                continue;
            }
        };
        for (&shard, state) in owned.iter_mut() {
            if !wanted.contains(&shard) && !state.leaving {
                if is_retired(&ctx, shard) {
                    tracing::info!(stream = %ctx.streams.shards.key(shard), "retired shard drained");
                } else {
                    tracing::info!(shard, "handing shard over");
                }
                state.leaving = true;
                state.feeding.cancel();
            }
        }
        let done: Vec<usize> = owned
            .iter()
            .filter(|(shard, state)| {
                state.leaving && state.feeders.is_finished() && ctx.held.count_in(**shard) == 0
            })
            .map(|(shard, _)| *shard)
            .collect();
        for shard in done {
            owned.remove(&shard);
            if let Err(error) = release_lease(&ctx, shard).await {
                tracing::warn!(%error, shard, "releasing a shard's lease failed (it expires)");
            }
            ctx.metrics.owned_shards.dec();
        }
        for shard in wanted {
            if owned.contains_key(&shard) {
                continue;
            }
            match take(&ctx, shard).await {
                Ok(true) => {
                    if is_retired(&ctx, shard) {
                        tracing::info!(
                            stream = %ctx.streams.shards.key(shard),
                            "draining a shard of another STREAM_SHARDS"
                        );
                    } else {
                        tracing::info!(shard, "shard taken");
                    }
                    ctx.metrics.owned_shards.inc();
                    let feeding = shutdown.child_token();
                    let feeders = AbortOnDropHandle::new(tokio::spawn(read::feed_shard(
                        ctx.clone(),
                        feeding_router.clone(),
                        shard,
                        feeding.clone(),
                    )));
                    owned.insert(
                        shard,
                        Owned {
                            feeding,
                            feeders,
                            leaving: false,
                        },
                    );
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, shard, "taking a shard failed"),
            }
        }
    }
    drop(router);
    for shard in owned.values_mut() {
        shard.feeding.cancel();
        let _ = (&mut shard.feeders).await;
    }
    for &shard in owned.keys() {
        if let Err(error) = release_lease(&ctx, shard).await {
            tracing::warn!(%error, shard, "releasing a shard's lease failed (it expires)");
        }
        ctx.metrics.owned_shards.dec();
    }
    if let Err(error) = leave(&ctx).await {
        tracing::debug!(%error, "leaving the live replicas failed (the entry ages out)");
    }
    if !owned.is_empty() {
        tracing::info!(shards = owned.len(), "shards handed over");
    }
}

/// Renews every lease held; a lease lost (expired and taken, or deleted) stops that shard's
/// feeders at once.
async fn renew(ctx: &Context, owned: &mut BTreeMap<usize, Owned>) {
    let mut lost = Vec::new();
    for &shard in owned.keys() {
        let renewed: Result<i64, redis::RedisError> = lease_eval(ctx, RENEW, shard)
            .arg(ctx.config.shard_lease.as_millis() as u64)
            .query_async(&mut ctx.streams.commands())
            .await;
        match renewed {
            Ok(1) => {}
            Ok(_) => lost.push(shard),
            // Redis unreachable: the lease may still be held; the next tick tries again.
            Err(error) => tracing::warn!(%error, shard, "renewing a shard's lease failed"),
        }
    }
    for shard in lost {
        tracing::warn!(shard, "shard lease lost: reading it stops");
        if let Some(state) = owned.remove(&shard) {
            state.feeding.cancel();
            ctx.metrics.owned_shards.dec();
        }
    }
}

/// Announces this replica and answers the shards it should own among the live replicas: its
/// share of the shards in use (when there are several) and of the retired ones holding entries.
async fn wanted_shards(ctx: &Context) -> Result<BTreeSet<usize>, StreamError> {
    let key = ctx.streams.shards.replicas_key(&ctx.config.consumer_group);
    let lease = ctx.config.shard_lease.as_millis() as u64;
    let now = now_ms();
    let (live,): (Vec<String>,) = redis::pipe()
        .cmd("ZADD")
        .arg(&key)
        .arg(now)
        .arg(&ctx.config.worker_name)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(&key)
        .arg("-inf")
        .arg(now.saturating_sub(lease))
        .ignore()
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(lease * 3)
        .ignore()
        .cmd("ZRANGE")
        .arg(&key)
        .arg(0)
        .arg(-1)
        .query_async(&mut ctx.streams.commands())
        .await?;
    let shards = &ctx.streams.shards;
    let in_use = if shards.count() > 1 {
        0..shards.count()
    } else {
        0..0
    };
    let retired = infra::shards::retired_lengths(&ctx.streams.commands(), shards).await?;
    Ok(assignment(
        &live,
        &ctx.config.worker_name,
        in_use.chain(retired.into_iter().map(|(shard, _)| shard)),
    ))
}

/// Which of `shards` `me` owns among the `live` replicas: `i mod live == rank of me` (names
/// sorted).
fn assignment(live: &[String], me: &str, shards: impl Iterator<Item = usize>) -> BTreeSet<usize> {
    let mut live: Vec<&str> = live.iter().map(String::as_str).collect();
    if !live.contains(&me) {
        live.push(me);
    }
    live.sort_unstable();
    live.dedup();
    let rank = live.iter().position(|r| *r == me).unwrap_or(0);
    shards.filter(|i| i % live.len() == rank).collect()
}

/// Takes `shard` if no replica holds it: the lease, then every entry still pending there.
async fn take(ctx: &Context, shard: usize) -> Result<bool, StreamError> {
    let taken: Value = redis::cmd("SET")
        .arg(
            ctx.streams
                .shards
                .lease_key(shard, &ctx.config.consumer_group),
        )
        .arg(&ctx.config.worker_name)
        .arg("NX")
        .arg("PX")
        .arg(ctx.config.shard_lease.as_millis() as u64)
        .query_async(&mut ctx.streams.commands())
        .await?;
    if matches!(taken, Value::Nil) {
        return Ok(false);
    }
    ctx.streams.ensure_group_on(shard).await?;
    let moved = ctx.streams.take_pending(shard).await?;
    if moved > 0 {
        tracing::info!(
            shard,
            entries = moved,
            "took over the shard's pending entries"
        );
        ctx.metrics.claimed.inc_by(moved as u64);
    }
    Ok(true)
}

async fn release_lease(ctx: &Context, shard: usize) -> Result<(), StreamError> {
    let _: i64 = lease_eval(ctx, RELEASE, shard)
        .query_async(&mut ctx.streams.commands())
        .await?;
    Ok(())
}

/// `EVAL script` on `shard`'s lease key with this replica's name, the compare-and-set both
/// renewing and releasing a lease take; a script's own arguments follow.
fn lease_eval(ctx: &Context, script: &str, shard: usize) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script)
        .arg(1)
        .arg(
            ctx.streams
                .shards
                .lease_key(shard, &ctx.config.consumer_group),
        )
        .arg(&ctx.config.worker_name);
    cmd
}

async fn leave(ctx: &Context) -> Result<(), StreamError> {
    let _: i64 = redis::cmd("ZREM")
        .arg(ctx.streams.shards.replicas_key(&ctx.config.consumer_group))
        .arg(&ctx.config.worker_name)
        .query_async(&mut ctx.streams.commands())
        .await?;
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_dealt_out_by_rank_among_the_live_replicas() {
        let live = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let of = |me: &str, names: &[&str]| assignment(&live(names), me, 0..8);
        assert_eq!(of("a", &[]), (0..8).collect());
        assert_eq!(of("b", &["b", "a"]), [1, 3, 5, 7].into());
        assert_eq!(of("a", &["b", "a"]), [0, 2, 4, 6].into());
        let three: Vec<BTreeSet<usize>> = ["a", "b", "c"]
            .iter()
            .map(|me| of(me, &["c", "a", "b"]))
            .collect();
        let all: BTreeSet<usize> = three.iter().flatten().copied().collect();
        assert_eq!(all.len(), 8, "every shard has one owner: {three:?}");
        assert!(three.iter().all(|s| s.len() >= 2), "{three:?}");
    }
}
