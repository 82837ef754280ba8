//! `idem-jepsen`: check a recorded history.

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
    /// Check a history file (JSON lines) and print results.json to stdout.
    Check {
        #[arg(long)]
        history: PathBuf,
        /// The cluster's skew margin, as configured.
        #[arg(long, default_value_t = 500)]
        skew_margin_ms: u64,
    },
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::Check {
            history,
            skew_margin_ms,
        } => {
            let text = std::fs::read_to_string(&history)?;
            let ops = idem_jepsen::history::parse(&text).map_err(anyhow::Error::msg)?;
            let verdict = idem_jepsen::checker::check(&ops, skew_margin_ms);
            println!("{}", serde_json::to_string_pretty(&verdict)?);
            Ok(if verdict.valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
