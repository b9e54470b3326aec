//! Server-Sent Events encoding for agent-facing streams.
//!
//! Parsing upstream SSE is [`crate::mcp::sse_reader`]'s (and, for HTTP+SSE upstreams, the
//! `sse-stream` crate's); this side only writes events, whole or, for a large answer, in pieces
//! ([`begin_event`], [`data_piece`], [`end_event`]).

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
/// own `data:` line, as SSE requires. A line ends at CRLF, LF or a lone CR, as SSE parsers read
/// it: a lone CR (JSON whitespace) left inside a `data:` line would end it there, and the rest
/// of the message would reach the agent as a stray field instead of data.
pub fn message_event(id: Option<&str>, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 48);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: message\n");
    let mut rest = data;
    loop {
        let (line, next) = match memchr::memchr2(b'\r', b'\n', rest) {
            None => (rest, None),
            Some(at) => {
                let crlf = rest[at] == b'\r' && rest.get(at + 1) == Some(&b'\n');
                (&rest[..at], Some(&rest[at + if crlf { 2 } else { 1 }..]))
            }
        };
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
        match next {
            Some(next) => rest = next,
            None => break,
        }
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// The opening of a `message` event whose data follows in pieces ([`data_piece`]), closed by
/// [`end_event`]: a large answer passes through without being held whole.
pub fn begin_event() -> Bytes {
    Bytes::from_static(b"event: message\ndata: ")
}

/// A piece of an event's data: passed on as is (no copy) unless it holds raw line breaks
/// (whitespace of a pretty-printed JSON text), which continue on a new `data:` line as in
/// [`message_event`] (a carriage return is dropped).
pub fn data_piece(piece: &Bytes) -> Bytes {
    if !piece.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        return piece.clone();
    }
    let mut out = BytesMut::with_capacity(piece.len() + 64);
    for &b in piece.iter() {
        match b {
            b'\n' => out.put_slice(b"\ndata: "),
            b'\r' => {}
            b => out.put_u8(b),
        }
    }
    out.freeze()
}

/// The end of an event begun with [`begin_event`], with its `id` when the stream is resumable
/// (SSE lets the id come after the data: it is known only once the last piece is in).
pub fn end_event(id: Option<&str>) -> Bytes {
    match id {
        Some(id) => Bytes::from(format!("\nid: {id}\n\n")),
        None => Bytes::from_static(b"\n\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_in_pieces_reads_as_the_whole_one() {
        let whole = message_event(None, b"{\"a\":\r\n1}");
        let mut pieced = BytesMut::new();
        pieced.put_slice(&begin_event());
        pieced.put_slice(&data_piece(&Bytes::from_static(b"{\"a\":\r")));
        pieced.put_slice(&data_piece(&Bytes::from_static(b"\n1}")));
        pieced.put_slice(&end_event(None));
        assert_eq!(pieced.freeze(), whole);
        assert_eq!(
            &end_event(Some("2-9"))[..],
            b"\nid: 2-9\n\n",
            "the id may close the event"
        );
    }

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

    /// A lone CR (JSON whitespace an upstream may send) ends a line for SSE parsers, so it must
    /// start a new `data:` line; it was kept inside one, and the agent's parser cut the message
    /// there (fuzz/ `sse_agent` target).
    #[test]
    fn lone_carriage_return_starts_a_data_line() {
        assert_eq!(
            &message_event(None, b"{\"a\":1,\r\"b\":2}\r")[..],
            b"event: message\ndata: {\"a\":1,\ndata: \"b\":2}\ndata: \n\n"
        );
        assert_eq!(
            &message_event(None, b"x\r\n\ny")[..],
            b"event: message\ndata: x\ndata: \ndata: y\n\n"
        );
    }
}
