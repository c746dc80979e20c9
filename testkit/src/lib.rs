//! What every crate's tests share: a database of its own per test ([`TestDb`]), Redis keys of
//! its own per test ([`Keys`]), [`wait_until`], strict reads of a `/metrics` scrape ([`Scrape`]),
//! a TCP [`Proxy`] that takes a service "down", [`StopOnDrop`] for the services a test runs, and a
//! local three-master Redis Cluster per test process ([`redis_cluster`]).
//!
//! Tests talk to the real services, never mocks:
//!
//! | variable | default | what |
//! | --- | --- | --- |
//! | `DATABASE_URL` | `postgres://postgres@127.0.0.1:5432/postgres` | a Postgres role that may create and drop databases; each [`TestDb`] is created beside the database it names |
//! | `REDIS_URL` | `redis://127.0.0.1:6379` | the Redis every test's keys live in |
//!
//! Everything a test creates is removed when its guard drops, also when the test panics:
//! databases are named `test_<crate>_<uuid>`, stream keys `test:<uuid>:…`.

mod cluster;
mod db;
mod metrics;
mod proxy;
mod rules;
mod stream;

use std::{net::SocketAddr, time::Duration};

use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;

pub use cluster::{RedisCluster, TlsFiles, redis_cluster, start_tls_cluster};
pub use db::TestDb;
pub use metrics::{Scrape, scrape};
pub use proxy::Proxy;
pub use rules::{rules_dir_with, shipped_rules};
pub use stream::{
    Keys, consumers, create_group, dead_letters, envelope, envelopes, group_created, pending,
    publish, publish_raw, read_group, redis, stream_names, xlen,
};

/// The longest a test waits for something another task or process does.
pub const WAIT: Duration = Duration::from_secs(20);

/// The Postgres server tests use (`DATABASE_URL`), naming its admin database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The Redis tests use (`REDIS_URL`).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Polls `check` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An address on this host nothing listens on right now (to configure a service that is down,
/// or a port for a server to take).
pub fn closed_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
}

/// Stops a service task of the test when dropped: cancels its shutdown and, on a multi-thread
/// runtime, waits (a while) for it to finish, then aborts it. A test that panics then leaves
/// nothing running that writes to its keys or database after they are removed; declare it after
/// the [`Keys`] and [`TestDb`] the task uses, so that it drops first.
pub struct StopOnDrop {
    shutdown: CancellationToken,
    task: AbortHandle,
}

impl StopOnDrop {
    pub fn new<T>(shutdown: &CancellationToken, task: &JoinHandle<T>) -> Self {
        Self {
            shutdown: shutdown.clone(),
            task: task.abort_handle(),
        }
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // A graceful stop flushes what the task holds (e.g. the unmatched report): wait for it,
        // where the runtime has other threads to run it on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current()
            && runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            && !self.task.is_finished()
        {
            let task = self.task.clone();
            tokio::task::block_in_place(|| {
                runtime.block_on(async {
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    while !task.is_finished() && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            });
        }
        self.task.abort();
    }
}

/// The parts of a service URL: `scheme://authority`, then the path, then `?query` (or "").
fn url_parts(url: &str) -> (&str, &str, &str) {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let path = url[authority..]
        .find(['/', '?'])
        .map_or(url.len(), |i| authority + i);
    let query = url[path..].find('?').map_or(url.len(), |i| path + i);
    (&url[..path], &url[path..query], &url[query..])
}

/// `host:port` of a service URL, `default_port` when it names none.
fn host_port(url: &str, default_port: u16) -> String {
    let (base, _, _) = url_parts(url);
    let host = base[base.find("://").map_or(0, |i| i + 3)..]
        .rsplit('@')
        .next()
        .unwrap_or_default();
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_string()
    } else {
        format!("{host}:{default_port}")
    }
}

/// `url` with its `host:port` replaced by `addr`, credentials kept.
fn via(url: &str, addr: SocketAddr) -> String {
    let (base, path, query) = url_parts(url);
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_start = base[scheme_end..]
        .rfind('@')
        .map_or(scheme_end, |i| scheme_end + i + 1);
    format!("{}{addr}{path}{query}", &base[..host_start])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart_and_pointed_elsewhere() {
        let url = "postgres://u:p@db.test:6543/app?sslmode=disable";
        assert_eq!(
            url_parts(url),
            ("postgres://u:p@db.test:6543", "/app", "?sslmode=disable")
        );
        assert_eq!(host_port(url, 5432), "db.test:6543");
        assert_eq!(host_port("postgres://u@db.test/app", 5432), "db.test:5432");
        assert_eq!(host_port("redis://127.0.0.1:6379", 6379), "127.0.0.1:6379");
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(
            via(url, addr),
            "postgres://u:p@127.0.0.1:9/app?sslmode=disable"
        );
        assert_eq!(via("redis://127.0.0.1:6379", addr), "redis://127.0.0.1:9");
    }
}
