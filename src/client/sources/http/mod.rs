//! A Streamable HTTP upstream: each tunnel stream becomes its own MCP client session.
//!
//! `connect` owns the upstream's HTTP semantics: its session id, its protocol version header,
//! its JSON or SSE answers, its standalone GET stream. Back through the tunnel go only messages,
//! each tagged with the exchange of the request whose response carried it.
//!
//! One concept a file: this one, the source and how a stream starts (an HTTP+SSE upstream is
//! handed to [`legacy`], the 2024-11-05 transport); `context`, one stream's upstream session
//! and its requests; `answer`, relaying the upstream's answers (JSON or event streams, in
//! pieces when large); `error`, why an exchange failed; `client`, the pooled HTTP client both
//! transports use. The frame loop is the one all sources share (`sources::stream`).
//!
//! Protocol eras meet here too: `bridge` serves stateless (2026-07-28) agents over session-era
//! sessions of its own (`pool` keeps them, `waiting` holds the calls whose upstream asked the
//! agent something in mid-call), and `stateless_upstream` serves session-era agents of an
//! upstream that speaks only 2026-07-28.

mod answer;
mod bridge;
mod client;
mod context;
mod error;
mod legacy;
mod pool;
mod session;
mod stateless_upstream;
#[cfg(test)]
mod tests;
mod waiting;

pub use client::Target;

use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::Out;
use super::held::{self, Held};
use super::replay::SourceBytes;
use super::stream::{self, Inbound};
use crate::mcp::jsonrpc::codes;
use crate::transport::{RecvHalf, SendHalf};
use crate::wire::{Era, Frame, FrameKind, FrameReader, FrameWriter, OpenHeader};
use client::HttpClient;
use context::StreamContext;
use session::{HttpSession, UpstreamState};

/// A configured Streamable HTTP upstream.
pub(crate) struct HttpSource {
    name: String,
    /// The configured URL: HTTP+SSE endpoints are resolved against it.
    url: url::Url,
    /// Where requests go, parsed once from `url`.
    target: Target,
    client: HttpClient,
    /// Whether the upstream speaks the 2024-11-05 HTTP+SSE transport instead of Streamable
    /// HTTP: known from a URL ending in `/sse`, else learned on the first session.
    legacy: OnceLock<bool>,
    /// The largest single answer relayed (`max_answer_bytes`); larger than a frame, it
    /// crosses the tunnel in pieces.
    max_answer: usize,
    /// Session-era upstream sessions, kept past their streams for a relay to resume.
    held: Held<HttpSession>,
    /// Bytes the held sessions keep of their answers for replays, together.
    replay_bytes: SourceBytes,
    /// Whether the sweep of expired held and bridged sessions runs.
    sweeping: OnceLock<()>,
    /// Stateless agents of an upstream that speaks only the session era.
    bridge: bridge::Bridge,
}

impl HttpSource {
    /// A source `name` at `url`.
    pub(crate) fn new(name: &str, url: &str) -> Result<Self, String> {
        let url =
            url::Url::parse(url).map_err(|e| format!("source {name}: bad URL {url:?}: {e}"))?;
        let target =
            Target::new(&url).map_err(|e| format!("source {name}: bad URL {url:?}: {e}"))?;
        let client = HttpClient::new().map_err(|e| format!("source {name}: HTTP client: {e}"))?;
        let legacy = OnceLock::new();
        if url.path().trim_end_matches('/').ends_with("/sse") {
            let _ = legacy.set(true);
        }
        Ok(Self {
            name: name.to_owned(),
            url,
            target,
            client,
            legacy,
            max_answer: crate::config::DEFAULT_MAX_ANSWER_BYTES,
            held: Held::new(Duration::from_secs(
                crate::config::DEFAULT_CONNECT_SESSION_IDLE_SECS,
            )),
            sweeping: OnceLock::new(),
            replay_bytes: SourceBytes::default(),
            bridge: bridge::Bridge::default(),
        })
    }

    /// Sets how long a session no stream carries is kept for a relay to resume
    /// (`session_idle_secs`).
    pub(crate) fn with_session_idle(mut self, idle: Duration) -> Self {
        self.held = Held::new(idle);
        self
    }

    /// Lets requests follow redirects to other origins (`follow_cross_origin_redirects`).
    pub(crate) fn with_cross_origin_redirects(mut self, allowed: bool) -> Self {
        self.target = self.target.with_cross_origin_redirects(allowed);
        self
    }

    /// Sets the largest single answer relayed (`max_answer_bytes`).
    pub(crate) fn with_answer_limit(mut self, max_answer: usize) -> Self {
        self.max_answer = max_answer;
        self
    }

