//! The SQLite file: schema, opening for the writer (WAL) or a reader, and the writer's
//! statements. One row per record in `records`; signed chain heads in `checkpoints`; the
//! relay's public keys in `keys`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, params};

use super::chain::{self, GENESIS};
use super::checkpoint::{Checkpoint, HeadEntry, Kind};
use super::segment::{Mark, Row};
use super::settings::Durability;
use super::{AuditError, Record};

/// The schema this code writes (in `meta`). Schema 1 (per-tenant checkpoints, no relay
/// column) is still read, and migrated in place when a relay opens it for writing
/// ([`open_writer`]).
pub const SCHEMA_VERSION: &str = "2";

/// The first schema, still readable.
pub const SCHEMA_V1: &str = "1";

/// How long a statement waits for a lock another connection holds (a reader's WAL checkpoint,
/// a second writer by mistake) before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const META: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// The rows of schema 2: each chain is keyed by (relay instance, tenant).
const RECORDS_V2: &str = "
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    relay TEXT NOT NULL,
    tenant TEXT NOT NULL,
    seq INTEGER NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    subject TEXT NOT NULL,
    roles TEXT NOT NULL,
    source TEXT NOT NULL,
    session TEXT,
    transport TEXT,
    protocol_version TEXT,
    direction TEXT NOT NULL,
    method TEXT NOT NULL,
    request_id TEXT,
    tool TEXT,
    resource TEXT,
    prompt TEXT,
    decision TEXT NOT NULL,
    rule TEXT NOT NULL,
    outcome TEXT NOT NULL,
    outcome_code INTEGER,
    latency_us INTEGER NOT NULL,
    bytes_in INTEGER NOT NULL,
    bytes_out INTEGER NOT NULL,
    args_sha256 TEXT NOT NULL,
    record BLOB NOT NULL,
    UNIQUE (relay, tenant, seq)
);
CREATE INDEX IF NOT EXISTS records_time ON records (time_ms);
";

/// The rest of schema 2: the relays' checkpoint chains (see [`super::checkpoint`]), schema 1's
/// per-tenant checkpoints kept as they were (`legacy_checkpoints`), and the keys.
const TABLES_V2: &str = "
CREATE TABLE IF NOT EXISTS keys (
    public_key TEXT PRIMARY KEY,
    added_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    relay TEXT NOT NULL,
    n INTEGER NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL,
    kind TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    note TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    interval_ms INTEGER NOT NULL,
    heads TEXT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    UNIQUE (relay, n)
);
CREATE TABLE IF NOT EXISTS legacy_checkpoints (
    id INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    relay TEXT NOT NULL DEFAULT ''
);
";

/// The record's fields kept in columns (for filters), in the order of [`record_columns`].
/// `audit verify` checks them against the hashed record bytes.
pub const RECORD_COLUMNS: &str = "time_ms, subject, roles, source, session, transport, \
    protocol_version, direction, method, request_id, tool, resource, prompt, decision, rule, \
    outcome, outcome_code, latency_us, bytes_in, bytes_out, args_sha256";

/// Number of names in [`RECORD_COLUMNS`].
pub const RECORD_COLUMN_COUNT: usize = 21;

/// The values of [`RECORD_COLUMNS`] for `record`.
pub fn record_columns(record: &Record) -> [Value; RECORD_COLUMN_COUNT] {
    let text = |s: &str| Value::Text(s.to_owned());
    let opt = |s: &Option<String>| s.as_deref().map_or(Value::Null, text);
    let int = |n: u64| Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
    let outcome_code = match record.outcome {
        super::Outcome::Error(code) => Value::Integer(code),
        _ => Value::Null,
    };
    [
        int(record.time_ms),
        text(&record.subject),
        text(&serde_json::Value::from(record.roles.clone()).to_string()),
        text(&record.source),
        opt(&record.session),
        opt(&record.transport),
        opt(&record.protocol_version),
        text(record.direction.label()),
        text(&record.method),
        opt(&record.request_id),
        opt(&record.tool),
        opt(&record.resource),
        opt(&record.prompt),
        text(record.decision.label()),
        text(&record.rule),
        text(record.outcome.label()),
        outcome_code,
        int(record.latency_us),
        int(record.bytes_in),
        int(record.bytes_out),
        text(&record.args_sha256),
    ]
}

