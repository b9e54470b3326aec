//! `audit verify`: checks every hash chain, every checkpoint chain and what the checkpoints
//! sign, in one read snapshot (so it works while a relay writes), and reports the first
//! problem. [`check_start`] is the part a relay runs on its own chains before writing.
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
//! - **Off-box copy** (`--checkpoints FILE`): every checkpoint in it must be in the trail,
//!   identical. Without it, a trail rewritten whole with another key, or cut back to an earlier
//!   checkpoint together with everything after, cannot be told from an intact one.
//! - Schema 1 trails (per-tenant checkpoints) are read too: their checkpoints are checked as
//!   they were (signature, and the row they name).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;

use rusqlite::Connection;
use rusqlite::types::Value;

use super::chain::{self, GENESIS};
use super::checkpoint::{Checkpoint, GENESIS_HEX, Kind};
use super::store::{
    self, Head, RECORD_COLUMN_COUNT, RECORD_COLUMNS, StoredCheckpoint, record_columns,
};
use super::{AuditError, Record};

/// Slack on top of one checkpoint interval for rows a crash left unsigned: a row committed in
/// the same writer pass that then signs (a commit waits up to the busy timeout, 5 s, plus
/// fsync) can carry a receive time a little past the interval.
pub const CRASH_GRACE_MS: u64 = 10_000;

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
    fn is_checkpoint(self) -> bool {
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

/// Column names of [`RECORD_COLUMNS`], for messages.
fn column_names() -> Vec<&'static str> {
    RECORD_COLUMNS.split(',').map(str::trim).collect()
}

/// A column value as a person reads it.
fn show(value: &Value) -> String {
    match value {
        Value::Null => "NULL".into(),
        Value::Integer(n) => n.to_string(),
        Value::Real(x) => x.to_string(),
        Value::Text(text) => format!("{text:?}"),
        Value::Blob(bytes) => format!("a blob of {} bytes", bytes.len()),
    }
}

/// A time for messages (RFC 3339).
fn when(ms: u64) -> String {
    super::query::format_time(ms)
}

/// Where a chain stands during the scan.
struct Tail {
    seq: u64,
    hash: [u8; 32],
}

/// The unsigned-rows test over rows fed in insertion order: a row more than one interval (plus
/// [`CRASH_GRACE_MS`]) after the later of `since` (the last checkpoint's time) and the earliest
/// unsigned row before it could not have stayed unsigned on a running relay.
struct TailClock {
    since: Option<u64>,
    interval_ms: u64,
    earliest: Option<u64>,
    rows: u64,
    /// The first offending row: id, tenant, seq, time, and the time it is measured from.
    violation: Option<(i64, String, u64, u64, u64)>,
}

impl TailClock {
    fn new(since: Option<u64>, interval_ms: u64) -> Self {
        Self {
            since,
            interval_ms,
            earliest: None,
            rows: 0,
            violation: None,
        }
    }

    fn feed(&mut self, id: i64, tenant: &str, seq: u64, time_ms: u64) {
        self.rows += 1;
        if self.violation.is_none()
            && let Some(earliest) = self.earliest
        {
            let from = self.since.map_or(earliest, |since| since.max(earliest));
            if time_ms > from.saturating_add(self.interval_ms.saturating_add(CRASH_GRACE_MS)) {
                self.violation = Some((id, tenant.to_owned(), seq, time_ms, from));
            }
        }
        self.earliest = Some(self.earliest.map_or(time_ms, |e| e.min(time_ms)));
    }

    /// The failure text, if a row broke the test.
    fn failure(&self, what: &str) -> Option<(i64, String, u64, String)> {
        let (id, tenant, seq, time, from) = self.violation.clone()?;
        Some((
            id,
            tenant,
            seq,
            format!(
                "{what}: this row (time {}) is more than one checkpoint interval ({} s) after {} \
                 and still unsigned, which a running relay never leaves: checkpoints (and rows) \
                 were deleted",
                when(time),
                self.interval_ms / 1000,
                when(from)
            ),
        ))
    }
}

/// What the scan keeps of a relay's checkpoints (not all of them: a year of one-minute
/// checkpoints is half a million): the last, and each epoch checkpoint with the one before it
/// (in number order), with row ids. The heads of all of these are checked against the rows.
struct RelayCheckpoints {
    last: (i64, Checkpoint),
    epochs: Vec<(i64, Checkpoint)>,
}

impl RelayCheckpoints {
    fn last(&self) -> Option<&(i64, Checkpoint)> {
        Some(&self.last)
    }
}

