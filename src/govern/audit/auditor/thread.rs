//! The writer thread: waits on the queue (a std channel, so a futex wake-up), takes
//! everything queued up to a close request, commits it in one transaction (group commit), and
//! signs a checkpoint when one is due, also when no append comes (the receive times out at
//! the checkpoint interval).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::Message;
use super::writer::{Writer, micros_since};
use crate::govern::audit::{AuditError, Record};
use crate::metrics as names;

/// The writer thread: takes appends from the queue and commits them in batches.
pub(super) struct WriterThread {
    pub(super) store: Arc<Mutex<Writer>>,
    /// When the last commit ended (see [`super::Inner::last_write`]).
    pub(super) last_write: Arc<AtomicU64>,
    pub(super) opened: Instant,
    /// The queue's room (for the depth gauge) and its size.
    pub(super) room: Arc<Semaphore>,
    pub(super) capacity: usize,
}

/// An append taken from the queue: its room, record and waiter.
pub(super) type Taken = (
    OwnedSemaphorePermit,
    Record,
    oneshot::Sender<Result<(), AuditError>>,
);

impl WriterThread {
    /// Runs until a close request (flushing, signing and closing the trail) or until every
    /// handle is gone.
    pub(super) fn run(self, rx: mpsc::Receiver<Message>) {
        let mut appends = Vec::new();
        loop {
            let wait = {
                let writer = self.store.lock();
                writer
                    .checkpoint_interval
                    .saturating_sub(writer.last_checkpoint.elapsed())
            };
            let first = match rx.recv_timeout(wait) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.store.lock().checkpoint_interval_now();
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
            let mut writer = self.store.lock();
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
        self.store.lock().finish();
    }

    /// Records queued or being written.
    fn depth(&self) -> f64 {
        self.capacity.saturating_sub(self.room.available_permits()) as f64
    }
}
