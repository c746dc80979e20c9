//! The worker against real Redis and Postgres: each test has its own stream keys and database.

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::*;
use entity::{envelope::FIELD_EVENT, user_profile};
use infra::dlq::{self, Selection};
use sea_orm::{ConnectionTrait, EntityTrait};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_events_and_keeps_profiles_and_retention() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let mut events = Vec::new();
    for i in 0..30 {
        let user = format!("user_{}", i % 3);
        let mut e = envelope(
            &user,
            "$pageview",
            json!({"$current_url": format!("https://x.test/p{i}"), "$pathname": if i % 2 == 0 { "/pricing" } else { "/docs" }}),
        );
        e.session_id = Some(format!("{user}-s{}", i % 2));
        events.push(e);
    }
    events.push(envelope(
        "user_0",
        "signup_completed",
        json!({"$set": {"plan": "pro"}}),
    ));
    // Queued before any worker ever ran: the group must start at the stream's beginning.
    publish(&redis, &keys.stream, &events).await;

    let worker = RunningWorker::start(config(&db.url, &keys, "w1"));
    wait_until(WAIT, "31 events stored", || async {
        db.events().await == 31
    })
    .await;
    wait_until(WAIT, "stream emptied by XACK+XDEL", || async {
        xlen(&redis, &keys.stream).await == 0 && pending(&redis, &keys).await == 0
    })
    .await;
    // A later batch for existing users merges into their profiles.
    let mut later = envelope(
        "user_0",
        "$pageview",
        json!({"$pathname": "/pricing", "$set": {"plan": "enterprise"}}),
    );
    later.session_id = Some("user_0-s0".into());
    publish(
        &redis,
        &keys.stream,
        &[later, envelope("user_1", "click", json!({}))],
    )
    .await;
    wait_until(WAIT, "33 events stored", || async {
        db.events().await == 33
    })
    .await;
    worker.stop().await.unwrap();

    let descriptions = db
        .column("SELECT description FROM events WHERE distinct_id = 'user_0' ORDER BY timestamp")
        .await;
    assert_eq!(
        descriptions.first().map(String::as_str),
        Some("Viewed page: /pricing")
    );
    assert_eq!(
        descriptions[descriptions.len() - 2],
        "Triggered 'signup_completed'"
    );
    assert_eq!(db.count("SELECT count(*) FROM events WHERE rules_version = 'test-rules' AND path IS NOT NULL AND url IS NOT NULL AND session_id IS NOT NULL").await, 30);

    let profile = user_profile::Entity::find_by_id("user_0")
        .one(&db.conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(profile.event_count, 12);
    assert_eq!(profile.session_count, 2);
    assert_eq!(
        profile.person_properties.as_ref().unwrap()["plan"],
        "enterprise"
    );
    let intents = profile.intents().unwrap();
    let purchase = &intents["purchase"];
    assert_eq!(purchase.summary, "User showing Purchase Intent.");
    assert_eq!(purchase.evidence, ["Viewed page: /pricing"]);
    assert!(
        purchase.score > 5.9 && purchase.score <= 6.0,
        "six pricing views, barely decayed: {}",
        purchase.score
    );
    assert_eq!(purchase.count, 6);
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        33
    );
    assert_eq!(xlen(&redis, &keys.dlq).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_one_group_without_duplicates() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let (count_a, enricher_a) = counting(false);
    let (count_b, enricher_b) = counting(false);
    let mut config_a = config(&db.url, &keys, "a");
    let mut config_b = config(&db.url, &keys, "b");
    config_a.batch_size = 10;
    config_b.batch_size = 10;
    let a = RunningWorker::start_with(config_a, enricher_a);
    let b = RunningWorker::start_with(config_b, enricher_b);
    wait_until(WAIT, "both consumers joined", || async {
        group_created(&redis, &keys).await && consumers(&redis, &keys).await.len() == 2
    })
    .await;
    for chunk in 0..20 {
        let events: Vec<_> = (0..20)
            .map(|i| envelope(&format!("u{}", (chunk * 20 + i) % 7), "click", json!({})))
            .collect();
        publish(&redis, &keys.stream, &events).await;
    }
    wait_until(WAIT, "400 events stored", || async {
        db.events().await == 400
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();

    let (by_a, by_b) = (
        count_a.described.load(Ordering::SeqCst),
        count_b.described.load(Ordering::SeqCst),
    );
    assert_eq!(
        by_a + by_b,
        400,
        "every event described exactly once (a {by_a}, b {by_b})"
    );
    assert!(
        by_a > 0 && by_b > 0,
        "both replicas worked (a {by_a}, b {by_b})"
    );
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        400
    );
    assert_eq!(pending(&redis, &keys).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_worker_entries_are_claimed_and_stored_once() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    // Worker A reads but cannot store (its Postgres is down), then crashes.
    let proxy = Proxy::postgres(false).await;
    let a = RunningWorker::start(config(&proxy.url(&db.url), &keys, "crashing"));
    wait_until(WAIT, "group created", || async {
        group_created(&redis, &keys).await
    })
    .await;
    let events: Vec<_> = (0..25)
        .map(|i| envelope(&format!("u{}", i % 4), "click", json!({})))
        .collect();
    publish(&redis, &keys.stream, &events).await;
    wait_until(WAIT, "A holds all entries", || async {
        pending(&redis, &keys).await == 25
    })
    .await;
    a.task.abort();
    let _ = a.task.await;
    assert_eq!(db.events().await, 0);

    // Worker B claims them once they are idle long enough.
    let mut config_b = config(&db.url, &keys, "survivor");
    config_b.claim_idle = Duration::from_millis(300);
    let b = RunningWorker::start(config_b);
    wait_until(WAIT, "25 events stored", || async {
        db.events().await == 25
    })
    .await;
    wait_until(
        WAIT,
        "nothing pending and the dead consumer removed",
        || async {
            pending(&redis, &keys).await == 0
                && !consumers(&redis, &keys)
                    .await
                    .contains(&"crashing".to_string())
        },
    )
    .await;
    b.stop().await.unwrap();
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        25
    );
    assert_eq!(xlen(&redis, &keys.dlq).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_after_commit_is_neither_stored_nor_counted_twice() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let events: Vec<_> = (0..10)
        .map(|i| envelope(&format!("u{}", i % 2), "click", json!({})))
        .collect();
    // A replica read them and committed, then died before XACK.
    create_group(&redis, &keys).await;
    publish(&redis, &keys.stream, &events).await;
    read_group(&redis, &keys, "died", ">").await;
    let rows: Vec<_> = events.iter().map(stored).collect();
    assert_eq!(
        worker::store::write_batch(&db.conn, &Default::default(), &rows, "v0")
            .await
            .unwrap()
            .stored,
        10
    );

    let mut config_b = config(&db.url, &keys, "survivor");
    config_b.claim_idle = Duration::from_millis(200);
    let b = RunningWorker::start(config_b);
    wait_until(WAIT, "redelivered entries acknowledged", || async {
        pending(&redis, &keys).await == 0 && xlen(&redis, &keys.stream).await == 0
    })
    .await;
    b.stop().await.unwrap();
    assert_eq!(db.events().await, 10);
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_entries_go_to_the_dlq_and_the_rest_is_stored() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    create_group(&redis, &keys).await;
    // One read gets good and bad entries together.
    publish(&redis, &keys.stream, &[envelope("u1", "click", json!({}))]).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let not_json = publish_raw(
        &redis,
        &keys.stream,
        &[
            ("v", "1"),
            ("event", "{not json"),
            ("traceparent", traceparent),
        ],
    )
    .await;
    let future_version = publish_raw(&redis, &keys.stream, &[("v", "9"), ("event", "{}")]).await;
    let boom = envelope("u2", "boom", json!({}));
    publish(
        &redis,
        &keys.stream,
        &[boom.clone(), envelope("u1", "click", json!({}))],
    )
    .await;

    let (_, enricher) = counting(true);
    let worker = RunningWorker::start_with(config(&db.url, &keys, "w"), enricher);
    wait_until(
        WAIT,
        "2 stored, 3 dead-lettered, nothing pending",
        || async {
            db.events().await == 2
                && xlen(&redis, &keys.dlq).await == 3
                && pending(&redis, &keys).await == 0
        },
    )
    .await;
    worker.stop().await.unwrap();

    let letters = dead_letters(&redis, &keys).list(10).await.unwrap();
    let by_entry = |id: &str| {
        letters
            .iter()
            .find(|l| l.field(dlq::FIELD_ENTRY_ID).as_deref() == Some(id))
            .unwrap()
    };
    let error = by_entry(&not_json).field(dlq::FIELD_ERROR).unwrap();
    // The trace context travels with the dead letter (and back with a replay).
    assert_eq!(
        by_entry(&not_json).field("traceparent").as_deref(),
        Some(traceparent)
    );
    assert!(error.contains("undecodable entry"), "{error}");
    assert_eq!(
        by_entry(&not_json).field(FIELD_EVENT).as_deref(),
        Some("{not json"),
        "original fields kept"
    );
    let error = by_entry(&future_version).field(dlq::FIELD_ERROR).unwrap();
    assert!(error.contains("version `9`"), "{error}");
    let boom_letter = letters
        .iter()
        .find(|l| {
            l.field(dlq::FIELD_ERROR)
                .unwrap()
                .contains("rule 'boom' has a bug")
        })
        .unwrap();
    assert_eq!(
        boom_letter.field(dlq::FIELD_DELIVERIES).as_deref(),
        Some("1")
    );
    assert_eq!(boom_letter.field(dlq::FIELD_CONSUMER).as_deref(), Some("w"));
    assert_eq!(
        boom_letter.field(dlq::FIELD_SOURCE).as_deref(),
        Some(keys.stream.as_str())
    );
    assert!(boom_letter.field(dlq::FIELD_AT).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_delivered_too_often_goes_to_the_dlq() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    create_group(&redis, &keys).await;
    let id = publish(
        &redis,
        &keys.stream,
        &[envelope("u1", "crashes_workers", json!({}))],
    )
    .await
    .remove(0);
    // Delivered five times to a consumer that never acknowledged (it kept crashing).
    for start in [">", "0", "0", "0", "0"] {
        read_group(&redis, &keys, "crashy", start).await;
    }
    let mut cfg = config(&db.url, &keys, "w");
    cfg.claim_idle = Duration::from_millis(50);
    let worker = RunningWorker::start(cfg);
    wait_until(WAIT, "dead-lettered", || async {
        xlen(&redis, &keys.dlq).await == 1 && pending(&redis, &keys).await == 0
    })
    .await;
    worker.stop().await.unwrap();
    let letter = dead_letters(&redis, &keys).list(1).await.unwrap().remove(0);
    assert_eq!(letter.field(dlq::FIELD_ENTRY_ID), Some(id));
    assert_eq!(letter.field(dlq::FIELD_DELIVERIES).as_deref(), Some("6"));
    assert!(
        letter
            .field(dlq::FIELD_ERROR)
            .unwrap()
            .contains("more than MAX_DELIVERIES=5")
    );
    assert_eq!(db.events().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_keeps_entries_pending_until_it_is_back() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let proxy = Proxy::postgres(true).await;
    let mut cfg = config(&proxy.url(&db.url), &keys, "w");
    cfg.claim_idle = Duration::from_millis(300); // its own held entries must not look idle
    let worker = RunningWorker::start(cfg);
    publish(&redis, &keys.stream, &[envelope("u1", "before", json!({}))]).await;
    wait_until(WAIT, "first event stored", || async {
        db.events().await == 1
    })
    .await;

    proxy.set_up(false);
    let events: Vec<_> = (0..40)
        .map(|i| envelope(&format!("u{}", i % 3), "during", json!({})))
        .collect();
    publish(&redis, &keys.stream, &events).await;
    wait_until(WAIT, "entries read and held", || async {
        pending(&redis, &keys).await > 0
    })
    .await;
    // Several retries and keep-alive periods pass: nothing is lost, acknowledged or dead-lettered.
    let outage = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < outage {
        assert_eq!(db.events().await, 1);
        assert_eq!(xlen(&redis, &keys.dlq).await, 0);
        assert_eq!(xlen(&redis, &keys.stream).await, 40);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    proxy.set_up(true);
    wait_until(WAIT, "all stored after recovery", || async {
        db.events().await == 41
    })
    .await;
    wait_until(WAIT, "nothing pending", || async {
        pending(&redis, &keys).await == 0
    })
    .await;
    worker.stop().await.unwrap();
    assert_eq!(xlen(&redis, &keys.dlq).await, 0);
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        41
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_stores_the_batch_in_flight_and_leaves_nothing_pending() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let proxy = Proxy::postgres(false).await;
    let worker = RunningWorker::start(config(&proxy.url(&db.url), &keys, "w"));
    let events: Vec<_> = (0..20)
        .map(|i| envelope(&format!("u{i}"), "click", json!({})))
        .collect();
    publish(&redis, &keys.stream, &events).await;
    wait_until(WAIT, "batch in flight", || async {
        pending(&redis, &keys).await == 20
    })
    .await;
    worker.shutdown.cancel();
    // Arrives during shutdown: the read already blocking may still take it (and then stores it);
    // no new read is issued, so it is either stored or still in the stream, never left pending.
    publish(
        &redis,
        &keys.stream,
        &[envelope("late", "click", json!({}))],
    )
    .await;
    proxy.set_up(true);
    let result = tokio::time::timeout(Duration::from_secs(5), worker.task)
        .await
        .expect("stops within SHUTDOWN_TIMEOUT");
    result.unwrap().unwrap();
    let stored = db.events().await;
    assert!(stored == 20 || stored == 21, "{stored}");
    assert_eq!(pending(&redis, &keys).await, 0);
    assert_eq!(stored + xlen(&redis, &keys.stream).await, 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_opens_its_postgres_connections_and_prepares_its_statements_before_reading() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let cfg = config(&db.url, &keys, "w");
    let pool_size = i64::from(cfg.database_pool_size);
    let worker = RunningWorker::start(cfg);
    wait_until(WAIT, "consumer joined", || async {
        group_created(&redis, &keys).await && consumers(&redis, &keys).await == ["w"]
    })
    .await;
    // Joined means it has read: by then each of the pool's connections has prepared the
    // statements (the last one prepared is the counts upsert), none is left to open on a batch.
    let prepared = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND query LIKE 'INSERT INTO user_profiles AS p (distinct_id, first_seen, last_seen, event_count%'",
        db.name
    );
    assert_eq!(db.count(&prepared).await, pool_size);
    publish(&redis, &keys.stream, &[envelope("u1", "click", json!({}))]).await;
    wait_until(WAIT, "stored", || async { db.events().await == 1 }).await;
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_worker_rereads_its_own_pending_entries_first() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let proxy = Proxy::postgres(false).await;
    let mut cfg = config(&proxy.url(&db.url), &keys, "same-name");
    cfg.shutdown_timeout = Duration::from_millis(200);
    let worker = RunningWorker::start(cfg);
    let events: Vec<_> = (0..5)
        .map(|i| envelope(&format!("u{i}"), "click", json!({})))
        .collect();
    publish(&redis, &keys.stream, &events).await;
    wait_until(WAIT, "held", || async { pending(&redis, &keys).await == 5 }).await;
    worker.stop().await.unwrap(); // grace period runs out: entries stay pending
    assert_eq!(pending(&redis, &keys).await, 5);

    // Same consumer name, Postgres reachable, claiming far off: only the pending re-read can store them.
    let worker = RunningWorker::start(config(&db.url, &keys, "same-name"));
    wait_until(WAIT, "stored", || async { db.events().await == 5 }).await;
    wait_until(WAIT, "acknowledged", || async {
        pending(&redis, &keys).await == 0
    })
    .await;
    worker.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_stores_a_fixed_event_and_purge_empties_it() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let boom = envelope("u1", "boom", json!({"plan": "pro"}));
    publish(&redis, &keys.stream, std::slice::from_ref(&boom)).await;
    let (_, buggy) = counting(true);
    let worker = RunningWorker::start_with(config(&db.url, &keys, "w"), buggy);
    wait_until(WAIT, "dead-lettered", || async {
        xlen(&redis, &keys.dlq).await == 1
    })
    .await;
    worker.stop().await.unwrap();

    // The rule is fixed; replay puts the event back and the worker stores it.
    let worker = RunningWorker::start(config(&db.url, &keys, "w"));
    let dead = dead_letters(&redis, &keys);
    let letter = dead.list(10).await.unwrap().remove(0);
    let report = dead
        .replay(&Selection::Ids(vec![letter.id.clone(), "1-1".into()]))
        .await
        .unwrap();
    assert_eq!(report.replayed.len(), 1);
    assert_eq!(report.replayed[0].1, keys.stream);
    assert_eq!(report.missing, ["1-1"]);
    wait_until(WAIT, "replayed event stored", || async {
        db.events().await == 1
    })
    .await;
    let stored = entity::event::Entity::find_by_id(boom.uuid)
        .one(&db.conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.description.as_deref(), Some("Triggered 'boom'"));
    assert_eq!(stored.properties["plan"], "pro");
    assert_eq!(dead.count().await.unwrap(), 0);
    worker.stop().await.unwrap();

    publish_raw(&redis, &keys.dlq, &[("v", "1"), ("event", "x")]).await;
    publish_raw(&redis, &keys.dlq, &[("v", "1"), ("event", "y")]).await;
    assert_eq!(dead.purge(&Selection::All).await.unwrap().0, 2);
    assert_eq!(dead.count().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_are_removed_and_do_not_fail_the_batch() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let mut nul = envelope(
        "u\u{0}1",
        "click\u{0}",
        json!({"text\u{0}": "a\u{0}b", "nested": [{"k": "\u{0}"}]}),
    );
    nul.session_id = Some("s\u{0}".into());
    let fine = envelope("u2", "click", json!({}));
    publish(&redis, &keys.stream, &[nul.clone(), fine]).await;
    let worker = RunningWorker::start(config(&db.url, &keys, "w"));
    wait_until(WAIT, "both stored", || async { db.events().await == 2 }).await;
    worker.stop().await.unwrap();
    let stored = entity::event::Entity::find_by_id(nul.uuid)
        .one(&db.conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.distinct_id, "u1");
    assert_eq!(stored.event, "click");
    assert_eq!(stored.session_id.as_deref(), Some("s"));
    assert_eq!(
        stored.properties,
        json!({"text": "ab", "nested": [{"k": ""}]})
    );
    assert_eq!(stored.description.as_deref(), Some("Triggered 'click'"));
    assert_eq!(xlen(&redis, &keys.dlq).await, 0);
}

/// An entry's properties are stored as the api wrote them (the text is not decoded and encoded
/// again): integers beyond a double, escapes and spacing keep their meaning. Properties the worker
/// cannot decode (a lone UTF-16 surrogate) still go to the DLQ, before Postgres sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_are_stored_as_written_and_undecodable_ones_are_dead_lettered() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let entry = |properties: &str| {
        format!(
            r#"{{"uuid":"{}","distinct_id":"u1","event":"click","properties":{properties},"timestamp":"2026-11-28T10:00:00Z","received_at":"2026-11-28T10:00:01Z"}}"#,
            uuid::Uuid::now_v7()
        )
    };
    let written = entry(
        r#"{ "n": 12345678901234567890, "s": "\u00e9 \ud83d\ude00",
            "nested": {"k": [1, "x"]}, "$current_url": "https://x.test/pricing?a=1" }"#,
    );
    let lone = entry(r#"{"s": "\ud800"}"#);
    publish_raw(&redis, &keys.stream, &[("v", "1"), ("event", &written)]).await;
    publish_raw(&redis, &keys.stream, &[("v", "1"), ("event", &lone)]).await;
    let worker = RunningWorker::start(config(&db.url, &keys, "w"));
    wait_until(WAIT, "1 stored, 1 dead-lettered", || async {
        db.events().await == 1 && xlen(&redis, &keys.dlq).await == 1
    })
    .await;
    worker.stop().await.unwrap();
    assert_eq!(
        db.count(
            "SELECT count(*) FROM events WHERE properties->>'n' = '12345678901234567890' \
             AND properties->>'s' = 'é 😀' AND properties->'nested' = '{\"k\": [1, \"x\"]}' \
             AND path = '/pricing'"
        )
        .await,
        1
    );
    let letters = dead_letters(&redis, &keys).list(10).await.unwrap();
    let error = letters[0].field(dlq::FIELD_ERROR).unwrap();
    assert!(
        error.contains("undecodable") && error.contains("surrogate"),
        "{error}"
    );
    assert_eq!(letters[0].field("event"), Some(lone));
}

/// A worker creates the schema of an empty database; events Postgres rejects for their data go to
/// the DLQ, found by storing their batch in halves, and the rest of the batch is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrates_on_start_and_events_postgres_rejects_go_to_the_dlq() {
    // An empty database: the worker creates the schema itself.
    let fresh = TestDb::create_empty().await;
    let keys = Keys::new();
    let redis = redis().await;
    let mut ancient = envelope("u1", "click", json!({}));
    // Before Postgres' earliest date: the api would not let it through, but the worker must cope.
    ancient.timestamp = chrono::NaiveDate::from_ymd_opt(-9000, 1, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    // One batch of 20 (the test batch size is 50) with two events Postgres rejects among them.
    let batch: Vec<_> = (0..20)
        .map(|i| match i {
            3 | 16 => {
                let mut bad = ancient.clone();
                bad.uuid = uuid::Uuid::now_v7();
                bad
            }
            _ => envelope(&format!("u{i}"), "click", json!({})),
        })
        .collect();
    publish(&redis, &keys.stream, &batch).await;
    let mut cfg = config(&fresh.url, &keys, "w");
    cfg.migrate_on_start = true;
    let worker = RunningWorker::start(cfg);
    wait_until(WAIT, "18 stored, 2 dead-lettered", || async {
        // the table does not exist until the worker has migrated
        fresh.try_count("SELECT count(*) FROM events").await.ok() == Some(18)
            && xlen(&redis, &keys.dlq).await == 2
            && pending(&redis, &keys).await == 0
    })
    .await;
    worker.stop().await.unwrap();
    let letters = dead_letters(&redis, &keys).list(10).await.unwrap();
    assert_eq!(letters.len(), 2);
    for letter in letters {
        assert!(
            letter
                .field(dlq::FIELD_ERROR)
                .unwrap()
                .contains("rejected by Postgres"),
            "{:?}",
            letter.field(dlq::FIELD_ERROR)
        );
    }
    assert_eq!(
        fresh
            .count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        18
    );
}

/// Each pooled connection has Nagle's algorithm off (sqlx 0.9.0 leaves it on: a batch statement
/// sent in parts then waited ~40 ms for the server's delayed ACK).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_connections_disable_nagle() {
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    let mut conn = pool.get_postgres_connection_pool().acquire().await.unwrap();
    assert_eq!(
        infra::postgres::nagle_disabled(&mut conn).await.unwrap(),
        Some(true)
    );
    // sqlx on its own leaves it on (the check finds the socket and tells the difference).
    let mut plain = db
        .conn
        .get_postgres_connection_pool()
        .acquire()
        .await
        .unwrap();
    assert_eq!(
        infra::postgres::nagle_disabled(&mut plain).await.unwrap(),
        Some(false)
    );
}

/// The profile lock and update probe `user_profiles` by key however the plan was made: planned
/// (generic, as sqlx's prepared statements soon are) while the table was small, the join was a
/// hash join over a full scan of the table, kept as it grew. The worker's connections rule it out;
/// a plain connection shows the plan they avoid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_statements_probe_by_key_whatever_the_table_size_when_planned() {
    use sea_orm::sqlx::{self, Row};
    let db = TestDb::create().await;
    db.conn
        .execute_unprepared(
            "INSERT INTO user_profiles (distinct_id, first_seen, last_seen) \
             SELECT 'u' || g, now(), now() FROM generate_series(1, 300) AS g; \
             ANALYZE user_profiles",
        )
        .await
        .unwrap();
    async fn plans(pool: &sea_orm::DatabaseConnection) -> Vec<String> {
        let mut conn = pool.get_postgres_connection_pool().acquire().await.unwrap();
        sqlx::query("SET plan_cache_mode = force_generic_plan")
            .execute(&mut *conn)
            .await
            .unwrap();
        let mut plans = Vec::new();
        for (name, statement, args) in [
            ("lock", worker::store::LOCK_PROFILES, "('{u1}', '{t}')"),
            (
                "upd",
                worker::store::UPDATE_PROFILES,
                "('{u1}', '{2026-01-01}', '{2026-01-01}', '{1}', '{0}', '{f}', '{NULL}', '{NULL}', '{NULL}')",
            ),
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "PREPARE {name} AS {statement}"
            )))
            .execute(&mut *conn)
            .await
            .unwrap();
            let lines = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("EXPLAIN EXECUTE {name}{args}")))
                .fetch_all(&mut *conn)
                .await
                .unwrap();
            let plan: Vec<String> = lines.iter().map(|r| r.get::<String, _>(0)).collect();
            plans.push(plan.join("\n"));
        }
        plans
    }
    for plan in plans(&worker_pool(&db).await).await {
        assert!(
            plan.contains("Index Scan using user_profiles_pkey") && !plan.contains("Seq Scan"),
            "{plan}"
        );
    }
    // Without the worker's settings the same statements scan the whole table.
    let plain = sea_orm::Database::connect(&db.url).await.unwrap();
    for plan in plans(&plain).await {
        assert!(plan.contains("Seq Scan on user_profiles"), "{plan}");
    }
}

