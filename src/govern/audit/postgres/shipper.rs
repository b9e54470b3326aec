//! The relay's shipper: a thread of its own that copies the spool (the relay's SQLite trail)
//! into the `[audit] url` database for as long as the relay runs, and once more at its close.
//!
//! It runs on its own thread with a single-threaded runtime: the spool's SQLite connection
//! blocks and is not `Sync`, and shipping must never take a worker other tenants' calls need.
//! Rows reach the database in batches of up to [`super::ship::SHIP_BATCH`] per transaction:
//! whatever the relay committed since the last round, so under load many rows share one
//! database commit (group commit) and a call never waits for the database.
//!
//! When the database is slow or away, the relay goes on answering: its rows are durable in the
//! spool, and the shipper retries with a backoff up to [`MAX_BACKOFF`], reporting the spool's
//! depth and age as metrics. Operators who prefer refusing calls to spooling set
//! `[audit] on_database_down = "refuse"`: then [`Shipper::refusal`] says why calls are refused
//! while the database does not answer or has not finished a round of shipping for
//! [`REFUSE_AFTER`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use tokio::sync::{oneshot, watch};

use super::ship::ship_spool;
use super::spool::{Marks, spool_depth};
use super::{Target, migrate};
use crate::govern::audit::AuditError;
use crate::metrics as names;

/// How often an idle shipper looks for new rows: rows reach the database this long after their
/// call at most while it answers, and a busy relay's rows of that long share a transaction.
pub const SHIP_POLL: Duration = Duration::from_millis(50);

/// The first wait before reconnecting to a database that did not answer; it doubles up to
/// [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(250);

/// The longest wait between attempts to reach the database: a database back from an outage
/// gets rows again within this long.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The longest one round of shipping may take before the connection is deemed dead (a
/// database that stopped answering without closing it) and dropped.
pub const ROUND_TIMEOUT: Duration = Duration::from_secs(30);

/// With `on_database_down = "refuse"`: calls are refused once no round of shipping has ended
/// well for this long (a database that hangs without closing the connection), and while the
/// database does not answer. Long enough that a database commit under load never trips it.
pub const REFUSE_AFTER: Duration = Duration::from_secs(10);

/// How long the relay's close waits for the last round (the close checkpoint shipped).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

/// How often the spool's depth is counted while a backlog drains (idle rounds count it every
/// time: nothing to scan then).
const DEPTH_EVERY: Duration = Duration::from_secs(1);

/// SQLite's wait for the writer's lock when the shipper notes its marks.
const SPOOL_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// `[audit] on_database_down`: what the relay does while the database does not take rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnDatabaseDown {
    /// Go on answering; rows wait in the spool and ship once the database answers.
    #[default]
    Spool,
    /// Refuse calls (fail closed) while the database does not answer or the spool's oldest
    /// row is older than [`REFUSE_AFTER`].
    Refuse,
}

/// What the shipper needs.
#[derive(Debug, Clone)]
pub struct ShipperSettings {
    /// The database.
    pub target: Target,
    /// The spool: the relay's SQLite trail.
    pub spool: PathBuf,
    /// What to do while the database does not take rows.
    pub on_down: OnDatabaseDown,
}

/// What the shipper tells the relay (read on every call in `refuse` mode: atomics only).
#[derive(Debug)]
struct Health {
    /// Whether the last attempt to connect or ship succeeded.
    up: AtomicBool,
    /// Whether the last attempt failed because the database holds this relay's rows with
    /// other hashes ([`AuditError::Forked`]).
    forked: AtomicBool,
    /// When the last round of shipping ended well (ms since the epoch): an idle round too,
    /// since nothing waited then. A round that hangs on the database stops it moving.
    progress_ms: AtomicI64,
}

/// The running shipper; [`Shipper::close`] ships a last time and stops it.
#[derive(Debug)]
pub struct Shipper {
    health: Arc<Health>,
    on_down: OnDatabaseDown,
    name: String,
    stop: watch::Sender<bool>,
    stopped: parking_lot::Mutex<Option<oneshot::Receiver<()>>>,
}

