//! Durability on real processes: a leader killed with SIGKILL under load, a whole group
//! restarted, and retention (expired records read as absent and are compacted away).

mod common;

use common::{Cluster, Options};
use idem_client::{Client, Error, Fingerprint, Reservation, ReserveRequest, StoredResponse};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn fp(k: &str) -> Fingerprint {
    Fingerprint::of_request("POST", "/pay", k.as_bytes())
}

fn body(k: &str) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![],
        body: format!("paid {k}").into_bytes(),
    }
}

#[derive(Clone, Default)]
struct History {
    /// Keys granted NEW, with how many times.
    granted: BTreeMap<String, u32>,
    /// Keys whose Complete was acknowledged.
    completed: BTreeSet<String>,
}

/// Each pair of clients reserves and completes its share of `keys` distinct keys through
/// the first client, then retries each key through the second: never a second NEW.
async fn load(
    pairs: Vec<(Client, Client)>,
    keys: usize,
    history: Arc<Mutex<History>>,
    prefix: &str,
) {
    let workers = pairs.len();
    let mut tasks = Vec::new();
    for (w, (client, retry_client)) in pairs.into_iter().enumerate() {
        let history = history.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (w..keys).step_by(workers) {
                let k = format!("{prefix}-{i}");
                let req = ReserveRequest::new("load", k.clone(), fp(&k));
                match client.reserve(&req).await {
                    Ok(Reservation::New(lease)) => {
                        *history
                            .lock()
                            .unwrap()
                            .granted
                            .entry(k.clone())
                            .or_default() += 1;
                        if client.complete(&lease, &body(&k)).await.is_ok() {
                            history.lock().unwrap().completed.insert(k.clone());
                        }
                    }
                    // Unknown outcomes under faults: the checks below decide.
                    Ok(_) | Err(Error::Unavailable { .. }) | Err(Error::Server(_)) => {}
                    Err(e) => panic!("unexpected error for {k}: {e}"),
                }
                if let Ok(Reservation::New(_)) = retry_client.reserve(&req).await {
                    *history
                        .lock()
                        .unwrap()
                        .granted
                        .entry(k.clone())
                        .or_default() += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Four workers over `nodes`, each retrying through the next node of the list.
async fn pairs(cluster: &Cluster, nodes: &[usize]) -> Vec<(Client, Client)> {
    let mut out = Vec::new();
    for w in 0..4 {
        let a = nodes[w % nodes.len()];
        let b = nodes[(w + 1) % nodes.len()];
        out.push((cluster.client(a).await, cluster.client(b).await));
    }
    out
}

async fn assert_history_holds(cluster: &Cluster, history: &History, via: usize) {
    for (k, n) in &history.granted {
        assert_eq!(*n, 1, "key {k} was granted {n} times");
    }
    let client = cluster.client(via).await;
    for k in &history.completed {
        match client
            .reserve(&ReserveRequest::new("load", k.clone(), fp(k)))
            .await
            .unwrap()
        {
            Reservation::Replay(r) => assert_eq!(r, body(k), "key {k}"),
            other => panic!("acknowledged completion of {k} lost: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_load_loses_nothing_and_grants_once() {
    let mut cluster = Cluster::start(Options::default());
    let history = Arc::new(Mutex::new(History::default()));
    let leader = cluster.leader().expect("a leader");
    // Load through the two followers so the clients outlive the leader.
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let clients = pairs(&cluster, &followers).await;
    let mut victim = cluster.nodes[leader].child.take().expect("leader running");
    let watched = history.clone();
    let (_, before_kill) = tokio::join!(load(clients, 400, history.clone(), "kill"), async move {
        // Kill once the load is under way (or after 10 s, which the asserts then catch).
        for _ in 0..200 {
            if watched.lock().unwrap().completed.len() >= 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let before = watched.lock().unwrap().completed.len();
        victim.kill().expect("SIGKILL the leader");
        let _ = victim.wait();
        before
    });
    let h = history.lock().unwrap().clone();
    eprintln!(
        "completed before the kill: {before_kill}, in all: {}, granted: {}",
        h.completed.len(),
        h.granted.len()
    );
    assert!(before_kill > 0, "load ran before the kill");
    assert!(
        h.completed.len() > before_kill + 50,
        "load continued after the kill: {} then {}",
        before_kill,
        h.completed.len()
    );
    assert_history_holds(&cluster, &h, followers[0]).await;
    // The killed node comes back and catches up.
    cluster.spawn(leader);
    cluster.wait_ready(Duration::from_secs(30));
    assert_history_holds(&cluster, &h, leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_group_restart_keeps_every_acknowledged_record() {
    let mut cluster = Cluster::start(Options::default());
    let history = Arc::new(Mutex::new(History::default()));
    let clients = pairs(&cluster, &[0, 1, 2]).await;
    load(clients, 200, history.clone(), "restart").await;
    assert!(history.lock().unwrap().completed.len() >= 190);
    for i in 0..3 {
        cluster.kill(i);
    }
    for i in 0..3 {
        cluster.spawn(i);
    }
    cluster.wait_ready(Duration::from_secs(30));
    let h = history.lock().unwrap().clone();
    for via in 0..3 {
        assert_history_holds(&cluster, &h, via).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_records_read_as_absent_and_are_compacted_away() {
    let mut cluster = Cluster::start(Options::default());
    let client = cluster.client(0).await;
    let mut short = ReserveRequest::new("ttl", "short-lived", fp("a"));
    short.retention_ms = 1_500;
    let Reservation::New(lease) = client.reserve(&short).await.unwrap() else {
        panic!("expected NEW")
    };
    client.complete(&lease, &body("a")).await.unwrap();
    let long = ReserveRequest::new("ttl", "long-lived", fp("b"));
    let Reservation::New(lease) = client.reserve(&long).await.unwrap() else {
        panic!("expected NEW")
    };
    client.complete(&lease, &body("b")).await.unwrap();
    assert!(client.get("ttl", b"short-lived").await.is_ok());

    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert!(
        matches!(
            client.get("ttl", b"short-lived").await,
            Err(Error::NotFound(_))
        ),
        "expired reads as absent"
    );
    assert!(client.get("ttl", b"long-lived").await.is_ok());

    // Compaction removes it physically on every node.
    for i in 0..3 {
        let mut admin = idem_proto::internal::admin_client::AdminClient::connect(format!(
            "http://{}",
            cluster.nodes[i].grpc
        ))
        .await
        .unwrap();
        admin
            .compact(idem_proto::internal::CompactRequest {})
            .await
            .unwrap();
    }
    for i in 0..3 {
        cluster.kill(i);
        let state = idem_storage::StateEngine::open(&cluster.data_dir(i).join("state")).unwrap();
        assert_eq!(
            state.raw_record_count(0).unwrap(),
            1,
            "node {i} still stores the expired record"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_loss_is_unavailable_with_pushback_then_recovers() {
    let mut cluster = Cluster::start(Options::default());
    cluster.kill(1);
    cluster.kill(2);
    let mut raw = cluster.raw_client(0).await;
    let req = idem_proto::v1::ReserveRequest {
        scope: "q".into(),
        key: b"quorum".to_vec(),
        fingerprint: vec![1; 32],
        ..Default::default()
    };
    let st = raw.reserve(req.clone()).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
    let pushback = idem_proto::errors::pushback_of(&st).expect("a retry pushback");
    assert!(
        (100..=400).contains(&(pushback.as_millis() as u64)),
        "jittered pushback: {pushback:?}"
    );
    // The SDK retries within its policy, then reports UNAVAILABLE (not a wrong answer).
    let mut cfg = idem_client::ClientConfig::new(cluster.nodes[0].grpc.clone());
    cfg.retry.max_attempts = 2;
    let sdk = Client::connect(cfg).await.unwrap();
    let r = ReserveRequest::new("q", "quorum-sdk", fp("q"));
    assert!(matches!(
        sdk.reserve(&r).await,
        Err(Error::Unavailable { attempts: 2, .. })
    ));
    // A majority again: the same call succeeds through the same node.
    cluster.spawn(1);
    cluster.wait_ready(Duration::from_secs(30));
    let c = cluster.client(0).await;
    assert!(matches!(
        c.reserve(&r).await.unwrap(),
        Reservation::New(_) | Reservation::InFlight { .. }
    ));
}