/// An epoch checkpoint and what the rows it newly signed are measured against.
struct EpochSegment {
    relay: String,
    /// The epoch checkpoint's number.
    n: u64,
    /// Per tenant: the rows after `from` up to `to` were first signed by the epoch checkpoint.
    ranges: HashMap<String, (u64, u64)>,
    clock: TailClock,
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
    let err = |e: rusqlite::Error| AuditError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let v1 = store::schema_version(&conn, path)?.as_deref() == Some(store::SCHEMA_V1);
    // One read transaction: rows and checkpoints from the same moment.
    let tx = conn.transaction().map_err(err)?;
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
    let mut relays: BTreeMap<String, RelayCheckpoints> = BTreeMap::new();
    let mut segments: Vec<EpochSegment> = Vec::new();
    if !v1 {
        let mut stmt = tx
            .prepare(&format!(
                "SELECT {} FROM checkpoints ORDER BY relay, n, id",
                store::CHECKPOINT_COLUMNS
            ))
            .map_err(err)?;
        let stored = stmt.query_map([], store::read_checkpoint).map_err(err)?;
        if let Some(problem) =
            check_checkpoints(stored, &keys, &mut relays, &mut segments, &mut report)
                .map_err(err)?
        {
            report.problem = Some(problem);
            return Ok(report);
        }
    }

