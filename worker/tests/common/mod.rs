//! Test harness: real Redis and Postgres, a database and stream keys per test, the worker run
//! in-process, and a TCP proxy that can take Postgres "down" and bring it back.

#![allow(dead_code)]

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use entity::{
    Envelope,
    envelope::{FIELD_EVENT, FIELD_VERSION},
};
use redis::{Value, aio::ConnectionManager};
use rules_engine::enrich::{Describer, EnrichError, Enricher, Enrichment, NoRules};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worker::Config;

pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_ADMIN_URL").unwrap_or_else(|_| ADMIN_URL.to_string())
}

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| REDIS_URL.to_string())
}

/// A database created (and migrated) for one test, dropped when the test ends, even on panic.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub conn: DatabaseConnection,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("test_worker_{}", Uuid::new_v4().simple());
        let admin = Database::connect(admin_url())
            .await
            .expect("connect admin database");
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create database");
        admin.close().await.ok();
        let url = db_url(&name, None);
        let conn = Database::connect(&url)
            .await
            .expect("connect test database");
        migration::apply(&conn)
            .await
            .expect("migrate test database");
        Self { name, url, conn }
    }

    /// A single number; -1 when the query fails (e.g. the table does not exist yet).
    pub async fn count(&self, sql: &str) -> i64 {
        match self
            .conn
            .query_one_raw(Statement::from_string(DbBackend::Postgres, sql.to_string()))
            .await
        {
            Ok(Some(row)) => row.try_get_by_index::<Option<i64>>(0).unwrap().unwrap_or(0),
            _ => -1,
        }
    }

    /// A pool on this database opened as the worker opens its own (`worker::store::connect`).
    pub async fn worker_pool(&self) -> DatabaseConnection {
        worker::store::connect(&config(&self.url, &Keys::new(), "store"))
            .await
            .expect("worker pool")
    }

    pub async fn events(&self) -> i64 {
        self.count("SELECT count(*) FROM events").await
    }

    pub async fn column(&self, sql: &str) -> Vec<String> {
        self.conn
            .query_all_raw(Statement::from_string(DbBackend::Postgres, sql.to_string()))
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.try_get_by_index::<String>(0).unwrap())
            .collect()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Dropping needs async I/O; run it on a runtime of its own so it also happens on panic.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(admin) = Database::connect(admin_url()).await {
                    let _ = admin
                        .execute_unprepared(&format!(
                            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                        ))
                        .await;
                    admin.close().await.ok();
                }
            });
        })
        .join()
        .ok();
    }
}

/// The URL of database `name`, optionally through another host:port.
pub fn db_url(name: &str, via: Option<SocketAddr>) -> String {
    let admin = admin_url();
    let base = &admin[..admin.rfind('/').expect("admin url names a database")];
    match via {
        None => format!("{base}/{name}"),
        Some(addr) => {
            let scheme_end = base.find("://").unwrap() + 3;
            let at = base[scheme_end..]
                .find('@')
                .map(|i| scheme_end + i + 1)
                .unwrap_or(scheme_end);
            format!("{}{addr}/{name}", &base[..at])
        }
    }
}

/// Stream names of one test; deleted when the test ends, even on panic.
pub struct Keys {
    pub stream: String,
    pub dlq: String,
    pub group: String,
}

impl Keys {
    pub fn new() -> Self {
        let id = Uuid::new_v4().simple().to_string();
        Self {
            stream: format!("test:{id}:events"),
            dlq: format!("test:{id}:dlq"),
            group: "enrichers".into(),
        }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        if let Ok(mut conn) = redis::Client::open(redis_url()).and_then(|c| c.get_connection()) {
            let _: Result<(), _> = redis::cmd("DEL")
                .arg(&self.stream)
                .arg(&self.dlq)
                .arg(&infra::unmatched::report_keys(&self.stream)[..])
                .query(&mut conn);
        }
    }
}

