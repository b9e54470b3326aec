//! Messages that arrive in pieces ([`FrameKind::MessagePart`]) on one exchange stream, counted
//! against the per-message limit as they arrive and passed on piece by piece, never assembled
//! in the relay: what turns one incoming frame into the [`Event`] its exchange sees.

use std::collections::HashMap;

use super::channel::Event;
use crate::wire::{Frame, FrameKind, PieceCount, UNSOLICITED};

/// Messages arriving in pieces at once on one stream, past which the stream fails: each is a
/// large answer in flight (one per concurrent request at most), so this bounds the reader's
/// bookkeeping against a peer that opens pieces and never closes them.
const MAX_OPEN_PIECED: usize = 1024;

/// A message arriving in pieces on one exchange.
struct Pieced {
    count: PieceCount,
    /// It passed the limit: its remaining pieces are dropped.
    refused: bool,
}

/// The messages arriving in pieces on one stream, each counted against the per-message limit
/// as it arrives, never assembled here.
pub(super) struct Assembly {
    open: HashMap<u64, Pieced>,
    limit: usize,
}

impl Assembly {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            open: HashMap::new(),
            limit,
        }
    }

    /// What `frame` means for its exchange: an event to deliver, with whether it ends a message
    /// that came in pieces (never a message of its own); nothing (more of a refused message);
    /// or why the stream must end.
    pub(super) fn event(&mut self, frame: Frame) -> Result<Option<(Event, bool)>, String> {
        let limit = self.limit;
        let refuse = |exchange: u64, e: &dyn std::fmt::Display| {
            tracing::warn!(exchange, error = %e, "answer refused");
            Event::TooLarge(limit)
        };
        let event = match frame.kind {
            FrameKind::MessagePart => {
                if frame.exchange == UNSOLICITED {
                    return Err("protocol error: a message in pieces outside an exchange".into());
                }
                if !self.open.contains_key(&frame.exchange) && self.open.len() >= MAX_OPEN_PIECED {
                    return Err(format!(
                        "protocol error: more than {MAX_OPEN_PIECED} messages in pieces at once"
                    ));
                }
                let open = self.open.entry(frame.exchange).or_insert_with(|| Pieced {
                    count: PieceCount::new(limit),
                    refused: false,
                });
                if open.refused {
                    return Ok(None);
                }
                match open.count.add(frame.payload.len()) {
                    Ok(()) => Event::Part(frame.payload),
                    Err(e) => {
                        open.refused = true;
                        refuse(frame.exchange, &e)
                    }
                }
            }
            FrameKind::Message => {
                return Ok(match self.open.remove(&frame.exchange) {
                    Some(open) if open.refused => None,
                    Some(mut open) => match open.count.add(frame.payload.len()) {
                        Ok(()) => Some((Event::Message(frame.payload), true)),
                        Err(e) => Some((refuse(frame.exchange, &e), true)),
                    },
                    None => Some((Event::Message(frame.payload), false)),
                });
            }
            FrameKind::End => {
                self.open.remove(&frame.exchange);
                Event::End
            }
            FrameKind::Rejected => Event::Rejected(frame.status().unwrap_or(502)),
            FrameKind::Streaming => Event::Streaming,
            FrameKind::Replay if frame.exchange != UNSOLICITED => Event::Replaying(frame.payload),
            FrameKind::Close => return Err(frame.reason()),
            other => {
                return Err(format!(
                    "protocol error: unexpected {other:?} frame on an exchange stream"
                ));
            }
        };
        Ok(Some((event, false)))
    }
}
