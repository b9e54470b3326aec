//! An incremental reader of a `text/event-stream` body that passes each event's data on in
//! pieces as it arrives, so an event of hundreds of megabytes is never held whole.
//!
//! It is sans-IO: [`SseReader::feed`] takes the body's chunks in order and appends
//! [`SseItem`]s. The data of one event (its `data:` lines joined by `\n`, as the SSE
//! specification assembles them) comes as [`SseItem::Data`] slices of the chunks (no copy);
//! the blank line that dispatches the event comes as [`SseItem::End`], with the event's `id`
//! and `retry` fields. The other fields (`id`, `retry`, `event`) are bounded by
//! [`FIELD_LIMIT`]; comments and unknown fields are skipped without being stored, so memory
//! stays bounded whatever the upstream sends.

use bytes::Bytes;

/// Longest `id`, `event` or `retry` value kept: past it the stream is refused.
pub const FIELD_LIMIT: usize = 64 * 1024;

/// Longest field name looked at; a longer one is an unknown field, skipped.
const NAME_LIMIT: usize = 16;

/// What [`SseReader::feed`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    /// The next bytes of the current event's data, in order.
    Data(Bytes),
    /// The event ended (a blank line).
    End {
        /// Its `id` field, if it had one.
        id: Option<String>,
        /// Its `retry` field (milliseconds), if it had a valid one.
        retry: Option<u64>,
        /// Whether it had any `data` line (an event without one carries no message).
        data: bool,
    },
}

/// A field value longer than [`FIELD_LIMIT`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an event-stream field is longer than {FIELD_LIMIT} bytes")]
pub struct FieldTooLong;

/// Which field a line carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Data,
    Id,
    Retry,
    /// `event`, comments and unknown fields: skipped.
    Skip,
}

