//! A Streamable HTTP upstream: each tunnel stream becomes its own MCP client session.
//!
//! `connect` owns the upstream's HTTP semantics: its session id, its protocol version header,
//! its JSON or SSE answers, its standalone GET stream. Back through the tunnel go only messages,
//! each tagged with the exchange of the request whose response carried it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use super::http_client::{HttpClient, Response, Target, body_stream, content_length, error_chain};
use super::legacy;
use crate::govern::assertion::Assertion;
use crate::mcp::era::{SESSION_HEADER, VERSION_HEADER};
use crate::mcp::jsonrpc::{MessageKind, codes, error_body};
use crate::mcp::sse_reader::{SseItem, SseReader};
use crate::mcp::{Classified, ResponseScanner, classify};
use crate::transport::{RecvHalf, SendHalf};
use crate::wire::{Era, Frame, FrameKind, FrameReader, FrameWriter, OpenHeader, UNSOLICITED};

/// Time a DELETE of an upstream session may take when a stream ends.
const DELETE_TIMEOUT: Duration = Duration::from_secs(5);
/// Consecutive failures after which the standalone GET stream is given up.
const GET_STREAM_ATTEMPTS: u32 = 3;
/// Pause between GET stream attempts.
const GET_STREAM_RETRY: Duration = Duration::from_secs(1);
/// Times an answer stream is resumed with `Last-Event-ID` before the request fails.
const RESUME_ATTEMPTS: u32 = 5;
/// Delay before resuming when the upstream suggested none.
const DEFAULT_RESUME_DELAY_MS: u64 = 500;
/// Longest delay before resuming, whatever the upstream's `retry` says.
const MAX_RESUME_DELAY: Duration = Duration::from_secs(5);
/// Text of an upstream error body quoted in a synthesized error.
const QUOTE_LIMIT: usize = 200;
/// A JSON answer larger than this crosses the tunnel in pieces of this size
/// ([`FrameKind::MessagePart`]), sent as they arrive from the upstream, so that the upstream,
/// `connect`, the tunnel, the relay and the agent work at once instead of each waiting for the
/// whole answer. 256 KiB makes the per-piece costs (a 13-byte frame header, a queue hop and a
/// wake-up on each side) negligible against the copy of the bytes, while the queues on the way
/// (64 frames here, a few at the relay) hold a few MiB at most per stream. Answers up to this
/// size (nearly every call) still go as one frame, exactly as before.
const PIECE_BYTES: usize = super::PIECE_BYTES;

/// A configured Streamable HTTP upstream.
pub struct HttpSource {
    name: String,
    /// The configured URL: HTTP+SSE endpoints are resolved against it.
    url: url::Url,
    /// Where requests go, parsed once from `url`.
    target: Target,
    client: HttpClient,
    /// Whether the upstream speaks the 2024-11-05 HTTP+SSE transport instead of Streamable
    /// HTTP: known from a URL ending in `/sse`, else learned on the first session.
    legacy: OnceLock<bool>,
    /// The largest single answer relayed (`max_answer_bytes`); larger than a frame, it
    /// crosses the tunnel in pieces.
    max_answer: usize,
}

/// Why an upstream exchange failed, in words for the agent.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("source {source_name} is unreachable: {reason}")]
    Unreachable { source_name: String, reason: String },
    #[error("source {source_name} answered HTTP {status}: {body}")]
    Status {
        source_name: String,
        status: StatusCode,
        body: String,
    },
    #[error("source {source_name} sent a response larger than the limit of {limit} bytes")]
    TooLarge { source_name: String, limit: usize },
    #[error("source {source_name}: {reason}")]
    Broken { source_name: String, reason: String },
    /// The answer failed after some of its pieces went to the relay: the exchange's `End`
    /// (with no closing piece) tells the relay it was abandoned; no error message may follow,
    /// as it would read as the rest of the message.
    #[error("source {source_name}: the answer broke off after {sent} bytes: {reason}")]
    BrokeOff {
        source_name: String,
        sent: usize,
        reason: String,
    },
}

impl UpstreamError {
    fn code(&self) -> i64 {
        match self {
            UpstreamError::TooLarge { .. } => codes::TOO_LARGE,
            UpstreamError::Status { .. } => codes::INTERNAL_ERROR,
            _ => codes::SOURCE_UNAVAILABLE,
        }
    }
}

