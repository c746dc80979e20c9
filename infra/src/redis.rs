//! Redis plumbing both services use: one server or a Redis Cluster (`REDIS_CLUSTER`) behind one
//! connection type, clients that disable Nagle's algorithm, reconnecting connections, and the
//! parsing of stream and `INFO`-style replies.

use std::{collections::HashMap, time::Duration};

use redis::{
    Client, Cmd, IntoConnectionInfo, RedisError, RedisFuture, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
    io::tcp::TcpSettings,
};

/// Response timeout of non-blocking commands.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a Redis operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("redis error: {0}")]
    Redis(#[from] RedisError),
    #[error("unexpected reply to {command}: {reply}")]
    Reply {
        command: &'static str,
        reply: String,
    },
}

impl StreamError {
    /// The consumer group (or the stream) is gone: create it again.
    pub fn is_no_group(&self) -> bool {
        matches!(self, Self::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

/// One stream entry as read by this consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The stream shard it was read from (`0` with one shard); ids are unique within one only.
    pub shard: usize,
    pub id: String,
    /// Field/value pairs; empty when the entry was deleted while pending.
    pub fields: Vec<(String, Vec<u8>)>,
    /// How many times the group delivered it (this delivery included).
    pub deliveries: u64,
}

/// Where an entry is: its shard and its id there.
pub type EntryId = (usize, String);

impl Entry {
    /// Its shard and id.
    pub fn entry_id(&self) -> EntryId {
        (self.shard, self.id.clone())
    }

    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }

    /// What the entry weighs in the read-ahead budget: its id, field names and values.
    pub fn bytes(&self) -> usize {
        self.id.len()
            + self
                .fields
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// A client whose connections disable Nagle's algorithm (redis-rs leaves it on by default), so a
/// command written in parts does not wait for a delayed ACK. A `rediss://` URL connects with TLS,
/// trusting the system's roots (`rediss://…#insecure` skips the check: for tests only).
pub fn client(url: &str) -> Result<Client, RedisError> {
    client_with_ca(url, None)
}

/// [`client`], trusting the certificate authorities of the PEM file `ca` (`REDIS_CA_CERT`)
/// instead of the system's. `ca` needs a `rediss://` URL.
pub fn client_with_ca(url: &str, ca: Option<&std::path::Path>) -> Result<Client, RedisError> {
    let info = url
        .into_connection_info()?
        .set_tcp_settings(TcpSettings::default().set_nodelay(true));
    with_ca(info, ca)
}

/// A client for `info`, trusting the certificate authorities of the PEM file `ca` when given
/// (which needs a `rediss://` address), else the system's.
pub fn with_ca(
    info: redis::ConnectionInfo,
    ca: Option<&std::path::Path>,
) -> Result<Client, RedisError> {
    use redis::{ConnectionAddr, ErrorKind, TlsCertificates};
    let Some(ca) = ca else {
        return Client::open(info);
    };
    if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
        return Err(RedisError::from((
            ErrorKind::InvalidClientConfig,
            "REDIS_CA_CERT is set but REDIS_URL is not rediss:// (TLS)",
        )));
    }
    let pem = std::fs::read(ca).map_err(|e| {
        RedisError::from((
            ErrorKind::InvalidClientConfig,
            "REDIS_CA_CERT cannot be read",
            format!("{}: {e}", ca.display()),
        ))
    })?;
    Client::build_with_tls(
        info,
        TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        },
    )
}

/// A lazily connecting, reconnecting connection.
pub fn connection(
    client: Client,
    response_timeout: Duration,
) -> Result<ConnectionManager, RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    ConnectionManager::new_lazy_with_config(client, config)
}

/// The seed nodes of `REDIS_URL`: one address, or with `cluster` (`REDIS_CLUSTER`) one or more,
/// comma-separated. The message says what is wrong, for an error naming `REDIS_URL`.
pub fn seeds(redis_url: &str, cluster: bool) -> Result<Vec<redis::ConnectionInfo>, String> {
    let urls: Vec<&str> = redis_url.split(',').map(str::trim).collect();
    if urls.iter().any(|u| u.is_empty()) {
        return Err(format!("{redis_url:?} has an empty address in its list"));
    }
    if !cluster && urls.len() > 1 {
        return Err(format!(
            "lists {} addresses: set REDIS_CLUSTER=true for a Redis Cluster's seed nodes, or give one",
            urls.len()
        ));
    }
    let mut seeds = Vec::with_capacity(urls.len());
    for url in &urls {
        let info = url.into_connection_info().map_err(|e| {
            format!("{url:?} is not a Redis address (redis://host:port or rediss://host:port): {e}")
        })?;
        if cluster && matches!(info.addr(), redis::ConnectionAddr::Unix(_)) {
            return Err(format!(
                "{url:?} is a Unix socket: a Redis Cluster's nodes are reached over TCP"
            ));
        }
        if seeds
            .first()
            .is_some_and(|first| is_tls(first) != is_tls(&info))
        {
            return Err(
                "mixes redis:// and rediss:// seeds: a cluster's nodes all use TLS or none".into(),
            );
        }
        seeds.push(info);
    }
    Ok(seeds)
}

