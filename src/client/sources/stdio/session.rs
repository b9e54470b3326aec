//! Session era: one child process per agent session, held by `connect` past the tunnel stream
//! that opened it (see `sources::held`). Every stream that carries the session (one per relay
//! its agent's requests reach) forwards its messages to the process, and each line the process
//! prints goes back on the stream of the request it answers (`sources::streams`). The process
//! stops when the agent ends the session, when no stream has carried it for the idle time, when
//! it dies, or when it gives its place to a new session at the cap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::process::ChildStdout;
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::deliver::Delivery;
use super::lines::{Line, LineDecoder, one_line, quote};
use super::process::{Exit, Process};
use super::slots::{Activity, Lease, pending};
use super::{DRAIN_WAIT, StdioError, StdioSource};
use crate::client::sources::Out;
use crate::client::sources::routing::{Routing, cancelled_request, progress_tokens};
use crate::client::sources::stream::{Inbound, fail_requests, requests};
use crate::client::sources::streams::{StreamNo, global};
use crate::mcp::jsonrpc::MessageInfo;
use crate::mcp::{Classified, classify};
use crate::wire::{Frame, FrameKind, OpenHeader, Resumable};

impl StdioSource {
    /// Session era: the stream opens a session (a new process) or resumes the one held under
    /// its handle, and carries it until the stream ends.
    pub(super) async fn serve_session(
        self: Arc<Self>,
        header: OpenHeader,
        mut inbound: Inbound,
        out: Out,
        (limit, numbered): (usize, bool),
    ) {
        let named = header
            .session
            .as_ref()
            .filter(|s| s.handle.len() <= crate::client::sources::held::MAX_HANDLE_LEN);
        let session = match named {
            Some(named) if named.resume => match self.held.attach(&named.handle) {
                Some(session) if !session.over.is_cancelled() => session,
                found => {
                    if found.is_some() {
                        self.held.detach(&named.handle, Instant::now());
                    }
                    let reason = format!(
                        "session not found: the stdio session with source {} has ended",
                        self.name
                    );
                    let _ = out.send(Frame::close(reason)).await;
                    return;
                }
            },
            _ => match self.spawn(limit, &header.context).await {
                Ok(process) => {
                    let handle = named.map(|n| n.handle.clone());
                    let session =
                        Session::start(self.clone(), process, header.context, handle, limit);
                    if let Some(handle) = &session.handle {
                        for displaced in self.held.insert(handle, session.clone(), Instant::now()) {
                            displaced.end();
                        }
                    }
                    session
                }
                Err(error) => {
                    tracing::warn!(source = %self.name, context = %header.context, %error, "session refused");
                    inbound.refuse(&out, error.code(), &error.to_string()).await;
                    return;
                }
            },
        };
        if session.handle.is_some() {
            // First of all: a new session's relay seals it into the agent's session id, a
            // resuming relay waits for it. Only this `connect` holds the process.
            let resumable = Resumable {
                upstream_session: None,
                portable: false,
            };
            let _ = out
                .send(Frame::json(FrameKind::Resumable, &resumable))
                .await;
        }
        let number = session.delivery.outlet.streams.attach(&out, numbered);
        // The relay's number for this stream (wire version 3): a held session keeps its
        // answers under it, for a replay on another stream.
        let relay_stream = named
            .and_then(|named| named.stream)
            .filter(|_| session.handle.is_some());
        if relay_stream.is_some() {
            inbound.replays_answers();
        }
        session
            .carry((number, relay_stream), &mut inbound, &out)
            .await;
        match &session.handle {
            Some(handle) if !inbound.closed_by_relay() && !session.over.is_cancelled() => {
                // The stream ended, not the session: a relay may resume it.
                self.held.detach(handle, Instant::now());
            }
            _ => session.end(),
        }
    }
}

/// Why a session is over.
#[derive(Debug, Clone)]
enum Over {
    /// The process died; the text says how.
    Crashed(String),
    /// The process was stopped to free its place, or idled out.
    Reclaimed(String),
    /// The agent ended it, or no stream carried it for the idle time.
    Ended,
}

