//! Serving an axum app on a TCP listener with the bounds `axum::serve` lacks: a cap on the
//! connections served at once, a deadline for each request's header, and an idle timeout.
//!
//! - **Connection cap**: a connection is accepted only with a permit; while all are taken, new
//!   connections wait in the kernel's listen backlog (as Go's `netutil.LimitListener` does)
//!   instead of costing the relay memory and a task each.
//! - **Header timeout** (HTTP/1.1): from the first byte of a request its header must be
//!   complete within the timeout, or the connection is dropped: a slowloris peer holds a
//!   connection that long and no longer.
//!   hyper's own `header_read_timeout` is not used: its clock starts as soon as a kept-alive
//!   connection waits for its next request, so it would also close idle keep-alive connections
//!   that early, racing clients that reuse them (reqwest keeps them 90 s).
//! - **Idle timeout**: a connection with no request in flight and no request begun for that
//!   long (a fresh one included: pooling clients open connections they keep unused for a
//!   while) is shut down gracefully (HTTP/2 gets a GOAWAY). A request is in flight from its
//!   header until its response body is finished or dropped, so an open SSE stream or a call
//!   waiting on its upstream never counts as idle. HTTP/2 connections are held to this one
//!   (their frames arrive at any time; the `h2` crate bounds header blocks).
//!
//! On shutdown the listener closes, every connection is shut down gracefully, and [`serve`]
//! returns once they have all ended.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
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
pub(super) struct Bounds {
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
pub(super) async fn serve(
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

/// Which clock a connection with no request in flight runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    /// A request's header has begun: dropped at the deadline.
    Header,
    /// Nothing begun since the last answer: shut down gracefully at the deadline.
    Idle,
}

/// The clocks of one connection.
struct Clock {
    /// When a header began arriving with no request in flight (`None`: none has).
    header_started: Option<Instant>,
    /// When an idle connection is shut down; set as each answer ends.
    idle_deadline: Instant,
    /// Whether the connection speaks HTTP/2 (its preface was seen): no header clock then.
    h2: bool,
}

/// Requests in flight on one connection, and its clocks.
struct Activity {
    in_flight: AtomicUsize,
    clock: Mutex<Clock>,
    header_timeout: Duration,
    idle_timeout: Duration,
    changed: Notify,
}

impl Activity {
    fn clock(&self) -> parking_lot::MutexGuard<'_, Clock> {
        self.clock.lock()
    }

    /// When the connection is due to close and why, or `None` while a request is in flight.
    fn due(&self) -> Option<(Instant, Due)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let clock = self.clock();
        match clock.header_started {
            Some(started) if !clock.h2 => Some((started + self.header_timeout, Due::Header)),
            _ => Some((clock.idle_deadline, Due::Idle)),
        }
    }

    /// Bytes arrived; `first` are the connection's first bytes, if these are they.
    fn bytes_read(&self, first: Option<&[u8]>) {
        let mut clock = self.clock();
        if let Some(first) = first {
            clock.h2 = first.starts_with(b"PRI ");
        }
        if clock.header_started.is_none() && self.in_flight.load(Ordering::Acquire) == 0 {
            clock.header_started = Some(Instant::now());
            drop(clock);
            self.changed.notify_one();
        }
    }
}

/// One request in flight: from its header to the end (or drop) of its response body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.clock().header_started = None;
        activity.changed.notify_one();
        Self(activity.clone())
    }

    /// Does nothing: a response body's frame mapper calls it so it owns the guard.
    fn keep(&self) {}
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        {
            // Under the clock's lock, so a byte read meanwhile is seen with the count at 0.
            let mut clock = activity.clock();
            clock.idle_deadline = Instant::now() + activity.idle_timeout;
            clock.header_started = None;
            activity.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
        activity.changed.notify_one();
    }
}

/// A TCP stream that tells its connection's [`Activity`] when bytes arrive.
struct Watched {
    tcp: TcpStream,
    activity: Arc<Activity>,
    seen_any: bool,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
        {
            let first = (!this.seen_any).then(|| &buf.filled()[before..]);
            this.seen_any = true;
            this.activity.bytes_read(first);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
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
    // A fresh connection is on the idle clock until its first byte: pooling clients (hyper's,
    // so reqwest) open connections they may keep unused for a while, like a kept-alive one.
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        clock: Mutex::new(Clock {
            header_started: None,
            idle_deadline: Instant::now() + bounds.idle_timeout,
            h2: false,
        }),
        header_timeout: bounds.header_timeout,
        idle_timeout: bounds.idle_timeout,
        changed: Notify::new(),
    });
    let io = Watched {
        tcp,
        activity: activity.clone(),
        seen_any: false,
    };
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
    // The header clock is ours (see the module docs); hyper's would default to 30 s with a
    // timer, and this builder has none.
    builder.http1().header_read_timeout(None);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    let mut give_up: Option<Instant> = None;
    loop {
        let due = if closing { None } else { activity.due() };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(listener = bounds.name, %remote, error = %e, "HTTP connection ended");
                }
                break;
            }
            _ = activity.changed.notified() => {
                if closing && activity.in_flight.load(Ordering::Acquire) > 0 {
                    // A request got in before the close: let it finish.
                    give_up = None;
                }
            }
            _ = sleep_until(due.map(|(at, _)| at)), if due.is_some() => {
                match activity.due() {
                    Some((at, Due::Header)) if at <= Instant::now() => {
                        tracing::debug!(listener = bounds.name, %remote, "no complete request header in time; dropping the connection");
                        metrics::counter!(crate::metrics::HTTP_CONNECTIONS_TIMED_OUT, "listener" => bounds.name, "reason" => "header").increment(1);
                        break;
                    }
                    Some((at, Due::Idle)) if at <= Instant::now() => {
                        tracing::debug!(listener = bounds.name, %remote, "closing idle HTTP connection");
                        metrics::counter!(crate::metrics::HTTP_CONNECTIONS_TIMED_OUT, "listener" => bounds.name, "reason" => "idle").increment(1);
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                        give_up = Some(Instant::now() + CLOSE_GRACE);
                    }
                    _ => {}
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

/// Disables Nagle's algorithm on an accepted connection: answers are written in several small
/// pieces (headers, SSE events), and Nagle plus the peer's delayed ACK would hold each one for
/// up to 40 ms.
pub fn no_delay(tcp: &mut TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY not set");
    }
}
