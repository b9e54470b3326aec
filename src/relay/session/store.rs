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
    map: Mutex<Live>,
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

/// The sessions by id, with how many each tenant, caller and source holds: the caps are
/// checked against these counts in constant time, and the sessions scanned only near a cap
/// (the counts include sessions whose tunnel stream ended and the sweep has not yet removed,
/// which the scan leaves out).
#[derive(Default)]
struct Live {
    by_id: HashMap<String, Arc<Session>>,
    per_tenant: HashMap<Arc<str>, usize>,
    per_key: HashMap<(Arc<str>, Arc<str>), usize>,
    per_source: HashMap<(Arc<str>, String), usize>,
}

impl Live {
    fn insert(&mut self, session: Arc<Session>) -> Option<Arc<Session>> {
        let counted = (
            session.tenant.clone(),
            session.subject.clone(),
            session.source.clone(),
        );
        let replaced = self.by_id.insert(session.id.clone(), session);
        if let Some(old) = &replaced {
            self.uncount(old);
        }
        let (tenant, subject, source) = counted;
        *self.per_tenant.entry(tenant.clone()).or_default() += 1;
        *self.per_key.entry((tenant.clone(), subject)).or_default() += 1;
        *self.per_source.entry((tenant, source)).or_default() += 1;
        replaced
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Session>> {
        let removed = self.by_id.remove(id)?;
        self.uncount(&removed);
        Some(removed)
    }

    fn uncount(&mut self, session: &Session) {
        fn down<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
            if let Some(count) = map.get_mut(&key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    map.remove(&key);
                }
            }
        }
        down(&mut self.per_tenant, session.tenant.clone());
        down(
            &mut self.per_key,
            (session.tenant.clone(), session.subject.clone()),
        );
        down(
            &mut self.per_source,
            (session.tenant.clone(), session.source.clone()),
        );
    }

    /// Whether `who` is below every cap with `extra` more holders (its listen streams),
    /// counting every session, ended ones too: when it is, the exact count is too.
    fn clearly_below(
        &self,
        who: &Identity,
        source: &str,
        caps: SessionCaps,
        extra: [usize; 3],
    ) -> bool {
        let get = |count: Option<&usize>| count.copied().unwrap_or(0);
        let key = get(self.per_key.get(&(who.tenant.clone(), who.subject.clone()))) + extra[0];
        let by_source = get(self
            .per_source
            .get(&(who.tenant.clone(), source.to_owned())))
            + extra[1];
        let tenant = get(self.per_tenant.get(&who.tenant)) + extra[2];
        let below = |count: usize, cap: usize| cap == 0 || count < cap;
        below(key, caps.per_key)
            && below(by_source, caps.per_source)
            && below(tenant, caps.per_tenant)
    }
}

impl Sessions {
    /// Adds a session.
    pub fn insert(&self, session: Arc<Session>) {
        self.map.lock().insert(session);
        metrics::gauge!(crate::metrics::SESSIONS_ACTIVE).increment(1.0);
    }

    /// Adds a session unless a cap refuses it (counted with the listen streams).
    pub fn try_insert(&self, session: Arc<Session>, caps: SessionCaps) -> Result<(), CapReached> {
        {
            let mut map = self.map.lock();
            self.check(&map, &session.identity(), &session.source, caps)?;
            map.insert(session);
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
                .by_id
                .get(&session.id)
                .filter(|s| s.channel.closed_reason().is_none() && !s.channel.tunnel_silent())
            {
                return Ok(existing.clone());
            }
            self.check(&map, &session.identity(), &session.source, caps)?;
            if map.insert(session.clone()).is_some() {
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
        map: &Live,
        who: &Identity,
        source: &str,
        caps: SessionCaps,
    ) -> Result<(), CapReached> {
        let listens = self.listens.lock();
        let mut extra = [0; 3];
        for held in listens.values().filter(|h| h.tenant == who.tenant) {
            extra[0] += usize::from(held.subject == who.subject);
            extra[1] += usize::from(held.source == source);
            extra[2] += 1;
        }
        if map.clearly_below(who, source, caps, extra) {
            return Ok(());
        }
        let holders = map
            .by_id
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
        let session = self.map.lock().by_id.get(id).cloned()?;
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
            .by_id
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
        self.map.lock().by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Live sessions of `tenant` (of all tenants when `None`), for the activity page.
    pub fn count(&self, tenant: Option<&str>) -> usize {
        let map = self.map.lock();
        match tenant {
            None => map.by_id.len(),
            Some(tenant) => map.per_tenant.get(tenant).copied().unwrap_or(0),
        }
    }
}
