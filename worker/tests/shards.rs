//! Shards owned, not shared (`STREAM_SHARDS` > 1): each shard read by one replica at a time, a
//! user's events described by one replica and in order, shards handed over when a replica joins
//! or stops, and taken over (with their pending entries) when one dies.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use entity::Envelope;
use infra::shards::StreamShards;
use rules_engine::enrich::{Describer, EnrichError, Enricher, Enrichment, NoRules};
use serde_json::json;

const SHARDS: usize = 4;

/// Every event described, in the order described: (replica, user, `n`).
#[derive(Default, Clone)]
struct Journal(Arc<Mutex<Vec<(String, String, i64)>>>);

struct Journaling {
    replica: String,
    journal: Journal,
}

impl Describer for Journaling {
    fn version(&self) -> &str {
        "journal"
    }

    fn enrich(&self, event: &Envelope) -> Result<Enrichment, EnrichError> {
        let n = event.properties["n"].as_i64().unwrap_or(-1);
        self.journal
            .0
            .lock()
            .unwrap()
            .push((self.replica.clone(), event.distinct_id.clone(), n));
        NoRules.enrich(event)
    }
}

struct JournalingEnricher(Arc<Journaling>);

impl Enricher for JournalingEnricher {
    fn describer(&self) -> Arc<dyn Describer> {
        self.0.clone()
    }
}

impl Journal {
    fn enricher(&self, replica: &str) -> Arc<dyn Enricher> {
        Arc::new(JournalingEnricher(Arc::new(Journaling {
            replica: replica.to_string(),
            journal: self.clone(),
        })))
    }

    /// Each user's `n`s in the order described, and the replicas that described them.
    fn by_user(&self) -> BTreeMap<String, (Vec<i64>, Vec<String>)> {
        let mut users: BTreeMap<String, (Vec<i64>, Vec<String>)> = BTreeMap::new();
        for (replica, user, n) in self.0.lock().unwrap().iter() {
            let (ns, replicas) = users.entry(user.clone()).or_default();
            ns.push(*n);
            if !replicas.contains(replica) {
                replicas.push(replica.clone());
            }
        }
        users
    }
}

fn sharded_keys() -> Keys {
    let mut keys = Keys::new();
    keys.shards = SHARDS;
    keys
}

fn shards_of(keys: &Keys) -> StreamShards {
    StreamShards::new(&keys.stream, keys.shards)
}

fn start(db: &TestDb, keys: &Keys, name: &str, journal: &Journal) -> RunningWorker {
    RunningWorker::start_with(config(&db.url, keys, name), journal.enricher(name))
}

/// The holder of each shard's lease (`None`: free).
async fn owners(redis: &redis::aio::ConnectionManager, keys: &Keys) -> Vec<Option<String>> {
    let shards = shards_of(keys);
    let mut owners = Vec::new();
    for shard in 0..shards.count() {
        let owner: Option<String> = redis::cmd("GET")
            .arg(shards.lease_key(shard, &keys.group))
            .query_async(&mut redis.clone())
            .await
            .unwrap();
        owners.push(owner);
    }
    owners
}

fn held_by(owners: &[Option<String>], name: &str) -> usize {
    owners.iter().filter(|o| o.as_deref() == Some(name)).count()
}

/// Event `n` of each of `users` users, each to its user's shard.
async fn publish_round(
    redis: &redis::aio::ConnectionManager,
    shards: &StreamShards,
    users: usize,
    n: i64,
) {
    let mut by_shard: HashMap<&str, Vec<Envelope>> = HashMap::new();
    for u in 0..users {
        let user = format!("user-{u}");
        by_shard
            .entry(shards.key_of(&user))
            .or_default()
            .push(envelope(&user, "step", json!({"n": n})));
    }
    for (key, events) in by_shard {
        publish(redis, key, &events).await;
    }
}

