//! `connect`'s configuration file and its `--source` flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    ConfigError, DEFAULT_MAX_ANSWER_BYTES, DEFAULT_MAX_MESSAGE_BYTES, parse_file,
    validate_source_name,
};

/// Default `connections`: connections held at once; with two, losing one loses no new session.
pub const DEFAULT_CONNECTIONS: usize = 2;
/// Default `probe_interval_secs`: how often `connect` on the HTTPS fallback tries QUIC again.
pub const DEFAULT_PROBE_INTERVAL_SECS: u64 = 30;
/// Default `stdio_max_processes`: processes one stdio source runs at once (one per agent
/// session, plus the pooled process of stateless requests). Each child is a whole MCP server
/// (often a Node or Python runtime of 50-100 MB), so an unbounded number of sessions would let
/// agents exhaust the memory and process table of the host `connect` runs on; 64 concurrent
/// sessions per source is ample for a private server and small enough to stay safe on a modest
/// machine.
pub const DEFAULT_STDIO_MAX_PROCESSES: usize = 64;
/// Default `session_idle_secs`: time an upstream session lives with no stream carrying it (a
/// relay may resume it meanwhile), and a stdio session's process with no message either way and
/// no request in flight. Clients that never end their sessions (no DELETE: mcp-remote, the
/// TypeScript SDK's `Client.close()`) would otherwise hold a process each for the relay's whole
/// session idle time (30 min), and a few restarts would use up the source's cap.
pub const DEFAULT_CONNECT_SESSION_IDLE_SECS: u64 = 5 * 60;

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
    /// The relay as HOST:PORT, or several separated by commas; every relay, and every address
    /// a relay name resolves to, gets at least one connection.
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
    /// Seconds an upstream session is kept with no tunnel stream carrying it, for a relay of
    /// the fleet to resume it (a relay restarted, the agent's next request reached another
    /// relay, the tunnel dropped); and seconds a stdio session's process lives with no message
    /// from its agent and no request in flight. Then it is ended (an HTTP session DELETEd, a
    /// process stopped) and the agent's next call is told so. 0: never. `stdio_idle_secs` is
    /// the earlier name.
    #[serde(default = "default_session_idle_secs", alias = "stdio_idle_secs")]
    pub session_idle_secs: u64,
}

fn default_stdio_max_processes() -> usize {
    DEFAULT_STDIO_MAX_PROCESSES
}

fn default_session_idle_secs() -> u64 {
    DEFAULT_CONNECT_SESSION_IDLE_SECS
}

fn default_max_message() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}

fn default_connections() -> usize {
    DEFAULT_CONNECTIONS
}

fn default_probe_interval() -> u64 {
    DEFAULT_PROBE_INTERVAL_SECS
}

fn default_max_answer() -> usize {
    DEFAULT_MAX_ANSWER_BYTES
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
