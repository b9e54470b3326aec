//! Reading the trail: filters, `audit tail` (human-readable lines, optionally following new
//! rows) and `audit export` (JSON lines). Readers open the file read-only, so they work while a
//! relay writes to it (WAL).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::types::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use std::collections::HashMap;

use super::{AuditError, Record, Verdict};
use super::{segment, store};

/// How often `tail --follow` looks for new rows.
pub const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// Rows read per query while exporting or following: bounds memory on any trail size.
const PAGE_ROWS: usize = 1000;

/// Which rows to read. Every field set must match (exactly); none set reads everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// The relay instance that wrote the row.
    pub relay: Option<String>,
    /// The tenant.
    pub tenant: Option<String>,
    /// The caller.
    pub subject: Option<String>,
    /// The source.
    pub source: Option<String>,
    /// The tool (of `tools/call`).
    pub tool: Option<String>,
    /// Allowed or denied.
    pub decision: Option<Verdict>,
    /// Records at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Records before this time (ms since the epoch).
    pub until_ms: Option<u64>,
}

/// One condition of a [`Filter`]: `column op value`. Both trails (SQLite and PostgreSQL) have
/// these columns under these names; each renders its own placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// The column.
    pub column: &'static str,
    /// `=`, `>=` or `<`.
    pub op: &'static str,
    /// The value.
    pub value: TermValue,
}

/// The value a [`Term`] compares with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TermValue {
    /// A text column's value.
    Text(String),
    /// An integer column's value.
    Integer(i64),
}

impl Filter {
    /// The conditions, in a fixed order.
    pub fn terms(&self) -> Vec<Term> {
        let mut terms = Vec::new();
        let text = [
            ("relay", &self.relay),
            ("tenant", &self.tenant),
            ("subject", &self.subject),
            ("source", &self.source),
            ("tool", &self.tool),
        ];
        for (column, value) in text {
            if let Some(value) = value {
                terms.push(Term {
                    column,
                    op: "=",
                    value: TermValue::Text(value.clone()),
                });
            }
        }
        if let Some(decision) = self.decision {
            terms.push(Term {
                column: "decision",
                op: "=",
                value: TermValue::Text(decision.label().to_owned()),
            });
        }
        let int = |ms: u64| TermValue::Integer(i64::try_from(ms).unwrap_or(i64::MAX));
        if let Some(since) = self.since_ms {
            terms.push(Term {
                column: "time_ms",
                op: ">=",
                value: int(since),
            });
        }
        if let Some(until) = self.until_ms {
            terms.push(Term {
                column: "time_ms",
                op: "<",
                value: int(until),
            });
        }
        terms
    }

    /// Whether a row of `relay` holding `record` matches: [`Filter::terms`] asked of the
    /// record's fields, for rows not yet in a database.
    pub fn matches(&self, relay: &str, record: &Record) -> bool {
        self.terms().iter().all(|term| {
            let text = |have: Option<&str>| match &term.value {
                TermValue::Text(want) => have == Some(want.as_str()),
                TermValue::Integer(_) => false,
            };
            match term.column {
                "relay" => text(Some(relay)),
                "tenant" => text(Some(&record.tenant)),
                "subject" => text(Some(&record.subject)),
                "source" => text(Some(&record.source)),
                "tool" => text(record.tool.as_deref()),
                "decision" => text(Some(record.decision.label())),
                "time_ms" => {
                    let TermValue::Integer(bound) = term.value else {
                        return false;
                    };
                    let time = i64::try_from(record.time_ms).unwrap_or(i64::MAX);
                    if term.op == ">=" {
                        time >= bound
                    } else {
                        time < bound
                    }
                }
                _ => false,
            }
        })
    }

    /// The SQLite condition and its parameters. `relay` is the expression of the relay column
    /// (a schema 1 file has none: `''`).
    fn sql(&self, relay: &str) -> (String, Vec<Value>) {
        let mut conditions = vec!["1 = 1".to_owned()];
        let mut values = Vec::new();
        for term in self.terms() {
            values.push(match term.value {
                TermValue::Text(text) => Value::Text(text),
                TermValue::Integer(n) => Value::Integer(n),
            });
            let column = if term.column == "relay" {
                relay
            } else {
                term.column
            };
            conditions.push(format!("{column} {} ?{}", term.op, values.len()));
        }
        (conditions.join(" AND "), values)
    }
}

/// A time argument: milliseconds since the epoch, or RFC 3339 (`2026-11-26T07:00:00Z`).
pub fn parse_time(text: &str) -> Result<u64, AuditError> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| AuditError::Argument(format!("time {text:?} is out of range")));
    }
    let time = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        AuditError::Argument(format!(
            "time {text:?} is neither RFC 3339 nor milliseconds since the epoch: {e}"
        ))
    })?;
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| AuditError::Argument(format!("time {text:?} is before 1970")))
}

