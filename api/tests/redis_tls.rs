//! `rediss://`: the api, a worker and the worker's DLQ tool against a local `redis-server` that
//! speaks TLS only, with a certificate authority this test makes (`openssl`) and passes as
//! `REDIS_CA_CERT`. Without that CA the server's certificate is refused. Then the same against a
//! three-master Redis Cluster of its own speaking TLS only (`rediss://` seeds).

mod common;

use std::{path::Path, process::Stdio, time::Duration};

use common::{RequestExt, SECRET, TestApp, WAIT, closed_addr, test_config, wait_until};
use reqwest::StatusCode;
use serde_json::json;

/// The tools this test runs, when one is not on PATH: a machine whose Redis runs in Docker may
/// have no `redis-server`. Then the test is skipped with a note, except in CI (`CI` set), where it
/// fails.
/// Whether a tool the test needs is missing: the test is then skipped, with a note (under `CI`
/// it fails instead).
fn skipped_without_tools() -> bool {
    let Some(tool) = missing_tool() else {
        return false;
    };
    assert!(std::env::var_os("CI").is_none(), "{tool} is not on PATH");
    eprintln!("skipped: {tool} is not on PATH (install Redis 7 and OpenSSL to run this test)");
    true
}

fn missing_tool() -> Option<&'static str> {
    ["redis-server", "redis-cli", "openssl"]
        .into_iter()
        .find(|tool| {
            std::process::Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
}

/// Runs `openssl` with `args` in `dir`; panics with its stderr when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`) and a certificate it signed for 127.0.0.1 (`server.pem`, `server.key`), for
/// servers and clients alike: a cluster's nodes present it to each other on the cluster bus.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "1",
        "-subj",
        "/CN=clickstream test CA",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    ca.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-new", "-subj", "/CN=localhost"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_to_storage_over_rediss_with_a_private_ca() {
    if skipped_without_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let port = closed_addr().port();
    let mut server = tokio::process::Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args([
            "--tls-cert-file",
            "server.pem",
            "--tls-key-file",
            "server.key",
        ])
        .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no", "--dir", "."])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server (with TLS) on PATH");
    wait_until(WAIT, "redis-server listens", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let url = format!("rediss://127.0.0.1:{port}");

    // Without the CA the server's certificate is not trusted: ingest answers 503.
    let mut config = test_config();
    config.redis_url = url.clone();
    config.redis_timeout = Duration::from_millis(500);
    let untrusted = TestApp::spawn_with(config).await;
    let resp = untrusted
        .post("/capture")
        .key(SECRET)
        .json(&json!({"event": "a", "distinct_id": "u"}))
        .answer()
        .await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(untrusted.ready().await.0, StatusCode::SERVICE_UNAVAILABLE);

    // With REDIS_CA_CERT: the api queues, a worker stores, the context reads it back.
    let mut config = test_config();
    config.redis_url = url;
    config.redis_ca_cert = Some(dir.path().join("ca.pem"));
    let (app, db) = TestApp::spawn_with_db(config).await;
    let (status, ready) = app.ready().await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    let _worker = app.start_worker(&db, "tls");
    let resp = app
        .post("/capture")
        .key(SECRET)
        .json(&json!({"event": "$pageview", "distinct_id": "tls_user",
                      "properties": {"$current_url": "https://shop.test/pricing"}}))
        .answer()
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    wait_until(WAIT, "the event stored and read back", || async {
        let (status, body) = app.context("tls_user").await;
        status == StatusCode::OK && body["stats"]["event_count"] == 1
    })
    .await;

    // The worker's DLQ tool reaches the same Redis.
    let tool = common::worker_config(&app.config, &db.url, "tls-tool");
    let listed = worker::cli::dlq(&tool, &worker::cli::DlqCommand::List { limit: 10 }).await;
    assert!(listed.is_ok(), "{listed:?}");

    // A CA with a plain redis:// URL is a configuration mistake, said at start.
    let plain =
        infra::redis::client_with_ca("redis://127.0.0.1:6379", Some(&dir.path().join("ca.pem")));
    assert!(plain.unwrap_err().to_string().contains("REDIS_CA_CERT"));

    server.start_kill().unwrap();
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_to_storage_on_a_tls_cluster_with_a_private_ca() {
    if skipped_without_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let ca = dir.path().join("ca.pem");
    let cluster = common::start_tls_cluster(&common::TlsFiles {
        ca: &ca,
        cert: &dir.path().join("server.pem"),
        key: &dir.path().join("server.key"),
    });
    // `rediss://` seeds and REDIS_CA_CERT: the nodes the client learns from them use TLS too.
    let mut config = test_config();
    config.redis_url = cluster.redis_url();
    config.redis_cluster = true;
    config.redis_ca_cert = Some(ca);
    config.stream_shards = 4;
    let (app, db) = TestApp::spawn_with_db(config).await;
    let (status, ready) = app.ready().await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    let _worker = app.start_worker(&db, "tls-cluster");
    let batch: Vec<serde_json::Value> = (0..8)
        .map(|u| json!({"event": "e", "distinct_id": format!("tls_user_{u}")}))
        .collect();
    let resp = app.post("/batch").key(SECRET).json(&batch).answer().await;
    assert_eq!(resp.status(), StatusCode::OK);
    wait_until(WAIT, "every event stored and read back", || async {
        let (status, body) = app.context("tls_user_3").await;
        status == StatusCode::OK && body["stats"]["event_count"] == 1 && db.events().await == 8
    })
    .await;
}
