//! `mcp-tunnel connect`: dials out to the relay and serves its sources over the tunnel.
//!
//! It never listens. It forwards only to the sources in its own configuration: a stream that
//! names anything else is refused.
//!
//! It holds at least [`ClientSettings::connections`] connections at once, at least one to every
//! relay given and to every address a relay name resolves to (`fleet` looks names up again
//! every [`RESOLVE_INTERVAL`]; `relays` plans the slots). With `--transport auto` each tries
//! QUIC first; when UDP looks blocked (no handshake within [`AUTO_QUIC_TIMEOUT`], or an error,
//! where HTTPS answers) it serves over the HTTPS fallback at once, and probes QUIC again every
//! [`ClientSettings::probe_interval`]: when QUIC answers, the QUIC connection takes over and the
//! HTTPS one drains.

mod backoff;
mod dial;
mod fleet;
mod proxy;
mod relays;
mod sources;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{ClientFile, SourceConfig, TransportChoice};
use crate::transport::{RecvHalf, SendHalf};
use crate::transport::{TransportError, TransportKind, TunnelConnection, tls};
use crate::wire::{Frame, FrameKind, FrameReader, FrameWriter, Notice, OpenHeader};
use backoff::Backoff;
use dial::{Route, Tunnel};
use sources::Sources;

pub use fleet::{RESOLVE_INTERVAL, Resolver};
pub use sources::{StdioLimits, UpstreamTarget};

/// Time the relay has to send the open header of a new stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that lasted this long was healthy: the next failure retries at once again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// In `auto`, a QUIC handshake that takes longer than this means UDP is blocked: on a
/// working path it takes one round trip, and 1.5 s covers even intercontinental ones.
pub const AUTO_QUIC_TIMEOUT: Duration = Duration::from_millis(1500);
/// Time a forced transport has to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default connections held at once (see [`crate::config::DEFAULT_CONNECTIONS`]).
pub const DEFAULT_CONNECTIONS: usize = crate::config::DEFAULT_CONNECTIONS;
/// Default interval between QUIC probes while on the HTTPS fallback.
pub const DEFAULT_PROBE_INTERVAL: Duration =
    Duration::from_secs(crate::config::DEFAULT_PROBE_INTERVAL_SECS);
/// Longest wait for a relay that asked us to drain to close the connection itself.
const RELAY_DRAIN_LIMIT: Duration = Duration::from_secs(120);
/// Time streams in flight get to finish when a connection drains.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
/// A slot that keeps failing to connect warns on its first failure, then at most this often
/// (debug in between): a relay address that does not answer is retried for as long as it
/// resolves, and must not flood the log.
const FAILURE_WARN_EVERY: Duration = Duration::from_secs(300);

/// Why `connect` stopped or could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The relay refused the token or the sources; retrying will not help.
    #[error("the relay refused this tunnel: {0}")]
    Refused(String),
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// Transport failure (retried internally; returned only from a single attempt).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The handshake went wrong.
    #[error("handshake with the relay failed: {0}")]
    Handshake(String),
}

/// `connect`'s resolved settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The relay as HOST:PORT, or several separated by commas. Every relay, and every address
    /// a relay name resolves to, gets at least one connection.
    pub relay: String,
    /// CA PEM file; the system roots when `None`.
    pub ca: Option<std::path::PathBuf>,
    /// CA certificates as PEM text (the demo); takes precedence over `ca`.
    pub ca_pem: Option<String>,
    /// The tunnel token.
    pub token: String,
    /// Transport choice.
    pub transport: TransportChoice,
    /// The sources.
    pub sources: Vec<SourceConfig>,
    /// Largest frame accepted from the relay.
    pub max_message_bytes: usize,
    /// HTTP CONNECT proxy for the HTTPS fallback (`http://host:port`); `HTTPS_PROXY` when
    /// `None`.
    pub proxy: Option<String>,
    /// Connections held at once, at least: every relay address gets one even when there are
    /// more addresses, and the extra ones spread round-robin over the addresses.
    pub connections: usize,
    /// How relay names are looked up.
    pub resolver: Resolver,
    /// Interval between lookups of the relay names ([`RESOLVE_INTERVAL`]).
    pub resolve_interval: Duration,
    /// Interval between QUIC probes while on the HTTPS fallback (`auto`).
    pub probe_interval: Duration,
    /// Largest single upstream answer relayed (`max_answer_bytes`): larger than a frame, an
    /// answer crosses the tunnel in pieces, so this bounds a runaway answer, not memory.
    pub max_answer_bytes: usize,
    /// How stdio sources bound their processes.
    pub stdio: StdioLimits,
}

