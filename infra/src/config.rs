//! Configuration from environment variables: [`Shared`] (what the api and the worker both read),
//! the reader of declared configurations, and the value parsers their declarations use.
//!
//! A configuration is a struct deriving [`clap::Args`] in which every field declares its variable
//! once: name (`env`), default, doc comment and validation (`value_parser`). [`read`] fills it
//! from [`Vars`] only: binaries pass [`Vars::from_env`], tests a plain map.

use std::{collections::HashMap, fmt::Display, net::SocketAddr, str::FromStr, time::Duration};

use clap::{
    Args, Command, FromArgMatches,
    error::{ContextKind, ContextValue},
};

use crate::telemetry::TelemetryConfig;

/// A bad or missing configuration value, naming the variable at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error: {var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

/// The exit status of the api and the worker when a variable is bad or missing: 2, as clap's
/// for a bad command-line argument (the spirit of sysexits' `EX_USAGE`). A supervisor can tell
/// "fix the configuration" (2) from "failed while running" (1).
pub const EXIT_CONFIG_ERROR: i32 = 2;

impl ConfigError {
    /// Prints the one-line error to stderr and exits with [`EXIT_CONFIG_ERROR`].
    pub fn exit(&self) -> ! {
        eprintln!("{self}");
        std::process::exit(EXIT_CONFIG_ERROR);
    }

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
}

/// Reads the declared configuration `T` from `vars`: each variable set there is parsed and
/// checked by its field's `value_parser`, the others take their declared default. The error
/// names the first variable at fault.
pub fn read<T: Args + FromArgMatches>(vars: &Vars) -> Result<T, ConfigError> {
    let command = T::augment_args(
        Command::new("config")
            .no_binary_name(true)
            .disable_help_flag(true)
            .disable_version_flag(true),
    );
    let mut argv = Vec::new();
    let mut variables = HashMap::new();
    for arg in command.get_arguments() {
        let (Some(var), Some(long)) = (arg.get_env().and_then(|v| v.to_str()), arg.get_long())
        else {
            panic!(
                "configuration field {} must declare both `long` and `env`",
                arg.get_id()
            );
        };
        if let Some(value) = vars.get(var) {
            argv.push(format!("--{long}={value}"));
        }
        variables.insert(arg.get_id().clone(), var.to_string());
    }
    // clap took the process environment's values when the arguments were declared: only `vars`
    // may count, so tests stay hermetic.
    let mut command = command.mut_args(|arg| arg.env(None));
    command.build();
    // clap names the argument at fault as it displays it.
    let variables: HashMap<String, String> = command
        .get_arguments()
        .map(|arg| (arg.to_string(), variables[arg.get_id()].clone()))
        .collect();
    let error = |e: clap::Error| {
        let var = match e.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(arg)) => variables.get(arg).map(String::as_str),
            _ => None,
        };
        let message =
            std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
        ConfigError::new(var.unwrap_or("configuration"), message)
    };
    let matches = command.try_get_matches_from(argv).map_err(error)?;
    T::from_arg_matches(&matches).map_err(error)
}

