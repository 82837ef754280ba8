//! The results: `compare.json` (the rows), `compare.md` (a table with the run's
//! conditions) and `compare.svg` (a hand-written bar chart: throughput and p99 latency
//! per system, configuration, workload and concurrency, on log scales).

use crate::load::Row;
use std::fmt::Write as _;
use std::path::Path;

/// What the table's header says about the run.
pub struct Conditions {
    pub started_utc: String,
    pub machine: String,
    pub load_average: String,
    /// Median 4 KiB write + fdatasync on the peers' file system.
    pub fsync_ms: Option<f64>,
    pub quick: bool,
    pub warmup_secs: f64,
    pub duration_secs: f64,
    pub rtt_ms: u64,
    pub versions: Vec<(String, String)>,
}

pub fn write_all(dir: &Path, rows: &[Row], c: &Conditions) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("compare.json"),
        serde_json::to_string_pretty(rows)? + "\n",
    )?;
    std::fs::write(dir.join("compare.md"), markdown(rows, c))?;
    std::fs::write(dir.join("compare.svg"), svg(rows, c))?;
    Ok(())
}

pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| system | config | workload | concurrency | ops/s | p50 ms | p99 ms | p999 ms | errors |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
            r.system,
            r.config,
            r.workload.as_str(),
            r.concurrency,
            r.ops_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.errors
        );
    }
    s
}

