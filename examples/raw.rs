//! The raw ceilings: what QUIC (quinn) and TLS over TCP do between two local processes with
//! nothing on top, no framing, HTTP, JSON or governance.
//!
//! `benches/compare.sh` runs it as the bound the tunnel is measured against: the same quinn
//! and transport settings as the tunnel (`mcp_tunnel::transport::quic`), the same aws-lc-rs
//! TLS 1.3 configs (`mcp_tunnel::transport::tls`), `TCP_NODELAY` for TLS.
//!
//! ```text
//! raw --transport quic|tls server --cert relay.pem --key relay.key [--listen 127.0.0.1:0]
//!     prints `listening ADDR`, then serves until killed. Each QUIC stream or TLS connection
//!     starts with a mode byte and an 8-byte big-endian size: `B` asks for that many bytes
//!     (bulk); `E` asks for every message of that size to be echoed until the client finishes.
//! raw --transport quic|tls client --addr ADDR --ca ca.pem bulk [--bytes N] [--rounds R]
//!     N bytes (default 100 MiB) R times (default 3), one stream or connection each (the TLS
//!     handshake outside the timing); prints {"bytes","rounds","best_mb_per_sec","median_mb_per_sec"}.
//! raw --transport quic|tls client --addr ADDR --ca ca.pem echo [--size S] [--rounds R]
//!     R round trips (default 5000) of an S-byte message (default 200, a small MCP call) on one
//!     open stream or connection, like a call on an established session; prints
//!     {"size","rounds","p50_ms","p99_ms"}.
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use mcp_tunnel::transport::{quic, tls};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// ALPN of this example only, so nothing else mistakes it for a tunnel.
const ALPN: &[u8] = b"raw-ceiling";
/// Size of each bulk write: large enough that per-call overhead vanishes.
const CHUNK: usize = 256 * 1024;
/// Bound on one whole transfer or echo run (and on each handshake).
const TIMEOUT: Duration = Duration::from_secs(120);
/// The largest bulk size or echo message a client may ask for, so a stray client cannot keep
/// the server busy or make it allocate much.
const MAX_BYTES: u64 = 4 << 30;
const MAX_ECHO: u64 = 1 << 20;
/// Mode bytes.
const BULK: u8 = b'B';
const ECHO: u8 = b'E';

#[derive(Parser)]
struct Args {
    /// The transport to measure.
    #[arg(long, value_enum)]
    transport: Transport,
    #[command(subcommand)]
    role: Role,
}

#[derive(Clone, Copy, ValueEnum)]
enum Transport {
    Quic,
    Tls,
}

#[derive(Subcommand)]
enum Role {
    /// Serve bulk transfers and echoes.
    Server {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Measure against a server.
    Client {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        ca: PathBuf,
        #[command(subcommand)]
        workload: Workload,
    },
}

#[derive(Subcommand)]
enum Workload {
    /// Bulk transfer rate.
    Bulk {
        #[arg(long, default_value_t = 100 * 1024 * 1024)]
        bytes: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Round-trip time of small messages on one open stream.
    Echo {
        #[arg(long, default_value_t = 200)]
        size: u64,
        #[arg(long, default_value_t = 5000)]
        rounds: usize,
    },
}

/// One direction each way: a QUIC stream's halves, or a TLS connection split in two.
type Duplex = (
    Pin<Box<dyn AsyncWrite + Send>>,
    Pin<Box<dyn AsyncRead + Send>>,
);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.role {
        Role::Server { cert, key, listen } => {
            let config = tls::server_config(tls::Identity::load(&cert, &key)?, &[ALPN])?;
            match args.transport {
                Transport::Quic => serve_quic(config, listen).await,
                Transport::Tls => serve_tls(config, listen).await,
            }
        }
        Role::Client { addr, ca, workload } => {
            let config = tls::client_config(&tls::Roots::CaFile(ca), &[ALPN])?;
            let mut opener = Opener::connect(args.transport, config, addr).await?;
            let result = match workload {
                Workload::Bulk { bytes, rounds } => bulk(&mut opener, bytes, rounds).await?,
                Workload::Echo { size, rounds } => echo(&mut opener, size, rounds).await?,
            };
            opener.close().await;
            println!("{result}");
            Ok(())
        }
    }
}

async fn serve_quic(config: rustls::ServerConfig, listen: SocketAddr) -> anyhow::Result<()> {
    // The relay's endpoint lets its peers open no streams; here the client opens them, as the
    // relay does towards `connect`.
    let endpoint = quic::stream_accepting_server_endpoint(listen, config)?;
    println!("listening {}", endpoint.local_addr()?);
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(serve_one((Box::pin(send), Box::pin(recv))));
            }
        });
    }
    Ok(())
}

async fn serve_tls(config: rustls::ServerConfig, listen: SocketAddr) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            if let Ok(Ok(stream)) = tokio::time::timeout(TIMEOUT, acceptor.accept(tcp)).await {
                let (recv, send) = tokio::io::split(stream);
                serve_one((Box::pin(send), Box::pin(recv))).await;
            }
        });
    }
}

