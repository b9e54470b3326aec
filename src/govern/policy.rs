//! Authorization: roles with `allow` and `deny` globs over `SOURCE/TOOL`, and the same for
//! resources (`SOURCE/URI`) and prompts (`SOURCE/PROMPT`).
//!
//! A tenant without roles allows everything (a first setup works at once). Once a tenant has
//! roles, a call is allowed only if one of the caller's roles allows it and none denies it.
//!
//! A role may also carry [conditions](super::condition) (CEL expressions over the call's
//! arguments and the caller's identity): a role allows a call only when each of its conditions
//! that matches the call holds. Lists are filtered by globs alone ([`Policy::check`]): whether
//! a call passes its conditions depends on its arguments, so an entry that some call could use
//! stays listed; calls are checked whole by [`Policy::check_call`].

use std::collections::HashMap;
use std::sync::Arc;

use super::Identity;
use super::condition::{Call, Condition, EvalError};

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
    /// Conditions narrowing what this role allows.
    pub conditions: Vec<Arc<Condition>>,
}

/// What a rule governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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

    /// May `who` use the tool, resource or prompt `name` of `source`, as far as globs say
    /// (conditions are not evaluated: this is for list filtering)?
    pub fn check(&self, who: &Identity, kind: Kind, source: &str, name: &str) -> Decision {
        let Some(roles) = self.roles_of(who) else {
            return Decision::Allow("tenant has no roles".into());
        };
        let target = format!("{source}/{name}");
        if let Some(denied) = denial(who, roles, kind, &target) {
            return denied;
        }
        match allowing(who, roles, kind, &target).next() {
            Some((role, _, glob)) => Decision::Allow(format!("role {role} allows {glob}")),
            None => Decision::Deny("no role allows it".into()),
        }
    }

    /// May the call be made: a role allows it, none denies it, and the allowing role's
    /// conditions that match it hold? The call's arguments are read only if a condition
    /// matches. A condition that cannot be evaluated denies, naming the error.
    pub fn check_call(&self, call: &Call<'_>) -> Decision {
        let Some(roles) = self.roles_of(call.who) else {
            return Decision::Allow("tenant has no roles".into());
        };
        let target = format!("{}/{}", call.source, call.name);
        if let Some(denied) = denial(call.who, roles, call.kind, &target) {
            return denied;
        }
        let mut args: Option<Result<cel::Value, EvalError>> = None;
        let mut refusal: Option<String> = None;
        for (name, role, glob) in allowing(call.who, roles, call.kind, &target) {
            let mut held = 0;
            let mut failed = None;
            for condition in role
                .conditions
                .iter()
                .filter(|c| c.applies(call.kind, &target))
            {
                let outcome = match args.get_or_insert_with(|| call.args()) {
                    Ok(args) => condition.evaluate(call, args),
                    Err(e) => Err(e.clone()),
                };
                let pattern = &condition.pattern;
                match outcome {
                    Ok(true) => held += 1,
                    Ok(false) => {
                        failed = Some(format!("role {name}: condition on {pattern} is false"));
                        break;
                    }
                    Err(e) => {
                        failed = Some(format!("role {name}: condition on {pattern} failed: {e}"));
                        break;
                    }
                }
            }
            match failed {
                None if held == 0 => return Decision::Allow(format!("role {name} allows {glob}")),
                None => {
                    return Decision::Allow(format!(
                        "role {name} allows {glob}; {held} condition(s) hold"
                    ));
                }
                Some(why) => {
                    refusal.get_or_insert(why);
                }
            }
        }
        Decision::Deny(refusal.unwrap_or_else(|| "no role allows it".into()))
    }

    /// Whether [`Policy::check_call`] would evaluate a condition for a call of `kind` on
    /// `source`/`name` by `who`: the tenant has roles, none of the caller's denies it, and a
    /// role that allows it has a condition matching it. Globs only, so cheap: the relay asks
    /// this first and runs the costly checks off its async workers.
    pub fn evaluates_conditions(
        &self,
        who: &Identity,
        kind: Kind,
        source: &str,
        name: &str,
    ) -> bool {
        let Some(roles) = self.roles_of(who) else {
            return false;
        };
        let target = format!("{source}/{name}");
        denial(who, roles, kind, &target).is_none()
            && allowing(who, roles, kind, &target)
                .any(|(_, role, _)| role.conditions.iter().any(|c| c.applies(kind, &target)))
    }

    /// Every `allow` and `deny` glob over tools and prompts, with its tenant: where the relay
    /// finds the names policy states literally (metric labels).
    pub fn tool_and_prompt_globs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tenants.iter().flat_map(|(tenant, roles)| {
            roles.values().flat_map(move |role| {
                role.allow
                    .iter()
                    .chain(&role.deny)
                    .chain(&role.allow_prompts)
                    .chain(&role.deny_prompts)
                    .map(move |glob| (&**tenant, glob.as_str()))
            })
        })
    }

    fn roles_of(&self, who: &Identity) -> Option<&HashMap<String, Role>> {
        self.tenants
            .get(&who.tenant)
            .filter(|roles| !roles.is_empty())
    }
}

