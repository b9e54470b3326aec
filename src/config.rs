//! Configuration files: the relay's and `connect`'s, in TOML.
//!
//! Unknown keys are errors (the message names the key and its line). Secrets appear only as
//! `sha256:` digests in the relay's file; `connect`'s token may come from the environment.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::govern::assertion::AssertionSigner;
use crate::govern::condition::Condition;
use crate::govern::jwks::RemoteJwks;
use crate::govern::jwt::{self, ClaimMapping, JwtVerifier, Provider, ProviderKeys, TenantSource};
use crate::govern::policy::Kind;
use crate::govern::{Identity, Keyring, Policy, SecretHash, policy::Role};

/// Default agent request body and tunnel frame limit: 16 MiB (see [`crate::wire::DEFAULT_MAX_FRAME`]).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = crate::wire::DEFAULT_MAX_FRAME;
/// How long the relay waits for an upstream's answer to one request. Long-running tools report
/// progress and may take minutes; five minutes bounds a stuck one.
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 300;
/// An agent session with no request for this long is ended (and its tunnel stream closed).
pub const DEFAULT_SESSION_IDLE_SECS: u64 = 30 * 60;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (the message has the key and line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// The file parsed but says something impossible.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn parse_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string(),
    })
}

/// Checks that a source name is one URL path segment agents can type.
pub fn validate_source_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(format!(
            "source name {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

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
    pub rate_limits: crate::govern::limits::RateLimitsSection,
    /// Tenants, their tunnel tokens, agent keys and roles.
    #[serde(default)]
    pub tenants: Vec<TenantSection>,
    /// Identity providers whose JWTs agents may present instead of API keys.
    #[serde(default)]
    pub identity_providers: Vec<IdentityProviderSection>,
    /// Signed caller identity for upstreams (enabled per tenant and source).
    #[serde(default)]
    pub identity_assertion: Option<IdentityAssertionSection>,
    /// This relay's place in a fleet (for now only its instance id).
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

fn default_assertion_header() -> String {
    crate::govern::assertion::DEFAULT_HEADER.to_owned()
}

fn default_assertion_ttl() -> u64 {
    crate::govern::assertion::DEFAULT_TTL_SECS
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
    /// Its JWKS at a URL, fetched and cached (one of `jwks_file` and `jwks_url`); see
    /// [`crate::govern::jwks`].
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

fn default_jwks_refresh() -> u64 {
    crate::govern::jwks::DEFAULT_REFRESH_SECS
}

fn default_subject_claim() -> String {
    "sub".into()
}

fn default_scope_claim() -> String {
    "scope".into()
}

fn default_leeway() -> u64 {
    crate::govern::jwt::DEFAULT_LEEWAY_SECS
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// The admin endpoint address; keep it private.
    pub listen: SocketAddr,
}

/// `[audit]`: where and how the relay keeps its audit trail (see [`crate::govern::audit`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// The SQLite file of the audit trail.
    pub path: PathBuf,
    /// How durable a committed row is.
    #[serde(default)]
    pub durability: Durability,
    /// The relay's Ed25519 checkpoint key (PKCS#8 PEM), created (mode 0600) if missing; its
    /// public key is written beside it as `KEY.pub`. Default: `audit.key` next to `path`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// A signed checkpoint is written for a tenant after this many new rows of it.
    #[serde(default = "default_checkpoint_rows")]
    pub checkpoint_rows: u64,
    /// ... and at least this often (seconds) while a tenant has unsigned rows.
    #[serde(default = "default_checkpoint_secs")]
    pub checkpoint_secs: u64,
    /// Records waiting for the writer at most; a full queue makes appends wait.
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
    /// Per tenant and source: how much of arguments and results to keep.
    #[serde(default)]
    pub sources: Vec<AuditSourceSection>,

    // --- Checkpoint chain and epochs (issue 13, item 5) ---
    /// A file the relay appends every signed checkpoint to, one JSON line each: the off-box
    /// copy (`audit verify --checkpoints FILE`) once shipped or mounted elsewhere. None: off.
    #[serde(default)]
    pub checkpoint_file: Option<PathBuf>,
    /// This relay instance's name in the trail (its chains are keyed by it): set by the relay
    /// from `[fleet] id`, else host and tunnel port. Not a file key.
    #[serde(skip)]
    pub relay_id: Option<String>,
    /// `relay --new-audit-epoch`: begin a new epoch if the trail does not verify at start,
    /// instead of refusing to start. Not a file key.
    #[serde(skip)]
    pub new_epoch: bool,
}

/// `[audit] durability`: what a committed row survives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// WAL with `synchronous = NORMAL`: a committed row survives a crash of the relay process
    /// (not necessarily a power loss). The default: cheap, and what the relay promises agents.
    #[default]
    Commit,
    /// WAL with `synchronous = FULL`: every commit is fsynced, so rows survive power loss.
    Fsync,
}

/// `[[audit.sources]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSourceSection {
    /// The tenant.
    pub tenant: String,
    /// The source (of that tenant).
    pub source: String,
    /// How much to keep.
    #[serde(default)]
    pub level: AuditLevel,
    /// Keys whose values become `"[REDACTED]"` anywhere in kept arguments and results.
    #[serde(default)]
    pub redact: Vec<String>,
}

/// `[[audit.sources]] level`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditLevel {
    /// Method, names, outcome, sizes and the arguments' digest; never the arguments.
    #[default]
    Metadata,
    /// Metadata plus the arguments and results, redacted.
    Full,
}

/// Default [`AuditSection::checkpoint_rows`]: a checkpoint per thousand rows keeps the unsigned
/// tail short without a signature per call (a signature costs about 20 µs).
pub const DEFAULT_CHECKPOINT_ROWS: u64 = 1000;
/// Default [`AuditSection::checkpoint_secs`]: a quiet tenant's last rows are signed within a
/// minute.
pub const DEFAULT_CHECKPOINT_SECS: u64 = 60;
/// Default [`AuditSection::queue`]: enough for a burst of a few thousand calls per second while
/// one commit is on disk; records are small (metadata), so this bounds memory at a few MiB.
pub const DEFAULT_AUDIT_QUEUE: usize = 4096;

fn default_checkpoint_rows() -> u64 {
    DEFAULT_CHECKPOINT_ROWS
}

fn default_checkpoint_secs() -> u64 {
    DEFAULT_CHECKPOINT_SECS
}

fn default_audit_queue() -> usize {
    DEFAULT_AUDIT_QUEUE
}

