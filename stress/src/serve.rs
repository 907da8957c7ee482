//! The destination end for runs across hosts (`pagewire-stress serve`) and the
//! source's side of its control connection.
//!
//! The serve end listens for control connections at `--listen` and binds one
//! [`DestinationListener`] (on the same IP, `--data-port` or any free port) that it
//! reuses for every migration. Per cell, over the control connection (JSON, one
//! message per line):
//!
//! 1. the source sends `cell` (a fresh session id and the settings the destination
//!    needs: transport, pages per frame, memory size, the cell's label); the serve end
//!    starts accepting that session and answers `ready`;
//! 2. the source migrates, then sends `digest`: a CRC32C of all its guest memory taken
//!    after the migration with the writer stopped (or the error that ended it);
//! 3. the serve end computes the same digest over the memory it received, checks the
//!    cell's device-state section, and answers `result`: verified or not, both
//!    digests, the destination's statistics and the CPU seconds of its threads.
//!
//! `baseline` asks for a plain-socket sink: the serve end answers `sink` with a port,
//! reads the given number of connections to their end and answers `sink_bytes`.
//!
//! The control connection is not authenticated; the migrations are (the pre-shared
//! key). A stranger on the control port can only make the serve end wait: 10 s for a
//! hello, up to 30 s for a baseline's connections (at most 64, each read on a thread
//! of its own), or for a session that it cannot authenticate. Control connections are
//! served one after another.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pagewire::{
    Authentication, DestinationControl, DestinationListener, DestinationMemory, Migrated, SessionId,
};
use serde::{Deserialize, Serialize};

use crate::cell::{
    self, CellSpec, Digest, RunResult, SourceGuest, destination_config, result_from, session_id,
};
use crate::cli::TransportKind;
use crate::cpu::CpuMeter;

/// Version of the control messages.
pub const CONTROL_VERSION: u32 = 1;

/// Source to serve end.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First message.
    Hello {
        /// [`CONTROL_VERSION`].
        version: u32,
    },
    /// Accept a migration.
    Cell {
        /// Session id, hex.
        session: String,
        /// Transport.
        transport: TransportKind,
        /// Pages per frame.
        frame_pages: u32,
        /// Guest memory, bytes.
        mem_bytes: u64,
        /// The cell's label (also in its device-state section).
        label: String,
    },
    /// The migration ended on the source.
    Digest {
        /// The source's digest, when it completed.
        digest: Option<Digest>,
        /// Why it did not.
        error: Option<String>,
    },
    /// Open a plain-socket sink for `connections` connections.
    Baseline {
        /// Connections.
        connections: u16,
    },
}

/// Serve end to source.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to `hello`.
    Hello {
        /// [`CONTROL_VERSION`].
        version: u32,
        /// Port of the migration listener (same IP as the control address).
        data_port: u16,
    },
    /// Accepting the cell's session.
    Ready,
    /// The cell's outcome on this end.
    Result {
        /// The memory received matches the source's digest and the cell's section
        /// arrived.
        verified: bool,
        /// This end's digest.
        digest: Option<Digest>,
        /// What failed here.
        error: Option<String>,
        /// CPU seconds of the destination threads.
        cpu_s: f64,
        /// The destination's statistics (`DestinationStats` as JSON).
        stats: Option<serde_json::Value>,
    },
    /// The sink listens on this port.
    Sink {
        /// Port.
        port: u16,
    },
    /// The sink read this many bytes in all.
    SinkBytes {
        /// Bytes.
        bytes: u64,
    },
    /// A request this end could not do.
    Error {
        /// Why.
        message: String,
    },
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex16(s: &str) -> anyhow::Result<[u8; 16]> {
    let mut out = [0u8; 16];
    if s.len() != 32 || !s.is_ascii() {
        bail!("session id {s:?}: 32 hex digits");
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .with_context(|| format!("session id {s:?}: not hex"))?;
    }
    Ok(out)
}

/// One control connection: JSON lines both ways.
#[derive(Debug)]
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn new(s: TcpStream, idle: Duration) -> anyhow::Result<Self> {
        s.set_read_timeout(Some(idle))?;
        s.set_nodelay(true)?;
        Ok(Conn {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    fn send<T: Serialize>(&mut self, msg: &T) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(msg)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        Ok(())
    }

    /// The next message, `None` at the end of the connection.
    fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> anyhow::Result<Option<T>> {
        let mut line = String::new();
        // At most 1 MiB per message.
        let n = (&mut self.reader).take(1 << 20).read_line(&mut line)?;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str(&line).with_context(|| {
            format!("bad control message {:?}", line.trim_end())
        })?))
    }
}

