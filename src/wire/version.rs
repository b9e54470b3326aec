//! Wire versions, and the rule by which the tunnel's format grows without breaking a released
//! peer.
//!
//! # The rule
//!
//! A relay and a `connect` of different releases must keep working together (a fleet is
//! upgraded one process at a time, and `connect`s run in customers' networks on their own
//! schedule). So every addition to the wire follows these steps:
//!
//! 1. **Receivers are strict.** An open header, a control message or a JSON payload with a field
//!    the receiver does not know is refused (`deny_unknown_fields`, naming the field), and a
//!    frame of an unknown kind fails its stream with [`FrameKind::Close`](super::FrameKind)
//!    (never the whole connection). Strictness is safe because of the next rule, and it turns a
//!    sender's mistake into a clear error at once instead of a field silently dropped, which
//!    for a governance field (an identity assertion, a resumption handle) would be a hole.
//! 2. **Senders send only what the peer announced.** Both sides announce the newest wire
//!    version they speak during the handshake: the relay in its
//!    [`Greeting`](super::Greeting), `connect` in its [`Hello`](super::Hello). Each side then
//!    works at the [agreed](agree) version, the lower of the two, and sends a field or a frame
//!    kind added at version `N` only when the agreed version is at least `N`. Every addition
//!    bumps [`PROTOCOL_VERSION`] and records its version beside the field or kind it adds.
//! 3. **The first message never grows.** The relay's [`Greeting`](super::Greeting) is read
//!    before either side knows the other's version, so it keeps exactly its `version` field.
//!    The [`Hello`](super::Hello) is written after the greeting, so `connect` gates its new
//!    fields on the relay's version; the relay's reply and everything after it are gated on the
//!    agreed version.
//! 4. **Old versions are dropped on purpose.** A peer below [`MIN_PROTOCOL_VERSION`] is refused
//!    in the handshake with both versions named. Raising the minimum is a release note, not an
//!    accident.
//! 5. **Incompatible changes change the ALPN.** A change that no version gate can express (the
//!    frame header's layout, the meaning of an existing field) gets a new [`ALPN`] id, so an old
//!    peer fails the TLS handshake with a clear ALPN error instead of misreading frames.
//!
//! # What each version added
//!
//! - **1**: the format as first released, including the open header's `assertion` and the
//!   `Identity` and `MessagePart` frame kinds (both ends of those shipped in one release, so no
//!   released pair disagrees about them).
//! - **2**: sessions that outlive their stream (issue 15, a fleet of relays): the open
//!   header's `session`, the [`Hello`](super::Hello)'s `instance`, and the `Resumable` and
//!   `Listen` frame kinds.
//! - **3**: nothing in flight lost (issue 15): the session handle's `stream`, and the `Replay`
//!   frame kind (`connect` buffers each answer of a held session; any relay replays it).
//! - **4**: an agent's GET stream resumes on any relay (issue 15): the `Event` frame kind
//!   (`connect` numbers and keeps the server-initiated messages of a held session) and the
//!   `Listen` frame's [`ListenAfter`](super::ListenAfter) payload.

use thiserror::Error;

/// The ALPN protocol id of the tunnel (rule 5): a new incompatible wire format gets a new id.
pub const ALPN: &[u8] = b"mcp-tunnel/1";

/// The newest wire version this build speaks, announced in the handshake (rule 2).
pub const PROTOCOL_VERSION: u32 = 4;

/// The oldest peer version this build still serves (rule 4).
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// A peer announced a version this build no longer speaks.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "wire protocol version {peer} is too old: this side speaks {MIN_PROTOCOL_VERSION} to \
     {PROTOCOL_VERSION}; upgrade the other side"
)]
pub struct VersionError {
    /// The version the peer announced.
    pub peer: u32,
}

/// The version both sides work at, given the one the peer announced: the lower of the two
/// newest versions (a newer peer speaks ours too, rule 2), or an error when the peer is older
/// than [`MIN_PROTOCOL_VERSION`].
pub fn agree(peer: u32) -> Result<u32, VersionError> {
    if peer < MIN_PROTOCOL_VERSION {
        return Err(VersionError { peer });
    }
    Ok(peer.min(PROTOCOL_VERSION))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_version_agrees_on_itself() {
        assert_eq!(agree(PROTOCOL_VERSION), Ok(PROTOCOL_VERSION));
    }

    #[test]
    fn a_newer_peer_is_served_at_our_version() {
        assert_eq!(agree(PROTOCOL_VERSION + 3), Ok(PROTOCOL_VERSION));
    }

    #[test]
    fn a_peer_below_the_minimum_is_refused_naming_both_ends() {
        let err = agree(MIN_PROTOCOL_VERSION - 1).expect_err("version 0 predates the minimum");
        let text = err.to_string();
        assert!(text.contains("version 0"), "{text}");
        assert!(text.contains(&PROTOCOL_VERSION.to_string()), "{text}");
    }
}
