//! Nemeses: the faults the suite injects, each selectable by name and combinable.
//!
//! | name | fault |
//! |---|---|
//! | `partition-node` | one node cut off from every other node |
//! | `partition-region` | one region cut off from the others (clients still reach it) |
//! | `partition-majority` | inside one region, a minority cut off from the majority |
//! | `partition-ring` | regions in a ring: each reaches only its neighbours' nodes (majorities ring) |
//! | `partition-bridge` | two regions cut apart, the third reaches both (bridge) |
//! | `partition-oneway` | one region's packets to another dropped, not the reverse |
//! | `kill` | SIGKILL of a random node, restarted when the window ends |
//! | `kill-leader` | SIGKILL of a region's Raft leader, restarted when the window ends |
//! | `pause` | SIGSTOP of a node, longer than the election timeout, then SIGCONT |
//! | `clock` | one node's wall clock (often a group leader's, the node that stamps) moved ahead or behind: half the time within the skew margin, half the time 1 to 10 s (then half the time the node restarts on the moved clock) |
//! | `clock-strobe` | one node's clock jumping back and forth every 200 ms |
//! | `loss` | 20 % of the packets between nodes dropped |
//! | `restart` | a node stopped and started again (SIGTERM) |

use crate::cluster::{Cluster, SKEW_MARGIN_MS};
use crate::net;
use rand::rngs::StdRng;
use rand::Rng;
use serde::Serialize;

pub const ALL: [&str; 13] = [
    "partition-node",
    "partition-region",
    "partition-majority",
    "partition-ring",
    "partition-bridge",
    "partition-oneway",
    "kill",
    "kill-leader",
    "pause",
    "clock",
    "clock-strobe",
    "loss",
    "restart",
];

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
    Killed(usize),
    Paused(usize),
    /// The node and the offset its wall clock was given, in milliseconds.
    Clock(usize, i64),
    Strobe(usize, tokio::task::JoinHandle<()>),
    Restart(usize),
}

/// The order in which a run fires its nemeses: every named one in turn (the order
/// shuffled by the seed), so that a run of `windows` faults fires each at least once
/// when `windows >= names.len()`.
pub fn schedule(names: &[String], windows: usize, rng: &mut StdRng) -> Vec<String> {
    let mut order: Vec<String> = names.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    (0..windows)
        .filter_map(|i| order.get(i % order.len().max(1)).cloned())
        .collect()
}

/// Look for the fault's effect: packets dropped by its rules, a node that no longer
/// answers, a process that exited, a node whose clock reads the offset it was given.
pub fn observe(a: &Active, c: &mut Cluster) -> Option<String> {
    use crate::cluster::http_get;
    match a {
        Active::Network => {
            let dropped = net::dropped_packets().ok()?;
            (dropped > 0).then(|| format!("{dropped} packets dropped"))
        }
        Active::Killed(x) => (c.nodes[*x].child.is_none()
            && http_get(&c.nodes[*x].http(), "/healthz").is_none())
        .then(|| format!("node {} not answering", c.nodes[*x].id)),
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
    }
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

/// Inject `name`; returns what to undo and a description.
pub fn inject(name: &str, c: &mut Cluster, rng: &mut StdRng) -> anyhow::Result<(Active, String)> {
    let nodes = c.nodes.len();
    let regions = c.regions;
    let all: Vec<usize> = (0..nodes).collect();
    match name {
        "partition-node" => {
            let x = rng.random_range(0..nodes);
            let rest: Vec<usize> = all.iter().copied().filter(|i| *i != x).collect();
            cut_sets(c, &[x], &rest, true)?;
            Ok((Active::Network, format!("node {} isolated", c.nodes[x].id)))
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
            Ok((Active::Network, format!("region {r} isolated")))
        }
        "partition-majority" => {
            let r = rng.random_range(0..regions);
            let inside = c.region_nodes(r);
            let minority = inside.len() / 2;
            let (lo, hi) = inside.split_at(minority.max(1));
            cut_sets(c, lo, hi, true)?;
            Ok((
                Active::Network,
                format!("region {r}: {} node(s) cut from the rest", lo.len()),
            ))
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
            Ok((Active::Network, "majorities ring".into()))
        }
        "partition-bridge" => {
            let r = rng.random_range(0..regions);
            let a = c.region_nodes((r + 1) % regions);
            let b = c.region_nodes((r + 2) % regions);
            cut_sets(c, &a, &b, true)?;
            Ok((Active::Network, format!("bridge through region {r}")))
        }
        "partition-oneway" => {
            let r = rng.random_range(0..regions);
            let to = (r + 1) % regions;
            let (a, b) = (c.region_nodes(r), c.region_nodes(to));
            cut_sets(c, &a, &b, false)?;
            Ok((
                Active::Network,
                format!("region {r} -> region {to} dropped"),
            ))
        }
        "loss" => {
            net::lossy(0.2)?;
            Ok((Active::Network, "20% packet loss".into()))
        }
        "kill" => {
            let x = rng.random_range(0..nodes);
            c.kill(x);
            Ok((Active::Killed(x), format!("node {} killed", c.nodes[x].id)))
        }
        "kill-leader" => {
            let r = rng.random_range(0..regions);
            let x = c.leader_of(r).unwrap_or_else(|| c.region_nodes(r)[0]);
            c.kill(x);
            Ok((
                Active::Killed(x),
                format!("leader node {} of region {r} killed", c.nodes[x].id),
            ))
        }
        "pause" => {
            let x = rng.random_range(0..nodes);
            c.signal(x, "-STOP");
            Ok((Active::Paused(x), format!("node {} paused", c.nodes[x].id)))
        }
        "clock" => {
            // Half the time a group leader (the node whose clock stamps its group's
            // entries), half the time any node; half the time within the margin, half
            // the time 1 to 10 s; ahead or behind.
            let x = if rng.random_bool(0.5) {
                let r = rng.random_range(0..regions);
                c.leader_of(r).unwrap_or_else(|| c.region_nodes(r)[0])
            } else {
                rng.random_range(0..nodes)
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
            Ok((
                Active::Clock(x, (off * 1000.0).round() as i64),
                format!(
                    "node {} clock {off:+.3} s{}",
                    c.nodes[x].id,
                    if restart { ", restarted on it" } else { "" }
                ),
            ))
        }
        "clock-strobe" => {
            let x = rng.random_range(0..nodes);
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
            Ok((
                Active::Strobe(x, h),
                format!("node {} clock strobing ±{bound:.2} s", c.nodes[x].id),
            ))
        }
        "restart" => {
            let x = rng.random_range(0..nodes);
            c.signal(x, "-TERM");
            Ok((
                Active::Restart(x),
                format!("node {} restarting", c.nodes[x].id),
            ))
        }
        other => anyhow::bail!("unknown nemesis {other:?}; known: {}", ALL.join(", ")),
    }
}

pub fn heal(a: Active, c: &mut Cluster) -> anyhow::Result<()> {
    match a {
        Active::Network => net::heal()?,
        Active::Killed(x) => c.start(x)?,
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
    }
    Ok(())
}

/// Pick one of the enabled nemeses.
pub fn pick<'a>(enabled: &'a [String], rng: &mut StdRng) -> &'a str {
    &enabled[rng.random_range(0..enabled.len())]
}

pub fn check_names(names: &[String]) -> anyhow::Result<()> {
    for n in names {
        if !ALL.contains(&n.as_str()) && n != "none" {
            anyhow::bail!("unknown nemesis {n:?}; known: {}, none", ALL.join(", "));
        }
    }
    Ok(())
}
