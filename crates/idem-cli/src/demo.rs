//! `idem demo`: a local cluster in one process, with its data in a temporary directory,
//! and a short example that shows the four outcomes of Reserve.

use crate::calls::describe;
use clap::Args;
use idem_client::{Client, ClientConfig, Fingerprint, Reservation, ReserveRequest, StoredResponse};
use idem_server::config::{PeerConfig, RegionConfig};
use idem_server::{Config, Node};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
pub struct DemoArgs {
    /// Regions (each a failure domain with its own Raft groups).
    #[arg(long, default_value_t = 3)]
    pub regions: u16,
    /// Nodes per region.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Emulated round trip between regions, in ms (added in-process; this is a demo on
    /// one machine).
    #[arg(long, default_value_t = 70)]
    pub rtt_ms: u64,
    /// gRPC port of the first node; region r's node i listens on this + 10 r + i.
    #[arg(long, default_value_t = 7101)]
    pub grpc_port: u16,
    /// HTTP port of the first node; numbered like the gRPC ports.
    #[arg(long, default_value_t = 7201)]
    pub http_port: u16,
    /// Keep the data here instead of a temporary directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Skip the example.
    #[arg(long)]
    pub no_example: bool,
    /// Stop after the example instead of serving until Ctrl-C.
    #[arg(long)]
    pub exit_after_example: bool,
}

pub const DEMO_REGIONS: [&str; 5] = ["us-east", "eu-west", "ap-south", "sa-east", "af-south"];

/// The configs of a demo cluster: `regions` regions of `nodes` nodes on loopback.
pub fn demo_configs(
    regions: u16,
    nodes: u16,
    rtt_ms: u64,
    grpc_port: u16,
    http_port: u16,
    data: &std::path::Path,
) -> Vec<Config> {
    let port = |base: u16, r: u16, i: u16| base + 10 * r + i;
    let all: Vec<RegionConfig> = (0..regions)
        .map(|r| RegionConfig {
            id: r,
            name: DEMO_REGIONS[r as usize % DEMO_REGIONS.len()].to_string(),
            nodes: (0..nodes)
                .map(|i| PeerConfig {
                    id: u64::from(r * nodes + i) + 1,
                    addr: format!("127.0.0.1:{}", port(grpc_port, r, i)),
                })
                .collect(),
        })
        .collect();
    let mut out = Vec::new();
    for region in &all {
        for (i, peer) in region.nodes.iter().enumerate() {
            let i = i as u16;
            let mut c = Config::default();
            c.node.id = peer.id;
            c.node.region = region.name.clone();
            c.node.data_dir = data.join(format!("{}-node-{}", region.name, peer.id));
            c.node.grpc_addr = peer.addr.parse().expect("loopback address");
            c.node.http_addr = format!("127.0.0.1:{}", port(http_port, region.id, i))
                .parse()
                .expect("loopback address");
            c.regions = all.clone();
            c.geo.emulated_rtt_ms = rtt_ms;
            out.push(c);
        }
    }
    out
}

