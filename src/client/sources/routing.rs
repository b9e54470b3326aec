//! Routing a message-based upstream's answers back to their exchanges.
//!
//! Over stdio and the HTTP+SSE transport the upstream's messages arrive on one channel, not on
//! the response of the request they answer. [`Routing`] remembers which exchange each pending
//! request (and its progress token) came from, so every answer goes back to the right agent
//! request, and knows when an exchange is complete.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::mcp::Classified;
use crate::mcp::jsonrpc::{MessageInfo, MessageKind};
use crate::wire::UNSOLICITED;

/// A JSON-RPC id or progress token as a comparable key (`"a"` and `"\u0061"` are equal).
pub(crate) fn key(raw: &RawValue) -> String {
    serde_json::from_str::<serde_json::Value>(raw.get())
        .map(|value| value.to_string())
        .unwrap_or_else(|_| raw.get().to_owned())
}

/// The shape of a message, as far as ids and progress tokens go.
#[derive(Deserialize)]
pub(super) struct Probe<'a> {
    /// The message id.
    #[serde(borrow, default)]
    pub id: Option<&'a RawValue>,
    /// Its params.
    #[serde(borrow, default)]
    pub params: Option<ProbeParams<'a>>,
}

/// The params a [`Probe`] reads.
#[derive(Deserialize)]
pub(super) struct ProbeParams<'a> {
    /// `progressToken` (of a progress notification).
    #[serde(rename = "progressToken", borrow, default)]
    pub progress_token: Option<&'a RawValue>,
    /// `_meta`.
    #[serde(rename = "_meta", borrow, default)]
    pub meta: Option<ProbeMeta<'a>>,
    /// `requestId` (of a cancellation).
    #[serde(rename = "requestId", borrow, default)]
    pub request_id: Option<&'a RawValue>,
}

/// The `_meta` a [`Probe`] reads.
#[derive(Deserialize)]
pub(super) struct ProbeMeta<'a> {
    /// `_meta.progressToken` (of a request).
    #[serde(rename = "progressToken", borrow, default)]
    pub progress_token: Option<&'a RawValue>,
}

/// The messages of a body, as raw JSON texts (one, or each of a batch).
fn raw_messages(body: &[u8]) -> Vec<&RawValue> {
    let Ok(raw) = serde_json::from_slice::<&RawValue>(body) else {
        return Vec::new();
    };
    if raw.get().starts_with('[') {
        serde_json::from_str(raw.get()).unwrap_or_default()
    } else {
        vec![raw]
    }
}

