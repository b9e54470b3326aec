//! `mcp-tunnel connect`: dials out to the relay and serves its sources over the tunnel.
//!
//! It never listens. It forwards only to the sources in its own configuration: a stream that
//! names anything else is refused.

pub mod backoff;
pub mod sources;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{ClientFile, SourceConfig, TransportChoice};
use crate::transport::{TransportError, TunnelConnection, quic, tls};
use crate::wire::{
    self, Frame, FrameKind, FrameReader, FrameWriter, Hello, HelloReply, OpenHeader,
    SourceAnnouncement,
};
use backoff::Backoff;
use sources::Sources;

/// Time to wait for the relay's answer to `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the relay has to send the open header of a new stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that lasted this long was healthy: the next failure retries at once again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Why `connect` stopped or could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The relay refused the token or the sources; retrying will not help.
    #[error("the relay refused this tunnel: {0}")]
    Refused(String),
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// Transport failure (retried internally; returned only from a single attempt).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The handshake went wrong.
    #[error("handshake with the relay failed: {0}")]
    Handshake(String),
}

/// `connect`'s resolved settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The relay as HOST:PORT.
    pub relay: String,
    /// CA PEM file; the system roots when `None`.
    pub ca: Option<std::path::PathBuf>,
    /// CA certificates as PEM text (the demo); takes precedence over `ca`.
    pub ca_pem: Option<String>,
    /// The tunnel token.
    pub token: String,
    /// Transport choice.
    pub transport: TransportChoice,
    /// The sources.
    pub sources: Vec<SourceConfig>,
    /// Largest frame accepted from the relay.
    pub max_message_bytes: usize,
}

impl ClientSettings {
    /// Settings from a configuration file, with the token from `token_override` (flag or env)
    /// when the file has none.
    pub fn from_file(
        file: &ClientFile,
        token_override: Option<String>,
    ) -> Result<Self, ClientError> {
        let token = token_override
            .or_else(|| file.token.clone())
            .ok_or_else(|| {
                ClientError::Config(
                    "no tunnel token: set token in the file or MCP_TUNNEL_TOKEN".into(),
                )
            })?;
        Ok(Self {
            relay: file.relay.clone(),
            ca: file.ca.clone(),
            ca_pem: None,
            token,
            transport: file.transport,
            sources: file.sources().map_err(ClientError::Config)?,
            max_message_bytes: file.max_message_bytes,
        })
    }
}

