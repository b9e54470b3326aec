//! An identity provider's JWKS fetched from its URL (`jwks_url`), cached, and refreshed: every
//! `jwks_refresh_secs`, sooner after a failed fetch, and when a token names a key id the cache
//! does not hold (key rotation). Refreshes for unknown key ids are rate limited, so tokens with
//! made-up key ids cannot make the relay hammer the identity provider.
//!
//! The relay starts whatever the first fetch does: until one succeeds, tokens of the provider
//! are refused ([`super::jwt::JwtError::KeysUnavailable`]) and each failed fetch is logged with
//! the URL and the error. A failed refresh keeps the keys fetched before.
//!
//! One cache serves every configuration that names the same URL and refresh period while it
//! is alive, so a configuration reload keeps the fetched keys instead of starting empty.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use super::jwt::{KeySet, key_set};
use super::limits::{Bucket, Rate};

/// How long one fetch may take, connection included: an identity provider slower than this
/// is treated as down (the cached keys stay in use).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest JWKS document accepted, in bytes. Real ones hold a handful of keys (a few KiB);
/// the bound keeps a misbehaving server from filling the relay's memory.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The shortest refresh period accepted, in seconds.
pub const MIN_REFRESH_SECS: u64 = 10;

/// After a failed fetch, the next try comes this soon (or at the refresh period, if shorter).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

/// Refreshes triggered by unknown key ids: a burst of 3 (a rotation, and a retry or two), then
/// 2 a minute, per URL.
pub const ON_DEMAND: Rate = Rate {
    per_minute: 2,
    burst: 3,
};

/// Caches by URL and refresh period; an entry lives while some configuration holds it.
type Caches = HashMap<(String, u64), Weak<RemoteJwks>>;

/// The caches alive.
static CACHES: LazyLock<Mutex<Caches>> = LazyLock::new(Default::default);

/// The keys of one JWKS URL.
pub struct RemoteJwks {
    url: String,
    refresh: Duration,
    client: reqwest::Client,
    /// `None` until a fetch succeeds.
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Held while fetching: one fetch at a time, and a refresh for an unknown key id waits for
    /// one in flight instead of starting another.
    fetching: tokio::sync::Mutex<()>,
    on_demand: Mutex<Bucket>,
}

impl std::fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("url", &self.url)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

/// Redirects a JWKS fetch follows, as reqwest's default policy.
const MAX_REDIRECTS: usize = 10;

/// Whether keys fetched from `url` can be trusted in transit: `https`, or plain `http` to a
/// loopback host (a provider on the same machine, or a test).
fn secure_url(url: &reqwest::Url) -> bool {
    match (url.scheme(), url.host()) {
        ("https", Some(_)) => true,
        ("http", Some(url::Host::Domain(name))) => name.eq_ignore_ascii_case("localhost"),
        ("http", Some(url::Host::Ipv4(ip))) => ip.is_loopback(),
        ("http", Some(url::Host::Ipv6(ip))) => ip.is_loopback(),
        _ => false,
    }
}

