//! An upstream that speaks the 2024-11-05 HTTP+SSE transport.
//!
//! Per tunnel stream, a GET opens the upstream's event stream, whose first `endpoint` event
//! names where to POST; messages go up as POSTs (answered 202), and everything the upstream
//! says comes back on the event stream, routed to its exchange by request id.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::Method;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue};
use parking_lot::Mutex;
use sse_stream::SseByteStream;

use super::super::routing::{Routing, progress_tokens};
use super::super::stream::{Inbound, fail_ids, fail_pending, requests};
use super::client::{BodyStream, HttpClient, Target, body_stream, error_chain};
use crate::mcp::classify;
use crate::mcp::jsonrpc::{MessageInfo, codes, error_body};
use crate::wire::{Era, Frame, OpenHeader};

/// Time the upstream has to send its `endpoint` event.
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(10);

/// The upstream's event stream, opened, and the URL its `endpoint` event named.
pub(super) struct Opened {
    events: SseByteStream<BodyStream>,
    /// Where messages are POSTed: the `endpoint` event's URL, resolved once per session.
    post_target: Target,
}

/// Opens the event stream at `target` (the source's `url`) and waits for its `endpoint`
/// event. `None` when it does not speak the HTTP+SSE transport (no event stream, or no
/// `endpoint` event).
pub(super) async fn open(
    client: &HttpClient,
    url: &url::Url,
    target: &Target,
) -> Result<Option<Opened>, String> {
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
    let response = client
        .send(Method::GET, target, headers, Bytes::new())
        .await
        .map_err(|e| error_chain(&e))?;
    let is_sse = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !response.status().is_success() || !is_sse {
        return Ok(None);
    }
    let mut events = SseByteStream::new(body_stream(response));
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
    let post_target = Target::new(&post_url)
        .map_err(|e| format!("bad endpoint {e}"))?
        .with_cross_origin_redirects(target.cross_origin_redirects());
    Ok(Some(Opened {
        events,
        post_target,
    }))
}

/// Serves one tunnel stream over an opened HTTP+SSE session.
pub(crate) async fn serve(
    name: Arc<str>,
    client: HttpClient,
    opened: Opened,
    header: OpenHeader,
    mut inbound: Inbound,
    out: super::Out,
) {
    let Opened {
        events,
        post_target,
    } = opened;
    let routing = Arc::new(Mutex::new(Routing::default()));
    let event_task = tokio::spawn(route_events(
        events,
        routing.clone(),
        out.clone(),
        name.clone(),
    ));
    let session = Session {
        name,
        client,
        post_target,
        era: header.era,
        routing,
        out,
    };
    // HTTP+SSE upstreams get no identity assertion: a renewed one is ignored.
    while let Some(frame) = inbound.next_message().await {
        session.message(frame).await;
    }
    // Closing the event stream ends the upstream's session.
    event_task.abort();
}

/// Reads the upstream's event stream: each message goes to the exchange it belongs to. When
/// the stream ends, every pending request fails and the tunnel stream closes.
async fn route_events(
    mut events: SseByteStream<BodyStream>,
    routing: Arc<Mutex<Routing>>,
    out: super::Out,
    name: Arc<str>,
) {
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
        let (exchange, ended) = routing.lock().target(&classified, raw);
        if out.send(Frame::message(exchange, data)).await.is_err() {
            return;
        }
        for exchange in ended {
            let _ = out.send(Frame::end(exchange)).await;
        }
    };
    let reason = format!("source {name}: {why}");
    fail_pending(&out, &routing, codes::SOURCE_UNAVAILABLE, &reason).await;
    let _ = out.send(Frame::close(reason)).await;
}

/// One tunnel stream's HTTP+SSE session: where its messages are POSTed.
struct Session {
    name: Arc<str>,
    client: HttpClient,
    post_target: Target,
    era: Era,
    routing: Arc<Mutex<Routing>>,
    out: super::Out,
}

impl Session {
    /// POSTs one message of the agent; answers its requests with an error when it cannot.
    async fn message(&self, frame: Frame) {
        let (out, name) = (&self.out, &self.name);
        let classified = classify(&frame.payload).ok();
        let requests: Vec<&MessageInfo> = classified.iter().flat_map(requests).collect();
        if self.era == Era::Stateless {
            let message = format!(
                "source {name} speaks the 2024-11-05 HTTP+SSE transport, which has no stateless requests; send initialize"
            );
            for request in &requests {
                let _ = out
                    .send(Frame::message(
                        frame.exchange,
                        error_body(request.id.as_deref(), codes::METHOD_NOT_FOUND, &message),
                    ))
                    .await;
            }
            let _ = out.send(Frame::end(frame.exchange)).await;
            return;
        }
        let recorded =
            self.routing
                .lock()
                .record(frame.exchange, &requests, &progress_tokens(&frame.payload));
        if let Err(id) = recorded {
            let body = error_body(
                None,
                codes::INVALID_REQUEST,
                &format!("request id {id} is already in flight"),
            );
            let _ = out.send(Frame::message(frame.exchange, body)).await;
            let _ = out.send(Frame::end(frame.exchange)).await;
            return;
        }
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // What reqwest sent when no Accept was given.
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
        let posted = self
            .client
            .send(
                Method::POST,
                &self.post_target,
                headers,
                frame.payload.clone(),
            )
            .await;
        let failure = match posted {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("source {name} answered HTTP {}", response.status())),
            Err(e) => Some(format!("source {name} is unreachable: {}", error_chain(&e))),
        };
        match failure {
            Some(reason) => {
                let ids = self.routing.lock().forget(frame.exchange);
                fail_ids(out, frame.exchange, ids, codes::SOURCE_UNAVAILABLE, &reason).await;
            }
            None if requests.is_empty() => {
                let _ = out.send(Frame::end(frame.exchange)).await;
            }
            None => {}
        }
    }
}
