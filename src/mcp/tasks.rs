//! Task ids (the tasks of 2025-11-25 and the `io.modelcontextprotocol/tasks` extension of
//! 2026-07-28) as a gateway must carry them: bound to the caller that created the task.
//!
//! An upstream names its tasks with ids of its own, and any client that presents one may poll,
//! fetch or cancel the task. Behind a relay every caller of a source reaches the same upstream
//! (often over one pooled session), so an upstream id alone would let one caller reach
//! another's task. The relay therefore never shows an upstream id as it is: every task id an
//! upstream sends toward an agent is *bound* to that agent ([`TaskIds::bind`]), and every task
//! id an agent's request names is *unbound* ([`TaskIds::unbind`]) before it goes on: one that
//! is not the caller's own is refused, as a task that does not exist.
//!
//! This module knows where task ids sit in messages of both eras; what binding means (a tag
//! keyed by the fleet secret) is the relay's ([`TaskIds`]). It reads only those places (the
//! rest of a message is skipped, never built into a tree) and rewrites a message by replacing
//! the bytes of each id ([`Splice`]), so everything else reaches the other side byte for byte.
//!
//! Upstream to agent, in results, notifications and requests ([`bind_answer`]):
//! - `result.taskId`: a 2026-07-28 `CreateTaskResult` (`resultType: "task"`), the `tasks/get`
//!   and 2025-11-25 `tasks/cancel` results;
//! - `result.task.taskId`: a 2025-11-25 `CreateTaskResult`;
//! - `result.tasks[].taskId`: a 2025-11-25 `tasks/list` result, whose entries are kept only
//!   when [`TaskIds::listed`] says the task is the caller's;
//! - `params.taskId` of `notifications/tasks` (2026-07-28) and `notifications/tasks/status`
//!   (2025-11-25);
//! - `params.notifications.taskIds[]` of `notifications/subscriptions/acknowledged`;
//! - `_meta["io.modelcontextprotocol/related-task"].taskId` of results and params.
//!
//! Agent to upstream ([`unbind_payload`]): in requests, `params.taskId` of `tasks/get`,
//! `tasks/result`, `tasks/update`, `tasks/cancel`, `params.notifications.taskIds[]` of
//! `subscriptions/listen` and the related-task `_meta`: each must be the caller's, and a
//! request that cannot be read for them is refused (it fails closed). In the agent's
//! notifications and responses a related-task id may name a task of the agent's own (a
//! server may have the client run a task): it is unbound when it is one of the caller's, and
//! left as it is otherwise.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::mcp::MessageKind;

/// The `_meta` key naming the task a message belongs to.
pub const RELATED_TASK: &str = "io.modelcontextprotocol/related-task";

/// What binding a task id to a caller means: given to [`bind_answer`] and [`unbind_payload`].
pub trait TaskIds {
    /// The id the caller sees for the upstream's `raw` id.
    fn bind(&self, raw: &str) -> String;
    /// The upstream's id behind `bound`, if `bound` is one [`TaskIds::bind`] gave this caller.
    fn unbind(&self, bound: &str) -> Option<String>;
    /// Told of a task the caller just created (its upstream id).
    fn created(&self, raw: &str);
    /// Whether a task a `tasks/list` result names is the caller's.
    fn listed(&self, raw: &str) -> bool;
}

/// A task id in an agent's request that is not the caller's (or a request that names tasks
/// and cannot be read): the request is refused as if the task did not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Failed to retrieve task: Task not found")]
pub struct UnknownTask;

/// The bytes at `range` of a message, to be replaced by `text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splice {
    /// Where, in the message.
    pub range: Range<usize>,
    /// What goes there.
    pub text: Vec<u8>,
}

impl Splice {
    fn shifted(mut self, by: usize) -> Self {
        self.range = self.range.start + by..self.range.end + by;
        self
    }
}

/// `bytes` with each splice applied (ranges in order, not overlapping).
pub fn apply_splices(bytes: &[u8], splices: &[Splice]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + splices.len() * 32);
    let mut at = 0;
    for splice in splices {
        out.extend_from_slice(&bytes[at..splice.range.start]);
        out.extend_from_slice(&splice.text);
        at = splice.range.end;
    }
    out.extend_from_slice(&bytes[at..]);
    out
}

