use super::*;
use idem_core::acceptor::ReserveOutcome;
use idem_core::command::Op;
use idem_core::{ClaimId, Fingerprint, StoredResponse};

fn key(k: &str) -> Key {
    Key {
        tenant: "t".into(),
        scope: "s".into(),
        key: k.as_bytes().to_vec(),
    }
}

fn reserve(k: &str, now: u64, retention_ms: u64, n: u32) -> Command {
    Command {
        now_ms: now,
        skew_margin_ms: 100,
        claim: ClaimId {
            hlc: now,
            region: 0,
            node: 1,
            nonce: n,
        },
        region_bit: 1,
        key: key(k),
        op: Op::Reserve {
            fingerprint: Fingerprint([1; 32]),
            lease_ms: 1_000,
            retention_ms,
            first_attempt_ms: 0,
        },
    }
}

#[test]
fn apply_sees_earlier_writes_of_the_same_batch_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    {
        let se = StateEngine::open(dir.path()).unwrap();
        let a = reserve("a", 1_000, 3_600_000, 1);
        let b = reserve("a", 1_001, 3_600_000, 2);
        let out = se
            .apply(
                0,
                &[
                    ApplyItem::Command(&a, 1),
                    ApplyItem::Other,
                    ApplyItem::Command(&b, 1),
                ],
                b"applied-3",
            )
            .unwrap();
        assert!(matches!(
            out[0],
            Some(CommandResult::Reserve {
                outcome: ReserveOutcome::New { .. },
                ..
            })
        ));
        assert!(out[1].is_none());
        assert!(matches!(
            out[2],
            Some(CommandResult::Reserve {
                outcome: ReserveOutcome::InFlight { .. },
                attempt: 2,
                ..
            })
        ));
    }
    let se = StateEngine::open(dir.path()).unwrap();
    assert_eq!(
        se.applied_state(0).unwrap().as_deref(),
        Some(&b"applied-3"[..])
    );
    let r = se.get_record(0, &key("a")).unwrap().unwrap();
    assert_eq!(r.attempts, 2);
    assert_eq!(
        se.get_record(1, &key("a")).unwrap(),
        None,
        "shards are separate"
    );
}

#[test]
fn compaction_removes_records_expired_at_the_durable_applied_stamp_only() {
    let dir = tempfile::tempdir().unwrap();
    let se = StateEngine::open(dir.path()).unwrap();
    // Expires at 6,000; the later command stamps 10,000.
    let old = reserve("old", 1_000, 5_000, 1);
    let live = reserve("live", 10_000, 3_600_000, 2);
    se.apply(
        0,
        &[ApplyItem::Command(&old, 1), ApplyItem::Command(&live, 1)],
        b"x",
    )
    .unwrap();
    assert_eq!(se.applied_stamp(0).unwrap(), 10_000);
    se.compact();
    assert_eq!(
        se.raw_record_count(0).unwrap(),
        2,
        "nothing is dropped before the stamp that expires it is durable"
    );
    se.publish_horizon().unwrap();
    se.compact();
    assert_eq!(se.raw_record_count(0).unwrap(), 1);
    assert!(se.get_record(0, &key("live")).unwrap().is_some());
}

fn complete(k: &str, now: u64, fence: idem_core::Fence, body: &[u8]) -> Command {
    with_op(
        reserve(k, now, 0, 0),
        Op::Complete {
            fence,
            response: StoredResponse {
                status: 200,
                headers: vec![],
                body: body.to_vec(),
            },
            quorum: 0,
        },
    )
}

fn fence_of(r: &Option<CommandResult>) -> idem_core::Fence {
    match r {
        Some(CommandResult::Reserve {
            outcome: ReserveOutcome::New { fence, .. },
            ..
        }) => *fence,
        other => panic!("expected NEW, got {other:?}"),
    }
}

