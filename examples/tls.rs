//! The `--tls` options the demo and the VMM share: PEM files, or certificates made for
//! the run.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use pagewire::tls::PinnedPemFiles;
use pagewire::tls::generate::{self, Pki};
use pagewire::{PemFiles, TlsConfig};

/// Help text of the options, for the programs' `--help`.
pub const HELP: &str = "\
  --tls                TLS 1.3 around every channel (mutual X.509); without PEM files,
                       certificates are made for the run (see --tls-dir)
  --tls-ca PATH        CA certificate (PEM) the peer's certificate must chain to
  --tls-pin PATH       instead of --tls-ca: the peer certificate(s) accepted (PEM),
                       each compared whole (DER), validity checked, no CA or name
  --tls-cert PATH      this side's certificate chain (PEM); needs --tls-ca or
                       --tls-pin, and --tls-key
  --tls-key PATH       this side's private key (PEM)
  --tls-server-name N  name the destination's certificate must carry (default localhost)
  --tls-dir DIR        where made certificates are kept, so that two processes share
                       them (made there when missing)
";

/// The parsed `--tls*` options.
#[derive(Clone, Debug, Default)]
pub struct TlsArgs {
    /// `--tls` (or any other `--tls-*` option) was given.
    pub enabled: bool,
    ca: Option<PathBuf>,
    pin: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
    dir: Option<PathBuf>,
}

impl TlsArgs {
    /// Takes `flag` if it is a TLS option (reading its value with `val`); `Ok(false)`
    /// when it is not one.
    ///
    /// # Errors
    /// A missing value.
    pub fn take(
        &mut self,
        flag: &str,
        val: &mut dyn FnMut() -> anyhow::Result<String>,
    ) -> anyhow::Result<bool> {
        match flag {
            "--tls" => {}
            "--tls-ca" => self.ca = Some(val()?.into()),
            "--tls-pin" => self.pin = Some(val()?.into()),
            "--tls-cert" => self.cert = Some(val()?.into()),
            "--tls-key" => self.key = Some(val()?.into()),
            "--tls-server-name" => self.server_name = Some(val()?),
            "--tls-dir" => self.dir = Some(val()?.into()),
            _ => return Ok(false),
        }
        self.enabled = true;
        Ok(true)
    }

    fn server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or("localhost")
    }

    /// The settings from the files given, if any: a CA or pinned certificates, and
    /// this side's certificate and key; all or none.
    fn given_files(&self) -> anyhow::Result<Option<TlsConfig>> {
        let name = self.server_name();
        Ok(match (&self.ca, &self.pin, &self.cert, &self.key) {
            (Some(ca), None, Some(cert), Some(key)) => Some(TlsConfig::from_pem_files(
                &PemFiles { ca, cert, key },
                name,
            )?),
            (None, Some(pinned), Some(cert), Some(key)) => Some(TlsConfig::from_pinned_pem_files(
                &PinnedPemFiles { pinned, cert, key },
                name,
            )?),
            (None, None, None, None) => None,
            (Some(_), Some(_), _, _) => bail!("--tls-ca and --tls-pin exclude each other"),
            _ => bail!("--tls-cert and --tls-key go together with --tls-ca or --tls-pin"),
        })
    }

    /// The source's and the destination's settings for one process that runs both
    /// (the demo): from the PEM files (one identity for both sides), or made now.
    ///
    /// # Errors
    /// Unreadable or unusable files, or certificate generation failing.
    pub fn pair(&self) -> anyhow::Result<(TlsConfig, TlsConfig)> {
        if let Some(c) = self.given_files()? {
            return Ok((c.clone(), c));
        }
        let pki = match &self.dir {
            Some(d) => load_or_make(d, self.server_name())?,
            None => generate::pki("pagewire run CA", &[self.server_name(), "127.0.0.1"])?,
        };
        Ok((
            pki.source_config(self.server_name())?,
            pki.destination_config()?,
        ))
    }

    /// One side's settings for a process that is a source or a destination (the
    /// VMM): from the PEM files, or from certificates kept in `--tls-dir` (default
    /// `pagewire-tls` in the system's temporary directory), made there when missing.
    ///
    /// # Errors
    /// As [`Self::pair`].
    pub fn side(&self, source: bool) -> anyhow::Result<TlsConfig> {
        if let Some(c) = self.given_files()? {
            return Ok(c);
        }
        let dir = self
            .dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("pagewire-tls"));
        let pki = load_or_make(&dir, self.server_name())?;
        Ok(if source {
            pki.source_config(self.server_name())?
        } else {
            pki.destination_config()?
        })
    }
}

const FILES: [&str; 5] = [
    "ca.pem",
    "source.pem",
    "source.key",
    "destination.pem",
    "destination.key",
];

/// Reads the certificates kept in `dir`, or makes them and writes them there
/// (atomically, so two processes starting together agree on one set).
fn load_or_make(dir: &Path, server_name: &str) -> anyhow::Result<Pki> {
    let read = |dir: &Path| -> std::io::Result<Vec<String>> {
        FILES
            .iter()
            .map(|f| std::fs::read_to_string(dir.join(f)))
            .collect()
    };
    if let Ok(v) = read(dir) {
        return Ok(to_pki(v));
    }
    let pki = generate::pki("pagewire run CA", &[server_name, "127.0.0.1"])?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(".pagewire-tls-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let texts = [
        &pki.ca_pem,
        &pki.source.cert_pem,
        &pki.source.key_pem,
        &pki.destination.cert_pem,
        &pki.destination.key_pem,
    ];
    for (f, text) in FILES.iter().zip(texts) {
        std::fs::write(tmp.join(f), text)?;
    }
    if std::fs::rename(&tmp, dir).is_err() {
        // Another process made them first: use theirs.
        let _ = std::fs::remove_dir_all(&tmp);
        let v = read(dir).with_context(|| format!("reading certificates in {}", dir.display()))?;
        return Ok(to_pki(v));
    }
    eprintln!(
        "TLS: made a CA and certificates for this run in {}",
        dir.display()
    );
    Ok(pki)
}

fn to_pki(mut v: Vec<String>) -> Pki {
    let mut take = || std::mem::take(&mut v.remove(0));
    let ca_pem = take();
    let source = generate::Identity {
        cert_pem: take(),
        key_pem: take(),
    };
    let destination = generate::Identity {
        cert_pem: take(),
        key_pem: take(),
    };
    Pki {
        ca_pem,
        source,
        destination,
    }
}
