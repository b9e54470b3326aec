//! The bounds on the relay's listeners and on tunnel admission, as the relay applies them.

use std::time::Duration;

use crate::config::LimitsSection;

/// Bounds on the relay's listeners and on tunnel admission, from `[limits]`: what a peer can
/// hold open before (and without) authenticating. Read when the relay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ListenerLimits {
    /// Time to deliver a request's complete header, from its first byte.
    pub header_timeout: Duration,
    /// Time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Agent connections served at once.
    pub max_agent_connections: usize,
    /// Admin connections served at once.
    pub max_admin_connections: usize,
    /// Tunnel connections in TLS or `hello` at once.
    pub max_tunnel_handshakes: usize,
    /// Time for TLS and `hello` together.
    pub tunnel_handshake_timeout: Duration,
    /// An authenticated QUIC connection's receive window, in bytes.
    pub tunnel_receive_window: u64,
}

impl From<&LimitsSection> for ListenerLimits {
    fn from(limits: &LimitsSection) -> Self {
        Self {
            header_timeout: Duration::from_secs(limits.agent_header_timeout_secs),
            idle_timeout: Duration::from_secs(limits.agent_idle_timeout_secs),
            max_agent_connections: limits.max_agent_connections,
            max_admin_connections: limits.max_admin_connections,
            max_tunnel_handshakes: limits.max_tunnel_handshakes,
            tunnel_handshake_timeout: Duration::from_secs(limits.tunnel_handshake_timeout_secs),
            tunnel_receive_window: limits.tunnel_receive_window_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_smallest_configurable_window_is_the_pre_authentication_window() {
        assert_eq!(
            crate::config::MIN_TUNNEL_RECEIVE_WINDOW,
            crate::transport::quic::PRE_AUTH_WINDOW
        );
    }
}
