//! `[audit]`: the audit trail's file (or database), key, durability and what it keeps per
//! source.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// `[audit]`: where and how the relay keeps its audit trail.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// The SQLite file of the audit trail; with `url`, the local spool rows wait in until the
    /// database has them (default: `audit-spool.db` beside the configuration file).
    #[serde(default)]
    pub path: PathBuf,
    /// The fleet's trail in PostgreSQL: `postgresql://USER[:PASSWORD]@HOST:PORT/DB`, with
    /// `?sslmode=` and `sslrootcert=` as libpq names them. Rows are durable in `path` before
    /// an answer is released and ship to the database in the background.
    #[serde(default)]
    pub url: Option<DatabaseUrl>,
    /// A file whose first line is the database password, when `url` has none (else the
    /// `PGPASSWORD` environment variable).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// With `url`: whether calls go on (`"spool"`, the default) or are refused (`"refuse"`)
    /// while the database does not take rows.
    #[serde(default)]
    pub on_database_down: OnDatabaseDown,
    /// How durable a committed row is.
    #[serde(default)]
    pub durability: Durability,
    /// The relay's Ed25519 checkpoint key (PKCS#8 PEM), created (mode 0600) if missing; its
    /// public key is written beside it as `KEY.pub`. Default: `audit.key` next to `path`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// A signed checkpoint is written for a tenant after this many new rows of it.
    #[serde(default = "default_checkpoint_rows")]
    pub checkpoint_rows: u64,
    /// ... and at least this often (seconds) while a tenant has unsigned rows.
    #[serde(default = "default_checkpoint_secs")]
    pub checkpoint_secs: u64,
    /// Records waiting for the writer at most; a full queue makes appends wait.
    #[serde(default = "default_audit_queue")]
    pub queue: usize,
    /// Per tenant and source: how much of arguments and results to keep.
    #[serde(default)]
    pub sources: Vec<AuditSourceSection>,

    // --- Checkpoint chain and epochs (issue 13, item 5) ---
    /// A file the relay appends every signed checkpoint to, one JSON line each: the off-box
    /// copy (`audit verify --checkpoints FILE`) once shipped or mounted elsewhere. None: off.
    #[serde(default)]
    pub checkpoint_file: Option<PathBuf>,
}

/// `[audit] durability`: what a committed row survives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
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

/// `[audit] url`: printed (`Debug`) without its text, which may hold a password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl(..)")
    }
}

/// `[audit] on_database_down`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDatabaseDown {
    /// Calls go on; their rows wait in the spool and ship once the database answers.
    #[default]
    Spool,
    /// Calls are refused (fail closed) while the database does not answer or has not taken
    /// rows for a while.
    Refuse,
}

/// The spool's file name (beside the configuration file) when `[audit] url` is set without
/// `path`.
pub const DEFAULT_SPOOL_FILE: &str = "audit-spool.db";

/// `[[audit.sources]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSourceSection {
    /// The tenant.
    pub tenant: String,
    /// The source (of that tenant).
    pub source: String,
    /// How much to keep.
    #[serde(default)]
    pub level: AuditLevel,
    /// Keys whose values become `"[REDACTED]"` anywhere in kept arguments and results.
    #[serde(default)]
    pub redact: Vec<String>,
}

/// `[[audit.sources]] level`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditLevel {
    /// Method, names, outcome, sizes and the arguments' digest; never the arguments.
    #[default]
    Metadata,
    /// Metadata plus the arguments and results, redacted.
    Full,
}

/// Default [`AuditSection::checkpoint_rows`]: a checkpoint per thousand rows keeps the unsigned
/// tail short without a signature per call (a signature costs about 20 µs).
pub const DEFAULT_CHECKPOINT_ROWS: u64 = 1000;
/// Default [`AuditSection::checkpoint_secs`]: a quiet tenant's last rows are signed within a
/// minute.
pub const DEFAULT_CHECKPOINT_SECS: u64 = 60;
/// Default [`AuditSection::queue`]: enough for a burst of a few thousand calls per second while
/// one commit is on disk; records are small (metadata), so this bounds memory at a few MiB.
pub const DEFAULT_AUDIT_QUEUE: usize = 4096;

