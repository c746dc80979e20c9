//! Rule edits reach history: events stored under one rule set are described again when the rules
//! change (in the background, resumable, one replica per batch), and `worker rules shadow` /
//! `reenrich --dry-run` show what a change would do — real Redis and Postgres.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use rules_engine::RuleSet;
use serde_json::json;
use worker::history::reenrich::{self, Step};

const INVITES: &str = r#"
intents:
  - { name: expansion, summary: "User growing their team.", half_life: 7d }
rules:
  - id: team-invite
    when: { event: team_invite_sent }
    say: "Invited a {{ properties.role | default: \"teammate\" }} to the team"
    intents: { expansion: 2 }
  - id: flags-off
    when:
      event: $feature_flag_called
      properties: { $feature_flag_response: false }
    ignore: true
"#;

fn invite(user: &str, n: i64) -> entity::Envelope {
    let mut e = envelope(
        user,
        "team_invite_sent",
        json!({"role": "admin", "$session_id": "s-1"}),
    );
    e.timestamp -= chrono::Duration::minutes(n);
    e.session_id = Some("s-1".into());
    e
}

#[tokio::test]
async fn stored_events_take_the_new_rules_while_the_worker_runs() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let redis = redis().await;
    let dir = rules_dir_with(&[]);
    let mut config = config(&db.url, &keys, "history");
    config.rules_dir = dir.path().to_path_buf();
    let worker = RunningWorker::spawn_run(config);

    let mut events: Vec<_> = (1..=3).map(|n| invite("user_1", n)).collect();
    events.push(envelope(
        "user_1",
        "$pageview",
        json!({"$pathname": "/pricing"}),
    ));
    let mut off = envelope(
        "user_1",
        "$feature_flag_called",
        json!({"$feature_flag": "x", "$feature_flag_response": false, "$session_id": "s-off"}),
    );
    off.session_id = Some("s-off".into());
    events.push(off);
    publish(&redis, &keys.stream, &events).await;
    wait_until(WAIT, "five events stored", || async {
        db.events().await == 5
    })
    .await;
    assert_eq!(
        db.count(
            "SELECT count(*) FROM events WHERE description = 'Triggered ''team_invite_sent'''"
        )
        .await,
        3
    );
    assert_eq!(
        db.count("SELECT session_count FROM user_profiles WHERE distinct_id = 'user_1'")
            .await,
        2
    );

    // The author adds the translation (and an ignore rule) while the worker runs.
    std::fs::write(dir.path().join("saas.yaml"), INVITES).unwrap();
    let version = RuleSet::load_dir(dir.path()).unwrap().version().to_owned();
    wait_until(
        WAIT,
        "the old events described with the new rules",
        || async {
            db.count(&format!(
                "SELECT count(*) FROM events WHERE rules_version = '{version}'"
            ))
            .await
                == 5
        },
    )
    .await;
    assert_eq!(
        db.column("SELECT description FROM events WHERE event = 'team_invite_sent'")
            .await,
        ["Invited a admin to the team"; 3]
    );
    assert_eq!(
        db.count("SELECT count(*) FROM events WHERE description IS NULL AND rule_id = 'flags-off'")
            .await,
        1
    );
    // The profile counts what the new rules say: three expansion hits, the ignored event and its
    // session gone from the counts.
    assert_eq!(
        db.count("SELECT (intents->'expansion'->>'count')::int8 FROM user_profiles WHERE distinct_id = 'user_1'").await,
        3
    );
    assert_eq!(
        db.column("SELECT ((intents->'expansion'->>'score')::float8 > 5.9 AND (intents->'expansion'->>'score')::float8 <= 6.0)::text FROM user_profiles").await,
        ["true"]
    );
    assert_eq!(
        db.count("SELECT event_count FROM user_profiles WHERE distinct_id = 'user_1'")
            .await,
        4
    );
    assert_eq!(
        db.count("SELECT session_count FROM user_profiles WHERE distinct_id = 'user_1'")
            .await,
        1
    );
    let pass = reenrich::state(db.conn.get_postgres_connection_pool())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pass.version, version);
    assert!(pass.finished_at.is_some());
    assert_eq!((pass.described, pass.changed), (5, 4));
    worker.stop().await.unwrap();
}

