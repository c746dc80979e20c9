//! One person across anonymous and identified ids, as an SDK drives it (anonymous browsing, then
//! `$identify`): the context of any of the person's ids is the whole person, and erasing one id
//! erases them all. The real api and worker, real Redis and Postgres.

mod common;

use chrono::{DateTime, Utc};
use common::{
    Fixture, InProcessWorker, RequestExt, SECRET, TestApp, TestDb, WAIT, publish_raw, redis, spawn,
    test_config, wait_until,
};
use reqwest::StatusCode;
use sea_orm::sqlx::{self, Connection, PgConnection, Row};
use serde_json::{Value, json};
use uuid::Uuid;

/// A posthog-js style pageview of `path` in session `s1`.
fn pageview(path: &str) -> Value {
    json!({"event": "$pageview", "properties": {
        "$current_url": format!("https://shop.test{path}"), "$pathname": path, "$session_id": "s1"}})
}

/// posthog-js's `posthog.identify(user)` after browsing as `anonymous`.
fn identify(anonymous: &str) -> Value {
    json!({"event": "$identify", "properties": {
        "$anon_distinct_id": anonymous, "$session_id": "s1", "$set": {"email": "ada@example.com"}}})
}

impl Fixture {
    fn worker(&self) -> InProcessWorker {
        self.app.start_worker(&self.db, "identity")
    }

    async fn capture(&self, user: &str, events: &[Value]) {
        self.app.capture(user, events).await
    }

    async fn stored(&self) -> i64 {
        self.db.events().await
    }

    async fn wait_stored(&self, n: i64) {
        wait_until(WAIT, &format!("{n} events stored"), || async {
            self.stored().await == n
        })
        .await;
    }

    async fn drained(&self) {
        wait_until(WAIT, "the stream drained", || async {
            self.app.stream_len().await == 0
        })
        .await;
    }

    async fn context(&self, user: &str) -> (StatusCode, Value) {
        self.app.context(user).await
    }

    async fn text(&self, user: &str) -> String {
        self.app.context_text(user).await
    }
}

