//! The trail's state behind one lock ([`Writer`]): the connection, the key, where each tenant
//! chain stands; and how rows are written: in batches from the queue ([`Writer::commit`]) or
//! one at a time on the caller's thread ([`Writer::commit_one`]), chained on from the heads
//! and applied to them only once committed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::signing::{ChainState, CheckpointFile};
use super::thread::Taken;
use super::wal::WalCheckpointer;
use crate::govern::audit::checkpoint::Kind;
use crate::govern::audit::key::CheckpointKey;
use crate::govern::audit::store::{self, Head};
use crate::govern::audit::{AuditError, Record, chain};
use crate::metrics as names;

/// The trail's state, behind one lock: the connection, the key, and where each chain stands.
pub(super) struct Writer {
    /// `None` once closed.
    pub(super) conn: Option<Connection>,
    pub(super) path: PathBuf,
    pub(super) key: CheckpointKey,
    pub(super) heads: HashMap<String, Head>,
    pub(super) checkpoint_rows: u64,
    pub(super) checkpoint_interval: Duration,
    pub(super) last_checkpoint: Instant,
    /// Merges the WAL into the file beside the writer; taken at the close.
    pub(super) wal: Option<WalCheckpointer>,
    /// This relay instance: the key of its chains and of its checkpoint chain.
    pub(super) relay: String,
    /// Where its checkpoint chain stands.
    pub(super) chain: ChainState,
    /// The off-box copy, if configured.
    pub(super) checkpoint_file: Option<CheckpointFile>,
}

impl Writer {
    /// Commits one record on the caller's thread ([`Auditor::append_inline`]), and signs a
    /// checkpoint if one is now due (once in [`AuditSettings::checkpoint_rows`] rows, so
    /// checkpoints stay exactly that many rows apart). Never waits on another connection's
    /// lock: `None` then, nothing written, for the queue to retry.
    pub(super) fn commit_one(&mut self, record: &Record) -> Option<Result<(), AuditError>> {
        let Some(conn) = &self.conn else {
            return Some(Err(AuditError::Closed));
        };
        // The writer's own BEGIN IMMEDIATE waits up to BUSY_TIMEOUT for the write lock; a tokio
        // worker must not, so this one fails at once and the thread waits instead.
        if let Err(e) = store::begin_now(conn) {
            if is_busy(&e) {
                return None;
            }
            tracing::error!(path = %self.path.display(), error = %e, rows = 1, "audit write failed");
            return Some(Err(self.write_error(&e)));
        }
        metrics::histogram!(names::AUDIT_BATCH_ROWS).record(1.0);
        let result = match write_rows(conn, &self.relay, &self.heads, std::iter::once(record)) {
            Ok(heads) => {
                self.heads.extend(heads);
                if let Some(wal) = &mut self.wal {
                    wal.wrote(1);
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, rows = 1, "audit write failed");
                Err(self.write_error(&e))
            }
        };
        self.checkpoint_if_due();
        Some(result)
    }

    /// The error an append gets when the trail could not write.
    pub(super) fn write_error(&self, e: &rusqlite::Error) -> AuditError {
        AuditError::Write {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Writes `appends` in one transaction and completes each with the outcome.
    pub(super) fn commit(&mut self, appends: &mut Vec<Taken>) {
        metrics::histogram!(names::AUDIT_BATCH_ROWS).record(appends.len() as f64);
        let Some(conn) = &self.conn else {
            for (_, _, done) in appends.drain(..) {
                let _ = done.send(Err(AuditError::Closed));
            }
            return;
        };
        let result = store::begin(conn).and_then(|()| {
            write_rows(
                conn,
                &self.relay,
                &self.heads,
                appends.iter().map(|(_, r, _)| r),
            )
        });
        let failure = match result {
            Ok(heads) => {
                self.heads.extend(heads);
                if let Some(wal) = &mut self.wal {
                    wal.wrote(appends.len() as u64);
                }
                None
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, rows = appends.len(), "audit write failed");
                Some(e.to_string())
            }
        };
        for (_, _, done) in appends.drain(..) {
            let outcome = match &failure {
                None => Ok(()),
                Some(message) => Err(AuditError::Write {
                    path: self.path.clone(),
                    message: message.clone(),
                }),
            };
            // The appender may have timed out and gone; nothing to tell it then.
            let _ = done.send(outcome);
        }
    }

    /// Signs every head (a close checkpoint, so the trail shows the run ended cleanly) and
    /// closes the file (merging the WAL into it), so the file is complete on its own once this
    /// returns: the graceful end.
    pub(super) fn finish(&mut self) {
        if let Err(e) = self.checkpoint(Kind::Close, "", true) {
            tracing::warn!(path = %self.path.display(), error = %e, "audit close checkpoint failed");
        }
        if let Some(wal) = self.wal.take() {
            wal.stop();
        }
        match self.conn.take().map(Connection::close) {
            None => {}
            Some(Ok(())) => tracing::info!(path = %self.path.display(), "audit trail closed"),
            Some(Err((_, e))) => {
                tracing::warn!(path = %self.path.display(), error = %e, "closing the audit trail failed")
            }
        }
    }
}

/// Microseconds from `start` to now.
pub(super) fn micros_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Whether SQLite refused for another connection's lock.
fn is_busy(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
}

/// Inserts `records` chained after `heads` in the transaction the caller began
/// ([`store::begin`]) and commits it (or rolls it back); returns the new heads of the tenants
/// written (applied by the caller only once committed).
fn write_rows<'a>(
    conn: &Connection,
    relay: &str,
    heads: &HashMap<String, Head>,
    records: impl Iterator<Item = &'a Record>,
) -> rusqlite::Result<HashMap<String, Head>> {
    let mut moved: HashMap<String, Head> = HashMap::new();
    let inserted = (|| {
        for record in records {
            let head = match moved.get_mut(&record.tenant) {
                Some(head) => head,
                None => moved
                    .entry(record.tenant.clone())
                    .or_insert_with(|| heads.get(&record.tenant).copied().unwrap_or_default()),
            };
            let seq = head.seq + 1;
            let bytes = chain::canonical(record);
            let hash = chain::row_hash(&head.hash, seq, &bytes);
            store::insert_record(conn, relay, seq, &head.hash, &hash, &bytes, record)?;
            head.seq = seq;
            head.hash = hash;
        }
        Ok(())
    })();
    match inserted {
        Ok(()) => store::commit(conn)?,
        Err(e) => {
            store::rollback(conn);
            return Err(e);
        }
    }
    Ok(moved)
}
