//! Why a stdio source could not serve a message: the errors agents read, and their
//! JSON-RPC codes.

use crate::client::sources::Out;
use crate::client::sources::stream::fail_requests;
use crate::mcp::Classified;
use crate::mcp::jsonrpc::codes;

/// Why a stdio source could not serve a message, in words for the agent.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum StdioError {
    /// The source already runs as many processes as it may.
    #[error(
        "source {source_name} already runs its limit of {cap} processes (one per session); \
         end a session or retry later"
    )]
    CapReached {
        /// The source.
        source_name: String,
        /// Its cap.
        cap: usize,
    },
    /// The command could not be started.
    #[error("source {source_name} could not start {command:?}: {reason}")]
    Spawn {
        /// The source.
        source_name: String,
        /// The program.
        command: String,
        /// The operating system's reason.
        reason: String,
    },
    /// The process ended while requests were pending.
    #[error("source {source_name} exited: {status}")]
    Exited {
        /// The source.
        source_name: String,
        /// How it ended (`exit status: 3`, `signal: 9 (SIGKILL)`).
        status: String,
    },
    /// The pooled process did not complete its `initialize`.
    #[error("source {source_name} did not initialize: {reason}")]
    Init {
        /// The source.
        source_name: String,
        /// Why.
        reason: String,
    },
    /// `connect` is stopping and starts no more processes.
    #[error("source {source_name} is shutting down")]
    ShuttingDown {
        /// The source.
        source_name: String,
    },
    /// The session's process was stopped to free its place; the session is over.
    #[error("source {source_name} stopped this session's process: {why}; start a new session")]
    Reclaimed {
        /// The source.
        source_name: String,
        /// Why: idle too long, or its place went to a new session.
        why: String,
    },
    /// A message could not be forwarded as asked.
    #[error("source {source_name}: {reason}")]
    Unsupported {
        /// The source.
        source_name: String,
        /// Why.
        reason: String,
    },
}

impl StdioError {
    pub(crate) fn code(&self) -> i64 {
        match self {
            StdioError::Unsupported { .. } => codes::INVALID_REQUEST,
            _ => codes::SOURCE_UNAVAILABLE,
        }
    }

    /// Answers every request of `classified` with this error, then ends `exchange`.
    pub(super) async fn answer_all(&self, out: &Out, exchange: u64, classified: &Classified) {
        fail_requests(out, exchange, classified, self.code(), &self.to_string()).await;
    }
}
