//! The relays `connect` attaches to, and the connection slots it holds on them: looks relay
//! names up (again every [`RESOLVE_INTERVAL`]), plans the slots with [`super::relays`], and
//! starts and retires slot tasks to match.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::dial::{Dialer, Route};
use super::relays::{self, Addresses, Relay, Target};
use super::sources::Sources;
use super::{ClientError, Fallback};

/// How often relay names are looked up again. A fleet grows and shrinks in DNS: a relay added
/// behind the name must get a connection soon (agents routed to it find no tunnel until then),
/// and a removed one must stop being dialed. 30 s is as often as the reconnect backoff's cap
/// retries a dead relay, shorter than the TTLs such records usually have, and costs one lookup
/// a name.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// Longest wait for one lookup: a resolver that hangs must not hold up the others.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Looks up the addresses a relay name (`HOST:PORT`) resolves to: the system resolver
/// ([`tokio::net::lookup_host`]) unless replaced (an embedder with its own discovery, or a
/// test that needs a name with addresses the host's resolver does not give).
#[derive(Clone)]
pub struct Resolver(
    Arc<dyn Fn(String) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> + Send + Sync>,
);

impl Resolver {
    /// The system resolver.
    pub fn system() -> Self {
        Self::new(|relay| {
            Box::pin(async move { Ok(tokio::net::lookup_host(relay).await?.collect()) })
        })
    }

    /// A resolver calling `lookup` with `HOST:PORT`.
    pub fn new(
        lookup: impl Fn(String) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self(Arc::new(lookup))
    }

    async fn lookup(&self, relay: &str) -> Result<Vec<SocketAddr>, String> {
        match tokio::time::timeout(LOOKUP_TIMEOUT, (self.0)(relay.to_owned())).await {
            Ok(Ok(addrs)) => Ok(addrs),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} s", LOOKUP_TIMEOUT.as_secs())),
        }
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// What every slot task shares.
pub(super) struct Kit {
    /// The transport-fallback state.
    pub fallback: Arc<Fallback>,
    /// The sources served.
    pub sources: Arc<Sources>,
    /// Cancelled when `connect` stops (or a slot was refused).
    pub stop: CancellationToken,
}

/// A slot task running.
struct Running {
    /// The slot's number in logs.
    slot: usize,
    /// Cancelled to retire the slot (its connection drains).
    retire: CancellationToken,
    /// The task.
    task: tokio::task::Id,
}

/// The configured relays, what their names resolve to, and the slots held on them.
pub(super) struct Fleet {
    relays: Vec<Relay>,
    dialers: Vec<Arc<Dialer>>,
    known: Vec<Addresses>,
    resolver: Resolver,
    min_total: usize,
    kit: Kit,
    slots: BTreeMap<Target, Vec<Running>>,
    tasks: JoinSet<Result<(), ClientError>>,
    next_slot: usize,
}

impl Fleet {
    /// A fleet of `relays` (each with its dialer), holding at least `min_total` slots.
    pub(super) fn new(
        relays: Vec<Relay>,
        dialers: Vec<Arc<Dialer>>,
        resolver: Resolver,
        min_total: usize,
        kit: Kit,
    ) -> Self {
        let known = relays
            .iter()
            .map(|relay| relay.literal().map(Addresses::fixed).unwrap_or_default())
            .collect();
        Self {
            relays,
            dialers,
            known,
            resolver,
            min_total,
            kit,
            slots: BTreeMap::new(),
            tasks: JoinSet::new(),
            next_slot: 0,
        }
    }

    /// Looks the names up, starts the slots, and runs them (re-resolving every `interval`)
    /// until `connect` stops; fails when the relay refuses the tunnel.
    pub(super) async fn run(mut self, interval: Duration) -> Result<(), ClientError> {
        let names = self.relays.iter().any(|r| r.literal().is_none());
        if names {
            self.lookup_all(true).await;
        }
        self.apply();
        let addresses = self.known.iter().map(|k| k.current().len()).sum::<usize>();
        let by_name = self.slots.keys().filter(|t| t.addr.is_none()).count();
        let slots = self.slots.values().map(Vec::len).sum::<usize>();
        tracing::info!(
            relays = self.relays.len(),
            addresses,
            unresolved = by_name,
            slots,
            "connect attaching to {} relay(s) at {addresses} address(es){} with {slots} connection(s)",
            self.relays.len(),
            if by_name > 0 {
                format!(" ({by_name} name(s) not resolved yet)")
            } else {
                String::new()
            }
        );
        // While a name never resolved, look it up again sooner, as a slot reconnects.
        let mut unresolved = Backoff::default();
        let _ = unresolved.next_delay(); // the first lookup just ran
        let mut next = tokio::time::Instant::now() + self.next_lookup(&mut unresolved, interval);
        let mut result = Ok(());
        loop {
            tokio::select! {
                ended = self.tasks.join_next_with_id() => match ended {
                    // Slots end only when stopped or retired; all gone means `connect` stops.
                    None => break,
                    Some(Ok((id, Ok(())))) => self.forget(id),
                    Some(Ok((id, Err(error)))) => {
                        self.forget(id);
                        self.kit.stop.cancel();
                        if result.is_ok() {
                            result = Err(error);
                        }
                    }
                    Some(Err(e)) => {
                        self.forget(e.id());
                        if !self.kit.stop.is_cancelled() {
                            tracing::error!(error = %e, "a connection slot failed; starting another");
                            self.apply();
                        }
                    }
                },
                _ = tokio::time::sleep_until(next), if names && !self.kit.stop.is_cancelled() => {
                    let stop = self.kit.stop.clone();
                    tokio::select! {
                        _ = self.lookup_all(false) => self.apply(),
                        _ = stop.cancelled() => {}
                    }
                    next = tokio::time::Instant::now() + self.next_lookup(&mut unresolved, interval);
                }
            }
        }
        for dialer in &self.dialers {
            dialer.wait_idle().await;
        }
        result
    }

