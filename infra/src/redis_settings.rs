//! The start-up check of the Redis settings that decide whether accepted events can be lost
//! before a worker stores them: a `maxmemory-policy` that evicts keys (the stream is a key), and,
//! in production, no persistence at all. Both binaries run it once at start; it warns (a log line
//! and `clickstream_redis_config_unsafe{setting} 1`) and never stops the process. Managed Redis often refuses
//! `CONFIG`: that is logged once and the gauge stays absent.

use std::time::Duration;

use prometheus::IntGaugeVec;
use redis::{RedisError, aio::ConnectionLike};

/// Longest the check waits for Redis.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The settings read with `CONFIG GET` (`None`: the server did not report it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisSettings {
    pub maxmemory_policy: Option<String>,
    pub appendonly: Option<String>,
    pub save: Option<String>,
}

/// A setting under which Redis would drop stream data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hazard {
    /// `maxmemory-policy` other than `noeviction`: under memory pressure Redis deletes keys, the
    /// stream with its unconsumed events included.
    Eviction,
    /// `appendonly no` and `save ""`: a restart loses everything queued.
    NoPersistence,
}

impl Hazard {
    /// The `setting` label of `clickstream_redis_config_unsafe`.
    pub fn setting(self) -> &'static str {
        match self {
            Self::Eviction => "maxmemory-policy",
            Self::NoPersistence => "persistence",
        }
    }
}

/// The hazards of `settings`; missing persistence counts only in `production`. A setting the
/// server did not report is not held against it.
pub fn hazards(settings: &RedisSettings, production: bool) -> Vec<Hazard> {
    let mut found = Vec::new();
    if settings
        .maxmemory_policy
        .as_deref()
        .is_some_and(|p| !p.eq_ignore_ascii_case("noeviction"))
    {
        found.push(Hazard::Eviction);
    }
    let aof_off = settings
        .appendonly
        .as_deref()
        .is_some_and(|a| a.eq_ignore_ascii_case("no"));
    let rdb_off = settings
        .save
        .as_deref()
        .is_some_and(|s| s.trim().is_empty());
    if production && aof_off && rdb_off {
        found.push(Hazard::NoPersistence);
    }
    found
}

/// Reads the settings (three `CONFIG GET`s in one round trip: older servers take one parameter
/// a call).
pub async fn read_settings(conn: &mut impl ConnectionLike) -> Result<RedisSettings, RedisError> {
    let mut pipe = redis::pipe();
    for name in ["maxmemory-policy", "appendonly", "save"] {
        pipe.cmd("CONFIG").arg("GET").arg(name);
    }
    let (policy, appendonly, save): (Vec<String>, Vec<String>, Vec<String>) =
        pipe.query_async(conn).await?;
    let value = |pair: Vec<String>| pair.into_iter().nth(1);
    Ok(RedisSettings {
        maxmemory_policy: value(policy),
        appendonly: value(appendonly),
        save: value(save),
    })
}

/// Reads the settings, warns about each hazard and sets `gauge` (`setting` label: 1 unsafe, 0
/// fine). When Redis refuses `CONFIG` or does not answer, says so once at info and returns
/// `None`; it never fails.
pub async fn check(
    conn: &mut impl ConnectionLike,
    production: bool,
    gauge: &IntGaugeVec,
) -> Option<Vec<Hazard>> {
    let settings = match tokio::time::timeout(CHECK_TIMEOUT, read_settings(conn)).await {
        Ok(Ok(settings)) => settings,
        Ok(Err(error)) => {
            tracing::info!(
                failure = crate::health::redis_failure(&error),
                code = error.code(),
                "Redis settings not checked: CONFIG GET was refused or failed (managed Redis \
                 often disables it); make sure maxmemory-policy is noeviction and, in \
                 production, that persistence is on"
            );
            return None;
        }
        Err(_) => {
            tracing::info!(
                timeout = ?CHECK_TIMEOUT,
                "Redis settings not checked: Redis did not answer CONFIG GET in time"
            );
            return None;
        }
    };
    let found = hazards(&settings, production);
    for hazard in [Hazard::Eviction, Hazard::NoPersistence] {
        let unsafe_now = found.contains(&hazard);
        gauge
            .with_label_values(&[hazard.setting()])
            .set(i64::from(unsafe_now));
        if !unsafe_now {
            continue;
        }
        match hazard {
            Hazard::Eviction => tracing::warn!(
                setting = "maxmemory-policy",
                value = settings.maxmemory_policy.as_deref().unwrap_or_default(),
                "Redis may evict keys when it reaches maxmemory, the event stream included: \
                 accepted events would be lost before a worker stores them. Set \
                 maxmemory-policy noeviction (ingest then answers 503 instead)"
            ),
            Hazard::NoPersistence => tracing::warn!(
                setting = "persistence",
                "Redis keeps the event stream in memory only (appendonly no, save \"\"): a \
                 restart loses every event not yet stored. Turn on appendonly yes (or RDB \
                 snapshots with save)"
            ),
        }
    }
    if found.is_empty() {
        tracing::debug!(?settings, "Redis settings keep stream data");
    }
    Some(found)
}

