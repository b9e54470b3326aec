//! The gate every agent request passes, whatever its transport: origin and host checks,
//! authentication, body limits, classification, authorization; and opening a tunnel stream to
//! the source.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;

use super::oauth::{self, Resource};
use super::reply::{AgentError, Challenge, source_error};
use crate::govern::Identity;
use crate::govern::assertion::Refresher;
use crate::govern::audit::Outcome;
use crate::govern::condition::Call;
use crate::govern::jwt::{JwtError, looks_like_jwt};
use crate::govern::policy::{Decision, Kind};
use crate::mcp::jsonrpc::{
    Classified, ClassifyError, MessageInfo, MessageKind, classify_capped, codes, error_body,
};
use crate::mcp::tasks::{Splice, UnknownTask, apply_splices};
use crate::relay::calls::InFlight;
use crate::relay::calls::filter::{ListFilter, is_list_method};
use crate::relay::governance::Governance;
use crate::relay::session::Session;
use crate::relay::session::tasks::TaskBinding;
use crate::relay::state::RelayState;
use crate::relay::tunnel::{Budget, Channel, ChannelLimits};
use crate::wire::{Era, OpenHeader, SessionHandle};

/// A header's value as text, if present and text.
pub(super) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Refuses browser origins that are neither allowed nor same-origin, and `Host` values a
/// loopback relay does not answer to (DNS rebinding: a page on evil.example resolving its name
/// to 127.0.0.1 must not reach local sources).
pub(super) fn check_origin_and_host(
    state: &RelayState,
    headers: &HeaderMap,
) -> Result<(), AgentError> {
    let host = header_str(headers, header::HOST.as_str()).unwrap_or_default();
    if !state.host_allowed(host) {
        return Err(AgentError::ForbiddenHost);
    }
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
    let authority = origin
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    if !host.is_empty() && authority.eq_ignore_ascii_case(host) {
        return Ok(());
    }
    Err(AgentError::ForbiddenOrigin)
}

/// The bearer credential of a request if it has the shape of a JWT and JWTs are accepted.
pub(super) fn bearer_jwt(headers: &HeaderMap) -> Option<&str> {
    let value = header_str(headers, header::AUTHORIZATION.as_str())?;
    let (scheme, credential) = value.split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && looks_like_jwt(credential)).then_some(credential)
}

/// The caller behind the request's bearer credential: an API key first, then a JWT of a
/// configured identity provider. A refusal names `resource`'s protected resource metadata
/// (RFC 9728) when the relay has a public URL.
pub(super) fn authenticate(
    state: &RelayState,
    headers: &HeaderMap,
    resource: Resource<'_>,
) -> Result<Identity, AgentError> {
    let governance = state.governance();
    let jwt = governance.keyring.jwt();
    let challenge = |scope: Option<String>| Challenge {
        resource_metadata: jwt
            .public_url()
            .map(|url| oauth::metadata_url(url, &resource.metadata_path())),
        scope,
    };
    let required = || {
        let scopes = jwt.scopes();
        (!scopes.is_empty()).then(|| scopes.join(" "))
    };
    let unauthorized = |reason: Option<String>| AgentError::Unauthorized {
        challenge: challenge(required()),
        reason,
    };
    let value =
        header_str(headers, header::AUTHORIZATION.as_str()).ok_or_else(|| unauthorized(None))?;
    let (scheme, credential) = value.split_once(' ').ok_or_else(|| unauthorized(None))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized(None));
    }
    let credential = credential.trim();
    if let Some(identity) = governance.keyring.agent(credential) {
        return Ok(identity.clone());
    }
    if !jwt.is_enabled() || !looks_like_jwt(credential) {
        return Err(unauthorized(None));
    }
    jwt.verify(credential).map_err(|e| {
        // Debug formatting: the path comes from an unauthenticated request, and a decoded
        // newline in it must not start a line of its own in the log.
        tracing::info!(error = %e, resource = ?resource.path(), "agent token refused");
        match e {
            JwtError::MissingScope { required } => AgentError::InsufficientScope {
                challenge: challenge(Some(required.join(" "))),
            },
            other => unauthorized(Some(other.to_string())),
        }
    })
}

