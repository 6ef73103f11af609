//! `cargo bench --bench mesh`: publish fan-out and request/reply beside raw
//! transport baselines measured in the same run, on 127.0.0.1.
//!
//! Baselines use `peerbus-transport` directly (quinn plus the frame codec, no
//! node, no log, no acks): one connection, one stream, 1 KiB frames coalesced
//! into large writes; and a ping-pong of small frames on one bidirectional
//! stream. Ratios are what to compare across machines. Figures, not
//! assertions; every case is bounded in count and time.

use std::time::{Duration, Instant};

use bytes::Bytes;
use peerbus::{HandlerError, MemoryNetwork, MeshKey, Node};
use peerbus_transport::{Endpoint, EndpointConfig, Identity, Membership};

const PAYLOAD: usize = 1024;
const CAP: Duration = Duration::from_secs(120);

fn endpoint(key: &MeshKey) -> Endpoint {
    let id = Identity::generate().expect("identity");
    Endpoint::bind(EndpointConfig::new(
        id,
        Membership::Key(key.clone()),
        "127.0.0.1:0".parse().expect("addr"),
    ))
    .expect("bind")
}

/// Raw transport streaming: frames/s of 1 KiB frames on one uni stream.
async fn baseline_stream(frames: usize) -> f64 {
    let key = MeshKey::generate();
    let (a, b) = (endpoint(&key), endpoint(&key));
    let bb = b.clone();
    let server = tokio::spawn(async move {
        let conn = bb
            .accept()
            .await
            .expect("incoming")
            .complete()
            .await
            .expect("accept");
        let mut rx = conn.accept_uni().await.expect("uni");
        let mut n = 0usize;
        while let Ok(Some(_f)) = rx.recv::<Bytes>().await {
            n += 1;
        }
        n
    });
    let conn = a
        .connect(b.local_addr(), Some(b.node_id()))
        .await
        .expect("connect");
    let mut tx = conn.open_uni().await.expect("uni");
    let payload = Bytes::from(vec![0x42u8; PAYLOAD]);
    let t0 = Instant::now();
    for _ in 0..frames {
        tx.push(&payload).expect("push");
        if tx.buffered_bytes() >= 64 * 1024 {
            tx.flush().await.expect("flush");
        }
    }
    tx.finish().await.expect("finish");
    let got = server.await.expect("server");
    assert_eq!(got, frames);
    frames as f64 / t0.elapsed().as_secs_f64()
}

/// Raw transport ping-pong: round-trip latencies of small frames on one bi stream.
async fn baseline_pingpong(rounds: usize) -> Vec<Duration> {
    let key = MeshKey::generate();
    let (a, b) = (endpoint(&key), endpoint(&key));
    let bb = b.clone();
    tokio::spawn(async move {
        let conn = bb
            .accept()
            .await
            .expect("incoming")
            .complete()
            .await
            .expect("accept");
        let (mut tx, mut rx) = conn.accept_bi().await.expect("bi");
        while let Ok(Some(v)) = rx.recv::<u64>().await {
            if tx.send(&v).await.is_err() {
                break;
            }
        }
    });
    let conn = a
        .connect(b.local_addr(), Some(b.node_id()))
        .await
        .expect("connect");
    let (mut tx, mut rx) = conn.open_bi().await.expect("bi");
    let mut lat = Vec::with_capacity(rounds);
    for i in 0..rounds as u64 {
        let t = Instant::now();
        tx.send(&i).await.expect("send");
        let back: u64 = rx.recv().await.expect("recv").expect("frame");
        assert_eq!(back, i);
        lat.push(t.elapsed());
    }
    lat
}

fn node(net: &MemoryNetwork, key: &MeshKey, service: &str) -> peerbus::NodeBuilder {
    Node::builder(service)
        .mesh("bench")
        .mesh_key(key.clone())
        .listen("127.0.0.1:0".parse().expect("addr"))
        .discovery(net.discovery())
        .prefetch(1024)
}

