//! A fleet of real processes on loopback, as issue 15 runs it: three `mcp-tunnel relay` binaries
//! of one fleet (one tenant, token and key; each its own agent, tunnel and admin port and its
//! own `[fleet] id`), HAProxy in front of their agent ports (round-robin, no stickiness, health
//! checks on each relay's admin `/healthz`, retries on connection failure only), two
//! `mcp-tunnel connect` binaries attached to all three relays, and a recording upstream
//! ([`super::recording`]) behind them. Load comes from `tests/peers/fleet_client.py`, the
//! official Python SDK ([`Fleet::load`]).
//!
//! Every process is stopped by its PID when its handle drops (SIGKILL, then reaped). Readiness
//! is always polled with a bound, never slept for.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::process::Command;
use tokio::time::Instant;

use super::recording::RecordingUpstream;
use super::{Peer, WAIT};

/// The source every `connect` of the fleet serves (the recording upstream).
pub const SOURCE: &str = "fleet";
/// The HAProxy backend, and the response header naming the relay that served a request.
pub const BACKEND: &str = "relays";
pub const RELAY_HEADER: &str = "x-fleet-relay";
/// Between two polls of a readiness condition.
const POLL: Duration = Duration::from_millis(50);
/// How often a bind on a port picked beforehand ([`super::free_port`]) is retried when another
/// process took the port in between.
const BIND_ATTEMPTS: usize = 5;

/// The shape of a fleet.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// Relays behind the load balancer.
    pub relays: usize,
    /// `connect` processes, each attached to every relay.
    pub connects: usize,
    /// How long the upstream takes over each tool call.
    pub upstream_latency: std::time::Duration,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            relays: 3,
            connects: 2,
            upstream_latency: std::time::Duration::ZERO,
        }
    }
}

/// A process of the fleet, killed by its PID and reaped when dropped.
pub struct Proc {
    pub peer: Peer,
}

impl Proc {
    /// Spawns `command` (output drained into `peer`).
    pub fn start(name: &'static str, command: &mut Command) -> Self {
        Self {
            peer: Peer::start(name, command.env("NO_COLOR", "1")),
        }
    }

    /// Its PID.
    pub fn pid(&self) -> i32 {
        self.peer.pid()
    }

    /// Sends `signal` by PID and waits (bounded by `WAIT`) for the process to exit.
    pub async fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        self.peer.signal(signal);
        self.peer.exit_status(Instant::now() + WAIT).await
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let child = &mut self.peer.child.0;
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let _ = child.start_kill();
        // Reap it: SIGKILL ends it at once; the bound only guards against a stuck kernel.
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < until {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One relay of the fleet: its config file and ports (fixed after its first start, so a
/// restart serves on the same ones), and its process while it runs.
pub struct FleetRelay {
    /// `relay-N`, its `[fleet] id` and its HAProxy server name.
    pub id: String,
    pub config: PathBuf,
    pub agents: SocketAddr,
    pub tunnel: SocketAddr,
    pub admin: SocketAddr,
    /// The process; `None` while stopped or killed.
    pub process: Option<Proc>,
}

impl FleetRelay {
    /// The admin URL of `path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The agent URL of the fleet's source on this relay directly (not through HAProxy).
    pub fn url(&self) -> String {
        format!("http://{}/mcp/{SOURCE}", self.agents)
    }
}

/// When a `kill -9` happened. The process dies between the two: until the kernel has torn it
/// down, its sockets still take connections and bytes (a request a load balancer hands it then
/// is lost with it), so a call can be in flight on it at any moment up to `reaped`.
#[derive(Clone, Copy, Debug)]
pub struct Killed {
    /// Just before the signal was sent.
    pub signalled: SystemTime,
    /// Once the process was reaped (gone).
    pub reaped: SystemTime,
}

impl Killed {
    async fn kill(mut process: Proc) -> Self {
        let signalled = SystemTime::now();
        process.signal_and_wait(libc::SIGKILL).await;
        Self {
            signalled,
            reaped: SystemTime::now(),
        }
    }
}

/// The relay config of relay `id`: listeners on `agents`, `tunnel` and `admin` (port 0 for
/// the OS to pick, the tunnel's and agents' are then read off the "relay listening" line), the
/// dev certificates of the fleet's directory, the fleet section, and tenant `tenant` (TOML).
pub fn relay_config(
    id: &str,
    agents: SocketAddr,
    tunnel: SocketAddr,
    admin: SocketAddr,
    tenant: &str,
) -> String {
    format!(
        r#"[tunnel]
listen = "{tunnel}"
cert = "relay.pem"
key = "relay.key"

[agents]
listen = "{agents}"

[admin]
listen = "{admin}"

[fleet]
id = "{id}"
drain_delay_secs = {RELAY_DRAIN_DELAY_SECS}
secret_file = "{FLEET_SECRET_FILE}"
{tenant}"#
    )
}

/// The relays' `[fleet] drain_delay_secs`: told to stop, a relay reports itself unready
/// (`/healthz` 503) and serves on for this long, so HAProxy marks it down before it stops
/// taking requests. HAProxy needs `fall` (2) failed checks, the first within `inter` (500 ms)
/// and the next `fastinter` (250 ms) later: about 0.75 s, plus a check's round trip; 2 s leaves
/// room on a loaded machine.
pub const RELAY_DRAIN_DELAY_SECS: u64 = 2;

/// The fleet secret's file in the fleet's directory (32 random bytes as hex, written by
/// [`Fleet::start_with`]).
pub const FLEET_SECRET_FILE: &str = "fleet.key";

/// HAProxy started by the test on loopback, in the foreground (`-db`), with its config in the
/// fleet's directory; killed by PID on drop.
pub struct Haproxy {
    pub config: PathBuf,
    /// The frontend agents use (plain HTTP).
    pub frontend: SocketAddr,
    /// The stats page (`/stats;csv`), to see what HAProxy thinks of each relay.
    pub stats: SocketAddr,
    pub process: Proc,
}

/// The HAProxy binary: `haproxy` on PATH, else Debian's `/usr/sbin/haproxy`.
pub fn haproxy_binary() -> PathBuf {
    let debian = PathBuf::from("/usr/sbin/haproxy");
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("haproxy"))
            .find(|candidate| candidate.is_file())
    });
    match on_path {
        Some(found) => found,
        None if debian.is_file() => debian,
        None => panic!("haproxy is not installed: run scripts/install-peers.sh (as root)"),
    }
}

