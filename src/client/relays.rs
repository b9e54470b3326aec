//! Which connection slots `connect` holds: the plan, without sockets.
//!
//! Every relay given gets at least one slot, and so does every address its name resolves to;
//! `--connections` is the minimum in total, the extra slots spread round-robin over the
//! addresses. Names are looked up again from time to time (see [`super::fleet`]); each lookup
//! feeds [`Addresses::update`], and [`plan`] turns what is known into the slots that should
//! exist, changing as few of the current ones as it can. The sockets, the lookups and the slot
//! tasks live in [`super::fleet`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// A relay as configured: `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Relay {
    /// As given (`relay.example.com:443`, `[::1]:443`): looked up, and named in logs.
    pub given: String,
    /// The host (brackets of an IPv6 literal removed): the TLS server name.
    pub host: String,
    /// The port.
    pub port: u16,
}

impl Relay {
    /// Parses `HOST:PORT`.
    pub(super) fn parse(given: &str) -> Result<Self, String> {
        let (host, port) = given
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
            .ok_or_else(|| format!("relay {given:?}: expected HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("relay {given:?}: expected HOST:PORT"));
        }
        Ok(Self {
            given: given.to_owned(),
            host: host.to_owned(),
            port,
        })
    }

    /// The relays of a comma-separated list (repeated `--relay` flags are joined with commas),
    /// each once.
    pub(super) fn parse_list(list: &str) -> Result<Vec<Self>, String> {
        let mut relays: Vec<Self> = Vec::new();
        for given in list.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let relay = Self::parse(given)?;
            if !relays.contains(&relay) {
                relays.push(relay);
            }
        }
        if relays.is_empty() {
            return Err("no relay address given".into());
        }
        Ok(relays)
    }

    /// The address of a relay given as an IP literal: it is never looked up.
    pub(super) fn literal(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

/// What is known of one relay's addresses.
#[derive(Debug, Default)]
pub(super) struct Addresses {
    /// The addresses from the last lookup that found any, sorted, each once; empty while the
    /// name never resolved.
    current: Vec<SocketAddr>,
    /// Whether the last lookup failed (a warning was logged for this streak of failures).
    failing: bool,
}

/// What a lookup changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Update {
    /// Addresses that appeared.
    pub added: Vec<SocketAddr>,
    /// Addresses that disappeared.
    pub removed: Vec<SocketAddr>,
    /// The lookup failed and it is the first failure of a streak: warn (once) with this.
    pub warn: Option<String>,
    /// The lookup worked again after a streak of failures.
    pub recovered: bool,
}

impl Addresses {
    /// The fixed address of an IP literal.
    pub(super) fn fixed(addr: SocketAddr) -> Self {
        Self {
            current: vec![addr],
            failing: false,
        }
    }

    /// The addresses known now (empty while the name never resolved).
    pub(super) fn current(&self) -> &[SocketAddr] {
        &self.current
    }

    /// Takes in a lookup's result. A lookup that fails, or finds no address, keeps the
    /// addresses known: a resolver that hiccups must not cut working connections.
    pub(super) fn update(&mut self, lookup: Result<Vec<SocketAddr>, String>) -> Update {
        let found = match lookup {
            Ok(found) if !found.is_empty() => found,
            Ok(_) => return self.failed("no address".into()),
            Err(e) => return self.failed(e),
        };
        let mut found = found;
        found.sort();
        found.dedup();
        let update = Update {
            added: found
                .iter()
                .filter(|a| !self.current.contains(a))
                .copied()
                .collect(),
            removed: self
                .current
                .iter()
                .filter(|a| !found.contains(a))
                .copied()
                .collect(),
            warn: None,
            recovered: std::mem::take(&mut self.failing),
        };
        self.current = found;
        update
    }

    fn failed(&mut self, error: String) -> Update {
        let first = !std::mem::replace(&mut self.failing, true);
        Update {
            warn: first.then_some(error),
            ..Update::default()
        }
    }
}

/// Where one slot connects: a relay (its index among the configured ones) at one of its
/// addresses, or by name while the name never resolved (each attempt then looks it up, and
/// the HTTPS fallback leaves the name to the proxy, as before names were resolved up front).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Target {
    /// Index of the relay in the configuration.
    pub relay: usize,
    /// The address; `None`: by name.
    pub addr: Option<SocketAddr>,
}

/// The targets of every relay, in configuration order: one per address known, or one by name
/// for a relay whose name never resolved.
pub(super) fn targets(addresses: &[Addresses]) -> Vec<Target> {
    addresses
        .iter()
        .enumerate()
        .flat_map(|(relay, known)| {
            let by_name = known
                .current
                .is_empty()
                .then_some(Target { relay, addr: None });
            by_name
                .into_iter()
                .chain(known.current.iter().map(move |addr| Target {
                    relay,
                    addr: Some(*addr),
                }))
        })
        .collect()
}

