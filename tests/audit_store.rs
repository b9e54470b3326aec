//! The audit trail's storage, end to end: records appended through the `Auditor`, then read,
//! exported and verified by the real `mcp-tunnel audit` commands, before and after tampering
//! with the SQLite file directly.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::audit::{assert_fails_naming, now_ms, rewrite_rows};
use mcp_tunnel::govern::audit::AuditSettings;
use mcp_tunnel::govern::audit::store::RECORD_COLUMNS;
use mcp_tunnel::govern::audit::{Auditor, Direction, Outcome, Record, Verdict, digest};
use rusqlite::Connection;

/// Bound on one command or batch of appends: generous for a loaded CI machine, finite.
const WAIT: Duration = Duration::from_secs(60);

/// The time of record 0; record `n` is `n` ms later.
const BASE_MS: u64 = 1_764_140_400_000;

/// Rows per tenant in the tampering tests.
const PER_TENANT: u64 = 30;

/// Record `n` of `tenant`: allowed, denied and failing in a fixed pattern, with `n` in the
/// request id and the time, so tests know which rows a filter must return.
fn record(tenant: &str, n: u64) -> Record {
    let decision = if n % 4 == 3 {
        Verdict::Deny
    } else {
        Verdict::Allow
    };
    let outcome = match (decision, n % 4) {
        (Verdict::Deny, _) => Outcome::Error(-32602),
        (_, 1) => Outcome::ToolError,
        (_, 2) => Outcome::Error(-32603),
        _ => Outcome::Ok,
    };
    Record {
        time_ms: BASE_MS + n,
        tenant: tenant.into(),
        subject: format!("user{}@{tenant}.example", n % 3),
        roles: vec!["analyst".into()],
        source: if n.is_multiple_of(2) { "db" } else { "web" }.into(),
        session: Some(format!("s{}", n % 5)),
        transport: Some("quic".into()),
        protocol_version: Some("2025-11-25".into()),
        direction: Direction::AgentToServer,
        method: "tools/call".into(),
        request_id: Some(format!("{tenant}-{n}")),
        tool: Some(if n.is_multiple_of(3) { "query" } else { "echo" }.into()),
        resource: None,
        prompt: None,
        decision,
        rule: "test rule".into(),
        outcome,
        latency_us: 100 + n,
        bytes_in: 50,
        bytes_out: 70,
        args_sha256: digest(format!("{{\"n\":{n}}}").as_bytes()),
        args: None,
        result: None,
        call: None,
    }
}

/// A trail in `dir` with `per_tenant` records for each of `acme` and `globex`, appended from
/// `tasks` concurrent tasks, closed (so every row is signed). Returns the database path.
async fn fill(dir: &Path, per_tenant: u64, tasks: u64) -> PathBuf {
    let config = AuditSettings::new(dir.join("audit.db"));
    let auditor = Auditor::open(&config).expect("open the trail");
    let mut handles = Vec::new();
    for task in 0..tasks {
        let auditor = auditor.clone();
        handles.push(tokio::spawn(async move {
            let mut n = task;
            while n < per_tenant {
                for tenant in ["acme", "globex"] {
                    auditor.append(record(tenant, n)).await.expect("append");
                }
                n += tasks;
            }
        }));
    }
    tokio::time::timeout(WAIT, async {
        for handle in handles {
            handle.await.expect("append task");
        }
    })
    .await
    .expect("appends finish in time");
    auditor.close().await;
    config.path
}

