//! The relay's governance as its configuration file describes it: credentials, roles and
//! conditions, identity providers, assertions and rate limits, built from the schema in
//! [`crate::config`] with every key file read and every cross-reference checked.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use crate::config::{
    AuditLevel, ConfigError, IdentityProviderSection, LimitsSection, MatchKind, RateLimitsSection,
    RelayConfig, TenantSection, validate_source_name,
};
use crate::govern::assertion::{self, AssertionSigner};
use crate::govern::audit::postgres::OnDatabaseDown;
use crate::govern::audit::{AuditSettings, Capture, CaptureRules, DatabaseSettings, Durability};
use crate::govern::condition::Condition;
use crate::govern::jwks::RemoteJwks;
use crate::govern::jwt::{self, ClaimMapping, JwtVerifier, Provider, ProviderKeys, TenantSource};
use crate::govern::limits::{Limiter, Rate, RateLimits};
use crate::govern::policy::{Kind, Role};
use crate::govern::{Identity, Keyring, Policy, SecretHash};

/// Credentials, policy and the limits that may change while running, swapped whole on reload.
pub struct Governance {
    /// Agent keys and tunnel tokens.
    pub keyring: Keyring,
    /// Roles.
    pub policy: Policy,
    /// Rate limits. A reload that leaves `[rate_limits]` as it was keeps these buckets; one
    /// that changes it starts new buckets.
    pub limiter: Arc<Limiter>,
    /// `[limits]` as last loaded; read through [`super::RelayState::request_timeout`],
    /// [`super::RelayState::session_idle`] and [`super::RelayState::max_message_bytes`]. At
    /// start, [`super::RelaySettings::limits`] replaces it.
    pub limits: LimitsSection,
}

impl Governance {
    /// Builds the credentials and policy a configuration file describes (checking every
    /// cross-reference); the error says what is wrong.
    pub fn from_config(config: &RelayConfig) -> Result<Self, String> {
        let (keyring, policy) = build(config)?;
        for warning in trust_warnings(config) {
            tracing::warn!("{warning}");
        }
        let limiter = Arc::new(Limiter::new(&rate_limits(&config.rate_limits)?));
        Ok(Self {
            keyring,
            policy,
            limiter,
            limits: config.limits.clone(),
        })
    }
}

/// Reads a relay configuration file and checks all of it: the schema
/// ([`RelayConfig::load`]) and what the relay builds from it (keys, roles, conditions,
/// identity providers and assertions, reading their files).
pub fn load_config(path: &Path) -> Result<RelayConfig, ConfigError> {
    let config = RelayConfig::load(path)?;
    build(&config).map_err(|message| ConfigError::Invalid {
        path: path.into(),
        message,
    })?;
    Ok(config)
}

/// The rate limits `[rate_limits]` configures (checked first).
pub(super) fn rate_limits(section: &RateLimitsSection) -> Result<RateLimits, String> {
    section.validate()?;
    let rate = |rate: Option<crate::config::RateSection>| {
        rate.map(|r| Rate {
            per_minute: r.per_minute,
            burst: r.burst,
        })
    };
    Ok(RateLimits {
        identity: rate(section.identity),
        source: rate(section.source),
        tenant: rate(section.tenant),
        auth_failures: rate(section.auth_failures),
        max_keys: section
            .max_keys
            .unwrap_or(crate::govern::limits::DEFAULT_MAX_KEYS),
    })
}

/// The audit trail's settings from `[audit]` (none without it). Its chains are named by the
/// relay's instance id, which [`super::Relay::bind`] fills in.
pub(super) fn audit_settings(config: &RelayConfig) -> Option<AuditSettings> {
    let section = config.audit.as_ref()?;
    let capture = section.sources.iter().map(|s| {
        let capture = match s.level {
            AuditLevel::Metadata => Capture::Metadata,
            AuditLevel::Full => Capture::Full {
                redact: s.redact.clone().into(),
            },
        };
        (s.tenant.clone(), s.source.clone(), capture)
    });
    Some(AuditSettings {
        path: section.path.clone(),
        durability: match section.durability {
            crate::config::Durability::Commit => Durability::Commit,
            crate::config::Durability::Fsync => Durability::Fsync,
        },
        key: section.key.clone(),
        checkpoint_rows: section.checkpoint_rows,
        checkpoint_secs: section.checkpoint_secs,
        queue: section.queue,
        capture: CaptureRules::new(capture),
        checkpoint_file: section.checkpoint_file.clone(),
        relay_id: None,
        new_epoch: false,
        database: section.url.as_ref().map(|url| DatabaseSettings {
            url: url.0.clone(),
            password_file: section.password_file.clone(),
            on_down: match section.on_database_down {
                crate::config::OnDatabaseDown::Spool => OnDatabaseDown::Spool,
                crate::config::OnDatabaseDown::Refuse => OnDatabaseDown::Refuse,
            },
        }),
    })
}

