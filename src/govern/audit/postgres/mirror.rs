//! `audit verify --db postgresql://...`: the database's trail copied, from one snapshot, into a
//! temporary SQLite file of schema 2 (the mirror), which the one verifier
//! ([`crate::govern::audit::verify()`]) then checks as it checks a relay's file.
//!
//! What the mirror holds, so that what the verifier finds is true of the database:
//! - **Rows** relay by relay in `spool_id` order (the order their relay wrote them), numbered
//!   1, 2, 3, ... in that order (the verifier walks by row id). Relay, tenant, seq, hashes and
//!   record bytes are the database's. Of the columns the verifier checks against the record
//!   bytes, the ones the database keeps itself (`time_ms`, `subject`, `source`, `tool`,
//!   `decision`, which `tail` and `export` filter on) are copied as the database has them, so a
//!   changed one fails as a column mismatch; the rest are the record's own
//!   ([`record_columns`]), which the database does not store apart from the bytes.
//! - **Checkpoints** and **keys** as the database has them (its checkpoints have no row id).
//! - `meta`'s schema version, through the store's own schema ([`store::create_schema`]); the
//!   verifier reads nothing else there, and no `legacy_checkpoints` (schema 1 trails never
//!   ship).
//!
//! A problem the verifier reports names the relay, tenant and seq as the database has them;
//! [`Mirror::verify`] turns the mirror's row id into the database's `records.id`, and drops
//! the checkpoint row ids (the database's checkpoints are named by relay and number only).
//!
//! Rows are read through a portal and written in transactions of [`super::read::PAGE_ROWS`]: memory stays
//! bounded; the mirror takes about as much disk as the trail (in the system's temporary
//! folder, removed when the [`Mirror`] is dropped). Its SQLite writes block the task that
//! makes it: a command's work (`audit verify`), never a relay's.

use std::path::{Path, PathBuf};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params_from_iter};
use tokio_postgres::Row;

use super::read::{checkpoint_row, checkpoints_sql, for_each_page, open, snapshot};
use super::{Target, pg_error};
use crate::govern::audit::checkpoint::Checkpoint;
use crate::govern::audit::store::{self, RECORD_COLUMN_COUNT, RECORD_COLUMNS, record_columns};
use crate::govern::audit::verify::Report;
use crate::govern::audit::{AuditError, Record};

/// The record columns the database keeps apart from the bytes, copied into the mirror as they
/// are there (the verifier compares them with the bytes).
const FROM_DATABASE: [&str; 5] = ["time_ms", "subject", "source", "tool", "decision"];

/// The database's rows, in the order the mirror numbers them.
const ROWS_SQL: &str = "SELECT id, relay, tenant, seq, prev_hash, hash, record, \
    time_ms, subject, source, tool, decision FROM records ORDER BY relay, spool_id, id";

/// Which database row each mirror row is (`id`: the mirror's row id).
const ROW_MAP: &str = "CREATE TABLE pg_rows (id INTEGER PRIMARY KEY, pg_id INTEGER NOT NULL)";

/// A mirror of the database's trail: a SQLite file of schema 2, removed when dropped.
pub struct Mirror {
    _dir: tempfile::TempDir,
    path: PathBuf,
    name: String,
    /// Rows copied.
    pub rows: u64,
    /// Checkpoints copied.
    pub checkpoints: u64,
}

