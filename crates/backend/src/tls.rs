//! TLS to a backend, as libpq's `sslmode` and `sslrootcert` describe it:
//! the SSLRequest, the handshake, and which certificate checks apply.

use crate::stream::BackendStream;
use cutover_config::{BackendUrl, RootCert, SslMode, Target};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_rustls::TlsConnector;

/// The operating system's CA bundle on Debian, Ubuntu, Alpine and Arch, then
/// Fedora and RHEL: what `sslrootcert=system` reads.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// PostgreSQL's SSLRequest code.
const SSL_REQUEST: i32 = 80877103;

/// How connections to one backend use TLS. Built once from the URL, so a
/// missing or unreadable `sslrootcert` is an error at start-up, not at the
/// first client.
#[derive(Clone)]
pub struct BackendTls {
    mode: SslMode,
    /// None when the mode never uses TLS.
    connector: Option<TlsConnector>,
    server_name: Option<ServerName<'static>>,
    /// Where the trusted CAs came from, for messages.
    roots: String,
}

/// Why TLS could not be set up with a backend.
#[derive(Debug, thiserror::Error)]
pub enum TlsFailure {
    #[error("the server does not accept TLS (it answered the SSLRequest with N; it needs ssl = on), and sslmode={0} requires it")]
    NotOffered(&'static str),
    #[error("the server answered the SSLRequest with {0:?}, not S or N")]
    BadAnswer(char),
    #[error("{0}")]
    Handshake(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sslmode={}", self.mode.name())
    }
}

impl BackendTls {
    /// No TLS at all (SQLite files, tests of the plain path).
    pub fn disabled() -> BackendTls {
        BackendTls {
            mode: SslMode::Disable,
            connector: None,
            server_name: None,
            roots: String::new(),
        }
    }

    /// The settings of `url`, with its CA certificates loaded.
    pub fn new(url: &BackendUrl) -> Result<BackendTls, String> {
        let Target::Tcp { host, .. } = &url.target else {
            return Ok(BackendTls::disabled());
        };
        let mode = url.tls.mode;
        if mode == SslMode::Disable {
            return Ok(BackendTls::disabled());
        }
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| format!("host {host:?} cannot be checked against a certificate: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?;
        let (config, roots) = match &url.tls.root_cert {
            None => {
                let verifier = Arc::new(Unverified(provider));
                let config = builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth();
                (config, String::new())
            }
            Some(root) => {
                let (store, roots) = load_roots(root)?;
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(store),
                    provider,
                )
                .build()
                .map_err(|e| format!("{roots}: {e}"))?;
                let verifier: Arc<dyn ServerCertVerifier> = match mode {
                    SslMode::VerifyFull => webpki,
                    // require with a root certificate checks the chain, as libpq does.
                    _ => Arc::new(ChainOnly(webpki)),
                };
                let config = builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth();
                (config, roots)
            }
        };
        Ok(BackendTls {
            mode,
            connector: Some(TlsConnector::from(Arc::new(config))),
            server_name: Some(server_name),
            roots,
        })
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The TLS client configuration and the name to check, for connections
    /// other libraries make (the control plane's tokio-postgres).
    pub fn client_config(&self) -> Option<(TlsConnector, ServerName<'static>)> {
        Some((self.connector.clone()?, self.server_name.clone()?))
    }

    /// Asks for TLS on a fresh connection as the mode says (or, with
    /// `insist`, as `require` would) and returns the stream to log in over.
    pub async fn start(
        &self,
        mut tcp: TcpStream,
        insist: bool,
    ) -> Result<BackendStream, TlsFailure> {
        let (Some(connector), Some(name)) = (&self.connector, &self.server_name) else {
            return Ok(BackendStream::Plain(tcp));
        };
        if self.mode == SslMode::Allow && !insist {
            return Ok(BackendStream::Plain(tcp));
        }
        let mut request = [0u8; 8];
        request[..4].copy_from_slice(&8i32.to_be_bytes());
        request[4..].copy_from_slice(&SSL_REQUEST.to_be_bytes());
        tcp.write_all(&request).await?;
        // Exactly one byte: anything the server sent after it would be
        // unencrypted data injected before the handshake.
        match tcp.read_u8().await? {
            b'S' => {}
            b'N' if self.mode == SslMode::Prefer && !insist => {
                return Ok(BackendStream::Plain(tcp))
            }
            b'N' => {
                let mode = if insist { "allow" } else { self.mode.name() };
                return Err(TlsFailure::NotOffered(mode));
            }
            other => return Err(TlsFailure::BadAnswer(other as char)),
        }
        connector
            .connect(name.clone(), tcp)
            .await
            .map(|tls| BackendStream::Tls(Box::new(tls)))
            .map_err(|e| TlsFailure::Handshake(self.explain(e)))
    }

    /// A handshake failure in the terms of the settings that caused it.
    pub fn explain(&self, e: std::io::Error) -> String {
        let cert = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .and_then(|tls| match tls {
                rustls::Error::InvalidCertificate(c) => Some(c.clone()),
                _ => None,
            });
        let name = self
            .server_name
            .as_ref()
            .map(|n| n.to_str().into_owned())
            .unwrap_or_default();
        match cert {
            Some(CertificateError::UnknownIssuer) => format!(
                "TLS: the server's certificate is not signed by a CA in {} (sslmode={})",
                self.roots,
                self.mode.name()
            ),
            Some(CertificateError::NotValidForName)
            | Some(CertificateError::NotValidForNameContext { .. }) => format!(
                "TLS: the server's certificate is not valid for host {name} (sslmode=verify-full checks the host name; verify-ca checks only the CA)"
            ),
            Some(CertificateError::Expired) | Some(CertificateError::ExpiredContext { .. }) => {
                "TLS: the server's certificate has expired".to_string()
            }
            Some(other) => format!("TLS: the server's certificate was refused: {other:?}"),
            None => format!("TLS handshake failed: {e}"),
        }
    }
}

/// The CA certificates `root` names, and a description for messages.
fn load_roots(root: &RootCert) -> Result<(rustls::RootCertStore, String), String> {
    let path = match root {
        RootCert::File(path) => path.clone(),
        RootCert::System => SYSTEM_BUNDLES
            .iter()
            .map(Path::new)
            .find(|p| p.exists())
            .map(Path::to_path_buf)
            .ok_or_else(|| {
                format!(
                    "sslrootcert=system: no CA bundle found at {}; install ca-certificates or name a file",
                    SYSTEM_BUNDLES.join(" or ")
                )
            })?,
    };
    let what = format!("sslrootcert={}", path.display());
    let pem = std::fs::read(&path).map_err(|e| format!("{what}: {e}"))?;
    let mut store = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("{what}: {e}"))?;
        store
            .add(cert)
            .map_err(|e| format!("{what}: a certificate cannot be used as a CA: {e}"))?;
    }
    if store.is_empty() {
        return Err(format!("{what}: no PEM certificate found"));
    }
    Ok((store, what))
}

/// verify-ca: the chain must lead to a trusted CA; the host name is not
/// compared.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer and require without sslrootcert: encrypted, the certificate not
/// checked (libpq's behaviour). The handshake's signatures are still
/// verified, so the session key belongs to whoever holds the certificate.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
