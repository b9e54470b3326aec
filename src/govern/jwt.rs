//! Agent identities from JWT bearer tokens issued by a configured identity provider.
//!
//! A token is accepted when its issuer is a configured provider's, its signature verifies with a
//! key of that provider's JWKS (RS256, ES256 or EdDSA only: never `none`, never HMAC), its
//! audience is one this relay answers to (by default the relay's public URL), and it is within
//! its `exp` / `nbf` window (with a small leeway). Its claims then map to an [`Identity`] as the
//! provider's configuration says, and it must carry the provider's required scopes.
//!
//! No I/O here: JWKS documents come in as text (the configuration layer reads the files), or
//! from a [`RemoteJwks`] cache that fetches them (see [`super::jwks`]).

use std::collections::HashSet;
use std::sync::Arc;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::{Map, Value};

use super::Identity;
use super::jwks::RemoteJwks;

/// Seconds of clock skew tolerated on `exp` and `nbf` by default.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;

/// The algorithms a provider may sign with.
pub const SUPPORTED_ALGORITHMS: &[Algorithm] =
    &[Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

/// Why a JWT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not a well-formed JWT (three base64url parts, JSON header and claims).
    #[error("malformed token")]
    Malformed,
    /// The `exp` claim is in the past.
    #[error("token expired")]
    Expired,
    /// The `nbf` claim is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// The `aud` claim names no audience this relay answers to.
    #[error("wrong audience")]
    WrongAudience,
    /// The `iss` claim names no configured identity provider.
    #[error("wrong issuer")]
    WrongIssuer,
    /// The signature does not verify with the key it names.
    #[error("bad signature")]
    BadSignature,
    /// The header's `alg` is not one the provider accepts, or does not fit the key.
    #[error("algorithm not accepted")]
    Algorithm,
    /// The header's `kid` is not in the provider's JWKS (or, without a `kid`, no single key fits).
    #[error("unknown key id")]
    UnknownKey,
    /// The provider's JWKS has not been fetched from its URL yet (the fetch failed or is in
    /// flight).
    #[error("identity provider keys unavailable (JWKS not fetched yet)")]
    KeysUnavailable,
    /// A claim the mapping needs is absent or not of the right type.
    #[error("missing claim {0}")]
    MissingClaim(String),
    /// The tenant the token names is not configured.
    #[error("unknown tenant")]
    UnknownTenant,
    /// The token lacks scopes the provider requires; carries every required scope.
    #[error("missing scope: {}", .required.join(" "))]
    MissingScope {
        /// All scopes required (space-joined in the challenge).
        required: Vec<String>,
    },
}

/// Why a provider's configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The JWKS document is not valid JSON of the JWKS shape.
    #[error("invalid JWKS: {0}")]
    Jwks(String),
    /// A key of the JWKS cannot be used.
    #[error("JWKS key {kid:?}: {message}")]
    Key {
        /// The key's id, if it has one.
        kid: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// An algorithm name that is not RS256, ES256 or EdDSA.
    #[error("algorithm {0:?} is not supported (use RS256, ES256 or EdDSA)")]
    Algorithm(String),
    /// No audience: neither configured nor defaulted from the relay's public URL.
    #[error("no audience: set audience, or [agents] public_url")]
    NoAudience,
}

/// Where the tenant of a token's caller comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantSource {
    /// Every token of this provider belongs to this tenant.
    Fixed(Arc<str>),
    /// The named claim holds the tenant's name.
    Claim(String),
}

/// How a token's claims become an [`Identity`].
#[derive(Debug, Clone)]
pub struct ClaimMapping {
    /// The claim naming the caller (usually `sub`).
    pub subject: String,
    /// Where the tenant comes from.
    pub tenant: TenantSource,
    /// The claim listing roles (an array of strings, or a space-separated string), if any.
    pub roles: Option<String>,
    /// The claim listing scopes (a space-separated string per RFC 8693, or an array).
    pub scope: String,
}

/// The usable keys of a JWKS, with their key ids.
pub type KeySet = Vec<(Option<String>, DecodingKey)>;

