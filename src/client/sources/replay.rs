//! What `connect` keeps of each answer of a held session, so any relay can replay it.
//!
//! When a relay dies (or the tunnel to it drops) with a call in flight, the agent's POST
//! breaks, but the upstream's answer still arrives here: the upstream request belongs to the
//! held session, not to the stream (see [`super::held`]). So every frame of an answer goes
//! through the session's [`Replays`]: kept, up to [`REPLAY_BYTES`] per session, and sent to
//! where the answer goes now. An agent that resumes with `Last-Event-ID` on any relay makes
//! that relay send a [`Replay`] on its stream: the answer is re-pointed there, what was kept
//! after the last message the agent saw goes first, the rest follows as it arrives. The
//! upstream never sees the request twice.
//!
//! Answers are named by the relay's stream number and the exchange on it (see
//! [`crate::wire::SessionHandle::stream`]). Memory is bounded per session, in bytes and in
//! answers: finished answers are forgotten first (oldest first); an answer in flight that
//! outgrows the buffer is kept no more, and a replay of it says so instead of sending half.
//!
//! Sends and replays of one answer are serialized by the answer's own lock, so a replay never
//! interleaves with a live frame: what the agent gets is the answer in order, nothing twice.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::value::RawValue;

use super::Out;
use super::stream::fail_ids;
use crate::mcp::jsonrpc::codes;
use crate::transport::SendHalf;
use crate::wire::{Frame, FrameKind, NOTHING_OPEN, Replay, WeakFrameSink};

/// Bytes of answers (and their requests) kept per session: a few ordinary answers in flight
/// at once. An answer larger than this cannot be replayed (a replay of it says so).
pub(crate) const REPLAY_BYTES: usize = 1024 * 1024;

/// Bytes kept for all sessions of one source at most: with [`REPLAY_BYTES`] per session, what
/// bounds the memory a source's sessions (up to [`super::held::MAX_HELD`]) hold for replays.
/// Past it, answers in flight are not kept (a replay of one says so).
pub(crate) const REPLAY_SOURCE_BYTES: usize = 64 * 1024 * 1024;

/// Answers kept per session; past this the oldest finished one is forgotten.
pub(crate) const REPLAY_ANSWERS: usize = 64;

/// How long a finished answer is kept: an agent resumes an answer whose connection broke
/// within a few seconds (clients retry after the `retry` the relay's priming event suggests,
/// 1 s); what nobody resumed by then is forgotten.
pub(crate) const KEEP_FINISHED: Duration = Duration::from_secs(60);

/// Bytes kept for replays by the sessions of one source, together (see
/// [`REPLAY_SOURCE_BYTES`]).
pub(crate) type SourceBytes = Arc<AtomicUsize>;

/// An answer's name: the relay's number for the stream that asked, and the exchange on it.
pub(crate) type Key = (u64, u64);

/// One answer: what was kept of it, and where it goes now.
struct Answer {
    key: Key,
    /// The agent's message (the relay that replays records its calls).
    request: Bytes,
    /// The ids of its requests (a replay that cannot be made answers them with an error).
    ids: Vec<Box<RawValue>>,
    /// Its frames so far (messages, pieces, the end), in order.
    frames: Vec<Frame>,
    /// Bytes it holds (request and frames).
    bytes: usize,
    /// It outgrew the buffer: kept no more.
    overflowed: bool,
    /// When its `End` went out (the upstream had answered).
    done: Option<Instant>,
    /// The stream it goes to and its exchange number there (held weakly: a stream ends when
    /// its own work is done).
    target: Option<(WeakFrameSink<SendHalf>, u64)>,
    /// Serializes its sends and replays.
    sending: Arc<tokio::sync::Mutex<()>>,
}

