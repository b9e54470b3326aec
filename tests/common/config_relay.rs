//! A relay started from a config file, as an operator runs it: dev certificates and a
//! `relay.toml` in a temporary directory, then the relay bound in this process or the
//! `mcp-tunnel relay` binary spawned and awaited on its "relay listening" line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mcp_tunnel::certs::DevCerts;
use mcp_tunnel::client::ClientSettings;
use mcp_tunnel::config::{SourceConfig, TransportChoice};
use mcp_tunnel::govern::{Identity, SecretHash};
use mcp_tunnel::relay::reload::{LoadedConfig, Reloader};
use mcp_tunnel::relay::{Relay, RelaySettings, RelayState};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Peer;

/// The head of a relay config: the tunnel (with the dev certificates [`cert_dir`] writes) and
/// the agent listener, both on loopback ports the OS picks. Keys of `[agents]` may follow.
pub const LISTENERS: &str = r#"[tunnel]
listen = "127.0.0.1:0"
cert = "relay.pem"
key = "relay.key"

[agents]
listen = "127.0.0.1:0"
"#;

/// The identity provider the tests' relay configs trust, and the public URL they give the relay.
pub const ISSUER: &str = "https://idp.example.test";
pub const PUBLIC_URL: &str = "https://relay.example.test";

/// A relay config of [`LISTENERS`] with `public_url`, then `tenants` (TOML), then one
/// `[[identity_providers]]` of [`ISSUER`] with its JWKS at `jwks` (a `jwks_file` or `jwks_url`
/// line), `tenant_claim = "tenant"`, then `extra` lines of the provider.
pub fn provider_config(public_url: &str, tenants: &str, jwks: &str, extra: &str) -> String {
    format!(
        r#"{LISTENERS}public_url = "{public_url}"
{tenants}
[[identity_providers]]
issuer = "{ISSUER}"
{jwks}
tenant_claim = "tenant"
{extra}
"#
    )
}

/// The `[[tenants]]` block of tenant `acme` with the tunnel token `token` and one agent key,
/// `api_key`, of subject `agent@acme.example` (no roles: everything is allowed).
pub fn acme_tenant(token: &str, api_key: &str) -> String {
    tenant_block(token, "", &[("agent@acme.example", api_key, &[])], &[])
}

/// The `[[tenants]]` block of tenant `acme` with the tunnel token `token`, then `head` (more
/// TOML lines of the tenant itself, each ending in a newline; may be empty), then a
/// `[[tenants.keys]]` per `keys` (subject, secret, roles: none means everything is allowed)
/// and a `[[tenants.roles]]` per `roles` (name, allowed tool patterns).
pub fn tenant_block(
    token: &str,
    head: &str,
    keys: &[(&str, &str, &[&str])],
    roles: &[(&str, &[&str])],
) -> String {
    let mut toml = format!(
        "\n[[tenants]]\nname = \"acme\"\ntunnel_tokens = [\"{}\"]\n{head}",
        SecretHash::of(token)
    );
    for (subject, key, key_roles) in keys {
        toml += &format!("\n[[tenants.keys]]\nsubject = \"{subject}\"\n");
        if !key_roles.is_empty() {
            toml += &format!("roles = {key_roles:?}\n");
        }
        toml += &format!("key = \"{}\"\n", SecretHash::of(key));
    }
    for (name, allow) in roles {
        toml += &format!("\n[[tenants.roles]]\nname = \"{name}\"\nallow = {allow:?}\n");
    }
    toml
}

/// A temporary directory holding dev certificates under the names a relay config uses
/// (`relay.pem`, `relay.key`, `ca.pem`); returns it and the certificates.
pub fn cert_dir() -> (tempfile::TempDir, DevCerts) {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = mcp_tunnel::certs::generate(&[]).expect("dev certificates");
    mcp_tunnel::certs::write(dir.path(), &certs, false).expect("write certificates");
    (dir, certs)
}

/// Writes `text` as `relay.toml` in `dir`; returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).expect("write relay.toml");
    path
}

/// Settings of a `connect` for `token` serving `sources` (name, URL) through the relay at
/// `tunnel`, trusting `ca_pem`: QUIC with one connection, so stream counts stay on one row.
pub fn quic_settings(
    tunnel: impl ToString,
    token: &str,
    ca_pem: &str,
    sources: &[(&str, &str)],
) -> ClientSettings {
    let sources = sources
        .iter()
        .map(|(name, url)| {
            SourceConfig::parse_flag(&format!("{name}={url}")).expect("valid source")
        })
        .collect();
    let mut settings = ClientSettings::new(tunnel.to_string(), token.to_owned(), sources);
    settings.ca_pem = Some(ca_pem.to_owned());
    settings.transport = TransportChoice::Quic;
    settings.connections = 1;
    settings
}

