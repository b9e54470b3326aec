//! Task ids bound to the caller that created the task (see [`crate::mcp::tasks`]).
//!
//! The id an agent sees is `TAG.RAW`: the upstream's own id `RAW` after a 128-bit tag, an
//! HMAC keyed by the fleet secret over the tenant, subject and source it belongs to. Any relay
//! of the fleet checks it with no shared state; another caller's id (or the upstream's bare
//! one) fails the check and is answered as a task that does not exist, an audited refusal. The
//! same task always gets the same id, so the ids in status notifications and `tasks/get`
//! results match the one the creation gave.
//!
//! A 2025-11-25 `tasks/list` result names tasks by their upstream ids alone, with nothing that
//! says whose they are: the relay keeps the entries it saw its caller create ([`TaskOwners`],
//! per relay) and leaves the others out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use parking_lot::Mutex;

use crate::govern::Identity;
use crate::mcp::tasks::{self, TaskIds};
use crate::relay::fleet::{FleetKeys, TASK_TAG_LEN};

/// Tasks remembered as created, per tenant: each is a 128-bit digest (with the order kept, about
/// 48 bytes), so a tenant's record stays under 0.5 MiB; past it the oldest is forgotten (its
/// task drops out of its caller's `tasks/list`, and stays reachable by its id).
const OWNED_PER_TENANT: usize = 10_000;

/// The characters of a tag in base64url, unpadded.
const TAG_CHARS: usize = (TASK_TAG_LEN * 4).div_ceil(3);

/// One caller's view of one source's task ids.
#[derive(Clone)]
pub(crate) struct TaskBinding {
    keys: Arc<FleetKeys>,
    owners: Arc<TaskOwners>,
    tenant: Arc<str>,
    subject: Arc<str>,
    source: Arc<str>,
}

impl TaskBinding {
    /// `who`'s task ids at `source`.
    pub(crate) fn new(
        keys: &Arc<FleetKeys>,
        owners: &Arc<TaskOwners>,
        who: &Identity,
        source: &str,
    ) -> Self {
        Self::of(keys, owners, (&who.tenant, &who.subject), source)
    }

    /// The task ids of the caller `(tenant, subject)` at `source`.
    pub(crate) fn of(
        keys: &Arc<FleetKeys>,
        owners: &Arc<TaskOwners>,
        (tenant, subject): (&Arc<str>, &Arc<str>),
        source: &str,
    ) -> Self {
        Self {
            keys: keys.clone(),
            owners: owners.clone(),
            tenant: tenant.clone(),
            subject: subject.clone(),
            source: source.into(),
        }
    }

    /// What the tag covers: every part length-prefixed, so no two callers' parts run together
    /// into the same bytes.
    fn tagged(&self, raw: &str) -> Vec<u8> {
        let parts = [&*self.tenant, &*self.subject, &*self.source, raw];
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
        for part in parts {
            let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
            data.extend_from_slice(&len.to_be_bytes());
            data.extend_from_slice(part.as_bytes());
        }
        data
    }

    fn tag(&self, raw: &str) -> [u8; TASK_TAG_LEN] {
        self.keys.tag(&self.tagged(raw))
    }

    /// What the record of created tasks keeps of one: a digest of the same parts as the tag,
    /// unkeyed (the record never leaves the relay), so a rotation of the fleet secret leaves
    /// it valid.
    fn owner_key(&self, raw: &str) -> [u8; TASK_TAG_LEN] {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.tagged(raw));
        let mut key = [0u8; TASK_TAG_LEN];
        key.copy_from_slice(&digest[..TASK_TAG_LEN]);
        key
    }

    /// The upstream's message as the caller sees it: every task id in it bound, a task list
    /// cut to the caller's own; anything else unchanged (no parse unless it names a task).
    pub(crate) fn apply(&self, message: Bytes) -> Bytes {
        tasks::bind_answer(&message, self).map_or(message, Bytes::from)
    }
}

impl TaskIds for TaskBinding {
    fn bind(&self, raw: &str) -> String {
        format!("{}.{raw}", URL_SAFE_NO_PAD.encode(self.tag(raw)))
    }