/// A batch holding an event stored before stores only the others: each event once, counted once,
/// and every byte of text and JSON kept as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_store_each_event_once_and_text_exactly() {
    use worker::store::write_batch;
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    let hostile = "tab\there\nnew line \\N back\\slash \r \"quoted\" é ☃ \u{1}";
    let mut a = envelope(
        "u1",
        hostile,
        json!({"label": hostile, "n": 1.5, "nested": {"k": [hostile]}}),
    );
    a.session_id = Some("s\t1".into());
    let b = envelope("u1", "$pageview", json!({"$pathname": "/p\\q"}));
    let c = envelope("u2", "$pageview", json!({}));

    assert_eq!(
        write_batch(&pool, &Default::default(), &[stored(&a), stored(&b)], "v1")
            .await
            .unwrap()
            .stored,
        2
    );
    // b again (a redelivery) with c: only c is new
    assert_eq!(
        write_batch(&pool, &Default::default(), &[stored(&b), stored(&c)], "v1")
            .await
            .unwrap()
            .stored,
        1
    );
    assert_eq!(
        write_batch(&pool, &Default::default(), &[stored(&c)], "v1")
            .await
            .unwrap()
            .stored,
        0
    );
    assert_eq!(db.events().await, 3);
    assert_eq!(
        db.count("SELECT event_count FROM user_profiles WHERE distinct_id = 'u1'")
            .await,
        2
    );
    assert_eq!(
        db.count("SELECT event_count FROM user_profiles WHERE distinct_id = 'u2'")
            .await,
        1
    );
    let row = db
        .conn
        .query_one_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT event, session_id, properties, \"timestamp\" FROM events WHERE uuid = $1",
            [a.uuid.into()],
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.try_get_by_index::<String>(0).unwrap(), hostile);
    assert_eq!(row.try_get_by_index::<String>(1).unwrap(), "s\t1");
    let properties: serde_json::Value = row.try_get_by_index(2).unwrap();
    assert_eq!(
        properties,
        json!({"label": hostile, "n": 1.5, "nested": {"k": [hostile]}})
    );
    let timestamp: chrono::DateTime<chrono::Utc> = row.try_get_by_index(3).unwrap();
    assert_eq!(timestamp.timestamp_micros(), a.timestamp.timestamp_micros());
}