fn split_host(relay: &str) -> Result<&str, ClientError> {
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

/// Runs `connect` until `shutdown`, reconnecting as needed; returns early only when the relay
/// refuses the tunnel or the configuration is unusable.
pub async fn run(settings: ClientSettings, shutdown: CancellationToken) -> Result<(), ClientError> {
    if settings.transport == TransportChoice::Https {
        return Err(ClientError::Config(
            "--transport https: the HTTPS fallback is not available in this release; use quic"
                .into(),
        ));
    }
    let sources = Arc::new(Sources::new(&settings.sources).map_err(ClientError::Config)?);
    let result = serve_until_stopped(&settings, sources.clone(), &shutdown).await;
    // Whatever ended the tunnel, no child process of a stdio source outlives `run`.
    sources.shutdown().await;
    result
}

/// Connects, serves and reconnects until `shutdown` or a refusal.
async fn serve_until_stopped(
    settings: &ClientSettings,
    sources: Arc<Sources>,
    shutdown: &CancellationToken,
) -> Result<(), ClientError> {
    let roots = match (&settings.ca_pem, &settings.ca) {
        (Some(pem), _) => tls::Roots::CaPem(pem.clone()),
        (None, Some(path)) => tls::Roots::CaFile(path.clone()),
        (None, None) => tls::Roots::System,
    };
    let tls = tls::client_config(&roots, &[wire::ALPN])?;
    let server_name = split_host(&settings.relay)?.to_owned();
    let mut backoff = Backoff::default();
    let mut endpoint: Option<(bool, quinn::Endpoint)> = None;
    loop {
        let delay = backoff.next_delay();
        if !delay.is_zero() {
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "reconnecting after a pause"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        let attempt = async {
            let addr = resolve(&settings.relay).await?;
            let ep = match &endpoint {
                Some((v6, ep)) if *v6 == addr.is_ipv6() => ep.clone(),
                _ => {
                    let bind: SocketAddr = if addr.is_ipv6() {
                        "[::]:0".parse()
                    } else {
                        "0.0.0.0:0".parse()
                    }
                    .expect("literal socket addresses parse");
                    let ep = quic::client_endpoint(bind, tls.clone())?;
                    endpoint = Some((addr.is_ipv6(), ep.clone()));
                    ep
                }
            };
            let connection: Arc<dyn TunnelConnection> =
                Arc::new(quic::dial(&ep, addr, &server_name).await?);
            let (welcomed, control) = hello(&connection, settings).await?;
            Ok::<_, ClientError>((connection, welcomed, control))
        };
        let (connection, welcomed, control) = tokio::select! {
            result = attempt => match result {
                Ok(connected) => connected,
                Err(ClientError::Refused(reason)) => return Err(ClientError::Refused(reason)),
                Err(e) => {
                    tracing::warn!(relay = %settings.relay, error = %e, "could not connect to the relay");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        tracing::info!(relay = %settings.relay, tenant = %welcomed.tenant, transport = %connection.kind(), sources = sources.len(), "tunnel up");
        let started = Instant::now();
        let reason = serve(
            connection.clone(),
            welcomed,
            sources.clone(),
            shutdown.clone(),
        )
        .await;
        drop(control);
        if shutdown.is_cancelled() {
            connection.close("connect shutting down");
            return Ok(());
        }
        tracing::warn!(relay = %settings.relay, %reason, "tunnel down");
        if started.elapsed() >= HEALTHY_AFTER {
            backoff.reset();
        }
    }
}

async fn resolve(relay: &str) -> Result<SocketAddr, ClientError> {
    let mut addrs = tokio::net::lookup_host(relay)
        .await
        .map_err(|e| TransportError::Connect(format!("resolve {relay}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| TransportError::Connect(format!("resolve {relay}: no address")).into())
}

/// The open control stream; dropping it tells the relay this client is gone.
struct ControlStream {
    _writer: FrameWriter<crate::transport::SendHalf>,
    _reader: FrameReader<crate::transport::RecvHalf>,
}

/// What the relay's welcome settled.
struct Welcomed {
    tenant: String,
    /// The frame limit both ways on this connection.
    limit: usize,
}

async fn hello(
    connection: &Arc<dyn TunnelConnection>,
    settings: &ClientSettings,
) -> Result<(Welcomed, ControlStream), ClientError> {
    let stream = connection.open_stream().await?;
    let mut writer = FrameWriter::new(stream.send, 64 * 1024);
    let mut reader = FrameReader::new(stream.recv, 64 * 1024);
    let hello = Hello {
        version: wire::PROTOCOL_VERSION,
        token: settings.token.clone(),
        sources: settings
            .sources
            .iter()
            .map(|s| SourceAnnouncement {
                name: s.name.clone(),
            })
            .collect(),
        max_frame: settings.max_message_bytes as u64,
        agent: format!("mcp-tunnel/{}", env!("CARGO_PKG_VERSION")),
    };
    writer
        .send(&Frame::json(FrameKind::Control, &hello))
        .await
        .map_err(|e| ClientError::Handshake(e.to_string()))?;
    let reply = tokio::time::timeout(HELLO_TIMEOUT, reader.next())
        .await
        .map_err(|_| ClientError::Handshake("no answer within 10 s".into()))?;
    let reply: HelloReply = match reply {
        Ok(Some(frame)) => frame
            .parse_json(FrameKind::Control)
            .map_err(|e| ClientError::Handshake(e.to_string()))?,
        Ok(None) => {
            return Err(ClientError::Handshake(
                "the relay closed the control stream".into(),
            ));
        }
        Err(e) => return Err(ClientError::Handshake(e.to_string())),
    };
    match reply {
        HelloReply::Welcome { tenant, max_frame } => Ok((
            // Never send the relay more than it accepts, nor accept more than we allow.
            Welcomed {
                tenant,
                limit: usize::try_from(max_frame)
                    .unwrap_or(usize::MAX)
                    .min(settings.max_message_bytes),
            },
            ControlStream {
                _writer: writer,
                _reader: reader,
            },
        )),
        HelloReply::Refused { reason } => {
            connection.close("refused");
            Err(ClientError::Refused(reason))
        }
    }
}

/// Serves streams the relay opens until the connection ends; returns why it ended.
async fn serve(
    connection: Arc<dyn TunnelConnection>,
    welcomed: Welcomed,
    sources: Arc<Sources>,
    shutdown: CancellationToken,
) -> String {
    let tenant: Arc<str> = welcomed.tenant.into();
    let limit = welcomed.limit;
    loop {
        let stream = tokio::select! {
            stream = connection.accept_stream() => stream,
            _ = shutdown.cancelled() => return "shutting down".into(),
        };
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => return e.to_string(),
        };
        let sources = sources.clone();
        let tenant = tenant.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::new(stream.recv, limit);
            let mut writer = FrameWriter::new(stream.send, limit);
            let header: OpenHeader = match tokio::time::timeout(OPEN_TIMEOUT, reader.next()).await {
                Ok(Ok(Some(frame))) => match frame.parse_json(FrameKind::Open) {
                    Ok(header) => header,
                    Err(e) => return tracing::warn!(error = %e, "bad open header"),
                },
                Ok(Ok(None)) => return,
                Ok(Err(e)) => return tracing::warn!(error = %e, "bad open header"),
                Err(_) => return tracing::warn!("no open header within 10 s"),
            };
            if header.tenant != *tenant {
                let _ = writer.send(&Frame::close("tenant mismatch")).await;
                return tracing::error!(expected = %tenant, got = %header.tenant, "relay sent a stream for another tenant; refused");
            }
            match sources.get(&header.source) {
                Some(source) => source.serve(header, reader, writer).await,
                None => {
                    tracing::warn!(source = %header.source, "relay asked for a source this client does not serve");
                    let _ = writer
                        .send(&Frame::close(format!(
                            "source {} is not served by this client",
                            header.source
                        )))
                        .await;
                }
            }
        });
    }
}
