//! A local three-master Redis Cluster for the tests of one process: started on first use (free
//! ports, `redis-cli --cluster create`), shared by every test of the process, and gone with it.
//!
//! Each node runs under a small shell watchdog that stops it once the test process has exited,
//! however it exits (statics are never dropped), and removes the nodes' files: `cargo test`
//! leaves no `redis-server` behind.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
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
    /// With TLS: the CA that signed the nodes' certificate (`REDIS_CA_CERT`).
    pub ca: Option<PathBuf>,
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
        infra::redis::RedisClient::open(&self.redis_url(), true, self.ca.as_deref())
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
            None => Some(start(None)),
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

/// The certificate files of a TLS cluster's nodes.
pub struct TlsFiles<'a> {
    /// The CA that signed `cert`.
    pub ca: &'a Path,
    /// The nodes' certificate (for 127.0.0.1) and its key.
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// A cluster of its own whose nodes speak TLS only (client and cluster bus), `rediss://` seeds;
/// its nodes stop when the test process ends. Needs `redis-server` and `redis-cli` built with
/// TLS.
pub fn start_tls_cluster(tls: &TlsFiles) -> RedisCluster {
    start(Some(tls))
}

fn start(tls: Option<&TlsFiles>) -> RedisCluster {
    // Removed by the nodes' watchdogs (a static's guard would never drop).
    let dir = tempfile::tempdir().expect("a temporary directory").keep();
    let ports = free_ports(3);
    let parent = std::process::id();
    let mut watchdogs = Vec::new();
    for port in &ports {
        let conf = dir.join(format!("nodes-{port}.conf"));
        // The node runs in the background of a shell that waits for the test process to be gone,
        // then stops it (and stops waiting if the node died first) and removes the files.
        let listen = match tls {
            None => format!("--port {port}"),
            Some(tls) => format!(
                "--port 0 --tls-port {port} --tls-cluster yes --tls-auth-clients no \
                 --tls-cert-file '{}' --tls-key-file '{}' --tls-ca-cert-file '{}'",
                tls.cert.display(),
                tls.key.display(),
                tls.ca.display()
            ),
        };
        let script = format!(
            "redis-server --cluster-enabled yes {listen} --bind 127.0.0.1 \
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
    let scheme = if tls.is_some() { "rediss" } else { "redis" };
    let nodes: Vec<String> = ports
        .iter()
        .map(|p| format!("{scheme}://127.0.0.1:{p}"))
        .collect();
    for &port in &ports {
        wait_for(&format!("node {port} answers PING"), || {
            cli(port, tls, &["PING"]).is_some_and(|pong| pong.contains("PONG"))
        });
    }
    // It waits for the nodes to join for as long as it takes: bounded here.
    let mut create = redis_cli(tls)
        .arg("--cluster")
        .arg("create")
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-cli runs");
    let deadline = Instant::now() + FORM_TIMEOUT;
    let status = loop {
        match create.try_wait() {
            Ok(Some(status)) => break Some(status),
            _ if Instant::now() > deadline => {
                let _ = create.kill();
                let _ = create.wait();
                break None;
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "redis-cli --cluster create failed or the nodes did not join: {status:?} (for TLS the \
         nodes' certificate needs clientAuth too)"
    );
    for &port in &ports {
        wait_for(&format!("node {port} reports cluster_state:ok"), || {
            cli(port, tls, &["CLUSTER", "INFO"])
                .is_some_and(|info| info.contains("cluster_state:ok"))
        });
    }
    RedisCluster {
        nodes,
        ca: tls.map(|tls| tls.ca.to_path_buf()),
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

/// `redis-cli`, with TLS (trusting the cluster's CA) when `tls`.
fn redis_cli(tls: Option<&TlsFiles>) -> Command {
    let mut cli = Command::new("redis-cli");
    if let Some(tls) = tls {
        cli.arg("--tls").arg("--cacert").arg(tls.ca);
    }
    cli
}

/// The reply of the node on `port` to `args` (`None` when it does not answer).
fn cli(port: u16, tls: Option<&TlsFiles>, args: &[&str]) -> Option<String> {
    let out = redis_cli(tls)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + FORM_TIMEOUT;
    while !check() {
        assert!(Instant::now() < deadline, "local Redis Cluster: no {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
