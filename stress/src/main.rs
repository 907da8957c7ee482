//! `pagewire-stress`: see the crate docs and `--help`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use pagewire_stress::cli::{Cli, Command, Mode};
use pagewire_stress::serve::Server;
use pagewire_stress::sweep::{self, LocalRunner, RemoteRunner, Runner};
use pagewire_stress::{authentication, report};

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pagewire-stress: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => {
            let auth = authentication(&a.key, false)?;
            let server = Server::bind(a.listen, a.data_port, auth)?;
            eprintln!(
                "pagewire-stress serve: control on {}; waiting for `pagewire-stress run --to {}`",
                server.local_addr()?,
                server.local_addr()?
            );
            let n = server.serve(a.count, &mut std::io::stderr())?;
            eprintln!("served {n} migration(s)");
            Ok(ExitCode::SUCCESS)
        }
        Command::Image(a) => {
            let guest = pagewire_stress::cell::SourceGuest::new(&a.workload, a.mem_mib)?;
            let pages = guest.pages();
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(&a.out)
                    .with_context(|| format!("creating {}", a.out.display()))?,
            );
            let mut page = vec![0u8; 4096];
            for p in 0..pages {
                if !guest
                    .memory
                    .read_pages(pagewire::RegionId(0), p, 1, &mut page)
                {
                    anyhow::bail!("page {p} outside the guest memory");
                }
                std::io::Write::write_all(&mut f, &page)
                    .with_context(|| format!("writing {}", a.out.display()))?;
            }
            std::io::Write::flush(&mut f)
                .with_context(|| format!("writing {}", a.out.display()))?;
            eprintln!(
                "wrote {} MiB of workload {} to {}",
                a.mem_mib,
                a.workload,
                a.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(a) => {
            let plan = a.plan()?;
            let mut runner: Box<dyn Runner> = match plan.mode {
                Mode::Local => Box::new(LocalRunner::new(&plan, authentication(&a.key, true)?)?),
                Mode::Remote(to) => Box::new(RemoteRunner::new(
                    &plan,
                    to,
                    authentication(&a.key, false)?,
                )?),
            };
            let r = sweep::run(&plan, runner.as_mut())?;
            print!("{}", report::markdown(&r));
            report::write_outputs(
                &r,
                plan.json.as_deref(),
                plan.csv.as_deref(),
                plan.charts.as_deref(),
            )?;
            let failures = r.failures();
            if failures.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "pagewire-stress: {} repetition(s) failed or were not verified",
                    failures.len()
                );
                Ok(ExitCode::from(1))
            }
        }
    }
}