/// `ms` since the epoch as RFC 3339 UTC with milliseconds.
pub fn format_time(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms}ms"))
}

/// One stored row: the chain fields and the record.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    /// Insertion order in the file (in PostgreSQL: the order rows arrived there, `id`).
    pub id: i64,
    /// The tenant's chain position (1, 2, ...).
    pub seq: u64,
    /// The previous row's hash, hex.
    pub prev_hash: String,
    /// This row's hash, hex.
    pub hash: String,
    /// The record's JSON as stored (what the hash covers).
    pub record: serde_json::Value,
}

impl StoredRow {
    /// The record, typed; `None` if the stored JSON is not a record.
    pub fn typed(&self) -> Option<Record> {
        serde_json::from_value(self.record.clone()).ok()
    }

    /// The export line: the record's JSON plus `seq`, `prev_hash` and `hash`.
    pub fn to_json_line(&self) -> String {
        let mut value = self.record.clone();
        if let Some(object) = value.as_object_mut() {
            object.insert("seq".into(), self.seq.into());
            object.insert("prev_hash".into(), self.prev_hash.clone().into());
            object.insert("hash".into(), self.hash.clone().into());
        }
        value.to_string()
    }

    /// The `tail` line: time, tenant#seq, subject, source, method, target, decision, outcome,
    /// latency, sizes and rule.
    pub fn to_human_line(&self) -> String {
        let Some(r) = self.typed() else {
            return format!(
                "#{} seq {}: (not a record) {}",
                self.id, self.seq, self.record
            );
        };
        let outcome = match r.outcome {
            super::Outcome::Error(code) => format!("error {code}"),
            other => other.label().to_owned(),
        };
        format!(
            "{} {}#{} {} {} {} {} {} {} {:.1}ms in={}B out={}B rule={:?}",
            format_time(r.time_ms),
            r.tenant,
            self.seq,
            r.subject,
            r.source,
            r.method,
            r.target().unwrap_or("-"),
            r.decision.label(),
            outcome,
            r.latency_us as f64 / 1000.0,
            r.bytes_in,
            r.bytes_out,
            r.rule,
        )
    }
}

/// A read-only reader of the trail at one path.
pub struct Reader {
    conn: Connection,
    path: std::path::PathBuf,
    /// The relay column's expression: `relay`, or `''` in a schema 1 file (which has none).
    relay_column: &'static str,
}

impl Reader {
    /// Opens the trail read-only.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let conn = store::open_reader(path)?;
        let v1 = store::schema_version(&conn, path)?.as_deref() == Some(store::SCHEMA_V1);
        Ok(Self {
            conn,
            path: path.to_owned(),
            relay_column: if v1 { "''" } else { "relay" },
        })
    }

    fn error(&self, e: impl std::fmt::Display) -> AuditError {
        AuditError::Database {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Up to `limit` rows matching `filter` with id above `after_id`, oldest first.
    pub fn rows_after(
        &self,
        filter: &Filter,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<StoredRow>, AuditError> {
        self.select(filter, "id > ?", after_id, "id ASC", limit)
    }

    /// The newest `n` rows matching `filter`, oldest first.
    pub fn last_rows(&self, filter: &Filter, n: usize) -> Result<Vec<StoredRow>, AuditError> {
        let mut rows = self.select(filter, "id <= ?", i64::MAX, "id DESC", n)?;
        rows.reverse();
        Ok(rows)
    }

    /// Runs `read` over one moment of the trail: the segment files are opened first (a file
    /// the relay removes once indexed is still read whole), then one read transaction, so the
    /// database's rows and the segment rows past its mark ([`Reader::unindexed`]) neither
    /// overlap nor leave a gap.
    pub fn snapshot<T>(
        &self,
        read: impl FnOnce(&Self, segment::OpenFiles) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let files = segment::open_from(&self.path, 0).map_err(|e| self.error(e))?;
        self.conn
            .execute_batch("BEGIN")
            .map_err(|e| self.error(e))?;
        let result = read(self, files);
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            tracing::debug!(error = %e, "ending the audit read transaction");
        }
        result
    }

    /// The rows matching `filter` that are in the segment `files` past the database's mark (a
    /// running relay's last milliseconds of rows, or what a crash left before the relay's
    /// next start indexes it), in file order; their `id` is 0. Inside [`Reader::snapshot`].
    pub fn unindexed(
        &self,
        files: segment::OpenFiles,
        filter: &Filter,
    ) -> Result<Vec<StoredRow>, AuditError> {
        if files.is_empty() {
            return Ok(Vec::new());
        }
        let mark = store::segment_mark(&self.conn).map_err(|e| self.error(e))?;
        let past = segment::rows_past(files, mark).map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        for (relay, row) in past.rows {
            if !filter.matches(&relay, &row.record) {
                continue;
            }
            out.push(StoredRow {
                id: 0,
                seq: row.seq,
                prev_hash: hex::encode(row.prev),
                hash: hex::encode(row.hash),
                record: serde_json::from_slice(&row.bytes)
                    .map_err(|e| self.error(format!("a segment row is not JSON: {e}")))?,
            });
        }
        Ok(out)
    }

    fn select(
        &self,
        filter: &Filter,
        id_condition: &str,
        id: i64,
        order: &str,
        limit: usize,
    ) -> Result<Vec<StoredRow>, AuditError> {
        let (condition, mut values) = filter.sql(self.relay_column);
        values.push(Value::Integer(id));
        let id_condition = id_condition.replace('?', &format!("?{}", values.len()));
        values.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
        let sql = format!(
            "SELECT id, seq, prev_hash, hash, record FROM records WHERE {condition} AND \
             {id_condition} ORDER BY {order} LIMIT ?{}",
            values.len()
        );
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.error(e))?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(values), |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, Vec<u8>>(4)?,
                ))
            })
            .map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, seq, prev_hash, hash, bytes) = row.map_err(|e| self.error(e))?;
            let record = serde_json::from_slice(&bytes)
                .map_err(|e| self.error(format!("row {id}: the record is not JSON: {e}")))?;
            out.push(StoredRow {
                id,
                seq: u64::try_from(seq).unwrap_or(0),
                prev_hash,
                hash,
                record,
            });
        }
        Ok(out)
    }
}

