//! The WAL merge thread: a second connection that merges the write-ahead log into the file
//! when the writer asks (every [`WAL_CHECKPOINT_ROWS`] rows), and starts the WAL over once it
//! is large, so no commit (and no answer waiting on one) pays for the merge and its fsyncs.

use std::sync::mpsc;
use std::time::Duration;

use crate::govern::audit::{AuditError, store};

/// Rows written between two merges of the WAL into the file. A metadata row changes three
/// pages (the table and its two indexes), so this keeps the WAL near SQLite's default
/// automatic checkpoint of 1,000 pages.
pub(super) const WAL_CHECKPOINT_ROWS: u64 = 300;

/// WAL frames (4 KiB pages, so 16 MiB) past which a merge also starts the WAL over: at
/// [`WAL_CHECKPOINT_ROWS`] rows of up to four frames between merges, a few merges' worth. A
/// WAL that a passive merge caught up with starts over by itself; this bounds one that never
/// does under steady appends.
pub(super) const WAL_RESTART_FRAMES: u64 = 4096;

/// The longest a restart of the WAL waits for the writer's transaction and for readers to let
/// go of the WAL (appends wait meanwhile); past it, the next merge tries again.
pub(super) const WAL_RESTART_WAIT: Duration = Duration::from_millis(100);

/// A thread with its own connection that merges the WAL into the file when the writer asks,
/// so no commit (and no answer waiting on one) includes that merge and its fsyncs.
pub(super) struct WalCheckpointer {
    /// One pending request at most; more while one runs are folded into it. A request may
    /// carry where to say that its merge is done (tests wait on it; the writer never does).
    ask: mpsc::SyncSender<Option<mpsc::SyncSender<()>>>,
    thread: std::thread::JoinHandle<()>,
    /// Rows written since the last request.
    rows: u64,
}

impl WalCheckpointer {
    /// A checkpointer of the trail at `path` that also starts the WAL over once it holds
    /// `restart_frames` frames ([`store::wal_restart`]).
    pub(super) fn start(path: &std::path::Path, restart_frames: u64) -> Result<Self, AuditError> {
        let conn = store::open_wal_checkpointer(path)?;
        let (ask, asked) = mpsc::sync_channel::<Option<mpsc::SyncSender<()>>>(1);
        let shown = path.to_owned();
        let thread = std::thread::Builder::new()
            .name("audit-wal".into())
            .spawn(move || {
                // Ends when the writer drops `ask` (the close).
                while let Ok(done) = asked.recv() {
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
                    if let Some(done) = done {
                        let _ = done.send(());
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
    pub(super) fn wrote(&mut self, rows: u64) {
        self.rows += rows;
        if self.rows >= WAL_CHECKPOINT_ROWS {
            self.rows = 0;
            // Full: a merge is already pending, which covers these rows too.
            let _ = self.ask.try_send(None);
        }
    }

    /// Asks for a merge and waits until it has run: what a writer that pauses between batches
    /// gives the merge thread, made certain for tests.
    #[cfg(test)]
    pub(super) fn merge_now(&mut self) {
        self.rows = 0;
        let (done, merged) = mpsc::sync_channel(1);
        if self.ask.send(Some(done)).is_ok() {
            let _ = merged.recv();
        }
    }

    /// Stops the thread and closes its connection (so the writer's close can merge and remove
    /// the WAL as the last connection).
    pub(super) fn stop(self) {
        drop(self.ask);
        if self.thread.join().is_err() {
            tracing::warn!("audit WAL checkpointer panicked");
        }
    }
}