/// Runs [`check`] in the background on a connection of its own made by `client` (start-up must
/// not wait on Redis). On a cluster the settings are read from one node.
pub fn spawn_check(
    client: Result<crate::redis::RedisClient, RedisError>,
    production: bool,
    gauge: IntGaugeVec,
) {
    tokio::spawn(async move {
        let connect = async {
            match client? {
                crate::redis::RedisClient::Single(client) => client
                    .get_multiplexed_async_connection_with_config(
                        &redis::AsyncConnectionConfig::new()
                            .set_connection_timeout(Some(CHECK_TIMEOUT))
                            .set_response_timeout(Some(CHECK_TIMEOUT)),
                    )
                    .await
                    .map(Checked::Single),
                cluster => cluster
                    .connection_with(CHECK_TIMEOUT, CHECK_TIMEOUT, 0, CHECK_TIMEOUT)
                    .map(Checked::Any),
            }
        };
        enum Checked {
            Single(redis::aio::MultiplexedConnection),
            Any(crate::redis::RedisConn),
        }
        match connect.await {
            Ok(Checked::Single(mut conn)) => {
                check(&mut conn, production, &gauge).await;
            }
            Ok(Checked::Any(mut conn)) => {
                check(&mut conn, production, &gauge).await;
            }
            Err(error) => tracing::info!(
                failure = crate::health::redis_failure(&error),
                "Redis settings not checked: cannot connect to Redis at start"
            ),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(policy: &str, appendonly: &str, save: &str) -> RedisSettings {
        RedisSettings {
            maxmemory_policy: Some(policy.into()),
            appendonly: Some(appendonly.into()),
            save: Some(save.into()),
        }
    }

    #[test]
    fn eviction_is_a_hazard_everywhere() {
        for policy in [
            "allkeys-lru",
            "volatile-lru",
            "allkeys-lfu",
            "volatile-ttl",
            "allkeys-random",
        ] {
            assert_eq!(
                hazards(&settings(policy, "yes", "3600 1"), false),
                [Hazard::Eviction],
                "{policy}"
            );
        }
        assert_eq!(hazards(&settings("noeviction", "yes", ""), true), []);
        assert_eq!(hazards(&settings("NOEVICTION", "no", "3600 1"), true), []);
    }

    #[test]
    fn no_persistence_is_a_hazard_in_production_only() {
        let memory_only = settings("noeviction", "no", "");
        assert_eq!(hazards(&memory_only, true), [Hazard::NoPersistence]);
        assert_eq!(hazards(&memory_only, false), []);
        // either kind of persistence is enough
        assert_eq!(hazards(&settings("noeviction", "yes", ""), true), []);
        assert_eq!(
            hazards(&settings("noeviction", "no", "3600 1 300 100"), true),
            []
        );
        assert_eq!(
            hazards(&settings("allkeys-lru", "no", ""), true),
            [Hazard::Eviction, Hazard::NoPersistence]
        );
    }

    #[test]
    fn settings_not_reported_are_not_held_against_redis() {
        assert_eq!(hazards(&RedisSettings::default(), true), []);
    }

    fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into())
    }

    fn gauge() -> IntGaugeVec {
        IntGaugeVec::new(prometheus::Opts::new("g", "g"), &["setting"]).unwrap()
    }

    fn gauge_values(gauge: &IntGaugeVec) -> Vec<(String, i64)> {
        use prometheus::core::Collector;
        let mut values: Vec<(String, i64)> = gauge.collect()[0]
            .get_metric()
            .iter()
            .map(|m| {
                let label = m.get_label()[0].value().to_string();
                (label, m.get_gauge().get_value() as i64)
            })
            .collect();
        values.sort();
        values
    }

    #[tokio::test]
    async fn the_real_redis_is_checked() {
        let client = redis::Client::open(redis_url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let settings = read_settings(&mut conn).await.unwrap();
        assert!(settings.maxmemory_policy.is_some(), "{settings:?}");
        assert!(settings.appendonly.is_some() && settings.save.is_some());
        for production in [false, true] {
            let gauge = gauge();
            let found = check(&mut conn, production, &gauge).await.unwrap();
            assert_eq!(found, hazards(&settings, production));
            let flag = |h| i64::from(found.contains(&h));
            assert_eq!(
                gauge_values(&gauge),
                [
                    ("maxmemory-policy".into(), flag(Hazard::Eviction)),
                    ("persistence".into(), flag(Hazard::NoPersistence)),
                ]
            );
        }
    }

    /// An ACL user of its own that may not run CONFIG (as on managed Redis), removed on drop.
    struct RestrictedUser {
        admin: redis::Client,
        name: String,
    }

    impl Drop for RestrictedUser {
        fn drop(&mut self) {
            if let Ok(mut conn) = self.admin.get_connection() {
                let _: Result<i64, _> = redis::cmd("ACL")
                    .arg("DELUSER")
                    .arg(&self.name)
                    .query(&mut conn);
            }
        }
    }

    #[tokio::test]
    async fn a_refused_config_get_is_logged_not_fatal() {
        let admin = redis::Client::open(redis_url()).unwrap();
        let name = format!("test_no_config_{:016x}", rand::random::<u64>());
        let user = RestrictedUser { admin, name };
        let mut conn = user.admin.get_multiplexed_async_connection().await.unwrap();
        let () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user.name)
            .arg("on")
            .arg(">pw")
            .arg("~*")
            .arg("+@all")
            .arg("-config")
            .query_async(&mut conn)
            .await
            .unwrap();
        let restricted = redis::Client::open(redis_url().replacen(
            "redis://",
            &format!("redis://{}:pw@", user.name),
            1,
        ))
        .unwrap();
        let mut conn = restricted.get_multiplexed_async_connection().await.unwrap();
        let gauge = gauge();
        assert_eq!(check(&mut conn, true, &gauge).await, None);
        assert_eq!(gauge_values(&gauge), []);
    }
}