/// `audit checkpoints`: every relay's signed checkpoints, relay by relay in number order; one
/// human line each, or with `json` one JSON object a line (the off-box copy's format, which
/// `audit verify --checkpoints` reads). Returns the number written. A schema 1 trail has none
/// (its per-tenant checkpoints are not a chain).
pub fn checkpoints(path: &Path, json: bool, out: &mut dyn Write) -> Result<u64, AuditError> {
    let conn = store::open_reader(path)?;
    let err = |e: rusqlite::Error| AuditError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    };
    if store::schema_version(&conn, path)?.as_deref() == Some(store::SCHEMA_V1) {
        return Ok(0);
    }
    let mut written = 0;
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {} FROM checkpoints ORDER BY relay, n, id",
            store::CHECKPOINT_COLUMNS
        ))
        .map_err(err)?;
    // Streamed: a year of one-minute checkpoints is half a million.
    for stored in stmt.query_map([], store::read_checkpoint).map_err(err)? {
        let stored = stored.map_err(err)?;
        let line = checkpoint_line(&stored, json).map_err(|message| AuditError::Database {
            path: path.to_owned(),
            message,
        })?;
        writeln!(out, "{line}")?;
        written += 1;
    }
    out.flush()?;
    Ok(written)
}

/// The `audit checkpoints` line of a stored checkpoint: human-readable, or with `json` its JSON
/// object (the off-box copy's line); what is wrong with the row if it is not a checkpoint.
pub fn checkpoint_line(stored: &store::StoredCheckpoint, json: bool) -> Result<String, String> {
    let cp = match &stored.checkpoint {
        Ok(cp) => cp,
        Err(e) if stored.id != 0 => return Err(format!("checkpoint id {}: {e}", stored.id)),
        Err(e) => {
            return Err(format!(
                "checkpoint {} of relay {:?}: {e}",
                stored.n, stored.relay
            ));
        }
    };
    if json {
        return Ok(cp.to_json_line());
    }
    Ok(format!(
        "{} relay={:?} n={} kind={} epoch={} tenants={} key={}{}",
        format_time(cp.time_ms),
        cp.relay,
        cp.n,
        cp.kind.label(),
        cp.epoch,
        cp.heads.len(),
        cp.public_key.get(..16).unwrap_or(&cp.public_key),
        if cp.note.is_empty() {
            String::new()
        } else {
            format!(" note={:?}", cp.note)
        }
    ))
}

/// `audit export --format jsonl`: every matching row as one JSON line, oldest first. Returns
/// the number of rows written.
pub fn export(path: &Path, filter: &Filter, out: &mut dyn Write) -> Result<u64, AuditError> {
    let reader = Reader::open(path)?;
    let written = reader.snapshot(|reader, files| {
        let mut after = 0;
        let mut written = 0;
        loop {
            let rows = reader.rows_after(filter, after, PAGE_ROWS)?;
            let Some(last) = rows.last() else { break };
            after = last.id;
            for row in &rows {
                writeln!(out, "{}", row.to_json_line())?;
                written += 1;
            }
        }
        for row in reader.unindexed(files, filter)? {
            writeln!(out, "{}", row.to_json_line())?;
            written += 1;
        }
        Ok(written)
    })?;
    out.flush()?;
    Ok(written)
}