impl AuditSection {
    /// A section with every default and the trail at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::default(),
            key: None,
            checkpoint_rows: DEFAULT_CHECKPOINT_ROWS,
            checkpoint_secs: DEFAULT_CHECKPOINT_SECS,
            queue: DEFAULT_AUDIT_QUEUE,
            sources: Vec::new(),
            checkpoint_file: None,
            relay_id: None,
            new_epoch: false,
        }
    }

    /// The checkpoint key's file: `key`, or `audit.key` next to the database.
    pub fn key_path(&self) -> PathBuf {
        match &self.key {
            Some(key) => key.clone(),
            None => self.path.with_file_name("audit.key"),
        }
    }

    /// The checkpoint interval.
    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_secs(self.checkpoint_secs)
    }

    /// Checks values serde cannot: positive limits, one entry per tenant and source.
    pub fn validate(&self) -> Result<(), String> {
        if self.checkpoint_rows == 0 {
            return Err("audit.checkpoint_rows must be at least 1".into());
        }
        if self.checkpoint_secs == 0 {
            return Err("audit.checkpoint_secs must be at least 1".into());
        }
        if self.queue == 0 {
            return Err("audit.queue must be at least 1".into());
        }
        let mut seen = HashSet::new();
        for source in &self.sources {
            if source.tenant.is_empty() || source.source.is_empty() {
                return Err("audit.sources: tenant and source must not be empty".into());
            }
            if !seen.insert((source.tenant.as_str(), source.source.as_str())) {
                return Err(format!(
                    "audit.sources: tenant {} source {} is listed twice",
                    source.tenant, source.source
                ));
            }
            if source.redact.iter().any(String::is_empty) {
                return Err(format!(
                    "audit.sources: tenant {} source {}: an empty redact key",
                    source.tenant, source.source
                ));
            }
        }
        Ok(())
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest agent request body and tunnel frame, in bytes.
    pub max_message_bytes: usize,
    /// Seconds to wait for an upstream's answer to one request.
    pub request_timeout_secs: u64,
    /// Seconds an idle agent session lives.
    pub session_idle_secs: u64,
    // --- hardening (issue 13): batch bound ---
    /// Most messages one agent batch may hold (a JSON-RPC error beyond); 0 refuses batches.
    pub max_batch_messages: usize,
    /// Largest single upstream answer (one JSON-RPC message from a source), in bytes: large
    /// answers travel in pieces, so this bounds a runaway answer, not the relay's memory
    /// (see [`DEFAULT_MAX_ANSWER_BYTES`]).
    pub max_answer_bytes: usize,

    // --- Sessions, streams and event logs (issue 13: items 8 and 10) ---
    /// Open sessions (and stateless `subscriptions/listen` streams) one caller (API key or
    /// token subject) may hold; 0: no cap.
    pub max_sessions_per_key: usize,
    /// Open sessions (and listen streams) of all callers of one tenant; 0: no cap.
    pub max_sessions_per_tenant: usize,
    /// Open sessions (and listen streams) of one tenant's source; 0: no cap.
    pub max_sessions_per_source: usize,
    /// Seconds to wait for the tunnel to grant a new stream (the peer's stream credit), before
    /// the agent gets an error naming the source.
    pub open_stream_timeout_secs: u64,
    /// Bytes one session may hold in its event logs and queues (answers and server messages
    /// kept for a slow or absent agent, and for resumption); past it the oldest unread ones
    /// are dropped (and counted).
    pub session_event_bytes: usize,

    // --- Listener and tunnel admission bounds (read at start; see [`ListenerLimits`]). ---
    /// Seconds an agent or admin connection has to deliver a request's complete header,
    /// counted from the request's first byte.
    pub agent_header_timeout_secs: u64,
    /// Seconds an agent or admin connection may stay open with no request in flight, a fresh
    /// one included (HTTP/2 gets a GOAWAY); open SSE streams and calls waiting on their
    /// upstream are in flight.
    pub agent_idle_timeout_secs: u64,
    /// Agent connections served at once; more wait in the listen backlog.
    pub max_agent_connections: usize,
    /// Admin connections served at once; more wait in the listen backlog.
    pub max_admin_connections: usize,
    /// Tunnel connections in their TLS handshake and `hello` at once (QUIC and HTTPS
    /// together); more are refused until one finishes.
    pub max_tunnel_handshakes: usize,
    /// Seconds a tunnel connection has for TLS and its `hello` together.
    pub tunnel_handshake_timeout_secs: u64,
    /// Bytes an authenticated QUIC tunnel connection may have in flight towards the relay over
    /// all its streams (the connection receive window). Before the `hello` is accepted, the
    /// window is [`crate::transport::quic::PRE_AUTH_WINDOW`].
    pub tunnel_receive_window_bytes: u64,
    /// After a request body over `max_message_bytes`, how many more bytes the relay reads and
    /// discards so the client, still sending, can read its 413 (reloadable).
    pub oversized_body_drain_bytes: usize,
    /// Seconds the relay spends discarding the rest of an oversized body (reloadable).
    pub oversized_body_drain_secs: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            request_timeout_secs: DEFAULT_REQUEST_TIMEOUT_SECS,
            session_idle_secs: DEFAULT_SESSION_IDLE_SECS,
            max_batch_messages: DEFAULT_MAX_BATCH_MESSAGES,
            max_answer_bytes: DEFAULT_MAX_ANSWER_BYTES,
            max_sessions_per_key: DEFAULT_MAX_SESSIONS_PER_KEY,
            max_sessions_per_tenant: DEFAULT_MAX_SESSIONS_PER_TENANT,
            max_sessions_per_source: DEFAULT_MAX_SESSIONS_PER_SOURCE,
            open_stream_timeout_secs: DEFAULT_OPEN_STREAM_TIMEOUT_SECS,
            session_event_bytes: DEFAULT_SESSION_EVENT_BYTES,
            // Listener and tunnel admission bounds.
            agent_header_timeout_secs: ListenerLimits::DEFAULT_HEADER_TIMEOUT_SECS,
            agent_idle_timeout_secs: ListenerLimits::DEFAULT_IDLE_TIMEOUT_SECS,
            max_agent_connections: ListenerLimits::DEFAULT_MAX_AGENT_CONNECTIONS,
            max_admin_connections: ListenerLimits::DEFAULT_MAX_ADMIN_CONNECTIONS,
            max_tunnel_handshakes: ListenerLimits::DEFAULT_MAX_TUNNEL_HANDSHAKES,
            tunnel_handshake_timeout_secs: ListenerLimits::DEFAULT_TUNNEL_HANDSHAKE_TIMEOUT_SECS,
            tunnel_receive_window_bytes: ListenerLimits::DEFAULT_TUNNEL_RECEIVE_WINDOW,
            oversized_body_drain_bytes: ListenerLimits::DEFAULT_DRAIN_BYTES,
            oversized_body_drain_secs: ListenerLimits::DEFAULT_DRAIN_SECS,
        }
    }
}

impl LimitsSection {
    /// The per-request timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// The idle session lifetime.
    pub fn session_idle(&self) -> Duration {
        Duration::from_secs(self.session_idle_secs)
    }

    /// How long opening a tunnel stream may wait.
    pub fn open_stream_timeout(&self) -> Duration {
        Duration::from_secs(self.open_stream_timeout_secs)
    }

    /// The listener and tunnel admission bounds of this section.
    pub fn listeners(&self) -> ListenerLimits {
        ListenerLimits {
            header_timeout: Duration::from_secs(self.agent_header_timeout_secs),
            idle_timeout: Duration::from_secs(self.agent_idle_timeout_secs),
            max_agent_connections: self.max_agent_connections,
            max_admin_connections: self.max_admin_connections,
            max_tunnel_handshakes: self.max_tunnel_handshakes,
            tunnel_handshake_timeout: Duration::from_secs(self.tunnel_handshake_timeout_secs),
            tunnel_receive_window: self.tunnel_receive_window_bytes,
        }
    }

    /// How much of an oversized body is discarded, and for how long at most.
    pub fn oversized_body_drain(&self) -> (usize, Duration) {
        (
            self.oversized_body_drain_bytes,
            Duration::from_secs(self.oversized_body_drain_secs),
        )
    }
}

// --- Session limits (issue 13: items 8 and 10) ---

