//! Stateless era: one long-lived, pooled process per source serves every stateless request
//! (and, bridged, one per caller whose requests may be asked for input: see [`Parked`]).
//! `connect` re-addresses each request with an id (and progress token) of its own, so answers
//! of concurrent agents never mix; answers go back under the agent's own id.
//!
//! A new process is first asked `server/discover`: one that speaks 2026-07-28 gets the
//! agents' requests as they are. One that does not (an error, or no answer within
//! [`DISCOVER_TIMEOUT`]) is initialized by `connect` in the session era and *bridged* (see
//! [`crate::mcp::bridge`]): an agent's `server/discover` is answered from its `initialize`
//! result, and its results get the fields 2026-07-28 requires. A process that dies of the
//! probe is started again without it; the source remembers its era.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::value::RawValue;
use tokio::process::ChildStdout;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use super::caller::{Parked, park};
use super::lines::{Line, LineDecoder, one_line, quote};
use super::process::{Exit, Process, kill_group};
use super::remap::{remap_request, replace_at};
use super::{DRAIN_WAIT, StdioError, StdioSource};
use crate::client::sources::routing::{Probe, cancelled_request, key};
use crate::client::sources::stream::Inbound;
use crate::client::sources::{Out, send_message};
use crate::mcp::bridge::{self, Initialized};
use crate::mcp::era::names_target;
use crate::mcp::jsonrpc::{MessageKind, codes, error_body};
use crate::mcp::{Classified, classify};
use crate::wire::{Frame, OpenHeader};

/// Time a pooled process has to answer `connect`'s own `initialize`.
const INIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Time a new pooled process has to answer `connect`'s `server/discover` before it is taken
/// for a session-era server: a server that knows only the handshake may ignore a request
/// before `initialize` instead of refusing it.
const DISCOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// The protocol version `connect` asks a pooled process for: the newest session-era version.
/// Servers that only know older ones answer with theirs, as the handshake allows.
const POOLED_PROTOCOL_VERSION: &str = crate::mcp::era::LATEST_SESSION_VERSION;

impl StdioSource {
    /// Stateless era: each message is forwarded to the source's pooled process.
    pub(super) async fn serve_stateless(
        self: Arc<Self>,
        header: OpenHeader,
        mut inbound: Inbound,
        out: Out,
        limit: usize,
    ) {
        let mut mine: Vec<(Arc<Pooled>, u64)> = Vec::new();
        while let Some(frame) = inbound.next_message().await {
            self.stateless_message(&header, limit, &out, &mut mine, frame)
                .await;
        }
        // Requests the agent no longer waits for: tell the server to stop working on them
        // (not those waiting for the agent's input: its retry, on another stream, takes them up).
        for (pooled, id) in mine {
            if pooled.abandon(id) {
                pooled.send(cancelled(id)).await;
            }
        }
    }

