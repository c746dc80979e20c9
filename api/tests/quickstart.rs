//! README's quick start, run as written: the commands between `<!-- quickstart -->` and
//! `<!-- /quickstart -->` start the real `api --with-worker` binary on an empty database, walk the
//! simulator's users through the shop and read a user's context back with the README's `curl`.
//! The only departures are what keeps the run to itself: its own database, stream keys and port.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use common::{Keys, TestDb, closed_addr, redis_url};
use tokio::process::{Child, Command};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

fn readme() -> String {
    std::fs::read_to_string(workspace_root().join("README.md")).unwrap()
}

/// The shell commands of README's quick start, one per line, as words (comments removed).
fn quickstart_commands(readme: &str) -> Vec<Vec<String>> {
    let start = readme
        .find("<!-- quickstart -->")
        .expect("README.md marks its quick start with <!-- quickstart -->");
    let end = readme[start..]
        .find("<!-- /quickstart -->")
        .expect("README.md ends its quick start with <!-- /quickstart -->")
        + start;
    let mut in_code = false;
    let mut commands = Vec::new();
    for line in readme[start..end].lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            let words = shlex::split(line)
                .unwrap_or_else(|| panic!("quick start line {line:?} is not a shell command"));
            if !words.is_empty() {
                commands.push(words);
            }
        }
    }
    commands
}

/// `cargo run -p api [--bin NAME] [-- ARGS…]` as the built binary and its arguments.
fn cargo_run(words: &[String]) -> (&'static str, Vec<String>) {
    let command = words.join(" ");
    assert_eq!(
        words[..4],
        ["cargo", "run", "-p", "api"],
        "quick start command {command:?} runs the api package"
    );
    let (bin, rest) = match words.get(4).map(String::as_str) {
        Some("--bin") => (words[5].as_str(), &words[6..]),
        _ => ("api", &words[4..]),
    };
    let args = match rest.split_first() {
        Some((dashes, args)) if dashes == "--" => args.to_vec(),
        None => Vec::new(),
        _ => panic!("unexpected cargo arguments in {command:?}"),
    };
    let exe = match bin {
        "api" => env!("CARGO_BIN_EXE_api"),
        "traffic" => env!("CARGO_BIN_EXE_traffic"),
        other => panic!("unknown binary {other:?} in {command:?}"),
    };
    (exe, args)
}

/// A `curl URL -H 'Name: value'` as its URL and headers.
fn curl(words: &[String]) -> (String, Vec<(String, String)>) {
    assert_eq!(words[0], "curl", "quick start ends with a curl: {words:?}");
    let url = words
        .iter()
        .find(|w| w.starts_with("http"))
        .expect("curl has a URL")
        .clone();
    let headers = words
        .windows(2)
        .filter(|w| w[0] == "-H")
        .map(|w| {
            let (name, value) = w[1].split_once(':').expect("header is `Name: value`");
            (name.trim().to_string(), value.trim().to_string())
        })
        .collect();
    (url, headers)
}

/// A variable `.env.example` documents: `NAME=value`, or `# NAME=value` for an example that
/// is not a default.
struct Documented {
    name: String,
    value: String,
    commented: bool,
}

fn env_example() -> Vec<Documented> {
    std::fs::read_to_string(workspace_root().join(".env.example"))
        .unwrap()
        .lines()
        .filter_map(|line| {
            let commented = line.starts_with('#');
            let (name, value) = line.trim_start_matches(['#', ' ']).split_once('=')?;
            let is_name = name.len() > 1
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            is_name.then(|| Documented {
                name: name.to_string(),
                value: value.trim().trim_matches('"').to_string(),
                commented,
            })
        })
        .collect()
}

/// A command with none of the product's variables set (as on a fresh clone with no `.env`),
/// run from a directory with no `.env` above it, plus `overrides`.
fn fresh_command(exe: &str, args: &[String], cwd: &Path, overrides: &[(&str, String)]) -> Command {
    let mut command = Command::new(exe);
    command.args(args).current_dir(cwd).kill_on_drop(true);
    for var in env_example() {
        command.env_remove(var.name);
    }
    command.env_remove("TRAFFIC_URL");
    for (name, value) in overrides {
        command.env(name, value);
    }
    command
}

fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

async fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().expect("still running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the api stops within 30 s of SIGTERM")
        .unwrap()
}