/// How many slots each of `targets` should have, given how many it has (`current`), for at
/// least `min_total` in all: every target gets one, the total is `max(min_total, targets)`,
/// and from the current counts the fewest slots change: new targets get one, a target that
/// has too many loses the surplus (the busiest first, the last in order on a tie), and missing
/// slots go to the targets that have fewest (the first in order on a tie), so that starting
/// from nothing spreads the extra slots round-robin.
pub(super) fn plan(
    targets: &[Target],
    current: &BTreeMap<Target, usize>,
    min_total: usize,
) -> Vec<(Target, usize)> {
    let total = min_total.max(targets.len());
    let mut counts: Vec<usize> = targets
        .iter()
        .map(|t| current.get(t).copied().unwrap_or(0).max(1))
        .collect();
    let mut sum: usize = counts.iter().sum();
    while sum > total {
        // sum > total >= targets.len() means some count is above one.
        let Some(busiest) = (0..counts.len())
            .filter(|&k| counts[k] > 1)
            .max_by_key(|&k| (counts[k], k))
        else {
            break;
        };
        counts[busiest] -= 1;
        sum -= 1;
    }
    while sum < total {
        let Some(idlest) = (0..counts.len()).min_by_key(|&k| (counts[k], k)) else {
            break;
        };
        counts[idlest] += 1;
        sum += 1;
    }
    targets.iter().copied().zip(counts).collect()
}

/// Slots to start and to retire to go from `current` to `desired`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Changes {
    /// Targets that need more slots, and how many more.
    pub start: Vec<(Target, usize)>,
    /// Targets that have too many slots (or should have none), and how many to retire.
    pub retire: Vec<(Target, usize)>,
}

impl Changes {
    /// Whether nothing changes.
    pub(super) fn is_empty(&self) -> bool {
        self.start.is_empty() && self.retire.is_empty()
    }
}