fn is_tls(info: &redis::ConnectionInfo) -> bool {
    matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. })
}

/// Where Redis is: one server, or a Redis Cluster reached through its seed nodes.
// A few made per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum RedisClient {
    Single(Client),
    Cluster(ClusterClient),
}

impl RedisClient {
    /// The client of `redis_url` ([`seeds`]), trusting the certificate authorities of the PEM
    /// file `ca` when given (`REDIS_CA_CERT`, with `rediss://` seeds). Connections disable
    /// Nagle's algorithm.
    pub fn open(
        redis_url: &str,
        cluster: bool,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, RedisError> {
        Self::open_with_nodelay(redis_url, cluster, ca, true)
    }

    /// [`Self::open`], leaving Nagle's algorithm on when not `nodelay` (a connection many
    /// concurrent requests share, whose writes may then go out together).
    pub fn open_with_nodelay(
        redis_url: &str,
        cluster: bool,
        ca: Option<&std::path::Path>,
        nodelay: bool,
    ) -> Result<Self, RedisError> {
        if !cluster {
            let info = redis_url
                .into_connection_info()?
                .set_tcp_settings(TcpSettings::default().set_nodelay(nodelay));
            return Ok(Self::Single(with_ca(info, ca)?));
        }
        let seeds = seeds(redis_url, true).map_err(|message| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "REDIS_URL", message))
        })?;
        let tls = seeds.first().is_some_and(is_tls);
        let mut builder = ClusterClient::builder(seeds)
            .tcp_settings(TcpSettings::default().set_nodelay(nodelay))
            .retries(2);
        if let Some(ca) = ca {
            if !tls {
                return Err(RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "REDIS_CA_CERT is set but REDIS_URL is not rediss:// (TLS)",
                )));
            }
            let pem = std::fs::read(ca).map_err(|e| {
                RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "REDIS_CA_CERT cannot be read",
                    format!("{}: {e}", ca.display()),
                ))
            })?;
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            });
        }
        Ok(Self::Cluster(builder.build()?))
    }

    /// Whether this is a Redis Cluster's client.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// A lazily connecting, reconnecting connection whose commands wait `response_timeout`.
    pub fn connection(&self, response_timeout: Duration) -> Result<RedisConn, RedisError> {
        self.connection_with(response_timeout, COMMAND_TIMEOUT, 2, Duration::from_secs(1))
    }

    /// [`Self::connection`], connecting within `connect_timeout` and retrying a failed command
    /// `retries` times, waiting at most `max_delay` before reconnecting to one Redis (a
    /// cluster's client keeps its own backoff).
    pub fn connection_with(
        &self,
        response_timeout: Duration,
        connect_timeout: Duration,
        retries: u32,
        max_delay: Duration,
    ) -> Result<RedisConn, RedisError> {
        match self {
            Self::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(Some(response_timeout))
                    .set_connection_timeout(Some(connect_timeout))
                    .set_number_of_retries(retries as usize)
                    .set_max_delay(max_delay);
                Ok(RedisConn::Single(ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    config,
                )?))
            }
            // The cluster client connects to the nodes (and learns the slots) in the background;
            // a command waits for that within its own timeout.
            Self::Cluster(client) => Ok(RedisConn::Cluster(
                client.get_pending_async_connection_with_config(
                    ClusterConfig::new()
                        .set_connection_timeout(connect_timeout)
                        .set_response_timeout(response_timeout),
                ),
            )),
        }
    }
}

/// A connection to one Redis or to a Redis Cluster (each command routed to the node of its key's
/// hash slot); cheap to clone, every clone sharing the same connections.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Whether commands go to a Redis Cluster: a pipeline or a transaction must then stay within
    /// one hash slot (see [`query_each`]).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

impl From<ConnectionManager> for RedisConn {
    fn from(conn: ConnectionManager) -> Self {
        Self::Single(conn)
    }
}

impl From<ClusterConnection> for RedisConn {
    fn from(conn: ClusterConnection) -> Self {
        Self::Cluster(conn)
    }
}

impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// The replies of `commands`, each on keys of one hash slot, in order; a command's own error is
/// its reply's (the others still run). One pipeline on one Redis; on a cluster, where a pipeline
/// cannot span slots, each command on its own, all sent at once.
pub async fn query_each(
    conn: &RedisConn,
    commands: Vec<Cmd>,
) -> Result<Vec<Result<Value, RedisError>>, RedisError> {
    if !conn.is_cluster() {
        let mut pipe = redis::Pipeline::with_capacity(commands.len());
        pipe.ignore_errors();
        for cmd in commands {
            pipe.add_command(cmd);
        }
        let replies: Vec<Value> = pipe.query_async(&mut conn.clone()).await?;
        return Ok(replies
            .into_iter()
            .map(|v| match v {
                Value::ServerError(e) => Err(e.into()),
                v => Ok(v),
            })
            .collect());
    }
    Ok(
        futures_util::future::join_all(commands.into_iter().map(|cmd| {
            let mut conn = conn.clone();
            async move { cmd.query_async::<Value>(&mut conn).await }
        }))
        .await,
    )
}

/// [`query_each`] where every command must succeed, each reply read as a `T`.
pub async fn query_all<T: redis::FromRedisValue>(
    conn: &RedisConn,
    commands: Vec<Cmd>,
) -> Result<Vec<T>, RedisError> {
    query_each(conn, commands)
        .await?
        .into_iter()
        .map(|reply| Ok(redis::from_redis_value(reply?)?))
        .collect()
}

/// Parses `[[id, [field, value, …] | nil], …]`.
pub fn parse_entries(value: Value) -> Result<Vec<Entry>, StreamError> {
    let Value::Array(items) = value else {
        return Err(StreamError::Reply {
            command: "stream entries",
            reply: format!("{value:?}"),
        });
    };
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut parts) = item else {
            continue;
        };
        if parts.is_empty() {
            continue;
        }
        let fields_value = if parts.len() > 1 {
            parts.swap_remove(1)
        } else {
            Value::Nil
        };
        let Some(id) = bytes(parts.swap_remove(0)) else {
            continue;
        };
        let mut fields = Vec::new();
        if let Value::Array(flat) = fields_value {
            let mut flat = flat.into_iter();
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                if let (Some(k), Some(v)) = (bytes(k), bytes(v)) {
                    fields.push((String::from_utf8_lossy(&k).into_owned(), v));
                }
            }
        }
        entries.push(Entry {
            shard: 0,
            id: String::from_utf8_lossy(&id).into_owned(),
            fields,
            deliveries: 1,
        });
    }
    Ok(entries)
}

/// A bulk, simple or integer reply as bytes.
pub fn bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

/// A text field of a [`key_values`] map.
pub fn info_string(info: &HashMap<String, Value>, key: &str) -> Option<String> {
    let bytes = bytes(info.get(key)?.clone())?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// An integer field of a [`key_values`] map (`None` when absent or nil).
pub fn info_int(info: &HashMap<String, Value>, key: &str) -> Option<i64> {
    match info.get(key) {
        Some(Value::Int(n)) => Some(*n),
        _ => None,
    }
}

/// A RESP2 flat key/value array or a RESP3 map, as a map by key.
pub fn key_values(value: Value) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    match value {
        Value::Array(flat) => {
            let mut flat = flat.into_iter();
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                if let Some(k) = bytes(k) {
                    map.insert(String::from_utf8_lossy(&k).into_owned(), v);
                }
            }
        }
        Value::Map(pairs) => {
            for (k, v) in pairs {
                if let Some(k) = bytes(k) {
                    map.insert(String::from_utf8_lossy(&k).into_owned(), v);
                }
            }
        }
        _ => {}
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_list_needs_redis_cluster_and_every_seed_must_be_an_address() {
        assert_eq!(seeds("redis://a:1", false).unwrap().len(), 1);
        let three = seeds("redis://a:1, redis://b:2,redis://c:3", true).unwrap();
        assert_eq!(three.len(), 3);
        assert_eq!(seeds("rediss://a:1,rediss://b:2", true).unwrap().len(), 2);
        let one_only = seeds("redis://a:1,redis://b:2", false).unwrap_err();
        assert!(one_only.contains("REDIS_CLUSTER=true"), "{one_only}");
        for bad in [
            "redis://a:1,",
            "redis://a:1,nonsense",
            "redis://a:1,redis+unix:///tmp/r.sock",
        ] {
            assert!(seeds(bad, true).is_err(), "{bad}");
        }
        let mixed = seeds("redis://a:1,rediss://b:2", true).unwrap_err();
        assert!(mixed.contains("rediss://"), "{mixed}");
    }

    #[test]
    fn a_cluster_client_is_made_lazily_from_its_seeds() {
        let client = RedisClient::open("redis://127.0.0.1:1,redis://127.0.0.1:2", true, None);
        assert!(client.as_ref().is_ok_and(RedisClient::is_cluster));
        let tls = RedisClient::open("rediss://127.0.0.1:1,rediss://127.0.0.1:2", true, None);
        assert!(tls.is_ok());
        let ca_without_tls = RedisClient::open(
            "redis://127.0.0.1:1",
            true,
            Some(std::path::Path::new("/nonexistent.pem")),
        );
        assert!(ca_without_tls.is_err());
    }
}
