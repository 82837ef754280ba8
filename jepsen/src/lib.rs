//! Idem's fault suite.
//!
//! The checker is deliberately independent of the server's code: it reads a history of
//! client operations (JSON lines) and judges them only by what a client saw, so a bug in
//! the server's decision logic cannot hide itself by being shared with the judge.

pub mod checker;
pub mod cluster;
pub mod faultfs;
pub mod history;
pub mod html;
pub mod nemesis;
pub mod net;
pub mod report;
pub mod run;
pub mod workload;
