//! Agent sessions of the session era, each bound to its caller and carried by one channel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use rand::RngCore;
use tokio_util::sync::CancellationToken;

use super::events::EventLog;
use super::exchange::EventIds;
use super::sealed::{AnswerIds, EventClaims, SessionClaims};
use super::tasks::TaskBinding;
use crate::govern::Identity;
use crate::govern::audit::Direction;
use crate::mcp::classify;
use crate::mcp::era::PRIMED_STREAMS_SINCE;
use crate::mcp::jsonrpc::{Classified, MessageKind};
use crate::relay::calls::{Call, Calls, Context, outcome_of, unaudited_body};
use crate::relay::fleet::FleetKeys;
use crate::relay::tunnel::Channel;

/// Answer streams per session kept for resumption; older finished ones are forgotten first.
const ANSWER_LOGS: usize = 16;

/// Stream numbers (the first half of event ids) of one relay's copy of a session start at a
/// random multiple of this, below 2^52 (exact in every JSON number): the copies a session has on
/// the relays of a fleet never share a number, so an event id from another relay is never
/// taken for one of this relay's streams. The standalone stream is the first number (even);
/// answer streams follow at odd numbers, so a foreign id still says which kind it named.
const STREAM_BLOCK: u64 = 1 << 20;

/// A random first stream number for a relay's copy of a session (see [`STREAM_BLOCK`]): the
/// standalone stream's number, and the number `connect` knows the copy's tunnel stream by
/// ([`crate::wire::SessionHandle::stream`]).
pub(crate) fn new_stream_base() -> u64 {
    let block = rand::rng().next_u64() % ((1 << 52) / STREAM_BLOCK - 1) + 1;
    block * STREAM_BLOCK
}

/// Whether a stream number names a standalone stream (even) rather than an answer (odd).
pub(crate) fn is_standalone_stream(stream: u64) -> bool {
    stream.is_multiple_of(2)
}

/// Which agent transport a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Streamable HTTP: `/mcp/{source}` with `Mcp-Session-Id`.
    Streamable,
    /// The 2024-11-05 HTTP+SSE transport: `/sse/{source}`; every answer rides the one stream.
    LegacySse,
}

/// Server-to-agent requests of one session awaiting the agent's response; past this the oldest
/// is recorded as abandoned (an agent that never answers must not grow the table).
const SERVER_REQUESTS: usize = 256;

/// Random bytes in a relay-issued session id (192 bits: unguessable, and it reveals nothing of
/// the upstream's own id).
const SESSION_ID_BYTES: usize = 24;

/// One agent session.
pub struct Session {
    /// The relay-issued `Mcp-Session-Id`.
    pub id: String,
    /// The caller who created it; only they may use it.
    pub tenant: Arc<str>,
    /// The caller's subject.
    pub subject: Arc<str>,
    /// The caller's roles when the session opened.
    pub roles: Arc<[String]>,
    /// The source it talks to.
    pub source: String,
    /// The tunnel stream carrying it.
    pub channel: Arc<Channel>,
    /// Streamable HTTP or HTTP+SSE.
    pub transport: Transport,
    /// The standalone stream's log: server-initiated messages, held until a GET reads them.
    /// Its number is this copy's stream base (see [`new_stream_base`]).
    standalone: Arc<EventLog>,
    answers: Mutex<AnswerLogs>,
    last_used: Mutex<Instant>,
    /// When it opened.
    created: Instant,
    /// The protocol version `initialize` settled.
    version: Arc<std::sync::OnceLock<String>>,
    /// The server's requests to the agent, until the agent responds.
    server_requests: Arc<ServerRequests>,
    /// The agent's requests in flight, by id key: cancelled when the agent cancels them.
    cancels: Arc<Mutex<Cancels>>,
    /// The caller's task ids at the source.
    tasks: TaskBinding,
}

/// The cancellation tokens of a session's requests in flight, by id key.
#[derive(Default)]
struct Cancels {
    next: u64,
    tokens: HashMap<String, (u64, CancellationToken)>,
}

/// A request id as a comparable key (`"a"` and `"\u0061"` are the same id).
fn id_key(raw: &serde_json::value::RawValue) -> String {
    serde_json::from_str::<serde_json::Value>(raw.get())
        .map(|value| value.to_string())
        .unwrap_or_else(|_| raw.get().to_owned())
}

/// An agent request's place in its session's cancellation table, removed when dropped.
pub struct CancelGuard {
    key: String,
    number: u64,
    token: CancellationToken,
    cancels: Arc<Mutex<Cancels>>,
}