/// `audit tail`: the last `n` matching rows as human-readable lines (rows not yet indexed
/// included); with `follow`, then every new matching row as it is indexed, until `stop` returns true (checked every
/// [`FOLLOW_POLL`]).
pub fn tail(
    path: &Path,
    filter: &Filter,
    n: usize,
    follow: bool,
    stop: &dyn Fn() -> bool,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let reader = Reader::open(path)?;
    // The last rows (the segment's included), and where the database ends: following goes on
    // from there.
    let (rows, mut after) = reader.snapshot(|reader, files| {
        let mut rows = reader.last_rows(filter, n)?;
        rows.extend(reader.unindexed(files, filter)?);
        rows.drain(..rows.len().saturating_sub(n));
        let end: i64 = reader
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM records", [], |r| r.get(0))
            .map_err(|e| reader.error(e))?;
        Ok((rows, end))
    })?;
    if !follow && rows.is_empty() {
        return Ok(());
    }
    // Rows shown from the segment reach the database later: not shown again then.
    let mut shown: HashMap<String, u64> = HashMap::new();
    for row in rows.iter().filter(|r| r.id == 0) {
        if let Some(tenant) = row.record["tenant"].as_str() {
            let seq = shown.entry(tenant.to_owned()).or_default();
            *seq = (*seq).max(row.seq);
        }
    }
    for row in &rows {
        writeln!(out, "{}", row.to_human_line())?;
    }
    out.flush()?;
    while follow && !stop() {
        let rows = reader.rows_after(filter, after, PAGE_ROWS)?;
        match rows.last() {
            Some(last) => after = last.id,
            None => {
                std::thread::sleep(FOLLOW_POLL);
                continue;
            }
        }
        for row in &rows {
            let seen = row.record["tenant"]
                .as_str()
                .and_then(|tenant| shown.get(tenant))
                .is_some_and(|&seq| row.seq <= seq);
            if !seen {
                writeln!(out, "{}", row.to_human_line())?;
            }
        }
        out.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_milliseconds() {
        assert_eq!(parse_time("1764140400000").expect("ms"), 1_764_140_400_000);
        assert_eq!(
            parse_time("2025-11-26T07:00:00Z").expect("rfc3339"),
            1_764_140_400_000
        );
        assert_eq!(
            parse_time("2025-11-26T08:00:00.5+01:00").expect("offset"),
            1_764_140_400_500
        );
        assert!(parse_time("yesterday").is_err());
        assert_eq!(format_time(1_764_140_400_500), "2025-11-26T07:00:00.5Z");
    }

    #[test]
    fn filters_match_records_as_they_match_columns() {
        let record = Record {
            tool: Some("echo".into()),
            ..Record::example("acme", 7)
        };
        let at = record.time_ms;
        let matches = |filter: Filter| filter.matches("relay-a", &record);
        assert!(matches(Filter::default()));
        assert!(matches(Filter {
            relay: Some("relay-a".into()),
            tenant: Some("acme".into()),
            tool: Some("echo".into()),
            decision: Some(record.decision),
            since_ms: Some(at),
            until_ms: Some(at + 1),
            ..Filter::default()
        }));
        assert!(!matches(Filter {
            relay: Some("relay-b".into()),
            ..Filter::default()
        }));
        assert!(!matches(Filter {
            tool: Some("add".into()),
            ..Filter::default()
        }));
        assert!(!matches(Filter {
            until_ms: Some(at),
            ..Filter::default()
        }));
        assert!(!matches(Filter {
            since_ms: Some(at + 1),
            ..Filter::default()
        }));
    }

    #[test]
    fn filters_become_bound_parameters() {
        let filter = Filter {
            tenant: Some("acme".into()),
            decision: Some(Verdict::Deny),
            since_ms: Some(5),
            ..Filter::default()
        };
        let (sql, values) = filter.sql("relay");
        assert_eq!(
            sql,
            "1 = 1 AND tenant = ?1 AND decision = ?2 AND time_ms >= ?3"
        );
        let relay = Filter {
            relay: Some("relay-a".into()),
            ..Filter::default()
        };
        assert_eq!(relay.sql("''").0, "1 = 1 AND '' = ?1");
        assert_eq!(
            values,
            vec![
                Value::Text("acme".into()),
                Value::Text("deny".into()),
                Value::Integer(5)
            ]
        );
    }
}
