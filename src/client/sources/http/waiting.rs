//! Bridged calls waiting for their agents' input: a session-era upstream asked its client
//! something in mid-call (`elicitation/create`, `sampling/createMessage`, `roots/list`), and the
//! stateless agent, which has no stream for a request, got an `input_required` answer instead
//! (see [`super::bridge`]). The call keeps its session and the upstream's open answer until the
//! agent's retry carries the answers upstream, and then goes on under the retry's id.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use serde_json::value::RawValue;

use super::HttpSource;
use super::answer::{EventBody, SseEnd};
use super::bridge::{Checkout, empty_object, read_answer};
use super::client::error_chain;
use super::context::StreamContext;
use super::error::UpstreamError;
use crate::mcp::MessageKind;
use crate::mcp::bridge::{self, ServerRequest, input_capability};
use crate::mcp::era::{SESSION_HEADER, VERSION_HEADER};
use crate::mcp::jsonrpc::{codes, error_body};
use crate::wire::Frame;

/// Calls one source keeps waiting for their agents' input at once (see [`Parked`]): each
/// holds a bridged session (a quarter of [`super::bridge::MAX_SESSIONS`] at most, so waiting calls never
/// take the pool) and the upstream's open answer. A waiting session is not busy: it counts
/// here, not against [`super::bridge::MAX_BUSY_PER_CALLER`].
pub(super) const MAX_PARKED: usize = super::bridge::MAX_SESSIONS / 4;

/// Calls one caller keeps waiting at once: an agent that never answers cannot hold more.
pub(super) const MAX_PARKED_PER_CALLER: usize = 8;

/// The id of the single request in `payload`, when it is one a server may answer
/// `input_required` (see [`crate::mcp::era::names_target`]).
pub(super) fn interactive_request(payload: &[u8]) -> Option<Box<RawValue>> {
    match crate::mcp::classify(payload).ok()? {
        crate::mcp::Classified::Single(m)
            if m.kind == MessageKind::Request
                && m.method
                    .as_deref()
                    .is_some_and(crate::mcp::era::names_target) =>
        {
            m.id
        }
        _ => None,
    }
}

/// A bridged call whose upstream asked its client something (elicitation, sampling, roots):
/// the agent got an `input_required` answer, and its retry carries the answers. Meanwhile the
/// call keeps its session and the upstream's open answer, for at most [`bridge::INPUT_WAIT`];
/// then the session is ended (`DELETE`), which ends the upstream's request with it.
pub(super) struct Parked {
    /// The caller whose call it is: only its retry goes on with it.
    subject: String,
    checkout: Checkout,
    waiting: Waiting,
}

/// What a parked call goes on from.
pub(super) struct Waiting {
    /// The rest of the upstream's answer.
    body: Box<EventBody>,
    /// The id the upstream answers (the first attempt's), as a key.
    pending: HashSet<String>,
    /// What the upstream asked: each request's key in the `input_required` answer, and its id.
    asked: Vec<(String, Box<RawValue>)>,
}

impl Parked {
    /// The session the call holds, and where the call stands.
    pub(super) fn split(self) -> (Checkout, Waiting) {
        (self.checkout, self.waiting)
    }
}

/// The calls of a source waiting for input, by handle (the `requestState` `connect` gives).
#[derive(Default)]
pub(super) struct ParkedCalls {
    calls: HashMap<String, Box<Parked>>,
    per_caller: HashMap<String, usize>,
}

impl ParkedCalls {
    pub(super) fn insert(
        &mut self,
        handle: String,
        parked: Box<Parked>,
    ) -> Result<(), Box<Parked>> {
        let mine = self.per_caller.get(&parked.subject).copied().unwrap_or(0);
        if self.calls.len() >= MAX_PARKED || mine >= MAX_PARKED_PER_CALLER {
            return Err(parked);
        }
        *self.per_caller.entry(parked.subject.clone()).or_default() += 1;
        self.calls.insert(handle, parked);
        Ok(())
    }

