//! The rule engine: compiles `rules/*.yaml` (format in `rules/README.md`) and describes
//! clickstream events with it, as sentences and intent weights.

pub mod cli;
mod compile;
mod condition;
pub mod elements;
mod engine;
pub mod enrich;
mod locate;
mod model;
pub mod schema;
mod template;
mod watch;

#[cfg(test)]
mod authoring_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;

pub use compile::{DEFAULT_HALF_LIFE_SECS, MAX_FILE_BYTES, MAX_FILES, MAX_RULES, dir_version};
pub use engine::{
    Enrichment, EventInput, ExplainStep, Explanation, IntentDef, IntentHit, MAX_UNMATCHED_SHAPES,
    RuleSet, StepOutcome, UnmatchedCounter, UnmatchedShape, fallback_sentence,
};
pub use model::parse_duration;
pub use template::{MAX_VALUE_CHARS, MISSING};
pub use watch::{ReloadStatus, RulesHandle, WatchOptions, spawn_watcher, spawn_watcher_with};

/// A problem in a rule file, at `file:line:column`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Diagnostic {
    pub(crate) fn new(file: &str, line: usize, column: usize, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Why a rule set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", join(.0))]
    Invalid(Vec<Diagnostic>),
    #[error("rule set too large: {0}")]
    TooLarge(String),
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

impl RulesError {
    /// The file:line:column problems, if the files were readable but invalid.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            RulesError::Invalid(d) => d,
            _ => &[],
        }
    }
}

fn join(d: &[Diagnostic]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
