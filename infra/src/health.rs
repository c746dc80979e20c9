//! Pinging Redis and Postgres for readiness: each dependency by name and the kind of failure,
//! never the driver's text (which could carry a host or a URL).

use std::time::Duration;

use crate::redis::RedisConn;
use sea_orm::{ConnAcquireErr, DatabaseConnection, DbErr, RuntimeErr};

/// Longest a readiness check waits for one dependency.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// A Postgres ping slower than this is diagnosed with a connection of its own.
const DIAGNOSE_AFTER: Duration = Duration::from_millis(300);

/// Pings Redis and Postgres at once, each within [`CHECK_TIMEOUT`]: `(redis, postgres)`, for
/// each one that did not answer its name and the kind of failure (`redis: connection refused`,
/// `postgres: authentication failed`, `postgres: timeout`), never the driver's own text, which
/// could carry a host or a URL. The api's `/ready` and the worker's both report these; the
/// driver's error is logged.
pub async fn ping_dependencies(
    redis: &RedisConn,
    db: &DatabaseConnection,
) -> (Result<(), String>, Result<(), String>) {
    let redis = async {
        let mut conn = redis.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(CHECK_TIMEOUT, ping.query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(failed("redis", redis_failure(&error), &error)),
            Err(_) => Err(failed("redis", "timeout", &"no answer in time")),
        }
    };
    let postgres = async {
        let ping = tokio::time::timeout(CHECK_TIMEOUT, db.ping());
        // The pool retries a refused connection until its deadline and then says only "timed
        // out": when the ping is slow, one connection of our own tells why, and sooner.
        let diagnose = async {
            tokio::time::sleep(DIAGNOSE_AFTER).await;
            match postgres_connect_failure(db, CHECK_TIMEOUT - DIAGNOSE_AFTER).await {
                Some(failure) => failure,
                // it connects (the pool is busy) or is as slow: the ping decides
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            pinged = ping => match pinged {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(failed("postgres", postgres_failure(&error), &error)),
                Err(_) => Err(failed("postgres", "timeout", &"no answer in time")),
            },
            (kind, error) = diagnose => Err(failed("postgres", kind, &error)),
        }
    };
    tokio::join!(redis, postgres)
}

/// `dependency: kind`, the driver's error logged beside it.
fn failed(dependency: &str, kind: &str, error: &dyn std::fmt::Display) -> String {
    tracing::warn!(dependency, failure = kind, %error, "readiness check failed");
    format!("{dependency}: {kind}")
}

/// Why a direct connection with the pool's options fails (within `limit`), when it does.
async fn postgres_connect_failure(
    db: &DatabaseConnection,
    limit: Duration,
) -> Option<(&'static str, sea_orm::sqlx::Error)> {
    use sea_orm::sqlx::{ConnectOptions, Connection};
    let options = db.get_postgres_connection_pool().connect_options();
    match tokio::time::timeout(limit, options.connect()).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            None
        }
        Ok(Err(error)) => Some((sqlx_failure(&error), error)),
        Err(_) => None,
    }
}

/// The kind of a Redis failure, in words that never carry a URL or credentials.
pub fn redis_failure(error: &redis::RedisError) -> &'static str {
    use redis::{ErrorKind, ServerErrorKind};
    match (error.kind(), error.code()) {
        (ErrorKind::AuthenticationFailed, _) | (_, Some("NOAUTH" | "WRONGPASS")) => {
            "authentication failed"
        }
        (ErrorKind::Server(ServerErrorKind::NoPerm), _) => "permission denied",
        (ErrorKind::Server(ServerErrorKind::BusyLoading), _) => "loading",
        (ErrorKind::Server(ServerErrorKind::MasterDown | ServerErrorKind::ClusterDown), _) => {
            "down"
        }
        (ErrorKind::InvalidClientConfig, _) => "invalid configuration",
        _ if error.is_timeout() => "timeout",
        _ if error.is_connection_refusal() => "connection refused",
        _ if error.is_connection_dropped() => "connection lost",
        (ErrorKind::Io, _) => "unreachable",
        _ => "error",
    }
}

/// The kind of a Postgres failure, in words that never carry a URL or credentials.
pub fn postgres_failure(error: &DbErr) -> &'static str {
    match error {
        DbErr::ConnectionAcquire(ConnAcquireErr::Timeout) => "timeout",
        DbErr::ConnectionAcquire(_) => "connection closed",
        DbErr::Conn(RuntimeErr::SqlxError(e))
        | DbErr::Exec(RuntimeErr::SqlxError(e))
        | DbErr::Query(RuntimeErr::SqlxError(e)) => sqlx_failure(e),
        _ => "error",
    }
}

fn sqlx_failure(error: &sea_orm::sqlx::Error) -> &'static str {
    use sea_orm::sqlx::Error;
    match error {
        Error::Io(e) => io_failure(e),
        Error::Tls(_) => "tls error",
        Error::PoolTimedOut => "timeout",
        Error::PoolClosed => "connection closed",
        Error::Configuration(_) => "invalid configuration",
        Error::Protocol(_) => "protocol error",
        Error::Database(e) => match e.code().as_deref() {
            // invalid_password, invalid_authorization_specification
            Some("28P01" | "28000") => "authentication failed",
            Some("3D000") => "database does not exist",
            Some("57P03") => "starting up",
            Some("53300") => "too many connections",
            Some(c) if c.starts_with("57") => "shutting down",
            _ => "error",
        },
        _ => "error",
    }
}

