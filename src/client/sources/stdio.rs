//! A stdio upstream: an MCP server that `connect` runs as a child process.
//!
//! Session era: every tunnel stream (one agent session) gets its own child process, in its own
//! process group, started when the stream opens and stopped when the stream ends (stdin closed,
//! then SIGKILL to the whole group after a short grace) and reaped. Messages from the relay go
//! to the child's stdin, one JSON text per line; every line the child prints on stdout is a
//! JSON-RPC message that goes back tagged with the exchange of the request it answers. A
//! progress notification goes with the request whose token it carries; any other message of
//! the server goes with the only request in flight when there is exactly one, else to the
//! agent's standalone stream. The child's stderr goes to the log, line by line, never to the
//! relay. If the child dies during its session, every pending request gets a JSON-RPC error
//! naming the source and the session ends.
//!
//! Stateless 2026-07-28 requests share one long-lived process per source, started lazily and
//! initialized by `connect` itself in the session era the server speaks (a stdio server may not
//! know 2026-07-28). Each request travels with an id (and progress token) that `connect`
//! assigns, so answers of concurrent agents never mix; the answer goes back with the agent's
//! own id.
//!
//! Every child is registered with its source; `connect` kills and reaps all of them when it
//! stops ([`StdioSource::shutdown`]), and a per-source cap bounds how many run at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::CancellationToken;

use super::routing::{Probe, Routing, cancelled_request, key, progress_tokens};
use super::start_writer;
use crate::mcp::jsonrpc::{MessageInfo, MessageKind, codes, error_body};
use crate::mcp::{Classified, classify};
use crate::transport::{RecvHalf, SendHalf};
use crate::wire::{Era, Frame, FrameKind, FrameReader, FrameWriter, OpenHeader};

/// Default cap on the processes one stdio source runs at once (see
/// [`crate::config::DEFAULT_STDIO_MAX_PROCESSES`]).
pub const DEFAULT_MAX_PROCESSES: usize = crate::config::DEFAULT_STDIO_MAX_PROCESSES;

/// Default time a session's process lives idle (see [`crate::config::DEFAULT_STDIO_IDLE_SECS`]).
pub const DEFAULT_IDLE: Duration = Duration::from_secs(crate::config::DEFAULT_STDIO_IDLE_SECS);

/// Time a new session at the cap waits for the process it reclaimed to be reaped.
const RECLAIM_WAIT: Duration = Duration::from_secs(10);

/// How a stdio source bounds its processes (`connect`'s `stdio_max_processes` and
/// `stdio_idle_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StdioLimits {
    /// Processes one source runs at once.
    pub max_processes: usize,
    /// Idle time after which a session's process is stopped; zero: never.
    pub idle: Duration,
}

impl Default for StdioLimits {
    fn default() -> Self {
        Self {
            max_processes: DEFAULT_MAX_PROCESSES,
            idle: DEFAULT_IDLE,
        }
    }
}

/// Time a child has to exit by itself once its stdin is closed, before its process group gets
/// SIGKILL. The MCP stdio transport asks clients to close stdin first and give the server a
/// moment to clean up (close database connections, remove temporary files).
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Time `connect`'s shutdown waits for its killed children to be reaped.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Time the last lines of a child that exited may take to be read, before its pending
/// requests are failed: whatever it printed before dying still reaches the agent.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// Time a pooled process has to answer `connect`'s own `initialize`.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Time the relay has to send the first message on a stream this source refuses.
const REFUSE_WAIT: Duration = Duration::from_secs(10);

/// Lines queued toward a child's stdin before the tunnel reader waits (backpressure on the
/// agent, never on the child's stdout, so the two pipes cannot deadlock).
const STDIN_QUEUE: usize = 64;

/// Longest stderr line logged; a longer one is logged cut to this length.
const STDERR_LINE_LIMIT: usize = 8 * 1024;

/// The protocol version `connect` asks a pooled process for: the newest session-era version.
/// Servers that only know older ones answer with theirs, as the handshake allows.
const POOLED_PROTOCOL_VERSION: &str = "2025-11-25";

/// The prefix of `connect`'s own environment variables (its tunnel token among them); none of
/// them reaches a child.
const OWN_ENV_PREFIX: &str = "MCP_TUNNEL_";

/// Why a stdio source could not serve a message, in words for the agent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StdioError {
    /// The source already runs as many processes as it may.
    #[error(
        "source {source_name} already runs its limit of {cap} processes (one per session); \
         end a session or retry later"
    )]
    CapReached {
        /// The source.
        source_name: String,
        /// Its cap.
        cap: usize,
    },
    /// The command could not be started.
    #[error("source {source_name} could not start {command:?}: {reason}")]
    Spawn {
        /// The source.
        source_name: String,
        /// The program.
        command: String,
        /// The operating system's reason.
        reason: String,
    },
    /// The process ended while requests were pending.
    #[error("source {source_name} exited: {status}")]
    Exited {
        /// The source.
        source_name: String,
        /// How it ended (`exit status: 3`, `signal: 9 (SIGKILL)`).
        status: String,
    },
    /// The pooled process did not complete its `initialize`.
    #[error("source {source_name} did not initialize: {reason}")]
    Init {
        /// The source.
        source_name: String,
        /// Why.
        reason: String,
    },
    /// `connect` is stopping and starts no more processes.
    #[error("source {source_name} is shutting down")]
    ShuttingDown {
        /// The source.
        source_name: String,
    },
    /// The session's process was stopped to free its place; the session is over.
    #[error("source {source_name} stopped this session's process: {why}; start a new session")]
    Reclaimed {
        /// The source.
        source_name: String,
        /// Why: idle too long, or its place went to a new session.
        why: String,
    },
    /// A message could not be forwarded as asked.
    #[error("source {source_name}: {reason}")]
    Unsupported {
        /// The source.
        source_name: String,
        /// Why.
        reason: String,
    },
}

impl StdioError {
    fn code(&self) -> i64 {
        match self {
            StdioError::Unsupported { .. } => codes::INVALID_REQUEST,
            _ => codes::SOURCE_UNAVAILABLE,
        }
    }
}

/// A configured stdio upstream.
pub struct StdioSource {
    name: Arc<str>,
    command: Vec<String>,
    /// Idle time after which a session's process is stopped; zero: never.
    idle: Duration,
    registry: Arc<Registry>,
    pool: tokio::sync::Mutex<Option<Arc<Pooled>>>,
    /// The largest answer line read from a child (`max_answer_bytes`). A line is buffered
    /// whole (bounded by this) because its id must be read to route it, then sent on in
    /// pieces when it is larger than one.
    max_answer: usize,
}

impl StdioSource {
    /// A source `name` that runs `command` (program, then arguments), with the default cap.
    pub fn new(name: &str, command: Vec<String>) -> Result<Self, String> {
        Self::with_max_processes(name, command, DEFAULT_MAX_PROCESSES)
    }

