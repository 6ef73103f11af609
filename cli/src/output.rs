//! Formatting only: JSON lines for received messages, the peers table, summaries.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context as _, Result};
use peerbus::{Message, MessageKind, PeerInfo, PeerState};
use serde_json::{Map, Value, json};

/// ", for service a, b": the services a mesh certificate binds its node to, as `ca issue`
/// and `status` append them; empty when it names none (any service).
pub(crate) fn for_services<S: AsRef<str>>(names: &[S]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = names.iter().map(AsRef::as_ref).collect();
    format!(", for service {}", names.join(", "))
}

/// A received message as one JSON object (`node --print`, `sub`).
///
/// Fields: `id`, `kind`, `from`, `service` (sends, requests) or `topic` (publishes), `key`
/// (or null), `headers` (an object; the values of a name given more than once are joined
/// with `", "`, as HTTP combines repeated fields), `payload` (UTF-8, invalid sequences
/// replaced), `attempt`, `redelivered`.
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
    obj.insert("headers".into(), Value::Object(headers_json(msg.headers())));
    obj.insert("payload".into(), json!(msg.payload_text()));
    obj.insert("attempt".into(), json!(msg.attempt()));
    obj.insert("redelivered".into(), json!(msg.redelivered()));
    Value::Object(obj)
}

/// `headers` as one JSON object, repeated names joined with `", "` in the order received.
fn headers_json(headers: &[(String, String)]) -> Map<String, Value> {
    let mut obj = Map::new();
    for (name, value) in headers {
        match obj.get_mut(name) {
            Some(Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(value);
            }
            _ => {
                obj.insert(name.clone(), json!(value));
            }
        }
    }
    obj
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

/// A byte count for people: `-` for none, else B, kB, MB or GB (powers of 1000).
fn bytes(n: u64) -> String {
    match n {
        0 => "-".into(),
        1..1_000 => format!("{n}B"),
        1_000..1_000_000 => format!("{:.1}kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}MB", n as f64 / 1e6),
        _ => format!("{:.1}GB", n as f64 / 1e9),
    }
}

/// The peers as an aligned table with a header line. `TAKES` says whether a connected peer
/// takes its service's messages (a `send` to the service only goes to those that do); `SENT`
/// and `RECEIVED` are what the connections to it carried since this node started (QUIC's
/// count); `PROTO` is the wire protocol version the connection speaks.
pub(crate) fn peers_table(peers: &[PeerInfo]) -> String {
    let header = [
        "NODE", "SERVICE", "STATE", "TAKES", "ADDRS", "RTT", "PROTO", "SENT", "RECEIVED",
    ]
    .map(String::from);
    let rows: Vec<[String; 9]> = peers
        .iter()
        .map(|p| {
            let addrs: Vec<String> = p.addrs.iter().map(ToString::to_string).collect();
            let takes = match (p.state, p.consumes) {
                (PeerState::Connected, true) => "yes",
                (PeerState::Connected, false) => "no",
                _ => "-",
            };
            [
                p.node_id.short(),
                if p.service.is_empty() {
                    "-".into()
                } else {
                    p.service.clone()
                },
                state_name(p),
                takes.into(),
                if addrs.is_empty() {
                    "-".into()
                } else {
                    addrs.join(",")
                },
                p.rtt_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms")),
                p.protocol.map_or_else(|| "-".into(), |v| v.to_string()),
                bytes(p.traffic.bytes_sent),
                bytes(p.traffic.bytes_received),
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

/// `n` with the noun that fits it: `counted(1, "message", "messages")` is "1 message".
pub(crate) fn counted(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
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
    use super::{bytes, counted, headers_json, peers_table, rate};
    use peerbus::{NodeId, PeerInfo, PeerState, Traffic};
    use std::time::Duration;

    fn peer(byte: u8, service: &str, state: PeerState, consumes: bool) -> PeerInfo {
        PeerInfo {
            node_id: NodeId::from_bytes([byte; 32]),
            service: service.into(),
            addrs: vec!["127.0.0.1:4000".parse().expect("address")],
            state,
            rtt_ms: (state == PeerState::Connected).then_some(0.5),
            last_error: None,
            delivered_to: 0,
            acked_by: 0,
            handled_from: 0,
            dialer: None,
            consumes,
            traffic: Traffic {
                bytes_sent: u64::from(byte) * 1_500,
                bytes_received: if consumes { 999 } else { 0 },
                ..Traffic::default()
            },
            protocol: (state == PeerState::Connected).then_some(u32::from(byte) + 3),
        }
    }

    #[test]
    fn the_peers_table_says_which_connected_peers_take_their_messages() {
        let table = peers_table(&[
            peer(1, "orders", PeerState::Connected, true),
            peer(2, "orders", PeerState::Connected, false),
            peer(3, "", PeerState::Unreachable, false),
        ]);
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            [
                "NODE", "SERVICE", "STATE", "TAKES", "ADDRS", "RTT", "PROTO", "SENT", "RECEIVED"
            ]
        );
        assert_eq!(
            rows[1][1..],
            [
                "orders",
                "connected",
                "yes",
                "127.0.0.1:4000",
                "0.5ms",
                "4",
                "1.5kB",
                "999B"
            ]
        );
        assert_eq!(
            rows[2][1..],
            [
                "orders",
                "connected",
                "no",
                "127.0.0.1:4000",
                "0.5ms",
                "5",
                "3.0kB",
                "-"
            ]
        );
        assert_eq!(
            rows[3][1..],
            [
                "-",
                "unreachable",
                "-",
                "127.0.0.1:4000",
                "-",
                "-",
                "4.5kB",
                "-"
            ]
        );
    }

    #[test]
    fn headers_become_one_object_with_repeated_names_joined() {
        let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
        let obj = headers_json(&[
            pair("tenant", "acme"),
            pair("via", "a"),
            pair("empty", ""),
            pair("via", "b"),
        ]);
        assert_eq!(
            serde_json::Value::Object(obj),
            serde_json::json!({"tenant": "acme", "via": "a, b", "empty": ""})
        );
        assert!(headers_json(&[]).is_empty());
    }

    #[test]
    fn byte_counts_read_in_powers_of_a_thousand() {
        assert_eq!(bytes(0), "-");
        assert_eq!(bytes(999), "999B");
        assert_eq!(bytes(1_000), "1.0kB");
        assert_eq!(bytes(2_500_000), "2.5MB");
        assert_eq!(bytes(7_100_000_000), "7.1GB");
    }

    #[test]
    fn counted_picks_the_noun_for_the_number() {
        assert_eq!(counted(1, "message", "messages"), "1 message");
        assert_eq!(counted(0, "message", "messages"), "0 messages");
        assert_eq!(counted(10, "group copy", "group copies"), "10 group copies");
    }

    #[test]
    fn rate_formats_ms_and_throughput() {
        assert_eq!(rate(50, Duration::from_millis(250)), "250 ms (200 msg/s)");
        assert_eq!(rate(1, Duration::ZERO), "0 ms");
    }
}
