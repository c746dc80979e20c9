//! The api's configuration: every variable it reads, declared once (name, default, doc,
//! validation), read once at start.

use std::{net::SocketAddr, time::Duration};

use infra::config::{ConfigError, Shared, Vars, address, checked, list, millis, number, read};

/// The full-access key used when `ENVIRONMENT` is `development` and `API_SECRET_KEY` is unset:
/// the value in `.env.example`, so a fresh clone runs with no `.env`. Public, hence never used
/// in any other environment.
/// Default of `API_BIND`.
pub const DEFAULT_BIND: &str = "127.0.0.1:8000";

/// `API_BIND` alone (default [`DEFAULT_BIND`]), for `api healthcheck`: the error names the
/// variable.
pub fn bind(vars: &Vars) -> Result<SocketAddr, String> {
    let raw = vars
        .get("API_BIND")
        .unwrap_or_else(|| DEFAULT_BIND.to_string());
    address(&raw).map_err(|e| format!("API_BIND: {e}"))
}

pub const DEVELOPMENT_SECRET_KEY: &str = "local_dev_secret_key_12345";
/// The ingest key used when `ENVIRONMENT` is `development` and `INGEST_API_KEYS` is unset: what
/// the simulator and the README's examples put in bodies (the secret key is only taken from the
/// `X-API-Key` header). Public, hence never used in any other environment.
pub const DEVELOPMENT_INGEST_KEY: &str = "local_dev_ingest_key_12345";

/// Everything the api needs to run. Tests build it as a value. What the worker reads too is in
/// [`Shared`], reached through `Deref` (`config.queue_name`).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub shared: Shared,
    /// Title of the OpenAPI document.
    #[arg(long, env = "PROJECT_NAME", default_value = "PostHog LLM Pipeline")]
    pub project_name: String,
    /// Full-access key: ingest and context routes, from the `X-API-Key` header only. Required
    /// outside development [default in development: [`DEVELOPMENT_SECRET_KEY`]].
    #[arg(
        long,
        env = "API_SECRET_KEY",
        default_value = "",
        hide_default_value = true
    )]
    pub api_secret_key: String,
    /// Comma-separated write-only keys (safe to ship in browsers): ingest routes only [default in
    /// development: [`DEVELOPMENT_INGEST_KEY`]].
    // `std::vec::Vec` spelled out: clap then parses the whole list from one value.
    #[arg(
        long,
        env = "INGEST_API_KEYS",
        default_value = "",
        hide_default_value = true,
        value_parser = list,
    )]
    pub ingest_api_keys: std::vec::Vec<String>,
    /// Address the HTTP server binds.
    #[arg(long, env = "API_BIND", default_value = DEFAULT_BIND, value_parser = address)]
    pub bind: SocketAddr,
    /// Largest accepted request body, compressed or decompressed.
    #[arg(
        long,
        env = "MAX_BODY_BYTES",
        default_value_t = 20 * 1024 * 1024,
        value_parser = positive,
    )]
    pub max_body_bytes: usize,
    /// Request bytes (bodies as read, decoded, and their envelopes) that ingest holds at once
    /// across all requests; past it, ingest answers 503 with `Retry-After`. At least
    /// `MAX_BODY_BYTES`.
    #[arg(
        long,
        env = "INGEST_MAX_INFLIGHT_BYTES",
        default_value_t = 256 * 1024 * 1024,
        value_parser = positive,
    )]
    pub ingest_max_inflight_bytes: usize,
    /// Stream length past which ingest answers 503 instead of accepting more.
    #[arg(
        long,
        env = "STREAM_MAX_BACKLOG",
        default_value_t = 1_000_000,
        value_parser = number::<u64>,
    )]
    pub stream_max_backlog: u64,
    /// Longest a Redis command may take (milliseconds) before the request answers 503.
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value = "2000", value_parser = millis)]
    pub redis_timeout: Duration,
    /// Directory of the rule files `explain_event` (MCP) reads, read-only and reloaded when they
    /// change: the same files the workers enrich with.
    #[arg(long, env = "RULES_DIR", default_value = "rules")]
    pub rules_dir: std::path::PathBuf,
    /// Comma-separated `Host` values `/mcp` answers (names, or `name:port`); `*` takes any host.
    /// Refusing other hosts stops DNS-rebinding pages from reaching a local server.
    #[arg(
        long,
        env = "MCP_ALLOWED_HOSTS",
        default_value = "localhost,127.0.0.1,::1",
        value_parser = list,
    )]
    pub mcp_allowed_hosts: std::vec::Vec<String>,
    /// `API_SECRET_KEY` was unset and the development key taken.
    #[arg(skip)]
    development_key_taken: bool,
}

