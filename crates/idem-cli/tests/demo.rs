//! `idem demo` as a new user runs it (the debug build the README's `make demo` starts),
//! driven through the `idem` command line.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Region r's node i listens on base + 10 r + i.
const OFFSETS: [u16; 9] = [0, 1, 2, 10, 11, 12, 20, 21, 22];

/// A gRPC and an HTTP base port whose nine demo ports are all free.
fn free_bases() -> (u16, u16) {
    let free = |base: u16| {
        OFFSETS
            .iter()
            .all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok())
    };
    (0..50)
        .find_map(|_| {
            let g = common::free_port();
            let h = g + 25;
            (free(g) && free(h)).then_some((g, h))
        })
        .expect("free ports for the demo")
}

struct Demo {
    child: Child,
    grpc: u16,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo(data: &std::path::Path) -> Demo {
    let (grpc, http) = free_bases();
    let child = Command::new(env!("CARGO_BIN_EXE_idem"))
        .arg("demo")
        .arg("--data-dir")
        .arg(data)
        .args(["--no-example", "--grpc-port"])
        .arg(grpc.to_string())
        .arg("--http-port")
        .arg(http.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start idem demo");
    // Killed and waited for when dropped, on every path.
    let mut demo = Demo { child, grpc };
    let mut out = BufReader::new(demo.child.stdout.take().expect("stdout"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("the demo ended before it was ready:\n{seen}");
        }
        seen.push_str(&line);
        if line.contains("cluster ready.") {
            // Keep draining its output so that the demo never blocks on a full pipe.
            std::thread::spawn(move || for _ in out.lines() {});
            return demo;
        }
    }
}

/// `idem ARGS --json` against one node: its JSON answer.
fn idem(endpoint: u16, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .arg("--json")
        .arg("--endpoint")
        .arg(format!("127.0.0.1:{endpoint}"))
        .output()
        .expect("run idem");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "idem {args:?}: {e}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Tried as a new user would: one Complete with a 200 KiB binary body through the
/// demo's first node (this once left every Reserve on every node UNAVAILABLE for minutes:
/// the Raft codec encoded the body one integer per byte). The body must replay byte for
/// byte from every node of every region, and every node must keep granting new keys.
#[test]
fn the_demo_completes_a_200_kib_binary_body_replays_it_everywhere_and_stays_available() {
    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(&dir.path().join("data"));
    let file = dir.path().join("body.bin");
    let body = idem_bench::pseudo_random_bytes(0x9e37_79b9_7f4a_7c15, 200 * 1024);
    std::fs::write(&file, &body).unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&body))
    };

    let first = demo.grpc;
    let r = idem(first, &["reserve", "--key", "big-1", "--body", "charge"]);
    assert_eq!(r["outcome"], "new", "{r}");
    let fence = r["fence"].as_str().expect("fence").to_string();
    let t = Instant::now();
    let path = file.to_str().unwrap();
    let c = idem(
        first,
        &[
            "complete",
            "--key",
            "big-1",
            "--fence",
            &fence,
            "--body-file",
            path,
        ],
    );
    assert_eq!(c["outcome"], "completed", "{c}");
    eprintln!("200 KiB Complete: {:?}", t.elapsed());

    for (i, o) in OFFSETS.iter().enumerate() {
        let node = demo.grpc + o;
        // Replicated to every region (relay and anti-entropy): wait for it, boundedly.
        let t = Instant::now();
        let replay = loop {
            let r = idem(node, &["reserve", "--key", "big-1", "--body", "charge"]);
            if r["outcome"] == "replay" {
                break r;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "node {} answered {r} 30 s after the completion",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(
            replay["response"]["body_bytes"],
            body.len(),
            "node {}",
            i + 1
        );
        assert_eq!(replay["response"]["body_sha256"], sha, "node {}", i + 1);
        // And the node still grants a fresh key, promptly.
        let t = Instant::now();
        let n = idem(
            node,
            &["reserve", "--key", &format!("after-{i}"), "--body", "x"],
        );
        assert_eq!(n["outcome"], "new", "node {}: {n}", i + 1);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "node {}: a fresh key took {:?}",
            i + 1,
            t.elapsed()
        );
    }
}