fn default_checkpoint_rows() -> u64 {
    DEFAULT_CHECKPOINT_ROWS
}

fn default_checkpoint_secs() -> u64 {
    DEFAULT_CHECKPOINT_SECS
}

fn default_audit_queue() -> usize {
    DEFAULT_AUDIT_QUEUE
}

/// The checkpoint key's file of the trail at `path`: `key`, or `audit.key` next to the
/// database. One rule for `[audit]` and the audit settings the relay opens the trail with.
pub fn audit_key_path(path: &Path, key: Option<&Path>) -> PathBuf {
    match key {
        Some(key) => key.to_owned(),
        None => path.with_file_name("audit.key"),
    }
}

impl AuditSection {
    /// A section with every default and the trail at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            url: None,
            password_file: None,
            on_database_down: OnDatabaseDown::default(),
            durability: Durability::default(),
            key: None,
            checkpoint_rows: DEFAULT_CHECKPOINT_ROWS,
            checkpoint_secs: DEFAULT_CHECKPOINT_SECS,
            queue: DEFAULT_AUDIT_QUEUE,
            sources: Vec::new(),
            checkpoint_file: None,
        }
    }

    /// The checkpoint key's file: `key`, or `audit.key` next to the database.
    pub fn key_path(&self) -> PathBuf {
        audit_key_path(&self.path, self.key.as_deref())
    }

    /// The checkpoint interval.
    pub fn checkpoint_interval(&self) -> Duration {
        Duration::from_secs(self.checkpoint_secs)
    }

    /// Fills in what defaults to a place beside the configuration file in `base` and makes
    /// relative paths relative to it.
    pub fn resolve(&mut self, base: &Path) {
        if self.path.as_os_str().is_empty() && self.url.is_some() {
            self.path = PathBuf::from(DEFAULT_SPOOL_FILE);
        }
        if !self.path.as_os_str().is_empty() {
            self.path = base.join(&self.path);
        }
        self.key = self.key.as_ref().map(|key| base.join(key));
        self.checkpoint_file = self.checkpoint_file.as_ref().map(|f| base.join(f));
        self.password_file = self.password_file.as_ref().map(|f| base.join(f));
    }

    /// Checks values serde cannot: positive limits, one entry per tenant and source.
    pub fn validate(&self) -> Result<(), String> {
        if self.path.as_os_str().is_empty() {
            return Err("audit: set path (a SQLite file) or url (a PostgreSQL database)".into());
        }
        if let Some(DatabaseUrl(url)) = &self.url
            && !(url.starts_with("postgresql://") || url.starts_with("postgres://"))
        {
            return Err("audit.url must be a postgresql:// URL".into());
        }
        if self.url.is_none() && self.on_database_down != OnDatabaseDown::Spool {
            return Err("audit.on_database_down applies only with audit.url".into());
        }
        if self.url.is_none() && self.password_file.is_some() {
            return Err("audit.password_file applies only with audit.url".into());
        }
        if self.checkpoint_rows == 0 {
            return Err("audit.checkpoint_rows must be at least 1".into());
        }
        if self.checkpoint_secs == 0 {
            return Err("audit.checkpoint_secs must be at least 1".into());
        }
        if self.queue == 0 {
            return Err("audit.queue must be at least 1".into());
        }
        let mut seen = HashSet::new();
        for source in &self.sources {
            if source.tenant.is_empty() || source.source.is_empty() {
                return Err("audit.sources: tenant and source must not be empty".into());
            }
            if !seen.insert((source.tenant.as_str(), source.source.as_str())) {
                return Err(format!(
                    "audit.sources: tenant {} source {} is listed twice",
                    source.tenant, source.source
                ));
            }
            if source.redact.iter().any(String::is_empty) {
                return Err(format!(
                    "audit.sources: tenant {} source {}: an empty redact key",
                    source.tenant, source.source
                ));
            }
        }
        Ok(())
    }
}
