//! `input_required` rounds (2026-07-28, SEP-2322) as the relay governs them.
//!
//! A stateless call may be answered with `resultType: "input_required"`: requests the agent
//! must answer (elicitation, sampling, roots), and a `requestState` its retry hands back. The
//! upstream's state (or the handle of the call `connect` keeps waiting, when it bridges a
//! session-era upstream) never reaches the agent as it is: the relay seals it, with whose call
//! it is (tenant, subject, source), a digest of what the call asks (method and arguments),
//! the `connect` that holds the rest of the call, and when it was issued ([`InputClaims`]).
//! The retry, on any relay of the fleet, is opened and checked before it goes anywhere: a
//! state that was forged, altered, sealed for another caller or for other arguments, expired,
//! or already spent on this relay is refused ([`StateRefused`]); a good one is replaced by
//! the upstream's own state and routed to the `connect` that holds the call.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::sealed::InputClaims;
use crate::govern::Identity;
use crate::mcp::bridge::{self, Resealed};
use crate::mcp::jsonrpc::{codes, error_body};
use crate::relay::fleet::{FleetKeys, MAX_INNER_STATE, MAX_SEALED_STATE_LEN};
use crate::relay::tunnel::registry::unix_now;

/// How long an agent has to retry an `input_required` answer: the time `connect` keeps a
/// bridged call waiting for it ([`bridge::INPUT_WAIT`]).
pub(crate) const INPUT_WAIT_SECS: u64 = bridge::INPUT_WAIT.as_secs();

/// States remembered as spent, at most: each is a 128-bit nonce and an expiry, about 64
/// bytes with the set's overhead, so the set stays under about 6 MiB; past it the one spent
/// longest ago is forgotten first.
const MAX_SPENT: usize = 100_000;

/// Seals the `requestState` of an `input_required` answer to one stateless request.
pub(crate) struct InputSeal {
    keys: Arc<FleetKeys>,
    tenant: String,
    subject: String,
    source: String,
    /// The request (digested only when an answer needs sealing: most never do).
    request: Bytes,
    /// The `connect` that answered, which holds a bridged call's rest.
    connect: Option<String>,
    /// The call's id in the audit trail: the first round's, carried by every state after it.
    call: String,
}

impl InputSeal {
    /// The sealer of answers to `who`'s `request` to `source`, answered by `connect`; `call`
    /// is the call's id when the request is a retry (a round after the first).
    pub(crate) fn new(
        keys: Arc<FleetKeys>,
        who: &Identity,
        source: &str,
        request: Bytes,
        (connect, call): (Option<String>, Option<String>),
    ) -> Self {
        Self {
            keys,
            tenant: who.tenant.to_string(),
            subject: who.subject.to_string(),
            source: source.to_owned(),
            request,
            connect,
            call: call.unwrap_or_else(|| {
                let mut bytes = [0u8; 16];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
                hex::encode(bytes)
            }),
        }
    }

    /// The call's id in the audit trail.
    pub(crate) fn call(&self) -> &str {
        &self.call
    }

    /// The answer as the agent gets it: an `input_required` result with its state sealed
    /// (and `true`); an error in its place when it cannot be (the upstream's state is too
    /// large, or not a string); anything else unchanged.
    pub(crate) fn apply(&self, message: Bytes) -> (Bytes, bool) {
        let message = match bridge::reseal_input_required(&message, |inner| self.seal(inner)) {
            Resealed::Unchanged => message,
            Resealed::Sealed(sealed) => return (sealed, true),
            Resealed::Refused => {
                tracing::warn!(source = %self.source, "an input_required answer whose requestState cannot be sealed was refused");
                let id = crate::mcp::classify(&message)
                    .ok()
                    .and_then(|c| c.messages().first().and_then(|m| m.id.clone()));
                error_body(
                    id.as_deref(),
                    codes::SOURCE_UNAVAILABLE,
                    &format!(
                        "source {} answered input_required with a requestState that cannot be \
                         carried (not a string, or over {MAX_INNER_STATE} bytes)",
                        self.source
                    ),
                )
            }
        };
        (message, false)
    }

    fn seal(&self, inner: Option<&str>) -> Option<String> {
        if inner.is_some_and(|s| s.len() > MAX_INNER_STATE) {
            return None;
        }
        let digest = bridge::call_digest(&self.request)?;
        let mut nonce = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let claims = InputClaims {
            tenant: self.tenant.clone(),
            subject: self.subject.clone(),
            source: self.source.clone(),
            digest: hex::encode(digest),
            connect: self.connect.clone(),
            inner: inner.map(str::to_owned),
            issued: unix_now(),
            nonce: hex::encode(nonce),
            call: self.call.clone(),
        };
        // Escapes in the JSON of the claims can make a state under the limit seal over it.
        Some(claims.seal(&self.keys)).filter(|sealed| sealed.len() <= MAX_SEALED_STATE_LEN)
    }
}

/// Why a retry's `requestState` is refused. Each is an invalid-params error to the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StateRefused {
    /// Not sealed by this fleet, or altered.
    #[error("requestState is not one this relay issued")]
    Unknown,
    /// Sealed for another caller, or another source.
    #[error("requestState belongs to another caller")]
    NotYours,
    /// Sealed for a call with another method or other arguments.
    #[error(
        "requestState was issued for a call with other arguments: send the request again \
         without it"
    )]
    OtherCall,
    /// Older than [`INPUT_WAIT_SECS`].
    #[error("requestState expired: the call waited {INPUT_WAIT_SECS} s for its input")]
    Expired,
    /// Already handed back once.
    #[error("requestState was already used")]
    Spent,
}