/// The logical state: every record not expired at the applied stamp, encoded.
fn logical(se: &StateEngine) -> Vec<(Vec<u8>, Vec<u8>)> {
    let now = se.applied_stamp(0).unwrap();
    let mut out = Vec::new();
    for k in ["paid", "short", "lease", "later", "gone"] {
        if let Some(r) = se.get_record(0, &key(k)).unwrap() {
            if !r.is_expired(now) {
                out.push((k.as_bytes().to_vec(), encode_record(&r)));
            }
        }
    }
    out
}

/// One log applied on two replicas with different compaction timings: one compacts
/// (with its horizon published) after every batch, the other never. Stamps are far in
/// the past, so a filter judging by a node's wall clock would drop every record at its
/// first compaction and the replica would then answer NEW where the other REPLAYs.
/// Every command's result, and the records live at the applied stamp, must be equal.
#[test]
fn replicas_that_compact_at_different_times_decide_every_entry_alike() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = StateEngine::open(da.path()).unwrap();
    let b = StateEngine::open(db.path()).unwrap();
    let run = |se: &StateEngine, compact: bool, batches: &[Vec<Command>]| {
        let mut results = Vec::new();
        for (i, batch) in batches.iter().enumerate() {
            let items: Vec<ApplyItem> = batch
                .iter()
                .map(|c| ApplyItem::Command(c, i as u64 + 1))
                .collect();
            results.extend(
                se.apply(0, &items, format!("applied-{i}").as_bytes())
                    .unwrap(),
            );
            if compact {
                se.publish_horizon().unwrap();
                se.compact();
            }
        }
        results
    };
    // Batch 1: a payment reserved and completed, a key with a short retention, a lease.
    let first = vec![vec![
        reserve("paid", 1_000, 3_600_000, 1),
        reserve("short", 1_000, 1_500, 2),
        reserve("lease", 1_000, 3_600_000, 3),
        reserve("gone", 1_000, 1_500, 8),
    ]];
    let ra = run(&a, true, &first);
    assert_eq!(ra, run(&b, false, &first));
    let paid = fence_of(&ra[0]);
    let batches = vec![
        vec![complete("paid", 1_100, paid, b"receipt")],
        // A later leader stamps 2,200; the next one's clock is behind (1,500): the
        // lease (1,000 + 1,000 + margin 100) has ended at 2,200 all the same.
        vec![reserve("later", 2_200, 3_600_000, 4)],
        vec![reserve("lease", 1_500, 3_600_000, 5)],
        vec![
            reserve("paid", 5_000, 3_600_000, 6),
            reserve("short", 5_000, 3_600_000, 7),
        ],
    ];
    let ra = run(&a, true, &batches);
    let rb = run(&b, false, &batches);
    assert_eq!(ra, rb, "the replicas decided an entry differently");
    assert!(
        matches!(
            &ra[2],
            Some(CommandResult::Reserve {
                outcome: ReserveOutcome::New {
                    takeover: Some(_),
                    ..
                },
                ..
            })
        ),
        "judged at 2,200, not at its own 1,500: {:?}",
        ra[2]
    );
    assert!(
        matches!(
            &ra[3],
            Some(CommandResult::Reserve {
                outcome: ReserveOutcome::Replay { .. },
                ..
            })
        ),
        "the completed payment replays on both: {:?}",
        ra[3]
    );
    assert_eq!(logical(&a), logical(&b));
    assert_eq!(a.applied_stamp(0).unwrap(), 5_000);
    // The replica that compacted dropped what had expired at its durable stamp ("gone",
    // expired at 2,500 and never written again); the other still stores it.
    assert!(a.get_record(0, &key("gone")).unwrap().is_none());
    assert!(b.get_record(0, &key("gone")).unwrap().is_some());
    assert_eq!(
        a.raw_record_count(0).unwrap() + 1,
        b.raw_record_count(0).unwrap()
    );
}

