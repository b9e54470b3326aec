//! The unsigned-rows test: a running relay signs at least every checkpoint interval, so a row
//! still unsigned more than one interval (plus [`CRASH_GRACE_MS`]) after the last checkpoint
//! or an earlier unsigned row means checkpoints were deleted; a shorter tail is a crash tail.
//! One clock serves `verify` (per relay, per epoch segment) and a relay's own start check.

use super::when;

/// Slack on top of one checkpoint interval for rows a crash left unsigned: a row committed in
/// the same writer pass that then signs (a commit waits up to the busy timeout, 5 s, plus
/// fsync) can carry a receive time a little past the interval.
pub const CRASH_GRACE_MS: u64 = 10_000;

/// The unsigned-rows test over rows fed in insertion order: a row more than one interval (plus
/// [`CRASH_GRACE_MS`]) after the later of `since` (the last checkpoint's time) and the earliest
/// unsigned row before it could not have stayed unsigned on a running relay.
pub(super) struct TailClock {
    since: Option<u64>,
    interval_ms: u64,
    earliest: Option<u64>,
    /// Rows fed.
    pub(super) rows: u64,
    /// The first offending row: id, tenant, seq, time, and the time it is measured from.
    violation: Option<(i64, String, u64, u64, u64)>,
}

impl TailClock {
    pub(super) fn new(since: Option<u64>, interval_ms: u64) -> Self {
        Self {
            since,
            interval_ms,
            earliest: None,
            rows: 0,
            violation: None,
        }
    }

    pub(super) fn feed(&mut self, id: i64, tenant: &str, seq: u64, time_ms: u64) {
        self.rows += 1;
        if self.violation.is_none()
            && let Some(earliest) = self.earliest
        {
            let from = self.since.map_or(earliest, |since| since.max(earliest));
            if time_ms > from.saturating_add(self.interval_ms.saturating_add(CRASH_GRACE_MS)) {
                self.violation = Some((id, tenant.to_owned(), seq, time_ms, from));
            }
        }
        self.earliest = Some(self.earliest.map_or(time_ms, |e| e.min(time_ms)));
    }

    /// The failure text, if a row broke the test.
    pub(super) fn failure(&self, what: &str) -> Option<(i64, String, u64, String)> {
        let (id, tenant, seq, time, from) = self.violation.clone()?;
        Some((
            id,
            tenant,
            seq,
            format!(
                "{what}: this row (time {}) is more than one checkpoint interval ({} s) after {} \
                 and still unsigned, which a running relay never leaves: checkpoints (and rows) \
                 were deleted",
                when(time),
                self.interval_ms / 1000,
                when(from)
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_within_one_interval_passes_and_a_longer_one_fails() {
        let mut clock = TailClock::new(Some(1_000_000), 60_000);
        // Long calls received before the checkpoint, committed after it.
        clock.feed(1, "acme", 5, 900_000);
        clock.feed(2, "acme", 6, 1_050_000);
        assert!(clock.failure("x").is_none());
        // An idle relay's first row long after the checkpoint is fine on its own...
        let mut idle = TailClock::new(Some(1_000_000), 60_000);
        idle.feed(1, "acme", 5, 5_000_000);
        idle.feed(2, "acme", 6, 5_000_000 + 60_000 + CRASH_GRACE_MS);
        assert!(idle.failure("x").is_none());
        // ...but not a row more than an interval (and the grace) after it.
        idle.feed(3, "globex", 1, 5_000_000 + 60_000 + CRASH_GRACE_MS + 1);
        let (id, tenant, seq, _) = idle.failure("x").expect("a violation");
        assert_eq!((id, tenant.as_str(), seq), (3, "globex", 1));
    }
}