fn descriptions(context: &Value) -> Vec<&str> {
    context["recent_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["description"].as_str().unwrap())
        .collect()
}

/// The issue's story: pricing read three times anonymously, then `identify("user_42")`. Asked
/// about `user_42`, the context holds the pricing visits and the purchase intent; asked about
/// the anonymous id, it is the same person. Anonymous events arriving after the identify (a
/// late batch) land in the person too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_identify_the_identified_id_answers_with_the_anonymous_history() {
    let f = spawn().await;
    let worker = f.worker();
    let anonymous = "0190f0c1-anon";
    f.capture(
        anonymous,
        &[
            pageview("/"),
            pageview("/pricing"),
            pageview("/pricing"),
            pageview("/pricing"),
        ],
    )
    .await;
    f.capture("user_42", &[identify(anonymous)]).await;
    f.wait_stored(5).await;

    let (status, user) = f.context("user_42").await;
    assert_eq!(status, StatusCode::OK, "{user}");
    assert_eq!(user["user_id"], "user_42");
    assert_eq!(user["distinct_ids"], json!([anonymous, "user_42"]));
    assert_eq!(user["stats"]["event_count"], 5);
    assert_eq!(
        user["stats"]["session_count"], 1,
        "one session across both ids"
    );
    assert_eq!(
        descriptions(&user)
            .iter()
            .filter(|d| **d == "Viewed page: /pricing")
            .count(),
        3,
        "{user}"
    );
    assert_eq!(user["intents"][0]["name"], "purchase", "{user}");
    assert!(
        user["summary"]
            .as_str()
            .unwrap()
            .starts_with("User showing Purchase Intent."),
        "{user}"
    );
    assert_eq!(descriptions(&user)[0], "Signed in as user_42");

    // The anonymous id is the same person.
    let (_, anon) = f.context(anonymous).await;
    assert_eq!(anon["user_id"], anonymous);
    for key in ["distinct_ids", "stats", "intents", "recent_history"] {
        assert_eq!(anon[key], user[key], "{key}");
    }
    let text = f.text("user_42").await;
    assert!(
        text.contains(r#"Known as: "0190f0c1-anon", "user_42" (one person"#),
        "{text}"
    );

    // A late anonymous batch (received after the identify) lands in the person.
    f.capture(anonymous, &[pageview("/checkout")]).await;
    f.wait_stored(6).await;
    let (_, user) = f.context("user_42").await;
    assert_eq!(user["stats"]["event_count"], 6);
    assert!(descriptions(&user).contains(&"Viewed page: /checkout"));

    // posthog.alias("crm-42"): an id with nothing stored of its own answers the person too.
    f.capture(
        "user_42",
        &[json!({"event": "$create_alias", "properties": {"alias": "crm-42"}})],
    )
    .await;
    f.wait_stored(7).await;
    let (status, alias) = f.context("crm-42").await;
    assert_eq!(status, StatusCode::OK, "{alias}");
    assert_eq!(
        alias["distinct_ids"],
        json!([anonymous, "crm-42", "user_42"])
    );
    assert_eq!(alias["stats"]["event_count"], 7);
    worker.stop().await;
}

/// An envelope as the api queues it, received at `received_at`.
fn envelope(user: &str, event: &str, properties: Value, received_at: DateTime<Utc>) -> Value {
    json!({"uuid": Uuid::now_v7(), "distinct_id": user, "event": event, "properties": properties,
           "timestamp": received_at, "received_at": received_at})
}

/// `DELETE` with any id erases every id of the person; events and identity calls received before
/// the erasure and replayed afterwards (a dead letter put back) do not bring any of them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasing_one_id_erases_the_whole_person_for_good() {
    let f = spawn().await;
    let worker = f.worker();
    f.capture("anon-1", &[pageview("/pricing"), pageview("/pricing")])
        .await;
    f.capture("user_42", &[identify("anon-1"), pageview("/account")])
        .await;
    f.capture("user_99", &[pageview("/")]).await;
    f.wait_stored(5).await;
    let before = Utc::now();

    let resp = f
        .app
        .delete("/context/user/anon-1")
        .key(SECRET)
        .answer()
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let erased: Value = resp.json().await.unwrap();
    assert_eq!(erased["distinct_ids"], json!(["anon-1", "user_42"]));
    assert_eq!(erased["events_deleted"], 4, "{erased}");
    for id in ["anon-1", "user_42"] {
        assert_eq!(f.context(id).await.0, StatusCode::NOT_FOUND, "{id}");
    }
    assert_eq!(
        f.db.count("SELECT count(*) FROM person_distinct_ids").await,
        0
    );
    assert_eq!(f.db.count("SELECT count(*) FROM persons").await, 0);

    // Replayed: an identity call of another user naming the erased id, and events of both
    // erased ids, all received before the erasure.
    let redis = redis().await;
    for event in [
        envelope(
            "user_99",
            "$identify",
            json!({"$anon_distinct_id": "anon-1"}),
            before,
        ),
        envelope("anon-1", "$pageview", json!({"$pathname": "/"}), before),
        envelope("user_42", "$pageview", json!({"$pathname": "/"}), before),
    ] {
        let event = event.to_string();
        publish_raw(
            &redis,
            &f.app.keys.stream,
            &[("v", "1"), ("event", event.as_str())],
        )
        .await;
    }
    f.drained().await;
    assert_eq!(f.stored().await, 2, "user_99's two events only");
    for id in ["anon-1", "user_42"] {
        assert_eq!(
            f.context(id).await.0,
            StatusCode::NOT_FOUND,
            "{id} came back"
        );
    }
    let (_, other) = f.context("user_99").await;
    assert_eq!(other["distinct_ids"], json!(["user_99"]));
    worker.stop().await;
}

/// The read of a person of 20 ids stays on indexes (no sequential scan), planned for its
/// parameters or generically, among 2,000 users.
#[tokio::test]
async fn a_persons_context_is_read_through_indexes() {
    let db = TestDb::create().await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(
        r#"INSERT INTO events (uuid, distinct_id, event, description, path, session_id, "timestamp", received_at, rules_version)
           SELECT gen_random_uuid(), 'user_' || u, '$pageview', 'Viewed page: /', '/', 's' || u || '_' || (n / 5),
                  now() - n * interval '1 hour', now(), 'bench'
             FROM generate_series(0, 1999) AS u, generate_series(0, 19) AS n;
           INSERT INTO user_profiles (distinct_id, first_seen, last_seen, event_count, session_count)
           SELECT distinct_id, min("timestamp"), max("timestamp"), count(*), count(DISTINCT session_id)
             FROM events GROUP BY distinct_id;
           INSERT INTO user_sessions (distinct_id, session_id, first_seen)
           SELECT distinct_id, session_id, min("timestamp") FROM events GROUP BY 1, 2;
           INSERT INTO persons (is_identified) SELECT true FROM generate_series(1, 100);
           INSERT INTO person_distinct_ids (distinct_id, person_id)
           SELECT 'user_' || u, 1 + u / 20 FROM generate_series(0, 1999) AS u;
           ANALYZE"#,
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let filter = api::context::store::HistoryFilter {
        limit: 20,
        ..Default::default()
    };
    // The id's own statement (which names its person), then the person's.
    for sql in [
        api::context::store::context_sql(&filter),
        api::context::store::person_context_sql(&filter),
    ] {
        let custom = plan(
            &mut conn,
            format!("EXPLAIN {}", sql.replace("$1", "'user_45'")),
        )
        .await;
        assert!(!custom.contains("Seq Scan"), "{custom}");
        assert!(
            custom.contains("events_distinct_id_timestamp_idx"),
            "{custom}"
        );
        let generic = plan(
            &mut conn,
            format!(
                "SET plan_cache_mode = force_generic_plan; DEALLOCATE ALL; \
                 PREPARE ctx(text) AS {sql}; EXPLAIN EXECUTE ctx('user_45')"
            ),
        )
        .await;
        assert!(!generic.contains("Seq Scan"), "{generic}");
    }
    // And the answer is the person's: 20 ids, 400 events, 80 sessions, the newest 20 events.
    let row = sqlx::query(sqlx::AssertSqlSafe(
        api::context::store::person_context_sql(&filter),
    ))
    .bind("user_45")
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(row.get::<i64, _>(2), 400);
    assert_eq!(row.get::<i64, _>(3), 80);
    assert_eq!(row.get::<Vec<String>, _>(6).len(), 20);
}

/// The lines of the plan `explain` (statements ending in an `EXPLAIN`) prints.
async fn plan(conn: &mut PgConnection, explain: String) -> String {
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(explain))
        .fetch_all(conn)
        .await
        .unwrap();
    rows.iter()
        .filter_map(|r| r.try_get::<String, _>(0).ok())
        .collect::<Vec<_>>()
        .join("\n")
}

