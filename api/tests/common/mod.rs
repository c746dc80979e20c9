//! Test harness: runs the real api (`api::run`) on 127.0.0.1:0 against the real Redis, each test
//! with its own stream key, removed when the test ends.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use api::Config;
use entity::Envelope;
use redis::streams::StreamRangeReply;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-key";
pub const INGEST_KEY: &str = "phc_test_ingest_key";

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Polls `check` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A unique key for this test.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// A config for one test: real local services, its own stream.
pub fn test_config() -> Config {
    let mut config = Config::for_local(SECRET);
    config.ingest_api_keys = vec![INGEST_KEY.into()];
    config.redis_url = redis_url();
    config.database_url = database_url();
    config.queue_name = unique("test_events");
    config.dlq_name = unique("test_dlq");
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.migrate_on_start = false;
    config
}

/// A worker for the app of `api`: the same Redis, stream and DLQ, the database at
/// `database_url`, the shipped rules, its own consumer group, short reads, no metrics port.
pub fn worker_config(api: &Config, database_url: &str, group: &str) -> worker::Config {
    let name = format!("{group}-worker");
    worker::Config::from_vars(&infra::config::Vars::from_map([
        ("REDIS_URL", api.redis_url.as_str()),
        ("DATABASE_URL", database_url),
        ("QUEUE_NAME", api.queue_name.as_str()),
        ("DLQ_NAME", api.dlq_name.as_str()),
        ("CONSUMER_GROUP", group),
        ("WORKER_NAME", name.as_str()),
        ("FLUSH_INTERVAL", "0.05"),
        ("MIGRATE_ON_START", "false"),
        ("WORKER_METRICS_BIND", "off"),
        (
            "RULES_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../rules"),
        ),
    ]))
    .expect("valid worker config")
}

/// A database of its own for one test: created with the full schema, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub conn: sea_orm::DatabaseConnection,
}

impl TestDb {
    pub async fn create() -> Self {
        let db = Self::create_empty().await;
        migration::apply(&db.conn).await.unwrap();
        db
    }

    /// A database of its own without any schema (for code that must apply the migrations).
    pub async fn create_empty() -> Self {
        use sea_orm::ConnectionTrait;
        let admin = sea_orm::Database::connect(database_url())
            .await
            .expect("postgres at DATABASE_URL");
        let name = unique("test_api");
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = format!("{}/{name}", server_url());
        let conn = sea_orm::Database::connect(&url).await.unwrap();
        Self { name, url, conn }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .arg(database_url())
            .args([
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// `DATABASE_URL` without its database name.
fn server_url() -> String {
    let url = database_url();
    match url.rfind('/') {
        Some(i) if i > "postgres://".len() => url[..i].to_string(),
        _ => url,
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub http: reqwest::Client,
    pub config: Config,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(test_config()).await
    }

    pub async fn spawn_with(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind(config.bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(api::run(config.clone(), listener, shutdown.clone()));
        let app = Self {
            addr,
            base: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            config,
            shutdown,
            server: Some(server),
        };
        // The listener is bound before `run` starts, so requests queue until it serves.
        app
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Every entry of this test's stream, decoded.
    pub async fn stream_envelopes(&self) -> Vec<Envelope> {
        let client = redis::Client::open(self.config.redis_url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.config.queue_name)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        reply
            .ids
            .iter()
            .map(|entry| {
                Envelope::from_fields(|name| match entry.map.get(name) {
                    Some(redis::Value::BulkString(b)) => Some(b.as_slice()),
                    _ => None,
                })
                .expect("stream entry decodes")
            })
            .collect()
    }

    /// Number of entries in this test's stream.
    pub async fn stream_len(&self) -> u64 {
        self.xlen(&self.config.queue_name).await
    }

    /// Number of entries in this test's dead-letter stream.
    pub async fn dlq_len(&self) -> u64 {
        self.xlen(&self.config.dlq_name).await
    }

    async fn xlen(&self, key: &str) -> u64 {
        let client = redis::Client::open(self.config.redis_url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("XLEN")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Appends filler entries directly (to build a backlog).
    pub async fn fill_stream(&self, n: usize) {
        let client = redis::Client::open(self.config.redis_url.as_str()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut pipe = redis::pipe();
        for _ in 0..n {
            pipe.cmd("XADD")
                .arg(&self.config.queue_name)
                .arg("*")
                .arg("v")
                .arg("1")
                .arg("event")
                .arg("{}")
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await.unwrap();
    }

    /// Stops the server the way SIGTERM does and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.server.take().unwrap().await.unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Ok(client) = redis::Client::open(self.config.redis_url.as_str())
            && let Ok(mut conn) = client.get_connection()
        {
            let _: Result<(), _> = redis::cmd("DEL")
                .arg(&self.config.queue_name)
                .arg(&self.config.dlq_name)
                .arg(&infra::unmatched::report_keys(&self.config.queue_name)[..])
                .query(&mut conn);
        }
    }
}
