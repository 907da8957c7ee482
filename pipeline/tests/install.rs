//! Whole migrations into destination memory whose pages are installed with userfaultfd
//! ([`Prefault::Install`]): memory equal byte for byte while a writer keeps dirtying
//! the source (so pages sent zero or uniform in one round come back as data in a later
//! one), for every codec's decode path and both transports.

mod common;

use std::time::Duration;

use common::*;
use pagewire::{DestinationConfig, DestinationListener, Prefault, Source, SourceConfig};
use pagewire_protocol::{Authentication, CodecId, MemoryLayout, RegionDesc, RegionId};
use pagewire_transport::session::Backend;

/// Whether userfaultfd can be had here; says so visibly when not.
fn userfaultfd_available() -> bool {
    let layout = MemoryLayout::new(
        PAGE as u32,
        [RegionDesc {
            id: RegionId(0),
            backing_page_size: PAGE as u32,
            guest_addr: pagewire::GuestAddr(0),
            length: PAGE as u64,
        }],
    )
    .unwrap();
    let m = pagewire::GuestMemory::anonymous(&layout).unwrap();
    match m.install_pages() {
        Ok(()) => true,
        Err(e) => {
            assert!(
                std::env::var("PAGEWIRE_REQUIRE_USERFAULTFD").as_deref() != Ok("1"),
                "PAGEWIRE_REQUIRE_USERFAULTFD=1 but userfaultfd is unavailable: {e}"
            );
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipped: userfaultfd unavailable: {e}: {:?}",
                std::error::Error::source(&e)
            );
            false
        }
    }
}

fn run(codec: CodecId, backend: Backend) {
    run_with(codec, backend, "software");
}

/// Migrates with `codec`, the destination's codec engine on `dst_accel`; returns the
/// destination's statistics.
fn run_with(codec: CodecId, backend: Backend, dst_accel: &str) -> pagewire::DestinationStats {
    let available = userfaultfd_available();
    let src_mem = memory(32);
    fill(&src_mem, 11);
    let mut dcfg = DestinationConfig::new(session(9), Authentication::None);
    dcfg.prefault = Prefault::Install;
    dcfg.backend = backend;
    dcfg.accel = dst_accel.parse().unwrap();
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = std::thread::spawn(move || listener.accept(None).and_then(|d| d.wait()));

    let mut guest = guest(src_mem.clone(), 20_000, 5);
    let mut cfg = SourceConfig::new(session(9), Authentication::None);
    cfg.codec = codec.into();
    cfg.channels = 2;
    cfg.backend = backend;
    cfg.precopy.downtime_limit = Duration::from_millis(50);
    cfg.precopy.max_rounds = 8;
    let stats = within(Duration::from_secs(120), "the migration", move || {
        let mut source = Source::connect(addr, src_mem.clone(), cfg).unwrap();
        let stats = migrate_sim(&mut source, &guest).unwrap();
        guest.stop();
        drop(source);
        let migrated = dst.join().unwrap().unwrap();
        assert_eq!(first_difference(&src_mem, &migrated.memory), None);
        (stats, migrated.stats)
    });
    let (src, dst) = stats;
    assert!(src.rounds >= 2, "{src}");
    assert!(src.pages.uniform > 0, "{src}");
    if available && dst.hw_decodes == 0 {
        assert_eq!(dst.install_unavailable, None);
        // Most data pages land on memory never written: installed.
        assert!(
            dst.installed_pages > dst.data_pages / 4,
            "{} installed of {} data pages",
            dst.installed_pages,
            dst.data_pages
        );
    } else if !available {
        assert!(dst.install_unavailable.is_some());
        assert_eq!(dst.installed_pages, 0);
    }
    dst
}

#[test]
fn raw_pages_over_tcp_are_installed() {
    run(CodecId::RAW, Backend::Tcp);
}

#[test]
fn raw_pages_over_io_uring_are_installed() {
    if !uring_available() {
        return;
    }
    run(
        CodecId::RAW,
        Backend::Uring {
            fallback_to_tcp: false,
        },
    );
}

#[test]
fn zstd_pages_are_decoded_then_installed() {
    run(CodecId::ZSTD, Backend::Tcp);
}

#[test]
fn lz4_pages_are_decoded_then_installed() {
    run(CodecId::LZ4, Backend::Tcp);
}

#[test]
fn deflate_pages_are_decoded_then_installed() {
    run(CodecId::DEFLATE, Backend::Tcp);
}

#[test]
fn delta_pages_decode_against_what_the_page_holds() {
    run(CodecId::DELTA, Backend::Tcp);
}

#[test]
fn a_hardware_decoder_writing_in_place_has_its_faults_resolved() {
    // The IAA device model (software standing in for the device) decodes straight into
    // guest pages: the handler resolves the faults its writes take.
    let d = run_with(CodecId::DEFLATE_4K, Backend::Tcp, "model");
    assert!(d.hw_decodes > 0, "{d:?}");
    if d.install_unavailable.is_none() {
        assert!(d.install_faults > 0, "{d:?}");
    }
}

/// Makes `userfaultfd(2)` fail with EPERM on this thread and the threads it starts
/// from now on (a seccomp filter, as a VMM's sandbox would install).
#[cfg(target_arch = "x86_64")]
fn refuse_userfaultfd_here() {
    use nix::libc;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: 0x15, // BPF_JMP | BPF_JEQ | BPF_K
        jt,
        jf,
        k,
    };
    let mut prog = [
        stmt(0x20, 4), // BPF_LD | BPF_W | BPF_ABS: seccomp_data.arch
        jeq(AUDIT_ARCH_X86_64, 0, 3),
        stmt(0x20, 0), // seccomp_data.nr
        jeq(libc::SYS_userfaultfd as u32, 0, 1),
        stmt(0x06, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32), // BPF_RET
        stmt(0x06, libc::SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: plain prctl calls; `fprog` points at a valid filter program for the call.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog
            ),
            0
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_refused_userfaultfd_falls_back_with_the_reason_in_the_statistics() {
    let src_mem = memory(8);
    fill(&src_mem, 3);
    let mut dcfg = DestinationConfig::new(session(4), Authentication::None);
    dcfg.prefault = Prefault::Install;
    let listener = DestinationListener::bind(loopback(), dcfg).unwrap();
    let addr = listener.local_addr().unwrap();
    // The receivers start from this thread, under its filter.
    let dst = std::thread::spawn(move || {
        refuse_userfaultfd_here();
        listener.accept(None).and_then(|d| d.wait())
    });
    let mut cfg = SourceConfig::new(session(4), Authentication::None);
    cfg.codec = CodecId::ZSTD.into();
    cfg.channels = 2;
    let migrated = within(Duration::from_secs(60), "the migration", move || {
        let mut source = Source::connect(addr, src_mem.clone(), cfg).unwrap();
        let mut g = guest(src_mem.clone(), 0, 1);
        migrate_sim(&mut source, &g).unwrap();
        g.stop();
        drop(source);
        let migrated = dst.join().unwrap().unwrap();
        assert_eq!(first_difference(&src_mem, &migrated.memory), None);
        migrated
    });
    let why = migrated.stats.install_unavailable.as_deref().unwrap_or("");
    assert!(why.starts_with("userfaultfd unavailable"), "{why:?}");
    assert!(why.contains("Operation not permitted"), "{why:?}");
    assert_eq!(migrated.stats.installed_pages, 0);
    assert!(migrated.stats.data_pages > 0);
}
