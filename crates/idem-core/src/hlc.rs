//! Hybrid logical clock: 48 bits of wall-clock milliseconds, 16 bits of counter.
//!
//! Every node keeps one; the group leader stamps each log entry with it. A remote
//! timestamp advances the clock, unless it is further ahead of the local wall clock than
//! the configured bound, in which case it is refused rather than adopted (a node with a
//! clock running days ahead must not drag the cluster's notion of time with it).

use thiserror::Error;

const COUNTER_BITS: u32 = 16;
const COUNTER_MASK: u64 = (1 << COUNTER_BITS) - 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HlcError {
    #[error("remote timestamp is {ahead_ms} ms ahead of the local clock (bound {max_ms} ms)")]
    TooFarAhead { ahead_ms: u64, max_ms: u64 },
}

#[derive(Debug, Clone)]
pub struct Hlc {
    last: u64,
    max_ahead_ms: u64,
}

impl Hlc {
    pub fn new(max_ahead_ms: u64) -> Hlc {
        Hlc {
            last: 0,
            max_ahead_ms,
        }
    }

    pub fn physical_ms(ts: u64) -> u64 {
        ts >> COUNTER_BITS
    }

    pub fn compose(ms: u64, counter: u64) -> u64 {
        (ms << COUNTER_BITS) | (counter & COUNTER_MASK)
    }

    /// A new timestamp, strictly greater than every one issued or observed before.
    pub fn now(&mut self, wall_ms: u64) -> u64 {
        let wall = Hlc::compose(wall_ms, 0);
        self.last = if wall > self.last {
            wall
        } else {
            self.last + 1
        };
        self.last
    }

    /// Advance past a timestamp seen from another node.
    pub fn observe(&mut self, remote: u64, wall_ms: u64) -> Result<(), HlcError> {
        let remote_ms = Hlc::physical_ms(remote);
        if remote_ms > wall_ms + self.max_ahead_ms {
            return Err(HlcError::TooFarAhead {
                ahead_ms: remote_ms - wall_ms,
                max_ms: self.max_ahead_ms,
            });
        }
        self.last = self.last.max(remote);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_even_when_wall_clock_goes_back() {
        let mut c = Hlc::new(1000);
        let a = c.now(5_000);
        let b = c.now(4_000);
        let d = c.now(5_000);
        assert!(a < b && b < d);
        assert_eq!(Hlc::physical_ms(a), 5_000);
    }

    #[test]
    fn observe_advances_but_refuses_far_future() {
        let mut c = Hlc::new(1000);
        c.observe(Hlc::compose(5_500, 3), 5_000).unwrap();
        assert!(c.now(5_000) > Hlc::compose(5_500, 3));
        assert_eq!(
            c.observe(Hlc::compose(7_000, 0), 5_000),
            Err(HlcError::TooFarAhead {
                ahead_ms: 2_000,
                max_ms: 1000
            })
        );
    }
}