/// Methods whose `params.taskId` names an existing task.
pub fn addresses_a_task(method: &str) -> bool {
    matches!(
        method,
        "tasks/get" | "tasks/result" | "tasks/update" | "tasks/cancel"
    )
}

/// Whether the answers to `method` are about tasks (they are read whole, never passed on in
/// pieces: see the relay's `Awaiting`).
pub fn names_tasks(method: &str) -> bool {
    method.starts_with("tasks/") || method == "subscriptions/listen"
}

/// Whether an upstream's `message` may carry a task id at all: the quick test that keeps every
/// other message off the parser. It looks for the key with its quotes: inside a JSON string (a
/// tool's text that mentions task ids) a quote is always escaped, so text never matches.
pub fn mentions_tasks(message: &[u8]) -> bool {
    memchr::memmem::find(message, br#""taskId""#).is_some()
        || memchr::memmem::find(message, br#""taskIds""#).is_some()
}

/// The fields of a result or params that may hold task ids; the rest is skipped unread.
#[derive(Deserialize, Default)]
struct Fields<'a> {
    #[serde(rename = "taskId", borrow, default)]
    task_id: Option<&'a RawValue>,
    #[serde(rename = "resultType", borrow, default)]
    result_type: Option<&'a RawValue>,
    #[serde(borrow, default)]
    task: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tasks: Option<&'a RawValue>,
    #[serde(borrow, default)]
    notifications: Option<&'a RawValue>,
    #[serde(rename = "_meta", borrow, default)]
    meta: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct TaskIdField<'a> {
    #[serde(rename = "taskId", borrow, default)]
    task_id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RelatedField<'a> {
    #[serde(rename = "io.modelcontextprotocol/related-task", borrow, default)]
    related: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct TaskIdsField<'a> {
    #[serde(rename = "taskIds", borrow, default)]
    task_ids: Option<Vec<&'a RawValue>>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
}

/// Where `part` (borrowed from `base`) lies in `base`.
fn range_in(base: &[u8], part: &str) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= base.len()).then_some(start..end)
}

/// Whether `raw` is a JSON object (so a struct reads it).
fn is_object(raw: &[u8]) -> bool {
    raw.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{')
}

/// `raw` read as a struct when it is an object; `Ok(None)` when it is not one; `Err` when it
/// is an object that cannot be read.
fn read<'a, T: Deserialize<'a>>(raw: &'a str) -> Result<Option<T>, serde_json::Error> {
    if !is_object(raw.as_bytes()) {
        return Ok(None);
    }
    serde_json::from_str(raw).map(Some)
}

/// The text of a JSON string token; `None` for anything else.
fn string_of(raw: &RawValue) -> Option<String> {
    serde_json::from_str::<String>(raw.get()).ok()
}

/// A JSON string token holding `text`.
fn token(text: &str) -> Vec<u8> {
    serde_json::to_vec(text).unwrap_or_else(|_| b"\"\"".to_vec())
}

/// The message (one JSON-RPC message or a batch) from an upstream with every task id bound
/// to the caller, and the tasks of a list that are not the caller's left out; `None` when
/// nothing changed (most messages: see [`mentions_tasks`]), or it cannot be read.
pub fn bind_answer(message: &[u8], ids: &dyn TaskIds) -> Option<Vec<u8>> {
    if !mentions_tasks(message) {
        return None;
    }
    let text = std::str::from_utf8(message).ok()?;
    let mut splices = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let batch: Vec<&RawValue> = serde_json::from_str(text).ok()?;
        for one in batch {
            let at = range_in(message, one.get())?.start;
            splices.extend(bind_one(one.get(), ids).into_iter().map(|s| s.shifted(at)));
        }
    } else {
        splices = bind_one(text, ids);
    }
    (!splices.is_empty()).then(|| apply_splices(message, &splices))
}