#[tokio::test]
async fn readme_quick_start_shows_a_users_context() {
    let commands = quickstart_commands(&readme());
    assert_eq!(
        commands.len(),
        3,
        "the quick start is: start the pipeline, run the simulator, read a context: {commands:?}"
    );
    let (api_exe, api_args) = cargo_run(&commands[0]);
    assert_eq!(api_exe, env!("CARGO_BIN_EXE_api"));
    let (traffic_exe, traffic_args) = cargo_run(&commands[1]);
    assert_eq!(traffic_exe, env!("CARGO_BIN_EXE_traffic"));
    let (context_url, headers) = curl(&commands[2]);
    let readme_base = "http://127.0.0.1:8000";
    let context_path = context_url
        .strip_prefix(readme_base)
        .expect("the curl reads from the api's default address");

    // Isolation: an empty database (the api applies the migrations), its own streams and port.
    let db = TestDb::create_empty().await;
    let keys = Keys::new();
    let port = closed_addr().port();
    let base = format!("http://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("api.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let overrides = [
        ("DATABASE_URL", db.url.clone()),
        ("REDIS_URL", redis_url()),
        ("QUEUE_NAME", keys.stream.clone()),
        ("DLQ_NAME", keys.dlq.clone()),
        ("API_BIND", format!("127.0.0.1:{port}")),
        ("WORKER_METRICS_BIND", closed_addr().to_string()),
        (
            "RULES_DIR",
            workspace_root().join("rules").display().to_string(),
        ),
        ("RUST_LOG", "info".into()),
    ];
    let mut api = fresh_command(api_exe, &api_args, dir.path(), &overrides)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let fail = |what: &str| -> ! { panic!("{what}\n--- api log ---\n{}", tail(&log_path)) };

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = api.try_wait() {
            fail(&format!("the api exited at start: {status}"));
        }
        if let Ok(resp) = http.get(format!("{base}/ready")).send().await
            && resp.status().is_success()
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            fail("the api did not become ready within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let traffic = fresh_command(
        traffic_exe,
        &traffic_args,
        dir.path(),
        &[("TRAFFIC_URL", base.clone())],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), traffic.wait_with_output())
        .await
        .unwrap_or_else(|_| fail("the simulator did not finish within 60 s"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        fail(&format!(
            "the simulator failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    assert!(stdout.contains("user_1") && stdout.contains("P.") && stdout.contains("C."));
    assert!(!stdout.contains('x'), "no request was rejected:\n{stdout}");

    // The worker inside the api stores the events; the README's curl then shows the context.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let context = loop {
        let mut request = http.get(format!("{base}{context_path}"));
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        if let Ok(resp) = request.send().await
            && resp.status().is_success()
        {
            let body: serde_json::Value = resp.json().await.unwrap();
            if body["stats"]["event_count"].as_u64().unwrap_or(0) > 0 {
                break body;
            }
        }
        if let Ok(Some(status)) = api.try_wait() {
            fail(&format!("the api exited: {status}"));
        }
        if tokio::time::Instant::now() > deadline {
            fail(&format!("no context at {context_path} within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(context["user_id"], "user_1");
    assert!(
        !context["summary"].as_str().unwrap_or_default().is_empty()
            && !context["recent_history"].as_array().unwrap().is_empty(),
        "the context tells what the user did: {context:#}"
    );

    let status = terminate(&mut api).await;
    if !status.success() {
        fail(&format!("the api did not stop cleanly: {status}"));
    }
}

/// A broken worker half must not leave an api serving without anyone consuming.
#[tokio::test]
async fn with_worker_exits_when_the_worker_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let overrides = [
        ("API_BIND", closed_addr().to_string()),
        ("QUEUE_NAME", keys.stream.clone()),
        ("DLQ_NAME", keys.dlq.clone()),
        (
            "RULES_DIR",
            dir.path().join("missing").display().to_string(),
        ),
        ("MIGRATE_ON_START", "false".into()),
    ];
    let out = fresh_command(
        env!("CARGO_BIN_EXE_api"),
        &["--with-worker".into()],
        dir.path(),
        &overrides,
    )
    .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("the process exits instead of hanging")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exit status: {}", out.status);
    assert!(stderr.contains("worker failed"), "{stderr}");
}

#[test]
fn production_without_a_secret_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_api"))
        .current_dir(dir.path())
        .env_remove("API_SECRET_KEY")
        .env("ENVIRONMENT", "production")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(out.status.code(), Some(infra::config::EXIT_CONFIG_ERROR));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "configuration error: API_SECRET_KEY: is required but not set"
    );
}

/// `api healthcheck` (the image's HEALTHCHECK) asks this api's `/health` on `API_BIND`: 0 while
/// it serves (`0.0.0.0` asked on loopback), 1 with one line once it stopped or when something
/// else answers there.
#[tokio::test]
async fn healthcheck_exits_0_while_the_api_serves_and_1_otherwise() {
    let healthcheck = |bind: String| async move {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_api"))
            .arg("healthcheck")
            .current_dir(dir.path())
            // a production environment without a key: the healthcheck reads API_BIND alone
            .env("ENVIRONMENT", "production")
            .env_remove("API_SECRET_KEY")
            .env("API_BIND", bind)
            .output()
            .await
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let app = common::TestApp::spawn().await;
    let addr = app.addr;
    let healthy = format!("healthy: http://{addr}/health answered 200");
    for bind in [addr.to_string(), format!("0.0.0.0:{}", addr.port())] {
        assert_eq!(
            healthcheck(bind).await,
            (Some(0), healthy.clone(), String::new())
        );
    }
    app.stop().await.unwrap();
    let refused = format!("unhealthy: http://{addr}/health: connection refused");
    assert_eq!(
        healthcheck(addr.to_string()).await,
        (Some(1), String::new(), refused)
    );

    // something that is not this api answers there: a plain TCP server closing at once
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_addr = other.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = other.accept().await {
            drop(conn);
        }
    });
    let (code, _, stderr) = healthcheck(other_addr.to_string()).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.starts_with("unhealthy: http://"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// docs/configuration.md's table and `.env.example` document the same variables, with the
/// same defaults.
#[test]
fn configuration_table_matches_env_example() {
    let doc = std::fs::read_to_string(workspace_root().join("docs/configuration.md")).unwrap();
    let mut table = std::collections::BTreeMap::new();
    for row in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        table.insert(cells[1].trim_matches('`').to_string(), cells[2].to_string());
    }
    let documented: std::collections::BTreeMap<String, Documented> = env_example()
        .into_iter()
        .map(|var| (var.name.clone(), var))
        .collect();
    let only_doc: Vec<_> = table
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    let only_example: Vec<_> = documented
        .keys()
        .filter(|k| !table.contains_key(*k))
        .collect();
    assert!(
        only_doc.is_empty() && only_example.is_empty(),
        "docs/configuration.md only: {only_doc:?}; .env.example only: {only_example:?}"
    );
    for (name, var) in &documented {
        assert!(
            var.commented || var.value.is_empty() || table[name].contains(var.value.as_str()),
            "{name}: docs/configuration.md's default is {:?}, .env.example's is {:?}",
            table[name],
            var.value
        );
    }
}
