//! Event logs: what the relay sends an agent on one SSE stream, kept for resumption.
//!
//! Every agent-facing SSE stream of a session (the GET stream, and each POST answer that turned
//! into a stream) writes its messages into an [`EventLog`]. A [`LogReader`] turns the log into
//! the HTTP body. When the agent's connection drops, the producer carries on into the log; an
//! agent that reconnects with `Last-Event-ID: <stream>-<seq>` gets a new reader that starts
//! right after that event: nothing lost within the replay window, nothing twice.
//!
//! Memory is bounded: events the reader has taken are kept only within a replay window (by
//! count and bytes, always keeping the latest); events not yet taken are never evicted while a
//! reader is attached (the producer waits instead: backpressure to the tunnel stream), and with
//! no reader attached the oldest are dropped beyond the window (and counted).

use std::collections::VecDeque;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use super::sealed::AnswerIds;
use crate::relay::tunnel::Budget;
use crate::wire::UNSOLICITED;

/// Events kept for replay per stream: a reconnect within a few seconds of a busy stream.
pub(crate) const REPLAY_EVENTS: usize = 64;
/// Bytes kept for replay per stream (the latest event is always kept, whatever its size).
pub(crate) const REPLAY_BYTES: usize = 1024 * 1024;

/// One SSE stream's events.
pub struct EventLog {
    /// The stream number, the first half of every event id (`<stream>-<seq>`).
    pub stream: u64,
    /// Sealed event ids naming the answer itself, which any relay of the fleet can resume
    /// (see [`AnswerIds`]); unset for `<stream>-<seq>` ids, resumable on this relay only. A
    /// session's GET stream log is named when an agent first listens (see [`EventLog::name`]).
    ids: std::sync::OnceLock<AnswerIds>,
    state: Mutex<LogState>,
    changed: Notify,
}

/// What one entry of a log holds: a whole message, or a piece of one passed on as it arrives
/// (a large answer: see [`EventLog::push_piece`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// A whole message: one SSE event.
    Whole,
    /// The first piece of a message: opens its event.
    Begin,
    /// A piece that continues the message.
    More,
    /// The piece that ends the message: closes its event (which takes this entry's id).
    Last,
    /// The message broke off: the reader ends its body with an error (an event begun cannot
    /// be taken back); the error answer follows in the log, for an agent that resumes.
    Abort,
}

/// One entry of a log: a piece of a message (or a whole one), and the number of the message
/// it belongs to (messages count from 1 in the order they complete; a replayed answer's
/// continue the count of the answer it replays).
struct Entry {
    piece: Piece,
    bytes: Bytes,
    message: u64,
}

struct LogState {
    /// Sequence number of `events[0]`.
    first: u64,
    events: VecDeque<Entry>,
    /// Messages completed so far (the number of the last whole one).
    messages: u64,
    /// The number `connect` gave the last message pushed with one ([`EventLog::push_event`]):
    /// one at or below it is a message sent again, already here.
    numbered: u64,
    bytes: usize,
    /// Sequence numbers below this have been handed to some reader.
    delivered: u64,
    /// The attached reader's generation, if one is attached.
    reader: Option<u64>,
    generation: u64,
    finished: bool,
    /// The answer moved to another relay's stream (the agent resumed it there): what this
    /// log holds is not all of it, so it is not resumed here.
    moved: bool,
    dropped: u64,
    /// The session's budget this log charges, if any.
    budget: Option<std::sync::Arc<Budget>>,
}

impl LogState {
    fn next_seq(&self) -> u64 {
        self.first + self.events.len() as u64
    }

    fn over_budget(&self) -> bool {
        self.budget.as_ref().is_some_and(|budget| budget.over())
    }

