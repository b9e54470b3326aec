//! Reading the PostgreSQL trail for `audit export`, `audit tail [--follow]` and
//! `audit checkpoints`: the same lines as the SQLite trail's readers ([`StoredRow`]'s and
//! [`checkpoint_line`]'s), the same [`Filter`] as conditions on the database's columns, in
//! bounded memory (a portal read [`PAGE_ROWS`] rows at a time, or pages by id).
//!
//! Rows are ordered by `id`, the order they arrived in the database. Identity values are
//! taken when a row is inserted but become visible when its transaction commits, so relays
//! shipping at once commit ids out of order: a row can appear below one already read.
//! `tail --follow` therefore keeps the ids below the highest it has read that were not rows
//! yet (gaps, as ranges) and looks at them again every poll, for [`LATE`]. It prints every
//! matching row once, in the order it sees them (not strictly by id), provided its shipping
//! transaction commits within [`LATE`] of its id being taken: a shipper gives up a round after
//! [`ROUND_TIMEOUT`](super::ROUND_TIMEOUT) and drops its connection, which aborts the
//! transaction. Ids never used (a rolled back round, a row shipped twice, which takes an id and
//! stores nothing) are forgotten after [`LATE`]; at most [`MAX_GAPS`] ranges are kept (the
//! oldest go first). Not guaranteed: a row committed more than [`LATE`] after its id was taken
//! (a transaction held open that long, which no relay does), and, of the rows being committed
//! when the follower starts, those more than [`START_WINDOW`] ids below the newest.

use std::io::Write;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel, Portal, Row, Transaction};

use super::{PG_SCHEMA_VERSION, Target, pg_error};
use crate::govern::audit::AuditError;
use crate::govern::audit::query::{FOLLOW_POLL, Filter, StoredRow, TermValue, checkpoint_line};
use crate::govern::audit::store::{CHECKPOINT_COLUMNS, CheckpointRow};

/// Rows read per round trip: bounds memory on any trail size.
pub const PAGE_ROWS: i32 = 1000;

/// The longest one poll of `tail --follow` may wait on the database.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `tail --follow` waits for an id below the highest it read to become a row: twice
/// a shipper's longest round.
pub const LATE: Duration = Duration::from_secs(2 * super::ROUND_TIMEOUT.as_secs());

/// The most ranges of not-yet-rows ids `tail --follow` keeps.
pub const MAX_GAPS: usize = 100_000;

/// How many ids below the newest `tail --follow` looks at when it starts, for rows still
/// being committed then.
pub const START_WINDOW: i64 = 10_000;

/// A bound parameter.
type Param = Box<dyn ToSql + Sync + Send>;

/// The filter as a condition on `records` with its parameters, numbered from `$first`.
fn condition(filter: &Filter, first: usize) -> (String, Vec<Param>) {
    let mut conditions = vec!["true".to_owned()];
    let mut params: Vec<Param> = Vec::new();
    for term in filter.terms() {
        params.push(match term.value {
            TermValue::Text(text) => Box::new(text),
            TermValue::Integer(n) => Box::new(n),
        });
        conditions.push(format!(
            "{} {} ${}",
            term.column,
            term.op,
            first + params.len() - 1
        ));
    }
    (conditions.join(" AND "), params)
}

/// `params` as the driver takes them, after `lead`.
fn refs<'a>(lead: &[&'a (dyn ToSql + Sync)], params: &'a [Param]) -> Vec<&'a (dyn ToSql + Sync)> {
    let mut all = lead.to_vec();
    all.extend(params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)));
    all
}

/// Connects to the trail and checks it is one: a `meta` table with this build's schema.
pub(super) async fn open(target: &Target) -> Result<Client, AuditError> {
    let name = target.name();
    let client = target.connect().await?;
    let not_a_trail = |why: String| AuditError::Database {
        path: name.into(),
        message: format!("not an audit trail ({why})"),
    };
    let version = match client
        .query_opt("SELECT value FROM meta WHERE key = 'schema'", &[])
        .await
    {
        Ok(row) => row.map(|r| r.try_get::<_, String>(0)),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => {
            return Err(not_a_trail(
                "no meta table: no relay with this [audit] url has run".into(),
            ));
        }
        Err(e) => return Err(pg_error(name)(e)),
    };
    match version.transpose().map_err(pg_error(name))? {
        None => Err(not_a_trail("no schema version in meta".into())),
        Some(v) if v == PG_SCHEMA_VERSION => Ok(client),
        Some(v) => Err(AuditError::Database {
            path: name.into(),
            message: format!("schema version {v}, this build reads {PG_SCHEMA_VERSION}"),
        }),
    }
}

