//! The Postgres connections of the context read path: a connection goes back untested after a
//! read that ran to its end (it is idle and ready; sqlx's pool would ping it, a second round
//! trip for a one-statement read) and is dropped after one that did not. One idle for a while is
//! pinged before use. A read abandoned mid-statement frees its permit at once, so Postgres can
//! briefly hold more than `max` of these sessions.

use std::{
    ops::{Deref, DerefMut},
    sync::Mutex,
    time::{Duration, Instant},
};

use infra::postgres::CHECK_IF_IDLE_FOR;
use sea_orm::sqlx::{
    self, ConnectOptions as _, Connection,
    postgres::{PgConnectOptions, PgConnection},
};
use tokio::sync::{Semaphore, SemaphorePermit};

/// A connection idle this long is closed (frees its Postgres backend).
const CLOSE_IF_IDLE_FOR: Duration = Duration::from_secs(600);

/// A bounded set of connections, opened on demand.
pub struct ReadConnections {
    options: PgConnectOptions,
    /// Most recently released last: reads reuse the warmest connection, and the coldest ones age
    /// out at the bottom.
    idle: Mutex<Vec<(PgConnection, Instant)>>,
    permits: Semaphore,
    max: usize,
    connect_timeout: Duration,
    acquire_timeout: Duration,
}

/// One connection, taken for one read. Call [`ReadConnection::release`] once the read completed.
pub struct ReadConnection<'a> {
    owner: &'a ReadConnections,
    conn: Option<PgConnection>,
    reused: bool,
    _permit: SemaphorePermit<'a>,
}

impl ReadConnections {
    /// At most `max` connections to `database_url`; none is opened until a read needs it.
    pub fn new(
        database_url: &str,
        max: usize,
        connect_timeout: Duration,
        acquire_timeout: Duration,
    ) -> Result<Self, sqlx::Error> {
        Ok(Self {
            // Statements are not logged (as the other pools' are not): every read would be.
            options: database_url
                .parse::<PgConnectOptions>()?
                .disable_statement_logging(),
            idle: Mutex::new(Vec::with_capacity(max)),
            permits: Semaphore::new(max),
            max,
            connect_timeout,
            acquire_timeout,
        })
    }

    /// An idle connection, or a new one while fewer than `max` are open; waits for one to be
    /// released otherwise (at most the acquire timeout).
    pub async fn acquire(&self) -> Result<ReadConnection<'_>, sqlx::Error> {
        let permit = tokio::time::timeout(self.acquire_timeout, self.permits.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        loop {
            let idle = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                close_long_idle(&mut idle, Instant::now());
                idle.pop()
            };
            let reused = idle.is_some();
            let conn = match idle {
                Some((mut conn, since)) => {
                    if since.elapsed() >= CHECK_IF_IDLE_FOR {
                        let ping = tokio::time::timeout(self.connect_timeout, conn.ping()).await;
                        if !matches!(ping, Ok(Ok(()))) {
                            continue; // closed (or unanswering) while idle: dropped, try the next
                        }
                    }
                    conn
                }
                None => tokio::time::timeout(self.connect_timeout, async {
                    let mut conn = PgConnection::connect_with(&self.options).await?;
                    infra::postgres::disable_nagle(&mut conn).await;
                    Ok::<_, sqlx::Error>(conn)
                })
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)??,
            };
            return Ok(ReadConnection {
                owner: self,
                conn: Some(conn),
                reused,
                _permit: permit,
            });
        }
    }

    /// The most connections open at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// How many connections are open and idle.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl ReadConnection<'_> {
    /// Whether the connection served an earlier read (and so may have been closed since).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Gives the connection back for the next read: only after a statement ran to its end.
    pub fn release(mut self) {
        let Some(conn) = self.conn.take() else { return };
        let now = Instant::now();
        let mut idle = self.owner.idle.lock().unwrap_or_else(|e| e.into_inner());
        close_long_idle(&mut idle, now);
        idle.push((conn, now));
    }
}

/// Drops (so closes) the connections unused for [`CLOSE_IF_IDLE_FOR`]: the coldest come first.
fn close_long_idle(idle: &mut Vec<(PgConnection, Instant)>, now: Instant) {
    let stale = idle
        .iter()
        .take_while(|(_, since)| now.duration_since(*since) >= CLOSE_IF_IDLE_FOR)
        .count();
    idle.drain(..stale);
}

impl Deref for ReadConnection<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("connection taken only by release")
    }
}

impl DerefMut for ReadConnection<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("connection taken only by release")
    }
}
