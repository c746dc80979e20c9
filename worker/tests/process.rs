//! The `worker` binary as a supervisor sees it: exit statuses and what it prints.

use std::process::Output;

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
