//! The bridge's own handshake with a session-era upstream: the `server/discover` that tells
//! an upstream's era, the `initialize` that opens a session for stateless agents (declaring
//! the capabilities their requests declare), and the `server/discover` answer a stateless agent
//! gets from that upstream's `initialize` result.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::*;
use crate::mcp::era::{STATELESS_SINCE, era_of};
use crate::wire::Era;

/// Our own `server/discover`, sent at [`STATELESS_SINCE`] to learn whether an upstream speaks
/// 2026-07-28. It declares no client capabilities.
pub fn discover_request(id: u64) -> Bytes {
    let request = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "method": "server/discover",
        "params": {"_meta": {
            PROTOCOL_VERSION_META: STATELESS_SINCE,
            CLIENT_CAPABILITIES_META: {},
            "io.modelcontextprotocol/clientInfo": client_info(),
        }},
    });
    Bytes::from(request.to_string())
}

/// Our own session-era `initialize` at `version`, declaring `capabilities` (a JSON object):
/// those of the agents the session serves where the bridge carries server requests to them
/// as `input_required` answers (see [`declared_capabilities`]), `{}` where it answers none.
pub fn initialize_request(id: u64, version: &str, capabilities: &str) -> Bytes {
    let capabilities: serde_json::Value =
        serde_json::from_str(capabilities).unwrap_or_else(|_| serde_json::json!({}));
    let request = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "method": "initialize",
        "params": {
            "protocolVersion": version,
            "capabilities": capabilities,
            "clientInfo": client_info(),
        },
    });
    Bytes::from(request.to_string())
}

/// The largest client capabilities object a bridged session declares as the agent wrote it;
/// a larger one is declared as `{}`.
const MAX_CAPABILITIES_LEN: usize = 4096;

/// The client capabilities a 2026-07-28 request declares in its `_meta`, as JSON text with
/// its keys in order (`{}` when it declares none, or too many): what a bridged session opened
/// for it declares upstream, so the upstream offers what it would offer that client directly.
pub fn declared_capabilities(request: &[u8]) -> String {
    request_capabilities(request)
        .and_then(|capabilities| serde_json::to_string(&capabilities).ok())
        .filter(|text| text.len() <= MAX_CAPABILITIES_LEN)
        .unwrap_or_else(|| "{}".into())
}

/// The client capabilities object in a 2026-07-28 request's `_meta`, if any.
fn request_capabilities(request: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    #[derive(Deserialize)]
    struct Request {
        params: Option<Params>,
    }
    #[derive(Deserialize)]
    struct Params {
        #[serde(rename = "_meta")]
        meta: Option<Meta>,
    }
    #[derive(Deserialize)]
    struct Meta {
        #[serde(rename = "io.modelcontextprotocol/clientCapabilities")]
        capabilities: Option<serde_json::Map<String, serde_json::Value>>,
    }
    serde_json::from_slice::<Request>(request)
        .ok()
        .and_then(|r| r.params?.meta?.capabilities)
}

/// The `notifications/initialized` that completes our handshake.
pub const INITIALIZED_NOTIFICATION: &[u8] =
    br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;

fn client_info() -> serde_json::Value {
    serde_json::json!({"name": "mcp-tunnel", "version": env!("CARGO_PKG_VERSION")})
}

/// Whether an answer to `server/discover` shows an upstream that speaks 2026-07-28: a result
/// whose `supportedVersions` (required by 2026-07-28) names a version of that era. An error,
/// an answer that is not JSON-RPC (an HTTP-level refusal), or a result without the list (a
/// session-era server that answers any method it does not know with an empty result) means it
/// does not.
pub fn speaks_stateless(discover_answer: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Answer {
        result: Option<Supported>,
    }
    #[derive(Deserialize)]
    struct Supported {
        #[serde(rename = "supportedVersions", default)]
        supported_versions: Option<Vec<String>>,
    }
    serde_json::from_slice::<Answer>(discover_answer).is_ok_and(|answer| {
        answer
            .result
            .and_then(|result| result.supported_versions)
            .is_some_and(|versions| versions.iter().any(|v| era_of(v) == Era::Stateless))
    })
}