impl Mirror {
    /// The mirror's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs [`crate::govern::audit::verify()`] on the mirror (blocking: its reads are SQLite's)
    /// and names the problem's row as the database does.
    pub fn verify(
        &self,
        keys: &[String],
        offbox: Option<&[Checkpoint]>,
    ) -> Result<Report, AuditError> {
        let mut report =
            crate::govern::audit::verify(&self.path, keys, offbox).map_err(|e| self.renamed(e))?;
        if let Some(problem) = &mut report.problem {
            problem.id = if problem.kind.is_checkpoint() || problem.id == 0 {
                0
            } else {
                let conn = store::open_reader(&self.path).map_err(|e| self.renamed(e))?;
                conn.query_row(
                    "SELECT pg_id FROM pg_rows WHERE id = ?1",
                    [problem.id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| self.error(e))?
                .unwrap_or(0)
            };
        }
        Ok(report)
    }

    /// An error of the mirror's file, said of the database.
    fn renamed(&self, e: AuditError) -> AuditError {
        match e {
            AuditError::Database { message, .. } => self.error(message),
            other => other,
        }
    }

    fn error(&self, message: impl std::fmt::Display) -> AuditError {
        mirror_error(&self.name, message)
    }
}

/// An error of the mirror of the database `name`.
fn mirror_error(name: &str, message: impl std::fmt::Display) -> AuditError {
    AuditError::Database {
        path: name.into(),
        message: format!("its mirror for verify: {message}"),
    }
}

/// Copies the trail in `target`'s database into a new [`Mirror`], from one snapshot.
pub async fn mirror(target: &Target) -> Result<Mirror, AuditError> {
    let name = target.name();
    let err = pg_error(name);
    let dir = tempfile::Builder::new()
        .prefix("mcp-tunnel-verify-")
        .tempdir()
        .map_err(|e| AuditError::Database {
            path: name.into(),
            message: format!("a temporary folder for its mirror: {e}"),
        })?;
    let path = dir.path().join("mirror.db");
    let sql = |e: rusqlite::Error| mirror_error(name, e);
    let conn = Connection::open(&path).map_err(sql)?;
    // A scratch file: no journal, no fsync.
    conn.execute_batch("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;")
        .map_err(sql)?;
    store::create_schema(&conn).map_err(sql)?;
    conn.execute_batch(ROW_MAP).map_err(sql)?;

    let mut client = open(target).await?;
    let tx = snapshot(&mut client, name).await?;
    let copier = RowCopier::new()?;
    let (mut copied_rows, mut copied_checkpoints) = (0, 0);
    let portal = tx.bind(ROWS_SQL, &[]).await.map_err(&err)?;
    for_each_page(&tx, &portal, name, |rows| {
        copied_rows = copier.copy(&conn, rows, copied_rows).map_err(|e| match e {
            Copy::Sqlite(e) => sql(e),
            Copy::Database(e) => err(e),
        })?;
        Ok(())
    })
    .await?;
    let portal = tx
        .bind(checkpoints_sql().as_str(), &[])
        .await
        .map_err(&err)?;
    for_each_page(&tx, &portal, name, |rows| {
        conn.execute_batch("BEGIN").map_err(sql)?;
        for row in rows {
            let cp = checkpoint_row(row).map_err(&err)?;
            conn.execute(
                "INSERT INTO checkpoints (relay, n, prev, hash, kind, epoch, note, time_ms, \
                 interval_ms, heads, public_key, signature) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                rusqlite::params![
                    cp.relay,
                    cp.n,
                    cp.prev,
                    cp.hash,
                    cp.kind,
                    cp.epoch,
                    cp.note,
                    cp.time_ms,
                    cp.interval_ms,
                    cp.heads,
                    cp.public_key,
                    cp.signature
                ],
            )
            .map_err(sql)?;
            copied_checkpoints += 1;
        }
        conn.execute_batch("COMMIT").map_err(sql)?;
        Ok(())
    })
    .await?;
    let keys = tx
        .query("SELECT public_key, added_ms FROM keys", &[])
        .await
        .map_err(&err)?;
    conn.execute_batch("BEGIN").map_err(sql)?;
    for key in &keys {
        let (public_key, added): (String, i64) =
            (key.try_get(0).map_err(&err)?, key.try_get(1).map_err(&err)?);
        conn.execute(
            "INSERT OR IGNORE INTO keys (public_key, added_ms) VALUES (?1, ?2)",
            rusqlite::params![public_key, added],
        )
        .map_err(sql)?;
    }
    conn.execute_batch("COMMIT").map_err(sql)?;
    tx.commit().await.map_err(&err)?;
    drop(conn);
    Ok(Mirror {
        _dir: dir,
        path,
        name: name.to_owned(),
        rows: copied_rows,
        checkpoints: copied_checkpoints,
    })
}

