//! Identities from credentials: agent API keys and tunnel tokens.
//!
//! Secrets are stored and configured only as `sha256:<hex>` digests. Tokens and keys are at least
//! 32 random bytes, so a plain (unsalted) hash is as strong as the secret itself; lookups go by
//! a digest prefix and the full digest is then compared in constant time.

use std::collections::HashMap;
use std::sync::Arc;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of a stored secret digest.
const HASH_PREFIX: &str = "sha256:";

/// Random bytes in a generated token or key: 256 bits, beyond any guessing.
pub const SECRET_BYTES: usize = 32;

/// The digest of a secret, as stored at rest.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    /// The digest of `secret`.
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    /// Parses the stored form `sha256:<64 hex digits>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let hex_part = text.strip_prefix(HASH_PREFIX).ok_or_else(|| {
            format!("expected \"{HASH_PREFIX}<64 hex digits>\", not a clear-text secret")
        })?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes)
            .map_err(|_| format!("expected \"{HASH_PREFIX}\" followed by 64 hex digits"))?;
        Ok(Self(bytes))
    }

    fn prefix(&self) -> u64 {
        u64::from_be_bytes(
            self.0[..8]
                .try_into()
                .expect("a 32-byte digest has an 8-byte prefix"),
        )
    }

    fn matches(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// A short form for logs (`sha256:` and the first 12 hex digits): enough for an operator to
    /// find the entry in the configuration, never the secret (the digest is not secret either).
    pub fn short(&self) -> String {
        format!("{HASH_PREFIX}{}", hex::encode(&self.0[..6]))
    }
}

impl std::fmt::Display for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{HASH_PREFIX}{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretHash({self})")
    }
}

/// A fresh random secret with a readable prefix (`mcpt_tok_`, `mcpt_key_`) that secret
/// scanners can match.
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// Who is calling: resolved from a credential, attached to every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The tenant the credential belongs to.
    pub tenant: Arc<str>,
    /// The caller, e.g. an e-mail address or a service name.
    pub subject: Arc<str>,
    /// Roles granted to the caller within the tenant.
    pub roles: Arc<[String]>,
}

/// What a tunnel token grants: its tenant and, for a token bound to sources
/// (`[[tenants.tunnels]]`), the only source names it may announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelGrant {
    /// The tenant the token registers sources for.
    pub tenant: Arc<str>,
    /// The sources it may announce; `None` for an unbound token (`tunnel_tokens`), which may
    /// announce any source name of its tenant.
    pub sources: Option<Arc<[String]>>,
    /// The token's digest: which token a tunnel came with (logs name it by [`SecretHash::short`]).
    pub token: SecretHash,
}

impl TunnelGrant {
    /// Whether the token may announce `source`.
    pub fn allows(&self, source: &str) -> bool {
        self.sources
            .as_ref()
            .is_none_or(|sources| sources.iter().any(|s| s == source))
    }

    /// Whether the token is bound to `source` by name (not merely allowed it as an unbound
    /// token is).
    pub fn is_bound_to(&self, source: &str) -> bool {
        self.sources
            .as_ref()
            .is_some_and(|sources| sources.iter().any(|s| s == source))
    }
}

/// A digest-indexed table of secrets, each mapped to what it proves.
#[derive(Debug)]
struct SecretTable<T> {
    by_prefix: HashMap<u64, Vec<(SecretHash, T)>>,
}

impl<T> Default for SecretTable<T> {
    fn default() -> Self {
        Self {
            by_prefix: HashMap::new(),
        }
    }
}

impl<T> SecretTable<T> {
    fn insert(&mut self, hash: SecretHash, value: T) {
        self.by_prefix
            .entry(hash.prefix())
            .or_default()
            .push((hash, value));
    }

    fn get(&self, secret: &str) -> Option<&T> {
        let hash = SecretHash::of(secret);
        self.by_prefix
            .get(&hash.prefix())?
            .iter()
            .find(|(stored, _)| stored.matches(&hash))
            .map(|(_, value)| value)
    }
}

/// Every credential the relay accepts: agent API keys, agent JWTs (through the configured
/// identity providers) and tunnel tokens, across tenants.
#[derive(Debug, Default)]
pub struct Keyring {
    api_keys: SecretTable<Identity>,
    tunnel_tokens: SecretTable<TunnelGrant>,
    jwt: super::jwt::JwtVerifier,
    assertions: Option<Arc<super::assertion::AssertionSigner>>,
}

impl Keyring {
    /// Adds an agent API key digest.
    pub fn add_api_key(&mut self, hash: SecretHash, identity: Identity) {
        self.api_keys.insert(hash, identity);
    }

