//! The checkpoint chains (see [`crate::govern::audit::checkpoint`]) in schema 2 trails: each
//! relay's checkpoints are numbered 1, 2, 3, ..., each links to the hash of the one before,
//! every signature verifies (by one of the given keys, if any) and no tenant's head goes back.
//! Then, once the rows are walked: what the kept checkpoints sign is still there, and rows
//! left unsigned are a crash tail, not deleted checkpoints.
//!
//! Apart from the row walk because it reads the other table and keeps only what the rows are
//! later measured against ([`Signed`]), not every checkpoint.

use std::collections::{BTreeMap, HashMap};

use rusqlite::Connection;

use super::clock::TailClock;
use super::report::{Problem, ProblemKind, Report};
use super::rows::Tail;
use super::when;
use crate::govern::audit::AuditError;
use crate::govern::audit::checkpoint::{Checkpoint, GENESIS_HEX, Kind};
use crate::govern::audit::store::{self, StoredCheckpoint};

/// What the scan keeps of a relay's checkpoints (not all of them: a year of one-minute
/// checkpoints is half a million): the last, and each epoch checkpoint with the one before it
/// (in number order), with row ids. The heads of all of these are checked against the rows.
pub(super) struct RelayCheckpoints {
    pub(super) last: (i64, Checkpoint),
    epochs: Vec<(i64, Checkpoint)>,
}

/// An epoch checkpoint and what the rows it newly signed are measured against.
pub(super) struct EpochSegment {
    pub(super) relay: String,
    /// The epoch checkpoint's number.
    n: u64,
    /// Per tenant: the rows after `from` up to `to` were first signed by the epoch checkpoint.
    pub(super) ranges: HashMap<String, (u64, u64)>,
    pub(super) clock: TailClock,
}

/// What the checkpoint chains say, for the row walk and the checks after it.
#[derive(Default)]
pub(super) struct Signed {
    /// Per relay, its kept checkpoints.
    pub(super) relays: BTreeMap<String, RelayCheckpoints>,
    /// The epoch checkpoints, in the order read.
    pub(super) segments: Vec<EpochSegment>,
}

impl Signed {
    /// The relay's last checkpoint (and its row id), if it has any.
    pub(super) fn last(&self, relay: &str) -> Option<&(i64, Checkpoint)> {
        self.relays.get(relay).map(|cps| &cps.last)
    }

    /// Keeps `cp` (row `id`) as its relay's last checkpoint; an epoch checkpoint is kept too,
    /// with the one before it.
    fn keep(&mut self, id: i64, cp: Checkpoint) {
        match self.relays.get_mut(&cp.relay) {
            Some(chain) => {
                if cp.kind == Kind::Epoch {
                    // The state the relay found and did not vouch for: what it signed must
                    // still be there, or the epoch would launder a rewrite.
                    if chain.epochs.last().map(|e| e.1.n) != Some(chain.last.1.n) {
                        chain.epochs.push(chain.last.clone());
                    }
                    chain.epochs.push((id, cp.clone()));
                }
                chain.last = (id, cp);
            }
            None => {
                let epochs = if cp.kind == Kind::Epoch {
                    vec![(id, cp.clone())]
                } else {
                    Vec::new()
                };
                self.relays.insert(
                    cp.relay.clone(),
                    RelayCheckpoints {
                        last: (id, cp),
                        epochs,
                    },
                );
            }
        }
    }
}

/// Reads every checkpoint of the schema 2 trail (relay by relay, in number order, streaming)
/// and checks them with [`check_checkpoints`].
pub(super) fn read_checkpoints(
    tx: &Connection,
    keys: &[String],
    signed: &mut Signed,
    report: &mut Report,
) -> rusqlite::Result<Option<Problem>> {
    let mut stmt = tx.prepare(&format!(
        "SELECT {} FROM checkpoints ORDER BY relay, n, id",
        store::CHECKPOINT_COLUMNS
    ))?;
    let stored = stmt.query_map([], store::read_checkpoint)?;
    check_checkpoints(stored, keys, signed, report)
}

