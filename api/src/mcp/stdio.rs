//! `api mcp --stdio`: the same MCP server over standard input and output, for desktop clients
//! that start the server themselves. Configured by the same variables as the api; the key check
//! is the operating system's (whoever can start the process can read its database anyway).

use rmcp::ServiceExt;
use tokio_util::sync::CancellationToken;

use crate::{config::Config, mcp::tools::ContextTools, state::AppState};

/// Serves MCP on stdin/stdout until the client closes it or `shutdown` fires.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let state = AppState::new(config, shutdown.clone()).await?;
    let service = ContextTools::new(state)
        .serve_with_ct(rmcp::transport::stdio(), shutdown.child_token())
        .await?;
    tracing::info!("MCP server on stdio");
    service.waiting().await?;
    shutdown.cancel();
    Ok(())
}
