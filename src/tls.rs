//! TLS material: rustls server and client configs from PEM files, and
//! self-signed certificates for first runs (rcgen).
//!
//! Errors carry the path of the file concerned, since "no private key found"
//! without a file name is the classic first-run puzzle.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    crypto::ring::default_provider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ClientConfig, RootCertStore, ServerConfig,
};

/// What can go wrong while loading or creating TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {reason}")]
    File {
        /// What the file should hold, e.g. "certificate file".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// rustls rejected the material.
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    /// Certificate generation failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    /// Writing generated files failed.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn file_error(what: &'static str, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        what,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error("certificate file", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("certificate file", path, e))?;
    if certs.is_empty() {
        return Err(file_error(
            "certificate file",
            path,
            "contains no PEM certificate",
        ));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error("private key file", path, e))
}

/// A server config for the worker listener (TLS 1.2 and 1.3 only). With
/// `client_ca`, every worker must present a certificate issued by one of
/// the CAs in that PEM bundle (mutual TLS).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let client_roots = client_ca.map(load_roots).transpose()?;
    server_config_from(load_certs(cert)?, load_key(key)?, client_roots)
}

/// A server config from certificates and a key already in memory; with
/// `client_roots`, workers must present a certificate issued by one of them.
pub fn server_config_from(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<RootCertStore>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    Ok(Arc::new(builder.with_single_cert(certs, key)?))
}

/// The certificates of a PEM bundle as a root store.
fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error("CA file", path, e))?;
    }
    Ok(roots)
}

/// A client config that trusts `ca` (a PEM bundle) or, without it, the
/// system's root certificates.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_from(trust(ca)?, None)
}

/// Like [`client_config`], presenting the certificate chain in `cert` with
/// its `key` to a bridge that requires client certificates (mutual TLS).
pub fn client_config_with_identity(
    ca: Option<&Path>,
    cert: &Path,
    key: &Path,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_from(trust(ca)?, Some((load_certs(cert)?, load_key(key)?)))
}

/// `ca` as a root store, or the system's roots.
fn trust(ca: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => roots = load_roots(path)?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system store often holds a few certificates rustls cannot
                // parse; skipping them is what every browser does too.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TlsError::File {
                    what: "system trust store",
                    path: PathBuf::from("(native roots)"),
                    reason: "no usable root certificates; pass --ca FILE".into(),
                });
            }
        }
    }
    Ok(roots)
}

/// A client config trusting exactly the given roots, optionally presenting
/// a client certificate chain and key.
pub fn client_config_from(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((certs, key)) => builder.with_client_auth_cert(certs, key)?,
    };
    Ok(Arc::new(config))
}

/// A freshly generated self-signed certificate and its key, in PEM.
#[derive(Clone)]
pub struct SelfSigned {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for SelfSigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSigned").finish_non_exhaustive()
    }
}

impl SelfSigned {
    /// Generates a certificate valid for `hosts` (DNS names or IP addresses).
    pub fn generate(hosts: &[String]) -> Result<SelfSigned, TlsError> {
        let key = rcgen::generate_simple_self_signed(hosts.to_vec())
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(SelfSigned {
            cert_pem: key.cert.pem(),
            key_pem: key.signing_key.serialize_pem(),
        })
    }

    /// A server config using this certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let mem = Path::new("(generated)");
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_error("certificate", mem, e))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| file_error("private key", mem, e))?;
        server_config_from(certs, key, None)
    }

    /// A client config that trusts only this certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()) {
            let cert = cert.map_err(|e| file_error("certificate", Path::new("(generated)"), e))?;
            roots.add(cert)?;
        }
        client_config_from(roots, None)
    }

    /// Writes the certificate and key; the key file is made owner-only.
    pub fn write(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        for path in [cert, key] {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
                    path: dir.to_owned(),
                    source,
                })?;
            }
        }
        let write = |path: &Path, text: &str| {
            std::fs::write(path, text).map_err(|source| TlsError::Write {
                path: path.to_owned(),
                source,
            })
        };
        write(cert, &self.cert_pem)?;
        write(key, &self.key_pem)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| TlsError::Write {
                    path: key.to_owned(),
                    source,
                },
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_error_names_the_path() {
        let err = server_config(
            Path::new("/nonexistent/x.crt"),
            Path::new("/nonexistent/x.key"),
            None,
        )
        .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/x.crt"), "{err}");
    }

    #[test]
    fn generated_cert_round_trips_through_files() {
        let dir = std::env::temp_dir().join(format!("wsbridge-tls-{}", std::process::id()));
        let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
        let ss = SelfSigned::generate(&["localhost".into(), "127.0.0.1".into()]).expect("gen");
        ss.write(&cert, &key).expect("write");
        server_config(&cert, &key, None).expect("loads");
        client_config(Some(&cert)).expect("trusts");
        let _ = std::fs::remove_dir_all(dir);
    }
}