/// Opens the `state` of `who`'s retry `request` to `source` and spends it: its claims, or
/// why it is refused.
pub(crate) fn open_retry(
    keys: &FleetKeys,
    spent: &SpentStates,
    who: &Identity,
    source: &str,
    request: &[u8],
    state: &str,
) -> Result<InputClaims, StateRefused> {
    let claims = InputClaims::open(keys, state).ok_or(StateRefused::Unknown)?;
    if *claims.tenant != *who.tenant || *claims.subject != *who.subject || claims.source != source {
        return Err(StateRefused::NotYours);
    }
    let digest = bridge::call_digest(request).map(hex::encode);
    if digest.as_deref() != Some(claims.digest.as_str()) {
        return Err(StateRefused::OtherCall);
    }
    let now = unix_now();
    let expires = claims.issued.saturating_add(INPUT_WAIT_SECS);
    if now > expires {
        return Err(StateRefused::Expired);
    }
    if !spent.spend(&claims.nonce, expires, now) {
        return Err(StateRefused::Spent);
    }
    Ok(claims)
}

/// The `requestState`s this relay has seen retried, until they expire: a state is good for
/// one retry (each round of a call seals a new one).
#[derive(Default)]
pub(crate) struct SpentStates {
    inner: Mutex<Spent>,
}

#[derive(Default)]
struct Spent {
    nonces: HashSet<u128>,
    /// In the order spent, with when each expires. States are spent soon after they are
    /// issued, so this is nearly the order they expire in: the front is dropped once expired
    /// (one expiring later behind it waits at most the state lifetime for its turn).
    order: VecDeque<(u64, u128)>,
}

impl SpentStates {
    /// Marks `nonce` (hex, expiring at `expires`) spent; `false` when it already was (or is
    /// not a nonce this relay makes).
    fn spend(&self, nonce: &str, expires: u64, now: u64) -> bool {
        let Ok(nonce) = u128::from_str_radix(nonce, 16) else {
            return false;
        };
        let mut spent = self.inner.lock();
        while let Some((expiry, _)) = spent.order.front()
            && (*expiry < now || spent.order.len() >= MAX_SPENT)
        {
            if let Some((_, old)) = spent.order.pop_front() {
                spent.nonces.remove(&old);
            }
        }
        if !spent.nonces.insert(nonce) {
            return false;
        }
        spent.order.push_back((expires, nonce));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(subject: &str) -> Identity {
        Identity {
            tenant: "acme".into(),
            subject: subject.into(),
            roles: Vec::new().into(),
        }
    }

    const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":1}}}"#;
    const ASKED: &[u8] = br#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"input_required","inputRequests":{"0":{"method":"roots/list"}},"requestState":"park-1"}}"#;

    fn sealed(keys: &Arc<FleetKeys>) -> String {
        let seal = InputSeal::new(
            keys.clone(),
            &who("alice"),
            "db",
            Bytes::from_static(CALL),
            (Some("c1".into()), None),
        );
        let (answer, sealed) = seal.apply(Bytes::from_static(ASKED));
        assert!(sealed);
        let answer: serde_json::Value = serde_json::from_slice(&answer).expect("JSON");
        let state = answer["result"]["requestState"].as_str().expect("a state");
        assert_ne!(
            state, "park-1",
            "the upstream's state never reaches the agent"
        );
        state.to_owned()
    }

    #[test]
    fn a_sealed_state_opens_once_for_its_caller_and_call() {
        let keys = Arc::new(FleetKeys::from_secrets(
            b"0123456789abcdef0123456789abcdef",
            &[],
        ));
        let spent = SpentStates::default();
        let state = sealed(&keys);
        let retry = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"t","arguments":{"a":1},"requestState":"x","inputResponses":{}}}"#;
        let other = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"t","arguments":{"a":2}}}"#;
        let open = |who: &Identity, request: &[u8], state: &str| {
            open_retry(&keys, &spent, who, "db", request, state)
        };
        assert_eq!(
            open(&who("bob"), retry, &state).err(),
            Some(StateRefused::NotYours)
        );
        assert_eq!(
            open(&who("alice"), other, &state).err(),
            Some(StateRefused::OtherCall)
        );
        let mut forged = state.clone().into_bytes();
        forged[20] = if forged[20] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).expect("base64 stays ASCII");
        assert_eq!(
            open(&who("alice"), retry, &forged).err(),
            Some(StateRefused::Unknown)
        );
        let claims = open(&who("alice"), retry, &state).expect("the caller's own retry");
        assert_eq!(claims.inner.as_deref(), Some("park-1"));
        assert_eq!(claims.connect.as_deref(), Some("c1"));
        assert_eq!(claims.call.len(), 32, "a call id");
        assert_eq!(
            open(&who("alice"), retry, &state).err(),
            Some(StateRefused::Spent)
        );
        let elsewhere = FleetKeys::from_secrets(b"another fleet's secret, 32 bytes!", &[]);
        assert_eq!(
            open_retry(
                &elsewhere,
                &spent,
                &who("alice"),
                "db",
                retry,
                &sealed(&keys)
            )
            .err(),
            Some(StateRefused::Unknown)
        );
    }

    #[test]
    fn spent_states_are_forgotten_when_they_expire() {
        let spent = SpentStates::default();
        assert!(spent.spend("0a", 100, 10));
        assert!(!spent.spend("0a", 100, 20));
        assert!(spent.spend("0b", 300, 150), "0a expired at 100");
        assert!(
            spent.spend("0a", 400, 150),
            "forgotten once expired: it cannot open anyway"
        );
        assert!(!spent.spend("not hex", 400, 150));
    }
}
