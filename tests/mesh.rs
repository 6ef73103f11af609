//! In-process meshes over real QUIC on 127.0.0.1.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{builder, eventually, mdns_builder, start, within};
use peerbus::trace::TraceContext;
use peerbus::{
    Discovery, DiscoveryError, DiscoveryEvent, DnsDiscovery, Faults, HandlerError, MemoryNetwork,
    MeshKey, Node, NodeBuilder, NodeId, Outgoing, PROTOCOL_VERSION, PeerRecord, PeerState,
    RequestError,
};
use tokio::sync::mpsc;

/// Collects (key, payload) of every message a node's service handles.
fn collect(node: &Node) -> mpsc::Receiver<(Option<String>, String)> {
    common::drain(node.messages().expect("messages"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_send_publish_and_request() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let a = start(builder(&net, "payments", &key)).await;
        let b = start(builder(&net, "orders", &key)).await;
        let c = start(builder(&net, "accounts", &key)).await;
        let mut orders = collect(&b);
        c.serve(|req| async move {
            let n: u64 = req.payload_text().parse().map_err(HandlerError::reject)?;
            Ok(format!("{}", n * 2).into())
        })
        .await
        .expect("serve");
        let mut sub_b = b.subscribe("payment.*").await.expect("sub");
        let mut sub_c = c.subscribe("payment.>").await.expect("sub");
        assert!(
            a.wait_for_instances("orders", 1, Duration::from_secs(10))
                .await
        );
        assert!(
            a.wait_for_instances("accounts", 1, Duration::from_secs(10))
                .await
        );

        // send: 200 keyed messages, every receipt acknowledged, order per key kept.
        let mut receipts = Vec::new();
        for i in 0..200 {
            let msg = Outgoing::new(format!("{i}")).key(format!("k{}", i % 7));
            receipts.push(a.send("orders", msg).await.expect("send"));
        }
        for r in receipts {
            r.acked().await.expect("acked");
        }
        let mut per_key: HashMap<String, Vec<u64>> = HashMap::new();
        for _ in 0..200 {
            let (k, p) = orders.recv().await.expect("message");
            per_key
                .entry(k.expect("key"))
                .or_default()
                .push(p.parse().expect("n"));
        }
        for (k, v) in &per_key {
            assert!(
                v.windows(2).all(|w| w[0] < w[1]),
                "key {k} out of order: {v:?}"
            );
        }
        assert_eq!(per_key.values().map(Vec::len).sum::<usize>(), 200);

        // request/reply.
        let reply = a
            .request("accounts", "21", Duration::from_secs(5))
            .await
            .expect("reply");
        assert_eq!(&reply[..], b"42");
        let err = a
            .request("accounts", "x", Duration::from_secs(5))
            .await
            .expect_err("remote error");
        assert!(matches!(err, RequestError::Remote { .. }), "{err}");
        let err = a
            .request("nobody", "x", Duration::from_secs(5))
            .await
            .expect_err("no responders");
        assert!(matches!(err, RequestError::NoResponders { .. }), "{err}");

        // publish: interests arrive asynchronously; wait until both groups are known.
        eventually(10, "both groups subscribed", || async {
            let r = a.publish("payment.warmup", "w").await.expect("publish");
            r.copies() == 2
        })
        .await;
        let r = a
            .publish("payment.succeeded", "order-1")
            .await
            .expect("publish");
        assert_eq!(r.copies(), 2, "one copy per subscriber group");
        for sub in [&mut sub_b, &mut sub_c] {
            loop {
                let d = sub.next().await.expect("delivery");
                let text = d.payload_text();
                d.ack().await;
                if text == "order-1" {
                    break;
                }
            }
        }
        r.acked().await.expect("acked by both groups");
        for n in [a, b, c] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_service_gets_its_messages_after_restart_and_rediscovery() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        let sender = start(builder(&net, "payments", &key)).await;
        let rx_node = start(builder(&net, "orders", &key).data_dir(dir.path())).await;
        let first_id = rx_node.id();
        assert!(
            sender
                .wait_for_instances("orders", 1, Duration::from_secs(10))
                .await
        );
        rx_node.shutdown().await;
        eventually(10, "orders gone", || async {
            sender.instances("orders").await.is_empty()
        })
        .await;

        // Sent while no instance is up: accepted and waiting.
        let mut receipts = Vec::new();
        for i in 0..50 {
            receipts.push(
                sender
                    .send("orders", Outgoing::new(format!("{i}")).key("k"))
                    .await
                    .expect("send"),
            );
        }
        let st = sender.status().await.expect("status");
        assert_eq!(st.logs.get("svc:orders").map(|l| l.waiting), Some(50));

        // Same data dir: same identity, rediscovered, backlog delivered in order.
        let rx_node = start(builder(&net, "orders", &key).data_dir(dir.path())).await;
        assert_eq!(rx_node.id(), first_id, "identity persists in the data dir");
        let mut got = collect(&rx_node);
        for r in receipts {
            r.acked().await.expect("acked after restart");
        }
        for i in 0..50 {
            let (_, p) = got.recv().await.expect("msg");
            assert_eq!(p, i.to_string());
        }
        sender.shutdown().await;
        rx_node.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_instances_share_work_and_take_over_a_lost_instance() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let sender = start(builder(&net, "payments", &key)).await;
        let i1 = start(builder(&net, "orders", &key)).await;
        let i2 = start(builder(&net, "orders", &key)).await;
        let seen: Arc<Mutex<Vec<(u8, String)>>> = Arc::default();
        for (tag, node) in [(1u8, &i1), (2u8, &i2)] {
            let seen = seen.clone();
            tokio::spawn(node.messages().expect("messages").handle(4, move |m| {
                let seen = seen.clone();
                async move {
                    seen.lock().expect("lock").push((tag, m.payload_text()));
                    Ok::<(), HandlerError>(())
                }
            }));
        }
        assert!(
            sender
                .wait_for_consumers("orders", 2, Duration::from_secs(10))
                .await
        );
        let mut receipts = Vec::new();
        for i in 0..400 {
            let msg = Outgoing::new(format!("{i}")).key(format!("k{}", i % 40));
            receipts.push(sender.send("orders", msg).await.expect("send"));
        }
        for r in receipts {
            r.acked().await.expect("acked");
        }
        {
            let s = seen.lock().expect("lock");
            let by1 = s.iter().filter(|(t, _)| *t == 1).count();
            let by2 = s.iter().filter(|(t, _)| *t == 2).count();
            assert!(
                by1 > 0 && by2 > 0,
                "work spread over both instances: {by1} / {by2}"
            );
        }
        // One instance goes away: everything after goes to the other.
        i1.shutdown().await;
        eventually(10, "one instance left", || async {
            sender.instances("orders").await.len() == 1
        })
        .await;
        let before = seen.lock().expect("lock").len();
        let mut receipts = Vec::new();
        for i in 400..500 {
            let msg = Outgoing::new(format!("{i}")).key(format!("k{}", i % 40));
            receipts.push(sender.send("orders", msg).await.expect("send"));
        }
        for r in receipts {
            r.acked().await.expect("acked");
        }
        let after: Vec<u8> = seen.lock().expect("lock")[before..]
            .iter()
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(after.len(), 100);
        assert!(
            after.iter().all(|t| *t == 2),
            "the lost instance got nothing: {after:?}"
        );
        sender.shutdown().await;
        i2.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_mesh_key_or_no_key_is_refused_and_receives_nothing() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let good = start(builder(&net, "payments", &key)).await;
        let intruder = start(builder(&net, "orders", &MeshKey::generate())).await;
        let open = start(
            peerbus::Node::builder("orders")
                .mesh("test")
                .insecure_open_mesh()
                .listen("127.0.0.1:0".parse().expect("addr"))
                .discovery(net.discovery()),
        )
        .await;
        let _got = collect(&intruder);
        // The good node sees both peers but connects to neither.
        eventually(15, "both peers marked refused/unreachable", || async {
            let peers = good.peers().await;
            peers.len() == 2
                && peers
                    .iter()
                    .all(|p| p.state != PeerState::Connected && p.last_error.is_some())
        })
        .await;
        let receipt = good.send("orders", "secret").await.expect("stored");
        let waited = tokio::time::timeout(Duration::from_secs(2), receipt.acked()).await;
        assert!(
            waited.is_err(),
            "no instance outside the mesh may acknowledge"
        );
        assert_eq!(intruder.delivered_count(), 0);
        assert_eq!(open.delivered_count(), 0);
        let peers = good.peers().await;
        assert!(
            peers
                .iter()
                .any(|p| p.last_error.as_deref().unwrap_or("").contains("mesh key")),
            "a refusal names the mesh key: {peers:?}"
        );
        for n in [good, intruder, open] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_dial_leaves_one_connection() {
    within(60, async {
        for _ in 0..5 {
            let net = MemoryNetwork::new();
            let key = MeshKey::generate();
            // Both start at once, discover each other at once, and both dial.
            let (a, b) = tokio::join!(
                start(builder(&net, "a", &key)),
                start(builder(&net, "b", &key))
            );
            assert!(a.wait_for_instances("b", 1, Duration::from_secs(10)).await);
            assert!(b.wait_for_instances("a", 1, Duration::from_secs(10)).await);
            // Any duplicate settles (within 300 ms on an idle machine; a busy one may take
            // longer), then both must agree on the one connection they kept. Both may agree
            // for a moment before the tie-break too (on the first connection, while the
            // second's handshake is still running), so the agreement must hold for longer
            // than a handshake and the redial after a retire (200 ms) take.
            let agreed = || async {
                let dialer = |s: &peerbus::Status, of: peerbus::NodeId| {
                    s.peers.iter().find(|p| p.node_id == of).map(|p| p.dialer)
                };
                let (sa, sb) = (a.status().await?, b.status().await?);
                let kept = dialer(&sa, b.id())?;
                (sa.connections == 1 && sb.connections == 1 && dialer(&sb, a.id()) == Some(kept))
                    .then_some((kept, sa.connections_retired, sb.connections_retired))
            };
            eventually(20, "one connection, the same, on each side", || async {
                let first = agreed().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                first.is_some() && agreed().await == first
            })
            .await;
            let sa = a.status().await.expect("status");
            let sb = b.status().await.expect("status");
            assert_eq!(sa.connections, 1);
            assert_eq!(sb.connections, 1);
            let pa = sa
                .peers
                .iter()
                .find(|p| p.node_id == b.id())
                .expect("b known");
            let pb = sb
                .peers
                .iter()
                .find(|p| p.node_id == a.id())
                .expect("a known");
            assert_eq!(pa.dialer, pb.dialer, "both kept the same connection");
            // And it works.
            let mut got = collect(&b);
            a.send("b", "hi")
                .await
                .expect("send")
                .acked()
                .await
                .expect("acked");
            assert_eq!(got.recv().await.map(|m| m.1).as_deref(), Some("hi"));
            a.shutdown().await;
            b.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mdns_on_loopback_finds_peers_and_a_restarted_node() {
    within(90, async {
        // A mesh name of its own so parallel test runs do not see each other.
        let mesh = format!("mdns-{}", std::process::id());
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        let a = start(mdns_builder(&mesh, "payments", &key)).await;
        let b = start(mdns_builder(&mesh, "orders", &key).data_dir(dir.path())).await;
        let c = start(mdns_builder(&mesh, "accounts", &key)).await;
        c.serve(|r| async move { Ok(r.payload().clone()) })
            .await
            .expect("serve");
        let mut got = collect(&b);
        assert!(
            a.wait_for_instances("orders", 1, Duration::from_secs(20))
                .await,
            "mDNS found orders"
        );
        assert!(
            a.wait_for_instances("accounts", 1, Duration::from_secs(20))
                .await
        );
        a.send("orders", "one")
            .await
            .expect("send")
            .acked()
            .await
            .expect("acked");
        assert_eq!(got.recv().await.map(|m| m.1).as_deref(), Some("one"));
        let echo = a
            .request("accounts", "ping", Duration::from_secs(5))
            .await
            .expect("reply");
        assert_eq!(&echo[..], b"ping");

        // Restart orders: found again without restarting anyone else.
        b.shutdown().await;
        drop(got);
        let r = a.send("orders", "two").await.expect("stored while down");
        let b = start(mdns_builder(&mesh, "orders", &key).data_dir(dir.path())).await;
        let mut got = collect(&b);
        tokio::time::timeout(Duration::from_secs(30), r.acked())
            .await
            .expect("restarted node rediscovered")
            .expect("acked");
        assert_eq!(got.recv().await.map(|m| m.1).as_deref(), Some("two"));
        for n in [a, b, c] {
            n.shutdown().await;
        }
    })
    .await;
}

/// A node of `service` in `mesh` on 127.0.0.1, with mDNS off: it finds peers by seeds only.
fn loopback_node(mesh: &str, key: &MeshKey, service: &str) -> NodeBuilder {
    Node::builder(service)
        .mesh(mesh)
        .mesh_key(key.clone())
        .listen("127.0.0.1:0".parse().expect("addr"))
        .no_mdns()
}

/// An `orders` node without discovery and a `payments` node (its builder passed through
/// `client` first) that knows only the other's address, as a seed; returned once connected.
async fn seeded_pair(mesh: &str, client: impl FnOnce(NodeBuilder) -> NodeBuilder) -> (Node, Node) {
    let key = MeshKey::generate();
    let node = |service: &str| loopback_node(mesh, &key, service);
    let server = start(node("orders")).await;
    let client = start(client(node("payments")).seed(server.local_addr())).await;
    assert!(
        client
            .wait_for_instances("orders", 1, Duration::from_secs(10))
            .await,
        "seed dialed"
    );
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_seeds_typed_payloads_headers_and_scheduled_delivery() {
    within(60, async {
        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Order {
            id: u64,
            items: Vec<String>,
        }
        // No discovery at all on the server; the client knows only its address.
        let (server, client) = seeded_pair("seeds", |b| b).await;
        let (tx, mut rx) = mpsc::channel(16);
        tokio::spawn(server.messages().expect("messages").handle(2, move |m| {
            let tx = tx.clone();
            async move {
                tx.send(m).await.ok();
                Ok::<(), HandlerError>(())
            }
        }));
        let order = Order {
            id: 7,
            items: vec!["sku-1".into()],
        };
        let msg = Outgoing::encode(&order)
            .expect("encode")
            .header("traceparent", "00-abc-def-01")
            .key("7");
        client
            .send("orders", msg)
            .await
            .expect("send")
            .acked()
            .await
            .expect("acked");
        let got = rx.recv().await.expect("message");
        assert_eq!(got.decode::<Order>().expect("decode"), order);
        assert_eq!(got.header("traceparent"), Some("00-abc-def-01"));
        assert_eq!(got.from(), client.id());
        let json = Outgoing::json(&order).expect("json");
        client
            .send("orders", json)
            .await
            .expect("send")
            .acked()
            .await
            .expect("acked");
        assert_eq!(
            rx.recv()
                .await
                .expect("message")
                .json::<Order>()
                .expect("json"),
            order
        );

        // Scheduled delivery: not before its time.
        let t0 = std::time::Instant::now();
        let r = client
            .send(
                "orders",
                Outgoing::new("later").deliver_after(Duration::from_millis(600)),
            )
            .await
            .expect("send");
        r.acked().await.expect("acked");
        assert!(
            t0.elapsed() >= Duration::from_millis(550),
            "delivered early: {:?}",
            t0.elapsed()
        );
        assert_eq!(rx.recv().await.expect("message").payload_text(), "later");
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_message_through_services() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let web = start(builder(&net, "web", &key)).await;
        let orders = start(builder(&net, "orders", &key)).await;
        let billing = start(builder(&net, "billing", &key)).await;
        // orders forwards what it handles to billing and asks billing a question.
        let fwd = orders.clone();
        tokio::spawn(orders.messages().expect("messages").handle(2, move |m| {
            let fwd = fwd.clone();
            async move {
                let r = fwd
                    .send("billing", m.payload().clone())
                    .await
                    .map_err(HandlerError::retry)?;
                drop(r);
                // A failed request (billing not known yet) retries the message, and with it
                // the request, instead of leaving the test waiting for a request never made.
                fwd.request("billing", "price?", Duration::from_secs(2))
                    .await
                    .map_err(HandlerError::retry)?;
                Ok::<(), HandlerError>(())
            }
        }));
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(billing.messages().expect("messages").handle(2, move |m| {
            let tx = tx.clone();
            async move {
                tx.send(m.trace_context()).await.ok();
                Ok::<(), HandlerError>(())
            }
        }));
        let (rtx, mut rrx) = mpsc::channel(4);
        billing
            .serve(move |req| {
                let rtx = rtx.clone();
                async move {
                    rtx.send(req.trace_context()).await.ok();
                    Ok("9.99".into())
                }
            })
            .await
            .expect("serve");
        assert!(
            web.wait_for_instances("orders", 1, Duration::from_secs(10))
                .await
        );
        assert!(
            orders
                .wait_for_instances("billing", 1, Duration::from_secs(10))
                .await
        );
        // The first hop starts a trace of its own.
        let root = peerbus::trace::TraceContext::new_root();
        let msg = Outgoing::new("order-9")
            .header("traceparent", root.traceparent())
            .header("tracestate", "vendor=1");
        web.send("orders", msg)
            .await
            .expect("send")
            .acked()
            .await
            .expect("acked");
        let at_billing = rx
            .recv()
            .await
            .expect("forwarded")
            .expect("trace context carried");
        assert_eq!(
            at_billing.trace_id, root.trace_id,
            "same trace two hops later"
        );
        assert_ne!(at_billing.span_id, root.span_id, "each hop is a new span");
        assert_eq!(at_billing.state.as_deref(), Some("vendor=1"));
        let at_serve = rrx
            .recv()
            .await
            .expect("request")
            .expect("trace context carried");
        assert_eq!(at_serve.trace_id, root.trace_id, "requests carry it too");
        // Outside any handler, a send starts a new trace.
        let fresh = Outgoing::new("standalone");
        web.send("orders", fresh)
            .await
            .expect("send")
            .acked()
            .await
            .expect("acked");
        let other = rx.recv().await.expect("forwarded").expect("stamped");
        assert_ne!(other.trace_id, root.trace_id);
        for n in [web, orders, billing] {
            n.shutdown().await;
        }
    })
    .await;
}

/// A payload and the trace context it was handled with.
type Seen = (String, Option<TraceContext>);

/// The trace contexts `what` was handled with at orders and then at billing.
async fn hop(
    at_orders: &mut mpsc::Receiver<Seen>,
    at_billing: &mut mpsc::Receiver<Seen>,
    what: &str,
) -> (Option<TraceContext>, Option<TraceContext>) {
    let (p, at_o) = at_orders.recv().await.expect("handled by orders");
    assert_eq!(p, what);
    let (p, at_b) = at_billing.recv().await.expect("forwarded to billing");
    assert_eq!(p, what);
    (at_o, at_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_starts_no_traces_still_continues_one() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let quiet = start(builder(&net, "web", &key).start_traces(false)).await;
        let tracing = start(builder(&net, "api", &key)).await;
        let orders = start(builder(&net, "orders", &key).start_traces(false)).await;
        let billing = start(builder(&net, "billing", &key)).await;
        // orders records the trace of what it handles and forwards it to billing.
        let record = |node: &Node, tx: mpsc::Sender<Seen>, forward: Option<Node>| {
            node.messages().expect("messages").handle(1, move |m| {
                let (tx, forward) = (tx.clone(), forward.clone());
                async move {
                    if let Some(f) = forward {
                        drop(
                            f.send("billing", m.payload().clone())
                                .await
                                .map_err(HandlerError::retry)?,
                        );
                    }
                    tx.send((m.payload_text(), m.trace_context())).await.ok();
                    Ok::<(), HandlerError>(())
                }
            })
        };
        let (otx, mut at_orders) = mpsc::channel(8);
        let (btx, mut at_billing) = mpsc::channel(8);
        tokio::spawn(record(&orders, otx, Some(orders.clone())));
        tokio::spawn(record(&billing, btx, None));
        for (n, service) in [
            (&quiet, "orders"),
            (&tracing, "orders"),
            (&orders, "billing"),
        ] {
            assert!(
                n.wait_for_instances(service, 1, Duration::from_secs(10))
                    .await
            );
        }
        // Sent outside any trace by a node that starts none: no trace, and none downstream.
        drop(quiet.send("orders", "plain").await.expect("send"));
        assert_eq!(
            hop(&mut at_orders, &mut at_billing, "plain").await,
            (None, None)
        );
        // With a traceparent of its own: carried, and continued by orders.
        let root = TraceContext::new_root();
        let msg = Outgoing::new("traced").header("traceparent", root.traceparent());
        drop(quiet.send("orders", msg).await.expect("send"));
        let (at_o, at_b) = hop(&mut at_orders, &mut at_billing, "traced").await;
        assert_eq!(at_o.expect("carried").trace_id, root.trace_id);
        assert_eq!(at_b.expect("continued").trace_id, root.trace_id);
        // A node with the default starts a trace, which orders continues too.
        drop(tracing.send("orders", "default").await.expect("send"));
        let (at_o, at_b) = hop(&mut at_orders, &mut at_billing, "default").await;
        let started = at_o.expect("a new trace");
        assert_eq!(at_b.expect("continued").trace_id, started.trace_id);
        for n in [quiet, tracing, orders, billing] {
            n.shutdown().await;
        }
    })
    .await;
}

/// A node of a service is an instance for `send` only while it takes its messages: sends wait
/// in the log while the only connected nodes of the service consume nothing, reach a node
/// once it takes its `messages()`, never go to a node that does not, and stop going to one
/// whose stream was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_nodes_that_take_their_messages_are_instances() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let sender = start(builder(&net, "payments", &key)).await;
        let idle = start(builder(&net, "orders", &key)).await;
        let busy = start(builder(&net, "orders", &key)).await;
        // (consumes, delivered_to) of `node` as the sender sees it.
        let seen = |node: &Node| {
            let (id, sender) = (node.id(), sender.clone());
            async move {
                let peers = sender.peers().await;
                let p = peers
                    .iter()
                    .find(|p| p.node_id == id)
                    .expect("a known peer");
                (p.consumes, p.delivered_to)
            }
        };
        assert!(
            sender
                .wait_for_instances("orders", 2, Duration::from_secs(10))
                .await
        );
        assert_eq!(seen(&idle).await, (false, 0));
        assert_eq!(seen(&busy).await, (false, 0));
        assert!(sender.consumers("orders").await.is_empty());
        assert!(
            !sender
                .wait_for_consumers("orders", 1, Duration::from_millis(200))
                .await,
            "connected nodes that take no messages are not consumers"
        );
        // Woken by busy taking its messages (the change, not a poll, ends the wait).
        let waiter = {
            let sender = sender.clone();
            tokio::spawn(async move {
                sender
                    .wait_for_consumers("orders", 1, Duration::from_secs(10))
                    .await
            })
        };
        let early = sender.send("orders", "early").await.expect("send");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let st = sender.status().await.expect("status");
        assert_eq!(st.logs["svc:orders"].waiting, 1, "waits for a consumer");

        let mut got = collect(&busy);
        assert!(waiter.await.expect("waiter"), "busy became a consumer");
        assert_eq!(sender.consumers("orders").await, vec![busy.id()]);
        early
            .acked()
            .await
            .expect("handled once busy takes its messages");
        assert_eq!(got.recv().await.expect("message").1, "early");
        assert!(seen(&busy).await.0, "busy consumes");
        let mut receipts = Vec::new();
        for i in 0..100 {
            receipts.push(sender.send("orders", format!("{i}")).await.expect("send"));
        }
        for r in receipts {
            r.acked().await.expect("acked");
        }
        for _ in 0..100 {
            got.recv().await.expect("every message reached busy");
        }
        assert_eq!(seen(&idle).await, (false, 0), "nothing went to idle");

        let stream = idle.messages().expect("messages");
        assert!(
            sender
                .wait_for_consumers("orders", 2, Duration::from_secs(10))
                .await,
            "idle consumes"
        );
        assert!(seen(&idle).await.0);
        drop(stream);
        eventually(10, "idle with its stream dropped does not", || async {
            !seen(&idle).await.0
        })
        .await;
        assert_eq!(sender.consumers("orders").await, vec![busy.id()]);
        assert_eq!(sender.instances("orders").await.len(), 2);
        let mut receipts = Vec::new();
        for i in 100..150 {
            receipts.push(sender.send("orders", format!("{i}")).await.expect("send"));
        }
        for r in receipts {
            r.acked().await.expect("acked");
        }
        assert_eq!(seen(&idle).await, (false, 0), "nothing went to idle");
        for node in [sender, idle, busy] {
            node.shutdown().await;
        }
    })
    .await;
}

/// A seed peer lost without a goodbye (here a partition that outlasts the idle timeout) is
/// redialed by one loop: the seed's. The per-peer redial of an advertised peer used to run
/// beside it, and the two connections they made once the partition healed met in a
/// tie-break that retired one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_lost_to_a_partition_is_redialed_once() {
    within(60, async {
        let faults = Faults::new(11);
        let (server, client) = seeded_pair("seed-redial", |b| b.faults(faults.clone())).await;
        for round in 0..2 {
            faults.partition(server.local_addr());
            // The idle timeout (3 s) ends the connection; the partition lasts until it has.
            eventually(15, "the partition cut the connection", || async {
                client.instances("orders").await.is_empty()
            })
            .await;
            faults.heal_all();
            assert!(
                client
                    .wait_for_instances("orders", 1, Duration::from_secs(15))
                    .await,
                "seed redialed in round {round}"
            );
            // Long enough for a second dial loop's backoff to come round.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let retired = client.status().await.expect("status").connections_retired;
            assert_eq!(retired, 0, "connections retired by round {round}");
        }
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// A DNS name's records are the seeds: a node that joins them is dialed at the next
/// resolution, and one that left them is not redialed once its connection is lost (its state
/// reads `Gone`, and it stays unconnected after the network heals), where a static seed's
/// loop would dial it for as long as the node runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_seeds_follow_the_records() {
    within(60, async {
        let key = MeshKey::generate();
        let node = |service: &str| loopback_node("dns-seeds", &key, service);
        let first = start(node("orders")).await;
        let second = start(node("orders")).await;
        let records = Arc::new(Mutex::new(vec![first.local_addr()]));
        let dns = dns_records(&records);
        let faults = Faults::new(12);
        let client = start(node("payments").discovery(dns).faults(faults.clone())).await;
        assert!(
            client
                .wait_for_instances("orders", 1, Duration::from_secs(10))
                .await,
            "the first record dialed"
        );

        // A headless service lists the node itself too: it does not become its own peer.
        records.lock().expect("records").push(client.local_addr());
        records.lock().expect("records").push(second.local_addr());
        assert!(
            client
                .wait_for_instances("orders", 2, Duration::from_secs(10))
                .await,
            "a node that joined the records dialed"
        );
        // It dialed itself once, closed that connection before the hello, and stopped there:
        // before, its accepting side refused itself as a protocol violation, and the seed
        // loop dialed again and again.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let normal = closed(&client, "normal").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(closed(&client, "protocol_violation").await, 0);
        assert_eq!(
            closed(&client, "normal").await,
            normal,
            "dialed itself again"
        );

        // The first node leaves the records, then its connection is lost (the idle timeout,
        // 3 s, ends it): it is not dialed again, not even once the network heals.
        records
            .lock()
            .expect("records")
            .retain(|a| *a != first.local_addr());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let gone = first.id();
        faults.partition(first.local_addr());
        let state = || async {
            client
                .peers()
                .await
                .into_iter()
                .find(|p| p.node_id == gone)
                .map(|p| p.state)
        };
        eventually(15, "the node that left the records is gone", || async {
            state().await == Some(PeerState::Gone)
        })
        .await;
        faults.heal_all();
        // Longer than a seed loop's first redial (backoff from 100 ms).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(state().await, Some(PeerState::Gone), "redialed");
        assert_eq!(client.instances("orders").await.len(), 1);
        let peers = client.peers().await;
        assert!(peers.iter().all(|p| p.node_id != client.id()), "{peers:?}");
        client.shutdown().await;
        first.shutdown().await;
        second.shutdown().await;
    })
    .await;
}

/// A DNS discovery of one name whose records are `records` at each resolution (every 100 ms).
fn dns_records(records: &Arc<Mutex<Vec<SocketAddr>>>) -> DnsDiscovery {
    let records = records.clone();
    DnsDiscovery::new(["orders.shop.svc.cluster.local:7000"])
        .refresh(Duration::from_millis(100))
        .with_resolver(move |_name| {
            let addrs = records.lock().expect("records").clone();
            async move { Ok(addrs) }
        })
}

/// A node that restarts at a new address (same identity, from its data directory) is known
/// at the new one only once the old one leaves the records, even when the new record came
/// first and the node was reached there: a seed that goes takes its address off every peer,
/// so a node's addresses do not pile up as it moves again and again (each was redialed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_moved_is_known_at_its_new_address_only() {
    within(60, async {
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        let node = |service: &str| loopback_node("dns-moves", &key, service);
        let server = start(node("orders").data_dir(dir.path())).await;
        let (id, old) = (server.id(), server.local_addr());
        let records = Arc::new(Mutex::new(vec![old]));
        let client = start(node("payments").discovery(dns_records(&records))).await;
        assert!(
            client
                .wait_for_instances("orders", 1, Duration::from_secs(10))
                .await
        );
        server.shutdown().await;
        let server = start(node("orders").data_dir(dir.path())).await;
        let new = server.local_addr();
        assert_eq!(server.id(), id, "the same identity");
        records.lock().expect("records").push(new);
        let addrs = || async {
            let peers = client.peers().await;
            peers.into_iter().find(|p| p.node_id == id).map(|p| p.addrs)
        };
        eventually(10, "reached at the new address", || async {
            client.instances("orders").await.len() == 1
                && addrs().await.is_some_and(|a| a.contains(&new))
        })
        .await;
        records.lock().expect("records").retain(|a| *a != old);
        eventually(10, "known at the new address only", || async {
            addrs().await == Some(vec![new])
        })
        .await;
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// Reports `gone` peers that come up and go (no address: nothing to dial), then `last`: what
/// a node sees over months of containers that start with fresh identities.
struct Churn {
    gone: u32,
    last: PeerRecord,
}

impl Discovery for Churn {
    fn start(
        &mut self,
        _local: PeerRecord,
        events: mpsc::Sender<DiscoveryEvent>,
    ) -> Result<(), DiscoveryError> {
        let (gone, last) = (self.gone, self.last.clone());
        tokio::spawn(async move {
            for i in 0..gone {
                let mut id = [0xee; 32];
                id[..4].copy_from_slice(&i.to_le_bytes());
                let record = PeerRecord {
                    node_id: NodeId::from_bytes(id),
                    addrs: Vec::new(),
                    ..last.clone()
                };
                let _ = events.send(DiscoveryEvent::Up(record)).await;
                let _ = events
                    .send(DiscoveryEvent::Down(NodeId::from_bytes(id)))
                    .await;
            }
            let _ = events.send(DiscoveryEvent::Up(last)).await;
        });
        Ok(())
    }

    fn stop(&mut self) {}

    fn name(&self) -> &'static str {
        "churn"
    }
}

/// A node that saw more peers come and go than it remembers (4,096) still takes a new one:
/// a gone peer makes room. Before, it ignored every peer discovered once the map was full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_long_gone_make_room_for_new_ones() {
    within(60, async {
        let key = MeshKey::generate();
        let server = start(loopback_node("churn", &key, "orders")).await;
        let last = PeerRecord {
            node_id: server.id(),
            service: "orders".into(),
            mesh: "churn".into(),
            protocol_version: PROTOCOL_VERSION,
            addrs: vec![server.local_addr()],
        };
        let churn = Churn { gone: 5_000, last };
        let client = start(loopback_node("churn", &key, "payments").discovery(churn)).await;
        assert!(
            client
                .wait_for_instances("orders", 1, Duration::from_secs(20))
                .await,
            "the peer discovered after 5,000 gone ones was ignored"
        );
        let known = client.peers().await.len();
        assert!(known <= 4_096, "{known} peers known");
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// Connections `node` closed with `code` since it started.
async fn closed(node: &Node, code: &str) -> u64 {
    let status = node.status().await.expect("status");
    status.connections_closed.get(code).copied().unwrap_or(0)
}

/// `NodeBuilder::dns_seed` resolves with the system's resolver (`localhost` from the hosts
/// file), and refuses at start a name that is not `host:port`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_seed_resolves_with_the_system_resolver() {
    within(60, async {
        let key = MeshKey::generate();
        let node = |service: &str| loopback_node("dns-seed", &key, service);
        let server = start(node("orders")).await;
        let port = server.local_addr().port();
        let client = start(node("payments").dns_seed(format!("localhost:{port}"))).await;
        assert!(
            client
                .wait_for_instances("orders", 1, Duration::from_secs(10))
                .await,
            "localhost:{port} dialed"
        );
        let refused = node("payments").dns_seed("orders.shop").start().await;
        let Err(error) = refused else {
            panic!("a node started with a DNS seed without a port");
        };
        let error = error.to_string();
        assert!(error.contains("orders.shop"), "{error}");
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// Core's timer ticks a node made over `window`.
async fn ticks_over(node: &Node, window: Duration) -> u64 {
    let before = node.status().await.expect("status").core_ticks;
    tokio::time::sleep(window).await;
    node.status().await.expect("status").core_ticks - before
}

/// An idle node's core ticks once a second instead of every 50 ms, and whatever needs the
/// ticks brings the fast pace back at once: a request in flight (which its caller puts in the
/// request table without core), an entry waiting for a consumer, and with
/// `Durability::Interval` a write not yet synced. Over a window of 1.2 s the slow pace makes
/// at most 2 ticks and the fast one about 24; the bounds (at most 4, at least 8) leave room
/// for a busy machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_node_ticks_slowly_and_timed_work_brings_the_fast_ticks_back() {
    within(90, async {
        const WINDOW: Duration = Duration::from_millis(1200);
        let (slow, fast) = (4, 8);
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        let server = start(builder(&net, "hold", &key)).await;
        let (release, held) = tokio::sync::watch::channel(false);
        let (arrived_tx, mut arrived) = mpsc::channel::<()>(1);
        server
            .serve(move |_req| {
                let mut held = held.clone();
                let arrived = arrived_tx.clone();
                async move {
                    let _ = arrived.try_send(());
                    let _ = held.wait_for(|go| *go).await;
                    Ok("done".into())
                }
            })
            .await
            .expect("serve");
        assert!(
            client
                .wait_for_instances("hold", 1, Duration::from_secs(10))
                .await
        );

        eventually(20, "the client ticks slowly once idle", || async {
            ticks_over(&client, WINDOW).await <= slow
        })
        .await;

        // A request in flight: its caller started it; core learns of it from the table only.
        let call = {
            let client = client.clone();
            tokio::spawn(async move { client.request("hold", "x", Duration::from_secs(30)).await })
        };
        arrived
            .recv()
            .await
            .expect("the request reached its handler");
        let with_request = ticks_over(&client, WINDOW).await;
        assert!(
            with_request >= fast,
            "{with_request} ticks in {WINDOW:?} with a request in flight"
        );
        let _ = release.send(true);
        let reply = call.await.expect("join").expect("the reply");
        assert_eq!(&reply[..], b"done");
        let _ = release.send(false);
        eventually(20, "the client ticks slowly again", || async {
            ticks_over(&client, WINDOW).await <= slow
        })
        .await;
        // The first request while the client ticks slowly wakes its core: the request's
        // deadline is swept on the fast tick, so soon after its caller's timeout it is gone
        // from the table. (Reading `status` wakes core too, so this looks only after the
        // deadline.) Each round starts 200 ms after the last sweep, when core has gone back to
        // its slow tick; had that tick stayed, the next one would come about 800 ms into the
        // round, after the look at 500 ms.
        for round in 0..4 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let err = client
                .request("hold", "x", Duration::from_millis(300))
                .await
                .expect_err("the handler holds it");
            assert!(matches!(err, RequestError::Timeout { .. }), "{err}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            let left = client.status().await.expect("status").requests_in_flight;
            assert_eq!(
                left, 0,
                "round {round}: the timed-out request is still in the table"
            );
        }
        let _ = release.send(true);

        // An entry waiting for a consumer that is not there.
        let _waiting = client.send("absent", "x").await.expect("send");
        let with_entry = ticks_over(&client, WINDOW).await;
        assert!(
            with_entry >= fast,
            "{with_entry} ticks in {WINDOW:?} with an entry waiting"
        );

        // With `Durability::Interval`, a write waits for the tick's sync (at most every 5 s
        // here): until then the node ticks fast, though its one entry is settled.
        let dir = tempfile::tempdir().expect("tempdir");
        let solo = start(
            builder(&net, "solo", &key)
                .data_dir(dir.path())
                .durability(peerbus::Durability::Interval(Duration::from_secs(5))),
        )
        .await;
        let mut handled = common::drain(solo.messages().expect("messages"));
        let receipt = solo.send("solo", "x").await.expect("send");
        handled.recv().await.expect("handled");
        receipt.acked().await.expect("acked");
        let unsynced = ticks_over(&solo, WINDOW).await;
        assert!(
            unsynced >= fast,
            "{unsynced} ticks in {WINDOW:?} with a write not yet synced"
        );
        eventually(20, "the durable node ticks slowly once synced", || async {
            ticks_over(&solo, WINDOW).await <= slow
        })
        .await;
        solo.shutdown().await;
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// A failed entry's key stays in order when the consumer's queue is deep: the entries of the
/// key it refused while it waited for the failed one are refused only when its worker reaches
/// them, after the sender has already sent the failed entry again and, thinking the refused
/// ones still in flight, newer entries of the key behind it. Those newer entries must wait for
/// the refused ones' return. (A block that ended with the failed entry's return let them
/// overtake; the engine simulation found it first.) One worker handles two keys: `slow`
/// (20 ms each) keeps the queue deep while `k` flows, and `k`'s third message fails once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_key_keeps_its_order_behind_a_deep_queue() {
    within(60, async {
        const MESSAGES: usize = 60;
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let sender = start(
            builder(&net, "web", &key)
                .retry_backoff(Duration::from_millis(5), Duration::from_millis(20)),
        )
        .await;
        let receiver = start(builder(&net, "orders", &key)).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let seen = order.clone();
        tokio::spawn(receiver.messages().expect("messages").handle(1, move |m| {
            let seen = seen.clone();
            async move {
                if m.key() == Some("slow") {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return Ok(());
                }
                let n: usize = m.payload_text().parse().expect("a number");
                if n == 2 && m.attempt() == 1 {
                    return Err(HandlerError::Retry("failing once on purpose".into()));
                }
                seen.lock().expect("lock").push(n);
                Ok(())
            }
        }));
        assert!(
            sender
                .wait_for_instances("orders", 1, Duration::from_secs(10))
                .await
        );
        for n in 0..MESSAGES {
            // The receipts are dropped: the entries stay in the log until handled.
            let _k = sender
                .send("orders", Outgoing::new(n.to_string()).key("k"))
                .await
                .expect("send k");
            let _slow = sender
                .send("orders", Outgoing::new("x").key("slow"))
                .await
                .expect("send slow");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eventually(40, "every message of k handled", || async {
            let seen = order.lock().expect("lock");
            (0..MESSAGES).all(|n| seen.contains(&n))
        })
        .await;
        let seen = order.lock().expect("lock").clone();
        let mut firsts = Vec::new();
        for n in seen {
            if !firsts.contains(&n) {
                firsts.push(n);
            }
        }
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "key k handled out of order: {firsts:?}"
        );
        sender.shutdown().await;
        receiver.shutdown().await;
    })
    .await;
}
