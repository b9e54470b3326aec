//! The segment file: where a call's audit row is durable before its answer is released.
//!
//! Committing each row to SQLite on the call path cost about 32 µs of the relay's 78 per call
//! (issue 18: an insert into a table and two indexes and a commit, about 14 system calls). A
//! row is instead appended to a plain file, one line of JSON, with one `write` (and with
//! `durability = "fsync"`, one `fdatasync` per group of calls); the indexer
//! (`auditor::index`) copies the rows into SQLite in batches behind the calls. The database
//! records how far it has indexed (a [`Mark`] in its `meta` table), so a relay that crashed
//! indexes the rest when it starts, and `audit export`, `audit tail` and `audit verify` read
//! the rows past the mark from the file ([`unindexed`]).
//!
//! Format: files `TRAIL.GENERATION.seg` beside the trail (`audit.db.000001.seg`). The first
//! line names the relay whose chains the rows continue; each further line is one row,
//! `{"seq":N,"prev":"HEX","hash":"HEX","record":{...}}`, where `record` is the exact bytes the
//! hash covers (see [`super::chain`]). A line is whole only with its newline: a crash in the
//! middle of a `write` leaves a torn last line, which no answer waited on, and which is
//! dropped. Damage followed by a whole row is not a torn write and is reported.
//!
//! Once a file holds [`ROTATE_BYTES`], the indexer starts the next generation and removes the
//! file when its rows are in the database.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{Record, chain};

/// A file is replaced by the next generation once it holds this much: large enough that
/// starting a file (a create, a header, a `meta` update) is rare, small enough that a relay
/// restarted after a crash reads a few seconds of saturated load at most.
pub const ROTATE_BYTES: u64 = 16 << 20;

/// What the header's first field says: the version of this format.
const FORMAT: u32 = 1;

/// The file name's end.
const SUFFIX: &str = ".seg";

/// Why a segment file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// The file system refused.
    #[error("audit segment {path}: {source}")]
    Io {
        /// The segment file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file is not a segment of this format, or a row in it is damaged (not a torn end).
    #[error("audit segment {path}: {what} at byte {offset}")]
    Damaged {
        /// The segment file.
        path: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What is wrong.
        what: String,
    },
}

/// How far the database has indexed the segment files: every row before byte `offset` of
/// generation `generation` (and every row of earlier generations) is in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark {
    /// The file's generation.
    pub generation: u64,
    /// The byte offset in it.
    pub offset: u64,
}

impl Mark {
    /// The form `meta` stores: `GENERATION OFFSET`.
    pub fn to_text(self) -> String {
        format!("{} {}", self.generation, self.offset)
    }

    /// The stored form back; `None` if it is not two numbers.
    pub fn parse(text: &str) -> Option<Self> {
        let (generation, offset) = text.split_once(' ')?;
        Some(Self {
            generation: generation.parse().ok()?,
            offset: offset.parse().ok()?,
        })
    }
}

/// The first line of a file.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    mcp_tunnel_audit_segment: u32,
    relay: String,
    generation: u64,
}

/// One row line as read (borrowed from the line).
#[derive(Deserialize)]
struct Line<'a> {
    seq: u64,
    prev: &'a str,
    hash: &'a str,
    #[serde(borrow)]
    record: &'a RawValue,
}

/// One row of a segment: its place in its tenant's chain, the record's exact bytes and the
/// record.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The tenant chain's sequence number.
    pub seq: u64,
    /// The previous row's hash.
    pub prev: [u8; 32],
    /// This row's hash (over `prev`, `seq` and `bytes`).
    pub hash: [u8; 32],
    /// The record's canonical JSON.
    pub bytes: Vec<u8>,
    /// The record.
    pub record: Record,
    /// The byte offset in its file just after its line (the mark once it is indexed).
    pub end: u64,
}

impl Row {
    /// Whether the hash is the hash of the row's bytes after `prev` (a row read from a file
    /// proves nothing until this holds).
    pub fn hash_holds(&self) -> bool {
        chain::row_hash(&self.prev, self.seq, &self.bytes) == self.hash
    }
}

/// The file of generation `generation` of the trail at `trail`.
pub fn file_path(trail: &Path, generation: u64) -> PathBuf {
    let mut name = trail.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{generation:06}{SUFFIX}"));
    trail.with_file_name(name)
}

