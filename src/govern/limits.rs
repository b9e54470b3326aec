//! Rate limits: token buckets per identity (tenant and subject), per tenant and source, per
//! tenant (all its callers and sources together), and for failed authentication per remote
//! address. No HTTP in here: the relay asks, and maps a
//! refusal to `429` with `Retry-After`.
//!
//! Every map of buckets is bounded: when full, buckets that have refilled completely (the same
//! as a fresh one) are dropped first, then the one untouched the longest.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Default bound on the buckets one map holds.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// One rate: `per_minute` tokens a minute, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per minute (at least 1).
    pub per_minute: u32,
    /// Bucket size: how many may come at once (at least 1).
    pub burst: u32,
}

impl Rate {
    fn tokens_per_second(&self) -> f64 {
        f64::from(self.per_minute) / 60.0
    }
}

/// A token bucket. Pure: the caller passes the time.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket of `rate` at `now`.
    pub fn full(rate: &Rate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            last: now,
        }
    }

    fn refill(&mut self, rate: &Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.tokens_per_second()).min(f64::from(rate.burst));
        self.last = now;
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn take(&mut self, rate: &Rate, now: Instant) -> Result<(), Duration> {
        self.take_n(rate, now, 1)
    }

    /// Takes `n` tokens at `now`, all or none, or says how long until `n` are there. More than
    /// the burst are never there: the wait is then until the bucket is full.
    pub fn take_n(&mut self, rate: &Rate, now: Instant, n: u32) -> Result<(), Duration> {
        self.refill(rate, now);
        let n = f64::from(n);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            let short = n.min(f64::from(rate.burst)) - self.tokens;
            Err(Duration::from_secs_f64(
                short.max(0.0) / rate.tokens_per_second(),
            ))
        }
    }

    /// Without taking anything: `Ok` if a token is there at `now`, else how long until one is.
    pub fn peek(&mut self, rate: &Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            Err(self.wait(rate))
        }
    }

    fn wait(&self, rate: &Rate) -> Duration {
        Duration::from_secs_f64((1.0 - self.tokens) / rate.tokens_per_second())
    }

    /// Whether the bucket is full at `now` (as good as a fresh one).
    fn is_full(&self, rate: &Rate, now: Instant) -> bool {
        let mut copy = *self;
        copy.refill(rate, now);
        copy.tokens >= f64::from(rate.burst)
    }
}

/// Buckets of one rate by key, at most `max_keys` of them.
#[derive(Debug)]
pub struct Buckets<K> {
    rate: Rate,
    max_keys: usize,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: Eq + Hash + Clone> Buckets<K> {
    /// Empty buckets of `rate`, holding at most `max_keys` keys (at least 1).
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token from `key`'s bucket at `now`; `Err` holds the time until one is there.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.take_n(key, now, 1)
    }

    /// Takes `n` tokens from `key`'s bucket at `now`, all or none.
    pub fn take_n(&self, key: &K, now: Instant, n: u32) -> Result<(), Duration> {
        self.with(key, now, |bucket, rate| bucket.take_n(rate, now, n))
    }

    /// Whether `key`'s bucket has a token at `now`, taking none.
    pub fn peek(&self, key: &K, now: Instant) -> Result<(), Duration> {
        self.with(key, now, |bucket, rate| bucket.peek(rate, now))
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn with<T>(&self, key: &K, now: Instant, f: impl FnOnce(&mut Bucket, &Rate) -> T) -> T {
        let mut map = self.map.lock();
        if !map.contains_key(key) && map.len() >= self.max_keys {
            let rate = self.rate;
            map.retain(|_, bucket| !bucket.is_full(&rate, now));
            if map.len() >= self.max_keys {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, bucket)| bucket.last)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    map.remove(&oldest);
                }
            }
        }
        let bucket = map
            .entry(key.clone())
            .or_insert_with(|| Bucket::full(&self.rate, now));
        f(bucket, &self.rate)
    }
}

/// The rate limits of one configuration (`[rate_limits]`): every rate is optional; an absent
/// one does not limit. Rates are at least 1 per minute with a burst of at least 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimits {
    /// Agent requests per identity (tenant and subject).
    pub identity: Option<Rate>,
    /// Agent requests per tenant and source, all callers together.
    pub source: Option<Rate>,
    /// Agent requests per tenant, all its callers and sources together: one tenant cannot
    /// take the relay's whole capacity from the others.
    pub tenant: Option<Rate>,
    /// Failed authentication attempts per remote IP address.
    pub auth_failures: Option<Rate>,
    /// Bound on the buckets each kind of limit keeps.
    pub max_keys: usize,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            identity: None,
            source: None,
            tenant: None,
            auth_failures: None,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// The caller's own rate.
    Identity,
    /// The source's rate (all callers of the tenant together).
    Source,
    /// The tenant's rate (all its callers and sources together).
    Tenant,
    /// Too many failed authentication attempts from the address.
    AuthFailures,
}

