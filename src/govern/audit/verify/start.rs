//! What a relay checks of its own chains before writing to a trail ([`check_start`]), so it
//! never signs over a changed or cut trail: its last checkpoint, the heads it signs, and the
//! unsigned rows after it. Unlike `verify` it reads only this relay's rows, through the
//! indexes, and answers with the first reason the trail does not verify.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension};

use super::clock::TailClock;
use super::when;
use crate::govern::audit::Record;
use crate::govern::audit::chain::{self, GENESIS};
use crate::govern::audit::checkpoint::Checkpoint;
use crate::govern::audit::store::{Head, StoredCheckpoint};

/// A check's answer: `Ok(Err(why))` when the trail does not verify.
type Verdict = rusqlite::Result<Result<(), String>>;

/// What a relay checks before writing to a trail (its own chains only): its last checkpoint
/// is signed by its own key, numbered and linked after the one before; every head it names is
/// there, unchanged; the rows after it chain on from those heads and are a crash tail by the
/// unsigned-rows test; and rows of the relay with no checkpoint at all are only schema 1 rows
/// whose last per-tenant checkpoints verify. `Ok(Err(why))` when the trail does not verify.
pub fn check_start(
    conn: &Connection,
    relay: &str,
    own_key: &str,
    heads: &HashMap<String, Head>,
    last: Option<&StoredCheckpoint>,
) -> rusqlite::Result<Result<(), String>> {
    let rows: u64 = heads.values().map(|h| h.seq).sum();
    let Some(stored) = last else {
        if heads.is_empty() {
            return Ok(Ok(()));
        }
        return check_legacy_start(conn, relay, own_key, heads, rows);
    };
    let n = stored.n;
    let cp = match &stored.checkpoint {
        Ok(cp) => cp,
        Err(e) => return Ok(Err(format!("its last checkpoint ({n}) is unreadable: {e}"))),
    };
    if let Err(why) = check_last(conn, relay, own_key, stored, cp)? {
        return Ok(Err(why));
    }
    let start = Start {
        conn,
        relay,
        n,
        cp,
        heads,
    };
    if let Err(why) = start.check_heads()? {
        return Ok(Err(why));
    }
    start.check_unsigned_tail()
}

/// What the checks after the last checkpoint look at: the trail, this relay, its last
/// checkpoint (`cp`, number `n`) and where its chains end (`heads`).
#[derive(Clone, Copy)]
struct Start<'a> {
    conn: &'a Connection,
    relay: &'a str,
    n: u64,
    cp: &'a Checkpoint,
    heads: &'a HashMap<String, Head>,
}

/// The relay's last checkpoint `cp` (number `n`, stored as `stored`): signed by `own_key`,
/// its hash column its hash, no checkpoint of the relay missing, and linked to the one before.
fn check_last(
    conn: &Connection,
    relay: &str,
    own_key: &str,
    stored: &StoredCheckpoint,
    cp: &Checkpoint,
) -> Verdict {
    let n = stored.n;
    if !cp.public_key.eq_ignore_ascii_case(own_key) {
        return Ok(Err(format!(
            "its last checkpoint ({n}) is signed by key {}, not this relay's checkpoint key {own_key}",
            cp.public_key
        )));
    }
    if !cp.signature_valid() || !stored.stored_hash.eq_ignore_ascii_case(&cp.hash()) {
        return Ok(Err(format!(
            "the signature of its last checkpoint ({n}) does not verify"
        )));
    }
    let count: i64 = conn.query_row(
        "SELECT COUNT(*) FROM checkpoints WHERE relay = ?1",
        [relay],
        |r| r.get(0),
    )?;
    if u64::try_from(count).unwrap_or(0) != n {
        return Ok(Err(format!(
            "relay {relay:?} has {count} checkpoints but the last is number {n}: checkpoints \
             were deleted"
        )));
    }
    if n > 1 {
        let prev = query_hash(
            conn,
            "SELECT hash FROM checkpoints WHERE relay = ?1 AND n = ?2",
            rusqlite::params![relay, (n - 1) as i64],
        )?;
        if !prev.is_some_and(|p| p.eq_ignore_ascii_case(&cp.prev)) {
            return Ok(Err(format!(
                "its last checkpoint ({n}) does not follow checkpoint {}",
                n - 1
            )));
        }
    }
    Ok(Ok(()))
}

