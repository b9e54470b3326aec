//! Tests of the trail's writer: appends and backpressure, the WAL thread, checkpoints by rows
//! and by time, a database that refuses rows, appends that never wait on the database, fsync
//! durability, and schema 1 trails read as they are and migrated by the relay. The segment
//! file's crash cases are in `crash.rs`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::Auditor;
use super::wal::{WAL_CHECKPOINT_ROWS, WalCheckpointer};
use crate::govern::audit::checkpoint::{Checkpoint, Kind};
use crate::govern::audit::key::CheckpointKey;
use crate::govern::audit::{AuditError, AuditSettings, Durability, Record, Verdict, chain, store};

/// A record for tests: `n` goes into the request id and the latency.
pub(crate) fn record(tenant: &str, n: u64) -> Record {
    Record {
        subject: format!("user{}@{tenant}.example", n % 3),
        source: if n.is_multiple_of(2) { "db" } else { "web" }.into(),
        decision: if n.is_multiple_of(5) {
            Verdict::Deny
        } else {
            Verdict::Allow
        },
        rule: "test".into(),
        latency_us: n,
        bytes_in: 10,
        bytes_out: 20,
        ..Record::example(tenant, n)
    }
}

fn rows(path: &std::path::Path) -> Vec<(String, i64, String, String, Vec<u8>)> {
    let conn = Connection::open(path).expect("open");
    let mut stmt = conn
        .prepare("SELECT tenant, seq, prev_hash, hash, record FROM records ORDER BY id")
        .expect("prepare");
    stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
    })
    .expect("query")
    .collect::<Result<_, _>>()
    .expect("rows")
}

#[tokio::test]
async fn concurrent_appends_all_land_chained_per_tenant_and_close_signs() {
    let (_dir, mut config) = trail();
    // A tiny queue: most appends wait for room (backpressure), none is dropped.
    config.queue = 2;
    let auditor = Auditor::open(&config).expect("open");
    let mut tasks = Vec::new();
    for t in 0..10u64 {
        let auditor = auditor.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let tenant = if t % 2 == 0 { "acme" } else { "globex" };
                auditor
                    .append(record(tenant, t * 100 + i))
                    .await
                    .expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    auditor.close().await;
    assert!(matches!(
        auditor.append(record("acme", 1)).await,
        Err(AuditError::Closed)
    ));
    let rows = rows(&config.path);
    assert_eq!(rows.len(), 200);
    let mut heads: HashMap<String, (i64, [u8; 32])> = HashMap::new();
    for (tenant, seq, prev, hash, bytes) in &rows {
        let (last_seq, last_hash) = heads.entry(tenant.clone()).or_insert((0, chain::GENESIS));
        assert_eq!(*seq, *last_seq + 1);
        assert_eq!(prev, &hex::encode(*last_hash));
        let expected = chain::row_hash(last_hash, *seq as u64, bytes);
        assert_eq!(hash, &hex::encode(expected));
        *last_seq = *seq;
        *last_hash = expected;
    }
    assert_eq!(heads["acme"].0, 100);
    assert_eq!(heads["globex"].0, 100);
    let last = checkpoints(&config.path).pop().expect("a checkpoint");
    assert_eq!(last.kind, Kind::Close);
    let signed: Vec<(String, u64)> = last.heads.into_iter().map(|h| (h.tenant, h.seq)).collect();
    assert_eq!(signed, vec![("acme".into(), 100), ("globex".into(), 100)]);
}

/// Default settings of a trail `audit.db` in a fresh temporary directory (returned too: the
/// trail lives as long as it).
fn trail() -> (tempfile::TempDir, AuditSettings) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = AuditSettings::new(dir.path().join("audit.db"));
    (dir, config)
}

/// Appends the records `ns` (see [`record`]) of tenant acme, one after the other.
async fn append_acme(auditor: &Auditor, ns: std::ops::Range<u64>) {
    for n in ns {
        auditor.append(record("acme", n)).await.expect("append");
    }
}

/// The trail's checkpoints, in order.
fn checkpoints(path: &std::path::Path) -> Vec<Checkpoint> {
    let conn = Connection::open(path).expect("open");
    store::all_checkpoints(&conn)
        .expect("checkpoints")
        .into_iter()
        .map(|c| c.checkpoint.expect("a valid checkpoint"))
        .collect()
}

#[tokio::test]
async fn close_merges_the_wal_into_the_file() {
    let (dir, config) = trail();
    let auditor = Auditor::open(&config).expect("open");
    // Enough rows for the WAL checkpointer to be asked several times.
    let count = WAL_CHECKPOINT_ROWS * 3 + 1;
    append_acme(&auditor, 0..count).await;
    auditor.close().await;
    assert!(
        !dir.path().join("audit.db-wal").exists(),
        "the checkpointer's connection is closed first, so the writer's close removes the WAL"
    );
    assert_eq!(rows(&config.path).len() as u64, count);
}

