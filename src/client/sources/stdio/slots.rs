//! The processes of one source: the cap on how many run at once, the list `connect` kills
//! when it stops, and the sessions holding one, so that at the cap the least recently used
//! idle session gives its process up to a new one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::StdioError;
use super::process::kill_group;
use crate::client::sources::routing::Routing;

/// Time a new session at the cap waits for the process it reclaimed to be reaped.
const RECLAIM_WAIT: Duration = Duration::from_secs(10);

/// Whether a session has requests in flight.
pub(super) fn pending(routing: &Mutex<Routing>) -> bool {
    routing.lock().pending() > 0
}

/// When a session last saw a message either way.
#[derive(Clone)]
pub(super) struct Activity(Arc<Mutex<std::time::Instant>>);

impl Default for Activity {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(std::time::Instant::now())))
    }
}

impl Activity {
    pub(super) fn touch(&self) {
        *self.0.lock() = std::time::Instant::now();
    }

    pub(super) fn last(&self) -> std::time::Instant {
        *self.0.lock()
    }
}

/// The process ids of this source's children: the cap and the kill list.
pub(super) struct Slots {
    pub(super) cap: usize,
    state: watch::Sender<SlotsState>,
    /// The sessions holding a process, for reclaiming the least recently used idle one.
    leases: Arc<Mutex<Leases>>,
}

/// Sessions holding a process, by a number of their own.
#[derive(Default)]
struct Leases {
    next: u64,
    open: HashMap<u64, (Activity, Arc<Mutex<Routing>>, CancellationToken)>,
}

/// A session's hold on its process; cancelled when the process is reclaimed.
pub(super) struct Lease {
    number: u64,
    leases: Arc<Mutex<Leases>>,
    pub(super) reclaim: CancellationToken,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.leases.lock().open.remove(&self.number);
    }
}

#[derive(Default)]
struct SlotsState {
    /// No new process may start.
    closed: bool,
    /// Reserved slots: processes starting, running, or not yet reaped.
    slots: usize,
    /// Process (and process group) ids of started, unreaped children.
    pids: HashSet<u32>,
}

impl Slots {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            cap,
            state: watch::Sender::new(SlotsState::default()),
            leases: Arc::default(),
        }
    }

    /// Registers a session holding a process, active as `activity` says and idle while
    /// `routing` has no request pending.
    pub(super) fn lease(&self, activity: Activity, routing: Arc<Mutex<Routing>>) -> Lease {
        let reclaim = CancellationToken::new();
        let mut leases = self.leases.lock();
        leases.next += 1;
        let number = leases.next;
        leases
            .open
            .insert(number, (activity, routing, reclaim.clone()));
        Lease {
            number,
            leases: self.leases.clone(),
            reclaim,
        }
    }

    /// Asks the least recently used idle session to give up its process; false when every
    /// session has a request in flight.
    fn reclaim_lru(&self) -> bool {
        let mut leases = self.leases.lock();
        let victim = leases
            .open
            .iter()
            .filter(|(_, (_, routing, _))| !pending(routing))
            .min_by_key(|(_, (activity, _, _))| activity.last())
            .map(|(number, _)| *number);
        match victim.and_then(|number| leases.open.remove(&number)) {
            Some((_, _, reclaim)) => {
                reclaim.cancel();
                true
            }
            None => false,
        }
    }

    /// A slot, reclaiming the least recently used idle session's process at the cap and
    /// waiting (bounded) until it is reaped.
    pub(super) async fn reserve_or_reclaim(
        self: &Arc<Self>,
        source: &str,
    ) -> Result<Slot, StdioError> {
        let mut changes = self.state.subscribe();
        let refused = match self.reserve(source) {
            Err(refused @ StdioError::CapReached { .. }) => refused,
            other => return other,
        };
        if !self.reclaim_lru() {
            return Err(refused);
        }
        let deadline = tokio::time::Instant::now() + RECLAIM_WAIT;
        loop {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(refused),
            }
            match self.reserve(source) {
                Err(StdioError::CapReached { .. }) => continue,
                other => return other,
            }
        }
    }

    fn reserve(self: &Arc<Self>, source: &str) -> Result<Slot, StdioError> {
        let mut result = Ok(());
        self.state.send_if_modified(|state| {
            if state.closed {
                result = Err(StdioError::ShuttingDown {
                    source_name: source.to_owned(),
                });
                false
            } else if state.slots >= self.cap {
                result = Err(StdioError::CapReached {
                    source_name: source.to_owned(),
                    cap: self.cap,
                });
                false
            } else {
                state.slots += 1;
                true
            }
        });
        result.map(|()| Slot {
            slots: self.clone(),
            pid: None,
            reaped: false,
        })
    }

    pub(super) fn live(&self) -> usize {
        self.state.borrow().pids.len()
    }

    pub(super) fn close_and_kill(&self) {
        self.state.send_modify(|state| {
            state.closed = true;
            for pid in &state.pids {
                kill_group(*pid);
            }
        });
    }

    /// Resolves once no slot is held.
    pub(super) async fn idle(&self) {
        let mut state = self.state.subscribe();
        // The sender lives in `self`, so `wait_for` cannot fail while we borrow it.
        let _ = state.wait_for(|state| state.slots == 0).await;
    }
}

/// One reserved process slot; released when dropped.
pub(super) struct Slot {
    slots: Arc<Slots>,
    pub(super) pid: Option<u32>,
    reaped: bool,
}

impl Slot {
    /// Records the started process; false when the slots closed meanwhile.
    pub(super) fn attach(&mut self, pid: u32) -> bool {
        self.pid = Some(pid);
        let mut open = true;
        self.slots.state.send_modify(|state| {
            state.pids.insert(pid);
            open = !state.closed;
        });
        open
    }

    /// Releases the slot of a reaped process.
    pub(super) fn release_reaped(mut self) {
        self.reaped = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let (Some(pid), false) = (self.pid, self.reaped) {
            // Dropped unreaped (the runtime is going away): take the whole group down.
            kill_group(pid);
        }
        let pid = self.pid;
        self.slots.state.send_modify(|state| {
            state.slots = state.slots.saturating_sub(1);
            if let Some(pid) = pid {
                state.pids.remove(&pid);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_cap_bounds_slots_and_shutdown_refuses_new_ones() {
        let slots = Arc::new(Slots::new(2));
        let first = slots.reserve("s").expect("first");
        let _second = slots.reserve("s").expect("second");
        let error = slots.reserve("s").err().expect("over the cap");
        assert!(
            error.to_string().contains("source s") && error.to_string().contains("limit of 2"),
            "{error}"
        );
        drop(first);
        let third = slots.reserve("s").expect("a slot freed");
        slots.close_and_kill();
        assert!(matches!(
            slots.reserve("s"),
            Err(StdioError::ShuttingDown { .. })
        ));
        drop(third);
        drop(_second);
        tokio::time::timeout(Duration::from_secs(1), slots.idle())
            .await
            .expect("idle once every slot is released");
    }
}