impl Start<'_> {
    /// Every head the last checkpoint (`n`) signs is there: the tenant has rows, at least that
    /// many, and the signed row's hash is unchanged.
    fn check_heads(&self) -> Verdict {
        let (n, cp) = (self.n, self.cp);
        for head in &cp.heads {
            let Some(now) = self.heads.get(&head.tenant) else {
                return Ok(Err(format!(
                    "tenant {:?}, signed up to seq {} by the last checkpoint ({n}), has no rows \
                     left: its rows were deleted",
                    head.tenant, head.seq
                )));
            };
            if now.seq < head.seq {
                return Ok(Err(format!(
                    "tenant {:?}: the last checkpoint ({n}) signs seq {} but the chain ends at seq \
                     {}: rows were cut",
                    head.tenant, head.seq, now.seq
                )));
            }
            let hash: Option<String> = row_hash(self.conn, self.relay, &head.tenant, head.seq)?;
            if !hash.is_some_and(|h| h.eq_ignore_ascii_case(&head.hash)) {
                return Ok(Err(format!(
                    "tenant {:?} seq {}: the row differs from what the last checkpoint ({n}) signs: \
                     the chain was rewritten",
                    head.tenant, head.seq
                )));
            }
        }
        Ok(Ok(()))
    }

    /// The unsigned tail after the last checkpoint (`n`): chained on from the signed heads, and a
    /// crash tail by its times. Both passes stream (a forged file may hold any number of rows).
    fn check_unsigned_tail(&self) -> Verdict {
        let Start {
            conn, relay, n, cp, ..
        } = *self;
        let first_unsigned = match self.check_tail_chains()? {
            Ok(first) => first,
            Err(why) => return Ok(Err(why)),
        };
        let mut clock = TailClock::new(Some(cp.time_ms), cp.interval_ms);
        if let Some(first) = first_unsigned {
            let mut stmt = conn.prepare_cached(
                "SELECT id, tenant, seq, record FROM records WHERE relay = ?1 AND id >= ?2 ORDER BY id",
            )?;
            let mut rows = stmt.query(rusqlite::params![relay, first])?;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let tenant: String = row.get(1)?;
                let seq = u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0);
                if seq <= cp.head(&tenant).map_or(0, |h| h.seq) {
                    continue;
                }
                let bytes: Vec<u8> = row.get(3)?;
                let time_ms = serde_json::from_slice::<Record>(&bytes).map_or(0, |r| r.time_ms);
                clock.feed(id, &tenant, seq, time_ms);
            }
        }
        if let Some((id, tenant, seq, detail)) = clock.failure(&format!(
            "after its last checkpoint ({n}, {})",
            when(cp.time_ms)
        )) {
            return Ok(Err(format!(
                "tenant {tenant:?} seq {seq} (row id {id}): {detail}"
            )));
        }
        if clock.rows > 0 {
            tracing::warn!(
                relay,
                rows = clock.rows,
                checkpoint = n,
                "audit trail: a crash tail of unsigned rows after the last checkpoint; signing it now"
            );
        }
        Ok(Ok(()))
    }

    /// Each tenant's rows after the last checkpoint (`n`) chain on from the head it signs; the
    /// lowest row id among them (where the time test starts), if any.
    fn check_tail_chains(&self) -> rusqlite::Result<Result<Option<i64>, String>> {
        let Start {
            conn,
            relay,
            n,
            cp,
            heads,
        } = *self;
        let mut first_unsigned: Option<i64> = None;
        let mut stmt = conn.prepare_cached(
            "SELECT id, seq, prev_hash, hash, record FROM records WHERE relay = ?1 AND tenant = ?2 \
             AND seq > ?3 ORDER BY seq",
        )?;
        for tenant in heads.keys() {
            let (mut seq, mut hash) = cp
                .head(tenant)
                .and_then(|h| Some((h.seq, chain::parse_hash(&h.hash)?)))
                .unwrap_or((0, GENESIS));
            let mut rows = stmt.query(rusqlite::params![relay, tenant, seq as i64])?;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let row_seq = u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0);
                let prev: String = row.get(2)?;
                let stored: String = row.get(3)?;
                let bytes: Vec<u8> = row.get(4)?;
                let computed = chain::row_hash(&hash, row_seq, &bytes);
                if row_seq != seq + 1
                    || chain::parse_hash(&prev) != Some(hash)
                    || chain::parse_hash(&stored) != Some(computed)
                {
                    return Ok(Err(format!(
                        "tenant {tenant:?} seq {row_seq} (row id {id}), after the last checkpoint \
                         ({n}), does not chain on from it"
                    )));
                }
                first_unsigned = Some(first_unsigned.map_or(id, |f| f.min(id)));
                seq = row_seq;
                hash = computed;
            }
        }
        Ok(Ok(first_unsigned))
    }
}

