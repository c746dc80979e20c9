//! The `worker` binary as a supervisor sees it: exit statuses and what it prints.

mod common;

use std::process::Output;

use common::*;

/// The worker binary with `args`, run in an empty directory (no `.env`) with `vars` set.
async fn worker(args: &[&str], vars: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .current_dir(dir.path())
        .envs(vars.iter().copied())
        .output()
        .await
        .unwrap()
}

/// A bad variable stops the worker with one line naming it and status 2, as the api
/// (`infra::config::EXIT_CONFIG_ERROR`; clap's status for a bad argument too).
#[tokio::test]
async fn a_configuration_error_exits_2_with_one_line() {
    for args in [&[][..], &["dlq", "list"]] {
        let out = worker(args, &[("FLUSH_INTERVAL", "soon")]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(out.status.code(), Some(infra::config::EXIT_CONFIG_ERROR));
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("configuration error: FLUSH_INTERVAL: "),
            "{stderr}"
        );
    }
}

/// `worker healthcheck` asks this replica's `/health` on `WORKER_METRICS_BIND`: 0 while it
/// serves (`0.0.0.0` asked on loopback), 1 with one line once it stopped, or when the variable
/// says `off`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_while_the_replica_serves_and_1_otherwise() {
    let db = TestDb::create().await;
    let keys = Keys::new();
    let addr = closed_addr();
    let mut cfg = config(&db.url, &keys, "healthcheck");
    cfg.metrics_bind = Some(addr);
    let replica = RunningWorker::start(cfg);
    wait_until(WAIT, "the replica serves /health", || async {
        reqwest::get(format!("http://{addr}/health"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    let any = format!("0.0.0.0:{}", addr.port());
    for bind in [addr.to_string(), any] {
        let out = worker(&["healthcheck"], &[("WORKER_METRICS_BIND", &bind)]).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{bind}: {out:?}");
        assert_eq!(
            stdout.trim(),
            format!("healthy: http://{addr}/health answered 200")
        );
    }

    replica.stop().await.unwrap();
    let out = worker(
        &["healthcheck"],
        &[("WORKER_METRICS_BIND", &addr.to_string())],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stderr.trim(),
        format!("unhealthy: http://{addr}/health: connection refused")
    );

    let out = worker(&["healthcheck"], &[("WORKER_METRICS_BIND", "off")]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("WORKER_METRICS_BIND is off"), "{stderr}");
}
