//! [`Auditor`]: the relay's handle on the trail, and the threads behind it.
//!
//! An append puts the row on the segment file (see [`super::segment`]) on the caller's
//! thread, under one short lock ([`log::Log`]): chained on from its tenant's last row, one
//! `write`, no SQLite and no thread hand-off. With `durability = "commit"` that is all: the
//! row survives a crash of the relay process once `write` returns. With `"fsync"` the append
//! then waits until the file is synced past its row; one caller syncs for everyone waiting
//! (group commit) on a blocking thread. Either way the relay holds the agent's answer until
//! the append resolves.
//!
//! The indexer thread ([`index`]) copies the rows into SQLite in batches behind the calls and
//! signs checkpoints (see [`super::checkpoint`]): after a batch that leaves a tenant with
//! [`AuditSettings::checkpoint_rows`] unsigned rows, and at least every
//! [`AuditSettings::checkpoint_secs`] while any row is unsigned. Rows written and not yet
//! indexed are bounded by [`AuditSettings::queue`]: a full backlog makes appends wait. While
//! the database refuses rows, appends fail at once, naming why.
//!
//! [`Auditor::open`] indexes what a crash left in the segment files ([`recover`]), checks the
//! relay's own chain ([`super::verify::check_start`]) and refuses a trail that does not verify
//! unless `new_epoch` is set, then signs a start (or epoch) checkpoint; [`Auditor::close`]
//! indexes the rest and signs a close checkpoint. Each checkpoint is also appended to
//! `[audit] checkpoint_file` when set.
//!
//! One module a concern: `open` (opening the trail, the start check and the run's first
//! checkpoint), `recover` (a crash's rows), `log` (the call path's segment writer), `index`
//! (the indexer thread), `writer` (the database's side), `signing` (checkpoints and the
//! off-box copy), `wal` (the WAL merge thread). This file is the handle the relay holds.

#[cfg(test)]
mod crash_tests;
mod index;
mod log;
mod open;
mod recover;
mod signing;
#[cfg(test)]
pub(crate) mod tests;
mod wal;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{Semaphore, TryAcquireError, oneshot};

use super::capture::{Capture, CaptureRules};
use super::postgres::Shipper;
use super::{AuditError, Record, chain};
use crate::metrics as names;
use index::Wake;
use log::Log;

/// The longest an append waits for its row to be committed (queue wait included). Only a stuck
/// disk gets near it; the relay then answers the agent with an error rather than hang.
pub const APPEND_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest [`Auditor::close`] waits for the writer to flush and sign.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// A handle on the audit trail; clones share one writer.
#[derive(Clone)]
pub struct Auditor {
    inner: Arc<Inner>,
}

