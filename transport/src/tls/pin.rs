//! Pinned peer certificates: the peer is accepted only if the certificate it presents
//! is, byte for byte, one of the certificates this side was configured with.
//!
//! - **Match**: the whole DER of the peer's end-entity certificate is compared with each
//!   pinned certificate (no hash: the pinned set is small and held in full). The
//!   intermediates the peer sends are ignored, and no CA, name or key usage is checked:
//!   the pin is the identity (a source still sends the configured server name as SNI).
//! - **Validity**: a pinned certificate outside its validity period (`notBefore` ..=
//!   `notAfter`, read when the pin is configured) is refused at the handshake with
//!   rustls' `ExpiredContext` / `NotValidYetContext`, as a CA-verified one would be.
//! - **Possession**: the TLS 1.3 `CertificateVerify` signature is verified with the
//!   pinned certificate's key and the provider's algorithms
//!   ([`rustls::crypto::verify_tls13_signature`]), so a peer that merely replays a
//!   pinned certificate is refused.
//! - A certificate that is not pinned fails with
//!   [`CertificateError::Other`] holding a [`NotPinned`].

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError};

use super::TlsError;

/// The peer presented a certificate that is not one of the pinned certificates.
#[derive(Clone, Copy, thiserror::Error)]
#[error("the peer's certificate is not one of the pinned certificates")]
pub struct NotPinned;

/// rustls shows a [`CertificateError::Other`] with `Debug` (`{e}` of the session error
/// reads "invalid peer certificate: Other(OtherError(NotPinned(\"...\")))"), so the
/// reason is spelled out there too.
impl std::fmt::Debug for NotPinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("NotPinned").field(&self.to_string()).finish()
    }
}

/// One pinned certificate and its validity period (seconds since the Unix epoch).
#[derive(Clone, Debug)]
struct Pin {
    der: CertificateDer<'static>,
    not_before: u64,
    not_after: u64,
}

/// The certificates a side accepts from its peer, and the algorithms that check the
/// peer's handshake signature.
#[derive(Clone, Debug)]
pub(crate) struct PinnedCerts {
    pins: Vec<Pin>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Seconds since the epoch of an X.509 time, before 1970 taken as 0.
fn secs(t: &x509_parser::time::ASN1Time) -> u64 {
    u64::try_from(t.timestamp()).unwrap_or(0)
}

impl PinnedCerts {
    /// Pins `certs` (at least one), reading each one's validity period.
    ///
    /// # Errors
    /// [`TlsError::Pinned`] when `certs` is empty or one is not a DER certificate.
    pub(crate) fn new(
        certs: Vec<CertificateDer<'static>>,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Result<Self, TlsError> {
        if certs.is_empty() {
            return Err(TlsError::Pinned("no certificate to pin".into()));
        }
        let pins = certs
            .into_iter()
            .map(|der| {
                let (rest, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| {
                    TlsError::Pinned(format!("a pinned certificate does not parse: {e}"))
                })?;
                if !rest.is_empty() {
                    return Err(TlsError::Pinned(
                        "a pinned certificate has trailing bytes".into(),
                    ));
                }
                let v = cert.validity();
                let (not_before, not_after) = (secs(&v.not_before), secs(&v.not_after));
                Ok(Pin {
                    der: der.clone(),
                    not_before,
                    not_after,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { pins, algorithms })
    }

    /// Accepts `presented` if it is pinned and valid at `now`.
    fn check(&self, presented: &CertificateDer<'_>, now: UnixTime) -> Result<(), rustls::Error> {
        let pin = self
            .pins
            .iter()
            .find(|p| p.der.as_ref() == presented.as_ref())
            .ok_or_else(|| {
                rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
                    NotPinned,
                ))))
            })?;
        let t = now.as_secs();
        if t > pin.not_after {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ExpiredContext {
                    time: now,
                    not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                        pin.not_after,
                    )),
                },
            ));
        }
        if t < pin.not_before {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYetContext {
                    time: now,
                    not_before: UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                        pin.not_before,
                    )),
                },
            ));
        }
        Ok(())
    }
}

/// The handshake signature checks of both verifiers: with the pinned certificate's key
/// and the provider's algorithms (TLS 1.2 never gets this far: configurations are
/// TLS 1.3 only).
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.0.algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.0.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.algorithms.supported_schemes()
        }
    };
}

/// A source's verifier of the destination's certificate: pinned certificates only.
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier(pub(crate) PinnedCerts);

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.check(end_entity, now)?;
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!();
}

/// A destination's verifier of the source's certificate: one is required, and it must
/// be pinned.
#[derive(Debug)]
pub(crate) struct PinnedClientVerifier(pub(crate) PinnedCerts);

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.check(end_entity, now)?;
        Ok(ClientCertVerified::assertion())
    }

    signature_checks!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::generate::{self, Validity};
    use rustls::pki_types::pem::PemObject;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn algorithms() -> WebPkiSupportedAlgorithms {
        rustls::crypto::ring::default_provider().signature_verification_algorithms
    }

    #[test]
    fn only_the_pinned_certificate_is_accepted() {
        let p = generate::pki("ca", &["localhost"]).unwrap();
        let pins = PinnedCerts::new(vec![der(&p.destination.cert_pem)], algorithms()).unwrap();
        let now = UnixTime::now();
        let server = PinnedServerVerifier(pins.clone());
        let name = ServerName::try_from("localhost").unwrap();
        assert!(
            server
                .verify_server_cert(&der(&p.destination.cert_pem), &[], &name, &[], now)
                .is_ok()
        );
        // Signed by the same CA, not pinned.
        let e = server
            .verify_server_cert(&der(&p.source.cert_pem), &[], &name, &[], now)
            .unwrap_err();
        let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = &e
        else {
            panic!("{e}");
        };
        assert!(inner.downcast_ref::<NotPinned>().is_some(), "{e}");
        let client = PinnedClientVerifier(pins);
        assert!(client.client_auth_mandatory());
        assert!(
            client
                .verify_client_cert(&der(&p.source.cert_pem), &[], now)
                .is_err()
        );
    }

    #[test]
    fn a_pinned_certificate_is_checked_for_validity() {
        let p =
            generate::pki_with("ca", &["localhost"], Validity::Expired, Validity::Current).unwrap();
        let pins = PinnedCerts::new(vec![der(&p.source.cert_pem)], algorithms()).unwrap();
        let e = PinnedClientVerifier(pins.clone())
            .verify_client_cert(&der(&p.source.cert_pem), &[], UnixTime::now())
            .unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
            ),
            "{e}"
        );
        // Forty days ago it was valid, and before that not yet.
        let then = |days: u64| {
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                UnixTime::now().as_secs() - days * 86_400,
            ))
        };
        assert!(pins.check(&der(&p.source.cert_pem), then(10)).is_ok());
        assert!(matches!(
            pins.check(&der(&p.source.cert_pem), then(40)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYetContext { .. }
            ))
        ));
    }

    #[test]
    fn pinning_needs_certificates() {
        assert!(matches!(
            PinnedCerts::new(vec![], algorithms()),
            Err(TlsError::Pinned(_))
        ));
        assert!(matches!(
            PinnedCerts::new(
                vec![CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])],
                algorithms()
            ),
            Err(TlsError::Pinned(_))
        ));
    }
}