struct Inner {
    answers: VecDeque<Answer>,
    /// Bytes kept by this session.
    bytes: usize,
    /// Bytes kept by every session of the source.
    source: SourceBytes,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.source.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Inner {
    /// Whether `needed` more bytes fit this session's and the source's budgets.
    fn fits(&self, needed: usize) -> bool {
        self.bytes + needed <= REPLAY_BYTES
            && self.source.load(Ordering::Acquire) + needed <= REPLAY_SOURCE_BYTES
    }

    fn charge(&mut self, bytes: usize) {
        self.bytes += bytes;
        self.source.fetch_add(bytes, Ordering::AcqRel);
    }

    fn release(&mut self, bytes: usize) {
        self.bytes -= bytes;
        self.source.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Forgets the answers finished longer than [`KEEP_FINISHED`] ago.
    fn expire(&mut self, now: Instant) {
        let mut freed = 0;
        self.answers.retain(|answer| {
            let keep = answer
                .done
                .is_none_or(|at| now.saturating_duration_since(at) < KEEP_FINISHED);
            if !keep {
                freed += answer.bytes;
            }
            keep
        });
        self.release(freed);
    }

    fn find(&mut self, key: Key) -> Option<&mut Answer> {
        self.answers.iter_mut().find(|answer| answer.key == key)
    }

    /// Forgets the oldest finished answer other than `keep`; whether there was one.
    fn forget_oldest_done(&mut self, keep: Key) -> bool {
        let Some(index) = self
            .answers
            .iter()
            .position(|answer| answer.done.is_some() && answer.key != keep)
        else {
            return false;
        };
        if let Some(answer) = self.answers.remove(index) {
            self.release(answer.bytes);
        }
        true
    }

    /// Keeps `frame` of the answer `key` within the budget; returns where it goes now.
    fn record(
        &mut self,
        key: Key,
        frame: &Frame,
    ) -> Option<Option<(WeakFrameSink<SendHalf>, u64)>> {
        let keeps = matches!(
            frame.kind,
            FrameKind::Message | FrameKind::MessagePart | FrameKind::End
        );
        let needed = frame.payload.len();
        let answer = self.find(key)?;
        if frame.kind == FrameKind::End {
            answer.done = Some(Instant::now());
        }
        if !keeps || answer.overflowed {
            return Some(answer.target.clone());
        }
        while !self.fits(needed) && self.forget_oldest_done(key) {}
        let fits = self.fits(needed);
        let answer = self.find(key).expect("only other answers were forgotten");
        if fits {
            answer.frames.push(Frame {
                payload: unpinned(&frame.payload),
                ..frame.clone()
            });
            answer.bytes += needed;
            self.charge(needed);
        } else {
            let freed = answer.bytes;
            answer.overflowed = true;
            answer.frames = Vec::new();
            answer.request = Bytes::new();
            answer.bytes = 0;
            self.release(freed);
        }
        let target = self.find(key).and_then(|answer| answer.target.clone());
        Some(target)
    }
}

/// The answers of one held session.
pub(crate) struct Replays {
    inner: Mutex<Inner>,
}

impl Replays {
    /// No answers yet; the bytes kept count against `source` too.
    pub(crate) fn new(source: SourceBytes) -> Self {
        Self {
            inner: Mutex::new(Inner {
                answers: VecDeque::new(),
                bytes: 0,
                source,
            }),
        }
    }

    /// An answer begins: the agent's `request` (with its request `ids`) came on `out` as
    /// `exchange`, whose key is `key`.
    pub(crate) fn begin(
        &self,
        key: Key,
        request: Bytes,
        ids: Vec<Box<RawValue>>,
        out: &Out,
        exchange: u64,
    ) {
        let mut inner = self.inner.lock();
        inner.expire(Instant::now());
        if inner.answers.len() >= REPLAY_ANSWERS
            && !inner.forget_oldest_done(key)
            && let Some(oldest) = inner.answers.pop_front()
        {
            inner.release(oldest.bytes);
        }
        while !inner.fits(request.len()) && inner.forget_oldest_done(key) {}
        let overflowed = !inner.fits(request.len());
        let (request, bytes) = if overflowed {
            (Bytes::new(), 0)
        } else {
            let len = request.len();
            (unpinned(&request), len)
        };
        inner.charge(bytes);
        inner.answers.push_back(Answer {
            key,
            request,
            ids,
            frames: Vec::new(),
            bytes,
            overflowed,
            done: None,
            target: Some((out.downgrade(), exchange)),
            sending: Arc::default(),
        });
    }

    /// Sends `frame` of the answer `key` where the answer goes now, keeping it for a replay.
    /// `Err(frame)` when no answer has that key (it was not begun here).
    pub(crate) async fn send(&self, key: Key, frame: Frame) -> Result<(), Frame> {
        let Some(sending) = self.inner.lock().find(key).map(|a| a.sending.clone()) else {
            return Err(frame);
        };
        let _turn = sending.lock().await;
        let Some(target) = self.inner.lock().record(key, &frame) else {
            // Forgotten meanwhile (evicted): nobody can replay it; the live stream still gets it.
            return Err(frame);
        };
        if let Some((out, exchange)) = target
            && let Some(out) = out.upgrade()
        {
            // A closed stream: the frame is kept, a replay brings it.
            let _ = out.send(Frame { exchange, ..frame }).await;
        }
        Ok(())
    }

    /// Replays an answer on `out` as `exchange` (see [`FrameKind::Replay`]): the `Replay`
    /// frame with the agent's message, what was kept after the `after`th message, then the
    /// rest as it arrives. The stream the answer went to before, if it lives, gets an empty
    /// `Replay` for it: the answer moved. An answer unknown here gets `End` only; one that outgrew the
    /// buffer, an error for each of its requests that says so.
    pub(crate) async fn replay(&self, replay: Replay, out: Out, exchange: u64) {
        let key = (replay.stream, replay.exchange);
        let Some(sending) = self.inner.lock().find(key).map(|a| a.sending.clone()) else {
            let _ = out.send(Frame::end(exchange)).await;
            return;
        };
        let _turn = sending.lock().await;
        let taken = {
            let mut inner = self.inner.lock();
            inner.find(key).map(|answer| {
                let before = std::mem::replace(
                    &mut answer.target,
                    (!answer.overflowed).then(|| (out.downgrade(), exchange)),
                );
                (
                    answer.request.clone(),
                    answer.frames.clone(),
                    answer.overflowed,
                    answer.ids.clone(),
                    before,
                )
            })
        };
        let Some((request, frames, overflowed, ids, before)) = taken else {
            let _ = out.send(Frame::end(exchange)).await;
            return;
        };
        if let Some((before, old)) = before
            && let Some(before) = before.upgrade()
        {
            // The stream it went to lives (the agent resumed elsewhere): it gets no more of
            // the answer, and is told so, so its relay resumes it here no more.
            let _ = before
                .send(Frame {
                    kind: FrameKind::Replay,
                    exchange: old,
                    payload: Bytes::new(),
                })
                .await;
        }
        // Frames before `start` hold the messages the agent has.
        let mut seen = 0;
        let start = frames
            .iter()
            .position(|frame| {
                let past = seen >= replay.after;
                seen += u64::from(frame.kind == FrameKind::Message);
                past
            })
            .unwrap_or(frames.len());
        let _ = out
            .send(Frame {
                kind: FrameKind::Replay,
                exchange,
                payload: unanswered(request, &frames[..start]),
            })
            .await;
        if overflowed {
            let reason = format!(
                "the answer was larger than connect's replay buffer ({REPLAY_BYTES} bytes) \
                 and cannot be resumed"
            );
            return fail_ids(&out, exchange, ids, codes::SOURCE_UNAVAILABLE, &reason).await;
        }
        for frame in frames.into_iter().skip(start) {
            if out.send(Frame { exchange, ..frame }).await.is_err() {
                return;
            }
        }
    }

    /// Bytes kept now.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }
}

/// The agent's `request` without the requests that the messages in `had` (frames the agent
/// already has) answered: the relay that replays waits for, and records, only the calls whose
/// answers the agent lacks. [`NOTHING_OPEN`] when it has them all; the request as it is when
/// none was answered.
fn unanswered(request: Bytes, had: &[Frame]) -> Bytes {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow, default)]
        id: Option<&'a RawValue>,
        #[serde(borrow, default)]
        method: Option<&'a RawValue>,
    }
    /// The id of a response.
    fn answers(raw: &RawValue) -> Option<String> {
        match serde_json::from_str::<Head>(raw.get()) {
            Ok(Head {
                id: Some(id),
                method: None,
            }) => Some(super::routing::key(id)),
            _ => None,
        }
    }
    /// The id of a request.
    fn asks(raw: &RawValue) -> Option<String> {
        match serde_json::from_str::<Head>(raw.get()) {
            Ok(Head {
                id: Some(id),
                method: Some(_),
            }) => Some(super::routing::key(id)),
            _ => None,
        }
    }
    /// A message's items: a batch's elements, or the message itself.
    fn items(message: &[u8]) -> Vec<&RawValue> {
        match message.first() {
            Some(b'[') => serde_json::from_slice(message).unwrap_or_default(),
            _ => serde_json::from_slice::<&RawValue>(message)
                .into_iter()
                .collect(),
        }
    }
    if had.is_empty() {
        return request;
    }
    let mut answered = std::collections::HashSet::new();
    let mut message = Vec::new();
    for frame in had {
        message.extend_from_slice(&frame.payload);
        if frame.kind == FrameKind::MessagePart {
            continue;
        }
        answered.extend(items(&message).into_iter().filter_map(answers));
        message.clear();
    }
    if answered.is_empty() {
        return request;
    }
    let asked = items(&request);
    let open: Vec<&RawValue> = asked
        .iter()
        .copied()
        .filter(|item| asks(item).is_none_or(|id| !answered.contains(&id)))
        .collect();
    if open.len() == asked.len() {
        request
    } else if !open.iter().any(|item| asks(item).is_some()) {
        Bytes::from_static(NOTHING_OPEN)
    } else {
        let open: Vec<&str> = open.iter().map(|item| item.get()).collect();
        Bytes::from(format!("[{}]", open.join(",")))
    }
}

