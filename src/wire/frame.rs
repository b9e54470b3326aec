//! Length-prefixed frames, their sans-IO codec, and async reader/writer halves.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! +------+-------------------+-----------------+-------------------+
//! | kind |  exchange (u64)   | length (u32)    | payload (length)  |
//! | 1 B  |       8 B         |      4 B        |                   |
//! +------+-------------------+-----------------+-------------------+
//! ```
//!
//! The decoder refuses a frame whose declared length exceeds its limit before reading (or
//! allocating) the payload, so a hostile peer cannot make either side buffer more than the limit.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, FramedRead};

/// Bytes in a frame header: kind (1) + exchange (8) + payload length (4).
pub const HEADER_LEN: usize = 13;

/// Default limit on one frame's payload: 16 MiB, enough for a large tool result (the MCP specs
/// set no limit; common servers cap bodies at 4-16 MiB) while bounding per-stream memory.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// The exchange number of messages that belong to no agent request: what the upstream sends on
/// its standalone (GET) stream, and control-stream traffic.
pub const UNSOLICITED: u64 = 0;

/// What a frame carries. A reader that meets a kind it does not know fails with
/// [`FrameError::UnknownKind`]; a sender uses a kind only at a wire version that has it (the
/// rule in [`crate::wire::version`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A control-stream message (JSON, see [`crate::wire::control`]).
    Control = 1,
    /// The first frame of an exchange stream (JSON [`crate::wire::OpenHeader`]).
    Open = 2,
    /// One JSON-RPC message or batch, forwarded untouched.
    Message = 3,
    /// The upstream finished its response to this exchange; no more messages will carry it.
    End = 4,
    /// The sender ends the whole stream; the payload is a UTF-8 reason for logs and errors.
    Close = 5,
    /// The upstream refused this exchange's message: the payload is the HTTP status (u16) it
    /// answered with, sent before the JSON-RPC error message so the relay can answer the agent
    /// with the same status (clients read 4xx bodies differently from 200 ones).
    Rejected = 6,
    /// The upstream answers this exchange with an event stream: the relay streams too, from
    /// now on (keep-alive comments included), instead of waiting for a single JSON answer.
    Streaming = 7,
    /// From the relay, on an exchange stream whose open header carried an identity assertion:
    /// a fresh assertion (JSON [`super::Assertion`]) that replaces it for
    /// every upstream request from now on. The relay sends it before a message once the
    /// current assertion is past half its lifetime, so a long session never reaches its
    /// upstream with an expired one.
    ///
    /// Wire version 1 (see [`crate::wire::version`]); sent only on streams whose open header
    /// has an `assertion`.
    Identity = 8,
    /// A piece of one JSON-RPC message that continues in the next frames of this exchange; the
    /// piece in the following [`FrameKind::Message`] frame of the same exchange ends it. The
    /// message is the pieces' payloads concatenated, in order, with nothing re-encoded.
    ///
    /// `connect` sends a large upstream answer this way, so the relay can pass it on to the
    /// agent as it arrives (a pipeline) instead of each side holding it whole. Each piece is
    /// one frame within the frame limit; the whole message stays bounded by the receiver's
    /// answer limit (`max_answer_bytes`, 256 MiB by default, each side's own and not
    /// exchanged; the frame limit agreed at the handshake stays `max_message_bytes`): the
    /// receiver counts the pieces' bytes ([`PieceCount`]) and fails the exchange once they
    /// pass it, dropping the rest. `connect` sends JSON answers, SSE events and stdio lines
    /// larger than 256 KiB this way. An
    /// [`FrameKind::End`] for the exchange before the closing `Message` abandons the message
    /// (the upstream's answer broke off, or passed the limit): the receiver discards what it
    /// has and fails the exchange rather than deliver a truncated text.
    ///
    /// Wire version 1 (see [`crate::wire::version`]).
    MessagePart = 9,
    /// From `connect`, on a session-era stream whose open header names a session handle
    /// ([`super::SessionHandle`]): the upstream session is held by `connect` and can be
    /// resumed on a later stream (JSON [`super::Resumable`]). Sent before the answer to
    /// `initialize` on a new session, and first of all on a resumed one, so the relay knows
    /// what to seal into the agent's session id, or that the resume succeeded. A resume
    /// `connect` cannot honour gets [`FrameKind::Close`] instead.
    ///
    /// Wire version 2 (see [`crate::wire::version`]).
    Resumable = 10,
    /// From the relay, on a session-era stream: the agent listens on this stream for the
    /// session's server-initiated messages (its GET stream is open on this relay), so
    /// `connect` sends them here rather than on another stream carrying the same session.
    ///
    /// Wire version 2 (see [`crate::wire::version`]).
    Listen = 11,
    /// Replaying an answer on another stream, both ways, on a session-era stream.
    ///
    /// From the relay (JSON [`super::Replay`]): an agent resumes an answer with `Last-Event-ID`
    /// here, but the answer was carried by another stream of the session (another relay's,
    /// maybe one that died): `connect` sends what it buffered of that answer after the
    /// message the agent saw, then the rest as it arrives, tagged with this frame's exchange
    /// instead of the old one (the old stream gets none of it any more).
    ///
    /// From `connect`, tagged with that exchange: the replay begins; the payload is the agent's
    /// message the answer belongs to (so the relay records the calls it answers, as for any
    /// answer it releases). A replay `connect` cannot make (it never had the answer, or
    /// forgot it) gets [`FrameKind::End`] instead. An empty one, tagged with an exchange the
    /// answer went to before, says the answer moved to another stream: nothing more of it
    /// comes there.
    ///
    /// Wire version 3 (see [`crate::wire::version`]).
    Replay = 12,
    /// From `connect`, on a session-era stream of a held Streamable HTTP session: one
    /// server-initiated message (as [`FrameKind::Message`] on [`UNSOLICITED`]), whose
    /// `exchange` field is its number within the session (from 1). `connect` keeps the
    /// latest of them, so an agent whose GET stream broke resumes it on any relay: the relay
    /// seals the number into the event's id and, given it back, sends a [`super::ListenAfter`]
    /// listen, and `connect` sends again the messages after it.
    ///
    /// Wire version 4 (see [`crate::wire::version`]); until then these messages ride
    /// `Message` frames on [`UNSOLICITED`], unnumbered.
    Event = 13,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Control,
            2 => Self::Open,
            3 => Self::Message,
            4 => Self::End,
            5 => Self::Close,
            6 => Self::Rejected,
            7 => Self::Streaming,
            8 => Self::Identity,
            9 => Self::MessagePart,
            10 => Self::Resumable,
            11 => Self::Listen,
            12 => Self::Replay,
            13 => Self::Event,
            _ => return None,
        })
    }
}

