//! Drain benchmark (run through `worker/benches/drain.sh`): prints figures, asserts nothing.
//!
//! 1. `COPY` baseline: the rows one worker would write, loaded with psql `\copy` into a table
//!    identical to `events` (same columns, primary key and index), just before each drain and
//!    just after it; the drain's ratio is to the mean of the two.
//! 2. One worker process (release build) draining a pre-filled stream of `EVENTS` events, then two.
//!    Peak RSS of the worker process from `/proc/<pid>/status`; the machine's busy CPU time per
//!    event, from `/proc/stat` (all processes: worker, Postgres, Redis, this program), and the
//!    workers' own, from `/proc/<pid>/stat`; COPY's machine CPU per row, and the drain's rows per
//!    CPU-second against COPY's.
//! 3. Ingest → queryable latency at `RATE` events/s: each event is appended like the api does; a
//!    poller finds it in `events` (poll period 2 ms) and records the time since it was appended.
//! 4. Large events: one worker (its defaults, or `READ_AHEAD_BYTES`/`MAX_EVENT_BYTES` as set)
//!    draining `LARGE_EVENTS` events of `LARGE_EVENT_BYTES` bytes of envelope JSON each (a
//!    property of random text fills them), and its peak RSS beside its read-ahead budget
//!    (`LARGE_EVENTS=0` skips it; `LARGE_ONLY=1` runs only it).
//!
//! 5. With `REENRICH_HISTORY=N`: each drain again, beside `N` stored events of an older rule set
//!    (2,000 users with profiles), once with `REENRICH_ON_RELOAD=false` and once with the
//!    re-enrichment pass describing them while the workers drain; the drain rate of both, their
//!    ratio, and how many old events the pass described meanwhile.
//!
//! 6. The ceiling and the fleet: `\copy` of the same rows split over 1, 4 and 8 concurrent psql
//!    sessions (`COPY_SESSIONS`, plus every count of `REPLICAS`), measured once before the drains;
//!    then, for the largest `BATCH_SIZES`, each replica count's rate beside the ceiling with as
//!    many sessions, and the scale factor from the previous count.
//!
//! Touches only 127.0.0.1 (its own database and stream keys, removed at the end) and stops by itself.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use chrono::{TimeZone, Utc};
use entity::{
    Envelope,
    envelope::{FIELD_EVENT, FIELD_VERSION},
};
use rand::{Rng, RngCore, SeedableRng, rngs::StdRng};
use redis::aio::ConnectionManager;
use sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
    sqlx::{
        self, Connection,
        postgres::{PgConnectOptions, PgConnection},
    },
};
use serde_json::json;
use tokio::process::{Child, Command};
use uuid::Uuid;

