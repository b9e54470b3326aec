//! Serving an axum app on a TCP listener with the bounds `axum::serve` lacks: a cap on the
//! connections served at once, a deadline for each request's header, and an idle timeout.
//!
//! - **Connection cap**: a connection is accepted only with a permit; while all are taken, new
//!   connections wait in the kernel's listen backlog (as Go's `netutil.LimitListener` does)
//!   instead of costing the relay memory and a task each.
//! - **Header timeout**: hyper's HTTP/1.1 `header_read_timeout` (with its timer): a request's
//!   header must be complete within it, counted from when the connection is ready for that
//!   request. A connection that sends nothing at all (not even enough to tell HTTP/1.1 from
//!   HTTP/2) is closed by the idle watchdog at the same deadline.
//! - **Idle timeout**: a connection with no request in flight for that long is shut down
//!   gracefully (HTTP/2 gets a GOAWAY). A request is in flight from its header until its
//!   response body is finished or dropped, so an open SSE stream or a call waiting on its
//!   upstream never counts as idle.
//!
//! On shutdown the listener closes, every connection is shut down gracefully, and [`serve`]
//! returns once they have all ended.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// After an idle connection was told to close, how long it gets to do so before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A pause after a failed `accept` (out of file descriptors and the like), instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// The listener's name, a metric label (`agents`, `admin`).
    pub name: &'static str,
    /// Connections served at once.
    pub max_connections: usize,
    /// Time to deliver a request's complete header.
    pub header_timeout: Duration,
    /// Time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
}

/// Serves `app` on `listener` within `bounds` until `shutdown`, then waits for the open
/// connections to end (each is shut down gracefully). Handlers see the peer's address as
/// [`ConnectInfo<SocketAddr>`]; `tap` runs on each accepted socket.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    bounds: Bounds,
    tap: fn(&mut TcpStream),
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (mut tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(listener = bounds.name, error = %e, "TCP accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        tap(&mut tcp);
        connections.spawn(serve_connection(
            tcp,
            remote,
            app.clone(),
            bounds,
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Requests in flight on one connection, and when it is due to close if none starts.
struct Activity {
    in_flight: AtomicUsize,
    /// When the connection has been idle too long; meaningful while `in_flight` is 0.
    idle_deadline: Mutex<Instant>,
    idle_timeout: Duration,
    changed: Notify,
}

impl Activity {
    /// The idle deadline, or `None` while a request is in flight.
    fn idle_deadline(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(
            *self
                .idle_deadline
                .lock()
                .expect("idle_deadline lock is never held across a panic"),
        )
    }
}

/// One request in flight: from its header to the end (or drop) of its response body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.changed.notify_one();
        Self(activity.clone())
    }

    /// Does nothing: a response body's frame mapper calls it so it owns the guard.
    fn keep(&self) {}
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        // Stamp the deadline before the count can reach 0, so the watchdog never reads an old one.
        *activity
            .idle_deadline
            .lock()
            .expect("idle_deadline lock is never held across a panic") =
            Instant::now() + activity.idle_timeout;
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        activity.changed.notify_one();
    }
}

async fn serve_connection(
    tcp: TcpStream,
    remote: SocketAddr,
    app: Router,
    bounds: Bounds,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let open = metrics::gauge!(crate::metrics::HTTP_CONNECTIONS, "listener" => bounds.name);
    open.increment(1.0);
    // Before its first request a connection is held to the header timeout (or the idle
    // timeout, if shorter): a real client sends its request right after connecting.
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        idle_deadline: Mutex::new(
            Instant::now() + bounds.header_timeout.min(bounds.idle_timeout),
        ),
        idle_timeout: bounds.idle_timeout,
        changed: Notify::new(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(remote));
            let guard = InFlight::begin(&activity);
            let mut app = app.clone();
            async move {
                let response = match app.call(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        guard.keep();
                        frame
                    }))
                }))
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection(TokioIo::new(tcp), service);
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    let mut give_up: Option<Instant> = None;
    loop {
        let idle = if closing {
            None
        } else {
            activity.idle_deadline()
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(listener = bounds.name, %remote, error = %e, "HTTP connection ended");
                    if is_header_timeout(&*e) {
                        metrics::counter!(crate::metrics::HTTP_CONNECTIONS_TIMED_OUT, "listener" => bounds.name, "reason" => "header").increment(1);
                    }
                }
                break;
            }
            _ = activity.changed.notified() => {
                if closing && activity.in_flight.load(Ordering::Acquire) > 0 {
                    // A request got in before the close: let it finish.
                    give_up = None;
                }
            }
            _ = sleep_until(idle), if idle.is_some() => {
                if activity.idle_deadline().is_some_and(|d| d <= Instant::now()) {
                    tracing::debug!(listener = bounds.name, %remote, "closing idle HTTP connection");
                    metrics::counter!(crate::metrics::HTTP_CONNECTIONS_TIMED_OUT, "listener" => bounds.name, "reason" => "idle").increment(1);
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                    give_up = Some(Instant::now() + CLOSE_GRACE);
                }
            }
            _ = sleep_until(give_up), if give_up.is_some() => break,
            _ = shutdown.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
    open.decrement(1.0);
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Whether hyper ended the connection for its header read timeout.
fn is_header_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(hyper) = e.downcast_ref::<hyper::Error>()
            && hyper.is_timeout()
        {
            return true;
        }
        source = e.source();
    }
    false
}
