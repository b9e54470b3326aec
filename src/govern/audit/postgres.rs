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
//! The shipped mark lives in the spool (`meta`: `shipped_id`), written after PostgreSQL
//! committed: on restart the relay ships again from there.

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
    let err = |e: rusqlite::Error| AuditError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mark: i64 = conn
        .query_row("SELECT value FROM meta WHERE key = 'shipped_id'", [], |r| {
            r.get::<_, String>(0)
        })
        .optional()
        .map_err(err)?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut stmt = conn
        .prepare(
            "SELECT id, relay, tenant, seq, prev_hash, hash, time_ms, record FROM records \
             WHERE id > ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(err)?;
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
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    Ok((mark, rows))
}

/// Notes in the spool that every row up to `id` is shipped.
pub fn mark_shipped(conn: &Connection, path: &Path, id: i64) -> Result<(), AuditError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('shipped_id', ?1) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![id.to_string()],
    )
    .map(drop)
    .map_err(|e| AuditError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    })
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
