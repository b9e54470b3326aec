//! A stdio upstream: an MCP server that `connect` runs as a child process.
//!
//! Session era: every tunnel stream (one agent session) gets its own child process, in its own
//! process group, started when the stream opens and stopped when the stream ends (stdin closed,
//! then SIGKILL to the whole group after a short grace) and reaped. Messages from the relay go
//! to the child's stdin, one JSON text per line; every line the child prints on stdout is a
//! JSON-RPC message that goes back tagged with the exchange of the request it answers. A
//! progress notification goes with the request whose token it carries; any other message of
//! the server goes with the only request in flight when there is exactly one, else to the
//! agent's standalone stream. The child's stderr goes to the log, line by line, never to the
//! relay. If the child dies during its session, every pending request gets a JSON-RPC error
//! naming the source and the session ends.
//!
//! Stateless 2026-07-28 requests share one long-lived process per source, started lazily: a
//! server that answers `server/discover` with 2026-07-28 gets them as they are, any other is
//! initialized by `connect` itself in the session era and bridged (see `pool`). Each request travels with an id (and progress token) that `connect`
//! assigns, so answers of concurrent agents never mix; the answer goes back with the agent's
//! own id.
//!
//! Every child is registered with its source; `connect` kills and reaps all of them when it
//! stops ([`StdioSource::shutdown`]), and a per-source cap bounds how many run at once.
//!
//! One concept a file: this one, the source and its settings; `session`, the session era;
//! `pool`, the stateless era's pooled process; `caller`, the processes of callers that can be
//! asked for input; `remap`, re-addressing its messages;
//! `process`, a child's life; `slots`, the cap and the kill list; `lines`, the line codec;
//! `error`, what agents are told. The frame loop is the one all sources share
//! (`sources::stream`).

mod caller;
mod deliver;
mod error;
mod lines;
mod pool;
mod process;
mod remap;
mod session;
mod slots;

use std::sync::Arc;
use std::time::Duration;

use super::held::Held;
use super::stream;
use crate::transport::{RecvHalf, SendHalf};
use crate::wire::{Era, FrameReader, FrameWriter, OpenHeader};

pub(super) use error::StdioError;
use pool::Pooled;
use slots::Slots;

/// Default cap on the processes one stdio source runs at once (see
/// [`crate::config::DEFAULT_STDIO_MAX_PROCESSES`]).
pub(super) const DEFAULT_MAX_PROCESSES: usize = crate::config::DEFAULT_STDIO_MAX_PROCESSES;

/// Default time a session's process lives idle (see [`crate::config::DEFAULT_CONNECT_SESSION_IDLE_SECS`]).
pub(super) const DEFAULT_IDLE: Duration =
    Duration::from_secs(crate::config::DEFAULT_CONNECT_SESSION_IDLE_SECS);

/// How a stdio source bounds its processes (`connect`'s `stdio_max_processes` and
/// `session_idle_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StdioLimits {
    /// Processes one source runs at once.
    pub max_processes: usize,
    /// Idle time after which a session's process is stopped; zero: never.
    pub idle: Duration,
}

impl Default for StdioLimits {
    fn default() -> Self {
        Self {
            max_processes: DEFAULT_MAX_PROCESSES,
            idle: DEFAULT_IDLE,
        }
    }
}