    /// Opens an HTTP+SSE session when the upstream speaks that transport: always for a known
    /// legacy upstream, and once, on the first session, for an upstream not yet known (the
    /// GET a Streamable HTTP server refuses without a session id is the probe).
    async fn legacy_session(&self, era: Era) -> Result<Option<legacy::Opened>, String> {
        match (self.legacy.get(), era) {
            (Some(false), _) | (None, Era::Stateless) => Ok(None),
            (Some(true), _) => match legacy::open(&self.client, &self.url, &self.target).await? {
                Some(opened) => Ok(Some(opened)),
                None => Err(format!(
                    "source {} did not open an HTTP+SSE event stream",
                    self.name
                )),
            },
            (None, Era::Session) => {
                let opened = legacy::open(&self.client, &self.url, &self.target)
                    .await
                    .unwrap_or(None);
                let _ = self.legacy.set(opened.is_some());
                if opened.is_some() {
                    tracing::info!(source = %self.name, "upstream speaks the 2024-11-05 HTTP+SSE transport");
                }
                Ok(opened)
            }
        }
    }

    /// Serves one exchange stream: forwards each message upstream and tags what comes back.
    /// Server-initiated messages go on it numbered ([`crate::wire::FrameKind::Event`]) when
    /// the relay is of wire version 4 (`numbered`).
    pub(crate) async fn serve(
        self: Arc<Self>,
        header: OpenHeader,
        numbered: bool,
        reader: FrameReader<RecvHalf>,
        writer: FrameWriter<SendHalf>,
    ) {
        stream::serve(reader, writer, |inbound, out, max_frame| {
            self.serve_stream(header, inbound, (out, numbered), max_frame)
        })
        .await;
    }

    /// Every path but the common one (a session-era stream's frame loop) is boxed where it is
    /// awaited: the stream's future is sized for its largest await, and each idle session
    /// keeps that future for as long as it lives.
    async fn serve_stream(
        self: Arc<Self>,
        header: OpenHeader,
        mut inbound: Inbound,
        (out, numbered): (Out, bool),
        max_frame: usize,
    ) {
        // A resumed session is a Streamable HTTP one: an HTTP+SSE session is never held
        // (its event stream is its life), so its resume is refused below.
        let resumes = header.session.as_ref().is_some_and(|s| s.resume);
        let legacy = if resumes {
            Ok(None)
        } else {
            Box::pin(self.legacy_session(header.era)).await
        };
        match legacy {
            Ok(Some(opened)) => {
                let name = self.name.as_str().into();
                let legacy = legacy::serve(name, self.client.clone(), opened, header, inbound, out);
                return Box::pin(legacy).await;
            }
            Ok(None) => {}
            Err(reason) => {
                // Every request of the first message gets the reason, then the stream ends.
                return Box::pin(inbound.refuse(&out, codes::SOURCE_UNAVAILABLE, &reason)).await;
            }
        }
        let max_answer = self.max_answer.max(max_frame);
        if header.era == Era::Stateless && Box::pin(self.bridges(&header)).await {
            let limits = (max_frame, max_answer);
            let bridged = self.serve_bridged(header, inbound, (out, numbered), limits);
            return Box::pin(bridged).await;
        }
        let Some((session, resumed)) = self.session_for(&header) else {
            let reason = format!(
                "session not found: its upstream session with source {} has ended",
                self.name
            );
            let _ = out.send(Frame::close(reason)).await;
            return;
        };
        let context = Arc::new(StreamContext::new(
            self.clone(),
            header,
            session.clone(),
            (out, numbered),
            max_frame,
            max_answer,
        ));
        session.set_tasks(|| Arc::new(context.for_session()));
        if resumed {
            // First of all: the relay waits for this to know the resume succeeded.
            let resumable = Frame::json(FrameKind::Resumable, &session.resumable());
            Box::pin(context.send(resumable)).await;
            let _ = session.start_get_stream();
        }
        let _ = context.clone().run(None, &mut inbound).await;
        match &session.handle {
            Some(handle) if !inbound.closed_by_relay() && !session.is_gone() => {
                // The stream ended, not the session: a relay may resume it.
                tracing::debug!(source = %self.name, context = %context.header.context, "stream ended; upstream session held");
                self.held.detach(handle, Instant::now());
            }
            handle => {
                if let Some(handle) = handle {
                    self.held.remove(handle, Instant::now());
                }
                Box::pin(session.end(Some(&context))).await;
            }
        }
    }

