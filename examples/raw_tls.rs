//! The raw TLS-over-TCP ceiling: one bulk transfer on one TLS 1.3 connection between two
//! processes.
//!
//! `benches/compare.sh` runs it beside `raw_quic` as the bound for the HTTPS fallback and for
//! TCP tunnels such as rathole: tokio-rustls with the crate's aws-lc-rs TLS configs
//! (`mcp_tunnel::transport::tls`), `TCP_NODELAY`, and nothing else.
//!
//! ```text
//! raw_tls server --cert relay.pem --key relay.key [--listen 127.0.0.1:0]
//!     prints `listening ADDR`, then serves until killed: on each connection it reads the
//!     8-byte big-endian size the client asks for, sends that many bytes and closes.
//! raw_tls client --addr ADDR --ca ca.pem [--bytes N] [--rounds R]
//!     asks for N bytes (default 100 MiB) R times (default 3), one connection each (handshake
//!     outside the timing), and prints one JSON line like raw_quic's.
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use mcp_tunnel::transport::tls;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// ALPN of this example only.
const ALPN: &[u8] = b"raw-bulk";
/// Size of each write and read.
const CHUNK: usize = 256 * 1024;
/// Bound on one whole transfer (and on the handshake).
const TIMEOUT: Duration = Duration::from_secs(120);
/// The largest size a client may ask for.
const MAX_BYTES: u64 = 4 << 30;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Serve bulk transfers.
    Server {
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Measure bulk transfers from a server.
    Client {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        ca: PathBuf,
        #[arg(long, default_value_t = 100 * 1024 * 1024)]
        bytes: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().role {
        Role::Server { cert, key, listen } => server(cert, key, listen).await,
        Role::Client {
            addr,
            ca,
            bytes,
            rounds,
        } => client(addr, ca, bytes, rounds).await,
    }
}

async fn server(cert: PathBuf, key: PathBuf, listen: SocketAddr) -> anyhow::Result<()> {
    let config = tls::server_config(tls::Identity::load(&cert, &key)?, &[ALPN])?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let served = tokio::time::timeout(TIMEOUT, async {
                let mut tls = acceptor.accept(tcp).await?;
                let mut size = [0u8; 8];
                tls.read_exact(&mut size).await?;
                let mut left = u64::from_be_bytes(size).min(MAX_BYTES);
                let chunk = vec![b'x'; CHUNK];
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    tls.write_all(&chunk[..n]).await?;
                    left -= n as u64;
                }
                tls.shutdown().await?;
                std::io::Result::Ok(())
            })
            .await;
            if let Ok(Err(e)) = served {
                eprintln!("transfer failed: {e}");
            }
        });
    }
}

async fn client(addr: SocketAddr, ca: PathBuf, bytes: u64, rounds: usize) -> anyhow::Result<()> {
    let config = tls::client_config(&tls::Roots::CaFile(ca), &[ALPN])?;
    let connector = TlsConnector::from(Arc::new(config));
    let mut rates = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let mut tls = tokio::time::timeout(TIMEOUT, async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            connector
                .connect(ServerName::try_from("localhost")?, tcp)
                .await
                .map_err(anyhow::Error::from)
        })
        .await
        .context("TLS handshake timed out")??;
        let started = Instant::now();
        let received = tokio::time::timeout(TIMEOUT, async {
            tls.write_all(&bytes.to_be_bytes()).await?;
            tls.flush().await?;
            let mut buf = vec![0u8; CHUNK];
            let mut received = 0u64;
            loop {
                match tls.read(&mut buf).await? {
                    0 => break,
                    n => received += n as u64,
                }
            }
            anyhow::Ok(received)
        })
        .await
        .context("transfer timed out")??;
        if received != bytes {
            bail!("received {received} bytes of {bytes}");
        }
        rates.push(bytes as f64 / started.elapsed().as_secs_f64() / 1e6);
    }
    rates.sort_by(f64::total_cmp);
    let best = rates.last().copied().unwrap_or(0.0);
    let median = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    println!(
        "{}",
        serde_json::json!({
            "bytes": bytes,
            "rounds": rates.len(),
            "best_mb_per_sec": best,
            "median_mb_per_sec": median,
        })
    );
    Ok(())
}
