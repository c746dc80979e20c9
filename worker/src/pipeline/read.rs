//! The feeders of one shard: the reader (this consumer's own pending entries after a restart,
//! then new ones) and the claimer (entries idle too long at any consumer), each reading within
//! the read-ahead budget; and the keep-alive of the entries this replica holds (every shard's).

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use super::{
    Context,
    budget::{ENTRY_OVERHEAD_BYTES, Room},
    retry::{self, Backoff},
    route::Router,
};
use crate::stream::Entry;

/// The reader and the claimer of `shard` until `stop`.
pub(super) async fn feed_shard(
    ctx: Arc<Context>,
    router: Router,
    shard: usize,
    stop: CancellationToken,
) {
    let own_pending_read = CancellationToken::new();
    tokio::join!(
        read_loop(
            ctx.clone(),
            router.clone(),
            shard,
            own_pending_read.clone(),
            stop.clone()
        ),
        claim_loop(ctx, router, shard, own_pending_read, stop),
    );
}

/// Re-reads this consumer's own pending entries of `shard` (a restart), then cancels
/// `own_pending_read` (as it does when it ends) and reads new ones.
async fn read_loop(
    ctx: Arc<Context>,
    router: Router,
    shard: usize,
    own_pending_read: CancellationToken,
    shutdown: CancellationToken,
) {
    let _own_pending_read = own_pending_read.clone().drop_guard();
    let reader = match ctx.streams.reader() {
        Ok(reader) => reader,
        Err(error) => {
            tracing::error!(%error, shard, "no connection to read the stream with");
            return;
        }
    };
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut history = Some("0".to_string());
    let mut size = ReadSize::new(ctx.config.batch_size, ctx.config.max_event_bytes);
    while !shutdown.is_cancelled() {
        let Some(room) = room_for(&router, size.next(), &shutdown, "reading").await else {
            break;
        };
        match ctx
            .streams
            .read(&reader, shard, history.as_deref(), room.count())
            .await
        {
            Ok(entries) => {
                backoff.reset();
                size.read(&entries);
                if let Some(after) = history.as_mut() {
                    match entries.last() {
                        Some(last) => {
                            tracing::info!(
                                count = entries.len(),
                                shard,
                                "re-reading own pending entries"
                            );
                            after.clone_from(&last.id);
                        }
                        None => {
                            history = None;
                            own_pending_read.cancel();
                        }
                    }
                }
                let entries = ctx.held.hold_new(entries);
                room.hold(&entries);
                if entries.is_empty() {
                    continue;
                }
                if !router.send(entries) {
                    tracing::error!("writers stopped: reading stops");
                    break;
                }
            }
            Err(error) => {
                drop(room);
                let delay = backoff.next_delay();
                tracing::warn!(%error, shard, retry_in_ms = delay.as_millis() as u64, "reading the stream failed; retrying");
                if error.is_no_group()
                    && let Err(error) = ctx.streams.ensure_group_on(shard).await
                {
                    tracing::warn!(%error, "could not recreate the consumer group");
                }
                if !retry::wait_out(delay, &shutdown).await {
                    break;
                }
            }
        }
    }
}

/// Every `CLAIM_INTERVAL`, from when `own_pending_read`: takes over entries of `shard` idle
/// longer than `CLAIM_IDLE_MS` (a crashed or stuck replica's), then removes consumers that are
/// gone and own nothing.
async fn claim_loop(
    ctx: Arc<Context>,
    router: Router,
    shard: usize,
    own_pending_read: CancellationToken,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = own_pending_read.cancelled() => {}
        _ = shutdown.cancelled() => return,
    }
    let mut ticker = tokio::time::interval(ctx.config.claim_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let consumer_idle = ctx.config.claim_idle.max(ctx.config.flush_interval * 4);
    let mut size = ReadSize::new(ctx.config.batch_size, ctx.config.max_event_bytes);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let mut cursor = "0-0".to_string();
        loop {
            let Some(room) = room_for(&router, size.next(), &shutdown, "claiming").await else {
                return;
            };
            match ctx
                .streams
                .claim(shard, ctx.config.claim_idle, &cursor, room.count())
                .await
            {
                Ok((entries, next)) => {
                    size.read(&entries);
                    let entries = ctx.held.hold_new(entries);
                    room.hold(&entries);
                    if !entries.is_empty() {
                        tracing::info!(
                            count = entries.len(),
                            shard,
                            "claimed idle entries of other consumers"
                        );
                        ctx.metrics.claimed.inc_by(entries.len() as u64);
                        if !router.send(entries) {
                            tracing::error!("writers stopped: claiming stops");
                            return;
                        }
                    }
                    if next == "0-0" || shutdown.is_cancelled() {
                        break;
                    }
                    cursor = next;
                }
                Err(error) => {
                    tracing::warn!(%error, "claiming idle entries failed");
                    break;
                }
            }
        }
        match ctx
            .streams
            .remove_idle_consumers(shard, consumer_idle)
            .await
        {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "removed idle consumers that own nothing")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "removing idle consumers failed"),
        }
    }
}

