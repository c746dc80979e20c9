//! Redis plumbing both services use: clients that disable Nagle's algorithm, reconnecting
//! connections, and the parsing of stream and `INFO`-style replies.

use std::{collections::HashMap, time::Duration};

use redis::{
    Client, IntoConnectionInfo, RedisError, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
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
