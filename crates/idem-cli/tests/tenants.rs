//! Tenants come from bearer tokens and never see each other's keys; a bad config is
//! refused with the offending key named.

mod common;

use common::{Cluster, Options};
use idem_client::{
    Client, ClientConfig, Error, Fingerprint, Reservation, ReserveRequest, StoredResponse,
};
use sha2::{Digest, Sha256};

fn token_entry(tenant: &str, token: &str) -> String {
    format!(
        "[[auth.tokens]]\ntenant = \"{tenant}\"\nsha256 = \"{}\"\n",
        hex::encode(Sha256::digest(token.as_bytes()))
    )
}

async fn client_with(cluster: &Cluster, token: Option<&str>) -> Client {
    let mut cfg = ClientConfig::new(cluster.nodes[0].grpc.clone());
    cfg.token = token.map(str::to_string);
    Client::connect(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_and_need_a_known_token() {
    let extra = format!(
        "[auth]\nenabled = true\n{}{}",
        token_entry("acme", "acme-secret"),
        token_entry("globex", "globex-secret")
    );
    let cluster = Cluster::start(Options {
        extra,
        ..Options::default()
    });
    let acme = client_with(&cluster, Some("acme-secret")).await;
    let globex = client_with(&cluster, Some("globex-secret")).await;
    let req = ReserveRequest::new(
        "payments",
        "order-1",
        Fingerprint::of_request("POST", "/", b"a"),
    );
    let Reservation::New(lease) = acme.reserve(&req).await.unwrap() else {
        panic!("expected NEW")
    };
    acme.complete(
        &lease,
        &StoredResponse {
            status: 200,
            headers: vec![],
            body: b"acme".to_vec(),
        },
    )
    .await
    .unwrap();
    // The same scope and key under another tenant is another key entirely.
    let other = ReserveRequest::new(
        "payments",
        "order-1",
        Fingerprint::of_request("POST", "/", b"different"),
    );
    assert!(matches!(
        globex.reserve(&other).await.unwrap(),
        Reservation::New(_)
    ));
    // Acme still replays its own response.
    match acme.reserve(&req).await.unwrap() {
        Reservation::Replay(r) => assert_eq!(r.body, b"acme"),
        other => panic!("expected REPLAY, got {other:?}"),
    }
    assert!(matches!(
        globex.get("payments", b"order-2").await,
        Err(Error::NotFound(_))
    ));
    for bad in [None, Some("wrong-secret")] {
        let c = client_with(&cluster, bad).await;
        assert!(
            matches!(c.reserve(&req).await, Err(Error::Unauthenticated(_))),
            "token {bad:?}"
        );
    }
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 50\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["server", "--check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("raft.election_timeout_min_ms"), "{err}");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[node]\nid = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["server", "--check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("config ok"));
}
