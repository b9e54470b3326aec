//! `audit verify`: checks every hash chain, every checkpoint chain and what the checkpoints
//! sign, in one read snapshot (so it works while a relay writes), and reports the first
//! problem. [`check_start`] is the part a relay runs on its own chains before writing.
//!
//! One module a concept: `report` (what it answers), `checkpoints` (the checkpoint
//! chains and what they sign), `rows` (the walk over the rows), `clock` (the unsigned-rows
//! test), `legacy` (schema 1), `offbox` (the off-box copy), `start` (a relay's own
//! check before writing). This file runs them in order over one read snapshot.
//!
//! - **Rows.** Each (relay, tenant) chain runs 1, 2, 3, ... with no gap and nothing out of
//!   order; each row's `prev_hash` is the hash of the row before; its hash is the hash of its
//!   stored record bytes; its columns say what those bytes say.
//! - **Checkpoints** (see [`super::checkpoint`]). Each relay's checkpoints are numbered 1, 2, 3,
//!   ... and each links to the hash of the one before; every signature verifies (with
//!   `--public-key`, by one of those keys only). A relay's last checkpoint names the head of
//!   every tenant chain it writes: a head whose rows are gone is a vanished tenant or a cut
//!   tail; a head whose hash differs is a rewritten chain.
//! - **Unsigned rows.** A running relay signs at least every checkpoint interval, so rows after
//!   its last checkpoint are a crash tail (a warning, not a failure) only while none of them
//!   is more than one interval (plus [`CRASH_GRACE_MS`]) later than the last checkpoint or an
//!   earlier unsigned row; else checkpoints were deleted. Rows a relay has with no checkpoint
//!   at all mean its checkpoints were deleted (a relay checkpoints before its first row).
//! - **Epochs.** A relay started with `--new-audit-epoch` on a trail that did not verify
//!   writes an epoch checkpoint saying why: reported as a warning; the rows before it are still
//!   checked, and rows it signed that no earlier checkpoint did must pass the unsigned-rows test.
//! - **Segment rows.** Rows past the database's mark in the segment files (a running relay's
//!   last milliseconds, or a crash's) must continue their chains from the database's rows
//!   (see `segment`); they are counted, with a warning.
//! - **Off-box copy** (`--checkpoints FILE`): every checkpoint in it must be in the trail,
//!   identical. Without it, a trail rewritten whole with another key, or cut back to an earlier
//!   checkpoint together with everything after, cannot be told from an intact one.
//! - Schema 1 trails (per-tenant checkpoints) are read too: their checkpoints are checked as
//!   they were (signature, and the row they name).

mod checkpoints;
mod clock;
mod legacy;
mod offbox;
mod report;
mod rows;
mod segment;
mod start;

use std::collections::HashSet;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

pub use clock::CRASH_GRACE_MS;
pub use offbox::read_offbox;
pub use report::{Problem, ProblemKind, Report};
pub use start::check_start;

use super::AuditError;
use super::checkpoint::Checkpoint;
use super::store;
use checkpoints::Signed;
use rows::Walk;

/// A time for messages (RFC 3339).
fn when(ms: u64) -> String {
    super::query::format_time(ms)
}

