//! This node's clock as its peers see it: the offset of each peer's stamp clock from
//! ours, measured on every region-link exchange (the peer's reading against the
//! midpoint of our send and receive, uncertain by half the round trip), the timestamps
//! refused per peer, and the verdict: a node whose offset to a majority of its recently
//! measured peers is beyond the clock bound, or that no majority has confirmed since it
//! started, must stop granting, accepting and acknowledging (CockroachDB's rule: a node
//! that cannot trust its clock stops serving rather than break leases).
//!
//! Pure: every reading comes with the `Instant` it was taken at.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A measurement older than this no longer counts.
pub const FRESH: Duration = Duration::from_secs(30);
/// Most peers tracked: node ids come from peers' messages, so a bound keeps a confused
/// or hostile peer from growing the maps (refusals beyond it count under peer 0).
pub const MAX_PEERS: usize = 1_024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerClock {
    /// The peer's stamp clock minus ours, in milliseconds.
    pub offset_ms: i64,
    /// The round trip the measurement took (its uncertainty is half of it).
    pub rtt_ms: u64,
    pub at: Instant,
}

#[derive(Debug)]
pub struct ClockHealth {
    bound_ms: u64,
    /// Whether this node has peers to measure (a cluster of one region has none).
    expect_peers: bool,
    /// Each peer's latest measurement, and its most precise one (the shortest round
    /// trip) still fresh: the latest shows a clock that moved, the most precise one
    /// confirms a clock (NTP's clock filter), so a slow exchange neither confirms nor
    /// condemns on its own.
    peers: BTreeMap<u64, PeerClock>,
    best: BTreeMap<u64, PeerClock>,
    refused: BTreeMap<u64, u64>,
    /// A majority of fresh peers agreed with this clock since it was last anchored.
    confirmed: bool,
}

impl ClockHealth {
    pub fn new(bound_ms: u64) -> ClockHealth {
        ClockHealth {
            bound_ms,
            expect_peers: false,
            peers: BTreeMap::new(),
            best: BTreeMap::new(),
            refused: BTreeMap::new(),
            confirmed: false,
        }
    }

    pub fn expect_peers(&mut self, yes: bool) {
        self.expect_peers = yes;
    }

    pub fn record(&mut self, peer: u64, clock: PeerClock) {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEERS {
            return;
        }
        self.peers.insert(peer, clock);
        // The most precise reading stands while it is fresh and the new one agrees with it
        // within both uncertainties; one that disagrees shows a clock that moved (a step
        // here or at the peer), so the old reading no longer describes the clocks.
        let keep = self.best.get(&peer).is_some_and(|b| {
            let agree = b.offset_ms.abs_diff(clock.offset_ms) <= (b.rtt_ms + clock.rtt_ms) / 2;
            clock.at.saturating_duration_since(b.at) < FRESH && b.rtt_ms < clock.rtt_ms && agree
        });
        if !keep {
            self.best.insert(peer, clock);
        }
        let (within, beyond, fresh) = self.tally(clock.at);
        if fresh > 0 && within * 2 > fresh {
            self.confirmed = true;
        }
        if beyond * 2 > fresh {
            self.confirmed = false;
        }
    }

    pub fn refused(&mut self, peer: u64) {
        let peer = if self.refused.contains_key(&peer) || self.refused.len() < MAX_PEERS {
            peer
        } else {
            0
        };
        *self.refused.entry(peer).or_default() += 1;
    }

    pub fn refusals(&self) -> &BTreeMap<u64, u64> {
        &self.refused
    }

    pub fn peers(&self) -> &BTreeMap<u64, PeerClock> {
        &self.peers
    }

    /// Forget the measurements (they were taken against a clock that has been
    /// re-anchored): the clock must be confirmed again.
    pub fn reset(&mut self) {
        self.peers.clear();
        self.best.clear();
        self.confirmed = false;
    }

