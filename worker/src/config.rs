//! The worker's typed configuration, read once at start from environment variables.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use infra::config::{ConfigError, Vars};

/// Everything a worker replica needs to know, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// `ENVIRONMENT`: `development`, `production`, … (in production, Redis without persistence
    /// is warned about at start).
    pub environment: String,
    /// `REDIS_URL`.
    pub redis_url: String,
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `DATABASE_POOL_SIZE`: Postgres connections per replica.
    pub database_pool_size: u32,
    /// `QUEUE_NAME`: the stream the api appends to.
    pub queue_name: String,
    /// `DLQ_NAME`: where poison entries go.
    pub dlq_name: String,
    /// `DLQ_MAXLEN`: most entries the dead-letter stream keeps; the oldest go first.
    pub dlq_maxlen: u64,
    /// `CONSUMER_GROUP`: shared by all replicas.
    pub consumer_group: String,
    /// `WORKER_NAME`: this replica's consumer name, unique per replica.
    pub worker_name: String,
    /// `BATCH_SIZE`: most entries per read and per transaction.
    pub batch_size: usize,
    /// `READ_AHEAD_BYTES`: most bytes of entries a replica holds read and not yet finished (stored
    /// or dead-lettered, and acknowledged), queued and being stored together.
    pub read_ahead_bytes: usize,
    /// `MAX_EVENT_BYTES`: the largest event the api accepts (keep the two equal); reads ask for no
    /// more entries than the free read-ahead budget holds at this size each.
    pub max_event_bytes: usize,
    /// `WRITE_CONCURRENCY`: batches stored at the same time (each in its own transaction).
    pub write_concurrency: usize,
    /// `FLUSH_INTERVAL` (seconds): longest a read waits for entries (`XREADGROUP BLOCK`).
    pub flush_interval: Duration,
    /// `CLAIM_INTERVAL` (seconds): how often idle entries of other consumers are claimed.
    pub claim_interval: Duration,
    /// `CLAIM_IDLE_MS`: an entry unacknowledged this long is taken over from its consumer.
    pub claim_idle: Duration,
    /// `MAX_DELIVERIES`: an entry delivered more often than this goes to the DLQ.
    pub max_deliveries: u64,
    /// `SHUTDOWN_TIMEOUT` (seconds): grace period to store what was read.
    pub shutdown_timeout: Duration,
    /// `MIGRATE_ON_START`: apply pending migrations before consuming.
    pub migrate_on_start: bool,
    /// `RULES_DIR`: the rule files.
    pub rules_dir: PathBuf,
    /// `WORKER_METRICS_BIND`: where `/metrics`, `/health` and `/ready` are served (`off`: nowhere).
    pub metrics_bind: Option<SocketAddr>,
    /// `WORKER_METRICS_BIND` was not set: when the default port is taken (another replica on this
    /// host), serve on a free port instead of stopping.
    pub metrics_bind_is_default: bool,
}

