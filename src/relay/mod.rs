//! `mcp-tunnel relay`: terminates tunnels and serves agents.
//!
//! [`Relay::bind`] opens every listener (so tests can bind port 0 and read the addresses back);
//! [`Relay::serve`] runs until the shutdown token fires.

pub mod admin;
pub mod agent;
pub mod answer;
pub mod channel;
pub mod events;
pub mod legacy_sse;
pub mod registry;
pub mod reply;
pub mod sessions;
pub mod streamable;
pub mod tunnels;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{LimitsSection, RelayConfig};
use crate::govern::{Keyring, Policy};
use crate::transport::{TransportError, quic, tls};
use registry::Registry;
use sessions::Sessions;

/// After shutdown, how long open agent requests may take to finish before the relay stops
/// anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How often idle sessions are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// Why the relay could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// Certificates or the QUIC endpoint are unusable.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The configuration is inconsistent.
    #[error("configuration: {0}")]
    Config(String),
    /// Serving HTTP failed.
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

/// Credentials and policy, swapped whole on reload.
pub struct Governance {
    /// Agent keys and tunnel tokens.
    pub keyring: Keyring,
    /// Roles.
    pub policy: Policy,
}

/// What every handler shares.
pub struct RelayState {
    governance: RwLock<Arc<Governance>>,
    /// Live tunnels.
    pub registry: Registry,
    /// Live agent sessions.
    pub sessions: Sessions,
    /// Limits and timeouts.
    pub limits: LimitsSection,
    /// Browser origins allowed besides same-origin.
    pub allowed_origins: Vec<String>,
    /// Agent-facing host names; see [`RelayState::host_allowed`].
    pub allowed_hosts: Vec<String>,
    /// Whether the agent listener is on loopback.
    pub loopback: bool,
    /// Interval of SSE keep-alive comments.
    pub sse_keep_alive: Duration,
    /// Cancelled when the relay stops: long-lived agent streams end on it.
    pub shutdown: CancellationToken,
}

/// Names that reach a loopback listener legitimately.
const LOOPBACK_NAMES: &[&str] = &["localhost", "127.0.0.1", "[::1]", "::1"];

impl RelayState {
    /// Whether agents may address the relay as `host` (the `Host` header). Configured names
    /// win; otherwise a loopback relay answers only to loopback names, so a web page whose DNS
    /// name was rebound to 127.0.0.1 cannot reach it.
    pub fn host_allowed(&self, host: &str) -> bool {
        if host.is_empty() {
            return true;
        }
        let name = match host.rsplit_once(':') {
            Some((name, port))
                if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') =>
            {
                name
            }
            _ => host,
        };
        if !self.allowed_hosts.is_empty() {
            return self.allowed_hosts.iter().any(|allowed| {
                allowed.eq_ignore_ascii_case(host) || allowed.eq_ignore_ascii_case(name)
            });
        }
        !self.loopback || LOOPBACK_NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    /// The current credentials and policy.
    pub fn governance(&self) -> Arc<Governance> {
        let guard: RwLockReadGuard<'_, Arc<Governance>> = self
            .governance
            .read()
            .expect("governance lock is never held across a panic");
        guard.clone()
    }
}

/// Everything the relay needs, resolved (certificates loaded, secrets parsed).
pub struct RelaySettings {
    /// QUIC listen address.
    pub tunnel_listen: SocketAddr,
    /// The relay's certificate and key.
    pub identity: tls::Identity,
    /// Agent endpoint address.
    pub agents_listen: SocketAddr,
    /// Admin endpoint address, if any.
    pub admin_listen: Option<SocketAddr>,
    /// Credentials and policy.
    pub governance: Governance,
    /// Limits.
    pub limits: LimitsSection,
    /// Allowed browser origins.
    pub allowed_origins: Vec<String>,
    /// Allowed `Host` names (empty: see [`RelayState::host_allowed`]).
    pub allowed_hosts: Vec<String>,
    /// Interval of SSE keep-alive comments.
    pub sse_keep_alive: Duration,
}

impl RelaySettings {
    /// Resolves a loaded configuration file.
    pub fn from_config(config: &RelayConfig) -> Result<Self, RelayError> {
        let (keyring, policy) = config.build_governance().map_err(RelayError::Config)?;
        Ok(Self {
            tunnel_listen: config.tunnel.listen,
            identity: tls::Identity::load(&config.tunnel.cert, &config.tunnel.key)?,
            agents_listen: config.agents.listen,
            admin_listen: config.admin.as_ref().map(|a| a.listen),
            governance: Governance { keyring, policy },
            limits: config.limits.clone(),
            allowed_origins: config.agents.allowed_origins.clone(),
            allowed_hosts: config.agents.allowed_hosts.clone(),
            sse_keep_alive: Duration::from_secs(config.agents.sse_keep_alive_secs),
        })
    }
}

/// A relay with its listeners bound.
pub struct Relay {
    state: Arc<RelayState>,
    endpoint: quinn::Endpoint,
    agents: TcpListener,
    admin: Option<TcpListener>,
}

async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, RelayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RelayError::Bind { addr, source })
}

