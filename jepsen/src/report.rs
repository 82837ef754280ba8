//! A run's report: `results.json`, a summary table, and `timeline.svg` (latency of
//! every Reserve over time, coloured by outcome, with the nemesis windows shaded and
//! the availability per second drawn above).

use crate::checker::Verdict;
use crate::history::{Call, Op, Outcome};
use crate::nemesis::Window;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Serialize)]
pub struct WindowStats {
    pub nemesis: String,
    pub detail: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub reserves: u64,
    /// Share of Reserves that got a definite answer (NEW, IN_FLIGHT, REPLAY, MISMATCH).
    pub availability: f64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    /// What showed the fault took effect.
    pub observed: Option<String>,
}

#[derive(Serialize)]
pub struct Results {
    /// "valid", "invalid" or "unknown" (nothing violated, but the run did too little,
    /// or a fault never took effect, or the final read could not reach every region).
    pub status: String,
    pub valid: bool,
    pub unknown: Vec<String>,
    pub possible: Vec<crate::checker::Violation>,
    pub unreachable: Vec<String>,
    pub run: String,
    /// The command line that ran it (the seed draws the same schedule again).
    pub command: String,
    /// The checks the history went through (`checker::CHECKS`).
    pub checks: Vec<String>,
    pub nemeses: Vec<String>,
    pub seed: u64,
    pub time_limit_s: u64,
    pub ops: usize,
    /// Calls the clients made during the workload (Reserve, Complete, Release, Extend,
    /// Get), and per second of it.
    pub client_ops: u64,
    pub ops_per_s: f64,
    /// Share of the clients' calls that are Reserves and Completes.
    pub reserve_complete_share: f64,
    /// Double grants seen in REGIONAL namespaces (that mode's documented anomaly).
    pub regional_double_grants: u64,
    /// Power losses fired, and the unsynced bytes and directory changes they discarded.
    pub power_losses: u64,
    pub discarded_bytes: u64,
    pub discarded_entries: u64,
    pub outcomes: BTreeMap<String, u64>,
    pub violations_by_kind: BTreeMap<String, usize>,
    pub violations: Vec<crate::checker::Violation>,
    pub windows: Vec<WindowStats>,
    pub quiet: WindowStats,
    /// Milliseconds from the moment every node was ready again after healing until
    /// every node's record digest agreed (`None`: not within the bound).
    pub converged_after_ms: Option<u64>,
}

fn definite(o: &Outcome) -> bool {
    matches!(
        o,
        Outcome::New | Outcome::InFlight | Outcome::Replay | Outcome::Mismatch
    )
}

fn stats(name: &str, detail: &str, s: u64, e: u64, ops: &[&Op]) -> WindowStats {
    let mut lat: Vec<u64> = ops
        .iter()
        .map(|o| o.end_ms.saturating_sub(o.start_ms))
        .collect();
    lat.sort_unstable();
    let q = |p: f64| -> u64 {
        if lat.is_empty() {
            0
        } else {
            lat[((lat.len() - 1) as f64 * p).round() as usize]
        }
    };
    let ok = ops.iter().filter(|o| definite(&o.outcome)).count();
    WindowStats {
        nemesis: name.into(),
        detail: detail.into(),
        start_ms: s,
        end_ms: e,
        reserves: ops.len() as u64,
        availability: if ops.is_empty() {
            1.0
        } else {
            ok as f64 / ops.len() as f64
        },
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        observed: None,
    }
}

