//! Session era: one child process per tunnel stream (one agent session), its stdout routed
//! back to the exchange of the request each line answers, stopped when the session ends, dies,
//! idles out, or gives its place to a new session at the cap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::process::ChildStdout;
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;

use super::lines::{Line, LineDecoder, one_line, quote};
use super::process::Process;
use super::slots::{Activity, Lease, pending};
use super::{DRAIN_WAIT, StdioError, StdioSource};
use crate::client::sources::routing::{Routing, progress_tokens};
use crate::client::sources::stream::{Inbound, fail_pending, fail_requests, requests};
use crate::client::sources::{Out, send_message};
use crate::mcp::classify;
use crate::mcp::jsonrpc::MessageInfo;
use crate::wire::{Frame, OpenHeader};

impl StdioSource {
    /// Session era: one process for the whole stream.
    pub(super) async fn serve_session(
        self: Arc<Self>,
        header: OpenHeader,
        mut inbound: Inbound,
        out: Out,
        limit: usize,
    ) {
        match self.spawn(limit, &header.context).await {
            Ok(process) => {
                Session::start(self, process, header.context, limit, out)
                    .serve(&mut inbound)
                    .await;
            }
            Err(error) => {
                tracing::warn!(source = %self.name, context = %header.context, %error, "session refused");
                inbound.refuse(&out, error.code(), &error.to_string()).await;
            }
        }
    }
}

/// One session's process, and what routes its answers back.
struct Session {
    source: Arc<StdioSource>,
    /// The stream's trace context, for logs.
    context: String,
    process: Process,
    /// Reads the process's stdout (see [`route_session_output`]).
    stdout_task: Option<JoinHandle<()>>,
    routing: Arc<Mutex<Routing>>,
    /// Whether answers are announced as event streams (see [`announces_streams`]).
    primed: Arc<AtomicBool>,
    activity: Activity,
    out: Out,
}

impl Session {
    /// Starts routing the output of `process`, which serves the stream `out` writes to.
    fn start(
        source: Arc<StdioSource>,
        mut process: Process,
        context: String,
        frame_limit: usize,
        out: Out,
    ) -> Self {
        let routing = Arc::new(Mutex::new(Routing::default()));
        let primed = Arc::new(AtomicBool::new(false));
        let activity = Activity::default();
        let stdout_task = process.stdout.take().map(|stdout| {
            tokio::spawn(route_session_output(
                stdout,
                OutputLimits {
                    line: process.line_limit,
                    frame: frame_limit,
                },
                source.name.clone(),
                routing.clone(),
                out.clone(),
                primed.clone(),
                activity.clone(),
            ))
        });
        Self {
            source,
            context,
            process,
            stdout_task,
            routing,
            primed,
            activity,
            out,
        }
    }

    /// Serves the stream until the session is over, then ends it as its end requires.
    async fn serve(self, inbound: &mut Inbound) {
        let lease = self
            .source
            .slots
            .lease(self.activity.clone(), self.routing.clone());
        let ended = self.run(inbound, &lease).await;
        drop(lease);
        match ended {
            Ended::Stream => self.stream_ended(),
            Ended::Crashed => self.crashed().await,
            Ended::Reclaimed(why) => self.reclaimed(why, inbound).await,
        }
    }

    /// Forwards the stream's messages to the process until the stream ends, the process dies,
    /// or its place is reclaimed (the session idled out, or a new session took it at the cap).
    async fn run(&self, inbound: &mut Inbound, lease: &Lease) -> Ended {
        let (source, activity, exit) = (&self.source, &self.activity, &self.process.exit);
        loop {
            let idle_until = tokio::time::Instant::from_std(activity.last() + source.idle);
            let frame = tokio::select! {
                frame = inbound.next_message_with(|_| activity.touch()) => frame,
                () = exit.dead.cancelled() => return Ended::Crashed,
                () = lease.reclaim.cancelled() => return Ended::Reclaimed(format!(
                    "the source runs its limit of {} processes and a new session took the place of this one, the least recently used idle one",
                    source.slots.cap
                )),
                () = tokio::time::sleep_until(idle_until), if !source.idle.is_zero() => {
                    if pending(&self.routing) {
                        // A slow request is not idleness: look again a whole period later.
                        activity.touch();
                        continue;
                    }
                    return Ended::Reclaimed(format!(
                        "it was idle for {} s (session_idle_secs)",
                        source.idle.as_secs()
                    ));
                }
            };
            activity.touch();
            let Some(frame) = frame else {
                return Ended::Stream;
            };
            if !self.message(frame.exchange, frame.payload).await {
                return Ended::Crashed;
            }
        }
    }