/// An event another replica is storing at the same moment (its transaction still open) is
/// stored once: this batch's insert, which takes every event for new, waits for the other,
/// fails on the stored one once the other commits, and is written again without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stored_concurrently_by_another_replica_is_stored_and_counted_once() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    use worker::store::write_batch;
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    let shared = envelope("u1", "$pageview", json!({}));
    let mine = envelope("u2", "$pageview", json!({}));
    let other = db.conn.begin().await.unwrap();
    other
        .execute_unprepared(&format!(
            "INSERT INTO events (uuid, distinct_id, event, description, \"timestamp\", received_at, rules_version) \
             VALUES ('{}', 'u1', '$pageview', 'Viewed page', now(), now(), 'v1')",
            shared.uuid
        ))
        .await
        .unwrap();
    let batch = vec![stored(&shared), stored(&mine)];
    let write =
        tokio::spawn(async move { write_batch(&pool, &Default::default(), &batch, "v1").await });
    wait_until(Duration::from_secs(10), "the batch to wait on the event", || async {
        db.count("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'").await > 0
    })
    .await;
    other.commit().await.unwrap();
    assert_eq!(
        write.await.unwrap().unwrap().stored,
        1,
        "only u2's event was new"
    );
    assert_eq!(db.events().await, 2);
    assert_eq!(
        db.count("SELECT count(*) FROM user_profiles WHERE distinct_id = 'u1'")
            .await,
        0,
        "the other replica's event is not counted by this batch"
    );
    assert_eq!(profile(&db, "u2").await.0, 1);
}

