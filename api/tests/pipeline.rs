//! The whole pipeline, end to end: PostHog events into the api, a worker (with the shipped
//! rules) storing them in Postgres, and the user's context read back — real Redis and Postgres.

mod common;

use common::{INGEST_KEY, RequestExt, SECRET, TestApp, WAIT, test_config, wait_until};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// posthog-js shaped events of the prototype's journey: home, pricing three times, the upgrade button.
fn journey(user: &str) -> Value {
    let page = |path: &str| {
        json!({"event": "$pageview", "distinct_id": user, "properties": {
            "$current_url": format!("https://shop.example.com{path}"), "$pathname": path, "$session_id": "s-1", "$lib": "web"}})
    };
    json!({"api_key": INGEST_KEY, "batch": [
        page("/"), page("/pricing"), page("/pricing"), page("/pricing"),
        {"event": "$autocapture", "distinct_id": user, "properties": {
            "$event_type": "click", "$current_url": "https://shop.example.com/pricing", "$pathname": "/pricing",
            "$session_id": "s-1", "$el_text": "Upgrade Plan",
            "$elements_chain": "button.btn.btn-primary:text=\"Upgrade Plan\"attr__class=\"btn btn-primary\"nth-child=\"1\";div.pricing:nth-child=\"2\""}}
    ]})
}

