//! The `peerbus` binary, run as real processes.
//!
//! How the binary is found: an integration test of the facade package cannot use
//! `CARGO_BIN_EXE_peerbus` (the binary belongs to `peerbus-cli`), so `common::peerbus_bin` runs
//! `cargo build -p peerbus-cli --bin peerbus` once per test run, into the target directory and
//! profile this test binary was built in (derived from `current_exe()`), and uses the result.
//! That build is a no-op when `scripts/test` already built the workspace. Set `PEERBUS_BIN`
//! to use a prebuilt binary instead.
//!
//! Network safety: every node runs with `--interface loopback --listen 127.0.0.1:0`, each test
//! in a mesh of its own (the demo has its own tests in `tests/demo.rs`). Every wait is bounded by the test's
//! overall budget, and every child process is killed when its guard drops (also on panic).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::peerbus_bin;

/// An overall deadline for one test; every wait takes what is left of it.
struct Budget {
    deadline: Instant,
    secs: u64,
}

impl Budget {
    fn new(secs: u64) -> Self {
        Self {
            deadline: Instant::now() + Duration::from_secs(secs),
            secs,
        }
    }

    fn left(&self) -> Duration {
        let left = self.deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "test did not finish within its budget of {}s",
            self.secs
        );
        left
    }
}

/// A child process that is killed when dropped.
struct Guard {
    child: Child,
    what: String,
    stderr: Arc<Mutex<String>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guard {
    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits for the process to exit within `limit`; panics (killing it) otherwise.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "`{}` did not exit within {limit:?}; stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A mesh of its own for one test: the options every process of it gets.
struct Mesh {
    name: String,
    membership: Vec<String>,
}

impl Mesh {
    fn open(test: &str) -> Self {
        Self {
            name: format!("cli-{}-{test}", std::process::id()),
            membership: vec!["--insecure-open-mesh".into()],
        }
    }

    fn keyed(test: &str, key: &Path) -> Self {
        Self {
            name: format!("cli-{}-{test}", std::process::id()),
            membership: vec!["--mesh-key-file".into(), key.display().to_string()],
        }
    }

    /// A member by certificate: the node in `dir` (`<dir>.crt` its certificate) trusting
    /// the CA certificate `ca`.
    fn certified(test: &str, ca: &str, dir: &str) -> Self {
        Self {
            name: format!("cli-{}-{test}", std::process::id()),
            membership: vec![
                "--mesh-ca".into(),
                ca.into(),
                "--mesh-cert".into(),
                format!("{dir}.crt"),
                "--data-dir".into(),
                dir.into(),
            ],
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = base_command(args);
        cmd.args([
            "--mesh",
            &self.name,
            "--interface",
            "loopback",
            "--listen",
            "127.0.0.1:0",
        ]);
        cmd.args(&self.membership);
        cmd
    }
}

/// `peerbus send vault <text> --timeout <timeout>` as a member of `mesh`, run to its end
/// (`what` names it in failures).
fn send_to_vault(mesh: &Mesh, text: &str, timeout: &str, what: &str, budget: &Budget) -> Finished {
    run(
        mesh.command(&["send", "vault", text, "--timeout", timeout]),
        what,
        budget.left(),
    )
}

/// `peerbus <args>` with a clean PEERBUS_* environment.
fn base_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(peerbus_bin());
    cmd.args(args);
    for var in [
        "PEERBUS_MESH",
        "PEERBUS_MESH_KEY_FILE",
        "PEERBUS_MESH_CA",
        "PEERBUS_MESH_CERT",
        "PEERBUS_INSECURE_OPEN_MESH",
        "PEERBUS_INTERFACE",
        "PEERBUS_LISTEN",
        "PEERBUS_DATA_DIR",
        "PEERBUS_SEEDS",
        "PEERBUS_NO_NEW_TRACES",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A running process whose stdout arrives line by line.
struct Running {
    guard: Guard,
    lines: Receiver<String>,
}

fn spawn(mut cmd: Command, what: &str) -> Running {
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn `{what}`: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr_pipe = child.stderr.take().expect("stderr");
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = stderr.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr_pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = sink.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    Running {
        guard: Guard {
            child,
            what: what.to_string(),
            stderr,
        },
        lines,
    }
}

/// Spawns `cmd` with its stdin a pipe, writes `first` to it, and returns the pipe too.
fn spawn_piped(mut cmd: Command, what: &str, first: &[u8]) -> (Running, ChildStdin) {
    cmd.stdin(Stdio::piped());
    let mut running = spawn(cmd, what);
    let mut stdin = running.guard.child.stdin.take().expect("stdin");
    stdin
        .write_all(first)
        .and_then(|()| stdin.flush())
        .expect("write stdin");
    (running, stdin)
}

impl Running {
    /// The next `n` stdout lines, within `limit`.
    fn take_lines(&self, n: usize, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(line),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => panic!(
                    "`{}` printed {} of {n} lines within {limit:?}:\n{}\nstderr:\n{}",
                    self.guard.what,
                    out.len(),
                    out.join("\n"),
                    self.guard.stderr()
                ),
            }
        }
        out
    }

    /// Asks the process to stop with SIGTERM and waits for its exit.
    fn terminate(mut self, limit: Duration) -> ExitStatus {
        signal(&self.guard.child, "-TERM");
        self.guard.wait(limit)
    }
}

/// A finished one-shot command.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs a one-shot command to completion within `limit`.
fn run(cmd: Command, what: &str, limit: Duration) -> Finished {
    let mut p = spawn(cmd, what);
    let status = p.guard.wait(limit);
    // The pipes close at exit; the reader threads drain what is left.
    let mut stdout = Vec::new();
    while let Ok(line) = p.lines.recv_timeout(Duration::from_secs(5)) {
        stdout.push(line);
    }
    let stderr_deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&p.guard.stderr) > 1 && Instant::now() < stderr_deadline {
        thread::sleep(Duration::from_millis(10));
    }
    Finished {
        status,
        stdout: stdout.join("\n"),
        stderr: p.guard.stderr(),
    }
}

fn parse_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
}

/// Runs `peerbus peers --json` until a node of the mesh sees `n` connected peers of each
/// service in `services` (the processes are up and announced), or panics when the budget runs
/// out. A precondition for commands that act on the peers their discovery window finds.
fn wait_for_services(mesh: &Mesh, services: &[(&str, usize)], budget: &Budget) {
    let mut last = String::new();
    while budget.left() > Duration::from_secs(5) {
        let peers = run(
            mesh.command(&["peers", "--wait", "1s", "--json"]),
            "peers",
            budget.left(),
        );
        assert!(peers.status.success(), "peers failed: {}", peers.stderr);
        let list = parse_line(peers.stdout.trim());
        let connected = |service: &str| {
            list.as_array().map_or(0, |a| {
                a.iter()
                    .filter(|p| p["service"] == service && p["state"] == "connected")
                    .count()
            })
        };
        if services.iter().all(|(svc, n)| connected(svc) >= *n) {
            return;
        }
        last = peers.stdout;
    }
    panic!("the peers {services:?} never all showed up; last `peers`: {last}");
}

