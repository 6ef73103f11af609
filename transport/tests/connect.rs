//! Real QUIC on 127.0.0.1: handshake, pinning, mesh proof, frames, bad input.

use std::net::SocketAddr;
use std::time::Duration;

use peerbus_transport::{
    CloseCode, ConnectError, ConnectionError, Endpoint, EndpointConfig, FrameError, Identity,
    Membership, MeshKey, NodeId,
};

fn endpoint(m: Membership) -> Endpoint {
    let id = Identity::generate().expect("identity");
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    Endpoint::bind(EndpointConfig::new(id, m, addr)).expect("bind")
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("test timed out")
}

/// Accepts one connection on `ep` in the background; returns its outcome.
fn accept_one(
    ep: &Endpoint,
) -> tokio::task::JoinHandle<Result<peerbus_transport::Connection, String>> {
    let ep = ep.clone();
    tokio::spawn(async move {
        let inc = ep.accept().await.ok_or("endpoint closed")?;
        inc.complete().await.map_err(|e| e.to_string())
    })
}

#[tokio::test]
async fn matching_keys_connect_and_exchange_frames() {
    within(async {
        let key = MeshKey::generate();
        let a = endpoint(Membership::Key(key.clone()));
        let b = endpoint(Membership::Key(key));
        let acc = accept_one(&b);
        let ca = a
            .connect(b.local_addr(), Some(b.node_id()))
            .await
            .expect("connect");
        let cb = acc.await.expect("join").expect("accept");
        assert_eq!(ca.peer_id(), b.node_id());
        assert_eq!(cb.peer_id(), a.node_id());
        assert!(ca.is_dialer() && !cb.is_dialer());

        let (mut tx, mut rx) = ca.open_bi().await.expect("bi");
        tx.send(&("hello".to_string(), 7u32)).await.expect("send");
        let (mut btx, mut brx) = cb.accept_bi().await.expect("accept bi");
        let got: (String, u32) = brx.recv().await.expect("recv").expect("frame");
        assert_eq!(got, ("hello".to_string(), 7));
        btx.send(&42u64).await.expect("reply");
        assert_eq!(rx.recv::<u64>().await.expect("recv"), Some(42));

        // Coalescing: 10,000 frames, one flush, all in order.
        let mut uni = ca.open_uni().await.expect("uni");
        for i in 0..10_000u32 {
            uni.push(&i).expect("push");
        }
        uni.finish().await.expect("finish");
        let mut urx = cb.accept_uni().await.expect("accept uni");
        for i in 0..10_000u32 {
            assert_eq!(urx.recv::<u32>().await.expect("recv"), Some(i));
        }
        assert_eq!(urx.recv::<u32>().await.expect("eof"), None);
    })
    .await;
}

#[tokio::test]
async fn wrong_key_and_no_key_are_refused() {
    within(async {
        let b = endpoint(Membership::Key(MeshKey::generate()));
        for dialer in [
            Membership::Key(MeshKey::generate()),
            Membership::InsecureOpen,
        ] {
            let a = endpoint(dialer);
            let acc = accept_one(&b);
            let err = a
                .connect(b.local_addr(), Some(b.node_id()))
                .await
                .expect_err("refused");
            assert!(
                matches!(
                    err,
                    ConnectError::Refused {
                        code: CloseCode::MeshProofFailed,
                        ..
                    }
                ),
                "{err:?}"
            );
            assert!(err.to_string().contains("mesh key mismatch"), "{err}");
            let acc_err = acc.await.expect("join").expect_err("listener refuses");
            assert!(acc_err.contains("mesh"), "{acc_err}");
        }
        // A keyed dialer refuses an open listener.
        let open = endpoint(Membership::InsecureOpen);
        let keyed = endpoint(Membership::Key(MeshKey::generate()));
        let _acc = accept_one(&open);
        let err = keyed
            .connect(open.local_addr(), None)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("mesh key mismatch"), "{err}");
        // Two open nodes connect.
        let o2 = endpoint(Membership::InsecureOpen);
        let acc = accept_one(&open);
        o2.connect(open.local_addr(), Some(open.node_id()))
            .await
            .expect("open mesh");
        acc.await.expect("join").expect("accepted");
    })
    .await;
}

#[tokio::test]
async fn pinned_id_mismatch_is_wrong_peer() {
    within(async {
        let key = MeshKey::generate();
        let a = endpoint(Membership::Key(key.clone()));
        let b = endpoint(Membership::Key(key));
        let _acc = accept_one(&b);
        let other = NodeId::from_bytes([7; 32]);
        let err = a.connect(b.local_addr(), Some(other)).await.expect_err("wrong peer");
        assert!(
            matches!(err, ConnectError::WrongPeer { expected, actual } if expected == other && actual == b.node_id()),
            "{err:?}"
        );
    })
    .await;
}

async fn bad_bytes_close_the_connection(bytes: Vec<u8>, expected: CloseCode) {
    let key = MeshKey::generate();
    let a = endpoint(Membership::Key(key.clone()));
    let b = endpoint(Membership::Key(key.clone()));
    let acc = accept_one(&b);
    let ca = a.connect(b.local_addr(), None).await.expect("connect");
    let cb = acc.await.expect("join").expect("accept");
    let mut tx = ca.open_uni().await.expect("uni");
    tx.write_raw_for_tests(&bytes).await.expect("raw write");
    let mut rx = cb.accept_uni().await.expect("accept uni");
    let err = rx.recv::<(u64, String)>().await.expect_err("bad frame");
    match expected {
        CloseCode::FrameTooLarge => assert!(matches!(err, FrameError::TooLarge { .. }), "{err:?}"),
        _ => assert!(matches!(err, FrameError::Malformed(_)), "{err:?}"),
    }
    // The dialer sees the close code.
    let why = ca.closed().await;
    assert!(
        matches!(why, ConnectionError::ClosedByPeer { code, .. } if code == expected),
        "{why:?}"
    );
    // The listener still serves others.
    let c = endpoint(Membership::Key(key));
    let acc = accept_one(&b);
    c.connect(b.local_addr(), Some(b.node_id()))
        .await
        .expect("still serving");
    acc.await.expect("join").expect("accepted");
}

#[tokio::test]
async fn oversized_frame_closes_with_frame_too_large() {
    within(bad_bytes_close_the_connection(
        u32::MAX.to_le_bytes().to_vec(),
        CloseCode::FrameTooLarge,
    ))
    .await;
}

#[tokio::test]
async fn garbage_frame_closes_with_malformed_frame() {
    let mut bytes = 5u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff]);
    within(bad_bytes_close_the_connection(
        bytes,
        CloseCode::MalformedFrame,
    ))
    .await;
}
