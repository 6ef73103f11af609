//! What a node accepts from peers made by hand from the transport and the wire types, as
//! another build (older, newer, buggy or hostile) would be: everything binds 127.0.0.1 and
//! discovery is in memory.
//!
//! - A peer delivers messages only as itself: a message whose envelope names another node as
//!   its origin would have its ack sent to that node (settling that node's entry of the same
//!   seq) and would make the receiver drop that node's real message of that seq as a
//!   duplicate. The receiver closes such a connection and handles nothing of it.
//! - A consumer that stops reading is closed as unresponsive once the node's outgoing queue
//!   to it is full, and what it held goes to another instance.
//! - A request stream (protocol 6) carries one request and its reply: anything else on it,
//!   either way, closes the connection. From protocol 7 it carries requests one after
//!   another, each answered on it, until the requester ends it.
//! - Versions: a build of protocol 4 (its own ALPN id and hello) and a later build that still
//!   speaks this one's version are served; a peer with no version in common is refused.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::handmade::{HandMade, push_delivery, push_request};
use common::{builder, start, within};
use peerbus::engine::wire::{
    ALPN_NEGOTIATED, ALPN_V4, Control, ControlV4, Data, Dialect, Hello, Interest, MAX_ACK_RUN_SEQS,
};
use peerbus::{
    Bytes, CloseCode, HandlerError, MemoryNetwork, MeshKey, Node, NodeId, Outgoing,
    PROTOCOL_VERSION, Receipt, RequestError, Subscription,
};
use tokio::sync::{Semaphore, mpsc};

/// Handles `orders`'s messages, reporting each one's origin, seq and text.
fn report_handled(orders: &Node) -> mpsc::Receiver<(NodeId, u64, String)> {
    let (tx, handled) = mpsc::channel(16);
    let messages = orders.messages().expect("messages");
    tokio::spawn(messages.handle(1, move |m| {
        let tx = tx.clone();
        async move {
            tx.send((m.from(), m.id().seq, m.payload_text())).await.ok();
            Ok::<(), HandlerError>(())
        }
    }));
    handled
}

/// Connections `node` closed for a protocol violation so far (its status).
/// Connections `node` closed for a protocol violation, as its status shows them, checked
/// against the direct reading [`Node::connections_closed`].
async fn violations(node: &Node) -> u64 {
    let status = node.status().await.expect("status");
    let shown = status.connections_closed["protocol_violation"];
    assert_eq!(
        node.connections_closed().get(CloseCode::ProtocolViolation),
        shown
    );
    shown
}

/// A hand-made peer of protocol 4: the ALPN id and hello of a protocol 4 build.
async fn v4_peer(key: &MeshKey, node: &Node) -> HandMade {
    let mut peer = HandMade::dial(key, node, ALPN_V4).await;
    match peer.hello_v4().await {
        Some(ControlV4::Hello(h)) => assert_eq!((h.node_id, h.version), (node.id(), 4)),
        None => panic!("the node sent no protocol 4 hello"),
    }
    peer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_under_another_nodes_id_closes_the_connection_unhandled() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let orders = start(builder(&net, "orders", &key)).await;
        let other = start(builder(&net, "payments", &key)).await;
        let mut handled = report_handled(&orders);

        // The seq `payments` gives its next message to `orders`.
        assert!(
            other
                .wait_for_consumers("orders", 1, Duration::from_secs(10))
                .await
        );
        let first = other.send("orders", "first").await.expect("send");
        let (_, first_seq, _) = handled.recv().await.expect("first handled");
        first.acked().await.expect("first acked");

        // A message under `payments`'s id with that seq: refused, the connection closed,
        // nothing handled. (Only protocol 4 puts the origin on the wire.)
        let forger = v4_peer(&key, &orders).await;
        assert_eq!(violations(&orders).await, 0);
        forger
            .deliver(Dialect::WithOrigin, other.id(), first_seq + 1, "forged")
            .await;
        // The node closes a connection that delivers under another id, and counts it.
        forger.closed_with("another origin").await;
        assert_eq!(violations(&orders).await, 1);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), handled.recv())
                .await
                .is_err(),
            "a message under another node's id was handled"
        );
        // So `payments`'s real message of that seq is not taken for a duplicate of it.
        let receipt = other.send("orders", "real").await.expect("send");
        let (from, seq, text) = handled.recv().await.expect("real handled");
        assert_eq!(
            (from, seq, text.as_str()),
            (other.id(), first_seq + 1, "real")
        );
        receipt.acked().await.expect("acked");

        // As itself: handled and acknowledged (the hand-made peer speaks the protocol right).
        let mut honest = v4_peer(&key, &orders).await;
        let own_id = honest.endpoint.node_id();
        honest
            .deliver(Dialect::WithOrigin, own_id, 7, "honest")
            .await;
        let (from, seq, text) = handled.recv().await.expect("handled");
        assert_eq!((from, seq, text.as_str()), (own_id, 7, "honest"));
        let (log, seqs) = honest.next_ack().await;
        assert_eq!((log.as_str(), seqs), ("svc:orders", vec![7]));
        other.shutdown().await;
        orders.shutdown().await;
    })
    .await;
}

