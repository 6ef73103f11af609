//! Known durable subscriber groups survive a publisher restart: a publisher that knew a group
//! keeps its copies right after it starts again, before any peer announces the group, and a
//! released group is not brought back.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Gate, builder, drain, eventually, start, within};
use peerbus::{Durability, HandlerError, MemoryNetwork, MeshKey, Node};
use tokio::sync::{Semaphore, mpsc};

/// A node of `billing-svc` in group `billing` on `orders.*`, and what it handles.
async fn billing_subscriber(
    net: &MemoryNetwork,
    key: &MeshKey,
) -> (Node, tokio::sync::mpsc::Receiver<(Option<String>, String)>) {
    let subscriber = start(builder(net, "billing-svc", key)).await;
    let sub = subscriber
        .subscribe_group("orders.*", "billing")
        .await
        .expect("subscribe");
    (subscriber, drain(sub))
}

/// A publisher on `dir` with fsync'd commits.
async fn publisher(net: &MemoryNetwork, key: &MeshKey, dir: &Path) -> Node {
    start(
        builder(net, "shop", key)
            .data_dir(dir)
            .durability(Durability::Fsync),
    )
    .await
}

/// A node of `audit` on `dir` that only meets the members of `gate` (a node that learns of
/// groups from others and gossips them, the witness of the release tests).
async fn witness(key: &MeshKey, gate: &Gate, dir: &Path) -> Node {
    start(
        Node::builder("audit")
            .mesh("test")
            .mesh_key(key.clone())
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(gate.clone())
            .data_dir(dir)
            .durability(Durability::Fsync)
            .shutdown_grace(Duration::from_millis(500)),
    )
    .await
}

/// Publishes on `orders.created` until the publisher stores one copy (it has learnt the
/// `billing` group from the subscriber); every such copy is delivered to the subscriber.
async fn learn_billing(publisher: &Node) {
    until_copies(
        publisher,
        1,
        "warm-up",
        "publisher learns the billing group",
    )
    .await;
}

/// Publishes on `orders.created` until the publisher stores no copy (it forgot the released
/// `billing` group).
async fn forget_billing(publisher: &Node) {
    until_copies(
        publisher,
        0,
        "probe",
        "publisher forgets the released group",
    )
    .await;
}

/// Publishes `payload` on `orders.created` until the publisher stores `copies` copies of it.
async fn until_copies(publisher: &Node, copies: usize, payload: &str, what: &str) {
    eventually(15, what, || async {
        publisher
            .publish("orders.created", payload)
            .await
            .is_ok_and(|r| r.copies() == copies)
    })
    .await;
}

/// Publishes `payload` on `orders.created` once, which must keep one copy (for `billing`, while
/// none of its instances runs: `why` says what it means if not).
async fn keeps_a_copy(publisher: &Node, payload: &str, why: &str) -> peerbus::Receipt {
    let receipt = publisher
        .publish("orders.created", payload)
        .await
        .expect("publish");
    assert_eq!(receipt.copies(), 1, "{why}");
    receipt
}

/// Waits until `payload` is delivered; only warm-ups (redelivered when their ack was lost) may
/// come before it.
async fn delivered(got: &mut tokio::sync::mpsc::Receiver<(Option<String>, String)>, payload: &str) {
    loop {
        let (_, p) = got.recv().await.expect("delivered");
        if p == payload {
            return;
        }
        assert_eq!(p, "warm-up", "unexpected message");
    }
}

