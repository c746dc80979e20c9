//! `get_user_context` over MCP against `GET /context/user/:id?format=text`, the same user's
//! same text, one request at a time from one client, on 127.0.0.1: the api (`api::run`) on a
//! fresh database of 1,000 users × 50 events (`context-data.sql`). Prints p50, p90
//! and p99 of each and the difference at p50 (the MCP layer's cost: JSON-RPC, the tool router,
//! the structured JSON beside the text), then criterion's figures.
//!
//! `cargo bench -p api --bench mcp`

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use rmcp::{
    RoleClient, ServiceExt,
    model::{CallToolRequestParams, ClientConfig},
    service::RunningService,
    transport::{
        StreamableHttpClientTransport, streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use sea_orm::ConnectionTrait;
use serde_json::json;
use testkit::TestDb;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

const KEY: &str = "bench-secret-key";
const USERS: usize = 1_000;
const SAMPLES: usize = 3_000;

struct Bench {
    http: reqwest::Client,
    base: String,
    mcp: RunningService<RoleClient, ClientConfig>,
    _db: TestDb,
    _shutdown: CancellationToken,
}

async fn start() -> Bench {
    let db = TestDb::create().await;
    for statement in bench_data(USERS, 50) {
        db.conn
            .execute_unprepared(&statement)
            .await
            .expect("bench data");
    }
    let mut config = api::Config::for_local(KEY);
    config.database_url = db.url.clone();
    config.redis_url = testkit::redis_url();
    (config.queue_name, config.dlq_name) = testkit::stream_names();
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.migrate_on_start = false;
    config.rules_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../rules").into();
    let listener = tokio::net::TcpListener::bind(config.bind).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(api::run(config, listener, shutdown.clone()));
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(format!("{base}/mcp")).auth_header(KEY),
    );
    let mcp = ClientConfig::default().serve(transport).await.unwrap();
    Bench {
        http: reqwest::Client::new(),
        base,
        mcp,
        _db: db,
        _shutdown: shutdown,
    }
}

/// `context-data.sql`, written for psql, as statements to run one after another: its `\`
/// meta-commands dropped and its variables given (persons of one id); the load in one string, the
/// upkeep after it (`VACUUM` cannot run inside a multi-statement string).
fn bench_data(users: usize, per_user: usize) -> Vec<String> {
    let sql = include_str!("context-data.sql")
        .lines()
        .filter(|line| !line.starts_with('\\'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(":users", &users.to_string())
        .replace(":per_user", &per_user.to_string())
        .replace(":person_size", "1");
    let (load, upkeep) = sql
        .split_once("\nVACUUM")
        .expect("context-data.sql ends with VACUUM");
    let upkeep = format!("VACUUM{upkeep}");
    let upkeep = upkeep.split(';').map(str::trim).filter(|s| !s.is_empty());
    std::iter::once(load.to_string())
        .chain(upkeep.map(String::from))
        .collect()
}

impl Bench {
    async fn http_text(&self, user: usize) -> String {
        let resp = self
            .http
            .get(format!(
                "{}/context/user/user_{user}?format=text",
                self.base
            ))
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
        resp.text().await.unwrap()
    }

    async fn mcp_text(&self, user: usize) -> String {
        let args = json!({"user_id": format!("user_{user}")});
        let result = self
            .mcp
            .call_tool(
                CallToolRequestParams::new("get_user_context")
                    .with_arguments(args.as_object().unwrap().clone()),
            )
            .await
            .unwrap();
        assert_eq!(result.is_error, Some(false));
        result.content[0].as_text().unwrap().text.clone()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(rt: &Runtime, bench: &Bench) {
    // Same text both ways.
    assert_eq!(
        rt.block_on(bench.http_text(7)),
        rt.block_on(bench.mcp_text(7))
    );
    let mut http = Vec::with_capacity(SAMPLES);
    let mut mcp = Vec::with_capacity(SAMPLES);
    rt.block_on(async {
        for i in 0..SAMPLES + 200 {
            let user = (i * 7919) % USERS;
            let t = Instant::now();
            std::hint::black_box(bench.http_text(user).await);
            let h = t.elapsed();
            let t = Instant::now();
            std::hint::black_box(bench.mcp_text(user).await);
            let m = t.elapsed();
            // The first 200 of each warm connections and caches.
            if i >= 200 {
                http.push(h);
                mcp.push(m);
            }
        }
    });
    http.sort();
    mcp.sort();
    for (name, s) in [
        ("GET /context?format=text", &http),
        ("MCP get_user_context", &mcp),
    ] {
        println!(
            "{name:<26} p50 {:>8.3} ms   p90 {:>8.3} ms   p99 {:>8.3} ms   ({} requests)",
            percentile(s, 0.5).as_secs_f64() * 1e3,
            percentile(s, 0.9).as_secs_f64() * 1e3,
            percentile(s, 0.99).as_secs_f64() * 1e3,
            s.len()
        );
    }
    println!(
        "MCP costs {:+.3} ms at p50",
        (percentile(&mcp, 0.5).as_secs_f64() - percentile(&http, 0.5).as_secs_f64()) * 1e3
    );
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let bench = rt.block_on(start());
    report(&rt, &bench);
    let mut group = c.benchmark_group("user_context_text");
    let mut user = 0;
    group.bench_function("http_get_context_format_text", |b| {
        b.iter(|| {
            user = (user + 7919) % USERS;
            rt.block_on(bench.http_text(user))
        })
    });
    group.bench_function("mcp_get_user_context", |b| {
        b.iter(|| {
            user = (user + 7919) % USERS;
            rt.block_on(bench.mcp_text(user))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