impl CancelGuard {
    /// Cancelled once the agent cancels the request (`notifications/cancelled`).
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let mut cancels = self.cancels.lock();
        // Only our own entry: a reused id may have a newer one.
        if cancels
            .tokens
            .get(&self.key)
            .is_some_and(|(number, _)| *number == self.number)
        {
            cancels.tokens.remove(&self.key);
        }
    }
}

/// The server's requests (sampling, elicitation, roots) a session's agent has not answered
/// yet, each a call recorded when the agent's response comes back, or abandoned.
struct ServerRequests {
    calls: Arc<Calls>,
    who: Identity,
    source: String,
    context: Context,
    version: Arc<std::sync::OnceLock<String>>,
    open: Mutex<VecDeque<Call>>,
}

impl ServerRequests {
    /// Starts a call for every request in `message`, about to be released to the agent.
    fn track(&self, message: &[u8], classified: &Classified) {
        let mut context = self.context.clone();
        context.protocol_version = self.version.get().cloned();
        let started: Vec<Call> = classified
            .messages()
            .iter()
            .filter(|m| m.kind == MessageKind::Request)
            .map(|info| {
                let mut call = Call::start(
                    &self.calls,
                    &self.who,
                    &self.source,
                    Direction::ServerToAgent,
                    message,
                    info,
                    None,
                );
                call.set_context(&context);
                call
            })
            .collect();
        if started.is_empty() {
            return;
        }
        let mut open = self.open.lock();
        open.extend(started);
        while open.len() > SERVER_REQUESTS {
            // Dropped unfinished: recorded as abandoned.
            open.pop_front();
        }
    }
}

#[derive(Default)]
struct AnswerLogs {
    next: u64,
    logs: VecDeque<Arc<EventLog>>,
}

