//! `[limits]` and `[rate_limits]`: sizes, counts and timeouts, with their defaults.

use std::time::Duration;

use serde::Deserialize;

/// Default agent request body and tunnel frame limit: 16 MiB, room for any real request while
/// one caller cannot make the relay hold much more.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// How long the relay waits for an upstream's answer to one request. Long-running tools report
/// progress and may take minutes; five minutes bounds a stuck one.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 300;
/// An agent session with no request for this long is ended (and its tunnel stream closed).
pub const DEFAULT_SESSION_IDLE_SECS: u64 = 30 * 60;

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest agent request body and tunnel frame, in bytes.
    pub max_message_bytes: usize,
    /// Seconds to wait for an upstream's answer to one request.
    pub request_timeout_secs: u64,
    /// Seconds an idle agent session lives.
    pub session_idle_secs: u64,
    // --- hardening (issue 13): batch bound ---
    /// Most messages one agent batch may hold (a JSON-RPC error beyond); 0 refuses batches.
    pub max_batch_messages: usize,
    /// Largest single upstream answer (one JSON-RPC message from a source), in bytes: large
    /// answers travel in pieces, so this bounds a runaway answer, not the relay's memory
    /// (see [`DEFAULT_MAX_ANSWER_BYTES`]).
    pub max_answer_bytes: usize,

    // --- Sessions, streams and event logs (issue 13: items 8 and 10) ---
    /// Open sessions (and stateless `subscriptions/listen` streams) one caller (API key or
    /// token subject) may hold; 0: no cap.
    pub max_sessions_per_key: usize,
    /// Open sessions (and listen streams) of all callers of one tenant; 0: no cap.
    pub max_sessions_per_tenant: usize,
    /// Open sessions (and listen streams) of one tenant's source; 0: no cap.
    pub max_sessions_per_source: usize,
    /// Seconds to wait for the tunnel to grant a new stream (the peer's stream credit), before
    /// the agent gets an error naming the source.
    pub open_stream_timeout_secs: u64,
    /// Bytes one session may hold in its event logs and queues (answers and server messages
    /// kept for a slow or absent agent, and for resumption); past it the oldest unread ones
    /// are dropped (and counted).
    pub session_event_bytes: usize,

    // --- Listener and tunnel admission bounds (read at start). ---
    /// Seconds an agent or admin connection has to deliver a request's complete header,
    /// counted from the request's first byte.
    pub agent_header_timeout_secs: u64,
    /// Seconds an agent or admin connection may stay open with no request in flight, a fresh
    /// one included (HTTP/2 gets a GOAWAY); open SSE streams and calls waiting on their
    /// upstream are in flight.
    pub agent_idle_timeout_secs: u64,
    /// Agent connections served at once; more wait in the listen backlog.
    pub max_agent_connections: usize,
    /// Admin connections served at once; more wait in the listen backlog.
    pub max_admin_connections: usize,
    /// Tunnel connections in their TLS handshake and `hello` at once (QUIC and HTTPS
    /// together); more are refused until one finishes.
    pub max_tunnel_handshakes: usize,
    /// Seconds a tunnel connection has for TLS and its `hello` together.
    pub tunnel_handshake_timeout_secs: u64,
    /// Bytes an authenticated QUIC tunnel connection may have in flight towards the relay over
    /// all its streams (the connection receive window). Before the `hello` is accepted, the
    /// window is [`MIN_TUNNEL_RECEIVE_WINDOW`].
    pub tunnel_receive_window_bytes: u64,
    /// After a request body over `max_message_bytes`, how many more bytes the relay reads and
    /// discards so the client, still sending, can read its 413 (reloadable).
    pub oversized_body_drain_bytes: usize,
    /// Seconds the relay spends discarding the rest of an oversized body (reloadable).
    pub oversized_body_drain_secs: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT_SECS,
            session_idle_secs: DEFAULT_SESSION_IDLE_SECS,
            max_batch_messages: DEFAULT_MAX_BATCH_MESSAGES,
            max_answer_bytes: DEFAULT_MAX_ANSWER_BYTES,
            max_sessions_per_key: DEFAULT_MAX_SESSIONS_PER_KEY,
            max_sessions_per_tenant: DEFAULT_MAX_SESSIONS_PER_TENANT,
            max_sessions_per_source: DEFAULT_MAX_SESSIONS_PER_SOURCE,
            open_stream_timeout_secs: DEFAULT_OPEN_STREAM_TIMEOUT_SECS,
            session_event_bytes: DEFAULT_SESSION_EVENT_BYTES,
            // Listener and tunnel admission bounds.
            agent_header_timeout_secs: DEFAULT_AGENT_HEADER_TIMEOUT_SECS,
            agent_idle_timeout_secs: DEFAULT_AGENT_IDLE_TIMEOUT_SECS,
            max_agent_connections: DEFAULT_MAX_AGENT_CONNECTIONS,
            max_admin_connections: DEFAULT_MAX_ADMIN_CONNECTIONS,
            max_tunnel_handshakes: DEFAULT_MAX_TUNNEL_HANDSHAKES,
            tunnel_handshake_timeout_secs: DEFAULT_TUNNEL_HANDSHAKE_TIMEOUT_SECS,
            tunnel_receive_window_bytes: DEFAULT_TUNNEL_RECEIVE_WINDOW,
            oversized_body_drain_bytes: DEFAULT_OVERSIZED_BODY_DRAIN_BYTES,
            oversized_body_drain_secs: DEFAULT_OVERSIZED_BODY_DRAIN_SECS,
        }
    }
}