#[test]
fn node_prints_every_message_a_pipelined_send_delivers() {
    let budget = Budget::new(90);
    let mesh = Mesh::open("send");
    let mut node_cmd = mesh.command(&["node", "--service", "inventory", "--print"]);
    node_cmd.env("RUST_LOG", "info");
    let node = spawn(node_cmd, "peerbus node --print");

    let send = run(
        mesh.command(&[
            "send",
            "inventory",
            "reserve {i}",
            "--key",
            "sku-{i%5}",
            "--count",
            "50",
            "--timeout",
            "30s",
            "-H",
            "tenant=acme",
        ]),
        "peerbus send --count 50",
        budget.left(),
    );
    assert!(
        send.status.success(),
        "send failed ({}):\nstdout: {}\nstderr: {}\nnode stderr: {}",
        send.status,
        send.stdout,
        send.stderr,
        node.guard.stderr()
    );
    assert!(
        send.stdout
            .starts_with("sent 50 messages to inventory, all acknowledged in "),
        "unexpected summary: {}",
        send.stdout
    );

    let lines = node.take_lines(50, budget.left().min(Duration::from_secs(20)));
    let mut payloads = BTreeSet::new();
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in &lines {
        let v = parse_line(line);
        assert_eq!(v["kind"], "send", "{line}");
        assert_eq!(v["service"], "inventory", "{line}");
        assert!(v.get("topic").is_none(), "a send has no topic: {line}");
        assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()), "{line}");
        assert!(v["from"].as_str().is_some_and(|s| !s.is_empty()), "{line}");
        assert!(v["attempt"].as_u64().is_some_and(|a| a >= 1), "{line}");
        assert!(v["redelivered"].is_boolean(), "{line}");
        // The header given, and the trace every message starts by default (a child span of
        // none: `00-<32 hex>-<16 hex>-01`).
        let headers = v["headers"].as_object().expect("headers");
        assert_eq!(headers.len(), 2, "{line}");
        assert_eq!(headers["tenant"], "acme", "{line}");
        let traceparent = headers["traceparent"].as_str().expect("traceparent");
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert!(
            parts.len() == 4
                && parts[0] == "00"
                && parts[1].len() == 32
                && parts[2].len() == 16
                && parts[3] == "01"
                && parts[1..3]
                    .iter()
                    .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit())),
            "{line}"
        );
        let payload = v["payload"].as_str().expect("payload");
        let i: u64 = payload
            .strip_prefix("reserve ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("payload not rendered from the template: {line}"));
        assert_eq!(v["key"], format!("sku-{}", i % 5), "{line}");
        assert!(payloads.insert(i), "message {i} printed twice");
        per_key.entry(format!("sku-{}", i % 5)).or_default().push(i);
    }
    assert_eq!(payloads, (0..50).collect(), "every message printed once");
    for (key, order) in per_key {
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order: {order:?}"
        );
    }

    // PAYLOAD `-`: each line of stdin is one message (here all of one key, so in order),
    // sent as it arrives: the first two lines reach the node while stdin is still open,
    // though a call could take three.
    let from_stdin = mesh.command(&[
        "send",
        "inventory",
        "-",
        "--key",
        "lines",
        "--batch",
        "3",
        "--timeout",
        "30s",
    ]);
    let (mut sending, mut stdin) = spawn_piped(from_stdin, "peerbus send -", b"first line\r\n\n");
    let payloads = |lines: Vec<String>| -> Vec<String> {
        lines
            .iter()
            .map(|line| {
                parse_line(line)["payload"]
                    .as_str()
                    .expect("payload")
                    .into()
            })
            .collect()
    };
    let before_end = node.take_lines(2, budget.left().min(Duration::from_secs(30)));
    assert_eq!(payloads(before_end), ["first line", ""], "lines as sent");
    stdin.write_all(b"third {i}\n").expect("write stdin");
    drop(stdin);
    let status = sending.guard.wait(budget.left());
    let summary = sending
        .lines
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    assert!(
        status.success() && summary.starts_with("sent 3 messages to inventory"),
        "send - ({status}): {summary}\n{}",
        sending.guard.stderr()
    );
    let last = node.take_lines(1, budget.left().min(Duration::from_secs(20)));
    assert_eq!(payloads(last), ["third {i}"], "lines as sent");

    // Ctrl-C stops the reading of stdin (still open here); what was sent is acknowledged
    // before `send` exits, with its summary.
    let cut = mesh.command(&["send", "inventory", "-", "--timeout", "30s"]);
    let (mut cutting, stdin) = spawn_piped(cut, "peerbus send - (Ctrl-C)", b"fourth\n");
    let fourth = node.take_lines(1, budget.left().min(Duration::from_secs(30)));
    assert_eq!(payloads(fourth), ["fourth"], "lines as sent");
    signal(&cutting.guard.child, "-INT");
    let status = cutting
        .guard
        .wait(budget.left().min(Duration::from_secs(20)));
    let summary = cutting
        .lines
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    assert!(
        status.success()
            && summary.starts_with("sent 1 message to inventory, all acknowledged in ")
            && summary.ends_with("(stopped by a signal before stdin ended)"),
        "send - after Ctrl-C ({status}): {summary}\n{}",
        cutting.guard.stderr()
    );
    drop(stdin);

    let status = node.terminate(budget.left().min(Duration::from_secs(20)));
    assert!(
        status.success(),
        "node did not exit cleanly on SIGTERM: {status}"
    );
}

/// Sends `signal` (`-TERM`, `-STOP`, `-CONT`) to `child`.
fn signal(child: &Child, signal: &str) {
    let pid = child.id().to_string();
    let sent = Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill {signal} {pid} failed");
}

