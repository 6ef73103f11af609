//! Real QUIC on 127.0.0.1 only: handshake, pinning, mesh proof, frames, bad input, closing.

use std::net::SocketAddr;
use std::time::Duration;

use peerbus_transport::{
    ALPN, AcceptError, BindError, CloseCode, CloseCounts, ConnectError, Connection,
    ConnectionError, Endpoint, EndpointConfig, FrameError, Identity, MAX_ALPN_PROTOCOLS,
    Membership, MeshKey, NodeId,
};
use serde::{Deserialize, Serialize};

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn endpoint(m: Membership) -> Endpoint {
    let id = Identity::generate().expect("identity");
    Endpoint::bind(EndpointConfig::new(id, m, loopback())).expect("bind")
}

fn keyed(key: &MeshKey) -> Endpoint {
    endpoint(Membership::Key(key.clone()))
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("test timed out")
}

/// Accepts one connection on `ep` in the background; returns its outcome.
fn accept_one(ep: &Endpoint) -> tokio::task::JoinHandle<Result<Connection, AcceptError>> {
    let ep = ep.clone();
    tokio::spawn(async move {
        let inc = ep.accept().await.expect("endpoint open");
        inc.complete().await
    })
}

/// Dials `b` from `a` and returns both ends.
async fn pair(a: &Endpoint, b: &Endpoint) -> (Connection, Connection) {
    let acc = accept_one(b);
    let ca = a
        .connect(b.local_addr(), Some(b.node_id()))
        .await
        .expect("connect");
    let cb = acc.await.expect("join").expect("accept");
    (ca, cb)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Hello { from: String, n: u32 },
    Data(Vec<u8>),
    Bye,
}

#[tokio::test]
async fn matching_keys_connect_and_exchange_frames() {
    within(async {
        let key = MeshKey::generate();
        let (a, b) = (keyed(&key), keyed(&key));
        let (ca, cb) = pair(&a, &b).await;
        assert_eq!(ca.peer_id(), b.node_id());
        assert_eq!(cb.peer_id(), a.node_id());
        assert!(ca.is_dialer() && !cb.is_dialer());
        assert_eq!(cb.remote_addr(), a.local_addr());

        // Bidirectional: request and reply.
        let (mut tx, mut rx) = ca.open_bi().await.expect("bi");
        let hello = Msg::Hello {
            from: "a".into(),
            n: 7,
        };
        tx.send(&hello).await.expect("send");
        let (mut btx, mut brx) = cb.accept_bi().await.expect("accept bi");
        assert_eq!(brx.recv::<Msg>().await.expect("recv"), Some(hello));
        btx.send(&Msg::Data(vec![1, 2, 3])).await.expect("reply");
        assert_eq!(
            rx.recv::<Msg>().await.expect("recv"),
            Some(Msg::Data(vec![1, 2, 3]))
        );

        // Unidirectional, then a clean end of stream.
        let mut uni = cb.open_uni().await.expect("uni");
        uni.send(&Msg::Bye).await.expect("send");
        uni.finish().await.expect("finish");
        let mut urx = ca.accept_uni().await.expect("accept uni");
        assert_eq!(urx.recv::<Msg>().await.expect("recv"), Some(Msg::Bye));
        assert_eq!(urx.recv::<Msg>().await.expect("eof"), None);
    })
    .await;
}

