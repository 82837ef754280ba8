//! An Idem node: configuration, the gRPC services (public API, admin, Raft peers,
//! health, reflection), the HTTP endpoints (metrics, health, status) and the wiring
//! that starts a node's groups on its RocksDB engines.

// A workspace build that unifies a simulator feature into idem-core must not produce a
// server with a broken rule; only the fault suite's broken build asks for one by name.
const _: () = assert!(
    !idem_core::BROKEN_RULES || cfg!(feature = "broken-unguarded-merge"),
    "idem-core carries a deliberately broken rule (an idem-sim feature): never build a server with it"
);

pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod history;
pub mod http;
pub mod join;
pub mod metrics;
pub mod node;

pub use config::{Config, ConfigError};
pub use node::{Node, NodeError};
