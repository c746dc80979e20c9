//! Typed reading of configuration variables, shared by the `api` and `worker` configs.
//!
//! Values come from a lookup function so tests can build configs from plain maps;
//! binaries pass [`Vars::from_env`].

use std::{collections::HashMap, fmt::Display, str::FromStr, time::Duration};

/// A bad or missing configuration value, naming the variable at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error: {var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(var: &str, message: impl Into<String>) -> Self {
        Self {
            var: var.to_string(),
            message: message.into(),
        }
    }
}

/// Looks a variable up by name.
type Lookup = dyn Fn(&str) -> Option<String> + Send + Sync;

/// A source of configuration variables.
pub struct Vars {
    lookup: Box<Lookup>,
}

impl Vars {
    /// Reads the process environment (after `.env` was loaded by the binary).
    pub fn from_env() -> Self {
        Self {
            lookup: Box::new(|name| std::env::var(name).ok()),
        }
    }

    /// Reads from a fixed map: for tests and tools.
    pub fn from_map<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let map: HashMap<String, String> = pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        Self {
            lookup: Box::new(move |name| map.get(name).cloned()),
        }
    }

    /// The raw value, with empty strings treated as unset.
    pub fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|v| !v.trim().is_empty())
    }

    /// A string with a default.
    pub fn string(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or_else(|| default.to_string())
    }

    /// A value that must be set.
    pub fn required(&self, name: &str) -> Result<String, ConfigError> {
        self.get(name)
            .ok_or_else(|| ConfigError::new(name, "is required but not set"))
    }

    /// A parsed value with a default.
    pub fn parse<T>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|e| ConfigError::new(name, format!("invalid value {raw:?}: {e}"))),
        }
    }

    /// A boolean (`true/false/1/0/yes/no/on/off`) with a default.
    pub fn flag(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => match raw.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Ok(true),
                "0" | "false" | "no" | "off" => Ok(false),
                _ => Err(ConfigError::new(
                    name,
                    format!("invalid value {raw:?}: expected true or false"),
                )),
            },
        }
    }

    /// A duration given in (fractional) seconds, e.g. `FLUSH_INTERVAL=2.0`.
    pub fn seconds(&self, name: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    ConfigError::new(
                        name,
                        format!("invalid value {raw:?}: expected seconds, e.g. 2.0"),
                    )
                }),
        }
    }

    /// A duration given in milliseconds.
    pub fn millis(&self, name: &str, default: Duration) -> Result<Duration, ConfigError> {
        let ms = self.parse::<u64>(name, default.as_millis() as u64)?;
        Ok(Duration::from_millis(ms))
    }

    /// A comma-separated list; blanks removed.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.get(name)
            .map(|raw| {
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_the_variable() {
        let vars = Vars::from_map([
            ("BATCH_SIZE", "lots"),
            ("FLUSH_INTERVAL", "0.5"),
            ("KEYS", "a, ,b"),
        ]);
        let err = vars.parse::<usize>("BATCH_SIZE", 50).unwrap_err();
        assert_eq!(err.var, "BATCH_SIZE");
        assert!(
            err.to_string()
                .starts_with("configuration error: BATCH_SIZE:")
        );
        assert_eq!(
            vars.seconds("FLUSH_INTERVAL", Duration::ZERO).unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(vars.list("KEYS"), vec!["a", "b"]);
        assert_eq!(vars.parse::<usize>("MISSING", 7).unwrap(), 7);
        assert!(
            vars.required("MISSING")
                .unwrap_err()
                .to_string()
                .contains("MISSING")
        );
    }
}
