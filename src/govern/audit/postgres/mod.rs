//! One audit trail for a fleet, in PostgreSQL.
//!
//! A relay's local SQLite trail stays what makes a row durable before its answer is released:
//! with `[audit] url` it is the spool. The relay's [`Shipper`] copies its rows, in local
//! insertion order (so in order within every chain), into PostgreSQL, many per transaction,
//! keyed by (relay, tenant, seq): a row shipped twice (a crash between the database's commit
//! and the spool's note of it) is not stored twice, and a row whose key is there with another
//! hash is refused (a forked or altered chain), never overwritten. The relays' signed
//! checkpoints and their public keys ship the same way, after the rows they sign, so the
//! database never holds a checkpoint naming a row it lacks.
//!
//! One module a concern: `target` (the database's address, password and TLS), `spool` (what
//! the SQLite spool has not shipped, and its marks), `ship` (copying it in), `shipper` (the
//! relay's background task, its metrics and the fail-closed switch), `read` (`audit tail`,
//! `export` and `checkpoints` over the database), `mirror` (`audit verify` over it, through a
//! SQLite copy the one verifier reads). This file holds the schema.

pub mod mirror;
pub mod read;
mod ship;
mod shipper;
mod spool;
mod target;

pub use ship::{ROUND_BATCHES, SHIP_BATCH, Shipped, ship, ship_spool};
pub use shipper::{
    CLOSE_TIMEOUT, MAX_BACKOFF, MIN_BACKOFF, OnDatabaseDown, REFUSE_AFTER, ROUND_TIMEOUT,
    SHIP_POLL, Shipper, ShipperSettings,
};
pub use spool::{
    BATCH_BYTES, Marks, NOTE_EVERY, SpoolCheckpoint, SpoolRow, mark_shipped, spool_depth, unshipped,
};
pub use target::{CONNECT_TIMEOUT, SslMode, Target};

use tokio_postgres::Client;

use super::AuditError;

/// The PostgreSQL schema this code writes (in `meta`). Version 1 was a development build's
/// (records without arrival ids or filter columns), never released.
pub const PG_SCHEMA_VERSION: &str = "2";
const PG_SCHEMA_VERSION_NUMBER: u32 = 2;

/// The tables. `records` holds the columns `audit tail|export` filter on besides the record's
/// bytes (which the hash covers: `audit verify` checks the columns against them); `id` is the
/// order rows arrived in the database, `spool_id` their order in their relay's spool (the
/// order a relay wrote them, which `verify` walks).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    id BIGINT GENERATED ALWAYS AS IDENTITY,
    relay TEXT NOT NULL,
    tenant TEXT NOT NULL,
    seq BIGINT NOT NULL,
    spool_id BIGINT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    subject TEXT NOT NULL,
    source TEXT NOT NULL,
    tool TEXT,
    decision TEXT NOT NULL,
    record BYTEA NOT NULL,
    PRIMARY KEY (relay, tenant, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS records_id ON records (id);
CREATE INDEX IF NOT EXISTS records_time ON records (time_ms);
CREATE INDEX IF NOT EXISTS records_spool_order ON records (relay, spool_id);
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

/// An error of the database named `name` (its address without the password).
fn pg_error(name: &str) -> impl Fn(tokio_postgres::Error) -> AuditError + '_ {
    move |e| AuditError::Database {
        path: name.into(),
        message: target::describe(&e),
    }
}

/// Creates the schema (or checks its version) in the database `client` is connected to. Safe
/// to run from several relays at once. A database whose schema is there already is only read:
/// relays then need no more than `SELECT` and `INSERT` on its tables (see the README's
/// least-privilege role), never the right to change or drop them.
pub async fn migrate(client: &Client, name: &str) -> Result<(), AuditError> {
    let err = pg_error(name);
    if let Some(version) = schema_version(client, name).await? {
        return check_version(&version, name);
    }
    // Relays starting together would race on CREATE TABLE IF NOT EXISTS (a unique violation
    // in the catalog): one at a time, under a transaction-scoped advisory lock.
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({MIGRATE_LOCK}); {SCHEMA} \
             INSERT INTO meta (key, value) VALUES ('schema', '{PG_SCHEMA_VERSION}') \
             ON CONFLICT DO NOTHING; COMMIT;"
        ))
        .await
        .map_err(&err)?;
    match schema_version(client, name).await? {
        Some(version) => check_version(&version, name),
        None => Err(AuditError::Database {
            path: name.into(),
            message: "the schema was created but names no version".into(),
        }),
    }
}

/// The schema version the database records; `None` when it has no `meta` table or no version.
async fn schema_version(client: &Client, name: &str) -> Result<Option<String>, AuditError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('meta') IS NOT NULL", &[])
        .await
        .map_err(pg_error(name))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    Ok(client
        .query_opt("SELECT value FROM meta WHERE key = 'schema'", &[])
        .await
        .map_err(pg_error(name))?
        .map(|row| row.get(0)))
}

/// Whether this build writes a database of schema `version`.
fn check_version(version: &str, name: &str) -> Result<(), AuditError> {
    if version == PG_SCHEMA_VERSION {
        return Ok(());
    }
    let message = match version.parse::<u32>() {
        Ok(v) if v > PG_SCHEMA_VERSION_NUMBER => format!(
            "schema version {version}, this build writes {PG_SCHEMA_VERSION}: upgrade the relay"
        ),
        _ => format!(
            "schema version {version} was written by an earlier development build, which this \
             build ({PG_SCHEMA_VERSION}) does not migrate: give the relays a new database"
        ),
    };
    Err(AuditError::Database {
        path: name.into(),
        message,
    })
}

/// The advisory lock [`migrate`] holds: an arbitrary constant of this program ("mcpt" in
/// ASCII), so relays of one fleet serialize their migrations and nothing else waits on it.
const MIGRATE_LOCK: i64 = 0x6d63_7074;
