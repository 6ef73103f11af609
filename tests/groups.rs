//! Known durable subscriber groups survive a publisher restart: a publisher that knew a group
//! keeps its copies right after it starts again, before any peer announces the group, and a
//! released group is not brought back.

mod common;

use std::path::Path;

use common::{builder, drain, eventually, start, within};
use peerbus::{Durability, MemoryNetwork, MeshKey, Node};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_publisher_keeps_copies_for_a_group_it_knew() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let subscriber = start(builder(&net, "billing-svc", &key)).await;
            let mut got = drain(
                subscriber
                    .subscribe_group("orders.*", "billing")
                    .await
                    .expect("subscribe"),
            );
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

        let subscriber = start(builder(&net, "billing-svc", &key)).await;
        let mut got = drain(
            subscriber
                .subscribe_group("orders.*", "billing")
                .await
                .expect("subscribe"),
        );
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
            let subscriber = start(builder(&net, "billing-svc", &key)).await;
            let _got = drain(
                subscriber
                    .subscribe_group("orders.*", "billing")
                    .await
                    .expect("subscribe"),
            );
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
        let receipt = publisher
            .publish("orders.created", "after-restart")
            .await
            .expect("publish");
        assert_eq!(
            receipt.copies(),
            0,
            "a released group must not come back from the store"
        );
        publisher.shutdown().await;
    })
    .await;
}

/// A node that learnt a group before it was released, and comes back after the release with
/// the group in its store, tells its peers of the group again. Nodes that saw the release
/// ignore that stale gossip, so the released group stays released (it came back, forever,
/// when a connection was made around the release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_gossip_does_not_bring_a_released_group_back() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let witness_dir = tempfile::tempdir().expect("tempdir");
        let witness = || {
            start(
                builder(&net, "audit", &key)
                    .data_dir(witness_dir.path())
                    .durability(Durability::Fsync),
            )
        };
        let subscriber = start(builder(&net, "billing-svc", &key)).await;
        let _got = drain(
            subscriber
                .subscribe_group("orders.*", "billing")
                .await
                .expect("subscribe"),
        );
        let publisher = start(builder(&net, "shop", &key)).await;
        learn_billing(&publisher).await;
        let first = witness().await;
        learn_billing(&first).await;
        first.shutdown().await;

        subscriber
            .unsubscribe_group("billing")
            .await
            .expect("unsubscribe");
        forget_billing(&publisher).await;

        // The witness comes back knowing the group from its store, and tells both of it.
        let back = witness().await;
        assert!(
            back.wait_for_instances("shop", 1, std::time::Duration::from_secs(10))
                .await
        );
        assert!(
            back.wait_for_instances("billing-svc", 1, std::time::Duration::from_secs(10))
                .await
        );
        let stale = back
            .publish("orders.created", "stale")
            .await
            .expect("publish");
        assert_eq!(stale.copies(), 1, "the witness still knows the group");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        for node in [&publisher, &subscriber] {
            let r = node
                .publish("orders.created", "after")
                .await
                .expect("publish");
            assert_eq!(
                r.copies(),
                0,
                "{} learnt the released group back",
                node.service()
            );
        }
        back.shutdown().await;
        subscriber.shutdown().await;
        publisher.shutdown().await;
    })
    .await;
}