#[test]
fn send_from_stdin_stops_at_the_first_message_a_frozen_consumer_leaves_unacknowledged() {
    let budget = Budget::new(60);
    let mesh = Mesh::open("frozen");
    let node = spawn(
        mesh.command(&["node", "--service", "inventory", "--print"]),
        "peerbus node --print",
    );
    // `--timeout` also bounds the wait for a consumer: find it first.
    wait_for_services(&mesh, &[("inventory", 1)], &budget);
    let send = mesh.command(&["send", "inventory", "-", "--timeout", "5s"]);
    let (mut sending, mut stdin) = spawn_piped(send, "peerbus send -", b"one\n");
    let printed = node.take_lines(1, budget.left().min(Duration::from_secs(30)));
    assert!(printed[0].contains(r#""payload":"one""#), "{printed:?}");

    // Frozen, the consumer acknowledges nothing more: the next line is 5 s late, and
    // `send` fails then, with stdin still open. Whether the first line's ack got out
    // before the freeze is a race, so the counts may be 1 and 1 or 0 and 2 (or 0 of 1,
    // if the first line was already late when the second was written).
    signal(&node.guard.child, "-STOP");
    stdin.write_all(b"two\n").expect("write stdin");
    let status = sending
        .guard
        .wait(budget.left().min(Duration::from_secs(20)));
    signal(&node.guard.child, "-CONT");
    let stderr = sending.guard.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let counted = |acked: u32, sent: u32| {
        format!(
            "{acked} of {sent} messages to `inventory` acknowledged within 5s each; {} still \
             unacknowledged; stopped there: the rest of stdin was not read",
            sent - acked
        )
    };
    assert!(
        [(1, 2), (0, 2), (0, 1)]
            .iter()
            .any(|&(acked, sent)| stderr.contains(&counted(acked, sent))),
        "{stderr}"
    );
    drop(stdin);
    let status = node.terminate(budget.left().min(Duration::from_secs(20)));
    assert!(status.success(), "node did not exit cleanly: {status}");
}

#[test]
fn pub_reaches_every_subscriber_group_once() {
    let budget = Budget::new(90);
    let mesh = Mesh::open("pub");
    let ledger = spawn(
        mesh.command(&[
            "node",
            "--service",
            "ledger",
            "--print",
            "--subscribe",
            "payment.>",
        ]),
        "node --subscribe payment.>",
    );
    let tap = spawn(
        mesh.command(&["sub", "payment.*", "--group", "tap", "--count", "5"]),
        "sub --group tap --count 5",
    );
    // Both subscribers must be up and announced before `pub` starts, so that its discovery
    // window sees them together (not a claim about `pub`, a precondition).
    wait_for_services(&mesh, &[("ledger", 1), ("peerbus-cli", 1)], &budget);

    let publish = run(
        mesh.command(&[
            "pub",
            "payment.ok",
            "paid {i}",
            "--count",
            "5",
            "--batch",
            "2",
            "--timeout",
            "30s",
            "--header",
            "via=a",
            "-H",
            "via=b",
            "--no-new-traces",
        ]),
        "pub --count 5 --batch 2",
        budget.left(),
    );
    assert!(
        publish.status.success(),
        "pub failed: {}\n{}",
        publish.status,
        publish.stderr
    );
    assert!(
        publish
            .stdout
            .starts_with("published 5 messages to payment.ok as 10 group copies"),
        "unexpected summary: {}",
        publish.stdout
    );
    for (p, group) in [(&ledger, "ledger"), (&tap, "tap")] {
        let lines = p.take_lines(5, budget.left().min(Duration::from_secs(20)));
        let mut payloads = BTreeSet::new();
        for line in &lines {
            let v = parse_line(line);
            assert_eq!(v["kind"], "publish", "{line}");
            assert_eq!(v["topic"], "payment.ok", "{line}");
            assert!(
                v.get("service").is_none(),
                "a publish has no service: {line}"
            );
            assert!(
                v["id"]
                    .as_str()
                    .is_some_and(|id| id.contains(&format!("grp:{group}/"))),
                "{line}"
            );
            // Repeated names joined; no `traceparent` with --no-new-traces.
            assert_eq!(v["headers"], serde_json::json!({"via": "a, b"}), "{line}");
            payloads.insert(v["payload"].as_str().expect("payload").to_string());
        }
        let expected: BTreeSet<String> = (0..5).map(|i| format!("paid {i}")).collect();
        assert_eq!(payloads, expected, "group {group}");
    }
    // `--count 5`: done once it printed and acknowledged five.
    let mut tap = tap;
    let status = tap.guard.wait(budget.left().min(Duration::from_secs(20)));
    assert!(
        status.success(),
        "sub --count 5 did not exit cleanly: {status}\n{}",
        tap.guard.stderr()
    );
    let status = ledger.terminate(budget.left().min(Duration::from_secs(20)));
    assert!(
        status.success(),
        "node did not exit cleanly on SIGTERM: {status}"
    );
}

#[test]
fn req_gets_the_echo_and_fails_clearly_without_an_instance() {
    let budget = Budget::new(90);
    let mesh = Mesh::open("req");
    let _echo = spawn(
        mesh.command(&["node", "--service", "echo", "--echo"]),
        "node --echo",
    );
    let _quiet = spawn(
        mesh.command(&["node", "--service", "quiet"]),
        "node (no --echo)",
    );

    let req = run(
        mesh.command(&["req", "echo", "hello mesh", "--timeout", "30s"]),
        "peerbus req echo",
        budget.left(),
    );
    assert!(
        req.status.success(),
        "req failed: {}\n{}",
        req.status,
        req.stderr
    );
    assert_eq!(req.stdout, "hello mesh");

    let none = run(
        mesh.command(&["req", "nobody", "ping", "--timeout", "2s"]),
        "peerbus req nobody",
        budget.left(),
    );
    assert_eq!(none.status.code(), Some(1), "stderr: {}", none.stderr);
    assert!(
        none.stderr
            .contains("no instance of service \"nobody\" found within 2s"),
        "stderr: {}",
        none.stderr
    );

    let quiet = run(
        mesh.command(&["req", "quiet", "ping", "--timeout", "30s"]),
        "peerbus req quiet",
        budget.left(),
    );
    assert_eq!(quiet.status.code(), Some(1), "stderr: {}", quiet.stderr);
    assert!(
        quiet.stderr.contains("no responders"),
        "stderr: {}",
        quiet.stderr
    );
}

/// A sender of another mesh key is refused and told why, the vault's status counts the
/// refusals, and the vault takes a key rotation's first step in place with `peerbus reload`.
#[test]
fn send_with_another_mesh_key_is_refused() {
    let budget = Budget::new(90);
    let dir = tempfile::tempdir().expect("tempdir");
    let key_a = dir.path().join("a.key");
    let key_b = dir.path().join("b.key");
    for key in [&key_a, &key_b] {
        let path = key.to_str().expect("utf-8 path");
        let out = run(
            base_command(&["keygen", "--out", path]),
            "keygen",
            budget.left(),
        );
        assert!(out.status.success(), "keygen failed: {}", out.stderr);
        let fingerprint = peerbus::MeshKey::load(key).expect("key").fingerprint();
        assert_eq!(
            out.stdout.trim(),
            format!("wrote a new mesh key to {path} (fingerprint {fingerprint})")
        );
    }
    let before = std::fs::read(&key_a).expect("read key a");
    let again = run(
        base_command(&["keygen", "--out", key_a.to_str().expect("utf-8 path")]),
        "keygen over an existing file",
        budget.left(),
    );
    assert_eq!(
        again.status.code(),
        Some(1),
        "keygen must refuse to overwrite"
    );
    assert_eq!(
        std::fs::read(&key_a).expect("read key a"),
        before,
        "key a was changed"
    );

    let with_a = Mesh::keyed("key", &key_a);
    let with_b = Mesh::keyed("key", &key_b);
    let vault_dir = dir.path().join("vault");
    let vault_dir = vault_dir.to_str().expect("utf-8 path");
    let _vault = spawn(
        with_a.command(&["node", "--service", "vault", "--data-dir", vault_dir]),
        "node with key a",
    );

    // Long enough for the vault to start and be found on a busy machine.
    let refused = send_to_vault(&with_b, "let me in", "20s", "send with key b", &budget);
    assert!(
        !refused.status.success(),
        "send with the wrong key succeeded"
    );
    assert!(
        refused.stderr.contains("mesh key mismatch") || refused.stderr.contains("refused"),
        "stderr does not explain the refusal:\n{}",
        refused.stderr
    );
    // The vault's operator sees the refusals in `peerbus status` (it refused the proof of the
    // sender's dial).
    let mut shown = String::new();
    while !shown.contains("connections closed for peer faults: mesh_proof_failed") {
        assert!(
            budget.left() > Duration::from_secs(30),
            "`peerbus status` of the vault never named the refused proofs:\n{shown}"
        );
        thread::sleep(Duration::from_millis(200));
        let status = run(
            with_a.command(&["status", "--data-dir", vault_dir]),
            "peerbus status of the vault",
            budget.left(),
        );
        assert!(status.status.success(), "status failed: {}", status.stderr);
        shown = status.stdout;
    }

    let accepted = send_to_vault(&with_a, "hello", "30s", "send with key a", &budget);
    assert!(
        accepted.status.success(),
        "send with the right key failed: {}",
        accepted.stderr
    );
    // The one accepted message arrived at the vault and was handled there.
    let status = run(
        with_a.command(&["status", "--data-dir", vault_dir]),
        "peerbus status of the vault",
        budget.left(),
    );
    assert!(
        status
            .stdout
            .contains("received here 1  delivered here 1  "),
        "{}",
        status.stdout
    );

    // A key rotation's first step in place: the vault's key file now proves key a and
    // accepts key b, and `peerbus reload` takes it without a restart. A client of the next
    // step (proving b, accepting a) gets in.
    let (a, b) = (
        std::fs::read_to_string(&key_a).expect("read key a"),
        std::fs::read_to_string(&key_b).expect("read key b"),
    );
    std::fs::write(&key_a, format!("{a}{b}")).expect("step 1");
    let reload = run(
        with_a.command(&["reload", "--data-dir", vault_dir]),
        "peerbus reload of the vault",
        budget.left(),
    );
    assert!(
        reload.status.success() && reload.stdout.trim() == "mesh key file: taken",
        "{}{}",
        reload.stdout,
        reload.stderr
    );
    // Its status names both keys by fingerprint, the one it proves first.
    let [fa, fb] =
        [&key_a, &key_b].map(|k| peerbus::MeshKey::load_all(k).expect("key")[0].fingerprint());
    let status = run(
        with_a.command(&["status", "--data-dir", vault_dir]),
        "peerbus status of the vault",
        budget.left(),
    );
    assert!(
        status.stdout.contains(&format!(
            "mesh key {fa}, also accepting {fb} (a key rotation's step)\n"
        )),
        "{}",
        status.stdout
    );
    let step2 = dir.path().join("step2.key");
    std::fs::write(&step2, format!("{b}{a}")).expect("step 2");
    let next = send_to_vault(
        &Mesh::keyed("key", &step2),
        "hello from the next step",
        "30s",
        "send with key b, accepting a",
        &budget,
    );
    assert!(next.status.success(), "{}", next.stderr);
}

/// In `dir`, two CAs made with `ca new` (`ca/`, `other-ca/`) and certificates for a week
/// made with `ca issue` for the nodes whose data directories are `vault/` and `client/` (by
/// `ca`) and `stranger/` (by `other-ca`), as `<node>.crt`. Returns the three node ids.
fn two_cas_and_three_nodes(dir: &Path, budget: &Budget) -> Vec<String> {
    let path = |name: &str| dir.join(name).display().to_string();
    for ca in ["ca", "other-ca"] {
        let out = run(
            base_command(&["ca", "new", "--dir", &path(ca)]),
            "ca new",
            budget.left(),
        );
        assert!(out.status.success(), "ca new failed: {}", out.stderr);
        assert!(out.stdout.contains("ca.crt"), "{}", out.stdout);
    }
    let mut ids = Vec::new();
    for (ca, node) in [("ca", "vault"), ("ca", "client"), ("other-ca", "stranger")] {
        let (ca_dir, out_file, data_dir) = (path(ca), path(&format!("{node}.crt")), path(node));
        let mut args = vec![
            "ca",
            "issue",
            "--ca",
            &ca_dir,
            "--for-data-dir",
            &data_dir,
            "--days",
            "7",
            "--out",
            &out_file,
        ];
        // The vault's certificate binds it to its service; the others may run any.
        if node == "vault" {
            args.extend(["--service", "vault"]);
        }
        let out = run(base_command(&args), "ca issue", budget.left());
        assert!(out.status.success(), "ca issue failed: {}", out.stderr);
        assert!(
            out.stdout.contains("issued a certificate for node")
                && out.stdout.contains(", for service vault") == (node == "vault"),
            "{}",
            out.stdout
        );
        let id = peerbus::Identity::load_or_create(&dir.join(node)).expect("identity");
        ids.push(id.node_id().to_string());
    }
    ids
}

/// An operator's mesh CA from the CLI: `ca new`, `ca issue` for each node's data directory,
/// nodes and clients that present their certificates; a client whose certificate another CA
/// issued is refused and told why.
#[test]
fn members_by_mesh_ca_certificate_talk_and_a_stranger_is_refused() {
    let budget = Budget::new(90);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    two_cas_and_three_nodes(dir.path(), &budget);
    let again = run(
        base_command(&["ca", "new", "--dir", &path("ca")]),
        "ca new over an existing CA",
        budget.left(),
    );
    assert_eq!(again.status.code(), Some(1), "ca new must not overwrite");
    assert!(again.stderr.contains("already exists"), "{}", again.stderr);
    let mesh =
        |ca: &str, node: &str| Mesh::certified("ca", &format!("{}/ca.crt", path(ca)), &path(node));
    // Its certificate binds the vault to its service: it cannot run another.
    let other = run(
        mesh("ca", "vault").command(&["node", "--service", "cashier"]),
        "node of another service",
        budget.left(),
    );
    assert!(
        !other.status.success()
            && other.stderr.contains(
                "this node cannot run service `cashier`: its mesh certificate binds it to \
                 service `vault`, not `cashier`"
            ),
        "{}",
        other.stderr
    );
    let _vault = spawn(
        mesh("ca", "vault").command(&["node", "--service", "vault"]),
        "vault node",
    );
    let refused = send_to_vault(
        &mesh("other-ca", "stranger"),
        "let me in",
        "20s",
        "send by a stranger",
        &budget,
    );
    assert!(!refused.status.success(), "the stranger's send succeeded");
    assert!(
        refused.stderr.contains("mesh membership refused") && refused.stderr.contains("--mesh-ca"),
        "stderr does not explain the refusal:\n{}",
        refused.stderr
    );
    let accepted = send_to_vault(
        &mesh("ca", "client"),
        "hello",
        "30s",
        "send by a member",
        &budget,
    );
    assert!(
        accepted.status.success(),
        "a member's send failed: {}",
        accepted.stderr
    );
    let status = run(
        mesh("ca", "vault").command(&["status"]),
        "peerbus status of the vault",
        budget.left(),
    );
    assert!(
        status.stdout.contains("mesh certificate valid until"),
        "{}",
        status.stdout
    );
    let mixed = run(
        mesh("ca", "client").command(&["send", "vault", "x", "--mesh-key-file", "k"]),
        "a mesh CA and a key file",
        budget.left(),
    );
    assert_eq!(mixed.status.code(), Some(2), "{}", mixed.stderr);
}

/// `peerbus ca revoke` adds a node's certificates to the CA's revocation list (`ca new`
/// writes it empty), by the record `ca issue` keeps; a node given the list refuses them, its
/// own at start included, and certificates of another CA or of unknown nodes are not taken.
#[test]
fn a_revoked_node_is_refused_and_the_revocation_list_keeps_what_it_revoked() {
    let budget = Budget::new(90);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let ids = two_cas_and_three_nodes(dir.path(), &budget);
    let revoke = |args: &[&str]| {
        let mut all = vec!["ca", "revoke", "--ca"];
        let ca = path("ca");
        all.push(&ca);
        all.extend_from_slice(args);
        run(base_command(&all), "ca revoke", budget.left())
    };
    let unknown = revoke(&["--node-id", &ids[2]]);
    assert!(!unknown.status.success());
    assert!(
        unknown.stderr.contains("records no certificate"),
        "{}",
        unknown.stderr
    );
    let foreign = revoke(&["--cert", &path("stranger.crt")]);
    assert!(!foreign.status.success());
    assert!(
        foreign.stderr.contains("is not a certificate of this CA"),
        "{}",
        foreign.stderr
    );
    let revoked = revoke(&["--node-id", &ids[1]]);
    assert!(revoked.status.success(), "{}", revoked.stderr);
    assert!(
        revoked.stdout.contains("now revokes 1"),
        "{}",
        revoked.stdout
    );
    // Revoking it again by its file adds nothing; the list keeps what it revoked.
    let again = revoke(&["--cert", &path("client.crt")]);
    assert!(again.status.success(), "{}", again.stderr);
    assert!(again.stdout.contains("now revokes 1"), "{}", again.stdout);
    // Renewed with nothing more revoked, its next update a second away: the vault uses it
    // all the same (the revoked client stays refused), and its status flags it once late.
    let too_short = revoke(&["--renew", "--next-update", "0s"]);
    assert!(
        !too_short.status.success() && too_short.stderr.contains("next update is 1 s to"),
        "{}",
        too_short.stderr
    );
    let renewed = revoke(&["--renew", "--next-update", "1s"]);
    assert!(
        renewed.status.success()
            && renewed.stdout.contains("renewed the revocation list")
            && renewed.stdout.contains("now revokes 1, next update "),
        "{}{}",
        renewed.stdout,
        renewed.stderr
    );

    let mesh = |node: &str| {
        let mut m = Mesh::certified("crl", &format!("{}/ca.crt", path("ca")), &path(node));
        m.membership
            .extend(["--mesh-crl".to_string(), format!("{}/ca.crl", path("ca"))]);
        m
    };
    let vault = spawn(
        mesh("vault").command(&["node", "--service", "vault"]),
        "vault node",
    );
    let refused = send_to_vault(
        &mesh("client"),
        "let me in",
        "10s",
        "send by a revoked node",
        &budget,
    );
    assert!(!refused.status.success(), "a revoked node's send succeeded");
    assert!(
        refused.stderr.contains("is revoked by the mesh CA"),
        "{}",
        refused.stderr
    );
    // Not given the list itself, it starts, and the vault's refusal says why and what to do.
    let unaware = send_to_vault(
        &Mesh::certified("crl", &format!("{}/ca.crt", path("ca")), &path("client")),
        "let me in",
        "10s",
        "send by a revoked node without the list",
        &budget,
    );
    assert!(!unaware.status.success(), "a revoked node's send succeeded");
    let error = unaware
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {}", unaware.stderr));
    assert!(
        error.contains("is revoked by the mesh CA")
            && error.contains("a new one (`peerbus ca issue`")
            && !error.contains("--mesh-key-file"),
        "{error}"
    );
    // Run as a node, it learns from the vault's refusals that it is revoked, and its
    // `peerbus status` says so.
    let unaware = Mesh::certified("crl", &format!("{}/ca.crt", path("ca")), &path("client"));
    let client = spawn(
        unaware.command(&["node", "--service", "client"]),
        "revoked client node",
    );
    let deadline = Instant::now() + Duration::from_secs(20).min(budget.left());
    let status = loop {
        let status = run(
            unaware.command(&["status"]),
            "peerbus status of the revoked client",
            budget.left(),
        );
        if status.stdout.contains("mesh certificate REVOKED") || Instant::now() >= deadline {
            break status;
        }
        thread::sleep(Duration::from_millis(300));
    };
    assert!(
        status.stdout.contains("mesh certificate REVOKED: ")
            && status.stdout.contains(") is revoked by the mesh CA")
            && status.stdout.contains("(`peerbus ca issue`"),
        "{}",
        status.stdout
    );
    // A certificate the CA issues the node anew is not revoked. `peerbus reload` makes the
    // running node take it at once (not at its next look at the file, a minute away), and
    // it no longer says it is revoked.
    let reissued = run(
        base_command(&[
            "ca",
            "issue",
            "--ca",
            &path("ca"),
            "--for-data-dir",
            &path("client"),
            "--out",
            &path("client.crt"),
        ]),
        "ca issue again",
        budget.left(),
    );
    assert!(reissued.status.success(), "{}", reissued.stderr);
    let reload = run(
        unaware.command(&["reload"]),
        "peerbus reload of the client",
        budget.left(),
    );
    assert!(
        reload.status.success()
            && reload
                .stdout
                .contains("mesh CA file and revocation lists: unchanged")
            && reload.stdout.contains("this node's certificate: taken"),
        "{}{}",
        reload.stdout,
        reload.stderr
    );
    // Asked again, nothing is new; `--json` says so per file.
    let again = run(
        unaware.command(&["reload", "--json"]),
        "peerbus reload --json of the client",
        budget.left(),
    );
    let answer: serde_json::Value = serde_json::from_str(&again.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", again.stdout, again.stderr));
    assert_eq!(
        answer,
        serde_json::json!({"ca": "unchanged", "certificate": "unchanged"})
    );
    let status = run(
        unaware.command(&["status"]),
        "peerbus status of the renewed client",
        budget.left(),
    );
    assert!(
        status.status.success() && !status.stdout.contains("REVOKED"),
        "{}",
        status.stdout
    );
    // SIGHUP reads the files again too (nothing new now), and the node keeps running.
    signal(&client.guard.child, "-HUP");
    let deadline = Instant::now() + Duration::from_secs(10).min(budget.left());
    while !client
        .guard
        .stderr()
        .contains("SIGHUP: read the mesh files again")
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(100));
    }
    let log = client.guard.stderr();
    assert!(
        log.contains("SIGHUP: read the mesh files again") && log.contains("unchanged"),
        "{log}"
    );
    assert!(client.terminate(Duration::from_secs(15)).success());
    // A stopped node has nothing to read its files again.
    let stopped = run(
        unaware.command(&["reload"]),
        "peerbus reload of a stopped node",
        budget.left(),
    );
    assert!(
        !stopped.status.success() && stopped.stderr.contains("no node runs in"),
        "{}",
        stopped.stderr
    );
    // It rejoins with its new certificate.
    let accepted = send_to_vault(
        &mesh("client"),
        "hello again",
        "30s",
        "send with a new certificate",
        &budget,
    );
    assert!(accepted.status.success(), "{}", accepted.stderr);
    // The vault's status names the list it uses (`ca new` wrote number 1, each `ca revoke`
    // one more), flags it as past its next update, and counts the revoked client's refused
    // dials.
    let status = run(
        mesh("vault").command(&["status"]),
        "peerbus status of the vault",
        budget.left(),
    );
    assert!(
        status
            .stdout
            .contains("mesh CA revocation lists: 1 certificate revoked")
            // Its certificate binds it to its service.
            && status.stdout.contains(", for service vault")
            && status.stdout.contains("  list 4 of CN=peerbus mesh CA")
            && status.stdout.contains(", next update ")
            && status.stdout.contains("PAST ITS NEXT UPDATE")
            && status.stdout.contains(": 1 revoked")
            // It refused the revoked client's dials, and counts them apart, not as faults of
            // a mismatched peer.
            && status
                .stdout
                .contains("  connections refused for a revoked certificate: ")
            && !status.stdout.contains("mesh_proof_failed"),
        "{}",
        status.stdout
    );
    // Its log warns of the late list once it looks at its files again (here at once).
    let reload = run(
        mesh("vault").command(&["reload"]),
        "peerbus reload of the vault",
        budget.left(),
    );
    assert!(reload.status.success(), "{}", reload.stderr);
    let warned = "revocation list in use is past its next update";
    let deadline = Instant::now() + Duration::from_secs(5).min(budget.left());
    while !vault.guard.stderr().contains(warned) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let log = vault.guard.stderr();
    assert_eq!(log.matches(warned).count(), 1, "{log}");

    // `ca list` shows what the CA issued, in order, and what became of it.
    let listed = run(
        base_command(&["ca", "list", "--ca", &path("ca"), "--json"]),
        "ca list",
        budget.left(),
    );
    assert!(listed.status.success(), "{}", listed.stderr);
    let rows: Vec<(String, String, serde_json::Value)> = listed
        .stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            (
                v["node_id"].as_str().expect("node").into(),
                v["state"].as_str().expect("state").into(),
                v["services"].clone(),
            )
        })
        .collect();
    // The vault's certificate is bound to its service; the client's may run any.
    let expected = [
        (&ids[0], "valid", serde_json::json!(["vault"])),
        (&ids[1], "revoked", serde_json::json!([])),
        (&ids[1], "valid", serde_json::json!([])),
    ];
    let expected: Vec<(String, String, serde_json::Value)> = expected
        .into_iter()
        .map(|(id, st, services)| (id.to_string(), st.to_string(), services))
        .collect();
    assert_eq!(rows, expected, "{}", listed.stdout);
    let table = run(
        base_command(&["ca", "list", "--ca", &path("ca")]),
        "ca list as a table",
        budget.left(),
    );
    assert!(
        table
            .stdout
            .lines()
            .next()
            .is_some_and(|h| h.ends_with("STATE     SERVICES"))
            && table.stdout.contains("valid     vault")
            && table.stdout.contains("revoked   any"),
        "{}",
        table.stdout
    );
}