/// The generations of the trail's segment files there are, oldest first.
pub fn generations(trail: &Path) -> Result<Vec<u64>, SegmentError> {
    let dir = match trail.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let prefix = format!(
        "{}.",
        trail.file_name().unwrap_or_default().to_string_lossy()
    );
    let entries = std::fs::read_dir(&dir).map_err(|source| SegmentError::Io {
        path: dir.clone(),
        source,
    })?;
    let mut found: Vec<u64> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let middle = name.strip_prefix(&prefix)?.strip_suffix(SUFFIX)?;
            (middle.bytes().all(|b| b.is_ascii_digit())).then(|| middle.parse().ok())?
        })
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// Appends the line of one row to `out`.
pub fn encode(out: &mut Vec<u8>, seq: u64, prev: &[u8; 32], hash: &[u8; 32], record: &[u8]) {
    let mut hex = [0u8; 64];
    out.extend_from_slice(b"{\"seq\":");
    write!(out, "{seq}").expect("writing to a Vec cannot fail");
    out.extend_from_slice(b",\"prev\":\"");
    hex::encode_to_slice(prev, &mut hex).expect("64 bytes hold 32 in hex");
    out.extend_from_slice(&hex);
    out.extend_from_slice(b"\",\"hash\":\"");
    hex::encode_to_slice(hash, &mut hex).expect("64 bytes hold 32 in hex");
    out.extend_from_slice(&hex);
    out.extend_from_slice(b"\",\"record\":");
    out.extend_from_slice(record);
    out.extend_from_slice(b"}\n");
}

/// Takes the trail's writer lock (`TRAIL.lock`, an exclusive `flock`): one relay process
/// writes a trail's segment files and indexes them; a second one on the same trail would index
/// and remove the file the first is writing. Held until the returned file is dropped (and let
/// go by the system when the process dies). Waits up to [`LOCK_WAIT`] for a writer that is
/// closing.
pub fn lock(trail: &Path) -> Result<File, SegmentError> {
    use std::os::fd::AsRawFd;
    let mut name = trail.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| SegmentError::Io {
            path: path.clone(),
            source,
        })?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock on a descriptor this function owns; it touches no memory.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(file);
        }
        let source = std::io::Error::last_os_error();
        if source.kind() != std::io::ErrorKind::WouldBlock {
            return Err(SegmentError::Io { path, source });
        }
        if std::time::Instant::now() >= deadline {
            return Err(SegmentError::Io {
                path,
                source: std::io::Error::other("another relay process writes this audit trail"),
            });
        }
        std::thread::sleep(LOCK_POLL);
    }
}

/// How long [`lock`] waits for a writer that is closing (a restart in place) to let go.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How often [`lock`] tries again meanwhile.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// A segment file open for appending: the relay's side.
#[derive(Debug)]
pub struct SegmentFile {
    file: File,
    path: PathBuf,
    generation: u64,
    len: u64,
    /// A failed write could not be cut back: nothing more may be appended (a row after the
    /// torn bytes would be unreadable).
    broken: bool,
}

impl SegmentFile {
    /// Creates generation `generation` of the trail at `trail` for `relay`'s rows, with its
    /// header. With `durable`, the header and the file's name are on disk when this returns.
    pub fn create(
        trail: &Path,
        relay: &str,
        generation: u64,
        durable: bool,
    ) -> Result<Self, SegmentError> {
        let path = file_path(trail, generation);
        let io = |source| SegmentError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let header = Header {
            mcp_tunnel_audit_segment: FORMAT,
            relay: relay.to_owned(),
            generation,
        };
        let mut line = serde_json::to_vec(&header).expect("a header always serializes");
        line.push(b'\n');
        let started = file.write_all(&line).and_then(|()| {
            if !durable {
                return Ok(());
            }
            file.sync_all()?;
            match path.parent() {
                Some(dir) => File::open(dir)?.sync_all(),
                None => Ok(()),
            }
        });
        if let Err(e) = started {
            // No row is in it: a later try starts the generation afresh.
            let _ = std::fs::remove_file(&path);
            return Err(io(e));
        }
        Ok(Self {
            file,
            len: line.len() as u64,
            path,
            generation,
            broken: false,
        })
    }