/// The identity an API key stands for: `subject` of `tenant` holding `roles`.
pub fn identity(tenant: &str, subject: &str, roles: &[&str]) -> Identity {
    Identity {
        tenant: tenant.into(),
        subject: subject.into(),
        roles: roles
            .iter()
            .map(|r| (*r).to_owned())
            .collect::<Vec<_>>()
            .into(),
    }
}

/// A relay bound in this process from a config file, serving until its token is cancelled.
pub struct FileRelay {
    pub state: Arc<RelayState>,
    pub agents: SocketAddr,
    pub tunnel: SocketAddr,
    /// The serving task: it ends once the token is cancelled, and panics if serving fails.
    pub served: JoinHandle<()>,
}

impl FileRelay {
    /// Loads the config at `path`, binds the relay and serves it until `shutdown`; returns it
    /// and the loaded config (for a `Reloader`).
    pub async fn serve(path: &Path, shutdown: &CancellationToken) -> (Self, LoadedConfig) {
        let loaded = LoadedConfig::load(path).expect("the config loads");
        let relay = Relay::bind(RelaySettings::from_config(&loaded.config).expect("settings"))
            .await
            .expect("the relay binds");
        let (state, agents, tunnel) = (
            relay.state().clone(),
            relay.agents_addr(),
            relay.tunnel_addr(),
        );
        let shutdown = shutdown.clone();
        let served =
            tokio::spawn(async move { relay.serve(shutdown).await.expect("relay serves") });
        let this = Self {
            state,
            agents,
            tunnel,
            served,
        };
        (this, loaded)
    }

    /// Spawns a `connect` for `token`, trusting `ca_pem`, serving `sources` (name, URL) through
    /// this relay over QUIC until `shutdown`; returns its task once every source's tunnel is up
    /// for tenant `acme`.
    pub async fn connect(
        &self,
        token: &str,
        ca_pem: &str,
        sources: &[(&str, &str)],
        shutdown: CancellationToken,
    ) -> JoinHandle<Result<(), mcp_tunnel::client::ClientError>> {
        let settings = quic_settings(self.tunnel, token, ca_pem, sources);
        let connect = tokio::spawn(mcp_tunnel::client::run(settings, shutdown));
        for (source, _) in sources {
            tokio::time::timeout(super::WAIT, self.state.registry.wait_for("acme", source))
                .await
                .expect("tunnel up");
        }
        connect
    }
}

/// The `mcp-tunnel relay --config` binary, up: it printed its listening line.
pub struct RelayProcess {
    /// The process (killed by its PID on drop or [`Peer::stop`]), its output.
    pub peer: Peer,
    pub tunnel: SocketAddr,
    pub agents: SocketAddr,
}

impl RelayProcess {
    /// Spawns the relay on the config at `path` (`RUST_LOG=info`) and waits (bounded) for
    /// "relay listening"; reads the tunnel and agent addresses off that line.
    pub async fn start(path: &Path) -> Self {
        let mut peer = Peer::start(
            "relay",
            tokio::process::Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"))
                .arg("relay")
                .arg("--config")
                .arg(path)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1"),
        );
        let listening = peer
            .wait_for_line("\"relay listening\"", |l| l.contains("relay listening"))
            .await;
        let (tunnel, agents) = (field(&listening, "tunnel"), field(&listening, "agents"));
        Self {
            peer,
            tunnel,
            agents,
        }
    }

    /// Waits (bounded) for the next line containing `text` and returns it.
    pub async fn wait_for(&mut self, text: &str) -> String {
        self.peer
            .wait_for_line(&format!("{text:?}"), |l| l.contains(text))
            .await
    }
}

/// The address after `key=` on a log line (quoted or not).
pub fn field(line: &str, key: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .and_then(|value| value.trim_matches('"').parse().ok())
        .unwrap_or_else(|| panic!("no {key}=ADDR in {line:?}"))
}

/// `mcp-tunnel connect --relay TUNNEL --ca CA --token TOKEN`, more arguments to follow.
pub fn connect_command(tunnel: SocketAddr, ca: &Path, token: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"));
    command
        .arg("connect")
        .arg("--relay")
        .arg(tunnel.to_string())
        .arg("--ca")
        .arg(ca)
        .arg("--token")
        .arg(token);
    command
}

/// `command` (a `connect`) with `flags`, then serving one source (name, URL), logging at `log`
/// without colours, for a test to read its lines.
pub fn serving_one<'a>(
    command: &'a mut tokio::process::Command,
    flags: [&str; 2],
    (name, url): (&str, &str),
    log: &str,
) -> &'a mut tokio::process::Command {
    command
        .args(flags)
        .arg("--source")
        .arg(format!("{name}={url}"))
        .env("RUST_LOG", log)
        .env("NO_COLOR", "1")
}

