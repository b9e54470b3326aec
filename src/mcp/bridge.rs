//! Translating between the two protocol eras: what a stateless (2026-07-28) agent expects of an
//! upstream that speaks only the session era, built from what that upstream does say.
//!
//! Pure functions over message bytes, so every rule is tested without sockets: the requests a
//! bridge sends of its own (`server/discover` to learn the upstream's era, `initialize` to open
//! a session), the `server/discover` answer made from the upstream's `initialize` result, and
//! the fields 2026-07-28 requires on every result (`resultType`, and the cache hints of the
//! cacheable ones), inserted into the upstream's answer without re-serialising it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::era::{STATELESS_SINCE, era_of};
use crate::wire::Era;

/// `_meta` key of the protocol version a 2026-07-28 request declares.
pub const PROTOCOL_VERSION_META: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key of the capabilities a 2026-07-28 request declares.
pub const CLIENT_CAPABILITIES_META: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key of the server's name and version in a `server/discover` result.
pub const SERVER_INFO_META: &str = "io.modelcontextprotocol/serverInfo";

/// The cache lifetime given to a cacheable result whose upstream gave none: nothing may be
/// reused, the conservative reading of a server that never said.
pub const DEFAULT_TTL_MS: u64 = 0;

/// The cache scope given to a cacheable result whose upstream gave none. `private`: through a
/// governed relay a list depends on the caller (policy filters it per role), so no intermediary
/// may share it.
pub const DEFAULT_CACHE_SCOPE: &str = "private";

/// How long a call answered `input_required` waits for the agent's retry: what `connect`
/// keeps a bridged upstream request open for, and how long the relay's sealed state lives.
pub const INPUT_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Methods whose complete results carry cache hints (`ttlMs`, `cacheScope`) in 2026-07-28.
pub const CACHEABLE_METHODS: &[&str] = &[
    "server/discover",
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
];

/// Why an upstream's answer could not be translated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BridgeError {
    /// The upstream's `initialize` answer is an error, or is not JSON-RPC.
    #[error("the upstream refused initialize: {0}")]
    InitializeRefused(String),
}

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

/// Whether an answer to `server/discover` shows an upstream that speaks 2026-07-28: a result,
/// unless its `supportedVersions` lists session-era versions only. An error, or an answer
/// that is not JSON-RPC (an HTTP-level refusal), means it does not. A result without a list is
/// taken at its word: bridging a server that answered discover would only add a handshake it
/// may refuse.
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
            .is_some_and(|result| match result.supported_versions {
                Some(versions) if !versions.is_empty() => {
                    versions.iter().any(|v| era_of(v) == Era::Stateless)
                }
                _ => true,
            })
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