    /// Forwards one message to the process; false when the process died. Once the session
    /// is primed, a request's answer is announced as an event stream at once (see
    /// [`announces_streams`]).
    async fn message(&self, exchange: u64, payload: Bytes) -> bool {
        let (process, out) = (&self.process, &self.out);
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
        let recorded = if requests.is_empty() {
            Ok(())
        } else {
            let tokens = progress_tokens(&payload);
            self.routing.lock().record(exchange, &requests, &tokens)
        };
        if let Err(duplicate) = recorded {
            let error = self.source.error(format!(
                "request id {duplicate} is already in use in this session"
            ));
            error.answer_all(out, exchange, &classified).await;
            return true;
        }
        if self.primed.load(Ordering::Relaxed) && !requests.is_empty() {
            // Before the request reaches the child, so before any line of its answer.
            let _ = out.send(Frame::streaming(exchange)).await;
        }
        let line = one_line(payload);
        let delivered = match &process.stdin {
            Some(stdin) => tokio::select! {
                sent = stdin.send(line) => sent.is_ok(),
                () = process.exit.dead.cancelled() => false,
            },
            None => false,
        };
        if requests.is_empty() {
            // Notifications and responses have no answer to wait for.
            let _ = out.send(Frame::end(exchange)).await;
        }
        // A failed delivery means the child is gone: its exit answers the pending requests.
        delivered || !process.exit.dead.is_cancelled()
    }

    /// The stream ended: the process stops.
    fn stream_ended(mut self) {
        if let Some(task) = self.stdout_task.take() {
            // Nobody is left to read its answers; closing its stdout speeds its end.
            task.abort();
        }
        tracing::debug!(source = %self.source.name, pid = self.process.pid, context = %self.context, "session ended");
    }

    /// The process died: what it printed before dying reaches the agent, then every request
    /// still pending fails and the stream closes.
    async fn crashed(mut self) {
        if let Some(task) = self.stdout_task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(DRAIN_WAIT, task).await.is_err() {
                abort.abort();
            }
        }
        let status = self.process.exit.wait().await;
        tracing::warn!(source = %self.source.name, pid = self.process.pid, context = %self.context, %status, "stdio process exited during its session");
        let error = self.source.exited(status);
        let reason = error.to_string();
        fail_pending(&self.out, &self.routing, error.code(), &reason).await;
        let _ = self.out.send(Frame::close(reason)).await;
        tracing::debug!(source = %self.source.name, pid = self.process.pid, context = %self.context, "session ended");
    }

    /// The process was stopped to free its place: the agent learns why (see
    /// [`serve_reclaimed`]).
    async fn reclaimed(mut self, why: String, inbound: &mut Inbound) {
        tracing::info!(source = %self.source.name, pid = self.process.pid, context = %self.context, %why, "stdio process of a session stopped to free its place");
        if let Some(task) = self.stdout_task.take() {
            task.abort();
        }
        let Session {
            source,
            process,
            routing,
            out,
            ..
        } = self;
        drop(process);
        let error = StdioError::Reclaimed {
            source_name: source.name.to_string(),
            why,
        };
        serve_reclaimed(inbound, &out, &routing, &error).await;
    }
}

/// How a session's loop ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The tunnel stream ended (the session is over).
    Stream,
    /// The process died.
    Crashed,
    /// The process was stopped to free its place; the text says why.
    Reclaimed(String),
}

/// After its process was reclaimed, a session's stream answers its next request with
/// `error` (and any request still pending), then ends: the agent learns why, and its
/// session is over.
async fn serve_reclaimed(
    inbound: &mut Inbound,
    out: &Out,
    routing: &Mutex<Routing>,
    error: &StdioError,
) {
    let (code, reason) = (error.code(), error.to_string());
    if !fail_pending(out, routing, code, &reason).await {
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

/// How large what a session's process prints may be: one line (bounded by the answer limit)
/// and one frame (larger lines cross the tunnel in pieces).
#[derive(Debug, Clone, Copy)]
struct OutputLimits {
    line: usize,
    frame: usize,
}

/// Reads a session's child's stdout and sends each message to its exchange.
async fn route_session_output(
    stdout: ChildStdout,
    limits: OutputLimits,
    source: Arc<str>,
    routing: Arc<Mutex<Routing>>,
    out: Out,
    primed: Arc<AtomicBool>,
    activity: Activity,
) {
    let mut lines = FramedRead::new(stdout, LineDecoder::new(limits.line));
    while let Some(Ok(line)) = lines.next().await {
        let line = match line {
            Line::Text(line) => line,
            Line::TooLong => {
                tracing::warn!(source = %source, limit = limits.line, "stdio process printed a message larger than max_answer_bytes; dropped");
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
        if send_message(&out, exchange, line, limits.frame, &source)
            .await
            .is_err()
        {
            return;
        }
        for exchange in ended {
            let _ = out.send(Frame::end(exchange)).await;
        }
    }
}
