//! The disk nemeses, on each node's fault filesystem: power loss of one node, of a
//! group's majority and of a whole region at once (every write not made durable by fsync
//! is lost); fsync failing with EIO; a full disk; a slow disk.

use super::{ids, majority_of, Active, Claims};
use crate::cluster::Cluster;
use crate::faultfs::{Discarded, Faults};
use rand::rngs::StdRng;
use rand::Rng;
use std::time::Duration;

pub enum DiskFault {
    /// The nodes that lost power and what their disks discarded.
    PowerLoss(Vec<usize>, Discarded),
    /// The node and its count of failed fsyncs before the fault.
    Eio(usize, u64),
    /// The node, its ENOSPC count before and its capacity.
    Full(usize, u64, u64),
    /// The node and its count of delayed operations before.
    Slow(usize, u64),
    /// The node whose data directory was lost, and its exit code once it exited (-1:
    /// killed by a signal).
    Lost(usize, std::cell::Cell<Option<i32>>),
}

fn stats(c: &Cluster, x: usize) -> crate::faultfs::Stats {
    c.nodes[x]
        .fs
        .as_ref()
        .map(|f| f.stats())
        .unwrap_or_default()
}

fn set_faults(c: &Cluster, x: usize, f: Faults) {
    if let Some(fs) = &c.nodes[x].fs {
        fs.set_faults(f);
    }
}

pub fn inject(
    name: &str,
    c: &mut Cluster,
    claims: &mut Claims,
    rng: &mut StdRng,
) -> anyhow::Result<Option<(Active, String)>> {
    let fault = match name {
        "power-loss-node" | "power-loss-group" | "power-loss-region" => {
            let xs = if name == "power-loss-node" {
                claims.node(c, rng).map(|x| vec![x])
            } else {
                claims.region(c, rng).map(|r| {
                    if name == "power-loss-region" {
                        c.region_nodes(r)
                    } else {
                        majority_of(c, r, rng)
                    }
                })
            };
            let Some(xs) = xs else {
                return Ok(None);
            };
            // All at once: first every process dies, then every disk drops what it did
            // not sync (as when the power of a rack goes).
            for x in &xs {
                c.kill(*x);
            }
            let mut lost = Discarded::default();
            for x in &xs {
                let d = c.power_loss(*x)?;
                lost.bytes += d.bytes;
                lost.entries += d.entries;
            }
            let what = format!("{} lost power", ids(c, &xs));
            (DiskFault::PowerLoss(xs, lost), what)
        }
        "disk-eio" => {
            let Some(x) = claims.node(c, rng) else {
                return Ok(None);
            };
            let before = stats(c, x).fsync_eio;
            set_faults(
                c,
                x,
                Faults {
                    fsync_eio: true,
                    delay: None,
                },
            );
            let what = format!("node {}: every fsync fails with EIO", c.nodes[x].id);
            (DiskFault::Eio(x, before), what)
        }
        "disk-full" => {
            let Some(x) = claims.node(c, rng) else {
                return Ok(None);
            };
            let s = stats(c, x);
            if let Some(fs) = &c.nodes[x].fs {
                fs.fill(64 << 10);
            }
            let what = format!("node {}: disk full", c.nodes[x].id);
            (DiskFault::Full(x, s.enospc, s.capacity), what)
        }
        "disk-slow" => {
            let Some(x) = claims.node(c, rng) else {
                return Ok(None);
            };
            let before = stats(c, x).delayed;
            let ms = rng.random_range(20..80);
            set_faults(
                c,
                x,
                Faults {
                    fsync_eio: false,
                    delay: Some(Duration::from_millis(ms)),
                },
            );
            let what = format!("node {}: disk {ms} ms slow", c.nodes[x].id);
            (DiskFault::Slow(x, before), what)
        }
        "lose-data" => {
            let Some(x) = claims.node(c, rng) else {
                return Ok(None);
            };
            c.lose_data(x)?;
            // Started again under its id on the empty directory: it must refuse.
            c.start(x)?;
            let what = format!("node {}: data directory lost, started again", c.nodes[x].id);
            (DiskFault::Lost(x, std::cell::Cell::new(None)), what)
        }
        other => anyhow::bail!("unknown disk nemesis {other:?}"),
    };
    Ok(Some((Active::Disk(fault.0), fault.1)))
}