/// Default of `[limits] max_sessions_per_key`: room for a backend that serves many users with
/// one key, and for clients that restart without ending their sessions, yet a bound on what
/// one leaked or stolen key can hold open.
pub const DEFAULT_MAX_SESSIONS_PER_KEY: usize = 256;
/// Default of `[limits] max_sessions_per_tenant`.
pub const DEFAULT_MAX_SESSIONS_PER_TENANT: usize = 1024;
/// Default of `[limits] max_sessions_per_source`.
pub const DEFAULT_MAX_SESSIONS_PER_SOURCE: usize = 512;
/// Default of `[limits] open_stream_timeout_secs`.
pub const DEFAULT_OPEN_STREAM_TIMEOUT_SECS: u64 = 10;
/// Default of `[limits] session_event_bytes`: 32 MiB, two messages of the largest default size.
pub const DEFAULT_SESSION_EVENT_BYTES: usize = 32 * 1024 * 1024;

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
/// calls matching `match` (see [`crate::govern::condition`] for its variables).
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
    pub kind: Kind,
    /// The CEL expression; the call is allowed by this role only if it gives `true`.
    pub when: String,
}

fn default_condition_kind() -> Kind {
    Kind::Tool
}

impl RelayConfig {
    /// Reads and checks a relay configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = parse_file(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.tunnel.cert = base.join(&config.tunnel.cert);
        config.tunnel.key = base.join(&config.tunnel.key);
        if let Some(audit) = &mut config.audit {
            audit.path = base.join(&audit.path);
            audit.key = audit.key.as_ref().map(|key| base.join(key));
            audit.checkpoint_file = audit.checkpoint_file.as_ref().map(|f| base.join(f));
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
        config
            .limits
            .listeners()
            .validate()
            .map_err(|message| ConfigError::Invalid {
                path: path.into(),
                message,
            })?;
        config
            .build_governance()
            .map_err(|message| ConfigError::Invalid {
                path: path.into(),
                message,
            })?;
        Ok(config)
    }

