//! Accepting tunnel connections (QUIC, and the HTTPS fallback on TCP), the control-stream
//! handshake, registration, and draining.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::registry::{Registry, Terms, Tunnel};
use crate::config::validate_source_name;
use crate::govern::identity::TunnelGrant;
use crate::relay::listener_limits::ListenerLimits;
use crate::transport::quic::QuicConnection;
use crate::transport::{RecvHalf, SendHalf, TunnelConnection};
use crate::wire::{
    self, Frame, FrameKind, FrameReader, FrameWriter, Greeting, Hello, HelloReply, Notice,
};

/// What accepting tunnels needs of the relay around it: where tunnels register, who may
/// connect, and when to drain and stop. The relay's shared state implements it; keeping it a
/// trait keeps this module free of everything above the tunnel layer.
pub(crate) trait TunnelHost: Send + Sync + 'static {
    /// Where tunnels register.
    fn registry(&self) -> &Registry;
    /// The grant of a tunnel token, if a tenant has it (read at each handshake, so a reload
    /// applies to the next one).
    fn tunnel_grant(&self, token: &str) -> Option<TunnelGrant>;
    /// The frame limit offered to every `connect` at its handshake.
    fn max_frame(&self) -> usize;
    /// A tunnel of `tenant` is about to register `sources`.
    fn registered(&self, tenant: &str, sources: &[String]);
    /// A tunnel registered: its sources are routed.
    fn routed(&self);
    /// Cancelled when the relay starts draining: tunnels are told, nothing new is accepted.
    fn draining(&self) -> &CancellationToken;
    /// Cancelled when the relay stops: tunnel connections close.
    fn stopped(&self) -> &CancellationToken;
}

/// Tunnel connections in TLS or `hello`: each holds one permit from accept until it is
/// registered or refused, so peers that never authenticate hold at most
/// `[limits] max_tunnel_handshakes` connections, each within `tunnel_handshake_timeout_secs`.
#[derive(Clone)]
pub(crate) struct Admission {
    permits: Arc<Semaphore>,
    max: usize,
    timeout: Duration,
    receive_window: u64,
}

impl Admission {
    /// Admission under `limits`.
    pub(crate) fn new(limits: &ListenerLimits) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limits.max_tunnel_handshakes)),
            max: limits.max_tunnel_handshakes,
            timeout: limits.tunnel_handshake_timeout,
            receive_window: limits.tunnel_receive_window,
        }
    }

    /// Whether more than half the handshake slots are taken: QUIC peers must then prove their
    /// address (a Retry round trip) before they get one, so spoofed Initial packets, which can
    /// never complete a handshake, cannot hold slots until the handshake timeout.
    fn under_pressure(&self) -> bool {
        self.permits.available_permits().saturating_mul(2) < self.max
    }

    /// A handshake slot with its deadline, or `None` when all are taken.
    fn begin(&self) -> Option<Handshaking> {
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none() {
            metrics::counter!(crate::metrics::TUNNEL_HANDSHAKES_REFUSED).increment(1);
        }
        Some(Handshaking {
            _permit: permit?,
            deadline: tokio::time::Instant::now() + self.timeout,
            receive_window: self.receive_window,
        })
    }
}

/// One tunnel connection between accept and registration.
pub(crate) struct Handshaking {
    _permit: OwnedSemaphorePermit,
    deadline: tokio::time::Instant,
    receive_window: u64,
}

/// Control messages are small; this bounds what an unauthenticated peer can make us read.
const CONTROL_FRAME_LIMIT: usize = 64 * 1024;

/// Sources one connection may announce.
const MAX_SOURCES: usize = 256;

