//! The rows past the database's mark in the segment files (see
//! [`crate::govern::audit::segment`]): a running relay's last milliseconds of rows, or what a
//! crash left before the relay indexes it at its next start. Each must continue its chain
//! from where the database's rows end: the next sequence number, linked to the last hash, and
//! hashing to its own hash.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;

use rusqlite::Connection;

use super::report::{Problem, ProblemKind, Report};
use super::rows::Tail;
use crate::govern::audit::segment::{self, SegmentError};
use crate::govern::audit::store;

/// The segment files, opened before the read snapshot begins (a file the relay removes once
/// indexed is still read whole).
pub(super) type Open = Vec<(u64, PathBuf, File)>;

/// Checks the segment rows past the mark `tx` records against the chains' `tails` (as the
/// walk over the database left them); counts them into `report`.
pub(super) fn check_segment(
    tx: &Connection,
    files: Open,
    tails: &HashMap<(String, String), Tail>,
    report: &mut Report,
) -> Result<Option<Problem>, SegmentCheckError> {
    let mark = store::segment_mark(tx)?;
    let rows = match segment::rows_past(files, mark) {
        Ok(rows) => rows,
        Err(SegmentError::Damaged { path, offset, what }) => {
            return Ok(Some(Problem {
                relay: String::new(),
                checkpoint: None,
                tenant: None,
                seq: None,
                id: 0,
                kind: ProblemKind::InvalidRecord,
                detail: format!("segment file {}: {what} at byte {offset}", path.display()),
            }));
        }
        Err(e) => return Err(e.into()),
    };
    let mut ends: HashMap<(String, String), Tail> = HashMap::new();
    let mut per_relay: std::collections::BTreeMap<String, u64> = Default::default();
    for (relay, row) in rows {
        let key = (relay.clone(), row.record.tenant.clone());
        // Indexed after the mark was read: the walk saw it.
        if tails.get(&key).is_some_and(|t| row.seq <= t.seq) {
            continue;
        }
        let end = ends.entry(key).or_insert_with_key(|key| {
            tails.get(key).copied().unwrap_or(Tail {
                seq: 0,
                hash: crate::govern::audit::chain::GENESIS,
            })
        });
        let kind = if row.seq != end.seq + 1 {
            Some(ProblemKind::Gap)
        } else if row.prev != end.hash {
            Some(ProblemKind::ChainBroken)
        } else if !row.hash_holds() {
            Some(ProblemKind::HashMismatch)
        } else {
            None
        };
        if let Some(kind) = kind {
            return Ok(Some(Problem {
                relay,
                checkpoint: None,
                tenant: Some(row.record.tenant.clone()),
                seq: Some(row.seq),
                id: 0,
                kind,
                detail: format!(
                    "a row in the segment file (not yet in the database) does not continue \
                     its chain, which ends at seq {}",
                    end.seq
                ),
            }));
        }
        end.seq = row.seq;
        end.hash = row.hash;
        report.rows += 1;
        *per_relay.entry(relay).or_default() += 1;
    }
    for (relay, count) in per_relay {
        report.warnings.push(format!(
            "relay {relay:?}: {count} rows are in the segment file, not yet in the database (a \
             running relay indexes them within milliseconds, a crashed one when it starts \
             again); they continue their chains"
        ));
    }
    Ok(None)
}

/// Why the segment files could not be checked.
#[derive(Debug, thiserror::Error)]
pub(super) enum SegmentCheckError {
    /// The database's mark could not be read.
    #[error(transparent)]
    Database(#[from] rusqlite::Error),
    /// A file could not be read, or is damaged.
    #[error(transparent)]
    Segment(#[from] SegmentError),
}
