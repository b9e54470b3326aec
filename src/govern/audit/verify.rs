//! `audit verify`: checks every tenant's hash chain and every checkpoint signature, in one read
//! snapshot (so it works while a relay writes), and reports the first bad row.
//!
//! Rows are read in insertion order. For each tenant the sequence must run 1, 2, 3, ... with no
//! gap and nothing out of order; each row's `prev_hash` must be the hash of the row before;
//! its hash must be the hash of its stored record bytes; and its columns must say what those
//! bytes say. Each checkpoint's signature must verify (with `--public-key`, by that key only)
//! and name a row that exists with that hash. Rows after a tenant's last checkpoint are fine
//! but unsigned: a note, not a failure (they could be cut from the end unnoticed).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use rusqlite::types::Value;

use super::chain::{self, GENESIS};
use super::store::{self, RECORD_COLUMN_COUNT, RECORD_COLUMNS, record_columns};
use super::{AuditError, Record};

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Rows checked.
    pub rows: u64,
    /// Tenants seen.
    pub tenants: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// Remarks that are not failures (unsigned tails, where the key came from).
    pub notes: Vec<String>,
    /// The first thing wrong, if any.
    pub problem: Option<Problem>,
}

impl Report {
    /// Whether the trail is intact.
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        match &self.problem {
            None => write!(
                f,
                "ok: {} rows, {} tenants, {} checkpoints verified",
                self.rows, self.tenants, self.checkpoints
            ),
            Some(problem) => write!(
                f,
                "FAILED: {problem} (after {} good rows and {} checkpoints)",
                self.rows, self.checkpoints
            ),
        }
    }
}

/// The first bad row or checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The tenant whose chain is broken.
    pub tenant: String,
    /// The sequence number of the bad row (or the row a bad checkpoint names).
    pub seq: u64,
    /// The row's (or checkpoint's) id in the file.
    pub id: i64,
    /// What kind of damage.
    pub kind: ProblemKind,
    /// Details.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = if self.kind.is_checkpoint() {
            "checkpoint"
        } else {
            "row"
        };
        write!(
            f,
            "tenant {:?} seq {} ({what} id {}): {}: {}",
            self.tenant, self.seq, self.id, self.kind, self.detail
        )
    }
}

/// Kinds of damage `verify` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// The row's bytes do not hash to its stored hash (a changed record).
    HashMismatch,
    /// A column disagrees with the hashed record (a changed column).
    ColumnMismatch,
    /// The row's `prev_hash` is not the previous row's hash.
    ChainBroken,
    /// Sequence numbers are missing (deleted rows).
    Gap,
    /// A row is out of order (moved or swapped rows).
    Reordered,
    /// The stored record is not a record.
    InvalidRecord,
    /// A checkpoint's signature does not verify.
    BadSignature,
    /// A checkpoint is signed by a key other than the one given.
    UnknownKey,
    /// A checkpoint names a row that is missing or has another hash.
    CheckpointMismatch,
}

impl ProblemKind {
    fn is_checkpoint(self) -> bool {
        matches!(
            self,
            ProblemKind::BadSignature | ProblemKind::UnknownKey | ProblemKind::CheckpointMismatch
        )
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::HashMismatch => "hash mismatch",
            ProblemKind::ColumnMismatch => "column mismatch",
            ProblemKind::ChainBroken => "chain broken",
            ProblemKind::Gap => "gap",
            ProblemKind::Reordered => "reordered",
            ProblemKind::InvalidRecord => "invalid record",
            ProblemKind::BadSignature => "bad signature",
            ProblemKind::UnknownKey => "unknown key",
            ProblemKind::CheckpointMismatch => "checkpoint mismatch",
        })
    }
}

/// Column names of [`RECORD_COLUMNS`], for messages.
fn column_names() -> Vec<&'static str> {
    RECORD_COLUMNS.split(',').map(str::trim).collect()
}

