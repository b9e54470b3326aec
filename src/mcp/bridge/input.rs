//! Requests in mid-call across eras, the 2026-07-28 way (SEP-2322): a session-era upstream's
//! request becomes an `input_required` answer; an agent's retry carries its `requestState` and
//! `inputResponses` back; the relay reseals every state and digests the call it belongs to.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

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
    use crate::mcp::bridge::testing::{raw, value};
    use serde_json::json;

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
}
