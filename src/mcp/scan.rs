//! An incremental scanner of one JSON-RPC response's top-level fields, fed in chunks.
//!
//! A large answer crosses the tunnel and the relay in pieces; nobody holds it whole. What the
//! audit trail and `connect` need of it is small and sits near the top of the JSON tree: the
//! response's `id`, whether it is an `error` (and its `code`), and `result.isError` (a tool
//! that ran and failed). [`ResponseScanner`] finds those in one pass over the pieces as they go
//! by, with a state of a few words plus the bytes of the field it is reading (at most
//! [`MAX_CAPTURE`]).
//!
//! It tracks nesting depth and string state only: it is not a validator, and trusts the
//! sender for well-formedness beyond what it needs (the agent parses the JSON it receives;
//! the relay forwards it untouched). String bodies are skipped with `memchr`, so a result that
//! is mostly one long text costs little more than a memory scan.
//!
//! Limits, on purpose: a key written with escapes (`"\u0069d"`) is not recognised as `id`, and
//! an `id` longer than [`MAX_CAPTURE`] bytes is reported as absent (the relay then matches the
//! answer to the only call open, as it does for an upstream that rewrote the id).

use serde_json::value::RawValue;

use super::jsonrpc::{MessageInfo, MessageKind};

/// Longest field text the scanner keeps (a key, the `id`, `error.code`, `isError`): ids are
/// numbers or short strings (UUIDs are 38 bytes with quotes), so 1 KiB is ample and bounds the
/// state whatever the sender writes.
pub const MAX_CAPTURE: usize = 1024;

/// Which field a value, or the container being read, belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// Nothing the scanner needs.
    Other,
    /// Top-level `id`.
    Id,
    /// Top-level `result`.
    Result,
    /// Top-level `error`.
    Error,
    /// Top-level `method` (the message is no response).
    Method,
    /// `error.code`.
    ErrorCode,
    /// `result.isError`.
    IsError,
}

/// What the bytes being read are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens: whitespace, structure, or scalars nobody needs.
    Between,
    /// Inside a string.
    String,
    /// Inside a string, right after a backslash.
    Escape,
    /// Inside a number or literal the scanner keeps.
    Scalar,
}

/// What the open string is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Text {
    /// An object key at depth 1 or 2.
    Key,
    /// A value the scanner keeps (the `id`).
    Kept,
    /// Anything else.
    Skipped,
}

/// The shape of the whole text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    /// Nothing but whitespace so far.
    Unknown,
    /// A JSON object: one message.
    Object,
    /// A JSON array: a batch.
    Array,
    /// Something else: not a JSON-RPC message.
    Other,
}

/// What the scanner learned of a complete response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResponseFacts {
    /// The top-level `id` as its JSON text (`7`, `"abc"`); none if absent, `null` or too long.
    pub id: Option<String>,
    /// Whether there is a (non-null) top-level `error`.
    pub is_error: bool,
    /// `error.code`, when it is an integer.
    pub error_code: Option<i64>,
    /// Whether `result.isError` is `true`.
    pub is_tool_error: bool,
    /// The size of the whole text in bytes.
    pub size: u64,
}

impl ResponseFacts {
    /// The facts as the relay's classification of a single response, for settling the call it
    /// answers. It has no payload range: nobody holds the text whole.
    pub fn message_info(&self) -> MessageInfo {
        MessageInfo {
            kind: MessageKind::Response,
            id: self
                .id
                .as_ref()
                .and_then(|id| RawValue::from_string(id.clone()).ok()),
            method: None,
            target: None,
            is_tool_error: self.is_tool_error,
            // Pieced answers are results, never the small input_required ones.
            is_input_required: false,
            // An error without an integer code still fails the call.
            error_code: match (self.is_error, self.error_code) {
                (true, code) => Some(code.unwrap_or(super::jsonrpc::codes::INTERNAL_ERROR)),
                (false, _) => None,
            },
            payload: None,
            size: usize::try_from(self.size).unwrap_or(usize::MAX),
            null_id: false,
        }
    }
}