/// Where a tenant's chain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The last row's sequence number (0: no rows yet).
    pub seq: u64,
    /// The last row's hash ([`GENESIS`] before the first).
    pub hash: [u8; 32],
    /// The last checkpointed sequence number (0: none).
    pub signed_seq: u64,
}

impl Head {
    /// Rows after the last checkpoint.
    pub fn unsigned(&self) -> u64 {
        self.seq.saturating_sub(self.signed_seq)
    }
}

impl Default for Head {
    fn default() -> Self {
        Self {
            seq: 0,
            hash: GENESIS,
            signed_seq: 0,
        }
    }
}

pub(super) fn sql_error(path: &Path) -> impl Fn(rusqlite::Error) -> AuditError + '_ {
    move |e| AuditError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Opens (creating if needed) the trail for writing: WAL, the durability's `synchronous`, the
/// schema (a schema 1 file is migrated in place, its rows given to `relay`, the instance that
/// wrote them), and `public_key` recorded in `keys`. Returns the connection and whether the
/// file was migrated.
pub fn open_writer(
    path: &Path,
    durability: Durability,
    public_key: &str,
    relay: &str,
) -> Result<(Connection, bool), AuditError> {
    let err = sql_error(path);
    let conn = Connection::open(path).map_err(&err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(&err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(&err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(AuditError::Database {
            path: path.to_owned(),
            message: format!("cannot use write-ahead logging (journal mode is {mode})"),
        });
    }
    let synchronous = match durability {
        Durability::Commit => "NORMAL",
        Durability::Fsync => "FULL",
    };
    // No checkpoint inside a commit: the one that crossed the threshold held its answer for
    // the fsyncs of the merge (a few ms). [`open_wal_checkpointer`]'s connection merges instead.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {synchronous}; PRAGMA wal_autocheckpoint = 0; \
         PRAGMA journal_size_limit = {WAL_FILE_LIMIT};"
    ))
    .map_err(&err)?;
    conn.execute_batch(META).map_err(&err)?;
    let migrated = match schema_version(&conn, path)?.as_deref() {
        None => {
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; {RECORDS_V2} {TABLES_V2} \
                 INSERT INTO meta (key, value) VALUES ('schema', '{SCHEMA_VERSION}'); COMMIT;"
            ))
            .map_err(&err)?;
            false
        }
        Some(SCHEMA_VERSION) => false,
        Some(SCHEMA_V1) => {
            migrate_v1(&conn, relay).map_err(|e| AuditError::Database {
                path: path.to_owned(),
                message: format!("migrating schema 1 to 2 failed: {e}"),
            })?;
            tracing::info!(path = %path.display(), relay, "audit trail migrated from schema 1 to 2");
            true
        }
        Some(v) => {
            return Err(AuditError::Database {
                path: path.to_owned(),
                message: format!(
                    "schema version {v}, this build reads {SCHEMA_V1} and {SCHEMA_VERSION}"
                ),
            });
        }
    };
    conn.execute(
        "INSERT OR IGNORE INTO keys (public_key, added_ms) VALUES (?1, ?2)",
        params![public_key, now_ms() as i64],
    )
    .map_err(&err)?;
    Ok((conn, migrated))
}

