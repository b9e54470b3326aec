//! The spool's side of shipping: the SQLite trail's rows and checkpoints after its shipped
//! marks, and the marks themselves (`meta`: `shipped_id`, `shipped_checkpoint_id`), written
//! only after PostgreSQL committed, so on restart the relay ships again from there.

use std::path::Path;

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

/// Up to `limit` rows of the spool `conn` (at `path`) after its shipped mark, oldest first,
/// with that mark.
pub fn unshipped(
    conn: &Connection,
    path: &Path,
    limit: usize,
) -> Result<(i64, Vec<SpoolRow>), AuditError> {
    let err = spool_error(path);
    let mark = get_mark(conn, path, ROWS_MARK)?;
    let mut stmt = conn
        .prepare(
            "SELECT id, relay, tenant, seq, prev_hash, hash, time_ms, subject, source, tool, decision, \
             record FROM records WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(&err)?;
    let rows = stmt
        .query_map(
            params![mark, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                Ok(SpoolRow {
                    id: r.get(0)?,
                    relay: r.get(1)?,
                    tenant: r.get(2)?,
                    seq: r.get(3)?,
                    prev_hash: r.get(4)?,
                    hash: r.get(5)?,
                    time_ms: r.get(6)?,
                    subject: r.get(7)?,
                    source: r.get(8)?,
                    tool: r.get(9)?,
                    decision: r.get(10)?,
                    record: r.get(11)?,
                })
            },
        )
        .map_err(&err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(&err)?;
    Ok((mark, rows))
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

pub(super) fn set_mark(conn: &Connection, path: &Path, key: &str, id: i64) -> Result<(), AuditError> {
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
    /// The text columns, in the order of [`CHECKPOINT_TEXT`].
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

/// Up to `limit` checkpoints of the spool after its checkpoint mark, oldest first.
pub(super) fn unshipped_checkpoints(
    conn: &Connection,
    path: &Path,
    limit: usize,
) -> Result<Vec<SpoolCheckpoint>, AuditError> {
    let err = spool_error(path);
    let mark = get_mark(conn, path, CHECKPOINTS_MARK)?;
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


/// How far the spool is behind: its unshipped rows, and when the oldest of them was received
/// (ms since the epoch; `None` when every row is shipped).
pub fn spool_depth(conn: &Connection, path: &Path) -> Result<(u64, Option<i64>), AuditError> {
    let err = spool_error(path);
    let mark = get_mark(conn, path, ROWS_MARK)?;
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
