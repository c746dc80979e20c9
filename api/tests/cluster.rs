//! The pipeline on a Redis Cluster (`REDIS_CLUSTER=true`, a local three-master cluster shared by
//! this process's tests): a request's events queued with one MULTI per shard, each user's in order
//! in one shard, stored once; a retired shard drained; erasure, the DLQ tools and the unmatched
//! report on the cluster; shards owned by one replica each; a request whose shards were queued
//! only in part (a shard's MULTI refused, or its master stalled) answers 503, and its retry stores
//! each event once; an api started before the cluster answers queues once it does.

mod common;

use std::time::Duration;

use common::{
    RequestExt, SECRET, TestApp, WAIT, interleaved_batch, redis_cluster, test_config, wait_until,
};
use infra::{redis::RedisConn, shards::StreamShards};
use reqwest::StatusCode;
use serde_json::{Value, json};

const SHARDS: usize = 4;

/// The api's config on the cluster: `None` where the cluster cannot run (see [`redis_cluster`]).
fn cluster_config() -> Option<api::Config> {
    let cluster = redis_cluster()?;
    let mut config = test_config();
    config.redis_url = cluster.redis_url();
    config.redis_cluster = true;
    config.stream_shards = SHARDS;
    Some(config)
}

/// Held shared by every test on the cluster, and alone by the one that stalls a node.
static STALLS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn cluster_connection() -> RedisConn {
    redis_cluster()
        .expect("the cluster runs")
        .connection()
        .await
}

fn shards_of(app: &TestApp) -> StreamShards {
    StreamShards::new(&app.config.queue_name, SHARDS)
}

async fn shards_empty(redis: &RedisConn, shards: &StreamShards) -> bool {
    for key in shards.keys() {
        if common::xlen(redis, key).await != 0 {
            return false;
        }
    }
    true
}