impl Relay {
    /// Binds every listener.
    pub async fn bind(settings: RelaySettings) -> Result<Self, RelayError> {
        let tls = tls::server_config(settings.identity, &[crate::wire::ALPN])?;
        let endpoint = quic::server_endpoint(settings.tunnel_listen, tls)?;
        let agents = bind_tcp(settings.agents_listen).await?;
        let admin = match settings.admin_listen {
            Some(addr) => Some(bind_tcp(addr).await?),
            None => None,
        };
        let state = Arc::new(RelayState {
            governance: RwLock::new(Arc::new(settings.governance)),
            registry: Registry::default(),
            sessions: Sessions::default(),
            limits: settings.limits,
            allowed_origins: settings.allowed_origins,
            allowed_hosts: settings.allowed_hosts,
            loopback: agents
                .local_addr()
                .map(|a| a.ip().is_loopback())
                .unwrap_or(false),
            sse_keep_alive: settings.sse_keep_alive,
            shutdown: CancellationToken::new(),
        });
        Ok(Self {
            state,
            endpoint,
            agents,
            admin,
        })
    }

    /// The shared state (tests read the registry and sessions).
    pub fn state(&self) -> &Arc<RelayState> {
        &self.state
    }

    /// Where tunnel clients connect (UDP).
    pub fn tunnel_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has a local address")
    }

    /// Where agents connect.
    pub fn agents_addr(&self) -> SocketAddr {
        self.agents
            .local_addr()
            .expect("a bound listener has a local address")
    }

    /// Where the admin endpoints are, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|l| {
            l.local_addr()
                .expect("a bound listener has a local address")
        })
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        let Relay {
            state,
            endpoint,
            agents,
            admin,
        } = self;
        tracing::info!(
            tunnel = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            agents = %agents.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "relay listening"
        );
        let tunnels = tokio::spawn(tunnels::serve_quic(
            endpoint,
            state.clone(),
            shutdown.clone(),
        ));
        let sweeper = tokio::spawn(sweep_sessions(state.clone(), shutdown.clone()));
        let agent_app = streamable::routes()
            .merge(legacy_sse::routes())
            .with_state(state.clone());
        let agent_server = axum::serve(agents.tap_io(no_delay), agent_app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let admin_server = async {
            match admin {
                Some(listener) => {
                    axum::serve(
                        listener.tap_io(no_delay),
                        admin::routes().with_state(state.clone()),
                    )
                    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                    .await
                }
                None => Ok(()),
            }
        };
        // Long-lived agent streams (SSE) watch the state's token and end when it fires.
        let state_shutdown = state.shutdown.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            state_shutdown.cancel();
        });
        let servers = async {
            let (agent_result, admin_result) =
                tokio::join!(agent_server.into_future(), admin_server);
            agent_result
                .map_err(RelayError::Http)
                .and(admin_result.map_err(RelayError::Http))
        };
        let drain_deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        };
        let result = tokio::select! {
            result = servers => result,
            _ = drain_deadline => {
                tracing::warn!(timeout_s = DRAIN_TIMEOUT.as_secs(), "agent requests still open after the drain timeout; stopping anyway");
                Ok(())
            }
        };
        let _ = tokio::join!(tunnels, sweeper);
        result
    }
}

/// Disables Nagle's algorithm on an accepted connection: answers are written in several small
/// pieces (headers, SSE events), and Nagle plus the peer's delayed ACK would hold each one for
/// up to 40 ms.
pub fn no_delay(tcp: &mut TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
}

async fn sweep_sessions(state: Arc<RelayState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        for session in state.sessions.sweep(state.limits.session_idle()) {
            tracing::info!(session = %session.id, tenant = %session.tenant, "session expired");
            session.channel.close("session expired").await;
        }
    }
}
