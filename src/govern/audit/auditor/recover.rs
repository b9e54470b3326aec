//! What a relay does with the segment files before it writes: the rows a crash left past the
//! database's mark are indexed (each file in one transaction with the mark after it), files
//! the mark is past are removed, and the relay's own file starts at the next generation.
//!
//! A row is indexed only if it continues its chain: the next sequence number after the
//! database's head of its (relay, tenant), linked to that head's hash, and hashing to its own
//! hash. A torn last line is a write no answer waited on and is dropped. Anything else is
//! damage: the relay refuses the trail, or with `--new-audit-epoch` sets the file aside
//! (`FILE.damaged`) and says why in the epoch checkpoint.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::govern::audit::AuditError;
use crate::govern::audit::segment::{self, Mark, SegmentError};
use crate::govern::audit::store;

/// What the recovery found.
pub(super) struct Recovered {
    /// The generation the relay's own file takes.
    pub(super) next: u64,
    /// Rows indexed from the files.
    pub(super) rows: usize,
    /// Why a file was set aside (with `new_epoch`), if one was.
    pub(super) damage: Option<String>,
}

/// Indexes what the segment files of the trail at `trail` hold past the database's mark;
/// with `new_epoch` a damaged file is set aside, else refused ([`AuditError::Untrusted`]).
pub(super) fn recover(
    conn: &Connection,
    trail: &Path,
    new_epoch: bool,
) -> Result<Recovered, AuditError> {
    let db_error = store::sql_error(trail);
    let mark = store::segment_mark(conn).map_err(&db_error)?;
    let mut recovered = Recovered {
        next: mark.generation + 1,
        rows: 0,
        damage: None,
    };
    for generation in segment::generations(trail).map_err(segment_error(trail))? {
        recovered.next = recovered.next.max(generation + 1);
        let path = segment::file_path(trail, generation);
        if generation < mark.generation {
            remove(&path);
            continue;
        }
        let from = if generation == mark.generation {
            mark.offset
        } else {
            0
        };
        match index_file(conn, &path, generation, from) {
            Ok(rows) => {
                recovered.rows += rows;
                remove(&path);
            }
            Err(Failure::Database(e)) => return Err(db_error(e)),
            Err(Failure::Damaged(why)) if new_epoch => {
                let aside = set_aside(&path);
                tracing::warn!(path = %path.display(), aside = %aside.display(), %why, "audit segment file damaged: set aside (--new-audit-epoch)");
                let reason = format!("{why} (set aside as {})", aside.display());
                recovered.damage = Some(match recovered.damage.take() {
                    None => reason,
                    Some(earlier) => format!("{earlier}; {reason}"),
                });
            }
            Err(Failure::Damaged(why)) => {
                return Err(AuditError::Untrusted {
                    path: trail.to_owned(),
                    reason: why,
                });
            }
        }
    }
    if recovered.rows > 0 {
        tracing::warn!(path = %trail.display(), rows = recovered.rows, "audit rows a crash left in the segment file are indexed");
    }
    Ok(recovered)
}

/// Why a file could not be indexed.
enum Failure {
    /// The database refused.
    Database(rusqlite::Error),
    /// The file is damaged or does not continue the chains.
    Damaged(String),
}

/// Indexes one file from `from`, checking each row continues its chain; returns the rows.
fn index_file(
    conn: &Connection,
    path: &Path,
    generation: u64,
    from: u64,
) -> Result<usize, Failure> {
    let damaged = |e: SegmentError| Failure::Damaged(e.to_string());
    let file = std::fs::File::open(path).map_err(|source| {
        damaged(SegmentError::Io {
            path: path.to_owned(),
            source,
        })
    })?;
    let contents = segment::read(path, file, generation, from).map_err(damaged)?;
    if contents.torn > 0 {
        tracing::warn!(path = %path.display(), bytes = contents.torn, "the audit segment file ends in a row cut short by a crash (no answer waited on it): dropped");
    }
    let mut heads = store::load_heads(conn, &contents.relay).map_err(Failure::Database)?;
    for row in &contents.rows {
        let head = heads.entry(row.record.tenant.clone()).or_default();
        if row.seq != head.seq + 1 || row.prev != head.hash || !row.hash_holds() {
            return Err(Failure::Damaged(format!(
                "audit segment {}: row seq {} of relay {:?} tenant {:?} does not continue its \
                 chain (the database's head is seq {})",
                path.display(),
                row.seq,
                contents.relay,
                row.record.tenant,
                head.seq
            )));
        }
        head.seq = row.seq;
        head.hash = row.hash;
    }
    let mark = Mark {
        generation,
        offset: contents.end,
    };
    store::index_rows(conn, &contents.relay, &contents.rows, mark).map_err(Failure::Database)?;
    Ok(contents.rows.len())
}

/// The error of a segment directory that cannot be listed.
fn segment_error(trail: &Path) -> impl Fn(SegmentError) -> AuditError + '_ {
    move |e| AuditError::Database {
        path: trail.to_owned(),
        message: e.to_string(),
    }
}

/// Moves a damaged file out of the way (`FILE.damaged`), keeping it for the operator.
fn set_aside(path: &Path) -> PathBuf {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".damaged");
    let aside = PathBuf::from(aside);
    if let Err(e) = std::fs::rename(path, &aside) {
        tracing::error!(path = %path.display(), error = %e, "cannot set the damaged audit segment file aside");
    }
    aside
}

/// Removes a segment file every row of which is indexed (a failure is logged: the next start
/// skips a file the mark is past).
pub(super) fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove an indexed audit segment file");
    }
}
