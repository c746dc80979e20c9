//! MCP (Model Context Protocol): the user context as tools an AI agent calls directly, at `/mcp`
//! (streamable HTTP, stateless, so any api replica answers any request) and on stdio
//! (`api mcp --stdio`). [`tools`] holds the server, [`find`] the `find_users` query, [`rules`] the
//! rule set `explain_event` reads, [`auth`] the key check in front of `/mcp`.

pub mod auth;
pub mod find;
pub mod rules;
pub mod stdio;
pub mod tools;

use std::sync::Arc;

use poem::{Endpoint, Response, endpoint::TowerCompatExt};
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};

use crate::{mcp::tools::ContextTools, state::AppState};

/// The path the MCP endpoint is served at.
pub const MCP_PATH: &str = "/mcp";

/// `/mcp`: the secret key checked first, then rmcp's streamable HTTP server.
pub fn endpoint(state: &AppState) -> impl Endpoint<Output = Response> + use<> {
    let mut config = StreamableHttpServerConfig::default()
        // Stateless: no session to pin a client to one replica; plain JSON answers.
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_max_request_body_bytes(state.config.max_body_bytes)
        .with_cancellation_token(state.shutdown.child_token());
    let hosts = &state.config.mcp_allowed_hosts;
    config = if hosts.iter().any(|h| h == "*") {
        config.disable_allowed_hosts()
    } else {
        config.with_allowed_hosts(hosts.iter().cloned())
    };
    let tools = ContextTools::new(state.clone());
    let service = StreamableHttpService::new(
        move || Ok(tools.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    auth::RequireSecretKey {
        state: state.clone(),
        inner: service.compat(),
    }
}