/// A fresh random session id.
pub(crate) fn new_session_id() -> String {
    let mut bytes = [0u8; SESSION_ID_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Session {
    /// A session `id` (its handle, or from [`new_session_id`]) of `who` with `source` over
    /// `channel`, whose stream base is `first` (from [`new_stream_base`], as the channel's open
    /// header named it). Starts moving the channel's server-initiated messages into the
    /// standalone stream's log.
    pub(crate) fn new(
        id: String,
        who: &Identity,
        source: &str,
        (channel, first): (Arc<Channel>, u64),
        transport: Transport,
        calls: &Arc<Calls>,
        tasks: TaskBinding,
    ) -> Self {
        let budget = channel.budget().clone();
        let standalone = Arc::new(EventLog::with_budget(first, Some(budget.clone())));
        let version = Arc::new(std::sync::OnceLock::new());
        let server_requests = Arc::new(ServerRequests {
            calls: calls.clone(),
            who: who.clone(),
            source: source.to_owned(),
            context: Context {
                session: Some(id.clone()),
                transport: Some(channel.transport()),
                protocol_version: None,
            },
            version: version.clone(),
            open: Mutex::default(),
        });
        if let Some(mut queue) = channel.unsolicited() {
            let log = standalone.clone();
            let requests = server_requests.clone();
            let tasks = tasks.clone();
            tokio::spawn(async move {
                while let Some((number, message)) = queue.recv().await {
                    // Charged while queued (see `Channel::unsolicited`); the log charges it now.
                    budget.release(message.len());
                    let message = tasks.apply(message);
                    if let Ok(classified) = classify(&message) {
                        requests.track(&message, &classified);
                    }
                    log.push_event(number, message).await;
                }
                log.finish();
            });
        }
        Self {
            id,
            tenant: who.tenant.clone(),
            subject: who.subject.clone(),
            roles: who.roles.clone(),
            source: source.to_owned(),
            channel,
            transport,
            standalone,
            answers: Mutex::new(AnswerLogs {
                next: first + 1,
                logs: VecDeque::new(),
            }),
            last_used: Mutex::new(Instant::now()),
            created: Instant::now(),
            version,
            server_requests,
            cancels: Arc::default(),
            tasks,
        }
    }

    /// Registers the agent's request `id` (the only request of its message) as in flight:
    /// the guard's token is cancelled when the agent cancels it.
    pub fn track_cancel(&self, id: &serde_json::value::RawValue) -> CancelGuard {
        let key = id_key(id);
        let token = CancellationToken::new();
        let mut cancels = self.cancels.lock();
        cancels.next += 1;
        let number = cancels.next;
        cancels.tokens.insert(key.clone(), (number, token.clone()));
        CancelGuard {
            key,
            number,
            token,
            cancels: self.cancels.clone(),
        }
    }

    /// Ends the answer of every request a `notifications/cancelled` in `message` names (it has
    /// been forwarded): the agent wants no answer, and the upstream may never send one.
    pub fn cancel_requests(&self, message: &[u8], classified: &Classified) {
        #[derive(serde::Deserialize)]
        struct Params<'a> {
            #[serde(rename = "requestId", borrow)]
            request_id: Option<&'a serde_json::value::RawValue>,
        }
        for info in classified.messages() {
            if info.method.as_deref() != Some("notifications/cancelled") {
                continue;
            }
            let Some(params) = info.payload(message) else {
                continue;
            };
            let Ok(Params {
                request_id: Some(id),
            }) = serde_json::from_slice::<Params<'_>>(params)
            else {
                continue;
            };
            let token = self.cancels.lock().tokens.remove(&id_key(id));
            if let Some((_, token)) = token {
                tracing::debug!(session = %self.id, id = %id.get(), "request cancelled by the agent: its answer ends");
                token.cancel();
            }
        }
    }

    /// The caller who owns the session.
    pub fn identity(&self) -> Identity {
        Identity {
            tenant: self.tenant.clone(),
            subject: self.subject.clone(),
            roles: self.roles.clone(),
        }
    }

    /// The protocol version `initialize` settled, once known.
    pub fn version(&self) -> Option<&str> {
        self.version.get().map(String::as_str)
    }

    /// What the audit trail records of this session's calls.
    pub fn call_context(&self) -> Context {
        Context {
            session: Some(self.id.clone()),
            transport: Some(self.channel.transport()),
            protocol_version: self.version.get().cloned(),
        }
    }

    /// Starts a call for every server request in `message`, a server message about to be
    /// released to the agent on one of this session's streams.
    pub fn track_server_requests(&self, message: &[u8], classified: &Classified) {
        self.server_requests.track(message, classified);
    }

    /// Finishes the server requests the agent's `classified` responses answer, before they are
    /// forwarded. Returns the error to answer the agent with instead when the trail could not
    /// record one.
    pub async fn answer_server_requests(
        &self,
        message: &[u8],
        classified: &Classified,
    ) -> Result<(), Bytes> {
        for info in classified
            .messages()
            .iter()
            .filter(|m| m.kind == MessageKind::Response)
        {
            let id = info.id.as_deref().map(|id| id.get());
            let call = {
                let mut open = self.server_requests.open.lock();
                open.iter()
                    .position(|call| call.request_id() == id)
                    .and_then(|index| open.remove(index))
            };
            if let Some(call) = call
                && let Err(e) = call
                    .finish(outcome_of(info), info.size, info.payload(message))
                    .await
            {
                tracing::error!(error = %e, session = %self.id, "agent response withheld: the call could not be audited");
                return Err(unaudited_body(id));
            }
        }
        Ok(())
    }

    /// Learns the protocol version from the answer to `initialize` (`result.protocolVersion`);
    /// other messages are ignored.
    pub fn learn_version(&self, message: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Init {
            result: Option<Settled>,
        }
        #[derive(serde::Deserialize)]
        struct Settled {
            #[serde(rename = "protocolVersion")]
            protocol_version: String,
        }
        if let Ok(Init {
            result: Some(settled),
        }) = serde_json::from_slice::<Init>(message)
        {
            let _ = self.version.set(settled.protocol_version);
        }
    }

    /// Sets the protocol version a resumed session settled when it opened (from its sealed
    /// id), unless it is known.
    pub fn know_version(&self, version: Option<String>) {
        if let Some(version) = version {
            let _ = self.version.set(version);
        }
    }

    /// Whether the protocol version is known yet.
    pub fn knows_version(&self) -> bool {
        self.version.get().is_some()
    }

    /// How this session's answer and GET streams name their events: 2025-11-25 and later
    /// open each stream with a priming event.
    pub fn event_ids(&self) -> EventIds {
        match self.version.get() {
            Some(version) if version.as_str() >= PRIMED_STREAMS_SINCE => EventIds::Primed,
            _ => EventIds::Resumable,
        }
    }

    /// The caller's task ids at the source.
    pub(crate) fn tasks(&self) -> &TaskBinding {
        &self.tasks
    }

    /// The standalone stream's log.
    pub fn standalone(&self) -> &Arc<EventLog> {
        &self.standalone
    }

    /// This copy's stream base: the number `connect` knows its tunnel stream by.
    pub fn stream_base(&self) -> u64 {
        self.standalone.stream
    }

    /// Whether the answers of this session can be resumed on any relay of a fleet sealed with
    /// `keys`: its `connect` keeps them for a replay ([`Session::keeps_answers`]), and the
    /// fleet shares its secret.
    pub fn replays_answers(&self, keys: &FleetKeys) -> bool {
        keys.shared() && self.keeps_answers()
    }

    /// Whether the session's `connect` keeps its answers for a replay on another stream: it
    /// does for an HTTP upstream's sessions from wire version 3 on, and for a stdio process's
    /// from version 4 on (before, those went only to the stream that asked).
    pub fn keeps_answers(&self) -> bool {
        let Some(resumable) = self.channel.resumable() else {
            return false;
        };
        self.transport == Transport::Streamable
            && self.channel.replays()
            && (resumable.portable || self.channel.numbers_events())
    }

    /// The claims of the agent-facing id of this session, issued at `issued` (seconds since
    /// the epoch).
    pub(crate) fn claims(&self, issued: u64) -> SessionClaims {
        SessionClaims {
            tenant: self.tenant.to_string(),
            subject: self.subject.to_string(),
            source: self.source.clone(),
            handle: self.id.clone(),
            connect: self.channel.connect_instance().map(str::to_owned),
            // A `connect` that says nothing (wire version 1) ends the session with its stream.
            resumable: self.channel.resumable().unwrap_or_default(),
            version: self.version().map(str::to_owned),
            issued,
        }
    }

    /// Whether the session's server-initiated messages (its agent's GET stream) can be
    /// resumed on any relay of a fleet sealed with `keys`: `connect` numbers and keeps them
    /// (wire version 4) for a session whose answers it keeps ([`Session::replays_answers`]).
    pub fn numbers_events(&self, keys: &FleetKeys) -> bool {
        self.replays_answers(keys) && self.channel.numbers_events()
    }

    /// The sealed ids of the answer to `exchange` on this copy's stream, when it can be
    /// resumed anywhere (see [`Session::replays_answers`]).
    pub fn answer_ids(&self, keys: &Arc<FleetKeys>, exchange: u64) -> Option<AnswerIds> {
        self.replays_answers(keys).then(|| {
            AnswerIds::new(
                keys.clone(),
                EventClaims {
                    handle: self.id.clone(),
                    connect: self.channel.connect_instance().map(str::to_owned),
                    stream: self.stream_base(),
                    exchange,
                    message: 0,
                },
            )
        })
    }

    /// A new log for a POST answer that became a stream, named by `ids` when given. With the
    /// HTTP+SSE transport every answer goes to the one standalone stream instead.
    pub fn answer_log(&self, ids: Option<AnswerIds>) -> Arc<EventLog> {
        if self.transport == Transport::LegacySse {
            return self.standalone.clone();
        }
        let mut answers = self.answers.lock();
        let log = Arc::new(EventLog::answer(
            answers.next,
            Some(self.channel.budget().clone()),
            ids,
        ));
        answers.next += 2;
        if answers.logs.len() >= ANSWER_LOGS {
            // Forget a completed stream first; if none is, the oldest (it stays readable by
            // whoever reads it now, only no longer resumable).
            let index = answers
                .logs
                .iter()
                .position(|log| log.is_done())
                .unwrap_or(0);
            answers.logs.remove(index);
        }
        answers.logs.push_back(log.clone());
        log
    }

    /// The log of the answer that sealed ids name (`stream`'s exchange `exchange`), if this
    /// copy still keeps it.
    pub fn answer_log_of(&self, stream: u64, exchange: u64) -> Option<Arc<EventLog>> {
        self.answers
            .lock()
            .logs
            .iter()
            .find(|log| {
                log.answer_ids()
                    .is_some_and(|ids| ids.names(stream, exchange))
            })
            .cloned()
    }

    /// The log of stream `stream`, if it is still kept.
    pub fn log(&self, stream: u64) -> Option<Arc<EventLog>> {
        if stream == self.standalone.stream {
            return Some(self.standalone.clone());
        }
        let answers = self.answers.lock();
        answers
            .logs
            .iter()
            .find(|log| log.stream == stream)
            .cloned()
    }

    /// It was used now (see [`Session::idle_for`]).
    pub(super) fn touch(&self) {
        *self.last_used.lock() = Instant::now();
    }

    /// How long since it was last used.
    pub(super) fn idle_for(&self) -> Duration {
        self.last_used.lock().elapsed()
    }

    /// How long it has been open.
    pub(super) fn age(&self) -> Duration {
        self.created.elapsed()
    }
}
