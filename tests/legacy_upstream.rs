//! `connect` in front of an upstream that speaks the 2024-11-05 HTTP+SSE transport: the
//! reference server-everything in its `sse` mode, reached by agents over Streamable HTTP.

mod common;

use std::process::Stdio;

use common::{Harness, Options, WAIT, tool_text};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

/// server-everything in its `sse` mode on a free port, started (it printed its listening
/// line); returns it and the port.
async fn start_sse_everything() -> (common::Child, u16) {
    let script = common::peers::server_everything_script();
    let port = common::free_port();
    let mut child = common::spawn(
        tokio::process::Command::new("node")
            .arg(&script)
            .arg("sse")
            .env("PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let stderr = child.0.stderr.take().expect("piped");
    let stdout = child.0.stdout.take().expect("piped");
    // Every output line goes to one queue, drained for the child's whole life.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    for reader in [
        Box::new(stderr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
        Box::new(stdout),
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = tx.send(line);
            }
        });
    }
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.recv().await {
            if line.contains("listening on port") || line.contains("running on") {
                break;
            }
        }
    })
    .await
    .expect("server-everything (sse) starts");
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamable_agents_reach_an_http_sse_upstream() {
    let (mut child, port) = start_sse_everything().await;
    let harness = Harness::start(Options::default()).await;
    // It listens on every interface; traffic goes to loopback only.
    let (_client, mut agent) = harness
        .acme_serving("everything", &format!("http://127.0.0.1:{port}/sse"))
        .await;
    let result = agent.initialize_result().await;
    assert!(result["serverInfo"].is_object(), "{result}");
    let list = agent
        .post(&json!({"jsonrpc":"2.0","id":1,"method":"tools/list"}))
        .await;
    assert!(
        list.response()["result"]["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .any(|t| t["name"] == "echo"),
        "{list:?}"
    );
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..5u64 {
        let agent = agent.clone();
        calls.spawn(async move {
            let answer = agent
                .call_tool(10 + i, "echo", json!({"message": format!("m{i}")}))
                .await;
            assert_eq!(answer.response()["id"], 10 + i);
            assert_eq!(tool_text(answer.response()), format!("Echo: m{i}"));
        });
    }
    while let Some(call) = calls.join_next().await {
        call.expect("concurrent calls each get their own answer");
    }
    assert_eq!(agent.delete().await, 200);
    let _ = child.0.start_kill();
    let _ = child.0.wait().await;
}