/// `peerbus ca request` writes a certificate request for the node in --data-dir that a CA of
/// another PKI signs (here an ECDSA P-256 CA, as `openssl x509 -req` would sign it); nodes
/// started with the certificates it returned talk.
#[test]
fn nodes_certified_by_another_pki_from_their_requests_talk() {
    let budget = Budget::new(90);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| dir.path().join(name).display().to_string();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ca key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = params.self_signed(&key).expect("ca cert");
    std::fs::write(path("corp-ca.crt"), ca_cert.pem()).expect("write");
    let corp = rcgen::Issuer::new(params, key);
    for node in ["vault", "client"] {
        let csr = path(&format!("{node}.csr"));
        let out = run(
            base_command(&["ca", "request", "--data-dir", &path(node), "--out", &csr]),
            "ca request",
            budget.left(),
        );
        assert!(out.status.success(), "ca request failed: {}", out.stderr);
        let id = peerbus::Identity::load_or_create(&dir.path().join(node))
            .expect("the identity ca request created")
            .node_id();
        assert!(out.stdout.contains(&id.to_string()), "{}", out.stdout);
        let request = std::fs::read_to_string(&csr).expect("the request");
        let request = rcgen::CertificateSigningRequestParams::from_pem(&request)
            .expect("the request parses and its signature holds");
        let cert = request.signed_by(&corp).expect("sign").pem();
        std::fs::write(path(&format!("{node}.crt")), &cert).expect("write");
        let issued = peerbus::NodeCert::from_pem("issued", cert.as_bytes()).expect("node cert");
        assert_eq!(issued.node_id(), id, "the request is for another key");
    }
    let no_dir = run(
        base_command(&["ca", "request", "--out", &path("x.csr")]),
        "ca request without --data-dir",
        budget.left(),
    );
    assert_eq!(no_dir.status.code(), Some(2), "{}", no_dir.stderr);
    assert!(
        no_dir.stderr.contains("--data-dir is required"),
        "{}",
        no_dir.stderr
    );
    let mesh = |node: &str| Mesh::certified("pki", &path("corp-ca.crt"), &path(node));
    let _vault = spawn(
        mesh("vault").command(&["node", "--service", "vault"]),
        "vault node",
    );
    let accepted = send_to_vault(&mesh("client"), "hello", "30s", "send by a member", &budget);
    assert!(
        accepted.status.success(),
        "a member's send failed: {}",
        accepted.stderr
    );
}