impl ClientSettings {
    /// Settings for `relay` with defaults for everything optional.
    pub fn new(relay: String, token: String, sources: Vec<SourceConfig>) -> Self {
        Self {
            relay,
            ca: None,
            ca_pem: None,
            token,
            transport: TransportChoice::Auto,
            sources,
            max_message_bytes: crate::config::DEFAULT_MAX_MESSAGE_BYTES,
            proxy: None,
            connections: DEFAULT_CONNECTIONS,
            resolver: Resolver::system(),
            resolve_interval: RESOLVE_INTERVAL,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            max_answer_bytes: crate::config::DEFAULT_MAX_ANSWER_BYTES,
            stdio: StdioLimits::default(),
        }
    }

    /// Settings from a configuration file, with the token from `token_override` (flag or env)
    /// when the file has none.
    pub fn from_file(
        file: &ClientFile,
        token_override: Option<String>,
    ) -> Result<Self, ClientError> {
        let token = token_override
            .or_else(|| file.token.clone())
            .ok_or_else(|| {
                ClientError::Config(
                    "no tunnel token: set token in the file or MCP_TUNNEL_TOKEN".into(),
                )
            })?;
        Ok(Self {
            relay: file.relay.clone(),
            ca: file.ca.clone(),
            ca_pem: None,
            token,
            transport: file.transport,
            sources: file.sources().map_err(ClientError::Config)?,
            max_message_bytes: file.max_message_bytes,
            proxy: file.proxy.clone(),
            connections: file.connections,
            resolver: Resolver::system(),
            resolve_interval: RESOLVE_INTERVAL,
            probe_interval: Duration::from_secs(file.probe_interval_secs),
            max_answer_bytes: {
                crate::config::check_max_answer_bytes(
                    file.max_answer_bytes,
                    file.max_message_bytes,
                )
                .map_err(ClientError::Config)?;
                file.max_answer_bytes
            },
            stdio: StdioLimits {
                max_processes: file.stdio_max_processes,
                idle: Duration::from_secs(file.session_idle_secs),
            },
        })
    }
}

/// The transport-fallback state the connection slots share: the configured choice (QUIC,
/// HTTPS, or `auto`), and what `auto` has learned about UDP: whether new connections go over
/// QUIC or the HTTPS fallback, and how often the fallback probes QUIC again.
struct Fallback {
    choice: TransportChoice,
    udp_blocked: AtomicBool,
    probe_interval: Duration,
}

impl Fallback {
    fn first_kind(&self) -> TransportKind {
        match self.choice {
            TransportChoice::Https => TransportKind::Https,
            TransportChoice::Quic => TransportKind::Quic,
            TransportChoice::Auto if self.udp_blocked.load(Ordering::Relaxed) => {
                TransportKind::Https
            }
            TransportChoice::Auto => TransportKind::Quic,
        }
    }

    /// How often a connection over `kind` probes QUIC: only on the fallback in `auto`.
    fn probe_every(&self, kind: TransportKind) -> Option<Duration> {
        (kind == TransportKind::Https && self.choice == TransportChoice::Auto)
            .then_some(self.probe_interval)
    }

    fn set_udp_blocked(&self, blocked: bool, why: &str) {
        if self.udp_blocked.swap(blocked, Ordering::Relaxed) != blocked {
            if blocked {
                tracing::warn!(
                    reason = why,
                    "UDP looks blocked: switching new connections to the HTTPS fallback"
                );
            } else {
                tracing::info!("QUIC works again: moving new sessions back to QUIC");
            }
        }
    }
}