/// Default of `MAX_EVENT_BYTES` (1 MiB).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// What both binaries read, declared and validated once for both.
#[derive(Debug, Clone, Args)]
pub struct Shared {
    /// `development`, `production`, … (shown by the api's `/health`). Outside `development` the
    /// api requires `API_SECRET_KEY`; in `production`, Redis without persistence is warned about.
    #[arg(long, env = "ENVIRONMENT", default_value = "development")]
    pub environment: String,
    /// Postgres.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Redis: `redis://`, or `rediss://` for TLS. With `REDIS_CLUSTER`: one or more of the
    /// cluster's nodes, comma-separated (the client learns the others from them).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// `REDIS_URL` is a Redis Cluster: commands go to the node of their key's hash slot, and a
    /// request's events are queued with one `MULTI` per shard (see docs/operations.md).
    #[arg(
        long,
        env = "REDIS_CLUSTER",
        default_value = "false",
        action = clap::ArgAction::Set,
        value_parser = flag,
    )]
    pub redis_cluster: bool,
    /// With a `rediss://` `REDIS_URL`: a PEM file of the certificate authorities the server's
    /// certificate is checked against, instead of the system's (a managed Redis with a private
    /// CA). Unset: the system's roots.
    #[arg(long, env = "REDIS_CA_CERT", value_parser = pem_file)]
    pub redis_ca_cert: Option<std::path::PathBuf>,
    /// The Redis Stream the api appends accepted events to and the workers consume.
    #[arg(long, env = "QUEUE_NAME", default_value = "event_stream", value_parser = name)]
    pub queue_name: String,
    /// How many shards the event stream has: a user's events go to shard
    /// `fnv1a64(distinct_id) mod STREAM_SHARDS`, each shard its own key (`QUEUE_NAME` itself
    /// when 1, else `{QUEUE_NAME:i}`). Every api and worker must use the same value.
    #[arg(
        long,
        env = "STREAM_SHARDS",
        default_value_t = 1,
        value_parser = checked(
            number::<usize>,
            |n| (1..=crate::shards::MAX_SHARDS).contains(n),
            "must be between 1 and 1024",
        ),
    )]
    pub stream_shards: usize,
    /// The dead-letter stream: written by workers, reported by the api's readiness.
    #[arg(long, env = "DLQ_NAME", default_value = "dlq_event_stream", value_parser = name)]
    pub dlq_name: String,
    /// Largest event: its envelope's JSON, as queued. The api refuses larger ones; workers size
    /// their reads by it (keep the two equal).
    #[arg(
        long,
        env = "MAX_EVENT_BYTES",
        default_value_t = DEFAULT_MAX_EVENT_BYTES,
        value_parser = checked(number::<usize>, |n| *n >= 1024, "must be at least 1024 (bytes)"),
    )]
    pub max_event_bytes: usize,
    /// Apply pending database migrations at start.
    #[arg(
        long,
        env = "MIGRATE_ON_START",
        default_value = "true",
        action = clap::ArgAction::Set,
        value_parser = flag,
    )]
    pub migrate_on_start: bool,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

impl Shared {
    /// Checks what cannot be checked one variable at a time: `REDIS_URL` against `REDIS_CLUSTER`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::redis::seeds(&self.redis_url, self.redis_cluster)
            .map(drop)
            .map_err(|message| ConfigError::new("REDIS_URL", message))
    }

    /// The client of `REDIS_URL` (one server, or a cluster with `REDIS_CLUSTER`).
    pub fn redis_client(&self) -> Result<crate::redis::RedisClient, redis::RedisError> {
        crate::redis::RedisClient::open(
            &self.redis_url,
            self.redis_cluster,
            self.redis_ca_cert.as_deref(),
        )
    }

    /// The event stream's shards (`QUEUE_NAME`, `STREAM_SHARDS`).
    pub fn shards(&self) -> crate::shards::StreamShards {
        crate::shards::StreamShards::new(&self.queue_name, self.stream_shards)
    }

    /// `ENVIRONMENT` is `development`.
    pub fn is_development(&self) -> bool {
        self.environment == "development"
    }

    /// `ENVIRONMENT` is `production`.
    pub fn is_production(&self) -> bool {
        self.environment == "production"
    }

    /// Completes what depends on the binary reading it: spans are named after `service` unless
    /// `OTEL_SERVICE_NAME` is set.
    pub fn for_service(&mut self, service: &str) {
        if self.telemetry.service_name.is_empty() {
            self.telemetry.service_name = service.to_string();
        }
    }
}

