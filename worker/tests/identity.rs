//! Identity calls (`$identify`, `$create_alias`, `$merge_dangerously`) join ids into persons as
//! PostHog does, in the batch's transaction: against the real Postgres, a database per test.

mod common;

use std::collections::BTreeMap;

use common::*;
use sea_orm::DatabaseConnection;
use serde_json::json;
use worker::store::{KnownProfiles, Merges, StoredEvent, write_batch};

/// `$identify` of `user` (the identified id) naming the anonymous id it replaces.
fn identify(user: &str, anonymous: &str) -> StoredEvent {
    stored(&envelope(
        user,
        "$identify",
        json!({"$anon_distinct_id": anonymous}),
    ))
}

/// An identity call naming `alias` (`$create_alias` or `$merge_dangerously`).
fn alias(event: &str, user: &str, alias: &str) -> StoredEvent {
    stored(&envelope(user, event, json!({"alias": alias})))
}

fn pageview(user: &str) -> StoredEvent {
    stored(&envelope(
        user,
        "$pageview",
        json!({"$pathname": "/pricing"}),
    ))
}

/// What the batch's identity calls did.
async fn write(pool: &DatabaseConnection, events: &[StoredEvent]) -> Merges {
    write_batch(pool, &KnownProfiles::default(), events, "v1")
        .await
        .unwrap()
        .merges
}

/// The persons of two or more ids: their ids, sorted, with whether each is identified.
async fn persons(db: &TestDb) -> Vec<(Vec<String>, bool)> {
    let rows = db
        .column(
            "SELECT p.is_identified::text || ' ' || m.distinct_id FROM person_distinct_ids m \
             JOIN persons p ON p.id = m.person_id ORDER BY m.person_id, m.distinct_id",
        )
        .await;
    let ids = db
        .column("SELECT person_id::text FROM person_distinct_ids ORDER BY person_id, distinct_id")
        .await;
    let mut by_person: BTreeMap<String, (Vec<String>, bool)> = BTreeMap::new();
    for (row, person) in rows.iter().zip(ids) {
        let (identified, id) = row.split_once(' ').unwrap();
        let entry = by_person.entry(person).or_default();
        entry.0.push(id.to_string());
        entry.1 = identified == "true";
    }
    let mut persons: Vec<_> = by_person.into_values().collect();
    persons.sort();
    persons
}

