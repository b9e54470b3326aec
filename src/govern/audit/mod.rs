//! The audit trail: what the relay records of every call.

pub mod record;

pub use record::{Direction, Outcome, Record, Verdict, digest};
