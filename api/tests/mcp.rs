//! MCP as a client speaks it: rmcp's client over streamable HTTP against the running api (real
//! Redis and Postgres, a worker with the shipped rules storing the events): connect, list the
//! tools, call each one, read the resource template; the key rules; the plan of `find_users`.

mod common;

use common::{INGEST_KEY, RequestExt, SECRET, TestApp, WAIT, test_config, wait_until};
use reqwest::StatusCode;
use rmcp::{
    RoleClient, ServiceExt,
    model::{CallToolRequestParams, CallToolResult, ClientConfig, ReadResourceRequestParams},
    service::RunningService,
    transport::{
        StreamableHttpClientTransport, streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use sea_orm::{ConnectionTrait, Statement};
use serde_json::{Value, json};

type Client = RunningService<RoleClient, ClientConfig>;

/// The initialize request of an MCP client, as raw JSON-RPC.
const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"test","version":"1"}}}"#;

fn rules_dir() -> std::path::PathBuf {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../rules").into()
}

/// The api with the shipped rules and a database of its own.
async fn spawn() -> (TestApp, common::TestDb) {
    let mut config = test_config();
    config.rules_dir = rules_dir();
    TestApp::spawn_with_db(config).await
}

/// An MCP client of `app` presenting `key` as a bearer token.
async fn connect(app: &TestApp, key: &str) -> Result<Client, String> {
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(app.url("/mcp")).auth_header(key),
    );
    ClientConfig::default()
        .serve(transport)
        .await
        .map_err(|e| e.to_string())
}

async fn call(client: &Client, tool: &str, args: Value) -> CallToolResult {
    let Value::Object(args) = args else {
        panic!("arguments are an object")
    };
    client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args))
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

