//! The agent endpoint `/mcp/{source}`: Streamable HTTP, session era and 2026-07-28.
//!
//! The relay owns everything HTTP here: its own session ids, JSON or SSE answers, keep-alive
//! comments. What reaches the tunnel is messages only.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::RelayState;
use super::channel::{Channel, ChannelError, Event, Exchange};
use super::reply::{AgentError, json_response};
use super::sessions::Session;
use crate::govern::Identity;
use crate::mcp::era::{METHOD_HEADER, NAME_HEADER, SESSION_HEADER, VERSION_HEADER};
use crate::mcp::jsonrpc::{
    Classified, MessageInfo, MessageKind, cancelled_notification, codes, error_body,
};
use crate::mcp::{ProtocolEra, classify, sse};
use crate::wire::{Era, OpenHeader};

/// Interval of SSE keep-alive comments: inside the 15-30 s that proxies and clients tolerate.
pub const SSE_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// SSE chunks buffered toward a slow agent before the tunnel side waits.
const SSE_QUEUE: usize = 16;

/// Routes of the agent endpoint.
pub fn routes() -> Router<Arc<RelayState>> {
    Router::new().route(
        "/mcp/{source}",
        post(handle_post).get(handle_get).delete(handle_delete),
    )
}

fn check_origin(state: &RelayState, headers: &HeaderMap) -> Result<(), AgentError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().map_err(|_| AgentError::ForbiddenOrigin)?;
    if state
        .allowed_origins
        .iter()
        .any(|allowed| allowed == origin)
    {
        return Ok(());
    }
    // Same-origin browser calls: the Origin's authority equals the Host we were reached at.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let authority = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    if !host.is_empty() && authority.eq_ignore_ascii_case(host) {
        return Ok(());
    }
    Err(AgentError::ForbiddenOrigin)
}

