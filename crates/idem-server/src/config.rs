//! Node configuration: one struct with a default for every field, read from TOML, with
//! environment overrides (`IDEM__SECTION__KEY=value`, e.g. `IDEM__NODE__ID=2`), and a
//! `validate()` whose errors name the offending key.

use idem_core::Limits;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    /// Every region of the cluster and its nodes. Empty: a one-node cluster of this node.
    pub regions: Vec<RegionConfig>,
    pub raft: RaftConfig,
    /// Cross-region behaviour (only used with more than one region).
    pub geo: GeoSection,
    /// Namespaces that use another mode than GLOBAL. The first match wins.
    pub namespaces: Vec<NamespaceConfig>,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique in the cluster, 1..=65535.
    pub id: u64,
    /// The name of this node's region (one of `regions`).
    pub region: String,
    pub data_dir: PathBuf,
    /// gRPC listen address: the public API, the admin API and node-to-node traffic.
    pub grpc_addr: SocketAddr,
    /// HTTP listen address: /metrics, /healthz, /status.
    pub http_addr: SocketAddr,
    /// Source address of connections to other nodes (absent: the kernel chooses).
    pub outgoing_addr: Option<std::net::IpAddr>,
    /// A node whose data directory was lost may start on an empty one under its old id
    /// (`idem server --rejoin`): its peers forget the old incarnation, and it votes only
    /// once it holds what they held and only in later terms. Without it, such a node
    /// refuses to start. Ignored for a directory that has its data.
    pub rejoin: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            id: 1,
            region: "local".into(),
            data_dir: PathBuf::from("./idem-data"),
            grpc_addr: "127.0.0.1:7101".parse().expect("literal"),
            http_addr: "127.0.0.1:7201".parse().expect("literal"),
            outgoing_addr: None,
            rejoin: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Shards per region (the same in every region). Fixed for the cluster's life.
    pub shards: u32,
    /// Leases are held this much longer than granted before another claim may take
    /// the key, and holders stop trusting them this much before their end.
    pub skew_margin_ms: u64,
    /// The bound on clock differences between nodes (default: half the skew margin;
    /// must be below it). A peer timestamp further ahead is refused and its call not
    /// run; a forward jump of a node's own wall clock larger than this is not followed
    /// by the time it stamps.
    pub max_clock_ahead_ms: Option<u64>,
}

impl ClusterConfig {
    pub fn clock_bound_ms(&self) -> u64 {
        self.max_clock_ahead_ms.unwrap_or(self.skew_margin_ms / 2)
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            shards: 1,
            skew_margin_ms: 500,
            max_clock_ahead_ms: None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Region number, 0..=31 (a bit in witness sets).
    pub id: u16,
    pub name: String,
    pub nodes: Vec<PeerConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u64,
    /// The node's gRPC address as other nodes reach it.
    pub addr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_every_entries: u64,
    pub logs_kept_after_snapshot: u64,
    /// How long a request may wait for its group before UNAVAILABLE.
    pub request_timeout_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        let d = idem_raft::GroupConfig::default();
        RaftConfig {
            heartbeat_ms: d.heartbeat_ms,
            election_timeout_min_ms: d.election_timeout_min_ms,
            election_timeout_max_ms: d.election_timeout_max_ms,
            snapshot_every_entries: d.snapshot_every_entries,
            logs_kept_after_snapshot: d.logs_kept_after_snapshot,
            request_timeout_ms: d.request_timeout.as_millis() as u64,
        }
    }
}

