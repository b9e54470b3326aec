//! The relay's listeners under attack: what a peer can make the relay hold before (and
//! without) authenticating. QUIC peers may open no streams and get a small receive window until
//! their `hello` is accepted, and handshakes in progress are capped; agent connections get a
//! header timeout, an idle timeout and a cap.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{Harness, Options, WAIT, harness_with_demo};
use futures_util::FutureExt;
use mcp_tunnel::config::LimitsSection;
use mcp_tunnel::transport::{quic, tls};
use mcp_tunnel::wire::{self, Frame, FrameKind, FrameReader, FrameWriter, Hello, HelloReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A bare QUIC client of the relay at `tunnel`: TLS with the tunnel ALPN, nothing else.
async fn raw_quic(tunnel: SocketAddr, ca_pem: &str) -> Result<quinn::Connection, String> {
    let roots = tls::Roots::CaPem(ca_pem.to_owned());
    let config = tls::client_config(&roots, &[wire::ALPN]).expect("client TLS config");
    let endpoint =
        quic::client_endpoint("127.0.0.1:0".parse().expect("literal"), config).expect("endpoint");
    let connection = tokio::time::timeout(WAIT, quic::dial(&endpoint, tunnel, "localhost"))
        .await
        .expect("dial ends");
    connection
        .map(quic::QuicConnection::into_inner)
        .map_err(|e| e.to_string())
}

/// Writes 64 KiB chunks on `send` for as long as flow control takes them without waiting
/// (nothing else runs meanwhile on a current-thread runtime, so no credit arrives); returns the
/// bytes taken.
fn write_until_blocked(send: &mut quinn::SendStream) -> usize {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut taken = 0;
    while taken < 8 * 1024 * 1024 {
        match send.write(&chunk).now_or_never() {
            Some(Ok(n)) => taken += n,
            Some(Err(e)) => panic!("write failed: {e}"),
            None => break,
        }
    }
    taken
}

#[tokio::test(flavor = "current_thread")]
async fn quic_peer_opens_no_streams_and_buffers_little_before_hello() {
    let harness = Harness::start(Options::default()).await;
    let connection = raw_quic(harness.tunnel, &harness.ca_pem)
        .await
        .expect("TLS completes");
    // The relay grants no bidirectional (nor unidirectional) streams: opening one waits forever.
    assert!(
        connection.open_bi().now_or_never().is_none(),
        "the relay lets its peer open a bidirectional stream"
    );
    assert!(connection.open_uni().now_or_never().is_none());

    // The relay opens the control stream and greets; a peer that answers with junk instead of
    // a hello gets only the pre-authentication window, not quinn's 1.25 MB per stream.
    let (mut send, recv) = tokio::time::timeout(WAIT, connection.accept_bi())
        .await
        .expect("control stream in time")
        .expect("control stream");
    let mut control = FrameReader::new(recv, 64 * 1024);
    let greeting = tokio::time::timeout(WAIT, control.next())
        .await
        .expect("greeting in time")
        .expect("greeting")
        .expect("a frame");
    assert_eq!(greeting.kind, FrameKind::Control);
    let taken = write_until_blocked(&mut send);
    assert!(
        taken as u64 <= quic::PRE_AUTH_WINDOW,
        "{taken} bytes buffered for an unauthenticated peer"
    );
    connection.close(0u32.into(), b"done");
    harness.stop().await;
}

#[tokio::test(flavor = "current_thread")]
async fn quic_peer_opens_no_streams_after_hello_either() {
    let harness = Harness::start(Options::default()).await;
    let peer = hello_at_version(&harness, wire::PROTOCOL_VERSION).await;
    assert!(
        matches!(peer.reply, HelloReply::Welcome { .. }),
        "welcomed: {:?}",
        peer.reply
    );
    assert!(
        peer.connection.open_bi().now_or_never().is_none(),
        "an authenticated peer may open a bidirectional stream"
    );
    peer.connection.close(0u32.into(), b"done");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_handshakes_in_progress_are_capped() {
    let options = Options::with_limits(LimitsSection {
        max_tunnel_handshakes: 1,
        ..LimitsSection::default()
    });
    let harness = Harness::start(options).await;
    // One peer completes TLS and never says hello: it holds the only handshake slot.
    let silent = raw_quic(harness.tunnel, &harness.ca_pem)
        .await
        .expect("TLS completes");
    let refused = raw_quic(harness.tunnel, &harness.ca_pem).await;
    assert!(
        refused.is_err(),
        "a second handshake was let in while the only slot is taken"
    );
    // Once the silent peer goes, its slot is free again.
    silent.close(0u32.into(), b"gone");
    let mut admitted = false;
    for _ in 0..50 {
        if raw_quic(harness.tunnel, &harness.ca_pem).await.is_ok() {
            admitted = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(admitted, "the slot of a closed peer is never released");
    harness.stop().await;
}

/// Reads until the peer closes (`Ok` with what was read) or `WAIT` passes (`Err`).
async fn read_to_close(tcp: &mut TcpStream) -> Result<Vec<u8>, Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return Err(got),
        }
    }
}

fn short_timeouts() -> Options {
    Options::with_limits(LimitsSection {
        agent_header_timeout_secs: 1,
        agent_idle_timeout_secs: 1,
        ..LimitsSection::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_header_is_closed_after_the_header_timeout() {
    let harness = Harness::start(short_timeouts()).await;
    for addr in [harness.agents, harness.admin] {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"POST /mcp/demo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
            .await
            .expect("half a header");
        assert!(
            read_to_close(&mut tcp).await.is_ok(),
            "{addr}: a half-sent header keeps its connection"
        );
    }
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed() {
    let harness = Harness::start(short_timeouts()).await;
    // Not one byte: the version sniffing (HTTP/1.1 or HTTP/2) must not wait forever.
    let mut silent = TcpStream::connect(harness.agents).await.expect("connect");
    assert!(
        read_to_close(&mut silent).await.is_ok(),
        "a silent connection stays open"
    );

    // HTTP/2 (prior knowledge): one request, then nothing; the relay sends GOAWAY and closes.
    let tcp = TcpStream::connect(harness.agents).await.expect("connect");
    let (mut h2, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{}/mcp/demo", harness.agents))
        .body(())
        .expect("request");
    let (response, _) = h2.send_request(request, true).expect("send");
    let response = tokio::time::timeout(WAIT, response)
        .await
        .expect("answer in time")
        .expect("answer");
    assert_eq!(response.status(), 401);
    drop(response);
    tokio::time::timeout(WAIT, driver)
        .await
        .expect("an idle HTTP/2 connection stays open")
        .expect("driver task")
        .ok();
    harness.stop().await;
}

/// Sends one unauthenticated request on `tcp` and reads its answer's status line.
async fn request_status(tcp: &mut TcpStream, host: SocketAddr) -> String {
    write_request(tcp, host).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("answer");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Whether one unauthenticated request on `tcp` is answered 401.
async fn answers_401(tcp: &mut TcpStream, host: SocketAddr) -> bool {
    request_status(tcp, host).await.contains("401")
}

/// Writes one unauthenticated request on `tcp`.
async fn write_request(tcp: &mut TcpStream, host: SocketAddr) {
    tcp.write_all(
        format!("GET /mcp/demo HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await
    .expect("request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let options = Options::with_limits(LimitsSection {
        max_agent_connections: 2,
        ..LimitsSection::default()
    });
    let harness = Harness::start(options).await;
    let mut first = TcpStream::connect(harness.agents).await.expect("connect");
    let mut second = TcpStream::connect(harness.agents).await.expect("connect");
    assert!(answers_401(&mut first, harness.agents).await);
    assert!(answers_401(&mut second, harness.agents).await);
    // Both slots are held by kept-alive connections: a third is not served...
    let mut third = TcpStream::connect(harness.agents).await.expect("connect");
    write_request(&mut third, harness.agents).await;
    let mut buf = vec![0u8; 4096];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf))
            .await
            .is_err(),
        "a connection beyond the cap was served"
    );
    // ... until one of them goes.
    drop(first);
    let n = tokio::time::timeout(WAIT, third.read(&mut buf))
        .await
        .expect("served once a slot is free")
        .expect("answer");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 401"));
    drop(second);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_and_quiet_keep_alive_connections_are_not_cut() {
    let (harness, _client, _upstreams) = harness_with_demo(short_timeouts()).await;
    // A call whose upstream takes longer than the idle and header timeouts is in flight, not
    // idle: its connection stays until the answer is out.
    let mut agent = common::Agent::new(&harness.url("demo"), &harness.acme.api_key);
    assert_eq!(agent.initialize().await.status, 200);
    let answer = agent
        .call_tool(1, "sleep", serde_json::json!({"ms": 2500}))
        .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(common::tool_text(answer.response()), "slept 2500 ms");
    harness.stop().await;

    // A kept-alive HTTP/1.1 connection quiet longer than the header timeout (but not the idle
    // timeout) still takes its next request: the header clock starts at a request's first byte.
    let options = Options::with_limits(LimitsSection {
        agent_header_timeout_secs: 1,
        agent_idle_timeout_secs: 60,
        ..LimitsSection::default()
    });
    let harness = Harness::start(options).await;
    let mut tcp = TcpStream::connect(harness.agents).await.expect("connect");
    // A fresh connection is idle too (pooling clients open them ahead of use).
    let mut unused = TcpStream::connect(harness.agents).await.expect("connect");
    assert!(answers_401(&mut tcp, harness.agents).await);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(answers_401(&mut tcp, harness.agents).await);
    assert!(answers_401(&mut unused, harness.agents).await);
    harness.stop().await;
}

/// Sends a `tools/call` whose body is `size` bytes over raw HTTP/1.1 in 64 KiB writes, then
/// reads the answer: its head and the JSON body. A write error (the relay reset the connection)
/// is returned with whatever was read.
async fn post_oversized(
    tcp: &mut TcpStream,
    host: SocketAddr,
    key: &str,
    size: usize,
) -> Result<(String, serde_json::Value), String> {
    let prefix = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"message":""#;
    let suffix = br#""}}}"#;
    let filler = size - prefix.len() - suffix.len();
    let head = format!(
        "POST /mcp/demo HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n\
         MCP-Protocol-Version: 2025-11-25\r\nContent-Length: {size}\r\n\r\n"
    );
    let sent = async {
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(prefix).await?;
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = filler;
        while left > 0 {
            let n = left.min(chunk.len());
            tcp.write_all(&chunk[..n]).await?;
            left -= n;
        }
        tcp.write_all(suffix).await
    };
    let sent: std::io::Result<()> = tokio::time::timeout(WAIT, sent)
        .await
        .expect("body sent in time");
    // Read one answer: head, then Content-Length bytes.
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().expect("a length"))
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                let body = serde_json::from_slice(&got[end + 4..end + 4 + length])
                    .map_err(|e| format!("answer body: {e}"))?;
                return Ok((head, body));
            }
        }
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                return Err(format!(
                    "read failed after {} bytes ({e}); write: {sent:?}",
                    got.len()
                ));
            }
            Err(_) => return Err("no answer in time".into()),
        }
    }
    Err(format!(
        "connection closed after {} bytes; write: {sent:?}",
        got.len()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_still_sending_gets_its_413_and_the_connection_stays_usable() {
    const LIMIT: usize = 64 * 1024;
    let options = Options::with_limits(LimitsSection {
        max_message_bytes: LIMIT,
        ..LimitsSection::default()
    });
    let (harness, _client, _upstreams) = harness_with_demo(options).await;
    let mut tcp = TcpStream::connect(harness.agents).await.expect("connect");
    // 32 MiB: far more than loopback socket buffers absorb, so the client is still sending
    // when the relay has its answer.
    let (head, body) = post_oversized(&mut tcp, harness.agents, &harness.acme.api_key, 32 << 20)
        .await
        .expect("the 413 is read");
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(
        body["error"]["code"],
        mcp_tunnel::mcp::jsonrpc::codes::TOO_LARGE,
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&LIMIT.to_string()),
        "{body}"
    );
    // The whole body was read: the connection takes the next request.
    assert!(answers_401(&mut tcp, harness.agents).await);
    harness.stop().await;
}

/// Runs `tests/peers/oversized_client.py` against `url` with a `size`-byte message; returns
/// its facts (`key: value` lines).
async fn oversized_client(url: &str, key: &str, size: usize) -> Vec<(String, serde_json::Value)> {
    let mut command = tokio::process::Command::new(common::peers::python());
    command
        .arg(common::peers::peer_file("oversized_client.py"))
        .args([url, key, &size.to_string()])
        .kill_on_drop(true);
    let output = tokio::time::timeout(4 * WAIT, command.output())
        .await
        .expect("oversized_client.py ends in time")
        .expect("oversized_client.py runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "oversized_client.py ({size} bytes) failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), serde_json::from_str(v).expect("a JSON fact")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_and_async_httpx_read_the_413_of_large_bodies() {
    let (harness, _client, _upstreams) = harness_with_demo(Options::default()).await;
    let limit = mcp_tunnel::config::DEFAULT_MAX_MESSAGE_BYTES;
    // Just over the limit, and far over it (the reset showed from 20 MiB on, every time at
    // 48 MiB on loopback).
    for size in [20 * 1024 * 1024 + 512 * 1024, 48 * 1024 * 1024] {
        let facts = oversized_client(&harness.url("demo"), &harness.acme.api_key, size).await;
        let fact = |key: &str| -> &serde_json::Value {
            facts
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("no {key} in {facts:?}"))
        };
        assert_eq!(fact("raw_status"), 413, "{size}: {facts:?}");
        let states_limit =
            |v: &serde_json::Value| v.as_str().unwrap_or_default().contains(&limit.to_string());
        assert!(
            states_limit(&fact("raw_error")["message"]),
            "{size}: {facts:?}"
        );
        assert!(states_limit(fact("sdk_error")), "{size}: {facts:?}");
        assert_eq!(fact("after"), "after", "{size}: {facts:?}");
    }
    harness.stop().await;
}

/// A raw peer past its hello: the connection, the relay's reply, and the control stream, kept
/// open so that a welcomed tunnel stays registered.
struct RawPeer {
    connection: quinn::Connection,
    reply: HelloReply,
    _control: (
        FrameReader<quinn::RecvStream>,
        FrameWriter<quinn::SendStream>,
    ),
}

/// Says hello with wire `version` (source `v{version}`) on a fresh raw QUIC connection.
async fn hello_at_version(harness: &Harness, version: u32) -> RawPeer {
    let connection = raw_quic(harness.tunnel, &harness.ca_pem)
        .await
        .expect("TLS completes");
    let (send, recv) = tokio::time::timeout(WAIT, connection.accept_bi())
        .await
        .expect("control stream in time")
        .expect("control stream");
    let mut reader = FrameReader::new(recv, 64 * 1024);
    let mut writer = FrameWriter::new(send, 64 * 1024);
    let greeting: wire::Greeting = tokio::time::timeout(WAIT, reader.next())
        .await
        .expect("greeting in time")
        .expect("greeting")
        .expect("a frame")
        .parse_json(FrameKind::Control)
        .expect("a greeting");
    assert_eq!(greeting.version, wire::PROTOCOL_VERSION);
    let hello = Hello {
        version,
        token: harness.acme.tunnel_token.clone(),
        sources: vec![wire::SourceAnnouncement {
            name: format!("v{version}"),
        }],
        max_frame: 1024 * 1024,
        agent: "edge-test".into(),
        instance: None,
    };
    writer
        .send(&Frame::json(FrameKind::Control, &hello))
        .await
        .expect("hello sent");
    let reply = tokio::time::timeout(WAIT, reader.next())
        .await
        .expect("reply in time")
        .expect("reply")
        .expect("a frame")
        .parse_json(FrameKind::Control)
        .expect("a hello reply");
    RawPeer {
        connection,
        reply,
        _control: (reader, writer),
    }
}

/// The wire rule (src/wire/version.rs): a newer `connect` is served at the relay's version, and
/// the tunnel records the agreed version; one older than the minimum is refused, naming both.
#[tokio::test(flavor = "current_thread")]
async fn wire_versions_are_agreed_in_the_handshake() {
    let harness = Harness::start(Options::default()).await;
    let newer = wire::PROTOCOL_VERSION + 1;
    let peer = hello_at_version(&harness, newer).await;
    assert!(
        matches!(peer.reply, HelloReply::Welcome { .. }),
        "a newer connect is welcomed: {:?}",
        peer.reply
    );
    let rows = harness.state.registry.rows();
    let row = rows
        .iter()
        .find(|r| r.source == format!("v{newer}"))
        .expect("the newer connect's tunnel is registered");
    assert_eq!(row.wire_version, wire::PROTOCOL_VERSION);
    peer.connection.close(0u32.into(), b"done");

    let older = wire::MIN_PROTOCOL_VERSION - 1;
    let peer = hello_at_version(&harness, older).await;
    match peer.reply {
        HelloReply::Refused { reason } => assert!(
            reason.contains(&format!("version {older} is too old")),
            "the refusal names the version: {reason}"
        ),
        other => panic!("a connect older than the minimum was not refused: {other:?}"),
    }
    peer.connection.close(0u32.into(), b"done");
    harness.stop().await;
}