impl Shipper {
    /// Starts shipping the spool to the database on a thread of its own. Fails only if the
    /// thread cannot be started; an unreachable database is retried, never fatal.
    pub fn start(settings: ShipperSettings) -> Result<Shipper, AuditError> {
        let health = Arc::new(Health {
            up: AtomicBool::new(false),
            forked: AtomicBool::new(false),
            progress_ms: AtomicI64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let (done, stopped) = oneshot::channel();
        let name = settings.target.name().to_owned();
        let on_down = settings.on_down;
        let thread_health = health.clone();
        std::thread::Builder::new()
            .name("audit-shipper".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!(error = %e, "audit shipper: cannot build its runtime");
                        return;
                    }
                };
                runtime.block_on(run(settings, thread_health, stop_rx));
                let _ = done.send(());
            })
            .map_err(AuditError::Thread)?;
        Ok(Shipper {
            health,
            on_down,
            name,
            stop,
            stopped: parking_lot::Mutex::new(Some(stopped)),
        })
    }

    /// With `on_database_down = "refuse"`, why calls are refused now (the database does not
    /// answer, or no round of shipping has ended well for [`REFUSE_AFTER`]); `None` while
    /// calls may go on.
    pub fn refusal(&self) -> Option<String> {
        if self.on_down != OnDatabaseDown::Refuse {
            return None;
        }
        if self.health.forked.load(Ordering::Relaxed) {
            return Some(format!(
                "the audit database {} holds this relay's rows with other hashes",
                self.name
            ));
        }
        if !self.health.up.load(Ordering::Relaxed) {
            return Some(format!("the audit database {} does not answer", self.name));
        }
        let progress = self.health.progress_ms.load(Ordering::Relaxed);
        let behind = now_ms().saturating_sub(progress) > REFUSE_AFTER.as_millis() as i64;
        behind.then(|| {
            format!(
                "the audit database {} has not taken rows for over {} s",
                self.name,
                REFUSE_AFTER.as_secs()
            )
        })
    }

    /// Ships what the spool holds one last time (after the trail's close, so its close
    /// checkpoint too) and stops; waits at most [`CLOSE_TIMEOUT`].
    pub async fn close(&self) {
        let _ = self.stop.send(true);
        let stopped = self.stopped.lock().take();
        if let Some(stopped) = stopped
            && tokio::time::timeout(CLOSE_TIMEOUT, stopped).await.is_err()
        {
            tracing::warn!(database = %self.name, "audit shipper did not finish in time; the spool keeps the rest");
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The shipper's loop: connect (with backoff), then ship round after round until stopped;
/// at the stop one last round.
async fn run(settings: ShipperSettings, health: Arc<Health>, mut stop: watch::Receiver<bool>) {
    let mut spool = match Spool::open(settings, health) {
        Ok(spool) => spool,
        Err(e) => {
            tracing::error!(error = %e, "audit shipper cannot open the spool");
            return;
        }
    };
    let name = spool.name.clone();
    let mut backoff = MIN_BACKOFF;
    let mut was_up = true;
    loop {
        let stopping = *stop.borrow();
        let connected = async {
            let client = spool.settings.target.connect().await?;
            migrate(&client, &name).await?;
            // The spool marks a row shipped once this commit returns: it must be durable in
            // the database, whatever the database's default (`off` would lose rows the
            // spool no longer ships on a database crash).
            client
                .batch_execute("SET synchronous_commit = on")
                .await
                .map_err(super::pg_error(&name))?;
            Ok::<_, AuditError>(client)
        };
        let outcome = match tokio::time::timeout(ROUND_TIMEOUT, connected).await {
            Ok(Ok(mut client)) => {
                if !was_up {
                    tracing::info!(database = %name, "audit database answers again");
                }
                was_up = true;
                backoff = MIN_BACKOFF;
                spool.ship_until_stopped(&mut client, &mut stop).await
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AuditError::Database {
                path: name.clone().into(),
                message: format!("no connection within {ROUND_TIMEOUT:?}"),
            }),
        };
        match outcome {
            Ok(()) => return,
            Err(e) => {
                spool.health.up.store(false, Ordering::Relaxed);
                metrics::gauge!(names::AUDIT_DATABASE_UP).set(0.0);
                let forked = matches!(e, AuditError::Forked { .. });
                spool.health.forked.store(forked, Ordering::Relaxed);
                if forked {
                    // Not an outage: it lasts until an operator acts, so it is said every time.
                    tracing::error!(database = %name, error = %e, "audit rows cannot ship; they wait in the spool");
                } else if was_up {
                    tracing::warn!(database = %name, error = %e, "audit database does not take rows; they wait in the spool");
                } else {
                    tracing::debug!(database = %name, error = %e, "audit database still down");
                }
                was_up = false;
            }
        }
        spool.report_depth();
        if stopping {
            spool.note_marks();
            tracing::warn!(database = %name, spool = %spool.settings.spool.display(), "relay stopping with unshipped audit rows; they ship at its next start");
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The spool as the shipper holds it: its connection, where shipping stands, and what it
/// tells the relay.
struct Spool {
    conn: Connection,
    marks: Marks,
    settings: ShipperSettings,
    health: Arc<Health>,
    /// The database's name (without its password).
    name: String,
    /// When the depth metrics were last read.
    reported: Instant,
}

impl Spool {
    fn open(settings: ShipperSettings, health: Arc<Health>) -> Result<Self, AuditError> {
        let path = &settings.spool;
        let conn = Connection::open(path)
            .and_then(|conn| {
                conn.busy_timeout(SPOOL_BUSY_TIMEOUT)?;
                Ok(conn)
            })
            .map_err(|e| AuditError::Database {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let marks = Marks::load(&conn, path)?;
        Ok(Self {
            conn,
            marks,
            name: settings.target.name().to_owned(),
            settings,
            health,
            reported: Instant::now(),
        })
    }

    /// Ships rounds until stopped (`Ok` after the last round, its marks noted) or the
    /// database fails (`Err`: the caller reconnects).
    async fn ship_until_stopped(
        &mut self,
        client: &mut tokio_postgres::Client,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), AuditError> {
        loop {
            let stopping = *stop.borrow();
            let shipping = ship_spool(
                client,
                &self.name,
                &self.conn,
                &self.settings.spool,
                &mut self.marks,
            );
            let round = tokio::time::timeout(ROUND_TIMEOUT, shipping)
                .await
                .unwrap_or_else(|_| {
                    Err(AuditError::Database {
                        path: self.name.clone().into(),
                        message: format!("a round of shipping took over {ROUND_TIMEOUT:?}"),
                    })
                })?;
            self.health.up.store(true, Ordering::Relaxed);
            self.health.forked.store(false, Ordering::Relaxed);
            self.health.progress_ms.store(now_ms(), Ordering::Relaxed);
            metrics::gauge!(names::AUDIT_DATABASE_UP).set(1.0);
            // Counting a large backlog's rows costs a scan: while one drains, once a second.
            let idle = round.rows == 0 && round.checkpoints == 0;
            if idle || self.reported.elapsed() >= DEPTH_EVERY {
                self.report_depth();
            }
            if stopping {
                self.note_marks();
                return Ok(());
            }
            if idle {
                // Idle rounds read only the spool: notice a database that went away (its
                // connection closed) now, not at the next row, so `refuse` mode reacts at once.
                if client.is_closed() {
                    return Err(AuditError::Database {
                        path: self.name.clone().into(),
                        message: "the connection closed".into(),
                    });
                }
                tokio::select! {
                    _ = tokio::time::sleep(SHIP_POLL) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    /// Notes the marks in the spool now (the stop): the next start ships from there.
    fn note_marks(&mut self) {
        if let Err(e) = self.marks.note(&self.conn, &self.settings.spool, true) {
            tracing::warn!(error = %e, "audit shipper cannot note its marks; the next start ships again from the last note");
        }
    }

    /// Reads the spool's depth into the metrics and the health the relay reads.
    fn report_depth(&mut self) {
        self.reported = Instant::now();
        match spool_depth(&self.conn, &self.settings.spool, self.marks.rows) {
            Ok((rows, oldest)) => {
                let oldest = oldest.unwrap_or(0);
                metrics::gauge!(names::AUDIT_SPOOL_ROWS).set(rows as f64);
                let age = if oldest > 0 {
                    now_ms().saturating_sub(oldest) as f64 / 1000.0
                } else {
                    0.0
                };
                metrics::gauge!(names::AUDIT_SPOOL_AGE_SECONDS).set(age.max(0.0));
            }
            Err(e) => tracing::warn!(error = %e, "audit shipper cannot read the spool's depth"),
        }
    }
}

impl Drop for Shipper {
    /// A shipper dropped without [`Shipper::close`] (the relay failed) still stops its thread,
    /// after one last round.
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}
