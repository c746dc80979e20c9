//! API keys: the secret key opens every route, ingest keys only the ingest routes.

use poem_openapi::{SecurityScheme, auth::ApiKey};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::http::error::ApiError;

/// The header that carries the API key.
pub const API_KEY_HEADER: &str = "X-API-Key";

/// `X-API-Key` header.
#[derive(SecurityScheme)]
#[oai(
    rename = "ApiKey",
    ty = "api_key",
    key_name = "X-API-Key",
    key_in = "header"
)]
pub struct ApiKeyHeader(pub ApiKey);

impl ApiKeyHeader {
    /// Checks this key for `access` (see [`Keys::authorize`]).
    pub fn authorize(&self, keys: &Keys, access: Access) -> Result<Principal, ApiError> {
        keys.authorize(Some(&self.0.key), access)
    }
}

/// Auth for the PostHog capture routes: the header, or else `api_key`/`token` in the body
/// (what PostHog SDKs send), checked once the body is decoded.
#[derive(SecurityScheme)]
pub enum CaptureAuth {
    Header(ApiKeyHeader),
    #[oai(fallback)]
    InBody,
}

impl CaptureAuth {
    pub fn header_key(&self) -> Option<&str> {
        match self {
            CaptureAuth::Header(h) => Some(&h.0.key),
            CaptureAuth::InBody => None,
        }
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Sending events.
    Ingest,
    /// Reading or erasing stored user data.
    Read,
}

/// Who the key belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    Secret,
    Ingest,
}

/// Where a key was sent. The secret key is taken from the `X-API-Key` header only: bodies and
/// query strings are logged by proxies and SDK debug output, and a body key is what web pages ship.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Header,
    Body,
}

/// The configured keys, kept as SHA-256 digests: a presented key is hashed once and compared
/// with each digest in constant time, so neither its content nor its length shows in timing.
pub struct Keys {
    secret: [u8; 32],
    ingest: Vec<[u8; 32]>,
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl Keys {
    pub fn new(secret: &str, ingest: &[String]) -> Self {
        Self {
            secret: digest(secret.as_bytes()),
            ingest: ingest.iter().map(|k| digest(k.as_bytes())).collect(),
        }
    }

    /// Checks `key`, sent in the `X-API-Key` header, for `access`: missing → 401, unknown or not
    /// allowed here → 403.
    pub fn authorize(&self, key: Option<&str>, access: Access) -> Result<Principal, ApiError> {
        self.authorize_from(key, access, KeySource::Header)
    }

    /// [`Keys::authorize`] for a key sent from `source`. Every configured key is compared in
    /// constant time, whichever matches.
    pub fn authorize_from(
        &self,
        key: Option<&str>,
        access: Access,
        source: KeySource,
    ) -> Result<Principal, ApiError> {
        let key = key
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(ApiError::unauthenticated)?;
        let key = digest(key.as_bytes());
        let is_secret = bool::from(self.secret.ct_eq(&key));
        let is_ingest = self
            .ingest
            .iter()
            .fold(false, |found, k| found | bool::from(k.ct_eq(&key)));
        match (is_secret, is_ingest, access) {
            (true, _, _) if source == KeySource::Body => Err(ApiError::forbidden(
                "the secret key (API_SECRET_KEY) is accepted only in the X-API-Key header; bodies and query strings take ingest keys (INGEST_API_KEYS)",
            )),
            (true, _, _) => Ok(Principal::Secret),
            (false, true, Access::Ingest) => Ok(Principal::Ingest),
            (false, true, Access::Read) => Err(ApiError::forbidden(
                "this is an ingest-only key (INGEST_API_KEYS): it can send events but not read user data",
            )),
            (false, false, _) => Err(ApiError::forbidden("API key not recognised")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_scopes() {
        let keys = Keys::new("secret", &["phc_public".to_string()]);
        assert_eq!(
            keys.authorize(Some("secret"), Access::Read).unwrap(),
            Principal::Secret
        );
        assert_eq!(
            keys.authorize(Some("phc_public"), Access::Ingest).unwrap(),
            Principal::Ingest
        );
        assert_eq!(
            keys.authorize(Some("phc_public"), Access::Read)
                .unwrap_err()
                .status
                .as_u16(),
            403
        );
        assert_eq!(
            keys.authorize(Some("nope"), Access::Ingest)
                .unwrap_err()
                .status
                .as_u16(),
            403
        );
        assert_eq!(
            keys.authorize(None, Access::Ingest)
                .unwrap_err()
                .status
                .as_u16(),
            401
        );
        assert_eq!(
            keys.authorize(Some("  "), Access::Ingest)
                .unwrap_err()
                .status
                .as_u16(),
            401
        );
    }

    #[test]
    fn the_secret_key_is_refused_outside_the_header() {
        let keys = Keys::new("secret", &["phc_public".to_string()]);
        let err = keys
            .authorize_from(Some("secret"), Access::Ingest, KeySource::Body)
            .unwrap_err();
        assert_eq!(err.status.as_u16(), 403);
        assert!(err.body.detail.contains("X-API-Key header"), "{err}");
        assert_eq!(
            keys.authorize_from(Some("phc_public"), Access::Ingest, KeySource::Body)
                .unwrap(),
            Principal::Ingest
        );
        // Keys of any length are compared as digests.
        for key in ["s", "secre", "secretX", &"x".repeat(10_000)] {
            assert_eq!(
                keys.authorize(Some(key), Access::Ingest)
                    .unwrap_err()
                    .status
                    .as_u16(),
                403
            );
        }
    }
}
