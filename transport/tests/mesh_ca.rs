//! Membership by a mesh CA over real QUIC on 127.0.0.1: certificates from one CA connect;
//! another CA's, an expired one, a mesh key and an open mesh are refused with a reason both
//! sides can read, before any stream opens.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use peerbus_transport::{
    AcceptError, BindError, CaKey, CloseCode, ConnectError, Connection, Endpoint, EndpointConfig,
    Identity, ListTaken, Membership, MeshKey, NodeCert,
};

const DAY: Duration = Duration::from_secs(86_400);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// An endpoint whose certificate `issuer` issued for `valid_for`, trusting `trusted`.
fn certified(issuer: &CaKey, trusted: &CaKey, valid_for: Duration) -> Endpoint {
    let id = Identity::generate().expect("identity");
    let pem = issuer.issue(&id.node_id(), valid_for).expect("issue");
    let cert = NodeCert::from_pem("node.crt", pem.as_bytes()).expect("cert");
    let ca = trusted.trust().expect("trust");
    Endpoint::bind(EndpointConfig::new(
        id,
        Membership::Ca { ca, cert },
        loopback(),
    ))
    .expect("bind")
}

/// A member of `ca`'s mesh, and the certificate it presents.
fn member(ca: &CaKey) -> (Endpoint, NodeCert) {
    let endpoint = certified(ca, ca, DAY);
    let id = endpoint.node_id();
    // The serial number is random per certificate: issue it again to learn one, and present
    // that one.
    let pem = ca.issue(&id, DAY).expect("issue");
    let cert = NodeCert::from_pem("node.crt", pem.as_bytes()).expect("cert");
    endpoint.renew_certificate(&cert).expect("renew");
    (endpoint, cert)
}

fn plain(m: Membership) -> Endpoint {
    let id = Identity::generate().expect("identity");
    Endpoint::bind(EndpointConfig::new(id, m, loopback())).expect("bind")
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("test timed out")
}

/// Our CA and another mesh's.
fn two_cas() -> (CaKey, CaKey) {
    (
        CaKey::generate("ours", DAY).expect("ca"),
        CaKey::generate("theirs", DAY).expect("other"),
    )
}

/// Dials `listener` from `dialer`; returns both ends of the connection.
async fn connected(dialer: &Endpoint, listener: &Endpoint) -> (Connection, Connection) {
    let l = listener.clone();
    let acc = tokio::spawn(async move { l.accept().await.expect("open").complete().await });
    let conn = dialer
        .connect(listener.local_addr(), Some(listener.node_id()))
        .await
        .expect("connect");
    (conn, acc.await.expect("join").expect("accept"))
}

/// Dials `listener` from `dialer`; returns the dialer's and the listener's refusal reasons.
async fn refused(dialer: &Endpoint, listener: &Endpoint) -> (String, String) {
    let l = listener.clone();
    let acc = tokio::spawn(async move { l.accept().await.expect("open").complete().await });
    let err = dialer
        .connect(listener.local_addr(), Some(listener.node_id()))
        .await
        .expect_err("refused");
    let ConnectError::Refused {
        code: CloseCode::MeshProofFailed,
        reason,
    } = &err
    else {
        panic!("dialer: {err:?}");
    };
    let acc_err = acc.await.expect("join").expect_err("listener refuses");
    let AcceptError::MeshProofFailed { reason: theirs, .. } = &acc_err else {
        panic!("listener: {acc_err:?}");
    };
    (reason.clone(), theirs.clone())
}

#[tokio::test]
async fn certificates_from_one_ca_connect_both_ways() {
    within(async {
        let ca = CaKey::generate("test", DAY).expect("ca");
        let (a, b) = (certified(&ca, &ca, DAY), certified(&ca, &ca, DAY));
        for (x, y) in [(&a, &b), (&b, &a)] {
            let (conn, back) = connected(x, y).await;
            assert_eq!(conn.peer_id(), y.node_id());
            assert_eq!(back.peer_id(), x.node_id());
        }
        assert_eq!(a.local_closes().get(CloseCode::MeshProofFailed), 0);
    })
    .await;
}

