//! A sharded stream (`STREAM_SHARDS` > 1): each user's events in their own shard, in order; the
//! backlog, freshness and queue metrics summed over the shards; a worker storing every shard;
//! dead letters replayed to their user's shard.

mod common;

use std::time::Duration;

use api::ingest::publish::Publisher;
use common::{RequestExt, SECRET, TestApp, WAIT, interleaved_batch, test_config, wait_until};
use infra::shards::StreamShards;
use reqwest::StatusCode;
use serde_json::{Value, json};

const SHARDS: usize = 4;

fn sharded_config() -> api::Config {
    let mut config = test_config();
    config.stream_shards = SHARDS;
    config
}

fn shards_of(app: &TestApp) -> StreamShards {
    StreamShards::new(&app.config.queue_name, SHARDS)
}

#[tokio::test]
async fn a_users_events_go_to_their_shard_in_order_and_a_worker_stores_every_shard() {
    let (app, db) = TestApp::spawn_with_db(sharded_config()).await;
    let shards = shards_of(&app);
    let resp = app
        .post("/batch")
        .key(SECRET)
        .json(&interleaved_batch())
        .answer()
        .await;
    assert_eq!(resp.status(), StatusCode::OK);

    let redis = common::redis().await;
    assert_eq!(
        common::xlen(&redis, &app.config.queue_name).await,
        0,
        "with several shards the unsharded key is not written"
    );
    let mut used = 0;
    for key in shards.keys() {
        let envelopes = common::envelopes(&redis, key).await;
        used += usize::from(!envelopes.is_empty());
        let mut last: std::collections::HashMap<String, i64> = Default::default();
        for e in &envelopes {
            assert_eq!(
                shards.key_of(&e.distinct_id),
                key,
                "{} in {key}",
                e.distinct_id
            );
            let n = e.properties["n"].as_i64().unwrap();
            let previous = last.insert(e.distinct_id.clone(), n);
            assert_eq!(
                previous.map_or(0, |p| p + 1),
                n,
                "{}'s order",
                e.distinct_id
            );
        }
    }
    assert!(used > 1, "eight users spread over more than one shard");

    let metrics = app.metrics().await;
    assert_eq!(metrics.value("clickstream_stream_length"), 40.0);

    let worker = app.start_worker(&db, "sharded");
    wait_until(WAIT, "every event of every shard stored", || async {
        db.events().await == 40
    })
    .await;
    wait_until(WAIT, "every shard acknowledged and emptied", || async {
        let mut left = 0;
        for key in shards.keys() {
            left += common::xlen(&redis, key).await;
        }
        left == 0
    })
    .await;
    let (status, body) = app.context("user-3").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stats"]["event_count"], 5, "{body}");
    assert_eq!(body["freshness"]["pending_events"], 0, "{body}");
    worker.stop().await;
}

#[tokio::test]
async fn the_backlog_bound_and_freshness_count_every_shard() {
    let mut config = sharded_config();
    config.stream_max_backlog = 5;
    let app = TestApp::spawn_with(config).await;
    let shards = shards_of(&app);
    let redis = common::redis().await;
    // Three entries in each of two shards: no shard is over the bound, their sum is.
    for key in &shards.keys()[..2] {
        for _ in 0..3 {
            common::publish_raw(&redis, key, &[("v", "1"), ("event", "{}")]).await;
        }
    }
    let event = json!({"event": "a", "distinct_id": "u"});
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let resp = loop {
        let resp = app.post("/capture").key(SECRET).json(&event).answer().await;
        if resp.status() != StatusCode::OK || tokio::time::Instant::now() > deadline {
            break resp;
        }
    };
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "backlog_full", "{body}");

    // A user's waiting events are counted in their shard alone; the backlog is every shard's.
    let publisher = Publisher::new(
        &app.config.redis_client().unwrap(),
        shards.clone(),
        Duration::from_secs(2),
        1_000,
    )
    .unwrap();
    let mine = (0..)
        .map(|i| format!("u{i}"))
        .find(|u| shards.shard_of(u) == 2)
        .unwrap();
    let envelope = common::envelope(&mine, "e", json!({}));
    common::publish(&redis, shards.key(2), &[envelope.clone(), envelope]).await;
    let mut total = 0;
    for key in shards.keys() {
        total += common::xlen(&redis, key).await as u64;
    }
    assert!(
        total >= 8,
        "six filler entries, the captures accepted, two of {mine}"
    );
    let pending = publisher.pending_for_users(&[mine.as_str()]).await.unwrap();
    assert_eq!(pending.backlog, total);
    assert_eq!(pending.for_user, Some(2));
}