/// A batch of large events is stored whole, in one transaction: sent to Postgres' `COPY` in
/// parts, and, when it holds an event stored before, written again as several statements
/// (Postgres takes at most 1 GiB per message; the worker sends at most 32 MiB of column data per
/// statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_one_statement_is_stored_whole() {
    use worker::store::{StoredEvent, write_batch};
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    let big = "x".repeat(12 << 20);
    let events: Vec<StoredEvent> = (0..4)
        .map(|i| {
            stored(&envelope(
                &format!("u{i}"),
                "$pageview",
                json!({ "blob": big }),
            ))
        })
        .collect();
    let stored_blobs = async || {
        db.count("SELECT count(*) FROM events WHERE length(properties->>'blob') = 12582912")
            .await
    };
    assert_eq!(
        write_batch(&pool, &Default::default(), &events[..3], "v1")
            .await
            .unwrap()
            .stored,
        3
    );
    assert_eq!(stored_blobs().await, 3);
    // The same three again with a fourth: only the fourth is new.
    assert_eq!(
        write_batch(&pool, &Default::default(), &events, "v1")
            .await
            .unwrap()
            .stored,
        1
    );
    assert_eq!(stored_blobs().await, 4);
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        4
    );
}

/// A batch dropped while its `COPY` is under way (its transaction timed out, or the worker is
/// stopping) does not leave its connection to the next batch, out of step with the server (sqlx
/// tests a connection given back to the pool, and closes it): the next batch stores its events on
/// a fresh connection, though the pool holds only one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_dropped_during_its_copy_leaves_no_broken_connection() {
    use sea_orm::TransactionTrait;
    use worker::store::write_batch;
    let db = TestDb::create().await;
    let mut config = config(&db.url, &Keys::new(), "store");
    (config.database_pool_size, config.write_concurrency) = (1, 1);
    let pool = worker::store::connect(&config).await.unwrap();
    // The COPY waits for this lock, after Postgres has taken the statement.
    let blocker = db.conn.begin().await.unwrap();
    blocker
        .execute_unprepared("LOCK TABLE events IN SHARE MODE")
        .await
        .unwrap();
    let dropped = {
        let pool = pool.clone();
        let batch = vec![stored(&envelope("u1", "$pageview", json!({})))];
        tokio::spawn(async move { write_batch(&pool, &Default::default(), &batch, "v1").await })
    };
    wait_until(Duration::from_secs(10), "the COPY to wait on the lock", || async {
        db.count("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'COPY events%'").await > 0
    })
    .await;
    dropped.abort();
    assert!(dropped.await.unwrap_err().is_cancelled());
    blocker.rollback().await.unwrap();

    let next = vec![stored(&envelope("u2", "$pageview", json!({})))];
    assert_eq!(
        write_batch(&pool, &Default::default(), &next, "v1")
            .await
            .unwrap()
            .stored,
        1
    );
    assert_eq!(db.events().await, 1);
    assert_eq!(profile(&db, "u2").await.0, 1);
}