    /// A source `name` that runs `command` and at most `cap` processes at once.
    pub fn with_max_processes(
        name: &str,
        command: Vec<String>,
        cap: usize,
    ) -> Result<Self, String> {
        Self::with_limits(
            name,
            command,
            StdioLimits {
                max_processes: cap,
                ..StdioLimits::default()
            },
        )
    }

    /// A source `name` that runs `command` within `limits`.
    pub fn with_limits(
        name: &str,
        command: Vec<String>,
        limits: StdioLimits,
    ) -> Result<Self, String> {
        let cap = limits.max_processes;
        if command.first().is_none_or(|program| program.is_empty()) {
            return Err(format!("source {name}: stdio needs a command"));
        }
        if cap == 0 {
            return Err(format!("source {name}: the process cap must be at least 1"));
        }
        Ok(Self {
            name: name.into(),
            command,
            idle: limits.idle,
            registry: Arc::new(Registry::new(cap)),
            pool: tokio::sync::Mutex::new(None),
            max_answer: crate::config::DEFAULT_MAX_ANSWER_BYTES,
        })
    }

    /// Sets the largest answer line read from a child (`max_answer_bytes`).
    pub fn with_answer_limit(mut self, max_answer: usize) -> Self {
        self.max_answer = max_answer;
        self
    }

    /// Processes of this source alive now (started and not yet reaped).
    pub fn live_processes(&self) -> usize {
        self.registry.live()
    }

    /// Kills every process of this source (SIGKILL to each process group), refuses to start
    /// new ones, and waits (bounded) until all are reaped.
    pub async fn shutdown(&self) {
        self.registry.close_and_kill();
        if let Ok(mut pool) = tokio::time::timeout(SHUTDOWN_WAIT, self.pool.lock()).await {
            pool.take();
        }
        if tokio::time::timeout(SHUTDOWN_WAIT, self.registry.idle())
            .await
            .is_err()
        {
            tracing::warn!(source = %self.name, live = self.registry.live(), "stdio processes still running after shutdown");
        }
    }

    /// Serves one exchange stream until it ends.
    pub async fn serve(
        self: Arc<Self>,
        header: OpenHeader,
        reader: FrameReader<RecvHalf>,
        writer: FrameWriter<SendHalf>,
    ) {
        match header.era {
            Era::Session => self.serve_session(header, reader, writer).await,
            Era::Stateless => self.serve_stateless(header, reader, writer).await,
        }
    }

    /// Starts one child process; at the cap, the process of the least recently used idle
    /// session makes room for it.
    async fn spawn(&self, line_limit: usize, context: &str) -> Result<Process, StdioError> {
        let mut slot = self.registry.reserve_or_reclaim(&self.name).await?;
        let program = &self.command[0];
        let mut command = Command::new(program);
        command
            .args(&self.command[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for key in own_env_keys(std::env::vars_os().map(|(key, _)| key)) {
            command.env_remove(key);
        }
        let spawn_error = |reason: String| StdioError::Spawn {
            source_name: self.name.to_string(),
            command: program.clone(),
            reason,
        };
        let mut child = command.spawn().map_err(|e| spawn_error(e.to_string()))?;
        let Some(pid) = child.id() else {
            return Err(spawn_error("the process ended at once".into()));
        };
        // Kills a child that will not be used, and reaps it in the background.
        let discard = |child: Child, slot: Slot, error: StdioError| {
            kill_group(pid);
            tokio::spawn(supervise(
                child,
                slot,
                CancellationToken::new(),
                Exit::default(),
                self.name.clone(),
            ));
            Err(error)
        };
        if !slot.attach(pid) {
            // Shutdown began while it started.
            let error = StdioError::ShuttingDown {
                source_name: self.name.to_string(),
            };
            return discard(child, slot, error);
        }
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let error = spawn_error("its standard streams are not available".into());
            return discard(child, slot, error);
        };
        tracing::info!(source = %self.name, pid, context, "stdio process started");
        let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE);
        tokio::spawn(write_stdin(stdin, stdin_rx));
        tokio::spawn(log_stderr(stderr, self.name.clone(), pid));
        let stop = CancellationToken::new();
        let exit = Exit::default();
        tokio::spawn(supervise(
            child,
            slot,
            stop.clone(),
            exit.clone(),
            self.name.clone(),
        ));
        Ok(Process {
            pid,
            stdin: Some(stdin_tx),
            stdout: Some(stdout),
            line_limit: line_limit.max(self.max_answer),
            stop,
            exit,
        })
    }

    fn error(&self, reason: impl Into<String>) -> StdioError {
        StdioError::Unsupported {
            source_name: self.name.to_string(),
            reason: reason.into(),
        }
    }

    fn exited(&self, status: String) -> StdioError {
        StdioError::Exited {
            source_name: self.name.to_string(),
            status,
        }
    }

