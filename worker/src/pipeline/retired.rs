//! Shards of another `STREAM_SHARDS` (retired after the count changed): every replica reads the
//! ones that still hold entries, through the consumer group, until they are empty, so changing
//! the count loses nothing.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use super::{Context, read, route::Router};

/// How often the retired shards are looked at (apis still running the old count may add to
/// them during a rolling change).
const SCAN_EVERY: Duration = Duration::from_secs(5);

/// Until `shutdown`: feeds every retired shard that holds entries, and stops once it is empty.
pub(super) async fn drain_retired(ctx: Arc<Context>, router: Router, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SCAN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut draining: BTreeMap<usize, (CancellationToken, AbortOnDropHandle<()>)> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let shards = &ctx.streams.shards;
        let retired = shards.retired();
        let xlens = retired
            .clone()
            .map(|shard| redis::cmd("XLEN").arg(shards.key(shard)).clone())
            .collect();
        let lens: Vec<u64> = match infra::redis::query_all(&ctx.streams.commands(), xlens).await {
            Ok(lens) => lens,
            Err(error) => {
                tracing::warn!(%error, "reading the retired shards' lengths failed");
                continue;
            }
        };
        for (shard, len) in retired.zip(lens) {
            match (len, draining.contains_key(&shard)) {
                (0, true) => {
                    if let Some((stop, _)) = draining.remove(&shard) {
                        stop.cancel();
                    }
                    tracing::info!(stream = %shards.key(shard), "retired shard drained");
                }
                (1.., false) => {
                    tracing::info!(
                        stream = %shards.key(shard),
                        entries = len,
                        "draining a shard of another STREAM_SHARDS"
                    );
                    let stop = shutdown.child_token();
                    let feeders = AbortOnDropHandle::new(tokio::spawn(read::feed_shard(
                        ctx.clone(),
                        router.clone(),
                        shard,
                        stop.clone(),
                    )));
                    draining.insert(shard, (stop, feeders));
                }
                _ => {}
            }
        }
    }
    drop(router);
    for (_, (stop, feeders)) in draining {
        stop.cancel();
        let _ = feeders.await;
    }
}