    /// Serves a stateless agent's stream over a bridged session-era session of its caller
    /// (see [`bridge`]), opened first when it is new; or, when its request retries a call
    /// waiting for its input, over that call's session, where the call goes on.
    async fn serve_bridged(
        self: Arc<Self>,
        header: OpenHeader,
        mut inbound: Inbound,
        (out, numbered): (Out, bool),
        (max_frame, max_answer): (usize, usize),
    ) {
        let Some(first) = inbound.next_message().await else {
            return;
        };
        let retry = waiting::interactive_request(&first.payload)
            .and_then(|id| Some((id, crate::mcp::bridge::Retry::parse(&first.payload)?)));
        if let Some((id, retry)) = retry.filter(|(_, r)| r.state.is_some()) {
            let classified = crate::mcp::classify(&first.payload);
            let handle = retry.state.as_deref().unwrap_or_default();
            let Some(parked) = self.unpark(handle, &header.subject) else {
                let reason = format!(
                    "requestState names no call waiting at source {} (it expired, was \
                     answered, or its connect restarted): send the request again without it",
                    self.name
                );
                if let Ok(classified) = classified {
                    stream::fail_requests(
                        &out,
                        first.exchange,
                        &classified,
                        codes::INVALID_PARAMS,
                        &reason,
                    )
                    .await;
                }
                return;
            };
            let (mut checkout, waiting) = (*parked).split();
            checkout.unpark();
            // The retry's assertion is the fresh one: the call may have waited minutes.
            *checkout.session().assertion.lock() = header.assertion.clone();
            let context = StreamContext::new(
                self.clone(),
                header,
                checkout.session(),
                (out, numbered),
                max_frame,
                max_answer,
            );
            let context = Arc::new(context.bridged(checkout).answering_as(id));
            context
                .resume_call(first.exchange, first.payload, retry, waiting)
                .await;
            let abandoned = context.clone().run(None, &mut inbound).await;
            return context.release_checkout(!abandoned);
        }
        let capabilities = crate::mcp::bridge::declared_capabilities(&first.payload);
        let (checkout, fresh) = match self.check_out(&header, capabilities).await {
            Ok(checkout) => checkout,
            Err(e) => {
                if let Ok(classified) = crate::mcp::classify(&first.payload) {
                    stream::fail_requests(
                        &out,
                        first.exchange,
                        &classified,
                        e.code(),
                        &e.to_string(),
                    )
                    .await;
                }
                return;
            }
        };
        let session = checkout.session();
        let context = StreamContext::new(
            self.clone(),
            header,
            session.clone(),
            (out.clone(), numbered),
            max_frame,
            max_answer,
        );
        let context = Arc::new(context.bridged(checkout));
        session.set_tasks(|| Arc::new(context.for_session()));
        if fresh && let Err(e) = context.handshake().await {
            tracing::warn!(source = %self.name, error = %e, "bridged upstream session could not be opened");
            if let Ok(classified) = crate::mcp::classify(&first.payload) {
                stream::fail_requests(&out, first.exchange, &classified, e.code(), &e.to_string())
                    .await;
            }
            // The checkout ends the half-open session as it drops.
            return;
        }
        let abandoned = context.clone().run(Some(first), &mut inbound).await;
        context.release_checkout(!abandoned);
    }

    /// The upstream session a stream opened with `header` carries, and whether it resumes
    /// one: a new one (held when the relay named a handle), the one held under the handle,
    /// or, for a handle this `connect` does not hold (it restarted, or another one opened
    /// it), the upstream session the relay's sealed id names. `None` when there is none to
    /// resume.
    fn session_for(self: &Arc<Self>, header: &OpenHeader) -> Option<(Arc<HttpSession>, bool)> {
        let assertion = header.assertion.clone();
        let Some(named) = header
            .session
            .as_ref()
            .filter(|s| header.era == Era::Session && s.handle.len() <= held::MAX_HANDLE_LEN)
        else {
            let session = HttpSession::new(
                None,
                UpstreamState::default(),
                assertion,
                self.replay_bytes.clone(),
            );
            return Some((Arc::new(session), false));
        };
        if named.resume
            && let Some(session) = self.held.attach(&named.handle)
        {
            if let Some(assertion) = assertion {
                *session.assertion.lock() = Some(assertion);
            }
            return Some((session, true));
        }
        if named.resume && self.held.ended(&named.handle) {
            return None;
        }
        let upstream = if named.resume {
            let resumable = named.upstream.as_ref().filter(|r| r.portable)?;
            let header_value = |v: &str| http::HeaderValue::from_str(v).ok();
            UpstreamState {
                id: resumable.upstream_session.as_deref().and_then(header_value),
                version: header.protocol_version.as_deref().and_then(header_value),
            }
        } else {
            UpstreamState::default()
        };
        let session = Arc::new(HttpSession::new(
            Some(named.handle.clone()),
            upstream,
            assertion,
            self.replay_bytes.clone(),
        ));
        self.hold(&named.handle, &session);
        Some((session, named.resume))
    }

    /// Holds `session` under `handle`, ending what it displaces, and starts the sweep of
    /// expired sessions on first use.
    fn hold(self: &Arc<Self>, handle: &str, session: &Arc<HttpSession>) {
        for displaced in self.held.insert(handle, session.clone(), Instant::now()) {
            tokio::spawn(async move { displaced.end(None).await });
        }
        if self.sweeping.set(()).is_ok() {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }
}

/// Ends the held sessions of `source` no stream has carried for its idle time, until the
/// source is gone.
async fn sweep(source: Weak<HttpSource>) {
    let Some(interval) = source
        .upgrade()
        .map(|s| held::sweep_interval(s.held.idle()))
    else {
        return;
    };
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        let Some(source) = source.upgrade() else {
            return;
        };
        for session in source.held.expired(Instant::now()) {
            tracing::debug!(source = %source.name, "upstream session idle past session_idle_secs; ended");
            session.end(None).await;
        }
        for session in source.bridge.expired(Instant::now(), source.held.idle()) {
            tracing::debug!(source = %source.name, "bridged upstream session idle past session_idle_secs; ended");
            session.end(None).await;
        }
    }
}
