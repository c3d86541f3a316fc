//! TLS for clients: the server certificate and key, loaded once at start-up.

use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("proxy.tls_cert {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("proxy.tls_key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Builds the acceptor from PEM files (certificate chain, PKCS#8/PKCS#1/SEC1 key).
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cert.display().to_string(),
        reason,
    };
    let key_err = |reason: String| TlsError::Key {
        path: key.display().to_string(),
        reason,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| cert_err(e.to_string()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no PEM certificate found".to_string()));
    }
    let key_pem = std::fs::read(key).map_err(|e| key_err(e.to_string()))?;
    let private_key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| key_err(e.to_string()))?
        .ok_or_else(|| key_err("no PEM private key found".to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, private_key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The `tls-server-end-point` channel-binding data (RFC 5929) of the first
/// certificate in `cert`: its hash with the certificate signature's hash
/// function, SHA-256 for MD5, SHA-1 and SHA-256 signatures, as libpq
/// computes it.
pub fn server_end_point(cert: &Path) -> Result<Vec<u8>, TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: cert.display().to_string(),
        reason,
    };
    let pem = std::fs::read(cert).map_err(|e| cert_err(e.to_string()))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .ok_or_else(|| cert_err("no PEM certificate found".to_string()))?
        .map_err(|e| cert_err(e.to_string()))?;
    Ok(end_point_hash(der.as_ref()))
}

/// The `tls-server-end-point` hash of a DER certificate: the hash function
/// of its signature, SHA-256 for MD5, SHA-1 and SHA-256 signatures.
pub fn end_point_hash(der: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    // The signature algorithm's OID (DER-encoded) names the hash.
    let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
    const SHA384_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
    const SHA512_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
    const SHA384_ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    const SHA512_ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
    if has(SHA384_RSA) || has(SHA384_ECDSA) {
        sha2::Sha384::digest(der).to_vec()
    } else if has(SHA512_RSA) || has(SHA512_ECDSA) {
        sha2::Sha512::digest(der).to_vec()
    } else {
        sha2::Sha256::digest(der).to_vec()
    }
}
