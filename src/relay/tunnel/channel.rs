//! One exchange stream seen from the relay: numbered requests out, tagged messages back.
//!
//! A [`Channel`] owns a tunnel stream. Agent requests write their frames in order through a
//! shared [`FrameSink`]; a reader task routes each incoming frame by its exchange number to the
//! agent HTTP request waiting for it, and everything that belongs to no waiting request (the
//! upstream's standalone messages, or messages for a request whose agent went away) to the
//! bounded unsolicited queue that the agent's GET stream drains.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::assembly::Assembly;
use super::budget::Budget;
use super::registry::{StreamGuard, Tunnel};
use crate::govern::assertion::Refresher;
use crate::transport::SendHalf;
use crate::transport::{SILENT_AFTER, TransportError, TransportKind};
use crate::wire::{
    Frame, FrameKind, FrameReader, FrameSink, FrameWriter, ListenAfter, OpenHeader, Replay,
    Resumable, SinkError, UNSOLICITED,
};

/// The longest upstream session id a relay seals into an agent's session id (MCP session ids
/// are typically a UUID or a few dozen characters; every request carries the sealed id).
const MAX_UPSTREAM_SESSION_ID: usize = 256;

/// Frames buffered per waiting request before the reader waits for the agent to take them.
const EXCHANGE_QUEUE: usize = 32;

/// Bytes queued toward one waiting request before the reader waits for the agent to take them
/// (one event always passes, whatever its size): with [`EXCHANGE_QUEUE`], what bounds a
/// request's queue in bytes, not only in events of up to the message limit each.
const EXCHANGE_BYTES: usize = 1024 * 1024;

/// Server-to-agent messages held while no GET stream is open. Past this they are dropped
/// (and counted): a session nobody listens to must not grow without bound.
pub(crate) const UNSOLICITED_QUEUE: usize = 256;

/// What an agent request sees arrive for its exchange.
#[derive(Debug)]
pub enum Event {
    /// A JSON-RPC message from the upstream; or, after [`Event::Part`]s, the piece that ends
    /// the message they began.
    Message(Bytes),
    /// A piece of a message that the next `Part`s and a closing [`Event::Message`] continue
    /// ([`FrameKind::MessagePart`]). An [`Event::End`] before the closing piece means the
    /// message was abandoned.
    Part(Bytes),
    /// The message arriving in pieces passed the per-message limit (bytes): the rest of it
    /// is dropped, and [`Event::End`] follows.
    TooLarge(usize),
    /// The upstream answered with this HTTP status (a rejection, message follows).
    Rejected(u16),
    /// The upstream's response is complete.
    End,
    /// The upstream answers with an event stream.
    Streaming,
    /// `connect` replays an answer on this exchange ([`FrameKind::Replay`]): the agent's
    /// message it answers; the answer's messages follow.
    Replaying(Bytes),
}

/// Why a channel operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChannelError {
    /// The stream could not be opened.
    #[error(transparent)]
    Open(#[from] TransportError),
    /// The stream has ended; the text says why.
    #[error("{0}")]
    Closed(String),
}

/// What bounds a channel: how long opening its stream may wait, and the session's byte budget
/// its unsolicited queue charges.
#[derive(Clone)]
pub struct ChannelLimits {
    /// Longest wait for the tunnel to grant the stream.
    pub open_timeout: std::time::Duration,
    /// The session's event budget (see [`Budget`]).
    pub budget: Arc<Budget>,
}

/// A waiting request's queue: its events, and the bytes of them not taken yet.
#[derive(Clone)]
struct Waiting {
    tx: mpsc::Sender<Event>,
    queued: Arc<Queued>,
}

/// Bytes queued toward one request, and a signal when the request takes some.
#[derive(Default)]
struct Queued {
    bytes: std::sync::atomic::AtomicUsize,
    taken: tokio::sync::Notify,
}

/// The bytes an event carries.
fn event_bytes(event: &Event) -> usize {
    match event {
        Event::Message(bytes) | Event::Part(bytes) | Event::Replaying(bytes) => bytes.len(),
        _ => 0,
    }
}

