//! Control-stream messages: the handshake by which `connect` proves its tenant and announces
//! its sources.

use serde::{Deserialize, Serialize};

/// The first message on a new connection, from `connect` to the relay.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Wire protocol version ([`crate::wire::PROTOCOL_VERSION`]).
    pub version: u32,
    /// The tunnel token in clear text; the relay only keeps its hash.
    pub token: String,
    /// The sources this client serves.
    pub sources: Vec<SourceAnnouncement>,
    /// The client's largest accepted frame payload, so the relay never sends more.
    pub max_frame: u64,
    /// `mcp-tunnel` version of the client, for the operator's view.
    pub agent: String,
    /// This `connect` process's instance id (random at each start): a relay sends a resumed
    /// session whose upstream only this `connect` holds (a stdio process) back to it.
    ///
    /// Wire version 2 (see [`crate::wire::version`]); sent when the relay's greeting says 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("version", &self.version)
            .field("token", &"<redacted>")
            .field("sources", &self.sources)
            .field("max_frame", &self.max_frame)
            .field("agent", &self.agent)
            .field("instance", &self.instance)
            .finish()
    }
}

/// One source a client serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceAnnouncement {
    /// The name agents use in `/mcp/{name}`.
    pub name: String,
}

/// The relay's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HelloReply {
    /// Accepted: the connection serves these sources for this tenant.
    Welcome {
        /// The tenant the token belongs to.
        tenant: String,
        /// The relay's largest accepted frame payload.
        max_frame: u64,
    },
    /// Refused, with a reason `connect` prints; the relay closes the connection after it.
    Refused {
        /// Why, in words an operator can act on.
        reason: String,
    },
}

/// The relay's first message on the control stream. The relay opens the control stream (on the
/// HTTPS fallback only the relay can open streams), and `connect` answers with [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Greeting {
    /// The relay's wire protocol version.
    pub version: u32,
}

/// What either side may say on the control stream after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Notice {
    /// The sender is shutting down: the relay routes no new session to this connection, and
    /// `connect` opens a replacement; streams in flight finish.
    Drain {
        /// Why, for the logs.
        reason: String,
    },
}
