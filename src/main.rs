//! The `mcp-tunnel` command line: parse, then call into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use mcp_tunnel::bench;
use mcp_tunnel::client::{self, ClientSettings};
use mcp_tunnel::config::{ClientFile, SourceConfig, TransportChoice};
use mcp_tunnel::govern::SecretHash;
use mcp_tunnel::govern::audit;
use mcp_tunnel::govern::identity::new_secret;
use mcp_tunnel::relay::reload::{self, LoadedConfig, Reloader};
use mcp_tunnel::relay::{Relay, RelaySettings};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

mod alloc;

/// The allocator of every process the CLI runs: see [`alloc`].
#[global_allocator]
static ALLOCATOR: alloc::Split = alloc::Split;

#[derive(Parser)]
#[command(
    name = "mcp-tunnel",
    version,
    about = "A governed tunnel for MCP servers that must never face the internet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a dev CA and a relay certificate: DIR/ca.pem, DIR/relay.pem, DIR/relay.key.
    Certs {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Extra DNS names or IP addresses for the relay certificate (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Run the relay.
    Relay {
        /// The relay's TOML configuration.
        #[arg(long)]
        config: PathBuf,
        /// If the audit trail's last checkpoint does not verify (changed or deleted rows or
        /// checkpoints, another key), begin a new epoch instead of refusing to start: the trail
        /// records the epoch and why, and `audit verify` reports it.
        #[arg(long)]
        new_audit_epoch: bool,
    },
    /// Run the tunnel client next to your MCP servers.
    Connect(ConnectArgs),
    /// Relay, connect and a built-in MCP server on loopback, ready for an MCP client.
    Demo {
        /// Agent endpoint address [default: 127.0.0.1:8080, or a free port when that is taken]
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Run only the built-in MCP server and print its URL (for benchmarks).
        #[arg(long)]
        upstream_only: bool,
        /// With --upstream-only: answer each request with one SSE event (as the SDK servers
        /// do by default) instead of a JSON body.
        #[arg(long, requires = "upstream_only")]
        sse_answers: bool,
    },
    /// Tunnel tokens.
    Token {
        #[command(subcommand)]
        command: NewSecret,
    },
    /// Agent API keys.
    Key {
        #[command(subcommand)]
        command: NewKey,
    },
    /// The audit trail: follow, export or verify it (works while relays write to it), in a
    /// relay's SQLite file or the fleet's PostgreSQL database.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Load-test an MCP endpoint (Streamable HTTP): calls/s, latency percentiles, errors, MB/s.
    Bench(BenchArgs),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// The latest rows as lines; with --follow, then new rows as they are written.
    Tail {
        #[command(flatten)]
        trail: TrailArgs,
        /// Keep printing new rows until interrupted.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// How many of the latest rows to print first.
        #[arg(short = 'n', long = "lines", default_value_t = 20)]
        lines: usize,
    },
    /// Every matching row, oldest first, one JSON object per line.
    Export {
        #[command(flatten)]
        trail: TrailArgs,
        /// Output format.
        #[arg(long, value_parser = ["jsonl"], default_value = "jsonl")]
        format: String,
        #[command(flatten)]
        filter: AuditFilterArgs,
        /// Rows at or after this time (RFC 3339 or milliseconds since the epoch).
        #[arg(long)]
        since: Option<String>,
        /// Rows before this time (RFC 3339 or milliseconds since the epoch).
        #[arg(long)]
        until: Option<String>,
    },
    /// Check every tenant's hash chain and every checkpoint signature; exits non-zero naming
    /// the first bad row.
    Verify {
        #[command(flatten)]
        trail: TrailArgs,
        /// The relay's checkpoint public key (`audit.key.pub`); repeat it for every key the
        /// trail was signed with (one per relay, or after a key change). Without it, signatures
        /// are checked with the keys the trail names.
        #[arg(long)]
        public_key: Vec<PathBuf>,
        /// The off-box copy of the checkpoints (`[audit] checkpoint_file`, or an earlier
        /// `audit checkpoints --export`): every checkpoint in it must be in the trail, identical.
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
    /// The relays' signed checkpoints, oldest first: one line each, or with --export one JSON
    /// object a line (the off-box copy `verify --checkpoints` reads).
    Checkpoints {
        #[command(flatten)]
        trail: TrailArgs,
        /// Print JSON lines (the off-box copy's format).
        #[arg(long)]
        export: bool,
    },
}

#[derive(clap::Args)]
struct TrailArgs {
    /// The audit trail: a relay's SQLite file, or the fleet's PostgreSQL database as a
    /// postgresql:// URL (its password in the URL, --password-file or PGPASSWORD).
    #[arg(long)]
    db: String,
    /// The database's password (the file's first line), for a postgresql:// --db without one.
    #[arg(long)]
    password_file: Option<PathBuf>,
}

impl TrailArgs {
    fn open(self) -> anyhow::Result<audit::Trail> {
        Ok(audit::Trail::open(&self.db, self.password_file.as_deref())?)
    }
}

#[derive(clap::Args)]
struct AuditFilterArgs {
    /// Only rows of this relay instance (its `[fleet] id`, or host:port).
    #[arg(long)]
    relay: Option<String>,
    /// Only this tenant.
    #[arg(long)]
    tenant: Option<String>,
    /// Only this caller.
    #[arg(long)]
    subject: Option<String>,
    /// Only this source.
    #[arg(long)]
    source: Option<String>,
    /// Only this tool.
    #[arg(long)]
    tool: Option<String>,
    /// Only allowed or only denied calls.
    #[arg(long, value_parser = ["allow", "deny"])]
    decision: Option<String>,
}

impl AuditFilterArgs {
    fn into_filter(self) -> audit::Filter {
        audit::Filter {
            relay: self.relay,
            tenant: self.tenant,
            subject: self.subject,
            source: self.source,
            tool: self.tool,
            decision: self.decision.map(|d| {
                if d == "deny" {
                    audit::Verdict::Deny
                } else {
                    audit::Verdict::Allow
                }
            }),
            since_ms: None,
            until_ms: None,
        }
    }
}

/// `mcp-tunnel bench`. Exits non-zero when any request failed (the report is printed first).
#[derive(clap::Args)]
struct BenchArgs {
    /// The MCP endpoint, e.g. http://127.0.0.1:8080/mcp/demo.
    #[arg(long)]
    url: String,
    /// Agent API key, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "MCP_TUNNEL_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Sessions to open in the legacy era (default: one per concurrent call); ignored when
    /// stateless.
    #[arg(long)]
    sessions: Option<usize>,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Stop after this many calls (default 1000 when --duration is not given).
    #[arg(long, conflicts_with = "duration")]
    calls: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// The tool to call.
    #[arg(long, default_value = "echo")]
    tool: String,
    /// The tool's arguments, as JSON.
    #[arg(long, conflicts_with = "payload")]
    args: Option<String>,
    /// Payload size in bytes: a string of that size sent to `echo`, or the size asked of `blob`.
    #[arg(long)]
    payload: Option<usize>,
    /// Protocol era: legacy (sessions) or stateless (2026-07-28).
    #[arg(
        long,
        default_value = bench::ERA_NAMES[0],
        value_parser = PossibleValuesParser::new(bench::ERA_NAMES).map(bench::era_named)
    )]
    era: mcp_tunnel::wire::Era,
    /// Seconds one request (with its whole answer) may take.
    #[arg(long, default_value_t = bench::DEFAULT_TIMEOUT.as_secs_f64())]
    timeout: f64,
    /// Print one JSON object instead of the table (and no progress bar).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ConnectArgs {
    /// A client configuration file (TOML); flags below override nothing in it.
    #[arg(long, conflicts_with_all = ["relay", "sources"])]
    config: Option<PathBuf>,
    /// The relay as HOST:PORT; repeat it (or separate with commas) for several relays. Every
    /// relay, and every address a relay name resolves to (looked up again every 30 s), gets at
    /// least one connection.
    #[arg(long, required_unless_present = "config")]
    relay: Vec<String>,
    /// CA certificate(s) to verify the relay with (default: the system roots).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The tunnel token.
    #[arg(long, env = "MCP_TUNNEL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Transport.
    #[arg(long, value_enum, default_value_t = TransportChoice::Auto)]
    transport: TransportChoice,
    /// HTTP CONNECT proxy for the HTTPS fallback (default: env HTTPS_PROXY).
    #[arg(long)]
    proxy: Option<String>,
    /// Connections held at once, at least (in total over all relay addresses).
    #[arg(long, default_value_t = mcp_tunnel::client::DEFAULT_CONNECTIONS)]
    connections: usize,
    /// Seconds between QUIC probes while on the HTTPS fallback.
    #[arg(long, default_value_t = mcp_tunnel::client::DEFAULT_PROBE_INTERVAL.as_secs())]
    probe_interval_secs: u64,
    /// A source: NAME=http://... or 'NAME=stdio:COMMAND ARG...' (repeatable).
    #[arg(long = "source", value_parser = SourceConfig::parse_flag)]
    sources: Vec<SourceConfig>,
}

