//! Identity assertions for upstreams: a short-lived JWT, signed by the relay with an Ed25519
//! key, that names the caller behind a tunnel stream. `connect` passes it to the private server
//! in a header, so the server knows which end user is calling (and can verify that with the
//! relay's public key) without ever seeing the agent's credential.
//!
//! Off by default; enabled per tenant and source. No HTTP in here: the relay asks for a token
//! when it opens a stream.
//!
//! # Lifetime
//!
//! An assertion is signed when a tunnel stream opens (per stateless request, and per
//! session-era session) and travels in the stream's open header. Its `exp` is `iat + ttl`. A
//! session outlives that, so the relay keeps it fresh with a [`Refresher`]: before forwarding a
//! message of the session once the current assertion is past half its lifetime, it signs a new
//! one and sends it on the stream first ([`crate::wire::FrameKind::Identity`]); `connect` puts
//! the latest assertion on every upstream request. So every request reaches the upstream with
//! an assertion that has at least half its lifetime left when it was forwarded, whatever the
//! session's age; an upstream can verify each request on its own.
//!
//! A reload reaches live sessions at their next request: the relay hands the refresher the
//! signer now configured and the caller's identity as just authenticated (with the roles the
//! reloaded file gives it), and when either differs from what the assertion in use was signed
//! with, the next message of the session carries a fresh assertion signed with them (a rotated
//! key, a new lifetime, changed roles). A reload that stops assertions for the source, or
//! removes `[identity_assertion]`, leaves live sessions renewing as they were (their upstream
//! expects an assertion on every request); new sessions follow the new file.
//!
//! # Audience
//!
//! `aud` is `TENANT/SOURCE` (see [`audience`]): source names are per tenant, so the bare source
//! name (what `aud` held before) was the same for two tenants' `db`, and an upstream serving
//! one tenant could be handed an assertion meant for another's.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use rand::RngCore;
use serde::Serialize;

use super::Identity;

/// Issuer when the relay has no public URL.
pub const DEFAULT_ISSUER: &str = "mcp-tunnel";

/// Why assertions cannot be configured or signed.
#[derive(Debug, thiserror::Error)]
pub enum AssertionError {
    /// The signing key is not an Ed25519 private key in PKCS#8 PEM.
    #[error("the signing key must be an Ed25519 private key in PKCS#8 PEM: {0}")]
    Key(String),
    /// The header name is not usable.
    #[error("header {0:?} must be a valid header name starting with \"x-\"")]
    Header(String),
    /// The lifetime is zero or unreasonably long.
    #[error("ttl_secs must be between 1 and 3600, not {0}")]
    Ttl(u64),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Whether `name` may carry an assertion: a valid header name in the `x-` namespace, so it can
/// never replace a header that routes or authenticates the request (`Host`, `Authorization`).
pub fn header_name_allowed(name: &str) -> bool {
    // Compared as bytes: `connect` reads the name from the relay's frames, and a multi-byte
    // character straddling byte 2 must be refused, not split (fuzz/ `handshake` target).
    name.len() > 2
        && name.as_bytes()[..2].eq_ignore_ascii_case(b"x-")
        && http::HeaderName::try_from(name).is_ok()
}

/// The audience of assertions for `tenant`'s `source`: `TENANT/SOURCE`. Source names never
/// contain `/`, so the last `/` splits it unambiguously.
pub fn audience(tenant: &str, source: &str) -> String {
    format!("{tenant}/{source}")
}

/// The claims of an assertion.
#[derive(Debug, Clone, Serialize)]
pub struct Claims<'a> {
    /// The relay: its public URL, or `mcp-tunnel`.
    pub iss: &'a str,
    /// The caller.
    pub sub: &'a str,
    /// The audience: `TENANT/SOURCE` ([`audience`]).
    pub aud: &'a str,
    /// The caller's tenant.
    pub tenant: &'a str,
    /// The caller's roles within the tenant.
    pub roles: &'a [String],
    /// The source the stream is for.
    pub source: &'a str,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    /// A random id, unique per assertion.
    pub jti: String,
}

/// Signs identity assertions for the sources whose tenants ask for them.
pub struct AssertionSigner {
    key: EncodingKey,
    issuer: String,
    header: String,
    ttl_secs: u64,
    /// Per tenant, the sources that get assertions.
    enabled: HashMap<Arc<str>, HashSet<String>>,
}

impl std::fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("issuer", &self.issuer)
            .field("header", &self.header)
            .field("ttl_secs", &self.ttl_secs)
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

/// What `connect` is given for one stream: its wire form lives with the open header.
pub use crate::wire::Assertion;

