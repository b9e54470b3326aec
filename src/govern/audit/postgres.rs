//! One trail for a fleet, in PostgreSQL. So far the shipping and the schema: the relay does not
//! run a shipper yet (`[audit] url` is to come), and `audit tail|export|verify` read SQLite.
//!
//! A relay's local SQLite trail stays what makes a row durable before its answer is released:
//! it is the spool. [`ship`] copies its rows, in local insertion order (so in order within
//! every chain), into PostgreSQL, many per transaction, keyed by (relay, tenant, seq): a row
//! shipped twice (a crash between the database's commit and the spool's note of it) is not
//! stored twice, and a row whose key is there with another hash is refused (a forked or
//! altered chain), never overwritten.
//!
//! The relays' signed checkpoints and their public keys ship the same way, after the rows they
//! sign ([`ship_spool`]), so the database never holds a checkpoint naming a row it lacks.
//!
//! The shipped marks live in the spool (`meta`: `shipped_id`, `shipped_checkpoint_id`),
//! written after PostgreSQL committed: on restart the relay ships again from there.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use tokio_postgres::Client;

use super::AuditError;

/// The PostgreSQL schema this code writes (in `meta`).
pub const PG_SCHEMA_VERSION: &str = "1";

/// Rows shipped per transaction at most: the batch a spool drains in.
pub const SHIP_BATCH: usize = 512;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    relay TEXT NOT NULL,
    tenant TEXT NOT NULL,
    seq BIGINT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (relay, tenant, seq)
);
CREATE INDEX IF NOT EXISTS records_time ON records (time_ms);
CREATE TABLE IF NOT EXISTS checkpoints (
    relay TEXT NOT NULL,
    n BIGINT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL,
    kind TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    note TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    interval_ms BIGINT NOT NULL,
    heads TEXT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (relay, n)
);
CREATE TABLE IF NOT EXISTS keys (
    public_key TEXT PRIMARY KEY,
    added_ms BIGINT NOT NULL
);
";

/// One row of a spool, as shipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolRow {
    /// Its id in the spool (insertion order).
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
    /// The record's bytes, as hashed.
    pub record: Vec<u8>,
}

fn pg_error(url_for_errors: &str) -> impl Fn(tokio_postgres::Error) -> AuditError + '_ {
    move |e| AuditError::Database {
        path: url_for_errors.into(),
        message: e.to_string(),
    }
}

/// Creates the schema (or checks its version) in the database `client` is connected to.
pub async fn migrate(client: &Client, name: &str) -> Result<(), AuditError> {
    let err = pg_error(name);
    client.batch_execute(SCHEMA).await.map_err(&err)?;
    let version: Option<String> = client
        .query_opt("SELECT value FROM meta WHERE key = 'schema'", &[])
        .await
        .map_err(&err)?
        .map(|row| row.get(0));
    match version.as_deref() {
        None => {
            client
                .execute(
                    "INSERT INTO meta (key, value) VALUES ('schema', $1) ON CONFLICT DO NOTHING",
                    &[&PG_SCHEMA_VERSION],
                )
                .await
                .map_err(&err)?;
            Ok(())
        }
        Some(PG_SCHEMA_VERSION) => Ok(()),
        Some(other) => Err(AuditError::Database {
            path: name.into(),
            message: format!(
                "schema version {other}, this build writes {PG_SCHEMA_VERSION}: upgrade the relay"
            ),
        }),
    }
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
            "SELECT id, relay, tenant, seq, prev_hash, hash, time_ms, record FROM records \
             WHERE id > ?1 ORDER BY id LIMIT ?2",
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
                    record: r.get(7)?,
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
const ROWS_MARK: &str = "shipped_id";
const CHECKPOINTS_MARK: &str = "shipped_checkpoint_id";

fn spool_error(path: &Path) -> impl Fn(rusqlite::Error) -> AuditError + '_ {
    move |e| AuditError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn get_mark(conn: &Connection, path: &Path, key: &str) -> Result<i64, AuditError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
            r.get::<_, String>(0)
        })
        .optional()
        .map_err(spool_error(path))?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

