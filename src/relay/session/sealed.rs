//! Session ids that route themselves: what a relay seals into the `Mcp-Session-Id` it issues,
//! so that any relay of the fleet can continue the session (see [`crate::relay::fleet`]).
//!
//! Inside the id: whose session it is (tenant, subject, source), the handle `connect` holds
//! the upstream session under and which `connect` holds it, what another `connect` needs to
//! resume it (the HTTP upstream's own session id), the protocol version `initialize` settled,
//! and when it was issued. Nothing here is secret from the relays, and all of it is from the
//! agent: the id is sealed, so an agent can neither read nor change it.

use serde::{Deserialize, Serialize};

use crate::govern::Identity;
use crate::relay::fleet::{FleetKeys, Purpose};
use crate::wire::Resumable;

/// Random bytes in a session handle (128 bits: handles are never guessed, and never reused).
const HANDLE_BYTES: usize = 16;

/// A fresh session handle: the relays' and `connect`'s name for one agent session.
pub(crate) fn new_handle() -> String {
    let mut bytes = [0u8; HANDLE_BYTES];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    hex::encode(bytes)
}

/// What a sealed session id holds. Short field names: the id travels in every request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionClaims {
    /// Tenant of the caller who opened it.
    #[serde(rename = "t")]
    pub(crate) tenant: String,
    /// Subject of that caller.
    #[serde(rename = "u")]
    pub(crate) subject: String,
    /// The source.
    #[serde(rename = "s")]
    pub(crate) source: String,
    /// The handle the upstream session is held under.
    #[serde(rename = "h")]
    pub(crate) handle: String,
    /// The `connect` instance holding it (wire version 2 clients say).
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub(crate) connect: Option<String>,
    /// What lets another `connect` resume it.
    #[serde(rename = "r")]
    pub(crate) resumable: Resumable,
    /// The protocol version `initialize` settled.
    #[serde(rename = "v", default, skip_serializing_if = "Option::is_none")]
    pub(crate) version: Option<String>,
    /// Seconds since the epoch when it was issued.
    #[serde(rename = "i")]
    pub(crate) issued: u64,
}

/// `claims` sealed for `purpose` with the fleet's current secret.
fn seal<T: Serialize>(keys: &FleetKeys, purpose: Purpose, claims: &T) -> String {
    let plain = serde_json::to_vec(claims)
        .expect("claims serialize infallibly: plain strings, numbers and booleans");
    keys.seal(purpose, &plain)
}

/// The claims sealed for `purpose` in `text`, if a relay of this fleet sealed them.
fn open<T: serde::de::DeserializeOwned>(
    keys: &FleetKeys,
    purpose: Purpose,
    text: &str,
) -> Option<T> {
    let plain = keys.open(purpose, text)?;
    serde_json::from_slice(&plain).ok()
}

impl SessionClaims {
    /// The agent-facing session id: these claims, sealed with the fleet's current secret.
    pub(crate) fn seal(&self, keys: &FleetKeys) -> String {
        seal(keys, Purpose::Session, self)
    }

    /// The claims in a session id, if a relay of this fleet sealed it.
    pub(crate) fn open(keys: &FleetKeys, id: &str) -> Option<Self> {
        open(keys, Purpose::Session, id)
    }

    /// Whether the session is `who`'s, with `source`: another caller's id reads as unknown.
    pub(crate) fn belongs_to(&self, who: &Identity, source: &str) -> bool {
        *self.tenant == *who.tenant && *self.subject == *who.subject && self.source == source
    }
}

/// What a sealed event id holds: which answer of which session, and how far into it. An
/// agent resuming with it on any relay of the fleet gets the rest of that answer: from the
/// relay's own log if it carried the answer, else replayed by the `connect` that keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EventClaims {
    /// The session's handle.
    #[serde(rename = "h")]
    pub(crate) handle: String,
    /// The `connect` instance that keeps the answer.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub(crate) connect: Option<String>,
    /// The relay's number for the stream that asked ([`crate::wire::SessionHandle::stream`]).
    #[serde(rename = "s")]
    pub(crate) stream: u64,
    /// The exchange on that stream.
    #[serde(rename = "x")]
    pub(crate) exchange: u64,
    /// Whole messages of the answer up to and including this event's.
    #[serde(rename = "n")]
    pub(crate) message: u64,
}

impl EventClaims {
    /// The claims in an event id, if a relay of this fleet sealed it.
    pub(crate) fn open(keys: &FleetKeys, id: &str) -> Option<Self> {
        open(keys, Purpose::Event, id)
    }
}