/// `envelope` ready to store, with one "purchase" intent hit of `weight`.
fn with_intent(envelope: &entity::Envelope, weight: f64) -> worker::store::StoredEvent {
    let mut event = stored(envelope);
    event.intents = vec![rules_engine::enrich::IntentHit {
        name: "purchase".into(),
        weight,
        summary: "User showing Purchase Intent.".into(),
        half_life_secs: 0.0,
    }];
    event
}

/// The stored profile of `user`: (event_count, session_count, intents, person_properties).
async fn profile(
    db: &TestDb,
    user: &str,
) -> (i64, i64, serde_json::Value, Option<serde_json::Value>) {
    let row = user_profile::Entity::find_by_id(user)
        .one(&db.conn)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no profile for {user}"));
    (
        row.event_count,
        row.session_count,
        row.intents,
        row.person_properties,
    )
}

/// Intents and person properties merge into the stored ones batch after batch, and a batch
/// without any keeps them; counts add up for users with and without details alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_merge_details_batch_after_batch() {
    use worker::store::{KnownProfiles, write_batch};
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    // One replica's memory of the profiles it stored: the later batches skip creating them.
    let known = KnownProfiles::default();
    let mut first = envelope("u1", "$pageview", json!({"$set": {"plan": "free"}}));
    first.session_id = Some("s1".into());
    let plain = envelope("u2", "$pageview", json!({}));
    write_batch(
        &pool,
        &known,
        &[with_intent(&first, 2.0), stored(&plain)],
        "v1",
    )
    .await
    .unwrap();

    let second = envelope(
        "u1",
        "$pageview",
        json!({"$set": {"plan": "pro"}, "$set_once": {"plan": "x", "source": "ad"}}),
    );
    let again = envelope("u2", "$pageleave", json!({}));
    write_batch(
        &pool,
        &known,
        &[with_intent(&second, 1.0), stored(&again)],
        "v1",
    )
    .await
    .unwrap();
    // No details in this batch at all: the stored ones stay.
    let third = envelope("u1", "$pageleave", json!({}));
    write_batch(&pool, &known, &[stored(&third)], "v1")
        .await
        .unwrap();

    let (events, sessions, intents, person) = profile(&db, "u1").await;
    assert_eq!((events, sessions), (3, 1));
    assert_eq!(intents["purchase"]["score"], 3.0, "{intents}");
    assert_eq!(intents["purchase"]["count"], 2, "{intents}");
    assert_eq!(person, Some(json!({"plan": "pro", "source": "ad"})));
    let (events, _, intents, person) = profile(&db, "u2").await;
    assert_eq!((events, intents, person), (2, json!({}), None));
}

