//! Schema 1 trails (per-tenant checkpoints, no relay column), read as they were: each
//! checkpoint's signature and the row it names. And the relays that have rows but no
//! checkpoint chain of their own: schema 1 rows (a note, and their unsigned rows as warnings)
//! or, with no schema 1 checkpoint either, deleted checkpoints.
//!
//! Apart from the schema 2 checks because it reads another table with another signed message,
//! and only old or migrated trails have it.

use std::collections::{BTreeMap, HashMap};

use rusqlite::Connection;

use super::checkpoints::{RowLookup, Signed};
use super::report::{Problem, ProblemKind, Report};
use super::rows::Tail;
use crate::govern::audit::chain;

/// Per relay, per tenant, the highest seq a schema 1 checkpoint signs.
pub(super) type LegacySigned = HashMap<String, HashMap<String, u64>>;

/// One row of schema 1 checkpoints.
struct LegacyCheckpoint {
    id: i64,
    time_ms: i64,
    relay: String,
    tenant: String,
    seq: u64,
    hash: String,
    key: String,
    signature: String,
}

impl LegacyCheckpoint {
    /// Reads `id, time_ms, relay, tenant, seq, hash, public_key, signature`.
    fn read(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            time_ms: row.get(1)?,
            relay: row.get(2)?,
            tenant: row.get(3)?,
            seq: u64::try_from(row.get::<_, i64>(4)?).unwrap_or(0),
            hash: row.get(5)?,
            key: row.get(6)?,
            signature: row.get(7)?,
        })
    }

    /// What is wrong with it: its key, its signature, or the row it names.
    fn check(
        &self,
        keys: &[String],
        lookup: &mut RowLookup<'_>,
    ) -> Result<Option<(ProblemKind, String)>, crate::govern::audit::AuditError> {
        if !keys.is_empty() && !keys.contains(&self.key.to_ascii_lowercase()) {
            return Ok(Some((
                ProblemKind::UnknownKey,
                format!("signed by key {}, not the given public key", self.key),
            )));
        }
        let message = chain::checkpoint_message(
            &self.tenant,
            self.seq,
            &self.hash,
            u64::try_from(self.time_ms).unwrap_or(0),
        );
        if !crate::govern::audit::key::verify(&self.key, &message, &self.signature) {
            return Ok(Some((
                ProblemKind::BadSignature,
                "the signature does not verify".into(),
            )));
        }
        Ok(match lookup(&self.relay, &self.tenant, self.seq)? {
            Some(stored) if stored == self.hash => None,
            Some(_) => Some((
                ProblemKind::CheckpointMismatch,
                "the signed hash differs from the row's".into(),
            )),
            None => Some((
                ProblemKind::CheckpointMismatch,
                "the signed row is missing (rows cut from the end)".into(),
            )),
        })
    }
}

/// Checks schema 1 checkpoints (per tenant: signature, and the row they name), setting
/// `report.problem` at the first bad one; returns per relay, per tenant, the highest seq they
/// sign.
pub(super) fn legacy_checkpoints(
    tx: &Connection,
    v1: bool,
    keys: &[String],
    report: &mut Report,
    lookup: &mut RowLookup<'_>,
) -> Result<LegacySigned, crate::govern::audit::AuditError> {
    // Kept as it was: these errors name no file.
    let err = |e: rusqlite::Error| crate::govern::audit::AuditError::Database {
        path: Default::default(),
        message: e.to_string(),
    };
    let sql = if v1 {
        "SELECT id, time_ms, '' AS relay, tenant, seq, hash, public_key, signature FROM \
         checkpoints ORDER BY id"
    } else {
        "SELECT id, time_ms, relay, tenant, seq, hash, public_key, signature FROM \
         legacy_checkpoints ORDER BY id"
    };
    let mut signed: LegacySigned = HashMap::new();
    let mut stmt = tx.prepare(sql).map_err(err)?;
    let mut rows = stmt.query([]).map_err(err)?;
    while let Some(row) = rows.next().map_err(err)? {
        let cp = LegacyCheckpoint::read(row).map_err(err)?;
        if let Some((kind, detail)) = cp.check(keys, lookup)? {
            report.problem = Some(Problem::row(
                &cp.relay,
                &cp.tenant,
                cp.seq,
                cp.id,
                kind,
                format!("schema 1 checkpoint: {detail}"),
            ));
            break;
        }
        let top = signed
            .entry(cp.relay)
            .or_default()
            .entry(cp.tenant)
            .or_default();
        *top = (*top).max(cp.seq);
        report.checkpoints += 1;
    }
    Ok(signed)
}

/// Relays with rows but none of their own checkpoints: schema 1 rows (noted, with their
/// unsigned rows as warnings), or deleted checkpoints (the problem).
pub(super) fn check_unchained_relays(
    relay_rows: &BTreeMap<String, u64>,
    signed: &Signed,
    legacy: &LegacySigned,
    tails: &HashMap<(String, String), Tail>,
    report: &mut Report,
) -> Option<Problem> {
    for (relay, count) in relay_rows {
        if signed.relays.contains_key(relay) {
            continue;
        }
        let Some(signed) = legacy.get(relay) else {
            return Some(Problem::relay(
                relay,
                ProblemKind::NoCheckpoint,
                format!(
                    "{count} rows of this relay and not one checkpoint of it (a relay signs one \
                     before its first row): its checkpoints were deleted"
                ),
            ));
        };
        report.notes.push(format!(
            "relay {relay:?}: {count} rows of a schema 1 trail, signed by per-tenant \
             checkpoints only (they cannot show a deleted tail or tenant); a relay of this \
             version migrates the trail and chains its checkpoints"
        ));
        let mut unsigned: Vec<String> = tails
            .iter()
            .filter(|((r, _), _)| r == relay)
            .filter_map(|((_, tenant), t)| {
                let signed = signed.get(tenant).copied().unwrap_or(0);
                (t.seq > signed).then(|| {
                    format!(
                        "relay {relay:?} tenant {tenant:?}: rows {} to {} are after the last \
                         checkpoint (unsigned)",
                        signed + 1,
                        t.seq
                    )
                })
            })
            .collect();
        unsigned.sort();
        report.warnings.extend(unsigned);
    }
    None
}