/// Checks origin, host, credentials and the caller's and source's rate limits: the start of
/// every agent request for `resource`.
pub(super) fn gate(
    state: &RelayState,
    headers: &HeaderMap,
    resource: Resource<'_>,
) -> Result<Identity, AgentError> {
    check_origin_and_host(state, headers)?;
    let who = authenticate(state, headers, resource)?;
    let source = match resource {
        Resource::Mcp(source) | Resource::Sse(source) => source,
    };
    state
        .governance()
        .limiter
        .request(&who.tenant, &who.subject, source, std::time::Instant::now())
        .map_err(|limited| {
            tracing::info!(tenant = %who.tenant, subject = %who.subject, source, ?limited, "rate limited");
            metrics::counter!(crate::metrics::REQUESTS, "outcome" => "rate_limited").increment(1);
            AgentError::RateLimited(limited)
        })?;
    Ok(who)
}

/// Reads an agent's body of at most the message limit (413 beyond) and classifies it (400 if
/// not JSON-RPC, or a batch of more than `[limits] max_batch_messages`), then counts its
/// messages past the first against the caller's rate limits ([`gate`] counted the first): a
/// batch of N messages costs what N single messages cost.
pub(super) async fn read_message(
    state: &RelayState,
    who: &Identity,
    source: &str,
    body: Body,
) -> Result<(Bytes, Classified), AgentError> {
    let limit = state.max_message_bytes();
    let body = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(AgentError::TooLarge { limit });
        }
        Err(e) => {
            return Err(AgentError::BadRequest(format!(
                "could not read the request body: {e}"
            )));
        }
    };
    let classified = classify_capped(&body, state.max_batch_messages()).map_err(|e| match e {
        ClassifyError::Parse(m) => AgentError::Parse(m),
        ClassifyError::Invalid(m) => AgentError::BadRequest(m),
    })?;
    let extra = classified.messages().len().saturating_sub(1);
    if extra > 0 {
        state
            .governance()
            .limiter
            .messages(
                &who.tenant,
                &who.subject,
                source,
                u32::try_from(extra).unwrap_or(u32::MAX),
                std::time::Instant::now(),
            )
            .map_err(|limited| {
                tracing::info!(tenant = %who.tenant, subject = %who.subject, source, messages = extra + 1, ?limited, "batch rate limited");
                metrics::counter!(crate::metrics::REQUESTS, "outcome" => "rate_limited").increment(1);
                AgentError::RateLimited(limited)
            })?;
    }
    Ok((body, classified))
}

/// An agent message past admission: read, classified, authorized, its calls begun.
pub(super) struct Admitted {
    /// The body as read.
    pub body: Bytes,
    /// Its messages.
    pub classified: Classified,
    /// The calls of its requests, finished as their answers are released.
    pub calls: InFlight,
    /// Policy's refusal of the whole body, if any (see [`Admitted::refused`]).
    refusal: Option<Refusal>,
}

impl Admitted {
    /// Policy's refusal, if the body was refused: the calls are finished as refused, and the
    /// error to answer with is returned (or the error saying they could not be audited).
    pub(super) async fn refused(&mut self) -> Option<(StatusCode, Bytes)> {
        let denied = self.refusal.take()?;
        let body = self
            .calls
            .fail(Outcome::Error(denied.code), denied.body)
            .await;
        Some((denied.status, body))
    }

    /// The body, its messages and their calls, to forward.
    pub(super) fn into_parts(self) -> (Bytes, Classified, InFlight) {
        (self.body, self.classified, self.calls)
    }

    /// Carries on in `session`: the calls take the session's context, its tunnel stream the
    /// caller's current identity; returns policy's filter for a list answer.
    pub(super) fn continue_in(
        &mut self,
        state: &RelayState,
        session: &Session,
        who: &Identity,
    ) -> Option<ListFilter> {
        self.calls.set_context(&session.call_context());
        let governance = state.governance();
        session
            .channel
            .update_identity(governance.keyring.assertions(), who);
        ListFilter::for_request(
            &governance,
            &state.calls,
            who,
            &session.source,
            &self.classified,
        )
    }
}

/// The admission every agent message passes after [`gate`], whatever its transport: the body
/// read within the limits ([`read_message`]), policy's word on each message ([`authorize`]),
/// and a call begun for every request.
pub(super) async fn admit(
    state: &RelayState,
    who: &Identity,
    source: &str,
    body: Body,
) -> Result<Admitted, AgentError> {
    let (body, classified) = read_message(state, who, source, body).await?;
    Ok(admit_read(state, who, source, (body, classified), TaskIdsAre::Bound).await)
}

