//! The live mesh page in a real headless Chromium, driven over WebDriver by chromedriver.
//!
//! Needs the Debian packages `chromium` and `chromium-driver` (`.ci/run` installs them).
//! Three in-process nodes on loopback; the page of one of them must show all three, then
//! show a node as down once it is cut off (frozen like a killed process: no goodbye).
//! Then the page of a node that is a member by a mesh CA must show when its certificate ends
//! and which revocation list it uses, and, once a list revokes it, that it is revoked. The
//! screenshots land in
//! `target/test-output/browser/mesh.png` and `mesh-ca.png`.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{builder, start, within};
use peerbus::{Faults, MemoryNetwork, MeshKey};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Chromium flags for a headless run as root in a container.
const CHROMIUM_FLAGS: [&str; 8] = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-extensions",
    "--window-size=1400,900",
];

/// `name` on the PATH.
fn find(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn output_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp
        .parent()
        .unwrap_or(tmp)
        .join("test-output")
        .join("browser");
    std::fs::create_dir_all(&dir).expect("create the test output folder");
    dir
}

/// The chromedriver child process, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver leads its own process group: end it and the browsers it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver call: an HTTP/1.1 request with an optional JSON body; returns `value`.
async fn wd(port: u16, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect to chromedriver: {e}"))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let body = tokio::time::timeout(Duration::from_secs(60), read_response(&mut s))
        .await
        .map_err(|_| format!("chromedriver did not answer {method} {path} within 60s"))??;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    let value = v.get("value").cloned().unwrap_or(Value::Null);
    if let Some(err) = value.get("error") {
        return Err(format!(
            "{method} {path}: {err}: {}",
            value.get("message").unwrap_or(&Value::Null)
        ));
    }
    Ok(value)
}

/// Reads one HTTP/1.1 response body (chromedriver keeps connections open, so read by length).
async fn read_response(s: &mut tokio::net::TcpStream) -> Result<String, String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let head = head.to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let complete = match length {
                Some(len) => body.len() >= len,
                None if head.contains("transfer-encoding: chunked") => body.ends_with("0\r\n\r\n"),
                None => n == 0,
            };
            if complete {
                return Ok(if head.contains("transfer-encoding: chunked") {
                    dechunk(body)
                } else {
                    body.to_string()
                });
            }
        }
        if n == 0 {
            return Err(format!("connection closed mid-response: {text}"));
        }
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