/// Completes a session-era answer for a 2026-07-28 agent: a result object gets
/// `resultType: "complete"` when it has no `resultType`, and a result of a cacheable `method`
/// (see [`CACHEABLE_METHODS`]) gets [`DEFAULT_TTL_MS`] and [`DEFAULT_CACHE_SCOPE`] where it
/// has none. The fields are inserted at the start of the result object: every other byte stays
/// as the upstream sent it. Anything else (errors, notifications, requests, text that is not
/// JSON) comes back unchanged.
pub fn complete(message: Bytes, method: Option<&str>) -> Bytes {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[serde(borrow)]
        result: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Present<'a> {
        #[serde(rename = "resultType", borrow)]
        result_type: Option<&'a RawValue>,
        #[serde(rename = "ttlMs", borrow)]
        ttl_ms: Option<&'a RawValue>,
        #[serde(rename = "cacheScope", borrow)]
        cache_scope: Option<&'a RawValue>,
    }
    let Ok(Envelope {
        result: Some(result),
    }) = serde_json::from_slice::<Envelope<'_>>(&message)
    else {
        return message;
    };
    let Ok(present) = serde_json::from_str::<Present<'_>>(result.get()) else {
        return message;
    };
    if present.result_type.is_some() {
        // Already 2026-07-28 (`complete`, or `input_required`, which carries no cache hints).
        return message;
    }
    let mut fields = String::from(r#""resultType":"complete""#);
    if method.is_some_and(|m| CACHEABLE_METHODS.contains(&m)) {
        if present.ttl_ms.is_none() {
            fields.push_str(&format!(r#","ttlMs":{DEFAULT_TTL_MS}"#));
        }
        if present.cache_scope.is_none() {
            fields.push_str(&format!(r#","cacheScope":"{DEFAULT_CACHE_SCOPE}""#));
        }
    }
    // The result borrows from `message`: its offset there is where the object opens.
    let open = result.get().as_ptr() as usize - message.as_ptr() as usize;
    let body = &result.get()[1..];
    if !body.trim_start().starts_with('}') {
        fields.push(',');
    }
    let mut completed = Vec::with_capacity(message.len() + fields.len());
    completed.extend_from_slice(&message[..=open]);
    completed.extend_from_slice(fields.as_bytes());
    completed.extend_from_slice(&message[open + 1..]);
    Bytes::from(completed)
}

/// `_meta` key of the client's name and version in a 2026-07-28 request.
pub const CLIENT_INFO_META: &str = "io.modelcontextprotocol/clientInfo";

/// What a 2026-07-28 upstream's `server/discover` result says that a session-era agent's
/// `initialize` result repeats: the other direction of [`Initialized`].
#[derive(Debug, Clone)]
pub struct Discovered {
    capabilities: Box<RawValue>,
    server_info: Option<Box<RawValue>>,
    instructions: Option<Box<RawValue>>,
}

impl Discovered {
    /// Reads a `server/discover` answer (a whole JSON-RPC response); `None` for an error.
    pub fn parse(answer: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        struct Answer {
            result: Option<DiscoverResult>,
        }
        #[derive(Deserialize)]
        struct DiscoverResult {
            capabilities: Option<Box<RawValue>>,
            instructions: Option<Box<RawValue>>,
            #[serde(rename = "_meta")]
            meta: Option<Meta>,
        }
        #[derive(Deserialize)]
        struct Meta {
            #[serde(rename = "io.modelcontextprotocol/serverInfo")]
            server_info: Option<Box<RawValue>>,
        }
        let result = serde_json::from_slice::<Answer>(answer).ok()?.result?;
        let empty = || RawValue::from_string("{}".into()).expect("{} is a JSON object");
        Some(Self {
            capabilities: result.capabilities.unwrap_or_else(empty),
            server_info: result.meta.and_then(|m| m.server_info),
            instructions: result.instructions,
        })
    }

    /// The answer to a session-era agent's `initialize` (id `id`) that asked for `version`:
    /// that version when it is a session-era one this relay knows, else the newest; the
    /// upstream's capabilities (but `resources.subscribe`: a session-era subscription has no
    /// 2026-07-28 counterpart on one request), server info and instructions.
    pub fn initialize_answer(&self, id: &RawValue, version: &str) -> Bytes {
        #[derive(Serialize)]
        struct Answer<'a> {
            jsonrpc: &'static str,
            id: &'a RawValue,
            result: InitResult<'a>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct InitResult<'a> {
            protocol_version: &'a str,
            capabilities: &'a RawValue,
            server_info: &'a RawValue,
            #[serde(skip_serializing_if = "Option::is_none")]
            instructions: Option<&'a RawValue>,
        }
        let version = super::era::SESSION_VERSIONS
            .iter()
            .find(|v| **v == version)
            .copied()
            .unwrap_or(super::era::LATEST_SESSION_VERSION);
        let unnamed = RawValue::from_string(r#"{"name":"unnamed","version":"0"}"#.into())
            .expect("a JSON object");
        let mut capabilities: serde_json::Value =
            serde_json::from_str(self.capabilities.get()).unwrap_or_default();
        if let Some(resources) = capabilities
            .get_mut("resources")
            .and_then(|r| r.as_object_mut())
        {
            resources.remove("subscribe");
        }
        let capabilities = serde_json::value::to_raw_value(&capabilities)
            .unwrap_or_else(|_| self.capabilities.clone());
        let answer = Answer {
            jsonrpc: "2.0",
            id,
            result: InitResult {
                protocol_version: version,
                capabilities: &capabilities,
                server_info: self.server_info.as_deref().unwrap_or(&unnamed),
                instructions: self.instructions.as_deref(),
            },
        };
        Bytes::from(serde_json::to_vec(&answer).expect("plain JSON of borrowed JSON values"))
    }
}

/// What a session-era agent declared in its `initialize`, which each of its requests carries
/// to an upstream that speaks only 2026-07-28 (where every request declares it again).
#[derive(Debug, Clone)]
pub struct Declared {
    /// The version the agent asked for.
    pub version: String,
    capabilities: serde_json::Value,
    client_info: Option<serde_json::Value>,
}

impl Declared {
    /// Reads an agent's `initialize` request.
    pub fn parse(initialize: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        struct Request {
            params: Params,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Params {
            protocol_version: String,
            capabilities: Option<serde_json::Value>,
            client_info: Option<serde_json::Value>,
        }
        let params = serde_json::from_slice::<Request>(initialize).ok()?.params;
        Some(Self {
            version: params.protocol_version,
            capabilities: params.capabilities.unwrap_or_else(|| serde_json::json!({})),
            client_info: params.client_info,
        })
    }

    /// `request` as a 2026-07-28 request: its params' `_meta` carries the version, the
    /// capabilities and the client info (keys the agent set itself stay). A retry's fields
    /// (`requestState`, `inputResponses`) are the bridge's to set, never a session-era agent's:
    /// they are dropped. `None` when it is not a JSON object with an object (or no) `params`.
    pub fn stateless_request(&self, request: &[u8]) -> Option<Bytes> {
        let mut object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(request).ok()?;
        let params = object
            .entry("params")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()?;
        params.remove("requestState");
        params.remove("inputResponses");
        let meta = params
            .entry("_meta")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()?;
        meta.insert(PROTOCOL_VERSION_META.into(), STATELESS_SINCE.into());
        meta.insert(CLIENT_CAPABILITIES_META.into(), self.capabilities.clone());
        if let Some(info) = &self.client_info {
            meta.insert(CLIENT_INFO_META.into(), info.clone());
        }
        serde_json::to_vec(&object).ok().map(Bytes::from)
    }

    /// The `subscriptions/listen` (id `id`) that feeds the agent's GET stream: every list
    /// change the agent could have been told of in its session.
    pub fn listen_request(&self, id: u64) -> Bytes {
        let request = serde_json::json!({
            "jsonrpc": "2.0",
            "id": id,
            "method": "subscriptions/listen",
            "params": {"notifications": {
                "toolsListChanged": true,
                "promptsListChanged": true,
                "resourcesListChanged": true,
            }},
        });
        self.stateless_request(request.to_string().as_bytes())
            .unwrap_or_else(|| Bytes::from(request.to_string()))
    }
}

/// An `input_required` result of a 2026-07-28 upstream, for a session-era agent: the input
/// requests it embeds (key, method, params), and its state.
#[derive(Debug)]
pub struct InputRequired {
    /// The embedded requests, in key order.
    pub requests: Vec<(String, String, Option<Box<RawValue>>)>,
    /// The upstream's `requestState`, if any.
    pub state: Option<String>,
}

impl InputRequired {
    /// The `input_required` result in `message` (a whole JSON-RPC response), if it is one.
    pub fn parse(message: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        struct Answer {
            result: InputResult,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct InputResult {
            result_type: String,
            input_requests: Option<std::collections::BTreeMap<String, Embedded>>,
            request_state: Option<String>,
        }
        #[derive(Deserialize)]
        struct Embedded {
            method: String,
            params: Option<Box<RawValue>>,
        }
        memchr::memmem::find(message, b"input_required")?;
        let result = serde_json::from_slice::<Answer>(message).ok()?.result;
        if result.result_type != "input_required" {
            return None;
        }
        Some(Self {
            requests: result
                .input_requests
                .unwrap_or_default()
                .into_iter()
                .map(|(key, e)| (key, e.method, e.params))
                .collect(),
            state: result.request_state,
        })
    }
}

/// A request to a session-era agent under the string id `id`: an input request of a
/// 2026-07-28 upstream, sent the way its era asks for input in mid-call.
pub fn server_request(id: &str, method: &str, params: Option<&RawValue>) -> Bytes {
    #[derive(Serialize)]
    struct Request<'a> {
        jsonrpc: &'static str,
        id: &'a str,
        method: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        params: Option<&'a RawValue>,
    }
    let request = Request {
        jsonrpc: "2.0",
        id,
        method,
        params,
    };
    Bytes::from(serde_json::to_vec(&request).expect("plain JSON of borrowed JSON values"))
}

/// `request` retried (SEP-2322): its params carry `responses` as `inputResponses` and the
/// upstream's `state` as `requestState` (none when it gave none).
pub fn retry_request(
    request: &[u8],
    responses: serde_json::Map<String, serde_json::Value>,
    state: Option<&str>,
) -> Option<Bytes> {
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(request).ok()?;
    let params = object.get_mut("params")?.as_object_mut()?;
    params.insert("inputResponses".into(), responses.into());
    match state {
        Some(state) => params.insert("requestState".into(), state.into()),
        None => params.remove("requestState"),
    };
    serde_json::to_vec(&object).ok().map(Bytes::from)
}

/// The responses in an agent's message (one, or a batch): each one's id (its JSON text) and
/// its result, or its error object.
pub fn agent_answers(
    message: &[u8],
) -> Vec<(String, Result<serde_json::Value, serde_json::Value>)> {
    #[derive(Deserialize)]
    struct Answer {
        // A value, not raw text: an untagged enum buffers its input, which raw text cannot be.
        id: Option<serde_json::Value>,
        result: Option<serde_json::Value>,
        error: Option<serde_json::Value>,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Body {
        One(Answer),
        Many(Vec<Answer>),
    }
    let answers = match serde_json::from_slice::<Body>(message) {
        Ok(Body::One(answer)) => vec![answer],
        Ok(Body::Many(answers)) => answers,
        Err(_) => Vec::new(),
    };
    answers
        .into_iter()
        .filter_map(|a| {
            let id = serde_json::to_string(&a.id?).ok()?;
            match (a.result, a.error) {
                (Some(result), None) => Some((id, Ok(result))),
                (_, Some(error)) => Some((id, Err(error))),
                (None, None) => None,
            }
        })
        .collect()
}

impl Declared {
    /// Whether the agent declared the client capability `capability`.
    pub fn declares(&self, capability: &str) -> bool {
        self.capabilities.get(capability).is_some()
    }
}

/// The client capability a server request needs to be carried to a 2026-07-28 agent as an
/// input request, for the methods an `input_required` answer may embed; `None` for any other.
pub fn input_capability(method: &str) -> Option<&'static str> {
    match method {
        "elicitation/create" => Some("elicitation"),
        "sampling/createMessage" => Some("sampling"),
        "roots/list" => Some("roots"),
        _ => None,
    }
}

/// Whether a 2026-07-28 request declares the client capability `capability` in its
/// `_meta` (see [`CLIENT_CAPABILITIES_META`]).
pub fn declares_capability(request: &[u8], capability: &str) -> bool {
    request_capabilities(request).is_some_and(|capabilities| capabilities.contains_key(capability))
}

/// A request an upstream sent its client (whole, as one JSON-RPC message).
#[derive(Debug, Deserialize)]
pub struct ServerRequest {
    /// Its id, as the upstream wrote it.
    pub id: Box<RawValue>,
    /// Its method.
    pub method: String,
    /// Its params, if any.
    pub params: Option<Box<RawValue>>,
}

impl ServerRequest {
    /// The request in `message`, if it is one (a response or notification is not).
    pub fn parse(message: &[u8]) -> Option<Self> {
        serde_json::from_slice(message).ok()
    }
}

/// The `input_required` answer (SEP-2322) to the agent's request `id`: the server requests
/// to embed, each under its key, and the opaque state the agent's retry hands back.
pub fn input_required(id: &RawValue, requests: &[(String, &ServerRequest)], state: &str) -> Bytes {
    #[derive(Serialize)]
    struct Answer<'a> {
        jsonrpc: &'static str,
        id: &'a RawValue,
        result: InputRequired<'a>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct InputRequired<'a> {
        result_type: &'static str,
        input_requests: std::collections::BTreeMap<&'a str, Embedded<'a>>,
        request_state: &'a str,
    }
    #[derive(Serialize)]
    struct Embedded<'a> {
        method: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        params: Option<&'a RawValue>,
    }
    let answer = Answer {
        jsonrpc: "2.0",
        id,
        result: InputRequired {
            result_type: "input_required",
            input_requests: requests
                .iter()
                .map(|(key, request)| {
                    let embedded = Embedded {
                        method: &request.method,
                        params: request.params.as_deref(),
                    };
                    (key.as_str(), embedded)
                })
                .collect(),
            request_state: state,
        },
    };
    Bytes::from(serde_json::to_vec(&answer).expect("plain JSON of borrowed JSON values"))
}

/// What an agent's retry of an `input_required` request carries back (SEP-2322).
#[derive(Debug, Default)]
pub struct Retry {
    /// The `requestState` of the answer it retries.
    pub state: Option<String>,
    /// Its answers to the embedded requests, by key.
    pub responses: std::collections::HashMap<String, Box<RawValue>>,
}

impl Retry {
    /// The retry fields of a request; `None` when it has neither (a first attempt).
    pub fn parse(request: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        struct Request {
            params: Option<Params>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Params {
            request_state: Option<String>,
            input_responses: Option<std::collections::HashMap<String, Box<RawValue>>>,
        }
        let params = serde_json::from_slice::<Request>(request).ok()?.params?;
        if params.request_state.is_none() && params.input_responses.is_none() {
            return None;
        }
        Some(Self {
            state: params.request_state,
            responses: params.input_responses.unwrap_or_default(),
        })
    }
}

/// A JSON-RPC response to the upstream's request `id`, with `result`.
pub fn response(id: &RawValue, result: &RawValue) -> Bytes {
    #[derive(Serialize)]
    struct Response<'a> {
        jsonrpc: &'static str,
        id: &'a RawValue,
        result: &'a RawValue,
    }
    let response = Response {
        jsonrpc: "2.0",
        id,
        result,
    };
    Bytes::from(serde_json::to_vec(&response).expect("plain JSON of borrowed JSON values"))
}

/// `message` (one JSON-RPC message) with its top-level `id` replaced by `id`: the answer to a
/// retried request goes out under the retry's id. `None` when it is not a JSON object.
pub fn reidentify(message: &[u8], id: &RawValue) -> Option<Bytes> {
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(message).ok()?;
    let id: serde_json::Value = serde_json::from_str(id.get()).ok()?;
    object.insert("id".into(), id);
    Some(Bytes::from(serde_json::to_vec(&object).ok()?))
}

/// The parameters of a request that name what it does: everything but the fields a retry
/// adds or changes (`inputResponses`, `requestState`) and `_meta` (progress tokens and the
/// like, fresh on every attempt). `None` when the request has no params object.
fn call_params(request: &[u8]) -> Option<(String, serde_json::Map<String, serde_json::Value>)> {
    #[derive(Deserialize)]
    struct Request {
        method: String,
        params: Option<serde_json::Map<String, serde_json::Value>>,
    }
    let request: Request = serde_json::from_slice(request).ok()?;
    let mut params = request.params.unwrap_or_default();
    for field in ["inputResponses", "requestState", "_meta"] {
        params.remove(field);
    }
    Some((request.method, params))
}

/// A digest of what a request asks (its method and [`call_params`], in a canonical form):
/// equal for a request and its retries, different for a retry with other arguments.
pub fn call_digest(request: &[u8]) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let (method, params) = call_params(request)?;
    // serde_json's map keeps its keys sorted: the text is canonical, whatever order the agent
    // wrote them in.
    let canonical = serde_json::to_vec(&params).ok()?;
    Some(
        Sha256::new()
            .chain_update(method.as_bytes())
            .chain_update([0])
            .chain_update(&canonical)
            .finalize()
            .into(),
    )
}

/// `request` with its `params.requestState` set to `state`, or removed when `None`.
pub fn with_request_state(request: &[u8], state: Option<&str>) -> Option<Bytes> {
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(request).ok()?;
    let params = object.get_mut("params")?.as_object_mut()?;
    match state {
        Some(state) => params.insert("requestState".into(), state.into()),
        None => params.remove("requestState"),
    };
    Some(Bytes::from(serde_json::to_vec(&object).ok()?))
}

/// What [`reseal_input_required`] made of an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Resealed {
    /// It is no `input_required` result: it goes as it is.
    Unchanged,
    /// Its `requestState` replaced: the message to send instead.
    Sealed(Bytes),
    /// An `input_required` result whose state could not be sealed (not a string, or refused by
    /// the sealer): the agent must not get it.
    Refused,
}

/// An `input_required` result in `message` with its `requestState` replaced by what `seal`
/// makes of it. The state may be absent (an answer with input requests only): `seal` then
/// gets `None`, and the answer gets a state all the same, so every retry is bound.
pub fn reseal_input_required(
    message: &[u8],
    seal: impl FnOnce(Option<&str>) -> Option<String>,
) -> Resealed {
    if memchr::memmem::find(message, b"input_required").is_none() {
        return Resealed::Unchanged;
    }
    let Ok(mut object) =
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(message)
    else {
        return Resealed::Unchanged;
    };
    let Some(result) = object.get_mut("result").and_then(|r| r.as_object_mut()) else {
        return Resealed::Unchanged;
    };
    if result.get("resultType").and_then(|t| t.as_str()) != Some("input_required") {
        return Resealed::Unchanged;
    }
    let state = match result.get("requestState") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(state)) => Some(state.as_str()),
        Some(_) => return Resealed::Refused,
    };
    let Some(sealed) = seal(state) else {
        return Resealed::Refused;
    };
    result.insert("requestState".into(), sealed.into());
    match serde_json::to_vec(&object) {
        Ok(bytes) => Resealed::Sealed(Bytes::from(bytes)),
        Err(_) => Resealed::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn value(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("the bridge writes JSON")
    }

    #[test]
    fn results_get_result_type_and_cacheable_ones_cache_hints() {
        let call = br#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"hi"}],"n":12345678901234567890123}}"#;
        let done = complete(Bytes::from_static(call), Some("tools/call"));
        let text = std::str::from_utf8(&done).expect("utf-8");
        assert!(
            text.starts_with(
                r#"{"jsonrpc":"2.0","id":7,"result":{"resultType":"complete","content""#
            ),
            "{text}"
        );
        assert!(
            text.contains("12345678901234567890123"),
            "other bytes are kept"
        );

        let list = br#"{"jsonrpc":"2.0","id":1,"result":{"tools":[]}}"#;
        let done = value(&complete(Bytes::from_static(list), Some("tools/list")));
        assert_eq!(
            done["result"],
            json!({"resultType":"complete","ttlMs":0,"cacheScope":"private","tools":[]})
        );

        let hinted = br#"{"jsonrpc":"2.0","id":1,"result":{"contents":[],"ttlMs":5000,"cacheScope":"public"}}"#;
        let done = value(&complete(
            Bytes::from_static(hinted),
            Some("resources/read"),
        ));
        assert_eq!(done["result"]["ttlMs"], 5000, "the upstream's hints stay");
        assert_eq!(done["result"]["cacheScope"], "public");
        assert_eq!(done["result"]["resultType"], "complete");

        let empty = br#"{"jsonrpc":"2.0","id":"x","result": { } }"#;
        let done = value(&complete(Bytes::from_static(empty), Some("ping")));
        assert_eq!(done["result"], json!({"resultType":"complete"}));
    }

    #[test]
    fn what_is_not_a_plain_result_is_left_alone() {
        for message in [
            &br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","inputRequests":{}}}"#[..],
            br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#,
            br#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progress":1}}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":[1,2]}"#,
            br#"{"jsonrpc":"2.0","id":1,"result":"text"}"#,
            b"not json",
            b"",
        ] {
            let done = complete(Bytes::copy_from_slice(message), Some("tools/list"));
            assert_eq!(&done[..], message);
        }
    }

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
            speaks_stateless(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#),
            "a result without a list is taken at its word"
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

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.into()).expect("test JSON")
    }

    #[test]
    fn a_server_request_becomes_an_input_request_and_its_answer_a_response() {
        let asked = ServerRequest::parse(
            br#"{"jsonrpc":"2.0","id":0,"method":"elicitation/create","params":{"message":"name?"}}"#,
        )
        .expect("a request");
        assert_eq!(input_capability(&asked.method), Some("elicitation"));
        assert_eq!(input_capability("ping"), None);
        let answer = value(&input_required(
            &raw(r#""a-1""#),
            &[("0".into(), &asked)],
            "S",
        ));
        assert_eq!(
            answer,
            json!({"jsonrpc":"2.0","id":"a-1","result":{"resultType":"input_required",
                "inputRequests":{"0":{"method":"elicitation/create","params":{"message":"name?"}}},
                "requestState":"S"}})
        );
        assert!(ServerRequest::parse(br#"{"jsonrpc":"2.0","id":0,"result":{}}"#).is_none());
        let retry = Retry::parse(
            br#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"t","requestState":"S","inputResponses":{"0":{"action":"accept"}}}}"#,
        )
        .expect("a retry");
        assert_eq!(retry.state.as_deref(), Some("S"));
        let upstream = value(&response(&asked.id, &retry.responses["0"]));
        assert_eq!(
            upstream,
            json!({"jsonrpc":"2.0","id":0,"result":{"action":"accept"}})
        );
        assert!(
            Retry::parse(
                br#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"t"}}"#
            )
            .is_none()
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

    #[test]
    fn a_retry_digests_like_its_first_attempt_and_unlike_other_arguments() {
        let first = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":1,"b":2},"_meta":{"progressToken":1}}}"#;
        let retry = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"arguments":{"b":2,"a":1},"name":"t","requestState":"S","inputResponses":{},"_meta":{"progressToken":2}}}"#;
        let other = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"t","arguments":{"a":1,"b":3},"requestState":"S"}}"#;
        let prompt = br#"{"jsonrpc":"2.0","id":2,"method":"prompts/get","params":{"name":"t","arguments":{"a":1,"b":2}}}"#;
        assert_eq!(call_digest(first), call_digest(retry));
        assert_ne!(call_digest(first), call_digest(other));
        assert_ne!(call_digest(first), call_digest(prompt));
    }

    #[test]
    fn ids_and_states_are_rewritten_and_input_required_is_resealed() {
        let answer = reidentify(
            br#"{"result":{"x":1},"jsonrpc":"2.0","id":1}"#,
            &raw(r#""r""#),
        )
        .expect("an object");
        assert_eq!(
            value(&answer),
            json!({"result":{"x":1},"jsonrpc":"2.0","id":"r"})
        );
        let request = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","requestState":"SEALED"}}"#;
        let inner = with_request_state(request, Some("inner")).expect("an object");
        assert_eq!(value(&inner)["params"]["requestState"], "inner");
        let none = with_request_state(request, None).expect("an object");
        assert!(value(&none)["params"].get("requestState").is_none());

        let native = br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","inputRequests":{},"requestState":"up"}}"#;
        match reseal_input_required(native, |state| {
            Some(format!("sealed({})", state.unwrap_or("-")))
        }) {
            Resealed::Sealed(bytes) => {
                assert_eq!(value(&bytes)["result"]["requestState"], "sealed(up)")
            }
            other => panic!("resealed: {other:?}"),
        }
        let stateless = br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","inputRequests":{"k":{"method":"roots/list"}}}}"#;
        match reseal_input_required(stateless, |state| {
            Some(format!("sealed({})", state.unwrap_or("-")))
        }) {
            Resealed::Sealed(bytes) => {
                assert_eq!(value(&bytes)["result"]["requestState"], "sealed(-)")
            }
            other => panic!("resealed: {other:?}"),
        }
        assert_eq!(reseal_input_required(native, |_| None), Resealed::Refused);
        let complete = br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"complete","text":"input_required"}}"#;
        assert_eq!(
            reseal_input_required(complete, |_| None),
            Resealed::Unchanged
        );
    }

    #[test]
    fn a_session_agent_meets_a_stateless_upstream() {
        let discover = br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"complete","supportedVersions":["2026-07-28"],"capabilities":{"tools":{},"resources":{"subscribe":true,"listChanged":true}},"instructions":"be kind","_meta":{"io.modelcontextprotocol/serverInfo":{"name":"modern","version":"2"}}}}"#;
        let discovered = Discovered::parse(discover).expect("a result");
        let answer = value(&discovered.initialize_answer(&raw("0"), "2025-06-18"));
        assert_eq!(
            answer,
            json!({"jsonrpc":"2.0","id":0,"result":{"protocolVersion":"2025-06-18",
                "capabilities":{"tools":{},"resources":{"listChanged":true}},"serverInfo":{"name":"modern","version":"2"},
                "instructions":"be kind"}})
        );
        let newest = value(&discovered.initialize_answer(&raw("0"), "2099-01-01"));
        assert_eq!(newest["result"]["protocolVersion"], "2025-11-25");
        assert!(
            Discovered::parse(
                br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#
            )
            .is_none()
        );

        let declared = Declared::parse(
            br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{"sampling":{}},"clientInfo":{"name":"c","version":"1"}}}"#,
        )
        .expect("an initialize");
        let call = declared
            .stateless_request(br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"t","requestState":"forged","_meta":{"progressToken":9}}}"#)
            .expect("an object");
        assert!(
            value(&call)["params"].get("requestState").is_none(),
            "the agent's own state is dropped"
        );
        let meta = &value(&call)["params"]["_meta"];
        assert_eq!(meta["progressToken"], 9);
        assert_eq!(meta[PROTOCOL_VERSION_META], "2026-07-28");
        assert_eq!(meta[CLIENT_CAPABILITIES_META], json!({"sampling":{}}));
        assert_eq!(meta[CLIENT_INFO_META]["name"], "c");
        let list = declared
            .stateless_request(br#"{"jsonrpc":"2.0","id":4,"method":"tools/list"}"#)
            .expect("an object");
        assert_eq!(
            value(&list)["params"]["_meta"][PROTOCOL_VERSION_META],
            "2026-07-28"
        );
        assert_eq!(
            value(&declared.listen_request(5))["params"]["notifications"]["toolsListChanged"],
            true
        );
    }

    #[test]
    fn header_values_that_are_not_plain_are_base64_encoded_and_decode_back() {
        use crate::mcp::era::{decode_header_value, encode_header_value};
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

    #[test]
    fn a_stateless_upstreams_input_request_is_asked_of_a_session_agent_and_retried() {
        let answer = br#"{"jsonrpc":"2.0","id":3,"result":{"resultType":"input_required","inputRequests":{"ok":{"method":"elicitation/create","params":{"message":"sure?"}}},"requestState":"st"}}"#;
        let asked = InputRequired::parse(answer).expect("input_required");
        assert_eq!(asked.state.as_deref(), Some("st"));
        let (key, method, params) = &asked.requests[0];
        assert_eq!(
            (key.as_str(), method.as_str()),
            ("ok", "elicitation/create")
        );
        let request = value(&server_request("mcp-tunnel-1", method, params.as_deref()));
        assert_eq!(
            request,
            json!({"jsonrpc":"2.0","id":"mcp-tunnel-1","method":"elicitation/create","params":{"message":"sure?"}})
        );
        assert!(
            InputRequired::parse(br#"{"jsonrpc":"2.0","id":3,"result":{"resultType":"complete"}}"#)
                .is_none()
        );

        let answers =
            agent_answers(br#"{"jsonrpc":"2.0","id":"mcp-tunnel-1","result":{"action":"accept"}}"#);
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].0, r#""mcp-tunnel-1""#);
        let mut responses = serde_json::Map::new();
        responses.insert("ok".into(), answers[0].1.clone().expect("a result"));
        let retry = retry_request(
            br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"t"}}"#,
            responses,
            asked.state.as_deref(),
        )
        .expect("an object");
        let retry = value(&retry);
        assert_eq!(retry["params"]["inputResponses"]["ok"]["action"], "accept");
        assert_eq!(retry["params"]["requestState"], "st");
        let failed =
            agent_answers(br#"[{"jsonrpc":"2.0","id":7,"error":{"code":-1,"message":"no"}}]"#);
        assert!(failed[0].1.is_err());
    }
}