/// An id joining the person while an erasure of it waits for the batch that joins it: the
/// erasure sees the new id once it has the locks, starts again with it, and erases it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_joining_during_an_erasure_is_erased_with_the_person() {
    use sea_orm::sqlx::Executor;
    let db = TestDb::create().await;
    let store = |user: &str, event: &str, properties: Value| {
        let envelope = testkit::envelope(user, event, properties);
        let enrichment = rules_engine::enrich::without_rules(&envelope);
        worker::store::StoredEvent::new(envelope, enrichment, None)
    };
    let write = |events: Vec<worker::store::StoredEvent>| {
        let conn = db.conn.clone();
        async move {
            worker::store::write_batch(&conn, &Default::default(), &events, "v1")
                .await
                .unwrap()
        }
    };
    write(vec![
        store("a", "$pageview", json!({})),
        store("b", "$identify", json!({"$anon_distinct_id": "a"})),
    ])
    .await;
    // The batch joining c waits inside its transaction (its bucket locks held) for the person.
    let mut blocker = PgConnection::connect(&db.url).await.unwrap();
    blocker.execute("BEGIN").await.unwrap();
    blocker
        .execute("SELECT 1 FROM persons FOR UPDATE")
        .await
        .unwrap();
    let joining = tokio::spawn(write(vec![store(
        "c",
        "$create_alias",
        json!({"alias": "a"}),
    )]));
    let waiting = |event: &'static str| {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND wait_event = '{event}'"
        );
        let db = &db;
        async move { db.count(&sql).await }
    };
    wait_until(WAIT, "the batch waiting for the person", || async {
        waiting("transactionid").await == 1
    })
    .await;
    let erasure = {
        let conn = db.conn.clone();
        tokio::spawn(async move {
            let erased = infra::erasure::erase_stored(&conn, &["b"], Utc::now()).await?;
            infra::erasure::forget_persons(&conn, &erased.distinct_ids).await?;
            Ok::<_, infra::postgres::StoreError>(erased)
        })
    };
    wait_until(WAIT, "the erasure waiting for the batch", || async {
        waiting("advisory").await == 1
    })
    .await;
    blocker.execute("ROLLBACK").await.unwrap();
    // c's first event is its alias call naming a: c had no person yet, so it joins a's
    // (identified) person, as in PostHog.
    assert_eq!(joining.await.unwrap().merges.merged, 1);
    let erased = erasure.await.unwrap().unwrap();
    assert_eq!(erased.distinct_ids, ["a", "b", "c"]);
    assert_eq!(db.events().await, 0);
    assert_eq!(
        db.count("SELECT count(*) FROM person_distinct_ids").await,
        0
    );
    assert_eq!(db.count("SELECT count(*) FROM user_profiles").await, 0);
}

