//! Dialing the relay over QUIC or the HTTPS fallback, and the handshake on the control stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_rustls::TlsConnector;

use super::ClientError;
use super::proxy::Proxy;
use crate::transport::{
    RecvHalf, SendHalf, TransportError, TransportKind, TunnelConnection, h2, quic, tls,
};
use crate::wire::{
    self, Frame, FrameKind, FrameReader, FrameWriter, Greeting, Hello, HelloReply,
    SourceAnnouncement,
};

/// Time the relay has to greet and answer `Hello`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Control messages are small.
const CONTROL_FRAME_LIMIT: usize = 64 * 1024;

/// What the relay's welcome settled.
pub(super) struct Welcomed {
    /// The tenant the token belongs to.
    pub tenant: String,
    /// The frame limit both ways on this connection.
    pub limit: usize,
    /// The wire version both sides speak ([`wire::agree`]): what this client may send the
    /// relay (the rule in [`wire::version`]).
    pub wire_version: u32,
}

/// A connected, authenticated tunnel connection and its control stream.
pub(super) struct Tunnel {
    /// The connection.
    pub connection: Arc<dyn TunnelConnection>,
    /// What the handshake settled.
    pub welcomed: Welcomed,
    /// Notices from the relay.
    pub control_in: FrameReader<RecvHalf>,
    /// Notices to the relay.
    pub control_out: FrameWriter<SendHalf>,
}

/// Dials one relay (at any of its addresses); keeps its QUIC endpoints between attempts.
pub(super) struct Dialer {
    relay: String,
    server_name: String,
    quic_tls: rustls::ClientConfig,
    https_tls: TlsConnector,
    proxy: Option<Proxy>,
    /// The QUIC endpoints, one per address family (`[v4, v6]`): slots to both families of one
    /// name share them.
    endpoints: Mutex<[Option<quinn::Endpoint>; 2]>,
    hello: Hello,
}

impl Dialer {
    /// A dialer for `relay` (`HOST:PORT`), verifying it against `roots` under the name `host`.
    pub(super) fn new(
        relay: &str,
        host: &str,
        roots: &tls::Roots,
        proxy: Option<Proxy>,
        hello: Hello,
    ) -> Result<Self, ClientError> {
        let quic_tls = tls::client_config(roots, &[wire::ALPN])?;
        let https_tls = TlsConnector::from(Arc::new(tls::client_config(roots, &[h2::ALPN])?));
        Ok(Self {
            relay: relay.to_owned(),
            server_name: host.to_owned(),
            quic_tls,
            https_tls,
            proxy,
            endpoints: Mutex::new([None, None]),
            hello,
        })
    }

    /// The relay address as configured.
    pub(super) fn relay(&self) -> &str {
        &self.relay
    }

    /// The first address the relay's name resolves to (a slot whose name never resolved).
    async fn resolve(&self) -> Result<SocketAddr, TransportError> {
        let mut addrs = tokio::net::lookup_host(&self.relay)
            .await
            .map_err(|e| TransportError::Connect(format!("resolve {}: {e}", self.relay)))?;
        addrs
            .next()
            .ok_or_else(|| TransportError::Connect(format!("resolve {}: no address", self.relay)))
    }

