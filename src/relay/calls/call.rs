//! A call in flight and how it ends.
//!
//! Every JSON-RPC request through the relay, in either direction, becomes a [`Call`] when it
//! arrives and an audit [`Record`] when its answer is released. [`Calls::finish`] is the one
//! place a finished call goes: the audit trail, the metrics and the live activity feed. With an
//! audit trail the record is committed before the answer is released, and a call whose record
//! cannot be written is answered with an error instead (fail closed): an agent never sees an
//! answer the trail does not hold.
//!
//! A call dropped before it was finished (the agent went away, a session ended with a server
//! request unanswered) is recorded as abandoned, in the background: nothing was released, so
//! nothing waits on that write.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::activity::Activity;
use super::metric_names::MetricNames;
use super::metrics::CallMetrics;
use crate::govern::Identity;
use crate::govern::audit::{Auditor, Capture, Direction, Outcome, Record, Verdict, digest};
use crate::govern::policy::Decision;
use crate::mcp::jsonrpc::{Classified, MessageInfo, MessageKind, codes, error_body};
use crate::transport::TransportKind;

/// The rule named in records of methods policy does not govern (`initialize`, lists, `ping`,
/// server requests).
const UNGOVERNED: &str = "not governed by policy";

/// Why a finished call could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The audit trail refused or failed the write.
    #[error("the audit trail could not record the call: {0}")]
    Audit(String),
}

/// Where finished calls go; one per relay.
#[derive(Default)]
pub struct Calls {
    /// The audit trail; none without `[audit]` (then nothing is written or digested).
    auditor: Option<Auditor>,
    /// The live activity feed every finished call is pushed to.
    activity: Arc<Activity>,
    /// The calls' metrics, their handles kept per label set.
    metrics: CallMetrics,
}

impl Calls {
    /// Finished calls go to metrics, the live `activity` feed and, if given, the audit trail.
    pub fn new(auditor: Option<Auditor>, activity: Arc<Activity>) -> Self {
        Self {
            auditor,
            activity,
            metrics: CallMetrics::default(),
        }
    }

    /// Whether finished calls are written to an audit trail (arguments are digested only
    /// then).
    pub fn is_auditing(&self) -> bool {
        self.auditor.is_some()
    }

    /// Why calls must be refused now: the audit database does not take rows and
    /// `[audit] on_database_down = "refuse"` (fail closed); `None` while calls may go on.
    pub fn audit_refusal(&self) -> Option<String> {
        self.auditor.as_ref()?.refusal()
    }

    /// What the trail keeps of `tenant`'s `source`'s arguments and results.
    fn capture(&self, tenant: &str, source: &str) -> Capture {
        self.auditor
            .as_ref()
            .map(|auditor| auditor.capture(tenant, source))
            .unwrap_or_default()
    }

    /// The one place a finished call goes: metrics and the activity feed at once, and the audit
    /// trail, resolving once the record is committed.
    pub async fn finish(&self, record: Record) -> Result<(), CallError> {
        self.publish(&record);
        match &self.auditor {
            Some(auditor) => auditor
                .append(record)
                .await
                .map_err(|e| CallError::Audit(e.to_string())),
            None => Ok(()),
        }
    }

    /// The names finished calls' metrics may be labelled with.
    pub fn metric_names(&self) -> &MetricNames {
        self.metrics.names()
    }

    /// Flushes and closes the audit trail (graceful shutdown, after the drain).
    pub async fn close(&self) {
        if let Some(auditor) = &self.auditor {
            auditor.close().await;
        }
    }

    /// Metrics, and the live activity feed.
    fn publish(&self, record: &Record) {
        self.metrics.record(record);
        // The live activity feed takes every finished call here, and only here.
        self.activity.push_record(record);
    }

    /// Finishes a call nobody waits for (it was dropped unfinished), in the background.
    fn finish_detached(self: &Arc<Self>, record: Record) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.publish(&record);
            return;
        };
        let calls = self.clone();
        runtime.spawn(async move {
            if let Err(e) = calls.finish(record).await {
                tracing::error!(error = %e, "abandoned call not recorded");
            }
        });
    }
}

/// The context a call arrived in, beyond its caller.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The session (session era).
    pub session: Option<String>,
    /// The tunnel transport carrying it.
    pub transport: Option<TransportKind>,
    /// The protocol version negotiated or declared.
    pub protocol_version: Option<String>,
}