/// What a session-era upstream said in its `initialize` answer that a `server/discover`
/// result repeats.
#[derive(Debug, Clone)]
pub struct Initialized {
    /// The protocol version the session negotiated.
    pub version: String,
    capabilities: Box<RawValue>,
    server_info: Option<Box<RawValue>>,
    instructions: Option<Box<RawValue>>,
}

impl Initialized {
    /// Reads an `initialize` answer (a whole JSON-RPC response).
    pub fn parse(answer: &[u8]) -> Result<Self, BridgeError> {
        #[derive(Deserialize)]
        struct Answer {
            result: Option<InitResult>,
            error: Option<ErrorObject>,
        }
        #[derive(Deserialize)]
        struct ErrorObject {
            message: Option<String>,
        }
        #[derive(Deserialize)]
        struct InitResult {
            #[serde(rename = "protocolVersion")]
            protocol_version: String,
            capabilities: Option<Box<RawValue>>,
            #[serde(rename = "serverInfo")]
            server_info: Option<Box<RawValue>>,
            instructions: Option<Box<RawValue>>,
        }
        let refused = |why: &str| BridgeError::InitializeRefused(why.to_owned());
        let answer: Answer =
            serde_json::from_slice(answer).map_err(|_| refused("its answer is not JSON-RPC"))?;
        let Some(result) = answer.result else {
            let why = answer
                .error
                .and_then(|e| e.message)
                .unwrap_or_else(|| "an answer without a result".into());
            return Err(BridgeError::InitializeRefused(why));
        };
        let empty = || RawValue::from_string("{}".into()).expect("{} is a JSON object");
        Ok(Self {
            version: result.protocol_version,
            capabilities: result.capabilities.unwrap_or_else(empty),
            server_info: result.server_info,
            instructions: result.instructions,
        })
    }

    /// The answer to an agent's `server/discover` (with id `id`): the upstream's capabilities,
    /// instructions and server info, and the default cache hints. It advertises the session's
    /// own version only: a server request in mid-call (sampling, elicitation, roots) does not
    /// cross the bridge yet (it needs `input_required`), so a client that can use either era
    /// (`auto`) is told to take the session era, where nothing is lost; a client pinned to
    /// 2026-07-28 is still served through the bridge.
    pub fn discover_answer(&self, id: &RawValue) -> Bytes {
        #[derive(Serialize)]
        struct Answer<'a> {
            jsonrpc: &'static str,
            id: &'a RawValue,
            result: Discover<'a>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Discover<'a> {
            result_type: &'static str,
            supported_versions: [&'a str; 1],
            capabilities: &'a RawValue,
            #[serde(skip_serializing_if = "Option::is_none")]
            instructions: Option<&'a RawValue>,
            ttl_ms: u64,
            cache_scope: &'static str,
            #[serde(rename = "_meta", skip_serializing_if = "Option::is_none")]
            meta: Option<Meta<'a>>,
        }
        #[derive(Serialize)]
        struct Meta<'a> {
            #[serde(rename = "io.modelcontextprotocol/serverInfo")]
            server_info: &'a RawValue,
        }
        let answer = Answer {
            jsonrpc: "2.0",
            id,
            result: Discover {
                result_type: "complete",
                supported_versions: [self.version.as_str()],
                capabilities: &self.capabilities,
                instructions: self.instructions.as_deref(),
                ttl_ms: DEFAULT_TTL_MS,
                cache_scope: DEFAULT_CACHE_SCOPE,
                meta: self
                    .server_info
                    .as_deref()
                    .map(|server_info| Meta { server_info }),
            },
        };
        Bytes::from(serde_json::to_vec(&answer).expect("plain JSON of borrowed JSON values"))
    }
}

