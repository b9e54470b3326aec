//! The off-box copy of the checkpoints (`--checkpoints FILE`, `[audit] checkpoint_file`):
//! every checkpoint in it must verify and be in the trail, identical. Without it, a trail
//! rewritten whole with another key, or cut back to an earlier checkpoint together with
//! everything after, cannot be told from an intact one.

use rusqlite::{Connection, OptionalExtension};

use super::report::{Problem, ProblemKind, Report};
use crate::govern::audit::checkpoint::Checkpoint;

/// Checks the trail against the off-box copy: each checkpoint there must verify and be in the
/// trail, identical.
pub(super) fn check_offbox(
    copy: &[Checkpoint],
    keys: &[String],
    conn: &Connection,
    report: &mut Report,
) -> rusqlite::Result<Option<Problem>> {
    let mut matched = 0u64;
    for (line, cp) in copy.iter().enumerate() {
        let problem = |detail: String| {
            Problem::checkpoint(&cp.relay, cp.n, 0, ProblemKind::OffBoxMismatch, detail)
        };
        let line = line + 1;
        if !cp.signature_valid()
            || (!keys.is_empty() && !keys.contains(&cp.public_key.to_ascii_lowercase()))
        {
            return Ok(Some(problem(format!(
                "line {line} of the copy is not signed by {}",
                if keys.is_empty() {
                    "the key it names"
                } else {
                    "a given public key"
                }
            ))));
        }
        // Every stored checkpoint's hash column was checked against what it signs.
        let in_trail: Option<(String, String)> = conn
            .query_row(
                "SELECT hash, public_key FROM checkpoints WHERE relay = ?1 AND n = ?2",
                rusqlite::params![cp.relay, i64::try_from(cp.n).unwrap_or(i64::MAX)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match in_trail {
            None => {
                return Ok(Some(problem(format!(
                    "line {line} of the copy is not in the trail (the trail was cut back or \
                     replaced)"
                ))));
            }
            Some((hash, key)) if !hash.eq_ignore_ascii_case(&cp.hash()) => {
                return Ok(Some(problem(format!(
                    "line {line} of the copy differs from the trail's checkpoint (the trail was \
                     rewritten{})",
                    if !key.eq_ignore_ascii_case(&cp.public_key) {
                        ", with another key"
                    } else {
                        ""
                    }
                ))));
            }
            Some(_) => matched += 1,
        }
    }
    report
        .notes
        .push(format!("{matched} checkpoints match the off-box copy"));
    Ok(None)
}

/// Reads an off-box copy: one checkpoint JSON object a line (blank lines skipped).
pub fn read_offbox(text: &str) -> Result<Vec<Checkpoint>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| format!("line {}: not a checkpoint: {e}", i + 1))
        })
        .collect()
}