impl Waiting {
    /// Queues `event`, first waiting (while the request lives) until it fits within
    /// [`EXCHANGE_BYTES`] or the queue is empty. Gives the event back if the request is gone.
    async fn send(&self, event: Event) -> Result<(), Event> {
        let len = event_bytes(&event);
        loop {
            let taken = self.queued.taken.notified();
            let queued = self.queued.bytes.load(Ordering::Acquire);
            if queued == 0 || queued.saturating_add(len) <= EXCHANGE_BYTES {
                break;
            }
            tokio::select! {
                () = taken => {}
                () = self.tx.closed() => return Err(event),
            }
        }
        self.queued.bytes.fetch_add(len, Ordering::AcqRel);
        self.tx
            .send(event)
            .await
            .map_err(|mpsc::error::SendError(event)| {
                self.queued.bytes.fetch_sub(len, Ordering::AcqRel);
                event
            })
    }
}

struct Shared {
    pending: Mutex<HashMap<u64, Waiting>>,
    /// Charged by messages waiting in the unsolicited queue.
    budget: Arc<Budget>,
    closed: Mutex<Option<String>>,
    /// Taken on close, so the GET stream's producer sees the end.
    unsolicited_tx: Mutex<Option<mpsc::Sender<(u64, Bytes)>>>,
    /// What `connect` last said of the session's upstream ([`FrameKind::Resumable`]).
    resumable: Mutex<Option<Resumable>>,
    /// Woken when `resumable` is set or the stream closes.
    resumable_changed: tokio::sync::Notify,
    /// `connect` ended the stream with `Close` (it refused it, or ended the session), rather
    /// than the stream or its tunnel breaking.
    closed_by_peer: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn close(&self, reason: String) {
        let mut closed = self.closed.lock();
        if closed.is_none() {
            *closed = Some(reason);
        }
        // Dropping the senders ends every waiting request's stream of events, and the
        // unsolicited queue's ends the GET stream's producer.
        self.pending.lock().clear();
        self.unsolicited_tx.lock().take();
        drop(closed);
        self.resumable_changed.notify_waiters();
    }

    fn closed_reason(&self) -> Option<String> {
        self.closed.lock().clone()
    }
}

/// The relay's end of one exchange stream.
pub struct Channel {
    shared: Arc<Shared>,
    /// The transport of the tunnel carrying the stream (for the audit trail).
    transport: TransportKind,
    /// Requests are written by the agent's task itself, in order.
    sink: FrameSink<SendHalf>,
    next_exchange: AtomicU64,
    unsolicited_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<(u64, Bytes)>>>,
    /// The session's event budget; messages in the unsolicited queue are charged to it.
    budget: Arc<Budget>,
    /// Renews the stream's identity assertion, when it has one.
    identity: Option<Refresher>,
    /// The wire version agreed with the `connect` on the other end.
    wire_version: u32,
    /// The instance id of that `connect` (wire version 2).
    connect: Option<Arc<str>>,
    /// Signals the reader to stop when the channel is dropped.
    _stop: oneshot::Sender<()>,
    guard: StreamGuard,
}

/// Picks an answer up again when the tunnel stream carrying it ends while the relay lives
/// (see [`Exchange::reattach_with`]): given how many of the answer's messages arrived, a new
/// exchange on another stream on which `connect` replays the rest, its first event
/// ([`Event::Replaying`]) already taken; `None` when it cannot.
pub(crate) type Reattach =
    Arc<dyn Fn(u64) -> futures_util::future::BoxFuture<'static, Option<Exchange>> + Send + Sync>;

/// An agent request in flight: its events, and its registration, removed on drop.
pub struct Exchange {
    /// The exchange number.
    pub id: u64,
    events: mpsc::Receiver<Event>,
    queued: Arc<Queued>,
    shared: Arc<Shared>,
    /// Whole messages taken so far, and whether a message in pieces is open.
    taken: (u64, bool),
    reattach: Option<Reattach>,
    /// The channel of a reattached exchange, kept open while it is read.
    channel: Option<Arc<Channel>>,
}