#[derive(Subcommand)]
enum NewSecret {
    /// A fresh tunnel token and its config stanza, bound to the sources it may serve.
    New {
        /// The tenant it registers sources for.
        #[arg(long)]
        tenant: String,
        /// A source name the token may serve (repeatable); a tunnel with the token that
        /// announces any other source is refused.
        #[arg(long = "source", value_parser = parse_source_name)]
        sources: Vec<String>,
        /// Print the unbound form instead (`tunnel_tokens`: any source of the tenant; not
        /// recommended, any holder can then take over another team's source).
        #[arg(long, conflicts_with = "sources")]
        any_source: bool,
    },
}

#[derive(Subcommand)]
enum NewKey {
    /// A fresh agent API key and its config stanza.
    New {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// Who holds it.
        #[arg(long)]
        subject: String,
        /// Roles (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli.command)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with its causes: an operator's error, not a crash (no backtrace).
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A `--source` of `token new`: a source name agents can type.
fn parse_source_name(name: &str) -> Result<String, String> {
    mcp_tunnel::config::validate_source_name(name).map(|()| name.to_owned())
}

/// A token cancelled on Ctrl-C or SIGTERM.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    // The handlers are installed here, before the caller goes on to listen: installed inside
    // the task, a SIGTERM right after "relay listening" could find the default action (exit
    // without closing the audit trail) before the task first ran.
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()).expect("installing a SIGINT handler succeeds on Unix"),
            signal(SignalKind::terminate()).expect("installing a SIGTERM handler succeeds on Unix"),
        )
    };
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let (mut int, mut term) = signals;
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        cancel.cancel();
    });
    token
}

