//! Known durable subscriber groups survive a publisher restart: a publisher that knew a group
//! keeps its copies right after it starts again, before any peer announces the group, and a
//! released group is not brought back.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Gate, builder, drain, eventually, start, within};
use peerbus::{Durability, MemoryNetwork, MeshKey, Node};

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
        let receipt = publisher
            .publish("orders.created", "after-restart")
            .await
            .expect("publish");
        assert_eq!(
            receipt.copies(),
            1,
            "a restarted publisher must keep a copy for the durable group it knew"
        );

        let (subscriber, mut got) = billing_subscriber(&net, &key).await;
        // Warm-ups published before the restart may arrive again only if they were not acked;
        // the message published while the group had no instance must arrive.
        loop {
            let (_, payload) = got.recv().await.expect("delivered");
            if payload == "after-restart" {
                break;
            }
            assert_eq!(payload, "warm-up", "unexpected message");
        }
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

/// A node that heard of a release ignores gossip about the group from a node that has not:
/// a witness that learnt the group before the release and comes back after it, knowing the
/// group from its store, does not teach it back to the publisher (the group came back,
/// forever, when a connection was made around the release). The witness only ever meets the
/// publisher (a [`Gate`] discovery), which passes a release on only when it hears of it, so
/// nothing tells the witness of the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_gossip_does_not_bring_a_released_group_back() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let gate = Gate::default();
        let witness_dir = tempfile::tempdir().expect("tempdir");
        let witness = || {
            start(
                Node::builder("audit")
                    .mesh("test")
                    .mesh_key(key.clone())
                    .listen("127.0.0.1:0".parse().expect("addr"))
                    .discovery(gate.clone())
                    .data_dir(witness_dir.path())
                    .durability(Durability::Fsync)
                    .shutdown_grace(Duration::from_millis(500)),
            )
        };
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
        assert_eq!(
            copies(&back, "stale").await,
            1,
            "the witness still knows the group"
        );
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