/// A later build that still speaks this one's version: it names a range reaching past it, the
/// node answers with its own range, and both speak the highest they share. Its envelopes leave
/// their origin out: the node takes the connection's peer as the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_build_speaks_the_highest_version_both_know() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let orders = start(builder(&net, "orders", &key)).await;
        let mut handled = report_handled(&orders);

        let mut newer = HandMade::dial(&key, &orders, ALPN_NEGOTIATED).await;
        let hello = newer
            .hello_negotiated(5, PROTOCOL_VERSION + 3)
            .await
            .expect("the node's hello");
        assert_eq!((hello.min_version, hello.version), (5, PROTOCOL_VERSION));
        assert_eq!(newer.conn.alpn(), ALPN_NEGOTIATED);
        let own_id = newer.endpoint.node_id();
        // The envelope's origin field is not sent: whatever it says, the origin is the peer.
        newer
            .deliver(Dialect::PeerOrigin, orders.id(), 3, "compact")
            .await;
        let (from, seq, text) = handled.recv().await.expect("handled");
        assert_eq!((from, seq, text.as_str()), (own_id, 3, "compact"));
        let (log, seqs) = newer.next_ack().await;
        assert_eq!((log.as_str(), seqs), ("svc:orders", vec![3]));
        let peers = orders.peers().await;
        let info = peers
            .iter()
            .find(|p| p.node_id == own_id)
            .expect("the hand-made peer is listed");
        assert_eq!(info.protocol, Some(PROTOCOL_VERSION));
        // Acks as runs: a frame naming more seqs than a node expands closes the connection.
        newer
            .ctl_tx
            .send(&Control::AckRuns {
                log: "svc:hand-made".into(),
                runs: vec![(1, MAX_ACK_RUN_SEQS + 1)],
            })
            .await
            .expect("ack runs");
        // The node closes a connection that acks too much at once.
        newer.closed_with("too many acks").await;
        orders.shutdown().await;
    })
    .await;
}

