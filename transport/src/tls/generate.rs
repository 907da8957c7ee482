//! Certificates made for one run, for demos and tests: a CA and two leaf certificates
//! (source and destination) it signs, as PEM. Not for production: the keys live in
//! memory only and nobody else trusts the CA.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::{TlsConfig, TlsError};

/// One side's certificate and key, PEM.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
}

/// A CA and the two identities it signed.
#[derive(Clone, Debug)]
pub struct Pki {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The source's identity.
    pub source: Identity,
    /// The destination's identity, valid for the names given.
    pub destination: Identity,
}

/// How long the leaf certificates are valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// From a day ago to a year from now.
    Current,
    /// Expired yesterday (for tests).
    Expired,
}

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
#[error("generating certificates failed: {0}")]
pub struct GenerateError(#[from] rcgen::Error);

fn leaf(
    names: &[&str],
    common_name: &str,
    validity: Validity,
    issuer: &Issuer<'_, KeyPair>,
) -> Result<Identity, GenerateError> {
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    p.distinguished_name
        .push(DnType::CommonName, common_name.to_owned());
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    match validity {
        Validity::Current => {
            p.not_before = now - time::Duration::days(1);
            p.not_after = now + time::Duration::days(365);
        }
        Validity::Expired => {
            p.not_before = now - time::Duration::days(30);
            p.not_after = now - time::Duration::days(1);
        }
    }
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    Ok(Identity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A new CA (named `ca_name`) and a source and a destination certificate signed by it;
/// the destination's is valid for `destination_names` (DNS names or IP addresses, such
/// as `"localhost"` and `"127.0.0.1"`).
///
/// # Errors
/// [`GenerateError`] from rcgen.
pub fn pki(ca_name: &str, destination_names: &[&str]) -> Result<Pki, GenerateError> {
    pki_with(
        ca_name,
        destination_names,
        Validity::Current,
        Validity::Current,
    )
}

/// [`pki`] with the validity of each leaf chosen (tests of expired certificates).
///
/// # Errors
/// [`GenerateError`] from rcgen.
pub fn pki_with(
    ca_name: &str,
    destination_names: &[&str],
    source: Validity,
    destination: Validity,
) -> Result<Pki, GenerateError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    Ok(Pki {
        ca_pem: ca_cert.pem(),
        source: leaf(&["pagewire-source"], "pagewire source", source, &issuer)?,
        destination: leaf(
            destination_names,
            "pagewire destination",
            destination,
            &issuer,
        )?,
    })
}

impl Pki {
    /// The source's [`TlsConfig`], expecting the destination's certificate to be valid
    /// for `server_name`.
    ///
    /// # Errors
    /// [`TlsError`] from [`TlsConfig::from_pem`].
    pub fn source_config(&self, server_name: &str) -> Result<TlsConfig, TlsError> {
        TlsConfig::from_pem(
            self.ca_pem.as_bytes(),
            self.source.cert_pem.as_bytes(),
            self.source.key_pem.as_bytes(),
            server_name,
        )
    }

    /// The destination's [`TlsConfig`].
    ///
    /// # Errors
    /// [`TlsError`] from [`TlsConfig::from_pem`].
    pub fn destination_config(&self) -> Result<TlsConfig, TlsError> {
        TlsConfig::from_pem(
            self.ca_pem.as_bytes(),
            self.destination.cert_pem.as_bytes(),
            self.destination.key_pem.as_bytes(),
            "pagewire-source",
        )
    }

    /// The source's [`TlsConfig`] pinning the destination's certificate (no CA).
    ///
    /// # Errors
    /// [`TlsError`] from [`TlsConfig::from_pinned_pem`].
    pub fn source_pinned_config(&self, server_name: &str) -> Result<TlsConfig, TlsError> {
        TlsConfig::from_pinned_pem(
            self.destination.cert_pem.as_bytes(),
            self.source.cert_pem.as_bytes(),
            self.source.key_pem.as_bytes(),
            server_name,
        )
    }

    /// The destination's [`TlsConfig`] pinning the source's certificate (no CA).
    ///
    /// # Errors
    /// [`TlsError`] from [`TlsConfig::from_pinned_pem`].
    pub fn destination_pinned_config(&self) -> Result<TlsConfig, TlsError> {
        TlsConfig::from_pinned_pem(
            self.source.cert_pem.as_bytes(),
            self.destination.cert_pem.as_bytes(),
            self.destination.key_pem.as_bytes(),
            "pagewire-source",
        )
    }
}
