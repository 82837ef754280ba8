//! The record merge: `merge::join` (the lattice join) and `merge::merge` (the join with
//! the guard that defers what the acceptor rules forbid). Every replicated record a
//! region receives goes through `merge`.
//!
//! `cargo bench -p idem-core --bench merge` (add `-- --quick` for a short check).

use criterion::{criterion_group, criterion_main, Criterion};
use idem_core::merge::{join, merge};
use idem_core::{ClaimId, Fingerprint, Phase, Record, StoredResponse};
use std::hint::black_box;

const NOW: u64 = 1_764_633_600_000;
const SKEW: u64 = 500;

fn claim(n: u32) -> ClaimId {
    ClaimId {
        hlc: 0x0188_f1c3_e2a4_0000 + u64::from(n),
        region: (n % 3) as u16,
        node: 1,
        nonce: n,
    }
}

fn record(c: u32, generation: u32, phase: Phase, lease_expires_ms: u64) -> Record {
    Record {
        expires_ms: NOW + 30 * 24 * 3600 * 1000,
        created_ms: NOW - 1_000,
        fingerprint: Fingerprint::of_request("POST", "/charge", b"{\"amount\": 42}"),
        generation,
        phase,
        claim: claim(c),
        lease_expires_ms,
        attempts: 1,
        last_attempt_ms: NOW - 1_000,
        first_attempt_ms: NOW - 1_000,
        witnesses: 1 << (c % 3),
        is_final: phase == Phase::Completed,
        response: (phase == Phase::Completed).then(|| StoredResponse {
            status: 201,
            headers: vec![],
            body: vec![b'x'; 100],
        }),
    }
}

fn bench_join(c: &mut Criterion) {
    let mut g = c.benchmark_group("join");
    // One claim, two regions' copies: the larger lease and the union of witnesses.
    let a = record(1, 1, Phase::Reserved, NOW + 30_000);
    let mut b = a.clone();
    b.lease_expires_ms = NOW + 60_000;
    b.witnesses = 0b100;
    g.bench_function("same_claim", |bench| {
        bench.iter(|| join(black_box(&a), black_box(&b)))
    });
    // A completion against another claim's later generation: Completed dominates.
    let done = record(1, 1, Phase::Completed, NOW - 1);
    let later = record(2, 2, Phase::Reserved, NOW + 30_000);
    g.bench_function("completed_vs_reserved", |bench| {
        bench.iter(|| join(black_box(&done), black_box(&later)))
    });
    g.finish();
}

fn bench_merge(c: &mut Criterion) {
    let mut g = c.benchmark_group("merge");
    // The usual case: the completion arrives where the reservation is.
    let local = record(1, 1, Phase::Reserved, NOW + 30_000);
    let remote = record(1, 1, Phase::Completed, NOW + 30_000);
    g.bench_function("applied_completion", |bench| {
        bench.iter(|| merge(Some(black_box(&local)), black_box(&remote), NOW, SKEW, true))
    });
    // Another claim's live reservation over a live one: deferred by the guard.
    let other = record(2, 2, Phase::Reserved, NOW + 30_000);
    g.bench_function("deferred_live_other_claim", |bench| {
        bench.iter(|| merge(Some(black_box(&local)), black_box(&other), NOW, SKEW, true))
    });
    // A key this region has never seen.
    g.bench_function("absent_locally", |bench| {
        bench.iter(|| merge(None, black_box(&remote), NOW, SKEW, true))
    });
    g.finish();
}

criterion_group!(benches, bench_join, bench_merge);
criterion_main!(benches);
