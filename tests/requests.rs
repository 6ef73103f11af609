//! Request/reply: deadlines, no responders, breaker, bulkhead, idempotent retries,
//! scatter-gather. In process, real QUIC on 127.0.0.1.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Gate, builder, eventually, start, within};
use peerbus::{
    BreakerConfig, BreakerState, HandlerError, MemoryNetwork, MeshKey, Node, RequestError,
    RequestOptions,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_travels_and_timeout_and_no_responders_are_clear() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        let err = client
            .request("accounts", "x", Duration::from_secs(2))
            .await
            .expect_err("none");
        assert!(matches!(err, RequestError::NoResponders { .. }), "{err}");
        let t0 = std::time::Instant::now();
        let server = start(builder(&net, "accounts", &key)).await;
        server
            .serve(|req| async move {
                // The budget arrives with the request.
                let budget = req.budget();
                if req.payload_text() == "slow" {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                Ok(format!("{}", budget.as_millis()).into())
            })
            .await
            .expect("serve");
        assert!(
            client
                .wait_for_instances("accounts", 1, Duration::from_secs(10))
                .await
        );
        eventually(10, "serving announced", || async {
            client
                .request("accounts", "hi", Duration::from_millis(800))
                .await
                .is_ok()
        })
        .await;
        let budget: u64 = String::from_utf8(
            client
                .request("accounts", "hi", Duration::from_millis(5000))
                .await
                .expect("reply")
                .to_vec(),
        )
        .expect("utf8")
        .parse()
        .expect("ms");
        // Wide enough that a busy machine's delay in delivering the request
        // cannot take the budget under its lower bound.
        assert!(
            (3000..=5000).contains(&budget),
            "server saw a budget of {budget} ms"
        );
        let t1 = std::time::Instant::now();
        let err = client
            .request("accounts", "slow", Duration::from_millis(300))
            .await
            .expect_err("timeout");
        assert!(matches!(err, RequestError::Timeout { .. }), "{err}");
        assert!(t1.elapsed() < Duration::from_secs(2), "timed out on time");
        assert!(err.to_string().contains("timed out"), "{err}");
        let _ = t0;
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_on_failures_fails_fast_and_closes_after_recovery() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let cfg = BreakerConfig {
            window_ms: 5_000,
            min_requests: 5,
            failure_ratio: 0.5,
            // Long enough that the checks below, on a busy machine, see it still open.
            cooldown_ms: 3_000,
            half_open_probes: 1,
        };
        let client = start(builder(&net, "web", &key).circuit_breaker(cfg)).await;
        let server = start(builder(&net, "accounts", &key)).await;
        let healthy = Arc::new(AtomicBool::new(false));
        let h = healthy.clone();
        server
            .serve(move |_req| {
                let ok = h.load(Ordering::SeqCst);
                async move {
                    if ok {
                        Ok("fine".into())
                    } else {
                        Err(HandlerError::retry("database down"))
                    }
                }
            })
            .await
            .expect("serve");
        eventually(10, "server reachable", || async {
            matches!(
                client
                    .request("accounts", "x", Duration::from_millis(500))
                    .await,
                Err(RequestError::Remote { .. })
            )
        })
        .await;
        for _ in 0..5 {
            let _ = client
                .request("accounts", "x", Duration::from_secs(1))
                .await;
        }
        let err = client
            .request("accounts", "x", Duration::from_secs(1))
            .await
            .expect_err("open");
        assert!(matches!(err, RequestError::BreakerOpen { .. }), "{err}");
        let st = client.status().await.expect("status");
        assert_eq!(st.breakers["accounts"].state, BreakerState::Open);
        // Recovery: after the cool-down a probe succeeds and closes the breaker.
        healthy.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(3_100)).await;
        assert_eq!(
            &client
                .request("accounts", "x", Duration::from_secs(1))
                .await
                .expect("probe")[..],
            b"fine"
        );
        assert_eq!(
            client.status().await.expect("status").breakers["accounts"].state,
            BreakerState::Closed
        );
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulkhead_refuses_past_its_limit() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key).max_requests_in_flight_per_service(2)).await;
        let server = start(builder(&net, "reports", &key)).await;
        server
            .serve(|_req| async {
                tokio::time::sleep(Duration::from_millis(700)).await;
                Ok("done".into())
            })
            .await
            .expect("serve");
        until_served(&client, "reports", "x", Duration::from_secs(2)).await;
        let c1 = client.clone();
        let c2 = client.clone();
        let a =
            tokio::spawn(async move { c1.request("reports", "a", Duration::from_secs(3)).await });
        let b =
            tokio::spawn(async move { c2.request("reports", "b", Duration::from_secs(3)).await });
        eventually(10, "requests a and b in flight", || async {
            client
                .status()
                .await
                .is_some_and(|s| s.breakers.get("reports").is_some_and(|b| b.in_flight == 2))
        })
        .await;
        let err = client
            .request("reports", "c", Duration::from_secs(3))
            .await
            .expect_err("bulkhead");
        assert!(
            matches!(err, RequestError::Bulkhead { limit: 2, .. }),
            "{err}"
        );
        assert!(a.await.expect("join").is_ok() && b.await.expect("join").is_ok());
        client
            .request("reports", "d", Duration::from_secs(3))
            .await
            .expect("room again");
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_retry_and_others_do_not() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        // No responder yet: a plain request fails at once.
        let err = client
            .request("prices", "x", Duration::from_secs(3))
            .await
            .expect_err("none");
        assert!(matches!(err, RequestError::NoResponders { .. }));
        // An idempotent one keeps trying while the responder starts.
        let net2 = net.clone();
        let key2 = key.clone();
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let s = start(builder(&net2, "prices", &key2)).await;
            s.serve(|_r| async { Ok("42".into()) })
                .await
                .expect("serve");
            s
        });
        let opts = RequestOptions::new(Duration::from_secs(8))
            .idempotent()
            .max_attempts(40);
        let reply = client
            .request_with("prices", "x", opts)
            .await
            .expect("retried until served");
        assert_eq!(&reply[..], b"42");
        let server = server.await.expect("join");
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scatter_gather_collects_until_the_deadline() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        let mut servers = Vec::new();
        let answered = Arc::new(AtomicUsize::new(0));
        for i in 0..3u64 {
            let s = start(builder(&net, "inventory", &key)).await;
            let answered = answered.clone();
            s.serve(move |_r| {
                let answered = answered.clone();
                async move {
                    // The third instance is too slow for the deadline.
                    if i == 2 {
                        tokio::time::sleep(Duration::from_secs(6)).await;
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                    Ok(format!("stock-{i}").into())
                }
            })
            .await
            .expect("serve");
            servers.push(s);
        }
        assert!(
            client
                .wait_for_instances("inventory", 3, Duration::from_secs(10))
                .await
        );
        eventually(10, "all three serve", || async {
            client.status().await.is_some_and(|_| true)
                && client
                    .scatter("inventory", "warm", Duration::from_millis(300), Some(2))
                    .await
                    .is_ok_and(|r| r.len() == 2)
        })
        .await;
        let t0 = std::time::Instant::now();
        let replies = client
            .scatter("inventory", "how many?", Duration::from_secs(2), None)
            .await
            .expect("scatter");
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "returned at the deadline"
        );
        assert_eq!(replies.len(), 2, "the slow instance missed the deadline");
        let mut texts: Vec<String> = replies
            .iter()
            .map(|r| String::from_utf8_lossy(r.result.as_ref().expect("ok")).into_owned())
            .collect();
        texts.sort();
        assert_eq!(texts, vec!["stock-0", "stock-1"]);
        // With a count, it returns as soon as that many arrived.
        let first = client
            .scatter("inventory", "any", Duration::from_secs(5), Some(1))
            .await
            .expect("scatter");
        assert_eq!(first.len(), 1);
        let err = client
            .scatter("nobody", "x", Duration::from_millis(100), None)
            .await
            .expect_err("none");
        assert!(matches!(err, RequestError::NoResponders { .. }));
        client.shutdown().await;
        for s in servers {
            s.shutdown().await;
        }
    })
    .await;
}

