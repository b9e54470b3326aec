//! The tunnel side of the relay, with no HTTP: accepting `connect`'s connections and their
//! handshake ([`accept`]), the registry of live tunnels that routes each tenant's sources
//! ([`registry`]), and channels, one tunnel stream each, carrying an agent session's or
//! request's exchanges ([`channel`], whose [`assembly`] passes on messages that come in pieces),
//! whose buffers charge one [`Budget`] per session; the registry remembers for a moment the
//! `connect`s whose tunnels all left ([`departed`]).

pub(crate) mod accept;
mod assembly;
mod budget;
pub(crate) mod channel;
mod departed;
pub(crate) mod registry;

pub(super) use budget::Budget;
pub(super) use channel::{Channel, ChannelError, ChannelLimits, Event, Exchange, Reattach};
pub(super) use registry::Registry;
pub use registry::TunnelRow;