    /// Adds an unbound tunnel token digest for `tenant`: it may announce any source name of
    /// the tenant (the `tunnel_tokens` form; prefer [`Keyring::add_bound_tunnel_token`]).
    pub fn add_tunnel_token(&mut self, hash: SecretHash, tenant: Arc<str>) {
        self.tunnel_tokens.insert(
            hash,
            TunnelGrant {
                tenant,
                sources: None,
                token: hash,
            },
        );
    }

    /// Adds a tunnel token digest for `tenant` that may announce only `sources`.
    pub fn add_bound_tunnel_token(
        &mut self,
        hash: SecretHash,
        tenant: Arc<str>,
        sources: impl IntoIterator<Item = String>,
    ) {
        self.tunnel_tokens.insert(
            hash,
            TunnelGrant {
                tenant,
                sources: Some(sources.into_iter().collect()),
                token: hash,
            },
        );
    }

    /// The identity behind an agent API key, if it is one.
    pub fn agent(&self, api_key: &str) -> Option<&Identity> {
        self.api_keys.get(api_key)
    }

    /// Sets the JWT verifier (identity providers and the relay's public URL).
    pub fn set_jwt(&mut self, verifier: super::jwt::JwtVerifier) {
        self.jwt = verifier;
    }

    /// The JWT verifier: empty (no provider, no public URL) unless configured.
    pub fn jwt(&self) -> &super::jwt::JwtVerifier {
        &self.jwt
    }

    /// Sets the signer of identity assertions for upstreams.
    pub fn set_assertions(&mut self, signer: super::assertion::AssertionSigner) {
        self.assertions = Some(Arc::new(signer));
    }

    /// The signer of identity assertions for upstreams, if configured.
    pub fn assertions(&self) -> Option<&Arc<super::assertion::AssertionSigner>> {
        self.assertions.as_ref()
    }

    /// The tenant a tunnel token belongs to, if it is one.
    pub fn tunnel_tenant(&self, token: &str) -> Option<&Arc<str>> {
        self.tunnel_grant(token).map(|grant| &grant.tenant)
    }

    /// What a tunnel token grants (tenant, and the sources a bound token may announce), if it
    /// is one.
    pub fn tunnel_grant(&self, token: &str) -> Option<&TunnelGrant> {
        self.tunnel_tokens.get(token)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// alice of tenant acme with `roles`: the caller of the policy and condition tests.
    pub(crate) fn who(roles: &[&str]) -> Identity {
        Identity {
            tenant: "acme".into(),
            subject: "alice".into(),
            roles: roles
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .into(),
        }
    }

    #[test]
    fn hash_round_trips_and_refuses_clear_text() {
        let hash = SecretHash::of("s3cret");
        assert_eq!(SecretHash::parse(&hash.to_string()), Ok(hash));
        assert!(SecretHash::parse("s3cret").is_err());
        assert!(SecretHash::parse("sha256:abcd").is_err());
    }

    #[test]
    fn keyring_resolves_only_known_secrets() {
        let mut keyring = Keyring::default();
        let identity = Identity {
            tenant: "acme".into(),
            subject: "alice".into(),
            roles: Arc::from(vec![]),
        };
        let key = new_secret("mcpt_key_");
        keyring.add_api_key(SecretHash::of(&key), identity.clone());
        keyring.add_tunnel_token(SecretHash::of("tok"), "acme".into());
        assert_eq!(keyring.agent(&key), Some(&identity));
        assert_eq!(
            keyring.agent("tok"),
            None,
            "a tunnel token is not an API key"
        );
        assert_eq!(keyring.tunnel_tenant("tok").map(|t| &**t), Some("acme"));
        assert_eq!(keyring.tunnel_tenant(&key), None);
        assert!(key.len() >= SECRET_BYTES * 2);
    }

    #[test]
    fn bound_tokens_allow_only_their_sources() {
        let mut keyring = Keyring::default();
        keyring.add_tunnel_token(SecretHash::of("any"), "acme".into());
        keyring.add_bound_tunnel_token(
            SecretHash::of("db"),
            "acme".into(),
            ["db".to_owned(), "files".to_owned()],
        );
        let any = keyring.tunnel_grant("any").expect("unbound token");
        assert!(any.allows("db") && any.allows("whatever"));
        assert!(!any.is_bound_to("db"));
        let bound = keyring.tunnel_grant("db").expect("bound token");
        assert!(bound.allows("db") && bound.allows("files") && !bound.allows("crm"));
        assert!(bound.is_bound_to("db"));
        assert_eq!(bound.token, SecretHash::of("db"));
        assert_eq!(bound.token.short().len(), "sha256:".len() + 12);
    }
}
