//! Per-caller list filtering: a caller sees in `tools/list`, `resources/list`,
//! `resources/templates/list` and `prompts/list` only what policy lets them use.
//!
//! Only answers to those methods, and only for tenants with roles, are parsed and re-encoded;
//! everything else passes untouched.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::Calls;
use crate::govern::Identity;
use crate::govern::policy::Kind;
use crate::mcp::Classified;
use crate::relay::governance::Governance;

/// The result field holding the list of a list method, what its entries are, and the entry
/// field naming each; `None` for other methods.
fn list_of(method: &str) -> Option<(&'static str, Kind, &'static str)> {
    Some(match method {
        "tools/list" => ("tools", Kind::Tool, "name"),
        "resources/list" => ("resources", Kind::Resource, "uri"),
        "resources/templates/list" => ("resourceTemplates", Kind::Resource, "uriTemplate"),
        "prompts/list" => ("prompts", Kind::Prompt, "name"),
        _ => return None,
    })
}

/// Whether `method` lists tools, resources, resource templates or prompts (an answer policy
/// filters per caller).
pub(crate) fn is_list_method(method: &str) -> bool {
    list_of(method).is_some()
}

/// Filters the answer to one list request, and teaches the relay's metric labels the tool and
/// prompt names the upstream listed (see [`super::metric_names`]).
pub(crate) struct ListFilter {
    who: Identity,
    source: String,
    governance: Arc<Governance>,
    calls: Arc<Calls>,
    /// Whether the caller's tenant has roles (entries are then filtered).
    restricts: bool,
    /// The result field holding the list, and what its entries are.
    field: &'static str,
    kind: Kind,
    /// The entry field naming each entry.
    name: &'static str,
}

impl ListFilter {
    /// A filter for `classified` (a single list request), if the caller's tenant has roles or
    /// the list names tools or prompts (names metrics may label calls with).
    pub(crate) fn for_request(
        governance: &Arc<Governance>,
        calls: &Arc<Calls>,
        who: &Identity,
        source: &str,
        classified: &Classified,
    ) -> Option<Self> {
        let Classified::Single(request) = classified else {
            return None;
        };
        let (field, kind, name) = list_of(request.method.as_deref()?)?;
        let restricts = governance.policy.restricts(&who.tenant);
        if !restricts && kind == Kind::Resource {
            return None;
        }
        Some(Self {
            who: who.clone(),
            source: source.to_owned(),
            governance: governance.clone(),
            calls: calls.clone(),
            restricts,
            field,
            kind,
            name,
        })
    }

    /// The message with the entries the caller may not use removed. Messages that are not a
    /// list result (progress notifications, errors) pass unchanged.
    pub(crate) fn apply(&self, message: Bytes) -> Bytes {
        let Ok(mut value) = serde_json::from_slice::<Value>(&message) else {
            return message;
        };
        let Some(entries) = value
            .get_mut("result")
            .and_then(|r| r.get_mut(self.field))
            .and_then(Value::as_array_mut)
        else {
            return message;
        };
        let field = self.name;
        fn name_of<'v>(entry: &'v Value, field: &str) -> &'v str {
            entry.get(field).and_then(Value::as_str).unwrap_or_default()
        }
        if self.kind != Kind::Resource {
            self.calls.metric_names().learn_names(
                &self.who.tenant,
                &self.source,
                entries.iter().map(|entry| name_of(entry, field)),
            );
        }
        if !self.restricts {
            return message;
        }
        let before = entries.len();
        entries.retain(|entry| {
            self.governance
                .policy
                .check(&self.who, self.kind, &self.source, name_of(entry, field))
                .is_allowed()
        });
        let mut changed = entries.len() != before;
        // The list is the caller's (policy decides it by identity): no cache may share it
        // (2026-07-28's `cacheScope`, present on results of that era).
        if let Some(scope) = value
            .get_mut("result")
            .and_then(|r| r.get_mut("cacheScope"))
            .filter(|scope| scope.as_str() != Some("private"))
        {
            *scope = Value::from("private");
            changed = true;
        }
        if !changed {
            return message;
        }
        serde_json::to_vec(&value)
            .map(Bytes::from)
            .unwrap_or(message)
    }
}