/// The serve end, bound.
#[derive(Debug)]
pub struct Server {
    control: TcpListener,
    listener: Arc<DestinationListener>,
    auth: Authentication,
}

impl Server {
    /// Binds the control address and the migration listener.
    ///
    /// # Errors
    /// Either bind.
    pub fn bind(listen: SocketAddr, data_port: u16, auth: Authentication) -> anyhow::Result<Self> {
        let control = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
        let ip = control.local_addr()?.ip();
        // The listener's own session is never used: every cell is accepted with its
        // own id (`accept_with`).
        let cfg = destination_config(session_id(), auth.clone(), 256, TransportKind::Tcp, 0);
        let listener = DestinationListener::bind(SocketAddr::new(ip, data_port), cfg)
            .with_context(|| format!("binding the migration listener on {ip}:{data_port}"))?;
        Ok(Server {
            control,
            listener: Arc::new(listener),
            auth,
        })
    }

    /// The control address.
    ///
    /// # Errors
    /// The socket's.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.control.local_addr()
    }

    /// Serves control connections one after another until `count` migrations were
    /// served (or forever), printing a line per migration.
    ///
    /// # Errors
    /// Accepting on the control socket.
    pub fn serve(&self, count: Option<u64>, log: &mut dyn Write) -> anyhow::Result<u64> {
        let mut served = 0u64;
        while count.is_none_or(|c| served < c) {
            let (s, peer) = self.control.accept()?;
            let _ = writeln!(log, "control connection from {peer}");
            match self.connection(s, &mut served, count, log) {
                Ok(()) => {
                    let _ = writeln!(log, "{peer} done");
                }
                Err(e) => {
                    let _ = writeln!(log, "{peer}: {e:#}");
                }
            }
        }
        Ok(served)
    }

    fn connection(
        &self,
        s: TcpStream,
        served: &mut u64,
        count: Option<u64>,
        log: &mut dyn Write,
    ) -> anyhow::Result<()> {
        // A stranger that sends no hello holds the serve end for 10 s, not 600.
        let mut conn = Conn::new(s, Duration::from_secs(10))?;
        match conn.recv::<Request>()? {
            Some(Request::Hello { version }) if version == CONTROL_VERSION => {}
            Some(Request::Hello { version }) => {
                conn.send(&Reply::Error {
                    message: format!(
                        "control version {version}; this end speaks {CONTROL_VERSION}"
                    ),
                })?;
                bail!("control version {version}");
            }
            other => bail!("expected hello, got {other:?}"),
        }
        conn.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(600)))?;
        conn.send(&Reply::Hello {
            version: CONTROL_VERSION,
            data_port: self.listener.local_addr()?.port(),
        })?;
        while count.is_none_or(|c| *served < c) {
            let Some(req) = conn.recv::<Request>()? else {
                return Ok(());
            };
            match req {
                Request::Cell {
                    session,
                    transport,
                    frame_pages,
                    mem_bytes,
                    label,
                } => {
                    let reply = self.cell(
                        &mut conn,
                        &session,
                        transport,
                        frame_pages,
                        mem_bytes,
                        &label,
                    );
                    *served += 1;
                    let reply = reply.unwrap_or_else(|e| Reply::Result {
                        verified: false,
                        digest: None,
                        error: Some(format!("{e:#}")),
                        cpu_s: 0.0,
                        stats: None,
                    });
                    if let Reply::Result {
                        verified,
                        cpu_s,
                        error,
                        ..
                    } = &reply
                    {
                        let _ = writeln!(
                            log,
                            "migration {served}: {label}: {} ({cpu_s:.3} CPU-s on this end){}",
                            if *verified {
                                "verified"
                            } else {
                                "NOT verified"
                            },
                            error.as_ref().map_or(String::new(), |e| format!(": {e}"))
                        );
                    }
                    conn.send(&reply)?;
                }
                Request::Baseline { connections }
                    if !(1..=MAX_SINK_CONNECTIONS).contains(&connections) =>
                {
                    // Refused; the connection goes on (the source's other cells).
                    conn.send(&Reply::Error {
                        message: format!(
                            "a baseline of {connections} connections; this end takes 1 to {MAX_SINK_CONNECTIONS}"
                        ),
                    })?;
                }
                Request::Baseline { connections } => sink(&mut conn, connections)?,
                other => bail!("unexpected {other:?}"),
            }
        }
        Ok(())
    }

    fn cell(
        &self,
        conn: &mut Conn,
        session: &str,
        transport: TransportKind,
        frame_pages: u32,
        mem_bytes: u64,
        label: &str,
    ) -> anyhow::Result<Reply> {
        let session = SessionId(unhex16(session)?);
        let dcfg = destination_config(
            session,
            self.auth.clone(),
            frame_pages,
            transport,
            mem_bytes,
        );
        let control = DestinationControl::new();
        let meter = CpuMeter::start(Duration::from_millis(10));
        let listener = self.listener.clone();
        let control2 = control.clone();
        let dst = std::thread::Builder::new()
            .name("stress-dst".into())
            .spawn(move || -> anyhow::Result<Migrated> {
                let d =
                    listener.accept_controlled(&dcfg, DestinationMemory::Anonymous, &control2)?;
                Ok(d.wait()?)
            })?;
        conn.send(&Reply::Ready)?;
        let source = conn.recv::<Request>();
        let source_digest = match source {
            Ok(Some(Request::Digest {
                digest: Some(d), ..
            })) => Ok(d),
            Ok(Some(Request::Digest { error, .. })) => Err(anyhow::anyhow!(
                "the source failed: {}",
                error.unwrap_or_default()
            )),
            Ok(other) => Err(anyhow::anyhow!(
                "expected the source's digest, got {other:?}"
            )),
            Err(e) => Err(e),
        };
        if source_digest.is_err() {
            control.cancel();
        }
        meter.sample();
        let migrated = dst
            .join()
            .map_err(|_| anyhow::anyhow!("destination thread panicked"))?;
        let sampled = meter.finish().1;
        let source_digest = source_digest?;
        let m = migrated.context("the destination failed")?;
        // pagewire's own accounting, as a local run reports; the sampling where it
        // has none.
        let cpu_s = if m.stats.cpu.seconds > 0.0 {
            m.stats.cpu.seconds
        } else {
            sampled
        };
        let ours = cell::digest(&m.memory);
        let mut error = None;
        if ours != source_digest {
            error = Some(format!(
                "digest mismatch: source {source_digest:?}, destination {ours:?}"
            ));
        } else if let Some(s) = m.device_state.iter().find(|s| s.name == cell::SECTION) {
            if String::from_utf8_lossy(&s.data).lines().next() != Some(label) {
                error = Some("the device-state section names another cell".into());
            }
        } else {
            error = Some("the cell's device-state section did not arrive".into());
        }
        Ok(Reply::Result {
            verified: error.is_none(),
            digest: Some(ours),
            error,
            cpu_s,
            stats: serde_json::to_value(&m.stats).ok(),
        })
    }
}

