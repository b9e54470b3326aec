//! The segment file's failure cases: rows a crash left written but not indexed (read by
//! `export` and `verify`, indexed at the next start), a torn last line, a damaged row (refused,
//! or set aside with a new epoch), and generations replacing one another.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::Auditor;
use super::tests::record;
use crate::govern::audit::segment::{self, SegmentFile};
use crate::govern::audit::{AuditError, AuditSettings, Record, chain, export, store, verify};

/// Settings of a trail `audit.db` of relay `relay-a` in a fresh temporary directory.
fn trail() -> (tempfile::TempDir, AuditSettings) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = AuditSettings::new(dir.path().join("audit.db"));
    config.relay_id = Some("relay-a".into());
    (dir, config)
}

/// A trail holding acme rows 1..=3, indexed and closed.
async fn closed_trail_of_three() -> (tempfile::TempDir, AuditSettings) {
    let (dir, config) = trail();
    let auditor = Auditor::open(&config).expect("open");
    for n in 1..=3 {
        auditor.append(record("acme", n)).await.expect("append");
    }
    auditor.close().await;
    (dir, config)
}

/// What a relay that died after writing `records` to its segment file and before indexing
/// them leaves: the next generation's file, its rows chained on from the database's heads.
/// Returns the file.
fn crash_tail(config: &AuditSettings, records: &[Record]) -> PathBuf {
    let conn = Connection::open(&config.path).expect("open");
    let mark = store::segment_mark(&conn).expect("mark");
    let mut heads = store::load_heads(&conn, "relay-a").expect("heads");
    let mut file =
        SegmentFile::create(&config.path, "relay-a", mark.generation + 1, false).expect("create");
    for record in records {
        let head = heads.entry(record.tenant.clone()).or_default();
        let bytes = chain::canonical(record);
        let seq = head.seq + 1;
        let hash = chain::row_hash(&head.hash, seq, &bytes);
        let mut line = Vec::new();
        segment::encode(&mut line, seq, &head.hash, &hash, &bytes);
        file.append(&line).expect("write");
        head.seq = seq;
        head.hash = hash;
    }
    file.path().to_owned()
}

/// Appends raw bytes to a file.
fn append_bytes(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open")
        .write_all(bytes)
        .expect("write");
}

/// The sequence numbers `audit export` prints, in its order.
fn exported_seqs(path: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    export(path, &Default::default(), &mut out).expect("export");
    String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["seq"]
                .as_u64()
                .expect("seq")
        })
        .collect()
}

/// The sequence numbers the database holds, in its order.
fn indexed_seqs(path: &Path) -> Vec<u64> {
    let conn = Connection::open(path).expect("open");
    let mut stmt = conn
        .prepare("SELECT seq FROM records ORDER BY id")
        .expect("prepare");
    stmt.query_map([], |r| r.get::<_, i64>(0))
        .expect("query")
        .map(|r| r.expect("row") as u64)
        .collect()
}

#[tokio::test]
async fn rows_a_crash_left_unindexed_are_read_verified_and_indexed_at_the_next_start() {
    let (_dir, config) = closed_trail_of_three().await;
    let file = crash_tail(
        &config,
        &[record("acme", 4), record("acme", 5), record("acme", 6)],
    );
    // A torn last line: the write no answer waited on.
    append_bytes(&file, br#"{"seq":7,"prev":"00"#);

    // Before the relay starts again: readers see the database and the segment.
    assert_eq!(indexed_seqs(&config.path), vec![1, 2, 3]);
    assert_eq!(exported_seqs(&config.path), vec![1, 2, 3, 4, 5, 6]);
    let report = verify(&config.path, &[], None).expect("verify");
    assert!(report.ok(), "{:?}", report.problem);
    assert_eq!(report.rows, 6);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("3 rows are in the segment file")),
        "{:?}",
        report.warnings
    );

    // The relay starts: the rows are indexed, signed, and the file is gone.
    let auditor = Auditor::open(&config).expect("reopen");
    assert!(!file.exists(), "an indexed file is removed");
    auditor.append(record("acme", 7)).await.expect("append");
    auditor.close().await;
    assert_eq!(indexed_seqs(&config.path), vec![1, 2, 3, 4, 5, 6, 7]);
    let report = verify(&config.path, &[], None).expect("verify");
    assert!(report.ok(), "{:?}", report.problem);
    assert!(
        !report.warnings.iter().any(|w| w.contains("segment")),
        "{:?}",
        report.warnings
    );
    assert_eq!(
        segment::generations(&config.path).expect("list"),
        Vec::<u64>::new()
    );
}

#[tokio::test]
async fn a_damaged_segment_row_is_refused_and_set_aside_with_a_new_epoch() {
    let (_dir, mut config) = closed_trail_of_three().await;
    let file = crash_tail(&config, &[record("acme", 4), record("acme", 5)]);
    // Row 5 rewritten (another record under the old hash): not a torn write.
    let text = std::fs::read_to_string(&file).expect("read");
    let forged = text.replacen("\"latency_us\":5", "\"latency_us\":55", 1);
    assert_ne!(text, forged, "the test edits row 5");
    std::fs::write(&file, forged).expect("write");

    let report = verify(&config.path, &[], None).expect("verify");
    let problem = report.problem.expect("the forged row is found");
    assert_eq!(problem.seq, Some(5), "{problem:?}");

    let err = Auditor::open(&config).expect_err("a damaged segment is refused");
    assert!(
        matches!(err, AuditError::Untrusted { .. }) && err.to_string().contains(".seg"),
        "{err}"
    );
    assert_eq!(
        indexed_seqs(&config.path),
        vec![1, 2, 3],
        "nothing indexed past the damage"
    );

    config.new_epoch = true;
    let auditor = Auditor::open(&config).expect("a new epoch sets the file aside");
    auditor.close().await;
    let mut aside = file.as_os_str().to_owned();
    aside.push(".damaged");
    assert!(Path::new(&aside).exists(), "kept for the operator");
    let conn = Connection::open(&config.path).expect("open");
    let epoch_note: String = conn
        .query_row(
            "SELECT note FROM checkpoints WHERE kind = 'epoch'",
            [],
            |r| r.get(0),
        )
        .expect("an epoch checkpoint");
    assert!(epoch_note.contains(".seg"), "{epoch_note}");
}

#[tokio::test]
async fn generations_replace_one_another_once_indexed() {
    let (_dir, config) = trail();
    let auditor = Auditor::open(&config).expect("open");
    auditor.inner.log.lock().rotate_bytes = 2048;
    for n in 0..60 {
        auditor.append(record("acme", n)).await.expect("append");
        if n % 10 == 9 {
            auditor.flush().await;
        }
    }
    auditor.flush().await;
    let live = segment::generations(&config.path).expect("list");
    assert_eq!(live.len(), 1, "indexed generations are removed: {live:?}");
    assert!(live[0] > 1, "the log moved on: {live:?}");
    auditor.close().await;
    assert_eq!(indexed_seqs(&config.path), (1..=60).collect::<Vec<_>>());
    assert!(verify(&config.path, &[], None).expect("verify").ok());
}