impl Field {
    fn of(name: &[u8], overflow: bool) -> Self {
        match name {
            _ if overflow => Self::Skip,
            b"data" => Self::Data,
            b"id" => Self::Id,
            b"retry" => Self::Retry,
            _ => Self::Skip,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a field name (or an empty line).
    Name,
    /// Reading a field's value; `first` until its first byte (an optional space is dropped).
    Value { field: Field, first: bool },
}

/// The reader's state between chunks.
#[derive(Debug)]
pub struct SseReader {
    state: State,
    /// A `\r` ended the last line: a `\n` right after it belongs to it.
    skip_lf: bool,
    name: Vec<u8>,
    name_overflow: bool,
    /// The value of an `id` or `retry` line being read.
    value: Vec<u8>,
    /// The current event had a `data` line.
    has_data: bool,
    id: Option<String>,
    retry: Option<u64>,
}

impl Default for SseReader {
    fn default() -> Self {
        Self::new()
    }
}

impl SseReader {
    /// A reader at the start of a stream.
    pub fn new() -> Self {
        Self {
            state: State::Name,
            skip_lf: false,
            name: Vec::new(),
            name_overflow: false,
            value: Vec::new(),
            has_data: false,
            id: None,
            retry: None,
        }
    }

    /// Reads `chunk`, appending what it completes to `out`.
    pub fn feed(&mut self, chunk: &Bytes, out: &mut Vec<SseItem>) -> Result<(), FieldTooLong> {
        let mut i = 0;
        while i < chunk.len() {
            if std::mem::take(&mut self.skip_lf) && chunk[i] == b'\n' {
                i += 1;
                continue;
            }
            match self.state {
                State::Name => {
                    let rest = &chunk[i..];
                    match rest.iter().position(|&b| matches!(b, b':' | b'\r' | b'\n')) {
                        None => {
                            self.push_name(rest);
                            i = chunk.len();
                        }
                        Some(at) => {
                            self.push_name(&rest[..at]);
                            let byte = rest[at];
                            i += at + 1;
                            let field = Field::of(&self.name, self.name_overflow);
                            let empty = self.name.is_empty() && !self.name_overflow;
                            self.name.clear();
                            self.name_overflow = false;
                            if byte == b':' {
                                // An empty name is a comment: skipped.
                                let field = if empty { Field::Skip } else { field };
                                self.start_value(field, out);
                                self.state = State::Value { field, first: true };
                            } else {
                                self.skip_lf = byte == b'\r';
                                if empty {
                                    self.dispatch(out);
                                } else {
                                    // A field name alone: its value is empty.
                                    self.start_value(field, out);
                                    self.end_value(field)?;
                                }
                            }
                        }
                    }
                }
                State::Value { field, first } => {
                    let mut start = i;
                    if first {
                        if chunk[start] == b' ' {
                            start += 1;
                        }
                        self.state = State::Value {
                            field,
                            first: false,
                        };
                    }
                    let rest = &chunk[start..];
                    let end = rest.iter().position(|&b| matches!(b, b'\r' | b'\n'));
                    let value_end = start + end.unwrap_or(rest.len());
                    if value_end > start {
                        match field {
                            Field::Data => out.push(SseItem::Data(chunk.slice(start..value_end))),
                            Field::Id | Field::Retry => {
                                if self.value.len() + (value_end - start) > FIELD_LIMIT {
                                    return Err(FieldTooLong);
                                }
                                self.value.extend_from_slice(&chunk[start..value_end]);
                            }
                            Field::Skip => {}
                        }
                    }
                    match end {
                        None => i = chunk.len(),
                        Some(_) => {
                            self.skip_lf = chunk[value_end] == b'\r';
                            i = value_end + 1;
                            self.end_value(field)?;
                            self.state = State::Name;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn push_name(&mut self, bytes: &[u8]) {
        if self.name_overflow {
            return;
        }
        if self.name.len() + bytes.len() > NAME_LIMIT {
            self.name_overflow = true;
            self.name.clear();
        } else {
            self.name.extend_from_slice(bytes);
        }
    }

    /// A `data` line after another in the same event continues the data after a `\n`.
    fn start_value(&mut self, field: Field, out: &mut Vec<SseItem>) {
        if field == Field::Data {
            if self.has_data {
                out.push(SseItem::Data(Bytes::from_static(b"\n")));
            }
            self.has_data = true;
        }
        self.value.clear();
    }

    fn end_value(&mut self, field: Field) -> Result<(), FieldTooLong> {
        match field {
            // Per the specification, an id with a NUL is ignored.
            Field::Id if !self.value.contains(&0) => {
                self.id = Some(String::from_utf8_lossy(&self.value).into_owned());
            }
            Field::Retry => {
                if let Some(ms) = std::str::from_utf8(&self.value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    self.retry = Some(ms);
                }
            }
            _ => {}
        }
        self.value.clear();
        self.state = State::Name;
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseItem>) {
        out.push(SseItem::End {
            id: self.id.take(),
            retry: self.retry.take(),
            data: std::mem::take(&mut self.has_data),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` split at every `step` bytes; returns each event's data and fields.
    fn events(body: &str, step: usize) -> Vec<(String, Option<String>, Option<u64>, bool)> {
        let mut reader = SseReader::new();
        let mut items = Vec::new();
        let bytes = Bytes::from(body.to_owned());
        let mut at = 0;
        while at < bytes.len() {
            let end = (at + step).min(bytes.len());
            reader
                .feed(&bytes.slice(at..end), &mut items)
                .expect("fields are short");
            at = end;
        }
        let mut found = Vec::new();
        let mut data = Vec::new();
        for item in items {
            match item {
                SseItem::Data(bytes) => data.extend_from_slice(&bytes),
                SseItem::End {
                    id,
                    retry,
                    data: had,
                } => {
                    found.push((
                        String::from_utf8(std::mem::take(&mut data)).expect("utf-8"),
                        id,
                        retry,
                        had,
                    ));
                }
            }
        }
        assert!(data.is_empty(), "no data outside an event");
        found
    }

    #[test]
    fn events_are_the_same_however_the_body_is_split() {
        let body = "event: message\r\nid: 7\r\ndata: {\"a\":1}\r\n\r\n: comment\n\nretry: 1500\nid\ndata\n\ndata:x\ndata: y\rdata:  z\r\n\n";
        let wanted = vec![
            ("{\"a\":1}".to_owned(), Some("7".to_owned()), None, true),
            (String::new(), None, None, false),
            (String::new(), Some(String::new()), Some(1500), true),
            ("x\ny\n z".to_owned(), None, None, true),
        ];
        for step in 1..body.len() {
            assert_eq!(events(body, step), wanted, "split every {step} bytes");
        }
    }

    #[test]
    fn a_large_data_line_comes_in_slices_never_whole() {
        let mut reader = SseReader::new();
        let mut items = Vec::new();
        reader
            .feed(&Bytes::from_static(b"data: "), &mut items)
            .expect("short");
        let chunk = Bytes::from(vec![b'x'; 1 << 20]);
        let mut total = 0;
        for _ in 0..64 {
            items.clear();
            reader
                .feed(&chunk, &mut items)
                .expect("data is not a field");
            for item in &items {
                match item {
                    SseItem::Data(bytes) => {
                        assert!(bytes.len() <= chunk.len());
                        total += bytes.len();
                    }
                    SseItem::End { .. } => panic!("no end yet"),
                }
            }
        }
        items.clear();
        reader
            .feed(&Bytes::from_static(b"\n\n"), &mut items)
            .expect("short");
        assert_eq!(total, 64 << 20);
        assert!(matches!(
            items.last(),
            Some(SseItem::End { data: true, .. })
        ));
    }

    #[test]
    fn an_endless_id_is_refused_and_an_endless_comment_skipped() {
        let mut reader = SseReader::new();
        let mut items = Vec::new();
        let chunk = Bytes::from(vec![b'x'; 4096]);
        reader
            .feed(&Bytes::from_static(b": "), &mut items)
            .expect("short");
        for _ in 0..1024 {
            reader
                .feed(&chunk, &mut items)
                .expect("comments are skipped");
        }
        assert!(items.is_empty());
        let mut reader = SseReader::new();
        reader
            .feed(&Bytes::from_static(b"id: "), &mut items)
            .expect("short");
        let refused = (0..1024).any(|_| reader.feed(&chunk, &mut items).is_err());
        assert!(refused, "an id past {FIELD_LIMIT} bytes is refused");
    }
}
