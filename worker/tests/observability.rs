//! What operators and rule authors see of a running worker: Prometheus metrics, readiness per
//! dependency, and the shared unmatched-events report (real Redis and Postgres).

mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use infra::unmatched::UnmatchedReport;
use serde_json::{Value, json};

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn metrics(addr: SocketAddr) -> Scrape {
    scrape(&format!("http://{addr}/metrics")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_readiness_and_unmatched_report_follow_the_pipeline() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let proxy = Proxy::postgres(true).await;
    let rules = tempfile::tempdir().unwrap();
    for file in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../rules")).unwrap() {
        let path = file.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, rules.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let addr = closed_addr();
    let mut cfg = config(&proxy.url(&db.url), &keys, "w");
    cfg.metrics_bind = Some(addr);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let enricher = rules_engine::enrich::load(rules.path(), &shutdown).unwrap();
    let worker = RunningWorker::start_with(cfg, enricher);

    wait_until(WAIT, "worker ready", || async {
        reqwest::get(format!("http://{addr}/ready"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let (_, ready) = get(addr, "/ready").await;
    let ready: Value = serde_json::from_str(&ready).unwrap();
    let names: Vec<&str> = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["redis", "postgres", "rules"], "{ready}");
    assert_eq!(get(addr, "/health").await.0, 200);

    // the Redis settings checked at start, as the real Redis has them
    let settings = infra::redis_settings::read_settings(&mut redis.clone())
        .await
        .unwrap();
    let hazards = infra::redis_settings::hazards(&settings, false);
    wait_until(WAIT, "Redis settings reported", || async {
        metrics(addr)
            .await
            .contains("clickstream_redis_config_unsafe{setting=\"persistence\"}")
    })
    .await;
    let before = metrics(addr).await;
    assert_eq!(
        before.value("clickstream_redis_config_unsafe{setting=\"maxmemory-policy\"}"),
        f64::from(u8::from(
            hazards.contains(&infra::redis_settings::Hazard::Eviction)
        )),
        "{settings:?}"
    );
    assert_eq!(before.value("clickstream_worker_events_stored_total"), 0.0);
    assert!(
        before.contains("clickstream_rules_version_info{version="),
        "{before}"
    );

    let settings = json!({"$current_url": "https://app.example.com/settings/team", "$pathname": "/settings/team"});
    publish(
        &redis,
        &keys.stream,
        &[
            envelope("u1", "$pageview", json!({"$pathname": "/pricing"})),
            envelope("u1", "team_invite_sent", settings.clone()),
            envelope("u2", "team_invite_sent", settings.clone()),
        ],
    )
    .await;
    wait_until(WAIT, "events stored", || async { db.events().await == 3 }).await;

    let after = metrics(addr).await;
    assert_eq!(
        after.value("clickstream_worker_events_stored_total"),
        3.0,
        "{after}"
    );
    assert_eq!(
        after.value("clickstream_rules_unmatched_total"),
        2.0,
        "{after}"
    );
    assert!(
        after.contains("clickstream_rules_matched_total{rule="),
        "{after}"
    );
    assert!(
        after.value("clickstream_worker_batch_size_count") >= 1.0,
        "{after}"
    );
    assert!(
        after.value("clickstream_worker_db_write_seconds_count") >= 1.0,
        "{after}"
    );
    // one application prefix on every series, and the process collector's process_*
    after.assert_prefixed();
    assert_eq!(
        after.value("clickstream_stream_length"),
        0.0,
        "acked entries are deleted: {after}"
    );
    assert_eq!(
        after.value(&format!(
            "clickstream_consumer_group_pending{{group=\"{}\"}}",
            keys.group
        )),
        0.0,
        "{after}"
    );
    assert_eq!(after.value("clickstream_dlq_length"), 0.0);

    // Every replica adds to the shared report; it lists the event no rule covers, with an example.
    let report = UnmatchedReport::new(redis.clone(), &keys.stream);
    wait_until(WAIT, "unmatched shape reported", || async {
        report
            .top(10)
            .await
            .unwrap()
            .0
            .iter()
            .any(|s| s.event == "team_invite_sent" && s.count == 2)
    })
    .await;
    let (shapes, total) = report.top(10).await.unwrap();
    assert_eq!(total, 1, "{shapes:?}");
    assert_eq!(shapes[0].path.as_deref(), Some("/settings/team"));
    assert_eq!(
        shapes[0].example.as_ref().unwrap()["event"],
        "team_invite_sent"
    );

    // A rule author adds a translation: the worker reloads and the shape leaves the report.
    std::fs::write(
        rules.path().join("team.yaml"),
        "rules:\n  - id: team-invite\n    when:\n      event: team_invite_sent\n    say: \"Invited a teammate\"\n",
    )
    .unwrap();
    wait_until(WAIT, "covered shape dropped from the report", || async {
        report.top(10).await.unwrap().1 == 0
    })
    .await;
    let reloaded = metrics(addr).await;
    assert!(
        reloaded.value("clickstream_rules_reloads_total{result=\"ok\"}") >= 1.0,
        "{reloaded}"
    );

    // Postgres goes away: readiness names it; it comes back: ready again.
    proxy.set_up(false);
    wait_until(WAIT, "not ready while Postgres is down", || async {
        let (status, body) = get(addr, "/ready").await;
        let body: Value = serde_json::from_str(&body).unwrap();
        status == 503
            && body["status"] == "not_ready"
            && body["checks"][1]["name"] == "postgres"
            && body["checks"][1]["ok"] == false
            && body["checks"][0]["ok"] == true
    })
    .await;
    proxy.set_up(true);
    wait_until(WAIT, "ready again", || async {
        get(addr, "/ready").await.0 == 200
    })
    .await;

    // Shutdown begins while a batch waits for Postgres: readiness says so at once, and the batch
    // is still stored within the grace period.
    proxy.set_up(false);
    publish(
        &redis,
        &keys.stream,
        &[envelope(
            "u3",
            "$pageview",
            json!({"$pathname": "/pricing"}),
        )],
    )
    .await;
    wait_until(WAIT, "entry held while Postgres is down", || async {
        pending(&redis, &keys).await == 1
    })
    .await;
    worker.shutdown.cancel();
    wait_until(WAIT, "not ready once shutdown begins", || async {
        let (status, body) = get(addr, "/ready").await;
        status == 503 && body.contains("\"shutting_down\"")
    })
    .await;
    proxy.set_up(true);
    tokio::time::timeout(Duration::from_secs(15), worker.task)
        .await
        .expect("worker stops in time")
        .unwrap()
        .unwrap();
    assert_eq!(db.events().await, 4);
    shutdown.cancel();
}

#[tokio::test]
async fn a_taken_metrics_port_stops_the_worker_with_the_variable_named() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(&db.url, &keys, "w");
    cfg.metrics_bind = Some(taken.local_addr().unwrap());
    let worker = RunningWorker::start(cfg);
    let result = tokio::time::timeout(Duration::from_secs(10), worker.task)
        .await
        .expect("worker stops at once")
        .unwrap();
    let error = result.unwrap_err().to_string();
    assert!(error.contains("WORKER_METRICS_BIND"), "{error}");

    // Left at its default, a taken port is not fatal: a second replica on the host still runs.
    let mut cfg = config(&db.url, &keys, "w2");
    cfg.metrics_bind = Some(taken.local_addr().unwrap());
    cfg.metrics_bind_is_default = true;
    let worker = RunningWorker::start(cfg);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!worker.task.is_finished(), "worker keeps running");
    worker.stop().await.unwrap();
}

/// Rules describing only `signup` (every other event is unmatched), loaded from a folder that
/// lives as long as the returned guard.
fn signup_rules() -> (tempfile::TempDir, rules_engine::RulesHandle) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.yaml"),
        "rules:\n  - id: signup\n    when:\n      event: signup\n    say: \"Signed up\"\n",
    )
    .unwrap();
    let rules = rules_engine::RulesHandle::load_dir(dir.path()).unwrap();
    (dir, rules)
}