/// What one stream knows about its upstream session.
#[derive(Default)]
struct UpstreamSession {
    /// The upstream's `Mcp-Session-Id`.
    id: Option<HeaderValue>,
    /// The protocol version negotiated by `initialize`.
    version: Option<HeaderValue>,
}

/// Shared by the tasks serving one stream.
struct StreamContext {
    source: Arc<HttpSource>,
    header: OpenHeader,
    /// The latest identity assertion: the open header's, then each one the relay renews it
    /// with ([`FrameKind::Identity`]).
    assertion: Mutex<Option<Assertion>>,
    session: Mutex<UpstreamSession>,
    out: super::Out,
    /// The largest message the tunnel carries toward the relay.
    max_frame: usize,
    /// The largest answer relayed in pieces (never below `max_frame`).
    max_answer: usize,
}

impl HttpSource {
    /// A source `name` at `url`.
    pub fn new(name: &str, url: &str) -> Result<Self, String> {
        let url =
            url::Url::parse(url).map_err(|e| format!("source {name}: bad URL {url:?}: {e}"))?;
        let target =
            Target::new(&url).map_err(|e| format!("source {name}: bad URL {url:?}: {e}"))?;
        let client = HttpClient::new().map_err(|e| format!("source {name}: HTTP client: {e}"))?;
        let legacy = OnceLock::new();
        if url.path().trim_end_matches('/').ends_with("/sse") {
            let _ = legacy.set(true);
        }
        Ok(Self {
            name: name.to_owned(),
            url,
            target,
            client,
            legacy,
            max_answer: crate::config::DEFAULT_MAX_ANSWER_BYTES,
        })
    }

    /// Lets requests follow redirects to other origins (`follow_cross_origin_redirects`).
    pub fn with_cross_origin_redirects(mut self, allowed: bool) -> Self {
        self.target = self.target.with_cross_origin_redirects(allowed);
        self
    }

    /// Sets the largest single answer relayed (`max_answer_bytes`).
    pub fn with_answer_limit(mut self, max_answer: usize) -> Self {
        self.max_answer = max_answer;
        self
    }

    /// Opens an HTTP+SSE session when the upstream speaks that transport: always for a known
    /// legacy upstream, and once, on the first session, for an upstream not yet known (the
    /// GET a Streamable HTTP server refuses without a session id is the probe).
    async fn legacy_session(&self, era: Era) -> Result<Option<legacy::Opened>, String> {
        match (self.legacy.get(), era) {
            (Some(false), _) | (None, Era::Stateless) => Ok(None),
            (Some(true), _) => match legacy::open(&self.client, &self.url, &self.target).await? {
                Some(opened) => Ok(Some(opened)),
                None => Err(format!(
                    "source {} did not open an HTTP+SSE event stream",
                    self.name
                )),
            },
            (None, Era::Session) => {
                let opened = legacy::open(&self.client, &self.url, &self.target)
                    .await
                    .unwrap_or(None);
                let _ = self.legacy.set(opened.is_some());
                if opened.is_some() {
                    tracing::info!(source = %self.name, "upstream speaks the 2024-11-05 HTTP+SSE transport");
                }
                Ok(opened)
            }
        }
    }