    /// Evicts from the front what may go: delivered events beyond the window, or, with no
    /// reader attached, anything beyond the window. Past the session's budget the window
    /// shrinks to nothing: the latest event is kept only within it.
    fn evict(&mut self) {
        loop {
            let over_window = self.events.len() > 1
                && (self.events.len() > REPLAY_EVENTS || self.bytes > REPLAY_BYTES);
            if self.events.is_empty() || !(over_window || self.over_budget()) {
                break;
            }
            if self.first >= self.delivered && self.reader.is_some() {
                break;
            }
            if self.first >= self.delivered {
                self.dropped += 1;
                metrics::counter!(crate::metrics::DROPPED_MESSAGES).increment(1);
            }
            if let Some(entry) = self.events.pop_front() {
                self.bytes -= entry.bytes.len();
                if let Some(budget) = &self.budget {
                    budget.release(entry.bytes.len());
                }
            }
            self.first += 1;
            self.delivered = self.delivered.max(self.first);
        }
    }

    /// Bytes of the events the attached reader has not taken yet.
    fn undelivered_bytes(&self) -> usize {
        let taken = self.delivered.saturating_sub(self.first) as usize;
        self.events
            .iter()
            .skip(taken)
            .map(|entry| entry.bytes.len())
            .sum()
    }

    /// Whether the producer must wait: the window (by count or bytes), or the session's
    /// budget, is full of events the reader has not taken. An empty log never waits, so the
    /// producer always makes progress once the reader has taken everything.
    fn full(&self, next: usize) -> bool {
        if self.reader.is_none() || self.delivered >= self.next_seq() {
            return false;
        }
        let undelivered = (self.next_seq() - self.delivered) as usize;
        undelivered >= REPLAY_EVENTS
            || self.undelivered_bytes().saturating_add(next) > REPLAY_BYTES
            || self
                .budget
                .as_ref()
                .is_some_and(|budget| !budget.fits(next))
    }
}

/// Where a new reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At the first event no reader has taken yet (a fresh GET stream).
    Undelivered,
    /// Right after this sequence number (`Last-Event-ID`).
    After(u64),
}

impl EventLog {
    /// An empty log for stream number `stream`.
    pub fn new(stream: u64) -> Self {
        Self::with_budget(stream, None)
    }

    /// An empty log for stream number `stream` whose events count against `budget`.
    pub fn with_budget(stream: u64, budget: Option<std::sync::Arc<Budget>>) -> Self {
        Self::answer(stream, budget, None)
    }

