//! The audit trail: a tamper-evident record of every call through the relay.
//!
//! The relay builds a [`Record`] per request and hands it to [`Auditor::append`], which
//! resolves once the row is durable in the segment file ([`segment`]: one `write`, and with
//! `durability = "fsync"` a sync shared by every call waiting), so the relay can hold the
//! agent's answer until the trail has it. An indexer thread copies the rows into the SQLite
//! file (WAL) in batches behind the calls; readers read the database and the rows past its
//! mark in the segment file.
//!
//! Each (relay instance, tenant) pair's rows form a hash chain (see [`chain`]), and each relay
//! signs a numbered, hash-linked chain of checkpoints over the heads of all its tenant chains
//! with its Ed25519 key (see [`checkpoint`]), so a changed, deleted or reordered row, a deleted
//! checkpoint, a deleted tenant or a rewritten chain is found by [`verify()`]
//! (`mcp-tunnel audit verify`). [`query`] reads the trail for
//! `audit tail` and `audit export`, also while a relay writes to it.
//!
//! How much of arguments and results a row keeps is set per tenant and source ([`Capture`]);
//! by default only metadata and a digest of the arguments.

mod auditor;
pub mod capture;
pub mod chain;
pub mod checkpoint;
pub mod key;
pub mod postgres;
pub mod query;
pub mod record;
pub mod segment;
mod settings;
pub mod store;
mod trail;
pub mod verify;

use std::path::PathBuf;
use std::time::Duration;

pub use auditor::{APPEND_TIMEOUT, Auditor, CLOSE_TIMEOUT};
pub use capture::{Capture, CaptureRules, REDACTED, redact_json};
pub use query::{Filter, Reader, StoredRow, export, tail};
pub use record::{Direction, Outcome, Record, Verdict, digest};
pub use settings::{AuditSettings, DatabaseSettings, Durability};
pub use trail::Trail;
pub use verify::{Problem, ProblemKind, Report, verify};

/// Why the audit trail could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The database could not be opened, is not an audit trail, or a query failed.
    #[error("audit trail {path}: {message}")]
    Database {
        /// The SQLite file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The checkpoint key (or a public key file) could not be read, created or used.
    #[error("audit key {path}: {message}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Committing rows failed: the record was not stored.
    #[error("audit trail {path}: writing failed: {message}")]
    Write {
        /// The SQLite file.
        path: PathBuf,
        /// What SQLite said.
        message: String,
    },
    /// The database holds a row or checkpoint of this relay with another hash: its chains
    /// forked (two relays with one `[fleet] id`, or a spool replaced or restored from an old
    /// copy) or the database was altered. Shipping cannot go on until an operator acts.
    #[error("audit database {database}: {message}")]
    Forked {
        /// The database (without its password).
        database: String,
        /// Which row or checkpoint, and what to do.
        message: String,
    },
    /// The trail was closed (shutdown) before the record was queued or committed.
    #[error("the audit trail is closed")]
    Closed,
    /// The record was not committed in time (queue full and the disk stuck). It may still be
    /// committed later.
    #[error("the audit trail did not commit the record within {0:?}")]
    Timeout(Duration),
    /// The writer thread could not be started.
    #[error("cannot start the audit writer thread: {0}")]
    Thread(std::io::Error),
    /// Writing output (`tail`, `export`) failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    /// A filter or time argument is not understood.
    #[error("{0}")]
    Argument(String),
    /// The relay will not write to a trail whose last checkpoint does not verify (it would
    /// sign over whatever was changed) unless told to begin a new epoch.
    #[error(
        "audit trail {path}: {reason}; refusing to sign over it. Check it with `mcp-tunnel audit \
         verify`; to go on writing, start the relay with --new-audit-epoch (the trail records \
         the new epoch and why)"
    )]
    Untrusted {
        /// The SQLite file.
        path: PathBuf,
        /// What does not verify.
        reason: String,
    },
}

/// This relay instance's name in the trail: `fleet_id` when set, else `HOST:PORT` from the
/// host name and the tunnel listen port (stable across restarts of one relay, distinct for
/// relays sharing a host).
pub fn relay_instance(fleet_id: Option<&str>, tunnel_port: u16) -> String {
    if let Some(id) = fleet_id {
        return id.to_owned();
    }
    format!("{}:{tunnel_port}", host_name())
}

/// The machine's host name (`localhost` if it cannot be read).
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if !name.is_empty() => name.to_owned(),
        _ => "localhost".into(),
    }
}