/// Parses a JWKS document into its usable keys. HMAC keys are skipped: in a public JWKS they
/// would let anyone who reads it sign tokens.
pub fn key_set(jwks: &str) -> Result<KeySet, ProviderError> {
    let set: JwkSet = serde_json::from_str(jwks).map_err(|e| ProviderError::Jwks(e.to_string()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let kid = jwk.common.key_id.clone();
        let key = DecodingKey::from_jwk(jwk).map_err(|e| ProviderError::Key {
            kid: kid.clone(),
            message: e.to_string(),
        })?;
        if key.family() == jsonwebtoken::AlgorithmFamily::Hmac {
            continue;
        }
        keys.push((kid, key));
    }
    Ok(keys)
}

/// Where a provider's keys come from.
#[derive(Debug, Clone)]
pub enum ProviderKeys {
    /// A JWKS read once (from `jwks_file`).
    Fixed(Arc<KeySet>),
    /// A JWKS fetched from `jwks_url`, refreshed.
    Remote(Arc<RemoteJwks>),
}

impl ProviderKeys {
    /// The keys of a JWKS document.
    pub fn from_document(jwks: &str) -> Result<Self, ProviderError> {
        Ok(Self::Fixed(Arc::new(key_set(jwks)?)))
    }

    fn current(&self) -> Result<Arc<KeySet>, JwtError> {
        match self {
            Self::Fixed(keys) => Ok(keys.clone()),
            Self::Remote(remote) => remote.keys().ok_or(JwtError::KeysUnavailable),
        }
    }
}

/// One trusted identity provider.
#[derive(Debug)]
pub struct Provider {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    keys: ProviderKeys,
    mapping: ClaimMapping,
    required_scopes: Vec<String>,
    leeway_secs: u64,
    /// With a tenant claim: the only tenants its tokens may name (`None`: any tenant).
    allowed_tenants: Option<HashSet<Arc<str>>>,
}

/// Parses an algorithm name, accepting only [`SUPPORTED_ALGORITHMS`].
pub fn parse_algorithm(name: &str) -> Result<Algorithm, ProviderError> {
    name.parse::<Algorithm>()
        .ok()
        .filter(|alg| SUPPORTED_ALGORITHMS.contains(alg))
        .ok_or_else(|| ProviderError::Algorithm(name.to_owned()))
}

impl Provider {
    /// A provider from its issuer, accepted audiences, algorithms (empty: all supported), keys,
    /// claim mapping and required scopes.
    pub fn new(
        issuer: String,
        audiences: Vec<String>,
        algorithms: Vec<Algorithm>,
        keys: ProviderKeys,
        mapping: ClaimMapping,
        required_scopes: Vec<String>,
    ) -> Result<Self, ProviderError> {
        if audiences.is_empty() {
            return Err(ProviderError::NoAudience);
        }
        let algorithms = if algorithms.is_empty() {
            SUPPORTED_ALGORITHMS.to_vec()
        } else {
            algorithms
        };
        Ok(Self {
            issuer,
            audiences,
            algorithms,
            keys,
            mapping,
            required_scopes,
            leeway_secs: DEFAULT_LEEWAY_SECS,
            allowed_tenants: None,
        })
    }

    /// Sets the clock-skew leeway on `exp` and `nbf`.
    pub fn with_leeway(mut self, secs: u64) -> Self {
        self.leeway_secs = secs;
        self
    }

    /// Limits the tenants a tenant claim may name to `tenants` (a token naming another one is
    /// refused as an unknown tenant): an identity provider speaks only for the tenants it is
    /// trusted for, whatever its tokens say.
    pub fn with_allowed_tenants(mut self, tenants: HashSet<Arc<str>>) -> Self {
        self.allowed_tenants = Some(tenants);
        self
    }

    /// The issuer (`iss`) this provider's tokens carry.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The scopes every token must carry.
    pub fn required_scopes(&self) -> &[String] {
        &self.required_scopes
    }

    fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, JwtError> {
        let keys = self.keys.current()?;
        let fits = |key: &DecodingKey| key.family() == alg.family();
        match kid {
            Some(kid) => {
                let key = keys
                    .iter()
                    .find(|(id, _)| id.as_deref() == Some(kid))
                    .map(|(_, key)| key)
                    .ok_or(JwtError::UnknownKey)?;
                if fits(key) {
                    Ok(key.clone())
                } else {
                    Err(JwtError::Algorithm)
                }
            }
            None => {
                let mut fitting = keys.iter().map(|(_, key)| key).filter(|k| fits(k));
                match (fitting.next(), fitting.next()) {
                    (Some(key), None) => Ok(key.clone()),
                    _ => Err(JwtError::UnknownKey),
                }
            }
        }
    }

    fn verify(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
        tenants: &HashSet<Arc<str>>,
    ) -> Result<Identity, JwtError> {
        if !self.algorithms.contains(&alg) {
            return Err(JwtError::Algorithm);
        }
        let key = self.key(kid, alg)?;
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway_secs;
        let claims = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| match e.into_kind() {
                ErrorKind::ExpiredSignature => JwtError::Expired,
                ErrorKind::ImmatureSignature => JwtError::NotYetValid,
                ErrorKind::InvalidAudience => JwtError::WrongAudience,
                ErrorKind::InvalidIssuer => JwtError::WrongIssuer,
                ErrorKind::InvalidSignature => JwtError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    JwtError::Algorithm
                }
                ErrorKind::MissingRequiredClaim(claim) => JwtError::MissingClaim(claim),
                _ => JwtError::Malformed,
            })?
            .claims;
        self.identity(&claims, tenants)
    }

    fn identity(
        &self,
        claims: &Map<String, Value>,
        tenants: &HashSet<Arc<str>>,
    ) -> Result<Identity, JwtError> {
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| JwtError::MissingClaim(name.to_owned()))
        };
        let subject: Arc<str> = text(&self.mapping.subject)?.into();
        let tenant = match &self.mapping.tenant {
            TenantSource::Fixed(tenant) => tenant.clone(),
            TenantSource::Claim(claim) => {
                let named = text(claim)?;
                if self
                    .allowed_tenants
                    .as_ref()
                    .is_some_and(|allowed| !allowed.contains(named))
                {
                    return Err(JwtError::UnknownTenant);
                }
                tenants.get(named).cloned().ok_or(JwtError::UnknownTenant)?
            }
        };
        let roles = match &self.mapping.roles {
            Some(claim) => words(claims.get(claim)),
            None => Vec::new(),
        };
        if !self.required_scopes.is_empty() {
            let granted = words(claims.get(&self.mapping.scope));
            if !self.required_scopes.iter().all(|s| granted.contains(s)) {
                return Err(JwtError::MissingScope {
                    required: self.required_scopes.clone(),
                });
            }
        }
        Ok(Identity {
            tenant,
            subject,
            roles: roles.into(),
        })
    }
}

