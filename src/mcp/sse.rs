//! Server-Sent Events encoding for agent-facing streams.
//!
//! Parsing upstream SSE is left to the `sse-stream` crate (it accepts LF, CRLF and CR line ends,
//! comments and empty-data events); this side only writes events.

use bytes::{BufMut, Bytes, BytesMut};

/// A keep-alive comment: proxies and clients see traffic on an otherwise quiet stream.
pub const KEEP_ALIVE: Bytes = Bytes::from_static(b": keep-alive\n\n");

/// One `message` event carrying `data` (a JSON-RPC message). JSON may contain raw line breaks
/// (pretty-printed bodies): each line becomes its own `data:` line, as SSE requires.
pub fn message_event(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 32);
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
            &message_event(b"{\"a\":1}")[..],
            b"event: message\ndata: {\"a\":1}\n\n"
        );
        assert_eq!(
            &message_event(b"{\r\n\"a\":1\n}")[..],
            b"event: message\ndata: {\ndata: \"a\":1\ndata: }\n\n"
        );
    }
}
