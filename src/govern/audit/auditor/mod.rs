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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use rusqlite::{Connection, TransactionBehavior};
use std::sync::mpsc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::capture::{Capture, CaptureRules};
use super::chain;
use super::checkpoint::{Checkpoint, HeadEntry, Kind};
use super::key::CheckpointKey;
use super::settings::{AuditSettings, Durability};
use super::store::{self, Head};
use super::{AuditError, Record};
use crate::metrics as names;

/// The longest an append waits for its row to be committed (queue wait included). Only a stuck
/// disk gets near it; the relay then answers the agent with an error rather than hang.
pub const APPEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Rows written between two merges of the WAL into the file. A metadata row changes three
/// pages (the table and its two indexes), so this keeps the WAL near SQLite's default
/// automatic checkpoint of 1,000 pages.
pub const WAL_CHECKPOINT_ROWS: u64 = 300;

/// WAL frames (4 KiB pages, so 16 MiB) past which a merge also starts the WAL over: at
/// [`WAL_CHECKPOINT_ROWS`] rows of up to four frames between merges, a few merges' worth. A
/// WAL that a passive merge caught up with starts over by itself; this bounds one that never
/// does under steady appends.
pub const WAL_RESTART_FRAMES: u64 = 4096;

/// The longest a restart of the WAL waits for the writer's transaction and for readers to let
/// go of the WAL (appends wait meanwhile); past it, the next merge tries again.
pub const WAL_RESTART_WAIT: Duration = Duration::from_millis(100);

