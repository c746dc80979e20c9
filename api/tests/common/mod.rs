//! The api's test harness on top of `testkit`: the real api (`api::run`) on 127.0.0.1:0 against
//! the real Redis, with stream keys of its own removed when the test ends, and worker replicas
//! run in-process beside it.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use api::Config;
use entity::Envelope;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use testkit::*;

pub const SECRET: &str = "test-secret-key";
pub const INGEST_KEY: &str = "phc_test_ingest_key";

/// A config for one test: real local services, its own stream keys.
pub fn test_config() -> Config {
    let mut config = Config::for_local(SECRET);
    config.ingest_api_keys = vec![INGEST_KEY.into()];
    config.redis_url = redis_url();
    config.database_url = database_url();
    (config.queue_name, config.dlq_name) = stream_names();
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.migrate_on_start = false;
    config
}

/// A worker for the app of `api`: the same Redis, stream and DLQ, the database at
/// `database_url`, the shipped rules, its own consumer group, short reads, no metrics port.
pub fn worker_config(api: &Config, database_url: &str, group: &str) -> worker::Config {
    let name = format!("{group}-worker");
    let ca = api
        .redis_ca_cert
        .as_ref()
        .map(|path| path.display().to_string());
    let shards = api.stream_shards.to_string();
    let mut vars = vec![
        ("STREAM_SHARDS", shards.as_str()),
        ("REDIS_URL", api.redis_url.as_str()),
        (
            "REDIS_CLUSTER",
            if api.redis_cluster { "true" } else { "false" },
        ),
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
    ];
    if let Some(ca) = ca.as_deref() {
        vars.push(("REDIS_CA_CERT", ca));
    }
    worker::Config::from_vars(&infra::config::Vars::from_map(vars)).expect("valid worker config")
}

/// What the tests do with a request.
pub trait RequestExt: Sized {
    /// With `key` in the `X-API-Key` header.
    fn key(self, key: &str) -> Self;
    /// Sends it; panics when no answer comes.
    fn answer(self) -> impl Future<Output = Response> + Send;
    /// Sends it and reads the answer's JSON body, whatever its status.
    fn answer_json(self) -> impl Future<Output = Value> + Send;
}

impl RequestExt for RequestBuilder {
    fn key(self, key: &str) -> Self {
        self.header("X-API-Key", key)
    }

    async fn answer(self) -> Response {
        self.send().await.expect("the api answers")
    }

    async fn answer_json(self) -> Value {
        self.answer().await.json().await.expect("a JSON body")
    }
}

