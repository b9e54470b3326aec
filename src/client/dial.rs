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

/// Dials the relay; keeps the QUIC endpoint between attempts.
pub(super) struct Dialer {
    relay: String,
    server_name: String,
    quic_tls: rustls::ClientConfig,
    https_tls: TlsConnector,
    proxy: Option<Proxy>,
    endpoint: Mutex<Option<(bool, quinn::Endpoint)>>,
    hello: Hello,
}

impl Dialer {
    /// A dialer for `relay` (`HOST:PORT`), verifying it against `roots`.
    pub(super) fn new(
        relay: &str,
        roots: &tls::Roots,
        proxy: Option<Proxy>,
        hello: Hello,
    ) -> Result<Self, ClientError> {
        let server_name = split_host(relay)?.to_owned();
        let quic_tls = tls::client_config(roots, &[wire::ALPN])?;
        let https_tls = TlsConnector::from(Arc::new(tls::client_config(roots, &[h2::ALPN])?));
        Ok(Self {
            relay: relay.to_owned(),
            server_name,
            quic_tls,
            https_tls,
            proxy,
            endpoint: Mutex::new(None),
            hello,
        })
    }

    /// The relay address as configured.
    pub(super) fn relay(&self) -> &str {
        &self.relay
    }

    async fn resolve(&self) -> Result<SocketAddr, TransportError> {
        let mut addrs = tokio::net::lookup_host(&self.relay)
            .await
            .map_err(|e| TransportError::Connect(format!("resolve {}: {e}", self.relay)))?;
        addrs
            .next()
            .ok_or_else(|| TransportError::Connect(format!("resolve {}: no address", self.relay)))
    }

    fn quic_endpoint(&self, v6: bool) -> Result<quinn::Endpoint, TransportError> {
        let mut slot = self.endpoint.lock();
        if let Some((is_v6, endpoint)) = &*slot
            && *is_v6 == v6
        {
            return Ok(endpoint.clone());
        }
        let bind: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }
            .parse()
            .expect("literal socket addresses parse");
        let endpoint = quic::client_endpoint(bind, self.quic_tls.clone())?;
        *slot = Some((v6, endpoint.clone()));
        Ok(endpoint)
    }

    /// Dials over `kind` within `timeout` (TLS included), then runs the handshake.
    pub(super) async fn connect(
        &self,
        kind: TransportKind,
        timeout: Duration,
    ) -> Result<Tunnel, ClientError> {
        let connection: Arc<dyn TunnelConnection> = tokio::time::timeout(timeout, async {
            match kind {
                TransportKind::Quic => {
                    let addr = self.resolve().await?;
                    let endpoint = self.quic_endpoint(addr.is_ipv6())?;
                    Ok::<Arc<dyn TunnelConnection>, TransportError>(Arc::new(
                        quic::dial(&endpoint, addr, &self.server_name).await?,
                    ))
                }
                TransportKind::Https => {
                    Ok(Arc::new(self.dial_https().await?) as Arc<dyn TunnelConnection>)
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

    async fn dial_https(&self) -> Result<h2::ConnectSide, TransportError> {
        let tcp = match &self.proxy {
            Some(proxy) => proxy.connect(&self.relay).await.map_err(|e| {
                TransportError::Connect(format!("via proxy {}: {e}", proxy.address))
            })?,
            None => tokio::net::TcpStream::connect(&self.relay)
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

    /// Waits until the QUIC endpoint has sent every close (bounded).
    pub(super) async fn wait_idle(&self) {
        let endpoint = self.endpoint.lock().as_ref().map(|(_, e)| e.clone());
        if let Some(endpoint) = endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
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

/// The host part of `HOST:PORT` (brackets of an IPv6 literal removed).
pub(super) fn split_host(relay: &str) -> Result<&str, ClientError> {
    let host = match relay.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => {
            return Err(ClientError::Config(format!(
                "relay {relay:?}: expected HOST:PORT"
            )));
        }
    };
    Ok(host.trim_start_matches('[').trim_end_matches(']'))
}
