//! What `connect` keeps of a held session's server-initiated messages, so an agent's GET
//! stream resumes on any relay.
//!
//! The upstream's standalone stream (notifications, server requests outside any call) feeds the
//! agent's GET stream on whichever relay the agent listens on. When that relay dies, what it
//! had not yet written is lost with it, and the agent's GET resumes on another relay. So
//! `connect` numbers every such message of the session from 1 and keeps the latest
//! ([`EVENTS_BYTES`], [`EVENTS_KEPT`], [`KEEP_EVENTS`]); a relay of wire version 4 gets each
//! as a [`FrameKind::Event`](crate::wire::FrameKind::Event) and seals its number into the
//! event's id. Given that id back, any relay says where the agent stands
//! ([`ListenAfter`](crate::wire::ListenAfter)), and the messages kept after it go there
//! first, then the new ones. Sends and resends hold the session's lock, so the agent gets them
//! in order; the relay skips a number it already has.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::Out;
use super::replay::{REPLAY_SOURCE_BYTES, SourceBytes};
use super::streams::{StreamNo, StreamSet};
use crate::wire::{Frame, UNSOLICITED};

/// Bytes of server-initiated messages kept per session: notifications are small, and an agent
/// resumes its GET stream within seconds (the relay suggests 1 s).
pub(crate) const EVENTS_BYTES: usize = 256 * 1024;

/// Server-initiated messages kept per session, at most.
pub(crate) const EVENTS_KEPT: usize = 256;

/// How long a message is kept: what no agent asked for again by then is forgotten.
pub(crate) const KEEP_EVENTS: Duration = Duration::from_secs(60);

struct Kept {
    number: u64,
    message: Bytes,
    at: Instant,
}

struct Inner {
    /// The number of the last message.
    last: u64,
    kept: VecDeque<Kept>,
    bytes: usize,
    /// Bytes kept by every session of the source (shared with its answers' replays).
    source: SourceBytes,
}

impl Inner {
    fn forget_oldest(&mut self) -> bool {
        let Some(oldest) = self.kept.pop_front() else {
            return false;
        };
        self.bytes -= oldest.message.len();
        self.source
            .fetch_sub(oldest.message.len(), Ordering::AcqRel);
        true
    }

    /// Numbers `message` and keeps it, forgetting the oldest (and the expired) to make room;
    /// a message that does not fit at all is numbered but not kept.
    fn keep(&mut self, message: &Bytes, now: Instant) -> u64 {
        self.last += 1;
        while self
            .kept
            .front()
            .is_some_and(|k| now.saturating_duration_since(k.at) >= KEEP_EVENTS)
        {
            self.forget_oldest();
        }
        let len = message.len();
        while self.kept.len() >= EVENTS_KEPT
            || (self.bytes + len > EVENTS_BYTES && !self.kept.is_empty())
        {
            self.forget_oldest();
        }
        let fits = self.bytes + len <= EVENTS_BYTES
            && self.source.load(Ordering::Acquire) + len <= REPLAY_SOURCE_BYTES;
        if fits {
            self.bytes += len;
            self.source.fetch_add(len, Ordering::AcqRel);
            self.kept.push_back(Kept {
                number: self.last,
                message: message.clone(),
                at: now,
            });
        }
        self.last
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.source.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The server-initiated messages of one held session, numbered and the latest kept.
pub(crate) struct KeptEvents {
    inner: tokio::sync::Mutex<Inner>,
}

impl KeptEvents {
    /// Nothing kept yet; bytes kept count against `source` too.
    pub(crate) fn new(source: SourceBytes) -> Self {
        Self {
            inner: tokio::sync::Mutex::new(Inner {
                last: 0,
                kept: VecDeque::new(),
                bytes: 0,
                source,
            }),
        }
    }

    /// Numbers `message`, keeps it, and sends it toward the agent: on the stream it listens
    /// on, else the latest attached (see [`StreamSet::unsolicited_target`]), numbered when
    /// that stream's relay takes numbers. Dropped (but kept) when no stream lives.
    pub(crate) async fn send(&self, streams: &StreamSet, message: Bytes) {
        let mut inner = self.inner.lock().await;
        let number = inner.keep(&message, Instant::now());
        match streams.unsolicited_target() {
            Some((out, numbered)) => {
                let frame = if numbered {
                    Frame::event(number, message)
                } else {
                    Frame::message(UNSOLICITED, message)
                };
                let _ = out.send(frame).await;
            }
            None => {
                metrics::counter!(crate::metrics::DROPPED_MESSAGES).increment(1);
                tracing::debug!(
                    number,
                    "server-to-agent message kept, not sent: no stream carries its session now"
                );
            }
        }
    }

    /// The agent resumes its GET stream on stream `stream` (`out`, whose relay takes numbers)
    /// having the messages up to `after`: those kept after it go there, and new ones follow.
    pub(crate) async fn listen_after(
        &self,
        streams: &StreamSet,
        stream: StreamNo,
        out: &Out,
        after: u64,
    ) {
        let inner = self.inner.lock().await;
        streams.listen(stream);
        let missed = inner.kept.front().is_some_and(|k| k.number > after + 1)
            || (inner.kept.is_empty() && inner.last > after);
        if missed {
            tracing::info!(
                after,
                last = inner.last,
                "an agent's GET stream resumed after messages no longer kept"
            );
        }
        for kept in inner.kept.iter().filter(|k| k.number > after) {
            if out
                .send(Frame::event(kept.number, kept.message.clone()))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Bytes {
        Bytes::from(vec![b'x'; len])
    }

    fn inner(source: &SourceBytes) -> Inner {
        Inner {
            last: 0,
            kept: VecDeque::new(),
            bytes: 0,
            source: source.clone(),
        }
    }

    #[test]
    fn messages_are_numbered_from_one_and_the_latest_kept_within_the_bounds() {
        let source = SourceBytes::default();
        let mut events = inner(&source);
        let now = Instant::now();
        for expected in 1..=(EVENTS_KEPT as u64 + 10) {
            assert_eq!(events.keep(&message(10), now), expected);
        }
        assert_eq!(events.kept.len(), EVENTS_KEPT, "at most EVENTS_KEPT");
        assert_eq!(
            events.kept.front().map(|k| k.number),
            Some(11),
            "the oldest go"
        );
        let big = EVENTS_BYTES / 2 + 1;
        events.keep(&message(big), now);
        events.keep(&message(big), now);
        assert!(
            events.bytes <= EVENTS_BYTES,
            "bounded in bytes: {}",
            events.bytes
        );
        assert_eq!(events.kept.len(), 1, "only the latest large one fits");
        assert_eq!(source.load(Ordering::Acquire), events.bytes);
        events.keep(&message(EVENTS_BYTES + 1), now);
        assert!(
            events.kept.is_empty(),
            "one larger than the bound is not kept"
        );
        assert_eq!(events.last, EVENTS_KEPT as u64 + 13, "but numbered");
        drop(events);
        assert_eq!(
            source.load(Ordering::Acquire),
            0,
            "released with the session"
        );
    }

    #[test]
    fn messages_older_than_the_keep_time_are_forgotten() {
        let source = SourceBytes::default();
        let mut events = inner(&source);
        let then = Instant::now();
        events.keep(&message(10), then);
        events.keep(&message(10), then + KEEP_EVENTS);
        assert_eq!(
            events.kept.iter().map(|k| k.number).collect::<Vec<_>>(),
            [2]
        );
    }
}