/// Runs `mcp-tunnel ARGS`; returns success and stdout + stderr.
async fn cli(args: &[&str]) -> (bool, String) {
    let output = common::run_cli_within(args, WAIT).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

async fn verify(db: &Path) -> (bool, String) {
    cli(&[
        "audit",
        "verify",
        "--db",
        db.to_str().expect("UTF-8 temp path"),
    ])
    .await
}

/// A copy of the trail to tamper with: the file and its WAL, if a reader left one (nothing
/// writes to it any more).
fn copy(db: &Path, name: &str) -> PathBuf {
    let to = db.with_file_name(name);
    std::fs::copy(db, &to).expect("copy the trail");
    let with_suffix = |path: &Path| {
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        PathBuf::from(wal)
    };
    if with_suffix(db).exists() {
        std::fs::copy(with_suffix(db), with_suffix(&to)).expect("copy the WAL");
    }
    to
}

fn tamper(db: &Path, sql: &str) {
    let conn = Connection::open(db).expect("open the copy");
    conn.execute_batch(sql).expect("tamper");
}

#[tokio::test]
async fn verify_passes_then_names_a_changed_deleted_or_swapped_row() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = fill(dir.path(), PER_TENANT, 4).await;

    let (ok, out) = verify(&db).await;
    assert!(ok, "{out}");
    assert!(out.contains("ok: 60 rows, 2 tenants"), "{out}");
    let (ok, out) = verify_with(&db, &dir.path().join("audit.key.pub"), &[]).await;
    assert!(ok, "{out}");
    assert_tampered_copies_fail(&db).await;
    assert_swapped_rows_fail(&db).await;

    // A checkpoint key other than the relay's is refused.
    let other = tempfile::tempdir().expect("temp dir");
    let other_key = other.path().join("other.key");
    mcp_tunnel::govern::audit::key::CheckpointKey::load_or_create(&other_key).expect("key");
    let (ok, out) = verify_with(&db, &other.path().join("other.key.pub"), &[]).await;
    assert!(!ok && out.contains("unknown key"), "{out}");
}

/// Copies of the trail at `db`, each changed in one way (a column, a record, a deleted or cut
/// row, a checkpoint signature), fail verify naming what changed.
async fn assert_tampered_copies_fail(db: &Path) {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "column.db",
            "UPDATE records SET subject = 'mallory' WHERE tenant = 'acme' AND seq = 7;",
            &["tenant \"acme\" seq 7", "column mismatch", "subject"],
        ),
        (
            "record.db",
            "UPDATE records SET record = CAST(replace(CAST(record AS TEXT), 'test rule', 'tset rule') AS BLOB) \
             WHERE tenant = 'globex' AND seq = 11;",
            &["tenant \"globex\" seq 11", "hash mismatch"],
        ),
        (
            "deleted.db",
            "DELETE FROM records WHERE tenant = 'globex' AND seq = 5;",
            &["tenant \"globex\" seq 6", "gap", "seq 5 is missing"],
        ),
        (
            "cut.db",
            "DELETE FROM records WHERE tenant = 'acme' AND seq = 30;",
            &["tenant \"acme\" seq 30", "checkpoint mismatch", "missing"],
        ),
        (
            "resigned.db",
            "UPDATE checkpoints SET signature = replace(signature, substr(signature, 1, 1), \
             CASE substr(signature, 1, 1) WHEN 'a' THEN 'b' ELSE 'a' END) \
             WHERE n = (SELECT MAX(n) FROM checkpoints);",
            &["checkpoint 2", "bad signature"],
        ),
    ];
    for (name, sql, expected) in cases {
        let copy = copy(db, name);
        tamper(&copy, sql);
        let (ok, out) = verify(&copy).await;
        println!("{name}:\n{out}");
        assert!(!ok, "{name}: verify must fail\n{out}");
        for needle in *expected {
            assert!(
                out.contains(needle),
                "{name}: expected {needle:?} in\n{out}"
            );
        }
    }
}

