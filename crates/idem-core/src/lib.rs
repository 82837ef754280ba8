//! Idem's domain: keys, records, claims and fences, the acceptor rules that decide every
//! call, the versioned record codec, the hybrid logical clock and the named limits.
//!
//! This crate is pure: no I/O, no tokio, no clocks of its own. Every input that varies
//! between replicas (time above all) is a parameter, so the Raft state machine, the tests
//! and any simulator drive exactly the code that production runs.

pub mod acceptor;
pub mod bin_serde;
pub mod codec;
pub mod command;
pub mod engine;
pub mod fingerprint;
pub mod hlc;
pub mod holder;
pub mod limits;
pub mod merge;
pub mod proposer;
pub mod record;
pub mod shard;
pub mod types;

/// Whether this build of the rules carries a deliberately broken one (the simulator's
/// `broken-*` features, which prove the campaign catches each): no server may be built
/// with it (`idem-server` refuses to compile).
pub const BROKEN_RULES: bool = cfg!(any(
    feature = "broken-unguarded-merge",
    feature = "broken-smaller-lease",
    feature = "broken-accept-withdrawn"
));

pub use acceptor::{
    complete, extend, release, reserve, CompleteError, Decision, ExtendError, ReleaseError,
    ReserveArgs, ReserveOutcome,
};
pub use codec::CodecError;
pub use command::{Command, CommandResult, Op};
pub use fingerprint::Fingerprint;
pub use hlc::{Hlc, HlcError};
pub use limits::{Limits, ValidationError};
pub use record::{Phase, Record};
pub use types::{ClaimId, Fence, Header, Key, StoredResponse};
