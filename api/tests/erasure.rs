//! `DELETE /context/user/:id` erases the user everywhere: stored rows, events still in the
//! stream, the dead-letter stream, the unmatched-events report; a delete racing a worker batch
//! never brings the user back. The real api and worker, real Redis and Postgres.

mod common;

use chrono::{DateTime, Utc};
use common::{
    InProcessWorker, RequestExt, SECRET, TestApp, TestDb, WAIT, dead_letters, publish_raw, redis,
    test_config, wait_until,
};
use infra::dlq::{DeadLetters, Selection};
use redis::aio::ConnectionManager;
use reqwest::StatusCode;
use sea_orm::sqlx::{self, Connection, Executor, PgConnection};
use serde_json::{Value, json};
use uuid::Uuid;

struct Fixture {
    app: TestApp,
    db: TestDb,
    redis: ConnectionManager,
}

async fn spawn() -> Fixture {
    let (app, db) = TestApp::spawn_with_db(test_config()).await;
    Fixture {
        app,
        db,
        redis: redis().await,
    }
}

/// A pageview of `path` in session `s1`.
fn pageview(path: &str) -> Value {
    json!({"event": "$pageview", "properties": {
        "$current_url": format!("https://shop.test{path}"), "$pathname": path, "$session_id": "s1"}})
}

/// An event no shipped rule describes (it goes to the unmatched-events report).
fn custom(name: &str) -> Value {
    json!({"event": name, "properties": {"$pathname": format!("/{name}")}})
}

impl Fixture {
    fn worker(&self) -> InProcessWorker {
        self.app.start_worker(&self.db, "erasure")
    }

    async fn capture(&self, user: &str, events: &[Value]) {
        self.app.capture(user, events).await
    }

