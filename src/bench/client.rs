//! One MCP client over Streamable HTTP, as lean as the load generator needs: session setup in
//! the session era, `tools/call` in either era, answers read as JSON or SSE and classified with
//! the relay's own code, never parsed into a tree: a JSON answer with the
//! [`ResponseScanner`] as it arrives (so a 100 MiB result costs no 100 MiB buffer), SSE events
//! with [`classify`](crate::mcp::classify).

use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};

use super::Era;
use crate::mcp::era::{
    LATEST_SESSION_VERSION, METHOD_HEADER, NAME_HEADER, SESSION_HEADER, STATELESS_SINCE,
    VERSION_HEADER,
};
use crate::mcp::{Classified, MessageKind, ResponseScanner, classify};

/// How long an idle pooled connection is kept: longer than any pause between two calls of a
/// run, so connections are reused, not re-dialled.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How one request failed. Every failure is counted under its [`Display`](fmt::Display) text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The server answered with a non-success HTTP status.
    Http(u16),
    /// The answer was a JSON-RPC error with this code.
    JsonRpc(i64),
    /// The tool ran and failed: `isError: true` in a successful result.
    ToolError,
    /// No complete answer within the request timeout.
    Timeout,
    /// The connection could not be made.
    Connect,
    /// The connection failed while sending or reading.
    Transport,
    /// The answer was larger than the bench's limit.
    TooLarge,
    /// The answer was not a JSON-RPC response (bad JSON, no response in the SSE stream).
    Malformed,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Http(status) => write!(f, "http {status}"),
            Failure::JsonRpc(code) => write!(f, "jsonrpc {code}"),
            Failure::ToolError => f.write_str("isError"),
            Failure::Timeout => f.write_str("transport: timeout"),
            Failure::Connect => f.write_str("transport: connect"),
            Failure::Transport => f.write_str("transport: io"),
            Failure::TooLarge => f.write_str("answer too large"),
            Failure::Malformed => f.write_str("answer malformed"),
        }
    }
}

impl From<reqwest::Error> for Failure {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            Failure::Timeout
        } else if e.is_connect() {
            Failure::Connect
        } else {
            Failure::Transport
        }
    }
}

/// What one request got: the answer's body size (counted even when the call failed) and the
/// outcome.
#[derive(Debug)]
pub struct Outcome {
    /// Bytes of the answer's body.
    pub bytes: u64,
    /// `Ok` for a successful JSON-RPC result (no `isError`).
    pub result: Result<(), Failure>,
}

/// One MCP session (session era) or the absence of one (stateless era).
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// The server's `Mcp-Session-Id`, if it issued one.
    pub id: Option<HeaderValue>,
}

/// An MCP client for one endpoint; cheap to share, one connection pool for all its sessions.
#[derive(Debug, Clone)]
pub struct McpClient {
    http: reqwest::Client,
    url: reqwest::Url,
    base: HeaderMap,
    era: Era,
    timeout: Duration,
    max_answer: usize,
}

/// Why the client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL does not parse.
    #[error("bad URL {url:?}: {reason}")]
    Url {
        /// The URL given.
        url: String,
        /// Why it does not parse.
        reason: String,
    },
    /// The key is not a valid header value.
    #[error("the key is not a valid HTTP header value")]
    Key,
    /// reqwest refused the configuration.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

impl McpClient {
    /// A client for `url` with `pool` keep-alive connections, sending `key` as a bearer token.
    pub fn new(
        url: &str,
        key: Option<&str>,
        era: Era,
        pool: usize,
        timeout: Duration,
        max_answer: usize,
    ) -> Result<Self, ClientError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| ClientError::Url {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
        let http = reqwest::Client::builder()
            .http1_only()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(pool)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .connect_timeout(timeout)
            // No client-wide timeout: each exchange runs under one `tokio::time::timeout`,
            // which also bounds reading the body (one timer per call, not two).
            .build()?;
        let mut base = HeaderMap::new();
        base.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        base.insert(
            ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        if let Some(key) = key {
            let mut value =
                HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| ClientError::Key)?;
            value.set_sensitive(true);
            base.insert(AUTHORIZATION, value);
        }
        Ok(Self {
            http,
            url: parsed,
            base,
            era,
            timeout,
            max_answer,
        })
    }

    /// The era this client speaks.
    pub fn era(&self) -> Era {
        self.era
    }