/// A node that cannot start says why, and says each cause once: the library's errors carry
/// their causes in their messages, not also as `source`s that the CLI would print again.
#[test]
fn a_failed_start_names_each_cause_once() {
    let budget = Budget::new(30);
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.key");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    std::fs::write(data.join("node.key"), "not a key").expect("corrupt node key");
    let cases = [
        (
            vec!["--mesh-key-file".to_string(), missing.display().to_string()],
            "No such file or directory",
        ),
        (
            vec![
                "--insecure-open-mesh".to_string(),
                "--data-dir".to_string(),
                data.display().to_string(),
            ],
            "is not a peerbus node key",
        ),
    ];
    for (args, cause) in cases {
        let mut all = vec!["send", "svc", "x", "--interface", "loopback"];
        all.extend(["--listen", "127.0.0.1:0", "--timeout", "1s"]);
        all.extend(args.iter().map(String::as_str));
        let out = run(base_command(&all), "send that cannot start", budget.left());
        assert_eq!(out.status.code(), Some(1), "stderr: {}", out.stderr);
        let line = out
            .stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line: {}", out.stderr));
        assert_eq!(line.matches(cause).count(), 1, "{line}");
    }
}

#[test]
fn bad_template_and_bad_options_are_usage_errors() {
    let budget = Budget::new(30);
    // Each refused with exit code 2 and a message that names what is wrong. PAYLOAD `-`
    // reads stdin (empty here) and does not take --count.
    for (args, says) in [
        (&["send", "svc", "n={i%0}", "--count", "2"][..], "{i%0}"),
        (
            &["send", "svc", "-", "--count", "2"][..],
            "--count does not go with",
        ),
        (&["pub", "t", "-"][..], "stdin held no line to send"),
        (
            &["req", "svc", "x", "-H", "tenant"][..],
            "`tenant` is not NAME=VALUE",
        ),
    ] {
        let mut cmd = base_command(args);
        cmd.arg("--insecure-open-mesh");
        let done = run(cmd, &args.join(" "), budget.left());
        assert_eq!(done.status.code(), Some(2), "{args:?}: {}", done.stderr);
        assert!(done.stderr.contains(says), "{args:?}: {}", done.stderr);
    }

    let both = run(
        base_command(&[
            "send",
            "svc",
            "x",
            "--insecure-open-mesh",
            "--mesh-key-file",
            "k",
        ]),
        "send with two memberships",
        budget.left(),
    );
    assert_eq!(both.status.code(), Some(2), "stderr: {}", both.stderr);

    for batch in ["0", "1025"] {
        let bad_batch = run(
            base_command(&[
                "send",
                "svc",
                "x",
                "--count",
                "2",
                "--batch",
                batch,
                "--insecure-open-mesh",
            ]),
            "send with a batch out of range",
            budget.left(),
        );
        assert_eq!(
            bad_batch.status.code(),
            Some(2),
            "--batch {batch}: {}",
            bad_batch.stderr
        );
        assert!(
            bad_batch.stderr.contains("--batch"),
            "stderr: {}",
            bad_batch.stderr
        );
    }
}

impl Running {
    /// Kills the process with SIGKILL (no shutdown of any kind) and reaps it. What it wrote
    /// before dying can still be read from [`Running::lines`].
    fn kill9(&mut self) {
        signal(&self.guard.child, "-KILL");
        let _ = self.guard.wait(Duration::from_secs(10));
    }

    /// Every stdout line left once the process has exited: its pipe ends, so this reads to
    /// the end, unlike a quiet gap, which a slow reader thread can pass for the end.
    fn lines_to_end(&self, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(RecvTimeoutError::Disconnected) => return out,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "`{}`'s stdout did not end within {limit:?}",
                        self.guard.what
                    )
                }
            }
        }
    }

    /// Every stdout line that arrives within `limit` after the last one (stops at a quiet gap).
    fn lines_until_quiet(&self, quiet: Duration, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while Instant::now() < deadline {
            match self.lines.recv_timeout(quiet) {
                Ok(l) => out.push(l),
                Err(_) => break,
            }
        }
        out
    }
}

/// Payload index of a `--print` line of the form `m<i>`.
fn index_of(v: &Value) -> u64 {
    v["payload"]
        .as_str()
        .and_then(|p| p.strip_prefix('m'))
        .and_then(|n| n.parse().ok())
        .expect("payload m<i>")
}