/// Room for a feeder's next read of up to `at_most` entries; `None` once shutdown begins, or
/// once the writers are gone (logged: `doing` stops).
async fn room_for<'r>(
    router: &'r Router,
    at_most: usize,
    shutdown: &CancellationToken,
    doing: &str,
) -> Option<Room<'r>> {
    let room = tokio::select! {
        room = router.room(at_most) => room,
        _ = shutdown.cancelled() => return None,
    };
    if room.is_none() {
        tracing::error!("writers stopped: {doing} stops");
    }
    room
}

/// Keeps entries this replica holds from looking idle to the claimers of other replicas while a
/// batch waits (e.g. for Postgres to come back), without counting a delivery.
pub(super) async fn keep_alive_loop(ctx: Arc<Context>, stop: CancellationToken) {
    let period = ctx.config.claim_idle / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.cancelled() => return,
        }
        let ids = ctx.held.older_than(period);
        if ids.is_empty() {
            continue;
        }
        match ctx.streams.keep_alive(&ids).await {
            Ok(()) => tracing::debug!(count = ids.len(), "refreshed held entries"),
            Err(error) => tracing::warn!(%error, "refreshing held entries failed"),
        }
    }
}

/// How many entries one feeder's next read asks for at most: one at first, twice as many after
/// each read, up to `BATCH_SIZE`; one again after a read brought an entry larger than
/// `MAX_EVENT_BYTES`. A replica restarting on (or taking over) entries queued before the api
/// refused large events thus reads them one at a time, not a budget's worth at once.
pub(super) struct ReadSize {
    next: usize,
    max: usize,
    largest_expected: usize,
}

impl ReadSize {
    fn new(batch_size: usize, max_event_bytes: usize) -> Self {
        Self {
            next: 1,
            max: batch_size.max(1),
            largest_expected: max_event_bytes + ENTRY_OVERHEAD_BYTES,
        }
    }

    fn next(&self) -> usize {
        self.next
    }

    /// What the last read brought; logs the entries larger than expected.
    fn read(&mut self, entries: &[Entry]) {
        let mut larger = entries
            .iter()
            .filter(|e| e.bytes() > self.largest_expected)
            .peekable();
        if larger.peek().is_none() {
            self.next = (self.next * 2).min(self.max);
            return;
        }
        self.next = 1;
        for entry in larger {
            tracing::warn!(
                id = %entry.id,
                bytes = entry.bytes(),
                max_event_bytes = self.largest_expected - ENTRY_OVERHEAD_BYTES,
                "entry larger than MAX_EVENT_BYTES (queued before the api refused such events?): \
                 taken anyway; reading one entry at a time for now"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fixtures::{of_user, weighing};

    #[test]
    fn reads_start_at_one_entry_and_double_up_to_the_batch_size_and_again_after_a_large_one() {
        let mut size = ReadSize::new(10, 1_000);
        let small = [of_user(0, "a")];
        let mut asked = vec![size.next()];
        for _ in 0..5 {
            size.read(&small);
            asked.push(size.next());
        }
        assert_eq!(asked, [1, 2, 4, 8, 10, 10]);
        let largest = 1_000 + ENTRY_OVERHEAD_BYTES;
        size.read(&[of_user(1, "a"), weighing(2, "a", largest + 1)]);
        assert_eq!(
            size.next(),
            1,
            "a larger entry than expected: one at a time"
        );
        size.read(&[weighing(3, "a", largest)]);
        assert_eq!(
            size.next(),
            2,
            "one of the largest size expected is no surprise"
        );
    }
}