/// Where a tenant's chain stands during the scan.
struct Tail {
    seq: u64,
    hash: [u8; 32],
    signed_seq: u64,
}

/// Verifies the trail at `path`. With `public_key` (hex, see
/// [`super::key::read_public_key`]) every checkpoint must be signed by that key; without it,
/// signatures are checked against the keys the trail itself names.
pub fn verify(path: &Path, public_key: Option<&str>) -> Result<Report, AuditError> {
    let mut conn = store::open_reader(path)?;
    let err = |e: rusqlite::Error| AuditError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    };
    // One read transaction: rows and checkpoints from the same moment.
    let tx = conn.transaction().map_err(err)?;
    let mut report = Report {
        rows: 0,
        tenants: 0,
        checkpoints: 0,
        notes: Vec::new(),
        problem: None,
    };
    let mut tails: HashMap<String, Tail> = HashMap::new();
    let names = column_names();
    {
        let mut exists = tx
            .prepare("SELECT 1 FROM records WHERE tenant = ?1 AND seq = ?2")
            .map_err(err)?;
        let mut stmt = tx
            .prepare(&format!(
                "SELECT id, tenant, seq, prev_hash, hash, record, {RECORD_COLUMNS} FROM records \
                 ORDER BY id"
            ))
            .map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(row) = rows.next().map_err(err)? {
            let id: i64 = row.get(0).map_err(err)?;
            let tenant: String = row.get(1).map_err(err)?;
            let seq_raw: i64 = row.get(2).map_err(err)?;
            let prev_hash: String = row.get(3).map_err(err)?;
            let hash: String = row.get(4).map_err(err)?;
            let bytes: Vec<u8> = row.get(5).map_err(err)?;
            let mut columns = Vec::with_capacity(RECORD_COLUMN_COUNT);
            for i in 0..RECORD_COLUMN_COUNT {
                columns.push(row.get::<_, Value>(6 + i).map_err(err)?);
            }
            let seq = u64::try_from(seq_raw).unwrap_or(0);
            let tail = tails.entry(tenant.clone()).or_insert(Tail {
                seq: 0,
                hash: GENESIS,
                signed_seq: 0,
            });
            let problem = |kind, detail: String| Problem {
                tenant: tenant.clone(),
                seq,
                id,
                kind,
                detail,
            };
            let expected = tail.seq + 1;
            if seq != expected {
                let kind_detail = if seq > expected {
                    let later = exists
                        .exists(rusqlite::params![tenant, expected as i64])
                        .map_err(err)?;
                    if later {
                        (
                            ProblemKind::Reordered,
                            format!("stored before seq {expected}"),
                        )
                    } else if seq == expected + 1 {
                        (ProblemKind::Gap, format!("seq {expected} is missing"))
                    } else {
                        (
                            ProblemKind::Gap,
                            format!("seqs {expected} to {} are missing", seq - 1),
                        )
                    }
                } else {
                    (
                        ProblemKind::Reordered,
                        format!("stored after seq {}", tail.seq),
                    )
                };
                report.problem = Some(problem(kind_detail.0, kind_detail.1));
                break;
            }
            if chain::parse_hash(&prev_hash) != Some(tail.hash) {
                let detail = if seq == 1 {
                    "the first row's previous hash is not the genesis hash".to_owned()
                } else {
                    format!("its previous hash is not the hash of seq {}", seq - 1)
                };
                report.problem = Some(problem(ProblemKind::ChainBroken, detail));
                break;
            }
            let computed = chain::row_hash(&tail.hash, seq, &bytes);
            if chain::parse_hash(&hash) != Some(computed) {
                report.problem = Some(problem(
                    ProblemKind::HashMismatch,
                    "the stored record does not match the row's hash".into(),
                ));
                break;
            }
            let record: Record = match serde_json::from_slice(&bytes) {
                Ok(record) => record,
                Err(e) => {
                    report.problem = Some(problem(ProblemKind::InvalidRecord, e.to_string()));
                    break;
                }
            };
            if record.tenant != tenant {
                report.problem = Some(problem(
                    ProblemKind::ColumnMismatch,
                    format!(
                        "column tenant says {tenant:?}, the record {:?}",
                        record.tenant
                    ),
                ));
                break;
            }
            let expected_columns = record_columns(&record);
            if let Some(i) = (0..RECORD_COLUMN_COUNT).find(|&i| columns[i] != expected_columns[i]) {
                report.problem = Some(problem(
                    ProblemKind::ColumnMismatch,
                    format!(
                        "column {} is {:?}, the hashed record says {:?}",
                        names.get(i).copied().unwrap_or("?"),
                        columns[i],
                        expected_columns[i]
                    ),
                ));
                break;
            }
            tail.seq = seq;
            tail.hash = computed;
            report.rows += 1;
        }
    }
    report.tenants = tails.len() as u64;
    if report.problem.is_some() {
        return Ok(report);
    }
    {
        let mut row_hash = tx
            .prepare("SELECT hash FROM records WHERE tenant = ?1 AND seq = ?2")
            .map_err(err)?;
        let mut stmt = tx
            .prepare(
                "SELECT id, time_ms, tenant, seq, hash, public_key, signature FROM checkpoints \
                 ORDER BY id",
            )
            .map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(row) = rows.next().map_err(err)? {
            let id: i64 = row.get(0).map_err(err)?;
            let time_ms: i64 = row.get(1).map_err(err)?;
            let tenant: String = row.get(2).map_err(err)?;
            let seq_raw: i64 = row.get(3).map_err(err)?;
            let hash: String = row.get(4).map_err(err)?;
            let key: String = row.get(5).map_err(err)?;
            let signature: String = row.get(6).map_err(err)?;
            let seq = u64::try_from(seq_raw).unwrap_or(0);
            let problem = |kind, detail: String| Problem {
                tenant: tenant.clone(),
                seq,
                id,
                kind,
                detail,
            };
            if let Some(trusted) = public_key
                && !key.eq_ignore_ascii_case(trusted)
            {
                report.problem = Some(problem(
                    ProblemKind::UnknownKey,
                    format!("signed by key {key}, not the given public key"),
                ));
                break;
            }
            let message =
                chain::checkpoint_message(&tenant, seq, &hash, u64::try_from(time_ms).unwrap_or(0));
            if !super::key::verify(&key, &message, &signature) {
                report.problem = Some(problem(
                    ProblemKind::BadSignature,
                    "the signature does not verify".into(),
                ));
                break;
            }
            let stored: Option<String> = row_hash
                .query_row(rusqlite::params![tenant, seq_raw], |r| r.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })
                .map_err(err)?;
            match stored {
                Some(stored) if stored == hash => {}
                Some(_) => {
                    report.problem = Some(problem(
                        ProblemKind::CheckpointMismatch,
                        "the signed hash differs from the row's".into(),
                    ));
                    break;
                }
                None => {
                    report.problem = Some(problem(
                        ProblemKind::CheckpointMismatch,
                        "the signed row is missing (rows cut from the end)".into(),
                    ));
                    break;
                }
            }
            if let Some(tail) = tails.get_mut(&tenant) {
                tail.signed_seq = tail.signed_seq.max(seq);
            }
            report.checkpoints += 1;
        }
    }
    let mut unsigned: Vec<_> = tails
        .iter()
        .filter(|(_, t)| t.seq > t.signed_seq)
        .map(|(tenant, t)| {
            format!(
                "tenant {tenant:?}: rows {} to {} are after the last checkpoint (unsigned)",
                t.signed_seq + 1,
                t.seq
            )
        })
        .collect();
    unsigned.sort();
    report.notes.extend(unsigned);
    if public_key.is_none() && report.checkpoints > 0 {
        report.notes.push(
            "signatures were checked with the keys the trail names; pass --public-key to check \
             them against a key kept elsewhere"
                .into(),
        );
    }
    Ok(report)
}
