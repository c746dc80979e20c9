//! The api's configuration, read once from the environment at start.

use std::{net::SocketAddr, time::Duration};

use infra::config::{ConfigError, Vars};

/// The full-access key used when `ENVIRONMENT` is `development` and `API_SECRET_KEY` is unset:
/// the value in `.env.example`, so a fresh clone runs with no `.env`. Public, hence never used
/// in any other environment.
pub const DEVELOPMENT_SECRET_KEY: &str = "local_dev_secret_key_12345";
/// The ingest key used when `ENVIRONMENT` is `development` and `INGEST_API_KEYS` is unset: what
/// the simulator and the README's examples put in bodies (the secret key is only taken from the
/// `X-API-Key` header). Public, hence never used in any other environment.
pub const DEVELOPMENT_INGEST_KEY: &str = "local_dev_ingest_key_12345";

/// Everything the api needs to run. Tests build it as a value.
#[derive(Debug, Clone)]
pub struct Config {
    /// `development`, `production`, … (informational; shown by `/health`).
    pub environment: String,
    /// Title of the OpenAPI document.
    pub project_name: String,
    /// Full-access key: ingest and context routes.
    pub api_secret_key: String,
    /// Write-only keys (safe to ship in browsers): ingest routes only.
    pub ingest_api_keys: Vec<String>,
    pub database_url: String,
    pub redis_url: String,
    /// Redis Stream the events are appended to.
    pub queue_name: String,
    /// Dead-letter stream (reported by readiness, written by workers).
    pub dlq_name: String,
    /// Address the HTTP server binds.
    pub bind: SocketAddr,
    /// Largest accepted request body, compressed or decompressed.
    pub max_body_bytes: usize,
    /// Largest accepted event: its envelope's JSON, as queued.
    pub max_event_bytes: usize,
    /// Request bytes (bodies as read, decoded, and their envelopes) that ingest holds at once
    /// across all requests; past it, ingest answers 503 with `Retry-After`.
    pub ingest_max_inflight_bytes: usize,
    /// Stream length past which ingest answers 503 instead of accepting more.
    pub stream_max_backlog: u64,
    /// Longest a Redis command may take before the request answers 503.
    pub redis_timeout: Duration,
    /// Apply pending database migrations at start.
    pub migrate_on_start: bool,
}

impl Config {
    /// Reads the configuration; a bad or missing value names its variable.
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let bind_raw = vars.string("API_BIND", "127.0.0.1:8000");
        let bind = bind_raw.parse().map_err(|e| {
            ConfigError::new("API_BIND", format!("invalid address {bind_raw:?}: {e}"))
        })?;
        let max_body_bytes = positive(vars, "MAX_BODY_BYTES", 20 * 1024 * 1024)?;
        let max_event_bytes = positive(vars, "MAX_EVENT_BYTES", 1024 * 1024)?;
        let ingest_max_inflight_bytes =
            positive(vars, "INGEST_MAX_INFLIGHT_BYTES", 256 * 1024 * 1024)?;
        if ingest_max_inflight_bytes < max_body_bytes {
            return Err(ConfigError::new(
                "INGEST_MAX_INFLIGHT_BYTES",
                format!(
                    "must be at least MAX_BODY_BYTES ({max_body_bytes}), or no body of the largest size could be taken"
                ),
            ));
        }
        let environment = vars.string("ENVIRONMENT", "development");
        let api_secret_key = match vars.get("API_SECRET_KEY") {
            Some(key) => key,
            None if environment == "development" => {
                tracing::warn!(
                    key = DEVELOPMENT_SECRET_KEY,
                    "API_SECRET_KEY is not set: using the development key of .env.example \
                     (set ENVIRONMENT to anything else and the api refuses to start without a key)"
                );
                DEVELOPMENT_SECRET_KEY.to_string()
            }
            None => vars.required("API_SECRET_KEY")?,
        };
        let development = environment == "development";
        if !development && api_secret_key == DEVELOPMENT_SECRET_KEY {
            return Err(ConfigError::new(
                "API_SECRET_KEY",
                format!(
                    "is the public development key, refused when ENVIRONMENT is {environment:?}: use a long random value"
                ),
            ));
        }
        let mut ingest_api_keys = vars.list("INGEST_API_KEYS");
        if ingest_api_keys.is_empty() && development && vars.get("INGEST_API_KEYS").is_none() {
            ingest_api_keys.push(DEVELOPMENT_INGEST_KEY.to_string());
        }
        if !development && ingest_api_keys.iter().any(|k| k == DEVELOPMENT_INGEST_KEY) {
            return Err(ConfigError::new(
                "INGEST_API_KEYS",
                format!(
                    "holds the public development ingest key, refused when ENVIRONMENT is {environment:?}"
                ),
            ));
        }
        if ingest_api_keys.contains(&api_secret_key) {
            return Err(ConfigError::new(
                "INGEST_API_KEYS",
                "must not contain API_SECRET_KEY (ingest keys are public, the secret key is not)",
            ));
        }
        Ok(Self {
            environment,
            project_name: vars.string("PROJECT_NAME", "PostHog LLM Pipeline"),
            api_secret_key,
            ingest_api_keys,
            database_url: vars.string(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            redis_url: vars.string("REDIS_URL", "redis://127.0.0.1:6379"),
            queue_name: vars.string("QUEUE_NAME", "event_stream"),
            dlq_name: vars.string("DLQ_NAME", "dlq_event_stream"),
            bind,
            max_body_bytes,
            max_event_bytes,
            ingest_max_inflight_bytes,
            stream_max_backlog: vars.parse("STREAM_MAX_BACKLOG", 1_000_000)?,
            redis_timeout: vars.millis("REDIS_TIMEOUT_MS", Duration::from_millis(2000))?,
            migrate_on_start: vars.flag("MIGRATE_ON_START", true)?,
        })
    }