/// A notification poked on every SIGHUP: the relay reloads its configuration. The handler is
/// installed before the relay listens, so a SIGHUP never finds the default action (exit).
fn hangups() -> anyhow::Result<Arc<Notify>> {
    let notify = Arc::new(Notify::new());
    #[cfg(unix)]
    {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing a SIGHUP handler")?;
        let notify = notify.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                notify.notify_one();
            }
        });
    }
    Ok(notify)
}

/// Runs `mcp-tunnel bench` and prints its report.
async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use mcp_tunnel::bench::{BenchConfig, Stop};
    let seconds = |what: &str, secs: f64| {
        Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| !d.is_zero())
            .with_context(|| format!("{what} must be a positive number of seconds"))
    };
    let stop = match (args.calls, args.duration) {
        (_, Some(secs)) => Stop::Duration(seconds("--duration", secs)?),
        (Some(n), None) => Stop::Calls(n),
        (None, None) => Stop::Calls(1000),
    };
    let json_args = args
        .args
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .context("--args must be JSON")?;
    let config = BenchConfig {
        arguments: bench::arguments(&args.tool, json_args, args.payload)?,
        url: args.url,
        key: args.key,
        sessions: args.sessions.unwrap_or(args.concurrency),
        concurrency: args.concurrency,
        stop,
        tool: args.tool,
        era: args.era,
        timeout: seconds("--timeout", args.timeout)?,
        max_answer: bench::DEFAULT_MAX_ANSWER,
        progress: !args.json && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let report = bench::run(config).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    if report.errors > 0 {
        anyhow::bail!(
            "{} of {} requests failed (see errors by kind)",
            report.errors,
            report.ok + report.errors
        );
    }
    Ok(())
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Certs { out, hosts, force } => {
            let certs = mcp_tunnel::certs::generate(&hosts)?;
            mcp_tunnel::certs::write(&out, &certs, force)?;
            println!(
                "wrote {0}/ca.pem, {0}/relay.pem, {0}/relay.key",
                out.display()
            );
            Ok(())
        }
        Command::Relay {
            config,
            new_audit_epoch,
        } => relay(config, new_audit_epoch).await,
        Command::Connect(args) => connect(args).await,
        Command::Demo {
            listen,
            upstream_only,
            sse_answers,
        } => {
            use mcp_tunnel::demo::lean::Answers;
            let answers = if sse_answers {
                Answers::Sse
            } else {
                Answers::Json
            };
            demo(listen, upstream_only.then_some(answers)).await
        }
        Command::Token {
            command:
                NewSecret::New {
                    tenant,
                    sources,
                    any_source,
                },
        } => {
            new_token(&tenant, &sources, any_source);
            Ok(())
        }
        Command::Key {
            command:
                NewKey::New {
                    tenant,
                    subject,
                    roles,
                },
        } => {
            new_key(&tenant, &subject, &roles);
            Ok(())
        }
        Command::Audit { command } => run_audit(command).await,
        Command::Bench(args) => bench(args).await,
    }
}

