//! Rotating the mesh key with rolling restarts: a key file holds the node's key and, during
//! the rotation, the other key it accepts. Nodes of neighbouring steps connect; nodes two
//! steps apart refuse each other. Everything binds 127.0.0.1 with in-memory discovery.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{delivered, drain, eventually, within};
use peerbus::{FileOutcome, MemoryNetwork, MeshKey, Node, Outgoing, PeerState};

/// A key file holding the keys of `files` in order (each written by `MeshKey::write_new`, as
/// `peerbus keygen --out` does), as an operator would join them with `cat`.
fn joined(dir: &Path, name: &str, files: &[&Path]) -> PathBuf {
    let text: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("key file"))
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write key file");
    path
}

async fn node(net: &MemoryNetwork, service: &str, key_file: &Path) -> Node {
    Node::builder(service)
        .mesh("test")
        .mesh_key_file(key_file)
        .listen("127.0.0.1:0".parse().expect("addr"))
        .discovery(net.discovery())
        .shutdown_grace(Duration::from_millis(500))
        .start()
        .await
        .expect("start")
}

/// The state `node` holds of `peer`.
async fn state_of(node: &Node, peer: &Node) -> Option<PeerState> {
    let status = node.status().await?;
    status
        .peers
        .iter()
        .find(|p| p.node_id == peer.id())
        .map(|p| p.state)
}

/// Two nodes of one key that rotate it in place: `sender` and an `orders` receiver, each
/// reading its own key file in `dir`, and the key files `old` (the one they start on) and
/// `new`.
struct InPlace {
    dir: tempfile::TempDir,
    old: PathBuf,
    new: PathBuf,
    net: MemoryNetwork,
    sender: Node,
    receiver: Node,
}

impl InPlace {
    async fn start() -> InPlace {
        let dir = tempfile::tempdir().expect("tempdir");
        let (old, new) = (dir.path().join("old.key"), dir.path().join("new.key"));
        MeshKey::write_new(&old).expect("old key");
        MeshKey::write_new(&new).expect("new key");
        let net = MemoryNetwork::new();
        let sender_file = joined(dir.path(), "sender.key", &[&old]);
        let receiver_file = joined(dir.path(), "receiver.key", &[&old]);
        let sender = node(&net, "sender", &sender_file).await;
        let receiver = node(&net, "orders", &receiver_file).await;
        InPlace {
            dir,
            old,
            new,
            net,
            sender,
            receiver,
        }
    }

    /// Writes the keys of `files` into `n`'s key file (`sender.key` or `receiver.key`) and
    /// has it read the file: whether it took it (and nothing else).
    async fn take(&self, n: &Node, files: &[&Path]) -> bool {
        let name = if n.id() == self.sender.id() {
            "sender.key"
        } else {
            "receiver.key"
        };
        joined(self.dir.path(), name, files);
        let r = n.reload_mesh_files().await.expect("reload");
        r.key_file == Some(FileOutcome::Taken) && r.ca.is_none()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_neighbouring_rotation_steps_connect() {
    within(60, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (old, new) = (dir.path().join("old.key"), dir.path().join("new.key"));
        MeshKey::write_new(&old).expect("old key");
        MeshKey::write_new(&new).expect("new key");
        let old_accepting_new = joined(dir.path(), "step1.key", &[&old, &new]);
        let new_accepting_old = joined(dir.path(), "step2.key", &[&new, &old]);

        let net = MemoryNetwork::new();
        let before = node(&net, "before", &old).await;
        let step1 = node(&net, "step1", &old_accepting_new).await;
        let step2 = node(&net, "step2", &new_accepting_old).await;
        let after = node(&net, "after", &new).await;

        let steps = [
            (&before, "before"),
            (&step1, "step1"),
            (&step2, "step2"),
            (&after, "after"),
        ];
        for (i, (a, _)) in steps.iter().enumerate() {
            for (j, (b, service)) in steps.iter().enumerate() {
                if i.abs_diff(j) == 1 {
                    assert!(
                        a.wait_for_instances(service, 1, Duration::from_secs(10))
                            .await,
                        "step {i} connects to step {j}"
                    );
                } else if i != j {
                    eventually(10, "steps two apart refuse each other", || async {
                        state_of(a, b).await == Some(PeerState::Refused)
                    })
                    .await;
                    assert!(a.instances(service).await.is_empty());
                }
            }
        }
        for n in [before, step1, step2, after] {
            n.shutdown().await;
        }
    })
    .await;
}

/// The same rotation without restarts: each node's key file is rewritten for the next step
/// and the node reloads it (`peerbus reload`, SIGHUP). Two running nodes exchange messages
/// through every step; at the end the mesh runs on the new key alone (a node of the old key
/// is refused, one of the new joins), a reload of an unchanged file changes nothing, and a
/// garbled file is refused with the keys in use kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_in_place_needs_no_restart() {
    within(60, async {
        let m = InPlace::start().await;
        let InPlace {
            dir,
            old,
            new,
            net,
            sender,
            receiver,
        } = &m;
        let mut got = drain(receiver.messages().expect("messages"));
        delivered(sender, &mut got, "before").await;
        // `Status::mesh_keys` names the keys in use by fingerprint, proved one first.
        let fp = |f: &Path| MeshKey::load(f).expect("key").fingerprint();
        let keys_of = |n: &Node| {
            let n = n.clone();
            async move { n.status().await.expect("status").mesh_keys }
        };
        assert_eq!(keys_of(sender).await, [fp(old)]);
        let steps: [[&Path; 2]; 2] = [[old, new], [new, old]];
        for (step, files) in steps.iter().enumerate() {
            for n in [sender, receiver] {
                assert!(m.take(n, files).await, "step {}", step + 1);
                assert_eq!(keys_of(n).await, files.map(fp), "step {}", step + 1);
            }
            let text = ["during step 1", "during step 2"][step];
            delivered(sender, &mut got, text).await;
        }
        for n in [sender, receiver] {
            assert!(m.take(n, &[new]).await, "the new key alone");
            assert_eq!(keys_of(n).await, [fp(new)]);
        }
        let again = sender.reload_mesh_files().await.expect("reload");
        assert_eq!(again.key_file, Some(FileOutcome::Unchanged));
        delivered(sender, &mut got, "after").await;

        // The mesh runs on the new key alone now.
        let stale = node(net, "stale", old).await;
        eventually(10, "a node of the old key is refused", || async {
            state_of(receiver, &stale).await == Some(PeerState::Refused)
        })
        .await;
        std::fs::write(dir.path().join("sender.key"), "not a key\n").expect("garble");
        let garbled = sender.reload_mesh_files().await.expect("reload");
        assert!(
            matches!(&garbled.key_file, Some(FileOutcome::Refused(why)) if why.contains("line 1")),
            "{garbled:?}"
        );
        let late = node(net, "late", new).await;
        assert!(
            late.wait_for_instances("sender", 1, Duration::from_secs(10))
                .await,
            "the garbled file left the sender's keys as they were"
        );
        for n in [&stale, &late, sender, receiver] {
            n.shutdown().await;
        }
    })
    .await;
}