/// A batch merges the intents it hits into the stored ones: the user's other intents stay as they
/// were, and a batch that only sets person properties keeps them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_merges_the_intents_it_hits_and_keeps_the_others() {
    use worker::store::{KnownProfiles, write_batch};
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    let known = KnownProfiles::default();
    let hits = |envelope: &entity::Envelope, names: &[(&str, f64)]| {
        let mut event = stored(envelope);
        event.intents = names
            .iter()
            .map(|&(name, weight)| rules_engine::enrich::IntentHit {
                name: name.into(),
                weight,
                summary: format!("User showing {name} intent.").into(),
                half_life_secs: 0.0,
            })
            .collect();
        event
    };
    let first = envelope("u1", "$pageview", json!({}));
    write_batch(
        &pool,
        &known,
        &[hits(&first, &[("purchase", 2.0), ("churn", 1.0)])],
        "v1",
    )
    .await
    .unwrap();
    let churn_before = profile(&db, "u1").await.2["churn"].clone();

    let second = envelope("u1", "$pageview", json!({}));
    write_batch(&pool, &known, &[hits(&second, &[("purchase", 1.0)])], "v1")
        .await
        .unwrap();
    let third = envelope("u1", "$pageview", json!({"$set": {"plan": "pro"}}));
    write_batch(&pool, &known, &[stored(&third)], "v1")
        .await
        .unwrap();

    let (events, _, intents, person) = profile(&db, "u1").await;
    assert_eq!(events, 3);
    assert_eq!(intents["purchase"]["score"], 3.0, "{intents}");
    assert_eq!(intents["purchase"]["count"], 2, "{intents}");
    assert_eq!(intents["churn"], churn_before, "{intents}");
    assert_eq!(intents["churn"]["count"], 1, "{intents}");
    assert_eq!(person, Some(json!({"plan": "pro"})));
}

