//! The walk over the rows, in insertion order: each (relay, tenant) chain runs 1, 2, 3, ...
//! with no gap and nothing out of order, each row's `prev_hash` is the hash of the row before,
//! its hash is the hash of its stored record bytes, and its columns say what those bytes say.
//! On the way it feeds the unsigned-rows clocks with the rows no checkpoint signs yet.
//!
//! One pass over a table that may hold millions of rows: it streams, and keeps only where each
//! chain stands ([`Tail`]).

use std::collections::{BTreeMap, HashMap};

use rusqlite::types::Value;
use rusqlite::{Connection, Statement};

use super::checkpoints::Signed;
use super::clock::TailClock;
use super::report::{Problem, ProblemKind, Report};
use crate::govern::audit::Record;
use crate::govern::audit::chain::{self, GENESIS};
use crate::govern::audit::store::{RECORD_COLUMN_COUNT, RECORD_COLUMNS, record_columns};

/// Where a chain stands during the scan.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tail {
    pub(super) seq: u64,
    pub(super) hash: [u8; 32],
}

/// What the walk leaves for the checks after it.
pub(super) struct Walk {
    /// Per (relay, tenant), where its chain ends (the last good row).
    pub(super) tails: HashMap<(String, String), Tail>,
    /// Per relay with a checkpoint, the clock over the rows after its last one.
    pub(super) clocks: HashMap<String, TailClock>,
    /// Per relay, its good rows.
    pub(super) relay_rows: BTreeMap<String, u64>,
}

/// One row of `records` as stored.
struct StoredRow {
    id: i64,
    relay: String,
    tenant: String,
    seq: u64,
    prev_hash: String,
    hash: String,
    bytes: Vec<u8>,
    columns: Vec<Value>,
}

