//! Answers that come before the request body is read to its end (413 for an oversized body,
//! and equally 401, 404, 429) reach the client however it sends.
//!
//! An HTTP/1.1 server that answers early and closes the connection while the client is still
//! sending makes the kernel reset the connection (unread data at close), and the reset can
//! destroy the answer before the client reads it: async httpx (the Python SDK, fastmcp) sees a
//! connection reset instead of its 413 and JSON-RPC error. So whatever a handler leaves of the
//! body is read and discarded, up to `[limits] oversized_body_drain_bytes` and within
//! `oversized_body_drain_secs`, before the answer goes out; the client finishes sending, reads
//! the answer, and the connection stays usable. A remainder beyond that bound (known up front
//! from `Content-Length`, or found while reading) is not read: the answer then says
//! `Connection: close`. A client that sent `Expect: 100-continue` and whose body was never
//! asked for has sent nothing to discard.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use parking_lot::Mutex;

use crate::relay::state::RelayState;

/// What a handler left of a request body, handed back when it dropped the body.
#[derive(Default)]
struct Leftover {
    body: Option<Body>,
    /// Whether the handler ever asked for the body (an `Expect: 100-continue` client sends it
    /// only then).
    polled: bool,
}

type Slot = Arc<Mutex<Leftover>>;

/// A request body that, when dropped before its end, gives what is left back to [`Slot`].
struct Tracked {
    inner: Option<Body>,
    slot: Slot,
}

impl Tracked {
    fn lock(slot: &Slot) -> parking_lot::MutexGuard<'_, Leftover> {
        slot.lock()
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        Self::lock(&this.slot).polled = true;
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.inner = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(HttpBody::size_hint)
            .unwrap_or_else(|| SizeHint::with_exact(0))
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take()
            && !inner.is_end_stream()
        {
            Self::lock(&self.slot).body = Some(inner);
        }
    }
}

/// The middleware: runs the request, then discards what its handler left of the body (see the
/// module docs) before the answer goes out.
pub(super) async fn discard_unread_body(
    State(state): State<Arc<RelayState>>,
    request: Request,
    next: Next,
) -> Response {
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let slot = Slot::default();
    let request = request.map(|body| {
        Body::new(Tracked {
            inner: Some(body),
            slot: slot.clone(),
        })
    });
    let mut response = next.run(request).await;
    let leftover = std::mem::take(&mut *Tracked::lock(&slot));
    let Some(rest) = leftover.body else {
        return response;
    };
    if expects_continue && !leftover.polled {
        return response;
    }
    let (bound, timeout) = state.governance().limits.oversized_body_drain();
    if !discard(rest, bound, timeout).await {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads and drops `body` to its end; `false` if that would take more than `bound` bytes or
/// `timeout`, or the body fails.
async fn discard(mut body: Body, bound: usize, timeout: Duration) -> bool {
    if body
        .size_hint()
        .exact()
        .is_some_and(|size| size > bound as u64)
    {
        return false;
    }
    let read_all = async {
        let mut discarded = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                discarded = discarded.saturating_add(data.len());
                if discarded > bound {
                    return false;
                }
            }
        }
        true
    };
    let drained = tokio::time::timeout(timeout, read_all)
        .await
        .unwrap_or(false);
    if !drained {
        tracing::debug!(
            bound,
            "unread request body left; closing the connection after the answer"
        );
    }
    drained
}