    fn unbind(&self, bound: &str) -> Option<String> {
        let (tag, raw) = bound.split_at_checked(TAG_CHARS)?;
        let raw = raw.strip_prefix('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        self.keys
            .verify_tag(&self.tagged(raw), &tag)
            .then(|| raw.to_owned())
    }

    fn created(&self, raw: &str) {
        self.owners.record(&self.tenant, self.owner_key(raw));
    }

    fn listed(&self, raw: &str) -> bool {
        self.owners.holds(&self.tenant, self.owner_key(raw))
    }
}

/// The tasks this relay saw created, by tenant: a digest of each (of the caller, the source
/// and the task), so a `tasks/list` answer keeps only the caller's own.
#[derive(Default)]
pub(crate) struct TaskOwners {
    tenants: Mutex<HashMap<Arc<str>, Owned>>,
}

#[derive(Default)]
struct Owned {
    tags: HashSet<[u8; TASK_TAG_LEN]>,
    /// In the order recorded: the front is forgotten first.
    order: VecDeque<[u8; TASK_TAG_LEN]>,
}

impl TaskOwners {
    fn record(&self, tenant: &Arc<str>, tag: [u8; TASK_TAG_LEN]) {
        let mut tenants = self.tenants.lock();
        let owned = tenants.entry(tenant.clone()).or_default();
        if !owned.tags.insert(tag) {
            return;
        }
        owned.order.push_back(tag);
        while owned.order.len() > OWNED_PER_TENANT {
            if let Some(old) = owned.order.pop_front() {
                owned.tags.remove(&old);
            }
        }
    }

    fn holds(&self, tenant: &str, tag: [u8; TASK_TAG_LEN]) -> bool {
        self.tenants
            .lock()
            .get(tenant)
            .is_some_and(|owned| owned.tags.contains(&tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(
        keys: &Arc<FleetKeys>,
        owners: &Arc<TaskOwners>,
        tenant: &str,
        subject: &str,
    ) -> TaskBinding {
        TaskBinding::of(keys, owners, (&tenant.into(), &subject.into()), "db")
    }

    #[test]
    fn a_bound_id_unbinds_only_for_its_caller_on_any_relay_of_the_fleet() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let keys = Arc::new(FleetKeys::from_secrets(secret, &[]));
        let elsewhere = Arc::new(FleetKeys::from_secrets(secret, &[]));
        let owners = Arc::default();
        let alice = binding(&keys, &owners, "acme", "alice");
        let bound = alice.bind("task-1");
        assert_eq!(bound, alice.bind("task-1"), "one task, one id");
        assert!(bound.ends_with(".task-1"));
        assert_eq!(alice.unbind(&bound).as_deref(), Some("task-1"));
        let on_another_relay = binding(&elsewhere, &Arc::default(), "acme", "alice");
        assert_eq!(on_another_relay.unbind(&bound).as_deref(), Some("task-1"));
        for other in [
            binding(&keys, &owners, "acme", "bob"),
            binding(&keys, &owners, "other", "alice"),
            TaskBinding::of(&keys, &owners, (&"acme".into(), &"alice".into()), "mail"),
        ] {
            assert_eq!(other.unbind(&bound), None);
        }
        assert_eq!(alice.unbind("task-1"), None, "the upstream's bare id");
        assert_eq!(alice.unbind(&bound.replace("task-1", "task-2")), None);
        assert_eq!(alice.unbind(""), None);
        assert_eq!(alice.unbind("é"), None, "no panic on a char boundary");
        let split = binding(&keys, &owners, "acme", "ali");
        assert_ne!(
            split.bind("ce"),
            binding(&keys, &owners, "acme", "").bind("alice")
        );
    }

    #[test]
    fn a_list_keeps_what_the_caller_created() {
        let keys = Arc::new(FleetKeys::standalone());
        let owners = Arc::default();
        let alice = binding(&keys, &owners, "acme", "alice");
        let bob = binding(&keys, &owners, "acme", "bob");
        alice.created("t1");
        assert!(alice.listed("t1"));
        assert!(!bob.listed("t1"));
        assert!(!alice.listed("t2"));
        for n in 0..OWNED_PER_TENANT {
            bob.created(&format!("b{n}"));
        }
        assert!(!alice.listed("t1"), "the oldest is forgotten past the cap");
        let other = binding(&keys, &owners, "other", "carol");
        other.created("c");
        assert!(
            bob.listed("b1"),
            "another tenant's record costs this one nothing"
        );
    }
}