/// Schema 1 to 2, in one transaction: the rows gain the relay column (all of them written by
/// `relay`, the one relay a schema 1 file had) and chains become keyed by (relay, tenant); the
/// per-tenant checkpoints are kept, untouched, as `legacy_checkpoints` (their signatures still
/// verify); the relays' checkpoint chains start empty (the relay's start checkpoint follows).
fn migrate_v1(conn: &Connection, relay: &str) -> rusqlite::Result<()> {
    let columns = format!("tenant, seq, prev_hash, hash, {RECORD_COLUMNS}, record");
    let sql = format!(
        "BEGIN IMMEDIATE;
         ALTER TABLE checkpoints RENAME TO legacy_checkpoints;
         ALTER TABLE legacy_checkpoints ADD COLUMN relay TEXT NOT NULL DEFAULT '';
         ALTER TABLE records RENAME TO records_v1;
         DROP INDEX IF EXISTS records_time;
         {RECORDS_V2}
         {TABLES_V2}
         UPDATE meta SET value = '{SCHEMA_VERSION}' WHERE key = 'schema';"
    );
    let migrated = (|| {
        conn.execute_batch(&sql)?;
        conn.execute("UPDATE legacy_checkpoints SET relay = ?1", params![relay])?;
        conn.execute(
            &format!(
                "INSERT INTO records (id, relay, {columns}) SELECT id, ?1, {columns} FROM records_v1"
            ),
            params![relay],
        )?;
        conn.execute_batch("DROP TABLE records_v1; COMMIT;")
    })();
    if migrated.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    migrated
}

/// Opens a second connection to the trail for merging the WAL into the file
/// ([`wal_checkpoint`]) beside the writer, so commits never wait for that work.
pub fn open_wal_checkpointer(path: &Path) -> Result<Connection, AuditError> {
    let err = sql_error(path);
    let conn = Connection::open(path).map_err(&err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(&err)?;
    Ok(conn)
}

/// The largest the WAL file stays once it starts over (`journal_size_limit`): the space a
/// burst took is given back, down to room for a few merges' worth of frames.
pub const WAL_FILE_LIMIT: u64 = 16 << 20;

/// Merges what it can of the WAL into the file without waiting for readers or the writer
/// (`PASSIVE`): what SQLite's automatic checkpoint did inside a commit. Returns the frames the
/// WAL holds.
pub fn wal_checkpoint(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        row.get::<_, i64>(1)
    })
    .map(|frames| u64::try_from(frames).unwrap_or(0))
}

/// Merges the whole WAL and has the next commit start it over from its beginning
/// (`RESTART`), holding off the writer meanwhile and waiting at most `wait` for it and for
/// readers. Returns whether it finished (a busy writer or reader past `wait`: not this time).
///
/// Needed because a passive merge running beside a writer that never pauses never catches up
/// with it, and a WAL is only started over once a merge has: under steady appends it grew
/// without bound (44 MB after 3,000 commits in the unit test, 788 MB in an hour of benchmarks).
pub fn wal_restart(conn: &Connection, wait: Duration) -> rusqlite::Result<bool> {
    conn.busy_timeout(wait)?;
    let busy = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |row| {
        row.get::<_, i64>(0)
    });
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(busy? == 0)
}

/// Opens the trail read-only (works while a relay writes to it). Schema 1 files are read as
/// they are (one relay, named `""`).
pub fn open_reader(path: &Path) -> Result<Connection, AuditError> {
    let err = sql_error(path);
    if !path.exists() {
        return Err(AuditError::Database {
            path: path.to_owned(),
            message: "no such file".into(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(&err)?;
    match schema_version(&conn, path)?.as_deref() {
        Some(SCHEMA_VERSION | SCHEMA_V1) => Ok(conn),
        Some(v) => Err(AuditError::Database {
            path: path.to_owned(),
            message: format!(
                "schema version {v}, this build reads {SCHEMA_V1} and {SCHEMA_VERSION}"
            ),
        }),
        None => Err(AuditError::Database {
            path: path.to_owned(),
            message: "not an audit trail (no schema version)".into(),
        }),
    }
}

/// The schema version the file records (`None`: a new file).
pub fn schema_version(conn: &Connection, path: &Path) -> Result<Option<String>, AuditError> {
    conn.query_row("SELECT value FROM meta WHERE key = 'schema'", [], |row| {
        row.get(0)
    })
    .map(Some)
    .or_else(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => Ok(None),
        e => Err(e),
    })
    .map_err(|e| AuditError::Database {
        path: path.to_owned(),
        message: format!("not an audit trail ({e})"),
    })
}

/// Every tenant chain head of `relay`, as stored (`signed_seq` left 0: the caller sets it from
/// the relay's last checkpoint).
pub fn load_heads(conn: &Connection, relay: &str) -> rusqlite::Result<HashMap<String, Head>> {
    let mut heads: HashMap<String, Head> = HashMap::new();
    // SQLite returns the other columns of the row holding MAX() (documented bare-column rule).
    let mut rows = conn
        .prepare("SELECT tenant, MAX(seq), hash FROM records WHERE relay = ?1 GROUP BY tenant")?;
    for row in rows.query_map([relay], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, String>(2)?,
        ))
    })? {
        let (tenant, seq, hash) = row?;
        let hash = chain::parse_hash(&hash).ok_or_else(|| {
            rusqlite::Error::InvalidColumnType(2, "hash".into(), rusqlite::types::Type::Text)
        })?;
        heads.insert(
            tenant,
            Head {
                seq: u64::try_from(seq).unwrap_or(0),
                hash,
                signed_seq: 0,
            },
        );
    }
    Ok(heads)
}

