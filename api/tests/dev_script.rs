//! `deploy/dev.sh`, the README's first two commands, run as on a fresh machine: with REDIS_URL,
//! DATABASE_URL and API_BIND on free local ports, it starts a private Redis and Postgres there,
//! the pipeline takes an event and serves its context, a second run finds the data again, and
//! SIGINT leaves no process and no listener behind. `deploy/dev.sh test` does the same for a
//! test command and exits with its status. Reads /proc, so Linux only (CI's platform).
#![cfg(target_os = "linux")]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

const SECRET_KEY: &str = "local_dev_secret_key_12345";
const INGEST_KEY: &str = "local_dev_ingest_key_12345";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
        .is_ok()
}

/// One run's setting: its ports, its data directory, its log.
struct Setup {
    redis_port: u16,
    pg_port: u16,
    api_port: u16,
    metrics_port: u16,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let setup = Self {
            redis_port: free_port(),
            pg_port: free_port(),
            api_port: free_port(),
            metrics_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
        };
        for port in setup.ports() {
            assert!(!listening(port), "port {port} is free before the run");
        }
        setup
    }

    fn ports(&self) -> [u16; 4] {
        [
            self.redis_port,
            self.pg_port,
            self.api_port,
            self.metrics_port,
        ]
    }

    fn database_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.pg_port)
    }

    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("dev.log")
    }

    /// `deploy/dev.sh ARGS` with every variable of `.env.example` at its documented default
    /// (whatever `.env` says), then this run's addresses; its output appended to the log.
    fn dev_sh(&self, args: &[&str], extra: &[(&str, String)]) -> Child {
        let mut command = Command::new(workspace_root().join("deploy/dev.sh"));
        command.args(args).current_dir(workspace_root());
        let example = std::fs::read_to_string(workspace_root().join(".env.example")).unwrap();
        for line in example.lines() {
            let commented = line.starts_with('#');
            let Some((name, value)) = line.trim_start_matches(['#', ' ']).split_once('=') else {
                continue;
            };
            if !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                continue;
            }
            if commented {
                command.env_remove(name);
            } else {
                command.env(name, value.trim_matches('"'));
            }
        }
        for name in [
            "TEST_REDIS_URL",
            "TEST_DATABASE_ADMIN_URL",
            "DEV_TEST_COMMAND",
        ] {
            command.env_remove(name);
        }
        let data = self.dir.path().join("data");
        command
            .env("REDIS_URL", self.redis_url())
            .env("DATABASE_URL", self.database_url())
            .env("API_BIND", format!("127.0.0.1:{}", self.api_port))
            .env(
                "WORKER_METRICS_BIND",
                format!("127.0.0.1:{}", self.metrics_port),
            )
            .env("DEV_DIR", &data)
            .env("DEV_API_BIN", env!("CARGO_BIN_EXE_api"))
            .envs(extra.iter().map(|(k, v)| (k, v)));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("deploy/dev.sh runs")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn fail(&self, what: &str) -> ! {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        panic!(
            "{what}\n--- deploy/dev.sh output ---\n{}",
            lines[lines.len().saturating_sub(60)..].join("\n")
        )
    }

    /// Every process of the run: the script's descendants and whatever listens on its ports
    /// (with their descendants: Postgres backends).
    fn processes(&self, script: u32) -> BTreeSet<u32> {
        let mut roots: BTreeSet<u32> = [script].into();
        for port in self.ports() {
            roots.extend(procfs::listeners(port));
        }
        procfs::with_descendants(roots)
    }

    /// Nothing of the run is left: no process alive, no port answering.
    fn assert_nothing_left(&self, processes: &BTreeSet<u32>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let alive: Vec<u32> = processes
                .iter()
                .copied()
                .filter(|&pid| procfs::alive(pid))
                .collect();
            let open: Vec<u16> = self.ports().into_iter().filter(|&p| listening(p)).collect();
            if alive.is_empty() && open.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let described: Vec<String> =
                    alive.iter().map(|&pid| procfs::describe(pid)).collect();
                self.fail(&format!(
                    "left behind: processes {described:?}, listeners on {open:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn interrupt(child: &Child) {
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

fn wait_exit(setup: &Setup, child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            setup.fail(&format!("deploy/dev.sh still running after {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_machine_has_the_services_binaries() {
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
    };
    let debian_initdb = std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|versions| {
        versions
            .flatten()
            .any(|v| v.path().join("bin/initdb").is_file())
    });
    assert!(
        on_path("redis-server") && (on_path("initdb") || debian_initdb),
        "this test runs deploy/dev.sh's private Redis and Postgres from the machine's binaries: \
         redis-server and initdb (deploy/dev.sh installs them when nothing answers at the defaults)"
    );
}

/// Waits until `/health` answers and dev.sh has said so: the test must not interrupt the script
/// between the api answering and its progress line (`run` is which start of the script this is).
async fn wait_healthy(setup: &Setup, child: &mut Child, http: &reqwest::Client, run: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            setup.fail(&format!(
                "deploy/dev.sh exited before /health answered: {status}"
            ));
        }
        if let Ok(resp) = http.get(format!("{}/health", setup.base())).send().await
            && resp.status().is_success()
            && setup.log().matches("dev: api answering at").count() >= run
        {
            return;
        }
        if Instant::now() > deadline {
            setup.fail("/health and dev.sh's \"api answering\" line did not come within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The context of `user`, once it counts at least one event.
async fn context_with_events(
    setup: &Setup,
    http: &reqwest::Client,
    user: &str,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = http
            .get(format!("{}/context/user/{user}", setup.base()))
            .header("X-API-Key", SECRET_KEY)
            .send()
            .await;
        if let Ok(resp) = resp
            && resp.status().is_success()
        {
            let body: serde_json::Value = resp.json().await.unwrap();
            if body["stats"]["event_count"].as_u64().unwrap_or(0) > 0 {
                return body;
            }
        }
        if Instant::now() > deadline {
            setup.fail(&format!("no context with events for {user} within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn first_command_runs_the_pipeline_and_ctrl_c_leaves_nothing_behind() {
    assert_machine_has_the_services_binaries();
    let setup = Setup::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let user = "dev_script_user";

    // First run: fresh data, an event in, its context out.
    let mut dev = setup.dev_sh(&[], &[]);
    wait_healthy(&setup, &mut dev, &http, 1).await;
    let accepted = http
        .post(format!("{}/batch/", setup.base()))
        .json(&serde_json::json!({
            "api_key": INGEST_KEY,
            "batch": [{"event": "$pageview", "distinct_id": user,
                       "properties": {"$current_url": "https://shop.example.com/pricing",
                                      "$pathname": "/pricing"}}],
        }))
        .send()
        .await
        .unwrap();
    assert!(accepted.status().is_success(), "{}", accepted.status());
    let context = context_with_events(&setup, &http, user).await;
    assert_eq!(context["user_id"], user);
    let processes = setup.processes(dev.id());
    assert!(
        processes.len() >= 4,
        "the script, redis, postgres and the api: {processes:?}"
    );
    interrupt(&dev);
    let status = wait_exit(&setup, &mut dev, Duration::from_secs(60));
    assert_eq!(status.code(), Some(130), "SIGINT's conventional status");
    setup.assert_nothing_left(&processes);
    let log = setup.log();
    for line in [
        format!("dev: starting a private redis on {}", setup.redis_port),
        format!("dev: starting a private postgres on {}", setup.pg_port),
        "dev: creating a postgres".into(),
        format!("dev: api answering at {}", setup.base()),
        "dev: stopping the private postgres".into(),
    ] {
        assert!(log.contains(&line), "progress line {line:?} in:\n{log}");
    }

    // Second run: the same data directory, so the user's context is there at once.
    let mut dev = setup.dev_sh(&[], &[]);
    wait_healthy(&setup, &mut dev, &http, 2).await;
    let again = context_with_events(&setup, &http, user).await;
    assert_eq!(
        again["stats"]["event_count"],
        context["stats"]["event_count"]
    );
    let processes = setup.processes(dev.id());
    interrupt(&dev);
    wait_exit(&setup, &mut dev, Duration::from_secs(60));
    setup.assert_nothing_left(&processes);
    assert_eq!(
        setup.log().matches("dev: creating a postgres").count(),
        1,
        "the second run reuses the cluster"
    );
}

#[tokio::test]
async fn test_command_gets_the_services_and_its_exit_status_is_the_scripts() {
    assert_machine_has_the_services_binaries();
    let setup = Setup::new();
    let dir = setup.dir.path();
    // The test command: records the variables it was given, says it is running, and ends with
    // status 7 once told to.
    let command = r#"printf '%s\n' "$REDIS_URL" "$DATABASE_URL" "$TEST_REDIS_URL" "$TEST_DATABASE_ADMIN_URL" > "$PROBE/env"
touch "$PROBE/running"
for _ in $(seq 1200); do [ -e "$PROBE/finish" ] && exit 7; sleep 0.1; done
exit 1"#;
    let mut dev = setup.dev_sh(
        &["test"],
        &[
            ("DEV_TEST_COMMAND", command.into()),
            ("PROBE", dir.display().to_string()),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("running").exists() {
        if let Some(status) = dev.try_wait().unwrap() {
            setup.fail(&format!("deploy/dev.sh test exited early: {status}"));
        }
        if Instant::now() > deadline {
            setup.fail("the test command did not start within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let env = std::fs::read_to_string(dir.join("env")).unwrap();
    let expected = [
        setup.redis_url(),
        setup.database_url(),
        setup.redis_url(),
        setup.database_url(),
    ];
    assert_eq!(
        env.lines().collect::<Vec<_>>(),
        expected,
        "the variables the suites read"
    );

    // The services answer while the command runs.
    let mut redis = redis::Client::open(setup.redis_url())
        .unwrap()
        .get_connection()
        .unwrap();
    let pong: String = redis::cmd("PING").query(&mut redis).unwrap();
    assert_eq!(pong, "PONG");
    {
        use sea_orm::ConnectionTrait;
        let db = sea_orm::Database::connect(setup.database_url())
            .await
            .unwrap();
        db.execute_unprepared("select 1").await.unwrap();
        db.close().await.unwrap();
    }
    drop(redis);

    let processes = setup.processes(dev.id());
    std::fs::write(dir.join("finish"), "").unwrap();
    let status = wait_exit(&setup, &mut dev, Duration::from_secs(60));
    assert_eq!(status.code(), Some(7), "the test command's status");
    setup.assert_nothing_left(&processes);
    assert!(setup.log().contains("dev: stopping the private redis"));
}

/// What /proc says about processes and sockets.
mod procfs {
    use std::collections::BTreeSet;

    fn pids() -> impl Iterator<Item = u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
    }

    /// State and parent of a process, from /proc/PID/stat (after the command name, which may
    /// hold spaces and parentheses).
    fn stat(pid: u32) -> Option<(char, u32)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
        let state = fields.next()?.chars().next()?;
        let parent = fields.next()?.parse().ok()?;
        Some((state, parent))
    }

    pub fn alive(pid: u32) -> bool {
        stat(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
    }

    pub fn describe(pid: u32) -> String {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        format!(
            "{pid} {}",
            String::from_utf8_lossy(&cmdline).replace('\0', " ")
        )
    }

    pub fn with_descendants(mut set: BTreeSet<u32>) -> BTreeSet<u32> {
        let parents: Vec<(u32, u32)> = pids().filter_map(|pid| Some((pid, stat(pid)?.1))).collect();
        loop {
            let before = set.len();
            for &(pid, parent) in &parents {
                if set.contains(&parent) {
                    set.insert(pid);
                }
            }
            if set.len() == before {
                return set;
            }
        }
    }

    /// Processes holding a socket that listens on `port` (IPv4 or IPv6).
    pub fn listeners(port: u16) -> BTreeSet<u32> {
        let mut inodes = BTreeSet::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = fields[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                if local_port == Some(port) && fields[3] == "0A" {
                    inodes.insert(format!("socket:[{}]", fields[9]));
                }
            }
        }
        pids()
            .filter(|pid| {
                std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                    fds.flatten().any(|fd| {
                        std::fs::read_link(fd.path())
                            .is_ok_and(|target| inodes.contains(target.to_str().unwrap_or("")))
                    })
                })
            })
            .collect()
    }
}
