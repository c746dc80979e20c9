//! A local three-master Redis Cluster for the tests of one process: started on first use (free
//! ports, `redis-cli --cluster create`), shared by every test of the process, and gone with it.
//!
//! Each node runs under a small shell watchdog that stops it once the test process has exited,
//! however it exits (statics are never dropped), and removes the nodes' files: `cargo test`
//! leaves no `redis-server` behind.

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// How long the cluster may take to form.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// The running cluster's nodes.
pub struct RedisCluster {
    /// `redis://127.0.0.1:P` of each master.
    pub nodes: Vec<String>,
    /// The nodes' watchdog shells: they outlive this process by design, so none is waited for.
    _watchdogs: Vec<std::process::Child>,
}

impl RedisCluster {
    /// `REDIS_URL` of the cluster: every node, comma-separated (the seed list).
    pub fn redis_url(&self) -> String {
        self.nodes.join(",")
    }

    /// A connection to the cluster (commands routed by key), as the services make it.
    pub async fn connection(&self) -> infra::redis::RedisConn {
        infra::redis::RedisClient::open(&self.redis_url(), true, None)
            .expect("the cluster's seeds parse")
            .connection(infra::redis::COMMAND_TIMEOUT)
            .expect("a cluster connection")
    }
}

/// The process's cluster, started on first call (a few seconds); panics when it does not form.
/// `None` (with a note) where `redis-server` or `redis-cli` is not on PATH (a machine whose Redis
/// runs in Docker), except in CI (`CI` set), where that fails the test.
pub fn redis_cluster() -> Option<&'static RedisCluster> {
    static CLUSTER: OnceLock<Option<RedisCluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| match missing_tool() {
            Some(tool) => {
                assert!(std::env::var_os("CI").is_none(), "{tool} is not on PATH");
                eprintln!(
                    "skipped: {tool} is not on PATH (install Redis 7 to run the cluster tests)"
                );
                None
            }
            None => Some(start()),
        })
        .as_ref()
}

fn missing_tool() -> Option<&'static str> {
    ["redis-server", "redis-cli"].into_iter().find(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
    })
}

fn start() -> RedisCluster {
    // Removed by the nodes' watchdogs (a static's guard would never drop).
    let dir = tempfile::tempdir().expect("a temporary directory").keep();
    let ports = free_ports(3);
    let parent = std::process::id();
    let mut watchdogs = Vec::new();
    for port in &ports {
        let conf = dir.join(format!("nodes-{port}.conf"));
        // The node runs in the background of a shell that waits for the test process to be gone,
        // then stops it (and stops waiting if the node died first) and removes the files.
        let script = format!(
            "redis-server --cluster-enabled yes --port {port} --bind 127.0.0.1 \
             --cluster-config-file '{conf}' --dir '{dir}' --save '' --appendonly no \
             --daemonize no --loglevel warning & node=$!; \
             while kill -0 {parent} 2>/dev/null && kill -0 $node 2>/dev/null; do sleep 0.2; done; \
             kill $node 2>/dev/null; wait $node; rm -rf '{dir}'",
            conf = conf.display(),
            dir = dir.display(),
        );
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("sh runs redis-server (is Redis installed?)");
        watchdogs.push(watchdog);
    }
    let nodes: Vec<String> = ports
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    for node in &nodes {
        wait_for(&format!("{node} answers PING"), || {
            query::<String>(node, &redis::cmd("PING")).is_some()
        });
    }
    let created = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    assert!(
        created.status.success(),
        "redis-cli --cluster create failed: {}{}",
        String::from_utf8_lossy(&created.stdout),
        String::from_utf8_lossy(&created.stderr)
    );
    for node in &nodes {
        wait_for(&format!("{node} reports cluster_state:ok"), || {
            query::<String>(node, redis::cmd("CLUSTER").arg("INFO"))
                .is_some_and(|info| info.contains("cluster_state:ok"))
        });
    }
    RedisCluster {
        nodes,
        _watchdogs: watchdogs,
    }
}

/// `count` ports free now whose cluster bus port (`+10000`) is free too.
fn free_ports(count: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    // Held until all are chosen, so no port is picked twice.
    let mut held = Vec::new();
    while ports.len() < count {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free local port");
        let port = listener.local_addr().expect("a local address").port();
        let bus = port.checked_add(10_000).filter(|_| port < 55_000);
        if let Some(bus) = bus
            && let Ok(bus) = TcpListener::bind(("127.0.0.1", bus))
        {
            ports.push(port);
            held.push(bus);
        }
        held.push(listener);
    }
    ports
}

fn query<T: redis::FromRedisValue>(url: &str, cmd: &redis::Cmd) -> Option<T> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    cmd.query(&mut conn).ok()
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + FORM_TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "local Redis Cluster: no {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