/// The insert of one row, built once: the statement cache finds it by this text.
static INSERT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO records (relay, tenant, seq, prev_hash, hash, record, {RECORD_COLUMNS}) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, \
         ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27)"
    )
});

/// Starts the writer's transaction (`BEGIN IMMEDIATE`: the write lock now, not at the first
/// insert). A cached statement: rusqlite's `Transaction` parses `BEGIN` and `COMMIT` as SQL
/// text on every batch, which a profile of the relay showed (8.5% of its CPU at saturation).
pub fn begin(conn: &Connection) -> rusqlite::Result<()> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    Ok(())
}

/// [`begin`] without waiting for the write lock: `SQLITE_BUSY` at once if another connection
/// holds it (for a caller that must not block; it hands the write to a thread that may).
pub fn begin_now(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::ZERO)?;
    let begun = begin(conn);
    if let Err(e) = conn.busy_timeout(BUSY_TIMEOUT) {
        rollback(conn);
        return Err(e);
    }
    begun
}

/// Commits the writer's transaction ([`begin`]); on failure rolls it back, so the connection
/// is never left inside a transaction.
pub fn commit(conn: &Connection) -> rusqlite::Result<()> {
    let committed = conn
        .prepare_cached("COMMIT")
        .and_then(|mut stmt| stmt.execute([]));
    match committed {
        Ok(_) => Ok(()),
        Err(e) => {
            rollback(conn);
            Err(e)
        }
    }
}

/// Rolls back the writer's transaction, if one is open (after a failed insert or commit).
pub fn rollback(conn: &Connection) {
    if !conn.is_autocommit()
        && let Err(e) = conn
            .prepare_cached("ROLLBACK")
            .and_then(|mut s| s.execute([]))
    {
        tracing::warn!(error = %e, "audit rollback failed");
    }
}

/// Inserts one chained row (inside [`begin`] / [`commit`]). Binds the record's fields by
/// reference: nothing is copied but the roles' JSON and the two hashes' hex.
pub fn insert_record(
    conn: &Connection,
    relay: &str,
    seq: u64,
    prev: &[u8; 32],
    hash: &[u8; 32],
    bytes: &[u8],
    record: &Record,
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(&INSERT_SQL)?;
    let mut prev_hex = [0u8; 64];
    let mut hash_hex = [0u8; 64];
    // 32 bytes always fit 64 hex digits, which are ASCII.
    hex::encode_to_slice(prev, &mut prev_hex).expect("64 bytes hold 32 in hex");
    hex::encode_to_slice(hash, &mut hash_hex).expect("64 bytes hold 32 in hex");
    let prev_hex = std::str::from_utf8(&prev_hex).expect("hex digits are ASCII");
    let hash_hex = std::str::from_utf8(&hash_hex).expect("hex digits are ASCII");
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let roles = serde_json::Value::from(record.roles.clone()).to_string();
    let outcome_code = match record.outcome {
        super::Outcome::Error(code) => Some(code),
        _ => None,
    };
    // The order of RECORD_COLUMNS (and of `record_columns`, which `audit verify` compares).
    stmt.execute(params![
        relay,
        record.tenant,
        int(seq),
        prev_hex,
        hash_hex,
        bytes,
        int(record.time_ms),
        record.subject,
        roles,
        record.source,
        record.session,
        record.transport,
        record.protocol_version,
        record.direction.label(),
        record.method,
        record.request_id,
        record.tool,
        record.resource,
        record.prompt,
        record.decision.label(),
        record.rule,
        record.outcome.label(),
        outcome_code,
        int(record.latency_us),
        int(record.bytes_in),
        int(record.bytes_out),
        record.args_sha256,
    ])?;
    Ok(())
}

