//! One audit record: everything the trail keeps about one JSON-RPC request through the relay,
//! in either direction. The relay fills it in; the store chains and keeps it; `audit export`
//! prints it. Field names in JSON follow the OpenTelemetry MCP semantic conventions where one
//! exists (`mcp.method.name`, `gen_ai.tool.name`, `mcp.session.id`, ...).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Who sent the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// An agent's request to the private server (`tools/call`, `resources/read`, ...).
    AgentToServer,
    /// The server's request to the agent (`sampling/createMessage`, `elicitation/create`, ...).
    ServerToAgent,
}

impl Direction {
    /// Its name in JSON, columns and filters: `agent_to_server` or `server_to_agent`.
    pub fn label(self) -> &'static str {
        match self {
            Direction::AgentToServer => "agent_to_server",
            Direction::ServerToAgent => "server_to_agent",
        }
    }
}

/// Whether policy let the request through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Allowed.
    Allow,
    /// Denied: the request never reached the tunnel.
    Deny,
}

impl Verdict {
    /// Its name in JSON, columns and filters: `allow` or `deny`.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        }
    }
}

/// How the request ended, as the agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "code")]
pub enum Outcome {
    /// A successful result.
    Ok,
    /// A JSON-RPC error from the far side (or the policy's refusal), with its code.
    Error(i64),
    /// A `tools/call` result with `isError: true`: the tool ran and failed.
    ToolError,
    /// An `input_required` result (2026-07-28): the far side asked the agent for input, and
    /// the agent's retry is the call's next round (its row has the same `mcp.call.id`).
    InputRequired,
    /// The relay answered for the far side: tunnel gone, source offline, shutdown.
    TunnelError,
    /// No answer within the request timeout.
    Timeout,
    /// The agent went away before the answer (or a stream ended without one).
    Abandoned,
    /// The agent resumed the answer on another relay of the fleet: that relay's trail has
    /// the row with how it ended (see `relay::agents::replay`).
    Moved,
}

impl Outcome {
    /// A short label for metrics and filters: `ok`, `error`, `tool_error`, `input_required`,
    /// `tunnel_error`, `timeout`, `abandoned`, `moved`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error(_) => "error",
            Outcome::ToolError => "tool_error",
            Outcome::InputRequired => "input_required",
            Outcome::TunnelError => "tunnel_error",
            Outcome::Timeout => "timeout",
            Outcome::Abandoned => "abandoned",
            Outcome::Moved => "moved",
        }
    }
}

/// One request and its outcome. Chain fields (sequence, previous hash) are the store's, not
/// part of this.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// When the relay received the request, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The caller's tenant (every key of the trail starts with it).
    pub tenant: String,
    /// The caller (`enduser.id`).
    pub subject: String,
    /// The caller's roles at the time of the call.
    pub roles: Vec<String>,
    /// The source (private MCP server) addressed.
    pub source: String,
    /// The MCP session, in the session era.
    #[serde(rename = "mcp.session.id", skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The tunnel transport that carried it (`quic` or `https`); none when it never reached a
    /// tunnel (denied, or the source was offline).
    #[serde(rename = "network.transport", skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The protocol version the session negotiated or the request declared.
    #[serde(
        rename = "mcp.protocol.version",
        skip_serializing_if = "Option::is_none"
    )]
    pub protocol_version: Option<String>,
    /// Who sent the request.
    pub direction: Direction,
    /// The JSON-RPC method.
    #[serde(rename = "mcp.method.name")]
    pub method: String,
    /// The JSON-RPC id as its JSON text.
    #[serde(rename = "jsonrpc.request.id", skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The tool of a `tools/call`.
    #[serde(rename = "gen_ai.tool.name", skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The resource of a `resources/read` or subscription.
    #[serde(rename = "mcp.resource.uri", skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The prompt of a `prompts/get`.
    #[serde(rename = "gen_ai.prompt.name", skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Allowed or denied.
    pub decision: Verdict,
    /// The rule that decided (`role analyst allows everything/echo`, `no roles`, ...).
    pub rule: String,
    /// How it ended.
    pub outcome: Outcome,
    /// From request received to the answer released to the agent, microseconds.
    pub latency_us: u64,
    /// Size of the request message, bytes.
    pub bytes_in: u64,
    /// Size of the answer message(s), bytes.
    pub bytes_out: u64,
    /// sha256 (hex) of the request's `params` JSON text, as received.
    pub args_sha256: String,
    /// The `params`, redacted, when the source's audit level is `full`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<String>,
    /// The `result` (or `error`), redacted, when the source's audit level is `full`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// The call this request is a round of, when it took more than one (2026-07-28
    /// `input_required` answers and their retries, whichever eras meet): the same random id on
    /// every round's row. In the hashed record only (no column).
    #[serde(
        rename = "mcp.call.id",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub call: Option<String>,
}

