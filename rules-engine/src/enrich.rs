//! The enrichment interface between the pipeline and the rule engine (`crate::rules`), and plain
//! fallback sentences (for tests and tools).
//!
//! The pipeline asks an [`Enricher`] for the current [`Ruleset`] once per batch, so every event of
//! a batch is described by the same ruleset and stored with its version.

use std::{path::Path, sync::Arc};

use entity::Envelope;
use tokio_util::sync::CancellationToken;

use crate::{EventInput, RuleSet, RulesHandle};

pub use crate::{Enrichment, IntentHit};

/// An event the rules could not describe; it goes to the DLQ with this text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct EnrichError(pub String);

/// A loaded, immutable set of translations.
pub trait Ruleset: Send + Sync {
    /// Content hash naming this ruleset; stored with every event it described.
    fn version(&self) -> &str;
    /// Describes one event.
    fn enrich(&self, event: &Envelope) -> Result<Enrichment, EnrichError>;

    /// Whether describing an event may read its top-level property `key`. The worker decodes
    /// only the properties this accepts (and those it stores itself); all of them by default.
    fn reads_property(&self, _key: &str) -> bool {
        true
    }

    /// Describes one event whose `properties` may hold only the keys [`Self::reads_property`]
    /// accepts, `written` being all of them as JSON text, for what keeps whole events (the
    /// examples of unmatched ones).
    fn enrich_written(
        &self,
        event: &Envelope,
        _written: Option<&str>,
    ) -> Result<Enrichment, EnrichError> {
        self.enrich(event)
    }
}

/// The source of the current ruleset (the rule engine swaps it on reload).
pub trait Enricher: Send + Sync {
    fn ruleset(&self) -> Arc<dyn Ruleset>;

    /// The rule engine's handle, when the rules come from files (reload status, unmatched counts).
    fn rules(&self) -> Option<RulesHandle> {
        None
    }
}

/// An [`Enricher`] that always hands out the same ruleset.
pub struct Fixed(pub Arc<dyn Ruleset>);

impl Enricher for Fixed {
    fn ruleset(&self) -> Arc<dyn Ruleset> {
        self.0.clone()
    }
}

/// Plain sentences without rules: `Viewed page: <path>` for pageviews, `Triggered '<event>'` otherwise.
pub struct Fallback;

/// Version stored for events described by [`Fallback`].
pub const FALLBACK_VERSION: &str = "fallback";

impl Ruleset for Fallback {
    fn version(&self) -> &str {
        FALLBACK_VERSION
    }

    fn enrich(&self, event: &Envelope) -> Result<Enrichment, EnrichError> {
        Ok(fallback(event))
    }
}

/// The fallback description of an event.
pub fn fallback(event: &Envelope) -> Enrichment {
    let page = || {
        let path = event
            .properties
            .get("$pathname")
            .and_then(|v| v.as_str())
            .filter(|p| !p.is_empty());
        path.map(str::to_string).or_else(|| {
            let url = event.properties.get("$current_url")?.as_str()?;
            Some(url_path(url).unwrap_or(url).to_string())
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
    }
}

/// The path of an absolute URL (`https://x.test/pricing?a=1` → `/pricing`).
pub fn url_path(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let path = &rest[rest.find('/').unwrap_or(rest.len())..];
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    Some(if path.is_empty() { "/" } else { path })
}

impl Ruleset for RuleSet {
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
    fn ruleset(&self) -> Arc<dyn Ruleset> {
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
pub fn load_once(rules_dir: &Path) -> Result<Arc<dyn Ruleset>, EnrichError> {
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
    fn fallback_sentences() {
        let pv = event(
            "$pageview",
            serde_json::json!({"$current_url": "https://x.test/pricing?plan=pro"}),
        );
        assert_eq!(fallback(&pv).description, "Viewed page: /pricing");
        let pv = event("$pageview", serde_json::json!({"$pathname": "/docs"}));
        assert_eq!(fallback(&pv).description, "Viewed page: /docs");
        let custom = event("signup_completed", serde_json::json!({}));
        assert_eq!(
            fallback(&custom).description,
            "Triggered 'signup_completed'"
        );
        assert!(!fallback(&custom).matched);
        assert_eq!(url_path("https://x.test"), Some("/"));
        assert_eq!(url_path("nonsense"), None);
    }
}