/// Copies of the trail at `db` with two rows swapped, whole or only their records, fail
/// verify.
async fn assert_swapped_rows_fail(db: &Path) {
    // Swap two rows whole (contents, seq and hashes): each row is intact, but out of order.
    let swapped = copy(db, "swapped.db");
    let all = format!("tenant, seq, prev_hash, hash, record, {RECORD_COLUMNS}");
    tamper(
        &swapped,
        &format!(
            "CREATE TEMP TABLE t AS SELECT id, {all} FROM records WHERE tenant = 'acme' AND seq IN (3, 4);
             UPDATE records SET seq = -seq WHERE id IN (SELECT id FROM t);
             UPDATE records SET ({all}) = (SELECT {all} FROM t WHERE t.id != records.id)
               WHERE id IN (SELECT id FROM t);"
        ),
    );
    let (ok, out) = verify(&swapped).await;
    println!("swapped.db:\n{out}");
    assert!(!ok, "swapped rows must fail\n{out}");
    assert!(
        out.contains("tenant \"acme\" seq 4") && out.contains("reordered"),
        "{out}"
    );

    // Swap only the records of two rows: each row's hash no longer matches.
    let swapped = copy(db, "swapped-records.db");
    tamper(
        &swapped,
        &format!(
            "CREATE TEMP TABLE t AS SELECT id, {RECORD_COLUMNS}, record FROM records WHERE tenant = 'globex' AND seq IN (8, 9);
             UPDATE records SET ({RECORD_COLUMNS}, record) = (SELECT {RECORD_COLUMNS}, record FROM t WHERE t.id != records.id)
               WHERE id IN (SELECT id FROM t);"
        ),
    );
    let (ok, out) = verify(&swapped).await;
    assert!(!ok, "swapped records must fail\n{out}");
    assert!(
        out.contains("tenant \"globex\" seq 8") && out.contains("hash mismatch"),
        "{out}"
    );
}

/// The request ids of the rows `audit export --db DB FILTERS` prints (each row with its seq
/// and hash); the export must succeed.
async fn export_ids(db: &str, filters: &[&str]) -> BTreeSet<String> {
    let mut args = vec!["audit", "export", "--db", db];
    args.extend_from_slice(filters);
    let (ok, out) = cli(&args).await;
    assert!(ok, "{out}");
    out.lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            assert!(value["seq"].as_u64().is_some() && value["hash"].is_string());
            value["jsonrpc.request.id"]
                .as_str()
                .expect("request id")
                .to_owned()
        })
        .collect()
}

/// The request ids of the records of `tenant` that `keep` keeps.
fn expected_ids(tenant: &str, keep: &dyn Fn(&Record) -> bool) -> BTreeSet<String> {
    (0..PER_TENANT)
        .map(|n| record(tenant, n))
        .filter(|r| keep(r))
        .map(|r| r.request_id.expect("set"))
        .collect()
}

/// `audit tail -n 3` with a tenant and a decision prints 3 lines, each of that tenant and
/// decision.
async fn assert_tail_filters(db_arg: &str) {
    let (ok, out) = cli(&[
        "audit",
        "tail",
        "--db",
        db_arg,
        "-n",
        "3",
        "--tenant",
        "acme",
        "--decision",
        "allow",
    ])
    .await;
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains(" acme#") && l.contains(" allow ")),
        "{out}"
    );
}

#[tokio::test]
async fn export_with_filters_returns_exactly_the_matching_rows() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = fill(dir.path(), PER_TENANT, 3).await;
    let db_arg = db.to_str().expect("UTF-8");

    let (ok, out) = cli(&["audit", "export", "--db", db_arg, "--format", "jsonl"]).await;
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 60);

    assert_eq!(
        export_ids(db_arg, &["--tenant", "acme", "--decision", "deny"]).await,
        expected_ids("acme", &|r| r.decision == Verdict::Deny)
    );

    let got = export_ids(
        db_arg,
        &[
            "--tenant",
            "globex",
            "--source",
            "db",
            "--tool",
            "query",
            "--subject",
            "user0@globex.example",
        ],
    )
    .await;
    let want = expected_ids("globex", &|r| {
        r.source == "db"
            && r.tool.as_deref() == Some("query")
            && r.subject == "user0@globex.example"
    });
    assert!(!want.is_empty());
    assert_eq!(got, want);

    // A time range, once in RFC 3339 and once in milliseconds: records 10 to 19.
    let until = (BASE_MS + 20).to_string();
    assert_eq!(
        export_ids(
            db_arg,
            &[
                "--tenant",
                "acme",
                "--since",
                "2025-11-26T07:00:00.010Z",
                "--until",
                &until,
            ],
        )
        .await,
        expected_ids("acme", &|r| (10..20).contains(&(r.time_ms - BASE_MS)))
    );

    let (ok, out) = cli(&["audit", "export", "--db", db_arg, "--since", "yesterday"]).await;
    assert!(!ok && out.contains("yesterday"), "{out}");

    assert_tail_filters(db_arg).await;
}