pub async fn redis() -> ConnectionManager {
    let client = redis::Client::open(redis_url()).unwrap();
    client.get_connection_manager().await.unwrap()
}

/// A worker config for tests: short intervals, its own keys and database.
pub fn config(db_url: &str, keys: &Keys, worker_name: &str) -> Config {
    Config {
        shared: infra::config::Shared {
            environment: "test".into(),
            redis_url: redis_url(),
            database_url: db_url.to_string(),
            queue_name: keys.stream.clone(),
            dlq_name: keys.dlq.clone(),
            max_event_bytes: infra::config::DEFAULT_MAX_EVENT_BYTES,
            migrate_on_start: false,
            telemetry: infra::telemetry::TelemetryConfig::local("worker"),
        },
        database_pool_size: 3,
        write_concurrency: 2,
        dlq_maxlen: worker::config::DEFAULT_DLQ_MAXLEN,
        consumer_group: keys.group.clone(),
        worker_name: worker_name.to_string(),
        batch_size: 50,
        read_ahead_bytes: worker::config::DEFAULT_READ_AHEAD_BYTES,
        flush_interval: Duration::from_millis(100),
        claim_interval: Duration::from_millis(100),
        claim_idle: Duration::from_secs(60),
        max_deliveries: 5,
        shutdown_timeout: Duration::from_secs(5),
        rules_dir: "rules".into(),
        metrics_bind: None,
        metrics_bind_is_default: false,
    }
}

pub fn envelope(distinct_id: &str, event: &str, properties: serde_json::Value) -> Envelope {
    Envelope {
        uuid: Uuid::now_v7(),
        distinct_id: distinct_id.into(),
        event: event.into(),
        properties: properties.as_object().cloned().unwrap_or_default(),
        timestamp: Utc::now(),
        received_at: Utc::now(),
        sent_at: None,
        session_id: None,
        lib: None,
        elements_chain: None,
        person: None,
    }
}

/// `envelope` ready to store, described by the fallback sentence (no rules).
pub fn stored(envelope: &Envelope) -> worker::store::StoredEvent {
    worker::store::StoredEvent::new(
        envelope.clone(),
        rules_engine::enrich::without_rules(envelope),
        None,
    )
}

/// Appends envelopes the way the api does (`v`, `event`); returns the entry ids.
pub async fn publish(
    redis: &mut ConnectionManager,
    stream: &str,
    events: &[Envelope],
) -> Vec<String> {
    let mut pipe = redis::pipe();
    for e in events {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(FIELD_VERSION)
            .arg("1")
            .arg(FIELD_EVENT)
            .arg(e.to_json());
    }
    pipe.query_async(redis).await.unwrap()
}

/// Appends a raw entry.
pub async fn publish_raw(
    redis: &mut ConnectionManager,
    stream: &str,
    fields: &[(&str, &str)],
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(redis).await.unwrap()
}