    /// Opens a session: `initialize` then `notifications/initialized` in the session era;
    /// nothing in the stateless era.
    pub async fn open_session(&self) -> Result<Session, Failure> {
        if self.era == Era::Stateless {
            return Ok(Session::default());
        }
        let initialize = format!(
            r#"{{"jsonrpc":"2.0","id":0,"method":"initialize","params":{{"protocolVersion":"{LATEST_SESSION_VERSION}","capabilities":{{}},"clientInfo":{{"name":"mcp-tunnel-bench","version":"{}"}}}}}}"#,
            env!("CARGO_PKG_VERSION")
        );
        let headers = self.base.clone();
        let (id, outcome) = tokio::time::timeout(self.timeout, async {
            let response = self.post(headers, initialize).await?;
            let id = response.headers().get(SESSION_HEADER).cloned();
            Ok::<_, Failure>((id, self.read_answer(response).await))
        })
        .await
        .map_err(|_| Failure::Timeout)??;
        outcome.result?;
        let session = Session { id };
        let note = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        let headers = self.headers(&session, "notifications/initialized", None);
        let status = tokio::time::timeout(self.timeout, async {
            let response = self.post(headers, note).await?;
            let status = response.status();
            // Drain the (normally empty) body so the connection goes back to the pool.
            let _ = response.bytes().await;
            Ok::<_, Failure>(status)
        })
        .await
        .map_err(|_| Failure::Timeout)??;
        if !status.is_success() {
            return Err(Failure::Http(status.as_u16()));
        }
        Ok(session)
    }

    /// Ends a session-era session with DELETE; best effort (servers may refuse it with 405).
    pub async fn close_session(&self, session: &Session) {
        let Some(id) = &session.id else { return };
        let mut headers = self.base.clone();
        headers.remove(CONTENT_TYPE);
        headers.insert(SESSION_HEADER, id.clone());
        let _ = tokio::time::timeout(self.timeout, async {
            if let Ok(response) = self
                .http
                .delete(self.url.clone())
                .headers(headers)
                .send()
                .await
            {
                let _ = response.bytes().await;
            }
        })
        .await;
    }

    /// The headers of one request: the session id and version in the session era; the version,
    /// `Mcp-Method` and `Mcp-Name` (matching the body) in the stateless era.
    pub fn headers(&self, session: &Session, method: &str, name: Option<&str>) -> HeaderMap {
        let mut headers = self.base.clone();
        match self.era {
            Era::Session => {
                headers.insert(
                    VERSION_HEADER,
                    HeaderValue::from_static(LATEST_SESSION_VERSION),
                );
                if let Some(id) = &session.id {
                    headers.insert(SESSION_HEADER, id.clone());
                }
            }
            Era::Stateless => {
                headers.insert(VERSION_HEADER, HeaderValue::from_static(STATELESS_SINCE));
                if let Ok(value) = HeaderValue::from_str(method) {
                    headers.insert(METHOD_HEADER, value);
                }
                if let Some(value) = name.and_then(|n| HeaderValue::from_str(n).ok()) {
                    headers.insert(NAME_HEADER, value);
                }
            }
        }
        headers
    }

    /// Sends one request `body` with `headers` (from [`McpClient::headers`]) and reads its
    /// answer, all within the request timeout.
    pub async fn call(&self, headers: HeaderMap, body: Bytes) -> Outcome {
        let exchange = async {
            match self.post(headers, body).await {
                Ok(response) => self.read_answer(response).await,
                Err(e) => Outcome {
                    bytes: 0,
                    result: Err(e.into()),
                },
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Outcome {
                bytes: 0,
                result: Err(Failure::Timeout),
            })
    }

    /// POSTs `body` to the endpoint.
    async fn post(
        &self,
        headers: HeaderMap,
        body: impl Into<reqwest::Body>,
    ) -> Result<reqwest::Response, reqwest::Error> {
        self.http
            .post(self.url.clone())
            .headers(headers)
            .body(body)
            .send()
            .await
    }

    /// Reads an answer to a request: its status, then its body (bounded), then the JSON-RPC
    /// response in it.
    async fn read_answer(&self, mut response: reqwest::Response) -> Outcome {
        let status = response.status();
        let is_sse = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        // SSE events are read whole; a JSON answer is scanned as it arrives.
        let mut events = BytesMut::new();
        let mut scanner = (!is_sse).then(ResponseScanner::new);
        let mut bytes = 0u64;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    bytes += chunk.len() as u64;
                    if bytes > self.max_answer as u64 {
                        return Outcome {
                            bytes,
                            result: Err(Failure::TooLarge),
                        };
                    }
                    match &mut scanner {
                        Some(scanner) => scanner.feed(&chunk),
                        None => events.extend_from_slice(&chunk),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        bytes,
                        result: Err(e.into()),
                    };
                }
            }
        }
        if !status.is_success() {
            return Outcome {
                bytes,
                result: Err(Failure::Http(status.as_u16())),
            };
        }
        let result = match scanner {
            Some(scanner) => judge(
                scanner
                    .facts()
                    .map(|facts| Classified::Single(facts.message_info())),
            ),
            None => sse_response(&events),
        };
        Outcome { bytes, result }
    }
}

