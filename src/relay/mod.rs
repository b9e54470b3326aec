//! `mcp-tunnel relay`: terminates tunnels and serves agents.
//!
//! [`Relay::bind`] opens every listener (so tests can bind port 0 and read the addresses back);
//! [`Relay::serve`] runs until the shutdown token fires.

pub mod activity;
pub mod admin;
pub mod agent;
pub mod answer;
pub mod call_metrics;
pub mod calls;
pub mod channel;
#[cfg(test)]
mod config_tests;
pub mod events;
pub mod filter;
pub mod governance;
pub mod http_server;
pub mod legacy_sse;
pub mod listener_limits;
pub mod metric_names;
pub mod oauth;
pub mod registry;
pub mod reload;
pub mod reply;
pub mod sessions;
pub mod streamable;
pub mod tunnels;
pub mod unread_body;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::{LimitsSection, RelayConfig};
use crate::govern::audit::AuditSettings;
use crate::transport::{TransportError, quic, tls};
pub use governance::{Governance, load_config};
use listener_limits::ListenerLimits;
use registry::Registry;
use sessions::Sessions;

/// After shutdown, how long open agent requests may take to finish before the relay stops
/// anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// After the grace period, how long the last error answers get to reach their agents.
const FINAL_FLUSH: Duration = Duration::from_secs(2);

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
    /// The audit trail could not be opened.
    #[error(transparent)]
    Audit(#[from] crate::govern::audit::AuditError),
}

/// What every handler shares.
pub struct RelayState {
    governance: RwLock<Arc<Governance>>,
    /// Live tunnels.
    pub registry: Registry,
    /// Live agent sessions.
    pub sessions: Sessions,
    /// Where finished calls go: the audit trail, metrics, the activity feed.
    pub calls: Arc<calls::Calls>,
    /// Live activity for the admin `/activity` page: every finished call reaches it through
    /// [`calls::Calls`].
    pub activity: Arc<activity::Activity>,
    /// Limits and timeouts as the relay started: `max_message_bytes` here is the tunnel frame
    /// limit agreed with every `connect` at its handshake. What reload changes is read through
    /// [`RelayState::request_timeout`], [`RelayState::session_idle`] and
    /// [`RelayState::max_message_bytes`].
    pub limits: LimitsSection,
    /// Browser origins allowed besides same-origin.
    pub allowed_origins: Vec<String>,
    /// Agent-facing host names; see [`RelayState::host_allowed`].
    pub allowed_hosts: Vec<String>,
    /// Whether the agent listener is on loopback.
    pub loopback: bool,
    /// Interval of SSE keep-alive comments.
    pub sse_keep_alive: Duration,
    /// Cancelled when shutdown starts: tunnels are told to drain, standalone agent streams end,
    /// nothing new is accepted.
    pub shutdown: CancellationToken,
    /// Cancelled when the drain period is over: what is still in flight ends with an error
    /// that names the shutdown, and tunnel connections close.
    pub stop: CancellationToken,
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

    /// How long to wait for an upstream's answer to one request (reloadable).
    pub fn request_timeout(&self) -> Duration {
        self.governance().limits.request_timeout()
    }

    /// How long an idle agent session lives (reloadable).
    pub fn session_idle(&self) -> Duration {
        self.governance().limits.session_idle()
    }

    /// The caps on open sessions and listen streams (reloadable).
    pub fn session_caps(&self) -> sessions::SessionCaps {
        sessions::SessionCaps::of(&self.governance().limits)
    }

    /// The largest agent request body accepted: the reloaded limit, but never above the one
    /// the relay started with (tunnels agreed on that frame limit at their handshake, and a
    /// larger message would not fit their frames).
    pub fn max_message_bytes(&self) -> usize {
        self.governance()
            .limits
            .max_message_bytes
            .min(self.limits.max_message_bytes)
    }

    /// Most messages one agent batch may hold (reloadable).
    pub fn max_batch_messages(&self) -> usize {
        self.governance().limits.max_batch_messages
    }