/// Runs `connect` until `shutdown`, reconnecting as needed; returns early only when the relay
/// refuses the tunnel or the configuration is unusable.
pub async fn run(settings: ClientSettings, shutdown: CancellationToken) -> Result<(), ClientError> {
    let sources = Arc::new(
        Sources::new(&settings.sources, settings.stdio, settings.max_answer_bytes)
            .map_err(ClientError::Config)?,
    );
    let roots = match (&settings.ca_pem, &settings.ca) {
        (Some(pem), _) => tls::Roots::CaPem(pem.clone()),
        (None, Some(path)) => tls::Roots::CaFile(path.clone()),
        (None, None) => tls::Roots::System,
    };
    let hello = dial::hello(
        &settings.token,
        &settings.sources,
        settings.max_message_bytes,
    );
    let relays = relays::Relay::parse_list(&settings.relay).map_err(ClientError::Config)?;
    let dialers = fleet::dialers(&relays, &roots, settings.proxy.as_deref(), &hello)?;
    let fallback = Arc::new(Fallback {
        choice: settings.transport,
        udp_blocked: AtomicBool::new(false),
        probe_interval: settings.probe_interval,
    });
    // A refusal in one slot ends them all.
    let stop = shutdown.child_token();
    let fleet = fleet::Fleet::new(
        relays,
        dialers,
        settings.resolver.clone(),
        settings.connections,
        fleet::Kit {
            fallback,
            sources: sources.clone(),
            stop,
        },
    );
    let result = fleet.run(settings.resolve_interval).await;
    // Whatever ended the tunnel, no child process of a stdio source outlives `run`.
    sources.shutdown().await;
    result
}

/// How a connection's service ended.
enum Ended {
    /// It failed or closed.
    Lost(String),
    /// The relay is shutting down: reconnect at once (another relay instance may answer).
    RelayDraining,
    /// QUIC answered a probe: this (HTTPS) connection drains, the QUIC one takes over.
    QuicBack(Tunnel),
    /// `connect` is stopping.
    Shutdown,
}

/// One connection slot: connect, serve, and reconnect, until `connect` stops (`stopping`) or
/// the slot is retired (`shutdown`, a child of `stopping`).
async fn run_slot(
    slot: usize,
    route: Route,
    fallback: Arc<Fallback>,
    sources: Arc<Sources>,
    stopping: CancellationToken,
    shutdown: CancellationToken,
) -> Result<(), ClientError> {
    let mut slot = Slot {
        slot,
        route,
        fallback,
        sources,
        stopping,
        shutdown,
        backoff: Backoff::default(),
        failures: Failures::default(),
        after_drain: false,
    };
    let mut ready: Option<Tunnel> = None;
    loop {
        let tunnel = match ready.take() {
            Some(tunnel) => tunnel,
            None => match slot.reconnect().await? {
                Some(tunnel) => tunnel,
                None => return Ok(()),
            },
        };
        slot.after_drain = false;
        match slot.serve(tunnel).await {
            Next::Reconnect => {}
            Next::Take(quic) => ready = Some(quic),
            Next::Stop => return Ok(()),
        }
    }
}

/// A slot's streak of failed attempts, for warning without flooding the log.
#[derive(Default)]
struct Failures {
    attempts: u32,
    last_warned: Option<Instant>,
}

impl Failures {
    /// Counts a failure; `Some(attempts in the streak)` when it is to be logged as a warning:
    /// the first of a streak, then once every [`FAILURE_WARN_EVERY`].
    fn failed(&mut self) -> Option<u32> {
        self.attempts = self.attempts.saturating_add(1);
        let warn = self
            .last_warned
            .is_none_or(|at| at.elapsed() >= FAILURE_WARN_EVERY);
        if warn {
            self.last_warned = Some(Instant::now());
        }
        warn.then_some(self.attempts)
    }
}

/// What a connection slot does once a connection's service ended.
enum Next {
    /// Connect again (after the backoff's pause).
    Reconnect,
    /// Serve this connection (QUIC, which answered a probe).
    Take(Tunnel),
    /// `connect` is stopping.
    Stop,
}

