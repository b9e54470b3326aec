//! Task ids (the tasks of 2025-11-25 and the `io.modelcontextprotocol/tasks` extension of
//! 2026-07-28) as a gateway must carry them: bound to the caller that created the task.
//!
//! An upstream names its tasks with ids of its own, and any client that presents one may poll,
//! fetch or cancel the task. Behind a relay every caller of a source reaches the same upstream
//! (often over one pooled session), so an upstream id alone would let one caller reach
//! another's task. The relay therefore never shows an upstream id as it is: every task id an
//! upstream sends toward an agent is *bound* to that agent ([`TaskIds::bind`]), and every task
//! id an agent sends is *unbound* ([`TaskIds::unbind`]) before it goes on: one that is not the
//! caller's own is refused, as a task that does not exist.
//!
//! This module knows where task ids sit in messages of both eras; what binding means (a tag
//! keyed by the fleet secret) is the relay's ([`TaskIds`]).
//!
//! Upstream to agent, in results, notifications and requests:
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
//! Agent to upstream, in requests: `params.taskId` of `tasks/get`, `tasks/result`,
//! `tasks/update`, `tasks/cancel`; `params.notifications.taskIds[]` of `subscriptions/listen`;
//! the related-task `_meta` of params. The agent's responses (to requests the upstream sent)
//! are left as they are: the task ids they name are the agent's own.

use serde_json::{Map, Value};

/// The `_meta` key naming the task a message belongs to.
pub const RELATED_TASK: &str = "io.modelcontextprotocol/related-task";

/// What binding a task id to a caller means: given to [`bind_answer`] and [`unbind_request`].
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

/// A task id in an agent's request that is not the caller's: the request is refused as if the
/// task did not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Failed to retrieve task: Task not found")]
pub struct UnknownTask;

/// Methods whose `params.taskId` names an existing task.
fn addresses_a_task(method: &str) -> bool {
    matches!(
        method,
        "tasks/get" | "tasks/result" | "tasks/update" | "tasks/cancel"
    )
}