/// Each end of a connection sees the services the other's certificate binds it to (what a
/// node checks the peer's claimed service against), and none for an unbound certificate.
#[tokio::test]
async fn each_side_sees_the_services_the_peers_certificate_binds_it_to() {
    within(async {
        let ca = CaKey::generate("test", DAY).expect("ca");
        let bound = certified(&ca, &ca, DAY);
        let pem = ca
            .issue_for_services(&bound.node_id(), DAY, &["payments"])
            .expect("issue");
        let cert = NodeCert::from_pem("node.crt", pem.as_bytes()).expect("cert");
        bound.renew_certificate(&cert).expect("renew");
        let any = certified(&ca, &ca, DAY);
        let services = |c: &Connection| c.peer_mesh_certificate().map(|p| p.services().to_vec());
        for (dialer, listener) in [(&bound, &any), (&any, &bound)] {
            let (conn, back) = connected(dialer, listener).await;
            // `conn` is the dialer's end (its peer is the listener), `back` the listener's.
            let (to_bound, to_any) = if dialer.node_id() == bound.node_id() {
                (back, conn)
            } else {
                (conn, back)
            };
            assert_eq!(services(&to_bound), Some(vec!["payments".to_string()]));
            assert_eq!(services(&to_any), Some(Vec::new()));
        }
        // With a mesh key there is no certificate to read.
        let key = MeshKey::generate();
        let (a, b) = (
            plain(Membership::Key(key.clone())),
            plain(Membership::Key(key)),
        );
        let (conn, _) = connected(&a, &b).await;
        assert!(conn.peer_mesh_certificate().is_none());
    })
    .await;
}

#[tokio::test]
async fn a_ca_listener_refuses_another_ca_a_mesh_key_and_an_open_mesh() {
    within(async {
        let (ca, other) = two_cas();
        let listener = certified(&ca, &ca, DAY);
        let cases = [
            (
                certified(&other, &other, DAY),
                "the listener refuses the dialer's mesh certificate: the certificate is not \
                 signed by the mesh CA",
            ),
            (
                plain(Membership::Key(MeshKey::generate())),
                "the dialer proves a mesh key but the listener requires a certificate from its \
                 mesh CA",
            ),
            (
                plain(Membership::InsecureOpen),
                "the dialer has no mesh certificate but the listener requires one from its mesh CA",
            ),
        ];
        for (dialer, why) in &cases {
            let (ours, theirs) = refused(dialer, &listener).await;
            assert_eq!(ours, *why, "the dialer reads the listener's reason");
            assert_eq!(theirs, *why);
        }
        let closes = listener.local_closes();
        assert_eq!(closes.get(CloseCode::MeshProofFailed), 3);
        // None of them was for a revoked certificate.
        assert_eq!(closes.revoked_certificates(), 0);
    })
    .await;
}

#[tokio::test]
async fn a_ca_dialer_refuses_a_keyed_listener_and_a_keyed_listener_refuses_it() {
    within(async {
        let ca = CaKey::generate("ours", DAY).expect("ca");
        let dialer = certified(&ca, &ca, DAY);
        let keyed = plain(Membership::Key(MeshKey::generate()));
        let (ours, theirs) = refused(&dialer, &keyed).await;
        let why = "the dialer proves a mesh CA certificate but the listener requires a mesh key";
        assert_eq!((ours.as_str(), theirs.as_str()), (why, why));
        // The other way round, the dialer (keyed) is refused by the CA listener.
        let (ours, _) = refused(&keyed, &dialer).await;
        assert!(ours.contains("proves a mesh key"), "{ours}");
    })
    .await;
}

