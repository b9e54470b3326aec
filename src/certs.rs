//! Development certificates: a CA and a relay certificate signed by it (rcgen).
//!
//! For loopback and first setups. Production relays use certificates from a real CA, which
//! `connect` verifies against the system roots.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// rcgen refused the parameters.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file exists and `--force` was not given.
    #[error("{0} exists; pass --force to overwrite")]
    Exists(String),
    /// Writing failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A dev CA and a relay certificate, as PEM text.
pub struct DevCerts {
    /// The CA certificate (`ca.pem`): what `connect --ca` trusts.
    pub ca_pem: String,
    /// The relay certificate (`relay.pem`).
    pub relay_pem: String,
    /// The relay private key (`relay.key`).
    pub relay_key: String,
}

/// Names every dev relay certificate covers.
const DEFAULT_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// Makes a CA and a relay certificate for the default names plus `hosts`.
pub fn generate(hosts: &[String]) -> Result<DevCerts, CertsError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mcp-tunnel dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names: Vec<String> = DEFAULT_NAMES.iter().map(|s| s.to_string()).collect();
    names.extend(
        hosts
            .iter()
            .filter(|h| !DEFAULT_NAMES.contains(&h.as_str()))
            .cloned(),
    );
    let relay_key = KeyPair::generate()?;
    let mut relay_params = CertificateParams::new(Vec::<String>::new())?;
    relay_params
        .distinguished_name
        .push(DnType::CommonName, "mcp-tunnel relay");
    relay_params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(name.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    let relay_cert = relay_params.signed_by(&relay_key, &issuer)?;
    Ok(DevCerts {
        ca_pem: ca_cert.pem(),
        relay_pem: relay_cert.pem(),
        relay_key: relay_key.serialize_pem(),
    })
}

/// Writes `ca.pem`, `relay.pem` and `relay.key` into `dir`, refusing to overwrite unless
/// `force`. The key file is readable by its owner only.
pub fn write(dir: &Path, certs: &DevCerts, force: bool) -> Result<(), CertsError> {
    let files = [
        ("ca.pem", &certs.ca_pem),
        ("relay.pem", &certs.relay_pem),
        ("relay.key", &certs.relay_key),
    ];
    if !force && let Some((name, _)) = files.iter().find(|(name, _)| dir.join(name).exists()) {
        return Err(CertsError::Exists(dir.join(name).display().to_string()));
    }
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| CertsError::Write {
            path: path.display().to_string(),
            source,
        })?;
        #[cfg(unix)]
        if name.ends_with(".key") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| CertsError::Write {
                    path: path.display().to_string(),
                    source,
                },
            )?;
        }
    }
    Ok(())
}