#[test]
fn a_version_2_snapshot_file_is_still_read_with_a_double_grant_count_of_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.snap");
    let mut bytes = b"IDEMSNAP".to_vec();
    bytes.push(2);
    bytes.extend_from_slice(&4u32.to_be_bytes());
    bytes.extend_from_slice(b"meta");
    bytes.extend_from_slice(&77u64.to_be_bytes());
    bytes.push(1);
    bytes.extend_from_slice(&2u32.to_be_bytes());
    bytes.extend_from_slice(b"k1");
    bytes.extend_from_slice(&2u32.to_be_bytes());
    bytes.extend_from_slice(b"v1");
    bytes.push(0);
    bytes.extend_from_slice(&1u64.to_be_bytes());
    std::fs::write(&path, bytes).unwrap();
    let f = SnapshotFile { path };
    assert_eq!(f.read_meta().unwrap(), b"meta");
    assert_eq!(f.read_stamp().unwrap(), 77);
    assert_eq!(f.read_double_grants().unwrap(), 0);
    let mut seen = Vec::new();
    f.read_records(|k, v| {
        seen.push((k.to_vec(), v.to_vec()));
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, vec![(b"k1".to_vec(), b"v1".to_vec())]);
}

#[test]
fn a_version_1_snapshot_file_is_still_read_as_stamp_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.snap");
    let mut bytes = b"IDEMSNAP".to_vec();
    bytes.push(1);
    bytes.extend_from_slice(&4u32.to_be_bytes());
    bytes.extend_from_slice(b"meta");
    bytes.push(0);
    bytes.extend_from_slice(&0u64.to_be_bytes());
    std::fs::write(&path, bytes).unwrap();
    let f = SnapshotFile { path };
    assert_eq!(f.read_meta().unwrap(), b"meta");
    assert_eq!(f.read_stamp().unwrap(), 0);
    assert_eq!(f.read_double_grants().unwrap(), 0);
    assert_eq!(f.read_records(|_, _| Ok(())).unwrap(), 0);
}

#[test]
fn snapshot_round_trip_replaces_the_group_state() {
    let src_dir = tempfile::tempdir().unwrap();
    let dst_dir = tempfile::tempdir().unwrap();
    let src = StateEngine::open(src_dir.path()).unwrap();
    let dst = StateEngine::open(dst_dir.path()).unwrap();
    let now = wall_ms();
    let cmds: Vec<Command> = (0..500)
        .map(|i| reserve(&format!("k{i}"), now, 3_600_000, i))
        .collect();
    let items: Vec<ApplyItem> = cmds
        .iter()
        .enumerate()
        .map(|(i, c)| ApplyItem::Command(c, i as u64 + 1))
        .collect();
    src.apply(3, &items, b"applied-500").unwrap();
    // Complete one so a response travels too.
    let rec = src.get_record(3, &key("k7")).unwrap().unwrap();
    let done = Command {
        op: Op::Complete {
            fence: rec.fence(),
            response: StoredResponse {
                status: 201,
                headers: vec![],
                body: b"done".to_vec(),
            },
            quorum: 1,
        },
        ..reserve("k7", now + 1, 3_600_000, 9)
    };
    src.apply(3, &[ApplyItem::Command(&done, 1)], b"applied-501")
        .unwrap();
    // The destination has stale data in the group that the snapshot must erase.
    let stale = reserve("stale", now, 3_600_000, 1);
    dst.apply(3, &[ApplyItem::Command(&stale, 1)], b"old")
        .unwrap();

    let (snap, meta) = src
        .build_snapshot(3, |applied| {
            assert_eq!(applied, Some(&b"applied-501"[..]));
            Ok(b"meta-501".to_vec())
        })
        .unwrap();
    assert_eq!(meta, b"meta-501");
    assert_eq!(snap.read_meta().unwrap(), b"meta-501");
    assert_eq!(src.current_snapshot(3).unwrap(), Some(snap.clone()));
    let incoming = SnapshotFile::incoming(&dst.snapshot_dir(), 3);
    std::fs::copy(&snap.path, &incoming.path).unwrap();
    dst.install_snapshot(3, &incoming, b"applied-501").unwrap();

    assert_eq!(dst.raw_record_count(3).unwrap(), 500);
    assert_eq!(dst.get_record(3, &key("stale")).unwrap(), None);
    assert_eq!(
        dst.get_record(3, &key("k7")).unwrap(),
        src.get_record(3, &key("k7")).unwrap()
    );
    assert_eq!(
        dst.applied_state(3).unwrap().as_deref(),
        Some(&b"applied-501"[..])
    );
    assert!(dst.current_snapshot(3).unwrap().is_some());
}