/// How the task ids of a message being admitted stand (see [`crate::mcp::tasks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TaskIdsAre {
    /// As the agent sent them: each must be the caller's, and is unbound.
    Bound,
    /// Already unbound: a replayed answer's request, which `connect` sends back as it went
    /// upstream after its admission on the first relay.
    Unbound,
}

/// The admission of a message already read (see [`admit`]): a replayed answer's request,
/// which `connect` sends back, is admitted again on the relay that releases its answer.
pub(super) async fn admit_read(
    state: &RelayState,
    who: &Identity,
    source: &str,
    (body, classified): (Bytes, Classified),
    ids: TaskIdsAre,
) -> Admitted {
    let tasks = (ids == TaskIdsAre::Bound).then(|| state.task_binding(who, source));
    let authorization = authorize(state, who, source, &body, &classified, tasks).await;
    let calls = InFlight::begin(
        &state.calls,
        who,
        source,
        &body,
        &classified,
        &authorization.decisions,
    );
    // The task ids the agent names (all its own: checked above) go on as the upstream's.
    let (body, classified) = match authorization.refusal {
        None if !authorization.tasks.is_empty() => {
            let unbound = Bytes::from(apply_splices(&body, &authorization.tasks));
            match crate::mcp::classify(&unbound) {
                Ok(reclassified) => (unbound, reclassified),
                // Only JSON string tokens were replaced by JSON string tokens.
                Err(_) => (body, classified),
            }
        }
        _ => (body, classified),
    };
    Admitted {
        body,
        classified,
        calls,
        refusal: authorization.refusal,
    }
}

/// Why a body is refused before it reaches the tunnel: the JSON-RPC error to answer with, and
/// its code (the outcome its calls are recorded with).
#[derive(Debug, Clone)]
pub(super) struct Refusal {
    /// The error body.
    pub body: Bytes,
    /// Its JSON-RPC error code.
    pub code: i64,
    /// The HTTP status of a direct answer: `200` for policy's refusals (the JSON-RPC error is
    /// the answer), `503` while the audit trail cannot take records (the relay is unavailable
    /// and says when to retry, so a load balancer or client may go elsewhere).
    pub status: StatusCode,
}

/// Policy's word on one agent message: on each message of the body (parallel to
/// `Classified::messages`, `None` where policy does not govern the method), and the refusal to
/// answer with when any was denied.
#[derive(Debug, Default)]
pub(super) struct Authorization {
    /// One entry per message of the body.
    pub decisions: Vec<Option<Decision>>,
    /// Where the body's task ids are, and the upstream's ids that replace them.
    pub tasks: Vec<Splice>,
    /// The JSON-RPC error for the first refused message, if any: the whole body is refused.
    pub refusal: Option<Refusal>,
}