    /// Serves one exchange stream: forwards each message upstream and tags what comes back.
    pub async fn serve(
        self: Arc<Self>,
        header: OpenHeader,
        mut reader: FrameReader<RecvHalf>,
        mut writer: FrameWriter<SendHalf>,
    ) {
        match self.legacy_session(header.era).await {
            Ok(Some(opened)) => {
                return legacy::serve(
                    self.name.as_str().into(),
                    self.client.clone(),
                    opened,
                    header,
                    reader,
                    writer,
                )
                .await;
            }
            Ok(None) => {}
            Err(reason) => {
                // Every request of the first message gets the reason, then the stream ends.
                if let Ok(Some(frame)) = reader.next().await
                    && let Ok(classified) = classify(&frame.payload)
                {
                    for request in classified
                        .messages()
                        .iter()
                        .filter(|m| m.kind == MessageKind::Request)
                    {
                        let _ = writer
                            .send(&Frame::message(
                                frame.exchange,
                                error_body(
                                    request.id.as_deref(),
                                    codes::SOURCE_UNAVAILABLE,
                                    &reason,
                                ),
                            ))
                            .await;
                    }
                    let _ = writer.send(&Frame::end(frame.exchange)).await;
                }
                let _ = writer.send(&Frame::close(reason)).await;
                return;
            }
        }
        let max_frame = writer.limit();
        let (out, writer_task) = super::start_writer(writer);
        let context = Arc::new(StreamContext {
            source: self.clone(),
            assertion: Mutex::new(header.assertion.clone()),
            header,
            session: Mutex::default(),
            out,
            max_frame,
            max_answer: self.max_answer.max(max_frame),
        });
        tracing::debug!(source = %self.name, context = %context.header.context, subject = %context.header.subject, era = ?context.header.era, "stream opened");
        // Requests in flight run inside this task, polled beside the next frame's read: a call
        // costs no task of its own, and its answer no hand-off between tasks (or threads).
        // Boxed: the set keeps a stub the size of its future type for as long as the stream
        // lives, a few KiB per idle session unboxed.
        let mut requests: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
        let mut get_stream: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let frame = tokio::select! {
                frame = reader.next() => frame,
                Some(()) = requests.next(), if !requests.is_empty() => continue,
            };
            let frame = match frame {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel stream read failed");
                    break;
                }
            };
            match frame.kind {
                FrameKind::Message => {}
                FrameKind::Close => {
                    tracing::debug!(reason = %frame.reason(), "relay closed the stream");
                    break;
                }
                FrameKind::Identity => {
                    // Applies to every upstream request sent from now on, in frame order.
                    match frame.parse_json::<Assertion>(FrameKind::Identity) {
                        Ok(assertion) => {
                            *context
                                .assertion
                                .lock()
                                .expect("assertion lock is never held across a panic") =
                                Some(assertion);
                        }
                        Err(e) => tracing::warn!(error = %e, "bad identity frame ignored"),
                    }
                    continue;
                }
                other => {
                    tracing::warn!(kind = ?other, "unexpected frame on an exchange stream");
                    break;
                }
            }
            let classified = classify(&frame.payload).ok();
            let is_initialize = matches!(&classified, Some(Classified::Single(m)) if m.method.as_deref() == Some("initialize"));
            let has_requests = classified.as_ref().is_none_or(Classified::has_requests);
            let is_initialized = matches!(&classified, Some(Classified::Single(m)) if m.method.as_deref() == Some("notifications/initialized"));
            if is_initialize || !has_requests {
                // In order: the session id must exist before the next message, and
                // notifications must reach the upstream before requests sent after them.
                // Requests already in flight keep going meanwhile.
                let ordered = context.exchange(frame.exchange, frame.payload, classified);
                tokio::pin!(ordered);
                loop {
                    tokio::select! {
                        () = &mut ordered => break,
                        Some(()) = requests.next(), if !requests.is_empty() => {}
                    }
                }
                if is_initialized
                    && context.header.era == Era::Session
                    && get_stream.is_none()
                    && context.session_id().is_some()
                {
                    get_stream = Some(tokio::spawn(context.clone().standalone_stream()));
                }
            } else {
                let context = context.clone();
                requests.push(Box::pin(async move {
                    context
                        .exchange(frame.exchange, frame.payload, classified)
                        .await
                }));
            }
        }
        drop(requests);
        if let Some(task) = get_stream {
            task.abort();
        }
        context.end_upstream_session().await;
        drop(context);
        let _ = writer_task.await;
    }
}

impl StreamContext {
    fn name(&self) -> &str {
        &self.source.name
    }

    fn session_id(&self) -> Option<HeaderValue> {
        self.session
            .lock()
            .expect("session lock is never held across a panic")
            .id
            .clone()
    }

    async fn send(&self, frame: Frame) {
        // A closed queue means the stream is gone; nothing is waiting for this frame.
        let _ = self.out.send(frame).await;
    }