/// Publishes `payload` on `orders.created` once; how many copies were stored.
async fn copies(node: &Node, payload: &str) -> usize {
    node.publish("orders.created", payload)
        .await
        .expect("publish")
        .copies()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_publisher_keeps_copies_for_a_group_it_knew() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (subscriber, mut got) = billing_subscriber(&net, &key).await;
            let publisher = publisher(&net, &key, dir.path()).await;
            learn_billing(&publisher).await;
            assert_eq!(got.recv().await.map(|m| m.1).as_deref(), Some("warm-up"));
            subscriber.shutdown().await;
            publisher.shutdown().await;
        }

        // No subscriber runs: only the store can tell the publisher about `billing`.
        let publisher = publisher(&net, &key, dir.path()).await;
        let receipt = keeps_a_copy(
            &publisher,
            "after-restart",
            "a restarted publisher must keep a copy for the durable group it knew",
        )
        .await;

        // The message published while the group had no instance must arrive.
        let (subscriber, mut got) = billing_subscriber(&net, &key).await;
        delivered(&mut got, "after-restart").await;
        receipt.acked().await.expect("receipt settles once handled");
        subscriber.shutdown().await;
        publisher.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_group_is_not_restored_after_a_restart() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (subscriber, _got) = billing_subscriber(&net, &key).await;
            let publisher = publisher(&net, &key, dir.path()).await;
            learn_billing(&publisher).await;
            subscriber
                .unsubscribe_group("billing")
                .await
                .expect("unsubscribe");
            forget_billing(&publisher).await;
            subscriber.shutdown().await;
            publisher.shutdown().await;
        }

        let publisher = publisher(&net, &key, dir.path()).await;
        assert_eq!(
            copies(&publisher, "after-restart").await,
            0,
            "a released group must not come back from the store"
        );
        publisher.shutdown().await;
    })
    .await;
}

/// A node that heard of a release ignores older news of the group from a node that has not:
/// a witness that learnt the group before the release and comes back after it, knowing the
/// group from its store, does not teach it back to the publisher (the group came back,
/// forever, when a connection was made around the release), and forgets it itself. The
/// witness only ever meets the publisher (a [`Gate`] discovery), so only the publisher can
/// tell it of the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_gossip_does_not_bring_a_released_group_back() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let gate = Gate::default();
        let witness_dir = tempfile::tempdir().expect("tempdir");
        let witness = || witness(&key, &gate, witness_dir.path());
        let (subscriber, _got) = billing_subscriber(&net, &key).await;
        let publisher = start(builder(&net, "shop", &key).discovery(gate.clone())).await;
        learn_billing(&publisher).await;
        let first = witness().await;
        gate.reveal().await;
        learn_billing(&first).await;
        first.shutdown().await;

        subscriber
            .unsubscribe_group("billing")
            .await
            .expect("unsubscribe");
        forget_billing(&publisher).await;

        // The witness comes back knowing the group from its store, and gossips it.
        let back = witness().await;
        gate.reveal().await;
        assert!(
            back.wait_for_instances("shop", 1, Duration::from_secs(10))
                .await
        );
        forget_billing(&back).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            copies(&publisher, "after").await,
            0,
            "the publisher learnt the released group back"
        );
        back.shutdown().await;
        subscriber.shutdown().await;
        publisher.shutdown().await;
    })
    .await;
}

/// A publisher that was down when the group was released learns of the release when it comes
/// back (within a minute of it): the subscriber that released the group tells every node that
/// connects meanwhile. Before, the publisher restored the group from its store and kept copies
/// for it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_down_during_the_release_forgets_the_group_when_it_comes_back() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        let (subscriber, _got) = billing_subscriber(&net, &key).await;
        let first = publisher(&net, &key, dir.path()).await;
        learn_billing(&first).await;
        first.shutdown().await;

        subscriber
            .unsubscribe_group("billing")
            .await
            .expect("unsubscribe");
        let back = publisher(&net, &key, dir.path()).await;
        forget_billing(&back).await;
        back.shutdown().await;
        subscriber.shutdown().await;

        // And its store forgot it too.
        let alone = publisher(&net, &key, dir.path()).await;
        assert_eq!(
            copies(&alone, "alone").await,
            0,
            "the released group came back from the store"
        );
        alone.shutdown().await;
    })
    .await;
}

