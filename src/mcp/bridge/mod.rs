//! Translating between the two protocol eras, both ways: what a stateless (2026-07-28) agent
//! expects of an upstream that speaks only the session era, and what a session-era agent
//! expects of one that speaks only 2026-07-28, each built from what the upstream does say.
//!
//! Pure functions over message bytes, so every rule is tested without sockets. One concept a
//! file: `handshake`, the bridge's own `server/discover` and `initialize` and what it learns from
//! them; `complete`, the fields 2026-07-28 requires on a session-era result; `input`, requests
//! in mid-call as `input_required` answers and their retries; `session_agents`, a session-era
//! agent's session carried to a 2026-07-28 upstream; `params`, the `Mcp-Param-*` headers its
//! calls carry there.

mod complete;
mod handshake;
mod input;
mod params;
mod session_agents;

pub use complete::*;
pub use handshake::*;
pub use input::*;
pub use params::*;
pub use session_agents::*;

/// `_meta` key of the protocol version a 2026-07-28 request declares.
pub const PROTOCOL_VERSION_META: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key of the capabilities a 2026-07-28 request declares.
pub const CLIENT_CAPABILITIES_META: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key of the server's name and version in a `server/discover` result.
pub const SERVER_INFO_META: &str = "io.modelcontextprotocol/serverInfo";

/// How long a call answered `input_required` waits for the agent's retry: what `connect`
/// keeps a bridged upstream request open for, and how long the relay's sealed state lives.
pub const INPUT_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Why an upstream's answer could not be translated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BridgeError {
    /// The upstream's `initialize` answer is an error, or is not JSON-RPC.
    #[error("the upstream refused initialize: {0}")]
    InitializeRefused(String),
}

/// `_meta` key of the client's name and version in a 2026-07-28 request.
pub const CLIENT_INFO_META: &str = "io.modelcontextprotocol/clientInfo";

/// What the tests of every part read and write messages with.
#[cfg(test)]
pub(crate) mod testing {
    use serde_json::Value;
    use serde_json::value::RawValue;

    /// A message the bridge wrote, as JSON.
    pub(crate) fn value(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("the bridge writes JSON")
    }

    /// Raw JSON text (an id, a result).
    pub(crate) fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.into()).expect("test JSON")
    }
}
