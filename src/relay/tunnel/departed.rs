//! `connect` instances whose last tunnel to this relay left a moment ago.
//!
//! A session only one `connect` can serve (a stdio process lives in it) is gone when that
//! `connect` is gone, and its agent is told so (`404`, so it initializes again). But a tunnel
//! also drops while its `connect` lives (a network blip, the relay's peer restarting), and that
//! `connect` attaches again within its reconnect backoff. Until then its sessions are
//! *reconnecting*, not gone: their agents get an error that says so and keep their session
//! ids. So the registry remembers, for [`RECONNECT_WINDOW`], which instances left, and with
//! which sources. A new instance serving one of those sources means the one that left was
//! replaced (its `connect` restarted): its sessions are gone after all.
//!
//! Bounded per tenant ([`PER_TENANT`]): a tenant that churns `connect` instances forgets its
//! own oldest departures first, never another tenant's. Plain data, the caller passes `now`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a `connect` whose tunnels all left counts as reconnecting: its backoff retries at
/// least every 30 s (see `client::backoff`), so two attempts fit.
pub(crate) const RECONNECT_WINDOW: Duration = Duration::from_secs(60);

/// Departed instances remembered per tenant: a tenant runs a few `connect`s, each one
/// instance per process start.
pub(crate) const PER_TENANT: usize = 64;

/// One `connect` instance that left: when, and the sources it served.
struct Departure {
    connect: Arc<str>,
    sources: Vec<String>,
    at: Instant,
}

/// The departures, per tenant, oldest first.
#[derive(Default)]
pub(crate) struct Departed {
    by_tenant: HashMap<Arc<str>, VecDeque<Departure>>,
}

impl Departed {
    /// `connect` of `tenant`, serving `sources`, left at `now`.
    pub(crate) fn left(
        &mut self,
        tenant: &Arc<str>,
        connect: &Arc<str>,
        sources: &[String],
        now: Instant,
    ) {
        let list = self.by_tenant.entry(tenant.clone()).or_default();
        list.retain(|d| d.connect != *connect && now.duration_since(d.at) < RECONNECT_WINDOW);
        if list.len() >= PER_TENANT {
            list.pop_front();
        }
        list.push_back(Departure {
            connect: connect.clone(),
            sources: sources.to_vec(),
            at: now,
        });
    }

    /// `connect` of `tenant` attached a tunnel serving `sources`: if it had left, it is back;
    /// if it is `new` (no tunnel of it was attached), it replaces those that left serving
    /// one of its sources.
    pub(crate) fn attached(&mut self, tenant: &str, connect: &str, sources: &[String], new: bool) {
        let Some(list) = self.by_tenant.get_mut(tenant) else {
            return;
        };
        let returning = list.iter().any(|d| &*d.connect == connect);
        list.retain(|d| {
            &*d.connect != connect
                && (returning || !new || !d.sources.iter().any(|s| sources.contains(s)))
        });
        if list.is_empty() {
            self.by_tenant.remove(tenant);
        }
    }

    /// Whether `connect` of `tenant` left less than [`RECONNECT_WINDOW`] before `now`, and
    /// was not replaced since.
    pub(crate) fn reconnecting(&self, tenant: &str, connect: &str, now: Instant) -> bool {
        self.by_tenant.get(tenant).is_some_and(|list| {
            list.iter()
                .any(|d| &*d.connect == connect && now.duration_since(d.at) < RECONNECT_WINDOW)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Vec<String> {
        vec!["db".to_owned()]
    }

    #[test]
    fn a_departed_connect_is_reconnecting_for_the_window_and_not_once_back() {
        let (acme, c1): (Arc<str>, Arc<str>) = ("acme".into(), "c1".into());
        let start = Instant::now();
        let mut departed = Departed::default();
        assert!(!departed.reconnecting("acme", "c1", start));
        departed.left(&acme, &c1, &db(), start);
        assert!(departed.reconnecting("acme", "c1", start + Duration::from_secs(59)));
        assert!(!departed.reconnecting("other", "c1", start), "per tenant");
        assert!(!departed.reconnecting("acme", "c1", start + RECONNECT_WINDOW));
        departed.attached("acme", "c1", &db(), true);
        assert!(!departed.reconnecting("acme", "c1", start));
    }

    #[test]
    fn a_new_instance_of_a_source_replaces_the_one_that_left_an_old_one_does_not() {
        let (acme, c1): (Arc<str>, Arc<str>) = ("acme".into(), "c1".into());
        let now = Instant::now();
        let mut departed = Departed::default();
        departed.left(&acme, &c1, &db(), now);
        departed.attached("acme", "c2", &["files".to_owned()], true);
        departed.attached("acme", "c3", &db(), false);
        assert!(
            departed.reconnecting("acme", "c1", now),
            "another source's, or an instance attached before"
        );
        departed.attached("acme", "c2", &db(), true);
        assert!(!departed.reconnecting("acme", "c1", now), "replaced");
    }

    #[test]
    fn a_tenant_churning_instances_forgets_only_its_own_oldest() {
        let (acme, other): (Arc<str>, Arc<str>) = ("acme".into(), "other".into());
        let now = Instant::now();
        let mut departed = Departed::default();
        departed.left(&other, &Arc::from("theirs"), &db(), now);
        for n in 0..PER_TENANT + 10 {
            departed.left(&acme, &Arc::from(format!("c{n}").as_str()), &db(), now);
        }
        assert!(departed.reconnecting("other", "theirs", now));
        assert!(
            !departed.reconnecting("acme", "c0", now),
            "the oldest forgotten"
        );
        assert!(departed.reconnecting("acme", &format!("c{}", PER_TENANT + 9), now));
        assert_eq!(departed.by_tenant["acme"].len(), PER_TENANT);
    }
}