    /// The largest single upstream answer relayed (reloadable; applies to streams opened
    /// after a reload). Answers larger than a frame cross the tunnel in pieces.
    pub fn max_answer_bytes(&self) -> usize {
        self.governance()
            .limits
            .max_answer_bytes
            .max(self.limits.max_message_bytes)
    }

    /// The current credentials and policy.
    pub fn governance(&self) -> Arc<Governance> {
        let guard: RwLockReadGuard<'_, Arc<Governance>> = self
            .governance
            .read()
            .expect("governance lock is never held across a panic");
        guard.clone()
    }

    /// Replaces the credentials and policy at once: requests that already read them finish
    /// with the old ones, every later request sees the new ones. Open sessions and tunnels
    /// stay. Returns the replaced governance.
    pub fn reload(&self, governance: Governance) -> Arc<Governance> {
        self.calls.metric_names().configure(&governance.policy);
        let mut guard = self
            .governance
            .write()
            .expect("governance lock is never held across a panic");
        std::mem::replace(&mut *guard, Arc::new(governance))
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
    /// The audit trail, if any: without it nothing is written.
    pub audit: Option<AuditSettings>,
}

impl RelaySettings {
    /// Resolves a loaded configuration file.
    pub fn from_config(config: &RelayConfig) -> Result<Self, RelayError> {
        crate::config::check_max_answer_bytes(
            config.limits.max_answer_bytes,
            config.limits.max_message_bytes,
        )
        .map_err(|e| RelayError::Config(format!("limits.{e}")))?;
        let governance = Governance::from_config(config).map_err(RelayError::Config)?;
        Ok(Self {
            tunnel_listen: config.tunnel.listen,
            identity: tls::Identity::load(&config.tunnel.cert, &config.tunnel.key)?,
            agents_listen: config.agents.listen,
            admin_listen: config.admin.as_ref().map(|a| a.listen),
            governance,
            limits: config.limits.clone(),
            allowed_origins: config.agents.allowed_origins.clone(),
            allowed_hosts: config.agents.allowed_hosts.clone(),
            sse_keep_alive: Duration::from_secs(config.agents.sse_keep_alive_secs),
            audit: governance::audit_settings(config),
        })
    }
}

/// A relay with its listeners bound.
pub struct Relay {
    state: Arc<RelayState>,
    endpoint: quinn::Endpoint,
    tunnel_tcp: TcpListener,
    tls_acceptor: tokio_rustls::TlsAcceptor,
    agents: TcpListener,
    admin: Option<TcpListener>,
}

/// Attempts at finding a port free for both UDP and TCP when the configured port is 0.
const PORT_ATTEMPTS: usize = 16;

/// Binds QUIC on UDP and the HTTPS fallback on TCP, on the same port number (a port 0 request
/// picks one free for both).
async fn bind_tunnel(
    addr: SocketAddr,
    tls: &rustls::ServerConfig,
    max_handshakes: usize,
) -> Result<(quinn::Endpoint, TcpListener), RelayError> {
    let mut last_error = None;
    for _ in 0..PORT_ATTEMPTS {
        let endpoint = quic::server_endpoint(addr, tls.clone(), max_handshakes)?;
        let udp = endpoint
            .local_addr()
            .map_err(|source| RelayError::Bind { addr, source })?;
        match TcpListener::bind(udp).await {
            Ok(tcp) => return Ok((endpoint, tcp)),
            Err(source) if addr.port() == 0 => last_error = Some(source),
            Err(source) => return Err(RelayError::Bind { addr: udp, source }),
        }
    }
    Err(RelayError::Bind {
        addr,
        source: last_error
            .unwrap_or_else(|| std::io::Error::other("no port free for both UDP and TCP")),
    })
}

async fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, RelayError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RelayError::Bind { addr, source })
}