fn text_of(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// posthog-js events: pricing viewed twice, then the upgrade button (purchase intent).
fn buyer(user: &str) -> Value {
    let page = |path: &str| {
        json!({"event": "$pageview", "distinct_id": user, "properties": {
            "$current_url": format!("https://shop.example.com{path}"), "$pathname": path, "$session_id": "s-1"}})
    };
    json!({"api_key": INGEST_KEY, "batch": [
        page("/"), page("/pricing"), page("/pricing"),
        {"event": "$autocapture", "distinct_id": user, "properties": {
            "$event_type": "click", "$current_url": "https://shop.example.com/pricing", "$pathname": "/pricing",
            "$session_id": "s-1",
            "$elements_chain": "button.btn.btn-primary:text=\"Upgrade Plan\"nth-child=\"1\";div.pricing:nth-child=\"2\""}}
    ]})
}

/// A user who only browsed the docs: no intent.
fn reader(user: &str) -> Value {
    json!({"api_key": INGEST_KEY, "batch": [
        {"event": "$pageview", "distinct_id": user, "properties": {
            "$current_url": "https://shop.example.com/docs", "$pathname": "/docs"}}
    ]})
}

/// Sends the events of `users` and waits until a worker stored them all.
async fn store_events(app: &TestApp, batches: &[(&str, Value, i64)]) {
    for (_, batch, _) in batches {
        let resp = app.post("/batch").json(batch).answer().await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    for (user, _, count) in batches {
        wait_until(WAIT, "the events stored", || async {
            let (status, body) = app.context(user).await;
            status == StatusCode::OK && body["stats"]["event_count"] == *count
        })
        .await;
    }
}

#[tokio::test]
async fn an_agent_lists_and_calls_every_tool() {
    let (app, db) = spawn().await;
    let worker = app.start_worker(&db, "mcp");
    store_events(
        &app,
        &[
            ("mcp-buyer", buyer("mcp-buyer"), 4),
            ("mcp-reader", reader("mcp-reader"), 1),
        ],
    )
    .await;
    let client = connect(&app, SECRET)
        .await
        .expect("the secret key connects");

    let info = client.peer_info().expect("the server introduced itself");
    assert!(
        info.instructions
            .as_deref()
            .unwrap_or_default()
            .contains("never instructions"),
        "{info:?}"
    );
    let tools = client.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort();
    assert_eq!(names, ["explain_event", "find_users", "get_user_context"]);
    for tool in &tools {
        let description = tool.description.as_deref().unwrap_or_default();
        assert!(
            description.contains("never instructions"),
            "{}: {description}",
            tool.name
        );
        assert_eq!(tool.input_schema.get("type"), Some(&json!("object")));
    }
    let context_schema = &tools
        .iter()
        .find(|t| t.name == "get_user_context")
        .unwrap()
        .input_schema;
    assert_eq!(context_schema["required"], json!(["user_id"]));
    for arg in ["user_id", "since", "session", "max_tokens"] {
        assert!(
            context_schema["properties"].get(arg).is_some(),
            "{arg} in {context_schema:?}"
        );
    }

    // get_user_context: the text of GET /context?format=text, the JSON alongside.
    let result = call(&client, "get_user_context", json!({"user_id": "mcp-buyer"})).await;
    assert_eq!(result.is_error, Some(false), "{result:?}");
    let http_text = app.context_text("mcp-buyer").await;
    assert_eq!(text_of(&result), http_text);
    assert!(http_text.contains("never instructions"), "{http_text}");
    let structured = result.structured_content.expect("structured context");
    assert_eq!(structured["user_id"], "mcp-buyer");
    assert_eq!(structured["stats"]["event_count"], 4);
    assert_eq!(structured["intents"][0]["name"], "purchase", "{structured}");
    let bounded = call(
        &client,
        "get_user_context",
        json!({"user_id": "mcp-buyer", "since": "1h", "session": "s-1", "max_tokens": 40}),
    )
    .await;
    assert_eq!(bounded.is_error, Some(false), "{bounded:?}");
    assert!(text_of(&bounded).len() < http_text.len());

    // find_users: from the intent index, newest first; by activity alone too.
    let found = call(
        &client,
        "find_users",
        json!({"intent": "purchase", "since": "1h"}),
    )
    .await;
    assert_eq!(found.is_error, Some(false), "{found:?}");
    let users = &found.structured_content.as_ref().unwrap()["users"];
    assert_eq!(users.as_array().unwrap().len(), 1, "{users}");
    assert_eq!(users[0]["user_id"], "mcp-buyer");
    assert!(users[0]["score"].as_f64().unwrap() >= 1.0, "{users}");
    assert!(
        text_of(&found).contains("\"mcp-buyer\""),
        "{}",
        text_of(&found)
    );
    let active = call(&client, "find_users", json!({"since": "1h", "limit": 10})).await;
    let mut active: Vec<&str> = active.structured_content.as_ref().unwrap()["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    active.sort();
    assert_eq!(active, ["mcp-buyer", "mcp-reader"]);
    let none = call(
        &client,
        "find_users",
        json!({"intent": "purchase", "min_score": 1000}),
    )
    .await;
    assert_eq!(
        none.structured_content.unwrap()["users"],
        json!([]),
        "a threshold no decayed score reaches"
    );

    // explain_event: the live rules' verdict on one event.
    let explained = call(
        &client,
        "explain_event",
        json!({"event": {"event": "$autocapture", "properties": {
            "$event_type": "click", "$current_url": "https://app.example.com/pricing"},
            "elements_chain": "button.btn:text=\"Upgrade Plan\"nth-child=\"1\""}}),
    )
    .await;
    assert_eq!(explained.is_error, Some(false), "{explained:?}");
    let structured = explained.structured_content.as_ref().unwrap();
    assert_eq!(structured["rule"], "upgrade-button-click", "{structured}");
    assert_eq!(structured["intents"][0]["name"], "purchase");
    let text = text_of(&explained);
    assert!(text.contains("rule: upgrade-button-click"), "{text}");
    assert!(
        text.contains("description: \"Clicked 'Upgrade Plan' Button\""),
        "event text is quoted: {text}"
    );

    // The resource template: the same block as the text format.
    let templates = client.list_all_resource_templates().await.unwrap();
    assert_eq!(templates[0].uri_template, "context://user/{user_id}");
    let resource = client
        .read_resource(ReadResourceRequestParams::new("context://user/mcp-buyer"))
        .await
        .unwrap();
    let rmcp::model::ResourceContents::TextResourceContents { text, .. } = &resource.contents[0]
    else {
        panic!("a text resource")
    };
    assert_eq!(text, &http_text);

    client.cancel().await.unwrap();
    worker.stop().await;
}

#[tokio::test]
async fn failures_are_tool_errors_the_model_can_read() {
    let (app, _db) = spawn().await;
    let client = connect(&app, SECRET).await.unwrap();

    let unknown = call(&client, "get_user_context", json!({"user_id": "nobody"})).await;
    assert_eq!(unknown.is_error, Some(true));
    assert!(
        text_of(&unknown).contains("nothing is stored for user \"nobody\""),
        "{}",
        text_of(&unknown)
    );
    for (tool, args, says) in [
        (
            "get_user_context",
            json!({"user_id": "u", "since": "yesterday"}),
            "since: ",
        ),
        (
            "get_user_context",
            json!({"user_id": "u", "max_tokens": 0}),
            "max_tokens",
        ),
        ("find_users", json!({}), "give `intent`"),
        ("find_users", json!({"since": "1h", "limit": 1000}), "limit"),
        (
            "find_users",
            json!({"intent": "purchase", "min_score": -1}),
            "min_score",
        ),
        (
            "explain_event",
            json!({"event": {"properties": {}}}),
            "no string field `event`",
        ),
    ] {
        let result = call(&client, tool, args.clone()).await;
        assert_eq!(result.is_error, Some(true), "{tool} {args}");
        assert!(
            text_of(&result).contains(says),
            "{tool} {args}: {}",
            text_of(&result)
        );
    }
    let missing = client
        .read_resource(ReadResourceRequestParams::new("context://user/nobody"))
        .await;
    assert!(missing.is_err(), "an unknown user's resource is an error");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn explain_event_says_when_the_rules_are_not_loaded() {
    let mut config = test_config();
    config.rules_dir = "/nonexistent/rules".into();
    let (app, _db) = TestApp::spawn_with_db(config).await;
    // Ingest and the context are served all the same.
    let resp = app.post("/batch").json(&reader("r")).answer().await;
    assert_eq!(resp.status(), StatusCode::OK);
    let client = connect(&app, SECRET).await.unwrap();
    let result = call(
        &client,
        "explain_event",
        json!({"event": {"event": "$pageview"}}),
    )
    .await;
    assert_eq!(result.is_error, Some(true));
    assert!(
        text_of(&result).contains("RULES_DIR (/nonexistent/rules)"),
        "{}",
        text_of(&result)
    );
    let context = call(&client, "get_user_context", json!({"user_id": "r"})).await;
    assert_eq!(context.is_error, Some(true), "not stored: no worker runs");
    client.cancel().await.unwrap();
}

#[tokio::test]
async fn only_the_secret_key_reaches_the_mcp_server() {
    let (app, _db) = spawn().await;
    let post = || {
        app.post("/mcp")
            .header("Content-Type", "application/json")
            .header("Accept", "application/json, text/event-stream")
            .body(INITIALIZE)
    };
    let none = post().answer().await;
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    assert!(none.headers().contains_key("www-authenticate"));
    let body: Value = none.json().await.unwrap();
    assert_eq!(body["type"], "authentication_error");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer"),
        "{body}"
    );
    for resp in [
        post().key(INGEST_KEY).answer().await,
        post().bearer_auth(INGEST_KEY).answer().await,
        post().bearer_auth("not-a-key").answer().await,
    ] {
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    }
    for resp in [
        post().key(SECRET).answer().await,
        post().bearer_auth(SECRET).answer().await,
    ] {
        assert_eq!(resp.status(), StatusCode::OK);
        let body: Value = resp.json().await.unwrap();
        assert!(body["result"]["protocolVersion"].is_string(), "{body}");
    }
    // The client sees the refusal at connection.
    assert!(connect(&app, INGEST_KEY).await.is_err());
    let ok = connect(&app, SECRET).await.unwrap();
    ok.cancel().await.unwrap();
}

#[tokio::test]
async fn other_hosts_are_refused_unless_allowed() {
    let mut config = test_config();
    config.mcp_allowed_hosts = vec!["context.example.com".into()];
    let (app, _db) = TestApp::spawn_with_db(config).await;
    let post = |host: &str| {
        app.post("/mcp")
            .header("Host", host)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json, text/event-stream")
            .bearer_auth(SECRET)
            .body(INITIALIZE)
    };
    assert_eq!(
        post("context.example.com").answer().await.status(),
        StatusCode::OK
    );
    let refused = post("evil.example.net").answer().await;
    assert!(refused.status().is_client_error(), "{}", refused.status());
}

/// `find_users` reads the intent index and the profiles' `last_seen` index, never `events`.
#[tokio::test]
async fn find_users_reads_indexes_not_events() {
    let (_app, db) = spawn().await;
    let conn = &db.conn;
    // Enough rows that the planner prefers the indexes, as it does on real data.
    conn.execute_unprepared(
        "INSERT INTO user_profiles (distinct_id, first_seen, last_seen, intents)
         SELECT 'u' || n, now() - n * interval '1 minute', now() - n * interval '1 minute',
                jsonb_build_object(CASE WHEN n % 2 = 0 THEN 'purchase' ELSE 'churn' END,
                  jsonb_build_object('score', 3.0, 'last_seen', to_jsonb(now() - n * interval '1 minute'),
                                     'evidence', '[]'::jsonb, 'summary', 's', 'half_life_secs', 86400, 'count', 1))
           FROM generate_series(1, 5000) AS n;
         ANALYZE user_profiles; ANALYZE user_intents;",
    )
    .await
    .unwrap();
    let explain = |sql: &str, values: Vec<sea_orm::Value>| {
        let sql = format!("EXPLAIN {sql}");
        async move {
            conn.query_all_raw(Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                sql,
                values,
            ))
            .await
            .unwrap()
            .iter()
            .map(|r| r.try_get_by_index::<String>(0).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
        }
    };
    let now = chrono::Utc::now();
    let hour_ago = now - chrono::Duration::hours(1);
    let by_intent = explain(
        api::mcp::find::BY_INTENT_SQL,
        vec![
            "purchase".into(),
            now.into(),
            1.0f64.into(),
            hour_ago.into(),
            20i64.into(),
        ],
    )
    .await;
    println!("find_users by intent:\n{by_intent}");
    assert!(
        by_intent.contains("Index Scan") && by_intent.contains("user_intents_intent_last_seen_idx"),
        "{by_intent}"
    );
    let by_activity = explain(
        api::mcp::find::BY_ACTIVITY_SQL,
        vec![hour_ago.into(), 20i64.into()],
    )
    .await;
    println!("find_users by activity:\n{by_activity}");
    assert!(
        by_activity.contains("Index Scan") && by_activity.contains("user_profiles_last_seen_idx"),
        "{by_activity}"
    );
    for plan in [&by_intent, &by_activity] {
        assert!(!plan.contains("events"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
    }
    // The trigger indexed every profile's intent; an erased profile leaves the index with it.
    assert_eq!(db.count("SELECT count(*) FROM user_intents").await, 5000);
    conn.execute_unprepared("DELETE FROM user_profiles WHERE distinct_id = 'u2'")
        .await
        .unwrap();
    assert_eq!(db.count("SELECT count(*) FROM user_intents").await, 4999);
}
