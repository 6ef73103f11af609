//! The in-memory network and static seeds.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use peerbus_discovery::{
    Discovery, DiscoveryEvent, EVENT_CHANNEL_CAPACITY, MemoryNetwork, NodeId, PROTOCOL_VERSION,
    PeerRecord, StaticDiscovery,
};
use tokio::sync::mpsc;

const TEST_TIMEOUT: Duration = Duration::from_secs(20);

fn id(n: u8) -> NodeId {
    NodeId::from_bytes([n; 32])
}

fn record(n: u8, mesh: &str) -> PeerRecord {
    PeerRecord {
        node_id: id(n),
        service: format!("svc{n}"),
        mesh: mesh.into(),
        protocol_version: PROTOCOL_VERSION,
        addrs: vec![SocketAddr::from(([127, 0, 0, 1], 40_000 + u16::from(n)))],
    }
}

async fn next(rx: &mut mpsc::Receiver<DiscoveryEvent>) -> DiscoveryEvent {
    match rx.recv().await {
        Some(event) => event,
        None => panic!("event channel closed"),
    }
}

/// The next `n` events, sorted by their Debug form (arrival order across peers is free).
async fn next_n(rx: &mut mpsc::Receiver<DiscoveryEvent>, n: usize) -> Vec<DiscoveryEvent> {
    let mut events = Vec::new();
    for _ in 0..n {
        events.push(next(rx).await);
    }
    events.sort_by_key(|e| format!("{e:?}"));
    events
}

fn up(n: u8, mesh: &str) -> DiscoveryEvent {
    DiscoveryEvent::Up(record(n, mesh))
}

async fn in_time<F: std::future::Future<Output = ()>>(f: F) {
    if tokio::time::timeout(TEST_TIMEOUT, f).await.is_err() {
        panic!("test timed out after {TEST_TIMEOUT:?}");
    }
}

#[tokio::test]
async fn memory_members_see_each_other_and_other_meshes_are_ignored() {
    in_time(async {
        let lan = MemoryNetwork::new();
        let (tx1, mut rx1) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let (tx2, mut rx2) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let (tx3, mut rx3) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let (tx9, mut rx9) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let mut d1 = lan.discovery();
        let mut d2 = lan.clone().discovery();
        let mut d3 = lan.discovery();
        let mut other = lan.discovery();

        other.start(record(9, "other"), tx9).unwrap();
        d1.start(record(1, "m"), tx1).unwrap();
        d2.start(record(2, "m"), tx2).unwrap();
        d3.start(record(3, "m"), tx3).unwrap();

        assert_eq!(next_n(&mut rx1, 2).await, vec![up(2, "m"), up(3, "m")]);
        assert_eq!(next_n(&mut rx2, 2).await, vec![up(1, "m"), up(3, "m")]);
        assert_eq!(next_n(&mut rx3, 2).await, vec![up(1, "m"), up(2, "m")]);

        d2.stop();
        d2.stop(); // idempotent
        assert_eq!(next(&mut rx1).await, DiscoveryEvent::Down(id(2)));
        assert_eq!(next(&mut rx3).await, DiscoveryEvent::Down(id(2)));

        // A restart with the same id is reported Up again.
        let (tx2b, mut rx2b) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let mut d2b = lan.discovery();
        d2b.start(record(2, "m"), tx2b).unwrap();
        assert_eq!(next(&mut rx1).await, up(2, "m"));
        assert_eq!(next(&mut rx3).await, up(2, "m"));
        assert_eq!(next_n(&mut rx2b, 2).await, vec![up(1, "m"), up(3, "m")]);

        // Dropping stops too.
        drop(d3);
        assert_eq!(next(&mut rx1).await, DiscoveryEvent::Down(id(3)));

        // The member of mesh "other" heard of nobody, and nobody of it.
        assert!(rx9.try_recv().is_err());
        assert!(rx1.try_recv().is_err());
        d1.stop();
        d2b.stop();
        other.stop();
        assert!(rx9.try_recv().is_err());
    })
    .await;
}

#[tokio::test]
async fn memory_never_drops_events_for_a_slow_reader() {
    in_time(async {
        let lan = MemoryNetwork::new();
        let (tx, mut rx) = mpsc::channel(1);
        let mut slow = lan.discovery();
        slow.start(record(0, "m"), tx).unwrap();
        let mut others = Vec::new();
        for n in 1..=100u8 {
            let (tx, rx) = mpsc::channel(1);
            let mut d = lan.discovery();
            d.start(record(n, "m"), tx).unwrap();
            others.push((d, rx));
        }
        let got = next_n(&mut rx, 100).await;
        let mut expected: Vec<_> = (1..=100u8).map(|n| up(n, "m")).collect();
        expected.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(got, expected);
    })
    .await;
}

#[tokio::test]
async fn memory_start_twice_is_an_error() {
    in_time(async {
        let lan = MemoryNetwork::new();
        let (tx, _rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let mut d = lan.discovery();
        d.start(record(1, "m"), tx.clone()).unwrap();
        let err = d.start(record(1, "m"), tx).unwrap_err();
        assert!(err.to_string().contains("already started"), "{err}");
        assert_eq!(d.name(), "memory");
    })
    .await;
}

#[tokio::test]
async fn static_seeds_are_reported_once_each() {
    in_time(async {
        let a: SocketAddr = ([127, 0, 0, 1], 4001).into();
        let b: SocketAddr = ([127, 0, 0, 1], 4002).into();
        let mut d = StaticDiscovery::new(vec![a, b, a]);
        assert_eq!(d.name(), "static");
        let (tx, mut rx) = mpsc::channel(1);
        d.start(record(1, "m"), tx).unwrap();
        assert_eq!(next(&mut rx).await, DiscoveryEvent::Seed(a));
        assert_eq!(next(&mut rx).await, DiscoveryEvent::Seed(b));
        // The task ends after the seeds: the channel closes.
        assert_eq!(rx.recv().await, None);
        d.stop();
    })
    .await;
}

#[test]
fn start_outside_a_runtime_is_a_clear_error() {
    let lan = MemoryNetwork::new();
    let (tx, _rx) = mpsc::channel(1);
    let err = lan.discovery().start(record(1, "m"), tx).unwrap_err();
    assert!(err.to_string().contains("tokio runtime"), "{err}");
}
