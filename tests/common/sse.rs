//! Server-sent events read off a live response, one event at a time.

use super::WAIT;

/// Takes the next complete event that has data off the front of `buffer` (dropping events
/// without data on the way); returns its data lines joined.
pub fn take_event(buffer: &mut String) -> Option<String> {
    while let Some(end) = buffer.find("\n\n") {
        let event: String = buffer.drain(..end + 2).collect();
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        if !data.is_empty() {
            return Some(data.join("\n"));
        }
    }
    None
}

/// Appends the next chunk of `stream` to `buffer` (bounded by [`WAIT`]).
pub async fn read_chunk(stream: &mut reqwest::Response, buffer: &mut String) {
    let chunk = tokio::time::timeout(WAIT, stream.chunk())
        .await
        .expect("event in time")
        .expect("stream reads")
        .expect("stream open");
    buffer.push_str(&String::from_utf8_lossy(&chunk));
}

/// Reads `stream` into `buffer` until the buffer contains `needle`.
pub async fn read_until(stream: &mut reqwest::Response, buffer: &mut String, needle: &str) {
    while !buffer.contains(needle) {
        read_chunk(stream, buffer).await;
    }
}

/// The data of the next SSE event with data on `stream`.
pub async fn next_event(stream: &mut reqwest::Response, buffer: &mut String) -> String {
    loop {
        if let Some(event) = take_event(buffer) {
            return event;
        }
        read_chunk(stream, buffer).await;
    }
}

/// Reads SSE events from a streaming response until `done` says so; returns their data.
pub async fn read_events(
    stream: &mut reqwest::Response,
    buffer: &mut String,
    mut done: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let mut events = Vec::new();
    loop {
        while let Some(event) = take_event(buffer) {
            events.push(event);
        }
        if done(&events) {
            return events;
        }
        read_chunk(stream, buffer).await;
    }
}