#[test]
fn the_wal_starts_over_under_steady_writes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("audit.db");
    let (conn, _) = store::open_writer(&path, Durability::Commit, "key", "relay-a").expect("open");
    // A restart once the WAL holds 64 frames. The writer never pauses, so a passive merge
    // alone never catches up with it; every 300 rows it waits for the merge it asked for, so
    // that whether a restart wins the race with the next commit does not hang on the
    // machine's load (a relay's writer pauses between batches on its own).
    let mut wal = WalCheckpointer::start(&path, 64).expect("checkpointer");
    let r = record("acme", 1);
    let mut prev = chain::GENESIS;
    let mut largest = 0;
    for seq in 1..=3_000u64 {
        let bytes = chain::canonical(&r);
        let hash = chain::row_hash(&prev, seq, &bytes);
        store::begin(&conn).expect("begin");
        store::insert_record(&conn, "relay-a", seq, &prev, &hash, &bytes, &r).expect("insert");
        store::commit(&conn).expect("commit");
        prev = hash;
        if seq % super::wal::WAL_CHECKPOINT_ROWS == 0 {
            wal.merge_now();
        }
        let size = std::fs::metadata(dir.path().join("audit.db-wal")).map_or(0, |m| m.len());
        largest = largest.max(size);
    }
    wal.stop();
    // 3,000 commits of 3-4 pages each would make a WAL of ~40 MiB never started over;
    // bounded by the restart threshold plus what the writer adds while a merge runs.
    assert!(largest < 16 << 20, "WAL grew to {largest} bytes");
}

#[tokio::test]
async fn a_reopened_trail_continues_each_chain() {
    let (_dir, config) = trail();
    let first = Auditor::open(&config).expect("open");
    first.append(record("acme", 1)).await.expect("append");
    first.close().await;
    let second = Auditor::open(&config).expect("reopen");
    second.append(record("acme", 2)).await.expect("append");
    second.close().await;
    let rows = rows(&config.path);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1].1, 2);
    assert_eq!(rows[1].2, rows[0].3, "the second row chains to the first");
}

#[tokio::test]
async fn checkpoints_every_n_rows() {
    let (_dir, mut config) = trail();
    config.checkpoint_rows = 5;
    let auditor = Auditor::open(&config).expect("open");
    // Twelve rows in (most likely) one batch: the indexer cuts it where checkpoints fall due.
    append_acme(&auditor, 0..12).await;
    auditor.close().await;
    let signed: Vec<(Kind, u64, Option<u64>)> = checkpoints(&config.path)
        .iter()
        .map(|c| (c.kind, c.n, c.head("acme").map(|h| h.seq)))
        .collect();
    assert_eq!(
        signed,
        vec![
            (Kind::Start, 1, None),
            (Kind::Interval, 2, Some(5)),
            (Kind::Interval, 3, Some(10)),
            (Kind::Close, 4, Some(12)),
        ]
    );
}

#[tokio::test]
async fn a_quiet_tenant_is_signed_after_the_interval() {
    let (_dir, mut config) = trail();
    config.checkpoint_secs = 1;
    let auditor = Auditor::open(&config).expect("open");
    auditor.append(record("acme", 1)).await.expect("append");
    let conn = Connection::open(&config.path).expect("open");
    let signed = || -> i64 {
        conn.query_row("SELECT COUNT(*) FROM checkpoints", [], |r| r.get(0))
            .expect("count")
    };
    // Poll (bounded) until the writer's timer signs the row; no append prompts it.
    let deadline = Instant::now() + Duration::from_secs(30);
    // The start checkpoint, then one the timer wrote.
    while signed() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(signed(), 2, "one checkpoint within the deadline");
    auditor.close().await;
    let all = checkpoints(&config.path);
    assert_eq!(all.len(), 3, "and the close");
    assert_eq!(all[1].kind, Kind::Interval);
    assert_eq!(all[1].head("acme").map(|h| h.seq), Some(1));
}

