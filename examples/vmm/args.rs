//! Command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::memory::Backing;
use crate::vm::DirtyMode;

pub const HELP: &str = "\
pagewire-vmm: a small KVM VMM whose guest live-migrates between two processes

USAGE:
  pagewire-vmm --listen 127.0.0.1:PORT [OPTIONS]       destination: wait for a migration
  pagewire-vmm --migrate-to 127.0.0.1:PORT [OPTIONS]   source: boot, run, migrate
  pagewire-vmm [OPTIONS]                               run the guest here for --run-after
  pagewire-vmm --restore-test [OPTIONS]                save and restore within this process

GUEST (the destination must be given the source's):
  --mem-mib N          guest RAM (default 1024)
  --slots N            memslots RAM is split into (default 1)
  --backing B          memfd | anon (default memfd)
  --vcpus N            1 | 2 (default 1)
  --dirty-mbps N       MB/s the guest writes (default 0: idle, still heartbeating)
  --dirty D            bitmap | ring: KVM dirty bitmap with manual protect, or dirty ring
                       (default bitmap)

MIGRATION:
  --after SECS         source: migrate after this long (or on SIGUSR1) (default 5)
  --run-after SECS     keep running this long after migrating, or after a failed
                       migration on the source (default 2)
  --codec C            auto | zstd | lz4 | none (default auto: chosen per frame)
  --channels N         source: channels to open (default 2); destination: the most it
                       accepts, refusing a source that asks for more (default 64)
  --key-file PATH      pre-shared key for the handshake: the file's bytes, one trailing
                       newline removed (default: a built-in test key, public, so
                       refused for an address other than loopback)
  --bandwidth-mbit N   cap the wire at N Mbit/s (default: none)
  --downtime-ms N      pre-copy stops once the expected downtime is below (default 20)
  --max-rounds N       pre-copy round cap (default 30)
  --timeout SECS       source: send/ack timeout (default 10)
  --accept-timeout S   destination: wait this long for the source (default 60)
  --corrupt-first-page restore test only: damage the first page vCPU 0 wrote in the
                       copy before it resumes (the self-check must find it)
  --digest             print a CRC32C of all guest memory while the vCPUs are stopped
                       (source at the pause, destination before resuming)

TLS (give both processes the same options; made certificates are shared through
--tls-dir, default $TMPDIR/pagewire-tls):
";

/// What this process does.
#[derive(Clone, Debug)]
pub enum Role {
    /// Run the guest here.
    Local,
    /// Save and restore into a second VM in this process.
    RestoreTest,
    /// Wait for a migration.
    Listen(SocketAddr),
    /// Boot and migrate to.
    MigrateTo(SocketAddr),
}

/// Codec choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Per frame (`CodecPolicy::Auto`).
    Auto,
    Zstd,
    Lz4,
    None,
}

#[derive(Clone, Debug)]
pub struct Args {
    pub role: Role,
    pub mem_mib: u64,
    pub slots: u32,
    pub backing: Backing,
    pub vcpus: u32,
    pub dirty_mbps: u64,
    pub dirty: DirtyMode,
    pub after: Duration,
    pub run_after: Duration,
    pub codec: Codec,
    pub channels: u16,
    /// `--channels` was given (on the destination it is then a limit).
    pub channels_given: bool,
    pub key_file: Option<PathBuf>,
    pub bandwidth_mbit: u64,
    pub downtime_ms: u64,
    pub max_rounds: u32,
    pub timeout: Duration,
    pub accept_timeout: Duration,
    pub digest: bool,
    pub corrupt: bool,
    pub tls: pagewire_examples::tls::TlsArgs,
}

fn secs(v: &str) -> anyhow::Result<Duration> {
    let s: f64 = v
        .parse()
        .with_context(|| format!("{v} is not a number of seconds"))?;
    Duration::try_from_secs_f64(s).with_context(|| format!("{v} is not a duration"))
}

pub fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        role: Role::Local,
        mem_mib: 1024,
        slots: 1,
        backing: Backing::Memfd,
        vcpus: 1,
        dirty_mbps: 0,
        dirty: DirtyMode::Bitmap,
        after: Duration::from_secs(5),
        run_after: Duration::from_secs(2),
        codec: Codec::Auto,
        channels: 2,
        channels_given: false,
        key_file: None,
        bandwidth_mbit: 0,
        downtime_ms: 20,
        max_rounds: 30,
        timeout: Duration::from_secs(10),
        accept_timeout: Duration::from_secs(60),
        digest: false,
        corrupt: false,
        tls: Default::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--help" | "-h" => {
                print!("{HELP}{}", pagewire_examples::tls::HELP);
                std::process::exit(0);
            }
            "--listen" => a.role = Role::Listen(val()?.parse()?),
            "--migrate-to" => a.role = Role::MigrateTo(val()?.parse()?),
            "--restore-test" => a.role = Role::RestoreTest,
            "--mem-mib" => a.mem_mib = val()?.parse()?,
            "--slots" => a.slots = val()?.parse()?,
            "--backing" => {
                a.backing = match val()?.as_str() {
                    "memfd" => Backing::Memfd,
                    "anon" => Backing::Anon,
                    o => bail!("unknown backing {o} (memfd | anon)"),
                }
            }
            "--vcpus" => a.vcpus = val()?.parse()?,
            "--dirty-mbps" => a.dirty_mbps = val()?.parse()?,
            "--dirty" => {
                a.dirty = match val()?.as_str() {
                    "bitmap" => DirtyMode::Bitmap,
                    "ring" => DirtyMode::Ring,
                    o => bail!("unknown dirty tracking {o} (bitmap | ring)"),
                }
            }
            "--after" => a.after = secs(&val()?)?,
            "--run-after" => a.run_after = secs(&val()?)?,
            "--codec" => {
                a.codec = match val()?.as_str() {
                    "auto" => Codec::Auto,
                    "zstd" => Codec::Zstd,
                    "lz4" => Codec::Lz4,
                    "none" | "raw" => Codec::None,
                    o => bail!("unknown codec {o} (auto | zstd | lz4 | none)"),
                }
            }
            "--channels" => {
                a.channels = val()?.parse()?;
                a.channels_given = true;
            }
            "--key-file" => a.key_file = Some(val()?.into()),
            "--bandwidth-mbit" => a.bandwidth_mbit = val()?.parse()?,
            "--downtime-ms" => a.downtime_ms = val()?.parse()?,
            "--max-rounds" => a.max_rounds = val()?.parse()?,
            "--timeout" => a.timeout = secs(&val()?)?,
            "--accept-timeout" => a.accept_timeout = secs(&val()?)?,
            "--digest" => a.digest = true,
            "--corrupt-first-page" => a.corrupt = true,
            o if a.tls.take(o, &mut val)? => {}
            o => bail!("unknown option {o}; see --help"),
        }
    }
    if a.channels == 0 {
        bail!("--channels must be at least 1");
    }
    // The built-in key is in the source code: beyond this machine anyone who can
    // reach the port could write into the guest, or stand in for the destination.
    let addr = match &a.role {
        Role::Listen(addr) | Role::MigrateTo(addr) => Some(addr),
        _ => None,
    };
    if let Some(addr) = addr
        && a.key_file.is_none()
        && !addr.ip().is_loopback()
    {
        bail!(
            "{addr} is not a loopback address: give --key-file (the built-in test key is \
             public, fine on one machine only)"
        );
    }
    Ok(a)
}
