//! The rule set `explain_event` reads: `RULES_DIR`, loaded by the api itself (read-only) and
//! kept current by the rules engine's watcher, as the workers' is.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use rules_engine::{RuleSet, RulesHandle};
use tokio_util::sync::CancellationToken;

/// The live rules of `RULES_DIR`, or why there are none. A directory missing or invalid at start
/// leaves ingest and the context untouched: it is tried again on each use until it loads.
pub struct LiveRules {
    dir: PathBuf,
    handle: Mutex<Option<RulesHandle>>,
    shutdown: CancellationToken,
}

impl LiveRules {
    /// Loads `dir` and watches it until `shutdown`; a failure is logged, not fatal.
    pub fn load(dir: PathBuf, shutdown: CancellationToken) -> Self {
        let rules = Self {
            dir,
            handle: Mutex::new(None),
            shutdown,
        };
        if let Err(e) = rules.current() {
            tracing::warn!(error = %e, "rules not loaded: explain_event answers an error until they load");
        }
        rules
    }

    /// The rule set in force, or an error naming `RULES_DIR` and what is wrong with it.
    pub fn current(&self) -> Result<Arc<RuleSet>, String> {
        let mut handle = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(handle) = handle.as_ref() {
            return Ok(handle.current());
        }
        let loaded = RulesHandle::load_dir(&self.dir).map_err(|e| {
            format!(
                "the rules of RULES_DIR ({}) are not loaded: {e}",
                self.dir.display()
            )
        })?;
        match rules_engine::spawn_watcher(
            self.dir.clone(),
            loaded.clone(),
            self.shutdown.child_token(),
        ) {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "rules loaded but not watched: changes need a restart")
            }
        }
        tracing::info!(version = %loaded.status().version, dir = %self.dir.display(), "rules loaded for explain_event");
        let set = loaded.current();
        *handle = Some(loaded);
        Ok(set)
    }
}
