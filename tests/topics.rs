//! Topics and subscriber groups: durable groups, ephemeral subscribers, group knowledge
//! shared between nodes, unsubscribe, and competing instances under churn.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{builder, drain, eventually, start, within};
use peerbus::{DeliveryError, HandlerError, MemoryNetwork, MeshKey, Node, Outgoing};
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_group_catches_up_and_a_late_publisher_keeps_its_copies() {
    within(90, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        let p1 = start(builder(&net, "payments", &key)).await;
        let audit = start(builder(&net, "audit", &key).data_dir(dir.path())).await;
        let sub = audit.subscribe("payment.>").await.expect("sub");
        let mut probes = drain(sub);
        eventually(10, "p1 learnt the audit group", || async {
            p1.publish("payment.probe", "p")
                .await
                .is_ok_and(|r| r.copies() == 1)
        })
        .await;
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(300), probes.recv()).await
        {}
        audit.shutdown().await;
        eventually(10, "audit gone", || async {
            p1.peers()
                .await
                .iter()
                .all(|p| p.service != "audit" || p.state != peerbus::PeerState::Connected)
        })
        .await;

        // A publisher that never met an audit instance starts now: it learns the group from p1.
        let p2 = start(builder(&net, "refunds", &key)).await;
        eventually(10, "p2 learnt the audit group by gossip", || async {
            p2.publish("payment.refunded", "r-probe")
                .await
                .is_ok_and(|r| r.copies() == 1)
        })
        .await;
        for i in 0..200 {
            let r1 = p1
                .publish(
                    "payment.succeeded",
                    Outgoing::new(format!("p1-{i}")).key("acct"),
                )
                .await
                .expect("publish");
            assert_eq!(r1.copies(), 1, "copy kept for the offline group");
            let r2 = p2
                .publish(
                    "payment.refunded",
                    Outgoing::new(format!("p2-{i}")).key("acct2"),
                )
                .await
                .expect("publish");
            assert_eq!(r2.copies(), 1);
        }
        // The group comes back: everything arrives, in order per publisher and key.
        let audit = start(builder(&net, "audit", &key).data_dir(dir.path())).await;
        let mut got = drain(audit.subscribe("payment.>").await.expect("sub"));
        let mut p1_seen = Vec::new();
        let mut p2_seen = Vec::new();
        while p1_seen.len() < 200 || p2_seen.len() < 200 {
            let (_, text) = tokio::time::timeout(Duration::from_secs(30), got.recv())
                .await
                .expect("in time")
                .expect("msg");
            if let Some(n) = text.strip_prefix("p1-") {
                p1_seen.push(n.parse::<u32>().expect("n"));
            } else if let Some(n) = text.strip_prefix("p2-") {
                p2_seen.push(n.parse::<u32>().expect("n"));
            }
        }
        assert_eq!(p1_seen, (0..200).collect::<Vec<_>>());
        assert_eq!(p2_seen, (0..200).collect::<Vec<_>>());
        for n in [p1, p2, audit] {
            n.shutdown().await;
        }
    })
    .await;
}

