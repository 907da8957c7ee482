//! What a side needs to speak TLS 1.3: rustls configurations for either role, built
//! from PEM files or handed over by the VMM.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{RootCertStore, version::TLS13};

use super::TlsError;
use super::pin::{PinnedCerts, PinnedClientVerifier, PinnedServerVerifier};

/// Whether a session's channels are encrypted. There is no automatic choice: a side is
/// either configured for TLS, and then refuses plaintext peers
/// ([`RejectReason::ENCRYPTION_REQUIRED`](pagewire_protocol::RejectReason::ENCRYPTION_REQUIRED)),
/// or declared plaintext, and then refuses TLS peers
/// ([`RejectReason::ENCRYPTION_UNSUPPORTED`](pagewire_protocol::RejectReason::ENCRYPTION_UNSUPPORTED)).
#[derive(Clone, Debug, Default)]
pub enum Encryption {
    /// Frames cross the network in clear and unauthenticated after the handshake
    /// (PROTOCOL.md, "Security considerations"): only for trusted networks.
    #[default]
    Plaintext,
    /// TLS 1.3 with mutual X.509 authentication around every channel.
    Tls(TlsConfig),
}

impl Encryption {
    /// The TLS settings, when encrypted.
    pub fn tls(&self) -> Option<&TlsConfig> {
        match self {
            Self::Plaintext => None,
            Self::Tls(t) => Some(t),
        }
    }
}

/// TLS 1.3 settings of one side: the rustls configuration of its role (a source is a
/// TLS client, a destination a TLS server) and, for a source, the name the
/// destination's certificate must carry.
///
/// Both roles may be set (one `TlsConfig` for a VMM that is source and destination);
/// a side uses the one of its role and fails with [`TlsError::Config`] when it is
/// missing. Every configuration must allow TLS 1.3 (configurations built here allow
/// only TLS 1.3), and a channel that negotiated anything else is refused.
#[derive(Clone)]
pub struct TlsConfig {
    client: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    server: Option<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("client", &self.client.as_ref().map(|(_, name)| name))
            .field("server", &self.server.is_some())
            .finish()
    }
}

/// PEM inputs of one side: the CA that signs the peer's certificate, this side's
/// certificate chain and its private key.
#[derive(Clone, Debug)]
pub struct PemFiles<'a> {
    /// The CA certificate(s) the peer's certificate must chain to.
    pub ca: &'a Path,
    /// This side's certificate chain, leaf first.
    pub cert: &'a Path,
    /// This side's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: &'a Path,
}

/// PEM inputs of a side that pins its peer's certificate instead of trusting a CA
/// ([`TlsConfig::from_pinned_pem_files`]).
#[derive(Clone, Debug)]
pub struct PinnedPemFiles<'a> {
    /// The peer certificate(s) accepted (PEM; any number, each compared whole).
    pub pinned: &'a Path,
    /// This side's certificate chain, leaf first.
    pub cert: &'a Path,
    /// This side's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: &'a Path,
}

/// ring's TLS 1.3 suites, AES-128-GCM first: as safe in TLS 1.3 and the fastest to
/// seal and open on CPUs with AES instructions (what a migration spends on TLS).
fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    }
}

impl TlsConfig {
    /// A source's settings from a rustls client configuration (which must present a
    /// client certificate: destinations require one) and the name the destination's
    /// certificate must be valid for. The configuration is used with secret
    /// extraction enabled (the record layer runs outside rustls after the handshake).
    pub fn client(config: Arc<rustls::ClientConfig>, server_name: ServerName<'static>) -> Self {
        let mut c = (*config).clone();
        c.enable_secret_extraction = true;
        Self {
            client: Some((Arc::new(c), server_name)),
            server: None,
        }
    }

    /// A destination's settings from a rustls server configuration (whose client
    /// verifier should require a certificate: with one that does not, a source without
    /// a certificate is let in).
    ///
    /// The configuration is used with secret extraction enabled and without session
    /// tickets (the record layer runs outside rustls after the handshake; a channel
    /// is never resumed).
    pub fn server(config: Arc<rustls::ServerConfig>) -> Self {
        let mut c = (*config).clone();
        c.enable_secret_extraction = true;
        c.send_tls13_tickets = 0;
        Self {
            client: None,
            server: Some(Arc::new(c)),
        }
    }

    /// Both roles from PEM files: this side's certificate and key, used as client
    /// certificate and as server certificate, and the CA that must have signed the
    /// peer's certificate (and, for a source, that certificate must be valid for
    /// `server_name`, a DNS name or an IP address). TLS 1.3 only, ring's cipher suites
    /// with AES-128-GCM preferred.
    ///
    /// # Errors
    /// [`TlsError::Pem`] when a file cannot be read or holds no usable item,
    /// [`TlsError::Config`] when rustls refuses the certificates or key.
    pub fn from_pem_files(files: &PemFiles<'_>, server_name: &str) -> Result<Self, TlsError> {
        Self::from_pem(
            &read("CA certificate", files.ca)?,
            &read("certificate chain", files.cert)?,
            &read("private key", files.key)?,
            server_name,
        )
    }

