//! Configuration hot reload: on SIGHUP, and when the file changes on disk, the relay reads its
//! configuration file again and swaps in the new agent keys, tunnel tokens, roles (with their
//! conditions), identity providers, `[rate_limits]` and `[limits]`.
//!
//! - What changes applies to new requests (and new tunnel handshakes); open sessions and tunnels
//!   stay. A session whose key was removed gets 401 on its next request, like any request with
//!   that key; a role changed applies to the next call of every open session; a new
//!   `request_timeout_secs` applies to requests sent after the reload, a new
//!   `session_idle_secs` at the next sweep.
//! - Rate limit buckets carry over when `[rate_limits]` is unchanged; when it changes, new
//!   buckets (full) start with the new rates.
//! - A file that does not load (unreadable, not TOML, an unknown key, a role that is not
//!   defined, a condition that does not compile, ...) is refused: the error is logged naming
//!   the problem (key and line where the parser has them; tenant and role for a condition) and
//!   the running configuration stays.
//! - What still needs a restart: listeners, certificates, `[agents]` settings, `[admin]`,
//!   `[audit]`, `[fleet]`, and raising `[limits] max_message_bytes` above the value the relay
//!   started with (every tunnel agreed on that frame limit at its handshake; lowering it
//!   applies to agent requests at once). When these differ in the file, a warning says a restart is
//!   needed to apply them, and the rest of the file is applied.
//!
//! [`Reloader`] does one reload; [`watch`] runs the loop (a poll of the file's modification
//! stamp, and a [`Notify`] that `main` pokes on SIGHUP).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::governance::{Governance, load_config};
use super::listener_limits::ListenerLimits;
use super::state::RelayState;
use crate::config::{ConfigError, LimitsSection, RelayConfig};

/// How often [`watch`] looks at the file's modification stamp in the relay binary.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What identifies one version of the file without reading it: modification time, length and
/// (on Unix) the inode, so that an editor's rename-into-place is seen even when it keeps the
/// time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    /// The stamp of the file at `path` now (following symbolic links), or `None` if it cannot
    /// be read.
    pub fn read(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Some(Self {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode,
        })
    }
}

/// A configuration file as loaded, with the file's stamp from before it was read: a change
/// made while (or after) it was read is seen by the next poll.
pub struct LoadedConfig {
    /// The configuration.
    pub config: RelayConfig,
    stamp: Option<FileStamp>,
}

impl LoadedConfig {
    /// Reads and checks the relay configuration file at `path` (see [`load_config`]).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let stamp = FileStamp::read(path);
        let config = load_config(path)?;
        Ok(Self { config, stamp })
    }
}

/// Why a reload was refused. The running configuration stays in every case.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file could not be read, parsed or checked; the message names the problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Reading the file did not finish (the blocking task failed).
    #[error("reading {path}: {message}")]
    Task {
        /// The file.
        path: PathBuf,
        /// What happened to the task.
        message: String,
    },
}

/// How one kind of item (tenants, keys, ...) differs between two configurations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Change {
    /// How many there were.
    pub before: usize,
    /// How many there are now.
    pub after: usize,
    /// New ones.
    pub added: usize,
    /// Ones no longer there.
    pub removed: usize,
    /// Ones still there but different (a key's subject or roles, a role's globs).
    pub changed: usize,
}

impl Change {
    fn between<K: Ord, V: PartialEq>(before: &BTreeMap<K, V>, after: &BTreeMap<K, V>) -> Self {
        let added = after.keys().filter(|k| !before.contains_key(*k)).count();
        let removed = before.keys().filter(|k| !after.contains_key(*k)).count();
        let changed = after
            .iter()
            .filter(|(k, v)| before.get(*k).is_some_and(|old| old != *v))
            .count();
        Self {
            before: before.len(),
            after: after.len(),
            added,
            removed,
            changed,
        }
    }

    /// Whether anything differs.
    pub fn is_empty(&self) -> bool {
        self.added == 0 && self.removed == 0 && self.changed == 0
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} (+{} -{} ~{})",
            self.before, self.after, self.added, self.removed, self.changed
        )
    }
}

/// What a successful reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Tenants, by name.
    pub tenants: Change,
    /// Agent API keys, by tenant and digest.
    pub keys: Change,
    /// Tunnel tokens, by tenant and digest.
    pub tunnel_tokens: Change,
    /// Roles, by tenant and name.
    pub roles: Change,
    /// Sections that differ in the file but apply only after a restart.
    pub restart_needed: Vec<&'static str>,
}

/// Every item of a configuration that reload applies, keyed for comparison.
struct Items {
    tenants: BTreeMap<String, ()>,
    keys: BTreeMap<(String, String), String>,
    tunnel_tokens: BTreeMap<(String, String), String>,
    roles: BTreeMap<(String, String), String>,
}

