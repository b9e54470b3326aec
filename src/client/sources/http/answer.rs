//! Relaying an upstream's answers to the tunnel as they arrive: a JSON body, or an event
//! stream (resumed with `Last-Event-ID` when it breaks off), whole when small, in pieces when
//! large, never held whole; and which pending requests they answer.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;
use http::header::HeaderValue;
use tokio::sync::oneshot;

use super::client::{BodyStream, Response, body_stream, content_length, error_chain};
use super::context::{StreamContext, is_event_stream};
use super::error::UpstreamError;
use crate::mcp::jsonrpc::MessageKind;
use crate::mcp::sse_reader::{SseItem, SseReader};
use crate::mcp::{ResponseScanner, classify};
use crate::wire::{Frame, UNSOLICITED};

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

/// A JSON answer larger than this crosses the tunnel in pieces of this size
/// ([`FrameKind::MessagePart`]), sent as they arrive from the upstream, so that the upstream,
/// `connect`, the tunnel, the relay and the agent work at once instead of each waiting for the
/// whole answer. 256 KiB makes the per-piece costs (a 13-byte frame header, a queue hop and a
/// wake-up on each side) negligible against the copy of the bytes, while the queues on the way
/// (64 frames here, a few at the relay) hold a few MiB at most per stream. Answers up to this
/// size (nearly every call) still go as one frame, exactly as before.
const PIECE_BYTES: usize = crate::client::sources::PIECE_BYTES;