fn io_failure(error: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused => "connection refused",
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
        ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe
        | ErrorKind::UnexpectedEof
        | ErrorKind::NotConnected => "connection lost",
        _ => "unreachable",
    }
}

/// Longest `api healthcheck` / `worker healthcheck` wait for their own `/health`.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// `GET /health` on this process's own server at `bind` (an unspecified address, `0.0.0.0` or
/// `[::]`, is asked on loopback), within [`PROBE_TIMEOUT`]: `Ok` with the URL when it answers
/// 200, else one line saying why. What `api healthcheck` and `worker healthcheck` run in
/// containers that have no curl.
pub async fn probe_health(bind: std::net::SocketAddr) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut addr = bind;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}/health");
    let ask = async {
        let io = |e: std::io::Error| io_failure(&e).to_string();
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        // The status line is all we need: `HTTP/1.1 200 OK`.
        let mut head = Vec::with_capacity(64);
        let mut buf = [0; 256];
        while !head.contains(&b'\n') && head.len() < 1024 {
            match stream.read(&mut buf).await.map_err(io)? {
                0 => break,
                n => head.extend_from_slice(&buf[..n]),
            }
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or_default();
        match line.split(' ').nth(1) {
            _ if !line.starts_with("HTTP/") => Err("not an HTTP answer".to_string()),
            Some("200") => Ok(()),
            Some(status) => Err(format!("answered {status}")),
            None => Err("not an HTTP answer".to_string()),
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, ask).await {
        Ok(Ok(())) => Ok(url),
        Ok(Err(why)) => Err(format!("{url}: {why}")),
        Err(_) => Err(format!(
            "{url}: no answer within {} s",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

/// Runs [`probe_health`] and says how it went in one line: on stdout and exit status 0 when
/// `/health` answered 200, on stderr and status 1 otherwise.
pub async fn healthcheck(bind: Result<std::net::SocketAddr, String>) -> std::process::ExitCode {
    let probed = match bind {
        Ok(bind) => probe_health(bind).await,
        Err(why) => Err(why),
    };
    match probed {
        Ok(url) => {
            println!("healthy: {url} answered 200");
            std::process::ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("unhealthy: {why}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A `/ready` answer: only `Ready` is answered with 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady,
    ShuttingDown,
}

impl Readiness {
    /// `ShuttingDown` once shutdown began, else `Ready` when every check passed.
    pub fn of(shutting_down: bool, all_ok: bool) -> Self {
        if shutting_down {
            Self::ShuttingDown
        } else if all_ok {
            Self::Ready
        } else {
            Self::NotReady
        }
    }

    /// The `status` field: `ready`, `not_ready` or `shutting_down`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::NotReady => "not_ready",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::{ConnectOptions, Database};

    use super::*;

    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn redis_at(url: &str) -> RedisConn {
        let client = crate::redis::client(url).unwrap();
        crate::redis::connection(client, Duration::from_secs(1))
            .unwrap()
            .into()
    }

    async fn postgres_at(url: &str) -> DatabaseConnection {
        let mut opts = ConnectOptions::new(url);
        opts.connect_lazy(true)
            .acquire_timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(2));
        Database::connect(opts).await.unwrap()
    }

    #[tokio::test]
    async fn failures_name_the_dependency_and_kind_never_the_url() {
        let port = closed_port();
        let redis = redis_at(&format!("redis://:hunter2@127.0.0.1:{port}"));
        let db = postgres_at(&format!("postgres://postgres:hunter2@127.0.0.1:{port}/x")).await;
        let started = std::time::Instant::now();
        let (redis, postgres) = ping_dependencies(&redis, &db).await;
        assert_eq!(redis.unwrap_err(), "redis: connection refused");
        assert_eq!(postgres.unwrap_err(), "postgres: connection refused");
        assert!(started.elapsed() < CHECK_TIMEOUT, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn refusals_by_the_server_are_named() {
        // the local services: a Redis user that does not exist, a database that does not
        let redis_url = std::env::var("REDIS_URL").unwrap_or("redis://127.0.0.1:6379".into());
        let host = redis_url
            .trim_start_matches("redis://")
            .rsplit('@')
            .next()
            .and_then(|rest| rest.split('/').next())
            .unwrap()
            .to_string();
        let redis = redis_at(&format!("redis://nobody:hunter2@{host}"));
        let database_url = std::env::var("DATABASE_URL")
            .unwrap_or("postgres://postgres@127.0.0.1:5432/postgres".into());
        let server = database_url.rsplit_once('/').unwrap().0;
        let db = postgres_at(&format!("{server}/no_such_database_here")).await;
        let (redis, postgres) = ping_dependencies(&redis, &db).await;
        assert_eq!(redis.unwrap_err(), "redis: authentication failed");
        assert_eq!(postgres.unwrap_err(), "postgres: database does not exist");
    }
}
