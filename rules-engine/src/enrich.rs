//! How the worker describes events: a [`Describer`] (one loaded rule set) handed out by an
//! [`Enricher`] (where the current one comes from), and [`NoRules`] for tests and tools.

use std::{path::Path, sync::Arc};

use entity::Envelope;
use tokio_util::sync::CancellationToken;

use crate::condition::url_path;
use crate::{EventInput, RuleSet, RulesHandle};

pub use crate::{Enrichment, IntentHit};

/// An event the rules could not describe; it goes to the DLQ with this text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct EnrichError(pub String);

/// One loaded, immutable way of describing events, named by its version.
pub trait Describer: Send + Sync {
    /// Content hash naming this describer; stored with every event it described.
    fn version(&self) -> &str;
    /// Describes one event.
    fn enrich(&self, event: &Envelope) -> Result<Enrichment, EnrichError>;

    /// Whether describing an event may read its top-level property `key`. The worker decodes
    /// only the properties this accepts (and those it stores itself); all of them by default.
    fn reads_property(&self, _key: &str) -> bool {
        true
    }

    /// Describes one event whose `properties` may hold only the keys [`Self::reads_property`]
    /// accepts, `written` being all of them as JSON text (kept in unmatched-event examples).
    fn enrich_written(
        &self,
        event: &Envelope,
        _written: Option<&str>,
    ) -> Result<Enrichment, EnrichError> {
        self.enrich(event)
    }
}

/// Where the current [`Describer`] comes from. The pipeline takes one per batch, so a batch is
/// described by one version even while the rules reload.
pub trait Enricher: Send + Sync {
    fn describer(&self) -> Arc<dyn Describer>;

    /// The rule engine's handle, when the rules come from files (reload status, unmatched counts).
    fn rules(&self) -> Option<RulesHandle> {
        None
    }
}

/// Describes events without rules: see [`without_rules`].
pub struct NoRules;

/// Version stored for events described by [`NoRules`].
pub const NO_RULES_VERSION: &str = "fallback";

impl Describer for NoRules {
    fn version(&self) -> &str {
        NO_RULES_VERSION
    }

    fn enrich(&self, event: &Envelope) -> Result<Enrichment, EnrichError> {
        Ok(without_rules(event))
    }
}

/// An event described without rules: `Viewed page: <path>` for pageviews, `Triggered '<event>'`
/// otherwise, the name as sent (unlike [`crate::fallback_sentence`], which cleans it).
pub fn without_rules(event: &Envelope) -> Enrichment {
    let page = || {
        let path = event
            .properties
            .get("$pathname")
            .and_then(|v| v.as_str())
            .filter(|p| !p.is_empty());
        path.map(str::to_string).or_else(|| {
            let url = event.properties.get("$current_url")?.as_str()?;
            Some(absolute_url_path(url).unwrap_or(url).to_string())
        })
    };
    let description = match (event.event.as_str(), page()) {
        ("$pageview", Some(path)) => format!("Viewed page: {path}"),
        (name, _) => format!("Triggered '{name}'"),
    };
    Enrichment {
        description,
        rule_id: None,
        intents: Vec::new(),
        matched: false,
        ignored: false,
    }
}

/// The path of an absolute URL as the stored `path` column keeps it (`https://x.test/a/?q` →
/// `/a/`); `None` for a relative URL, which only conditions (`url_path`) read a path from.
pub fn absolute_url_path(url: &str) -> Option<&str> {
    if url.contains("://") {
        url_path(url)
    } else {
        None
    }
}

impl Describer for RuleSet {
    fn version(&self) -> &str {
        RuleSet::version(self)
    }

    fn enrich(&self, event: &Envelope) -> Result<Enrichment, EnrichError> {
        self.enrich_written(event, None)
    }

    fn reads_property(&self, key: &str) -> bool {
        RuleSet::reads_property(self, key)
    }

