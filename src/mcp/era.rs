//! MCP protocol versions and the transport era each belongs to.

/// The first protocol version of the stateless era (no `initialize`, no session id).
pub const STATELESS_SINCE: &str = "2026-07-28";

/// Session-era versions the relay knows; others before [`STATELESS_SINCE`] pass through too.
pub const SESSION_VERSIONS: &[&str] = &["2025-03-26", "2025-06-18", "2025-11-25"];

/// The HTTP header that carries the protocol version.
pub const VERSION_HEADER: &str = "mcp-protocol-version";
/// The session id header of the session era.
pub const SESSION_HEADER: &str = "mcp-session-id";
/// The 2026-07-28 header that repeats the body's method.
pub const METHOD_HEADER: &str = "mcp-method";
/// The 2026-07-28 header that repeats the body's tool, resource or prompt name.
pub const NAME_HEADER: &str = "mcp-name";

/// Prefix of the 2026-07-28 headers that repeat a call's parameters (`Mcp-Param-*`).
pub const PARAM_HEADER_PREFIX: &str = "mcp-param-";

/// Whether a header of the agent's request travels to the upstream (in the stream's open
/// header): only the 2026-07-28 routing headers, `Mcp-Method`, `Mcp-Name` and `Mcp-Param-*`.
/// `connect` applies the same rule to what it receives, so a relay can never make it set
/// `Host`, `Authorization`, `Cookie`, the upstream session id or anything else upstream.
pub fn relayed_header_allowed(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let shaped = lower == METHOD_HEADER
        || lower == NAME_HEADER
        || (lower.len() > PARAM_HEADER_PREFIX.len() && lower.starts_with(PARAM_HEADER_PREFIX));
    shaped && http::HeaderName::try_from(name).is_ok()
}

/// How a request is to be carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolEra {
    /// Sessions: `initialize`, `Mcp-Session-Id`, GET stream, DELETE.
    Session,
    /// 2026-07-28 and later: every request stands alone.
    Stateless,
}

impl ProtocolEra {
    /// The era of a declared protocol version. Versions are ISO dates, so they compare as
    /// strings; anything malformed is treated as the session era, whose servers reject it.
    pub fn of_version(version: &str) -> Self {
        let is_date = version.len() == 10
            && version.bytes().enumerate().all(|(i, b)| {
                if i == 4 || i == 7 {
                    b == b'-'
                } else {
                    b.is_ascii_digit()
                }
            });
        if is_date && version >= STATELESS_SINCE {
            Self::Stateless
        } else {
            Self::Session
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eras() {
        assert_eq!(
            ProtocolEra::of_version("2026-07-28"),
            ProtocolEra::Stateless
        );
        assert_eq!(
            ProtocolEra::of_version("2027-01-01"),
            ProtocolEra::Stateless
        );
        assert_eq!(ProtocolEra::of_version("2025-11-25"), ProtocolEra::Session);
        assert_eq!(
            ProtocolEra::of_version("DRAFT-2026-v1"),
            ProtocolEra::Session
        );
    }

    #[test]
    fn only_the_mcp_routing_headers_are_relayed() {
        for name in ["Mcp-Method", "mcp-name", "Mcp-Param-Region", "mcp-param-x"] {
            assert!(super::relayed_header_allowed(name), "{name}");
        }
        for name in [
            "Host",
            "Authorization",
            "Cookie",
            "Mcp-Session-Id",
            "MCP-Protocol-Version",
            "mcp-param-",
            "mcp-param-bad name",
            "x-forwarded-for",
        ] {
            assert!(!super::relayed_header_allowed(name), "{name}");
        }
    }
}
