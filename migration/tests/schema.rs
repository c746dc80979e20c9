//! A fresh database gets the full schema, and replicas migrating together apply it once.

use migration::{Migrator, MigratorTrait};
use sea_orm_migration::sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DbBackend, EntityTrait, Statement,
};
use testkit::TestDb;

async fn columns(db: &DatabaseConnection, table: &str) -> Vec<(String, String, bool)> {
    db.query_all_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT column_name, data_type, is_nullable = 'YES' AS nullable FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
        [table.into()],
    ))
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        (
            r.try_get::<String>("", "column_name").unwrap(),
            r.try_get::<String>("", "data_type").unwrap(),
            r.try_get::<bool>("", "nullable").unwrap(),
        )
    })
    .collect()
}

#[tokio::test]
async fn fresh_database_gets_the_full_schema_once_under_concurrent_starts() {
    let test_db = TestDb::create_empty().await;
    let db = &test_db.conn;

    // Four replicas starting together: exactly one applies the migration.
    let runs = (0..4).map(|_| {
        let url = test_db.url.clone();
        tokio::spawn(async move {
            let db = Database::connect(&url).await.unwrap();
            migration::apply(&db).await.unwrap()
        })
    });
    let mut applied = Vec::new();
    for run in runs {
        applied.push(run.await.unwrap());
    }
    applied.sort();
    assert_eq!(applied, vec![0, 0, 0, Migrator::migrations().len()]);
    assert!(
        Migrator::get_pending_migrations(db)
            .await
            .unwrap()
            .is_empty()
    );

    let events = columns(db, "events").await;
    let names: Vec<&str> = events.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "uuid",
            "distinct_id",
            "event",
            "description",
            "rule_id",
            "intents",
            "properties",
            "url",
            "path",
            "session_id",
            "elements_chain",
            "timestamp",
            "received_at",
            "rules_version"
        ]
    );
    let ty = |cols: &[(String, String, bool)], name: &str| {
        cols.iter().find(|c| c.0 == name).unwrap().clone()
    };
    assert_eq!(ty(&events, "uuid").1, "uuid");
    assert_eq!(ty(&events, "properties").1, "jsonb");
    assert_eq!(ty(&events, "timestamp").1, "timestamp with time zone");
    assert!(ty(&events, "rule_id").2, "rule_id is nullable");

    let profiles = columns(db, "user_profiles").await;
    let names: Vec<&str> = profiles.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "distinct_id",
            "first_seen",
            "last_seen",
            "event_count",
            "session_count",
            "intents",
            "person_properties",
            "updated_at",
            "person_property_times"
        ]
    );
    assert_eq!(ty(&profiles, "intents").1, "jsonb");
    assert_eq!(columns(db, "user_sessions").await.len(), 3);
    let erasures = columns(db, "erasures").await;
    assert_eq!(
        erasures,
        [
            ("id_sha256".to_string(), "bytea".to_string(), false),
            (
                "erased_at".to_string(),
                "timestamp with time zone".to_string(),
                false
            )
        ]
    );

    let index = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'events_distinct_id_timestamp_idx'",
        ))
        .await
        .unwrap()
        .expect("index exists")
        .try_get::<String>("", "indexdef")
        .unwrap();
    assert!(
        index.contains("(distinct_id, \"timestamp\" DESC)"),
        "{index}"
    );

    // The entities describe the tables: a query through them works.
    assert!(no_rows::<entity::event::Entity>(db).await);
    assert!(no_rows::<entity::user_profile::Entity>(db).await);
    assert!(no_rows::<entity::user_session::Entity>(db).await);
}

/// Whether a query of every row of `E`'s table works and finds none.
async fn no_rows<E: EntityTrait>(db: &DatabaseConnection) -> bool {
    E::find().all(db).await.unwrap().is_empty()
}

/// Person properties stored before their times were kept read back as set at the profile's
/// `last_seen`, in the format the worker and the api read (`entity::person_properties`).
#[tokio::test]
async fn person_properties_stored_before_times_count_as_set_at_last_seen() {
    use entity::person_properties::{PropertyTimes, resolve};
    let test_db = TestDb::create_empty().await;
    let db = &test_db.conn;
    let before = Migrator::migrations().len() - 1;
    Migrator::up(db, Some(before as u32)).await.unwrap();
    db.execute_unprepared(
        r#"INSERT INTO user_profiles (distinct_id, first_seen, last_seen, event_count, session_count, intents, person_properties)
           VALUES ('old', now(), '2026-11-20T10:00:00Z', 1, 0, '{}', '{"plan": "pro", "seats": 3}'),
                  ('none', now(), now(), 1, 0, '{}', NULL),
                  ('empty', now(), now(), 1, 0, '{}', '{}')"#,
    )
    .await
    .unwrap();
    Migrator::up(db, None).await.unwrap();

    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT distinct_id, person_property_times::text FROM user_profiles ORDER BY distinct_id",
        ))
        .await
        .unwrap();
    let times: Vec<(String, Option<String>)> = rows
        .iter()
        .map(|r| {
            (
                r.try_get("", "distinct_id").unwrap(),
                r.try_get("", "person_property_times").unwrap(),
            )
        })
        .collect();
    assert_eq!(times[0], ("empty".to_string(), None));
    assert_eq!(times[1], ("none".to_string(), None));
    let old: PropertyTimes = serde_json::from_str(times[2].1.as_deref().unwrap()).unwrap();
    assert_eq!(
        serde_json::Value::Object(resolve(&old)),
        serde_json::json!({"plan": "pro", "seats": 3})
    );
    assert_eq!(
        old["plan"].set.as_ref().unwrap().1,
        "2026-11-20T10:00:00Z"
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap()
    );
}