/// Kept bytes smaller than this are copied (see [`unpinned`]).
const COPY_BELOW: usize = 4 * 1024;

/// `bytes` as a replay keeps them: a small slice is copied, so a kept request or answer never
/// holds on to the whole read buffer it was cut from (a frame reader's, hyper's) for as long
/// as the replay keeps it, kilobytes per idle session; a large one is mostly its own buffer
/// and is kept as it is.
fn unpinned(bytes: &Bytes) -> Bytes {
    if bytes.len() < COPY_BELOW {
        Bytes::copy_from_slice(bytes)
    } else {
        bytes.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FrameReader, FrameWriter};

    /// A frame sink whose frames a test reads back.
    fn pipe() -> (Out, FrameReader<crate::transport::RecvHalf>) {
        let (a, b) = tokio::io::duplex(4 << 20);
        let (_, write) = tokio::io::split(a);
        let (read, _) = tokio::io::split(b);
        (
            Out::new(FrameWriter::new(Box::new(write), 2 << 20)),
            FrameReader::new(Box::new(read), 2 << 20),
        )
    }

    async fn frames(reader: &mut FrameReader<crate::transport::RecvHalf>, n: usize) -> Vec<Frame> {
        let mut got = Vec::new();
        for _ in 0..n {
            got.push(reader.next().await.expect("read").expect("a frame"));
        }
        got
    }

    fn message(exchange: u64, text: &str) -> Frame {
        Frame::message(exchange, Bytes::from(text.to_owned()))
    }

    #[tokio::test]
    async fn a_replay_sends_what_the_agent_missed_then_the_rest_as_it_arrives() {
        let replays = Replays::new(SourceBytes::default());
        let (first, mut first_reader) = pipe();
        replays.begin(
            (9, 4),
            Bytes::from_static(b"{\"req\":1}"),
            Vec::new(),
            &first,
            4,
        );
        for text in ["progress", "more"] {
            replays.send((9, 4), message(4, text)).await.expect("begun");
        }
        let live = frames(&mut first_reader, 2).await;
        assert_eq!(live[1].payload, "more");
        drop(first);
        // The first stream is gone; the answer arrives, kept.
        replays
            .send((9, 4), message(4, "answer"))
            .await
            .expect("begun");
        replays.send((9, 4), Frame::end(4)).await.expect("begun");
        let (second, mut second_reader) = pipe();
        let replay = Replay {
            stream: 9,
            exchange: 4,
            after: 1,
        };
        replays.replay(replay, second, 7).await;
        let got = frames(&mut second_reader, 4).await;
        assert_eq!(got[0].kind, FrameKind::Replay);
        assert_eq!(got[0].payload, "{\"req\":1}", "the agent's message first");
        let rest: Vec<_> = got[1..]
            .iter()
            .map(|f| (f.kind, f.exchange, f.payload.clone()))
            .collect();
        assert_eq!(
            rest,
            vec![
                (FrameKind::Message, 7, Bytes::from("more")),
                (FrameKind::Message, 7, Bytes::from("answer")),
                (FrameKind::End, 7, Bytes::new()),
            ],
            "after the message the agent saw, in order, on the new exchange"
        );
    }

    #[tokio::test]
    async fn an_unknown_answer_gets_end_and_an_oversized_one_says_it_cannot_be_resumed() {
        let replays = Replays::new(SourceBytes::default());
        let (out, mut reader) = pipe();
        let replay = |exchange| Replay {
            stream: 1,
            exchange,
            after: 0,
        };
        replays.replay(replay(5), out.clone(), 2).await;
        assert_eq!(frames(&mut reader, 1).await[0].kind, FrameKind::End);

        let id = RawValue::from_string("17".into()).expect("json");
        let (first, mut first_reader) = pipe();
        replays.begin((1, 6), Bytes::from_static(b"{}"), vec![id], &first, 6);
        let big = Frame::message(6, Bytes::from(vec![b'x'; REPLAY_BYTES + 1]));
        replays.send((1, 6), big).await.expect("begun");
        let _ = frames(&mut first_reader, 1).await;
        assert_eq!(replays.bytes(), 0, "nothing kept of it");
        replays.replay(replay(6), out, 3).await;
        let moved = frames(&mut first_reader, 1).await;
        assert_eq!(
            (moved[0].kind, moved[0].exchange, moved[0].payload.len()),
            (FrameKind::Replay, 6, 0),
            "the stream it went to is told it moved"
        );
        let got = frames(&mut reader, 3).await;
        assert_eq!(got[0].kind, FrameKind::Replay);
        let error = String::from_utf8_lossy(&got[1].payload).into_owned();
        assert!(
            error.contains("cannot be resumed") && error.contains("\"id\":17"),
            "{error}"
        );
        assert_eq!(got[2].kind, FrameKind::End);
    }

    #[tokio::test]
    async fn the_buffer_forgets_finished_answers_first_and_stays_within_its_bytes() {
        let replays = Replays::new(SourceBytes::default());
        let (out, _reader) = pipe();
        let chunk = Bytes::from(vec![b'y'; REPLAY_BYTES / 4]);
        for exchange in 1..=8 {
            replays.begin((1, exchange), Bytes::new(), Vec::new(), &out, exchange);
            // Nobody reads the stream: sends go into its queue or fail, and are kept.
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(50),
                replays.send((1, exchange), Frame::message(exchange, chunk.clone())),
            )
            .await;
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(50),
                replays.send((1, exchange), Frame::end(exchange)),
            )
            .await;
            assert!(replays.bytes() <= REPLAY_BYTES);
        }
        let kept: Vec<Key> = replays.inner.lock().answers.iter().map(|a| a.key).collect();
        assert_eq!(kept.last(), Some(&(1, 8)), "the newest is kept: {kept:?}");
        assert!(
            !kept.contains(&(1, 1)),
            "the oldest finished one went first"
        );
    }

    #[test]
    fn finished_answers_are_kept_for_a_while_only() {
        let replays = Replays::new(SourceBytes::default());
        {
            let mut inner = replays.inner.lock();
            inner.charge(10);
            inner.answers.push_back(Answer {
                key: (1, 1),
                request: Bytes::new(),
                ids: Vec::new(),
                frames: Vec::new(),
                bytes: 10,
                overflowed: false,
                done: Some(Instant::now()),
                target: None,
                sending: Arc::default(),
            });
            inner.expire(Instant::now());
            assert_eq!(inner.bytes, 10, "kept at first");
            inner.expire(Instant::now() + KEEP_FINISHED);
        }
        assert_eq!(replays.bytes(), 0, "forgotten after KEEP_FINISHED");
    }

    #[tokio::test]
    async fn the_sessions_of_a_source_share_one_budget_given_back_when_they_end() {
        let source = SourceBytes::default();
        let (out, _reader) = pipe();
        let sessions: Vec<Replays> = (0..REPLAY_SOURCE_BYTES / REPLAY_BYTES + 1)
            .map(|_| Replays::new(source.clone()))
            .collect();
        let chunk = Bytes::from(vec![b'z'; REPLAY_BYTES - 1]);
        for (n, replays) in sessions.iter().enumerate() {
            let exchange = n as u64 + 1;
            replays.begin((1, exchange), Bytes::new(), Vec::new(), &out, exchange);
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(50),
                replays.send((1, exchange), Frame::message(exchange, chunk.clone())),
            )
            .await;
        }
        assert!(source.load(Ordering::Acquire) <= REPLAY_SOURCE_BYTES);
        assert_eq!(
            sessions.last().map(Replays::bytes),
            Some(0),
            "past the source's budget an answer is not kept"
        );
        drop(sessions);
        assert_eq!(source.load(Ordering::Acquire), 0, "given back");
    }

    #[test]
    fn a_replayed_batch_asks_only_for_the_answers_the_agent_lacks() {
        let batch = Bytes::from_static(
            br#"[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","method":"n"},{"jsonrpc":"2.0","id":"two","method":"b"}]"#,
        );
        let had = [
            Frame::message(
                5,
                Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/progress"}"#),
            ),
            Frame::part(5, Bytes::from_static(br#"{"jsonrpc":"2.0","id":"#)),
            Frame::message(5, Bytes::from_static(br#"1,"result":{}}"#)),
        ];
        assert_eq!(
            unanswered(batch.clone(), &had),
            Bytes::from_static(
                br#"[{"jsonrpc":"2.0","method":"n"},{"jsonrpc":"2.0","id":"two","method":"b"}]"#
            ),
            "the answered request is left out, even when its answer came in pieces"
        );
        assert_eq!(unanswered(batch.clone(), &had[..1]), batch, "none answered");
        assert_eq!(unanswered(batch.clone(), &[]), batch);
        let single = Bytes::from_static(br#"{"jsonrpc":"2.0","id":1,"method":"a"}"#);
        assert_eq!(
            unanswered(single.clone(), &had),
            NOTHING_OPEN,
            "a single request the agent has the answer of"
        );
        assert_eq!(unanswered(single.clone(), &had[..1]), single);
        let both = [Frame::message(
            5,
            Bytes::from_static(
                br#"[{"jsonrpc":"2.0","id":"two","result":{}},{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x"}}]"#,
            ),
        )];
        assert_eq!(
            unanswered(batch, &both),
            NOTHING_OPEN,
            "answered by one array: only a notification is left"
        );
    }
}