#[tokio::test]
async fn a_certificate_that_expires_while_its_node_runs_is_refused_until_renewed() {
    within(async {
        let ca = CaKey::generate("test", DAY).expect("ca");
        let listener = certified(&ca, &ca, DAY);
        // Valid for two seconds from issue (one to two: the validity counts whole seconds),
        // bound at once; then past its end.
        let short = certified(&ca, &ca, Duration::from_secs(2));
        let ends = short
            .certificate_expires()
            .expect("a mesh CA endpoint's expiry");
        let wait = (ends + Duration::from_millis(1_100)).duration_since(SystemTime::now());
        tokio::time::sleep(wait.unwrap_or_default()).await;
        let (ours, _) = refused(&short, &listener).await;
        assert!(
            ours.starts_with(
                "the listener refuses the dialer's mesh certificate: the certificate is expired at"
            ),
            "{ours}"
        );

        // Renewed, it connects again; the listener sees the new certificate's end.
        let issue = |ca: &CaKey| {
            let pem = ca.issue(&short.node_id(), DAY).expect("issue");
            NodeCert::from_pem("node.crt", pem.as_bytes()).expect("cert")
        };
        let other = CaKey::generate("other", DAY).expect("other");
        let err = short
            .renew_certificate(&issue(&other))
            .expect_err("another CA's");
        assert!(
            err.to_string().contains("not signed by the mesh CA"),
            "{err}"
        );
        let renewed = issue(&ca);
        short.renew_certificate(&renewed).expect("renew");
        let (conn, back) = connected(&short, &listener).await;
        assert_eq!(back.membership_expires(), Some(renewed.not_after()));
        assert!(conn.membership_expires().is_some());
        let keyed = plain(Membership::Key(MeshKey::generate()));
        assert!(keyed.renew_certificate(&renewed).is_err());
        assert!(keyed.renew_trust(ca.trust().expect("trust")).is_err());
        // A trust that would refuse the endpoint's own certificate is refused.
        let err = short
            .renew_trust(other.trust().expect("trust"))
            .expect_err("another CA alone");
        assert!(
            err.to_string().contains("do not accept this node's own"),
            "{err}"
        );
    })
    .await;
}

#[tokio::test]
async fn bind_refuses_a_certificate_for_another_node_or_from_another_ca() {
    within(async {
        let (ca, other) = two_cas();
        let bind = |issuer: &CaKey, for_id: &Identity, id: Identity| {
            let pem = issuer.issue(&for_id.node_id(), DAY).expect("issue");
            let cert = NodeCert::from_pem("node.crt", pem.as_bytes()).expect("cert");
            let m = Membership::Ca {
                ca: ca.trust().expect("trust"),
                cert,
            };
            Endpoint::bind(EndpointConfig::new(id, m, loopback()))
        };
        let (me, someone) = (
            Identity::generate().expect("id"),
            Identity::generate().expect("id"),
        );
        let Err(BindError::Config(why)) = bind(&ca, &someone, me.clone()) else {
            panic!("a certificate for another node was accepted");
        };
        assert!(
            why.contains("was issued for node") && why.contains("peerbus ca issue --node-id"),
            "{why}"
        );
        let Err(BindError::Config(why)) = bind(&other, &me, me.clone()) else {
            panic!("another CA's certificate was accepted");
        };
        assert!(why.contains("not signed by the mesh CA"), "{why}");
        assert!(bind(&ca, &me, me.clone()).is_ok());
    })
    .await;
}