    // Rows, in insertion order.
    let mut tails: HashMap<(String, String), Tail> = HashMap::new();
    let mut clocks: HashMap<String, TailClock> = relays
        .iter()
        .filter_map(|(relay, cps)| {
            let (_, last) = cps.last()?;
            Some((
                relay.clone(),
                TailClock::new(Some(last.time_ms), last.interval_ms),
            ))
        })
        .collect();
    let mut relay_rows: BTreeMap<String, u64> = BTreeMap::new();
    {
        let names = column_names();
        let relay_column = if v1 { "'' AS relay" } else { "relay" };
        let mut exists = tx
            .prepare(if v1 {
                "SELECT 1 FROM records WHERE ?1 = '' AND tenant = ?2 AND seq = ?3"
            } else {
                "SELECT 1 FROM records WHERE relay = ?1 AND tenant = ?2 AND seq = ?3"
            })
            .map_err(err)?;
        let mut stmt = tx
            .prepare(&format!(
                "SELECT id, {relay_column}, tenant, seq, prev_hash, hash, record, {RECORD_COLUMNS} \
                 FROM records ORDER BY id"
            ))
            .map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        while let Some(row) = rows.next().map_err(err)? {
            let id: i64 = row.get(0).map_err(err)?;
            let relay: String = row.get(1).map_err(err)?;
            let tenant: String = row.get(2).map_err(err)?;
            let seq_raw: i64 = row.get(3).map_err(err)?;
            let prev_hash: String = row.get(4).map_err(err)?;
            let hash: String = row.get(5).map_err(err)?;
            let bytes: Vec<u8> = row.get(6).map_err(err)?;
            let mut columns = Vec::with_capacity(RECORD_COLUMN_COUNT);
            for i in 0..RECORD_COLUMN_COUNT {
                columns.push(row.get::<_, Value>(7 + i).map_err(err)?);
            }
            let seq = u64::try_from(seq_raw).unwrap_or(0);
            let problem = |kind, detail: String| Problem {
                relay: relay.clone(),
                checkpoint: None,
                tenant: Some(tenant.clone()),
                seq: Some(seq),
                id,
                kind,
                detail,
            };
            let tail = tails
                .entry((relay.clone(), tenant.clone()))
                .or_insert(Tail {
                    seq: 0,
                    hash: GENESIS,
                });
            let expected = tail.seq + 1;
            if seq != expected {
                let (kind, detail) = if seq > expected {
                    let later = exists
                        .exists(rusqlite::params![relay, tenant, expected as i64])
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
                report.problem = Some(problem(kind, detail));
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
                        "column {} is {}, the hashed record says {}",
                        names.get(i).copied().unwrap_or("?"),
                        show(&columns[i]),
                        show(&expected_columns[i])
                    ),
                ));
                break;
            }
            tail.seq = seq;
            tail.hash = computed;
            report.rows += 1;
            *relay_rows.entry(relay.clone()).or_default() += 1;
            // Unsigned after the relay's last checkpoint?
            if let Some((_, last)) = relays.get(&relay).and_then(RelayCheckpoints::last) {
                let signed = last.head(&tenant).map_or(0, |h| h.seq);
                if seq > signed
                    && let Some(clock) = clocks.get_mut(&relay)
                {
                    clock.feed(id, &tenant, seq, record.time_ms);
                }
            }
            for segment in segments.iter_mut().filter(|s| s.relay == relay) {
                if let Some(&(from, to)) = segment.ranges.get(&tenant)
                    && seq > from
                    && seq <= to
                {
                    segment.clock.feed(id, &tenant, seq, record.time_ms);
                }
            }
        }
    }
    report.tenants = tails
        .keys()
        .map(|(_, tenant)| tenant.as_str())
        .collect::<HashSet<_>>()
        .len() as u64;
    let mut all_relays: HashSet<&str> = relays.keys().map(String::as_str).collect();
    all_relays.extend(relay_rows.keys().map(String::as_str));
    report.relays = all_relays.len() as u64;
    if report.problem.is_some() {
        return Ok(report);
    }

    // What the last checkpoints (and epoch checkpoints) sign must be there.
    let mut row_hash = tx
        .prepare(if v1 {
            "SELECT hash FROM records WHERE ?1 = '' AND tenant = ?2 AND seq = ?3"
        } else {
            "SELECT hash FROM records WHERE relay = ?1 AND tenant = ?2 AND seq = ?3"
        })
        .map_err(err)?;
    let mut lookup = |relay: &str, tenant: &str, seq: u64| -> Result<Option<String>, AuditError> {
        row_hash
            .query_row(rusqlite::params![relay, tenant, seq as i64], |r| r.get(0))
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(err)
    };
    for (relay, cps) in &relays {
        let last_kept = cps.epochs.last().map(|e| e.1.n) == Some(cps.last.1.n);
        let signing = cps.epochs.iter().chain((!last_kept).then_some(&cps.last));
        for (id, cp) in signing {
            for head in &cp.heads {
                let problem = |kind, detail: String| Problem {
                    relay: relay.clone(),
                    checkpoint: Some(cp.n),
                    tenant: Some(head.tenant.clone()),
                    seq: Some(head.seq),
                    id: *id,
                    kind,
                    detail,
                };
                let found = match tails.get(&(relay.clone(), head.tenant.clone())) {
                    None => Some(problem(
                        ProblemKind::TenantVanished,
                        format!(
                            "the checkpoint signs {} rows of this tenant and none is left (its \
                             rows were deleted)",
                            head.seq
                        ),
                    )),
                    Some(tail) if tail.seq < head.seq => Some(problem(
                        ProblemKind::CheckpointMismatch,
                        format!(
                            "the signed row is missing (rows cut from the end: the chain ends at \
                             seq {})",
                            tail.seq
                        ),
                    )),
                    Some(_) => match lookup(relay, &head.tenant, head.seq)? {
                        Some(stored) if stored.eq_ignore_ascii_case(&head.hash) => None,
                        _ => Some(problem(
                            ProblemKind::CheckpointMismatch,
                            "the signed hash differs from the row's (the chain was rewritten)"
                                .into(),
                        )),
                    },
                };
                if let Some(problem) = found {
                    report.problem = Some(problem);
                    return Ok(report);
                }
            }
        }
    }

    // Rows that stayed unsigned: a crash tail, or deleted checkpoints.
    for segment in &segments {
        if let Some((id, tenant, seq, detail)) = segment.clock.failure(&format!(
            "rows first signed by epoch checkpoint {} had no earlier checkpoint",
            segment.n
        )) {
            report.problem = Some(Problem {
                relay: segment.relay.clone(),
                checkpoint: Some(segment.n),
                tenant: Some(tenant),
                seq: Some(seq),
                id,
                kind: ProblemKind::UnsignedTail,
                detail,
            });
            return Ok(report);
        }
    }
    for (relay, clock) in &clocks {
        let Some((_, last)) = relays.get(relay).and_then(RelayCheckpoints::last) else {
            continue;
        };
        if let Some((id, tenant, seq, detail)) = clock.failure(&format!(
            "after the relay's last checkpoint {} ({})",
            last.n,
            when(last.time_ms)
        )) {
            report.problem = Some(Problem {
                relay: relay.clone(),
                checkpoint: None,
                tenant: Some(tenant),
                seq: Some(seq),
                id,
                kind: ProblemKind::UnsignedTail,
                detail,
            });
            return Ok(report);
        }
        if clock.rows > 0 {
            report.warnings.push(format!(
                "relay {relay:?}: {} rows after its last checkpoint {} ({}) are unsigned: a \
                 crash tail (shorter than one checkpoint interval) or a relay still writing; a \
                 running relay signs them within {} s",
                clock.rows,
                last.n,
                when(last.time_ms),
                last.interval_ms / 1000
            ));
        }
    }

    // Relays with rows but none of their own checkpoints: schema 1 rows, or deleted ones.
    let legacy = legacy_checkpoints(&tx, v1, &keys, &mut report, &mut lookup)?;
    if report.problem.is_some() {
        return Ok(report);
    }
    for (relay, count) in &relay_rows {
        if relays.contains_key(relay) {
            continue;
        }
        if let Some(signed) = legacy.get(relay) {
            report.notes.push(format!(
                "relay {relay:?}: {count} rows of a schema 1 trail, signed by per-tenant \
                 checkpoints only (they cannot show a deleted tail or tenant); a relay of this \
                 version migrates the trail and chains its checkpoints"
            ));
            let mut unsigned: Vec<String> = tails
                .iter()
                .filter(|((r, _), _)| r == relay)
                .filter_map(|((_, tenant), t)| {
                    let signed = signed.get(tenant).copied().unwrap_or(0);
                    (t.seq > signed).then(|| {
                        format!(
                            "relay {relay:?} tenant {tenant:?}: rows {} to {} are after the last \
                             checkpoint (unsigned)",
                            signed + 1,
                            t.seq
                        )
                    })
                })
                .collect();
            unsigned.sort();
            report.warnings.extend(unsigned);
            continue;
        }
        report.problem = Some(Problem {
            relay: relay.clone(),
            checkpoint: None,
            tenant: None,
            seq: None,
            id: 0,
            kind: ProblemKind::NoCheckpoint,
            detail: format!(
                "{count} rows of this relay and not one checkpoint of it (a relay signs one \
                 before its first row): its checkpoints were deleted"
            ),
        });
        return Ok(report);
    }

    if let Some(copy) = offbox
        && let Some(problem) = check_offbox(copy, &keys, &tx, &mut report).map_err(err)?
    {
        report.problem = Some(problem);
        return Ok(report);
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

/// Checks each relay's checkpoint chain (numbering, links, signatures, keys, heads never
/// going back), filling `relays` and the epoch segments; returns the first problem.
fn check_checkpoints(
    stored: impl Iterator<Item = rusqlite::Result<StoredCheckpoint>>,
    keys: &[String],
    relays: &mut BTreeMap<String, RelayCheckpoints>,
    segments: &mut Vec<EpochSegment>,
    report: &mut Report,
) -> rusqlite::Result<Option<Problem>> {
    let mut crashes: BTreeMap<String, u64> = BTreeMap::new();
    for sc in stored {
        let sc = sc?;
        let problem = |kind, detail: String| Problem {
            relay: sc.relay.clone(),
            checkpoint: Some(sc.n),
            tenant: None,
            seq: None,
            id: sc.id,
            kind,
            detail,
        };
        let cp = match sc.checkpoint {
            Ok(cp) => cp,
            Err(e) => return Ok(Some(problem(ProblemKind::InvalidCheckpoint, e))),
        };
        if !keys.is_empty() && !keys.contains(&cp.public_key.to_ascii_lowercase()) {
            return Ok(Some(problem(
                ProblemKind::UnknownKey,
                format!(
                    "signed by key {}, not the given public key{}",
                    cp.public_key,
                    if keys.len() > 1 { "s" } else { "" }
                ),
            )));
        }
        if !cp.signature_valid() {
            return Ok(Some(problem(
                ProblemKind::BadSignature,
                "the signature does not verify".into(),
            )));
        }
        if !sc.stored_hash.eq_ignore_ascii_case(&cp.hash()) {
            return Ok(Some(problem(
                ProblemKind::CheckpointMismatch,
                "the hash column is not the hash of the signed checkpoint".into(),
            )));
        }
        let previous = relays.get(&cp.relay).map(|c| &c.last.1);
        let expected = previous.map_or(1, |p| p.n.saturating_add(1));
        if cp.n < expected {
            return Ok(Some(problem(
                ProblemKind::CheckpointChainBroken,
                format!("expected checkpoint {expected} here: numbers repeat or run backwards"),
            )));
        }
        if cp.n != expected {
            let missing = if cp.n == expected + 1 {
                format!("checkpoint {expected} is missing")
            } else {
                format!("checkpoints {expected} to {} are missing", cp.n - 1)
            };
            return Ok(Some(problem(
                ProblemKind::CheckpointGap,
                format!("{missing} (deleted checkpoints)"),
            )));
        }
        let expected_prev = previous.map_or_else(|| GENESIS_HEX.to_owned(), Checkpoint::hash);
        if !cp.prev.eq_ignore_ascii_case(&expected_prev) {
            return Ok(Some(problem(
                ProblemKind::CheckpointChainBroken,
                format!(
                    "it does not follow checkpoint {} (its previous hash is not that one's)",
                    cp.n.saturating_sub(1)
                ),
            )));
        }
        if let Some(previous) = previous {
            for head in &previous.heads {
                match cp.head(&head.tenant) {
                    Some(now) if now.seq >= head.seq => {}
                    _ => {
                        return Ok(Some(Problem {
                            tenant: Some(head.tenant.clone()),
                            ..problem(
                                ProblemKind::CheckpointMismatch,
                                format!(
                                    "the tenant's head went back from seq {} of checkpoint {}",
                                    head.seq, previous.n
                                ),
                            )
                        }));
                    }
                }
            }
            if matches!(cp.kind, Kind::Start | Kind::Epoch) && previous.kind != Kind::Close {
                *crashes.entry(cp.relay.clone()).or_default() += 1;
            }
        }
        match cp.kind {
            Kind::Epoch => {
                report.warnings.push(format!(
                    "relay {:?} began epoch {} at checkpoint {} ({}) because the trail did not \
                     verify: {}",
                    cp.relay,
                    cp.epoch,
                    cp.n,
                    when(cp.time_ms),
                    cp.note
                ));
                let ranges = cp
                    .heads
                    .iter()
                    .map(|h| {
                        let from = previous
                            .and_then(|p| p.head(&h.tenant))
                            .map_or(0, |p| p.seq);
                        (h.tenant.clone(), (from, h.seq))
                    })
                    .collect();
                segments.push(EpochSegment {
                    relay: cp.relay.clone(),
                    n: cp.n,
                    ranges,
                    clock: TailClock::new(
                        previous.map(|p| p.time_ms),
                        previous.map_or(cp.interval_ms, |p| p.interval_ms),
                    ),
                });
            }
            Kind::Start if !cp.note.is_empty() => report.notes.push(format!(
                "relay {:?} checkpoint {} ({}): {}",
                cp.relay,
                cp.n,
                when(cp.time_ms),
                cp.note
            )),
            _ => {}
        }
        report.checkpoints += 1;
        match relays.get_mut(&cp.relay) {
            Some(chain) => {
                if cp.kind == Kind::Epoch {
                    // The state the relay found and did not vouch for: what it signed must
                    // still be there, or the epoch would launder a rewrite.
                    if chain.epochs.last().map(|e| e.1.n) != Some(chain.last.1.n) {
                        chain.epochs.push(chain.last.clone());
                    }
                    chain.epochs.push((sc.id, cp.clone()));
                }
                chain.last = (sc.id, cp);
            }
            None => {
                let epochs = if cp.kind == Kind::Epoch {
                    vec![(sc.id, cp.clone())]
                } else {
                    Vec::new()
                };
                relays.insert(
                    cp.relay.clone(),
                    RelayCheckpoints {
                        last: (sc.id, cp),
                        epochs,
                    },
                );
            }
        }
    }
    for (relay, count) in crashes {
        report.notes.push(format!(
            "relay {relay:?}: {count} runs ended without a close checkpoint (a crash or kill; \
             their unsigned rows were signed by the next start)"
        ));
    }
    Ok(None)
}

/// Finds the hash of row (relay, tenant, seq), if it exists.
type RowLookup<'a> = dyn FnMut(&str, &str, u64) -> Result<Option<String>, AuditError> + 'a;

/// Checks schema 1 checkpoints (per tenant: signature, and the row they name); returns per
/// relay, per tenant, the highest seq they sign.
fn legacy_checkpoints(
    tx: &Connection,
    v1: bool,
    keys: &[String],
    report: &mut Report,
    lookup: &mut RowLookup<'_>,
) -> Result<HashMap<String, HashMap<String, u64>>, AuditError> {
    let err = |e: rusqlite::Error| AuditError::Database {
        path: Default::default(),
        message: e.to_string(),
    };
    let sql = if v1 {
        "SELECT id, time_ms, '' AS relay, tenant, seq, hash, public_key, signature FROM \
         checkpoints ORDER BY id"
    } else {
        "SELECT id, time_ms, relay, tenant, seq, hash, public_key, signature FROM \
         legacy_checkpoints ORDER BY id"
    };
    let mut signed: HashMap<String, HashMap<String, u64>> = HashMap::new();
    let mut stmt = tx.prepare(sql).map_err(err)?;
    let mut rows = stmt.query([]).map_err(err)?;
    while let Some(row) = rows.next().map_err(err)? {
        let id: i64 = row.get(0).map_err(err)?;
        let time_ms: i64 = row.get(1).map_err(err)?;
        let relay: String = row.get(2).map_err(err)?;
        let tenant: String = row.get(3).map_err(err)?;
        let seq = u64::try_from(row.get::<_, i64>(4).map_err(err)?).unwrap_or(0);
        let hash: String = row.get(5).map_err(err)?;
        let key: String = row.get(6).map_err(err)?;
        let signature: String = row.get(7).map_err(err)?;
        let problem = |kind, detail: String| Problem {
            relay: relay.clone(),
            checkpoint: None,
            tenant: Some(tenant.clone()),
            seq: Some(seq),
            id,
            kind,
            detail: format!("schema 1 checkpoint: {detail}"),
        };
        if !keys.is_empty() && !keys.contains(&key.to_ascii_lowercase()) {
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
        match lookup(&relay, &tenant, seq)? {
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
        let top = signed.entry(relay).or_default().entry(tenant).or_default();
        *top = (*top).max(seq);
        report.checkpoints += 1;
    }
    Ok(signed)
}

/// Checks the trail against the off-box copy: each checkpoint there must verify and be in the
/// trail, identical.
fn check_offbox(
    copy: &[Checkpoint],
    keys: &[String],
    conn: &Connection,
    report: &mut Report,
) -> rusqlite::Result<Option<Problem>> {
    let mut matched = 0u64;
    for (line, cp) in copy.iter().enumerate() {
        let problem = |detail: String| Problem {
            relay: cp.relay.clone(),
            checkpoint: Some(cp.n),
            tenant: None,
            seq: None,
            id: 0,
            kind: ProblemKind::OffBoxMismatch,
            detail,
        };
        let line = line + 1;
        if !cp.signature_valid()
            || (!keys.is_empty() && !keys.contains(&cp.public_key.to_ascii_lowercase()))
        {
            return Ok(Some(problem(format!(
                "line {line} of the copy is not signed by {}",
                if keys.is_empty() {
                    "the key it names"
                } else {
                    "a given public key"
                }
            ))));
        }
        // Every stored checkpoint's hash column was checked against what it signs.
        let in_trail: Option<(String, String)> = conn
            .query_row(
                "SELECT hash, public_key FROM checkpoints WHERE relay = ?1 AND n = ?2",
                rusqlite::params![cp.relay, i64::try_from(cp.n).unwrap_or(i64::MAX)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        match in_trail {
            None => {
                return Ok(Some(problem(format!(
                    "line {line} of the copy is not in the trail (the trail was cut back or \
                     replaced)"
                ))));
            }
            Some((hash, key)) if !hash.eq_ignore_ascii_case(&cp.hash()) => {
                return Ok(Some(problem(format!(
                    "line {line} of the copy differs from the trail's checkpoint (the trail was \
                     rewritten{})",
                    if !key.eq_ignore_ascii_case(&cp.public_key) {
                        ", with another key"
                    } else {
                        ""
                    }
                ))));
            }
            Some(_) => matched += 1,
        }
    }
    report
        .notes
        .push(format!("{matched} checkpoints match the off-box copy"));
    Ok(None)
}

/// Reads an off-box copy: one checkpoint JSON object a line (blank lines skipped).
pub fn read_offbox(text: &str) -> Result<Vec<Checkpoint>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("line {}: not a checkpoint: {e}", i + 1))
        })
        .collect()
}

/// What a relay checks before writing to a trail (its own chains only): its last checkpoint
/// is signed by its own key, numbered and linked after the one before; every head it names is
/// there, unchanged; the rows after it chain on from those heads and are a crash tail by the
/// unsigned-rows test; and rows of the relay with no checkpoint at all are only schema 1 rows
/// whose last per-tenant checkpoints verify. `Ok(Err(why))` when the trail does not verify.
pub fn check_start(
    conn: &Connection,
    relay: &str,
    own_key: &str,
    heads: &HashMap<String, Head>,
    last: Option<&StoredCheckpoint>,
) -> rusqlite::Result<Result<(), String>> {
    let rows: u64 = heads.values().map(|h| h.seq).sum();
    let Some(stored) = last else {
        if heads.is_empty() {
            return Ok(Ok(()));
        }
        return check_legacy_start(conn, relay, own_key, heads, rows);
    };
    let n = stored.n;
    let cp = match &stored.checkpoint {
        Ok(cp) => cp,
        Err(e) => return Ok(Err(format!("its last checkpoint ({n}) is unreadable: {e}"))),
    };
    if !cp.public_key.eq_ignore_ascii_case(own_key) {
        return Ok(Err(format!(
            "its last checkpoint ({n}) is signed by key {}, not this relay's checkpoint key {own_key}",
            cp.public_key
        )));
    }
    if !cp.signature_valid() || !stored.stored_hash.eq_ignore_ascii_case(&cp.hash()) {
        return Ok(Err(format!(
            "the signature of its last checkpoint ({n}) does not verify"
        )));
    }
    let count: i64 = conn.query_row(
        "SELECT COUNT(*) FROM checkpoints WHERE relay = ?1",
        [relay],
        |r| r.get(0),
    )?;
    if u64::try_from(count).unwrap_or(0) != n {
        return Ok(Err(format!(
            "relay {relay:?} has {count} checkpoints but the last is number {n}: checkpoints \
             were deleted"
        )));
    }
    if n > 1 {
        let prev: Option<String> = conn
            .query_row(
                "SELECT hash FROM checkpoints WHERE relay = ?1 AND n = ?2",
                rusqlite::params![relay, (n - 1) as i64],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        if !prev.is_some_and(|p| p.eq_ignore_ascii_case(&cp.prev)) {
            return Ok(Err(format!(
                "its last checkpoint ({n}) does not follow checkpoint {}",
                n - 1
            )));
        }
    }
    for head in &cp.heads {
        let Some(now) = heads.get(&head.tenant) else {
            return Ok(Err(format!(
                "tenant {:?}, signed up to seq {} by the last checkpoint ({n}), has no rows \
                 left: its rows were deleted",
                head.tenant, head.seq
            )));
        };
        if now.seq < head.seq {
            return Ok(Err(format!(
                "tenant {:?}: the last checkpoint ({n}) signs seq {} but the chain ends at seq \
                 {}: rows were cut",
                head.tenant, head.seq, now.seq
            )));
        }
        let hash: Option<String> = row_hash(conn, relay, &head.tenant, head.seq)?;
        if !hash.is_some_and(|h| h.eq_ignore_ascii_case(&head.hash)) {
            return Ok(Err(format!(
                "tenant {:?} seq {}: the row differs from what the last checkpoint ({n}) signs: \
                 the chain was rewritten",
                head.tenant, head.seq
            )));
        }
    }
    // The unsigned tail: chained on from the signed heads, and a crash tail by its times. Both
    // passes stream (a forged file may hold any number of rows).
    let mut clock = TailClock::new(Some(cp.time_ms), cp.interval_ms);
    let mut first_unsigned: Option<i64> = None;
    let mut stmt = conn.prepare_cached(
        "SELECT id, seq, prev_hash, hash, record FROM records WHERE relay = ?1 AND tenant = ?2 \
         AND seq > ?3 ORDER BY seq",
    )?;
    for tenant in heads.keys() {
        let (mut seq, mut hash) = cp
            .head(tenant)
            .and_then(|h| Some((h.seq, chain::parse_hash(&h.hash)?)))
            .unwrap_or((0, GENESIS));
        let mut rows = stmt.query(rusqlite::params![relay, tenant, seq as i64])?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let row_seq = u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0);
            let prev: String = row.get(2)?;
            let stored: String = row.get(3)?;
            let bytes: Vec<u8> = row.get(4)?;
            let computed = chain::row_hash(&hash, row_seq, &bytes);
            if row_seq != seq + 1
                || chain::parse_hash(&prev) != Some(hash)
                || chain::parse_hash(&stored) != Some(computed)
            {
                return Ok(Err(format!(
                    "tenant {tenant:?} seq {row_seq} (row id {id}), after the last checkpoint \
                     ({n}), does not chain on from it"
                )));
            }
            first_unsigned = Some(first_unsigned.map_or(id, |f| f.min(id)));
            seq = row_seq;
            hash = computed;
        }
    }
    if let Some(first) = first_unsigned {
        let mut stmt = conn.prepare_cached(
            "SELECT id, tenant, seq, record FROM records WHERE relay = ?1 AND id >= ?2 ORDER BY id",
        )?;
        let mut rows = stmt.query(rusqlite::params![relay, first])?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let tenant: String = row.get(1)?;
            let seq = u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0);
            if seq <= cp.head(&tenant).map_or(0, |h| h.seq) {
                continue;
            }
            let bytes: Vec<u8> = row.get(3)?;
            let time_ms = serde_json::from_slice::<Record>(&bytes).map_or(0, |r| r.time_ms);
            clock.feed(id, &tenant, seq, time_ms);
        }
    }
    if let Some((id, tenant, seq, detail)) = clock.failure(&format!(
        "after its last checkpoint ({n}, {})",
        when(cp.time_ms)
    )) {
        return Ok(Err(format!(
            "tenant {tenant:?} seq {seq} (row id {id}): {detail}"
        )));
    }
    if clock.rows > 0 {
        tracing::warn!(
            relay,
            rows = clock.rows,
            checkpoint = n,
            "audit trail: a crash tail of unsigned rows after the last checkpoint; signing it now"
        );
    }
    Ok(Ok(()))
}

