//! The call path's half of the trail ([`Log`]): chains each record on from where its tenant's
//! chain was written, appends its line to the segment file with one `write`, and keeps the row
//! for the indexer. Behind one short lock: no SQLite, no thread hand-off, no wait on the disk
//! (with `durability = "fsync"` the caller waits for the sync after the lock is let go).

use std::collections::HashMap;
use std::path::PathBuf;

use crate::govern::audit::chain::{self, GENESIS};
use crate::govern::audit::segment::{self, Mark, Row, SegmentFile};
use crate::govern::audit::{AuditError, Record};

/// Where a tenant's chain was last written: its sequence number and hash.
pub(super) type Written = (u64, [u8; 32]);

/// The segment file being written, where each chain stands in it, and the rows not yet
/// handed to the indexer.
pub(super) struct Log {
    /// `None` once closed: appends then fail with [`AuditError::Closed`].
    file: Option<SegmentFile>,
    /// Per tenant, the last row written (indexed or not).
    heads: HashMap<String, Written>,
    /// Rows written and not yet taken by the indexer, in file order.
    pending: Vec<Row>,
    /// The room of a batch the indexer is done with, for the next one: a batch of a busy
    /// relay holds hundreds of rows, and growing a new vector to that size for each batch
    /// cost fresh pages, zeroed by the kernel, on the call path.
    spare: Vec<Row>,
    /// Bytes written in this run, over every generation: what a sync waits for.
    written: u64,
    /// The line being built (its room reused).
    line: Vec<u8>,
    trail: PathBuf,
    relay: String,
    durable: bool,
    /// Why no row may be appended any more (a sync failed: rows the file's pages held may be
    /// lost, so nothing written after can be promised durable). Until the relay restarts.
    broken: Option<String>,
    /// A file holding this much is replaced by the next generation ([`segment::ROTATE_BYTES`];
    /// tests lower it).
    pub(super) rotate_bytes: u64,
}

/// What the indexer takes: the rows (all in one generation's file), the mark once they are
/// indexed, and a file to remove then (the generation the log moved on from).
pub(super) struct Taken {
    pub(super) rows: Vec<Row>,
    /// The generation of the file the rows are in.
    pub(super) generation: u64,
    pub(super) mark: Mark,
    pub(super) retired: Option<PathBuf>,
}

impl Log {
    /// A log appending to `file`, the chains standing at `heads` (as the database has them,
    /// every earlier segment row indexed).
    pub(super) fn new(
        file: SegmentFile,
        heads: HashMap<String, Written>,
        trail: PathBuf,
        relay: String,
        durable: bool,
    ) -> Self {
        Self {
            file: Some(file),
            heads,
            pending: Vec::new(),
            spare: Vec::new(),
            written: 0,
            line: Vec::new(),
            trail,
            relay,
            durable,
            rotate_bytes: segment::ROTATE_BYTES,
            broken: None,
        }
    }

    /// Stops appends for good after a failed sync of the file (`fsync` durability): the
    /// kernel may have dropped the pages it could not write, and a later sync would succeed
    /// without them.
    pub(super) fn break_off(&mut self, why: String) {
        tracing::error!(reason = %why, "audit segment sync failed: no more rows are accepted until the relay restarts");
        self.broken = Some(why);
    }

    /// Appends `record` (its canonical `bytes`) as the next row of its tenant's chain.
    /// Returns the bytes written in this run once it is (what a sync must reach for it to be
    /// durable) and whether the indexer must be woken (it had nothing pending).
    pub(super) fn append(
        &mut self,
        record: Record,
        bytes: Vec<u8>,
    ) -> Result<(u64, bool), AuditError> {
        let file = writable(&mut self.file, &self.broken)?;
        let (seq, prev) = self
            .heads
            .get(&record.tenant)
            .map_or((1, GENESIS), |&(seq, hash)| (seq + 1, hash));
        let hash = chain::row_hash(&prev, seq, &bytes);
        self.line.clear();
        segment::encode(&mut self.line, seq, &prev, &hash, &bytes);
        file.append(&self.line).map_err(|e| AuditError::Write {
            path: file.path().to_owned(),
            message: e.to_string(),
        })?;
        self.written += self.line.len() as u64;
        // Shrink a line buffer a large record grew, so an idle relay does not keep it.
        if self.line.capacity() > LINE_KEEP {
            self.line = Vec::new();
        }
        match self.heads.get_mut(&record.tenant) {
            Some(head) => *head = (seq, hash),
            None => {
                self.heads.insert(record.tenant.clone(), (seq, hash));
            }
        }
        let wake = self.pending.is_empty();
        let end = file.end().offset;
        self.pending.push(Row {
            seq,
            prev,
            hash,
            bytes,
            record,
            end,
        });
        Ok((self.written, wake))
    }

