//! `idem bench`: the load generator of `benches/` against a running cluster.

use clap::Args;
use idem_bench::{BenchConfig, Scenario};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
pub struct BenchArgs {
    /// Nodes to spread the load over (repeatable).
    #[arg(long = "endpoint", default_value = crate::DEFAULT_ENDPOINT)]
    pub endpoints: Vec<String>,
    /// new-keys, replay-heavy, mixed or sdk-key-reuse.
    #[arg(long, default_value = "new-keys")]
    pub scenario: Scenario,
    /// Closed-loop workers.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Open loop at this many requests per second (latency from the scheduled start).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Size of the shared key space (mixed, replay-heavy).
    #[arg(long, default_value_t = 1000)]
    pub keys: usize,
    /// The keys' scope: the cluster's `[[namespaces]]` decide its mode (GLOBAL by
    /// default; REGIONAL for a scope configured so).
    #[arg(long, default_value = "bench")]
    pub scope: String,
    /// Bytes of each completion's response body (0: a short JSON body); the report
    /// shows the Complete calls' latency apart.
    #[arg(long, default_value_t = 0)]
    pub response_bytes: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
}

pub async fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    let cfg = BenchConfig {
        endpoints: a.endpoints,
        scenario: a.scenario,
        concurrency: a.concurrency.max(1),
        duration: Duration::from_secs(a.duration_secs.max(1)),
        rate: a.rate,
        keys: a.keys.max(1),
        scope: a.scope,
        response_bytes: a.response_bytes,
        progress: true,
    };
    let report = idem_bench::run(cfg).await?;
    print!("{}", report.markdown());
    if let Some(p) = a.json_out {
        std::fs::write(&p, serde_json::to_string_pretty(&report)?)?;
        eprintln!("report written to {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