/// One session's process, what routes its answers back, and the streams carrying it.
pub(super) struct Session {
    source: Arc<StdioSource>,
    /// The opening stream's trace context, for logs.
    context: String,
    /// The handle it is held under (`None`: it ends with its one stream).
    handle: Option<String>,
    process: Mutex<Option<Process>>,
    pid: u32,
    exit: Exit,
    stdout_task: Mutex<Option<JoinHandle<()>>>,
    routing: Arc<Mutex<Routing>>,
    /// Where its answers and messages go (and what is kept of them).
    delivery: Arc<Delivery>,
    /// Whether answers are announced as event streams (see [`announces_streams`]).
    primed: Arc<AtomicBool>,
    activity: Activity,
    /// Asked to end (the agent ended it, or it expired).
    stop: CancellationToken,
    /// Cancelled once it is over; [`Session::over_reason`] says why.
    over: CancellationToken,
    reason: Mutex<Option<Over>>,
}

impl Session {
    /// Starts routing the output of `process` and watching over it.
    fn start(
        source: Arc<StdioSource>,
        mut process: Process,
        context: String,
        handle: Option<String>,
        frame_limit: usize,
    ) -> Arc<Self> {
        let routing = Arc::new(Mutex::new(Routing::default()));
        let primed = Arc::new(AtomicBool::new(false));
        let activity = Activity::default();
        let delivery = Arc::new(Delivery::new(
            source.name.clone(),
            frame_limit,
            handle.is_some(),
            source.replay_bytes.clone(),
        ));
        let stdout_task = process.stdout.take().map(|stdout| {
            tokio::spawn(route_session_output(
                stdout,
                process.line_limit,
                source.name.clone(),
                routing.clone(),
                delivery.clone(),
                primed.clone(),
                activity.clone(),
            ))
        });
        let lease = source.slots.lease(activity.clone(), routing.clone());
        let session = Arc::new(Self {
            pid: process.pid,
            exit: process.exit.clone(),
            process: Mutex::new(Some(process)),
            source,
            context,
            handle,
            stdout_task: Mutex::new(stdout_task),
            routing,
            delivery,
            primed,
            activity,
            stop: CancellationToken::new(),
            over: CancellationToken::new(),
            reason: Mutex::new(None),
        });
        tokio::spawn(session.clone().watch(lease));
        session
    }

    /// Asks the session to end (its process stops).
    pub(super) fn end(&self) {
        self.stop.cancel();
    }

    /// Why it is over, once it is.
    fn over_reason(&self) -> Option<Over> {
        self.reason.lock().clone()
    }

    /// Watches over the process until the session is over, then ends it as its end requires.
    async fn watch(self: Arc<Self>, lease: Lease) {
        let source = self.source.clone();
        let over = loop {
            let idle_until = tokio::time::Instant::from_std(self.activity.last() + source.idle);
            tokio::select! {
                () = self.exit.dead.cancelled() => break Over::Crashed(String::new()),
                () = self.stop.cancelled() => break Over::Ended,
                () = lease.reclaim.cancelled() => break Over::Reclaimed(format!(
                    "the source runs its limit of {} processes and a new session took the place of this one, the least recently used idle one",
                    source.slots.cap
                )),
                () = tokio::time::sleep_until(idle_until), if !source.idle.is_zero() => {
                    if pending(&self.routing) {
                        // A slow request is not idleness: look again a whole period later.
                        self.activity.touch();
                        continue;
                    }
                    break Over::Reclaimed(format!(
                        "it was idle for {} s (session_idle_secs)",
                        source.idle.as_secs()
                    ));
                }
            }
        };
        drop(lease);
        let over = match over {
            Over::Crashed(_) => Over::Crashed(self.crashed().await),
            other => {
                if let Some(task) = self.stdout_task.lock().take() {
                    // Nobody is left to read its answers; closing its stdout speeds its end.
                    task.abort();
                }
                self.process.lock().take();
                other
            }
        };
        match &over {
            Over::Crashed(reason) => {
                tracing::warn!(source = %source.name, pid = self.pid, context = %self.context, %reason, "stdio process exited during its session");
            }
            Over::Reclaimed(why) => {
                tracing::info!(source = %source.name, pid = self.pid, context = %self.context, %why, "stdio process of a session stopped to free its place");
            }
            Over::Ended => {
                tracing::debug!(source = %source.name, pid = self.pid, context = %self.context, "session ended");
            }
        }
        *self.reason.lock() = Some(over.clone());
        if let Some(handle) = &self.handle {
            source.held.remove(handle, Instant::now());
        }
        match over {
            Over::Crashed(reason) => {
                let code = source.exited(String::new()).code();
                self.fail_pending(code, &reason).await;
                for out in self.delivery.outlet.streams.all() {
                    let _ = out.send(Frame::close(reason.clone())).await;
                }
            }
            Over::Reclaimed(why) => {
                let error = StdioError::Reclaimed {
                    source_name: source.name.to_string(),
                    why,
                };
                self.fail_pending(error.code(), &error.to_string()).await;
            }
            Over::Ended => {}
        }
        self.over.cancel();
    }