impl StoredRow {
    /// Reads `id, relay, tenant, seq, prev_hash, hash, record, RECORD_COLUMNS...`.
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        let id = row.get(0)?;
        let relay = row.get(1)?;
        let tenant = row.get(2)?;
        let seq_raw: i64 = row.get(3)?;
        let prev_hash = row.get(4)?;
        let hash = row.get(5)?;
        let bytes = row.get(6)?;
        let mut columns = Vec::with_capacity(RECORD_COLUMN_COUNT);
        for i in 0..RECORD_COLUMN_COUNT {
            columns.push(row.get::<_, Value>(7 + i)?);
        }
        Ok(Self {
            id,
            relay,
            tenant,
            seq: u64::try_from(seq_raw).unwrap_or(0),
            prev_hash,
            hash,
            bytes,
            columns,
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

/// Walks every row in insertion order, counting good rows in `report` and setting
/// `report.problem` at the first bad one (where the walk stops). Feeds the clocks of rows no
/// checkpoint in `signed` signs yet.
pub(super) fn walk_rows(
    tx: &Connection,
    v1: bool,
    signed: &mut Signed,
    report: &mut Report,
) -> rusqlite::Result<Walk> {
    let mut walk = Walk {
        tails: HashMap::new(),
        clocks: signed
            .relays
            .iter()
            .map(|(relay, cps)| {
                let last = &cps.last.1;
                (
                    relay.clone(),
                    TailClock::new(Some(last.time_ms), last.interval_ms),
                )
            })
            .collect(),
        relay_rows: BTreeMap::new(),
    };
    let names = column_names();
    let relay_column = if v1 { "'' AS relay" } else { "relay" };
    let mut exists = tx.prepare(if v1 {
        "SELECT 1 FROM records WHERE ?1 = '' AND tenant = ?2 AND seq = ?3"
    } else {
        "SELECT 1 FROM records WHERE relay = ?1 AND tenant = ?2 AND seq = ?3"
    })?;
    let mut stmt = tx.prepare(&format!(
        "SELECT id, {relay_column}, tenant, seq, prev_hash, hash, record, {RECORD_COLUMNS} \
         FROM records ORDER BY id"
    ))?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let row = StoredRow::read(row)?;
        let tail = walk
            .tails
            .entry((row.relay.clone(), row.tenant.clone()))
            .or_insert(Tail {
                seq: 0,
                hash: GENESIS,
            });
        let (computed, record) = match check_row(tail, &row, &mut exists, &names)? {
            Ok(good) => good,
            Err((kind, detail)) => {
                report.problem = Some(Problem::row(
                    &row.relay,
                    &row.tenant,
                    row.seq,
                    row.id,
                    kind,
                    detail,
                ));
                break;
            }
        };
        tail.seq = row.seq;
        tail.hash = computed;
        report.rows += 1;
        *walk.relay_rows.entry(row.relay.clone()).or_default() += 1;
        feed_unsigned(&row, record.time_ms, signed, &mut walk.clocks);
    }
    Ok(walk)
}

/// Feeds the row to its relay's clock if its last checkpoint does not sign it, and to each
/// epoch segment of the relay that signed it first.
fn feed_unsigned(
    row: &StoredRow,
    time_ms: u64,
    signed: &mut Signed,
    clocks: &mut HashMap<String, TailClock>,
) {
    let StoredRow {
        id,
        relay,
        tenant,
        seq,
        ..
    } = row;
    // Unsigned after the relay's last checkpoint?
    if let Some((_, last)) = signed.last(relay) {
        let signed_seq = last.head(tenant).map_or(0, |h| h.seq);
        if *seq > signed_seq
            && let Some(clock) = clocks.get_mut(relay)
        {
            clock.feed(*id, tenant, *seq, time_ms);
        }
    }
    for segment in signed.segments.iter_mut().filter(|s| &s.relay == relay) {
        if let Some(&(from, to)) = segment.ranges.get(tenant)
            && *seq > from
            && *seq <= to
        {
            segment.clock.feed(*id, tenant, *seq, time_ms);
        }
    }
}

/// A good row's hash and record, or what is wrong with it.
type RowCheck = Result<([u8; 32], Record), (ProblemKind, String)>;

/// Checks `row` as the successor of `tail`: its number, its link, its hash, its record and
/// its columns. The row's hash and record, or what is wrong with it.
fn check_row(
    tail: &Tail,
    row: &StoredRow,
    exists: &mut Statement<'_>,
    names: &[&str],
) -> rusqlite::Result<RowCheck> {
    let seq = row.seq;
    let expected = tail.seq + 1;
    if seq != expected {
        let found = if seq > expected {
            let later = exists.exists(rusqlite::params![row.relay, row.tenant, expected as i64])?;
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
        return Ok(Err(found));
    }
    if chain::parse_hash(&row.prev_hash) != Some(tail.hash) {
        let detail = if seq == 1 {
            "the first row's previous hash is not the genesis hash".to_owned()
        } else {
            format!("its previous hash is not the hash of seq {}", seq - 1)
        };
        return Ok(Err((ProblemKind::ChainBroken, detail)));
    }
    let computed = chain::row_hash(&tail.hash, seq, &row.bytes);
    if chain::parse_hash(&row.hash) != Some(computed) {
        return Ok(Err((
            ProblemKind::HashMismatch,
            "the stored record does not match the row's hash".into(),
        )));
    }
    let record: Record = match serde_json::from_slice(&row.bytes) {
        Ok(record) => record,
        Err(e) => return Ok(Err((ProblemKind::InvalidRecord, e.to_string()))),
    };
    if record.tenant != row.tenant {
        return Ok(Err((
            ProblemKind::ColumnMismatch,
            format!(
                "column tenant says {:?}, the record {:?}",
                row.tenant, record.tenant
            ),
        )));
    }
    let expected_columns = record_columns(&record);
    if let Some(i) = (0..RECORD_COLUMN_COUNT).find(|&i| row.columns[i] != expected_columns[i]) {
        return Ok(Err((
            ProblemKind::ColumnMismatch,
            format!(
                "column {} is {}, the hashed record says {}",
                names.get(i).copied().unwrap_or("?"),
                show(&row.columns[i]),
                show(&expected_columns[i])
            ),
        )));
    }
    Ok(Ok((computed, record)))
}
