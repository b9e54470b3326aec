//! Opening the trail for writing: the key, the file (a schema 1 file migrated), the relay's
//! own check of its chains ([`crate::govern::audit::verify::check_start`]) deciding the run's
//! first checkpoint (a start, an epoch, or a refusal), then the writer and its threads.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use tokio::sync::Semaphore;

use super::index::Indexer;
use super::log::Log;
use super::recover::recover;
use super::signing::{ChainState, CheckpointFile};
use super::wal::{WAL_RESTART_FRAMES, WalCheckpointer};
use super::writer::Writer;
use super::{Auditor, Inner};
use crate::govern::audit::checkpoint::{GENESIS_HEX, Kind};
use crate::govern::audit::key::CheckpointKey;
use crate::govern::audit::postgres::{Shipper, ShipperSettings, Target};
use crate::govern::audit::segment::{self, SegmentFile};
use crate::govern::audit::settings::{AuditSettings, Durability};
use crate::govern::audit::store::{self, Head, StoredCheckpoint};
use crate::govern::audit::{AuditError, verify};

/// The run's first checkpoint: its kind, note and epoch.
struct First {
    kind: Kind,
    note: String,
    epoch: u64,
}

impl Auditor {
    /// Opens or creates the trail at `config.path` (SQLite, WAL; a schema 1 file is migrated),
    /// loads or creates the relay's Ed25519 checkpoint key, checks the relay's own chains
    /// (refusing with [`AuditError::Untrusted`] a trail whose last checkpoint does not verify,
    /// unless `config.new_epoch`), signs the run's first checkpoint and starts the writer
    /// thread. Errors name the file and problem.
    pub fn open(config: &AuditSettings) -> Result<Auditor, AuditError> {
        let path = &config.path;
        // A bad database address fails the start before anything is written.
        let database = config
            .database
            .as_ref()
            .map(|db| Target::new(&db.url, db.password_file.as_deref()).map(|t| (t, db.on_down)))
            .transpose()?;
        let lock = segment::lock(path).map_err(|e| AuditError::Database {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let key = CheckpointKey::load_or_create(&config.key_path())?;
        let relay = config
            .relay_id
            .clone()
            .unwrap_or_else(|| crate::govern::audit::relay_instance(None, 0));
        let (conn, migrated) =
            store::open_writer(path, config.durability, key.public_hex(), &relay)?;
        let db_error = store::sql_error(path);
        let recovered = recover(&conn, path, config.new_epoch)?;
        let heads = store::load_heads(&conn, &relay).map_err(&db_error)?;
        let last = store::last_checkpoint(&conn, &relay).map_err(&db_error)?;
        let mut verdict =
            verify::check_start(&conn, &relay, key.public_hex(), &heads, last.as_ref())
                .map_err(&db_error)?;
        if let Some(damage) = recovered.damage {
            verdict = Err(match verdict {
                Ok(()) => damage,
                Err(why) => format!("{damage}; {why}"),
            });
        }
        let first = first_checkpoint(config, &relay, migrated, verdict, last.as_ref())?;
        let chain = ChainState {
            n: last.as_ref().map_or(0, |l| l.n),
            hash: last.as_ref().map_or_else(
                || GENESIS_HEX.to_owned(),
                |l| match &l.checkpoint {
                    Ok(cp) => cp.hash(),
                    Err(_) => l.stored_hash.clone(),
                },
            ),
            epoch: first.epoch,
        };
        let checkpoint_file = config
            .checkpoint_file
            .as_deref()
            .map(|file| CheckpointFile::open(file, config.durability))
            .transpose()?;
        log_open(path, &relay, &heads, config.durability);
        let durable = config.durability == Durability::Fsync;
        let segment = SegmentFile::create(path, &relay, recovered.next, durable).map_err(|e| {
            AuditError::Database {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
        let written = heads
            .iter()
            .map(|(t, h)| (t.clone(), (h.seq, h.hash)))
            .collect();
        let log = Log::new(segment, written, path.clone(), relay.clone(), durable);
        let wal = WalCheckpointer::start(path, WAL_RESTART_FRAMES)?;
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
            .checkpoint(first.kind, &first.note, true)
            .map_err(|e| writer.write_error(&e))?;
        let shipper = database
            .map(|(target, on_down)| {
                tracing::info!(database = %target.name(), spool = %path.display(), ?on_down, "audit rows ship to the database");
                Shipper::start(ShipperSettings {
                    target,
                    spool: path.clone(),
                    on_down,
                })
            })
            .transpose()?;
        Self::start(config, writer, log, lock, shipper)
    }

    /// Starts the indexer thread over `writer` and returns the handle on the trail (and on
    /// `shipper`).
    fn start(
        config: &AuditSettings,
        writer: Writer,
        log: Log,
        lock: std::fs::File,
        shipper: Option<Shipper>,
    ) -> Result<Auditor, AuditError> {
        let path = writer.path.clone();
        let (index, rx) = mpsc::channel();
        let room = Arc::new(Semaphore::new(config.queue));
        let log = Arc::new(Mutex::new(log));
        let failing = Arc::new(Mutex::new(None));
        let indexer = Indexer {
            writer,
            log: log.clone(),
            room: room.clone(),
            failing: failing.clone(),
            retry: None,
            capacity: config.queue,
            lock: Some(lock),
        };
        std::thread::Builder::new()
            .name("audit-index".into())
            .spawn(move || indexer.run(rx))
            .map_err(AuditError::Thread)?;
        Ok(Auditor {
            inner: Arc::new(Inner {
                log,
                index,
                durable: config.durability == Durability::Fsync,
                synced: AtomicU64::new(0),
                sync_gate: tokio::sync::Mutex::new(()),
                room,
                failing,
                capture: RwLock::new(config.capture.clone()),
                path,
                shipper,
            }),
        })
    }
}

/// What the start check's `verdict` makes the run's first checkpoint: a start when the trail
/// verifies, an epoch (saying why) when it does not and `config.new_epoch` is set, else the
/// refusal.
fn first_checkpoint(
    config: &AuditSettings,
    relay: &str,
    migrated: bool,
    verdict: Result<(), String>,
    last: Option<&StoredCheckpoint>,
) -> Result<First, AuditError> {
    let path = &config.path;
    let last_epoch = last
        .and_then(|l| l.checkpoint.as_ref().ok())
        .map(|c| c.epoch);
    match verdict {
        Ok(()) => {
            if config.new_epoch {
                tracing::warn!(path = %path.display(), "the audit trail verifies: no new epoch begun (--new-audit-epoch ignored)");
            }
            let note = if migrated {
                "migrated from schema 1: rows before this checkpoint were signed by per-tenant checkpoints only"
            } else {
                ""
            };
            Ok(First {
                kind: Kind::Start,
                note: note.to_owned(),
                epoch: last_epoch.unwrap_or(1),
            })
        }
        Err(reason) if config.new_epoch => {
            tracing::warn!(path = %path.display(), relay, %reason, "the audit trail does not verify: beginning a new epoch (--new-audit-epoch)");
            Ok(First {
                kind: Kind::Epoch,
                note: reason,
                epoch: last_epoch.unwrap_or(1) + 1,
            })
        }
        Err(reason) => Err(AuditError::Untrusted {
            path: path.clone(),
            reason,
        }),
    }
}

/// Logs the opened trail.
fn log_open(path: &Path, relay: &str, heads: &HashMap<String, Head>, durability: Durability) {
    tracing::info!(
        path = %path.display(),
        relay,
        tenants = heads.len(),
        durability = ?durability,
        "audit trail open"
    );
}