/// How long the trail must have been idle (no commit ending) for an append to commit inline:
/// longer than the gaps between appends under load (where the queue's group commit wins, as
/// one inline row per commit would cut the batches), shorter than a call's round trip at low
/// load (about 0.4 ms through the relay).
pub const INLINE_IDLE: Duration = Duration::from_micros(100);

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
    /// Opens or creates the trail at `config.path` (SQLite, WAL; a schema 1 file is migrated),
    /// loads or creates the relay's Ed25519 checkpoint key, checks the relay's own chains
    /// (refusing with [`AuditError::Untrusted`] a trail whose last checkpoint does not verify,
    /// unless `config.new_epoch`), signs the run's first checkpoint and starts the writer
    /// thread. Errors name the file and problem.
    pub fn open(config: &AuditSettings) -> Result<Auditor, AuditError> {
        let path = config.path.clone();
        let key = CheckpointKey::load_or_create(&config.key_path())?;
        let relay = config
            .relay_id
            .clone()
            .unwrap_or_else(|| super::relay_instance(None, 0));
        let (conn, migrated) =
            store::open_writer(&path, config.durability, key.public_hex(), &relay)?;
        let db_error = |e: rusqlite::Error| AuditError::Database {
            path: path.clone(),
            message: e.to_string(),
        };
        let heads = store::load_heads(&conn, &relay).map_err(db_error)?;
        let last = store::last_checkpoint(&conn, &relay).map_err(db_error)?;
        let verdict =
            super::verify::check_start(&conn, &relay, key.public_hex(), &heads, last.as_ref())
                .map_err(db_error)?;
        let last_epoch = last
            .as_ref()
            .and_then(|l| l.checkpoint.as_ref().ok())
            .map(|c| c.epoch);
        let (kind, note, epoch) = match verdict {
            Ok(()) => {
                if config.new_epoch {
                    tracing::warn!(path = %path.display(), "the audit trail verifies: no new epoch begun (--new-audit-epoch ignored)");
                }
                let note = if migrated {
                    "migrated from schema 1: rows before this checkpoint were signed by per-tenant checkpoints only"
                } else {
                    ""
                };
                (Kind::Start, note.to_owned(), last_epoch.unwrap_or(1))
            }
            Err(reason) if config.new_epoch => {
                tracing::warn!(path = %path.display(), relay, %reason, "the audit trail does not verify: beginning a new epoch (--new-audit-epoch)");
                (Kind::Epoch, reason, last_epoch.unwrap_or(1) + 1)
            }
            Err(reason) => {
                return Err(AuditError::Untrusted {
                    path: path.clone(),
                    reason,
                });
            }
        };
        let chain = ChainState {
            n: last.as_ref().map_or(0, |l| l.n),
            hash: last.as_ref().map_or_else(
                || super::checkpoint::GENESIS_HEX.to_owned(),
                |l| match &l.checkpoint {
                    Ok(cp) => cp.hash(),
                    Err(_) => l.stored_hash.clone(),
                },
            ),
            epoch,
        };
        let checkpoint_file = config
            .checkpoint_file
            .as_deref()
            .map(|file| CheckpointFile::open(file, config.durability))
            .transpose()?;
        tracing::info!(
            path = %path.display(),
            relay,
            tenants = heads.len(),
            durability = ?config.durability,
            "audit trail open"
        );
        let wal = WalCheckpointer::start(&path, WAL_RESTART_FRAMES)?;
        let (queue, rx) = mpsc::channel();
        let room = Arc::new(Semaphore::new(config.queue));
        let mut writer = Writer {
            conn: Some(conn),
            path: path.clone(),
            key,
            heads,
            checkpoint_rows: config.checkpoint_rows,
            checkpoint_interval: config.checkpoint_interval(),
            last_checkpoint: Instant::now(),
            wal: Some(wal),
            relay,
            chain,
            checkpoint_file,
        };
        // The run's first checkpoint: signs every head as found (a crash tail the check above
        // accepted included), so every row this relay writes follows one of its checkpoints.
        writer
            .checkpoint(kind, &note, true)
            .map_err(|e| writer.write_error(&e))?;
        let store = Arc::new(Mutex::new(writer));
        let opened = Instant::now();
        let last_write = Arc::new(AtomicU64::new(0));
        let thread = WriterThread {
            store: store.clone(),
            last_write: last_write.clone(),
            opened,
            room: room.clone(),
            capacity: config.queue,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || thread.run(rx))
            .map_err(AuditError::Thread)?;
        Ok(Auditor {
            inner: Arc::new(Inner {
                queue,
                store,
                inline: config.durability == Durability::Commit,
                capacity: config.queue,
                last_write,
                opened,
                room,
                capture: RwLock::new(config.capture.clone()),
                path,
            }),
        })
    }

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
        let mut writer = inner.store.try_lock().ok()?;
        let result = writer.commit_one(record);
        inner
            .last_write
            .store(micros_since(inner.opened), Ordering::Relaxed);
        result
    }

    /// What to keep of arguments and results for this tenant's source ([`Capture::keep`]
    /// applies it, redaction included).
    pub fn capture(&self, tenant: &str, source: &str) -> Capture {
        // A poisoned lock means a panic while swapping rules; the old rules are still whole.
        let rules = self
            .inner
            .capture
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        rules.get(tenant, source)
    }

    /// Replaces the capture rules (configuration reload). The file, key and durability stay as
    /// opened.
    pub fn set_capture(&self, rules: CaptureRules) {
        *self
            .inner
            .capture
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = rules;
    }

    /// The trail's file.
    pub fn path(&self) -> &std::path::Path {
        &self.inner.path
    }

    /// Flushes pending rows and writes a final signed checkpoint (graceful shutdown). Appends
    /// after this fail with [`AuditError::Closed`]. Waits at most [`CLOSE_TIMEOUT`].
    pub async fn close(&self) {
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

/// The writer thread: takes appends from the queue and commits them in batches.
struct WriterThread {
    store: Arc<Mutex<Writer>>,
    /// When the last commit ended (see [`Inner::last_write`]).
    last_write: Arc<AtomicU64>,
    opened: Instant,
    /// The queue's room (for the depth gauge) and its size.
    room: Arc<Semaphore>,
    capacity: usize,
}

/// The trail's state, behind one lock: the connection, the key, and where each chain stands.
struct Writer {
    /// `None` once closed.
    conn: Option<Connection>,
    path: PathBuf,
    key: CheckpointKey,
    heads: HashMap<String, Head>,
    checkpoint_rows: u64,
    checkpoint_interval: Duration,
    last_checkpoint: Instant,
    /// Merges the WAL into the file beside the writer; taken at the close.
    wal: Option<WalCheckpointer>,
    /// This relay instance: the key of its chains and of its checkpoint chain.
    relay: String,
    /// Where its checkpoint chain stands.
    chain: ChainState,
    /// The off-box copy, if configured.
    checkpoint_file: Option<CheckpointFile>,
}

/// A thread with its own connection that merges the WAL into the file when the writer asks,
/// so no commit (and no answer waiting on one) includes that merge and its fsyncs.
struct WalCheckpointer {
    /// One pending request at most; more while one runs are folded into it.
    ask: mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
    /// Rows written since the last request.
    rows: u64,
}

impl WalCheckpointer {
    /// A checkpointer of the trail at `path` that also starts the WAL over once it holds
    /// `restart_frames` frames ([`store::wal_restart`]).
    fn start(path: &std::path::Path, restart_frames: u64) -> Result<Self, AuditError> {
        let conn = store::open_wal_checkpointer(path)?;
        let (ask, asked) = mpsc::sync_channel::<()>(1);
        let shown = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("audit-wal".into())
            .spawn(move || {
                // Ends when the writer drops `ask` (the close).
                while asked.recv().is_ok() {
                    let merged = store::wal_checkpoint(&conn).and_then(|frames| {
                        if frames < restart_frames {
                            return Ok(());
                        }
                        if !store::wal_restart(&conn, WAL_RESTART_WAIT)? {
                            tracing::debug!(path = %shown.display(), frames, "audit WAL busy; starting it over next time");
                        }
                        Ok(())
                    });
                    if let Err(e) = merged {
                        tracing::warn!(path = %shown.display(), error = %e, "audit WAL checkpoint failed");
                    }
                }
            })
            .map_err(AuditError::Thread)?;
        Ok(Self {
            ask,
            thread,
            rows: 0,
        })
    }

    /// Counts `rows` written; asks for a merge every [`WAL_CHECKPOINT_ROWS`].
    fn wrote(&mut self, rows: u64) {
        self.rows += rows;
        if self.rows >= WAL_CHECKPOINT_ROWS {
            self.rows = 0;
            // Full: a merge is already pending, which covers these rows too.
            let _ = self.ask.try_send(());
        }
    }

    /// Stops the thread and closes its connection (so the writer's close can merge and remove
    /// the WAL as the last connection).
    fn stop(self) {
        drop(self.ask);
        if self.thread.join().is_err() {
            tracing::warn!("audit WAL checkpointer panicked");
        }
    }
}

/// An append taken from the queue: its room, record and waiter.
type Taken = (
    OwnedSemaphorePermit,
    Record,
    oneshot::Sender<Result<(), AuditError>>,
);

impl WriterThread {
    /// The trail's state; a panic while it was held (none is expected) leaves it usable.
    fn lock(&self) -> MutexGuard<'_, Writer> {
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn run(self, rx: mpsc::Receiver<Message>) {
        let mut appends = Vec::new();
        loop {
            let wait = {
                let writer = self.lock();
                writer
                    .checkpoint_interval
                    .saturating_sub(writer.last_checkpoint.elapsed())
            };
            let first = match rx.recv_timeout(wait) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.lock().checkpoint_interval_now();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(message) => message,
            };
            let mut close = None;
            let mut next = Some(first);
            // Take everything queued (the queue bounds it), up to a close request.
            while let Some(message) = next.take() {
                match message {
                    Message::Append {
                        permit,
                        record,
                        done,
                    } => appends.push((permit, record, done)),
                    Message::Close { done } => {
                        close = Some(done);
                        break;
                    }
                }
                next = rx.try_recv().ok();
            }
            metrics::gauge!(names::AUDIT_QUEUE_DEPTH).set(self.depth());
            let mut writer = self.lock();
            if !appends.is_empty() {
                writer.commit(&mut appends);
                self.last_write
                    .store(micros_since(self.opened), Ordering::Relaxed);
            }
            metrics::gauge!(names::AUDIT_QUEUE_DEPTH).set(self.depth());
            if let Some(done) = close {
                // Appends queued behind the close find the trail closed: dropping the
                // receiver drops their waiters, and later sends fail.
                drop(rx);
                writer.finish();
                let _ = done.send(());
                return;
            }
            // Under steady load the receive above never times out: check the clock here too.
            writer.checkpoint_if_due();
        }
        self.lock().finish();
    }

    /// Records queued or being written.
    fn depth(&self) -> f64 {
        self.capacity.saturating_sub(self.room.available_permits()) as f64
    }
}