/// [`check_start`] for a relay with rows and no checkpoint of its own: only a migrated schema
/// 1 trail whose last per-tenant checkpoints verify with this relay's key may go on.
fn check_legacy_start(
    conn: &Connection,
    relay: &str,
    own_key: &str,
    heads: &HashMap<String, Head>,
    rows: u64,
) -> Verdict {
    let mut stmt = conn.prepare(
        "SELECT time_ms, tenant, seq, hash, public_key, signature FROM legacy_checkpoints \
         WHERE relay = ?1 AND id IN (SELECT MAX(id) FROM legacy_checkpoints WHERE relay = ?1 \
         GROUP BY tenant)",
    )?;
    let mut found = 0;
    let mut rows_iter = stmt.query([relay])?;
    while let Some(row) = rows_iter.next()? {
        found += 1;
        let time_ms = u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0);
        let tenant: String = row.get(1)?;
        let seq = u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0);
        let hash: String = row.get(3)?;
        let key: String = row.get(4)?;
        let signature: String = row.get(5)?;
        if !key.eq_ignore_ascii_case(own_key)
            || !crate::govern::audit::key::verify(
                &key,
                &chain::checkpoint_message(&tenant, seq, &hash, time_ms),
                &signature,
            )
        {
            return Ok(Err(format!(
                "the last schema 1 checkpoint of tenant {tenant:?} is not signed by this relay's \
                 checkpoint key"
            )));
        }
        if !heads.contains_key(&tenant) {
            return Ok(Err(format!(
                "tenant {tenant:?}, signed by a schema 1 checkpoint, has no rows left"
            )));
        }
        if row_hash(conn, relay, &tenant, seq)?.is_none_or(|h| h != hash) {
            return Ok(Err(format!(
                "tenant {tenant:?} seq {seq}: the row a schema 1 checkpoint signs is missing or \
                 changed"
            )));
        }
    }
    if found == 0 {
        return Ok(Err(format!(
            "{rows} rows of relay {relay:?} and not one checkpoint of it: its checkpoints were \
             deleted"
        )));
    }
    Ok(Ok(()))
}

/// The hash column of row (relay, tenant, seq), if it exists.
fn row_hash(
    conn: &Connection,
    relay: &str,
    tenant: &str,
    seq: u64,
) -> rusqlite::Result<Option<String>> {
    query_hash(
        conn,
        "SELECT hash FROM records WHERE relay = ?1 AND tenant = ?2 AND seq = ?3",
        rusqlite::params![relay, tenant, seq as i64],
    )
}

/// The `hash` column of the row `sql` finds with `params`, if it finds one.
fn query_hash(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<Option<String>> {
    conn.query_row(sql, params, |r| r.get(0)).optional()
}
