//! The HTTPS fallback: HTTP/2 over TLS over TCP, with the roles reversed.
//!
//! `connect` dials the TCP connection (directly or through an HTTP CONNECT proxy) and then acts
//! as the HTTP/2 *server* on it, while the relay acts as the *client*: so the relay can open a
//! stream whenever an agent starts a session, exactly as it opens QUIC streams. (cloudflared's
//! HTTP/2 transport works the same way.) Every tunnel stream is one HTTP/2 request whose request
//! body carries relay-to-connect bytes and whose response body carries the other direction.
//! HTTP/2 brings per-stream flow control, so one slow session never stalls another.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{BoxFuture, TransportError, TransportKind, TunnelConnection, TunnelStream};
use crate::transport::quic::MAX_CONCURRENT_STREAMS;
use crate::transport::{IDLE_TIMEOUT, KEEP_ALIVE};

/// ALPN of the fallback: plain `h2`, so TLS middleboxes see ordinary HTTPS.
pub const ALPN: &[u8] = b"h2";

/// Per-stream flow-control window: 1 MiB keeps one large result flowing at full speed on a
/// fast link (the 64 KiB default halves throughput on loopback).
const STREAM_WINDOW: u32 = 1024 * 1024;
/// `connect`'s connection-wide window: room for a few streams in full flight. The relay's
/// comes from `[limits] tunnel_receive_window_bytes`, granted at [`TunnelConnection::admit`].
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Largest HTTP/2 frame: 64 KiB cuts per-frame overhead for bulk results.
const MAX_FRAME: u32 = 64 * 1024;
/// Bytes handed to HTTP/2 per write: bounds what one write copies and buffers.
const MAX_WRITE: usize = 256 * 1024;
/// Streams accepted by `connect` and not yet picked up.
const ACCEPT_QUEUE: usize = 256;
/// Largest header block either side accepts: stream headers here are a fixed few bytes (the
/// open header travels in the body), so a peer gets no room to make us buffer more.
const MAX_HEADER_LIST: u32 = 16 * 1024;

/// Shared between a connection's handle and its driver task.
struct State {
    remote: SocketAddr,
    rtt: Mutex<Duration>,
    /// When the last keep-alive answer came (the connection's start before the first).
    heard: Mutex<tokio::time::Instant>,
    closed: CancellationToken,
    reason: Mutex<Option<String>>,
}

impl State {
    /// A new connection's state, with its keep-alive started when HTTP/2 offers pings.
    fn watched(remote: SocketAddr, ping_pong: Option<h2::PingPong>) -> Arc<Self> {
        let state = Arc::new(Self {
            remote,
            rtt: Mutex::new(Duration::ZERO),
            heard: Mutex::new(tokio::time::Instant::now()),
            closed: CancellationToken::new(),
            reason: Mutex::new(None),
        });
        if let Some(ping_pong) = ping_pong {
            tokio::spawn(keep_alive(ping_pong, state.clone()));
        }
        state
    }

    fn close(&self, reason: &str) {
        let mut slot = self.reason.lock();
        if slot.is_none() {
            *slot = Some(reason.to_owned());
        }
        drop(slot);
        self.closed.cancel();
    }

    fn lost(&self) -> TransportError {
        let reason = self.reason.lock().clone();
        TransportError::ConnectionLost(reason.unwrap_or_else(|| "connection closed".into()))
    }
}

/// The [`TunnelConnection`] methods both sides answer from their shared [`State`] alike.
macro_rules! state_methods {
    () => {
        fn close(&self, reason: &str) {
            self.state.close(reason);
        }

        fn closed(&self) -> BoxFuture<'_, TransportError> {
            Box::pin(async move {
                self.state.closed.cancelled().await;
                self.state.lost()
            })
        }

        fn kind(&self) -> TransportKind {
            TransportKind::Https
        }

        fn remote_addr(&self) -> SocketAddr {
            self.state.remote
        }

        fn rtt(&self) -> Duration {
            *self.state.rtt.lock()
        }

        fn silent_for(&self) -> Duration {
            self.state.heard.lock().elapsed()
        }
    };
}

/// The error of a failed HTTP/2 handshake, in either role.
fn handshake_failed(e: h2::Error) -> TransportError {
    TransportError::Connect(format!("HTTP/2 handshake: {e}"))
}

