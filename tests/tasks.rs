//! Task ids through the relay with a 2026-07-28 upstream of the tasks extension
//! (`io.modelcontextprotocol/tasks`): the creator polls its task with the id it was given, in
//! the body and in `Mcp-Name` alike, and the upstream sees its own id in both; another caller
//! of the tenant gets "Task not found", with the id it was shown or the upstream's own. (The
//! 2025-11-25 tasks of server-everything are in tests/peers.rs.)

mod common;

use std::sync::{Arc, Mutex};

use common::{Agent, Harness, Options};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// What the upstream saw of each `tasks/get`: the `Mcp-Name` header and `params.taskId`.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A 2026-07-28 upstream whose `tools/call` creates a task (`up-1`, `up-2`, ...) and whose
/// `tasks/get` refuses a request whose `Mcp-Name` is not its `params.taskId`, as the
/// TypeScript SDK's server does.
async fn tasks_upstream(shutdown: &CancellationToken, seen: Seen) -> String {
    let created = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let (seen, created) = (seen.clone(), created.clone());
            async move {
                let message: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let id = message["id"].clone();
                let answer = match message["method"].as_str() {
                    Some("server/discover") => json!({"jsonrpc":"2.0","id":id,"result":{
                        "supportedVersions":["2026-07-28"],
                        "capabilities":{"extensions":{"io.modelcontextprotocol/tasks":{}}},
                        "serverInfo":{"name":"tasks","version":"0"},"resultType":"complete"}}),
                    Some("tools/call") => {
                        let n = created.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        json!({"jsonrpc":"2.0","id":id,"result":{"resultType":"task",
                            "taskId":format!("up-{n}"),"status":"working","ttlMs":60000}})
                    }
                    Some("tasks/get") => {
                        let task = message["params"]["taskId"].as_str().unwrap_or("").to_owned();
                        let name = headers
                            .get("mcp-name")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        seen.lock().expect("not poisoned").push((name.clone(), task.clone()));
                        if name != task {
                            json!({"jsonrpc":"2.0","id":id,"error":{"code":-32001,"message":"Mcp-Name header does not match params.taskId"}})
                        } else if task.starts_with("up-") {
                            json!({"jsonrpc":"2.0","id":id,"result":{"resultType":"complete",
                                "taskId":task,"status":"completed",
                                "result":{"content":[{"type":"text","text":"done"}]}}})
                        } else {
                            json!({"jsonrpc":"2.0","id":id,"error":{"code":-32602,"message":"Task not found"}})
                        }
                    }
                    _ => json!({"jsonrpc":"2.0","id":id,"result":{"resultType":"complete"}}),
                };
                axum::response::Response::builder()
                    .header("content-type", "application/json")
                    .body(axum::body::Body::from(answer.to_string()))
                    .expect("a valid response")
            }
        }),
    );
    let addr = common::serve_axum(app, shutdown).await;
    format!("http://{addr}/mcp")
}

/// A 2026-07-28 request of `method` naming `name` (`Mcp-Name`), by `agent`.
async fn stateless(agent: &Agent, id: u64, method: &str, name: &str, params: Value) -> Value {
    let mut params = params;
    params["_meta"] = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {"extensions": {"io.modelcontextprotocol/tasks": {}}}});
    let response = agent
        .request(reqwest::Method::POST)
        .header("content-type", "application/json")
        .header("mcp-protocol-version", "2026-07-28")
        .header("mcp-method", method)
        .header("mcp-name", name)
        .body(json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}).to_string())
        .send()
        .await
        .expect("sent");
    common::read_answer(response).await.response().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2026_task_is_polled_by_its_creator_alone_with_the_id_it_was_given() {
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let seen = Seen::default();
    let upstream = tasks_upstream(&stop, seen.clone()).await;
    let harness = Harness::start(Options::default()).await;
    let _client = harness
        .connect(&harness.acme, &[("tasks", &upstream)])
        .await;
    let url = harness.url("tasks");
    let alice = Agent::new(&url, &harness.acme.api_key);
    let bob = Agent::new(&url, &harness.acme.second_key);

    let created = stateless(
        &alice,
        1,
        "tools/call",
        "slow",
        json!({"name": "slow", "arguments": {}}),
    )
    .await;
    assert_eq!(created["result"]["resultType"], "task", "{created}");
    let task = created["result"]["taskId"]
        .as_str()
        .expect("a task id")
        .to_owned();
    assert!(
        task.ends_with(".up-1") && task.len() == 22 + 5,
        "TAG.RAW: {task}"
    );

    let got = stateless(&alice, 2, "tasks/get", &task, json!({"taskId": task})).await;
    assert_eq!(got["result"]["status"], "completed", "{got}");
    assert_eq!(
        got["result"]["taskId"],
        task.as_str(),
        "the same id in every answer: {got}"
    );
    assert_eq!(
        *seen.lock().expect("not poisoned"),
        [("up-1".to_owned(), "up-1".to_owned())],
        "the upstream sees its own id in the header and the body"
    );

    // The header must name the body's task as the caller was given it.
    let mismatched = stateless(&alice, 4, "tasks/get", "up-1", json!({"taskId": task})).await;
    assert!(
        mismatched["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Mcp-Name")),
        "{mismatched}"
    );
    assert_eq!(
        seen.lock().expect("not poisoned").len(),
        1,
        "refused at the relay"
    );

    for tried in [task.as_str(), "up-1"] {
        let refused = stateless(&bob, 3, "tasks/get", tried, json!({"taskId": tried})).await;
        assert_eq!(refused["error"]["code"], -32602, "{refused}");
        assert_eq!(
            refused["error"]["message"],
            "Failed to retrieve task: Task not found"
        );
    }
    assert_eq!(
        seen.lock().expect("not poisoned").len(),
        1,
        "nothing of bob's reached the upstream"
    );
    harness.stop().await;
}
