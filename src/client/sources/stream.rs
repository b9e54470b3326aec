//! The frame loop every source runs on its tunnel stream, written once.
//!
//! Whatever the upstream (Streamable HTTP, HTTP+SSE, a stdio process), a source reads the
//! same frames from the relay: messages to serve, renewed identity assertions, and the
//! relay's `Close`; any other kind ends the stream. And whatever the upstream, when it cannot
//! answer, every request waiting on it gets a JSON-RPC error that says why, then its
//! exchange's `End`, so no agent waits for an answer that will never come. The sources differ
//! only in what they do with a message (and, for HTTP, with an identity); [`Inbound`] and the
//! `fail_*` functions here are the part they share, and [`serve`] runs a source on a stream:
//! the relay's messages in, the source's frames out through a shared writer.

use std::future::Future;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::value::RawValue;

use super::Out;
use super::routing::Routing;
use crate::mcp::Classified;
use crate::mcp::jsonrpc::{MessageInfo, MessageKind, error_body};
use crate::transport::{RecvHalf, SendHalf};
use crate::wire::{Frame, FrameKind, FrameReader, FrameWriter, WeakFrameSink};

/// Time the relay has to send the first message on a stream a source refuses.
const REFUSE_WAIT: Duration = Duration::from_secs(10);

/// Serves one tunnel stream: `source` gets the relay's messages, the writer of frames toward
/// the relay (to clone for each of its tasks) and the largest frame it takes; once `source` is
/// done and every clone of the writer is gone, the stream is finished.
pub(crate) async fn serve<F: Future<Output = ()>>(
    reader: FrameReader<RecvHalf>,
    writer: FrameWriter<SendHalf>,
    source: impl FnOnce(Inbound, Out, usize) -> F,
) {
    let max_frame = writer.limit();
    let (out, finished) = super::start_writer(writer);
    let inbound = Inbound::new(reader, out.downgrade());
    source(inbound, out, max_frame).await;
    let _ = finished.await;
}

/// The relay's side of a tunnel stream, as a source reads it: one message after another.
pub(crate) struct Inbound {
    reader: FrameReader<RecvHalf>,
    /// The relay ended the stream with `Close`: the agent's session is over (the agent
    /// deleted it), not only this stream (a relay gone or done with it).
    closed_by_relay: bool,
    /// Whether the source replays answers ([`FrameKind::Replay`]); if not, each replay the
    /// relay asks for is refused at once (`End`), so the relay need not wait for it.
    replays: bool,
    /// The stream's frames toward the relay, for those refusals.
    out: WeakFrameSink<SendHalf>,
}

impl Inbound {
    /// Reads the frames of `reader`.
    pub(crate) fn new(reader: FrameReader<RecvHalf>, out: WeakFrameSink<SendHalf>) -> Self {
        Self {
            reader,
            closed_by_relay: false,
            replays: false,
            out,
        }
    }

    /// The source replays answers: `Replay` frames go to its `on_signal` (see
    /// [`Inbound::next_message_with`]).
    pub(crate) fn replays_answers(&mut self) {
        self.replays = true;
    }

    /// Whether the relay ended the stream with `Close` (see [`Inbound::next_message`]).
    pub(crate) fn closed_by_relay(&self) -> bool {
        self.closed_by_relay
    }