/// Finds a JSON-RPC response's top-level facts in a text fed in arbitrary chunks. O(n), no
/// allocation beyond one buffer of at most [`MAX_CAPTURE`] bytes.
#[derive(Debug, Clone)]
pub struct ResponseScanner {
    /// Open containers.
    depth: u32,
    lex: Lex,
    text: Text,
    top: Top,
    /// Whether the containers at depth 1 and 2 are objects (else arrays).
    object_at: [bool; 2],
    /// Whether the next string at depth 1 or 2 is a key.
    expect_key: bool,
    /// The field whose value comes next (set by its key).
    pending: Field,
    /// The top-level field whose container the scanner is inside (depth 2 and deeper).
    inside: Field,
    /// The bytes of the key or kept value being read.
    capture: Vec<u8>,
    /// Whether `capture` overflowed [`MAX_CAPTURE`] (its text is then unusable).
    overflowed: bool,
    /// The top-level value has ended.
    done: bool,
    /// Something broke the few rules the scanner checks (unbalanced brackets, text after the
    /// end).
    broken: bool,
    has_result: bool,
    has_method: bool,
    facts: ResponseFacts,
}

impl Default for ResponseScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseScanner {
    /// A scanner at the start of a text.
    pub fn new() -> Self {
        Self {
            depth: 0,
            lex: Lex::Between,
            text: Text::Skipped,
            top: Top::Unknown,
            object_at: [false; 2],
            expect_key: false,
            pending: Field::Other,
            inside: Field::Other,
            capture: Vec::new(),
            overflowed: false,
            done: false,
            broken: false,
            has_result: false,
            has_method: false,
            facts: ResponseFacts::default(),
        }
    }