impl AssertionSigner {
    /// A signer with the Ed25519 private key in `key_pem` (PKCS#8 PEM).
    pub fn new(
        key_pem: &str,
        issuer: String,
        header: String,
        ttl_secs: u64,
    ) -> Result<Self, AssertionError> {
        let pair =
            rcgen::KeyPair::from_pem(key_pem).map_err(|e| AssertionError::Key(e.to_string()))?;
        if pair.algorithm() != &rcgen::PKCS_ED25519 {
            return Err(AssertionError::Key("not an Ed25519 key".into()));
        }
        if !header_name_allowed(&header) {
            return Err(AssertionError::Header(header));
        }
        if ttl_secs == 0 || ttl_secs > 3600 {
            return Err(AssertionError::Ttl(ttl_secs));
        }
        Ok(Self {
            key: EncodingKey::from_ed_der(&pair.serialize_der()),
            issuer,
            header,
            ttl_secs,
            enabled: HashMap::new(),
        })
    }

    /// Turns assertions on for `tenant`'s `sources`.
    pub fn enable(&mut self, tenant: Arc<str>, sources: impl IntoIterator<Item = String>) {
        self.enabled.entry(tenant).or_default().extend(sources);
    }

    /// Whether `tenant`'s `source` gets assertions.
    pub fn is_enabled(&self, tenant: &str, source: &str) -> bool {
        self.enabled
            .get(tenant)
            .is_some_and(|sources| sources.contains(source))
    }

    /// The assertion for `who` calling `source`, if its tenant enables them for that source.
    pub fn assert(
        &self,
        who: &Identity,
        source: &str,
    ) -> Result<Option<Assertion>, AssertionError> {
        if !self.is_enabled(&who.tenant, source) {
            return Ok(None);
        }
        self.sign(who, source).map(|(assertion, _)| Some(assertion))
    }

    /// Signs an assertion, and says how long it is valid from now (its `exp` is in whole
    /// seconds, so up to a second less than the lifetime).
    fn sign(&self, who: &Identity, source: &str) -> Result<(Assertion, Duration), AssertionError> {
        let mut jti = [0u8; 16];
        rand::rng().fill_bytes(&mut jti);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let iat = now.as_secs();
        let exp = iat + self.ttl_secs;
        let aud = audience(&who.tenant, source);
        let claims = Claims {
            iss: &self.issuer,
            sub: &who.subject,
            aud: &aud,
            tenant: &who.tenant,
            roles: &who.roles,
            source,
            iat,
            exp,
            jti: hex::encode(jti),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.key)?;
        let valid_for = Duration::from_secs(exp).saturating_sub(now);
        Ok((
            Assertion {
                header: self.header.clone(),
                token,
            },
            valid_for,
        ))
    }
}

/// Keeps one stream's assertion fresh: [`Refresher::due`] gives a new assertion once the
/// current one is past half its lifetime.
pub struct Refresher {
    source: String,
    current: Mutex<Current>,
}

/// What the assertion in use was signed with, and when it passes half its lifetime.
struct Current {
    signer: Arc<AssertionSigner>,
    who: Identity,
    renew_at: Instant,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Refresher {
    /// The first assertion of a stream for `who` calling `source`, and the refresher that
    /// renews it; `None` when the tenant does not enable assertions for the source.
    pub fn start(
        signer: &Arc<AssertionSigner>,
        who: &Identity,
        source: &str,
    ) -> Result<Option<(Assertion, Self)>, AssertionError> {
        if !signer.is_enabled(&who.tenant, source) {
            return Ok(None);
        }
        let (assertion, valid_for) = signer.sign(who, source)?;
        let refresher = Self {
            source: source.to_owned(),
            current: Mutex::new(Current {
                signer: signer.clone(),
                who: who.clone(),
                renew_at: Instant::now() + valid_for / 2,
            }),
        };
        Ok(Some((assertion, refresher)))
    }

    /// A new assertion if the one in use is past half its lifetime at `now`, else `None`.
    /// Concurrent callers get at most one new assertion per half-lifetime.
    pub fn due(&self, now: Instant) -> Result<Option<Assertion>, AssertionError> {
        let mut current = self.current.lock();
        if now < current.renew_at {
            return Ok(None);
        }
        let (assertion, valid_for) = current.signer.sign(&current.who, &self.source)?;
        current.renew_at = now + valid_for / 2;
        Ok(Some(assertion))
    }

    /// Hands the refresher the signer configured now (`None`: assertions are off) and the
    /// caller's identity as the latest request authenticated it. When the signer still enables
    /// this source and either differs from what the assertion in use was signed with (a
    /// reload rotated the key or changed the lifetime, or the caller's roles changed), the
    /// next [`Refresher::due`] signs a fresh assertion with them, whatever the age of the one
    /// in use. A signer that no longer enables the source changes nothing (see the module
    /// docs); neither does an identity of another tenant or subject.
    pub fn update(&self, signer: Option<&Arc<AssertionSigner>>, who: &Identity) {
        let mut current = self.current.lock();
        if who.tenant != current.who.tenant || who.subject != current.who.subject {
            return;
        }
        let signer = match signer {
            Some(signer) if signer.is_enabled(&who.tenant, &self.source) => signer,
            _ => return,
        };
        if Arc::ptr_eq(signer, &current.signer) && *who == current.who {
            return;
        }
        current.signer = signer.clone();
        current.who = who.clone();
        current.renew_at = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header and lifetime `[identity_assertion]` defaults to.
    const DEFAULT_HEADER: &str = "X-MCP-Tunnel-Identity";
    const DEFAULT_TTL_SECS: u64 = 60;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{DecodingKey, Validation};
    use serde_json::Value;

    fn signer() -> (AssertionSigner, DecodingKey) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
        let public =
            DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(pair.public_key_raw()))
                .expect("public key");
        let signer = AssertionSigner::new(
            &pair.serialize_pem(),
            "https://relay.example".into(),
            DEFAULT_HEADER.into(),
            DEFAULT_TTL_SECS,
        )
        .expect("signer");
        (signer, public)
    }

