//! `cargo bench --bench send`: messages/s of 1 KiB sends between two nodes on
//! 127.0.0.1, at `Memory` and `Fsync` durability, and fsyncs per second, so
//! the cost of durability (and what group commit saves) is visible.
//!
//! Figures, not assertions: the ratio `fsync / memory` is what to compare
//! across machines. Bounded: a fixed message count per case, and a time cap.

use std::time::{Duration, Instant};

use peerbus::{Durability, HandlerError, MemoryNetwork, MeshKey, Node, Outgoing};

const MESSAGES: usize = 20_000;
const SENDERS: usize = 64;
const PAYLOAD: usize = 1024;
const CAP: Duration = Duration::from_secs(120);

struct Figures {
    msgs_per_s: f64,
    fsyncs_per_s: f64,
    commits: u64,
}

async fn run(durability: Durability) -> Figures {
    let net = MemoryNetwork::new();
    let key = MeshKey::generate();
    let dir = tempfile::tempdir().expect("tempdir");
    let builder = |svc: &str| {
        Node::builder(svc)
            .mesh("bench")
            .mesh_key(key.clone())
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(net.discovery())
            .prefetch(1024)
    };
    let sender = builder("payments")
        .data_dir(dir.path())
        .durability(durability)
        .start()
        .await
        .expect("start");
    let receiver = builder("orders").start().await.expect("start");
    tokio::spawn(
        receiver
            .messages()
            .expect("messages")
            .handle(4, |_m| async { Ok::<(), HandlerError>(()) }),
    );
    assert!(
        sender
            .wait_for_instances("orders", 1, Duration::from_secs(10))
            .await
    );
    let payload = bytes::Bytes::from(vec![0x42u8; PAYLOAD]);
    let before = sender.store_stats();
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let sender = sender.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut receipts = Vec::new();
            for i in (s..MESSAGES).step_by(SENDERS) {
                let msg = Outgoing::new(payload.clone()).key(format!("k{}", i % 256));
                receipts.push(sender.send("orders", msg).await.expect("send"));
            }
            for r in receipts {
                r.acked().await.expect("acked");
            }
        }));
    }
    let all = async {
        for t in tasks {
            t.await.expect("task");
        }
    };
    tokio::time::timeout(CAP, all)
        .await
        .expect("benchmark case exceeded its time cap");
    let secs = t0.elapsed().as_secs_f64();
    let after = sender.store_stats();
    sender.shutdown().await;
    receiver.shutdown().await;
    Figures {
        msgs_per_s: MESSAGES as f64 / secs,
        fsyncs_per_s: (after.fsyncs - before.fsyncs) as f64 / secs,
        commits: after.commits - before.commits,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "peerbus send benchmark: {MESSAGES} x {PAYLOAD} B, {SENDERS} concurrent senders, two nodes on 127.0.0.1"
    );
    println!(
        "{:<10} {:>12} {:>10} {:>12} {:>10}",
        "durability", "msgs/s", "MB/s", "fsyncs/s", "commits"
    );
    let mut memory = 0.0;
    for (name, d) in [("memory", Durability::Memory), ("fsync", Durability::Fsync)] {
        let f = rt.block_on(run(d));
        println!(
            "{:<10} {:>12.0} {:>10.1} {:>12.0} {:>10}",
            name,
            f.msgs_per_s,
            f.msgs_per_s * PAYLOAD as f64 / 1e6,
            f.fsyncs_per_s,
            f.commits
        );
        if name == "memory" {
            memory = f.msgs_per_s;
        } else {
            println!("fsync / memory = {:.2}", f.msgs_per_s / memory);
        }
    }
}
