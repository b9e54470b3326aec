//! `mcp-tunnel demo`: relay, connect and the built-in MCP server in one process on loopback,
//! with certificates and credentials made on the fly.
//!
//! The MCP server is [`lean`], built for speed; [`tools`] says what its tools do (the tests run
//! the same tools on the rmcp SDK as a reference server).

pub mod lean;
pub mod tools;

use std::net::SocketAddr;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio_util::sync::CancellationToken;

use crate::client::{self, ClientSettings};
use crate::config::{LimitsSection, SourceConfig, SourceTarget};
use crate::govern::identity::new_secret;
use crate::govern::{Identity, Keyring, Policy, SecretHash};
use crate::relay::{Governance, Relay, RelaySettings};
use crate::transport::tls;

/// The demo's tenant.
pub const TENANT: &str = "demo";
/// The demo's source name: agents use `/mcp/demo`.
pub const SOURCE: &str = "demo";
/// Time the tunnel has to come up before the demo gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The agent address the demo prefers (the one the README's examples use).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    8080,
));
/// After shutdown, how long the relay gets to drain and close its audit trail before the demo's
/// folder is removed anyway (the relay's own grace period is 10 s, then 2 s for the last
/// answers).
const FINISH_TIMEOUT: Duration = Duration::from_secs(15);

/// A running demo.
pub struct Demo {
    /// The agent endpoint URL of the demo source.
    pub agent_url: String,
    /// An API key for it.
    pub api_key: String,
    /// The admin endpoint.
    pub admin_url: String,
    /// The audit trail's SQLite file (in [`Demo::folder`], removed by [`Demo::finish`]).
    pub audit_db: std::path::PathBuf,
    /// The built-in server, reached directly (no tunnel).
    pub upstream_url: String,
    /// Set when the default address was taken and the agents got a free port instead.
    pub default_taken: bool,
    folder: TempFolder,
    relay: tokio::task::JoinHandle<()>,
}

impl Demo {
    /// The demo's temporary folder (audit database and signing key).
    pub fn folder(&self) -> &std::path::Path {
        &self.folder.0
    }

    /// After `shutdown`: waits (bounded) for the relay to drain and close its audit trail,
    /// then removes the demo's temporary folder.
    pub async fn finish(self) {
        if tokio::time::timeout(FINISH_TIMEOUT, self.relay)
            .await
            .is_err()
        {
            tracing::warn!("the demo relay did not stop in time; removing its folder anyway");
        }
        drop(self.folder);
    }
}

/// A temporary folder, removed (with everything in it) when dropped: also when the demo fails
/// to start.
struct TempFolder(std::path::PathBuf);

impl TempFolder {
    /// A fresh folder under the system's temporary directory.
    fn create() -> std::io::Result<Self> {
        let name = format!(
            "mcp-tunnel-demo-{}-{}",
            std::process::id(),
            new_secret("").get(..8).unwrap_or_default()
        );
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir(&path)?;
        Ok(Self(path))
    }
}