    /// Appends `bytes` (whole lines) with one `write`. If it fails part way, the file is cut
    /// back to where it was, so no torn line stays in front of later rows.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), SegmentError> {
        if self.broken {
            return Err(SegmentError::Io {
                path: self.path.clone(),
                source: std::io::Error::other(
                    "an earlier write failed and could not be cut back; restart the relay",
                ),
            });
        }
        if let Err(source) = self.file.write_all(bytes) {
            if let Err(e) = self.file.set_len(self.len) {
                self.broken = true;
                tracing::error!(path = %self.path.display(), error = %e, "cannot cut a failed audit segment write back; no more rows go to this file");
            }
            return Err(SegmentError::Io {
                path: self.path.clone(),
                source,
            });
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Makes everything appended durable (`fdatasync`).
    pub fn sync(&self) -> Result<(), SegmentError> {
        self.file.sync_data().map_err(|source| SegmentError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Another handle on the file (to sync it without holding the writer).
    pub fn handle(&self) -> Result<File, SegmentError> {
        self.file.try_clone().map_err(|source| SegmentError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// The mark at the end of what is written.
    pub fn end(&self) -> Mark {
        Mark {
            generation: self.generation,
            offset: self.len,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A segment file as read.
#[derive(Debug)]
pub struct Contents {
    /// The relay whose chains the rows continue.
    pub relay: String,
    /// The rows past the offset read from, in file order.
    pub rows: Vec<Row>,
    /// The end of the last whole row (where a torn end starts).
    pub end: u64,
    /// Bytes past `end`: a torn last line (a crash mid-`write`, or a write in progress).
    pub torn: u64,
}

/// Reads the file of generation `generation` at `path` (already open as `file`) from byte
/// `from` (its header is always read). A torn last line is left out (`torn`); damage followed
/// by a whole row is an error.
pub fn read(path: &Path, file: File, generation: u64, from: u64) -> Result<Contents, SegmentError> {
    let io = |source| SegmentError::Io {
        path: path.to_owned(),
        source,
    };
    let damaged = |offset: u64, what: String| SegmentError::Damaged {
        path: path.to_owned(),
        offset,
        what,
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let header_len = reader.read_until(b'\n', &mut line).map_err(io)? as u64;
    let header: Header = match line.last() {
        Some(b'\n') => serde_json::from_slice(&line)
            .map_err(|e| damaged(0, format!("the header is not a segment header ({e})")))?,
        _ => {
            // Created and cut short (a crash) before its header was whole: no row was
            // written to it.
            return Ok(Contents {
                relay: String::new(),
                rows: Vec::new(),
                end: 0,
                torn: header_len,
            });
        }
    };
    if header.mcp_tunnel_audit_segment != FORMAT || header.generation != generation {
        return Err(damaged(
            0,
            format!(
                "format {} generation {} (expected format {FORMAT} generation {generation})",
                header.mcp_tunnel_audit_segment, header.generation
            ),
        ));
    }
    let mut offset = header_len.max(from);
    reader.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut contents = Contents {
        relay: header.relay,
        rows: Vec::new(),
        end: offset,
        torn: 0,
    };
    let mut first_damage: Option<(u64, String)> = None;
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(io)? as u64;
        if n == 0 {
            break;
        }
        let parsed = if line.last() == Some(&b'\n') {
            parse_row(&line, offset + n)
        } else {
            Err("a line without its end".into())
        };
        match (parsed, &first_damage) {
            (Ok(row), None) => {
                contents.rows.push(row);
                offset += n;
                contents.end = offset;
            }
            (Ok(row), Some((at, what))) => {
                return Err(damaged(
                    *at,
                    format!("{what}, followed by a whole row (seq {})", row.seq),
                ));
            }
            (Err(what), None) => {
                first_damage = Some((offset, what));
                offset += n;
            }
            (Err(_), Some(_)) => offset += n,
        }
    }
    contents.torn = offset - contents.end;
    Ok(contents)
}

/// One row line (with its newline) ending at byte `end` as a row; why not, if it is not one.
fn parse_row(line: &[u8], end: u64) -> Result<Row, String> {
    let parsed: Line<'_> = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let hash_of = |text: &str, what: &str| {
        chain::parse_hash(text).ok_or_else(|| format!("{what} is not a hash"))
    };
    let bytes = parsed.record.get().as_bytes().to_vec();
    let record: Record = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the record of seq {} is not a record: {e}", parsed.seq))?;
    Ok(Row {
        seq: parsed.seq,
        prev: hash_of(parsed.prev, "prev")?,
        hash: hash_of(parsed.hash, "hash")?,
        bytes,
        record,
        end,
    })
}

/// Segment files opened for reading: generation, path and file, oldest first.
pub type OpenFiles = Vec<(u64, PathBuf, File)>;

/// The files of the trail at `trail` at or past generation `from`, open, oldest first. Open
/// before the reader looks at the mark, so a file the relay removes meanwhile (its rows then
/// indexed) is still read whole.
pub fn open_from(trail: &Path, from: u64) -> Result<OpenFiles, SegmentError> {
    let mut files = Vec::new();
    for generation in generations(trail)? {
        if generation < from {
            continue;
        }
        let path = file_path(trail, generation);
        match File::open(&path) {
            Ok(file) => files.push((generation, path, file)),
            // Indexed and removed since it was listed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SegmentError::Io { path, source }),
        }
    }
    Ok(files)
}

/// What the segment files hold past a mark.
#[derive(Debug, Default)]
pub struct Past {
    /// The rows, each with the relay whose chain it continues, in file order.
    pub rows: Vec<(String, Row)>,
    /// Files that end in bytes that are not a whole row, and how many (a write cut short by a
    /// crash, or one in progress).
    pub torn: Vec<(PathBuf, u64)>,
}

/// What the open `files` hold past `mark` (rows of earlier generations are indexed).
pub fn rows_past(files: OpenFiles, mark: Mark) -> Result<Past, SegmentError> {
    let mut past = Past::default();
    for (generation, path, file) in files {
        if generation < mark.generation {
            continue;
        }
        let from = if generation == mark.generation {
            mark.offset
        } else {
            0
        };
        let contents = read(&path, file, generation, from)?;
        if contents.torn > 0 {
            past.torn.push((path, contents.torn));
        }
        past.rows.extend(
            contents
                .rows
                .into_iter()
                .map(|row| (contents.relay.clone(), row)),
        );
    }
    Ok(past)
}

#[cfg(test)]
mod tests;