/// Checks every message of the body before it may reach the tunnel, and refuses the whole body
/// when one fails:
///
/// - a request with `"id": null` (MCP forbids it; it is no notification): `-32600`;
/// - a list request inside a batch when the caller's tenant has roles (a list is filtered per
///   caller, one answer at a time): `-32600`;
/// - every `tools/call`, `resources/read` (and subscription) and `prompts/get`, against the
///   caller's roles and their conditions, judged on the field the upstream acts on (see
///   [`crate::mcp::jsonrpc::target_field`]); a denied one is refused with the error an unknown
///   tool, resource or prompt gets (`-32602`).
///
/// Conditions are CEL evaluated over the call's arguments, whose cost grows with the body: when
/// any applies, the checks run on the blocking pool, never on an async worker other tenants'
/// requests share. `body` is parsed once (by classification); a condition reads only its own
/// message's `params`.
pub(super) async fn authorize(
    state: &RelayState,
    who: &Identity,
    source: &str,
    body: &Bytes,
    classified: &Classified,
    tasks: Option<TaskBinding>,
) -> Authorization {
    if let Some(reason) = state.calls.audit_refusal() {
        return refuse_requests(classified, &reason);
    }
    let governance = state.governance();
    let evaluates = classified.messages().iter().any(|message| {
        governed_kind(message).is_some_and(|kind| {
            let name = message.target.as_deref().unwrap_or_default();
            governance
                .policy
                .evaluates_conditions(who, kind, source, name)
        })
    });
    if !evaluates {
        return decide(&governance, who, source, body, classified, tasks.as_ref());
    }
    let (who_owned, source_owned, body_owned, classified_owned) = (
        who.clone(),
        source.to_owned(),
        body.clone(),
        classified.clone(),
    );
    let blocking = tokio::task::spawn_blocking(move || {
        decide(
            &governance,
            &who_owned,
            &source_owned,
            &body_owned,
            &classified_owned,
            tasks.as_ref(),
        )
    });
    // Evaluation is finite (CEL has no unbounded loops, the body and batch are bounded), but
    // every wait has a bound: past the request timeout the body is refused.
    let outcome = match tokio::time::timeout(state.request_timeout(), blocking).await {
        Ok(Ok(authorization)) => return authorization,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "the conditions took longer than the request timeout".to_owned(),
    };
    // The checks panicked or took too long: refuse, never let the body through.
    tracing::error!(error = %outcome, source, "authorization failed");
    let messages = classified.messages();
    let failed = || Decision::Deny(format!("authorization failed: {outcome}"));
    Authorization {
        decisions: messages
            .iter()
            .map(|m| governed_kind(m).map(|_| failed()))
            .collect(),
        refusal: Some(Refusal {
            body: error_body(
                messages.first().and_then(|m| m.id.as_deref()),
                codes::INTERNAL_ERROR,
                "authorization failed",
            ),
            code: codes::INTERNAL_ERROR,
            status: StatusCode::OK,
        }),
        tasks: Vec::new(),
    }
}

/// Every request of the body refused because the audit trail cannot take records
/// (`[audit] on_database_down = "refuse"`): nothing reaches the tunnel, and each request's
/// record (kept in the spool) names why.
fn refuse_requests(classified: &Classified, reason: &str) -> Authorization {
    let messages = classified.messages();
    let is_request = |m: &MessageInfo| m.kind == MessageKind::Request;
    let first = messages.iter().find(|m| is_request(m));
    let refusal = first.map(|m| {
        tracing::warn!(
            reason,
            "call refused: the audit database does not take rows"
        );
        Refusal {
            body: error_body(
                m.id.as_deref(),
                codes::AUDIT_UNAVAILABLE,
                &format!("call refused: {reason} (the relay fails closed)"),
            ),
            code: codes::AUDIT_UNAVAILABLE,
            status: StatusCode::SERVICE_UNAVAILABLE,
        }
    });
    Authorization {
        decisions: messages
            .iter()
            .map(|m| is_request(m).then(|| Decision::Deny(format!("audit: {reason}"))))
            .collect(),
        refusal,
        tasks: Vec::new(),
    }
}

/// What policy governs `message` as, if anything.
fn governed_kind(message: &MessageInfo) -> Option<Kind> {
    match message.method.as_deref()? {
        "tools/call" => Some(Kind::Tool),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Some(Kind::Resource),
        "prompts/get" => Some(Kind::Prompt),
        _ => None,
    }
}

/// The rule named in the audit record of a request with a null id.
const NULL_ID_RULE: &str = "a request id must not be null";

/// The rule named in the audit record of a list request in a batch.
const BATCHED_LIST_RULE: &str = "a list request cannot be filtered inside a batch";

/// The rule named in the audit record of a request naming a task that is not the caller's.
const OTHERS_TASK_RULE: &str = "a task id must be one the caller was given";

