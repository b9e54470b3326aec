//! Configuration files: the relay's and `connect`'s, in TOML.
//!
//! The schema and nothing else: every section with its defaults, parsed and checked for what
//! serde cannot check (ranges, duplicates, one-of pairs). This module imports nothing else of
//! the crate; the relay and `connect` turn what it reads into their own settings (the relay's
//! governance in `relay::governance`, the audit trail's `AuditSettings`), so the schema never
//! depends on the code it configures.
//!
//! Unknown keys are errors (the message names the key and its line). Secrets appear only as
//! `sha256:` digests in the relay's file; `connect`'s token may come from the environment.

mod audit;
mod client;
mod limits;
mod relay;

use std::path::{Path, PathBuf};

pub use audit::*;
pub use client::*;
pub use limits::*;
pub use relay::*;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (the message has the key and line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
    /// The file parsed but says something impossible.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

pub(crate) fn parse_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string(),
    })
}

/// Checks that a source name is one URL path segment agents can type.
pub fn validate_source_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(format!(
            "source name {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}
