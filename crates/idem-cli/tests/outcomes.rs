//! The API's outcomes on a real three-node group: NEW, IN_FLIGHT, REPLAY, MISMATCH,
//! Release, takeover after lease expiry, LEASE_LOST, and bad input.

mod common;

use common::{Cluster, Options};
use idem_client::{
    Client, ClientConfig, Error, Fingerprint, Header, Reservation, ReserveRequest, RetryPolicy,
    StoredResponse,
};
use idem_proto::errors::{field_of, reason_of, ErrorReason};
use idem_proto::v1;
use std::time::{Duration, Instant};

fn fp(body: &str) -> Fingerprint {
    Fingerprint::of_request("POST", "/charge", body.as_bytes())
}

fn new_lease(r: Reservation) -> idem_client::Lease {
    match r {
        Reservation::New(l) => l,
        other => panic!("expected NEW, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_outcomes_on_a_three_node_group() {
    let cluster = Cluster::start(Options::default());
    let a = cluster.client(0).await;
    let b = cluster.client(1).await;
    let c = cluster.client(2).await;

    // NEW, then a concurrent attempt through another node is IN_FLIGHT.
    let req = ReserveRequest::new("payments", "order-1", fp("amount=42"));
    let lease = new_lease(a.reserve(&req).await.unwrap());
    assert_eq!(lease.fence.generation, 1);
    assert!(lease.took_over.is_none());
    match b.reserve(&req).await.unwrap() {
        Reservation::InFlight { retry_after } => assert!(retry_after > Duration::ZERO),
        other => panic!("expected IN_FLIGHT, got {other:?}"),
    }
    // 422 wins over 409: another body while in flight is MISMATCH.
    let other = ReserveRequest::new("payments", "order-1", fp("amount=99"));
    assert!(matches!(
        c.reserve(&other).await.unwrap(),
        Reservation::Mismatch { .. }
    ));

    // Complete, then every retry through every node replays the exact bytes.
    let response = StoredResponse {
        status: 201,
        headers: vec![
            Header {
                name: "content-type".into(),
                value: b"application/json".to_vec(),
            },
            Header {
                name: "x-charge".into(),
                value: vec![0, 159, 146, 150],
            },
        ],
        body: (0u8..=255).collect(),
    };
    a.complete(&lease, &response).await.unwrap();
    for client in [&a, &b, &c] {
        match client.reserve(&req).await.unwrap() {
            Reservation::Replay(r) => assert_eq!(r, response),
            other => panic!("expected REPLAY, got {other:?}"),
        }
    }
    assert!(matches!(
        b.reserve(&other).await.unwrap(),
        Reservation::Mismatch { .. }
    ));
    // A completed key cannot be released.
    assert!(matches!(
        a.release(&lease).await,
        Err(Error::AlreadyCompleted)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_then_new_with_next_generation() {
    let cluster = Cluster::start(Options::default());
    let a = cluster.client(0).await;
    let req = ReserveRequest::new("payments", "order-2", fp("x"));
    let first = new_lease(a.reserve(&req).await.unwrap());
    a.release(&first).await.unwrap();
    let second = new_lease(cluster.client(2).await.reserve(&req).await.unwrap());
    assert_eq!(second.fence.generation, first.fence.generation + 1);
    assert!(
        second.took_over.is_none(),
        "a released key is not a takeover"
    );
    // The released fence no longer completes anything.
    let done = StoredResponse {
        status: 200,
        headers: vec![],
        body: b"late".to_vec(),
    };
    assert!(matches!(
        a.complete(&first, &done).await,
        Err(Error::LeaseLost(_))
    ));
    a.complete(&second, &done).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_takeover_and_late_complete_is_lease_lost() {
    let cluster = Cluster::start(Options::default());
    let a = cluster.client(0).await;
    let mut req = ReserveRequest::new("payments", "order-3", fp("x"));
    req.lease_ms = 300;
    let old = new_lease(a.reserve(&req).await.unwrap());
    // Lease 300 ms + skew margin 100 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let new = new_lease(cluster.client(1).await.reserve(&req).await.unwrap());
    assert_eq!(new.fence.generation, old.fence.generation + 1);
    assert_eq!(
        new.took_over,
        Some(old.fence),
        "the grant is flagged as a takeover of the expired claim"
    );
    let late = StoredResponse {
        status: 200,
        headers: vec![],
        body: b"late".to_vec(),
    };
    // Without the client's own lease check, so the server's answer is what is tested.
    let mut raw = cluster.raw_client(2).await;
    let st = raw
        .complete(v1::CompleteRequest {
            scope: "payments".into(),
            key: b"order-3".to_vec(),
            fence: Some(idem_proto::convert::to_wire_fence(&old.fence)),
            response: Some(idem_proto::convert::to_wire_response(&late)),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::FailedPrecondition);
    assert_eq!(reason_of(&st), Some(ErrorReason::LeaseLost));
    // The new holder is unaffected.
    a.complete(&new, &late).await.unwrap();
    assert!(cluster.metric_sum("idem_lease_takeover_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let cluster = Cluster::start(Options::default());
    let mut raw = cluster.raw_client(0).await;
    let good = v1::ReserveRequest {
        scope: "payments".into(),
        key: b"bad-input".to_vec(),
        fingerprint: vec![7; 32],
        ..Default::default()
    };
    let cases: Vec<(&str, v1::ReserveRequest)> = vec![
        (
            "key",
            v1::ReserveRequest {
                key: vec![],
                ..good.clone()
            },
        ),
        (
            "key",
            v1::ReserveRequest {
                key: vec![b'k'; 257],
                ..good.clone()
            },
        ),
        (
            "scope",
            v1::ReserveRequest {
                scope: "s".repeat(129),
                ..good.clone()
            },
        ),
        (
            "fingerprint",
            v1::ReserveRequest {
                fingerprint: vec![7; 31],
                ..good.clone()
            },
        ),
        (
            "fingerprint",
            v1::ReserveRequest {
                fingerprint: vec![],
                ..good.clone()
            },
        ),
        (
            "lease_ms",
            v1::ReserveRequest {
                lease_ms: 5,
                ..good.clone()
            },
        ),
        (
            "lease_ms",
            v1::ReserveRequest {
                lease_ms: 10 * 3_600_000,
                ..good.clone()
            },
        ),
        (
            "retention_ms",
            v1::ReserveRequest {
                retention_ms: 1,
                ..good.clone()
            },
        ),
        // A first attempt in the far future would make the key look fresh forever.
        (
            "first_attempt_ms",
            v1::ReserveRequest {
                first_attempt_ms: 1 << 63,
                ..good.clone()
            },
        ),
    ];
    for (field, req) in cases {
        let st = raw.reserve(req).await.unwrap_err();
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{field}: {st:?}");
        assert_eq!(field_of(&st).as_deref(), Some(field), "{st:?}");
        assert!(
            st.message().contains(field),
            "the message names the field: {}",
            st.message()
        );
    }
    // Nothing was stored for the key of the rejected (otherwise valid) requests.
    let st = raw
        .get(v1::GetRequest {
            scope: "payments".into(),
            key: b"bad-input".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::NotFound, "{st:?}");

    // An oversized response is refused and the key stays reserved.
    let new = raw.reserve(good.clone()).await.unwrap().into_inner();
    let Some(v1::reserve_response::Outcome::New(n)) = new.outcome else {
        panic!("expected NEW")
    };
    let st = raw
        .complete(v1::CompleteRequest {
            scope: "payments".into(),
            key: b"bad-input".to_vec(),
            fence: n.fence,
            response: Some(v1::StoredResponse {
                status: 200,
                headers: vec![],
                body: vec![0; (1 << 20) + 1],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert_eq!(field_of(&st).as_deref(), Some("response"));
    let st = raw
        .complete(v1::CompleteRequest {
            scope: "payments".into(),
            key: b"bad-input".to_vec(),
            fence: None,
            response: None,
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&st).as_deref(), Some("fence"));
    let rec = raw
        .get(v1::GetRequest {
            scope: "payments".into(),
            key: b"bad-input".to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rec.phase, v1::Phase::Reserved as i32);

    // The node is still healthy and serving.
    assert_eq!(
        common::http_get(&cluster.nodes[0].http, "/healthz").map(|x| x.0),
        Some(200)
    );
    let ok = raw
        .reserve(v1::ReserveRequest {
            key: b"after-bad-input".to_vec(),
            ..good
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        ok.outcome,
        Some(v1::reserve_response::Outcome::New(_))
    ));
}

/// A follower sends what it receives on to the leader in batches; under concurrency the
/// answers must still reach the request they belong to. Every request here goes through
/// one follower at once, and each key expects a different answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_through_a_follower_each_get_their_own_answer() {
    let cluster = Cluster::start(Options::default());
    let leader = cluster.leader().expect("a leader");
    let follower = cluster.client((leader + 1) % 3).await;
    const KEYS: usize = 300;
    let req =
        |i: usize| ReserveRequest::new("payments", format!("batch-{i}"), fp(&format!("body={i}")));

    let leases: Vec<idem_client::Lease> = futures::future::join_all((0..KEYS).map(|i| {
        let follower = &follower;
        async move { new_lease(follower.reserve(&req(i)).await.unwrap()) }
    }))
    .await;
    for (i, l) in leases.iter().enumerate() {
        assert_eq!(l.fence.generation, 1, "key {i}");
    }

    // One third retried with the same body (IN_FLIGHT), one third with another body
    // (MISMATCH), one third completed with a body of its own; all at once.
    let body = |i: usize| StoredResponse {
        status: 200,
        headers: vec![],
        body: format!("charge {i}").into_bytes(),
    };
    let answers = futures::future::join_all(leases.iter().enumerate().map(|(i, lease)| {
        let follower = &follower;
        async move {
            match i % 3 {
                0 => match follower.reserve(&req(i)).await.unwrap() {
                    Reservation::InFlight { .. } => "in-flight",
                    other => panic!("key {i}: expected IN_FLIGHT, got {other:?}"),
                },
                1 => {
                    let other =
                        ReserveRequest::new("payments", format!("batch-{i}"), fp("another body"));
                    match follower.reserve(&other).await.unwrap() {
                        Reservation::Mismatch { .. } => "mismatch",
                        other => panic!("key {i}: expected MISMATCH, got {other:?}"),
                    }
                }
                _ => {
                    follower.complete(lease, &body(i)).await.unwrap();
                    "completed"
                }
            }
        }
    }))
    .await;
    assert_eq!(
        answers.iter().filter(|a| **a == "completed").count(),
        KEYS / 3
    );

    let replays = futures::future::join_all((0..KEYS).filter(|i| i % 3 == 2).map(|i| {
        let follower = &follower;
        async move { (i, follower.reserve(&req(i)).await.unwrap()) }
    }))
    .await;
    for (i, r) in replays {
        match r {
            Reservation::Replay(stored) => assert_eq!(stored, body(i), "key {i}"),
            other => panic!("key {i}: expected REPLAY, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_every_node_fails_over_when_its_node_dies_and_stays_on_a_live_one() {
    let mut cluster = Cluster::start(Options::default());
    let mut cfg = ClientConfig::with_endpoints(cluster.nodes.iter().map(|n| n.grpc.clone()));
    cfg.timeout = Duration::from_secs(5);
    cfg.retry = RetryPolicy {
        max_attempts: 20,
        budget_floor: 1_000.0,
        ..RetryPolicy::default()
    };
    let client = Client::connect(cfg).await.expect("client");
    let first = ReserveRequest::new("payments", "failover-0", fp("a"));
    assert!(matches!(
        client.reserve(&first).await.unwrap(),
        Reservation::New(_)
    ));

    // The preferred node dies: the next calls reach the others, without waiting out
    // a backoff per call on the dead one.
    cluster.kill(0);
    let started = Instant::now();
    for i in 1..=20 {
        let req = ReserveRequest::new("payments", format!("failover-{i}"), fp("a"));
        match client.reserve(&req).await {
            Ok(Reservation::New(_)) => {}
            other => panic!("call {i} after the kill: {other:?}"),
        }
    }
    let took = started.elapsed();
    // 20 Reserves on a live 2-of-3 group take well under a second each; returning to
    // the dead node would cost a connect timeout (2 s) per call beyond its pause.
    assert!(took < Duration::from_secs(15), "20 calls took {took:?}");

    // The preferred node, back, is used again once its pause is over: its own count
    // of NEW answers (which starts from zero with the process) goes up.
    cluster.restart(0);
    cluster.wait_ready(Duration::from_secs(30));
    tokio::time::sleep(idem_client::FAILED_ENDPOINT_PAUSE).await;
    let back = ReserveRequest::new("payments", "failover-back", fp("a"));
    assert!(matches!(
        client.reserve(&back).await.unwrap(),
        Reservation::New(_)
    ));
    let served = common::series_value(
        &cluster.metrics(0),
        "idempotency_key_total{outcome=\"new\"}",
    );
    assert_eq!(
        served,
        Some(1.0),
        "the call went to the preferred node again"
    );
}
