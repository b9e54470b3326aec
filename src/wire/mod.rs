//! What travels inside a tunnel connection.
//!
//! Every tunnel stream, QUIC or the HTTPS fallback, carries [`Frame`]s: a fixed 13-byte header
//! (kind, exchange number, payload length) followed by the payload. JSON-RPC messages ride as
//! opaque bytes in [`FrameKind::Message`] frames and are never re-encoded on the way through.
//!
//! Two kinds of stream exist:
//!
//! - the **control stream**, the first stream `connect` opens on a new connection: a
//!   [`control::Hello`] with the tunnel token and the sources, answered by a
//!   [`control::HelloReply`]; it stays open for the life of the connection;
//! - one **exchange stream** per MCP exchange context (a session-era session, or one stateless
//!   request), opened by the relay: an [`open::OpenHeader`] first, then messages both ways.
//!
//! Within an exchange stream the relay numbers each agent message it forwards (its *exchange*),
//! and `connect` tags every message it sends back with the exchange of the upstream HTTP response
//! it arrived on, or [`UNSOLICITED`] for messages from the upstream's standalone stream. When an
//! upstream response is complete `connect` sends [`FrameKind::End`] for that exchange, so the
//! relay always knows when to finish the agent's HTTP response.
//!
//! How the format grows without breaking a released peer (strict receivers, senders gated on
//! the version agreed in the handshake) is the rule in [`version`].

mod control;
mod frame;
mod open;
mod sink;
pub mod version;

pub use control::{Greeting, Hello, HelloReply, Notice, SourceAnnouncement};
pub use frame::{
    DEFAULT_MAX_FRAME, Frame, FrameDecoder, FrameError, FrameKind, FrameReader, FrameWriter,
    HEADER_LEN, PieceCount, UNSOLICITED,
};
pub use open::{
    Assertion, Era, ListenAfter, NOTHING_OPEN, OpenHeader, Replay, Resumable, SessionHandle,
};
pub use sink::{FrameSink, SinkError, WeakFrameSink};
pub use version::{ALPN, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, VersionError, agree};
