//! Durable store-and-forward, in process over real QUIC on 127.0.0.1.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{builder, connections_settled, eventually, settled, start, within};
use peerbus::{
    DeliveryError, Durability, HandlerError, MemoryNetwork, MeshKey, Outgoing, Receipt, SendError,
};
use tokio::sync::mpsc;

/// Waits for `receipt` to end, and checks that its message was dead-lettered for its TTL.
async fn dead_lettered_as_expired(receipt: Receipt) {
    let err = receipt.acked().await.expect_err("expired");
    assert!(
        matches!(err, DeliveryError::DeadLettered { ref reason } if reason == "ttl expired"),
        "{err}"
    );
}

/// Takes `n` deliveries (numeric payloads) from `got`, grouped by key, and checks that each
/// key's numbers rise (per-key order) and that nothing more has arrived (no duplicates).
async fn in_key_order(
    got: &mut mpsc::Receiver<(String, String, u32)>,
    n: usize,
) -> HashMap<String, Vec<u32>> {
    let mut per_key: HashMap<String, Vec<u32>> = HashMap::new();
    for _ in 0..n {
        let (k, p, _) = got.recv().await.expect("message");
        per_key.entry(k).or_default().push(p.parse().expect("n"));
    }
    for (k, v) in &per_key {
        assert!(
            v.windows(2).all(|w| w[0] < w[1]),
            "key {k} out of order: {v:?}"
        );
    }
    assert!(got.try_recv().is_err(), "no duplicates");
    per_key
}