/// The caller behind the request's bearer API key.
fn authenticate(state: &RelayState, headers: &HeaderMap) -> Result<Identity, AgentError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or(AgentError::Unauthorized)?;
    let (scheme, key) = value.split_once(' ').ok_or(AgentError::Unauthorized)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AgentError::Unauthorized);
    }
    let who = state
        .governance()
        .keyring
        .agent(key.trim())
        .cloned()
        .ok_or(AgentError::Unauthorized)?;
    Ok(who)
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, AgentError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(AgentError::TooLarge { limit }),
        Err(e) => Err(AgentError::BadRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

async fn handle_post(
    State(state): State<Arc<RelayState>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match post_inner(state, source, headers, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn post_inner(
    state: Arc<RelayState>,
    source: String,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, AgentError> {
    check_origin(&state, &headers)?;
    let who = authenticate(&state, &headers)?;
    let body = read_body(body, state.limits.max_message_bytes).await?;
    let classified = classify(&body).map_err(|e| match e {
        crate::mcp::jsonrpc::ClassifyError::Parse(m) => AgentError::Parse(m),
        crate::mcp::jsonrpc::ClassifyError::Invalid(m) => AgentError::BadRequest(m),
    })?;
    if let Some(denied) = authorize(&state, &who, &source, &classified) {
        return Ok(denied);
    }

    if let Some(session_id) = header_str(&headers, SESSION_HEADER) {
        let session = state
            .sessions
            .get(session_id, &who, &source)
            .ok_or(AgentError::SessionNotFound)?;
        return Ok(forward(
            &state,
            &session.channel,
            &source,
            body,
            &classified,
            ProtocolEra::Session,
        )
        .await);
    }
    let version = header_str(&headers, VERSION_HEADER);
    if version.is_some_and(|v| ProtocolEra::of_version(v) == ProtocolEra::Stateless) {
        return stateless(&state, &who, &source, &headers, body, &classified).await;
    }
    match &classified {
        Classified::Single(info) if info.method.as_deref() == Some("initialize") => {
            initialize(&state, &who, &source, body, info).await
        }
        _ => Err(AgentError::BadRequest(
            "Bad Request: Mcp-Session-Id header is required (send initialize first)".into(),
        )),
    }
}

/// Checks every `tools/call` in the body against the caller's roles; a denied call reads like
/// an unknown tool, so nobody learns what exists beyond what they may use.
fn authorize(
    state: &RelayState,
    who: &Identity,
    source: &str,
    classified: &Classified,
) -> Option<Response> {
    let governance = state.governance();
    for message in classified.messages() {
        if message.method.as_deref() != Some("tools/call") {
            continue;
        }
        let tool = message.target.as_deref().unwrap_or_default();
        let decision = governance.policy.check_tool(who, source, tool);
        if !decision.is_allowed() {
            tracing::info!(tenant = %who.tenant, subject = %who.subject, source, tool, ?decision, "call denied");
            metrics::counter!(crate::metrics::REQUESTS, "outcome" => "denied").increment(1);
            let body = error_body(
                message.id.as_deref(),
                codes::INVALID_PARAMS,
                &format!("Unknown tool: {tool}"),
            );
            return Some(json_response(StatusCode::OK, body));
        }
    }
    None
}

fn open_header(
    who: &Identity,
    source: &str,
    era: Era,
    context: String,
    protocol_version: Option<String>,
    headers: &HeaderMap,
) -> OpenHeader {
    let mcp_headers = if era == Era::Stateless {
        headers
            .iter()
            .filter(|(name, _)| {
                let name = name.as_str();
                name == METHOD_HEADER || name == NAME_HEADER || name.starts_with("mcp-param-")
            })
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect()
    } else {
        Vec::new()
    };
    OpenHeader {
        tenant: who.tenant.to_string(),
        source: source.to_owned(),
        subject: who.subject.to_string(),
        era,
        protocol_version,
        context,
        mcp_headers,
        traceparent: header_str(headers, "traceparent").map(str::to_owned),
    }
}

async fn open_channel(
    state: &RelayState,
    who: &Identity,
    header: &OpenHeader,
) -> Result<Arc<Channel>, Response> {
    let tunnel = state
        .registry
        .route(&who.tenant, &header.source)
        .ok_or_else(|| AgentError::NotFound.into_response())?;
    Channel::open(&tunnel, header, state.limits.max_message_bytes)
        .await
        .map_err(|e| source_error(None, &header.source, &e.to_string()))
}

/// A JSON-RPC error (on HTTP 200) saying the source could not answer.
fn source_error(id: Option<&RawValue>, source: &str, why: &str) -> Response {
    metrics::counter!(crate::metrics::REQUESTS, "outcome" => "tunnel_error").increment(1);
    json_response(
        StatusCode::OK,
        error_body(
            id,
            codes::SOURCE_UNAVAILABLE,
            &format!("source {source} is unavailable: {why}"),
        ),
    )
}

async fn initialize(
    state: &Arc<RelayState>,
    who: &Identity,
    source: &str,
    body: Bytes,
    info: &MessageInfo,
) -> Result<Response, AgentError> {
    // The session id is minted before the stream opens, so both sides log the same id.
    let session_id = super::sessions::new_session_id();
    let header = open_header(
        who,
        source,
        Era::Session,
        session_id.clone(),
        None,
        &HeaderMap::new(),
    );
    let channel = match open_channel(state, who, &header).await {
        Ok(channel) => channel,
        Err(response) => return Ok(response),
    };
    let session = Arc::new(Session::new(session_id, who, source, channel.clone()));
    let exchange = match channel.request(body).await {
        Ok(exchange) => exchange,
        Err(e) => return Ok(source_error(info.id.as_deref(), source, &e.to_string())),
    };
    let awaiting = Awaiting {
        source,
        id: info.id.as_deref(),
        responses: 1,
        timeout: Some(state.limits.request_timeout()),
    };
    let mut response = answer(state, channel, exchange, awaiting).await;
    if response.status() == StatusCode::OK && !response_is_error(&response) {
        state.sessions.insert(session.clone());
        tracing::info!(tenant = %who.tenant, subject = %who.subject, source, session = %session.id, "session opened");
        let value = HeaderValue::from_str(&session.id).expect("session ids are hex");
        response.headers_mut().insert(SESSION_HEADER, value);
    }
    Ok(response)
}

fn response_is_error(response: &Response) -> bool {
    response.extensions().get::<UpstreamError>().is_some()
}

/// Marks a JSON answer that carries a JSON-RPC error (so `initialize` creates no session).
#[derive(Clone, Copy)]
struct UpstreamError;

async fn stateless(
    state: &Arc<RelayState>,
    who: &Identity,
    source: &str,
    headers: &HeaderMap,
    body: Bytes,
    classified: &Classified,
) -> Result<Response, AgentError> {
    let Classified::Single(info) = classified else {
        return Err(AgentError::BadRequest(
            "batches are not allowed in protocol version 2026-07-28".into(),
        ));
    };
    check_stateless_headers(headers, info)?;
    let version = header_str(headers, VERSION_HEADER).map(str::to_owned);
    let context = format!("req-{}", &super::sessions::new_session_id()[..16]);
    let header = open_header(who, source, Era::Stateless, context, version, headers);
    let channel = match open_channel(state, who, &header).await {
        Ok(channel) => channel,
        Err(response) => return Ok(response),
    };
    Ok(forward(
        state,
        &channel,
        source,
        body,
        classified,
        ProtocolEra::Stateless,
    )
    .await)
}

/// 2026-07-28: `Mcp-Method` must repeat the body's method, and `Mcp-Name` its tool, prompt or
/// resource name (plain, or in the `=?base64?...?=` form for values that are not plain ASCII).
fn check_stateless_headers(headers: &HeaderMap, info: &MessageInfo) -> Result<(), AgentError> {
    let mismatch = |message: String| AgentError::HeaderMismatch {
        id: info.id.clone(),
        message,
    };
    let Some(method) = info.method.as_deref() else {
        return Err(AgentError::BadRequest(
            "2026-07-28 accepts only requests and notifications".into(),
        ));
    };
    // A repeated routing header is ambiguous: which copy would the server check?
    for name in [VERSION_HEADER, METHOD_HEADER, NAME_HEADER] {
        if headers.get_all(name).iter().nth(1).is_some() {
            return Err(mismatch(format!("{name} header appears more than once")));
        }
    }
    match header_str(headers, METHOD_HEADER) {
        Some(value) if value == method => {}
        Some(_) => {
            return Err(mismatch(format!(
                "Mcp-Method header does not match the request body's method {method:?}"
            )));
        }
        None => return Err(mismatch("Mcp-Method header is required".into())),
    }
    if let Some(target) = info
        .target
        .as_deref()
        .filter(|_| matches!(method, "tools/call" | "prompts/get" | "resources/read"))
    {
        let value = header_str(headers, NAME_HEADER)
            .ok_or_else(|| mismatch("Mcp-Name header is required".into()))?;
        if decode_header_value(value).as_deref() != Some(target) {
            return Err(mismatch(format!(
                "Mcp-Name header does not match the request body's name {target:?}"
            )));
        }
    }
    Ok(())
}

/// Decodes the `=?base64?<b64>?=` header form; plain values pass through.
fn decode_header_value(value: &str) -> Option<String> {
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

/// What an agent request waits for on its exchange.
struct Awaiting<'a> {
    /// The source, for error messages.
    source: &'a str,
    /// The first request id (for relay-made errors).
    id: Option<&'a RawValue>,
    /// Responses that complete the answer: one per request in the body.
    responses: usize,
    /// Whether the request timeout applies (not to a `subscriptions/listen` stream).
    timeout: Option<Duration>,
}

/// Sends the body down `channel` and answers the agent.
async fn forward(
    state: &Arc<RelayState>,
    channel: &Arc<Channel>,
    source: &str,
    body: Bytes,
    classified: &Classified,
    era: ProtocolEra,
) -> Response {
    let requests: Vec<&MessageInfo> = classified
        .messages()
        .iter()
        .filter(|m| m.kind == MessageKind::Request)
        .collect();
    let Some(first) = requests.first() else {
        return match channel.send(body).await {
            Ok(()) => StatusCode::ACCEPTED.into_response(),
            Err(e) => source_error(None, source, &e.to_string()),
        };
    };
    // A listen stream lasts as long as the agent wants it; no request timeout applies.
    let is_listen = era == ProtocolEra::Stateless
        && requests
            .iter()
            .any(|m| m.method.as_deref() == Some("subscriptions/listen"));
    let awaiting = Awaiting {
        source,
        id: first.id.as_deref(),
        responses: requests.len(),
        timeout: (!is_listen).then(|| state.limits.request_timeout()),
    };
    match channel.request(body).await {
        Ok(exchange) => answer(state, channel.clone(), exchange, awaiting).await,
        Err(e) => source_error(awaiting.id, source, &e.to_string()),
    }
}

/// Waits for the next event, within the request timeout if one applies.
async fn next_event(
    exchange: &mut Exchange,
    timeout: Option<Duration>,
) -> Option<Result<Event, ChannelError>> {
    match timeout {
        Some(limit) => tokio::time::timeout(limit, exchange.next()).await.ok(),
        None => Some(exchange.next().await),
    }
}

/// How many responses a message carries (a batch may carry several).
fn responses_in(message: &[u8]) -> (usize, bool) {
    match classify(message) {
        Ok(classified) => {
            let responses = classified
                .messages()
                .iter()
                .filter(|m| m.kind == MessageKind::Response);
            let (count, errors) =
                responses.fold((0, false), |(n, e), m| (n + 1, e || m.error_code.is_some()));
            (count, errors)
        }
        Err(_) => (0, false),
    }
}

/// Answers the agent with what arrives on `exchange`: plain JSON when the first message holds
/// every response, else an SSE stream that ends once every response has been sent.
async fn answer(
    state: &Arc<RelayState>,
    channel: Arc<Channel>,
    mut exchange: Exchange,
    awaiting: Awaiting<'_>,
) -> Response {
    let mut status = StatusCode::OK;
    loop {
        let Some(event) = next_event(&mut exchange, awaiting.timeout).await else {
            return timed_out(&channel, &awaiting).await;
        };
        match event {
            Ok(Event::Rejected(code)) => {
                status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            Ok(Event::Message(message)) => {
                let (responses, is_error) = responses_in(&message);
                if responses >= awaiting.responses {
                    metrics::counter!(crate::metrics::REQUESTS, "outcome" => "ok").increment(1);
                    let mut response = json_response(status, message);
                    if is_error {
                        response.extensions_mut().insert(UpstreamError);
                    }
                    return response;
                }
                let remaining = awaiting.responses - responses;
                return sse_answer(
                    state,
                    channel,
                    exchange,
                    message,
                    remaining,
                    awaiting.timeout,
                );
            }
            Ok(Event::End) => {
                return source_error(
                    awaiting.id,
                    awaiting.source,
                    "the upstream ended its response without answering",
                );
            }
            Err(e) => return source_error(awaiting.id, awaiting.source, &e.to_string()),
        }
    }
}

async fn timed_out(channel: &Channel, awaiting: &Awaiting<'_>) -> Response {
    if let Some(id) = awaiting.id {
        // Tell the upstream to stop working on it.
        let _ = channel
            .send(cancelled_notification(
                id,
                "the relay's request timeout expired",
            ))
            .await;
    }
    metrics::counter!(crate::metrics::REQUESTS, "outcome" => "timeout").increment(1);
    let limit = awaiting.timeout.unwrap_or_default().as_secs();
    let message = format!("source {} did not answer within {limit} s", awaiting.source);
    json_response(
        StatusCode::OK,
        error_body(awaiting.id, codes::TIMEOUT, &message),
    )
}

fn sse_headers(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// Streams the exchange as SSE: `first`, then every message until `remaining` more responses
/// have been sent (or the upstream ends its answer, or the relay shuts down).
fn sse_answer(
    state: &Arc<RelayState>,
    channel: Arc<Channel>,
    mut exchange: Exchange,
    first: Bytes,
    mut remaining: usize,
    idle_timeout: Option<Duration>,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(SSE_QUEUE);
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        // The channel lives as long as the answer streams (a stateless request owns its stream).
        let _channel = channel;
        if tx.send(Ok(sse::message_event(&first))).await.is_err() {
            return;
        }
        let mut keep_alive =
            tokio::time::interval_at(tokio::time::Instant::now() + SSE_KEEP_ALIVE, SSE_KEEP_ALIVE);
        while remaining > 0 {
            tokio::select! {
                event = next_event(&mut exchange, idle_timeout) => match event {
                    Some(Ok(Event::Message(message))) => {
                        remaining = remaining.saturating_sub(responses_in(&message).0);
                        if tx.send(Ok(sse::message_event(&message))).await.is_err() {
                            return; // the agent went away; late messages go to its GET stream
                        }
                    }
                    Some(Ok(Event::Rejected(_))) => {}
                    Some(Ok(Event::End)) => return,
                    Some(Err(e)) => return tracing::debug!(error = %e, "SSE answer ended by the tunnel"),
                    None => return tracing::debug!("SSE answer idle past the request timeout"),
                },
                _ = keep_alive.tick() => {
                    if tx.send(Ok(sse::KEEP_ALIVE)).await.is_err() {
                        return;
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        }
    });
    let mut response = Response::new(Body::from_stream(ReceiverStream::new(rx)));
    sse_headers(&mut response);
    response
}

async fn handle_get(
    State(state): State<Arc<RelayState>>,
    Path(source): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        check_origin(&state, &headers)?;
        let who = authenticate(&state, &headers)?;
        let Some(session_id) = header_str(&headers, SESSION_HEADER) else {
            return Err(AgentError::MethodNotAllowed);
        };
        let session = state.sessions.get(session_id, &who, &source).ok_or(AgentError::SessionNotFound)?;
        let mut queue = session.channel.unsolicited().ok_or(AgentError::StreamConflict)?;
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::convert::Infallible>>(SSE_QUEUE);
        let channel = session.channel.clone();
        let shutdown = state.shutdown.clone();
        tokio::spawn(async move {
            let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + SSE_KEEP_ALIVE, SSE_KEEP_ALIVE);
            loop {
                tokio::select! {
                    message = queue.recv() => match message {
                        Some(message) => if tx.send(Ok(sse::message_event(&message))).await.is_err() { return },
                        None => return,
                    },
                    _ = keep_alive.tick() => if tx.send(Ok(sse::KEEP_ALIVE)).await.is_err() { return },
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                }
                if channel.closed_reason().is_some() && queue.is_empty() {
                    return;
                }
            }
        });
        let mut response = Response::new(Body::from_stream(ReceiverStream::new(rx)));
        sse_headers(&mut response);
        Ok(response)
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn handle_delete(
    State(state): State<Arc<RelayState>>,
    Path(source): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = async {
        check_origin(&state, &headers)?;
        let who = authenticate(&state, &headers)?;
        let Some(session_id) = header_str(&headers, SESSION_HEADER) else {
            return Err(AgentError::MethodNotAllowed);
        };
        let session = state.sessions.get(session_id, &who, &source).ok_or(AgentError::SessionNotFound)?;
        state.sessions.remove(&session.id);
        session.channel.close("session deleted by the agent").await;
        tracing::info!(tenant = %session.tenant, subject = %session.subject, source, session = %session.id, "session deleted");
        Ok(StatusCode::OK.into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}
