//! QUIC (quinn) behind [`TunnelConnection`].

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt};

use super::{
    BoxFuture, IDLE_TIMEOUT, KEEP_ALIVE, TransportError, TransportKind, TunnelConnection,
    TunnelStream,
};

/// How often a connection looks whether its peer sent anything since the last look: the
/// resolution of [`TunnelConnection::silent_for`] (quinn counts received datagrams but keeps no
/// time of the last one).
const HEARD_SAMPLE: Duration = Duration::from_millis(250);

/// Concurrent bidirectional streams the relay may open towards `connect`: one per live MCP
/// session or stateless request (plus the control stream). quinn's default of 100 would queue
/// the 101st session behind the others.
pub const MAX_CONCURRENT_STREAMS: u32 = 10_000;

/// The connection receive window of a relay-side connection until its `hello` is accepted:
/// the peer may then send only its `hello` on the control stream the relay opened, so a peer
/// that never authenticates makes the relay buffer at most this much (quinn's default is
/// unbounded).
pub const PRE_AUTH_WINDOW: u64 = 128 * 1024;

/// The connection receive window of `connect`'s side: bounds what the relay can make it buffer
/// over all streams; 16 MiB, as wide as the relay's default (`[limits]
/// tunnel_receive_window_bytes`), keeps a fast link busy.
pub const CONNECT_RECEIVE_WINDOW: u64 = 16 * 1024 * 1024;

/// Bytes of a not yet accepted connection attempt that quinn buffers (the client's first
/// flight; the relay accepts no 0-RTT data).
const INCOMING_BUFFER: u64 = 64 * 1024;

/// UDP socket buffer size to ask for: at the kernel's 208 KiB default, a busy tunnel drops
/// thousands of datagrams per GiB on loopback; 4 MiB absorbs the bursts GSO produces.
pub const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// The quinn close code for a normal close; the reason text says why.
const CLOSE_CODE: u32 = 0;

/// What both sides share: keep-alives, the idle timeout, no unidirectional streams and no
/// datagrams (neither is used, so a peer gets no buffer for them).
fn common_config() -> TransportConfig {
    let mut config = TransportConfig::default();
    config
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None)
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(IdleTimeout::try_from(IDLE_TIMEOUT).expect(
            "IDLE_TIMEOUT is within QUIC's idle timeout range (under 2^62 ms)",
        )));
    config
}

/// The relay's side: only the relay opens streams (the control stream and one per exchange), so
/// the peer may open none; the connection window starts at [`PRE_AUTH_WINDOW`] and is widened
/// by [`TunnelConnection::admit`] once the peer authenticated.
fn relay_transport_config() -> Arc<TransportConfig> {
    let mut config = common_config();
    config
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .receive_window(VarInt::from_u32(PRE_AUTH_WINDOW as u32));
    Arc::new(config)
}

/// `connect`'s side: accepts the relay's streams, with a bounded connection window.
fn connect_transport_config() -> Arc<TransportConfig> {
    let mut config = common_config();
    config
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS))
        .receive_window(VarInt::from_u32(CONNECT_RECEIVE_WINDOW as u32));
    Arc::new(config)
}

/// Makes a UDP socket with large buffers; warns when the kernel grants less than asked.
fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual-stack where the address is the unspecified IPv6 one; harmless otherwise.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller buffer only costs throughput, and the warning below says so.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    let granted = socket.recv_buffer_size().unwrap_or(0);
    if granted < UDP_BUFFER_BYTES {
        tracing::warn!(
            granted,
            wanted = UDP_BUFFER_BYTES,
            "UDP receive buffer smaller than wanted; QUIC throughput will suffer \
             (raise net.core.rmem_max and net.core.wmem_max, see README)"
        );
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A QUIC endpoint that accepts tunnel connections; at most `max_incoming` connection attempts
/// wait to be accepted at once (the relay bounds handshakes in progress itself).
pub fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    max_incoming: usize,
) -> Result<Endpoint, TransportError> {
    let mut server = server_config(tls)?;
    let max_incoming = max_incoming.max(1);
    server
        .transport_config(relay_transport_config())
        .max_incoming(max_incoming)
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER.saturating_mul(max_incoming as u64));
    serving_endpoint(addr, server)
}

