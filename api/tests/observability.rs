//! `/metrics`, `/ready` per dependency and `GET /rules/unmatched`, against the real api and Redis.

mod common;

use common::*;
use serde_json::{Value, json};

/// The value of one sample line of `/metrics` (`name{labels} value`), 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(app: &TestApp) -> String {
    let resp = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    resp.text().await.unwrap()
}

#[tokio::test]
async fn metrics_move_when_events_flow() {
    let app = TestApp::spawn().await;
    let before = metrics(&app).await;
    assert_eq!(
        sample(&before, "events_accepted_total{source=\"capture\"}"),
        0.0
    );

    let batch = json!({"api_key": INGEST_KEY, "batch": [
        {"event": "$pageview", "distinct_id": "u1"},
        {"event": "$pageview", "distinct_id": "u2"},
        {"event": "signup", "distinct_id": "u3"}]});
    let resp = app
        .http
        .post(app.url("/batch/"))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app
        .http
        .post(app.url("/ingest"))
        .header("X-API-Key", SECRET)
        .json(&json!({"event": "webhook", "distinct_id": "u4"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app
        .http
        .post(app.url("/capture"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let after = metrics(&app).await;
    assert_eq!(
        sample(&after, "events_accepted_total{source=\"capture\"}"),
        3.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "events_accepted_total{source=\"ingest\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "ingest_rejected_total{reason=\"invalid_json\",source=\"capture\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "http_requests_total{method=\"POST\",route=\"/batch\",status=\"200\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "http_requests_total{method=\"POST\",route=\"/capture\",status=\"400\"}"
        ),
        1.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            "http_request_duration_seconds_count{method=\"POST\",route=\"/batch\"}"
        ) >= 1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "xadd_duration_seconds_count"),
        2.0,
        "{after}"
    );
    assert_eq!(sample(&after, "stream_length"), 4.0, "{after}");
    assert_eq!(sample(&after, "dlq_length"), 0.0, "{after}");
}

#[tokio::test]
async fn redis_settings_are_checked_at_start() {
    let app = TestApp::spawn().await;
    let client = redis::Client::open(app.config.redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let settings = infra::redis_settings::read_settings(&mut conn)
        .await
        .unwrap();
    let expected = infra::redis_settings::hazards(&settings, false);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = metrics(&app).await;
        if text.contains("redis_config_unsafe{setting=\"persistence\"}") {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for hazard in [
        infra::redis_settings::Hazard::Eviction,
        infra::redis_settings::Hazard::NoPersistence,
    ] {
        let series = format!("redis_config_unsafe{{setting=\"{}\"}}", hazard.setting());
        assert_eq!(
            sample(&text, &series),
            f64::from(u8::from(expected.contains(&hazard))),
            "{settings:?} {text}"
        );
    }
}

#[tokio::test]
async fn readiness_names_the_dependency_that_is_down() {
    let closed_port = || {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        closed.local_addr().unwrap().port()
    };
    // credentials in both URLs: the answer must carry neither them nor the URLs
    let mut config = test_config();
    config.redis_url = format!("redis://:hunter2@127.0.0.1:{}", closed_port());
    let redis_down = TestApp::spawn_with(config).await;
    let mut config = test_config();
    config.database_url = format!("postgres://postgres:hunter2@127.0.0.1:{}/x", closed_port());
    let postgres_down = TestApp::spawn_with(config).await;

    for (app, down, error) in [
        (&redis_down, 0, "redis: connection refused"),
        (&postgres_down, 1, "postgres: connection refused"),
    ] {
        let resp = app.http.get(app.url("/ready")).send().await.unwrap();
        assert_eq!(resp.status(), 503);
        let text = resp.text().await.unwrap();
        assert!(!text.contains("://") && !text.contains("hunter2"), "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["status"], "not_ready");
        assert_eq!(body["checks"][0]["name"], "redis");
        assert_eq!(body["checks"][1]["name"], "postgres");
        let (down, up) = (&body["checks"][down], &body["checks"][1 - down]);
        assert_eq!(down["ok"], false);
        assert_eq!(down["error"], error, "{body}");
        assert_eq!(up["ok"], true);
        assert!(up.get("error").is_none(), "{body}");
    }
}

#[tokio::test]
async fn unmatched_report_is_served_to_the_secret_key_only() {
    let app = TestApp::spawn().await;
    let url = app.url("/rules/unmatched");
    let resp = app.http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = app
        .http
        .get(&url)
        .header("X-API-Key", INGEST_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = app
        .http
        .get(format!("{url}?limit=0"))
        .header("X-API-Key", SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["attr"], "limit");

    let empty: Value = app
        .http
        .get(&url)
        .header("X-API-Key", SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(empty, json!({"total_shapes": 0, "shapes": []}));

    // What the workers write (see worker/tests/observability.rs for the whole loop).
    let client = redis::Client::open(app.config.redis_url.as_str()).unwrap();
    let report = infra::unmatched::UnmatchedReport::new(
        client.get_connection_manager().await.unwrap(),
        &app.config.queue_name,
    );
    let shape = |event: &str, count| rules_engine::UnmatchedShape {
        event: event.into(),
        path: Some("/settings".into()),
        element_text: None,
        element_classes: None,
        count,
        example: Some(
            json!({"event": event, "distinct_id": "u1", "properties": {"$pathname": "/settings"}}),
        ),
    };
    report
        .add(&[shape("rare", 1), shape("frequent", 5)])
        .await
        .unwrap();
    report.add(&[shape("frequent", 2)]).await.unwrap();
    let body: Value = app
        .http
        .get(format!("{url}?limit=1"))
        .header("X-API-Key", SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["total_shapes"], 2);
    assert_eq!(body["shapes"].as_array().unwrap().len(), 1);
    assert_eq!(body["shapes"][0]["event"], "frequent");
    assert_eq!(body["shapes"][0]["count"], 7);
    assert_eq!(body["shapes"][0]["path"], "/settings");
    assert_eq!(body["shapes"][0]["example"]["event"], "frequent");
}