/// A revocation list a peer passes on (`Endpoint::take_revocation_list`): a newer one is
/// taken, and a live connection of the certificate it revokes fails its check again; the
/// same list again is not newer; a list that revokes the endpoint's own certificate is not
/// taken, so its trust stays as it was (it knows it is revoked, and a new certificate makes
/// it a member again); another CA's list and junk are errors.
#[tokio::test]
async fn a_list_a_peer_passes_on_is_taken_when_newer_and_not_when_it_revokes_this_node() {
    within(async {
        let (ca, other) = two_cas();
        let (listener, _) = member(&ca);
        let (dialer, dialer_cert) = member(&ca);
        let dialer_serial = dialer_cert.serial();
        let (_at_dialer, at_listener) = connected(&dialer, &listener).await;
        let der = |ca: &CaKey, serials: &[&str]| {
            let pem = ca.revoke(None, serials.iter().copied()).expect("revoke");
            let trust = ca.trust().expect("trust");
            let mut lists = trust
                .with_revocation_lists("the list", pem.as_bytes())
                .expect("reads back")
                .revocation_lists();
            assert_eq!(lists.len(), 1);
            lists.remove(0)
        };
        let list = der(&ca, &[dialer_serial.as_str()]);

        // Its peer takes it, and the live connection of the revoked node fails its check.
        assert!(listener.recheck(&at_listener).expect("a member").is_some());
        assert_eq!(
            listener.take_revocation_list(&list).ok(),
            Some(ListTaken::Taken)
        );
        assert_eq!(listener.revoked_certificates(), Some(1));
        assert_eq!(listener.revocation_lists(), vec![list.clone()]);
        let why = listener.recheck(&at_listener).expect_err("revoked");
        assert!(why.contains("is revoked by the mesh CA"), "{why}");
        // Closing it (as a node does) and refusing the revoked node's next dial count as
        // refusals of a revoked certificate among the membership refusals.
        at_listener.close(CloseCode::MeshProofFailed, &why);
        let (_, theirs) = refused(&dialer, &listener).await;
        assert!(theirs.contains("is revoked by the mesh CA"), "{theirs}");
        let closes = listener.local_closes();
        assert_eq!(closes.get(CloseCode::MeshProofFailed), 2);
        assert_eq!(closes.revoked_certificates(), 2);
        // The refused node knows it is revoked from that refusal (it names its serial); the
        // refusing one is not.
        let knows_it_is_revoked = || {
            let own = dialer.own_certificate_revoked().unwrap_or_default();
            assert!(
                own.contains(&format!("(serial {dialer_serial}) is revoked")),
                "{own:?}"
            );
        };
        knows_it_is_revoked();
        assert_eq!(listener.own_certificate_revoked(), None);
        // It also learns it as the listener, from a dialer that refuses it: presented again
        // (which forgets what it learnt), it is dialled by the node that holds the list.
        dialer.renew_certificate(&dialer_cert).expect("renew");
        assert_eq!(dialer.own_certificate_revoked(), None);
        let d = dialer.clone();
        let acc = tokio::spawn(async move { d.accept().await.expect("open").complete().await });
        let err = listener
            .connect(dialer.local_addr(), Some(dialer.node_id()))
            .await
            .expect_err("the holder of the list refuses it");
        assert!(
            err.to_string().contains("is revoked by the mesh CA"),
            "{err}"
        );
        let acc_err = acc.await.expect("join").expect_err("refused");
        assert!(acc_err.to_string().contains("is revoked"), "{acc_err}");
        knows_it_is_revoked();

        // The node the list revokes does not take it: it keeps its trust and its lists.
        let held = dialer.revocation_lists();
        match dialer.take_revocation_list(&list) {
            Ok(ListTaken::RevokesThisNode(why)) => {
                assert!(why.contains("is revoked by the mesh CA"), "{why}");
            }
            other => panic!("the revoked node: {other:?}"),
        }
        assert_eq!(dialer.revocation_lists(), held);
        assert_eq!(dialer.revoked_certificates(), Some(0));
        assert!(dialer.own_certificate_revoked().is_some());
        // A new certificate is not revoked: the node is a member again.
        let pem = ca.issue(&dialer.node_id(), DAY).expect("issue");
        let renewed = NodeCert::from_pem("node.crt", pem.as_bytes()).expect("cert");
        dialer.renew_certificate(&renewed).expect("renew");
        assert_eq!(dialer.own_certificate_revoked(), None);
        connected(&dialer, &listener).await;
        // Passed back to it, the same list goes no further.
        assert_eq!(
            listener.take_revocation_list(&list).ok(),
            Some(ListTaken::NotNewer)
        );

        let theirs = der(&other, &[]);
        let err = listener
            .take_revocation_list(&theirs)
            .expect_err("another CA's");
        assert!(matches!(err, BindError::Config(_)), "{err}");
        assert!(listener.take_revocation_list(b"not a list").is_err());
        assert_eq!(listener.revoked_certificates(), Some(1));
        // A mesh key has no lists to take.
        let keyed = plain(Membership::Key(MeshKey::generate()));
        assert!(keyed.take_revocation_list(&list).is_err());
    })
    .await;
}