/// `mcp-tunnel relay`: serves until a signal, reloading the configuration on change or SIGHUP.
async fn relay(path: PathBuf, new_audit_epoch: bool) -> anyhow::Result<()> {
    let hangup = hangups()?;
    let loaded = LoadedConfig::load(&path)?;
    let mut settings = RelaySettings::from_config(&loaded.config)?;
    if let Some(audit) = &mut settings.audit {
        audit.new_epoch = new_audit_epoch;
    }
    let relay = Relay::bind(settings).await?;
    let shutdown = shutdown_on_signals();
    let reloader = Reloader::new(path, relay.state().clone(), loaded);
    tokio::spawn(reload::watch(
        reloader,
        reload::POLL_INTERVAL,
        hangup,
        shutdown.clone(),
    ));
    relay.serve(shutdown).await?;
    Ok(())
}

/// `mcp-tunnel connect`: from a file, or from flags.
async fn connect(args: ConnectArgs) -> anyhow::Result<()> {
    let settings = match &args.config {
        Some(path) => {
            let mut settings = ClientSettings::from_file(&ClientFile::load(path)?, args.token)?;
            if args.ca.is_some() {
                settings.ca = args.ca;
            }
            settings
        }
        None => {
            let relay = args.relay.join(",");
            let token = args
                .token
                .context("a tunnel token is required: --token or MCP_TUNNEL_TOKEN")?;
            let mut settings = ClientSettings::new(relay, token, args.sources);
            settings.ca = args.ca;
            settings.transport = args.transport;
            settings.proxy = args.proxy;
            settings.connections = args.connections;
            settings.probe_interval = std::time::Duration::from_secs(args.probe_interval_secs);
            settings
        }
    };
    client::run(settings, shutdown_on_signals()).await?;
    Ok(())
}

