//! Helpers shared by the integration tests. Every node binds 127.0.0.1 and
//! uses in-memory discovery or mDNS on the loopback interface only.
#![allow(dead_code, unreachable_pub)]

pub mod handmade;

use std::future::Future;
use std::time::Duration;

use peerbus::{Interfaces, MemoryNetwork, MeshKey, Node, NodeBuilder};

/// Runs a test body with an overall deadline. Logs go to the test output (`RUST_LOG`).
pub async fn within<F: Future<Output = T>, T>(secs: u64, f: F) -> T {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    match tokio::time::timeout(Duration::from_secs(secs), f).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {secs}s"),
    }
}

/// A builder on loopback with in-memory discovery and the given key.
pub fn builder(net: &MemoryNetwork, service: &str, key: &MeshKey) -> NodeBuilder {
    Node::builder(service)
        .mesh("test")
        .mesh_key(key.clone())
        .listen("127.0.0.1:0".parse().expect("addr"))
        .discovery(net.discovery())
        .ack_timeout(Duration::from_secs(5))
        .shutdown_grace(Duration::from_millis(500))
}

/// A builder on loopback with real mDNS on the loopback interface.
pub fn mdns_builder(mesh: &str, service: &str, key: &MeshKey) -> NodeBuilder {
    Node::builder(service)
        .mesh(mesh)
        .mesh_key(key.clone())
        .listen("127.0.0.1:0".parse().expect("addr"))
        .interfaces(Interfaces::Loopback)
        .shutdown_grace(Duration::from_millis(500))
}

/// Starts a node, panicking with the error.
pub async fn start(b: NodeBuilder) -> Node {
    match b.start().await {
        Ok(n) => n,
        Err(e) => panic!("node failed to start: {e}"),
    }
}

/// Waits until `node` has `n` connections and retires none. Nodes that find each other at
/// once dial each other at once, and a tie-break retires one of the two connections a few ms
/// later; an entry in flight on the retired one can still reach another instance (the retire
/// hold narrows that race: ARCHITECTURE, "Liveness and reconnects"). A test that is not about
/// that start-up race sends once this returns.
pub async fn connections_settled(node: &Node, n: usize) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    eventually(10, "no connection is being retired", || async {
        node.status()
            .await
            .is_some_and(|s| s.connections == n && s.retiring_connections == 0)
    })
    .await;
}

/// Polls `cond` every 20 ms until it holds or `secs` pass.
pub async fn eventually<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to `secs` until `node`'s log `log` holds no entry waiting or in flight.
pub async fn settled(node: &Node, log: &str, secs: u64) {
    eventually(secs, &format!("{log} settled"), || async {
        node.status()
            .await
            .is_some_and(|s| s.logs.get(log).is_none_or(|l| l.waiting + l.in_flight == 0))
    })
    .await;
}

/// Handles every message of `sub` (acknowledging it) and forwards (key, payload text).
pub fn drain(sub: peerbus::Subscription) -> tokio::sync::mpsc::Receiver<(Option<String>, String)> {
    let (tx, rx) = tokio::sync::mpsc::channel(100_000);
    tokio::spawn(sub.handle(4, move |m| {
        let tx = tx.clone();
        async move {
            tx.send((m.key().map(str::to_string), m.payload_text()))
                .await
                .ok();
            Ok::<(), peerbus::HandlerError>(())
        }
    }));
    rx
}

/// Sends `text` to `orders` from `sender`, waits for its ack, and checks that it was the next
/// message `got` (a [`drain`] of the `orders` node's messages) handled.
pub async fn delivered(
    sender: &Node,
    got: &mut tokio::sync::mpsc::Receiver<(Option<String>, String)>,
    text: &str,
) {
    sender
        .send("orders", peerbus::Outgoing::new(text.to_string()))
        .await
        .expect("stored")
        .acked()
        .await
        .expect("acked");
    assert_eq!(got.recv().await.expect("delivered").1, text);
}

/// The `peerbus` binary, built on first use (`cargo build -p peerbus-cli --bin peerbus` into
/// the target directory and profile of this test binary, derived from `current_exe()`; a
/// no-op when it is up to date). Set `PEERBUS_BIN` to use a prebuilt binary instead.
pub fn peerbus_bin() -> &'static std::path::Path {
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;

    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("PEERBUS_BIN") {
            return PathBuf::from(bin);
        }
        let exe = std::env::current_exe().expect("path of the test binary");
        // <target>/<profile>/deps/<test>-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let target_dir = profile_dir.parent().expect("target directory");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile name");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "peerbus-cli",
                "--bin",
                "peerbus",
                "--target-dir",
            ])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // Cargo sets these for the test process; ring's build script tracks some of them, so
        // passing them on would rebuild the workspace here and again in the next `cargo` run.
        for (var, _) in std::env::vars_os() {
            let name = var.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| name.starts_with(p))
                || name == "CARGO_PRIMARY_PACKAGE"
                || name == "CARGO_TARGET_TMPDIR"
            {
                build.env_remove(&var);
            }
        }
        if profile != "debug" {
            build.args(["--profile", profile]);
        }
        let status = build
            .status()
            .expect("run cargo build for the peerbus binary");
        assert!(
            status.success(),
            "cargo build -p peerbus-cli failed: {status}"
        );
        let bin = profile_dir.join(format!("peerbus{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// A member of a [`Gate`]: its record, and where its node takes discovery events.
pub type Member = (
    peerbus::PeerRecord,
    tokio::sync::mpsc::Sender<peerbus::DiscoveryEvent>,
);

/// A discovery the test opens: its members learn of each other only in [`Gate::reveal`].
#[derive(Clone, Default)]
pub struct Gate {
    members: std::sync::Arc<std::sync::Mutex<Vec<Member>>>,
}

impl Gate {
    /// Tells every member of every other one, both of a pair right after each other, so
    /// both dial at once.
    pub async fn reveal(&self) {
        let members = self.members.lock().expect("gate").clone();
        for (i, (a, a_events)) in members.iter().enumerate() {
            for (b, b_events) in &members[i + 1..] {
                let _ = a_events.send(peerbus::DiscoveryEvent::Up(b.clone())).await;
                let _ = b_events.send(peerbus::DiscoveryEvent::Up(a.clone())).await;
            }
        }
    }
}

impl peerbus::Discovery for Gate {
    fn start(
        &mut self,
        local: peerbus::PeerRecord,
        events: tokio::sync::mpsc::Sender<peerbus::DiscoveryEvent>,
    ) -> Result<(), peerbus::DiscoveryError> {
        self.members.lock().expect("gate").push((local, events));
        Ok(())
    }

    fn stop(&mut self) {}

    fn name(&self) -> &'static str {
        "gate"
    }
}
