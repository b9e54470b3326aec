//! The bookkeeping of bridged sessions (see [`super::bridge`]): which are idle for whom, how
//! many each caller keeps busy, and which to end when the pool is full. Plain data, tested
//! without sockets: the caller passes `now`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What [`Pool::take`] found for a caller.
#[derive(Debug)]
pub(super) enum Take<S> {
    /// One of its idle sessions.
    Reuse(Arc<S>),
    /// Room for a new one, made by taking `evicted` (idle longest) out, when it says so.
    Open { evicted: Option<Arc<S>> },
    /// None: the pool is full of busy sessions, or the caller is at its own cap.
    Full,
}

/// The bookkeeping of bridged sessions: idle ones by key (a caller and the capabilities its
/// sessions declared), busy ones counted by caller. Plain data: the caller passes `now`.
pub(super) struct Pool<S> {
    idle: HashMap<String, Vec<(Arc<S>, Instant)>>,
    busy: HashMap<String, usize>,
    /// Sessions in the pool, idle and busy.
    live: usize,
    max: usize,
    max_busy: usize,
}

impl<S> Pool<S> {
    pub(super) fn new(max: usize, max_busy: usize) -> Self {
        Self {
            idle: HashMap::new(),
            busy: HashMap::new(),
            live: 0,
            max,
            max_busy,
        }
    }

    /// A session of `caller` for `key`: its idle one used last, else room for a new one.
    pub(super) fn take(&mut self, caller: &str, key: &str) -> Take<S> {
        let busy = self.busy.get(caller).copied().unwrap_or(0);
        if busy >= self.max_busy {
            return Take::Full;
        }
        if let Some(idle) = self.idle.get_mut(key)
            && let Some((session, _)) = idle.pop()
        {
            if idle.is_empty() {
                self.idle.remove(key);
            }
            *self.busy.entry(caller.to_owned()).or_default() += 1;
            return Take::Reuse(session);
        }
        let evicted = if self.live >= self.max {
            let Some(evicted) = self.evict_oldest() else {
                return Take::Full;
            };
            Some(evicted)
        } else {
            None
        };
        if evicted.is_none() {
            self.live += 1;
        }
        *self.busy.entry(caller.to_owned()).or_default() += 1;
        Take::Open { evicted }
    }

    fn evict_oldest(&mut self) -> Option<Arc<S>> {
        let key = self
            .idle
            .iter()
            .filter_map(|(key, sessions)| Some((key, sessions.first()?.1)))
            .min_by_key(|(_, since)| *since)
            .map(|(key, _)| key.clone())?;
        let sessions = self.idle.get_mut(&key)?;
        let (session, _) = sessions.remove(0);
        if sessions.is_empty() {
            self.idle.remove(&key);
        }
        Some(session)
    }

    /// A busy session of `caller` is idle again, under `key`.
    pub(super) fn give_back(&mut self, caller: &str, key: &str, session: Arc<S>, now: Instant) {
        self.unbusy(caller);
        self.idle
            .entry(key.to_owned())
            .or_default()
            .push((session, now));
    }

    /// A busy session of `caller` ended.
    pub(super) fn discard(&mut self, caller: &str) {
        self.unbusy(caller);
        self.live = self.live.saturating_sub(1);
    }

    /// A session of `caller` is busy again (its call goes on after waiting).
    pub(super) fn busy(&mut self, caller: &str) {
        *self.busy.entry(caller.to_owned()).or_default() += 1;
    }

    /// A session that counted as nobody's busy one (a waiting call's) ended.
    pub(super) fn forget(&mut self) {
        self.live = self.live.saturating_sub(1);
    }

