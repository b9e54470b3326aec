//! The relay's configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{AuditSection, ConfigError, LimitsSection, RateLimitsSection, parse_file};

/// The relay's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Where tunnel clients connect.
    pub tunnel: TunnelSection,
    /// Agent-facing MCP endpoints.
    pub agents: AgentsSection,
    /// Operator endpoints.
    #[serde(default)]
    pub admin: Option<AdminSection>,
    /// The audit trail.
    #[serde(default)]
    pub audit: Option<AuditSection>,
    /// Limits and timeouts.
    #[serde(default)]
    pub limits: LimitsSection,
    /// Rate limits (applied by hot reload).
    #[serde(default)]
    pub rate_limits: RateLimitsSection,
    /// Tenants, their tunnel tokens, agent keys and roles.
    #[serde(default)]
    pub tenants: Vec<TenantSection>,
    /// Identity providers whose JWTs agents may present instead of API keys.
    #[serde(default)]
    pub identity_providers: Vec<IdentityProviderSection>,
    /// Signed caller identity for upstreams (enabled per tenant and source).
    #[serde(default)]
    pub identity_assertion: Option<IdentityAssertionSection>,
    /// This relay's place in a fleet: its instance id and its drain delay.
    #[serde(default)]
    pub fleet: Option<FleetSection>,
}

/// `[identity_assertion]`: how the relay signs the caller's identity for upstreams. Which
/// sources get it is set per tenant (`assert_identity`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityAssertionSection {
    /// The Ed25519 private key (PKCS#8 PEM), relative to the configuration file. Upstreams
    /// verify with its public key (`openssl pkey -in KEY -pubout`).
    pub key: PathBuf,
    /// The header `connect` sets on upstream requests (must start with `X-`).
    #[serde(default = "default_assertion_header")]
    pub header: String,
    /// Lifetime of an assertion, in seconds (1 to 3600).
    #[serde(default = "default_assertion_ttl")]
    pub ttl_secs: u64,
}

/// Default `[identity_assertion] header`.
pub const DEFAULT_ASSERTION_HEADER: &str = "X-MCP-Tunnel-Identity";
/// Default `[identity_assertion] ttl_secs`: an assertion outlives one request's round trip by
/// far, while a leaked one is soon useless; `connect` gets a fresh one before it expires.
pub const DEFAULT_ASSERTION_TTL_SECS: u64 = 60;

fn default_assertion_header() -> String {
    DEFAULT_ASSERTION_HEADER.to_owned()
}

fn default_assertion_ttl() -> u64 {
    DEFAULT_ASSERTION_TTL_SECS
}

/// `[tunnel]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSection {
    /// QUIC on UDP (and later the HTTPS fallback on TCP) on this address.
    pub listen: SocketAddr,
    /// The relay certificate chain (PEM).
    pub cert: PathBuf,
    /// The relay private key (PEM).
    pub key: PathBuf,
}

/// `[agents]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsSection {
    /// The agent endpoint address.
    pub listen: SocketAddr,
    /// Browser origins allowed to call (besides requests without `Origin`, and same-origin).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Host names (optionally with `:port`) agents may address the relay by. Empty: any, except
    /// that a relay listening on loopback answers only to loopback names (DNS rebinding).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Seconds between SSE keep-alive comments.
    #[serde(default = "default_keep_alive")]
    pub sse_keep_alive_secs: u64,
    /// The relay's public base URL (e.g. `https://relay.example.com`): the resource named in
    /// OAuth protected resource metadata, and the audience agent JWTs must carry by default.
    #[serde(default)]
    pub public_url: Option<String>,
}

/// SSE keep-alive interval: inside the 15-30 s that proxies and clients tolerate.
pub const DEFAULT_SSE_KEEP_ALIVE_SECS: u64 = 20;

fn default_keep_alive() -> u64 {
    DEFAULT_SSE_KEEP_ALIVE_SECS
}

/// `[[identity_providers]]`: an OAuth authorization server whose JWTs identify agents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityProviderSection {
    /// The `iss` its tokens carry (also listed in the protected resource metadata).
    pub issuer: String,
    /// Audiences accepted; empty: `[agents] public_url`.
    #[serde(default)]
    pub audience: Vec<String>,
    /// Its JWKS (JSON) in a file, relative to the configuration file (one of `jwks_file` and
    /// `jwks_url`).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Its JWKS at a URL (`https`, or `http` to a loopback host), fetched and cached (one of
    /// `jwks_file` and `jwks_url`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Seconds between fetches of `jwks_url` (a token naming an unknown key id fetches sooner).
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_secs: u64,
    /// Algorithms accepted among RS256, ES256 and EdDSA; empty: all three.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// The claim naming the caller.
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// The claim naming the caller's tenant (one of `tenant_claim` and `tenant`).
    #[serde(default)]
    pub tenant_claim: Option<String>,
    /// The tenant of every token of this provider (one of `tenant_claim` and `tenant`).
    #[serde(default)]
    pub tenant: Option<String>,
    /// The claim listing the caller's roles (array, or space-separated string).
    #[serde(default)]
    pub roles_claim: Option<String>,
    /// The claim listing granted scopes (space-separated string, or array).
    #[serde(default = "default_scope_claim")]
    pub scope_claim: String,
    /// Scopes every token must carry (a token lacking one gets 403 `insufficient_scope`).
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// With `tenant_claim`: the tenants this provider may speak for (a token naming another
    /// is refused). Absent: any tenant, with a warning at start.
    #[serde(default)]
    pub tenants: Option<Vec<String>>,
}

