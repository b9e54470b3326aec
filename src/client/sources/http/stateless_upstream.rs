//! Session-era agents of an upstream that speaks only 2026-07-28: the other direction of
//! [`super::bridge`].
//!
//! An agent's `initialize` goes upstream as it is. When the upstream refuses it and answers
//! `server/discover`, the session is bridged: `initialize` is answered from the discover
//! result, and each request of the session goes upstream as a 2026-07-28 request, with what
//! the agent declared in `initialize` (its version, capabilities and client info) in `_meta`
//! and the routing headers that era requires. The upstream has no session to end; the
//! agent's notifications have nowhere to go (2026-07-28 has none from the client), and a
//! `ping` is answered here. The agent's GET stream is fed from `subscriptions/listen`. What
//! was learned holds for the source for [`ERA_TTL`]: the next sessions skip the refused
//! `initialize`.
//!
//! What the agent declared lives in this `connect` only, so a bridged session is resumed by
//! this `connect` alone (it reports itself not portable).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::Method;
use http::header::{HeaderMap, HeaderValue};

use super::HttpSource;
use super::bridge::{ERA_TTL, empty_object};
use super::client::error_chain;
use super::context::{StreamContext, base_headers, insert_assertion};
use super::error::UpstreamError;
use crate::mcp::bridge::{self, Declared};
use crate::mcp::era::{METHOD_HEADER, NAME_HEADER, STATELESS_SINCE, VERSION_HEADER};
use crate::mcp::jsonrpc::{MessageInfo, codes, error_body};
use crate::mcp::{Classified, MessageKind};
use crate::wire::{Era, Frame};

/// The id of `connect`'s own `subscriptions/listen`.
const LISTEN_REQUEST_ID: u64 = 1;

impl HttpSource {
    /// Whether the upstream refused a session-era `initialize` within [`ERA_TTL`], while it
    /// answers `server/discover`.
    pub(super) fn refuses_session_era(&self) -> bool {
        self.bridge
            .session_refused
            .lock()
            .is_some_and(|at| at.elapsed() < ERA_TTL)
    }
}

impl StreamContext {
    /// Bridges this session to the upstream, when it speaks 2026-07-28 (it answers
    /// `server/discover`): the answer to the agent's `initialize` (`sent`), made from the
    /// discover result. `None` when the upstream does not, or `sent` is no `initialize`.
    pub(super) async fn bridge_to_stateless(&self, sent: &Bytes) -> Option<Bytes> {
        if self.header.era != Era::Session || self.is_bridged() {
            return None;
        }
        let discovered = self.source.probed(&self.header).await?.discovered?;
        let declared = Declared::parse(sent)?;
        let id = crate::mcp::classify(sent)
            .ok()?
            .messages()
            .first()?
            .id
            .clone()?;
        *self.source.bridge.session_refused.lock() = Some(Instant::now());
        let answer = discovered.initialize_answer(&id, &declared.version);
        *self.session.declared.lock() = Some(Arc::new(declared));
        tracing::info!(source = %self.name(), "upstream speaks only 2026-07-28: session-era agents are bridged to it");
        Some(answer)
    }

    /// Serves one message of a session bridged to a 2026-07-28 upstream (see the module
    /// docs), then ends its exchange.
    pub(super) async fn exchange_stateless(
        &self,
        exchange: u64,
        payload: Bytes,
        classified: Option<&Classified>,
        declared: &Declared,
    ) {
        let Some(classified) = classified else {
            // Not JSON-RPC: the upstream says what is wrong with it.
            return self.post_stateless(exchange, payload, None).await;
        };
        let requests: Vec<&MessageInfo> = classified
            .messages()
            .iter()
            .filter(|m| m.kind == MessageKind::Request)
            .collect();
        let [request] = requests[..] else {
            // Notifications and responses have no 2026-07-28 counterpart: dropped.
            for request in &requests {
                let reason = "a batch of requests cannot go to a 2026-07-28 upstream";
                let body = error_body(request.id.as_deref(), codes::INVALID_REQUEST, reason);
                self.send(Frame::message(exchange, body)).await;
            }
            return self.send(Frame::end(exchange)).await;
        };
        let local = match request.method.as_deref() {
            Some("ping") => request
                .id
                .as_deref()
                .map(|id| bridge::response(id, &empty_object())),
            Some(method @ ("resources/subscribe" | "resources/unsubscribe")) => Some(error_body(
                request.id.as_deref(),
                codes::METHOD_NOT_FOUND,
                &format!("{method} does not cross to a 2026-07-28 upstream"),
            )),
            _ => None,
        };
        if let Some(answer) = local {
            self.send(Frame::message(exchange, answer)).await;
            return self.send(Frame::end(exchange)).await;
        }
        let Some(body) = declared.stateless_request(&payload) else {
            return self.post_stateless(exchange, payload, Some(request)).await;
        };
        self.post_stateless(exchange, body, Some(request)).await
    }

    /// POSTs a 2026-07-28 request and relays the answer, then ends the exchange.
    async fn post_stateless(&self, exchange: u64, body: Bytes, request: Option<&MessageInfo>) {
        let headers = self.stateless_headers(
            request.and_then(|r| r.method.as_deref()),
            request.and_then(|r| r.target.as_deref()),
        );
        let mut pending: HashSet<String> = request
            .and_then(|r| r.id.as_deref())
            .map(super::answer::id_key)
            .into_iter()
            .collect();
        let result = match self
            .source
            .client
            .send(Method::POST, &self.source.target, headers, body.clone())
            .await
        {
            Ok(response) => self
                .relay_answer(exchange, response, (false, &body), &mut pending)
                .await
                .map(|_| ()),
            Err(e) => Err(UpstreamError::Unreachable {
                source_name: self.name().to_owned(),
                reason: error_chain(&e),
            }),
        };
        let requests: Vec<&MessageInfo> = request.into_iter().collect();
        self.fail_pending(exchange, &requests, &pending, result)
            .await;
        self.send(Frame::end(exchange)).await;
    }

    /// The headers of a 2026-07-28 request of `method` naming `target` (a tool, prompt or
    /// resource): the version, `Mcp-Method`, `Mcp-Name`, and the caller's assertion.
    pub(super) fn stateless_headers(
        &self,
        method: Option<&str>,
        target: Option<&str>,
    ) -> HeaderMap {
        let mut headers = base_headers();
        headers.insert(VERSION_HEADER, HeaderValue::from_static(STATELESS_SINCE));
        if let Some(method) = method.and_then(|m| HeaderValue::from_str(m).ok()) {
            headers.insert(METHOD_HEADER, method);
        }
        let named = matches!(
            method,
            Some("tools/call" | "prompts/get" | "resources/read")
        );
        if let Some(target) = target.filter(|_| named)
            && let Ok(value) = HeaderValue::from_str(&bridge::header_value(target))
        {
            headers.insert(NAME_HEADER, value);
        }
        let assertion = self.session.assertion.lock().clone();
        insert_assertion(&mut headers, assertion.as_ref());
        headers
    }

    /// The agent's GET stream from a 2026-07-28 upstream: its `subscriptions/listen`.
    pub(super) async fn listen_request(
        &self,
        declared: &Declared,
    ) -> Result<super::client::Response, String> {
        let headers = self.stateless_headers(Some("subscriptions/listen"), None);
        self.source
            .client
            .send(
                Method::POST,
                &self.source.target,
                headers,
                declared.listen_request(LISTEN_REQUEST_ID),
            )
            .await
            .map_err(|e| error_chain(&e))
    }
}