/// A read-only transaction that sees one snapshot throughout.
pub(super) async fn snapshot<'a>(
    client: &'a mut Client,
    name: &str,
) -> Result<Transaction<'a>, AuditError> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg_error(name))
}

/// The columns a [`StoredRow`] is made of, in [`stored_row`]'s order.
const ROW_COLUMNS: &str = "id, seq, prev_hash, hash, record";

/// A row of [`ROW_COLUMNS`] (from `at` on) as the SQLite readers return it.
fn stored_row(row: &Row, at: usize, name: &str) -> Result<StoredRow, AuditError> {
    let id: i64 = row.try_get(at).map_err(pg_error(name))?;
    let bytes: Vec<u8> = row.try_get(at + 4).map_err(pg_error(name))?;
    let record = serde_json::from_slice(&bytes).map_err(|e| AuditError::Database {
        path: name.into(),
        message: format!("row id {id}: the record is not JSON: {e}"),
    })?;
    Ok(StoredRow {
        id,
        seq: u64::try_from(row.try_get::<_, i64>(at + 1).map_err(pg_error(name))?).unwrap_or(0),
        prev_hash: row.try_get(at + 2).map_err(pg_error(name))?,
        hash: row.try_get(at + 3).map_err(pg_error(name))?,
        record,
    })
}

/// Reads `portal` a page of [`PAGE_ROWS`] rows at a time, handing each page to `each`:
/// bounded memory on a trail of any size.
pub(super) async fn for_each_page(
    tx: &Transaction<'_>,
    portal: &Portal,
    name: &str,
    mut each: impl FnMut(&[Row]) -> Result<(), AuditError>,
) -> Result<(), AuditError> {
    loop {
        let rows = tx
            .query_portal(portal, PAGE_ROWS)
            .await
            .map_err(pg_error(name))?;
        each(&rows)?;
        if rows.len() < PAGE_ROWS as usize {
            return Ok(());
        }
    }
}

/// `audit export --db postgresql://...`: every matching row as one JSON line, in the order
/// rows arrived, from one snapshot. Returns the number of rows written.
pub async fn export(
    target: &Target,
    filter: &Filter,
    out: &mut dyn Write,
) -> Result<u64, AuditError> {
    let name = target.name();
    let (condition, params) = condition(filter, 1);
    let sql = format!("SELECT {ROW_COLUMNS} FROM records WHERE {condition} ORDER BY id");
    write_lines(target, &sql, &refs(&[], &params), out, |row| {
        Ok(stored_row(row, 0, name)?.to_json_line())
    })
    .await
}

/// `audit checkpoints --db postgresql://...`: every relay's checkpoints, relay by relay in
/// number order, as [`checkpoint_line`] writes them. Returns the number written.
pub async fn checkpoints(
    target: &Target,
    json: bool,
    out: &mut dyn Write,
) -> Result<u64, AuditError> {
    let name = target.name();
    write_lines(target, &checkpoints_sql(), &[], out, |row| {
        let stored = checkpoint_row(row).map_err(pg_error(name))?.parse();
        checkpoint_line(&stored, json).map_err(|message| AuditError::Database {
            path: name.into(),
            message,
        })
    })
    .await
}

/// Writes `line` of every row of `sql` (with `params`) to `out`, from one snapshot, a page at a
/// time; returns how many.
async fn write_lines(
    target: &Target,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    out: &mut dyn Write,
    line: impl Fn(&Row) -> Result<String, AuditError>,
) -> Result<u64, AuditError> {
    let name = target.name();
    let err = pg_error(name);
    let mut client = open(target).await?;
    let tx = snapshot(&mut client, name).await?;
    let portal = tx.bind(sql, params).await.map_err(&err)?;
    let mut written = 0;
    for_each_page(&tx, &portal, name, |rows| {
        for row in rows {
            writeln!(out, "{}", line(row)?)?;
            written += 1;
        }
        Ok(())
    })
    .await?;
    out.flush()?;
    tx.commit().await.map_err(&err)?;
    Ok(written)
}

/// Every checkpoint in [`CHECKPOINT_COLUMNS`] (the database's table has no `id`: 0), relay by
/// relay in number order.
pub(super) fn checkpoints_sql() -> String {
    let columns = CHECKPOINT_COLUMNS
        .strip_prefix("id, ")
        .unwrap_or(CHECKPOINT_COLUMNS);
    format!("SELECT 0::int8 AS id, {columns} FROM checkpoints ORDER BY relay, n")
}

