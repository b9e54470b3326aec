//! What the live activity feed costs the relay: `Activity::push` runs on every finished call,
//! so it must stay a short lock and no waiting; the per-tool rows are what every viewer's
//! refresh costs at most once per 250 ms.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use mcp_tunnel::govern::audit::Record;
use mcp_tunnel::relay::{Activity, LATENCY_WINDOW, MAX_STATS_KEYS};

fn record(tool: &str, latency_us: u64) -> Record {
    Record {
        time_ms: 1_764_000_000_000,
        session: Some("s1".into()),
        tool: Some(tool.into()),
        latency_us,
        ..Record::example("acme", 7)
    }
}

fn push(c: &mut Criterion) {
    let records: Vec<Arc<Record>> = (0..100)
        .map(|i| Arc::new(record(&format!("tool{i}"), 1_000 + i)))
        .collect();
    let mut group = c.benchmark_group("activity");
    for viewers in [0usize, 1] {
        let activity = Activity::default();
        // A viewer that never reads: the broadcast must drop for it, not wait.
        let _viewers: Vec<_> = (0..viewers).map(|_| activity.subscribe()).collect();
        // Steady state: the ring full, every key known.
        for _ in 0..10 {
            for r in &records {
                activity.push(r.clone());
            }
        }
        let mut i = 0;
        group.bench_function(format!("push/{viewers}_viewers"), |b| {
            b.iter(|| {
                i = (i + 1) % records.len();
                activity.push(black_box(records[i].clone()));
            })
        });
    }
    // The worst refresh: every key in use, every window full, rows recomputed.
    let activity = Activity::default();
    for k in 0..MAX_STATS_KEYS {
        let r = Arc::new(record(&format!("tool{k}"), 1_000));
        for _ in 0..LATENCY_WINDOW {
            activity.push(r.clone());
        }
    }
    group.sample_size(10);
    group.bench_function("tools/2000_keys_full_windows", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                // Past the rows' cache age each time: a real recomputation, timed alone.
                std::thread::sleep(Duration::from_millis(260));
                let start = Instant::now();
                black_box(activity.tools(None).len());
                spent += start.elapsed();
            }
            spent
        })
    });
    group.finish();
}

criterion_group!(benches, push);
criterion_main!(benches);