/// One frame: a kind, the exchange it belongs to, and an opaque payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the payload is.
    pub kind: FrameKind,
    /// The exchange (agent request) this frame belongs to; [`UNSOLICITED`] for none.
    pub exchange: u64,
    /// The payload, shared, never copied on the way through.
    pub payload: Bytes,
}

impl Frame {
    /// A JSON-RPC message for `exchange`.
    pub fn message(exchange: u64, payload: Bytes) -> Self {
        Self {
            kind: FrameKind::Message,
            exchange,
            payload,
        }
    }

    /// A piece of a message for `exchange` that continues in the next frames (see
    /// [`FrameKind::MessagePart`]).
    pub fn part(exchange: u64, payload: Bytes) -> Self {
        Self {
            kind: FrameKind::MessagePart,
            exchange,
            payload,
        }
    }

    /// The end of the upstream's response to `exchange`.
    pub fn end(exchange: u64) -> Self {
        Self {
            kind: FrameKind::End,
            exchange,
            payload: Bytes::new(),
        }
    }

    /// The upstream answered `exchange` with HTTP `status` (4xx or 5xx).
    pub fn rejected(exchange: u64, status: u16) -> Self {
        Self {
            kind: FrameKind::Rejected,
            exchange,
            payload: Bytes::copy_from_slice(&status.to_be_bytes()),
        }
    }

    /// The upstream answers `exchange` with an event stream.
    pub fn streaming(exchange: u64) -> Self {
        Self {
            kind: FrameKind::Streaming,
            exchange,
            payload: Bytes::new(),
        }
    }

    /// A fresh identity assertion for the rest of the stream.
    pub fn identity(assertion: &super::Assertion) -> Self {
        Self::json(FrameKind::Identity, assertion)
    }

