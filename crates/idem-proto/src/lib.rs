//! Idem's wire types: the generated gRPC code for `proto/` and the validating conversions
//! between it and `idem-core`. Generated types stop at the server edge: handlers convert
//! an incoming message into a validated domain value (or `INVALID_ARGUMENT` naming the
//! field) before anything else looks at it.

pub mod convert;
pub mod errors;

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("idem.v1");
}

#[allow(clippy::all, clippy::pedantic)]
pub mod internal {
    tonic::include_proto!("idem.internal.v1");
}

/// The encoded descriptor set of every proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/idem_descriptor.bin"));

pub use errors::{ErrorReason, RETRY_PUSHBACK_HEADER};
