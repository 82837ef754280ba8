//! Nemeses: the faults the suite injects, each selectable by name. A fault window holds
//! one to `--compose` faults at once, drawn by the seed (a partition during a kill during
//! clock skew), on distinct nodes; every named nemesis fires at least once.
//!
//! | name | fault |
//! |---|---|
//! | `partition-node` | one node cut off from every other node |
//! | `partition-region` | one region cut off from the others (clients still reach it) |
//! | `partition-majority` | inside one region, a minority cut off from the majority |
//! | `partition-ring` | regions in a ring: each reaches only its neighbours' nodes (majorities ring) |
//! | `partition-bridge` | two regions cut apart, the third reaches both (bridge) |
//! | `partition-oneway` | one region's packets to another dropped, not the reverse |
//! | `partition-regions` | every region cut off from every other (no majority of regions anywhere: nothing may be granted) |
//! | `kill` | SIGKILL of a random node, restarted when the window ends |
//! | `kill-leader` | SIGKILL of a region's Raft leader, restarted when the window ends |
//! | `kill-majority` | SIGKILL of a majority of one region's nodes (its groups' Raft majority) |
//! | `kill-region` | SIGKILL of every node of one region |
//! | `pause` | SIGSTOP of a node, longer than the election timeout, then SIGCONT |
//! | `clock` | one node's wall clock (often a group leader's, the node that stamps) moved ahead or behind: half the time within the skew margin, half the time 1 to 10 s (then half the time the node restarts on the moved clock) |
//! | `clock-strobe` | one node's clock jumping back and forth every 200 ms |
//! | `loss` | 20 % of the packets between nodes dropped |
//! | `restart` | a node stopped and started again (SIGTERM) |
//! | `wan-stall` | the WAN links between two regions hold every byte for 2 to 5 s |
//! | `power-loss-node` | one node loses power: killed, and its disk keeps only what it synced |
//! | `power-loss-group` | a majority of one region's nodes lose power at once |
//! | `power-loss-region` | every node of one region loses power at once |
//! | `disk-eio` | one node's fsyncs fail with EIO (the node must stop; healed by a power loss and a restart) |
//! | `disk-full` | one node's disk is full (ENOSPC) |
//! | `disk-slow` | one node's disk answers every operation 20 to 80 ms late |
//! | `lose-data` | one node's data directory is lost and the node started again under its id: it must refuse to start; healed by `--rejoin` |

mod disk;

use crate::cluster::{Cluster, SKEW_MARGIN_MS};
use crate::net;
use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;
use std::collections::BTreeSet;

pub const ALL: [&str; 24] = [
    "partition-node",
    "partition-region",
    "partition-majority",
    "partition-ring",
    "partition-bridge",
    "partition-oneway",
    "partition-regions",
    "kill",
    "kill-leader",
    "kill-majority",
    "kill-region",
    "pause",
    "clock",
    "clock-strobe",
    "loss",
    "restart",
    "wan-stall",
    "power-loss-node",
    "power-loss-group",
    "power-loss-region",
    "disk-eio",
    "disk-full",
    "disk-slow",
    "lose-data",
];

/// The nemeses that act on the fault filesystem.
pub fn needs_faultfs(name: &str) -> bool {
    name.starts_with("power-loss") || name.starts_with("disk-") || name == "lose-data"
}

/// One fault, from when it was injected to when it was healed.
#[derive(Clone, Debug, Serialize)]
pub struct Window {
    pub nemesis: String,
    pub detail: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// What showed that the fault took effect (`None`: nothing did; the run cannot
    /// claim to have tested it).
    pub observed: Option<String>,
}

/// What must be undone when the window ends.
pub enum Active {
    Network,
    Killed(Vec<usize>),
    Paused(usize),
    /// The node and the offset its wall clock was given, in milliseconds.
    Clock(usize, i64),
    Strobe(usize, tokio::task::JoinHandle<()>),
    Restart(usize),
    /// The stalled links, with how many chunks each had held before the stall.
    Stall(Vec<(std::sync::Arc<net::Stall>, u64)>),
    Disk(disk::DiskFault),
}

/// The nodes a window's faults act on: two faults of one window never share a node
/// (a kill must not be undone by another fault's restart).
#[derive(Default)]
pub struct Claims(BTreeSet<usize>);

impl Claims {
    /// A random node no fault of this window uses yet, which is running.
    fn node(&mut self, c: &Cluster, rng: &mut StdRng) -> Option<usize> {
        let free: Vec<usize> = (0..c.nodes.len())
            .filter(|i| !self.0.contains(i) && c.running(*i))
            .collect();
        let x = *free.get(rng.random_range(0..free.len().max(1)))?;
        self.0.insert(x);
        Some(x)
    }