    /// Builds the keyring and policy, checking every cross-reference.
    pub fn build_governance(&self) -> Result<(Keyring, Policy), String> {
        let mut keyring = Keyring::default();
        let mut policy = Policy::default();
        let mut tenant_names = HashSet::new();
        let mut secrets_seen = HashSet::new();
        if self.agents.sse_keep_alive_secs == 0 {
            return Err("agents.sse_keep_alive_secs must be at least 1".into());
        }
        if self.limits.max_message_bytes < 1024 || self.limits.max_message_bytes > u32::MAX as usize
        {
            return Err("limits.max_message_bytes must be between 1024 and 4294967295".into());
        }
        for tenant in &self.tenants {
            if tenant.name.is_empty() || !tenant_names.insert(tenant.name.as_str()) {
                return Err(format!(
                    "tenant name {:?} is empty or used twice",
                    tenant.name
                ));
            }
            let name: Arc<str> = tenant.name.as_str().into();
            for token in &tenant.tunnel_tokens {
                let hash = SecretHash::parse(token)
                    .map_err(|e| format!("tenant {}: tunnel_tokens: {e}", tenant.name))?;
                if !secrets_seen.insert(hash) {
                    return Err(format!(
                        "tenant {}: a tunnel token digest is listed twice",
                        tenant.name
                    ));
                }
                keyring.add_tunnel_token(hash, name.clone());
            }
            add_bound_tunnel_tokens(&mut keyring, &mut secrets_seen, tenant, &name)?;
            let mut roles = HashMap::new();
            for role in &tenant.roles {
                let conditions = role
                    .conditions
                    .iter()
                    .map(|c| {
                        Condition::compile(c.kind, c.pattern.clone(), &c.when)
                            .map(Arc::new)
                            .map_err(|e| {
                                format!(
                                    "tenant {}: role {}: condition on {}: {e}",
                                    tenant.name, role.name, c.pattern
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if roles
                    .insert(
                        role.name.clone(),
                        Role {
                            allow: role.allow.clone(),
                            deny: role.deny.clone(),
                            allow_resources: role.allow_resources.clone(),
                            deny_resources: role.deny_resources.clone(),
                            allow_prompts: role.allow_prompts.clone(),
                            deny_prompts: role.deny_prompts.clone(),
                            conditions,
                        },
                    )
                    .is_some()
                {
                    return Err(format!(
                        "tenant {}: role {} defined twice",
                        tenant.name, role.name
                    ));
                }
            }
            for key in &tenant.keys {
                let hash = SecretHash::parse(&key.key)
                    .map_err(|e| format!("tenant {}: key of {}: {e}", tenant.name, key.subject))?;
                if !secrets_seen.insert(hash) {
                    return Err(format!(
                        "tenant {}: key of {} is listed twice",
                        tenant.name, key.subject
                    ));
                }
                if let Some(unknown) = key.roles.iter().find(|r| !roles.contains_key(*r)) {
                    return Err(format!(
                        "tenant {}: key of {} names undefined role {unknown}",
                        tenant.name, key.subject
                    ));
                }
                keyring.add_api_key(
                    hash,
                    Identity {
                        tenant: name.clone(),
                        subject: key.subject.as_str().into(),
                        roles: key.roles.clone().into(),
                    },
                );
            }
            policy.set_roles(name, roles);
        }
        keyring.set_jwt(self.build_jwt(&tenant_names)?);
        if let Some(signer) = self.build_assertions()? {
            keyring.set_assertions(signer);
        }
        Ok((keyring, policy))
    }

    /// Builds the identity assertion signer from `[identity_assertion]` and the tenants'
    /// `assert_identity`, reading the key file.
    fn build_assertions(&self) -> Result<Option<AssertionSigner>, String> {
        let wanted = self.tenants.iter().any(|t| !t.assert_identity.is_empty());
        let Some(section) = &self.identity_assertion else {
            if wanted {
                return Err(
                    "a tenant sets assert_identity but [identity_assertion] is missing".into(),
                );
            }
            return Ok(None);
        };
        let fail = |message: String| format!("identity_assertion: {message}");
        let pem = std::fs::read_to_string(&section.key)
            .map_err(|e| fail(format!("cannot read {}: {e}", section.key.display())))?;
        let issuer = self.agents.public_url.as_deref().map_or_else(
            || crate::govern::assertion::DEFAULT_ISSUER.to_owned(),
            |url| url.trim_end_matches('/').to_owned(),
        );
        let mut signer =
            AssertionSigner::new(&pem, issuer, section.header.clone(), section.ttl_secs)
                .map_err(|e| fail(e.to_string()))?;
        for tenant in &self.tenants {
            for source in &tenant.assert_identity {
                validate_source_name(source)
                    .map_err(|e| format!("tenant {}: assert_identity: {e}", tenant.name))?;
            }
            signer.enable(
                tenant.name.as_str().into(),
                tenant.assert_identity.iter().cloned(),
            );
        }
        Ok(Some(signer))
    }

    /// Builds the JWT verifier from `[agents] public_url` and `[[identity_providers]]`,
    /// reading each JWKS file.
    fn build_jwt(&self, tenant_names: &HashSet<&str>) -> Result<JwtVerifier, String> {
        let public_url = self
            .agents
            .public_url
            .as_deref()
            .map(|url| url.trim_end_matches('/'));
        if let Some(url) = public_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            return Err(format!("agents.public_url {url:?} must be an http(s) URL"));
        }
        let mut providers = Vec::new();
        let mut issuers = HashSet::new();
        for section in &self.identity_providers {
            let issuer = section.issuer.as_str();
            let fail = |message: String| format!("identity provider {issuer}: {message}");
            if !issuers.insert(issuer) {
                return Err(fail("listed twice".into()));
            }
            let tenant = match (&section.tenant, &section.tenant_claim) {
                (Some(tenant), None) => {
                    if !tenant_names.contains(tenant.as_str()) {
                        return Err(fail(format!("tenant {tenant} is not defined")));
                    }
                    TenantSource::Fixed(tenant.as_str().into())
                }
                (None, Some(claim)) => TenantSource::Claim(claim.clone()),
                _ => return Err(fail("give exactly one of tenant or tenant_claim".into())),
            };
            let allowed_tenants = provider_tenants(section, tenant_names).map_err(fail)?;
            let algorithms = section
                .algorithms
                .iter()
                .map(|name| jwt::parse_algorithm(name))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(e.to_string()))?;
            let audiences = if section.audience.is_empty() {
                public_url.map(str::to_owned).into_iter().collect()
            } else {
                section.audience.clone()
            };
            let keys = match (&section.jwks_file, &section.jwks_url) {
                (Some(file), None) => {
                    let jwks = std::fs::read_to_string(file)
                        .map_err(|e| fail(format!("cannot read {}: {e}", file.display())))?;
                    ProviderKeys::from_document(&jwks).map_err(|e| fail(e.to_string()))?
                }
                (None, Some(url)) => ProviderKeys::Remote(
                    RemoteJwks::shared(url, section.jwks_refresh_secs).map_err(fail)?,
                ),
                _ => return Err(fail("give exactly one of jwks_file or jwks_url".into())),
            };
            let mapping = ClaimMapping {
                subject: section.subject_claim.clone(),
                tenant,
                roles: section.roles_claim.clone(),
                scope: section.scope_claim.clone(),
            };
            let provider = Provider::new(
                issuer.to_owned(),
                audiences,
                algorithms,
                keys,
                mapping,
                section.required_scopes.clone(),
            )
            .map_err(|e| fail(e.to_string()))?
            .with_leeway(section.leeway_secs);
            let provider = match allowed_tenants {
                Some(allowed) => provider.with_allowed_tenants(allowed),
                None => provider,
            };
            providers.push(provider);
        }
        Ok(JwtVerifier::new(
            public_url.map(str::to_owned),
            providers,
            jwt::tenant_set(tenant_names.iter().copied()),
        ))
    }
}

// ---- Tunnel trust: tokens bound to sources, identity provider tenants ----

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

/// Adds `tenant`'s `[[tenants.tunnels]]` to `keyring`, checking each entry.
fn add_bound_tunnel_tokens(
    keyring: &mut Keyring,
    secrets_seen: &mut HashSet<SecretHash>,
    tenant: &TenantSection,
    name: &Arc<str>,
) -> Result<(), String> {
    for entry in &tenant.tunnels {
        let fail = |message: String| format!("tenant {}: tunnels: {message}", tenant.name);
        let hash = SecretHash::parse(&entry.token).map_err(fail)?;
        if !secrets_seen.insert(hash) {
            return Err(fail(format!("token {} is listed twice", hash.short())));
        }
        if entry.sources.is_empty() {
            return Err(fail(format!(
                "token {} names no sources (list the sources it may serve)",
                hash.short()
            )));
        }
        for source in &entry.sources {
            validate_source_name(source).map_err(fail)?;
        }
        keyring.add_bound_tunnel_token(hash, name.clone(), entry.sources.iter().cloned());
    }
    Ok(())
}

/// The tenants an identity provider with `tenant_claim` may speak for (`tenants = [...]`),
/// each of them defined; `None` when it does not say (any tenant).
fn provider_tenants(
    section: &IdentityProviderSection,
    tenant_names: &HashSet<&str>,
) -> Result<Option<HashSet<Arc<str>>>, String> {
    let Some(listed) = &section.tenants else {
        return Ok(None);
    };
    if section.tenant_claim.is_none() {
        return Err("tenants = [...] applies only with tenant_claim".into());
    }
    if listed.is_empty() {
        return Err("tenants = [] lets the provider speak for no tenant; list at least one".into());
    }
    listed
        .iter()
        .map(|tenant| {
            if tenant_names.contains(tenant.as_str()) {
                Ok(Arc::from(tenant.as_str()))
            } else {
                Err(format!("tenants: tenant {tenant} is not defined"))
            }
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

impl RelayConfig {
    /// What this configuration allows that an operator should know about, one line each:
    /// unbound tunnel tokens (`tunnel_tokens`: any tunnel with one may announce any source of
    /// its tenant and take its sessions) and identity providers whose `tenant_claim` may name
    /// any tenant. The relay logs them as warnings at start and at each reload.
    pub fn trust_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for tenant in &self.tenants {
            for token in &tenant.tunnel_tokens {
                let shown = SecretHash::parse(token)
                    .map(|hash| hash.short())
                    .unwrap_or_default();
                warnings.push(format!(
                    "tenant {}: tunnel token {shown} in tunnel_tokens is not bound to sources: a tunnel with it may announce any source of the tenant; bind it with [[tenants.tunnels]] token = \"...\" sources = [...]",
                    tenant.name
                ));
            }
        }
        for provider in &self.identity_providers {
            if provider.tenant_claim.is_some() && provider.tenants.is_none() {
                warnings.push(format!(
                    "identity provider {}: tenant_claim without tenants = [...]: its tokens may name any tenant of the relay; list the tenants it may speak for",
                    provider.issuer
                ));
            }
        }
        warnings
    }
}

/// Which transport `connect` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// QUIC, falling back to HTTPS when UDP is blocked, and back to QUIC when it works again.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// HTTPS only.
    Https,
}

/// One upstream MCP server `connect` serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceTarget {
    /// A Streamable HTTP endpoint.
    Http(String),
    /// A command speaking MCP on stdio.
    Stdio(Vec<String>),
}

/// A named source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// The name agents use.
    pub name: String,
    /// How to reach it.
    pub target: SourceTarget,
    /// HTTP sources: whether redirects to another origin are followed (`false`: refused).
    pub follow_cross_origin_redirects: bool,
}

impl SourceConfig {
    /// Parses the command-line form `NAME=http://...` or `NAME=stdio:COMMAND ARG...`.
    pub fn parse_flag(text: &str) -> Result<Self, String> {
        let (name, target) = text
            .split_once('=')
            .ok_or_else(|| format!("--source {text:?}: expected NAME=URL or NAME=stdio:COMMAND"))?;
        validate_source_name(name)?;
        let target = if let Some(command) = target.strip_prefix("stdio:") {
            let words: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
            if words.is_empty() {
                return Err(format!("--source {name}: stdio: needs a command"));
            }
            SourceTarget::Stdio(words)
        } else if target.starts_with("http://") || target.starts_with("https://") {
            SourceTarget::Http(target.to_owned())
        } else {
            return Err(format!(
                "--source {name}: {target:?} is neither an http(s) URL nor stdio:COMMAND"
            ));
        };
        Ok(Self {
            name: name.to_owned(),
            target,
            follow_cross_origin_redirects: false,
        })
    }
}

/// `connect`'s configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// The relay as HOST:PORT, or several separated by commas.
    pub relay: String,
    /// CA certificate(s) to verify the relay with; the system roots when absent.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The tunnel token (or env `MCP_TUNNEL_TOKEN`).
    #[serde(default)]
    pub token: Option<String>,
    /// auto, quic or https.
    #[serde(default)]
    pub transport: TransportChoice,
    /// Largest frame accepted from the relay, in bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// HTTP CONNECT proxy for the HTTPS fallback, `http://host:port` (else `HTTPS_PROXY`).
    #[serde(default)]
    pub proxy: Option<String>,
    /// Connections held at once.
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Seconds between QUIC probes while on the HTTPS fallback.
    #[serde(default = "default_probe_interval")]
    pub probe_interval_secs: u64,
    /// The sources.
    #[serde(default)]
    pub sources: Vec<SourceSection>,
    /// Largest single upstream answer relayed, in bytes (see [`DEFAULT_MAX_ANSWER_BYTES`]).
    #[serde(default = "default_max_answer")]
    pub max_answer_bytes: usize,

    // --- stdio processes (issue 13: item 19) ---
    /// Processes one stdio source runs at once (one per agent session, plus one pooled).
    #[serde(default = "default_stdio_max_processes")]
    pub stdio_max_processes: usize,
    /// Seconds a stdio session's process lives with no message from its agent and no request
    /// in flight; then it is stopped and the session's next call gets an error. 0: never.
    #[serde(default = "default_stdio_idle_secs")]
    pub stdio_idle_secs: u64,
}

fn default_stdio_max_processes() -> usize {
    crate::client::sources::stdio::DEFAULT_MAX_PROCESSES
}

fn default_stdio_idle_secs() -> u64 {
    crate::client::sources::stdio::DEFAULT_IDLE.as_secs()
}

fn default_max_message() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}

