//! The worker's configuration: every variable a replica reads, declared once (name, default,
//! doc, validation), read once at start.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use infra::config::{ConfigError, Shared, Vars, address, checked, name, number, read, seconds};

pub use infra::config::DEFAULT_MAX_EVENT_BYTES;

/// Everything a worker replica needs to know, validated. What the api reads too is in
/// [`Shared`], reached through `Deref` (`config.queue_name`).
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub shared: Shared,
    /// Postgres connections per replica: at least `WRITE_CONCURRENCY` [default:
    /// `WRITE_CONCURRENCY` + 1].
    #[arg(
        long,
        env = "DATABASE_POOL_SIZE",
        default_value_t = 0,
        hide_default_value = true,
        value_parser = number::<u32>,
    )]
    pub database_pool_size: u32,
    /// Most entries the dead-letter stream keeps; the oldest go first.
    #[arg(
        long,
        env = "DLQ_MAXLEN",
        default_value_t = DEFAULT_DLQ_MAXLEN,
        value_parser = checked(number::<u64>, |n| *n >= 1, "must be at least 1"),
    )]
    pub dlq_maxlen: u64,
    /// The consumer group, shared by all replicas.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "enrichers", value_parser = name)]
    pub consumer_group: String,
    /// This replica's consumer name, unique per replica [default: `<hostname>-<pid>`].
    #[arg(
        long,
        env = "WORKER_NAME",
        default_value_t = default_worker_name(),
        hide_default_value = true,
        value_parser = name,
    )]
    pub worker_name: String,
    /// Most entries per read and per transaction.
    #[arg(
        long,
        env = "BATCH_SIZE",
        default_value_t = 500,
        value_parser = checked(number::<usize>, |n| (1..=10_000).contains(n), "must be between 1 and 10000"),
    )]
    pub batch_size: usize,
    /// Most bytes of entries a replica holds read and not yet finished (stored or dead-lettered,
    /// and acknowledged), queued and being stored together. At least `MAX_EVENT_BYTES`.
    #[arg(
        long,
        env = "READ_AHEAD_BYTES",
        default_value_t = DEFAULT_READ_AHEAD_BYTES,
        value_parser = number::<usize>,
    )]
    pub read_ahead_bytes: usize,
    /// Batches stored at the same time (each in its own transaction).
    #[arg(
        long,
        env = "WRITE_CONCURRENCY",
        default_value_t = 4,
        value_parser = checked(number::<usize>, |n| (1..=64).contains(n), "must be between 1 and 64"),
    )]
    pub write_concurrency: usize,
    /// Longest a read waits for entries (`XREADGROUP BLOCK`), in seconds.
    #[arg(
        long,
        env = "FLUSH_INTERVAL",
        default_value = "2.0",
        value_parser = checked(
            seconds,
            |d| (Duration::from_millis(1)..=Duration::from_secs(60)).contains(d),
            "must be between 0.001 and 60 seconds",
        ),
    )]
    pub flush_interval: Duration,
    /// How often idle entries of other consumers are claimed, in seconds.
    #[arg(
        long,
        env = "CLAIM_INTERVAL",
        default_value = "5",
        value_parser = checked(seconds, |d| *d >= Duration::from_millis(10), "must be at least 0.01 seconds"),
    )]
    pub claim_interval: Duration,
    /// An entry unacknowledged this long (milliseconds) is taken over from its consumer.
    #[arg(
        long,
        env = "CLAIM_IDLE_MS",
        default_value = "30000",
        value_parser = checked(infra::config::millis, |d| *d >= Duration::from_millis(10), "must be at least 10"),
    )]
    pub claim_idle: Duration,
    /// With `STREAM_SHARDS` > 1: how long a replica's lease on a shard lasts unless renewed
    /// (every third of it). A replica that dies without handing its shards over holds them this
    /// long; its pending entries are then taken over at once.
    #[arg(
        long,
        env = "SHARD_LEASE_MS",
        default_value = "10000",
        value_parser = checked(infra::config::millis, |d| *d >= Duration::from_millis(100), "must be at least 100"),
    )]
    pub shard_lease: Duration,
    /// An entry delivered more often than this goes to the DLQ.
    #[arg(
        long,
        env = "MAX_DELIVERIES",
        default_value_t = 5,
        value_parser = checked(number::<u64>, |n| *n >= 1, "must be at least 1"),
    )]
    pub max_deliveries: u64,
    /// Grace period to store what was read, in seconds.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "10", value_parser = seconds)]
    pub shutdown_timeout: Duration,
    /// The rule files.
    #[arg(long, env = "RULES_DIR", default_value = "rules")]
    pub rules_dir: PathBuf,
    /// When the rules change, describe stored events again with the new set, in the background.
    #[arg(
        long,
        env = "REENRICH_ON_RELOAD",
        default_value = "true",
        action = clap::ArgAction::Set,
        value_parser = infra::config::flag,
    )]
    pub reenrich_on_reload: bool,
    /// Stored events described again per transaction.
    #[arg(
        long,
        env = "REENRICH_BATCH_SIZE",
        default_value_t = 500,
        value_parser = checked(number::<usize>, |n| (1..=10_000).contains(n), "must be between 1 and 10000"),
    )]
    pub reenrich_batch_size: usize,
    /// Least pause between two re-enrichment batches, in milliseconds (a pause is also at least
    /// nine times the batch's own time): the throttle that keeps the background pass from
    /// competing with the stream's events.
    #[arg(
        long,
        env = "REENRICH_PAUSE_MS",
        default_value = "200",
        value_parser = infra::config::millis,
    )]
    pub reenrich_pause: Duration,
    /// Where `/metrics`, `/health` and `/ready` are served (`off`: nowhere).
    // `std::option::Option` spelled out: clap then parses the whole `Option` (`off` is `None`)
    // instead of making the variable optional.
    #[arg(
        long,
        env = "WORKER_METRICS_BIND",
        default_value = DEFAULT_METRICS_BIND,
        value_parser = metrics_bind,
    )]
    pub metrics_bind: std::option::Option<SocketAddr>,
    /// `WORKER_METRICS_BIND` was not set: when the default port is taken (another replica on this
    /// host), serve on a free port instead of stopping.
    #[arg(skip)]
    pub metrics_bind_is_default: bool,
}

