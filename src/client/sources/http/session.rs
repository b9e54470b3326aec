//! One MCP client session with a Streamable HTTP upstream, shared by every tunnel stream that
//! carries it (see [`crate::client::sources::held`]): the upstream's session id and negotiated
//! version, the caller's latest identity assertion, the upstream's standalone GET stream, and
//! which stream the agent listens on for what that GET stream brings.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::HeaderValue;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::context::StreamContext;
use crate::client::sources::outlet::Outlet;
use crate::client::sources::replay::SourceBytes;
use crate::govern::assertion::Assertion;
use crate::mcp::bridge::{Declared, Initialized};
use crate::wire::{Frame, Resumable};

/// Where the agent's answer to a request asked of it goes: its result, or its error.
pub(super) type Answering =
    tokio::sync::oneshot::Sender<Result<serde_json::Value, serde_json::Value>>;

/// What the upstream said of the session.
#[derive(Default)]
pub(super) struct UpstreamState {
    /// The upstream's `Mcp-Session-Id`.
    pub(super) id: Option<HeaderValue>,
    /// The protocol version negotiated by `initialize`.
    pub(super) version: Option<HeaderValue>,
}

impl UpstreamState {
    /// Keeps the upstream's `Mcp-Session-Id` as its own copy: a header value hyper parsed is a
    /// slice of the connection's read buffer, and keeping it would keep that whole buffer
    /// (kilobytes) for as long as the session lives.
    pub(super) fn keep_id(&mut self, id: &HeaderValue) {
        let own = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(id.as_bytes()));
        self.id = Some(own.unwrap_or_else(|_| id.clone()));
    }
}

/// One upstream session.
pub(super) struct HttpSession {
    /// The handle it is held under; `None` for a session that ends with its stream (the
    /// stateless era, or a relay of wire version 1).
    pub(super) handle: Option<String>,
    pub(super) upstream: Mutex<UpstreamState>,
    /// The latest identity assertion: the open header's, then each one a relay renews it with.
    pub(super) assertion: Mutex<Option<Assertion>>,
    /// The streams carrying it, and what is kept of its answers and server-initiated
    /// messages (held sessions only).
    pub(super) outlet: Arc<Outlet>,
    /// The context the session's own tasks run in (the GET stream, the final DELETE): it has
    /// no stream of its own. Taken when the session ends (it points back at the session).
    tasks: Mutex<Option<Arc<StreamContext>>>,
    /// A bridged session's `initialize` result (see [`super::bridge`]): what an agent's
    /// `server/discover` is answered from.
    pub(super) initialized: Mutex<Option<Arc<Initialized>>>,
    /// A session bridged to an upstream that speaks only 2026-07-28 (see
    /// [`super::stateless_upstream`]): what the agent's `initialize` declared, which each of
    /// its requests carries.
    pub(super) declared: Mutex<Option<Arc<Declared>>>,
    /// A bridged session's client capabilities (JSON), declared in our own `initialize`: the
    /// agents' it serves (see [`super::bridge`]).
    pub(super) capabilities: Mutex<String>,
    /// Requests of a bridged 2026-07-28 upstream asked of the agent, waiting for its answers,
    /// by id (JSON text; see [`super::stateless_upstream`]).
    pub(super) asked: Mutex<HashMap<String, Answering>>,
    /// The `x-mcp-header` annotations of a 2026-07-28 upstream's tools, by tool name, once
    /// listed (see [`super::stateless_upstream`]): the `Mcp-Param-*` headers each call carries.
    pub(super) param_annotations:
        tokio::sync::Mutex<Option<Arc<HashMap<String, crate::mcp::bridge::ParamAnnotations>>>>,
    /// The number in the id of the next request asked of the agent.
    asked_ids: AtomicU64,
    /// The agent's requests in flight to a 2026-07-28 upstream, by id (see
    /// [`crate::client::sources::routing::key`]): its `notifications/cancelled` stops one.
    pub(super) cancels: Mutex<HashMap<String, tokio_util::sync::CancellationToken>>,
    /// The running GET stream, if any. Not its `JoinHandle`: a handle keeps the finished task's
    /// allocation (sized for the whole stream future) until the session ends, kilobytes per
    /// idle session whose upstream refused the GET at once.
    get_stream: Mutex<Option<GetStream>>,
    gone: std::sync::atomic::AtomicBool,
    /// A bridged session's requests from its upstream's GET stream (see [`Asks`]); `None`
    /// for every other session.
    asks: Mutex<Option<Arc<Asks>>>,
}