/// [`check_start`] for a relay with rows and no checkpoint of its own: only a migrated schema
/// 1 trail whose last per-tenant checkpoints verify with this relay's key may go on.
fn check_legacy_start(
    conn: &Connection,
    relay: &str,
    own_key: &str,
    heads: &HashMap<String, Head>,
    rows: u64,
) -> rusqlite::Result<Result<(), String>> {
    let mut stmt = conn.prepare(
        "SELECT time_ms, tenant, seq, hash, public_key, signature FROM legacy_checkpoints \
         WHERE relay = ?1 AND id IN (SELECT MAX(id) FROM legacy_checkpoints WHERE relay = ?1 \
         GROUP BY tenant)",
    )?;
    let mut found = 0;
    let mut rows_iter = stmt.query([relay])?;
    while let Some(row) = rows_iter.next()? {
        found += 1;
        let time_ms = u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0);
        let tenant: String = row.get(1)?;
        let seq = u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0);
        let hash: String = row.get(3)?;
        let key: String = row.get(4)?;
        let signature: String = row.get(5)?;
        if !key.eq_ignore_ascii_case(own_key)
            || !super::key::verify(
                &key,
                &chain::checkpoint_message(&tenant, seq, &hash, time_ms),
                &signature,
            )
        {
            return Ok(Err(format!(
                "the last schema 1 checkpoint of tenant {tenant:?} is not signed by this relay's \
                 checkpoint key"
            )));
        }
        if !heads.contains_key(&tenant) {
            return Ok(Err(format!(
                "tenant {tenant:?}, signed by a schema 1 checkpoint, has no rows left"
            )));
        }
        if row_hash(conn, relay, &tenant, seq)?.is_none_or(|h| h != hash) {
            return Ok(Err(format!(
                "tenant {tenant:?} seq {seq}: the row a schema 1 checkpoint signs is missing or \
                 changed"
            )));
        }
    }
    if found == 0 {
        return Ok(Err(format!(
            "{rows} rows of relay {relay:?} and not one checkpoint of it: its checkpoints were \
             deleted"
        )));
    }
    Ok(Ok(()))
}