/// A row of [`checkpoints_sql`].
pub(super) fn checkpoint_row(row: &Row) -> Result<CheckpointRow, tokio_postgres::Error> {
    Ok(CheckpointRow {
        id: row.try_get(0)?,
        relay: row.try_get(1)?,
        n: row.try_get(2)?,
        prev: row.try_get(3)?,
        hash: row.try_get(4)?,
        kind: row.try_get(5)?,
        epoch: row.try_get(6)?,
        note: row.try_get(7)?,
        time_ms: row.try_get(8)?,
        interval_ms: row.try_get(9)?,
        heads: row.try_get(10)?,
        public_key: row.try_get(11)?,
        signature: row.try_get(12)?,
    })
}

/// `audit tail --db postgresql://...`: the last `n` matching rows as human-readable lines;
/// with `follow`, then every matching row shipped after, as the module's doc says, until
/// `stop` returns true (checked every [`FOLLOW_POLL`]).
pub async fn tail(
    target: &Target,
    filter: &Filter,
    n: usize,
    follow: bool,
    stop: &dyn Fn() -> bool,
    out: &mut dyn Write,
) -> Result<(), AuditError> {
    let name = target.name();
    let err = pg_error(name);
    let mut client = open(target).await?;
    let (condition, params) = condition(filter, 2);
    let limit = i64::try_from(n).unwrap_or(i64::MAX);
    let tx = snapshot(&mut client, name).await?;
    let last = tx
        .query(
            &format!(
                "SELECT {ROW_COLUMNS} FROM records WHERE {condition} ORDER BY id DESC LIMIT $1"
            ),
            &refs(&[&limit as &(dyn ToSql + Sync)], &params),
        )
        .await
        .map_err(&err)?;
    for row in last.iter().rev() {
        writeln!(out, "{}", stored_row(row, 0, name)?.to_human_line())?;
    }
    out.flush()?;
    if !follow {
        return tx.commit().await.map_err(&err);
    }
    // Where the rows stand in the same snapshot, and which ids below are not rows yet.
    let high: i64 = tx
        .query_one("SELECT COALESCE(MAX(id), 0) FROM records", &[])
        .await
        .and_then(|r| r.try_get(0))
        .map_err(&err)?;
    let from = high.saturating_sub(START_WINDOW).max(0);
    let ids: Vec<i64> = tx
        .query("SELECT id FROM records WHERE id > $1 ORDER BY id", &[&from])
        .await
        .map_err(&err)?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(&err)?;
    tx.commit().await.map_err(&err)?;
    let mut follower = Follower::new(filter, high);
    let mut below = from;
    for id in ids {
        follower.gap(below + 1, id - 1);
        below = id;
    }
    while !stop() {
        // A database gone quiet (a network cut leaves TCP waiting for hours) ends the follow
        // with an error rather than holding it past Ctrl-C.
        tokio::time::timeout(POLL_TIMEOUT, follower.poll(&client, name, out))
            .await
            .unwrap_or_else(|_| {
                Err(AuditError::Database {
                    path: name.into(),
                    message: format!("no answer within {POLL_TIMEOUT:?}"),
                })
            })?;
        out.flush()?;
        tokio::time::sleep(FOLLOW_POLL).await;
    }
    Ok(())
}

/// Ids below the highest read that were not rows when last looked at.
struct Gap {
    lo: i64,
    hi: i64,
    since: Instant,
}

/// `tail --follow`'s state: the highest id read and the gaps below it.
struct Follower {
    /// New rows: `$1` the highest id read.
    new_sql: String,
    /// Rows in the gaps: `$1`, `$2` their bounds.
    gaps_sql: String,
    params: Vec<Param>,
    high: i64,
    /// Disjoint, in id order.
    gaps: Vec<Gap>,
}

impl Follower {
    fn new(filter: &Filter, high: i64) -> Self {
        // Every row is read (its id closes a gap), the record only of the matching ones: the
        // columns `hit` and then [`ROW_COLUMNS`].
        let columns = |first| {
            let (condition, params) = condition(filter, first);
            let columns = format!(
                "COALESCE({condition}, false) AS hit, id, seq, prev_hash, hash, \
                 CASE WHEN {condition} THEN record END AS record"
            );
            (columns, params)
        };
        let (new_columns, params) = columns(2);
        let (gap_columns, _) = columns(3);
        Self {
            new_sql: format!(
                "SELECT {new_columns} FROM records WHERE id > $1 ORDER BY id LIMIT {PAGE_ROWS}"
            ),
            gaps_sql: format!(
                "SELECT r.* FROM unnest($1::int8[], $2::int8[]) AS g(lo, hi) CROSS JOIN LATERAL \
                 (SELECT {gap_columns} FROM records WHERE id BETWEEN g.lo AND g.hi) AS r \
                 ORDER BY r.id LIMIT {PAGE_ROWS}"
            ),
            params,
            high,
            gaps: Vec::new(),
        }
    }