fn default_connections() -> usize {
    crate::client::DEFAULT_CONNECTIONS
}

fn default_probe_interval() -> u64 {
    crate::client::DEFAULT_PROBE_INTERVAL.as_secs()
}

/// `[[sources]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// The name agents use.
    pub name: String,
    /// A Streamable HTTP URL.
    #[serde(default)]
    pub url: Option<String>,
    /// A stdio command and its arguments.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Whether requests to `url` follow redirects to another origin (scheme, host or port);
    /// off by default: such a redirect fails the request, as the request (and its body on 307
    /// and 308) was meant for this upstream only.
    #[serde(default)]
    pub follow_cross_origin_redirects: bool,
}

impl ClientFile {
    /// Reads and checks a client configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut file: Self = parse_file(path)?;
        if let Some(ca) = &mut file.ca {
            *ca = path.parent().unwrap_or(Path::new(".")).join(&*ca);
        }
        file.sources().map_err(|message| ConfigError::Invalid {
            path: path.into(),
            message,
        })?;
        Ok(file)
    }

    /// The sources as checked values.
    pub fn sources(&self) -> Result<Vec<SourceConfig>, String> {
        self.sources
            .iter()
            .map(|s| {
                validate_source_name(&s.name)?;
                let target = match (&s.url, &s.command) {
                    (Some(url), None) => SourceTarget::Http(url.clone()),
                    (None, Some(command)) if !command.is_empty() => {
                        SourceTarget::Stdio(command.clone())
                    }
                    _ => {
                        return Err(format!(
                            "source {}: give exactly one of url or command",
                            s.name
                        ));
                    }
                };
                if s.follow_cross_origin_redirects && !matches!(target, SourceTarget::Http(_)) {
                    return Err(format!(
                        "source {}: follow_cross_origin_redirects applies to url sources only",
                        s.name
                    ));
                }
                Ok(SourceConfig {
                    name: s.name.clone(),
                    target,
                    follow_cross_origin_redirects: s.follow_cross_origin_redirects,
                })
            })
            .collect()
    }
}

// --- hardening (issue 13): batch bound ---

/// Default `[limits] max_batch_messages`: more than any real client batches, few enough that
/// governing one batch stays cheap.
pub const DEFAULT_MAX_BATCH_MESSAGES: usize = 100;

// --- [fleet] (issue 13, item 5: the audit trail keys its chains by relay instance) ---

/// `[fleet]`: this relay's place in a fleet. Only `id` so far; the fleet secret and shared
/// stores come with the fleet itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// This relay instance's id: names its audit checkpoint chain. Default: derived from the
    /// host name and the tunnel listen port.
    #[serde(default)]
    pub id: Option<String>,
}