/// Runs a handler on `node`'s service that records (key, payload) and applies `verdict`.
fn handle_with(
    node: &peerbus::Node,
    verdict: impl Fn(&str) -> Result<(), HandlerError> + Send + Sync + 'static,
) -> mpsc::Receiver<(String, String, u32)> {
    let (tx, rx) = mpsc::channel(100_000);
    let verdict = std::sync::Arc::new(verdict);
    tokio::spawn(node.messages().expect("messages").handle(8, move |m| {
        let tx = tx.clone();
        let verdict = verdict.clone();
        async move {
            let payload = m.payload_text();
            let v = verdict(&payload);
            if v.is_ok() {
                tx.send((m.key().unwrap_or("").to_string(), payload, m.attempt()))
                    .await
                    .ok();
            }
            v
        }
    }));
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_receiver_gets_ten_thousand_in_key_order() {
    within(120, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        let sender = start(builder(&net, "payments", &key).data_dir(dir.path())).await;
        // 50 concurrent callers, one per key, each sending its key's 200 messages in order.
        let mut tasks = Vec::new();
        for k in 0..50u32 {
            let sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                let mut rs = Vec::with_capacity(200);
                for j in 0..200u32 {
                    let i = j * 50 + k;
                    let msg = Outgoing::new(format!("{i}")).key(format!("k{k}"));
                    rs.push(sender.send("orders", msg).await.expect("stored"));
                }
                rs
            }));
        }
        let mut receipts = Vec::with_capacity(10_000);
        for t in tasks {
            receipts.extend(t.await.expect("task"));
        }
        let st = sender.status().await.expect("status");
        assert_eq!(
            st.logs["svc:orders"].waiting, 10_000,
            "all waiting while orders is offline"
        );
        let stats = sender.store_stats();
        assert!(stats.fsyncs > 0, "Fsync durability fsyncs");
        assert!(
            stats.fsyncs < 5_000,
            "concurrent sends share fsyncs (group commit): {stats:?}"
        );

        let receiver = start(builder(&net, "orders", &key)).await;
        let mut got = handle_with(&receiver, |_| Ok(()));
        for r in receipts {
            r.acked().await.expect("acked");
        }
        let per_key = in_key_order(&mut got, 10_000).await;
        assert_eq!(per_key.values().map(Vec::len).sum::<usize>(), 10_000);
        sender.shutdown().await;
        receiver.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sender_resumes_from_its_log() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let sender = start(builder(&net, "payments", &key).data_dir(dir.path())).await;
            for i in 0..300 {
                let _ = sender
                    .send("orders", Outgoing::new(format!("{i}")).key("k"))
                    .await
                    .expect("stored");
            }
            // What its log holds while it runs: the oldest first, all waiting.
            let running = sender.log_entries(3).await.expect("running");
            let payloads: Vec<&str> = running.iter().map(|e| e.payload.as_str()).collect();
            assert_eq!(payloads, ["0", "1", "2"]);
            assert!(
                running
                    .iter()
                    .all(|e| e.state == "waiting" && e.attempts == Some(0))
            );
            sender.shutdown().await;
            assert!(sender.log_entries(3).await.is_none(), "stopped");
        }
        // Offline status of the stopped node's directory.
        let offline = peerbus::control::offline_status(dir.path()).expect("offline status");
        assert_eq!(offline.logs["svc:orders"].waiting, 300);
        // And its entries, in order, each with its message.
        let entries = peerbus::control::offline_entries(dir.path(), 1_000).expect("entries");
        let payloads: Vec<&str> = entries.iter().map(|e| e.payload.as_str()).collect();
        let expected: Vec<String> = (0..300).map(|i| i.to_string()).collect();
        assert_eq!(payloads, expected);
        assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(
            entries
                .iter()
                .all(|e| e.log == "svc:orders" && e.key.as_deref() == Some("k"))
        );
        assert!(
            entries
                .iter()
                .all(|e| e.state == "stored" && e.attempts.is_none())
        );
        let first = peerbus::control::offline_entries(dir.path(), 2).expect("entries");
        assert_eq!(first.len(), 2);
        assert_eq!(first[1].payload, "1");

        let receiver = start(builder(&net, "orders", &key)).await;
        let mut got = handle_with(&receiver, |_| Ok(()));
        let sender = start(builder(&net, "payments", &key).data_dir(dir.path())).await;
        for i in 0..300 {
            let (_, p, _) = got
                .recv()
                .await
                .expect("delivered after the sender restarted");
            assert_eq!(p, i.to_string());
        }
        settled(&sender, "svc:orders", 10).await;
        // New sends continue the sequence (no reuse of acknowledged seqs).
        sender
            .send("orders", "after")
            .await
            .expect("send")
            .acked()
            .await
            .expect("acked");
        assert_eq!(got.recv().await.map(|m| m.1).as_deref(), Some("after"));
        sender.shutdown().await;
        receiver.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_and_exhausted_attempts_go_to_the_dead_letter_store_and_replay() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        let sender = start(
            builder(&net, "payments", &key)
                .data_dir(dir.path())
                .max_attempts(3)
                .retry_backoff(Duration::from_millis(20), Duration::from_millis(100)),
        )
        .await;
        // TTL: nobody is there to take it.
        let r = sender
            .send(
                "nobody",
                Outgoing::new("late").ttl(Duration::from_millis(200)),
            )
            .await
            .expect("stored");
        dead_lettered_as_expired(r).await;

        // A handler that fails "poison" every time, and a permanently rejected one.
        let receiver = start(builder(&net, "orders", &key)).await;
        let mut got = handle_with(&receiver, |p| match p {
            "poison" => Err(HandlerError::retry("cannot parse")),
            "reject" => Err(HandlerError::reject("invalid order")),
            _ => Ok(()),
        });
        assert!(
            sender
                .wait_for_instances("orders", 1, Duration::from_secs(10))
                .await
        );
        let poison = sender
            .send("orders", Outgoing::new("poison").key("a"))
            .await
            .expect("send");
        let reject = sender
            .send("orders", Outgoing::new("reject").key("b"))
            .await
            .expect("send");
        let fine = sender
            .send("orders", Outgoing::new("fine").key("c"))
            .await
            .expect("send");
        let e = poison.acked().await.expect_err("gave up");
        assert!(
            e.to_string().contains("3 attempts") && e.to_string().contains("cannot parse"),
            "{e}"
        );
        let e = reject.acked().await.expect_err("rejected");
        assert!(e.to_string().contains("invalid order"), "{e}");
        fine.acked().await.expect("other keys keep flowing");
        assert_eq!(got.recv().await.map(|m| m.1).as_deref(), Some("fine"));

        let dead = sender.dead_letters(10).await.expect("list");
        let reasons: Vec<(&str, u32)> = dead
            .iter()
            .map(|d| (d.reason.as_str(), d.attempts))
            .collect();
        assert_eq!(dead.len(), 3, "{reasons:?}");
        assert_eq!(dead[0].env.destination, "nobody");
        assert!(dead.iter().any(|d| d.attempts == 3));

        // Replay the TTL one after a consumer for it appears.
        let nobody = start(builder(&net, "nobody", &key)).await;
        let mut late = handle_with(&nobody, |_| Ok(()));
        let n = sender
            .replay_dead_letters(Some(&[dead[0].id]))
            .await
            .expect("replay");
        assert_eq!(n, 1);
        assert_eq!(late.recv().await.map(|m| m.1).as_deref(), Some("late"));
        assert_eq!(sender.dead_letters(10).await.expect("list").len(), 2);

        // An operator gives up on what waits for a service that is gone.
        let mut waiting = Vec::new();
        for i in 0..3 {
            waiting.push(sender.send("gone", format!("g{i}")).await);
        }
        let moved = sender.dead_letter_waiting("svc:gone").await.expect("move");
        assert_eq!(moved, 3);
        for r in waiting {
            let e = r.expect("stored").acked().await.expect_err("dead-lettered");
            assert!(e.to_string().contains("by an operator"), "{e}");
        }
        let dead = sender.dead_letters(10).await.expect("list");
        assert_eq!(
            dead.iter().filter(|d| d.env.destination == "gone").count(),
            3
        );
        assert_eq!(
            sender.dead_letter_waiting("svc:gone").await,
            Err(peerbus::AdminError::NoSuchLog("svc:gone".into()))
        );
        for n in [sender, receiver, nobody] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_store_keeps_the_newest_within_its_limit_across_a_restart() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        let node = |net: &MemoryNetwork| {
            builder(net, "payments", &key)
                .data_dir(dir.path())
                .max_dead_letters(2)
        };
        let sender = start(node(&net)).await;
        // No consumer: each one's TTL runs out and it is dead-lettered.
        for i in 0..5 {
            let _ = sender
                .send(
                    "nobody",
                    Outgoing::new(format!("{i}")).ttl(Duration::from_millis(50)),
                )
                .await
                .expect("stored");
        }
        let payloads = |d: Vec<peerbus::DeadLetter>| -> Vec<String> {
            d.iter()
                .map(|d| String::from_utf8_lossy(&d.env.payload).into_owned())
                .collect()
        };
        // All five dead-lettered, the newest two kept.
        eventually(10, "the store trimmed to the newest two", || async {
            sender
                .dead_letters(10)
                .await
                .is_ok_and(|d| payloads(d) == ["3", "4"])
        })
        .await;
        eventually(10, "the status counts what the store holds", || async {
            sender.status().await.is_some_and(|s| s.dead_letters == 2)
        })
        .await;
        sender.shutdown().await;
        let offline = peerbus::control::offline_dead_letters(dir.path(), 10).expect("offline");
        assert_eq!(offline.len(), 2, "durable");
        // After a restart the count goes on from what the store holds.
        let sender = start(node(&net)).await;
        let _ = sender
            .send("nobody", Outgoing::new("5").ttl(Duration::from_millis(50)))
            .await
            .expect("stored");
        eventually(10, "the newest replaced the oldest", || async {
            sender.dead_letters(10).await.is_ok_and(|d| {
                d.iter().map(|d| d.env.payload.as_ref()).collect::<Vec<_>>() == [b"4", b"5"]
            })
        })
        .await;
        sender.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_log_makes_send_wait_then_fail_and_loses_nothing_accepted() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let sender = start(
            builder(&net, "payments", &key)
                .durability(Durability::Memory)
                .max_log_entries(100)
                .send_timeout(Duration::from_millis(300)),
        )
        .await;
        let mut accepted = Vec::new();
        for i in 0..100 {
            accepted.push(sender.send("orders", format!("{i}")).await.expect("room"));
        }
        let t0 = std::time::Instant::now();
        let err = sender
            .send("orders", "one too many")
            .await
            .expect_err("full");
        assert!(
            t0.elapsed() >= Duration::from_millis(250),
            "send waited before failing"
        );
        assert!(matches!(err, SendError::Backpressure { .. }), "{err}");
        assert!(err.to_string().contains("backpressure"), "{err}");
        // A consumer drains the log: everything accepted arrives, and there is room again.
        let receiver = start(builder(&net, "orders", &key)).await;
        let mut got = handle_with(&receiver, |_| Ok(()));
        for r in accepted {
            r.acked().await.expect("accepted entries are delivered");
        }
        let mut n = 0;
        while got.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 100);
        sender
            .send("orders", "room again")
            .await
            .expect("room")
            .acked()
            .await
            .expect("acked");
        sender.shutdown().await;
        receiver.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_nobody_subscribes_to_does_not_wait_behind_a_full_log() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let sender = start(
            builder(&net, "payments", &key)
                .durability(Durability::Memory)
                .max_log_entries(1)
                .send_timeout(Duration::from_secs(5)),
        )
        .await;
        let _full = sender.send("orders", "fills the log").await.expect("room");
        let waiting = tokio::spawn({
            let sender = sender.clone();
            async move { sender.send("orders", "waits for room").await }
        });
        // The send above is parked once core has seen it; publishes queue behind parked calls.
        eventually(10, "the second send waits for room", || async {
            sender.status().await.is_some_and(|s| s.sends_waiting == 1)
        })
        .await;
        assert!(!waiting.is_finished(), "the second send waits for room");
        let t0 = std::time::Instant::now();
        let r = sender
            .publish("audit.nobody", "no subscriber")
            .await
            .expect("publish");
        assert_eq!(r.copies(), 0);
        assert!(
            t0.elapsed() < Duration::from_millis(2500) && !waiting.is_finished(),
            "the publish had nothing to store, yet waited {:?} behind the parked send",
            t0.elapsed()
        );
        let err = waiting.await.expect("task").expect_err("no room came");
        assert!(matches!(err, SendError::Backpressure { .. }), "{err}");
        sender.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_store_or_busy_data_dir_is_a_clear_start_error() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        let first = start(builder(&net, "payments", &key).data_dir(dir.path())).await;
        let err = builder(&net, "payments", &key)
            .data_dir(dir.path())
            .start()
            .await
            .expect_err("busy");
        assert!(
            err.to_string()
                .contains(&format!("in use by pid {}", std::process::id())),
            "{err}"
        );
        first.shutdown().await;

        let bad = tempfile::tempdir().expect("tempdir");
        std::fs::write(bad.path().join("peerbus.redb"), vec![0xa5; 32 * 1024]).expect("write");
        let err = builder(&net, "payments", &key)
            .data_dir(bad.path())
            .start()
            .await
            .expect_err("corrupt");
        assert!(err.to_string().contains("peerbus.redb"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_in_one_commit_and_delivered_in_key_order() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        let sender = start(builder(&net, "payments", &key).data_dir(dir.path())).await;
        let before = sender.store_stats();
        let batch = (0..500u32).map(|i| Outgoing::new(format!("{i}")).key(format!("k{}", i % 5)));
        let receipt = sender.send_batch("orders", batch).await.expect("stored");
        assert_eq!(receipt.copies(), 500, "one copy per message");
        let after = sender.store_stats();
        assert_eq!(
            after.commits - before.commits,
            1,
            "the whole batch is one group commit: {before:?} → {after:?}"
        );
        let st = sender.status().await.expect("status");
        assert_eq!(st.logs["svc:orders"].waiting, 500, "all wait for orders");

        let receiver = start(builder(&net, "orders", &key)).await;
        let mut got = handle_with(&receiver, |_| Ok(()));
        tokio::time::timeout(Duration::from_secs(30), receipt.acked())
            .await
            .expect("acked in time")
            .expect("every message handled");
        let per_key = in_key_order(&mut got, 500).await;
        assert_eq!(per_key.len(), 5);
        for (k, v) in &per_key {
            assert_eq!(v.len(), 100, "key {k}");
        }
        sender.shutdown().await;
        receiver.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_its_limits_or_with_a_bad_message_stores_nothing() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let sender = start(
            builder(&net, "payments", &key)
                .durability(Durability::Memory)
                .max_message_size(1024 * 1024),
        )
        .await;
        let small = |i: usize| Outgoing::new(format!("{i}"));

        let too_many = sender
            .send_batch("orders", (0..=peerbus::MAX_BATCH).map(small))
            .await;
        assert!(
            matches!(too_many, Err(SendError::BatchTooLarge { messages, max_messages, .. })
                if messages == peerbus::MAX_BATCH + 1 && max_messages == peerbus::MAX_BATCH),
            "{too_many:?}"
        );
        // 17 messages of 1 MiB: over the 16 MiB a batch may hold, though each one fits.
        let mib = peerbus::Bytes::from(vec![7u8; 1024 * 1024 - 16]);
        let too_big = sender
            .send_batch("orders", (0..17).map(|_| Outgoing::new(mib.clone())))
            .await;
        assert!(
            matches!(too_big, Err(SendError::BatchTooLarge { max_bytes, .. })
                if max_bytes == peerbus::MAX_BATCH_BYTES),
            "{too_big:?}"
        );
        // One message over `max_message_size` fails the batch it is in.
        let oversized = vec![
            small(1),
            Outgoing::new(vec![0u8; 2 * 1024 * 1024]),
            small(2),
        ];
        let bad = sender.send_batch("orders", oversized).await;
        assert!(matches!(bad, Err(SendError::TooLarge { .. })), "{bad:?}");
        let bad_destination = sender.send_batch("orders.*", [small(1)]).await;
        assert!(
            matches!(bad_destination, Err(SendError::InvalidDestination { .. })),
            "{bad_destination:?}"
        );

        let st = sender.status().await.expect("status");
        let held = st.logs.get("svc:orders").map_or(0, |l| l.waiting);
        assert_eq!(held, 0, "no message of a refused batch was stored");
        let empty = sender
            .send_batch("orders", Vec::<Outgoing>::new())
            .await
            .expect("an empty batch");
        assert_eq!(empty.copies(), 0);
        empty.acked().await.expect("nothing to wait for");

        // The limits themselves are fine.
        let full = sender
            .send_batch("orders", (0..peerbus::MAX_BATCH).map(small))
            .await
            .expect("a full batch");
        assert_eq!(full.copies(), peerbus::MAX_BATCH);
        let st = sender.status().await.expect("status");
        assert_eq!(st.logs["svc:orders"].waiting, peerbus::MAX_BATCH);
        sender.shutdown().await;
    })
    .await;
}

