//! What the relays of one fleet share: a secret that seals the ids they hand to agents.
//!
//! A session id (and, later, an event id) issued by any relay of a fleet must be usable on
//! every other one, with nothing shared at run time but the secret. So the id *is* the state:
//! the relay seals what it needs to continue a session (see `session::sealed`) with an AEAD
//! key derived from the fleet secret, and any relay opens it again. An id that was forged,
//! altered in any byte, or sealed by another fleet fails to open, exactly like an unknown id.
//!
//! # Format
//!
//! `base64url(FORMAT ‖ key id (4) ‖ nonce (12) ‖ ciphertext ‖ tag (16))`, no padding. The key
//! id names which secret sealed it, so a relay holding the current and a previous secret (a
//! rotation in progress) tries only the right one. The additional data binds the format, the
//! key id and the [`Purpose`]: a sealed event id can never be passed off as a session id.
//!
//! # Keys
//!
//! Each purpose has its own AES-256-GCM key, HKDF-SHA256-expanded from the secret; nonces are
//! random (96 bits): with a fresh nonce per seal, a fleet may seal 2^32 ids per key before the
//! collision bound matters, far beyond any rotation period.
//!
//! A relay outside a fleet (no `[fleet] secret_file`) seals with a random secret of its own:
//! one code path, and its ids simply do not outlive the process.

use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, Nonce, RandomizedNonceKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, KeyType, Salt};
use aws_lc_rs::{constant_time, hmac};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// The first byte of every sealed id: its layout. A new layout gets a new value.
const FORMAT: u8 = 1;

/// Bytes of a key id: enough to tell a handful of live secrets apart (not a secret itself).
const KEY_ID_LEN: usize = 4;

/// AES-GCM nonce and tag sizes.
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The shortest fleet secret accepted: 256 bits, the strength of the keys derived from it.
pub const MIN_SECRET_BYTES: usize = 32;

/// The longest sealed id opened: a session id carries a few names and handles (well under
/// 1 KiB sealed); anything longer is refused before any work is spent on it.
pub const MAX_SEALED_LEN: usize = 2048;

/// The longest sealed `requestState` opened: it wraps the upstream's own state, which a
/// stateless server may fill with what it needs to continue (see [`MAX_INNER_STATE`]).
pub const MAX_SEALED_STATE_LEN: usize = 64 * 1024;

/// The longest upstream `requestState` a relay wraps: what fits [`MAX_SEALED_STATE_LEN`] once
/// sealed and base64-encoded (4/3 larger), with room for the claims around it.
pub const MAX_INNER_STATE: usize = 44 * 1024;

/// What a sealed value is for; each has its own key and additional data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// An agent-facing `Mcp-Session-Id`.
    Session,
    /// An agent-facing SSE event id.
    Event,
    /// The `requestState` of an `input_required` answer (see `session::sealed::InputClaims`).
    Input,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Session => b"mcp-tunnel fleet: session id",
            Purpose::Event => b"mcp-tunnel fleet: event id",
            Purpose::Input => b"mcp-tunnel fleet: request state",
        }
    }

    /// The longest sealed text of this purpose opened.
    fn max_len(self) -> usize {
        match self {
            Purpose::Session | Purpose::Event => MAX_SEALED_LEN,
            Purpose::Input => MAX_SEALED_STATE_LEN,
        }
    }

    fn byte(self) -> u8 {
        match self {
            Purpose::Session => 1,
            Purpose::Event => 2,
            Purpose::Input => 3,
        }
    }
}

/// Why the fleet's secrets could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A secret file could not be read.
    #[error("fleet secret {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A secret is too short to be a key.
    #[error(
        "fleet secret {path} holds {len} bytes; at least {MIN_SECRET_BYTES} random bytes are \
         required (for example `head -c 32 /dev/urandom > {path}`)"
    )]
    TooShort {
        /// The file.
        path: PathBuf,
        /// Its length (surrounding whitespace trimmed).
        len: usize,
    },
}