impl FleetSection {
    /// Checks values serde cannot: a non-empty id.
    pub fn validate(&self) -> Result<(), String> {
        match &self.id {
            Some(id) if id.trim().is_empty() => Err("fleet.id must not be empty".into()),
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream answer limit (`[limits] max_answer_bytes` on the relay, `max_answer_bytes` in
// connect's file), separate from `max_message_bytes`, which bounds what agents send.

/// Default limit on one upstream answer: 256 MiB. Answers larger than a tunnel frame cross in
/// pieces and are passed on as they arrive, so this bounds a runaway answer (and the time and
/// bandwidth it costs), not the memory of the relay or `connect`.
pub const DEFAULT_MAX_ANSWER_BYTES: usize = 256 * 1024 * 1024;

fn default_max_answer() -> usize {
    DEFAULT_MAX_ANSWER_BYTES
}

/// Checks an answer limit: at least 1024 bytes, and not below `max_message_bytes` (an answer
/// that fits one frame is never refused for its size).
pub fn check_max_answer_bytes(max_answer: usize, max_message: usize) -> Result<(), String> {
    if max_answer < 1024 || max_answer < max_message {
        return Err(format!(
            "max_answer_bytes ({max_answer}) must be at least 1024 and at least max_message_bytes ({max_message})"
        ));
    }
    Ok(())
}

/// Bounds on the relay's listeners and on tunnel admission, from `[limits]`: what a peer can
/// hold open before (and without) authenticating. Read when the relay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Time to deliver a request's complete header, from its first byte.
    pub header_timeout: Duration,
    /// Time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Agent connections served at once.
    pub max_agent_connections: usize,
    /// Admin connections served at once.
    pub max_admin_connections: usize,
    /// Tunnel connections in TLS or `hello` at once.
    pub max_tunnel_handshakes: usize,
    /// Time for TLS and `hello` together.
    pub tunnel_handshake_timeout: Duration,
    /// An authenticated QUIC connection's receive window, in bytes.
    pub tunnel_receive_window: u64,
}

impl ListenerLimits {
    /// Default header timeout: a real client sends its header in one go; 10 s covers a slow
    /// link and closes a slowloris connection quickly.
    pub const DEFAULT_HEADER_TIMEOUT_SECS: u64 = 10;
    /// Default idle timeout: longer than common client pools keep idle connections (httpx 5 s,
    /// reqwest 90 s), so a client rarely reuses one just as the relay closes it; far shorter
    /// than a forgotten socket.
    pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 120;
    /// Default agent connection cap: well under a raised file descriptor limit, ample for
    /// thousands of agents with open SSE streams.
    pub const DEFAULT_MAX_AGENT_CONNECTIONS: usize = 4096;
    /// Default admin connection cap: scrapers and a few operators.
    pub const DEFAULT_MAX_ADMIN_CONNECTIONS: usize = 64;
    /// Default cap on tunnel handshakes in progress: a fleet reconnecting after a relay restart
    /// gets through in moments (a handshake takes milliseconds), while a flood of peers that
    /// never authenticate holds at most this many connections' worth of memory.
    pub const DEFAULT_MAX_TUNNEL_HANDSHAKES: usize = 256;
    /// Default time for TLS and `hello`.
    pub const DEFAULT_TUNNEL_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
    /// Default receive window of an authenticated QUIC tunnel connection: 16 MiB keeps a fast
    /// link busy (1.6 GB/s at 10 ms round trip) and bounds what one connection makes us buffer.
    pub const DEFAULT_TUNNEL_RECEIVE_WINDOW: u64 = 16 * 1024 * 1024;
    /// Default bytes of an oversized body read and discarded after the limit.
    pub const DEFAULT_DRAIN_BYTES: usize = 64 * 1024 * 1024;
    /// Default time spent discarding an oversized body.
    pub const DEFAULT_DRAIN_SECS: u64 = 30;

    /// Checks that every bound is usable (a zero timeout or cap would refuse everything).
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("agent_header_timeout_secs", self.header_timeout.as_secs()),
            ("agent_idle_timeout_secs", self.idle_timeout.as_secs()),
            ("max_agent_connections", self.max_agent_connections as u64),
            ("max_admin_connections", self.max_admin_connections as u64),
            ("max_tunnel_handshakes", self.max_tunnel_handshakes as u64),
            (
                "tunnel_handshake_timeout_secs",
                self.tunnel_handshake_timeout.as_secs(),
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("[limits] {key} must be at least 1"));
            }
        }
        let window = crate::transport::quic::PRE_AUTH_WINDOW;
        if self.tunnel_receive_window < window || self.tunnel_receive_window > (1 << 40) {
            return Err(format!(
                "[limits] tunnel_receive_window_bytes must be between {window} and 2^40"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod listener_limit_tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_zero_bounds_are_named() {
        let limits = LimitsSection::default();
        assert_eq!(limits.listeners().validate(), Ok(()));
        let zero = LimitsSection {
            max_tunnel_handshakes: 0,
            ..LimitsSection::default()
        };
        let err = zero.listeners().validate().expect_err("zero handshakes");
        assert!(err.contains("max_tunnel_handshakes"), "{err}");
        let tiny = LimitsSection {
            tunnel_receive_window_bytes: 1024,
            ..LimitsSection::default()
        };
        let err = tiny.listeners().validate().expect_err("tiny window");
        assert!(err.contains("tunnel_receive_window_bytes"), "{err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, text).expect("write config");
        (dir, path)
    }

    const GOOD: &str = r#"
[tunnel]
listen = "127.0.0.1:4433"
cert = "relay.pem"
key = "relay.key"
[agents]
listen = "127.0.0.1:8443"
[admin]
listen = "127.0.0.1:9090"
[audit]
path = "audit.db"
[[tenants]]
name = "acme"
tunnel_tokens = ["sha256:0000000000000000000000000000000000000000000000000000000000000001"]
[[tenants.keys]]
subject = "alice@acme.example"
roles = ["analyst"]
key = "sha256:0000000000000000000000000000000000000000000000000000000000000002"
[[tenants.roles]]
name = "analyst"
allow = ["everything/echo", "everything/get-*"]
deny = []
"#;

    #[test]
    fn parses_the_documented_example() {
        let (_dir, path) = write(GOOD);
        let config = RelayConfig::load(&path).expect("documented config parses");
        assert_eq!(config.tenants[0].keys[0].roles, vec!["analyst"]);
        assert!(config.tunnel.cert.ends_with("relay.pem"));
    }

    #[test]
    fn audit_section_defaults_and_sources() {
        let (dir, path) = write(&GOOD.replace(
            "[audit]\npath = \"audit.db\"\n",
            "[audit]\npath = \"audit.db\"\ndurability = \"fsync\"\n\
             [[audit.sources]]\ntenant = \"acme\"\nsource = \"db\"\nlevel = \"full\"\n\
             redact = [\"password\", \"ssn\"]\n\
             [[audit.sources]]\ntenant = \"acme\"\nsource = \"web\"\n",
        ));
        let config = RelayConfig::load(&path).expect("audit config parses");
        let audit = config.audit.expect("[audit] present");
        assert_eq!(audit.durability, Durability::Fsync);
        assert_eq!(audit.key_path(), dir.path().join("audit.key"));
        assert_eq!(audit.checkpoint_rows, DEFAULT_CHECKPOINT_ROWS);
        assert_eq!(audit.checkpoint_secs, DEFAULT_CHECKPOINT_SECS);
        assert_eq!(audit.sources[0].level, AuditLevel::Full);
        assert_eq!(audit.sources[0].redact, vec!["password", "ssn"]);
        assert_eq!(audit.sources[1].level, AuditLevel::Metadata);

        let (dir, path) = write(&GOOD.replace(
            "path = \"audit.db\"\n",
            "path = \"audit.db\"\nkey = \"keys/trail.key\"\n",
        ));
        let audit = RelayConfig::load(&path)
            .expect("parses")
            .audit
            .expect("present");
        assert_eq!(audit.key_path(), dir.path().join("keys/trail.key"));
        assert_eq!(audit.durability, Durability::Commit);
    }

    #[test]
    fn audit_mistakes_are_named() {
        for (text, needle) in [
            ("path = \"audit.db\"\nlevel = \"full\"\n", "level"),
            (
                "path = \"audit.db\"\ndurability = \"sometimes\"\n",
                "sometimes",
            ),
            (
                "path = \"audit.db\"\ncheckpoint_rows = 0\n",
                "checkpoint_rows",
            ),
            (
                "path = \"audit.db\"\n[[audit.sources]]\ntenant = \"acme\"\nsource = \"db\"\nredacted = []\n",
                "redacted",
            ),
            (
                "path = \"audit.db\"\n[[audit.sources]]\ntenant = \"acme\"\nsource = \"db\"\n\
                 [[audit.sources]]\ntenant = \"acme\"\nsource = \"db\"\n",
                "listed twice",
            ),
        ] {
            let (_dir, path) = write(&GOOD.replace("path = \"audit.db\"\n", text));
            let err = RelayConfig::load(&path).expect_err(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let (_dir, path) = write(&GOOD.replace("[admin]\n", "[admin]\nlisten_typo = 1\n"));
        let err = RelayConfig::load(&path)
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("listen_typo") && err.contains("line"), "{err}");
    }

    #[test]
    fn refuses_clear_text_secrets_and_undefined_roles() {
        let (_dir, path) = write(&GOOD.replace(
            "sha256:0000000000000000000000000000000000000000000000000000000000000002",
            "plain-key",
        ));
        assert!(
            RelayConfig::load(&path)
                .expect_err("clear text")
                .to_string()
                .contains("alice")
        );
        let (_dir, path) = write(&GOOD.replace("roles = [\"analyst\"]", "roles = [\"admin\"]"));
        assert!(
            RelayConfig::load(&path)
                .expect_err("undefined role")
                .to_string()
                .contains("admin")
        );
    }

    #[test]
    fn conditions_compile_at_load_and_errors_name_tenant_role_and_problem() {
        let with = |when: &str, kind: &str| {
            let (dir, path) = write(&format!(
                "{GOOD}[[tenants.roles.conditions]]\nmatch = \"everything/echo\"\n{kind}when = '{when}'\n"
            ));
            let result = RelayConfig::load(&path).map_err(|e| e.to_string());
            drop(dir);
            result
        };
        let config = with(r#"args.message != "secret" || "hr" in roles"#, "").expect("valid");
        assert_eq!(config.tenants[0].roles[0].conditions[0].kind, Kind::Tool);
        let config = with(
            "args.startsWith(\"file:///public/\")",
            "kind = \"resource\"\n",
        )
        .expect("a resource condition");
        assert_eq!(
            config.tenants[0].roles[0].conditions[0].kind,
            Kind::Resource
        );
        let err = with("args.message ==", "").expect_err("syntax");
        assert!(
            err.contains("tenant acme: role analyst: condition on everything/echo: invalid CEL"),
            "{err}"
        );
        let err = with("user == 1", "").expect_err("unknown variable");
        assert!(
            err.contains("role analyst") && err.contains("\"user\""),
            "{err}"
        );
        let err = with("true", "kind = \"tools\"\n").expect_err("unknown kind");
        assert!(err.contains("tools") && err.contains("line"), "{err}");
    }

    const PROVIDER: &str = r#"
[[identity_providers]]
issuer = "https://idp.example"
jwks_file = "jwks.json"
algorithms = ["ES256", "EdDSA"]
tenant = "acme"
roles_claim = "roles"
required_scopes = ["mcp:tools"]
"#;

    fn with_provider(agents_extra: &str, provider: &str) -> (tempfile::TempDir, PathBuf) {
        let text = GOOD.replace(
            "listen = \"127.0.0.1:8443\"\n",
            &format!("listen = \"127.0.0.1:8443\"\n{agents_extra}"),
        ) + provider;
        let (dir, path) = write(&text);
        std::fs::write(dir.path().join("jwks.json"), r#"{"keys":[]}"#).expect("write JWKS");
        (dir, path)
    }

    #[test]
    fn identity_providers_parse_and_are_checked() {
        let public_url = "public_url = \"https://relay.example/\"\n";
        let (_dir, path) = with_provider(public_url, PROVIDER);
        let config = RelayConfig::load(&path).expect("a provider parses");
        assert!(
            config.identity_providers[0]
                .jwks_file
                .as_ref()
                .is_some_and(|f| f.is_absolute())
        );
        let (keyring, _) = config.build_governance().expect("governance");
        assert_eq!(keyring.jwt().public_url(), Some("https://relay.example"));
        assert_eq!(keyring.jwt().issuers(), ["https://idp.example"]);
        assert_eq!(keyring.jwt().scopes(), ["mcp:tools"]);

        let load_err = |agents: &str, provider: &str| {
            let (_dir, path) = with_provider(agents, provider);
            RelayConfig::load(&path).expect_err("refused").to_string()
        };
        let err = load_err(public_url, &PROVIDER.replace("\"acme\"", "\"globex\""));
        assert!(
            err.contains("globex") && err.contains("idp.example"),
            "{err}"
        );
        let err = load_err(public_url, &PROVIDER.replace("issuer =", "isuser ="));
        assert!(err.contains("isuser") && err.contains("line"), "{err}");
        let err = load_err(public_url, &PROVIDER.replace("\"EdDSA\"", "\"HS256\""));
        assert!(err.contains("HS256"), "{err}");
        let err = load_err("", PROVIDER);
        assert!(err.contains("public_url"), "no audience: {err}");
        let err = load_err(
            public_url,
            &PROVIDER.replace(
                "tenant = \"acme\"",
                "tenant = \"acme\"\ntenant_claim = \"t\"",
            ),
        );
        assert!(err.contains("exactly one of tenant"), "{err}");
        let err = load_err(public_url, &PROVIDER.replace("jwks.json", "missing.json"));
        assert!(err.contains("missing.json"), "{err}");
        let err = load_err(
            public_url,
            &PROVIDER.replace(
                "jwks_file = \"jwks.json\"",
                "jwks_file = \"jwks.json\"\njwks_url = \"https://idp.example/jwks\"",
            ),
        );
        assert!(
            err.contains("exactly one of jwks_file or jwks_url"),
            "{err}"
        );
        let err = load_err(
            public_url,
            &PROVIDER.replace("jwks_file = \"jwks.json\"", ""),
        );
        assert!(
            err.contains("exactly one of jwks_file or jwks_url"),
            "{err}"
        );
        let err = load_err(
            public_url,
            &PROVIDER.replace("jwks_file = \"jwks.json\"", "jwks_url = \"ftp://idp/jwks\""),
        );
        assert!(err.contains("ftp://idp/jwks"), "{err}");
        let (_dir, path) = with_provider(
            public_url,
            &PROVIDER.replace(
                "jwks_file = \"jwks.json\"",
                "jwks_url = \"https://idp.example/jwks\"",
            ),
        );
        RelayConfig::load(&path).expect("a JWKS URL is not fetched to check a file");
        let err = load_err("public_url = \"relay.example\"\n", PROVIDER);
        assert!(err.contains("public_url"), "{err}");
    }

    #[test]
    fn identity_assertions_are_checked() {
        let with = |tenant_extra: &str, section: &str| {
            let text = GOOD.replace(
                "name = \"acme\"\n",
                &format!("name = \"acme\"\n{tenant_extra}"),
            );
            let (dir, path) = write(&format!("{text}{section}"));
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key");
            std::fs::write(dir.path().join("id.key"), pair.serialize_pem()).expect("write key");
            let result = RelayConfig::load(&path).map(|config| {
                let (keyring, _) = config.build_governance().expect("governance");
                keyring
                    .assertions()
                    .is_some_and(|signer| signer.is_enabled("acme", "db"))
            });
            (dir, result.map_err(|e| e.to_string()))
        };
        let section = "[identity_assertion]\nkey = \"id.key\"\n";
        let enabled = "assert_identity = [\"db\"]\n";
        assert_eq!(with(enabled, section).1, Ok(true));
        assert_eq!(with("", section).1, Ok(false), "off by default");
        assert_eq!(with("", "").1, Ok(false));
        let err = with(enabled, "").1.expect_err("no section");
        assert!(err.contains("[identity_assertion] is missing"), "{err}");
        let err = with(enabled, "[identity_assertion]\nkey = \"missing.key\"\n")
            .1
            .expect_err("no key file");
        assert!(err.contains("missing.key"), "{err}");
        let err = with(enabled, &format!("{section}header = \"Authorization\"\n"))
            .1
            .expect_err("header");
        assert!(err.contains("Authorization"), "{err}");
        let err = with("assert_identity = [\"a/b\"]\n", section)
            .1
            .expect_err("bad source name");
        assert!(err.contains("assert_identity"), "{err}");
    }

    #[test]
    fn shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let relay = RelayConfig::load(&dir.join("relay.toml")).expect("examples/relay.toml");
        assert_eq!(relay.tenants[0].name, "acme");
        let client = ClientFile::load(&dir.join("connect.toml")).expect("examples/connect.toml");
        assert_eq!(client.sources().expect("sources")[0].name, "everything");
    }

    #[test]
    fn source_flags() {
        assert_eq!(
            SourceConfig::parse_flag("db=http://127.0.0.1:1/mcp").expect("http"),
            SourceConfig {
                name: "db".into(),
                target: SourceTarget::Http("http://127.0.0.1:1/mcp".into()),
                follow_cross_origin_redirects: false,
            }
        );
        assert_eq!(
            SourceConfig::parse_flag("fs=stdio:npx -y server")
                .expect("stdio")
                .target,
            SourceTarget::Stdio(vec!["npx".into(), "-y".into(), "server".into()])
        );
        assert!(SourceConfig::parse_flag("bad name=http://x").is_err());
        assert!(SourceConfig::parse_flag("x=ftp://x").is_err());
    }

    // --- [fleet] and the audit checkpoint file (issue 13, item 5) ---

    #[test]
    fn fleet_id_and_checkpoint_file_parse_and_name_the_relay_in_the_trail() {
        let text = GOOD.replace(
            "[audit]\npath = \"audit.db\"\n",
            "[audit]\npath = \"audit.db\"\ncheckpoint_file = \"cp.jsonl\"\n[fleet]\nid = \"relay-a\"\n",
        );
        let (dir, path) = write(&text);
        let config = RelayConfig::load(&path).expect("parses");
        let audit = config.audit.as_ref().expect("[audit]");
        assert_eq!(audit.checkpoint_file, Some(dir.path().join("cp.jsonl")));
        assert_eq!(
            config.fleet.as_ref().and_then(|f| f.id.as_deref()),
            Some("relay-a")
        );
        assert_eq!(
            crate::govern::audit::relay_instance(Some("relay-a"), 4433),
            "relay-a"
        );
        assert!(crate::govern::audit::relay_instance(None, 4433).ends_with(":4433"));
        let (_dir, path) = write(&text.replace("id = \"relay-a\"", "id = \" \""));
        let err = RelayConfig::load(&path)
            .expect_err("an empty id")
            .to_string();
        assert!(err.contains("fleet.id"), "{err}");
    }

    // ---- Tunnel trust ----

    #[test]
    fn bound_tunnel_tokens_load_and_mistakes_are_named() {
        let token = "sha256:00000000000000000000000000000000000000000000000000000000000000aa";
        let with = |tunnels: &str| {
            let text = GOOD.replace("name = \"acme\"\n", &format!("name = \"acme\"\n{tunnels}"));
            let (_dir, path) = write(&text);
            RelayConfig::load(&path).map_err(|e| e.to_string())
        };
        // TOML: the array-of-tables lines go after the tenant's plain keys.
        let stanza = |sources: &str| {
            format!("[[tenants.tunnels]]\ntoken = \"{token}\"\nsources = {sources}\n")
        };
        let good = GOOD.to_owned() + &stanza("[\"db\", \"files\"]");
        let (_dir, path) = write(&good);
        let config = RelayConfig::load(&path).expect("a bound token loads");
        assert_eq!(config.tenants[0].tunnels[0].sources, ["db", "files"]);
        assert_eq!(
            config.trust_warnings().len(),
            1,
            "the unbound token of GOOD is warned about"
        );
        assert!(config.trust_warnings()[0].contains("not bound"));
        for (sources, expected) in [("[]", "names no sources"), ("[\"a/b\"]", "source name")] {
            let (_dir, path) = write(&(GOOD.to_owned() + &stanza(sources)));
            let err = RelayConfig::load(&path).expect_err("refused").to_string();
            assert!(err.contains(expected) && err.contains("tunnels"), "{err}");
        }
        let twice = GOOD.to_owned() + &stanza("[\"db\"]") + &stanza("[\"files\"]");
        let (_dir, path) = write(&twice);
        let err = RelayConfig::load(&path).expect_err("refused").to_string();
        assert!(err.contains("listed twice"), "{err}");
        assert!(with("").is_ok());
    }

    #[test]
    fn provider_tenants_are_checked_and_warned_about() {
        let public_url = "public_url = \"https://relay.example/\"\n";
        let claim = PROVIDER.replace("tenant = \"acme\"", "tenant_claim = \"t\"");
        let (_dir, path) = with_provider(public_url, &claim);
        let config = RelayConfig::load(&path).expect("tenant_claim alone still loads");
        assert!(
            config
                .trust_warnings()
                .iter()
                .any(|w| w.contains("idp.example") && w.contains("any tenant")),
            "{:?}",
            config.trust_warnings()
        );
        let listed = claim.replace(
            "tenant_claim = \"t\"",
            "tenant_claim = \"t\"\ntenants = [\"acme\"]",
        );
        let (_dir, path) = with_provider(public_url, &listed);
        let config = RelayConfig::load(&path).expect("listed tenants load");
        assert!(
            !config
                .trust_warnings()
                .iter()
                .any(|w| w.contains("idp.example"))
        );
        for (provider, expected) in [
            (
                claim.replace(
                    "tenant_claim = \"t\"",
                    "tenant_claim = \"t\"\ntenants = [\"globex\"]",
                ),
                "tenant globex is not defined",
            ),
            (
                claim.replace("tenant_claim = \"t\"", "tenant_claim = \"t\"\ntenants = []"),
                "no tenant",
            ),
            (
                PROVIDER.replace(
                    "tenant = \"acme\"",
                    "tenant = \"acme\"\ntenants = [\"acme\"]",
                ),
                "only with tenant_claim",
            ),
            (
                PROVIDER.replace(
                    "jwks_file = \"jwks.json\"",
                    "jwks_url = \"http://idp.example/jwks\"",
                ),
                "https",
            ),
        ] {
            let (_dir, path) = with_provider(public_url, &provider);
            let err = RelayConfig::load(&path).expect_err("refused").to_string();
            assert!(err.contains(expected), "{err}");
        }
        for loopback in [
            "http://127.0.0.1:1/jwks",
            "http://localhost:1/jwks",
            "http://[::1]:1/jwks",
        ] {
            let provider = PROVIDER.replace(
                "jwks_file = \"jwks.json\"",
                &format!("jwks_url = \"{loopback}\""),
            );
            let (_dir, path) = with_provider(public_url, &provider);
            RelayConfig::load(&path).unwrap_or_else(|e| panic!("{loopback}: {e}"));
        }
    }

    #[test]
    fn cross_origin_redirects_are_a_per_source_switch_for_url_sources() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("connect.toml");
        let base = "relay = \"localhost:4433\"\n[[sources]]\nname = \"db\"\n";
        std::fs::write(&path, format!("{base}url = \"http://127.0.0.1:1/mcp\"\n")).expect("write");
        let sources = ClientFile::load(&path)
            .expect("loads")
            .sources()
            .expect("sources");
        assert!(!sources[0].follow_cross_origin_redirects, "off by default");
        std::fs::write(
            &path,
            format!(
                "{base}url = \"http://127.0.0.1:1/mcp\"\nfollow_cross_origin_redirects = true\n"
            ),
        )
        .expect("write");
        let sources = ClientFile::load(&path)
            .expect("loads")
            .sources()
            .expect("sources");
        assert!(sources[0].follow_cross_origin_redirects);
        std::fs::write(
            &path,
            format!("{base}command = [\"server\"]\nfollow_cross_origin_redirects = true\n"),
        )
        .expect("write");
        let err = ClientFile::load(&path).expect_err("refused").to_string();
        assert!(err.contains("url sources only"), "{err}");
    }

    // --- Session limits (issue 13: items 8, 10 and 19) ---

    #[test]
    fn the_examples_name_every_session_limit_with_its_default() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let relay = RelayConfig::load(&dir.join("relay.toml")).expect("examples/relay.toml");
        let defaults = LimitsSection::default();
        assert_eq!(
            relay.limits.max_sessions_per_key,
            defaults.max_sessions_per_key
        );
        assert_eq!(
            relay.limits.max_sessions_per_tenant,
            defaults.max_sessions_per_tenant
        );
        assert_eq!(
            relay.limits.max_sessions_per_source,
            defaults.max_sessions_per_source
        );
        assert_eq!(
            relay.limits.open_stream_timeout_secs,
            defaults.open_stream_timeout_secs
        );
        assert_eq!(
            relay.limits.session_event_bytes,
            defaults.session_event_bytes
        );
        let client = ClientFile::load(&dir.join("connect.toml")).expect("examples/connect.toml");
        assert_eq!(
            client.stdio_max_processes,
            crate::client::sources::stdio::DEFAULT_MAX_PROCESSES
        );
        assert_eq!(
            client.stdio_idle_secs,
            crate::client::sources::stdio::DEFAULT_IDLE.as_secs()
        );
        // Absent keys take the defaults; the section may name only some.
        let limits: LimitsSection =
            toml::from_str("max_sessions_per_key = 2").expect("a partial [limits]");
        assert_eq!(limits.max_sessions_per_key, 2);
        assert_eq!(limits.session_event_bytes, DEFAULT_SESSION_EVENT_BYTES);
    }
}