/// Time `connect`'s shutdown waits for its killed children to be reaped.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Time the last lines of a child that exited may take to be read, before its pending
/// requests are failed: whatever it printed before dying still reaches the agent.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// A configured stdio upstream.
pub(crate) struct StdioSource {
    name: Arc<str>,
    command: Vec<String>,
    /// Idle time after which a session's process is stopped; zero: never.
    idle: Duration,
    slots: Arc<Slots>,
    pool: tokio::sync::Mutex<Option<Arc<Pooled>>>,
    /// Bridged processes of one caller each, by caller and declared capabilities, for the
    /// stateless requests that may be asked for input (see `pool`).
    callers: tokio::sync::Mutex<std::collections::HashMap<String, Arc<Pooled>>>,
    /// Whether the pooled process speaks 2026-07-28 (see `pool`), once a probe told.
    pooled_speaks_stateless: parking_lot::Mutex<Option<bool>>,
    /// The largest answer line read from a child (`max_answer_bytes`). A line is buffered
    /// whole (bounded by this) because its id must be read to route it, then sent on in
    /// pieces when it is larger than one.
    max_answer: usize,
    /// Session-era sessions, kept past their streams for a relay to resume. Their processes
    /// idle out on their own (`idle`), so the table itself never expires them.
    held: Held<session::Session>,
    /// Bytes its held sessions keep for relays (their answers and server-initiated messages),
    /// together (see [`super::replay::REPLAY_SOURCE_BYTES`]).
    replay_bytes: super::replay::SourceBytes,
}

impl StdioSource {
    /// A source `name` that runs `command` within `limits`.
    pub(crate) fn with_limits(
        name: &str,
        command: Vec<String>,
        limits: StdioLimits,
    ) -> Result<Self, String> {
        let cap = limits.max_processes;
        if command.first().is_none_or(|program| program.is_empty()) {
            return Err(format!("source {name}: stdio needs a command"));
        }
        if cap == 0 {
            return Err(format!("source {name}: the process cap must be at least 1"));
        }
        Ok(Self {
            name: name.into(),
            command,
            idle: limits.idle,
            slots: Arc::new(Slots::new(cap)),
            pool: tokio::sync::Mutex::new(None),
            callers: tokio::sync::Mutex::default(),
            pooled_speaks_stateless: parking_lot::Mutex::new(None),
            max_answer: crate::config::DEFAULT_MAX_ANSWER_BYTES,
            held: Held::new(Duration::ZERO),
            replay_bytes: super::replay::SourceBytes::default(),
        })
    }

    /// Sets the largest answer line read from a child (`max_answer_bytes`).
    pub(crate) fn with_answer_limit(mut self, max_answer: usize) -> Self {
        self.max_answer = max_answer;
        self
    }

    /// Kills every process of this source (SIGKILL to each process group), refuses to start
    /// new ones, and waits (bounded) until all are reaped.
    pub(crate) async fn shutdown(&self) {
        self.slots.close_and_kill();
        if let Ok(mut pool) = tokio::time::timeout(SHUTDOWN_WAIT, self.pool.lock()).await {
            pool.take();
        }
        if tokio::time::timeout(SHUTDOWN_WAIT, self.slots.idle())
            .await
            .is_err()
        {
            tracing::warn!(source = %self.name, live = self.slots.live(), "stdio processes still running after shutdown");
        }
    }

    /// Serves one exchange stream until it ends; `numbered`: its relay takes server-initiated
    /// messages numbered (wire version 4).
    pub(crate) async fn serve(
        self: Arc<Self>,
        header: OpenHeader,
        numbered: bool,
        reader: FrameReader<RecvHalf>,
        writer: FrameWriter<SendHalf>,
    ) {
        stream::serve(reader, writer, |inbound, out, max_frame| async move {
            match header.era {
                Era::Session => {
                    let limits = (max_frame, numbered);
                    self.serve_session(header, inbound, out, limits).await
                }
                Era::Stateless => self.serve_stateless(header, inbound, out, max_frame).await,
            }
        })
        .await;
    }

    fn error(&self, reason: impl Into<String>) -> StdioError {
        StdioError::Unsupported {
            source_name: self.name.to_string(),
            reason: reason.into(),
        }
    }

    fn exited(&self, status: String) -> StdioError {
        StdioError::Exited {
            source_name: self.name.to_string(),
            status,
        }
    }
}

impl Drop for StdioSource {
    fn drop(&mut self) {
        // Last resort: a source that goes away takes its processes with it.
        self.slots.close_and_kill();
    }
}
