//! What `verify` hands back: the [`Report`] (counts, notes, warnings) and the first
//! [`Problem`] it found, named by [`ProblemKind`]. Kept apart from the checks so the CLI and
//! the tests read one small type, and every check builds its problem the same way.

use std::fmt;

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Rows checked.
    pub rows: u64,
    /// Tenants seen.
    pub tenants: u64,
    /// Relay instances seen (with rows or checkpoints).
    pub relays: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// Remarks that are not failures (where the key came from, schema 1 rows).
    pub notes: Vec<String>,
    /// Things an auditor must know that are not tampering: crash tails, new epochs.
    pub warnings: Vec<String>,
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
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        match &self.problem {
            None => write!(
                f,
                "ok: {} rows, {} tenants, {} checkpoints of {} relays verified",
                self.rows, self.tenants, self.checkpoints, self.relays
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
    /// The relay instance whose chain is broken (`""` in a schema 1 trail).
    pub relay: String,
    /// The checkpoint concerned, by number, if any.
    pub checkpoint: Option<u64>,
    /// The tenant concerned, if any.
    pub tenant: Option<String>,
    /// The sequence number of the bad row (or the row a bad checkpoint names), if any.
    pub seq: Option<u64>,
    /// The row's (or checkpoint's) id in the file; 0 when there is none (a missing row, a line
    /// of the off-box copy).
    pub id: i64,
    /// What kind of damage.
    pub kind: ProblemKind,
    /// Details.
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "relay {:?}", self.relay)?;
        if let Some(n) = self.checkpoint {
            write!(f, " checkpoint {n}")?;
        }
        if let Some(tenant) = &self.tenant {
            write!(f, " tenant {tenant:?}")?;
        }
        if let Some(seq) = self.seq {
            write!(f, " seq {seq}")?;
        }
        let what = if self.kind.is_checkpoint() {
            "checkpoint"
        } else {
            "row"
        };
        if self.id != 0 {
            write!(f, " ({what} id {})", self.id)?;
        }
        write!(f, ": {}: {}", self.kind, self.detail)
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
    /// A checkpoint is signed by a key other than the ones given.
    UnknownKey,
    /// A checkpoint names a row that is missing or has another hash.
    CheckpointMismatch,
    /// A relay's checkpoint numbers skip (deleted checkpoints).
    CheckpointGap,
    /// A checkpoint does not link to the one before it.
    CheckpointChainBroken,
    /// A checkpoint row is not a checkpoint (unknown kind, heads not JSON).
    InvalidCheckpoint,
    /// A tenant a checkpoint names has no rows left.
    TenantVanished,
    /// Rows stayed unsigned longer than a running relay allows (deleted checkpoints).
    UnsignedTail,
    /// A relay has rows but no checkpoint at all (deleted checkpoints).
    NoCheckpoint,
    /// The trail disagrees with the off-box copy of the checkpoints.
    OffBoxMismatch,
}

impl ProblemKind {
    /// Whether the problem is with a checkpoint (its `id` a checkpoint row's), not a row.
    pub fn is_checkpoint(self) -> bool {
        matches!(
            self,
            ProblemKind::BadSignature
                | ProblemKind::UnknownKey
                | ProblemKind::CheckpointMismatch
                | ProblemKind::CheckpointGap
                | ProblemKind::CheckpointChainBroken
                | ProblemKind::InvalidCheckpoint
                | ProblemKind::TenantVanished
                | ProblemKind::OffBoxMismatch
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
            ProblemKind::CheckpointGap => "checkpoint gap",
            ProblemKind::CheckpointChainBroken => "checkpoint chain broken",
            ProblemKind::InvalidCheckpoint => "invalid checkpoint",
            ProblemKind::TenantVanished => "tenant vanished",
            ProblemKind::UnsignedTail => "unsigned rows past the checkpoint interval",
            ProblemKind::NoCheckpoint => "no checkpoint",
            ProblemKind::OffBoxMismatch => "off-box copy mismatch",
        })
    }
}

impl Problem {
    /// A problem of `relay` naming no checkpoint, tenant or row.
    pub(super) fn relay(relay: &str, kind: ProblemKind, detail: String) -> Problem {
        Problem {
            relay: relay.to_owned(),
            checkpoint: None,
            tenant: None,
            seq: None,
            id: 0,
            kind,
            detail,
        }
    }

    /// A problem with the row `seq` (row id `id`) of the chain (`relay`, `tenant`).
    pub(super) fn row(
        relay: &str,
        tenant: &str,
        seq: u64,
        id: i64,
        kind: ProblemKind,
        detail: String,
    ) -> Problem {
        Problem {
            tenant: Some(tenant.to_owned()),
            seq: Some(seq),
            id,
            ..Problem::relay(relay, kind, detail)
        }
    }

    /// A problem with checkpoint `n` (row id `id`) of `relay`, no tenant or row named.
    pub(super) fn checkpoint(
        relay: &str,
        n: u64,
        id: i64,
        kind: ProblemKind,
        detail: String,
    ) -> Problem {
        Problem {
            checkpoint: Some(n),
            id,
            ..Problem::relay(relay, kind, detail)
        }
    }
}