/// Accepts QUIC connections until `shutdown`.
pub(crate) async fn serve_quic<H: TunnelHost>(
    endpoint: quinn::Endpoint,
    host: Arc<H>,
    admission: Admission,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.cancelled() => break,
        };
        let Some(mut incoming) = incoming else { break };
        let remote = incoming.remote_address();
        if admission.under_pressure() && !incoming.remote_address_validated() {
            match incoming.retry() {
                Ok(()) => continue,
                Err(not_now) => incoming = not_now.into_incoming(),
            }
        }
        let Some(handshaking) = admission.begin() else {
            tracing::debug!(%remote, "QUIC connection refused: too many handshakes in progress");
            incoming.refuse();
            continue;
        };
        let host = host.clone();
        tokio::spawn(async move {
            let connection = match tokio::time::timeout_at(handshaking.deadline, incoming).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "QUIC handshake failed"),
                Err(_) => return tracing::debug!(%remote, "QUIC handshake timed out"),
            };
            serve_connection(Arc::new(QuicConnection::new(connection)), host, handshaking).await;
        });
    }
    // While established connections drain, new ones are refused at once rather than left
    // unanswered: a `connect` learns in one round trip that this relay takes no new tunnels
    // (and that UDP works; silence would look like UDP blocked and send it to the fallback).
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming.refuse(),
                None => break,
            },
            _ = host.stopped().cancelled() => break,
        }
    }
    // Established connections close when the relay stops; let the closes go out.
    host.stopped().cancelled().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

/// Accepts HTTPS-fallback connections (TLS, then HTTP/2) until `shutdown`.
pub(crate) async fn serve_https<H: TunnelHost>(
    listener: TcpListener,
    tls: TlsAcceptor,
    host: Arc<H>,
    admission: Admission,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Some(handshaking) = admission.begin() else {
            tracing::debug!(%remote, "HTTPS tunnel connection refused: too many handshakes in progress");
            drop(tcp);
            continue;
        };
        let (tls, host) = (tls.clone(), host.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let connection = async {
                let stream = tls.accept(tcp).await.map_err(|e| format!("TLS: {e}"))?;
                crate::transport::h2::relay_side(stream, remote)
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout_at(handshaking.deadline, connection).await {
                Ok(Ok(connection)) => {
                    serve_connection(Arc::new(connection), host, handshaking).await
                }
                Ok(Err(e)) => tracing::debug!(%remote, error = %e, "HTTPS tunnel handshake failed"),
                Err(_) => tracing::debug!(%remote, "HTTPS tunnel handshake timed out"),
            }
        });
    }
}

/// A registered tunnel and its control stream.
struct Control {
    tunnel: Arc<Tunnel>,
    reader: FrameReader<RecvHalf>,
    writer: FrameWriter<SendHalf>,
}

/// Runs one tunnel connection: handshake (by the deadline `handshaking` carries) and
/// registration, then until it ends. When the relay shuts down it tells the client to drain,
/// routes nothing new to it, and closes it once the relay stops.
async fn serve_connection<H: TunnelHost>(
    connection: Arc<dyn TunnelConnection>,
    host: Arc<H>,
    handshaking: Handshaking,
) {
    let remote = connection.remote_addr();
    let hello =
        tokio::time::timeout_at(handshaking.deadline, handshake(&connection, host.as_ref())).await;
    let receive_window = handshaking.receive_window;
    // Registered or refused: the handshake slot is free for the next connection.
    drop(handshaking);
    let Control {
        tunnel,
        reader: mut control,
        mut writer,
    } = match hello {
        Ok(Ok(registered)) => {
            connection.admit(receive_window);
            registered
        }
        Ok(Err(reason)) => {
            tracing::warn!(%remote, %reason, "tunnel refused");
            // Give the client a moment to read the refusal before the connection closes.
            let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
            connection.close(&reason);
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "tunnel handshake timed out");
            connection.close("handshake timed out");
            return;
        }
    };
    tracing::info!(%remote, tenant = %tunnel.tenant, sources = ?tunnel.sources, transport = %connection.kind(), "tunnel connected");
    let mut told_to_drain = false;
    let why = loop {
        tokio::select! {
            e = connection.closed() => break e.to_string(),
            frame = control.next() => match frame {
                Ok(Some(frame)) => match frame.parse_json::<Notice>(FrameKind::Control) {
                    Ok(Notice::Drain { reason }) => {
                        tracing::info!(%remote, tenant = %tunnel.tenant, %reason, "tunnel draining");
                        host.registry().drain(&tunnel);
                    }
                    Err(e) => break format!("control stream: {e}"),
                },
                Ok(None) => break "control stream ended".to_owned(),
                Err(e) => break format!("control stream failed: {e}"),
            },
            _ = host.draining().cancelled(), if !told_to_drain => {
                told_to_drain = true;
                host.registry().drain(&tunnel);
                let notice = Notice::Drain { reason: "relay shutting down".into() };
                let _ = writer.send(&Frame::json(FrameKind::Control, &notice)).await;
            }
            _ = host.stopped().cancelled() => break "relay shutting down".to_owned(),
        }
    };
    host.registry().unregister(&tunnel);
    connection.close(&why);
    tracing::info!(%remote, tenant = %tunnel.tenant, reason = %why, "tunnel disconnected");
}

