//! Server-Sent Events encoding for agent-facing streams.
//!
//! Parsing upstream SSE is left to the `sse-stream` crate (it accepts LF, CRLF and CR line ends,
//! comments and empty-data events); this side only writes events.

use bytes::{BufMut, Bytes, BytesMut};

/// A keep-alive comment: proxies and clients see traffic on an otherwise quiet stream.
pub const KEEP_ALIVE: Bytes = Bytes::from_static(b": keep-alive\n\n");

/// A priming event: an `id` with empty data (nothing for the client to handle) and a `retry`
/// hint, so a client that loses the stream at once can still resume it.
pub fn priming_event(id: &str, retry: std::time::Duration) -> Bytes {
    Bytes::from(format!(
        "id: {id}\nretry: {}\ndata: \n\n",
        retry.as_millis()
    ))
}

/// A named event (the HTTP+SSE transport's `endpoint` event) with one line of data.
pub fn named_event(name: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// One `message` event carrying `data` (a JSON-RPC message), with an event `id` when the stream
/// is resumable. JSON may contain raw line breaks (pretty-printed bodies): each line becomes its
/// own `data:` line, as SSE requires.
pub fn message_event(id: Option<&str>, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 48);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: message\n");
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines() {
        assert_eq!(
            &message_event(None, b"{\"a\":1}")[..],
            b"event: message\ndata: {\"a\":1}\n\n"
        );
        assert_eq!(
            &message_event(Some("0-3"), b"{\r\n\"a\":1\n}")[..],
            b"id: 0-3\nevent: message\ndata: {\ndata: \"a\":1\ndata: }\n\n"
        );
    }
}