/// Sends pings every [`KEEP_ALIVE`]; a pong that takes longer than [`IDLE_TIMEOUT`] closes
/// the connection (so a peer that vanished without closing TCP, as on a network cut, is dead
/// at most `KEEP_ALIVE + IDLE_TIMEOUT` after its last pong; a killed process's TCP connection
/// is closed by its kernel at once). The whole timeout is given to each ping, rather than the
/// rest of `IDLE_TIMEOUT` since the last pong: only pongs count as the peer heard from here,
/// and one may queue behind a burst of data on a slow link. Pong times are the RTT estimate.
async fn keep_alive(mut ping_pong: h2::PingPong, state: Arc<State>) {
    loop {
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(IDLE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {
                *state.rtt.lock() = started.elapsed();
                *state.heard.lock() = tokio::time::Instant::now();
            }
            Ok(Err(e)) => return state.close(&format!("keep-alive failed: {e}")),
            Err(_) => {
                return state.close(&format!(
                    "timed out: no keep-alive answer within {} s",
                    IDLE_TIMEOUT.as_secs()
                ));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(KEEP_ALIVE) => {}
            _ = state.closed.cancelled() => return,
        }
    }
}

/// The relay's side: the HTTP/2 client, which opens a stream per exchange.
pub struct RelaySide {
    send: h2::client::SendRequest<Bytes>,
    state: Arc<State>,
    /// Tells the driver the connection-wide window to grant once the peer authenticated.
    admit: mpsc::UnboundedSender<u32>,
}

/// Starts the relay's side on an accepted (TLS) connection. Until [`TunnelConnection::admit`],
/// the peer may send at most [`PRE_AUTH_WINDOW`](super::quic::PRE_AUTH_WINDOW) bytes over the
/// whole connection, may not push, and its header blocks are small.
pub async fn relay_side<IO>(io: IO, remote: SocketAddr) -> Result<RelaySide, TransportError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(super::quic::PRE_AUTH_WINDOW as u32)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(handshake_failed)?;
    let state = State::watched(remote, connection.ping_pong());
    let driver = state.clone();
    let (admit, mut admitted) = mpsc::unbounded_channel::<u32>();
    tokio::spawn(async move {
        let mut connection = std::pin::pin!(connection);
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    driver.close(&match result {
                        Ok(()) => "closed by peer".to_owned(),
                        Err(e) => e.to_string(),
                    });
                    return;
                }
                Some(window) = admitted.recv() => connection.set_target_window_size(window),
                _ = driver.closed.cancelled() => return,
            }
        }
    });
    Ok(RelaySide { send, state, admit })
}

impl TunnelConnection for RelaySide {
    fn open_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>> {
        Box::pin(async move {
            if self.state.closed.is_cancelled() {
                return Err(self.state.lost());
            }
            let mut send = self
                .send
                .clone()
                .ready()
                .await
                .map_err(|e| TransportError::ConnectionLost(e.to_string()))?;
            let request = http::Request::post("/stream")
                .body(())
                .expect("a static request is valid");
            let (response, body) = send
                .send_request(request, false)
                .map_err(|e| TransportError::ConnectionLost(e.to_string()))?;
            Ok(TunnelStream {
                send: Box::new(H2Send(body)),
                recv: Box::new(H2Recv::Pending(response)),
            })
        })
    }

    fn accept_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>> {
        // Only the relay opens streams on this transport; wait for the end of the connection.
        Box::pin(async move {
            self.state.closed.cancelled().await;
            Err(self.state.lost())
        })
    }

    fn admit(&self, receive_window: u64) {
        // The HTTP/2 connection window is at most 2^31 - 1 bytes.
        let window = receive_window.clamp(super::quic::PRE_AUTH_WINDOW, (1 << 31) - 1) as u32;
        let _ = self.admit.send(window);
    }

    state_methods!();
}

/// `connect`'s side: the HTTP/2 server, which accepts the relay's streams.
pub struct ConnectSide {
    incoming: tokio::sync::Mutex<mpsc::Receiver<TunnelStream>>,
    state: Arc<State>,
}

/// Starts `connect`'s side on a dialed (TLS) connection.
pub async fn connect_side<IO>(io: IO, remote: SocketAddr) -> Result<ConnectSide, TransportError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(handshake_failed)?;
    let state = State::watched(remote, connection.ping_pong());
    let (tx, incoming) = mpsc::channel(ACCEPT_QUEUE);
    let driver = state.clone();
    tokio::spawn(async move {
        let reason = loop {
            let next = tokio::select! {
                next = connection.accept() => next,
                _ = driver.closed.cancelled() => {
                    connection.abrupt_shutdown(h2::Reason::NO_ERROR);
                    // Let the GOAWAY go out.
                    let _ = tokio::time::timeout(Duration::from_secs(1), std::future::poll_fn(|cx| connection.poll_closed(cx))).await;
                    return;
                }
            };
            match next {
                Some(Ok((request, mut respond))) => {
                    let send = match respond.send_response(http::Response::new(()), false) {
                        Ok(send) => send,
                        Err(e) => break e.to_string(),
                    };
                    let stream = TunnelStream {
                        send: Box::new(H2Send(send)),
                        recv: Box::new(H2Recv::Body(request.into_body(), Bytes::new())),
                    };
                    if tx.send(stream).await.is_err() {
                        break "connection dropped".to_owned();
                    }
                }
                Some(Err(e)) => break e.to_string(),
                None => break "closed by peer".to_owned(),
            }
        };
        driver.close(&reason);
    });
    Ok(ConnectSide {
        incoming: tokio::sync::Mutex::new(incoming),
        state,
    })
}