    fn quic_endpoint(&self, v6: bool) -> Result<quinn::Endpoint, TransportError> {
        let mut endpoints = self.endpoints.lock();
        let slot = &mut endpoints[usize::from(v6)];
        if let Some(endpoint) = slot {
            return Ok(endpoint.clone());
        }
        let bind = if v6 {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
        } else {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
        };
        let endpoint = quic::client_endpoint(bind, self.quic_tls.clone())?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Dials over `kind` within `timeout` (TLS included), then runs the handshake: at `addr`,
    /// or by name when `None`. The certificate is verified against the relay's host name
    /// either way.
    pub(super) async fn connect(
        &self,
        kind: TransportKind,
        timeout: Duration,
        addr: Option<SocketAddr>,
    ) -> Result<Tunnel, ClientError> {
        let connection: Arc<dyn TunnelConnection> = tokio::time::timeout(timeout, async {
            match kind {
                TransportKind::Quic => {
                    let addr = match addr {
                        Some(addr) => addr,
                        None => self.resolve().await?,
                    };
                    let endpoint = self.quic_endpoint(addr.is_ipv6())?;
                    Ok::<Arc<dyn TunnelConnection>, TransportError>(Arc::new(
                        quic::dial(&endpoint, addr, &self.server_name).await?,
                    ))
                }
                TransportKind::Https => {
                    Ok(Arc::new(self.dial_https(addr).await?) as Arc<dyn TunnelConnection>)
                }
            }
        })
        .await
        .map_err(|_| {
            TransportError::Connect(format!(
                "no {kind} connection within {} ms",
                timeout.as_millis()
            ))
        })??;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&connection)).await {
            Ok(Ok(tunnel)) => Ok(tunnel),
            Ok(Err(e)) => {
                connection.close("handshake failed");
                Err(e)
            }
            Err(_) => {
                connection.close("handshake timed out");
                Err(ClientError::Handshake(
                    "the relay did not answer within 10 s".into(),
                ))
            }
        }
    }

    /// TCP and TLS to `addr` (by name when `None`). Through a CONNECT proxy the name is what
    /// the proxy is asked for: proxies' rules are commonly written for names, and the proxy
    /// may resolve what this host cannot.
    async fn dial_https(
        &self,
        addr: Option<SocketAddr>,
    ) -> Result<h2::ConnectSide, TransportError> {
        let tcp = match (&self.proxy, addr) {
            (Some(proxy), _) => proxy.connect(&self.relay).await.map_err(|e| {
                TransportError::Connect(format!("via proxy {}: {e}", proxy.address))
            })?,
            (None, Some(addr)) => tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| TransportError::Connect(format!("TCP {addr}: {e}")))?,
            (None, None) => tokio::net::TcpStream::connect(&self.relay)
                .await
                .map_err(|e| TransportError::Connect(format!("TCP {}: {e}", self.relay)))?,
        };
        let _ = tcp.set_nodelay(true);
        let remote = tcp
            .peer_addr()
            .map_err(|e| TransportError::Connect(e.to_string()))?;
        let name = rustls_pki_types::ServerName::try_from(self.server_name.clone())
            .map_err(|e| TransportError::Config(format!("relay name {}: {e}", self.server_name)))?;
        let stream = self
            .https_tls
            .connect(name, tcp)
            .await
            .map_err(|e| TransportError::Connect(format!("TLS: {e}")))?;
        h2::connect_side(stream, remote).await
    }

    /// The relay greets on the control stream it opens; we answer with our token and sources.
    async fn handshake(
        &self,
        connection: &Arc<dyn TunnelConnection>,
    ) -> Result<Tunnel, ClientError> {
        let stream = connection.accept_stream().await?;
        let mut reader = FrameReader::new(stream.recv, CONTROL_FRAME_LIMIT);
        let mut writer = FrameWriter::new(stream.send, CONTROL_FRAME_LIMIT);
        let greeting: Greeting = read_control(&mut reader).await?;
        // The relay's version is known before the hello, so the hello too may carry only
        // what the relay understands (rule 3).
        let wire_version =
            wire::agree(greeting.version).map_err(|e| ClientError::Refused(e.to_string()))?;
        let mut hello = self.hello.clone();
        if wire_version < 2 {
            // Wire version 2 added the instance id (rule 2).
            hello.instance = None;
        }
        writer
            .send(&Frame::json(FrameKind::Control, &hello))
            .await
            .map_err(|e| ClientError::Handshake(e.to_string()))?;
        let reply: HelloReply = read_control(&mut reader).await?;
        match reply {
            HelloReply::Welcome { max_frame: 0, .. } => Err(ClientError::Handshake(
                "the relay announced a frame limit of 0 bytes".into(),
            )),
            HelloReply::Welcome { tenant, max_frame } => {
                // Never send the relay more than it accepts, nor accept more than we allow.
                let limit = usize::try_from(max_frame)
                    .unwrap_or(usize::MAX)
                    .min(self.hello.max_frame as usize);
                Ok(Tunnel {
                    connection: connection.clone(),
                    welcomed: Welcomed {
                        tenant,
                        limit,
                        wire_version,
                    },
                    control_in: reader,
                    control_out: writer,
                })
            }
            HelloReply::Refused { reason } => {
                connection.close("refused");
                Err(ClientError::Refused(reason))
            }
        }
    }

    /// Waits until the QUIC endpoints have sent every close (bounded).
    pub(super) async fn wait_idle(&self) {
        let endpoints: Vec<quinn::Endpoint> =
            self.endpoints.lock().iter().flatten().cloned().collect();
        for endpoint in endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
    }
}

/// Where one connection slot dials: a relay at one of its addresses, or by name.
#[derive(Clone)]
pub(super) struct Route {
    /// The relay's dialer.
    pub dialer: Arc<Dialer>,
    /// The address; `None`: by name.
    pub addr: Option<SocketAddr>,
}

impl Route {
    /// Dials over `kind` within `timeout`, then runs the handshake.
    pub(super) async fn connect(
        &self,
        kind: TransportKind,
        timeout: Duration,
    ) -> Result<Tunnel, ClientError> {
        self.dialer.connect(kind, timeout, self.addr).await
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(addr) if addr.to_string() != self.dialer.relay() => {
                write!(f, "{} at {addr}", self.dialer.relay())
            }
            _ => f.write_str(self.dialer.relay()),
        }
    }
}

/// The next control message of the handshake.
async fn read_control<T: serde::de::DeserializeOwned>(
    reader: &mut FrameReader<RecvHalf>,
) -> Result<T, ClientError> {
    match reader.next().await {
        Ok(Some(frame)) => frame
            .parse_json(FrameKind::Control)
            .map_err(|e| ClientError::Handshake(e.to_string())),
        Ok(None) => Err(ClientError::Handshake(
            "the relay closed the control stream".into(),
        )),
        Err(e) => Err(ClientError::Handshake(e.to_string())),
    }
}

/// The `Hello` this client sends.
pub(super) fn hello(
    token: &str,
    sources: &[crate::config::SourceConfig],
    max_frame: usize,
) -> Hello {
    Hello {
        version: wire::PROTOCOL_VERSION,
        token: token.to_owned(),
        sources: sources
            .iter()
            .map(|s| SourceAnnouncement {
                name: s.name.clone(),
            })
            .collect(),
        max_frame: max_frame as u64,
        agent: format!("mcp-tunnel/{}", env!("CARGO_PKG_VERSION")),
        instance: Some(new_instance_id()),
    }
}

/// A fresh instance id for this `connect` run (see [`Hello::instance`]): random, so a
/// restarted `connect` is never mistaken for the one whose stdio processes died with it.
fn new_instance_id() -> String {
    let mut bytes = [0u8; 12];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    hex::encode(bytes)
}