impl RaftConfig {
    pub fn group_config(&self) -> idem_raft::GroupConfig {
        idem_raft::GroupConfig {
            heartbeat_ms: self.heartbeat_ms,
            election_timeout_min_ms: self.election_timeout_min_ms,
            election_timeout_max_ms: self.election_timeout_max_ms,
            snapshot_every_entries: self.snapshot_every_entries,
            logs_kept_after_snapshot: self.logs_kept_after_snapshot,
            request_timeout: std::time::Duration::from_millis(self.request_timeout_ms),
            ..Default::default()
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeoSection {
    /// How long one cross-region round (a proposal, a completion) waits for answers.
    pub round_timeout_ms: u64,
    /// StaleGen retries of one proposal.
    pub max_retries: u32,
    /// A GLOBAL Reserve is answered within this, contention retries included (keep it
    /// below the clients' deadline: the SDKs' default is 10 s).
    pub reserve_deadline_ms: u64,
    /// Calls in flight to one other region before new ones are refused.
    pub max_in_flight_per_region: usize,
    /// Emulated round trip to the other regions, added in-process. For `idem demo`
    /// on one machine only; real deployments leave it at 0.
    pub emulated_rtt_ms: u64,
    /// Outbox entries per shipped batch.
    pub relay_batch: usize,
    /// Entries per second one group ships to one region (caps catch-up after an outage).
    pub relay_max_rate: f64,
    /// Entries queued per group and destination before changes are skipped (and
    /// anti-entropy repairs them).
    pub relay_max_outbox: u64,
    /// An entry the destination refuses as invalid this many times moves to the
    /// dead-letter queue.
    pub relay_dead_after_tries: u32,
    /// Time between two anti-entropy passes of one group.
    pub anti_entropy_interval_ms: u64,
    /// Digest buckets per shard.
    pub anti_entropy_buckets: u32,
}

impl Default for GeoSection {
    fn default() -> Self {
        let relay = idem_geo::relay::RelayConfig::default();
        let ae = idem_geo::anti_entropy::AntiEntropyConfig::default();
        GeoSection {
            round_timeout_ms: 1_500,
            max_retries: 2,
            reserve_deadline_ms: 6_000,
            max_in_flight_per_region: 4_096,
            emulated_rtt_ms: 0,
            relay_batch: relay.batch,
            relay_max_rate: relay.max_rate,
            relay_max_outbox: relay.max_outbox,
            relay_dead_after_tries: relay.dead_after_tries,
            anti_entropy_interval_ms: ae.interval.as_millis() as u64,
            anti_entropy_buckets: ae.buckets,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// The tenant; absent: every tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Scopes starting with this prefix ("" = every scope).
    #[serde(default)]
    pub scope_prefix: String,
    /// "global" or "regional".
    pub mode: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Off: every caller is tenant `default` (development and `idem demo`).
    pub enabled: bool,
    pub tokens: Vec<TokenConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub tenant: String,
    /// Hex SHA-256 of the bearer token (the token itself is never stored).
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter, e.g. "info" or "idem_server=debug,info".
    pub level: String,
    /// "text" or "json".
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(String),
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

impl Config {
    /// Read a TOML file (or nothing: all defaults), then apply environment overrides.
    pub fn load(
        path: Option<&std::path::Path>,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        Config::from_toml_with_env(&text, env)
    }

    pub fn from_toml_with_env(
        text: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        for (var, value) in env {
            let Some(path) = var.strip_prefix("IDEM__") else {
                continue;
            };
            let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
            if parts.iter().any(|p| p.is_empty()) {
                return Err(ConfigError::Env {
                    var,
                    reason: "empty path segment".into(),
                });
            }
            // A value that parses as TOML (number, bool, array) is taken as such;
            // anything else is a string.
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value));
            let mut cur = &mut table;
            for p in &parts[..parts.len() - 1] {
                let entry = cur
                    .entry(p.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                cur = match entry {
                    toml::Value::Table(t) => t,
                    _ => {
                        return Err(ConfigError::Env {
                            var,
                            reason: format!("`{p}` is not a section"),
                        })
                    }
                };
            }
            cur.insert(parts[parts.len() - 1].clone(), parsed);
        }
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        Ok(cfg)
    }

    /// The regions, with the single-node default filled in when none are configured.
    pub fn effective_regions(&self) -> Vec<RegionConfig> {
        if !self.regions.is_empty() {
            return self.regions.clone();
        }
        vec![RegionConfig {
            id: 0,
            name: self.node.region.clone(),
            nodes: vec![PeerConfig {
                id: self.node.id,
                addr: self.node.grpc_addr.to_string(),
            }],
        }]
    }

    pub fn my_region(&self) -> Option<RegionConfig> {
        self.effective_regions()
            .into_iter()
            .find(|r| r.name == self.node.region)
    }

    /// The limits requests are checked against: the shortest lease granted is at least
    /// twice the skew margin (the holder trusts a lease for its length minus the margin
    /// from the send, and the SDK refuses a NEW with less than the margin left, so a
    /// shorter lease could never be acted on safely).
    pub fn effective_limits(&self) -> idem_core::Limits {
        let mut l = self.limits.clone();
        l.min_lease_ms = l.min_lease_ms.max(2 * self.cluster.skew_margin_ms);
        l.max_lease_ms = l.max_lease_ms.max(l.min_lease_ms);
        l
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.id == 0 || self.node.id > u64::from(u16::MAX) {
            return Err(invalid("node.id", "must be between 1 and 65535"));
        }
        if self.cluster.shards == 0 || self.cluster.shards > 4096 {
            return Err(invalid("cluster.shards", "must be between 1 and 4096"));
        }
        if self.cluster.skew_margin_ms > 60_000 {
            return Err(invalid("cluster.skew_margin_ms", "must be at most 60000"));
        }
        // Leases are safe while no acceptor's clock is ahead of a proposer's by the
        // margin or more (docs/protocol.md, "Clocks"): the bound must be below it.
        if self.cluster.clock_bound_ms() >= self.cluster.skew_margin_ms {
            return Err(invalid(
                "cluster.max_clock_ahead_ms",
                format!(
                    "{} ms must be below cluster.skew_margin_ms ({} ms): a clock this far ahead could end a lease its holder still trusts",
                    self.cluster.clock_bound_ms(),
                    self.cluster.skew_margin_ms
                ),
            ));
        }
        let regions = self.effective_regions();
        let mut ids = std::collections::BTreeSet::new();
        let mut names = std::collections::BTreeSet::new();
        let mut nodes = std::collections::BTreeSet::new();
        for (i, r) in regions.iter().enumerate() {
            if r.id > 31 {
                return Err(invalid(
                    &format!("regions[{i}].id"),
                    "must be between 0 and 31",
                ));
            }
            if !ids.insert(r.id) {
                return Err(invalid(
                    &format!("regions[{i}].id"),
                    format!("{} is used twice", r.id),
                ));
            }
            if !names.insert(r.name.clone()) {
                return Err(invalid(
                    &format!("regions[{i}].name"),
                    format!("{:?} is used twice", r.name),
                ));
            }
            if r.nodes.is_empty() {
                return Err(invalid(
                    &format!("regions[{i}].nodes"),
                    "must list at least one node",
                ));
            }
            for (j, n) in r.nodes.iter().enumerate() {
                if !nodes.insert(n.id) {
                    return Err(invalid(
                        &format!("regions[{i}].nodes[{j}].id"),
                        format!("node {} is listed twice", n.id),
                    ));
                }
                if n.addr.parse::<SocketAddr>().is_err() && !n.addr.contains(':') {
                    return Err(invalid(
                        &format!("regions[{i}].nodes[{j}].addr"),
                        "must be HOST:PORT",
                    ));
                }
            }
        }
        let Some(mine) = self.my_region() else {
            return Err(invalid(
                "node.region",
                format!(
                    "{:?} is not one of the configured regions",
                    self.node.region
                ),
            ));
        };
        if !mine.nodes.iter().any(|n| n.id == self.node.id) {
            return Err(invalid(
                "node.id",
                format!(
                    "node {} is not listed in region {:?}",
                    self.node.id, mine.name
                ),
            ));
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms {
            return Err(invalid(
                "raft.election_timeout_min_ms",
                "must be greater than raft.heartbeat_ms (and heartbeat_ms > 0)",
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                "must be greater than raft.election_timeout_min_ms",
            ));
        }
        if r.request_timeout_ms == 0 {
            return Err(invalid("raft.request_timeout_ms", "must be greater than 0"));
        }
        if r.snapshot_every_entries == 0 {
            return Err(invalid(
                "raft.snapshot_every_entries",
                "must be greater than 0",
            ));
        }
        self.limits
            .check()
            .map_err(|e| invalid(e.field, e.reason))?;
        if self.limits.default_lease_ms < 2 * self.cluster.skew_margin_ms {
            return Err(invalid(
                "limits.default_lease_ms",
                format!(
                    "{} ms is below twice cluster.skew_margin_ms ({} ms): such a lease ends before its holder could act on it",
                    self.limits.default_lease_ms, self.cluster.skew_margin_ms
                ),
            ));
        }
        // A response travels whole in one message on every path: a client's Complete and
        // REPLAY (the public API's message limit), and alone in a batch between nodes.
        let largest = self.limits.max_response_bytes
            + self.limits.max_key_bytes
            + self.limits.max_scope_bytes
            + MESSAGE_OVERHEAD_BYTES;
        if largest > MAX_GRPC_MESSAGE_BYTES || largest > idem_raft::MAX_BATCH_BYTES {
            return Err(invalid(
                "limits.max_response_bytes",
                format!(
                    "{} bytes with the largest key and scope do not fit in one gRPC message of {} bytes (the API's limit) or one batch of {} bytes between nodes",
                    self.limits.max_response_bytes,
                    MAX_GRPC_MESSAGE_BYTES,
                    idem_raft::MAX_BATCH_BYTES
                ),
            ));
        }
        if self.auth.enabled && self.auth.tokens.is_empty() {
            return Err(invalid(
                "auth.tokens",
                "auth is enabled but no token is configured",
            ));
        }
        for (i, t) in self.auth.tokens.iter().enumerate() {
            if t.tenant.is_empty() || t.tenant.len() > 128 {
                return Err(invalid(
                    &format!("auth.tokens[{i}].tenant"),
                    "must be 1 to 128 bytes",
                ));
            }
            if hex::decode(&t.sha256).map(|b| b.len()) != Ok(32) {
                return Err(invalid(
                    &format!("auth.tokens[{i}].sha256"),
                    "must be 64 hex digits (SHA-256 of the token)",
                ));
            }
        }
        let g = &self.geo;
        if g.round_timeout_ms == 0 {
            return Err(invalid("geo.round_timeout_ms", "must be greater than 0"));
        }
        if g.reserve_deadline_ms < g.round_timeout_ms {
            return Err(invalid(
                "geo.reserve_deadline_ms",
                "must be at least geo.round_timeout_ms (one proposal round)",
            ));
        }
        if g.max_in_flight_per_region == 0 {
            return Err(invalid(
                "geo.max_in_flight_per_region",
                "must be greater than 0",
            ));
        }
        if g.relay_batch == 0 || g.relay_batch > 4096 {
            return Err(invalid("geo.relay_batch", "must be between 1 and 4096"));
        }
        if g.relay_max_rate.is_nan() || g.relay_max_rate < 1.0 {
            return Err(invalid("geo.relay_max_rate", "must be at least 1"));
        }
        if g.relay_dead_after_tries == 0 {
            return Err(invalid(
                "geo.relay_dead_after_tries",
                "must be greater than 0",
            ));
        }
        if g.anti_entropy_interval_ms < 100 {
            return Err(invalid(
                "geo.anti_entropy_interval_ms",
                "must be at least 100",
            ));
        }
        if g.anti_entropy_buckets == 0 || g.anti_entropy_buckets > 4096 {
            return Err(invalid(
                "geo.anti_entropy_buckets",
                "must be between 1 and 4096",
            ));
        }
        for (i, n) in self.namespaces.iter().enumerate() {
            if !matches!(n.mode.as_str(), "global" | "regional") {
                return Err(invalid(
                    &format!("namespaces[{i}].mode"),
                    "must be \"global\" or \"regional\"",
                ));
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid("log.format", "must be \"text\" or \"json\""));
        }
        Ok(())
    }
}

/// Largest message of the public API, in either direction.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 8 << 20;
/// What a message adds to its byte strings (field tags, metadata, fence, fingerprint).
const MESSAGE_OVERHEAD_BYTES: usize = 64 << 10;

impl Config {
    /// The cross-region settings for `idem-geo`.
    pub fn geo_config(&self, my_region: u16) -> idem_geo::GeoConfig {
        let g = &self.geo;
        idem_geo::GeoConfig {
            my_region,
            regions: self
                .effective_regions()
                .into_iter()
                .map(|r| idem_geo::RegionInfo {
                    id: r.id,
                    name: r.name,
                    addrs: r.nodes.into_iter().map(|n| n.addr).collect(),
                })
                .collect(),
            shards: self.cluster.shards,
            namespaces: self
                .namespaces
                .iter()
                .map(|n| idem_geo::NamespaceRule {
                    tenant: n.tenant.clone(),
                    scope_prefix: n.scope_prefix.clone(),
                    mode: if n.mode == "regional" {
                        idem_geo::Mode::Regional
                    } else {
                        idem_geo::Mode::Global
                    },
                })
                .collect(),
            round_timeout: std::time::Duration::from_millis(g.round_timeout_ms),
            max_retries: g.max_retries,
            reserve_deadline: std::time::Duration::from_millis(g.reserve_deadline_ms),
            max_in_flight_per_region: g.max_in_flight_per_region,
            emulated_rtt: std::time::Duration::from_millis(g.emulated_rtt_ms),
            max_response_bytes: self.limits.max_response_bytes,
            relay: idem_geo::relay::RelayConfig {
                batch: g.relay_batch,
                max_rate: g.relay_max_rate,
                max_outbox: g.relay_max_outbox,
                dead_after_tries: g.relay_dead_after_tries,
                ..Default::default()
            },
            anti_entropy: idem_geo::anti_entropy::AntiEntropyConfig {
                interval: std::time::Duration::from_millis(g.anti_entropy_interval_ms),
                buckets: g.anti_entropy_buckets,
                ..Default::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_is_valid_and_names_three_regions() {
        let text = include_str!("../../../deploy/node.example.toml");
        let cfg = Config::from_toml_with_env(text, std::iter::empty()).unwrap();
        cfg.validate().unwrap();
        let geo = cfg.geo_config(0);
        assert_eq!(geo.regions.len(), 3);
        assert_eq!(geo.round_timeout, std::time::Duration::from_millis(1_500));
    }

    #[test]
    fn namespace_modes_are_checked() {
        let cfg = Config::from_toml_with_env(
            "[[namespaces]]\nscope_prefix = \"x\"\nmode = \"fast\"\n",
            std::iter::empty(),
        )
        .unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("namespaces[0].mode"), "{e}");
    }

    #[test]
    fn the_shortest_lease_is_twice_the_skew_margin() {
        let c = Config::from_toml_with_env(
            "[cluster]\nskew_margin_ms = 400\n[limits]\nmin_lease_ms = 100\n",
            std::iter::empty(),
        )
        .unwrap();
        let l = c.effective_limits();
        assert_eq!(l.min_lease_ms, 800);
        let e = l.lease("lease_ms", 500).unwrap_err();
        assert_eq!(e.field, "lease_ms");
        assert!(e.reason.contains("[800,"), "{}", e.reason);
        assert_eq!(l.lease("lease_ms", 800).unwrap(), 800);
        let e = Config::from_toml_with_env(
            "[cluster]\nskew_margin_ms = 400\n[limits]\nmin_lease_ms = 100\ndefault_lease_ms = 700\n",
            std::iter::empty(),
        )
        .and_then(|c| c.validate())
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("limits.default_lease_ms") && e.contains("cluster.skew_margin_ms"),
            "{e}"
        );
    }

    #[test]
    fn a_clock_bound_not_below_the_skew_margin_is_refused_naming_both_keys() {
        let ok =
            Config::from_toml_with_env("[cluster]\nskew_margin_ms = 500\n", std::iter::empty())
                .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.cluster.clock_bound_ms(), 250);
        let cfg = Config::from_toml_with_env(
            "[cluster]\nskew_margin_ms = 500\nmax_clock_ahead_ms = 5000\n",
            std::iter::empty(),
        )
        .unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("cluster.max_clock_ahead_ms"), "{e}");
        assert!(e.contains("cluster.skew_margin_ms"), "{e}");
    }

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn env_overrides_file() {
        let c = Config::from_toml_with_env(
            "[node]\nid = 3\n",
            env(&[
                ("IDEM__NODE__ID", "1"),
                ("IDEM__CLUSTER__SKEW_MARGIN_MS", "250"),
                ("IDEM__NODE__DATA_DIR", "/tmp/x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.node.id, 1);
        assert_eq!(c.cluster.skew_margin_ms, 250);
        assert_eq!(c.node.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn errors_name_the_key() {
        let err = |toml: &str| {
            Config::from_toml_with_env(toml, env(&[]))
                .and_then(|c| c.validate().map(|_| c))
                .unwrap_err()
                .to_string()
        };
        assert!(err("[node]\nid = 0\n").contains("`node.id`"));
        assert!(err("[cluster]\nshards = 0\n").contains("`cluster.shards`"));
        assert!(err("[raft]\nheartbeat_ms = 500\n").contains("raft.election_timeout_min_ms"));
        assert!(err("[limits]\nmin_lease_ms = 0\n").contains("limits.min_lease_ms"));
        assert!(err("[node]\nbogus = 1\n").contains("bogus"));
        assert!(err("[geo]\nreserve_deadline_ms = 1000\n").contains("geo.reserve_deadline_ms"));
        assert!(err("[auth]\nenabled = true\n").contains("auth.tokens"));
        let regions = "[[regions]]\nid = 0\nname = \"eu\"\n[[regions.nodes]]\nid = 1\naddr = \"127.0.0.1:7101\"\n";
        assert!(err(&format!("[node]\nregion = \"mars\"\n{regions}")).contains("`node.region`"));
        assert!(err(&format!("[node]\nregion = \"eu\"\nid = 2\n{regions}")).contains("`node.id`"));
    }
}