    fn headers(&self, is_initialize: bool) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        match self.header.era {
            Era::Session => {
                let session = self
                    .session
                    .lock()
                    .expect("session lock is never held across a panic");
                if let Some(id) = &session.id {
                    headers.insert(SESSION_HEADER, id.clone());
                }
                if let (Some(version), false) = (&session.version, is_initialize) {
                    headers.insert(VERSION_HEADER, version.clone());
                }
            }
            Era::Stateless => {
                if let Some(version) = self
                    .header
                    .protocol_version
                    .as_deref()
                    .and_then(|v| HeaderValue::from_str(v).ok())
                {
                    headers.insert(VERSION_HEADER, version);
                }
                // Only the MCP routing headers, whatever the relay sends: nothing it says can
                // set `Host`, credentials, cookies or the session upstream.
                for (name, value) in &self.header.mcp_headers {
                    if !crate::mcp::era::relayed_header_allowed(name) {
                        tracing::warn!(source = %self.source.name, header = ?name, "header from the relay not sent upstream: only Mcp-Method, Mcp-Name and Mcp-Param-* are");
                        continue;
                    }
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::try_from(name.as_str()),
                        HeaderValue::from_str(value),
                    ) {
                        headers.insert(name, value);
                    }
                }
            }
        }
        // The relay-signed identity of the caller, when the tenant enables it for this source:
        // only in the `x-` header namespace, so it can never replace `Host` or credentials.
        let assertion = self
            .assertion
            .lock()
            .expect("assertion lock is never held across a panic")
            .clone();
        if let Some(assertion) = &assertion
            && crate::govern::assertion::header_name_allowed(&assertion.header)
            && let (Ok(name), Ok(mut value)) = (
                HeaderName::try_from(assertion.header.as_str()),
                HeaderValue::from_str(&assertion.token),
            )
        {
            // Sensitive: never logged, and dropped on a redirect to another origin.
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        headers
    }

    /// POSTs one message and relays what the upstream answers, tagged with `exchange`, then
    /// `End`. Every request in the message gets an answer: the upstream's, or an error that
    /// says why there is none.
    async fn exchange(&self, exchange: u64, payload: Bytes, classified: Option<Classified>) {
        let is_initialize = matches!(&classified, Some(Classified::Single(m)) if m.method.as_deref() == Some("initialize"));
        let requests: Vec<&crate::mcp::MessageInfo> = classified
            .iter()
            .flat_map(|c| c.messages())
            .filter(|m| m.kind == MessageKind::Request)
            .collect();
        let mut pending: HashSet<String> = requests
            .iter()
            .filter_map(|m| m.id.as_deref())
            .map(id_key)
            .collect();
        if let Err(error) = self
            .post(exchange, payload, is_initialize, &mut pending)
            .await
        {
            tracing::warn!(source = %self.name(), error = %error, "upstream exchange failed");
            let abandoned = matches!(error, UpstreamError::BrokeOff { .. });
            for request in requests.iter().filter(|m| {
                !abandoned
                    && m.id
                        .as_deref()
                        .is_some_and(|id| pending.contains(&id_key(id)))
            }) {
                self.send(Frame::message(
                    exchange,
                    error_body(request.id.as_deref(), error.code(), &error.to_string()),
                ))
                .await;
            }
        }
        self.send(Frame::end(exchange)).await;
    }

    async fn post(
        &self,
        exchange: u64,
        payload: Bytes,
        is_initialize: bool,
        pending: &mut HashSet<String>,
    ) -> Result<(), UpstreamError> {
        let response = self
            .source
            .client
            .send(
                Method::POST,
                &self.source.target,
                self.headers(is_initialize),
                payload,
            )
            .await
            .map_err(|e| UpstreamError::Unreachable {
                source_name: self.name().to_owned(),
                reason: error_chain(&e),
            })?;
        let status = response.status();
        if is_initialize && let Some(id) = response.headers().get(SESSION_HEADER) {
            self.session
                .lock()
                .expect("session lock is never held across a panic")
                .id = Some(id.clone());
        }
        if status == StatusCode::ACCEPTED {
            return Ok(());
        }
        if status == StatusCode::NOT_FOUND
            && self.header.era == Era::Session
            && !is_initialize
            && self.session_id().is_some()
        {
            // The upstream forgot the session: end ours, so the agent re-initializes.
            self.send(Frame::close(format!(
                "source {} ended the session",
                self.name()
            )))
            .await;
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if content_type.starts_with("text/event-stream") && status.is_success() {
            return self.relay_sse(exchange, response, pending).await;
        }
        // `initialize` answers are read whole: the session's version is learned from them.
        if status.is_success() && !is_initialize {
            return self.relay_json(exchange, response, pending).await;
        }
        let body = self.read_limited(response).await?;
        if !status.is_success() {
            if content_type.starts_with("application/json") && classify(&body).is_ok() {
                // A JSON-RPC error from the upstream passes through unchanged, status included.
                self.send(Frame::rejected(exchange, status.as_u16())).await;
                answered(&body, pending);
                self.send(Frame::message(exchange, body)).await;
                return Ok(());
            }
            self.send(Frame::rejected(exchange, status.as_u16())).await;
            let text = String::from_utf8_lossy(&body[..body.len().min(QUOTE_LIMIT)])
                .trim()
                .to_owned();
            return Err(UpstreamError::Status {
                source_name: self.name().to_owned(),
                status,
                body: text,
            });
        }
        if body.is_empty() {
            return Ok(());
        }
        if is_initialize {
            self.remember_version(&body);
        }
        answered(&body, pending);
        self.send(Frame::message(exchange, body)).await;
        Ok(())
    }

    fn remember_version(&self, body: &[u8]) {
        #[derive(serde::Deserialize)]
        struct InitResult {
            result: Option<Negotiated>,
        }
        #[derive(serde::Deserialize)]
        struct Negotiated {
            #[serde(rename = "protocolVersion")]
            protocol_version: String,
        }
        if let Ok(InitResult {
            result: Some(negotiated),
        }) = serde_json::from_slice::<InitResult>(body)
            && let Ok(value) = HeaderValue::from_str(&negotiated.protocol_version)
        {
            self.session
                .lock()
                .expect("session lock is never held across a panic")
                .version = Some(value);
        }
    }

    async fn read_limited(&self, response: Response) -> Result<Bytes, UpstreamError> {
        let limit = self.max_frame;
        if content_length(&response).is_some_and(|len| len > limit as u64) {
            return Err(UpstreamError::TooLarge {
                source_name: self.name().to_owned(),
                limit,
            });
        }
        let mut body = bytes::BytesMut::new();
        let mut chunks = body_stream(response);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| UpstreamError::Broken {
                source_name: self.name().to_owned(),
                reason: error_chain(&e),
            })?;
            if body.len() + chunk.len() > limit {
                return Err(UpstreamError::TooLarge {
                    source_name: self.name().to_owned(),
                    limit,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    /// Relays a successful JSON answer: as one message when it is at most [`PIECE_BYTES`],
    /// else in pieces as it arrives, never holding more than about one piece. The whole answer
    /// stays within the tunnel's per-message limit: refused up front when its declared length
    /// is over it, abandoned (`End` without a closing piece) when its bytes pass it. The ids it
    /// answers come from an incremental scan of the pieces.
    async fn relay_json(
        &self,
        exchange: u64,
        response: Response,
        pending: &mut HashSet<String>,
    ) -> Result<(), UpstreamError> {
        let limit = self.max_answer;
        let too_large = || UpstreamError::TooLarge {
            source_name: self.name().to_owned(),
            limit,
        };
        let declared = content_length(&response);
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(too_large());
        }
        let piece_bytes = PIECE_BYTES.min(self.max_frame);
        let capacity = declared
            .and_then(|len| usize::try_from(len).ok())
            .unwrap_or(0)
            .min(2 * piece_bytes);
        let mut head = bytes::BytesMut::with_capacity(capacity);
        let mut scanner = None::<ResponseScanner>;
        let mut sent = 0usize;
        let mut chunks = body_stream(response);
        while let Some(chunk) = chunks.next().await {
            let failure = match chunk {
                Ok(chunk) if sent + head.len() + chunk.len() <= limit => {
                    head.extend_from_slice(&chunk);
                    None
                }
                Ok(_) => Some(too_large()),
                Err(e) => Some(UpstreamError::Broken {
                    source_name: self.name().to_owned(),
                    reason: error_chain(&e),
                }),
            };
            if let Some(failure) = failure {
                return Err(match sent {
                    0 => failure,
                    sent => UpstreamError::BrokeOff {
                        source_name: self.name().to_owned(),
                        sent,
                        reason: failure.to_string(),
                    },
                });
            }
            // Keep at least one byte back: the closing `Message` is never empty.
            while head.len() > piece_bytes {
                let piece = head.split_to(piece_bytes).freeze();
                scanner
                    .get_or_insert_with(ResponseScanner::new)
                    .feed(&piece);
                sent += piece.len();
                self.send(Frame::part(exchange, piece)).await;
                if head.capacity() < piece_bytes {
                    head.reserve(2 * piece_bytes);
                }
            }
        }
        let last = head.freeze();
        match scanner {
            None if last.is_empty() => {}
            None => answered(&last, pending),
            Some(mut scanner) => {
                scanner.feed(&last);
                if let Some(id) = scanner.facts().and_then(|facts| facts.id.as_deref()) {
                    pending.remove(id.trim());
                }
            }
        }
        if !last.is_empty() {
            self.send(Frame::message(exchange, last)).await;
        }
        Ok(())
    }

    /// Relays an SSE answer event by event until every request in `pending` is answered.
    /// Events without data (priming events) carry nothing to forward. An event's data is
    /// passed on as it arrives: up to [`PIECE_BYTES`] as one message, larger in pieces (see
    /// [`Assembling`]), so an answer of any size up to `max_answer_bytes` is never held whole.
    /// When the upstream closes the stream before answering (SSE polling) or it breaks, the
    /// answer is resumed with a GET carrying `Last-Event-ID`, after the `retry` delay the
    /// upstream asked for.
    async fn relay_sse(
        &self,
        exchange: u64,
        response: Response,
        pending: &mut HashSet<String>,
    ) -> Result<(), UpstreamError> {
        let broken = |reason: String| UpstreamError::Broken {
            source_name: self.name().to_owned(),
            reason,
        };
        if exchange != UNSOLICITED {
            self.send(Frame::streaming(exchange)).await;
        }
        let (mut last_id, mut retry, mut resumes) = (None::<String>, None::<u64>, 0);
        let mut response = response;
        let mut items = Vec::new();
        loop {
            let mut reader = SseReader::new();
            let mut body = body_stream(response);
            let mut event = Assembling::new(exchange, self.max_frame, self.max_answer);
            let mut failure = None;
            while let Some(chunk) = body.next().await {
                let chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        failure = Some(format!("its event stream broke: {}", error_chain(&e)));
                        break;
                    }
                };
                items.clear();
                if let Err(e) = reader.feed(&chunk, &mut items) {
                    failure = Some(format!("bad event stream: {e}"));
                    break;
                }
                for item in items.drain(..) {
                    match item {
                        SseItem::Data(bytes) => event.push(self, bytes).await?,
                        SseItem::End {
                            id,
                            retry: asked,
                            data,
                        } => {
                            if let Some(id) = id {
                                last_id = Some(id);
                            }
                            retry = asked.or(retry);
                            let Some(message) = event.finish(self, data).await? else {
                                continue;
                            };
                            if let Some(whole) = &message.whole {
                                if self
                                    .session
                                    .lock()
                                    .expect("session lock is never held across a panic")
                                    .version
                                    .is_none()
                                {
                                    self.remember_version(whole);
                                }
                                answered(whole, pending);
                            } else if let Some(id) = &message.answers {
                                pending.remove(id.trim());
                            }
                            if exchange != UNSOLICITED && pending.is_empty() {
                                return Ok(());
                            }
                        }
                    }
                }
            }
            if event.has_sent() {
                // The stream ended inside a message already partly passed on.
                return Err(UpstreamError::BrokeOff {
                    source_name: self.name().to_owned(),
                    sent: event.sent,
                    reason: failure.unwrap_or_else(|| "its event stream ended mid-event".into()),
                });
            }
            if exchange == UNSOLICITED || pending.is_empty() {
                return failure.map_or(Ok(()), |reason| Err(broken(reason)));
            }
            let Some(id) = last_id.clone() else {
                return Err(broken(failure.unwrap_or_else(|| {
                    "it closed its event stream before answering".into()
                })));
            };
            if resumes >= RESUME_ATTEMPTS {
                return Err(broken(format!(
                    "its event stream ended {resumes} times before answering"
                )));
            }
            resumes += 1;
            let delay = Duration::from_millis(retry.unwrap_or(DEFAULT_RESUME_DELAY_MS))
                .min(MAX_RESUME_DELAY);
            tokio::time::sleep(delay).await;
            let mut headers = self.headers(false);
            headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
            headers.remove(CONTENT_TYPE);
            if let Ok(value) = HeaderValue::from_str(&id) {
                headers.insert("last-event-id", value);
            }
            tracing::debug!(source = %self.name(), last_event_id = %id, "resuming the upstream's answer");
            response = self
                .source
                .client
                .send(Method::GET, &self.source.target, headers, Bytes::new())
                .await
                .map_err(|e| broken(format!("resuming its event stream: {}", error_chain(&e))))?;
            if !response.status().is_success() {
                return Err(broken(format!(
                    "resuming its event stream: HTTP {}",
                    response.status()
                )));
            }
        }
    }

    /// The upstream's standalone GET stream: its messages go to the agent's GET stream.
    async fn standalone_stream(self: Arc<Self>) {
        let mut failures = 0;
        while failures < GET_STREAM_ATTEMPTS {
            let mut headers = self.headers(false);
            headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
            headers.remove(CONTENT_TYPE);
            match self
                .source
                .client
                .send(Method::GET, &self.source.target, headers, Bytes::new())
                .await
            {
                Ok(response) if response.status() == StatusCode::METHOD_NOT_ALLOWED => return,
                Ok(response) if response.status().is_success() => {
                    failures = 0;
                    if let Err(e) = self
                        .relay_sse(UNSOLICITED, response, &mut HashSet::new())
                        .await
                    {
                        tracing::debug!(source = %self.name(), error = %e, "upstream GET stream failed");
                        failures += 1;
                    }
                }
                Ok(response) => {
                    tracing::debug!(source = %self.name(), status = %response.status(), "upstream refused the GET stream");
                    failures += 1;
                }
                Err(e) => {
                    tracing::debug!(source = %self.name(), error = %error_chain(&e), "upstream GET stream failed");
                    failures += 1;
                }
            }
            tokio::time::sleep(GET_STREAM_RETRY).await;
        }
    }

    /// DELETEs the upstream session, if there is one.
    async fn end_upstream_session(&self) {
        let Some(id) = self.session_id() else { return };
        let mut headers = self.headers(false);
        headers.insert(SESSION_HEADER, id);
        let request =
            self.source
                .client
                .send(Method::DELETE, &self.source.target, headers, Bytes::new());
        match tokio::time::timeout(DELETE_TIMEOUT, request).await {
            Ok(Ok(response)) => {
                tracing::debug!(source = %self.name(), status = %response.status(), "upstream session deleted")
            }
            Ok(Err(e)) => {
                tracing::debug!(source = %self.name(), error = %error_chain(&e), "upstream session delete failed")
            }
            Err(_) => {
                tracing::debug!(source = %self.name(), timeout = ?DELETE_TIMEOUT, "upstream session delete timed out")
            }
        }
    }
}