    /// The process died: what it printed before dying reaches the agent; returns the error
    /// text naming how it ended.
    async fn crashed(&self) -> String {
        let task = self.stdout_task.lock().take();
        if let Some(task) = task {
            let abort = task.abort_handle();
            if tokio::time::timeout(DRAIN_WAIT, task).await.is_err() {
                abort.abort();
            }
        }
        let status = self.exit.wait().await;
        self.process.lock().take();
        self.source.exited(status).to_string()
    }

    /// Fails every request still pending, each on the stream it came in on.
    async fn fail_pending(&self, code: i64, reason: &str) {
        let pending = self.routing.lock().take_all();
        for (exchange, ids) in pending {
            self.delivery.fail(exchange, ids, code, reason).await;
        }
    }

    /// Carries the session on one stream (`number`, the relay's `relay_stream`, writing to
    /// `out`) until the stream ends or the session is over.
    async fn carry(
        &self,
        (number, relay_stream): (StreamNo, Option<u64>),
        inbound: &mut Inbound,
        out: &Out,
    ) {
        loop {
            let frame = tokio::select! {
                frame = inbound.next_message_with(|frame| {
                    self.activity.touch();
                    if matches!(frame.kind, FrameKind::Listen | FrameKind::Replay) {
                        self.delivery.outlet.signal(number, out, frame);
                    }
                }) => frame,
                () = self.over.cancelled() => break,
            };
            self.activity.touch();
            let Some(frame) = frame else {
                return;
            };
            if !self
                .message((number, relay_stream), out, frame.exchange, frame.payload)
                .await
            {
                // The process died: `watch` answers what is pending and closes the stream.
                self.over.cancelled().await;
                return;
            }
        }
        match self.over_reason() {
            Some(Over::Reclaimed(why)) => {
                let error = StdioError::Reclaimed {
                    source_name: self.source.name.to_string(),
                    why,
                };
                serve_reclaimed(inbound, out, &error).await;
            }
            Some(Over::Ended) => {
                let _ = out
                    .send(Frame::close(format!(
                        "the session with source {} has ended",
                        self.source.name
                    )))
                    .await;
            }
            // Closed by `watch`, with the reason.
            Some(Over::Crashed(_)) | None => {}
        }
    }

    /// Forwards one message of stream `number` to the process; false when the process died.
    /// Once the session is primed, a request's answer is announced as an event stream at once
    /// (see [`announces_streams`]).
    async fn message(
        &self,
        (number, relay_stream): (StreamNo, Option<u64>),
        out: &Out,
        exchange: u64,
        payload: Bytes,
    ) -> bool {
        let classified = match classify(&payload) {
            Ok(classified) => classified,
            Err(e) => {
                // The relay forwards only classified messages; nothing to send the child.
                tracing::warn!(source = %self.source.name, error = %e, "unparsable message from the relay dropped");
                let _ = out.send(Frame::end(exchange)).await;
                return true;
            }
        };
        let requests: Vec<&MessageInfo> = requests(&classified).collect();
        let session_wide = global(number, exchange);
        let recorded = if requests.is_empty() {
            Ok(())
        } else if let Some(session_wide) = session_wide {
            let tokens = progress_tokens(&payload);
            self.routing.lock().record(session_wide, &requests, &tokens)
        } else {
            let error = self.source.error("the stream numbered too many exchanges");
            error.answer_all(out, exchange, &classified).await;
            return true;
        };
        if let Err(duplicate) = recorded {
            let error = self.source.error(format!(
                "request id {duplicate} is already in use in this session"
            ));
            error.answer_all(out, exchange, &classified).await;
            return true;
        }
        if let (Some(session_wide), false) = (session_wide, requests.is_empty()) {
            let ids = requests.iter().filter_map(|m| m.id.clone()).collect();
            self.delivery
                .begin(session_wide, (relay_stream, exchange), &payload, ids, out);
            if self.primed.load(Ordering::Relaxed) {
                // Before the request reaches the child, so before any line of its answer.
                self.delivery
                    .send(session_wide, Frame::streaming(exchange))
                    .await;
            }
        }
        // A cancelled request gets no answer from the server: its answer ends once the
        // cancellation is forwarded.
        let cancels = match &classified {
            Classified::Single(info)
                if info.method.as_deref() == Some("notifications/cancelled") =>
            {
                cancelled_request(&payload)
            }
            _ => None,
        };
        let line = one_line(payload);
        // A clone of the sender only for this send: the child's stdin closes with the process.
        let stdin = self
            .process
            .lock()
            .as_ref()
            .and_then(|process| process.stdin.clone());
        let delivered = match stdin {
            Some(stdin) => tokio::select! {
                sent = stdin.send(line) => sent.is_ok(),
                () = self.exit.dead.cancelled() => false,
            },
            None => false,
        };
        if requests.is_empty() {
            // Notifications and responses have no answer to wait for.
            let _ = out.send(Frame::end(exchange)).await;
        }
        if let Some(id) = cancels {
            let cancelled = self.routing.lock().cancel(&id);
            if let Some((exchange, true)) = cancelled {
                self.delivery.end(exchange).await;
            }
        }
        // A failed delivery means the child is gone: its exit answers the pending requests.
        delivered || !self.exit.dead.is_cancelled()
    }
}