/// Events stored under an old version, through the worker's own store.
async fn stored_under_old_rules(db: &TestDb, n: usize) {
    let pool = worker_pool(db).await;
    let events: Vec<_> = (0..n)
        .map(|i| stored(&invite(&format!("user_{}", i % 7), i as i64)))
        .collect();
    for chunk in events.chunks(100) {
        worker::store::write_batch(&pool, &Default::default(), chunk, "old-rules")
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_pass_resumes_after_a_restart_and_two_replicas_never_rewrite_the_same_rows() {
    let db = TestDb::create().await;
    stored_under_old_rules(&db, 450).await;
    let dir = rules_dir_with(&[("saas.yaml", INVITES)]);
    let set = Arc::new(RuleSet::load_dir(dir.path()).unwrap());
    let pool = worker_pool(&db)
        .await
        .get_postgres_connection_pool()
        .clone();
    assert_eq!(
        reenrich::step(&pool, &set, 100).await.unwrap(),
        Step::NoPass
    );
    reenrich::begin(&pool, set.version(), None, false)
        .await
        .unwrap();
    let first = reenrich::step(&pool, &set, 100).await.unwrap();
    assert_eq!(
        first,
        Step::Batch {
            read: 100,
            described: 100,
            changed: 100
        }
    );
    // A "restart": a new pool, the pass begun again with the same rules keeps its cursor.
    drop(pool);
    let a = worker_pool(&db)
        .await
        .get_postgres_connection_pool()
        .clone();
    let b = worker_pool(&db)
        .await
        .get_postgres_connection_pool()
        .clone();
    reenrich::begin(&a, set.version(), None, false)
        .await
        .unwrap();
    let replica = |pool: sea_orm::sqlx::PgPool, set: Arc<RuleSet>| async move {
        let mut described = 0;
        loop {
            match reenrich::step(&pool, &set, 50).await.unwrap() {
                Step::Batch { described: d, .. } => described += d,
                Step::Busy => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                Step::Finished => return described,
                other => panic!("{other:?}"),
            }
        }
    };
    let (da, db_) = tokio::join!(replica(a.clone(), set.clone()), replica(b, set.clone()));
    // Every event described once in all: 100 before the restart, the rest split between them.
    assert_eq!(100 + da + db_, 450, "{da} + {db_}");
    let state = reenrich::state(&a).await.unwrap().unwrap();
    assert_eq!(state.described, 450);
    assert_eq!(
        db.count("SELECT count(*) FROM events WHERE rules_version = 'old-rules'")
            .await,
        0
    );
    // Each user's intent counted once per event, not once per pass or replica.
    assert_eq!(
        db.count("SELECT sum((intents->'expansion'->>'count')::int) FROM user_profiles")
            .await,
        450
    );
    // Done is done: a new pass with the same rules finds nothing to describe.
    reenrich::begin(&a, set.version(), None, true)
        .await
        .unwrap();
    loop {
        match reenrich::step(&a, &set, 1000).await.unwrap() {
            Step::Batch { described, .. } => assert_eq!(described, 0),
            Step::Finished => break,
            other => panic!("{other:?}"),
        }
    }
    // A pass for other rules is left alone by a replica with these.
    reenrich::begin(&a, "someone-else", None, false)
        .await
        .unwrap();
    assert_eq!(
        reenrich::step(&a, &set, 10).await.unwrap(),
        Step::OtherVersion("someone-else".into())
    );
}

/// `worker rules …` with the test's database and `rules_dir`.
fn worker_cli(db: &TestDb, rules_dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("RULES_DIR", rules_dir)
        .env("RUST_LOG", "off")
        .env("MIGRATE_ON_START", "false")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

#[tokio::test]
async fn shadow_and_dry_run_show_what_a_change_does_and_write_nothing() {
    let db = TestDb::create().await;
    stored_under_old_rules(&db, 12).await;
    let live = rules_dir_with(&[]);
    let candidate = rules_dir_with(&[("saas.yaml", INVITES)]);

    let text = worker_cli(
        &db,
        live.path(),
        &[
            "rules",
            "shadow",
            candidate.path().to_str().unwrap(),
            "--last",
            "10",
        ],
    );
    let expected = [
        "shadow run: the newest 10 stored events, described by the live rules",
        "10 events compared: sentence changed for 10, intents changed for 10; 0 described by live are left unmatched by candidate, 10 unmatched by live are described by candidate",
        "by rule (live → candidate):\n       10  (fallback) → team-invite\n",
        "by sentence (live → candidate), most frequent first:\n       10  \"Triggered 'team_invite_sent'\" → \"Invited a admin to the team\"\n           e.g. user_",
    ];
    for part in expected {
        assert!(text.contains(part), "{part:?} in:\n{text}");
    }

    let text = worker_cli(&db, candidate.path(), &["rules", "reenrich", "--dry-run"]);
    assert!(
        text.contains("12 events compared: sentence changed for 12"),
        "{text}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM events WHERE rules_version = 'old-rules'")
            .await,
        12
    );

    let text = worker_cli(
        &db,
        candidate.path(),
        &["rules", "reenrich", "--since", "1h"],
    );
    assert!(
        text.contains("done: 12 events described again, 12 changed"),
        "{text}"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM events WHERE rules_version = 'old-rules'")
            .await,
        0
    );

    // A candidate that does not load: non-zero, with the reason.
    let broken = rules_dir_with(&[(
        "bad.yaml",
        "rules:\n  - id: x\n    when: { event: { regex: \"(\" } }\n    say: X\n",
    )]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["rules", "shadow", broken.path().to_str().unwrap()])
        .env("DATABASE_URL", &db.url)
        .env("RULES_DIR", live.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("the candidate rules") && text.contains("bad.yaml:3:"),
        "{text}"
    );
}