/// The relay binary up on a config of tenant `acme` (a fresh tunnel token and API key) in a
/// temporary directory with dev certificates, their CA written as `tunnel-ca.pem` for
/// `connect --ca`.
pub struct AcmeRelay {
    pub dir: tempfile::TempDir,
    pub certs: DevCerts,
    pub tunnel_token: String,
    pub api_key: String,
    /// The CA file for `connect --ca`.
    pub ca: PathBuf,
    pub relay: RelayProcess,
}

impl AcmeRelay {
    /// Writes `LISTENERS`, then `extra` (whole sections, such as `[admin]`), then acme's
    /// tenant block as `relay.toml`, and starts the relay binary on it.
    pub async fn start(extra: &str) -> Self {
        let (dir, certs) = cert_dir();
        let tunnel_token = mcp_tunnel::govern::identity::new_secret("mcpt_tok_");
        let api_key = mcp_tunnel::govern::identity::new_secret("mcpt_key_");
        let config = write_config(
            dir.path(),
            &format!(
                "{LISTENERS}\n{extra}{}",
                acme_tenant(&tunnel_token, &api_key)
            ),
        );
        let relay = RelayProcess::start(&config).await;
        let ca = dir.path().join("tunnel-ca.pem");
        std::fs::write(&ca, &certs.ca_pem).expect("write the CA");
        Self {
            dir,
            certs,
            tunnel_token,
            api_key,
            ca,
            relay,
        }
    }

    /// `connect` to this relay with acme's tunnel token, more arguments to follow.
    pub fn connect_command(&self) -> tokio::process::Command {
        connect_command(self.relay.tunnel, &self.ca, &self.tunnel_token)
    }
}

/// A relay bound in this process from `relay.toml` in a temporary directory with dev
/// certificates, its reloader at hand, and a `connect` with a tunnel token serving each of its
/// sources from one demo upstream. Stops when dropped.
pub struct ReloadableRelay {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub state: Arc<RelayState>,
    pub agents: SocketAddr,
    /// The reloader, until a test hands it to a watcher.
    pub reloader: Option<Reloader>,
    /// Stops the relay.
    pub shutdown: CancellationToken,
    /// Stops the `connect` and the upstream.
    _connect: tokio_util::sync::DropGuard,
}

impl Drop for ReloadableRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl ReloadableRelay {
    /// Writes `text` as `relay.toml`, serves it, and runs a `connect` with `token` serving each
    /// of `sources`; returns once tenant acme's first source is routed.
    pub async fn start(token: &str, text: &str, sources: &[&str]) -> Self {
        super::init_tracing();
        let (dir, certs) = cert_dir();
        let path = write_config(dir.path(), text);
        let shutdown = CancellationToken::new();
        let (relay, loaded) = FileRelay::serve(&path, &shutdown).await;
        let (state, agents, tunnel) = (relay.state, relay.agents, relay.tunnel);
        let reloader = Reloader::new(&path, state.clone(), loaded);
        let connect = CancellationToken::new();
        let upstream = super::demo_upstream(&connect).await;
        let sources: Vec<(&str, &str)> = sources.iter().map(|s| (*s, upstream.as_str())).collect();
        let settings = quic_settings(tunnel, token, &certs.ca_pem, &sources);
        tokio::spawn(mcp_tunnel::client::run(settings, connect.child_token()));
        tokio::time::timeout(super::WAIT, state.registry.wait_for("acme", sources[0].0))
            .await
            .expect("the tunnel comes up");
        Self {
            dir,
            path,
            state,
            agents,
            reloader: Some(reloader),
            shutdown,
            _connect: connect.drop_guard(),
        }
    }

    /// The agent URL of `source`.
    pub fn url(&self, source: &str) -> String {
        format!("http://{}/mcp/{source}", self.agents)
    }

    /// Rewrites `relay.toml`.
    pub fn write(&self, text: &str) {
        std::fs::write(&self.path, text).expect("rewrite relay.toml");
    }

    pub fn reloader(&mut self) -> &mut Reloader {
        self.reloader
            .as_mut()
            .expect("the reloader is not handed to a watcher")
    }

    /// Rewrites the file and reloads it, which must fail (`why` says why it must); returns the
    /// error.
    pub async fn reload_refused(&mut self, text: &str, why: &str) -> String {
        self.write(text);
        self.reloader().reload().await.expect_err(why).to_string()
    }

    /// Rewrites the file and reloads it, which must succeed without needing a restart.
    pub async fn reload_cleanly(&mut self, text: &str) {
        self.write(text);
        let summary = self.reloader().reload().await.expect("the file reloads");
        assert!(summary.restart_needed.is_empty(), "{summary:?}");
    }
}