fn set_mark(conn: &Connection, path: &Path, key: &str, id: i64) -> Result<(), AuditError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, id.to_string()],
    )
    .map(drop)
    .map_err(spool_error(path))
}

/// Ships `rows` in one transaction: each is stored unless its key is there already; one
/// whose key is there with another hash fails the whole batch. Returns how many were new.
pub async fn ship(client: &mut Client, name: &str, rows: &[SpoolRow]) -> Result<u64, AuditError> {
    let err = pg_error(name);
    if rows.is_empty() {
        return Ok(0);
    }
    let column = |f: fn(&SpoolRow) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let relays = column(|r| r.relay.clone());
    let tenants = column(|r| r.tenant.clone());
    let prevs = column(|r| r.prev_hash.clone());
    let hashes = column(|r| r.hash.clone());
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let times: Vec<i64> = rows.iter().map(|r| r.time_ms).collect();
    let records: Vec<&[u8]> = rows.iter().map(|r| r.record.as_slice()).collect();
    let tx = client.transaction().await.map_err(&err)?;
    let inserted = tx
        .execute(
            "INSERT INTO records (relay, tenant, seq, prev_hash, hash, time_ms, record) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], \
             $6::int8[], $7::bytea[]) ON CONFLICT (relay, tenant, seq) DO NOTHING",
            &[&relays, &tenants, &seqs, &prevs, &hashes, &times, &records],
        )
        .await
        .map_err(&err)?;
    if inserted < rows.len() as u64 {
        // Some were there: the same rows shipped again, or a fork.
        let forked: Option<(String, String, i64)> = tx
            .query_opt(
                "SELECT r.relay, r.tenant, r.seq FROM records r JOIN UNNEST($1::text[], \
                 $2::text[], $3::int8[], $4::text[]) AS s(relay, tenant, seq, hash) \
                 ON r.relay = s.relay AND r.tenant = s.tenant AND r.seq = s.seq \
                 WHERE r.hash <> s.hash LIMIT 1",
                &[&relays, &tenants, &seqs, &hashes],
            )
            .await
            .map_err(&err)?
            .map(|row| (row.get(0), row.get(1), row.get(2)));
        if let Some((relay, tenant, seq)) = forked {
            return Err(AuditError::Database {
                path: name.into(),
                message: format!(
                    "row {seq} of relay {relay}, tenant {tenant} is in the database with \
                     another hash: the chains forked (two relays with one id?) or a row was \
                     altered; nothing of this batch was stored"
                ),
            });
        }
    }
    tx.commit().await.map_err(&err)?;
    Ok(inserted)
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
const CHECKPOINT_TEXT: [&str; 7] = [
    "prev",
    "hash",
    "kind",
    "note",
    "heads",
    "public_key",
    "signature",
];

/// Its number columns besides `n`.
const CHECKPOINT_NUMBERS: [&str; 3] = ["epoch", "time_ms", "interval_ms"];

/// Up to `limit` checkpoints of the spool after its checkpoint mark, oldest first.
fn unshipped_checkpoints(
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

/// Ships `checkpoints` and the keys that signed them in one transaction, each once; one whose
/// (relay, n) is there with another hash fails the batch. Returns how many were new.
async fn ship_checkpoints(
    client: &mut Client,
    name: &str,
    checkpoints: &[SpoolCheckpoint],
) -> Result<u64, AuditError> {
    let err = pg_error(name);
    if checkpoints.is_empty() {
        return Ok(0);
    }
    let relays: Vec<&str> = checkpoints.iter().map(|c| c.relay.as_str()).collect();
    let ns: Vec<i64> = checkpoints.iter().map(|c| c.n).collect();
    let text: Vec<Vec<&str>> = (0..CHECKPOINT_TEXT.len())
        .map(|i| checkpoints.iter().map(|c| c.text[i].as_str()).collect())
        .collect();
    let numbers: Vec<Vec<i64>> = (0..CHECKPOINT_NUMBERS.len())
        .map(|i| checkpoints.iter().map(|c| c.numbers[i]).collect())
        .collect();
    let sql = format!(
        "INSERT INTO checkpoints (relay, n, {}, {}) SELECT * FROM UNNEST($1::text[], \
         $2::int8[], {}, {}) ON CONFLICT (relay, n) DO NOTHING",
        CHECKPOINT_TEXT.join(", "),
        CHECKPOINT_NUMBERS.join(", "),
        (0..CHECKPOINT_TEXT.len())
            .map(|i| format!("${}::text[]", i + 3))
            .collect::<Vec<_>>()
            .join(", "),
        (0..CHECKPOINT_NUMBERS.len())
            .map(|i| format!("${}::int8[]", i + 3 + CHECKPOINT_TEXT.len()))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&relays, &ns];
    params.extend(
        text.iter()
            .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync)),
    );
    params.extend(
        numbers
            .iter()
            .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync)),
    );
    let keys: Vec<&str> = checkpoints.iter().map(|c| c.text[5].as_str()).collect();
    let added: Vec<i64> = checkpoints.iter().map(|c| c.numbers[1]).collect();
    let tx = client.transaction().await.map_err(&err)?;
    let inserted = tx.execute(&sql, &params).await.map_err(&err)?;
    if inserted < checkpoints.len() as u64 {
        let hashes = &text[1];
        let forked: Option<(String, i64)> = tx
            .query_opt(
                "SELECT c.relay, c.n FROM checkpoints c JOIN UNNEST($1::text[], $2::int8[], \
                 $3::text[]) AS s(relay, n, hash) ON c.relay = s.relay AND c.n = s.n \
                 WHERE c.hash <> s.hash LIMIT 1",
                &[&relays, &ns, hashes],
            )
            .await
            .map_err(&err)?
            .map(|row| (row.get(0), row.get(1)));
        if let Some((relay, n)) = forked {
            return Err(AuditError::Database {
                path: name.into(),
                message: format!(
                    "checkpoint {n} of relay {relay} is in the database with another hash: \
                     nothing of this batch was stored"
                ),
            });
        }
    }
    tx.execute(
        "INSERT INTO keys (public_key, added_ms) SELECT * FROM UNNEST($1::text[], $2::int8[]) \
         ON CONFLICT DO NOTHING",
        &[&keys, &added],
    )
    .await
    .map_err(&err)?;
    tx.commit().await.map_err(&err)?;
    Ok(inserted)
}