/// The `meta` key of how far the segment files are indexed ([`Mark`]).
const SEGMENT_MARK: &str = "segment";

/// How far the segment files are indexed (the start of generation 0 when never).
pub fn segment_mark(conn: &Connection) -> rusqlite::Result<Mark> {
    let text: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [SEGMENT_MARK],
            |row| row.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            e => Err(e),
        })?;
    match text {
        None => Ok(Mark::default()),
        Some(text) => Mark::parse(&text).ok_or_else(|| {
            rusqlite::Error::InvalidColumnType(
                0,
                "meta.segment".into(),
                rusqlite::types::Type::Text,
            )
        }),
    }
}

/// Records how far the segment files are indexed (inside the transaction that indexed the
/// rows, so the two never disagree).
pub fn set_segment_mark(conn: &Connection, mark: Mark) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")?
        .execute(params![SEGMENT_MARK, mark.to_text()])?;
    Ok(())
}

/// Indexes segment `rows` of `relay` (in file order) in one transaction with the `mark` after
/// them: both or neither.
pub fn index_rows(
    conn: &Connection,
    relay: &str,
    rows: &[Row],
    mark: Mark,
) -> rusqlite::Result<()> {
    begin(conn)?;
    let inserted = (|| {
        for row in rows {
            insert_record(
                conn,
                relay,
                row.seq,
                &row.prev,
                &row.hash,
                &row.bytes,
                &row.record,
            )?;
        }
        set_segment_mark(conn, mark)
    })();
    match inserted {
        Ok(()) => commit(conn),
        Err(e) => {
            rollback(conn);
            Err(e)
        }
    }
}

/// Inserts a signed checkpoint of the relay's chain.
pub fn insert_checkpoint(conn: &Connection, cp: &Checkpoint) -> rusqlite::Result<()> {
    let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    conn.execute(
        "INSERT INTO checkpoints (relay, n, prev, hash, kind, epoch, note, time_ms, interval_ms, \
         heads, public_key, signature) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            cp.relay,
            int(cp.n),
            cp.prev,
            cp.hash(),
            cp.kind.label(),
            int(cp.epoch),
            cp.note,
            int(cp.time_ms),
            int(cp.interval_ms),
            cp.heads_json(),
            cp.public_key,
            cp.signature
        ],
    )?;
    Ok(())
}

/// A checkpoint as stored: the checkpoint (or why its row is not one), its row id and the hash
/// column (which [`Checkpoint::hash`] must equal).
pub struct StoredCheckpoint {
    /// The row id.
    pub id: i64,
    /// The relay column.
    pub relay: String,
    /// The number column.
    pub n: u64,
    /// The `hash` column.
    pub stored_hash: String,
    /// The checkpoint, or what is wrong with the row (an unknown kind, heads that are not JSON).
    pub checkpoint: Result<Checkpoint, String>,
}

/// The columns [`read_checkpoint`] reads, in its order.
pub const CHECKPOINT_COLUMNS: &str = "id, relay, n, prev, hash, kind, epoch, note, time_ms, \
    interval_ms, heads, public_key, signature";