#[test]
fn receiver_killed_mid_stream_loses_nothing_and_keeps_key_order() {
    const N: u64 = 10_000;
    let budget = Budget::new(180);
    let mesh = Mesh::open("kill-receiver");
    let dirs = tempfile::tempdir().expect("tempdir");
    let recv_dir = dirs.path().join("orders");
    let send_dir = dirs.path().join("payments");
    let start_receiver = || {
        spawn(
            mesh.command(&[
                "node",
                "--service",
                "orders",
                "--print",
                "--data-dir",
                recv_dir.to_str().expect("utf8"),
            ]),
            "peerbus node orders",
        )
    };
    let mut first = start_receiver();
    let sender = spawn(
        mesh.command(&[
            "send",
            "orders",
            "m{i}",
            "--key",
            "k{i%50}",
            "--count",
            "10000",
            "--timeout",
            "120s",
            "--data-dir",
            send_dir.to_str().expect("utf8"),
        ]),
        "peerbus send --count 10000",
    );
    // Let part of the stream through, then kill the receiver without warning.
    let mut before = first.take_lines(2_000, budget.left().min(Duration::from_secs(60)));
    first.kill9();
    // Whatever it printed up to the kill is still in the pipe.
    before.extend(first.lines_to_end(Duration::from_secs(10)));
    let second = start_receiver();
    let mut sender = sender;
    let status = sender.guard.wait(budget.left());
    assert!(status.success(), "send failed: {}", sender.guard.stderr());
    let after = second.lines_until_quiet(Duration::from_secs(2), budget.left());
    let status = second.terminate(Duration::from_secs(20));
    assert!(status.success());

    let first_run: Vec<Value> = before.drain(..).map(|l| parse_line(&l)).collect();
    let second_run: Vec<Value> = after.iter().map(|l| parse_line(l)).collect();
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    for v in first_run.iter().chain(&second_run) {
        *seen.entry(index_of(v)).or_default() += 1;
    }
    let missing: Vec<u64> = (0..N).filter(|i| !seen.contains_key(i)).collect();
    assert!(
        missing.is_empty(),
        "lost {} messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // Within each run (each process lifetime) every key is in order and nothing repeats: the
    // dedup window holds across the restart. Repeats across the kill are the documented crash
    // case (handled, not yet recorded), bounded by what can be in flight (the prefetch window).
    for (name, run) in [("first", &first_run), ("second", &second_run)] {
        let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for v in run.iter() {
            per_key
                .entry(v["key"].as_str().expect("key").to_string())
                .or_default()
                .push(index_of(v));
        }
        for (k, order) in per_key {
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "{name} run: key {k} out of order"
            );
        }
    }
    let duplicates: u32 = seen.values().map(|n| n - 1).sum();
    let first_ids: BTreeSet<u64> = first_run.iter().map(index_of).collect();
    for v in &second_run {
        let i = index_of(v);
        if seen[&i] > 1 {
            assert!(
                first_ids.contains(&i),
                "message {i} repeated within one run"
            );
        }
    }
    assert!(
        duplicates <= 256,
        "{duplicates} repeats exceed the in-flight window"
    );
    eprintln!(
        "receiver kill: {} + {} lines, {duplicates} repeats (crash case)",
        first_run.len(),
        second_run.len()
    );
}

#[test]
fn sender_killed_after_send_returned_delivers_everything_after_restart() {
    let budget = Budget::new(120);
    let mesh = Mesh::open("kill-sender");
    let dirs = tempfile::tempdir().expect("tempdir");
    let send_dir = dirs.path().join("payments");
    let sd = send_dir.to_str().expect("utf8");
    // No receiver yet: `send --no-wait` returns once all 500 are durably stored; kill it the
    // moment it says so, before any graceful shutdown can help. `--batch 64` stores them in
    // batches (the last one of 52), each in one commit.
    let mut sender = spawn(
        mesh.command(&[
            "send",
            "orders",
            "m{i}",
            "--key",
            "k{i%7}",
            "--count",
            "500",
            "--batch",
            "64",
            "--no-wait",
            "--data-dir",
            sd,
        ]),
        "peerbus send --no-wait",
    );
    let line = sender.take_lines(1, budget.left().min(Duration::from_secs(30)));
    assert!(line[0].starts_with("stored 500 messages"), "{}", line[0]);
    sender.kill9();

    let status = run(
        mesh.command(&["status", "--json", "--data-dir", sd]),
        "peerbus status",
        budget.left(),
    );
    let v: Value = serde_json::from_str(&status.stdout).expect("status json");
    assert_eq!(v["running"], false);
    assert_eq!(v["logs"]["svc:orders"]["waiting"], 500, "{}", status.stdout);
    // Its log, entry by entry: the oldest first.
    let entries = run(
        mesh.command(&["entries", "--limit", "3", "--data-dir", sd]),
        "peerbus entries",
        budget.left(),
    );
    let rows: Vec<&str> = entries.stdout.lines().collect();
    assert_eq!(rows.len(), 5, "{}", entries.stdout);
    for (row, i) in rows[1..4].iter().zip(0..) {
        assert!(row.starts_with("svc:orders"), "{row}");
        assert!(row.contains(&format!("k{i} ")), "{row}");
        assert!(
            row.contains("stored") && row.ends_with(&format!("m{i}")),
            "{row}"
        );
    }
    assert_eq!(rows[4], "3 entries");

    let receiver = spawn(
        mesh.command(&["node", "--service", "orders", "--print"]),
        "peerbus node orders",
    );
    let restarted = spawn(
        mesh.command(&["node", "--service", "payments", "--data-dir", sd]),
        "restarted sender",
    );
    let lines = receiver.take_lines(500, budget.left().min(Duration::from_secs(60)));
    let order: Vec<u64> = lines.iter().map(|l| index_of(&parse_line(l))).collect();
    let got: BTreeSet<u64> = order.iter().copied().collect();
    assert_eq!(got, (0..500).collect(), "all 500 delivered exactly once");
    for key in 0..7 {
        let of_key: Vec<u64> = order.iter().copied().filter(|i| i % 7 == key).collect();
        assert!(
            of_key.windows(2).all(|w| w[0] < w[1]),
            "key k{key} out of order: {of_key:?}"
        );
    }
    assert!(restarted.terminate(Duration::from_secs(20)).success());
    assert!(receiver.terminate(Duration::from_secs(20)).success());
}

