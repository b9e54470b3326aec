//! mcp-tunnel: a governed tunnel for MCP servers that must never face the internet.
//!
//! `connect` runs next to private MCP servers and dials out to a relay over QUIC; the relay
//! serves agents on standard MCP endpoints and governs every call. The data path, in the order
//! a message travels it:
//!
//! - [`transport`]: the tunnel connection (QUIC) behind one trait, and the one TLS setup;
//! - [`wire`]: frames, the stream open header and the control handshake;
//! - [`relay`]: tunnel registry, agent sessions, the Streamable HTTP endpoint, admin;
//! - [`client`]: `connect`, its dialer and its upstream sources;
//! - [`govern`]: identities and policy, which the relay consults;
//! - [`mcp`]: just enough MCP to route and govern messages without re-encoding them.
//!
//! [`relay::Relay`] and [`client::run`] take a shutdown token, so tests run everything
//! in-process; `main.rs` is only the command line.

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
