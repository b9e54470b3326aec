//! The sending half of a tunnel stream, shared by every task that writes to it.
//!
//! Several tasks send on one exchange stream: each agent request on the relay, each upstream
//! response in `connect`. A [`FrameSink`] lets each of them write its frame in its own task,
//! straight into the transport (a QUIC stream write only copies into the connection's buffer
//! and wakes its driver), instead of handing every frame to a writer task: on a 2-core machine
//! that hand-off was a task switch, and often a thread wake-up, on the path of every call.
//!
//! Frames stay whole and in order: one writer at a time holds the lock. A frame is never left
//! half written when the sending task is cancelled (an agent that disconnects drops its
//! request's task): the write is polled once in place, which completes it in the usual case,
//! and if the transport is not ready (flow control) the rest of the write moves to a task of its
//! own that finishes it whatever happens to the sender.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use tokio::io::AsyncWrite;
use tokio::sync::{Mutex, oneshot};

use super::frame::{Frame, FrameError, FrameWriter};

/// Why a [`FrameSink`] cannot send.
#[derive(Debug, Clone, thiserror::Error)]
#[error("tunnel stream write failed: {0}")]
pub struct SinkError(pub String);

/// The writer, or why it broke (a failed write leaves the stream unusable: later frames
/// would land after a partial one).
type Slot<W> = Result<FrameWriter<W>, SinkError>;

struct Inner<W: AsyncWrite + Unpin + Send + 'static> {
    slot: Arc<Mutex<Slot<W>>>,
    /// Told once the stream is finished after the last handle went away.
    done: Option<oneshot::Sender<()>>,
}

impl<W: AsyncWrite + Unpin + Send + 'static> Drop for Inner<W> {
    /// The last handle gone: finish the stream so the peer reads a clean end.
    fn drop(&mut self) {
        let slot = self.slot.clone();
        let done = self.done.take();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(writer) = slot.lock().await.as_mut() {
                    let _ = writer.finish().await;
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            });
        }
    }
}

/// The shared sending half of one tunnel stream; clones send on the same stream, and the
/// stream is finished when the last clone is dropped.
pub struct FrameSink<W: AsyncWrite + Unpin + Send + 'static> {
    inner: Arc<Inner<W>>,
}

