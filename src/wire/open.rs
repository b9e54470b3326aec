//! The header that opens every exchange stream.

use serde::{Deserialize, Serialize};

/// Which MCP transport era an exchange stream serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Era {
    /// A session-era session (2025-03-26 .. 2025-11-25): `initialize` to DELETE or expiry.
    Session,
    /// One stateless 2026-07-28 request (or one `subscriptions/listen`).
    Stateless,
}

/// The first frame of an exchange stream, from the relay to `connect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenHeader {
    /// Tenant of the connection; `connect` checks it matches its own.
    pub tenant: String,
    /// The source (by the name `connect` announced) this exchange is for.
    pub source: String,
    /// The authenticated caller (for upstream identity and logs; never a credential).
    pub subject: String,
    /// Session era or stateless.
    pub era: Era,
    /// The MCP protocol version the agent declared (`MCP-Protocol-Version`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// The relay's id for this exchange context (its session id, or a request id): for logs
    /// on both sides.
    pub context: String,
    /// Stateless era: the agent's MCP routing headers (`mcp-method`, `mcp-name`, `mcp-param-*`),
    /// forwarded to the upstream exactly once and byte for byte (servers check them against the
    /// body, and some values are encoded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mcp_headers: Vec<(String, String)>,
    /// W3C trace context of the agent request, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The relay-signed identity assertion `connect` passes to an HTTP upstream, when the
    /// tenant enables it for this source (absent otherwise, so older `connect`s keep working
    /// with sources that do not use it). Stdio and legacy HTTP+SSE sources ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion: Option<Assertion>,
    /// Session era: the session this stream carries, so `connect` keeps its upstream session
    /// past the stream's end and a later stream (from any relay of the fleet) can resume it.
    ///
    /// Wire version 2 (see [`crate::wire::version`]); without it `connect` ends the upstream
    /// session with the stream, as version 1 did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionHandle>,
}

/// A session-era stream's session, as the open header names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionHandle {
    /// The relay-chosen handle `connect` keeps the upstream session under (random, 128 bits:
    /// the same for every stream that carries the session).
    pub handle: String,
    /// Whether this stream resumes a session an earlier stream opened (no `initialize`
    /// follows); `false` on the stream that opens it.
    pub resume: bool,
    /// What `connect` reported resumable (see [`Resumable`]), from the sealed session id:
    /// lets a `connect` that does not hold the handle (restarted, or another one) resume an
    /// HTTP upstream's session. The open header's `protocol_version` is then the version the
    /// session negotiated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Resumable>,
    /// The relay's number for this stream of the session (random, distinct among the
    /// session's streams on every relay): `connect` keys what it buffers of each answer by
    /// this number and the exchange, the relay seals both into the answer's event ids, and a
    /// [`Replay`] names an answer by them, from any relay.
    ///
    /// Wire version 3 (see [`crate::wire::version`]); without it `connect` buffers nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<u64>,
}

/// Which answer to replay ([`super::FrameKind::Replay`], from the relay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replay {
    /// The stream that carried the answer ([`SessionHandle::stream`]).
    pub stream: u64,
    /// Its exchange on that stream.
    pub exchange: u64,
    /// Whole messages of the answer the agent already has: the replay starts after them.
    pub after: u64,
}

/// The payload of `connect`'s `Replay` ack when those messages already answer every request
/// of the agent's message: the relay that replays has nothing to wait for or record. (Else the
/// ack carries the agent's message, without the requests already answered.)
pub const NOTHING_OPEN: &[u8] = b"[]";

/// The agent resumes its GET stream here ([`super::FrameKind::Listen`] with this payload,
/// from a relay of wire version 4): it has the session's server-initiated messages up to
/// number `after` ([`super::FrameKind::Event`]), and `connect` sends again those it keeps after
/// it, before any new one. A listen without a payload is a fresh GET stream: nothing is sent
/// again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenAfter {
    /// The number of the last message the agent has.
    pub after: u64,
}

/// What `connect` says of an upstream session it holds ([`super::FrameKind::Resumable`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resumable {
    /// The HTTP upstream's own `Mcp-Session-Id`, if it issued one: with it any `connect` can
    /// continue the session. Absent for a stdio process, which only its `connect` holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_session: Option<String>,
    /// Whether any `connect` of the source may resume it (HTTP upstreams), or only the one
    /// that holds it (stdio processes).
    pub portable: bool,
}

/// The identity assertion as it crosses the tunnel (in the open header, or a
/// [`FrameKind::Identity`](super::FrameKind::Identity) frame that replaces it): the header
/// `connect` sets on every upstream request of the stream, and its value, a JWT the relay
/// signed (see `govern::assertion`, which makes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assertion {
    /// The header name.
    pub header: String,
    /// The signed JWT.
    pub token: String,
}