/// One SSE event's data on its way to the relay: held while it is at most [`PIECE_BYTES`]
/// (nearly every message, sent whole as before), else passed on in pieces as it arrives, never
/// more than about one piece held. The whole message stays within `max_answer` (within the
/// frame limit on the standalone stream, which carries no pieces).
struct Assembling {
    exchange: u64,
    max_frame: usize,
    max_answer: usize,
    head: bytes::BytesMut,
    /// Bytes already passed on as pieces.
    sent: usize,
    /// Scans the pieces for the id the message answers (once it goes in pieces).
    scanner: Option<ResponseScanner>,
}

/// A message [`Assembling`] finished.
struct Finished {
    /// The message, when it went whole.
    whole: Option<Bytes>,
    /// The id it answers, when it went in pieces and is a response.
    answers: Option<String>,
}

impl Assembling {
    fn new(exchange: u64, max_frame: usize, max_answer: usize) -> Self {
        Self {
            exchange,
            max_frame,
            max_answer: max_answer.max(max_frame),
            head: bytes::BytesMut::new(),
            sent: 0,
            scanner: None,
        }
    }

    fn has_sent(&self) -> bool {
        self.sent > 0
    }

    fn limit(&self) -> usize {
        if self.exchange == UNSOLICITED {
            self.max_frame
        } else {
            self.max_answer
        }
    }