impl Exchange {
    /// The next event, or the reason the stream ended. When the stream ends between two
    /// messages of the answer and the exchange can be [reattached](Exchange::reattach_with),
    /// the answer goes on from the new stream.
    pub async fn next(&mut self) -> Result<Event, ChannelError> {
        loop {
            if let Some(event) = self.events.recv().await {
                self.queued
                    .bytes
                    .fetch_sub(event_bytes(&event), Ordering::AcqRel);
                self.queued.taken.notify_waiters();
                match &event {
                    Event::Message(_) => self.taken = (self.taken.0 + 1, false),
                    Event::Part(_) => self.taken.1 = true,
                    _ => {}
                }
                return Ok(event);
            }
            let reason = self
                .shared
                .closed_reason()
                .unwrap_or_else(|| "tunnel stream ended".into());
            let (messages, in_pieces) = self.taken;
            let Some(reattach) = self.reattach.clone().filter(|_| !in_pieces) else {
                return Err(ChannelError::Closed(reason));
            };
            tracing::info!(reason = %reason, messages, "an answer's tunnel stream ended: picking the answer up on another");
            match reattach(messages).await {
                Some(mut next) => {
                    next.taken = self.taken;
                    next.reattach = Some(reattach);
                    metrics::counter!(crate::metrics::ANSWERS_REATTACHED).increment(1);
                    *self = next;
                }
                None => return Err(ChannelError::Closed(reason)),
            }
        }
    }

    /// Lets the answer go on when the tunnel stream carrying it ends while the relay lives:
    /// `reattach` gives the exchange it goes on from (see [`Reattach`]).
    pub fn reattach_with(&mut self, reattach: Option<Reattach>) {
        self.reattach = reattach;
    }

    /// Keeps `channel` open while the exchange is read (one opened for a reattach only).
    pub fn keeping(mut self, channel: Arc<Channel>) -> Self {
        self.channel = Some(channel);
        self
    }

    /// The channel the exchange goes on after a reattach, if it was reattached: what the
    /// relay says about the request (its cancellation) goes there now.
    pub fn reattached_to(&self) -> Option<&Arc<Channel>> {
        self.channel.as_ref()
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.shared.pending.lock().remove(&self.id);
    }
}

impl Channel {
    /// Opens a stream on `tunnel` and sends `header`.
    pub async fn open(
        tunnel: &Arc<Tunnel>,
        header: &OpenHeader,
        read_limit: usize,
        limits: ChannelLimits,
    ) -> Result<Arc<Self>, ChannelError> {
        Self::open_with_identity(tunnel, header, read_limit, read_limit, None, limits).await
    }

