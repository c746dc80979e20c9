//! What the kit promises its users, against the real services: nothing a failing test created
//! outlives it, and the proxy holds and cuts what it carries.

use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use testkit::{Keys, Proxy, TestDb, publish_raw, redis, xlen};

#[test]
fn a_panicking_test_leaves_no_database_and_no_keys_behind() {
    let (created, names) = std::sync::mpsc::channel();
    let test = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let db = TestDb::create().await;
            let keys = Keys::new();
            publish_raw(&redis().await, &keys.stream, &[("v", "1")]).await;
            publish_raw(&redis().await, &keys.dlq, &[("v", "1")]).await;
            created.send((db.name.clone(), keys)).unwrap();
            panic!("a deliberate failure, to see the guards clean up");
        })
    });
    assert!(test.join().is_err(), "the test panicked");
    let (name, keys) = names.recv().unwrap();
    let (stream, dlq) = (keys.stream.clone(), keys.dlq.clone());
    // The keys moved out of the test: dropping them now is what the test's unwinding did to the
    // database.
    drop(keys);

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
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
        let redis = redis().await;
        assert_eq!(xlen(&redis, &stream).await, 0);
        assert_eq!(xlen(&redis, &dlq).await, 0);
    });
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