/// One request in flight; finished by [`InFlight`] or the session that tracks it, or recorded
/// as abandoned when dropped.
pub(crate) struct Call {
    record: Option<Record>,
    started: Instant,
    calls: Arc<Calls>,
    /// What the trail keeps of the result.
    capture: Capture,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Call {
    /// A request `info` from `message`, sent in `direction` on behalf of `who`.
    pub(crate) fn start(
        calls: &Arc<Calls>,
        who: &Identity,
        source: &str,
        direction: Direction,
        message: &[u8],
        info: &MessageInfo,
        decision: Option<&Decision>,
    ) -> Self {
        let target = info.target.clone();
        let method = info.method.clone().unwrap_or_default();
        let (tool, resource, prompt) = match method.as_str() {
            "tools/call" => (target, None, None),
            "prompts/get" => (None, None, target),
            m if m.starts_with("resources/") => (None, target, None),
            _ => (None, None, None),
        };
        let (decision, rule) = match decision {
            Some(Decision::Allow(rule)) => (Verdict::Allow, rule.clone()),
            Some(Decision::Deny(rule)) => (Verdict::Deny, rule.clone()),
            None => (Verdict::Allow, UNGOVERNED.to_owned()),
        };
        let params = info.payload(message).unwrap_or_default();
        let args_sha256 = if calls.is_auditing() {
            digest(params)
        } else {
            String::new()
        };
        let capture = calls.capture(&who.tenant, source);
        let args = info.payload.as_ref().and_then(|_| capture.keep(params));
        Self {
            record: Some(Record {
                time_ms: now_ms(),
                tenant: who.tenant.to_string(),
                subject: who.subject.to_string(),
                roles: who.roles.to_vec(),
                source: source.to_owned(),
                session: None,
                transport: None,
                protocol_version: None,
                direction,
                method,
                request_id: info.id.as_deref().map(|id| id.get().to_owned()),
                tool,
                resource,
                prompt,
                decision,
                rule,
                outcome: Outcome::Abandoned,
                latency_us: 0,
                bytes_in: info.size as u64,
                bytes_out: 0,
                args_sha256,
                args,
                result: None,
                call: None,
            }),
            started: Instant::now(),
            calls: calls.clone(),
            capture,
        }
    }

    /// The request id as its JSON text.
    pub(crate) fn request_id(&self) -> Option<&str> {
        self.record.as_ref()?.request_id.as_deref()
    }

    /// Sets what is known of the context so far (fields left `None` stay as they were).
    pub(crate) fn set_context(&mut self, context: &Context) {
        let Some(record) = self.record.as_mut() else {
            return;
        };
        if let Some(session) = &context.session {
            record.session = Some(session.clone());
        }
        if let Some(transport) = context.transport {
            record.transport = Some(transport.to_string());
        }
        if let Some(version) = &context.protocol_version {
            record.protocol_version = Some(version.clone());
        }
    }

    /// The finished record: `outcome` after `bytes_out` bytes of answer, now; `result` is the
    /// answer's `result` (or whole error) text, kept if the source's capture level says so.
    fn into_record(
        mut self,
        outcome: Outcome,
        bytes_out: usize,
        result: Option<&[u8]>,
    ) -> Option<Record> {
        let mut record = self.record.take()?;
        record.outcome = outcome;
        record.result = result.and_then(|text| self.capture.keep(text));
        record.latency_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        record.bytes_out = bytes_out as u64;
        Some(record)
    }

    /// Finishes the call through [`Calls::finish`].
    pub(crate) async fn finish(
        self,
        outcome: Outcome,
        bytes_out: usize,
        result: Option<&[u8]>,
    ) -> Result<(), CallError> {
        let calls = self.calls.clone();
        match self.into_record(outcome, bytes_out, result) {
            Some(record) => calls.finish(record).await,
            None => Ok(()),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.outcome = Outcome::Abandoned;
            record.latency_us =
                u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.calls.finish_detached(record);
        }
    }
}

/// How a response message ended the call it answers.
pub(crate) fn outcome_of(info: &MessageInfo) -> Outcome {
    match (info.error_code, info.is_tool_error, info.is_input_required) {
        (Some(code), ..) => Outcome::Error(code),
        (None, true, _) => Outcome::ToolError,
        (None, false, true) => Outcome::InputRequired,
        (None, false, false) => Outcome::Ok,
    }
}

/// The relay-made error saying `source` could not answer (counted as a tunnel error).
pub(crate) fn source_error_body(
    id: Option<&serde_json::value::RawValue>,
    source: &str,
    why: &str,
) -> Bytes {
    metrics::counter!(crate::metrics::REQUESTS, "outcome" => "tunnel_error").increment(1);
    error_body(
        id,
        codes::SOURCE_UNAVAILABLE,
        &format!("source {source} is unavailable: {why}"),
    )
}

/// The error an agent gets instead of an answer the audit trail could not record.
pub(crate) fn unaudited_body(id: Option<&str>) -> Bytes {
    let id = id.and_then(|id| serde_json::value::RawValue::from_string(id.to_owned()).ok());
    error_body(
        id.as_deref(),
        codes::INTERNAL_ERROR,
        "the call could not be audited, so its answer is withheld",
    )
}

/// The calls of one agent message: one per request in it (a batch has several), finished as
/// their answers are released.
#[derive(Default)]
pub(crate) struct InFlight {
    calls: Vec<Call>,
    /// Bytes already released toward the agent for these calls (progress and other messages of
    /// a streamed answer), counted into the next call to finish.
    streamed: usize,
}

impl InFlight {
    /// Starts a call for every request in `body`, with policy's word on each message
    /// (`decisions` runs parallel to `classified.messages()`; missing entries are ungoverned).
    pub(crate) fn begin(
        calls: &Arc<Calls>,
        who: &Identity,
        source: &str,
        body: &[u8],
        classified: &Classified,
        decisions: &[Option<Decision>],
    ) -> Self {
        let calls = classified
            .messages()
            .iter()
            .enumerate()
            .filter(|(_, info)| info.kind == MessageKind::Request)
            .map(|(i, info)| {
                let decision = decisions.get(i).and_then(Option::as_ref);
                Call::start(
                    calls,
                    who,
                    source,
                    Direction::AgentToServer,
                    body,
                    info,
                    decision,
                )
            })
            .collect();
        Self { calls, streamed: 0 }
    }