    /// Opens a stream on `tunnel` and sends `header`, whose identity assertion `identity`
    /// renews: before a message, once the assertion is past half its lifetime, a fresh one
    /// goes first ([`FrameKind::Identity`]). Frames read are bounded by `read_limit`; one
    /// message arriving in pieces ([`FrameKind::MessagePart`]) by `answer_limit`.
    pub async fn open_with_identity(
        tunnel: &Arc<Tunnel>,
        header: &OpenHeader,
        read_limit: usize,
        answer_limit: usize,
        identity: Option<Refresher>,
        limits: ChannelLimits,
    ) -> Result<Arc<Self>, ChannelError> {
        let (stream, guard) = tunnel.open_stream(limits.open_timeout).await?;
        let (unsolicited_tx, unsolicited_rx) = mpsc::channel(UNSOLICITED_QUEUE);
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            budget: limits.budget.clone(),
            closed: Mutex::default(),
            unsolicited_tx: Mutex::new(Some(unsolicited_tx)),
            resumable: Mutex::default(),
            resumable_changed: tokio::sync::Notify::new(),
            closed_by_peer: Default::default(),
        });
        let (stop, stopped) = oneshot::channel();

        // The peer's limit bounds what we send; ours bounds what we read.
        let sink = FrameSink::new(FrameWriter::new(stream.send, tunnel.terms.max_frame));
        if let Err(e) = sink.send(Frame::json(FrameKind::Open, header)).await {
            return Err(ChannelError::Closed(e.to_string()));
        }

        let mut frames_in = FrameReader::new(stream.recv, read_limit);
        let read_shared = shared.clone();
        let connection = tunnel.connection.clone();
        tokio::spawn(async move {
            let reason = tokio::select! {
                reason = read_loop(&mut frames_in, &read_shared, answer_limit.max(read_limit)) => reason,
                _ = stopped => "session ended".to_owned(),
            };
            read_shared.close(lost_reason(reason, connection.silent_for()));
        });

        Ok(Arc::new(Self {
            shared,
            transport: tunnel.connection.kind(),
            sink,
            next_exchange: AtomicU64::new(1),
            unsolicited_rx: Arc::new(tokio::sync::Mutex::new(unsolicited_rx)),
            budget: limits.budget,
            identity,
            wire_version: tunnel.terms.wire_version,
            connect: tunnel.terms.connect.clone(),
            _stop: stop,
            guard,
        }))
    }

    /// Forwards a message that expects answers, returning the exchange to read them from.
    pub async fn request(&self, message: Bytes) -> Result<Exchange, ChannelError> {
        let exchange = self.reserve()?;
        self.send_request(&exchange, message).await?;
        Ok(exchange)
    }

    /// Sends a request on the exchange [`Channel::reserve`] registered.
    pub async fn send_request(
        &self,
        exchange: &Exchange,
        message: Bytes,
    ) -> Result<(), ChannelError> {
        self.renew_identity().await?;
        self.send_frame(Frame::message(exchange.id, message)).await
    }

    /// Whether `connect` keeps this stream's answers for a replay (wire version 3).
    pub fn replays(&self) -> bool {
        self.wire_version >= 3
    }

    /// Asks `connect` to replay an answer another stream of the session carried (see
    /// [`FrameKind::Replay`]), returning the exchange it arrives on: first
    /// [`Event::Replaying`], or [`Event::End`] when `connect` cannot.
    pub async fn replay(&self, replay: &Replay) -> Result<Exchange, ChannelError> {
        let exchange = self.reserve()?;
        let payload = serde_json::to_vec(replay)
            .expect("wire types serialize infallibly: plain structs of numbers");
        self.send_frame(Frame {
            kind: FrameKind::Replay,
            exchange: exchange.id,
            payload: Bytes::from(payload),
        })
        .await?;
        Ok(exchange)
    }

    /// Registers a new exchange before its first frame goes (for a request, by
    /// [`Channel::send_request`]): its number names the answer's events before `connect` has
    /// the request.
    pub fn reserve(&self) -> Result<Exchange, ChannelError> {
        let id = self.next_exchange.fetch_add(1, Ordering::Relaxed);
        let (tx, events) = mpsc::channel(EXCHANGE_QUEUE);
        let queued = Arc::new(Queued::default());
        {
            if let Some(reason) = self.shared.closed_reason() {
                return Err(ChannelError::Closed(reason));
            }
            self.shared.pending.lock().insert(
                id,
                Waiting {
                    tx,
                    queued: queued.clone(),
                },
            );
        }
        Ok(Exchange {
            id,
            events,
            queued,
            shared: self.shared.clone(),
            taken: (0, false),
            reattach: None,
            channel: None,
        })
    }

    /// Forwards a message that expects no answer (a notification, or the agent's response to a
    /// server request).
    pub async fn send(&self, message: Bytes) -> Result<(), ChannelError> {
        let id = self.next_exchange.fetch_add(1, Ordering::Relaxed);
        self.renew_identity().await?;
        self.send_frame(Frame::message(id, message)).await
    }

    /// Hands the stream's identity refresher the signer configured now and the caller as the
    /// current request authenticated it: a reloaded key, lifetime or role set then applies to
    /// the assertion the next message carries (see [`Refresher::update`]).
    pub fn update_identity(
        &self,
        signer: Option<&Arc<crate::govern::assertion::AssertionSigner>>,
        who: &crate::govern::Identity,
    ) {
        if let Some(refresher) = &self.identity {
            refresher.update(signer, who);
        }
    }

    /// Sends a fresh identity assertion ahead of the next message when the one in use is past
    /// half its lifetime. If signing fails the old one stays (and the upstream decides).
    async fn renew_identity(&self) -> Result<(), ChannelError> {
        let Some(refresher) = &self.identity else {
            return Ok(());
        };
        match refresher.due(std::time::Instant::now()) {
            Ok(Some(assertion)) => self.send_frame(Frame::identity(&assertion)).await,
            Ok(None) => Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "identity assertion not renewed");
                Ok(())
            }
        }
    }

    async fn send_frame(&self, frame: Frame) -> Result<(), ChannelError> {
        if let Some(reason) = self.shared.closed_reason() {
            return Err(ChannelError::Closed(reason));
        }
        self.sink.send(frame).await.map_err(|SinkError(why)| {
            let reason = format!("tunnel stream write failed: {why}");
            self.shared.close(reason.clone());
            ChannelError::Closed(reason)
        })
    }

    /// The queue of messages for the agent's GET stream, each with its number in the session
    /// ([`FrameKind::Event`]; [`UNSOLICITED`] for an unnumbered one); one holder at a time.
    /// Each message taken from it is charged to [`Channel::budget`] until the taker calls
    /// [`Budget::release`] with its length.
    pub fn unsolicited(
        &self,
    ) -> Option<tokio::sync::OwnedMutexGuard<mpsc::Receiver<(u64, Bytes)>>> {
        self.unsolicited_rx.clone().try_lock_owned().ok()
    }

    /// The session's event budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// The transport of the tunnel carrying this stream (`quic` or `https`).
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// Why the stream ended, if it has.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.closed_reason()
    }

    /// Whether `connect` ended the stream with `Close` (it refused it, or the session ended
    /// there), not the stream or its tunnel breaking.
    pub fn closed_by_peer(&self) -> bool {
        self.shared.closed_by_peer.load(Ordering::Acquire)
    }

    /// Whether the tunnel carrying the stream has gone silent (its `connect` may be dead: see
    /// [`super::registry::Tunnel::silent`]).
    pub fn tunnel_silent(&self) -> bool {
        self.guard.tunnel().silent()
    }

    /// The instance id of the `connect` on the other end, if it said (wire version 2).
    pub fn connect_instance(&self) -> Option<&str> {
        self.connect.as_deref()
    }

    /// What `connect` said of the session's upstream, if it has ([`FrameKind::Resumable`]):
    /// on a new session, before its answer to `initialize`.
    pub fn resumable(&self) -> Option<Resumable> {
        self.shared.resumable.lock().clone()
    }

    /// Waits, at most `timeout`, for `connect` to confirm it resumed the session this stream
    /// names; the error says why not (it closed the stream: the session is gone; or it did
    /// not answer in time).
    pub async fn resumed(&self, timeout: std::time::Duration) -> Result<Resumable, ChannelError> {
        let wait = async {
            loop {
                let changed = self.shared.resumable_changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if let Some(resumable) = self.resumable() {
                    return Ok(resumable);
                }
                if let Some(reason) = self.shared.closed_reason() {
                    return Err(ChannelError::Closed(reason));
                }
                changed.await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| {
                Err(ChannelError::Closed(format!(
                    "the tunnel client did not resume the session within {} s",
                    timeout.as_secs()
                )))
            })
    }

    /// Tells `connect` the agent listens on this stream for the session's server-initiated
    /// messages ([`FrameKind::Listen`]; a `connect` of wire version 1 has one stream per
    /// session and is not told).
    pub async fn listen(&self) {
        if self.wire_version >= 2 {
            let _ = self.send_frame(Frame::listen()).await;
        }
    }

    /// Tells `connect` the agent resumes its GET stream here, having the session's
    /// server-initiated messages up to number `after`: `connect` sends again those it keeps
    /// after it ([`ListenAfter`]). Only when [`Channel::numbers_events`].
    pub async fn listen_after(&self, after: u64) {
        if self.numbers_events() {
            let _ = self
                .send_frame(Frame::json(FrameKind::Listen, &ListenAfter { after }))
                .await;
        }
    }

    /// Whether `connect` numbers the session's server-initiated messages on this stream
    /// ([`FrameKind::Event`], wire version 4).
    pub fn numbers_events(&self) -> bool {
        self.wire_version >= 4
    }

    /// Asks the peer to end the stream, with a reason.
    pub async fn close(&self, reason: &str) {
        let _ = self.sink.send(Frame::close(reason)).await;
        self.shared.close(reason.to_owned());
    }
}

