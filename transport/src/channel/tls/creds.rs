//! TLS credentials in QEMU's x509 directory layout, and the rustls configurations built from
//! them: TLS 1.3 only, AES-GCM only (the ciphers kernel TLS takes over), mutual
//! authentication against the directory's CA.
//!
//! | file | used by |
//! | --- | --- |
//! | `ca-cert.pem` | both ends: the CA the peer's certificate must chain to |
//! | `server-cert.pem`, `server-key.pem` | the destination (it accepts connections) |
//! | `client-cert.pem`, `client-key.pem` | the source (it opens them) |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::error::{Error, Result};

/// The CA certificate's file name.
pub const CA_CERT: &str = "ca-cert.pem";
/// The destination's certificate.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The destination's key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The source's certificate.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The source's key.
pub const CLIENT_KEY: &str = "client-key.pem";

/// A credentials directory (QEMU's `tls-creds-x509` layout): what each end needs is loaded
/// when its configuration is built, so a source's directory needs no server key.
#[derive(Clone, Debug)]
pub struct TlsCreds {
    dir: PathBuf,
    /// Try kernel TLS after each handshake (on by default; off forces user-space rustls).
    pub ktls: bool,
}

impl TlsCreds {
    /// The credentials in `dir`; an error names what is missing (the directory, or its CA
    /// certificate, which both ends need).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<TlsCreds> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(Error::Tls(format!(
                "the TLS credentials directory {} does not exist (ci/make-test-certs DIR makes \
                 a test set)",
                dir.display()
            )));
        }
        let creds = TlsCreds { dir, ktls: true };
        creds.file(CA_CERT)?;
        Ok(creds)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn file(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(Error::Tls(format!(
                "{} is missing from the TLS credentials directory {}",
                name,
                self.dir.display()
            )))
        }
    }

    fn certs(&self, name: &str) -> Result<Vec<CertificateDer<'static>>> {
        let p = self.file(name)?;
        let certs = CertificateDer::pem_file_iter(&p)
            .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| Error::Tls(format!("reading {}: {e}", p.display())))?;
        if certs.is_empty() {
            return Err(Error::Tls(format!(
                "{} holds no PEM certificate",
                p.display()
            )));
        }
        Ok(certs)
    }

    fn key(&self, name: &str) -> Result<PrivateKeyDer<'static>> {
        let p = self.file(name)?;
        PrivateKeyDer::from_pem_file(&p)
            .map_err(|e| Error::Tls(format!("reading the private key {}: {e}", p.display())))
    }

    fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for c in self.certs(CA_CERT)? {
            roots.add(c).map_err(|e| {
                Error::Tls(format!(
                    "{} is not a usable CA certificate: {e}",
                    self.dir.join(CA_CERT).display()
                ))
            })?;
        }
        Ok(roots)
    }

    /// The source's configuration: verifies the destination's certificate against the CA
    /// (and the name the caller gives the connection), presents the client certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let b = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(self.roots()?);
        let (cert, key) = (self.dir.join(CLIENT_CERT), self.dir.join(CLIENT_KEY));
        let mut c = if !cert.exists() && !key.exists() {
            // As QEMU: a client directory without a certificate connects without one (and a
            // destination, which always verifies its peer, refuses it).
            tracing::warn!(
                "{} has no {CLIENT_CERT}: connecting without a client certificate",
                self.dir.display()
            );
            b.with_no_client_auth()
        } else {
            b.with_client_auth_cert(self.certs(CLIENT_CERT)?, self.key(CLIENT_KEY)?)
                .map_err(|e| {
                    Error::Tls(format!(
                        "the client certificate and key in {}: {e}",
                        self.dir.display()
                    ))
                })?
        };
        // The keys go to the kernel or to the user-space record layer after the handshake.
        c.enable_secret_extraction = true;
        c.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(c))
    }

    /// The destination's configuration: requires a client certificate that chains to the CA,
    /// presents the server certificate.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
                .build()
                .map_err(|e| Error::Tls(format!("the client verifier: {e}")))?;
        let mut c = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs(SERVER_CERT)?, self.key(SERVER_KEY)?)
            .map_err(|e| {
                Error::Tls(format!(
                    "the server certificate and key in {}: {e}",
                    self.dir.display()
                ))
            })?;
        c.enable_secret_extraction = true;
        // No session tickets: nothing follows the handshake that kernel TLS would have to
        // take over mid-stream, and each connection authenticates in full.
        c.send_tls13_tickets = 0;
        Ok(Arc::new(c))
    }
}

/// ring, AES-GCM only.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_directory_or_file_is_named() {
        let e = TlsCreds::from_dir("/nonexistent/rdmig-tls").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/rdmig-tls"), "{e}");
        let d = std::env::temp_dir().join(format!("rdmig-creds-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let e = TlsCreds::from_dir(&d).unwrap_err();
        assert!(e.to_string().contains("ca-cert.pem is missing"), "{e}");
        std::fs::write(d.join(CA_CERT), "not a certificate").unwrap();
        let c = TlsCreds::from_dir(&d).unwrap();
        let e = c.client_config().unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