/// A request stream of protocol 7 carries requests one after another: the node answers each on
/// the stream, and ends its side once the requester has ended its own. On a connection of
/// protocol 6 the node answers the stream's one request and ends its side at once, as builds
/// of protocol 6 expect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stream_of_protocol_7_carries_requests_one_after_another() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let orders = start(builder(&net, "orders", &key)).await;
        orders
            .serve(|r| async move {
                if r.payload_text() == "wait" {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(r.payload().clone())
            })
            .await
            .expect("serve");
        let reply = |frame: Option<Data>, corr: u64, text: &str| match frame {
            Some(Data::Reply {
                corr: c,
                result: Ok(payload),
            }) if c == corr => assert_eq!(&payload[..], text.as_bytes()),
            other => panic!("wanted the reply {text:?} to {corr}, got {other:?}"),
        };
        for version in [7, 6] {
            let mut client = HandMade::dial(&key, &orders, ALPN_NEGOTIATED).await;
            assert!(
                client.hello_negotiated(5, version).await.is_some(),
                "the node's hello"
            );
            let own_id = client.endpoint.node_id();
            let (mut tx, mut rx) = client.conn.open_bi().await.expect("request stream");
            let decode = |body| Data::decode_from(body, Dialect::PeerOrigin, own_id);
            push_request(&mut tx, own_id, "orders", 1, "first");
            tx.flush().await.expect("written");
            reply(rx.recv_shared(decode).await.expect("read"), 1, "first");
            if version == 6 {
                let end = rx.recv_shared(decode).await.expect("read");
                assert!(end.is_none(), "protocol 6: the stream ends after its reply");
                continue;
            }
            // The same stream again: a handler that waits, then one that does not.
            for (corr, text) in [(2, "wait"), (3, "third")] {
                push_request(&mut tx, own_id, "orders", corr, text);
                tx.flush().await.expect("written");
                reply(rx.recv_shared(decode).await.expect("read"), corr, text);
            }
            tx.finish().await.expect("ended");
            let end = tokio::time::timeout(Duration::from_secs(10), rx.recv_shared(decode))
                .await
                .expect("the node ends its side");
            assert!(end.expect("read").is_none(), "nothing after the last reply");
            assert_eq!(violations(&orders).await, 0);
        }
        orders.shutdown().await;
    })
    .await;
}

/// A request stream (protocol 6) carries one request and its reply, nothing else. A node
/// closes the connection of a peer that writes anything but a request on a stream it opened,
/// or answers the node's own request with anything but a reply; that request then fails at
/// once as `PeerLost` instead of waiting for its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stream_carries_a_request_and_its_reply_and_nothing_else() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let orders = start(builder(&net, "orders", &key)).await;
        orders
            .serve(|r| async move { Ok(r.payload().clone()) })
            .await
            .expect("serve");

        // A delivery where the node serving requests reads a request.
        let mut client = HandMade::dial(&key, &orders, ALPN_NEGOTIATED).await;
        let hello = client.hello_negotiated(5, PROTOCOL_VERSION).await;
        assert_eq!(hello.expect("the node's hello").version, PROTOCOL_VERSION);
        assert_eq!(violations(&orders).await, 0);
        let own_id = client.endpoint.node_id();
        let (mut stream, _replies) = client.conn.open_bi().await.expect("request stream");
        push_delivery(&mut stream, Dialect::PeerOrigin, own_id, 1, "no request");
        stream.finish().await.expect("written");
        client
            .closed_with("not a request on a request stream")
            .await;
        assert_eq!(violations(&orders).await, 1);

        // A delivery where the node reads the reply to its own request.
        let mut server = HandMade::dial(&key, &orders, ALPN_NEGOTIATED).await;
        let hello = Hello {
            serves: true,
            ..server.hello(5, PROTOCOL_VERSION)
        };
        assert!(server.send_hello(hello).await.is_some(), "the node's hello");
        assert!(
            orders
                .wait_for_servers("hand-made", 1, Duration::from_secs(10))
                .await
        );
        // From a task: only a request made in one goes on a stream of its own.
        let requester = orders.clone();
        let request = tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            let result = requester
                .request("hand-made", "ping", Duration::from_secs(30))
                .await;
            (result, t0.elapsed())
        });
        let (mut stream, _request) = server.conn.accept_bi().await.expect("the request");
        let own_id = server.endpoint.node_id();
        push_delivery(&mut stream, Dialect::PeerOrigin, own_id, 1, "no reply");
        stream.finish().await.expect("written");
        server.closed_with("not a reply on a request stream").await;
        let (result, took) = request.await.expect("request task");
        assert!(
            matches!(result, Err(RequestError::PeerLost { .. })),
            "{result:?}"
        );
        assert!(took < Duration::from_secs(10), "failed only after {took:?}");
        assert_eq!(violations(&orders).await, 2);
        orders.shutdown().await;
    })
    .await;
}

/// A build whose versions all lie past this one's is refused with a reason, at the hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_no_version_in_common_is_refused() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let orders = start(builder(&net, "orders", &key)).await;
        let mut future = HandMade::dial(&key, &orders, ALPN_NEGOTIATED).await;
        let (min, max) = (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2);
        // The node answers the hello (the dialer speaks first), then closes.
        let _ = future.hello_negotiated(min, max).await;
        // The node closes a connection with no version in common.
        future.closed_with("unsupported protocol version").await;
        assert!(orders.peers().await.iter().all(|p| p.protocol.is_none()));
        orders.shutdown().await;
    })
    .await;
}

