//! Mutual TLS from a Cloud Hypervisor style `tls_dir`.
//!
//! The directory holds `ca-cert.pem` (the CA both sides trust), `server-cert.pem` and
//! `server-key.pem` (the receiver's certificate chain and key) and `client-cert.pem` and
//! `client-key.pem` (the sender's). Each side proves itself with its certificate and accepts
//! only a peer whose certificate the CA signed. The crypto provider is `ring`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::TransportError;

/// The CA certificate file in a TLS directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The receiver's certificate chain.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The receiver's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The sender's certificate chain.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The sender's private key.
pub const CLIENT_KEY: &str = "client-key.pem";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> TransportError {
    TransportError::TlsFile {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_err(path, e))
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, TransportError> {
    let path: PathBuf = dir.join(CA_CERT);
    let mut store = RootCertStore::empty();
    for c in certs(&path)? {
        store.add(c).map_err(|e| file_err(&path, e))?;
    }
    Ok(Arc::new(store))
}

/// The sender's TLS configuration from `dir`: trusts `ca-cert.pem`, presents `client-cert.pem`.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, TransportError> {
    let roots = roots(dir)?;
    let chain = certs(&dir.join(CLIENT_CERT))?;
    let key = key(&dir.join(CLIENT_KEY))?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| file_err(&dir.join(CLIENT_KEY), e))?;
    Ok(Arc::new(cfg))
}

/// The receiver's TLS configuration from `dir`: presents `server-cert.pem`, requires a client
/// certificate signed by `ca-cert.pem`.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, TransportError> {
    let roots = roots(dir)?;
    let chain = certs(&dir.join(SERVER_CERT))?;
    let key = key(&dir.join(SERVER_KEY))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| file_err(&dir.join(SERVER_KEY), e))?;
    Ok(Arc::new(cfg))
}
