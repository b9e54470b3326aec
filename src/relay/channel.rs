//! One exchange stream seen from the relay: numbered requests out, tagged messages back.
//!
//! A [`Channel`] owns a tunnel stream. A writer task sends frames in order; a reader task routes
//! each incoming frame by its exchange number to the agent HTTP request waiting for it, and
//! everything that belongs to no waiting request (the upstream's standalone messages, or
//! messages for a request whose agent went away) to the bounded unsolicited queue that the
//! agent's GET stream drains.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::registry::{StreamGuard, Tunnel};
use crate::govern::assertion::Refresher;
use crate::transport::SendHalf;
use crate::transport::{TransportError, TransportKind};
use crate::wire::{
    Frame, FrameKind, FrameReader, FrameSink, FrameWriter, OpenHeader, SinkError, UNSOLICITED,
};

/// Frames buffered per waiting request before the reader waits for the agent to take them.
const EXCHANGE_QUEUE: usize = 32;

/// Server-to-agent messages held while no GET stream is open. Past this they are dropped
/// (and counted): a session nobody listens to must not grow without bound.
pub const UNSOLICITED_QUEUE: usize = 256;

/// What an agent request sees arrive for its exchange.
#[derive(Debug)]
pub enum Event {
    /// A JSON-RPC message from the upstream.
    Message(Bytes),
    /// The upstream answered with this HTTP status (a rejection, message follows).
    Rejected(u16),
    /// The upstream's response is complete.
    End,
    /// The upstream answers with an event stream.
    Streaming,
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

struct Shared {
    pending: Mutex<HashMap<u64, mpsc::Sender<Event>>>,
    closed: Mutex<Option<String>>,
    /// Taken on close, so the GET stream's producer sees the end.
    unsolicited_tx: Mutex<Option<mpsc::Sender<Bytes>>>,
}

impl Shared {
    fn close(&self, reason: String) {
        let mut closed = self
            .closed
            .lock()
            .expect("channel lock is never held across a panic");
        if closed.is_none() {
            *closed = Some(reason);
        }
        // Dropping the senders ends every waiting request's stream of events.
        self.pending
            .lock()
            .expect("channel lock is never held across a panic")
            .clear();
    }

    fn closed_reason(&self) -> Option<String> {
        self.closed
            .lock()
            .expect("channel lock is never held across a panic")
            .clone()
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
    unsolicited_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Bytes>>>,
    /// Renews the stream's identity assertion, when it has one.
    identity: Option<Refresher>,
    /// Signals the reader to stop when the channel is dropped.
    _stop: oneshot::Sender<()>,
    _guard: StreamGuard,
}

/// An agent request in flight: its events, and its registration, removed on drop.
pub struct Exchange {
    /// The exchange number.
    pub id: u64,
    events: mpsc::Receiver<Event>,
    shared: Arc<Shared>,
}

impl Exchange {
    /// The next event, or the reason the stream ended.
    pub async fn next(&mut self) -> Result<Event, ChannelError> {
        match self.events.recv().await {
            Some(event) => Ok(event),
            None => Err(ChannelError::Closed(
                self.shared
                    .closed_reason()
                    .unwrap_or_else(|| "tunnel stream ended".into()),
            )),
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.shared
            .pending
            .lock()
            .expect("channel lock is never held across a panic")
            .remove(&self.id);
    }
}

impl Channel {
    /// Opens a stream on `tunnel` and sends `header`.
    pub async fn open(
        tunnel: &Arc<Tunnel>,
        header: &OpenHeader,
        read_limit: usize,
    ) -> Result<Arc<Self>, ChannelError> {
        Self::open_with_identity(tunnel, header, read_limit, None).await
    }

