//! The live sessions of all tenants, with the caps on how many a caller, a tenant and a source
//! hold open (stateless listen streams count too).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::sessions::{Session, Transport};
use crate::govern::Identity;

/// Caps on open sessions (and stateless listen streams), from `[limits]`; 0 is no cap.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionCaps {
    /// Per caller (tenant and subject).
    pub per_key: usize,
    /// Per tenant.
    pub per_tenant: usize,
    /// Per tenant and source.
    pub per_source: usize,
}

impl SessionCaps {
    /// The caps `[limits]` sets.
    pub fn of(limits: &crate::config::LimitsSection) -> Self {
        Self {
            per_key: limits.max_sessions_per_key,
            per_tenant: limits.max_sessions_per_tenant,
            per_source: limits.max_sessions_per_source,
        }
    }
}

/// A new session (or listen stream) refused by a cap; the text says which, for the agent.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "too many open sessions: {what} already holds {cap}, its limit; end one (DELETE the \
     session) or wait until an idle one expires"
)]
pub struct CapReached {
    /// Which holder: `this caller`, `tenant acme`, `source everything of tenant acme`.
    pub what: String,
    /// The cap.
    pub cap: usize,
}

/// Who holds an open session or listen stream, for the caps.
#[derive(Debug, Clone)]
struct Holder {
    tenant: Arc<str>,
    subject: Arc<str>,
    source: String,
}

/// The live sessions of all tenants, and the stateless listen streams open now.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
    /// Open stateless `subscriptions/listen` streams, by a number of their own.
    listens: Arc<Mutex<HashMap<u64, Holder>>>,
    next_listen: std::sync::atomic::AtomicU64,
}

/// An open listen stream, counted against the caps until dropped.
pub struct ListenGuard {
    id: u64,
    listens: Arc<Mutex<HashMap<u64, Holder>>>,
}

impl Drop for ListenGuard {
    fn drop(&mut self) {
        self.listens.lock().remove(&self.id);
    }
}

impl Sessions {
    /// Adds a session.
    pub fn insert(&self, session: Arc<Session>) {
        self.map.lock().insert(session.id.clone(), session);
        metrics::gauge!(crate::metrics::SESSIONS_ACTIVE).increment(1.0);
    }

    /// Adds a session unless a cap refuses it (counted with the listen streams).
    pub fn try_insert(&self, session: Arc<Session>, caps: SessionCaps) -> Result<(), CapReached> {
        {
            let mut map = self.map.lock();
            self.check(&map, &session.identity(), &session.source, caps)?;
            map.insert(session.id.clone(), session);
        }
        metrics::gauge!(crate::metrics::SESSIONS_ACTIVE).increment(1.0);
        Ok(())
    }

    /// Adds a session resumed here (its id came from another relay, or from before a restart,
    /// or its tunnel went silent) unless a cap refuses it; when a concurrent request resumed it
    /// first on a live tunnel, that one is returned instead (and `session`, with its stream,
    /// is dropped).
    pub fn adopt(
        &self,
        session: Arc<Session>,
        caps: SessionCaps,
    ) -> Result<Arc<Session>, CapReached> {
        {
            let mut map = self.map.lock();
            if let Some(existing) = map
                .get(&session.id)
                .filter(|s| s.channel.closed_reason().is_none() && !s.channel.tunnel_silent())
            {
                return Ok(existing.clone());
            }
            self.check(&map, &session.identity(), &session.source, caps)?;
            if map.insert(session.id.clone(), session.clone()).is_some() {
                // It replaced one whose stream had ended: the count stays.
                return Ok(session);
            }
        }
        metrics::gauge!(crate::metrics::SESSIONS_ACTIVE).increment(1.0);
        Ok(session)
    }

    /// Whether `who` may open one more session (or listen stream) with `source` now: checked
    /// before a tunnel stream (and perhaps an upstream process) is opened for it.
    pub fn admit(&self, who: &Identity, source: &str, caps: SessionCaps) -> Result<(), CapReached> {
        let map = self.map.lock();
        self.check(&map, who, source, caps)
    }