/// Profiles erased (by the api) after a replica stored them are created again by its next
/// batches, though it remembers them as stored: with details and without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_erased_after_a_replica_stored_them_are_created_again() {
    use sea_orm::ConnectionTrait;
    use worker::store::{KnownProfiles, write_batch};
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    let known = KnownProfiles::default();
    let mut first = envelope("u1", "$pageview", json!({"$set": {"plan": "free"}}));
    first.session_id = Some("s1".into());
    let mut other = envelope("u2", "$pageview", json!({}));
    other.session_id = Some("s2".into());
    write_batch(
        &pool,
        &known,
        &[with_intent(&first, 2.0), stored(&other)],
        "v1",
    )
    .await
    .unwrap();
    for table in ["events", "user_sessions", "user_profiles"] {
        db.conn
            .execute_unprepared(&format!("DELETE FROM {table}"))
            .await
            .unwrap();
    }

    // u1 again with details (locked, found missing, created); u2 in a batch without any
    // (created by the upsert of the counts). Their sessions are new again.
    let mut again = envelope("u1", "$pageview", json!({}));
    again.session_id = Some("s1".into());
    write_batch(&pool, &known, &[with_intent(&again, 1.0)], "v1")
        .await
        .unwrap();
    let mut other_again = envelope("u2", "$pageleave", json!({}));
    other_again.session_id = Some("s2".into());
    write_batch(&pool, &known, &[stored(&other_again)], "v1")
        .await
        .unwrap();

    let (events, sessions, intents, person) = profile(&db, "u1").await;
    assert_eq!((events, sessions), (1, 1));
    assert_eq!(intents["purchase"]["score"], 1.0, "{intents}");
    assert_eq!(intents["purchase"]["count"], 1, "{intents}");
    assert_eq!(person, None);
    let (events, sessions, intents, _) = profile(&db, "u2").await;
    assert_eq!((events, sessions, intents), (1, 1, json!({})));
}

/// A profile another replica creates after this batch looked for it (so this batch inserts
/// it too and meets the other's row) gets both batches' counts and details.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_created_concurrently_by_another_replica_merges_both() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    use worker::store::write_batch;
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    // Another replica's open transaction has created u1 with one intent.
    let other = db.conn.begin().await.unwrap();
    other
        .execute_unprepared(
            r#"INSERT INTO user_profiles (distinct_id, first_seen, last_seen, event_count, session_count, intents, person_properties)
               VALUES ('u1', now(), now(), 4, 1, '{"purchase": {"score": 5.0, "last_seen": "2026-01-01T00:00:00Z", "evidence": ["Viewed page: /pricing"], "summary": "User showing Purchase Intent.", "half_life_secs": 0.0, "count": 4}}', '{"plan": "team"}')"#,
        )
        .await
        .unwrap();
    let mut mine = envelope(
        "u1",
        "$pageview",
        json!({"$set_once": {"plan": "free", "source": "ad"}}),
    );
    mine.timestamp = "2026-06-01T00:00:00Z".parse().unwrap();
    let batch = vec![
        with_intent(&mine, 1.0),
        stored(&envelope("u2", "$pageview", json!({}))),
    ];
    let write =
        tokio::spawn(async move { write_batch(&pool, &Default::default(), &batch, "v1").await });
    // This batch's insert of u1's profile now waits for the other transaction.
    wait_until(Duration::from_secs(10), "the batch to wait on u1", || async {
        db.count("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'").await > 0
    })
    .await;
    other.commit().await.unwrap();
    assert_eq!(write.await.unwrap().unwrap().stored, 2);

    let (events, sessions, intents, person) = profile(&db, "u1").await;
    assert_eq!((events, sessions), (5, 1));
    assert_eq!(intents["purchase"]["score"], 6.0, "{intents}");
    assert_eq!(intents["purchase"]["count"], 5, "{intents}");
    assert_eq!(person, Some(json!({"plan": "team", "source": "ad"})));
    assert_eq!(profile(&db, "u2").await.0, 1);
}

