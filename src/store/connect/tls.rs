//! The TLS side of a Postgres connection: the root certificates `verify-*` trust, and the
//! rustls client configuration for each [`Verification`] level (see the module above for
//! how `sslmode` picks one).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::{SslMode, Verification, invalid};
use crate::error::Error;

/// The root certificates for `verify-*`: `sslrootcert`, else libpq's default file.
pub(super) fn root_certificates(
    rootcert: Option<String>,
    mode: SslMode,
) -> Result<RootCertStore, Error> {
    let path = match rootcert {
        Some(path) => PathBuf::from(path),
        None => {
            let default = std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".postgresql/root.crt"))
                .filter(|p| p.exists());
            default.ok_or_else(|| {
                invalid(format!(
                    "sslmode={} needs the server's CA certificate: add sslrootcert=/path/to/ca.crt \
                     to DATABASE_URL (on Supabase: download it from the project's database \
                     settings, SSL configuration)",
                    mode.as_str()
                ))
            })?
        }
    };
    let shown = path.display();
    let mut roots = RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(&path)
        .map_err(|e| invalid(format!("cannot read sslrootcert {shown}: {e}")))?;
    for certificate in certificates {
        let certificate =
            certificate.map_err(|e| invalid(format!("sslrootcert {shown} is not PEM: {e}")))?;
        roots
            .add(certificate)
            .map_err(|e| invalid(format!("sslrootcert {shown}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(invalid(format!("sslrootcert {shown} holds no certificate")));
    }
    Ok(roots)
}

/// The client configuration for `verification`; `roots` are required for `Chain` and
/// `Full` (without them the check falls back to none, which `PgTarget::parse` never asks).
pub(super) fn client_config(
    verification: Verification,
    roots: Option<RootCertStore>,
) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3");
    let webpki = roots.map(|roots| {
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .expect("a non-empty root store builds a verifier")
    });
    let chain = match (verification, webpki) {
        (Verification::Full, Some(webpki)) => {
            return builder.with_webpki_verifier(webpki).with_no_client_auth();
        }
        (Verification::Chain, Some(webpki)) => ChainCheck::To(webpki),
        // Asked to verify with nothing to verify against: no certificate passes.
        (Verification::Chain | Verification::Full, None) => ChainCheck::Impossible,
        (Verification::None, _) => ChainCheck::Skip,
    };
    builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Lenient { provider, chain }))
        .with_no_client_auth()
}

/// The checks libpq makes below `verify-full`. The handshake signatures are always checked,
/// so the session is encrypted with the key of the certificate presented; `chain` says what
/// is checked of the certificate itself.
#[derive(Debug)]
struct Lenient {
    provider: Arc<CryptoProvider>,
    chain: ChainCheck,
}

#[derive(Debug)]
enum ChainCheck {
    /// `prefer`, `require` without a root: any certificate is accepted.
    Skip,
    /// `verify-ca`: the certificate must chain to the roots, whatever name it is for.
    To(Arc<WebPkiServerVerifier>),
    /// A verifying mode without roots (no caller builds one: `PgTarget::parse` refuses
    /// first); fails closed rather than accepting any certificate.
    Impossible,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = match &self.chain {
            ChainCheck::Skip => return Ok(ServerCertVerified::assertion()),
            ChainCheck::Impossible => {
                return Err(rustls::Error::General(
                    "no root certificate to verify the server against".to_string(),
                ));
            }
            ChainCheck::To(chain) => chain,
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
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
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifying_mode_without_roots_refuses_every_certificate() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let lenient = Lenient {
            provider,
            chain: ChainCheck::Impossible,
        };
        let name = ServerName::try_from("db.example.com").expect("a valid name");
        let refused = lenient.verify_server_cert(
            &CertificateDer::from(vec![0x30, 0x00]),
            &[],
            &name,
            &[],
            UnixTime::now(),
        );
        assert!(refused.is_err(), "{refused:?}");
    }
}