/// Person properties belong to the person: `$set_once` keeps the first value of any id, `$set`
/// the newest, `$unset` removes, over all the person's ids in time order whatever order their
/// events arrive in (the anonymous id's late event sent before the identify changes nothing it
/// should not). Either id answers the same properties; an id of no person answers its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn person_properties_combine_over_the_ids_in_posthogs_order() {
    let f = spawn().await;
    let worker = f.worker();
    let anonymous = "0190f0c1-props";
    let at = |minute: u32| format!("2026-11-20T10:{minute:02}:00Z");
    let with = |mut event: Value, minute: u32, person: Value| {
        event["timestamp"] = json!(at(minute));
        for (key, value) in person.as_object().unwrap() {
            event["properties"][key] = value.clone();
        }
        event
    };
    f.capture(
        anonymous,
        &[with(
            pageview("/"),
            1,
            json!({"$set_once": {"initial_referrer": "google"},
                   "$set": {"plan": "free", "theme": "dark"}}),
        )],
    )
    .await;
    f.wait_stored(1).await;
    let (_, alone) = f.context(anonymous).await;
    assert_eq!(
        alone["person_properties"],
        json!({"initial_referrer": "google", "plan": "free", "theme": "dark"}),
        "an id of no person answers its own properties"
    );

    f.capture(
        "user_42",
        &[
            with(
                identify(anonymous),
                2,
                json!({"$set": {"email": "ada@example.com"}}),
            ),
            with(
                pageview("/account"),
                3,
                json!({"$set": {"plan": "pro"}, "$set_once": {"initial_referrer": "bing"},
                       "$unset": ["theme"]}),
            ),
        ],
    )
    .await;
    // A late batch of the anonymous id, sent before the identify: its `$set` is older than the
    // identified id's (the plan stays "pro"), its `$set_once` the oldest (it is the first
    // referrer).
    f.capture(
        anonymous,
        &[with(
            pageview("/pricing"),
            0,
            json!({"$set": {"plan": "trial"}, "$set_once": {"initial_referrer": "ddg"}}),
        )],
    )
    .await;
    f.wait_stored(4).await;
    let want = json!({"email": "ada@example.com", "initial_referrer": "ddg", "plan": "pro"});
    for id in ["user_42", anonymous] {
        let (status, context) = f.context(id).await;
        assert_eq!(status, StatusCode::OK, "{context}");
        assert_eq!(context["person_properties"], want, "asked as {id}");
    }
    worker.stop().await;
}

/// An erasure of a person that stops after the database part (Redis down) keeps the person's
/// mapping, so retrying with any one id still finds every id: the other id's dead letter goes
/// too, and only then does the mapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_erasure_retried_after_redis_failed_finds_every_id() {
    let redis_proxy = testkit::Proxy::redis(true).await;
    let mut config = test_config();
    config.redis_url = redis_proxy.url(&config.redis_url);
    let (app, db) = TestApp::spawn_with_db(config).await;
    let store = |user: &str, event: &str, properties: Value| {
        let envelope = testkit::envelope(user, event, properties);
        let enrichment = rules_engine::enrich::without_rules(&envelope);
        worker::store::StoredEvent::new(envelope, enrichment, None)
    };
    worker::store::write_batch(
        &db.conn,
        &Default::default(),
        &[
            store("anon", "$pageview", json!({})),
            store("known", "$identify", json!({"$anon_distinct_id": "anon"})),
        ],
        "v1",
    )
    .await
    .unwrap();
    // A dead letter of the anonymous id, which an erasure asked about the known id must find.
    let letter = json!({"uuid": Uuid::now_v7(), "distinct_id": "anon", "event": 5,
        "properties": {}, "timestamp": Utc::now(), "received_at": Utc::now()})
    .to_string();
    publish_raw(
        &redis().await,
        &app.keys.dlq,
        &[("v", "1"), ("event", &letter), ("dlq_error", "test")],
    )
    .await;
    let mappings = "SELECT count(*) FROM person_distinct_ids";
    assert_eq!(db.count(mappings).await, 2);

    redis_proxy.set_up(false);
    let resp = app.delete("/context/user/known").key(SECRET).answer().await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "erasure_unfinished", "{body}");
    assert_eq!(db.events().await, 0, "the database part is done");
    assert_eq!(
        db.count(mappings).await,
        2,
        "the mapping waits for the rest"
    );
    assert_eq!(app.dlq_len().await, 1);

    redis_proxy.set_up(true);
    // The api's Redis connection comes back within a few tries.
    let deadline = std::time::Instant::now() + WAIT;
    let erased: Value = loop {
        let resp = app.delete("/context/user/known").key(SECRET).answer().await;
        if resp.status() == StatusCode::OK {
            break resp.json().await.unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retried erasure never finished"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(erased["distinct_ids"], json!(["anon", "known"]), "{erased}");
    assert_eq!(erased["dead_letters_deleted"], 1, "{erased}");
    assert_eq!(app.dlq_len().await, 0);
    assert_eq!(db.count(mappings).await, 0);
    assert_eq!(db.count("SELECT count(*) FROM persons").await, 0);
}