/// A message whose TTL passes while its handler runs, and whose handler then fails, is
/// dead-lettered as expired when it comes back, not delivered again.
///
/// Only the sender dials (the receiver is its seed, and the receiver discovers nobody): when
/// both dialled at once and the send went out on the connection that lost the tie-break,
/// the sender sent it again on the kept one before the TTL, and that copy was handled once
/// the first failed (at-least-once, as after any lost connection). Rounds disturbed that way
/// were skipped before, but they came in 60–70% of rounds, and eight in a row failed a CI run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_expired_while_its_handler_failed_is_not_delivered_again() {
    within(60, async {
        let (calls, retired) = expire_while_failing().await;
        assert_eq!(retired, 0, "no tie-break when only one side dials");
        assert_eq!(calls, 1, "handled once, not again");
    })
    .await;
}

/// The test above: how many times the handler ran, and how many connections
/// the two nodes retired.
async fn expire_while_failing() -> (usize, u64) {
    let key = MeshKey::generate();
    let receiver = start(builder(&MemoryNetwork::new(), "orders", &key)).await;
    let sender = start(
        builder(&MemoryNetwork::new(), "payments", &key)
            .seed(receiver.local_addr())
            .retry_backoff(Duration::from_millis(20), Duration::from_millis(100)),
    )
    .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let msgs = receiver.messages().expect("messages");
    tokio::spawn(msgs.handle(1, move |_m| {
        counted.fetch_add(1, Ordering::SeqCst);
        async {
            // Longer than the TTL: it passes while the message is in flight.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Err::<(), _>(HandlerError::retry("failed after the deadline"))
        }
    }));
    assert!(
        sender
            .wait_for_instances("orders", 1, Duration::from_secs(10))
            .await
    );
    let r = sender
        .send("orders", Outgoing::new("x").ttl(Duration::from_secs(1)))
        .await
        .expect("stored");
    dead_lettered_as_expired(r).await;
    // A redelivery would have come 20 ms after the failure.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut retired = 0;
    for node in [&sender, &receiver] {
        retired += node.status().await.expect("status").connections_retired;
    }
    sender.shutdown().await;
    receiver.shutdown().await;
    (calls.load(Ordering::SeqCst), retired)
}

