//! Three regions of three `idem server` processes each, over real gRPC, with the links
//! between regions cut and healed by the test: GLOBAL mode grants a key once whatever
//! region the retries land in, an isolated region neither grants nor forgets, a region
//! rebuilt from nothing is restored by anti-entropy, a holder's Extend, Release and
//! Complete through other regions are judged by a majority, and REGIONAL mode's double
//! grants under a partition are resolved identically everywhere and counted.

mod common;

use common::geo::{GeoCluster, GeoOptions};
use idem_client::{Client, Error, Fingerprint, Reservation, ReserveRequest, StoredResponse};
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

fn req(scope: &str, k: &str) -> ReserveRequest {
    let mut r = ReserveRequest::new(scope, k.as_bytes().to_vec(), fp(k));
    r.lease_ms = 10_000;
    r
}

/// How soon after healing an isolated region must agree with the others (see the
/// isolation test): the anti-entropy timeout (10 s) plus 1.25 passes of 1 s plus the
/// pass itself, with room for a loaded machine (measured: under 1 s, the relay resumes
/// at once).
const HEAL_BOUND: Duration = Duration::from_secs(15);

/// Held by the tests that load the machine hard (the race) or judge timing (clocks, an
/// isolated region's convergence window), so that none of them shares the machine's
/// cores with another: each starts nine server processes of its own.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn alone() -> tokio::sync::MutexGuard<'static, ()> {
    ALONE.lock().await
}

/// One client per region, on the region's first node.
async fn clients(c: &GeoCluster) -> Vec<Client> {
    let mut out = Vec::new();
    for r in 0..c.regions {
        out.push(c.client(c.region_nodes(r)[0]).await);
    }
    out
}

