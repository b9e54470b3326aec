//! Upstream sessions `connect` keeps past the tunnel stream that carried them.
//!
//! A session-era agent session is no longer one tunnel stream for its whole life: a relay of
//! the fleet may die or restart, the agent's next request may land on another relay, and the
//! tunnel itself may drop. So the upstream session (an HTTP server's `Mcp-Session-Id` and its
//! event stream, or a stdio process) belongs to `connect`, under the handle the relay chose
//! when it opened the session ([`crate::wire::SessionHandle`]); each stream that carries the
//! session *attaches* to it, and *detaches* when it ends. Several streams may be attached at
//! once (one per relay the agent's requests reach); each request's answer goes back on the
//! stream it came in on.
//!
//! One policy ends what nobody uses: a session no stream has carried for the source's idle
//! time (`session_idle_secs`) is ended by the sweep; an explicit end from the relay (the agent
//! deleted the session) ends it at once. The table is bounded: at [`MAX_HELD`] sessions per
//! source, the one detached longest is ended to make room.
//!
//! This file is the bookkeeping only, without sockets or clocks of its own (the caller passes
//! `now`), so it is tested as plain data.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Sessions one source holds at most, attached or not. A held HTTP session costs a few hundred
/// bytes plus its upstream event stream; attached ones are bounded first by the relays'
/// session caps, so this bounds the detached ones an agent population can leave behind.
pub(crate) const MAX_HELD: usize = 4096;

/// The longest accepted handle: relays make 32 hex characters.
pub(crate) const MAX_HANDLE_LEN: usize = 64;

struct Entry<S> {
    session: Arc<S>,
    /// Streams carrying it now.
    streams: usize,
    /// When the last stream detached (or the session was created).
    since: Instant,
}

/// The held sessions of one source, by handle.
pub(crate) struct Held<S> {
    entries: Mutex<HashMap<String, Entry<S>>>,
    /// Handles of sessions ended on purpose (the agent deleted them, the upstream forgot
    /// them), kept for the idle time so a resume of one is refused at once instead of
    /// continuing the upstream session from what its sealed id carries.
    ended: Mutex<HashMap<String, Instant>>,
    idle: Duration,
    max: usize,
}

impl<S> Held<S> {
    /// A table whose detached sessions end after `idle` (never when zero), holding at most
    /// [`MAX_HELD`].
    pub(crate) fn new(idle: Duration) -> Self {
        Self::with_max(idle, MAX_HELD)
    }

    fn with_max(idle: Duration, max: usize) -> Self {
        Self {
            entries: Mutex::default(),
            ended: Mutex::default(),
            idle,
            max,
        }
    }

    /// How long a detached session is kept.
    pub(crate) fn idle(&self) -> Duration {
        self.idle
    }

    /// Holds a new `session` under `handle`, attached to the stream that opened it. Returns the
    /// sessions this displaced, to be ended: one held under the same handle before (a relay
    /// never reuses a handle; a replay gets the old session ended rather than shared), and, at
    /// the cap, the one detached longest.
    pub(crate) fn insert(&self, handle: &str, session: Arc<S>, now: Instant) -> Vec<Arc<S>> {
        let mut entries = self.entries.lock();
        let mut displaced: Vec<Arc<S>> = entries
            .remove(handle)
            .map(|entry| entry.session)
            .into_iter()
            .collect();
        if entries.len() >= self.max {
            let oldest = entries
                .iter()
                .filter(|(_, entry)| entry.streams == 0)
                .min_by_key(|(_, entry)| entry.since)
                .map(|(handle, _)| handle.clone());
            if let Some(oldest) = oldest.and_then(|h| entries.remove(&h)) {
                displaced.push(oldest.session);
            }
        }
        entries.insert(
            handle.to_owned(),
            Entry {
                session,
                streams: 1,
                since: now,
            },
        );
        displaced
    }

    /// Attaches one more stream to the session held under `handle`, if it is.
    pub(crate) fn attach(&self, handle: &str) -> Option<Arc<S>> {
        let mut entries = self.entries.lock();
        let entry = entries.get_mut(handle)?;
        entry.streams += 1;
        Some(entry.session.clone())
    }

    /// A stream carrying `handle` ended without ending the session: it stays held, and once
    /// no stream carries it, the idle time counts from `now`.
    pub(crate) fn detach(&self, handle: &str, now: Instant) {
        if let Some(entry) = self.entries.lock().get_mut(handle) {
            entry.streams = entry.streams.saturating_sub(1);
            if entry.streams == 0 {
                entry.since = now;
            }
        }
    }