    /// Counts a listen stream of `who` with `source` while the guard lives, unless a cap
    /// refuses it.
    pub fn open_listen(
        &self,
        who: &Identity,
        source: &str,
        caps: SessionCaps,
    ) -> Result<ListenGuard, CapReached> {
        let map = self.map.lock();
        self.check(&map, who, source, caps)?;
        let id = self
            .next_listen
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.listens.lock().insert(
            id,
            Holder {
                tenant: who.tenant.clone(),
                subject: who.subject.clone(),
                source: source.to_owned(),
            },
        );
        Ok(ListenGuard {
            id,
            listens: self.listens.clone(),
        })
    }

    /// Open listen streams now.
    pub fn listens(&self) -> usize {
        self.listens.lock().len()
    }

    /// Checks the caps against the sessions in `map` and the listen streams. Sessions whose
    /// tunnel stream has ended do not count (the sweep removes them).
    fn check(
        &self,
        map: &HashMap<String, Arc<Session>>,
        who: &Identity,
        source: &str,
        caps: SessionCaps,
    ) -> Result<(), CapReached> {
        let listens = self.listens.lock();
        let holders = map
            .values()
            .filter(|s| s.channel.closed_reason().is_none())
            .map(|s| (&s.tenant, &s.subject, s.source.as_str()))
            .chain(
                listens
                    .values()
                    .map(|h| (&h.tenant, &h.subject, h.source.as_str())),
            );
        let (mut key, mut tenant, mut by_source) = (0, 0, 0);
        for (t, subject, s) in holders {
            if *t != who.tenant {
                continue;
            }
            tenant += 1;
            key += usize::from(*subject == who.subject);
            by_source += usize::from(s == source);
        }
        let refuse = |what: String, cap: usize| {
            tracing::info!(tenant = %who.tenant, subject = %who.subject, source, %what, cap, "session refused: cap reached");
            metrics::counter!(crate::metrics::REQUESTS, "outcome" => "session_cap").increment(1);
            Err(CapReached { what, cap })
        };
        if caps.per_key > 0 && key >= caps.per_key {
            return refuse(format!("caller {}", who.subject), caps.per_key);
        }
        if caps.per_source > 0 && by_source >= caps.per_source {
            return refuse(
                format!("source {source} of tenant {}", who.tenant),
                caps.per_source,
            );
        }
        if caps.per_tenant > 0 && tenant >= caps.per_tenant {
            return refuse(format!("tenant {}", who.tenant), caps.per_tenant);
        }
        Ok(())
    }

    /// The session `id`, if it exists, belongs to `who` and talks to `source` over `transport`;
    /// anything else
    /// reads as "no such session" (a foreign id reveals nothing). A session whose tunnel
    /// stream has ended is removed here.
    pub fn get(
        &self,
        id: &str,
        who: &Identity,
        source: &str,
        transport: Transport,
    ) -> Option<Arc<Session>> {
        let session = self.map.lock().get(id).cloned()?;
        if session.tenant != who.tenant
            || session.subject != who.subject
            || session.source != source
            || session.transport != transport
        {
            return None;
        }
        if session.channel.closed_reason().is_some() {
            self.remove(id);
            return None;
        }
        session.touch();
        Some(session)
    }

    /// Removes and returns a session.
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        let removed = self.map.lock().remove(id);
        if removed.is_some() {
            metrics::gauge!(crate::metrics::SESSIONS_ACTIVE).decrement(1.0);
        }
        removed
    }

    /// Removes sessions idle longer than `idle` or whose stream ended, and HTTP+SSE sessions
    /// whose agent has not initialized within `init_grace` (their stream, and perhaps an
    /// upstream process, opened with the GET alone); returns them.
    pub fn sweep(&self, idle: Duration, init_grace: Duration) -> Vec<Arc<Session>> {
        let expired: Vec<String> = self
            .map
            .lock()
            .values()
            .filter(|s| {
                let idle_for = s.idle_for();
                idle_for > idle
                    || s.channel.closed_reason().is_some()
                    || (s.transport == Transport::LegacySse
                        && !s.knows_version()
                        && s.age() > init_grace)
            })
            .map(|s| s.id.clone())
            .collect();
        expired.iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Live sessions now.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live sessions of `tenant` (of all tenants when `None`), for the activity page.
    pub fn count(&self, tenant: Option<&str>) -> usize {
        let map = self.map.lock();
        match tenant {
            None => map.len(),
            Some(tenant) => map.values().filter(|s| *s.tenant == *tenant).count(),
        }
    }
}
