//! The one place the crypto backend is chosen (aws-lc-rs) and rustls configs are built.
//!
//! Every rustls config in the crate comes from here, built with `builder_with_provider`, so no
//! code path depends on a process-wide default provider.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::TransportError;

/// The crypto provider of the whole crate.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate chain and its private key.
pub struct Identity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads a PEM chain and PEM key from files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TransportError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TransportError::Config(format!("certificate {}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err(TransportError::Config(format!(
                "certificate {}: no PEM certificate in it",
                cert.display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| TransportError::Config(format!("private key {}: {e}", key.display())))?;
        Ok(Self { chain, key })
    }

    /// Parses PEM text (the demo keeps its certificates in memory).
    pub fn from_pem(cert: &str, key: &str) -> Result<Self, TransportError> {
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::Config(format!("certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| TransportError::Config(format!("private key: {e}")))?;
        Ok(Self { chain, key })
    }
}

/// Trust anchors for verifying the relay.
pub enum Roots {
    /// Only the CA certificates in this PEM file (a dev CA from `mcp-tunnel certs`).
    CaFile(std::path::PathBuf),
    /// Only these CA certificates, as PEM text.
    CaPem(String),
    /// The operating system's trust store.
    System,
}

impl Roots {
    fn store(&self) -> Result<rustls::RootCertStore, TransportError> {
        let mut store = rustls::RootCertStore::empty();
        let certs: Vec<CertificateDer<'static>> = match self {
            Roots::CaFile(path) => CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TransportError::Config(format!("CA file {}: {e}", path.display())))?,
            Roots::CaPem(pem) => CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TransportError::Config(format!("CA certificate: {e}")))?,
            Roots::System => {
                let loaded = rustls_native_certs::load_native_certs();
                if loaded.certs.is_empty() {
                    return Err(TransportError::Config(format!(
                        "no system trust anchors could be loaded ({} errors); pass --ca",
                        loaded.errors.len()
                    )));
                }
                loaded.certs
            }
        };
        let (added, _ignored) = store.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TransportError::Config("no usable CA certificate".into()));
        }
        Ok(store)
    }
}

/// A TLS 1.3 server config presenting `identity` and offering `alpn`.
pub fn server_config(
    identity: Identity,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TransportError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| {
            TransportError::Config(format!(
                "certificate and key do not match or are unusable: {e}"
            ))
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS 1.3 client config that verifies the server against `roots` and offers `alpn`.
pub fn client_config(
    roots: &Roots,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, TransportError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_root_certificates(roots.store()?)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A client config for the audit database (`[audit] url` with TLS): verifies the server
/// against `roots` and its host name like every other connection of the crate, and accepts
/// TLS 1.2 as well, which PostgreSQL servers still commonly offer.
pub fn database_client_config(roots: &Roots) -> Result<rustls::ClientConfig, TransportError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_root_certificates(roots.store()?)
        .with_no_client_auth())
}