/// `mcp-tunnel demo`: the whole product on loopback, or only its demo MCP server (answering
/// as `upstream_only` says).
async fn demo(
    listen: Option<SocketAddr>,
    upstream_only: Option<mcp_tunnel::demo::lean::Answers>,
) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signals();
    if let Some(answers) = upstream_only {
        let listen = listen.unwrap_or(mcp_tunnel::demo::DEFAULT_LISTEN);
        let addr = mcp_tunnel::demo::lean::serve(listen, answers, shutdown.clone())
            .await
            .with_context(|| {
                format!("cannot listen on {listen}; pick another address with --listen")
            })?;
        println!("demo MCP server: http://{addr}/mcp");
        shutdown.cancelled().await;
    } else {
        let demo = mcp_tunnel::demo::start(listen, shutdown.clone()).await?;
        println!(
            "mcp-tunnel demo: relay, connect and a demo MCP server (echo, add, blob, sleep) on loopback"
        );
        if demo.default_taken {
            println!(
                "{} is taken; serving on a free port instead (choose one with --listen)",
                mcp_tunnel::demo::DEFAULT_LISTEN
            );
        }
        println!("agent URL: {}", demo.agent_url);
        println!("API key: {}", demo.api_key);
        println!("live activity: {}/activity", demo.admin_url);
        println!("metrics: {}/metrics", demo.admin_url);
        println!(
            "audit trail: mcp-tunnel audit tail --follow --db {}",
            demo.audit_db.display()
        );
        println!(
            "try: npx @modelcontextprotocol/inspector --cli {} --transport http --header \"Authorization: Bearer {}\" --method tools/list",
            demo.agent_url, demo.api_key
        );
        println!(
            "Ctrl-C stops the demo and removes {} (audit trail and key)",
            demo.folder().display()
        );
        shutdown.cancelled().await;
        demo.finish().await;
    }
    Ok(())
}

/// `mcp-tunnel token new`: a tunnel token, and the relay configuration that admits it.
fn new_token(tenant: &str, sources: &[String], any_source: bool) {
    let token = new_secret("mcpt_tok_");
    println!("token: {token}");
    println!("# relay config, under [[tenants]] name = \"{tenant}\":");
    if any_source {
        println!("tunnel_tokens = [\"{}\"]", SecretHash::of(&token));
    } else {
        if sources.is_empty() {
            println!(
                "# list the sources this token may serve (or run again with --source NAME ...)"
            );
        }
        let quoted: Vec<String> = sources.iter().map(|s| format!("{s:?}")).collect();
        println!("[[tenants.tunnels]]");
        println!("token = \"{}\"", SecretHash::of(&token));
        println!("sources = [{}]", quoted.join(", "));
    }
}

/// `mcp-tunnel key new`: an agent key, and the relay configuration that admits it.
fn new_key(tenant: &str, subject: &str, roles: &[String]) {
    let key = new_secret("mcpt_key_");
    println!("key: {key}");
    println!("# relay config, after [[tenants]] name = \"{tenant}\":");
    println!("[[tenants.keys]]");
    println!("subject = {subject:?}");
    println!("roles = {roles:?}");
    println!("key = \"{}\"", SecretHash::of(&key));
}

async fn run_audit(command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Tail {
            trail,
            follow,
            filter,
            lines,
        } => {
            let trail = trail.open()?;
            let stop = shutdown_on_signals();
            let mut out = std::io::stdout().lock();
            trail
                .tail(
                    &filter.into_filter(),
                    lines,
                    follow,
                    &|| stop.is_cancelled(),
                    &mut out,
                )
                .await?;
        }
        AuditCommand::Export {
            trail,
            format: _,
            filter,
            since,
            until,
        } => {
            let trail = trail.open()?;
            let mut filter = filter.into_filter();
            filter.since_ms = since.as_deref().map(audit::query::parse_time).transpose()?;
            filter.until_ms = until.as_deref().map(audit::query::parse_time).transpose()?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            trail.export(&filter, &mut out).await?;
        }
        AuditCommand::Verify {
            trail,
            public_key,
            checkpoints,
        } => {
            let trail = trail.open()?;
            let keys = public_key
                .iter()
                .map(|path| audit::key::read_public_key(path))
                .collect::<Result<Vec<_>, _>>()?;
            let copy = match &checkpoints {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    Some(
                        audit::verify::read_offbox(&text)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                    )
                }
                None => None,
            };
            let report = trail.verify(&keys, copy.as_deref()).await?;
            println!("{report}");
            if let Some(problem) = report.problem {
                anyhow::bail!("audit verify failed: {problem}");
            }
        }
        AuditCommand::Checkpoints { trail, export } => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            trail.open()?.checkpoints(export, &mut out).await?;
        }
    }
    Ok(())
}