    /// Ends holding `handle` (the session ends now, for good: see [`Held::ended`]); returns it
    /// if it was held.
    pub(crate) fn remove(&self, handle: &str, now: Instant) -> Option<Arc<S>> {
        let mut ended = self.ended.lock();
        if ended.len() >= self.max {
            let oldest = ended
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(handle, _)| handle.clone());
            if let Some(oldest) = oldest {
                ended.remove(&oldest);
            }
        }
        ended.insert(handle.to_owned(), now);
        drop(ended);
        self.entries
            .lock()
            .remove(handle)
            .map(|entry| entry.session)
    }

    /// Whether the session `handle` was ended on purpose lately (within the idle time).
    pub(crate) fn ended(&self, handle: &str) -> bool {
        self.ended.lock().contains_key(handle)
    }

    /// Removes and returns the sessions no stream has carried for the idle time by `now`.
    pub(crate) fn expired(&self, now: Instant) -> Vec<Arc<S>> {
        if self.idle.is_zero() {
            return Vec::new();
        }
        self.ended
            .lock()
            .retain(|_, at| now.saturating_duration_since(*at) < self.idle);
        let mut entries = self.entries.lock();
        let gone: Vec<String> = entries
            .iter()
            .filter(|(_, entry)| {
                entry.streams == 0 && now.saturating_duration_since(entry.since) >= self.idle
            })
            .map(|(handle, _)| handle.clone())
            .collect();
        gone.iter()
            .filter_map(|handle| entries.remove(handle))
            .map(|entry| entry.session)
            .collect()
    }

    /// Sessions held now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

/// How often a source looks for expired sessions: a quarter of the idle time (so a session
/// outlives it by at most a quarter), between 1 s and 30 s.
pub(crate) fn sweep_interval(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);

    #[test]
    fn a_session_outlives_its_stream_until_the_idle_time_passes_detached() {
        let held = Held::new(IDLE);
        let t0 = Instant::now();
        assert!(held.insert("h", Arc::new(1), t0).is_empty());
        held.detach("h", t0);
        assert!(held.expired(t0 + IDLE / 2).is_empty(), "within the grace");
        assert_eq!(held.attach("h").as_deref(), Some(&1), "a resume finds it");
        assert!(
            held.expired(t0 + IDLE * 10).is_empty(),
            "an attached session never idles out here"
        );
        held.detach("h", t0 + IDLE * 10);
        assert_eq!(held.expired(t0 + IDLE * 11).len(), 1);
        assert_eq!(held.attach("h"), None, "gone once expired");
    }

    #[test]
    fn two_streams_attached_and_one_detached_keeps_it_carried() {
        let held = Held::new(IDLE);
        let t0 = Instant::now();
        held.insert("h", Arc::new(()), t0);
        assert!(held.attach("h").is_some());
        held.detach("h", t0);
        assert!(
            held.expired(t0 + IDLE * 2).is_empty(),
            "one stream still carries it"
        );
        held.detach("h", t0 + IDLE * 2);
        assert_eq!(held.expired(t0 + IDLE * 3).len(), 1);
    }

    #[test]
    fn at_the_cap_the_session_detached_longest_makes_room() {
        let held = Held::with_max(IDLE, 3);
        let t0 = Instant::now();
        for (n, handle) in ["a", "b", "c"].into_iter().enumerate() {
            held.insert(handle, Arc::new(n), t0);
        }
        held.detach("b", t0 + Duration::from_secs(1));
        held.detach("c", t0 + Duration::from_secs(2));
        let displaced = held.insert("d", Arc::new(3), t0 + Duration::from_secs(3));
        assert_eq!(displaced.iter().map(|s| **s).collect::<Vec<_>>(), vec![1]);
        assert_eq!(held.len(), 3);
        assert!(held.attach("b").is_none() && held.attach("a").is_some());
    }

    #[test]
    fn a_reused_handle_ends_the_old_session_and_an_explicit_end_removes_it() {
        let held = Held::new(IDLE);
        let t0 = Instant::now();
        held.insert("h", Arc::new(1), t0);
        let displaced = held.insert("h", Arc::new(2), t0);
        assert_eq!(displaced.iter().map(|s| **s).collect::<Vec<_>>(), vec![1]);
        assert!(!held.ended("h"));
        assert_eq!(held.remove("h", t0).as_deref(), Some(&2));
        assert_eq!(held.len(), 0);
        assert!(held.ended("h"), "remembered for the idle time");
        held.expired(t0 + IDLE);
        assert!(!held.ended("h"), "and forgotten after");
    }

    #[test]
    fn zero_idle_keeps_detached_sessions_until_the_cap_and_the_sweep_is_bounded() {
        let held = Held::new(Duration::ZERO);
        let t0 = Instant::now();
        held.insert("h", Arc::new(()), t0);
        held.detach("h", t0);
        assert!(held.expired(t0 + Duration::from_secs(86_400)).is_empty());
        assert_eq!(sweep_interval(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(
            sweep_interval(Duration::from_secs(3600)),
            Duration::from_secs(30)
        );
        assert_eq!(
            sweep_interval(Duration::from_secs(20)),
            Duration::from_secs(5)
        );
    }
}