/// Verifies the trail at `path`. With `keys` (hex, see [`super::key::read_public_key`]) every
/// checkpoint must be signed by one of them; without, signatures are checked against the keys
/// the trail itself names. With `offbox` (the off-box copy), every checkpoint in it must be in
/// the trail, identical.
pub fn verify(
    path: &Path,
    keys: &[String],
    offbox: Option<&[Checkpoint]>,
) -> Result<Report, AuditError> {
    let mut conn = store::open_reader(path)?;
    let err = store::sql_error(path);
    // Before the snapshot: a file removed once indexed meanwhile is still read whole.
    let segments = super::segment::open_from(path, 0).map_err(|e| AuditError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let v1 = store::schema_version(&conn, path)?.as_deref() == Some(store::SCHEMA_V1);
    // One read transaction: rows and checkpoints from the same moment.
    let tx = conn.transaction().map_err(&err)?;
    let keys: Vec<String> = keys.iter().map(|k| k.to_ascii_lowercase()).collect();
    let mut report = Report {
        rows: 0,
        tenants: 0,
        relays: 0,
        checkpoints: 0,
        notes: Vec::new(),
        warnings: Vec::new(),
        problem: None,
    };
    let mut signed = Signed::default();
    if !v1 {
        report.problem =
            checkpoints::read_checkpoints(&tx, &keys, &mut signed, &mut report).map_err(&err)?;
        if report.problem.is_some() {
            return Ok(report);
        }
    }
    let walk = rows::walk_rows(&tx, v1, &mut signed, &mut report).map_err(&err)?;
    report.tenants = walk
        .tails
        .keys()
        .map(|(_, tenant)| tenant.as_str())
        .collect::<HashSet<_>>()
        .len() as u64;
    let mut all_relays: HashSet<&str> = signed.relays.keys().map(String::as_str).collect();
    all_relays.extend(walk.relay_rows.keys().map(String::as_str));
    report.relays = all_relays.len() as u64;
    if report.problem.is_some() {
        return Ok(report);
    }
    report.problem = check_after_walk(&tx, path, v1, &keys, &signed, &walk, &mut report)?;
    if report.problem.is_some() {
        return Ok(report);
    }
    if !v1 {
        report.problem =
            segment::check_segment(&tx, segments, &walk.tails, &mut report).map_err(|e| {
                AuditError::Database {
                    path: path.to_owned(),
                    message: e.to_string(),
                }
            })?;
        if report.problem.is_some() {
            return Ok(report);
        }
    }
    if let Some(copy) = offbox {
        report.problem = offbox::check_offbox(copy, &keys, &tx, &mut report).map_err(&err)?;
        if report.problem.is_some() {
            return Ok(report);
        }
    }
    if keys.is_empty() && report.checkpoints > 0 {
        report.notes.push(
            "signatures were checked with the keys the trail names; pass --public-key to check \
             them against a key kept elsewhere"
                .into(),
        );
    }
    Ok(report)
}

/// The checks once the rows are walked, in order, up to the first problem: what the kept
/// checkpoints sign is there, unsigned rows are a crash tail, schema 1 checkpoints verify, and
/// every relay with rows has checkpoints (or schema 1 ones).
fn check_after_walk(
    tx: &Connection,
    path: &Path,
    v1: bool,
    keys: &[String],
    signed: &Signed,
    walk: &Walk,
    report: &mut Report,
) -> Result<Option<Problem>, AuditError> {
    let err = store::sql_error(path);
    let mut row_hash = tx
        .prepare(if v1 {
            "SELECT hash FROM records WHERE ?1 = '' AND tenant = ?2 AND seq = ?3"
        } else {
            "SELECT hash FROM records WHERE relay = ?1 AND tenant = ?2 AND seq = ?3"
        })
        .map_err(&err)?;
    let mut lookup = |relay: &str, tenant: &str, seq: u64| -> Result<Option<String>, AuditError> {
        row_hash
            .query_row(rusqlite::params![relay, tenant, seq as i64], |r| r.get(0))
            .optional()
            .map_err(&err)
    };
    let problem = checkpoints::check_signed_heads(signed, &walk.tails, &mut lookup)?;
    if problem.is_some() {
        return Ok(problem);
    }
    let problem = checkpoints::check_unsigned(signed, &walk.clocks, report);
    if problem.is_some() {
        return Ok(problem);
    }
    let legacy = legacy::legacy_checkpoints(tx, v1, keys, report, &mut lookup)?;
    if report.problem.is_some() {
        return Ok(report.problem.take());
    }
    Ok(legacy::check_unchained_relays(
        &walk.relay_rows,
        signed,
        &legacy,
        &walk.tails,
        report,
    ))
}