/// The same Reserve sent at the same instant through every endpoint in `endpoints`, for
/// `keys` keys, `parallel` keys at a time, each caller retrying as a client would after
/// an IN_FLIGHT hint that is short (contention: nobody holds the key) and stopping at a
/// NEW or at a hint as long as a lease (somebody holds it). Each key must be granted
/// NEW exactly once, within 10 s; every hint is either short or the winner's lease; each
/// call is answered within the server's Reserve deadline (4.5 s here). Returns how many
/// keys needed more than one try.
async fn race(
    c: &GeoCluster,
    endpoints: &[usize],
    keys: usize,
    parallel: usize,
    tag: &str,
) -> usize {
    let mut cl = Vec::new();
    for &i in endpoints {
        let client = c.client_once(i).await;
        // A serving cluster: each endpoint's links to the other regions are up.
        let warm = client
            .reserve(&req("race", &format!("{tag}-warm-{i}")))
            .await;
        assert!(
            matches!(warm, Ok(Reservation::New(_))),
            "endpoint {i}: {warm:?}"
        );
        cl.push(client);
    }
    let lease = Duration::from_millis(10_000);
    let mut slowest = Duration::ZERO;
    let mut no_winner = Vec::new();
    let mut retried = 0;
    for chunk in 0..keys.div_ceil(parallel) {
        let mut races = Vec::new();
        for j in 0..parallel.min(keys - chunk * parallel) {
            let k = format!("{tag}-{}", chunk * parallel + j);
            let cl = cl.clone();
            races.push(tokio::spawn(async move {
                let t = std::time::Instant::now();
                let calls = cl.iter().map(|c| {
                    let (c, r) = (c.clone(), req("race", &k));
                    async move {
                        let mut answers = Vec::new();
                        loop {
                            let t = std::time::Instant::now();
                            let a = c.reserve(&r).await;
                            let short = matches!(&a, Ok(Reservation::InFlight { retry_after })
                                if *retry_after < Duration::from_secs(1));
                            let hint = match &a {
                                Ok(Reservation::InFlight { retry_after }) => Some(*retry_after),
                                _ => None,
                            };
                            answers.push((a, t.elapsed()));
                            match hint {
                                Some(h) if short && answers.len() < 20 => {
                                    tokio::time::sleep(h).await
                                }
                                _ => return answers,
                            }
                        }
                    }
                });
                let answers: Vec<_> = futures::future::join_all(calls)
                    .await
                    .into_iter()
                    .flatten()
                    .collect();
                (k.clone(), answers, t.elapsed())
            }));
        }
        for r in races {
            let (k, answers, took) = r.await.unwrap();
            let news = answers
                .iter()
                .filter(|(a, _)| matches!(a, Ok(Reservation::New(_))))
                .count();
            assert!(news <= 1, "two NEW for {k}: {answers:?}");
            if news == 0 || took > Duration::from_secs(10) {
                no_winner.push((k.clone(), format!("{took:?}: {answers:?}")));
            }
            if answers.len() > endpoints.len() {
                retried += 1;
            }
            for (a, took) in &answers {
                slowest = slowest.max(*took);
                match a {
                    Ok(Reservation::New(_)) => {}
                    Ok(Reservation::InFlight { retry_after }) => assert!(
                        *retry_after <= lease + Duration::from_secs(1),
                        "{k}: a hint beyond the winner's lease: {retry_after:?}"
                    ),
                    other => panic!("{k}: unexpected answer {other:?}"),
                }
            }
        }
    }
    assert!(
        no_winner.is_empty(),
        "{} of {keys} keys raced through {} endpoints were granted to nobody within 10 s: {:?}",
        no_winner.len(),
        endpoints.len(),
        &no_winner[..no_winner.len().min(3)]
    );
    assert!(
        slowest < Duration::from_millis(4_800),
        "a racing call took {slowest:?}"
    );
    eprintln!(
        "{tag}: {keys} keys through {} endpoints, one NEW each; {retried} needed a retry; slowest call {slowest:?}",
        endpoints.len()
    );
    retried
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_raced_through_3_and_9_endpoints_is_new_exactly_once() {
    let _alone = alone().await;
    let c = GeoCluster::start(GeoOptions::default());
    let firsts: Vec<usize> = (0..c.regions).map(|r| c.region_nodes(r)[0]).collect();
    let retried3 = race(&c, &firsts, 200, 8, "race3").await;
    let all: Vec<usize> = (0..c.nodes.len()).collect();
    let retried9 = race(&c, &all, 60, 4, "race9").await;
    // The server settles most contention itself. (Seen on 2 cores shared with other
    // clusters: 1 to 20 of 200 and 0 to 1 of 60 needed a client retry; docs/protocol.md
    // §3 step 6 says why that is more than the pauses alone explain.)
    assert!(
        retried3 <= 60,
        "{retried3} of 200 keys needed a client retry"
    );
    assert!(
        retried9 <= 18,
        "{retried9} of 60 keys needed a client retry"
    );
    assert_eq!(
        c.metric_sum("cross_region_conflict_total{mode=\"global\"}"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_region_neither_grants_nor_forgets_and_converges_after_healing() {
    let _alone = alone().await;
    let c = GeoCluster::start(GeoOptions::default());
    let cl = clients(&c).await;
    // Completed before the partition, through region 0: region 2 holds a final copy.
    for i in 0..20 {
        let k = format!("before-{i}");
        let Reservation::New(lease) = cl[0].reserve(&req("p", &k)).await.unwrap() else {
            panic!("fresh key not NEW");
        };
        cl[0].complete(&lease, &body(&k)).await.unwrap();
    }
    c.wait_converged(Duration::from_secs(20));

    c.isolate(2);
    // The majority side keeps granting and completing.
    for i in 0..20 {
        let k = format!("during-{i}");
        let r = if i % 2 == 0 { &cl[0] } else { &cl[1] };
        let Reservation::New(lease) = r.reserve(&req("p", &k)).await.unwrap() else {
            panic!("majority side did not grant {k}");
        };
        r.complete(&lease, &body(&k)).await.unwrap();
    }
    // The isolated region: no NEW for a new key, REPLAY for what it holds.
    let iso = c.client_once(c.region_nodes(2)[0]).await;
    for i in 0..5 {
        match iso.reserve(&req("p", &format!("new-{i}"))).await {
            Err(Error::Unavailable { .. }) | Ok(Reservation::InFlight { .. }) => {}
            other => panic!("isolated region answered {other:?} for a new key"),
        }
    }
    for i in 0..20 {
        let k = format!("before-{i}");
        match iso.reserve(&req("p", &k)).await.unwrap() {
            Reservation::Replay(resp) => assert_eq!(resp, body(&k)),
            other => panic!("isolated region answered {other:?} for completed {k}"),
        }
    }
    // Keys completed during the partition are unknown there: never NEW.
    for i in 0..4 {
        match iso.reserve(&req("p", &format!("during-{i}"))).await {
            Err(Error::Unavailable { .. }) | Ok(Reservation::InFlight { .. }) => {}
            other => panic!("isolated region answered {other:?} for a key completed elsewhere"),
        }
    }

    // Region 0 sees how long region 2 has been silent (probes run every second).
    let silent = |c: &GeoCluster| {
        common::series_value(
            &c.metrics(0),
            "idem_region_last_answer_age_seconds{region=\"ap-south\"}",
        )
        .unwrap_or(-1.0)
    };
    assert!(silent(&c) > 2.0, "region 2 silent for {} s", silent(&c));

    c.heal();
    let healed = std::time::Instant::now();
    let (records, _) = c.wait_converged(Duration::from_secs(60));
    assert!(records >= 40, "converged on {records} records");
    let converged = std::time::Instant::now();
    // The bound docs/protocol.md §6 states: a pass under way toward the cut region
    // ends within the anti-entropy timeout (10 s), the next starts within 1.25
    // intervals (1 s here), and it repairs every differing bucket.
    eprintln!("converged {:?} after healing", converged - healed);
    assert!(
        converged - healed < HEAL_BOUND,
        "converged {:?} after healing, beyond the stated bound {HEAL_BOUND:?}",
        converged - healed
    );
    // Region 0's own link answers again within a few probe rounds (the regions can
    // converge through other nodes' links before this node's next probe: the probes
    // in flight at the heal fail with the connections the partition cut).
    while silent(&c) >= 3.0 {
        assert!(
            converged.elapsed() < Duration::from_secs(15),
            "region 2 still silent for {} s, {:?} after converging",
            silent(&c),
            converged.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // After healing the once-isolated region replays what was completed without it.
    for i in 0..20 {
        let k = format!("during-{i}");
        match cl[2].reserve(&req("p", &k)).await.unwrap() {
            Reservation::Replay(resp) => assert_eq!(resp, body(&k)),
            other => panic!("healed region answered {other:?} for {k}"),
        }
    }
}

/// A region whose every node lost its data has lost the accepts it gave: voting again as
/// if it remembered them could grant a key a second time. Each of its nodes, started on
/// an empty directory, finds that another region heard from its region before and
/// refuses to start, saying why; the two other regions go on deciding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_lost_every_nodes_data_refuses_to_vote_and_the_others_go_on() {
    let mut c = GeoCluster::start(GeoOptions::default());
    let cl = clients(&c).await;
    for i in 0..20 {
        let k = format!("k-{i}");
        let Reservation::New(lease) = cl[i % 2].reserve(&req("p", &k)).await.unwrap() else {
            panic!("fresh key not NEW");
        };
        cl[i % 2].complete(&lease, &body(&k)).await.unwrap();
    }
    c.wait_converged(Duration::from_secs(30));
    // Destroy region 2: every node killed and its data deleted, then started empty.
    for i in c.region_nodes(2) {
        c.kill(i);
        std::fs::remove_dir_all(&c.nodes[i].data).unwrap();
    }
    for i in c.region_nodes(2) {
        c.spawn(i);
    }
    let start = std::time::Instant::now();
    for i in c.region_nodes(2) {
        let status = loop {
            if let Some(st) = c.nodes[i].child.as_mut().unwrap().try_wait().unwrap() {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "node {} did not refuse within 60 s; log:\n{}",
                c.nodes[i].id,
                c.log_of(i)
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(status.code(), Some(3), "log:\n{}", c.log_of(i));
        let log = c.log_of(i);
        assert!(log.contains("lost all its data"), "{log}");
    }
    // Regions 0 and 1 are still a majority: they grant and replay.
    for i in 0..20 {
        let k = format!("k-{i}");
        match cl[(i + 1) % 2].reserve(&req("p", &k)).await.unwrap() {
            Reservation::Replay(resp) => assert_eq!(resp, body(&k)),
            other => panic!("{k}: {other:?}"),
        }
    }
    assert!(matches!(
        cl[0].reserve(&req("p", "after")).await.unwrap(),
        Reservation::New(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_survives_the_loss_of_the_region_that_took_it() {
    let mut c = GeoCluster::start(GeoOptions::default());
    let cl = clients(&c).await;
    let mut done = Vec::new();
    for i in 0..10 {
        let k = format!("k-{i}");
        let Reservation::New(lease) = cl[0].reserve(&req("p", &k)).await.unwrap() else {
            panic!("fresh key not NEW");
        };
        cl[0].complete(&lease, &body(&k)).await.unwrap();
        done.push(k);
    }
    // Region A (0) is lost at once: no time for its outbox.
    for i in c.region_nodes(0) {
        c.kill(i);
    }
    for k in &done {
        match cl[1].reserve(&req("p", k)).await.unwrap() {
            Reservation::Replay(resp) => assert_eq!(resp, body(k), "replay of {k} changed"),
            other => panic!("region B answered {other:?} for {k} completed through A"),
        }
    }
}

/// REGIONAL mode under a partition: region 0 is cut off and both sides grant and
/// complete the same k keys. After healing every region answers one winner, and the
/// named query `idem:regional_double_grants:total`, evaluated by a real Prometheus
/// over every node, reads exactly k (each double grant counted once, by the region
/// whose grant was overturned, in its replicated state), and still k after that
/// region's nodes restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regional_mode_double_grants_under_a_partition_are_resolved_and_counted_exactly() {
    let _alone = alone().await;
    const K: usize = 10;
    let mut c = GeoCluster::start(GeoOptions {
        extra: "[[namespaces]]\nscope_prefix = \"fast\"\nmode = \"regional\"\n".into(),
        ..GeoOptions::default()
    });
    let cl = clients(&c).await;
    // A REGIONAL key granted and completed before the partition is no double grant.
    let Reservation::New(lease) = cl[0].reserve(&req("fast", "before")).await.unwrap() else {
        panic!("REGIONAL mode did not grant a fresh key");
    };
    cl[0].complete(&lease, &body("before")).await.unwrap();
    c.wait_converged(Duration::from_secs(30));
    c.isolate(0);
    // Both sides of the partition grant and complete the same keys.
    for i in 0..K {
        let k = format!("k-{i}");
        for r in [0, 1] {
            let Reservation::New(lease) = cl[r].reserve(&req("fast", &k)).await.unwrap() else {
                panic!("REGIONAL mode did not grant {k} in region {r}");
            };
            cl[r]
                .complete(&lease, &body(&format!("{k}-{r}")))
                .await
                .unwrap();
        }
    }
    c.heal();
    let (records, _) = c.wait_converged(Duration::from_secs(60));
    assert_eq!(records, K as u64 + 1);
    // Every region now answers the same winner.
    for i in 0..K {
        let k = format!("k-{i}");
        let mut seen = Vec::new();
        for (r, client) in cl.iter().enumerate() {
            match client.reserve(&req("fast", &k)).await.unwrap() {
                Reservation::Replay(resp) => seen.push(resp),
                other => panic!("region {r} answered {other:?} for {k}"),
            }
        }
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{k}: {seen:?}");
    }
    const QUERY: &str = "idem:regional_double_grants:total";
    let targets: Vec<String> = c.nodes.iter().map(|n| n.http.clone()).collect();
    let prom = common::Prometheus::start(&targets);
    tokio::task::block_in_place(|| prom.wait_for(QUERY, K as f64, Duration::from_secs(30)));
    // The count stays exact: more anti-entropy rounds and relayed copies add nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(prom.query_one(QUERY), Some(K as f64));
    // The region that lost the merges counted them; its nodes restart with the count.
    let counting: Vec<usize> = (0..c.regions)
        .filter(|r| c.region_nodes(*r).iter().any(|&n| node_count(&c, n) > 0.0))
        .collect();
    assert_eq!(counting.len(), 1, "one region counts: {counting:?}");
    for n in c.region_nodes(counting[0]) {
        c.kill(n);
        c.spawn(n);
    }
    c.wait_ready(Duration::from_secs(60));
    for n in c.region_nodes(counting[0]) {
        assert_eq!(node_count(&c, n), K as f64, "node {n} after its restart");
    }
    tokio::task::block_in_place(|| prom.wait_for(QUERY, K as f64, Duration::from_secs(30)));
    assert_eq!(
        c.metric_sum("cross_region_conflict_total{mode=\"global\"}"),
        0.0
    );
}

/// The REGIONAL double grants node `n` reports, over its groups.
fn node_count(c: &GeoCluster, n: usize) -> f64 {
    c.metrics(n)
        .lines()
        .filter(|l| l.starts_with("idem_regional_double_grants_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A 1 MiB response: the largest the default limits allow (body plus header).
fn big_body(k: &str) -> StoredResponse {
    let header = idem_client::Header {
        name: "content-type".into(),
        value: b"application/octet-stream".to_vec(),
    };
    let seed = k
        .bytes()
        .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
    let len = (1 << 20) - header.name.len() - header.value.len();
    let body = idem_bench::pseudo_random_bytes(seed, len);
    StoredResponse {
        status: 200,
        headers: vec![header],
        body,
    }
}

/// 1 MiB responses while a follower of region 0 is down and region 2 is cut off: both
/// catch up afterwards (Raft replication of 1 MiB entries, relay and anti-entropy of
/// 1 MiB records) and every node replays every key byte for byte. (A follower's
/// AppendEntries once had one heartbeat interval, 50 ms here, whatever it carried: beside
/// another cluster test a 1 MiB entry did not arrive in time, was resent, and the
/// follower never caught up.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_responses_replicate_to_a_lagging_follower_and_region_and_replay_everywhere() {
    let _alone = alone().await;
    let mut c = GeoCluster::start(GeoOptions::default());
    let cl = clients(&c).await;
    // A follower of region 0 is down and region 2 is cut off while the keys complete:
    // both catch up afterwards (Raft replication of 1 MiB entries, relay and
    // anti-entropy of 1 MiB records).
    let follower = c.region_nodes(0)[2];
    c.kill(follower);
    c.isolate(2);
    const KEYS: usize = 12;
    for i in 0..KEYS {
        let k = format!("big-{i}");
        let r = &cl[i % 2];
        let Reservation::New(lease) = r.reserve(&req("p", &k)).await.unwrap() else {
            panic!("fresh key {k} not NEW");
        };
        r.complete(&lease, &big_body(&k)).await.unwrap();
    }
    c.spawn(follower);
    c.heal();
    c.wait_ready(Duration::from_secs(60));
    let (records, _) = c.wait_converged(Duration::from_secs(90));
    assert_eq!(records, KEYS as u64);
    // Every node of every region replays every key byte for byte.
    for n in 0..c.nodes.len() {
        let client = c.client(n).await;
        for i in 0..KEYS {
            let k = format!("big-{i}");
            match client.reserve(&req("p", &k)).await.unwrap() {
                Reservation::Replay(resp) => {
                    assert!(resp == big_body(&k), "node {n}: replay of {k} differs")
                }
                other => panic!("node {n} answered {other:?} for {k}"),
            }
        }
    }
    // And the cluster still serves small keys promptly.
    let Reservation::New(_) = cl[2].reserve(&req("p", "after")).await.unwrap() else {
        panic!("a fresh key after the large ones was not NEW");
    };
}

/// One node's wall clock runs 2 s fast from its start (libfaketime), and calls go
/// through every node: the node must stop serving writes (not ready, with the reason,
/// still live), no key may be granted a second time while its holder trusts its lease
/// (a peer's fast clock once ended leases 2 s early everywhere), and the node must serve
/// again once its clock is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_2_s_fast_is_fenced_no_lease_ends_early_and_it_resumes_when_its_clock_is_back() {
    let _alone = alone().await;
    use common::{http_get, series_value};
    use std::time::Instant;
    let fast = 4; // the second node of region 1
    let c = GeoCluster::start(GeoOptions {
        fake_clocks: vec![(fast, 2.0)],
        ..GeoOptions::default()
    });
    let node = &c.nodes[fast];
    let t = Instant::now();
    loop {
        let (code, text) = http_get(&node.http, "/healthz").unwrap_or((0, String::new()));
        if code == 503 && text.contains("clock") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the fast node is not fenced: {code} {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http_get(&node.http, "/livez").map(|r| r.0), Some(200));
    let m = c.metrics(fast);
    assert_eq!(series_value(&m, "idem_clock_fault"), Some(1.0), "{m}");
    let offsets: Vec<f64> = m
        .lines()
        .filter(|l| l.starts_with("idem_peer_clock_offset_seconds{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(
        offsets.iter().filter(|o| (**o + 2.0).abs() < 0.5).count() * 2 > offsets.len(),
        "the fast node sees its peers about 2 s behind: {offsets:?}"
    );

    // Five keys granted through region 0 with a 4 s lease, then, 3 s into the lease,
    // the same requests through every node of every region.
    let holder = c.client(0).await;
    let grants = futures::future::join_all((0..5).map(|i| {
        let holder = holder.clone();
        async move {
            let mut r = req("clock", &format!("fast-{i}"));
            r.lease_ms = 4_000;
            match holder.reserve(&r).await {
                Ok(Reservation::New(l)) => (r, l),
                other => panic!("fast-{i}: {other:?}"),
            }
        }
    }))
    .await;
    let mut clients = Vec::new();
    for i in 0..c.nodes.len() {
        clients.push(c.client_once(i).await);
    }
    // From 2 s into the lease (when a 2 s fast stamp would see it over) until the holder
    // stops trusting it, every node is asked again and again for every key. Each answer
    // with whether its key's holder still trusted its lease when it came.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let answers = futures::future::join_all(clients.iter().enumerate().flat_map(|(n, cl)| {
        grants.iter().map(move |(r, lease)| {
            let (cl, r) = (cl.clone(), r.clone());
            async move {
                let mut seen = Vec::new();
                loop {
                    let a = cl.reserve(&r).await;
                    let trusted = lease.is_trusted();
                    let new = matches!(a, Ok(Reservation::New(_)));
                    seen.push((n, trusted, a));
                    if !trusted || new {
                        return seen;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        })
    }))
    .await
    .into_iter()
    .flatten()
    .collect::<Vec<_>>();
    let inside: Vec<_> = answers.iter().filter(|(_, trusted, _)| *trusted).collect();
    let nodes_inside: std::collections::BTreeSet<usize> =
        inside.iter().map(|(n, _, _)| *n).collect();
    // (Every node is asked; a node's first answer can miss the 1.8 s window on a loaded
    // 2-core machine, so most nodes, not all, must have answered inside it.)
    assert!(
        inside.len() >= 30 && nodes_inside.len() * 3 >= c.nodes.len() * 2,
        "only {} of {} answers (from nodes {nodes_inside:?}) came while the leases were trusted",
        inside.len(),
        answers.len()
    );
    let second: Vec<_> = inside
        .iter()
        .filter(|(_, _, a)| matches!(a, Ok(Reservation::New(_))))
        .collect();
    assert!(
        second.is_empty(),
        "granted again inside the lease: {second:?}"
    );

    // The clock comes back: the node resumes by itself.
    c.set_clock(fast, 0.0);
    let t = Instant::now();
    while http_get(&node.http, "/healthz").is_none_or(|(code, _)| code != 200) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the node did not resume: {:?}",
            http_get(&node.http, "/healthz")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = c.client(fast).await;
    assert!(matches!(
        again.reserve(&req("clock", "after")).await,
        Ok(Reservation::New(_))
    ));
}

/// A caller that gives up mid-proposal (its deadline is shorter than the WAN round trip
/// of its region's calls) leaves no orphan: dropping the handler withdraws the proposal
/// from every region, and the withdraw outlasts the Propose it chases (the tombstone),
/// so another region's Reserve a moment later is NEW, not IN_FLIGHT for the abandoned
/// claim's 30 s lease; the withdraws are counted as applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_abandoned_mid_proposal_leaves_no_orphan() {
    let _alone = alone().await;
    const KEYS: usize = 5;
    let c = GeoCluster::start(GeoOptions::default());
    let from = c.region_nodes(0)[0];
    let applied = |c: &GeoCluster| -> f64 {
        c.metrics(from)
            .lines()
            .filter(|l| {
                l.starts_with("idem_geo_withdraws_total{") && l.contains("result=\"applied\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let before = applied(&c);
    c.delay_from(0, 400);
    let mut cfg = idem_client::ClientConfig::new(c.nodes[from].grpc.clone());
    cfg.timeout = Duration::from_millis(150);
    cfg.retry = idem_client::RetryPolicy {
        max_attempts: 1,
        ..idem_client::RetryPolicy::default()
    };
    let impatient = Client::connect(cfg).await.unwrap();
    let reqs: Vec<_> = (0..KEYS)
        .map(|i| {
            let mut r = req("orphan", &format!("k-{i}"));
            r.lease_ms = 30_000;
            r
        })
        .collect();
    for r in &reqs {
        let a = impatient.reserve(r).await;
        assert!(
            a.is_err(),
            "answered within 150 ms over a 400 ms link: {a:?}"
        );
    }
    // The abandoned proposals' Proposes and withdraws land (400 ms each way).
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.delay_from(0, 0);
    let other = c.client_once(c.region_nodes(1)[0]).await;
    for r in &reqs {
        match other.reserve(r).await {
            Ok(Reservation::New(_)) => {}
            a => panic!("an abandoned Reserve left its key held: {a:?}"),
        }
    }
    let withdrawn = applied(&c) - before;
    assert!(
        withdrawn >= (KEYS * 2) as f64,
        "{withdrawn} withdraws applied in the other regions for {KEYS} abandoned Reserves"
    );
}

/// The group leader of one region: the node (index) its first node names in `/status`.
fn region_leader(c: &GeoCluster, r: usize) -> Option<usize> {
    region_leader_as_seen_by(c, r, c.region_nodes(r)[0])
}

fn region_leader_as_seen_by(c: &GeoCluster, r: usize, by: usize) -> Option<usize> {
    let (_, text) = common::http_get(&c.nodes[by].http, "/status")?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let id = v["groups"]
        .as_array()?
        .iter()
        .find(|g| g["group"].as_str() == Some(&format!("r{r}/s0")))?["leader"]
        .as_u64()?;
    c.region_nodes(r).into_iter().find(|i| c.nodes[*i].id == id)
}

/// A node restarted with its wall clock 2 s fast is fenced (its peers measure it beyond
/// the bound); then its region's leader dies, leaving it and one other voter. It must
/// not take the leadership it could not use (the region's REGIONAL keys would be
/// unavailable for as long as its clock is off): it does not campaign while its clock is
/// off, the other voter leads, the region keeps granting, and once its clock is back it
/// serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_clock_off_does_not_take_the_leadership_and_its_region_keeps_granting() {
    let _alone = alone().await;
    use std::time::Instant;
    let region = 1;
    let mut c = GeoCluster::start(GeoOptions {
        extra: "[[namespaces]]\nscope_prefix = \"local\"\nmode = \"regional\"\n".into(),
        fake_clocks: (3..6).map(|i| (i, 0.0)).collect(),
        ..GeoOptions::default()
    });
    let healthy = |c: &GeoCluster, i: usize| {
        common::http_get(&c.nodes[i].http, "/healthz").is_some_and(|(code, _)| code == 200)
    };
    let t = Instant::now();
    let first = loop {
        let ready = c.region_nodes(region).into_iter().all(|i| healthy(&c, i));
        if let (true, Some(l)) = (ready, region_leader(&c, region)) {
            break l;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "region {region} not ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The first leader restarts 2 s fast; another node leads meanwhile.
    let skewed = first;
    c.kill(skewed);
    c.set_clock(skewed, 2.0);
    c.spawn(skewed);
    let t = Instant::now();
    let second = loop {
        // Measured off by its peers (not merely not yet confirmed).
        let fenced = common::http_get(&c.nodes[skewed].http, "/healthz")
            .is_some_and(|(code, text)| code == 503 && text.contains("ms off"));
        let others: Vec<usize> = c
            .region_nodes(region)
            .into_iter()
            .filter(|i| *i != skewed)
            .collect();
        let leader = region_leader_as_seen_by(&c, region, others[0]);
        if let (true, Some(l)) = (fenced, leader) {
            if l != skewed {
                break l;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "restarted 2 s fast: fenced {fenced}, leader {leader:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Its guard turns its election timer off within a few hundred ms of the fault.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let term = |c: &GeoCluster, by: usize| -> Option<u64> {
        let (_, text) = common::http_get(&c.nodes[by].http, "/status")?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v["groups"]
            .as_array()?
            .iter()
            .find(|g| g["group"].as_str() == Some(&format!("r{region}/s0")))?["term"]
            .as_u64()
    };
    // The leader dies: the skewed node and one other voter remain.
    // (Read until it answers: a loaded machine may miss one HTTP read.)
    let read_term = |c: &GeoCluster, by: usize| -> Option<u64> {
        let t = Instant::now();
        loop {
            match term(c, by) {
                Some(v) => return Some(v),
                None if t.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                None => return None,
            }
        }
    };
    let term_before = read_term(&c, skewed).expect("the skewed node's term");
    c.kill(second);
    let last = c
        .region_nodes(region)
        .into_iter()
        .find(|i| *i != skewed && *i != second)
        .unwrap();
    let local = c.client(last).await;
    let t = Instant::now();
    let mut granted = 0;
    while granted < 10 {
        // The skewed node never leads, not even for a moment.
        assert_ne!(region_leader_as_seen_by(&c, region, last), Some(skewed));
        match local
            .reserve(&req("local", &format!("during-{granted}")))
            .await
        {
            Ok(Reservation::New(_)) => granted += 1,
            other => {
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "region {region} granted {granted} keys in 20 s (leader {:?}): {other:?}",
                    region_leader_as_seen_by(&c, region, last)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(region_leader_as_seen_by(&c, region, last), Some(last));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(region_leader_as_seen_by(&c, region, last), Some(last));
    // One election, won by the other voter: the skewed node never campaigned (its own
    // failed campaigns would show as more terms).
    let term_after = read_term(&c, last).expect("the region's term");
    assert!(
        term_after <= term_before + 2,
        "terms {term_before} -> {term_after}: more elections than the leader's death needs"
    );

    // Its clock comes back: it serves again.
    c.set_clock(skewed, 0.0);
    let t = Instant::now();
    while !healthy(&c, skewed) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the node did not resume"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let back = c.client(skewed).await;
    assert!(matches!(
        back.reserve(&req("local", "after")).await,
        Ok(Reservation::New(_))
    ));
}

/// Every node of one region runs 2 s fast from the start. The other regions' nodes must
/// still have their clocks confirmed and serve: each measures its own region's nodes as
/// well as the other regions', so the bad region is a minority of its peers. (Measuring
/// only the other regions, a node saw three peers within the bound and three beyond,
/// no majority either way, and stayed unconfirmed: not ready, granting nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_region_with_every_clock_2_s_fast_is_fenced_and_the_others_serve() {
    let _alone = alone().await;
    use std::time::Instant;
    let c = GeoCluster::start(GeoOptions {
        fake_clocks: (6..9).map(|i| (i, 2.0)).collect(),
        ..GeoOptions::default()
    });
    // Started and ready: every node of regions 0 and 1 (`start` waits for them).
    for i in c.region_nodes(0).into_iter().chain(c.region_nodes(1)) {
        assert_eq!(
            common::http_get(&c.nodes[i].http, "/healthz").map(|r| r.0),
            Some(200),
            "node {}",
            c.nodes[i].id
        );
    }
    // The fast region is fenced, with the reason.
    let t = Instant::now();
    for i in c.region_nodes(2) {
        loop {
            let (code, text) =
                common::http_get(&c.nodes[i].http, "/healthz").unwrap_or((0, String::new()));
            if code == 503 && text.contains("ms off") {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "node {} not fenced: {code} {text}",
                c.nodes[i].id
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The healthy regions grant and complete.
    let cl = clients(&c).await;
    for i in 0..5 {
        let k = format!("k-{i}");
        let r = &cl[i % 2];
        let Reservation::New(lease) = r.reserve(&req("p", &k)).await.unwrap() else {
            panic!("{k} not NEW");
        };
        r.complete(&lease, &body(&k)).await.unwrap();
    }
}

/// A holder's Extend, Release and Complete sent through other regions than the one
/// that granted the key are judged by a majority of regions: the extended lease holds
/// the key in every region, a released key is NEW again elsewhere, a completed key
/// cannot be released, a stale fence is refused and a key nobody reserved is not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holder_calls_through_other_regions_are_judged_by_a_majority_of_regions() {
    let c = GeoCluster::start(GeoOptions::default());
    let cl = clients(&c).await;
    let Reservation::New(mut first) = cl[0].reserve(&req("p", "held")).await.unwrap() else {
        panic!("fresh key not NEW");
    };
    let before = first.expires_at_ms;
    cl[1].extend(&mut first, 40_000).await.unwrap();
    assert!(
        first.expires_at_ms >= before + 20_000,
        "the lease end moved from {before} to {} only",
        first.expires_at_ms
    );
    // The extended lease, not the first one, is what another region waits for.
    match cl[2].reserve(&req("p", "held")).await.unwrap() {
        Reservation::InFlight { retry_after } => assert!(
            retry_after > Duration::from_secs(20),
            "hint {retry_after:?} ignores the extension"
        ),
        other => panic!("an extended lease answered {other:?}"),
    }
    cl[2].release(&first).await.unwrap();
    let Reservation::New(second) = cl[1].reserve(&req("p", "held")).await.unwrap() else {
        panic!("a released key is not NEW again");
    };
    assert_ne!(second.fence, first.fence);
    match cl[0].extend(&mut first, 10_000).await {
        Err(Error::LeaseLost(_)) => {}
        other => panic!("Extend with the released fence answered {other:?}"),
    }
    cl[2].complete(&second, &body("held")).await.unwrap();
    match cl[0].release(&second).await {
        Err(Error::AlreadyCompleted) => {}
        other => panic!("Release of a completed key answered {other:?}"),
    }
    let nobody = idem_client::Lease::from_fence("p".into(), b"never".to_vec(), second.fence);
    match cl[1].release(&nobody).await {
        Err(Error::NotFound(_)) => {}
        other => panic!("Release of a key nobody reserved answered {other:?}"),
    }
}
