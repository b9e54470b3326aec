//! The Streamable HTTP source against a real HTTP server.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::any;
use bytes::Bytes;
use parking_lot::Mutex;

use super::HttpSource;
use crate::wire::{Era, Frame, FrameReader, FrameWriter, OpenHeader};

/// A relay (here: the test) that puts `Host`, `Authorization`, `Cookie` and the upstream
/// session id into a stream's `mcp_headers` gets none of them upstream; the MCP routing
/// headers go through.
#[tokio::test]
async fn only_mcp_routing_headers_from_the_relay_reach_the_upstream() {
    let seen: Arc<Mutex<Option<http::HeaderMap>>> = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/mcp",
        any(move |headers: http::HeaderMap| {
            let record = record.clone();
            async move {
                *record.lock() = Some(headers);
                // One answer for everything: `connect`'s server/discover probe reads a
                // 2026-07-28 upstream from it (no bridge), the agent's tools/list its list.
                (
                    [("content-type", "application/json")],
                    r#"{"jsonrpc":"2.0","id":1,"result":{"resultType":"complete","supportedVersions":["2026-07-28"],"tools":[]}}"#,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("bound");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let source = Arc::new(HttpSource::new("db", &format!("http://{addr}/mcp")).expect("source"));
    let header = OpenHeader {
        tenant: "acme".into(),
        source: "db".into(),
        subject: "alice".into(),
        era: Era::Stateless,
        protocol_version: Some("2026-07-28".into()),
        context: String::new(),
        mcp_headers: [
            ("host", "evil.example"),
            ("authorization", "Bearer stolen"),
            ("cookie", "session=1"),
            ("mcp-session-id", "forged"),
            ("x-forwarded-for", "10.0.0.1"),
            ("mcp-method", "tools/list"),
            ("mcp-param-region", "eu"),
        ]
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect(),
        traceparent: None,
        assertion: None,
        session: None,
    };
    let (relay_end, connect_end) = tokio::io::duplex(64 * 1024);
    let (connect_read, connect_write) = tokio::io::split(connect_end);
    let (relay_read, relay_write) = tokio::io::split(relay_end);
    let served = tokio::spawn(source.serve(
        header,
        true,
        FrameReader::new(Box::new(connect_read), 1 << 20),
        FrameWriter::new(Box::new(connect_write), 1 << 20),
    ));
    let mut to_connect = FrameWriter::new(relay_write, 1 << 20);
    let mut from_connect = FrameReader::new(relay_read, 1 << 20);
    to_connect
        .send(&Frame::message(
            1,
            Bytes::from_static(br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#),
        ))
        .await
        .expect("sent");
    let answer = tokio::time::timeout(Duration::from_secs(30), from_connect.next())
        .await
        .expect("answered in time")
        .expect("a frame")
        .expect("not the end");
    assert!(
        String::from_utf8_lossy(&answer.payload).contains("tools"),
        "{answer:?}"
    );
    let headers = seen.lock().clone().expect("a request");
    assert_eq!(headers["host"], addr.to_string().as_str());
    for absent in [
        "authorization",
        "cookie",
        "mcp-session-id",
        "x-forwarded-for",
    ] {
        assert!(!headers.contains_key(absent), "{absent}: {headers:?}");
    }
    assert_eq!(headers["mcp-method"], "tools/list");
    assert_eq!(headers["mcp-param-region"], "eu");
    drop((to_connect, from_connect));
    served.abort();
    server.abort();
}

/// What an idle session keeps of its stream's task is mostly that task's future, sized for
/// its largest await. The rare paths (HTTP+SSE, a bridge, a refusal, the session's end) are
/// boxed where they are awaited, so 10,000 idle sessions do not each keep room for them.
#[tokio::test]
async fn a_streams_future_is_sized_for_its_frame_loop_not_its_rare_paths() {
    let source = Arc::new(HttpSource::new("db", "http://127.0.0.1:9/mcp").expect("source"));
    let header = OpenHeader {
        tenant: "acme".into(),
        source: "db".into(),
        subject: "alice".into(),
        era: Era::Session,
        protocol_version: None,
        context: String::new(),
        mcp_headers: Default::default(),
        traceparent: None,
        assertion: None,
        session: None,
    };
    let (near, far) = tokio::io::duplex(1024);
    let (read, write) = tokio::io::split(far);
    let serving = source.serve(
        header,
        true,
        FrameReader::new(Box::new(read), 1 << 20),
        FrameWriter::new(Box::new(write), 1 << 20),
    );
    let size = std::mem::size_of_val(&serving);
    // 2.5 KiB in a debug build (the bound leaves room for the compiler's layout to vary).
    // Before the rare paths were boxed the whole stream task took 7.5 KiB per idle session in
    // a release build (heaptrack), 3.2 KiB after.
    assert!(size <= 4096, "a stream's future takes {size} bytes");
    drop((serving, near));
}
