//! JSON-RPC 2.0 message classification and error bodies.

use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;

/// JSON-RPC error codes the relay and `connect` produce.
pub mod codes {
    /// Invalid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Valid JSON, not a valid JSON-RPC message.
    pub const INVALID_REQUEST: i64 = -32600;
    /// Unknown method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Bad parameters; also an unknown tool, which is how a denied tool reads to its caller.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The relay or tunnel failed.
    pub const INTERNAL_ERROR: i64 = -32603;
    /// 2026-07-28: `Mcp-Method` / `Mcp-Name` headers do not match the body.
    pub const HEADER_MISMATCH: i64 = -32020;
    /// The source could not be reached (upstream down, tunnel lost).
    pub const SOURCE_UNAVAILABLE: i64 = -32000;
    /// The source did not answer in time.
    pub const TIMEOUT: i64 = -32001;
    /// A message exceeded a size limit.
    pub const TOO_LARGE: i64 = -32002;
    /// The relay refuses calls while its audit trail cannot take their records
    /// (`[audit] on_database_down = "refuse"`): fail closed.
    pub const AUDIT_UNAVAILABLE: i64 = -32003;
}

/// The kind of one JSON-RPC message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// Has `method` and `id`: expects a response.
    Request,
    /// Has `method`, no `id`.
    Notification,
    /// Has `result` or `error` and an `id`.
    Response,
}

/// What governance needs to know about one message.
#[derive(Debug, Clone)]
pub struct MessageInfo {
    /// Request, notification or response.
    pub kind: MessageKind,
    /// The id as its raw JSON text (`1`, `"abc"`), for matching and error replies.
    pub id: Option<Box<RawValue>>,
    /// The method of a request or notification.
    pub method: Option<String>,
    /// `params.name` (tools/call, prompts/get) or `params.uri` (resources/read).
    pub target: Option<String>,
    /// For a response: `result.isError == true` (a failed tool call).
    pub is_tool_error: bool,
    /// For a response: `result.resultType == "input_required"` (2026-07-28: the far side asks
    /// the agent for input; the agent's retry is the call's next round).
    pub is_input_required: bool,
    /// For a response: the JSON-RPC error code, if it is an error.
    pub error_code: Option<i64>,
    /// Where the message's `params` (request, notification) or `result` (response) JSON text
    /// lies in the classified body, so the audit trail digests and captures it without a
    /// second parse.
    pub payload: Option<Range<usize>>,
    /// The message's size in bytes (within a batch, its own share).
    pub size: usize,
    /// Whether the message has `"id": null`. MCP forbids null ids: such a message with a
    /// `method` is a [`MessageKind::Request`] (never a notification) without an `id`, which the
    /// relay refuses; a response may carry a null id (an error about an unreadable request).
    pub null_id: bool,
}

impl MessageInfo {
    /// The `params` or `result` text of this message within `body` (the bytes it was
    /// classified from).
    pub fn payload<'a>(&self, body: &'a [u8]) -> Option<&'a [u8]> {
        body.get(self.payload.clone()?)
    }
}

/// A classified body: one message or a batch.
#[derive(Debug, Clone)]
pub enum Classified {
    /// A single message.
    Single(MessageInfo),
    /// A JSON array of messages.
    Batch(Vec<MessageInfo>),
}

impl Classified {
    /// The messages, in order.
    pub fn messages(&self) -> &[MessageInfo] {
        match self {
            Classified::Single(one) => std::slice::from_ref(one),
            Classified::Batch(many) => many,
        }
    }

    /// The requests among the messages: what an answer must respond to.
    pub fn requests(&self) -> Vec<&MessageInfo> {
        self.messages()
            .iter()
            .filter(|m| m.kind == MessageKind::Request)
            .collect()
    }

    /// Whether any message expects a response.
    pub fn has_requests(&self) -> bool {
        self.messages()
            .iter()
            .any(|m| m.kind == MessageKind::Request)
    }

    /// Whether every message is a response (a reply to a server's request, or a batch of them).
    pub fn is_all_responses(&self) -> bool {
        self.messages()
            .iter()
            .all(|m| m.kind == MessageKind::Response)
    }
}

/// Why a body is not JSON-RPC.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// Not JSON at all (-32700).
    #[error("parse error: {0}")]
    Parse(String),
    /// JSON, but not a JSON-RPC 2.0 message (-32600).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ClassifyError {
    /// The JSON-RPC error code for this failure.
    pub fn code(&self) -> i64 {
        match self {
            ClassifyError::Parse(_) => codes::PARSE_ERROR,
            ClassifyError::Invalid(_) => codes::INVALID_REQUEST,
        }
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    jsonrpc: Option<&'a str>,
    /// Present with its text, `null` included (`Option` alone would read `null` as absent).
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    method: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    params: Option<&'a RawValue>,
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    #[serde(borrow)]
    error: Option<&'a RawValue>,
}