/// The HAProxy config of the fleet: a frontend on `frontend`, a stats listener on `stats`, and
/// the backend of `relays` (name, agent address, admin address).
///
/// - round-robin, no stickiness (no cookie, no `balance source`, no `prefer-last-server`): every
///   request is balanced on its own;
/// - health checks `GET /healthz` on each relay's admin port, fast for tests (every 500 ms, down
///   after 2 failures, up after 2 successes). A relay answers 503 from SIGTERM on for its drain
///   delay ([`RELAY_DRAIN_DELAY_SECS`], longer than `fall` checks take), and again after it
///   starts until a `connect` has attached: so `rise 2` is not what keeps a restarted relay
///   out until it can serve (its `starting` answer is), it only asks for two good answers in
///   a row before traffic returns;
/// - `retries 2` with `retry-on conn-failure` only, and `option redispatch`: a request is sent
///   again (to another relay on the last retry) only when its connection failed, so never once a
///   relay may have received it (no `empty-response`, `response-timeout` or status retries);
/// - timeouts that let SSE streams live (`timeout server 60s`, `timeout tunnel 1h`);
/// - every response names its relay in `X-Fleet-Relay`, and every request is logged to stdout
///   (when `log_requests`), with its `X-Fleet-Call` header (the load client's call) captured.
pub fn haproxy_config(
    frontend: SocketAddr,
    stats: SocketAddr,
    relays: &[(&str, SocketAddr, SocketAddr)],
    log_requests: bool,
) -> String {
    let request_log = if log_requests { "" } else { "    no log\n" };
    let mut config = format!(
        r#"global
    log stdout format raw local0
    nbthread 1
    maxconn 4096

defaults
    mode http
    log global
    option httplog
    option redispatch
    retries 2
    retry-on conn-failure
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout queue 10s

frontend agents
    bind {frontend}
{request_log}    http-request capture req.hdr(x-fleet-call) len 64
    default_backend {BACKEND}

listen stats
    bind {stats}
    no log
    stats enable
    stats uri /stats
    stats refresh 1s

backend {BACKEND}
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    http-response set-header X-Fleet-Relay %[srv_name]
"#
    );
    for (name, agents, admin) in relays {
        config += &format!(
            "    server {name} {agents} check port {} inter 500ms fastinter 250ms downinter 500ms fall 2 rise 2\n",
            admin.port()
        );
    }
    config
}

impl Haproxy {
    /// Writes the config into `dir` and starts HAProxy on two free loopback ports (picked again
    /// should another process take one first); returns once it runs (the caller waits for
    /// its servers).
    pub async fn start(dir: &Path, relays: &[(&str, SocketAddr, SocketAddr)]) -> Self {
        Self::start_with(dir, relays, true).await
    }