/// Unmatched counts taken while Redis is away are kept and reach the report once it is back,
/// each counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_counts_survive_a_redis_outage() {
    use worker::{metrics::WorkerMetrics, unmatched};
    let (_rules_dir, rules) = signup_rules();
    let proxy = Proxy::redis(true).await;
    // Connected as a worker connects (few, short reconnect attempts), so a flush fails while
    // Redis is away instead of waiting for it.
    let via_proxy = infra::redis::connection(
        infra::redis::client(&proxy.url(&redis_url())).unwrap(),
        infra::redis::COMMAND_TIMEOUT,
    )
    .unwrap();
    let keys = Keys::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let report_loop = tokio::spawn(unmatched::report_loop(
        rules.clone(),
        UnmatchedReport::new(via_proxy, &keys.stream),
        std::sync::Arc::new(WorkerMetrics::new()),
        shutdown.clone(),
    ));
    let _stop = StopOnDrop::new(&shutdown, &report_loop);
    let unmatched = |n: usize| {
        let event = json!({"event": "team_invite_sent", "distinct_id": "u1", "properties": {"$pathname": "/team"}});
        let event = event.as_object().unwrap();
        for _ in 0..n {
            let input = rules_engine::EventInput::from_json(event).unwrap();
            assert!(!rules.current().enrich(&input).matched);
        }
    };

    proxy.set_up(false);
    unmatched(3);
    let report = UnmatchedReport::new(redis().await, &keys.stream);
    let kept = || {
        rules
            .unmatched()
            .snapshot()
            .iter()
            .map(|s| s.count)
            .sum::<u64>()
    };
    // A flush takes the counts and fails: they are back in memory, not in the report.
    tokio::time::sleep(infra::unmatched::FLUSH_INTERVAL * 2).await;
    wait_until(WAIT, "the failed flush's counts kept", || async {
        kept() == 3
    })
    .await;
    assert_eq!(report.top(10).await.unwrap().1, 0);
    unmatched(2);
    proxy.set_up(true);

    wait_until(WAIT, "the counts of the outage reported", || async {
        report
            .top(10)
            .await
            .unwrap()
            .0
            .iter()
            .map(|s| s.count)
            .sum::<u64>()
            == 5
    })
    .await;
    // Nothing is added twice later.
    tokio::time::sleep(infra::unmatched::FLUSH_INTERVAL * 2).await;
    let (shapes, total) = report.top(10).await.unwrap();
    assert_eq!(total, 1, "{shapes:?}");
    assert_eq!(shapes[0].count, 5);
    shutdown.cancel();
    report_loop.await.unwrap();
    report.clear().await.unwrap();
}