/// Requests a bridged session's upstream sent its client on the GET stream: a request made in
/// mid-call without naming the call it belongs to (the TypeScript SDK's `server.request()`
/// from a tool handler is one). A bridged session carries one call at a time (see
/// [`super::pool`]), so they belong to that call, which takes them as if they had come on its
/// own answer stream ([`HttpSession::next_ask`]).
#[derive(Default)]
struct Asks {
    queue: Mutex<std::collections::VecDeque<bytes::Bytes>>,
    arrived: tokio::sync::Notify,
}

/// Requests held for a bridged session's call, at most: the upstream waits for each answer,
/// so more than a few at once is no server's call flow; past it they are dropped.
const MAX_ASKS: usize = 4;

/// A session's standalone GET stream task: how to stop it, and whether it still runs.
struct GetStream {
    stop: tokio_util::sync::CancellationToken,
    running: Arc<std::sync::atomic::AtomicBool>,
}

impl HttpSession {
    /// A session under `handle` (if held), known to the upstream as `upstream`, whose kept
    /// answers count against its source's `replay_bytes`.
    pub(super) fn new(
        handle: Option<String>,
        upstream: UpstreamState,
        assertion: Option<Assertion>,
        replay_bytes: SourceBytes,
    ) -> Self {
        Self {
            handle,
            upstream: Mutex::new(upstream),
            assertion: Mutex::new(assertion),
            outlet: Arc::new(Outlet::new(replay_bytes)),
            tasks: Mutex::default(),
            initialized: Mutex::default(),
            declared: Mutex::default(),
            capabilities: Mutex::new("{}".into()),
            asked: Mutex::default(),
            param_annotations: tokio::sync::Mutex::const_new(None),
            asked_ids: AtomicU64::new(1),
            cancels: Mutex::default(),
            get_stream: Mutex::default(),
            gone: Default::default(),
            asks: Mutex::default(),
        }
    }

    /// The upstream's session id, if it issued one.
    pub(super) fn id(&self) -> Option<HeaderValue> {
        self.upstream.lock().id.clone()
    }

    /// What a relay seals into the agent's session id to resume this one: anywhere, unless it
    /// is bridged to a 2026-07-28 upstream (what the agent declared lives only here).
    pub(super) fn resumable(&self) -> Resumable {
        Resumable {
            upstream_session: self.id().and_then(|id| id.to_str().ok().map(str::to_owned)),
            portable: self.declared().is_none(),
        }
    }

    /// A fresh id (a JSON string) for a request asked of the agent.
    pub(super) fn next_asked_id(&self) -> String {
        let n = self.asked_ids.fetch_add(1, Ordering::Relaxed);
        format!("mcp-tunnel-input-{n}")
    }

    /// What the agent declared, when the session is bridged to a 2026-07-28 upstream.
    pub(super) fn declared(&self) -> Option<Arc<Declared>> {
        self.declared.lock().clone()
    }

    /// Sends a server-initiated message toward the agent: on the stream it listens on, else
    /// the latest attached one. A held session's are numbered and kept (see
    /// [`KeptEvents`](crate::client::sources::events::KeptEvents)); another's is dropped (the agent reads nothing now) when no stream
    /// lives.
    pub(super) async fn send_unsolicited(&self, frame: Frame) {
        if self.handle.is_some() {
            let outlet = &self.outlet;
            return outlet.events.send(&outlet.streams, frame.payload).await;
        }
        match self.outlet.streams.unsolicited_target() {
            Some((out, _)) => {
                let _ = out.send(frame).await;
            }
            None => {
                metrics::counter!(crate::metrics::DROPPED_MESSAGES).increment(1);
                tracing::debug!(
                    "server-to-agent message dropped: no stream carries its session now"
                );
            }
        }
    }