    /// [`Haproxy::start`], logging each request only when `log_requests` (a benchmark's load
    /// balancer logs none: the lines would cost CPU and memory at thousands of calls a second).
    pub async fn start_with(
        dir: &Path,
        relays: &[(&str, SocketAddr, SocketAddr)],
        log_requests: bool,
    ) -> Self {
        let binary = haproxy_binary();
        let config = dir.join("haproxy.cfg");
        let mut last = String::new();
        for _ in 0..BIND_ATTEMPTS {
            let frontend = loopback(super::free_port());
            let stats = loopback(super::free_port());
            std::fs::write(
                &config,
                haproxy_config(frontend, stats, relays, log_requests),
            )
            .expect("write haproxy.cfg");
            let mut process = Proc::start(
                "haproxy",
                Command::new(&binary).arg("-f").arg(&config).arg("-db"),
            );
            // HAProxy prints nothing once it listens: the stats page answering says it does.
            let until = Instant::now() + WAIT;
            loop {
                if let Ok(Some(status)) = process.peer.child.0.try_wait() {
                    last = format!("haproxy exited ({status}):\n{}", process.peer.output());
                    break;
                }
                if stats_csv(stats).await.is_some() {
                    return Self {
                        config,
                        frontend,
                        stats,
                        process,
                    };
                }
                assert!(
                    Instant::now() < until,
                    "haproxy did not serve its stats page within {WAIT:?}; output:\n{}",
                    process.peer.output()
                );
                tokio::time::sleep(POLL).await;
            }
            if !last.contains("annot bind") {
                break;
            }
        }
        panic!("haproxy did not start: {last}");
    }

