//! The spool's side of shipping: the SQLite trail's rows and checkpoints after its shipped
//! marks, and the marks themselves (`meta`: `shipped_id`, `shipped_checkpoint_id`), written
//! only after PostgreSQL committed, so on restart the relay ships again from there.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};

use crate::govern::audit::AuditError;

/// One row of a spool, as shipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolRow {
    /// Its id in the spool (insertion order); `spool_id` in the database.
    pub id: i64,
    /// The relay instance whose chain it belongs to.
    pub relay: String,
    /// The tenant.
    pub tenant: String,
    /// Its place in the chain.
    pub seq: i64,
    /// The previous row's hash, hex.
    pub prev_hash: String,
    /// Its hash, hex.
    pub hash: String,
    /// When the relay received the request, ms since the epoch.
    pub time_ms: i64,
    /// The caller.
    pub subject: String,
    /// The source.
    pub source: String,
    /// The tool, of `tools/call`.
    pub tool: Option<String>,
    /// `allow` or `deny`.
    pub decision: String,
    /// The record's bytes, as hashed.
    pub record: Vec<u8>,
}

/// Up to `limit` rows (and about [`BATCH_BYTES`]) of the spool `conn` (at `path`) after its
/// shipped mark as noted in it, oldest first, with that mark.
pub fn unshipped(
    conn: &Connection,
    path: &Path,
    limit: usize,
) -> Result<(i64, Vec<SpoolRow>), AuditError> {
    let mark = get_mark(conn, path, ROWS_MARK)?;
    Ok((mark, rows_after(conn, path, mark, limit)?))
}

/// The record bytes one batch holds at most (beyond its first row, which always goes): rows
/// keep whole arguments and results under `level = "full"`, and a batch of 512 large ones
/// would make one message the database refuses, again at every retry, and cost the relay that
/// much memory.
pub const BATCH_BYTES: usize = 16 << 20;

/// Up to `limit` rows of the spool after row id `mark`, oldest first, stopping before the row
/// that would take the batch's record bytes past [`BATCH_BYTES`] (the first row always comes).
pub(super) fn rows_after(
    conn: &Connection,
    path: &Path,
    mark: i64,
    limit: usize,
) -> Result<Vec<SpoolRow>, AuditError> {
    let err = spool_error(path);
    let mut stmt = conn
        .prepare(
            "SELECT id, relay, tenant, seq, prev_hash, hash, time_ms, subject, source, tool, decision, \
             record FROM records WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(&err)?;
    let mut rows = stmt
        .query(params![mark, i64::try_from(limit).unwrap_or(i64::MAX)])
        .map_err(&err)?;
    let (mut batch, mut bytes) = (Vec::new(), 0usize);
    while let Some(r) = rows.next().map_err(&err)? {
        let record: Vec<u8> = r.get(11).map_err(&err)?;
        bytes += record.len();
        if !batch.is_empty() && bytes > BATCH_BYTES {
            break;
        }
        batch.push(SpoolRow {
            id: r.get(0).map_err(&err)?,
            relay: r.get(1).map_err(&err)?,
            tenant: r.get(2).map_err(&err)?,
            seq: r.get(3).map_err(&err)?,
            prev_hash: r.get(4).map_err(&err)?,
            hash: r.get(5).map_err(&err)?,
            time_ms: r.get(6).map_err(&err)?,
            subject: r.get(7).map_err(&err)?,
            source: r.get(8).map_err(&err)?,
            tool: r.get(9).map_err(&err)?,
            decision: r.get(10).map_err(&err)?,
            record,
        });
    }
    Ok(batch)
}

/// Notes in the spool that every row up to `id` is shipped.
pub fn mark_shipped(conn: &Connection, path: &Path, id: i64) -> Result<(), AuditError> {
    set_mark(conn, path, ROWS_MARK, id)
}

/// The spool's `meta` keys of the shipped marks.
pub(super) const ROWS_MARK: &str = "shipped_id";
pub(super) const CHECKPOINTS_MARK: &str = "shipped_checkpoint_id";

fn spool_error(path: &Path) -> impl Fn(rusqlite::Error) -> AuditError + '_ {
    move |e| AuditError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

pub(super) fn get_mark(conn: &Connection, path: &Path, key: &str) -> Result<i64, AuditError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, String>(0)
        })
        .optional()
        .map_err(spool_error(path))?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