/// Whether `message` may carry a task id at all: the quick test that keeps every other message
/// off the JSON parser. It looks for the key with its quotes: inside a JSON string (a tool's
/// text that mentions task ids) a quote is always escaped, so text never matches.
pub fn mentions_tasks(message: &[u8]) -> bool {
    memchr::memmem::find(message, br#""taskId""#).is_some()
        || memchr::memmem::find(message, br#""taskIds""#).is_some()
}

/// The message (one JSON-RPC message or a batch) from an upstream with every task id bound
/// to the caller, and the tasks of a list that are not the caller's left out; `None` when
/// nothing changed (most messages: see [`mentions_tasks`]).
pub fn bind_answer(message: &[u8], ids: &dyn TaskIds) -> Option<Vec<u8>> {
    if !mentions_tasks(message) {
        return None;
    }
    let mut value: Value = serde_json::from_slice(message).ok()?;
    let changed = match &mut value {
        Value::Array(batch) => batch
            .iter_mut()
            .filter_map(Value::as_object_mut)
            .fold(false, |changed, one| bind_one(one, ids) | changed),
        Value::Object(one) => bind_one(one, ids),
        _ => false,
    };
    changed.then(|| serde_json::to_vec(&value).ok()).flatten()
}

fn bind_one(message: &mut Map<String, Value>, ids: &dyn TaskIds) -> bool {
    let mut changed = false;
    if let Some(Value::Object(result)) = message.get_mut("result") {
        // A task's creation: 2026-07-28's flat `CreateTaskResult`, 2025-11-25's `{task}`.
        let flat_creation = result.get("resultType").and_then(Value::as_str) == Some("task");
        if let Some(raw) = result.get("taskId").and_then(Value::as_str)
            && flat_creation
        {
            ids.created(raw);
        }
        if let Some(raw) = result
            .get("task")
            .and_then(|task| task.get("taskId"))
            .and_then(Value::as_str)
        {
            ids.created(raw);
        }
        changed |= bind_field(result, ids);
        if let Some(Value::Object(task)) = result.get_mut("task") {
            changed |= bind_field(task, ids);
        }
        if let Some(Value::Array(tasks)) = result.get_mut("tasks") {
            let before = tasks.len();
            tasks.retain(|task| {
                task.get("taskId")
                    .and_then(Value::as_str)
                    .is_none_or(|raw| ids.listed(raw))
            });
            changed |= tasks.len() != before;
            for task in tasks.iter_mut().filter_map(Value::as_object_mut) {
                changed |= bind_field(task, ids);
            }
        }
        changed |= bind_related(result, ids);
    }
    let method = message
        .get("method")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let is_notification = !message.contains_key("id");
    if let Some(Value::Object(params)) = message.get_mut("params") {
        match method.as_deref() {
            Some("notifications/tasks" | "notifications/tasks/status") if is_notification => {
                changed |= bind_field(params, ids);
            }
            Some("notifications/subscriptions/acknowledged") if is_notification => {
                changed |= map_listed_ids(params, &|raw| Some(ids.bind(raw))).unwrap_or(false);
            }
            _ => {}
        }
        changed |= bind_related(params, ids);
    }
    changed
}

/// Binds `object.taskId`, if it is a string.
fn bind_field(object: &mut Map<String, Value>, ids: &dyn TaskIds) -> bool {
    match object.get_mut("taskId") {
        Some(Value::String(raw)) => {
            *raw = ids.bind(raw);
            true
        }
        _ => false,
    }
}

/// Binds `object._meta["io.modelcontextprotocol/related-task"].taskId`.
fn bind_related(object: &mut Map<String, Value>, ids: &dyn TaskIds) -> bool {
    match related_task(object) {
        Some(task) => bind_field(task, ids),
        None => false,
    }
}

fn related_task(object: &mut Map<String, Value>) -> Option<&mut Map<String, Value>> {
    object
        .get_mut("_meta")?
        .get_mut(RELATED_TASK)?
        .as_object_mut()
}

/// Maps `object.notifications.taskIds[]` with `map` (binding cannot fail; unbinding fails on
/// an id that is not the caller's, which refuses the whole list).
fn map_listed_ids(
    object: &mut Map<String, Value>,
    map: &dyn Fn(&str) -> Option<String>,
) -> Result<bool, UnknownTask> {
    let Some(Value::Array(task_ids)) = object
        .get_mut("notifications")
        .and_then(|n| n.get_mut("taskIds"))
    else {
        return Ok(false);
    };
    let mut changed = false;
    for id in task_ids.iter_mut() {
        if let Value::String(text) = id {
            *text = map(text).ok_or(UnknownTask)?;
            changed = true;
        }
    }
    Ok(changed)
}

/// The request (one message or a batch) from an agent with every task id it names unbound:
/// `Ok(None)` when it names none, `Err` when one is not the caller's.
pub fn unbind_request(message: &[u8], ids: &dyn TaskIds) -> Result<Option<Vec<u8>>, UnknownTask> {
    let names_tasks = memchr::memmem::find(message, b"tasks/").is_some()
        || memchr::memmem::find(message, b"subscriptions/listen").is_some();
    if !names_tasks && !mentions_tasks(message) {
        return Ok(None);
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(message) else {
        return Ok(None);
    };
    let mut changed = false;
    match &mut value {
        Value::Array(batch) => {
            for one in batch.iter_mut().filter_map(Value::as_object_mut) {
                changed |= unbind_one(one, ids)?;
            }
        }
        Value::Object(one) => changed = unbind_one(one, ids)?,
        _ => {}
    }
    Ok(changed.then(|| serde_json::to_vec(&value).ok()).flatten())
}

/// Whether the request `method` with `params` (its JSON text) names only the caller's tasks.
/// The methods that name tasks are always read whole (a key spelled with escapes is the same
/// key); others only when [`mentions_tasks`].
pub fn check_request(method: &str, params: &[u8], ids: &dyn TaskIds) -> Result<(), UnknownTask> {
    let names_tasks = addresses_a_task(method) || method == "subscriptions/listen";
    if !names_tasks && !mentions_tasks(params) {
        return Ok(());
    }
    let mut params = match serde_json::from_slice::<Value>(params) {
        Ok(Value::Object(params)) => params,
        // A tasks method without its object of params is the upstream's to refuse.
        _ => return Ok(()),
    };
    unbind_params(method, &mut params, ids).map(|_| ())
}

fn unbind_one(message: &mut Map<String, Value>, ids: &dyn TaskIds) -> Result<bool, UnknownTask> {
    // Responses (the agent answering the upstream) name the agent's own tasks.
    let Some(method) = message
        .get("method")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return Ok(false);
    };
    match message.get_mut("params") {
        Some(Value::Object(params)) => unbind_params(&method, params, ids),
        _ => Ok(false),
    }
}

fn unbind_params(
    method: &str,
    params: &mut Map<String, Value>,
    ids: &dyn TaskIds,
) -> Result<bool, UnknownTask> {
    let unbind = |object: &mut Map<String, Value>| -> Result<bool, UnknownTask> {
        match object.get_mut("taskId") {
            Some(Value::String(bound)) => {
                *bound = ids.unbind(bound).ok_or(UnknownTask)?;
                Ok(true)
            }
            // A task id that is not a string names no task of the caller's.
            Some(_) => Err(UnknownTask),
            None => Ok(false),
        }
    };
    let mut changed = false;
    if addresses_a_task(method) {
        changed |= unbind(params)?;
    }
    if method == "subscriptions/listen" {
        changed |= map_listed_ids(params, &|bound| ids.unbind(bound))?;
    }
    if let Some(task) = related_task(params) {
        changed |= unbind(task)?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// Binds by prefixing the caller's name; remembers creations; lists only `mine-*`.
    struct Caller {
        name: &'static str,
        created: RefCell<Vec<String>>,
    }

    impl Caller {
        fn new(name: &'static str) -> Self {
            Self {
                name,
                created: RefCell::default(),
            }
        }
    }

    impl TaskIds for Caller {
        fn bind(&self, raw: &str) -> String {
            format!("{}:{raw}", self.name)
        }
        fn unbind(&self, bound: &str) -> Option<String> {
            bound
                .strip_prefix(self.name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(str::to_owned)
        }
        fn created(&self, raw: &str) {
            self.created.borrow_mut().push(raw.to_owned());
        }
        fn listed(&self, raw: &str) -> bool {
            raw.starts_with("mine-")
        }
    }

    fn bound(message: &str, ids: &dyn TaskIds) -> Value {
        let out = bind_answer(message.as_bytes(), ids).expect("task ids to bind");
        serde_json::from_slice(&out).expect("JSON")
    }

    #[test]
    fn every_task_id_an_upstream_sends_is_bound_and_creations_are_told() {
        let alice = Caller::new("alice");
        let v = bound(
            r#"{"jsonrpc":"2.0","id":1,"result":{"task":{"taskId":"t1","status":"working"}}}"#,
            &alice,
        );
        assert_eq!(v["result"]["task"]["taskId"], "alice:t1");
        let v = bound(
            r#"{"jsonrpc":"2.0","id":2,"result":{"resultType":"task","taskId":"t2","status":"working"}}"#,
            &alice,
        );
        assert_eq!(v["result"]["taskId"], "alice:t2");
        assert_eq!(*alice.created.borrow(), ["t1", "t2"]);
        let v = bound(
            r#"{"jsonrpc":"2.0","id":3,"result":{"taskId":"t1","status":"completed"}}"#,
            &alice,
        );
        assert_eq!(v["result"]["taskId"], "alice:t1");
        assert_eq!(
            alice.created.borrow().len(),
            2,
            "a tasks/get result creates nothing"
        );
        let v = bound(
            r#"{"jsonrpc":"2.0","method":"notifications/tasks/status","params":{"taskId":"t1","status":"working"}}"#,
            &alice,
        );
        assert_eq!(v["params"]["taskId"], "alice:t1");
        let v = bound(
            r#"{"jsonrpc":"2.0","method":"notifications/subscriptions/acknowledged","params":{"notifications":{"taskIds":["t1","t2"]}}}"#,
            &alice,
        );
        assert_eq!(
            v["params"]["notifications"]["taskIds"],
            serde_json::json!(["alice:t1", "alice:t2"])
        );
        let v = bound(
            r#"{"jsonrpc":"2.0","id":"s1","method":"elicitation/create","params":{"message":"?","_meta":{"io.modelcontextprotocol/related-task":{"taskId":"t1"}}}}"#,
            &alice,
        );
        assert_eq!(v["params"]["_meta"][RELATED_TASK]["taskId"], "alice:t1");
        let v = bound(
            r#"[{"jsonrpc":"2.0","id":4,"result":{"content":[],"_meta":{"io.modelcontextprotocol/related-task":{"taskId":"t1"}}}}]"#,
            &alice,
        );
        assert_eq!(v[0]["result"]["_meta"][RELATED_TASK]["taskId"], "alice:t1");
    }

    #[test]
    fn a_list_keeps_only_the_callers_tasks() {
        let alice = Caller::new("alice");
        let v = bound(
            r#"{"jsonrpc":"2.0","id":1,"result":{"tasks":[{"taskId":"mine-1"},{"taskId":"bobs"},{"taskId":"mine-2"}]}}"#,
            &alice,
        );
        assert_eq!(
            v["result"]["tasks"],
            serde_json::json!([{"taskId": "alice:mine-1"}, {"taskId": "alice:mine-2"}])
        );
    }

    #[test]
    fn messages_without_task_ids_are_left_alone() {
        let alice = Caller::new("alice");
        for message in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"taskId"}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"{\"taskId\":\"t\"}"}]}}"#,
            r#"{"jsonrpc":"2.0","id":"s","method":"tasks/get","params":{"taskId":"agent-side"}}"#,
            "not json taskId",
        ] {
            assert_eq!(bind_answer(message.as_bytes(), &alice), None, "{message}");
        }
    }

    #[test]
    fn an_agent_names_only_its_own_tasks() {
        let alice = Caller::new("alice");
        let get =
            br#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"taskId":"alice:t1"}}"#;
        let out = unbind_request(get, &alice)
            .expect("alice's own task")
            .expect("rewritten");
        let v: Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(v["params"]["taskId"], "t1");
        assert_eq!(
            check_request("tasks/get", br#"{"taskId":"alice:t1"}"#, &alice),
            Ok(())
        );
        for method in ["tasks/get", "tasks/result", "tasks/update", "tasks/cancel"] {
            for params in [
                r#"{"taskId":"bob:t1"}"#,
                r#"{"taskId":"t1"}"#,
                r#"{"taskId":7}"#,
            ] {
                assert_eq!(
                    check_request(method, params.as_bytes(), &alice),
                    Err(UnknownTask),
                    "{method} {params}"
                );
            }
        }
        let listen = br#"{"jsonrpc":"2.0","id":2,"method":"subscriptions/listen","params":{"notifications":{"taskIds":["alice:t1","bob:t2"]}}}"#;
        assert_eq!(unbind_request(listen, &alice), Err(UnknownTask));
        let answer = br#"{"jsonrpc":"2.0","id":"s1","result":{"task":{"taskId":"agent-side"}}}"#;
        assert_eq!(
            unbind_request(answer, &alice),
            Ok(None),
            "the agent's responses name its own tasks"
        );
        let escaped =
            br#"{"jsonrpc":"2.0","id":4,"method":"tasks/get","params":{"task\u0049d":"t1"}}"#;
        assert_eq!(
            unbind_request(escaped, &alice),
            Err(UnknownTask),
            "a key spelled with escapes is the same key"
        );
        assert_eq!(
            check_request("tasks/get", br#"{"task\u0049d":"t1"}"#, &alice),
            Err(UnknownTask)
        );
        let call = br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x","arguments":{"taskId":"free text"}}}"#;
        assert_eq!(unbind_request(call, &alice), Ok(None));
    }
}