#[tokio::test]
async fn coalesced_frames_arrive_all_and_in_order() {
    within(async {
        let key = MeshKey::generate();
        let (a, b) = (keyed(&key), keyed(&key));
        let (ca, cb) = pair(&a, &b).await;
        let before = (ca.traffic(), cb.traffic());
        let mut tx = ca.open_uni().await.expect("uni");
        for i in 0..10_000u32 {
            tx.push(&(i, format!("frame {i}"))).expect("push");
        }
        let framed = tx.buffered_bytes() as u64;
        assert!(framed > 10_000 * 5);
        tx.flush().await.expect("one flush");
        assert_eq!(tx.buffered_bytes(), 0);
        tx.finish().await.expect("finish");
        let mut rx = cb.accept_uni().await.expect("accept uni");
        for i in 0..10_000u32 {
            let got = rx.recv::<(u32, String)>().await.expect("recv");
            assert_eq!(got, Some((i, format!("frame {i}"))));
        }
        assert_eq!(rx.recv::<(u32, String)>().await.expect("eof"), None);

        // Both ends count the frames' bytes, with QUIC's headers and tags on top (a few
        // percent at full packets), and the receiver's acknowledgements going back.
        let (sent, received) = (ca.traffic(), cb.traffic());
        let out = sent.bytes_sent - before.0.bytes_sent;
        let got = received.bytes_received - before.1.bytes_received;
        assert!(
            out >= framed && out < framed + framed / 4,
            "sent {out} for {framed}"
        );
        // (Packets ca sent before its snapshot may arrive after cb's.)
        assert!(
            got >= framed && got <= out + 4_096,
            "received {got} of {out}"
        );
        assert!(sent.datagrams_sent > before.0.datagrams_sent + framed / 1_500);
        assert!(received.bytes_sent > before.1.bytes_sent, "acks go back");
    })
    .await;
}