impl LimitsSection {
    /// The per-request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// The idle session lifetime.
    pub fn session_idle(&self) -> Duration {
        Duration::from_secs(self.session_idle_secs)
    }

    /// How long opening a tunnel stream may wait.
    pub fn open_stream_timeout(&self) -> Duration {
        Duration::from_secs(self.open_stream_timeout_secs)
    }

    /// Checks the listener and tunnel admission bounds: a zero timeout or cap would refuse
    /// everything, and the tunnel window must hold at least what a peer may send before it
    /// authenticates.
    pub fn validate_listeners(&self) -> Result<(), String> {
        let positive = [
            ("agent_header_timeout_secs", self.agent_header_timeout_secs),
            ("agent_idle_timeout_secs", self.agent_idle_timeout_secs),
            ("max_agent_connections", self.max_agent_connections as u64),
            ("max_admin_connections", self.max_admin_connections as u64),
            ("max_tunnel_handshakes", self.max_tunnel_handshakes as u64),
            (
                "tunnel_handshake_timeout_secs",
                self.tunnel_handshake_timeout_secs,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("[limits] {key} must be at least 1"));
            }
        }
        let window = self.tunnel_receive_window_bytes;
        if !(MIN_TUNNEL_RECEIVE_WINDOW..=MAX_TUNNEL_RECEIVE_WINDOW).contains(&window) {
            return Err(format!(
                "[limits] tunnel_receive_window_bytes must be between {MIN_TUNNEL_RECEIVE_WINDOW} and 2^40"
            ));
        }
        Ok(())
    }

    /// How much of an oversized body is discarded, and for how long at most.
    pub fn oversized_body_drain(&self) -> (usize, Duration) {
        (
            self.oversized_body_drain_bytes,
            Duration::from_secs(self.oversized_body_drain_secs),
        )
    }
}

// --- Listener and tunnel admission bounds ---

/// Default `[limits] agent_header_timeout_secs`: a real client sends its header in one go; 10 s
/// covers a slow link and closes a slowloris connection quickly.
pub const DEFAULT_AGENT_HEADER_TIMEOUT_SECS: u64 = 10;
/// Default `[limits] agent_idle_timeout_secs`: longer than common client pools keep idle
/// connections (httpx 5 s, reqwest 90 s), so a client rarely reuses one just as the relay closes
/// it; far shorter than a forgotten socket.
pub const DEFAULT_AGENT_IDLE_TIMEOUT_SECS: u64 = 120;
/// Default `[limits] max_agent_connections`: well under a raised file descriptor limit, ample
/// for thousands of agents with open SSE streams.
pub const DEFAULT_MAX_AGENT_CONNECTIONS: usize = 4096;
/// Default `[limits] max_admin_connections`: scrapers and a few operators.
pub const DEFAULT_MAX_ADMIN_CONNECTIONS: usize = 64;
/// Default `[limits] max_tunnel_handshakes`: a fleet reconnecting after a relay restart gets
/// through in moments (a handshake takes milliseconds), while a flood of peers that never
/// authenticate holds at most this many connections' worth of memory.
pub const DEFAULT_MAX_TUNNEL_HANDSHAKES: usize = 256;
/// Default `[limits] tunnel_handshake_timeout_secs`: time for TLS and `hello` together.
pub const DEFAULT_TUNNEL_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// Default `[limits] tunnel_receive_window_bytes`: 16 MiB keeps a fast link busy (1.6 GB/s at
/// 10 ms round trip) and bounds what one connection makes the relay buffer.
pub const DEFAULT_TUNNEL_RECEIVE_WINDOW: u64 = 16 * 1024 * 1024;
/// The smallest `tunnel_receive_window_bytes`: the 128 KiB window a tunnel connection has
/// before its `hello` is accepted (the transport's pre-authentication window).
pub const MIN_TUNNEL_RECEIVE_WINDOW: u64 = 128 * 1024;
/// The largest `tunnel_receive_window_bytes`: 1 TiB, past any useful window.
const MAX_TUNNEL_RECEIVE_WINDOW: u64 = 1 << 40;
/// Default `[limits] oversized_body_drain_bytes`.
pub const DEFAULT_OVERSIZED_BODY_DRAIN_BYTES: usize = 64 * 1024 * 1024;
/// Default `[limits] oversized_body_drain_secs`.
pub const DEFAULT_OVERSIZED_BODY_DRAIN_SECS: u64 = 30;