impl Drop for TempFolder {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Ok(()) => tracing::debug!(folder = %self.0.display(), "demo folder removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(folder = %self.0.display(), error = %e, "could not remove the demo folder")
            }
        }
    }
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The agent address asked for with `--listen` is unusable.
    #[error("cannot listen on {addr} ({error}); pick another address with --listen")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why (in the message, not a separate cause: the error is one line).
        error: std::io::Error,
    },
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Starts the demo with agents on `listen`, or when `None` on [`DEFAULT_LISTEN`] if it is free
/// and on a free loopback port if not; runs until `shutdown`, then call [`Demo::finish`].
pub async fn start(
    listen: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> Result<Demo, DemoError> {
    match start_on(listen.unwrap_or(DEFAULT_LISTEN), shutdown.clone()).await {
        Err(DemoError::Listen { addr, error })
            if listen.is_none() && error.kind() == std::io::ErrorKind::AddrInUse =>
        {
            tracing::info!(%addr, "the demo's default address is taken; using a free port");
            let mut demo = start_on(
                "127.0.0.1:0".parse().map_err(anyhow::Error::from)?,
                shutdown,
            )
            .await?;
            demo.default_taken = true;
            Ok(demo)
        }
        other => other,
    }
}

async fn start_on(listen: SocketAddr, shutdown: CancellationToken) -> Result<Demo, DemoError> {
    // The agent address first: the one bind that may fail for a reason the user can fix.
    drop(
        std::net::TcpListener::bind(listen).map_err(|error| DemoError::Listen {
            addr: listen,
            error,
        })?,
    );
    Ok(start_inner(listen, shutdown).await?)
}

async fn start_inner(listen: SocketAddr, shutdown: CancellationToken) -> anyhow::Result<Demo> {
    let upstream = lean::serve(
        "127.0.0.1:0".parse()?,
        lean::Answers::Json,
        shutdown.clone(),
    )
    .await?;
    let upstream_url = format!("http://{upstream}/mcp");

    let certs = crate::certs::generate(&[])?;
    let token = new_secret("mcpt_tok_");
    let api_key = new_secret("mcpt_key_");
    let mut keyring = Keyring::default();
    keyring.add_tunnel_token(SecretHash::of(&token), TENANT.into());
    keyring.add_api_key(
        SecretHash::of(&api_key),
        Identity {
            tenant: TENANT.into(),
            subject: "demo@localhost".into(),
            roles: Vec::new().into(),
        },
    );
    // The audit trail (and its signing key) go to a fresh folder under the system's temporary
    // directory, removed when the demo ends.
    let folder = TempFolder::create()?;
    let audit_db = folder.0.join("audit.db");
    let relay = Relay::bind(RelaySettings {
        tunnel_listen: "127.0.0.1:0".parse()?,
        identity: tls::Identity::from_pem(&certs.relay_pem, &certs.relay_key)?,
        agents_listen: listen,
        admin_listen: Some("127.0.0.1:0".parse()?),
        governance: Governance {
            keyring,
            policy: Policy::default(),
            limiter: Default::default(),
            limits: LimitsSection::default(),
        },
        limits: LimitsSection::default(),
        allowed_origins: Vec::new(),
        allowed_hosts: Vec::new(),
        sse_keep_alive: std::time::Duration::from_secs(crate::config::DEFAULT_SSE_KEEP_ALIVE_SECS),
        audit: Some(crate::govern::audit::AuditSettings::new(&audit_db)),
        fleet: Default::default(),
    })
    .await?;
    let agents = relay.agents_addr();
    let admin = relay.admin_addr().expect("the demo always enables admin");
    let tunnel = relay.tunnel_addr();
    let state = relay.state().clone();
    let relay_shutdown = shutdown.clone();
    let relay = tokio::spawn(async move {
        if let Err(e) = relay.serve(relay_shutdown).await {
            tracing::error!(error = %e, "demo relay failed");
        }
    });

    let mut settings = ClientSettings::new(
        tunnel.to_string(),
        token,
        vec![SourceConfig {
            name: SOURCE.into(),
            target: SourceTarget::Http(upstream_url.clone()),
            follow_cross_origin_redirects: false,
        }],
    );
    settings.ca_pem = Some(certs.ca_pem);
    let client_shutdown = shutdown.clone();
    tokio::spawn(async move {
        if let Err(e) = client::run(settings, client_shutdown).await {
            tracing::error!(error = %e, "demo connect failed");
        }
    });
    tokio::time::timeout(READY_TIMEOUT, state.registry.wait_for(TENANT, SOURCE))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the demo tunnel did not come up within {} s",
                READY_TIMEOUT.as_secs()
            )
        })?;
    Ok(Demo {
        agent_url: format!("http://{agents}/mcp/{SOURCE}"),
        api_key,
        admin_url: format!("http://{admin}"),
        audit_db,
        upstream_url,
        default_taken: false,
        folder,
        relay,
    })
}

/// Serves `router` on `addr` until `shutdown` (a demo MCP server: the built-in one, or the
/// tests' rmcp one); returns the bound address once it accepts connections.
pub async fn spawn_server(
    addr: SocketAddr,
    router: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener.tap_io(crate::relay::no_delay), router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "demo MCP server failed");
        }
    });
    Ok(bound)
}