    fn next_lookup(&self, unresolved: &mut Backoff, interval: Duration) -> Duration {
        if self.known.iter().any(|k| k.current().is_empty()) {
            unresolved.next_delay().min(interval)
        } else {
            unresolved.reset();
            let _ = unresolved.next_delay();
            interval
        }
    }

    /// Looks up every relay name at once and takes in the results (the `first` time, what
    /// was found is told by the start line).
    async fn lookup_all(&mut self, first: bool) {
        let lookups = self
            .relays
            .iter()
            .filter(|relay| relay.literal().is_none())
            .map(|relay| async {
                let found = self.resolver.lookup(&relay.given).await;
                (relay.given.clone(), found)
            });
        let results = futures_util::future::join_all(lookups).await;
        for (given, found) in results {
            let Some(index) = self.relays.iter().position(|r| r.given == given) else {
                continue;
            };
            let update = self.known[index].update(found);
            if let Some(error) = update.warn {
                tracing::warn!(relay = %given, %error, kept = self.known[index].current().len(), "cannot look up the relay; keeping the addresses known");
            }
            if update.recovered {
                tracing::info!(relay = %given, "the relay's name resolves again");
            }
            if !first && (!update.added.is_empty() || !update.removed.is_empty()) {
                tracing::info!(relay = %given, added = ?update.added, removed = ?update.removed, "the relay's addresses changed");
            }
        }
    }

    /// Starts and retires slots to match the plan for what is known now.
    fn apply(&mut self) {
        if self.kit.stop.is_cancelled() {
            return;
        }
        let current: BTreeMap<Target, usize> = self
            .slots
            .iter()
            .map(|(t, running)| (*t, running.len()))
            .collect();
        let desired = relays::plan(&relays::targets(&self.known), &current, self.min_total);
        let changes = relays::diff(&current, &desired);
        if changes.is_empty() {
            return;
        }
        // Start first: a target that loses its slots still has the others serving meanwhile.
        for (target, count) in changes.start {
            for _ in 0..count {
                self.start(target);
            }
        }
        for (target, count) in changes.retire {
            let route = self.route(target);
            let Some(running) = self.slots.get_mut(&target) else {
                continue;
            };
            for slot in running.split_off(running.len().saturating_sub(count)) {
                tracing::info!(slot = slot.slot, relay = %route, "retiring the connection slot; its streams in flight finish");
                slot.retire.cancel();
            }
            if running.is_empty() {
                self.slots.remove(&target);
            }
        }
    }

    fn route(&self, target: Target) -> Route {
        Route {
            dialer: self.dialers[target.relay].clone(),
            addr: target.addr,
        }
    }

    fn start(&mut self, target: Target) {
        let slot = self.next_slot;
        self.next_slot += 1;
        let retire = self.kit.stop.child_token();
        let task = self
            .tasks
            .spawn(super::run_slot(
                slot,
                self.route(target),
                self.kit.fallback.clone(),
                self.kit.sources.clone(),
                self.kit.stop.clone(),
                retire.clone(),
            ))
            .id();
        self.slots
            .entry(target)
            .or_default()
            .push(Running { slot, retire, task });
    }

    /// Forgets the slot whose task ended (if it was not retired already).
    fn forget(&mut self, task: tokio::task::Id) {
        let found = self.slots.iter().find_map(|(target, running)| {
            running.iter().any(|r| r.task == task).then_some(*target)
        });
        if let Some(target) = found
            && let Some(running) = self.slots.get_mut(&target)
        {
            running.retain(|r| r.task != task);
            if running.is_empty() {
                self.slots.remove(&target);
            }
        }
    }
}

/// The dialers of `relays`, in order.
pub(super) fn dialers(
    relays: &[Relay],
    roots: &crate::transport::tls::Roots,
    proxy: Option<&str>,
    hello: &crate::wire::Hello,
) -> Result<Vec<Arc<Dialer>>, ClientError> {
    relays
        .iter()
        .map(|relay| {
            let proxy = match proxy {
                Some(url) => Some(super::proxy::Proxy::parse(url).map_err(ClientError::Config)?),
                None => super::proxy::Proxy::from_env(&relay.host)
                    .transpose()
                    .map_err(ClientError::Config)?,
            };
            Ok(Arc::new(Dialer::new(
                &relay.given,
                &relay.host,
                roots,
                proxy,
                hello.clone(),
            )?))
        })
        .collect()
}