    /// Reads the next chunk of the text.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.facts.size = self.facts.size.saturating_add(chunk.len() as u64);
        let mut rest = chunk;
        while let Some((&byte, after)) = rest.split_first() {
            match self.lex {
                Lex::String => match memchr::memchr2(b'"', b'\\', rest) {
                    None => {
                        self.keep(rest);
                        rest = &[];
                    }
                    Some(at) => {
                        self.keep(&rest[..at]);
                        if rest[at] == b'\\' {
                            self.keep(b"\\");
                            self.lex = Lex::Escape;
                        } else {
                            // A kept value is raw JSON text, quotes included; a key is not.
                            if self.text == Text::Kept {
                                self.keep(b"\"");
                            }
                            self.lex = Lex::Between;
                            self.end_string();
                        }
                        rest = &rest[at + 1..];
                    }
                },
                Lex::Escape => {
                    self.keep(&rest[..1]);
                    self.lex = Lex::String;
                    rest = after;
                }
                Lex::Scalar => {
                    let end = rest.iter().position(|b| ends_scalar(*b));
                    let taken = end.unwrap_or(rest.len());
                    self.keep(&rest[..taken]);
                    if end.is_some() {
                        self.lex = Lex::Between;
                        self.end_scalar();
                    }
                    rest = &rest[taken..];
                }
                Lex::Between => {
                    self.structural(byte);
                    rest = after;
                }
            }
        }
    }

    /// Whether the top-level value has ended: nothing after this point can change the facts,
    /// and the text before it was not usable JSON.
    pub fn is_complete(&self) -> bool {
        self.done
    }

    /// Whether the text is a JSON object so far (a single message, not a batch), as soon as its
    /// first non-blank byte is read.
    pub fn is_object(&self) -> bool {
        self.top == Top::Object
    }

    /// Whether no non-blank byte has been read yet.
    pub fn is_blank(&self) -> bool {
        self.top == Top::Unknown
    }

    /// The facts of a complete, single JSON-RPC response; none for anything else (a batch, a
    /// request, a text that ended early or has something after its end).
    pub fn facts(&self) -> Option<&ResponseFacts> {
        let is_response = (self.has_result || self.facts.is_error) && !self.has_method;
        (self.done && !self.broken && self.top == Top::Object && is_response).then_some(&self.facts)
    }

    /// Bytes read so far.
    pub fn size(&self) -> u64 {
        self.facts.size
    }

    fn keep(&mut self, bytes: &[u8]) {
        if self.text == Text::Skipped {
            return;
        }
        if self.capture.len() + bytes.len() > MAX_CAPTURE {
            self.overflowed = true;
            return;
        }
        self.capture.extend_from_slice(bytes);
    }

    fn start_capture(&mut self, text: Text, first: &[u8]) {
        self.text = text;
        self.capture.clear();
        self.overflowed = false;
        self.capture.extend_from_slice(first);
    }

    /// Whether the value about to start sits at depth 1 or 2 of an object (where the scanner
    /// cares about fields).
    fn in_known_object(&self) -> bool {
        matches!(self.depth, 1 | 2) && self.object_at[self.depth as usize - 1]
    }

    /// Notes that a value of the pending field starts (any kind of value).
    fn value_starts(&mut self) {
        if self.depth == 1 {
            match self.pending {
                Field::Result => self.has_result = true,
                Field::Error => self.facts.is_error = true,
                Field::Method => self.has_method = true,
                _ => {}
            }
        }
    }

    fn structural(&mut self, byte: u8) {
        if self.done && !byte.is_ascii_whitespace() {
            self.broken = true;
            return;
        }
        match byte {
            b' ' | b'\t' | b'\n' | b'\r' => {}
            b'{' | b'[' => {
                let is_object = byte == b'{';
                if self.depth == 0 {
                    self.top = if is_object { Top::Object } else { Top::Array };
                }
                self.value_starts();
                if self.depth == 1 {
                    self.inside = self.pending;
                }
                self.depth = self.depth.saturating_add(1);
                if let Some(slot) = self.object_at.get_mut(self.depth as usize - 1) {
                    *slot = is_object;
                }
                self.expect_key = is_object;
                self.pending = Field::Other;
            }
            b'}' | b']' => {
                if self.depth == 0 {
                    self.broken = true;
                    return;
                }
                self.depth -= 1;
                if self.depth == 0 {
                    self.done = true;
                } else if self.depth == 1 {
                    self.inside = Field::Other;
                }
                self.expect_key = false;
                self.pending = Field::Other;
            }
            b':' => self.expect_key = false,
            b',' => {
                self.expect_key = self.in_known_object();
                self.pending = Field::Other;
            }
            b'"' => {
                if self.depth == 0 {
                    self.top = Top::Other;
                }
                let text = if self.expect_key && self.in_known_object() {
                    Text::Key
                } else {
                    self.value_starts();
                    if self.depth == 1 && self.pending == Field::Id {
                        Text::Kept
                    } else {
                        Text::Skipped
                    }
                };
                self.start_capture(text, if text == Text::Kept { b"\"" } else { b"" });
                self.lex = Lex::String;
            }
            other => {
                if self.depth == 0 {
                    self.top = Top::Other;
                    return;
                }
                // A number or literal: kept only where a field the scanner reads is expected;
                // elsewhere its bytes are skipped one by one (they hold no structure).
                let wanted = matches!(
                    (self.depth, self.pending),
                    (1, Field::Id | Field::Result | Field::Error | Field::Method)
                        | (2, Field::ErrorCode | Field::IsError)
                );
                if wanted {
                    self.start_capture(Text::Kept, &[other]);
                    self.lex = Lex::Scalar;
                }
            }
        }
    }

    fn end_string(&mut self) {
        match self.text {
            Text::Key => {
                self.pending = if self.overflowed {
                    Field::Other
                } else {
                    match (self.depth, self.inside, self.capture.as_slice()) {
                        (1, _, b"id") => Field::Id,
                        (1, _, b"result") => Field::Result,
                        (1, _, b"error") => Field::Error,
                        (1, _, b"method") => Field::Method,
                        (2, Field::Error, b"code") => Field::ErrorCode,
                        (2, Field::Result, b"isError") => Field::IsError,
                        _ => Field::Other,
                    }
                };
            }
            Text::Kept => {
                // Only the `id` keeps a string value.
                self.facts.id = (!self.overflowed)
                    .then(|| String::from_utf8(std::mem::take(&mut self.capture)).ok())
                    .flatten();
                self.pending = Field::Other;
            }
            Text::Skipped => {}
        }
        self.text = Text::Skipped;
    }

    fn end_scalar(&mut self) {
        let text = if self.overflowed {
            None
        } else {
            std::str::from_utf8(&self.capture).ok()
        };
        let is_null = text == Some("null");
        match self.pending {
            Field::Id => self.facts.id = text.filter(|_| !is_null).map(str::to_owned),
            // `"result": null` and `"error": null` are no result and no error.
            Field::Result => self.has_result = !is_null,
            Field::Error => self.facts.is_error = !is_null,
            Field::Method => self.has_method = !is_null,
            Field::ErrorCode => self.facts.error_code = text.and_then(|t| t.parse().ok()),
            Field::IsError => self.facts.is_tool_error = text == Some("true"),
            Field::Other => {}
        }
        self.text = Text::Skipped;
        self.pending = Field::Other;
    }
}