    pub(super) fn take(&mut self, handle: &str, subject: Option<&str>) -> Option<Box<Parked>> {
        if subject.is_some_and(|s| self.calls.get(handle).is_some_and(|p| p.subject != s)) {
            return None;
        }
        let parked = self.calls.remove(handle)?;
        if let Some(count) = self.per_caller.get_mut(&parked.subject) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_caller.remove(&parked.subject);
            }
        }
        Some(parked)
    }
}

impl HttpSource {
    /// Takes the call waiting under `handle` for `subject`'s retry (see [`Parked`]); `None`
    /// when there is none (it expired, was answered, or is another caller's).
    pub(super) fn unpark(&self, handle: &str, subject: &str) -> Option<Box<Parked>> {
        self.bridge.parked.lock().take(handle, Some(subject))
    }
}

impl StreamContext {
    /// The upstream asked its client something in mid-call (`message`, a whole request; the
    /// rest of the answer in `body`): a ping is answered here; an elicitation, sampling or
    /// roots request the agent's request declares it can answer parks the call (see
    /// [`Parked`]) and answers the agent `input_required`; anything else gets an error. The
    /// answer then goes on, until the call is answered or parked.
    pub(super) async fn asked(
        &self,
        exchange: u64,
        payload: &Bytes,
        (mut message, mut body): (Bytes, Box<EventBody>),
        pending: &mut HashSet<String>,
    ) -> Result<(), UpstreamError> {
        // Only a call that may be answered `input_required` waits (the relay seals the state of
        // those answers, and checks their retries).
        let waits = interactive_request(payload).is_some();
        loop {
            let Some(request) = ServerRequest::parse(&message) else {
                return Err(self.broken("it sent a request that is not JSON-RPC".into()));
            };
            let reply = match (request.method.as_str(), input_capability(&request.method)) {
                ("ping", _) => bridge::response(&request.id, &empty_object()),
                (_, Some(capability))
                    if waits && bridge::declares_capability(payload, capability) =>
                {
                    match self.park(exchange, payload, request, body, pending).await {
                        Ok(()) => return Ok(()),
                        Err((id, rest, why)) => {
                            body = rest;
                            error_body(Some(&id), codes::INTERNAL_ERROR, &why)
                        }
                    }
                }
                (method, _) => error_body(
                    Some(&request.id),
                    codes::METHOD_NOT_FOUND,
                    &format!("the client does not support {method}"),
                ),
            };
            self.reply_upstream(reply).await?;
            match self.follow_sse(exchange, body, pending).await? {
                SseEnd::Answered => return Ok(()),
                SseEnd::Asked(next, rest) => (message, body) = (next, rest),
            }
        }
    }

    /// Parks the call (see [`Parked`]) and answers the agent `input_required` with `request`.
    /// On failure (no room, or no session to keep), the request's id, the rest of the answer
    /// and why.
    async fn park(
        &self,
        exchange: u64,
        payload: &Bytes,
        request: ServerRequest,
        body: Box<EventBody>,
        pending: &mut HashSet<String>,
    ) -> Result<(), (Box<RawValue>, Box<EventBody>, String)> {
        let agent_id = interactive_request(payload);
        let (Some(agent_id), Some(mut checkout)) = (agent_id, self.checkout.lock().take()) else {
            return Err((
                request.id,
                body,
                "the call cannot wait for its agent".into(),
            ));
        };
        let key = request.id.get().trim().trim_matches('"').to_owned();
        checkout.park();
        let parked = Box::new(Parked {
            subject: self.header.subject.clone(),
            checkout,
            waiting: Waiting {
                body,
                pending: std::mem::take(pending),
                asked: vec![(key.clone(), request.id.clone())],
            },
        });
        let handle = crate::client::sources::waiting_handle();
        if let Err(parked) = self
            .source
            .bridge
            .parked
            .lock()
            .insert(handle.clone(), parked)
        {
            let (mut checkout, waiting) = (*parked).split();
            checkout.unpark();
            *self.checkout.lock() = Some(checkout);
            *pending = waiting.pending;
            let why = format!(
                "too many calls wait for their agents' input ({MAX_PARKED} per source, \
                 {MAX_PARKED_PER_CALLER} per caller)"
            );
            return Err((request.id, waiting.body, why));
        }
        let source = Arc::downgrade(&self.source);
        let expiring = handle.clone();
        tokio::spawn(async move {
            tokio::time::sleep(bridge::INPUT_WAIT).await;
            let expired = source
                .upgrade()
                .and_then(|s| s.bridge.parked.lock().take(&expiring, None));
            if expired.is_some() {
                tracing::info!(
                    "a call waited {} s for its agent's input: ended",
                    bridge::INPUT_WAIT.as_secs()
                );
            }
        });
        tracing::debug!(source = %self.name(), method = %request.method, "upstream asked its client in mid-call: input_required");
        let answer = bridge::input_required(&agent_id, &[(key, &request)], &handle);
        self.send(Frame::message(exchange, answer)).await;
        Ok(())
    }