impl Relay {
    /// Binds every listener.
    pub async fn bind(settings: RelaySettings) -> Result<Self, RelayError> {
        // One TLS config for both transports: QUIC clients offer our ALPN, HTTPS ones `h2`.
        let tls = tls::server_config(
            settings.identity,
            &[crate::wire::ALPN, crate::transport::h2::ALPN],
        )?;
        settings
            .limits
            .validate_listeners()
            .map_err(RelayError::Config)?;
        let bounds = ListenerLimits::from(&settings.limits);
        let (endpoint, tunnel_tcp) =
            bind_tunnel(settings.tunnel_listen, &tls, bounds.max_tunnel_handshakes).await?;
        let tls_acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let agents = bind_tcp(settings.agents_listen).await?;
        let auditor = settings
            .audit
            .clone()
            .map(|mut audit| {
                if audit.relay_id.is_none() {
                    audit.relay_id = Some(crate::govern::audit::relay_instance(
                        None,
                        settings.tunnel_listen.port(),
                    ));
                }
                crate::govern::audit::Auditor::open(&audit)
            })
            .transpose()?;
        let admin = match settings.admin_listen {
            Some(addr) => Some(bind_tcp(addr).await?),
            None => None,
        };
        let mut governance = settings.governance;
        governance.limits = settings.limits.clone();
        if admin.is_some() {
            // Recorded metrics are kept (and served at /metrics) only with an admin listener.
            crate::metrics::prometheus();
        }
        let activity = Arc::new(activity::Activity::default());
        let calls = Arc::new(calls::Calls::new(auditor, activity.clone()));
        calls.metric_names().configure(&governance.policy);
        let state = Arc::new(RelayState {
            governance: RwLock::new(Arc::new(governance)),
            registry: Registry::default(),
            sessions: Sessions::default(),
            calls,
            activity,
            limits: settings.limits,
            allowed_origins: settings.allowed_origins,
            allowed_hosts: settings.allowed_hosts,
            loopback: agents
                .local_addr()
                .map(|a| a.ip().is_loopback())
                .unwrap_or(false),
            sse_keep_alive: settings.sse_keep_alive,
            shutdown: CancellationToken::new(),
            stop: CancellationToken::new(),
        });
        Ok(Self {
            state,
            endpoint,
            tunnel_tcp,
            tls_acceptor,
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
            tunnel_tcp,
            tls_acceptor,
            agents,
            admin,
        } = self;
        tracing::info!(
            tunnel = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            agents = %agents.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "relay listening (QUIC on UDP and HTTPS on TCP at the tunnel address)"
        );
        let draining = state.shutdown.clone();
        tokio::spawn({
            let draining = draining.clone();
            async move {
                shutdown.cancelled().await;
                tracing::info!(
                    grace_s = DRAIN_TIMEOUT.as_secs(),
                    "draining: tunnels told, no new requests accepted"
                );
                draining.cancel();
            }
        });
        let bounds = ListenerLimits::from(&state.limits);
        let admission = tunnels::Admission::new(&bounds);
        let quic = tokio::spawn(tunnels::serve_quic(
            endpoint,
            state.clone(),
            admission.clone(),
            draining.clone(),
        ));
        let https = tokio::spawn(tunnels::serve_https(
            tunnel_tcp,
            tls_acceptor,
            state.clone(),
            admission,
            draining.clone(),
        ));
        let sweeper = tokio::spawn(sweep_sessions(state.clone(), draining.clone()));
        let agent_app = streamable::routes()
            .merge(legacy_sse::routes())
            .merge(oauth::routes())
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                limit_auth_failures,
            ))
            // Outermost: whatever answered early, the rest of the body is read before the
            // answer goes out, so clients still sending can read it.
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                unread_body::discard_unread_body,
            ))
            .with_state(state.clone());
        let agent_server = http_server::serve(
            agents,
            agent_app,
            http_server::Bounds {
                name: "agents",
                max_connections: bounds.max_agent_connections,
                header_timeout: bounds.header_timeout,
                idle_timeout: bounds.idle_timeout,
            },
            no_delay,
            draining.clone(),
        );
        // The admin endpoints stay up while the relay drains: operators watch it happen.
        let admin_server = admin.map(|listener| {
            tokio::spawn(metrics_upkeep(state.stop.clone()));
            let app = admin::routes(state.clone()).with_state(state.clone());
            tokio::spawn(http_server::serve(
                listener,
                app,
                http_server::Bounds {
                    name: "admin",
                    max_connections: bounds.max_admin_connections,
                    header_timeout: bounds.header_timeout,
                    idle_timeout: bounds.idle_timeout,
                },
                no_delay,
                state.stop.clone(),
            ))
        });
        let drain_deadline = async {
            draining.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        };
        let mut agent_server = std::pin::pin!(agent_server);
        tokio::select! {
            () = &mut agent_server => {}
            _ = drain_deadline => {
                tracing::warn!(grace_s = DRAIN_TIMEOUT.as_secs(), "agent requests still open after the grace period; ending them");
                // Calls still in flight now end with an error naming the shutdown; give those
                // answers a moment to reach their agents.
                state.stop.cancel();
                let _ = tokio::time::timeout(FINAL_FLUSH, &mut agent_server).await;
            }
        }
        let result = Ok(());
        // In-flight calls have finished or now end with an error naming the shutdown.
        state.stop.cancel();
        let _ = tokio::join!(quic, https, sweeper);
        // Every answer is out or ended: the last records are in; sign and close the trail.
        state.calls.close().await;
        if let Some(admin) = admin_server {
            let _ = admin.await;
        }
        result
    }
}