    /// An empty log for stream number `stream` whose events count against `budget`, named by
    /// `ids` when given (its first message is then the one after `ids.after`).
    pub fn answer(
        stream: u64,
        budget: Option<std::sync::Arc<Budget>>,
        ids: Option<AnswerIds>,
    ) -> Self {
        let messages = ids.as_ref().map_or(0, |ids| ids.after);
        let named = std::sync::OnceLock::new();
        if let Some(ids) = ids {
            let _ = named.set(ids);
        }
        Self {
            stream,
            ids: named,
            state: Mutex::new(LogState {
                messages,
                numbered: 0,
                // Sequence 0 is the priming event's id (a stream that begins empty): resuming
                // after it replays from the first real event.
                first: 1,
                events: VecDeque::new(),
                bytes: 0,
                delivered: 1,
                reader: None,
                generation: 0,
                finished: false,
                moved: false,
                dropped: 0,
                budget,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, LogState> {
        self.state.lock()
    }

    /// Appends a message; waits while an attached reader has the window full.
    pub async fn push(&self, message: Bytes) {
        self.push_piece(Piece::Whole, message).await
    }

    /// Appends a piece of a message (or a whole one); waits while an attached reader has the
    /// window full. A large answer goes in pieces, so the log (and the relay) never holds it
    /// whole: pieces already taken are evicted like any event. A reader that attaches in the
    /// middle of a message in pieces skips to the next message (it cannot replay half an event).
    pub async fn push_piece(&self, piece: Piece, message: Bytes) {
        self.push_entry(piece, message, UNSOLICITED).await
    }

    /// Appends a server-initiated message of the session's GET stream with the number
    /// `connect` gave it ([`crate::wire::FrameKind::Event`]), which its event id then seals;
    /// or, for [`UNSOLICITED`], one without a number. A number at or below the last one here
    /// is a message `connect` sent again: already here, it is skipped. Once numbered, an
    /// unnumbered message shares the number of the one before it.
    pub async fn push_event(&self, number: u64, message: Bytes) {
        self.push_entry(Piece::Whole, message, number).await
    }

    async fn push_entry(&self, piece: Piece, message: Bytes, numbered: u64) {
        loop {
            let notified = self.changed.notified();
            {
                let mut state = self.lock();
                if numbered != UNSOLICITED && numbered <= state.numbered {
                    return;
                }
                if !state.full(message.len()) {
                    state.bytes += message.len();
                    if let Some(budget) = &state.budget {
                        budget.charge(message.len());
                    }
                    let number = match (numbered, state.numbered) {
                        (UNSOLICITED, 0) => state.messages + 1,
                        (UNSOLICITED, _) => state.messages,
                        (numbered, _) => {
                            state.numbered = numbered;
                            numbered
                        }
                    };
                    if matches!(piece, Piece::Whole | Piece::Last) {
                        state.messages = number;
                    }
                    state.events.push_back(Entry {
                        piece,
                        bytes: message,
                        message: number,
                    });
                    state.evict();
                    break;
                }
            }
            notified.await;
        }
        self.changed.notify_waiters();
    }

    /// Marks the stream complete: readers end once they have taken everything.
    pub fn finish(&self) {
        self.lock().finished = true;
        self.changed.notify_waiters();
    }

    /// Whether the stream is complete and every event has been taken.
    pub fn is_done(&self) -> bool {
        let state = self.lock();
        state.finished && state.delivered >= state.next_seq()
    }

    /// Resolves once a reader was attached and none is any more: for a stream that cannot be
    /// resumed, the agent is gone for good.
    pub async fn abandoned(&self) {
        loop {
            let notified = self.changed.notified();
            {
                let state = self.lock();
                if state.generation > 0 && state.reader.is_none() {
                    return;
                }
            }
            notified.await;
        }
    }

    /// Messages dropped unread because no reader was attached for too long.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Attaches a reader (replacing any attached one, which then ends).
    pub fn attach(self: &std::sync::Arc<Self>, start: Start) -> LogReader {
        let (generation, next) = {
            let mut state = self.lock();
            state.generation += 1;
            state.reader = Some(state.generation);
            let next = match start {
                Start::Undelivered => state.delivered,
                Start::After(seq) => seq.saturating_add(1),
            };
            (state.generation, next.max(state.first))
        };
        self.changed.notify_waiters();
        LogReader {
            log: self.clone(),
            generation,
            next,
            aligning: true,
        }
    }
}

impl EventLog {
    /// The sealed ids naming this log's answer, if it has them.
    pub fn answer_ids(&self) -> Option<&AnswerIds> {
        self.ids.get()
    }

    /// Names the log's events with sealed `ids` from now on, unless it is named already.
    pub fn name(&self, ids: AnswerIds) {
        let _ = self.ids.set(ids);
    }

    /// The number of the last message before the first one no reader has taken: where a
    /// fresh reader of a numbered log starts (its priming event's id).
    pub fn undelivered_after(&self) -> u64 {
        let state = self.lock();
        let taken = state.delivered.saturating_sub(state.first) as usize;
        match state.events.get(taken) {
            Some(entry) => entry.message.saturating_sub(1),
            None => state.messages,
        }
    }

    /// Attaches a reader at the first message numbered above `after` (a GET stream resumed
    /// with a sealed `Last-Event-ID`), or at the next message to come. Messages after `after`
    /// already evicted here are not in it: `connect` sends those it keeps again.
    pub fn attach_after_number(self: &std::sync::Arc<Self>, after: u64) -> LogReader {
        let seq = {
            let state = self.lock();
            match state.events.iter().position(|entry| entry.message > after) {
                Some(index) => state.first + index as u64,
                None => state.next_seq(),
            }
        };
        self.attach(Start::After(seq - 1))
    }

    /// The id of the event that ends message `message` (or of the priming event, for the
    /// message before the first): sealed when the log has [`AnswerIds`], else
    /// `<stream>-<seq>` with the entry's sequence number `seq`.
    pub fn event_id(&self, seq: u64, message: u64) -> String {
        match self.ids.get() {
            Some(ids) => ids.mint(message),
            None => format!("{}-{seq}", self.stream),
        }
    }

    /// The priming event's id: before the first message.
    pub fn priming_id(&self) -> String {
        let before = self.ids.get().map_or(0, |ids| ids.after);
        self.event_id(0, before)
    }

    /// The answer moved to another stream: the log ends, and is not resumed here.
    pub fn moved_away(&self) {
        self.lock().moved = true;
        self.finish();
    }

    /// Attaches a reader right after message `message` (a sealed `Last-Event-ID`), if the
    /// log still holds everything after it; `None` if not (evicted, never that many, or the
    /// answer moved away).
    pub fn attach_after_message(self: &std::sync::Arc<Self>, message: u64) -> Option<LogReader> {
        let seq = {
            let state = self.lock();
            if message > state.messages || state.moved {
                return None;
            }
            match state
                .events
                .iter()
                .position(|entry| entry.message > message)
            {
                None => state.next_seq(),
                Some(index) => {
                    let entry = &state.events[index];
                    let starts = matches!(entry.piece, Piece::Whole | Piece::Begin);
                    if !starts || entry.message > message + 1 {
                        return None;
                    }
                    state.first + index as u64
                }
            }
        };
        Some(self.attach(Start::After(seq - 1)))
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let state = self.lock();
        if let Some(budget) = &state.budget {
            budget.release(state.bytes);
        }
    }
}

/// Reads one log from a position on; ends when the log is finished and drained, or when a
/// newer reader takes over.
pub struct LogReader {
    log: std::sync::Arc<EventLog>,
    generation: u64,
    next: u64,
    /// Until the first entry that starts a message: pieces of one begun before are skipped.
    aligning: bool,
}

impl LogReader {
    /// The next event: its sequence number and message (a piece of one for a message in
    /// pieces; see [`LogReader::next_entry`]); `None` once the log is finished and read, or
    /// another reader took over.
    pub async fn next(&mut self) -> Option<(u64, Bytes)> {
        self.next_entry()
            .await
            .map(|(seq, _, message, _)| (seq, message))
    }

    /// The next entry: its sequence number, what piece it is, its bytes, and the number of
    /// the message it belongs to.
    pub async fn next_entry(&mut self) -> Option<(u64, Piece, Bytes, u64)> {
        loop {
            let notified = self.log.changed.notified();
            {
                let mut state = self.log.lock();
                if state.reader != Some(self.generation) {
                    return None;
                }
                self.next = self.next.max(state.first);
                if self.next < state.next_seq() {
                    let seq = self.next;
                    let entry = &state.events[(seq - state.first) as usize];
                    let (piece, event, message) = (entry.piece, entry.bytes.clone(), entry.message);
                    self.next += 1;
                    state.delivered = state.delivered.max(self.next);
                    state.evict();
                    drop(state);
                    self.log.changed.notify_waiters();
                    if self.aligning && matches!(piece, Piece::More | Piece::Last | Piece::Abort) {
                        continue;
                    }
                    self.aligning = false;
                    return Some((seq, piece, event, message));
                }
                if state.finished {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// The log being read.
    pub fn log(&self) -> &std::sync::Arc<EventLog> {
        &self.log
    }
}

impl Drop for LogReader {
    fn drop(&mut self) {
        let mut state = self.log.lock();
        if state.reader == Some(self.generation) {
            state.reader = None;
            state.evict();
        }
        drop(state);
        self.log.changed.notify_waiters();
    }
}

/// Parses an event id `<stream>-<seq>`.
pub fn parse_event_id(id: &str) -> Option<(u64, u64)> {
    let (stream, seq) = id.split_once('-')?;
    Some((stream.parse().ok()?, seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn msg(n: usize) -> Bytes {
        Bytes::from(format!("m{n}"))
    }

    #[tokio::test]
    async fn a_reader_that_resumes_inside_a_message_in_pieces_skips_to_the_next_message() {
        let log = Arc::new(EventLog::new(4));
        log.push(msg(0)).await;
        log.push_piece(Piece::Begin, msg(1)).await;
        log.push_piece(Piece::More, msg(2)).await;
        log.push_piece(Piece::Last, msg(3)).await;
        log.push(msg(4)).await;
        log.finish();
        // Resuming after the message's first piece: the rest of it cannot make an event.
        let mut resumed = log.attach(Start::After(2));
        let mut got = Vec::new();
        while let Some((seq, piece, _, _)) = resumed.next_entry().await {
            got.push((seq, piece));
        }
        assert_eq!(got, vec![(5, Piece::Whole)]);
        drop(resumed);
        // From the start, the pieces come in order with their kinds.
        let mut reader = log.attach(Start::After(0));
        let mut got = Vec::new();
        while let Some((seq, piece, _, _)) = reader.next_entry().await {
            got.push((seq, piece));
        }
        assert_eq!(
            got,
            vec![
                (1, Piece::Whole),
                (2, Piece::Begin),
                (3, Piece::More),
                (4, Piece::Last),
                (5, Piece::Whole)
            ]
        );
    }

    #[tokio::test]
    async fn reader_gets_everything_then_ends() {
        let log = Arc::new(EventLog::new(3));
        for n in 0..3 {
            log.push(msg(n)).await;
        }
        log.finish();
        let mut reader = log.attach(Start::Undelivered);
        let got: Vec<_> =
            std::iter::from_fn(|| futures_util::FutureExt::now_or_never(reader.next()).flatten())
                .collect();
        assert_eq!(got, vec![(1, msg(0)), (2, msg(1)), (3, msg(2))]);
        assert!(log.is_done());
    }

    #[tokio::test]
    async fn numbered_messages_skip_what_is_here_and_resume_after_a_number() {
        let log = Arc::new(EventLog::new(1));
        let mut first = log.attach(Start::Undelivered);
        for number in [3, 4] {
            log.push_event(number, msg(number as usize)).await;
        }
        assert_eq!(first.next().await, Some((1, msg(3))));
        assert_eq!(log.undelivered_after(), 3, "a fresh reader starts after 3");
        // `connect` sends 4 again, then 5, to a stream that resumes after 3; an unnumbered
        // message shares the number of the one before it.
        log.push_event(4, msg(40)).await;
        log.push_event(5, msg(5)).await;
        log.push_event(UNSOLICITED, msg(6)).await;
        log.finish();
        drop(first);
        let mut resumed = log.attach_after_number(3);
        let mut got = Vec::new();
        while let Some((_, _, message, number)) = resumed.next_entry().await {
            got.push((number, message));
        }
        assert_eq!(got, vec![(4, msg(4)), (5, msg(5)), (5, msg(6))]);
        assert_eq!(log.undelivered_after(), 5);
    }

    #[tokio::test]
    async fn resume_after_last_event_id_replays_exactly_the_rest() {
        let log = Arc::new(EventLog::new(1));
        let mut first = log.attach(Start::Undelivered);
        for n in 0..5 {
            log.push(msg(n)).await;
        }
        // The agent saw events 0 and 1, then its connection dropped (events 2.. may have been
        // read into a dead socket: 2 was taken but never arrived).
        assert_eq!(first.next().await, Some((1, msg(0))));
        assert_eq!(first.next().await, Some((2, msg(1))));
        assert_eq!(first.next().await, Some((3, msg(2))));
        drop(first);
        log.push(msg(5)).await;
        log.finish();
        let mut resumed = log.attach(Start::After(2));
        let mut got = Vec::new();
        while let Some((seq, _)) = resumed.next().await {
            got.push(seq);
        }
        assert_eq!(
            got,
            vec![3, 4, 5, 6],
            "from right after the last seen id, nothing twice"
        );
    }

    #[tokio::test]
    async fn a_new_reader_takes_over() {
        let log = Arc::new(EventLog::new(0));
        let mut old = log.attach(Start::Undelivered);
        let mut new = log.attach(Start::Undelivered);
        log.push(msg(0)).await;
        assert_eq!(old.next().await, None);
        assert_eq!(new.next().await, Some((1, msg(0))));
    }

    #[tokio::test]
    async fn without_reader_old_events_are_dropped_beyond_the_window() {
        let log = Arc::new(EventLog::new(0));
        for n in 0..REPLAY_EVENTS + 10 {
            log.push(msg(n)).await;
        }
        assert_eq!(log.dropped(), 10);
        let mut reader = log.attach(Start::Undelivered);
        assert_eq!(
            reader.next().await,
            Some((11, msg(10))),
            "the newest window is kept for a late GET"
        );
    }

    #[tokio::test]
    async fn attached_slow_reader_gets_backpressure_not_loss() {
        let log = Arc::new(EventLog::new(0));
        let mut reader = log.attach(Start::Undelivered);
        let producer = {
            let log = log.clone();
            tokio::spawn(async move {
                for n in 0..REPLAY_EVENTS * 3 {
                    log.push(msg(n)).await;
                }
                log.finish();
            })
        };
        let mut seqs = Vec::new();
        while let Some((seq, event)) = reader.next().await {
            assert_eq!(event, msg(seq as usize - 1));
            seqs.push(seq);
        }
        producer.await.expect("producer");
        assert_eq!(seqs, (1..=(REPLAY_EVENTS * 3) as u64).collect::<Vec<_>>());
        assert_eq!(log.dropped(), 0);
    }

    #[tokio::test]
    async fn an_attached_reader_that_does_not_read_stops_the_producer_by_bytes() {
        // Few, large events: the count window (64) is far away, the byte window is not.
        let log = Arc::new(EventLog::new(0));
        let _reader = log.attach(Start::Undelivered);
        let big = Bytes::from(vec![b'x'; REPLAY_BYTES / 2 + 1]);
        log.push(big.clone()).await;
        assert!(
            futures_util::FutureExt::now_or_never(log.push(big.clone())).is_none(),
            "the second event would pass the byte window: the producer waits"
        );
    }

    #[tokio::test]
    async fn the_session_budget_bounds_every_log_of_the_session_in_bytes() {
        let budget = Budget::new(1000);
        let answers: Vec<Arc<EventLog>> = (1..=8)
            .map(|n| Arc::new(EventLog::with_budget(n, Some(budget.clone()))))
            .collect();
        // Nobody reads: each log would keep up to 64 events or 1 MiB on its own.
        for log in &answers {
            for _ in 0..10 {
                log.push(Bytes::from(vec![b'x'; 300])).await;
            }
        }
        assert!(budget.used() <= 1000, "held {} bytes", budget.used());
        let dropped: u64 = answers.iter().map(|log| log.dropped()).sum();
        assert!(dropped >= 80 - 1000 / 300, "dropped {dropped}");
        // What is dropped is given back: the budget is whole again once the logs go.
        drop(answers);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_reader_past_the_budget_still_gets_every_event_in_order() {
        let budget = Budget::new(1000);
        let log = Arc::new(EventLog::with_budget(1, Some(budget.clone())));
        let mut reader = log.attach(Start::Undelivered);
        let producer = {
            let log = log.clone();
            tokio::spawn(async move {
                for n in 0..50u8 {
                    log.push(Bytes::from(vec![n; 400])).await;
                }
                log.finish();
            })
        };
        let mut got = 0u8;
        while let Some((_, event)) = reader.next().await {
            assert_eq!(event[0], got);
            assert!(budget.used() <= 1200, "held {} bytes", budget.used());
            got += 1;
        }
        producer.await.expect("producer");
        assert_eq!(got, 50);
        assert_eq!(log.dropped(), 0, "backpressure, not loss");
    }

    #[test]
    fn event_ids() {
        assert_eq!(parse_event_id("3-17"), Some((3, 17)));
        assert_eq!(parse_event_id("x-1"), None);
        assert_eq!(parse_event_id("17"), None);
    }
}
