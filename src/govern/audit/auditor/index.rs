//! The indexer thread: copies the rows the call path appended to the segment file into SQLite,
//! in batches, behind the calls. Woken when a row arrives while it has nothing pending, it
//! lets rows gather for [`INDEX_GATHER`], takes everything pending and writes it in one
//! transaction with the mark after it; then gives the rows' room in the backlog back. It signs
//! checkpoints when due (the receive times out at the checkpoint interval, so a quiet tenant
//! is signed too). A batch the database refuses stays in the segment and is tried again every
//! [`INDEX_RETRY`]; meanwhile the backlog fills and appends are refused, naming why.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{Semaphore, oneshot};

use super::log::{Log, Taken};
use super::recover::remove;
use super::writer::Writer;
use crate::metrics as names;

/// How long rows gather once the indexer is woken. SQLite's work per batch (a transaction, the
/// WAL frames of three b-trees) is shared by every row in it, and on a small machine that work
/// competes with the calls for CPU: at 2 ms a call at concurrency 1 shared its batch with one
/// or two others and the trail added 13.9% to the echo p50 (`examples/echo_latency.rs`), at
/// 20 ms 3.0%. Readers do not wait for it (they read the segment), and the backlog it lets
/// build is bounded by `queue`.
pub(super) const INDEX_GATHER: Duration = Duration::from_millis(20);

/// How soon a batch the database refused is tried again.
pub(super) const INDEX_RETRY: Duration = Duration::from_millis(500);

/// What wakes the indexer.
pub(super) enum Wake {
    /// A row arrived while none was pending.
    Rows,
    /// Index everything now and say when done (`Auditor::flush`).
    Flush(oneshot::Sender<()>),
    /// Index everything, sign the close checkpoint, close the database, and say when done.
    Close(oneshot::Sender<()>),
}

/// The indexer: the database's side of the trail and what it needs of the call path's.
pub(super) struct Indexer {
    pub(super) writer: Writer,
    pub(super) log: Arc<Mutex<Log>>,
    /// The backlog's room: a row's permit comes back once it is indexed.
    pub(super) room: Arc<Semaphore>,
    /// Why indexing fails, while it does (appends finding the backlog full say so).
    pub(super) failing: Arc<Mutex<Option<String>>>,
    /// A batch the database refused, tried again before anything newer.
    pub(super) retry: Option<Taken>,
    /// The backlog's size (for the depth gauge).
    pub(super) capacity: usize,
    /// The trail's writer lock (`segment::lock`), let go once closed.
    pub(super) lock: Option<std::fs::File>,
}

impl Indexer {
    /// Runs until a close request or until every handle is gone.
    pub(super) fn run(mut self, rx: mpsc::Receiver<Wake>) {
        loop {
            let until_checkpoint = self
                .writer
                .checkpoint_interval
                .saturating_sub(self.writer.last_checkpoint.elapsed());
            let wait = if self.retry.is_some() {
                until_checkpoint.min(INDEX_RETRY)
            } else {
                until_checkpoint
            };
            let mut replies = Vec::new();
            let mut close = None;
            match rx.recv_timeout(wait) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.index_pending();
                    self.writer.checkpoint_if_due();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Ok(Wake::Rows) => std::thread::sleep(INDEX_GATHER),
                Ok(Wake::Flush(done)) => replies.push(done),
                Ok(Wake::Close(done)) => close = Some(done),
            }
            // Wake-ups that came while rows gathered are served by this batch.
            while let Ok(wake) = rx.try_recv() {
                match wake {
                    Wake::Rows => {}
                    Wake::Flush(done) => replies.push(done),
                    Wake::Close(done) => close = Some(done),
                }
            }
            self.index_pending();
            for done in replies {
                let _ = done.send(());
            }
            if let Some(done) = close {
                self.close();
                let _ = done.send(());
                return;
            }
        }
        self.close();
    }

    /// Indexes the batch waiting for a retry, then everything pending.
    fn index_pending(&mut self) {
        if let Some(taken) = self.retry.take()
            && !self.index(taken)
        {
            return;
        }
        let taken = self.log.lock().take();
        if let Some(taken) = taken {
            self.index(taken);
        }
    }

    /// Indexes one batch; on success gives its room back and removes the file it retired.
    /// Returns whether it was indexed (else it is kept for a retry).
    fn index(&mut self, taken: Taken) -> bool {
        if taken.rows.is_empty() && taken.retired.is_none() {
            return true;
        }
        match self.writer.index(&taken.rows, taken.generation, taken.mark) {
            Ok(()) => {
                self.room.add_permits(taken.rows.len());
                let mut rows = taken.rows;
                rows.clear();
                self.log.lock().recycle(rows);
                *self.failing.lock() = None;
                if let Some(old) = &taken.retired {
                    remove(old);
                }
                let depth = self.capacity.saturating_sub(self.room.available_permits());
                metrics::gauge!(names::AUDIT_QUEUE_DEPTH).set(depth as f64);
                true
            }
            Err((indexed, e)) => {
                *self.failing.lock() = Some(e.to_string());
                self.room.add_permits(indexed);
                let mut taken = taken;
                taken.rows.drain(..indexed);
                self.retry = Some(taken);
                false
            }
        }
    }

    /// The graceful end: refuses further appends, indexes what is left (a retry first, it is
    /// older), signs the close checkpoint, closes the database and, when every row is in it,
    /// removes the segment file; then lets the trail go for another writer.
    fn close(&mut self) {
        self.room.close();
        let closed = self.log.lock().close();
        let retried = match self.retry.take() {
            Some(taken) => self.index(taken),
            None => true,
        };
        if let Some((taken, path)) = closed
            && retried
            && self.index(taken)
        {
            remove(&path);
        }
        self.writer.finish();
        self.lock = None;
    }
}
