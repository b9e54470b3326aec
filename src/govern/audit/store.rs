//! The SQLite file: schema, opening for the writer (WAL) or a reader, and the writer's
//! statements. One row per record in `records`; signed chain heads in `checkpoints`; the
//! relay's public keys in `keys`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::{Connection, OpenFlags, params};

use super::chain::{self, GENESIS};
use super::{AuditError, Record};
use crate::config::Durability;

/// The schema this code writes and reads (in `meta`).
pub const SCHEMA_VERSION: &str = "1";

/// How long a statement waits for a lock another connection holds (a reader's WAL checkpoint,
/// a second writer by mistake) before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    public_key TEXT PRIMARY KEY,
    added_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
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
    UNIQUE (tenant, seq)
);
CREATE INDEX IF NOT EXISTS records_time ON records (time_ms);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    public_key TEXT NOT NULL,
    signature TEXT NOT NULL
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

fn sql_error(path: &Path) -> impl Fn(rusqlite::Error) -> AuditError + '_ {
    move |e| AuditError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// Opens (creating if needed) the trail for writing: WAL, the durability's `synchronous`, the
/// schema, and `public_key` recorded in `keys`.
pub fn open_writer(
    path: &Path,
    durability: Durability,
    public_key: &str,
) -> Result<Connection, AuditError> {
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
    conn.execute_batch(SCHEMA).map_err(&err)?;
    check_schema(&conn, path, true)?;
    conn.execute(
        "INSERT OR IGNORE INTO keys (public_key, added_ms) VALUES (?1, ?2)",
        params![public_key, now_ms() as i64],
    )
    .map_err(&err)?;
    Ok(conn)
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

/// Opens the trail read-only (works while a relay writes to it).
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
    check_schema(&conn, path, false)?;
    Ok(conn)
}

/// Checks (or, for a new file, sets) the schema version.
fn check_schema(conn: &Connection, path: &Path, write: bool) -> Result<(), AuditError> {
    let err = sql_error(path);
    let version: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |row| {
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
        })?;
    match version {
        Some(v) if v == SCHEMA_VERSION => Ok(()),
        Some(v) => Err(AuditError::Database {
            path: path.to_owned(),
            message: format!("schema version {v}, this build reads {SCHEMA_VERSION}"),
        }),
        None if write => {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                [SCHEMA_VERSION],
            )
            .map_err(&err)?;
            Ok(())
        }
        None => Err(AuditError::Database {
            path: path.to_owned(),
            message: "not an audit trail (no schema version)".into(),
        }),
    }
}

/// Every tenant's chain head and last checkpoint, as stored.
pub fn load_heads(conn: &Connection) -> rusqlite::Result<HashMap<String, Head>> {
    let mut heads: HashMap<String, Head> = HashMap::new();
    // SQLite returns the other columns of the row holding MAX() (documented bare-column rule).
    let mut rows = conn.prepare("SELECT tenant, MAX(seq), hash FROM records GROUP BY tenant")?;
    for row in rows.query_map([], |row| {
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
    let mut rows = conn.prepare("SELECT tenant, MAX(seq) FROM checkpoints GROUP BY tenant")?;
    for row in rows.query_map([], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
    })? {
        let (tenant, seq) = row?;
        if let Some(head) = heads.get_mut(&tenant) {
            head.signed_seq = u64::try_from(seq).unwrap_or(0);
        }
    }
    Ok(heads)
}

/// The insert of one row, built once: the statement cache finds it by this text.
static INSERT_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "INSERT INTO records (tenant, seq, prev_hash, hash, record, {RECORD_COLUMNS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, \
         ?20, ?21, ?22, ?23, ?24, ?25, ?26)"
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

/// One signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// When it was signed, ms since the epoch.
    pub time_ms: u64,
    /// The tenant.
    pub tenant: String,
    /// The tenant's last row at that time.
    pub seq: u64,
    /// That row's hash, hex.
    pub hash: String,
    /// The signing key, hex.
    pub public_key: String,
    /// The Ed25519 signature of [`chain::checkpoint_message`], hex.
    pub signature: String,
}

/// Inserts a checkpoint.
pub fn insert_checkpoint(tx: &Connection, cp: &Checkpoint) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO checkpoints (time_ms, tenant, seq, hash, public_key, signature) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            cp.time_ms as i64,
            cp.tenant,
            cp.seq as i64,
            cp.hash,
            cp.public_key,
            cp.signature
        ],
    )?;
    Ok(())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
