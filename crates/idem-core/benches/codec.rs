//! The record codec: encode and decode a reserved record (no response) and a completed
//! one with a 1 KiB response. Every Raft apply, read and merge goes through these.
//!
//! `cargo bench -p idem-core --bench codec` (add `-- --quick` for a short check).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use idem_core::codec::{decode_record, encode_record};
use idem_core::{ClaimId, Fingerprint, Header, Phase, Record, StoredResponse};
use std::hint::black_box;

fn reserved() -> Record {
    Record {
        expires_ms: 1_767_225_600_000,
        created_ms: 1_764_633_600_000,
        fingerprint: Fingerprint::of_request("POST", "/charge", b"{\"amount\": 42}"),
        generation: 1,
        phase: Phase::Reserved,
        claim: ClaimId {
            hlc: 0x0188_f1c3_e2a4_0000,
            region: 1,
            node: 2,
            nonce: 0x5f1e_2d3c,
        },
        lease_expires_ms: 1_764_633_630_000,
        attempts: 1,
        last_attempt_ms: 1_764_633_600_000,
        first_attempt_ms: 1_764_633_600_000,
        witnesses: 0,
        is_final: false,
        response: None,
    }
}

fn completed_1k() -> Record {
    let mut r = reserved();
    r.phase = Phase::Completed;
    r.witnesses = 0b011;
    r.is_final = true;
    r.response = Some(StoredResponse {
        status: 201,
        headers: vec![
            Header {
                name: "content-type".into(),
                value: b"application/json".to_vec(),
            },
            Header {
                name: "x-request-id".into(),
                value: b"0b7c1f7e-5d2a-4c55-9d43-a4f0c1d2e3f4".to_vec(),
            },
        ],
        body: vec![b'x'; 1024],
    });
    r
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    for (name, rec) in [("reserved", reserved()), ("completed_1KiB", completed_1k())] {
        let bytes = encode_record(&rec);
        assert_eq!(decode_record(&bytes).as_ref(), Ok(&rec));
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_with_input(BenchmarkId::new("encode", name), &rec, |b, rec| {
            b.iter(|| encode_record(black_box(rec)))
        });
        g.bench_with_input(BenchmarkId::new("decode", name), &bytes, |b, bytes| {
            b.iter(|| decode_record(black_box(bytes)))
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