/// The columns of one checkpoint row as stored (in SQLite, or in the PostgreSQL trail, which
/// has the same ones but `id`), in the order of [`CHECKPOINT_COLUMNS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRow {
    /// The row id (0 where the table has none).
    pub id: i64,
    /// `relay`.
    pub relay: String,
    /// `n`.
    pub n: i64,
    /// `prev`.
    pub prev: String,
    /// `hash`.
    pub hash: String,
    /// `kind`.
    pub kind: String,
    /// `epoch`.
    pub epoch: i64,
    /// `note`.
    pub note: String,
    /// `time_ms`.
    pub time_ms: i64,
    /// `interval_ms`.
    pub interval_ms: i64,
    /// `heads` (JSON).
    pub heads: String,
    /// `public_key`.
    pub public_key: String,
    /// `signature`.
    pub signature: String,
}

impl CheckpointRow {
    /// The row as stored, with the checkpoint it holds (or what is wrong with it).
    pub fn parse(self) -> StoredCheckpoint {
        let int = |n: i64| u64::try_from(n).unwrap_or(0);
        let parsed = match (
            Kind::parse(&self.kind),
            serde_json::from_str::<Vec<HeadEntry>>(&self.heads),
        ) {
            (None, _) => Err(format!("unknown kind {:?}", self.kind)),
            (_, Err(e)) => Err(format!("the heads are not a list of heads: {e}")),
            (Some(kind), Ok(heads)) => Ok(Checkpoint {
                relay: self.relay.clone(),
                n: int(self.n),
                prev: self.prev,
                kind,
                epoch: int(self.epoch),
                note: self.note,
                time_ms: int(self.time_ms),
                interval_ms: int(self.interval_ms),
                heads,
                public_key: self.public_key,
                signature: self.signature,
            }),
        };
        StoredCheckpoint {
            id: self.id,
            relay: self.relay,
            n: int(self.n),
            stored_hash: self.hash,
            checkpoint: parsed,
        }
    }
}

/// One row of [`CHECKPOINT_COLUMNS`], as stored.
pub fn read_checkpoint_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<CheckpointRow> {
    Ok(CheckpointRow {
        id: row.get(0)?,
        relay: row.get(1)?,
        n: row.get(2)?,
        prev: row.get(3)?,
        hash: row.get(4)?,
        kind: row.get(5)?,
        epoch: row.get(6)?,
        note: row.get(7)?,
        time_ms: row.get(8)?,
        interval_ms: row.get(9)?,
        heads: row.get(10)?,
        public_key: row.get(11)?,
        signature: row.get(12)?,
    })
}

/// One row of [`CHECKPOINT_COLUMNS`].
pub fn read_checkpoint(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredCheckpoint> {
    read_checkpoint_row(row).map(CheckpointRow::parse)
}

/// Creates the tables of schema [`SCHEMA_VERSION`] in an empty database and records the
/// version: what a relay's first open does (without its WAL and key), for a copy of a trail
/// made elsewhere (the PostgreSQL trail's mirror, which `audit verify` reads).
pub fn create_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "BEGIN IMMEDIATE; {META} {RECORDS_V2} {TABLES_V2} \
         INSERT INTO meta (key, value) VALUES ('schema', '{SCHEMA_VERSION}'); COMMIT;"
    ))
}

/// The checkpoint of `relay` with the highest number, if any.
pub fn last_checkpoint(
    conn: &Connection,
    relay: &str,
) -> rusqlite::Result<Option<StoredCheckpoint>> {
    conn.query_row(
        &format!(
            "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints WHERE relay = ?1 ORDER BY n DESC LIMIT 1"
        ),
        [relay],
        read_checkpoint,
    )
    .map(Some)
    .or_else(|e| match e {
        rusqlite::Error::QueryReturnedNoRows => Ok(None),
        e => Err(e),
    })
}

/// Every checkpoint, relay by relay, in number order, in memory (for tests and small trails;
/// `audit checkpoints` and `verify` stream them instead).
pub fn all_checkpoints(conn: &Connection) -> rusqlite::Result<Vec<StoredCheckpoint>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {CHECKPOINT_COLUMNS} FROM checkpoints ORDER BY relay, n, id"
    ))?;
    stmt.query_map([], read_checkpoint)?.collect()
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
