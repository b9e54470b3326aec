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

mod answer;
mod client;
mod context;
mod error;
mod legacy;
#[cfg(test)]
mod tests;

pub use client::Target;

use std::sync::{Arc, OnceLock};

use super::Out;
use super::stream::{self, Inbound};
use crate::mcp::jsonrpc::codes;
use crate::transport::{RecvHalf, SendHalf};
use crate::wire::{Era, FrameReader, FrameWriter, OpenHeader};
use client::HttpClient;
use context::StreamContext;

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
        })
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
    pub(crate) async fn serve(
        self: Arc<Self>,
        header: OpenHeader,
        reader: FrameReader<RecvHalf>,
        writer: FrameWriter<SendHalf>,
    ) {
        stream::serve(reader, writer, |inbound, out, max_frame| {
            self.serve_stream(header, inbound, out, max_frame)
        })
        .await;
    }

    async fn serve_stream(
        self: Arc<Self>,
        header: OpenHeader,
        mut inbound: Inbound,
        out: Out,
        max_frame: usize,
    ) {
        match self.legacy_session(header.era).await {
            Ok(Some(opened)) => {
                let name = self.name.as_str().into();
                return legacy::serve(name, self.client.clone(), opened, header, inbound, out)
                    .await;
            }
            Ok(None) => {}
            Err(reason) => {
                // Every request of the first message gets the reason, then the stream ends.
                return inbound
                    .refuse(&out, codes::SOURCE_UNAVAILABLE, &reason)
                    .await;
            }
        }
        let max_answer = self.max_answer.max(max_frame);
        let context = Arc::new(StreamContext::new(self, header, out, max_frame, max_answer));
        context.clone().run(inbound).await;
        context.end_upstream_session().await;
    }
}
