//! The audit database's address: `postgresql://USER[:PASSWORD]@HOST:PORT/DB[?sslmode=...]`,
//! its password (from the URL, else `[audit] password_file`, else `PGPASSWORD`) and TLS.
//!
//! `sslmode` takes libpq's names. Whenever TLS is used the server's certificate is verified,
//! host name included, against `sslrootcert=FILE` or the system's trust store: `require` and
//! `verify-ca` are as strict as `verify-full` (the crate never skips verification).
//! `disable` connects in the clear and `prefer` uses TLS when the server offers it (both for a
//! database on loopback or a private socket; a warning says so for any other host). Without
//! `sslmode`, TLS is required unless every host is on this machine. The name logs and errors
//! give the database is built from the parsed address, never from the URL's text.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::govern::audit::AuditError;
use crate::transport::tls::{Roots, database_client_config};

/// How long connecting (TCP, TLS, authentication) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `sslmode`, as libpq names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// In the clear.
    Disable,
    /// TLS if the server offers it (verified), else in the clear.
    Prefer,
    /// `require`, `verify-ca`, `verify-full`: TLS, verified, or no connection.
    Require,
}

/// Where the audit database is and how to reach it.
#[derive(Clone)]
pub struct Target {
    config: Config,
    ssl: SslMode,
    root_cert: Option<PathBuf>,
    name: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("ssl", &self.ssl)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Reads `url`; without a password in it, the password is read from `password_file`
    /// (its first line) or the `PGPASSWORD` environment variable. Without `sslmode`, TLS is
    /// required unless every host is on loopback or a Unix socket (`prefer` then): libpq's
    /// default `prefer` lets anyone on the path answer "no TLS" and see the password.
    pub fn new(url: &str, password_file: Option<&Path>) -> Result<Self, AuditError> {
        // Until the URL is parsed, errors name it generically: it may hold a password.
        let bad = |message: String| AuditError::Database {
            path: "the audit database url".into(),
            message,
        };
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        if !(base.starts_with("postgresql://") || base.starts_with("postgres://")) {
            return Err(bad("the audit url must start with postgresql://".into()));
        }
        let mut ssl = None;
        let mut root_cert = None;
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=').unwrap_or((pair, "")) {
                ("sslmode", mode) => {
                    ssl = Some(match mode {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" | "verify-ca" | "verify-full" => SslMode::Require,
                        other => return Err(bad(format!("unknown sslmode {other:?}"))),
                    })
                }
                ("sslrootcert", file) => root_cert = Some(PathBuf::from(file)),
                _ => rest.push(pair),
            }
        }
        let stripped = if rest.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", rest.join("&"))
        };
        let mut config = Config::from_str(&stripped).map_err(|e| bad(describe(&e)))?;
        let name = display_name(&config);
        let local = config.get_hosts().iter().all(is_local);
        let ssl = match ssl {
            Some(mode) => {
                if mode != SslMode::Require && !local {
                    tracing::warn!(database = %name, ?mode, "sslmode lets the audit database connection run without TLS: anyone on the path can then read the password and the rows; use sslmode=verify-full");
                }
                mode
            }
            None if local => SslMode::Prefer,
            None => SslMode::Require,
        };
        if config.get_password().is_none() {
            if let Some(file) = password_file {
                let text = std::fs::read_to_string(file).map_err(|e| AuditError::Database {
                    path: name.clone().into(),
                    message: format!("password file {}: {e}", file.display()),
                })?;
                config.password(text.lines().next().unwrap_or_default());
            } else if let Ok(password) = std::env::var("PGPASSWORD") {
                config.password(password);
            }
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("mcp-tunnel");
        }
        config.ssl_mode(match ssl {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require => tokio_postgres::config::SslMode::Require,
        });
        Ok(Self {
            config,
            ssl,
            root_cert,
            name,
        })
    }

    /// The database's address without its password: for logs and errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connects, within [`CONNECT_TIMEOUT`]; the connection runs on a task of the current
    /// runtime until the client is dropped.
    pub async fn connect(&self) -> Result<Client, AuditError> {
        let failed = |message: String| AuditError::Database {
            path: self.name.clone().into(),
            message,
        };
        let connecting = async {
            if self.ssl == SslMode::Disable {
                let (client, connection) = self
                    .config
                    .connect(NoTls)
                    .await
                    .map_err(|e| failed(describe(&e)))?;
                tokio::spawn(watch(connection, self.name.clone()));
                return Ok(client);
            }
            let roots = match &self.root_cert {
                Some(file) => Roots::CaFile(file.clone()),
                None => Roots::System,
            };
            let tls = database_client_config(&roots).map_err(|e| failed(e.to_string()))?;
            let (client, connection) = self
                .config
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                .await
                .map_err(|e| failed(describe(&e)))?;
            tokio::spawn(watch(connection, self.name.clone()));
            Ok(client)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .unwrap_or_else(|_| Err(failed(format!("no connection within {CONNECT_TIMEOUT:?}"))))
    }
}