    fn piece_bytes(&self) -> usize {
        PIECE_BYTES.min(self.max_frame)
    }

    /// Takes the next bytes of the event's data; sends whole pieces on.
    async fn push(&mut self, context: &StreamContext, bytes: Bytes) -> Result<(), UpstreamError> {
        if self.sent + self.head.len() + bytes.len() > self.limit() {
            let too_large = UpstreamError::TooLarge {
                source_name: context.name().to_owned(),
                limit: self.limit(),
            };
            return Err(match self.sent {
                0 => too_large,
                sent => UpstreamError::BrokeOff {
                    source_name: context.name().to_owned(),
                    sent,
                    reason: too_large.to_string(),
                },
            });
        }
        self.head.extend_from_slice(&bytes);
        if self.exchange == UNSOLICITED {
            return Ok(());
        }
        // Keep at least one byte back: the closing `Message` is never empty.
        let piece_bytes = self.piece_bytes();
        while self.head.len() > piece_bytes {
            let piece = self.head.split_to(piece_bytes).freeze();
            self.scanner
                .get_or_insert_with(ResponseScanner::new)
                .feed(&piece);
            self.sent += piece.len();
            context.send(Frame::part(self.exchange, piece)).await;
            if self.head.capacity() < piece_bytes {
                self.head.reserve(2 * piece_bytes);
            }
        }
        Ok(())
    }