pub fn markdown(rows: &[Row], c: &Conditions) -> String {
    let mut s = String::from("# Put-if-absent: Idem, etcd, Redis and PostgreSQL\n\n");
    let _ = writeln!(
        s,
        "Run `benches/compare/run{}` started {} on {} (load average at start: {}).",
        if c.quick { " --quick" } else { "" },
        c.started_utc,
        c.machine,
        c.load_average
    );
    let _ = writeln!(
        s,
        "Closed loop, {} s measured per row after a {} s warm-up; the latency of each \
         operation as the client sees it (hdrhistogram). The 3-region Idem rows add an \
         emulated round trip of {} ms between regions (delaying proxies).",
        c.duration_secs, c.warmup_secs, c.rtt_ms
    );
    if let Some(f) = c.fsync_ms {
        let _ = writeln!(
            s,
            "The disk: a 4 KiB write + fdatasync takes {f:.3} ms (median of 200) on the \
             peers' file system."
        );
    }
    if c.quick {
        s.push_str("\n**Quick run: a functional check with short windows, not a measurement.**\n");
    }
    s.push_str("\nVersions: ");
    s.push_str(
        &c.versions
            .iter()
            .map(|(k, v)| format!("{k} `{v}`"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    s.push_str(".\n\n");
    s.push_str(&table(rows));
    s.push_str(
        "\n`new`: put-if-absent of a fresh random key (Idem: Reserve answered NEW). \
         `replay`: put-if-absent of a key stored before the run (Idem: Reserve of a \
         completed key answered REPLAY with the stored response; etcd: the same \
         transaction, whose failure branch reads the stored value). \
         Configurations: `benches/README.md`.\n",
    );
    s
}

const PALETTE: [&str; 4] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759"];
const LABEL_W: f64 = 280.0;
const PANEL_W: f64 = 300.0;
const PANEL_GAP: f64 = 70.0;
const BAR_H: f64 = 13.0;
const BAR_GAP: f64 = 2.0;
const GROUP_GAP: f64 = 12.0;
const TOP: f64 = 86.0;
const BOTTOM: f64 = 40.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The powers of ten around `values` (positive ones only).
fn log_domain(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    for v in values.filter(|v| *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    let lo = 10f64.powf(lo.log10().floor());
    let mut hi = 10f64.powf(hi.log10().ceil());
    if hi <= lo {
        hi = lo * 10.0;
    }
    (lo, hi)
}

fn scale(v: f64, (lo, hi): (f64, f64)) -> f64 {
    if v <= 0.0 {
        return 0.0;
    }
    ((v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10())) * PANEL_W
}

/// An axis tick (a power of ten).
fn tick(t: f64) -> String {
    if t >= 1000.0 {
        format!("{}k", t / 1000.0)
    } else {
        // Powers of ten print exactly at this precision (0.01, 0.1, 1, 10, 100).
        let s = format!("{t:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn short(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn svg(rows: &[Row], c: &Conditions) -> String {
    // Groups in the order of the rows; bars inside a group by concurrency.
    let mut groups: Vec<((String, String), Vec<&Row>)> = Vec::new();
    for r in rows {
        let name = (
            format!("{} · {}", r.system, r.workload.as_str()),
            r.config.clone(),
        );
        match groups.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => v.push(r),
            None => groups.push((name, vec![r])),
        }
    }
    let mut levels: Vec<usize> = rows.iter().map(|r| r.concurrency).collect();
    levels.sort_unstable();
    levels.dedup();
    let color = |c: usize| {
        let i = levels.iter().position(|l| *l == c).unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    };
    let ops_dom = log_domain(rows.iter().map(|r| r.ops_per_sec));
    let p99_dom = log_domain(rows.iter().map(|r| r.p99_ms));
    let group_h = |n: usize| n as f64 * (BAR_H + BAR_GAP) + GROUP_GAP;
    let plot_h: f64 = groups.iter().map(|(_, v)| group_h(v.len())).sum();
    let width = LABEL_W + 2.0 * PANEL_W + PANEL_GAP + 60.0;
    let height = TOP + plot_h + BOTTOM;
    let x1 = LABEL_W;
    let x2 = LABEL_W + PANEL_W + PANEL_GAP;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14" font-weight="bold">Put-if-absent: throughput and p99 latency (log scales)</text>"#
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="38" fill="#555">{}{} · {} · load average {}</text>"##,
        if c.quick {
            "QUICK RUN, not a measurement · "
        } else {
            ""
        },
        esc(&c.started_utc),
        esc(&c.machine),
        esc(&c.load_average),
    );
    // Legend.
    let mut lx = 10.0;
    for l in &levels {
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="48" width="10" height="10" fill="{}"/><text x="{}" y="57">concurrency {l}</text>"#,
            color(*l),
            lx + 14.0
        );
        lx += 110.0;
    }
    // Panels: titles, grid and ticks.
    for (x0, title, dom) in [
        (x1, "ops/s (more is better)", ops_dom),
        (x2, "p99 ms (less is better)", p99_dom),
    ] {
        let _ = writeln!(
            s,
            r#"<text x="{x0}" y="{}" font-weight="bold">{title}</text>"#,
            TOP - 12.0
        );
        let mut t = dom.0;
        while t <= dom.1 * 1.0001 {
            let x = x0 + scale(t, dom);
            let label = tick(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#555">{label}</text>"##,
                TOP + plot_h,
                TOP + plot_h + 14.0
            );
            t *= 10.0;
        }
    }
    // Bars.
    let mut y = TOP;
    for ((title, config), bars) in &groups {
        let mid = y + (bars.len() as f64 * (BAR_H + BAR_GAP)) / 2.0;
        let _ = writeln!(
            s,
            r##"<text x="{x:.1}" y="{:.1}" text-anchor="end" font-weight="bold">{}</text><text x="{x:.1}" y="{:.1}" text-anchor="end" fill="#555" font-size="10">{}</text>"##,
            mid - 2.0,
            esc(title),
            mid + 10.0,
            esc(config),
            x = LABEL_W - 8.0,
        );
        let name = format!("{title} · {config}");
        let mut sorted = bars.clone();
        sorted.sort_by_key(|r| r.concurrency);
        for r in sorted {
            for (x0, v, dom, text) in [
                (x1, r.ops_per_sec, ops_dom, short(r.ops_per_sec)),
                (x2, r.p99_ms, p99_dom, short(r.p99_ms)),
            ] {
                let w = scale(v, dom).max(1.0);
                let _ = writeln!(
                    s,
                    r#"<rect x="{x0:.1}" y="{y:.1}" width="{w:.1}" height="{BAR_H}" fill="{}"><title>{} c={}: {text}</title></rect><text x="{:.1}" y="{:.1}" font-size="9">{text}</text>"#,
                    color(r.concurrency),
                    esc(&name),
                    r.concurrency,
                    x0 + w + 3.0,
                    y + BAR_H - 2.0
                );
            }
            y += BAR_H + BAR_GAP;
        }
        y += GROUP_GAP;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Workload;

    fn row(system: &str, workload: Workload, concurrency: usize, ops: f64, p99: f64) -> Row {
        Row {
            system: system.into(),
            config: "a <config> & more".into(),
            workload,
            concurrency,
            seconds: 5.0,
            ops: (ops * 5.0) as u64,
            errors: 0,
            ops_per_sec: ops,
            p50_ms: p99 / 2.0,
            p99_ms: p99,
            p999_ms: p99 * 2.0,
            max_ms: p99 * 3.0,
            outcomes: Default::default(),
        }
    }

    fn conditions() -> Conditions {
        Conditions {
            started_utc: "now".into(),
            machine: "2 cores".into(),
            load_average: "0.00".into(),
            fsync_ms: Some(0.2),
            quick: true,
            warmup_secs: 1.0,
            duration_secs: 5.0,
            rtt_ms: 70,
            versions: vec![("redis".into(), "7".into())],
        }
    }

    #[test]
    fn log_domain_spans_powers_of_ten() {
        assert_eq!(log_domain([13.0, 42_000.0].into_iter()), (10.0, 100_000.0));
        assert_eq!(log_domain([0.07, 187.0].into_iter()), (0.01, 1000.0));
        assert_eq!(log_domain([0.0].into_iter()), (1.0, 10.0));
        assert_eq!(tick(0.01), "0.01");
        assert_eq!(tick(100.0), "100");
        assert_eq!(tick(10_000.0), "10k");
    }

    #[test]
    fn outputs_have_every_row_and_escape_labels() {
        let rows = vec![
            row("etcd", Workload::New, 1, 1000.0, 3.0),
            row("etcd", Workload::New, 64, 4000.0, 40.0),
            row("idem", Workload::Replay, 1, 13.0, 0.07),
        ];
        let c = conditions();
        let svg = svg(&rows, &c);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // One bar per row in each panel.
        assert_eq!(svg.matches("<rect x=").count(), 2 * rows.len() + 2);
        assert!(svg.contains("a &lt;config&gt; &amp; more"));
        assert!(!svg.contains("<config>"));
        let md = markdown(&rows, &c);
        assert_eq!(md.matches("\n| etcd |").count(), 2);
        assert!(
            md.contains("| idem | a <config> & more | replay | 1 | 13 | 0.04 | 0.07 | 0.14 | 0 |")
        );
        assert!(md.contains("Quick run"));
    }
}