impl DiskFault {
    pub fn observe(&self, c: &mut Cluster) -> Option<String> {
        match self {
            DiskFault::PowerLoss(xs, lost) => Some(format!(
                "{} down; {} unsynced bytes and {} directory changes discarded",
                ids(c, xs),
                lost.bytes,
                lost.entries
            )),
            DiskFault::Eio(x, before) => {
                let failed = stats(c, *x).fsync_eio - before;
                if failed == 0 {
                    return None;
                }
                let stopped = c.failure(*x).map_or_else(
                    || "the node has not said it stopped yet".to_string(),
                    |why| format!("the node stopped: {why}"),
                );
                Some(format!("{failed} fsyncs failed with EIO; {stopped}"))
            }
            DiskFault::Full(x, before, _) => {
                let refused = stats(c, *x).enospc - before;
                (refused > 0).then(|| format!("{refused} writes refused with ENOSPC"))
            }
            DiskFault::Slow(x, before) => {
                let slowed = stats(c, *x).delayed - before;
                (slowed > 0).then(|| format!("{slowed} operations delayed"))
            }
            DiskFault::Lost(x, exit) => {
                if exit.get().is_none() {
                    exit.set(c.exited(*x).map(|code| code.unwrap_or(-1)));
                }
                // Only the refusal (exit code 3) is the effect this fault looks for.
                (exit.get() == Some(3))
                    .then(|| format!("node {} refused to start (exit 3)", c.nodes[*x].id))
            }
        }
    }

    /// Whether a node kept serving although its disk failed under it (a violation).
    pub fn ignored(&self, c: &Cluster) -> Option<String> {
        match self {
            DiskFault::Eio(x, before) if stats(c, *x).fsync_eio > *before => {
                let serving = c.failure(*x).is_none()
                    && crate::cluster::http_get(&c.nodes[*x].http(), "/healthz")
                        .is_some_and(|(code, _)| code == 200);
                serving.then(|| {
                    format!(
                        "node {} still served after {} of its fsyncs failed with EIO",
                        c.nodes[*x].id,
                        stats(c, *x).fsync_eio - before
                    )
                })
            }
            _ => None,
        }
    }

    pub fn discarded(&self) -> Option<Discarded> {
        match self {
            DiskFault::PowerLoss(_, d) => Some(*d),
            _ => None,
        }
    }

    pub fn heal(self, c: &mut Cluster) -> anyhow::Result<()> {
        match self {
            DiskFault::PowerLoss(xs, _) => {
                for x in xs {
                    c.start(x)?;
                }
            }
            DiskFault::Eio(x, before) => {
                set_faults(c, x, Faults::default());
                // What a failed fsync did not write is lost when the machine restarts:
                // the node comes back from what its disk really holds.
                if stats(c, x).fsync_eio > before {
                    c.power_loss(x)?;
                    c.start(x)?;
                }
            }
            DiskFault::Full(x, _, capacity) => {
                if let Some(fs) = &c.nodes[x].fs {
                    fs.set_capacity(capacity);
                }
                if c.failure(x).is_some() {
                    c.kill(x);
                    c.start(x)?;
                }
            }
            DiskFault::Slow(x, _) => set_faults(c, x, Faults::default()),
            DiskFault::Lost(x, _) => {
                // Brought back as an operator would: rejoined on its empty directory.
                c.kill(x);
                c.start_with(x, &["--rejoin"])?;
            }
        }
        Ok(())
    }
}