/// Makes a binary's configuration, whose field `shared` flattens [`Shared`], read the shared
/// variables as its own (`config.queue_name`).
#[macro_export]
macro_rules! deref_shared {
    ($config:ty) => {
        impl ::std::ops::Deref for $config {
            type Target = $crate::config::Shared;

            fn deref(&self) -> &$crate::config::Shared {
                &self.shared
            }
        }

        impl ::std::ops::DerefMut for $config {
            fn deref_mut(&mut self) -> &mut $crate::config::Shared {
                &mut self.shared
            }
        }
    };
}

// Value parsers for `#[arg(value_parser = …)]`: their message becomes the `ConfigError`'s.

/// A value parsed with [`FromStr`], surrounding blanks ignored.
pub fn number<T>(raw: &str) -> Result<T, String>
where
    T: FromStr,
    T::Err: Display,
{
    raw.trim()
        .parse()
        .map_err(|e| format!("invalid value {raw:?}: {e}"))
}

/// `parse`, then refused with `message` unless `holds`.
pub fn checked<T: 'static>(
    parse: fn(&str) -> Result<T, String>,
    holds: fn(&T) -> bool,
    message: &'static str,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |raw| {
        let value = parse(raw)?;
        if holds(&value) {
            Ok(value)
        } else {
            Err(message.to_string())
        }
    }
}

/// A boolean: `true/false/1/0/yes/no/on/off`.
pub fn flag(raw: &str) -> Result<bool, String> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("invalid value {raw:?}: expected true or false")),
    }
}

/// A duration given in (fractional) seconds, e.g. `2.0`.
pub fn seconds(raw: &str) -> Result<Duration, String> {
    raw.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("invalid value {raw:?}: expected seconds, e.g. 2.0"))
}

/// A duration given in milliseconds.
pub fn millis(raw: &str) -> Result<Duration, String> {
    number(raw).map(Duration::from_millis)
}

/// A comma-separated list; blanks removed.
pub fn list(raw: &str) -> Result<Vec<String>, String> {
    Ok(raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect())
}

/// A Redis key or consumer name: no spaces, which would only show up as a failing command.
pub fn name(raw: &str) -> Result<String, String> {
    if raw.chars().any(char::is_whitespace) {
        return Err(format!("invalid value {raw:?}: must not contain spaces"));
    }
    Ok(raw.to_string())
}

/// A `host:port` address to listen on.
/// A readable file holding at least one PEM certificate.
pub fn pem_file(raw: &str) -> Result<std::path::PathBuf, String> {
    let text = std::fs::read_to_string(raw).map_err(|e| format!("cannot read {raw:?}: {e}"))?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{raw:?} holds no PEM certificate"));
    }
    Ok(raw.into())
}

