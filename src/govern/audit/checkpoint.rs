//! Signed checkpoints (schema 2): one numbered, hash-linked chain of checkpoints per relay
//! instance, each signing the head of every tenant chain that relay writes.
//!
//! A checkpoint says: "relay R, checkpoint number n, following the checkpoint whose hash is
//! `prev`, at `time_ms`, signing at least every `interval_ms`, saw these heads (tenant, last
//! seq, last hash)". Because every checkpoint names every tenant of its relay, a tenant whose
//! rows are deleted is missed (its head names rows that are gone); because checkpoints are
//! numbered and linked, a deleted checkpoint is missed (a gap, or a link to nothing); because a
//! running relay signs at least every interval, rows left unsigned for longer than that after
//! the last checkpoint mean checkpoints were deleted (a crash leaves a shorter tail).
//!
//! The signed bytes are [`Checkpoint::message`]; the checkpoint's hash (what the next one links
//! to) is the sha256 of them. The same fields travel as one JSON line in the off-box copy
//! (`[audit] checkpoint_file`, `audit checkpoints --export`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What the signed bytes start with, so a checkpoint signature can mean nothing else.
const DOMAIN: &str = "mcp-tunnel audit checkpoint v2";

/// The `prev` of a relay's first checkpoint.
pub const GENESIS_HEX: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why a checkpoint was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A relay began writing, after checking the trail (its crash tail, if any, is signed here).
    Start,
    /// A relay began a new epoch (`relay --new-audit-epoch`): the trail did not verify when it
    /// started, and `note` says why. What came before is not vouched for by this checkpoint.
    Epoch,
    /// Rows were signed during the run (every `checkpoint_rows` rows or `checkpoint_secs`).
    Interval,
    /// The relay shut down cleanly.
    Close,
}

impl Kind {
    /// Its name in messages and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Start => "start",
            Kind::Epoch => "epoch",
            Kind::Interval => "interval",
            Kind::Close => "close",
        }
    }

    /// The kind named `label`.
    pub fn parse(label: &str) -> Option<Self> {
        [Kind::Start, Kind::Epoch, Kind::Interval, Kind::Close]
            .into_iter()
            .find(|k| k.label() == label)
    }
}

/// One tenant chain's head as a checkpoint signs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadEntry {
    /// The tenant.
    pub tenant: String,
    /// Its last row's sequence number.
    pub seq: u64,
    /// That row's hash, hex.
    pub hash: String,
}

/// A signed checkpoint: the stored row and the off-box JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The relay instance whose chain this is (`[fleet] id`, or host and tunnel port).
    pub relay: String,
    /// Its number in that relay's chain: 1, 2, 3, ...
    pub n: u64,
    /// The hash of checkpoint `n - 1` of the same relay ([`GENESIS_HEX`] for the first).
    pub prev: String,
    /// Why it was written.
    pub kind: Kind,
    /// The relay's epoch: 1, then one more each time a relay begins a new epoch.
    pub epoch: u64,
    /// For an [`Kind::Epoch`] checkpoint: why the trail did not verify. Else empty or a remark.
    pub note: String,
    /// When it was signed, ms since the Unix epoch.
    pub time_ms: u64,
    /// The longest the relay lets rows stay unsigned while it runs, ms.
    pub interval_ms: u64,
    /// Every tenant chain of the relay, by tenant name.
    pub heads: Vec<HeadEntry>,
    /// The signing key (Ed25519), hex.
    pub public_key: String,
    /// The signature of [`Checkpoint::message`], hex.
    pub signature: String,
}

impl Checkpoint {
    /// The heads as the JSON text the message holds (and the database stores).
    pub fn heads_json(&self) -> String {
        // A Vec of structs of strings and integers always serializes.
        serde_json::to_string(&self.heads).expect("heads always serialize to JSON")
    }

    /// The bytes the signature covers: newline-separated fields; strings are JSON strings,
    /// so no relay name, note or tenant can forge a field.
    pub fn message(&self) -> Vec<u8> {
        let relay = serde_json::Value::from(self.relay.as_str());
        let note = serde_json::Value::from(self.note.as_str());
        format!(
            "{DOMAIN}\nrelay={relay}\nn={}\nprev={}\nkind={}\nepoch={}\nnote={note}\ntime_ms={}\n\
             interval_ms={}\nheads={}",
            self.n,
            self.prev,
            self.kind.label(),
            self.epoch,
            self.time_ms,
            self.interval_ms,
            self.heads_json()
        )
        .into_bytes()
    }

    /// The checkpoint's hash, hex: what the next checkpoint's `prev` names.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.message()))
    }

    /// Whether the signature verifies with the key it names.
    pub fn signature_valid(&self) -> bool {
        super::key::verify(&self.public_key, &self.message(), &self.signature)
    }

    /// The head of `tenant`, if this checkpoint names it.
    pub fn head(&self, tenant: &str) -> Option<&HeadEntry> {
        self.heads
            .binary_search_by(|h| h.tenant.as_str().cmp(tenant))
            .ok()
            .and_then(|i| self.heads.get(i))
    }

    /// One JSON line (no newline) for the off-box copy.
    pub fn to_json_line(&self) -> String {
        // Strings, integers and a Vec of structs always serialize.
        serde_json::to_string(self).expect("a checkpoint always serializes to JSON")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            relay: "relay-a".into(),
            n: 3,
            prev: GENESIS_HEX.into(),
            kind: Kind::Interval,
            epoch: 1,
            note: String::new(),
            time_ms: 10,
            interval_ms: 60_000,
            heads: vec![
                HeadEntry {
                    tenant: "acme".into(),
                    seq: 4,
                    hash: "ab".into(),
                },
                HeadEntry {
                    tenant: "globex".into(),
                    seq: 1,
                    hash: "cd".into(),
                },
            ],
            public_key: String::new(),
            signature: String::new(),
        }
    }

    #[test]
    fn every_field_changes_the_message_and_json_round_trips() {
        let base = sample();
        type Change = Box<dyn Fn(&mut Checkpoint)>;
        let variants: Vec<Change> = vec![
            Box::new(|c| c.relay = "relay-b".into()),
            Box::new(|c| c.n = 4),
            Box::new(|c| c.prev = "01".into()),
            Box::new(|c| c.kind = Kind::Close),
            Box::new(|c| c.epoch = 2),
            Box::new(|c| c.note = "x".into()),
            Box::new(|c| c.time_ms = 11),
            Box::new(|c| c.interval_ms = 1),
            Box::new(|c| c.heads[1].seq = 2),
            Box::new(|c| {
                c.heads.pop();
            }),
        ];
        for change in variants {
            let mut other = base.clone();
            change(&mut other);
            assert_ne!(other.message(), base.message());
        }
        let back: Checkpoint = serde_json::from_str(&base.to_json_line()).expect("round trip");
        assert_eq!(back, base);
        assert_eq!(back.hash(), base.hash());
        assert_eq!(base.head("globex").map(|h| h.seq), Some(1));
        assert!(base.head("initech").is_none());
    }
}
