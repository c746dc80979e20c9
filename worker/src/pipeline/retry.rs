//! Retrying a step until it succeeds: one capped exponential backoff, and the loop that waits it
//! out between attempts unless the task is told to stop.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Capped exponential backoff: `first`, then twice the last delay, up to `max`.
pub(super) struct Backoff {
    next: Duration,
    first: Duration,
    max: Duration,
}

impl Backoff {
    pub(super) const fn new(first: Duration, max: Duration) -> Self {
        Self {
            next: first,
            first,
            max,
        }
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub(super) fn reset(&mut self) {
        self.next = self.first;
    }
}

/// Runs `attempt` until it succeeds, telling `failed` of each failure and the delay waited
/// before the next attempt; `None` once `stop` is cancelled (during an attempt or a wait).
pub(super) async fn retry<T, E, Fut>(
    mut backoff: Backoff,
    stop: &CancellationToken,
    mut attempt: impl FnMut() -> Fut,
    mut failed: impl FnMut(E, Duration),
) -> Option<T>
where
    Fut: Future<Output = Result<T, E>>,
{
    loop {
        let error = tokio::select! {
            result = attempt() => match result {
                Ok(value) => return Some(value),
                Err(error) => error,
            },
            _ = stop.cancelled() => return None,
        };
        let delay = backoff.next_delay();
        failed(error, delay);
        if !wait_out(delay, stop).await {
            return None;
        }
    }
}

/// Waits `delay` out; `false` if `stop` is cancelled first.
pub(super) async fn wait_out(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stop.cancelled() => false,
    }
}

/// [`retry`], each failure logged as one to `what`.
pub(super) async fn retry_logged<T, E, Fut>(
    what: &str,
    backoff: Backoff,
    stop: &CancellationToken,
    attempt: impl FnMut() -> Fut,
) -> Option<T>
where
    E: std::fmt::Display,
    Fut: Future<Output = Result<T, E>>,
{
    retry(backoff, stop, attempt, |error, delay| {
        tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "could not {what}; retrying")
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_start_again_after_a_reset() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(500));
        let delays: Vec<_> = (0..5).map(|_| backoff.next_delay()).collect();
        assert_eq!(delays, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), ms(100));
    }

    #[tokio::test]
    async fn a_step_is_retried_until_it_succeeds_or_the_task_stops() {
        let stop = CancellationToken::new();
        let backoff = || Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        let mut tries = 0;
        let mut waited = Vec::new();
        let attempt = || {
            tries += 1;
            let result = if tries < 3 { Err(tries) } else { Ok(tries) };
            async move { result }
        };
        let got = retry(backoff(), &stop, attempt, |_, delay| waited.push(delay)).await;
        assert_eq!(got, Some(3));
        assert_eq!(
            waited,
            [Duration::from_millis(10), Duration::from_millis(20)]
        );

        stop.cancel();
        let never = || async { Err::<(), _>("down") };
        assert_eq!(
            retry_logged("reach it", backoff(), &stop, never).await,
            None
        );
    }
}
