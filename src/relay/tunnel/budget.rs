//! The bytes one session's buffers may hold together: its channel's queues and its event
//! logs charge one budget, so a caller cannot hold more than `[limits] session_event_bytes`
//! however it spreads its streams.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The bytes all event logs (and queues) of one session may hold together. Every log
/// charges its events here; past the budget, events a reader has taken are forgotten, a log
/// nobody reads drops its oldest events (counted), and a log whose reader is attached makes
/// its producer wait until the reader takes what it holds.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes (0: unbounded).
    pub fn new(limit: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            limit: if limit == 0 { usize::MAX } else { limit },
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether more than the budget is held.
    pub fn over(&self) -> bool {
        self.used() > self.limit
    }

    /// Whether `bytes` more would fit.
    pub fn fits(&self, bytes: usize) -> bool {
        self.used().saturating_add(bytes) <= self.limit
    }

    /// Charges `bytes`.
    pub fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives back `bytes`.
    pub fn release(&self, bytes: usize) {
        // Never below zero, whatever the order of charges and releases.
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes))
            });
    }
}
