//! A deterministic simulator of Idem's regions (see `sim` for what runs for real and
//! what is modelled) and its oracle (`oracle`, independent of idem-core). One seed
//! gives one run, bit for bit: `idem-sim --seed N` replays it.

pub mod campaign;
pub mod oracle;
pub mod regional;
pub mod rng;
pub mod sim;

pub use sim::{run_seed, Report, SimConfig};

/// The broken rule this build runs (`--features broken-...`), if any: each is a rule
/// the campaign must be able to catch (`make sim-broken`).
pub fn broken_variant() -> Option<&'static str> {
    [
        (cfg!(feature = "broken-local-accept"), "broken-local-accept"),
        (cfg!(feature = "broken-early-ack"), "broken-early-ack"),
        (
            cfg!(feature = "broken-unguarded-merge"),
            "broken-unguarded-merge",
        ),
        (
            cfg!(feature = "broken-smaller-lease"),
            "broken-smaller-lease",
        ),
        (
            cfg!(feature = "broken-accept-withdrawn"),
            "broken-accept-withdrawn",
        ),
        (
            cfg!(feature = "broken-unbounded-clock"),
            "broken-unbounded-clock",
        ),
    ]
    .into_iter()
    .find(|(on, _)| *on)
    .map(|(_, name)| name)
}
