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
}