impl Config {
    /// Reads and validates every variable; the error names the variable at fault.
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let batch_size = vars.parse::<usize>("BATCH_SIZE", 500)?;
        if !(1..=10_000).contains(&batch_size) {
            return Err(ConfigError::new(
                "BATCH_SIZE",
                "must be between 1 and 10000",
            ));
        }
        let flush_interval = vars.seconds("FLUSH_INTERVAL", Duration::from_secs(2))?;
        if flush_interval < Duration::from_millis(1) || flush_interval > Duration::from_secs(60) {
            return Err(ConfigError::new(
                "FLUSH_INTERVAL",
                "must be between 0.001 and 60 seconds",
            ));
        }
        let claim_interval = vars.seconds("CLAIM_INTERVAL", Duration::from_secs(5))?;
        if claim_interval < Duration::from_millis(10) {
            return Err(ConfigError::new(
                "CLAIM_INTERVAL",
                "must be at least 0.01 seconds",
            ));
        }
        let claim_idle = vars.millis("CLAIM_IDLE_MS", Duration::from_secs(30))?;
        if claim_idle < Duration::from_millis(10) {
            return Err(ConfigError::new("CLAIM_IDLE_MS", "must be at least 10"));
        }
        let max_deliveries = vars.parse::<u64>("MAX_DELIVERIES", 5)?;
        if max_deliveries == 0 {
            return Err(ConfigError::new("MAX_DELIVERIES", "must be at least 1"));
        }
        let write_concurrency = vars.parse::<usize>("WRITE_CONCURRENCY", 4)?;
        if !(1..=64).contains(&write_concurrency) {
            return Err(ConfigError::new(
                "WRITE_CONCURRENCY",
                "must be between 1 and 64",
            ));
        }
        let database_pool_size =
            vars.parse::<u32>("DATABASE_POOL_SIZE", write_concurrency as u32 + 1)?;
        if (database_pool_size as usize) < write_concurrency {
            return Err(ConfigError::new(
                "DATABASE_POOL_SIZE",
                "must be at least WRITE_CONCURRENCY",
            ));
        }
        let max_event_bytes = vars.parse::<usize>("MAX_EVENT_BYTES", DEFAULT_MAX_EVENT_BYTES)?;
        if max_event_bytes < 1024 {
            return Err(ConfigError::new(
                "MAX_EVENT_BYTES",
                "must be at least 1024 (bytes)",
            ));
        }
        let read_ahead_bytes = vars.parse::<usize>("READ_AHEAD_BYTES", DEFAULT_READ_AHEAD_BYTES)?;
        if read_ahead_bytes < max_event_bytes {
            return Err(ConfigError::new(
                "READ_AHEAD_BYTES",
                format!(
                    "must be at least MAX_EVENT_BYTES ({max_event_bytes}): room for one event of the largest size"
                ),
            ));
        }
        let dlq_maxlen = vars.parse::<u64>("DLQ_MAXLEN", DEFAULT_DLQ_MAXLEN)?;
        if dlq_maxlen == 0 {
            return Err(ConfigError::new("DLQ_MAXLEN", "must be at least 1"));
        }
        let name = |var: &str, default: &str| -> Result<String, ConfigError> {
            let value = vars.string(var, default);
            if value.chars().any(char::is_whitespace) {
                return Err(ConfigError::new(
                    var,
                    format!("invalid value {value:?}: must not contain spaces"),
                ));
            }
            Ok(value)
        };
        Ok(Self {
            environment: vars.string("ENVIRONMENT", "development"),
            redis_url: vars.string("REDIS_URL", "redis://127.0.0.1:6379"),
            database_url: vars.string(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            database_pool_size,
            queue_name: name("QUEUE_NAME", "event_stream")?,
            dlq_name: name("DLQ_NAME", "dlq_event_stream")?,
            dlq_maxlen,
            consumer_group: name("CONSUMER_GROUP", "enrichers")?,
            worker_name: name("WORKER_NAME", &default_worker_name())?,
            batch_size,
            read_ahead_bytes,
            max_event_bytes,
            write_concurrency,
            flush_interval,
            claim_interval,
            claim_idle,
            max_deliveries,
            shutdown_timeout: vars.seconds("SHUTDOWN_TIMEOUT", Duration::from_secs(10))?,
            migrate_on_start: vars.flag("MIGRATE_ON_START", true)?,
            rules_dir: PathBuf::from(vars.string("RULES_DIR", "rules")),
            metrics_bind_is_default: vars.get("WORKER_METRICS_BIND").is_none(),
            metrics_bind: match vars.string("WORKER_METRICS_BIND", DEFAULT_METRICS_BIND).as_str() {
                "off" => None,
                addr => Some(addr.parse().map_err(|_| {
                    ConfigError::new(
                        "WORKER_METRICS_BIND",
                        format!("invalid value {addr:?}: expected host:port (e.g. 0.0.0.0:9100) or `off`"),
                    )
                })?),
            },
        })
    }
}

