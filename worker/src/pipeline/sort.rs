//! Sorting a batch's entries: events to store (decoded and enriched), poison for the dead-letter
//! stream, and entries only to acknowledge.

use std::panic::AssertUnwindSafe;

use rules_engine::enrich::Describer;

use super::Context;
use crate::{
    store::{self, StoredEvent},
    stream::{Entry, EntryId},
};

/// Entries decoded and enriched between two yields to the other tasks.
const YIELD_EVERY: usize = 32;

/// Why an entry goes to the dead-letter stream: a metric label and the stored error.
pub(super) struct Poison {
    pub(super) reason: &'static str,
    pub(super) error: String,
}

impl Poison {
    pub(super) fn new(reason: &'static str, error: String) -> Self {
        Poison { reason, error }
    }
}

/// A batch's entries, sorted.
pub(super) struct Sorted {
    /// Ids to acknowledge as they are: pending entries no longer in the stream.
    pub(super) ack: Vec<EntryId>,
    /// Entries for the dead-letter stream, and why.
    pub(super) poison: Vec<(Entry, Poison)>,
    /// Entries to store, with their rows.
    pub(super) good: Vec<(Entry, StoredEvent)>,
}

/// Decodes and enriches each entry of `batch` with `describer`. Poison: entries delivered more than
/// `MAX_DELIVERIES` times, undecodable ones, and those the rules fail (or panic) on. Counts
/// redeliveries and rule matches.
pub(super) async fn sort(ctx: &Context, batch: Vec<Entry>, describer: &dyn Describer) -> Sorted {
    let entries = batch.len();
    let metrics = &ctx.metrics;
    let mut ack: Vec<EntryId> = Vec::with_capacity(entries);
    let mut poison: Vec<(Entry, Poison)> = Vec::new();
    let mut good: Vec<(Entry, StoredEvent)> = Vec::with_capacity(entries);
    for (i, entry) in batch.into_iter().enumerate() {
        if i > 0 && i % YIELD_EVERY == 0 {
            // Decoding and enriching a large batch is CPU work without an await: let the other
            // writers' transactions move on meanwhile (their backends wait, holding their locks).
            tokio::task::yield_now().await;
        }
        if entry.fields.is_empty() {
            tracing::warn!(id = %entry.id, "pending entry no longer in the stream: acknowledging it");
            ack.push(entry.entry_id());
            continue;
        }
        if entry.deliveries > 1 {
            metrics.redeliveries.inc();
        }
        if entry.deliveries > ctx.config.max_deliveries {
            let error = format!(
                "delivered {} times, more than MAX_DELIVERIES={}",
                entry.deliveries, ctx.config.max_deliveries
            );
            poison.push((entry, Poison::new("max_deliveries", error)));
            continue;
        }
        let described = store::decode(|name| entry.field(name), describer)
            .map_err(|e| Poison::new("undecodable", format!("undecodable entry: {e}")))
            .and_then(|(envelope, written)| {
                let enrich = || describer.enrich_written(&envelope, written);
                match std::panic::catch_unwind(AssertUnwindSafe(enrich)) {
                    Ok(Ok(enrichment)) => Ok(StoredEvent::new(envelope, enrichment, written)),
                    Ok(Err(e)) => Err(Poison::new(
                        "enrichment_failed",
                        format!("enrichment failed: {e}"),
                    )),
                    Err(_) => Err(Poison::new(
                        "enrichment_failed",
                        "enrichment panicked".to_string(),
                    )),
                }
            });
        match described {
            Ok(event) => {
                match &event.rule_id {
                    Some(rule) => metrics.rules_matched.with_label_values(&[rule]).inc(),
                    None => metrics.rules_unmatched.inc(),
                }
                good.push((entry, event))
            }
            Err(error) => poison.push((entry, error)),
        }
    }
    Sorted { ack, poison, good }
}
