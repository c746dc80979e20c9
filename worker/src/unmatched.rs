//! A replica's part in the shared unmatched-events report ([`infra::unmatched`]): flushing its
//! counts and pruning what a reload now describes.

use std::sync::Arc;

use infra::unmatched::{FLUSH_INTERVAL, UnmatchedReport};
use rules_engine::RulesHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::WorkerMetrics;

/// Adds this replica's unmatched counts to the report every [`FLUSH_INTERVAL`] (counts that
/// cannot be written while Redis is down are kept for the next flush; events beyond the shapes a
/// replica holds are counted in `clickstream_rules_unmatched_unreported_total`); after each
/// reload, records it in the metrics and drops the shapes the new rules describe. Ends when
/// `shutdown` fires, after a last flush.
pub async fn report_loop(
    rules: RulesHandle,
    report: UnmatchedReport,
    metrics: Arc<WorkerMetrics>,
    shutdown: CancellationToken,
) {
    let mut reloads = rules.subscribe();
    let mut seen_attempts = reloads.borrow_and_update().attempts;
    metrics.set_rules_version(rules.current().version());
    let mut pruned_version = None;
    let mut overflow_seen = 0;
    let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            changed = reloads.changed() => {
                if changed.is_err() {
                    return;
                }
                let status = reloads.borrow_and_update().clone();
                if status.attempts != seen_attempts {
                    seen_attempts = status.attempts;
                    let result = if status.error.is_some() { "failed" } else { "ok" };
                    metrics.rules_reloads.with_label_values(&[result]).inc();
                    metrics.set_rules_version(&status.version);
                }
                false
            }
            _ = shutdown.cancelled() => true,
        };
        let overflow = rules.unmatched().overflow();
        metrics
            .rules_unmatched_unreported
            .inc_by(overflow.saturating_sub(overflow_seen));
        overflow_seen = overflow;
        let shapes = rules.unmatched().take();
        if let Err(error) = report.add(&shapes).await {
            tracing::warn!(%error, shapes = shapes.len(), "could not add to the unmatched-events report: kept for the next flush");
            rules.unmatched().restore(shapes);
        }
        let current = rules.current();
        if pruned_version.as_deref() != Some(current.version()) {
            match report.prune(&current).await {
                Ok(dropped) => {
                    if dropped > 0 {
                        tracing::info!(
                            dropped,
                            version = current.version(),
                            "unmatched-events report: shapes the new rules describe dropped"
                        );
                    }
                    pruned_version = Some(current.version().to_owned());
                }
                Err(error) => tracing::warn!(%error, "could not prune the unmatched-events report"),
            }
        }
        if stopping {
            return;
        }
    }
}