/// One secret's keys.
struct Secret {
    id: [u8; KEY_ID_LEN],
    session: RandomizedNonceKey,
    event: RandomizedNonceKey,
    input: RandomizedNonceKey,
    /// Tags task ids to their callers ([`FleetKeys::tag`]).
    task: hmac::Key,
}

/// Bytes of a task-id tag: 128 bits, beyond guessing (a wrong guess costs a request).
pub const TASK_TAG_LEN: usize = 16;

/// The HKDF label of the task-id tag key.
const TASK_LABEL: &[u8] = b"mcp-tunnel fleet: task id";

/// The output length HKDF expands to: one AES-256 key.
struct KeyLen;

impl KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

impl Secret {
    fn new(secret: &[u8]) -> Self {
        let mut id = [0u8; KEY_ID_LEN];
        let digest = Sha256::new()
            .chain_update(b"mcp-tunnel fleet: key id")
            .chain_update(secret)
            .finalize();
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        let prk = Salt::new(HKDF_SHA256, b"mcp-tunnel fleet v1").extract(secret);
        let expand = |label: &[u8]| {
            let mut bytes = [0u8; 32];
            prk.expand(&[label], KeyLen)
                .and_then(|okm| okm.fill(&mut bytes))
                .expect("HKDF-SHA256 expands to 32 bytes, far below its 8160-byte limit");
            bytes
        };
        let key = |purpose: Purpose| {
            RandomizedNonceKey::new(&AES_256_GCM, &expand(purpose.label()))
                .expect("a 32-byte key is what AES-256-GCM takes")
        };
        Self {
            id,
            session: key(Purpose::Session),
            event: key(Purpose::Event),
            input: key(Purpose::Input),
            task: hmac::Key::new(hmac::HMAC_SHA256, &expand(TASK_LABEL)),
        }
    }

    fn tag(&self, data: &[u8]) -> [u8; TASK_TAG_LEN] {
        let mut tag = [0u8; TASK_TAG_LEN];
        tag.copy_from_slice(&hmac::sign(&self.task, data).as_ref()[..TASK_TAG_LEN]);
        tag
    }

    fn key(&self, purpose: Purpose) -> &RandomizedNonceKey {
        match purpose {
            Purpose::Session => &self.session,
            Purpose::Event => &self.event,
            Purpose::Input => &self.input,
        }
    }
}

fn aad(purpose: Purpose, key_id: &[u8]) -> [u8; 2 + KEY_ID_LEN] {
    let mut aad = [0u8; 2 + KEY_ID_LEN];
    aad[0] = FORMAT;
    aad[1] = purpose.byte();
    aad[2..].copy_from_slice(key_id);
    aad
}

/// The keys a relay seals with (the current secret) and opens with (the current one and any
/// still accepted during a rotation).
pub struct FleetKeys {
    current: Secret,
    accepted: Vec<Secret>,
    /// Whether the secret is shared with other relays (from `[fleet] secret_file`).
    shared: bool,
}

impl std::fmt::Debug for FleetKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetKeys")
            .field("current", &hex::encode(self.current.id))
            .field("accepted", &self.accepted.len())
            .field("shared", &self.shared)
            .finish()
    }
}

impl Default for FleetKeys {
    /// A relay outside a fleet: see [`FleetKeys::standalone`].
    fn default() -> Self {
        Self::standalone()
    }
}

impl FleetKeys {
    /// Keys of a relay outside a fleet: a random secret of its own.
    pub fn standalone() -> Self {
        let mut secret = [0u8; MIN_SECRET_BYTES];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
        Self {
            current: Secret::new(&secret),
            accepted: Vec::new(),
            shared: false,
        }
    }

    /// Keys from secrets given as bytes: `current` seals, `accepted` open too.
    pub fn from_secrets(current: &[u8], accepted: &[&[u8]]) -> Self {
        Self {
            current: Secret::new(current),
            accepted: accepted.iter().map(|s| Secret::new(s)).collect(),
            shared: true,
        }
    }