impl<W: AsyncWrite + Unpin + Send + 'static> Clone for FrameSink<W> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> FrameSink<W> {
    /// Shares `writer`.
    pub fn new(writer: FrameWriter<W>) -> Self {
        Self::with_done(writer).0
    }

    /// Shares `writer`; the receiver learns when the last handle is gone and the stream has
    /// been finished (so a task can wait for everything it handed out to be written).
    pub fn with_done(writer: FrameWriter<W>) -> (Self, oneshot::Receiver<()>) {
        let (done, finished) = oneshot::channel();
        let sink = Self {
            inner: Arc::new(Inner {
                slot: Arc::new(Mutex::new(Ok(writer))),
                done: Some(done),
            }),
        };
        (sink, finished)
    }

    /// Writes one frame after those already sent. Waits while another task writes, or while
    /// the transport's flow control holds the stream; the frame is written whole even if this
    /// future is dropped once it has started.
    pub async fn send(&self, frame: Frame) -> Result<(), SinkError> {
        // Waiting for the lock is cancellation-safe: nothing is written before it is held.
        let slot = self.inner.slot.clone().lock_owned().await;
        let mut write: Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send>> =
            Box::pin(async move {
                let mut slot = slot;
                let result = match slot.as_mut() {
                    Ok(writer) => writer.send(&frame).await,
                    Err(broken) => return Err(broken.clone()),
                };
                result.map_err(|e: FrameError| {
                    let broken = SinkError(e.to_string());
                    *slot = Err(broken.clone());
                    broken
                })
            });
        // No await between this poll and the spawn: a started write is never abandoned.
        match std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
            Poll::Ready(result) => result,
            Poll::Pending => tokio::spawn(write)
                .await
                .unwrap_or_else(|e| Err(SinkError(format!("frame writer task failed: {e}")))),
        }
    }

    /// A handle that does not keep the stream open: the stream still finishes when the last
    /// [`FrameSink`] goes, and [`WeakFrameSink::upgrade`] fails after.
    pub fn downgrade(&self) -> WeakFrameSink<W> {
        WeakFrameSink {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// Whether `other` sends on the same stream.
    pub fn same_stream(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Finishes the stream now (the peer reads a clean end); later sends fail.
    pub async fn finish(&self) {
        let mut slot = self.inner.slot.lock().await;
        if let Ok(writer) = slot.as_mut() {
            let _ = writer.finish().await;
        }
        *slot = Err(SinkError("the stream was finished".into()));
    }
}

/// A [`FrameSink`] that does not keep its stream open (see [`FrameSink::downgrade`]).
pub struct WeakFrameSink<W: AsyncWrite + Unpin + Send + 'static> {
    inner: std::sync::Weak<Inner<W>>,
}

impl<W: AsyncWrite + Unpin + Send + 'static> Clone for WeakFrameSink<W> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<W: AsyncWrite + Unpin + Send + 'static> WeakFrameSink<W> {
    /// The sink, while some [`FrameSink`] of the stream lives.
    pub fn upgrade(&self) -> Option<FrameSink<W>> {
        self.inner.upgrade().map(|inner| FrameSink { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FrameKind, FrameReader};
    use bytes::Bytes;

    #[tokio::test]
    async fn frames_from_many_tasks_arrive_whole_in_per_task_order_then_a_clean_end() {
        let (tx, rx) = tokio::io::duplex(64); // small: most writes wait for the reader
        let (sink, finished) = FrameSink::with_done(FrameWriter::new(tx, 1 << 20));
        let reader = tokio::spawn(async move {
            let mut frames = FrameReader::new(rx, 1 << 20);
            let mut seen = Vec::new();
            while let Some(frame) = frames.next().await.expect("well-formed frames") {
                seen.push(frame);
            }
            seen
        });
        let mut senders = Vec::new();
        for task in 0..8u64 {
            let sink = sink.clone();
            senders.push(tokio::spawn(async move {
                for n in 0..20u64 {
                    let payload = Bytes::from(vec![n as u8; 100 + (n as usize) * 37]);
                    sink.send(Frame::message(task, payload))
                        .await
                        .expect("the reader reads everything");
                }
            }));
        }
        for sender in senders {
            sender.await.expect("sender task");
        }
        drop(sink); // the last handle: the stream is finished
        tokio::time::timeout(std::time::Duration::from_secs(10), finished)
            .await
            .expect("finished within the bound")
            .expect("the finishing task reports");
        let seen = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("the reader sees the end")
            .expect("reader task");
        assert_eq!(seen.len(), 8 * 20);
        for task in 0..8u64 {
            let sizes: Vec<usize> = seen
                .iter()
                .filter(|f| f.exchange == task && f.kind == FrameKind::Message)
                .map(|f| f.payload.len())
                .collect();
            let wanted: Vec<usize> = (0..20).map(|n| 100 + n * 37).collect();
            assert_eq!(sizes, wanted, "task {task}'s frames in order and whole");
        }
    }

    #[tokio::test]
    async fn a_sender_dropped_mid_write_still_leaves_its_frame_whole() {
        let (tx, rx) = tokio::io::duplex(16);
        let sink = FrameSink::new(FrameWriter::new(tx, 1 << 20));
        let big = Bytes::from(vec![7u8; 10_000]);
        // Starts a write that cannot finish (nobody reads yet), then drops the sender.
        let started = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            sink.send(Frame::message(1, big.clone())),
        )
        .await;
        assert!(started.is_err(), "the write waits for the reader");
        let reader = tokio::spawn(async move {
            let mut frames = FrameReader::new(rx, 1 << 20);
            let first = frames.next().await.expect("frame").expect("first frame");
            let second = frames.next().await.expect("frame").expect("second frame");
            (first, second)
        });
        sink.send(Frame::message(2, Bytes::from_static(b"after")))
            .await
            .unwrap_or_else(|e| panic!("second frame: {e}"));
        let (first, second) = tokio::time::timeout(std::time::Duration::from_secs(10), reader)
            .await
            .expect("both frames arrive")
            .expect("reader task");
        assert_eq!((first.exchange, first.payload.len()), (1, 10_000));
        assert_eq!(second.payload, Bytes::from_static(b"after"));
    }
}