/// Most connections of one plain-socket baseline (a thread and 1 MiB each).
const MAX_SINK_CONNECTIONS: u16 = 64;

/// Reads `connections` plain-socket connections to their end on a fresh port.
fn sink(conn: &mut Conn, connections: u16) -> anyhow::Result<()> {
    let ip: IpAddr = conn.writer.local_addr()?.ip();
    let l = TcpListener::bind(SocketAddr::new(ip, 0))?;
    l.set_nonblocking(true)?;
    conn.send(&Reply::Sink {
        port: l.local_addr()?.port(),
    })?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let total = std::thread::scope(|s| -> anyhow::Result<u64> {
        let mut handles = Vec::new();
        while handles.len() < connections as usize {
            match l.accept() {
                Ok((mut c, _)) => {
                    c.set_nonblocking(false)?;
                    c.set_read_timeout(Some(Duration::from_secs(60)))?;
                    let reader = std::thread::Builder::new()
                        .name("sink".into())
                        .spawn_scoped(s, move || crate::sweep::drain(&mut c))
                        .context("starting a baseline reader thread")?;
                    handles.push(reader);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!("the baseline's connections did not all arrive in 30 s");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(handles.into_iter().map(|h| h.join().unwrap_or(0)).sum())
    })?;
    conn.send(&Reply::SinkBytes { bytes: total })
}

/// The source's end of the control connection.
#[derive(Debug)]
pub struct Client {
    conn: Conn,
    data: SocketAddr,
}

impl Client {
    /// Connects and says hello.
    ///
    /// # Errors
    /// Connecting; a serve end of another control version.
    pub fn connect(to: SocketAddr) -> anyhow::Result<Self> {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .with_context(|| format!("connecting to the serve end at {to}"))?;
        let mut conn = Conn::new(s, Duration::from_secs(600))?;
        conn.send(&Request::Hello {
            version: CONTROL_VERSION,
        })?;
        match conn.recv::<Reply>()? {
            Some(Reply::Hello { version, data_port }) if version == CONTROL_VERSION => Ok(Client {
                conn,
                data: SocketAddr::new(to.ip(), data_port),
            }),
            other => bail!("the serve end at {to} answered {other:?}"),
        }
    }

    /// The plain-socket ceiling to the serve end, Gbit/s.
    ///
    /// # Errors
    /// The sockets or the control connection.
    pub fn baseline(&mut self, connections: u16, for_how_long: Duration) -> anyhow::Result<f64> {
        self.conn.send(&Request::Baseline { connections })?;
        let port = match self.conn.recv::<Reply>()? {
            Some(Reply::Sink { port }) => port,
            other => bail!("expected a sink, got {other:?}"),
        };
        let addr = SocketAddr::new(self.data.ip(), port);
        let start = Instant::now();
        std::thread::scope(|s| -> anyhow::Result<()> {
            let ws: Vec<_> = (0..connections)
                .map(|_| s.spawn(move || crate::sweep::write_for(addr, start, for_how_long)))
                .collect();
            for w in ws {
                w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
            }
            Ok(())
        })?;
        match self.conn.recv::<Reply>()? {
            Some(Reply::SinkBytes { bytes }) => {
                Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
            }
            other => bail!("expected the sink's byte count, got {other:?}"),
        }
    }

    /// One repetition of a cell against the serve end.
    ///
    /// # Errors
    /// The control connection or the threads; a failed migration is a [`RunResult`].
    pub fn run_cell(
        &mut self,
        spec: &CellSpec,
        repetition: u32,
        guest: &mut SourceGuest,
        auth: &Authentication,
    ) -> anyhow::Result<RunResult> {
        guest.prepare();
        let session = session_id();
        self.conn.send(&Request::Cell {
            session: hex(&session.0),
            transport: spec.transport,
            frame_pages: spec.frame_pages,
            mem_bytes: spec.mem_mib << 20,
            label: spec.label(),
        })?;
        match self.conn.recv::<Reply>()? {
            Some(Reply::Ready) => {}
            other => bail!("expected ready, got {other:?}"),
        }
        let memory = guest.memory.clone();
        let meter = CpuMeter::start(Duration::from_millis(10));
        let data = self.data;
        let auth = auth.clone();
        let out = std::thread::scope(|s| {
            let meter = &meter;
            std::thread::Builder::new()
                .name("stress-src".into())
                .spawn_scoped(s, move || {
                    cell::source_side(spec, memory, data, session, auth, &|| meter.sample())
                })
                .map_err(anyhow::Error::from)
                .and_then(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("source thread panicked"))
                })
        })?;
        guest.mark_dirty(spec.dirty_mbps > 0.0);
        let src_cpu = meter.finish().0;
        let (digest, error) = match &out {
            Ok(o) if o.result.is_ok() => (Some(cell::digest(&guest.memory)), None),
            Ok(o) => (None, o.result.as_ref().err().map(|e| e.to_string())),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        self.conn.send(&Request::Digest { digest, error })?;
        let reply = self.conn.recv::<Reply>()?;
        let out = match out {
            Ok(o) => o,
            Err(e) => return Ok(RunResult::failed(repetition, spec, &e)),
        };
        let (verified, dst_error, dst_cpu, dst_stats) = match reply {
            Some(Reply::Result {
                verified,
                error,
                cpu_s,
                stats,
                ..
            }) => (verified, error, cpu_s, stats),
            other => bail!("expected the destination's result, got {other:?}"),
        };
        let mut r = result_from(repetition, spec, out, (src_cpu, dst_cpu));
        if r.outcome == cell::Outcome::Completed {
            r.verified = verified;
            if !verified {
                r.outcome = cell::Outcome::Failed;
                r.error = Some(format!(
                    "the serve end did not verify: {}",
                    dst_error.unwrap_or_default()
                ));
            }
            r.destination_stats = dst_stats;
        }
        Ok(r)
    }
}
