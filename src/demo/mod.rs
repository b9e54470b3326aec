//! `mcp-tunnel demo`: relay, connect and the built-in MCP server in one process on loopback,
//! with certificates and credentials made on the fly.
//!
//! The MCP server is [`lean`], built for speed; [`upstream`] is the same tools on the rmcp SDK,
//! which the tests use as a reference server.

pub mod lean;
pub mod upstream;

use std::net::SocketAddr;
use std::time::Duration;

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

/// A running demo.
pub struct Demo {
    /// The agent endpoint URL of the demo source.
    pub agent_url: String,
    /// An API key for it.
    pub api_key: String,
    /// The admin endpoint.
    pub admin_url: String,
    /// The audit trail's SQLite file.
    pub audit_db: std::path::PathBuf,
    /// The built-in server, reached directly (no tunnel).
    pub upstream_url: String,
}

/// Starts the demo with agents on `listen`; runs until `shutdown`.
pub async fn start(listen: SocketAddr, shutdown: CancellationToken) -> anyhow::Result<Demo> {
    let upstream = lean::serve("127.0.0.1:0".parse()?, shutdown.clone()).await?;
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
    // The audit trail goes to a fresh folder under the system's temporary directory, kept after
    // the demo ends so that `audit verify` and `audit export` can be tried on it.
    let audit_dir = std::env::temp_dir().join(format!("mcp-tunnel-demo-{}", std::process::id()));
    std::fs::create_dir_all(&audit_dir)?;
    let audit_db = audit_dir.join("audit.db");
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
        audit: Some(crate::config::AuditSection::new(&audit_db)),
    })
    .await?;
    let agents = relay.agents_addr();
    let admin = relay.admin_addr().expect("the demo always enables admin");
    let tunnel = relay.tunnel_addr();
    let state = relay.state().clone();
    let relay_shutdown = shutdown.clone();
    tokio::spawn(async move {
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
    })
}