/// The hex sha256 of `bytes`: the digest of arguments kept in every record.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Record {
    /// The name the request acted on, whichever kind it is.
    pub fn target(&self) -> Option<&str> {
        self.tool
            .as_deref()
            .or(self.resource.as_deref())
            .or(self.prompt.as_deref())
    }
}

/// Fixtures for tests and benchmarks (the `test-support` feature, which the crate's own tests
/// and benches turn on): one way to make a plausible record, each caller overriding what it
/// varies with struct update syntax.
#[cfg(any(test, feature = "test-support"))]
impl Record {
    /// The `n`th record of a run for `tenant`: `alice@TENANT.example` (role `analyst`) calls
    /// tool `query` of source `db` over QUIC, allowed, answered, request id `n`, at
    /// `1_764_000_000_000 + n` ms.
    pub fn example(tenant: &str, n: u64) -> Self {
        Self {
            time_ms: 1_764_000_000_000 + n,
            tenant: tenant.into(),
            subject: format!("alice@{tenant}.example"),
            roles: vec!["analyst".into()],
            source: "db".into(),
            session: None,
            transport: Some("quic".into()),
            protocol_version: Some(crate::mcp::era::LATEST_SESSION_VERSION.into()),
            direction: Direction::AgentToServer,
            method: "tools/call".into(),
            request_id: Some(n.to_string()),
            tool: Some("query".into()),
            resource: None,
            prompt: None,
            decision: Verdict::Allow,
            rule: "role analyst allows db/query".into(),
            outcome: Outcome::Ok,
            latency_us: 100,
            bytes_in: 80,
            bytes_out: 90,
            args_sha256: digest(b"{}"),
            args: None,
            result: None,
            call: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            time_ms: 1_764_000_000_000,
            session: Some("s1".into()),
            decision: Verdict::Deny,
            rule: "no role allows db/query".into(),
            outcome: Outcome::Error(-32602),
            latency_us: 120,
            ..Record::example("acme", 7)
        }
    }

    #[test]
    fn json_uses_the_semantic_convention_names_and_round_trips() {
        let record = sample();
        let json = serde_json::to_value(&record).expect("a record always serializes");
        assert_eq!(json["mcp.method.name"], "tools/call");
        assert_eq!(json["gen_ai.tool.name"], "query");
        assert_eq!(json["mcp.session.id"], "s1");
        assert_eq!(json["outcome"]["kind"], "error");
        assert_eq!(json["outcome"]["code"], -32602);
        assert_eq!(json["decision"], "deny");
        assert!(json.get("args").is_none());
        assert_eq!(json["decision"], record.decision.label());
        assert_eq!(json["direction"], record.direction.label());
        let back: Record = serde_json::from_value(json).expect("round trip");
        assert_eq!(back, record);
        assert_eq!(back.target(), Some("query"));
    }

    #[test]
    fn the_digest_is_sha256_hex() {
        assert_eq!(
            digest(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
