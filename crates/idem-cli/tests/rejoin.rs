//! A node whose data directory is lost, started again under its old id, on real
//! processes: it refuses to start and says how to bring it back; its peers refuse the
//! old incarnation once it rejoins; with `--rejoin` it catches up (from the leader's log,
//! or from a snapshot when the log was purged), serves every acknowledged completion,
//! and its directory is confirmed once the group moved past the terms its peers knew.

mod common;

use common::{Cluster, Options};
use idem_client::{Client, Fingerprint, Reservation, ReserveRequest, StoredResponse};
use idem_proto::internal::raft_client::RaftClient;
use idem_proto::internal::{GroupId, RaftMessage};
use std::time::{Duration, Instant};

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

async fn complete(c: &Client, keys: &[String]) {
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

fn identity_field(c: &Cluster, i: usize, field: &str) -> String {
    let text = std::fs::read_to_string(c.data_dir(i).join("IDENTITY")).expect("IDENTITY");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field} = ")))
        .unwrap_or_else(|| panic!("{field} in {text}"))
        .to_string()
}

/// Wait for node `i`'s process to exit; its exit code.
fn exit_code(c: &mut Cluster, i: usize, within: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(st) = c.nodes[i].child.as_mut()?.try_wait().ok()? {
            c.nodes[i].child = None;
            return st.code();
        }
        assert!(
            start.elapsed() < within,
            "node {} still running; log:\n{}",
            c.nodes[i].id,
            c.log_of(i)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A follower loses its data directory: it refuses to start, then rejoins and catches up
/// under the leader it finds (which must replicate to it from the start: openraft keeps a
/// follower's matched index from going back), then its directory is confirmed once the
/// group moves to a new term.
async fn lost_follower_refuses_then_rejoins(opts: Options) {
    let mut c = Cluster::start(opts);
    let keys: Vec<String> = (0..20).map(|i| format!("k-{i}")).collect();
    complete(&c.client(0).await, &keys).await;
    let x = (c.leader().expect("a leader") + 1) % 3; // a follower
    let id = c.nodes[x].id;
    let old = identity_field(&c, x, "incarnation");
    assert_eq!(identity_field(&c, x, "confirmed"), "true");

    // The data directory is lost; the node is started again under its id.
    c.kill(x);
    std::fs::remove_dir_all(c.data_dir(x)).unwrap();
    c.spawn(x);
    assert_eq!(exit_code(&mut c, x, Duration::from_secs(30)), Some(3));
    let log = c.log_of(x);
    assert!(
        log.contains(&format!("knows node {id} as incarnation {old}")),
        "{log}"
    );
    assert!(log.contains("idem server --rejoin"), "{log}");
    // It took no part: the two others elected a leader and serve.
    let other = (x + 1) % 3;
    let more: Vec<String> = (0..5).map(|i| format!("m-{i}")).collect();
    complete(&c.client(other).await, &more).await;

    // Brought back with --rejoin: it catches up and serves everything acknowledged.
    c.spawn_with(x, &["--rejoin"]);
    c.wait_ready(Duration::from_secs(60));
    let new = identity_field(&c, x, "incarnation");
    assert_ne!(new, old);
    let via_x = c.client(x).await;
    for k in keys.iter().chain(&more) {
        match via_x
            .reserve(&ReserveRequest::new("pay", k.clone(), fp(k)))
            .await
        {
            Ok(Reservation::Replay(r)) => assert_eq!(r, body(k)),
            other => panic!("{k}: an acknowledged completion must replay, got {other:?}"),
        }
    }
    // It catches up under the leader it found (no election needed): its log reaches
    // the others' and it applies what they applied.
    let start = Instant::now();
    loop {
        let applied = |i: usize| {
            common::http_get(&c.nodes[i].http, "/status")
                .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
                .and_then(|v| v["groups"][0]["applied_index"].as_u64())
                .unwrap_or(0)
        };
        if applied(x) > 0 && applied(x) >= applied(other) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the rejoined node does not catch up: applied {} against {}; log:\n{}",
            applied(x),
            applied(other),
            c.log_of(x)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its peers now refuse the old incarnation's messages.
    let mut raw = RaftClient::connect(format!("http://{}", c.nodes[other].grpc))
        .await
        .unwrap();
    let st = raw
        .vote(RaftMessage {
            group: Some(GroupId {
                region: 0,
                shard: 0,
            }),
            payload: Vec::new(),
            from_node: id,
            from_incarnation: u64::from_str_radix(&old, 16).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::FailedPrecondition, "{st:?}");
    assert!(st.message().contains("STALE_INCARNATION"), "{st:?}");

    // Its directory is confirmed once the group moved to a term its peers had not
    // reached when it rejoined (a new election: the leader is stopped for a while).
    assert_eq!(identity_field(&c, x, "confirmed"), "false");
    let leader = c.leader().expect("a leader");
    if leader != x {
        // Down long enough for the two others to elect a leader in a new term (a
        // leader restarted at once may take its term up again).
        c.kill(leader);
        std::thread::sleep(Duration::from_secs(3));
        c.spawn(leader);
    }
    // (If it leads already, it won an election in a later term: nothing to wait for.)
    let start = Instant::now();
    while identity_field(&c, x, "confirmed") != "true" {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not confirmed; status {:?}; others {:?}; log:\n{}",
            common::http_get(&c.nodes[x].http, "/status"),
            common::http_get(&c.nodes[other].http, "/status"),
            c.log_of(x)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.wait_ready(Duration::from_secs(60));
    complete(&c.client(x).await, &["after".to_string()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_data_refuses_to_start_then_rejoins_from_the_leaders_log() {
    lost_follower_refuses_then_rejoins(Options::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_data_refuses_to_start_then_rejoins_from_a_snapshot() {
    // Snapshots every 20 entries, 5 kept behind: the log was purged at its peers.
    lost_follower_refuses_then_rejoins(Options {
        snapshot_every: Some((20, 5)),
        ..Options::default()
    })
    .await;
}
