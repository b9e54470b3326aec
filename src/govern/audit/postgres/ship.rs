//! Copying the spool into PostgreSQL: rows, then the checkpoints that sign them and the keys
//! that signed those, each in one transaction per batch, each stored once.

use std::path::Path;

use rusqlite::Connection;
use tokio_postgres::Client;

use super::pg_error;
use super::spool::{
    CHECKPOINT_NUMBERS, CHECKPOINT_TEXT, Marks, SpoolCheckpoint, SpoolRow, checkpoints_after,
    rows_after,
};
use crate::govern::audit::AuditError;

/// Rows shipped per transaction at most: the batch a spool drains in.
pub const SHIP_BATCH: usize = 512;

/// Ships `rows` in one transaction: each is stored unless its key is there already; one
/// whose key is there with another hash fails the whole batch. Returns how many were new.
pub async fn ship(client: &mut Client, name: &str, rows: &[SpoolRow]) -> Result<u64, AuditError> {
    let err = pg_error(name);
    if rows.is_empty() {
        return Ok(0);
    }
    let column = |f: fn(&SpoolRow) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
    let relays = column(|r| &r.relay);
    let tenants = column(|r| &r.tenant);
    let prevs = column(|r| &r.prev_hash);
    let hashes = column(|r| &r.hash);
    let subjects = column(|r| &r.subject);
    let sources = column(|r| &r.source);
    let decisions = column(|r| &r.decision);
    let tools: Vec<Option<&str>> = rows.iter().map(|r| r.tool.as_deref()).collect();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let times: Vec<i64> = rows.iter().map(|r| r.time_ms).collect();
    let records: Vec<&[u8]> = rows.iter().map(|r| r.record.as_slice()).collect();
    metrics::histogram!(crate::metrics::AUDIT_SHIP_BATCH_ROWS).record(rows.len() as f64);
    let tx = client.transaction().await.map_err(&err)?;
    let inserted = tx
        .execute(
            "INSERT INTO records (relay, tenant, seq, spool_id, prev_hash, hash, time_ms, \
             subject, source, tool, decision, record) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::int8[], $5::text[], \
             $6::text[], $7::int8[], $8::text[], $9::text[], $10::text[], $11::text[], \
             $12::bytea[]) ON CONFLICT (relay, tenant, seq) DO NOTHING",
            &[
                &relays, &tenants, &seqs, &ids, &prevs, &hashes, &times, &subjects, &sources,
                &tools, &decisions, &records,
            ],
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
            return Err(AuditError::Forked {
                database: name.into(),
                message: format!(
                    "row {seq} of relay {relay}, tenant {tenant} is in the database with \
                     another hash: the chains forked (two relays with one [fleet] id, or this \
                     relay's spool was replaced or restored from an old copy) or a row was \
                     altered; nothing of this batch was stored. Give the relay a new [fleet] id \
                     or restore its spool"
                ),
            });
        }
    }
    tx.commit().await.map_err(&err)?;
    metrics::counter!(crate::metrics::AUDIT_SHIPPED).increment(inserted);
    Ok(inserted)
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
            return Err(AuditError::Forked {
                database: name.into(),
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

/// Batches of rows one [`ship_spool`] round ships at most: a round is bounded in time (the
/// shipper gives each [`super::ROUND_TIMEOUT`]), so a large backlog drains over many rounds,
/// each making progress, instead of timing out whole.
pub const ROUND_BATCHES: usize = 16;

/// Ships what the spool `conn` (at `path`) holds after `marks`, moving them on: up to
/// [`SHIP_BATCH`] of the checkpoints present now are read first, then up to [`ROUND_BATCHES`]
/// batches of rows; if that took every row there was, those checkpoints follow (a checkpoint
/// reaches the database only after every row it signs), else the next round reads them again.
/// Run it until it ships nothing. The marks are noted in the spool as [`Marks::note`] says; a
/// note that fails is logged and retried later (the rows are in the database: the worst a
/// crash then costs is shipping them again, which stores nothing twice).
pub async fn ship_spool(
    client: &mut Client,
    name: &str,
    conn: &Connection,
    path: &Path,
    marks: &mut Marks,
) -> Result<Shipped, AuditError> {
    let mut shipped = Shipped::default();
    // At most a batch of them a round (bounded memory after a long outage); the next round
    // ships the rest.
    let checkpoints = checkpoints_after(conn, path, marks.checkpoints, SHIP_BATCH)?;
    let mut drained = false;
    for _ in 0..ROUND_BATCHES {
        let rows = rows_after(conn, path, marks.rows, SHIP_BATCH)?;
        let Some(last) = rows.last().map(|r| r.id) else {
            drained = true;
            break;
        };
        shipped.rows += ship(client, name, &rows).await?;
        marks.rows = last;
        note(marks, conn, path);
    }
    if drained {
        for batch in checkpoints.chunks(SHIP_BATCH) {
            shipped.checkpoints += ship_checkpoints(client, name, batch).await?;
            if let Some(last) = batch.last() {
                marks.checkpoints = last.id;
            }
        }
        note(marks, conn, path);
    }
    Ok(shipped)
}

/// [`Marks::note`] when due; a failure (the spool's lock held past its busy timeout) is logged
/// and the note retried at the next batch.
fn note(marks: &mut Marks, conn: &Connection, path: &Path) {
    if let Err(e) = marks.note(conn, path, false) {
        tracing::warn!(error = %e, "cannot note the shipped marks in the spool; retried later");
    }
}
