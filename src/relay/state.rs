//! What every handler shares: the tunnels, sessions and calls, the current governance (swapped
//! whole by a reload), the limits, and the shutdown tokens.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

use super::calls::{Activity, Calls};
use super::governance::Governance;
use super::session::tasks::{TaskBinding, TaskOwners};
use super::session::{SessionCaps, Sessions, Transport};
use super::tunnel::Registry;
use super::tunnel::accept::TunnelHost;
use crate::config::LimitsSection;
use crate::govern::Identity;
use crate::govern::identity::TunnelGrant;

/// What every handler shares.
pub struct RelayState {
    /// This relay instance's id (`[fleet] id`, else host name and tunnel port): the admin
    /// endpoints and metrics name it, the audit trail keys its chains by it.
    pub instance: Arc<str>,
    pub(super) governance: RwLock<Arc<Governance>>,
    /// Live tunnels.
    pub registry: Registry,
    /// Live agent sessions.
    pub sessions: Sessions,
    /// Where finished calls go: the audit trail, metrics, the activity feed.
    pub calls: Arc<Calls>,
    /// Live activity for the admin `/activity` page: every finished call reaches it through
    /// [`Calls`].
    pub activity: Arc<Activity>,
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
    /// The keys that seal session ids (see [`super::fleet`]).
    pub fleet: Arc<super::fleet::FleetKeys>,
    /// The `requestState`s retried here, each good once (see [`super::session::input`]).
    pub(crate) spent_states: super::session::input::SpentStates,
    /// The tasks created through this relay, for `tasks/list` (see [`super::session::tasks`]).
    pub(crate) task_owners: Arc<TaskOwners>,
    /// Whether the relay is still starting (a relay of a fleet, until a tunnel registers or
    /// its startup window ends): `/healthz` answers `503 starting`, and an agent request for a
    /// source no tunnel reaches here gets `503` with `Retry-After` rather than `404`.
    pub starting: Startup,
    /// Cancelled as soon as the relay is told to stop: `/healthz` answers 503 and agent
    /// responses carry `Connection: close`, while agents are still served for the drain delay
    /// (`[fleet] drain_delay_secs`), so a load balancer moves new requests to other relays.
    pub unready: CancellationToken,
    /// Cancelled when the drain delay is over: tunnels are told to drain, standalone agent
    /// streams end, nothing new is accepted.
    pub shutdown: CancellationToken,
    /// Cancelled when the drain period is over: what is still in flight ends with an error
    /// that names the shutdown, and tunnel connections close.
    pub stop: CancellationToken,
}

/// A relay's startup: unready from its start until the first tunnel registers, or until its
/// window ends (a fleet with no `connect` at all must still become healthy). A zero window (a
/// relay outside a fleet) is never starting.
#[derive(Debug)]
pub struct Startup {
    /// When the relay started.
    began: Instant,
    /// The longest it stays starting.
    window: Duration,
    /// Whether a tunnel has registered.
    attached: AtomicBool,
}

impl Startup {
    /// A relay starting now, unready for at most `window`.
    pub fn new(window: Duration) -> Self {
        Self::since(Instant::now(), window)
    }

    /// A relay that started at `began`.
    fn since(began: Instant, window: Duration) -> Self {
        Self {
            began,
            window,
            attached: AtomicBool::new(false),
        }
    }

    /// Whether the relay is still starting: no tunnel has registered, and the window is not
    /// over.
    pub fn is_starting(&self) -> bool {
        !self.attached.load(Ordering::Acquire) && self.began.elapsed() < self.window
    }

    /// Records that a tunnel registered; returns whether that ended the startup (the first,
    /// within the window).
    pub fn tunnel_registered(&self) -> bool {
        let starting = self.is_starting();
        !self.attached.swap(true, Ordering::AcqRel) && starting
    }
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
    pub fn session_caps(&self) -> SessionCaps {
        SessionCaps::of(&self.governance().limits)
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

    /// The handle a session id this fleet sealed names: what the relays' and `connect`'s logs
    /// and the audit trail (`mcp.session.id`) call the session, short and the same on every
    /// relay. `None` for an id this fleet did not seal.
    pub fn session_handle(&self, session_id: &str) -> Option<String> {
        super::session::SessionClaims::open(&self.fleet, session_id).map(|claims| claims.handle)
    }

    /// The current credentials and policy.
    pub fn governance(&self) -> Arc<Governance> {
        self.governance.read().clone()
    }

    /// Replaces the credentials and policy at once: requests that already read them finish
    /// with the old ones, every later request sees the new ones. Open sessions and tunnels
    /// stay. Returns the replaced governance.
    pub fn reload(&self, governance: Governance) -> Arc<Governance> {
        self.calls.metric_names().configure(&governance.policy);
        std::mem::replace(&mut *self.governance.write(), Arc::new(governance))
    }
}

impl RelayState {
    /// `who`'s task ids at `source` (see [`super::session::tasks`]).
    pub(crate) fn task_binding(&self, who: &Identity, source: &str) -> TaskBinding {
        TaskBinding::new(&self.fleet, &self.task_owners, who, source)
    }

    /// Ends the sessions that are idle past `session_idle_secs`, whose tunnel stream ended, or
    /// (HTTP+SSE) whose agent did not initialize within `request_timeout_secs`; returns how
    /// many. The relay does this every 30 s.
    pub async fn sweep_sessions(&self) -> usize {
        let expired = self
            .sessions
            .sweep(self.session_idle(), self.request_timeout());
        for session in &expired {
            match session.transport {
                // Only this relay is done with it: the stream ends, and `connect` keeps the
                // upstream session for another relay of the fleet to resume (or ends it once
                // no stream has carried it for its own idle time).
                Transport::Streamable => {
                    tracing::info!(session = %session.id, tenant = %session.tenant, "session idle here; its stream ends")
                }
                Transport::LegacySse => {
                    tracing::info!(session = %session.id, tenant = %session.tenant, "session expired");
                    session.channel.close("session expired").await;
                }
            }
        }
        expired.len()
    }
}

impl TunnelHost for RelayState {
    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn tunnel_grant(&self, token: &str) -> Option<TunnelGrant> {
        self.governance().keyring.tunnel_grant(token).cloned()
    }

    fn max_frame(&self) -> usize {
        self.limits.max_message_bytes
    }

    fn registered(&self, tenant: &str, sources: &[String]) {
        // A registered source is one metrics may name (see `calls::metric_names`).
        self.calls.metric_names().learn_sources(tenant, sources);
    }

    fn routed(&self) {
        if self.starting.tunnel_registered() {
            tracing::info!(
                relay = %self.instance,
                "ready: the first tunnel registered; /healthz answers 200"
            );
        }
    }

    fn draining(&self) -> &CancellationToken {
        &self.shutdown
    }

    fn stopped(&self) -> &CancellationToken {
        &self.stop
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_is_starting_until_a_tunnel_registers_or_its_window_ends() {
        let window = Duration::from_secs(10);
        let starting = Startup::new(window);
        assert!(starting.is_starting());
        assert!(
            starting.tunnel_registered(),
            "the first tunnel ends the startup"
        );
        assert!(!starting.is_starting());
        assert!(!starting.tunnel_registered(), "only the first one");

        let over = Startup::since(Instant::now() - window, window);
        assert!(
            !over.is_starting(),
            "a window that ended: ready without a tunnel"
        );
        assert!(!over.tunnel_registered(), "nothing left to end");

        assert!(
            !Startup::new(Duration::ZERO).is_starting(),
            "a relay outside a fleet is ready at once"
        );
    }
}
