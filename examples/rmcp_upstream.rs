//! The demo tools on the rmcp SDK's Streamable HTTP server, for comparing it with the built-in
//! lean server (`mcp-tunnel demo --upstream-only`); BENCHMARKS.md has the figures.
//!
//! ```text
//! cargo run --release --example rmcp_upstream -- [LISTEN]     # default 127.0.0.1:0
//! ```

#[path = "../tests/common/rmcp_upstream.rs"]
mod rmcp_upstream;

use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()?;
    let shutdown = CancellationToken::new();
    let addr = rmcp_upstream::serve(listen, shutdown.clone()).await?;
    println!("rmcp demo MCP server: http://{addr}/mcp");
    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    Ok(())
}