#[tokio::test]
async fn events_flow_from_capture_to_context() {
    let (app, db) = TestApp::spawn_with_db(test_config()).await;
    let worker = app.start_worker(&db, "e2e");

    let resp = app.post("/batch/").json(&journey("user_1")).answer().await;
    assert_eq!(resp.status(), StatusCode::OK);

    wait_until(WAIT, "all five events stored and counted", || async {
        let (status, body) = app.context("user_1").await;
        status == StatusCode::OK
            && body["stats"]["event_count"] == 5
            && body["freshness"]["pending_events"] == 0
    })
    .await;
    let (_, context) = app.context("user_1").await;

    let history: Vec<&str> = context["recent_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["description"].as_str().unwrap())
        .collect();
    assert_eq!(history[0], "Clicked 'Upgrade Plan' Button", "{context}");
    assert_eq!(
        history
            .iter()
            .filter(|d| **d == "Viewed page: /pricing")
            .count(),
        3,
        "{context}"
    );
    assert_eq!(context["intents"][0]["name"], "purchase", "{context}");
    let summary = context["summary"].as_str().unwrap();
    assert!(
        summary.starts_with("User showing Purchase Intent."),
        "{summary}"
    );
    assert!(
        summary.contains("Viewed page: /pricing (3 times)"),
        "{summary}"
    );
    assert_eq!(context["stats"]["session_count"], 1);

    // The prompt text form of the same context.
    let text = app.context_text("user_1").await;
    assert!(
        text.contains("Summary: User showing Purchase Intent."),
        "{text}"
    );
    assert!(
        text.contains("- just now: \"Clicked 'Upgrade Plan' Button\" on \"/pricing\""),
        "{text}"
    );

    worker.stop().await;
}

/// The author's file of B2B SaaS translations (`ignore: true` for flag checks that came back off).
const SAAS: &str = include_str!("../../worker/tests/fixtures/authoring/saas.yaml");

#[tokio::test]
async fn ignored_events_are_stored_but_stay_out_of_the_context_and_the_unmatched_report() {
    let (app, db) = TestApp::spawn_with_db(test_config()).await;
    let rules = testkit::rules_dir_with(&[("saas.yaml", SAAS)]);
    let _worker = app.start_worker_with_rules(&db, "ignore", rules.path());
    let user = "flag_user";
    let flag = |response: bool| {
        json!({"event": "$feature_flag_called", "distinct_id": user, "properties": {
            "$feature_flag": "beta-banner", "$feature_flag_response": response,
            "$session_id": if response { "s-on" } else { "s-off" }}})
    };
    let batch = json!({"api_key": INGEST_KEY, "batch": [
        {"event": "$pageview", "distinct_id": user, "properties": {"$pathname": "/pricing", "$session_id": "s-1"}},
        flag(false), flag(false), flag(true),
        // No rule describes it: it marks that the unmatched report has been written.
        {"event": "team_invite_removed", "distinct_id": user, "properties": {"$session_id": "s-1"}},
    ]});
    let resp = app.post("/batch/").json(&batch).answer().await;
    assert_eq!(resp.status(), StatusCode::OK);

    let stored = format!("SELECT count(*) FROM events WHERE distinct_id = '{user}'");
    wait_until(WAIT, "all five events stored", || async {
        db.count(&stored).await == 5
    })
    .await;
    // Stored with no sentence, by the author's rule.
    let ignored = db
        .column(&format!(
            "SELECT rule_id FROM events WHERE distinct_id = '{user}' AND description IS NULL"
        ))
        .await;
    assert_eq!(ignored, ["flags-off", "flags-off"]);

    let (status, context) = app.context(user).await;
    assert_eq!(status, StatusCode::OK, "{context}");
    let history: Vec<&str> = context["recent_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["description"].as_str().unwrap())
        .collect();
    assert_eq!(history.len(), 3, "{context}");
    assert!(
        history.contains(&"Was shown feature flag 'beta-banner' (true)"),
        "{context}"
    );
    assert!(!history.iter().any(|h| h.contains("(false)")), "{context}");
    assert_eq!(context["stats"]["event_count"], 3, "{context}");
    assert_eq!(
        context["stats"]["session_count"], 2,
        "s-1 and s-on; the ignored events' s-off is not counted: {context}"
    );

    let unmatched = || async {
        let report: Value = app
            .get("/rules/unmatched?limit=1000")
            .key(SECRET)
            .answer_json()
            .await;
        report["shapes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["event"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    wait_until(WAIT, "the unmatched report written", || async {
        unmatched()
            .await
            .contains(&"team_invite_removed".to_string())
    })
    .await;
    assert!(
        !unmatched()
            .await
            .contains(&"$feature_flag_called".to_string())
    );
}

#[tokio::test]
async fn a_rule_added_while_the_worker_runs_reaches_the_stored_history() {
    let (app, db) = TestApp::spawn_with_db(test_config()).await;
    // The shipped rules only: no translation of the invite, no churn intent yet.
    let rules = testkit::rules_dir_with(&[]);
    let _worker = app.start_worker_with_rules(&db, "history", rules.path());
    let user = "history_user";
    let batch = json!({"api_key": INGEST_KEY, "batch": [
        {"event": "team_invite_sent", "distinct_id": user, "properties": {"role": "admin"}},
        {"event": "$pageview", "distinct_id": user, "properties": {"$pathname": "/settings/cancel"}},
    ]});
    let resp = app.post("/batch/").json(&batch).answer().await;
    assert_eq!(resp.status(), StatusCode::OK);
    wait_until(WAIT, "both events in the context", || async {
        app.context(user).await.1["stats"]["event_count"] == 2
    })
    .await;
    let (_, before) = app.context(user).await;
    assert!(
        before.to_string().contains("Triggered 'team_invite_sent'"),
        "{before}"
    );

    // The author's file lands in the rules directory.
    std::fs::write(rules.path().join("saas.yaml"), SAAS).unwrap();
    wait_until(
        WAIT,
        "the stored events described by the new rules",
        || async {
            let (_, context) = app.context(user).await;
            let text = context.to_string();
            text.contains("Invited a admin to the team")
                && text.contains("Opened the cancellation page")
                && context["intents"]
                    .as_array()
                    .is_some_and(|i| i.iter().any(|i| i["name"] == "churn_risk"))
        },
    )
    .await;
    let (_, after) = app.context(user).await;
    assert!(
        !after.to_string().contains("Triggered 'team_invite_sent'"),
        "{after}"
    );
    assert_eq!(after["stats"]["event_count"], 2, "{after}");
}
