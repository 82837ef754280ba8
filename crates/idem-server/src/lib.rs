//! An Idem node: configuration, the gRPC services (public API, admin, Raft peers,
//! health, reflection), the HTTP endpoints (metrics, health, status) and the wiring
//! that starts a node's groups on its RocksDB engines.

pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod history;
pub mod http;
pub mod metrics;
pub mod node;

pub use config::{Config, ConfigError};
pub use node::{Node, NodeError};
