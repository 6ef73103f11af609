//! The admin HTTP endpoint against a small in-process mesh: `/status`, `/metrics`,
//! `/healthz`, `/events`, the page, and the metrics facade.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{builder, eventually, start, within};
use peerbus::{
    CaKey, CloseCode, HandlerError, Identity, MemoryNetwork, MeshKey, Node, NodeBuilder, NodeCert,
    StartError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A response: status code, headers (lowercase names), body.
struct Http {
    code: u16,
    headers: HashMap<String, String>,
    body: String,
}

/// A plain HTTP/1.1 GET (the admin endpoint answers with a length or closes).
async fn get(node: &Node, path: &str) -> Http {
    let addr = node.admin_addr().expect("admin endpoint on");
    match try_get(addr, path).await {
        Ok(r) => r,
        Err(e) => panic!("GET {path}: {e}"),
    }
}

/// A GET that reports a refused, closed or garbled answer instead of panicking.
async fn try_get(addr: std::net::SocketAddr, path: &str) -> Result<Http, String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .map_err(|_| "no response within 10s".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let raw = String::from_utf8(raw).map_err(|e| e.to_string())?;
    if !raw.contains("\r\n\r\n") {
        return Err(format!("closed without a complete response: {raw:?}"));
    }
    Ok(parse(&raw))
}

fn parse(raw: &str) -> Http {
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Http {
        code,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

async fn status(node: &Node) -> serde_json::Value {
    let r = get(node, "/status").await;
    assert_eq!(r.code, 200, "/status: {}", r.body);
    assert_eq!(r.headers["content-type"], "application/json");
    serde_json::from_str(&r.body).expect("/status is JSON")
}

async fn metrics(node: &Node) -> String {
    let r = get(node, "/metrics").await;
    assert_eq!(r.code, 200, "/metrics: {}", r.body);
    assert!(
        r.headers["content-type"].starts_with("text/plain; version=0.0.4"),
        "{:?}",
        r.headers
    );
    check_exposition_format(&r.body);
    r.body
}

/// Every sample line is `name{labels} value` with a `# TYPE` line for its family.
fn check_exposition_format(text: &str) {
    let mut typed = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            typed.push(it.next().expect("name").to_string());
            let kind = it.next().expect("kind");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "bad type: {line}"
            );
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = series.split('{').next().expect("name");
        assert!(series.ends_with('}'), "labels not closed: {line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| typed.iter().any(|t| t == f))
            .unwrap_or(name);
        assert!(typed.iter().any(|t| t == family), "no # TYPE before {line}");
    }
}

/// The value of the sample `name` whose labels include every `(label, value)` given.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{')?;
        if n != name {
            return None;
        }
        let have = rest.trim_end_matches('}');
        labels
            .iter()
            .all(|(k, v)| have.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}

fn admin(b: NodeBuilder) -> NodeBuilder {
    b.admin("127.0.0.1:0".parse().expect("addr"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_show_peers_counters_and_backlog() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        // Payments keeps a durable log, so its store commits are timed.
        let dir = tempfile::tempdir().expect("tempdir");
        let payments = start(admin(builder(&net, "payments", &key).data_dir(dir.path()))).await;
        let orders = start(admin(builder(&net, "orders", &key))).await;
        let mut handled = common::drain(orders.messages().expect("messages"));
        assert!(
            payments
                .wait_for_instances("orders", 1, Duration::from_secs(10))
                .await
        );
        let pid = payments.id().to_string();
        let oid = orders.id().to_string();

        // Identity and the peer.
        let s = status(&payments).await;
        assert_eq!(s["node_id"], pid);
        assert_eq!(s["service"], "payments");
        assert_eq!(s["mesh"], "test");
        assert_eq!(s["listen"], payments.local_addr().to_string());
        let peer = s["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .find(|p| p["node_id"] == oid)
            .expect("orders is a peer")
            .clone();
        assert_eq!(peer["service"], "orders");
        assert_eq!(peer["state"], "connected");
        assert!(peer["rtt_ms"].as_f64().is_some(), "{peer}");

        let m = metrics(&payments).await;
        let me = [("node", pid.as_str())];
        assert_eq!(sample(&m, "peerbus_messages_sent_total", &me), Some(0.0));
        assert_eq!(sample(&m, "peerbus_peers_connected", &me), Some(1.0));
        assert_eq!(sample(&m, "peerbus_sends_waiting", &me), Some(0.0));
        // Closes by code: every code has its series, and a healthy mesh has no violations.
        let violations = [("node", pid.as_str()), ("code", "protocol_violation")];
        assert_eq!(
            sample(&m, "peerbus_connections_closed_total", &violations),
            Some(0.0)
        );
        assert_eq!(s["connections_closed"]["malformed_frame"], 0, "{s}");
        // Its help names every code that blames the peer, and only those.
        let help = m
            .lines()
            .find(|l| l.starts_with("# HELP peerbus_connections_closed_total "))
            .expect("help of peerbus_connections_closed_total");
        for code in CloseCode::ALL {
            assert_eq!(
                help.contains(&format!("{} ", code.name()))
                    || help.contains(&format!("{},", code.name())),
                code.is_protocol_fault()
                    || code == CloseCode::Unresponsive
                    || code == CloseCode::Stalled,
                "{code:?} in {help}"
            );
        }

        // Durable groups orders subscribes to and releases, as payments knows them.
        let _audit = orders
            .subscribe_group("orders.>", "audit")
            .await
            .expect("subscribe");
        let _ledger = orders
            .subscribe_group("refunds.*", "ledger")
            .await
            .expect("subscribe");
        let groups = |state: &'static str| [("node", pid.as_str()), ("state", state)];
        eventually(10, "payments learns both groups", || async {
            let m = metrics(&payments).await;
            sample(&m, "peerbus_durable_groups", &groups("live")) == Some(2.0)
        })
        .await;
        orders.unsubscribe_group("ledger").await.expect("release");
        eventually(10, "payments learns of the release", || async {
            let m = metrics(&payments).await;
            sample(&m, "peerbus_durable_groups", &groups("live")) == Some(1.0)
                && sample(&m, "peerbus_durable_groups", &groups("released")) == Some(1.0)
        })
        .await;
        let s = status(&payments).await;
        assert_eq!(
            s["groups"]["audit"]["patterns"],
            serde_json::json!(["orders.>"]),
            "{s}"
        );
        assert_eq!(
            s["groups"]["ledger"]["patterns"],
            serde_json::json!([]),
            "{s}"
        );
        assert!(s["groups"]["ledger"]["version"].as_u64() >= Some(2), "{s}");
        let rtt = sample(
            &m,
            "peerbus_connection_rtt_seconds",
            &[("node", &pid), ("peer", &oid), ("service", "orders")],
        )
        .expect("rtt of the orders connection");
        assert!(rtt > 0.0 && rtt < 1.0, "rtt {rtt}");
        assert_eq!(
            sample(
                &m,
                "peerbus_node_info",
                &[("node", &pid), ("service", "payments")]
            ),
            Some(1.0)
        );

        // Counters rise with traffic, on both sides. Each order carries 10 kB, which the
        // connection's byte counters must show.
        let link = [("node", pid.as_str()), ("peer", oid.as_str())];
        let sent_bytes = |m: &str| sample(m, "peerbus_peer_sent_bytes_total", &link);
        let bytes_before = sent_bytes(&m).expect("bytes sent to orders");
        for i in 0..5 {
            payments
                .send("orders", format!("order-{i}-{}", "x".repeat(10_000)))
                .await
                .expect("send")
                .acked()
                .await
                .expect("acked");
            handled.recv().await.expect("handled");
        }
        let m = metrics(&payments).await;
        assert_eq!(sample(&m, "peerbus_messages_sent_total", &me), Some(5.0));
        let bytes = sent_bytes(&m).expect("bytes sent to orders") - bytes_before;
        assert!(
            (50_000.0..200_000.0).contains(&bytes),
            "five 10 kB orders took {bytes} bytes"
        );
        assert!(
            sample(&m, "peerbus_peer_received_bytes_total", &link).is_some_and(|b| b > 0.0),
            "acks came back"
        );
        assert!(sample(&m, "peerbus_peer_lost_packets_total", &link).is_some());
        assert_eq!(
            sample(&m, "peerbus_messages_acknowledged_total", &me),
            Some(5.0)
        );
        assert_eq!(
            sample(&m, "peerbus_messages_dead_lettered_total", &me),
            Some(0.0)
        );
        let commits = sample(&m, "peerbus_store_commit_seconds_count", &me).expect("commits");
        assert!(commits >= 1.0, "store commits timed: {commits}");
        let m = metrics(&orders).await;
        // Each of the 5 arrived once and was handed to the handler: nothing queued, no repeat.
        for counter in [
            "peerbus_messages_received_total",
            "peerbus_messages_delivered_total",
        ] {
            assert_eq!(
                sample(&m, counter, &[("node", oid.as_str())]),
                Some(5.0),
                "{counter}"
            );
        }
        assert_eq!(status(&orders).await["received"], 5);
        // The same counters, read straight from the nodes.
        let sender = payments.delivery_counts();
        assert_eq!((sender.sent, sender.acked, sender.redelivered), (5, 5, 0));
        let receiver = orders.delivery_counts();
        assert_eq!(
            (
                receiver.received,
                receiver.delivered,
                receiver.duplicates_dropped
            ),
            (5, 5, 0)
        );
        let s = status(&payments).await;
        let peer = &s["peers"][0];
        assert_eq!(peer["delivered_to"], 5, "{peer}");
        let traffic = &peer["traffic"];
        assert!(
            traffic["bytes_sent"].as_u64().is_some_and(|b| b > 50_000),
            "{peer}"
        );
        assert!(
            traffic["datagrams_received"]
                .as_u64()
                .is_some_and(|d| d > 0),
            "{peer}"
        );
        assert_eq!(peer["acked_by"], 5, "{peer}");
        assert_eq!(s["sent"], 5);
        assert_eq!(s["acked"], 5);

        // The consumer goes away: its backlog waits here and shows as a gauge.
        orders.shutdown().await;
        for i in 0..3 {
            let _receipt = payments
                .send("orders", format!("late-{i}"))
                .await
                .expect("send");
        }
        let backlog = [("node", pid.as_str()), ("destination", "svc:orders")];
        // The shutdown's close reaches payments on its own time: wait for both.
        eventually(
            10,
            "backlog of svc:orders at 3, orders disconnected",
            || async {
                let m = metrics(&payments).await;
                sample(&m, "peerbus_backlog_entries", &backlog) == Some(3.0)
                    && sample(&m, "peerbus_peers_connected", &me) == Some(0.0)
            },
        )
        .await;
        // Let the oldest entry age a little, so that its age reads above zero.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let m = metrics(&payments).await;
        let age = sample(&m, "peerbus_backlog_oldest_age_seconds", &backlog).expect("age");
        assert!(age > 0.0 && age < 30.0, "oldest age {age}");
        assert_eq!(sample(&m, "peerbus_peers_connected", &me), Some(0.0));

        let s = status(&payments).await;
        let log = &s["logs"]["svc:orders"];
        assert_eq!(
            log["waiting"].as_u64().unwrap_or(0) + log["in_flight"].as_u64().unwrap_or(0),
            3,
            "{log}"
        );
        assert_ne!(s["peers"][0]["state"], "connected");
        // The entries themselves, oldest first, at most `limit`.
        let r = get(&payments, "/entries?limit=2").await;
        assert_eq!(r.code, 200, "{}", r.body);
        let entries: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        let payloads: Vec<&str> = entries
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|e| e["payload"].as_str())
            .collect();
        assert_eq!(payloads, ["late-0", "late-1"], "{}", r.body);
        assert_eq!(entries[0]["log"], "svc:orders");
        // What the closed connection carried still counts.
        let traffic = &s["peers"][0]["traffic"];
        assert!(
            traffic["bytes_sent"].as_u64().is_some_and(|b| b > 50_000),
            "{traffic}"
        );
        let kinds: Vec<(String, String)> = s["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| {
                (
                    e["kind"].as_str().unwrap_or("").to_string(),
                    e["service"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert!(
            kinds.contains(&("peer_up".into(), "orders".into())),
            "{kinds:?}"
        );
        assert!(
            kinds.contains(&("peer_down".into(), "orders".into())),
            "{kinds:?}"
        );

        // An operator gives up on twelve waiting messages: the first eight are events of
        // their own, the other four one more, so the page's list keeps its other events.
        for i in 0..12 {
            let _receipt = payments
                .send("gone", format!("gone-{i}"))
                .await
                .expect("send");
        }
        assert_eq!(payments.dead_letter_waiting("svc:gone").await, Ok(12));
        let s = status(&payments).await;
        let dead: Vec<&str> = s["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["kind"] == "dead_letter")
            .filter_map(|e| e["detail"].as_str())
            .collect();
        assert_eq!(dead.len(), 9, "{dead:?}");
        assert!(dead[0].starts_with("svc:gone#"), "{dead:?}");
        assert_eq!(dead[8], "and 4 more dead-lettered at once");
        // The store counts them once their commit is done.
        eventually(10, "the store counts all twelve", || async {
            status(&payments).await["dead_letters"]
                .as_u64()
                .is_some_and(|n| n >= 12)
        })
        .await;
        payments.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_page_events_and_errors() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let orders =
            start(admin(builder(&net, "orders", &key)).shutdown_grace(Duration::from_secs(5)))
                .await;
        let payments = start(builder(&net, "payments", &key)).await;

        let r = get(&orders, "/healthz").await;
        assert_eq!((r.code, r.body.as_str()), (200, "ok\n"));

        let r = get(&orders, "/").await;
        assert_eq!(r.code, 200);
        assert!(r.headers["content-type"].starts_with("text/html"));
        assert!(r.body.contains("<svg") && r.body.contains("EventSource(\"/events\")"));
        // No external assets: nothing is loaded from another origin.
        for needle in ["src=\"http", "href=\"http", "url(", "@import", "<link"] {
            assert!(
                !r.body.contains(needle),
                "page loads an external asset: {needle}"
            );
        }

        let r = get(&orders, "/nope").await;
        assert_eq!(r.code, 404);
        assert!(r.body.contains("/status"), "{}", r.body);

        // /events streams status snapshots.
        let addr = orders.admin_addr().expect("admin");
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut seen = String::new();
        let mut buf = [0u8; 8192];
        tokio::time::timeout(Duration::from_secs(10), async {
            while !(seen.contains("event: status") && seen.contains(&payments.id().to_string())) {
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "stream closed early: {seen}");
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
        .await
        .expect("a status event naming the peer within 10s");
        assert!(seen.contains("text/event-stream"), "{seen}");
        drop(s);

        // A handler that does not finish keeps shutdown in its grace period: not healthy.
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let release = Arc::new(Mutex::new(Some(release_rx)));
        let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(1);
        let sub = orders.messages().expect("messages");
        tokio::spawn(sub.handle(1, move |_m| {
            let release = release.clone();
            let started = started_tx.clone();
            async move {
                let _ = started.send(()).await;
                let rx = release.lock().expect("lock").take();
                if let Some(rx) = rx {
                    let _ = rx.await;
                }
                Ok::<(), HandlerError>(())
            }
        }));
        assert!(
            payments
                .wait_for_instances("orders", 1, Duration::from_secs(10))
                .await
        );
        let _receipt = payments.send("orders", "slow").await.expect("send");
        started_rx.recv().await.expect("handler started");
        let stopping = {
            let orders = orders.clone();
            tokio::spawn(async move { orders.shutdown().await })
        };
        eventually(5, "healthz says shutting down", || async {
            let r = get(&orders, "/healthz").await;
            r.code == 503 && r.body == "shutting down\n"
        })
        .await;
        let _ = release_tx.send(());
        stopping.await.expect("shutdown");
        // Once stopped, nothing listens.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());

        // A bad address is a clear start error.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let taken_addr = taken.local_addr().expect("addr");
        let err = builder(&net, "other", &key)
            .admin(taken_addr)
            .start()
            .await
            .expect_err("address in use");
        assert!(matches!(err, StartError::Admin { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&taken_addr.to_string()) && msg.contains("admin"),
            "{msg}"
        );
        payments.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_mesh_key_shows_as_refused() {
    within(60, async {
        let net = MemoryNetwork::new();
        let payments = start(admin(builder(&net, "payments", &MeshKey::generate()))).await;
        let intruder = start(builder(&net, "intruder", &MeshKey::generate())).await;
        let iid = intruder.id().to_string();
        eventually(
            20,
            "the intruder refused in /status and in the events",
            || async {
                let s = status(&payments).await;
                let refused = s["peers"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p["node_id"] == iid && p["state"] == "refused")
                });
                let event = s["events"].as_array().is_some_and(|es| {
                    es.iter()
                        .any(|e| e["kind"] == "refused" && e["peer"] == iid)
                });
                refused && event
            },
        )
        .await;
        let m = metrics(&payments).await;
        let pid = payments.id().to_string();
        assert_eq!(
            sample(&m, "peerbus_peers", &[("node", &pid), ("state", "refused")]),
            Some(1.0)
        );
        assert_eq!(
            sample(&m, "peerbus_peers_connected", &[("node", &pid)]),
            Some(0.0)
        );
        // Each side refuses the other's proof when it listens: `payments` counts the
        // intruder's dials it closed, by code.
        let refusals = [("node", pid.as_str()), ("code", "mesh_proof_failed")];
        eventually(10, "payments counts the proofs it refused", || async {
            let m = metrics(&payments).await;
            sample(&m, "peerbus_connections_closed_total", &refusals) >= Some(1.0)
        })
        .await;
        let s = status(&payments).await;
        assert_eq!(s["connections_closed"]["protocol_violation"], 0, "{s}");
        intruder.shutdown().await;
        payments.shutdown().await;
    })
    .await;
}

/// A node of a mesh CA shows when its certificate ends, in `/status` and `/metrics`, so that
/// an alert can fire well before, and which revocation list it uses; a node with a mesh key
/// has no such figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_ca_node_shows_when_its_certificate_ends() {
    within(30, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CaKey::generate("test", Duration::from_secs(86_400)).expect("ca");
        let id = Identity::load_or_create(dir.path())
            .expect("identity")
            .node_id();
        let pem = ca.issue(&id, Duration::from_secs(3_600)).expect("issue");
        let cert = NodeCert::from_pem("node.crt", pem.as_bytes()).expect("cert");
        // The CA's first list, empty (number 1, as `peerbus ca new` writes it).
        let list = ca.revoke(None, []).expect("empty list");
        let trust = ca
            .trust()
            .expect("trust")
            .with_revocation_lists("ca.crl", list.as_bytes())
            .expect("list");
        let node = start(admin(
            Node::builder("payments")
                .data_dir(dir.path())
                .mesh_ca(trust, cert.clone())
                .listen("127.0.0.1:0".parse().expect("addr"))
                .discovery(MemoryNetwork::new().discovery()),
        ))
        .await;
        let ends = cert
            .not_after()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs();
        assert_eq!(status(&node).await["mesh_certificate_expires"], ends);
        let m = metrics(&node).await;
        let name = "peerbus_mesh_certificate_expiration_timestamp_seconds";
        let nid = node.id().to_string();
        assert_eq!(sample(&m, name, &[("node", &nid)]), Some(ends as f64));
        // Nothing says its own certificate is revoked.
        assert!(status(&node).await["mesh_certificate_revoked"].is_null());
        // Its certificate names no service: it may run any. It has no mesh key.
        assert_eq!(
            status(&node).await["mesh_certificate_services"],
            serde_json::json!([])
        );
        assert_eq!(status(&node).await["mesh_keys"], serde_json::json!([]));
        assert!(!m.contains("peerbus_mesh_key_info"), "{m}");
        let own_revoked = "peerbus_mesh_certificate_revoked";
        assert_eq!(sample(&m, own_revoked, &[("node", &nid)]), Some(0.0));
        // Its list revokes none, and the metrics say so, and which list it is.
        assert_eq!(status(&node).await["mesh_ca_revoked"], 0);
        let lists = &status(&node).await["mesh_ca_lists"];
        assert_eq!(lists.as_array().map(Vec::len), Some(1), "{lists}");
        assert_eq!(
            (&lists[0]["number"], &lists[0]["revoked"]),
            (&"1".into(), &0.into())
        );
        let revoked = "peerbus_mesh_ca_revoked_certificates";
        assert_eq!(sample(&m, revoked, &[("node", &nid)]), Some(0.0));
        // It refused no revoked certificate yet, and its closes by cause show them apart.
        let s = status(&node).await;
        assert_eq!(s["mesh_ca_refused_revoked"], 0);
        assert_eq!(s["connections_closed"]["revoked_certificate"], 0, "{s}");
        let refused = "peerbus_mesh_ca_refused_revoked_total";
        assert_eq!(sample(&m, refused, &[("node", &nid)]), Some(0.0));
        assert_eq!(
            sample(
                &m,
                "peerbus_connections_closed_total",
                &[("node", &nid), ("code", "revoked_certificate")]
            ),
            Some(0.0)
        );
        let ca_name = lists[0]["ca"].as_str().expect("the CA's subject");
        let number = "peerbus_mesh_ca_revocation_list_number";
        assert_eq!(
            sample(&m, number, &[("node", &nid), ("ca", ca_name)]),
            Some(1.0)
        );
        // When the CA promised the next list by (`revoke` writes a year ahead).
        let next = lists[0]["next_update"].as_u64().expect("next_update");
        assert!(
            next > ends,
            "a year ahead, past the certificate's hour: {lists}"
        );
        let next_update = "peerbus_mesh_ca_revocation_list_next_update_timestamp_seconds";
        assert_eq!(
            sample(&m, next_update, &[("node", &nid), ("ca", ca_name)]),
            Some(next as f64)
        );
        node.shutdown().await;

        let key = MeshKey::generate();
        let keyed = start(admin(builder(&MemoryNetwork::new(), "x", &key))).await;
        assert_eq!(
            status(&keyed).await["mesh_keys"],
            serde_json::json!([key.fingerprint()])
        );
        let fingerprint = key.fingerprint();
        let kid = keyed.id().to_string();
        assert_eq!(
            sample(
                &metrics(&keyed).await,
                "peerbus_mesh_key_info",
                &[
                    ("node", &kid),
                    ("fingerprint", &fingerprint),
                    ("role", "proved")
                ]
            ),
            Some(1.0)
        );
        assert!(status(&keyed).await["mesh_certificate_expires"].is_null());
        assert!(status(&keyed).await["mesh_certificate_services"].is_null());
        assert!(status(&keyed).await["mesh_ca_revoked"].is_null());
        assert!(status(&keyed).await["mesh_ca_refused_revoked"].is_null());
        assert!(!metrics(&keyed).await.contains(refused));
        assert!(!metrics(&keyed).await.contains(own_revoked));
        assert_eq!(
            status(&keyed).await["mesh_ca_lists"]
                .as_array()
                .map(Vec::len),
            Some(0)
        );
        assert!(!metrics(&keyed).await.contains(number));
        assert!(!metrics(&keyed).await.contains(next_update));
        assert!(!metrics(&keyed).await.contains(name));
        keyed.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_and_service_resumes() {
    within(60, async {
        let net = MemoryNetwork::new();
        let node = start(admin(builder(&net, "payments", &MeshKey::generate()))).await;
        let addr = node.admin_addr().expect("admin");
        // Hold every slot with a connection that sends nothing.
        let mut idle = Vec::new();
        for _ in 0..peerbus::admin::MAX_CONNECTIONS {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        // Let the server accept them all before the next one (well within the 5 s header
        // timeout that would free their slots).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), extra.read_to_end(&mut raw))
            .await
            .expect("closed within 10s");
        assert!(
            read.is_err() || raw.is_empty(),
            "a connection over the limit got an answer: {}",
            String::from_utf8_lossy(&raw)
        );
        drop(idle);
        eventually(10, "healthz answers again", || async {
            try_get(addr, "/healthz").await.is_ok_and(|r| r.code == 200)
        })
        .await;
        node.shutdown().await;
    })
    .await;
}

// --- the metrics facade: a recorder installed by the "application" sees our series ---

#[derive(Default)]
struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    gauges: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

struct NoHistogram;
impl metrics::HistogramFn for NoHistogram {
    fn record(&self, _value: f64) {}
}

fn key_string(key: &metrics::Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl metrics::Recorder for TestRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let c = self
            .counters
            .lock()
            .expect("lock")
            .entry(key_string(key))
            .or_default()
            .clone();
        metrics::Counter::from_arc(c)
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        let g = self
            .gauges
            .lock()
            .expect("lock")
            .entry(key_string(key))
            .or_default()
            .clone();
        metrics::Gauge::from_arc(g)
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::from_arc(Arc::new(NoHistogram))
    }
}

fn recorder() -> &'static TestRecorder {
    static R: OnceLock<&'static TestRecorder> = OnceLock::new();
    R.get_or_init(|| {
        let r: &'static TestRecorder = Box::leak(Box::default());
        metrics::set_global_recorder(r).expect("first recorder of this test binary");
        r
    })
}

impl TestRecorder {
    fn counter(&self, key: &str) -> Option<u64> {
        self.counters
            .lock()
            .expect("lock")
            .get(key)
            .map(|c| c.load(Ordering::Relaxed))
    }
    fn gauge(&self, key: &str) -> Option<f64> {
        self.gauges
            .lock()
            .expect("lock")
            .get(key)
            .map(|g| f64::from_bits(g.load(Ordering::Relaxed)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorder_installed_by_the_application_sees_counters_and_gauges() {
    let rec = recorder();
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        // No admin endpoint: the facade works without it.
        let payments = start(builder(&net, "payments", &key)).await;
        let orders = start(builder(&net, "orders", &key)).await;
        let mut handled = common::drain(orders.messages().expect("messages"));
        assert!(
            payments
                .wait_for_instances("orders", 1, Duration::from_secs(10))
                .await
        );
        for i in 0..4 {
            payments
                .send("orders", format!("{i}"))
                .await
                .expect("send")
                .acked()
                .await
                .expect("acked");
            handled.recv().await.expect("handled");
        }
        let p = payments.id().to_string();
        let o = orders.id().to_string();
        assert_eq!(
            rec.counter(&format!("peerbus_messages_sent_total{{node={p}}}")),
            Some(4)
        );
        assert_eq!(
            rec.counter(&format!("peerbus_messages_acknowledged_total{{node={p}}}")),
            Some(4)
        );
        assert_eq!(
            rec.counter(&format!("peerbus_messages_delivered_total{{node={o}}}")),
            Some(4)
        );
        // Gauges are sampled about every second.
        orders.shutdown().await;
        let _receipt = payments.send("orders", "waits").await.expect("send");
        let backlog = format!("peerbus_backlog_entries{{destination=svc:orders,node={p}}}");
        let connected = format!("peerbus_peers_connected{{node={p}}}");
        // Both gauges come from one sample, which can predate payments seeing the close.
        eventually(10, "backlog and peers gauges through the facade", || {
            let v = (rec.gauge(&backlog), rec.gauge(&connected));
            async move { v == (Some(1.0), Some(0.0)) }
        })
        .await;
        // The mesh keys by fingerprint and role; one dropped, or moved to the other role,
        // reads 0.
        let info = |k: &MeshKey, role: &str| {
            rec.gauge(&format!(
                "peerbus_mesh_key_info{{fingerprint={},node={p},role={role}}}",
                k.fingerprint()
            ))
        };
        let next = MeshKey::generate();
        payments
            .renew_mesh_keys(vec![key.clone(), next.clone()])
            .expect("step 1");
        eventually(10, "both keys through the facade", || {
            let v = (info(&key, "proved"), info(&next, "accepted"));
            async move { v == (Some(1.0), Some(1.0)) }
        })
        .await;
        payments
            .renew_mesh_keys(vec![next.clone()])
            .expect("step 3");
        eventually(10, "the dropped key reads 0", || {
            let v = [
                info(&key, "proved"),
                info(&next, "accepted"),
                info(&next, "proved"),
            ];
            async move { v == [Some(0.0), Some(0.0), Some(1.0)] }
        })
        .await;
        payments.shutdown().await;
    })
    .await;
}