    /// As [`Self::from_pem_files`], from PEM text in memory.
    ///
    /// # Errors
    /// As [`Self::from_pem_files`].
    pub fn from_pem(
        ca: &[u8],
        cert_chain: &[u8],
        key: &[u8],
        server_name: &str,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in certs(ca, "CA certificate")? {
            roots.add(c).map_err(TlsError::Config)?;
        }
        Self::build(Trust::Ca(Arc::new(roots)), cert_chain, key, server_name)
    }

    /// Both roles from PEM files, trusting pinned certificates instead of a CA: the
    /// peer is accepted only if its certificate is exactly (the whole DER) one of those
    /// in [`PinnedPemFiles::pinned`], within its validity period, and it proves it
    /// holds the certificate's key (module `pin`: no CA, name or key usage is
    /// checked; `server_name` is only sent as SNI). Otherwise as
    /// [`Self::from_pem_files`].
    ///
    /// # Errors
    /// As [`Self::from_pem_files`]; [`TlsError::Pinned`] when a pinned certificate
    /// does not parse.
    pub fn from_pinned_pem_files(
        files: &PinnedPemFiles<'_>,
        server_name: &str,
    ) -> Result<Self, TlsError> {
        Self::from_pinned_pem(
            &read("pinned certificates", files.pinned)?,
            &read("certificate chain", files.cert)?,
            &read("private key", files.key)?,
            server_name,
        )
    }

    /// As [`Self::from_pinned_pem_files`], from PEM text in memory.
    ///
    /// # Errors
    /// As [`Self::from_pinned_pem_files`].
    pub fn from_pinned_pem(
        pinned: &[u8],
        cert_chain: &[u8],
        key: &[u8],
        server_name: &str,
    ) -> Result<Self, TlsError> {
        let pins = PinnedCerts::new(
            certs(pinned, "pinned certificates")?,
            provider().signature_verification_algorithms,
        )?;
        Self::build(Trust::Pinned(pins), cert_chain, key, server_name)
    }

    /// Both roles: this side's identity, and how the peer's is verified.
    fn build(
        trust: Trust,
        cert_chain: &[u8],
        key: &[u8],
        server_name: &str,
    ) -> Result<Self, TlsError> {
        let chain = certs(cert_chain, "certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(pem_err("private key"))?;
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
        let provider = Arc::new(provider());
        let client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&TLS13])
            .map_err(TlsError::Config)?;
        let (client, verifier): (_, Arc<dyn ClientCertVerifier>) = match trust {
            Trust::Ca(roots) => (
                client.with_root_certificates(roots.clone()),
                WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?,
            ),
            Trust::Pinned(pins) => (
                client
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier(pins.clone()))),
                Arc::new(PinnedClientVerifier(pins)),
            ),
        };
        let mut client = client
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::Config)?;
        client.enable_secret_extraction = true;
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
        // A channel is one long connection: no resumption tickets to send.
        server.send_tls13_tickets = 0;
        server.enable_secret_extraction = true;
        Ok(Self {
            client: Some((Arc::new(client), name)),
            server: Some(Arc::new(server)),
        })
    }

    /// The rustls client configuration and the expected server name, if set.
    pub fn rustls_client(&self) -> Option<(&Arc<rustls::ClientConfig>, &ServerName<'static>)> {
        self.client.as_ref().map(|(c, n)| (c, n))
    }

    /// The rustls server configuration, if set.
    pub fn rustls_server(&self) -> Option<&Arc<rustls::ServerConfig>> {
        self.server.as_ref()
    }

    /// The source's configuration and the destination's expected name.
    pub(crate) fn client_config(
        &self,
    ) -> Result<&(Arc<rustls::ClientConfig>, ServerName<'static>), TlsError> {
        self.client.as_ref().ok_or(TlsError::MissingRole("client"))
    }

    /// The destination's configuration.
    pub(crate) fn server_config(&self) -> Result<&Arc<rustls::ServerConfig>, TlsError> {
        self.server.as_ref().ok_or(TlsError::MissingRole("server"))
    }
}

/// How a side verifies its peer's certificate.
enum Trust {
    /// It chains to one of these CAs (and, for a destination, has the server name).
    Ca(Arc<RootCertStore>),
    /// It is one of these.
    Pinned(PinnedCerts),
}

/// Reads a PEM file.
fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Pem {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// [`TlsError::Pem`] for PEM text in memory.
fn pem_err(what: &'static str) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError {
    move |e| TlsError::Pem {
        what,
        path: "(in memory)".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// The certificates in PEM text: at least one.
fn certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let v = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(what))?;
    if v.is_empty() {
        return Err(pem_err(what)(rustls::pki_types::pem::Error::NoItemsFound));
    }
    Ok(v)
}
