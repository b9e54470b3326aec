//! The HTTP client of the HTTP sources: hyper's pooled client and nothing more per request.
//!
//! reqwest, used here before, wraps every request in layers `connect` has no use for: a
//! redirect policy that re-parses the request URI into a `url::Url`, a retry wrapper (both
//! installed even when disabled) and the large futures they move around, about a tenth of
//! `connect`'s CPU at saturation. This client keeps what reqwest was configured to do: a
//! connection pool, `TCP_NODELAY`, a connect timeout over TCP and TLS together, HTTP/1.1 and
//! HTTP/2 (by ALPN) for `https` upstreams, HTTP/1.1 for `http`, the platform's trust roots
//! through rustls-platform-verifier (what reqwest's `rustls` feature uses), and credentials in
//! the URL sent as Basic auth. A source's URL is parsed once, into a [`Target`] whose URI each
//! request clones.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use http::{Method, Request, Uri};
use http_body_util::{BodyDataStream, Full};
use hyper::body::{Body as _, Incoming};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

/// Time to establish a TCP connection and its TLS session with an upstream, as with reqwest.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle pooled connection is kept for the next request (reqwest's default).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An upstream's response; its body is read with [`body_stream`].
pub(super) type Response = http::Response<Incoming>;

/// A response body as a stream of its data.
pub(super) type BodyStream = BodyDataStream<Incoming>;

/// Redirects followed for one request before it fails, as reqwest's default policy.
const MAX_REDIRECTS: usize = 10;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    /// Connecting failed or timed out, or the connection broke.
    #[error(transparent)]
    Http(#[from] hyper_util::client::legacy::Error),
    /// The upstream redirected more than [`MAX_REDIRECTS`] times.
    #[error("too many redirects (more than {MAX_REDIRECTS})")]
    TooManyRedirects,
    /// The upstream redirected to a URL that is not `http` or `https`.
    #[error("redirected to {0}, which is not an http or https URL")]
    BadRedirect(String),
    /// The upstream redirected to another origin (scheme, host or port) and the source does
    /// not allow that (`follow_cross_origin_redirects`).
    #[error(
        "redirected from {from} to another origin, {to}: refused (set follow_cross_origin_redirects = true on the source to allow it)"
    )]
    CrossOriginRedirect {
        /// The URL that redirected.
        from: String,
        /// Where it pointed.
        to: String,
    },
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub(super) enum ClientError {
    /// The platform's certificate verifier is unavailable.
    #[error("platform certificate verifier: {0}")]
    Verifier(rustls::Error),
    /// The crypto provider supports no usable TLS version.
    #[error("TLS versions: {0}")]
    Versions(rustls::Error),
}

/// A connection that took longer than [`CONNECT_TIMEOUT`].
#[derive(Debug, thiserror::Error)]
#[error("no connection within {0:?}")]
struct ConnectTimeout(Duration);

/// Where a source's requests go, parsed once: the URI without credentials, and the Basic
/// `Authorization` the URL's credentials make, as reqwest sent them. Public (as
/// `client::UpstreamTarget`) so the fuzz targets reach its parser with URLs an upstream names.
#[derive(Clone, Debug)]
pub struct Target {
    uri: Uri,
    authorization: Option<HeaderValue>,
    /// Whether a redirect to another origin is followed (off by default: the request, its
    /// body included on 307 and 308, was meant for the configured upstream only).
    cross_origin_redirects: bool,
}

impl Target {
    /// The target of `url` (`http` or `https`).
    pub fn new(url: &url::Url) -> Result<Self, String> {
        let mut url = url.clone();
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{url}: not an http or https URL"));
        }
        // Fragments are never sent.
        url.set_fragment(None);
        let authorization = credentials(&mut url);
        let uri = Uri::try_from(url.as_str()).map_err(|e| format!("{url}: {e}"))?;
        Ok(Self {
            uri,
            authorization,
            cross_origin_redirects: false,
        })
    }

    /// Lets requests to this target follow redirects to other origins (with credentials,
    /// cookies and sensitive headers dropped on the way).
    pub(super) fn with_cross_origin_redirects(mut self, allowed: bool) -> Self {
        self.cross_origin_redirects = allowed;
        self
    }

    /// Whether redirects to other origins are followed.
    pub(super) fn cross_origin_redirects(&self) -> bool {
        self.cross_origin_redirects
    }
}

