//! TLS for the regular PostgreSQL connections, with libpq's `sslmode`
//! meanings. (The replication transport and the Redis client bring their
//! own TLS; they are configured from the same settings.)
//!
//! | sslmode      | encrypted | chain checked          | host name checked |
//! |--------------|-----------|------------------------|-------------------|
//! | disable      | no        |                        |                   |
//! | prefer       | if offered| no                     | no                |
//! | require      | yes       | only with a root cert  | no                |
//! | verify-ca    | yes       | yes (root cert needed) | no                |
//! | verify-full  | yes       | yes                    | yes               |
//!
//! Supabase signs its servers with a private CA, so `verify-full` there
//! needs `ssl_root_cert`; without one, the public web roots are used.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
};

/// TLS modes as libpq names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, unverified.
    Prefer,
    /// TLS without certificate checks.
    Require,
    /// TLS with the chain checked against `ssl_root_cert`.
    VerifyCa,
    /// TLS with the chain and host name checked.
    VerifyFull,
}

impl SslMode {
    /// libpq's name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Builds the client configuration for `mode`.
pub fn client_config(mode: SslMode, root_cert: Option<&Path>) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let roots = |required: bool| -> Result<Arc<RootCertStore>, String> {
        match root_cert {
            Some(path) => load_roots(path).map(Arc::new),
            None if required => Err(
                "postgres.ssl_root_cert is required for sslmode=verify-ca: give the CA certificate file".to_string(),
            ),
            None => Ok(Arc::new(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            })),
        }
    };
    let webpki = |roots: Arc<RootCertStore>| {
        WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|e| format!("tls: {e}"))
    };
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::VerifyFull => webpki(roots(false)?)?,
        SslMode::VerifyCa => Arc::new(IgnoreHostName(webpki(roots(true)?)?)),
        SslMode::Require if root_cert.is_some() => Arc::new(IgnoreHostName(webpki(roots(true)?)?)),
        SslMode::Require | SslMode::Prefer | SslMode::Disable => Arc::new(NoVerification(provider)),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("postgres.ssl_root_cert {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("postgres.ssl_root_cert {}: {e}", path.display()))?;
        store
            .add(cert)
            .map_err(|e| format!("postgres.ssl_root_cert {}: {e}", path.display()))?;
    }
    if store.is_empty() {
        return Err(format!(
            "postgres.ssl_root_cert {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(store)
}

/// Checks the chain, accepts any host name (`verify-ca`).
#[derive(Debug)]
struct IgnoreHostName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreHostName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(Error::InvalidCertificate(
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
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Encrypts without checking who answers (`require` / `prefer` without a
/// root certificate), as libpq does. Signatures are still checked, so the
/// handshake is sound; only the identity is unverified.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
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
    ) -> Result<HandshakeSignatureValid, Error> {
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
