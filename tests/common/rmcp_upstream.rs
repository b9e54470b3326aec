//! The demo tools (`echo`, `add`, `sleep`, `blob`) on the rmcp SDK's Streamable HTTP server:
//! the tests' reference upstream, an MCP server that is not ours. The product's demo server is
//! `mcp_tunnel::demo::lean`; both follow `mcp_tunnel::demo::tools`.

use std::net::SocketAddr;

use mcp_tunnel::demo::tools::{blob_size, blob_text, sleep_time, slept};
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use rmcp::{ServerHandler, schemars, tool, tool_handler, tool_router};
use tokio_util::sync::CancellationToken;

/// Arguments of `echo`.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct EchoArgs {
    /// The text to send back.
    pub message: String,
}

/// Arguments of `add`.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct AddArgs {
    /// Left operand.
    pub a: i64,
    /// Right operand.
    pub b: i64,
}

/// Arguments of `sleep`.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct SleepArgs {
    /// Milliseconds to wait before answering.
    pub ms: u64,
}

/// Arguments of `blob`.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct BlobArgs {
    /// How many bytes of text to return.
    pub size: u64,
}

/// The demo tools as an rmcp server.
#[derive(Debug, Clone)]
pub struct DemoServer {
    #[allow(dead_code, reason = "read by the code #[tool_handler] generates")]
    tool_router: ToolRouter<Self>,
}

impl Default for DemoServer {
    fn default() -> Self {
        Self {
            tool_router: Self::tool_router(),
        }
    }
}

#[tool_router]
impl DemoServer {
    /// Returns the message unchanged.
    #[tool(description = "Echo the message back unchanged")]
    fn echo(&self, Parameters(EchoArgs { message }): Parameters<EchoArgs>) -> String {
        message
    }

    /// Adds two integers.
    #[tool(description = "Add two integers")]
    fn add(&self, Parameters(AddArgs { a, b }): Parameters<AddArgs>) -> Result<String, String> {
        a.checked_add(b)
            .map(|sum| sum.to_string())
            .ok_or_else(|| "integer overflow".to_owned())
    }

    /// Answers after `ms` milliseconds: a slow upstream, for drain and latency tests.
    #[tool(description = "Wait MS milliseconds, then answer (a slow tool for tests)")]
    async fn sleep(
        &self,
        Parameters(SleepArgs { ms }): Parameters<SleepArgs>,
    ) -> Result<String, String> {
        tokio::time::sleep(sleep_time(ms)?).await;
        Ok(slept(ms))
    }

    /// Returns `size` bytes of text.
    #[tool(description = "Return SIZE bytes of text (for throughput tests)")]
    fn blob(&self, Parameters(BlobArgs { size }): Parameters<BlobArgs>) -> Result<String, String> {
        Ok(blob_text(blob_size(size)?))
    }
}

#[tool_handler]
impl ServerHandler for DemoServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_instructions("mcp-tunnel demo server: echo, add, blob, sleep")
    }
}

/// Serves the demo server's Streamable HTTP endpoint at `/mcp` on `addr` until `shutdown`;
/// returns the bound address once it accepts connections.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let config =
        StreamableHttpServerConfig::default().with_cancellation_token(shutdown.child_token());
    let service: StreamableHttpService<DemoServer, LocalSessionManager> =
        StreamableHttpService::new(|| Ok(DemoServer::default()), Default::default(), config);
    let router = axum::Router::new().nest_service("/mcp", service);
    mcp_tunnel::demo::spawn_server(addr, router, shutdown).await
}
