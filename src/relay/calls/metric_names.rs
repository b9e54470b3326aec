//! Which names may become metric labels: those policy or the tunnels know, never those an agent
//! made up.
//!
//! Every label value of a Prometheus series is kept by the recorder for good and served at
//! every scrape. Tool, prompt and source names arrive from agents (a call to a tool that does
//! not exist, to a source that is not there), so labelling them as sent lets one caller grow
//! `/metrics` without bound (200 calls with random 100 KB names made it 20 MB). A name becomes
//! a label value only when it is known:
//!
//! - a source, when a tunnel of the tenant registered it, or policy names it literally;
//! - a tool or prompt, when a role of the tenant names it literally (an `allow` or `deny` glob
//!   whose part after the source has no `*`), or the source's upstream listed it
//!   (`tools/list`, `prompts/list`);
//! - a method, when it is an MCP method.
//!
//! Anything else is counted under [`OTHER`]. Known names are clipped to [`MAX_LABEL_BYTES`],
//! and what is learned from tunnels and lists is bounded ([`MAX_LEARNED`] names in all,
//! [`MAX_LEARNED_PER_SOURCE`] per source), so the label sets stay bounded whatever agents,
//! tunnels and upstreams send.

use std::collections::HashMap;
use std::hash::Hash;

use hashbrown::{Equivalent, HashMap as BorrowMap, HashSet};
use parking_lot::{Mutex, RwLock};

use crate::govern::Policy;
use crate::govern::policy::glob_match;

/// The label value every unknown name is counted under.
pub(crate) const OTHER: &str = "_other";

/// The longest label value kept, in bytes; a longer known name is cut at a character boundary.
pub(crate) const MAX_LABEL_BYTES: usize = 128;

/// How many tool and prompt names, and sources, are learned from tunnels and lists in all.
pub(crate) const MAX_LEARNED: usize = 16_384;

/// How many names one source's lists may teach.
pub(crate) const MAX_LEARNED_PER_SOURCE: usize = 1_024;

/// The MCP methods counted under their own name (requests both ways).
const METHODS: &[&str] = &[
    "initialize",
    "ping",
    "server/discover",
    "subscriptions/listen",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "sampling/createMessage",
    "elicitation/create",
    "roots/list",
    "tasks/get",
    "tasks/list",
    "tasks/result",
    "tasks/cancel",
];

/// The label of `method`: itself if MCP defines it, else [`OTHER`].
pub(crate) fn method_label(method: &str) -> &str {
    if method.is_empty() || METHODS.contains(&method) {
        method
    } else {
        OTHER
    }
}

/// `name` cut to at most [`MAX_LABEL_BYTES`], at a character boundary.
pub(crate) fn clip(name: &str) -> &str {
    if name.len() <= MAX_LABEL_BYTES {
        return name;
    }
    let mut end = MAX_LABEL_BYTES;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// A tenant's source, owned, as a key.
#[derive(Hash, PartialEq, Eq)]
struct SourceKey {
    tenant: Box<str>,
    source: Box<str>,
}

/// [`SourceKey`], borrowed; hashes the same.
#[derive(Hash)]
struct SourceRef<'a> {
    tenant: &'a str,
    source: &'a str,
}

impl Equivalent<SourceKey> for SourceRef<'_> {
    fn equivalent(&self, key: &SourceKey) -> bool {
        *self.tenant == *key.tenant && *self.source == *key.source
    }
}

/// A (source glob, tool or prompt name) pair a role states.
type NamedInPolicy = (Box<str>, Box<str>);

/// What policy names literally, per tenant: (source glob, tool or prompt name) pairs, and the
/// sources named without a `*`.
#[derive(Default)]
struct Configured {
    names: HashMap<Box<str>, Vec<NamedInPolicy>>,
    sources: HashMap<Box<str>, Vec<Box<str>>>,
}

/// What tunnels and lists taught: per tenant's source, the names its upstream listed.
#[derive(Default)]
struct Learned {
    sources: BorrowMap<SourceKey, HashSet<Box<str>>>,
    /// Sources plus names held, against [`MAX_LEARNED`].
    total: usize,
}

/// The names the relay labels metrics with; one per relay.
#[derive(Default)]
pub struct MetricNames {
    configured: RwLock<Configured>,
    learned: Mutex<Learned>,
}

impl MetricNames {
    /// Takes the names policy states literally (on start and every reload).
    pub fn configure(&self, policy: &Policy) {
        let mut configured = Configured::default();
        for (tenant, glob) in policy.tool_and_prompt_globs() {
            let Some((source, name)) = glob.split_once('/') else {
                continue;
            };
            if !source.contains('*') {
                let sources = configured.sources.entry(tenant.into()).or_default();
                if !sources.iter().any(|s| **s == *source) {
                    sources.push(source.into());
                }
            }
            if !name.contains('*') && !name.is_empty() {
                configured
                    .names
                    .entry(tenant.into())
                    .or_default()
                    .push((source.into(), name.into()));
            }
        }
        *self.configured.write() = configured;
    }

    /// Learns the sources a tunnel of `tenant` registered.
    pub fn learn_sources(&self, tenant: &str, sources: &[String]) {
        let mut learned = self.lock();
        for source in sources {
            let key = SourceRef { tenant, source };
            if learned.sources.contains_key(&key) || learned.total >= MAX_LEARNED {
                continue;
            }
            learned.sources.insert(
                SourceKey {
                    tenant: tenant.into(),
                    source: source.as_str().into(),
                },
                HashSet::new(),
            );
            learned.total += 1;
        }
    }