    /// Whether the trail keeps the result text of any open call: its answer must then be read
    /// whole (a streamed answer is never held, so its text could not be kept).
    pub(crate) fn keeps_results(&self) -> bool {
        self.calls
            .iter()
            .any(|call| call.capture != Capture::Metadata)
    }

    /// Sets the context of every open call.
    pub(crate) fn set_context(&mut self, context: &Context) {
        for call in &mut self.calls {
            call.set_context(context);
        }
    }

    /// Marks the calls as rounds of the call `call` (`mcp.call.id`: see
    /// [`crate::govern::audit::Record::call`]).
    pub(crate) fn link(&mut self, call: &str) {
        for record in self.calls.iter_mut().filter_map(|c| c.record.as_mut()) {
            record.call = Some(call.to_owned());
        }
    }

    /// Counts a message released toward the agent that answers none of the calls.
    pub(crate) fn streamed(&mut self, bytes: usize) {
        self.streamed = self.streamed.saturating_add(bytes);
    }

    /// Finishes the calls whose responses `message` (classified as `classified`) carries, before
    /// it is released as `released` bytes. Returns the error to release instead when the trail
    /// could not record them.
    pub(crate) async fn settle(
        &mut self,
        message: &[u8],
        classified: &Classified,
        released: usize,
    ) -> Result<(), Bytes> {
        let mut finished = Vec::new();
        for info in classified
            .messages()
            .iter()
            .filter(|m| m.kind == MessageKind::Response)
        {
            let id = info.id.as_deref().map(|id| id.get());
            let index = self
                .calls
                .iter()
                .position(|call| call.request_id() == id)
                // An upstream that rewrote the id still answers the only call open.
                .or_else(|| (self.calls.len() == 1).then_some(0));
            if let Some(index) = index {
                // A result's text, or the whole error response.
                let result = info.payload(message).unwrap_or(message);
                finished.push((self.calls.remove(index), outcome_of(info), Some(result)));
            }
        }
        let share = released / finished.len().max(1) + std::mem::take(&mut self.streamed);
        self.write(finished, share).await
    }

    /// Finishes every call still open with `outcome`, after `bytes_out` bytes of answer.
    /// Returns the error to release instead when the trail could not record them.
    pub(crate) async fn finish_all(
        &mut self,
        outcome: Outcome,
        bytes_out: usize,
    ) -> Result<(), Bytes> {
        let finished: Vec<_> = self
            .calls
            .drain(..)
            .map(|call| (call, outcome, None))
            .collect();
        let bytes = bytes_out.saturating_add(std::mem::take(&mut self.streamed));
        self.write(finished, bytes).await
    }

    /// Finishes every call still open with `outcome`, before `answer` (an error the relay made
    /// for them) is released. Returns what to release: `answer`, or the error saying the calls
    /// could not be audited.
    pub(crate) async fn fail(&mut self, outcome: Outcome, answer: Bytes) -> Bytes {
        match self.finish_all(outcome, answer.len()).await {
            Ok(()) => answer,
            Err(refusal) => refusal,
        }
    }

    async fn write(
        &self,
        finished: Vec<(Call, Outcome, Option<&[u8]>)>,
        bytes_out: usize,
    ) -> Result<(), Bytes> {
        let mut first_failed = None;
        let ids: Vec<Option<String>> = finished
            .iter()
            .map(|(call, _, _)| call.request_id().map(str::to_owned))
            .collect();
        let results = futures_util::future::join_all(
            finished
                .into_iter()
                .map(|(call, outcome, result)| call.finish(outcome, bytes_out, result)),
        )
        .await;
        for (result, id) in results.into_iter().zip(ids) {
            if let Err(e) = result {
                tracing::error!(error = %e, id = id.as_deref().unwrap_or("null"), "answer withheld: the call could not be audited");
                first_failed.get_or_insert(id);
            }
        }
        match first_failed {
            Some(id) => Err(unaudited_body(id.as_deref())),
            None => Ok(()),
        }
    }
}
