//! The audit trail as tests read it: settings, a role that lets calls through, and the rows
//! `mcp-tunnel audit export` prints.

use std::path::Path;

use mcp_tunnel::govern::audit::{AuditSettings, Record, chain};
use mcp_tunnel::govern::policy::Role;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// Role `caller`: may call `echo` and `add` of any source, nothing else.
pub fn caller_role() -> (String, Role) {
    (
        "caller".into(),
        Role {
            allow: vec!["*/echo".into(), "*/add".into()],
            ..Role::default()
        },
    )
}

/// The audit trail at `path`, with the defaults of `[audit]`.
pub fn audit_at(path: &Path) -> AuditSettings {
    AuditSettings::new(path)
}

/// Every row of the trail at `db`, through `audit export`.
pub async fn export(db: &Path) -> Vec<Value> {
    let db = db.display().to_string();
    let output = super::run_cli(&["audit", "export", "--db", &db]).await;
    assert!(
        output.status.success(),
        "audit export fails: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("row is JSON ({e}): {l}")))
        .collect()
}

/// A row's outcome as `kind` or `kind:code`.
pub fn outcome(row: &Value) -> String {
    match row["outcome"]["code"].as_i64() {
        Some(code) => format!("{}:{code}", row["outcome"]["kind"].as_str().unwrap_or("?")),
        None => row["outcome"]["kind"].as_str().unwrap_or("?").to_owned(),
    }
}

/// A failed command (`ok` false) whose output `out` names every one of `needles`.
pub fn assert_fails_naming(ok: bool, out: &str, needles: &[&str]) {
    assert!(!ok, "{out}");
    for needle in needles {
        assert!(out.contains(needle), "expected {needle:?} in\n{out}");
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64
}

/// Rewrites every row of the trail at `db` with `edit`, and computes every hash afresh so each
/// chain (one per relay and tenant) is whole again; the `subject` and `tool` columns follow the
/// edited record.
pub fn rewrite_rows(db: &Path, edit: impl Fn(&mut Record)) {
    let conn = rusqlite::Connection::open(db).expect("open the copy");
    let rows: Vec<(i64, String, String, i64, Vec<u8>)> = conn
        .prepare("SELECT id, relay, tenant, seq, record FROM records ORDER BY id")
        .expect("prepare")
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let mut heads: std::collections::HashMap<(String, String), [u8; 32]> = Default::default();
    for (id, relay, tenant, seq, bytes) in rows {
        let mut record: Record = serde_json::from_slice(&bytes).expect("a record");
        edit(&mut record);
        let bytes = chain::canonical(&record);
        let prev = heads.entry((relay, tenant)).or_insert(chain::GENESIS);
        let hash = chain::row_hash(prev, seq as u64, &bytes);
        conn.execute(
            "UPDATE records SET record = ?1, subject = ?2, tool = ?3, prev_hash = ?4, hash = ?5 \
             WHERE id = ?6",
            rusqlite::params![
                bytes,
                record.subject,
                record.tool,
                hex::encode(*prev),
                hex::encode(hash),
                id
            ],
        )
        .expect("rewrite a row");
        *prev = hash;
    }
}

/// The audit trail of a harness at `audit.db` in a temporary directory, and the demo upstream
/// (not yet connected) at `upstream`; both go when this is dropped.
pub struct Trail {
    pub db: std::path::PathBuf,
    pub upstream: String,
    _stop: tokio_util::sync::DropGuard,
    _dir: tempfile::TempDir,
}

impl Trail {
    /// A harness on `options` with tenant `acme` holding `acme_roles`, and its trail.
    pub async fn with_roles(acme_roles: Vec<(String, Role)>) -> (super::Harness, Self) {
        Self::start(super::Options {
            acme_roles,
            ..super::Options::default()
        })
        .await
    }

    /// A harness on `options` with the audit trail set, and its trail.
    pub async fn start(options: super::Options) -> (super::Harness, Self) {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("audit.db");
        let harness = super::Harness::start(super::Options {
            audit: Some(audit_at(&db)),
            ..options
        })
        .await;
        let stop = tokio_util::sync::CancellationToken::new();
        let upstream = super::demo_upstream(&stop).await;
        let trail = Self {
            db,
            upstream,
            _stop: stop.drop_guard(),
            _dir: dir,
        };
        (harness, trail)
    }
}

// ---------------------------------------------------------------------------------------------
// Load for the kill tests: agents calling echo until the relay dies.

/// Agent tasks calling echo in a loop.
pub const LOADERS: usize = 6;
/// Answers received before the kill, at least (so the kill lands mid-load).
pub const ANSWERS_BEFORE_KILL: usize = 60;

/// Answers an agent saw (its echoed messages) and the loaders still calling.
pub type Load = (Arc<Mutex<Vec<String>>>, tokio::task::JoinSet<()>);

/// Starts `LOADERS` agents on `url`, each calling echo with a unique message; an answer counts
/// only if it is the echo. Returns once `ANSWERS_BEFORE_KILL` answers came back.
pub async fn load_until_answered(url: &str, api_key: &str) -> Load {
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut loaders = tokio::task::JoinSet::new();
    for loader in 0..LOADERS {
        let mut agent = super::Agent::new(url, api_key);
        agent.http = reqwest::Client::builder()
            .timeout(super::WAIT)
            .build()
            .expect("HTTP client");
        let (answered, seen_tx) = (answered.clone(), seen_tx.clone());
        loaders.spawn(async move {
            if agent.initialize().await.status != 200 {
                return;
            }
            // Bounded: the relay dies long before this many calls.
            for id in 1..=100_000u64 {
                let message = format!("loader{loader}-call{id}");
                let body = json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"echo","arguments":{"message":message}}});
                let Ok(response) = agent
                    .request(reqwest::Method::POST)
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .send()
                    .await
                else {
                    return;
                };
                let Ok(bytes) = response.bytes().await else {
                    return;
                };
                let text = String::from_utf8_lossy(&bytes);
                let data = super::sse_data(&bytes);
                let json_text = data.last().map(String::as_str).unwrap_or(&text);
                match serde_json::from_str::<Value>(json_text) {
                    Ok(v) if v["result"]["content"][0]["text"] == message.as_str() => {
                        answered.lock().expect("lock").push(message);
                        let _ = seen_tx.send(());
                    }
                    _ => return,
                }
            }
        });
    }
    drop(seen_tx);
    tokio::time::timeout(super::WAIT, async {
        for _ in 0..ANSWERS_BEFORE_KILL {
            seen_rx.recv().await.expect("loaders keep answering");
        }
    })
    .await
    .expect("load flows");
    (answered, loaders)
}