#[tokio::test]
async fn while_the_database_refuses_rows_they_wait_in_the_segment_and_calls_are_refused() {
    let (_dir, config) = trail();
    let auditor = Auditor::open(&config).expect("open");
    auditor.append(record("acme", 1)).await.expect("append");
    auditor.flush().await;
    let conn = Connection::open(&config.path).expect("open");
    conn.execute_batch(
        "CREATE TRIGGER refuse BEFORE INSERT ON records BEGIN SELECT RAISE(FAIL, 'disk says no'); END;",
    )
    .expect("make the database refuse rows");
    // Durable in the segment: this call goes on; the indexer then finds the database refusing.
    auditor.append(record("acme", 2)).await.expect("append 2");
    auditor.flush().await;
    let err = auditor
        .append(record("acme", 3))
        .await
        .expect_err("refused while the database refuses rows");
    assert!(
        matches!(err, AuditError::Write { .. })
            && err.to_string().contains("audit.db")
            && err.to_string().contains("disk says no"),
        "{err}"
    );
    // Readers see every durable row meanwhile.
    assert_eq!(exported(&config.path), 2);
    conn.execute_batch("DROP TRIGGER refuse")
        .expect("the database takes rows again");
    // The indexer tries again on its own, and calls go on.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rows(&config.path).len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    auditor.append(record("acme", 3)).await.expect("append 3");
    auditor.close().await;
    let rows = rows(&config.path);
    assert_eq!(rows.iter().map(|r| r.1).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(
        crate::govern::audit::verify(&config.path, &[], None)
            .expect("verify")
            .ok()
    );
}

#[tokio::test]
async fn one_relay_process_writes_a_trail_at_a_time() {
    let (_dir, config) = trail();
    let first = Auditor::open(&config).expect("open");
    let err = Auditor::open(&config).expect_err("a second writer is refused");
    assert!(
        err.to_string().contains("another relay process")
            && err.to_string().contains("audit.db.lock"),
        "{err}"
    );
    first.close().await;
    Auditor::open(&config)
        .expect("free once closed")
        .close()
        .await;
}

#[tokio::test]
async fn an_append_never_waits_on_the_database() {
    let (_dir, config) = trail();
    let auditor = Auditor::open(&config).expect("open");
    auditor.append(record("acme", 1)).await.expect("append");
    let other = Connection::open(&config.path).expect("open");
    other
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    // On this one-thread runtime, an append that waited on SQLite's lock would hang the test.
    auditor
        .append(record("acme", 2))
        .await
        .expect("durable in the segment while the database is locked");
    other
        .execute_batch("COMMIT")
        .expect("release the write lock");
    auditor.close().await;
    assert_eq!(rows(&config.path).len(), 2);
}

#[tokio::test]
async fn fsync_durability_syncs_before_an_append_resolves() {
    let (_dir, mut config) = trail();
    config.durability = Durability::Fsync;
    let auditor = Auditor::open(&config).expect("open");
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let auditor = auditor.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                auditor
                    .append(record("acme", t * 10 + i))
                    .await
                    .expect("append");
            }
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    let written = auditor.inner.log.lock().sync_handle().expect("open").0;
    assert!(
        auditor
            .inner
            .synced
            .load(std::sync::atomic::Ordering::Acquire)
            >= written,
        "every resolved append is synced"
    );
    auditor.close().await;
    assert_eq!(rows(&config.path).len(), 40);
}

/// The rows `audit export` reads of the trail at `path` (database and segment).
fn exported(path: &std::path::Path) -> usize {
    let mut out = Vec::new();
    crate::govern::audit::export(path, &Default::default(), &mut out).expect("export") as usize
}

#[test]
fn open_names_the_file_it_cannot_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("not-a-db");
    std::fs::write(&path, vec![b'x'; 4096]).expect("write");
    let mut config = AuditSettings::new(&path);
    config.key = Some(dir.path().join("audit.key"));
    let err = Auditor::open(&config).expect_err("not a database");
    assert!(err.to_string().contains("not-a-db"), "{err}");
}

/// The schema of a trail written before checkpoints were chained (c1e4632).
const V1_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    public_key TEXT PRIMARY KEY,
    added_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    seq INTEGER NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    subject TEXT NOT NULL,
    roles TEXT NOT NULL,
    source TEXT NOT NULL,
    session TEXT,
    transport TEXT,
    protocol_version TEXT,
    direction TEXT NOT NULL,
    method TEXT NOT NULL,
    request_id TEXT,
    tool TEXT,
    resource TEXT,
    prompt TEXT,
    decision TEXT NOT NULL,
    rule TEXT NOT NULL,
    outcome TEXT NOT NULL,
    outcome_code INTEGER,
    latency_us INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    args_sha256 TEXT NOT NULL,
    record BLOB NOT NULL,
    UNIQUE (tenant, seq)
);
CREATE INDEX IF NOT EXISTS records_time ON records (time_ms);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL
);
";