/// [`authorize`]'s checks, on the calling thread.
fn decide(
    governance: &Governance,
    who: &Identity,
    source: &str,
    body: &[u8],
    classified: &Classified,
    tasks: Option<&TaskBinding>,
) -> Authorization {
    let mut authorization = Authorization::default();
    let is_batch = matches!(classified, Classified::Batch(_));
    for message in classified.messages() {
        let refused =
            |rule: &str, code: i64, text: String| (Decision::Deny(rule.to_owned()), code, text);
        let kind = governed_kind(message);
        let denied = if message.null_id && message.kind == MessageKind::Request {
            Some(refused(
                NULL_ID_RULE,
                codes::INVALID_REQUEST,
                "Invalid Request: the id of a request must not be null".to_owned(),
            ))
        } else if is_batch
            && message.method.as_deref().is_some_and(is_list_method)
            && governance.policy.restricts(&who.tenant)
        {
            Some(refused(
                BATCHED_LIST_RULE,
                codes::INVALID_REQUEST,
                format!(
                    "Invalid Request: {} cannot be sent in a batch; send it alone",
                    message.method.as_deref().unwrap_or_default()
                ),
            ))
        } else {
            match unbind_tasks(message, body, tasks) {
                Ok(splices) => {
                    authorization.tasks.extend(splices);
                    None
                }
                Err(unknown) => {
                    tracing::info!(tenant = %who.tenant, subject = %who.subject, source, method = message.method.as_deref(), "a task id that is not the caller's refused");
                    Some(refused(
                        OTHERS_TASK_RULE,
                        codes::INVALID_PARAMS,
                        unknown.to_string(),
                    ))
                }
            }
        };
        let (decision, refusal) = match (denied, kind) {
            (Some((decision, code, text)), _) => (Some(decision), Some((code, text))),
            (None, None) => (None, None),
            (None, Some(kind)) => {
                let name = message.target.as_deref().unwrap_or_default();
                let call = Call {
                    who,
                    kind,
                    source,
                    name,
                    params: message.payload(body),
                };
                let decision = governance.policy.check_call(&call);
                let refusal = (!decision.is_allowed()).then(|| {
                    tracing::info!(tenant = %who.tenant, subject = %who.subject, source, name, ?kind, ?decision, "call denied");
                    let what = match kind {
                        Kind::Tool => "tool",
                        Kind::Resource => "resource",
                        Kind::Prompt => "prompt",
                    };
                    (codes::INVALID_PARAMS, format!("Unknown {what}: {name}"))
                });
                (Some(decision), refusal)
            }
        };
        if let Some((code, text)) = refusal
            && authorization.refusal.is_none()
        {
            metrics::counter!(crate::metrics::REQUESTS, "outcome" => "denied").increment(1);
            authorization.refusal = Some(Refusal {
                body: error_body(message.id.as_deref(), code, &text),
                code,
                status: StatusCode::OK,
            });
        }
        authorization.decisions.push(decision);
    }
    authorization
}

/// The splices (in `body`) that unbind the task ids `message` names, all the caller's own
/// (see [`crate::mcp::tasks`]); `Err` when a request names one that is not.
fn unbind_tasks(
    message: &MessageInfo,
    body: &[u8],
    tasks: Option<&TaskBinding>,
) -> Result<Vec<Splice>, UnknownTask> {
    let (Some(tasks), Some(range)) = (tasks, message.payload.clone()) else {
        return Ok(Vec::new());
    };
    let payload = body.get(range.clone()).unwrap_or_default();
    let splices =
        crate::mcp::tasks::unbind_payload(message.kind, message.method.as_deref(), payload, tasks)?;
    Ok(splices
        .into_iter()
        .map(|s| Splice {
            range: s.range.start + range.start..s.range.end + range.start,
            text: s.text,
        })
        .collect())
}

/// A tasks request's `Mcp-Name` (2026-07-28: the task id, as the body's `params.taskId`)
/// unbound like the body's (`task`, already unbound), so the two agree upstream; a header
/// that does not name the body's task, as the caller was given it, is refused.
pub(super) fn unbind_name_header(
    header: &mut OpenHeader,
    tasks: &TaskBinding,
    task: Option<&str>,
) -> Result<(), String> {
    use crate::mcp::era::{NAME_HEADER, decode_header_value, encode_header_value};
    use crate::mcp::tasks::TaskIds;
    for (name, value) in &mut header.mcp_headers {
        if !name.eq_ignore_ascii_case(NAME_HEADER) {
            continue;
        }
        let raw = decode_header_value(value).and_then(|bound| tasks.unbind(&bound));
        match raw {
            Some(raw) if Some(raw.as_str()) == task => *value = encode_header_value(&raw),
            _ => {
                return Err("Mcp-Name header must be the task id params.taskId names".into());
            }
        }
    }
    Ok(())
}

/// The open header of a new exchange stream. In the stateless era the agent's MCP routing
/// headers travel along, verbatim.
pub(super) fn open_header(
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
            .filter(|(name, _)| crate::mcp::era::relayed_header_allowed(name.as_str()))
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
        assertion: None,
        session: None,
    }
}