impl Config {
    /// `ENVIRONMENT` is `production`.
    pub fn is_production(&self) -> bool {
        self.environment == "production"
    }
}

/// Default of `MAX_EVENT_BYTES` (1 MiB), the api's default too.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// Default of `READ_AHEAD_BYTES` (64 MiB): 64 events of the largest size in a replica's hands.
pub const DEFAULT_READ_AHEAD_BYTES: usize = 64 << 20;

/// Default of `DLQ_MAXLEN`.
pub const DEFAULT_DLQ_MAXLEN: u64 = 10_000;

/// Default of `WORKER_METRICS_BIND`.
pub const DEFAULT_METRICS_BIND: &str = "127.0.0.1:9100";

/// `<hostname>-<pid>`: unique per replica, and stable for a process so its own pending entries
/// are re-read when it reconnects.
pub fn default_worker_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_string());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_the_variable() {
        let config = Config::from_vars(&Vars::from_map(Vec::<(String, String)>::new())).unwrap();
        assert_eq!(config.queue_name, "event_stream");
        assert_eq!(config.dlq_name, "dlq_event_stream");
        assert_eq!(config.consumer_group, "enrichers");
        assert_eq!(config.batch_size, 500);
        assert_eq!(config.read_ahead_bytes, 64 << 20);
        assert_eq!(config.max_event_bytes, 1 << 20);
        assert_eq!(config.dlq_maxlen, 10_000);
        assert_eq!(config.flush_interval, Duration::from_secs(2));
        assert_eq!(config.claim_idle, Duration::from_secs(30));
        assert_eq!(config.max_deliveries, 5);
        assert_eq!(config.write_concurrency, 4);
        assert_eq!(config.database_pool_size, 5);
        assert!(config.migrate_on_start);
        assert_eq!(
            config.metrics_bind,
            Some(DEFAULT_METRICS_BIND.parse().unwrap())
        );
        let off = Config::from_vars(&Vars::from_map([("WORKER_METRICS_BIND", "off")])).unwrap();
        assert_eq!(off.metrics_bind, None);
        assert!(
            config
                .worker_name
                .ends_with(&format!("-{}", std::process::id()))
        );

        for (var, value) in [
            ("BATCH_SIZE", "0"),
            ("FLUSH_INTERVAL", "soon"),
            ("FLUSH_INTERVAL", "0"),
            ("CLAIM_IDLE_MS", "-1"),
            ("MAX_DELIVERIES", "0"),
            ("WRITE_CONCURRENCY", "0"),
            ("MIGRATE_ON_START", "maybe"),
            ("WORKER_NAME", "a b"),
            ("WORKER_METRICS_BIND", "9100"),
            ("READ_AHEAD_BYTES", "64MiB"),
            ("READ_AHEAD_BYTES", "1048575"),
            ("MAX_EVENT_BYTES", "-1"),
            ("MAX_EVENT_BYTES", "100"),
            ("DLQ_MAXLEN", "0"),
            ("DLQ_MAXLEN", "lots"),
        ] {
            let err = Config::from_vars(&Vars::from_map([(var, value)])).unwrap_err();
            assert_eq!(err.var, var, "{err}");
        }
        // The budget is checked against the event size it must hold.
        let err = Config::from_vars(&Vars::from_map([
            ("MAX_EVENT_BYTES", "2097152"),
            ("READ_AHEAD_BYTES", "1048576"),
        ]))
        .unwrap_err();
        assert_eq!(err.var, "READ_AHEAD_BYTES", "{err}");
        assert!(err.message.contains("MAX_EVENT_BYTES"), "{err}");
        let small = Config::from_vars(&Vars::from_map([
            ("MAX_EVENT_BYTES", "65536"),
            ("READ_AHEAD_BYTES", "65536"),
        ]))
        .unwrap();
        assert_eq!(
            (small.max_event_bytes, small.read_ahead_bytes),
            (65536, 65536)
        );
    }
}
