//! The metrics a scripted sequence of calls must produce, read from `/metrics` of the
//! node that served them.

mod common;

use common::{Cluster, Options};
use idem_proto::v1::{self, reserve_response::Outcome};
use std::time::Duration;

fn value(text: &str, series: &str) -> f64 {
    common::series_value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

fn reserve(fp: u8) -> v1::ReserveRequest {
    v1::ReserveRequest {
        scope: "m".into(),
        key: b"metrics-key".to_vec(),
        fingerprint: vec![fp; 32],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_scripted_sequence_exactly() {
    let cluster = Cluster::start(Options {
        nodes: 1,
        ..Options::default()
    });
    let mut c = cluster.raw_client(0).await;

    let first = c.reserve(reserve(1)).await.unwrap().into_inner();
    let Some(Outcome::New(new)) = first.outcome else {
        panic!("expected NEW")
    };
    assert_eq!(first.server_attempt, 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let second = c.reserve(reserve(1)).await.unwrap().into_inner();
    assert!(matches!(second.outcome, Some(Outcome::InFlight(_))));
    assert_eq!(second.server_attempt, 2);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let third = c.reserve(reserve(1)).await.unwrap().into_inner();
    assert!(matches!(third.outcome, Some(Outcome::InFlight(_))));
    assert_eq!(third.server_attempt, 3);
    let other = c.reserve(reserve(2)).await.unwrap().into_inner();
    assert!(matches!(other.outcome, Some(Outcome::Mismatch(_))));
    c.complete(v1::CompleteRequest {
        scope: "m".into(),
        key: b"metrics-key".to_vec(),
        fence: new.fence,
        response: Some(v1::StoredResponse {
            status: 200,
            headers: vec![],
            body: b"ok".to_vec(),
        }),
    })
    .await
    .unwrap();
    let replay = c.reserve(reserve(1)).await.unwrap().into_inner();
    assert!(matches!(replay.outcome, Some(Outcome::Replay(_))));
    assert_eq!(replay.server_attempt, 4);
    let bad = c
        .reserve(v1::ReserveRequest {
            fingerprint: vec![1; 3],
            ..reserve(1)
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);

    let m = cluster.metrics(0);
    // Each outcome its own label, once per Reserve.
    assert_eq!(value(&m, "idempotency_key_total{outcome=\"new\"}"), 1.0);
    assert_eq!(
        value(&m, "idempotency_key_total{outcome=\"in_flight\"}"),
        2.0
    );
    assert_eq!(
        value(&m, "idempotency_key_total{outcome=\"mismatch\"}"),
        1.0
    );
    assert_eq!(value(&m, "idempotency_key_total{outcome=\"replay\"}"), 1.0);
    // Attempts 1, 2, 3 and 4+ once each, from the key's record (the mismatch is another
    // request, not an attempt at this one).
    for a in ["1", "2", "3", "4+"] {
        assert_eq!(
            value(&m, &format!("retry_attempt_total{{attempt=\"{a}\"}}")),
            1.0,
            "attempt {a}"
        );
    }
    // Delays ~0.6 s, ~1.5 s and a few ms, each in its bucket (the sleeps sit mid-bucket
    // so that a slow machine's call latency does not move them across a bound).
    assert_eq!(value(&m, "retry_delay_seconds_count"), 3.0);
    assert_eq!(value(&m, "retry_delay_seconds_bucket{le=\"0.5\"}"), 1.0);
    assert_eq!(value(&m, "retry_delay_seconds_bucket{le=\"1\"}"), 2.0);
    assert_eq!(value(&m, "retry_delay_seconds_bucket{le=\"2.5\"}"), 3.0);
    // Status classes as an HTTP gateway maps them: NEW, REPLAY, Complete are 2xx;
    // IN_FLIGHT (409), MISMATCH (422) and INVALID_ARGUMENT are 4xx.
    assert_eq!(value(&m, "http_request_outcome{class=\"2xx\"}"), 3.0);
    assert_eq!(value(&m, "http_request_outcome{class=\"4xx\"}"), 4.0);
    // Exported at zero from the start, never counted here.
    assert_eq!(value(&m, "http_request_outcome{class=\"5xx\"}"), 0.0);
    // A client's own attempt number, from metadata, is visible beside the server's.
    let mut req = tonic::Request::new(v1::ReserveRequest {
        key: b"another-key".to_vec(),
        ..reserve(3)
    });
    req.metadata_mut()
        .insert("idem-attempt", "2".parse().unwrap());
    assert!(matches!(
        c.reserve(req).await.unwrap().into_inner().outcome,
        Some(Outcome::New(_))
    ));
    let m = cluster.metrics(0);
    assert_eq!(value(&m, "client_retry_attempt_total{attempt=\"2\"}"), 1.0);
    assert_eq!(value(&m, "retry_attempt_total{attempt=\"1\"}"), 2.0);
    // Raft health is exported too.
    assert_eq!(value(&m, "idem_raft_has_leader{group=\"r0/s0\"}"), 1.0);
    assert!(
        value(&m, "idem_raft_commit_index{group=\"r0/s0\"}") >= 7.0,
        "at least the 7 writes above"
    );
}