    /// Session era: one process for the whole stream.
    async fn serve_session(
        self: Arc<Self>,
        header: OpenHeader,
        mut reader: FrameReader<RecvHalf>,
        writer: FrameWriter<SendHalf>,
    ) {
        let limit = writer.limit();
        let (out, writer_task) = start_writer(writer);
        let mut process = match self.spawn(limit, &header.context).await {
            Ok(process) => process,
            Err(error) => {
                tracing::warn!(source = %self.name, context = %header.context, %error, "session refused");
                refuse(&mut reader, &out, &error).await;
                drop(out);
                let _ = writer_task.await;
                return;
            }
        };
        let routing = Arc::new(Mutex::new(Routing::default()));
        let primed = Arc::new(AtomicBool::new(false));
        let activity = Activity::default();
        let lease = self.registry.lease(activity.clone(), routing.clone());
        let stdout_task = process.stdout.take().map(|stdout| {
            tokio::spawn(route_session_output(
                stdout,
                OutputLimits {
                    line: process.line_limit,
                    frame: limit,
                },
                self.name.clone(),
                routing.clone(),
                out.clone(),
                primed.clone(),
                activity.clone(),
            ))
        });
        let exit = process.exit.clone();
        let ended = loop {
            let idle_until = tokio::time::Instant::from_std(activity.last() + self.idle);
            let frame = tokio::select! {
                frame = reader.next() => frame,
                () = exit.dead.cancelled() => break Ended::Crashed,
                () = lease.reclaim.cancelled() => break Ended::Reclaimed(format!(
                    "the source runs its limit of {} processes and a new session took the place of this one, the least recently used idle one",
                    self.registry.cap
                )),
                () = tokio::time::sleep_until(idle_until), if !self.idle.is_zero() => {
                    if pending(&routing) {
                        // A slow request is not idleness: look again a whole period later.
                        activity.touch();
                        continue;
                    }
                    break Ended::Reclaimed(format!(
                        "it was idle for {} s (stdio_idle_secs)",
                        self.idle.as_secs()
                    ));
                }
            };
            activity.touch();
            let frame = match frame {
                Ok(Some(frame)) => frame,
                Ok(None) => break Ended::Stream,
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel stream read failed");
                    break Ended::Stream;
                }
            };
            match frame.kind {
                FrameKind::Message => {}
                // A stdio upstream gets no identity assertion: nothing to renew.
                FrameKind::Identity => continue,
                FrameKind::Close => {
                    tracing::debug!(reason = %frame.reason(), "relay closed the stream");
                    break Ended::Stream;
                }
                other => {
                    tracing::warn!(kind = ?other, "unexpected frame on an exchange stream");
                    break Ended::Stream;
                }
            }
            let streams = primed.load(Ordering::Relaxed);
            if !self
                .session_message(
                    &process,
                    &routing,
                    &out,
                    frame.exchange,
                    frame.payload,
                    streams,
                )
                .await
            {
                break Ended::Crashed;
            }
        };
        drop(lease);
        if let Ended::Reclaimed(why) = ended {
            tracing::info!(source = %self.name, pid = process.pid, context = %header.context, %why, "stdio process of a session stopped to free its place");
            if let Some(task) = stdout_task {
                task.abort();
            }
            drop(process);
            let error = StdioError::Reclaimed {
                source_name: self.name.to_string(),
                why,
            };
            serve_reclaimed(&mut reader, &out, &routing, &error).await;
            drop(out);
            let _ = writer_task.await;
            return;
        }
        if ended == Ended::Crashed {
            // Let what it printed before dying reach the agent, then answer the rest.
            if let Some(task) = stdout_task {
                let abort = task.abort_handle();
                if tokio::time::timeout(DRAIN_WAIT, task).await.is_err() {
                    abort.abort();
                }
            }
            let status = exit.wait().await;
            tracing::warn!(source = %self.name, pid = process.pid, context = %header.context, %status, "stdio process exited during its session");
            let error = self.exited(status);
            let pending = routing
                .lock()
                .expect("routing lock is never held across a panic")
                .take_all();
            for (exchange, ids) in pending {
                for id in ids {
                    let body = error_body(Some(&id), error.code(), &error.to_string());
                    let _ = out.send(Frame::message(exchange, body)).await;
                }
                let _ = out.send(Frame::end(exchange)).await;
            }
            let _ = out.send(Frame::close(error.to_string())).await;
        } else if let Some(task) = stdout_task {
            // Nobody is left to read its answers; closing its stdout speeds its end.
            task.abort();
        }
        tracing::debug!(source = %self.name, pid = process.pid, context = %header.context, "session ended");
        drop(process);
        drop(out);
        let _ = writer_task.await;
    }

    /// Forwards one message of a session to its process; false when the process died. With
    /// `streams`, a request's answer is announced as an event stream at once (see
    /// [`announces_streams`]).
    async fn session_message(
        &self,
        process: &Process,
        routing: &Mutex<Routing>,
        out: &super::Out,
        exchange: u64,
        payload: Bytes,
        streams: bool,
    ) -> bool {
        let classified = match classify(&payload) {
            Ok(classified) => classified,
            Err(e) => {
                // The relay forwards only classified messages; nothing to send the child.
                tracing::warn!(source = %self.name, error = %e, "unparsable message from the relay dropped");
                let _ = out.send(Frame::end(exchange)).await;
                return true;
            }
        };
        let requests: Vec<&MessageInfo> = requests(&classified).collect();
        let recorded = if requests.is_empty() {
            Ok(())
        } else {
            let tokens = progress_tokens(&payload);
            routing
                .lock()
                .expect("routing lock is never held across a panic")
                .record(exchange, &requests, &tokens)
        };
        if let Err(duplicate) = recorded {
            let error = self.error(format!(
                "request id {duplicate} is already in use in this session"
            ));
            answer_all(out, exchange, &classified, &error).await;
            return true;
        }
        if streams && !requests.is_empty() {
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

    /// Stateless era: each message is forwarded to the source's pooled process.
    async fn serve_stateless(
        self: Arc<Self>,
        header: OpenHeader,
        mut reader: FrameReader<RecvHalf>,
        writer: FrameWriter<SendHalf>,
    ) {
        let limit = writer.limit();
        let (out, writer_task) = start_writer(writer);
        let mut mine: Vec<(Arc<Pooled>, u64)> = Vec::new();
        loop {
            let frame = match reader.next().await {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel stream read failed");
                    break;
                }
            };
            match frame.kind {
                FrameKind::Message => {}
                // A stdio upstream gets no identity assertion: nothing to renew.
                FrameKind::Identity => continue,
                FrameKind::Close => break,
                other => {
                    tracing::warn!(kind = ?other, "unexpected frame on an exchange stream");
                    break;
                }
            }
            self.stateless_message(&header, limit, &out, &mut mine, frame)
                .await;
        }
        // Requests the agent no longer waits for: tell the server to stop working on them.
        for (pooled, id) in mine {
            if pooled.forget(id) {
                pooled.send(cancelled(id)).await;
            }
        }
        drop(out);
        let _ = writer_task.await;
    }

    async fn stateless_message(
        &self,
        header: &OpenHeader,
        limit: usize,
        out: &super::Out,
        mine: &mut Vec<(Arc<Pooled>, u64)>,
        frame: Frame,
    ) {
        let exchange = frame.exchange;
        let classified = match classify(&frame.payload) {
            Ok(classified) => classified,
            Err(e) => {
                tracing::warn!(source = %self.name, error = %e, "unparsable message from the relay dropped");
                let _ = out.send(Frame::end(exchange)).await;
                return;
            }
        };
        let info = match &classified {
            Classified::Single(info) => info,
            Classified::Batch(_) => {
                let error = self.error("batches are not supported in the stateless era");
                return answer_all(out, exchange, &classified, &error).await;
            }
        };
        match info.kind {
            MessageKind::Request => {}
            MessageKind::Notification
                if info.method.as_deref() == Some("notifications/cancelled") =>
            {
                // Cancels one of this stream's requests, under the id the server knows.
                let target = cancelled_request(&frame.payload);
                if let Some((pooled, id)) = mine
                    .iter()
                    .find(|(pooled, id)| target.as_deref() == pooled.original_id(*id).as_deref())
                    && pooled.forget(*id)
                {
                    pooled.send(cancelled(*id)).await;
                }
                let _ = out.send(Frame::end(exchange)).await;
                return;
            }
            _ => {
                // Other notifications and responses would reach a process shared by every
                // agent; they have no place there.
                tracing::debug!(source = %self.name, method = ?info.method, "stateless message not forwarded to the pooled process");
                let _ = out.send(Frame::end(exchange)).await;
                return;
            }
        }
        let Some(original_id) = info.id.clone() else {
            let _ = out.send(Frame::end(exchange)).await;
            return;
        };
        let pooled = match self.pooled(limit, &header.context).await {
            Ok(pooled) => pooled,
            Err(error) => {
                tracing::warn!(source = %self.name, %error, "stateless request refused");
                return answer_all(out, exchange, &classified, &error).await;
            }
        };
        let id = pooled.next_id();
        let Ok((line, original_token)) = remap_request(&frame.payload, id) else {
            let error = self.error("the request could not be re-addressed");
            return answer_all(out, exchange, &classified, &error).await;
        };
        let call = AgentCall {
            original_id,
            original_token,
            exchange,
            out: out.clone(),
        };
        if !pooled.expect(id, Waiter::Agent(call)) {
            // The process died between our lookup and now.
            let error = self.exited(pooled.exit.status());
            return answer_all(out, exchange, &classified, &error).await;
        }
        mine.push((pooled.clone(), id));
        pooled.send(line).await;
    }

    /// The pooled process, started (and initialized) if there is none alive.
    async fn pooled(&self, limit: usize, context: &str) -> Result<Arc<Pooled>, StdioError> {
        let mut current = self.pool.lock().await;
        if let Some(pooled) = current.as_ref()
            && !pooled.exit.dead.is_cancelled()
        {
            return Ok(pooled.clone());
        }
        if current.take().is_some() {
            tracing::info!(source = %self.name, "restarting the pooled stdio process");
        }
        let pooled = Pooled::start(self, limit, context).await?;
        *current = Some(pooled.clone());
        Ok(pooled)
    }
}