async fn handshake<H: TunnelHost>(
    connection: &Arc<dyn TunnelConnection>,
    host: &H,
) -> Result<Control, String> {
    let stream = connection.open_stream().await.map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new(stream.recv, CONTROL_FRAME_LIMIT);
    let mut writer = FrameWriter::new(stream.send, CONTROL_FRAME_LIMIT);
    let greeting = Greeting {
        version: wire::PROTOCOL_VERSION,
    };
    writer
        .send(&Frame::json(FrameKind::Control, &greeting))
        .await
        .map_err(|e| e.to_string())?;
    let hello: Hello = match reader.next().await {
        Ok(Some(frame)) => frame
            .parse_json(FrameKind::Control)
            .map_err(|e| format!("bad hello: {e}"))?,
        Ok(None) => return Err("client closed before hello".into()),
        Err(e) => return Err(format!("bad hello: {e}")),
    };
    let verdict = check_hello(&hello, host);
    let reply = match &verdict {
        Ok((grant, _)) => HelloReply::Welcome {
            tenant: grant.tenant.to_string(),
            max_frame: host.max_frame() as u64,
        },
        Err(reason) => HelloReply::Refused {
            reason: reason.clone(),
        },
    };
    writer
        .send(&Frame::json(FrameKind::Control, &reply))
        .await
        .map_err(|e| e.to_string())?;
    let (grant, wire_version) = verdict?;
    let terms = Terms {
        max_frame: usize::try_from(hello.max_frame)
            .unwrap_or(usize::MAX)
            .min(host.max_frame()),
        wire_version,
        connect: hello.instance.as_deref().map(Arc::from),
    };
    let sources: Vec<String> = hello.sources.into_iter().map(|s| s.name).collect();
    // A registered source is one metrics may name (see `metric_names`).
    host.registered(&grant.tenant, &sources);
    let tunnel = host
        .registry()
        .register(grant, sources, connection.clone(), terms);
    host.routed();
    Ok(Control {
        tunnel,
        reader,
        writer,
    })
}

/// The longest `connect` instance id accepted (the ids `connect` makes are 24 characters).
const MAX_INSTANCE_LEN: usize = 64;

/// Checks a client's hello: the wire version both sides speak, and what its token grants.
fn check_hello<H: TunnelHost>(hello: &Hello, host: &H) -> Result<(TunnelGrant, u32), String> {
    let wire_version = wire::agree(hello.version).map_err(|e| e.to_string())?;
    let grant = host.tunnel_grant(&hello.token).ok_or_else(|| {
        "unknown tunnel token: no tenant has it (check the token, or the relay's tunnel_tokens)"
            .to_owned()
    })?;
    if hello
        .instance
        .as_ref()
        .is_some_and(|id| id.is_empty() || id.len() > MAX_INSTANCE_LEN)
    {
        return Err(format!(
            "bad hello: an instance id is 1 to {MAX_INSTANCE_LEN} characters"
        ));
    }
    if hello.sources.is_empty() || hello.sources.len() > MAX_SOURCES {
        return Err(format!("announce between 1 and {MAX_SOURCES} sources"));
    }
    for source in &hello.sources {
        validate_source_name(&source.name)?;
    }
    let refused: Vec<&str> = hello
        .sources
        .iter()
        .map(|s| s.name.as_str())
        .filter(|name| !grant.allows(name))
        .collect();
    if let Some(bound) = &grant.sources
        && !refused.is_empty()
    {
        return Err(format!(
            "this tunnel token ({} of tenant {}) is bound to sources [{}] and may not serve [{}]: remove those sources from connect, or add them to the token's sources in the relay's [[tenants.tunnels]]",
            grant.token.short(),
            grant.tenant,
            bound.join(", "),
            refused.join(", "),
        ));
    }
    Ok((grant, wire_version))
}