/// A claim's words: a space-separated string, or an array of strings.
fn words(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// Every trusted identity provider, and what the relay says about itself as an OAuth
/// protected resource (RFC 9728).
#[derive(Debug, Default)]
pub struct JwtVerifier {
    public_url: Option<String>,
    providers: Vec<Provider>,
    tenants: HashSet<Arc<str>>,
}

impl JwtVerifier {
    /// A verifier for `providers`, accepting tokens only for `tenants`; `public_url` is the
    /// relay's public base URL (no trailing slash), if configured.
    pub fn new(
        public_url: Option<String>,
        providers: Vec<Provider>,
        tenants: HashSet<Arc<str>>,
    ) -> Self {
        Self {
            public_url: public_url.map(|url| url.trim_end_matches('/').to_owned()),
            providers,
            tenants,
        }
    }

    /// The relay's public base URL, if configured.
    pub fn public_url(&self) -> Option<&str> {
        self.public_url.as_deref()
    }

    /// Whether any provider is configured.
    pub fn is_enabled(&self) -> bool {
        !self.providers.is_empty()
    }

    /// The issuers of every provider, in configuration order.
    pub fn issuers(&self) -> Vec<&str> {
        self.providers.iter().map(Provider::issuer).collect()
    }

    /// Every scope some provider requires, sorted and without repeats.
    pub fn scopes(&self) -> Vec<&str> {
        let mut scopes: Vec<&str> = self
            .providers
            .iter()
            .flat_map(|p| p.required_scopes.iter().map(String::as_str))
            .collect();
        scopes.sort_unstable();
        scopes.dedup();
        scopes
    }

    /// Before [`JwtVerifier::verify`]: when `token` names a key id its provider's fetched
    /// JWKS does not hold (a rotated key, or keys not fetched yet), waits for the JWKS to be
    /// fetched again, as far as the on-demand rate allows. Returns at once for anything else.
    pub async fn refresh_for(&self, token: &str) {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return;
        };
        let Ok(unverified) =
            jsonwebtoken::dangerous::insecure_decode_claims::<Map<String, Value>>(token)
        else {
            return;
        };
        let issuer = unverified.get("iss").and_then(Value::as_str);
        let remote = self
            .providers
            .iter()
            .find(|p| Some(p.issuer.as_str()) == issuer)
            .and_then(|p| match &p.keys {
                ProviderKeys::Remote(remote) => Some(remote.clone()),
                ProviderKeys::Fixed(_) => None,
            });
        if let Some(remote) = remote {
            remote.refresh_for(header.kid.as_deref()).await;
        }
    }

    /// Verifies `token` and maps it to the caller's identity.
    pub fn verify(&self, token: &str) -> Result<Identity, JwtError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        // The issuer picks the provider (and so the keys); the signature is checked after.
        let unverified: Map<String, Value> = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| JwtError::Malformed)?;
        let issuer = unverified
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| JwtError::MissingClaim("iss".into()))?;
        let provider = self
            .providers
            .iter()
            .find(|p| p.issuer == issuer)
            .ok_or(JwtError::WrongIssuer)?;
        provider.verify(token, header.alg, header.kid.as_deref(), &self.tenants)
    }
}

