//! Builds the QAT stand-in (`qat-standin/standin.c`): a shared library with qatlib's
//! C interface that runs requests in software with a codec the loading process gives
//! it (pagewire's libdeflate). The QAT backend's tests and the demo's `--accel qat`
//! load it in place of qatlib; nothing else uses it. Its path is
//! `PAGEWIRE_QAT_STANDIN` at compile time.
//!
//! It is compiled by the C compiler alone, without the build's C flags: it links no
//! library, so sanitizer flags meant for the C codecs (the fuzz and ThreadSanitizer
//! builds) cannot leave it with runtime symbols nothing provides.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=qat-standin/standin.c");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let so = out.join("libpagewire_qat_standin.so");
    let compiler = cc::Build::new().get_compiler();
    let mut cmd = Command::new(compiler.path());
    cmd.args(["-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-o"])
        .arg(&so)
        .arg("qat-standin/standin.c");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler for the QAT stand-in: {e}"));
    assert!(
        status.success(),
        "building the QAT stand-in failed: {cmd:?}"
    );
    println!("cargo:rustc-env=PAGEWIRE_QAT_STANDIN={}", so.display());
}
