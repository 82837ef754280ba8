//! Disk faults under real nodes, each node's data directory on the fault suite's
//! filesystem (needs root and /dev/fuse; without them each test says why and passes
//! without running): a node whose fsync fails stops (not ready, `NODE_UNAVAILABLE`, no
//! part in Raft) while the others go on, and comes back from what its disk holds; a power
//! loss of the whole group keeps every acknowledged completion.

mod common;

use common::{http_get, Cluster, Options};
use idem_client::{
    Client, ClientConfig, Fingerprint, Reservation, ReserveRequest, RetryPolicy, StoredResponse,
};
use idem_jepsen::faultfs::{self, FaultFs, Faults};
use idem_proto::errors::{reason_of, ErrorReason};
use idem_proto::v1;
use std::time::{Duration, Instant};

const CAPACITY: u64 = 1 << 30;

/// A 3-node group with every node's data directory on a fault filesystem.
fn cluster_on_faultfs() -> Option<(Cluster, Vec<FaultFs>)> {
    if let Err(why) = faultfs::available() {
        eprintln!("skipped: {why}");
        return None;
    }
    let mut c = Cluster::configure(Options::default());
    let fs: Vec<FaultFs> = (0..c.nodes.len())
        .map(|i| FaultFs::mount(c.data_dir(i), CAPACITY).expect("mount"))
        .collect();
    for i in 0..c.nodes.len() {
        c.spawn(i);
    }
    c.wait_ready(Duration::from_secs(60));
    Some((c, fs))
}

/// A client that prefers node `first` and fails over to the others.
async fn client(c: &Cluster, first: usize) -> Client {
    let n = c.nodes.len();
    let mut cfg =
        ClientConfig::with_endpoints((0..n).map(|k| c.nodes[(first + k) % n].grpc.clone()));
    cfg.timeout = Duration::from_secs(5);
    cfg.retry = RetryPolicy {
        max_attempts: 20,
        budget_floor: 1_000.0,
        ..RetryPolicy::default()
    };
    Client::connect(cfg).await.expect("client")
}

fn fp(k: &str) -> Fingerprint {
    Fingerprint::of_request("POST", "/pay", k.as_bytes())
}

fn body(k: &str) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![],
        body: format!("charged {k}").into_bytes(),
    }
}

/// Reserve and complete `keys`, each acknowledged.
async fn complete_all(c: &Client, keys: &[String]) {
    for k in keys {
        match c
            .reserve(&ReserveRequest::new("pay", k.clone(), fp(k)))
            .await
        {
            Ok(Reservation::New(lease)) => c.complete(&lease, &body(k)).await.expect("complete"),
            other => panic!("{k}: expected NEW, got {other:?}"),
        }
    }
}

/// Reserve and complete `keys` while a node fails: a call that met the failure may have
/// taken effect unseen (its key then stays IN_FLIGHT for the lease), so only what was
/// acknowledged is returned.
async fn complete_some(c: &Client, keys: &[String]) -> Vec<String> {
    let mut acked = Vec::new();
    for k in keys {
        if let Ok(Reservation::New(lease)) = c
            .reserve(&ReserveRequest::new("pay", k.clone(), fp(k)))
            .await
        {
            if c.complete(&lease, &body(k)).await.is_ok() {
                acked.push(k.clone());
            }
        }
    }
    acked
}

/// Every key replays its acknowledged response.
async fn assert_replays(c: &Client, keys: &[String]) {
    for k in keys {
        match c
            .reserve(&ReserveRequest::new("pay", k.clone(), fp(k)))
            .await
        {
            Ok(Reservation::Replay(r)) => assert_eq!(r, body(k), "{k}"),
            other => panic!("{k}: an acknowledged completion must replay, got {other:?}"),
        }
    }
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_fsync_fails_stops_and_comes_back_from_its_disk() {
    let Some((mut c, mut fs)) = cluster_on_faultfs() else {
        return;
    };
    let before = keys("before", 10);
    complete_all(&client(&c, 0).await, &before).await;

    // The leader's disk starts failing every fsync: its next sync fails and it stops.
    let x = c.leader().expect("a leader");
    fs[x].set_faults(Faults {
        fsync_eio: true,
        delay: None,
    });
    let during = complete_some(&client(&c, (x + 1) % 3).await, &keys("during", 10)).await;
    assert!(during.len() >= 5, "the two other nodes go on: {during:?}");
    let http = c.nodes[x].http.clone();
    wait_for("the failed node says so", Duration::from_secs(20), || {
        http_get(&http, "/healthz")
            .is_some_and(|(code, body)| code == 503 && body.starts_with("failed: the disk failed"))
    });
    assert!(fs[x].stats().fsync_eio >= 1);
    let status = http_get(&http, "/status").expect("status").1;
    assert!(status.contains("raft log sync"), "{status}");
    let metrics = c.metrics(x);
    assert_eq!(
        common::series_value(&metrics, "idem_node_failed"),
        Some(1.0),
        "{metrics}"
    );
    // It answers nothing but NODE_UNAVAILABLE, which sends clients to another node.
    let st = c
        .raw_client(x)
        .await
        .reserve(v1::ReserveRequest {
            scope: "pay".into(),
            key: b"to-the-stopped-node".to_vec(),
            fingerprint: fp("to-the-stopped-node").0.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason_of(&st), Some(ErrorReason::NodeUnavailable), "{st:?}");
    // The two others elected a leader and serve, through a client that prefers the
    // stopped node.
    let after = keys("after", 10);
    complete_all(&client(&c, x).await, &after).await;

    // The operator restarts it on a healthy disk; what its failed fsyncs did not write
    // is gone (a power loss), and it catches up from its peers.
    c.kill(x);
    fs[x].set_faults(Faults::default());
    fs[x].power_loss().expect("power loss");
    c.spawn(x);
    c.wait_ready(Duration::from_secs(60));
    let all: Vec<String> = [before, during, after].concat();
    assert_replays(&client(&c, x).await, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_loss_of_the_whole_group_keeps_every_acknowledged_completion() {
    let Some((mut c, mut fs)) = cluster_on_faultfs() else {
        return;
    };
    let acked = keys("acked", 30);
    complete_all(&client(&c, 0).await, &acked).await;
    // All three at once, mid-flight: what no fsync covered is lost everywhere.
    for i in 0..3 {
        c.kill(i);
    }
    let mut discarded = 0;
    for f in fs.iter_mut() {
        discarded += f.power_loss().expect("power loss").bytes;
    }
    assert!(
        discarded > 0,
        "the power loss must have discarded unsynced bytes"
    );
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_ready(Duration::from_secs(60));
    assert_replays(&client(&c, 1).await, &acked).await;
}