    /// Notes `lo..=hi` as not rows yet.
    fn gap(&mut self, lo: i64, hi: i64) {
        if lo > hi {
            return;
        }
        if self.gaps.len() >= MAX_GAPS {
            self.gaps.remove(0);
        }
        self.gaps.push(Gap {
            lo,
            hi,
            since: Instant::now(),
        });
    }

    /// `id` is a row now: out of its gap.
    fn fill(&mut self, id: i64) {
        let i = self.gaps.partition_point(|g| g.hi < id);
        let Some(gap) = self.gaps.get_mut(i) else {
            return;
        };
        if gap.lo > id {
            return;
        }
        match (gap.lo == id, gap.hi == id) {
            (true, true) => {
                self.gaps.remove(i);
            }
            (true, false) => gap.lo = id + 1,
            (false, true) => gap.hi = id - 1,
            (false, false) => {
                let upper = Gap {
                    lo: id + 1,
                    hi: gap.hi,
                    since: gap.since,
                };
                gap.hi = id - 1;
                self.gaps.insert(i + 1, upper);
            }
        }
    }

    /// Prints the matching rows among `rows` (of the follower's columns).
    fn print(&self, rows: &[Row], name: &str, out: &mut dyn Write) -> Result<(), AuditError> {
        for row in rows {
            if row.try_get::<_, bool>(0).map_err(pg_error(name))? {
                writeln!(out, "{}", stored_row(row, 1, name)?.to_human_line())?;
            }
        }
        Ok(())
    }

    /// New rows after the highest read, then rows that filled gaps; forgets gaps older than
    /// [`LATE`].
    async fn poll(
        &mut self,
        client: &Client,
        name: &str,
        out: &mut dyn Write,
    ) -> Result<(), AuditError> {
        let err = pg_error(name);
        loop {
            let rows = client
                .query(
                    self.new_sql.as_str(),
                    &refs(&[&self.high as &(dyn ToSql + Sync)], &self.params),
                )
                .await
                .map_err(&err)?;
            self.print(&rows, name, out)?;
            for row in &rows {
                let id: i64 = row.try_get(1).map_err(&err)?;
                self.gap(self.high + 1, id - 1);
                self.high = self.high.max(id);
            }
            if rows.len() < PAGE_ROWS as usize {
                break;
            }
        }
        while !self.gaps.is_empty() {
            let los: Vec<i64> = self.gaps.iter().map(|g| g.lo).collect();
            let his: Vec<i64> = self.gaps.iter().map(|g| g.hi).collect();
            let rows = client
                .query(
                    self.gaps_sql.as_str(),
                    &refs(&[&los as &(dyn ToSql + Sync), &his], &self.params),
                )
                .await
                .map_err(&err)?;
            self.print(&rows, name, out)?;
            for row in &rows {
                self.fill(row.try_get(1).map_err(&err)?);
            }
            if rows.len() < PAGE_ROWS as usize {
                break;
            }
        }
        self.gaps.retain(|g| g.since.elapsed() < LATE);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(follower: &Follower) -> Vec<(i64, i64)> {
        follower.gaps.iter().map(|g| (g.lo, g.hi)).collect()
    }

    #[test]
    fn a_gap_splits_around_the_rows_that_fill_it() {
        let mut follower = Follower::new(&Filter::default(), 0);
        follower.gap(3, 9);
        follower.gap(12, 12);
        follower.gap(5, 4);
        assert_eq!(ranges(&follower), [(3, 9), (12, 12)]);
        follower.fill(6);
        assert_eq!(ranges(&follower), [(3, 5), (7, 9), (12, 12)]);
        for id in [3, 9, 12, 10, 1] {
            follower.fill(id);
        }
        assert_eq!(ranges(&follower), [(4, 5), (7, 8)]);
        for id in [4, 5, 7, 8] {
            follower.fill(id);
        }
        assert!(follower.gaps.is_empty());
    }

    #[test]
    fn filters_become_numbered_conditions() {
        let filter = Filter {
            relay: Some("relay-a".into()),
            tool: Some("query".into()),
            until_ms: Some(10),
            ..Filter::default()
        };
        let (sql, params) = condition(&filter, 3);
        assert_eq!(sql, "true AND relay = $3 AND tool = $4 AND time_ms < $5");
        assert_eq!(params.len(), 3);
    }
}
