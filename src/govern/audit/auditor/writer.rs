//! The database's side of the trail ([`Writer`], owned by the indexer thread): the connection,
//! the key, where each indexed tenant chain stands; and how segment rows are indexed, in
//! batches, each with the mark after it ([`Writer::index`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use super::signing::{ChainState, CheckpointFile};
use super::wal::WalCheckpointer;
use crate::govern::audit::AuditError;
use crate::govern::audit::checkpoint::Kind;
use crate::govern::audit::key::CheckpointKey;
use crate::govern::audit::segment::{Mark, Row};
use crate::govern::audit::store::{self, Head};
use crate::metrics as names;

/// The database's side of the trail: the connection, the key, and where each indexed chain
/// stands.
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
    /// Indexes `rows` (segment rows, in file order, all in generation `generation`'s file)
    /// into the database with the mark after them; then the heads move on. A batch is cut
    /// after each row that brings a tenant to [`AuditSettings::checkpoint_rows`] unsigned rows
    /// and the checkpoint is signed there, so checkpoints stay exactly that many rows apart
    /// however rows are batched. On failure the rows from the failed part on are not applied:
    /// the caller tries again with them.
    pub(super) fn index(
        &mut self,
        rows: &[Row],
        generation: u64,
        mark: Mark,
    ) -> Result<(), (usize, AuditError)> {
        let mut done = 0;
        loop {
            let cut = done + self.rows_to_checkpoint(&rows[done..]);
            let part_mark = if cut == rows.len() {
                mark
            } else {
                Mark {
                    generation,
                    offset: rows[cut - 1].end,
                }
            };
            self.index_part(&rows[done..cut], part_mark)
                .map_err(|e| (done, e))?;
            done = cut;
            self.checkpoint_if_due();
            if done == rows.len() {
                return Ok(());
            }
        }
    }

    /// How many of `rows` to index before a checkpoint is due (all of them if none falls due).
    fn rows_to_checkpoint(&self, rows: &[Row]) -> usize {
        let mut unsigned: HashMap<&str, u64> = HashMap::new();
        for (i, row) in rows.iter().enumerate() {
            let tenant = row.record.tenant.as_str();
            let count = unsigned
                .entry(tenant)
                .or_insert_with(|| self.heads.get(tenant).map_or(0, Head::unsigned));
            *count += 1;
            if *count >= self.checkpoint_rows {
                return i + 1;
            }
        }
        rows.len()
    }

    /// Indexes `rows` with `mark` in one transaction and moves the heads on.
    fn index_part(&mut self, rows: &[Row], mark: Mark) -> Result<(), AuditError> {
        let Some(conn) = &self.conn else {
            return Err(AuditError::Closed);
        };
        metrics::histogram!(names::AUDIT_BATCH_ROWS).record(rows.len() as f64);
        let written = store::index_rows(conn, &self.relay, rows, mark);
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, rows = rows.len(), "audit indexing failed; the rows wait in the segment file");
            return Err(self.write_error(&e));
        }
        for row in rows {
            let head = self.heads.entry(row.record.tenant.clone()).or_default();
            head.seq = row.seq;
            head.hash = row.hash;
        }
        if let Some(wal) = &mut self.wal {
            wal.wrote(rows.len() as u64);
        }
        Ok(())
    }

    /// The error an append gets when the trail could not write.
    pub(super) fn write_error(&self, e: &rusqlite::Error) -> AuditError {
        AuditError::Write {
            path: self.path.clone(),
            message: e.to_string(),
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
