//! The third-party test peers pinned in `tests/peers/` (installed by
//! `scripts/install-peers.sh`): where they are and how to start them.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::Peer;

pub const INSTALL_HINT: &str = "run scripts/install-peers.sh to install the test peers";

/// `tests/peers`.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("peers")
}

/// `path` under `tests/peers`, which must exist.
pub fn peer_file(relative: &str) -> PathBuf {
    let path = peers_dir().join(relative);
    assert!(
        path.exists(),
        "{} is missing: {INSTALL_HINT}",
        path.display()
    );
    path
}

/// The venv's Python interpreter.
pub fn python() -> PathBuf {
    peer_file(".venv/bin/python")
}

/// server-everything's entry point (`node index.js stdio|sse|streamableHttp`).
pub fn server_everything_script() -> PathBuf {
    peer_file("node_modules/@modelcontextprotocol/server-everything/dist/index.js")
}

/// server-everything (Streamable HTTP, session era) run by `node` on a free port; returns it
/// and its URL.
pub async fn start_server_everything(node: impl AsRef<OsStr>) -> (Peer, String) {
    let port = super::free_port();
    let mut command = tokio::process::Command::new(node);
    command
        .arg(server_everything_script())
        .arg("streamableHttp")
        .env("PORT", port.to_string());
    let mut peer = Peer::start("server-everything", &mut command);
    peer.wait_for_line("its listening line", |line| {
        line.contains("listening on port")
    })
    .await;
    // It listens on every interface; traffic goes to loopback only.
    (peer, format!("http://127.0.0.1:{port}/mcp"))
}

/// A Python peer script (`tests/peers/SCRIPT PORT`, a Uvicorn server) on a free port; returns
/// it and its URL.
pub async fn start_python_server(script: &'static str) -> (Peer, String) {
    start_python_server_with(script, &[]).await
}

/// [`start_python_server`] with `args` after the port.
pub async fn start_python_server_with(script: &'static str, args: &[&str]) -> (Peer, String) {
    let port = super::free_port();
    let mut command = tokio::process::Command::new(python());
    command
        .arg(peer_file(script))
        .arg(port.to_string())
        .args(args)
        .env("PYTHONUNBUFFERED", "1");
    let mut peer = Peer::start(script, &mut command);
    peer.wait_for_line("\"Uvicorn running on\"", |line| {
        line.contains("Uvicorn running on")
    })
    .await;
    (peer, format!("http://127.0.0.1:{port}/mcp"))
}
