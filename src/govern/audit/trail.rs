//! Which trail a command reads, and the readers over it: a relay's SQLite file ([`super::query`],
//! [`super::verify()`]) or the fleet's PostgreSQL database ([`super::postgres::read`],
//! [`super::postgres::mirror`]). The CLI's `--db` names one [`Trail`]; each backend stays in its
//! own module.
//!
//! The SQLite readers block the calling task (SQLite has no async reads): these are commands'
//! readers, run on the CLI's multi-threaded runtime, never on a relay's.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::checkpoint::Checkpoint;
use super::postgres::{Target, mirror, read};
use super::query::Filter;
use super::verify::Report;
use super::{AuditError, query};

/// An audit trail to read.
#[derive(Debug)]
pub enum Trail {
    /// A relay's SQLite file (or its spool).
    Sqlite(PathBuf),
    /// The fleet's database.
    Postgres(Box<Target>),
}

impl Trail {
    /// `--db`: a `postgresql://` (or `postgres://`) URL, its password from the URL,
    /// `password_file` or `PGPASSWORD`; any other `scheme://` is refused; anything else is a
    /// SQLite file (`password_file` is then refused).
    pub fn open(db: &str, password_file: Option<&Path>) -> Result<Self, AuditError> {
        if db.starts_with("postgresql://") || db.starts_with("postgres://") {
            return Ok(Self::Postgres(Box::new(Target::new(db, password_file)?)));
        }
        if let Some((scheme, _)) = db.split_once("://") {
            return Err(AuditError::Argument(format!(
                "{scheme}:// is not a trail: give a SQLite file or a postgresql:// URL"
            )));
        }
        if password_file.is_some() {
            return Err(AuditError::Argument(
                "--password-file is for a postgresql:// --db".into(),
            ));
        }
        Ok(Self::Sqlite(PathBuf::from(db)))
    }

    /// `audit tail`: the last `n` matching rows as lines; with `follow`, then new ones until
    /// `stop` returns true.
    pub async fn tail(
        &self,
        filter: &Filter,
        n: usize,
        follow: bool,
        stop: &dyn Fn() -> bool,
        out: &mut dyn Write,
    ) -> Result<(), AuditError> {
        match self {
            Self::Sqlite(path) => query::tail(path, filter, n, follow, stop, out),
            Self::Postgres(target) => read::tail(target, filter, n, follow, stop, out).await,
        }
    }

    /// `audit export`: every matching row, one JSON line each; returns how many.
    pub async fn export(&self, filter: &Filter, out: &mut dyn Write) -> Result<u64, AuditError> {
        match self {
            Self::Sqlite(path) => query::export(path, filter, out),
            Self::Postgres(target) => read::export(target, filter, out).await,
        }
    }

    /// `audit verify`, with the trusted `keys` (hex) and the off-box copy of the checkpoints.
    pub async fn verify(
        &self,
        keys: &[String],
        offbox: Option<&[Checkpoint]>,
    ) -> Result<Report, AuditError> {
        match self {
            Self::Sqlite(path) => super::verify(path, keys, offbox),
            Self::Postgres(target) => mirror::verify(target, keys, offbox).await,
        }
    }

    /// `audit checkpoints`: every relay's checkpoints as lines, or JSON lines with `json`;
    /// returns how many.
    pub async fn checkpoints(&self, json: bool, out: &mut dyn Write) -> Result<u64, AuditError> {
        match self {
            Self::Sqlite(path) => query::checkpoints(path, json, out),
            Self::Postgres(target) => read::checkpoints(target, json, out).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_is_a_postgresql_url_or_a_file_and_nothing_else() {
        assert!(matches!(
            Trail::open("postgresql://u@h/db", None),
            Ok(Trail::Postgres(_))
        ));
        assert!(matches!(
            Trail::open("postgres://u@h/db", None),
            Ok(Trail::Postgres(_))
        ));
        assert!(matches!(
            Trail::open("audit.db", None),
            Ok(Trail::Sqlite(_))
        ));
        let err = Trail::open("mysql://u@h/db", None).unwrap_err();
        assert!(err.to_string().contains("mysql:// is not a trail"), "{err}");
        let err = Trail::open("audit.db", Some(Path::new("pw"))).unwrap_err();
        assert!(err.to_string().contains("--password-file"), "{err}");
    }
}