/// What a sealed `requestState` holds (see [`super::input`]): whose call it is, a digest of
/// what it asks, where its rest waits, the upstream's own state, and when it was issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InputClaims {
    /// Tenant of the caller.
    #[serde(rename = "t")]
    pub(crate) tenant: String,
    /// Subject of the caller.
    #[serde(rename = "u")]
    pub(crate) subject: String,
    /// The source.
    #[serde(rename = "s")]
    pub(crate) source: String,
    /// Hex SHA-256 of the call's method and arguments (`mcp::bridge::call_digest`).
    #[serde(rename = "d")]
    pub(crate) digest: String,
    /// The `connect` instance that answered (and, bridging, keeps the call waiting).
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub(crate) connect: Option<String>,
    /// The upstream's own `requestState`, if it gave one.
    #[serde(rename = "st", default, skip_serializing_if = "Option::is_none")]
    pub(crate) inner: Option<String>,
    /// Seconds since the epoch when it was issued.
    #[serde(rename = "i")]
    pub(crate) issued: u64,
    /// Random, hex: what a spent state is remembered by.
    #[serde(rename = "n")]
    pub(crate) nonce: String,
    /// The call's id in the audit trail (`mcp.call.id`), the same on every round.
    #[serde(rename = "k")]
    pub(crate) call: String,
}

impl InputClaims {
    /// The agent-facing `requestState`: these claims, sealed.
    pub(crate) fn seal(&self, keys: &FleetKeys) -> String {
        seal(keys, Purpose::Input, self)
    }

    /// The claims in a `requestState`, if a relay of this fleet sealed it.
    pub(crate) fn open(keys: &FleetKeys, state: &str) -> Option<Self> {
        open(keys, Purpose::Input, state)
    }
}

/// Mints the sealed event ids of one answer stream (see [`EventClaims`]).
#[derive(Clone)]
pub struct AnswerIds {
    keys: std::sync::Arc<FleetKeys>,
    /// Every id's claims, but the message number.
    claims: EventClaims,
    /// Messages of the answer sent before this stream's first (a replayed answer's).
    pub(crate) after: u64,
}

impl AnswerIds {
    /// Ids for the answer `claims` names (its `message` is where this stream starts: 0 for a
    /// new answer, the agent's last seen for a replayed one), sealed with `keys`.
    pub(crate) fn new(keys: std::sync::Arc<FleetKeys>, claims: EventClaims) -> Self {
        let after = claims.message;
        Self {
            keys,
            claims,
            after,
        }
    }

    /// Whether these ids name the answer of `stream`'s exchange `exchange`.
    pub(crate) fn names(&self, stream: u64, exchange: u64) -> bool {
        self.claims.stream == stream && self.claims.exchange == exchange
    }

    /// The id of the event that ends message `message` of the answer.
    pub(crate) fn mint(&self, message: u64) -> String {
        let claims = EventClaims {
            message,
            ..self.claims.clone()
        };
        seal(&self.keys, Purpose::Event, &claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> SessionClaims {
        SessionClaims {
            tenant: "acme".into(),
            subject: "alice".into(),
            source: "db".into(),
            handle: new_handle(),
            connect: Some("c0ffee".into()),
            resumable: Resumable {
                upstream_session: Some("upstream-7".into()),
                portable: true,
            },
            version: Some("2025-11-25".into()),
            issued: 1_700_000_000,
        }
    }

    fn who(tenant: &str, subject: &str) -> Identity {
        Identity {
            tenant: tenant.into(),
            subject: subject.into(),
            roles: Vec::new().into(),
        }
    }

    #[test]
    fn a_sealed_id_opens_to_its_claims_on_any_relay_of_the_fleet_and_only_there() {
        let secret = b"a fleet secret of at least thirty-two bytes";
        let id = claims().seal(&FleetKeys::from_secrets(secret, &[]));
        let opened = SessionClaims::open(&FleetKeys::from_secrets(secret, &[]), &id);
        assert_eq!(opened.as_ref().map(|c| &c.tenant[..]), Some("acme"));
        assert_eq!(
            opened.map(|c| c.resumable.upstream_session),
            Some(Some("upstream-7".into()))
        );
        assert_eq!(SessionClaims::open(&FleetKeys::standalone(), &id), None);
        assert!(id.len() < 400, "{} characters", id.len());
    }

    #[test]
    fn an_event_id_opens_to_its_answer_and_never_passes_for_a_session_id() {
        let keys = std::sync::Arc::new(FleetKeys::from_secrets(
            b"0123456789abcdef0123456789abcdef",
            &[],
        ));
        let claims = EventClaims {
            handle: new_handle(),
            connect: Some("c0ffee00c0ffee00".into()),
            stream: 1 << 40,
            exchange: 12,
            message: 0,
        };
        let ids = AnswerIds::new(keys.clone(), claims.clone());
        let id = ids.mint(3);
        let opened = EventClaims::open(&keys, &id).expect("opens");
        assert_eq!((opened.exchange, opened.message), (12, 3));
        assert!(ids.names(1 << 40, 12) && !ids.names(1 << 40, 13));
        assert_eq!(SessionClaims::open(&keys, &id), None);
        assert!(id.len() < 220, "{} characters", id.len());
    }

    #[test]
    fn a_session_belongs_to_its_caller_and_source_only() {
        let claims = claims();
        assert!(claims.belongs_to(&who("acme", "alice"), "db"));
        assert!(!claims.belongs_to(&who("acme", "bob"), "db"));
        assert!(!claims.belongs_to(&who("other", "alice"), "db"));
        assert!(!claims.belongs_to(&who("acme", "alice"), "files"));
    }
}