/// Unmatched events beyond the shapes a replica holds between flushes are not lost silently: they
/// are counted in `clickstream_rules_unmatched_unreported_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_events_beyond_the_held_shapes_are_counted() {
    use rules_engine::{EventInput, MAX_UNMATCHED_SHAPES};
    use worker::{metrics::WorkerMetrics, unmatched};
    let (_rules_dir, rules) = signup_rules();
    for i in 0..MAX_UNMATCHED_SHAPES + 3 {
        let event = json!({"event": format!("custom_{i}"), "distinct_id": "u1", "properties": {}});
        let input = EventInput::from_json(event.as_object().unwrap()).unwrap();
        assert!(!rules.current().enrich(&input).matched);
    }
    let keys = Keys::new();
    let metrics = std::sync::Arc::new(WorkerMetrics::new());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let report = UnmatchedReport::new(redis().await, &keys.stream);
    let report_loop = tokio::spawn(unmatched::report_loop(
        rules.clone(),
        report.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let _stop = StopOnDrop::new(&shutdown, &report_loop);
    wait_until(WAIT, "the held shapes reported", || async {
        report.top(1).await.unwrap().1 > 0
    })
    .await;
    shutdown.cancel();
    report_loop.await.unwrap();
    assert_eq!(metrics.rules_unmatched_unreported.get(), 3);
    assert!(rules.unmatched().snapshot().is_empty());
    report.clear().await.unwrap();
}