/// A key is rotated out because it leaked: an intruder that holds only the old key, connected
/// and consuming `orders` before the rotation, is cut off when the sender drops the old key
/// (the last step), not only refused on its next dial, and takes no message from then on.
/// The members' own connections, proved with the old key before the rotation, are closed
/// then too and made again with the new key at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_key_cuts_off_a_live_peer_that_proved_it() {
    within(60, async {
        let m = InPlace::start().await;
        let InPlace {
            old,
            new,
            net,
            sender,
            receiver,
            ..
        } = &m;
        let intruder = node(net, "orders", old).await;
        let mut got = drain(receiver.messages().expect("messages"));
        let mut stolen = drain(intruder.messages().expect("messages"));
        assert!(
            sender
                .wait_for_instances("orders", 2, Duration::from_secs(10))
                .await,
            "both instances connected"
        );
        let steps: [[&Path; 2]; 2] = [[old, new], [new, old]];
        for files in steps {
            for n in [sender, receiver] {
                assert!(m.take(n, &files).await);
            }
        }
        let retired = |n: &Node| {
            let n = n.clone();
            async move {
                n.status().await.map_or(0, |s| {
                    s.connections_closed
                        .get("retired_mesh_key")
                        .copied()
                        .unwrap_or(0)
                })
            }
        };
        assert_eq!(retired(sender).await, 0, "steps 1 and 2 keep the old key");
        assert!(m.take(sender, &[new]).await);
        // The intruder's connection and the receiver's (both proved the old key) are closed.
        eventually(5, "the intruder is cut off", || async {
            retired(sender).await >= 2
                && state_of(sender, &intruder).await != Some(PeerState::Connected)
        })
        .await;
        // Its dials from then on are refused (`mesh_proof_failed`: a peer of another key).
        eventually(10, "the intruder's redial is refused", || async {
            state_of(sender, &intruder).await == Some(PeerState::Refused)
        })
        .await;
        // The receiver proves the new key: it is back at once, and gets everything.
        assert!(
            sender
                .wait_for_instances("orders", 1, Duration::from_secs(5))
                .await
        );
        for i in 0..20 {
            sender
                .send(
                    "orders",
                    Outgoing::new(format!("after {i}")).key(format!("k{i}")),
                )
                .await
                .expect("stored")
                .acked()
                .await
                .expect("acked");
        }
        for _ in 0..20 {
            assert!(
                got.recv()
                    .await
                    .is_some_and(|(_, t)| t.starts_with("after"))
            );
        }
        assert!(
            std::iter::from_fn(|| stolen.try_recv().ok()).all(|(_, t)| !t.starts_with("after")),
            "the intruder took a message after the old key was dropped"
        );
        assert_ne!(
            state_of(sender, &intruder).await,
            Some(PeerState::Connected),
            "the intruder connected again"
        );
        for n in [&intruder, sender, receiver] {
            n.shutdown().await;
        }
    })
    .await;
}

