//! The built-in MCP server (rmcp): `echo`, `add` and `blob`, fast enough that measurements
//! through the tunnel measure the tunnel.

use std::net::SocketAddr;

use axum::serve::ListenerExt;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::{
    StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
};
use rmcp::{ServerHandler, schemars, tool, tool_handler, tool_router};
use tokio_util::sync::CancellationToken;

/// Largest `blob` the server makes: bounds its memory whatever a caller asks.
pub const MAX_BLOB_BYTES: u64 = 256 * 1024 * 1024;

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

/// Longest `sleep`: a slow tool for tests and benchmarks, never a stuck one.
pub const MAX_SLEEP_MS: u64 = 60_000;

/// Arguments of `blob`.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
pub struct BlobArgs {
    /// How many bytes of text to return.
    pub size: u64,
}

/// The demo server.
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

/// What `blob` text repeats.
const BLOB_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// The bytes `blob` returns for `size`: a repeating alphabet, so a checksum is predictable.
pub fn blob_text(size: u64) -> String {
    let size = usize::try_from(size).expect("usize is 64 bits on the targets mcp-tunnel supports");
    let mut text = Vec::with_capacity(size + BLOB_ALPHABET.len());
    while text.len() < size {
        text.extend_from_slice(BLOB_ALPHABET);
    }
    text.truncate(size);
    String::from_utf8(text).expect("the alphabet is ASCII")
}

/// [`blob_text`] of `size` in pieces that share one buffer (a whole number of alphabets, about
/// 256 KiB), for a server that streams the text rather than building it.
pub fn blob_pieces(size: u64) -> impl Iterator<Item = bytes::Bytes> {
    /// Whole alphabets in a piece: 7,282 x 36 = 262,152 bytes.
    const ALPHABETS_PER_PIECE: usize = 7_282;
    static PIECE: std::sync::LazyLock<bytes::Bytes> =
        std::sync::LazyLock::new(|| bytes::Bytes::from(BLOB_ALPHABET.repeat(ALPHABETS_PER_PIECE)));
    let piece = PIECE.clone();
    let len = piece.len() as u64;
    let rest = usize::try_from(size % len).expect("below the piece's length");
    let last = (rest > 0).then(|| piece.slice(..rest));
    std::iter::repeat_n(piece, usize::try_from(size / len).unwrap_or(usize::MAX)).chain(last)
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
        if ms > MAX_SLEEP_MS {
            return Err(format!("ms {ms} exceeds the maximum of {MAX_SLEEP_MS}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        Ok(format!("slept {ms} ms"))
    }

    /// Returns `size` bytes of text.
    #[tool(description = "Return SIZE bytes of text (for throughput tests)")]
    fn blob(&self, Parameters(BlobArgs { size }): Parameters<BlobArgs>) -> Result<String, String> {
        if size > MAX_BLOB_BYTES {
            return Err(format!(
                "size {size} exceeds the maximum of {MAX_BLOB_BYTES} bytes"
            ));
        }
        Ok(blob_text(size))
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
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener.tap_io(crate::relay::no_delay), router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "demo MCP server failed");
        }
    });
    Ok(bound)
}