impl Drop for StdioSource {
    fn drop(&mut self) {
        // Last resort: a source that goes away takes its processes with it.
        self.registry.close_and_kill();
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

/// Whether a session has requests in flight.
fn pending(routing: &Mutex<Routing>) -> bool {
    routing
        .lock()
        .expect("routing lock is never held across a panic")
        .pending()
        > 0
}

/// When a session last saw a message either way.
#[derive(Clone)]
struct Activity(Arc<Mutex<std::time::Instant>>);

impl Default for Activity {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(std::time::Instant::now())))
    }
}

impl Activity {
    fn touch(&self) {
        *self
            .0
            .lock()
            .expect("activity lock is never held across a panic") = std::time::Instant::now();
    }

    fn last(&self) -> std::time::Instant {
        *self
            .0
            .lock()
            .expect("activity lock is never held across a panic")
    }
}

/// After its process was reclaimed, a session's stream answers its next request with
/// `error` (and any request still pending), then ends: the agent learns why, and its
/// session is over.
async fn serve_reclaimed(
    reader: &mut FrameReader<RecvHalf>,
    out: &super::Out,
    routing: &Mutex<Routing>,
    error: &StdioError,
) {
    let pending = routing
        .lock()
        .expect("routing lock is never held across a panic")
        .take_all();
    let answered = !pending.is_empty();
    for (exchange, ids) in pending {
        for id in ids {
            let body = error_body(Some(&id), error.code(), &error.to_string());
            let _ = out.send(Frame::message(exchange, body)).await;
        }
        let _ = out.send(Frame::end(exchange)).await;
    }
    if !answered {
        loop {
            let frame = match reader.next().await {
                Ok(Some(frame)) if frame.kind == FrameKind::Message => frame,
                Ok(Some(frame)) if frame.kind == FrameKind::Identity => continue,
                _ => return,
            };
            let Ok(classified) = classify(&frame.payload) else {
                let _ = out.send(Frame::end(frame.exchange)).await;
                continue;
            };
            if requests(&classified).next().is_none() {
                let _ = out.send(Frame::end(frame.exchange)).await;
                continue;
            }
            answer_all(out, frame.exchange, &classified, error).await;
            break;
        }
    }
    let _ = out.send(Frame::close(error.to_string())).await;
}

/// The process ids of this source's children: the cap and the kill list.
struct Registry {
    cap: usize,
    state: watch::Sender<RegistryState>,
    /// The sessions holding a process, for reclaiming the least recently used idle one.
    leases: Arc<Mutex<Leases>>,
}

/// Sessions holding a process, by a number of their own.
#[derive(Default)]
struct Leases {
    next: u64,
    open: HashMap<u64, (Activity, Arc<Mutex<Routing>>, CancellationToken)>,
}

/// A session's hold on its process; cancelled when the process is reclaimed.
struct Lease {
    number: u64,
    leases: Arc<Mutex<Leases>>,
    reclaim: CancellationToken,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.leases
            .lock()
            .expect("lease lock is never held across a panic")
            .open
            .remove(&self.number);
    }
}

#[derive(Default)]
struct RegistryState {
    /// No new process may start.
    closed: bool,
    /// Reserved slots: processes starting, running, or not yet reaped.
    slots: usize,
    /// Process (and process group) ids of started, unreaped children.
    pids: HashSet<u32>,
}

impl Registry {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            state: watch::Sender::new(RegistryState::default()),
            leases: Arc::default(),
        }
    }

    /// Registers a session holding a process, active as `activity` says and idle while
    /// `routing` has no request pending.
    fn lease(&self, activity: Activity, routing: Arc<Mutex<Routing>>) -> Lease {
        let reclaim = CancellationToken::new();
        let mut leases = self
            .leases
            .lock()
            .expect("lease lock is never held across a panic");
        leases.next += 1;
        let number = leases.next;
        leases
            .open
            .insert(number, (activity, routing, reclaim.clone()));
        Lease {
            number,
            leases: self.leases.clone(),
            reclaim,
        }
    }

    /// Asks the least recently used idle session to give up its process; false when every
    /// session has a request in flight.
    fn reclaim_lru(&self) -> bool {
        let mut leases = self
            .leases
            .lock()
            .expect("lease lock is never held across a panic");
        let victim = leases
            .open
            .iter()
            .filter(|(_, (_, routing, _))| !pending(routing))
            .min_by_key(|(_, (activity, _, _))| activity.last())
            .map(|(number, _)| *number);
        match victim.and_then(|number| leases.open.remove(&number)) {
            Some((_, _, reclaim)) => {
                reclaim.cancel();
                true
            }
            None => false,
        }
    }

    /// A slot, reclaiming the least recently used idle session's process at the cap and
    /// waiting (bounded) until it is reaped.
    async fn reserve_or_reclaim(self: &Arc<Self>, source: &str) -> Result<Slot, StdioError> {
        let mut changes = self.state.subscribe();
        let refused = match self.reserve(source) {
            Err(refused @ StdioError::CapReached { .. }) => refused,
            other => return other,
        };
        if !self.reclaim_lru() {
            return Err(refused);
        }
        let deadline = tokio::time::Instant::now() + RECLAIM_WAIT;
        loop {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(refused),
            }
            match self.reserve(source) {
                Err(StdioError::CapReached { .. }) => continue,
                other => return other,
            }
        }
    }

    fn reserve(self: &Arc<Self>, source: &str) -> Result<Slot, StdioError> {
        let mut result = Ok(());
        self.state.send_if_modified(|state| {
            if state.closed {
                result = Err(StdioError::ShuttingDown {
                    source_name: source.to_owned(),
                });
                false
            } else if state.slots >= self.cap {
                result = Err(StdioError::CapReached {
                    source_name: source.to_owned(),
                    cap: self.cap,
                });
                false
            } else {
                state.slots += 1;
                true
            }
        });
        result.map(|()| Slot {
            registry: self.clone(),
            pid: None,
            reaped: false,
        })
    }

    fn live(&self) -> usize {
        self.state.borrow().pids.len()
    }

    fn close_and_kill(&self) {
        self.state.send_modify(|state| {
            state.closed = true;
            for pid in &state.pids {
                kill_group(*pid);
            }
        });
    }

    /// Resolves once no slot is held.
    async fn idle(&self) {
        let mut state = self.state.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail while we borrow it.
        let _ = state.wait_for(|state| state.slots == 0).await;
    }
}

