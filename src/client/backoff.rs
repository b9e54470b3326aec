//! Reconnect delays: jittered exponential backoff, first retry at once.

use std::time::Duration;

use rand::Rng;

/// The first delay after the immediate retry.
const BASE: Duration = Duration::from_millis(250);
/// The ceiling: a relay that is down for long is still retried twice a minute.
const CAP: Duration = Duration::from_secs(30);

/// Successive reconnect delays.
#[derive(Debug, Default)]
pub(super) struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The delay before the next attempt: 0 the first time, then full-jitter exponential
    /// (a random point in `[d/2, d]`, `d` doubling from [`BASE`] up to [`CAP`]) so that many
    /// clients cut off together do not reconnect in lockstep.
    pub(super) fn next_delay(&mut self) -> Duration {
        let failures = self.failures;
        self.failures = self.failures.saturating_add(1);
        if failures == 0 {
            return Duration::ZERO;
        }
        let exp = BASE.saturating_mul(1u32 << (failures - 1).min(16)).min(CAP);
        let half = exp / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Forgets past failures (after a connection that worked).
    pub(super) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_then_growing_then_capped() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.next_delay(), Duration::ZERO);
        let first = backoff.next_delay();
        assert!(first >= BASE / 2 && first <= BASE, "{first:?}");
        for _ in 0..40 {
            let delay = backoff.next_delay();
            assert!(delay <= CAP, "{delay:?}");
        }
        assert!(backoff.next_delay() >= CAP / 2);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::ZERO);
    }
}