/// A schema 1 trail at `path`, as the relay of c1e4632 wrote it: `count` acme rows and a
/// per-tenant checkpoint of the last, signed by the key at `key`.
fn write_v1(path: &std::path::Path, key: &std::path::Path, count: u64) {
    let key = CheckpointKey::load_or_create(key).expect("key");
    let conn = Connection::open(path).expect("create");
    conn.execute_batch(V1_SCHEMA).expect("schema 1");
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema', '1')", [])
        .expect("version");
    conn.execute(
        "INSERT INTO keys (public_key, added_ms) VALUES (?1, 0)",
        [key.public_hex()],
    )
    .expect("key");
    let mut prev = chain::GENESIS;
    for seq in 1..=count {
        let r = record("acme", seq);
        let bytes = chain::canonical(&r);
        let hash = chain::row_hash(&prev, seq, &bytes);
        let mut values: Vec<rusqlite::types::Value> = vec![
            "acme".to_owned().into(),
            (seq as i64).into(),
            hex::encode(prev).into(),
            hex::encode(hash).into(),
            bytes.into(),
        ];
        values.extend(store::record_columns(&r));
        conn.execute(
            &format!(
                "INSERT INTO records (tenant, seq, prev_hash, hash, record, {}) VALUES ({})",
                store::RECORD_COLUMNS,
                (1..=values.len())
                    .map(|i| format!("?{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            rusqlite::params_from_iter(values),
        )
        .expect("row");
        prev = hash;
    }
    let hash = hex::encode(prev);
    let signature = key.sign(&chain::checkpoint_message("acme", count, &hash, 5));
    conn.execute(
        "INSERT INTO checkpoints (time_ms, tenant, seq, hash, public_key, signature) \
         VALUES (5, 'acme', ?1, ?2, ?3, ?4)",
        rusqlite::params![count as i64, hash, key.public_hex(), signature],
    )
    .expect("checkpoint");
}

#[tokio::test]
async fn a_schema_1_trail_is_read_as_it_is_and_migrated_in_place_by_the_relay() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("audit.db");
    let key_path = dir.path().join("audit.key");
    write_v1(&path, &key_path, 7);
    let public = crate::govern::audit::key::read_public_key(
        &crate::govern::audit::key::public_key_path(&key_path),
    )
    .expect("public key");
    let keys = [public];

    // Read-only tools read it unchanged.
    let report = crate::govern::audit::verify(&path, &keys, None).expect("verify");
    assert!(report.ok(), "{report}");
    assert_eq!((report.rows, report.checkpoints), (7, 1));
    assert!(
        report.notes.iter().any(|n| n.contains("schema 1")),
        "{report}"
    );

    // The relay migrates it in place and chains on from its rows.
    let mut config = AuditSettings::new(&path);
    config.relay_id = Some("relay-a".into());
    let auditor = Auditor::open(&config).expect("open and migrate");
    auditor.append(record("acme", 8)).await.expect("append");
    auditor.close().await;
    let conn = Connection::open(&path).expect("open");
    let version: String = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })
        .expect("version");
    assert_eq!(version, store::SCHEMA_VERSION);
    let report = crate::govern::audit::verify(&path, &keys, None).expect("verify");
    assert!(report.ok(), "{report}");
    assert_eq!(report.rows, 8);
    assert_eq!(report.checkpoints, 3, "the schema 1 one, start and close");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("migrated from schema 1")),
        "{report}"
    );
    let last = checkpoints(&path).pop().expect("a checkpoint");
    assert_eq!(last.head("acme").map(|h| h.seq), Some(8));

    // A schema 1 row changed after the migration is still found.
    conn.execute_batch("UPDATE records SET subject = 'mallory' WHERE seq = 3")
        .expect("tamper");
    let report = crate::govern::audit::verify(&path, &keys, None).expect("verify");
    assert!(!report.ok(), "{report}");
}

#[tokio::test]
async fn a_schema_1_trail_whose_checkpoint_does_not_verify_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("audit.db");
    write_v1(&path, &dir.path().join("old.key"), 3);
    // The relay has another key than the one that signed the schema 1 checkpoints.
    let mut config = AuditSettings::new(&path);
    config.relay_id = Some("relay-a".into());
    let err = Auditor::open(&config).expect_err("refused");
    assert!(
        matches!(err, AuditError::Untrusted { .. }) && err.to_string().contains("schema 1"),
        "{err}"
    );
    config.new_epoch = true;
    let auditor = Auditor::open(&config).expect("a new epoch");
    auditor.close().await;
    let first = checkpoints(&path).remove(0);
    assert_eq!((first.kind, first.epoch, first.n), (Kind::Epoch, 2, 1));
    assert!(first.note.contains("schema 1"), "{}", first.note);
}