/// Checks each relay's checkpoint chain (numbering, links, signatures, keys, heads never
/// going back), filling `signed`; returns the first problem.
fn check_checkpoints(
    stored: impl Iterator<Item = rusqlite::Result<StoredCheckpoint>>,
    keys: &[String],
    signed: &mut Signed,
    report: &mut Report,
) -> rusqlite::Result<Option<Problem>> {
    let mut crashes: BTreeMap<String, u64> = BTreeMap::new();
    for sc in stored {
        let StoredCheckpoint {
            id,
            relay,
            n,
            stored_hash,
            checkpoint,
        } = sc?;
        let cp = match checkpoint {
            Ok(cp) => cp,
            Err(e) => {
                return Ok(Some(Problem::checkpoint(
                    &relay,
                    n,
                    id,
                    ProblemKind::InvalidCheckpoint,
                    e,
                )));
            }
        };
        let previous = signed.last(&cp.relay).map(|(_, last)| last);
        let problem = |kind, detail| Problem::checkpoint(&relay, n, id, kind, detail);
        if let Some(problem) = check_link(&cp, &stored_hash, previous, keys, problem) {
            return Ok(Some(problem));
        }
        if let Some(previous) = previous
            && matches!(cp.kind, Kind::Start | Kind::Epoch)
            && previous.kind != Kind::Close
        {
            *crashes.entry(cp.relay.clone()).or_default() += 1;
        }
        if let Some(segment) = note_kind(&cp, previous, report) {
            signed.segments.push(segment);
        }
        report.checkpoints += 1;
        signed.keep(id, cp);
    }
    for (relay, count) in crashes {
        report.notes.push(format!(
            "relay {relay:?}: {count} runs ended without a close checkpoint (a crash or kill; \
             their unsigned rows were signed by the next start)"
        ));
    }
    Ok(None)
}

/// Checks one checkpoint on its own and as the successor of `previous` (the relay's checkpoint
/// before it, if any): key, signature, hash column, number, link, heads.
fn check_link(
    cp: &Checkpoint,
    stored_hash: &str,
    previous: Option<&Checkpoint>,
    keys: &[String],
    problem: impl Fn(ProblemKind, String) -> Problem,
) -> Option<Problem> {
    if !keys.is_empty() && !keys.contains(&cp.public_key.to_ascii_lowercase()) {
        return Some(problem(
            ProblemKind::UnknownKey,
            format!(
                "signed by key {}, not the given public key{}",
                cp.public_key,
                if keys.len() > 1 { "s" } else { "" }
            ),
        ));
    }
    if !cp.signature_valid() {
        return Some(problem(
            ProblemKind::BadSignature,
            "the signature does not verify".into(),
        ));
    }
    if !stored_hash.eq_ignore_ascii_case(&cp.hash()) {
        return Some(problem(
            ProblemKind::CheckpointMismatch,
            "the hash column is not the hash of the signed checkpoint".into(),
        ));
    }
    let expected = previous.map_or(1, |p| p.n.saturating_add(1));
    if cp.n < expected {
        return Some(problem(
            ProblemKind::CheckpointChainBroken,
            format!("expected checkpoint {expected} here: numbers repeat or run backwards"),
        ));
    }
    if cp.n != expected {
        let missing = if cp.n == expected + 1 {
            format!("checkpoint {expected} is missing")
        } else {
            format!("checkpoints {expected} to {} are missing", cp.n - 1)
        };
        return Some(problem(
            ProblemKind::CheckpointGap,
            format!("{missing} (deleted checkpoints)"),
        ));
    }
    let expected_prev = previous.map_or_else(|| GENESIS_HEX.to_owned(), Checkpoint::hash);
    if !cp.prev.eq_ignore_ascii_case(&expected_prev) {
        return Some(problem(
            ProblemKind::CheckpointChainBroken,
            format!(
                "it does not follow checkpoint {} (its previous hash is not that one's)",
                cp.n.saturating_sub(1)
            ),
        ));
    }
    let previous = previous?;
    previous
        .heads
        .iter()
        .find_map(|head| match cp.head(&head.tenant) {
            Some(now) if now.seq >= head.seq => None,
            _ => Some(Problem {
                tenant: Some(head.tenant.clone()),
                ..problem(
                    ProblemKind::CheckpointMismatch,
                    format!(
                        "the tenant's head went back from seq {} of checkpoint {}",
                        head.seq, previous.n
                    ),
                )
            }),
        })
}