#[tokio::test]
async fn concurrent_appends_all_land_chained() {
    let dir = tempfile::tempdir().expect("temp dir");
    // 50 tasks, 500 records per tenant: 1,000 rows.
    let db = fill(dir.path(), 500, 50).await;
    let conn = Connection::open(&db).expect("open");
    let counts: Vec<(String, i64, i64)> = conn
        .prepare("SELECT tenant, COUNT(*), MAX(seq) FROM records GROUP BY tenant ORDER BY tenant")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(
        counts,
        vec![("acme".into(), 500, 500), ("globex".into(), 500, 500)]
    );
    let distinct: i64 = conn
        .query_row("SELECT COUNT(DISTINCT record) FROM records", [], |r| {
            r.get(0)
        })
        .expect("count");
    assert_eq!(distinct, 1000, "every record stored once");
    let (ok, out) = verify(&db).await;
    assert!(ok && out.contains("ok: 1000 rows, 2 tenants"), "{out}");
}

#[tokio::test]
async fn verify_reads_while_the_relay_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = AuditSettings::new(dir.path().join("audit.db"));
    let auditor = Auditor::open(&config).expect("open");
    for n in 0..10 {
        auditor.append(record("acme", n)).await.expect("append");
    }
    // The writer holds the file open; its rows are durable but not yet signed, in the
    // database or still in the segment file (the indexer is a few milliseconds behind).
    let (ok, out) = verify(&config.path).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("ok: 10 rows, 1 tenants, 1 checkpoints"),
        "{out}"
    );
    assert!(
        out.contains("warning: ")
            && (out.contains("rows after its last checkpoint 1")
                || out.contains("rows are in the segment file")),
        "{out}"
    );
    // Once indexed: all of them unsigned rows of the database.
    auditor.flush().await;
    let (ok, out) = verify(&config.path).await;
    assert!(
        ok && out.contains("10 rows after its last checkpoint 1"),
        "{out}"
    );
    auditor.append(record("acme", 10)).await.expect("append");
    auditor.close().await;
    let (ok, out) = verify(&config.path).await;
    assert!(
        ok && out.contains("ok: 11 rows, 1 tenants, 2 checkpoints"),
        "{out}"
    );
    assert!(!out.contains("unsigned"), "{out}");
}

#[tokio::test]
async fn tail_follows_new_rows_that_match() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = AuditSettings::new(dir.path().join("audit.db"));
    let auditor = Auditor::open(&config).expect("open");
    auditor.append(record("acme", 0)).await.expect("append");
    auditor.append(record("acme", 1)).await.expect("append");
    let mut follow = common::audit::Follow::start(&config.path.display().to_string());
    let first = follow.next_line().await;
    assert!(
        first.contains(" acme#2 "),
        "the last acme row first: {first}"
    );
    auditor.append(record("globex", 2)).await.expect("append");
    auditor.append(record("acme", 3)).await.expect("append");
    let followed = follow.next_line().await;
    assert!(
        followed.contains(" acme#3 ") && followed.contains("user0@acme.example"),
        "the new acme row, not globex's: {followed}"
    );
    follow.stop().await;
    auditor.close().await;
}

// ---------------------------------------------------------------------------------------------
// Attacks on the checkpoints themselves (issue 13, item 5): deleting the last checkpoints with
// their tail, deleting a tenant, rewriting every row with fresh hashes, replacing the whole
// trail under another key. Each through `mcp-tunnel audit verify --public-key`.

/// The relay instance the timed trails are written as.
const RELAY: &str = "relay-a";

/// Rounds of one acme and one globex row in a timed trail.
const ROUNDS: u64 = 20;

