//! The hash chain: what each row's hash covers, and what a checkpoint signs. Pure functions,
//! shared by the writer and `audit verify`.
//!
//! Each tenant's rows are numbered 1, 2, 3, ... (`seq`). A row's hash is
//! `sha256(prev_hash || seq as 8 big-endian bytes || record)`, where `record` is the exact
//! JSON bytes stored in the row (the record's canonical serialization: serde's field order,
//! no whitespace) and `prev_hash` is the previous row's hash ([`GENESIS`] for seq 1). Changing
//! any byte of a row, removing one, or moving one breaks the chain from there on.
//!
//! A checkpoint signs (tenant, seq, hash, time) with the relay's Ed25519 key: the chain up to
//! there cannot be rewritten without the key, and rows cut from the end before a checkpoint are
//! missed.

use sha2::{Digest, Sha256};

use super::Record;

/// The "previous hash" of a tenant's first row.
pub const GENESIS: [u8; 32] = [0; 32];

/// What a checkpoint signature covers starts with this, so it can mean nothing else.
const CHECKPOINT_DOMAIN: &str = "mcp-tunnel audit checkpoint v1";

/// The bytes a row stores and its hash covers.
pub fn canonical(record: &Record) -> Vec<u8> {
    // Serializing a struct of strings, numbers and enums cannot fail.
    serde_json::to_vec(record).expect("a Record always serializes to JSON")
}

/// The hash of the row `seq` holding `record_bytes`, after the row whose hash is `prev`.
pub fn row_hash(prev: &[u8; 32], seq: u64, record_bytes: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(seq.to_be_bytes());
    hasher.update(record_bytes);
    hasher.finalize().into()
}

/// A hash in the hex form rows store, back to bytes; `None` if it is not 64 hex digits.
pub fn parse_hash(hex_text: &str) -> Option<[u8; 32]> {
    let mut out = [0; 32];
    hex::decode_to_slice(hex_text, &mut out).ok()?;
    Some(out)
}

/// The message a checkpoint signs: that `tenant`'s chain reached row `seq` with `hash` (hex)
/// at `time_ms`. Fields are newline-separated; the tenant is a JSON string, so no name can
/// forge a field.
pub fn checkpoint_message(tenant: &str, seq: u64, hash_hex: &str, time_ms: u64) -> Vec<u8> {
    let tenant = serde_json::Value::from(tenant);
    format!("{CHECKPOINT_DOMAIN}\ntenant={tenant}\nseq={seq}\nhash={hash_hex}\ntime_ms={time_ms}")
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_covers_prev_seq_and_bytes() {
        let a = row_hash(&GENESIS, 1, b"{}");
        assert_ne!(a, row_hash(&GENESIS, 2, b"{}"));
        assert_ne!(a, row_hash(&GENESIS, 1, b"{ }"));
        assert_ne!(a, row_hash(&a, 1, b"{}"));
        assert_eq!(a, row_hash(&GENESIS, 1, b"{}"));
        assert_eq!(parse_hash(&hex::encode(a)), Some(a));
        assert_eq!(parse_hash("abc"), None);
    }

    #[test]
    fn checkpoint_messages_differ_per_field() {
        let m = checkpoint_message("acme", 3, "ab", 10);
        assert_ne!(m, checkpoint_message("acmf", 3, "ab", 10));
        assert_ne!(m, checkpoint_message("acme", 4, "ab", 10));
        assert_ne!(m, checkpoint_message("acme", 3, "ac", 10));
        assert_ne!(m, checkpoint_message("acme", 3, "ab", 11));
    }
}