/// Whether `a` and `b` connect, dialed from `a` (the accept side's outcome must agree).
async fn connects(a: &Endpoint, b: &Endpoint) -> bool {
    let acc = accept_one(b);
    let dialed = a.connect(b.local_addr(), Some(b.node_id())).await;
    let accepted = acc.await.expect("join");
    assert_eq!(
        dialed.is_ok(),
        accepted.is_ok(),
        "{dialed:?} / {accepted:?}"
    );
    if let Err(e) = &dialed {
        assert!(
            matches!(
                e,
                ConnectError::Refused {
                    code: CloseCode::MeshProofFailed,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    dialed.is_ok()
}

/// A rotation from key A to key B, three rolling restarts: every node of a step connects
/// with every node of the step before it (so a mesh in the middle of a rolling restart stays
/// whole), and a node two steps apart is refused.
#[tokio::test]
async fn a_mesh_key_rotation_keeps_neighbouring_steps_connected() {
    within(async {
        let (a, b) = (MeshKey::generate(), MeshKey::generate());
        let steps = [
            Membership::Key(a.clone()),
            Membership::from_keys(vec![a.clone(), b.clone()]).expect("a, accepting b"),
            Membership::from_keys(vec![b.clone(), a.clone()]).expect("b, accepting a"),
            Membership::Key(b.clone()),
        ]
        .map(endpoint);
        for (i, x) in steps.iter().enumerate() {
            for (j, y) in steps.iter().enumerate() {
                if i != j {
                    let expected = i.abs_diff(j) == 1;
                    assert_eq!(connects(x, y).await, expected, "step {i} dialing step {j}");
                }
            }
        }
    })
    .await;
}

/// The same rotation taken in place (`renew_keys`, what a node's `reload` does with its key
/// file): two running endpoints go from key A to key B one step at a time and stay
/// connected at every step; an endpoint two steps ahead is refused; an endpoint without a
/// mesh key takes no keys.
#[tokio::test]
async fn a_mesh_key_rotation_in_place_keeps_running_endpoints_connected() {
    within(async {
        let (a, b) = (MeshKey::generate(), MeshKey::generate());
        let (x, y) = (keyed(&a), keyed(&a));
        assert_eq!(x.mesh_keys(), std::slice::from_ref(&a));
        let steps = [
            vec![a.clone(), b.clone()],
            vec![b.clone(), a.clone()],
            vec![b.clone()],
        ];
        for (n, keys) in steps.iter().enumerate() {
            // One endpoint takes the step, then the other: both orders connect each time.
            x.renew_keys(keys.clone()).expect("renew");
            assert!(
                connects(&x, &y).await && connects(&y, &x).await,
                "x at step {n}"
            );
            y.renew_keys(keys.clone()).expect("renew");
            assert!(
                connects(&x, &y).await && connects(&y, &x).await,
                "both at step {n}"
            );
        }
        assert_eq!(y.mesh_keys(), std::slice::from_ref(&b));
        // Two steps apart: on B alone against one still on A alone.
        x.renew_keys(vec![a.clone()]).expect("renew");
        assert!(!connects(&x, &y).await, "A alone against B alone");
        assert!(x.renew_keys(Vec::new()).is_err(), "no key");
        let open = endpoint(Membership::InsecureOpen);
        assert!(open.renew_keys(vec![a]).is_err(), "an open mesh");
        assert!(open.mesh_keys().is_empty());
    })
    .await;
}

/// The rotation's last step drops the old key: a live connection whose peer proved it is
/// told to close (its trust watch changes and `recheck` says why), one whose peer proved a
/// key still accepted is not, and the close counts as `retired_mesh_key`, not as a failed
/// proof.
#[tokio::test]
async fn a_live_connection_whose_peer_proved_a_dropped_key_is_rechecked_out() {
    within(async {
        let (old, new) = (MeshKey::generate(), MeshKey::generate());
        let x = keyed(&old);
        let (stale, renewed) = (keyed(&old), keyed(&new));
        // At step 2 already: proves the new key, still accepts the old one.
        renewed
            .renew_keys(vec![new.clone(), old.clone()])
            .expect("step 2");
        x.renew_keys(vec![old.clone(), new.clone()])
            .expect("step 1");
        let (_stale_end, from_stale) = pair(&stale, &x).await;
        let (_renewed_end, from_renewed) = pair(&renewed, &x).await;
        let (mut w_stale, mut w_renewed) =
            (from_stale.trust_changes(), from_renewed.trust_changes());
        for c in [&from_stale, &from_renewed] {
            assert_eq!(x.recheck(c), Ok(None));
        }

        // Step 2 keeps both keys: both peers stay members.
        x.renew_keys(vec![new.clone(), old.clone()])
            .expect("step 2");
        w_stale.changed().await.expect("told of step 2");
        assert_eq!(x.recheck(&from_stale), Ok(None));
        assert_eq!(x.recheck(&from_renewed), Ok(None));

        // Step 3: the new key alone.
        x.renew_keys(vec![new.clone()]).expect("step 3");
        w_stale.changed().await.expect("told of step 3");
        w_renewed.changed().await.expect("told too");
        let why = x.recheck(&from_stale).expect_err("proved the dropped key");
        assert!(why.starts_with(peerbus_transport::RETIRED_KEY), "{why}");
        assert_eq!(x.recheck(&from_renewed), Ok(None));
        from_stale.close(CloseCode::MeshProofFailed, &why);
        let closes = x.local_closes();
        assert_eq!(
            (
                closes.retired_keys(),
                closes.get(CloseCode::MeshProofFailed)
            ),
            (1, 1)
        );
        let by_cause: Vec<_> = closes.by_cause().filter(|(_, n)| *n > 0).collect();
        assert_eq!(by_cause, vec![(CloseCounts::RETIRED_MESH_KEY, 1)]);
        // A new connection of the stale peer is refused; the renewed peer's still connects.
        assert!(!connects(&stale, &x).await && connects(&renewed, &x).await);
    })
    .await;
}

#[tokio::test]
async fn wrong_key_and_no_key_are_refused() {
    within(async {
        let b = keyed(&MeshKey::generate());
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
            assert!(err.to_string().contains("mesh membership refused"), "{err}");
            let acc_err = acc.await.expect("join").expect_err("listener refuses");
            assert!(
                matches!(acc_err, AcceptError::MeshProofFailed { claimed, .. } if claimed == a.node_id()),
                "{acc_err:?}"
            );
            assert!(acc_err.to_string().contains("mesh membership refused"), "{acc_err}");
        }
        // The listener counted both refusals.
        assert_eq!(b.local_closes().get(CloseCode::MeshProofFailed), 2);
        // A keyed dialer refuses an open listener, and the listener learns it.
        let open = endpoint(Membership::InsecureOpen);
        let acc = accept_one(&open);
        let err = b
            .connect(open.local_addr(), None)
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
        let acc_err = acc.await.expect("join").expect_err("dialer refused us");
        assert!(
            matches!(
                acc_err,
                AcceptError::Refused {
                    code: CloseCode::MeshProofFailed,
                    ..
                }
            ),
            "{acc_err:?}"
        );
        // Two open nodes connect, and the listener still serves after all of the above.
        let o2 = endpoint(Membership::InsecureOpen);
        let (c1, c2) = pair(&o2, &open).await;
        assert_eq!(c1.peer_id(), open.node_id());
        assert_eq!(c2.peer_id(), o2.node_id());
    })
    .await;
}

#[tokio::test]
async fn pinned_id_mismatch_is_wrong_peer() {
    within(async {
        let key = MeshKey::generate();
        let (a, b) = (keyed(&key), keyed(&key));
        let _acc = accept_one(&b);
        let other = NodeId::from_bytes([7; 32]);
        let err = a
            .connect(b.local_addr(), Some(other))
            .await
            .expect_err("wrong peer");
        assert!(
            matches!(err, ConnectError::WrongPeer { expected, actual } if expected == other && actual == b.node_id()),
            "{err:?}"
        );
        // Without a pin, the id is learnt from the certificate.
        let (ca, _cb) = {
            let acc = accept_one(&b);
            let ca = a.connect(b.local_addr(), None).await.expect("connect");
            (ca, acc.await.expect("join").expect("accept"))
        };
        assert_eq!(ca.peer_id(), b.node_id());
    })
    .await;
}

/// Writes `bytes` raw on a stream from `a` to `b`; `b`'s receiver must fail with `expected`
/// and close the connection, and `b` must go on serving others.
async fn bad_bytes_close_the_connection(bytes: Vec<u8>, expected: CloseCode) {
    let key = MeshKey::generate();
    let (a, b) = (keyed(&key), keyed(&key));
    let (ca, cb) = pair(&a, &b).await;
    let mut tx = ca.open_uni().await.expect("uni");
    tx.write_raw_for_tests(&bytes).await.expect("raw write");
    let mut rx = cb.accept_uni().await.expect("accept uni");
    let err = rx.recv::<(u64, String)>().await.expect_err("bad frame");
    match expected {
        CloseCode::FrameTooLarge => assert!(matches!(err, FrameError::TooLarge { .. }), "{err:?}"),
        _ => assert!(matches!(err, FrameError::Malformed(_)), "{err:?}"),
    }
    // Both sides see the close code.
    let why = ca.closed().await;
    assert!(
        matches!(why, ConnectionError::ClosedByPeer { code, .. } if code == expected),
        "{why:?}"
    );
    assert!(
        matches!(cb.close_reason(), Some(ConnectionError::ClosedLocally { code, .. }) if code == expected),
        "{:?}",
        cb.close_reason()
    );
    // `b` counts the close once, under its code, and `a` (closed by its peer) counts nothing.
    // A second close of the same connection is not counted again.
    cb.close(CloseCode::Normal, "again");
    let counts = b.local_closes();
    assert_eq!(counts.get(expected), 1, "{counts:?}");
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<u64>(), 1, "{counts:?}");
    assert_eq!(a.local_closes(), CloseCounts::default());
    // The listener still accepts and serves another connection.
    let c = keyed(&key);
    let (cc, cbc) = pair(&c, &b).await;
    let mut tx = cc.open_uni().await.expect("uni");
    tx.send(&(1u64, "fine".to_string())).await.expect("send");
    let mut rx = cbc.accept_uni().await.expect("accept uni");
    assert_eq!(
        rx.recv::<(u64, String)>().await.expect("recv"),
        Some((1, "fine".to_string()))
    );
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

#[tokio::test]
async fn stream_ending_inside_a_frame_is_truncated() {
    within(async {
        let key = MeshKey::generate();
        let (a, b) = (keyed(&key), keyed(&key));
        let (ca, cb) = pair(&a, &b).await;
        let mut tx = ca.open_uni().await.expect("uni");
        tx.push(&7u32).expect("push");
        tx.write_raw_for_tests(&100u32.to_le_bytes()[..3])
            .await
            .expect("raw");
        tx.finish().await.expect("finish");
        let mut rx = cb.accept_uni().await.expect("accept uni");
        assert_eq!(rx.recv::<u32>().await.expect("whole frame"), Some(7));
        assert!(matches!(rx.recv::<u32>().await, Err(FrameError::Truncated)));
    })
    .await;
}

#[tokio::test]
async fn close_codes_reach_the_peer() {
    within(async {
        let key = MeshKey::generate();
        let (a, b) = (keyed(&key), keyed(&key));
        let (ca, cb) = pair(&a, &b).await;
        ca.close(CloseCode::DuplicateConnection, "keeping the other one");
        match cb.closed().await {
            ConnectionError::ClosedByPeer { code, reason } => {
                assert_eq!(code, CloseCode::DuplicateConnection);
                assert_eq!(reason, "keeping the other one");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ca.closed().await,
            ConnectionError::ClosedLocally {
                code: CloseCode::DuplicateConnection,
                ..
            }
        ));
        assert!(matches!(
            ca.open_uni().await,
            Err(ConnectionError::ClosedLocally { .. })
        ));

        // Endpoint shutdown closes every connection with Shutdown.
        let (ca, cb) = pair(&a, &b).await;
        b.close().await;
        assert!(matches!(
            ca.closed().await,
            ConnectionError::ClosedByPeer {
                code: CloseCode::Shutdown,
                ..
            }
        ));
        assert!(matches!(
            cb.close_reason(),
            Some(ConnectionError::ClosedLocally {
                code: CloseCode::Shutdown,
                ..
            })
        ));
        assert!(
            b.accept().await.is_none(),
            "a closed endpoint accepts nothing"
        );
    })
    .await;
}

#[tokio::test]
async fn close_code_numbers_round_trip() {
    for code in CloseCode::ALL {
        assert_eq!(CloseCode::from_u32(code as u32), code);
        assert!(!code.describe().is_empty());
        assert_eq!(CloseCode::ALL[code.index()], code);
        assert_eq!(CloseCode::from_name(code.name()), Some(code));
    }
    let names: std::collections::BTreeSet<_> = CloseCode::ALL.iter().map(|c| c.name()).collect();
    assert_eq!(names.len(), CloseCode::ALL.len(), "names are distinct");
    assert_eq!(CloseCode::ProtocolViolation.name(), "protocol_violation");
    assert_eq!(CloseCode::from_name("no_such_code"), None);
    assert!(CloseCode::MalformedFrame.is_protocol_fault());
    assert!(!CloseCode::Unresponsive.is_protocol_fault());
    assert!(!CloseCode::Stalled.is_protocol_fault());
    assert_eq!(CloseCode::from_u32(8), CloseCode::Stalled);
    assert_eq!(CloseCode::from_u32(77), CloseCode::Unknown);
    assert_eq!(
        CloseCode::MeshProofFailed.describe(),
        "mesh membership refused"
    );
}

#[tokio::test]
async fn inconsistent_timeouts_are_refused_at_bind() {
    let mut cfg = EndpointConfig::new(
        Identity::generate().expect("identity"),
        Membership::InsecureOpen,
        loopback(),
    );
    cfg.keep_alive = Duration::from_secs(5);
    assert!(matches!(Endpoint::bind(cfg), Err(BindError::Config(_))));
}

/// An endpoint of `key`'s mesh offering these ALPN ids.
fn offering(key: &MeshKey, alpn: &[&[u8]]) -> Endpoint {
    let mut cfg = EndpointConfig::new(
        Identity::generate().expect("identity"),
        Membership::Key(key.clone()),
        loopback(),
    );
    cfg.alpn = alpn.iter().map(|id| id.to_vec()).collect();
    Endpoint::bind(cfg).expect("bind")
}

#[tokio::test]
async fn alpn_picks_the_listeners_first_id_the_dialer_offers() {
    within(async {
        let key = MeshKey::generate();
        let new = || offering(&key, &[b"x/2", b"x/1"]);
        let old = || offering(&key, &[b"x/1"]);
        for (dialer, listener, expected) in [
            (new(), new(), b"x/2"),
            (new(), old(), b"x/1"),
            (old(), new(), b"x/1"),
            (old(), old(), b"x/1"),
        ] {
            let (d, l) = pair(&dialer, &listener).await;
            assert_eq!(d.alpn(), expected, "dialer's side");
            assert_eq!(l.alpn(), expected, "listener's side");
        }
        // The default is peerbus's first id.
        let (d, l) = pair(&keyed(&key), &keyed(&key)).await;
        assert_eq!((d.alpn(), l.alpn()), (ALPN, ALPN));
        // Nothing in common: no connection.
        let other = offering(&key, &[b"y/1"]);
        let listener = old();
        let acc = accept_one(&listener);
        let err = other
            .connect(listener.local_addr(), Some(listener.node_id()))
            .await
            .expect_err("no common ALPN id");
        assert!(matches!(err, ConnectError::NoCommonProtocol), "{err:?}");
        assert!(acc.await.expect("join").is_err());
    })
    .await;
}

#[tokio::test]
async fn an_alpn_list_tls_cannot_carry_is_refused_at_bind() {
    for alpn in [
        Vec::new(),
        vec![Vec::new()],
        vec![vec![b'x'; 256]],
        vec![b"x".to_vec(); MAX_ALPN_PROTOCOLS + 1],
    ] {
        let mut cfg = EndpointConfig::new(
            Identity::generate().expect("identity"),
            Membership::InsecureOpen,
            loopback(),
        );
        cfg.alpn = alpn;
        assert!(matches!(Endpoint::bind(cfg), Err(BindError::Config(_))));
    }
}

#[tokio::test]
async fn nothing_listening_is_unreachable() {
    within(async {
        // A port that was free a moment ago; nothing answers QUIC there.
        let port = std::net::UdpSocket::bind(loopback())
            .expect("udp")
            .local_addr()
            .expect("addr");
        let a = endpoint(Membership::InsecureOpen);
        let err = a.connect(port, None).await.expect_err("nobody there");
        assert!(
            matches!(err, ConnectError::Unreachable(_) | ConnectError::TimedOut),
            "{err:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_interrupted_flush_resumes_without_cutting_frames() {
    within(async {
        let key = MeshKey::generate();
        let (a, b) = (keyed(&key), keyed(&key));
        let (ca, cb) = pair(&a, &b).await;
        let mut tx = ca.open_uni().await.expect("uni");
        // 12 MiB: more than the 8 MiB stream window, so the flush stalls while nobody reads.
        let frames = 192u32;
        for i in 0..frames {
            tx.push(&(i, vec![i as u8; 64 * 1024])).expect("push");
        }
        let stalled = tokio::time::timeout(Duration::from_millis(300), tx.flush()).await;
        assert!(stalled.is_err(), "the flush should wait for flow control");
        assert!(tx.buffered_bytes() > 0);
        let reader = tokio::spawn(async move {
            let mut rx = cb.accept_uni().await.expect("accept uni");
            let mut n = 0u32;
            while let Some((i, body)) = rx.recv::<(u32, Vec<u8>)>().await.expect("recv") {
                assert_eq!(i, n);
                assert!(body.len() == 64 * 1024 && body.iter().all(|b| *b == i as u8));
                n += 1;
            }
            n
        });
        tx.finish().await.expect("resumed flush and finish");
        assert_eq!(reader.await.expect("join"), frames);
    })
    .await;
}

/// Frames pushed with `push_encoded_with_payload`: `(i, payload)` as bincode writes it, the
/// head encoded here and the payload passed as `Bytes` (shared when large, copied when small).
fn push_with_payload(tx: &mut peerbus_transport::FrameSender, i: u32, payload: &bytes::Bytes) {
    let whole = bincode::serde::encode_to_vec((i, payload.to_vec()), bincode::config::standard())
        .expect("encode");
    let head = &whole[..whole.len() - payload.len()];
    tx.push_encoded_with_payload(|buf| buf.extend_from_slice(head), payload)
        .expect("push");
}

fn payload_of(i: u32) -> bytes::Bytes {
    // Small (copied), just under, at and far over the shared-payload threshold.
    let len = match i % 4 {
        0 => 10,
        1 => peerbus_transport::SHARED_PAYLOAD_MIN - 1,
        2 => peerbus_transport::SHARED_PAYLOAD_MIN,
        _ => 70_000,
    };
    bytes::Bytes::from(vec![i as u8; len])
}

#[tokio::test]
async fn shared_payloads_arrive_whole_and_in_order_among_copied_frames() {
    within(async {
        let key = MeshKey::generate();
        let (a, b) = (keyed(&key), keyed(&key));
        let (ca, cb) = pair(&a, &b).await;
        let mut tx = ca.open_uni().await.expect("uni");
        let frames = 400u32;
        let mut expected = 0;
        for i in 0..frames {
            let p = payload_of(i);
            expected += p.len();
            push_with_payload(&mut tx, i, &p);
            tx.push(&(i + frames, Vec::<u8>::new())).expect("push");
        }
        assert!(tx.buffered_bytes() > expected);
        let reader = tokio::spawn(async move {
            let mut rx = cb.accept_uni().await.expect("accept uni");
            let mut n = 0u32;
            while let Some((i, body)) = rx.recv::<(u32, Vec<u8>)>().await.expect("recv") {
                if n.is_multiple_of(2) {
                    assert_eq!(i, n / 2);
                    assert_eq!(body, payload_of(i).to_vec(), "frame {i}");
                } else {
                    assert_eq!((i, body.len()), (n / 2 + frames, 0));
                }
                n += 1;
            }
            n
        });
        // Flushed while the reader is still starting: the 14 MiB are more than the stream
        // window, so the flush waits for flow control part way through the chunks.
        tx.flush().await.expect("flush");
        assert_eq!(tx.buffered_bytes(), 0);
        tx.finish().await.expect("finish");
        assert_eq!(reader.await.expect("join"), 2 * frames);
    })
    .await;
}

#[tokio::test]
async fn an_interrupted_flush_of_shared_payloads_resumes_without_cutting_frames() {
    within(async {
        let key = MeshKey::generate();
        let (a, b) = (keyed(&key), keyed(&key));
        let (ca, cb) = pair(&a, &b).await;
        let mut tx = ca.open_uni().await.expect("uni");
        // Copied frames first, so the flush stops part way through the buffer: the frames
        // pushed after it must go out behind what the buffer still holds, and only that.
        let frames = 200u32;
        for i in 0..frames {
            tx.push(&(i, vec![i as u8; 64 * 1024])).expect("push");
        }
        let stalled = tokio::time::timeout(Duration::from_millis(300), tx.flush()).await;
        assert!(stalled.is_err(), "the flush should wait for flow control");
        assert!(tx.buffered_bytes() > 0);
        // More frames after the interruption, both kinds.
        for i in frames..frames + 8 {
            push_with_payload(&mut tx, i, &payload_of(i));
        }
        let reader = tokio::spawn(async move {
            let mut rx = cb.accept_uni().await.expect("accept uni");
            let mut n = 0u32;
            while let Some((i, body)) = rx.recv::<(u32, Vec<u8>)>().await.expect("recv") {
                assert_eq!(i, n);
                if i < frames {
                    assert!(body.len() == 64 * 1024 && body.iter().all(|b| *b == i as u8));
                } else {
                    assert_eq!(body, payload_of(i).to_vec());
                }
                n += 1;
            }
            n
        });
        tx.finish().await.expect("resumed flush and finish");
        assert_eq!(reader.await.expect("join"), frames + 8);
    })
    .await;
}