    /// The event ended: sends what is left (the message, or its closing piece). `None` when
    /// it carried no message (no data, or empty data).
    async fn finish(
        &mut self,
        context: &StreamContext,
        data: bool,
    ) -> Result<Option<Finished>, UpstreamError> {
        let last = std::mem::take(&mut self.head).freeze();
        let sent = std::mem::take(&mut self.sent);
        let scanner = self.scanner.take();
        if !data || (sent == 0 && last.is_empty()) {
            return Ok(None);
        }
        match scanner {
            None => {
                context
                    .send(Frame::message(self.exchange, last.clone()))
                    .await;
                Ok(Some(Finished {
                    whole: Some(last),
                    answers: None,
                }))
            }
            Some(mut scanner) => {
                scanner.feed(&last);
                context.send(Frame::message(self.exchange, last)).await;
                let answers = scanner
                    .facts()
                    .and_then(|facts| facts.id.as_deref().map(str::to_owned));
                Ok(Some(Finished {
                    whole: None,
                    answers,
                }))
            }
        }
    }
}

/// A request id as a lookup key: its JSON text, trimmed.
fn id_key(id: &serde_json::value::RawValue) -> String {
    id.get().trim().to_owned()
}

/// Removes from `pending` the ids `message` answers.
fn answered(message: &[u8], pending: &mut HashSet<String>) {
    if pending.is_empty() {
        return;
    }
    if let Ok(classified) = classify(message) {
        for response in classified
            .messages()
            .iter()
            .filter(|m| m.kind == MessageKind::Response)
        {
            if let Some(id) = response.id.as_deref() {
                pending.remove(&id_key(id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::any;

    /// A relay (here: the test) that puts `Host`, `Authorization`, `Cookie` and the upstream
    /// session id into a stream's `mcp_headers` gets none of them upstream; the MCP routing
    /// headers go through.
    #[tokio::test]
    async fn only_mcp_routing_headers_from_the_relay_reach_the_upstream() {
        let seen: Arc<Mutex<Option<http::HeaderMap>>> = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new().route(
            "/mcp",
            any(move |headers: http::HeaderMap| {
                let record = record.clone();
                async move {
                    *record.lock().expect("lock") = Some(headers);
                    (
                        [("content-type", "application/json")],
                        r#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"complete","tools":[]}}"#,
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("bound");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let source =
            Arc::new(HttpSource::new("db", &format!("http://{addr}/mcp")).expect("source"));
        let header = OpenHeader {
            tenant: "acme".into(),
            source: "db".into(),
            subject: "alice".into(),
            era: Era::Stateless,
            protocol_version: Some("2026-07-28".into()),
            context: String::new(),
            mcp_headers: [
                ("host", "evil.example"),
                ("authorization", "Bearer stolen"),
                ("cookie", "session=1"),
                ("mcp-session-id", "forged"),
                ("x-forwarded-for", "10.0.0.1"),
                ("mcp-method", "tools/list"),
                ("mcp-param-region", "eu"),
            ]
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
            traceparent: None,
            assertion: None,
        };
        let (relay_end, connect_end) = tokio::io::duplex(64 * 1024);
        let (connect_read, connect_write) = tokio::io::split(connect_end);
        let (relay_read, relay_write) = tokio::io::split(relay_end);
        let served = tokio::spawn(source.serve(
            header,
            FrameReader::new(Box::new(connect_read), 1 << 20),
            FrameWriter::new(Box::new(connect_write), 1 << 20),
        ));
        let mut to_connect = FrameWriter::new(relay_write, 1 << 20);
        let mut from_connect = FrameReader::new(relay_read, 1 << 20);
        to_connect
            .send(&Frame::message(
                1,
                Bytes::from_static(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#),
            ))
            .await
            .expect("sent");
        let answer = tokio::time::timeout(Duration::from_secs(30), from_connect.next())
            .await
            .expect("answered in time")
            .expect("a frame")
            .expect("not the end");
        assert!(
            String::from_utf8_lossy(&answer.payload).contains("tools"),
            "{answer:?}"
        );
        let headers = seen.lock().expect("lock").clone().expect("a request");
        assert_eq!(headers["host"], addr.to_string().as_str());
        for absent in [
            "authorization",
            "cookie",
            "mcp-session-id",
            "x-forwarded-for",
        ] {
            assert!(!headers.contains_key(absent), "{absent}: {headers:?}");
        }
        assert_eq!(headers["mcp-method"], "tools/list");
        assert_eq!(headers["mcp-param-region"], "eu");
        drop((to_connect, from_connect));
        served.abort();
        server.abort();
    }
}