/// The node (`host:port`) serving `key`'s hash slot.
async fn node_of(redis: &RedisConn, key: &str) -> String {
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    // [[start, end, [host, port, …], …], …]
    let raw: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    let redis::Value::Array(ranges) = raw else {
        panic!("CLUSTER SLOTS: {raw:?}")
    };
    for range in ranges {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let (redis::Value::Int(start), redis::Value::Int(end)) = (&parts[0], &parts[1]) else {
            continue;
        };
        if (*start..=*end).contains(&slot)
            && let redis::Value::Array(node) = &parts[2]
            && let (redis::Value::BulkString(host), redis::Value::Int(port)) = (&node[0], &node[1])
        {
            return format!("{}:{port}", String::from_utf8_lossy(host));
        }
    }
    panic!("no node serves slot {slot}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_several_shards_reaches_the_context_in_order_and_once_on_a_cluster() {
    let Some(config) = cluster_config() else {
        return;
    };
    let _shared = STALLS.read().await;
    let (app, db) = TestApp::spawn_with_db(config).await;
    let shards = shards_of(&app);
    let redis = cluster_connection().await;
    let resp = app
        .post("/batch")
        .key(SECRET)
        .json(&interleaved_batch())
        .answer()
        .await;
    assert_eq!(resp.status(), StatusCode::OK);

    let mut nodes = std::collections::BTreeSet::new();
    for key in shards.keys() {
        let envelopes = common::envelopes(&redis, key).await;
        if !envelopes.is_empty() {
            nodes.insert(node_of(&redis, key).await);
        }
        let mut last: std::collections::HashMap<String, i64> = Default::default();
        for e in &envelopes {
            assert_eq!(shards.key_of(&e.distinct_id), key, "{}", e.distinct_id);
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
    assert!(
        nodes.len() > 1,
        "the request's shards spread over several masters: {nodes:?}"
    );
    let (status, ready) = app.ready().await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(
        app.metrics().await.value("clickstream_stream_length"),
        40.0,
        "the backlog sums every shard of the cluster"
    );

    // Two events left in the unsharded key (queued under STREAM_SHARDS=1): a retired shard,
    // drained by the worker's sweep of the cluster.
    let retired = [
        common::envelope("retired-user", "e", json!({})),
        common::envelope("retired-user", "e", json!({})),
    ];
    common::publish(&redis, &app.config.queue_name, &retired).await;

    let worker = app.start_worker(&db, "cluster");
    wait_until(WAIT, "every event stored", || async {
        db.events().await == 42
    })
    .await;
    wait_until(WAIT, "every shard acknowledged and emptied", || async {
        shards_empty(&redis, &shards).await
            && common::xlen(&redis, &app.config.queue_name).await == 0
    })
    .await;
    let (status, body) = app.context("user-3").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stats"]["event_count"], 5, "{body}");
    assert_eq!(body["freshness"]["pending_events"], 0, "{body}");
    assert_eq!(
        db.count("SELECT count(DISTINCT uuid) FROM events").await,
        42
    );

    // Erasure (stored rows, dead letters, the unmatched report) and the DLQ tools on a cluster.
    let resp = app
        .delete("/context/user/user-3")
        .key(SECRET)
        .answer()
        .await;
    assert_eq!(resp.status(), StatusCode::OK, "{:?}", resp.text().await);
    let letter = common::envelope("replayed-user", "e", json!({}));
    common::publish_raw(
        &redis,
        &app.config.dlq_name,
        &[("v", "1"), ("event", letter.to_json().as_str())],
    )
    .await;
    let replayed =
        infra::dlq::DeadLetters::new(redis.clone(), &app.config.dlq_name, shards.clone())
            .replay(&infra::dlq::Selection::All)
            .await
            .unwrap();
    assert_eq!(replayed.replayed.len(), 1);
    assert_eq!(replayed.replayed[0].1, shards.key_of("replayed-user"));
    wait_until(WAIT, "the replayed letter stored", || async {
        db.events().await == 38
    })
    .await;
    assert_eq!(common::xlen(&redis, &app.config.dlq_name).await, 0);
    // `worker dlq list`, as an operator runs it against the cluster.
    let cli = common::worker_config(&app.config, &db.url, "cli");
    let list = worker::cli::DlqCommand::List { limit: 10 };
    let exit = worker::cli::dlq(&cli, &list).await.unwrap();
    assert_eq!(exit, std::process::ExitCode::SUCCESS);

    // The unmatched-events report (two keys in one slot, one transaction) and the start-up check
    // of the Redis settings reach the cluster too.
    wait_until(WAIT, "the worker's unmatched shapes reported", || async {
        let report = app.get("/rules/unmatched").key(SECRET).answer_json().await;
        report["total_shapes"].as_u64() > Some(0)
    })
    .await;
    wait_until(WAIT, "the Redis settings read from a node", || async {
        app.metrics()
            .await
            .contains("clickstream_redis_config_unsafe{setting=\"persistence\"}")
    })
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_is_owned_by_one_replica_on_a_cluster() {
    let Some(config) = cluster_config() else {
        return;
    };
    let _shared = STALLS.read().await;
    let (app, db) = TestApp::spawn_with_db(config).await;
    let shards = shards_of(&app);
    let redis = cluster_connection().await;
    let replica = |name: &str| {
        let mut config = common::worker_config(&app.config, &db.url, "owners");
        config.worker_name = name.to_string();
        config.shard_lease = Duration::from_secs(1);
        app.start_worker_with(config)
    };
    let owners = async || {
        let mut owners = Vec::new();
        for shard in 0..SHARDS {
            let owner: Option<String> = redis::cmd("GET")
                .arg(shards.lease_key(shard, "owners"))
                .query_async(&mut redis.clone())
                .await
                .unwrap();
            owners.push(owner);
        }
        owners
    };
    let a = replica("a");
    let b = replica("b");
    wait_until(WAIT, "the shards dealt out two and two", || async {
        let owners = owners().await;
        let held = |n: &str| owners.iter().filter(|o| o.as_deref() == Some(n)).count();
        held("a") == 2 && held("b") == 2
    })
    .await;
    for _ in 0..3 {
        let resp = app
            .post("/batch")
            .key(SECRET)
            .json(&interleaved_batch())
            .answer()
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    wait_until(WAIT, "120 events stored", || async {
        db.events().await == 120
    })
    .await;
    a.stop().await;
    b.stop().await;
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        120,
        "each event counted once"
    );
    assert!(shards_empty(&redis, &shards).await);
    assert_eq!(
        owners().await,
        vec![None; SHARDS],
        "leases released on stop"
    );
}

/// A batch of one event for each shard, of a user placed there (ids `{prefix}N`), every event
/// with its own uuid (as the SDKs send them).
fn one_event_per_shard(shards: &StreamShards, prefix: &str) -> Vec<Value> {
    let users: Vec<String> = (0..SHARDS)
        .map(|shard| {
            (0..)
                .map(|i| format!("{prefix}{i}"))
                .find(|u| shards.shard_of(u) == shard)
                .unwrap()
        })
        .collect();
    users
        .iter()
        .map(|u| json!({"event": "e", "distinct_id": u, "uuid": uuid::Uuid::now_v7()}))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_queued_in_part_answers_503_and_its_retry_stores_each_event_once() {
    let Some(config) = cluster_config() else {
        return;
    };
    let _shared = STALLS.read().await;
    let (app, db) = TestApp::spawn_with_db(config).await;
    let shards = shards_of(&app);
    let redis = cluster_connection().await;
    let batch = one_event_per_shard(&shards, "u");
    // Shard 2's key is not a stream: its MULTI fails, the other shards' commit.
    let broken = shards.key(2).to_string();
    let () = redis::cmd("SET")
        .arg(&broken)
        .arg("not a stream")
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    let resp = app.post("/batch").key(SECRET).json(&batch).answer().await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("2")
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "queue_partially_written", "{body}");
    assert_eq!(body["type"], "unavailable", "{body}");
    for shard in [0, 1, 3] {
        assert_eq!(
            common::xlen(&redis, shards.key(shard)).await,
            1,
            "shard {shard}"
        );
    }

    let () = redis::cmd("DEL")
        .arg(&broken)
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    let resp = app.post("/batch").key(SECRET).json(&batch).answer().await;
    assert_eq!(resp.status(), StatusCode::OK, "the retry is queued whole");
    let worker = app.start_worker(&db, "partial");
    wait_until(WAIT, "every shard stored and emptied", || async {
        db.events().await == 4 && shards_empty(&redis, &shards).await
    })
    .await;
    worker.stop().await;
    assert_eq!(db.events().await, 4, "each event stored once");
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        4,
        "each event counted once"
    );
}

#[tokio::test]
async fn redis_down_on_every_shard_answers_the_usual_503() {
    let Some(mut config) = cluster_config() else {
        return;
    };
    // Seeds nothing listens on: nothing can be queued.
    config.redis_url = format!("redis://{}", common::closed_addr());
    config.redis_timeout = Duration::from_millis(500);
    let app = TestApp::spawn_with(config).await;
    let resp = app
        .post("/capture")
        .key(SECRET)
        .json(&json!({"event": "e", "distinct_id": "u"}))
        .answer()
        .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "queue_unavailable", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_whose_node_stalls_answers_503_and_the_retry_stores_each_event_once() {
    let Some(mut config) = cluster_config() else {
        return;
    };
    config.redis_timeout = Duration::from_millis(300);
    let _alone = STALLS.write().await;
    let (app, db) = TestApp::spawn_with_db(config).await;
    let shards = shards_of(&app);
    let redis = cluster_connection().await;
    let batch = one_event_per_shard(&shards, "s");
    // Shard 2's master takes no writes for a while: its shards time out, the others commit.
    let stalled = node_of(&redis, shards.key(2)).await;
    let mut on_stalled = Vec::new();
    for shard in 0..SHARDS {
        on_stalled.push(node_of(&redis, shards.key(shard)).await == stalled);
    }
    assert!(
        on_stalled.contains(&false),
        "some shard on another master: {on_stalled:?}"
    );
    let mut node = redis::Client::open(format!("redis://{stalled}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1_500)
        .arg("WRITE")
        .query_async(&mut node)
        .await
        .unwrap();
    let resp = app.post("/batch").key(SECRET).json(&batch).answer().await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "queue_partially_written", "{body}");
    for (shard, stalled) in on_stalled.iter().enumerate() {
        if !stalled {
            assert_eq!(
                common::xlen(&redis, shards.key(shard)).await,
                1,
                "shard {shard}"
            );
        }
    }

    // The SDK retries once the node answers; the stalled appends may land as well (they were
    // sent): the stream may hold an event twice, storage holds it once.
    let () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut node)
        .await
        .unwrap();
    let resp = app.post("/batch").key(SECRET).json(&batch).answer().await;
    assert_eq!(resp.status(), StatusCode::OK, "the retry is queued whole");
    let worker = app.start_worker(&db, "stalled");
    wait_until(WAIT, "every shard stored and emptied", || async {
        db.events().await == 4 && shards_empty(&redis, &shards).await
    })
    .await;
    worker.stop().await;
    assert_eq!(db.events().await, 4, "each event stored once");
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        4,
        "each event counted once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_started_while_the_cluster_is_unreachable_queues_once_it_answers() {
    let Some(mut config) = cluster_config() else {
        return;
    };
    let _shared = STALLS.read().await;
    // The one seed is a proxy, down at start; once up, the client learns the nodes through it.
    let seed = &redis_cluster().expect("the cluster runs").nodes[0];
    let proxy = common::Proxy::to(seed.trim_start_matches("redis://").to_string(), false).await;
    config.redis_url = proxy.url(seed);
    config.redis_timeout = Duration::from_millis(500);
    let app = TestApp::spawn_with(config).await;
    let event = json!({"event": "e", "distinct_id": "late"});
    let resp = app.post("/capture").key(SECRET).json(&event).answer().await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.ready().await.0, StatusCode::SERVICE_UNAVAILABLE);

    proxy.set_up(true);
    wait_until(WAIT, "ingest queues once the cluster answers", || async {
        let resp = app.post("/capture").key(SECRET).json(&event).answer().await;
        resp.status() == StatusCode::OK
    })
    .await;
    assert_eq!(app.ready().await.0, StatusCode::OK);
}
