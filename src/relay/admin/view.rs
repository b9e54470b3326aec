//! What the page and `/api/activity` read: a snapshot of tunnels, sessions, latest calls and
//! per-tool figures, as JSON.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::relay::calls::{CallRow, ToolRow};
use crate::relay::state::RelayState;
use crate::relay::tunnel::TunnelRow;

/// A source seen in calls that no tunnel serves now.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct OfflineSource {
    /// Tenant.
    pub tenant: String,
    /// Source.
    pub source: String,
}

/// Calls, denials and errors added up over the rows shown.
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Totals {
    /// Calls.
    pub calls: u64,
    /// Denied calls.
    pub denied: u64,
    /// Allowed calls that ended in an error.
    pub errors: u64,
}

/// Everything the page shows, for one tenant or all. The first event of `/activity/events`
/// and the body of `/api/activity`; the periodic refresh is the same without `calls`.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Snapshot {
    /// The relay instance this is the activity of (each relay of a fleet has its own).
    pub relay: String,
    /// The tenant filter, if any.
    pub tenant: Option<String>,
    /// Every tenant seen (in tunnels or calls), to fill the page's filter.
    pub tenants: BTreeSet<String>,
    /// Live tunnels, one row per (tunnel, source).
    pub tunnels: Vec<TunnelRow>,
    /// Sources seen in calls that no tunnel serves now.
    pub offline: Vec<OfflineSource>,
    /// Live agent sessions.
    pub sessions: usize,
    /// Totals over `tools`.
    pub totals: Totals,
    /// Per (tenant, source, tool) figures.
    pub tools: Vec<ToolRow>,
    /// The latest calls, newest first (absent from refreshes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls: Option<Vec<CallRow>>,
}

impl Snapshot {
    /// The state of the relay now, for `tenant` (all when `None`), with the latest calls when
    /// `with_calls`.
    pub(super) fn of(state: &RelayState, tenant: Option<&str>, with_calls: bool) -> Self {
        let activity = &state.activity;
        let all_tunnels = state.registry.rows();
        let mut tenants = activity.tenants();
        tenants.extend(all_tunnels.iter().map(|t| t.tenant.clone()));
        let tunnels: Vec<TunnelRow> = all_tunnels
            .into_iter()
            .filter(|t| tenant.is_none_or(|want| t.tenant == want))
            .collect();
        let tools = activity.tools(tenant);
        let offline: BTreeSet<OfflineSource> = tools
            .iter()
            .filter(|row| !row.overflow)
            .filter(|row| {
                !tunnels
                    .iter()
                    .any(|t| t.tenant == row.tenant && t.source == row.source)
            })
            .map(|row| OfflineSource {
                tenant: row.tenant.clone(),
                source: row.source.clone(),
            })
            .collect();
        let totals = tools.iter().fold(Totals::default(), |sum, row| Totals {
            calls: sum.calls + row.calls,
            denied: sum.denied + row.denied,
            errors: sum.errors + row.errors,
        });
        Self {
            relay: state.instance.to_string(),
            tenant: tenant.map(str::to_owned),
            tenants,
            tunnels,
            offline: offline.into_iter().collect(),
            sessions: state.sessions.count(tenant),
            totals,
            tools,
            calls: with_calls.then(|| activity.latest(tenant)),
        }
    }
}