struct Inner {
    /// The segment file and the chains as written.
    log: Arc<Mutex<Log>>,
    /// Wakes the indexer thread.
    index: mpsc::Sender<Wake>,
    /// `durability = "fsync"`: an append waits until the file is synced past its row.
    durable: bool,
    /// The bytes of this run's segment writes known to be on disk.
    synced: AtomicU64,
    /// Held by the one caller syncing for everyone waiting.
    sync_gate: tokio::sync::Mutex<()>,
    /// One permit per row the backlog (written, not yet indexed) may hold; the indexer gives a
    /// row's permit back once the row is in the database.
    room: Arc<Semaphore>,
    /// Why indexing fails, while it does.
    failing: Arc<Mutex<Option<String>>>,
    capture: RwLock<CaptureRules>,
    path: PathBuf,
    /// Ships the trail to the fleet's database (`[audit] url`), if configured.
    shipper: Option<Shipper>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Auditor {
    /// Appends one record; resolves once the row is durable (written, and with
    /// `durability = "fsync"` synced), so the relay can hold the agent's answer until then.
    /// Waits while the backlog of rows to index is full, at most [`APPEND_TIMEOUT`] in all.
    pub async fn append(&self, record: Record) -> Result<(), AuditError> {
        let started = Instant::now();
        let result = tokio::time::timeout(APPEND_TIMEOUT, self.append_within(record))
            .await
            .unwrap_or(Err(AuditError::Timeout(APPEND_TIMEOUT)));
        metrics::histogram!(names::AUDIT_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
        result
    }

    async fn append_within(&self, record: Record) -> Result<(), AuditError> {
        let inner = &self.inner;
        // While the database refuses rows, calls are refused as they were when rows went
        // straight to it: what is in the segment then waits, and stays within a checkpoint
        // interval of the rows before it.
        if let Some(why) = inner.failing.lock().clone() {
            return Err(AuditError::Write {
                path: inner.path.clone(),
                message: format!("the database does not take rows: {why}"),
            });
        }
        match inner.room.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(TryAcquireError::Closed) => return Err(AuditError::Closed),
            Err(TryAcquireError::NoPermits) => {
                let permit = inner.room.acquire().await.map_err(|_| AuditError::Closed)?;
                permit.forget();
            }
        }
        let bytes = chain::canonical(&record);
        let appended = inner.log.lock().append(record, bytes);
        let (written, wake) = match appended {
            Ok(appended) => appended,
            Err(e) => {
                inner.room.add_permits(1);
                return Err(e);
            }
        };
        if wake {
            // The indexer is gone only after the close; the row is in the segment regardless.
            let _ = inner.index.send(Wake::Rows);
        }
        if inner.durable {
            self.sync_to(written).await?;
        }
        Ok(())
    }

    /// Waits until the segment is synced past `written` bytes of this run: the first waiter
    /// syncs everything written so far on a blocking thread, the others find it done.
    async fn sync_to(&self, written: u64) -> Result<(), AuditError> {
        let inner = &self.inner;
        if inner.synced.load(Ordering::Acquire) >= written {
            return Ok(());
        }
        let _syncing = inner.sync_gate.lock().await;
        if inner.synced.load(Ordering::Acquire) >= written {
            return Ok(());
        }
        let (target, handle) = inner.log.lock().sync_handle()?;
        let synced = tokio::task::spawn_blocking(move || handle.sync_data())
            .await
            .map_err(|_| AuditError::Closed)?;
        if let Err(e) = synced {
            let why = format!("syncing the segment file failed: {e}");
            inner.log.lock().break_off(why.clone());
            return Err(AuditError::Write {
                path: inner.path.clone(),
                message: why,
            });
        }
        inner.synced.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// Indexes every row appended so far into the database now, and resolves once it is (or
    /// once the indexer gave up on this batch): for readers of the database that must see
    /// every row, and tests.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.inner.index.send(Wake::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, flushed).await;
        }
    }

    /// What to keep of arguments and results for this tenant's source ([`Capture::keep`]
    /// applies it, redaction included).
    pub fn capture(&self, tenant: &str, source: &str) -> Capture {
        self.inner.capture.read().get(tenant, source)
    }

    /// Replaces the capture rules (configuration reload). The file, key and durability stay as
    /// opened.
    pub fn set_capture(&self, rules: CaptureRules) {
        *self.inner.capture.write() = rules;
    }

    /// The trail's file.
    pub fn path(&self) -> &std::path::Path {
        &self.inner.path
    }

    /// With `[audit] url` and `on_database_down = "refuse"`: why calls must be refused now
    /// (the database does not take rows); `None` while they may go on.
    pub fn refusal(&self) -> Option<String> {
        self.inner.shipper.as_ref()?.refusal()
    }

    /// Flushes pending rows and writes a final signed checkpoint (graceful shutdown), then,
    /// with `[audit] url`, ships what is left (within the shipper's own timeout). Appends
    /// after this fail with [`AuditError::Closed`]. Waits at most [`CLOSE_TIMEOUT`] for the
    /// trail.
    pub async fn close(&self) {
        self.close_trail().await;
        if let Some(shipper) = &self.inner.shipper {
            shipper.close().await;
        }
    }

    async fn close_trail(&self) {
        let (done, closed) = oneshot::channel();
        let flushed = tokio::time::timeout(CLOSE_TIMEOUT, async {
            if self.inner.index.send(Wake::Close(done)).is_ok() {
                let _ = closed.await;
            }
        })
        .await;
        if flushed.is_err() {
            tracing::warn!(path = %self.inner.path.display(), "audit trail did not close in time");
        }
    }
}
