//! Tests of the channel: frames routed by exchange, pieces and limits, the unsolicited queue.
use super::*;

/// A reader over `frames`, and what `read_loop` delivers to exchange 1 (waited on) and to
/// the GET stream (with each message's number, `UNSOLICITED` for none), with the reason it
/// stopped.
async fn run(frames: Vec<Frame>, limit: usize) -> (Vec<Event>, Vec<(u64, Bytes)>, String) {
    run_within(frames, limit, Budget::new(0)).await
}

/// [`run`] with the session's event budget.
async fn run_within(
    frames: Vec<Frame>,
    limit: usize,
    budget: Arc<Budget>,
) -> (Vec<Event>, Vec<(u64, Bytes)>, String) {
    let (mut near, far) = tokio::io::duplex(64 * 1024);
    let writer = tokio::spawn(async move {
        let mut bytes = bytes::BytesMut::new();
        for frame in &frames {
            frame.encode(&mut bytes);
        }
        tokio::io::AsyncWriteExt::write_all(&mut near, &bytes).await
    });
    let (tx, mut events) = mpsc::channel(1024);
    let (unsolicited_tx, mut unsolicited) = mpsc::channel(16);
    let shared = Shared {
        pending: Mutex::new(HashMap::from([(
            1,
            Waiting {
                tx,
                queued: Arc::default(),
            },
        )])),
        budget,
        closed: Mutex::default(),
        unsolicited_tx: Mutex::new(Some(unsolicited_tx)),
        resumable: Mutex::default(),
        resumable_changed: tokio::sync::Notify::new(),
        closed_by_peer: Default::default(),
    };
    let mut reader = FrameReader::new(far, limit);
    let reason = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        read_loop(&mut reader, &shared, limit),
    )
    .await
    .expect("the reader ends with the stream");
    writer
        .await
        .expect("writer task")
        .expect("frames are written");
    drop(shared);
    let mut delivered = Vec::new();
    while let Some(event) = events.recv().await {
        delivered.push(event);
    }
    let mut standalone = Vec::new();
    while let Some(message) = unsolicited.recv().await {
        standalone.push(message);
    }
    (delivered, standalone, reason)
}

/// Asserts that `events` match the pattern (a guard may follow it), showing them if not.
macro_rules! assert_events {
    ($events:expr, $($pattern:tt)+) => {{
        let events = &$events;
        assert!(matches!(events.as_slice(), $($pattern)+), "{events:?}");
    }};
}

fn piece(text: &'static str) -> Bytes {
    Bytes::from_static(text.as_bytes())
}

#[tokio::test]
async fn pieces_pass_through_in_order_within_the_limit() {
    let frames = vec![
        Frame::part(1, piece("{\"id\":1,")),
        Frame::part(1, piece("\"result\"")),
        Frame::message(1, piece(":{}}")),
        Frame::end(1),
    ];
    let (events, standalone, _) = run(frames, 64).await;
    assert_events!(
        events,
        [Event::Part(a), Event::Part(b), Event::Message(c), Event::End]
            if a == "{\"id\":1," && b == "\"result\"" && c == ":{}}"
    );
    assert!(standalone.is_empty());
}

#[tokio::test]
async fn a_pieced_message_past_the_limit_is_refused_once_and_dropped() {
    // 8 + 8 bytes fit a limit of 20; the third piece passes it.
    let frames = vec![
        Frame::part(1, piece("12345678")),
        Frame::part(1, piece("12345678")),
        Frame::part(1, piece("12345678")),
        Frame::part(1, piece("12345678")),
        Frame::message(1, piece("}")),
        Frame::end(1),
    ];
    let (events, standalone, _) = run(frames, 20).await;
    assert_events!(
        events,
        [
            Event::Part(_),
            Event::Part(_),
            Event::TooLarge(20),
            Event::End
        ]
    );
    assert!(
        standalone.is_empty(),
        "the closing piece is not a message of its own"
    );
    // The closing piece alone can pass the limit too.
    let frames = vec![
        Frame::part(1, piece("12345678")),
        Frame::message(1, piece("1234567890123")),
    ];
    let (events, _, _) = run(frames, 20).await;
    assert_events!(events, [Event::Part(_), Event::TooLarge(20)]);
}

#[tokio::test]
async fn pieces_of_a_request_gone_away_never_reach_the_get_stream() {
    // Exchange 2 has nobody waiting: its pieces and closing piece are dropped, while a
    // whole message for it still goes to the GET stream as before.
    let frames = vec![
        Frame::part(2, piece("{\"a\":")),
        Frame::message(2, piece("1}")),
        Frame::message(2, piece("{\"whole\":1}")),
        Frame::end(2),
    ];
    let (events, standalone, _) = run(frames, 64).await;
    assert!(events.is_empty());
    assert_eq!(standalone, vec![(UNSOLICITED, piece("{\"whole\":1}"))]);
}

