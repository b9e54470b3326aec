//! The frame codec: encode and decode throughput for small (a tool call) and large (a 1 MiB
//! result) messages. Decoding is what every byte through the tunnel pays.

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mcp_tunnel::wire::{Frame, FrameDecoder};
use std::hint::black_box;
use tokio_util::codec::Decoder;

fn payload(size: usize) -> Bytes {
    let mut text =
        String::from(r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":""#);
    text.extend(std::iter::repeat_n(
        'x',
        size.saturating_sub(text.len() + 5),
    ));
    text.push_str(r#""}]}}"#);
    Bytes::from(text)
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for size in [128usize, 4 * 1024, 1024 * 1024] {
        let frame = Frame::message(42, payload(size));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &frame, |b, frame| {
            let mut buf = BytesMut::with_capacity(size + 64);
            b.iter(|| {
                buf.clear();
                black_box(frame).encode(&mut buf);
                black_box(buf.len())
            })
        });
        let mut wire = BytesMut::new();
        for _ in 0..16 {
            frame.encode(&mut wire);
        }
        let wire = wire.freeze();
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(BenchmarkId::new("decode_16", size), &wire, |b, wire| {
            let mut decoder = FrameDecoder::new(mcp_tunnel::wire::DEFAULT_MAX_FRAME);
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                let mut n = 0;
                while let Some(frame) = decoder.decode(&mut buf).expect("valid frames") {
                    n += black_box(frame).payload.len();
                }
                n
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