/// One connection slot's state between its connections.
struct Slot {
    slot: usize,
    route: Route,
    fallback: Arc<Fallback>,
    sources: Arc<Sources>,
    /// Cancelled when `connect` stops.
    stopping: CancellationToken,
    /// Cancelled when `connect` stops or the slot is retired (its address is gone).
    shutdown: CancellationToken,
    backoff: Backoff,
    failures: Failures,
    /// Set when the relay drained this slot's connection, until a replacement is up: a relay
    /// that drains takes no new connections, so a QUIC attempt failing then says nothing about
    /// UDP (and must not move every later connection to the fallback).
    after_drain: bool,
}

impl Slot {
    /// Connects, after the backoff's pause, until a connection is up; `None` when `connect`
    /// stops first. Fails only when the relay refuses the tunnel.
    async fn reconnect(&mut self) -> Result<Option<Tunnel>, ClientError> {
        let slot = self.slot;
        loop {
            let delay = self.backoff.next_delay();
            if !delay.is_zero() {
                tracing::debug!(
                    slot,
                    delay_ms = delay.as_millis() as u64,
                    "reconnecting after a pause"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.cancelled() => return Ok(None),
            }
            let attempt = tokio::select! {
                attempt = connect(&self.route, &self.fallback, !self.after_drain) => attempt,
                _ = self.shutdown.cancelled() => return Ok(None),
            };
            match attempt {
                Ok(tunnel) => {
                    self.failures = Failures::default();
                    return Ok(Some(tunnel));
                }
                Err(ClientError::Refused(reason)) => return Err(ClientError::Refused(reason)),
                Err(e) => {
                    if let Some(attempts) = self.failures.failed() {
                        tracing::warn!(slot, relay = %self.route, error = %e, attempts, "could not connect to the relay");
                    } else {
                        tracing::debug!(slot, relay = %self.route, error = %e, "could not connect to the relay");
                    }
                }
            }
        }
    }

    /// Serves the relay's streams on `tunnel` until its service ends, then winds it down as
    /// the end requires.
    async fn serve(&mut self, tunnel: Tunnel) -> Next {
        let (slot, route) = (self.slot, &self.route);
        let kind = tunnel.connection.kind();
        tracing::info!(slot, relay = %route, tenant = %tunnel.welcomed.tenant, transport = %kind, wire_version = tunnel.welcomed.wire_version, sources = self.sources.len(), "tunnel up");
        let started = Instant::now();
        let Tunnel {
            connection,
            welcomed,
            control_in,
            control_out,
        } = tunnel;
        let active = Arc::new(ActiveStreams::default());
        let server = tokio::spawn(serve_streams(
            connection.clone(),
            welcomed.tenant.into(),
            welcomed.limit,
            welcomed.wire_version,
            self.sources.clone(),
            active.clone(),
        ));
        let mut served = Served {
            connection,
            active,
            server,
            control_in,
            control_out,
        };
        let ended = watch(
            &served.connection,
            &mut served.control_in,
            self.fallback.probe_every(kind),
            route,
            &self.fallback,
            &self.shutdown,
        )
        .await;
        if started.elapsed() >= HEALTHY_AFTER {
            self.backoff.reset();
        }
        match ended {
            Ended::Lost(reason) => {
                tracing::warn!(slot, relay = %route, transport = %kind, %reason, "tunnel down");
                served.server.abort();
                Next::Reconnect
            }
            Ended::RelayDraining => {
                tracing::info!(slot, transport = %kind, "the relay is draining this connection; opening a replacement");
                self.backoff.reset();
                self.after_drain = true;
                // The relay decides when its drain is over (it closes the connection); our own
                // bound only guards against a relay that never does.
                tokio::spawn(served.finish("relay shutting down", RELAY_DRAIN_LIMIT));
                Next::Reconnect
            }
            Ended::QuicBack(quic) => {
                served.tell_drain("moving to QUIC").await;
                tokio::spawn(served.finish("moved to QUIC", DRAIN_GRACE));
                self.backoff.reset();
                Next::Take(quic)
            }
            Ended::Shutdown => {
                // Stopping, or retired because the relay's name no longer resolves to this
                // address: either way the relay routes nothing new here, and the streams in
                // flight finish.
                let reason = if self.stopping.is_cancelled() {
                    "connect shutting down"
                } else {
                    "relay address retired"
                };
                served.tell_drain(reason).await;
                served.finish(reason, DRAIN_GRACE).await;
                Next::Stop
            }
        }
    }
}

/// A connection being served: its stream server, the streams in flight, and its control
/// stream, which stays open while the connection drains (closing it would tell the relay this
/// client is gone, and cut the calls in flight).
struct Served {
    connection: Arc<dyn TunnelConnection>,
    active: Arc<ActiveStreams>,
    server: tokio::task::JoinHandle<()>,
    control_in: FrameReader<RecvHalf>,
    control_out: FrameWriter<SendHalf>,
}

impl Served {
    /// Tells the relay this connection drains: it opens no new streams on it.
    async fn tell_drain(&mut self, reason: &str) {
        let notice = Notice::Drain {
            reason: reason.into(),
        };
        let _ = self
            .control_out
            .send(&Frame::json(FrameKind::Control, &notice))
            .await;
    }