/// One reserved process slot; released when dropped.
struct Slot {
    registry: Arc<Registry>,
    pid: Option<u32>,
    reaped: bool,
}

impl Slot {
    /// Records the started process; false when the registry closed meanwhile.
    fn attach(&mut self, pid: u32) -> bool {
        self.pid = Some(pid);
        let mut open = true;
        self.registry.state.send_modify(|state| {
            state.pids.insert(pid);
            open = !state.closed;
        });
        open
    }

    /// Releases the slot of a reaped process.
    fn release_reaped(mut self) {
        self.reaped = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let (Some(pid), false) = (self.pid, self.reaped) {
            // Dropped unreaped (the runtime is going away): take the whole group down.
            kill_group(pid);
        }
        let pid = self.pid;
        self.registry.state.send_modify(|state| {
            state.slots = state.slots.saturating_sub(1);
            if let Some(pid) = pid {
                state.pids.remove(&pid);
            }
        });
    }
}

/// SIGKILL to the process group `pgid` (each child leads its own group).
fn kill_group(pgid: u32) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return; // never signal "every process" or init
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a negative pid
    // addresses exactly the process group that the child was placed in at spawn.
    let result = unsafe { libc::kill(-pgid, libc::SIGKILL) };
    if result != 0 {
        // ESRCH: the group is already empty, which is the goal.
        tracing::trace!(pgid, "process group already gone");
    }
}

/// The names among `keys` that are `connect`'s own (its token among them).
fn own_env_keys(keys: impl Iterator<Item = OsString>) -> Vec<OsString> {
    keys.filter(|key| {
        key.to_str()
            .is_some_and(|key| key.to_ascii_uppercase().starts_with(OWN_ENV_PREFIX))
    })
    .collect()
}

/// How a child ended, once it has.
#[derive(Clone, Default)]
struct Exit {
    dead: CancellationToken,
    status: Arc<OnceLock<String>>,
}

impl Exit {
    fn status(&self) -> String {
        self.status
            .get()
            .cloned()
            .unwrap_or_else(|| "status unknown".into())
    }

    async fn wait(&self) -> String {
        self.dead.cancelled().await;
        self.status()
    }
}

/// A running child; dropping it stops the child (stdin closed, then SIGKILL after a grace).
struct Process {
    pid: u32,
    /// Lines for its stdin; `None` once closed.
    stdin: Option<mpsc::Sender<Bytes>>,
    stdout: Option<ChildStdout>,
    /// The longest stdout line accepted (the tunnel's frame limit).
    line_limit: usize,
    stop: CancellationToken,
    exit: Exit,
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stdin.take();
        self.stop.cancel();
    }
}

/// Waits for the child, stops it when asked, kills what is left of its group, reaps it.
async fn supervise(
    mut child: Child,
    slot: Slot,
    stop: CancellationToken,
    exit: Exit,
    source: Arc<str>,
) {
    let pid = slot.pid.unwrap_or_default();
    let status = tokio::select! {
        status = child.wait() => status,
        () = stop.cancelled() => match tokio::time::timeout(STOP_GRACE, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                kill_group(pid);
                child.wait().await
            }
        },
    };
    // Whatever the child left behind in its group (a shell's children, helpers).
    kill_group(pid);
    let status = match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("status unknown ({e})"),
    };
    tracing::debug!(source = %source, pid, %status, "stdio process reaped");
    slot.release_reaped();
    let _ = exit.status.set(status);
    exit.dead.cancel();
}

/// Writes lines to the child's stdin until the queue closes or the pipe breaks.
async fn write_stdin(mut stdin: ChildStdin, mut lines: mpsc::Receiver<Bytes>) {
    /// Lines up to this size are written with their line break in one system call; larger
    /// ones are not copied for it.
    const COALESCE: usize = 64 * 1024;
    while let Some(line) = lines.recv().await {
        let written = async {
            if line.len() < COALESCE {
                let mut buffer = BytesMut::with_capacity(line.len() + 1);
                buffer.extend_from_slice(&line);
                buffer.extend_from_slice(b"\n");
                stdin.write_all(&buffer).await?;
            } else {
                stdin.write_all(&line).await?;
                stdin.write_all(b"\n").await?;
            }
            stdin.flush().await
        }
        .await;
        if let Err(e) = written {
            tracing::debug!(error = %e, "stdio process stdin closed");
            return;
        }
    }
}

/// Logs the child's stderr line by line with the source's name.
async fn log_stderr(stderr: ChildStderr, source: Arc<str>, pid: u32) {
    let mut lines = FramedRead::new(stderr, LineDecoder::new(STDERR_LINE_LIMIT));
    while let Some(Ok(line)) = lines.next().await {
        match line {
            Line::Text(text) => {
                tracing::info!(source = %source, pid, "stderr: {}", String::from_utf8_lossy(&text))
            }
            Line::TooLong => {
                tracing::info!(source = %source, pid, "stderr: (a line over {STDERR_LINE_LIMIT} bytes, not shown)")
            }
        }
    }
}

/// Answers the first message of a stream this source cannot serve, then closes the stream.
async fn refuse(reader: &mut FrameReader<RecvHalf>, out: &super::Out, error: &StdioError) {
    if let Ok(Ok(Some(frame))) = tokio::time::timeout(REFUSE_WAIT, reader.next()).await
        && frame.kind == FrameKind::Message
    {
        match classify(&frame.payload) {
            Ok(classified) => answer_all(out, frame.exchange, &classified, error).await,
            Err(_) => {
                let _ = out.send(Frame::end(frame.exchange)).await;
            }
        }
    }
    let _ = out.send(Frame::close(error.to_string())).await;
}

/// Answers every request in `classified` with `error`, then ends the exchange.
async fn answer_all(out: &super::Out, exchange: u64, classified: &Classified, error: &StdioError) {
    for request in requests(classified) {
        let body = error_body(request.id.as_deref(), error.code(), &error.to_string());
        let _ = out.send(Frame::message(exchange, body)).await;
    }
    let _ = out.send(Frame::end(exchange)).await;
}

fn requests(classified: &Classified) -> impl Iterator<Item = &MessageInfo> {
    classified
        .messages()
        .iter()
        .filter(|m| m.kind == MessageKind::Request)
}