/// publish of 1 KiB to `groups` subscriber groups: messages/s (each message = `groups` copies).
async fn publish(groups: usize, messages: usize) -> f64 {
    let net = MemoryNetwork::new();
    let key = MeshKey::generate();
    let publisher = node(&net, &key, "pub").start().await.expect("start");
    let mut subs = Vec::new();
    for g in 0..groups {
        let n = node(&net, &key, &format!("group{g}"))
            .start()
            .await
            .expect("start");
        let s = n.subscribe("bench.>").await.expect("sub");
        tokio::spawn(s.handle(4, |_m| async { Ok::<(), HandlerError>(()) }));
        subs.push(n);
    }
    let payload = Bytes::from(vec![0x42u8; PAYLOAD]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = publisher
            .publish("bench.warmup", payload.clone())
            .await
            .expect("publish");
        if r.copies() == groups {
            r.acked().await.expect("acked");
            break;
        }
        assert!(Instant::now() < deadline, "groups never all known");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..32usize {
        let p = publisher.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut rs = Vec::new();
            for _ in (s..messages).step_by(32) {
                rs.push(
                    p.publish("bench.tick", payload.clone())
                        .await
                        .expect("publish"),
                );
            }
            for r in rs {
                r.acked().await.expect("acked");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let rate = messages as f64 / t0.elapsed().as_secs_f64();
    publisher.shutdown().await;
    for n in subs {
        n.shutdown().await;
    }
    rate
}

/// request/reply round trips (one caller at a time) and requests/s with 32 concurrent callers.
async fn requests(rounds: usize) -> (Vec<Duration>, f64) {
    let net = MemoryNetwork::new();
    let key = MeshKey::generate();
    let server = node(&net, &key, "echo").start().await.expect("start");
    server
        .serve(|r| async move { Ok(r.payload().clone()) })
        .await
        .expect("serve");
    let client = node(&net, &key, "client").start().await.expect("start");
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .request("echo", "warm", Duration::from_millis(500))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "echo never reachable");
    }
    let mut lat = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        client
            .request("echo", "ping", Duration::from_secs(5))
            .await
            .expect("reply");
        lat.push(t.elapsed());
    }
    let t0 = Instant::now();
    let total = rounds * 4;
    let mut tasks = Vec::new();
    for c in 0..32usize {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for _ in (c..total).step_by(32) {
                client
                    .request("echo", "ping", Duration::from_secs(5))
                    .await
                    .expect("reply");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let rps = total as f64 / t0.elapsed().as_secs_f64();
    client.shutdown().await;
    server.shutdown().await;
    (lat, rps)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1e6
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 1 } else { 4 };
    rt.block_on(async {
        let run = async {
            println!(
                "peerbus mesh benchmark, 127.0.0.1, {} cores",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            );
            let base = baseline_stream(50_000 * scale).await;
            println!("{:<34} {:>12.0} msgs/s", "baseline/stream/1KiB", base);
            for groups in [1usize, 3, 10] {
                let r = publish(groups, 5_000 * scale).await;
                println!(
                    "{:<34} {:>12.0} msgs/s {:>12.0} copies/s   ratio {:.3} (copies/s ÷ baseline)",
                    format!("publish/memory/1KiB/groups={groups}"),
                    r,
                    r * groups as f64,
                    r * groups as f64 / base
                );
            }
            let mut raw = baseline_pingpong(2_000 * scale).await;
            let (raw50, raw99) = (pct(&mut raw, 0.50), pct(&mut raw, 0.99));
            println!(
                "{:<34} {:>9.0} µs p50 {:>9.0} µs p99",
                "baseline/pingpong", raw50, raw99
            );
            let (mut lat, rps) = requests(2_000 * scale).await;
            let (p50, p99, p999) = (
                pct(&mut lat, 0.50),
                pct(&mut lat, 0.99),
                pct(&mut lat, 0.999),
            );
            println!(
                "{:<34} {:>9.0} µs       ratio {:.2} (÷ baseline p50)",
                "request/p50",
                p50,
                p50 / raw50
            );
            println!(
                "{:<34} {:>9.0} µs       ratio {:.2} (÷ baseline p99)",
                "request/p99",
                p99,
                p99 / raw99
            );
            println!("{:<34} {:>9.0} µs", "request/p99.9", p999);
            println!(
                "{:<34} {:>9.0} req/s (32 concurrent callers)",
                "request/throughput", rps
            );
        };
        tokio::time::timeout(CAP * 3, run)
            .await
            .expect("benchmark exceeded its time cap");
    });
}
