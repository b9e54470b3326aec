//! What opening the audit trail takes. The relay builds it from `[audit]` and `[fleet]`; tests
//! and the demo start from [`AuditSettings::new`].

use std::path::PathBuf;
use std::time::Duration;

use super::capture::CaptureRules;
use super::postgres::OnDatabaseDown;
use crate::config;

/// How durable a committed row is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// A row is written to the segment file (one `write`) before its answer is released: it
    /// survives a crash of the relay process, not necessarily a power loss. The database
    /// behind it runs WAL with `synchronous = NORMAL`. The default: cheap, and what the relay
    /// promises agents.
    #[default]
    Commit,
    /// The segment file is also synced (`fdatasync`, one for every call waiting) before the
    /// answer is released, so rows survive power loss; the database runs with
    /// `synchronous = FULL`.
    Fsync,
}

/// The fleet's trail in PostgreSQL (`[audit] url`): the SQLite trail at
/// [`AuditSettings::path`] becomes the spool rows ship from. [`Durability`] keeps its meaning
/// for the spool (a row is durable there before its answer is released, whatever the
/// database does); the database's commits are always durable (`synchronous_commit = on` or
/// stronger) before the spool marks rows shipped.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseSettings {
    /// `postgresql://...` (see [`super::postgres::Target`]).
    pub url: String,
    /// The password's file, when `url` has none.
    pub password_file: Option<PathBuf>,
    /// Whether calls go on or are refused while the database does not take rows.
    pub on_down: OnDatabaseDown,
}

impl std::fmt::Debug for DatabaseSettings {
    /// Without the URL, which may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("password_file", &self.password_file)
            .field("on_down", &self.on_down)
            .finish_non_exhaustive()
    }
}

/// The audit trail's file, key, durability, checkpoint cadence, queue and capture rules.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditSettings {
    /// The SQLite file of the trail.
    pub path: PathBuf,
    /// How durable a committed row is.
    pub durability: Durability,
    /// The relay's Ed25519 checkpoint key (PKCS#8 PEM), created (mode 0600) if missing, its
    /// public key beside it as `KEY.pub`; `None`: `audit.key` next to `path`.
    pub key: Option<PathBuf>,
    /// A signed checkpoint is written for a tenant after this many new rows of it.
    pub checkpoint_rows: u64,
    /// ... and at least this often (seconds) while a tenant has unsigned rows.
    pub checkpoint_secs: u64,
    /// Records waiting for the writer at most; a full queue makes appends wait.
    pub queue: usize,
    /// Per tenant and source: how much of arguments and results to keep.
    pub capture: CaptureRules,
    /// A file every signed checkpoint is appended to, one JSON line each (the off-box copy).
    pub checkpoint_file: Option<PathBuf>,
    /// This relay instance's name in the trail (its chains are keyed by it); `None`: the host
    /// name (see [`super::relay_instance`]).
    pub relay_id: Option<String>,
    /// Begin a new epoch if the trail does not verify at start, instead of refusing to start
    /// (`relay --new-audit-epoch`).
    pub new_epoch: bool,
    /// Ship the trail to PostgreSQL (`[audit] url`); `None`: the SQLite file is the trail.
    pub database: Option<DatabaseSettings>,
}

impl AuditSettings {
    /// A trail at `path` with the defaults `[audit]` has: a checkpoint per 1000 rows of a
    /// tenant and at least every minute, a queue of 4096 records, metadata only.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            durability: Durability::default(),
            key: None,
            checkpoint_rows: config::DEFAULT_CHECKPOINT_ROWS,
            checkpoint_secs: config::DEFAULT_CHECKPOINT_SECS,
            queue: config::DEFAULT_AUDIT_QUEUE,
            capture: CaptureRules::default(),
            checkpoint_file: None,
            relay_id: None,
            new_epoch: false,
            database: None,
        }
    }

    /// The checkpoint key's file: `key`, or `audit.key` next to the database.
    pub fn key_path(&self) -> PathBuf {
        config::audit_key_path(&self.path, self.key.as_deref())
    }

    /// The checkpoint interval.
    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_secs(self.checkpoint_secs)
    }
}