/// A message as one line: JSON allows raw line breaks only as whitespace between tokens (never
/// inside a string), so dropping them keeps the message identical and makes it a single line,
/// as the stdio transport requires. Messages without line breaks pass untouched.
fn one_line(payload: Bytes) -> Bytes {
    if !payload.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        return payload;
    }
    payload
        .iter()
        .copied()
        .filter(|b| !matches!(b, b'\n' | b'\r'))
        .collect::<Vec<u8>>()
        .into()
}

/// Reads a session's child's stdout and sends each message to its exchange.
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
        }) => settled.protocol_version.as_str() >= "2025-11-25",
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

async fn route_session_output(
    stdout: ChildStdout,
    limits: OutputLimits,
    source: Arc<str>,
    routing: Arc<Mutex<Routing>>,
    out: super::Out,
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
        let (exchange, ended) = routing
            .lock()
            .expect("routing lock is never held across a panic")
            .target(&classified, raw);
        if !primed.load(Ordering::Relaxed)
            && line.windows(16).any(|w| w == b"protocolVersion\"")
            && announces_streams(&line)
        {
            primed.store(true, Ordering::Relaxed);
        }
        if super::send_message(&out, exchange, line, limits.frame, &source)
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

/// The start of a line, for logs.
fn quote(line: &[u8]) -> String {
    const QUOTE: usize = 200;
    String::from_utf8_lossy(&line[..line.len().min(QUOTE)]).into_owned()
}

/// One output line of a child.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line, without its line break and surrounding whitespace; never empty.
    Text(Bytes),
    /// A line longer than the limit, skipped whole.
    TooLong,
}

/// Splits a byte stream into lines of at most `max` bytes without ever failing: a longer line
/// is skipped (reported as [`Line::TooLong`]) and reading goes on with the next one.
struct LineDecoder {
    max: usize,
    /// Bytes of the buffer already searched for a line break.
    scanned: usize,
    /// Inside a too-long line: dropping bytes until its end.
    discarding: bool,
}

impl LineDecoder {
    fn new(max: usize) -> Self {
        Self {
            max,
            scanned: 0,
            discarding: false,
        }
    }

    fn finish_line(&mut self, line: BytesMut) -> Option<Line> {
        self.scanned = 0;
        if std::mem::take(&mut self.discarding) {
            return Some(Line::TooLong);
        }
        let line = line.freeze();
        let start = line
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(line.len());
        let end = line
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(start, |i| i + 1);
        if start >= end {
            return None;
        }
        if end - start > self.max {
            return Some(Line::TooLong);
        }
        Some(Line::Text(line.slice(start..end)))
    }
}

impl Decoder for LineDecoder {
    type Item = Line;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        loop {
            let from = self.scanned.min(src.len());
            match src[from..].iter().position(|b| *b == b'\n') {
                Some(offset) => {
                    let line = src.split_to(from + offset + 1);
                    if let Some(line) = self.finish_line(line) {
                        return Ok(Some(line));
                    }
                }
                None if self.discarding => {
                    src.clear();
                    self.scanned = 0;
                    return Ok(None);
                }
                None if src.len() > self.max.saturating_add(2) => {
                    // Past the limit (allowing for "\r\n") without an end: skip to the next one.
                    self.discarding = true;
                    src.clear();
                    self.scanned = 0;
                    return Ok(None);
                }
                None => {
                    self.scanned = src.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        if let Some(line) = self.decode(src)? {
            return Ok(Some(line));
        }
        if src.is_empty() && !self.discarding {
            return Ok(None);
        }
        // A last line without a line break.
        let rest = src.split_to(src.len());
        Ok(self.finish_line(rest))
    }
}

/// A call of an agent waiting on the pooled process.
struct AgentCall {
    original_id: Box<RawValue>,
    original_token: Option<Box<RawValue>>,
    exchange: u64,
    out: super::Out,
}

/// Who waits for an answer of the pooled process.
enum Waiter {
    /// An agent's stateless request.
    Agent(AgentCall),
    /// `connect`'s own `initialize`.
    Internal(oneshot::Sender<Bytes>),
}

/// The long-lived process that serves a source's stateless requests.
struct Pooled {
    source: Arc<str>,
    /// Our ids to their waiters; `None` once the process is gone.
    waiters: Mutex<Option<HashMap<u64, Waiter>>>,
    next_id: AtomicU64,
    stdin: mpsc::Sender<Bytes>,
    exit: Exit,
    /// The process; dropping the last `Pooled` stops it.
    process: Process,
}

impl Pooled {
    /// Starts the process and completes the MCP handshake with it.
    async fn start(
        source: &StdioSource,
        limit: usize,
        context: &str,
    ) -> Result<Arc<Self>, StdioError> {
        let mut process = source.spawn(limit, context).await?;
        let stdout = process.stdout.take();
        let Some(stdin) = process.stdin.clone() else {
            return Err(source.exited("stdin closed".into()));
        };
        let pooled = Arc::new(Self {
            source: source.name.clone(),
            waiters: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
            stdin,
            exit: process.exit.clone(),
            process,
        });
        if let Some(stdout) = stdout {
            tokio::spawn(route_pooled_output(
                Arc::downgrade(&pooled),
                pooled.stdin.downgrade(),
                pooled.exit.clone(),
                stdout,
                pooled.process.line_limit,
                limit,
                pooled.source.clone(),
            ));
        }
        let init_error = |reason: String| StdioError::Init {
            source_name: source.name.to_string(),
            reason,
        };
        let id = pooled.next_id();
        let (tx, rx) = oneshot::channel();
        if !pooled.expect(id, Waiter::Internal(tx)) {
            return Err(source.exited(pooled.exit.status()));
        }
        let initialize = serde_json::json!({
            "jsonrpc": "2.0",
            "id": id,
            "method": "initialize",
            "params": {
                "protocolVersion": POOLED_PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mcp-tunnel", "version": env!("CARGO_PKG_VERSION")},
            },
        });
        pooled.send(Bytes::from(initialize.to_string())).await;
        let answer = tokio::select! {
            answer = tokio::time::timeout(INIT_TIMEOUT, rx) => answer,
            () = pooled.exit.dead.cancelled() => return Err(source.exited(pooled.exit.status())),
        };
        let answer = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => return Err(source.exited(pooled.exit.status())),
            Err(_) => {
                return Err(init_error(format!(
                    "no answer within {} s",
                    INIT_TIMEOUT.as_secs()
                )));
            }
        };
        #[derive(Deserialize)]
        struct InitAnswer {
            result: Option<serde::de::IgnoredAny>,
            error: Option<InitError>,
        }
        #[derive(Deserialize)]
        struct InitError {
            message: Option<String>,
        }
        match serde_json::from_slice::<InitAnswer>(&answer) {
            Ok(InitAnswer {
                result: Some(_), ..
            }) => {}
            Ok(InitAnswer {
                error: Some(error), ..
            }) => {
                return Err(init_error(
                    error.message.unwrap_or_else(|| "an error".into()),
                ));
            }
            _ => return Err(init_error("a malformed initialize answer".into())),
        }
        pooled
            .send(Bytes::from_static(
                br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            ))
            .await;
        tracing::info!(source = %source.name, "pooled stdio process ready for stateless requests");
        Ok(pooled)
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a waiter for our id; false when the process is already gone.
    fn expect(&self, id: u64, waiter: Waiter) -> bool {
        let mut waiters = self
            .waiters
            .lock()
            .expect("waiters lock is never held across a panic");
        match waiters.as_mut() {
            Some(waiters) => {
                waiters.insert(id, waiter);
                true
            }
            None => false,
        }
    }

    /// Removes the waiter of our id; true if it was still waiting.
    fn forget(&self, id: u64) -> bool {
        self.waiters
            .lock()
            .expect("waiters lock is never held across a panic")
            .as_mut()
            .and_then(|waiters| waiters.remove(&id))
            .is_some()
    }

    /// The agent's id of the request we sent as `id`, as a key.
    fn original_id(&self, id: u64) -> Option<String> {
        let waiters = self
            .waiters
            .lock()
            .expect("waiters lock is never held across a panic");
        match waiters.as_ref()?.get(&id)? {
            Waiter::Agent(call) => Some(key(&call.original_id)),
            Waiter::Internal(_) => None,
        }
    }

    /// Writes a line to the process (dropped if it is gone: its waiters are answered then).
    async fn send(&self, line: Bytes) {
        tokio::select! {
            _ = self.stdin.send(line) => {}
            () = self.exit.dead.cancelled() => {}
        }
    }
}

/// A `notifications/cancelled` for our id.
fn cancelled(id: u64) -> Bytes {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "method": "notifications/cancelled",
        "params": {"requestId": id, "reason": "the agent's request ended"},
    });
    Bytes::from(body.to_string())
}

