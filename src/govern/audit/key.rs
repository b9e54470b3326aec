//! The relay's Ed25519 checkpoint key: loaded from a PKCS#8 PEM file, or created (mode 0600)
//! when the file is missing, with the public key written beside it (`KEY.pub`, SPKI PEM) so
//! an auditor can verify checkpoints with a key that does not come from the database.

use std::io::Write;
use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};

use super::AuditError;

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (32 bytes) }. The raw key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Length of a raw Ed25519 public key.
const PUBLIC_KEY_LEN: usize = 32;

/// An Ed25519 key that signs checkpoints.
pub struct CheckpointKey {
    pair: Ed25519KeyPair,
    public_hex: String,
}

impl std::fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointKey")
            .field("public", &self.public_hex)
            .finish_non_exhaustive()
    }
}

impl CheckpointKey {
    /// Loads the key at `path`, or creates it (and `path.pub`) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, AuditError> {
        let key_error = |message: String| AuditError::Key {
            path: path.to_owned(),
            message,
        };
        let pair = match std::fs::read(path) {
            Ok(pem) => {
                let der = PrivatePkcs8KeyDer::from_pem_slice(&pem)
                    .map_err(|e| key_error(format!("not a PKCS#8 PEM private key ({e})")))?;
                Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der())
                    .map_err(|e| key_error(format!("not an Ed25519 key: {e}")))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pair = Ed25519KeyPair::generate()
                    .map_err(|_| key_error("generating a key failed".into()))?;
                let der = pair
                    .to_pkcs8v1()
                    .map_err(|_| key_error("encoding the new key failed".into()))?;
                write_new_private(path, &pem("PRIVATE KEY", der.as_ref()))
                    .map_err(|e| key_error(format!("cannot create: {e}")))?;
                tracing::info!(key = %path.display(), "created the audit checkpoint key");
                pair
            }
            Err(e) => return Err(key_error(format!("cannot read: {e}"))),
        };
        let key = Self {
            public_hex: hex::encode(pair.public_key().as_ref()),
            pair,
        };
        let pub_path = public_key_path(path);
        let pub_pem = key.public_pem();
        if std::fs::read_to_string(&pub_path).ok().as_deref() != Some(pub_pem.as_str()) {
            std::fs::write(&pub_path, pub_pem).map_err(|e| AuditError::Key {
                path: pub_path.clone(),
                message: format!("cannot write the public key: {e}"),
            })?;
        }
        Ok(key)
    }

    /// The public key, hex: how the database names it.
    pub fn public_hex(&self) -> &str {
        &self.public_hex
    }

    /// The public key as SPKI PEM (`openssl pkey -pubin` reads it).
    pub fn public_pem(&self) -> String {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.pair.public_key().as_ref());
        pem("PUBLIC KEY", &der)
    }

    /// The signature of `message`, hex.
    pub fn sign(&self, message: &[u8]) -> String {
        hex::encode(self.pair.sign(message).as_ref())
    }
}

/// `KEY.pub` for the key file `KEY`.
pub fn public_key_path(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Reads a public key file (SPKI PEM, as written beside the key) into the hex form the
/// database uses.
pub fn read_public_key(path: &Path) -> Result<String, AuditError> {
    let key_error = |message: String| AuditError::Key {
        path: path.to_owned(),
        message,
    };
    let pem = std::fs::read(path).map_err(|e| key_error(format!("cannot read: {e}")))?;
    let der = SubjectPublicKeyInfoDer::from_pem_slice(&pem)
        .map_err(|e| key_error(format!("not a PEM public key ({e})")))?;
    match der.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..]) {
        Some(raw) if raw.len() == PUBLIC_KEY_LEN => Ok(hex::encode(raw)),
        _ => Err(key_error("not an Ed25519 public key".into())),
    }
}

/// Whether `signature_hex` is a valid signature of `message` by `public_hex`.
pub fn verify(public_hex: &str, message: &[u8], signature_hex: &str) -> bool {
    let (Ok(public), Ok(sig)) = (hex::decode(public_hex), hex::decode(signature_hex)) else {
        return false;
    };
    UnparsedPublicKey::new(&signature::ED25519, public)
        .verify(message, &sig)
        .is_ok()
}

/// A PEM block with 64-character lines.
fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Creates `path` exclusively, readable by its owner only, and writes `text`.
fn write_new_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_loads_the_same_key_and_signs_verifiably() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.key");
        let created = CheckpointKey::load_or_create(&path).expect("create");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .expect("key file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let loaded = CheckpointKey::load_or_create(&path).expect("load");
        assert_eq!(created.public_hex(), loaded.public_hex());
        let from_file = read_public_key(&public_key_path(&path)).expect("public key file");
        assert_eq!(from_file, created.public_hex());
        let sig = loaded.sign(b"checkpoint");
        assert!(verify(&from_file, b"checkpoint", &sig));
        assert!(!verify(&from_file, b"checkpoinT", &sig));
        assert!(!verify("zz", b"checkpoint", &sig));
    }

    #[test]
    fn a_bad_key_file_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.key");
        std::fs::write(&path, "not a key").expect("write");
        let err = CheckpointKey::load_or_create(&path).expect_err("bad key");
        assert!(err.to_string().contains("audit.key"), "{err}");
    }
}
