//! A PostgreSQL server of the test's own: a cluster made with `initdb` in a temporary folder,
//! listening on a free loopback port (and a socket in that folder), started and stopped with
//! `pg_ctl` (as the `postgres` user when the tests run as root: `initdb` refuses root), and
//! stopped when dropped. CI installs Debian's `postgresql` (scripts/install-peers.sh).

use std::path::{Path, PathBuf};
use std::process::Command;

/// One running cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    running: bool,
    /// Whether commits are flushed to disk (off for tests: they never crash the machine).
    fsync: bool,
    /// `-c` settings of TLS, when it serves TLS.
    tls: Option<String>,
}

/// The folder of PostgreSQL's server programs: `pg_config --bindir`, else Debian's
/// `/usr/lib/postgresql/N/bin` (the newest).
fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return dir;
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (Debian's postgresql; scripts/install-peers.sh)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("a PostgreSQL version with initdb under /usr/lib/postgresql")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// `program` from `bin` with `args`, as `postgres` when we are root.
fn as_owner(bin: &Path, program: &str, args: &[&str]) -> Command {
    let path = bin.join(program);
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    };
    command.args(args);
    command
}

fn run(mut command: Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    /// Makes a cluster (user `postgres`, trust authentication on loopback) and starts it,
    /// with `fsync` off.
    pub fn start() -> Self {
        Self::start_with(false, None)
    }

    /// [`Postgres::start`] with commits flushed to disk as in production (benchmarks).
    pub fn start_durable() -> Self {
        Self::start_with(true, None)
    }

    /// [`Postgres::start`] serving TLS (as well as plain connections) with this certificate
    /// chain and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(false, Some((cert_pem, key_pem)))
    }

    fn start_with(fsync: bool, tls: Option<(&str, &str)>) -> Self {
        let bin = bin_dir();
        let dir = tempfile::tempdir().expect("temp dir");
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["postgres"]).arg(dir.path());
                    c
                },
                "chown the cluster folder to postgres",
            );
        }
        let data = dir.path().join("data");
        let data_arg = data.to_str().expect("UTF-8 temp path").to_owned();
        run(
            as_owner(
                &bin,
                "initdb",
                &[
                    "-D",
                    &data_arg,
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                ],
            ),
            "initdb",
        );
        let tls = tls.map(|(cert, key)| {
            let (cert_file, key_file) =
                (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&cert_file, cert).expect("write the server certificate");
            std::fs::write(&key_file, key).expect("write the server key");
            // The server refuses a key others can read; it must own it.
            std::fs::set_permissions(
                &key_file,
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .expect("key mode 0600");
            if is_root() {
                let mut chown = Command::new("chown");
                chown.arg("postgres").arg(&cert_file).arg(&key_file);
                run(chown, "chown the TLS files to postgres");
            }
            format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert_file.display(),
                key_file.display()
            )
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut postgres = Self {
            dir,
            bin,
            port,
            running: false,
            fsync,
            tls,
        };
        postgres.resume();
        postgres
    }

    fn pg_ctl(&self, args: &[&str], what: &str) {
        let data = self.dir.path().join("data");
        let mut all = vec!["-D", data.to_str().expect("UTF-8 temp path")];
        all.extend_from_slice(args);
        run(as_owner(&self.bin, "pg_ctl", &all), what);
    }

    /// Starts it again after [`Postgres::pause`] (waits until it accepts connections).
    pub fn resume(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={}{}",
            self.port,
            self.dir.path().display(),
            if self.fsync { "on" } else { "off" },
            self.tls.as_deref().unwrap_or_default()
        );
        let log = self.dir.path().join("server.log");
        let log = log.to_str().expect("UTF-8 temp path").to_owned();
        self.pg_ctl(
            &["-o", &options, "-l", &log, "-w", "-t", "60", "start"],
            "pg_ctl start",
        );
        self.running = true;
    }

    /// Stops it (fast shutdown: connections are cut), keeping its data.
    pub fn pause(&mut self) {
        self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "stop"], "pg_ctl stop");
        self.running = false;
    }

    /// CPU time so far (µs) of the server: its postmaster and the processes it started (a
    /// backend per connection, the WAL writer, ...), from `/proc`.
    pub fn cpu_micros(&self) -> u64 {
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        let Some(postmaster) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<i32>().ok())
        else {
            return 0;
        };
        let parent = |pid: i32| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok())
        };
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid == postmaster || parent(pid) == Some(postmaster))
            .map(super::cpu_micros)
            .sum()
    }

    /// A `postgresql://` URL for database `postgres` as user `postgres`.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let data = self.dir.path().join("data");
            let data = data.to_str().unwrap_or_default().to_owned();
            let _ = as_owner(
                &self.bin,
                "pg_ctl",
                &["-D", &data, "-m", "immediate", "-w", "stop"],
            )
            .output();
        }
    }
}

/// One row of the database's `records`, as the tests read it.
#[derive(Debug, Clone)]
pub struct PgRow {
    pub relay: String,
    pub tenant: String,
    pub seq: i64,
    pub spool_id: i64,
    /// The record's JSON.
    pub record: serde_json::Value,
}

/// A client of the database at `url` (no TLS: the test cluster is on loopback).
pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio::time::timeout(
        super::WAIT,
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .expect("connects in time")
    .expect("connects");
    tokio::spawn(connection);
    client
}

/// Every row of the trail in the database at `url`, by relay, tenant and seq.
pub async fn rows(url: &str) -> Vec<PgRow> {
    client(url)
        .await
        .query(
            "SELECT relay, tenant, seq, spool_id, record FROM records ORDER BY relay, tenant, seq",
            &[],
        )
        .await
        .expect("read the records")
        .iter()
        .map(|row| PgRow {
            relay: row.get(0),
            tenant: row.get(1),
            seq: row.get(2),
            spool_id: row.get(3),
            record: serde_json::from_slice(row.get::<_, &[u8]>(4)).expect("a record is JSON"),
        })
        .collect()
}

/// Every chain of `rows` (sorted by relay, tenant, seq) runs 1, 2, 3, ... with no gap or
/// repeat, in the order its relay wrote it (spool ids rise with seq).
pub fn assert_chains_whole(rows: &[PgRow]) {
    for pair in rows.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if (a.relay.as_str(), a.tenant.as_str()) != (b.relay.as_str(), b.tenant.as_str()) {
            assert_eq!(b.seq, 1, "chain {} {} starts at 1", b.relay, b.tenant);
            continue;
        }
        assert_eq!(
            b.seq,
            a.seq + 1,
            "chain {} {} has no gap: {a:?} {b:?}",
            a.relay,
            a.tenant
        );
        assert!(b.spool_id > a.spool_id, "order kept: {a:?} then {b:?}");
    }
    if let Some(first) = rows.first() {
        assert_eq!(first.seq, 1);
    }
}

/// Rows of the SQLite trail (spool) at `path`.
pub fn spool_rows(path: &Path) -> i64 {
    rusqlite::Connection::open(path)
        .expect("open the spool")
        .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .expect("count the spool's rows")
}