/// Reads the pooled process's stdout: answers go to their agents under their own ids; when
/// it ends, every waiting agent gets an error naming the source.
async fn route_pooled_output(
    pooled: std::sync::Weak<Pooled>,
    stdin: mpsc::WeakSender<Bytes>,
    exit: Exit,
    stdout: ChildStdout,
    limit: usize,
    max_frame: usize,
    source: Arc<str>,
) {
    let mut lines = FramedRead::new(stdout, LineDecoder::new(limit));
    while let Some(Ok(line)) = lines.next().await {
        let Line::Text(line) = line else {
            tracing::warn!(source = %source, limit, "pooled stdio process printed a message larger than max_answer_bytes; dropped");
            continue;
        };
        let Some(pooled) = pooled.upgrade() else {
            return;
        };
        route_pooled_line(&pooled, &stdin, line, max_frame).await;
    }
    // Its stdout is closed: the process is over, or useless. Make sure it is gone.
    if tokio::time::timeout(DRAIN_WAIT, exit.dead.cancelled())
        .await
        .is_err()
        && let Some(pooled) = pooled.upgrade()
    {
        kill_group(pooled.process.pid);
    }
    let status = exit.wait().await;
    let Some(pooled) = pooled.upgrade() else {
        return;
    };
    let waiters = pooled
        .waiters
        .lock()
        .expect("waiters lock is never held across a panic")
        .take()
        .unwrap_or_default();
    let error = StdioError::Exited {
        source_name: source.to_string(),
        status,
    };
    tracing::warn!(source = %source, %error, waiting = waiters.len(), "pooled stdio process ended");
    for waiter in waiters.into_values() {
        if let Waiter::Agent(call) = waiter {
            let body = error_body(Some(&call.original_id), error.code(), &error.to_string());
            let _ = call.out.send(Frame::message(call.exchange, body)).await;
            let _ = call.out.send(Frame::end(call.exchange)).await;
        }
    }
}

async fn route_pooled_line(
    pooled: &Pooled,
    stdin: &mpsc::WeakSender<Bytes>,
    line: Bytes,
    max_frame: usize,
) {
    let (Ok(classified), Ok(raw)) = (classify(&line), serde_json::from_slice::<&RawValue>(&line))
    else {
        tracing::warn!(source = %pooled.source, line = %quote(&line), "pooled stdio process printed a line that is not JSON-RPC; dropped");
        return;
    };
    let Classified::Single(message) = classified else {
        tracing::debug!(source = %pooled.source, "batch from the pooled stdio process dropped");
        return;
    };
    let ours = |raw: Option<&RawValue>| raw.and_then(|r| r.get().parse::<u64>().ok());
    match message.kind {
        MessageKind::Response => {
            let Some(id) = ours(message.id.as_deref()) else {
                return;
            };
            let waiter = pooled
                .waiters
                .lock()
                .expect("waiters lock is never held across a panic")
                .as_mut()
                .and_then(|waiters| waiters.remove(&id));
            match waiter {
                Some(Waiter::Agent(call)) => {
                    let body = match replace_at(raw, &["id"], &call.original_id) {
                        Ok((body, _)) => one_line(Bytes::from(body.get().to_owned())),
                        Err(_) => error_body(
                            Some(&call.original_id),
                            codes::INTERNAL_ERROR,
                            &format!(
                                "source {}: its answer could not be re-addressed",
                                pooled.source
                            ),
                        ),
                    };
                    let _ = super::send_message(
                        &call.out,
                        call.exchange,
                        body,
                        max_frame,
                        &pooled.source,
                    )
                    .await;
                    let _ = call.out.send(Frame::end(call.exchange)).await;
                }
                Some(Waiter::Internal(tx)) => {
                    let _ = tx.send(line);
                }
                None => {}
            }
        }
        MessageKind::Notification => {
            let token = serde_json::from_str::<Probe<'_>>(raw.get())
                .ok()
                .and_then(|probe| probe.params?.progress_token)
                .and_then(|token| token.get().parse::<u64>().ok());
            let target = token.and_then(|id| {
                let waiters = pooled
                    .waiters
                    .lock()
                    .expect("waiters lock is never held across a panic");
                match waiters.as_ref()?.get(&id)? {
                    Waiter::Agent(call) => Some((
                        call.original_token.clone()?,
                        call.exchange,
                        call.out.clone(),
                    )),
                    Waiter::Internal(_) => None,
                }
            });
            match target {
                Some((token, exchange, out)) => {
                    if let Ok((body, _)) = replace_at(raw, &["params", "progressToken"], &token) {
                        let body = one_line(Bytes::from(body.get().to_owned()));
                        let _ =
                            super::send_message(&out, exchange, body, max_frame, &pooled.source)
                                .await;
                    }
                }
                None => {
                    tracing::debug!(source = %pooled.source, method = ?message.method, "notification of the pooled stdio process dropped");
                }
            }
        }
        MessageKind::Request => {
            // connect declared no client capabilities to the pooled process: it answers a
            // ping, and refuses anything else.
            let Some(id) = message.id.as_deref() else {
                return;
            };
            let answer = if message.method.as_deref() == Some("ping") {
                Bytes::from(format!(
                    r#"{{"jsonrpc":"2.0","id":{},"result":{{}}}}"#,
                    id.get()
                ))
            } else {
                error_body(
                    Some(id),
                    codes::METHOD_NOT_FOUND,
                    "stateless requests through mcp-tunnel cannot answer server requests",
                )
            };
            if let Some(stdin) = stdin.upgrade() {
                let _ = stdin.send(answer).await;
            }
        }
    }
}