/// Publishes on `topic` until the tap receives a copy (interests travel asynchronously).
async fn wait_for_copy(
    publisher: &Node,
    tap: &mut mpsc::Receiver<(Option<String>, String)>,
    topic: &str,
) {
    for _ in 0..100 {
        let _ = publisher.publish(topic, "probe").await.expect("publish");
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), tap.recv()).await {
            return;
        }
    }
    panic!("the ephemeral subscriber never got a copy on {topic}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_subscribers_get_online_only_copies() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let publisher = start(builder(&net, "prices", &key)).await;
        let dash = start(builder(&net, "dashboard", &key)).await;
        let mut tap = drain(dash.subscribe_ephemeral("price.*").await.expect("sub"));
        wait_for_copy(&publisher, &mut tap, "price.warmup").await;
        let r = publisher
            .publish("price.eur", "1.07")
            .await
            .expect("publish");
        assert_eq!(r.copies(), 0, "ephemeral copies carry no receipt");
        loop {
            let (_, t) = tap.recv().await.expect("copy");
            if t == "1.07" {
                break;
            }
        }
        // The dashboard goes away: nothing is kept for it.
        dash.shutdown().await;
        eventually(10, "dashboard gone", || async {
            publisher.status().await.is_some_and(|s| s.connections == 0)
        })
        .await;
        for i in 0..50 {
            let _ = publisher
                .publish("price.eur", format!("{i}"))
                .await
                .expect("publish");
        }
        let st = publisher.status().await.expect("status");
        let kept: usize = st.logs.values().map(|l| l.waiting + l.in_flight).sum();
        assert_eq!(
            kept, 0,
            "no backlog for an ephemeral subscriber: {:?}",
            st.logs
        );
        let dash = start(builder(&net, "dashboard", &key)).await;
        let mut tap = drain(dash.subscribe_ephemeral("price.*").await.expect("sub"));
        wait_for_copy(&publisher, &mut tap, "price.usd").await;
        publisher.shutdown().await;
        dash.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_a_durable_group_releases_its_backlog_everywhere() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let publisher = start(builder(&net, "orders", &key)).await;
        let billing = start(builder(&net, "billing", &key)).await;
        // Subscribed but not consuming: copies stay unacknowledged.
        let _sub = billing.subscribe("order.created").await.expect("sub");
        eventually(10, "group known", || async {
            publisher.publish("order.probe.x", "p").await.is_ok()
                && publisher
                    .publish("order.created", "probe")
                    .await
                    .is_ok_and(|r| r.copies() == 1)
        })
        .await;
        // Nobody consumes: copies pile up for the group.
        let mut receipts = Vec::new();
        for i in 0..20 {
            receipts.push(
                publisher
                    .publish("order.created", format!("{i}"))
                    .await
                    .expect("publish"),
            );
        }
        billing
            .unsubscribe_group("billing")
            .await
            .expect("unsubscribe");
        for r in receipts {
            let e = r.acked().await.expect_err("released");
            assert!(matches!(e, DeliveryError::Released { .. }), "{e}");
        }
        let st = publisher.status().await.expect("status");
        assert!(
            st.logs
                .get("grp:billing")
                .is_none_or(|l| l.waiting + l.in_flight == 0)
        );
        let r = publisher
            .publish("order.created", "after")
            .await
            .expect("publish");
        assert_eq!(r.copies(), 0, "the group is forgotten");
        publisher.shutdown().await;
        billing.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_with_one_lost_and_one_added_keep_every_key_in_order() {
    within(180, async {
        const N: usize = 30_000;
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let sender = start(builder(&net, "payments", &key)).await;
        let seen: Arc<Mutex<Vec<(usize, String, u32)>>> = Arc::default();
        let spawn_instance = |tag: usize| {
            let seen = seen.clone();
            // A graceful leave must finish its acks within the grace, even on a busy
            // machine, or its last messages are handled twice.
            let b = builder(&net, "orders", &key).shutdown_grace(Duration::from_secs(5));
            async move {
                let node: Node = start(b).await;
                let seen2 = seen.clone();
                tokio::spawn(node.messages().expect("messages").handle(8, move |m| {
                    let seen = seen2.clone();
                    async move {
                        let k = m.key().unwrap_or("").to_string();
                        let i: u32 = m.payload_text().parse().expect("n");
                        seen.lock().expect("lock").push((tag, k, i));
                        Ok::<(), HandlerError>(())
                    }
                }));
                node
            }
        };
        let i1 = spawn_instance(1).await;
        let i2 = spawn_instance(2).await;
        let i3 = spawn_instance(3).await;
        assert!(
            sender
                .wait_for_consumers("orders", 3, Duration::from_secs(10))
                .await
        );
        let mut receipts = Vec::with_capacity(N);
        let mut i4 = None;
        for i in 0..N {
            let msg = Outgoing::new(format!("{i}")).key(format!("k{}", i % 200));
            receipts.push(sender.send("orders", msg).await.expect("send"));
            if i == N / 3 {
                i2.shutdown().await; // one instance leaves mid-run
            }
            if i == 2 * N / 3 {
                let joined = spawn_instance(4).await; // one joins
                // The new instance takes work before the rest of the run is sent.
                let id = joined.id();
                let s = &sender;
                eventually(10, "the new instance is a consumer", || async move {
                    s.consumers("orders").await.contains(&id)
                })
                .await;
                i4 = Some(joined);
            }
        }
        for r in receipts {
            r.acked().await.expect("acked");
        }
        let seen = seen.lock().expect("lock").clone();
        let mut count: HashMap<u32, u32> = HashMap::new();
        let mut per_key: HashMap<String, Vec<u32>> = HashMap::new();
        let mut by_instance: HashMap<usize, usize> = HashMap::new();
        for (tag, k, i) in &seen {
            *count.entry(*i).or_default() += 1;
            per_key.entry(k.clone()).or_default().push(*i);
            *by_instance.entry(*tag).or_default() += 1;
        }
        assert_eq!(count.len(), N, "every message handled");
        assert!(
            count.values().all(|c| *c == 1),
            "handled once each (graceful leave: no crash case)"
        );
        for (k, order) in &per_key {
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "key {k} out of order"
            );
        }
        assert!(
            by_instance.get(&4).copied().unwrap_or(0) > 0,
            "new instance got work: {by_instance:?}"
        );
        for tag in [1, 2, 3] {
            assert!(
                by_instance.get(&tag).copied().unwrap_or(0) > 0,
                "instance {tag} got work: {by_instance:?}"
            );
        }
        eprintln!("work per instance: {by_instance:?}");
        for n in [Some(sender), Some(i1), Some(i3), i4].into_iter().flatten() {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_batch_gives_each_group_every_message_in_order() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let publisher = start(builder(&net, "payments", &key)).await;
        let audit = start(builder(&net, "audit", &key)).await;
        let ledger = start(builder(&net, "ledger", &key)).await;
        let mut audit_got = drain(audit.subscribe("payment.>").await.expect("sub"));
        let mut ledger_got = drain(ledger.subscribe("payment.>").await.expect("sub"));
        eventually(10, "the publisher learnt both groups", || async {
            publisher
                .publish("payment.probe", "p")
                .await
                .is_ok_and(|r| r.copies() == 2)
        })
        .await;
        let batch = (0..300u32).map(|i| Outgoing::new(format!("{i}")).key("acct"));
        let receipt = publisher
            .publish_batch("payment.succeeded", batch)
            .await
            .expect("published");
        assert_eq!(receipt.copies(), 600, "one copy per message and group");
        tokio::time::timeout(Duration::from_secs(30), receipt.acked())
            .await
            .expect("acked in time")
            .expect("every copy handled");
        for (group, got) in [("audit", &mut audit_got), ("ledger", &mut ledger_got)] {
            let mut seen = Vec::new();
            while seen.len() < 300 {
                let (_, text) = tokio::time::timeout(Duration::from_secs(10), got.recv())
                    .await
                    .expect("in time")
                    .expect("msg");
                if text != "p" {
                    seen.push(text.parse::<u32>().expect("n"));
                }
            }
            assert_eq!(
                seen,
                (0..300).collect::<Vec<_>>(),
                "{group} in publish order"
            );
        }
        for n in [publisher, audit, ledger] {
            n.shutdown().await;
        }
    })
    .await;
}

/// Publishes on `topic` until a publish stores `copies` copies (news of interests and groups
/// travels asynchronously).
async fn until_copies(publisher: &Node, topic: &str, copies: usize, what: &str) {
    eventually(10, what, || async {
        publisher
            .publish(topic, "probe")
            .await
            .is_ok_and(|r| r.copies() == copies)
    })
    .await;
}

/// A publisher keeps the targets of each topic it published to until an interest or a group
/// changes (`runtime/core/topics.rs`): every kind of change must reach the next publish to a
/// topic already published to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_reaches_what_changed_since_the_last_one_to_its_topic() {
    within(90, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let publisher = start(builder(&net, "orders", &key)).await;
        let audit = start(builder(&net, "audit", &key)).await;
        let _audit = drain(audit.subscribe("order.*").await.expect("sub"));
        until_copies(&publisher, "order.placed", 1, "the publisher learnt audit").await;

        // A new node with a group.
        let billing = start(builder(&net, "billing", &key)).await;
        let _billing = drain(billing.subscribe("order.placed").await.expect("sub"));
        until_copies(
            &publisher,
            "order.placed",
            2,
            "the publisher learnt billing",
        )
        .await;

        // A connected node's interests change: a second group.
        let _archive = drain(
            audit
                .subscribe_group("order.>", "archive")
                .await
                .expect("sub"),
        );
        until_copies(
            &publisher,
            "order.placed",
            3,
            "the publisher learnt archive",
        )
        .await;

        // A group is released.
        audit.unsubscribe_group("archive").await.expect("release");
        until_copies(
            &publisher,
            "order.placed",
            2,
            "the publisher forgot archive",
        )
        .await;

        // Ephemeral subscribers (no receipt, but their copies): one on a connected node,
        // whose interests change, and a new node that brings no group.
        let mut tap = drain(audit.subscribe_ephemeral("order.*").await.expect("sub"));
        wait_for_copy(&publisher, &mut tap, "order.placed").await;
        let dash = start(builder(&net, "dashboard", &key)).await;
        let mut tap = drain(dash.subscribe_ephemeral("order.*").await.expect("sub"));
        wait_for_copy(&publisher, &mut tap, "order.placed").await;

        // A group whose only node goes stays known: its copies are kept.
        billing.shutdown().await;
        eventually(10, "billing gone", || async {
            publisher.status().await.is_some_and(|s| s.connections == 2)
        })
        .await;
        until_copies(&publisher, "order.placed", 2, "billing's copies still kept").await;

        for n in [publisher, audit, dash] {
            n.shutdown().await;
        }
    })
    .await;
}