/// Reports what the checkpoint's kind tells an auditor (an epoch's reason, a start's note);
/// returns the segment of rows an epoch checkpoint signed first.
fn note_kind(
    cp: &Checkpoint,
    previous: Option<&Checkpoint>,
    report: &mut Report,
) -> Option<EpochSegment> {
    match cp.kind {
        Kind::Epoch => {
            report.warnings.push(format!(
                "relay {:?} began epoch {} at checkpoint {} ({}) because the trail did not \
                 verify: {}",
                cp.relay,
                cp.epoch,
                cp.n,
                when(cp.time_ms),
                cp.note
            ));
            let ranges = cp
                .heads
                .iter()
                .map(|h| {
                    let from = previous
                        .and_then(|p| p.head(&h.tenant))
                        .map_or(0, |p| p.seq);
                    (h.tenant.clone(), (from, h.seq))
                })
                .collect();
            Some(EpochSegment {
                relay: cp.relay.clone(),
                n: cp.n,
                ranges,
                clock: TailClock::new(
                    previous.map(|p| p.time_ms),
                    previous.map_or(cp.interval_ms, |p| p.interval_ms),
                ),
            })
        }
        Kind::Start if !cp.note.is_empty() => {
            report.notes.push(format!(
                "relay {:?} checkpoint {} ({}): {}",
                cp.relay,
                cp.n,
                when(cp.time_ms),
                cp.note
            ));
            None
        }
        _ => None,
    }
}

/// Finds the hash of row (relay, tenant, seq), if it exists.
pub(super) type RowLookup<'a> =
    dyn FnMut(&str, &str, u64) -> Result<Option<String>, AuditError> + 'a;

/// What the last checkpoints (and epoch checkpoints) sign must be there: every head names a
/// tenant with rows left, a chain at least that long, and the row's hash.
pub(super) fn check_signed_heads(
    signed: &Signed,
    tails: &HashMap<(String, String), Tail>,
    lookup: &mut RowLookup<'_>,
) -> Result<Option<Problem>, AuditError> {
    for (relay, cps) in &signed.relays {
        let last_kept = cps.epochs.last().map(|e| e.1.n) == Some(cps.last.1.n);
        let signing = cps.epochs.iter().chain((!last_kept).then_some(&cps.last));
        for (id, cp) in signing {
            for head in &cp.heads {
                let problem = |kind, detail: String| Problem {
                    checkpoint: Some(cp.n),
                    ..Problem::row(relay, &head.tenant, head.seq, *id, kind, detail)
                };
                let found = match tails.get(&(relay.clone(), head.tenant.clone())) {
                    None => Some(problem(
                        ProblemKind::TenantVanished,
                        format!(
                            "the checkpoint signs {} rows of this tenant and none is left (its \
                             rows were deleted)",
                            head.seq
                        ),
                    )),
                    Some(tail) if tail.seq < head.seq => Some(problem(
                        ProblemKind::CheckpointMismatch,
                        format!(
                            "the signed row is missing (rows cut from the end: the chain ends at \
                             seq {})",
                            tail.seq
                        ),
                    )),
                    Some(_) => match lookup(relay, &head.tenant, head.seq)? {
                        Some(stored) if stored.eq_ignore_ascii_case(&head.hash) => None,
                        _ => Some(problem(
                            ProblemKind::CheckpointMismatch,
                            "the signed hash differs from the row's (the chain was rewritten)"
                                .into(),
                        )),
                    },
                };
                if found.is_some() {
                    return Ok(found);
                }
            }
        }
    }
    Ok(None)
}

/// Rows that stayed unsigned: a crash tail (a warning), or deleted checkpoints (the problem).
/// `clocks` are the relays' clocks over the rows after their last checkpoints.
pub(super) fn check_unsigned(
    signed: &Signed,
    clocks: &HashMap<String, TailClock>,
    report: &mut Report,
) -> Option<Problem> {
    for segment in &signed.segments {
        if let Some((id, tenant, seq, detail)) = segment.clock.failure(&format!(
            "rows first signed by epoch checkpoint {} had no earlier checkpoint",
            segment.n
        )) {
            return Some(Problem {
                checkpoint: Some(segment.n),
                ..Problem::row(
                    &segment.relay,
                    &tenant,
                    seq,
                    id,
                    ProblemKind::UnsignedTail,
                    detail,
                )
            });
        }
    }
    for (relay, clock) in clocks {
        let Some((_, last)) = signed.last(relay) else {
            continue;
        };
        if let Some((id, tenant, seq, detail)) = clock.failure(&format!(
            "after the relay's last checkpoint {} ({})",
            last.n,
            when(last.time_ms)
        )) {
            return Some(Problem::row(
                relay,
                &tenant,
                seq,
                id,
                ProblemKind::UnsignedTail,
                detail,
            ));
        }
        if clock.rows > 0 {
            report.warnings.push(format!(
                "relay {relay:?}: {} rows after its last checkpoint {} ({}) are unsigned: a \
                 crash tail (shorter than one checkpoint interval) or a relay still writing; a \
                 running relay signs them within {} s",
                clock.rows,
                last.n,
                when(last.time_ms),
                last.interval_ms / 1000
            ));
        }
    }
    None
}
