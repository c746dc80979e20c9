//! A Postgres database of one test's own: created (with the schema, or empty), dropped when the
//! guard drops, whether the test passed or panicked.

use sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, Statement,
    sqlx::{self, Connection, PgConnection},
};

use crate::{database_url, url_parts};

/// A database created for one test and dropped with it, even when the test panics.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub conn: DatabaseConnection,
    _dropper: Dropper,
}

impl TestDb {
    /// A database with the full schema.
    pub async fn create() -> Self {
        let db = Self::create_empty().await;
        migration::apply(&db.conn)
            .await
            .unwrap_or_else(|e| panic!("migrating {}: {e}", db.name));
        db
    }

    /// A database without any schema, for code that must apply the migrations itself.
    pub async fn create_empty() -> Self {
        let crate_name = std::env::var("CARGO_PKG_NAME").unwrap_or_default();
        let name = format!(
            "test_{}_{}",
            crate_name.replace('-', "_"),
            uuid::Uuid::new_v4().simple()
        );
        admin(&format!("CREATE DATABASE \"{name}\"")).await;
        // From here on the database is dropped however this test ends.
        let dropper = Dropper(name.clone());
        let url = named(&database_url(), &name);
        let conn = Database::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {name}: {e}"));
        Self {
            name,
            url,
            conn,
            _dropper: dropper,
        }
    }

    /// The single number `sql` selects (SQL's NULL, e.g. the sum of no rows, reads 0); panics,
    /// naming the query, when it fails.
    pub async fn count(&self, sql: &str) -> i64 {
        self.try_count(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// [`TestDb::count`], or the error, e.g. while the table does not exist yet.
    pub async fn try_count(&self, sql: &str) -> Result<i64, DbErr> {
        let row = self
            .conn
            .query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
            .await?
            .ok_or_else(|| DbErr::RecordNotFound(format!("no row from {sql}")))?;
        Ok(row.try_get_by_index::<Option<i64>>(0)?.unwrap_or(0))
    }

    /// The number of stored events.
    pub async fn events(&self) -> i64 {
        self.count("SELECT count(*) FROM events").await
    }

    /// The first column of every row `sql` selects, as text.
    pub async fn column(&self, sql: &str) -> Vec<String> {
        self.conn
            .query_all_raw(Statement::from_string(DbBackend::Postgres, sql))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .into_iter()
            .map(|r| r.try_get_by_index::<String>(0).unwrap())
            .collect()
    }

    /// Closes every connection to this database but the caller's (as a server restart would).
    pub async fn terminate_connections(&self) {
        admin(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            self.name
        ))
        .await;
    }
}

/// Runs `sql` on the server's admin database.
async fn admin(sql: &str) {
    let url = database_url();
    let mut conn = PgConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connecting to Postgres at DATABASE_URL: {e}"));
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    conn.close().await.ok();
}

/// `url` naming database `name` instead.
fn named(url: &str, name: &str) -> String {
    let (base, _, query) = url_parts(url);
    format!("{base}/{name}{query}")
}

/// Drops the database of its name when dropped.
struct Dropper(String);

impl Drop for Dropper {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.0);
        // A runtime of its own on a thread of its own: this may run while the test's runtime is
        // unwinding from a panic, or inside it, where blocking on it would deadlock.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&database_url()).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await?;
                conn.close().await
            })
            .map_err(std::io::Error::other)
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("testkit: database {} not dropped: {e}", self.0),
            Err(_) => eprintln!(
                "testkit: database {} not dropped: the drop panicked",
                self.0
            ),
        }
    }
}
