//! Whole runs: a tiny `run --local` through the library and through the binary, and
//! `serve` with `run --to` over 127.0.0.1 on two threads.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command as Process;

use clap::Parser;
use pagewire_stress::cell::Outcome;
use pagewire_stress::cli::{Cli, Command, KeyArgs, Plan};
use pagewire_stress::serve::Server;
use pagewire_stress::sweep::{self, LocalRunner, RemoteRunner};
use pagewire_stress::{authentication, report};

fn plan(args: &[&str]) -> (Plan, KeyArgs) {
    let mut v = vec!["pagewire-stress", "run"];
    v.extend_from_slice(args);
    match Cli::try_parse_from(v).unwrap().command {
        Command::Run(r) => (r.plan().unwrap(), r.key.clone()),
        Command::Serve(_) | Command::Image(_) => unreachable!("a run"),
    }
}

/// A serve end on 127.0.0.1 with the key `key` (written to a file named after `name`),
/// the source's key arguments and that file.
fn serve_end(name: &str, key: &[u8]) -> (Server, KeyArgs, PathBuf) {
    let file = key_file(name, key);
    let keys = KeyArgs {
        key_file: Some(file.clone()),
        insecure_no_key: false,
    };
    let server = Server::bind(
        "127.0.0.1:0".parse().unwrap(),
        0,
        authentication(&keys, false).unwrap(),
    )
    .unwrap();
    (server, keys, file)
}

fn key_file(name: &str, key: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("pagewire-stress-{name}-{}", std::process::id()));
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(key).unwrap();
    p
}

#[test]
fn a_tiny_local_run_migrates_verifies_and_bisects() {
    let (plan, key) = plan(&[
        "--local",
        "--mem-mib",
        "16",
        "--codec",
        "none,zstd,auto",
        "--dirty-mbps",
        "0,20",
        "--baseline-ms",
        "100",
        "--find-max-dirty-rate",
        "--bisect-steps",
        "2",
        "--no-progress",
    ]);
    let mut runner = LocalRunner::new(&plan, authentication(&key, true).unwrap()).unwrap();
    let r = sweep::run(&plan, &mut runner).unwrap();
    assert_eq!(r.cells.len(), 6);
    assert!(r.baselines[0].gbit_per_s.unwrap() > 0.0);
    for c in &r.cells {
        let run = &c.runs[0];
        if c.spec.codec.name() == "auto" {
            let a = run.stats.as_ref().and_then(|s| s.adaptive.as_ref());
            assert!(
                a.is_some_and(|a| a.choices.iter().any(|c| c.frames > 0)),
                "auto reports its choices: {a:?}"
            );
        }
        assert_eq!(
            run.outcome,
            Outcome::Completed,
            "{}: {:?}",
            c.spec.label(),
            run.error
        );
        assert!(run.verified, "{}", c.spec.label());
        assert!(run.guest_bytes >= 16 << 20, "every page sent at least once");
        assert!(
            run.cpu_source_s > 0.0 && run.cpu_destination_s > 0.0,
            "{run:?}"
        );
        if c.spec.dirty_mbps > 0.0 {
            assert!(run.dirty_mbps_achieved > 0.0);
        }
    }
    // Three bisections (none, zstd, auto), each with its steps.
    assert_eq!(r.bisections.len(), 3);
    for b in &r.bisections {
        assert!(b.error.is_none(), "{:?}", b.error);
        assert_eq!(b.steps.len(), b.runs.len());
        assert!(!b.steps.is_empty() && b.steps.len() <= 2);
        assert!(b.runs.iter().all(|r| r.outcome != Outcome::Failed));
    }
    let md = report::markdown(&r);
    assert!(md.contains("| zstd | loopback | 2 | 20 MB/s"), "{md}");
    assert!(md.contains("Largest dirty rate"), "{md}");
    assert_eq!(r.failures().len(), 0, "{:?}", r.failures());
}