    /// Goes on with a parked call on the stream of its agent's retry (`payload`, whose answers
    /// are `retry`'s): each answer goes upstream as the response to what it answers (an
    /// error where the retry has none), then the rest of the upstream's answer follows, under
    /// the retry's id (see [`StreamContext::answering_as`]).
    pub(super) async fn resume_call(
        &self,
        exchange: u64,
        payload: Bytes,
        retry: bridge::Retry,
        waiting: Waiting,
    ) {
        let Waiting {
            body,
            mut pending,
            asked,
        } = waiting;
        let result = async {
            for (key, id) in &asked {
                let reply = match retry.responses.get(key) {
                    Some(result) => bridge::response(id, result),
                    None => error_body(
                        Some(id),
                        codes::INVALID_PARAMS,
                        "the client's retry carried no answer to this request",
                    ),
                };
                self.reply_upstream(reply).await?;
            }
            match self.follow_sse(exchange, body, &mut pending).await? {
                SseEnd::Answered => Ok(()),
                SseEnd::Asked(next, rest) => {
                    self.asked(exchange, &payload, (next, rest), &mut pending)
                        .await
                }
            }
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(source = %self.name(), error = %error, "retried call failed");
            if !pending.is_empty() && !matches!(error, UpstreamError::BrokeOff { .. }) {
                let id = self.reanswer.as_deref();
                let body = error_body(id, error.code(), &error.to_string());
                self.send(Frame::message(exchange, body)).await;
            }
        }
        self.send(Frame::end(exchange)).await;
    }

    /// POSTs our client's answer to a request of the upstream (its session's headers, no
    /// routing headers: a response has no method).
    async fn reply_upstream(&self, reply: Bytes) -> Result<(), UpstreamError> {
        let mut headers = self.headers(false);
        let routing: Vec<_> = headers
            .keys()
            .filter(|name| {
                let name = name.as_str();
                name.starts_with("mcp-") && name != SESSION_HEADER && name != VERSION_HEADER
            })
            .cloned()
            .collect();
        for name in routing {
            headers.remove(name);
        }
        let response = self
            .source
            .client
            .send(Method::POST, &self.source.target, headers, reply)
            .await
            .map_err(|e| UpstreamError::Unreachable {
                source_name: self.name().to_owned(),
                reason: error_chain(&e),
            })?;
        let status = response.status();
        // Read the (empty) body through, so the connection is reused.
        let _ = read_answer(self.name(), response).await;
        if !status.is_success() {
            return Err(self.broken(format!("HTTP {status} to our answer to its request")));
        }
        Ok(())
    }

    fn broken(&self, reason: String) -> UpstreamError {
        UpstreamError::Broken {
            source_name: self.name().to_owned(),
            reason,
        }
    }
}