/// Limits failed authentication per remote address: an address out of attempts gets `429`
/// with `Retry-After` before its request is looked at; every `401` answered counts one failure.
/// Also refreshes a fetched JWKS before a token naming an unknown key is checked.
async fn limit_auth_failures(
    axum::extract::State(state): axum::extract::State<Arc<RelayState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let governance = state.governance();
    if let Err(limited) = governance
        .limiter
        .auth_allowed(peer.ip(), std::time::Instant::now())
    {
        tracing::info!(peer = %peer.ip(), ?limited, "authentication attempts limited");
        metrics::counter!(crate::metrics::REQUESTS, "outcome" => "rate_limited").increment(1);
        return reply::AgentError::RateLimited(limited).into_response();
    }
    // A JWT naming a key its provider's fetched JWKS lacks waits here (the gate itself is
    // synchronous) for the JWKS to be fetched again, as the on-demand rate allows.
    if let Some(token) = agent::bearer_jwt(request.headers()) {
        governance.keyring.jwt().refresh_for(token).await;
    }
    let response = next.run(request).await;
    if response.status() == axum::http::StatusCode::UNAUTHORIZED {
        governance
            .limiter
            .auth_failed(peer.ip(), std::time::Instant::now());
    }
    response
}

/// Disables Nagle's algorithm on an accepted connection: answers are written in several small
/// pieces (headers, SSE events), and Nagle plus the peer's delayed ACK would hold each one for
/// up to 40 ms.
pub fn no_delay(tcp: &mut TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
}

/// Folds recorded histogram samples into their buckets now and then, so memory stays bounded
/// between scrapes.
async fn metrics_upkeep(stop: CancellationToken) {
    let Some(handle) = crate::metrics::prometheus() else {
        return;
    };
    let mut tick = tokio::time::interval(crate::metrics::UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => handle.run_upkeep(),
            _ = stop.cancelled() => return,
        }
    }
}

async fn sweep_sessions(state: Arc<RelayState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        state.sweep_sessions().await;
    }
}

impl RelayState {
    /// Ends the sessions that are idle past `session_idle_secs`, whose tunnel stream ended, or
    /// (HTTP+SSE) whose agent did not initialize within `request_timeout_secs`; returns how
    /// many. The relay does this every 30 s.
    pub async fn sweep_sessions(&self) -> usize {
        let expired = self
            .sessions
            .sweep(self.session_idle(), self.request_timeout());
        for session in &expired {
            tracing::info!(session = %session.id, tenant = %session.tenant, "session expired");
            session.channel.close("session expired").await;
        }
        expired.len()
    }
}