struct Settings {
    events: usize,
    large_events: usize,
    large_event_bytes: usize,
    rate: usize,
    latency_secs: u64,
    batch_sizes: Vec<usize>,
    replicas: Vec<usize>,
    /// Concurrent `\copy` sessions the ceiling is measured with (with every count of `replicas`).
    copy_sessions: Vec<usize>,
    /// `STREAM_SHARDS` of the drains: the events pre-filled into their users' shards, each
    /// replica reading the shards it holds.
    stream_shards: usize,
    redis_url: String,
    admin_url: String,
    worker_bin: PathBuf,
    rules_dir: PathBuf,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The comma-separated numbers in variable `name`, else in `default`.
fn list_or(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn settings() -> Settings {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    Settings {
        events: env_or("EVENTS", 200_000),
        large_events: env_or("LARGE_EVENTS", 400),
        large_event_bytes: env_or("LARGE_EVENT_BYTES", 1_000_000),
        rate: env_or("RATE", 1_000),
        latency_secs: env_or("LATENCY_SECS", 15),
        batch_sizes: list_or("BATCH_SIZES", "50,500"),
        replicas: list_or("REPLICAS", "1,2"),
        copy_sessions: list_or("COPY_SESSIONS", "1,4,8"),
        stream_shards: env_or("STREAM_SHARDS", 1),
        redis_url: std::env::var("BENCH_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        admin_url: std::env::var("BENCH_ADMIN_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        worker_bin: std::env::var("WORKER_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| target.join("release/worker")),
        rules_dir: root.join("rules"),
    }
}

/// A realistic PostHog-like event mix over 5,000 users with sessions.
fn generate(n: usize, seed: u64) -> Vec<Envelope> {
    let mut rng = StdRng::seed_from_u64(seed);
    let pages = [
        "/",
        "/pricing",
        "/docs",
        "/docs/getting-started",
        "/blog/launch",
        "/checkout",
        "/settings",
        "/upgrade",
    ];
    let buttons = [
        "Upgrade Plan",
        "Start free trial",
        "Add to cart",
        "Save",
        "Contact sales",
        "Next",
    ];
    let customs = [
        "signup_completed",
        "plan_upgraded",
        "invite_sent",
        "report_exported",
    ];
    let browsers = ["Chrome", "Firefox", "Safari", "Edge"];
    let base = Utc.with_ymd_and_hms(2026, 11, 28, 9, 0, 0).unwrap();
    (0..n)
        .map(|i| {
            let user = rng.random_range(0..5_000);
            let page = pages[rng.random_range(0..pages.len())];
            let url = format!("https://app.example.com{page}");
            let session = format!("0193{user:04x}-{:04x}", i / 20_000);
            let mut props = json!({
                "$current_url": url, "$pathname": page, "$host": "app.example.com",
                "$browser": browsers[user % browsers.len()], "$browser_version": 120 + user % 10,
                "$os": "Mac OS X", "$device_type": "Desktop", "$screen_height": 1080, "$screen_width": 1920,
                "$referrer": "https://www.google.com/", "$referring_domain": "www.google.com",
                "$lib": "web", "$lib_version": "1.200.0", "$session_id": session,
                "$window_id": format!("w-{user}"), "$insert_id": format!("{i:x}"),
                "utm_source": "newsletter", "utm_campaign": "black-friday",
                "token": "phc_benchmark"
            });
            let (event, chain) = match rng.random_range(0..100) {
                0..55 => ("$pageview".to_string(), None),
                55..80 => {
                    let text = buttons[rng.random_range(0..buttons.len())];
                    props["$event_type"] = json!("click");
                    props["$el_text"] = json!(text);
                    let chain = format!(
                        "button.btn.btn-primary:text=\"{text}\":attr__class=\"btn btn-primary\":nth-child=\"2\";div.card:nth-child=\"1\";body"
                    );
                    ("$autocapture".to_string(), Some(chain))
                }
                80..90 => ("$pageleave".to_string(), None),
                _ => (customs[rng.random_range(0..customs.len())].to_string(), None),
            };
            let timestamp = base + chrono::Duration::milliseconds(i as i64 * 10);
            Envelope {
                uuid: Uuid::now_v7(),
                distinct_id: format!("user_{user}"),
                event,
                properties: props.as_object().cloned().unwrap_or_default(),
                timestamp,
                received_at: timestamp + chrono::Duration::milliseconds(40),
                sent_at: None,
                session_id: Some(session),
                lib: Some("web".into()),
                elements_chain: chain,
                person: None,
            }
        })
        .collect()
}

fn csv_field(out: &mut String, value: Option<&str>) {
    if let Some(v) = value {
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    }
}

/// The rows the worker writes for these events (same rules), as CSV for `\copy`.
fn copy_file(events: &[Envelope], rules: &dyn rules_engine::enrich::Describer) -> String {
    let mut out = String::with_capacity(events.len() * 1200);
    for e in events {
        let enrichment = rules
            .enrich(e)
            .unwrap_or_else(|_| rules_engine::enrich::without_rules(e));
        let row = worker::store::StoredEvent::new(e.clone(), enrichment, None);
        let properties = &row.properties;
        let intents = row.intents_json().to_string();
        let (ts, rx) = (row.timestamp.to_rfc3339(), row.received_at.to_rfc3339());
        let fields = [
            Some(rules.version()),
            Some(&row.uuid.to_string()[..]),
            Some(&row.distinct_id[..]),
            Some(&row.event[..]),
            row.description.as_deref(),
            row.rule_id.as_deref(),
            Some(&intents[..]),
            Some(&properties[..]),
            row.url.as_deref(),
            row.path.as_deref(),
            row.session_id.as_deref(),
            row.elements_chain.as_deref(),
            Some(&ts[..]),
            Some(&rx[..]),
        ];
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            csv_field(&mut out, *f);
        }
        out.push('\n');
    }
    out
}

async fn sql(db: &DatabaseConnection, sql: &str) {
    db.execute_unprepared(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn scalar(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db
        .query_one_raw(Statement::from_string(DbBackend::Postgres, sql.to_string()))
        .await
        .unwrap()
        .unwrap();
    row.try_get_by_index::<i64>(0).unwrap()
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) process `pid` has used, from `/proc/<pid>/stat` (fields 14 and 15,
/// counted after the command name, which may hold spaces).
fn process_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = after_comm
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// Starts a worker reading `shards` shards of `stream`; `batch_size` `None` leaves its default.
fn spawn_worker(
    s: &Settings,
    db_url: &str,
    (stream, shards): (&str, usize),
    name: &str,
    batch_size: Option<usize>,
    extra: &[(&str, String)],
) -> Child {
    let mut command = Command::new(&s.worker_bin);
    command.env_clear();
    command.envs(extra.iter().map(|(k, v)| (*k, v.as_str())));
    // Worker settings to try (the defaults otherwise).
    for var in [
        "WRITE_CONCURRENCY",
        "FLUSH_INTERVAL",
        "READ_AHEAD_BYTES",
        "MAX_EVENT_BYTES",
        "REENRICH_BATCH_SIZE",
        "REENRICH_PAUSE_MS",
        "SHARD_LEASE_MS",
    ] {
        if let Ok(value) = std::env::var(var) {
            command.env(var, value);
        }
    }
    if let Some(batch_size) = batch_size {
        command.env("BATCH_SIZE", batch_size.to_string());
    }
    command
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REDIS_URL", &s.redis_url)
        .env("DATABASE_URL", db_url)
        .env("QUEUE_NAME", stream)
        .env("STREAM_SHARDS", shards.to_string())
        .env("DLQ_NAME", format!("{stream}:dlq"))
        .env("CONSUMER_GROUP", "bench")
        .env("WORKER_NAME", name)
        .env("MIGRATE_ON_START", "false")
        .env("RULES_DIR", &s.rules_dir)
        .env("WORKER_METRICS_BIND", "127.0.0.1:0")
        .env(
            "RUST_LOG",
            std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(if std::env::var("BENCH_WORKER_STDOUT").is_ok() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", s.worker_bin.display()))
}

/// Deletes the stream (every shard) and every key the workers kept beside it.
async fn delete_keys(redis: &mut ConnectionManager, stream: &str) {
    let shards = infra::shards::StreamShards::new(stream, infra::shards::MAX_SHARDS);
    let shard_keys: Vec<String> = (0..shards.count())
        .flat_map(|i| [shards.key(i).to_string(), shards.lease_key(i, "bench")])
        .chain([shards.replicas_key("bench")])
        .collect();
    let _: () = redis::cmd("DEL")
        .arg(&shard_keys[..])
        .query_async(redis)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(stream)
        .arg(format!("{stream}:dlq"))
        .arg(&infra::unmatched::report_keys(stream, false)[..])
        .query_async(redis)
        .await
        .unwrap();
}

/// Sends SIGTERM and waits; returns (exit code, seconds to exit).
async fn stop(child: &mut Child) -> (Option<i32>, f64) {
    let pid = child.id().expect("running");
    let started = Instant::now();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let code = match status {
        Ok(Ok(status)) => status.code(),
        _ => {
            let _ = child.kill().await;
            None
        }
    };
    (code, started.elapsed().as_secs_f64())
}

struct Drain {
    secs: f64,
    peak_rss_mib: f64,
    exits: Vec<(Option<i32>, f64)>,
    cpu: Cpu,
    /// Seconds of CPU the worker processes used (user + system), start-up included.
    worker_cpu: f64,
    /// Older events the re-enrichment pass described during the drain.
    reenriched: i64,
}

/// One drain: how many workers, their batch size, and the older events beside it (with
/// `REENRICH_ON_RELOAD` as `reenrich` says).
#[derive(Clone, Copy)]
struct Run {
    replicas: usize,
    batch_size: usize,
    history: usize,
    reenrich: bool,
}

/// Users of the older events a drain with history has beside it.
const HISTORY_USERS: usize = 2_000;

/// The whole machine's CPU time, from the first line of `/proc/stat` (clock ticks of 1/100 s).
#[derive(Clone, Copy)]
struct Cpu {
    /// Seconds busy: user, nice, system, irq, softirq, summed over the cores.
    busy: f64,
    /// Seconds the hypervisor gave to others while this machine wanted to run.
    stolen: f64,
}

impl Cpu {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        let tick = |i: usize| ticks.get(i).copied().unwrap_or(0.0) / 100.0;
        Cpu {
            busy: tick(0) + tick(1) + tick(2) + tick(5) + tick(6),
            stolen: tick(7),
        }
    }

    fn since(self, start: Cpu) -> Cpu {
        Cpu {
            busy: self.busy - start.busy,
            stolen: self.stolen - start.stolen,
        }
    }
}

async fn drain(
    s: &Settings,
    db: &DatabaseConnection,
    db_url: &str,
    redis: &mut ConnectionManager,
    events: &[Envelope],
    run: Run,
) -> Drain {
    let Run {
        replicas,
        batch_size,
        history,
        reenrich,
    } = run;
    sql(
        db,
        "TRUNCATE events, user_profiles, user_sessions, rules_reenrich, user_intents",
    )
    .await;
    if history > 0 {
        // Events of an older rule set, each of which the live rules describe differently.
        sql(db, &format!(
            "INSERT INTO events (uuid, distinct_id, event, description, intents, properties, path, session_id, \"timestamp\", received_at, rules_version) \
             SELECT gen_random_uuid(), 'hist_' || (i % {HISTORY_USERS}), '$pageview', 'an older sentence', '{{}}', \
                    jsonb_build_object('$pathname', '/pricing', '$current_url', 'https://app.example.com/pricing'), '/pricing', \
                    'hist_s' || (i % 10000), now() - make_interval(secs => i), now() - make_interval(secs => i), 'older-rules' \
               FROM generate_series(1, {history}) AS i"
        )).await;
        sql(db, "INSERT INTO user_profiles (distinct_id, first_seen, last_seen, event_count) \
                 SELECT distinct_id, min(\"timestamp\"), max(\"timestamp\"), count(*) FROM events GROUP BY distinct_id").await;
        sql(db, "VACUUM ANALYZE events").await;
    }
    let stream = format!("bench:{}:events", Uuid::new_v4().simple());
    let shards = infra::shards::StreamShards::new(&stream, s.stream_shards);
    let filled = Instant::now();
    let mut by_shard: Vec<Vec<Envelope>> = vec![Vec::new(); shards.count()];
    for e in events {
        by_shard[shards.shard_of(&e.distinct_id)].push(e.clone());
    }
    for (shard, events) in by_shard.iter().enumerate() {
        testkit::publish(redis, shards.key(shard), events).await;
    }
    println!(
        "  pre-filled {} entries into {} shard(s) of {stream} in {:.1}s",
        events.len(),
        shards.count(),
        filled.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let cpu = Cpu::now();
    let mut children: Vec<Child> = (0..replicas)
        .map(|i| {
            spawn_worker(
                s,
                db_url,
                (&stream, shards.count()),
                &format!("bench-{i}"),
                Some(batch_size),
                &[("REENRICH_ON_RELOAD", reenrich.to_string())],
            )
        })
        .collect();
    let pids: Vec<u32> = children.iter().filter_map(|c| c.id()).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut left = 0;
        for key in shards.keys() {
            left += testkit::xlen(redis, key).await;
        }
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "drain did not finish within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = Cpu::now().since(cpu);
    let worker_cpu = pids.iter().map(|p| process_cpu_secs(*p)).sum();
    let peak_rss_mib = pids
        .iter()
        .map(|p| rss_kib(*p, "VmHWM:"))
        .max()
        .unwrap_or(0) as f64
        / 1024.0;
    let mut exits = Vec::new();
    for child in &mut children {
        exits.push(stop(child).await);
    }
    let stored = scalar(
        db,
        "SELECT count(*) FROM events WHERE distinct_id NOT LIKE 'hist\\_%'",
    )
    .await;
    assert_eq!(stored as usize, events.len(), "every event stored once");
    let counted = scalar(
        db,
        "SELECT sum(event_count)::bigint FROM user_profiles WHERE distinct_id NOT LIKE 'hist\\_%'",
    )
    .await;
    assert_eq!(counted as usize, events.len(), "every event counted once");
    let reenriched = scalar(
        db,
        "SELECT count(*) FROM events WHERE distinct_id LIKE 'hist\\_%' AND rules_version <> 'older-rules'",
    )
    .await;
    delete_keys(redis, &stream).await;
    Drain {
        secs,
        peak_rss_mib,
        exits,
        cpu,
        worker_cpu,
        reenriched,
    }
}

async fn latency(
    s: &Settings,
    db: &DatabaseConnection,
    db_url: &str,
    redis: &mut ConnectionManager,
) -> (Vec<f64>, f64, usize) {
    sql(
        db,
        "TRUNCATE events, user_profiles, user_sessions, user_intents",
    )
    .await;
    let stream = format!("bench:{}:events", Uuid::new_v4().simple());
    let mut child = spawn_worker(s, db_url, (&stream, 1), "bench-latency", None, &[]);
    let pid = child.id().unwrap_or(0);
    // Wait until the worker has joined its group.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let groups: Result<redis::Value, _> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&stream)
            .arg("bench")
            .query_async(redis)
            .await;
        if matches!(groups, Ok(redis::Value::Array(ref c)) if !c.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "worker did not join");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The poller (below) has a connection of its own, ready before the first event is sent, on
    // which Postgres never plans a sequential scan: its statement is prepared once and planned
    // for any bound, and a plan made while `events` was small would read the whole table on
    // every poll (500 times a second) as it grows.
    let poll_options: PgConnectOptions = db_url.parse().unwrap();
    let mut poller = PgConnection::connect_with(&poll_options.options([("enable_seqscan", "off")]))
        .await
        .unwrap();
    async fn poll(poller: &mut PgConnection, from: Uuid) -> Vec<Uuid> {
        sqlx::query_scalar("SELECT uuid FROM events WHERE uuid >= $1")
            .bind(from)
            .fetch_all(poller)
            .await
            .unwrap()
    }
    poll(&mut poller, Uuid::max()).await;
    let total = s.rate * s.latency_secs as usize;
    let events = generate(total, 7);
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::unbounded_channel::<(Uuid, Instant)>();
    let producer = {
        let mut redis = redis.clone();
        let stream = stream.clone();
        let interval = Duration::from_secs_f64(1.0 / s.rate as f64);
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            for (i, e) in events.into_iter().enumerate() {
                tokio::time::sleep_until(start + interval * i as u32).await;
                let json = e.to_json();
                // Announced before appending, so the poller knows it before it can be stored.
                sent_tx.send((e.uuid, Instant::now())).unwrap();
                let _: String = redis::cmd("XADD")
                    .arg(&stream)
                    .arg("*")
                    .arg(FIELD_VERSION)
                    .arg("1")
                    .arg(FIELD_EVENT)
                    .arg(json)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
            }
        })
    };

    // Events are appended in uuid (v7) order; concurrent writers may commit them slightly out of
    // order, so each poll asks for rows from the oldest event not yet seen onwards: a cost
    // proportional to what is in flight (polling for every outstanding id would load Postgres).
    let mut sent: BTreeMap<Uuid, Instant> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(total);
    let mut peak_rss = 0;
    let deadline = Instant::now() + Duration::from_secs(s.latency_secs + 60);
    while latencies.len() < total && Instant::now() < deadline {
        while let Ok((uuid, at)) = sent_rx.try_recv() {
            sent.insert(uuid, at);
        }
        if let Some((&oldest, _)) = sent.first_key_value() {
            let rows = poll(&mut poller, oldest).await;
            let seen = Instant::now();
            for id in rows {
                if let Some(at) = sent.remove(&id) {
                    latencies.push((seen - at).as_secs_f64() * 1000.0);
                }
            }
        }
        peak_rss = peak_rss.max(rss_kib(pid, "VmRSS:"));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    producer.await.unwrap();
    let _ = stop(&mut child).await;
    delete_keys(redis, &stream).await;
    latencies.sort_by(f64::total_cmp);
    (latencies, peak_rss as f64 / 1024.0, total)
}

/// `n` events of `bytes` bytes of envelope JSON each: the usual mix, each with a `$payload`
/// property of random letters and digits (which Postgres cannot compress) to fill it.
fn large_events(n: usize, bytes: usize, seed: u64) -> Vec<Envelope> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = StdRng::seed_from_u64(seed);
    let mut events = generate(n, seed);
    for e in &mut events {
        e.properties.insert("$payload".into(), json!(""));
        let mut payload = vec![0u8; bytes.saturating_sub(e.to_json().len())];
        rng.fill_bytes(&mut payload);
        for b in &mut payload {
            *b = ALPHABET[*b as usize % ALPHABET.len()];
        }
        let payload = String::from_utf8(payload).expect("ASCII");
        e.properties.insert("$payload".into(), json!(payload));
    }
    events
}

/// What the large-event drain showed.
struct LargeDrain {
    secs: f64,
    peak_rss_mib: f64,
    /// Envelope JSON drained, in bytes.
    bytes: usize,
}

/// 4. One worker draining `LARGE_EVENTS` pre-filled events of `LARGE_EVENT_BYTES` each.
async fn large(
    s: &Settings,
    db: &DatabaseConnection,
    db_url: &str,
    redis: &mut ConnectionManager,
) -> LargeDrain {
    sql(
        db,
        "TRUNCATE events, user_profiles, user_sessions, user_intents",
    )
    .await;
    let stream = format!("bench:{}:events", Uuid::new_v4().simple());
    let filled = Instant::now();
    let mut bytes = 0;
    // Made and appended 20 at a time: this program never holds them all.
    for chunk in 0..s.large_events.div_ceil(20) {
        let n = 20.min(s.large_events - chunk * 20);
        let events = large_events(n, s.large_event_bytes, 100 + chunk as u64);
        bytes += events.iter().map(|e| e.to_json().len()).sum::<usize>();
        testkit::publish(redis, &stream, &events).await;
    }
    println!(
        "  pre-filled {} entries ({:.0} MiB) into {stream} in {:.1}s",
        s.large_events,
        bytes as f64 / (1 << 20) as f64,
        filled.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let mut child = spawn_worker(s, db_url, (&stream, 1), "bench-large", None, &[]);
    let pid = child.id().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(600);
    while testkit::xlen(redis, &stream).await > 0 {
        assert!(
            Instant::now() < deadline,
            "large drain did not finish within 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let peak_rss_mib = rss_kib(pid, "VmHWM:") as f64 / 1024.0;
    let _ = stop(&mut child).await;
    let stored = scalar(db, "SELECT count(*) FROM events").await;
    assert_eq!(stored as usize, s.large_events, "every event stored once");
    let counted = scalar(db, "SELECT sum(event_count)::bigint FROM user_profiles").await;
    assert_eq!(counted as usize, s.large_events, "every event counted once");
    sql(
        db,
        "TRUNCATE events, user_profiles, user_sessions, user_intents",
    )
    .await;
    delete_keys(redis, &stream).await;
    LargeDrain {
        secs,
        peak_rss_mib,
        bytes,
    }
}

/// The worker's read-ahead budget as this program starts it (`READ_AHEAD_BYTES`, else the
/// default), in MiB.
fn read_ahead_mib() -> f64 {
    let bytes = std::env::var("READ_AHEAD_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(worker::config::DEFAULT_READ_AHEAD_BYTES);
    bytes as f64 / (1 << 20) as f64
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// `psql \copy` of `csv` into `table_columns` (an empty table); prints and returns rows/s.
/// One COPY run: rows per second, and the machine's busy CPU time per row (µs).
fn copy_rate(db_url: &str, csv: &std::path::Path, rows: usize, table_columns: &str) -> (f64, f64) {
    let copy = format!(
        "\\copy {table_columns} FROM '{}' WITH (FORMAT csv)",
        csv.display()
    );
    let cpu = Cpu::now();
    let started = Instant::now();
    let status = std::process::Command::new("psql")
        .arg(db_url)
        .arg("-q")
        .arg("-c")
        .arg(&copy)
        .status()
        .expect("run psql");
    let secs = started.elapsed().as_secs_f64();
    let cpu_us = Cpu::now().since(cpu).busy * 1e6 / rows as f64;
    assert!(status.success(), "psql \\copy failed");
    let rate = rows as f64 / secs;
    println!(
        "COPY (psql \\copy, same rows, identical table): {secs:.2}s = {rate:.0} rows/s; machine CPU {cpu_us:.0} µs/row"
    );
    (rate, cpu_us)
}

/// The `\copy` ceiling with `sessions` concurrent psql sessions, each loading its share of the
/// rows (`parts`, one CSV file each) into `table_columns`: rows per second over all of them.
fn copy_ceiling(db_url: &str, parts: &[PathBuf], rows: usize, table_columns: &str) -> f64 {
    let started = Instant::now();
    let children: Vec<std::process::Child> = parts
        .iter()
        .map(|part| {
            std::process::Command::new("psql")
                .arg(db_url)
                .arg("-q")
                .arg("-c")
                .arg(format!(
                    "\\copy {table_columns} FROM '{}' WITH (FORMAT csv)",
                    part.display()
                ))
                .spawn()
                .expect("run psql")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "psql \\copy failed");
    }
    rows as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let s = settings();
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probing
    }
    assert!(
        s.worker_bin.exists(),
        "worker binary not found at {} (build it with --release)",
        s.worker_bin.display()
    );
    let admin = Database::connect(&s.admin_url)
        .await
        .expect("connect postgres");
    let name = format!("bench_drain_{}", Uuid::new_v4().simple());
    sql(&admin, &format!("CREATE DATABASE \"{name}\"")).await;
    let db_url = format!("{}/{name}", &s.admin_url[..s.admin_url.rfind('/').unwrap()]);
    let db = Database::connect(&db_url).await.unwrap();
    migration::apply(&db).await.unwrap();
    let mut redis = redis::Client::open(s.redis_url.as_str())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();

    println!(
        "drain benchmark: {} events, worker {}",
        s.events,
        s.worker_bin.display()
    );
    let large_only = std::env::var("LARGE_ONLY").is_ok();
    let events = generate(if large_only { 0 } else { s.events }, 42);
    let avg_json = events
        .iter()
        .take(1_000)
        .map(|e| e.to_json().len())
        .sum::<usize>()
        / 1_000.min(events.len()).max(1);
    println!("  average envelope {avg_json} bytes");

    // 1. The COPY baseline: an identical table, and the same rows as CSV (run before each drain).
    sql(&db, "CREATE TABLE events_copy (LIKE events INCLUDING ALL)").await;
    let csv_path = std::env::temp_dir().join(format!("{name}.csv"));
    let rules = rules_engine::enrich::load_once(&s.rules_dir).expect("rules load");
    println!(
        "  rules {} (version {})",
        s.rules_dir.display(),
        rules.version()
    );
    std::fs::write(&csv_path, copy_file(&events, rules.as_ref())).unwrap();
    let copy_columns = "events_copy (rules_version, uuid, distinct_id, event, description, rule_id, intents, properties, url, path, session_id, elements_chain, \"timestamp\", received_at)";
    let copy = |db_url: &str| copy_rate(db_url, &csv_path, events.len(), copy_columns);
    // 6a. The ceiling with as many concurrent sessions as there will be replicas (and 1, 4, 8).
    let mut ceilings: BTreeMap<usize, f64> = BTreeMap::new();
    if !large_only && std::env::var("LATENCY_ONLY").is_err() {
        let mut counts: Vec<usize> = s.copy_sessions.iter().chain(&s.replicas).copied().collect();
        counts.sort_unstable();
        counts.dedup();
        for sessions in counts.into_iter().filter(|&n| n > 0) {
            let parts: Vec<PathBuf> = (0..sessions)
                .map(|i| {
                    let path = std::env::temp_dir().join(format!("{name}-{sessions}-{i}.csv"));
                    let share: Vec<Envelope> =
                        events.iter().skip(i).step_by(sessions).cloned().collect();
                    std::fs::write(&path, copy_file(&share, rules.as_ref())).unwrap();
                    path
                })
                .collect();
            sql(&db, "CHECKPOINT").await;
            let rate = copy_ceiling(&db_url, &parts, events.len(), copy_columns);
            assert_eq!(
                scalar(&db, "SELECT count(*) FROM events_copy").await as usize,
                events.len()
            );
            sql(&db, "TRUNCATE events_copy").await;
            println!("ceiling: \\copy in {sessions} concurrent session(s): {rate:.0} rows/s");
            ceilings.insert(sessions, rate);
            for part in parts {
                std::fs::remove_file(part).ok();
            }
        }
    }

    // 2. Drains.
    let mut results = Vec::new();
    for &batch_size in if std::env::var("LATENCY_ONLY").is_ok() || large_only {
        &[][..]
    } else {
        &s.batch_sizes[..]
    } {
        // One COPY run: its rows and dirty pages are gone before the next run starts.
        let copied = async || {
            sql(&db, "CHECKPOINT").await;
            let rate = copy(&db_url);
            assert_eq!(
                scalar(&db, "SELECT count(*) FROM events_copy").await as usize,
                events.len()
            );
            sql(&db, "TRUNCATE events_copy").await;
            sql(&db, "CHECKPOINT").await;
            rate
        };
        for &replicas in &s.replicas {
            // The machine's speed drifts (other tenants): each drain is set beside the mean of
            // a COPY run just before it and one just after.
            let (copy_before, copy_cpu_before) = copied().await;
            println!("drain: {replicas} worker(s), BATCH_SIZE={batch_size}");
            let run = Run {
                replicas,
                batch_size,
                history: 0,
                reenrich: true,
            };
            let d = drain(&s, &db, &db_url, &mut redis, &events, run).await;
            let (copy_after, copy_cpu_after) = copied().await;
            let rate = events.len() as f64 / d.secs;
            let ratio = rate / ((copy_before + copy_after) / 2.0);
            println!(
                "  {:.2}s = {rate:.0} events/s = {:.2}x COPY ({copy_before:.0} rows/s before, {copy_after:.0} after); peak RSS per worker {:.1} MiB; exits {:?}",
                d.secs, ratio, d.peak_rss_mib, d.exits
            );
            // Machine-wide CPU per event (worker, Postgres, Redis and this program): steadier
            // than the rate for comparing builds when other tenants slow the machine down.
            let cpu_us = d.cpu.busy * 1e6 / events.len() as f64;
            let worker_us = d.worker_cpu * 1e6 / events.len() as f64;
            // Rows per CPU-second against COPY's: steadier than the rate when other tenants
            // slow the machine down, and it counts that COPY does not keep both cores busy.
            let cpu_ratio = (copy_cpu_before + copy_cpu_after) / 2.0 / cpu_us;
            println!(
                "  machine CPU {:.1} s busy = {cpu_us:.0} µs/event, of which the worker(s) {worker_us:.0} µs/event; {:.1} s stolen; per CPU-second {cpu_ratio:.2}x COPY ({copy_cpu_before:.0} µs/row before, {copy_cpu_after:.0} after)",
                d.cpu.busy, d.cpu.stolen
            );
            results.push((
                replicas,
                batch_size,
                d.secs,
                rate,
                ratio,
                (copy_before, copy_after),
                d.peak_rss_mib,
                cpu_us,
                worker_us,
                cpu_ratio,
            ));
        }
    }

    // 5. Beside a re-enrichment pass over older events (run here: the same warm tables).
    let history: usize = env_or("REENRICH_HISTORY", 0);
    let mut beside = Vec::new();
    if history > 0 && !large_only {
        let batch_size = *s.batch_sizes.last().unwrap_or(&500);
        for &replicas in &s.replicas {
            println!(
                "drain beside {history} older events: {replicas} worker(s), BATCH_SIZE={batch_size}"
            );
            let mut rates = Vec::new();
            for reenrich in [false, true] {
                let run = Run {
                    replicas,
                    batch_size,
                    history,
                    reenrich,
                };
                let d = drain(&s, &db, &db_url, &mut redis, &events, run).await;
                let rate = events.len() as f64 / d.secs;
                let cpu_us = d.cpu.busy * 1e6 / events.len() as f64;
                println!(
                    "  REENRICH_ON_RELOAD={reenrich}: {:.2}s = {rate:.0} events/s; machine CPU {cpu_us:.0} µs/event; older events described meanwhile {}",
                    d.secs, d.reenriched
                );
                rates.push((rate, d.reenriched, cpu_us));
            }
            let ratio = rates[1].0 / rates[0].0;
            println!("  drain rate with the pass / without: {ratio:.3}");
            beside.push((replicas, batch_size, rates[0], rates[1], ratio));
        }
    }

    // 3. Latency at RATE events/s with the default BATCH_SIZE and FLUSH_INTERVAL.
    let lat = if large_only {
        Vec::new()
    } else {
        println!(
            "latency: {} events/s for {}s, one worker, defaults",
            s.rate, s.latency_secs
        );
        let (lat, rss, total) = latency(&s, &db, &db_url, &mut redis).await;
        println!(
            "  ingest->queryable over {} of {total} events: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (poll period 2 ms); peak RSS {rss:.1} MiB",
            lat.len(),
            pct(&lat, 0.5),
            pct(&lat, 0.9),
            pct(&lat, 0.99),
            lat.last().copied().unwrap_or(f64::NAN),
        );
        lat
    };

    // 4. Large events, one worker.
    let large = if s.large_events > 0 {
        println!(
            "large events: {} of {} bytes, one worker, READ_AHEAD_BYTES {:.0} MiB",
            s.large_events,
            s.large_event_bytes,
            read_ahead_mib()
        );
        let l = large(&s, &db, &db_url, &mut redis).await;
        println!(
            "  {:.2}s = {:.1} events/s = {:.1} MiB/s; peak RSS {:.1} MiB",
            l.secs,
            s.large_events as f64 / l.secs,
            l.bytes as f64 / (1 << 20) as f64 / l.secs,
            l.peak_rss_mib,
        );
        Some(l)
    } else {
        None
    };

    println!("\nsummary");
    for (replicas, batch, secs, rate, ratio, (before, after), rss, cpu_us, worker_us, cpu_ratio) in
        &results
    {
        println!(
            "  {replicas} worker(s) BATCH_SIZE={batch:<4} {rate:>9.0} events/s  {ratio:.2}x COPY ({before:.0} rows/s before, {after:.0} after)  {secs:.1}s  peak RSS {rss:.1} MiB  CPU {cpu_us:.0} µs/event (worker {worker_us:.0}; {cpu_ratio:.2}x COPY per CPU-second)"
        );
    }
    // 6b. The fleet beside the ceiling with as many writers, at the largest batch size.
    if let Some(&batch) = s.batch_sizes.iter().max()
        && !ceilings.is_empty()
    {
        println!(
            "\nfleet (BATCH_SIZE={batch}, STREAM_SHARDS={})",
            s.stream_shards
        );
        for (sessions, rate) in &ceilings {
            println!("  ceiling: \\copy, {sessions} session(s) {rate:>9.0} rows/s");
        }
        let mut previous: Option<(usize, f64)> = None;
        for r in results.iter().filter(|r| r.1 == batch) {
            let (replicas, rate, rss) = (r.0, r.3, r.6);
            let ceiling = ceilings.get(&replicas).copied().unwrap_or(f64::NAN);
            let scale = previous
                .map(|(n, prev)| format!("{:.2}x from {n}", rate / prev))
                .unwrap_or_default();
            println!(
                "  {replicas} replica(s) {rate:>9.0} events/s  {:.2}x the {replicas}-session ceiling  {scale}  peak RSS per replica {rss:.1} MiB",
                rate / ceiling
            );
            previous = Some((replicas, rate));
        }
    }
    for (replicas, batch, off, on, ratio) in &beside {
        println!(
            "  beside {history} older events, {replicas} worker(s) BATCH_SIZE={batch}: {:.0} events/s without the pass, {:.0} with it ({ratio:.3}x; {} older events described meanwhile; CPU {:.0} vs {:.0} µs/event)",
            off.0, on.0, on.1, off.2, on.2
        );
    }
    if !large_only {
        println!(
            "  latency p50 {:.1} ms  p99 {:.1} ms  (target p99 < 100 ms)",
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
    }
    if let Some(l) = &large {
        println!(
            "  large events: {} × {} bytes, 1 worker  {:.1} events/s  peak RSS {:.1} MiB  beside READ_AHEAD_BYTES {:.0} MiB (a build without it holds up to 2 × WRITE_CONCURRENCY × BATCH_SIZE entries)",
            s.large_events,
            s.large_event_bytes,
            s.large_events as f64 / l.secs,
            l.peak_rss_mib,
            read_ahead_mib()
        );
    }

    std::fs::remove_file(&csv_path).ok();
    db.close().await.ok();
    sql(
        &admin,
        &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
    )
    .await;
}