/// The QUIC server config over `tls`, with quinn's defaults for the rest.
fn server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, TransportError> {
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| TransportError::Config(format!("QUIC TLS config: {e}")))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// An endpoint on `addr` (a socket with large buffers) serving with `server`.
fn serving_endpoint(
    addr: SocketAddr,
    server: quinn::ServerConfig,
) -> Result<Endpoint, TransportError> {
    let socket =
        udp_socket(addr).map_err(|e| TransportError::Config(format!("bind UDP {addr}: {e}")))?;
    Endpoint::new(
        EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(TokioRuntime),
    )
    .map_err(|e| TransportError::Config(format!("QUIC endpoint on {addr}: {e}")))
}

/// A QUIC endpoint whose peers open the streams, with the transport settings of `connect`'s
/// side (which accepts the streams the relay opens): for the raw transport benchmark
/// (`examples/raw.rs`), whose server accepts its client's streams. The relay never uses it: its
/// peers may open no streams ([`server_endpoint`]).
pub fn stream_accepting_server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
) -> Result<Endpoint, TransportError> {
    let mut server = server_config(tls)?;
    server.transport_config(connect_transport_config());
    serving_endpoint(addr, server)
}

/// A client-only QUIC endpoint whose connections verify the relay with `tls`.
pub fn client_endpoint(
    bind: SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<Endpoint, TransportError> {
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Config(format!("QUIC TLS config: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(connect_transport_config());
    let socket =
        udp_socket(bind).map_err(|e| TransportError::Config(format!("bind UDP {bind}: {e}")))?;
    let mut endpoint = Endpoint::new(
        EndpointConfig::default(),
        None,
        socket,
        Arc::new(TokioRuntime),
    )
    .map_err(|e| TransportError::Config(format!("QUIC endpoint: {e}")))?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Dials `addr`, verifying the certificate for `server_name`.
pub async fn dial(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<QuicConnection, TransportError> {
    let connecting = endpoint
        .connect(addr, server_name)
        .map_err(|e| TransportError::Connect(e.to_string()))?;
    let connection = connecting.await.map_err(|e| match e {
        // The relay answered: UDP works, the relay takes no new connections (it drains).
        quinn::ConnectionError::ConnectionClosed(close)
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            TransportError::Refused(close.to_string())
        }
        e => TransportError::Connect(e.to_string()),
    })?;
    Ok(QuicConnection::new(connection))
}

/// A tunnel connection over QUIC.
#[derive(Clone)]
pub struct QuicConnection {
    connection: quinn::Connection,
    /// When the peer was last heard from, in milliseconds since `born`.
    heard_ms: Arc<AtomicU64>,
    born: tokio::time::Instant,
    /// Stops the peer watcher once the last clone of this handle is gone, so the watcher's own
    /// handle does not keep the connection open (quinn closes a connection when its last
    /// handle drops).
    _watching: Arc<tokio_util::sync::DropGuard>,
}

impl QuicConnection {
    /// Wraps an established connection and starts watching what its peer sends, until it
    /// closes or this handle and its clones are dropped (see
    /// [`TunnelConnection::silent_for`]). Needs a tokio runtime.
    pub fn new(connection: quinn::Connection) -> Self {
        let heard_ms = Arc::new(AtomicU64::new(0));
        let born = tokio::time::Instant::now();
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(watch_peer(
            connection.clone(),
            heard_ms.clone(),
            born,
            stop.clone(),
        ));
        Self {
            connection,
            heard_ms,
            born,
            _watching: Arc::new(stop.drop_guard()),
        }
    }

    /// The quinn connection underneath (tests drive the relay's edge with it).
    pub fn into_inner(self) -> quinn::Connection {
        self.connection
    }
}

/// Every [`HEARD_SAMPLE`], records in `heard_ms` "heard now" when the peer's datagram count
/// moved; ends when the connection closes or `stop` fires.
async fn watch_peer(
    connection: quinn::Connection,
    heard_ms: Arc<AtomicU64>,
    born: tokio::time::Instant,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut seen = connection.stats().udp_rx.datagrams;
    let mut ticks = tokio::time::interval(HEARD_SAMPLE);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = connection.closed() => return,
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = connection.stats().udp_rx.datagrams;
        if now != seen {
            seen = now;
            let ms = u64::try_from(born.elapsed().as_millis()).unwrap_or(u64::MAX);
            heard_ms.store(ms, Ordering::Relaxed);
        }
    }
}

fn tunnel_stream((send, recv): (quinn::SendStream, quinn::RecvStream)) -> TunnelStream {
    TunnelStream {
        send: Box::new(send),
        recv: Box::new(recv),
    }
}

fn lost(e: quinn::ConnectionError) -> TransportError {
    TransportError::ConnectionLost(e.to_string())
}

impl TunnelConnection for QuicConnection {
    fn open_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>> {
        Box::pin(async move {
            self.connection
                .open_bi()
                .await
                .map(tunnel_stream)
                .map_err(lost)
        })
    }

    fn accept_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>> {
        Box::pin(async move {
            self.connection
                .accept_bi()
                .await
                .map(tunnel_stream)
                .map_err(lost)
        })
    }

    fn close(&self, reason: &str) {
        self.connection
            .close(VarInt::from_u32(CLOSE_CODE), reason.as_bytes());
    }

    fn admit(&self, receive_window: u64) {
        match VarInt::from_u64(receive_window) {
            Ok(window) => self.connection.set_receive_window(window),
            Err(_) => tracing::warn!(receive_window, "receive window too large; left as it was"),
        }
    }

    fn closed(&self) -> BoxFuture<'_, TransportError> {
        Box::pin(async move { lost(self.connection.closed().await) })
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Quic
    }

    fn remote_addr(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    fn rtt(&self) -> Duration {
        self.connection.rtt()
    }

    fn silent_for(&self) -> Duration {
        let heard = Duration::from_millis(self.heard_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(heard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tls;

    /// A relay-side server endpoint and a dialed client connection on loopback.
    async fn pair() -> (Endpoint, QuicConnection, QuicConnection) {
        let certs = crate::certs::generate(&[]).expect("dev certs");
        let identity =
            tls::Identity::from_pem(&certs.relay_pem, &certs.relay_key).expect("identity");
        let server_tls = tls::server_config(identity, &[b"test"]).expect("server TLS");
        let server = server_endpoint("127.0.0.1:0".parse().expect("literal"), server_tls, 8)
            .expect("server endpoint");
        let client_tls =
            tls::client_config(&tls::Roots::CaPem(certs.ca_pem), &[b"test"]).expect("client TLS");
        let client = client_endpoint("127.0.0.1:0".parse().expect("literal"), client_tls)
            .expect("client endpoint");
        let addr = server.local_addr().expect("server address");
        let (accepted, dialed) = tokio::join!(
            async {
                let incoming = server.accept().await.expect("an incoming connection");
                QuicConnection::new(incoming.await.expect("handshake"))
            },
            dial(&client, addr, "localhost"),
        );
        (server, accepted, dialed.expect("dial"))
    }

    #[tokio::test]
    async fn a_peer_that_sends_is_heard_and_the_last_dropped_handle_closes_the_connection() {
        let (_server, relay_side, connect_side) = pair().await;
        // Born "heard" (the handshake just finished); the watcher then records what the peer
        // sends after it (acknowledgements, keep-alives every 2 s).
        tokio::time::timeout(Duration::from_secs(30), async {
            while relay_side.heard_ms.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(HEARD_SAMPLE).await;
            }
        })
        .await
        .expect("the peer is heard from after the handshake");
        assert!(relay_side.silent_for() < crate::transport::SILENT_AFTER);
        // The watcher holds no handle that keeps the connection open: dropping connect's side
        // (every clone) closes it, and the relay's side learns so.
        let clone = connect_side.clone();
        drop(connect_side);
        assert!(
            clone.connection.close_reason().is_none(),
            "a clone keeps it open"
        );
        drop(clone);
        let closed = tokio::time::timeout(Duration::from_secs(30), relay_side.closed())
            .await
            .expect("the relay side sees the close");
        assert!(
            matches!(closed, TransportError::ConnectionLost(_)),
            "{closed}"
        );
    }
}