// --- Session limits (issue 13: items 8 and 10) ---

/// Default of `[limits] max_sessions_per_key`: room for a backend that serves many users with
/// one key, and for clients that restart without ending their sessions, yet a bound on what
/// one leaked or stolen key can hold open.
pub const DEFAULT_MAX_SESSIONS_PER_KEY: usize = 256;
/// Default of `[limits] max_sessions_per_tenant`.
pub const DEFAULT_MAX_SESSIONS_PER_TENANT: usize = 1024;
/// Default of `[limits] max_sessions_per_source`.
pub const DEFAULT_MAX_SESSIONS_PER_SOURCE: usize = 512;
/// Default of `[limits] open_stream_timeout_secs`.
pub const DEFAULT_OPEN_STREAM_TIMEOUT_SECS: u64 = 10;
/// Default of `[limits] session_event_bytes`: 32 MiB, two messages of the largest default size.
pub const DEFAULT_SESSION_EVENT_BYTES: usize = 32 * 1024 * 1024;

// --- hardening (issue 13): batch bound ---

/// Default `[limits] max_batch_messages`: more than any real client batches, few enough that
/// governing one batch stays cheap.
pub const DEFAULT_MAX_BATCH_MESSAGES: usize = 100;

// ---------------------------------------------------------------------------------------------
// Upstream answer limit (`[limits] max_answer_bytes` on the relay, `max_answer_bytes` in
// connect's file), separate from `max_message_bytes`, which bounds what agents send.

/// Default limit on one upstream answer: 256 MiB. Answers larger than a tunnel frame cross in
/// pieces and are passed on as they arrive, so this bounds a runaway answer (and the time and
/// bandwidth it costs), not the memory of the relay or `connect`.
pub const DEFAULT_MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;

/// Checks an answer limit: at least 1024 bytes, and not below `max_message_bytes` (an answer
/// that fits one frame is never refused for its size).
pub fn check_max_answer_bytes(max_answer: usize, max_message: usize) -> Result<(), String> {
    if max_answer < 1024 || max_answer < max_message {
        return Err(format!(
            "max_answer_bytes ({max_answer}) must be at least 1024 and at least max_message_bytes ({max_message})"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// `[rate_limits]`

/// `[rate_limits]`: every rate is optional; an absent one does not limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsSection {
    /// Agent requests per identity (tenant and subject).
    pub identity: Option<RateSection>,
    /// Agent requests per tenant and source, all callers together.
    pub source: Option<RateSection>,
    /// Agent requests per tenant, all its callers and sources together: one tenant cannot
    /// take the relay's whole capacity from the others.
    pub tenant: Option<RateSection>,
    /// Failed authentication attempts per remote IP address.
    pub auth_failures: Option<RateSection>,
    /// Bound on the buckets each kind of limit keeps (the least recently used go first);
    /// absent: 100,000, a few MiB of memory.
    pub max_keys: Option<usize>,
}

/// One rate: `per_minute` tokens a minute, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSection {
    /// Tokens added per minute (at least 1).
    pub per_minute: u32,
    /// Bucket size: how many may come at once (at least 1).
    pub burst: u32,
}

impl RateLimitsSection {
    /// Checks every configured rate; the error names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("identity", &self.identity),
            ("source", &self.source),
            ("tenant", &self.tenant),
            ("auth_failures", &self.auth_failures),
        ] {
            if let Some(rate) = rate
                && (rate.per_minute == 0 || rate.burst == 0)
            {
                return Err(format!(
                    "[rate_limits] {name}: per_minute and burst must both be at least 1"
                ));
            }
        }
        if self.max_keys == Some(0) {
            return Err("[rate_limits] max_keys must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rates_are_refused_naming_the_limit() {
        let section = RateLimitsSection {
            source: Some(RateSection {
                per_minute: 0,
                burst: 1,
            }),
            ..RateLimitsSection::default()
        };
        let error = section.validate().expect_err("invalid");
        assert!(error.contains("[rate_limits] source"), "{error}");
    }

    #[test]
    fn default_listener_bounds_are_valid_and_zero_bounds_are_named() {
        let limits = LimitsSection::default();
        assert_eq!(limits.validate_listeners(), Ok(()));
        let zero = LimitsSection {
            max_tunnel_handshakes: 0,
            ..LimitsSection::default()
        };
        let err = zero.validate_listeners().expect_err("zero handshakes");
        assert!(err.contains("max_tunnel_handshakes"), "{err}");
        let tiny = LimitsSection {
            tunnel_receive_window_bytes: 1024,
            ..LimitsSection::default()
        };
        let err = tiny.validate_listeners().expect_err("tiny window");
        assert!(err.contains("tunnel_receive_window_bytes"), "{err}");
    }
}
