//! The key check in front of `/mcp`: the secret key only, as `Authorization: Bearer <key>` (what
//! MCP clients send) or `X-API-Key`. Refused requests never reach the MCP server.

use poem::{Endpoint, IntoResponse, Request, Response, error::ResponseError, http::header};

use crate::{
    http::auth::{API_KEY_HEADER, Access},
    state::AppState,
};

/// `inner` behind the secret key: no key → 401, an ingest key or an unknown one → 403.
pub struct RequireSecretKey<E> {
    pub state: AppState,
    pub inner: E,
}

/// The key a request presents: `X-API-Key`, else the token of `Authorization: Bearer`.
pub fn presented_key(req: &Request) -> Option<&str> {
    if let Some(key) = req.headers().get(API_KEY_HEADER) {
        return key.to_str().ok();
    }
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl<E: Endpoint> Endpoint for RequireSecretKey<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        if let Err(mut err) = self.state.keys.authorize(presented_key(&req), Access::Read) {
            let missing = err.status.as_u16() == 401;
            if missing {
                err.body.detail = "API key missing: send the secret key (API_SECRET_KEY) as `Authorization: Bearer <key>` or in the X-API-Key header".into();
            }
            let mut resp = err.as_response();
            if missing {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"mcp\""),
                );
            }
            return Ok(resp);
        }
        self.inner.call(req).await.map(IntoResponse::into_response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_api_key_header_or_a_bearer_token() {
        let req = |name: &str, value: &str| Request::builder().header(name, value).finish();
        assert_eq!(presented_key(&req("X-API-Key", "k")), Some("k"));
        assert_eq!(presented_key(&req("Authorization", "Bearer k")), Some("k"));
        assert_eq!(
            presented_key(&req("Authorization", "bearer  k ")),
            Some("k")
        );
        assert_eq!(presented_key(&req("Authorization", "Basic azpr")), None);
        assert_eq!(presented_key(&Request::builder().finish()), None);
    }
}