/// Why a stream ended, as its requests in flight are told: a stream that failed on a
/// connection whose peer was silent past [`SILENT_AFTER`] (a `connect` killed without a word,
/// or cut off from the network, until the [idle timeout](crate::transport::IDLE_TIMEOUT)
/// closed it) says so, rather than only "connection lost".
fn lost_reason(reason: String, silent_for: std::time::Duration) -> String {
    if reason.starts_with(STREAM_FAILED) && silent_for >= SILENT_AFTER {
        format!(
            "the tunnel connection was lost: its tunnel client was not heard from for {:.0} s",
            silent_for.as_secs_f64()
        )
    } else {
        reason
    }
}

/// The start of the reason of a stream that failed (not ended by either side).
const STREAM_FAILED: &str = "tunnel stream failed";

/// Reads frames until the stream ends; returns why it ended.
async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    frames: &mut FrameReader<R>,
    shared: &Shared,
    limit: usize,
) -> String {
    let mut assembly = Assembly::new(limit);
    loop {
        let frame = match frames.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return "the tunnel client ended the stream".into(),
            Err(e) => return format!("{STREAM_FAILED}: {e}"),
        };
        if frame.kind == FrameKind::Resumable {
            match frame.parse_json::<Resumable>(FrameKind::Resumable) {
                Ok(mut resumable) => {
                    if resumable
                        .upstream_session
                        .as_ref()
                        .is_some_and(|id| id.len() > MAX_UPSTREAM_SESSION_ID)
                    {
                        // It would bloat every session id sealed around it: such a session
                        // continues only while its stream lives.
                        resumable = Resumable::default();
                    }
                    *shared.resumable.lock() = Some(resumable);
                    shared.resumable_changed.notify_waiters();
                    continue;
                }
                Err(e) => return format!("protocol error: bad resumable frame: {e}"),
            }
        }
        if frame.kind == FrameKind::Event {
            if frame.exchange == UNSOLICITED {
                return "protocol error: a server-initiated message numbered 0".into();
            }
            shared.queue_unsolicited(frame.exchange, frame.payload);
            continue;
        }
        if frame.kind == FrameKind::Close {
            shared.closed_by_peer.store(true, Ordering::Release);
        }
        let exchange = frame.exchange;
        match assembly.event(frame) {
            Ok(Some((event, closes_pieces))) => {
                shared.deliver(exchange, event, closes_pieces).await
            }
            Ok(None) => {}
            Err(why) => return why,
        }
    }
}

