//! Real mDNS on the loopback interface.
//!
//! Several daemons share UDP port 5353 on the host (`SO_REUSEPORT`). Meshes are
//! named after the process id and the test, so concurrent runs and other
//! peerbus nodes on the host do not disturb each other. Runs in the host network
//! namespace and in `unshare -n` (after `ip link set lo up`).

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use peerbus_discovery::{
    Discovery, DiscoveryEvent, EVENT_CHANNEL_CAPACITY, Interfaces, MdnsDiscovery, NodeId,
    PROTOCOL_VERSION, PeerRecord,
};
use tokio::sync::mpsc;

const TEST_TIMEOUT: Duration = Duration::from_secs(20);

fn id(n: u8) -> NodeId {
    let mut bytes = [n; 32];
    // Distinct from other test binaries' ids and runs.
    bytes[..4].copy_from_slice(&std::process::id().to_be_bytes());
    NodeId::from_bytes(bytes)
}

fn record(n: u8, mesh: &str, port: u16) -> PeerRecord {
    PeerRecord {
        node_id: id(n),
        service: format!("svc-{n}"),
        mesh: mesh.into(),
        protocol_version: PROTOCOL_VERSION,
        addrs: vec![SocketAddr::from(([127, 0, 0, 1], port))],
    }
}

fn mesh(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn start(local: PeerRecord) -> (MdnsDiscovery, mpsc::Receiver<DiscoveryEvent>) {
    let (tx, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
    let mut d = MdnsDiscovery::new(Interfaces::Loopback);
    assert_eq!(d.name(), "mdns");
    d.start(local, tx).unwrap();
    (d, rx)
}

/// Waits for the first event matching `want`; panics on any event about `never`.
async fn wait_for(
    rx: &mut mpsc::Receiver<DiscoveryEvent>,
    never: &[NodeId],
    want: impl Fn(&DiscoveryEvent) -> bool,
) -> DiscoveryEvent {
    loop {
        let event = rx.recv().await.expect("event channel closed");
        let about = match &event {
            DiscoveryEvent::Up(r) => Some(r.node_id),
            DiscoveryEvent::Down(id) => Some(*id),
            DiscoveryEvent::Seed(_) | DiscoveryEvent::SeedGone(_) => None,
        };
        if let Some(about) = about {
            assert!(!never.contains(&about), "unexpected event {event:?}");
        }
        if want(&event) {
            return event;
        }
    }
}

fn is_up(n: u8) -> impl Fn(&DiscoveryEvent) -> bool {
    move |e| matches!(e, DiscoveryEvent::Up(r) if r.node_id == id(n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_peers_find_each_other_and_other_meshes_stay_apart() {
    let run = async {
        let m = mesh("main");
        let other = mesh("other");
        let (a, b, c) = (
            record(1, &m, 41001),
            record(2, &m, 41002),
            record(3, &other, 41003),
        );

        let (mut da, mut rxa) = start(a.clone());
        let (mut dc, mut rxc) = start(c.clone());
        let (mut db, mut rxb) = start(b.clone());

        // Each sees the other with the exact record; neither ever hears of c.
        let seen = wait_for(&mut rxa, &[id(3)], is_up(2)).await;
        assert_eq!(seen, DiscoveryEvent::Up(b.clone()));
        let seen = wait_for(&mut rxb, &[id(3)], is_up(1)).await;
        assert_eq!(seen, DiscoveryEvent::Up(a.clone()));

        // b says goodbye: a gets Down.
        db.stop();
        wait_for(&mut rxa, &[id(3)], |e| *e == DiscoveryEvent::Down(id(2))).await;

        // b comes back with the same id on another port: Up again, new address.
        let b2 = record(2, &m, 41012);
        let (mut db2, _rxb2) = start(b2.clone());
        let seen = wait_for(&mut rxa, &[id(3)], is_up(2)).await;
        assert_eq!(seen, DiscoveryEvent::Up(b2));

        da.stop();
        db2.stop();
        dc.stop();
        // c heard of nobody in "main".
        if let Ok(event) = rxc.try_recv() {
            panic!("mesh `other` got {event:?}");
        }
    };
    tokio::time::timeout(TEST_TIMEOUT, run)
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn bad_records_and_double_start_are_refused() {
    let run = async {
        let (tx, _rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let mut d = MdnsDiscovery::new(Interfaces::Loopback);
        let mut no_addr = record(5, &mesh("bad"), 41005);
        no_addr.addrs.clear();
        let err = d.start(no_addr, tx.clone()).unwrap_err();
        assert!(err.to_string().contains("no address"), "{err}");
        let mut empty_mesh = record(5, "", 41005);
        empty_mesh.mesh.clear();
        assert!(d.start(empty_mesh, tx.clone()).is_err());

        d.start(record(5, &mesh("bad"), 41005), tx.clone()).unwrap();
        let err = d.start(record(5, &mesh("bad"), 41005), tx).unwrap_err();
        assert!(err.to_string().contains("already started"), "{err}");
        d.stop();
        d.stop();
    };
    tokio::time::timeout(TEST_TIMEOUT, run)
        .await
        .expect("test timed out");
}