/// The gap the 60-second memory of a release left: a node that comes back after the node that
/// released the group is gone, and after every other node restarted, meets only nodes that
/// know of the release from their store. The release is stored as a tombstone with a newer
/// version than the group the witness knows, so the witness's news loses and it forgets the
/// group too. Before group versions, the restarted publisher had forgotten the release and
/// learnt the group back from the witness, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_back_after_everyone_restarted_does_not_bring_a_released_group_back() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let publisher_dir = tempfile::tempdir().expect("tempdir");
        let witness_dir = tempfile::tempdir().expect("tempdir");
        // The publisher meets the subscriber through the network and the witness through a
        // gate. Each phase has a gate of its own: a gate tells its members of every member it
        // ever had, and the restarted publisher's old address would be among them.
        let shop = |gate: &Gate| {
            start(
                builder(&net, "shop", &key)
                    .data_dir(publisher_dir.path())
                    .durability(Durability::Fsync)
                    .discovery(gate.clone()),
            )
        };
        let (subscriber, _got) = billing_subscriber(&net, &key).await;
        let gate = Gate::default();
        let first = shop(&gate).await;
        learn_billing(&first).await;
        let witness_first = witness(&key, &gate, witness_dir.path()).await;
        gate.reveal().await;
        learn_billing(&witness_first).await;
        witness_first.shutdown().await;

        subscriber
            .unsubscribe_group("billing")
            .await
            .expect("unsubscribe");
        forget_billing(&first).await;
        // Everyone who heard of the release directly is gone; the publisher restarts.
        subscriber.shutdown().await;
        first.shutdown().await;
        let gate = Gate::default();
        let back = shop(&gate).await;
        assert_eq!(
            copies(&back, "restarted").await,
            0,
            "the release was not kept"
        );

        // The witness comes back knowing the group from its store, and meets the publisher.
        let witness = witness(&key, &gate, witness_dir.path()).await;
        gate.reveal().await;
        assert!(
            witness
                .wait_for_instances("shop", 1, Duration::from_secs(10))
                .await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            copies(&back, "after").await,
            0,
            "the publisher learnt the released group back from the witness"
        );
        forget_billing(&witness).await;
        witness.shutdown().await;
        back.shutdown().await;
    })
    .await;
}

/// A release never takes a group away from a node still subscribed to it: when the release
/// reaches that node (or a node connected to it), the subscription is newer news and the group
/// comes back with a newer version. So a publisher keeps the group's copies once that
/// subscriber is down too, and the subscriber gets them when it is back. Before group
/// versions every node forgot the group, and the copies published while the remaining
/// subscriber was down were never kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_does_not_take_a_group_from_a_node_still_subscribed() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let (leaving, _left) = billing_subscriber(&net, &key).await;
        let (staying, _got) = billing_subscriber(&net, &key).await;
        let publisher = start(builder(&net, "shop", &key)).await;
        learn_billing(&publisher).await;
        assert!(
            publisher
                .wait_for_instances("billing-svc", 2, Duration::from_secs(10))
                .await
        );

        let billing = |node: &Node| {
            let node = node.clone();
            async move {
                let status = node.status().await.expect("status");
                status
                    .groups
                    .get("billing")
                    .cloned()
                    .expect("billing is known")
            }
        };
        let before = billing(&publisher).await;
        assert!(!before.is_released());
        leaving
            .unsubscribe_group("billing")
            .await
            .expect("unsubscribe");
        // The release (one version on) reached `staying`, and its answer, the group live again
        // a version later, reached the publisher.
        eventually(
            10,
            "the publisher learns the staying subscriber's answer",
            || async {
                let now = billing(&publisher).await;
                now.version >= before.version + 2 && !now.is_released()
            },
        )
        .await;
        staying.shutdown().await;
        leaving.shutdown().await;
        eventually(10, "both subscribers are gone", || async {
            publisher.instances("billing-svc").await.is_empty()
        })
        .await;
        let receipt = keeps_a_copy(
            &publisher,
            "while-away",
            "the publisher forgot a group that was still subscribed",
        )
        .await;

        let (_back, mut got) = billing_subscriber(&net, &key).await;
        delivered(&mut got, "while-away").await;
        receipt.acked().await.expect("receipt settles once handled");
        publisher.shutdown().await;
    })
    .await;
}

