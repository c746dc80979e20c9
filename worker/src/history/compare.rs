//! Two descriptions of the same stored events side by side, summarised for a reviewer: how many
//! change sentence or intents, grouped by rule and by sentence, with examples. Used by
//! `worker rules shadow` (live → candidate) and `worker rules reenrich --dry-run` (stored → live).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use super::{Description, StoredRow};

/// Examples kept per sentence change.
const EXAMPLES: usize = 3;
/// Sentence changes printed.
const SENTENCES_SHOWN: usize = 15;

/// The summary of a comparison.
#[derive(Debug, Default)]
pub struct Comparison {
    pub events: usize,
    pub sentence_changed: usize,
    pub intents_changed: usize,
    /// The old side described (or ignored) them, the new one leaves them to the fallback.
    pub newly_unmatched: usize,
    /// The old side left them to the fallback, the new one describes (or ignores) them.
    pub newly_matched: usize,
    /// (old rule, new rule) → events, for events whose description changed.
    pub by_rule: BTreeMap<(String, String), usize>,
    /// (old sentence, new sentence) → events and a few examples (distinct_id, uuid).
    pub by_sentence: HashMap<(String, String), (usize, Vec<String>)>,
}

impl Comparison {
    /// Counts one event described as `old` and as `new`.
    pub fn add(&mut self, row: &StoredRow, old: &Description, new: &Description) {
        self.events += 1;
        let sentence = old.sentence != new.sentence;
        let intents = old.intents != new.intents;
        self.sentence_changed += usize::from(sentence);
        self.intents_changed += usize::from(intents);
        self.newly_unmatched += usize::from(old.matched && !new.matched);
        self.newly_matched += usize::from(!old.matched && new.matched);
        if sentence || intents || old.rule_id != new.rule_id {
            *self
                .by_rule
                .entry((old.rule_shown().to_owned(), new.rule_shown().to_owned()))
                .or_default() += 1;
        }
        if sentence {
            let (n, examples) = self
                .by_sentence
                .entry((old.shown().to_owned(), new.shown().to_owned()))
                .or_default();
            *n += 1;
            if examples.len() < EXAMPLES {
                examples.push(format!(
                    "{} at {} ({})",
                    row.distinct_id,
                    row.timestamp
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    row.uuid
                ));
            }
        }
    }

    /// The summary as text; `old` and `new` name the two sides (e.g. `live`, `candidate`).
    pub fn render(&self, old: &str, new: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} events compared: sentence changed for {}, intents changed for {}; \
             {} described by {old} are left unmatched by {new}, {} unmatched by {old} are described by {new}",
            self.events,
            self.sentence_changed,
            self.intents_changed,
            self.newly_unmatched,
            self.newly_matched
        );
        if self.by_rule.is_empty() {
            let _ = writeln!(out, "no event is described differently");
            return out;
        }
        let _ = writeln!(out, "\nby rule ({old} → {new}):");
        let mut rules: Vec<_> = self.by_rule.iter().collect();
        rules.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for ((from, to), n) in rules {
            let _ = writeln!(out, "  {n:>7}  {from} → {to}");
        }
        if !self.by_sentence.is_empty() {
            let _ = writeln!(out, "\nby sentence ({old} → {new}), most frequent first:");
            let mut sentences: Vec<_> = self.by_sentence.iter().collect();
            sentences.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(b.0)));
            for ((from, to), (n, examples)) in sentences.iter().take(SENTENCES_SHOWN) {
                let _ = writeln!(out, "  {n:>7}  {from:?} → {to:?}");
                for e in examples {
                    let _ = writeln!(out, "           e.g. {e}");
                }
            }
            if sentences.len() > SENTENCES_SHOWN {
                let _ = writeln!(
                    out,
                    "  … and {} more sentence changes",
                    sentences.len() - SENTENCES_SHOWN
                );
            }
        }
        out
    }
}
