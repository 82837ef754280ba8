//! `idem top`: the dashboard's numbers in a terminal, refreshing, for servers without a
//! browser. Reads the node's `/api/history` over plain HTTP.

use clap::Args;
use serde_json::Value;
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
pub struct TopArgs {
    /// The node's HTTP address (HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:7201", env = "IDEM_HTTP")]
    pub http: String,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 2)]
    pub every: u64,
    /// Print once and exit (no screen clearing).
    #[arg(long)]
    pub once: bool,
}

/// A plain HTTP/1.0 GET: the node's endpoints need nothing more.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let sock = addr
        .parse()
        .map_err(|e| anyhow::anyhow!("--http {addr}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!("{}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Per-second rates of each counter over the last `window` samples.
fn rates(samples: &[Value], field: &str, window: usize) -> Vec<(String, f64)> {
    let (Some(last), true) = (samples.last(), samples.len() > 1) else {
        return vec![];
    };
    let first = &samples[samples.len().saturating_sub(window + 1)];
    let dt = (num(&last["t_ms"]) - num(&first["t_ms"])) / 1000.0;
    let mut out = vec![];
    if let Some(m) = last[field].as_object() {
        for (k, v) in m {
            let before = num(&first[field][k]);
            out.push((
                k.clone(),
                if dt > 0.0 {
                    (num(v) - before) / dt
                } else {
                    0.0
                },
            ));
        }
    }
    out
}

pub fn render(h: &Value) -> String {
    let samples = h["samples"].as_array().cloned().unwrap_or_default();
    let mut o = format!(
        "Idem top: node {} region {} {}  ({} samples, last minute rates)\n\n",
        h["node_id"],
        h["region"].as_str().unwrap_or("?"),
        h["grpc_addr"].as_str().unwrap_or("?"),
        samples.len()
    );
    let line = |o: &mut String, title: &str, items: Vec<(String, f64)>, unit: &str| {
        o.push_str(&format!("{title:<28}"));
        if items.is_empty() {
            o.push('-');
        }
        for (k, v) in items {
            o.push_str(&format!("{k}={v:.2}{unit}  "));
        }
        o.push('\n');
    };
    line(
        &mut o,
        "Reserve outcomes",
        rates(&samples, "outcomes", 12),
        "/s",
    );
    let outcomes = rates(&samples, "outcomes", 60);
    let total: f64 = outcomes.iter().map(|x| x.1).sum();
    let mism = outcomes
        .iter()
        .find(|x| x.0 == "mismatch")
        .map_or(0.0, |x| x.1);
    line(
        &mut o,
        "Mismatch ratio (5m)",
        vec![(
            "ratio".into(),
            if total > 0.0 {
                100.0 * mism / total
            } else {
                0.0
            },
        )],
        "%",
    );
    line(
        &mut o,
        "Retry attempts",
        rates(&samples, "attempts", 12),
        "/s",
    );
    line(
        &mut o,
        "Request classes",
        rates(&samples, "classes", 12),
        "/s",
    );
    let gauges = |field: &str| -> Vec<(String, f64)> {
        samples
            .last()
            .and_then(|s| s[field].as_object().cloned())
            .map(|m| m.into_iter().map(|(k, v)| (k, num(&v))).collect())
            .unwrap_or_default()
    };
    line(&mut o, "Outbox lag", gauges("outbox_lag_seconds"), "s");
    line(&mut o, "Dead-letter depth", gauges("dead_letters"), "");
    o.push_str("\nGroups\n");
    for g in h["groups"].as_array().cloned().unwrap_or_default() {
        o.push_str(&format!(
            "  {:<8} {:<9} leader {:<5} term {:<4} log {:<8} applied {}\n",
            g["group"].as_str().unwrap_or("?"),
            g["state"].as_str().unwrap_or("?"),
            if g["leader"].is_null() {
                "NONE".to_string()
            } else {
                g["leader"].to_string()
            },
            g["term"],
            g["last_log_index"],
            g["applied_index"]
        ));
    }
    o.push_str("\nAlerts that would fire\n");
    let alerts = h["alerts"].as_array().cloned().unwrap_or_default();
    if alerts.is_empty() {
        o.push_str("  none\n");
    }
    for a in alerts {
        o.push_str(&format!(
            "  {} ({}): {}\n",
            a["alert"].as_str().unwrap_or("?"),
            a["severity"].as_str().unwrap_or("?"),
            a["summary"].as_str().unwrap_or("")
        ));
    }
    o
}

pub async fn run(a: TopArgs) -> anyhow::Result<ExitCode> {
    loop {
        let body = http_get(&a.http, "/api/history")?;
        let h: Value = serde_json::from_str(&body)?;
        if a.once {
            print!("{}", render(&h));
            return Ok(ExitCode::SUCCESS);
        }
        // Clear the screen and home the cursor, then redraw.
        print!("\x1b[2J\x1b[H{}", render(&h));
        std::io::stdout().flush()?;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(a.every.max(1))) => {}
            _ = crate::shutdown_signal() => return Ok(ExitCode::SUCCESS),
        }
    }
}
