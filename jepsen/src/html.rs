//! `report.html`: one page a user can read after a run. The verdict and the command
//! that reproduces the run, the fault schedule with what each fault was seen to do,
//! outcomes by kind, every anomaly with its operations, an operation timeline per
//! client with the fault windows shaded and the anomalies' operations outlined, and
//! latency, availability and throughput over time.

use crate::history::{Call, Op, Outcome};
use crate::nemesis::Window;
use crate::report::Results;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// At most this many operations are drawn in the per-client timeline (every anomaly's
/// operations always are; the rest are sampled evenly), so that a run of a million
/// operations still gives a page a browser opens.
pub const MAX_DRAWN: usize = 20_000;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn outcome_name(o: &Outcome) -> String {
    format!("{o:?}")
}

fn color(o: &Outcome) -> &'static str {
    match o {
        Outcome::New => "#1f77b4",
        Outcome::Replay => "#2ca02c",
        Outcome::InFlight => "#ff7f0e",
        Outcome::Mismatch => "#9467bd",
        Outcome::Timeout | Outcome::Unavailable => "#d62728",
        _ => "#7f7f7f",
    }
}

fn call_name(c: &Call) -> &'static str {
    match c {
        Call::Reserve => "Reserve",
        Call::Complete => "Complete",
        Call::Release => "Release",
        Call::Extend => "Extend",
        Call::Get => "Get",
        Call::Digest => "Digest",
        Call::Read => "Read",
    }
}

/// The page.
pub fn page(r: &Results, history: &[Op], windows: &[Window], timeline_svg: &str) -> String {
    let t0 = history.iter().map(|o| o.start_ms).min().unwrap_or(0);
    let t1 = history
        .iter()
        .map(|o| {
            if o.end_ms == u64::MAX {
                o.start_ms
            } else {
                o.end_ms
            }
        })
        .chain(windows.iter().map(|w| w.end_ms))
        .max()
        .unwrap_or(t0 + 1)
        .max(t0 + 1);
    let rel = |t: u64| t.saturating_sub(t0) as f64 / 1000.0;
    let flagged: BTreeSet<u64> = r.violations.iter().flat_map(|v| v.ops.clone()).collect();
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>idem-jepsen {} ({})</title><style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}}.bad{{color:#b00;font-weight:bold}}.ok{{color:#070;font-weight:bold}}code{{background:#f4f4f4}}</style></head><body>",
        esc(&r.run),
        r.status
    );
    let class = match r.status.as_str() {
        "valid" => "ok",
        _ => "bad",
    };
    let _ = write!(
        s,
        "<h1>Run {} <span class=\"{class}\">{}</span></h1>",
        esc(&r.run),
        r.status.to_uppercase()
    );
    let command = if r.command.is_empty() {
        format!(
            "idem-jepsen run --bin BINARY --seed {} --time-limit {} --nemesis {}",
            r.seed,
            r.time_limit_s,
            r.nemeses.join(",")
        )
    } else {
        r.command.clone()
    };
    let _ = write!(
        s,
        "<p>Reproduce: <code>{}</code> (seed {}: the seed draws the same schedule). {} operations.</p>",
        esc(&command),
        r.seed,
        r.ops
    );
    let _ = write!(s, "<details><summary>Checks run</summary><ul>");
    for c in &r.checks {
        let _ = write!(s, "<li>{}</li>", esc(c));
    }
    let _ = write!(s, "</ul></details>");
    for u in &r.unknown {
        let _ = write!(s, "<p class=\"bad\">Unknown: {}</p>", esc(u));
    }
    // The schedule.
    let _ = write!(
        s,
        "<h2>Faults</h2><table><tr><th>nemesis</th><th>what</th><th>from (s)</th><th>to (s)</th><th>observed effect</th></tr>"
    );
    for w in windows {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td></tr>",
            esc(&w.nemesis),
            esc(&w.detail),
            rel(w.start_ms),
            rel(w.end_ms),
            w.observed
                .as_deref()
                .map_or("<span class=\"bad\">none seen</span>".to_string(), esc)
        );
    }
    let _ = write!(s, "</table>");
    // Outcomes by call.
    let mut by: BTreeMap<(&str, String), u64> = BTreeMap::new();
    for o in history {
        *by.entry((call_name(&o.call), outcome_name(&o.outcome)))
            .or_default() += 1;
    }
    let _ = write!(
        s,
        "<h2>Operations</h2><table><tr><th>call</th><th>outcome</th><th>count</th></tr>"
    );
    for ((c, o), n) in &by {
        let _ = write!(s, "<tr><td>{c}</td><td>{}</td><td>{n}</td></tr>", esc(o));
    }
    let _ = write!(s, "</table>");
    // Anomalies.
    let by_id: BTreeMap<u64, &Op> = history.iter().map(|o| (o.id, o)).collect();
    let _ = write!(s, "<h2>Anomalies</h2>");
    if r.violations.is_empty() && r.possible.is_empty() {
        let _ = write!(s, "<p class=\"ok\">None.</p>");
    }
    for (label, list) in [("violation", &r.violations), ("possible", &r.possible)] {
        for (i, v) in list.iter().enumerate() {
            let _ = write!(
                s,
                "<h3 id=\"{label}-{i}\" class=\"bad\">{label}: {} on key <code>{}</code></h3><p>{}</p><table><tr><th>op</th><th>client</th><th>region</th><th>call</th><th>from (s)</th><th>to (s)</th><th>outcome</th><th>fence</th></tr>",
                v.kind,
                esc(&v.key),
                esc(&v.detail)
            );
            for id in &v.ops {
                let Some(o) = by_id.get(id) else { continue };
                let to = if o.end_ms == u64::MAX {
                    "never".to_string()
                } else {
                    format!("{:.3}", rel(o.end_ms))
                };
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{to}</td><td>{}</td><td><code>{}</code></td></tr>",
                    o.id,
                    o.client,
                    o.region,
                    call_name(&o.call),
                    rel(o.start_ms),
                    esc(&outcome_name(&o.outcome)),
                    esc(&o.fence)
                );
            }
            let _ = write!(s, "</table>");
        }
    }
    // The timeline per client.
    let _ = write!(
        s,
        "<h2>Timeline per client</h2><p>One row per client, one bar per operation from its call to its answer (to the right edge: no answer), coloured by outcome; fault windows shaded; operations of an anomaly outlined in black.</p>"
    );
    s.push_str(&clients_svg(history, windows, &flagged, t0, t1));
    let _ = write!(
        s,
        "<h2>Latency and availability</h2><p>Every Reserve's latency (log scale) by outcome, and the share answered definitely per second above.</p>"
    );
    s.push_str(timeline_svg);
    let _ = write!(s, "<h2>Throughput</h2>");
    s.push_str(&throughput_svg(history, windows, t0, t1));
    let _ = write!(s, "</body></html>");
    s
}

