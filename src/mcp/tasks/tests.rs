use std::cell::RefCell;

use serde_json::{Value, json};

use super::*;
use crate::mcp::classify;

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

/// An agent's message as admission unbinds it: each message's splices, applied; `Ok(None)`
/// when nothing changes.
fn unbind(message: &[u8], ids: &dyn TaskIds) -> Result<Option<Vec<u8>>, UnknownTask> {
    let classified = classify(message).expect("JSON-RPC");
    let mut splices = Vec::new();
    for info in classified.messages() {
        let Some(range) = info.payload.clone() else {
            continue;
        };
        let found = unbind_payload(
            info.kind,
            info.method.as_deref(),
            &message[range.clone()],
            ids,
        )?;
        splices.extend(found.into_iter().map(|s| s.shifted(range.start)));
    }
    Ok((!splices.is_empty()).then(|| apply_splices(message, &splices)))
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
        json!(["alice:t1", "alice:t2"])
    );
    let v = bound(
        r#"{"jsonrpc":"2.0","id":"s1","method":"elicitation/create","params":{"message":"?","_meta":{"io.modelcontextprotocol/related-task":{"taskId":"t1"}}}}"#,
        &alice,
    );
    assert_eq!(v["params"]["_meta"][RELATED_TASK]["taskId"], "alice:t1");
    let v = bound(
        r#"[{"jsonrpc":"2.0","id":4,"result":{"content":[],"_meta":{"io.modelcontextprotocol/related-task":{"taskId":"t1"}}}}, {"jsonrpc":"2.0","id":5,"result":{"taskId":"t\u0033"}}]"#,
        &alice,
    );
    assert_eq!(v[0]["result"]["_meta"][RELATED_TASK]["taskId"], "alice:t1");
    assert_eq!(
        v[1]["result"]["taskId"], "alice:t3",
        "escapes read as the id they spell"
    );
}

#[test]
fn binding_changes_only_the_ids() {
    let alice = Caller::new("alice");
    let message = r#"{"jsonrpc":"2.0","id":1,"result":{"z":1,"big":123456789012345678901234567890,"taskId":"t1","a":[1.50]}}"#;
    let out = bind_answer(message.as_bytes(), &alice).expect("bound");
    assert_eq!(
        String::from_utf8(out).expect("UTF-8"),
        message.replace("\"t1\"", "\"alice:t1\""),
        "key order, numbers and spacing stay as the upstream wrote them"
    );
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
        json!([{"taskId": "alice:mine-1"}, {"taskId": "alice:mine-2"}])
    );
    let v = bound(
        r#"{"jsonrpc":"2.0","id":1,"result":{"tasks":[{"taskId":"bobs"}]}}"#,
        &alice,
    );
    assert_eq!(v["result"]["tasks"], json!([]));
}

#[test]
fn messages_without_task_ids_are_left_alone() {
    let alice = Caller::new("alice");
    for message in [
        r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}]}}"#,
        r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"taskId"}]}}"#,
        r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"{\"taskId\":\"t\"}"}]}}"#,
        r#"{"jsonrpc":"2.0","id":"s","method":"tasks/get","params":{"taskId":"agent-side"}}"#,
        "not json \"taskId\"",
        r#"{"jsonrpc":"2.0","id":1,"result":{"taskId":7}}"#,
    ] {
        assert_eq!(bind_answer(message.as_bytes(), &alice), None, "{message}");
    }
}

#[test]
fn an_agent_names_only_its_own_tasks() {
    let alice = Caller::new("alice");
    let get = br#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"taskId":"alice:t1"}}"#;
    let out = unbind(get, &alice)
        .expect("alice's own task")
        .expect("rewritten");
    assert_eq!(
        out,
        br#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"taskId":"t1"}}"#.to_vec()
    );
    assert_eq!(task_id_of(br#"{"taskId":"t1"}"#).as_deref(), Some("t1"));
    for method in ["tasks/get", "tasks/result", "tasks/update", "tasks/cancel"] {
        for params in [
            r#"{"taskId":"bob:t1"}"#,
            r#"{"taskId":"t1"}"#,
            r#"{"taskId":7}"#,
            r#"{"task\u0049d":"t1"}"#,
            r#"{"taskId":"t1","x":1e400}"#,
            r#"{"taskId":"alice:t1","taskId":"t1"}"#,
            r#"{"taskId":"\ud800"}"#,
            r#"{"taskId":"alice:t1","TaskID":"t2"}"#,
            r#"{"taskId":"alice:t1","ta\u017fkId":"t2"}"#,
            r#"[]"#,
        ] {
            assert_eq!(
                unbind_payload(
                    MessageKind::Request,
                    Some(method),
                    params.as_bytes(),
                    &alice
                ),
                Err(UnknownTask),
                "{method} {params}"
            );
        }
    }
    let deep = format!(
        r#"{{"taskId":"t1","x":{}{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    assert_eq!(
        unbind_payload(
            MessageKind::Request,
            Some("tasks/get"),
            deep.as_bytes(),
            &alice
        ),
        Err(UnknownTask)
    );
    let own = br#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"taskId":"alice:t1","x":1e400}}"#;
    assert_eq!(
        unbind(own, &alice)
            .expect("the caller's own")
            .expect("rewritten"),
        br#"{"jsonrpc":"2.0","id":1,"method":"tasks/get","params":{"taskId":"t1","x":1e400}}"#
            .to_vec(),
        "the rest of the request goes on byte for byte"
    );
    let listen = br#"{"jsonrpc":"2.0","id":2,"method":"subscriptions/listen","params":{"notifications":{"taskIds":["alice:t1","bob:t2"]}}}"#;
    assert_eq!(unbind(listen, &alice), Err(UnknownTask));
    let related = br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x","_meta":{"io.modelcontextprotocol/related-\u0074ask":{"taskId":"t1"}}}}"#;
    assert_eq!(
        unbind(related, &alice),
        Err(UnknownTask),
        "a related-task key spelled with escapes is the same key"
    );
    let call = br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x","arguments":{"taskId":"free text","n":1e400}}}"#;
    assert_eq!(
        unbind(call, &alice),
        Ok(None),
        "arguments are never read: a tool's own taskId argument and numbers past f64 go on"
    );
}

#[test]
fn an_agents_responses_and_notifications_may_name_its_own_tasks() {
    let alice = Caller::new("alice");
    let answer = br#"{"jsonrpc":"2.0","id":"s1","result":{"task":{"taskId":"agent-side"}}}"#;
    assert_eq!(unbind(answer, &alice), Ok(None));
    let elicited = br#"{"jsonrpc":"2.0","id":"s2","result":{"action":"accept","_meta":{"io.modelcontextprotocol/related-task":{"taskId":"alice:t1"}}}}"#;
    let out = unbind(elicited, &alice)
        .expect("a response")
        .expect("rewritten");
    let v: Value = serde_json::from_slice(&out).expect("JSON");
    assert_eq!(v["result"]["_meta"][RELATED_TASK]["taskId"], "t1");
    let status = br#"{"jsonrpc":"2.0","method":"notifications/tasks/status","params":{"taskId":"own","_meta":{"io.modelcontextprotocol/related-task":{"taskId":"own"}}}}"#;
    assert_eq!(unbind(status, &alice), Ok(None));
}
