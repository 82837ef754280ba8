//! Durability on real processes: a leader killed with SIGKILL under load, a whole group
//! restarted, and retention (expired records read as absent and are compacted away).

mod common;

use common::{Cluster, Options};
use idem_client::{Error, Fingerprint, Reservation, ReserveRequest, StoredResponse};
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

/// Clients on every node reserve and complete distinct keys (each key twice, through
/// different nodes, to exercise replays) while `during` runs.
async fn load(cluster: &Cluster, keys: usize, history: Arc<Mutex<History>>, prefix: &str) {
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let client = cluster.client(w % cluster.nodes.len()).await;
        let retry_client = cluster.client((w + 1) % cluster.nodes.len()).await;
        let history = history.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (w..keys).step_by(4) {
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
                    Ok(_) | Err(Error::Unavailable { .. }) => {}
                    Err(e) => panic!("unexpected error for {k}: {e}"),
                }
                // A retry through another node: never a second NEW.
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
    let keys = 400;
    let load_cluster = &cluster;
    let h = history.clone();
    let run = async move {
        // Route the load through the followers only.
        let mut tasks = Vec::new();
        for (w, &node) in followers.iter().cycle().take(4).enumerate() {
            let client = load_cluster.client(node).await;
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                for i in (w..keys).step_by(4) {
                    let k = format!("kill-{i}");
                    let req = ReserveRequest::new("load", k.clone(), fp(&k));
                    match client.reserve(&req).await {
                        Ok(Reservation::New(lease)) => {
                            *h.lock().unwrap().granted.entry(k.clone()).or_default() += 1;
                            if client.complete(&lease, &body(&k)).await.is_ok() {
                                h.lock().unwrap().completed.insert(k.clone());
                            }
                        }
                        Ok(_) | Err(Error::Unavailable { .. }) | Err(Error::Server(_)) => {}
                        Err(e) => panic!("unexpected error for {k}: {e}"),
                    }
                }
            }));
        }
        tasks
    };
    let tasks = run.await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before_kill = history.lock().unwrap().completed.len();
    cluster.kill(leader);
    for t in tasks {
        t.await.unwrap();
    }
    let h = history.lock().unwrap().clone();
    let survivor = (0..3).find(|&i| i != leader).unwrap();
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
    assert_history_holds(&cluster, &h, survivor).await;
    // The killed node comes back and catches up.
    cluster.spawn(leader);
    cluster.wait_ready(Duration::from_secs(30));
    assert_history_holds(&cluster, &h, leader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_group_restart_keeps_every_acknowledged_record() {
    let mut cluster = Cluster::start(Options::default());
    let history = Arc::new(Mutex::new(History::default()));
    load(&cluster, 200, history.clone(), "restart").await;
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
