//! Message classification (`mcp::classify`): what the relay pays per message to learn kind,
//! id, method and tool name without re-encoding. Small requests, a `tools/list` answer, and
//! 1 MiB and 10 MiB tool results (which must be scanned to the end to find `isError`).
//!
//! Then the same 10 MiB result through the incremental scanner (`mcp::ResponseScanner`) that
//! finds a streamed answer's `id`, error code and `isError` piece by piece: whole, and fed in
//! the 256 KiB pieces `connect` sends.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mcp_tunnel::mcp::{ResponseScanner, classify};
use std::hint::black_box;

/// A `tools/list` result with `n` tools, each with a small input schema.
fn tools_list(n: usize) -> String {
    let tools: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"name":"tool-{i}","description":"Tool number {i}: does one thing well","inputSchema":{{"type":"object","properties":{{"query":{{"type":"string","description":"What to look for"}},"limit":{{"type":"integer","minimum":0}}}},"required":["query"]}}}}"#
            )
        })
        .collect();
    format!(
        r#"{{"jsonrpc":"2.0","id":2,"result":{{"tools":[{}]}}}}"#,
        tools.join(",")
    )
}

/// A tool result whose text is `size` bytes.
fn result(size: usize) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":3,"result":{{"content":[{{"type":"text","text":"{}"}}],"isError":false}}}}"#,
        "x".repeat(size)
    )
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("classify");
    let cases: Vec<(&str, String)> = vec![
        (
            "tools_call",
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"message":"hello"}}}"#.into(),
        ),
        (
            "initialize",
            r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"bench","version":"0"}}}"#.into(),
        ),
        (
            "notification",
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.into(),
        ),
        ("tools_list_50", tools_list(50)),
        ("result_1MiB", result(1024 * 1024)),
        ("result_10MiB", result(10 * 1024 * 1024)),
    ];
    for (name, body) in &cases {
        group.throughput(Throughput::Bytes(body.len() as u64));
        if body.len() > 1024 * 1024 {
            group.sample_size(20);
        }
        group.bench_with_input(BenchmarkId::from_parameter(name), body, |b, body| {
            b.iter(|| classify(black_box(body.as_bytes())).expect("valid JSON-RPC"))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("scan_vs_classify");
    let body = result(10 * 1024 * 1024);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.sample_size(20);
    group.bench_function("classify_10MiB", |b| {
        b.iter(|| classify(black_box(body.as_bytes())).expect("valid JSON-RPC"))
    });
    for (name, piece) in [
        ("scan_10MiB_whole", body.len()),
        ("scan_10MiB_256KiB", 256 * 1024),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut scanner = ResponseScanner::new();
                for chunk in black_box(body.as_bytes()).chunks(piece) {
                    scanner.feed(chunk);
                }
                scanner.facts().cloned().expect("a response")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