impl Config {
    /// Reads and validates every variable; the error names the variable at fault.
    pub fn from_vars(vars: &Vars) -> Result<Self, ConfigError> {
        let mut config: Self = read(vars)?;
        config.shared.for_service("worker");
        config.shared.validate()?;
        if vars.get("DATABASE_POOL_SIZE").is_none() {
            config.database_pool_size = config.write_concurrency as u32 + 1;
        }
        if (config.database_pool_size as usize) < config.write_concurrency {
            return Err(ConfigError::new(
                "DATABASE_POOL_SIZE",
                "must be at least WRITE_CONCURRENCY",
            ));
        }
        if config.read_ahead_bytes < config.max_event_bytes {
            return Err(ConfigError::new(
                "READ_AHEAD_BYTES",
                format!(
                    "must be at least MAX_EVENT_BYTES ({}): room for one event of the largest size",
                    config.max_event_bytes
                ),
            ));
        }
        config.metrics_bind_is_default = vars.get("WORKER_METRICS_BIND").is_none();
        Ok(config)
    }
}

infra::deref_shared!(Config);

/// `host:port`, or `off`.
fn metrics_bind(raw: &str) -> Result<Option<SocketAddr>, String> {
    match raw {
        "off" => Ok(None),
        addr => address(addr).map(Some).map_err(|_| {
            format!("invalid value {addr:?}: expected host:port (e.g. 0.0.0.0:9100) or `off`")
        }),
    }
}

/// Default of `READ_AHEAD_BYTES` (64 MiB): 64 events of the largest size in a replica's hands.
pub const DEFAULT_READ_AHEAD_BYTES: usize = 64 << 20;

/// Default of `DLQ_MAXLEN`.
pub const DEFAULT_DLQ_MAXLEN: u64 = 10_000;

/// Default of `WORKER_METRICS_BIND`.
pub const DEFAULT_METRICS_BIND: &str = "127.0.0.1:9100";

/// `WORKER_METRICS_BIND` alone (default [`DEFAULT_METRICS_BIND`]), for `worker healthcheck`:
/// the error names the variable, and says so when it is `off` (nothing to ask).
pub fn metrics_bind_of(vars: &Vars) -> Result<SocketAddr, String> {
    let raw = vars
        .get("WORKER_METRICS_BIND")
        .unwrap_or_else(|| DEFAULT_METRICS_BIND.to_string());
    match metrics_bind(&raw) {
        Ok(Some(addr)) => Ok(addr),
        Ok(None) => Err("WORKER_METRICS_BIND is off: this worker serves no /health".into()),
        Err(e) => Err(format!("WORKER_METRICS_BIND: {e}")),
    }
}

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
        assert_eq!(config.shard_lease, Duration::from_secs(10));
        assert_eq!(config.max_deliveries, 5);
        assert_eq!(config.write_concurrency, 4);
        assert_eq!(config.database_pool_size, 5);
        assert!(config.migrate_on_start);
        assert!(config.reenrich_on_reload);
        assert_eq!(config.reenrich_batch_size, 500);
        assert_eq!(config.reenrich_pause, Duration::from_millis(200));
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
            ("SHARD_LEASE_MS", "50"),
            ("MAX_DELIVERIES", "0"),
            ("WRITE_CONCURRENCY", "0"),
            ("MIGRATE_ON_START", "maybe"),
            ("WORKER_NAME", "a b"),
            ("QUEUE_NAME", "event stream"),
            ("WORKER_METRICS_BIND", "9100"),
            ("READ_AHEAD_BYTES", "64MiB"),
            ("READ_AHEAD_BYTES", "1048575"),
            ("MAX_EVENT_BYTES", "-1"),
            ("MAX_EVENT_BYTES", "100"),
            ("DLQ_MAXLEN", "0"),
            ("DLQ_MAXLEN", "lots"),
            ("REENRICH_ON_RELOAD", "maybe"),
            ("REENRICH_BATCH_SIZE", "0"),
            ("REENRICH_BATCH_SIZE", "10001"),
            ("REENRICH_BATCH_SIZE", "many"),
            ("REENRICH_PAUSE_MS", "-1"),
            ("REENRICH_PAUSE_MS", "soon"),
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