/// After its process was reclaimed, a stream of the session answers its next request with
/// `error`, then ends: the agent learns why, and its session is over. (Requests pending at
/// that moment were answered already.)
async fn serve_reclaimed(inbound: &mut Inbound, out: &Out, error: &StdioError) {
    let (code, reason) = (error.code(), error.to_string());
    loop {
        let Some(frame) = inbound.next_message().await else {
            return;
        };
        let Ok(classified) = classify(&frame.payload) else {
            let _ = out.send(Frame::end(frame.exchange)).await;
            continue;
        };
        if requests(&classified).next().is_none() {
            let _ = out.send(Frame::end(frame.exchange)).await;
            continue;
        }
        fail_requests(out, frame.exchange, &classified, code, &reason).await;
        break;
    }
    let _ = out.send(Frame::close(reason)).await;
}

/// Whether a session whose `initialize` answer is `line` has its answers announced as event
/// streams: from protocol version 2025-11-25 on, an agent expects a POST's stream to open at
/// once with a priming event (an event id it can resume from), so an answer the child takes
/// its time over is not lost when the agent's connection drops before it. An HTTP upstream
/// decides that itself (its response headers say `text/event-stream`); a stdio child has no
/// headers, so `connect` announces the stream as soon as the request is forwarded, and the
/// relay primes it.
fn announces_streams(line: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Init {
        result: Option<Settled>,
    }
    #[derive(Deserialize)]
    struct Settled {
        #[serde(rename = "protocolVersion")]
        protocol_version: String,
    }
    match serde_json::from_slice::<Init>(line) {
        Ok(Init {
            result: Some(settled),
        }) => settled.protocol_version.as_str() >= crate::mcp::era::PRIMED_STREAMS_SINCE,
        _ => false,
    }
}

/// Reads a session's child's stdout and sends each message to its exchange, on the stream that
/// exchange came in on (server-initiated ones to the stream the agent listens on).
async fn route_session_output(
    stdout: ChildStdout,
    line_limit: usize,
    source: Arc<str>,
    routing: Arc<Mutex<Routing>>,
    delivery: Arc<Delivery>,
    primed: Arc<AtomicBool>,
    activity: Activity,
) {
    let mut lines = FramedRead::new(stdout, LineDecoder::new(line_limit));
    while let Some(Ok(line)) = lines.next().await {
        let line = match line {
            Line::Text(line) => line,
            Line::TooLong => {
                tracing::warn!(source = %source, limit = line_limit, "stdio process printed a message larger than max_answer_bytes; dropped");
                continue;
            }
        };
        let (classified, raw) = match (classify(&line), serde_json::from_slice::<&RawValue>(&line))
        {
            (Ok(classified), Ok(raw)) => (classified, raw),
            _ => {
                tracing::warn!(source = %source, line = %quote(&line), "stdio process printed a line that is not JSON-RPC; dropped");
                continue;
            }
        };
        activity.touch();
        let (exchange, ended) = routing.lock().target(&classified, raw);
        if !primed.load(Ordering::Relaxed)
            && line.windows(16).any(|w| w == b"protocolVersion\"")
            && announces_streams(&line)
        {
            primed.store(true, Ordering::Relaxed);
        }
        // A stream gone mid-answer loses only that answer (unless it is kept), not the
        // session.
        delivery.message(exchange, line).await;
        for exchange in ended {
            delivery.end(exchange).await;
        }
    }
}