impl Config {
    /// Reads the configuration; a bad or missing value names its variable.
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let mut config: Self = read(vars)?;
        config.shared.for_service("api");
        config.shared.validate()?;
        if config.ingest_max_inflight_bytes < config.max_body_bytes {
            return Err(ConfigError::new(
                "INGEST_MAX_INFLIGHT_BYTES",
                format!(
                    "must be at least MAX_BODY_BYTES ({}), or no body of the largest size could be taken",
                    config.max_body_bytes
                ),
            ));
        }
        let development = config.is_development();
        let environment = &config.shared.environment;
        if config.api_secret_key.is_empty() {
            if !development {
                return Err(ConfigError::new(
                    "API_SECRET_KEY",
                    "is required but not set",
                ));
            }
            config.api_secret_key = DEVELOPMENT_SECRET_KEY.to_string();
            config.development_key_taken = true;
        }
        if !development && config.api_secret_key == DEVELOPMENT_SECRET_KEY {
            return Err(ConfigError::new(
                "API_SECRET_KEY",
                format!(
                    "is the public development key, refused when ENVIRONMENT is {environment:?}: use a long random value"
                ),
            ));
        }
        if development && vars.get("INGEST_API_KEYS").is_none() {
            config.ingest_api_keys = vec![DEVELOPMENT_INGEST_KEY.to_string()];
        }
        if !development
            && config
                .ingest_api_keys
                .iter()
                .any(|k| k == DEVELOPMENT_INGEST_KEY)
        {
            return Err(ConfigError::new(
                "INGEST_API_KEYS",
                format!(
                    "holds the public development ingest key, refused when ENVIRONMENT is {environment:?}"
                ),
            ));
        }
        if config.ingest_api_keys.contains(&config.api_secret_key) {
            return Err(ConfigError::new(
                "INGEST_API_KEYS",
                "must not contain API_SECRET_KEY (ingest keys are public, the secret key is not)",
            ));
        }
        Ok(config)
    }

    /// A configuration for tests and tools: local services, given keys, everything else default.
    pub fn for_local(api_secret_key: &str) -> Self {
        Self::from_vars(&Vars::from_map([("API_SECRET_KEY", api_secret_key)]))
            .expect("defaults are valid")
    }

    /// Warns when the development key was taken for want of `API_SECRET_KEY`: called by the
    /// binary once logging is set up, which the configuration's own reading comes before.
    pub fn warn_if_development_key(&self) {
        if self.development_key_taken {
            tracing::warn!(
                key = DEVELOPMENT_SECRET_KEY,
                "API_SECRET_KEY is not set: using the development key of .env.example \
                 (set ENVIRONMENT to anything else and the api refuses to start without a key)"
            );
        }
    }
}

infra::deref_shared!(Config);

/// A number of bytes (or anything countable) above zero.
fn positive(raw: &str) -> Result<usize, String> {
    checked(number::<usize>, |n| *n > 0, "must be greater than 0")(raw)
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

    #[test]
    fn shared_variables_are_checked_as_the_worker_checks_them() {
        for (var, value) in [
            ("QUEUE_NAME", "event stream"),
            ("DLQ_NAME", "dead letters"),
            ("MAX_EVENT_BYTES", "100"),
        ] {
            let vars = || Vars::from_map([(var, value)]);
            let api = Config::from_vars(&vars()).unwrap_err();
            let worker = worker::Config::from_vars(&vars()).unwrap_err();
            assert_eq!(api, worker, "{var}={value}");
            assert_eq!(api.var, var, "{api}");
        }
    }

    #[test]
    fn development_keys_are_refused_elsewhere() {
        let err = Config::from_vars(&Vars::from_map([
            ("ENVIRONMENT", "production"),
            ("API_SECRET_KEY", DEVELOPMENT_SECRET_KEY),
        ]))
        .unwrap_err();
        assert_eq!(err.var, "API_SECRET_KEY");
        let err = Config::from_vars(&Vars::from_map([
            ("ENVIRONMENT", "production"),
            ("API_SECRET_KEY", "s"),
            ("INGEST_API_KEYS", DEVELOPMENT_INGEST_KEY),
        ]))
        .unwrap_err();
        assert_eq!(err.var, "INGEST_API_KEYS");
        let production = Config::from_vars(&Vars::from_map([
            ("ENVIRONMENT", "production"),
            ("API_SECRET_KEY", "s"),
        ]))
        .unwrap();
        assert!(production.ingest_api_keys.is_empty());
        let development = Config::for_local("s");
        assert_eq!(development.ingest_api_keys, vec![DEVELOPMENT_INGEST_KEY]);
        assert_eq!(development.telemetry.service_name, "api");
        // Set but empty: no ingest keys, even in development.
        let none = Config::from_vars(&Vars::from_map([("INGEST_API_KEYS", ", ")])).unwrap();
        assert!(none.ingest_api_keys.is_empty());
    }

    /// docs/configuration.md documents every variable the api and the worker declare, with the
    /// default they declare.
    #[test]
    fn configuration_table_matches_the_declarations() {
        use clap::Args;

        let doc = include_str!("../../docs/configuration.md");
        let table: std::collections::HashMap<&str, &str> = doc
            .lines()
            .filter_map(|line| {
                let mut cells = line.strip_prefix("| `")?.split(" | ");
                Some((cells.next()?.strip_suffix('`')?, cells.next()?))
            })
            .collect();
        let commands = [
            Config::augment_args(clap::Command::new("api")),
            worker::Config::augment_args(clap::Command::new("worker")),
        ];
        for arg in commands.iter().flat_map(|c| c.get_arguments()) {
            let var = arg.get_env().and_then(|v| v.to_str()).unwrap();
            let documented = table
                .get(var)
                .unwrap_or_else(|| panic!("docs/configuration.md lacks {var}"));
            if let ([default], false) = (arg.get_default_values(), arg.is_hide_default_value_set())
            {
                let default = default.to_str().unwrap();
                assert!(
                    documented.starts_with(&format!("`{default}`")),
                    "{var}: declared default {default:?}, docs/configuration.md says {documented}"
                );
            }
        }
    }
}