/// A consumer whose handler reports each message's seq, then waits for a permit of the gate
/// before it finishes.
fn gated(sub: Subscription) -> (mpsc::Receiver<u64>, Arc<Semaphore>) {
    let (seen_tx, seen) = mpsc::channel(4);
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    tokio::spawn(sub.handle(1, move |m| {
        let (seen_tx, gate) = (seen_tx.clone(), g.clone());
        async move {
            seen_tx.send(m.id().seq).await.ok();
            gate.acquire().await.map(|p| p.forget()).ok();
            Ok::<(), HandlerError>(())
        }
    }));
    (seen, gate)
}

/// Connects a hand-made peer to `node` with `hello` and acks `seq` of `log`, an entry the
/// gated handler holds: the node must close the connection, the receipt must not settle, and
/// it settles once the handler finishes.
async fn an_ack_is_refused(
    key: &MeshKey,
    node: &Node,
    hello: impl FnOnce(&HandMade) -> Hello,
    (log, seq): (&str, u64),
    receipt: Receipt,
    gate: &Semaphore,
) {
    let mut other = HandMade::dial(key, node, ALPN_NEGOTIATED).await;
    let hello = hello(&other);
    other.send_hello(hello).await.expect("the node's hello");
    let before = violations(node).await;
    other
        .ctl_tx
        .send(&Control::Ack {
            log: log.into(),
            seqs: vec![seq],
        })
        .await
        .expect("ack");
    // The node closes a connection that acks what it was never sent, and counts it.
    other.closed_with("never sent").await;
    assert_eq!(violations(node).await, before + 1);
    // Not settled by it: the receipt waits for the real consumer.
    let mut receipt = Box::pin(receipt.acked());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut receipt)
            .await
            .is_err(),
        "the receipt settled on the ack of a node that was never sent the entry"
    );
    gate.add_permits(1);
    receipt
        .await
        .expect("acked by the consumer that handled it");
}

/// `payments` sends one message to `orders`, whose gated handler holds it: the two nodes, the
/// gate, the receipt and the entry's seq.
async fn held_by_orders(
    net: &MemoryNetwork,
    key: &MeshKey,
) -> (Node, Node, Arc<Semaphore>, Receipt, u64) {
    let payments = start(builder(net, "payments", key)).await;
    let orders = start(builder(net, "orders", key)).await;
    let (mut seen, gate) = gated(orders.messages().expect("messages"));
    assert!(
        payments
            .wait_for_consumers("orders", 1, Duration::from_secs(10))
            .await
    );
    let receipt = payments.send("orders", "order-1").await.expect("send");
    let seq = seen.recv().await.expect("the consumer got it");
    (payments, orders, gate, receipt, seq)
}

/// A peer acknowledges only what it can have been sent: an ack of a service's entries from a
/// node of another service closes its connection and settles nothing, so the real consumer's
/// handler still runs and its ack settles the receipt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_of_another_services_entries_closes_the_connection_and_settles_nothing() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let (payments, orders, gate, receipt, seq) = held_by_orders(&net, &key).await;
        // A member of another service acks it.
        let hello = |h: &HandMade| h.hello(5, PROTOCOL_VERSION);
        an_ack_is_refused(&key, &payments, hello, ("svc:orders", seq), receipt, &gate).await;
        orders.shutdown().await;
        payments.shutdown().await;
    })
    .await;
}

/// The same for an instance of the right service that was never sent the entry (another
/// instance holds it): an entry may be acked only by the nodes it was sent to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_of_an_entry_another_instance_holds_closes_the_connection() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let (payments, orders, gate, receipt, seq) = held_by_orders(&net, &key).await;
        // A second `orders` instance, which was never sent it, acks it.
        let hello = |h: &HandMade| Hello {
            service: "orders".into(),
            ..h.hello(5, PROTOCOL_VERSION)
        };
        an_ack_is_refused(&key, &payments, hello, ("svc:orders", seq), receipt, &gate).await;
        orders.shutdown().await;
        payments.shutdown().await;
    })
    .await;
}