impl Writer {
    /// Signs what is due: every tenant once the interval has passed, else the tenants with
    /// [`AuditSettings::checkpoint_rows`] unsigned rows.
    fn checkpoint_if_due(&mut self) {
        let rows = self.checkpoint_rows;
        if self.last_checkpoint.elapsed() >= self.checkpoint_interval
            || self.heads.values().any(|h| h.unsigned() >= rows)
        {
            self.checkpoint_interval_now();
        }
    }

    /// Signs every head if any tenant has unsigned rows; a failure is logged (the rows stay
    /// unsigned and the next checkpoint tries again).
    fn checkpoint_interval_now(&mut self) {
        if let Err(e) = self.checkpoint(Kind::Interval, "", false) {
            tracing::warn!(path = %self.path.display(), error = %e, "audit checkpoint failed");
        }
    }

    /// Commits one record on the caller's thread ([`Auditor::append_inline`]), and signs a
    /// checkpoint if one is now due (once in [`AuditSettings::checkpoint_rows`] rows, so
    /// checkpoints stay exactly that many rows apart). Never waits on another connection's
    /// lock: `None` then, nothing written, for the queue to retry.
    fn commit_one(&mut self, record: &Record) -> Option<Result<(), AuditError>> {
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

    fn write_error(&self, e: &rusqlite::Error) -> AuditError {
        AuditError::Write {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Writes `appends` in one transaction and completes each with the outcome.
    fn commit(&mut self, appends: &mut Vec<Taken>) {
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
    fn finish(&mut self) {
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

    /// Writes the relay's next checkpoint, signing the head of every tenant chain it writes:
    /// always when `always`, else only if some tenant has unsigned rows. Then appends it to the
    /// off-box copy, if configured (a failure there is logged, not fatal: the trail has it).
    fn checkpoint(&mut self, kind: Kind, note: &str, always: bool) -> rusqlite::Result<()> {
        self.last_checkpoint = Instant::now();
        if !always && self.heads.values().all(|h| h.unsigned() == 0) {
            return Ok(());
        }
        let Some(conn) = &mut self.conn else {
            return Ok(());
        };
        let mut heads: Vec<HeadEntry> = self
            .heads
            .iter()
            .filter(|(_, h)| h.seq > 0)
            .map(|(tenant, h)| HeadEntry {
                tenant: tenant.clone(),
                seq: h.seq,
                hash: hex::encode(h.hash),
            })
            .collect();
        heads.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        let mut cp = Checkpoint {
            relay: self.relay.clone(),
            n: self.chain.n + 1,
            prev: self.chain.hash.clone(),
            kind,
            epoch: self.chain.epoch,
            note: note.to_owned(),
            time_ms: store::now_ms(),
            interval_ms: u64::try_from(self.checkpoint_interval.as_millis()).unwrap_or(u64::MAX),
            heads,
            public_key: self.key.public_hex().to_owned(),
            signature: String::new(),
        };
        cp.signature = self.key.sign(&cp.message());
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        store::insert_checkpoint(&tx, &cp)?;
        tx.commit()?;
        self.chain.n = cp.n;
        self.chain.hash = cp.hash();
        for head in self.heads.values_mut() {
            head.signed_seq = head.seq;
        }
        if let Some(file) = &mut self.checkpoint_file {
            file.append(&cp);
        }
        Ok(())
    }
}

/// Where the relay's checkpoint chain stands: the last number, its hash, the epoch.
struct ChainState {
    n: u64,
    hash: String,
    epoch: u64,
}

/// `[audit] checkpoint_file`: every signed checkpoint appended as one JSON line.
struct CheckpointFile {
    path: PathBuf,
    file: std::fs::File,
    /// `durability = "fsync"`: each line is synced to disk too.
    sync: bool,
}

impl CheckpointFile {
    fn open(path: &std::path::Path, durability: Durability) -> Result<Self, AuditError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| AuditError::Database {
                path: path.to_owned(),
                message: format!("cannot open the checkpoint file: {e}"),
            })?;
        Ok(Self {
            path: path.to_owned(),
            file,
            sync: durability == Durability::Fsync,
        })
    }

    fn append(&mut self, cp: &Checkpoint) {
        use std::io::Write;
        let mut line = cp.to_json_line();
        line.push('\n');
        // One write of the whole line: an appending file gets it in one piece.
        let written = self.file.write_all(line.as_bytes()).and_then(|()| {
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            metrics::counter!(names::AUDIT_CHECKPOINT_FILE_ERRORS).increment(1);
            tracing::error!(file = %self.path.display(), error = %e, n = cp.n, "appending the audit checkpoint to the checkpoint file failed");
        }
    }
}

/// Microseconds from `start` to now.
fn micros_since(start: Instant) -> u64 {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::govern::audit::{Direction, Outcome, Verdict, digest};

    /// A record for tests: `n` goes into the request id and the latency.
    pub(crate) fn record(tenant: &str, n: u64) -> Record {
        Record {
            time_ms: 1_764_000_000_000 + n,
            tenant: tenant.into(),
            subject: format!("user{}@{tenant}.example", n % 3),
            roles: vec!["analyst".into()],
            source: if n.is_multiple_of(2) { "db" } else { "web" }.into(),
            session: None,
            transport: Some("quic".into()),
            protocol_version: Some("2025-11-25".into()),
            direction: Direction::AgentToServer,
            method: "tools/call".into(),
            request_id: Some(n.to_string()),
            tool: Some("query".into()),
            resource: None,
            prompt: None,
            decision: if n.is_multiple_of(5) {
                Verdict::Deny
            } else {
                Verdict::Allow
            },
            rule: "test".into(),
            outcome: Outcome::Ok,
            latency_us: n,
            bytes_in: 10,
            bytes_out: 20,
            args_sha256: digest(b"{}"),
            args: None,
            result: None,
        }
    }

    fn rows(path: &std::path::Path) -> Vec<(String, i64, String, String, Vec<u8>)> {
        let conn = Connection::open(path).expect("open");
        let mut stmt = conn
            .prepare("SELECT tenant, seq, prev_hash, hash, record FROM records ORDER BY id")
            .expect("prepare");
        stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
    }

    #[tokio::test]
    async fn concurrent_appends_all_land_chained_per_tenant_and_close_signs() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = AuditSettings::new(dir.path().join("audit.db"));
        // A tiny queue: most appends wait for room (backpressure), none is dropped.
        config.queue = 2;
        let auditor = Auditor::open(&config).expect("open");
        let mut tasks = Vec::new();
        for t in 0..10u64 {
            let auditor = auditor.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..20 {
                    let tenant = if t % 2 == 0 { "acme" } else { "globex" };
                    auditor
                        .append(record(tenant, t * 100 + i))
                        .await
                        .expect("append");
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        auditor.close().await;
        assert!(matches!(
            auditor.append(record("acme", 1)).await,
            Err(AuditError::Closed)
        ));
        let rows = rows(&config.path);
        assert_eq!(rows.len(), 200);
        let mut heads: HashMap<String, (i64, [u8; 32])> = HashMap::new();
        for (tenant, seq, prev, hash, bytes) in &rows {
            let (last_seq, last_hash) = heads.entry(tenant.clone()).or_insert((0, chain::GENESIS));
            assert_eq!(*seq, *last_seq + 1);
            assert_eq!(prev, &hex::encode(*last_hash));
            let expected = chain::row_hash(last_hash, *seq as u64, bytes);
            assert_eq!(hash, &hex::encode(expected));
            *last_seq = *seq;
            *last_hash = expected;
        }
        assert_eq!(heads["acme"].0, 100);
        assert_eq!(heads["globex"].0, 100);
        let last = checkpoints(&config.path).pop().expect("a checkpoint");
        assert_eq!(last.kind, Kind::Close);
        let signed: Vec<(String, u64)> =
            last.heads.into_iter().map(|h| (h.tenant, h.seq)).collect();
        assert_eq!(signed, vec![("acme".into(), 100), ("globex".into(), 100)]);
    }

    /// The trail's checkpoints, in order.
    fn checkpoints(path: &std::path::Path) -> Vec<Checkpoint> {
        let conn = Connection::open(path).expect("open");
        store::all_checkpoints(&conn)
            .expect("checkpoints")
            .into_iter()
            .map(|c| c.checkpoint.expect("a valid checkpoint"))
            .collect()
    }

    #[tokio::test]
    async fn close_merges_the_wal_into_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = AuditSettings::new(dir.path().join("audit.db"));
        let auditor = Auditor::open(&config).expect("open");
        // Enough rows for the WAL checkpointer to be asked several times.
        let count = WAL_CHECKPOINT_ROWS * 3 + 1;
        for i in 0..count {
            auditor.append(record("acme", i)).await.expect("append");
        }
        auditor.close().await;
        assert!(
            !dir.path().join("audit.db-wal").exists(),
            "the checkpointer's connection is closed first, so the writer's close removes the WAL"
        );
        assert_eq!(rows(&config.path).len() as u64, count);
    }

    #[test]
    fn the_wal_starts_over_under_steady_writes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.db");
        let (conn, _) =
            store::open_writer(&path, Durability::Commit, "key", "relay-a").expect("open");
        // A restart once the WAL holds 64 frames; the writer never pauses, so a passive merge
        // alone never catches up with it.
        let mut wal = WalCheckpointer::start(&path, 64).expect("checkpointer");
        let r = record("acme", 1);
        let mut prev = chain::GENESIS;
        let mut largest = 0;
        for seq in 1..=3_000u64 {
            let bytes = chain::canonical(&r);
            let hash = chain::row_hash(&prev, seq, &bytes);
            store::begin(&conn).expect("begin");
            store::insert_record(&conn, "relay-a", seq, &prev, &hash, &bytes, &r).expect("insert");
            store::commit(&conn).expect("commit");
            prev = hash;
            wal.wrote(1);
            let size = std::fs::metadata(dir.path().join("audit.db-wal")).map_or(0, |m| m.len());
            largest = largest.max(size);
        }
        wal.stop();
        // 3,000 commits of 3-4 pages each would make a WAL of ~40 MiB never started over;
        // bounded by the restart threshold plus what the writer adds while a merge runs.
        assert!(largest < 16 << 20, "WAL grew to {largest} bytes");
    }

    #[tokio::test]
    async fn a_reopened_trail_continues_each_chain() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = AuditSettings::new(dir.path().join("audit.db"));
        let first = Auditor::open(&config).expect("open");
        first.append(record("acme", 1)).await.expect("append");
        first.close().await;
        let second = Auditor::open(&config).expect("reopen");
        second.append(record("acme", 2)).await.expect("append");
        second.close().await;
        let rows = rows(&config.path);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].1, 2);
        assert_eq!(rows[1].2, rows[0].3, "the second row chains to the first");
    }