impl Items {
    fn of(config: &RelayConfig) -> Self {
        let mut items = Self {
            tenants: BTreeMap::new(),
            keys: BTreeMap::new(),
            tunnel_tokens: BTreeMap::new(),
            roles: BTreeMap::new(),
        };
        for tenant in &config.tenants {
            let name = &tenant.name;
            items.tenants.insert(name.clone(), ());
            for token in &tenant.tunnel_tokens {
                items
                    .tunnel_tokens
                    .insert((name.clone(), token.to_ascii_lowercase()), String::new());
            }
            for bound in &tenant.tunnels {
                items.tunnel_tokens.insert(
                    (name.clone(), bound.token.to_ascii_lowercase()),
                    format!("{:?}", bound.sources),
                );
            }
            for key in &tenant.keys {
                items.keys.insert(
                    (name.clone(), key.key.to_ascii_lowercase()),
                    format!("{:?} {:?}", key.subject, key.roles),
                );
            }
            for role in &tenant.roles {
                // The debug form holds every field, so a glob list added later counts too.
                items
                    .roles
                    .insert((name.clone(), role.name.clone()), format!("{role:?}"));
            }
        }
        items
    }
}

/// The sections read only at start that differ between `running` and `new`. They are compared
/// in their debug form, which holds every field.
fn restart_needed(running: &RelayConfig, new: &RelayConfig) -> Vec<&'static str> {
    let differs = |a: &dyn fmt::Debug, b: &dyn fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut sections = Vec::new();
    if differs(&running.tunnel, &new.tunnel) {
        sections.push("[tunnel] (listen address, certificate, key)");
    }
    if differs(&running.agents, &new.agents) {
        sections.push("[agents]");
    }
    if differs(&running.admin, &new.admin) {
        sections.push("[admin]");
    }
    if differs(&running.audit, &new.audit) {
        sections.push("[audit]");
    }
    if differs(&running.fleet, &new.fleet) {
        sections.push("[fleet] (instance id, drain delay)");
    }
    if new.limits.max_message_bytes > running.limits.max_message_bytes {
        sections.push("[limits] max_message_bytes (raised above the starting value)");
    }
    if ListenerLimits::from(&new.limits) != ListenerLimits::from(&running.limits) {
        sections.push(
            "[limits] listener and tunnel admission bounds (header and idle timeouts, \
             connection caps, tunnel handshakes, tunnel receive window)",
        );
    }
    sections
}

/// An error message on one log line: the TOML parser's source excerpt (the lines drawn with
/// `|` and `^`) is dropped, the rest (file, line and column, and what is wrong) is kept.
fn one_line(message: &str) -> String {
    let excerpt = |line: &str| {
        let rest = line
            .trim_start()
            .trim_start_matches(|c: char| c.is_ascii_digit());
        rest.trim_start().starts_with('|')
    };
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !excerpt(line))
        .collect::<Vec<_>>()
        .join(": ")
}

/// Reloads one relay's configuration from its file.
pub struct Reloader {
    path: PathBuf,
    state: Arc<RelayState>,
    /// The configuration in force: its tenants, identity providers, rate limits and limits are
    /// the file's last good ones, every other section what the relay started with.
    running: RelayConfig,
    stamp: Option<FileStamp>,
}

impl Reloader {
    /// A reloader for the relay whose state is `state`, started from `loaded` (read from
    /// `path`).
    pub fn new(path: impl Into<PathBuf>, state: Arc<RelayState>, loaded: LoadedConfig) -> Self {
        Self {
            path: path.into(),
            state,
            running: loaded.config,
            stamp: loaded.stamp,
        }
    }

    /// The configuration file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file's stamp differs from the one it had when last read.
    pub fn file_changed(&self) -> bool {
        FileStamp::read(&self.path) != self.stamp
    }

    /// Reads the file again and, if it loads, swaps in its keys, tunnel tokens, roles, identity
    /// providers and limits.
    /// Logs the outcome: what changed in counts, sections that need a restart, or the error
    /// that refused the file (the running configuration then stays).
    pub async fn reload(&mut self) -> Result<ReloadSummary, ReloadError> {
        let result = self.try_reload().await;
        match &result {
            Ok(summary) => {
                tracing::info!(
                    path = %self.path.display(),
                    tenants = %summary.tenants,
                    keys = %summary.keys,
                    tunnel_tokens = %summary.tunnel_tokens,
                    roles = %summary.roles,
                    "configuration reloaded: keys, tunnel tokens, roles and limits apply to new requests"
                );
                if !summary.restart_needed.is_empty() {
                    tracing::warn!(
                        path = %self.path.display(),
                        sections = %summary.restart_needed.join(", "),
                        "configuration changed where reload cannot apply it: restart the relay to apply these sections"
                    );
                }
            }
            Err(error) => tracing::error!(
                path = %self.path.display(),
                error = %one_line(&error.to_string()),
                "configuration reload refused; the running configuration stays"
            ),
        }
        result
    }

