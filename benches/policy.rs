//! Policy evaluation (`govern::Policy::check_tool`) with 1, 10 and 100 roles held by the
//! caller, each with an allow and a deny glob: the allowed call is found in the last role (the
//! longest scan), the denied one matches no role (every glob tried twice: deny, then allow).

use std::collections::HashMap;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mcp_tunnel::govern::policy::Role;
use mcp_tunnel::govern::{Identity, Policy};
use std::hint::black_box;

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

fn bench(c: &mut Criterion) {
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

criterion_group!(benches, bench);
criterion_main!(benches);