    /// Keys from the files `[fleet] secret_file` and `accepted_secret_files` name.
    pub fn load(current: &Path, accepted: &[PathBuf]) -> Result<Self, FleetError> {
        let current = read_secret(current)?;
        let accepted = accepted
            .iter()
            .map(|path| read_secret(path))
            .collect::<Result<Vec<_>, _>>()?;
        let accepted: Vec<&[u8]> = accepted.iter().map(Vec::as_slice).collect();
        Ok(Self::from_secrets(&current, &accepted))
    }

    /// Whether the secret is shared with a fleet (else ids die with this process).
    pub fn shared(&self) -> bool {
        self.shared
    }

    /// Seals `plaintext` for `purpose` with the current secret.
    pub fn seal(&self, purpose: Purpose, plaintext: &[u8]) -> String {
        let secret = &self.current;
        let mut sealed = plaintext.to_vec();
        let nonce = secret
            .key(purpose)
            .seal_in_place_append_tag(Aad::from(aad(purpose, &secret.id)), &mut sealed)
            .expect("AES-GCM seals any input below 64 GiB; ids are a few hundred bytes");
        let mut out = Vec::with_capacity(1 + KEY_ID_LEN + NONCE_LEN + sealed.len());
        out.push(FORMAT);
        out.extend_from_slice(&secret.id);
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&sealed);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// A tag for `data` (a task id and whose it is: see `session::tasks`), with the current
    /// secret: the same data always gets the same tag, on every relay of the fleet.
    pub fn tag(&self, data: &[u8]) -> [u8; TASK_TAG_LEN] {
        self.current.tag(data)
    }

    /// Whether `tag` is what this fleet tags `data` with (the current secret, or one still
    /// accepted during a rotation); compared in constant time.
    pub fn verify_tag(&self, data: &[u8], tag: &[u8]) -> bool {
        std::iter::once(&self.current)
            .chain(&self.accepted)
            .any(|secret| constant_time::verify_slices_are_equal(&secret.tag(data), tag).is_ok())
    }