/// The splices binding the task ids of one message (`text`), relative to it.
fn bind_one(text: &str, ids: &dyn TaskIds) -> Vec<Splice> {
    let base = text.as_bytes();
    let Ok(Some(envelope)) = read::<Envelope>(text) else {
        return Vec::new();
    };
    let mut splices = Vec::new();
    if let Some(result) = envelope.result
        && let Ok(Some(fields)) = read::<Fields>(result.get())
    {
        let flat_creation = fields.result_type.and_then(string_of).as_deref() == Some("task");
        if let Some(raw) = fields.task_id.and_then(string_of) {
            if flat_creation {
                ids.created(&raw);
            }
            splices.extend(bind_at(base, fields.task_id, ids));
        }
        if let Some(task) = fields.task
            && let Ok(Some(task)) = read::<TaskIdField>(task.get())
        {
            if let Some(raw) = task.task_id.and_then(string_of) {
                ids.created(&raw);
            }
            splices.extend(bind_at(base, task.task_id, ids));
        }
        if let Some(tasks) = fields.tasks {
            splices.extend(bind_list(base, tasks, ids));
        }
        splices.extend(bind_related(base, fields.meta, ids));
    }
    if let Some(params) = envelope.params
        && let Ok(Some(fields)) = read::<Fields>(params.get())
    {
        let is_notification = envelope.id.is_none();
        match envelope.method.as_deref() {
            Some("notifications/tasks" | "notifications/tasks/status") if is_notification => {
                splices.extend(bind_at(base, fields.task_id, ids));
            }
            Some("notifications/subscriptions/acknowledged") if is_notification => {
                if let Some(Ok(Some(listed))) =
                    fields.notifications.map(|n| read::<TaskIdsField>(n.get()))
                {
                    for id in listed.task_ids.into_iter().flatten() {
                        splices.extend(bind_at(base, Some(id), ids));
                    }
                }
            }
            _ => {}
        }
        splices.extend(bind_related(base, fields.meta, ids));
    }
    splices.sort_by_key(|s| s.range.start);
    splices
}

/// The splice binding the id at `raw` (a string token borrowed from `base`).
fn bind_at(base: &[u8], raw: Option<&RawValue>, ids: &dyn TaskIds) -> Option<Splice> {
    let raw = raw?;
    let id = string_of(raw)?;
    Some(Splice {
        range: range_in(base, raw.get())?,
        text: token(&ids.bind(&id)),
    })
}

/// The splice binding a related-task id in `meta` (a `_meta` object).
fn bind_related(base: &[u8], meta: Option<&RawValue>, ids: &dyn TaskIds) -> Option<Splice> {
    let related = read::<RelatedField>(meta?.get()).ok()??.related?;
    let task = read::<TaskIdField>(related.get()).ok()??;
    bind_at(base, task.task_id, ids)
}

/// The splice replacing a `tasks` list (`tasks`, borrowed from `base`) with the caller's own
/// tasks, their ids bound; `None` when it is no list.
fn bind_list(base: &[u8], tasks: &RawValue, ids: &dyn TaskIds) -> Option<Splice> {
    let entries: Vec<&RawValue> = serde_json::from_str(tasks.get()).ok()?;
    let mut list = b"[".to_vec();
    for entry in entries {
        let text = entry.get();
        let task = read::<TaskIdField>(text).ok().flatten();
        let id = task.as_ref().and_then(|t| t.task_id);
        let kept = match id.and_then(string_of) {
            Some(raw) => ids.listed(&raw),
            None => true,
        };
        if !kept {
            continue;
        }
        if list.len() > 1 {
            list.push(b',');
        }
        match bind_at(text.as_bytes(), id, ids) {
            Some(splice) => list.extend(apply_splices(text.as_bytes(), &[splice])),
            None => list.extend_from_slice(text.as_bytes()),
        }
    }
    list.push(b']');
    Some(Splice {
        range: range_in(base, tasks.get())?,
        text: list,
    })
}

