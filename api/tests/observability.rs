//! `/metrics`, `/ready` per dependency and `GET /rules/unmatched`, against the real api and Redis.

mod common;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn metrics_move_when_events_flow() {
    let app = TestApp::spawn().await;
    let before = app.metrics().await;
    // a labelled series appears once something is counted under its labels
    before.assert_absent("clickstream_events_accepted_total{source=\"capture\"}");

    let batch = json!({"api_key": INGEST_KEY, "batch": [
        {"event": "$pageview", "distinct_id": "u1"},
        {"event": "$pageview", "distinct_id": "u2"},
        {"event": "signup", "distinct_id": "u3"}]});
    let resp = app.post("/batch/").json(&batch).answer().await;
    assert_eq!(resp.status(), 200);
    let resp = app
        .post("/ingest")
        .key(SECRET)
        .json(&json!({"event": "webhook", "distinct_id": "u4"}))
        .answer()
        .await;
    assert_eq!(resp.status(), 200);
    let resp = app.post("/capture").body("{not json").answer().await;
    assert_eq!(resp.status(), 400);

    let after = app.metrics().await;
    assert_eq!(
        after.value("clickstream_events_accepted_total{source=\"capture\"}"),
        3.0,
        "{after}"
    );
    assert_eq!(
        after.value("clickstream_events_accepted_total{source=\"ingest\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        after
            .value("clickstream_ingest_rejected_total{reason=\"invalid_json\",source=\"capture\"}"),
        1.0,
        "{after}"
    );
    assert_eq!(
        after.value(
            "clickstream_http_requests_total{method=\"POST\",route=\"/batch\",status=\"200\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        after.value(
            "clickstream_http_requests_total{method=\"POST\",route=\"/capture\",status=\"400\"}"
        ),
        1.0,
        "{after}"
    );
    assert!(
        after.value(
            "clickstream_http_request_duration_seconds_count{method=\"POST\",route=\"/batch\"}"
        ) >= 1.0,
        "{after}"
    );
    assert_eq!(
        after.value("clickstream_xadd_duration_seconds_count"),
        2.0,
        "{after}"
    );
    assert_eq!(after.value("clickstream_stream_length"), 4.0, "{after}");
    assert_eq!(after.value("clickstream_dlq_length"), 0.0, "{after}");
    // one application prefix on every series, and the process collector's process_*
    after.assert_prefixed();
}

#[tokio::test]
async fn redis_settings_are_checked_at_start() {
    let app = TestApp::spawn().await;
    let settings = infra::redis_settings::read_settings(&mut redis().await)
        .await
        .unwrap();
    let expected = infra::redis_settings::hazards(&settings, false);
    wait_until(WAIT, "the Redis settings reported", || async {
        app.metrics()
            .await
            .contains("clickstream_redis_config_unsafe{setting=\"persistence\"}")
    })
    .await;
    let text = app.metrics().await;
    for hazard in [
        infra::redis_settings::Hazard::Eviction,
        infra::redis_settings::Hazard::NoPersistence,
    ] {
        let series = format!(
            "clickstream_redis_config_unsafe{{setting=\"{}\"}}",
            hazard.setting()
        );
        assert_eq!(
            text.value(&series),
            f64::from(u8::from(expected.contains(&hazard))),
            "{settings:?} {text}"
        );
    }
}

#[tokio::test]
async fn readiness_names_the_dependency_that_is_down() {
    // credentials in both URLs: the answer must carry neither them nor the URLs
    let mut config = test_config();
    config.redis_url = format!("redis://:hunter2@{}", closed_addr());
    let redis_down = TestApp::spawn_with(config).await;
    let mut config = test_config();
    config.database_url = format!("postgres://postgres:hunter2@{}/x", closed_addr());
    let postgres_down = TestApp::spawn_with(config).await;

    // Redis down fails readiness; Postgres down does not (ingest needs only Redis)
    for (app, down, error, status, readiness) in [
        (
            &redis_down,
            0,
            "redis: connection refused",
            503,
            "not_ready",
        ),
        (
            &postgres_down,
            1,
            "postgres: connection refused",
            200,
            "ready",
        ),
    ] {
        let resp = app.get("/ready").answer().await;
        assert_eq!(resp.status(), status);
        let text = resp.text().await.unwrap();
        assert!(!text.contains("://") && !text.contains("hunter2"), "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["status"], readiness);
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
    let url = "/rules/unmatched";
    let report = |query: &str, key: Option<&str>| {
        let request = app.get(&format!("{url}{query}"));
        match key {
            Some(key) => request.key(key),
            None => request,
        }
        .answer()
    };
    assert_eq!(report("", None).await.status(), 401);
    assert_eq!(report("", Some(INGEST_KEY)).await.status(), 403);
    let resp = report("?limit=0", Some(SECRET)).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<Value>().await.unwrap()["attr"], "limit");
    let empty: Value = report("", Some(SECRET)).await.json().await.unwrap();
    assert_eq!(empty, json!({"total_shapes": 0, "shapes": []}));

    // What the workers write (see worker/tests/observability.rs for the whole loop).
    let unmatched = infra::unmatched::UnmatchedReport::new(redis().await, &app.keys.stream);
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
    unmatched
        .add(&[shape("rare", 1), shape("frequent", 5)])
        .await
        .unwrap();
    unmatched.add(&[shape("frequent", 2)]).await.unwrap();
    let body: Value = report("?limit=1", Some(SECRET)).await.json().await.unwrap();
    assert_eq!(body["total_shapes"], 2);
    assert_eq!(body["shapes"].as_array().unwrap().len(), 1);
    assert_eq!(body["shapes"][0]["event"], "frequent");
    assert_eq!(body["shapes"][0]["count"], 7);
    assert_eq!(body["shapes"][0]["path"], "/settings");
    assert_eq!(body["shapes"][0]["example"]["event"], "frequent");
}
