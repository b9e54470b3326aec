//! Authorization: roles with `allow` and `deny` globs over `SOURCE/TOOL`, and the same for
//! resources (`SOURCE/URI`) and prompts (`SOURCE/PROMPT`).
//!
//! A tenant without roles allows everything (a first setup works at once). Once a tenant has
//! roles, a call is allowed only if one of the caller's roles allows it and none denies it.

use std::collections::HashMap;
use std::sync::Arc;

use super::Identity;

/// One role: what it allows and what it denies.
#[derive(Debug, Clone, Default)]
pub struct Role {
    /// Globs over `SOURCE/TOOL` this role may call.
    pub allow: Vec<String>,
    /// Globs this role may never call; deny wins over allow across all roles.
    pub deny: Vec<String>,
    /// Globs over `SOURCE/URI` of resources this role may read.
    pub allow_resources: Vec<String>,
    /// Resource globs denied.
    pub deny_resources: Vec<String>,
    /// Globs over `SOURCE/PROMPT` this role may get.
    pub allow_prompts: Vec<String>,
    /// Prompt globs denied.
    pub deny_prompts: Vec<String>,
}

/// What a rule governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `tools/call`, and the entries of `tools/list`.
    Tool,
    /// `resources/read` and subscriptions, and the entries of the resource lists.
    Resource,
    /// `prompts/get`, and the entries of `prompts/list`.
    Prompt,
}

impl Role {
    fn globs(&self, kind: Kind) -> (&[String], &[String]) {
        match kind {
            Kind::Tool => (&self.allow, &self.deny),
            Kind::Resource => (&self.allow_resources, &self.deny_resources),
            Kind::Prompt => (&self.allow_prompts, &self.deny_prompts),
        }
    }
}

/// The outcome of a policy check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; the text names the rule (for the audit trail).
    Allow(String),
    /// Denied; the text names the rule.
    Deny(String),
}

impl Decision {
    /// Whether the call may proceed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

/// The roles of every tenant.
#[derive(Debug, Default)]
pub struct Policy {
    tenants: HashMap<Arc<str>, HashMap<String, Role>>,
}

impl Policy {
    /// Sets the roles of `tenant`.
    pub fn set_roles(&mut self, tenant: Arc<str>, roles: HashMap<String, Role>) {
        self.tenants.insert(tenant, roles);
    }

    /// Whether `tenant` has roles (so lists must be filtered per caller).
    pub fn restricts(&self, tenant: &str) -> bool {
        self.tenants
            .get(tenant)
            .is_some_and(|roles| !roles.is_empty())
    }

    /// May `who` call `tool` on `source`?
    pub fn check_tool(&self, who: &Identity, source: &str, tool: &str) -> Decision {
        self.check(who, Kind::Tool, source, tool)
    }

    /// May `who` use the tool, resource or prompt `name` of `source`?
    pub fn check(&self, who: &Identity, kind: Kind, source: &str, name: &str) -> Decision {
        let Some(roles) = self
            .tenants
            .get(&who.tenant)
            .filter(|roles| !roles.is_empty())
        else {
            return Decision::Allow("tenant has no roles".into());
        };
        let target = format!("{source}/{name}");
        let mine = || {
            who.roles
                .iter()
                .filter_map(|name| roles.get(name).map(|role| (name, role.globs(kind))))
        };
        if let Some((name, glob)) = mine().find_map(|(name, (_, deny))| {
            deny.iter()
                .find(|g| glob_match(g, &target))
                .map(|g| (name, g))
        }) {
            return Decision::Deny(format!("role {name} denies {glob}"));
        }
        if let Some((name, glob)) = mine().find_map(|(name, (allow, _))| {
            allow
                .iter()
                .find(|g| glob_match(g, &target))
                .map(|g| (name, g))
        }) {
            return Decision::Allow(format!("role {name} allows {glob}"));
        }
        Decision::Deny("no role allows it".into())
    }
}

/// Matches `text` against `pattern`, where `*` stands for any run of characters (including `/`).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    // Position after the last `*` seen, and the text index it was tried at: classic
    // linear-time wildcard matching with one backtrack point.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi + 1, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((after_star, tried)) = star {
            pi = after_star;
            ti = tried + 1;
            star = Some((after_star, tried + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("everything/get-*", "everything/get-env"));
        assert!(glob_match("*", "a/b"));
        assert!(glob_match("*/echo", "x/echo"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("everything/echo", "everything/echo2"));
        assert!(!glob_match("a*b", "aXXc"));
        assert!(glob_match("", ""));
    }

    fn who(roles: &[&str]) -> Identity {
        Identity {
            tenant: "acme".into(),
            subject: "alice".into(),
            roles: roles
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .into(),
        }
    }

    #[test]
    fn no_roles_allows_all_then_default_deny_and_deny_wins() {
        let mut policy = Policy::default();
        assert!(policy.check_tool(&who(&[]), "db", "drop").is_allowed());
        let mut roles = HashMap::new();
        roles.insert(
            "analyst".to_string(),
            Role {
                allow: vec!["db/*".into()],
                deny: vec!["db/drop".into()],
                allow_prompts: vec!["db/report".into()],
                ..Role::default()
            },
        );
        policy.set_roles("acme".into(), roles);
        assert!(policy.restricts("acme") && !policy.restricts("other"));
        let analyst = who(&["analyst"]);
        assert!(
            policy
                .check(&analyst, Kind::Prompt, "db", "report")
                .is_allowed()
        );
        assert!(
            !policy
                .check(&analyst, Kind::Prompt, "db", "query")
                .is_allowed(),
            "tool globs do not grant prompts"
        );
        assert!(
            !policy
                .check(&analyst, Kind::Resource, "db", "file:///x")
                .is_allowed(),
            "no resource globs: none"
        );
        assert!(
            policy
                .check_tool(&who(&["analyst"]), "db", "query")
                .is_allowed()
        );
        assert!(
            !policy
                .check_tool(&who(&["analyst"]), "db", "drop")
                .is_allowed()
        );
        assert!(!policy.check_tool(&who(&[]), "db", "query").is_allowed());
        assert!(
            !policy
                .check_tool(&who(&["analyst"]), "other", "query")
                .is_allowed()
        );
    }
}