pub(super) fn set_mark(
    conn: &Connection,
    path: &Path,
    key: &str,
    id: i64,
) -> Result<(), AuditError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, id.to_string()],
    )
    .map(drop)
    .map_err(spool_error(path))
}

/// One signed checkpoint of a spool, as shipped (the columns of its `checkpoints` row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolCheckpoint {
    /// Its id in the spool.
    pub id: i64,
    /// The relay whose chain it is.
    pub relay: String,
    /// Its number in that chain.
    pub n: i64,
    /// The text columns: prev, hash, kind, note, heads, public_key, signature.
    pub text: [String; 7],
    /// `epoch`, `time_ms`, `interval_ms`.
    pub numbers: [i64; 3],
}

/// The text columns of a checkpoint row besides `relay`.
pub(super) const CHECKPOINT_TEXT: [&str; 7] = [
    "prev",
    "hash",
    "kind",
    "note",
    "heads",
    "public_key",
    "signature",
];

/// Its number columns besides `n`.
pub(super) const CHECKPOINT_NUMBERS: [&str; 3] = ["epoch", "time_ms", "interval_ms"];

/// Up to `limit` checkpoints of the spool after checkpoint id `mark`, oldest first.
pub(super) fn checkpoints_after(
    conn: &Connection,
    path: &Path,
    mark: i64,
    limit: usize,
) -> Result<Vec<SpoolCheckpoint>, AuditError> {
    let err = spool_error(path);
    let sql = format!(
        "SELECT id, relay, n, {}, {} FROM checkpoints WHERE id > ?1 ORDER BY id LIMIT ?2",
        CHECKPOINT_TEXT.join(", "),
        CHECKPOINT_NUMBERS.join(", ")
    );
    let mut stmt = conn.prepare(&sql).map_err(&err)?;
    stmt.query_map(
        params![mark, i64::try_from(limit).unwrap_or(i64::MAX)],
        |r| {
            let mut text: [String; 7] = Default::default();
            for (i, slot) in text.iter_mut().enumerate() {
                *slot = r.get(3 + i)?;
            }
            let mut numbers = [0i64; 3];
            for (i, slot) in numbers.iter_mut().enumerate() {
                *slot = r.get(3 + text.len() + i)?;
            }
            Ok(SpoolCheckpoint {
                id: r.get(0)?,
                relay: r.get(1)?,
                n: r.get(2)?,
                text,
                numbers,
            })
        },
    )
    .map_err(&err)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(&err)
}

