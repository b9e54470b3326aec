//! Agent sessions of the session era, each bound to its caller and carried by one channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;

use super::channel::Channel;
use crate::govern::Identity;

/// Random bytes in a relay-issued session id (192 bits: unguessable, and it reveals nothing of
/// the upstream's own id).
const SESSION_ID_BYTES: usize = 24;

/// One agent session.
pub struct Session {
    /// The relay-issued `Mcp-Session-Id`.
    pub id: String,
    /// The caller who created it; only they may use it.
    pub tenant: Arc<str>,
    /// The caller's subject.
    pub subject: Arc<str>,
    /// The source it talks to.
    pub source: String,
    /// The tunnel stream carrying it.
    pub channel: Arc<Channel>,
    last_used: Mutex<Instant>,
}

/// A fresh random session id.
pub fn new_session_id() -> String {
    let mut bytes = [0u8; SESSION_ID_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Session {
    /// A session `id` (from [`new_session_id`]) of `who` with `source` over `channel`.
    pub fn new(id: String, who: &Identity, source: &str, channel: Arc<Channel>) -> Self {
        Self {
            id,
            tenant: who.tenant.clone(),
            subject: who.subject.clone(),
            source: source.to_owned(),
            channel,
            last_used: Mutex::new(Instant::now()),
        }
    }

    fn touch(&self) {
        *self
            .last_used
            .lock()
            .expect("session lock is never held across a panic") = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .expect("session lock is never held across a panic")
            .elapsed()
    }
}

/// The live sessions of all tenants.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
}

impl Sessions {
    /// Adds a session.
    pub fn insert(&self, session: Arc<Session>) {
        self.map
            .lock()
            .expect("sessions lock is never held across a panic")
            .insert(session.id.clone(), session);
        metrics::gauge!(crate::metrics::SESSIONS_ACTIVE).increment(1.0);
    }

    /// The session `id`, if it exists, belongs to `who` and talks to `source`; anything else
    /// reads as "no such session" (a foreign id reveals nothing). A session whose tunnel
    /// stream has ended is removed here.
    pub fn get(&self, id: &str, who: &Identity, source: &str) -> Option<Arc<Session>> {
        let session = self
            .map
            .lock()
            .expect("sessions lock is never held across a panic")
            .get(id)
            .cloned()?;
        if session.tenant != who.tenant
            || session.subject != who.subject
            || session.source != source
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
        let removed = self
            .map
            .lock()
            .expect("sessions lock is never held across a panic")
            .remove(id);
        if removed.is_some() {
            metrics::gauge!(crate::metrics::SESSIONS_ACTIVE).decrement(1.0);
        }
        removed
    }

    /// Removes sessions idle longer than `idle` or whose stream ended; returns how many.
    pub fn sweep(&self, idle: Duration) -> Vec<Arc<Session>> {
        let expired: Vec<String> = self
            .map
            .lock()
            .expect("sessions lock is never held across a panic")
            .values()
            .filter(|s| s.idle_for() > idle || s.channel.closed_reason().is_some())
            .map(|s| s.id.clone())
            .collect();
        expired.iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Live sessions now.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .expect("sessions lock is never held across a panic")
            .len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
