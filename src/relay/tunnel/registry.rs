//! Which tunnel serves which source, per tenant.
//!
//! Every key is `(tenant, source)`: a source name means nothing outside its tenant, so an agent
//! of another tenant can never be routed to it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::watch;

use super::departed::Departed;
use crate::govern::identity::TunnelGrant;
use crate::transport::{
    SILENT_AFTER, TransportError, TransportKind, TunnelConnection, TunnelStream,
};

/// What a tunnel's handshake agreed: the limits and the version both sides work at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    /// The largest frame payload the client accepts (the lower of both sides' limits).
    pub max_frame: usize,
    /// The wire version both sides speak ([`crate::wire::agree`]): what the relay may send
    /// this client (the rule in [`crate::wire::version`]).
    pub wire_version: u32,
    /// The `connect` instance on the other end (wire version 2; `None` from older clients):
    /// a resumed session that only that instance can serve is routed to it.
    pub connect: Option<Arc<str>>,
}

/// One connected tunnel client.
pub struct Tunnel {
    /// Process-unique id.
    pub id: u64,
    /// The tenant its token belongs to.
    pub tenant: Arc<str>,
    /// The sources it announced.
    pub sources: Vec<String>,
    /// The connection.
    pub connection: Arc<dyn TunnelConnection>,
    /// Seconds since the epoch when it registered.
    pub connected_since: u64,
    /// What the handshake agreed with the client.
    pub terms: Terms,
    /// What its token grants: which token it came with, and the sources it is bound to.
    pub grant: TunnelGrant,
    streams_opened: AtomicU64,
    streams_active: AtomicUsize,
    draining: std::sync::atomic::AtomicBool,
}

impl Tunnel {
    /// Opens an exchange stream on this tunnel, counted until the returned guard drops. Waits
    /// at most `timeout` for the peer's stream credit (QUIC's concurrent stream limit, HTTP/2's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`): a tunnel whose streams are all in use answers with
    /// an error instead of holding the agent forever.
    pub async fn open_stream(
        self: &Arc<Self>,
        timeout: std::time::Duration,
    ) -> Result<(TunnelStream, StreamGuard), TransportError> {
        let stream = tokio::time::timeout(timeout, self.connection.open_stream())
            .await
            .map_err(|_| {
                metrics::counter!(crate::metrics::REQUESTS, "outcome" => "stream_timeout")
                    .increment(1);
                TransportError::OpenTimeout(timeout.as_secs())
            })??;
        self.streams_opened.fetch_add(1, Ordering::Relaxed);
        self.streams_active.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::STREAMS_ACTIVE).increment(1.0);
        Ok((stream, StreamGuard(self.clone())))
    }

    /// Streams opened so far.
    pub fn streams_opened(&self) -> u64 {
        self.streams_opened.load(Ordering::Relaxed)
    }

    /// Streams open now.
    pub fn streams_active(&self) -> usize {
        self.streams_active.load(Ordering::Relaxed)
    }

    /// Whether the peer has not been heard from for [`SILENT_AFTER`] (see [`Registry::route`]).
    pub fn silent(&self) -> bool {
        self.connection.silent_for() >= SILENT_AFTER
    }
}

/// Counts a stream as active until dropped.
pub struct StreamGuard(Arc<Tunnel>);

impl StreamGuard {
    /// The tunnel the stream is on.
    pub fn tunnel(&self) -> &Arc<Tunnel> {
        &self.0
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams_active.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::STREAMS_ACTIVE).decrement(1.0);
    }
}

/// A row of `/api/tunnels`.
#[derive(Debug, Clone, Serialize)]
pub struct TunnelRow {
    /// Tunnel id.
    pub id: u64,
    /// Tenant.
    pub tenant: String,
    /// One of the sources (one row per source).
    pub source: String,
    /// `quic` or `https`.
    pub transport: String,
    /// The client's address.
    pub remote: String,
    /// RFC 3339 time of registration.
    pub connected_since: String,
    /// Seconds since the epoch of registration.
    pub connected_since_unix: u64,
    /// Round-trip time estimate in milliseconds.
    pub rtt_ms: f64,
    /// Exchange streams opened on this tunnel so far.
    pub streams_opened: u64,
    /// Exchange streams open now.
    pub streams_active: usize,
    /// Whether the tunnel is shutting down (no new sessions go to it).
    pub draining: bool,
    /// Milliseconds since its peer was last heard from (keep-alives included).
    pub silent_ms: u64,
    /// Whether that is so long that the peer is likely gone: new sessions go to another
    /// tunnel of the source while one is heard from (see [`Registry::route`]).
    pub silent: bool,
    /// Whether new sessions of this source go to this tunnel's token: `false` for a tunnel
    /// whose token is not the one serving the source (see [`Registry::route`]).
    pub serving: bool,
    /// The short digest of the tunnel's token (`sha256:` and 12 hex digits).
    pub token: String,
    /// The wire version the relay and this client agreed on: during an upgrade, which
    /// `connect`s still speak an older one.
    pub wire_version: u32,
}