    /// The agent listens for server-initiated messages on this stream ([`FrameKind::Listen`]).
    pub fn listen() -> Self {
        Self {
            kind: FrameKind::Listen,
            exchange: UNSOLICITED,
            payload: Bytes::new(),
        }
    }

    /// A server-initiated message numbered `number` within its session ([`FrameKind::Event`]).
    pub fn event(number: u64, message: Bytes) -> Self {
        Self {
            kind: FrameKind::Event,
            exchange: number,
            payload: message,
        }
    }

    /// The HTTP status of a [`FrameKind::Rejected`] frame, if well formed.
    pub fn status(&self) -> Option<u16> {
        <[u8; 2]>::try_from(&self.payload[..])
            .ok()
            .map(u16::from_be_bytes)
    }

    /// The end of the whole stream, with a reason a person can read.
    pub fn close(reason: impl Into<String>) -> Self {
        Self {
            kind: FrameKind::Close,
            exchange: UNSOLICITED,
            payload: Bytes::from(reason.into()),
        }
    }

    /// A JSON frame of `kind` (control messages and open headers).
    pub fn json<T: serde::Serialize>(kind: FrameKind, value: &T) -> Self {
        let payload = serde_json::to_vec(value)
            .expect("wire types serialize infallibly: plain structs of strings and numbers");
        Self {
            kind,
            exchange: UNSOLICITED,
            payload: Bytes::from(payload),
        }
    }

    /// Parses a JSON payload of the expected `kind`.
    pub fn parse_json<T: serde::de::DeserializeOwned>(
        &self,
        kind: FrameKind,
    ) -> Result<T, FrameError> {
        if self.kind != kind {
            return Err(FrameError::Unexpected {
                expected: kind,
                got: self.kind,
            });
        }
        serde_json::from_slice(&self.payload).map_err(|e| FrameError::BadJson(e.to_string()))
    }

    /// The reason text of a [`FrameKind::Close`] frame.
    pub fn reason(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// Writes the 13-byte header for this frame.
    pub fn encode_header(&self) -> [u8; HEADER_LEN] {
        let mut header = [0u8; HEADER_LEN];
        let mut cursor = &mut header[..];
        cursor.put_u8(self.kind as u8);
        cursor.put_u64(self.exchange);
        // Payload length is checked against the limit (< 4 GiB) before any frame is built for
        // the wire; a larger payload is a programming error caught by `FrameWriter::send`.
        cursor.put_u32(self.payload.len() as u32);
        header
    }

    /// Appends the whole frame to `dst` (tests and benches; the writer avoids this copy).
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(HEADER_LEN + self.payload.len());
        dst.put_slice(&self.encode_header());
        dst.put_slice(&self.payload);
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer declared a payload larger than this side accepts.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Declared payload size.
        size: usize,
        /// This side's limit.
        limit: usize,
    },
    /// The kind byte is not one this version knows.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// A frame of another kind came where a specific one was required.
    #[error("expected a {expected:?} frame, got {got:?}")]
    Unexpected {
        /// The kind that was required.
        expected: FrameKind,
        /// The kind that arrived.
        got: FrameKind,
    },
    /// A JSON payload (control message, open header) did not parse.
    #[error("malformed frame payload: {0}")]
    BadJson(String),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The underlying stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Counts the bytes of one message arriving in pieces ([`FrameKind::MessagePart`] frames, then
/// the closing [`FrameKind::Message`]) against the per-message limit, so a receiver can refuse
/// it before buffering (or forwarding) more than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceCount {
    bytes: usize,
    limit: usize,
}

/// A message in pieces passed the per-message limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a message of more than {limit} bytes (the per-message limit) arrived in pieces")]
pub struct TooManyPieces {
    /// The per-message limit.
    pub limit: usize,
}

impl PieceCount {
    /// A message not yet started, to be refused past `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { bytes: 0, limit }
    }

    /// Counts the next piece; fails once the message so far exceeds the limit.
    pub fn add(&mut self, piece: usize) -> Result<(), TooManyPieces> {
        self.bytes = self.bytes.saturating_add(piece);
        if self.bytes > self.limit {
            return Err(TooManyPieces { limit: self.limit });
        }
        Ok(())
    }

    /// Bytes counted so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The sans-IO decoder: turns buffered bytes into frames, enforcing the payload limit.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    limit: usize,
}