/// Whether `byte` ends a number or literal.
fn ends_scalar(byte: u8) -> bool {
    matches!(
        byte,
        b' ' | b'\t' | b'\n' | b'\r' | b',' | b'}' | b']' | b':' | b'"' | b'{' | b'['
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::classify;

    /// Scans `text` in pieces cut at `cuts` (sorted offsets).
    fn scan_cut(text: &[u8], cuts: &[usize]) -> ResponseScanner {
        let mut scanner = ResponseScanner::new();
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&text.len())) {
            scanner.feed(&text[from..cut]);
            from = cut;
        }
        scanner
    }

    /// The facts of `text` scanned whole, checked to be the same for every single cut and for
    /// one byte at a time.
    fn facts_every_split(text: &str) -> Option<ResponseFacts> {
        let bytes = text.as_bytes();
        let whole = scan_cut(bytes, &[]).facts().cloned();
        for cut in 0..=bytes.len() {
            assert_eq!(
                scan_cut(bytes, &[cut]).facts().cloned(),
                whole,
                "cut at {cut} of {text}"
            );
        }
        let every: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(scan_cut(bytes, &every).facts().cloned(), whole, "{text}");
        whole
    }

    /// The facts `classify` gives of the same text.
    fn classified(text: &str) -> ResponseFacts {
        let classified = classify(text.as_bytes()).expect("test texts are JSON-RPC");
        let info = &classified.messages()[0];
        ResponseFacts {
            id: info.id.as_ref().map(|id| id.get().to_owned()),
            is_error: info.error_code.is_some(),
            error_code: info.error_code,
            is_tool_error: info.is_tool_error,
            size: text.len() as u64,
        }
    }

    #[test]
    fn agrees_with_classify_across_every_split() {
        let texts = [
            r#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"hi"}]}}"#,
            r#"{"jsonrpc":"2.0","id":"a\"b\\c","result":{"isError":true,"content":[]}}"#,
            r#" { "id" : -12.5e3 , "jsonrpc" : "2.0" , "result" : { "isError" : false } } "#,
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"Unknown tool: x"}}"#,
            r#"{"jsonrpc":"2.0","error":{"message":"no id","code":-32000},"id":null}"#,
            // Decoys: the same names deeper down, and inside strings.
            r#"{"jsonrpc":"2.0","result":{"content":[{"id":9,"isError":true,"error":{"code":1}}],"text":"\"id\":5,\"error\":{}"},"id":"x"}"#,
            r#"{"jsonrpc":"2.0","id":3,"result":{"meta":{"isError":true},"isError":false,"s":"\\\"}"}}"#,
            // Escapes of every kind in a long text, unicode included.
            r#"{"jsonrpc":"2.0","id":4,"result":{"content":[{"type":"text","text":"a\nb\t\u00e9\ud83d\ude00\/\\\"}"}],"isError":true}}"#,
            r#"{"jsonrpc":"2.0","id":5,"result":[1,2.5,-3e-2,true,false,null,"]",{"isError":true}]}"#,
        ];
        for text in texts {
            let facts = facts_every_split(text).unwrap_or_else(|| panic!("a response: {text}"));
            assert_eq!(facts, classified(text), "{text}");
        }
    }

    #[test]
    fn reports_completion_only_at_the_end_of_the_top_level_value() {
        let text = br#"{"id":1,"result":{"a":"}}}"}}"#;
        let mut scanner = ResponseScanner::new();
        for (i, byte) in text.iter().enumerate() {
            assert!(!scanner.is_complete(), "complete before byte {i}");
            scanner.feed(std::slice::from_ref(byte));
        }
        assert!(scanner.is_complete());
        assert!(scanner.is_object());
        scanner.feed(b" \r\n\t");
        assert!(scanner.facts().is_some(), "trailing blanks are fine");
        scanner.feed(b"x");
        assert!(
            scanner.facts().is_none(),
            "text after the end is not one message"
        );
    }

    #[test]
    fn refuses_what_is_not_one_complete_response() {
        for text in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[]}"#, // cut short
            r#"[{"jsonrpc":"2.0","id":1,"result":{}}]"#,          // a batch
            r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#,        // a request
            r#"{"jsonrpc":"2.0","id":1,"result":null}"#,          // no result
            r#""just a string""#,
            r#"42"#,
            r#"{"id":1,"result":{}}}"#, // unbalanced
            "",
        ] {
            assert_eq!(facts_every_split(text), None, "{text}");
        }
        let mut batch = ResponseScanner::new();
        batch.feed(b"  [");
        assert!(!batch.is_object() && !batch.is_blank());
    }

    #[test]
    fn bounds_what_it_keeps() {
        let long_id = format!("\"{}\"", "i".repeat(MAX_CAPTURE * 4));
        let text = format!(r#"{{"jsonrpc":"2.0","id":{long_id},"result":{{"isError":true}}}}"#);
        let mut scanner = ResponseScanner::new();
        for piece in text.as_bytes().chunks(7) {
            scanner.feed(piece);
            assert!(scanner.capture.capacity() <= 2 * MAX_CAPTURE);
        }
        let facts = scanner.facts().expect("still a response");
        assert_eq!(facts.id, None, "an id past the bound is reported absent");
        assert!(facts.is_tool_error);
        // Long keys are bounded the same way and match nothing.
        let key = "k".repeat(MAX_CAPTURE * 2);
        let text = format!(r#"{{"{key}":1,"id":2,"result":{{}}}}"#);
        assert_eq!(
            facts_every_split(&text).and_then(|f| f.id),
            Some("2".to_owned())
        );
    }

    #[test]
    fn a_large_result_in_uneven_pieces() {
        let body = "0123456789\\\"abc\\n".repeat(20_000);
        let text = format!(
            r#"{{"jsonrpc":"2.0","id":"req-1","result":{{"content":[{{"type":"text","text":"{body}"}}],"isError":true}}}}"#
        );
        let bytes = text.as_bytes();
        // Cuts at a prime stride and its neighbours land inside escapes, strings and keys.
        for stride in [1usize, 2, 3, 997, 4096, 65_537] {
            let cuts: Vec<usize> = (stride..bytes.len()).step_by(stride).collect();
            let scanner = scan_cut(bytes, &cuts);
            assert_eq!(
                scanner.facts().cloned(),
                Some(classified(&text)),
                "stride {stride}"
            );
        }
    }

    #[test]
    fn message_info_carries_the_outcome() {
        let facts = ResponseFacts {
            id: Some("\"a\"".into()),
            is_error: true,
            error_code: None,
            is_tool_error: false,
            size: 10,
        };
        let info = facts.message_info();
        assert_eq!(info.kind, MessageKind::Response);
        assert_eq!(info.id.as_deref().map(RawValue::get), Some("\"a\""));
        assert_eq!(
            info.error_code,
            Some(crate::mcp::jsonrpc::codes::INTERNAL_ERROR)
        );
        assert_eq!(info.size, 10);
    }
}
