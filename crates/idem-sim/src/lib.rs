//! A deterministic simulator of Idem's regions (see `sim` for what runs for real and
//! what is modelled) and its oracle (`oracle`, independent of idem-core). One seed
//! gives one run, bit for bit: `idem-sim --seed N` replays it.

pub mod oracle;
pub mod rng;
pub mod sim;

pub use sim::{run_seed, Report, SimConfig};
