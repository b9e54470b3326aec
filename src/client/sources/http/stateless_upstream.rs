//! Session-era agents of an upstream that speaks only 2026-07-28: the other direction of
//! [`super::bridge`].
//!
//! An agent's `initialize` goes upstream as it is. When the upstream refuses it and answers
//! `server/discover`, the session is bridged: `initialize` is answered from the discover
//! result, and each request of the session goes upstream as a 2026-07-28 request, with what
//! the agent declared in `initialize` (its version, capabilities and client info) in `_meta`
//! and the routing headers that era requires. The upstream has no session to end; the
//! agent's notifications have nowhere to go (2026-07-28 has none from the client), and a
//! `ping` is answered here. The agent's GET stream is fed from `subscriptions/listen`. Each
//! session tries `initialize` first: one agent's refused `initialize` (a version the upstream
//! does not take, say) never decides for another's.
//!
//! What the agent declared lives in this `connect` only, so a bridged session is resumed by
//! this `connect` alone (it reports itself not portable).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::bridge::empty_object;
use super::client::error_chain;
use super::context::{StreamContext, base_headers, insert_assertion};
use super::error::UpstreamError;
use tokio_util::sync::CancellationToken;

use crate::client::sources::routing::{cancelled_request, key};
use crate::mcp::bridge::{self, Declared, InputRequired};
use crate::mcp::era::{
    METHOD_HEADER, NAME_HEADER, STATELESS_SINCE, VERSION_HEADER, encode_header_value, names_target,
};
use crate::mcp::jsonrpc::{MessageInfo, codes, error_body};
use crate::mcp::{Classified, MessageKind};
use crate::wire::{Era, Frame};

/// The id of `connect`'s own `subscriptions/listen`.
const LISTEN_REQUEST_ID: u64 = 1;

/// Rounds of input one call may ask for (the SDKs' own default limit).
const MAX_INPUT_ROUNDS: usize = 10;

/// The id of our own `tools/list` (for the tools' `Mcp-Param-*` annotations).
const OWN_LIST_ID: u64 = 2;

/// Pages of the upstream's tools listed for their annotations, at most.
const MAX_LIST_PAGES: usize = 10;

/// Inputs one round may ask for: each is a request to the agent, waited for.
const MAX_INPUTS_PER_ROUND: usize = 16;

/// The ids of one round's requests to the agent: forgotten when the round is over, answered
/// or not.
struct AskedIds<'a>(
    &'a parking_lot::Mutex<std::collections::HashMap<String, super::session::Answering>>,
    Vec<String>,
);

/// A request's place in [`super::session::HttpSession::cancels`], given up when it ends.
struct CancelOnDrop<'a> {
    cancels: &'a parking_lot::Mutex<std::collections::HashMap<String, CancellationToken>>,
    id: Option<String>,
    token: CancellationToken,
}

impl<'a> CancelOnDrop<'a> {
    fn new(
        cancels: &'a parking_lot::Mutex<std::collections::HashMap<String, CancellationToken>>,
        id: Option<&serde_json::value::RawValue>,
    ) -> Self {
        let token = CancellationToken::new();
        let id = id.map(key);
        if let Some(id) = &id {
            cancels.lock().insert(id.clone(), token.clone());
        }
        Self { cancels, id, token }
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(id) = &self.id {
            self.cancels.lock().remove(id);
        }
    }
}