impl StreamContext {
    /// Relays a successful JSON answer: as one message when it is at most [`PIECE_BYTES`],
    /// else in pieces as it arrives, never holding more than about one piece. The whole answer
    /// stays within the tunnel's per-message limit: refused up front when its declared length
    /// is over it, abandoned (`End` without a closing piece) when its bytes pass it. The ids it
    /// answers come from an incremental scan of the pieces.
    pub(super) async fn relay_json(
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
    /// upstream asked for. In a bridged stream, a request the upstream sends its client stops
    /// the relaying: see [`SseEnd::Asked`].
    pub(super) async fn relay_sse(
        &self,
        exchange: u64,
        response: Response,
        pending: &mut HashSet<String>,
    ) -> Result<SseEnd, UpstreamError> {
        if exchange != UNSOLICITED {
            self.send(Frame::streaming(exchange)).await;
        }
        self.follow_sse(exchange, Box::new(EventBody::new(response)), pending)
            .await
    }

    /// Relays the rest of an answer's event stream from where `body` stands (see
    /// [`StreamContext::relay_sse`]).
    pub(super) async fn follow_sse(
        &self,
        exchange: u64,
        mut body: Box<EventBody>,
        pending: &mut HashSet<String>,
    ) -> Result<SseEnd, UpstreamError> {
        let broken = |reason: String| UpstreamError::Broken {
            source_name: self.name().to_owned(),
            reason,
        };
        loop {
            let (failure, sent) = match self.relay_events(exchange, &mut body, pending).await? {
                BodyEnd::Answered => return Ok(SseEnd::Answered),
                BodyEnd::Asked(request) => return Ok(SseEnd::Asked(request, body)),
                BodyEnd::Ended { failure, sent } => (failure, sent),
            };
            if sent > 0 {
                // The stream ended inside a message already partly passed on.
                return Err(UpstreamError::BrokeOff {
                    source_name: self.name().to_owned(),
                    sent,
                    reason: failure.unwrap_or_else(|| "its event stream ended mid-event".into()),
                });
            }
            if exchange == UNSOLICITED || pending.is_empty() {
                return failure.map_or(Ok(SseEnd::Answered), |reason| Err(broken(reason)));
            }
            let Some(id) = body.cursor.last_id.clone() else {
                return Err(broken(failure.unwrap_or_else(|| {
                    "it closed its event stream before answering".into()
                })));
            };
            if body.resumes >= RESUME_ATTEMPTS {
                return Err(broken(format!(
                    "its event stream ended {} times before answering",
                    body.resumes
                )));
            }
            body.resumes += 1;
            let delay = Duration::from_millis(body.cursor.retry.unwrap_or(DEFAULT_RESUME_DELAY_MS))
                .min(MAX_RESUME_DELAY);
            tokio::time::sleep(delay).await;
            let response = self.resume(&id).await.map_err(broken)?;
            body.restart(response);
        }
    }

    /// Relays the events of one SSE response body until every request in `pending` is
    /// answered (on an exchange's stream), the upstream asks its client something (bridged),
    /// or the body ends; the body's cursor follows the event ids and `retry` delays.
    async fn relay_events(
        &self,
        exchange: u64,
        body: &mut EventBody,
        pending: &mut HashSet<String>,
    ) -> Result<BodyEnd, UpstreamError> {
        let mut event = Assembling::new(exchange, self);
        let ended = |event: &Assembling, failure| BodyEnd::Ended {
            failure,
            sent: event.sent,
        };
        let mut fresh = Vec::new();
        loop {
            while let Some(item) = body.items.pop_front() {
                let (id, asked, data) = match item {
                    SseItem::Data(bytes) => {
                        event.push(self, bytes).await?;
                        continue;
                    }
                    SseItem::End { id, retry, data } => (id, retry, data),
                };
                if let Some(id) = id {
                    body.cursor.last_id = Some(id);
                }
                body.cursor.retry = asked.or(body.cursor.retry);
                let Some(message) = event.finish(self, data).await? else {
                    continue;
                };
                if let Some(request) = message.asked {
                    return Ok(BodyEnd::Asked(request));
                }
                if let Some(whole) = &message.whole {
                    if self.session.upstream.lock().version.is_none() {
                        self.remember_version(whole);
                    }
                    answered(whole, pending);
                } else if let Some(id) = &message.answers {
                    pending.remove(id.trim());
                }
                if exchange != UNSOLICITED && pending.is_empty() {
                    return Ok(BodyEnd::Answered);
                }
            }
            // A bridged call also takes what its session's upstream asks on the GET stream.
            let next = if event.intercepts && event.sent == 0 && event.head.is_empty() {
                tokio::select! {
                    chunk = body.body.next() => chunk,
                    request = self.session.next_ask() => return Ok(BodyEnd::Asked(request)),
                }
            } else {
                body.body.next().await
            };
            let Some(chunk) = next else {
                return Ok(ended(&event, None));
            };
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    let failure = format!("its event stream broke: {}", error_chain(&e));
                    return Ok(ended(&event, Some(failure)));
                }
            };
            fresh.clear();
            if let Err(e) = body.reader.feed(&chunk, &mut fresh) {
                return Ok(ended(&event, Some(format!("bad event stream: {e}"))));
            }
            body.items.extend(fresh.drain(..));
        }
    }

    /// Asks the upstream to resume its event stream after the event `last_event_id`.
    async fn resume(&self, last_event_id: &str) -> Result<Response, String> {
        let mut headers = self.event_stream_headers();
        if let Ok(value) = HeaderValue::from_str(last_event_id) {
            headers.insert("last-event-id", value);
        }
        tracing::debug!(source = %self.name(), %last_event_id, "resuming the upstream's answer");
        let response = self
            .get(headers)
            .await
            .map_err(|e| format!("resuming its event stream: {}", error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(format!(
                "resuming its event stream: HTTP {}",
                response.status()
            ));
        }
        Ok(response)
    }

    /// The upstream's standalone GET stream: its messages go to the agent's GET stream.
    /// `answered` hears when the first attempt got its answer (or failed).
    pub(super) async fn standalone_stream(
        self: Arc<Self>,
        mut answered: Option<oneshot::Sender<()>>,
    ) {
        let mut failures = 0;
        while failures < GET_STREAM_ATTEMPTS {
            let opened = match self.session.declared() {
                Some(declared) => self.listen_request(&declared).await,
                None => self
                    .get(self.event_stream_headers())
                    .await
                    .map_err(|e| error_chain(&e)),
            };
            if let Some(answered) = answered.take() {
                let _ = answered.send(());
            }
            match opened {
                Ok(response) if response.status() == StatusCode::METHOD_NOT_ALLOWED => return,
                Ok(response) if response.status().is_success() && is_event_stream(&response) => {
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
                    tracing::debug!(source = %self.name(), error = %e, "upstream GET stream failed");
                    failures += 1;
                }
            }
            tokio::time::sleep(GET_STREAM_RETRY).await;
        }
    }
}

/// Where an answer's event stream stands, to resume it: the last event id, and the delay the
/// upstream asked for.
#[derive(Default)]
struct Cursor {
    last_id: Option<String>,
    retry: Option<u64>,
}

