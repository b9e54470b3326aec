//! `mcp-tunnel demo` as a newcomer runs it: its default port taken, an explicit `--listen`
//! taken, and Ctrl-C, which must leave no temporary folder behind.

mod common;

use common::{Peer, WAIT};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_takes_a_free_port_when_8080_is_taken_and_removes_its_folder_on_ctrl_c() {
    // Hold 8080 if it is free; if it is not, someone else holds it and it is taken all the same.
    let held = std::net::TcpListener::bind("127.0.0.1:8080").ok();
    let mut command = Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"));
    command.arg("demo").env("RUST_LOG", "mcp_tunnel=debug,warn");
    let mut demo = Peer::start("mcp-tunnel demo", &mut command);
    let url = demo.line_after("agent URL: ").await;
    let key = demo.line_after("API key: ").await;
    let folder = demo.line_after("Ctrl-C stops the demo and removes ").await;
    let folder = std::path::PathBuf::from(
        folder
            .strip_suffix(" (audit trail and key)")
            .expect("the folder line names what it holds"),
    );
    if held.is_some() {
        assert!(
            !url.starts_with("http://127.0.0.1:8080/"),
            "the demo claims the taken port: {url}"
        );
        assert!(
            demo.output().contains("127.0.0.1:8080 is taken"),
            "the demo says why it moved:\n{}",
            demo.output()
        );
    }
    // The printed URL serves.
    let init = common::Agent::new(&url, &key).initialize().await;
    assert_eq!(
        init.status, 200,
        "the demo answers at its printed URL: {init:?}"
    );
    assert!(
        folder.join("audit.db").exists(),
        "the audit trail is in {}",
        folder.display()
    );

    demo.signal(libc::SIGINT);
    let status = demo.exit_status(tokio::time::Instant::now() + WAIT).await;
    assert!(
        status.success(),
        "the demo exits cleanly on Ctrl-C: {status:?}"
    );
    assert!(
        !folder.exists(),
        "{} is left behind; output:\n{}",
        folder.display(),
        demo.output()
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_a_taken_listen_address_fails_in_one_line_naming_listen() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("address").to_string();
    let output = tokio::time::timeout(
        WAIT,
        Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"))
            .args(["demo", "--listen", &addr])
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LOG", "error")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo ends in time")
    .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one line, no backtrace:\n{stderr}"
    );
    assert!(
        stderr.contains(&addr) && stderr.contains("--listen"),
        "{stderr}"
    );
}