/// The splices (relative to `payload`) that unbind the task ids of one agent message of
/// `kind` and `method`, whose `payload` is its `params` (request, notification) or `result`
/// (response). A request naming a task that is not the caller's, or naming tasks in a way
/// that cannot be read, is `Err`.
pub fn unbind_payload(
    kind: MessageKind,
    method: Option<&str>,
    payload: &[u8],
    ids: &dyn TaskIds,
) -> Result<Vec<Splice>, UnknownTask> {
    let method = method.unwrap_or_default();
    let names_tasks = kind == MessageKind::Request
        && (addresses_a_task(method) || method == "subscriptions/listen");
    // A key may be spelled with escapes: any escape sends the message to the parser.
    let may_name_tasks = names_tasks
        || memchr::memmem::find(payload, b"taskId").is_some()
        || memchr::memmem::find(payload, b"related-task").is_some()
        || memchr::memmem::find(payload, b"\\u").is_some();
    if !may_name_tasks {
        return Ok(Vec::new());
    }
    let text = std::str::from_utf8(payload).map_err(|_| UnknownTask)?;
    let fields = match read::<Fields>(text) {
        Ok(Some(fields)) => fields,
        Ok(None) if names_tasks => return Err(UnknownTask),
        Ok(None) => return Ok(Vec::new()),
        // An object that cannot be read (duplicate keys, numbers or depth past the parser's
        // limits): a request fails closed; anything else goes as it is.
        Err(_) if kind == MessageKind::Request => return Err(UnknownTask),
        Err(_) => return Ok(Vec::new()),
    };
    if names_tasks {
        refuse_folded_keys(text, &["taskId", "notifications", "_meta"])?;
        if let Some(notifications) = fields
            .notifications
            .filter(|_| method == "subscriptions/listen")
        {
            refuse_folded_keys(notifications.get(), &["taskIds"])?;
        }
    }
    let strict = kind == MessageKind::Request;
    let mut splices = Vec::new();
    if names_tasks && addresses_a_task(method) {
        splices.extend(unbind_at(payload, fields.task_id, ids, true)?);
    }
    if names_tasks && method == "subscriptions/listen" {
        let listed = match fields.notifications.map(|n| read::<TaskIdsField>(n.get())) {
            Some(Ok(listed)) => listed,
            Some(Err(_)) => return Err(UnknownTask),
            None => None,
        };
        for id in listed.and_then(|l| l.task_ids).into_iter().flatten() {
            splices.extend(unbind_at(payload, Some(id), ids, true)?);
        }
    }
    if let Some(meta) = fields.meta {
        let related = match read::<RelatedField>(meta.get()) {
            Ok(related) => related.and_then(|r| r.related),
            Err(_) if strict => return Err(UnknownTask),
            Err(_) => None,
        };
        let task = match related.map(|r| read::<TaskIdField>(r.get())) {
            Some(Ok(task)) => task,
            Some(Err(_)) if strict => return Err(UnknownTask),
            _ => None,
        };
        if let Some(task) = task {
            splices.extend(unbind_at(payload, task.task_id, ids, strict)?);
        }
    }
    splices.sort_by_key(|s| s.range.start);
    Ok(splices)
}

/// Refuses an object (`text`) with a key that differs from one of `keys` only by case or
/// Unicode case folding (`TaskID`, `taſkId`): this module reads the exact key, and an upstream
/// that matches keys regardless of case (Go's `encoding/json` does) would read the other.
fn refuse_folded_keys(text: &str, keys: &[&str]) -> Result<(), UnknownTask> {
    if !is_object(text.as_bytes()) {
        return Ok(());
    }
    let present: std::collections::HashMap<Cow<'_, str>, serde::de::IgnoredAny> =
        serde_json::from_str(text).map_err(|_| UnknownTask)?;
    let fold = |key: &str| -> String {
        key.chars()
            .flat_map(char::to_uppercase)
            .flat_map(char::to_lowercase)
            .collect()
    };
    let wanted: Vec<String> = keys.iter().map(|key| fold(key)).collect();
    for key in present.keys() {
        if !keys.contains(&key.as_ref()) && wanted.contains(&fold(key)) {
            return Err(UnknownTask);
        }
    }
    Ok(())
}

/// The splice unbinding the id at `raw` (borrowed from `base`). `strict`: an id that is not
/// the caller's (or not a string) is `Err`; otherwise it is left as it is.
fn unbind_at(
    base: &[u8],
    raw: Option<&RawValue>,
    ids: &dyn TaskIds,
    strict: bool,
) -> Result<Option<Splice>, UnknownTask> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let unbound = string_of(raw).and_then(|bound| ids.unbind(&bound));
    match (unbound, range_in(base, raw.get())) {
        (Some(id), Some(range)) => Ok(Some(Splice {
            range,
            text: token(&id),
        })),
        _ if strict => Err(UnknownTask),
        _ => Ok(None),
    }
}

/// The upstream's id of the task a request's `params` names (after [`unbind_payload`]).
pub fn task_id_of(params: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(params).ok()?;
    read::<Fields>(text).ok()??.task_id.and_then(string_of)
}

#[cfg(test)]
mod tests;