/// A field that is there, whatever its value (`null` too).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct WireError {
    code: i64,
    #[allow(
        dead_code,
        reason = "present in the wire shape; only the code is needed"
    )]
    message: Option<IgnoredAny>,
}

/// The two fields a governed method may name its target by. Deserialized by derive, so a
/// field given twice is an error (which copy would the upstream read?), and so is a value that
/// is not a string.
#[derive(Deserialize)]
struct Params<'a> {
    #[serde(borrow)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    uri: Option<std::borrow::Cow<'a, str>>,
}

/// The `params` field a governed method's upstream acts on, and the one it ignores, for the
/// methods policy governs; `None` for any other method.
///
/// Policy, conditions and the audit trail judge a call on exactly the field the upstream
/// reads: `name` for `tools/call` and `prompts/get`, `uri` for the resource methods.
pub fn target_field(method: &str) -> Option<(&'static str, &'static str)> {
    match method {
        "tools/call" | "prompts/get" => Some(("name", "uri")),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Some(("uri", "name")),
        _ => None,
    }
}

/// The target of a governed request: `params` must be an object holding the method's one
/// target field as a string, and not the other one (a message naming its target two ways is
/// ambiguous: an upstream reads one, and policy must judge that one, so it is refused).
fn target_of(method: &str, params: Option<&RawValue>) -> Result<Option<String>, ClassifyError> {
    let Some((field, other)) = target_field(method) else {
        return Ok(None);
    };
    let invalid = |why: String| ClassifyError::Invalid(format!("{method}: {why}"));
    let Some(params) = params.filter(|p| p.get().trim_start().starts_with('{')) else {
        return Err(invalid(format!("params must be an object with {field:?}")));
    };
    let p: Params<'_> =
        serde_json::from_str(params.get()).map_err(|e| invalid(format!("params: {e}")))?;
    let (target, ignored) = match field {
        "name" => (p.name, p.uri),
        _ => (p.uri, p.name),
    };
    if ignored.is_some() {
        return Err(invalid(format!(
            "params.{other} is ambiguous: the target is named by params.{field} only"
        )));
    }
    match target {
        Some(target) => Ok(Some(target.into_owned())),
        None => Err(invalid(format!("params.{field} is required"))),
    }
}

#[derive(Deserialize)]
struct ToolResult {
    #[serde(rename = "isError", default)]
    is_error: bool,
    /// Any JSON: a malformed one must not cost the `isError` beside it.
    #[serde(rename = "resultType")]
    result_type: Option<serde_json::Value>,
}

/// Where `part` (a slice borrowed from `body`) lies in `body`.
fn range_in(body: &[u8], part: &str) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= body.len()).then_some(start..end)
}