/// Decommissioning a group's last subscriber: it releases the group and stops at once. The
/// release must reach the publisher before the subscriber's connections close, or the
/// publisher keeps copies for the group for good (nobody is left to tell it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_right_before_shutdown_reaches_the_publisher() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let (subscriber, _got) = billing_subscriber(&net, &key).await;
        let publisher = start(builder(&net, "shop", &key)).await;
        learn_billing(&publisher).await;
        // The subscriber has registered its connection to the publisher too (a release made
        // while the connection is still being set up on its side reaches the publisher only
        // from a later run of the subscriber).
        assert!(
            subscriber
                .wait_for_instances("shop", 1, Duration::from_secs(10))
                .await
        );
        subscriber
            .unsubscribe_group("billing")
            .await
            .expect("unsubscribe");
        subscriber.shutdown().await;
        forget_billing(&publisher).await;
        publisher.shutdown().await;
    })
    .await;
}

/// A release that reaches a publisher while a connected subscriber still subscribes to the
/// group does not drop the copies waiting for that subscriber: the publisher keeps a released
/// group's backlog while a connected peer's interests still name it, and the subscriber answers
/// the release with a newer live version. Without the wait the publisher released every copy
/// it had not sent yet (their receipts failed as released) before that answer came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_keeps_the_backlog_of_a_subscriber_still_there() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        // The subscriber takes two deliveries at a time and handles none until the gate opens,
        // so the publisher keeps most copies waiting.
        let subscriber = start(builder(&net, "billing-svc", &key).prefetch(2)).await;
        let gate = Arc::new(Semaphore::new(0));
        let (tx, mut got) = mpsc::channel(1_000);
        let sub = subscriber
            .subscribe_group("orders.*", "billing")
            .await
            .expect("subscribe");
        tokio::spawn(sub.handle(1, {
            let gate = gate.clone();
            move |m| {
                let (gate, tx) = (gate.clone(), tx.clone());
                async move {
                    gate.acquire().await.expect("gate open").forget();
                    tx.send(m.payload_text()).await.ok();
                    Ok::<(), HandlerError>(())
                }
            }
        }));
        let publisher = start(builder(&net, "shop", &key)).await;
        learn_billing(&publisher).await;
        // A node that only knows the group from gossip releases it.
        let releaser = start(builder(&net, "ops", &key)).await;
        eventually(10, "the releaser learns the group", || async {
            releaser.groups().await.contains_key("billing")
        })
        .await;

        let mut receipts = Vec::new();
        for i in 0..20 {
            let receipt = keeps_a_copy(&publisher, &format!("m{i}"), "billing is subscribed").await;
            receipts.push(receipt);
        }
        releaser
            .unsubscribe_group("billing")
            .await
            .expect("release");
        eventually(10, "the subscriber answers the release", || async {
            publisher
                .groups()
                .await
                .get("billing")
                .is_some_and(|g| !g.is_released() && g.version >= 3)
        })
        .await;

        gate.add_permits(1_000);
        for receipt in receipts {
            receipt
                .acked()
                .await
                .expect("a copy for a subscriber still there is delivered, not released");
        }
        let mut handled = Vec::new();
        while handled.len() < 21 {
            handled.push(got.recv().await.expect("handled"));
        }
        // Unkeyed messages: in any order.
        handled.retain(|p| p != "warm-up");
        handled.sort_by_key(|p| p[1..].parse::<u32>().ok());
        let expected: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
        assert_eq!(handled, expected);
        releaser.shutdown().await;
        subscriber.shutdown().await;
        publisher.shutdown().await;
    })
    .await;
}
