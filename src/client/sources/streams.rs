//! The tunnel streams carrying one held upstream session (see [`super::held`]), and where what
//! the upstream sends goes among them.
//!
//! A session may be carried by several streams at once, one per relay its agent's requests
//! reach. An answer goes back on the stream its request came in on: a source that routes
//! answers itself (stdio) numbers exchanges across the session with [`global`] (the stream's
//! number in the high half, its own exchange number in the low half), and [`StreamSet::resolve`]
//! turns that back into the stream and its exchange. A server-initiated message goes to the
//! stream the agent listens on (the relay says so with a `Listen` frame when the agent's GET
//! stream opens there), else to the stream attached last. The set holds streams weakly: a
//! stream ends when its own work is done, whoever points at it.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::Out;
use crate::transport::SendHalf;
use crate::wire::{UNSOLICITED, WeakFrameSink};

/// A stream's number within its session.
pub(crate) type StreamNo = u32;

/// Bits of a session-wide exchange number that hold the stream's own exchange number: a
/// stream that numbers past 2^32 exchanges cannot be routed, and is refused.
const LOCAL_BITS: u32 = 32;

/// The session-wide number of exchange `exchange` of stream `stream`; `None` past the range.
pub(crate) fn global(stream: StreamNo, exchange: u64) -> Option<u64> {
    if exchange == UNSOLICITED {
        return Some(UNSOLICITED);
    }
    (exchange < 1 << LOCAL_BITS).then(|| (u64::from(stream) << LOCAL_BITS) | exchange)
}

#[derive(Default)]
struct Inner {
    next: StreamNo,
    /// Each stream, and whether its relay takes numbered server-initiated messages.
    streams: HashMap<StreamNo, (WeakFrameSink<SendHalf>, bool)>,
    listener: Option<StreamNo>,
    latest: Option<StreamNo>,
}

/// The streams carrying one session.
#[derive(Default)]
pub(crate) struct StreamSet {
    inner: Mutex<Inner>,
}

impl StreamSet {
    /// A stream now carries the session; returns its number (from 1: 0 is no stream).
    /// `numbered`: its relay takes server-initiated messages numbered
    /// ([`crate::wire::FrameKind::Event`], wire version 4).
    pub(crate) fn attach(&self, out: &Out, numbered: bool) -> StreamNo {
        let mut inner = self.inner.lock();
        inner
            .streams
            .retain(|_, (weak, _)| weak.upgrade().is_some());
        inner.next = inner.next.wrapping_add(1).max(1);
        let number = inner.next;
        inner.streams.insert(number, (out.downgrade(), numbered));
        inner.latest = Some(number);
        number
    }

    /// The agent listens on stream `stream` for server-initiated messages.
    pub(crate) fn listen(&self, stream: StreamNo) {
        self.inner.lock().listener = Some(stream);
    }

    /// Where a session-wide exchange number goes: the stream and its own exchange number;
    /// [`UNSOLICITED`] to the stream the agent listens on, else the latest attached. `None`
    /// when that stream is gone (nobody waits for the message any more).
    pub(crate) fn resolve(&self, exchange: u64) -> Option<(Out, u64)> {
        if exchange == UNSOLICITED {
            return self.unsolicited_target().map(|(out, _)| (out, UNSOLICITED));
        }
        let stream = StreamNo::try_from(exchange >> LOCAL_BITS).ok()?;
        let local = exchange & ((1 << LOCAL_BITS) - 1);
        let (weak, _) = self.inner.lock().streams.get(&stream)?.clone();
        Some((weak.upgrade()?, local))
    }

    /// Where a server-initiated message goes: the stream the agent listens on, else the
    /// latest attached, with whether its relay takes numbered ones. `None` when that stream
    /// is gone.
    pub(crate) fn unsolicited_target(&self) -> Option<(Out, bool)> {
        let inner = self.inner.lock();
        let live = |number: Option<StreamNo>| {
            let (weak, numbered) = number.and_then(|n| inner.streams.get(&n))?;
            Some((weak.upgrade()?, *numbered))
        };
        live(inner.listener).or_else(|| live(inner.latest))
    }

    /// Every stream carrying the session now.
    pub(crate) fn all(&self) -> Vec<Out> {
        self.inner
            .lock()
            .streams
            .values()
            .filter_map(|(weak, _)| weak.upgrade())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_wide_exchange_numbers_keep_the_stream_and_its_own_number() {
        assert_eq!(global(3, UNSOLICITED), Some(UNSOLICITED));
        let number = global(3, 17).expect("in range");
        assert_eq!(number >> LOCAL_BITS, 3);
        assert_eq!(number & 0xffff_ffff, 17);
        assert_eq!(global(1, 1 << 32), None, "past the range");
        assert_ne!(global(1, 5), global(2, 5));
    }
}
