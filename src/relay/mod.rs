//! `mcp-tunnel relay`: terminates tunnels and serves agents.
//!
//! [`Relay::bind`] opens every listener (so tests can bind port 0 and read the addresses back);
//! [`Relay::serve`] runs until the shutdown token fires.

mod admin;
mod agents;
mod calls;
#[cfg(test)]
mod config_tests;
pub mod fleet;
mod governance;
mod http_server;
mod listener_limits;
pub mod reload;
mod session;
mod state;
mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{LimitsSection, RelayConfig};
use crate::govern::audit::AuditSettings;
use crate::transport::{TransportError, quic, tls};
use listener_limits::ListenerLimits;
use session::Sessions;
use tunnel::Registry;
use tunnel::accept::{self, Admission};

pub use calls::activity::{Activity, LATENCY_WINDOW, MAX_STATS_KEYS};
pub use governance::{Governance, build as build_governance, load_config, trust_warnings};
pub use http_server::no_delay;
pub use session::parse_event_id;
pub use state::{RelayState, Startup};
pub use tunnel::TunnelRow;

/// After shutdown, how long open agent requests may take to finish before the relay stops
/// anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a relay of a fleet (one with a `[fleet]` section) reports itself unready after it
/// starts, unless a tunnel registers first: `/healthz` answers `503 starting`, and an agent
/// request for a source no tunnel reaches here yet gets `503` with `Retry-After: 1` instead of
/// the `404` of an unknown source, so a load balancer sends a restarted relay nothing before
/// its `connect`s are back. A `connect` reconnects at once when its relay goes, and within a few
/// seconds of backoff when the relay was down for a while: 10 s covers that, and bounds how
/// long a fleet with no `connect` at all (being set up) stays unhealthy.
pub const STARTUP_WINDOW: Duration = Duration::from_secs(10);

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
    /// The audit trail could not be opened.
    #[error(transparent)]
    Audit(#[from] crate::govern::audit::AuditError),
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
    /// This relay's place in a fleet.
    pub fleet: FleetSettings,
}

/// This relay's place in a fleet (`[fleet]`). The default is a single relay: its id derived
/// from the host name and tunnel port, and no drain delay.
#[derive(Debug, Clone, Default)]
pub struct FleetSettings {
    /// This instance's id (`[fleet] id`); `None`: derived, see
    /// [`crate::govern::audit::relay_instance`].
    pub id: Option<String>,
    /// Once told to stop, how long the relay reports itself unready (`/healthz` 503) while it
    /// still serves agents, each response with `Connection: close`, before it drains.
    pub drain_delay: Duration,
    /// The keys that seal session ids: the fleet's (`[fleet] secret_file`), or this relay's
    /// own.
    pub keys: Arc<fleet::FleetKeys>,
    /// After it starts, how long the relay reports itself unready until a tunnel registers
    /// (see [`STARTUP_WINDOW`], the value with `[fleet]`); zero, the default, for a single
    /// relay: ready at once.
    pub startup_window: Duration,
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
            fleet: FleetSettings {
                id: config.fleet.as_ref().and_then(|f| f.id.clone()),
                drain_delay: Duration::from_secs(config.drain_delay_secs()),
                keys: Arc::new(fleet_keys(config)?),
                startup_window: if config.fleet.is_some() {
                    STARTUP_WINDOW
                } else {
                    Duration::ZERO
                },
            },
        })
    }
}

/// The fleet's keys from `[fleet] secret_file`, or a secret of this relay's own.
fn fleet_keys(config: &RelayConfig) -> Result<fleet::FleetKeys, RelayError> {
    match config.fleet.as_ref() {
        Some(crate::config::FleetSection {
            secret_file: Some(secret),
            accepted_secret_files,
            ..
        }) => fleet::FleetKeys::load(secret, accepted_secret_files)
            .map_err(|e| RelayError::Config(e.to_string())),
        _ => Ok(fleet::FleetKeys::standalone()),
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
    drain_delay: Duration,
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
        // The one place the instance id is computed: the audit trail's chains, the admin
        // endpoints and the metrics all name it.
        let instance = crate::govern::audit::relay_instance(
            settings.fleet.id.as_deref(),
            settings.tunnel_listen.port(),
        );
        let auditor = settings
            .audit
            .clone()
            .map(|mut audit| {
                audit.relay_id.get_or_insert_with(|| instance.clone());
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
        let activity = Arc::new(calls::Activity::default());
        let calls = Arc::new(calls::Calls::new(auditor, activity.clone()));
        calls.metric_names().configure(&governance.policy);
        let state = Arc::new(RelayState {
            instance: instance.into(),
            governance: parking_lot::RwLock::new(Arc::new(governance)),
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
            fleet: settings.fleet.keys.clone(),
            spent_states: Default::default(),
            task_owners: Default::default(),
            starting: state::Startup::new(settings.fleet.startup_window),
            unready: CancellationToken::new(),
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
            drain_delay: settings.fleet.drain_delay,
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

    /// Serves until `shutdown` is cancelled, then stops in three phases: unready (`/healthz`
    /// answers 503 while agents are still served, for the drain delay), draining (tunnels
    /// told, no new agent requests, calls in flight get [`DRAIN_TIMEOUT`]), stopped.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        let state = self.state;
        tracing::info!(
            relay = %state.instance,
            tunnel = %self.endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            agents = %self.agents.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "relay listening (QUIC on UDP and HTTPS on TCP at the tunnel address)"
        );
        let draining = state.shutdown.clone();
        tokio::spawn({
            let (unready, draining) = (state.unready.clone(), draining.clone());
            let delay = self.drain_delay;
            async move {
                shutdown.cancelled().await;
                unready.cancel();
                if !delay.is_zero() {
                    tracing::info!(
                        delay_s = delay.as_secs(),
                        "unready: /healthz answers 503; agents still served until the drain delay ends"
                    );
                    tokio::time::sleep(delay).await;
                }
                tracing::info!(
                    grace_s = DRAIN_TIMEOUT.as_secs(),
                    "draining: tunnels told, no new requests accepted"
                );
                draining.cancel();
            }
        });
        let bounds = ListenerLimits::from(&state.limits);
        let admission = Admission::new(&bounds);
        let quic = tokio::spawn(accept::serve_quic(
            self.endpoint,
            state.clone(),
            admission.clone(),
            draining.clone(),
        ));
        let https = tokio::spawn(accept::serve_https(
            self.tunnel_tcp,
            self.tls_acceptor,
            state.clone(),
            admission,
            draining.clone(),
        ));
        let sweeper = tokio::spawn(sweep_sessions(state.clone(), draining.clone()));
        let agent_app = agents::app(state.clone());
        let agent_server = http_server::serve(
            self.agents,
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
        let admin_server = self.admin.map(|listener| {
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