/// The same for a group, whose log goes to any node that subscribed to it: another member of
/// the group, which was never sent the entry, cannot settle it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_of_a_group_entry_sent_to_another_member_closes_the_connection() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let shop = start(builder(&net, "shop", &key)).await;
        let billing = start(builder(&net, "billing-svc", &key)).await;
        let sub = billing
            .subscribe_group("invoices.*", "billing")
            .await
            .expect("subscribe");
        let (mut seen, gate) = gated(sub);
        let receipt = published_to_a_group(&shop, "invoices.created").await;
        let seq = seen.recv().await.expect("the member got it");
        let hello = |h: &HandMade| Hello {
            interests: vec![Interest {
                pattern: "invoices.*".into(),
                group: Some("billing".into()),
            }],
            ..h.hello(5, PROTOCOL_VERSION)
        };
        an_ack_is_refused(&key, &shop, hello, ("grp:billing", seq), receipt, &gate).await;
        billing.shutdown().await;
        shop.shutdown().await;
    })
    .await;
}

/// Publishes to `topic` until the receipt covers a group (the publisher learns of the
/// subscriber's group a moment after it connects).
async fn published_to_a_group(node: &Node, topic: &str) -> Receipt {
    for _ in 0..200 {
        let r = node.publish(topic, "invoice-1").await.expect("publish");
        if r.copies() > 0 {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the publisher never learned of the group");
}

/// A consumer that stops reading: an `orders` instance made by hand that takes every
/// delivery its hello's credits allow (far more than a node would ask for) and never reads
/// one. Once QUIC's windows are full the node's writer to it waits, its outgoing queue
/// (`LINK_QUEUE`, 16,384 frames) fills, and the node closes the connection as unresponsive
/// (not a protocol fault) instead of queueing more. Nothing is lost: what was in flight to it
/// goes to the next instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_is_closed_and_its_messages_go_to_another_instance() {
    // 16 KiB messages past the 32 MiB the peer's flow control lets in (42.6 MB), then more
    // small ones than the outgoing queue holds.
    const BIG: usize = 2_600;
    const SMALL: usize = 17_000;
    within(120, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let payments = start(builder(&net, "payments", &key)).await;
        let mut stalled = HandMade::dial(&key, &payments, ALPN_NEGOTIATED).await;
        let hello = Hello {
            service: "orders".into(),
            consumes: true,
            credits: u32::MAX,
            ..stalled.hello(5, PROTOCOL_VERSION)
        };
        stalled.send_hello(hello).await.expect("the node's hello");
        assert!(
            payments
                .wait_for_consumers("orders", 1, Duration::from_secs(10))
                .await
        );

        let big = Bytes::from(vec![0x42u8; 16 * 1024]);
        let mut receipts = Vec::with_capacity(BIG + SMALL);
        for i in 0..BIG + SMALL {
            let msg = if i < BIG {
                Outgoing::new(big.clone())
            } else {
                Outgoing::new(format!("small {i}"))
            };
            receipts.push(payments.send("orders", msg).await.expect("send"));
        }
        // The node closes the connection (the reason is the close's), and counts it as
        // unresponsive, not as a protocol fault.
        stalled.closed_with("peer stopped reading").await;
        let closes = payments.connections_closed();
        assert_eq!(closes.get(CloseCode::Unresponsive), 1);
        assert_eq!(violations(&payments).await, 0);

        // A healthy instance gets every message: none was lost with the stalled one.
        let orders = start(builder(&net, "orders", &key)).await;
        let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = handled.clone();
        let messages = orders.messages().expect("messages");
        tokio::spawn(messages.handle(8, move |_| {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async { Ok::<(), HandlerError>(()) }
        }));
        for r in receipts {
            r.acked()
                .await
                .expect("acknowledged by the healthy instance");
        }
        assert!(handled.load(std::sync::atomic::Ordering::Relaxed) >= BIG + SMALL);
        orders.shutdown().await;
        payments.shutdown().await;
    })
    .await;
}