    fn delete_request(&self, user: &str) -> impl Future<Output = Value> + Send + 'static {
        let request = self
            .app
            .delete(&format!("/context/user/{user}"))
            .key(SECRET)
            .send();
        async move {
            let resp = request.await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.json().await.unwrap()
        }
    }

    async fn delete(&self, user: &str) -> Value {
        self.delete_request(user).await
    }

    async fn context_status(&self, user: &str) -> StatusCode {
        self.app.context(user).await.0
    }

    /// The user's stored events, sessions and profiles.
    async fn rows(&self, user: &str) -> (i64, i64, i64) {
        let count =
            |table: &str| format!("SELECT count(*) FROM {table} WHERE distinct_id = '{user}'");
        (
            self.db.count(&count("events")).await,
            self.db.count(&count("user_sessions")).await,
            self.db.count(&count("user_profiles")).await,
        )
    }

    async fn wait_events(&self, user: &str, n: i64) {
        wait_until(WAIT, &format!("{n} events of {user} stored"), || async {
            self.rows(user).await.0 == n
        })
        .await;
    }

    /// Waits until every entry of the stream is acknowledged (the worker deletes them then).
    async fn drained(&self) {
        wait_until(WAIT, "the stream drained", || async {
            self.app.stream_len().await == 0
        })
        .await;
    }

    /// Backends of this test's database waiting for a lock of the kind `wait_event`
    /// (`advisory`: an erasure's or a batch's bucket lock; `transactionid`: a row another
    /// transaction holds).
    async fn waiting_for(&self, wait_event: &str) -> i64 {
        self.db
            .count(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND wait_event = '{wait_event}'"
            ))
            .await
    }

    /// Appends an entry with this envelope JSON to `key`, with `extra` fields.
    async fn xadd(&self, key: &str, event: &Value, extra: &[(&str, &str)]) {
        let event = event.to_string();
        let fields = [[("v", "1"), ("event", event.as_str())].as_slice(), extra].concat();
        publish_raw(&self.redis, key, &fields).await;
    }

    fn dead_letters(&self) -> DeadLetters {
        dead_letters(&self.redis, &self.app.keys)
    }

    /// The users of the dead letters, in order.
    async fn dead_letter_users(&self) -> Vec<String> {
        self.dead_letters()
            .list(1000)
            .await
            .unwrap()
            .iter()
            .map(|l| {
                let event = l.field("event").unwrap();
                infra::erasure::event_user(event.as_bytes()).unwrap().0
            })
            .collect()
    }

    /// The unmatched-events report: (event, user of its example), sorted.
    async fn unmatched(&self) -> Vec<(String, String)> {
        let report: Value = self
            .app
            .get("/rules/unmatched?limit=1000")
            .key(SECRET)
            .answer_json()
            .await;
        let mut shapes: Vec<(String, String)> = report["shapes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["event"].as_str().unwrap().to_string(),
                    s["example"]["distinct_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        shapes.sort();
        shapes
    }

    async fn wait_unmatched(&self, event: &str) {
        wait_until(
            WAIT,
            &format!("{event} in the unmatched report"),
            || async { self.unmatched().await.iter().any(|(e, _)| e == event) },
        )
        .await;
    }
}

/// An envelope as the api queues it, received at `received_at`; `event` may be a non-string
/// (undecodable: the worker dead-letters it).
fn envelope(user: &str, event: Value, received_at: DateTime<Utc>) -> Value {
    json!({"uuid": Uuid::now_v7(), "distinct_id": user, "event": event,
           "properties": {"$pathname": "/dlq"}, "timestamp": received_at, "received_at": received_at})
}

/// A transaction of the test's own holding the row lock of `user`'s profile, so that a worker
/// batch adding to it, or an erasure deleting it, waits inside its transaction.
async fn hold_profile(db: &TestDb, user: &str) -> PgConnection {
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    conn.execute("BEGIN").await.unwrap();
    let locked = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT 1 FROM user_profiles WHERE distinct_id = '{user}' FOR UPDATE"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(locked.rows_affected(), 1);
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_on_their_way_when_a_user_is_erased_are_never_stored() {
    let f = spawn().await;
    let worker = f.worker();
    f.capture(
        "u",
        &[pageview("/"), pageview("/pricing"), pageview("/pricing")],
    )
    .await;
    f.capture("other", &[pageview("/")]).await;
    f.wait_events("u", 3).await;
    f.wait_events("other", 1).await;
    worker.stop().await;

    // No worker: these wait in the stream.
    f.capture("u", &[pageview("/checkout"), pageview("/checkout")])
        .await;
    f.capture("ghost", &[pageview("/")]).await;
    let erased = f.delete("u").await;
    assert_eq!(erased["user_id"], "u");
    assert_eq!(erased["events_deleted"], 3, "{erased}");
    assert_eq!(erased["sessions_deleted"], 1, "{erased}");
    assert_eq!(erased["profile_deleted"], true, "{erased}");
    assert_eq!(erased["dead_letters_deleted"], 0, "{erased}");
    assert_eq!(erased["unmatched_examples_deleted"], 0, "{erased}");
    assert_eq!(erased["pending_events"], 2, "{erased}");
    assert!(
        erased["erased_at"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .is_ok()
    );
    // A user with nothing stored is erased all the same: their events on the way are dropped.
    let ghost = f.delete("ghost").await;
    assert_eq!(ghost["events_deleted"], 0, "{ghost}");
    assert_eq!(ghost["profile_deleted"], false, "{ghost}");
    assert_eq!(ghost["pending_events"], 1, "{ghost}");

    let worker = f.worker();
    f.drained().await;
    assert_eq!(f.rows("u").await, (0, 0, 0), "the erased user came back");
    assert_eq!(f.rows("ghost").await, (0, 0, 0));
    assert_eq!(f.context_status("u").await, StatusCode::NOT_FOUND);
    assert_eq!(f.rows("other").await, (1, 1, 1), "others untouched");

    // Events received after the erasure are new activity.
    f.capture("u", &[pageview("/again")]).await;
    f.wait_events("u", 1).await;
    assert_eq!(f.rows("u").await, (1, 1, 1));
    assert_eq!(f.context_status("u").await, StatusCode::OK);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_an_erased_user_are_deleted_and_a_replay_does_not_bring_them_back() {
    let f = spawn().await;
    let queue = f.app.config.queue_name.clone();
    let dlq = f.app.config.dlq_name.clone();
    let worker = f.worker();
    // Undecodable (`event` is not a string): dead-lettered.
    f.xadd(&queue, &envelope("u", json!(5), Utc::now()), &[])
        .await;
    f.xadd(&queue, &envelope("other", json!(5), Utc::now()), &[])
        .await;
    wait_until(WAIT, "two dead letters", || async {
        f.dead_letters().count().await.unwrap() == 2
    })
    .await;
    worker.stop().await;

    // On their way at the erasure: one the worker would dead-letter, one it would store.
    f.xadd(&queue, &envelope("u", json!(5), Utc::now()), &[])
        .await;
    f.capture("u", &[pageview("/")]).await;
    let before = Utc::now();
    let erased = f.delete("u").await;
    assert_eq!(erased["dead_letters_deleted"], 1, "{erased}");
    assert_eq!(erased["pending_events"], 2, "{erased}");
    assert_eq!(f.dead_letter_users().await, ["other"]);

    // Dead letters of u received before the erasure that reach the DLQ after it (a letter
    // restored by an operator, or added while the erasure ran) are replayed, beside one of
    // another user.
    let letter = [("dlq_source", queue.as_str()), ("dlq_error", "test")];
    f.xadd(&dlq, &envelope("u", json!("$pageview"), before), &letter)
        .await;
    f.xadd(
        &dlq,
        &envelope("other", json!("$pageview"), before),
        &letter,
    )
    .await;
    let worker = f.worker();
    // Every letter: those two, and other's undecodable one (dead-lettered again).
    let replayed = f.dead_letters().replay(&Selection::All).await.unwrap();
    assert_eq!(replayed.replayed.len(), 3);
    f.drained().await;
    f.wait_events("other", 1).await;
    assert_eq!(f.rows("u").await, (0, 0, 0), "the erased user came back");
    assert_eq!(
        f.dead_letter_users().await,
        ["other"],
        "the erased user's undecodable event is dropped, not dead-lettered"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unmatched_report_keeps_no_example_of_an_erased_user() {
    let f = spawn().await;
    let worker = f.worker();
    f.capture("u", &[custom("u_invited")]).await;
    f.capture("other", &[custom("other_invited")]).await;
    f.wait_unmatched("u_invited").await;
    f.wait_unmatched("other_invited").await;
    let erased = f.delete("u").await;
    assert_eq!(erased["unmatched_examples_deleted"], 1, "{erased}");
    assert_eq!(
        f.unmatched().await,
        [("other_invited".to_string(), "other".to_string())]
    );

    // Counted by a replica after the erasure: from an event on its way at the erasure, and
    // from one received after it (stored, as new activity, but never an example).
    worker.stop().await;
    f.capture("u", &[custom("u_on_its_way")]).await;
    f.delete("u").await;
    let worker = f.worker();
    f.drained().await;
    f.capture("u", &[custom("u_came_back")]).await;
    f.wait_events("u", 1).await;
    // A flush after those events were counted (the report is written once a second).
    f.capture("other", &[custom("marker")]).await;
    f.wait_unmatched("marker").await;
    let users: Vec<String> = f.unmatched().await.into_iter().map(|(_, u)| u).collect();
    assert_eq!(users, ["other", "other"]);
    worker.stop().await;
}

/// A worker batch of the user is inside its transaction (its events inserted, waiting for a
/// row lock) when the erasure starts: the erasure waits for it, then deletes what it stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_waits_for_the_batch_writing_the_user_and_deletes_it() {
    let f = spawn().await;
    let worker = f.worker();
    f.capture("u", &[pageview("/")]).await;
    f.wait_events("u", 1).await;

    let mut blocker = hold_profile(&f.db, "u").await;
    f.capture("u", &[pageview("/pricing"), pageview("/pricing")])
        .await;
    wait_until(WAIT, "the batch waiting inside its transaction", || async {
        f.waiting_for("transactionid").await == 1
    })
    .await;
    let delete = tokio::spawn(f.delete_request("u"));
    wait_until(WAIT, "the erasure waiting for the batch", || async {
        f.waiting_for("advisory").await == 1
    })
    .await;
    blocker.execute("ROLLBACK").await.unwrap();
    let erased = tokio::time::timeout(WAIT, delete).await.unwrap().unwrap();
    assert_eq!(erased["events_deleted"], 3, "{erased}");
    f.drained().await;
    assert_eq!(f.rows("u").await, (0, 0, 0), "the erased user came back");
    assert_eq!(f.context_status("u").await, StatusCode::NOT_FOUND);
    worker.stop().await;
}

/// A worker batch of events received before the erasure starts while the erasure is inside its
/// transaction: the batch waits for it, then drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_starting_during_an_erasure_waits_for_it_and_drops_the_erased_events() {
    let f = spawn().await;
    let worker = f.worker();
    f.capture("u", &[pageview("/")]).await;
    f.wait_events("u", 1).await;
    worker.stop().await;
    f.capture("u", &[pageview("/pricing"), pageview("/pricing")])
        .await;

    let mut blocker = hold_profile(&f.db, "u").await;
    let delete = tokio::spawn(f.delete_request("u"));
    wait_until(
        WAIT,
        "the erasure waiting inside its transaction",
        || async { f.waiting_for("transactionid").await == 1 },
    )
    .await;
    let worker = f.worker();
    wait_until(WAIT, "the batch waiting for the erasure", || async {
        f.waiting_for("advisory").await == 1
    })
    .await;
    blocker.execute("ROLLBACK").await.unwrap();
    let erased = tokio::time::timeout(WAIT, delete).await.unwrap().unwrap();
    assert_eq!(erased["events_deleted"], 1, "{erased}");
    f.drained().await;
    assert_eq!(f.rows("u").await, (0, 0, 0), "the erased user came back");
    worker.stop().await;
}