#[test]
fn truncated_snapshot_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let se = StateEngine::open(dir.path()).unwrap();
    let c = reserve("a", wall_ms(), 3_600_000, 1);
    se.apply(0, &[ApplyItem::Command(&c, 1)], b"x").unwrap();
    let (snap, _) = se.build_snapshot(0, |_| Ok(b"m".to_vec())).unwrap();
    let bytes = std::fs::read(&snap.path).unwrap();
    let cut = SnapshotFile::incoming(&se.snapshot_dir(), 0);
    std::fs::write(&cut.path, &bytes[..bytes.len() - 3]).unwrap();
    assert!(cut.read_records(|_, _| Ok(())).is_err());
}

/// A state engine whose changes are queued for `destinations`, at most `max_entries`
/// each.
fn engine_shipping_to(destinations: &[u16], max_entries: u64) -> (tempfile::TempDir, StateEngine) {
    let dir = tempfile::tempdir().unwrap();
    let se = StateEngine::open(dir.path()).unwrap();
    se.set_outbox(OutboxConfig {
        destinations: destinations.to_vec(),
        max_entries,
    });
    (dir, se)
}

fn shipped(e: &OutboxEntry) -> Shipped {
    match &e.ship {
        Ship::Record(b) => idem_core::codec::decode_shipped(b).unwrap(),
        other => panic!("entry {} ships {other:?}", e.seq),
    }
}

fn with_op(mut c: Command, op: Op) -> Command {
    c.op = op;
    c
}

#[test]
fn changes_are_queued_per_destination_and_acks_trim_or_dead_letter_them() {
    let (_dir, se) = engine_shipping_to(&[1, 2], 3);
    let now = wall_ms();
    let cmds: Vec<Command> = (0..4)
        .map(|i| reserve(&format!("k{i}"), now, 3_600_000, i))
        .collect();
    let items: Vec<ApplyItem> = cmds
        .iter()
        .enumerate()
        .map(|(i, c)| ApplyItem::Command(c, 10 + i as u64))
        .collect();
    se.apply(0, &items, b"a").unwrap();
    // Three fit per destination, the fourth change is skipped (anti-entropy repairs it).
    assert_eq!(se.outbox_len(0, 1).unwrap(), (3, 1));
    let q = se.outbox_read(0, 2, 10, usize::MAX).unwrap();
    assert_eq!(
        q.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![10, 11, 12]
    );
    let first = shipped(&q[0]);
    assert_eq!(first.key, key("k0"));
    assert_eq!(first.enqueued_ms, now);

    // A re-applied Reserve that only counts an attempt ships nothing new; a merged copy
    // from another region is not sent on.
    let again = reserve("k0", now + 1, 3_600_000, 99);
    let rec = se.get_record(0, &key("k1")).unwrap().unwrap();
    let mut other = rec.clone();
    other.lease_expires_ms += 5_000;
    let merge = with_op(
        reserve("k1", now + 1, 3_600_000, 98),
        Op::Merge {
            record: other,
            guarded: true,
            quorum: 2,
            region: Some(0),
        },
    );
    let out = se
        .apply(
            0,
            &[
                ApplyItem::Command(&again, 20),
                ApplyItem::Command(&merge, 21),
            ],
            b"b",
        )
        .unwrap();
    assert!(matches!(
        out[1],
        Some(CommandResult::Merge {
            outcome: idem_core::merge::MergeOutcome::Applied,
            ..
        })
    ));
    assert_eq!(se.outbox_len(0, 1).unwrap(), (3, 1));

    let ack = with_op(
        reserve("", now, 1, 0),
        Op::OutboxAck {
            dest: 2,
            upto: 12,
            dead: vec![11],
        },
    );
    se.apply(0, &[ApplyItem::Command(&ack, 22)], b"c").unwrap();
    assert_eq!(se.outbox_len(0, 2).unwrap().0, 1);
    assert_eq!(se.outbox_read(0, 2, 10, usize::MAX).unwrap()[0].seq, 12);
    assert_eq!(se.outbox_len(0, 1).unwrap().0, 3);
    assert_eq!(se.dlq_depth().unwrap().get(&2), Some(&1));
}