async fn start_driver(out: &Path) -> Driver {
    let missing = |what: &str| {
        panic!(
            "{what} not found on PATH: the browser test needs headless Chromium and chromedriver. \
             Install them with `apt-get install -y chromium chromium-driver` (Debian; `.ci/run` \
             does this)."
        )
    };
    let driver = find("chromedriver").unwrap_or_else(|| missing("chromedriver"));
    if find("chromium").is_none() {
        missing("chromium");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .arg(format!(
            "--log-path={}",
            out.join("chromedriver.log").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start chromedriver");
    let d = Driver { child, port };
    for _ in 0..200 {
        if let Ok(v) = wd(port, "GET", "/status", None).await
            && v["ready"] == true
        {
            return d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not become ready within 20s");
}

/// The nodes the page draws: `(service, data-state, data-role)`.
async fn nodes_on_page(port: u16, session: &str) -> Vec<(String, String, String)> {
    let script = "return [...document.querySelectorAll('#graph g.node')]\
                  .map(n => [n.dataset.service, n.dataset.state, n.dataset.role]);";
    let v = wd(
        port,
        "POST",
        &format!("/session/{session}/execute/sync"),
        Some(json!({ "script": script, "args": [] })),
    )
    .await
    .expect("run script");
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|n| {
                    let s = |i: usize| n[i].as_str().unwrap_or_default().to_string();
                    (s(0), s(1), s(2))
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_for_page(
    port: u16,
    session: &str,
    secs: u64,
    what: &str,
    cond: impl Fn(&[(String, String, String)]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut last = Vec::new();
    while tokio::time::Instant::now() < deadline {
        last = nodes_on_page(port, session).await;
        if cond(&last) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the page did not show {what} within {secs}s; it showed {last:?}");
}

/// Opens `node`'s admin page in the session.
async fn open(port: u16, session: &str, node: &peerbus::Node) {
    let page = format!("http://{}/", node.admin_addr().expect("admin"));
    wd(
        port,
        "POST",
        &format!("/session/{session}/url"),
        Some(json!({ "url": page })),
    )
    .await
    .unwrap_or_else(|e| panic!("open {page}: {e}"));
}

/// Saves a screenshot of the page as `path` (a PNG).
async fn screenshot(port: u16, session: &str, path: &Path) {
    let png = wd(port, "GET", &format!("/session/{session}/screenshot"), None)
        .await
        .expect("screenshot");
    let png = data_encoding::BASE64
        .decode(png.as_str().expect("base64 string").as_bytes())
        .expect("base64");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(path, &png).expect("write the screenshot");
    eprintln!("screenshot: {} ({} bytes)", path.display(), png.len());
}

/// Runs `js` in the page every 200 ms until it returns something other than null, for up to
/// `secs` seconds; returns that (or null).
async fn shown_within(port: u16, session: &str, secs: u64, js: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let shown = script(port, session, js).await;
        if !shown.is_null() || tokio::time::Instant::now() >= deadline {
            return shown;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `js` in the page and returns its value.
async fn script(port: u16, session: &str, js: &str) -> Value {
    wd(
        port,
        "POST",
        &format!("/session/{session}/execute/sync"),
        Some(json!({ "script": js, "args": [] })),
    )
    .await
    .unwrap_or_else(|e| panic!("{js}: {e}"))
}

/// Opens the page of a node that is a member by a mesh CA certificate valid for 3 days and
/// bound to its service, whose CA's list (number 2) revokes one certificate: its membership
/// panel says when the certificate ends (amber: within 7 days), for which service, and which
/// list the node uses; then, once the CA's
/// next list revokes the node's own certificate, that it is revoked (red). Its screenshot
/// lands in `out/mesh-ca.png`.
async fn mesh_ca_membership(port: u16, session: &str, out: &Path) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = peerbus::CaKey::generate("shop", Duration::from_secs(30 * 86_400)).expect("ca");
    let id = peerbus::Identity::load_or_create(dir.path())
        .expect("identity")
        .node_id();
    let pem = ca
        .issue_for_services(&id, Duration::from_secs(3 * 86_400), &["vault"])
        .expect("issue");
    let cert = peerbus::NodeCert::from_pem("node.crt", pem.as_bytes()).expect("cert");
    let other = peerbus::Identity::generate().expect("identity").node_id();
    let revoked = ca
        .issue(&other, Duration::from_secs(86_400))
        .expect("issue");
    let revoked = peerbus::NodeCert::from_pem("other.crt", revoked.as_bytes()).expect("cert");
    let first = ca.revoke(None, []).expect("list 1");
    let list = ca
        .revoke(Some(first.as_bytes()), [revoked.serial().as_str()])
        .expect("list 2");
    // The CA's certificate trusted with the list `pem`.
    let trusting = |pem: &str| {
        ca.trust()
            .expect("trust")
            .with_revocation_lists("ca.crl", pem.as_bytes())
            .expect("list")
    };
    let node = start(
        peerbus::Node::builder("vault")
            .data_dir(dir.path())
            .mesh_ca(trusting(&list), cert.clone())
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(MemoryNetwork::new().discovery())
            .admin("127.0.0.1:0".parse().expect("addr")),
    )
    .await;
    open(port, session, &node).await;
    let read = "const p = document.getElementById('membership-panel'); \
        const c = document.getElementById('certificate'); \
        return p.hidden ? null : [c ? c.dataset.level : '', \
        document.getElementById('membership').innerText];";
    let shown = shown_within(port, session, 20, read).await;
    let text = shown[1].as_str().unwrap_or_default();
    assert_eq!(shown[0], "soon", "{shown}");
    assert!(
        text.contains("certificate valid until ")
            && text.contains(", for service vault (")
            && (text.contains("(2 days left)") || text.contains("(3 days left)"))
            && text.contains("list 2 of ")
            && text.contains(", next update ")
            && !text.contains("past its next update")
            && text.contains("shop")
            && text.contains(": 1 revoked"),
        "{text}"
    );
    // The CA's next list revokes the node's own certificate: the node does not take it, and
    // its page says in red that it is revoked.
    let third = ca
        .revoke(Some(list.as_bytes()), [cert.serial().as_str()])
        .expect("list 3");
    assert!(
        node.renew_mesh_ca(trusting(&third)).is_err(),
        "a list revoking itself was taken"
    );
    let read = "const r = document.getElementById('revoked'); \
        return r ? [r.dataset.level, r.innerText] : null;";
    let shown = shown_within(port, session, 20, read).await;
    let text = shown[1].as_str().unwrap_or_default();
    assert_eq!(shown[0], "ended", "{shown}");
    assert!(
        text.contains("certificate REVOKED: ")
            && text.contains(&format!("(serial {})", cert.serial())),
        "{text}"
    );
    screenshot(port, session, &out.join("mesh-ca.png")).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_page_shows_every_node_then_one_down() {
    let out = output_dir();
    let driver = start_driver(&out).await;
    let port = driver.port;
    within(120, async move {
        let net = MemoryNetwork::new();
        let key = MeshKey::generate();
        let payments = start(
            builder(&net, "payments", &key).admin("127.0.0.1:0".parse().expect("addr")),
        )
        .await;
        let orders = start(builder(&net, "orders", &key)).await;
        let faults = Faults::new(7);
        let notifications =
            start(builder(&net, "notifications", &key).faults(faults.clone())).await;
        let _orders_rx = common::drain(orders.messages().expect("messages"));
        let _notif_rx = common::drain(notifications.messages().expect("messages"));
        for svc in ["orders", "notifications"] {
            assert!(
                payments
                    .wait_for_instances(svc, 1, Duration::from_secs(10))
                    .await
            );
        }
        // Some traffic, so links carry rates and a backlog builds up for the lost node. It
        // runs until the page checks are done (bounded: 4,800 rounds, at least 2 minutes), so
        // a slow Chromium start does not leave the cut-off node without a backlog.
        let running = Arc::new(AtomicBool::new(true));
        let traffic = {
            let (payments, running) = (payments.clone(), running.clone());
            tokio::spawn(async move {
                for i in 0..4800 {
                    if !running.load(Ordering::Relaxed) {
                        break;
                    }
                    let _ = payments.send("orders", format!("order-{i}")).await;
                    let _ = payments.send("notifications", format!("mail-{i}")).await;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            })
        };

        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": find("chromium").expect("chromium").display().to_string(),
                "args": CHROMIUM_FLAGS,
            }
        }}});
        let session = wd(port, "POST", "/session", Some(caps))
            .await
            .expect("a Chromium session");
        let session = session["sessionId"]
            .as_str()
            .expect("session id")
            .to_string();
        open(port, &session, &payments).await;

        wait_for_page(port, &session, 30, "all three nodes up", |nodes| {
            ["payments", "orders", "notifications"].iter().all(|svc| {
                nodes
                    .iter()
                    .any(|(s, state, _)| s == svc && state == "up")
            })
        })
        .await;
        let nodes = nodes_on_page(port, &session).await;
        assert_eq!(nodes.len(), 3, "{nodes:?}");
        assert!(
            nodes
                .iter()
                .any(|(s, _, role)| s == "payments" && role == "self"),
            "{nodes:?}"
        );

        // Cut notifications off, as if its process was killed: no goodbye, the connection
        // times out (idle timeout 3 s) and redials fail.
        faults.block_all(true);
        wait_for_page(port, &session, 30, "notifications down", |nodes| {
            nodes
                .iter()
                .any(|(s, state, _)| s == "notifications" && state == "down")
                && nodes
                    .iter()
                    .any(|(s, state, _)| s == "orders" && state == "up")
        })
        .await;
        // The page lists the backlog kept for the lost node.
        let backlog = script(
            port,
            &session,
            "const r = document.querySelector('#backlog tr[data-destination=\"svc:notifications\"]'); return r ? Number(r.dataset.depth) : -1;",
        )
        .await;
        assert!(
            backlog.as_i64().unwrap_or(-1) > 0,
            "backlog of svc:notifications on the page: {backlog}"
        );

        screenshot(port, &session, &out.join("mesh.png")).await;

        // A mesh key: the membership panel names it by its fingerprint, and nothing of a
        // certificate.
        let keys = "const p = document.getElementById('membership-panel'); \
            const k = document.getElementById('mesh-keys'); \
            return p.hidden || !k ? null : [k.innerText, !!document.getElementById('certificate')];";
        let shown = shown_within(port, &session, 20, keys).await;
        assert_eq!(
            shown,
            json!([format!("mesh key {}", key.fingerprint()), false]),
            "{shown}"
        );
        mesh_ca_membership(port, &session, &out).await;

        let _ = wd(port, "DELETE", &format!("/session/{session}"), None).await;
        running.store(false, Ordering::Relaxed);
        let _ = traffic.await;
        faults.block_all(false);
        for n in [&payments, &orders, &notifications] {
            n.shutdown().await;
        }
    })
    .await;
    drop(driver);
}