/// Every answered message (at least `ANSWERS_BEFORE_KILL`) has a row in `rows`, found by the
/// digest of its params.
pub fn assert_every_answer_has_a_row(rows: &[Value], answered: &[String]) {
    let digests: HashMap<String, usize> = rows
        .iter()
        .filter_map(|r| r["args_sha256"].as_str())
        .fold(HashMap::new(), |mut m, d| {
            *m.entry(d.to_owned()).or_default() += 1;
            m
        });
    assert!(answered.len() >= ANSWERS_BEFORE_KILL);
    let missing: Vec<&String> = answered
        .iter()
        .filter(|message| {
            let params = json!({"name":"echo","arguments":{"message":message}});
            let digest = mcp_tunnel::govern::audit::digest(params.to_string().as_bytes());
            !digests.contains_key(&digest)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} answered calls have no row, e.g. {:?}",
        missing.len(),
        answered.len(),
        missing.first()
    );
}

// ---------------------------------------------------------------------------------------------
// `audit tail --follow` as a child process.

/// `mcp-tunnel audit tail --follow -n 1 --tenant acme --db DB`, read line by line; stopped by
/// its PID in [`Follow::stop`] (or killed when dropped).
pub struct Follow {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Follow {
    /// Starts following acme's rows of the trail `db` (a file or a `postgresql://` URL).
    pub fn start(db: &str) -> Self {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mcp-tunnel"))
            .args([
                "audit", "tail", "--follow", "-n", "1", "--tenant", "acme", "--db", db,
            ])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start tail --follow");
        let stdout = child.stdout.take().expect("piped stdout");
        Self {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    /// Its next line (bounded by `WAIT`).
    pub async fn next_line(&mut self) -> String {
        tokio::time::timeout(super::WAIT, self.lines.next_line())
            .await
            .expect("a line in time")
            .expect("read stdout")
            .expect("tail still running")
    }

    /// Stops it by its PID and reaps it (bounded).
    pub async fn stop(mut self) {
        self.child.start_kill().expect("stop tail by its pid");
        tokio::time::timeout(super::WAIT, self.child.wait())
            .await
            .expect("tail exits in time")
            .expect("wait");
    }
}
