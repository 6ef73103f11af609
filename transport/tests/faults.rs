//! Fault injection over real QUIC on 127.0.0.1 only: loss, duplication, delay and reordering
//! are recovered by QUIC; partitions and freezes cut connections as a real network would.
//! (The seeded decision function is unit-tested in `src/fault.rs`.)

use std::net::SocketAddr;
use std::time::Duration;

use peerbus_transport::{
    AcceptError, Connection, ConnectionError, Endpoint, EndpointConfig, FaultConfig, Faults,
    Identity, Membership, MeshKey,
};

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// An endpoint on 127.0.0.1 with fault injection; `idle` sets a short idle timeout.
fn faulty(key: &MeshKey, faults: &Faults, idle: Option<Duration>) -> Endpoint {
    let id = Identity::generate().expect("identity");
    let mut cfg = EndpointConfig::new(id, Membership::Key(key.clone()), loopback());
    cfg.faults = Some(faults.clone());
    if let Some(idle) = idle {
        cfg.idle_timeout = idle;
        cfg.keep_alive = idle / 4;
    }
    let ep = Endpoint::bind(cfg).expect("bind");
    assert!(ep.local_addr().ip().is_loopback());
    ep
}

async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test timed out")
}

fn accept_one(ep: &Endpoint) -> tokio::task::JoinHandle<Result<Connection, AcceptError>> {
    let ep = ep.clone();
    tokio::spawn(async move {
        let inc = ep.accept().await.expect("endpoint open");
        inc.complete().await
    })
}

async fn pair(a: &Endpoint, b: &Endpoint) -> (Connection, Connection) {
    let acc = accept_one(b);
    let ca = a
        .connect(b.local_addr(), Some(b.node_id()))
        .await
        .expect("connect");
    let cb = acc.await.expect("join").expect("accept");
    (ca, cb)
}

fn chaos(seed: u64) -> FaultConfig {
    FaultConfig {
        loss: 0.10,
        duplicate: 0.05,
        reorder: 0.05,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(2),
        seed,
    }
}

const FRAMES: u32 = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_link_delivers_everything_in_order() {
    within(60, async {
        let key = MeshKey::generate();
        let (fa, fb) = (Faults::new(1), Faults::new(2));
        let a = faulty(&key, &fa, None);
        let b = faulty(&key, &fb, None);
        // The handshake runs under the faults too.
        fa.set(chaos(11));
        fb.set(chaos(22));
        let (ca, cb) = pair(&a, &b).await;

        let reader = tokio::spawn(async move {
            let mut rx = cb.accept_uni().await.expect("accept_uni");
            let mut got = Vec::with_capacity(FRAMES as usize);
            while let Some(frame) = rx.recv::<(u32, Vec<u8>)>().await.expect("recv") {
                got.push(frame);
            }
            (got, cb)
        });
        let mut tx = ca.open_uni().await.expect("open_uni");
        for n in 0..FRAMES {
            tx.push(&(n, vec![(n % 251) as u8; 200])).expect("push");
            if n % 500 == 499 {
                tx.flush().await.expect("flush");
            }
        }
        tx.finish().await.expect("finish");
        let (got, _cb) = reader.await.expect("reader");
        assert_eq!(got.len(), FRAMES as usize);
        for (i, (n, body)) in got.iter().enumerate() {
            assert_eq!(*n, i as u32, "out of order at {i}");
            assert_eq!(body, &vec![(i % 251) as u8; 200]);
        }
        let (sa, sb) = (fa.stats(), fb.stats());
        println!("sender faults: {sa:?}");
        println!("receiver faults: {sb:?}");
        println!("rtt: {:?}", ca.rtt());
        assert!(sa.dropped > 0 && sb.dropped > 0, "{sa:?} {sb:?}");
        assert!(sa.duplicated > 0, "{sa:?}");
        assert!(sa.reordered > 0 && sa.delayed > 0, "{sa:?}");
        a.close().await;
        b.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_cuts_and_heal_restores() {
    within(30, async {
        let key = MeshKey::generate();
        let (fa, fb) = (Faults::new(1), Faults::new(2));
        let idle = Duration::from_secs(1);
        let a = faulty(&key, &fa, Some(idle));
        let b = faulty(&key, &fb, Some(idle));
        let (ca, _cb) = pair(&a, &b).await;

        // Cut at a only: a drops both what it sends to b and what it hears from b.
        fa.partition(b.local_addr());
        let started = std::time::Instant::now();
        let why = within(10, ca.closed()).await;
        assert!(matches!(why, ConnectionError::TimedOut), "{why:?}");
        println!(
            "partitioned connection timed out after {:?}",
            started.elapsed()
        );

        // A new dial fails while partitioned.
        let acc = accept_one(&b);
        let dial = a.connect(b.local_addr(), Some(b.node_id())).await;
        assert!(dial.is_err(), "dialed through a partition");
        acc.abort();

        // Healed: a new connection works.
        fa.heal(b.local_addr());
        let (ca, cb) = pair(&a, &b).await;
        let mut tx = ca.open_uni().await.expect("open_uni");
        tx.push(&"after heal".to_string()).expect("push");
        tx.finish().await.expect("finish");
        let mut rx = cb.accept_uni().await.expect("accept_uni");
        let got: Option<String> = rx.recv().await.expect("recv");
        assert_eq!(got.as_deref(), Some("after heal"));
        let stats = fa.stats();
        println!("partition faults: {stats:?}");
        assert!(stats.dropped > 0);
        a.close().await;
        b.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_freeze_is_survived() {
    within(30, async {
        let key = MeshKey::generate();
        let (fa, fb) = (Faults::new(1), Faults::new(2));
        let a = faulty(&key, &fa, None); // 3 s idle timeout
        let b = faulty(&key, &fb, None);
        let (ca, cb) = pair(&a, &b).await;
        let mut tx = ca.open_uni().await.expect("open_uni");
        tx.push(&0u32).expect("push");
        tx.flush().await.expect("flush");
        let mut rx = cb.accept_uni().await.expect("accept_uni");
        assert_eq!(rx.recv::<u32>().await.expect("recv"), Some(0));

        // Freeze b (nothing in or out) for 1 s, well under the 3 s idle timeout.
        fb.block_all(true);
        for n in 1..=100u32 {
            tx.push(&n).expect("push");
        }
        tx.flush().await.expect("flush during freeze");
        let nothing = tokio::time::timeout(Duration::from_millis(1000), rx.recv::<u32>()).await;
        assert!(nothing.is_err(), "a frame crossed the freeze: {nothing:?}");
        let frozen = fb.stats();
        fb.block_all(false);

        for n in 1..=100u32 {
            let got = within(10, rx.recv::<u32>()).await.expect("recv after thaw");
            assert_eq!(got, Some(n));
        }
        assert!(ca.close_reason().is_none() && cb.close_reason().is_none());
        println!("freeze: b dropped {} datagrams", frozen.dropped);
        assert!(frozen.dropped > 0);
        a.close().await;
        b.close().await;
    })
    .await;
}