/// The driver's error with its cause (the server's message, the socket's error): its own
/// text alone is often just "db error".
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Runs a connection until it ends, logging why if it failed.
async fn watch<F>(connection: F, name: String)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(e) = connection.await {
        tracing::warn!(database = %name, error = %e, "audit database connection ended");
    }
}

/// The database as logs and errors name it, built from the parsed address so it can never
/// carry the password: `postgresql://USER@HOST:PORT/DB`.
fn display_name(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(dir) => dir.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    format!(
        "postgresql://{}@{}/{}",
        config.get_user().unwrap_or_default(),
        hosts.join(","),
        config.get_dbname().unwrap_or_default()
    )
}

/// Whether `host` is this machine: a loopback name or address, or a Unix socket.
fn is_local(host: &Host) -> bool {
    match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_never_carry_the_password_or_the_query() {
        let name = |url: &str| {
            Target::new(url, None)
                .expect("the test URL is valid")
                .name()
                .to_owned()
        };
        assert_eq!(
            name("postgresql://audit:s3cret@db.internal:5432/trail?sslmode=require"),
            "postgresql://audit@db.internal:5432/trail"
        );
        // A password with a slash (base64 passwords have them) stays out too.
        assert_eq!(
            name("postgresql://audit:ab/cd@db.internal:5432/trail"),
            "postgresql://audit@db.internal:5432/trail"
        );
        let target = Target::new("postgresql://audit:s3cret@db:5432/trail", None)
            .expect("the test URL is valid");
        assert!(!format!("{target:?}").contains("s3cret"));
        // Nor do errors before the address is understood.
        let err = Target::new("postgresql://audit:s3cret@db:notaport/trail", None).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn sslmode_takes_libpqs_names_and_verifies_whenever_tls_is_used() {
        let mode = |url: &str| Target::new(url, None).map(|t| t.ssl);
        // Without sslmode: TLS required, unless the database is on this machine.
        assert_eq!(
            mode("postgresql://u@h/db").expect("the test URL is valid"),
            SslMode::Require
        );
        assert_eq!(
            mode("postgresql://u@127.0.0.1/db").expect("the test URL is valid"),
            SslMode::Prefer
        );
        assert_eq!(
            mode("postgresql://u@localhost/db").expect("the test URL is valid"),
            SslMode::Prefer
        );
        assert_eq!(
            mode("postgresql://u@[::1]/db").expect("the test URL is valid"),
            SslMode::Prefer
        );
        assert_eq!(
            mode("postgresql://u@h/db?sslmode=prefer").expect("the test URL is valid"),
            SslMode::Prefer
        );
        assert_eq!(
            mode("postgresql://u@h/db?sslmode=disable").expect("the test URL is valid"),
            SslMode::Disable
        );
        for strict in ["require", "verify-ca", "verify-full"] {
            assert_eq!(
                mode(&format!("postgresql://u@h/db?sslmode={strict}"))
                    .expect("the test URL is valid"),
                SslMode::Require
            );
        }
        let err = mode("postgresql://u@h/db?sslmode=sometimes").unwrap_err();
        assert!(err.to_string().contains("unknown sslmode"), "{err}");
        assert!(Target::new("mysql://u@h/db", None).is_err());
    }

    #[test]
    fn the_password_comes_from_the_url_then_the_file() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").expect("write the password file");
        let target =
            Target::new("postgresql://u@h/db", Some(&file)).expect("the test URL is valid");
        assert_eq!(target.config.get_password(), Some(&b"from-file"[..]));
        let target =
            Target::new("postgresql://u:in-url@h/db", Some(&file)).expect("the test URL is valid");
        assert_eq!(target.config.get_password(), Some(&b"in-url"[..]));
        let missing = Target::new("postgresql://u@h/db", Some(&dir.path().join("nope")));
        assert!(missing.unwrap_err().to_string().contains("password file"));
    }
}
