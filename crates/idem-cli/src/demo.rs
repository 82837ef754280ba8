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
    /// Nodes in the region.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// gRPC port of the first node; the others follow.
    #[arg(long, default_value_t = 7101)]
    pub grpc_port: u16,
    /// HTTP port of the first node; the others follow.
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

pub fn demo_configs(
    nodes: u16,
    grpc_port: u16,
    http_port: u16,
    data: &std::path::Path,
) -> Vec<Config> {
    let region = RegionConfig {
        id: 0,
        name: "local".into(),
        nodes: (0..nodes)
            .map(|i| PeerConfig {
                id: u64::from(i) + 1,
                addr: format!("127.0.0.1:{}", grpc_port + i),
            })
            .collect(),
    };
    (0..nodes)
        .map(|i| {
            let mut c = Config::default();
            c.node.id = u64::from(i) + 1;
            c.node.region = "local".into();
            c.node.data_dir = data.join(format!("node-{}", i + 1));
            c.node.grpc_addr = format!("127.0.0.1:{}", grpc_port + i)
                .parse()
                .expect("loopback address");
            c.node.http_addr = format!("127.0.0.1:{}", http_port + i)
                .parse()
                .expect("loopback address");
            c.regions = vec![region.clone()];
            c
        })
        .collect()
}

pub async fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    crate::init_tracing("warn,openraft=off", false);
    let tmp;
    let data = match &a.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("idem-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!(
        "Idem demo: {} nodes in region \"local\", data in {}",
        a.nodes,
        data.display()
    );
    let mut nodes = Vec::new();
    for cfg in demo_configs(a.nodes, a.grpc_port, a.http_port, &data) {
        let (id, region) = (cfg.node.id, cfg.node.region.clone());
        let node = Node::start(cfg).await?;
        println!(
            "  node {id}  region {region}  grpc {}  http http://{}",
            node.grpc_addr(),
            node.http_addr()
        );
        nodes.push(node);
    }
    for n in &nodes {
        n.wait_ready(Duration::from_secs(15)).await?;
    }
    println!("cluster ready.");
    if !a.no_example {
        example(&format!("127.0.0.1:{}", a.grpc_port)).await?;
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

async fn example(endpoint: &str) -> anyhow::Result<()> {
    let client = Client::connect(ClientConfig::new(endpoint)).await?;
    let key = format!("order-{}", idem_client::now_ms() % 100_000);
    let charge = Fingerprint::of_request("POST", "/charge", b"{\"amount\": 42}");
    let other = Fingerprint::of_request("POST", "/charge", b"{\"amount\": 99}");
    let show = |step: &str, r: &Reservation| {
        println!("  {step:<52} -> {}", describe(r).1);
    };
    println!("\nexample: key {key:?} in scope \"payments\"");
    let first = client
        .reserve(&ReserveRequest::new("payments", key.clone(), charge))
        .await?;
    show("1. Reserve (first attempt)", &first);
    let Reservation::New(lease) = first else {
        anyhow::bail!("the first Reserve of a fresh key was not NEW");
    };
    let retry = client
        .reserve(&ReserveRequest::new("payments", key.clone(), charge))
        .await?;
    show("2. Reserve again while the charge runs", &retry);
    let reuse = client
        .reserve(&ReserveRequest::new("payments", key.clone(), other))
        .await?;
    show("3. Reserve the same key with a different body", &reuse);
    let response = StoredResponse {
        status: 201,
        headers: vec![],
        body: b"{\"charge\": \"ch_42\", \"amount\": 42}".to_vec(),
    };
    client.complete(&lease, &response).await?;
    println!(
        "  {:<52} -> COMPLETED",
        "4. Complete with the charge's response"
    );
    let after = client
        .reserve(&ReserveRequest::new("payments", key.clone(), charge))
        .await?;
    show("5. Reserve again (a client retry)", &after);
    Ok(())
}