pub fn address(raw: &str) -> Result<SocketAddr, String> {
    raw.parse()
        .map_err(|e| format!("invalid address {raw:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A declaration exercising the value parsers.
    #[derive(Debug, clap::Args)]
    struct Sample {
        #[arg(long, env = "BATCH_SIZE", default_value = "50", value_parser = number::<usize>)]
        batch_size: usize,
        #[arg(long, env = "FLUSH_INTERVAL", default_value = "2.0", value_parser = seconds)]
        flush_interval: Duration,
        #[arg(long, env = "KEYS", default_value = "", value_parser = list)]
        keys: std::vec::Vec<String>,
        #[arg(long, env = "LIMIT", default_value = "7", value_parser = checked(number::<u64>, |n| *n > 0, "must be at least 1"))]
        limit: u64,
    }

    #[test]
    fn parses_and_names_the_variable() {
        let sample: Sample = read(&Vars::from_map([
            ("FLUSH_INTERVAL", "0.5"),
            ("KEYS", "a, ,b"),
            ("LIMIT", " "),
        ]))
        .unwrap();
        assert_eq!(sample.batch_size, 50);
        assert_eq!(sample.flush_interval, Duration::from_millis(500));
        assert_eq!(sample.keys, vec!["a", "b"]);
        assert_eq!(sample.limit, 7, "a blank value is unset");

        let err = read::<Sample>(&Vars::from_map([("BATCH_SIZE", "lots")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "configuration error: BATCH_SIZE: invalid value \"lots\": invalid digit found in string"
        );
        let err = read::<Sample>(&Vars::from_map([("LIMIT", "0")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "configuration error: LIMIT: must be at least 1"
        );
    }

    #[test]
    fn a_redis_ca_cert_that_is_no_certificate_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = read::<Shared>(&Vars::from_map([(
            "REDIS_CA_CERT",
            missing.to_str().unwrap(),
        )]))
        .unwrap_err();
        assert_eq!(err.var, "REDIS_CA_CERT");
        assert!(err.message.contains("cannot read"), "{err}");

        let not_pem = dir.path().join("key.txt");
        std::fs::write(&not_pem, "\0\u{1}not a certificate").unwrap();
        let err = read::<Shared>(&Vars::from_map([(
            "REDIS_CA_CERT",
            not_pem.to_str().unwrap(),
        )]))
        .unwrap_err();
        assert_eq!(err.var, "REDIS_CA_CERT");
        assert!(err.message.contains("holds no PEM certificate"), "{err}");
    }

    #[test]
    fn a_seed_list_is_refused_naming_redis_url_unless_redis_cluster_is_set() {
        let shared = |vars: &[(&str, &str)]| {
            read::<Shared>(&Vars::from_map(vars.iter().copied()))
                .unwrap()
                .validate()
        };
        let seeds = "redis://10.0.0.1:7000,redis://10.0.0.2:7000";
        let err = shared(&[("REDIS_URL", seeds)]).unwrap_err();
        assert_eq!(err.var, "REDIS_URL");
        assert!(err.message.contains("REDIS_CLUSTER=true"), "{err}");
        shared(&[("REDIS_URL", seeds), ("REDIS_CLUSTER", "true")]).unwrap();
        let err =
            shared(&[("REDIS_URL", "redis://a:1,oops"), ("REDIS_CLUSTER", "true")]).unwrap_err();
        assert_eq!(err.var, "REDIS_URL");
        assert!(err.message.contains("\"oops\""), "{err}");
        let err = read::<Shared>(&Vars::from_map([("REDIS_CLUSTER", "maybe")])).unwrap_err();
        assert_eq!(err.var, "REDIS_CLUSTER");
    }

    #[test]
    fn reads_only_the_given_variables() {
        #[derive(Debug, clap::Args)]
        struct Path {
            #[arg(long, env = "PATH", default_value = "default")]
            path: String,
        }
        assert!(std::env::var_os("PATH").is_some(), "the process has a PATH");
        let read_path = |vars| read::<Path>(&vars).unwrap().path;
        assert_eq!(read_path(Vars::from_map([("OTHER", "x")])), "default");
        assert_eq!(read_path(Vars::from_map([("PATH", "given")])), "given");
    }

    #[test]
    fn shared_defaults_and_checks() {
        let mut shared: Shared = read(&Vars::from_map::<&str, &str>([])).unwrap();
        assert_eq!(shared.queue_name, "event_stream");
        assert_eq!(shared.dlq_name, "dlq_event_stream");
        assert_eq!(shared.max_event_bytes, DEFAULT_MAX_EVENT_BYTES);
        assert_eq!(shared.shards().keys(), ["event_stream"]);
        assert!(shared.migrate_on_start && shared.is_development());
        shared.for_service("api");
        assert_eq!(shared.telemetry.service_name, "api");

        for (var, value) in [
            ("QUEUE_NAME", "a b"),
            ("DLQ_NAME", "dead letters"),
            ("MAX_EVENT_BYTES", "100"),
            ("STREAM_SHARDS", "0"),
            ("STREAM_SHARDS", "1025"),
            ("MIGRATE_ON_START", "maybe"),
            ("LOG_FORMAT", "pretty"),
        ] {
            let err = read::<Shared>(&Vars::from_map([(var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{err}");
        }
    }
}