    fn alice() -> Identity {
        crate::govern::identity::tests::who(&["analyst"])
    }

    #[test]
    fn signs_only_for_enabled_sources_and_verifies() {
        let (mut signer, public) = signer();
        assert_eq!(signer.assert(&alice(), "db").expect("signs"), None);
        signer.enable("acme".into(), ["db".to_owned()]);
        assert_eq!(signer.assert(&alice(), "crm").expect("signs"), None);
        let assertion = signer.assert(&alice(), "db").expect("signs").expect("on");
        assert_eq!(assertion.header, DEFAULT_HEADER);
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&["acme/db"]);
        validation.set_issuer(&["https://relay.example"]);
        let claims = jsonwebtoken::decode::<Value>(&assertion.token, &public, &validation)
            .expect("verifies")
            .claims;
        assert_eq!(claims["sub"], "alice");
        assert_eq!(claims["tenant"], "acme");
        assert_eq!(claims["source"], "db");
        assert_eq!(claims["roles"][0], "analyst");
        assert_eq!(
            claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"),
            DEFAULT_TTL_SECS
        );
        let other = Identity {
            tenant: "globex".into(),
            ..alice()
        };
        assert_eq!(signer.assert(&other, "db").expect("signs"), None);
    }

    #[test]
    fn refuses_bad_keys_headers_and_ttls() {
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("EC key");
        let new = |pem: &str, header: &str, ttl| {
            AssertionSigner::new(pem, "i".into(), header.into(), ttl).map(|_| ())
        };
        assert!(matches!(
            new(&ec.serialize_pem(), DEFAULT_HEADER, 60),
            Err(AssertionError::Key(_))
        ));
        assert!(matches!(
            new("nope", DEFAULT_HEADER, 60),
            Err(AssertionError::Key(_))
        ));
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
        let pem = ed.serialize_pem();
        for header in ["Authorization", "Host", "x-", "x-bad header"] {
            assert!(
                matches!(new(&pem, header, 60), Err(AssertionError::Header(_))),
                "{header}"
            );
        }
        assert!(matches!(
            new(&pem, DEFAULT_HEADER, 0),
            Err(AssertionError::Ttl(0))
        ));
        assert!(new(&pem, "x-user", 600).is_ok());
    }

    #[test]
    fn a_refresher_renews_past_half_the_lifetime_only() {
        let (mut signer, public) = signer();
        signer.enable("acme".into(), ["db".to_owned()]);
        let signer = Arc::new(signer);
        assert!(
            Refresher::start(&signer, &alice(), "crm")
                .expect("signs")
                .is_none(),
            "not enabled for crm"
        );
        let (first, refresher) = Refresher::start(&signer, &alice(), "db")
            .expect("signs")
            .expect("enabled");
        let start = Instant::now();
        assert_eq!(refresher.due(start).expect("signs"), None, "fresh");
        // The first assertion is valid for between TTL - 1 and TTL seconds: half of that is
        // past by TTL / 2 seconds from now.
        let later = start + Duration::from_secs(DEFAULT_TTL_SECS / 2);
        let renewed = refresher
            .due(later)
            .expect("signs")
            .expect("past half the lifetime");
        assert_ne!(renewed.token, first.token);
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&["acme/db"]);
        validation.set_issuer(&["https://relay.example"]);
        jsonwebtoken::decode::<Value>(&renewed.token, &public, &validation).expect("verifies");
        assert_eq!(
            refresher.due(later).expect("signs"),
            None,
            "renewed once per half-lifetime"
        );
    }

    /// A header name from the relay with a multi-byte character across byte 2 is refused; it
    /// panicked `connect`'s source task (slicing a `str` off a character boundary).
    #[test]
    fn header_name_with_multibyte_character_is_refused_without_panic() {
        assert!(!header_name_allowed("x\u{e9}-a"));
        assert!(!header_name_allowed("\u{e9}\u{e9}"));
        assert!(!header_name_allowed("x-\u{e9}"));
        assert!(header_name_allowed("X-MCP-Tunnel-Identity"));
    }
}