impl RemoteJwks {
    /// The cache for `url` refreshed every `refresh_secs`: the live one if any configuration
    /// holds it, else a new one whose fetch loop starts at once (when called inside a Tokio
    /// runtime; outside one, as when a file is only checked, nothing is fetched).
    pub fn shared(url: &str, refresh_secs: u64) -> Result<Arc<Self>, String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("jwks_url {url:?}: {e}"))?;
        if !secure_url(&parsed) {
            return Err(format!(
                "jwks_url {url:?} must be an https URL (plain http only for a loopback host): whoever can alter the keys in transit can mint any identity"
            ));
        }
        if refresh_secs < MIN_REFRESH_SECS {
            return Err(format!(
                "jwks_refresh_secs must be at least {MIN_REFRESH_SECS}"
            ));
        }
        let key = (url.to_owned(), refresh_secs);
        let mut caches = CACHES.lock();
        caches.retain(|_, cache| cache.strong_count() > 0);
        if let Some(live) = caches.get(&key).and_then(Weak::upgrade) {
            return Ok(live);
        }
        // Redirects follow the same rule: never from https to plain http off loopback.
        let redirects = reqwest::redirect::Policy::custom(|attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else if secure_url(attempt.url()) {
                attempt.follow()
            } else {
                attempt.error("redirected to a URL that is neither https nor loopback")
            }
        });
        let client = reqwest::Client::builder()
            .redirect(redirects)
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("jwks_url {url:?}: HTTP client: {e}"))?;
        let cache = Arc::new(Self {
            url: url.to_owned(),
            refresh: Duration::from_secs(refresh_secs),
            client,
            keys: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(()),
            on_demand: Mutex::new(Bucket::full(&ON_DEMAND, Instant::now())),
        });
        caches.insert(key, Arc::downgrade(&cache));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(refresh_loop(Arc::downgrade(&cache)));
        }
        Ok(cache)
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The keys last fetched, or `None` before the first successful fetch.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        self.keys.read().clone()
    }

    /// Whether the cached keys hold `kid` (any key, when `kid` is `None`).
    fn holds(&self, kid: Option<&str>) -> bool {
        self.keys().is_some_and(|keys| match kid {
            Some(kid) => keys.iter().any(|(id, _)| id.as_deref() == Some(kid)),
            None => !keys.is_empty(),
        })
    }

    /// Makes sure the cache holds `kid` if the provider publishes it: waits for a fetch in
    /// flight, or fetches now if the on-demand rate allows. Returns at once when the key is
    /// already held.
    pub async fn refresh_for(&self, kid: Option<&str>) {
        if self.holds(kid) {
            return;
        }
        let _one = self.fetching.lock().await;
        if self.holds(kid) {
            return;
        }
        let allowed = self.on_demand.lock().take(&ON_DEMAND, Instant::now());
        if let Err(retry_after) = allowed {
            tracing::debug!(url = %self.url, kid, ?retry_after, "unknown JWKS key id; refresh rate limited");
            return;
        }
        tracing::info!(url = %self.url, kid, "unknown JWKS key id: fetching the JWKS again");
        let _ = self.fetch_locked().await;
    }

    /// Fetches now (waiting for a fetch in flight first).
    pub async fn fetch(&self) -> Result<usize, String> {
        let _one = self.fetching.lock().await;
        self.fetch_locked().await
    }

    async fn fetch_locked(&self) -> Result<usize, String> {
        let result = self
            .download()
            .await
            .and_then(|text| key_set(&text).map_err(|e| e.to_string()));
        match result {
            Ok(keys) => {
                let count = keys.len();
                tracing::info!(url = %self.url, keys = count, "JWKS fetched");
                *self.keys.write() = Some(Arc::new(keys));
                Ok(count)
            }
            Err(error) => {
                if self.keys().is_some() {
                    tracing::warn!(url = %self.url, %error, "JWKS refresh failed; the keys fetched before stay in use");
                } else {
                    tracing::error!(url = %self.url, %error, "JWKS fetch failed; tokens of this identity provider are refused until it succeeds");
                }
                Err(error)
            }
        }
    }

    async fn download(&self) -> Result<String, String> {
        let mut response = self
            .client
            .get(&self.url)
            .header("accept", "application/json")
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| e.to_string())?;
        let too_large = || format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes");
        if response
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).map_err(|_| "the JWKS is not UTF-8".to_owned())
    }
}

/// Fetches at once, then every refresh period (sooner after a failure), while any
/// configuration holds the cache. Holds it strongly only while fetching.
async fn refresh_loop(cache: Weak<RemoteJwks>) {
    loop {
        let Some(live) = cache.upgrade() else {
            return;
        };
        let wait = match live.fetch().await {
            Ok(_) => live.refresh,
            Err(_) => RETRY_AFTER_FAILURE.min(live.refresh),
        };
        drop(live);
        tokio::time::sleep(wait).await;
    }
}