/// Whether a bearer credential has the shape of a JWT (three dot-separated parts); API keys
/// and tunnel tokens have no dots.
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.split('.').count() == 3
}

/// Tenants by name, for [`JwtVerifier::new`].
pub fn tenant_set<'a>(names: impl IntoIterator<Item = &'a str>) -> HashSet<Arc<str>> {
    names.into_iter().map(Arc::from).collect()
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;

    fn ed25519() -> (EncodingKey, Value) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
        let jwk = json!({"kty":"OKP","crv":"Ed25519","kid":"ed",
            "x": URL_SAFE_NO_PAD.encode(pair.public_key_raw())});
        (EncodingKey::from_ed_der(&pair.serialize_der()), jwk)
    }

    fn verifier(jwks: &Value, tenant: TenantSource, scopes: &[&str]) -> JwtVerifier {
        let mapping = ClaimMapping {
            subject: "sub".into(),
            tenant,
            roles: Some("groups".into()),
            scope: "scp".into(),
        };
        let provider = Provider::new(
            "https://idp".into(),
            vec!["https://relay".into()],
            Vec::new(),
            ProviderKeys::from_document(&jwks.to_string()).expect("JWKS"),
            mapping,
            scopes.iter().map(|s| s.to_string()).collect(),
        )
        .expect("provider");
        JwtVerifier::new(
            Some("https://relay/".into()),
            vec![provider],
            tenant_set(["acme"]),
        )
    }

    fn token(key: &EncodingKey, kid: Option<&str>, claims: Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, &claims, key).expect("signs")
    }

    fn claims() -> Value {
        let exp = jsonwebtoken::get_current_timestamp() + 60;
        json!({"iss":"https://idp","aud":["https://relay"],"sub":"svc","tenant":"acme",
            "groups":"a b","scp":["x","y"],"exp":exp})
    }

    #[test]
    fn maps_claims_by_configuration() {
        let (key, jwk) = ed25519();
        let v = verifier(
            &json!({"keys":[jwk]}),
            TenantSource::Fixed("acme".into()),
            &["y"],
        );
        assert_eq!(v.public_url(), Some("https://relay"));
        let who = v.verify(&token(&key, Some("ed"), claims())).expect("valid");
        assert_eq!((&*who.tenant, &*who.subject), ("acme", "svc"));
        assert_eq!(&*who.roles, ["a".to_owned(), "b".to_owned()]);
        // Without a kid, the one fitting key is used.
        assert!(v.verify(&token(&key, None, claims())).is_ok());
        assert_eq!(
            v.verify(&token(&key, Some("other"), claims())),
            Err(JwtError::UnknownKey)
        );
        let mut no_sub = claims();
        no_sub.as_object_mut().expect("object").remove("sub");
        assert_eq!(
            v.verify(&token(&key, Some("ed"), no_sub)),
            Err(JwtError::MissingClaim("sub".into()))
        );
    }

    #[test]
    fn tenant_claim_must_name_a_configured_tenant_and_scopes_are_required() {
        let (key, jwk) = ed25519();
        let v = verifier(
            &json!({"keys":[jwk.clone()]}),
            TenantSource::Claim("tenant".into()),
            &["x", "z"],
        );
        assert_eq!(
            v.verify(&token(&key, Some("ed"), claims())),
            Err(JwtError::MissingScope {
                required: vec!["x".into(), "z".into()]
            })
        );
        let v = verifier(
            &json!({"keys":[jwk]}),
            TenantSource::Claim("tenant".into()),
            &[],
        );
        let mut globex = claims();
        globex["tenant"] = json!("globex");
        assert_eq!(
            v.verify(&token(&key, Some("ed"), globex)),
            Err(JwtError::UnknownTenant)
        );
        let stranger = ed25519().0;
        assert_eq!(
            v.verify(&token(&stranger, Some("ed"), claims())),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn refuses_hmac_and_unsigned_tokens() {
        let (_, jwk) = ed25519();
        let secret = json!({"kty":"oct","kid":"h","k": URL_SAFE_NO_PAD.encode(b"public")});
        let v = verifier(
            &json!({"keys":[jwk, secret]}),
            TenantSource::Fixed("acme".into()),
            &[],
        );
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("h".into());
        let forged = jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(b"public"))
            .expect("signs");
        assert_eq!(v.verify(&forged), Err(JwtError::Algorithm));
        let body = URL_SAFE_NO_PAD.encode(claims().to_string());
        let unsigned = format!("{}.{body}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#));
        assert_eq!(v.verify(&unsigned), Err(JwtError::Malformed));
        assert!(looks_like_jwt(&forged) && !looks_like_jwt("mcpt_key_00ff"));
    }
}
