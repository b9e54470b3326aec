//! Checkpoints as the writer signs them (see [`crate::govern::audit::checkpoint`]): when one
//! is due (rows or time), the next number of the relay's checkpoint chain over the head of
//! every tenant, committed to the trail and appended to the off-box copy
//! (`[audit] checkpoint_file`) when set.

use std::path::PathBuf;
use std::time::Instant;

use rusqlite::TransactionBehavior;

use super::writer::Writer;
use crate::govern::audit::checkpoint::{Checkpoint, HeadEntry, Kind};
use crate::govern::audit::settings::Durability;
use crate::govern::audit::{AuditError, store};
use crate::metrics as names;

impl Writer {
    /// Signs what is due: every tenant once the interval has passed, else the tenants with
    /// [`AuditSettings::checkpoint_rows`] unsigned rows.
    pub(super) fn checkpoint_if_due(&mut self) {
        let rows = self.checkpoint_rows;
        if self.last_checkpoint.elapsed() >= self.checkpoint_interval
            || self.heads.values().any(|h| h.unsigned() >= rows)
        {
            self.checkpoint_interval_now();
        }
    }

    /// Signs every head if any tenant has unsigned rows; a failure is logged (the rows stay
    /// unsigned and the next checkpoint tries again).
    pub(super) fn checkpoint_interval_now(&mut self) {
        if let Err(e) = self.checkpoint(Kind::Interval, "", false) {
            tracing::warn!(path = %self.path.display(), error = %e, "audit checkpoint failed");
        }
    }

    /// Writes the relay's next checkpoint, signing the head of every tenant chain it writes:
    /// always when `always`, else only if some tenant has unsigned rows. Then appends it to the
    /// off-box copy, if configured (a failure there is logged, not fatal: the trail has it).
    pub(super) fn checkpoint(
        &mut self,
        kind: Kind,
        note: &str,
        always: bool,
    ) -> rusqlite::Result<()> {
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
pub(super) struct ChainState {
    pub(super) n: u64,
    pub(super) hash: String,
    pub(super) epoch: u64,
}

/// `[audit] checkpoint_file`: every signed checkpoint appended as one JSON line.
pub(super) struct CheckpointFile {
    path: PathBuf,
    file: std::fs::File,
    /// `durability = "fsync"`: each line is synced to disk too.
    sync: bool,
}

impl CheckpointFile {
    pub(super) fn open(path: &std::path::Path, durability: Durability) -> Result<Self, AuditError> {
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