/// Default `jwks_refresh_secs`: providers rotate keys over days and publish the new key ahead
/// of use; a token naming an unknown key id fetches sooner anyway.
pub const DEFAULT_JWKS_REFRESH_SECS: u64 = 300;

fn default_jwks_refresh() -> u64 {
    DEFAULT_JWKS_REFRESH_SECS
}

fn default_subject_claim() -> String {
    "sub".into()
}

fn default_scope_claim() -> String {
    "scope".into()
}

/// Default `leeway_secs`: clock skew tolerated on `exp` and `nbf`.
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 30;

fn default_leeway() -> u64 {
    DEFAULT_JWT_LEEWAY_SECS
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// The admin endpoint address; keep it private.
    pub listen: SocketAddr,
}

/// `[[tenants]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSection {
    /// The tenant's name.
    pub name: String,
    /// Digests of the tunnel tokens that register sources for this tenant.
    #[serde(default)]
    pub tunnel_tokens: Vec<String>,
    /// Agent API keys.
    #[serde(default)]
    pub keys: Vec<KeySection>,
    /// Roles; none means every key may call everything.
    #[serde(default)]
    pub roles: Vec<RoleSection>,
    /// Sources whose upstreams get a signed assertion of the caller's identity (needs
    /// `[identity_assertion]`); none by default.
    #[serde(default)]
    pub assert_identity: Vec<String>,
    /// Tunnel tokens bound to the sources they may announce (`[[tenants.tunnels]]`); the
    /// documented form for new tokens. `tunnel_tokens` (unbound) keeps working, with a warning.
    #[serde(default)]
    pub tunnels: Vec<TunnelTokenSection>,
}

/// `[[tenants.keys]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySection {
    /// Who holds the key.
    pub subject: String,
    /// Their roles.
    #[serde(default)]
    pub roles: Vec<String>,
    /// The key's digest.
    pub key: String,
}

/// `[[tenants.roles]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSection {
    /// The role's name.
    pub name: String,
    /// `SOURCE/TOOL` globs allowed.
    #[serde(default)]
    pub allow: Vec<String>,
    /// `SOURCE/TOOL` globs denied (deny wins).
    #[serde(default)]
    pub deny: Vec<String>,
    /// `SOURCE/URI` globs of resources allowed.
    #[serde(default)]
    pub allow_resources: Vec<String>,
    /// `SOURCE/URI` globs of resources denied.
    #[serde(default)]
    pub deny_resources: Vec<String>,
    /// `SOURCE/PROMPT` globs of prompts allowed.
    #[serde(default)]
    pub allow_prompts: Vec<String>,
    /// `SOURCE/PROMPT` globs of prompts denied.
    #[serde(default)]
    pub deny_prompts: Vec<String>,
    /// Conditions narrowing what the role allows (`[[tenants.roles.conditions]]`).
    #[serde(default)]
    pub conditions: Vec<ConditionSection>,
}

/// `[[tenants.roles.conditions]]`: a CEL expression that must hold for the role to allow the
/// calls matching `match` (its variables: `args`, `roles`, `subject`, `tenant`, `source`;
/// README, "Conditions").
///
/// ```toml
/// [[tenants.roles.conditions]]
/// match = "db/query"
/// when = 'args.table != "salaries" || "hr" in roles'
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionSection {
    /// Glob over `SOURCE/TOOL` (or `SOURCE/URI`, `SOURCE/PROMPT` with `kind`) choosing the
    /// calls the condition applies to.
    #[serde(rename = "match")]
    pub pattern: String,
    /// What `match` names: `tool` (the default), `resource` or `prompt`.
    #[serde(default = "default_condition_kind")]
    pub kind: MatchKind,
    /// The CEL expression; the call is allowed by this role only if it gives `true`.
    pub when: String,
}

fn default_condition_kind() -> MatchKind {
    MatchKind::Tool
}

/// What a condition's `match` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchKind {
    /// `SOURCE/TOOL`: `tools/call`.
    Tool,
    /// `SOURCE/URI`: `resources/read` and subscriptions.
    Resource,
    /// `SOURCE/PROMPT`: `prompts/get`.
    Prompt,
}