/// The api serving in this test.
pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub http: reqwest::Client,
    pub config: Config,
    /// The config's stream keys, deleted with the app.
    pub keys: Keys,
    shutdown: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(test_config()).await
    }

    pub async fn spawn_with(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind(config.bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let keys = Keys::adopt(config.queue_name.clone(), config.dlq_name.clone());
        // The listener is bound before `run` starts, so requests queue until it serves.
        let server = tokio::spawn(api::run(config.clone(), listener, shutdown.clone()));
        Self {
            addr,
            base: format!("http://{addr}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            config,
            keys,
            shutdown,
            server: Some(server),
        }
    }

    /// The api of `config` on a database of its own (with the schema).
    pub async fn spawn_with_db(mut config: Config) -> (Self, TestDb) {
        let db = TestDb::create().await;
        config.database_url = db.url.clone();
        (Self::spawn_with(config).await, db)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.http.get(self.url(path))
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.http.post(self.url(path))
    }

    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.http.delete(self.url(path))
    }

    /// `GET /context/user/{user}` with the secret key: the answer's status and JSON body.
    pub async fn context(&self, user: &str) -> (StatusCode, Value) {
        let resp = self
            .get(&format!("/context/user/{user}"))
            .key(SECRET)
            .answer()
            .await;
        (resp.status(), resp.json().await.unwrap())
    }

    /// `GET /context/user/{user}?format=text` with the secret key: the prompt text.
    pub async fn context_text(&self, user: &str) -> String {
        let resp = self
            .get(&format!("/context/user/{user}?format=text"))
            .key(SECRET)
            .answer()
            .await;
        resp.text().await.unwrap()
    }

    /// Sends `events` as `user`'s through `POST /batch`, as the SDKs do; expects 200.
    pub async fn capture(&self, user: &str, events: &[Value]) {
        let batch: Vec<Value> = events
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e["distinct_id"] = json!(user);
                e
            })
            .collect();
        let body = json!({"api_key": INGEST_KEY, "batch": batch});
        let resp = self.post("/batch/").json(&body).answer().await;
        assert_eq!(resp.status(), StatusCode::OK);
    }

    /// `GET /ready`: the status and the body.
    pub async fn ready(&self) -> (StatusCode, Value) {
        let resp = self.get("/ready").answer().await;
        (resp.status(), resp.json().await.unwrap())
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> Scrape {
        scrape(&self.url("/metrics")).await
    }

    /// Every entry of this test's stream, decoded.
    pub async fn stream_envelopes(&self) -> Vec<Envelope> {
        envelopes(&redis().await, &self.keys.stream).await
    }

    /// Number of entries in this test's stream.
    pub async fn stream_len(&self) -> i64 {
        xlen(&redis().await, &self.keys.stream).await
    }

    /// Number of entries in this test's dead-letter stream.
    pub async fn dlq_len(&self) -> i64 {
        xlen(&redis().await, &self.keys.dlq).await
    }

    /// Appends `n` filler entries directly (to build a backlog).
    pub async fn fill_stream(&self, n: usize) {
        let redis = redis().await;
        for _ in 0..n {
            publish_raw(&redis, &self.keys.stream, &[("v", "1"), ("event", "{}")]).await;
        }
    }

    /// A worker replica in this process for this app's stream, storing in `db`.
    pub fn start_worker(&self, db: &TestDb, group: &str) -> InProcessWorker {
        self.start_worker_with(worker_config(&self.config, &db.url, group))
    }

    /// A worker replica as [`Self::start_worker`], describing events with the rules of `rules_dir`.
    pub fn start_worker_with_rules(
        &self,
        db: &TestDb,
        group: &str,
        rules_dir: &std::path::Path,
    ) -> InProcessWorker {
        let mut config = worker_config(&self.config, &db.url, group);
        config.rules_dir = rules_dir.to_path_buf();
        self.start_worker_with(config)
    }

    /// A worker replica of `config` in this process.
    pub fn start_worker_with(&self, config: worker::Config) -> InProcessWorker {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(worker::run(config, shutdown.clone()));
        InProcessWorker {
            _stop: StopOnDrop::new(&shutdown, &task),
            shutdown,
            task,
        }
    }

    /// Begins shutdown the way SIGTERM does, without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
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
    }
}

/// A worker replica running in this process.
/// The api on a database of its own, as most read-path tests want it.
pub struct Fixture {
    pub app: TestApp,
    pub db: TestDb,
}

pub async fn spawn() -> Fixture {
    let (app, db) = TestApp::spawn_with_db(test_config()).await;
    Fixture { app, db }
}

pub struct InProcessWorker {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), worker::WorkerError>>,
    _stop: StopOnDrop,
}

impl InProcessWorker {
    /// Stops it the way SIGTERM does; it must stop cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().expect("worker stops cleanly");
    }
}

/// Five events each of eight users, interleaved in one request: `(user, n)` in property `n`.
pub fn interleaved_batch() -> Value {
    let batch: Vec<Value> = (0..5)
        .flat_map(|n| {
            (0..8).map(move |u| {
                serde_json::json!({"event": "step", "distinct_id": format!("user-{u}"), "properties": {"n": n}})
            })
        })
        .collect();
    Value::Array(batch)
}
