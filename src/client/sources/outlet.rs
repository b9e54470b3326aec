//! Where one session's messages go out toward the relays: the streams carrying it
//! ([`StreamSet`]), and, for a held session, what `connect` keeps for a relay an agent resumes
//! on: its answers ([`Replays`]) and its server-initiated messages ([`KeptEvents`]). Both kinds
//! of upstream (HTTP and stdio) share it, and so the handling of the relay's signals about it.

use std::sync::Arc;

use super::Out;
use super::events::KeptEvents;
use super::replay::{Replays, SourceBytes};
use super::streams::{StreamNo, StreamSet};
use crate::wire::{Frame, FrameKind, ListenAfter, Replay};

/// The streams carrying one session, and what is kept of its messages.
pub(crate) struct Outlet {
    /// The streams carrying it, and which one its agent listens on.
    pub(crate) streams: StreamSet,
    /// Its answers, kept for a relay to replay (held sessions only).
    pub(crate) replays: Replays,
    /// Its server-initiated messages, numbered and kept for a relay an agent resumes its GET
    /// stream on (held sessions only).
    pub(crate) events: KeptEvents,
}

impl Outlet {
    /// No streams and nothing kept yet; what will be kept counts against `source` too.
    pub(crate) fn new(source: SourceBytes) -> Self {
        Self {
            streams: StreamSet::default(),
            replays: Replays::new(source.clone()),
            events: KeptEvents::new(source),
        }
    }

    /// Takes a relay's `Listen` or `Replay` frame, read on stream `number` (writing to `out`)
    /// between messages: an empty `Listen` says the agent reads server-initiated messages on
    /// this stream from now on; one with [`ListenAfter`] that it resumes its GET stream here,
    /// so the messages kept after the one it has come first; a `Replay` asks for an answer
    /// another stream carried. Those two wait for their turn (the messages' lock, the
    /// answer's), so they run in a task of their own.
    pub(crate) fn signal(self: &Arc<Self>, number: StreamNo, out: &Out, frame: &Frame) {
        let (outlet, out) = (self.clone(), out.clone());
        match frame.kind {
            FrameKind::Listen if frame.payload.is_empty() => self.streams.listen(number),
            FrameKind::Listen => match frame.parse_json::<ListenAfter>(FrameKind::Listen) {
                Ok(ListenAfter { after }) => {
                    tokio::spawn(async move {
                        let streams = &outlet.streams;
                        outlet
                            .events
                            .listen_after(streams, number, &out, after)
                            .await;
                    });
                }
                Err(e) => tracing::warn!(error = %e, "bad listen frame ignored"),
            },
            FrameKind::Replay => {
                let exchange = frame.exchange;
                match frame.parse_json::<Replay>(FrameKind::Replay) {
                    Ok(replay) => {
                        tokio::spawn(async move {
                            outlet.replays.replay(replay, out, exchange).await;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bad replay frame refused");
                        tokio::spawn(async move {
                            let _ = out.send(Frame::end(exchange)).await;
                        });
                    }
                }
            }
            _ => {}
        }
    }
}
