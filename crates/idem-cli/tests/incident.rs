//! The seed incident, reproduced: a client SDK that reuses 10% of its keys with a
//! different body. Run against a live cluster, the mismatch alert's expression
//! (mismatch Reserves over all Reserves, from scraped counters) must cross its threshold.

mod common;

use common::{Cluster, Options};
use idem_bench::{BenchConfig, Scenario};
use std::time::Duration;

fn reserves(cluster: &Cluster) -> (f64, f64) {
    let mismatch = cluster.metric_sum("idempotency_key_total{outcome=\"mismatch\"}");
    let total: f64 = ["new", "replay", "in_flight", "mismatch"]
        .iter()
        .map(|o| cluster.metric_sum(&format!("idempotency_key_total{{outcome=\"{o}\"}}")))
        .sum();
    (mismatch, total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_key_reuse_fires_the_mismatch_alert() {
    let cluster = Cluster::start(Options::default());
    let (m0, t0) = reserves(&cluster);
    let report = idem_bench::run(BenchConfig {
        endpoints: cluster.nodes.iter().map(|n| n.grpc.clone()).collect(),
        scenario: Scenario::SdkKeyReuse,
        concurrency: 8,
        duration: Duration::from_secs(4),
        rate: None,
        keys: 1000,
        scope: "bench".into(),
        response_bytes: 0,
        progress: false,
    })
    .await
    .unwrap();
    let (m1, t1) = reserves(&cluster);
    let ratio = (m1 - m0) / (t1 - t0);
    eprintln!("{} ops, mismatch ratio {ratio:.4}", report.ops);
    assert!(t1 - t0 >= 100.0, "the scenario ran: {} Reserves", t1 - t0);
    // The alert's threshold is 0.1%; a 10% key reuse must be far above it...
    assert!(ratio > 0.001, "mismatch ratio {ratio}");
    assert!(
        ratio > 0.05 && ratio < 0.2,
        "about a tenth of Reserves are mismatches: {ratio}"
    );
    // ...and the counters agree with what the load generator saw.
    assert_eq!(
        report.outcomes.get("mismatch").copied().unwrap_or(0) as f64,
        m1 - m0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_holds_its_rate() {
    let cluster = Cluster::start(Options {
        nodes: 1,
        ..Options::default()
    });
    let report = idem_bench::run(BenchConfig {
        endpoints: vec![cluster.nodes[0].grpc.clone()],
        scenario: Scenario::NewKeys,
        concurrency: 1,
        duration: Duration::from_secs(2),
        rate: Some(40.0),
        keys: 1000,
        scope: "bench".into(),
        response_bytes: 0,
        progress: false,
    })
    .await
    .unwrap();
    // 40/s for 2 s is 80 scheduled requests, each waited for and counted.
    assert!(
        (78..=82).contains(&report.ops),
        "{} ops: {:?}",
        report.ops,
        report.outcomes
    );
    assert_eq!(report.outcomes.get("new").copied().unwrap_or(0), report.ops);
    assert_eq!(report.mode, "open-loop");
}