/// The first deny glob of the caller's roles matching `target`, as a decision.
fn denial(
    who: &Identity,
    roles: &HashMap<String, Role>,
    kind: Kind,
    target: &str,
) -> Option<Decision> {
    who.roles.iter().find_map(|name| {
        let (_, deny) = roles.get(name)?.globs(kind);
        let glob = deny.iter().find(|g| glob_match(g, target))?;
        Some(Decision::Deny(format!("role {name} denies {glob}")))
    })
}

/// The caller's roles that allow `target` by glob, in the caller's order, with the glob.
fn allowing<'a>(
    who: &'a Identity,
    roles: &'a HashMap<String, Role>,
    kind: Kind,
    target: &'a str,
) -> impl Iterator<Item = (&'a str, &'a Role, &'a str)> {
    who.roles.iter().filter_map(move |name| {
        let role = roles.get(name)?;
        let (allow, _) = role.globs(kind);
        let glob = allow.iter().find(|g| glob_match(g, target))?;
        Some((name.as_str(), role, glob.as_str()))
    })
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
    use crate::govern::identity::tests::who;

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

    /// A call of `name` whose `params` are those of `body`, a JSON-RPC message (or, when not
    /// JSON, the text itself).
    fn call<'a>(who: &'a Identity, name: &'a str, body: &'a str) -> Call<'a> {
        let params = crate::mcp::classify(body.as_bytes())
            .ok()
            .and_then(|c| c.messages()[0].payload.clone())
            .map_or(body.as_bytes(), |range| &body.as_bytes()[range]);
        Call {
            who,
            kind: Kind::Tool,
            source: "db",
            name,
            params: Some(params),
        }
    }

    #[test]
    fn conditions_narrow_the_role_that_allows() {
        let condition = |pattern: &str, when: &str| {
            Arc::new(Condition::compile(Kind::Tool, pattern.into(), when).expect("compiles"))
        };
        let mut roles = HashMap::new();
        roles.insert(
            "analyst".to_string(),
            Role {
                allow: vec!["db/*".into()],
                conditions: vec![condition(
                    "db/query",
                    r#"args.table != "salaries" || "hr" in roles"#,
                )],
                ..Role::default()
            },
        );
        roles.insert(
            "auditor".to_string(),
            Role {
                allow: vec!["db/query".into()],
                ..Role::default()
            },
        );
        let mut policy = Policy::default();
        policy.set_roles("acme".into(), roles);
        let salaries = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"query","arguments":{"table":"salaries"}}}"#;
        let orders = salaries.replace("salaries", "orders");
        let analyst = who(&["analyst"]);
        assert_eq!(
            policy.check_call(&call(&analyst, "query", &orders)),
            Decision::Allow("role analyst allows db/*; 1 condition(s) hold".into())
        );
        assert_eq!(
            policy.check_call(&call(&analyst, "query", salaries)),
            Decision::Deny("role analyst: condition on db/query is false".into())
        );
        assert!(
            policy
                .check(&analyst, Kind::Tool, "db", "query")
                .is_allowed(),
            "lists are filtered by globs alone"
        );
        // A body that is not even JSON is never parsed unless a condition applies.
        assert_eq!(
            policy.check_call(&call(&analyst, "tables", "not json")),
            Decision::Allow("role analyst allows db/*".into())
        );
        let failed = policy.check_call(&call(
            &analyst,
            "query",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"query"}}"#,
        ));
        assert!(
            matches!(&failed, Decision::Deny(why) if why.starts_with("role analyst: condition on db/query failed:")),
            "a missing field denies, naming the error: {failed:?}"
        );
        let both = who(&["analyst", "auditor"]);
        assert_eq!(
            policy.check_call(&call(&both, "query", salaries)),
            Decision::Allow("role auditor allows db/query".into()),
            "another role that allows without a condition still allows"
        );
    }
}