/// A trail as relay `RELAY` writes it over `ROUNDS` minutes of calls (record times one minute
/// apart, from now on; the checkpoint interval is the default minute), a checkpoint every 4
/// rows of a tenant, and the off-box copy in `checkpoints.jsonl`. Returns (trail, copy,
/// public key).
async fn timed_trail(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mut config = AuditSettings::new(dir.join("audit.db"));
    config.checkpoint_rows = 4;
    config.relay_id = Some(RELAY.into());
    config.checkpoint_file = Some(dir.join("checkpoints.jsonl"));
    let auditor = Auditor::open(&config).expect("open the trail");
    let start = now_ms();
    for n in 0..ROUNDS {
        for tenant in ["acme", "globex"] {
            let mut r = record(tenant, n);
            r.time_ms = start + n * 60_000;
            auditor.append(r).await.expect("append");
        }
    }
    auditor.close().await;
    (
        config.path,
        dir.join("checkpoints.jsonl"),
        dir.join("audit.key.pub"),
    )
}

/// `audit verify --db DB --public-key KEY [EXTRA...]`.
async fn verify_with(db: &Path, key: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "audit",
        "verify",
        "--db",
        db.to_str().expect("UTF-8"),
        "--public-key",
        key.to_str().expect("UTF-8"),
    ];
    args.extend_from_slice(extra);
    cli(&args).await
}

/// Deletes the last `k` checkpoints.
const DELETE_LAST_3_CHECKPOINTS: &str =
    "DELETE FROM checkpoints WHERE n > (SELECT MAX(n) - 3 FROM checkpoints);";

/// Deletes `tenant`'s rows after what the (remaining) last checkpoint signs.
fn delete_unsigned(tenant: &str) -> String {
    format!(
        "DELETE FROM records WHERE tenant = '{tenant}' AND seq > (SELECT j.value ->> '$.seq' \
         FROM checkpoints, json_each(checkpoints.heads) AS j WHERE j.value ->> '$.tenant' = \
         '{tenant}' ORDER BY n DESC LIMIT 1);"
    )
}

#[tokio::test]
async fn deleting_the_last_checkpoints_and_their_tail_is_found() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (db, copy_file, key) = timed_trail(dir.path()).await;
    let offbox = copy_file.to_str().expect("UTF-8");
    let (ok, out) = verify_with(&db, &key, &["--checkpoints", offbox]).await;
    assert!(ok, "the intact trail verifies\n{out}");
    assert!(!out.contains("warning"), "{out}");
    assert!(out.contains("match the off-box copy"), "{out}");

    // The last checkpoints and acme's rows after what is left signed: globex's rows of the
    // same minutes stay behind, unsigned for longer than a running relay allows.
    let cut = copy(&db, "cut-acme.db");
    tamper(
        &cut,
        &format!("{DELETE_LAST_3_CHECKPOINTS}{}", delete_unsigned("acme")),
    );
    let (ok, out) = verify_with(&cut, &key, &[]).await;
    println!("cut-acme.db:\n{out}");
    assert!(!ok, "verify must fail\n{out}");
    for needle in [
        "relay \"relay-a\"",
        "tenant \"globex\"",
        "unsigned rows past the checkpoint interval",
    ] {
        assert!(out.contains(needle), "expected {needle:?} in\n{out}");
    }

    // Everything after an earlier checkpoint: the trail alone cannot tell this from a relay
    // that stopped there (documented); the off-box copy can.
    let cut = copy(&db, "cut-all.db");
    tamper(
        &cut,
        &format!(
            "{DELETE_LAST_3_CHECKPOINTS}{}{}",
            delete_unsigned("acme"),
            delete_unsigned("globex")
        ),
    );
    let (ok, out) = verify_with(&cut, &key, &[]).await;
    assert!(ok, "a clean cut verifies without the copy\n{out}");
    let (ok, out) = verify_with(&cut, &key, &["--checkpoints", offbox]).await;
    println!("cut-all.db with the copy:\n{out}");
    assert!(!ok, "the off-box copy finds the cut\n{out}");
    assert!(
        out.contains("off-box copy mismatch") && out.contains("not in the trail"),
        "{out}"
    );

    // A checkpoint from the middle: a gap in the numbering.
    let gap = copy(&db, "gap.db");
    tamper(&gap, "DELETE FROM checkpoints WHERE n = 3;");
    let (ok, out) = verify_with(&gap, &key, &[]).await;
    assert_fails_naming(ok, &out, &["checkpoint gap", "checkpoint 3 is missing"]);
}

