//! Postgres connections as the api and the worker open them: with Nagle's algorithm off.
//!
//! sqlx 0.9.0 leaves Nagle's algorithm on for TCP (sqlx issue #4335; fixed upstream, not yet
//! released). A message larger than one TLS record or socket write, such as a batch of events, is
//! then sent in parts, and each part after the first waits for the server's delayed ACK: about
//! 40 ms per statement. Until sqlx sets `TCP_NODELAY` itself, each new connection sets it here on
//! its own socket, found by the local port the server reports for the session. sqlx does not
//! expose the socket, so it is borrowed by descriptor number: the only unsafe code here.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use sea_orm::{
    ConnectOptions,
    sqlx::{self, postgres::PgConnection},
};

/// Makes every connection of the pool `options` builds disable Nagle's algorithm.
pub fn no_delay_on_connect(options: &mut ConnectOptions) -> &mut ConnectOptions {
    options.map_sqlx_postgres_pool_opts(|pool| {
        pool.after_connect(|conn, _| Box::pin(async move { disable_nagle(conn).await }))
    })
}

/// Sets `TCP_NODELAY` on the socket of `conn`. A connection over a Unix socket, or one the server
/// sees through a proxy or NAT (so under another port), is left as it is.
pub async fn disable_nagle(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    match socket_of(conn).await? {
        Some(fd) => {
            // SAFETY: `fd` was open a moment ago; if another thread closed it since, the call
            // fails (EBADF) or sets the option on another TCP socket, which is harmless.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            if let Err(err) = socket2::SockRef::from(&fd).set_tcp_nodelay(true) {
                tracing::debug!(%err, "could not set TCP_NODELAY on the Postgres connection");
            }
        }
        None => tracing::debug!(
            "Postgres connection's own TCP socket not found (Unix socket, proxy or NAT)"
        ),
    }
    Ok(())
}

/// Whether `conn`'s socket has Nagle's algorithm off; `None` when its socket is not found.
pub async fn nagle_disabled(conn: &mut PgConnection) -> Result<Option<bool>, sqlx::Error> {
    Ok(socket_of(conn).await?.and_then(|fd| {
        // SAFETY: as in `disable_nagle`.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        socket2::SockRef::from(&fd).tcp_nodelay().ok()
    }))
}

/// The descriptor of `conn`'s TCP socket: the one bound to the port the server sees it from.
async fn socket_of(conn: &mut PgConnection) -> Result<Option<RawFd>, sqlx::Error> {
    let port: Option<i32> = sqlx::query_scalar("SELECT inet_client_port()")
        .fetch_one(&mut *conn)
        .await?;
    Ok(port
        .and_then(|p| u16::try_from(p).ok())
        .and_then(own_tcp_socket))
}

/// This process' TCP socket bound to local `port`.
fn own_tcp_socket(port: u16) -> Option<RawFd> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .find(|&fd| {
            // SAFETY: as in `disable_nagle`: a closed or reused descriptor only fails the query.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            let sock = socket2::SockRef::from(&fd);
            matches!(sock.r#type(), Ok(socket2::Type::STREAM))
                && sock
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .is_some_and(|a| a.port() == port)
        })
        .map(|fd| fd.as_raw_fd())
}
