//! Membership by a mesh CA, as a service embeds it: nodes whose certificates one CA issued
//! exchange messages; a node of another CA is refused and says why; a certificate for
//! another node fails `start()`; a certificate that ends cuts its node off until it is
//! renewed, in place or with a restart. Everything binds 127.0.0.1 with in-memory discovery.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::handmade::HandMade;
use common::{delivered, drain, eventually, within};
use peerbus::engine::wire::ALPN_NEGOTIATED;
use peerbus::{
    AdminError, CaKey, CloseCode, FileOutcome, Identity, MemoryNetwork, MeshReload, Node,
    NodeBuilder, NodeCert, NodeId, Outgoing, PROTOCOL_VERSION, PeerState,
};
use tokio::sync::mpsc::Receiver;

const DAY: Duration = Duration::from_secs(86_400);
/// How long the short certificates of the expiry tests last: enough for two nodes to start
/// and exchange a message on a loaded machine (the validity counts whole seconds).
const SHORT: Duration = Duration::from_secs(6);

/// What one test's meshes share: a directory, a CA in it (`ca/`) and the in-memory network.
struct Fixture {
    dir: tempfile::TempDir,
    ca: CaKey,
    net: MemoryNetwork,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CaKey::create(&dir.path().join("ca"), "test").expect("ca");
        Self {
            dir,
            ca,
            net: MemoryNetwork::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A node of `service` whose identity lives in `<dir>/<name>`, with a certificate this
    /// CA issued for it for a day, trusting this CA.
    fn member(&self, service: &str, name: &str) -> NodeBuilder {
        self.issued(service, name, &self.ca, &self.path("ca/ca.crt"), DAY)
    }

    /// A node of `service` whose identity lives in `<dir>/<name>`, with a certificate `issuer`
    /// issued for it for `valid_for`, trusting the CA certificate file `trusted` (as `peerbus
    /// ca issue --for-data-dir` and `--mesh-ca`/`--mesh-cert` would set it up).
    fn issued(
        &self,
        service: &str,
        name: &str,
        issuer: &CaKey,
        trusted: &Path,
        valid_for: Duration,
    ) -> NodeBuilder {
        let dir = self.path(name);
        let id = Identity::load_or_create(&dir).expect("identity").node_id();
        let cert = dir.join("node.crt");
        std::fs::write(&cert, issuer.issue(&id, valid_for).expect("issue")).expect("write");
        Node::builder(service)
            .mesh("test")
            .data_dir(&dir)
            .mesh_ca_files(trusted, &cert)
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(self.net.discovery())
            .shutdown_grace(Duration::from_millis(500))
    }

    /// Adds the certificate of the node in `<dir>/<name>` to the CA's revocation list,
    /// `ca/ca.crl` (as `peerbus ca revoke` does).
    fn revoke(&self, name: &str) {
        let serial = NodeCert::load(&self.path(&format!("{name}/node.crt")))
            .expect("cert")
            .serial();
        let crl = self.path("ca/ca.crl");
        let current = std::fs::read(&crl).expect("the current list");
        let list = self
            .ca
            .revoke(Some(&current), [serial.as_str()])
            .expect("revoke");
        std::fs::write(&crl, list).expect("write");
    }

    /// A sender, and a receiver of service `orders` (in `<dir>/r`) whose certificate ends
    /// [`SHORT`] from now, with a first message
    /// delivered between them; `tune` adjusts the receiver's builder.
    async fn expiring_pair(
        &self,
        tune: impl FnOnce(NodeBuilder) -> NodeBuilder,
    ) -> (Node, Node, Receiver<(Option<String>, String)>) {
        let sender = self.member("sender", "s").start().await.expect("sender");
        let short = self.issued("orders", "r", &self.ca, &self.path("ca/ca.crt"), SHORT);
        let receiver = tune(short).start().await.expect("receiver");
        let mut got = drain(receiver.messages().expect("messages"));
        delivered(&sender, &mut got, "first").await;
        (sender, receiver, got)
    }
}

/// Whether `node` holds `peer` refused, for a reason that names each of `why`.
async fn refuses(node: &Node, peer: NodeId, why: &[&str]) -> bool {
    let peers = node.peers().await;
    peers.iter().any(|p| {
        p.node_id == peer
            && p.state == PeerState::Refused
            && p.last_error
                .as_deref()
                .is_some_and(|e| why.iter().all(|w| e.contains(w)))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_one_ca_exchange_messages_and_another_cas_node_is_refused() {
    within(60, async {
        let f = Fixture::new();
        let other = CaKey::create(&f.path("other"), "other").expect("other ca");
        let sender = f.member("sender", "s").start().await.expect("sender");
        let receiver = f.member("orders", "r").start().await.expect("receiver");
        let mut got = drain(receiver.messages().expect("messages"));
        delivered(&sender, &mut got, "by certificate").await;

        // A node with a certificate from another CA (trusting its own) finds the mesh but is
        // refused by it, and the refusal says why on both sides.
        let trust_other = f.path("other/ca.crt");
        let stranger = f
            .issued("orders", "x", &other, &trust_other, DAY)
            .start()
            .await
            .expect("stranger");
        // Each side dials the other and each refusal names its reason, read where it is
        // recorded: in the refusing node's view of its peer, and in the refused one's.
        let why = ["mesh certificate", "not signed by the mesh CA"];
        eventually(15, "the sender refuses the stranger, and says why", || {
            refuses(&sender, stranger.id(), &why)
        })
        .await;
        eventually(
            15,
            "the stranger is refused by the sender, and says why",
            || refuses(&stranger, sender.id(), &why),
        )
        .await;
        // No message reaches it: the mesh has one instance of `orders`.
        assert_eq!(sender.instances("orders").await, vec![receiver.id()]);

        for n in [sender, receiver, stranger] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_certified_by_an_existing_pkis_ecdsa_ca_exchange_messages() {
    within(60, async {
        let f = Fixture::new();
        // The issuing CA of an existing PKI, with an ECDSA P-256 key: it never sees a node's
        // key, only the request each node writes (`peerbus ca request`).
        let corp_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Example Corp issuing CA");
        let corp_ca = f.path("corp-ca.crt");
        let ca_cert = params.self_signed(&corp_key).expect("ca cert");
        std::fs::write(&corp_ca, ca_cert.pem()).expect("write");
        let corp = rcgen::Issuer::new(params, corp_key);
        let certified = |service: &str, name: &str| {
            let dir = f.path(name);
            let identity = Identity::load_or_create(&dir).expect("identity");
            let csr = peerbus::certificate_request(&identity).expect("request");
            let cert = rcgen::CertificateSigningRequestParams::from_pem(&csr)
                .expect("the request parses and its signature holds")
                .signed_by(&corp)
                .expect("sign");
            let cert_file = dir.join("node.crt");
            std::fs::write(&cert_file, cert.pem()).expect("write");
            Node::builder(service)
                .mesh("test")
                .data_dir(&dir)
                .mesh_ca_files(&corp_ca, &cert_file)
                .listen("127.0.0.1:0".parse().expect("addr"))
                .discovery(f.net.discovery())
                .shutdown_grace(Duration::from_millis(500))
        };
        let sender = certified("sender", "s").start().await.expect("sender");
        let receiver = certified("orders", "r").start().await.expect("receiver");
        let mut got = drain(receiver.messages().expect("messages"));
        delivered(&sender, &mut got, "certified by the corporate CA").await;

        // A node of the mesh's own ed25519 CA is not a member of this one.
        let stranger = f.member("orders", "x").start().await.expect("stranger");
        let why = ["mesh certificate", "not signed by the mesh CA"];
        eventually(15, "the sender refuses the stranger, and says why", || {
            refuses(&sender, stranger.id(), &why)
        })
        .await;
        assert_eq!(sender.instances("orders").await, vec![receiver.id()]);
        for n in [sender, receiver, stranger] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_node_or_a_missing_file_fails_start() {
    within(30, async {
        let f = Fixture::new();
        let trust = f.path("ca/ca.crt");
        // Issued for the identity in `a`, used by the node of `b`.
        let _ = f.member("x", "a");
        let err = f
            .member("x", "b")
            .mesh_ca_files(&trust, f.path("a/node.crt"))
            .start()
            .await
            .expect_err("another node's certificate");
        assert!(err.to_string().contains("was issued for node"), "{err}");

        let err = f
            .member("x", "b")
            .mesh_ca_files(f.path("missing.crt"), f.path("b/node.crt"))
            .start()
            .await
            .expect_err("a missing CA file");
        assert!(err.to_string().contains("missing.crt"), "{err}");

        let err = f
            .member("x", "b")
            .also_accept_mesh_keys([peerbus::MeshKey::generate()])
            .start()
            .await
            .expect_err("mesh keys beside a CA");
        let why = err.to_string();
        assert!(why.contains("a mesh CA takes no mesh keys"), "{why}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_certificate_expires_is_cut_off_and_catches_up_once_renewed() {
    within(60, async {
        let f = Fixture::new();
        let (sender, receiver, got) = f.expiring_pair(|b| b).await;

        // The certificate ends: the sender closes the connection and refuses the receiver
        // from then on. What it sends meanwhile waits in its log.
        eventually(15, "the expired member is refused", || {
            refuses(&sender, receiver.id(), &["expired"])
        })
        .await;
        let waiting = sender
            .send("orders", Outgoing::new("while expired"))
            .await
            .expect("stored");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut got = got;
        assert!(
            got.try_recv().is_err(),
            "a message reached an expired member"
        );

        // Issued a new certificate and restarted, the receiver gets what waited.
        receiver.shutdown().await;
        drop(got);
        let receiver = f.member("orders", "r").start().await.expect("restart");
        let mut got = drain(receiver.messages().expect("messages"));
        waiting.acked().await.expect("acked after renewal");
        assert_eq!(got.recv().await.expect("delivered").1, "while expired");
        for n in [sender, receiver] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_revoked_while_connected_is_cut_off_and_the_others_stay() {
    within(60, async {
        let f = Fixture::new();
        let crl = f.path("ca/ca.crl");
        // The receiver takes the CA's revocation list (empty as `ca new` writes it) and reads
        // it again every 200 ms; the rogue sender ignores lists.
        let receiver = f
            .member("orders", "r")
            .mesh_crl_file(&crl)
            .mesh_cert_check_every(Duration::from_millis(200))
            .start()
            .await
            .expect("receiver");
        let mut got = drain(receiver.messages().expect("messages"));
        let revoked = |n: &Node| {
            let n = n.clone();
            async move { n.status().await.and_then(|s| s.mesh_ca_revoked) }
        };
        assert_eq!(revoked(&receiver).await, Some(0));
        let rogue = f.member("sender", "s").start().await.expect("rogue");
        let honest = f.member("sender", "h").start().await.expect("honest");
        delivered(&rogue, &mut got, "before").await;

        // The operator revokes the rogue's certificate (`peerbus ca revoke`).
        f.revoke("s");
        let why = ["mesh certificate", "is revoked by the mesh CA"];
        eventually(
            15,
            "the receiver cuts the revoked member off, and says why",
            || refuses(&receiver, rogue.id(), &why),
        )
        .await;
        assert_eq!(
            revoked(&receiver).await,
            Some(1),
            "the status counts the revocation"
        );
        // It counts the connection it cut off (and any dial of the rogue since) apart from
        // other membership refusals.
        let status = receiver.status().await.expect("status");
        let refused = status
            .mesh_ca_refused_revoked
            .expect("a mesh CA node counts them");
        assert!(
            refused >= 1 && status.connections_closed["revoked_certificate"] == refused,
            "{refused} refused for a revoked certificate, closes {:?}",
            status.connections_closed
        );
        let waiting = rogue
            .send("orders", Outgoing::new("while revoked"))
            .await
            .expect("stored");
        delivered(&honest, &mut got, "from a member in good standing").await;
        let acked = tokio::time::timeout(Duration::from_millis(500), waiting.acked()).await;
        assert!(
            acked.is_err(),
            "a revoked member's message was acknowledged"
        );
        assert!(
            got.try_recv().is_err(),
            "a revoked member's message was delivered"
        );
        // The rogue, refused when it dials again, knows why.
        assert_eq!(
            honest.status().await.map(|s| s.mesh_certificate_revoked),
            Some(None)
        );
        eventually(
            15,
            "the rogue's status says its certificate is revoked",
            || {
                let rogue = rogue.clone();
                async move {
                    rogue
                        .status()
                        .await
                        .and_then(|s| s.mesh_certificate_revoked)
                        .is_some_and(|why| why.contains("is revoked by the mesh CA"))
                }
            },
        )
        .await;

        // A node whose own certificate is revoked does not start; nor does a list without
        // the CA's files.
        rogue.shutdown().await;
        let err = Node::builder("sender")
            .mesh("test")
            .data_dir(f.path("s"))
            .mesh_ca_files(f.path("ca/ca.crt"), f.path("s/node.crt"))
            .mesh_crl_file(&crl)
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(f.net.discovery())
            .start()
            .await
            .expect_err("revoked at start");
        assert!(
            err.to_string().contains("is revoked by the mesh CA"),
            "{err}"
        );
        let err = Node::builder("x")
            .insecure_open_mesh()
            .mesh_crl_file(&crl)
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(f.net.discovery())
            .start()
            .await
            .expect_err("a list without a CA");
        assert!(
            err.to_string().contains("needs the mesh CA's files"),
            "{err}"
        );
        for n in [honest, receiver] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_list_given_to_one_node_reaches_the_mesh_and_outlives_a_restart() {
    within(90, async {
        let f = Fixture::new();
        let crl = f.path("ca/ca.crl");
        let revoked = |n: &Node| {
            let n = n.clone();
            async move { n.status().await.and_then(|s| s.mesh_ca_revoked) }
        };
        // Only the gateway reads the CA's list file; the receiver has the CA's files alone.
        let gateway = f
            .member("gateway", "g")
            .mesh_crl_file(&crl)
            .mesh_cert_check_every(Duration::from_millis(200))
            .start()
            .await
            .expect("gateway");
        let receiver = f.member("orders", "r").start().await.expect("receiver");
        let mut got = drain(receiver.messages().expect("messages"));
        // A node of protocol 7 reads no lists: it is not sent them, and stays connected.
        let older = f
            .member("audit", "o")
            .max_protocol_version(7)
            .start()
            .await
            .expect("older");
        let mut audited = drain(older.messages().expect("messages"));
        let rogue = f.member("sender", "s").start().await.expect("rogue");
        let honest = f.member("sender", "h").start().await.expect("honest");
        delivered(&rogue, &mut got, "before").await;
        assert_eq!(revoked(&receiver).await, Some(0));

        // The operator revokes the rogue's certificate and gives the list to the gateway.
        f.revoke("s");
        let why = ["mesh certificate", "is revoked by the mesh CA"];
        eventually(
            15,
            "the receiver, which has no list file, cuts the revoked member off",
            || refuses(&receiver, rogue.id(), &why),
        )
        .await;
        assert_eq!(revoked(&receiver).await, Some(1));
        // The very list the gateway read: `ca new` wrote number 1, the revocation 2.
        let lists = |n: &Node| {
            let n = n.clone();
            async move { n.status().await.map(|s| s.mesh_ca_lists) }
        };
        let held = lists(&receiver).await.expect("status");
        assert_eq!(Some(&held), lists(&gateway).await.as_ref());
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!((held[0].number.as_deref(), held[0].revoked), (Some("2"), 1));
        assert!(
            f.path(&format!("r/{}", "mesh-revocations.crl")).exists(),
            "the receiver keeps the list in its data directory"
        );
        delivered(&honest, &mut got, "from a member in good standing").await;
        honest
            .send("audit", Outgoing::new("to the older node"))
            .await
            .expect("stored")
            .acked()
            .await
            .expect("the older node still takes messages");
        assert_eq!(
            audited.recv().await.expect("audited").1,
            "to the older node"
        );
        assert_eq!(
            revoked(&older).await,
            Some(0),
            "a node of protocol 7 is not sent lists"
        );

        // Restarted with no peer to tell it, the receiver still holds the list.
        for n in [gateway, older, honest] {
            n.shutdown().await;
        }
        receiver.shutdown().await;
        let receiver = f.member("orders", "r").start().await.expect("restarted");
        assert_eq!(
            revoked(&receiver).await,
            Some(1),
            "the list kept in the data directory is taken at start"
        );
        eventually(
            15,
            "the restarted receiver refuses the revoked member",
            || refuses(&receiver, rogue.id(), &why),
        )
        .await;
        for n in [rogue, receiver] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renewed_in_its_file_is_taken_without_a_restart() {
    within(60, async {
        let f = Fixture::new();
        let (sender, receiver, mut got) = f
            .expiring_pair(|b| b.mesh_cert_check_every(Duration::from_millis(200)))
            .await;

        let ends = || async {
            let secs = receiver
                .status()
                .await
                .and_then(|s| s.mesh_certificate_expires);
            std::time::UNIX_EPOCH + Duration::from_secs(secs.expect("a mesh CA node's expiry"))
        };
        let first_ends = ends().await;

        // The operator renews the certificate in place, as `peerbus ca issue --out` does. A
        // garbled file on the way is refused and the certificate in use stays.
        let file = f.path("r/node.crt");
        std::fs::write(&file, "not a certificate").expect("garble");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            ends().await,
            first_ends,
            "a garbled file replaced the certificate"
        );
        let renewed = f.ca.issue(&receiver.id(), DAY).expect("renew");
        std::fs::write(&file, renewed).expect("write renewed");
        eventually(10, "the node presents the renewed certificate", || async {
            ends().await > first_ends + Duration::from_secs(3_600)
        })
        .await;

        // Past the old certificate's end, the sender closes the connection it made with it,
        // and the receiver connects again with the renewed one.
        let past = first_ends + Duration::from_millis(1_500);
        let wait = past.duration_since(std::time::SystemTime::now());
        tokio::time::sleep(wait.unwrap_or_default()).await;
        delivered(&sender, &mut got, "after renewal").await;
        let closed = sender.status().await.expect("status").connections_closed;
        assert!(
            closed.get("mesh_proof_failed").copied().unwrap_or(0) >= 1,
            "the connection made with the old certificate was not closed at its end: {closed:?}"
        );
        for n in [sender, receiver] {
            n.shutdown().await;
        }
    })
    .await;
}

/// An operator who revokes or renews does not wait for the nodes' next look at their files
/// (every minute by default, an hour here): `reload_mesh_files` (`peerbus reload`, SIGHUP)
/// reads them at once and says what it took or refused. A member renewed after its
/// revocation dials again at once, not after the seconds of backoff its refusals built up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_takes_a_revocation_and_a_renewal_at_once() {
    within(60, async {
        let f = Fixture::new();
        let hour = Duration::from_secs(3_600);
        let receiver = f
            .member("orders", "r")
            .mesh_crl_file(f.path("ca/ca.crl"))
            .mesh_cert_check_every(hour)
            .start()
            .await
            .expect("receiver");
        let mut got = drain(receiver.messages().expect("messages"));
        let rogue = f
            .member("sender", "s")
            .mesh_cert_check_every(hour)
            .start()
            .await
            .expect("rogue");
        delivered(&rogue, &mut got, "before").await;
        let reload = |n: &Node| {
            let n = n.clone();
            async move { n.reload_mesh_files().await.expect("reload") }
        };
        let unchanged = MeshReload {
            ca: Some(FileOutcome::Unchanged),
            certificate: Some(FileOutcome::Unchanged),
            key_file: None,
        };
        assert_eq!(reload(&receiver).await, unchanged);

        // Revoked, and taken at once.
        f.revoke("s");
        assert_eq!(
            reload(&receiver).await,
            MeshReload {
                ca: Some(FileOutcome::Taken),
                certificate: Some(FileOutcome::Unchanged),
                key_file: None,
            }
        );
        eventually(5, "the receiver cuts the revoked member off", || {
            refuses(
                &receiver,
                rogue.id(),
                &["mesh certificate", "is revoked by the mesh CA"],
            )
        })
        .await;
        assert_eq!(reload(&receiver).await, unchanged, "nothing new since");

        // A garbled certificate file is refused and the one in use stays.
        let r_cert = f.path("r/node.crt");
        let good = std::fs::read(&r_cert).expect("read");
        std::fs::write(&r_cert, "not a certificate").expect("garble");
        let garbled = reload(&receiver).await;
        assert_eq!(garbled.ca, Some(FileOutcome::Unchanged));
        assert!(
            matches!(&garbled.certificate, Some(FileOutcome::Refused(why))
                if why.contains("cannot read the mesh certificate")),
            "{garbled:?}"
        );
        std::fs::write(&r_cert, good).expect("restore");

        // The rogue keeps dialling and is refused each time, its backoff growing towards
        // its cap (2.5 to 5 s between dials).
        let waiting = rogue
            .send("orders", Outgoing::new("while revoked"))
            .await
            .expect("stored");
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert!(
            got.try_recv().is_err(),
            "a revoked member's message was delivered"
        );

        // A new certificate (not on the list) for the rogue, taken by a reload: it dials at
        // once, so its message arrives well within a backoff step (12 to 17 ms in fifteen
        // runs). Without the wake, the next dial of either side, each 2.5 to 5 s apart,
        // readmits it: within 400 ms in 1 run of 6 (259 ms), later in the others. Within 1 s,
        // the bound before, it was 2 of 6.
        let renewed = f.ca.issue(&rogue.id(), DAY).expect("renew");
        std::fs::write(f.path("s/node.crt"), renewed).expect("write renewed");
        assert_eq!(reload(&rogue).await.certificate, Some(FileOutcome::Taken));
        let reloaded = std::time::Instant::now();
        tokio::time::timeout(Duration::from_millis(400), waiting.acked())
            .await
            .expect("the renewed member dials again at once, not after its backoff")
            .expect("acked");
        eprintln!(
            "the kept message was acked {:?} after the reload",
            reloaded.elapsed()
        );
        assert_eq!(got.recv().await.expect("delivered").1, "while revoked");

        rogue.shutdown().await;
        assert_eq!(rogue.reload_mesh_files().await, Err(AdminError::Stopped));
        receiver.shutdown().await;
    })
    .await;
}

/// A certificate bound to a service (`peerbus ca issue --service`) runs that service only: a
/// node started as another fails `start()` and says why, and a renewal bound to another
/// service is refused with the one in use kept; bound nodes exchange messages as any.
/// (A peerbus node never sends a hello that claims a service its certificate does not
/// name, since it does not start; a hand-made peer that does is refused:
/// `a_peer_claiming_a_service_its_certificate_does_not_name_is_refused`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_bound_to_a_service_runs_that_service_only() {
    within(60, async {
        let f = Fixture::new();
        let bound = |service: &str, name: &str, bound_to: &[&str]| {
            let b = f.member(service, name);
            let dir = f.path(name);
            let id = Identity::load_or_create(&dir).expect("identity").node_id();
            let pem = f.ca.issue_for_services(&id, DAY, bound_to).expect("issue");
            std::fs::write(dir.join("node.crt"), pem).expect("write");
            b
        };
        let err = bound("sender", "x", &["inventory"])
            .start()
            .await
            .expect_err("a certificate for another service");
        assert!(
            err.to_string().contains(
                "this node cannot run service `sender`: its mesh certificate binds it to \
                 service `inventory`, not `sender`"
            ),
            "{err}"
        );
        let receiver = bound("orders", "r", &["orders", "orders-canary"])
            .mesh_cert_check_every(Duration::from_secs(3_600))
            .start()
            .await
            .expect("receiver");
        let mut got = drain(receiver.messages().expect("messages"));
        let sender = bound("sender", "s", &["sender"])
            .start()
            .await
            .expect("sender");
        delivered(&sender, &mut got, "between bound members").await;

        // Renewals bound elsewhere are refused, through the API and from the file.
        let billing =
            f.ca.issue_for_services(&receiver.id(), DAY, &["billing"])
                .expect("issue");
        let cert = NodeCert::from_pem("billing", billing.as_bytes()).expect("cert");
        let err = receiver
            .renew_mesh_certificate(&cert)
            .expect_err("bound elsewhere");
        assert!(
            err.to_string().contains(
                "this node runs `orders`: its mesh certificate binds it to service `billing`"
            ),
            "{err}"
        );
        std::fs::write(f.path("r/node.crt"), billing).expect("write");
        let reload = receiver.reload_mesh_files().await.expect("reload");
        assert!(
            matches!(&reload.certificate, Some(FileOutcome::Refused(why))
                if why.contains("binds it to service `billing`, not `orders`")),
            "{reload:?}"
        );
        delivered(&sender, &mut got, "with the certificate in use").await;
        for n in [sender, receiver] {
            n.shutdown().await;
        }
    })
    .await;
}

/// A member cannot take another service's messages by claiming its name in its hello: a
/// hand-made peer whose certificate binds it to `orders` dials a node and claims `vault`;
/// the node refuses it before answering (`mesh_proof_failed`, naming the binding) and counts
/// the refusal, and a message for `vault` waits. Dialling again as `orders`, the same peer is
/// admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_claiming_a_service_its_certificate_does_not_name_is_refused() {
    within(60, async {
        let f = Fixture::new();
        let node = f.member("payments", "p").start().await.expect("node");
        let receipt = node
            .send("vault", Outgoing::new("for the vault"))
            .await
            .expect("kept for the vault");
        let identity = peerbus_transport::Identity::generate().expect("identity");
        let pem =
            f.ca.issue_for_services(&identity.node_id(), DAY, &["orders"])
                .expect("issue");
        let membership = || peerbus_transport::Membership::Ca {
            ca: f.ca.trust().expect("trust"),
            cert: NodeCert::from_pem("orders.crt", pem.as_bytes()).expect("cert"),
        };
        let claim = |peer: &HandMade, service: &str| {
            let mut hello = peer.hello(
                peerbus::engine::wire::MIN_PROTOCOL_VERSION,
                PROTOCOL_VERSION,
            );
            hello.service = service.into();
            hello.consumes = true;
            hello
        };

        let mut rogue =
            HandMade::dial_as(identity.clone(), membership(), &node, ALPN_NEGOTIATED).await;
        let hello = claim(&rogue, "vault");
        assert!(
            rogue.send_hello(hello).await.is_none(),
            "the node answered a hello that claims `vault`"
        );
        match rogue.conn.closed().await {
            peerbus_transport::ConnectionError::ClosedByPeer { code, reason } => {
                assert_eq!(code, CloseCode::MeshProofFailed, "{reason}");
                assert!(
                    reason.contains("binds it to service `orders`, not `vault`"),
                    "{reason}"
                );
            }
            other => panic!("closed otherwise: {other}"),
        }
        eventually(5, "the refusal counted", || async {
            node.status()
                .await
                .is_some_and(|s| s.connections_closed.get("mesh_proof_failed").copied() == Some(1))
        })
        .await;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), receipt.acked())
                .await
                .is_err(),
            "the message for `vault` settled"
        );

        let mut honest = HandMade::dial_as(identity, membership(), &node, ALPN_NEGOTIATED).await;
        let hello = claim(&honest, "orders");
        let answer = honest
            .send_hello(hello)
            .await
            .expect("admitted as `orders`");
        assert_eq!(answer.node_id, node.id());
        node.shutdown().await;
    })
    .await;
}

/// Replacing the mesh CA without a restart, as README's "Membership by a mesh CA" lays out:
/// every node trusts both CAs, nodes get certificates from the new one, then the old one is
/// dropped. A node that drops the old CA closes its live connection to a node still holding
/// an old certificate at once, and takes it back once that node's certificate is renewed. A
/// CA file that would refuse the node's own certificate waits until that one is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_ca_is_replaced_without_a_restart() {
    within(60, async {
        let f = Fixture::new();
        let new = CaKey::create(&f.path("new"), "new").expect("new ca");
        let (old_pem, new_pem) = (f.ca.certificate_pem(), new.certificate_pem());
        let both = format!("{old_pem}{new_pem}");
        let every = Duration::from_millis(200);
        // The sender already has a certificate from the new CA, the receiver one from the old;
        // both trust both CAs (each node has a CA file of its own).
        let trusting_both = |name: &str| {
            let file = f.path(&format!("{name}.ca.crt"));
            std::fs::write(&file, &both).expect("write CA file");
            file
        };
        let s_ca = trusting_both("s");
        let r_ca = trusting_both("r");
        let sender = f
            .issued("sender", "s", &new, &s_ca, DAY)
            .mesh_cert_check_every(every)
            .start()
            .await
            .expect("sender");
        let receiver = f
            .issued("orders", "r", &f.ca, &r_ca, DAY)
            .mesh_cert_check_every(every)
            .start()
            .await
            .expect("receiver");
        let mut got = drain(receiver.messages().expect("messages"));
        delivered(&sender, &mut got, "before").await;

        // The sender drops the old CA: its live connection to the receiver ends at once.
        std::fs::write(&s_ca, new_pem).expect("new CA only");
        eventually(
            10,
            "the sender refuses the receiver's old certificate",
            || refuses(&sender, receiver.id(), &["not signed by the mesh CA"]),
        )
        .await;
        let waiting = sender
            .send("orders", Outgoing::new("while replaced"))
            .await
            .expect("stored");

        // The receiver is given the new CA alone before its new certificate: it keeps
        // trusting both (its own certificate is from the old one) until the certificate
        // comes, then takes both, and the sender lets it in again.
        std::fs::write(&r_ca, new_pem).expect("new CA only");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let renewed = new.issue(&receiver.id(), DAY).expect("issue");
        std::fs::write(f.path("r/node.crt"), renewed).expect("renew");
        waiting.acked().await.expect("acked once renewed");
        assert_eq!(got.recv().await.expect("delivered").1, "while replaced");
        delivered(&sender, &mut got, "after").await;
        for n in [sender, receiver] {
            n.shutdown().await;
        }
    })
    .await;
}

/// A service that keeps its certificates in memory (from a secret store, say) renews them
/// through the node: the certificate it presents changes, and what the node does not accept
/// is refused with the one in use kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_given_certificates_in_memory_renews_them_through_its_api() {
    within(30, async {
        let f = Fixture::new();
        let dir = f.path("m");
        let id = Identity::load_or_create(&dir).expect("identity").node_id();
        let cert = |ca: &CaKey, valid_for: Duration| {
            let pem = ca.issue(&id, valid_for).expect("issue");
            NodeCert::from_pem("memory", pem.as_bytes()).expect("cert")
        };
        let first = cert(&f.ca, Duration::from_secs(3_600));
        let node = Node::builder("payments")
            .data_dir(&dir)
            .mesh_ca(f.ca.trust().expect("trust"), first.clone())
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(f.net.discovery())
            .start()
            .await
            .expect("start");
        let ends = || async {
            let secs = node.status().await.and_then(|s| s.mesh_certificate_expires);
            std::time::UNIX_EPOCH + Duration::from_secs(secs.expect("an expiry"))
        };
        assert_eq!(ends().await, first.not_after());

        let renewed = cert(&f.ca, DAY);
        node.renew_mesh_certificate(&renewed).expect("renewed");
        assert_eq!(ends().await, renewed.not_after());

        let other = CaKey::generate("other", DAY).expect("other CA");
        let err = node
            .renew_mesh_certificate(&cert(&other, DAY))
            .expect_err("another CA's certificate");
        assert!(
            err.to_string().contains("not signed by the mesh CA"),
            "{err}"
        );
        let err = node
            .renew_mesh_ca(other.trust().expect("trust"))
            .expect_err("a CA that refuses the node's own certificate");
        assert!(err.to_string().contains("own certificate"), "{err}");
        assert_eq!(ends().await, renewed.not_after());
        assert_eq!(
            node.reload_mesh_files().await,
            Err(AdminError::NoMeshFiles),
            "a node without CA files has nothing to read again"
        );
        node.shutdown().await;
    })
    .await;
}