/// What the read buffer grows to when a frame starts arriving on an idle stream: a typical
/// JSON-RPC message and its header in one read; a larger frame reserves its whole size once its
/// header is read.
const READ_CHUNK: usize = 4 * 1024;

impl FrameDecoder {
    /// A decoder that refuses payloads over `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < HEADER_LEN {
            // Bytes of a frame arrived into an idle stream's near-empty buffer: room for a
            // typical message before the next read, so it is not read a few bytes at a time.
            if !src.is_empty() {
                src.reserve(READ_CHUNK);
            }
            return Ok(None);
        }
        let kind_byte = src[0];
        let kind = FrameKind::from_byte(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
        let size = u32::from_be_bytes([src[9], src[10], src[11], src[12]]) as usize;
        if size > self.limit {
            return Err(FrameError::TooLarge {
                size,
                limit: self.limit,
            });
        }
        if src.len() < HEADER_LEN + size {
            // Reserve once for the whole frame so a large payload is not grown piecemeal.
            src.reserve(HEADER_LEN + size - src.len());
            return Ok(None);
        }
        let exchange = u64::from_be_bytes(
            src[1..9]
                .try_into()
                .expect("slice of 8 bytes: bounds checked above"),
        );
        src.advance(HEADER_LEN);
        let payload = src.split_to(size).freeze();
        Ok(Some(Frame {
            kind,
            exchange,
            payload,
        }))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated),
        }
    }
}

/// Reads frames from one direction of a tunnel stream.
pub struct FrameReader<R> {
    inner: FramedRead<R, FrameDecoder>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `io`, refusing frames over `limit` bytes.
    pub fn new(io: R, limit: usize) -> Self {
        Self {
            inner: FramedRead::with_capacity(io, FrameDecoder::new(limit), 0),
        }
    }

    /// The next frame, or `None` when the peer finished the stream cleanly.
    ///
    /// A stream with nothing to read now and nothing buffered lets go of its read buffer
    /// before it waits, so an idle stream holds none (it held 16 KiB, most of an idle
    /// session's memory on each side); the next read starts small and [`READ_CHUNK`] is
    /// reserved once bytes arrive. A busy stream keeps its buffer from frame to frame.
    pub async fn next(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(ready) = self.inner.next().now_or_never() {
            return ready.transpose();
        }
        if self.inner.read_buffer().is_empty() && self.inner.read_buffer().capacity() > 0 {
            *self.inner.read_buffer_mut() = BytesMut::new();
        }
        self.inner.next().await.transpose()
    }

    /// The read buffer's capacity (what an idle stream holds).
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.inner.read_buffer().capacity()
    }
}

/// A payload under this size is copied behind its header and written with it
/// ([`FrameWriter::send`]): a copy of this much costs less than a write of its own.
const COALESCE_BYTES: usize = 16 * 1024;

/// Writes frames to one direction of a tunnel stream.
pub struct FrameWriter<W> {
    io: W,
    limit: usize,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// Wraps `io`; payloads over `limit` bytes are refused before anything is written.
    pub fn new(io: W, limit: usize) -> Self {
        Self { io, limit }
    }