#[test]
fn the_outbox_names_keys_and_ships_each_record_as_it_is_once_per_read() {
    let (_dir, se) = engine_shipping_to(&[1, 2], 100);
    let now = wall_ms();
    let big = vec![7u8; 1 << 20];
    let a = reserve("a", now, 3_600_000, 1);
    let b = reserve("b", now, 3_600_000, 2);
    se.apply(
        0,
        &[ApplyItem::Command(&a, 1), ApplyItem::Command(&b, 2)],
        b"x",
    )
    .unwrap();
    let claim = a.claim;
    let done = with_op(
        reserve("a", now + 1, 3_600_000, 3),
        Op::Complete {
            fence: idem_core::Fence {
                generation: 1,
                claim,
            },
            response: StoredResponse {
                status: 0,
                headers: Vec::new(),
                body: big.clone(),
            },
            quorum: 0,
        },
    );
    let out = se.apply(0, &[ApplyItem::Command(&done, 3)], b"y").unwrap();
    assert!(
        matches!(out[0], Some(CommandResult::Complete(Ok(())))),
        "{out:?}"
    );

    // A queued change costs a key, not a copy of its 1 MiB record, per destination.
    let mut stored = 0usize;
    for item in se
        .db
        .iterator_cf(se.cf(CF_OUTBOX), rocksdb::IteratorMode::Start)
    {
        let (_, v) = item.unwrap();
        assert!(v.len() < 64, "an outbox value of {} bytes", v.len());
        stored += 1;
    }
    assert_eq!(stored, 6);

    // Entry 1 (a's Reserve) ships a's record as it is now, completed; entry 3 (a's
    // Complete) has nothing left to ship in the same read.
    let q = se.outbox_read(0, 1, 10, usize::MAX).unwrap();
    assert_eq!(q.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    let first = shipped(&q[0]);
    assert_eq!(first.key, key("a"));
    assert_eq!(first.enqueued_ms, now);
    assert_eq!(first.record, se.get_record(0, &key("a")).unwrap().unwrap());
    assert_eq!(first.record.response.as_ref().unwrap().body, big);
    assert_eq!(q[2].ship, Ship::Nothing);
    assert_eq!(se.outbox_oldest_ms(0, 1).unwrap(), Some(now));

    // Bounded in bytes: past the first entry that ships, at most `max_bytes`.
    let q = se.outbox_read(0, 1, 10, 1024).unwrap();
    assert_eq!(q.len(), 1);

    // A record that is gone ships nothing; the entry is still read, to be trimmed.
    se.db
        .delete_cf(se.cf(CF_RECORDS), record_key(0, &key("b")))
        .unwrap();
    let q = se.outbox_read(0, 2, 10, usize::MAX).unwrap();
    assert_eq!(q.len(), 3);
    assert_eq!(q[1].ship, Ship::Nothing);

    // The earlier format (a copy of the record after the queue time) is still read.
    let rec = se.get_record(0, &key("a")).unwrap().unwrap();
    let old = encode_shipped(&Shipped {
        enqueued_ms: 5,
        key: key("old"),
        record: rec.clone(),
    });
    let mut v = 5u64.to_be_bytes().to_vec();
    v.extend_from_slice(&old);
    se.db
        .put_cf(se.cf(CF_OUTBOX), outbox_key(0, 2, 0), &v)
        .unwrap();
    let q = se.outbox_read(0, 2, 10, usize::MAX).unwrap();
    assert_eq!(q[0].seq, 0);
    assert_eq!(q[0].enqueued_ms, 5);
    let s = shipped(&q[0]);
    assert_eq!((s.key, s.record), (key("old"), rec));
    assert_eq!(se.outbox_oldest_ms(0, 2).unwrap(), Some(5));

    // An entry that cannot be read is refused on its own (to be dead-lettered as a
    // destination's refusal is), and the rest of the queue is still read.
    let mut bad = now.to_be_bytes().to_vec();
    bad.extend_from_slice(&[OUTBOX_REF, 0, 9]);
    se.db
        .put_cf(se.cf(CF_OUTBOX), outbox_key(0, 1, 0), &bad)
        .unwrap();
    se.db
        .put_cf(se.cf(CF_RECORDS), record_key(0, &key("b")), b"\x01garbage")
        .unwrap();
    let q = se.outbox_read(0, 1, 10, usize::MAX).unwrap();
    assert_eq!(
        q.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert!(
        matches!(&q[0].ship, Ship::Unreadable(why) if why.contains("key")),
        "{:?}",
        q[0].ship
    );
    assert!(matches!(q[1].ship, Ship::Record(_)));
    assert!(matches!(&q[2].ship, Ship::Unreadable(_)), "{:?}", q[2].ship);

    // A record expired at the applied stamp ships nothing: it is expired everywhere.
    let later = reserve("c", now + 3_600_001, 3_600_000, 4);
    se.apply(0, &[ApplyItem::Command(&later, 4)], b"z").unwrap();
    let q = se.outbox_read(0, 1, 10, usize::MAX).unwrap();
    assert_eq!(q[1].seq, 1);
    assert_eq!(q[1].ship, Ship::Nothing, "a's record expired at the stamp");
    assert!(matches!(q[4].ship, Ship::Record(_)), "c's record is live");
}

#[test]
fn digests_match_exactly_when_the_replicated_records_do() {
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let a = StateEngine::open(a_dir.path()).unwrap();
    let b = StateEngine::open(b_dir.path()).unwrap();
    let now = wall_ms();
    let cmds: Vec<Command> = (0..50)
        .map(|i| reserve(&format!("k{i}"), now, 3_600_000, i))
        .collect();
    let items: Vec<ApplyItem> = cmds.iter().map(|c| ApplyItem::Command(c, 1)).collect();
    a.apply(0, &items, b"x").unwrap();
    b.apply(0, &items[..49], b"x").unwrap();
    let (da, na) = a.bucket_digests(0, 16, now).unwrap();
    let (db, nb) = b.bucket_digests(0, 16, now).unwrap();
    assert_eq!((na, nb), (50, 49));
    let differ: Vec<usize> = (0..16).filter(|i| da[*i] != db[*i]).collect();
    assert_eq!(differ.len(), 1);
    let bucket = differ[0] as u32;
    // Page through the differing bucket of the fuller side: it holds the missing key.
    let mut after = None;
    let mut keys = Vec::new();
    loop {
        let (page, next) = a
            .bucket_records(0, bucket, 16, after.as_deref(), 2, usize::MAX, now)
            .unwrap();
        keys.extend(page.into_iter().map(|(k, _)| k));
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert!(keys.contains(&key("k49")));
    // Attempt counts are region-local: they do not change the digest.
    let again = reserve("k3", now + 5, 3_600_000, 77);
    b.apply(
        0,
        &[
            ApplyItem::Command(&cmds[49], 2),
            ApplyItem::Command(&again, 3),
        ],
        b"y",
    )
    .unwrap();
    assert_eq!(b.bucket_digests(0, 16, now).unwrap().0, da);
    // Past their retention the records read as absent to anti-entropy too.
    assert_eq!(a.bucket_digests(0, 16, now + 3_600_000).unwrap().1, 0);
}

#[test]
fn one_touch_entry_counts_the_attempts_of_many_keys_and_ships_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let se = StateEngine::open(dir.path()).unwrap();
    se.set_outbox(OutboxConfig {
        destinations: vec![1],
        max_entries: 100,
    });
    let now = wall_ms();
    let a = reserve("a", now, 3_600_000, 1);
    let b = reserve("b", now, 3_600_000, 2);
    se.apply(
        0,
        &[ApplyItem::Command(&a, 1), ApplyItem::Command(&b, 2)],
        b"x",
    )
    .unwrap();
    let queued = se.outbox_len(0, 1).unwrap();
    let item = |k: &str, fp: u8, count: u32| idem_core::command::TouchItem {
        key: key(k),
        fingerprint: Fingerprint([fp; 32]),
        first_attempt_ms: 0,
        at_ms: now + 50,
        count,
    };
    let touch = with_op(
        reserve("", now + 60, 1, 0),
        Op::Touch {
            // Another fingerprint is another request: not an attempt at this one.
            items: vec![
                item("a", 1, 3),
                item("b", 1, 1),
                item("b", 9, 5),
                item("zz", 1, 2),
            ],
        },
    );
    let out = se.apply(0, &[ApplyItem::Command(&touch, 3)], b"y").unwrap();
    assert_eq!(out[0], Some(CommandResult::Done));
    let ra = se.get_record(0, &key("a")).unwrap().unwrap();
    let rb = se.get_record(0, &key("b")).unwrap().unwrap();
    assert_eq!((ra.attempts, rb.attempts), (4, 2));
    // Judged no earlier than the entry's own stamp (now + 60), like every command.
    assert_eq!(ra.last_attempt_ms, now + 60);
    assert_eq!(se.get_record(0, &key("zz")).unwrap(), None);
    assert_eq!(
        se.outbox_len(0, 1).unwrap(),
        queued,
        "bookkeeping is not shipped"
    );
}

/// The test's own wall clock (the engine never reads one).
#[allow(clippy::disallowed_methods)]
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[test]
fn a_snapshot_being_written_holds_the_compaction_horizon_back() {
    let h = Horizon::default();
    h.publish(0, 1_000);
    let pin = h.pin(0, 1_000);
    h.publish(0, 5_000);
    assert_eq!(h.get(0), 1_000, "records the snapshot view shows live stay");
    assert_eq!(h.get(1), 0);
    drop(pin);
    assert_eq!(h.get(0), 5_000);
}

/// A REGIONAL merge of `record` into region `region`'s group at `now`.
fn regional_merge(k: &str, now: u64, record: Record, region: u16) -> Command {
    with_op(
        reserve(k, now, 3_600_000, 0),
        Op::Merge {
            record,
            guarded: false,
            quorum: 0,
            region: Some(region),
        },
    )
}

#[test]
fn a_regional_double_grant_is_counted_once_by_the_overturned_region_and_survives_restarts_and_snapshots(
) {
    let dir = tempfile::tempdir().unwrap();
    let now = wall_ms();
    let count_in = |se: &StateEngine| se.double_grants(0).unwrap();
    {
        let se = StateEngine::open(dir.path()).unwrap();
        // Region 0 granted k (its claim minted at `now`); region 1 granted it 10 ms
        // later at a higher generation, within the first lease.
        // A claim carries its mint time (the fixture's carries `now` raw).
        let minted = |mut c: Command| {
            c.claim.hlc = idem_core::Hlc::compose(c.now_ms, 0);
            c
        };
        let mine = minted(reserve("k", now, 3_600_000, 1));
        se.apply(0, &[ApplyItem::Command(&mine, 1)], b"1").unwrap();
        let local = se.get_record(0, &key("k")).unwrap().unwrap();
        assert_eq!(local.claim.hlc, idem_core::Hlc::compose(now, 0));
        let mut theirs = local.clone();
        theirs.claim = ClaimId {
            hlc: idem_core::Hlc::compose(now + 10, 0),
            region: 1,
            node: 4,
            nonce: 7,
        };
        theirs.generation = local.generation + 1;
        theirs.lease_expires_ms = now + 1_010;
        assert!(idem_core::merge::double_grant(&local, &theirs));
        // Another group holding region 0's grant, as region 2 does, merges the same
        // copy: it overturns no grant of its own.
        let elsewhere = regional_merge("k", now + 20, theirs.clone(), 2);
        se.apply(1, &[ApplyItem::Command(&mine, 1)], b"1").unwrap();
        se.apply(1, &[ApplyItem::Command(&elsewhere, 2)], b"2")
            .unwrap();
        assert_eq!(se.double_grants(1).unwrap(), 0, "not region 2's grant");
        // Region 0: counted once, however often the copy comes again (the relay and
        // anti-entropy both deliver it).
        let first = regional_merge("k", now + 20, theirs.clone(), 0);
        let again = regional_merge("k", now + 30, theirs.clone(), 0);
        let out = se
            .apply(
                0,
                &[ApplyItem::Command(&first, 2), ApplyItem::Command(&again, 3)],
                b"3",
            )
            .unwrap();
        assert!(matches!(
            out[0],
            Some(CommandResult::Merge {
                double_grant: true,
                ..
            })
        ));
        assert!(matches!(
            out[1],
            Some(CommandResult::Merge {
                double_grant: false,
                ..
            })
        ));
        assert_eq!(count_in(&se), 1);
        // A takeover after the lease ended is no double grant.
        let next = minted(reserve("j", now, 3_600_000, 2));
        se.apply(0, &[ApplyItem::Command(&next, 4)], b"4").unwrap();
        let mut later = se.get_record(0, &key("j")).unwrap().unwrap();
        later.claim = ClaimId {
            hlc: idem_core::Hlc::compose(now + 5_000, 0),
            region: 1,
            node: 4,
            nonce: 8,
        };
        later.generation += 1;
        later.lease_expires_ms = now + 6_000;
        let takeover = regional_merge("j", now + 5_001, later, 0);
        se.apply(0, &[ApplyItem::Command(&takeover, 5)], b"5")
            .unwrap();
        assert_eq!(count_in(&se), 1);
    }
    // A restart keeps it; a snapshot carries it to a replica that installs it.
    let se = StateEngine::open(dir.path()).unwrap();
    assert_eq!(count_in(&se), 1);
    let (snap, _) = se.build_snapshot(0, |_| Ok(b"m".to_vec())).unwrap();
    assert_eq!(snap.read_double_grants().unwrap(), 1);
    let other_dir = tempfile::tempdir().unwrap();
    let other = StateEngine::open(other_dir.path()).unwrap();
    let incoming = SnapshotFile::incoming(&other.snapshot_dir(), 0);
    std::fs::copy(&snap.path, &incoming.path).unwrap();
    other.install_snapshot(0, &incoming, b"5").unwrap();
    assert_eq!(count_in(&other), 1);
}

#[test]
fn the_horizon_thread_ends_when_the_last_engine_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, thread) =
        StateEngine::open_with_horizon_thread(dir.path(), DiskHealth::default()).unwrap();
    let clone = engine.clone();
    drop(engine);
    // A clone still holds the engine: the thread keeps running.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        !thread.is_finished(),
        "the thread ended while a clone was alive"
    );
    drop(clone);
    // It used to sleep out its 30 s period before noticing. (Waited out in steps: the
    // storage crate reads no clock.)
    let mut waited_ms = 0;
    while !thread.is_finished() {
        assert!(
            waited_ms < 5_000,
            "the horizon thread still runs {waited_ms} ms after the engine was dropped"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited_ms += 10;
    }
    thread.join().unwrap();
    // And the database can be opened again at once.
    StateEngine::open(dir.path()).unwrap();
}