#[test]
fn an_operator_moves_what_waits_for_a_gone_service_to_the_dead_letters() {
    let budget = Budget::new(90);
    let mesh = Mesh::open("dlq-move");
    let dirs = tempfile::tempdir().expect("tempdir");
    let dir = dirs.path().join("payments");
    let d = dir.to_str().expect("utf8");
    let store = |what: &str, count: &str| {
        let stored = run(
            mesh.command(&[
                "send",
                "orders",
                what,
                "--count",
                count,
                "--no-wait",
                "--data-dir",
                d,
            ]),
            "peerbus send --no-wait",
            budget.left(),
        );
        assert!(stored.status.success(), "{}", stored.stderr);
    };
    let dlq = |args: &[&str], what: &str| {
        let mut all = vec!["dlq"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--data-dir", d]);
        run(mesh.command(&all), what, budget.left())
    };
    let moved = "moved 2 waiting message(s) of svc:orders to the dead letters";

    // A stopped node's log is moved in its directory.
    store("o{i}", "2");
    let offline = dlq(
        &["move", "--log", "svc:orders"],
        "peerbus dlq move (stopped)",
    );
    assert!(offline.status.success(), "{}", offline.stderr);
    assert_eq!(offline.stdout, moved);
    let entries = run(
        mesh.command(&["entries", "--json", "--data-dir", d]),
        "peerbus entries (stopped)",
        budget.left(),
    );
    assert_eq!(entries.stdout.trim(), "[]", "the log is empty");
    let none = dlq(
        &["move", "--log", "svc:orders"],
        "peerbus dlq move (stopped, empty)",
    );
    assert_eq!(none.status.code(), Some(1));
    assert!(
        none.stderr.contains("no log named `svc:orders`"),
        "{}",
        none.stderr
    );

    // A running node moves what waits in its log.
    store("p{i}", "2");
    let node = spawn(
        mesh.command(&["node", "--service", "payments", "--data-dir", d]),
        "peerbus node payments",
    );
    loop {
        let status = run(
            mesh.command(&["status", "--json", "--data-dir", d]),
            "peerbus status",
            budget.left(),
        );
        let running =
            serde_json::from_str::<Value>(&status.stdout).is_ok_and(|v| v["running"] == true);
        if running || budget.left() < Duration::from_secs(30) {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let online = dlq(
        &["move", "--log", "svc:orders"],
        "peerbus dlq move (running)",
    );
    assert!(online.status.success(), "{}", online.stderr);
    assert_eq!(online.stdout, moved);
    let list = dlq(&["list", "--json"], "peerbus dlq list");
    let dead: Value = serde_json::from_str(&list.stdout).expect("dlq json");
    let dead = dead.as_array().expect("a list");
    assert_eq!(dead.len(), 4, "{}", list.stdout);
    assert!(
        dead.iter()
            .all(|d| d["reason"].as_str().is_some_and(|r| r.contains("operator")))
    );
    let none = dlq(&["move", "--log", "svc:orders"], "peerbus dlq move again");
    assert_eq!(none.status.code(), Some(1));
    assert!(
        none.stderr.contains("no log named `svc:orders`"),
        "{}",
        none.stderr
    );
    assert!(node.terminate(Duration::from_secs(20)).success());
}

#[test]
fn one_of_two_instances_killed_the_other_takes_its_unacknowledged_work() {
    const N: u64 = 3_000;
    let budget = Budget::new(150);
    let mesh = Mesh::open("kill-instance");
    let dirs = tempfile::tempdir().expect("tempdir");
    let instance = |name: &str| {
        let dir = dirs.path().join(name);
        spawn(
            mesh.command(&[
                "node",
                "--service",
                "orders",
                "--print",
                "--data-dir",
                dir.to_str().expect("utf8"),
            ]),
            name,
        )
    };
    let mut a = instance("a");
    let b = instance("b");
    // `send` starts on the first consumer it finds: both must be there to share the keys.
    wait_for_services(&mesh, &[("orders", 2)], &budget);
    let mut sender = spawn(
        mesh.command(&[
            "send",
            "orders",
            "m{i}",
            "--key",
            "k{i%40}",
            "--count",
            "3000",
            "--timeout",
            "120s",
        ]),
        "peerbus send --count 3000",
    );
    // Both instances must be part of the work before one dies: wait for a's share to start.
    let mut a_lines = a.take_lines(300, budget.left().min(Duration::from_secs(60)));
    a.kill9();
    a_lines.extend(a.lines_to_end(Duration::from_secs(10)));
    let status = sender.guard.wait(budget.left());
    assert!(
        status.success(),
        "send failed after losing an instance: {}",
        sender.guard.stderr()
    );
    let b_lines = b.lines_until_quiet(Duration::from_secs(2), budget.left());
    assert!(b.terminate(Duration::from_secs(20)).success());

    let a_ids: Vec<u64> = a_lines.iter().map(|l| index_of(&parse_line(l))).collect();
    let b_ids: Vec<u64> = b_lines.iter().map(|l| index_of(&parse_line(l))).collect();
    let all: BTreeSet<u64> = a_ids.iter().chain(&b_ids).copied().collect();
    let missing: Vec<u64> = (0..N).filter(|i| !all.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "lost {} messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(!b_ids.is_empty() && !a_ids.is_empty(), "work was shared");
    // Each instance saw each of its keys in order; a message handled by both is one the killed
    // instance handled but never acknowledged (the crash case).
    for (name, ids) in [("a", &a_ids), ("b", &b_ids)] {
        let mut per_key: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for i in ids.iter() {
            per_key.entry(i % 40).or_default().push(*i);
        }
        for (k, order) in per_key {
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "instance {name}: key k{k} out of order"
            );
        }
    }
    let a_set: BTreeSet<u64> = a_ids.iter().copied().collect();
    let both = b_ids.iter().filter(|i| a_set.contains(i)).count();
    assert!(both <= 256, "{both} messages handled by both instances");
    eprintln!(
        "instance kill: a {} + b {} lines, {both} handled by both",
        a_ids.len(),
        b_ids.len()
    );
}

#[test]
fn scatter_asks_every_instance_and_idempotent_req_and_topic_at_group_work() {
    let budget = Budget::new(90);
    let mesh = Mesh::open("scatter");
    let a = spawn(
        mesh.command(&[
            "node",
            "--service",
            "inventory",
            "--echo",
            "--subscribe",
            "stock.*@audit",
            "--print",
        ]),
        "node a",
    );
    let _b = spawn(
        mesh.command(&["node", "--service", "inventory", "--echo"]),
        "node b",
    );
    // Both instances up and announced before `scatter` starts: its discovery window then
    // finds them together (a precondition, not a claim about `scatter`).
    wait_for_services(&mesh, &[("inventory", 2)], &budget);
    let scatter = run(
        mesh.command(&[
            "scatter",
            "inventory",
            "count",
            "--within",
            "2s",
            "--wait",
            "5s",
        ]),
        "peerbus scatter",
        budget.left(),
    );
    assert!(
        scatter.status.success(),
        "scatter failed: {}",
        scatter.stderr
    );
    let answers: Vec<&str> = scatter
        .stdout
        .lines()
        .filter(|l| l.ends_with(": count"))
        .collect();
    assert_eq!(
        answers.len(),
        2,
        "both instances answered:\n{}",
        scatter.stdout
    );
    let req = run(
        mesh.command(&[
            "req",
            "inventory",
            "hello",
            "--idempotent",
            "--attempts",
            "3",
        ]),
        "req",
        budget.left(),
    );
    assert!(req.status.success(), "{}", req.stderr);
    assert_eq!(req.stdout.trim(), "hello");
    let publish = run(
        mesh.command(&["pub", "stock.eur", "1.07"]),
        "pub",
        budget.left(),
    );
    assert!(publish.status.success(), "{}", publish.stderr);
    let line = a.take_lines(1, budget.left().min(Duration::from_secs(20)));
    let v = parse_line(&line[0]);
    assert_eq!(v["topic"], "stock.eur");
    assert!(
        v["id"]
            .as_str()
            .is_some_and(|id| id.contains("/grp:audit/")),
        "joined group audit: {}",
        line[0]
    );
    let none = run(
        mesh.command(&[
            "scatter", "nobody", "x", "--within", "300ms", "--wait", "1s",
        ]),
        "scatter nobody",
        budget.left(),
    );
    assert!(!none.status.success());
}

/// Runs `peerbus bench --quick --only <only> --json FILE` (within `limit`), checks that it
/// succeeded, and returns it with the JSON document it wrote.
fn bench_json(only: &str, limit: Duration) -> (Finished, Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let mut cmd = Command::new(peerbus_bin());
    cmd.args(["bench", "--quick", "--only", only, "--json"])
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let done = run(cmd, "bench", limit);
    assert!(done.status.success(), "{}", done.stderr);
    let doc =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json file")).expect("json");
    (done, doc)
}

/// The cases of a bench JSON document, and their names in order.
fn cases_and_names(doc: &Value) -> (&Vec<Value>, Vec<&str>) {
    let cases = doc["cases"].as_array().expect("cases");
    let names = cases.iter().filter_map(|c| c["name"].as_str()).collect();
    (cases, names)
}

/// `peerbus bench` writes its cases as JSON: names, figures, baselines, targets.
#[test]
fn bench_writes_json_cases() {
    let (done, doc) = bench_json("memory,discovery,idle", Duration::from_secs(120));
    assert!(
        done.stdout.contains("memory/idle-rss"),
        "table: {}",
        done.stdout
    );
    assert!(doc["machine"]["cores"].as_u64().is_some_and(|n| n >= 1));
    let (cases, names) = cases_and_names(&doc);
    assert_eq!(
        names,
        [
            "discovery/first-message",
            "idle/cpu",
            "idle/cpu/requests-in-flight",
            "memory/idle-rss"
        ]
    );
    for c in [&cases[0], &cases[3]] {
        assert!(c["target"].is_string() && c["met"].is_boolean(), "{c}");
    }
    let rss = cases[3]["mib"].as_f64().expect("mib");
    assert!(rss > 1.0 && rss < 1024.0, "idle RSS {rss} MiB");
    let secs = cases[0]["seconds"].as_f64().expect("seconds");
    assert!(secs > 0.0 && secs < 30.0, "discovery {secs} s");
    // Idle CPU: a figure, and with requests held in flight a ratio to the figure without.
    let idle = cases[1]["ms_cpu_per_s"].as_f64().expect("idle cpu");
    let held = &cases[2];
    let with = held["ms_cpu_per_s"].as_f64().expect("cpu with requests");
    assert!((0.0..2000.0).contains(&idle), "idle cpu {idle} ms/s");
    assert!(
        (0.0..2000.0).contains(&with),
        "cpu with requests {with} ms/s"
    );
    assert_eq!(held["requests"].as_f64(), Some(10_000.0), "{held}");
    assert_eq!(held["baseline"], "idle/cpu", "{held}");
    // A machine that accounts CPU time by the tick may see none in an idle second.
    if idle > 0.0 {
        let ratio = held["ratio"].as_f64().expect("ratio");
        assert!(
            (ratio - with / idle).abs() < 0.01 * ratio.max(1.0),
            "ratio {ratio} of {with} to {idle}"
        );
    }
}

/// `peerbus bench --only ack` times lone sends until their ack, in memory and fsync'd; the
/// fsync'd sender syncs once per send (its removals ride along with the next send's sync).
#[test]
fn bench_times_lone_sends_until_acked_with_their_fsyncs() {
    let (_, doc) = bench_json("ack", Duration::from_secs(120));
    let cases = doc["cases"].as_array().expect("cases");
    let case = |name: &str| {
        cases
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no case {name}: {doc}"))
    };
    let memory = case("ack/p50")["p50_us"].as_f64().expect("ack p50");
    let fsync = case("ack/fsync/p50");
    assert_eq!(fsync["baseline"], "ack/p50", "{fsync}");
    let p50 = fsync["p50_us"].as_f64().expect("p50");
    assert!(p50 > 0.0 && memory > 0.0, "{p50} {memory}");
    let ratio = fsync["ratio"].as_f64().expect("ratio");
    assert!((ratio - p50 / memory).abs() < 0.01 * ratio, "{fsync}");
    // One sync per send; a checkpoint during the run may add one or two.
    let per_send = fsync["fsyncs_per_message"].as_f64().expect("fsyncs");
    assert!(
        (0.99..1.1).contains(&per_send),
        "fsyncs per send {per_send}"
    );
    for figure in ["p99", "p99.9"] {
        let c = case(&format!("ack/fsync/{figure}"));
        assert!(
            c["p99_us"]
                .as_f64()
                .or(c["p999_us"].as_f64())
                .is_some_and(|v| v >= p50),
            "{c}"
        );
    }
}

/// `send/memory/1KiB/keys=1`: 1 KiB sends that all share one key, against the sends of many
/// keys that run with it.
#[test]
fn bench_times_sends_of_one_key_against_many() {
    let (_, doc) = bench_json("send/memory/1KiB/keys=1", Duration::from_secs(300));
    let (cases, names) = cases_and_names(&doc);
    assert_eq!(
        names,
        [
            "baseline/stream/1KiB",
            "send/memory/1KiB",
            "send/memory/1KiB/keys=1"
        ]
    );
    let one = &cases[2];
    assert_eq!(one["baseline"], "send/memory/1KiB", "{one}");
    let (rate, many) = (
        one["msgs_per_s"].as_f64().expect("msgs_per_s"),
        cases[1]["msgs_per_s"].as_f64().expect("msgs_per_s"),
    );
    let ratio = one["ratio"].as_f64().expect("ratio");
    assert!(
        rate > 0.0 && (ratio - rate / many).abs() < 0.01 * ratio,
        "{one}"
    );
}

#[test]
fn bench_runs_one_case_by_name_with_what_it_compares_with() {
    let (_, doc) = bench_json("send/fsync/64B", Duration::from_secs(300));
    let (cases, names) = cases_and_names(&doc);
    // The fsync case, the memory send it is a ratio of, and that one's raw baseline; nothing
    // else.
    assert_eq!(
        names,
        ["baseline/stream/64B", "send/memory/64B", "send/fsync/64B"]
    );
    for c in cases {
        let cpu = c["cpu_us_per_msg"].as_f64().expect("cpu_us_per_msg");
        assert!(cpu > 0.0 && cpu < 100_000.0, "{c}");
    }
    // Wire bytes per 64 B message: the raw stream adds its 4-byte length prefix and QUIC's
    // packet overhead; a send adds its envelope and its ack on top of that.
    let wire: Vec<f64> = cases
        .iter()
        .map(|c| {
            c["wire_bytes_per_msg"]
                .as_f64()
                .expect("wire_bytes_per_msg")
        })
        .collect();
    assert!((68.0..100.0).contains(&wire[0]), "raw: {wire:?}");
    assert!(
        wire[1..]
            .iter()
            .all(|w| (wire[0] + 50.0..1_000.0).contains(w)),
        "sends: {wire:?}"
    );
    // Datagrams per 64 B message: the raw stream packs some twenty frames into a packet; a
    // send's envelope and ack fill its packets faster, but many still share one.
    let datagrams: Vec<f64> = cases
        .iter()
        .map(|c| c["datagrams_per_msg"].as_f64().expect("datagrams_per_msg"))
        .collect();
    assert!((0.0..0.2).contains(&datagrams[0]), "raw: {datagrams:?}");
    assert!(
        datagrams[1..]
            .iter()
            .all(|d| (datagrams[0]..1.0).contains(d)),
        "sends: {datagrams:?}"
    );
    assert_eq!(cases[1]["baseline"].as_str(), Some("baseline/stream/64B"));
    assert_eq!(cases[2]["baseline"].as_str(), Some("send/memory/64B"));
    assert!(
        cases[2]["fsyncs_per_message"]
            .as_f64()
            .is_some_and(|f| f > 0.0)
    );
    // A quick run may end before its side log is due a checkpoint: the figures are there and
    // in range.
    let share = cases[2]["checkpoint_share"].as_f64();
    assert!(
        share.is_some_and(|s| (0.0..1.0).contains(&s)),
        "{}",
        cases[2]
    );
    for figure in [
        "checkpointed_entries_per_message",
        "carried_entries_per_message",
    ] {
        let per_message = cases[2][figure].as_f64();
        assert!(
            per_message.is_some_and(|w| w >= 0.0),
            "{figure}: {}",
            cases[2]
        );
    }
    // One run each (`--quick`): the paired ratio is the ratio of the two figures.
    for c in &cases[1..] {
        let (value, baseline) = (c["msgs_per_s"].as_f64(), c["baseline_value"].as_f64());
        let ratio = c["ratio"].as_f64().expect("ratio");
        let expected = value.expect("msgs_per_s") / baseline.expect("baseline_value");
        assert!((ratio - expected).abs() < 0.002, "{c}");
        // And the run's own figure and ratio are kept.
        assert_eq!(c["runs"].as_array().map(Vec::len), Some(1), "{c}");
        assert_eq!(c["runs"][0].as_f64(), value, "{c}");
        assert_eq!(c["run_ratios"][0].as_f64(), Some(ratio), "{c}");
    }
}

/// `status --json` of the node in `dir` (running or stopped): its known durable groups, or
/// the error `status` printed.
fn groups_of(mesh: &Mesh, dir: &str, budget: &Budget) -> Result<Value, String> {
    let status = run(
        mesh.command(&["status", "--json", "--data-dir", dir]),
        "peerbus status",
        budget.left(),
    );
    if !status.status.success() {
        return Err(status.stderr);
    }
    let v: Value = serde_json::from_str(&status.stdout).expect("status json");
    Ok(v["groups"].clone())
}

/// Polls `status` of the node in `dir` (which may not have opened its store yet) until
/// `want(groups)` holds, within 20 s.
fn until_groups(
    mesh: &Mesh,
    dir: &str,
    budget: &Budget,
    what: &str,
    want: impl Fn(&Value) -> bool,
) {
    let deadline = Instant::now() + budget.left().min(Duration::from_secs(20));
    loop {
        let groups = groups_of(mesh, dir, budget);
        if groups.as_ref().is_ok_and(&want) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: groups are {groups:?}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn release_group_makes_every_node_forget_a_group_whose_services_are_gone() {
    let budget = Budget::new(120);
    let mesh = Mesh::open("release-group");
    let dirs = tempfile::tempdir().expect("tempdir");
    let shop_dir = dirs.path().join("shop");
    let sd = shop_dir.to_str().expect("utf8");
    let shop = spawn(
        mesh.command(&["node", "--service", "shop", "--data-dir", sd]),
        "peerbus node shop",
    );
    let billing = spawn(
        mesh.command(&["sub", "orders.*", "--group", "billing"]),
        "peerbus sub --group billing",
    );
    until_groups(&mesh, sd, &budget, "shop learns billing", |g| {
        g["billing"]["patterns"] == serde_json::json!(["orders.*"])
    });

    // A group still subscribed is not taken away.
    let refused = run(
        mesh.command(&["release-group", "billing"]),
        "release-group while subscribed",
        budget.left(),
    );
    assert!(!refused.status.success(), "{}", refused.stdout);
    assert!(
        refused
            .stderr
            .contains("still subscribed by a running node"),
        "{}",
        refused.stderr
    );
    until_groups(&mesh, sd, &budget, "billing stays live", |g| {
        g["billing"]["patterns"] == serde_json::json!(["orders.*"])
    });

    let status = billing.terminate(budget.left().min(Duration::from_secs(20)));
    assert!(status.success(), "sub did not exit cleanly: {status}");
    let released = run(
        mesh.command(&["release-group", "billing"]),
        "release-group",
        budget.left(),
    );
    assert!(
        released.status.success(),
        "release-group failed: {}\n{}",
        released.stdout,
        released.stderr
    );
    assert!(
        released
            .stdout
            .starts_with("released durable group billing (version "),
        "{}",
        released.stdout
    );
    until_groups(&mesh, sd, &budget, "shop forgets billing", |g| {
        g["billing"]["patterns"] == serde_json::json!([])
    });

    let again = run(
        mesh.command(&["release-group", "billing"]),
        "release-group again",
        budget.left(),
    );
    assert!(again.status.success(), "{}", again.stderr);
    assert!(
        again
            .stdout
            .starts_with("durable group billing is already released"),
        "{}",
        again.stdout
    );
    let unknown = run(
        mesh.command(&["release-group", "nobody", "--timeout", "1s"]),
        "release-group of an unknown group",
        budget.left(),
    );
    assert!(!unknown.status.success());
    assert!(
        unknown.stderr.contains("knows durable group `nobody`"),
        "{}",
        unknown.stderr
    );

    // The stopped node still knows the group was released.
    let status = shop.terminate(budget.left().min(Duration::from_secs(20)));
    assert!(status.success(), "node did not exit cleanly: {status}");
    let groups = groups_of(&mesh, sd, &budget).expect("status of the stopped node");
    assert_eq!(
        groups["billing"]["patterns"],
        serde_json::json!([]),
        "{groups}"
    );
    assert!(groups["billing"]["version"].as_u64() >= Some(2), "{groups}");
}
