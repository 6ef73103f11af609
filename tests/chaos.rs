//! `peerbus chaos`, run as a real process: a short chaos run must pass, and the checker must
//! fail a mesh whose handlers misbehave.
//!
//! The binary is found by `common::peerbus_bin` (`cargo build -p peerbus-cli --bin peerbus` into
//! this test's target directory and profile, or `PEERBUS_BIN`). Network safety: chaos nodes
//! bind 127.0.0.1 with mDNS off and static seeds; nothing multicasts. Each run has an overall
//! deadline after which it is killed (its workers notice their parent is gone and stop).
//! The runs take turns (a lock), so two meshes never compete for the CPU at once.

use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::peerbus_bin;

/// Runs `peerbus chaos ARGS --dir <tmp>/run --report <tmp>/report.json`, killed after
/// `limit`. Returns its output and the parsed report (when written).
fn chaos(args: &[&str], limit: Duration) -> (Output, Option<Value>, tempfile::TempDir) {
    static TURN: Mutex<()> = Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().expect("temp dir");
    let report = tmp.path().join("report.json");
    let mut child = Command::new(peerbus_bin())
        .arg("chaos")
        .args(args)
        .arg("--dir")
        .arg(tmp.path().join("run"))
        .arg("--report")
        .arg(&report)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start peerbus chaos");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("poll peerbus chaos").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "peerbus chaos still running after {limit:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("collect output");
    let json = std::fs::read_to_string(&report)
        .ok()
        .map(|t| serde_json::from_str(&t).expect("the report is JSON"));
    (out, json, tmp)
}

fn describe(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_short_chaos_run_with_kills_freezes_and_partitions_passes() {
    // Seed 2 schedules (4 s apart): partition, kill, kill, freeze. Nodes 1, 2 and 3 speak at
    // most protocol 4, 5 and 6 (a mesh halfway through its upgrades), so every version
    // carries messages through the faults; `scripts/chaos` runs the mesh of one version. Handlers fail and run slow on
    // purpose, and a 400 ms ack timeout makes each freeze time out what is in flight.
    let (out, report, tmp) = chaos(
        &[
            "--mixed-protocols",
            "--nodes=4",
            "--services=2",
            "--duration=18s",
            "--rate=60",
            "--keys=8",
            "--seed=2",
            "--faults=kill,freeze,partition",
            "--fault-interval=4s",
            "--handler-failures=20",
            "--slow-handlers=100",
            "--slow-handler-time=30ms",
            "--ack-timeout=400ms",
        ],
        Duration::from_secs(240),
    );
    let why = describe(&out);
    assert!(out.status.success(), "{why}");
    let r = report.unwrap_or_else(|| panic!("no report written\n{why}"));
    for field in [
        "accepted",
        "delivered",
        "lost",
        "undrained",
        "duplicates",
        "order_violations",
        "protocol_faults",
        "faults",
        "drain_seconds",
    ] {
        assert!(r.get(field).is_some(), "report lacks `{field}`: {r}");
    }
    let accepted = r["accepted"].as_u64().expect("accepted");
    assert!(accepted > 300, "only {accepted} messages accepted\n{why}");
    assert_eq!(r["lost"], 0, "{why}");
    assert_eq!(r["undrained"], 0, "{why}");
    assert_eq!(r["order_violations"], 0, "{why}");
    // No node closed a connection for a protocol fault (an ack of something never sent to
    // that peer, a frame that did not decode), across both protocol versions.
    assert_eq!(r["protocol_faults"], 0, "{}\n{why}", r["closes"]);
    assert!(r["closes"].is_object(), "{r}");
    assert_eq!(r["delivered"].as_u64(), Some(accepted), "{why}");
    let faults = r["faults"].as_array().expect("faults list");
    let kinds: Vec<&str> = faults.iter().filter_map(|f| f["kind"].as_str()).collect();
    for k in ["kill", "freeze", "partition"] {
        assert!(kinds.contains(&k), "no {k} among {kinds:?}");
    }
    for f in faults {
        let (start, end) = (
            f["start"].as_f64().expect("start"),
            f["end"].as_f64().expect("end"),
        );
        assert!(0.0 < start && start < end, "fault times {f}");
        assert!(
            f["target"].as_str().is_some_and(|t| t.starts_with("node-")),
            "{f}"
        );
    }
    let drains = r["drain_seconds"].as_array().expect("drain_seconds");
    assert_eq!(drains.len(), faults.len());
    assert!(
        drains.iter().all(Value::is_f64),
        "every fault drained: {drains:?}"
    );
    // The same, summed up by kind: each fault counted once, under its kind.
    let by_kind = r["drain_by_kind"].as_object().expect("drain_by_kind");
    let counted: u64 = by_kind.values().filter_map(|d| d["faults"].as_u64()).sum();
    assert_eq!(counted, faults.len() as u64, "{by_kind:?}");
    for (kind, d) in by_kind {
        assert!(kinds.contains(&kind.as_str()), "{kind} {kinds:?}");
        assert_eq!(d["drained"], d["faults"], "{kind}: {d}");
        let (mean, max) = (d["mean_seconds"].as_f64(), d["max_seconds"].as_f64());
        assert!(
            mean.zip(max).is_some_and(|(m, x)| 0.0 <= m && m <= x),
            "{kind}: {d}"
        );
    }
    let html = std::fs::read_to_string(tmp.path().join("report.html")).expect("HTML report");
    assert!(
        html.contains("<svg") && html.contains("PASS"),
        "HTML report: {html:.200}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("backlog"), "no progress lines\n{why}");
    assert!(stdout.contains("mixed protocols"), "{why}");
    assert_eq!(r["settings"]["mixed_protocols"], true, "{r}");
    // The handler faults and the ack timeout reached the run (and its report).
    assert_eq!(r["settings"]["handler_failures"], 20, "{r}");
    assert_eq!(r["settings"]["slow_handlers"], 100, "{r}");
    assert_eq!(r["settings"]["ack_timeout_s"], 0.4, "{r}");
    assert!(stdout.contains("ack timeout 400ms"), "{why}");
    // Failed handlers and timed-out freezes made the senders send again: the recovery paths
    // ran, as the nodes' own counters say.
    let redelivered = r["redelivered"].as_u64().expect("redelivered");
    assert!(redelivered > 0, "nothing was redelivered\n{why}");
    assert!(r["duplicates_dropped"].is_u64(), "{r}");
}

/// `--mesh-ca`: nodes are members by certificates of a CA the run makes; halfway through the
/// run revokes the certificate of a running node (the last), and three quarters through it
/// renews every node's certificate, which readmits the revoked node. Only node-0 reads the
/// list file; the run passes only if every node holds the list at the end, so it got there
/// from node to node, kills and partitions meanwhile; if nothing the revoked node sent while
/// every other node held the list reached another node before the renewal; and if every
/// node presents its renewed certificate.
#[test]
fn a_chaos_run_of_a_mesh_ca_cuts_off_a_revoked_node_and_readmits_it_with_a_new_certificate() {
    // Seed 2 schedules (2 s apart): a kill of node-3 before the revocation at 6 s, then
    // partitions of node-3 from node-2 and from node-0 while it is revoked (its sends are
    // kept in its log meanwhile), and a kill of node-0 (the one that reads the list file)
    // after the renewal at 9 s.
    let (out, report, tmp) = chaos(
        &[
            "--mesh-ca",
            "--nodes=4",
            "--services=2",
            "--duration=12s",
            "--rate=60",
            "--keys=4",
            "--seed=2",
            "--faults=kill,partition",
            "--fault-interval=2s",
        ],
        Duration::from_secs(180),
    );
    let why = describe(&out);
    assert!(out.status.success(), "{why}");
    let r = report.unwrap_or_else(|| panic!("no report written\n{why}"));
    assert_eq!(r["settings"]["mesh_ca"], true, "{r}");
    assert_eq!(
        (&r["lost"], &r["protocol_faults"]),
        (&0.into(), &0.into()),
        "{why}"
    );
    assert!(r["accepted"].as_u64().is_some_and(|n| n > 300), "{why}");
    let ca = &r["mesh_ca"];
    assert_eq!(ca["revoked_node"], 3, "{ca}");
    assert_eq!(ca["nodes_expected"], 4, "{ca}");
    assert_eq!(ca["nodes_holding"], 4, "{ca}");
    let at = ca["revoked_at_s"].as_f64().expect("revoked_at_s");
    assert!((6.0..8.0).contains(&at), "revoked at {at} s\n{why}");
    let renewed = ca["renewed_at_s"].as_f64().expect("renewed_at_s");
    assert!(
        (9.0..11.0).contains(&renewed),
        "renewed at {renewed} s\n{why}"
    );
    // Cut off before the renewal, sending all the while, and nothing of it got through.
    let reached = ca["reached_all_after_s"]
        .as_f64()
        .expect("list reached the others");
    assert!(at + reached < renewed, "{ca}");
    assert!(
        ca["sent_while_cut_off"].as_u64().is_some_and(|n| n > 0),
        "{ca}"
    );
    assert_eq!(ca["handled_while_cut_off"], 0, "{ca}");
    // Its peers refused it meanwhile, and those refusals are not protocol faults.
    assert!(
        r["closes"]["revoked_certificate"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{}",
        r["closes"]
    );
    // It said it was revoked while it was, and no node says so once renewed.
    let knew = ca["knew_after_s"]
        .as_f64()
        .expect("the revoked node said so");
    assert!(at + knew < renewed, "{ca}");
    assert_eq!(ca["nodes_still_revoked"], 0, "{ca}");
    assert!(ca["readmitted_after_s"].is_f64(), "{ca}");
    assert_eq!(
        (&ca["nodes_renewed"], &ca["nodes"]),
        (&4.into(), &4.into()),
        "{ca}"
    );
    // The nodes were members by certificate: each has the one the run issued it, and
    // node-1 (which never read the list file) kept the list it was passed.
    let run = tmp.path().join("run");
    assert!(run.join("ca/ca.crl").exists() && run.join("node-1/node.crt").exists());
    assert!(run.join("node-1/mesh-revocations.crl").exists(), "{why}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("node-3 is cut off"),
        "{why}"
    );
    let html = std::fs::read_to_string(tmp.path().join("report.html")).expect("HTML report");
    assert!(
        html.contains("<h2>Mesh CA</h2><p>revocation list held by 4 of 4 nodes")
            && html.contains("got through while cut off: 0 of the")
            && html.find(">renewed</text>") < html.find("</svg>")
            && html.contains(">renewed</text>"),
        "HTML report: {html:.300}"
    );
}

/// `--rotate-key`: the mesh key is rotated in place under kills, freezes and partitions, by
/// rewriting the key file every node reads and asking each node to read it again, in three
/// steps each taken by every node before the next; the last step closes the connections
/// whose peer proved the old key, under load. The run passes only if no node was ever
/// refused for its key (a protocol fault), every node took every step, each ends on the new
/// key alone, and node-0, restarted on it at the end, is admitted by every other.
#[test]
fn a_chaos_run_rotates_the_mesh_key_in_place_under_faults() {
    // Seed 3 schedules (3 s apart): kills of node-1 and node-3 around step 1 (4 s) and step
    // 2 (8 s), a freeze of node-2 before step 3 (12 s) and a kill of node-3 as step 3 is
    // written, so step 3 waits for node-3 to start again.
    let (out, report, tmp) = chaos(
        &[
            "--rotate-key",
            "--nodes=4",
            "--services=2",
            "--duration=16s",
            "--rate=100",
            "--keys=4",
            "--seed=3",
            "--faults=kill,freeze,partition",
            "--fault-interval=3s",
            "--ack-timeout=400ms",
        ],
        Duration::from_secs(180),
    );
    let why = describe(&out);
    assert!(out.status.success(), "{why}");
    let r = report.unwrap_or_else(|| panic!("no report written\n{why}"));
    assert_eq!(r["settings"]["rotate_key"], true, "{r}");
    assert_eq!(
        (&r["lost"], &r["protocol_faults"]),
        (&0.into(), &0.into()),
        "{why}"
    );
    assert!(r["accepted"].as_u64().is_some_and(|n| n > 600), "{why}");
    let rot = &r["key_rotation"];
    let steps = rot["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 3, "{rot}");
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"], i + 1, "{rot}");
        assert!(s["all_took_after_s"].is_f64(), "{rot}");
        assert_eq!(s["refusals"], serde_json::json!([]), "{rot}");
    }
    // The first step was written while the faults ran, a quarter through.
    assert_eq!(steps[0]["under_faults"], true, "{rot}");
    let at = steps[0]["written_at_s"].as_f64().expect("written_at_s");
    assert!((4.0..6.0).contains(&at), "step 1 at {at} s\n{why}");
    assert_eq!(
        (&rot["nodes_on_new_key"], &rot["nodes"]),
        (&4.into(), &4.into()),
        "{rot}"
    );
    assert!(rot["rejoined_after_s"].is_f64(), "{rot}");
    // Step 3 closed the connections whose peer had proved the old key (not a fault), and
    // their peers dialled again with the new one.
    assert!(
        r["closes"]["retired_mesh_key"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{}",
        r["closes"]
    );
    // The key file every node reads now holds the new key alone.
    let run = tmp.path().join("run");
    assert_eq!(
        peerbus::MeshKey::load_all(&run.join("mesh.key")).expect("key file"),
        peerbus::MeshKey::load_all(&run.join("next.key")).expect("new key"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("every node took key rotation step 3")
            && stdout.contains("restarted on the new key alone, was connected to every other"),
        "{why}"
    );
    let html = std::fs::read_to_string(tmp.path().join("report.html")).expect("HTML report");
    assert!(
        html.contains("<h2>Mesh key rotation</h2><p>4 of 4 nodes on the new key alone")
            && html
                .find(">key step 1</text>")
                .is_some_and(|k| Some(k) < html.find("</svg>")),
        "HTML report: {html:.300}"
    );
}

#[test]
fn the_checker_fails_a_mesh_that_acknowledges_without_handling() {
    // Every 20th message handled on each node is acknowledged but never handled (journaled).
    let (out, report, _tmp) = chaos(
        &[
            "--nodes=3",
            "--services=1",
            "--duration=6s",
            "--rate=90",
            "--faults=none",
            "--misbehave=drop-every=20",
        ],
        Duration::from_secs(180),
    );
    let why = describe(&out);
    assert_eq!(out.status.code(), Some(1), "{why}");
    let r = report.unwrap_or_else(|| panic!("no report written\n{why}"));
    let accepted = r["accepted"].as_u64().expect("accepted");
    let lost = r["lost"].as_u64().expect("lost");
    let delivered = r["delivered"].as_u64().expect("delivered");
    // About one in 20 handled messages is dropped (a publish needs only one of its copies
    // dropped to be lost).
    assert!(
        lost >= accepted / 40 && lost > 0,
        "lost {lost} of {accepted}\n{why}"
    );
    // Acknowledged, so gone from the senders' logs: lost, not undrained.
    assert_eq!(r["undrained"], 0, "{why}");
    assert_eq!(delivered + lost, accepted, "{why}");
    assert_eq!(r["ok"], false);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAIL"),
        "{why}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invariants broken"),
        "{why}"
    );
}

#[test]
fn a_backlog_left_when_the_drain_wait_ends_is_undrained_not_lost() {
    // Every handler takes 50 ms and there is one key per sender, so the two nodes handle
    // about 40 messages a second of the 200 offered, and the drain wait ends after a second:
    // most of what was accepted is still in the senders' logs when the nodes stop.
    let (out, report, _tmp) = chaos(
        &[
            "--nodes=2",
            "--services=1",
            "--duration=4s",
            "--rate=200",
            "--keys=1",
            "--faults=none",
            "--slow-handlers=1000",
            "--slow-handler-time=50ms",
            "--drain-timeout=1s",
        ],
        Duration::from_secs(120),
    );
    let why = describe(&out);
    assert_eq!(out.status.code(), Some(1), "{why}");
    let r = report.unwrap_or_else(|| panic!("no report written\n{why}"));
    let accepted = r["accepted"].as_u64().expect("accepted");
    let delivered = r["delivered"].as_u64().expect("delivered");
    let undrained = r["undrained"].as_u64().expect("undrained");
    assert_eq!(r["lost"], 0, "{why}");
    assert!(
        undrained > accepted / 4,
        "{undrained} of {accepted} undrained\n{why}"
    );
    assert_eq!(delivered + undrained, accepted, "{why}");
    assert_eq!(r["ok"], false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("kept in their senders' logs"), "{why}");
}

#[test]
fn bad_chaos_options_are_usage_errors() {
    for (args, says) in [
        (&["--nodes=1"][..], "--nodes"),
        (&["--faults=kill,explode"][..], "explode"),
        (&["--services=4", "--nodes=3"][..], "--services"),
        (&["--handler-failures=501"][..], "--handler-failures"),
        (&["--slow-handlers=1001"][..], "--slow-handlers"),
        (&["--slow-handler-time=2s"][..], "--slow-handler-time"),
        (&["--ack-timeout=50ms"][..], "--ack-timeout"),
        (&["--rotate-key", "--mesh-ca"][..], "--mesh-ca"),
    ] {
        let out = Command::new(peerbus_bin())
            .arg("chaos")
            .args(args)
            .output()
            .expect("run peerbus chaos");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
