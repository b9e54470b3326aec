//! Configuration hot reload: keys added, removed and roles changed in the file apply to new
//! requests without a restart and without dropping open sessions; an invalid file is refused
//! with an error naming the problem and the running configuration stays. In-process (the
//! library's reloader and file watcher) and against the relay binary (SIGHUP, and its own file
//! watcher).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{
    Agent, LISTENERS, RelayProcess, WAIT, assert_echo, cert_dir, quic_settings, tool_text,
    write_config,
};
use mcp_tunnel::client;
use mcp_tunnel::govern::SecretHash;
use mcp_tunnel::govern::identity::new_secret;
use mcp_tunnel::relay::reload::{self, FileStamp};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

/// A digest no secret has: a placeholder the same length as a real one.
const NO_KEY: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// An agent key line of the config: subject, digest, roles.
type KeyLine<'a> = (&'a str, String, &'a [&'a str]);

/// A relay config on loopback ports the OS picks: tenant `acme` with `token`, `keys` and
/// `roles` (name, allowed globs), then `extra` verbatim (more keys of the last key, sections).
fn config_text(
    token: &str,
    keys: &[KeyLine<'_>],
    roles: &[(&str, &[&str])],
    extra: &str,
) -> String {
    let mut text = format!(
        r#"{LISTENERS}
[admin]
listen = "127.0.0.1:0"

[[tenants]]
name = "acme"
tunnel_tokens = ["{}"]
"#,
        SecretHash::of(token)
    );
    for (name, allow) in roles {
        text.push_str(&format!(
            "\n[[tenants.roles]]\nname = {name:?}\nallow = {allow:?}\n"
        ));
    }
    for (subject, digest, roles) in keys {
        text.push_str(&format!(
            "\n[[tenants.keys]]\nsubject = {subject:?}\nroles = {roles:?}\nkey = {digest:?}\n"
        ));
    }
    text.push_str(extra);
    text
}

fn digest(secret: &str) -> String {
    SecretHash::of(secret).to_string()
}

/// Runs a `connect` for `token` serving `demo` from a fresh demo upstream; stops on drop.
async fn connect(
    tunnel: &str,
    token: &str,
    ca_pem: &str,
) -> (tokio::task::JoinHandle<()>, DropGuard) {
    let stop = CancellationToken::new();
    let upstream = common::demo_upstream(&stop).await;
    let settings = quic_settings(tunnel, token, ca_pem, &[("demo", &upstream)]);
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let _ = client::run(settings, stop).await;
        }
    });
    (task, stop.drop_guard())
}

/// A relay running in this process from a config file, with `connect` serving `demo`.
type FileRelay = common::ReloadableRelay;

/// An agent with a session open on `demo`, its echo checked.
async fn open_session(url: &str, key: &str) -> Agent {
    let mut agent = Agent::new(url, key);
    agent.initialize_result().await;
    assert!(agent.session.is_some());
    assert_echo(&agent, 1, "opened").await;
    agent
}

/// The status of a fresh `initialize` with `key`.
async fn initialize_status(url: &str, key: &str) -> u16 {
    Agent::new(url, key).initialize().await.status
}

/// A relay whose file holds alice's key only, and a session of hers open.
type AliceOnly = (
    String,
    [String; 2],
    KeyLine<'static>,
    FileRelay,
    String,
    Agent,
);

