//! Just enough MCP to govern it: JSON-RPC message classification and protocol eras.
//!
//! Messages stay as bytes; these helpers read the few fields routing, policy and audit need
//! (kind, id, method, tool or resource name) and never re-serialise a message.

pub mod bridge;
pub mod era;
pub mod jsonrpc;
pub mod scan;
pub mod sse;
pub mod sse_reader;
pub mod tasks;

pub use era::era_of;
pub use jsonrpc::{Classified, MessageInfo, MessageKind, classify};
pub use scan::{ResponseFacts, ResponseScanner};