/// An SVG of `w` by `h` with the fault windows shaded across its height (`x` maps a
/// harness time to its abscissa); the caller draws on it and closes it.
fn svg_with_windows(w: f64, h: f64, windows: &[Window], x: &dyn Fn(u64) -> f64) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="10">"#
    );
    for win in windows {
        let (a, b) = (x(win.start_ms), x(win.end_ms));
        let _ = write!(
            s,
            r##"<rect x="{a:.1}" y="0" width="{:.1}" height="{h}" fill="#f4c7c3" opacity="0.5"><title>{}: {}</title></rect>"##,
            (b - a).max(1.0),
            esc(&win.nemesis),
            esc(&win.detail)
        );
    }
    s
}

fn clients_svg(
    history: &[Op],
    windows: &[Window],
    flagged: &BTreeSet<u64>,
    t0: u64,
    t1: u64,
) -> String {
    let clients: BTreeSet<u32> = history.iter().map(|o| o.client).collect();
    let row: BTreeMap<u32, usize> = clients.iter().enumerate().map(|(i, c)| (*c, i)).collect();
    let (w, left, rh) = (1000.0, 70.0, 12.0);
    let h = 30.0 + rh * clients.len() as f64;
    let x = |t: u64| left + t.saturating_sub(t0) as f64 / (t1 - t0) as f64 * (w - left - 10.0);
    let every = history.len().div_ceil(MAX_DRAWN).max(1);
    let mut s = svg_with_windows(w, h, windows, &x);
    for (c, i) in &row {
        let _ = write!(
            s,
            r#"<text x="2" y="{:.1}">client {c}</text>"#,
            20.0 + rh * *i as f64 + 9.0
        );
    }
    for (n, o) in history.iter().enumerate() {
        let flag = flagged.contains(&o.id);
        if !flag && n % every != 0 {
            continue;
        }
        let end = if o.end_ms == u64::MAX { t1 } else { o.end_ms };
        let (a, b) = (x(o.start_ms), x(end));
        let y = 20.0 + rh * row[&o.client] as f64 + 1.0;
        let stroke = if flag {
            r#" stroke="black" stroke-width="1.5""#
        } else {
            ""
        };
        let _ = write!(
            s,
            r#"<rect x="{a:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"{stroke}><title>op {} {} {} region {}: {}</title></rect>"#,
            (b - a).max(1.0),
            rh - 2.0,
            color(&o.outcome),
            o.id,
            call_name(&o.call),
            esc(&o.key),
            o.region,
            esc(&outcome_name(&o.outcome))
        );
    }
    if every > 1 {
        let _ = write!(
            s,
            r#"<text x="{left}" y="12">one operation in {every} drawn, and every operation of an anomaly</text>"#
        );
    }
    let _ = write!(s, "</svg>");
    s
}