    /// Opens a sealed `text` of `purpose`; `None` for anything this fleet did not seal (or
    /// sealed for another purpose, or altered in any byte).
    pub fn open(&self, purpose: Purpose, text: &str) -> Option<Vec<u8>> {
        if text.len() > purpose.max_len() {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        if bytes.len() < 1 + KEY_ID_LEN + NONCE_LEN + TAG_LEN || bytes[0] != FORMAT {
            return None;
        }
        let (key_id, rest) = bytes[1..].split_at(KEY_ID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let secret = std::iter::once(&self.current)
            .chain(&self.accepted)
            .find(|secret| secret.id == key_id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut sealed = sealed.to_vec();
        let plain = secret
            .key(purpose)
            .open_in_place(nonce, Aad::from(aad(purpose, key_id)), &mut sealed)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// A secret file's bytes: a text secret (printable ASCII, as `openssl rand -hex 32 > F`
/// writes) with its surrounding whitespace trimmed, so a file edited with a trailing newline
/// reads alike on every relay; raw random bytes (`head -c 32 /dev/urandom > F`) as they are
/// (trimming them would drop random bytes that happen to be whitespace).
fn read_secret(path: &Path) -> Result<Vec<u8>, FleetError> {
    let bytes = std::fs::read(path).map_err(|source| FleetError::Read {
        path: path.to_owned(),
        source,
    })?;
    let text = bytes
        .iter()
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace());
    let trimmed = if text { bytes.trim_ascii() } else { &bytes[..] };
    if trimmed.len() < MIN_SECRET_BYTES {
        return Err(FleetError::TooShort {
            path: path.to_owned(),
            len: trimmed.len(),
        });
    }
    Ok(trimmed.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[u8] = b"0123456789abcdef0123456789abcdef-fleet-a";
    const B: &[u8] = b"0123456789abcdef0123456789abcdef-fleet-b";

    #[test]
    fn any_relay_of_the_fleet_opens_what_another_sealed() {
        let sealed = FleetKeys::from_secrets(A, &[]).seal(Purpose::Session, b"hello");
        let other_relay = FleetKeys::from_secrets(A, &[]);
        assert_eq!(
            other_relay.open(Purpose::Session, &sealed).as_deref(),
            Some(&b"hello"[..])
        );
        assert!(
            sealed.bytes().all(|b| (0x21..=0x7e).contains(&b)),
            "visible ASCII, as MCP requires of session ids: {sealed}"
        );
    }

    #[test]
    fn another_fleet_a_purpose_mixup_or_one_altered_byte_opens_nothing() {
        let keys = FleetKeys::from_secrets(A, &[]);
        let sealed = keys.seal(Purpose::Session, b"hello");
        assert_eq!(
            FleetKeys::from_secrets(B, &[]).open(Purpose::Session, &sealed),
            None
        );
        assert_eq!(keys.open(Purpose::Event, &sealed), None);
        let mut bytes = URL_SAFE_NO_PAD.decode(&sealed).expect("we just encoded it");
        for index in 0..bytes.len() {
            bytes[index] ^= 0x01;
            let altered = URL_SAFE_NO_PAD.encode(&bytes);
            assert_eq!(keys.open(Purpose::Session, &altered), None, "byte {index}");
            bytes[index] ^= 0x01;
        }
        assert_eq!(keys.open(Purpose::Session, ""), None);
        assert_eq!(keys.open(Purpose::Session, "not base64 !"), None);
        assert_eq!(keys.open(Purpose::Session, &"A".repeat(5000)), None);
    }

    #[test]
    fn a_rotation_keeps_the_previous_secrets_ids_open_while_sealing_with_the_new_one() {
        let before = FleetKeys::from_secrets(A, &[]).seal(Purpose::Session, b"old");
        let rotating = FleetKeys::from_secrets(B, &[A]);
        assert_eq!(
            rotating.open(Purpose::Session, &before).as_deref(),
            Some(&b"old"[..])
        );
        let after = rotating.seal(Purpose::Session, b"new");
        assert_eq!(
            FleetKeys::from_secrets(B, &[])
                .open(Purpose::Session, &after)
                .as_deref(),
            Some(&b"new"[..]),
            "sealed with the new secret"
        );
        assert_eq!(
            FleetKeys::from_secrets(B, &[]).open(Purpose::Session, &before),
            None,
            "once the old secret is dropped its ids are gone"
        );
    }

    #[test]
    fn two_seals_of_one_value_differ() {
        let keys = FleetKeys::standalone();
        assert_ne!(
            keys.seal(Purpose::Session, b"x"),
            keys.seal(Purpose::Session, b"x")
        );
    }

    #[test]
    fn a_task_tag_is_the_fleets_and_survives_a_rotation() {
        let old = b"0123456789abcdef0123456789abcdef";
        let new = b"fedcba9876543210fedcba9876543210";
        let one = FleetKeys::from_secrets(old, &[]);
        let other = FleetKeys::from_secrets(old, &[]);
        assert_eq!(one.tag(b"t"), other.tag(b"t"), "every relay tags alike");
        assert_ne!(one.tag(b"t"), one.tag(b"u"));
        let rotated = FleetKeys::from_secrets(new, &[old]);
        assert!(rotated.verify_tag(b"t", &one.tag(b"t")));
        assert!(rotated.verify_tag(b"t", &rotated.tag(b"t")));
        assert!(!rotated.verify_tag(b"u", &one.tag(b"t")));
        assert!(!FleetKeys::standalone().verify_tag(b"t", &one.tag(b"t")));
        assert!(
            !one.verify_tag(b"t", &one.tag(b"t")[..8]),
            "a shortened tag"
        );
    }

    #[test]
    fn a_short_secret_file_is_refused_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("fleet-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("short.key");
        std::fs::write(&path, b"  too short\n").expect("write");
        let err = FleetKeys::load(&path, &[]).expect_err("9 bytes");
        assert!(err.to_string().contains("/dev/urandom"), "{err}");
        let long = dir.join("long.key");
        std::fs::write(&long, [A, b"\n"].concat()).expect("write");
        let keys = FleetKeys::load(&long, &[]).expect("40 bytes");
        let sealed = keys.seal(Purpose::Session, b"v");
        assert!(
            FleetKeys::from_secrets(A, &[])
                .open(Purpose::Session, &sealed)
                .is_some()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
