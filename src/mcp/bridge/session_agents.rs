//! Session-era agents of an upstream that speaks only 2026-07-28: `initialize` answered from
//! `server/discover`, each request made stateless with what the agent declared, and the
//! upstream's `input_required` answers asked of the agent as requests in mid-call.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::*;
use crate::mcp::era::STATELESS_SINCE;

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
        let version = crate::mcp::era::SESSION_VERSIONS
            .iter()
            .find(|v| **v == version)
            .copied()
            .unwrap_or(crate::mcp::era::LATEST_SESSION_VERSION);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::bridge::testing::{raw, value};
    use serde_json::json;

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