fn throughput_svg(history: &[Op], windows: &[Window], t0: u64, t1: u64) -> String {
    let secs = ((t1 - t0) / 1000 + 1) as usize;
    let mut per = vec![0u64; secs];
    for o in history.iter().filter(|o| o.end_ms != u64::MAX) {
        if let Some(p) = per.get_mut(((o.end_ms.saturating_sub(t0)) / 1000) as usize) {
            *p += 1;
        }
    }
    let peak = per.iter().copied().max().unwrap_or(1).max(1) as f64;
    let (w, h, left) = (1000.0, 160.0, 60.0);
    let x = |t: u64| left + t.saturating_sub(t0) as f64 / (t1 - t0) as f64 * (w - left - 10.0);
    let mut s = svg_with_windows(w, h, windows, &x);
    let mut path = String::new();
    for (i, n) in per.iter().enumerate() {
        let px = x(t0 + i as u64 * 1000 + 500);
        let py = h - 20.0 - (*n as f64 / peak) * (h - 40.0);
        let _ = write!(path, "{}{px:.1},{py:.1} ", if i == 0 { "M" } else { "L" });
    }
    let _ = write!(
        s,
        r##"<path d="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/><text x="2" y="24">{peak:.0}/s</text><text x="2" y="{:.1}">0</text><text x="{left}" y="{:.1}">operations answered per second</text></svg>"##,
        h - 20.0,
        h - 4.0
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::{Verdict, Violation};

    fn op(id: u64, client: u32, start_ms: u64, end_ms: u64, outcome: Outcome) -> Op {
        Op {
            id,
            client,
            region: client % 3,
            call: Call::Reserve,
            key: "pay<1>".into(),
            fingerprint: String::new(),
            start_ms,
            end_ms,
            outcome,
            fence: format!("{id}:c"),
            lease_expires_ms: 0,
            trusted_until_ms: 0,
            took_over: false,
            value: String::new(),
            phase: String::new(),
        }
    }

    #[test]
    fn the_page_shows_the_verdict_the_schedule_and_each_anomaly_with_its_operations() {
        let history = vec![
            op(1, 0, 1_000, 1_050, Outcome::New),
            op(2, 1, 1_200, 1_260, Outcome::New),
            op(3, 1, 2_000, u64::MAX, Outcome::Timeout),
        ];
        let windows = vec![Window {
            nemesis: "partition-region".into(),
            detail: "region 2 cut off".into(),
            start_ms: 1_100,
            end_ms: 3_000,
            observed: Some("region 2 unreachable".into()),
        }];
        let verdict = Verdict {
            status: "invalid",
            valid: false,
            ops: 3,
            violations: vec![Violation {
                kind: "double_grant",
                key: "pay<1>".into(),
                ops: vec![1, 2],
                detail: "two NEW <overlapping>".into(),
            }],
            ..Verdict::default()
        };
        let names = vec!["partition-region".to_string()];
        let r = crate::report::build("run-1", &names, 7, 60, &history, &windows, &verdict);
        let page = page(&r, &history, &windows, "<svg id=\"latency\"></svg>");
        assert!(page.contains("INVALID"));
        assert!(page.contains("--seed 7 --time-limit 60 --nemesis partition-region"));
        assert!(page.contains(
            "<td>region 2 cut off</td><td>0.1</td><td>2.0</td><td>region 2 unreachable</td>"
        ));
        assert!(page.contains("double_grant on key <code>pay&lt;1&gt;</code>"));
        assert!(
            page.contains("two NEW &lt;overlapping&gt;"),
            "details are escaped"
        );
        // Both operations of the anomaly are listed and outlined in the timeline.
        assert!(page.contains("<tr><td>1</td><td>0</td>"));
        assert!(page.contains("<tr><td>2</td><td>1</td>"));
        assert_eq!(page.matches(r#"stroke="black""#).count(), 2);
        assert!(page.contains("<svg id=\"latency\"></svg>"));
        assert!(page.contains("operations answered per second"));
        assert!(page.contains("<li>fence_reused: no fence reported as NEW to two calls</li>"));
    }

    #[test]
    fn a_large_run_draws_a_sample_and_every_anomaly_operation() {
        let history: Vec<Op> = (0..(3 * MAX_DRAWN as u64))
            .map(|i| op(i, (i % 8) as u32, i, i + 5, Outcome::Replay))
            .collect();
        let verdict = Verdict {
            status: "invalid",
            violations: vec![Violation {
                kind: "lost_completion",
                key: "k".into(),
                ops: vec![1, 2],
                detail: String::new(),
            }],
            ..Verdict::default()
        };
        let r = crate::report::build("big", &[], 1, 60, &history, &[], &verdict);
        let svg = clients_svg(&history, &[], &[1, 2].into_iter().collect(), 0, 70_000);
        let drawn = svg.matches("<rect").count();
        assert!(drawn <= MAX_DRAWN + 2, "{drawn} rects");
        assert!(svg.contains("one operation in 3 drawn"));
        assert_eq!(svg.matches(r#"stroke="black""#).count(), 2);
        assert!(page(&r, &history, &[], "").len() < 8_000_000);
    }
}