impl Shared {
    /// Hands `event` to the request waiting on `exchange`. A whole message with no waiting
    /// request goes to the GET stream; pieces of one (its request went away mid-answer), ends
    /// and statuses of requests nobody waits for any more are simply done.
    async fn deliver(&self, exchange: u64, event: Event, closes_pieces: bool) {
        let waiting = if exchange == UNSOLICITED {
            None
        } else {
            self.pending.lock().get(&exchange).cloned()
        };
        let undelivered = match waiting {
            Some(waiting) => waiting.send(event).await.err(),
            None => Some(event),
        };
        let Some(Event::Message(message)) = undelivered else {
            return;
        };
        if closes_pieces {
            return;
        }
        // An answer whose request went away belongs to that request's stream only (where a
        // resuming agent finds it, when the stream was kept); on the GET stream an agent could
        // not tell it from an answer it is owed (2025-11-25 forbids it).
        if exchange != UNSOLICITED && is_response(&message) {
            metrics::counter!(crate::metrics::DROPPED_MESSAGES).increment(1);
            tracing::debug!(
                exchange,
                "answer of a request nobody waits for any more dropped"
            );
            return;
        }
        self.queue_unsolicited(UNSOLICITED, message);
    }

    /// Queues a message for the agent's GET stream, with its number in the session
    /// ([`FrameKind::Event`]), or [`UNSOLICITED`] for none; dropped when the session's budget
    /// or the queue is full.
    fn queue_unsolicited(&self, number: u64, message: Bytes) {
        let len = message.len();
        let queued = self.budget.fits(len)
            && self.unsolicited_tx.lock().clone().is_some_and(|tx| {
                self.budget.charge(len);
                let sent = tx.try_send((number, message)).is_ok();
                if !sent {
                    self.budget.release(len);
                }
                sent
            });
        if !queued {
            metrics::counter!(crate::metrics::DROPPED_MESSAGES).increment(1);
            tracing::warn!(
                bytes = len,
                "server-to-agent message dropped: no agent stream is reading and the session's queue is full"
            );
        }
    }
}

/// Whether `message` is a JSON-RPC response (or a batch of them only).
fn is_response(message: &[u8]) -> bool {
    crate::mcp::classify(message).is_ok_and(|classified| {
        classified
            .messages()
            .iter()
            .all(|m| m.kind == crate::mcp::jsonrpc::MessageKind::Response)
    })
}

#[cfg(test)]
#[path = "channel_tests.rs"]
mod tests;
