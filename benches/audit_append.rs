//! Audit appends per second through the `Auditor`, with 1 and 64 concurrent appenders, in both
//! durability modes. One append resolves when its row is durable: since issue 18, written to
//! the segment file (and with `fsync`, synced, one sync shared by every append waiting), with
//! the SQLite index built behind it by the indexer thread, whose CPU the "CPU per append" line
//! includes. Before, an append resolved when its row was committed to SQLite (the history
//! below).
//!
//! The trail lives in `target/` (a real disk, not tmpfs, so `fsync` means something).
//!
//! Measured 2026-11-26 on the shared 2-vCPU dev machine (load average about 9, so read these as
//! a floor), `cargo bench --bench audit_append`, appends per second (median):
//! commit 1: 7.0k (143 µs per append), commit 64: 14.6k; fsync 1: 370 (2.7 ms),
//! fsync 64: 5.9k (group commit shares each fsync among about 16 appends).
//!
//! Again 2026-11-26 (load average 5-6), before and after the writer woke on a std channel and
//! the WAL merge left the commit path (median): commit 1: 7.8k -> 8.0k (128 -> 125 µs);
//! commit 64: 21.9k -> 48.6k; fsync 1: 980 -> 3.3k (1.02 -> 0.31 ms); fsync 64: 8.8k -> 30.7k.
//!
//! 2026-11-26 (load 3-10), CPU per append (all threads; steadier than the times here):
//! before the cached BEGIN/COMMIT and by-reference insert: commit 1 68.2 µs, commit 64 28.0 µs;
//! after: 54.1 and 18.8 µs (commit 1 wall 85 -> 57 µs). With inline commits gated on 100 µs
//! of idleness: commit 64 19.1 µs CPU, 55.9k appends/s. Commit 1 here is a continuous stream
//! (no gap), so it takes the queue; the inline path shows in `examples/echo_latency.rs`.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mcp_tunnel::govern::audit::{AuditSettings, Durability};
use mcp_tunnel::govern::audit::{Auditor, Record, digest};

/// A typical metadata-only record of a tool call.
fn record(n: u64) -> Record {
    let tenant = if n.is_multiple_of(2) {
        "acme"
    } else {
        "globex"
    };
    Record {
        time_ms: 1_764_140_400_000 + n,
        subject: "alice@acme.example".into(),
        session: Some("3f1c2e9a-6b7d-4d0e-9c55-0d7c6f0a8b21".into()),
        latency_us: 850,
        bytes_in: 180,
        bytes_out: 420,
        args_sha256: digest(b"{\"name\":\"query\",\"arguments\":{\"sql\":\"select 1\"}}"),
        ..Record::example(tenant, n)
    }
}

/// CPU time this process has used (user + system, every thread: the appending tasks, the
/// writer and the WAL thread). CPU per append varies far less than wall time on a shared
/// machine, so small changes to the writer show in it when the timings are noise.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

fn appends(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let base = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut group = c.benchmark_group("audit_append");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for (label, durability) in [("commit", Durability::Commit), ("fsync", Durability::Fsync)] {
        let dir = tempfile::tempdir_in(base).expect("a temp dir under target/");
        let mut config = AuditSettings::new(dir.path().join("audit.db"));
        config.durability = durability;
        let auditor = runtime
            .block_on(async { Auditor::open(&config) })
            .expect("a bench cannot run without its trail: open it under target/");
        for concurrency in [1u64, 64] {
            let cpu = std::cell::Cell::new((Duration::ZERO, 0u64));
            group.bench_with_input(
                BenchmarkId::new(label, concurrency),
                &concurrency,
                |b, &concurrency| {
                    b.iter_custom(|iters| {
                        let cpu_before = cpu_time();
                        let elapsed = runtime.block_on(async {
                            let started = Instant::now();
                            let tasks: Vec<_> = (0..concurrency)
                                .map(|task| {
                                    let auditor = auditor.clone();
                                    // Task `task` does every `concurrency`-th of the `iters`.
                                    tokio::spawn(async move {
                                        let mut n = task;
                                        while n < iters {
                                            auditor.append(record(n)).await.expect(
                                                "a failed append would falsify the measurement",
                                            );
                                            n += concurrency;
                                        }
                                    })
                                })
                                .collect();
                            for task in tasks {
                                task.await
                                    .expect("an append task panics only if an append failed");
                            }
                            started.elapsed()
                        });
                        let (time, count) = cpu.get();
                        cpu.set((time + cpu_time().saturating_sub(cpu_before), count + iters));
                        elapsed
                    })
                },
            );
            let (time, count) = cpu.get();
            println!(
                "audit_append/{label}/{concurrency}: CPU {:.1} µs per append (all threads, {count} appends)",
                time.as_secs_f64() * 1e6 / count.max(1) as f64
            );
        }
        runtime.block_on(auditor.close());
    }
    group.finish();
}

criterion_group!(benches, appends);
criterion_main!(benches);