async fn all_shards_empty(redis: &redis::aio::ConnectionManager, keys: &Keys) -> bool {
    let shards = shards_of(keys);
    for key in shards.keys() {
        if xlen(redis, key).await != 0 {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_shard_is_read_by_one_replica_and_each_user_by_one_in_order() {
    let db = TestDb::create().await;
    let keys = sharded_keys();
    let redis = redis().await;
    let journal = Journal::default();
    let a = start(&db, &keys, "a", &journal);
    let b = start(&db, &keys, "b", &journal);
    wait_until(WAIT, "the shards dealt out two and two", || async {
        let owners = owners(&redis, &keys).await;
        held_by(&owners, "a") == 2 && held_by(&owners, "b") == 2
    })
    .await;
    for n in 0..10 {
        publish_round(&redis, &shards_of(&keys), 20, n).await;
    }
    wait_until(WAIT, "200 events stored", || async {
        db.events().await == 200
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();

    let users = journal.by_user();
    assert_eq!(users.len(), 20);
    for (user, (ns, replicas)) in &users {
        assert_eq!(
            replicas.len(),
            1,
            "{user} described by one replica: {replicas:?}"
        );
        assert_eq!(
            *ns,
            (0..10).collect::<Vec<_>>(),
            "{user}'s events once, in order"
        );
    }
    let replicas: std::collections::BTreeSet<&String> =
        users.values().flat_map(|(_, r)| r).collect();
    assert_eq!(replicas.len(), 2, "both replicas worked");
    assert!(all_shards_empty(&redis, &keys).await);
    assert_eq!(
        owners(&redis, &keys).await,
        vec![None; SHARDS],
        "leases released on stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_move_when_a_replica_joins_and_when_one_stops_without_losing_or_repeating_events() {
    let db = TestDb::create().await;
    let keys = sharded_keys();
    let redis = redis().await;
    let journal = Journal::default();
    let a = start(&db, &keys, "a", &journal);
    wait_until(WAIT, "a alone holds every shard", || async {
        held_by(&owners(&redis, &keys).await, "a") == SHARDS
    })
    .await;
    // Load the whole time the shards move.
    let rounds: i64 = 40;
    let load = {
        let redis = redis.clone();
        let shards = shards_of(&keys);
        tokio::spawn(async move {
            for n in 0..rounds {
                publish_round(&redis, &shards, 12, n).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let b = start(&db, &keys, "b", &journal);
    wait_until(WAIT, "b joined: two shards handed over", || async {
        let owners = owners(&redis, &keys).await;
        held_by(&owners, "a") == 2 && held_by(&owners, "b") == 2
    })
    .await;
    // SIGTERM: a stores what it read, then lets go of its shards; b takes them at once, not
    // after a lease expires.
    a.stop().await.unwrap();
    wait_until(
        Duration::from_millis(900),
        "b holds every shard within a lease",
        || async { held_by(&owners(&redis, &keys).await, "b") == SHARDS },
    )
    .await;
    load.await.unwrap();
    let total = 12 * rounds;
    wait_until(WAIT, "every event stored", || async {
        db.events().await == total
    })
    .await;
    b.stop().await.unwrap();

    for (user, (ns, replicas)) in journal.by_user() {
        assert_eq!(
            ns,
            (0..rounds).collect::<Vec<_>>(),
            "{user}'s events described once each, in order, across {replicas:?}"
        );
    }
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        total
    );
    assert!(all_shards_empty(&redis, &keys).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_shards_and_pending_entries_are_taken_over_after_its_lease() {
    let db = TestDb::create().await;
    let keys = sharded_keys();
    let redis = redis().await;
    let journal = Journal::default();
    // A reads but cannot store (its Postgres is down), then dies without letting go.
    let proxy = Proxy::postgres(false).await;
    let a = RunningWorker::start_with(
        config(&proxy.url(&db.url), &keys, "dying"),
        journal.enricher("dying"),
    );
    wait_until(WAIT, "the dying replica holds every shard", || async {
        held_by(&owners(&redis, &keys).await, "dying") == SHARDS
    })
    .await;
    for n in 0..5 {
        publish_round(&redis, &shards_of(&keys), 10, n).await;
    }
    let shards = shards_of(&keys);
    wait_until(
        WAIT,
        "all 50 entries pending at the dying replica",
        || async {
            let mut pending = 0;
            for key in shards.keys() {
                let summary: redis::Value = redis::cmd("XPENDING")
                    .arg(key)
                    .arg(&keys.group)
                    .query_async(&mut redis.clone())
                    .await
                    .unwrap();
                if let redis::Value::Array(parts) = summary
                    && let Some(redis::Value::Int(n)) = parts.first()
                {
                    pending += n;
                }
            }
            pending == 50
        },
    )
    .await;
    a.task.abort();
    let _ = a.task.await;

    let b = start(&db, &keys, "survivor", &journal);
    wait_until(WAIT, "the survivor took every shard", || async {
        held_by(&owners(&redis, &keys).await, "survivor") == SHARDS
    })
    .await;
    wait_until(WAIT, "the dead replica's 50 entries stored", || async {
        db.events().await == 50
    })
    .await;
    wait_until(WAIT, "every shard acknowledged and emptied", || async {
        all_shards_empty(&redis, &keys).await
    })
    .await;
    b.stop().await.unwrap();
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        50,
        "stored and counted once"
    );
    for (user, (ns, _)) in journal.by_user() {
        let survivor: Vec<i64> = ns.iter().rev().take(5).rev().copied().collect();
        assert_eq!(
            survivor,
            (0..5).collect::<Vec<_>>(),
            "{user}: taken over in order"
        );
    }
}

/// The holder of the lease of the shard keyed `key` (`None`: free).
async fn owner_of(redis: &redis::aio::ConnectionManager, keys: &Keys, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(format!("{key}:owner:{}", keys.group))
        .query_async(&mut redis.clone())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_left_in_the_shards_of_an_earlier_count_are_drained_each_by_one_replica() {
    let db = TestDb::create().await;
    let keys = sharded_keys();
    let redis = redis().await;
    let journal = Journal::default();
    // Queued while the stream had one shard (its key QUEUE_NAME), then while it had eight.
    let unsharded = StreamShards::new(&keys.stream, 1);
    let eight = StreamShards::new(&keys.stream, 8);
    for n in 0..3 {
        publish_round(&redis, &unsharded, 6, n).await;
    }
    for n in 3..6 {
        publish_round(&redis, &eight, 6, n).await;
    }
    let mut old_keys = vec![keys.stream.clone()];
    old_keys.extend(eight.keys()[SHARDS..].iter().cloned());
    // A replica that reads but cannot store (its Postgres is down), alone at first, leases every
    // retired shard holding entries and cannot let go of them (what it read is not stored): a
    // second replica, live beside it and wanting half of them, keeps off them.
    let mut waiting = Vec::new();
    for key in &old_keys {
        if xlen(&redis, key).await > 0 {
            waiting.push(key.clone());
        }
    }
    assert!(waiting.len() > 1, "{waiting:?}");
    let proxy = Proxy::postgres(false).await;
    let stuck = RunningWorker::start_with(
        config(&proxy.url(&db.url), &keys, "stuck"),
        journal.enricher("stuck"),
    );
    wait_until(
        WAIT,
        "every retired shard holding entries leased by the stuck replica",
        || async {
            for key in &waiting {
                if owner_of(&redis, &keys, key).await.as_deref() != Some("stuck") {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let b = start(&db, &keys, "b", &journal);
    wait_until(WAIT, "b announced itself", || async {
        let live: Vec<String> = redis::cmd("ZRANGE")
            .arg(shards_of(&keys).replicas_key(&keys.group))
            .arg(0)
            .arg(-1)
            .query_async(&mut redis.clone())
            .await
            .unwrap();
        live.iter().any(|r| r == "b")
    })
    .await;
    // Several lease ticks (a third of a second each) with b live.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for key in &waiting {
        assert_eq!(
            owner_of(&redis, &keys, key).await.as_deref(),
            Some("stuck"),
            "{key} still held by the replica that read it"
        );
    }
    assert!(
        journal
            .0
            .lock()
            .unwrap()
            .iter()
            .all(|(r, _, _)| r == "stuck"),
        "b read nothing the stuck replica holds"
    );
    for n in 6..9 {
        publish_round(&redis, &shards_of(&keys), 6, n).await;
    }
    // Postgres back for the stuck replica: everything is stored.
    proxy.set_up(true);
    wait_until(WAIT, "every event of every count stored", || async {
        db.events().await == 54
    })
    .await;
    wait_until(WAIT, "the retired shards emptied and let go", || async {
        for key in &old_keys {
            if xlen(&redis, key).await != 0 || owner_of(&redis, &keys, key).await.is_some() {
                return false;
            }
        }
        all_shards_empty(&redis, &keys).await
    })
    .await;
    stuck.stop().await.unwrap();
    b.stop().await.unwrap();
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        54
    );
    // Each shard's events were described by one replica, in order: a user's events of the
    // unsharded key (0, 1, 2) by one replica, and so those of each of the eight shards' (3, 4, 5).
    let described = journal.0.lock().unwrap().clone();
    for u in 0..6 {
        let user = format!("user-{u}");
        for era in [0..3, 3..6] {
            let of_era: Vec<(String, i64)> = described
                .iter()
                .filter(|(_, who, n)| *who == user && era.contains(n))
                .map(|(replica, _, n)| (replica.clone(), *n))
                .collect();
            // The stuck replica describes a batch again on each retry: first times, in order.
            let mut ns: Vec<i64> = Vec::new();
            for (_, n) in &of_era {
                if !ns.contains(n) {
                    ns.push(*n);
                }
            }
            assert_eq!(ns, era.clone().collect::<Vec<_>>(), "{user}: {of_era:?}");
            assert!(
                of_era.iter().all(|(r, _)| *r == of_era[0].0),
                "{user}: one replica per shard: {of_era:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_the_count_while_events_arrive_loses_and_repeats_nothing() {
    let db = TestDb::create().await;
    let keys = sharded_keys();
    let (four, eight) = (shards_of(&keys), StreamShards::new(&keys.stream, 8));
    let redis = redis().await;
    let journal = Journal::default();
    let start_with_eight = |name: &str| {
        let mut config = config(&db.url, &keys, name);
        config.shared.stream_shards = 8;
        RunningWorker::start_with(config, journal.enricher(name))
    };
    let a = start(&db, &keys, "a", &journal);
    let b = start(&db, &keys, "b", &journal);
    // Apis change over from four shards to eight while events arrive: rounds 0-14 under four,
    // 15-29 alternating (a rolling change), 30-44 under eight.
    let rounds: i64 = 45;
    let load = {
        let redis = redis.clone();
        let (four, eight) = (four.clone(), eight.clone());
        tokio::spawn(async move {
            for n in 0..rounds {
                let shards = if n < 15 || (n < 30 && n % 2 == 0) {
                    &four
                } else {
                    &eight
                };
                publish_round(&redis, shards, 12, n).await;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    // The workers change over one by one, in the middle of it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.stop().await.unwrap();
    let a8 = start_with_eight("a8");
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.stop().await.unwrap();
    let b8 = start_with_eight("b8");
    load.await.unwrap();
    let total = 12 * rounds;
    wait_until(WAIT, "every event stored", || async {
        db.events().await == total
    })
    .await;
    let every_key: Vec<String> = std::iter::once(keys.stream.clone())
        .chain(eight.keys().iter().cloned())
        .collect();
    wait_until(WAIT, "every shard of either count emptied", || async {
        for key in &every_key {
            if xlen(&redis, key).await != 0 {
                return false;
            }
        }
        true
    })
    .await;
    a8.stop().await.unwrap();
    b8.stop().await.unwrap();
    assert_eq!(
        db.count("SELECT sum(event_count)::bigint FROM user_profiles")
            .await,
        total,
        "counted once"
    );
    for (user, (mut ns, replicas)) in journal.by_user() {
        ns.sort_unstable();
        ns.dedup();
        assert_eq!(
            ns,
            (0..rounds).collect::<Vec<_>>(),
            "{user}: every event described, by {replicas:?}"
        );
    }
    for key in &every_key {
        assert_eq!(owner_of(&redis, &keys, key).await, None, "{key} let go");
    }
}
