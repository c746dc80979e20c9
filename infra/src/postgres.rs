//! Postgres connections as the api and the worker open them (Nagle's algorithm off), and
//! `StoreError`.
//!
//! sqlx 0.9.0 leaves `TCP_NODELAY` unset (sqlx issue #4335), so a large statement waits on the
//! server's delayed ACKs; each connection sets it on its own socket, which sqlx does not expose and
//! is borrowed by descriptor number: the only unsafe code here.
#![allow(unsafe_code)]

use std::{
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::Arc,
    time::Duration,
};

use sea_orm::{
    ConnectOptions, DbErr, RuntimeErr,
    sqlx::{self, postgres::PgConnection},
};

/// A kept connection idle at least this long is pinged before it serves again (a server restart
/// may have closed it); one used more recently is not, saving a round trip per use.
pub const CHECK_IF_IDLE_FOR: Duration = Duration::from_secs(10);

/// A sqlx error (raw statements) as sea-orm reports its own.
pub fn db_err(err: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(Arc::new(err)))
}

/// Makes every connection of the pool `options` builds disable Nagle's algorithm. This is the
/// pool's `after_connect` hook: it replaces the one sea-orm installs for a schema search path
/// (not used here).
pub fn no_delay_on_connect(options: &mut ConnectOptions) -> &mut ConnectOptions {
    options.map_sqlx_postgres_pool_opts(|pool| {
        pool.after_connect(|conn, _| {
            Box::pin(async move {
                disable_nagle(conn).await;
                Ok(())
            })
        })
    })
}

/// Sets `TCP_NODELAY` on the socket of `conn`. A connection over a Unix socket is left as it is;
/// one whose socket is not found (the server sees it through a proxy or NAT) is too, with one
/// warning per process. Never fails the connection: at worst it keeps Nagle's algorithm.
pub async fn disable_nagle(conn: &mut PgConnection) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let warn_once = |what: &str| {
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!("{what}: Nagle's algorithm stays on (large statements may wait ~40 ms)");
        }
    };
    match socket_of(conn).await {
        Ok(Some(fd)) => {
            // SAFETY: `fd` was open a moment ago; if another thread closed it since, the call
            // fails (EBADF) or sets the option on another TCP socket, which is harmless.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            if let Err(err) = socket2::SockRef::from(&fd).set_tcp_nodelay(true) {
                warn_once(&format!(
                    "could not set TCP_NODELAY on the Postgres connection ({err})"
                ));
            }
        }
        Ok(None) => {}
        Err(Lookup::NotFound) => {
            warn_once("the Postgres connection's socket was not found (proxy or NAT?)")
        }
        Err(Lookup::Query(err)) => warn_once(&format!(
            "could not ask Postgres for the connection's ports ({err})"
        )),
    }
}

/// Whether `conn`'s socket has Nagle's algorithm off; `None` when its socket is not found.
pub async fn nagle_disabled(conn: &mut PgConnection) -> Result<Option<bool>, sqlx::Error> {
    Ok(match socket_of(conn).await {
        Ok(fd) => fd.and_then(|fd| {
            // SAFETY: as in `disable_nagle`.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            socket2::SockRef::from(&fd).tcp_nodelay().ok()
        }),
        Err(Lookup::Query(err)) => return Err(err),
        Err(Lookup::NotFound) => None,
    })
}

enum Lookup {
    Query(sqlx::Error),
    NotFound,
}

/// The descriptor of `conn`'s TCP socket: the one whose local and peer ports are the ports the
/// server sees the session come from and arrive at. `None` for a Unix socket.
async fn socket_of(conn: &mut PgConnection) -> Result<Option<RawFd>, Lookup> {
    let (client, server): (Option<i32>, Option<i32>) =
        sqlx::query_as("SELECT inet_client_port(), inet_server_port()")
            .fetch_one(&mut *conn)
            .await
            .map_err(Lookup::Query)?;
    let port = |p: Option<i32>| p.and_then(|p| u16::try_from(p).ok());
    let (Some(local), Some(peer)) = (port(client), port(server)) else {
        return Ok(None); // Unix socket
    };
    own_tcp_socket(local, peer)
        .map(Some)
        .ok_or(Lookup::NotFound)
}

/// This process' TCP socket from local port `local` to peer port `peer`.
fn own_tcp_socket(local: u16, peer: u16) -> Option<RawFd> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .find(|&fd| {
            // SAFETY: as in `disable_nagle`: a closed or reused descriptor only fails the query.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let sock = socket2::SockRef::from(&fd);
            let port = |addr: std::io::Result<socket2::SockAddr>| {
                addr.ok().and_then(|a| a.as_socket()).map(|a| a.port())
            };
            matches!(sock.r#type(), Ok(socket2::Type::STREAM))
                && port(sock.local_addr()) == Some(local)
                && port(sock.peer_addr()) == Some(peer)
        })
        .map(|fd| fd.as_raw_fd())
}

/// Why a batch was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    #[error("database did not answer within {0:?}")]
    Timeout(Duration),
}

impl StoreError {
    /// The data of some event was rejected (SQLSTATE class 22 data exception, 23 integrity,
    /// 54 limit exceeded): retrying the same batch cannot succeed. Everything else (connection
    /// lost, timeouts, deadlocks, missing tables) is treated as transient.
    pub fn is_data_error(&self) -> bool {
        self.database_error()
            .and_then(|db| db.code())
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54"))
    }

    /// Whether an insert failed because an event of the batch was stored already.
    pub fn is_stored_event(&self) -> bool {
        self.database_error().is_some_and(|db| {
            db.code().as_deref() == Some("23505") && db.constraint() == Some("events_pkey")
        })
    }

    /// The error Postgres answered, if it answered one.
    fn database_error(&self) -> Option<&dyn sqlx::error::DatabaseError> {
        match self {
            Self::Db(
                DbErr::Exec(RuntimeErr::SqlxError(err)) | DbErr::Query(RuntimeErr::SqlxError(err)),
            ) => match err.as_ref() {
                sqlx::Error::Database(db) => Some(db.as_ref()),
                _ => None,
            },
            _ => None,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        Self::Db(db_err(err))
    }
}