/// Entries delivered to the group but not acknowledged (0 before the group exists).
pub async fn pending(redis: &mut ConnectionManager, keys: &Keys) -> i64 {
    let reply: Value = match redis::cmd("XPENDING")
        .arg(&keys.stream)
        .arg(&keys.group)
        .query_async(redis)
        .await
    {
        Ok(reply) => reply,
        Err(e) if e.code() == Some("NOGROUP") => return 0,
        Err(e) => panic!("XPENDING: {e}"),
    };
    match reply {
        Value::Array(items) => match items.first() {
            Some(Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

pub async fn xlen(redis: &mut ConnectionManager, key: &str) -> i64 {
    redis::cmd("XLEN")
        .arg(key)
        .query_async(redis)
        .await
        .unwrap()
}

/// Whether the stream exists: a worker creates it with its group (`XGROUP CREATE … MKSTREAM`).
pub async fn group_created(redis: &mut ConnectionManager, keys: &Keys) -> bool {
    redis::cmd("EXISTS")
        .arg(&keys.stream)
        .query_async::<i64>(redis)
        .await
        .unwrap()
        == 1
}

/// The group's consumers; the group must exist ([`group_created`]).
pub async fn consumers(redis: &mut ConnectionManager, keys: &Keys) -> Vec<String> {
    let reply: Vec<std::collections::HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&keys.stream)
        .arg(&keys.group)
        .query_async(redis)
        .await
        .unwrap();
    reply
        .into_iter()
        .filter_map(|c| match c.get("name") {
            Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect()
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

/// A worker running in this process.
pub struct RunningWorker {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), worker::WorkerError>>,
}

impl RunningWorker {
    pub fn start(config: Config) -> Self {
        Self::start_with(config, counting(false).1)
    }

    pub fn start_with(config: Config, enricher: Arc<dyn Enricher>) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker::run_with(config, enricher, shutdown.clone()));
        Self { shutdown, task }
    }

    /// A worker with the counting enricher, and its metrics (what its `/metrics` would show).
    pub fn start_observed(config: Config) -> (Self, Arc<worker::metrics::WorkerMetrics>) {
        let metrics = Arc::new(worker::metrics::WorkerMetrics::new());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker::pipeline::run(
            config,
            counting(false).1,
            metrics.clone(),
            shutdown.clone(),
        ));
        (Self { shutdown, task }, metrics)
    }

    /// Graceful stop; returns the worker's result.
    pub async fn stop(self) -> Result<(), worker::WorkerError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("worker stops in time")
            .unwrap()
    }
}

/// The fallback sentences; counts events described and fails on events named `boom`.
#[derive(Default)]
pub struct Counting {
    pub described: AtomicUsize,
    pub fail_on_boom: bool,
}

struct CountingRules(Arc<Counting>);

impl Describer for CountingRules {
    fn version(&self) -> &str {
        "test-rules"
    }

    fn enrich(&self, event: &Envelope) -> Result<Enrichment, EnrichError> {
        self.0.described.fetch_add(1, Ordering::SeqCst);
        if self.0.fail_on_boom && event.event == "boom" {
            return Err(EnrichError("rule 'boom' has a bug".into()));
        }
        let mut enrichment = NoRules.enrich(event)?;
        if event.properties.get("$pathname").and_then(|p| p.as_str()) == Some("/pricing") {
            enrichment.intents.push(rules_engine::enrich::IntentHit {
                name: "purchase".into(),
                weight: 1.0,
                summary: "User showing Purchase Intent.".into(),
                half_life_secs: 86_400.0,
            });
        }
        Ok(enrichment)
    }
}

/// An enricher over a shared [`Counting`].
pub struct CountingEnricher(pub Arc<Counting>);

impl Enricher for CountingEnricher {
    fn describer(&self) -> Arc<dyn Describer> {
        Arc::new(CountingRules(self.0.clone()))
    }
}

/// A counting enricher and its counter.
pub fn counting(fail_on_boom: bool) -> (Arc<Counting>, Arc<dyn Enricher>) {
    let counter = Arc::new(Counting {
        described: AtomicUsize::new(0),
        fail_on_boom,
    });
    (counter.clone(), Arc::new(CountingEnricher(counter)))
}

/// A TCP proxy in front of Postgres (or, with [`PgProxy::start_to`], another service) that can
/// refuse and cut connections ("Postgres down").
pub struct PgProxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl PgProxy {
    pub async fn start(up: bool) -> Self {
        Self::start_to(up, "127.0.0.1:5432").await
    }

    /// A proxy in front of `target` (`host:port`).
    pub async fn start_to(up: bool, target: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(up));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, links2) = (up.clone(), links.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                links2.lock().unwrap().push(link);
            }
        });
        Self {
            addr,
            up,
            links,
            accept,
        }
    }

    /// Takes Postgres "down" (refusing new and cutting open connections) or brings it back.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for link in self.links.lock().unwrap().drain(..) {
                link.abort();
            }
        }
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.set_up(false);
    }
}