/// Whether a 2026-07-28 request declares the client capability `capability` in its
/// `_meta` (see [`CLIENT_CAPABILITIES_META`]).
pub fn declares_capability(request: &[u8], capability: &str) -> bool {
    request_capabilities(request).is_some_and(|capabilities| capabilities.contains_key(capability))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::bridge::testing::value;
    use serde_json::json;

    #[test]
    fn discover_is_answered_from_the_initialize_result() {
        let init = br#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-06-18","capabilities":{"tools":{"listChanged":true}},"serverInfo":{"name":"up","version":"1"},"instructions":"be nice"}}"#;
        let initialized = Initialized::parse(init).expect("a result");
        assert_eq!(initialized.version, "2025-06-18");
        let id = RawValue::from_string("\"d-1\"".into()).expect("raw");
        let answer = value(&initialized.discover_answer(&id));
        assert_eq!(
            answer,
            json!({"jsonrpc":"2.0","id":"d-1","result":{
                "resultType":"complete",
                "supportedVersions":["2025-06-18"],
                "capabilities":{"tools":{"listChanged":true}},
                "instructions":"be nice",
                "ttlMs":0,
                "cacheScope":"private",
                "_meta":{"io.modelcontextprotocol/serverInfo":{"name":"up","version":"1"}}
            }})
        );
        assert!(
            !speaks_stateless(&initialized.discover_answer(&id)),
            "auto clients take the session era while server requests do not cross the bridge"
        );

        let bare = br#"{"jsonrpc":"2.0","id":1,"result":{"protocolVersion":"2025-03-26"}}"#;
        let answer = value(
            &Initialized::parse(bare)
                .expect("a result")
                .discover_answer(&id),
        );
        assert_eq!(answer["result"]["capabilities"], json!({}));
        assert!(answer["result"].get("_meta").is_none());
    }

    #[test]
    fn a_refused_initialize_says_why() {
        let refused = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32600,"message":"this connection serves 2026-07-28"}}"#;
        assert_eq!(
            Initialized::parse(refused).unwrap_err(),
            BridgeError::InitializeRefused("this connection serves 2026-07-28".into())
        );
        assert!(Initialized::parse(b"<html>").is_err());
        assert!(Initialized::parse(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#).is_err());
    }

    #[test]
    fn only_a_modern_supported_version_shows_a_modern_upstream() {
        assert!(speaks_stateless(
            br#"{"jsonrpc":"2.0","id":1,"result":{"supportedVersions":["2025-11-25","2026-07-28"]}}"#
        ));
        assert!(!speaks_stateless(
            br#"{"jsonrpc":"2.0","id":1,"result":{"supportedVersions":["2025-11-25"]}}"#
        ));
        assert!(!speaks_stateless(
            br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"Bad Request: Server not initialized"}}"#
        ));
        assert!(!speaks_stateless(b"Bad Request"));
        assert!(
            !speaks_stateless(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#),
            "a session-era server answering every unknown method with an empty result"
        );
    }

    #[test]
    fn our_own_requests_are_well_formed() {
        let discover = value(&discover_request(3));
        assert_eq!(discover["method"], "server/discover");
        assert_eq!(
            discover["params"]["_meta"][PROTOCOL_VERSION_META],
            "2026-07-28"
        );
        let init = value(&initialize_request(4, "2025-11-25", r#"{"sampling":{}}"#));
        assert_eq!(init["params"]["protocolVersion"], "2025-11-25");
        assert_eq!(init["params"]["capabilities"]["sampling"], json!({}));
        assert_eq!(init["id"], 4);
        assert_eq!(
            value(INITIALIZED_NOTIFICATION)["method"],
            "notifications/initialized"
        );
    }

    #[test]
    fn capabilities_are_read_from_the_request_meta() {
        let request = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","_meta":{"io.modelcontextprotocol/clientCapabilities":{"sampling":{}}}}}"#;
        assert!(declares_capability(request, "sampling"));
        assert_eq!(declared_capabilities(request), r#"{"sampling":{}}"#);
        assert_eq!(declared_capabilities(b"{}"), "{}");
        assert!(!declares_capability(request, "elicitation"));
        assert!(!declares_capability(b"{}", "sampling"));
    }
}