/// `audit verify --db postgresql://...`: [`mirror`], then [`Mirror::verify`].
pub async fn verify(
    target: &Target,
    keys: &[String],
    offbox: Option<&[Checkpoint]>,
) -> Result<Report, AuditError> {
    mirror(target).await?.verify(keys, offbox)
}

/// Why copying a batch of rows failed.
enum Copy {
    Sqlite(rusqlite::Error),
    Database(tokio_postgres::Error),
}

impl From<rusqlite::Error> for Copy {
    fn from(e: rusqlite::Error) -> Self {
        Copy::Sqlite(e)
    }
}

impl From<tokio_postgres::Error> for Copy {
    fn from(e: tokio_postgres::Error) -> Self {
        Copy::Database(e)
    }
}

/// Writes the database's rows into the mirror.
struct RowCopier {
    /// The mirror's insert.
    insert: String,
    /// Where each of [`FROM_DATABASE`] is in [`RECORD_COLUMNS`].
    positions: [usize; FROM_DATABASE.len()],
}

impl RowCopier {
    fn new() -> Result<Self, AuditError> {
        let names: Vec<&str> = RECORD_COLUMNS.split(',').map(str::trim).collect();
        let mut positions = [0; FROM_DATABASE.len()];
        for (at, column) in positions.iter_mut().zip(FROM_DATABASE) {
            *at = names.iter().position(|n| *n == column).ok_or_else(|| {
                AuditError::Argument(format!("the trail has no record column {column}"))
            })?;
        }
        let placeholders: Vec<String> = (1..=7 + RECORD_COLUMN_COUNT)
            .map(|i| format!("?{i}"))
            .collect();
        Ok(Self {
            insert: format!(
                "INSERT INTO records (id, relay, tenant, seq, prev_hash, hash, record, \
                 {RECORD_COLUMNS}) VALUES ({})",
                placeholders.join(", ")
            ),
            positions,
        })
    }

    /// Copies `rows` (of [`ROWS_SQL`]) in one transaction, numbering them after `copied`;
    /// returns the rows copied so far.
    fn copy(&self, conn: &Connection, rows: &[Row], copied: u64) -> Result<u64, Copy> {
        conn.execute_batch("BEGIN")?;
        let mut insert = conn.prepare_cached(&self.insert)?;
        let mut map = conn.prepare_cached("INSERT INTO pg_rows (id, pg_id) VALUES (?1, ?2)")?;
        let mut n = copied;
        for row in rows {
            n += 1;
            let id = i64::try_from(n).unwrap_or(i64::MAX);
            let pg_id: i64 = row.try_get(0)?;
            let bytes: Vec<u8> = row.try_get(6)?;
            // The record's own columns; a record that does not decode fails the verifier
            // before its columns are looked at (its hash, or "invalid record").
            let mut columns: Vec<Value> = match serde_json::from_slice::<Record>(&bytes) {
                Ok(record) => record_columns(&record).into(),
                Err(_) => vec![Value::Text(String::new()); RECORD_COLUMN_COUNT],
            };
            let tool: Option<String> = row.try_get(10)?;
            let from_database = [
                Value::Integer(row.try_get(7)?),
                Value::Text(row.try_get(8)?),
                Value::Text(row.try_get(9)?),
                tool.map_or(Value::Null, Value::Text),
                Value::Text(row.try_get(11)?),
            ];
            for (at, value) in self.positions.iter().zip(from_database) {
                columns[*at] = value;
            }
            let mut values = vec![
                Value::Integer(id),
                Value::Text(row.try_get(1)?),
                Value::Text(row.try_get(2)?),
                Value::Integer(row.try_get(3)?),
                Value::Text(row.try_get(4)?),
                Value::Text(row.try_get(5)?),
                Value::Blob(bytes),
            ];
            values.extend(columns);
            insert.execute(params_from_iter(values))?;
            map.execute([id, pg_id])?;
        }
        conn.execute_batch("COMMIT")?;
        Ok(n)
    }
}