/// For each request of `body` with a `params._meta.progressToken`: (id key, token key).
pub(super) fn progress_tokens(body: &[u8]) -> Vec<(String, String)> {
    if !contains(body, b"progressToken") {
        return Vec::new();
    }
    raw_messages(body)
        .into_iter()
        .filter_map(|raw| serde_json::from_str::<Probe<'_>>(raw.get()).ok())
        .filter_map(|probe| {
            let token = probe.params?.meta?.progress_token?;
            Some((key(probe.id?), key(token)))
        })
        .collect()
}

/// The progress token a notification carries (`params.progressToken`, or in `_meta`).
fn notification_token(raw: &RawValue) -> Option<String> {
    if !raw.get().contains("progressToken") {
        return None;
    }
    let params = serde_json::from_str::<Probe<'_>>(raw.get()).ok()?.params?;
    params
        .progress_token
        .or(params.meta.and_then(|meta| meta.progress_token))
        .map(key)
}

/// `params.requestId` of a `notifications/cancelled`, as a key.
pub(crate) fn cancelled_request(body: &[u8]) -> Option<String> {
    let probe = serde_json::from_slice::<Probe<'_>>(body).ok()?;
    probe.params?.request_id.map(key)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A request of the session forwarded to its process.
struct PendingRequest {
    exchange: u64,
    id: Box<RawValue>,
    token: Option<String>,
}

/// Where a session's answers go: the exchange of each pending request.
#[derive(Default)]
pub(super) struct Routing {
    /// Pending requests by id key.
    requests: HashMap<String, PendingRequest>,
    /// Exchanges with pending requests: how many, and whether one is `initialize`.
    exchanges: HashMap<u64, (usize, bool)>,
    /// Progress tokens of pending requests, to their exchange.
    tokens: HashMap<String, u64>,
}

impl Routing {
    /// Requests in flight.
    pub(super) fn pending(&self) -> usize {
        self.requests.len()
    }

    /// Records the requests of one message; refuses a message reusing a pending id.
    pub(super) fn record(
        &mut self,
        exchange: u64,
        requests: &[&MessageInfo],
        tokens: &[(String, String)],
    ) -> Result<(), String> {
        let mut seen = HashSet::new();
        for request in requests {
            let Some(id) = request.id.as_deref() else {
                continue;
            };
            let id_key = key(id);
            if self.requests.contains_key(&id_key) || !seen.insert(id_key) {
                return Err(id.get().to_owned());
            }
        }
        let is_initialize = requests
            .iter()
            .any(|r| r.method.as_deref() == Some("initialize"));
        for request in requests {
            let Some(id) = request.id.as_deref() else {
                continue;
            };
            let id_key = key(id);
            let token = tokens
                .iter()
                .find(|(id, _)| *id == id_key)
                .map(|(_, token)| token.clone());
            if let Some(token) = &token {
                self.tokens.insert(token.clone(), exchange);
            }
            self.requests.insert(
                id_key,
                PendingRequest {
                    exchange,
                    id: id.to_owned(),
                    token,
                },
            );
            let entry = self.exchanges.entry(exchange).or_insert((0, false));
            entry.0 += 1;
            entry.1 |= is_initialize;
        }
        Ok(())
    }

    /// The exchange a line from the child belongs to, and the exchanges it completes.
    ///
    /// A response goes to the exchange of its request. A progress notification goes to the
    /// exchange of the request whose token it carries. Any other message from the server (a
    /// request such as sampling, a log notification) goes to the only request in flight when
    /// there is exactly one, as a Streamable HTTP server would send it on that request's
    /// stream (stdio carries no "related request" of its own; within one session every
    /// stream reaches the same agent); else, and never during `initialize`, to the agent's
    /// standalone stream.
    pub(super) fn target(&mut self, classified: &Classified, raw: &RawValue) -> (u64, Vec<u64>) {
        let mut target = None;
        let mut ended = Vec::new();
        for message in classified.messages() {
            if message.kind != MessageKind::Response {
                continue;
            }
            let Some(pending) = message
                .id
                .as_deref()
                .and_then(|id| self.requests.remove(&key(id)))
            else {
                continue;
            };
            if let Some(token) = &pending.token {
                self.tokens.remove(token);
            }
            target.get_or_insert(pending.exchange);
            if let Some(entry) = self.exchanges.get_mut(&pending.exchange) {
                entry.0 = entry.0.saturating_sub(1);
                if entry.0 == 0 {
                    self.exchanges.remove(&pending.exchange);
                    ended.push(pending.exchange);
                }
            }
        }
        if let Some(exchange) = target {
            return (exchange, ended);
        }
        if let Classified::Single(message) = classified
            && message.kind == MessageKind::Notification
            && let Some(exchange) = notification_token(raw).and_then(|t| self.tokens.get(&t))
        {
            return (*exchange, ended);
        }
        let mut in_flight = self.exchanges.iter();
        match (in_flight.next(), in_flight.next()) {
            (Some((exchange, (_, false))), None) => (*exchange, ended),
            _ => (UNSOLICITED, ended),
        }
    }

    /// Forgets the pending requests of `exchange` (their message never reached the upstream)
    /// and returns their ids.
    pub(super) fn forget(&mut self, exchange: u64) -> Vec<Box<RawValue>> {
        let ids: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, p)| p.exchange == exchange)
            .map(|(k, _)| k.clone())
            .collect();
        self.exchanges.remove(&exchange);
        ids.into_iter()
            .filter_map(|k| self.requests.remove(&k))
            .map(|pending| {
                if let Some(token) = &pending.token {
                    self.tokens.remove(token);
                }
                pending.id
            })
            .collect()
    }

    /// Forgets the pending request whose id key is `id` (the agent cancelled it: the server
    /// sends no answer); returns its exchange and whether that exchange has nothing pending
    /// any more.
    pub(super) fn cancel(&mut self, id: &str) -> Option<(u64, bool)> {
        let pending = self.requests.remove(id)?;
        if let Some(token) = &pending.token {
            self.tokens.remove(token);
        }
        let ended = match self.exchanges.get_mut(&pending.exchange) {
            Some(entry) => {
                entry.0 = entry.0.saturating_sub(1);
                entry.0 == 0
            }
            None => true,
        };
        if ended {
            self.exchanges.remove(&pending.exchange);
        }
        Some((pending.exchange, ended))
    }

    /// Takes every pending request, grouped by exchange (the process is gone).
    pub(super) fn take_all(&mut self) -> Vec<(u64, Vec<Box<RawValue>>)> {
        let mut by_exchange: BTreeMap<u64, Vec<Box<RawValue>>> = BTreeMap::new();
        for (_, pending) in self.requests.drain() {
            by_exchange
                .entry(pending.exchange)
                .or_default()
                .push(pending.id);
        }
        self.exchanges.clear();
        self.tokens.clear();
        by_exchange.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::classify;

    fn requests(classified: &Classified) -> impl Iterator<Item = &MessageInfo> {
        classified
            .messages()
            .iter()
            .filter(|m| m.kind == MessageKind::Request)
    }

    #[test]
    fn a_cancelled_request_leaves_its_exchange_ended_once_nothing_else_is_pending() {
        let mut routing = Routing::default();
        let batch =
            br#"[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","id":2,"method":"b"}]"#;
        let classified = classify(batch).expect("batch");
        let asked: Vec<&MessageInfo> = requests(&classified).collect();
        routing.record(5, &asked, &[]).expect("fresh ids");
        let cancel =
            br#"{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}"#;
        let id = cancelled_request(cancel).expect("a request id");
        assert_eq!(
            routing.cancel(&id),
            Some((5, false)),
            "the other is pending"
        );
        assert_eq!(routing.cancel(&id), None, "once");
        assert_eq!(
            routing.cancel(&key(&RawValue::from_string("2".into()).expect("json"))),
            Some((5, true))
        );
        assert_eq!(routing.pending(), 0);
    }

    #[test]
    fn session_routing_follows_ids_tokens_and_batches() {
        let mut routing = Routing::default();
        let route = |routing: &mut Routing, text: &str| {
            let raw: &RawValue = serde_json::from_str(text).expect("json");
            let classified = classify(text.as_bytes()).expect("json-rpc");
            routing.target(&classified, raw)
        };
        let batch = br#"[{"jsonrpc":"2.0","id":1,"method":"a","params":{"_meta":{"progressToken":"t"}}},{"jsonrpc":"2.0","id":"2","method":"b"}]"#;
        let classified = classify(batch).expect("batch");
        let batch_requests: Vec<&MessageInfo> = requests(&classified).collect();
        routing
            .record(5, &batch_requests, &progress_tokens(batch))
            .expect("fresh ids");
        assert_eq!(
            routing.record(6, &batch_requests, &[]),
            Err("1".to_owned()),
            "a pending id is not reused"
        );
        let progress = r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":"t","progress":1}}"#;
        assert_eq!(route(&mut routing, progress), (5, vec![]));
        assert_eq!(
            route(&mut routing, r#"{"jsonrpc":"2.0","id":1,"result":{}}"#),
            (5, vec![])
        );
        assert_eq!(
            route(
                &mut routing,
                r#"{"jsonrpc":"2.0","method":"notifications/message"}"#
            ),
            (5, vec![]),
            "the only request in flight gets the server's other messages"
        );
        assert_eq!(
            route(&mut routing, r#"{"jsonrpc":"2.0","id":"2","result":{}}"#),
            (5, vec![5]),
            "the last answer ends the exchange"
        );
        assert_eq!(
            route(
                &mut routing,
                r#"{"jsonrpc":"2.0","method":"notifications/message"}"#
            ),
            (UNSOLICITED, vec![])
        );
        assert_eq!(
            route(&mut routing, r#"{"jsonrpc":"2.0","id":99,"result":{}}"#),
            (UNSOLICITED, vec![])
        );

        let init = br#"{"jsonrpc":"2.0","id":0,"method":"initialize"}"#;
        let classified = classify(init).expect("init");
        let init_requests: Vec<&MessageInfo> = requests(&classified).collect();
        routing.record(1, &init_requests, &[]).expect("fresh");
        assert_eq!(
            route(
                &mut routing,
                r#"{"jsonrpc":"2.0","method":"notifications/tools/list_changed"}"#
            ),
            (UNSOLICITED, vec![]),
            "nothing rides on the initialize answer but the answer"
        );
        assert_eq!(routing.take_all().len(), 1);
    }
}
