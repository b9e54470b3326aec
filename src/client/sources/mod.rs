//! The upstream MCP servers `connect` serves, by name.

mod events;
mod held;
mod http;
mod outlet;
mod replay;
pub(crate) mod routing;
mod stdio;
mod stream;
mod streams;

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{SourceConfig, SourceTarget};
use crate::transport::{RecvHalf, SendHalf};
use crate::wire::{FrameReader, FrameWriter, OpenHeader};

pub use http::Target as UpstreamTarget;
pub use stdio::StdioLimits;

/// One configured source.
pub(super) enum Source {
    /// A Streamable HTTP server.
    Http(Arc<http::HttpSource>),
    /// A command speaking MCP on its stdin and stdout.
    Stdio(Arc<stdio::StdioSource>),
}

impl Source {
    /// Serves one exchange stream, from a relay working at `wire_version`, until it ends.
    pub(super) async fn serve(
        &self,
        header: OpenHeader,
        wire_version: u32,
        reader: FrameReader<RecvHalf>,
        writer: FrameWriter<SendHalf>,
    ) {
        // Server-initiated messages cross numbered from wire version 4 on.
        let numbered = wire_version >= 4;
        match self {
            Source::Http(source) => source.clone().serve(header, numbered, reader, writer).await,
            // Boxed: a stream's future is sized for its largest variant (see HttpSource::serve).
            Source::Stdio(source) => {
                Box::pin(source.clone().serve(header, numbered, reader, writer)).await
            }
        }
    }
}

/// All sources of this client.
pub(super) struct Sources {
    by_name: HashMap<String, Source>,
}

impl Sources {
    /// Builds the sources; refuses duplicates and unusable targets. Answers of at most
    /// `max_answer` bytes each are relayed.
    pub(super) fn new(
        configs: &[SourceConfig],
        stdio_limits: stdio::StdioLimits,
        max_answer: usize,
    ) -> Result<Self, String> {
        if configs.is_empty() {
            return Err("no sources: give at least one --source NAME=URL".into());
        }
        let mut by_name = HashMap::new();
        for config in configs {
            let source = match &config.target {
                SourceTarget::Http(url) => Source::Http(Arc::new(
                    http::HttpSource::new(&config.name, url)?
                        .with_cross_origin_redirects(config.follow_cross_origin_redirects)
                        .with_answer_limit(max_answer)
                        .with_session_idle(stdio_limits.idle),
                )),
                SourceTarget::Stdio(command) => Source::Stdio(Arc::new(
                    stdio::StdioSource::with_limits(&config.name, command.clone(), stdio_limits)?
                        .with_answer_limit(max_answer),
                )),
            };
            if by_name.insert(config.name.clone(), source).is_some() {
                return Err(format!("source {} is configured twice", config.name));
            }
        }
        Ok(Self { by_name })
    }

    /// The source called `name`.
    pub(super) fn get(&self, name: &str) -> Option<&Source> {
        self.by_name.get(name)
    }

    /// How many.
    pub(super) fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Stops what the sources run: kills every stdio child (its whole process group) and
    /// waits, bounded, until each is reaped. New sessions of stdio sources are refused after.
    pub(super) async fn shutdown(&self) {
        for source in self.by_name.values() {
            if let Source::Stdio(source) = source {
                source.shutdown().await;
            }
        }
    }
}

/// The shared writer of a stream's frames toward the relay: a source's tasks write through
/// clones of it, each in its own task (no writer-task hop on the path of every answer). The
/// receiver completes once every clone is gone and the stream has been finished.
pub(crate) fn start_writer(
    writer: crate::wire::FrameWriter<SendHalf>,
) -> (Out, tokio::sync::oneshot::Receiver<()>) {
    crate::wire::FrameSink::with_done(writer)
}

/// Where a source's tasks send frames toward the relay.
pub(crate) type Out = crate::wire::FrameSink<SendHalf>;

/// The handle a call waiting for its agent's input is kept under (the `requestState` a bridge
/// gives): 128 random bits, hex, never guessed.
pub(crate) fn waiting_handle() -> String {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    hex::encode(bytes)
}

/// A large answer crosses the tunnel in pieces of this size ([`crate::wire::FrameKind::MessagePart`]).
pub(crate) const PIECE_BYTES: usize = 256 * 1024;

/// Sends one whole upstream message for `exchange` (see [`message_frames`]). Fails when the
/// stream is gone.
pub(crate) async fn send_message(
    out: &Out,
    exchange: u64,
    message: bytes::Bytes,
    max_frame: usize,
    source: &str,
) -> Result<(), crate::wire::SinkError> {
    for frame in message_frames(exchange, message, max_frame, source) {
        out.send(frame).await?;
    }
    Ok(())
}

/// The frames that carry one whole upstream message for `exchange`: one frame when it is at
/// most [`PIECE_BYTES`] (and fits `max_frame`), else pieces. The standalone stream
/// ([`crate::wire::UNSOLICITED`]) carries no pieces: a message there larger than a frame is
/// dropped (and logged) instead of breaking the stream.
pub(crate) fn message_frames(
    exchange: u64,
    message: bytes::Bytes,
    max_frame: usize,
    source: &str,
) -> impl Iterator<Item = crate::wire::Frame> + use<> {
    use crate::wire::Frame;
    let piece_bytes = PIECE_BYTES.min(max_frame);
    let whole = message.len() <= piece_bytes
        || (exchange == crate::wire::UNSOLICITED && message.len() <= max_frame);
    let mut rest = if whole || exchange != crate::wire::UNSOLICITED {
        Some(message)
    } else {
        tracing::warn!(
            source,
            size = message.len(),
            max_frame,
            "server-to-agent message larger than a tunnel frame; dropped"
        );
        None
    };
    std::iter::from_fn(move || {
        let message = rest.as_mut()?;
        if whole || message.len() <= piece_bytes {
            return rest.take().map(|last| Frame::message(exchange, last));
        }
        Some(Frame::part(exchange, message.split_to(piece_bytes)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FrameKind, UNSOLICITED};

    fn shapes(exchange: u64, len: usize, max_frame: usize) -> Vec<(FrameKind, usize)> {
        message_frames(
            exchange,
            bytes::Bytes::from(vec![b'x'; len]),
            max_frame,
            "t",
        )
        .map(|f| (f.kind, f.payload.len()))
        .collect()
    }

    #[test]
    fn a_message_crosses_whole_or_in_pieces_and_a_too_large_server_message_is_dropped() {
        assert_eq!(shapes(3, 10, 1 << 20), [(FrameKind::Message, 10)]);
        assert_eq!(
            shapes(3, PIECE_BYTES * 2 + 5, 1 << 20),
            [
                (FrameKind::MessagePart, PIECE_BYTES),
                (FrameKind::MessagePart, PIECE_BYTES),
                (FrameKind::Message, 5)
            ]
        );
        assert_eq!(
            shapes(3, PIECE_BYTES * 2, 1 << 20),
            [
                (FrameKind::MessagePart, PIECE_BYTES),
                (FrameKind::Message, PIECE_BYTES)
            ]
        );
        assert_eq!(
            shapes(UNSOLICITED, PIECE_BYTES + 1, 1 << 20),
            [(FrameKind::Message, PIECE_BYTES + 1)],
            "whole on the standalone stream while it fits a frame"
        );
        assert!(shapes(UNSOLICITED, (1 << 20) + 1, 1 << 20).is_empty());
    }
}
