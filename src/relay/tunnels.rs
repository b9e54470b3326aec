//! Accepting tunnel connections: handshake, authentication, registration.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::RelayState;
use crate::config::validate_source_name;
use crate::transport::quic::QuicConnection;
use crate::transport::{TransportError, TunnelConnection};
use crate::wire::{self, Frame, FrameKind, FrameReader, FrameWriter, Hello, HelloReply};

/// Time a new connection has to finish TLS and send its `Hello`: generous for a slow link,
/// short enough that half-open connections do not pile up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Control messages are small; this bounds what an unauthenticated peer can make us read.
const CONTROL_FRAME_LIMIT: usize = 64 * 1024;

/// Sources one connection may announce.
const MAX_SOURCES: usize = 256;

/// Accepts QUIC connections until `shutdown`.
pub async fn serve_quic(
    endpoint: quinn::Endpoint,
    state: Arc<RelayState>,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "QUIC handshake failed"),
                Err(_) => return tracing::debug!(%remote, "QUIC handshake timed out"),
            };
            serve_connection(Arc::new(QuicConnection(connection)), state, shutdown).await;
        });
    }
    endpoint.close(0u32.into(), b"relay shutting down");
}

/// Runs one tunnel connection: handshake, registration, then wait for its end.
pub async fn serve_connection(
    connection: Arc<dyn TunnelConnection>,
    state: Arc<RelayState>,
    shutdown: CancellationToken,
) {
    let remote = connection.remote_addr();
    let Control {
        tunnel,
        reader: mut control,
        _writer,
    } = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&connection, &state)).await {
        Ok(Ok(registered)) => registered,
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
    let why = tokio::select! {
        e = connection.closed() => e.to_string(),
        // The control stream carries nothing yet after the handshake; its end is the client's.
        frame = control.next() => match frame {
            Ok(Some(frame)) if frame.kind == FrameKind::Close => format!("client closed: {}", frame.reason()),
            Ok(_) => "control stream ended".to_owned(),
            Err(e) => format!("control stream failed: {e}"),
        },
        _ = shutdown.cancelled() => {
            connection.close("relay shutting down");
            "relay shutting down".to_owned()
        }
    };
    state.registry.unregister(&tunnel);
    connection.close(&why);
    tracing::info!(%remote, tenant = %tunnel.tenant, reason = %why, "tunnel disconnected");
}

/// A registered tunnel and its control stream, held open for the life of the connection.
struct Control {
    tunnel: Arc<super::registry::Tunnel>,
    reader: FrameReader<crate::transport::RecvHalf>,
    _writer: FrameWriter<crate::transport::SendHalf>,
}

async fn handshake(
    connection: &Arc<dyn TunnelConnection>,
    state: &RelayState,
) -> Result<Control, String> {
    let stream = connection
        .accept_stream()
        .await
        .map_err(|e: TransportError| e.to_string())?;
    let mut reader = FrameReader::new(stream.recv, CONTROL_FRAME_LIMIT);
    let mut writer = FrameWriter::new(stream.send, CONTROL_FRAME_LIMIT);
    let hello: Hello = match reader.next().await {
        Ok(Some(frame)) => frame
            .parse_json(FrameKind::Control)
            .map_err(|e| format!("bad hello: {e}"))?,
        Ok(None) => return Err("client closed before hello".into()),
        Err(e) => return Err(format!("bad hello: {e}")),
    };
    let verdict = check_hello(&hello, state);
    let reply = match &verdict {
        Ok(tenant) => HelloReply::Welcome {
            tenant: tenant.to_string(),
            max_frame: state.limits.max_message_bytes as u64,
        },
        Err(reason) => HelloReply::Refused {
            reason: reason.clone(),
        },
    };
    writer
        .send(&Frame::json(FrameKind::Control, &reply))
        .await
        .map_err(|e| e.to_string())?;
    let tenant = verdict?;
    let max_frame = usize::try_from(hello.max_frame)
        .unwrap_or(usize::MAX)
        .min(state.limits.max_message_bytes);
    let sources = hello.sources.into_iter().map(|s| s.name).collect();
    Ok(Control {
        tunnel: state
            .registry
            .register(tenant, sources, connection.clone(), max_frame),
        reader,
        _writer: writer,
    })
}

fn check_hello(hello: &Hello, state: &RelayState) -> Result<Arc<str>, String> {
    if hello.version != wire::PROTOCOL_VERSION {
        return Err(format!(
            "wire protocol version {} is not supported (relay speaks {})",
            hello.version,
            wire::PROTOCOL_VERSION
        ));
    }
    let tenant = state
        .governance()
        .keyring
        .tunnel_tenant(&hello.token)
        .cloned()
        .ok_or_else(|| {
            "unknown tunnel token: no tenant has it (check the token, or the relay's tunnel_tokens)"
                .to_owned()
        })?;
    if hello.sources.is_empty() || hello.sources.len() > MAX_SOURCES {
        return Err(format!("announce between 1 and {MAX_SOURCES} sources"));
    }
    for source in &hello.sources {
        validate_source_name(&source.name)?;
    }
    Ok(tenant)
}