    /// Gives the session the context its own tasks run in, unless it has one: a context
    /// without a stream of its own (see [`StreamContext::for_session`]), kept until the
    /// session ends.
    pub(super) fn set_tasks(&self, tasks: impl FnOnce() -> Arc<StreamContext>) {
        let mut slot = self.tasks.lock();
        if slot.is_none() {
            *slot = Some(tasks());
        }
    }

    /// Starts the upstream's standalone GET stream, once, when the upstream gave the session
    /// an id. The receiver hears when the upstream answered the GET (or it failed): an upstream
    /// may drop what it sends while no GET stream is open, so requests wait for it (see
    /// `StreamContext::run`).
    pub(super) fn start_get_stream(&self) -> Option<oneshot::Receiver<()>> {
        let mut get_stream = self.get_stream.lock();
        // One at a time; a bridged session opened anew upstream starts another.
        let running = get_stream
            .as_ref()
            .is_some_and(|stream| stream.running.load(Ordering::Acquire));
        if running || (self.id().is_none() && self.declared().is_none()) {
            return None;
        }
        let tasks = self.tasks.lock().clone()?;
        let (opened, answered) = oneshot::channel();
        let stream = GetStream {
            stop: tokio_util::sync::CancellationToken::new(),
            running: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        };
        let (stop, running) = (stream.stop.clone(), stream.running.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = tasks.standalone_stream(Some(opened)) => {}
                () = stop.cancelled() => {}
            }
            running.store(false, Ordering::Release);
        });
        *get_stream = Some(stream);
        Some(answered)
    }

    /// The upstream forgot the session (it answered 404): nothing may resume it.
    pub(super) fn mark_gone(&self) {
        self.gone.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A bridged session opened anew upstream after the upstream forgot it.
    pub(super) fn revive(&self) {
        self.gone.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the upstream forgot the session.
    pub(super) fn is_gone(&self) -> bool {
        self.gone.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes the upstream's requests from its GET stream for the call that has this bridged
    /// session; forgets any left from a call before.
    pub(super) fn take_asks(&self) {
        let mut asks = self.asks.lock();
        match &*asks {
            Some(asks) => asks.queue.lock().clear(),
            None => *asks = Some(Arc::default()),
        }
    }

    /// Holds a request the upstream sent on the GET stream of a bridged session for its call;
    /// `false` when none takes them, or too many wait.
    pub(super) fn push_ask(&self, request: bytes::Bytes) -> bool {
        let Some(asks) = self.asks.lock().clone() else {
            return false;
        };
        let mut queue = asks.queue.lock();
        if queue.len() >= MAX_ASKS {
            return false;
        }
        queue.push_back(request);
        asks.arrived.notify_one();
        true
    }

    /// The next request the upstream sent on a bridged session's GET stream; never, for any
    /// other session.
    pub(super) async fn next_ask(&self) -> bytes::Bytes {
        let Some(asks) = self.asks.lock().clone() else {
            return std::future::pending().await;
        };
        loop {
            let arrived = asks.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(request) = asks.queue.lock().pop_front() {
                return request;
            }
            arrived.await;
        }
    }

    /// Ends the session: stops its GET stream and DELETEs it upstream (through `context`, or
    /// the session's own task context).
    pub(super) async fn end(&self, context: Option<&StreamContext>) {
        if let Some(stream) = self.get_stream.lock().take() {
            stream.stop.cancel();
        }
        let tasks = self.tasks.lock().take();
        match context.or(tasks.as_deref()) {
            Some(context) => context.delete_upstream_session().await,
            None => tracing::debug!("upstream session ended without a context to delete it in"),
        }
    }
}
