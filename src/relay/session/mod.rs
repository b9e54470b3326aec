//! Agent sessions and what an agent reads, with no HTTP: a session ([`sessions`]) and the
//! store of them with its caps ([`store`]), the event logs that make SSE streams resumable ([`events`]), and the exchange
//! of one agent message with its upstream ([`exchange`]), which finishes every call before its
//! answer is released.

pub(crate) mod events;
pub(crate) mod exchange;
pub(crate) mod input;
pub(crate) mod sealed;
pub(crate) mod sessions;
pub(crate) mod store;
pub(crate) mod tasks;

pub use events::parse_event_id;
pub(super) use events::{EventLog, LogReader, Piece, Start};
pub(super) use exchange::{Arrived, Awaiting, Ending, EventIds, Opening, pipe, produce};
pub(super) use sealed::{AnswerIds, EventClaims, SessionClaims, new_handle};
pub(super) use sessions::{
    Session, Transport, is_standalone_stream, new_session_id, new_stream_base,
};
pub(super) use store::{CapReached, ListenGuard, SessionCaps, Sessions};