fn person(ids: &[&str]) -> (Vec<String>, bool) {
    (ids.iter().map(|id| id.to_string()).collect(), true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identify_joins_the_anonymous_id_and_a_redelivery_changes_nothing() {
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    write(&pool, &[pageview("anon-1"), pageview("anon-1")]).await;
    let call = identify("user_42", "anon-1");
    let merges = write(&pool, std::slice::from_ref(&call)).await;
    assert_eq!(merges.merged, 1);
    assert_eq!(persons(&db).await, [person(&["anon-1", "user_42"])]);

    // The same event again (a redelivery, a replay): stored before, so nothing happens.
    let merges = write(&pool, &[call.clone(), pageview("anon-1")]).await;
    assert_eq!(merges, Merges::default());
    assert_eq!(persons(&db).await, [person(&["anon-1", "user_42"])]);
    assert_eq!(db.count("SELECT count(*) FROM persons").await, 1);
    // Rows stay per id: the anonymous history is not rewritten.
    assert_eq!(
        db.count("SELECT count(*) FROM events WHERE distinct_id = 'anon-1'")
            .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_chains_make_one_person() {
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    write(&pool, &[alias("$create_alias", "a", "b")]).await;
    write(&pool, &[alias("$create_alias", "b", "c")]).await;
    assert_eq!(persons(&db).await, [person(&["a", "b", "c"])]);
    // Two calls of one batch, the second naming the person the first made.
    let merges = write(
        &pool,
        &[
            alias("$create_alias", "x", "y"),
            alias("$create_alias", "y", "z"),
        ],
    )
    .await;
    assert_eq!(merges.merged, 2);
    assert_eq!(
        persons(&db).await,
        [person(&["a", "b", "c"]), person(&["x", "y", "z"])]
    );
    assert_eq!(db.count("SELECT count(*) FROM persons").await, 2);
}

/// PostHog's guard: an id whose person is identified does not join another person through
/// `$identify` or `$create_alias` (counted, logged); `$merge_dangerously` joins it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identified_person_joins_another_only_by_merge_dangerously() {
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    write(&pool, &[pageview("shared-device"), pageview("user_b")]).await;
    write(&pool, &[identify("user_a", "shared-device")]).await;
    let refused = write(&pool, &[identify("user_b", "shared-device")]).await;
    assert_eq!((refused.merged, refused.already_identified), (0, 1));
    let refused = write(&pool, &[alias("$create_alias", "user_b", "user_a")]).await;
    assert_eq!(refused.already_identified, 1);
    assert_eq!(persons(&db).await, [person(&["shared-device", "user_a"])]);

    // An id with nothing stored yet joins the identified person (PostHog: it has no person).
    assert_eq!(
        write(&pool, &[identify("user_a2", "user_a")]).await.merged,
        1
    );
    // Placeholder ids never merge.
    let illegal = write(&pool, &[identify("user_c", "undefined")]).await;
    assert_eq!(illegal.illegal_id, 1);

    let merged = write(&pool, &[alias("$merge_dangerously", "user_b", "user_a")]).await;
    assert_eq!(merged.merged, 1);
    assert_eq!(
        persons(&db).await,
        [person(&["shared-device", "user_a", "user_a2", "user_b"])]
    );
}

/// Replicas merging persons that share ids at the same moment, each call on its own connection
/// and in its own order: no deadlock (it would fail a batch), no mapping lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_merges_over_the_same_ids_neither_deadlock_nor_lose_an_id() {
    let db = TestDb::create().await;
    let ids: Vec<String> = (0..12).map(|i| format!("id_{i:02}")).collect();
    // Each replica's batches: two or three ids joined, some in reverse order of another's.
    let batches = |replica: usize| -> Vec<Vec<(String, String)>> {
        let n = ids.len();
        (0..8usize)
            .map(|round| {
                let a = ids[(replica * 5 + round * 7) % n].clone();
                let b = ids[(replica * 3 + round * 11 + 1) % n].clone();
                let c = ids[(replica + round * 5 + 2) % n].clone();
                let mut calls = vec![(a.clone(), b)];
                if round % 2 == 0 {
                    calls.push((c, a));
                }
                calls.retain(|(x, y)| x != y);
                calls
            })
            .collect()
    };
    let mut named = std::collections::BTreeSet::new();
    let mut tasks = tokio::task::JoinSet::new();
    for replica in 0..6usize {
        let pool = worker_pool(&db).await;
        let batches = batches(replica);
        named.extend(
            batches
                .iter()
                .flatten()
                .flat_map(|(x, y)| [x.clone(), y.clone()]),
        );
        tasks.spawn(async move {
            for calls in batches {
                let batch: Vec<StoredEvent> = calls
                    .iter()
                    .map(|(x, y)| alias("$merge_dangerously", x, y))
                    .collect();
                write_batch(&pool, &KnownProfiles::default(), &batch, "v1")
                    .await
                    .expect("a merge batch never deadlocks");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    // Every id named has its one mapping row (the key), to a person that exists (the foreign
    // key), and no person is left without ids.
    assert_eq!(
        db.count("SELECT count(*) FROM person_distinct_ids").await,
        named.len() as i64
    );
    assert_eq!(
        db.count(
            "SELECT count(*) FROM persons WHERE id NOT IN (SELECT person_id FROM person_distinct_ids)"
        )
        .await,
        0
    );
}

/// Two merges sharing an id, the second started while the first holds the person: the second
/// waits, then sees the first's mapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_waits_for_another_merging_the_same_person() {
    use sea_orm::sqlx::{self, Connection, Executor, PgConnection};
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    write(&pool, &[identify("user_1", "anon-1")]).await;
    // A transaction of the test's own holding the person, as a merge of another replica does.
    let mut other = PgConnection::connect(&db.url).await.unwrap();
    other.execute("BEGIN").await.unwrap();
    sqlx::query("SELECT 1 FROM persons FOR UPDATE")
        .execute(&mut other)
        .await
        .unwrap();
    let waiting = {
        let pool = pool.clone();
        tokio::spawn(async move { write(&pool, &[identify("user_1", "anon-2")]).await })
    };
    wait_until(WAIT, "the merge to wait for the person", || async {
        db.count(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND wait_event = 'transactionid'",
        )
        .await
            == 1
    })
    .await;
    other.execute("ROLLBACK").await.unwrap();
    assert_eq!(waiting.await.unwrap().merged, 1);
    assert_eq!(
        persons(&db).await,
        [person(&["anon-1", "anon-2", "user_1"])]
    );
}

/// A person merged into another by a replica while this merge waited for it: the merge finds
/// where its ids went, takes that person's lock instead (in order again) and joins the id there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_follows_ids_moved_while_it_waited() {
    use sea_orm::sqlx::{self, Connection, Executor, PgConnection};
    let db = TestDb::create().await;
    let pool = worker_pool(&db).await;
    write(&pool, &[alias("$create_alias", "p1", "x")]).await;
    write(&pool, &[alias("$create_alias", "q1", "q2")]).await;
    let mut other = PgConnection::connect(&db.url).await.unwrap();
    let person_of = |id: &'static str| {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(format!(
            "SELECT person_id FROM person_distinct_ids WHERE distinct_id = '{id}'"
        )))
    };
    let p = person_of("x").fetch_one(&mut other).await.unwrap();
    let q = person_of("q1").fetch_one(&mut other).await.unwrap();
    // Another replica's merge of x's person into q1's, holding x's person meanwhile.
    other.execute("BEGIN").await.unwrap();
    sqlx::query("SELECT 1 FROM persons WHERE id = $1 FOR UPDATE")
        .bind(p)
        .execute(&mut other)
        .await
        .unwrap();
    let waiting = {
        let pool = pool.clone();
        tokio::spawn(async move { write(&pool, &[identify("anon-9", "x")]).await })
    };
    wait_until(WAIT, "the merge to wait for x's person", || async {
        db.count(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND wait_event = 'transactionid'",
        )
        .await
            == 1
    })
    .await;
    for sql in [
        "UPDATE person_distinct_ids SET person_id = $1 WHERE person_id = $2",
        "DELETE FROM persons WHERE id = $2 AND $1 <> $2",
    ] {
        sqlx::query(sql)
            .bind(q)
            .bind(p)
            .execute(&mut other)
            .await
            .unwrap();
    }
    other.execute("COMMIT").await.unwrap();
    assert_eq!(waiting.await.unwrap().merged, 1);
    assert_eq!(
        persons(&db).await,
        [person(&["anon-9", "p1", "q1", "q2", "x"])]
    );
}