impl TunnelConnection for ConnectSide {
    fn open_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>> {
        Box::pin(async {
            Err(TransportError::Config(
                "on the HTTPS fallback only the relay opens streams".into(),
            ))
        })
    }

    fn accept_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>> {
        Box::pin(async move {
            let mut incoming = self.incoming.lock().await;
            tokio::select! {
                stream = incoming.recv() => stream.ok_or_else(|| self.state.lost()),
                _ = self.state.closed.cancelled() => Err(self.state.lost()),
            }
        })
    }

    state_methods!();
}

fn io_error(e: h2::Error) -> std::io::Error {
    if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| std::io::Error::other("HTTP/2 I/O error"))
    } else {
        std::io::Error::new(std::io::ErrorKind::BrokenPipe, e)
    }
}

/// Writes to an HTTP/2 stream, waiting for flow-control capacity.
struct H2Send(SendStream<Bytes>);

impl AsyncWrite for H2Send {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let wanted = buf.len().min(MAX_WRITE);
        self.0.reserve_capacity(wanted);
        loop {
            match ready!(self.0.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(capacity)) => {
                    let n = capacity.min(wanted);
                    self.0
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(io_error)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::BrokenPipe,
                        "HTTP/2 stream closed",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The HTTP/2 connection task writes frames as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.0.send_data(Bytes::new(), true).map_err(io_error)?;
        Poll::Ready(Ok(()))
    }
}

/// Reads an HTTP/2 stream (the relay first waits for the response headers).
enum H2Recv {
    Pending(h2::client::ResponseFuture),
    Body(RecvStream, Bytes),
    Done,
}

impl AsyncRead for H2Recv {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            match &mut *self {
                H2Recv::Pending(response) => {
                    let response = ready!(Pin::new(response).poll(cx)).map_err(io_error)?;
                    *self = H2Recv::Body(response.into_body(), Bytes::new());
                }
                H2Recv::Body(body, pending) => {
                    if !pending.is_empty() {
                        let n = pending.len().min(out.remaining());
                        out.put_slice(&pending[..n]);
                        pending.advance(n);
                        if pending.is_empty() {
                            // An empty slice still holds h2's read buffer: let it go, so an
                            // idle stream keeps none.
                            *pending = Bytes::new();
                        }
                        return Poll::Ready(Ok(()));
                    }
                    match ready!(body.poll_data(cx)) {
                        Some(Ok(data)) => {
                            // Give the window back as soon as the bytes are ours.
                            let _ = body.flow_control().release_capacity(data.len());
                            *pending = data;
                        }
                        Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                            *self = H2Recv::Done
                        }
                        Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                        None => *self = H2Recv::Done,
                    }
                }
                H2Recv::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn relay_opens_streams_that_carry_bytes_both_ways() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("literal");
        let (relay, connect) = tokio::join!(relay_side(a, addr), connect_side(b, addr));
        let (relay, connect) = (relay.expect("relay side"), connect.expect("connect side"));
        let big = vec![7u8; 3 * 1024 * 1024];
        let mut tasks = Vec::new();
        for i in 0..3u8 {
            let mut stream = relay.open_stream().await.expect("open");
            let big = big.clone();
            tasks.push(tokio::spawn(async move {
                stream.send.write_all(&[i]).await.expect("write");
                stream.send.write_all(&big).await.expect("write big");
                stream.send.shutdown().await.expect("finish");
                let mut back = Vec::new();
                stream.recv.read_to_end(&mut back).await.expect("read");
                back
            }));
        }
        for _ in 0..3 {
            let mut stream = connect.accept_stream().await.expect("accept");
            tokio::spawn(async move {
                let mut got = Vec::new();
                stream.recv.read_to_end(&mut got).await.expect("read");
                stream.send.write_all(&got[..1]).await.expect("echo tag");
                stream
                    .send
                    .write_all(&(got.len() as u64).to_be_bytes())
                    .await
                    .expect("echo len");
                stream.send.shutdown().await.expect("finish");
            });
        }
        let mut tags = Vec::new();
        for task in tasks {
            let back = task.await.expect("task");
            assert_eq!(back.len(), 9);
            assert_eq!(
                u64::from_be_bytes(back[1..9].try_into().expect("8 bytes")),
                big.len() as u64 + 1
            );
            tags.push(back[0]);
        }
        tags.sort();
        assert_eq!(tags, vec![0, 1, 2]);
        relay.close("test over");
        assert!(matches!(
            connect.closed().await,
            TransportError::ConnectionLost(_)
        ));
    }
}
