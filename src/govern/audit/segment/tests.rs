use std::io::Write;

use super::*;
use crate::govern::audit::auditor::tests::record;

/// A file of generation 1 with `rows` rows of acme chained from the start, and its rows.
fn written(dir: &Path, rows: u64) -> (PathBuf, Vec<Row>) {
    let trail = dir.join("audit.db");
    let mut file = SegmentFile::create(&trail, "relay-a", 1, false).expect("create");
    let mut prev = chain::GENESIS;
    let mut out = Vec::new();
    for seq in 1..=rows {
        let record = record("acme", seq);
        let bytes = chain::canonical(&record);
        let hash = chain::row_hash(&prev, seq, &bytes);
        let mut line = Vec::new();
        encode(&mut line, seq, &prev, &hash, &bytes);
        file.append(&line).expect("append");
        out.push(Row {
            seq,
            prev,
            hash,
            bytes,
            record,
            end: file.end().offset,
        });
        prev = hash;
    }
    (file.path().to_owned(), out)
}

fn read_all(path: &Path) -> Result<Contents, SegmentError> {
    read(path, File::open(path).expect("open"), 1, 0)
}

#[test]
fn rows_read_back_as_written_and_hash_what_the_line_holds() {
    let dir = tempfile::tempdir().expect("dir");
    let (path, rows) = written(dir.path(), 3);
    assert_eq!(path, dir.path().join("audit.db.000001.seg"));
    assert_eq!(
        generations(&dir.path().join("audit.db")).expect("list"),
        vec![1]
    );
    let contents = read_all(&path).expect("read");
    assert_eq!(contents.relay, "relay-a");
    assert_eq!(contents.rows, rows);
    assert!(contents.rows.iter().all(Row::hash_holds));
    assert_eq!(contents.torn, 0);
    assert_eq!(contents.end, std::fs::metadata(&path).expect("meta").len());
    // From an offset: the rows after it.
    let second = read(&path, File::open(&path).expect("open"), 1, contents.end).expect("read");
    assert!(second.rows.is_empty());
}

#[test]
fn a_torn_last_line_is_left_out_and_damage_before_a_whole_row_is_not() {
    let dir = tempfile::tempdir().expect("dir");
    let (path, _) = written(dir.path(), 2);
    let whole = std::fs::metadata(&path).expect("meta").len();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open");
    file.write_all(b"{\"seq\":3,\"pr").expect("torn");
    let contents = read_all(&path).expect("a torn end is no damage");
    assert_eq!((contents.rows.len(), contents.end), (2, whole));
    assert_eq!(contents.torn, 12);
    // Zeros a power loss can leave past the synced end: a torn end too.
    file.write_all(&[0; 40]).expect("zeros");
    file.write_all(b"\n").expect("newline");
    assert_eq!(read_all(&path).expect("torn").rows.len(), 2);
    // A whole row after the damage: not a torn write.
    let dir2 = tempfile::tempdir().expect("dir");
    let (_, rows) = written(dir2.path(), 1);
    let mut line = Vec::new();
    encode(&mut line, 3, &rows[0].prev, &rows[0].hash, &rows[0].bytes);
    file.write_all(&line).expect("a whole row");
    match read_all(&path) {
        Err(SegmentError::Damaged { offset, .. }) => assert_eq!(offset, whole),
        other => panic!("expected damage at {whole}: {other:?}"),
    }
}

#[test]
fn a_file_of_another_generation_or_format_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let (path, _) = written(dir.path(), 1);
    let wrong_generation = read(&path, File::open(&path).expect("open"), 2, 0);
    assert!(matches!(
        wrong_generation,
        Err(SegmentError::Damaged { offset: 0, .. })
    ));
    std::fs::write(&path, b"{\"something\":1}\n").expect("write");
    assert!(matches!(
        read_all(&path),
        Err(SegmentError::Damaged { offset: 0, .. })
    ));
}

#[test]
fn marks_round_trip_and_names_only_match_their_trail() {
    let mark = Mark {
        generation: 7,
        offset: 1234,
    };
    assert_eq!(Mark::parse(&mark.to_text()), Some(mark));
    assert_eq!(Mark::parse("7"), None);
    let dir = tempfile::tempdir().expect("dir");
    for name in [
        "audit.db.000002.seg",
        "audit.db.x.seg",
        "other.db.000003.seg",
        "audit.db.000004.seg.damaged",
    ] {
        std::fs::write(dir.path().join(name), b"").expect("write");
    }
    assert_eq!(
        generations(&dir.path().join("audit.db")).expect("list"),
        vec![2]
    );
}
