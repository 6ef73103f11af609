//! A mesh in the middle of an upgrade: nodes held at protocol 4 (what the previous build
//! speaks: `max_protocol_version(4)` offers only its ALPN id and hello) and nodes of this build
//! exchange every kind of message, each pair at the highest version both speak. Everything
//! binds 127.0.0.1; discovery is in memory.

mod common;

use std::time::Duration;

use common::{builder, drain, eventually, start, within};
use peerbus::{
    HandlerError, MemoryNetwork, MeshKey, Node, NodeId, Outgoing, PROTOCOL_VERSION, PeerState,
    StartError,
};

/// The protocol version `node`'s connection to `peer` speaks, once connected.
async fn protocol(node: &Node, peer: NodeId) -> Option<u32> {
    node.peers()
        .await
        .into_iter()
        .find(|p| p.node_id == peer)
        .and_then(|p| p.protocol)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_and_new_nodes_exchange_every_kind_of_message() {
    within(90, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let old = start(builder(&net, "orders", &key).max_protocol_version(4)).await;
        let new = start(builder(&net, "payments", &key)).await;
        let newer = start(builder(&net, "accounts", &key)).await;
        let mut at_old = drain(old.messages().expect("messages"));
        let mut at_newer = drain(newer.messages().expect("messages"));
        old.serve(|r| async move { Ok(format!("old:{}", r.payload_text()).into()) })
            .await
            .expect("serve");
        newer
            .serve(|r| async move {
                let n: u64 = r.payload_text().parse().map_err(HandlerError::reject)?;
                Ok((n * 2).to_string().into())
            })
            .await
            .expect("serve");
        let group_old = drain(old.subscribe_group("pay.*", "audit").await.expect("sub"));
        let group_newer = drain(newer.subscribe_group("pay.*", "ledger").await.expect("sub"));
        for (a, b) in [(&old, &new), (&old, &newer), (&new, &newer)] {
            eventually(10, "connected", || async {
                protocol(a, b.id()).await.is_some() && protocol(b, a.id()).await.is_some()
            })
            .await;
        }
        // Each pair speaks the highest version both know, and both ends agree.
        assert_eq!(protocol(&old, new.id()).await, Some(4));
        assert_eq!(protocol(&new, old.id()).await, Some(4));
        assert_eq!(protocol(&newer, old.id()).await, Some(4));
        assert_eq!(protocol(&new, newer.id()).await, Some(PROTOCOL_VERSION));
        assert_eq!(protocol(&newer, new.id()).await, Some(PROTOCOL_VERSION));

        // Sends both ways across the version line, keyed, in order per key.
        let mut receipts = Vec::new();
        for i in 0..60 {
            let to_old = Outgoing::new(format!("{i}")).key(format!("k{}", i % 3));
            receipts.push(new.send("orders", to_old).await.expect("send"));
            let to_newer = Outgoing::new(format!("{i}")).key(format!("k{}", i % 3));
            receipts.push(old.send("accounts", to_newer).await.expect("send"));
        }
        for r in receipts {
            r.acked().await.expect("acked");
        }
        for rx in [&mut at_old, &mut at_newer] {
            let mut last = std::collections::HashMap::new();
            for _ in 0..60 {
                let (k, p) = rx.recv().await.expect("message");
                let n: i64 = p.parse().expect("number");
                let prev = last.insert(k.expect("key"), n).unwrap_or(-1);
                assert!(prev < n, "out of order: {prev} then {n}");
            }
        }

        // Requests both ways.
        let r = old
            .request("accounts", "21", Duration::from_secs(5))
            .await
            .expect("old asks newer");
        assert_eq!(&r[..], b"42");
        let r = newer
            .request("orders", "hi", Duration::from_secs(5))
            .await
            .expect("newer asks old");
        assert_eq!(&r[..], b"old:hi");

        // A publish from each side reaches the groups on both sides.
        eventually(10, "both groups known at both publishers", || async {
            let a = old.publish("pay.warmup", "w").await.expect("publish");
            let b = new.publish("pay.warmup", "w").await.expect("publish");
            a.copies() == 2 && b.copies() == 2
        })
        .await;
        for (publisher, text) in [(&old, "from-old"), (&new, "from-new")] {
            let r = publisher.publish("pay.done", text).await.expect("publish");
            r.acked().await.expect("every copy acked");
        }
        for mut rx in [group_old, group_newer] {
            let mut seen = Vec::new();
            while seen.len() < 2 {
                let (_, p) = rx.recv().await.expect("copy");
                if p != "w" {
                    seen.push(p);
                }
            }
            seen.sort();
            assert_eq!(seen, ["from-new", "from-old"]);
        }
        for n in [old, new, newer] {
            n.shutdown().await;
        }
    })
    .await;
}

/// Once a mesh is upgraded, `min_protocol_version(5)` keeps builds of protocol 4 out: both
/// ends see the other as refused, with "no protocol in common", while nodes of this build
/// still connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_past_the_upgrade_refuses_protocol_4() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let upgraded = start(builder(&net, "orders", &key).min_protocol_version(5)).await;
        let old = start(builder(&net, "payments", &key).max_protocol_version(4)).await;
        let new = start(builder(&net, "accounts", &key)).await;
        let refused = |node: &Node, peer: NodeId| {
            let node = node.clone();
            async move {
                node.peers().await.into_iter().any(|p| {
                    p.node_id == peer
                        && p.state == PeerState::Refused
                        && p.last_error
                            .as_deref()
                            .is_some_and(|e| e.contains("no protocol in common"))
                })
            }
        };
        eventually(20, "each side refuses the other", || async {
            refused(&upgraded, old.id()).await && refused(&old, upgraded.id()).await
        })
        .await;
        eventually(10, "the new node connected at 5", || async {
            protocol(&upgraded, new.id()).await == Some(PROTOCOL_VERSION)
        })
        .await;
        // `new` meets `old` on its own schedule: waiting for `upgraded` says nothing of it.
        eventually(10, "the new node connected to the old one at 4", || async {
            protocol(&new, old.id()).await == Some(4)
        })
        .await;
        for n in [upgraded, old, new] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_version_this_build_does_not_speak_fails_start() {
    let net = MemoryNetwork::new();
    let key = MeshKey::generate();
    let start_with = |min: u32, max: u32| {
        builder(&net, "orders", &key)
            .min_protocol_version(min)
            .max_protocol_version(max)
            .start()
    };
    for (min, max, field) in [
        (4, 3, "max_protocol_version"),
        (4, PROTOCOL_VERSION + 1, "max_protocol_version"),
        (3, PROTOCOL_VERSION, "min_protocol_version"),
        (PROTOCOL_VERSION, 4, "min_protocol_version"),
    ] {
        match start_with(min, max).await {
            Err(StartError::Config(e)) => assert!(e.contains(field), "{e}"),
            Err(e) => panic!("unexpected error for {min}..={max}: {e}"),
            Ok(_) => panic!("protocol versions {min}..={max} accepted"),
        }
    }
}