impl Drop for AskedIds<'_> {
    fn drop(&mut self) {
        let mut asked = self.0.lock();
        for id in &self.1 {
            asked.remove(id);
        }
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
            let mut pending = HashSet::new();
            let result = self
                .post_round(exchange, payload, (None, &[]), &mut pending)
                .await;
            self.fail_pending(exchange, &[], &pending, result).await;
            return self.send(Frame::end(exchange)).await;
        };
        let requests: Vec<&MessageInfo> = classified
            .messages()
            .iter()
            .filter(|m| m.kind == MessageKind::Request)
            .collect();
        // The agent's answers go to the calls that asked; its notifications have no
        // 2026-07-28 counterpart, and are dropped.
        if classified
            .messages()
            .iter()
            .any(|m| m.kind == MessageKind::Response)
        {
            self.deliver_answers(&payload);
        }
        if let Classified::Single(m) = classified
            && m.method.as_deref() == Some("notifications/cancelled")
            && let Some(id) = cancelled_request(&payload)
            && let Some(cancel) = self.session.cancels.lock().remove(&id)
        {
            // 2026-07-28 cancels a request by closing its stream: the call's POST is dropped.
            cancel.cancel();
        }
        let [request] = requests[..] else {
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
        let cancel = CancelOnDrop::new(&self.session.cancels, request.id.as_deref());
        tokio::select! {
            () = self.call_stateless(exchange, payload, request, declared) => {}
            () = cancel.token.cancelled() => {
                tracing::debug!(source = %self.name(), "the agent cancelled its request: dropped upstream");
            }
        }
        self.send(Frame::end(exchange)).await;
    }

    /// Sends one request of the agent upstream, and answers it: each `input_required` round
    /// is asked of the agent and retried (at most [`MAX_INPUT_ROUNDS`]).
    async fn call_stateless(
        &self,
        exchange: u64,
        payload: Bytes,
        request: &MessageInfo,
        declared: &Declared,
    ) {
        let params = self.param_headers(request, &payload, declared).await;
        let mut body = declared.stateless_request(&payload).unwrap_or(payload);
        let ids = || -> HashSet<String> {
            request
                .id
                .as_deref()
                .map(super::answer::id_key)
                .into_iter()
                .collect()
        };
        let mut pending = ids();
        let mut rounds = 0;
        let result = loop {
            let result = self
                .post_round(
                    exchange,
                    body.clone(),
                    (Some(request), &params),
                    &mut pending,
                )
                .await;
            let Some(asked) = self.input_required.lock().remove(&exchange) else {
                break result;
            };
            rounds += 1;
            if rounds > MAX_INPUT_ROUNDS {
                pending = ids();
                break Err(self.upstream_broken(format!(
                    "it asked for input more than {MAX_INPUT_ROUNDS} times in one call"
                )));
            }
            match self.ask_agent(exchange, declared, &asked, &body).await {
                Ok(retry) => {
                    body = retry;
                    pending = ids();
                }
                Err(e) => {
                    pending = ids();
                    break Err(e);
                }
            }
        };
        self.fail_pending(exchange, &[request], &pending, result)
            .await;
    }

    /// Asks the agent what the upstream's `input_required` answer (`asked`) embeds, as requests
    /// on the exchange's stream, and waits for its answers (at most [`bridge::INPUT_WAIT`]):
    /// the retry of `request` that carries them.
    async fn ask_agent(
        &self,
        exchange: u64,
        declared: &Declared,
        asked: &[u8],
        request: &Bytes,
    ) -> Result<Bytes, UpstreamError> {
        let input = InputRequired::parse(asked).ok_or_else(|| {
            self.upstream_broken("an input_required answer that cannot be read".into())
        })?;
        if input.requests.len() > MAX_INPUTS_PER_ROUND {
            return Err(self.upstream_broken(format!(
                "it asked for {} inputs at once (at most {MAX_INPUTS_PER_ROUND})",
                input.requests.len()
            )));
        }
        if let Some((_, method, _)) = input.requests.iter().find(|(_, method, _)| {
            bridge::input_capability(method).is_none_or(|capability| !declared.declares(capability))
        }) {
            return Err(self.upstream_broken(format!(
                "it asked the client for {method}, which the client did not declare"
            )));
        }
        let mut waiting = Vec::with_capacity(input.requests.len());
        let mut asked_ids = AskedIds(&self.session.asked, Vec::new());
        for (key, method, params) in &input.requests {
            let id = self.session.next_asked_id();
            let (answer, answered) = tokio::sync::oneshot::channel();
            let id_key = serde_json::Value::from(id.as_str()).to_string();
            self.session.asked.lock().insert(id_key.clone(), answer);
            asked_ids.1.push(id_key);
            let message = bridge::server_request(&id, method, params.as_deref());
            self.send(Frame::message(exchange, message)).await;
            waiting.push((key, answered));
        }
        let deadline = tokio::time::Instant::now() + bridge::INPUT_WAIT;
        let mut responses = serde_json::Map::new();
        for (key, answered) in waiting {
            match tokio::time::timeout_at(deadline, answered).await {
                Ok(Ok(Ok(result))) => {
                    responses.insert(key.clone(), result);
                }
                Ok(Ok(Err(error))) => {
                    return Err(
                        self.upstream_broken(format!("the client refused its input: {error}"))
                    );
                }
                Ok(Err(_)) => return Err(self.upstream_broken("the session ended".into())),
                Err(_) => {
                    return Err(self.upstream_broken(format!(
                        "the client did not answer within {} s",
                        bridge::INPUT_WAIT.as_secs()
                    )));
                }
            }
        }
        bridge::retry_request(request, responses, input.state.as_deref())
            .ok_or_else(|| self.upstream_broken("the request could not be retried".into()))
    }

    /// Hands the agent's answers in `message` to the calls waiting for them.
    fn deliver_answers(&self, message: &[u8]) {
        for (id, answer) in bridge::agent_answers(message) {
            if let Some(waiting) = self.session.asked.lock().remove(&id) {
                let _ = waiting.send(answer);
            }
        }
    }

    /// POSTs a 2026-07-28 request and relays the answer (an `input_required` one is held back:
    /// see [`StreamContext::send`]).
    async fn post_round(
        &self,
        exchange: u64,
        body: Bytes,
        (request, params): (Option<&MessageInfo>, &[(String, String)]),
        pending: &mut HashSet<String>,
    ) -> Result<(), UpstreamError> {
        let mut headers = self.stateless_headers(
            request.and_then(|r| r.method.as_deref()),
            request.and_then(|r| r.target.as_deref()),
        );
        for (name, value) in params {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.insert(name, value);
            }
        }
        match self
            .source
            .client
            .send(Method::POST, &self.source.target, headers, body.clone())
            .await
        {
            Ok(response) => self
                .relay_answer(exchange, response, (false, &body), pending)
                .await
                .map(|_| ()),
            Err(e) => Err(UpstreamError::Unreachable {
                source_name: self.name().to_owned(),
                reason: error_chain(&e),
            }),
        }
    }

    /// The `Mcp-Param-*` headers of a `tools/call` (`payload`) of the agent: its arguments that
    /// the tool's schema marks with `x-mcp-header`. The upstream's tools are listed once per
    /// session (at most [`MAX_LIST_PAGES`] pages), on its first call.
    async fn param_headers(
        &self,
        request: &MessageInfo,
        payload: &[u8],
        declared: &Declared,
    ) -> Vec<(String, String)> {
        if request.method.as_deref() != Some("tools/call") {
            return Vec::new();
        }
        let Some(tool) = request.target.as_deref() else {
            return Vec::new();
        };
        let annotations = {
            let mut known = self.session.param_annotations.lock().await;
            match &*known {
                Some(known) => known.clone(),
                None => known
                    .insert(Arc::new(self.list_annotations(declared).await))
                    .clone(),
            }
        };
        let Some(marked) = annotations.get(tool) else {
            return Vec::new();
        };
        let arguments = serde_json::from_slice::<serde_json::Value>(payload)
            .map(|v| v["params"]["arguments"].clone())
            .unwrap_or_default();
        bridge::param_headers(marked, &arguments)
    }

    /// Lists the upstream's tools (our own `tools/list`, as the agent would) for their
    /// `x-mcp-header` annotations; what could not be listed marks nothing.
    async fn list_annotations(
        &self,
        declared: &Declared,
    ) -> HashMap<String, bridge::ParamAnnotations> {
        let mut all = HashMap::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let mut params = serde_json::json!({});
            if let Some(cursor) = &cursor {
                params["cursor"] = cursor.clone().into();
            }
            let list = serde_json::json!({"jsonrpc": "2.0", "id": OWN_LIST_ID, "method": "tools/list", "params": params});
            let Some(body) = declared.stateless_request(list.to_string().as_bytes()) else {
                break;
            };
            let headers = self.stateless_headers(Some("tools/list"), None);
            let answer = match self
                .source
                .client
                .send(Method::POST, &self.source.target, headers, body)
                .await
            {
                Ok(response) => super::bridge::read_answer(self.name(), response).await,
                Err(e) => Err(self.upstream_broken(error_chain(&e))),
            };
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::debug!(source = %self.name(), error = %e, "tools/list for Mcp-Param headers failed");
                    break;
                }
            };
            let (tools, next) = bridge::listed_annotations(&answer);
            all.extend(tools);
            cursor = next;
            if cursor.is_none() {
                break;
            }
        }
        all
    }

    fn upstream_broken(&self, reason: String) -> UpstreamError {
        UpstreamError::Broken {
            source_name: self.name().to_owned(),
            reason,
        }
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
        let named = method.is_some_and(names_target);
        if let Some(target) = target.filter(|_| named)
            && let Ok(value) = HeaderValue::from_str(&encode_header_value(target))
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