    /// Learns the tool or prompt names `source`'s upstream listed to a caller of `tenant`.
    /// Names longer than [`MAX_LABEL_BYTES`] are not learned.
    pub fn learn_names<'a>(
        &self,
        tenant: &str,
        source: &str,
        names: impl Iterator<Item = &'a str>,
    ) {
        let mut learned = self.lock();
        let key = SourceRef { tenant, source };
        if !learned.sources.contains_key(&key) {
            if learned.total >= MAX_LEARNED {
                return;
            }
            learned.sources.insert(
                SourceKey {
                    tenant: tenant.into(),
                    source: source.into(),
                },
                HashSet::new(),
            );
            learned.total += 1;
        }
        let Learned { sources, total } = &mut *learned;
        let Some(known) = sources.get_mut(&key) else {
            return;
        };
        for name in names.filter(|n| !n.is_empty() && n.len() <= MAX_LABEL_BYTES) {
            if *total >= MAX_LEARNED || known.len() >= MAX_LEARNED_PER_SOURCE {
                return;
            }
            if !known.contains(name) {
                known.insert(name.into());
                *total += 1;
            }
        }
    }

    /// The label of `tenant`'s `source`: itself (clipped) if known, else [`OTHER`].
    pub fn source_label<'a>(&self, tenant: &str, source: &'a str) -> &'a str {
        let learned = self
            .lock()
            .sources
            .contains_key(&SourceRef { tenant, source });
        let known = learned
            || self
                .read()
                .sources
                .get(tenant)
                .is_some_and(|s| s.iter().any(|s| **s == *source));
        if known { clip(source) } else { OTHER }
    }

    /// The label of tool or prompt `name` called on `tenant`'s `source`: itself (clipped) if
    /// policy names it or the source listed it, else [`OTHER`]; empty stays empty (no tool).
    pub fn name_label<'a>(&self, tenant: &str, source: &str, name: &'a str) -> &'a str {
        if name.is_empty() {
            return name;
        }
        let listed = self
            .lock()
            .sources
            .get(&SourceRef { tenant, source })
            .is_some_and(|names| names.contains(name));
        let known = listed
            || self.read().names.get(tenant).is_some_and(|pairs| {
                pairs
                    .iter()
                    .any(|(glob, n)| **n == *name && glob_match(glob, source))
            });
        if known { clip(name) } else { OTHER }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Learned> {
        self.learned.lock()
    }

    fn read(&self) -> parking_lot::RwLockReadGuard<'_, Configured> {
        self.configured.read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::govern::policy::Role;

    #[test]
    fn only_known_names_are_labels() {
        let names = MetricNames::default();
        let mut policy = Policy::default();
        policy.set_roles(
            "acme".into(),
            [(
                "r".to_owned(),
                Role {
                    allow: vec!["*/echo".into(), "db/get-*".into()],
                    deny_prompts: vec!["db/secret".into()],
                    ..Role::default()
                },
            )]
            .into_iter()
            .collect(),
        );
        names.configure(&policy);
        assert_eq!(names.name_label("acme", "any", "echo"), "echo");
        assert_eq!(names.name_label("acme", "db", "secret"), "secret");
        assert_eq!(
            names.name_label("acme", "db", "get-x"),
            OTHER,
            "a glob names nothing"
        );
        assert_eq!(
            names.name_label("other", "any", "echo"),
            OTHER,
            "per tenant"
        );
        assert_eq!(names.source_label("acme", "db"), "db", "policy names db");
        assert_eq!(names.source_label("acme", "x"), OTHER);
        names.learn_sources("acme", &["x".to_owned()]);
        assert_eq!(names.source_label("acme", "x"), "x");
        names.learn_names(
            "acme",
            "x",
            ["add", &"n".repeat(MAX_LABEL_BYTES + 1)].into_iter(),
        );
        assert_eq!(names.name_label("acme", "x", "add"), "add");
        assert_eq!(names.name_label("acme", "y", "add"), OTHER, "per source");
        let long = "n".repeat(MAX_LABEL_BYTES + 1);
        assert_eq!(
            names.name_label("acme", "x", &long),
            OTHER,
            "too long to learn"
        );
        assert_eq!(method_label("tools/call"), "tools/call");
        assert_eq!(method_label("x/y"), OTHER);
        assert_eq!(clip(&"é".repeat(MAX_LABEL_BYTES)).len(), MAX_LABEL_BYTES);
    }

    #[test]
    fn learning_is_bounded() {
        let names = MetricNames::default();
        let many: Vec<String> = (0..MAX_LEARNED_PER_SOURCE * 2)
            .map(|i| format!("t{i}"))
            .collect();
        names.learn_names("acme", "s", many.iter().map(String::as_str));
        assert_eq!(names.lock().total, 1 + MAX_LEARNED_PER_SOURCE);
        let sources: Vec<String> = (0..MAX_LEARNED * 2).map(|i| format!("s{i}")).collect();
        names.learn_sources("acme", &sources);
        assert_eq!(names.lock().total, MAX_LEARNED);
    }
}
