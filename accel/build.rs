//! Builds the QAT stand-in (`qat-standin/standin.c`): a shared library with qatlib's
//! C interface that compresses in software with the libdeflate that `libdeflate-sys`
//! has just built. The QAT backend's tests and the demo's `--accel qat` load it in
//! place of qatlib; nothing else uses it. Its path is `PAGEWIRE_QAT_STANDIN` at
//! compile time.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=qat-standin/standin.c");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let root = PathBuf::from(
        env::var_os("DEP_LIBDEFLATE_ROOT").expect("libdeflate-sys reports its build root"),
    );
    let include = PathBuf::from(
        env::var_os("DEP_LIBDEFLATE_INCLUDE").expect("libdeflate-sys reports its headers"),
    );
    let so = out.join("libpagewire_qat_standin.so");
    let compiler = cc::Build::new().get_compiler();
    let mut cmd: Command = compiler.to_command();
    cmd.args(["-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-o"])
        .arg(&so)
        .arg("qat-standin/standin.c")
        .arg("-I")
        .arg(&include)
        .arg(root.join("lib").join("libdeflate.a"))
        .arg("-Wl,--exclude-libs,ALL");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler for the QAT stand-in: {e}"));
    assert!(
        status.success(),
        "building the QAT stand-in failed: {cmd:?}"
    );
    println!("cargo:rustc-env=PAGEWIRE_QAT_STANDIN={}", so.display());
}
