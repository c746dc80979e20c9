//! API keys: the secret key opens every route, ingest keys only the ingest routes.

use poem_openapi::{SecurityScheme, auth::ApiKey};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

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

/// The configured keys.
pub struct Keys {
    secret: Vec<u8>,
    ingest: Vec<Vec<u8>>,
}

impl Keys {
    pub fn new(secret: &str, ingest: &[String]) -> Self {
        Self {
            secret: secret.as_bytes().to_vec(),
            ingest: ingest.iter().map(|k| k.as_bytes().to_vec()).collect(),
        }
    }

    /// Checks `key` for `access`: missing → 401, unknown or not allowed here → 403.
    /// Every configured key is compared in constant time, whichever matches.
    pub fn authorize(&self, key: Option<&str>, access: Access) -> Result<Principal, ApiError> {
        let key = key
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(ApiError::unauthenticated)?;
        let key = key.as_bytes();
        let is_secret = bool::from(self.secret.as_slice().ct_eq(key));
        let is_ingest = self.ingest.iter().fold(false, |found, k| {
            found | bool::from(k.as_slice().ct_eq(key))
        });
        match (is_secret, is_ingest, access) {
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
}
