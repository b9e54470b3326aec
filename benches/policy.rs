//! Authorization cost per call.
//!
//! - `policy`: globs only, with 1, 10 and 100 roles held by the caller, each with an allow and a
//!   deny glob: the allowed call is found in the last role (the longest scan), the denied one
//!   matches no role (every glob tried twice: deny, then allow).
//! - `check_call`: a role whose CEL condition matches the call (params parsed, expression
//!   evaluated), a role whose condition is for another tool (not evaluated), and globs only (the
//!   common path: the params are never parsed).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mcp_tunnel::govern::condition::{Call, Condition};
use mcp_tunnel::govern::policy::{Kind, Role};
use mcp_tunnel::govern::{Identity, Policy};

/// The `params` of the call, as classification locates them in its body.
const PARAMS: &[u8] = br#"{"name":"query","arguments":{"table":"orders","limit":100,"filters":{"region":"emea","year":2026}}}"#;

fn policy(condition_on: Option<&str>) -> Policy {
    let conditions = condition_on
        .map(|pattern| {
            Arc::new(
                Condition::compile(
                    Kind::Tool,
                    pattern.into(),
                    r#"args.table != "salaries" || "hr" in roles"#,
                )
                .expect("the bench's fixed condition is valid CEL"),
            )
        })
        .into_iter()
        .collect();
    let role = Role {
        allow: vec!["db/*".into()],
        deny: vec!["db/drop".into()],
        conditions,
        ..Role::default()
    };
    let mut policy = Policy::default();
    policy.set_roles("acme".into(), HashMap::from([("analyst".to_owned(), role)]));
    policy
}

fn authorize(c: &mut Criterion) {
    let who = Identity {
        tenant: "acme".into(),
        subject: "alice@acme.example".into(),
        roles: vec!["analyst".to_owned()].into(),
    };
    let call = Call {
        who: &who,
        kind: Kind::Tool,
        source: "db",
        name: "query",
        params: Some(PARAMS),
    };
    let mut group = c.benchmark_group("check_call");
    for (name, policy) in [
        ("globs_only", policy(None)),
        ("condition_evaluated", policy(Some("db/query"))),
        ("condition_elsewhere", policy(Some("db/export"))),
    ] {
        assert!(policy.check_call(&call).is_allowed(), "{name}");
        group.bench_function(name, |b| {
            b.iter(|| black_box(&policy).check_call(black_box(&call)))
        });
    }
    group.finish();
}

fn setup(n: usize) -> (Policy, Identity) {
    let roles: HashMap<String, Role> = (0..n)
        .map(|i| {
            (
                format!("role-{i}"),
                Role {
                    allow: vec![format!("source-{i}/get-*")],
                    deny: vec![format!("source-{i}/drop-*")],
                    ..Role::default()
                },
            )
        })
        .collect();
    let mut policy = Policy::default();
    policy.set_roles("acme".into(), roles);
    let who = Identity {
        tenant: "acme".into(),
        subject: "alice@acme.example".into(),
        roles: (0..n)
            .map(|i| format!("role-{i}"))
            .collect::<Vec<_>>()
            .into(),
    };
    (policy, who)
}

fn roles(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy");
    for n in [1usize, 10, 100] {
        let (policy, who) = setup(n);
        let last = format!("source-{}", n - 1);
        assert!(policy.check_tool(&who, &last, "get-report").is_allowed());
        assert!(
            !policy
                .check_tool(&who, "elsewhere", "get-report")
                .is_allowed()
        );
        group.bench_with_input(BenchmarkId::new("allow_last", n), &n, |b, _| {
            b.iter(|| policy.check_tool(black_box(&who), black_box(&last), "get-report"))
        });
        group.bench_with_input(BenchmarkId::new("deny_none", n), &n, |b, _| {
            b.iter(|| policy.check_tool(black_box(&who), black_box("elsewhere"), "get-report"))
        });
    }
    // A tenant with no roles allows everything: the first-setup fast path.
    let (_, who) = setup(1);
    let no_roles = Policy::default();
    group.bench_function("tenant_without_roles", |b| {
        b.iter(|| no_roles.check_tool(black_box(&who), "source", "echo"))
    });
    group.finish();
}

criterion_group!(benches, roles, authorize);
criterion_main!(benches);