    /// The next message, passing each signal frame before it (identity, listen, and replay
    /// when the source [replays answers](Inbound::replays_answers)) to `on_signal`. `None` once the stream is over: finished, broken, closed by the relay
    /// (`Close`), or carrying a frame no exchange stream carries. Cancel-safe: a frame is taken
    /// only when returned or handed to `on_signal`.
    pub(crate) async fn next_message_with(
        &mut self,
        mut on_signal: impl FnMut(&Frame),
    ) -> Option<Frame> {
        loop {
            let frame = match self.reader.next().await {
                Ok(Some(frame)) => frame,
                Ok(None) => return None,
                Err(e) => {
                    tracing::debug!(error = %e, "tunnel stream read failed");
                    return None;
                }
            };
            match frame.kind {
                FrameKind::Message => return Some(frame),
                FrameKind::Replay if !self.replays => {
                    if let Some(out) = self.out.upgrade() {
                        tokio::spawn(async move {
                            let _ = out.send(Frame::end(frame.exchange)).await;
                        });
                    }
                }
                FrameKind::Identity | FrameKind::Listen | FrameKind::Replay => on_signal(&frame),
                FrameKind::Close => {
                    tracing::debug!(reason = %frame.reason(), "relay closed the stream");
                    self.closed_by_relay = true;
                    return None;
                }
                other => {
                    tracing::warn!(kind = ?other, "unexpected frame on an exchange stream");
                    return None;
                }
            }
        }
    }

    /// The next message; signal frames are ignored (the upstream gets no identity assertion,
    /// so there is nothing to renew, and server messages go to the one stream).
    pub(crate) async fn next_message(&mut self) -> Option<Frame> {
        self.next_message_with(|_| {}).await
    }

    /// Refuses the stream: answers every request of its first message (waited for a bounded
    /// time) with the error `code` and `reason`, then closes the stream with `reason`.
    pub(crate) async fn refuse(&mut self, out: &Out, code: i64, reason: &str) {
        if let Ok(Some(frame)) = tokio::time::timeout(REFUSE_WAIT, self.next_message()).await {
            match crate::mcp::classify(&frame.payload) {
                Ok(classified) => {
                    fail_requests(out, frame.exchange, &classified, code, reason).await
                }
                Err(_) => {
                    let _ = out.send(Frame::end(frame.exchange)).await;
                }
            }
        }
        let _ = out.send(Frame::close(reason)).await;
    }
}

/// The requests of a message (not its notifications and responses).
pub(crate) fn requests(classified: &Classified) -> impl Iterator<Item = &MessageInfo> {
    classified
        .messages()
        .iter()
        .filter(|m| m.kind == MessageKind::Request)
}

/// Answers every request of `classified` with the error `code` and `reason`, then ends
/// `exchange`.
pub(crate) async fn fail_requests(
    out: &Out,
    exchange: u64,
    classified: &Classified,
    code: i64,
    reason: &str,
) {
    for request in requests(classified) {
        let body = error_body(request.id.as_deref(), code, reason);
        let _ = out.send(Frame::message(exchange, body)).await;
    }
    let _ = out.send(Frame::end(exchange)).await;
}

/// Answers the requests `ids` of `exchange` with the error `code` and `reason`, then ends
/// the exchange.
pub(crate) async fn fail_ids(
    out: &Out,
    exchange: u64,
    ids: Vec<Box<RawValue>>,
    code: i64,
    reason: &str,
) {
    for frame in failure_frames(exchange, ids, code, reason) {
        let _ = out.send(frame).await;
    }
}

/// The frames of [`fail_ids`]: an error answer for each of `ids`, then the end of `exchange`.
pub(crate) fn failure_frames(
    exchange: u64,
    ids: Vec<Box<RawValue>>,
    code: i64,
    reason: &str,
) -> impl Iterator<Item = Frame> + use<'_> {
    ids.into_iter()
        .map(move |id| Frame::message(exchange, error_body(Some(&id), code, reason)))
        .chain(std::iter::once(Frame::end(exchange)))
}

/// Fails every request pending in `routing` (see [`fail_ids`]), exchange by exchange; returns
/// whether there was any.
pub(crate) async fn fail_pending(
    out: &Out,
    routing: &Mutex<Routing>,
    code: i64,
    reason: &str,
) -> bool {
    let pending = routing.lock().take_all();
    let any = !pending.is_empty();
    for (exchange, ids) in pending {
        fail_ids(out, exchange, ids, code, reason).await;
    }
    any
}