    /// Lets streams in flight finish (bounded by `grace`), then closes the connection and,
    /// last, its control stream.
    async fn finish(self, reason: &'static str, grace: Duration) {
        let Served {
            connection,
            active,
            server,
            control_in,
            control_out,
        } = self;
        finish(connection, active, server, reason, grace).await;
        drop((control_in, control_out));
    }
}

/// Connects with the transport `fallback` picks; in `auto`, a failed QUIC attempt falls back to
/// HTTPS at once, and when HTTPS answers where QUIC did not, marks UDP blocked (when `learn`
/// allows). An address that answers neither is down, which says nothing about UDP: a name with
/// an address this network cannot reach (an IPv6 one without an IPv6 route) must not move every
/// other connection to the fallback. A relay that answers and refuses the QUIC connection (it
/// drains) proves UDP works: that failure is returned as is.
async fn connect(route: &Route, fallback: &Fallback, learn: bool) -> Result<Tunnel, ClientError> {
    match (fallback.choice, fallback.first_kind()) {
        (TransportChoice::Auto, TransportKind::Quic) => {
            match route.connect(TransportKind::Quic, AUTO_QUIC_TIMEOUT).await {
                Ok(tunnel) => Ok(tunnel),
                Err(ClientError::Refused(reason)) => Err(ClientError::Refused(reason)),
                Err(e @ ClientError::Transport(TransportError::Refused(_))) => Err(e),
                Err(quic) => {
                    if !learn {
                        tracing::info!(error = %quic, "no QUIC connection to a relay that just drained; trying HTTPS without concluding UDP is blocked");
                    }
                    let https = route.connect(TransportKind::Https, CONNECT_TIMEOUT).await;
                    match &https {
                        Ok(_) if learn => fallback.set_udp_blocked(true, &quic.to_string()),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(relay = %route, quic = %quic, https = %e, "neither QUIC nor HTTPS answered");
                        }
                    }
                    https
                }
            }
        }
        (_, kind) => route.connect(kind, CONNECT_TIMEOUT).await,
    }
}

/// Waits for the connection to end, a notice from the relay, shutdown, or (on the fallback in
/// `auto`) a successful QUIC probe.
async fn watch(
    connection: &Arc<dyn TunnelConnection>,
    control_in: &mut FrameReader<RecvHalf>,
    probe_every: Option<Duration>,
    route: &Route,
    fallback: &Fallback,
    shutdown: &CancellationToken,
) -> Ended {
    let mut probe = tokio::time::interval(probe_every.unwrap_or(Duration::from_secs(3600)));
    probe.tick().await; // the first tick is immediate; the first probe comes one interval later
    loop {
        tokio::select! {
            e = connection.closed() => return Ended::Lost(e.to_string()),
            frame = control_in.next() => match frame {
                Ok(Some(frame)) => match frame.parse_json::<Notice>(FrameKind::Control) {
                    Ok(Notice::Drain { .. }) => return Ended::RelayDraining,
                    Err(e) => return Ended::Lost(format!("control stream: {e}")),
                },
                Ok(None) => return Ended::Lost("the relay closed the control stream".into()),
                Err(e) => return Ended::Lost(format!("control stream: {e}")),
            },
            _ = shutdown.cancelled() => return Ended::Shutdown,
            _ = probe.tick(), if probe_every.is_some() => {
                match route.connect(TransportKind::Quic, AUTO_QUIC_TIMEOUT).await {
                    Ok(quic) => {
                        fallback.set_udp_blocked(false, "probe answered");
                        return Ended::QuicBack(quic);
                    }
                    Err(e) => tracing::debug!(error = %e, "QUIC probe failed; staying on HTTPS"),
                }
            }
        }
    }
}