/// Takes the credentials out of `url`, as a Basic `Authorization` value (marked sensitive).
fn credentials(url: &mut url::Url) -> Option<HeaderValue> {
    use base64::Engine as _;
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .map(|t| t.into_owned())
    };
    if !url.has_authority() || (url.username().is_empty() && url.password().is_none()) {
        return None;
    }
    let username = decode(url.username()).ok()?;
    let password = match url.password() {
        Some(password) => Some(decode(password).ok()?),
        None => None,
    };
    // Both succeed: an http(s) URL with an authority can always lose its credentials.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let pair = format!("{username}:{}", password.unwrap_or_default());
    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
    let mut value = HeaderValue::try_from(format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// A pooled HTTP client for upstreams; clones share the pool.
#[derive(Clone)]
pub(super) struct HttpClient {
    inner: Client<TimeoutConnector, Full<Bytes>>,
}

impl HttpClient {
    /// A client with its own connection pool.
    pub(super) fn new() -> Result<Self, ClientError> {
        let provider = crate::transport::tls::provider();
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
            .map_err(ClientError::Verifier)?;
        Self::with_verifier(provider, verifier)
    }

    /// A client that also trusts `roots` (tests: an upstream with a certificate of their own).
    #[cfg(test)]
    fn with_extra_roots(
        roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    ) -> Result<Self, ClientError> {
        let provider = crate::transport::tls::provider();
        let verifier =
            rustls_platform_verifier::Verifier::new_with_extra_roots(roots, provider.clone())
                .map_err(ClientError::Verifier)?;
        Self::with_verifier(provider, verifier)
    }

    fn with_verifier(
        provider: Arc<rustls::crypto::CryptoProvider>,
        verifier: rustls_platform_verifier::Verifier,
    ) -> Result<Self, ClientError> {
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ClientError::Versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(tcp);
        let inner = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(TimeoutConnector { inner: https });
        Ok(Self { inner })
    }

    /// Sends `method` to `target` with `headers` and `body` (empty for none); resolves to the
    /// response head, whose body streams after. Redirects are followed as reqwest's default
    /// policy did (see [`Redirect`]); only a redirect response costs more than the request.
    pub(super) async fn send(
        &self,
        method: Method,
        target: &Target,
        mut headers: HeaderMap,
        body: Bytes,
    ) -> Result<Response, RequestError> {
        if let Some(authorization) = &target.authorization {
            headers
                .entry(AUTHORIZATION)
                .or_insert_with(|| authorization.clone());
        }
        let mut redirect = Redirect {
            method,
            uri: target.uri.clone(),
            headers,
            body,
            cross_origin: target.cross_origin_redirects,
        };
        let mut response = self.inner.request(redirect.request()).await?;
        for _ in 0..MAX_REDIRECTS {
            if !redirect.follow(&response)? {
                return Ok(response);
            }
            response = self.inner.request(redirect.request()).await?;
        }
        if redirect.follow(&response)? {
            return Err(RequestError::TooManyRedirects);
        }
        Ok(response)
    }
}

/// A request as sent, kept to follow redirects the way reqwest's default policy (tower-http's
/// `FollowRedirect` with reqwest's `TowerRedirectPolicy`) did: 301 and 302 turn a POST into a
/// bodiless GET, 303 turns anything but HEAD into one, 307 and 308 resend method and body; the
/// `Location` is resolved against the request's URI; credentials and cookies are dropped on a
/// move to another scheme, host or port; `Referer` names the previous URI (never from https to
/// http).
struct Redirect {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    /// Whether a redirect to another origin is followed; if not, it fails the request.
    cross_origin: bool,
}

impl Redirect {
    /// The request to send now.
    fn request(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }

    /// Whether `response` redirects this request; if so, becomes the request to send next.
    fn follow<B>(&mut self, response: &http::Response<B>) -> Result<bool, RequestError> {
        use http::StatusCode;
        let status = response.status();
        if !matches!(
            status,
            StatusCode::MOVED_PERMANENTLY
                | StatusCode::FOUND
                | StatusCode::SEE_OTHER
                | StatusCode::TEMPORARY_REDIRECT
                | StatusCode::PERMANENT_REDIRECT
        ) {
            return Ok(false);
        }
        // Only on a redirect: the URI is parsed as a URL here and nowhere on the usual path.
        let Some((previous, next)) = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|location| location.to_str().ok())
            .and_then(|location| {
                let previous = url::Url::parse(&self.uri.to_string()).ok()?;
                let next = previous.join(location).ok()?;
                Some((previous, next))
            })
        else {
            // No usable Location: the redirect itself is the answer.
            return Ok(false);
        };
        if !matches!(next.scheme(), "http" | "https") {
            return Err(RequestError::BadRedirect(next.to_string()));
        }
        let uri = Uri::try_from(next.as_str())
            .map_err(|_| RequestError::BadRedirect(next.to_string()))?;
        let other_origin = next.host_str() != previous.host_str()
            || next.port_or_known_default() != previous.port_or_known_default()
            || next.scheme() != previous.scheme();
        if other_origin && !self.cross_origin {
            return Err(RequestError::CrossOriginRedirect {
                from: redacted(&previous),
                to: redacted(&next),
            });
        }
        let to_get = match status {
            StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND => self.method == Method::POST,
            StatusCode::SEE_OTHER => true,
            _ => false,
        };
        if to_get {
            if self.method != Method::HEAD {
                self.method = Method::GET;
            }
            self.body = Bytes::new();
            for name in [
                http::header::CONTENT_TYPE,
                http::header::CONTENT_LENGTH,
                http::header::CONTENT_ENCODING,
                http::header::TRANSFER_ENCODING,
            ] {
                self.headers.remove(name);
            }
        }
        if other_origin {
            for name in [
                AUTHORIZATION,
                http::header::COOKIE,
                http::header::PROXY_AUTHORIZATION,
                http::header::WWW_AUTHENTICATE,
            ] {
                self.headers.remove(name);
            }
            self.headers.remove("cookie2");
            // And any other header marked sensitive (the caller's identity assertion): it was
            // meant for the upstream configured, not for wherever that upstream points.
            let sensitive: Vec<_> = self
                .headers
                .iter()
                .filter(|(_, value)| value.is_sensitive())
                .map(|(name, _)| name.clone())
                .collect();
            for name in sensitive {
                self.headers.remove(name);
            }
        }
        if !(next.scheme() == "http" && previous.scheme() == "https") {
            let mut referer = previous;
            let _ = referer.set_username("");
            let _ = referer.set_password(None);
            referer.set_fragment(None);
            if let Ok(value) = HeaderValue::try_from(referer.as_str()) {
                self.headers.insert(http::header::REFERER, value);
            }
        }
        self.uri = uri;
        Ok(true)
    }
}