    pub(super) fn unbusy(&mut self, caller: &str) {
        if let Some(busy) = self.busy.get_mut(caller) {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                self.busy.remove(caller);
            }
        }
    }

    /// Takes out the idle sessions unused for `idle` (none when zero).
    pub(super) fn expired(&mut self, now: Instant, idle: Duration) -> Vec<Arc<S>> {
        if idle.is_zero() {
            return Vec::new();
        }
        let mut expired = Vec::new();
        self.idle.retain(|_, sessions| {
            sessions.retain(|(session, since)| {
                let keep = now.duration_since(*since) < idle;
                if !keep {
                    expired.push(session.clone());
                }
                keep
            });
            !sessions.is_empty()
        });
        self.live = self.live.saturating_sub(expired.len());
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opened(take: Take<u32>) -> Option<Arc<u32>> {
        match take {
            Take::Open { evicted } => evicted,
            other => panic!("expected room for a new session, got {other:?}"),
        }
    }

    #[test]
    fn a_caller_gets_its_own_idle_session_back_and_never_another_callers() {
        let mut pool = Pool::new(4, 4);
        let now = Instant::now();
        assert!(opened(pool.take("ada", "ada")).is_none());
        pool.give_back("ada", "ada", Arc::new(1), now);
        match pool.take("bob", "bob") {
            Take::Open { evicted: None } => {}
            other => panic!("bob gets a session of his own: {other:?}"),
        }
        match pool.take("ada", "ada") {
            Take::Reuse(session) => assert_eq!(*session, 1),
            other => panic!("ada reuses hers: {other:?}"),
        }
        assert_eq!(pool.live, 2);
    }

    #[test]
    fn a_full_pool_evicts_the_session_idle_longest_and_refuses_when_all_are_busy() {
        let mut pool = Pool::new(2, 2);
        let start = Instant::now();
        opened(pool.take("a", "a"));
        opened(pool.take("b", "b"));
        pool.give_back("a", "a", Arc::new(10), start);
        pool.give_back("b", "b", Arc::new(20), start + Duration::from_secs(1));
        assert_eq!(
            opened(pool.take("c", "c")).as_deref(),
            Some(&10),
            "a's is older"
        );
        assert_eq!(pool.live, 2);
        opened(pool.take("d", "d"));
        assert!(
            matches!(pool.take("e", "e"), Take::Full),
            "every session busy"
        );
        pool.discard("c");
        assert!(
            opened(pool.take("e", "e")).is_none(),
            "room again after an end"
        );
    }

    #[test]
    fn one_caller_cannot_take_every_session() {
        let mut pool = Pool::new(8, 2);
        opened(pool.take("greedy", "greedy"));
        opened(pool.take("greedy", "greedy"));
        assert!(matches!(pool.take("greedy", "greedy"), Take::Full));
        opened(pool.take("other", "other"));
        pool.give_back("greedy", "greedy", Arc::new(1), Instant::now());
        assert!(matches!(pool.take("greedy", "greedy"), Take::Reuse(_)));
    }

    #[test]
    fn idle_sessions_expire() {
        let mut pool = Pool::new(4, 4);
        let start = Instant::now();
        opened(pool.take("a", "a"));
        opened(pool.take("a", "a"));
        pool.give_back("a", "a", Arc::new(1), start);
        pool.give_back("a", "a", Arc::new(2), start + Duration::from_secs(60));
        let idle = Duration::from_secs(90);
        assert!(
            pool.expired(start + Duration::from_secs(30), idle)
                .is_empty()
        );
        let gone = pool.expired(start + Duration::from_secs(100), idle);
        assert_eq!(gone.iter().map(|s| **s).collect::<Vec<_>>(), [1]);
        assert_eq!(pool.live, 1);
        assert!(
            pool.expired(start, Duration::ZERO).is_empty(),
            "zero: never"
        );
    }

    #[test]
    fn a_waiting_session_is_not_busy_but_still_live() {
        let mut pool = Pool::<u32>::new(4, 1);
        opened(pool.take("a", "a"));
        assert!(matches!(pool.take("a", "a"), Take::Full), "a is at its cap");
        pool.unbusy("a");
        opened(pool.take("a", "a"));
        assert_eq!(
            pool.live, 2,
            "the waiting session still counts toward the pool"
        );
        pool.forget();
        pool.discard("a");
        assert_eq!((pool.live, pool.busy.len()), (0, 0));
        pool.busy("a");
        assert!(
            matches!(pool.take("a", "a"), Take::Full),
            "busy again once its call goes on"
        );
    }
}
