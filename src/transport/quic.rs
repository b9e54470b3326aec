//! QUIC (quinn) behind [`TunnelConnection`].

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, EndpointConfig, IdleTimeout, TokioRuntime, TransportConfig, VarInt};

use super::{BoxFuture, TransportError, TransportKind, TunnelConnection, TunnelStream};

/// Keep-alive interval: well under common NAT UDP mapping timeouts (30 s on many routers), so
/// an idle tunnel keeps its mapping and a dead one is noticed quickly.
pub const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// A connection with no traffic (keep-alives included) for this long is dead: three missed
/// keep-alives.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Concurrent bidirectional streams a peer may open: one per live MCP session or stateless
/// request. quinn's default of 100 would queue the 101st session behind the others.
pub const MAX_CONCURRENT_STREAMS: u32 = 10_000;

/// UDP socket buffer size to ask for: at the kernel's 208 KiB default, a busy tunnel drops
/// thousands of datagrams per GiB on loopback; 4 MiB absorbs the bursts GSO produces.
pub const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// The quinn close code for a normal close; the reason text says why.
const CLOSE_CODE: u32 = 0;

fn transport_config() -> Arc<TransportConfig> {
    let mut config = TransportConfig::default();
    config
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(IDLE_TIMEOUT).expect("30 s is within QUIC's idle timeout range"),
        ));
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

/// A QUIC endpoint that accepts tunnel connections.
pub fn server_endpoint(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
) -> Result<Endpoint, TransportError> {
    let crypto = QuicServerConfig::try_from(tls)
        .map_err(|e| TransportError::Config(format!("QUIC TLS config: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport_config());
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

/// A client-only QUIC endpoint whose connections verify the relay with `tls`.
pub fn client_endpoint(
    bind: SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<Endpoint, TransportError> {
    let crypto = QuicClientConfig::try_from(tls)
        .map_err(|e| TransportError::Config(format!("QUIC TLS config: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport_config());
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
    Ok(QuicConnection(connection))
}

/// A tunnel connection over QUIC.
#[derive(Clone)]
pub struct QuicConnection(pub quinn::Connection);

fn lost(e: quinn::ConnectionError) -> TransportError {
    TransportError::ConnectionLost(e.to_string())
}

impl TunnelConnection for QuicConnection {
    fn open_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>> {
        Box::pin(async move {
            let (send, recv) = self.0.open_bi().await.map_err(lost)?;
            Ok(TunnelStream {
                send: Box::new(send),
                recv: Box::new(recv),
            })
        })
    }

    fn accept_stream(&self) -> BoxFuture<'_, Result<TunnelStream, TransportError>> {
        Box::pin(async move {
            let (send, recv) = self.0.accept_bi().await.map_err(lost)?;
            Ok(TunnelStream {
                send: Box::new(send),
                recv: Box::new(recv),
            })
        })
    }

    fn close(&self, reason: &str) {
        self.0
            .close(VarInt::from_u32(CLOSE_CODE), reason.as_bytes());
    }

    fn closed(&self) -> BoxFuture<'_, TransportError> {
        Box::pin(async move { lost(self.0.closed().await) })
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Quic
    }

    fn remote_addr(&self) -> SocketAddr {
        self.0.remote_address()
    }

    fn rtt(&self) -> Duration {
        self.0.rtt()
    }
}