/// The outcome a classified answer stands for.
fn judge(classified: Option<Classified>) -> Result<(), Failure> {
    let Some(Classified::Single(info)) = classified else {
        return Err(Failure::Malformed);
    };
    if info.kind != MessageKind::Response {
        return Err(Failure::Malformed);
    }
    match (info.error_code, info.is_tool_error) {
        (Some(code), _) => Err(Failure::JsonRpc(code)),
        (None, true) => Err(Failure::ToolError),
        (None, false) => Ok(()),
    }
}

/// The outcome of an SSE answer: its first event that is a JSON-RPC response (requests and
/// notifications the server sends before it are skipped). Accepts LF and CRLF line ends.
fn sse_response(body: &[u8]) -> Result<(), Failure> {
    let mut data: Vec<u8> = Vec::new();
    let mut has_data = false;
    let lines = body
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .chain(std::iter::once(&b""[..]));
    for line in lines {
        if line.is_empty() {
            if has_data && !data.is_empty() {
                let classified = classify(&data).ok();
                if matches!(&classified, Some(Classified::Single(info)) if info.kind == MessageKind::Response)
                {
                    return judge(classified);
                }
            }
            data.clear();
            has_data = false;
        } else if let Some(value) = line.strip_prefix(b"data:") {
            if has_data {
                data.push(b'\n');
            }
            data.extend_from_slice(value.strip_prefix(b" ").unwrap_or(value));
            has_data = true;
        }
    }
    Err(Failure::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_results_errors_and_tool_errors() {
        let ok = br#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}]}}"#;
        assert_eq!(judge(classify(ok).ok()), Ok(()));
        let tool = br#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}}"#;
        assert_eq!(judge(classify(tool).ok()), Err(Failure::ToolError));
        let error = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"no"}}"#;
        assert_eq!(judge(classify(error).ok()), Err(Failure::JsonRpc(-32602)));
        assert_eq!(judge(classify(b"nope").ok()), Err(Failure::Malformed));
        let request = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
        assert_eq!(judge(classify(request).ok()), Err(Failure::Malformed));
        // Scanned in pieces, as a JSON answer is read: the same verdicts.
        let scanned = |body: &[u8]| {
            let mut scanner = ResponseScanner::new();
            body.chunks(3).for_each(|piece| scanner.feed(piece));
            judge(
                scanner
                    .facts()
                    .map(|facts| Classified::Single(facts.message_info())),
            )
        };
        for body in [
            &ok[..],
            tool,
            error,
            b"nope",
            request,
            br#"{"jsonrpc":"2.0","id":1"#,
        ] {
            let expected = judge(classify(body).ok());
            assert_eq!(scanned(body), expected, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn finds_the_response_in_sse() {
        let body = b"data:\r\n\r\nevent: message\r\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\r\n\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\r\ndata: \"result\":{}}\r\n\r\n";
        assert_eq!(sse_response(body), Ok(()));
        let unterminated =
            b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"error\":{\"code\":-32001,\"message\":\"x\"}}";
        assert_eq!(sse_response(unterminated), Err(Failure::JsonRpc(-32001)));
        assert_eq!(sse_response(b": keep-alive\n\n"), Err(Failure::Malformed));
    }

    #[test]
    fn failures_name_their_kind() {
        assert_eq!(Failure::Http(401).to_string(), "http 401");
        assert_eq!(Failure::JsonRpc(-32602).to_string(), "jsonrpc -32602");
        assert_eq!(Failure::Connect.to_string(), "transport: connect");
    }
}
