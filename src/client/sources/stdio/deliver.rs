//! Where what a session's process prints goes: an answer back on the stream of the request it
//! answers, a server-initiated message to the stream the agent listens on.
//!
//! A held session's answers and messages outlive the stream that asked, as an HTTP session's
//! do (see [`crate::client::sources::replay`] and [`crate::client::sources::events`]): when
//! the relay names its streams (wire version 3), every answer is kept under the relay's number
//! for the asking stream and its exchange there, so an answer whose stream is gone (its relay
//! died, its tunnel dropped) is kept for the relay the agent resumes on, which asks for it
//! with a `Replay`; server-initiated messages are numbered and kept, so the agent's GET stream
//! resumes on any relay.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::value::RawValue;

use crate::client::sources::outlet::Outlet;
use crate::client::sources::replay::{Key, SourceBytes};
use crate::client::sources::stream::failure_frames;
use crate::client::sources::{Out, message_frames};
use crate::wire::{Frame, UNSOLICITED};

/// The outlet of one session's process, and where each of its answers goes.
pub(super) struct Delivery {
    /// The streams carrying the session, and what is kept of it.
    pub(super) outlet: Arc<Outlet>,
    /// Whether the session is held (so its messages are kept for relays).
    held: bool,
    /// The key each kept answer in flight is kept under, by its session-wide exchange
    /// ([`crate::client::sources::streams::global`]); gone once the answer ends. Bounded as
    /// the session's pending requests are.
    keys: Mutex<HashMap<u64, Key>>,
    /// The source's name, for logs.
    source: Arc<str>,
    /// The largest frame a stream takes: larger answers cross in pieces.
    max_frame: usize,
}

impl Delivery {
    /// Delivery for a session of `source`; a `held` one keeps what it sends, counted
    /// against the source's `kept` bytes.
    pub(super) fn new(source: Arc<str>, max_frame: usize, held: bool, kept: SourceBytes) -> Self {
        Self {
            outlet: Arc::new(Outlet::new(kept)),
            held,
            keys: Mutex::default(),
            source,
            max_frame,
        }
    }

    /// A request (`request`, with its request `ids`) came on `out` as `local`, session-wide
    /// `exchange`, on a stream the relay numbers `relay_stream`: a held session keeps its
    /// answer from now on.
    pub(super) fn begin(
        &self,
        exchange: u64,
        (relay_stream, local): (Option<u64>, u64),
        request: &Bytes,
        ids: Vec<Box<RawValue>>,
        out: &Out,
    ) {
        let Some(stream) = relay_stream.filter(|_| self.held) else {
            return;
        };
        let key = (stream, local);
        self.keys.lock().insert(exchange, key);
        self.outlet
            .replays
            .begin(key, request.clone(), ids, out, local);
    }

    /// Sends `frame` of session-wide `exchange` where its answer goes now: through the kept
    /// answer (which may have moved to another stream), else to the stream that asked. A
    /// frame whose stream is gone and that nobody keeps is dropped: nobody waits for it.
    pub(super) async fn send(&self, exchange: u64, frame: Frame) {
        let key = self.keys.lock().get(&exchange).copied();
        let frame = match key {
            Some(key) => match self.outlet.replays.send(key, frame).await {
                Ok(()) => return,
                Err(frame) => frame,
            },
            None => frame,
        };
        match self.outlet.streams.resolve(exchange) {
            Some((out, local)) => {
                let _ = out
                    .send(Frame {
                        exchange: local,
                        ..frame
                    })
                    .await;
            }
            None => {
                tracing::debug!(source = %self.source, "answer of a request whose stream is gone dropped")
            }
        }
    }

    /// Sends one whole message the process printed for session-wide `exchange` (in pieces
    /// when large); a server-initiated one ([`UNSOLICITED`]) to the stream the agent listens
    /// on, numbered and kept when the session is held.
    pub(super) async fn message(&self, exchange: u64, line: Bytes) {
        if exchange == UNSOLICITED && self.held && line.len() <= self.max_frame {
            let outlet = &self.outlet;
            return outlet.events.send(&outlet.streams, line).await;
        }
        for frame in message_frames(exchange, line, self.max_frame, &self.source) {
            self.send(exchange, frame).await;
        }
    }

    /// Ends session-wide `exchange`: its answer is whole.
    pub(super) async fn end(&self, exchange: u64) {
        self.send(exchange, Frame::end(exchange)).await;
        self.keys.lock().remove(&exchange);
    }

    /// Answers the requests `ids` of session-wide `exchange` with the error `code` and
    /// `reason`, then ends it.
    pub(super) async fn fail(
        &self,
        exchange: u64,
        ids: Vec<Box<RawValue>>,
        code: i64,
        reason: &str,
    ) {
        for frame in failure_frames(exchange, ids, code, reason) {
            self.send(exchange, frame).await;
        }
        self.keys.lock().remove(&exchange);
    }
}
