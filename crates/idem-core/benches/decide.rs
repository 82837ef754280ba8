//! The decision functions: `acceptor::reserve` (what one region's group decides for a
//! Reserve) and `proposer::Tally::decide` (what the proposer answers from the regions'
//! replies). Both run on every Reserve.
//!
//! `cargo bench -p idem-core --bench decide` (add `-- --quick` for a short check).

use criterion::{criterion_group, criterion_main, Criterion};
use idem_core::acceptor::{reserve, ReserveArgs};
use idem_core::proposer::{Reply, Tally};
use idem_core::{ClaimId, Fence, Fingerprint, Phase, StoredResponse};
use std::hint::black_box;

const NOW: u64 = 1_764_633_600_000;
const DAY: u64 = 24 * 3600 * 1000;

fn claim(n: u32) -> ClaimId {
    ClaimId {
        hlc: 0x0188_f1c3_e2a4_0000 + u64::from(n),
        region: 0,
        node: 1,
        nonce: n,
    }
}

fn args(now_ms: u64, c: u32) -> ReserveArgs {
    ReserveArgs {
        now_ms,
        skew_margin_ms: 500,
        fingerprint: Fingerprint::of_request("POST", "/charge", b"{\"amount\": 42}"),
        claim: claim(c),
        generation: None,
        lease_ms: 30_000,
        lease_until_ms: None,
        retention_ms: 30 * DAY,
        first_attempt_ms: now_ms,
        region_bit: 1,
    }
}

fn response() -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![],
        body: vec![b'x'; 100],
    }
}

fn bench_reserve(c: &mut Criterion) {
    let mut g = c.benchmark_group("acceptor_reserve");
    let new = args(NOW, 1);
    g.bench_function("new_key", |b| b.iter(|| reserve(None, black_box(&new))));
    let held = reserve(None, &new).write.expect("a NEW writes the record");
    let retry = args(NOW + 1_000, 2);
    g.bench_function("in_flight", |b| {
        b.iter(|| reserve(Some(black_box(&held)), black_box(&retry)))
    });
    let mut done = held.clone();
    done.phase = Phase::Completed;
    done.is_final = true;
    done.response = Some(response());
    g.bench_function("replay", |b| {
        b.iter(|| reserve(Some(black_box(&done)), black_box(&retry)))
    });
    g.finish();
}

fn tally(replies: &[Reply]) -> Tally {
    let mut t = Tally::new(3);
    for (i, r) in replies.iter().enumerate() {
        t.record(i, r.clone());
    }
    t
}

fn bench_decide(c: &mut Criterion) {
    let mut g = c.benchmark_group("tally_decide");
    let fence = Fence {
        generation: 1,
        claim: claim(1),
    };
    let cases = [
        ("new_majority", tally(&[Reply::Accepted, Reply::Accepted])),
        (
            "replay",
            tally(&[
                Reply::Accepted,
                Reply::Completed {
                    fence,
                    response: response(),
                },
            ]),
        ),
        (
            "in_flight",
            tally(&[
                Reply::Held {
                    holder: fence,
                    retry_after_ms: 900,
                },
                Reply::Held {
                    holder: fence,
                    retry_after_ms: 700,
                },
                Reply::Accepted,
            ]),
        ),
        ("undecided", tally(&[Reply::Accepted])),
    ];
    for (name, t) in &cases {
        g.bench_function(*name, |b| b.iter(|| black_box(t).decide(black_box(true))));
    }
    g.finish();
}

criterion_group!(benches, bench_reserve, bench_decide);
criterion_main!(benches);
