//! mcp-tunnel: a governed tunnel for MCP servers that must never face the internet.
//!
//! `connect` runs next to private MCP servers and dials out to a relay (QUIC, or HTTPS when UDP
//! is blocked); the relay serves agents on standard MCP endpoints and governs every call. The
//! data path, in the order a message travels it from an agent to the MCP server and back:
//!
//! - [`relay`]`::agents`: the agent-facing HTTP endpoints (Streamable HTTP of both eras,
//!   HTTP+SSE), one admission step that authenticates, gates and authorizes each request;
//! - [`relay`]`::calls`: the calls in flight, their audit hand-off, metrics and list filtering;
//! - [`relay`]`::session`: agent sessions, their event logs for resumption, and the exchange
//!   state machine that turns frames into one answer;
//! - [`relay`]`::tunnel`: connected `connect`s, the registry that routes to them, and the
//!   channel that carries one exchange context over one stream;
//! - [`wire`]: frames, the stream open header, the control handshake and the compatibility rule;
//! - [`transport`]: the tunnel connection (QUIC, or HTTP/2 over TLS) behind one trait, and the
//!   one TLS setup;
//! - [`client`]: `connect`, its dialer, and its sources (HTTP, HTTP+SSE and stdio upstreams).
//!
//! Beside the path: [`govern`] (identities, policy, the audit trail) which the relay consults;
//! [`mcp`], just enough MCP to route and govern messages without re-encoding them; [`config`],
//! the configuration files' schema, which imports nothing of the crate.
//!
//! [`relay::Relay`] and [`client::run`] take a shutdown token, so tests run everything
//! in-process; `main.rs` is only the command line.

#![warn(unreachable_pub)]

pub mod bench;
pub mod certs;
pub mod client;
pub mod config;
pub mod demo;
pub mod govern;
pub mod mcp;
pub mod metrics;
pub mod relay;
pub mod transport;
pub mod wire;
