//! `connect` instances whose last tunnel to this relay left a moment ago.
//!
//! A session only one `connect` can serve (a stdio process lives in it) is gone when that
//! `connect` is gone, and its agent is told so (`404`, so it initializes again). But a tunnel
//! also drops while its `connect` lives (a network blip, the relay's peer restarting), and that
//! `connect` attaches again within its reconnect backoff. Until then its sessions are
//! *reconnecting*, not gone: their agents get an error that says so and keep their session
//! ids. So the registry remembers, for [`RECONNECT_WINDOW`], which instances left, and with
//! which sources, and which new instances arrived. A new instance serving one of those sources
//! means the one that left was replaced (its `connect` restarted): its sessions are gone after
//! all, whether the new one arrived after the old one's end or (a `connect` killed without a
//! word, noticed only at its connection's idle timeout) before it.
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

/// One `connect` instance that left or arrived: when, and the sources it serves.
struct Sighting {
    connect: Arc<str>,
    sources: Vec<String>,
    at: Instant,
}

impl Sighting {
    fn new(connect: &Arc<str>, sources: &[String], at: Instant) -> Self {
        Self {
            connect: connect.clone(),
            sources: sources.to_vec(),
            at,
        }
    }

    fn recent(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.at) < RECONNECT_WINDOW
    }

    fn serves_any(&self, sources: &[String]) -> bool {
        self.sources.iter().any(|s| sources.contains(s))
    }
}

/// One tenant's recent departures, and its recent new instances, oldest first.
#[derive(Default)]
struct Tenant {
    departed: VecDeque<Sighting>,
    arrived: VecDeque<Sighting>,
}

/// Adds `sighting` to `list`, forgetting what is old, the same instance's earlier one, and
/// past [`PER_TENANT`] the oldest.
fn note(list: &mut VecDeque<Sighting>, sighting: Sighting) {
    let now = sighting.at;
    list.retain(|s| s.connect != sighting.connect && s.recent(now));
    if list.len() >= PER_TENANT {
        list.pop_front();
    }
    list.push_back(sighting);
}

/// The departures and arrivals, per tenant.
#[derive(Default)]
pub(crate) struct Departed {
    by_tenant: HashMap<Arc<str>, Tenant>,
}

impl Departed {
    /// `connect` of `tenant`, serving `sources`, left at `now`: it is reconnecting, unless a
    /// new instance serving one of its sources arrived within the window (a `connect` killed
    /// and started again: the relay may notice the old connection's end only after the new
    /// one is up).
    pub(crate) fn left(
        &mut self,
        tenant: &Arc<str>,
        connect: &Arc<str>,
        sources: &[String],
        now: Instant,
    ) {
        let entry = self.by_tenant.entry(tenant.clone()).or_default();
        let replaced = entry
            .arrived
            .iter()
            .any(|a| a.connect != *connect && a.recent(now) && a.serves_any(sources));
        if replaced {
            return;
        }
        note(&mut entry.departed, Sighting::new(connect, sources, now));
    }

    /// `connect` of `tenant` attached a tunnel serving `sources` at `now`: if it had left, it
    /// is back; if it is `new` (no tunnel of it was attached, and it had not left), it is a
    /// new instance, which replaces those that left serving one of its sources.
    pub(crate) fn attached(
        &mut self,
        tenant: &Arc<str>,
        connect: &Arc<str>,
        sources: &[String],
        new: bool,
        now: Instant,
    ) {
        let entry = self.by_tenant.entry(tenant.clone()).or_default();
        let returning = entry.departed.iter().any(|d| d.connect == *connect);
        let arrives = new && !returning;
        entry
            .departed
            .retain(|d| d.connect != *connect && !(arrives && d.serves_any(sources)));
        if arrives {
            note(&mut entry.arrived, Sighting::new(connect, sources, now));
        }
    }

    /// Whether `connect` of `tenant` left less than [`RECONNECT_WINDOW`] before `now`, and
    /// was not replaced since.
    pub(crate) fn reconnecting(&self, tenant: &str, connect: &str, now: Instant) -> bool {
        self.by_tenant.get(tenant).is_some_and(|entry| {
            entry
                .departed
                .iter()
                .any(|d| &*d.connect == connect && d.recent(now))
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
        departed.attached(&acme, &c1, &db(), true, start);
        assert!(!departed.reconnecting("acme", "c1", start));
    }

    #[test]
    fn a_new_instance_of_a_source_replaces_the_one_that_left_an_old_one_does_not() {
        let (acme, c1): (Arc<str>, Arc<str>) = ("acme".into(), "c1".into());
        let now = Instant::now();
        let mut departed = Departed::default();
        departed.left(&acme, &c1, &db(), now);
        departed.attached(&acme, &"c2".into(), &["files".to_owned()], true, now);
        departed.attached(&acme, &"c3".into(), &db(), false, now);
        assert!(
            departed.reconnecting("acme", "c1", now),
            "another source's, or an instance attached before"
        );
        departed.attached(&acme, &"c2".into(), &db(), true, now);
        assert!(!departed.reconnecting("acme", "c1", now), "replaced");
    }

    #[test]
    fn an_old_instance_noticed_gone_after_its_replacement_arrived_is_not_reconnecting() {
        let (acme, old, new): (Arc<str>, Arc<str>, Arc<str>) =
            ("acme".into(), "old".into(), "new".into());
        let now = Instant::now();
        let mut departed = Departed::default();
        departed.attached(&acme, &new, &db(), true, now);
        departed.left(&acme, &old, &db(), now + Duration::from_secs(10));
        assert!(!departed.reconnecting("acme", "old", now + Duration::from_secs(10)));
        // A long-attached instance that drops is reconnecting, replacement or not of others.
        departed.left(&acme, &new, &db(), now + RECONNECT_WINDOW);
        assert!(departed.reconnecting("acme", "new", now + RECONNECT_WINDOW));
        // It comes back: not a new arrival, and nothing else is replaced by it.
        departed.left(&acme, &old, &db(), now + RECONNECT_WINDOW);
        departed.attached(&acme, &new, &db(), true, now + RECONNECT_WINDOW);
        assert!(departed.reconnecting("acme", "old", now + RECONNECT_WINDOW));
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
        assert_eq!(departed.by_tenant["acme"].departed.len(), PER_TENANT);
    }
}