#[tokio::test]
async fn deleting_a_whole_tenant_is_found() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (db, _, key) = timed_trail(dir.path()).await;
    let gone = copy(&db, "no-globex.db");
    tamper(&gone, "DELETE FROM records WHERE tenant = 'globex';");
    let (ok, out) = verify_with(&gone, &key, &[]).await;
    println!("no-globex.db:\n{out}");
    assert!(!ok, "verify must fail\n{out}");
    assert!(
        out.contains("tenant \"globex\"") && out.contains("tenant vanished"),
        "{out}"
    );
}

/// Rewrites every row of the trail at `db`: `subject` becomes mallory, and every hash is
/// computed afresh so each chain is whole again.
fn rewrite_subjects(db: &Path) {
    rewrite_rows(db, |record| record.subject = "mallory@acme.example".into());
}

#[tokio::test]
async fn rewriting_every_row_with_fresh_hashes_is_found() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (db, copy_file, key) = timed_trail(dir.path()).await;

    // With the checkpoints left in place: they sign other heads.
    let rewritten = copy(&db, "rewritten.db");
    rewrite_subjects(&rewritten);
    let (ok, out) = verify_with(&rewritten, &key, &[]).await;
    println!("rewritten.db:\n{out}");
    assert_fails_naming(ok, &out, &["checkpoint mismatch", "rewritten"]);

    // With every checkpoint deleted first: rows and not one checkpoint.
    let rewritten = copy(&db, "rewritten-no-checkpoints.db");
    tamper(&rewritten, "DELETE FROM checkpoints;");
    rewrite_subjects(&rewritten);
    let (ok, out) = verify_with(&rewritten, &key, &[]).await;
    println!("rewritten-no-checkpoints.db:\n{out}");
    assert_fails_naming(ok, &out, &["relay \"relay-a\"", "no checkpoint"]);

    // The whole trail replaced by one a relay with a new key wrote: the given public key and
    // the off-box copy both refuse it; only the keys the trail names would accept it.
    let forger = tempfile::tempdir().expect("temp dir");
    let mut config = AuditSettings::new(forger.path().join("audit.db"));
    config.relay_id = Some(RELAY.into());
    let auditor = Auditor::open(&config).expect("open the forged trail");
    for n in 0..3 {
        auditor.append(record("acme", n)).await.expect("append");
    }
    auditor.close().await;
    let (ok, out) = verify(&config.path).await;
    assert!(ok, "by its own keys the forgery is whole\n{out}");
    let (ok, out) = verify_with(&config.path, &key, &[]).await;
    assert!(!ok && out.contains("unknown key"), "{out}");
    let (ok, out) = cli(&[
        "audit",
        "verify",
        "--db",
        config.path.to_str().expect("UTF-8"),
        "--checkpoints",
        copy_file.to_str().expect("UTF-8"),
    ])
    .await;
    println!("replaced trail with the copy:\n{out}");
    assert_fails_naming(ok, &out, &["off-box copy mismatch", "another key"]);
}

#[tokio::test]
async fn checkpoints_export_is_the_off_box_copy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (db, copy_file, key) = timed_trail(dir.path()).await;
    let (ok, exported) = cli(&[
        "audit",
        "checkpoints",
        "--db",
        db.to_str().expect("UTF-8"),
        "--export",
    ])
    .await;
    assert!(ok, "{exported}");
    let appended = std::fs::read_to_string(&copy_file).expect("the checkpoint file");
    assert_eq!(
        exported, appended,
        "the relay appends exactly what export prints"
    );
    let exported_file = dir.path().join("exported.jsonl");
    std::fs::write(&exported_file, &exported).expect("write");
    let (ok, out) = verify_with(
        &db,
        &key,
        &["--checkpoints", exported_file.to_str().expect("UTF-8")],
    )
    .await;
    assert!(ok, "{out}");
}
