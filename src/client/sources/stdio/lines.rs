//! The stdio transport's line codec: messages as single lines toward a child, and a child's
//! output split into lines, bounded, never failing on a line too long.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// A message as one line: JSON allows raw line breaks only as whitespace between tokens (never
/// inside a string), so dropping them keeps the message identical and makes it a single line,
/// as the stdio transport requires. Messages without line breaks pass untouched.
pub(super) fn one_line(payload: Bytes) -> Bytes {
    if !payload.iter().any(|b| matches!(b, b'\n' | b'\r')) {
        return payload;
    }
    payload
        .iter()
        .copied()
        .filter(|b| !matches!(b, b'\n' | b'\r'))
        .collect::<Vec<u8>>()
        .into()
}

/// The start of a line, for logs.
pub(super) fn quote(line: &[u8]) -> String {
    const QUOTE: usize = 200;
    String::from_utf8_lossy(&line[..line.len().min(QUOTE)]).into_owned()
}

/// One output line of a child.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Line {
    /// A line, without its line break and surrounding whitespace; never empty.
    Text(Bytes),
    /// A line longer than the limit, skipped whole.
    TooLong,
}

/// Splits a byte stream into lines of at most `max` bytes without ever failing: a longer line
/// is skipped (reported as [`Line::TooLong`]) and reading goes on with the next one.
pub(super) struct LineDecoder {
    max: usize,
    /// Bytes of the buffer already searched for a line break.
    scanned: usize,
    /// Inside a too-long line: dropping bytes until its end.
    discarding: bool,
}

impl LineDecoder {
    pub(super) fn new(max: usize) -> Self {
        Self {
            max,
            scanned: 0,
            discarding: false,
        }
    }

    fn finish_line(&mut self, line: BytesMut) -> Option<Line> {
        self.scanned = 0;
        if std::mem::take(&mut self.discarding) {
            return Some(Line::TooLong);
        }
        let line = line.freeze();
        let start = line
            .iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(line.len());
        let end = line
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(start, |i| i + 1);
        if start >= end {
            return None;
        }
        if end - start > self.max {
            return Some(Line::TooLong);
        }
        Some(Line::Text(line.slice(start..end)))
    }
}

impl Decoder for LineDecoder {
    type Item = Line;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        loop {
            let from = self.scanned.min(src.len());
            match src[from..].iter().position(|b| *b == b'\n') {
                Some(offset) => {
                    let line = src.split_to(from + offset + 1);
                    if let Some(line) = self.finish_line(line) {
                        return Ok(Some(line));
                    }
                }
                None if self.discarding => {
                    src.clear();
                    self.scanned = 0;
                    return Ok(None);
                }
                None if src.len() > self.max.saturating_add(2) => {
                    // Past the limit (allowing for "\r\n") without an end: skip to the next one.
                    self.discarding = true;
                    src.clear();
                    self.scanned = 0;
                    return Ok(None);
                }
                None => {
                    self.scanned = src.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Line>, std::io::Error> {
        if let Some(line) = self.decode(src)? {
            return Ok(Some(line));
        }
        if src.is_empty() && !self.discarding {
            return Ok(None);
        }
        // A last line without a line break.
        let rest = src.split_to(src.len());
        Ok(self.finish_line(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` to the decoder as a stream would, then the end of the stream.
    fn drain(decoder: &mut LineDecoder, chunks: &[&[u8]]) -> Vec<Line> {
        let mut buffer = BytesMut::new();
        let mut lines = Vec::new();
        for chunk in chunks {
            buffer.extend_from_slice(chunk);
            while let Some(line) = decoder.decode(&mut buffer).expect("never fails") {
                lines.push(line);
            }
        }
        while let Some(line) = decoder.decode_eof(&mut buffer).expect("never fails") {
            lines.push(line);
        }
        lines
    }

    fn text(s: &str) -> Line {
        Line::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn lines_split_across_chunks_with_crlf_blank_lines_and_no_final_break() {
        let mut decoder = LineDecoder::new(64);
        let lines = drain(
            &mut decoder,
            &[b"{\"a\"", b":1}\r\n\n  \n{\"b\":2}\n{\"c\"", b":3}"],
        );
        assert_eq!(
            lines,
            vec![text("{\"a\":1}"), text("{\"b\":2}"), text("{\"c\":3}")]
        );
    }

    #[test]
    fn too_long_lines_are_skipped_and_reading_goes_on() {
        let mut decoder = LineDecoder::new(8);
        let long = [b'x'; 30];
        let lines = drain(
            &mut decoder,
            &[b"short\n", &long, &long, b"tail\nok\n", b"0123456789\n"],
        );
        assert_eq!(
            lines,
            vec![text("short"), Line::TooLong, text("ok"), Line::TooLong]
        );
    }

    #[test]
    fn pretty_json_becomes_one_equivalent_line() {
        let pretty = serde_json::to_string_pretty(&serde_json::json!({
            "jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"message": "a b\\nc"}}
        }))
        .expect("json");
        assert!(pretty.contains('\n'));
        let line = one_line(Bytes::from(pretty.clone()));
        assert!(!line.contains(&b'\n') && !line.contains(&b'\r'));
        let before: serde_json::Value = serde_json::from_str(&pretty).expect("json");
        let after: serde_json::Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(before, after);
        let compact = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"x"}"#);
        assert_eq!(one_line(compact.clone()), compact);
    }
}