    /// HAProxy's view of each server of the backend: name to status (`UP`, `DOWN`, `MAINT`,
    /// `UP 1/2` while rising, ...).
    pub async fn server_status(&self) -> BTreeMap<String, String> {
        let csv = stats_csv(self.stats)
            .await
            .unwrap_or_else(|| panic!("haproxy's stats page answers ({})", self.stats));
        let mut lines = csv.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let column = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .unwrap_or_else(|| panic!("no {name} column in haproxy's CSV: {csv}"))
        };
        let (pxname, svname, status) = (column("pxname"), column("svname"), column("status"));
        lines
            .map(|line| line.split(',').collect::<Vec<_>>())
            .filter(|row| {
                row.get(pxname) == Some(&BACKEND)
                    && !matches!(row.get(svname), Some(&"BACKEND" | &"FRONTEND"))
            })
            .map(|row| (row[svname].to_owned(), row[status].to_owned()))
            .collect()
    }

    /// Waits (bounded) until HAProxy reports exactly `up` (server names) UP and every other
    /// server not UP.
    pub async fn wait_servers(&self, up: &[&str]) {
        let until = Instant::now() + WAIT;
        loop {
            let status = self.server_status().await;
            let matches = status
                .iter()
                .all(|(name, state)| (state == "UP") == up.contains(&name.as_str()));
            if matches && up.iter().all(|name| status.contains_key(*name)) {
                return;
            }
            assert!(
                Instant::now() < until,
                "haproxy did not see exactly {up:?} up within {WAIT:?}: {status:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Haproxy {
    /// What HAProxy printed but its log lines of requests that ended normally (`option
    /// httplog`, termination state `----`): requests aborted or refused with their status and
    /// termination state (`SD--`: the relay went away after the request was forwarded), servers
    /// going down and up, warnings. (HAProxy drops a log line rather than block on stdout.)
    pub fn unusual_requests(&self) -> Vec<String> {
        self.process
            .peer
            .output()
            .lines()
            .filter(|line| !line.contains(" ---- "))
            .map(str::to_owned)
            .collect()
    }
}

/// A request HAProxy logged (`option httplog`) that carried an `X-Fleet-Call` header.
#[derive(Clone, Debug)]
pub struct LoggedCall {
    /// The call's message (`PREFIX-sS-cN`).
    pub call: String,
    /// The relay that finally got the request (HAProxy's server name).
    pub server: String,
    /// HTTP status HAProxy logged (-1: none, the connection was closed).
    pub status: i32,
    /// Connection retries (`%rc`): failed attempts to reach a relay before this one.
    pub retries: u32,
    /// Whether a retry went to another relay (`+` before `%rc`).
    pub redispatched: bool,
    /// The termination state (`----` for a normal end).
    pub termination: String,
}

impl LoggedCall {
    /// Parses one `option httplog` line with one captured request header; `None` for other
    /// lines (or a request without the header).
    pub fn parse(line: &str) -> Option<Self> {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let capture = tokens
            .iter()
            .position(|t| t.starts_with('{') && t.ends_with('}'))?;
        let call = tokens[capture]
            .trim_start_matches('{')
            .trim_end_matches('}');
        if call.is_empty() || capture < 3 {
            return None;
        }
        let counters = tokens[capture - 2].rsplit('/').next()?;
        let server_at = tokens
            .iter()
            .position(|t| t.starts_with(&format!("{BACKEND}/")))?;
        Some(Self {
            call: call.to_owned(),
            server: tokens[server_at]
                .trim_start_matches(&format!("{BACKEND}/"))
                .to_owned(),
            status: tokens.get(server_at + 2)?.parse().ok()?,
            retries: counters.trim_start_matches('+').parse().ok()?,
            redispatched: counters.starts_with('+'),
            termination: tokens[capture - 3].to_owned(),
        })
    }
}

impl Haproxy {
    /// The requests HAProxy logged so far that carried an `X-Fleet-Call` header (HAProxy drops
    /// a log line rather than block on stdout, so a call may be missing).
    pub fn logged_calls(&self) -> Vec<LoggedCall> {
        self.process
            .peer
            .output()
            .lines()
            .filter_map(LoggedCall::parse)
            .collect()
    }
}

/// HAProxy's stats as CSV, or `None` when the page does not answer.
async fn stats_csv(stats: SocketAddr) -> Option<String> {
    let response = reqwest::Client::new()
        .get(format!("http://{stats}/stats;csv"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The fleet: three relays, HAProxy, two `connect`s, the recording upstream.
pub struct Fleet {
    // Fields drop in this order: the processes first (connects, HAProxy, relays), then the
    // upstream, then the directory they read, then the turn of the next fleet.
    /// The `connect`s; `None` while stopped or killed.
    pub connects: Vec<Option<Proc>>,
    pub haproxy: Haproxy,
    pub relays: Vec<FleetRelay>,
    pub upstream: RecordingUpstream,
    /// The agent API key (tenant `acme`, subject `agent@acme.example`, no roles).
    pub api_key: String,
    /// Another caller's API key (tenant `acme`, subject `other@acme.example`, no roles).
    pub other_key: String,
    pub tunnel_token: String,
    /// The CA the `connect`s trust.
    pub ca: PathBuf,
    /// The fleet secret's file (`fleet.key`, 32 random bytes as hex), named by every relay's config.
    pub fleet_secret: PathBuf,
    /// Dev certificates (`relay.pem`, `relay.key`, `ca.pem`), `fleet.key`, the relay configs
    /// (`relay-N.toml`) and `haproxy.cfg`.
    pub dir: tempfile::TempDir,
    /// Held while the fleet lives: fleets of one test binary run one at a time (each is ten
    /// processes on a small machine, and the kill tests measure timing). Dropped last.
    _serial: tokio::sync::OwnedMutexGuard<()>,
}

/// See [`Fleet::_serial`].
static SERIAL: std::sync::LazyLock<std::sync::Arc<tokio::sync::Mutex<()>>> =
    std::sync::LazyLock::new(Default::default);

impl Fleet {
    /// The default fleet: three relays, two `connect`s.
    pub async fn start() -> Self {
        Self::start_with(FleetOptions::default()).await
    }

    /// Starts the upstream, the relays, HAProxy and the `connect`s; returns once HAProxy sees
    /// every relay up and answers through its frontend, and every relay routes the source
    /// through every `connect`.
    pub async fn start_with(options: FleetOptions) -> Self {
        super::init_tracing();
        let serial = SERIAL.clone().lock_owned().await;
        let (dir, certs) = super::cert_dir();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, &certs.ca_pem).expect("write the CA");
        let fleet_secret = dir.path().join(FLEET_SECRET_FILE);
        // 32 random bytes, written as hex: the relay trims surrounding whitespace off the
        // file, so raw bytes would come up short whenever they begin or end with a whitespace
        // byte (a fleet start in ~20 failed so).
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
        let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&fleet_secret, secret).expect("write the fleet secret");
        let tunnel_token = mcp_tunnel::govern::identity::new_secret("mcpt_tok_");
        let api_key = mcp_tunnel::govern::identity::new_secret("mcpt_key_");
        let other_key = mcp_tunnel::govern::identity::new_secret("mcpt_key_");
        let upstream = RecordingUpstream::start_with_latency(options.upstream_latency).await;
        let tenant = super::tenant_block(
            &tunnel_token,
            "",
            &[
                ("agent@acme.example", &api_key, &[]),
                ("other@acme.example", &other_key, &[]),
            ],
            &[],
        );
        let mut relays = Vec::new();
        for n in 1..=options.relays {
            relays.push(start_new_relay(dir.path(), &format!("relay-{n}"), &tenant).await);
        }
        let servers: Vec<(&str, SocketAddr, SocketAddr)> = relays
            .iter()
            .map(|r| (r.id.as_str(), r.agents, r.admin))
            .collect();
        let haproxy = Haproxy::start(dir.path(), &servers).await;
        let mut fleet = Self {
            connects: Vec::new(),
            haproxy,
            relays,
            upstream,
            api_key,
            other_key,
            tunnel_token,
            ca,
            fleet_secret,
            dir,
            _serial: serial,
        };
        for _ in 0..options.connects {
            let connect = fleet.spawn_connect();
            fleet.connects.push(Some(connect));
        }
        fleet.wait_all_attached().await;
        let ids = fleet.relay_ids();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        fleet.haproxy.wait_servers(&ids).await;
        fleet.wait_frontend().await;
        fleet
    }

    /// The agent URL of the source through HAProxy.
    pub fn url(&self) -> String {
        format!("http://{}/mcp/{SOURCE}", self.haproxy.frontend)
    }

    /// The relays' ids, in order.
    pub fn relay_ids(&self) -> Vec<String> {
        self.relays.iter().map(|r| r.id.clone()).collect()
    }

    /// The ids of the relays running now.
    pub fn running_relay_ids(&self) -> Vec<String> {
        self.relays
            .iter()
            .filter(|r| r.process.is_some())
            .map(|r| r.id.clone())
            .collect()
    }

    /// Waits (bounded) until a request through HAProxy's frontend reaches a relay: the source's
    /// URL without credentials answers the relay's 401 (HAProxy itself would answer 503).
    pub async fn wait_frontend(&self) {
        let until = Instant::now() + WAIT;
        loop {
            let answer = reqwest::Client::new()
                .post(self.url())
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            match answer {
                Ok(response) if response.status() == 401 => return,
                other => assert!(
                    Instant::now() < until,
                    "HAProxy's frontend did not reach a relay within {WAIT:?}: {other:?}"
                ),
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `connect --relay T1,T2,T3 --ca CA --token TOKEN --source fleet=UPSTREAM`, started.
    fn spawn_connect(&self) -> Proc {
        let relays: Vec<String> = self.relays.iter().map(|r| r.tunnel.to_string()).collect();
        Proc::start(
            "connect",
            Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"))
                .arg("connect")
                .arg("--relay")
                .arg(relays.join(","))
                .arg("--ca")
                .arg(&self.ca)
                .arg("--token")
                .arg(&self.tunnel_token)
                .arg("--source")
                .arg(format!("{SOURCE}={}", self.upstream.url))
                .env("RUST_LOG", "info"),
        )
    }

    /// The rows of relay `index`'s `/api/tunnels`, or `None` when it does not answer.
    pub async fn tunnels(&self, index: usize) -> Option<Vec<Value>> {
        let response = reqwest::Client::new()
            .get(self.relays[index].admin_url("/api/tunnels"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        let rows: Value = response.json().await.ok()?;
        rows.as_array().cloned()
    }

    /// How many tunnels relay `index` routes the source through that are live (not draining,
    /// not silent), counted by distinct client address.
    pub async fn live_tunnels(&self, index: usize) -> usize {
        let rows = self.tunnels(index).await.unwrap_or_default();
        let mut remotes: Vec<&str> = rows
            .iter()
            .filter(|row| {
                row["tenant"] == "acme"
                    && row["source"] == SOURCE
                    && row["draining"] != true
                    && row["silent"] != true
            })
            .filter_map(|row| row["remote"].as_str())
            .collect();
        remotes.sort_unstable();
        remotes.dedup();
        remotes.len()
    }

    /// Waits (bounded) until relay `index` routes the source through every running `connect`.
    pub async fn wait_attached(&self, index: usize) {
        let want = self.connects.iter().filter(|c| c.is_some()).count();
        let until = Instant::now() + WAIT;
        loop {
            let live = self.live_tunnels(index).await;
            if live >= want {
                return;
            }
            assert!(
                Instant::now() < until,
                "{} did not get the tunnels of {want} connects within {WAIT:?} (has {live}): {:?}\nconnect output:\n{}",
                self.relays[index].id,
                self.tunnels(index).await,
                self.connect_output()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits (bounded) until every running relay routes the source through exactly the running
    /// `connect`s: the connections of a killed one are marked silent (after 5 s unheard) or
    /// gone. Until then a relay may still route new calls to a killed `connect`.
    pub async fn wait_routes_only_running(&self) {
        let want = self.connects.iter().filter(|c| c.is_some()).count();
        let until = Instant::now() + WAIT;
        for index in 0..self.relays.len() {
            if self.relays[index].process.is_none() {
                continue;
            }
            loop {
                let live = self.live_tunnels(index).await;
                if live == want {
                    break;
                }
                assert!(
                    Instant::now() < until,
                    "{} still routes through {live} connects, not {want}, after {WAIT:?}: {:?}",
                    self.relays[index].id,
                    self.tunnels(index).await
                );
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// [`Fleet::wait_attached`] for every running relay.
    pub async fn wait_all_attached(&self) {
        for index in 0..self.relays.len() {
            if self.relays[index].process.is_some() {
                self.wait_attached(index).await;
            }
        }
    }

    /// What the `connect`s printed so far.
    pub fn connect_output(&self) -> String {
        self.connects
            .iter()
            .enumerate()
            .filter_map(|(n, c)| Some(format!("--- connect {n}:\n{}", c.as_ref()?.peer.output())))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// What relay `index` printed so far (empty when it is not running).
    pub fn relay_output(&self, index: usize) -> String {
        self.relays[index]
            .process
            .as_ref()
            .map(|p| p.peer.output())
            .unwrap_or_default()
    }

    /// `kill -9` of relay `index` by its PID; returns once it is reaped.
    pub async fn kill_relay(&mut self, index: usize) -> Killed {
        let process = self.relays[index]
            .process
            .take()
            .unwrap_or_else(|| panic!("{} is running", self.relays[index].id));
        Killed::kill(process).await
    }

    /// SIGTERM to relay `index` by its PID; waits (bounded) for it to exit, which must be
    /// clean (status 0); returns its output.
    pub async fn stop_relay(&mut self, index: usize) -> String {
        let mut process = self.relays[index]
            .process
            .take()
            .unwrap_or_else(|| panic!("{} is running", self.relays[index].id));
        let status = process.signal_and_wait(libc::SIGTERM).await;
        let output = process.peer.output();
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM; output:\n{output}",
            self.relays[index].id
        );
        output
    }

    /// Starts relay `index` again, on the same ports and config, and waits (bounded) until
    /// every running `connect` is attached to it again and HAProxy sees it up.
    pub async fn start_relay(&mut self, index: usize) {
        let relay = &mut self.relays[index];
        assert!(relay.process.is_none(), "{} is stopped", relay.id);
        let (process, tunnel, agents) = spawn_relay(&relay.config)
            .await
            .unwrap_or_else(|why| panic!("{} restarts on its ports: {why}", relay.id));
        assert_eq!(
            (tunnel, agents),
            (relay.tunnel, relay.agents),
            "a restart serves on the same ports"
        );
        relay.process = Some(process);
        self.wait_attached(index).await;
        let up = self.running_relay_ids();
        let up: Vec<&str> = up.iter().map(String::as_str).collect();
        self.haproxy.wait_servers(&up).await;
    }

    /// SIGTERM relay `index`, then start it again on the same ports ([`Fleet::stop_relay`],
    /// [`Fleet::start_relay`]); returns the stopped relay's output.
    pub async fn restart_relay(&mut self, index: usize) -> String {
        let output = self.stop_relay(index).await;
        self.start_relay(index).await;
        output
    }

    /// `kill -9` of `connect` `index` by its PID; returns once it is reaped.
    pub async fn kill_connect(&mut self, index: usize) -> Killed {
        let process = self.connects[index]
            .take()
            .unwrap_or_else(|| panic!("connect {index} is running"));
        Killed::kill(process).await
    }

    /// Starts `connect` `index` again and waits (bounded) until every running relay routes
    /// through it.
    pub async fn start_connect(&mut self, index: usize) {
        assert!(self.connects[index].is_none(), "connect {index} is stopped");
        let connect = self.spawn_connect();
        self.connects[index] = Some(connect);
        self.wait_all_attached().await;
    }

    /// Relay `index`'s `/metrics` text.
    pub async fn metrics(&self, index: usize) -> String {
        let response = reqwest::Client::new()
            .get(self.relays[index].admin_url("/metrics"))
            .timeout(WAIT)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{} /metrics answers: {e}", self.relays[index].id));
        assert_eq!(response.status(), 200);
        response.text().await.expect("/metrics body")
    }

    /// The `tools/call` requests relay `index` counted (`mcp_tunnel_calls_total`, every
    /// outcome) since it started.
    pub async fn relay_tool_calls(&self, index: usize) -> u64 {
        metric_sum(
            &self.metrics(index).await,
            "mcp_tunnel_calls_total",
            "method=\"tools/call\"",
        )
    }

    /// Runs `tests/peers/fleet_client.py` through HAProxy: `sessions` sessions in `mode`
    /// (`legacy`, `2026-07-28`, `auto`), each calling `echo` with messages `PREFIX-sS-cN` until
    /// `calls` calls each (0: unbounded) or `seconds` have passed, or [`Load::stop`].
    pub fn load(
        &self,
        mode: &str,
        sessions: usize,
        calls: usize,
        seconds: f64,
        prefix: &str,
    ) -> Load {
        self.load_with_call_timeout(mode, sessions, calls, seconds, prefix, None)
    }

    /// [`Fleet::load`] with the client's per-call timeout (`FLEET_CLIENT_CALL_TIMEOUT`; 10 s
    /// when `None`): a call with no answer within it is recorded as failed with a
    /// `TimeoutError`.
    pub fn load_with_call_timeout(
        &self,
        mode: &str,
        sessions: usize,
        calls: usize,
        seconds: f64,
        prefix: &str,
        call_timeout: Option<Duration>,
    ) -> Load {
        let mut command = Command::new(super::peers::python());
        command
            .arg(super::peers::peer_file("fleet_client.py"))
            .arg(self.url())
            .arg(&self.api_key)
            .arg(mode)
            .arg(sessions.to_string())
            .arg(calls.to_string())
            .arg(seconds.to_string())
            .arg(prefix)
            .env("PYTHONUNBUFFERED", "1");
        let stop_file = self.dir.path().join(format!("stop-{prefix}"));
        command.env("FLEET_CLIENT_STOP_FILE", &stop_file);
        match call_timeout {
            Some(timeout) => command.env(
                "FLEET_CLIENT_CALL_TIMEOUT",
                timeout.as_secs_f64().to_string(),
            ),
            None => command.env_remove("FLEET_CLIENT_CALL_TIMEOUT"),
        };
        Load {
            process: Proc::start("fleet_client.py", &mut command),
            seconds,
            stop_file,
        }
    }
}

/// Writes relay `id`'s config in `dir` and starts it: agents and tunnel on ports the OS picks,
/// admin on a free port (picked again when taken in between); then writes the config again
/// with the ports it got, for restarts.
async fn start_new_relay(dir: &Path, id: &str, tenant: &str) -> FleetRelay {
    let config = dir.join(format!("{id}.toml"));
    let any = loopback(0);
    let mut last = String::new();
    for _ in 0..BIND_ATTEMPTS {
        let admin = loopback(super::free_port());
        std::fs::write(&config, relay_config(id, any, any, admin, tenant))
            .expect("write the relay config");
        match spawn_relay(&config).await {
            Ok((process, tunnel, agents)) => {
                std::fs::write(&config, relay_config(id, agents, tunnel, admin, tenant))
                    .expect("write the relay config");
                return FleetRelay {
                    id: id.to_owned(),
                    config,
                    agents,
                    tunnel,
                    admin,
                    process: Some(process),
                };
            }
            Err(why) => last = why,
        }
    }
    panic!("{id} did not start in {BIND_ATTEMPTS} attempts: {last}");
}

/// `mcp-tunnel relay --config PATH`, up: returns it with its tunnel and agent addresses, or why
/// it did not come up.
async fn spawn_relay(config: &Path) -> Result<(Proc, SocketAddr, SocketAddr), String> {
    let mut process = Proc::start(
        "relay",
        Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"))
            .arg("relay")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info"),
    );
    let line = process
        .peer
        .try_wait_for_line("\"relay listening\"", |l| l.contains("relay listening"))
        .await?;
    let (tunnel, agents) = (super::field(&line, "tunnel"), super::field(&line, "agents"));
    Ok((process, tunnel, agents))
}

/// The sum of the samples of `metric` whose labels contain `label` in Prometheus text.
pub fn metric_sum(text: &str, metric: &str, label: &str) -> u64 {
    text.lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A running `fleet_client.py`.
pub struct Load {
    /// The client (killed by PID and reaped when dropped); its output in `process.peer`.
    pub process: Proc,
    seconds: f64,
    /// Created by [`Load::stop`]: the client ends each session after its call in flight.
    stop_file: PathBuf,
}

/// One call `fleet_client.py` made.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Call {
    pub session: u64,
    pub n: u64,
    pub message: String,
    pub ok: bool,
    pub error: Option<String>,
    pub session_id: Option<String>,
    pub relay: Option<String>,
    /// Unix seconds.
    pub started: f64,
    pub ended: f64,
}

impl Call {
    /// Whether the call was under way at `at` (began before it, ended after it).
    pub fn spans(&self, at: SystemTime) -> bool {
        let at = unix(at);
        self.started <= at && at <= self.ended
    }

    /// Whether it began after `at`.
    pub fn started_after(&self, at: SystemTime) -> bool {
        self.started > unix(at)
    }

    /// Whether it ended before `at`.
    pub fn ended_before(&self, at: SystemTime) -> bool {
        self.ended < unix(at)
    }
}

/// Seconds since the epoch.
pub fn unix(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs_f64()
}

/// What `fleet_client.py` reported.
#[derive(Debug)]
pub struct LoadReport {
    /// Each session's `open` line.
    pub opens: Vec<Value>,
    pub calls: Vec<Call>,
    pub closes: Vec<Value>,
    pub session_errors: Vec<Value>,
    pub summary: Value,
    /// Everything it printed (for failure messages).
    pub output: String,
}

impl LoadReport {
    /// The calls that failed.
    pub fn failed(&self) -> Vec<&Call> {
        self.calls.iter().filter(|c| !c.ok).collect()
    }

    /// Calls by the relay that served them (`?` when the answer named none).
    pub fn calls_by_relay(&self) -> BTreeMap<String, usize> {
        let mut by_relay = BTreeMap::new();
        for call in &self.calls {
            *by_relay
                .entry(call.relay.clone().unwrap_or_else(|| "?".into()))
                .or_default() += 1;
        }
        by_relay
    }

    /// The session ids each session's calls carried, by session.
    pub fn session_ids_by_session(&self) -> HashMap<u64, Vec<Option<String>>> {
        let mut ids: HashMap<u64, Vec<Option<String>>> = HashMap::new();
        for call in &self.calls {
            let seen = ids.entry(call.session).or_default();
            if !seen.contains(&call.session_id) {
                seen.push(call.session_id.clone());
            }
        }
        ids
    }

    /// A short account for assertion messages: the summary, calls by relay, the first failures.
    pub fn brief(&self) -> String {
        let failures: Vec<String> = self
            .failed()
            .iter()
            .take(10)
            .map(|c| format!("{} via {:?}: {:?}", c.message, c.relay, c.error))
            .collect();
        format!(
            "summary {}; calls by relay {:?}; session errors {:?}; first failures {failures:#?}",
            self.summary,
            self.calls_by_relay(),
            self.session_errors
        )
    }
}

impl Load {
    /// Waits (bounded) until `count` calls have ended.
    pub async fn wait_calls(&mut self, count: usize) {
        let mut seen = 0;
        self.process
            .peer
            .wait_for_line(&format!("{count} call lines"), |line| {
                if line.starts_with("call: ") {
                    seen += 1;
                }
                seen >= count
            })
            .await;
    }

    /// Waits (bounded) until `count` calls begun after `at` have ended (lines printed before
    /// this wait began count too, as long as they are not consumed yet).
    pub async fn wait_calls_after(&mut self, at: SystemTime, count: usize) {
        let at = unix(at);
        let mut seen = 0;
        self.process
            .peer
            .wait_for_line(&format!("{count} calls begun after {at}"), |line| {
                let started = line
                    .strip_prefix("call: ")
                    .and_then(|json| serde_json::from_str::<Value>(json).ok())
                    .and_then(|call| call["started"].as_f64());
                if started.is_some_and(|started| started > at) {
                    seen += 1;
                }
                seen >= count
            })
            .await;
    }

    /// Tells the client to stop (each session after its call in flight), then
    /// [`Load::finish`].
    pub async fn stop(self) -> LoadReport {
        std::fs::write(&self.stop_file, b"stop").expect("write the stop file");
        self.finish().await
    }

    /// Waits for the client to finish (bounded by its duration and a minute) and parses what it
    /// printed; it must have exited 0 with a summary.
    pub async fn finish(mut self) -> LoadReport {
        let bound = Duration::from_secs_f64(self.seconds) + Duration::from_secs(75);
        let status = self.process.peer.exit_status(Instant::now() + bound).await;
        let output = self.process.peer.output();
        assert!(
            status.success(),
            "fleet_client.py failed ({status}):\n{output}"
        );
        let mut report = LoadReport {
            opens: Vec::new(),
            calls: Vec::new(),
            closes: Vec::new(),
            session_errors: Vec::new(),
            summary: Value::Null,
            output: String::new(),
        };
        for line in output.lines() {
            let Some((key, value)) = line.split_once(": ") else {
                continue;
            };
            let parse = || -> Value {
                serde_json::from_str(value)
                    .unwrap_or_else(|e| panic!("fleet_client.py printed bad JSON ({e}): {line}"))
            };
            match key {
                "open" => report.opens.push(parse()),
                "call" => report.calls.push(
                    serde_json::from_value(parse())
                        .unwrap_or_else(|e| panic!("a call line ({e}): {line}")),
                ),
                "close" => report.closes.push(parse()),
                "session_error" => report.session_errors.push(parse()),
                "summary" => report.summary = parse(),
                _ => {}
            }
        }
        assert!(
            report.summary.is_object(),
            "fleet_client.py printed no summary:\n{output}"
        );
        report.output = output;
        report
    }
}