/// A sender that stops while its consumers are still handling its entries (their acks never
/// reach it) resends them after its restart. Each consumer's dedup window drops what it
/// handled, but only if the entry comes back to the same instance: the restarted sender
/// holds what it recovered (`NodeBuilder::recovered_hold`) until it has met the instances
/// it knew, instead of handing every key to whichever connected first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sender_resends_to_the_instances_that_handled_its_entries() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let dir = tempfile::tempdir().expect("tempdir");
        const KEYS: usize = 32;
        // Every handled message, by payload; a first handling takes a second, so the sender
        // stops before any ack reaches it.
        let handled: Arc<std::sync::Mutex<HashMap<String, usize>>> = Arc::default();
        let finished = Arc::new(AtomicUsize::new(0));
        let mut consumers = Vec::new();
        for _ in 0..2 {
            let node = start(builder(&net, "orders", &key)).await;
            let (handled, finished) = (handled.clone(), finished.clone());
            let mut messages = node.messages().expect("messages");
            // A task per message, so that every key's handling runs at once.
            tokio::spawn(async move {
                while let Some(d) = messages.next().await {
                    let first = {
                        let mut h = handled.lock().expect("lock");
                        let n = h.entry(d.message().payload_text()).or_default();
                        *n += 1;
                        *n == 1
                    };
                    let finished = finished.clone();
                    tokio::spawn(async move {
                        if first {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        d.ack().await;
                        finished.fetch_add(1, Ordering::Relaxed);
                    });
                }
            });
            consumers.push(node);
        }
        let sender_builder = || {
            builder(&net, "payments", &key)
                .data_dir(dir.path())
                .shutdown_grace(Duration::from_millis(200))
                // Longer than the default (500 ms): under a loaded CI machine an instance
                // once connected later than that after the restart, and one key went to the
                // other instance (the hold's documented limit). The mechanism is the same.
                .recovered_hold(Duration::from_secs(2))
        };
        let sender = start(sender_builder()).await;
        assert!(
            sender
                .wait_for_consumers("orders", 2, Duration::from_secs(10))
                .await
        );
        // That start-up race is not what this test is about.
        connections_settled(&sender, 2).await;
        for i in 0..KEYS {
            // The receipts never learn the outcome: the sender stops before the acks.
            let _ = sender
                .send("orders", Outgoing::new(format!("{i}")).key(format!("k{i}")))
                .await
                .expect("stored");
        }
        eventually(10, "every message handled once", || async {
            handled.lock().expect("lock").len() == KEYS
        })
        .await;
        sender.shutdown().await;
        let offline = peerbus::control::offline_status(dir.path()).expect("offline status");
        assert_eq!(
            offline.logs["svc:orders"].waiting, KEYS,
            "the sender stopped before any ack came"
        );
        eventually(10, "every handler finished", || async {
            finished.load(Ordering::Relaxed) == KEYS
        })
        .await;
        let before: Vec<_> = {
            let h = handled.lock().expect("lock");
            h.iter()
                .filter(|(_, n)| **n > 1)
                .map(|(p, n)| (p.clone(), *n))
                .collect()
        };
        assert!(
            before.is_empty(),
            "handled twice before the restart: {before:?}"
        );

        let sender = start(sender_builder()).await;
        settled(&sender, "svc:orders", 20).await;
        let handled = handled.lock().expect("lock").clone();
        let twice: Vec<_> = handled.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "handled again after the restart: {twice:?}"
        );
        sender.shutdown().await;
        for c in consumers {
            c.shutdown().await;
        }
    })
    .await;
}