pub fn build(
    run: &str,
    nemeses: &[String],
    seed: u64,
    time_limit_s: u64,
    history: &[Op],
    windows: &[Window],
    verdict: &Verdict,
) -> Results {
    let reserves: Vec<&Op> = history
        .iter()
        .filter(|o| o.call == Call::Reserve && o.end_ms != u64::MAX)
        .collect();
    let inside = |o: &Op, w: &Window| o.start_ms >= w.start_ms && o.start_ms < w.end_ms;
    let ws = windows
        .iter()
        .map(|w| {
            let ops: Vec<&Op> = reserves.iter().copied().filter(|o| inside(o, w)).collect();
            WindowStats {
                observed: w.observed.clone(),
                ..stats(&w.nemesis, &w.detail, w.start_ms, w.end_ms, &ops)
            }
        })
        .collect();
    let quiet_ops: Vec<&Op> = reserves
        .iter()
        .copied()
        .filter(|o| !windows.iter().any(|w| inside(o, w)))
        .collect();
    let (s, e) = (
        reserves.iter().map(|o| o.start_ms).min().unwrap_or(0),
        reserves.iter().map(|o| o.end_ms).max().unwrap_or(0),
    );
    let client = |o: &&Op| {
        matches!(
            o.call,
            Call::Reserve | Call::Complete | Call::Release | Call::Extend | Call::Get
        )
    };
    let client_ops = history.iter().filter(client).count() as u64;
    let pairs = history
        .iter()
        .filter(client)
        .filter(|o| matches!(o.call, Call::Reserve | Call::Complete))
        .count() as u64;
    Results {
        status: verdict.status.to_string(),
        valid: verdict.valid,
        unknown: verdict.unknown.clone(),
        possible: verdict.possible.clone(),
        unreachable: verdict.unreachable.clone(),
        run: run.into(),
        command: String::new(),
        checks: crate::checker::CHECKS
            .iter()
            .map(|(kind, what)| format!("{kind}: {what}"))
            .collect(),
        nemeses: nemeses.to_vec(),
        seed,
        time_limit_s,
        ops: history.len(),
        client_ops,
        ops_per_s: client_ops as f64 / time_limit_s.max(1) as f64,
        reserve_complete_share: pairs as f64 / client_ops.max(1) as f64,
        regional_double_grants: verdict.regional_double_grants,
        power_losses: 0,
        discarded_bytes: 0,
        discarded_entries: 0,
        outcomes: verdict.outcomes.clone(),
        violations_by_kind: verdict
            .by_kind()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        violations: verdict.violations.clone(),
        windows: ws,
        quiet: stats("none", "no fault", s, e, &quiet_ops),
        converged_after_ms: None,
    }
}

pub fn summary(r: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {}  seed {}  nemeses {}",
        r.run,
        r.seed,
        r.nemeses.join(",")
    );
    let _ = writeln!(
        out,
        "\n| window | fault | reserves | available | p50 ms | p99 ms | effect |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---|");
    let row = |w: &WindowStats| {
        format!(
            "| {} | {} | {} | {:.1}% | {} | {} | {} |",
            w.nemesis,
            w.detail,
            w.reserves,
            w.availability * 100.0,
            w.p50_ms,
            w.p99_ms,
            if w.nemesis == "none" {
                "-"
            } else {
                w.observed.as_deref().unwrap_or("NOT OBSERVED")
            }
        )
    };
    let _ = writeln!(out, "{}", row(&r.quiet));
    for w in &r.windows {
        let _ = writeln!(out, "{}", row(w));
    }
    match r.converged_after_ms {
        Some(ms) => {
            let _ = writeln!(out, "\nregions converged {ms} ms after healing");
        }
        None => {
            let _ = writeln!(
                out,
                "\nregions did NOT converge within the bound after healing"
            );
        }
    }
    let _ = writeln!(
        out,
        "\n{} client calls in {} s: {:.0} per second, {:.0}% of them Reserves and Completes",
        r.client_ops,
        r.time_limit_s,
        r.ops_per_s,
        r.reserve_complete_share * 100.0
    );
    if r.power_losses > 0 {
        let _ = writeln!(
            out,
            "{} power losses discarded {} unsynced bytes and {} directory changes",
            r.power_losses, r.discarded_bytes, r.discarded_entries
        );
    }
    if r.regional_double_grants > 0 {
        let _ = writeln!(
            out,
            "{} double grants in the REGIONAL namespace (that mode's documented anomaly)",
            r.regional_double_grants
        );
    }
    let _ = writeln!(out, "\noutcomes:");
    for (k, v) in &r.outcomes {
        let _ = writeln!(out, "  {k:<24} {v}");
    }
    if !r.possible.is_empty() {
        let _ = writeln!(
            out,
            "\n{} possible double grant(s) (the margin was eaten; no two holders at once):",
            r.possible.len()
        );
        for v in r.possible.iter().take(3) {
            let _ = writeln!(out, "  e.g. key {:?} ops {:?}: {}", v.key, v.ops, v.detail);
        }
    }
    if r.valid {
        let _ = writeln!(out, "\nVALID: no violation in {} operations", r.ops);
    } else if r.status == "unknown" {
        let _ = writeln!(out, "\nUNKNOWN: no violation in {} operations, but:", r.ops);
        for u in &r.unknown {
            let _ = writeln!(out, "  {u}");
        }
    } else {
        let _ = writeln!(out, "\nINVALID:");
        for (k, v) in &r.violations_by_kind {
            let _ = writeln!(out, "  {k:<16} {v}");
        }
        for v in r.violations.iter().take(5) {
            let _ = writeln!(
                out,
                "  e.g. {} key {:?} ops {:?}: {}",
                v.kind, v.key, v.ops, v.detail
            );
        }
    }
    out
}