/// `url` without credentials, query or fragment, for an error message.
fn redacted(url: &url::Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

/// The body's length when the upstream declared it.
pub(super) fn content_length(response: &Response) -> Option<u64> {
    response.body().size_hint().exact()
}

/// The body of `response` as a stream of its data.
pub(super) fn body_stream(response: Response) -> BodyStream {
    BodyDataStream::new(response.into_body())
}

/// An error with its causes, e.g. "client error (Connect): tcp connect error: Connection refused
/// (os error 111)": hyper's errors say little without their sources.
pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The TLS connector with [`CONNECT_TIMEOUT`] over TCP and TLS together: the TCP connector's
/// own timeout covers only TCP, and a TLS handshake must not wait forever either.
#[derive(Clone)]
struct TimeoutConnector {
    inner: HttpsConnector<HttpConnector>,
}

impl tower_service::Service<Uri> for TimeoutConnector {
    type Response = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let connecting = self.inner.call(destination);
        Box::pin(async move {
            tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                .await
                .unwrap_or_else(|_| Err(Box::new(ConnectTimeout(CONNECT_TIMEOUT))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_become_basic_auth_and_leave_the_uri() {
        let url = url::Url::parse("http://us%40er:p%3Ass@127.0.0.1:8080/mcp#frag").expect("valid");
        let target = Target::new(&url).expect("http URL");
        assert_eq!(target.uri, "http://127.0.0.1:8080/mcp");
        let value = target.authorization.expect("credentials given");
        assert!(value.is_sensitive());
        // base64("us@er:p:ss")
        assert_eq!(value, "Basic dXNAZXI6cDpzcw==");
        // A user without a password still authenticates, with an empty password.
        let url = url::Url::parse("https://user@example.com/mcp").expect("valid");
        let target = Target::new(&url).expect("https URL");
        assert_eq!(target.uri, "https://example.com/mcp");
        assert_eq!(
            target.authorization.expect("a user given"),
            "Basic dXNlcjo="
        );
    }

    #[test]
    fn plain_urls_send_no_authorization_and_other_schemes_are_refused() {
        let url = url::Url::parse("http://127.0.0.1:1/mcp?x=1").expect("valid");
        let target = Target::new(&url).expect("http URL");
        assert_eq!(target.uri, "http://127.0.0.1:1/mcp?x=1");
        assert!(target.authorization.is_none());
        let url = url::Url::parse("ftp://127.0.0.1/mcp").expect("valid");
        assert!(Target::new(&url).is_err());
    }

    #[tokio::test]
    async fn a_refused_connection_is_named_in_the_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let port = listener.local_addr().expect("bound").port();
        drop(listener);
        let client = HttpClient::new().expect("client builds");
        let url = url::Url::parse(&format!("http://127.0.0.1:{port}/mcp")).expect("valid");
        let target = Target::new(&url).expect("http URL");
        let error = client
            .send(Method::POST, &target, HeaderMap::new(), Bytes::new())
            .await
            .expect_err("nothing listens on the port");
        let text = error_chain(&error);
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    /// Serves one HTTP/2 request on a TLS listener offering h2 and http/1.1; returns the
    /// protocol ALPN chose and the request's method.
    async fn h2_upstream(
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> (Option<Vec<u8>>, Method) {
        let (tcp, _) = listener.accept().await.expect("the client connects");
        let tls = acceptor.accept(tcp).await.expect("TLS handshake");
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let mut connection = h2::server::handshake(tls).await.expect("HTTP/2 preface");
        let (request, mut respond) = connection
            .accept()
            .await
            .expect("one request")
            .expect("a valid request");
        let head = http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(())
            .expect("static response head");
        let mut body = respond.send_response(head, false).expect("send the head");
        body.send_data(Bytes::from_static(b"{}"), true)
            .expect("send the body");
        // The connection goes on in its own task, until the client hangs up or the test ends.
        tokio::spawn(async move { while connection.accept().await.is_some() {} });
        (alpn, request.method().clone())
    }

    /// A loopback listener on port 0 and the `https` URL of its `/mcp`.
    async fn https_listener() -> (tokio::net::TcpListener, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!(
            "https://127.0.0.1:{}/mcp",
            listener.local_addr().expect("bound").port()
        );
        (listener, url)
    }

    #[tokio::test]
    async fn https_upstreams_speak_http2_by_alpn_and_untrusted_certificates_are_refused() {
        use futures_util::StreamExt as _;
        use rustls_pki_types::pem::PemObject as _;
        let certs = crate::certs::generate(&[]).expect("dev certificates");
        let identity =
            crate::transport::tls::Identity::from_pem(&certs.relay_pem, &certs.relay_key)
                .expect("the dev identity loads");
        let config = crate::transport::tls::server_config(identity, &[b"h2", b"http/1.1"])
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        // Trusting the upstream's CA: the request goes over HTTP/2, chosen by ALPN.
        let (listener, url) = https_listener().await;
        let upstream = tokio::spawn(h2_upstream(listener, acceptor.clone()));
        let ca = rustls_pki_types::CertificateDer::from_pem_slice(certs.ca_pem.as_bytes())
            .expect("the CA is PEM");
        let client = HttpClient::with_extra_roots(vec![ca]).expect("client builds");
        let target = Target::new(&url::Url::parse(&url).expect("valid")).expect("https URL");
        let response = client
            .send(Method::GET, &target, HeaderMap::new(), Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("the trusted upstream answers: {}", error_chain(&e)));
        assert_eq!(response.version(), http::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        let mut body = body_stream(response);
        let mut read = Vec::new();
        while let Some(chunk) = body.next().await {
            read.extend_from_slice(&chunk.expect("the body arrives"));
        }
        assert_eq!(read, b"{}");
        let (alpn, method) = tokio::time::timeout(Duration::from_secs(10), upstream)
            .await
            .expect("the upstream has answered")
            .expect("the upstream task does not panic");
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert_eq!(method, Method::GET);

        // With the platform's roots alone, the same certificate is refused.
        let (listener, url) = https_listener().await;
        let refusing = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("the client connects");
            // The client aborts the handshake.
            let _ = acceptor.accept(tcp).await;
        });
        let client = HttpClient::new().expect("client builds");
        let target = Target::new(&url::Url::parse(&url).expect("valid")).expect("https URL");
        let error = client
            .send(Method::GET, &target, HeaderMap::new(), Bytes::new())
            .await
            .expect_err("an unknown CA is not trusted");
        let text = error_chain(&error);
        assert!(text.contains("certificate"), "{text}");
        let _ = tokio::time::timeout(Duration::from_secs(10), refusing).await;
    }

    /// An upstream that redirects: `/307` and `/302` to `/echo`, `/loop` to itself; `/echo`
    /// answers with the method, content type, referer and body it got.
    async fn redirecting_upstream() -> (String, tokio::task::JoinHandle<()>) {
        use axum::routing::any;
        let redirect = |status: u16, to: &'static str| {
            move || async move {
                http::Response::builder()
                    .status(status)
                    .header(http::header::LOCATION, to)
                    .body(axum::body::Body::empty())
                    .expect("static redirect")
            }
        };
        let echo = |method: Method, headers: HeaderMap, body: Bytes| async move {
            let header = |name| {
                headers
                    .get(name)
                    .and_then(|v: &HeaderValue| v.to_str().ok())
                    .unwrap_or("-")
                    .to_owned()
            };
            format!(
                "{method} {} {} {}",
                header(http::header::CONTENT_TYPE),
                header(http::header::REFERER),
                String::from_utf8_lossy(&body)
            )
        };
        let app = axum::Router::new()
            .route("/307", any(redirect(307, "/echo")))
            .route("/302", any(redirect(302, "echo")))
            .route("/loop", any(redirect(302, "/loop")))
            .route("/echo", any(echo));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("bound"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (base, server)
    }

    /// A redirect answer with `status` to `location`.
    fn redirect_to(status: u16, location: &str) -> http::Response<()> {
        http::Response::builder()
            .status(status)
            .header(http::header::LOCATION, location)
            .body(())
            .expect("a valid response")
    }

    #[test]
    fn sensitive_headers_stay_with_their_origin() {
        let mut assertion = HeaderValue::from_static("signed");
        assertion.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert("x-identity", assertion);
        headers.insert("x-plain", HeaderValue::from_static("kept"));
        let mut redirect = Redirect {
            method: Method::POST,
            uri: Uri::from_static("http://a.example:8080/mcp"),
            headers,
            body: Bytes::new(),
            cross_origin: true,
        };
        let to = |location: &str| redirect_to(307, location);
        assert!(redirect.follow(&to("/other")).expect("followed"));
        assert!(redirect.headers.contains_key("x-identity"), "same origin");
        assert!(
            redirect
                .follow(&to("http://b.example:8080/mcp"))
                .expect("followed")
        );
        assert!(!redirect.headers.contains_key("x-identity"), "another host");
        assert_eq!(redirect.headers["x-plain"], "kept");
        assert_eq!(redirect.uri, "http://b.example:8080/mcp");
    }

    #[test]
    fn cross_origin_redirects_are_refused_unless_allowed() {
        let mut redirect = Redirect {
            method: Method::POST,
            uri: Uri::from_static("http://a.example:8080/mcp"),
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
            cross_origin: false,
        };
        let to = |location: &str| redirect_to(308, location);
        assert!(redirect.follow(&to("/other")).expect("same origin"));
        for other in [
            "http://b.example:8080/mcp",
            "http://a.example:8081/mcp",
            "https://a.example:8080/mcp",
        ] {
            let error = redirect.follow(&to(other)).expect_err("another origin");
            assert!(
                matches!(&error, RequestError::CrossOriginRedirect { to, .. } if to == other),
                "{error}"
            );
        }
        assert_eq!(redirect.uri, "http://a.example:8080/other", "not followed");
    }

    #[tokio::test]
    async fn redirects_are_followed_as_reqwest_followed_them() {
        use futures_util::StreamExt as _;
        let (base, server) = redirecting_upstream().await;
        let client = HttpClient::new().expect("client builds");
        let post = |path: &str| {
            let target = Target::new(&url::Url::parse(&format!("{base}{path}")).expect("valid"))
                .expect("http URL");
            let client = client.clone();
            async move {
                let mut headers = HeaderMap::new();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                let response = client
                    .send(Method::POST, &target, headers, Bytes::from_static(b"{}"))
                    .await?;
                let mut text = Vec::new();
                let mut body = body_stream(response);
                while let Some(chunk) = body.next().await {
                    text.extend_from_slice(&chunk.expect("the body arrives"));
                }
                Ok::<_, RequestError>(String::from_utf8_lossy(&text).into_owned())
            }
        };
        // 307 resends the POST with its body.
        assert_eq!(
            post("/307").await.expect("followed"),
            format!("POST application/json {base}/307 {{}}")
        );
        // 302 turns it into a GET without body or content type; a relative Location resolves.
        assert_eq!(
            post("/302").await.expect("followed"),
            format!("GET - {base}/302 ")
        );
        let error = post("/loop").await.expect_err("a redirect loop ends");
        assert!(matches!(error, RequestError::TooManyRedirects), "{error}");
        server.abort();
    }
}