    /// A random region none of whose nodes a fault of this window uses.
    fn region(&mut self, c: &Cluster, rng: &mut StdRng) -> Option<usize> {
        let free: Vec<usize> = (0..c.regions)
            .filter(|r| c.region_nodes(*r).iter().all(|i| !self.0.contains(i)))
            .collect();
        let r = *free.get(rng.random_range(0..free.len().max(1)))?;
        self.0.extend(c.region_nodes(r));
        Some(r)
    }

    fn take(&mut self, x: usize) -> bool {
        self.0.insert(x)
    }
}

/// The faults of each window: every named nemesis in turn (the order shuffled by the
/// seed), so that a run of `windows` windows fires each at least once when `windows >=
/// names.len()`; with `compose > 1`, each window adds up to `compose - 1` more,
/// drawn at random from the named ones.
pub fn schedule(
    names: &[String],
    windows: usize,
    compose: usize,
    rng: &mut StdRng,
) -> Vec<Vec<String>> {
    let mut order: Vec<String> = names.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    (0..windows)
        .filter_map(|i| {
            let first = order.get(i % order.len().max(1))?.clone();
            let mut w = vec![first];
            for _ in 1..compose {
                if rng.random_bool(0.5) {
                    let other = &names[rng.random_range(0..names.len())];
                    if !w.contains(other) {
                        w.push(other.clone());
                    }
                }
            }
            Some(w)
        })
        .collect()
}

/// Look for the fault's effect: packets dropped by its rules, a node that no longer
/// answers, a process that exited, a node whose clock reads the offset it was given, a
/// stalled link that held bytes back, a disk that failed or slowed its operations.
pub fn observe(a: &Active, c: &mut Cluster) -> Option<String> {
    use crate::cluster::http_get;
    match a {
        Active::Network => {
            let dropped = net::dropped_packets().ok()?;
            (dropped > 0).then(|| format!("{dropped} packets dropped"))
        }
        Active::Killed(xs) => {
            let down = xs.iter().all(|x| {
                c.nodes[*x].child.is_none() && http_get(&c.nodes[*x].http(), "/healthz").is_none()
            });
            down.then(|| format!("{} not answering", ids(c, xs)))
        }
        Active::Paused(x) => http_get(&c.nodes[*x].http(), "/healthz")
            .is_none()
            .then(|| format!("node {} not answering", c.nodes[*x].id)),
        Active::Restart(x) => {
            let n = &mut c.nodes[*x];
            let status = n.child.as_mut()?.try_wait().ok()??;
            Some(format!("node {} exited ({status})", n.id))
        }
        Active::Clock(x, off) => {
            let seen = c.clock_offset_ms(*x)?;
            ((seen - off).abs() < 250)
                .then(|| format!("node {} wall clock reads {seen:+} ms", c.nodes[*x].id))
        }
        Active::Strobe(x, _) => {
            let seen = c.clock_offset_ms(*x)?;
            (seen.unsigned_abs() >= SKEW_MARGIN_MS / 2)
                .then(|| format!("node {} wall clock reads {seen:+} ms", c.nodes[*x].id))
        }
        Active::Stall(links) => {
            let held: u64 = links.iter().map(|(l, before)| l.held() - before).sum();
            (held > 0).then(|| format!("{held} chunks held back"))
        }
        Active::Disk(d) => d.observe(c),
    }
}

/// "nodes 1, 2" for a message.
fn ids(c: &Cluster, xs: &[usize]) -> String {
    let v: Vec<String> = xs.iter().map(|x| c.nodes[*x].id.to_string()).collect();
    format!(
        "node{} {}",
        if v.len() > 1 { "s" } else { "" },
        v.join(", ")
    )
}

/// Cut every link between the node sets `a` and `b`, both ways (or one way).
fn cut_sets(c: &Cluster, a: &[usize], b: &[usize], both: bool) -> anyhow::Result<()> {
    for &x in a {
        for &y in b {
            net::cut(c.nodes[x].ip, c.nodes[y].ip)?;
            if both {
                net::cut(c.nodes[y].ip, c.nodes[x].ip)?;
            }
        }
    }
    Ok(())
}

/// A majority of region `r`'s nodes (its groups' Raft majority), at random.
fn majority_of(c: &Cluster, r: usize, rng: &mut StdRng) -> Vec<usize> {
    let mut nodes = c.region_nodes(r);
    for i in (1..nodes.len()).rev() {
        nodes.swap(i, rng.random_range(0..=i));
    }
    nodes.truncate(nodes.len() / 2 + 1);
    nodes.sort_unstable();
    nodes
}