/// Keys that come from elsewhere than a file (a secrets manager) rotate in place through
/// `Node::renew_mesh_keys`: two running nodes take the three steps and exchange messages
/// throughout; the last step cuts off a node of the old key alone that was connected; bad
/// key sets are refused with the keys in use kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_given_in_code_rotate_in_place_through_the_api() {
    within(60, async {
        let (old, new) = (MeshKey::generate(), MeshKey::generate());
        let net = MemoryNetwork::new();
        let start = |service: &str| {
            Node::builder(service)
                .mesh("test")
                .mesh_key(old.clone())
                .listen("127.0.0.1:0".parse().expect("addr"))
                .discovery(net.discovery())
                .shutdown_grace(Duration::from_millis(500))
                .start()
        };
        let sender = start("sender").await.expect("sender");
        let receiver = start("orders").await.expect("receiver");
        let stale = start("stale").await.expect("stale");
        let mut got = drain(receiver.messages().expect("messages"));
        assert!(
            sender
                .wait_for_instances("stale", 1, Duration::from_secs(10))
                .await
        );
        let steps = [
            vec![old.clone(), new.clone()],
            vec![new.clone(), old.clone()],
            vec![new.clone()],
        ];
        for (n, keys) in steps.iter().enumerate() {
            for node in [&sender, &receiver] {
                node.renew_mesh_keys(keys.clone()).expect("renew");
                let fingerprints: Vec<String> = keys.iter().map(MeshKey::fingerprint).collect();
                assert_eq!(node.status().await.expect("status").mesh_keys, fingerprints);
            }
            delivered(&sender, &mut got, &format!("after step {}", n + 1)).await;
        }
        eventually(10, "the node of the old key alone is cut off", || async {
            state_of(&sender, &stale).await == Some(PeerState::Refused)
        })
        .await;

        // Bad key sets: refused, the keys in use kept.
        let twice = sender
            .renew_mesh_keys(vec![new.clone(), old.clone(), new.clone()])
            .expect_err("a key twice");
        assert!(
            twice.to_string().contains(&format!(
                "mesh key {} is given twice (as key 3)",
                new.fingerprint()
            )),
            "{twice}"
        );
        assert!(sender.renew_mesh_keys(Vec::new()).is_err(), "no key");
        let nine = (0..=peerbus::MAX_MESH_KEYS)
            .map(|_| MeshKey::generate())
            .collect();
        let nine = sender.renew_mesh_keys(nine).expect_err("too many keys");
        assert!(
            nine.to_string()
                .contains("9 mesh keys: a node takes 1 to 8"),
            "{nine}"
        );
        assert_eq!(
            sender.status().await.expect("status").mesh_keys,
            [new.fingerprint()]
        );
        delivered(&sender, &mut got, "with the keys kept").await;
        let open = Node::builder("open")
            .insecure_open_mesh()
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(MemoryNetwork::new().discovery())
            .start()
            .await
            .expect("open");
        assert!(
            open.renew_mesh_keys(vec![new.clone()]).is_err(),
            "an open mesh"
        );
        for n in [open, stale, sender, receiver] {
            n.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_with_a_malformed_line_fails_start() {
    within(30, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("mesh.key");
        MeshKey::write_new(&key).expect("key");
        let bad = dir.path().join("bad.key");
        let text = std::fs::read_to_string(&key).expect("read") + "not a key\n";
        std::fs::write(&bad, text).expect("write");
        let err = Node::builder("x")
            .mesh_key_file(&bad)
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(MemoryNetwork::new().discovery())
            .start()
            .await
            .expect_err("a malformed key file");
        assert!(err.to_string().contains("line 2"), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_given_in_code_rotate_too_and_are_bounded() {
    within(30, async {
        let (old, new) = (MeshKey::generate(), MeshKey::generate());
        let net = MemoryNetwork::new();
        let builder = |service: &str, key: &MeshKey, other: &MeshKey| {
            Node::builder(service)
                .mesh("test")
                .mesh_key(key.clone())
                .also_accept_mesh_keys([other.clone()])
                .listen("127.0.0.1:0".parse().expect("addr"))
                .discovery(net.discovery())
                .shutdown_grace(Duration::from_millis(500))
        };
        let step1 = builder("step1", &old, &new).start().await.expect("start");
        let step2 = builder("step2", &new, &old).start().await.expect("start");
        assert!(
            step1
                .wait_for_instances("step2", 1, Duration::from_secs(10))
                .await
        );

        let too_many = Node::builder("x")
            .mesh_key(MeshKey::generate())
            .also_accept_mesh_keys((0..peerbus::MAX_MESH_KEYS).map(|_| MeshKey::generate()))
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(net.discovery())
            .start()
            .await
            .expect_err("more keys than a node takes");
        assert!(too_many.to_string().contains("at most 8"), "{too_many}");
        step1.shutdown().await;
        step2.shutdown().await;
    })
    .await;
}