/// What one [`ship_spool`] round shipped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Shipped {
    /// Rows new in the database.
    pub rows: u64,
    /// Checkpoints new in the database.
    pub checkpoints: u64,
}

/// Ships what the spool `conn` (at `path`) holds that it has not shipped: up to
/// [`SHIP_BATCH`] of the checkpoints present now are read first, then every row (in batches of
/// [`SHIP_BATCH`]), then those checkpoints: a checkpoint reaches the database only after every
/// row it signs. Run it until it ships nothing.
pub async fn ship_spool(
    client: &mut Client,
    name: &str,
    conn: &Connection,
    path: &Path,
) -> Result<Shipped, AuditError> {
    let mut shipped = Shipped::default();
    // At most a batch of them a round (bounded memory after a long outage); the next round
    // ships the rest.
    let checkpoints = unshipped_checkpoints(conn, path, SHIP_BATCH)?;
    loop {
        let (_, rows) = unshipped(conn, path, SHIP_BATCH)?;
        let Some(last) = rows.last().map(|r| r.id) else {
            break;
        };
        shipped.rows += ship(client, name, &rows).await?;
        mark_shipped(conn, path, last)?;
    }
    for batch in checkpoints.chunks(SHIP_BATCH) {
        shipped.checkpoints += ship_checkpoints(client, name, batch).await?;
        if let Some(last) = batch.last() {
            set_mark(conn, path, CHECKPOINTS_MARK, last.id)?;
        }
    }
    Ok(shipped)
}
