//! Delivery under injected network faults (in process, 127.0.0.1): packet loss, a partition
//! that heals, a frozen peer. Nothing acknowledged is lost and keys stay in order.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{builder, drain, eventually, start, within};
use peerbus::{FaultConfig, Faults, MemoryNetwork, MeshKey, Outgoing};

async fn check_in_order(got: &mut tokio::sync::mpsc::Receiver<(Option<String>, String)>, n: usize) {
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < n {
        let (k, p) = tokio::time::timeout(Duration::from_secs(60), got.recv())
            .await
            .expect("in time")
            .expect("msg");
        let i: usize = p.parse().expect("n");
        seen.insert(i);
        per_key.entry(k.expect("key")).or_default().push(i);
    }
    for (k, v) in per_key {
        let firsts: Vec<usize> = {
            let mut s = std::collections::HashSet::new();
            v.into_iter().filter(|i| s.insert(*i)).collect()
        };
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "key {k} out of order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_loss_loses_nothing() {
    within(120, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let lossy = FaultConfig {
            loss: 0.10,
            duplicate: 0.02,
            reorder: 0.02,
            delay: Duration::from_millis(1),
            jitter: Duration::from_millis(1),
            seed: 7,
        };
        let (fa, fb) = (Faults::new(1), Faults::new(2));
        fa.set(lossy.clone());
        fb.set(FaultConfig { seed: 8, ..lossy });
        let sender = start(builder(&net, "payments", &key).faults(fa.clone())).await;
        let receiver = start(builder(&net, "orders", &key).faults(fb)).await;
        let mut got = drain(receiver.messages().expect("messages"));
        let mut receipts = Vec::new();
        for i in 0..2_000 {
            receipts.push(
                sender
                    .send(
                        "orders",
                        Outgoing::new(format!("{i}")).key(format!("k{}", i % 20)),
                    )
                    .await
                    .expect("send"),
            );
        }
        for r in receipts {
            r.acked().await.expect("acked despite loss");
        }
        check_in_order(&mut got, 2_000).await;
        assert!(
            fa.stats().dropped > 0,
            "the faults were real: {:?}",
            fa.stats()
        );
        sender.shutdown().await;
        receiver.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_heals_and_a_frozen_peer_lose_nothing() {
    within(120, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let fa = Faults::new(3);
        let sender = start(builder(&net, "payments", &key).faults(fa.clone())).await;
        let receiver = start(builder(&net, "orders", &key)).await;
        let mut got = drain(receiver.messages().expect("messages"));
        assert!(
            sender
                .wait_for_instances("orders", 1, Duration::from_secs(10))
                .await
        );
        // Partition: everything between the two is dropped for longer than the idle timeout.
        fa.partition(receiver.local_addr());
        let mut receipts = Vec::new();
        for i in 0..500 {
            receipts.push(
                sender
                    .send(
                        "orders",
                        Outgoing::new(format!("{i}")).key(format!("k{}", i % 7)),
                    )
                    .await
                    .expect("stored"),
            );
        }
        // The idle timeout (3 s) ends the connection; the partition lasts until it has.
        eventually(15, "the partition cut the connection", || async {
            sender.instances("orders").await.is_empty()
        })
        .await;
        fa.heal_all();
        // Freeze the sender's network briefly (shorter than the idle timeout) mid-stream.
        for i in 500..1_000 {
            receipts.push(
                sender
                    .send(
                        "orders",
                        Outgoing::new(format!("{i}")).key(format!("k{}", i % 7)),
                    )
                    .await
                    .expect("stored"),
            );
            if i == 700 {
                fa.block_all(true);
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                fa.block_all(false);
            }
        }
        for r in receipts {
            r.acked().await.expect("acked after the partition healed");
        }
        check_in_order(&mut got, 1_000).await;
        sender.shutdown().await;
        receiver.shutdown().await;
    })
    .await;
}