/// Replicas writing overlapping users at once, some batches with intents and some without, new
/// and existing users and sessions mixed: every batch commits (no deadlock between them) and
/// every event is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_over_the_same_users_do_not_deadlock() {
    use worker::store::write_batch;
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    let (writers, batches, per_batch) = (4, 15, 12);
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                // Each writer a replica, remembering the profiles it stored.
                let known = worker::store::KnownProfiles::default();
                for b in 0..batches {
                    let events: Vec<_> = (0..per_batch)
                        .map(|i| {
                            // Users spread so batches overlap; later batches bring new users.
                            let user = format!("u{:03}", (w * 7 + b * 5 + i * 3) % (20 + b * 4));
                            let mut e = envelope(&user, "$pageview", json!({}));
                            if i % 2 == 0 {
                                e.session_id = Some(format!("s{}", (b + i) % 3));
                            }
                            // Half the batches carry intents (on two events in three), the
                            // others none at all.
                            if (w + b) % 2 == 0 && i % 3 != 0 {
                                with_intent(&e, 1.0)
                            } else {
                                stored(&e)
                            }
                        })
                        .collect();
                    write_batch(&pool, &known, &events, "v1")
                        .await
                        .unwrap_or_else(|e| panic!("writer {w} batch {b}: {e}"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let total = (writers * batches * per_batch) as i64;
    assert_eq!(db.events().await, total);
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        total
    );
    // Each session counted once, on its user's profile.
    assert_eq!(
        db.count("SELECT sum(session_count)::bigint FROM user_profiles")
            .await,
        db.count("SELECT count(*) FROM user_sessions").await
    );
    // Each intent hit counted once.
    let hits = (0..writers)
        .flat_map(|w| (0..batches).map(move |b| (w, b)))
        .filter(|(w, b)| (w + b) % 2 == 0)
        .count()
        * (0..per_batch).filter(|i| i % 3 != 0).count();
    assert_eq!(
        db.count("SELECT sum((intents->'purchase'->>'count')::bigint)::bigint FROM user_profiles")
            .await,
        hits as i64
    );
}

/// Events of `bytes` bytes of envelope JSON each (a `blob` property fills them).
fn weighing(users: usize, count: usize, bytes: usize) -> Vec<entity::Envelope> {
    (0..count)
        .map(|i| {
            let mut e = envelope(&format!("u{}", i % users), "upload", json!({"blob": ""}));
            let blob = bytes.saturating_sub(e.to_json().len());
            e.properties.insert("blob".into(), json!("x".repeat(blob)));
            e
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_are_stored_once_without_holding_more_than_the_read_ahead_budget() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    // Events just under MAX_EVENT_BYTES (1 MiB); the budget holds three.
    let events = weighing(3, 16, 1_000_000);
    assert!(events.iter().all(|e| e.to_json().len() <= 1 << 20));
    publish(&redis, &keys.stream, &events).await;
    let mut cfg = config(&db.url, &keys, "w");
    cfg.max_event_bytes = 1 << 20;
    cfg.read_ahead_bytes = 3 * (1 << 20) + 64 * 1024;
    let budget = cfg.read_ahead_bytes as i64;
    let (worker, metrics) = RunningWorker::start_observed(cfg);
    wait_until(WAIT, "16 events stored, nothing pending", || async {
        db.events().await == 16
            && xlen(&redis, &keys.stream).await == 0
            && pending(&redis, &keys).await == 0
    })
    .await;
    worker.stop().await.unwrap();

    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        16,
        "each counted once"
    );
    assert_eq!(
        db.count("SELECT min(length(properties->>'blob'))::bigint FROM events")
            .await,
        events[0].properties["blob"].as_str().unwrap().len() as i64,
        "stored whole"
    );
    assert_eq!(xlen(&redis, &keys.dlq).await, 0);
    let peak = metrics.read_ahead_peak_bytes.get();
    assert!(
        (1_000_000..=budget).contains(&peak),
        "held at most READ_AHEAD_BYTES ({budget}) at once: {peak}"
    );
    assert_eq!(metrics.read_ahead_bytes.get(), 0, "all finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_the_whole_read_ahead_budget_is_stored_not_stuck() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    // Queued before the api refused events over MAX_EVENT_BYTES: 1 MB, with a 64 KiB limit and a
    // 128 KiB budget, between events of an ordinary size.
    let mut events = vec![envelope("u1", "click", json!({}))];
    events.extend(weighing(1, 1, 1_000_000));
    events.push(envelope("u2", "click", json!({})));
    publish(&redis, &keys.stream, &events).await;
    let mut cfg = config(&db.url, &keys, "w");
    cfg.max_event_bytes = 64 * 1024;
    cfg.read_ahead_bytes = 128 * 1024;
    let (worker, metrics) = RunningWorker::start_observed(cfg);
    wait_until(WAIT, "3 events stored, nothing pending", || async {
        db.events().await == 3
            && xlen(&redis, &keys.stream).await == 0
            && pending(&redis, &keys).await == 0
    })
    .await;
    worker.stop().await.unwrap();
    assert_eq!(xlen(&redis, &keys.dlq).await, 0);
    assert!(metrics.read_ahead_peak_bytes.get() >= 1_000_000);
    assert_eq!(metrics.read_ahead_bytes.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_stream_keeps_its_newest_dlq_maxlen_entries() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let mut poison = Vec::new();
    for i in 0..5 {
        let event = format!("{{not json {i}");
        poison.push(publish_raw(&redis, &keys.stream, &[("v", "1"), ("event", &event)]).await);
    }
    let mut cfg = config(&db.url, &keys, "w");
    cfg.dlq_maxlen = 3;
    let (worker, metrics) = RunningWorker::start_observed(cfg);
    wait_until(WAIT, "5 dead-lettered, nothing pending", || async {
        metrics
            .dead_lettered
            .with_label_values(&["undecodable"])
            .get()
            == 5
            && pending(&redis, &keys).await == 0
    })
    .await;
    worker.stop().await.unwrap();

    assert_eq!(xlen(&redis, &keys.dlq).await, 3);
    assert_eq!(
        metrics.dead_letters_trimmed.get(),
        2,
        "the two oldest removed"
    );
    let mut kept: Vec<String> = dead_letters(&redis, &keys)
        .list(10)
        .await
        .unwrap()
        .iter()
        .map(|l| l.field(dlq::FIELD_ENTRY_ID).unwrap())
        .collect();
    kept.sort();
    assert_eq!(kept, poison[2..], "the newest three kept");
}