impl RelayConfig {
    /// Reads a relay configuration file, resolving its paths against the file's folder, and
    /// checks what the schema alone can (the relay checks the rest, keys and cross-references,
    /// when it builds its governance: `relay::load_config` does both).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = parse_file(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.tunnel.cert = base.join(&config.tunnel.cert);
        config.tunnel.key = base.join(&config.tunnel.key);
        if let Some(audit) = &mut config.audit {
            audit.resolve(base);
            audit.validate().map_err(|message| ConfigError::Invalid {
                path: path.into(),
                message,
            })?;
        }
        if let Some(fleet) = &config.fleet {
            fleet.validate().map_err(|message| ConfigError::Invalid {
                path: path.into(),
                message,
            })?;
        }
        for provider in &mut config.identity_providers {
            if let Some(file) = &mut provider.jwks_file {
                *file = base.join(&*file);
            }
        }
        if let Some(assertion) = &mut config.identity_assertion {
            assertion.key = base.join(&assertion.key);
        }
        if let Some(fleet) = &mut config.fleet {
            fleet.secret_file = fleet.secret_file.as_ref().map(|f| base.join(f));
            for file in &mut fleet.accepted_secret_files {
                *file = base.join(&*file);
            }
        }
        config
            .limits
            .validate_listeners()
            .map_err(|message| ConfigError::Invalid {
                path: path.into(),
                message,
            })?;
        Ok(config)
    }
}

/// `[[tenants.tunnels]]`: a tunnel token bound to the source names it may announce. A tunnel
/// with this token that announces any other source is refused at its handshake.
///
/// ```toml
/// [[tenants.tunnels]]
/// token = "sha256:..."
/// sources = ["db", "files"]
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelTokenSection {
    /// The token's digest.
    pub token: String,
    /// The source names the token may announce (at least one).
    pub sources: Vec<String>,
}

/// `[fleet]`: this relay's place in a fleet of interchangeable relays: its instance id, the
/// secret that seals the session ids agents get, and how long it keeps serving once told to
/// stop, so a load balancer moves new requests to its peers first.
///
/// ```toml
/// [fleet]
/// id = "relay-a"
/// secret_file = "fleet.key"
/// drain_delay_secs = 5
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// This relay instance's id: names its audit checkpoint chain, its `/api/tunnels` rows, its
    /// activity page and its metrics. Default: derived from the host name and the tunnel
    /// listen port.
    #[serde(default)]
    pub id: Option<String>,
    /// The fleet secret (at least 32 random bytes, the same file on every relay of the fleet),
    /// relative to the configuration file: it seals the session ids agents get, so any relay
    /// continues any session. Without it a relay seals with a random secret of its own and its
    /// sessions end with the process.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Secrets this relay also opens ids with but never seals with: the previous secret while
    /// a rotation completes (and the next one while it is rolled out). See the README's
    /// "Running a fleet".
    #[serde(default)]
    pub accepted_secret_files: Vec<PathBuf>,
    /// Seconds a relay told to stop keeps accepting and serving agents while `/healthz`
    /// answers 503, before it drains as a single relay does (0 to 300; default 5). Without a
    /// `[fleet]` section the delay is 0: a single relay stops at once.
    #[serde(default = "default_drain_delay_secs")]
    pub drain_delay_secs: u64,
}

/// Default `[fleet] drain_delay_secs`: a few health-check intervals of a typical load
/// balancer.
pub const DEFAULT_DRAIN_DELAY_SECS: u64 = 5;

/// The largest `[fleet] drain_delay_secs`: beyond it a service manager would likely kill the
/// relay before it drained.
pub const MAX_DRAIN_DELAY_SECS: u64 = 300;

fn default_drain_delay_secs() -> u64 {
    DEFAULT_DRAIN_DELAY_SECS
}

impl Default for FleetSection {
    fn default() -> Self {
        Self {
            id: None,
            secret_file: None,
            accepted_secret_files: Vec::new(),
            drain_delay_secs: DEFAULT_DRAIN_DELAY_SECS,
        }
    }
}

impl FleetSection {
    /// Checks values serde cannot: a non-empty id, a drain delay within bounds, accepted
    /// secrets only beside a secret.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.as_ref().is_some_and(|id| id.trim().is_empty()) {
            return Err("fleet.id must not be empty".into());
        }
        if self.drain_delay_secs > MAX_DRAIN_DELAY_SECS {
            return Err(format!(
                "fleet.drain_delay_secs must be at most {MAX_DRAIN_DELAY_SECS}, not {}",
                self.drain_delay_secs
            ));
        }
        if self.secret_file.is_none() && !self.accepted_secret_files.is_empty() {
            return Err("fleet.accepted_secret_files needs fleet.secret_file".into());
        }
        Ok(())
    }
}

impl RelayConfig {
    /// How long this relay keeps serving agents once told to stop: `[fleet]
    /// drain_delay_secs`, or zero without a `[fleet]` section.
    pub fn drain_delay_secs(&self) -> u64 {
        self.fleet
            .as_ref()
            .map_or(0, |fleet| fleet.drain_delay_secs)
    }
}