/// The timeline plot.
pub fn svg(history: &[Op], windows: &[Window]) -> String {
    let reserves: Vec<&Op> = history
        .iter()
        .filter(|o| o.call == Call::Reserve && o.end_ms != u64::MAX)
        .collect();
    let t0 = reserves.iter().map(|o| o.start_ms).min().unwrap_or(0);
    let t1 = reserves
        .iter()
        .map(|o| o.end_ms)
        .max()
        .unwrap_or(t0 + 1)
        .max(t0 + 1);
    let lmax = reserves
        .iter()
        .map(|o| o.end_ms.saturating_sub(o.start_ms))
        .max()
        .unwrap_or(1)
        .max(10) as f64;
    let (w, h, left, top, ph, ah) = (1000.0, 520.0, 60.0, 20.0, 340.0, 100.0);
    let x = |t: u64| left + (t.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * (w - left - 20.0);
    // Latency on a log scale, 1 ms .. lmax.
    let y = |l: u64| {
        let f = ((l.max(1) as f64).ln() / lmax.ln()).clamp(0.0, 1.0);
        top + ah + 20.0 + ph - f * ph
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    for win in windows {
        let (a, b) = (x(win.start_ms), x(win.end_ms));
        let _ = write!(
            s,
            r##"<rect x="{a:.1}" y="{top}" width="{:.1}" height="{:.1}" fill="#f4c7c3" opacity="0.6"><title>{}: {}</title></rect>"##,
            (b - a).max(1.0),
            ah + 20.0 + ph,
            win.nemesis,
            win.detail
        );
        let _ = write!(
            s,
            r##"<text x="{a:.1}" y="{:.1}" fill="#a33">{}</text>"##,
            top + 10.0,
            win.nemesis
        );
    }
    // Availability per second.
    let secs = ((t1 - t0) / 1000 + 1) as usize;
    let mut per = vec![(0u32, 0u32); secs];
    for o in &reserves {
        let i = ((o.start_ms - t0) / 1000) as usize;
        if let Some(p) = per.get_mut(i) {
            p.1 += 1;
            if definite(&o.outcome) {
                p.0 += 1;
            }
        }
    }
    let mut path = String::new();
    for (i, (ok, n)) in per.iter().enumerate() {
        if *n == 0 {
            continue;
        }
        let a = f64::from(*ok) / f64::from(*n);
        let px = x(t0 + i as u64 * 1000 + 500);
        let py = top + 15.0 + (1.0 - a) * (ah - 10.0);
        let _ = write!(
            path,
            "{}{px:.1},{py:.1} ",
            if path.is_empty() { "M" } else { "L" }
        );
    }
    let _ = write!(
        s,
        r##"<path d="{path}" fill="none" stroke="#2a6" stroke-width="1.5"/>"##
    );
    let _ = write!(s, r#"<text x="4" y="{:.1}">avail.</text>"#, top + 20.0);
    let color = |o: &Outcome| match o {
        Outcome::New => "#1f77b4",
        Outcome::Replay => "#2ca02c",
        Outcome::InFlight => "#ff7f0e",
        Outcome::Mismatch => "#9467bd",
        Outcome::Timeout => "#d62728",
        _ => "#7f7f7f",
    };
    for o in &reserves {
        let _ = write!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{}"/>"#,
            x(o.start_ms),
            y(o.end_ms.saturating_sub(o.start_ms)),
            color(&o.outcome)
        );
    }
    for ms in [1u64, 10, 100, 1000, 10000] {
        if (ms as f64) <= lmax {
            let _ = write!(s, r#"<text x="4" y="{:.1}">{ms} ms</text>"#, y(ms) + 4.0);
            let _ = write!(
                s,
                r##"<line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
                w - 20.0,
                y(ms),
                y(ms)
            );
        }
    }
    let legend = [
        ("NEW", "#1f77b4"),
        ("REPLAY", "#2ca02c"),
        ("IN_FLIGHT", "#ff7f0e"),
        ("MISMATCH", "#9467bd"),
        ("timeout/unavailable", "#d62728"),
    ];
    for (i, (n, c)) in legend.iter().enumerate() {
        let lx = left + i as f64 * 150.0;
        let _ = write!(
            s,
            r#"<circle cx="{lx:.1}" cy="{:.1}" r="4" fill="{c}"/><text x="{:.1}" y="{:.1}">{n}</text>"#,
            h - 12.0,
            lx + 8.0,
            h - 8.0
        );
    }
    let _ = write!(s, "</svg>");
    s
}
