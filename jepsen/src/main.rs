//! `idem-jepsen`: run the fault suite, check a recorded history, or clean up after a run
//! that was killed.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "idem-jepsen", about = "Idem's fault suite")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster in a private network namespace, run clients and faults, check the
    /// history and write jepsen/store/<run>/ (needs root).
    Run(idem_jepsen::run::RunArgs),
    /// Check a history file (JSON lines) and print results.json to stdout.
    Check {
        #[arg(long)]
        history: PathBuf,
        /// The cluster's skew margin, as configured.
        #[arg(long, default_value_t = 500)]
        skew_margin_ms: u64,
    },
    /// Remove what an interrupted run left behind: its namespaces and their processes.
    Cleanup,
}

fn main() -> anyhow::Result<ExitCode> {
    let ok = |b: bool| {
        if b {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    };
    match Cli::parse().cmd {
        Cmd::Run(a) => {
            if a.inside.is_some() {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                Ok(ok(rt.block_on(idem_jepsen::run::inner(a))?))
            } else {
                Ok(ok(idem_jepsen::run::outer(&a)?))
            }
        }
        Cmd::Check {
            history,
            skew_margin_ms,
        } => {
            let text = std::fs::read_to_string(&history)?;
            let ops = idem_jepsen::history::parse(&text).map_err(anyhow::Error::msg)?;
            let verdict = idem_jepsen::checker::check(&ops, skew_margin_ms);
            println!("{}", serde_json::to_string_pretty(&verdict)?);
            Ok(ok(verdict.valid))
        }
        Cmd::Cleanup => {
            let left = idem_jepsen::net::leftover_netns();
            for ns in &left {
                idem_jepsen::net::delete_netns(ns);
            }
            println!("removed {} namespace(s)", left.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}
