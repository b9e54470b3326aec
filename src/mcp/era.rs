//! MCP protocol versions and the transport era each belongs to: the one place that names them.

use crate::wire::Era;

/// The first protocol version of the stateless era (no `initialize`, no session id).
pub const STATELESS_SINCE: &str = "2026-07-28";

/// Session-era versions the relay knows; others before [`STATELESS_SINCE`] pass through too.
pub const SESSION_VERSIONS: &[&str] = &["2025-03-26", "2025-06-18", "2025-11-25"];

/// The newest session-era version: what our session-era peers (the demo server, the pooled
/// stdio sessions, the bench client) speak.
pub const LATEST_SESSION_VERSION: &str = SESSION_VERSIONS[SESSION_VERSIONS.len() - 1];

/// The first version whose servers open every SSE stream with a priming event (an id and no
/// data) that a client may resume from.
pub const PRIMED_STREAMS_SINCE: &str = "2025-11-25";

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

/// Requests that name a tool, prompt or resource (`Mcp-Name` repeats it), and that a server
/// may answer `input_required` in 2026-07-28 (SEP-2322).
pub fn names_target(method: &str) -> bool {
    matches!(method, "tools/call" | "prompts/get" | "resources/read")
}

/// A header value as 2026-07-28 carries it: as it is when it is plain printable ASCII without
/// surrounding spaces, else `=?base64?<standard base64 of its UTF-8>?=`.
pub fn encode_header_value(value: &str) -> String {
    let plain = value.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !value.starts_with(' ')
        && !value.ends_with(' ')
        && !value.starts_with("=?");
    if plain {
        return value.to_owned();
    }
    use base64::Engine;
    format!(
        "=?base64?{}?=",
        base64::engine::general_purpose::STANDARD.encode(value)
    )
}

/// Decodes the `=?base64?<b64>?=` header form; plain values pass through.
pub fn decode_header_value(value: &str) -> Option<String> {
    match value
        .strip_prefix("=?base64?")
        .and_then(|v| v.strip_suffix("?="))
    {
        Some(encoded) => {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()?;
            String::from_utf8(bytes).ok()
        }
        None => Some(value.to_owned()),
    }
}

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

/// The era of a declared protocol version. Versions are ISO dates, so they compare as strings;
/// anything malformed is treated as the session era, whose servers reject it.
pub fn era_of(version: &str) -> Era {
    let is_date = version.len() == 10
        && version.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if is_date && version >= STATELESS_SINCE {
        Era::Stateless
    } else {
        Era::Session
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eras() {
        assert_eq!(era_of("2026-07-28"), Era::Stateless);
        assert_eq!(era_of("2027-01-01"), Era::Stateless);
        assert_eq!(era_of("2025-11-25"), Era::Session);
        assert_eq!(era_of("DRAFT-2026-v1"), Era::Session);
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

    #[test]
    fn header_values_that_are_not_plain_are_base64_encoded_and_decode_back() {
        assert_eq!(encode_header_value("get_weather"), "get_weather");
        assert_eq!(encode_header_value("file:///a b"), "file:///a b");
        assert_eq!(encode_header_value("café"), "=?base64?Y2Fmw6k=?=");
        assert_eq!(encode_header_value(" x"), "=?base64?IHg=?=");
        for value in ["café", " x", "plain"] {
            assert_eq!(
                decode_header_value(&encode_header_value(value)).as_deref(),
                Some(value)
            );
        }
    }
}