/// Serves one stream: a bulk transfer or an echo loop, then a clean end.
async fn serve_one((mut send, mut recv): Duplex) {
    let served = tokio::time::timeout(TIMEOUT, async {
        let mode = recv.read_u8().await?;
        let size = recv.read_u64().await?;
        match mode {
            BULK => {
                let mut left = size.min(MAX_BYTES);
                let chunk = vec![b'x'; CHUNK];
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    send.write_all(&chunk[..n]).await?;
                    left -= n as u64;
                }
            }
            ECHO => {
                let mut message = vec![0u8; size.min(MAX_ECHO) as usize];
                while recv.read_exact(&mut message).await.is_ok() {
                    send.write_all(&message).await?;
                }
            }
            _ => {}
        }
        send.shutdown().await
    })
    .await;
    if let Ok(Err(e)) = served {
        eprintln!("serving failed: {e}");
    }
}

/// Opens streams to the server: QUIC streams on one connection, or one TLS connection each.
enum Opener {
    Quic(quinn::Endpoint, quinn::Connection),
    Tls(TlsConnector, SocketAddr),
}

impl Opener {
    async fn connect(
        transport: Transport,
        config: rustls::ClientConfig,
        addr: SocketAddr,
    ) -> anyhow::Result<Self> {
        Ok(match transport {
            Transport::Quic => {
                let endpoint = quic::client_endpoint("127.0.0.1:0".parse()?, config)?;
                let connection =
                    tokio::time::timeout(TIMEOUT, endpoint.connect(addr, "localhost")?)
                        .await
                        .context("QUIC handshake timed out")??;
                Self::Quic(endpoint, connection)
            }
            Transport::Tls => Self::Tls(TlsConnector::from(Arc::new(config)), addr),
        })
    }

    /// A new stream, its request (mode and size) sent.
    async fn open(&mut self, mode: u8, size: u64) -> anyhow::Result<Duplex> {
        let (mut send, recv): Duplex = match self {
            Self::Quic(_, connection) => {
                let (send, recv) = connection.open_bi().await?;
                (Box::pin(send), Box::pin(recv))
            }
            Self::Tls(connector, addr) => {
                let stream = tokio::time::timeout(TIMEOUT, async {
                    let tcp = TcpStream::connect(*addr).await?;
                    tcp.set_nodelay(true)?;
                    anyhow::Ok(
                        connector
                            .connect(ServerName::try_from("localhost")?, tcp)
                            .await?,
                    )
                })
                .await
                .context("TLS handshake timed out")??;
                let (recv, send) = tokio::io::split(stream);
                (Box::pin(send), Box::pin(recv))
            }
        };
        let mut request = [0u8; 9];
        request[0] = mode;
        request[1..].copy_from_slice(&size.to_be_bytes());
        send.write_all(&request).await?;
        send.flush().await?;
        Ok((send, recv))
    }

    async fn close(self) {
        if let Self::Quic(endpoint, connection) = self {
            connection.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
        }
    }
}

async fn bulk(opener: &mut Opener, bytes: u64, rounds: usize) -> anyhow::Result<String> {
    let mut rates = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let (send, mut recv) = opener.open(BULK, bytes).await?;
        let started = Instant::now();
        let received = tokio::time::timeout(TIMEOUT, async {
            let mut buf = vec![0u8; CHUNK];
            let mut received = 0u64;
            loop {
                match recv.read(&mut buf).await? {
                    0 => break,
                    n => received += n as u64,
                }
            }
            anyhow::Ok(received)
        })
        .await
        .context("transfer timed out")??;
        drop(send);
        if received != bytes {
            bail!("received {received} bytes of {bytes}");
        }
        rates.push(bytes as f64 / started.elapsed().as_secs_f64() / 1e6);
    }
    rates.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "bytes": bytes,
        "rounds": rates.len(),
        "best_mb_per_sec": rates.last().copied().unwrap_or(0.0),
        "median_mb_per_sec": rates.get(rates.len() / 2).copied().unwrap_or(0.0),
    })
    .to_string())
}

async fn echo(opener: &mut Opener, size: u64, rounds: usize) -> anyhow::Result<String> {
    if size == 0 || size > MAX_ECHO {
        bail!("--size must be 1..={MAX_ECHO}");
    }
    let (mut send, mut recv) = opener.open(ECHO, size).await?;
    let message = vec![b'x'; size as usize];
    let mut back = vec![0u8; size as usize];
    let mut times = Vec::with_capacity(rounds);
    tokio::time::timeout(TIMEOUT, async {
        for _ in 0..rounds.max(1) {
            let started = Instant::now();
            send.write_all(&message).await?;
            send.flush().await?;
            recv.read_exact(&mut back).await?;
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
        send.shutdown().await?;
        anyhow::Ok(())
    })
    .await
    .context("echo timed out")??;
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    Ok(serde_json::json!({
        "size": size,
        "rounds": times.len(),
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
    })
    .to_string())
}
