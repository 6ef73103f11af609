//! Formatting only: JSON lines for received messages, the peers table, summaries.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result};
use peerbus::{Message, MessageKind, PeerInfo};
use serde_json::{Map, Value, json};

/// A received message as one JSON object (`node --print`, `sub`).
///
/// Fields: `id`, `kind`, `from`, `service` (sends, requests) or `topic` (publishes), `key`
/// (or null), `payload` (UTF-8, invalid sequences replaced), `attempt`, `redelivered`.
pub(crate) fn message_json(msg: &Message) -> Value {
    let mut obj = Map::new();
    obj.insert("id".into(), json!(msg.id().to_string()));
    obj.insert("kind".into(), json!(msg.kind().as_str()));
    obj.insert("from".into(), json!(msg.from().to_string()));
    let dest_field = if msg.kind() == MessageKind::Publish {
        "topic"
    } else {
        "service"
    };
    obj.insert(dest_field.into(), json!(msg.destination()));
    obj.insert("key".into(), json!(msg.key()));
    obj.insert("payload".into(), json!(msg.payload_text()));
    obj.insert("attempt".into(), json!(msg.attempt()));
    obj.insert("redelivered".into(), json!(msg.redelivered()));
    Value::Object(obj)
}

/// Writes `line` and a newline to stdout and flushes, so readers of a pipe see each line at
/// once.
pub(crate) fn print_line(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("could not write to stdout")
}

/// The state of a peer as its lower-case name (`connected`, `refused` …).
pub(crate) fn state_name(peer: &PeerInfo) -> String {
    match serde_json::to_value(peer.state) {
        Ok(Value::String(s)) => s,
        _ => format!("{:?}", peer.state).to_lowercase(),
    }
}

/// The peers as an aligned table with a header line.
pub(crate) fn peers_table(peers: &[PeerInfo]) -> String {
    let header = ["NODE", "SERVICE", "STATE", "ADDRS", "RTT"].map(String::from);
    let rows: Vec<[String; 5]> = peers
        .iter()
        .map(|p| {
            let addrs: Vec<String> = p.addrs.iter().map(ToString::to_string).collect();
            [
                p.node_id.short(),
                if p.service.is_empty() {
                    "-".into()
                } else {
                    p.service.clone()
                },
                state_name(p),
                if addrs.is_empty() {
                    "-".into()
                } else {
                    addrs.join(",")
                },
                p.rtt_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms")),
            ]
        })
        .collect();
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("(no peers found)\n");
    }
    out
}

/// `X ms (Y msg/s)` for `n` messages in `elapsed`.
pub(crate) fn rate(n: u64, elapsed: Duration) -> String {
    let ms = elapsed.as_secs_f64() * 1000.0;
    let per_sec = if ms > 0.0 {
        n as f64 / elapsed.as_secs_f64()
    } else {
        f64::INFINITY
    };
    if per_sec.is_finite() {
        format!("{ms:.0} ms ({per_sec:.0} msg/s)")
    } else {
        format!("{ms:.0} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::rate;
    use std::time::Duration;

    #[test]
    fn rate_formats_ms_and_throughput() {
        assert_eq!(rate(50, Duration::from_millis(250)), "250 ms (200 msg/s)");
        assert_eq!(rate(1, Duration::ZERO), "0 ms");
    }
}
