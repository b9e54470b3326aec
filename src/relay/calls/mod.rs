//! Calls: every JSON-RPC request through the relay, from the moment it arrives until its
//! record is written. A [`Call`] is finished in one place ([`Calls::finish`]), which hands it to
//! the audit trail, the metrics ([`metrics`], with the names they may carry in
//! [`metric_names`]) and the live activity feed ([`activity`]). [`filter`] removes from list
//! answers what the caller may not use.

pub(crate) mod activity;
mod call;
pub(crate) mod filter;
pub(crate) mod metric_names;
mod metrics;
mod rows;
mod stats;

pub(super) use activity::Activity;
pub(super) use call::{
    Call, Calls, Context, InFlight, outcome_of, source_error_body, unaudited_body,
};
pub(super) use rows::{CallRow, ToolRow};
