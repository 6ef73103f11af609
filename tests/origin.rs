//! A peer delivers messages only as itself: a message whose envelope names another node as its
//! origin would have its ack sent to that node (settling that node's entry of the same seq) and
//! would make the receiver drop that node's real message of that seq as a duplicate. The
//! receiver closes such a connection and handles nothing of it.
//!
//! The peer here is made by hand from the transport and the wire types, as a buggy or hostile
//! build would be; everything binds 127.0.0.1 and discovery is in memory.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{builder, start, within};
use peerbus::engine::wire::{Control, Data, Envelope, Hello, Kind};
use peerbus::{Bytes, HandlerError, MemoryNetwork, MeshKey, Node, NodeId};
use peerbus_transport::{
    Connection, Endpoint, EndpointConfig, FrameReceiver, FrameSender, Identity, Membership,
};
use tokio::sync::mpsc;

/// A mesh member made by hand, connected to a node.
struct HandMade {
    /// Kept open while the peer is used.
    endpoint: Endpoint,
    conn: Connection,
    /// The control stream: kept open (closing it ends the connection), and read for acks.
    _ctl_tx: FrameSender,
    ctl_rx: FrameReceiver,
}

/// Dials `node` and exchanges hellos on the control stream, as a node would.
async fn hand_made_peer(key: &MeshKey, node: &Node) -> HandMade {
    let identity = Identity::generate().expect("identity");
    let config = EndpointConfig::new(
        identity,
        Membership::Key(key.clone()),
        "127.0.0.1:0".parse().expect("addr"),
    );
    let endpoint = Endpoint::bind(config).expect("bind");
    let conn = endpoint
        .connect(node.local_addr(), Some(node.id()))
        .await
        .expect("connect");
    let (mut tx, mut rx) = conn.open_bi().await.expect("control stream");
    let hello = Hello {
        version: peerbus_discovery::PROTOCOL_VERSION,
        node_id: endpoint.node_id(),
        service: "hand-made".into(),
        mesh: "test".into(),
        interests: Vec::new(),
        serves: false,
        credits: 16,
        incarnation: 1,
        consumes: false,
    };
    tx.send(&Control::Hello(hello)).await.expect("hello");
    match rx.recv::<Control>().await {
        Ok(Some(Control::Hello(h))) => assert_eq!(h.node_id, node.id()),
        other => panic!("expected the node's hello, got {other:?}"),
    }
    HandMade {
        endpoint,
        conn,
        _ctl_tx: tx,
        ctl_rx: rx,
    }
}

/// A delivery of one `orders` message with `origin` in its envelope, on a new lane of `conn`.
async fn deliver(conn: &Connection, origin: NodeId, seq: u64, text: &str) {
    let env = Envelope {
        origin,
        log: "svc:orders".into(),
        seq,
        kind: Kind::Send,
        destination: "orders".into(),
        key: None,
        headers: Vec::new(),
        content_type: None,
        created_at_ms: 0,
        attempt: 1,
        payload: Bytes::from(text.to_string()),
    };
    let frame = Data::Deliver {
        floor: seq,
        key_floor: None,
        env: Arc::new(env),
    };
    let mut lane = conn.open_uni().await.expect("lane");
    lane.send(&frame).await.expect("deliver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_under_another_nodes_id_closes_the_connection_unhandled() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let orders = start(builder(&net, "orders", &key)).await;
        let other = start(builder(&net, "payments", &key)).await;
        let (tx, mut handled) = mpsc::channel(16);
        let messages = orders.messages().expect("messages");
        tokio::spawn(messages.handle(1, move |m| {
            let tx = tx.clone();
            async move {
                tx.send((m.from(), m.id().seq, m.payload_text())).await.ok();
                Ok::<(), HandlerError>(())
            }
        }));

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
        // nothing handled.
        let forger = hand_made_peer(&key, &orders).await;
        deliver(&forger.conn, other.id(), first_seq + 1, "forged").await;
        let closed = tokio::time::timeout(Duration::from_secs(10), forger.conn.closed())
            .await
            .expect("the node closes a connection that delivers under another id");
        assert!(
            closed.to_string().contains("another origin"),
            "unexpected close: {closed}"
        );
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
        let mut honest = hand_made_peer(&key, &orders).await;
        let own_id = honest.endpoint.node_id();
        deliver(&honest.conn, own_id, 7, "honest").await;
        let (from, seq, text) = handled.recv().await.expect("handled");
        assert_eq!((from, seq, text.as_str()), (own_id, 7, "honest"));
        loop {
            match honest
                .ctl_rx
                .recv::<Control>()
                .await
                .expect("control frame")
            {
                Some(Control::Ack { log, seqs }) => {
                    assert_eq!((log.as_str(), seqs), ("svc:orders", vec![7]));
                    break;
                }
                Some(_) => {}
                None => panic!("control stream ended before the ack"),
            }
        }
        other.shutdown().await;
        orders.shutdown().await;
    })
    .await;
}