/// A relay whose file holds alice's key only, with a session of hers open; bob's key is made
/// but not in the file. Returns the tunnel token, alice's and bob's keys, alice's key line, the
/// relay, its agent URL and alice's session.
async fn alice_only() -> AliceOnly {
    let token = new_secret("mcpt_tok_");
    let (alice, bob) = (new_secret("mcpt_key_"), new_secret("mcpt_key_"));
    let alice_line = ("alice", digest(&alice), &[][..]);
    let relay = FileRelay::start(
        &token,
        &config_text(&token, std::slice::from_ref(&alice_line), &[], ""),
        &["demo"],
    )
    .await;
    let url = relay.url("demo");
    let session = open_session(&url, &alice).await;
    (token, [alice, bob], alice_line, relay, url, session)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_added_to_the_file_works_once_the_watcher_sees_it_and_open_sessions_stay() {
    let (token, [_, bob], alice_line, mut relay, url, session) = alice_only().await;
    assert_eq!(
        initialize_status(&url, &bob).await,
        401,
        "bob is not in the file yet"
    );

    let hangup = Arc::new(Notify::new());
    let watcher = tokio::spawn(reload::watch(
        relay.reloader.take().expect("reloader"),
        Duration::from_millis(100),
        hangup,
        relay.shutdown.clone(),
    ));
    relay.write(&config_text(
        &token,
        &[alice_line, ("bob", digest(&bob), &[])],
        &[],
        "",
    ));
    tokio::time::timeout(WAIT, async {
        while initialize_status(&url, &bob).await != 200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("bob's key works once the watcher has reloaded the file");

    let session_id = session.session.clone();
    assert_echo(&session, 2, "same session after the reload").await;
    assert_eq!(session.session, session_id);
    assert_eq!(
        relay.state.sessions.len(),
        2,
        "alice's session and bob's both live"
    );
    relay.shutdown.cancel();
    tokio::time::timeout(WAIT, watcher)
        .await
        .expect("the watcher stops with the relay")
        .expect("the watcher does not panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_key_stops_working_for_new_requests() {
    let token = new_secret("mcpt_tok_");
    let (alice, bob) = (new_secret("mcpt_key_"), new_secret("mcpt_key_"));
    let alice_line = ("alice", digest(&alice), &[][..]);
    let both = config_text(
        &token,
        &[alice_line.clone(), ("bob", digest(&bob), &[])],
        &[],
        "",
    );
    let mut relay = FileRelay::start(&token, &both, &["demo"]).await;
    let url = relay.url("demo");
    let alice_session = open_session(&url, &alice).await;
    let bob_session = open_session(&url, &bob).await;

    relay.write(&config_text(&token, &[alice_line], &[], ""));
    let summary = relay.reloader().reload().await.expect("the file reloads");
    assert_eq!(
        (
            summary.keys.before,
            summary.keys.after,
            summary.keys.removed
        ),
        (2, 1, 1),
        "{summary:?}"
    );
    assert!(summary.restart_needed.is_empty(), "{summary:?}");

    assert_eq!(
        initialize_status(&url, &bob).await,
        401,
        "bob's key is gone"
    );
    let revoked = bob_session
        .call_tool(2, "echo", json!({"message": "x"}))
        .await;
    assert_eq!(
        revoked.status, 401,
        "every request authenticates, in a session too: {revoked:?}"
    );
    assert_echo(&alice_session, 2, "alice is untouched").await;
    assert_eq!(initialize_status(&url, &alice).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_naming_the_problem_and_the_old_keys_still_work() {
    let (token, [alice, bob], alice_line, mut relay, url, session) = alice_only().await;
    let bob_line = ("bob", digest(&bob), &[][..]);

    // Each refused file (what is wrong, its keys, its extra lines): what its error names.
    let refused: [(&str, Vec<KeyLine<'_>>, &str, &[&str]); 3] = [
        (
            "an unknown key",
            vec![alice_line.clone(), bob_line.clone()],
            "bogus_key = 1\n",
            &["bogus_key", "line"],
        ),
        (
            "an undefined role",
            vec![alice_line.clone(), ("bob", digest(&bob), &["auditor"])],
            "",
            &["auditor"],
        ),
        (
            "a clear-text key",
            vec![alice_line.clone(), ("bob", bob.clone(), &[])],
            "",
            &["key of bob"],
        ),
    ];
    for (id, (what, keys, extra, named)) in (2..).zip(refused) {
        let error = relay
            .reload_refused(
                &config_text(&token, &keys, &[], extra),
                &format!("{what} is refused"),
            )
            .await;
        assert!(
            named.iter().all(|n| error.contains(n)),
            "{what}: the error names {named:?}: {error}"
        );
        assert_eq!(
            initialize_status(&url, &bob).await,
            401,
            "{what}: nothing of the refused file applies"
        );
        assert_echo(&session, id, "the running configuration stays").await;
        assert_eq!(initialize_status(&url, &alice).await, 200);
    }

    // A valid file applies, and what reload cannot apply is reported, not silently dropped.
    assert_valid_file_applies(&mut relay, &token, [alice_line, bob_line], &bob).await;
    assert_echo(&session, 5, "and the session lives on").await;
}

/// A valid file with both keys and new limits reloads: bob's key works, the request timeout
/// applies and the raised body limit is reported as needing a restart.
async fn assert_valid_file_applies(
    relay: &mut FileRelay,
    token: &str,
    [alice_line, bob_line]: [KeyLine<'_>; 2],
    bob: &str,
) {
    let url = relay.url("demo");
    relay.write(&config_text(
        token,
        &[alice_line, bob_line],
        &[],
        "\n[limits]\nrequest_timeout_secs = 60\nmax_message_bytes = 33554432\n",
    ));
    let summary = relay
        .reloader()
        .reload()
        .await
        .expect("a valid file reloads");
    assert_eq!(
        summary.restart_needed,
        vec!["[limits] max_message_bytes (raised above the starting value)"],
        "{summary:?}"
    );
    assert_eq!(
        relay.state.request_timeout(),
        Duration::from_secs(60),
        "the request timeout applies without a restart"
    );
    assert_eq!(
        relay.state.max_message_bytes(),
        mcp_tunnel::config::DEFAULT_MAX_MESSAGE_BYTES,
        "the body limit does not rise above the tunnels' frame limit"
    );
    assert_eq!(
        (summary.keys.added, summary.keys.after),
        (1, 2),
        "{summary:?}"
    );
    assert_eq!(initialize_status(&url, bob).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_changed_by_reload_applies_to_the_next_call_of_an_open_session() {
    let token = new_secret("mcpt_tok_");
    let alice = new_secret("mcpt_key_");
    let with_allow = |allow: &[&str]| {
        config_text(
            &token,
            &[("alice", digest(&alice), &["analyst"])],
            &[("analyst", allow)],
            "",
        )
    };
    let mut relay =
        FileRelay::start(&token, &with_allow(&["demo/echo", "demo/add"]), &["demo"]).await;
    let url = relay.url("demo");
    let session = open_session(&url, &alice).await;
    let add = |id: u64| session.call_tool(id, "add", json!({"a": 1, "b": 2}));
    assert_eq!(tool_text(add(2).await.response()), "3");
    assert_eq!(session.tool_names(1).await, ["add", "echo"]);

    relay.write(&with_allow(&["demo/echo"]));
    let summary = relay.reloader().reload().await.expect("reloads");
    assert_eq!(summary.roles.changed, 1, "{summary:?}");
    let denied = add(3).await;
    assert_eq!(
        denied.status, 200,
        "a denial is a JSON-RPC error, not HTTP: {denied:?}"
    );
    assert_eq!(denied.response()["id"], 3);
    assert!(
        denied.response()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Unknown tool")),
        "{denied:?}"
    );
    assert_echo(&session, 4, "echo is still allowed, in the same session").await;
    assert_eq!(
        session.tool_names(6).await,
        ["echo"],
        "the list follows the new role"
    );

    relay.write(&with_allow(&["demo/*"]));
    relay.reloader().reload().await.expect("reloads");
    assert_eq!(tool_text(add(5).await.response()), "3", "allowed again");
    assert!(session.tool_names(7).await.contains(&"add".to_owned()));
    assert_eq!(relay.state.sessions.len(), 1, "one session throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_applies_by_reload_and_an_invalid_one_is_refused_naming_tenant_and_role() {
    let token = new_secret("mcpt_tok_");
    let alice = new_secret("mcpt_key_");
    let with_condition = |when: &str| {
        let condition = if when.is_empty() {
            String::new()
        } else {
            format!("\n[[tenants.roles.conditions]]\nmatch = \"demo/echo\"\nwhen = '{when}'\n")
        };
        let mut text = config_text(&token, &[], &[("analyst", &["demo/*"])], &condition);
        text.push_str(&format!(
            "\n[[tenants.keys]]\nsubject = \"alice\"\nroles = [\"analyst\"]\nkey = {:?}\n",
            digest(&alice)
        ));
        text
    };
    let mut relay = FileRelay::start(&token, &with_condition(""), &["demo"]).await;
    let url = relay.url("demo");
    let session = open_session(&url, &alice).await;
    assert_echo(&session, 2, "secret").await;

    relay.write(&with_condition(
        r#"args.message != "secret" || "hr" in roles"#,
    ));
    relay
        .reloader()
        .reload()
        .await
        .expect("a condition reloads");
    let secret_is_refused = |id: u64, why: &'static str| {
        let session = &session;
        async move {
            let denied = session
                .call_tool(id, "echo", json!({"message": "secret"}))
                .await;
            assert_eq!(
                denied.response()["error"]["message"],
                "Unknown tool: echo",
                "{why}: {denied:?}"
            );
        }
    };
    secret_is_refused(3, "the condition applies to the open session's next call").await;
    assert_echo(&session, 4, "public").await;

    relay.write(&with_condition("args.message !="));
    let error = relay
        .reloader()
        .reload()
        .await
        .expect_err("an expression that does not compile is refused")
        .to_string();
    assert!(
        error.contains("tenant acme")
            && error.contains("role analyst")
            && error.contains("invalid CEL expression"),
        "the error names the tenant, the role and the problem: {error}"
    );
    secret_is_refused(5, "the running condition stays").await;
    assert_echo(&session, 6, "public").await;
    assert_eq!(relay.state.sessions.len(), 1, "one session throughout");
}

// ---------------------------------------------------------------------------------------------
// The relay binary: SIGHUP, and its own file watcher.

/// A child process whose output is read line by line (so a full pipe never blocks it).
/// Rewrites `path` in place keeping its modification time, so that its stamp (time, length,
/// inode) does not change and only a SIGHUP can make the relay read it.
fn rewrite_keeping_stamp(path: &Path, text: &str) {
    let before = FileStamp::read(path).expect("stamp");
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .expect("mtime");
    std::fs::write(path, text).expect("rewrite in place");
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(modified))
        .expect("restore mtime");
    assert_eq!(
        FileStamp::read(path),
        Some(before),
        "same length, inode and time"
    );
}

/// The binary's watcher: an invalid file is refused, naming the key, and nothing changes; a
/// valid change (bob removed) is picked up without a signal.
async fn watcher_refuses_then_applies(
    relay: &mut RelayProcess,
    path: &Path,
    token: &str,
    alice_line: KeyLine<'_>,
    session: &Agent,
    bob: &str,
) {
    let url = format!("http://{}/mcp/demo", relay.agents);
    std::fs::write(
        path,
        config_text(
            token,
            std::slice::from_ref(&alice_line),
            &[],
            "bogus_key = 1\n",
        ),
    )
    .expect("write an invalid file");
    let refused = relay.wait_for("reload refused").await;
    assert!(
        refused.contains("bogus_key") && refused.contains("line"),
        "the log line names the key and its line: {refused}"
    );
    assert_eq!(initialize_status(&url, bob).await, 200, "bob still works");
    assert_echo(session, 3, "alice's session too").await;

    // A valid change (bob removed) is picked up by the watcher, without a signal.
    std::fs::write(path, config_text(token, &[alice_line], &[], "")).expect("write");
    let reloaded = relay.wait_for("configuration reloaded").await;
    assert!(reloaded.contains("keys=2 -> 1 (+0 -1 ~0)"), "{reloaded}");
    assert_eq!(initialize_status(&url, bob).await, 401, "bob's key is gone");
    assert_echo(session, 4, "alice's session survived both reloads").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_binary_reloads_on_sighup_and_on_file_change() {
    common::init_tracing();
    let (dir, certs) = cert_dir();
    let token = new_secret("mcpt_tok_");
    let (alice, bob) = (new_secret("mcpt_key_"), new_secret("mcpt_key_"));
    let alice_line = ("alice", digest(&alice), &[][..]);
    // Bob's entry holds a placeholder digest of the same length as his real one.
    let path = write_config(
        dir.path(),
        &config_text(
            &token,
            &[alice_line.clone(), ("bob", NO_KEY.into(), &[])],
            &[],
            "",
        ),
    );

    let mut relay = RelayProcess::start(&path).await;
    let (tunnel, agents) = (relay.tunnel, relay.agents);
    let (_connect_task, _connect) = connect(&tunnel.to_string(), &token, &certs.ca_pem).await;
    relay.wait_for("tunnel connected").await;
    let url = format!("http://{agents}/mcp/demo");
    let session = open_session(&url, &alice).await;
    assert_eq!(initialize_status(&url, &bob).await, 401);

    // SIGHUP: the file changed without its stamp changing, so the watcher cannot have seen it.
    rewrite_keeping_stamp(
        &path,
        &config_text(
            &token,
            &[alice_line.clone(), ("bob", digest(&bob), &[])],
            &[],
            "",
        ),
    );
    relay.peer.signal(libc::SIGHUP);
    relay.wait_for("SIGHUP: reloading").await;
    let reloaded = relay.wait_for("configuration reloaded").await;
    assert!(reloaded.contains("keys=2 -> 2 (+1 -1 ~0)"), "{reloaded}");
    assert!(
        !relay.peer.output().contains("configuration file changed"),
        "the SIGHUP did it:\n{}",
        relay.peer.output()
    );
    assert_eq!(initialize_status(&url, &bob).await, 200, "bob's key works");
    assert_echo(&session, 2, "alice's session survived the SIGHUP").await;

    watcher_refuses_then_applies(&mut relay, &path, &token, alice_line, &session, &bob).await;

    relay.peer.signal(libc::SIGTERM);
    let status = tokio::time::timeout(WAIT, relay.peer.child.0.wait())
        .await
        .unwrap_or_else(|_| panic!("relay exits after SIGTERM:\n{}", relay.peer.output()))
        .expect("wait for the relay");
    assert!(status.success(), "{status}:\n{}", relay.peer.output());
}
