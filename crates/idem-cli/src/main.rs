//! The `idem` binary: run a node (`server`), a local cluster (`demo`), or call one.

mod bench;
mod calls;
mod demo;
mod load;
mod top;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// The demo's first node: the default endpoint of every client command.
pub const DEFAULT_ENDPOINT: &str = "127.0.0.1:7101";

#[derive(Parser)]
#[command(
    name = "idem",
    version,
    about = "Idem: a geo-replicated idempotency-key store"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node.
    Server {
        /// TOML config file (every field has a default; IDEM__SECTION__KEY overrides).
        #[arg(long, short, env = "IDEM_CONFIG")]
        config: Option<PathBuf>,
        /// Validate the configuration, print the result, and exit.
        #[arg(long)]
        check_config: bool,
        /// Start on an empty data directory under an id the cluster knows (its data was
        /// lost): see docs/operations.md, Replacing a node.
        #[arg(long)]
        rejoin: bool,
    },
    /// Start a local cluster on loopback, show the four outcomes, keep serving.
    Demo(demo::DemoArgs),
    /// Reserve a key.
    Reserve(calls::ReserveArgs),
    /// Complete a reserved key with the response of its side effect.
    Complete(calls::CompleteArgs),
    /// Release a reserved key (the side effect did not happen).
    Release(calls::ReleaseArgs),
    /// Extend the lease of a reserved key.
    Extend(calls::ExtendArgs),
    /// Read a key's record.
    Get(calls::GetArgs),
    /// Show a node's status and its groups.
    Status(calls::StatusArgs),
    /// The dashboard's numbers in the terminal, refreshing.
    Top(top::TopArgs),
    /// Load a cluster with a scenario and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Fill a stopped node's storage with N completed records (scale benchmark).
    #[command(hide = true)]
    LoadRecords(load::LoadArgs),
}

fn init_tracing(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

async fn run_server(
    config: Option<PathBuf>,
    check: bool,
    rejoin: bool,
) -> anyhow::Result<ExitCode> {
    let mut cfg = match idem_server::Config::load(config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("config error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    cfg.node.rejoin |= rejoin;
    if let Err(e) = cfg.validate() {
        eprintln!("config error: {e}");
        return Ok(ExitCode::from(2));
    }
    if check {
        println!(
            "config ok: node {} in region {:?}, {} shard(s), data in {}",
            cfg.node.id,
            cfg.node.region,
            cfg.cluster.shards,
            cfg.node.data_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    init_tracing(&cfg.log.level, cfg.log.format == "json");
    let node = match idem_server::Node::start(cfg).await {
        Ok(n) => n,
        Err(idem_server::node::NodeError::Refused(why)) => {
            tracing::error!(reason = %why, "refusing to start");
            eprintln!("refusing to start: {why}");
            return Ok(ExitCode::from(3));
        }
        Err(e) => return Err(e.into()),
    };
    println!(
        "idem node serving gRPC on {} and HTTP on http://{}",
        node.grpc_addr(),
        node.http_addr()
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// mimalloc instead of the system allocator: a request allocates and frees many small
/// buffers on several threads (HTTP/2 frames, protobuf and MessagePack bodies, RocksDB
/// keys), where glibc's malloc spent about 15% of the cluster's CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Server {
            config,
            check_config,
            rejoin,
        } => run_server(config, check_config, rejoin).await,
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Reserve(a) => calls::reserve(a).await,
        Cmd::Complete(a) => calls::complete(a).await,
        Cmd::Release(a) => calls::release(a).await,
        Cmd::Extend(a) => calls::extend(a).await,
        Cmd::Get(a) => calls::get(a).await,
        Cmd::Status(a) => calls::status(a).await,
        Cmd::Top(a) => top::run(a).await,
        Cmd::Bench(a) => bench::run(a).await,
        Cmd::LoadRecords(a) => load::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
