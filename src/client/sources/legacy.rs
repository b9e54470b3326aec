//! An upstream that speaks the 2024-11-05 HTTP+SSE transport.
//!
//! Per tunnel stream, a GET opens the upstream's event stream, whose first `endpoint` event
//! names where to POST; messages go up as POSTs (answered 202), and everything the upstream
//! says comes back on the event stream, routed to its exchange by request id.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use sse_stream::SseByteStream;

use super::routing::{Routing, progress_tokens};
use crate::mcp::jsonrpc::{MessageInfo, MessageKind, codes, error_body};
use crate::mcp::{Classified, classify};
use crate::transport::{RecvHalf, SendHalf};
use crate::wire::{Era, Frame, FrameKind, FrameReader, FrameWriter, OpenHeader};

/// Time the upstream has to send its `endpoint` event.
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(10);

/// The upstream's event stream, opened, and the URL its `endpoint` event named.
pub struct Opened {
    events: SseByteStream<
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>,
    >,
    post_url: reqwest::Url,
}

/// Opens the event stream at `url` and waits for its `endpoint` event. `None` when `url` does
/// not speak the HTTP+SSE transport (no event stream, or no `endpoint` event).
pub async fn open(client: &reqwest::Client, url: &reqwest::Url) -> Result<Option<Opened>, String> {
    let response = client
        .get(url.clone())
        .header(ACCEPT, HeaderValue::from_static("text/event-stream"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let is_sse = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !response.status().is_success() || !is_sse {
        return Ok(None);
    }
    let stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>> =
        Box::pin(response.bytes_stream());
    let mut events = SseByteStream::new(stream);
    let endpoint = tokio::time::timeout(ENDPOINT_TIMEOUT, async {
        while let Some(event) = events.next().await {
            match event {
                Ok(event) if event.event.as_deref() == Some("endpoint") => return event.data,
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let Some(endpoint) = endpoint else {
        return Ok(None);
    };
    let post_url = url
        .join(endpoint.trim())
        .map_err(|e| format!("bad endpoint {endpoint:?}: {e}"))?;
    if post_url.origin() != url.origin() {
        // The 2024-11-05 transport requires the endpoint on the same origin; anything else
        // would let the upstream steer connect to another host.
        return Err(format!("endpoint {post_url} is not on the origin of {url}"));
    }
    Ok(Some(Opened { events, post_url }))
}

/// Serves one tunnel stream over an opened HTTP+SSE session.
pub async fn serve(
    name: Arc<str>,
    client: reqwest::Client,
    opened: Opened,
    header: OpenHeader,
    mut reader: FrameReader<RecvHalf>,
    writer: FrameWriter<SendHalf>,
) {
    let (out, writer_task) = super::start_writer(writer);
    let Opened {
        mut events,
        post_url,
    } = opened;
    let routing = Arc::new(Mutex::new(Routing::default()));
    let event_task = {
        let (routing, out, name) = (routing.clone(), out.clone(), name.clone());
        tokio::spawn(async move {
            let why = loop {
                let data = match events.next().await {
                    Some(Ok(event)) => match event.data.filter(|d| !d.is_empty()) {
                        Some(data) => Bytes::from(data),
                        None => continue,
                    },
                    Some(Err(e)) => break format!("its event stream failed: {e}"),
                    None => break "it closed its event stream".to_owned(),
                };
                let (Ok(classified), Ok(raw)) = (
                    classify(&data),
                    serde_json::from_slice::<&serde_json::value::RawValue>(&data),
                ) else {
                    tracing::warn!(source = %name, "HTTP+SSE upstream sent an event that is not JSON-RPC; dropped");
                    continue;
                };
                let (exchange, ended) = routing
                    .lock()
                    .expect("routing lock is never held across a panic")
                    .target(&classified, raw);
                if out.send(Frame::message(exchange, data)).await.is_err() {
                    return;
                }
                for exchange in ended {
                    let _ = out.send(Frame::end(exchange)).await;
                }
            };
            let reason = format!("source {name}: {why}");
            let pending = routing
                .lock()
                .expect("routing lock is never held across a panic")
                .take_all();
            for (exchange, ids) in pending {
                for id in ids {
                    let _ = out
                        .send(Frame::message(
                            exchange,
                            error_body(Some(&id), codes::SOURCE_UNAVAILABLE, &reason),
                        ))
                        .await;
                }
                let _ = out.send(Frame::end(exchange)).await;
            }
            let _ = out.send(Frame::close(reason)).await;
        })
    };
    while let Ok(Some(frame)) = reader.next().await {
        // HTTP+SSE upstreams get no identity assertion: a renewed one is ignored.
        if frame.kind == FrameKind::Identity {
            continue;
        }
        if frame.kind != FrameKind::Message {
            break;
        }
        let classified = classify(&frame.payload).ok();
        let requests: Vec<&MessageInfo> = classified
            .iter()
            .flat_map(Classified::messages)
            .filter(|m| m.kind == MessageKind::Request)
            .collect();
        if header.era == Era::Stateless {
            for request in &requests {
                let message = format!(
                    "source {name} speaks the 2024-11-05 HTTP+SSE transport, which has no stateless requests; send initialize"
                );
                let _ = out
                    .send(Frame::message(
                        frame.exchange,
                        error_body(request.id.as_deref(), codes::METHOD_NOT_FOUND, &message),
                    ))
                    .await;
            }
            let _ = out.send(Frame::end(frame.exchange)).await;
            continue;
        }
        let recorded = routing
            .lock()
            .expect("routing lock is never held across a panic")
            .record(frame.exchange, &requests, &progress_tokens(&frame.payload));
        if let Err(id) = recorded {
            let body = error_body(
                None,
                codes::INVALID_REQUEST,
                &format!("request id {id} is already in flight"),
            );
            let _ = out.send(Frame::message(frame.exchange, body)).await;
            let _ = out.send(Frame::end(frame.exchange)).await;
            continue;
        }
        let posted = client
            .post(post_url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(frame.payload.clone())
            .send()
            .await;
        let failure = match posted {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("source {name} answered HTTP {}", response.status())),
            Err(e) => Some(format!("source {name} is unreachable: {e}")),
        };
        match failure {
            Some(reason) => {
                let ids = routing
                    .lock()
                    .expect("routing lock is never held across a panic")
                    .forget(frame.exchange);
                for id in ids {
                    let _ = out
                        .send(Frame::message(
                            frame.exchange,
                            error_body(Some(&id), codes::SOURCE_UNAVAILABLE, &reason),
                        ))
                        .await;
                }
                let _ = out.send(Frame::end(frame.exchange)).await;
            }
            None if requests.is_empty() => {
                let _ = out.send(Frame::end(frame.exchange)).await;
            }
            None => {}
        }
    }
    // Closing the event stream ends the upstream's session.
    event_task.abort();
    drop(out);
    let _ = writer_task.await;
}