#[test]
fn serve_and_run_over_loopback_verify_each_migration() {
    let (server, keys, key) = serve_end("key", b"a pre-shared key of this test\n");
    let addr = server.local_addr().unwrap().to_string();
    // Three migrations: two good ones, then one with the wrong key.
    let serve = std::thread::spawn(move || server.serve(Some(3), &mut std::io::sink()));
    let (two, _) = plan(&[
        "--to",
        &addr,
        "--mem-mib",
        "16",
        "--codec",
        "lz4",
        "--channels",
        "1,2",
        "--dirty-mbps",
        "10",
        "--baseline-ms",
        "100",
        "--no-progress",
    ]);
    let mut runner = RemoteRunner::new(
        &two,
        addr.parse().unwrap(),
        authentication(&keys, false).unwrap(),
    )
    .unwrap();
    let r = sweep::run(&two, &mut runner).unwrap();
    assert!(
        r.baselines
            .iter()
            .all(|b| b.gbit_per_s.unwrap_or(0.0) > 0.0),
        "{:?}",
        r.baselines
    );
    assert!(report::markdown(&r).contains(&format!("| lz4 | to {addr} | 2 | 10 MB/s")));
    for c in &r.cells {
        let run = &c.runs[0];
        assert_eq!(run.outcome, Outcome::Completed, "{:?}", run.error);
        assert!(run.verified);
        assert!(run.cpu_destination_s > 0.0, "the serve end reports its CPU");
        assert!(run.destination_stats.is_some());
    }
    drop(runner);

    let wrong = key_file("wrong", b"another key, not the serve end's");
    let wrong_keys = KeyArgs {
        key_file: Some(wrong.clone()),
        insecure_no_key: false,
    };
    let (one, _) = plan(&[
        "--to",
        &addr,
        "--mem-mib",
        "8",
        "--codec",
        "none",
        "--no-progress",
    ]);
    let mut runner = RemoteRunner::new(
        &one,
        addr.parse().unwrap(),
        authentication(&wrong_keys, false).unwrap(),
    )
    .unwrap();
    let cell = &sweep::cells(&one)[0];
    let run = runner_run(&mut runner, cell);
    assert_eq!(run.outcome, Outcome::Failed);
    assert!(!run.verified);
    drop(runner);
    assert_eq!(serve.join().unwrap().unwrap(), 3);
    let _ = std::fs::remove_file(key);
    let _ = std::fs::remove_file(wrong);
}

fn runner_run(
    runner: &mut RemoteRunner,
    cell: &pagewire_stress::cell::CellSpec,
) -> pagewire_stress::cell::RunResult {
    use pagewire_stress::sweep::Runner;
    runner.run(cell, 0).unwrap()
}

#[test]
fn a_remote_run_needs_a_key_or_an_explicit_no_key() {
    assert!(authentication(&KeyArgs::default(), false).is_err());
    let short = key_file("short", b"too short");
    let k = KeyArgs {
        key_file: Some(short.clone()),
        insecure_no_key: false,
    };
    assert!(authentication(&k, false).is_err());
    let _ = std::fs::remove_file(short);
}

#[test]
fn the_binary_prints_a_verified_table() {
    let dir = std::env::temp_dir().join(format!("pagewire-stress-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Process::new(env!("CARGO_BIN_EXE_pagewire-stress"))
        .args([
            "run",
            "--local",
            "--mem-mib",
            "8",
            "--codec",
            "lz4",
            "--no-progress",
        ])
        .args(["--baseline-ms", "100", "--json"])
        .arg(dir.join("r.json"))
        .arg("--csv")
        .arg(dir.join("r.csv"))
        .arg("--charts")
        .arg(dir.join("charts"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| lz4 | loopback | 2 | 0 MB/s"), "{stdout}");
    assert!(stdout.contains("yes (1/1)"), "{stdout}");
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("r.json")).unwrap()).unwrap();
    assert_eq!(j["cells"][0]["runs"][0]["verified"], true);
    assert_eq!(
        std::fs::read_to_string(dir.join("r.csv"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    assert!(dir.join("charts/downtime-vs-dirty-rate.svg").exists());
    let _ = std::fs::remove_dir_all(&dir);
    // Bad options exit with a message, not a panic.
    let out = Process::new(env!("CARGO_BIN_EXE_pagewire-stress"))
        .args(["run", "--local", "--channels", "1,,2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty item 2"));
}

#[test]
fn the_serve_end_refuses_a_baseline_of_too_many_connections_and_serves_on() {
    use std::io::{BufRead, BufReader};
    let (server, keys, key) = serve_end("cap", b"the cap test's pre-shared key\n");
    let addr = server.local_addr().unwrap();
    let serve = std::thread::spawn(move || server.serve(Some(1), &mut std::io::sink()));
    // A stranger on the control port: a hello, then a baseline of 65,535 connections
    // (before, a thread and 1 MiB each, and a panic when the threads ran out).
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    c.write_all(b"{\"type\":\"hello\",\"version\":1}\n")
        .unwrap();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"hello\""), "{line}");
    line.clear();
    c.write_all(b"{\"type\":\"baseline\",\"connections\":65535}\n")
        .unwrap();
    r.read_line(&mut line).unwrap();
    assert!(
        line.contains("\"error\"") && line.contains("65535"),
        "{line}"
    );
    drop((c, r));
    let (one, _) = plan(&[
        "--to",
        &addr.to_string(),
        "--mem-mib",
        "8",
        "--codec",
        "none",
        "--no-progress",
    ]);
    let mut runner = RemoteRunner::new(&one, addr, authentication(&keys, false).unwrap()).unwrap();
    let run = runner_run(&mut runner, &sweep::cells(&one)[0]);
    assert_eq!(run.outcome, Outcome::Completed, "{:?}", run.error);
    assert!(run.verified);
    drop(runner);
    assert_eq!(serve.join().unwrap().unwrap(), 1);
    let _ = std::fs::remove_file(key);
}
