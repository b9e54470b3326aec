//! Why an upstream exchange failed, in words for the agent, and its JSON-RPC code.

use http::StatusCode;

use crate::mcp::jsonrpc::codes;

/// Why an upstream exchange failed, in words for the agent.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpstreamError {
    #[error("source {source_name} is unreachable: {reason}")]
    Unreachable { source_name: String, reason: String },
    #[error("source {source_name} answered HTTP {status}: {body}")]
    Status {
        source_name: String,
        status: StatusCode,
        body: String,
    },
    #[error("source {source_name} sent a response larger than the limit of {limit} bytes")]
    TooLarge { source_name: String, limit: usize },
    /// A bridged session the upstream forgot (it answered `404`): opened again and the
    /// request sent once more (see [`super::bridge`]).
    #[error("source {source_name} ended the session")]
    Expired { source_name: String },
    #[error("source {source_name}: {reason}")]
    Broken { source_name: String, reason: String },
    /// The answer failed after some of its pieces went to the relay: the exchange's `End`
    /// (with no closing piece) tells the relay it was abandoned; no error message may follow,
    /// as it would read as the rest of the message.
    #[error("source {source_name}: the answer broke off after {sent} bytes: {reason}")]
    BrokeOff {
        source_name: String,
        sent: usize,
        reason: String,
    },
}

impl UpstreamError {
    pub(super) fn code(&self) -> i64 {
        match self {
            UpstreamError::TooLarge { .. } => codes::TOO_LARGE,
            UpstreamError::Status { .. } => codes::INTERNAL_ERROR,
            _ => codes::SOURCE_UNAVAILABLE,
        }
    }
}