/// Whether a request's `id` is a string or an integer, as MCP's `RequestId` is. Readers
/// that type the id (the Python SDK) take a request with any other id (`1.5`, `true`, `{}`) for
/// a notification and never answer it, while the relay would wait for the answer: such a
/// request is refused up front (found by fuzz/ `differential.py`).
fn is_request_id(id: &RawValue) -> bool {
    let text = id.get();
    let digits = text.strip_prefix('-').unwrap_or(text);
    text.starts_with('"') || (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Serde's derived structs also read a JSON array, field by field in order; a message, its
/// `params` and its `error` must be objects, or the relay would read fields (a tool name) that no
/// other JSON-RPC reader sees (found by fuzz/ `mcp_differential`).
fn require_object(raw: &RawValue, what: &str) -> Result<(), ClassifyError> {
    if raw.get().starts_with('{') {
        Ok(())
    } else {
        Err(ClassifyError::Invalid(format!("{what} must be an object")))
    }
}

/// A batch item's facts.
fn info(body: &[u8], raw: &RawValue) -> Result<MessageInfo, ClassifyError> {
    require_object(raw, "a batch item")?;
    let wire: Wire<'_> =
        serde_json::from_str(raw.get()).map_err(|e| ClassifyError::Invalid(e.to_string()))?;
    facts(body, wire, raw.get().len())
}

/// Not JSON (-32700) for a syntax error, not JSON-RPC (-32600) for JSON of the wrong shape.
fn parse_error(e: serde_json::Error) -> ClassifyError {
    match e.classify() {
        serde_json::error::Category::Data => ClassifyError::Invalid(e.to_string()),
        _ => ClassifyError::Parse(e.to_string()),
    }
}

/// The facts of one parsed message `wire`, `size` bytes long, borrowed from `body`.
fn facts(body: &[u8], wire: Wire<'_>, size: usize) -> Result<MessageInfo, ClassifyError> {
    if wire.jsonrpc != Some("2.0") {
        return Err(ClassifyError::Invalid("\"jsonrpc\" must be \"2.0\"".into()));
    }
    let null_id = wire.id.is_some_and(|id| id.get() == "null");
    let id = wire.id.filter(|_| !null_id).map(|id| id.to_owned());
    let (kind, method) = match (wire.method, wire.result.is_some() || wire.error.is_some()) {
        (Some(method), false) => (
            match &id {
                Some(id) if !is_request_id(id) => {
                    return Err(ClassifyError::Invalid(
                        "a request id must be a string or an integer".into(),
                    ));
                }
                Some(_) => MessageKind::Request,
                // `"id": null` is no notification: a request with a forbidden id.
                None if null_id => MessageKind::Request,
                None => MessageKind::Notification,
            },
            Some(method.into_owned()),
        ),
        (None, true) => (MessageKind::Response, None),
        (Some(_), true) => {
            return Err(ClassifyError::Invalid(
                "a message cannot have both method and result/error".into(),
            ));
        }
        (None, false) => {
            return Err(ClassifyError::Invalid(
                "a message needs method, result or error".into(),
            ));
        }
    };
    let target = match (&method, kind) {
        (Some(method), MessageKind::Request | MessageKind::Notification) => {
            target_of(method, wire.params)?
        }
        _ => None,
    };
    let (is_tool_error, is_input_required) = match wire.result {
        Some(result)
            if result.get().contains("\"isError\"") || result.get().contains("input_required") =>
        {
            serde_json::from_str::<ToolResult>(result.get()).map_or((false, false), |r| {
                (
                    r.is_error,
                    r.result_type.as_ref().and_then(|t| t.as_str()) == Some("input_required"),
                )
            })
        }
        _ => (false, false),
    };
    let error_code = match wire.error {
        Some(error) => {
            require_object(error, "error")?;
            let error: WireError = serde_json::from_str(error.get())
                .map_err(|e| ClassifyError::Invalid(format!("error: {e}")))?;
            Some(error.code)
        }
        None => None,
    };
    let payload = wire
        .params
        .or(wire.result)
        .and_then(|raw| range_in(body, raw.get()));
    Ok(MessageInfo {
        kind,
        id,
        method,
        target,
        is_tool_error,
        is_input_required,
        error_code,
        payload,
        size,
        null_id,
    })
}

/// Classifies a body: one JSON-RPC message or a batch.
pub fn classify(body: &[u8]) -> Result<Classified, ClassifyError> {
    classify_capped(body, usize::MAX)
}

/// Classifies a body as [`classify`] does, refusing a batch of more than `max_batch` messages
/// before reading any of them (an agent's batch is bounded in messages, not only in bytes: each
/// costs governance work).
pub fn classify_capped(body: &[u8], max_batch: usize) -> Result<Classified, ClassifyError> {
    // One pass over a single message (the common case): its fields straight from the body.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {
            let wire: Wire<'_> = serde_json::from_slice(body).map_err(parse_error)?;
            facts(body, wire, body.trim_ascii().len()).map(Classified::Single)
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_slice(body).map_err(parse_error)?;
            if items.is_empty() {
                return Err(ClassifyError::Invalid("empty batch".into()));
            }
            if items.len() > max_batch {
                return Err(ClassifyError::Invalid(format!(
                    "a batch of {} messages exceeds the limit of {max_batch}",
                    items.len()
                )));
            }
            items
                .into_iter()
                .map(|item| info(body, item))
                .collect::<Result<_, _>>()
                .map(Classified::Batch)
        }
        _ => {
            serde_json::from_slice::<IgnoredAny>(body)
                .map_err(|e| ClassifyError::Parse(e.to_string()))?;
            Err(ClassifyError::Invalid(
                "a message must be a JSON object or array".into(),
            ))
        }
    }
}

/// A JSON-RPC error response body for `id` (or `null`).
pub fn error_body(id: Option<&RawValue>, code: i64, message: &str) -> Bytes {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        jsonrpc: &'static str,
        id: Option<&'a RawValue>,
        error: ErrorObject<'a>,
    }
    #[derive(serde::Serialize)]
    struct ErrorObject<'a> {
        code: i64,
        message: &'a str,
    }
    let body = Body {
        jsonrpc: "2.0",
        id,
        error: ErrorObject { code, message },
    };
    Bytes::from(serde_json::to_vec(&body).expect("error bodies are plain strings and numbers"))
}