    async fn stateless_message(
        &self,
        header: &OpenHeader,
        limit: usize,
        out: &Out,
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
                return error.answer_all(out, exchange, &classified).await;
            }
        };
        match info.kind {
            MessageKind::Request => {}
            MessageKind::Notification
                if info.method.as_deref() == Some("notifications/cancelled") =>
            {
                cancel_mine(mine, &frame.payload).await;
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
        let method = info.method.as_deref().unwrap_or_default();
        if names_target(method)
            && let Some(retry) = bridge::Retry::parse(&frame.payload)
            && let Some(handle) = retry.state.clone()
        {
            let retried = (&frame.payload, info, original_id);
            return self
                .resume_parked(header, (out, exchange), mine, retried, (handle, retry))
                .await;
        }
        let pooled = match self.pooled(limit, &header.context).await {
            Ok(pooled) => pooled,
            Err(error) => {
                tracing::warn!(source = %self.name, %error, "stateless request refused");
                return error.answer_all(out, exchange, &classified).await;
            }
        };
        let bridged = pooled.initialized.get().cloned().flatten();
        if let (Some(initialized), Some("server/discover")) = (&bridged, info.method.as_deref()) {
            let answer = initialized.discover_answer(&original_id);
            let _ = out.send(Frame::message(exchange, answer)).await;
            let _ = out.send(Frame::end(exchange)).await;
            return;
        }
        let (pooled, declared) = match self
            .process_for(header, &frame.payload, bridged.is_some(), pooled, limit)
            .await
        {
            Ok(routed) => routed,
            Err(error) => {
                tracing::warn!(source = %self.name, %error, "stateless request refused");
                return error.answer_all(out, exchange, &classified).await;
            }
        };
        let id = pooled.next_id();
        let Ok((line, original_token)) = remap_request(&frame.payload, id) else {
            let error = self.error("the request could not be re-addressed");
            return error.answer_all(out, exchange, &classified).await;
        };
        let call = AgentCall {
            original_id,
            original_token,
            exchange,
            out: out.clone(),
            completes: bridged.and(info.method.clone()),
            declared: declared.filter(|_| pooled.parked.is_some() && names_target(method)),
        };
        if !pooled.expect(id, Waiter::Agent(call)) {
            // The process died between our lookup and now.
            let error = self.exited(pooled.exit.status());
            return error.answer_all(out, exchange, &classified).await;
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
        let probed = self.pooled_speaks_stateless.lock().is_none();
        let pooled = match Pooled::start(self, limit, context, None).await {
            // The probe killed a server that knows only the handshake: once more, without it.
            Err(StdioError::Exited { .. })
                if probed && *self.pooled_speaks_stateless.lock() == Some(false) =>
            {
                Pooled::start(self, limit, context, None).await?
            }
            started => started?,
        };
        *current = Some(pooled.clone());
        Ok(pooled)
    }
}

/// A call of an agent waiting on the pooled process.
pub(super) struct AgentCall {
    pub(super) original_id: Box<RawValue>,
    pub(super) original_token: Option<Box<RawValue>>,
    pub(super) exchange: u64,
    pub(super) out: Out,
    /// The agent's method, when the process is bridged: its result is completed for the
    /// agent's era (see [`crate::mcp::bridge::complete`]).
    pub(super) completes: Option<String>,
    /// The client capabilities the agent's request declared, when it may be asked for input
    /// (a caller's own process, see [`StdioSource::caller_pooled`]).
    pub(super) declared: Option<String>,
}

/// Who waits for an answer of the pooled process.
pub(super) enum Waiter {
    /// An agent's stateless request.
    Agent(AgentCall),
    /// `connect`'s own `initialize`.
    Internal(oneshot::Sender<Bytes>),
    /// An agent's request whose server asked for input: the agent's retry takes it up (see
    /// [`Parked`]).
    Parked,
}

/// The long-lived process that serves a source's stateless requests.
pub(super) struct Pooled {
    pub(super) source: Arc<str>,
    /// Our ids to their waiters; `None` once the process is gone.
    pub(super) waiters: Mutex<Option<HashMap<u64, Waiter>>>,
    pub(super) next_id: AtomicU64,
    pub(super) stdin: mpsc::Sender<Bytes>,
    pub(super) exit: Exit,
    /// The process; dropping the last `Pooled` stops it.
    pub(super) process: Process,
    /// Set once the process is ready: `None` when it speaks 2026-07-28 itself, else its
    /// `initialize` result (the process is bridged).
    pub(super) initialized: std::sync::OnceLock<Option<Arc<Initialized>>>,
    /// A caller's own process (see [`StdioSource::caller_pooled`]): its calls waiting for the
    /// agent's input, by handle. `None` for the source's shared process.
    pub(super) parked: Option<Mutex<HashMap<String, Parked>>>,
    /// When a call last started or ended on it: a caller's own process idle past the
    /// source's idle time is stopped (see [`StdioSource::caller_pooled`]).
    last_active: Mutex<std::time::Instant>,
}

impl Pooled {
    /// Starts the process and completes the MCP handshake with it.
    pub(super) async fn start(
        source: &StdioSource,
        limit: usize,
        context: &str,
        caller: Option<&str>,
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
            initialized: std::sync::OnceLock::new(),
            parked: caller.map(|_| Mutex::new(HashMap::new())),
            last_active: Mutex::new(std::time::Instant::now()),
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
        let known = *source.pooled_speaks_stateless.lock();
        if known != Some(false) {
            match pooled
                .ask(source, bridge::discover_request, DISCOVER_TIMEOUT)
                .await
            {
                Ok(answer) if bridge::speaks_stateless(&answer) => {
                    *source.pooled_speaks_stateless.lock() = Some(true);
                    let _ = pooled.initialized.set(None);
                    tracing::info!(source = %source.name, "pooled stdio process speaks 2026-07-28: stateless requests go as they are");
                    return Ok(pooled);
                }
                Err(error @ StdioError::Exited { .. }) => {
                    *source.pooled_speaks_stateless.lock() = Some(false);
                    return Err(error);
                }
                // An error, or no answer: a session-era server.
                _ => *source.pooled_speaks_stateless.lock() = Some(false),
            }
        }
        // The shared process declares no capabilities (no server request can be tied to one of
        // its many calls); a caller's own declares the caller's.
        let capabilities = caller.unwrap_or("{}").to_owned();
        let initialize =
            move |id| bridge::initialize_request(id, POOLED_PROTOCOL_VERSION, &capabilities);
        let answer = pooled.ask(source, initialize, INIT_TIMEOUT).await?;
        let initialized = Initialized::parse(&answer).map_err(|e| StdioError::Init {
            source_name: source.name.to_string(),
            reason: e.to_string(),
        })?;
        pooled
            .send(Bytes::from_static(bridge::INITIALIZED_NOTIFICATION))
            .await;
        let _ = pooled.initialized.set(Some(Arc::new(initialized)));
        tracing::info!(source = %source.name, "pooled stdio process ready for stateless requests");
        Ok(pooled)
    }

    /// Sends a request of `connect`'s own (made by `request` from its id) and waits up to
    /// `timeout` for the answer.
    async fn ask(
        &self,
        source: &StdioSource,
        request: impl FnOnce(u64) -> Bytes,
        timeout: Duration,
    ) -> Result<Bytes, StdioError> {
        let id = self.next_id();
        let (tx, rx) = oneshot::channel();
        if !self.expect(id, Waiter::Internal(tx)) {
            return Err(source.exited(self.exit.status()));
        }
        self.send(request(id)).await;
        let answer = tokio::select! {
            answer = tokio::time::timeout(timeout, rx) => answer,
            () = self.exit.dead.cancelled() => return Err(source.exited(self.exit.status())),
        };
        match answer {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(source.exited(self.exit.status())),
            Err(_) => {
                self.forget(id);
                Err(StdioError::Init {
                    source_name: source.name.to_string(),
                    reason: format!("no answer within {} s", timeout.as_secs()),
                })
            }
        }
    }

    pub(super) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a waiter for our id; false when the process is already gone.
    fn expect(&self, id: u64, waiter: Waiter) -> bool {
        self.touch();
        let mut waiters = self.waiters.lock();
        match waiters.as_mut() {
            Some(waiters) => {
                waiters.insert(id, waiter);
                true
            }
            None => false,
        }
    }

    /// Whether nothing waits on the process (no call in flight, none waiting for input).
    pub(super) fn is_idle(&self) -> bool {
        self.waiters.lock().as_ref().is_none_or(HashMap::is_empty)
    }

    /// Whether nothing has waited on the process for `idle` (zero: never idles out).
    pub(super) fn idle_for(&self, idle: std::time::Duration) -> bool {
        !idle.is_zero() && self.is_idle() && self.last_active.lock().elapsed() >= idle
    }

    fn touch(&self) {
        *self.last_active.lock() = std::time::Instant::now();
    }

    /// Removes the agent's call waiting under our id, unless it waits for the agent's input;
    /// true if there was one.
    fn abandon(&self, id: u64) -> bool {
        let mut waiters = self.waiters.lock();
        let Some(waiters) = waiters.as_mut() else {
            return false;
        };
        if matches!(waiters.get(&id), Some(Waiter::Parked)) {
            return false;
        }
        waiters.remove(&id).is_some()
    }

    /// Removes the waiter of our id; true if it was still waiting.
    pub(super) fn forget(&self, id: u64) -> bool {
        self.touch();
        self.waiters
            .lock()
            .as_mut()
            .and_then(|waiters| waiters.remove(&id))
            .is_some()
    }

    /// The agent's id of the request we sent as `id`, as a key.
    fn original_id(&self, id: u64) -> Option<String> {
        let waiters = self.waiters.lock();
        match waiters.as_ref()?.get(&id)? {
            Waiter::Agent(call) => Some(key(&call.original_id)),
            Waiter::Internal(_) | Waiter::Parked => None,
        }
    }

    /// Writes a line to the process (dropped if it is gone: its waiters are answered then).
    pub(super) async fn send(&self, line: Bytes) {
        tokio::select! {
            _ = self.stdin.send(line) => {}
            () = self.exit.dead.cancelled() => {}
        }
    }
}

/// Cancels the request of this stream (`mine`) that the agent's `notifications/cancelled`
/// names, under the id the server knows.
async fn cancel_mine(mine: &[(Arc<Pooled>, u64)], notification: &[u8]) {
    let target = cancelled_request(notification);
    if let Some((pooled, id)) = mine
        .iter()
        .find(|(pooled, id)| target.as_deref() == pooled.original_id(*id).as_deref())
        && pooled.forget(*id)
    {
        pooled.send(cancelled(*id)).await;
    }
}

/// A `notifications/cancelled` for our id.
pub(super) fn cancelled(id: u64) -> Bytes {
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
    let waiters = pooled.waiters.lock().take().unwrap_or_default();
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

/// Routes one line of the pooled process: an answer to its agent (or to `connect`'s own
/// `initialize`), a progress notification to the agent whose request it is about, and a
/// request of the server answered on the spot.
async fn route_pooled_line(
    pooled: &Arc<Pooled>,
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
    match message.kind {
        MessageKind::Response => {
            let ours = message
                .id
                .as_deref()
                .and_then(|raw| raw.get().parse::<u64>().ok());
            if let Some(id) = ours {
                route_pooled_answer(pooled, id, raw, &line, max_frame).await;
            }
        }
        MessageKind::Notification => {
            route_pooled_progress(pooled, raw, max_frame, message.method.as_deref()).await;
        }
        MessageKind::Request => {
            if let Some(id) = message.id.as_deref()
                && !park(pooled, &line, message.method.as_deref(), max_frame).await
            {
                answer_server_request(stdin, id, message.method.as_deref()).await;
            }
        }
    }
}

/// Sends the pooled process's answer to our request `id` to whoever waits for it; an agent
/// gets it under its own id, then its exchange's `End`.
async fn route_pooled_answer(
    pooled: &Pooled,
    id: u64,
    raw: &RawValue,
    line: &Bytes,
    max_frame: usize,
) {
    pooled.touch();
    let waiter = pooled
        .waiters
        .lock()
        .as_mut()
        .and_then(|waiters| waiters.remove(&id));
    match waiter {
        Some(Waiter::Agent(call)) => {
            let body = match replace_at(raw, &["id"], &call.original_id) {
                Ok((body, _)) => {
                    let body = one_line(Bytes::from(body.get().to_owned()));
                    match &call.completes {
                        Some(method) => bridge::complete(body, Some(method)),
                        None => body,
                    }
                }
                Err(_) => error_body(
                    Some(&call.original_id),
                    codes::INTERNAL_ERROR,
                    &format!(
                        "source {}: its answer could not be re-addressed",
                        pooled.source
                    ),
                ),
            };
            let _ = send_message(&call.out, call.exchange, body, max_frame, &pooled.source).await;
            let _ = call.out.send(Frame::end(call.exchange)).await;
        }
        Some(Waiter::Internal(tx)) => {
            let _ = tx.send(line.clone());
        }
        // Answered without the input it asked for: the agent's retry finds nothing to take
        // up (its parked entry expires).
        Some(Waiter::Parked) | None => {}
    }
}

/// Sends a progress notification of the pooled process to the agent whose request carries
/// its token, under the agent's own token; drops any other notification.
async fn route_pooled_progress(
    pooled: &Pooled,
    raw: &RawValue,
    max_frame: usize,
    method: Option<&str>,
) {
    let token = serde_json::from_str::<Probe<'_>>(raw.get())
        .ok()
        .and_then(|probe| probe.params?.progress_token)
        .and_then(|token| token.get().parse::<u64>().ok());
    let target = token.and_then(|id| {
        let waiters = pooled.waiters.lock();
        match waiters.as_ref()?.get(&id)? {
            Waiter::Agent(call) => Some((
                call.original_token.clone()?,
                call.exchange,
                call.out.clone(),
            )),
            Waiter::Internal(_) | Waiter::Parked => None,
        }
    });
    match target {
        Some((token, exchange, out)) => {
            if let Ok((body, _)) = replace_at(raw, &["params", "progressToken"], &token) {
                let body = one_line(Bytes::from(body.get().to_owned()));
                let _ = send_message(&out, exchange, body, max_frame, &pooled.source).await;
            }
        }
        None => {
            tracing::debug!(source = %pooled.source, method = ?method, "notification of the pooled stdio process dropped");
        }
    }
}

/// Answers a request of the pooled process: `connect` declared no client capabilities to it,
/// so it answers a ping, and refuses anything else.
async fn answer_server_request(
    stdin: &mpsc::WeakSender<Bytes>,
    id: &RawValue,
    method: Option<&str>,
) {
    let answer = if method == Some("ping") {
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
