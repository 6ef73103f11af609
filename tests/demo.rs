//! `peerbus demo` run non-interactively: the payment story with a killed and restarted
//! consumer must end with an honest summary and exit 0.
//!
//! Network safety: the demo binds every node to 127.0.0.1 with mDNS off (static seeds), in a
//! mesh and a temporary directory of its own. Each run is bounded by a deadline after which
//! the demo is killed and the test fails.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::peerbus_bin;

/// What a finished demo printed.
struct Run {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `peerbus <args>` with a clean PEERBUS_* environment; kills it after `limit`.
fn run(args: &[&str], limit: Duration) -> Run {
    let mut cmd = Command::new(peerbus_bin());
    cmd.args(args);
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("PEERBUS_") {
            cmd.env_remove(var);
        }
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start peerbus demo");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`peerbus {}` did not finish within {limit:?}:\n{}",
                args.join(" "),
                out.join().unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    Run {
        success: status.success(),
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// The figures of the last line, which must be the summary line.
fn summary(run: &Run) -> BTreeMap<String, u64> {
    let last = run.stdout.lines().last().unwrap_or_default();
    let rest = last
        .strip_prefix("summary: ")
        .unwrap_or_else(|| panic!("last line is not the summary: {last:?}\n{}", run.stdout));
    let figures: BTreeMap<String, u64> = rest
        .split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_string(), v.parse().expect("a count"))
        })
        .collect();
    let keys: Vec<&str> = figures.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "delivered",
            "duplicates",
            "lost",
            "order_violations",
            "sent"
        ],
        "{last}"
    );
    figures
}

/// The notifications backlog at payments, from each status line between the kill and the
/// restart.
fn backlog_while_down(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .skip_while(|l| !l.contains("notifications (pid") && !l.contains("stopping notifications"))
        .take_while(|l| !l.contains("restarting notifications"))
        .filter_map(|l| {
            let (_, after) = l.split_once("backlog at payments:")?;
            let (_, n) = after.split_once("notifications ")?;
            n.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .collect()
}

/// Checks a finished demo: exit 0, nothing lost, keys in order, every group got every payment,
/// and the timeline shows the kill, a growing backlog, the restart and the catch-up.
fn check(run: &Run, killed: &str) {
    assert!(
        run.success,
        "demo failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
        run.code, run.stdout, run.stderr
    );
    let f = summary(run);
    assert!(f["sent"] > 0, "nothing sent:\n{}", run.stdout);
    assert_eq!(f["lost"], 0, "{}", run.stdout);
    assert_eq!(f["order_violations"], 0, "{}", run.stdout);
    // Three groups (orders, notifications, points), each handling every payment once.
    assert_eq!(f["delivered"], 3 * f["sent"], "{}", run.stdout);
    assert!(
        run.stdout.contains(killed),
        "no kill shown:\n{}",
        run.stdout
    );
    let backlog = backlog_while_down(&run.stdout);
    assert!(
        backlog.iter().any(|n| *n > 0),
        "the notifications backlog never grew while it was down ({backlog:?}):\n{}",
        run.stdout
    );
    for step in ["restarting notifications", "notifications caught up"] {
        assert!(run.stdout.contains(step), "no {step:?}:\n{}", run.stdout);
    }
}

#[test]
fn demo_with_processes_kills_notifications_and_loses_nothing() {
    let run = run(
        &["demo", "--no-ui", "--duration", "8s"],
        Duration::from_secs(150),
    );
    check(&run, "SIGKILL notifications (pid");
}

#[test]
fn demo_in_process_loses_nothing() {
    let run = run(
        &["demo", "--no-ui", "--in-process", "--duration", "6s"],
        Duration::from_secs(150),
    );
    check(&run, "stopping notifications (in process");
}

#[test]
fn demo_refuses_a_bad_rate() {
    let run = run(&["demo", "--rate", "0"], Duration::from_secs(60));
    assert_eq!(run.code, Some(2), "stderr: {}", run.stderr);
    assert!(run.stderr.contains("--rate"), "stderr: {}", run.stderr);
}

#[test]
fn backlog_is_read_from_the_status_lines_between_kill_and_restart() {
    let timeline = "\
[  1.00s] paid 5 (+5/s) | handled/s: orders 5 | backlog at payments: orders 0, notifications 3, points 0
[  2.00s] SIGKILL notifications (pid 42); payments keeps paying
[  3.00s] paid 9 (+4/s) | handled/s: orders 4 | backlog at payments: orders 0, notifications 4 (4 in flight), points 0
[  4.00s] paid 13 (+4/s) | handled/s: orders 4 | backlog at payments: orders 1, notifications 8, points 0
[  5.00s] restarting notifications on the same data directory
[  6.00s] paid 17 (+4/s) | handled/s: orders 4 | backlog at payments: orders 0, notifications 0, points 0";
    assert_eq!(backlog_while_down(timeline), [4, 8]);
}
