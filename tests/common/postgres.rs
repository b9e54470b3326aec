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
    /// Makes a cluster (user `postgres`, trust authentication on loopback) and starts it.
    pub fn start() -> Self {
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
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut postgres = Self {
            dir,
            bin,
            port,
            running: false,
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
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
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
