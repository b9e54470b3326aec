//! The tunnel transport: one trait over QUIC ([`quic`]) and the HTTPS fallback ([`h2`], HTTP/2
//! over TLS on TCP, for networks that block UDP).
//!
//! Everything above this module sees a [`TunnelConnection`] that can open and accept
//! bidirectional [`TunnelStream`]s and be closed with a reason. Opening a stream costs no round
//! trip: the peer learns of it with the stream's first frame. Both transports share the
//! keep-alive and liveness constants below and the TLS setup in [`tls`].

pub mod h2;
pub mod quic;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// How long either side lets a connection go quiet before it sends a keep-alive (a QUIC PING,
/// an HTTP/2 PING). Well under common NAT UDP mapping timeouts (30 s on many routers), and short
/// enough that a peer that has gone away is [silent](SILENT_AFTER) within seconds, while the
/// cost stays a small packet every 2 s per idle tunnel.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// A peer not heard from (not even a keep-alive or its answer) for this long is *silent*: two
/// keep-alives missed, plus slack for a round trip. The relay routes new sessions to a silent
/// tunnel only when every tunnel of the source is silent: a `connect` killed without a word
/// (power loss, `kill -9`) leaves a QUIC connection that looks open until [`IDLE_TIMEOUT`], and
/// its replacement must get the sessions meanwhile.
pub const SILENT_AFTER: Duration = Duration::from_secs(5);

/// A connection with no traffic at all for this long is closed as dead: QUIC's idle timeout,
/// and over the fallback the longest an HTTP/2 PING may go unanswered. Its streams end then,
/// and the requests in flight on them get a JSON-RPC error at once.
///
/// 10 s is five [`KEEP_ALIVE`] intervals: a live peer answers several keep-alives in that time
/// even with a lost packet or two, so only a peer that is gone (killed without a word, power
/// loss, network cut) reaches it. It is twice [`SILENT_AFTER`] on purpose: an outage of a few
/// seconds costs a silent tunnel its new sessions, not the calls it carries. Longer bought
/// nothing since sessions survive the loss of a tunnel (`connect` holds the upstream session,
/// and a relay resumes it on another tunnel): it only made the calls in flight on a dead
/// tunnel wait longer for their error (30 s before).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A boxed future, as returned by the object-safe [`TunnelConnection`] methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The sending half of a tunnel stream.
pub type SendHalf = Box<dyn AsyncWrite + Send + Unpin>;
/// The receiving half of a tunnel stream.
pub type RecvHalf = Box<dyn AsyncRead + Send + Unpin>;

/// One bidirectional stream of a tunnel connection.
pub struct TunnelStream {
    /// Bytes to the peer.
    pub send: SendHalf,
    /// Bytes from the peer.
    pub recv: RecvHalf,
}

/// Which transport carries a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// QUIC on UDP.
    Quic,
    /// TLS on TCP with a stream multiplexer (the fallback).
    Https,
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Quic => "quic",
            Self::Https => "https",
        })
    }
}

/// Why a transport operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The connection is gone; the text says why (peer closed, timed out, reset).
    #[error("tunnel connection lost: {0}")]
    ConnectionLost(String),
    /// The peer refused more streams for now.
    #[error("tunnel stream limit reached")]
    StreamLimit,
    /// The peer granted no new stream in time (its concurrent stream limit is used up).
    #[error(
        "the tunnel granted no new stream within {0} s (its limit of concurrent streams is reached); retry later"
    )]
    OpenTimeout(u64),
    /// Dialing or the TLS handshake failed.
    #[error("could not connect to the relay: {0}")]
    Connect(String),
    /// The relay answered and refused a new connection (it is draining): the path works, the
    /// relay takes no new tunnels.
    #[error("the relay refused a new connection: {0}")]
    Refused(String),
    /// Configuration (addresses, certificates) is unusable.
    #[error("transport configuration: {0}")]
    Config(String),
}

/// A live tunnel connection, whatever carries it.
pub trait TunnelConnection: Send + Sync + 'static {
    /// Opens a new bidirectional stream; no round trip.
    fn open_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>>;
    /// Waits for the peer to open a stream.
    fn accept_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>>;
    /// Closes the connection, telling the peer `reason`.
    fn close(&self, reason: &str);
    /// Called by the relay once the peer authenticated: lifts the bounds a peer that has not
    /// (yet) authenticated is held to, granting `receive_window` bytes of connection-wide
    /// receive window where the transport has one to widen. Does nothing by default.
    fn admit(&self, receive_window: u64) {
        let _ = receive_window;
    }
    /// Resolves once the connection has ended, with why.
    fn closed(&self) -> BoxFuture<'_, TransportError>;
    /// Which transport this is.
    fn kind(&self) -> TransportKind;
    /// The peer's address.
    fn remote_addr(&self) -> SocketAddr;
    /// The current round-trip estimate.
    fn rtt(&self) -> Duration;
    /// How long since the peer was last heard from (anything it sent, keep-alives included),
    /// to within a fraction of a second. Over [`SILENT_AFTER`] the peer is likely gone.
    fn silent_for(&self) -> Duration;
}