/// How far the spool is behind the row id `mark`: its rows after it, and when the oldest of
/// them was received (ms since the epoch; `None` when there are none).
pub fn spool_depth(
    conn: &Connection,
    path: &Path,
    mark: i64,
) -> Result<(u64, Option<i64>), AuditError> {
    let err = spool_error(path);
    let (count, oldest): (i64, Option<i64>) = conn
        .query_row(
            "SELECT count(*), (SELECT time_ms FROM records WHERE id > ?1 ORDER BY id LIMIT 1) \
             FROM records WHERE id > ?1",
            [mark],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(&err)?;
    Ok((u64::try_from(count).unwrap_or(0), oldest))
}

/// How often at most the shipper notes its marks in the spool. A note is a write, which takes
/// the SQLite write lock the relay's writer needs (whose busy wait then sleeps a millisecond or
/// more: the p99 of a call doubled when the marks were noted after every batch). A crash
/// re-ships at most what was shipped since the last note, which the database stores once.
pub const NOTE_EVERY: Duration = Duration::from_secs(1);

/// Where shipping stands in a spool: the last row and checkpoint the database has. Kept in
/// memory while the shipper runs and noted in the spool's `meta` (`shipped_id`,
/// `shipped_checkpoint_id`) at most every [`NOTE_EVERY`] and at its stop.
#[derive(Debug, Clone)]
pub struct Marks {
    /// The last row id shipped.
    pub rows: i64,
    /// The last checkpoint id shipped.
    pub checkpoints: i64,
    /// The marks as last noted in the spool.
    noted: (i64, i64),
    noted_at: Instant,
}

impl Marks {
    /// The marks as noted in the spool `conn` (at `path`).
    pub fn load(conn: &Connection, path: &Path) -> Result<Self, AuditError> {
        let rows = get_mark(conn, path, ROWS_MARK)?;
        let checkpoints = get_mark(conn, path, CHECKPOINTS_MARK)?;
        Ok(Self {
            rows,
            checkpoints,
            noted: (rows, checkpoints),
            noted_at: Instant::now(),
        })
    }

    /// Notes the marks in the spool if they moved: at once with `now`, else only once
    /// [`NOTE_EVERY`] has passed since the last note.
    pub fn note(&mut self, conn: &Connection, path: &Path, now: bool) -> Result<(), AuditError> {
        let current = (self.rows, self.checkpoints);
        if current == self.noted || (!now && self.noted_at.elapsed() < NOTE_EVERY) {
            return Ok(());
        }
        set_mark(conn, path, ROWS_MARK, self.rows)?;
        set_mark(conn, path, CHECKPOINTS_MARK, self.checkpoints)?;
        self.noted = current;
        self.noted_at = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_noted_at_most_every_second_unless_asked_and_only_when_they_moved() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("spool.db");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            .expect("meta");
        let mut marks = Marks::load(&conn, &path).expect("load");
        assert_eq!((marks.rows, marks.checkpoints), (0, 0));
        marks.rows = 5;
        marks.checkpoints = 2;
        marks.note(&conn, &path, false).expect("note");
        let stored = Marks::load(&conn, &path).expect("reload");
        assert_eq!(stored.rows, 0, "not noted within NOTE_EVERY of the last");
        marks.note(&conn, &path, true).expect("note now");
        let stored = Marks::load(&conn, &path).expect("reload");
        assert_eq!((stored.rows, stored.checkpoints), (5, 2));
        // Unmoved marks write nothing: a locked spool does not matter then.
        conn.execute_batch("DROP TABLE meta").expect("drop");
        marks.note(&conn, &path, true).expect("nothing to note");
    }

    #[test]
    fn a_batch_stops_at_its_byte_budget_but_always_takes_one_row() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("spool.db");
        let conn = Connection::open(&path).expect("open");
        crate::govern::audit::store::create_schema(&conn).expect("schema");
        let insert = |id: i64, size: usize| {
            conn.execute(
                "INSERT INTO records (id, relay, tenant, seq, prev_hash, hash, time_ms, subject, \
                 roles, source, direction, method, decision, rule, outcome, latency_us, \
                 bytes_in, bytes_out, args_sha256, record) VALUES (?1, 'r', 't', ?1, '', '', 0, \
                 's', '[]', 'src', 'agent_to_server', 'tools/call', 'allow', '', 'ok', 0, 0, 0, \
                 '', ?2)",
                params![id, vec![b'x'; size]],
            )
            .expect("insert");
        };
        // Three rows of 10 MiB: each batch takes one (two would pass 16 MiB).
        for id in 1..=3 {
            insert(id, 10 << 20);
        }
        let batch = rows_after(&conn, &path, 0, 512).expect("read");
        assert_eq!(batch.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1]);
        // A row larger than the whole budget still ships, alone.
        insert(4, 20 << 20);
        let batch = rows_after(&conn, &path, 3, 512).expect("read");
        assert_eq!(batch.iter().map(|r| r.id).collect::<Vec<_>>(), vec![4]);
        // Small rows: the row limit decides.
        for id in 5..=20 {
            insert(id, 100);
        }
        assert_eq!(rows_after(&conn, &path, 4, 8).expect("read").len(), 8);
    }
}