/// A refusal: which limit, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded ({limit:?}); retry after {retry_after:?}")]
pub struct RateLimited {
    /// The limit that refused.
    pub limit: Limited,
    /// How long until a token is there.
    pub retry_after: Duration,
}

/// The rate limits of one configuration.
#[derive(Debug, Default)]
pub struct Limiter {
    identity: Option<Buckets<(String, String)>>,
    source: Option<Buckets<(String, String)>>,
    tenant: Option<Buckets<String>>,
    auth_failures: Option<Buckets<IpAddr>>,
}

impl Limiter {
    /// Empty buckets for `limits`.
    pub fn new(limits: &RateLimits) -> Self {
        let max = limits.max_keys.max(1);
        Self {
            identity: limits.identity.map(|rate| Buckets::new(rate, max)),
            source: limits.source.map(|rate| Buckets::new(rate, max)),
            tenant: limits.tenant.map(|rate| Buckets::new(rate, max)),
            auth_failures: limits.auth_failures.map(|rate| Buckets::new(rate, max)),
        }
    }

    /// Counts one request of `subject` of `tenant` to `source` at `now`: the identity's bucket
    /// first, then the source's, then the tenant's.
    pub fn request(
        &self,
        tenant: &str,
        subject: &str,
        source: &str,
        now: Instant,
    ) -> Result<(), RateLimited> {
        self.messages(tenant, subject, source, 1, now)
    }

    /// Counts `n` messages of `subject` of `tenant` to `source` at `now` (the messages of a
    /// batch past the first, which [`Limiter::request`] counted with its HTTP request): a batch
    /// of N calls costs what N single calls cost. Each bucket gives all `n` tokens or none; a
    /// batch larger than a bucket's burst is always refused.
    pub fn messages(
        &self,
        tenant: &str,
        subject: &str,
        source: &str,
        n: u32,
        now: Instant,
    ) -> Result<(), RateLimited> {
        if n == 0 {
            return Ok(());
        }
        let pair = |other: &str| (tenant.to_owned(), other.to_owned());
        take_from(&self.identity, || pair(subject), now, n, Limited::Identity)?;
        take_from(&self.source, || pair(source), now, n, Limited::Source)?;
        take_from(&self.tenant, || tenant.to_owned(), now, n, Limited::Tenant)
    }

    /// Whether `addr` may still try to authenticate at `now` (it has failures left).
    pub fn auth_allowed(&self, addr: IpAddr, now: Instant) -> Result<(), RateLimited> {
        match &self.auth_failures {
            Some(buckets) => buckets.peek(&addr, now).map_err(|retry_after| RateLimited {
                limit: Limited::AuthFailures,
                retry_after,
            }),
            None => Ok(()),
        }
    }

    /// Records a failed authentication from `addr` at `now`.
    pub fn auth_failed(&self, addr: IpAddr, now: Instant) {
        if let Some(buckets) = &self.auth_failures {
            let _ = buckets.take(&addr, now);
        }
    }
}