/// An upstream's event stream answering one request, read as far as it was relayed: kept as
/// it stands while a bridged call waits for its agent's input, and read on after.
pub(super) struct EventBody {
    reader: SseReader,
    body: BodyStream,
    /// Items parsed but not yet relayed (a chunk may hold events past the one that stopped).
    items: VecDeque<SseItem>,
    cursor: Cursor,
    resumes: u32,
}

impl EventBody {
    fn new(response: Response) -> Self {
        Self {
            reader: SseReader::new(),
            body: body_stream(response),
            items: VecDeque::new(),
            cursor: Cursor::default(),
            resumes: 0,
        }
    }

    /// Reads on from `response`, the upstream's resumption of the stream.
    fn restart(&mut self, response: Response) {
        self.reader = SseReader::new();
        self.body = body_stream(response);
        self.items.clear();
    }
}

/// How relaying an answer's event stream stopped.
pub(super) enum SseEnd {
    /// Every request waited on is answered (or, on the standalone stream, it ended).
    Answered,
    /// A bridged stream's upstream sent its client a request (this whole message): it was
    /// not relayed, and the rest of the answer waits in the body until it is answered.
    Asked(Bytes, Box<EventBody>),
}

/// How one SSE response body ended.
enum BodyEnd {
    /// Every request it was waited on for is answered.
    Answered,
    /// The upstream asked its client something (bridged streams).
    Asked(Bytes),
    /// It ended, broken when `failure` says why; `sent` bytes of an unfinished message had
    /// already gone on as pieces.
    Ended {
        failure: Option<String>,
        sent: usize,
    },
}

/// One SSE event's data on its way to the relay: held while it is at most [`PIECE_BYTES`]
/// (nearly every message, sent whole as before), else passed on in pieces as it arrives, never
/// more than about one piece held. The whole message stays within `max_answer` (within the
/// frame limit on the standalone stream, which carries no pieces, and on a stream whose
/// answers are rewritten whole: see [`StreamContext::rewrites_answers`]).
struct Assembling {
    exchange: u64,
    max_frame: usize,
    max_answer: usize,
    /// Whether messages may go in pieces.
    pieces: bool,
    /// Whether a whole request the upstream sends its client is held back (bridged streams).
    intercepts: bool,
    head: bytes::BytesMut,
    /// Bytes already passed on as pieces.
    sent: usize,
    /// Scans the pieces for the id the message answers (once it goes in pieces).
    scanner: Option<ResponseScanner>,
}

/// A message [`Assembling`] finished.
#[derive(Default)]
struct Finished {
    /// The message, when it went whole.
    whole: Option<Bytes>,
    /// The id it answers, when it went in pieces and is a response.
    answers: Option<String>,
    /// The message, when it is a request to the client held back (not sent).
    asked: Option<Bytes>,
}

impl Assembling {
    fn new(exchange: u64, context: &StreamContext) -> Self {
        Self {
            exchange,
            max_frame: context.max_frame,
            max_answer: context.max_answer.max(context.max_frame),
            pieces: exchange != UNSOLICITED && !context.rewrites_answers(),
            intercepts: exchange != UNSOLICITED && context.is_bridged(),
            head: bytes::BytesMut::new(),
            sent: 0,
            scanner: None,
        }
    }

    fn limit(&self) -> usize {
        if !self.pieces {
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
        if !self.pieces {
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
            None if self.intercepts && is_request(&last) => Ok(Some(Finished {
                asked: Some(last),
                ..Finished::default()
            })),
            None => {
                context
                    .send(Frame::message(self.exchange, last.clone()))
                    .await;
                Ok(Some(Finished {
                    whole: Some(last),
                    ..Finished::default()
                }))
            }
            Some(mut scanner) => {
                scanner.feed(&last);
                context.send(Frame::message(self.exchange, last)).await;
                let answers = scanner
                    .facts()
                    .and_then(|facts| facts.id.as_deref().map(str::to_owned));
                Ok(Some(Finished {
                    answers,
                    ..Finished::default()
                }))
            }
        }
    }
}

/// Whether `message` is a single JSON-RPC request.
fn is_request(message: &[u8]) -> bool {
    matches!(classify(message), Ok(crate::mcp::Classified::Single(m)) if m.kind == MessageKind::Request)
}

/// A request id as a lookup key: its JSON text, trimmed.
pub(super) fn id_key(id: &serde_json::value::RawValue) -> String {
    id.get().trim().to_owned()
}

/// Removes from `pending` the ids `message` answers.
pub(super) fn answered(message: &[u8], pending: &mut HashSet<String>) {
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