/// A `notifications/cancelled` for request `id`, with a reason.
pub fn cancelled_notification(id: &RawValue, reason: &str) -> Bytes {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": { "requestId": id, "reason": reason },
    });
    Bytes::from(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(text: &str) -> MessageInfo {
        match classify(text.as_bytes()).expect("valid") {
            Classified::Single(info) => info,
            Classified::Batch(_) => panic!("expected a single message"),
        }
    }

    #[test]
    fn classifies_kinds_and_targets() {
        let call = single(
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hi"}}}"#,
        );
        assert_eq!(call.kind, MessageKind::Request);
        assert_eq!(call.id.as_deref().map(RawValue::get), Some("7"));
        assert_eq!(call.target.as_deref(), Some("echo"));
        let read = single(
            r#"{"jsonrpc":"2.0","id":"a","method":"resources/read","params":{"uri":"file:///x"}}"#,
        );
        assert_eq!(read.target.as_deref(), Some("file:///x"));
        let note = single(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert_eq!(note.kind, MessageKind::Notification);
        let response = single(r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}}"#);
        assert_eq!(response.kind, MessageKind::Response);
        assert!(response.is_tool_error);
        let error = single(r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"no"}}"#);
        assert_eq!(error.error_code, Some(-32601));
    }

    #[test]
    fn governed_methods_are_judged_on_the_field_their_upstream_reads() {
        let read = |params: &str| {
            classify(
                format!(
                    r#"{{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{params}}}"#
                )
                .as_bytes(),
            )
        };
        let target =
            |c: Result<Classified, ClassifyError>| c.expect("valid").messages()[0].target.clone();
        assert_eq!(
            target(read(r#"{"uri":"file:///etc/secret"}"#)).as_deref(),
            Some("file:///etc/secret")
        );
        // The decoy of the review: a resource named two ways is ambiguous, refused.
        for params in [
            r#"{"uri":"file:///etc/secret","name":"file:///public/decoy"}"#,
            r#"{"name":"file:///public/decoy","uri":"file:///etc/secret"}"#,
            r#"{"name":"file:///public/decoy"}"#,
            r#"{"uri":"file:///public/a","uri":"file:///etc/secret"}"#,
            r#"{"uri":7}"#,
            r#"["file:///public/a","file:///etc/secret"]"#,
            r#""file:///public/a""#,
        ] {
            assert!(
                matches!(read(params), Err(ClassifyError::Invalid(_))),
                "{params}"
            );
        }
        let call = |params: &str| {
            classify(
                format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{params}}}"#)
                    .as_bytes(),
            )
        };
        assert_eq!(
            target(call(
                r#"{"n\u0061me":"echo","arguments":{"uri":"x","name":"y"}}"#
            ))
            .as_deref(),
            Some("echo"),
            "an escaped key is the key it spells; arguments are the tool's own"
        );
        for params in [
            r#"{"name":"echo","uri":"file:///x"}"#,
            r#"{"name":"echo","name":"add"}"#,
            r#"{"arguments":{}}"#,
        ] {
            assert!(
                matches!(call(params), Err(ClassifyError::Invalid(_))),
                "{params}"
            );
        }
        assert!(matches!(
            classify(br#"{"jsonrpc":"2.0","id":1,"method":"prompts/get"}"#),
            Err(ClassifyError::Invalid(_))
        ));
        assert!(
            classify(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"name":1}}"#)
                .is_ok(),
            "ungoverned methods are not read"
        );
    }

    #[test]
    fn a_null_id_is_a_request_never_a_notification() {
        let null =
            single(r#"{"jsonrpc":"2.0","id":null,"method":"tools/call","params":{"name":"x"}}"#);
        assert_eq!(null.kind, MessageKind::Request);
        assert!(null.null_id && null.id.is_none());
        let note = single(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert!(!note.null_id);
        let error = single(r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}"#);
        assert_eq!(
            error.kind,
            MessageKind::Response,
            "an error about an unreadable request"
        );
    }

    #[test]
    fn batches_and_errors() {
        let batch = classify(
            br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"x"}]"#,
        )
        .expect("batch");
        assert!(batch.has_requests());
        assert_eq!(batch.messages().len(), 2);
        assert!(matches!(
            classify(b"{not json"),
            Err(ClassifyError::Parse(_))
        ));
        assert!(matches!(classify(b"[]"), Err(ClassifyError::Invalid(_))));
        let two = br#"[{"jsonrpc":"2.0","method":"x"},{"jsonrpc":"2.0","method":"y"}]"#;
        assert!(classify_capped(two, 2).is_ok());
        assert!(matches!(
            classify_capped(two, 1),
            Err(ClassifyError::Invalid(m)) if m.contains("limit of 1")
        ));
        assert!(matches!(
            classify(br#"{"id":1,"method":"x"}"#),
            Err(ClassifyError::Invalid(_))
        ));
        assert!(matches!(classify(b"42"), Err(ClassifyError::Invalid(_))));
        // Not JSON, however far in: a parse error, never an invalid request.
        for body in [
            &br#"{"jsonrpc":"2.0","id":1,"method":"x""#[..],
            br#"{"jsonrpc":"2.0","id":1,"method":"x"} tail"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":[1,}}"#,
            br#"[{"jsonrpc":"2.0","id":1,"method":"x"},"#,
            b"42 43",
            b"",
        ] {
            assert!(
                matches!(classify(body), Err(ClassifyError::Parse(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Whitespace around a message is not part of its size.
        let single = classify(b" \n{\"jsonrpc\":\"2.0\",\"method\":\"x\"}\r\n").expect("single");
        assert_eq!(single.messages()[0].size, 30);
    }

    #[test]
    fn payload_ranges_point_into_the_body() {
        let body = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"e","arguments":{}}},{"jsonrpc":"2.0","id":2,"result":{"ok":true}},{"jsonrpc":"2.0","method":"x"}]"#;
        let batch = classify(body).expect("batch");
        let [call, response, note] = batch.messages() else {
            panic!("three messages")
        };
        assert_eq!(
            call.payload(body),
            Some(&br#"{"name":"e","arguments":{}}"#[..])
        );
        assert_eq!(response.payload(body), Some(&br#"{"ok":true}"#[..]));
        assert_eq!(note.payload(body), None);
        let single = br#"{"jsonrpc":"2.0","id":"a","method":"ping","params":[1, 2]}"#;
        let info = classify(single).expect("single");
        assert_eq!(info.messages()[0].payload(single), Some(&b"[1, 2]"[..]));
    }

    #[test]
    fn error_body_is_valid_json_rpc() {
        let id = RawValue::from_string("\"x\"".into()).expect("raw id");
        let body = error_body(Some(&id), codes::TIMEOUT, "slow \"source\"");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(value["id"], "x");
        assert_eq!(value["error"]["code"], codes::TIMEOUT);
        assert_eq!(value["error"]["message"], "slow \"source\"");
        let null: serde_json::Value =
            serde_json::from_slice(&error_body(None, -1, "m")).expect("json");
        assert!(null["id"].is_null());
    }

    /// Serde reads structs from arrays too; the relay read `params: ["secret", null]` as a call
    /// of tool `secret`, `error: [5, "x"]` as error 5 and an array batch item as a message,
    /// where every other JSON-RPC reader (serde_json::Value, the Python SDK) sees no such fields.
    #[test]
    fn array_shaped_messages_params_and_errors_are_invalid() {
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["secret",null]}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":[null,"file:///x"]}"#,
            r#"{"jsonrpc":"2.0","id":1,"error":[5,"x"]}"#,
            r#"[["2.0",1,"tools/call",{"name":"secret"},null,null]]"#,
        ] {
            let e = classify(body.as_bytes()).expect_err(body);
            assert_eq!(e.code(), codes::INVALID_REQUEST, "{body}: {e}");
        }
        // Other methods' params stay opaque, as before.
        single(r#"{"jsonrpc":"2.0","id":"a","method":"ping","params":[1, 2]}"#);
    }

    /// A request whose id is neither a string nor an integer is refused: the Python SDK reads it
    /// as a notification (no answer ever comes), the relay read it as a request.
    #[test]
    fn request_ids_are_strings_or_integers() {
        for id in ["1.5", "1e400", "2.0", "true", "{}", "[1]", "-0.0"] {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"x"}}}}"#
            );
            let e = classify(body.as_bytes()).expect_err(&body);
            assert_eq!(e.code(), codes::INVALID_REQUEST, "{body}: {e}");
        }
        for id in ["0", "-7", "18446744073709551616", r#""a-1""#, r#""""#] {
            let body = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"ping"}}"#);
            assert_eq!(single(&body).kind, MessageKind::Request, "{body}");
        }
        // Responses keep any id: they are matched by its text.
        assert_eq!(
            single(r#"{"jsonrpc":"2.0","id":-12.5e3,"result":{}}"#).kind,
            MessageKind::Response
        );
    }
}