pub async fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    crate::init_tracing("warn,openraft=off", false);
    if a.regions == 0 || a.regions as usize > DEMO_REGIONS.len() || a.nodes == 0 || a.nodes > 9 {
        anyhow::bail!("--regions must be 1 to 5 and --nodes 1 to 9");
    }
    let tmp;
    let data = match &a.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("idem-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!(
        "Idem demo: {} region(s) x {} nodes, {} ms emulated round trip between regions, data in {}",
        a.regions,
        a.nodes,
        a.rtt_ms,
        data.display()
    );
    // Started together: a node on a new data directory asks its peers before it takes
    // part, so it waits for them to be up.
    let mut starting = Vec::new();
    for cfg in demo_configs(
        a.regions,
        a.nodes,
        a.rtt_ms,
        a.grpc_port,
        a.http_port,
        &data,
    ) {
        let (id, region) = (cfg.node.id, cfg.node.region.clone());
        starting.push((id, region, tokio::spawn(Node::start(cfg))));
    }
    let mut nodes = Vec::new();
    for (id, region, task) in starting {
        let node = task.await??;
        println!(
            "  node {id}  region {region:<9} grpc {}  http http://{}",
            node.grpc_addr(),
            node.http_addr()
        );
        nodes.push(node);
    }
    for n in &nodes {
        n.wait_ready(Duration::from_secs(30)).await?;
    }
    println!("cluster ready.");
    if !a.no_example {
        let endpoints: Vec<(String, String)> = (0..a.regions)
            .map(|r| {
                (
                    DEMO_REGIONS[r as usize].to_string(),
                    format!("127.0.0.1:{}", a.grpc_port + 10 * r),
                )
            })
            .collect();
        example(&endpoints).await?;
    }
    if !a.exit_after_example {
        println!("\nserving; try: idem reserve --key order-1 --body hello   (Ctrl-C to stop)");
        crate::shutdown_signal().await;
    }
    for n in nodes {
        n.shutdown().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// The client's region "by anycast": the one whose node answers fastest.
async fn nearest(endpoints: &[(String, String)]) -> anyhow::Result<(usize, Client)> {
    let mut best: Option<(Duration, usize, Client)> = None;
    for (i, (_, ep)) in endpoints.iter().enumerate() {
        let c = Client::connect(ClientConfig::new(ep.clone())).await?;
        let t = std::time::Instant::now();
        // A read of a key that does not exist: one local round trip.
        let _ = c.get("probe", b"probe").await;
        let rtt = t.elapsed();
        if best.as_ref().is_none_or(|(b, _, _)| rtt < *b) {
            best = Some((rtt, i, c));
        }
    }
    best.map(|(_, i, c)| (i, c))
        .ok_or_else(|| anyhow::anyhow!("no region answered"))
}

async fn example(endpoints: &[(String, String)]) -> anyhow::Result<()> {
    let (home, client) = nearest(endpoints).await?;
    println!(
        "\nthe client's nearest region (anycast): {}",
        endpoints[home].0
    );
    let key = format!("order-{}", idem_client::now_ms() % 100_000);
    let charge = Fingerprint::of_request("POST", "/charge", b"{\"amount\": 42}");
    let other = Fingerprint::of_request("POST", "/charge", b"{\"amount\": 99}");
    let show = |step: &str, r: &Reservation, took: Duration| {
        println!(
            "  {step:<48} {:>7.1} ms -> {}",
            took.as_secs_f64() * 1e3,
            describe(r).1
        );
    };
    let reserve = |c: Client, fp: Fingerprint| {
        let key = key.clone();
        async move {
            let t = std::time::Instant::now();
            let r = c.reserve(&ReserveRequest::new("payments", key, fp)).await?;
            Ok::<_, anyhow::Error>((r, t.elapsed()))
        }
    };
    println!("\nexample: key {key:?} in scope \"payments\" (a NEW needs a majority of regions: one round trip)");
    let (first, took) = reserve(client.clone(), charge).await?;
    show("1. Reserve (first attempt)", &first, took);
    let Reservation::New(lease) = first else {
        anyhow::bail!("the first Reserve of a fresh key was not NEW");
    };
    let (retry, took) = reserve(client.clone(), charge).await?;
    show("2. Reserve again while the charge runs", &retry, took);
    let (reuse, took) = reserve(client.clone(), other).await?;
    show(
        "3. Reserve the same key with a different body",
        &reuse,
        took,
    );
    let response = StoredResponse {
        status: 201,
        headers: vec![],
        body: b"{\"charge\": \"ch_42\", \"amount\": 42}".to_vec(),
    };
    let t = std::time::Instant::now();
    client.complete(&lease, &response).await?;
    println!(
        "  {:<48} {:>7.1} ms -> COMPLETED (final: stored by a majority)",
        "4. Complete with the charge's response",
        t.elapsed().as_secs_f64() * 1e3
    );
    let (after, took) = reserve(client.clone(), charge).await?;
    show("5. Reserve again (a client retry)", &after, took);
    if endpoints.len() > 1 {
        let other_region = (home + 1) % endpoints.len();
        let flipped = Client::connect(ClientConfig::new(endpoints[other_region].1.clone())).await?;
        let (r, took) = reserve(flipped, charge).await?;
        show(
            &format!(
                "6. The retry lands in {} instead",
                endpoints[other_region].0
            ),
            &r,
            took,
        );
    }
    Ok(())
}
