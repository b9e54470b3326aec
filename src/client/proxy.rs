//! HTTP CONNECT proxies for the HTTPS fallback (`--proxy`, or `HTTPS_PROXY` from the
//! environment): the proxy opens a TCP tunnel to the relay, and TLS runs end to end inside it.

use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest proxy answer header accepted.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// Time the proxy has to connect us.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP proxy that supports CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Proxy {
    /// `host:port` of the proxy.
    pub address: String,
    /// `user:password` for Basic proxy authentication, if the URL has one.
    credentials: Option<String>,
}

impl Proxy {
    /// Parses `http://[user:password@]host[:port]` (port 3128 when absent: Squid's default, and
    /// the usual one).
    pub(super) fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("proxy {url:?}: only http:// proxies are supported"))?;
        let rest = rest.trim_end_matches('/');
        let (credentials, host) = match rest.rsplit_once('@') {
            Some((credentials, host)) => (Some(credentials.to_owned()), host),
            None => (None, rest),
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("proxy {url:?}: expected http://host:port"));
        }
        let has_port = host
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
            && !host.ends_with(']');
        let address = if has_port {
            host.to_owned()
        } else {
            format!("{host}:3128")
        };
        Ok(Self {
            address,
            credentials,
        })
    }

    /// The proxy from `HTTPS_PROXY` / `https_proxy`, unless `NO_PROXY` names `host`.
    pub(super) fn from_env(host: &str) -> Option<Result<Self, String>> {
        let url = std::env::var("HTTPS_PROXY")
            .or_else(|_| std::env::var("https_proxy"))
            .ok()
            .filter(|u| !u.is_empty())?;
        let no_proxy = std::env::var("NO_PROXY")
            .or_else(|_| std::env::var("no_proxy"))
            .unwrap_or_default();
        let bypass = no_proxy.split(',').map(str::trim).any(|entry| {
            entry == "*"
                || (!entry.is_empty()
                    && (host == entry
                        || host.ends_with(&format!(".{}", entry.trim_start_matches('.')))))
        });
        (!bypass).then(|| Self::parse(&url))
    }

    /// Opens a TCP tunnel to `target` (`host:port`) through the proxy.
    pub(super) async fn connect(&self, target: &str) -> std::io::Result<TcpStream> {
        tokio::time::timeout(CONNECT_TIMEOUT, self.connect_inner(target))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("proxy {} did not connect us within 10 s", self.address),
                )
            })?
    }

    async fn connect_inner(&self, target: &str) -> std::io::Result<TcpStream> {
        let mut tcp = TcpStream::connect(&self.address).await?;
        tcp.set_nodelay(true)?;
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(credentials) = &self.credentials {
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes()).await?;
        // Read the answer head byte by byte: nothing of the tunnel after it may be consumed.
        let mut head = Vec::with_capacity(256);
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= MAX_RESPONSE_HEAD {
                return Err(std::io::Error::other("proxy answer header too long"));
            }
            let byte = tcp.read_u8().await?;
            head.push(byte);
        }
        let head = String::from_utf8_lossy(&head);
        let status_line = head.lines().next().unwrap_or_default();
        let status = status_line.split_whitespace().nth(1).unwrap_or_default();
        if status != "200" {
            return Err(std::io::Error::other(format!(
                "proxy {} refused CONNECT {target}: {status_line}",
                self.address
            )));
        }
        Ok(tcp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proxy_urls() {
        assert_eq!(
            Proxy::parse("http://proxy.corp:8080").expect("url").address,
            "proxy.corp:8080"
        );
        assert_eq!(
            Proxy::parse("http://proxy.corp/").expect("url").address,
            "proxy.corp:3128"
        );
        let with_user = Proxy::parse("http://u:p@127.0.0.1:3128").expect("url");
        assert_eq!(with_user.credentials.as_deref(), Some("u:p"));
        assert!(Proxy::parse("socks5://x:1").is_err());
    }

    #[tokio::test]
    async fn connects_through_a_connect_proxy_and_reports_refusals() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            for answer in [
                "HTTP/1.1 200 Connection established\r\n\r\nHELLO",
                "HTTP/1.1 403 Forbidden\r\n\r\n",
            ] {
                let (mut tcp, _) = listener.accept().await.expect("accept");
                let mut request = vec![0u8; 512];
                let n = tcp.read(&mut request).await.expect("read");
                assert!(
                    String::from_utf8_lossy(&request[..n])
                        .starts_with("CONNECT relay.example:443 HTTP/1.1\r\n")
                );
                tcp.write_all(answer.as_bytes()).await.expect("write");
            }
        });
        let proxy = Proxy::parse(&format!("http://{address}")).expect("url");
        let mut tunnel = proxy
            .connect("relay.example:443")
            .await
            .expect("200 opens the tunnel");
        let mut hello = [0u8; 5];
        tunnel.read_exact(&mut hello).await.expect("tunnel bytes");
        assert_eq!(
            &hello, b"HELLO",
            "bytes after the answer head belong to the tunnel"
        );
        let refused = proxy.connect("relay.example:443").await.expect_err("403");
        assert!(refused.to_string().contains("403"), "{refused}");
    }
}