    fn enrich_written(
        &self,
        event: &Envelope,
        written: Option<&str>,
    ) -> Result<Enrichment, EnrichError> {
        let input = EventInput {
            event: &event.event,
            distinct_id: &event.distinct_id,
            properties: &event.properties,
            properties_text: written,
            elements_chain: event.elements_chain.as_deref(),
            person_properties: event.person.as_ref().map(|p| &p.properties),
        };
        Ok(RuleSet::enrich(self, &input))
    }
}

impl Enricher for RulesHandle {
    fn describer(&self) -> Arc<dyn Describer> {
        self.current()
    }

    fn rules(&self) -> Option<RulesHandle> {
        Some(self.clone())
    }
}

/// The rules of `rules_dir`, reloaded when the directory changes until `shutdown`. An invalid
/// directory at start is an error (file:line:column); an invalid edit later keeps the old rules.
pub fn load(
    rules_dir: &Path,
    shutdown: &CancellationToken,
) -> Result<Arc<dyn Enricher>, EnrichError> {
    let handle = RulesHandle::load_dir(rules_dir)
        .map_err(|e| EnrichError(format!("{}: {e}", rules_dir.display())))?;
    crate::spawn_watcher(rules_dir.to_path_buf(), handle.clone(), shutdown.clone())
        .map_err(|e| EnrichError(e.to_string()))?;
    tracing::info!(rules_dir = %rules_dir.display(), version = %handle.current().version(), "rules loaded");
    Ok(Arc::new(handle))
}

/// The rules of `rules_dir` once, without watching (tools and benchmarks).
pub fn load_once(rules_dir: &Path) -> Result<Arc<dyn Describer>, EnrichError> {
    let set = RuleSet::load_dir(rules_dir)
        .map_err(|e| EnrichError(format!("{}: {e}", rules_dir.display())))?;
    Ok(Arc::new(set))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, props: serde_json::Value) -> Envelope {
        Envelope {
            uuid: uuid::Uuid::now_v7(),
            distinct_id: "u".into(),
            event: name.into(),
            properties: props.as_object().cloned().unwrap_or_default(),
            timestamp: chrono::Utc::now(),
            received_at: chrono::Utc::now(),
            sent_at: None,
            session_id: None,
            lib: None,
            elements_chain: None,
            person: None,
        }
    }

    #[test]
    fn events_without_rules() {
        let pv = event(
            "$pageview",
            serde_json::json!({"$current_url": "https://x.test/pricing?plan=pro"}),
        );
        assert_eq!(without_rules(&pv).description, "Viewed page: /pricing");
        let pv = event("$pageview", serde_json::json!({"$pathname": "/docs"}));
        assert_eq!(without_rules(&pv).description, "Viewed page: /docs");
        let pv = event("$pageview", serde_json::json!({"$current_url": "/a?b"}));
        assert_eq!(without_rules(&pv).description, "Viewed page: /a?b");
        let custom = event("signup_completed", serde_json::json!({}));
        assert_eq!(
            without_rules(&custom).description,
            "Triggered 'signup_completed'"
        );
        assert!(!without_rules(&custom).matched);
        // The name as sent; the rule set's fallback sentence cleans it.
        let odd = event("a\nb", serde_json::json!({}));
        assert_eq!(without_rules(&odd).description, "Triggered 'a\nb'");
        assert_eq!(crate::fallback_sentence("a\nb"), "Triggered 'a b'");
    }

    /// The stored `path` column ([`absolute_url_path`]) and `path` conditions ([`url_path`]) read
    /// URLs alike, except that only conditions take a bare path.
    #[test]
    fn url_paths() {
        for (url, stored, conditions) in [
            (
                "https://x.test/pricing?a=1",
                Some("/pricing"),
                Some("/pricing"),
            ),
            (
                "https://x.test/pricing/#top",
                Some("/pricing/"),
                Some("/pricing/"),
            ),
            ("https://x.test", Some("/"), Some("/")),
            ("https://x.test?next=/a", Some("/"), Some("/")),
            ("https://x.test#/route", Some("/"), Some("/")),
            ("/docs?a=1", None, Some("/docs")),
            ("nonsense", None, None),
        ] {
            assert_eq!(absolute_url_path(url), stored, "{url}");
            assert_eq!(url_path(url), conditions, "{url}");
        }
    }
}
