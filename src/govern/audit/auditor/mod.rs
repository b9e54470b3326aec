//! [`Auditor`]: the relay's handle on the trail, and the writer thread behind it.
//!
//! When nothing is queued or being written and `durability = "commit"`, an append commits its
//! own row on the caller's thread (a few tens of µs of CPU, no fsync, never waiting on another
//! connection's lock): that skips the two thread wake-ups of the queue, which were about half
//! of the audit's added latency at low load (`examples/echo_latency.rs`: audited minus plain
//! p50 +0.115-0.130 ms before, +0.050-0.091 ms after, back to back). Otherwise, as below.
//!
//! Appends go through a bounded queue to one dedicated thread (not a tokio worker: SQLite
//! blocks). The thread waits on a std channel (a futex wake-up), not on a tokio runtime of its
//! own: that hand-off measured 15 µs at the median against 40 µs, and 50 µs at p99 against
//! 2-3 ms (`examples/echo_latency.rs`); room in the queue is a tokio semaphore so appends wait
//! for it without blocking. The thread takes everything queued, writes it in one transaction, and then
//! completes every waiting append (group commit). A full queue makes `append` wait; nothing is
//! dropped.
//!
//! Checkpoints (see [`super::checkpoint`]): [`Auditor::open`] checks the relay's own chain
//! ([`super::verify::check_start`]) and refuses a trail that does not verify unless
//! `new_epoch` is set, then signs a start (or epoch) checkpoint; after a commit that leaves a
//! tenant with [`AuditSettings::checkpoint_rows`] unsigned rows, and at least every
//! [`AuditSettings::checkpoint_secs`] while any row is unsigned, the next checkpoint signs the
//! head of every tenant; [`Auditor::close`] signs a close checkpoint. Each is also appended to
//! `[audit] checkpoint_file` when set.
//!
//! One module a concern: `open` (opening the trail, the start check and the run's first
//! checkpoint), `thread` (the writer thread and its group commit), `writer` (the state
//! behind the lock and how rows are written), `signing` (checkpoints as the writer signs
//! them, and the off-box copy), `wal` (the WAL merge thread). This file is the handle the
//! relay holds.

mod open;
mod signing;
#[cfg(test)]
pub(crate) mod tests;
mod thread;
mod wal;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::capture::{Capture, CaptureRules};
use super::postgres::Shipper;
use super::{AuditError, Record};
use crate::metrics as names;
use writer::{Writer, micros_since};

/// The longest an append waits for its row to be committed (queue wait included). Only a stuck
/// disk gets near it; the relay then answers the agent with an error rather than hang.
pub const APPEND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the trail must have been idle (no commit ending) for an append to commit inline:
/// longer than the gaps between appends under load (where the queue's group commit wins, as
/// one inline row per commit would cut the batches), shorter than a call's round trip at low
/// load (about 0.4 ms through the relay).
pub(super) const INLINE_IDLE: Duration = Duration::from_micros(100);

/// The longest [`Auditor::close`] waits for the writer to flush and sign.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// A handle on the audit trail; clones share one writer.
#[derive(Clone)]
pub struct Auditor {
    inner: Arc<Inner>,
}

struct Inner {
    queue: mpsc::Sender<Message>,
    /// The connection and chain heads, shared by the writer thread and inline appends.
    store: Arc<Mutex<Writer>>,
    /// Whether an append may commit its own row on the caller's thread when nothing else is
    /// being written (`durability = "commit"` only: no fsync, so the commit takes tens of
    /// microseconds of CPU and never waits on the disk).
    inline: bool,
    /// The queue's size: an idle writer has all of `room`'s permits.
    capacity: usize,
    /// When the last commit ended, in µs after `opened` (for [`INLINE_IDLE`]).
    last_write: Arc<AtomicU64>,
    opened: Instant,
    /// One permit per record the queue may hold; an append holds one until its row is written.
    room: Arc<Semaphore>,
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

#[allow(
    clippy::large_enum_variant,
    reason = "almost every message is an Append; boxing would add an allocation per call"
)]
enum Message {
    Append {
        /// Room in the queue, given back once the row is written.
        permit: OwnedSemaphorePermit,
        record: Record,
        done: oneshot::Sender<Result<(), AuditError>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

impl Auditor {
    /// Appends one record; resolves once the row is committed (so the relay can hold the
    /// agent's response until then). Concurrent appends share one transaction. Waits while the
    /// queue is full, at most [`APPEND_TIMEOUT`] in all.
    pub async fn append(&self, record: Record) -> Result<(), AuditError> {
        let started = Instant::now();
        if let Some(result) = self.append_inline(&record) {
            metrics::histogram!(names::AUDIT_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
            return result;
        }
        let (done, committed) = oneshot::channel();
        let result = tokio::time::timeout(APPEND_TIMEOUT, async {
            let permit = self
                .inner
                .room
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| AuditError::Closed)?;
            self.inner
                .queue
                .send(Message::Append {
                    permit,
                    record,
                    done,
                })
                .map_err(|_| AuditError::Closed)?;
            committed.await.map_err(|_| AuditError::Closed)?
        })
        .await
        .unwrap_or(Err(AuditError::Timeout(APPEND_TIMEOUT)));
        metrics::histogram!(names::AUDIT_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
        result
    }

    /// Commits `record` on the caller's thread if the writer is idle: nothing queued, nothing
    /// being written, the lock free and SQLite's write lock free. That saves the two thread
    /// wake-ups of the queue (to the writer and back to the waiting task), most of the audit's
    /// added latency at low load. `None` when the queue must take it (busy writer,
    /// `durability = "fsync"`), so concurrent appends still share one commit.
    fn append_inline(&self, record: &Record) -> Option<Result<(), AuditError>> {
        let inner = &self.inner;
        if !inner.inline || inner.room.available_permits() < inner.capacity {
            return None;
        }
        let idle =
            micros_since(inner.opened).saturating_sub(inner.last_write.load(Ordering::Relaxed));
        if idle < INLINE_IDLE.as_micros() as u64 {
            return None;
        }
        let mut writer = inner.store.try_lock()?;
        let result = writer.commit_one(record);
        inner
            .last_write
            .store(micros_since(inner.opened), Ordering::Relaxed);
        result
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
            if self.inner.queue.send(Message::Close { done }).is_ok() {
                let _ = closed.await;
            }
        })
        .await;
        if flushed.is_err() {
            tracing::warn!(path = %self.inner.path.display(), "audit trail did not close in time");
        }
    }
}