    #[tokio::test]
    async fn checkpoints_every_n_rows() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = AuditSettings::new(dir.path().join("audit.db"));
        config.checkpoint_rows = 5;
        let auditor = Auditor::open(&config).expect("open");
        for i in 0..12 {
            auditor.append(record("acme", i)).await.expect("append");
        }
        auditor.close().await;
        let signed: Vec<(Kind, u64, Option<u64>)> = checkpoints(&config.path)
            .iter()
            .map(|c| (c.kind, c.n, c.head("acme").map(|h| h.seq)))
            .collect();
        assert_eq!(
            signed,
            vec![
                (Kind::Start, 1, None),
                (Kind::Interval, 2, Some(5)),
                (Kind::Interval, 3, Some(10)),
                (Kind::Close, 4, Some(12)),
            ]
        );
    }

    #[tokio::test]
    async fn a_quiet_tenant_is_signed_after_the_interval() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = AuditSettings::new(dir.path().join("audit.db"));
        config.checkpoint_secs = 1;
        let auditor = Auditor::open(&config).expect("open");
        auditor.append(record("acme", 1)).await.expect("append");
        let conn = Connection::open(&config.path).expect("open");
        let signed = || -> i64 {
            conn.query_row("SELECT COUNT(*) FROM checkpoints", [], |r| r.get(0))
                .expect("count")
        };
        // Poll (bounded) until the writer's timer signs the row; no append prompts it.
        let deadline = Instant::now() + Duration::from_secs(30);
        // The start checkpoint, then one the timer wrote.
        while signed() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(signed(), 2, "one checkpoint within the deadline");
        auditor.close().await;
        let all = checkpoints(&config.path);
        assert_eq!(all.len(), 3, "and the close");
        assert_eq!(all[1].kind, Kind::Interval);
        assert_eq!(all[1].head("acme").map(|h| h.seq), Some(1));
    }

    #[tokio::test]
    async fn a_failed_commit_fails_the_append_naming_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = AuditSettings::new(dir.path().join("audit.db"));
        let auditor = Auditor::open(&config).expect("open");
        auditor.append(record("acme", 1)).await.expect("append");
        Connection::open(&config.path)
            .expect("open")
            .execute_batch("DROP TABLE records")
            .expect("break the trail");
        let err = auditor
            .append(record("acme", 2))
            .await
            .expect_err("no table to write to");
        assert!(
            matches!(err, AuditError::Write { .. }) && err.to_string().contains("audit.db"),
            "{err}"
        );
        auditor.close().await;
    }

    #[tokio::test]
    async fn an_append_while_another_connection_holds_the_write_lock_is_queued_not_failed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = AuditSettings::new(dir.path().join("audit.db"));
        let auditor = Auditor::open(&config).expect("open");
        auditor
            .append(record("acme", 1))
            .await
            .expect("inline append");
        let other = Connection::open(&config.path).expect("open");
        other
            .execute_batch("BEGIN IMMEDIATE")
            .expect("take the write lock");
        // On this one-thread runtime, an inline commit waiting out SQLite's busy timeout would
        // block the test until it failed; it must hand the record to the writer thread.
        let queued = tokio::spawn({
            let auditor = auditor.clone();
            async move { auditor.append(record("acme", 2)).await }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while auditor.inner.room.available_permits() == auditor.inner.capacity
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            auditor.inner.room.available_permits() < auditor.inner.capacity,
            "the append is queued for the writer thread"
        );
        other
            .execute_batch("COMMIT")
            .expect("release the write lock");
        queued
            .await
            .expect("task")
            .expect("committed once the lock is free");
        auditor.close().await;
        assert_eq!(rows(&config.path).len(), 2);
    }

    #[test]
    fn open_names_the_file_it_cannot_use() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("not-a-db");
        std::fs::write(&path, vec![b'x'; 4096]).expect("write");
        let mut config = AuditSettings::new(&path);
        config.key = Some(dir.path().join("audit.key"));
        let err = Auditor::open(&config).expect_err("not a database");
        assert!(err.to_string().contains("not-a-db"), "{err}");
    }

    /// The schema of a trail written before checkpoints were chained (c1e4632).
    const V1_SCHEMA: &str = "
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

    /// A schema 1 trail at `path`, as the relay of c1e4632 wrote it: `count` acme rows and a
    /// per-tenant checkpoint of the last, signed by the key at `key`.
    fn write_v1(path: &std::path::Path, key: &std::path::Path, count: u64) {
        let key = CheckpointKey::load_or_create(key).expect("key");
        let conn = Connection::open(path).expect("create");
        conn.execute_batch(V1_SCHEMA).expect("schema 1");
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema', '1')", [])
            .expect("version");
        conn.execute(
            "INSERT INTO keys (public_key, added_ms) VALUES (?1, 0)",
            [key.public_hex()],
        )
        .expect("key");
        let mut prev = chain::GENESIS;
        for seq in 1..=count {
            let r = record("acme", seq);
            let bytes = chain::canonical(&r);
            let hash = chain::row_hash(&prev, seq, &bytes);
            let mut values: Vec<rusqlite::types::Value> = vec![
                "acme".to_owned().into(),
                (seq as i64).into(),
                hex::encode(prev).into(),
                hex::encode(hash).into(),
                bytes.into(),
            ];
            values.extend(store::record_columns(&r));
            conn.execute(
                &format!(
                    "INSERT INTO records (tenant, seq, prev_hash, hash, record, {}) VALUES ({})",
                    store::RECORD_COLUMNS,
                    (1..=values.len())
                        .map(|i| format!("?{i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                rusqlite::params_from_iter(values),
            )
            .expect("row");
            prev = hash;
        }
        let hash = hex::encode(prev);
        let signature = key.sign(&chain::checkpoint_message("acme", count, &hash, 5));
        conn.execute(
            "INSERT INTO checkpoints (time_ms, tenant, seq, hash, public_key, signature) \
             VALUES (5, 'acme', ?1, ?2, ?3, ?4)",
            rusqlite::params![count as i64, hash, key.public_hex(), signature],
        )
        .expect("checkpoint");
    }

    #[tokio::test]
    async fn a_schema_1_trail_is_read_as_it_is_and_migrated_in_place_by_the_relay() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.db");
        let key_path = dir.path().join("audit.key");
        write_v1(&path, &key_path, 7);
        let public = crate::govern::audit::key::read_public_key(
            &crate::govern::audit::key::public_key_path(&key_path),
        )
        .expect("public key");
        let keys = [public];

        // Read-only tools read it unchanged.
        let report = crate::govern::audit::verify(&path, &keys, None).expect("verify");
        assert!(report.ok(), "{report}");
        assert_eq!((report.rows, report.checkpoints), (7, 1));
        assert!(
            report.notes.iter().any(|n| n.contains("schema 1")),
            "{report}"
        );

        // The relay migrates it in place and chains on from its rows.
        let mut config = AuditSettings::new(&path);
        config.relay_id = Some("relay-a".into());
        let auditor = Auditor::open(&config).expect("open and migrate");
        auditor.append(record("acme", 8)).await.expect("append");
        auditor.close().await;
        let conn = Connection::open(&path).expect("open");
        let version: String = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .expect("version");
        assert_eq!(version, store::SCHEMA_VERSION);
        let report = crate::govern::audit::verify(&path, &keys, None).expect("verify");
        assert!(report.ok(), "{report}");
        assert_eq!(report.rows, 8);
        assert_eq!(report.checkpoints, 3, "the schema 1 one, start and close");
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("migrated from schema 1")),
            "{report}"
        );
        let last = checkpoints(&path).pop().expect("a checkpoint");
        assert_eq!(last.head("acme").map(|h| h.seq), Some(8));

        // A schema 1 row changed after the migration is still found.
        conn.execute_batch("UPDATE records SET subject = 'mallory' WHERE seq = 3")
            .expect("tamper");
        let report = crate::govern::audit::verify(&path, &keys, None).expect("verify");
        assert!(!report.ok(), "{report}");
    }

    #[tokio::test]
    async fn a_schema_1_trail_whose_checkpoint_does_not_verify_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.db");
        write_v1(&path, &dir.path().join("old.key"), 3);
        // The relay has another key than the one that signed the schema 1 checkpoints.
        let mut config = AuditSettings::new(&path);
        config.relay_id = Some("relay-a".into());
        let err = Auditor::open(&config).expect_err("refused");
        assert!(
            matches!(err, AuditError::Untrusted { .. }) && err.to_string().contains("schema 1"),
            "{err}"
        );
        config.new_epoch = true;
        let auditor = Auditor::open(&config).expect("a new epoch");
        auditor.close().await;
        let first = checkpoints(&path).remove(0);
        assert_eq!((first.kind, first.epoch, first.n), (Kind::Epoch, 2, 1));
        assert!(first.note.contains("schema 1"), "{}", first.note);
    }
}