    /// (peers that confirm this clock, peers surely beyond the bound, fresh peers). A
    /// peer confirms when its most precise fresh measurement puts the offset within the
    /// bound even at the far end of its uncertainty (half the round trip) and its latest
    /// one is not surely beyond; a peer is surely beyond when its latest measurement is,
    /// even at the near end.
    fn tally(&self, now: Instant) -> (usize, usize, usize) {
        let fresh = |p: &&PeerClock| now.saturating_duration_since(p.at) < FRESH;
        let half = |p: &PeerClock| (p.rtt_ms / 2) as i64;
        let bound = self.bound_ms as i64;
        let surely_beyond = |p: &PeerClock| p.offset_ms.abs() - half(p) > bound;
        let mut within = 0;
        let mut beyond = 0;
        let mut n = 0;
        for (peer, latest) in self.peers.iter().filter(|(_, p)| fresh(p)) {
            n += 1;
            if surely_beyond(latest) {
                beyond += 1;
            } else if self
                .best
                .get(peer)
                .filter(fresh)
                .is_some_and(|b| b.offset_ms.abs() + half(b) <= bound)
            {
                within += 1;
            }
        }
        (within, beyond, n)
    }

    /// Half the shortest fresh round trip: how precisely the peers' time is known.
    pub fn precision_ms(&self, now: Instant) -> u64 {
        self.best
            .values()
            .filter(|p| now.saturating_duration_since(p.at) < FRESH)
            .map(|p| p.rtt_ms / 2)
            .min()
            .unwrap_or(0)
    }

    /// The median offset of the fresh peers, if a majority of them is beyond the bound.
    pub fn majority_beyond(&self, now: Instant) -> Option<i64> {
        let (_, beyond, fresh) = self.tally(now);
        if fresh == 0 || beyond * 2 <= fresh {
            return None;
        }
        self.median_offset(now)
    }

    fn median_offset(&self, now: Instant) -> Option<i64> {
        let mut offs: Vec<i64> = self
            .peers
            .values()
            .filter(|p| now.saturating_duration_since(p.at) < FRESH)
            .map(|p| p.offset_ms)
            .collect();
        offs.sort_unstable();
        offs.get(offs.len() / 2).copied()
    }