    /// A configuration for tests and tools: local services, given keys, everything else default.
    pub fn for_local(api_secret_key: &str) -> Self {
        Self::from_vars(&Vars::from_map([("API_SECRET_KEY", api_secret_key)]))
            .expect("defaults are valid")
    }
}

/// A number of bytes (or anything countable) above zero.
fn positive(vars: &Vars, name: &str, default: usize) -> Result<usize, ConfigError> {
    match vars.parse(name, default)? {
        0 => Err(ConfigError::new(name, "must be greater than 0")),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_secret_key_outside_development_names_the_variable() {
        for environment in ["production", "staging"] {
            let err =
                Config::from_vars(&Vars::from_map([("ENVIRONMENT", environment)])).unwrap_err();
            assert_eq!(
                err.to_string(),
                "configuration error: API_SECRET_KEY: is required but not set"
            );
        }
    }

    #[test]
    fn development_without_a_key_uses_the_env_example_key() {
        let cfg = Config::from_vars(&Vars::from_map::<&str, &str>([])).unwrap();
        assert_eq!(cfg.environment, "development");
        assert_eq!(cfg.api_secret_key, DEVELOPMENT_SECRET_KEY);
        let example = include_str!("../../.env.example");
        assert!(
            example.contains(&format!("API_SECRET_KEY={DEVELOPMENT_SECRET_KEY}\n")),
            ".env.example shows the development key"
        );
        // A key that is set always wins.
        let cfg = Config::from_vars(&Vars::from_map([("API_SECRET_KEY", "mine")])).unwrap();
        assert_eq!(cfg.api_secret_key, "mine");
    }

    #[test]
    fn defaults_and_lists() {
        let cfg = Config::from_vars(&Vars::from_map([
            ("API_SECRET_KEY", "s"),
            ("INGEST_API_KEYS", "phc_a, phc_b"),
        ]))
        .unwrap();
        assert_eq!(cfg.queue_name, "event_stream");
        assert_eq!(cfg.ingest_api_keys, vec!["phc_a", "phc_b"]);
        assert_eq!(cfg.max_body_bytes, 20 * 1024 * 1024);
        assert_eq!(cfg.bind.to_string(), "127.0.0.1:8000");
    }

    #[test]
    fn bad_number_names_the_variable() {
        let err = Config::from_vars(&Vars::from_map([
            ("API_SECRET_KEY", "s"),
            ("MAX_BODY_BYTES", "big"),
        ]))
        .unwrap_err();
        assert_eq!(err.var, "MAX_BODY_BYTES");
    }
}