/// Replies racing their callers' deadlines: every caller gets its reply or a timeout, nothing
/// else, and once the late replies are in nothing stays counted in flight (the reply reaches
/// the caller before core hears of it, so core must still see every request end): the
/// bulkhead lets a full batch through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_racing_their_deadlines_leave_nothing_in_flight() {
    const CALLS: usize = 40;
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        // Timeouts must not open the breaker: this test is about the counts.
        let lenient = BreakerConfig {
            min_requests: 1_000_000,
            ..BreakerConfig::default()
        };
        let client = start(
            builder(&net, "web", &key)
                .circuit_breaker(lenient)
                .max_requests_in_flight_per_service(CALLS),
        )
        .await;
        let server = start(builder(&net, "clock", &key)).await;
        server
            .serve(|req| async move {
                let ms: u64 = req.payload_text().parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok("done".into())
            })
            .await
            .expect("serve");
        until_served(&client, "clock", "0", Duration::from_secs(1)).await;
        let (mut replies, mut timeouts) = (0, 0);
        for _round in 0..5 {
            let mut calls = Vec::new();
            for i in 0..CALLS {
                let c = client.clone();
                // Handler times spread across the 200 ms deadline, both sides of it, with
                // room for a busy machine on either side.
                let ms = 100 + (i * 200 / CALLS) as u64;
                calls.push(tokio::spawn(async move {
                    c.request("clock", ms.to_string(), Duration::from_millis(200))
                        .await
                }));
            }
            for call in calls {
                match call.await.expect("join") {
                    Ok(b) => {
                        assert_eq!(&b[..], b"done");
                        replies += 1;
                    }
                    Err(RequestError::Timeout { .. }) => timeouts += 1,
                    Err(e) => panic!("a racing request ended with {e}"),
                }
            }
            // Requests whose handler was abandoned end at their deadline; the next round
            // needs the room.
            in_flight_drains(&client).await;
        }
        assert!(
            replies > 0 && timeouts > 0,
            "the race ran both ways: {replies} replies, {timeouts} timeouts"
        );
        let mut calls = Vec::new();
        for _ in 0..CALLS {
            let c = client.clone();
            calls.push(tokio::spawn(async move {
                c.request("clock", "50", Duration::from_secs(5)).await
            }));
        }
        for call in calls {
            let r = call.await.expect("join");
            assert!(r.is_ok(), "the bulkhead kept a count: {r:?}");
        }
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// A request whose instance goes away fails at once as `PeerLost`, not at its deadline, and
/// ends its count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_instance_goes_away_fails_as_peer_lost() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        let server =
            start(builder(&net, "slow", &key).shutdown_grace(Duration::from_millis(300))).await;
        let hanging = Arc::new(tokio::sync::Notify::new());
        let started = hanging.clone();
        server
            .serve(move |req| {
                let started = started.clone();
                async move {
                    if req.payload_text() == "hang" {
                        started.notify_one();
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                    Ok("done".into())
                }
            })
            .await
            .expect("serve");
        until_served(&client, "slow", "x", Duration::from_secs(1)).await;
        let c = client.clone();
        let call =
            tokio::spawn(async move { c.request("slow", "hang", Duration::from_secs(20)).await });
        // The instance leaves while its handler runs the request.
        hanging.notified().await;
        let t0 = std::time::Instant::now();
        let stopping = tokio::spawn(async move { server.shutdown().await });
        let err = call
            .await
            .expect("join")
            .expect_err("the instance went away");
        assert!(matches!(err, RequestError::PeerLost { .. }), "{err}");
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "failed when the instance left, not when the handler would have answered: {:?}",
            t0.elapsed()
        );
        in_flight_drains(&client).await;
        stopping.await.expect("join");
        client.shutdown().await;
    })
    .await;
}

