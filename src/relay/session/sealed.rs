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

impl SessionClaims {
    /// The agent-facing session id: these claims, sealed with the fleet's current secret.
    pub(crate) fn seal(&self, keys: &FleetKeys) -> String {
        let plain = serde_json::to_vec(self)
            .expect("claims serialize infallibly: plain strings, numbers and booleans");
        keys.seal(Purpose::Session, &plain)
    }

    /// The claims in a session id, if a relay of this fleet sealed it.
    pub(crate) fn open(keys: &FleetKeys, id: &str) -> Option<Self> {
        let plain = keys.open(Purpose::Session, id)?;
        serde_json::from_slice(&plain).ok()
    }

    /// Whether the session is `who`'s, with `source`: another caller's id reads as unknown.
    pub(crate) fn belongs_to(&self, who: &Identity, source: &str) -> bool {
        *self.tenant == *who.tenant && *self.subject == *who.subject && self.source == source
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
    fn a_session_belongs_to_its_caller_and_source_only() {
        let claims = claims();
        assert!(claims.belongs_to(&who("acme", "alice"), "db"));
        assert!(!claims.belongs_to(&who("acme", "bob"), "db"));
        assert!(!claims.belongs_to(&who("other", "alice"), "db"));
        assert!(!claims.belongs_to(&who("acme", "alice"), "files"));
    }
}
