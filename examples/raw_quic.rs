//! The raw QUIC ceiling: one quinn bulk transfer on a single stream between two processes.
//!
//! `benches/compare.sh` runs it as the upper bound the tunnel's large results are measured
//! against: the same quinn, the same transport settings and UDP buffers as the tunnel
//! (`mcp_tunnel::transport::quic`), the same aws-lc-rs TLS 1.3 (`mcp_tunnel::transport::tls`),
//! and nothing else: no framing, no HTTP, no JSON.
//!
//! ```text
//! raw_quic server --cert relay.pem --key relay.key [--listen 127.0.0.1:0]
//!     prints `listening ADDR`, then serves until killed: on each stream it reads the 8-byte
//!     big-endian size the client asks for and sends that many bytes.
//! raw_quic client --addr ADDR --ca ca.pem [--bytes N] [--rounds R]
//!     asks for N bytes (default 100 MiB) R times (default 3), one stream each, and prints one
//!     JSON line: {"bytes":N,"rounds":R,"best_mb_per_sec":..,"median_mb_per_sec":..}
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use mcp_tunnel::transport::{quic, tls};

/// ALPN of this example only, so nothing else mistakes it for a tunnel.
const ALPN: &[u8] = b"raw-bulk";
/// Size of each write: large enough that per-call overhead vanishes.
const CHUNK: usize = 256 * 1024;
/// Bound on one whole transfer (and on the handshake).
const TIMEOUT: Duration = Duration::from_secs(120);
/// The largest size a client may ask for, so a stray client cannot keep the server busy.
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
    let endpoint = quic::server_endpoint(listen, config)?;
    println!("listening {}", endpoint.local_addr()?);
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                tokio::spawn(async move {
                    let mut size = [0u8; 8];
                    if recv.read_exact(&mut size).await.is_err() {
                        return;
                    }
                    let mut left = u64::from_be_bytes(size).min(MAX_BYTES);
                    let chunk = bytes::Bytes::from(vec![b'x'; CHUNK]);
                    while left > 0 {
                        let n = left.min(CHUNK as u64) as usize;
                        if send.write_chunk(chunk.slice(..n)).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
    }
    Ok(())
}

async fn client(addr: SocketAddr, ca: PathBuf, bytes: u64, rounds: usize) -> anyhow::Result<()> {
    let config = tls::client_config(&tls::Roots::CaFile(ca), &[ALPN])?;
    let endpoint = quic::client_endpoint("127.0.0.1:0".parse()?, config)?;
    let connection = tokio::time::timeout(TIMEOUT, endpoint.connect(addr, "localhost")?)
        .await
        .context("QUIC handshake timed out")??;
    let mut rates = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let started = Instant::now();
        let received = tokio::time::timeout(TIMEOUT, async {
            let (mut send, mut recv) = connection.open_bi().await?;
            send.write_all(&bytes.to_be_bytes()).await?;
            send.finish()?;
            let mut received = 0u64;
            while let Some(chunk) = recv.read_chunk(CHUNK, true).await? {
                received += chunk.bytes.len() as u64;
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
    connection.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    print_rates(bytes, &mut rates);
    Ok(())
}

/// Prints the JSON line `benches/compare.sh` reads (MB = 10^6 bytes, as `bench` reports).
fn print_rates(bytes: u64, rates: &mut [f64]) {
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
}