/// What a condition's `match` names, as policy calls it.
fn match_kind(kind: MatchKind) -> Kind {
    match kind {
        MatchKind::Tool => Kind::Tool,
        MatchKind::Resource => Kind::Resource,
        MatchKind::Prompt => Kind::Prompt,
    }
}

/// Builds the keyring and policy of `config`, checking every cross-reference.
pub fn build(config: &RelayConfig) -> Result<(Keyring, Policy), String> {
    let mut keyring = Keyring::default();
    let mut policy = Policy::default();
    let mut tenant_names = HashSet::new();
    let mut secrets_seen = HashSet::new();
    if config.agents.sse_keep_alive_secs == 0 {
        return Err("agents.sse_keep_alive_secs must be at least 1".into());
    }
    if config.limits.max_message_bytes < 1024 || config.limits.max_message_bytes > u32::MAX as usize
    {
        return Err("limits.max_message_bytes must be between 1024 and 4294967295".into());
    }
    for tenant in &config.tenants {
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
        let roles = build_roles(tenant)?;
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
    keyring.set_jwt(build_jwt(config, &tenant_names)?);
    if let Some(signer) = build_assertions(config)? {
        keyring.set_assertions(signer);
    }
    Ok((keyring, policy))
}

/// The roles of `tenant`, their conditions compiled.
fn build_roles(tenant: &TenantSection) -> Result<HashMap<String, Role>, String> {
    let mut roles = HashMap::new();
    for role in &tenant.roles {
        let conditions = role
            .conditions
            .iter()
            .map(|c| {
                Condition::compile(match_kind(c.kind), c.pattern.clone(), &c.when)
                    .map(Arc::new)
                    .map_err(|e| {
                        format!(
                            "tenant {}: role {}: condition on {}: {e}",
                            tenant.name, role.name, c.pattern
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let built = Role {
            allow: role.allow.clone(),
            deny: role.deny.clone(),
            allow_resources: role.allow_resources.clone(),
            deny_resources: role.deny_resources.clone(),
            allow_prompts: role.allow_prompts.clone(),
            deny_prompts: role.deny_prompts.clone(),
            conditions,
        };
        if roles.insert(role.name.clone(), built).is_some() {
            return Err(format!(
                "tenant {}: role {} defined twice",
                tenant.name, role.name
            ));
        }
    }
    Ok(roles)
}

/// Builds the identity assertion signer from `[identity_assertion]` and the tenants'
/// `assert_identity`, reading the key file.
fn build_assertions(config: &RelayConfig) -> Result<Option<AssertionSigner>, String> {
    let wanted = config.tenants.iter().any(|t| !t.assert_identity.is_empty());
    let Some(section) = &config.identity_assertion else {
        if wanted {
            return Err("a tenant sets assert_identity but [identity_assertion] is missing".into());
        }
        return Ok(None);
    };
    let fail = |message: String| format!("identity_assertion: {message}");
    let pem = std::fs::read_to_string(&section.key)
        .map_err(|e| fail(format!("cannot read {}: {e}", section.key.display())))?;
    let issuer = config.agents.public_url.as_deref().map_or_else(
        || assertion::DEFAULT_ISSUER.to_owned(),
        |url| url.trim_end_matches('/').to_owned(),
    );
    let mut signer = AssertionSigner::new(&pem, issuer, section.header.clone(), section.ttl_secs)
        .map_err(|e| fail(e.to_string()))?;
    for tenant in &config.tenants {
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
fn build_jwt(config: &RelayConfig, tenant_names: &HashSet<&str>) -> Result<JwtVerifier, String> {
    let public_url = config
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
    for section in &config.identity_providers {
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

/// What this configuration allows that an operator should know about, one line each:
/// unbound tunnel tokens (`tunnel_tokens`: any tunnel with one may announce any source of
/// its tenant and take its sessions) and identity providers whose `tenant_claim` may name
/// any tenant. The relay logs them as warnings at start and at each reload.
pub fn trust_warnings(config: &RelayConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    for tenant in &config.tenants {
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
    for provider in &config.identity_providers {
        if provider.tenant_claim.is_some() && provider.tenants.is_none() {
            warnings.push(format!(
                "identity provider {}: tenant_claim without tenants = [...]: its tokens may name any tenant of the relay; list the tenants it may speak for",
                provider.issuer
            ));
        }
    }
    warnings
}
