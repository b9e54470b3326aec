//! The rows past the database's mark in the segment files (see
//! [`crate::govern::audit::segment`]): a running relay's last milliseconds of rows, or what a
//! crash left before the relay indexes it at its next start. Each must continue its chain
//! from where the database's rows end: the next sequence number, linked to the last hash, and
//! hashing to its own hash.

use std::collections::{HashMap, HashSet};

use rusqlite::Connection;

use super::report::{Problem, ProblemKind, Report};
use super::rows::Tail;
use crate::govern::audit::segment::{self, SegmentError};
use crate::govern::audit::store;

/// Checks the segment rows past the mark `tx` records against the chains' `tails` (as the
/// walk over the database left them); counts them into `report`.
pub(super) fn check_segment(
    tx: &Connection,
    files: segment::OpenFiles,
    tails: &HashMap<(String, String), Tail>,
    report: &mut Report,
) -> Result<Option<Problem>, SegmentCheckError> {
    let mark = store::segment_mark(tx)?;
    let past = match segment::rows_past(files, mark) {
        Ok(past) => past,
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
    let known: HashSet<&str> = tails.keys().map(|(_, tenant)| tenant.as_str()).collect();
    let mut new_tenants: HashSet<String> = HashSet::new();
    let mut ends: HashMap<(String, String), Tail> = HashMap::new();
    let mut per_relay: std::collections::BTreeMap<String, u64> = Default::default();
    for (path, bytes) in &past.torn {
        report.warnings.push(format!(
            "segment file {} ends in {bytes} bytes that are not a whole row (a write cut short \
             by a crash, which no answer waited on, or one in progress)",
            path.display()
        ));
    }
    for (relay, row) in past.rows {
        let key = (relay.clone(), row.record.tenant.clone());
        let end = ends.entry(key).or_insert_with_key(|key| {
            tails.get(key).copied().unwrap_or(Tail {
                seq: 0,
                hash: crate::govern::audit::chain::GENESIS,
            })
        });
        // The database and the mark are of one snapshot: a row past the mark whose number the
        // chain already has is a second version of it (a fork).
        let kind = if row.seq <= end.seq {
            Some(ProblemKind::Reordered)
        } else if row.seq != end.seq + 1 {
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
        if !known.contains(row.record.tenant.as_str()) {
            new_tenants.insert(row.record.tenant.clone());
        }
        *per_relay.entry(relay).or_default() += 1;
    }
    report.tenants += new_tenants.len() as u64;
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
