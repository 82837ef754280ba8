//! The node's metrics, rendered in the Prometheus text format at `/metrics`.
//!
//! Metric names are part of Idem's API (DESIGN §6), so they are written exactly as named
//! here: a small registry of our own keeps full control of them (client libraries append
//! `_total` or rename). Every labelled family has a bound on its label sets.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Most label sets one family keeps; further ones are folded into `other`.
const MAX_LABEL_SETS: usize = 256;

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Mirror a count kept elsewhere (it only grows there).
    pub fn store(&self, n: u64) {
        self.0.fetch_max(n, Ordering::Relaxed);
    }
}

/// A gauge holding an f64.
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

pub struct Histogram {
    bounds: Vec<f64>,
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_bits: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram {
            bounds: bounds.to_vec(),
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + v).to_bits())
            });
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Cumulative count of observations `<= bound` for each bucket bound.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        self.bounds
            .iter()
            .zip(&self.buckets)
            .map(|(b, c)| {
                acc += c.load(Ordering::Relaxed);
                (*b, acc)
            })
            .collect()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.cumulative() {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = f64::from_bits(self.sum_bits.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// A family of metrics of one kind keyed by label values.
pub struct Family<M> {
    labels: &'static [&'static str],
    make: Box<dyn Fn() -> M + Send + Sync>,
    members: Mutex<BTreeMap<Vec<String>, Arc<M>>>,
}

impl<M> Family<M> {
    pub fn new(
        labels: &'static [&'static str],
        make: impl Fn() -> M + Send + Sync + 'static,
    ) -> Self {
        Family {
            labels,
            make: Box::new(make),
            members: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn with(&self, values: &[&str]) -> Arc<M> {
        debug_assert_eq!(values.len(), self.labels.len());
        let mut key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        if !m.contains_key(&key) && m.len() >= MAX_LABEL_SETS {
            key = values.iter().map(|_| "other".to_string()).collect();
        }
        m.entry(key)
            .or_insert_with(|| Arc::new((self.make)()))
            .clone()
    }

    /// Every member with its label values.
    pub fn members(&self) -> Vec<(Vec<String>, Arc<M>)> {
        let m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn each(&self, mut f: impl FnMut(String, &M)) {
        let m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        for (values, metric) in m.iter() {
            let labels = self
                .labels
                .iter()
                .zip(values)
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect::<Vec<_>>()
                .join(",");
            f(labels, metric);
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Buckets (seconds) for the time between two attempts on one key.
pub const RETRY_DELAY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
    3600.0,
];
/// Buckets (seconds) for request latency.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

pub struct Metrics {
    // The six metrics of DESIGN §6.
    pub idempotency_key_total: Family<Counter>,
    pub retry_attempt_total: Family<Counter>,
    pub client_retry_attempt_total: Family<Counter>,
    pub retry_delay_seconds: Histogram,
    pub outbox_lag_seconds: Family<Gauge>,
    pub dead_letter_queue_depth: Family<Gauge>,
    pub http_request_outcome: Family<Counter>,
    // Extras.
    pub request_duration_seconds: Family<Histogram>,
    pub lease_takeover_total: Counter,
    pub key_too_old_total: Counter,
    pub lease_lost_total: Counter,
    pub cross_region_conflict_total: Family<Counter>,
    pub anti_entropy_repaired_total: Family<Counter>,
    pub geo_withdraws_total: Family<Counter>,
    pub outbox_queued: Family<Gauge>,
    pub outbox_skipped: Family<Gauge>,
    // Sampled gauges, refreshed before each scrape.
    pub raft_is_leader: Family<Gauge>,
    pub raft_has_leader: Family<Gauge>,
    pub raft_term: Family<Gauge>,
    pub raft_last_log_index: Family<Gauge>,
    pub raft_applied_index: Family<Gauge>,
    pub raft_commit_index: Family<Gauge>,
    pub raft_leader_changes_total: Family<Counter>,
    /// Mirrors each group's replicated count (the state engine keeps it).
    pub regional_double_grants_total: Family<Counter>,
    pub keys_stored: Gauge,
    pub state_disk_bytes: Gauge,
    pub log_disk_bytes: Gauge,
    pub rocksdb_pending_compaction_bytes: Gauge,
    pub rocksdb_write_stalled: Gauge,
    pub peer_clock_offset_seconds: Family<Gauge>,
    pub clock_refused_total: Family<Counter>,
    pub clock_fault: Gauge,
    pub node_failed: Gauge,
    pub region_last_answer_age_seconds: Family<Gauge>,
}

impl Metrics {
    /// Every label set the node knows it may report, at zero from the start, so that
    /// `rate()` and `absent()` see a fresh node's series before its first event.
    /// `dest_regions`: the other regions' names.
    pub fn seed(&self, dest_regions: &[String]) {
        for o in ["new", "replay", "in_flight", "mismatch"] {
            self.idempotency_key_total.with(&[o]);
        }
        for a in ["1", "2", "3", "4+"] {
            self.retry_attempt_total.with(&[a]);
            self.client_retry_attempt_total.with(&[a]);
        }
        for c in ["2xx", "4xx", "5xx", "timeout"] {
            self.http_request_outcome.with(&[c]);
        }
        // GLOBAL only: REGIONAL double grants have their own, exact count.
        self.cross_region_conflict_total.with(&["global"]);
        for r in dest_regions {
            let l = [r.as_str()];
            self.outbox_lag_seconds.with(&l);
            self.dead_letter_queue_depth.with(&l);
            self.outbox_queued.with(&l);
            self.outbox_skipped.with(&l);
            self.anti_entropy_repaired_total.with(&l);
            self.region_last_answer_age_seconds.with(&l);
            for result in ["applied", "failed", "skipped"] {
                self.geo_withdraws_total.with(&[r.as_str(), result]);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let latency = || Histogram::new(LATENCY_BUCKETS);
        Metrics {
            idempotency_key_total: Family::new(&["outcome"], Counter::default),
            retry_attempt_total: Family::new(&["attempt"], Counter::default),
            client_retry_attempt_total: Family::new(&["attempt"], Counter::default),
            retry_delay_seconds: Histogram::new(RETRY_DELAY_BUCKETS),
            outbox_lag_seconds: Family::new(&["dest_region"], Gauge::default),
            dead_letter_queue_depth: Family::new(&["dest_region"], Gauge::default),
            http_request_outcome: Family::new(&["class"], Counter::default),
            request_duration_seconds: Family::new(&["method", "outcome"], latency),
            lease_takeover_total: Counter::default(),
            key_too_old_total: Counter::default(),
            lease_lost_total: Counter::default(),
            cross_region_conflict_total: Family::new(&["mode"], Counter::default),
            regional_double_grants_total: Family::new(&["group"], Counter::default),
            anti_entropy_repaired_total: Family::new(&["from_region"], Counter::default),
            geo_withdraws_total: Family::new(&["region", "result"], Counter::default),
            outbox_queued: Family::new(&["dest_region"], Gauge::default),
            outbox_skipped: Family::new(&["dest_region"], Gauge::default),
            raft_is_leader: Family::new(&["group"], Gauge::default),
            raft_has_leader: Family::new(&["group"], Gauge::default),
            raft_term: Family::new(&["group"], Gauge::default),
            raft_last_log_index: Family::new(&["group"], Gauge::default),
            raft_applied_index: Family::new(&["group"], Gauge::default),
            raft_commit_index: Family::new(&["group"], Gauge::default),
            raft_leader_changes_total: Family::new(&["group"], Counter::default),
            keys_stored: Gauge::default(),
            state_disk_bytes: Gauge::default(),
            log_disk_bytes: Gauge::default(),
            rocksdb_pending_compaction_bytes: Gauge::default(),
            rocksdb_write_stalled: Gauge::default(),
            peer_clock_offset_seconds: Family::new(&["peer"], Gauge::default),
            clock_refused_total: Family::new(&["peer"], Counter::default),
            clock_fault: Gauge::default(),
            node_failed: Gauge::default(),
            region_last_answer_age_seconds: Family::new(&["region"], Gauge::default),
        }
    }
}

/// The attempt label: 1, 2, 3 or 4+.
pub fn attempt_label(attempt: u32) -> &'static str {
    match attempt {
        0 | 1 => "1",
        2 => "2",
        3 => "3",
        _ => "4+",
    }
}

/// The status class of a gRPC code, as an HTTP gateway would report it.
pub fn status_class(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "2xx",
        DeadlineExceeded | Cancelled => "timeout",
        InvalidArgument | NotFound | AlreadyExists | PermissionDenied | FailedPrecondition
        | OutOfRange | Unauthenticated | Aborted => "4xx",
        ResourceExhausted => "4xx",
        Unknown | Internal | Unimplemented | Unavailable | DataLoss => "5xx",
    }
}

struct Writer<'a> {
    out: &'a mut String,
}

impl Writer<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }
    fn counter(&mut self, name: &str, help: &str, c: &Counter) {
        self.head(name, "counter", help);
        let _ = writeln!(self.out, "{name} {}", c.get());
    }
    fn gauge(&mut self, name: &str, help: &str, g: &Gauge) {
        self.head(name, "gauge", help);
        let _ = writeln!(self.out, "{name} {}", g.get());
    }
    fn counters(&mut self, name: &str, help: &str, f: &Family<Counter>) {
        self.head(name, "counter", help);
        f.each(|l, c| {
            let _ = writeln!(self.out, "{name}{{{l}}} {}", c.get());
        });
    }
    fn gauges(&mut self, name: &str, help: &str, f: &Family<Gauge>) {
        self.head(name, "gauge", help);
        f.each(|l, g| {
            let _ = writeln!(self.out, "{name}{{{l}}} {}", g.get());
        });
    }
    fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.head(name, "histogram", help);
        h.render(self.out, name, "");
    }
    fn histograms(&mut self, name: &str, help: &str, f: &Family<Histogram>) {
        self.head(name, "histogram", help);
        f.each(|l, h| h.render(self.out, name, &l));
    }
}

impl Metrics {
    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        let mut w = Writer { out: &mut out };
        w.counters(
            "idempotency_key_total",
            "Reserve outcomes: new, replay, in_flight, mismatch.",
            &self.idempotency_key_total,
        );
        w.counters(
            "retry_attempt_total",
            "Reserves by attempt number, counted by the server from the key's record.",
            &self.retry_attempt_total,
        );
        w.counters(
            "client_retry_attempt_total",
            "Reserves by the attempt number the client reported.",
            &self.client_retry_attempt_total,
        );
        w.histogram(
            "retry_delay_seconds",
            "Time since the previous attempt on the same key, measured by the server.",
            &self.retry_delay_seconds,
        );
        w.gauges(
            "outbox_lag_seconds",
            "Age of the oldest unshipped outbox entry per destination region.",
            &self.outbox_lag_seconds,
        );
        w.gauges(
            "dead_letter_queue_depth",
            "Entries in the dead-letter column family per destination region.",
            &self.dead_letter_queue_depth,
        );
        w.counters(
            "http_request_outcome",
            "API calls by status class (2xx, 4xx, 5xx, timeout).",
            &self.http_request_outcome,
        );
        w.histograms(
            "idem_request_duration_seconds",
            "API call latency by method and outcome.",
            &self.request_duration_seconds,
        );
        w.counter(
            "idem_lease_takeover_total",
            "Keys granted again after the previous holder's lease expired.",
            &self.lease_takeover_total,
        );
        w.counter(
            "idem_key_too_old_total",
            "Reserves refused because the first attempt is older than retention allows.",
            &self.key_too_old_total,
        );
        w.counter(
            "idem_lease_lost_total",
            "Complete, Release or Extend calls refused with LEASE_LOST.",
            &self.lease_lost_total,
        );
        w.counters(
            "cross_region_conflict_total",
            "GLOBAL mode: two different completions of one generation met in a merge (a safety violation). REGIONAL double grants: idem_regional_double_grants_total.",
            &self.cross_region_conflict_total,
        );
        w.counters(
            "idem_anti_entropy_repaired_total",
            "Records merged by anti-entropy, by the region they came from.",
            &self.anti_entropy_repaired_total,
        );
        w.counters(
            "idem_geo_withdraws_total",
            "Withdraws of failed GLOBAL proposals, per region sent to: applied, failed after every resend, or skipped because too many were in flight.",
            &self.geo_withdraws_total,
        );
        w.gauges(
            "idem_outbox_queued",
            "Changes queued for each destination region on this node.",
            &self.outbox_queued,
        );
        w.gauges(
            "idem_outbox_skipped",
            "Changes not queued because the outbox was full (anti-entropy repairs them).",
            &self.outbox_skipped,
        );
        w.gauges(
            "idem_raft_is_leader",
            "1 if this node leads the group.",
            &self.raft_is_leader,
        );
        w.gauges(
            "idem_raft_has_leader",
            "1 if the group has a known leader.",
            &self.raft_has_leader,
        );
        w.gauges(
            "idem_raft_term",
            "Current Raft term of the group on this node.",
            &self.raft_term,
        );
        w.gauges(
            "idem_raft_last_log_index",
            "Last log index of the group on this node.",
            &self.raft_last_log_index,
        );
        w.gauges(
            "idem_raft_applied_index",
            "Last applied index of the group on this node.",
            &self.raft_applied_index,
        );
        w.gauges(
            "idem_raft_commit_index",
            "Last committed index of the group on this node.",
            &self.raft_commit_index,
        );
        w.counters(
            "idem_regional_double_grants_total",
            "REGIONAL double grants this group's region counted (replicated state: every replica of the group reports the same count; take the max per group, then sum).",
            &self.regional_double_grants_total,
        );
        w.counters(
            "idem_raft_leader_changes_total",
            "Leader changes seen by this node.",
            &self.raft_leader_changes_total,
        );
        w.gauge(
            "idem_keys_stored",
            "Estimated records stored on this node.",
            &self.keys_stored,
        );
        w.gauge(
            "idem_state_disk_bytes",
            "Bytes of the state engine on disk.",
            &self.state_disk_bytes,
        );
        w.gauge(
            "idem_log_disk_bytes",
            "Bytes of the log engine on disk.",
            &self.log_disk_bytes,
        );
        w.gauge(
            "idem_rocksdb_pending_compaction_bytes",
            "Estimated bytes compaction still has to rewrite.",
            &self.rocksdb_pending_compaction_bytes,
        );
        w.gauge(
            "idem_rocksdb_write_stalled",
            "1 while RocksDB delays or stops writes.",
            &self.rocksdb_write_stalled,
        );
        w.gauges(
            "idem_peer_clock_offset_seconds",
            "Each peer node's stamp clock minus this node's, measured on region-link exchanges.",
            &self.peer_clock_offset_seconds,
        );
        w.counters(
            "idem_clock_refused_total",
            "Timestamps from a peer node refused for being further ahead than the clock bound.",
            &self.clock_refused_total,
        );
        w.gauges(
            "idem_region_last_answer_age_seconds",
            "Seconds since a node of each other region last answered this node (any call or clock probe, sent at least once a second).",
            &self.region_last_answer_age_seconds,
        );
        w.gauge(
            "idem_clock_fault",
            "1 while this node refuses to grant, accept or acknowledge because its peers do not confirm its clock.",
            &self.clock_fault,
        );
        w.gauge(
            "idem_node_failed",
            "1 once this node's disk failed (a write or fsync error, or a full disk): it serves nothing and takes no part in Raft until restarted.",
            &self.node_failed,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_exact_names_and_cumulative_buckets() {
        let m = Metrics::default();
        m.idempotency_key_total.with(&["new"]).inc();
        m.http_request_outcome.with(&["2xx"]).add(2);
        m.retry_delay_seconds.observe(0.2);
        m.retry_delay_seconds.observe(7.0);
        let text = m.render();
        assert!(text.contains("idempotency_key_total{outcome=\"new\"} 1\n"));
        assert!(text.contains("http_request_outcome{class=\"2xx\"} 2\n"));
        assert!(text.contains("retry_delay_seconds_bucket{le=\"0.1\"} 0\n"));
        assert!(text.contains("retry_delay_seconds_bucket{le=\"0.25\"} 1\n"));
        assert!(text.contains("retry_delay_seconds_bucket{le=\"10\"} 2\n"));
        assert!(text.contains("retry_delay_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("retry_delay_seconds_count 2\n"));
    }

    #[test]
    fn codes_map_to_classes() {
        assert_eq!(status_class(tonic::Code::Ok), "2xx");
        assert_eq!(status_class(tonic::Code::InvalidArgument), "4xx");
        assert_eq!(status_class(tonic::Code::FailedPrecondition), "4xx");
        assert_eq!(status_class(tonic::Code::Unavailable), "5xx");
        assert_eq!(status_class(tonic::Code::Internal), "5xx");
        assert_eq!(status_class(tonic::Code::DeadlineExceeded), "timeout");
        assert_eq!(attempt_label(1), "1");
        assert_eq!(attempt_label(3), "3");
        assert_eq!(attempt_label(9), "4+");
    }

    #[test]
    fn a_fresh_node_exports_every_known_series_at_zero() {
        let m = Metrics::default();
        m.seed(&["eu-west".to_string()]);
        let text = m.render();
        for series in [
            "idempotency_key_total{outcome=\"new\"} 0",
            "idempotency_key_total{outcome=\"mismatch\"} 0",
            "retry_attempt_total{attempt=\"3\"} 0",
            "http_request_outcome{class=\"5xx\"} 0",
            "outbox_lag_seconds{dest_region=\"eu-west\"} 0",
            "dead_letter_queue_depth{dest_region=\"eu-west\"} 0",
            "cross_region_conflict_total{mode=\"global\"} 0",
        ] {
            assert!(
                text.contains(&format!("{series}\n")),
                "{series} missing:\n{text}"
            );
        }
    }

    #[test]
    fn label_sets_are_bounded() {
        let f: Family<Counter> = Family::new(&["k"], Counter::default);
        for i in 0..(MAX_LABEL_SETS + 10) {
            f.with(&[&i.to_string()]).inc();
        }
        assert_eq!(f.with(&["other"]).get(), 10);
    }
}