    /// Writes one frame. A payload under `COALESCE_BYTES` is copied behind the header and
    /// both go to the stream in one write: each write to a QUIC stream locks the connection
    /// and wakes its driver, which costs more than the copy. A larger payload is handed to the
    /// stream as is after its header (no copy into a staging buffer), which matters for
    /// multi-megabyte tool results.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), FrameError> {
        if frame.payload.len() > self.limit {
            return Err(FrameError::TooLarge {
                size: frame.payload.len(),
                limit: self.limit,
            });
        }
        let header = frame.encode_header();
        if frame.payload.len() < COALESCE_BYTES {
            let mut staged = Vec::with_capacity(HEADER_LEN + frame.payload.len());
            staged.extend_from_slice(&header);
            staged.extend_from_slice(&frame.payload);
            self.io.write_all(&staged).await?;
        } else {
            self.io.write_all(&header).await?;
            self.io.write_all(&frame.payload).await?;
        }
        Ok(())
    }

    /// Finishes this direction of the stream (the peer reads a clean end).
    pub async fn finish(&mut self) -> Result<(), FrameError> {
        self.io.shutdown().await?;
        Ok(())
    }

    /// The payload limit of this writer.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8], limit: usize) -> Result<Vec<Frame>, FrameError> {
        let mut decoder = FrameDecoder::new(limit);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        // Feed one byte at a time: the decoder must cope with any split.
        for byte in bytes {
            buf.put_u8(*byte);
            while let Some(frame) = decoder.decode(&mut buf)? {
                out.push(frame);
            }
        }
        if let Some(frame) = decoder.decode_eof(&mut buf)? {
            out.push(frame);
        }
        Ok(out)
    }

    #[test]
    fn round_trips_every_kind_across_arbitrary_splits() {
        let frames = vec![
            Frame::json(FrameKind::Control, &serde_json::json!({"a": 1})),
            Frame::message(
                7,
                Bytes::from_static(br#"{"jsonrpc":"2.0","id":1,"method":"x"}"#),
            ),
            Frame::end(7),
            Frame::rejected(8, 421),
            Frame::streaming(9),
            Frame::identity(&crate::wire::Assertion {
                header: "x-mcp-tunnel-identity".into(),
                token: "a.b.c".into(),
            }),
            Frame::part(10, Bytes::from_static(br#"{"jsonrpc":"2.0","id":1,"re"#)),
            Frame::message(10, Bytes::from_static(br#"sult":{}}"#)),
            Frame::message(u64::MAX, Bytes::new()),
            Frame::close("bye"),
        ];
        let mut wire = BytesMut::new();
        for frame in &frames {
            frame.encode(&mut wire);
        }
        assert_eq!(
            decode_all(&wire, 1024).expect("valid frames decode"),
            frames
        );
    }

    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer() {
        use std::time::Duration;
        let (mut near, far) = tokio::io::duplex(64 * 1024);
        let mut reader = FrameReader::new(far, 1 << 20);
        let small = Frame::message(1, Bytes::from_static(br#"{"jsonrpc":"2.0","id":1}"#));
        let large = Frame::message(2, Bytes::from(vec![b'x'; 300 * 1024]));
        let (read_first, first_read) = tokio::sync::oneshot::channel::<()>();
        let writer = tokio::spawn(async move {
            let mut wire = BytesMut::new();
            small.encode(&mut wire);
            near.write_all(&wire).await.expect("write");
            first_read.await.expect("the reader goes on");
            let mut wire = BytesMut::new();
            large.encode(&mut wire);
            near.write_all(&wire).await.expect("write");
            near
        });
        let first = reader.next().await.expect("read").expect("a frame");
        assert_eq!(first.exchange, 1);
        // Waiting with nothing to read: idle.
        let idle = tokio::time::timeout(Duration::from_millis(20), reader.next()).await;
        assert!(idle.is_err(), "nothing was sent yet");
        // What the framing reserves to poll the stream at all (a few bytes), not a buffer.
        assert!(reader.buffered_capacity() <= 8, "nothing kept while idle");
        read_first.send(()).expect("the writer waits");
        let second = reader.next().await.expect("read").expect("a frame");
        assert_eq!(second.payload.len(), 300 * 1024);
        let idle = tokio::time::timeout(Duration::from_millis(20), reader.next()).await;
        assert!(idle.is_err(), "nothing more was sent yet");
        assert!(reader.buffered_capacity() <= 8, "nor after a large frame");
        drop(writer.await.expect("writer"));
        assert!(reader.next().await.expect("a clean end").is_none());
    }

    #[test]
    fn refuses_oversized_frame_before_reading_payload() {
        let frame = Frame::message(1, Bytes::from(vec![b'x'; 100]));
        let mut wire = BytesMut::new();
        frame.encode(&mut wire);
        wire.truncate(HEADER_LEN); // the payload never arrives: the header alone must fail
        let err = decode_all(&wire, 99).expect_err("100 > 99");
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    size: 100,
                    limit: 99
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn accepts_frame_exactly_at_limit() {
        let frame = Frame::message(1, Bytes::from(vec![b'x'; 64]));
        let mut wire = BytesMut::new();
        frame.encode(&mut wire);
        assert_eq!(
            decode_all(&wire, 64).expect("at the limit is allowed"),
            vec![frame]
        );
    }

    #[test]
    fn refuses_unknown_kind_and_truncation() {
        let mut wire = BytesMut::new();
        Frame::end(3).encode(&mut wire);
        wire[0] = 0x7f;
        assert!(matches!(
            decode_all(&wire, 10),
            Err(FrameError::UnknownKind(0x7f))
        ));

        let mut wire = BytesMut::new();
        Frame::message(1, Bytes::from_static(b"abcdef")).encode(&mut wire);
        wire.truncate(wire.len() - 1);
        assert!(matches!(decode_all(&wire, 10), Err(FrameError::Truncated)));
    }

    #[test]
    fn message_in_pieces_is_their_concatenation() {
        let message = br#"{"jsonrpc":"2.0","id":1,"result":{"text":"abcdefghijklmnop"}}"#;
        let mut wire = BytesMut::new();
        let pieces: Vec<&[u8]> = message.chunks(7).collect();
        let (last, parts) = pieces.split_last().expect("several pieces");
        for piece in parts {
            Frame::part(4, Bytes::copy_from_slice(piece)).encode(&mut wire);
        }
        Frame::message(4, Bytes::copy_from_slice(last)).encode(&mut wire);
        let frames = decode_all(&wire, 7).expect("every piece is within the frame limit");
        let (closing, head) = frames.split_last().expect("frames");
        assert!(head.iter().all(|f| f.kind == FrameKind::MessagePart));
        assert_eq!(closing.kind, FrameKind::Message);
        let joined: Vec<u8> = frames.iter().flat_map(|f| f.payload.to_vec()).collect();
        assert_eq!(joined, message);
    }

    #[test]
    fn piece_count_refuses_past_the_message_limit() {
        let mut count = PieceCount::new(10);
        assert_eq!(count.add(4), Ok(()));
        assert_eq!(count.add(6), Ok(()), "exactly at the limit is allowed");
        assert_eq!(count.bytes(), 10);
        assert_eq!(count.add(1), Err(TooManyPieces { limit: 10 }));
        assert_eq!(
            count.add(usize::MAX),
            Err(TooManyPieces { limit: 10 }),
            "no overflow"
        );
    }

    #[tokio::test]
    async fn writer_refuses_oversized_payload_and_reader_reads_clean_end() {
        let (a, b) = tokio::io::duplex(1024);
        let mut writer = FrameWriter::new(a, 8);
        let err = writer
            .send(&Frame::message(1, Bytes::from_static(b"123456789")))
            .await;
        assert!(matches!(
            err,
            Err(FrameError::TooLarge { size: 9, limit: 8 })
        ));
        writer
            .send(&Frame::message(2, Bytes::from_static(b"12345678")))
            .await
            .expect("at limit");
        writer.finish().await.expect("finish");
        drop(writer);
        let mut reader = FrameReader::new(b, 8);
        let frame = reader.next().await.expect("read").expect("one frame");
        assert_eq!(frame.exchange, 2);
        assert!(reader.next().await.expect("clean end").is_none());
    }

    /// An `AsyncWrite` that keeps each write apart, to see how frames reach the stream.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl AsyncWrite for Writes {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.push(buf.to_vec());
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_small_frame_reaches_the_stream_in_one_write_and_a_large_payload_uncopied() {
        let small = Frame::message(1, Bytes::from_static(br#"{"jsonrpc":"2.0","id":1}"#));
        let large = Frame::message(2, Bytes::from(vec![b'x'; COALESCE_BYTES]));
        let frames = [small.clone(), Frame::end(1), large.clone()];
        let mut writer = FrameWriter::new(Writes::default(), 1 << 20);
        for frame in &frames {
            writer.send(frame).await.expect("sent");
        }
        let writes = std::mem::take(&mut writer.io.0);
        let sizes: Vec<usize> = writes.iter().map(Vec::len).collect();
        assert_eq!(
            sizes,
            [
                HEADER_LEN + small.payload.len(),
                HEADER_LEN,
                HEADER_LEN,
                COALESCE_BYTES
            ],
            "a header with its small payload, a large payload apart from its header"
        );
        assert_eq!(
            decode_all(&writes.concat(), 1 << 20).expect("decodes"),
            frames
        );
        let mut writer = FrameWriter::new(Writes::default(), 1024);
        let too_large = Frame::message(3, Bytes::from(vec![b'y'; 2048]));
        assert!(matches!(
            writer.send(&too_large).await,
            Err(FrameError::TooLarge {
                size: 2048,
                limit: 1024
            })
        ));
        assert!(
            writer.io.0.is_empty(),
            "nothing of a refused frame is written"
        );
    }
}