    async fn try_reload(&mut self) -> Result<ReloadSummary, ReloadError> {
        // The stamp from before reading: a change made while reading is seen by the next poll.
        // Whatever the outcome, this version of the file has been seen, so a refused file is
        // reported once, not at every poll.
        self.stamp = FileStamp::read(&self.path);
        let path = self.path.clone();
        let new = tokio::task::spawn_blocking(move || RelayConfig::load(&path))
            .await
            .map_err(|e| ReloadError::Task {
                path: self.path.clone(),
                message: e.to_string(),
            })??;
        let mut governance =
            Governance::from_config(&new).map_err(|message| ConfigError::Invalid {
                path: self.path.clone(),
                message,
            })?;
        if new.rate_limits == self.running.rate_limits {
            governance.limiter = self.state.governance().limiter.clone();
        }
        let (old_items, new_items) = (Items::of(&self.running), Items::of(&new));
        let summary = ReloadSummary {
            tenants: Change::between(&old_items.tenants, &new_items.tenants),
            keys: Change::between(&old_items.keys, &new_items.keys),
            tunnel_tokens: Change::between(&old_items.tunnel_tokens, &new_items.tunnel_tokens),
            roles: Change::between(&old_items.roles, &new_items.roles),
            restart_needed: restart_needed(&self.running, &new),
        };
        self.state.reload(governance);
        self.running.tenants = new.tenants;
        self.running.identity_providers = new.identity_providers;
        self.running.rate_limits = new.rate_limits;
        // The starting frame limit and listener bounds stay the reference for what needs a
        // restart.
        let started = &self.running.limits;
        self.running.limits = LimitsSection {
            max_message_bytes: started.max_message_bytes,
            agent_header_timeout_secs: started.agent_header_timeout_secs,
            agent_idle_timeout_secs: started.agent_idle_timeout_secs,
            max_agent_connections: started.max_agent_connections,
            max_admin_connections: started.max_admin_connections,
            max_tunnel_handshakes: started.max_tunnel_handshakes,
            tunnel_handshake_timeout_secs: started.tunnel_handshake_timeout_secs,
            tunnel_receive_window_bytes: started.tunnel_receive_window_bytes,
            ..new.limits
        };
        Ok(summary)
    }
}

/// Reloads on every `hangup` notification (SIGHUP in the relay binary) and whenever the file's
/// modification stamp changes (looked at every `poll`), until `shutdown` fires. A refused file
/// leaves the running configuration in place; the next change or SIGHUP tries again.
pub async fn watch(
    mut reloader: Reloader,
    poll: Duration,
    hangup: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gone_reported = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hangup.notified() => {
                tracing::info!(path = %reloader.path().display(), "SIGHUP: reloading the configuration");
            }
            _ = tick.tick() => {
                if !reloader.file_changed() {
                    continue;
                }
                // A file being replaced may be missing for a moment: say so once, keep the
                // running configuration, and reload when it is back.
                if FileStamp::read(reloader.path()).is_none() {
                    if !gone_reported {
                        tracing::warn!(path = %reloader.path().display(), "configuration file cannot be read; the running configuration stays");
                        gone_reported = true;
                    }
                    continue;
                }
                gone_reported = false;
                tracing::info!(path = %reloader.path().display(), "configuration file changed: reloading");
            }
        }
        // The outcome is logged by `reload`.
        let _ = reloader.reload().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_counts_added_removed_and_changed() {
        let before: BTreeMap<&str, u8> = [("a", 1), ("b", 2), ("c", 3)].into();
        let after: BTreeMap<&str, u8> = [("a", 1), ("b", 9), ("d", 4), ("e", 5)].into();
        let change = Change::between(&before, &after);
        assert_eq!(
            change,
            Change {
                before: 3,
                after: 4,
                added: 2,
                removed: 1,
                changed: 1
            }
        );
        assert_eq!(change.to_string(), "3 -> 4 (+2 -1 ~1)");
        assert!(Change::between(&before, &before).is_empty());
    }

    #[test]
    fn parse_errors_fit_on_one_line_and_keep_the_key_and_line() {
        let message = "/etc/relay.toml: TOML parse error at line 15, column 1\n   |\n15 | bogus_key = 1\n   | ^^^^^^^^^\nunknown field `bogus_key`, expected one of `subject`, `roles`, `key`\n";
        assert_eq!(
            one_line(message),
            "/etc/relay.toml: TOML parse error at line 15, column 1: unknown field `bogus_key`, expected one of `subject`, `roles`, `key`"
        );
        assert_eq!(one_line("plain"), "plain");
    }
}