/// A route key: `(tenant, source)`.
type RouteKey = (Arc<str>, String);

/// The relay's live tunnels.
pub struct Registry {
    routes: RwLock<HashMap<RouteKey, Vec<Arc<Tunnel>>>>,
    tunnels: RwLock<HashMap<u64, Arc<Tunnel>>>,
    next_id: AtomicU64,
    changed: watch::Sender<u64>,
    /// `connect` instances whose last tunnel left a moment ago (see [`Departed`]).
    departed: Mutex<Departed>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            routes: RwLock::default(),
            tunnels: RwLock::default(),
            next_id: AtomicU64::new(1),
            changed: watch::channel(0).0,
            departed: Mutex::default(),
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Registry {
    /// Registers a tunnel with `grant` (its token's tenant and bindings) serving `sources`.
    /// A source already served under another token stays with the serving token unless only
    /// the new one is bound to it by name (see [`Registry::route`]); either way the conflict is
    /// logged as a warning naming both tokens and which one serves.
    pub fn register(
        &self,
        grant: TunnelGrant,
        sources: Vec<String>,
        connection: Arc<dyn TunnelConnection>,
        terms: Terms,
    ) -> Arc<Tunnel> {
        let tenant = grant.tenant.clone();
        let tunnel = Arc::new(Tunnel {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tenant: tenant.clone(),
            sources,
            connection,
            connected_since: unix_now(),
            terms,
            grant,
            streams_opened: AtomicU64::new(0),
            streams_active: AtomicUsize::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        {
            let mut routes = self.routes.write();
            for source in &tunnel.sources {
                let list = routes.entry((tenant.clone(), source.clone())).or_default();
                list.push(tunnel.clone());
                warn_on_conflict(&tunnel, source, list);
            }
        }
        let mut tunnels = self.tunnels.write();
        if let Some(connect) = &tunnel.terms.connect {
            let new = !tunnels
                .values()
                .any(|t| t.tenant == tenant && t.terms.connect.as_deref() == Some(&**connect));
            let (sources, now) = (&tunnel.sources, std::time::Instant::now());
            self.departed
                .lock()
                .attached(&tenant, connect, sources, new, now);
        }
        tunnels.insert(tunnel.id, tunnel.clone());
        drop(tunnels);
        metrics::gauge!(crate::metrics::TUNNELS, "transport" => tunnel.connection.kind().to_string()).increment(1.0);
        self.changed.send_modify(|n| *n += 1);
        tunnel
    }

    /// Routes nothing new to `tunnel` (it is shutting down); its streams in flight go on.
    pub fn drain(&self, tunnel: &Tunnel) {
        tunnel.draining.store(true, Ordering::Relaxed);
        self.remove_routes(tunnel);
    }

    fn remove_routes(&self, tunnel: &Tunnel) {
        let mut routes = self.routes.write();
        for source in &tunnel.sources {
            let key = (tunnel.tenant.clone(), source.clone());
            if let Some(list) = routes.get_mut(&key) {
                list.retain(|t| t.id != tunnel.id);
                if list.is_empty() {
                    routes.remove(&key);
                }
            }
        }
        drop(routes);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Removes a tunnel (its connection ended).
    pub fn unregister(&self, tunnel: &Tunnel) {
        // The departure first, under the same lock as the removal (two tunnels of one
        // `connect` ending together must not each count on the other): whoever finds no route
        // to its `connect` from now on finds it reconnecting. Not when it said it drains (it
        // stops, or moves to another of its tunnels).
        let mut tunnels = self.tunnels.write();
        if tunnels.remove(&tunnel.id).is_some() {
            metrics::gauge!(crate::metrics::TUNNELS, "transport" => tunnel.connection.kind().to_string()).decrement(1.0);
        }
        if let Some(connect) = &tunnel.terms.connect
            && !tunnel.draining.load(Ordering::Relaxed)
            && !tunnels
                .values()
                .any(|t| t.tenant == tunnel.tenant && t.terms.connect.as_ref() == Some(connect))
        {
            let now = std::time::Instant::now();
            let sources = &tunnel.sources;
            self.departed
                .lock()
                .left(&tunnel.tenant, connect, sources, now);
        }
        drop(tunnels);
        self.remove_routes(tunnel);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Whether `connect` of `tenant` had a tunnel here a moment ago and may attach again
    /// (see [`Departed`]): a session only it holds is reconnecting, not gone.
    pub fn reconnecting(&self, tenant: &str, connect: &str) -> bool {
        let now = std::time::Instant::now();
        self.departed.lock().reconnecting(tenant, connect, now)
    }

    /// The tunnel a new session of `tenant` with `source` goes to: among the tunnels of the
    /// token serving the source (one token serves a source at a time: see [`serving_token`]),
    /// those whose peer is heard from before [silent](crate::transport::SILENT_AFTER) ones (a
    /// `connect` killed without a word leaves its QUIC connection looking open until the idle
    /// timeout, while its replacement is already there), then QUIC before the HTTPS fallback (a
    /// client that found UDP again moves new sessions back to it), and among those the one
    /// carrying the fewest streams, the newest on a tie.
    pub fn route(&self, tenant: &str, source: &str) -> Option<Arc<Tunnel>> {
        let routes = self.routes.read();
        let all = routes.get(&(Arc::from(tenant), source.to_owned()))?;
        let owner = serving_token(source, all)?;
        // Newest first, so that `min_by_key` (which keeps the first of equals) picks the newest.
        all.iter()
            .rev()
            .filter(|t| t.grant.token == owner)
            .min_by_key(|t| {
                (
                    t.silent(),
                    t.connection.kind() != TransportKind::Quic,
                    t.streams_active(),
                )
            })
            .cloned()
    }

    /// The tunnel a resumed session goes to, among those that can resume (wire version 2):
    /// one of the `connect` instance `connect` while it is attached (it holds the upstream
    /// session) and, when another could take over, heard from; else, when `portable` (any
    /// `connect` can resume it), the one [`Registry::route`] would pick among those of wire
    /// version 2; `None` when the session's upstream went with its `connect`, or no tunnel
    /// reaches the source now.
    pub fn route_resumed(
        &self,
        tenant: &str,
        source: &str,
        connect: Option<&str>,
        portable: bool,
    ) -> Option<Arc<Tunnel>> {
        let routes = self.routes.read();
        let all = routes.get(&(Arc::from(tenant), source.to_owned()))?;
        let owner = serving_token(source, all)?;
        let best = |tunnels: &mut dyn Iterator<Item = &Arc<Tunnel>>| {
            tunnels
                .filter(|t| t.grant.token == owner && t.terms.wire_version >= 2)
                .min_by_key(|t| {
                    (
                        t.silent(),
                        t.connection.kind() != TransportKind::Quic,
                        t.streams_active(),
                    )
                })
                .cloned()
        };
        // Its own `connect`, unless that went silent and another can take the session over.
        let own = connect.and_then(|connect| {
            best(&mut all.iter().rev().filter(|t| {
                t.terms.connect.as_deref() == Some(connect) && !(portable && t.silent())
            }))
        });
        own.or_else(|| portable.then(|| best(&mut all.iter().rev())).flatten())
    }

    /// One row per (tunnel, source), for `/api/tunnels`.
    pub fn rows(&self) -> Vec<TunnelRow> {
        let tunnels = self.tunnels.read();
        let routes = self.routes.read();
        let routes = &routes;
        let mut rows: Vec<TunnelRow> = tunnels
            .values()
            .flat_map(|t| {
                t.sources.iter().map(move |source| TunnelRow {
                    serving: routes
                        .get(&(t.tenant.clone(), source.clone()))
                        .and_then(|list| serving_token(source, list))
                        .is_some_and(|owner| owner == t.grant.token),
                    token: t.grant.token.short(),
                    wire_version: t.terms.wire_version,
                    id: t.id,
                    tenant: t.tenant.to_string(),
                    source: source.clone(),
                    transport: t.connection.kind().to_string(),
                    remote: t.connection.remote_addr().to_string(),
                    connected_since: rfc3339(t.connected_since),
                    connected_since_unix: t.connected_since,
                    rtt_ms: t.connection.rtt().as_secs_f64() * 1000.0,
                    streams_opened: t.streams_opened(),
                    streams_active: t.streams_active(),
                    draining: t.draining.load(Ordering::Relaxed),
                    silent_ms: u64::try_from(t.connection.silent_for().as_millis())
                        .unwrap_or(u64::MAX),
                    silent: t.silent(),
                })
            })
            .collect();
        rows.sort_by(|a, b| (a.id, &a.source).cmp(&(b.id, &b.source)));
        rows
    }

    /// Waits until `tenant` has a route to `source` (tests and the demo wait on readiness).
    pub async fn wait_for(&self, tenant: &str, source: &str) {
        self.wait_until(|registry| registry.route(tenant, source).is_some())
            .await;
    }

    /// Waits until `done` holds, checking it after every change of the routes or tunnels
    /// (tests wait on a tunnel draining or leaving this way).
    pub async fn wait_until(&self, done: impl Fn(&Self) -> bool) {
        let mut changes = self.changed.subscribe();
        while !done(self) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

/// The token whose tunnels serve `source` among the tunnels announcing it: tunnels whose token
/// is bound to the source by name (`[[tenants.tunnels]]`) before unbound ones, and among those
/// the token of the oldest tunnel. So a second token announcing a served source never takes
/// its sessions unless the operator bound that token to it and not the serving one; another
/// token's tunnels wait as standbys and serve once every tunnel of the serving token is gone.
fn serving_token(source: &str, tunnels: &[Arc<Tunnel>]) -> Option<crate::govern::SecretHash> {
    let bound = tunnels.iter().any(|t| t.grant.is_bound_to(source));
    tunnels
        .iter()
        .filter(|t| !bound || t.grant.is_bound_to(source))
        .min_by_key(|t| t.id)
        .map(|t| t.grant.token)
}

/// Logs a warning when `tunnel` announces `source` already announced under another token
/// (`list` holds every tunnel announcing it, `tunnel` included): which token serves and why.
fn warn_on_conflict(tunnel: &Tunnel, source: &str, list: &[Arc<Tunnel>]) {
    let others: Vec<String> = list
        .iter()
        .filter(|t| t.grant.token != tunnel.grant.token)
        .map(|t| t.grant.token.short())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if others.is_empty() {
        return;
    }
    metrics::counter!(crate::metrics::SOURCE_CONFLICTS).increment(1);
    let Some(owner) = serving_token(source, list) else {
        return;
    };
    let token = tunnel.grant.token.short();
    let remote = tunnel.connection.remote_addr();
    let (serving, why) = if owner == tunnel.grant.token {
        (
            token.clone(),
            "the new tunnel's token is bound to this source by name and the other is not; the other's tunnels get no new sessions",
        )
    } else if list
        .iter()
        .any(|t| t.grant.token == owner && t.grant.is_bound_to(source))
        && !tunnel.grant.is_bound_to(source)
    {
        (
            owner.short(),
            "the serving token is bound to this source by name and the new one is not; the new tunnel gets no sessions of it",
        )
    } else {
        (
            owner.short(),
            "it served the source first; the new tunnel gets no sessions of it unless every tunnel of the serving token goes",
        )
    };
    tracing::warn!(
        tenant = %tunnel.tenant,
        source,
        %remote,
        tunnel = tunnel.id,
        token = %token,
        already_served_by = %others.join(", "),
        serving = %serving,
        "SOURCE ANNOUNCED UNDER A SECOND TUNNEL TOKEN: {why}; if this tunnel is not yours, revoke its token, and bind tokens to sources with [[tenants.tunnels]]"
    );
}

/// Formats seconds since the epoch as an RFC 3339 UTC timestamp.
pub(crate) fn rfc3339(secs: u64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm): no date crate needed for one format.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::transport::BoxFuture;
    use crate::wire;

    const TERMS: Terms = Terms {
        max_frame: 1024,
        wire_version: wire::PROTOCOL_VERSION,
        connect: None,
    };

    /// A connection whose peer never grants another stream (its stream credit is used up), of
    /// a given transport, last heard from a given time ago.
    struct NoCredit {
        kind: TransportKind,
        silent_for: Duration,
    }

    const HEARD: NoCredit = NoCredit {
        kind: TransportKind::Quic,
        silent_for: Duration::ZERO,
    };

    impl TunnelConnection for NoCredit {
        fn open_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>> {
            Box::pin(std::future::pending())
        }
        fn accept_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>> {
            Box::pin(std::future::pending())
        }
        fn close(&self, _reason: &str) {}
        fn closed(&self) -> BoxFuture<'_, TransportError> {
            Box::pin(std::future::pending())
        }
        fn kind(&self) -> TransportKind {
            self.kind
        }
        fn remote_addr(&self) -> SocketAddr {
            SocketAddr::from(([127, 0, 0, 1], 1))
        }
        fn rtt(&self) -> Duration {
            Duration::ZERO
        }
        fn silent_for(&self) -> Duration {
            self.silent_for
        }
    }

    fn grant(token: &str) -> crate::govern::identity::TunnelGrant {
        crate::govern::identity::TunnelGrant {
            tenant: "acme".into(),
            sources: None,
            token: crate::govern::SecretHash::of(token),
        }
    }

    #[test]
    fn a_silent_tunnel_gets_new_sessions_only_when_every_tunnel_of_the_source_is_silent() {
        let registry = Registry::default();
        let register = |kind, silent_for| {
            registry.register(
                grant("one token"),
                vec!["s".into()],
                Arc::new(NoCredit { kind, silent_for }),
                TERMS.clone(),
            )
        };
        // A QUIC tunnel whose connect was killed: still registered, not heard from for 6 s.
        let dead = register(TransportKind::Quic, Duration::from_secs(6));
        assert!(dead.silent());
        assert_eq!(registry.route("acme", "s").map(|t| t.id), Some(dead.id));
        // Its replacement came up on the HTTPS fallback: it gets the new sessions, although
        // QUIC is preferred among tunnels heard from.
        let replacement = register(TransportKind::Https, Duration::from_millis(100));
        assert_eq!(
            registry.route("acme", "s").map(|t| t.id),
            Some(replacement.id)
        );
        let rows = registry.rows();
        assert_eq!(
            rows.iter()
                .map(|r| (r.id, r.silent, r.silent_ms))
                .collect::<Vec<_>>(),
            vec![(dead.id, true, 6_000), (replacement.id, false, 100)]
        );
        // A QUIC tunnel heard from is preferred again.
        let quic = register(TransportKind::Quic, Duration::ZERO);
        assert_eq!(registry.route("acme", "s").map(|t| t.id), Some(quic.id));
        // Liveness never moves a source to another token's tunnel.
        let registry = Registry::default();
        let serving = registry.register(
            grant("one token"),
            vec!["s".into()],
            Arc::new(NoCredit {
                kind: TransportKind::Quic,
                silent_for: Duration::from_secs(60),
            }),
            TERMS.clone(),
        );
        registry.register(
            grant("another token"),
            vec!["s".into()],
            Arc::new(HEARD),
            TERMS.clone(),
        );
        assert_eq!(registry.route("acme", "s").map(|t| t.id), Some(serving.id));
    }

    #[tokio::test]
    async fn opening_a_stream_without_credit_ends_with_an_error_in_time() {
        let registry = Registry::default();
        let tunnel = registry.register(
            grant("a tunnel token"),
            vec!["s".into()],
            Arc::new(HEARD),
            TERMS.clone(),
        );
        // The peer never grants the stream: the wait ends at the timeout, whatever the speed.
        let opened = tokio::time::timeout(
            Duration::from_secs(30),
            tunnel.open_stream(Duration::from_millis(50)),
        )
        .await
        .expect("opening gives up at its own timeout");
        let Err(error) = opened else {
            panic!("no stream can open");
        };
        assert!(matches!(error, TransportError::OpenTimeout(0)), "{error}");
        assert!(error.to_string().contains("no new stream"), "{error}");
        assert_eq!(tunnel.streams_active(), 0);
    }

    #[test]
    fn rfc3339() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_651_200), "2026-11-26T00:00:00Z");
        assert_eq!(super::rfc3339(951_782_400 + 3_661), "2000-02-29T01:01:01Z");
    }
}