#[tokio::test]
async fn an_end_between_pieces_is_delivered_and_forgets_the_message() {
    let frames = vec![
        Frame::part(1, piece("{\"a\":")),
        Frame::end(1),
        Frame::message(1, piece("{}")),
    ];
    let (events, _, _) = run(frames, 64).await;
    assert_events!(events, [Event::Part(_), Event::End, Event::Message(m)] if m == "{}");
}

#[tokio::test]
async fn the_unsolicited_queue_is_bounded_by_the_sessions_budget_in_bytes() {
    // Ten 100-byte server messages, nobody reading, a budget of 350 bytes: three queue.
    let note = Bytes::from(format!(
        "{{\"jsonrpc\":\"2.0\",\"method\":\"n\",\"params\":{{\"p\":\"{}\"}}}}",
        "x".repeat(52)
    ));
    assert_eq!(note.len(), 100);
    let frames = (0..10)
        .map(|_| Frame::message(UNSOLICITED, note.clone()))
        .collect();
    let budget = Budget::new(350);
    let (_, standalone, _) = run_within(frames, 1024, budget.clone()).await;
    assert_eq!(standalone.len(), 3);
    assert_eq!(
        budget.used(),
        300,
        "queued messages are charged until taken"
    );
}

#[tokio::test]
async fn numbered_server_messages_reach_the_get_stream_with_their_numbers() {
    let note = piece("{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\"}");
    let frames = vec![
        Frame::event(7, note.clone()),
        Frame::message(UNSOLICITED, note.clone()),
        Frame::event(8, note.clone()),
    ];
    let (_, standalone, reason) = run(frames.clone(), 1024).await;
    assert_eq!(
        standalone,
        vec![
            (7, note.clone()),
            (UNSOLICITED, note.clone()),
            (8, note.clone())
        ],
        "{reason}"
    );
    let (_, standalone, reason) = run(vec![Frame::event(UNSOLICITED, note)], 1024).await;
    assert!(standalone.is_empty());
    assert!(reason.contains("numbered 0"), "{reason}");
}

#[tokio::test]
async fn an_answer_whose_request_went_away_never_reaches_the_get_stream() {
    let frames = vec![
        Frame::message(2, piece("{\"jsonrpc\":\"2.0\",\"id\":2,\"result\":{}}")),
        Frame::message(
            2,
            piece("{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\"}"),
        ),
        Frame::end(2),
    ];
    let (_, standalone, _) = run(frames, 1024).await;
    assert_eq!(
        standalone,
        vec![(
            UNSOLICITED,
            piece("{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\"}")
        )],
        "the orphaned answer is dropped, the server's notification still goes"
    );
}

#[tokio::test]
async fn a_requests_queue_is_bounded_in_bytes_and_always_passes_one_event() {
    let (tx, mut events) = mpsc::channel(EXCHANGE_QUEUE);
    let waiting = Waiting {
        tx,
        queued: Arc::default(),
    };
    let big = || Event::Message(Bytes::from(vec![b'x'; EXCHANGE_BYTES / 2 + 1]));
    // One event passes into an empty queue, whatever its size.
    let huge = Event::Message(Bytes::from(vec![b'x'; EXCHANGE_BYTES * 2]));
    assert!(waiting.send(huge).await.is_ok());
    let taken = events.recv().await.expect("queued");
    waiting
        .queued
        .bytes
        .fetch_sub(event_bytes(&taken), Ordering::AcqRel);
    // Two halves do not fit: the second waits until the first is taken.
    assert!(waiting.send(big()).await.is_ok());
    let second = waiting.send(big());
    tokio::pin!(second);
    assert!(
        futures_util::FutureExt::now_or_never(&mut second).is_none(),
        "the reader waits for the request to take its bytes"
    );
    let taken = events.recv().await.expect("queued");
    waiting
        .queued
        .bytes
        .fetch_sub(event_bytes(&taken), Ordering::AcqRel);
    waiting.queued.taken.notify_waiters();
    assert!(second.await.is_ok());
    // A request gone away gives the event back instead of waiting.
    drop(events);
    assert!(waiting.send(big()).await.is_err());
}

#[tokio::test]
async fn pieces_outside_an_exchange_fail_the_stream() {
    let (events, _, reason) = run(vec![Frame::part(UNSOLICITED, piece("{"))], 64).await;
    assert!(events.is_empty());
    assert!(reason.contains("protocol error"), "{reason}");
}