#[tokio::test]
async fn dead_letters_are_replayed_to_their_users_shard() {
    let app = TestApp::spawn_with(sharded_config()).await;
    let shards = shards_of(&app);
    let redis = common::redis().await;
    let mut keys = common::Keys::adopt(app.keys.stream.clone(), app.keys.dlq.clone());
    keys.shards = SHARDS;
    let envelope = common::envelope("replayed-user", "e", json!({}));
    let json = envelope.to_json();
    // Dead-lettered while the stream had one shard (its source the unsharded key).
    common::publish_raw(
        &redis,
        &app.keys.dlq,
        &[
            ("v", "1"),
            ("event", json.as_str()),
            ("dlq_source", app.config.queue_name.as_str()),
            ("dlq_entry_id", "1-0"),
        ],
    )
    .await;
    let report = common::dead_letters(&redis, &keys)
        .replay(&infra::dlq::Selection::All)
        .await
        .unwrap();
    assert_eq!(report.replayed.len(), 1);
    assert_eq!(report.replayed[0].1, shards.key_of("replayed-user"));
    let there = common::envelopes(&redis, shards.key_of("replayed-user")).await;
    assert_eq!(there.len(), 1);
    assert_eq!(there[0].uuid, envelope.uuid);
}

#[tokio::test]
async fn the_backlog_bound_freshness_and_metrics_count_the_shards_of_an_earlier_count() {
    let mut config = sharded_config();
    config.stream_max_backlog = 5;
    let queue = config.queue_name.clone();
    let redis = common::redis().await;
    // Six events queued while the stream had one shard (its key `QUEUE_NAME`), none since: the
    // shards in use are empty, the retired one is over the bound.
    let earlier = StreamShards::new(&queue, 1);
    for _ in 0..6 {
        common::publish(
            &redis,
            earlier.key(0),
            &[common::envelope("old", "e", json!({}))],
        )
        .await;
    }
    let app = TestApp::spawn_with(config).await;
    let event = json!({"event": "a", "distinct_id": "u"});
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut accepted = 0;
    let resp = loop {
        let resp = app.post("/capture").key(SECRET).json(&event).answer().await;
        if resp.status() != StatusCode::OK || tokio::time::Instant::now() > deadline {
            break resp;
        }
        accepted += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "backlog_full", "{body}");
    // Accepted only before the monitor's first sample (the in-use shards alone are under 5).
    assert!(accepted <= 5, "{accepted} accepted");
    // Six, and the captures accepted if the sample was taken after them.
    let counted: u64 = body["detail"]
        .as_str()
        .and_then(|d| d.strip_prefix("stream backlog is "))
        .and_then(|d| d.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no backlog in {body}"));
    assert!(
        (6..=6 + accepted).contains(&counted),
        "the retired shard's six counted: {body}"
    );

    let metrics = app.metrics().await;
    let in_use: i64 = {
        let mut n = 0;
        for key in shards_of(&app).keys() {
            n += common::xlen(&redis, key).await;
        }
        n
    };
    assert_eq!(
        metrics.value("clickstream_stream_length"),
        (6 + in_use) as f64,
        "the stream length counts the retired shard"
    );

    // A user's waiting events cannot be counted while an earlier count's shards hold entries
    // (which one held theirs depends on that count); the backlog includes them.
    let publisher = Publisher::new(
        &app.config.redis_client().unwrap(),
        shards_of(&app),
        Duration::from_secs(2),
        1_000,
    )
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let monitor = publisher.spawn_backlog_monitor(stop.clone());
    let pending = async {
        loop {
            let pending = publisher.pending_for_users(&["old"]).await.unwrap();
            if pending.backlog >= 6 {
                return pending;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let pending = tokio::time::timeout(WAIT, pending).await.unwrap();
    assert_eq!(pending.backlog, 6 + in_use as u64);
    assert_eq!(pending.for_user, None);
    stop.cancel();
    monitor.await.unwrap();
}