/// The hash column of row (relay, tenant, seq), if it exists.
fn row_hash(
    conn: &Connection,
    relay: &str,
    tenant: &str,
    seq: u64,
) -> rusqlite::Result<Option<String>> {
    conn.query_row(
        "SELECT hash FROM records WHERE relay = ?1 AND tenant = ?2 AND seq = ?3",
        rusqlite::params![relay, tenant, seq as i64],
        |r| r.get(0),
    )
    .map(Some)
    .or_else(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => Ok(None),
        e => Err(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_within_one_interval_passes_and_a_longer_one_fails() {
        let mut clock = TailClock::new(Some(1_000_000), 60_000);
        // Long calls received before the checkpoint, committed after it.
        clock.feed(1, "acme", 5, 900_000);
        clock.feed(2, "acme", 6, 1_050_000);
        assert!(clock.failure("x").is_none());
        // An idle relay's first row long after the checkpoint is fine on its own...
        let mut idle = TailClock::new(Some(1_000_000), 60_000);
        idle.feed(1, "acme", 5, 5_000_000);
        idle.feed(2, "acme", 6, 5_000_000 + 60_000 + CRASH_GRACE_MS);
        assert!(idle.failure("x").is_none());
        // ...but not a row more than an interval (and the grace) after it.
        idle.feed(3, "globex", 1, 5_000_000 + 60_000 + CRASH_GRACE_MS + 1);
        let (id, tenant, seq, _) = idle.failure("x").expect("a violation");
        assert_eq!((id, tenant.as_str(), seq), (3, "globex", 1));
    }
}