/// What changes from `current` to `desired` (a [`plan`]).
pub(super) fn diff(current: &BTreeMap<Target, usize>, desired: &[(Target, usize)]) -> Changes {
    let mut changes = Changes::default();
    for &(target, want) in desired {
        let have = current.get(&target).copied().unwrap_or(0);
        if want > have {
            changes.start.push((target, want - have));
        } else if have > want {
            changes.retire.push((target, have - want));
        }
    }
    for (&target, &have) in current {
        if have > 0 && !desired.iter().any(|(t, _)| *t == target) {
            changes.retire.push((target, have));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test addresses parse")
    }

    fn resolved(lists: &[&[&str]]) -> Vec<Addresses> {
        lists
            .iter()
            .map(|list| {
                let mut known = Addresses::default();
                if !list.is_empty() {
                    known.update(Ok(list.iter().map(|a| addr(a)).collect()));
                }
                known
            })
            .collect()
    }

    fn target(relay: usize, a: &str) -> Target {
        Target {
            relay,
            addr: Some(addr(a)),
        }
    }

    fn counts(plan: &[(Target, usize)]) -> Vec<usize> {
        plan.iter().map(|(_, n)| *n).collect()
    }

    fn as_map(plan: &[(Target, usize)]) -> BTreeMap<Target, usize> {
        plan.iter().copied().collect()
    }

    #[test]
    fn relays_parse_names_literals_and_lists() {
        let relays = Relay::parse_list(" a.example:443,[::1]:7000 , 10.0.0.1:443,a.example:443")
            .expect("valid list");
        assert_eq!(relays.len(), 3, "a duplicate counts once: {relays:?}");
        assert_eq!(relays[0].host, "a.example");
        assert_eq!(relays[0].literal(), None);
        assert_eq!(relays[1].host, "::1");
        assert_eq!(relays[1].literal(), Some(addr("[::1]:7000")));
        assert_eq!(relays[2].literal(), Some(addr("10.0.0.1:443")));
        assert!(Relay::parse_list(" , ").is_err());
        assert!(Relay::parse("a.example").is_err());
        assert!(Relay::parse(":443").is_err());
        assert!(Relay::parse("a.example:99999").is_err());
    }

    /// Two names, one resolving to two addresses: every address gets a slot, and N below the
    /// number of addresses does not lower it.
    #[test]
    fn every_address_gets_a_slot_when_n_is_smaller() {
        let known = resolved(&[&["10.0.0.2:443", "10.0.0.1:443"], &["10.0.1.1:443"]]);
        let targets = targets(&known);
        assert_eq!(
            targets,
            vec![
                target(0, "10.0.0.1:443"),
                target(0, "10.0.0.2:443"),
                target(1, "10.0.1.1:443")
            ]
        );
        for n in [0, 1, 2, 3] {
            let plan = plan(&targets, &BTreeMap::new(), n);
            assert_eq!(counts(&plan), vec![1, 1, 1], "N = {n}");
        }
    }

    #[test]
    fn extra_slots_go_round_robin_when_n_is_larger() {
        let known = resolved(&[&["10.0.0.1:443", "10.0.0.2:443"], &["10.0.1.1:443"]]);
        let targets = targets(&known);
        assert_eq!(counts(&plan(&targets, &BTreeMap::new(), 4)), vec![2, 1, 1]);
        assert_eq!(counts(&plan(&targets, &BTreeMap::new(), 5)), vec![2, 2, 1]);
        assert_eq!(counts(&plan(&targets, &BTreeMap::new(), 7)), vec![3, 2, 2]);
    }

    #[test]
    fn a_name_that_never_resolved_is_dialed_by_name() {
        let known = resolved(&[&[], &["10.0.1.1:443"]]);
        let targets = targets(&known);
        assert_eq!(
            targets,
            vec![
                Target {
                    relay: 0,
                    addr: None
                },
                target(1, "10.0.1.1:443")
            ]
        );
        assert_eq!(counts(&plan(&targets, &BTreeMap::new(), 2)), vec![1, 1]);
    }

    #[test]
    fn an_address_that_disappears_is_retired_and_its_slots_move() {
        let mut known = resolved(&[&["10.0.0.1:443", "10.0.0.2:443"], &["10.0.1.1:443"]]);
        let before = plan(&targets(&known), &BTreeMap::new(), 4);
        assert_eq!(counts(&before), vec![2, 1, 1]);
        let update = known[0].update(Ok(vec![addr("10.0.0.2:443")]));
        assert_eq!(update.removed, vec![addr("10.0.0.1:443")]);
        assert!(update.added.is_empty() && update.warn.is_none() && !update.recovered);
        let current = as_map(&before);
        let after = plan(&targets(&known), &current, 4);
        assert_eq!(
            after,
            vec![
                (target(0, "10.0.0.2:443"), 2),
                (target(1, "10.0.1.1:443"), 2)
            ]
        );
        let changes = diff(&current, &after);
        assert_eq!(
            changes,
            Changes {
                start: vec![
                    (target(0, "10.0.0.2:443"), 1),
                    (target(1, "10.0.1.1:443"), 1)
                ],
                retire: vec![(target(0, "10.0.0.1:443"), 2)],
            }
        );
    }

    #[test]
    fn a_new_address_gets_a_slot_and_working_ones_change_least() {
        let mut known = resolved(&[&["10.0.0.1:443"], &["10.0.1.1:443"]]);
        let before = plan(&targets(&known), &BTreeMap::new(), 4);
        assert_eq!(counts(&before), vec![2, 2]);
        let update = known[0].update(Ok(vec![addr("10.0.0.1:443"), addr("10.0.0.3:443")]));
        assert_eq!(update.added, vec![addr("10.0.0.3:443")]);
        let current = as_map(&before);
        let after = plan(&targets(&known), &current, 4);
        // Four in all still: the newcomer takes one from the last of the busiest.
        assert_eq!(counts(&after), vec![2, 1, 1]);
        let changes = diff(&current, &after);
        assert_eq!(
            changes,
            Changes {
                start: vec![(target(0, "10.0.0.3:443"), 1)],
                retire: vec![(target(1, "10.0.1.1:443"), 1)],
            }
        );
        // Nothing new: nothing changes.
        assert!(diff(&as_map(&after), &plan(&targets(&known), &as_map(&after), 4)).is_empty());
    }

    #[test]
    fn a_failed_lookup_keeps_the_old_set_and_warns_once_a_streak() {
        let mut known = resolved(&[&["10.0.0.1:443", "10.0.0.2:443"]]);
        let old = known[0].current().to_vec();
        let first = known[0].update(Err("temporary failure in name resolution".into()));
        assert_eq!(
            first.warn.as_deref(),
            Some("temporary failure in name resolution")
        );
        assert!(first.added.is_empty() && first.removed.is_empty());
        assert_eq!(known[0].current(), old, "the old addresses stay");
        let again = known[0].update(Ok(Vec::new()));
        assert_eq!(again, Update::default(), "no second warning in a streak");
        assert_eq!(known[0].current(), old);
        let back = known[0].update(Ok(old.clone()));
        assert!(back.recovered && back.added.is_empty() && back.removed.is_empty());
        let next = known[0].update(Err("down again".into()));
        assert_eq!(
            next.warn.as_deref(),
            Some("down again"),
            "a new streak warns"
        );
    }

    #[test]
    fn a_name_that_resolves_later_replaces_its_by_name_slot() {
        let mut known = resolved(&[&[]]);
        let before = plan(&targets(&known), &BTreeMap::new(), 2);
        assert_eq!(
            before,
            vec![(
                Target {
                    relay: 0,
                    addr: None
                },
                2
            )]
        );
        known[0].update(Ok(vec![addr("10.0.0.1:443"), addr("[2001:db8::1]:443")]));
        let current = as_map(&before);
        let after = plan(&targets(&known), &current, 2);
        assert_eq!(counts(&after), vec![1, 1]);
        let changes = diff(&current, &after);
        assert_eq!(changes.start.len(), 2);
        assert_eq!(
            changes.retire,
            vec![(
                Target {
                    relay: 0,
                    addr: None
                },
                2
            )]
        );
    }
}