/// Lets streams in flight finish (bounded), then closes the connection.
async fn finish(
    connection: Arc<dyn TunnelConnection>,
    active: Arc<ActiveStreams>,
    server: tokio::task::JoinHandle<()>,
    reason: &str,
    grace: Duration,
) {
    let mut count = active.0.subscribe();
    tokio::select! {
        _ = tokio::time::timeout(grace, count.wait_for(|n| *n == 0)) => {}
        _ = connection.closed() => {}
    }
    server.abort();
    connection.close(reason);
}

/// Counts a stream as active while it is served.
struct ActiveGuard(Arc<ActiveStreams>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.0.send_modify(|n| *n -= 1);
    }
}

/// Streams being served on one connection; a drain waits for the count to reach zero.
struct ActiveStreams(tokio::sync::watch::Sender<usize>);

impl Default for ActiveStreams {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(0).0)
    }
}

impl ActiveStreams {
    fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.0.send_modify(|n| *n += 1);
        ActiveGuard(self.clone())
    }
}

/// Serves the streams the relay opens on `connection` (whose relay works at `wire_version`)
/// until it ends.
async fn serve_streams(
    connection: Arc<dyn TunnelConnection>,
    tenant: Arc<str>,
    limit: usize,
    wire_version: u32,
    sources: Arc<Sources>,
    active: Arc<ActiveStreams>,
) {
    while let Ok(stream) = connection.accept_stream().await {
        let (sources, tenant) = (sources.clone(), tenant.clone());
        let guard = active.enter();
        tokio::spawn(async move {
            let _guard = guard;
            let mut reader = FrameReader::new(stream.recv, limit);
            let mut writer = FrameWriter::new(stream.send, limit);
            let header: OpenHeader = match tokio::time::timeout(OPEN_TIMEOUT, reader.next()).await {
                Ok(Ok(Some(frame))) => match frame.parse_json(FrameKind::Open) {
                    Ok(header) => header,
                    Err(e) => return tracing::warn!(error = %e, "bad open header"),
                },
                Ok(Ok(None)) => return,
                Ok(Err(e)) => return tracing::warn!(error = %e, "bad open header"),
                Err(_) => return tracing::warn!("no open header within 10 s"),
            };
            if header.tenant != *tenant {
                let _ = writer.send(&Frame::close("tenant mismatch")).await;
                return tracing::error!(expected = %tenant, got = %header.tenant, "relay sent a stream for another tenant; refused");
            }
            match sources.get(&header.source) {
                Some(source) => source.serve(header, wire_version, reader, writer).await,
                None => {
                    tracing::warn!(source = %header.source, "relay asked for a source this client does not serve");
                    let _ = writer
                        .send(&Frame::close(format!(
                            "source {} is not served by this client",
                            header.source
                        )))
                        .await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_slot_warns_on_its_first_failure_then_seldom() {
        let mut failures = Failures::default();
        assert_eq!(failures.failed(), Some(1), "the first failure warns");
        for _ in 0..100 {
            assert_eq!(failures.failed(), None, "the next ones do not");
        }
        failures.last_warned = Instant::now().checked_sub(FAILURE_WARN_EVERY);
        assert_eq!(
            failures.failed(),
            Some(102),
            "a warning again after a while"
        );
        assert_eq!(
            Failures::default().failed(),
            Some(1),
            "a new streak warns again"
        );
    }
}
