//! What the kit promises its users, against the real services: nothing a failing test created
//! outlives it (nor is written again by a service it ran), and the proxy holds and cuts what it
//! carries.

use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use testkit::{Keys, Proxy, StopOnDrop, TestDb, publish_raw, redis};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_test_leaves_no_database_and_no_keys_behind() {
    let redis = redis().await;
    let (created, names) = tokio::sync::oneshot::channel();
    // The failing test, as a task: the runtime lives on after it, as it does while a real
    // test's other guards drop.
    let test = tokio::spawn({
        let redis = redis.clone();
        async move {
            let db = TestDb::create().await;
            let keys = Keys::new();
            publish_raw(&redis, &keys.stream, &[("v", "1")]).await;
            publish_raw(&redis, &keys.dlq, &[("v", "1")]).await;
            // A service that writes once more as it stops, from a task of its own (as a worker
            // flushes its report): aborting the service does not stop that one.
            let shutdown = CancellationToken::new();
            let flush = {
                let (redis, stream, shutdown) =
                    (redis.clone(), keys.stream.clone(), shutdown.clone());
                async move {
                    shutdown.cancelled().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    publish_raw(&redis, &stream, &[("v", "1")]).await;
                }
            };
            let service = tokio::spawn(tokio::spawn(flush));
            let _service = StopOnDrop::new(&shutdown, &service);
            let names = (db.name.clone(), keys.stream.clone(), keys.dlq.clone());
            created.send(names).unwrap();
            panic!("a deliberate failure, to see the guards clean up");
        }
    });
    assert!(test.await.unwrap_err().is_panic());
    let (name, stream, dlq) = names.await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let admin = Database::connect(testkit::database_url()).await.unwrap();
    let left = admin
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            [name.clone().into()],
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index::<i64>(0)
        .unwrap();
    assert_eq!(left, 0, "database {name} outlived its test");
    let left: i64 = redis::cmd("EXISTS")
        .arg(&stream)
        .arg(&dlq)
        .query_async(&mut redis.clone())
        .await
        .unwrap();
    assert_eq!(left, 0, "keys of {stream} outlived their test");
}

#[tokio::test]
async fn the_proxy_holds_what_clients_send_and_cuts_connections_when_down() {
    let proxy = Proxy::redis(true).await;
    let client = redis::Client::open(format!("redis://{}", proxy.addr)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let ping = redis::cmd("PING");
    assert_eq!(ping.query_async::<String>(&mut conn).await.unwrap(), "PONG");

    // Two commands held one after the other: both wait, both are answered once released.
    proxy.hold();
    let mut first = conn.clone();
    let echo = tokio::spawn(async move {
        let echo = redis::cmd("ECHO").arg("first").clone();
        echo.query_async::<String>(&mut first).await
    });
    testkit::wait_until(Duration::from_secs(5), "ECHO held", || async {
        proxy.held().ends_with(b"first\r\n")
    })
    .await;
    let mut second = conn.clone();
    let answer = tokio::spawn(async move { ping.query_async::<String>(&mut second).await });
    testkit::wait_until(Duration::from_secs(5), "PING held", || async {
        proxy.held().ends_with(b"PING\r\n")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !echo.is_finished() && !answer.is_finished(),
        "held commands are not answered"
    );
    proxy.release();
    assert_eq!(echo.await.unwrap().unwrap(), "first");
    assert_eq!(answer.await.unwrap().unwrap(), "PONG");

    proxy.set_up(false);
    let cut = redis::cmd("PING").query_async::<String>(&mut conn).await;
    assert!(cut.is_err(), "{cut:?}");
    assert!(client.get_multiplexed_async_connection().await.is_err());
}