/// Re-addresses a stateless request: our id in place of the agent's, and our id as its
/// progress token (so progress of concurrent agents never mixes); returns the agent's token.
fn remap_request(
    payload: &[u8],
    id: u64,
) -> Result<(Bytes, Option<Box<RawValue>>), serde_json::Error> {
    let raw: &RawValue = serde_json::from_slice(payload)?;
    let ours = serde_json::value::to_raw_value(&id)?;
    let (message, _) = replace_at(raw, &["id"], &ours)?;
    let (message, token) = replace_at(&message, &["params", "_meta", "progressToken"], &ours)?;
    Ok((one_line(Bytes::from(message.get().to_owned())), token))
}

/// Replaces the value at `path` (object keys) with `value`, keeping every other value byte for
/// byte; returns the new text and the old value. A path that does not exist changes nothing.
fn replace_at(
    raw: &RawValue,
    path: &[&str],
    value: &RawValue,
) -> Result<(Box<RawValue>, Option<Box<RawValue>>), serde_json::Error> {
    let Some((first, rest)) = path.split_first() else {
        return Ok((value.to_owned(), Some(raw.to_owned())));
    };
    if !raw.get().trim_start().starts_with('{') {
        return Ok((raw.to_owned(), None));
    }
    let mut object: BTreeMap<String, Box<RawValue>> = serde_json::from_str(raw.get())?;
    let Some(child) = object.get(*first) else {
        return Ok((raw.to_owned(), None));
    };
    let (child, old) = replace_at(child, rest, value)?;
    if old.is_none() {
        return Ok((raw.to_owned(), None));
    }
    object.insert((*first).to_owned(), child);
    Ok((serde_json::value::to_raw_value(&object)?, old))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` to the decoder as a stream would, then the end of the stream.
    fn drain(decoder: &mut LineDecoder, chunks: &[&[u8]]) -> Vec<Line> {
        let mut buffer = BytesMut::new();
        let mut lines = Vec::new();
        for chunk in chunks {
            buffer.extend_from_slice(chunk);
            while let Some(line) = decoder.decode(&mut buffer).expect("never fails") {
                lines.push(line);
            }
        }
        while let Some(line) = decoder.decode_eof(&mut buffer).expect("never fails") {
            lines.push(line);
        }
        lines
    }

    fn text(s: &str) -> Line {
        Line::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn lines_split_across_chunks_with_crlf_blank_lines_and_no_final_break() {
        let mut decoder = LineDecoder::new(64);
        let lines = drain(
            &mut decoder,
            &[b"{\"a\"", b":1}\r\n\n  \n{\"b\":2}\n{\"c\"", b":3}"],
        );
        assert_eq!(
            lines,
            vec![text("{\"a\":1}"), text("{\"b\":2}"), text("{\"c\":3}")]
        );
    }

    #[test]
    fn too_long_lines_are_skipped_and_reading_goes_on() {
        let mut decoder = LineDecoder::new(8);
        let long = [b'x'; 30];
        let lines = drain(
            &mut decoder,
            &[b"short\n", &long, &long, b"tail\nok\n", b"0123456789\n"],
        );
        assert_eq!(
            lines,
            vec![text("short"), Line::TooLong, text("ok"), Line::TooLong]
        );
    }

    #[test]
    fn pretty_json_becomes_one_equivalent_line() {
        let pretty = serde_json::to_string_pretty(&serde_json::json!({
            "jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"message": "a b\\nc"}}
        }))
        .expect("json");
        assert!(pretty.contains('\n'));
        let line = one_line(Bytes::from(pretty.clone()));
        assert!(!line.contains(&b'\n') && !line.contains(&b'\r'));
        let before: serde_json::Value = serde_json::from_str(&pretty).expect("json");
        let after: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(before, after);
        let compact = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"x"}"#);
        assert_eq!(one_line(compact.clone()), compact);
    }

    #[test]
    fn stateless_requests_are_readdressed_and_answers_restored() {
        let request = br#"{"jsonrpc":"2.0","id":"agent-7","method":"tools/call","params":{"name":"x","big":12345678901234567890123,"_meta":{"progressToken":"p1","io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;
        let (line, token) = remap_request(request, 42).expect("remaps");
        let value: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(value["id"], 42);
        assert_eq!(value["params"]["_meta"]["progressToken"], 42);
        assert_eq!(
            value["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"],
            "2026-07-28"
        );
        assert!(
            std::str::from_utf8(&line)
                .expect("utf-8")
                .contains("12345678901234567890123"),
            "values are kept byte for byte"
        );
        assert_eq!(token.expect("token").get(), "\"p1\"");

        let (line, token) =
            remap_request(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#, 3).expect("remaps");
        assert!(token.is_none());
        let value: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(
            value,
            serde_json::json!({"jsonrpc":"2.0","id":3,"method":"ping"})
        );

        let answer: &RawValue =
            serde_json::from_str(r#"{"jsonrpc":"2.0","id":42,"result":{"content":[]}}"#)
                .expect("json");
        let original = RawValue::from_string("\"agent-7\"".into()).expect("raw");
        let (restored, old) = replace_at(answer, &["id"], &original).expect("restores");
        assert_eq!(old.expect("old id").get(), "42");
        let value: serde_json::Value = serde_json::from_str(restored.get()).expect("json");
        assert_eq!(value["id"], "agent-7");
    }

    #[tokio::test]
    async fn the_cap_bounds_slots_and_shutdown_refuses_new_ones() {
        let registry = Arc::new(Registry::new(2));
        let first = registry.reserve("s").expect("first");
        let _second = registry.reserve("s").expect("second");
        let error = registry.reserve("s").err().expect("over the cap");
        assert!(
            error.to_string().contains("source s") && error.to_string().contains("limit of 2"),
            "{error}"
        );
        drop(first);
        let third = registry.reserve("s").expect("a slot freed");
        registry.close_and_kill();
        assert!(matches!(
            registry.reserve("s"),
            Err(StdioError::ShuttingDown { .. })
        ));
        drop(third);
        drop(_second);
        tokio::time::timeout(Duration::from_secs(1), registry.idle())
            .await
            .expect("idle once every slot is released");
    }

    #[test]
    fn connects_own_variables_are_not_inherited() {
        let keys = [
            "PATH",
            "MCP_TUNNEL_TOKEN",
            "mcp_tunnel_other",
            "GITHUB_TOKEN",
        ]
        .map(OsString::from)
        .into_iter();
        assert_eq!(
            own_env_keys(keys),
            vec![
                OsString::from("MCP_TUNNEL_TOKEN"),
                OsString::from("mcp_tunnel_other")
            ]
        );
    }
}