/// Takes `n` tokens at `now` from the bucket of `key` (built only when the limit is on) in
/// `buckets`; a refusal names `limit`.
fn take_from<K: Eq + Hash + Clone>(
    buckets: &Option<Buckets<K>>,
    key: impl FnOnce() -> K,
    now: Instant,
    n: u32,
    limit: Limited,
) -> Result<(), RateLimited> {
    let Some(buckets) = buckets else {
        return Ok(());
    };
    buckets
        .take_n(&key(), now, n)
        .map_err(|retry_after| RateLimited { limit, retry_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        per_minute: 60,
        burst: 3,
    };

    fn rate(per_minute: u32, burst: u32) -> Option<Rate> {
        Some(Rate { per_minute, burst })
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket::full(&RATE, start);
        for _ in 0..3 {
            assert_eq!(bucket.take(&RATE, start), Ok(()));
        }
        let wait = bucket.take(&RATE, start).expect_err("the burst is spent");
        assert_eq!(wait, Duration::from_secs(1), "one token a second");
        let half = start + Duration::from_millis(500);
        let wait = bucket.take(&RATE, half).expect_err("half a token");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
        assert_eq!(bucket.take(&RATE, start + Duration::from_secs(1)), Ok(()));
        // Never more than the burst, however long it rests.
        let later = start + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(bucket.take(&RATE, later), Ok(()));
        }
        assert!(bucket.take(&RATE, later).is_err());
    }

    #[test]
    fn many_tokens_are_taken_all_or_none() {
        let now = Instant::now();
        let mut bucket = Bucket::full(&RATE, now);
        assert_eq!(bucket.take_n(&RATE, now, 2), Ok(()));
        assert_eq!(
            bucket.take_n(&RATE, now, 2),
            Err(Duration::from_secs(1)),
            "one token left, two asked: none taken"
        );
        assert_eq!(
            bucket.take(&RATE, now),
            Ok(()),
            "the one left is still there"
        );
        assert!(
            Bucket::full(&RATE, now).take_n(&RATE, now, 4).is_err(),
            "more than the burst is never there"
        );
    }

    #[test]
    fn peek_takes_nothing() {
        let now = Instant::now();
        let one = Rate {
            per_minute: 1,
            burst: 1,
        };
        let mut bucket = Bucket::full(&one, now);
        assert_eq!(bucket.peek(&one, now), Ok(()));
        assert_eq!(bucket.peek(&one, now), Ok(()));
        assert_eq!(bucket.take(&one, now), Ok(()));
        assert_eq!(bucket.peek(&one, now), Err(Duration::from_secs(60)));
    }

    #[test]
    fn buckets_are_per_key_and_bounded() {
        let now = Instant::now();
        let one = Rate {
            per_minute: 1,
            burst: 1,
        };
        let buckets = Buckets::new(one, 2);
        assert!(buckets.take(&"a", now).is_ok());
        assert!(buckets.take(&"a", now).is_err(), "a is spent");
        assert!(buckets.take(&"b", now).is_ok(), "b has its own bucket");
        let later = now + Duration::from_secs(1);
        assert!(buckets.take(&"c", later).is_ok());
        assert_eq!(buckets.len(), 2, "the oldest was evicted");
        // Full buckets go first: after a minute a and b are full again.
        let much_later = now + Duration::from_secs(120);
        assert!(buckets.take(&"d", much_later).is_ok());
        assert!(buckets.len() <= 2);
    }

    #[test]
    fn the_limiter_checks_identity_then_source_and_counts_auth_failures() {
        let now = Instant::now();
        let section = RateLimits {
            identity: rate(1, 2),
            source: rate(1, 3),
            auth_failures: rate(1, 2),
            ..RateLimits::default()
        };
        let limiter = Limiter::new(&section);
        assert!(limiter.request("t", "alice", "s", now).is_ok());
        assert!(limiter.request("t", "alice", "s", now).is_ok());
        let refused = limiter.request("t", "alice", "s", now).expect_err("alice");
        assert_eq!(refused.limit, Limited::Identity);
        assert!(limiter.request("t", "bob", "s", now).is_ok());
        let refused = limiter.request("t", "bob", "s", now).expect_err("source");
        assert_eq!(refused.limit, Limited::Source);
        assert!(
            limiter.request("u", "bob", "s", now).is_ok(),
            "other tenant"
        );

        let addr: IpAddr = "192.0.2.1".parse().expect("literal");
        assert!(limiter.auth_allowed(addr, now).is_ok());
        limiter.auth_failed(addr, now);
        assert!(limiter.auth_allowed(addr, now).is_ok());
        limiter.auth_failed(addr, now);
        let refused = limiter.auth_allowed(addr, now).expect_err("two failures");
        assert_eq!(refused.limit, Limited::AuthFailures);
        assert_eq!(refused.retry_after, Duration::from_secs(60));
    }

    #[test]
    fn the_tenant_bucket_counts_every_caller_and_source_of_the_tenant() {
        let now = Instant::now();
        let section = RateLimits {
            tenant: rate(1, 2),
            ..RateLimits::default()
        };
        let limiter = Limiter::new(&section);
        assert!(limiter.request("t", "alice", "db", now).is_ok());
        assert!(limiter.request("t", "bob", "files", now).is_ok());
        let refused = limiter
            .request("t", "carol", "web", now)
            .expect_err("the tenant's burst is spent");
        assert_eq!(refused.limit, Limited::Tenant);
        assert_eq!(refused.retry_after, Duration::from_secs(60));
        assert!(
            limiter.request("u", "alice", "db", now).is_ok(),
            "another tenant has its own bucket"
        );
    }
}