/// Serves on `server` a handler that takes `hold` and answers with its request's payload;
/// returns the most handlers that ran at once, counted as they run.
async fn serve_counting(server: &Node, hold: Duration) -> Arc<AtomicUsize> {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (r, m) = (running, most.clone());
    server
        .serve(move |req| {
            let (r, m) = (r.clone(), m.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(hold).await;
                r.fetch_sub(1, Ordering::SeqCst);
                Ok(req.payload().clone())
            }
        })
        .await
        .expect("serve");
    most
}

/// `serve_concurrency` bounds the handlers running at once; requests beyond it wait their
/// turn (in the serve queue) and are all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_at_most_its_concurrency_and_queues_the_rest() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        let server = start(builder(&net, "pool", &key).serve_concurrency(2)).await;
        let most = serve_counting(&server, Duration::from_millis(50)).await;
        until_served(&client, "pool", "x", Duration::from_secs(1)).await;
        let mut calls = Vec::new();
        for _ in 0..12 {
            let c = client.clone();
            calls.push(tokio::spawn(async move {
                c.request("pool", "x", Duration::from_secs(10)).await
            }));
        }
        for call in calls {
            assert_eq!(&call.await.expect("join").expect("answered")[..], b"x");
        }
        assert_eq!(most.load(Ordering::SeqCst), 2, "handlers at once");
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// Requests made from tasks go on streams of their own, each served by that stream's task on
/// the server (protocol 7): there too `serve_concurrency` bounds the handlers running at once,
/// and a stream's request waits for a slot, then is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_kept_streams_wait_for_a_serve_slot() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        let server = start(builder(&net, "pool", &key).serve_concurrency(1)).await;
        let most = serve_counting(&server, Duration::from_millis(30)).await;
        until_served(&client, "pool", "x", Duration::from_secs(1)).await;
        let own_before = client.status().await.expect("status").requests_own_stream;
        // Two callers, each with one request in flight at a time: the node never has more
        // than two, so every request goes on a stream of its own.
        let mut callers = Vec::new();
        for caller in 0..2 {
            let c = client.clone();
            callers.push(tokio::spawn(async move {
                for i in 0..5 {
                    let text = format!("{caller}/{i}");
                    let reply = c
                        .request("pool", text.clone(), Duration::from_secs(5))
                        .await
                        .unwrap_or_else(|e| panic!("{text}: {e}"));
                    assert_eq!(String::from_utf8_lossy(&reply), text);
                }
            }));
        }
        for caller in callers {
            caller.await.expect("caller");
        }
        let own = client.status().await.expect("status").requests_own_stream - own_before;
        assert_eq!(own, 10, "every request read its reply on its own stream");
        assert_eq!(most.load(Ordering::SeqCst), 1, "handlers at once");
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// Requests go out on the connection's direct stream from core, without the writer's hop;
/// when QUIC cannot take a request at once (here: several of 3 MiB, past the 8 MiB stream
/// window), what is left is flushed by a task of its own and later requests go through the
/// writer's lanes meanwhile. Every one arrives whole and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_past_the_stream_window_all_arrive_whole() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        let server = start(builder(&net, "store", &key)).await;
        server
            .serve(|req| async move {
                let p = req.payload();
                // The first and last byte say which request this is; every byte must match.
                let whole = p.iter().all(|b| *b == p[0]);
                Ok(format!("{} {}", p[0], if whole { p.len() } else { 0 }).into())
            })
            .await
            .expect("serve");
        until_served(&client, "store", "x", Duration::from_secs(5)).await;
        const SIZE: usize = 3 * 1024 * 1024;
        let mut calls = Vec::new();
        for i in 0..16u8 {
            let c = client.clone();
            calls.push(tokio::spawn(async move {
                let payload = bytes::Bytes::from(vec![i; SIZE]);
                let reply = c.request("store", payload, Duration::from_secs(30)).await;
                (i, reply)
            }));
        }
        for call in calls {
            let (i, reply) = call.await.expect("join");
            let reply = reply.unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(String::from_utf8_lossy(&reply), format!("{i} {SIZE}"));
        }
        in_flight_drains(&client).await;
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// A reply's bookkeeping reaches core before its caller's next request: back-to-back requests
/// never find the bulkhead of one taken by the request before, and nothing stays in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_requests_fit_a_bulkhead_of_one() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key).max_requests_in_flight_per_service(1)).await;
        let server = start(builder(&net, "echo", &key)).await;
        server
            .serve(|req| async move {
                match req.payload_text().as_str() {
                    "fail" => Err(HandlerError::reject("refused")),
                    _ => Ok(req.payload().clone()),
                }
            })
            .await
            .expect("serve");
        until_served(&client, "echo", "x", Duration::from_secs(1)).await;
        for i in 0..200 {
            let payload = if i % 10 == 9 { "fail" } else { "ping" };
            match client
                .request("echo", payload, Duration::from_secs(5))
                .await
            {
                Ok(b) => assert_eq!(&b[..], b"ping"),
                Err(RequestError::Remote { .. }) if payload == "fail" => {}
                Err(e) => panic!("request {i} ({payload}) ended with {e}"),
            }
        }
        let status = client.status().await.expect("status");
        assert_eq!(
            status.requests_in_flight, 0,
            "in flight right after the last reply"
        );
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// A handler that panics fails its own request with a clear error, whether it panics in its
/// own call (before its future exists) or before its first wait (on the lane reader, both)
/// or after (in a task of its own), and not the lane it arrived on: the requests after it,
/// on every lane, are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_request_not_its_lane() {
    within(30, async {
        let (client, server) = web_and_echo().await;
        server
            .serve(|req| {
                panic_on_boom_at_once(&req);
                async move {
                    match req.payload_text().as_str() {
                        "boom" => panic!("the handler fails on purpose"),
                        "boom later" => {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            panic!("the handler fails on purpose, after a wait");
                        }
                        _ => Ok(req.payload().clone()),
                    }
                }
            })
            .await
            .expect("serve");
        until_served(&client, "echo", "x", Duration::from_secs(1)).await;
        fail_remotely(
            &client,
            // First while the handler's first polls are quick (so on the lane reader), then
            // again after the other panics (whose unwinding is slow enough that the handler
            // runs in tasks of its own from then on).
            &["boom at once", "boom", "boom later", "boom at once", "boom"],
            "panicked",
        )
        .await;
        every_lane_answers(&client, "the panics").await;
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// Requests that find every `serve_concurrency` slot taken wait in the serve task's queue. A
/// handler that panics in its own call there fails its request, not that task: before, the
/// task ended and every later request that had to wait for a slot failed with "stopped
/// serving requests".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panicking_in_its_call_after_waiting_for_a_slot_fails_only_its_request() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        let server = start(builder(&net, "echo", &key).serve_concurrency(1)).await;
        server
            .serve(|req| {
                panic_on_boom_at_once(&req);
                async move {
                    if req.payload_text() == "hold" {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    Ok(req.payload().clone())
                }
            })
            .await
            .expect("serve");
        until_served(&client, "echo", "x", Duration::from_secs(1)).await;
        for (payload, want) in [("boom at once", Err("panicked")), ("after", Ok("after"))] {
            // "hold" takes the only slot, so `payload` waits for it in the serve task's queue.
            let c = client.clone();
            let hold =
                tokio::spawn(
                    async move { c.request("echo", "hold", Duration::from_secs(5)).await },
                );
            tokio::time::sleep(Duration::from_millis(100)).await;
            let got = client
                .request("echo", payload, Duration::from_secs(5))
                .await;
            match (want, &got) {
                (Ok(text), Ok(reply)) => assert_eq!(&reply[..], text.as_bytes()),
                (Err(reason), Err(RequestError::Remote { message, .. }))
                    if message.contains(reason) => {}
                _ => panic!("{payload}: {got:?}, wanted {want:?}"),
            }
            assert_eq!(&hold.await.expect("join").expect("hold")[..], b"hold");
        }
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// A reply over the maximum message size fails its request with a clear error and harms
/// nothing else: before, the 9 MiB frame stopped the connection's writer, and every later
/// reply and delivery to the requester was silently lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_reply_is_an_error_and_the_connection_carries_on() {
    within(30, async {
        let (client, server) = web_and_echo().await;
        server
            .serve(|req| async move {
                match req.payload_text().as_str() {
                    "big" => Ok(vec![7u8; 9 << 20].into()),
                    "big later" => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        Ok(vec![7u8; 5 << 20].into())
                    }
                    _ => Ok(req.payload().clone()),
                }
            })
            .await
            .expect("serve");
        until_served(&client, "echo", "x", Duration::from_secs(1)).await;
        fail_remotely(&client, &["big", "big later"], "maximum message size").await;
        every_lane_answers(&client, "the oversized replies").await;
        // The server's deliveries to the client still flow on that connection.
        let mut got = client.messages().expect("messages");
        let receipt = server.send("web", "after").await.expect("send");
        let delivery = tokio::time::timeout(Duration::from_secs(10), got.next())
            .await
            .expect("delivered in time")
            .expect("a message");
        assert_eq!(delivery.message().payload_text(), "after");
        delivery.ack().await;
        tokio::time::timeout(Duration::from_secs(10), receipt.acked())
            .await
            .expect("acked in time")
            .expect("acked");
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// Replies find their requests whichever way they travel: handlers that answer without
/// waiting are replied to from the lane reader (on the connection's reply stream, or through
/// the writer when another reader is writing there), handlers that wait from their own task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_find_their_requests_whether_the_handler_waits_or_not() {
    within(30, async {
        let (client, server) = web_and_echo().await;
        server
            .serve(|req| async move {
                let n: u64 = req.payload_text().parse().map_err(|_| {
                    HandlerError::Reject(format!("not a number: {}", req.payload_text()))
                })?;
                if n.is_multiple_of(3) {
                    tokio::time::sleep(Duration::from_millis(n % 7)).await;
                }
                Ok(format!("{}", n * 2).into())
            })
            .await
            .expect("serve");
        until_served(&client, "echo", "1", Duration::from_secs(1)).await;
        let mut callers = Vec::new();
        for c in 0..16u64 {
            let client = client.clone();
            callers.push(tokio::spawn(async move {
                for i in 0..40u64 {
                    let n = c * 1000 + i;
                    let reply = client
                        .request("echo", n.to_string(), Duration::from_secs(5))
                        .await
                        .unwrap_or_else(|e| panic!("request {n}: {e}"));
                    assert_eq!(
                        String::from_utf8_lossy(&reply),
                        (n * 2).to_string(),
                        "the reply to {n}"
                    );
                }
            }));
        }
        for c in callers {
            c.await.expect("caller");
        }
        in_flight_drains(&client).await;
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// Two nodes of one mesh: a `web` client and an `echo` server (which serves nothing yet).
/// A request with a short deadline ends at that deadline (its in-flight count and slot
/// freed, a failure for the breaker) even behind one with a long deadline: core's sweep
/// looks again at the soonest deadline any request has, not only at the first one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_deadline_ends_on_time_behind_a_long_one() {
    within(60, async {
        let (client, server) = web_and_echo().await;
        // A "hold" request's handler waits until this turns true, however late it starts.
        let (release, held) = tokio::sync::watch::channel(false);
        server
            .serve(move |req| {
                let mut held = held.clone();
                async move {
                    if req.payload_text() == "hold" {
                        let _ = held.wait_for(|go| *go).await;
                    }
                    Ok(req.payload().clone())
                }
            })
            .await
            .expect("serve");
        until_served(&client, "echo", "x", Duration::from_secs(1)).await;
        in_flight_drains(&client).await;
        let in_flight =
            |client: Node| async move { client.status().await.expect("status").requests_in_flight };
        let long = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .request("echo", "hold", Duration::from_secs(40))
                    .await
            }
        });
        eventually(10, "the long request in flight", || {
            let client = client.clone();
            async move { in_flight(client).await == 1 }
        })
        .await;
        // A tick (50 ms) walks nothing until the long request's deadline: only its own.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let err = client
            .request("echo", "hold", Duration::from_millis(200))
            .await
            .expect_err("the handler holds it past its deadline");
        assert!(matches!(err, RequestError::Timeout { .. }), "{err}");
        // Core forgets it at the first tick after its deadline: well before the long one's.
        eventually(5, "the short request forgotten", || {
            let client = client.clone();
            async move { in_flight(client).await == 1 }
        })
        .await;
        release
            .send(true)
            .expect("the server's handler holds a receiver");
        assert_eq!(
            &long
                .await
                .expect("join")
                .expect("the long request answered")[..],
            b"hold"
        );
        in_flight_drains(&client).await;
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

async fn web_and_echo() -> (Node, Node) {
    let net = MemoryNetwork::new();
    let key = MeshKey::generate();
    let client = start(builder(&net, "web", &key)).await;
    let server = start(builder(&net, "echo", &key)).await;
    (client, server)
}

/// Each request of `payloads` to `echo` fails with the handler's side's error, which names
/// `reason`.
async fn fail_remotely(client: &Node, payloads: &[&str], reason: &str) {
    for payload in payloads {
        let err = client
            .request("echo", *payload, Duration::from_secs(5))
            .await
            .expect_err("an error reply");
        assert!(
            matches!(&err, RequestError::Remote { message, .. } if message.contains(reason)),
            "{payload}: {err}"
        );
    }
}

/// Requests to `echo` after `what` are answered: more of them than lanes, one after the
/// other, so each lane carries some.
async fn every_lane_answers(client: &Node, what: &str) {
    for i in 0..16 {
        let reply = client
            .request("echo", "ping", Duration::from_secs(2))
            .await
            .unwrap_or_else(|e| panic!("request {i} after {what}: {e}"));
        assert_eq!(&reply[..], b"ping");
    }
}

/// Waits until `client` gets a reply from `service` to `payload` within `timeout`.
/// One peer's requests reach the server on one stream, read by one task. A handler that
/// computes before it answers must not run there one request after another: its requests run
/// at once, on both cores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_handlers_of_one_peers_requests_run_at_once() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        let server = start(builder(&net, "crunch", &key)).await;
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (r, m) = (running.clone(), most.clone());
        server
            .serve(move |_req| {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                // Busy for 20 ms before the handler's future even exists: all of it is the
                // first poll's work as a lane reader sees it.
                let t = std::time::Instant::now();
                while t.elapsed() < Duration::from_millis(20) {
                    std::hint::spin_loop();
                }
                r.fetch_sub(1, Ordering::SeqCst);
                async { Ok("done".into()) }
            })
            .await
            .expect("serve");
        until_served(&client, "crunch", "warm", Duration::from_secs(1)).await;
        for _round in 0..4 {
            let calls: Vec<_> = (0..16)
                .map(|_| {
                    let c = client.clone();
                    tokio::spawn(
                        async move { c.request("crunch", "x", Duration::from_secs(20)).await },
                    )
                })
                .collect();
            for call in calls {
                let reply = call.await.expect("join").expect("reply");
                assert_eq!(&reply[..], b"done");
            }
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most >= 2, "at most {most} handler ran at a time");
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// A node says it serves just after it connects. `wait_for_servers` waits for that word, and
/// wakes on it: a request sent then is served, where one sent as soon as the instance was
/// connected could find no responder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_servers_wakes_when_a_connected_instance_starts_serving() {
    within(30, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        let server = start(builder(&net, "clock", &key)).await;
        assert!(
            client
                .wait_for_instances("clock", 1, Duration::from_secs(10))
                .await
        );
        // Connected, not serving.
        assert!(client.servers("clock").await.is_empty());
        assert!(
            !client
                .wait_for_servers("clock", 1, Duration::from_millis(200))
                .await
        );
        let err = client
            .request("clock", "t", Duration::from_secs(1))
            .await
            .expect_err("nobody serves yet");
        assert!(matches!(err, RequestError::NoResponders { .. }), "{err}");
        let c = client.clone();
        let waiting = tokio::spawn(async move {
            c.wait_for_servers("clock", 1, Duration::from_secs(10))
                .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let serving = server
            .serve(|_req| async { Ok("tick".into()) })
            .await
            .expect("serve");
        assert!(waiting.await.expect("join"), "not woken by the word");
        assert_eq!(client.servers("clock").await, vec![server.id()]);
        let reply = client
            .request("clock", "t", Duration::from_secs(5))
            .await
            .expect("served");
        assert_eq!(&reply[..], b"tick");
        serving.stop().await;
        eventually(10, "no server once it stopped serving", || async {
            client.servers("clock").await.is_empty()
        })
        .await;
        client.shutdown().await;
        server.shutdown().await;
    })
    .await;
}

/// Panics on the payload `boom at once`: a handler that calls this fails in its own call,
/// before its future exists.
fn panic_on_boom_at_once(req: &peerbus::Request) {
    assert_ne!(
        req.payload_text(),
        "boom at once",
        "the handler fails on purpose"
    );
}

async fn until_served(client: &peerbus::Node, service: &str, payload: &str, timeout: Duration) {
    eventually(10, "server reachable", || async {
        client.request(service, payload, timeout).await.is_ok()
    })
    .await;
}

/// Waits until `node` counts no request in flight (each one got its reply or its deadline).
async fn in_flight_drains(node: &peerbus::Node) {
    eventually(10, "nothing left in flight", || async {
        node.status()
            .await
            .is_some_and(|s| s.requests_in_flight == 0)
    })
    .await;
}

/// Nodes that find each other at once both dial, and both keep the connection dialled by the
/// smaller id. Requests sent on the other one before the winner arrived still get their
/// replies: the loser is retired, not closed, and closes once both sides have no request
/// waiting on it (well before its linger, 30 s). Closing it at once failed such requests
/// with `PeerLost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_the_loser_of_a_tie_break_get_their_replies() {
    within(150, tie_break_rounds(Duration::from_millis(150), None, 16)).await;
}

/// A retired connection lingers for a while at most, but a request on it is answered however
/// long its handler runs within the request's timeout: the serving side keeps the connection
/// open until the deadline of the requests the peer sent on it. (Before, the serving side
/// closed it when its own linger ran out, failing the requester's calls with `PeerLost`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_outlasting_a_retired_connections_linger_is_answered() {
    within(
        150,
        tie_break_rounds(
            Duration::from_millis(900),
            Some(Duration::from_millis(100)),
            40,
        ),
    )
    .await;
}

/// Rounds of four nodes that learn of each other at once (so tie-breaks are lost with
/// requests on the losing connections), whose handlers take `handler`, until `enough`
/// connections were retired (or 20 rounds passed): every request must be answered. `linger`
/// shortens how long a retired connection stays open at most.
async fn tie_break_rounds(handler: Duration, linger: Option<Duration>, enough: u64) {
    let key = MeshKey::generate();
    let mut retired = 0;
    let mut answered = 0;
    // Rounds until some tie-breaks were lost with requests on them (each round of four
    // nodes has six pairs; most rounds retire several connections).
    for round in 0..20 {
        let gate = Gate::default();
        let mut nodes: Vec<Node> = Vec::new();
        for i in 0..4 {
            let mut b = Node::builder(format!("n{i}"))
                .mesh("test")
                .mesh_key(key.clone())
                .listen("127.0.0.1:0".parse().expect("addr"))
                .discovery(gate.clone())
                .shutdown_grace(Duration::from_millis(500));
            if let Some(linger) = linger {
                b = b.retired_linger(linger);
            }
            nodes.push(start(b).await);
        }
        for n in &nodes {
            n.serve(move |req| async move {
                // Long enough to be in flight when the winning connection arrives.
                tokio::time::sleep(handler).await;
                Ok(req.payload().clone())
            })
            .await
            .expect("serve");
        }
        gate.reveal().await;
        // Every node asks every other service, three at once, as soon as it sees it.
        let mut asks = tokio::task::JoinSet::new();
        for (i, n) in nodes.iter().enumerate() {
            for j in (0..nodes.len()).filter(|j| *j != i) {
                let n = n.clone();
                asks.spawn(async move {
                    let service = format!("n{j}");
                    assert!(
                        n.wait_for_instances(&service, 1, Duration::from_secs(10))
                            .await,
                        "n{i} never saw {service}"
                    );
                    let mut calls = tokio::task::JoinSet::new();
                    for k in 0..3 {
                        let n = n.clone();
                        let service = service.clone();
                        calls.spawn(async move {
                            let payload = format!("n{i}-{k}");
                            let reply = n
                                .request(&service, payload.clone(), Duration::from_secs(5))
                                .await
                                .unwrap_or_else(|e| {
                                    panic!("round {round}: n{i} asking {service}: {e}")
                                });
                            assert_eq!(&reply[..], payload.as_bytes());
                        });
                    }
                    while let Some(call) = calls.join_next().await {
                        call.expect("request task");
                    }
                });
            }
        }
        while let Some(done) = asks.join_next().await {
            done.expect("asking task");
            answered += 3;
        }
        for n in &nodes {
            let s = n.status().await.expect("status");
            retired += s.connections_retired;
            // One connection per pair, and each retired one closes once its requests
            // are answered, long before it would be closed for its age.
            assert_eq!(s.connections, 3, "round {round}");
            eventually(10, "retired connections closed", || async {
                n.status()
                    .await
                    .is_some_and(|s| s.retiring_connections == 0)
            })
            .await;
        }
        for n in nodes {
            n.shutdown().await;
        }
        if retired >= enough {
            break;
        }
    }
    eprintln!("{retired} connections retired, {answered} requests answered");
    assert!(
        retired > 0,
        "no tie-break was lost in 20 rounds: nothing here was tested"
    );
}

/// A request made from a task, to an instance that speaks protocol 6 or later, travels on a
/// stream of its own and its caller reads the reply there (`Status::requests_own_stream`),
/// whatever the reply: a value, an error or a panic, from a handler polled in the task that
/// read the request or in a task of its own (one that waits, or whose first polls are slow,
/// as they may be on a loaded machine). To an instance of protocol 7 the stream is kept for
/// the next request (`Status::request_streams_opened`), and one whose request timed out is
/// not; to one held at protocol 6 each request opens a stream. A request that times out
/// ends at its deadline. A request made outside any task (here, the test's `block_on`), or
/// to an instance held at protocol 5, goes the shared way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_from_a_task_read_their_replies_on_their_own_streams() {
    within(60, async {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let client = start(builder(&net, "web", &key)).await;
        let server = start(builder(&net, "echo", &key)).await;
        let older = start(builder(&net, "older", &key).max_protocol_version(5)).await;
        let six = start(builder(&net, "six", &key).max_protocol_version(6)).await;
        for node in [&server, &older, &six] {
            node.serve(|req| async move {
                match req.payload_text().as_str() {
                    "wait" => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok("waited".into())
                    }
                    "fail" => Err(HandlerError::Reject("refused on purpose".into())),
                    "boom" => panic!("the handler fails on purpose"),
                    "slow" => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        Ok("late".into())
                    }
                    other => Ok(other.to_string().into()),
                }
            })
            .await
            .expect("serve");
        }
        until_served(&client, "echo", "x", Duration::from_secs(1)).await;
        until_served(&client, "older", "x", Duration::from_secs(1)).await;
        until_served(&client, "six", "x", Duration::from_secs(1)).await;
        let own = |node: Node| async move {
            node.status()
                .await
                .expect("status")
                .requests_own_stream
        };
        let opened = |node: Node| async move {
            node.status()
                .await
                .expect("status")
                .request_streams_opened
        };
        // From the test's `block_on`: the shared way.
        let before = own(client.clone()).await;
        let reply = client
            .request("echo", "from block_on", Duration::from_secs(5))
            .await
            .expect("reply");
        assert_eq!(&reply[..], b"from block_on");
        assert_eq!(own(client.clone()).await, before, "not from a task");

        let c = client.clone();
        let opened_before = opened(client.clone()).await;
        tokio::spawn(async move {
            echoes(&c, "echo", 50).await;
            assert_eq!(
                own(c.clone()).await,
                before + 50,
                "each request read its own reply"
            );
            let streams = opened(c.clone()).await - opened_before;
            assert!(
                (1..=2).contains(&streams),
                "50 requests one after another to protocol 7 opened {streams} streams"
            );
            let reply = c
                .request("echo", "wait", Duration::from_secs(5))
                .await
                .expect("a handler that waits");
            assert_eq!(&reply[..], b"waited");
            let err = c
                .request("echo", "fail", Duration::from_secs(5))
                .await
                .expect_err("an error reply");
            assert!(
                matches!(&err, RequestError::Remote { message, .. } if message.contains("refused on purpose")),
                "{err}"
            );
            let err = c
                .request("echo", "boom", Duration::from_secs(5))
                .await
                .expect_err("a panic");
            assert!(
                matches!(&err, RequestError::Remote { message, .. } if message.contains("panicked")),
                "{err}"
            );
            assert_eq!(own(c.clone()).await, before + 53, "a wait, an error, a panic");
            assert_eq!(
                opened(c.clone()).await - opened_before,
                streams,
                "a wait, an error and a panic kept their stream"
            );
            let t0 = std::time::Instant::now();
            let err = c
                .request("echo", "slow", Duration::from_millis(300))
                .await
                .expect_err("a timeout");
            assert!(matches!(err, RequestError::Timeout { .. }), "{err}");
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "ended at its deadline: {:?}",
                t0.elapsed()
            );
            // The timed-out request's stream is dropped, not kept: the next one opens another.
            echoes(&c, "echo", 3).await;
            assert_eq!(own(c.clone()).await, before + 56);
            assert_eq!(
                opened(c.clone()).await - opened_before,
                streams + 1,
                "a new stream after the timeout"
            );
            // To an instance held at protocol 6: a stream per request.
            let (own6, opened6) = (own(c.clone()).await, opened(c.clone()).await);
            echoes(&c, "six", 5).await;
            assert_eq!(own(c.clone()).await, own6 + 5);
            assert_eq!(opened(c.clone()).await, opened6 + 5, "protocol 6 keeps no stream");
            // To an instance of protocol 5: the shared way.
            let mid = own(c.clone()).await;
            echoes(&c, "older", 5).await;
            assert_eq!(own(c.clone()).await, mid, "protocol 5 takes no request streams");
        })
        .await
        .expect("caller");
        in_flight_drains(&client).await;
        for node in [client, server, older, six] {
            node.shutdown().await;
        }
    })
    .await;
}

/// `n` requests to `service`, one after another, each answered with its own payload.
async fn echoes(client: &Node, service: &str, n: usize) {
    for i in 0..n {
        let text = format!("{service} {i}");
        let reply = client
            .request(service, text.clone(), Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("request {i} to {service}: {e}"));
        assert_eq!(String::from_utf8_lossy(&reply), text);
    }
}
