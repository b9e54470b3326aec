//! Authorization cost per call: roles with globs only (the common path: the body is never
//! parsed), a role whose CEL condition matches the call (params parsed, expression evaluated),
//! and a role whose condition is for another tool (not evaluated).

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use mcp_tunnel::govern::condition::{Call, Condition};
use mcp_tunnel::govern::policy::{Kind, Role};
use mcp_tunnel::govern::{Identity, Policy};

const BODY: &[u8] = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"query","arguments":{"table":"orders","limit":100,"filters":{"region":"emea","year":2026}}}}"#;

fn policy(condition_on: Option<&str>) -> Policy {
    let conditions = condition_on
        .map(|pattern| {
            Arc::new(
                Condition::compile(
                    Kind::Tool,
                    pattern.into(),
                    r#"args.table != "salaries" || "hr" in roles"#,
                )
                .expect("compiles"),
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
        body: BODY,
        batch_index: None,
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

criterion_group!(benches, authorize);
criterion_main!(benches);