/// Inject `name` on nodes no other fault of the window uses; returns what to undo and a
/// description, or `None` when no node or region was left for it.
pub fn inject(
    name: &str,
    c: &mut Cluster,
    claims: &mut Claims,
    rng: &mut StdRng,
) -> anyhow::Result<Option<(Active, String)>> {
    let nodes = c.nodes.len();
    let regions = c.regions;
    let all: Vec<usize> = (0..nodes).collect();
    let done = |a: Active, d: String| Ok(Some((a, d)));
    if needs_faultfs(name) {
        return disk::inject(name, c, claims, rng);
    }
    match name {
        "partition-node" => {
            let x = rng.random_range(0..nodes);
            let rest: Vec<usize> = all.iter().copied().filter(|i| *i != x).collect();
            cut_sets(c, &[x], &rest, true)?;
            done(Active::Network, format!("node {} isolated", c.nodes[x].id))
        }
        "partition-region" => {
            let r = rng.random_range(0..regions);
            let inside = c.region_nodes(r);
            let outside: Vec<usize> = all
                .iter()
                .copied()
                .filter(|i| !inside.contains(i))
                .collect();
            cut_sets(c, &inside, &outside, true)?;
            done(Active::Network, format!("region {r} isolated"))
        }
        "partition-majority" => {
            let r = rng.random_range(0..regions);
            let inside = c.region_nodes(r);
            let minority = inside.len() / 2;
            let (lo, hi) = inside.split_at(minority.max(1));
            cut_sets(c, lo, hi, true)?;
            done(
                Active::Network,
                format!("region {r}: {} node(s) cut from the rest", lo.len()),
            )
        }
        "partition-ring" => {
            // Region r reaches only regions r-1 and r+1 (meaningful from 4 regions; with
            // 3 it cuts one node of each region from the next region instead).
            for r in 0..regions {
                let next = (r + 1) % regions;
                let a = c.region_nodes(r);
                let b = c.region_nodes(next);
                if regions > 3 {
                    let far = (r + 2) % regions;
                    cut_sets(c, &a, &c.region_nodes(far), true)?;
                } else {
                    cut_sets(c, &a[..1], &b, true)?;
                }
            }
            done(Active::Network, "majorities ring".into())
        }
        "partition-bridge" => {
            let r = rng.random_range(0..regions);
            let a = c.region_nodes((r + 1) % regions);
            let b = c.region_nodes((r + 2) % regions);
            cut_sets(c, &a, &b, true)?;
            done(Active::Network, format!("bridge through region {r}"))
        }
        "partition-oneway" => {
            let r = rng.random_range(0..regions);
            let to = (r + 1) % regions;
            let (a, b) = (c.region_nodes(r), c.region_nodes(to));
            cut_sets(c, &a, &b, false)?;
            done(
                Active::Network,
                format!("region {r} -> region {to} dropped"),
            )
        }
        "partition-regions" => {
            for a in 0..regions {
                for b in a + 1..regions {
                    cut_sets(c, &c.region_nodes(a), &c.region_nodes(b), true)?;
                }
            }
            done(
                Active::Network,
                "every region cut off from every other".into(),
            )
        }
        "loss" => {
            net::lossy(0.2)?;
            done(Active::Network, "20% packet loss".into())
        }
        "kill" => {
            let Some(x) = claims.node(c, rng) else {
                return Ok(None);
            };
            c.kill(x);
            done(
                Active::Killed(vec![x]),
                format!("node {} killed", c.nodes[x].id),
            )
        }
        "kill-leader" => {
            let r = rng.random_range(0..regions);
            let Some(x) = c
                .leader_of(r)
                .filter(|x| claims.take(*x))
                .or_else(|| claims.node(c, rng))
            else {
                return Ok(None);
            };
            c.kill(x);
            done(
                Active::Killed(vec![x]),
                format!("leader node {} of region {r} killed", c.nodes[x].id),
            )
        }
        "kill-majority" | "kill-region" => {
            let Some(r) = claims.region(c, rng) else {
                return Ok(None);
            };
            let xs = if name == "kill-region" {
                c.region_nodes(r)
            } else {
                majority_of(c, r, rng)
            };
            for x in &xs {
                c.kill(*x);
            }
            let d = format!("region {r}: {} killed", ids(c, &xs));
            done(Active::Killed(xs), d)
        }
        "pause" => {
            let Some(x) = claims.node(c, rng) else {
                return Ok(None);
            };
            c.signal(x, "-STOP");
            done(Active::Paused(x), format!("node {} paused", c.nodes[x].id))
        }
        "clock" => {
            // Half the time a group leader (the node whose clock stamps its group's
            // entries), half the time any node; half the time within the margin, half
            // the time 1 to 10 s; ahead or behind.
            let leader = if rng.random_bool(0.5) {
                let r = rng.random_range(0..regions);
                c.leader_of(r).filter(|x| claims.take(*x))
            } else {
                None
            };
            let Some(x) = leader.or_else(|| claims.node(c, rng)) else {
                return Ok(None);
            };
            let size = if rng.random_bool(0.5) {
                SKEW_MARGIN_MS as f64 / 1000.0 * rng.random_range(0.3..0.9)
            } else {
                rng.random_range(1.0..10.0)
            };
            let off = if rng.random_bool(0.5) { size } else { -size };
            c.set_clock_offset(x, off)?;
            // Beyond the margin, half the time the node also restarts on the moved clock:
            // a running node's stamp clock does not follow a jump, but a node that
            // starts on a wrong clock has nothing else to go by, so its peers must fence
            // it (and it must hand over any leadership it wins).
            let restart = size >= 1.0 && rng.random_bool(0.5);
            if restart {
                c.kill(x);
                c.start(x)?;
            }
            done(
                Active::Clock(x, (off * 1000.0).round() as i64),
                format!(
                    "node {} clock {off:+.3} s{}",
                    c.nodes[x].id,
                    if restart { ", restarted on it" } else { "" }
                ),
            )
        }
        "clock-strobe" => {
            let Some(x) = claims.node(c, rng) else {
                return Ok(None);
            };
            let file = c.nodes[x].clock_file.clone();
            let bound = SKEW_MARGIN_MS as f64 / 1000.0 * 0.8;
            let h = tokio::spawn(async move {
                let mut up = false;
                loop {
                    up = !up;
                    let s = if up {
                        format!("+{bound:.3}\n")
                    } else {
                        format!("-{bound:.3}\n")
                    };
                    let _ = std::fs::write(&file, s);
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            });
            done(
                Active::Strobe(x, h),
                format!("node {} clock strobing ±{bound:.2} s", c.nodes[x].id),
            )
        }
        "restart" => {
            let Some(x) = claims.node(c, rng) else {
                return Ok(None);
            };
            c.signal(x, "-TERM");
            done(
                Active::Restart(x),
                format!("node {} restarting", c.nodes[x].id),
            )
        }
        "wan-stall" => {
            let a = rng.random_range(0..regions);
            let b = (a + 1 + rng.random_range(0..regions.max(2) - 1)) % regions;
            let secs = rng.random_range(2.0..5.0);
            let until = crate::history::now_ms() + (secs * 1000.0) as u64;
            let links: Vec<_> = [c.wan.link(a, b), c.wan.link(b, a)]
                .into_iter()
                .map(|l| {
                    l.stall_until(until);
                    let held = l.held();
                    (l, held)
                })
                .collect();
            done(
                Active::Stall(links),
                format!("links between regions {a} and {b} stalled {secs:.1} s"),
            )
        }
        other => anyhow::bail!("unknown nemesis {other:?}; known: {}", ALL.join(", ")),
    }
}

pub fn heal(a: Active, c: &mut Cluster) -> anyhow::Result<()> {
    match a {
        Active::Network => net::heal()?,
        Active::Killed(xs) => {
            for x in xs {
                c.start(x)?;
            }
        }
        Active::Paused(x) => c.signal(x, "-CONT"),
        Active::Clock(x, _) => c.set_clock_offset(x, 0.0)?,
        Active::Strobe(x, h) => {
            h.abort();
            c.set_clock_offset(x, 0.0)?;
        }
        Active::Restart(x) => {
            if let Some(mut ch) = c.nodes[x].child.take() {
                let _ = ch.wait();
            }
            c.start(x)?;
        }
        // A stall ends by itself.
        Active::Stall(_) => {}
        Active::Disk(d) => d.heal(c)?,
    }
    Ok(())
}

pub fn check_names(names: &[String], faultfs: bool) -> anyhow::Result<()> {
    for n in names {
        if !ALL.contains(&n.as_str()) && n != "none" {
            anyhow::bail!("unknown nemesis {n:?}; known: {}, none", ALL.join(", "));
        }
        if needs_faultfs(n) && !faultfs {
            anyhow::bail!("nemesis {n} needs the fault filesystem (drop --no-faultfs)");
        }
    }
    Ok(())
}