    /// Opens a stream on `tunnel` and sends `header`, whose identity assertion `identity`
    /// renews: before a message, once the assertion is past half its lifetime, a fresh one
    /// goes first ([`FrameKind::Identity`]).
    pub async fn open_with_identity(
        tunnel: &Arc<Tunnel>,
        header: &OpenHeader,
        read_limit: usize,
        identity: Option<Refresher>,
    ) -> Result<Arc<Self>, ChannelError> {
        let (stream, guard) = tunnel.open_stream().await?;
        let (unsolicited_tx, unsolicited_rx) = mpsc::channel(UNSOLICITED_QUEUE);
        let shared = Arc::new(Shared {
            pending: Mutex::default(),
            closed: Mutex::default(),
            unsolicited_tx: Mutex::new(Some(unsolicited_tx)),
        });
        let (stop, stopped) = oneshot::channel();

        // The peer's limit bounds what we send; ours bounds what we read.
        let sink = FrameSink::new(FrameWriter::new(stream.send, tunnel.max_frame));
        if let Err(e) = sink.send(Frame::json(FrameKind::Open, header)).await {
            return Err(ChannelError::Closed(e.to_string()));
        }

        let mut frames_in = FrameReader::new(stream.recv, read_limit);
        let read_shared = shared.clone();
        tokio::spawn(async move {
            let reason = tokio::select! {
                reason = read_loop(&mut frames_in, &read_shared) => reason,
                _ = stopped => "session ended".to_owned(),
            };
            read_shared.close(reason);
        });

        Ok(Arc::new(Self {
            shared,
            transport: tunnel.connection.kind(),
            sink,
            next_exchange: AtomicU64::new(1),
            unsolicited_rx: Arc::new(tokio::sync::Mutex::new(unsolicited_rx)),
            identity,
            _stop: stop,
            _guard: guard,
        }))
    }

    /// Forwards a message that expects answers, returning the exchange to read them from.
    pub async fn request(&self, message: Bytes) -> Result<Exchange, ChannelError> {
        let id = self.next_exchange.fetch_add(1, Ordering::Relaxed);
        let (tx, events) = mpsc::channel(EXCHANGE_QUEUE);
        {
            if let Some(reason) = self.shared.closed_reason() {
                return Err(ChannelError::Closed(reason));
            }
            self.shared
                .pending
                .lock()
                .expect("channel lock is never held across a panic")
                .insert(id, tx);
        }
        let exchange = Exchange {
            id,
            events,
            shared: self.shared.clone(),
        };
        self.renew_identity().await?;
        self.send_frame(Frame::message(id, message)).await?;
        Ok(exchange)
    }

    /// Forwards a message that expects no answer (a notification, or the agent's response to a
    /// server request).
    pub async fn send(&self, message: Bytes) -> Result<(), ChannelError> {
        let id = self.next_exchange.fetch_add(1, Ordering::Relaxed);
        self.renew_identity().await?;
        self.send_frame(Frame::message(id, message)).await
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

    /// The queue of messages for the agent's GET stream; one holder at a time.
    pub fn unsolicited(&self) -> Option<tokio::sync::OwnedMutexGuard<mpsc::Receiver<Bytes>>> {
        self.unsolicited_rx.clone().try_lock_owned().ok()
    }

    /// The transport of the tunnel carrying this stream (`quic` or `https`).
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// Why the stream ended, if it has.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.closed_reason()
    }

    /// Asks the peer to end the stream, with a reason.
    pub async fn close(&self, reason: &str) {
        let _ = self.sink.send(Frame::close(reason)).await;
        self.shared.close(reason.to_owned());
    }
}

/// Reads frames until the stream ends; returns why it ended.
async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    frames: &mut FrameReader<R>,
    shared: &Shared,
) -> String {
    loop {
        let frame = match frames.next().await {
            Ok(Some(frame)) => frame,
            Ok(None) => return "the tunnel client ended the stream".into(),
            Err(e) => return format!("tunnel stream failed: {e}"),
        };
        let event = match frame.kind {
            FrameKind::Message => Event::Message(frame.payload),
            FrameKind::End => Event::End,
            FrameKind::Rejected => Event::Rejected(frame.status().unwrap_or(502)),
            FrameKind::Streaming => Event::Streaming,
            FrameKind::Close => return frame.reason(),
            other => {
                return format!("protocol error: unexpected {other:?} frame on an exchange stream");
            }
        };
        let waiting = if frame.exchange == UNSOLICITED {
            None
        } else {
            shared
                .pending
                .lock()
                .expect("channel lock is never held across a panic")
                .get(&frame.exchange)
                .cloned()
        };
        let undelivered = match waiting {
            Some(tx) => match tx.send(event).await {
                Ok(()) => None,
                Err(mpsc::error::SendError(event)) => Some(event),
            },
            None => Some(event),
        };
        // A message with no waiting request goes to the GET stream; ends and statuses of
        // requests nobody waits for any more are simply done.
        let unsolicited = || {
            shared
                .unsolicited_tx
                .lock()
                .expect("channel lock is never held across a panic")
                .clone()
        };
        if let Some(Event::Message(message)) = undelivered
            && unsolicited().is_none_or(|tx| tx.try_send(message).is_err())
        {
            metrics::counter!(crate::metrics::DROPPED_MESSAGES).increment(1);
            tracing::warn!(
                "server-to-agent message dropped: no agent stream is reading and the queue is full"
            );
        }
    }
}