/// Opens a tunnel stream to the source named in `header`, for the caller's tenant only; a
/// source that is unknown, offline or another tenant's is the same 404 (the same 503
/// [`AgentError::Starting`] while the relay is starting: no tunnel may have registered yet,
/// whoever's it is). When the tenant enables
/// identity assertions for the source, the stream's header carries one, signed here, and the
/// channel renews it while the stream lives (see [`crate::govern::assertion`]).
pub(super) async fn open_channel(
    state: &RelayState,
    who: &Identity,
    header: &OpenHeader,
) -> Result<Arc<Channel>, Response> {
    let tunnel = state
        .registry
        .route(&who.tenant, &header.source)
        .ok_or_else(|| unrouted(state).into_response())?;
    open_on(state, who, &tunnel, header).await
}

/// Opens a tunnel stream to the source named in `header` on the `connect` instance `connect`
/// (which holds the rest of a call), else, when it is not attached here, on any (see
/// [`open_channel`]): the call's own `connect` then says what became of it.
pub(super) async fn open_channel_to(
    state: &RelayState,
    who: &Identity,
    header: &OpenHeader,
    connect: &str,
) -> Result<Arc<Channel>, Response> {
    let tunnel = state
        .registry
        .route_resumed(&who.tenant, &header.source, Some(connect), false)
        .or_else(|| state.registry.route(&who.tenant, &header.source))
        .ok_or_else(|| unrouted(state).into_response())?;
    open_on(state, who, &tunnel, header).await
}

/// The refusal of a request for a source no tunnel of the caller's tenant reaches here: `404`,
/// as for a source that does not exist; `503` with `Retry-After` while the relay is starting
/// (its tunnels may not have registered yet). Which one depends on the relay's startup only,
/// never on the source or on other tenants.
pub(super) fn unrouted(state: &RelayState) -> AgentError {
    if state.starting.is_starting() {
        AgentError::Starting
    } else {
        AgentError::NotFound
    }
}

/// Opens a tunnel stream on `tunnel` (see [`open_channel`]). A `connect` of wire version 1
/// gets no session handle: it ends the upstream session with the stream, as it always did;
/// one of version 2 no stream number: it keeps no answers for a replay.
pub(super) async fn open_on(
    state: &RelayState,
    who: &Identity,
    tunnel: &Arc<crate::relay::tunnel::registry::Tunnel>,
    header: &OpenHeader,
) -> Result<Arc<Channel>, Response> {
    let stripped;
    let header = match (&header.session, tunnel.terms.wire_version) {
        (Some(_), ..2) => {
            stripped = OpenHeader {
                session: None,
                ..header.clone()
            };
            &stripped
        }
        // Wire version 3 added the stream number (answers kept for a replay).
        (Some(named), 2) if named.stream.is_some() => {
            stripped = OpenHeader {
                session: Some(SessionHandle {
                    stream: None,
                    ..named.clone()
                }),
                ..header.clone()
            };
            &stripped
        }
        _ => header,
    };
    let governance = state.governance();
    let signed = match governance.keyring.assertions() {
        Some(signer) => Refresher::start(signer, who, &header.source).map_err(|e| {
            tracing::error!(error = %e, source = %header.source, "identity assertion not signed");
            source_error(
                None,
                &header.source,
                "the identity assertion could not be signed",
            )
        })?,
        None => None,
    };
    let (header, refresher) = match signed {
        Some((assertion, refresher)) => (
            std::borrow::Cow::Owned(OpenHeader {
                assertion: Some(assertion),
                ..header.clone()
            }),
            Some(refresher),
        ),
        None => (std::borrow::Cow::Borrowed(header), None),
    };
    let limits = ChannelLimits {
        open_timeout: governance.limits.open_stream_timeout(),
        // A budget below one message would drop every message: it holds at least one.
        budget: Budget::new(match governance.limits.session_event_bytes {
            0 => 0,
            bytes => bytes.max(state.limits.max_message_bytes),
        }),
    };
    Channel::open_with_identity(
        tunnel,
        &header,
        state.limits.max_message_bytes,
        state.max_answer_bytes(),
        refresher,
        limits,
    )
    .await
    .map_err(|e| source_error(None, &header.source, &e.to_string()))
}