    /// The bytes written in this run and a handle to sync them with: every byte before the
    /// count is in the handle's file or in a file already synced (a generation is synced
    /// before the log moves on from it).
    pub(super) fn sync_handle(&mut self) -> Result<(u64, std::fs::File), AuditError> {
        let file = writable(&mut self.file, &self.broken)?;
        let handle = file.handle().map_err(|e| AuditError::Write {
            path: file.path().to_owned(),
            message: e.to_string(),
        })?;
        Ok((self.written, handle))
    }

    /// Hands the pending rows to the indexer. Once the file holds `rotate_bytes`,
    /// the log moves on to the next generation here, so every row taken is in the file it
    /// retires and the mark after them is the new file's start.
    pub(super) fn take(&mut self) -> Option<Taken> {
        let file = self.file.as_mut()?;
        let rows = std::mem::replace(&mut self.pending, std::mem::take(&mut self.spare));
        let end = file.end();
        if end.offset < self.rotate_bytes {
            return Some(Taken {
                rows,
                generation: end.generation,
                mark: end,
                retired: None,
            });
        }
        let next = end.generation + 1;
        if self.durable
            && let Err(e) = file.sync()
        {
            self.break_off(format!("syncing before the next generation: {e}"));
            return Some(Taken {
                rows,
                generation: end.generation,
                mark: end,
                retired: None,
            });
        }
        let moved = SegmentFile::create(&self.trail, &self.relay, next, self.durable);
        match moved {
            Ok(new) => {
                let old = std::mem::replace(file, new);
                Some(Taken {
                    rows,
                    generation: end.generation,
                    mark: Mark {
                        generation: next,
                        offset: 0,
                    },
                    retired: Some(old.path().to_owned()),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the next audit segment file; going on with this one");
                Some(Taken {
                    rows,
                    generation: end.generation,
                    mark: end,
                    retired: None,
                })
            }
        }
    }

    /// Takes back the room of an indexed batch (emptied) for a later one; not more than
    /// [`SPARE_ROWS`], so a burst does not keep its room for good.
    pub(super) fn recycle(&mut self, rows: Vec<Row>) {
        debug_assert!(
            rows.is_empty(),
            "the indexer empties a batch before handing it back"
        );
        if rows.capacity() <= SPARE_ROWS && rows.capacity() > self.spare.capacity() {
            self.spare = rows;
        }
    }

    /// Closes the log (appends fail from now on) and hands over what is pending and the mark
    /// at the file's end.
    pub(super) fn close(&mut self) -> Option<(Taken, PathBuf)> {
        let file = self.file.take()?;
        let taken = Taken {
            rows: std::mem::take(&mut self.pending),
            generation: file.end().generation,
            mark: file.end(),
            retired: None,
        };
        Some((taken, file.path().to_owned()))
    }
}

/// The log's `file`, or why no row may be written to it: closed, or `broken` by a failed sync.
fn writable<'a>(
    file: &'a mut Option<SegmentFile>,
    broken: &Option<String>,
) -> Result<&'a mut SegmentFile, AuditError> {
    let file = file.as_mut().ok_or(AuditError::Closed)?;
    match broken {
        None => Ok(file),
        Some(why) => Err(AuditError::Write {
            path: file.path().to_owned(),
            message: why.clone(),
        }),
    }
}

/// The line buffer's room kept between appends: a metadata row is well under this; a row
/// with captured arguments may be larger, and its room is given back.
const LINE_KEEP: usize = 16 << 10;

/// The most rows of room kept between batches ([`Log::recycle`]): a batch of 20 ms at
/// 50,000 calls/s (only the rows' inline part; what each record owns is freed).
const SPARE_ROWS: usize = 1024;