    /// The fresh peers whose clocks read within the bound of the fresh peers' median:
    /// those on the majority's side (where a node whose own clock is off should hand
    /// its leadership).
    pub fn with_the_majority(&self, now: Instant) -> Vec<u64> {
        let Some(median) = self.median_offset(now) else {
            return Vec::new();
        };
        self.peers
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.at) < FRESH)
            .filter(|(_, p)| (p.offset_ms - median).unsigned_abs() <= self.bound_ms)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Why this node must not serve writes now (`None`: it may).
    pub fn fault(&self, now: Instant) -> Option<String> {
        if !self.expect_peers {
            return None;
        }
        if let Some(median) = self.majority_beyond(now) {
            let (_, beyond, fresh) = self.tally(now);
            return Some(format!(
                "this node's clock is {}{} ms off {beyond} of its {fresh} peers (bound {} ms)",
                if median > 0 { "-" } else { "+" },
                median.abs(),
                self.bound_ms
            ));
        }
        if !self.confirmed {
            return Some(format!(
                "this node's clock is not yet confirmed within {} ms by a majority of its peers",
                self.bound_ms
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, offset_ms: i64) -> PeerClock {
        PeerClock {
            offset_ms,
            rtt_ms: 70,
            at: t0,
        }
    }

    #[test]
    fn a_node_stops_when_a_majority_of_peers_see_its_clock_beyond_the_bound_and_resumes_when_back()
    {
        let t0 = Instant::now();
        let mut h = ClockHealth::new(250);
        h.expect_peers(true);
        assert!(h.fault(t0).unwrap().contains("not yet confirmed"));
        h.record(4, at(t0, 20));
        h.record(5, at(t0, -30));
        h.record(7, at(t0, 10));
        assert_eq!(h.fault(t0), None);
        // Peers now read 2 s ahead of us: our clock is 2 s slow.
        h.record(4, at(t0, 2_000));
        assert_eq!(h.fault(t0), None, "one of three is not a majority");
        h.record(5, at(t0, 2_010));
        let why = h.fault(t0).unwrap();
        assert!(why.contains("-2000 ms off 2 of its 3 peers"), "{why}");
        assert_eq!(h.majority_beyond(t0), Some(2_000));
        // Beyond the bound by less than the measurement's uncertainty: neither beyond
        // nor confirming.
        h.record(4, at(t0, 270));
        h.record(5, at(t0, 270));
        assert!(h.fault(t0).is_some(), "not confirmed by uncertain readings");
        h.record(4, at(t0, 5));
        h.record(5, at(t0, 5));
        assert_eq!(h.fault(t0), None);
        // A slow exchange does not undo a precise measurement, nor confirm by itself.
        let mut h = ClockHealth::new(250);
        h.expect_peers(true);
        let slow = PeerClock {
            rtt_ms: 5_000,
            ..at(t0, 900)
        };
        h.record(4, slow);
        h.record(5, slow);
        assert!(h.fault(t0).is_some(), "a 5 s round trip confirms nothing");
        h.record(4, at(t0, 10));
        h.record(5, at(t0, 10));
        h.record(4, slow);
        h.record(5, slow);
        assert_eq!(h.fault(t0), None, "the precise sample still stands");
        // Old measurements stop counting.
        let later = t0 + FRESH + Duration::from_secs(1);
        assert_eq!(h.majority_beyond(later), None);
    }

    /// A clock that came back is confirmed by the next readings even when they are
    /// slower than the precise ones taken while it was off: a reading that disagrees
    /// with the precise one beyond both uncertainties shows a clock that moved.
    #[test]
    fn a_clock_that_came_back_is_confirmed_by_slower_readings() {
        let t0 = Instant::now();
        let mut h = ClockHealth::new(100);
        h.expect_peers(true);
        let precise = |offset_ms| PeerClock {
            offset_ms,
            rtt_ms: 4,
            at: t0,
        };
        for p in [4, 5, 7] {
            h.record(p, precise(-2_000));
        }
        assert!(h.fault(t0).unwrap().contains("+2000 ms off"));
        let t1 = t0 + Duration::from_secs(2);
        let loaded = PeerClock {
            offset_ms: 3,
            rtt_ms: 120,
            at: t1,
        };
        for p in [4, 5, 7] {
            h.record(p, loaded);
        }
        assert_eq!(h.fault(t1), None, "back within the bound: serves again");
    }

    /// A node 2 s fast hands its leadership only to a peer on the majority's side: not
    /// to another node just as fast (which agrees with it, not with the majority).
    #[test]
    fn the_peers_with_the_majority_exclude_those_as_far_off_as_this_node() {
        let t0 = Instant::now();
        let mut h = ClockHealth::new(250);
        h.expect_peers(true);
        // Peers 1, 4, 5, 7, 8 read 2 s behind us; peer 3 is as fast as we are.
        for (peer, off) in [
            (1, -2_000),
            (3, 10),
            (4, -1_990),
            (5, -2_020),
            (7, -2_000),
            (8, -2_005),
        ] {
            h.record(peer, at(t0, off));
        }
        assert!(h.majority_beyond(t0).is_some());
        assert_eq!(h.with_the_majority(t0), vec![1, 4, 5, 7, 8]);
        // No fresh measurement: nobody to hand over to.
        assert!(h
            .with_the_majority(t0 + FRESH + Duration::from_secs(1))
            .is_empty());
    }

    #[test]
    fn the_peers_tracked_are_bounded() {
        let t0 = Instant::now();
        let mut h = ClockHealth::new(250);
        for p in 1..=(MAX_PEERS as u64 + 10) {
            h.record(p, at(t0, 0));
            h.refused(p);
        }
        assert_eq!(h.peers().len(), MAX_PEERS);
        assert!(h.refusals().len() <= MAX_PEERS + 1);
        assert_eq!(h.refusals().get(&0), Some(&10));
    }

    #[test]
    fn a_single_region_node_has_no_peers_to_wait_for() {
        let h = ClockHealth::new(250);
        assert_eq!(h.fault(Instant::now()), None);
    }
}
