//! `peerbus chaos`: a local mesh of separate OS processes on loopback, a keyed workload, faults
//! on a seeded schedule (SIGKILL + restart, SIGSTOP/SIGCONT, graceful restart, partitions
//! through each node's fault-injecting socket), then a check of every node's journal.
//!
//! Each node is this same binary run as the hidden `chaos-worker` command (see
//! [`worker`]): mDNS off, static seeds, fixed 127.0.0.1 ports, `Fsync` durability, a data
//! directory per node. The orchestrator only signals processes, talks to their control
//! sockets (`status`, `faults`, and `reload` for a `--rotate-key` run's steps, see
//! [`rotation`]), writes their mesh files and reads journals. See [`checker`] for what is
//! checked.

mod checker;
mod journal;
mod report;
mod rotation;
mod schedule;
mod worker;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use peerbus::control;
use peerbus::engine::wire::{
    FIRST_NEGOTIATED_VERSION, MIN_PROTOCOL_VERSION, REQUEST_STREAMS_VERSION,
    REVOCATION_LISTS_VERSION,
};
use peerbus::{CA_CRL_FILE, CaKey, Identity, MeshKey, PROTOCOL_VERSION};
use peerbus_transport::write_replacing;
use serde_json::json;

use crate::common::UsageError;
use checker::{FaultRecord, MeshCaRun};
use report::{FaultView, RunReport, Sample};
use schedule::{FaultKind, Planned};
use worker::WorkerArgs;

/// `peerbus chaos` in the main command list (for `--help`); its options are parsed by
/// [`parse_direct`].
#[derive(Debug, Args)]
pub(crate) struct ChaosPlaceholder {}

#[derive(Debug, clap::Parser)]
#[command(
    name = "peerbus chaos",
    bin_name = "peerbus chaos",
    version,
    about = "Chaos-test a local mesh: kill, freeze, restart and partition node processes on a \
             seeded schedule under load, then check from every node's journal that no \
             acknowledged message was lost or handled out of key order. Exits 1 when an \
             invariant is broken."
)]
struct ChaosCli {
    #[command(flatten)]
    args: ChaosArgs,
}

#[derive(Debug, clap::Parser)]
#[command(name = "peerbus chaos-worker", bin_name = "peerbus chaos-worker")]
struct WorkerCli {
    #[command(flatten)]
    args: WorkerArgs,
}

/// A chaos command parsed from the command line.
#[derive(Debug)]
pub(crate) enum Direct {
    /// `peerbus chaos …`
    Chaos(ChaosArgs),
    /// `peerbus chaos-worker …` (started by `peerbus chaos`).
    Worker(WorkerArgs),
}

impl Direct {
    /// Runs it.
    pub(crate) async fn run(self) -> anyhow::Result<()> {
        match self {
            Direct::Chaos(a) => run(&a).await,
            Direct::Worker(a) => worker::run(&a).await,
        }
    }
}

/// When the command line is `peerbus chaos …` or `peerbus chaos-worker …`, parses it (exiting
/// with a usage message on bad input, like every command).
pub(crate) fn parse_direct() -> Option<Direct> {
    use clap::Parser;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match argv.get(1).and_then(|a| a.to_str()) {
        Some("chaos") => Some(Direct::Chaos(ChaosCli::parse_from(&argv[1..]).args)),
        Some("chaos-worker") => Some(Direct::Worker(WorkerCli::parse_from(&argv[1..]).args)),
        _ => None,
    }
}

/// Arguments of `peerbus chaos`.
#[derive(Debug, Args)]
pub(crate) struct ChaosArgs {
    /// Nodes (OS processes) in the mesh.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Services; node i serves `svc-<i mod S>`, so instances spread over services.
    #[arg(long, default_value_t = 2)]
    services: usize,
    /// How long the workload and the faults run (then the backlog drains and the checker runs).
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Messages per second over the whole mesh (spread evenly over the nodes).
    #[arg(long, value_name = "MSGS_PER_S", default_value_t = 200.0)]
    rate: f64,
    /// Partition keys per node.
    #[arg(long, default_value_t = 16)]
    keys: usize,
    /// Seed of the fault schedule and of the workload's choices. The same seed gives the same
    /// fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fault kinds to inject, comma separated: kill, freeze, restart, partition, oneway (the
    /// first of two nodes stops hearing the second, which still hears it), or none.
    #[arg(
        long,
        value_name = "KINDS",
        default_value = "kill,freeze,restart,partition,oneway"
    )]
    faults: String,
    /// Time between fault starts; each fault is held for 30-60 % of it.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = humantime::parse_duration)]
    fault_interval: Duration,
    /// Percentage of messages published on the topic (every service's group gets a copy)
    /// rather than sent to one service.
    #[arg(long, default_value_t = 30)]
    publish_percent: u32,
    /// Requests per second across all nodes (each to an instance of a random service, which
    /// echoes it): every reply must be the echo of its own request.
    #[arg(long, default_value_t = 40.0)]
    request_rate: f64,
    /// Handler failures on purpose, per thousand handled messages (0–500): a failing handler
    /// asks for a retry, so its key is blocked at the receiver until the message comes back.
    /// Only a message's first three attempts may fail.
    #[arg(long, value_name = "PER_MILLE", default_value_t = 0)]
    handler_failures: u32,
    /// Slow handler runs on purpose, per thousand handled messages (0–1000): a slow run
    /// takes `--slow-handler-time` before it finishes, and holds its handler worker and every
    /// key queued behind it, so consumer queues run deep while retries are in flight.
    #[arg(long, value_name = "PER_MILLE", default_value_t = 0)]
    slow_handlers: u32,
    /// How long a slow handler run takes (1ms–1s).
    #[arg(long, value_name = "DUR", default_value = "20ms", value_parser = humantime::parse_duration)]
    slow_handler_time: Duration,
    /// The nodes' ack timeout (100ms–5m; a node's default is 30s). Shorter than a consumer's
    /// queue takes to drain, it makes senders resend what is still queued and receivers drop
    /// first attempts that waited past it: more duplicates, no loss. The nodes' attempts are
    /// not capped in a chaos run (handlers fail only a message's first three), so a message
    /// timed out many times is resent, never dead-lettered.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = humantime::parse_duration)]
    ack_timeout: Duration,
    /// Longest wait, after the workload stops, for every accepted message to be handled.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
    /// Write the JSON report here, and an HTML page with a plot next to it (`.html`).
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Run directory (journals, node data, node logs). Default: a new directory under the
    /// system temp directory, removed after a passing run.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Test-only: make every worker misbehave (`drop-every=N`), to prove the checker fails.
    #[arg(long, hide = true)]
    misbehave: Option<String>,
    /// Let every node send as soon as it (re)starts, without first waiting (up to 5 s) for a
    /// connection to an instance of every service, as a service with no readiness check would.
    #[arg(long)]
    no_ready_wait: bool,
    /// Every node serves its admin endpoint and live mesh page on a loopback port of its own
    /// (printed at start; each page shows that node and its peers, faults included).
    #[arg(long)]
    admin: bool,
    /// A mesh in the middle of rolling upgrades: node i speaks at most protocol 4 when
    /// i % 4 is 1, at most 5 when it is 2 and at most 6 when it is 3 (as builds before
    /// protocol 5, 6 and 7 do, `NodeBuilder::max_protocol_version`), and this build's own
    /// when it is 0, so connections of four versions carry the load through the faults.
    #[arg(long)]
    mixed_protocols: bool,
    /// Membership by a mesh CA instead of a mesh key: the run makes a CA and a certificate
    /// for each node, halfway through revokes the certificate of the last node while it runs
    /// under load, and three quarters through renews every node's certificate, which
    /// readmits it. Only node-0 reads the CA's revocation list file, so the list reaches the
    /// others from node to node (protocol 8) through the faults. The run fails if anything
    /// the revoked node sent while every other node held the list was handled elsewhere
    /// before the renewal, or unless, at the end, every node of protocol 8 or later holds the
    /// list, every node presents its renewed certificate and none says it is revoked.
    #[arg(long)]
    mesh_ca: bool,
    /// Rotate the mesh key in place while the faults run, as an operator would with `peerbus
    /// reload`: a quarter, half and three quarters through, the run writes the next step of a
    /// rotation to a new key into the key file every node reads (1: prove the old key and
    /// accept the new one; 2: prove the new one and accept the old; 3: the new key alone),
    /// and asks each node to read it again until it answers (a killed node reads it when it
    /// starts again). A step is written only once every node took the one before it; the last
    /// one closes the connections whose peer proved the old key, and they are made again. The
    /// run fails unless every node took every step and ends on the new key alone, and node-0,
    /// restarted on it at the end, is admitted by every other; a node refused for its key is
    /// a protocol fault like any other.
    #[arg(long, conflicts_with = "mesh_ca")]
    rotate_key: bool,
}

/// The highest protocol node `i` speaks in a `--mixed-protocols` run: 4, 5, 6 or this
/// build's.
fn mixed_protocol(i: usize) -> u32 {
    match i % 4 {
        1 => MIN_PROTOCOL_VERSION,
        2 => FIRST_NEGOTIATED_VERSION,
        3 => REQUEST_STREAMS_VERSION,
        _ => PROTOCOL_VERSION,
    }
}

/// Seconds without any handling, after the workload stopped, before the drain wait gives up.
const IDLE_GIVE_UP: u32 = 15;
/// `--ack-timeout`'s default, a node's own (not printed in the run's banner).
const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// What a node process is doing now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Up,
    Frozen,
    Down,
}

struct Proc {
    data_dir: PathBuf,
    addr: SocketAddr,
    child: Option<Child>,
    state: State,
}

/// The node processes; dropping it SIGKILLs whatever still runs (an error or Ctrl-C must not
/// leave orphans behind).
struct Mesh {
    procs: Vec<Proc>,
    args: Vec<Vec<String>>,
    exe: PathBuf,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                signal(c.id(), libc::SIGCONT);
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Sends `sig` to process `pid`.
#[allow(unsafe_code)]
fn signal(pid: u32, sig: libc::c_int) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) takes two integers and touches no memory of ours; `pid` is a child we
    // spawned and have not reaped yet, so it cannot name another process.
    unsafe { libc::kill(pid, sig) == 0 }
}

impl Mesh {
    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let p = &mut self.procs[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p.data_dir.join("worker.log"))
            .context("opening the worker log")?;
        let child = Command::new(&self.exe)
            .arg("chaos-worker")
            .args(&self.args[i])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node-{i}"))?;
        p.child = Some(child);
        p.state = State::Up;
        Ok(())
    }

    fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].child.as_ref().map(Child::id)
    }

    /// Waits (bounded) for node `i` to exit; SIGKILLs it after `limit`. Returns whether it
    /// exited by itself.
    async fn reap(&mut self, i: usize, limit: Duration) -> bool {
        let Some(mut c) = self.procs[i].child.take() else {
            return true;
        };
        let deadline = Instant::now() + limit;
        let mut clean = true;
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    clean = false;
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        self.procs[i].state = State::Down;
        clean
    }
}

/// Free UDP ports on 127.0.0.1, one per node (bound together, then released).
/// `n` ports on 127.0.0.1 free right now: UDP ones for QUIC, TCP ones for admin endpoints.
fn free_ports(n: usize, tcp: bool) -> anyhow::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::with_capacity(n);
    // Hold every socket until all are bound, so the ports differ.
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let addr = if tcp {
            let s = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            let a = s.local_addr()?;
            held.push(Box::new(s) as Box<dyn std::any::Any>);
            a
        } else {
            let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            let a = s.local_addr()?;
            held.push(Box::new(s) as Box<dyn std::any::Any>);
            a
        };
        addrs.push(addr);
    }
    Ok(addrs)
}

async fn control(dir: &Path, req: serde_json::Value) -> Option<serde_json::Value> {
    match tokio::time::timeout(Duration::from_millis(700), control::request(dir, &req)).await {
        Ok(Ok(v)) if v.get("ok").and_then(serde_json::Value::as_bool) == Some(true) => Some(v),
        _ => None,
    }
}

/// Entries waiting or in flight in a node's logs, when it answers.
async fn backlog(dir: PathBuf) -> Option<(u64, usize)> {
    let v = control(&dir, json!({"cmd": "status"})).await?;
    let status = v.get("status")?;
    let logs = status.get("logs")?.as_object()?;
    let depth = logs
        .values()
        .map(|l| {
            l.get("waiting")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
                + l.get("in_flight")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
        })
        .sum();
    let conns = status
        .get("connections")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0) as usize;
    Some((depth, conns))
}

/// Polls every node: per node `(backlog, connections)` or `None`.
async fn poll_all(dirs: &[PathBuf]) -> Vec<Option<(u64, usize)>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, d) in dirs.iter().enumerate() {
        let d = d.clone();
        set.spawn(async move { (i, backlog(d).await) });
    }
    let mut out = vec![None; dirs.len()];
    while let Some(r) = set.join_next().await {
        if let Ok((i, v)) = r {
            out[i] = v;
        }
    }
    out
}

/// Shared by the orchestrator and its sampler.
struct Progress {
    samples: Vec<Sample>,
    peak: u64,
    peak_per_node: Vec<u64>,
}

fn parse_kinds(s: &str) -> anyhow::Result<Vec<FaultKind>> {
    if s.trim() == "none" || s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut kinds = Vec::new();
    for part in s.split(',') {
        match FaultKind::parse(part) {
            Some(k) if !kinds.contains(&k) => kinds.push(k),
            Some(_) => {}
            None => bail!(UsageError(format!(
                "unknown fault kind `{}` (expected kill, freeze, restart, partition, oneway \
                 or none)",
                part.trim()
            ))),
        }
    }
    Ok(kinds)
}

fn validate(a: &ChaosArgs) -> anyhow::Result<Vec<FaultKind>> {
    let usage = |m: String| Err(UsageError(m).into());
    if !(2..=64).contains(&a.nodes) {
        return usage(format!("--nodes must be between 2 and 64, got {}", a.nodes));
    }
    if a.services == 0 || a.services > a.nodes {
        return usage(format!(
            "--services must be between 1 and --nodes ({}), got {}",
            a.nodes, a.services
        ));
    }
    if !(a.rate > 0.0 && a.rate <= 100_000.0) {
        return usage(format!(
            "--rate must be above 0 and at most 100000, got {}",
            a.rate
        ));
    }
    if !(a.request_rate >= 0.0 && a.request_rate <= 10_000.0) {
        return usage(format!(
            "--request-rate must be between 0 and 10000, got {}",
            a.request_rate
        ));
    }
    if !(1..=10_000).contains(&a.keys) {
        return usage(format!(
            "--keys must be between 1 and 10000, got {}",
            a.keys
        ));
    }
    if a.publish_percent > 100 {
        return usage(format!(
            "--publish-percent must be at most 100, got {}",
            a.publish_percent
        ));
    }
    if a.handler_failures > 500 {
        return usage(format!(
            "--handler-failures must be at most 500 (per mille), got {}",
            a.handler_failures
        ));
    }
    if a.slow_handlers > 1000 {
        return usage(format!(
            "--slow-handlers must be at most 1000 (per mille), got {}",
            a.slow_handlers
        ));
    }
    if !(Duration::from_millis(1)..=Duration::from_secs(1)).contains(&a.slow_handler_time) {
        return usage(format!(
            "--slow-handler-time must be between 1ms and 1s, got {}",
            humantime::format_duration(a.slow_handler_time)
        ));
    }
    if !(Duration::from_millis(100)..=Duration::from_secs(300)).contains(&a.ack_timeout) {
        return usage(format!(
            "--ack-timeout must be between 100ms and 5m, got {}",
            humantime::format_duration(a.ack_timeout)
        ));
    }
    if a.duration < Duration::from_secs(1) {
        return usage("--duration must be at least 1s".into());
    }
    if a.fault_interval < Duration::from_millis(500) {
        return usage("--fault-interval must be at least 500ms".into());
    }
    parse_kinds(&a.faults)
}

/// Runs `peerbus chaos`.
pub(crate) async fn run(a: &ChaosArgs) -> anyhow::Result<()> {
    let kinds = validate(a)?;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!(
            "peerbus-chaos-{}-{}",
            std::process::id(),
            journal::unix_now_us() / 1_000_000
        )),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for f in [worker::GO_FILE, worker::STOP_FILE] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let key_path = dir.join("mesh.key");
    if !key_path.exists() {
        MeshKey::write_new(&key_path).context("writing the mesh key")?;
    }
    let rotation = a
        .rotate_key
        .then(|| rotation::Rotation::prepare(&key_path))
        .transpose()
        .context("preparing the mesh key rotation")?;
    let addrs = free_ports(a.nodes, false).context("finding free ports on 127.0.0.1")?;
    let admins = if a.admin {
        free_ports(a.nodes, true).context("finding free TCP ports on 127.0.0.1")?
    } else {
        Vec::new()
    };
    let exe = std::env::current_exe().context("locating the peerbus binary")?;
    let mut procs = Vec::new();
    let mut args = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let data_dir = dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&data_dir)?;
        let mut v = vec![
            format!("--index={i}"),
            format!("--services={}", a.services),
            format!("--run-dir={}", dir.display()),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen={addr}"),
            format!("--rate={}", a.rate / a.nodes as f64),
            format!("--keys={}", a.keys),
            format!("--publish-percent={}", a.publish_percent),
            format!("--request-rate={}", a.request_rate / a.nodes as f64),
            format!("--seed={}", a.seed),
            format!("--handler-failures={}", a.handler_failures),
            format!("--slow-handlers={}", a.slow_handlers),
            format!(
                "--slow-handler-time={}",
                humantime::format_duration(a.slow_handler_time)
            ),
            format!(
                "--ack-timeout={}",
                humantime::format_duration(a.ack_timeout)
            ),
        ];
        for (j, other) in addrs.iter().enumerate() {
            if j != i {
                v.push(format!("--seed-peer={other}"));
            }
        }
        if let Some(m) = &a.misbehave {
            v.push(format!("--misbehave={m}"));
        }
        if a.no_ready_wait {
            v.push("--no-ready-wait".into());
        }
        if let Some(admin) = admins.get(i) {
            v.push(format!("--admin={admin}"));
        }
        if a.mixed_protocols && mixed_protocol(i) != PROTOCOL_VERSION {
            v.push(format!("--max-protocol-version={}", mixed_protocol(i)));
        }
        args.push(v);
        procs.push(Proc {
            data_dir,
            addr: *addr,
            child: None,
            state: State::Down,
        });
    }
    let mut mesh = Mesh { procs, args, exe };
    let dirs: Vec<PathBuf> = mesh.procs.iter().map(|p| p.data_dir.clone()).collect();
    let ca_dir = dir.join(worker::CA_DIR);
    // The node a `--mesh-ca` run revokes halfway through: the last one (never node-0, the
    // one that reads the list file).
    let revoked_node = a.mesh_ca.then_some(a.nodes - 1);
    if a.mesh_ca {
        mesh_ca_setup(&dir, &dirs, a.services).context("setting up the run's mesh CA")?;
        for (i, v) in mesh.args.iter_mut().enumerate() {
            v.push("--mesh-ca".into());
            if i == 0 {
                v.push(format!("--mesh-crl={}", ca_dir.join(CA_CRL_FILE).display()));
            }
        }
    }
    // The nodes that must hold the revocation list at the end: those that take lists.
    let list_holders: Vec<usize> = (0..a.nodes)
        .filter(|&i| !a.mixed_protocols || mixed_protocol(i) >= REVOCATION_LISTS_VERSION)
        .collect();
    // Those of them that cut off the revoked node: all but itself (it refuses a list that
    // revokes it).
    let cutting_off: Vec<usize> = list_holders
        .iter()
        .copied()
        .filter(|&i| Some(i) != revoked_node)
        .collect();
    println!(
        "chaos: {} nodes, {} services, {:.0} msg/s, {} keys/node, seed {}, faults [{}] every {}{}{}{}, for {}; dir {}",
        a.nodes,
        a.services,
        a.rate,
        a.keys,
        a.seed,
        kinds
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        humantime::format_duration(a.fault_interval),
        if a.handler_failures > 0 {
            format!(", handler failures {}/1000", a.handler_failures)
        } else {
            String::new()
        },
        if a.slow_handlers > 0 {
            format!(
                ", slow handlers {}/1000 of {}",
                a.slow_handlers,
                humantime::format_duration(a.slow_handler_time)
            )
        } else {
            String::new()
        },
        if a.ack_timeout == DEFAULT_ACK_TIMEOUT {
            String::new()
        } else {
            format!(
                ", ack timeout {}",
                humantime::format_duration(a.ack_timeout)
            )
        },
        humantime::format_duration(a.duration),
        dir.display()
    );
    for (i, admin) in admins.iter().enumerate() {
        println!("chaos: node-{i} live mesh page: http://{admin}/");
    }
    if a.mixed_protocols {
        let versions: Vec<String> = (0..a.nodes)
            .map(|i| format!("node-{i} {}", mixed_protocol(i)))
            .collect();
        println!("chaos: mixed protocols: {} (at most)", versions.join(", "));
    }
    if let Some(r) = revoked_node {
        println!(
            "chaos: membership by the mesh CA in {}; node-0 reads its revocation list, which \
             revokes node-{r}'s certificate at {:.1}s; every node's certificate is renewed \
             (node-{r} readmitted) at {:.1}s",
            ca_dir.display(),
            (a.duration / 2).as_secs_f64(),
            (a.duration * 3 / 4).as_secs_f64()
        );
    }
    if a.rotate_key {
        println!(
            "chaos: the mesh key in {} is rotated in place to the new key in {} in three steps, \
             at {:.1}s, {:.1}s and {:.1}s or once every node took the step before",
            key_path.display(),
            key_path.with_file_name("next.key").display(),
            (a.duration / 4).as_secs_f64(),
            (a.duration / 2).as_secs_f64(),
            (a.duration * 3 / 4).as_secs_f64()
        );
    }
    for i in 0..a.nodes {
        mesh.spawn(i)?;
    }

    // Wait until every node answers and is connected to every other.
    let ready_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let polled = poll_all(&dirs).await;
        let ready = polled
            .iter()
            .filter(|p| p.is_some_and(|(_, c)| c + 1 >= a.nodes))
            .count();
        if ready == a.nodes {
            break;
        }
        if Instant::now() >= ready_deadline {
            bail!(
                "only {ready} of {} nodes were up and fully connected after 30s; see {}/node-*/worker.log",
                a.nodes,
                dir.display()
            );
        }
        for (i, p) in mesh.procs.iter_mut().enumerate() {
            if let Some(c) = p.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                bail!(
                    "node-{i} exited at start ({st}); see {}/worker.log",
                    p.data_dir.display()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Let the durable group interests spread before the first publish.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let plan = schedule::plan(a.seed, a.nodes, &kinds, a.fault_interval, a.duration);
    std::fs::write(dir.join(worker::GO_FILE), b"")?;
    let t0 = Instant::now();
    let t0_us = journal::now_us();
    let t0_unix_us = journal::unix_now_us();
    let progress = Arc::new(Mutex::new(Progress {
        samples: Vec::new(),
        peak: 0,
        peak_per_node: vec![0; a.nodes],
    }));
    let faults_done = Arc::new(AtomicUsize::new(0));
    let sampler = tokio::spawn(sampler(
        dirs.clone(),
        t0,
        progress.clone(),
        faults_done.clone(),
    ));

    let run_faults = async {
        let mut records: Vec<FaultRecord> = Vec::new();
        for f in &plan {
            tokio::time::sleep_until((t0 + f.at).into()).await;
            records.push(inject(&mut mesh, f).await?);
            faults_done.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep_until((t0 + a.duration).into()).await;
        anyhow::Ok(records)
    };
    // Halfway through, a `--mesh-ca` run revokes the certificate of a node that is running
    // (sending, serving and handling under load), then follows the list from node to node
    // until every other node holds it (from then on the revoked node is cut off) or the
    // workload ends.
    let spread = async {
        let Some(r) = revoked_node else {
            return anyhow::Ok(None);
        };
        tokio::time::sleep_until((t0 + a.duration / 2).into()).await;
        revoke(&ca_dir, &dirs[r]).with_context(|| format!("revoking node-{r}'s certificate"))?;
        let revoked_at = t0.elapsed();
        println!(
            "chaos: revoked node-{r}'s certificate at {:.1}s",
            revoked_at.as_secs_f64()
        );
        let reached = time_until(
            t0,
            revoked_at,
            async || count(&statuses(&dirs, &cutting_off).await, holds_list) == cutting_off.len(),
            |after| {
                format!(
                    "the revocation list reached every other node {after:.2}s after it revoked \
                     node-{r}: node-{r} is cut off"
                )
            },
        );
        // The revoked node learns it from its peers' refusals (or a list it does not take)
        // and says so in its status until its renewal.
        let knew = time_until(
            t0,
            revoked_at,
            async || {
                statuses(&dirs, &[r]).await[0]
                    .as_ref()
                    .is_some_and(says_revoked)
            },
            |after| format!("node-{r} said its certificate is revoked {after:.2}s after it was"),
        );
        let (reached, knew) = tokio::join!(
            tokio::time::timeout_at((t0 + a.duration).into(), reached),
            tokio::time::timeout_at((t0 + a.duration * 3 / 4).into(), knew)
        );
        Ok(Some((revoked_at, reached.ok(), knew.ok())))
    };
    // Three quarters through, it renews every node's certificate: each node reads its file
    // again within a second (or at its restart) and presents the new one. The revoked node's
    // new certificate is not on the list: it is a member again, and the run follows it until
    // it has a connection again or the workload ends.
    let renew = async {
        let Some(r) = revoked_node else {
            return anyhow::Ok(None);
        };
        tokio::time::sleep_until((t0 + a.duration * 3 / 4).into()).await;
        let renewed_at = t0.elapsed();
        let until = issue_certificates(&ca_dir, &dirs, a.services, RENEWED_VALIDITY)
            .context("renewing the nodes' certificates")?;
        println!(
            "chaos: renewed every node's certificate at {:.1}s",
            renewed_at.as_secs_f64()
        );
        let readmitted = time_until(
            t0,
            renewed_at,
            async || {
                backlog(dirs[r].clone())
                    .await
                    .is_some_and(|(_, connections)| connections > 0)
            },
            |after| format!("node-{r} was connected again {after:.2}s after its renewal"),
        );
        let readmitted = tokio::time::timeout_at((t0 + a.duration).into(), readmitted).await;
        Ok(Some((renewed_at, until, readmitted.ok())))
    };
    // A `--rotate-key` run takes the rotation's steps a quarter, half and three quarters
    // through, each once every node took the one before.
    let mut rotation_steps = Vec::new();
    let rotate = async {
        if let Some(r) = &rotation {
            let at = |step: usize| t0 + a.duration * step as u32 / 4;
            rotation::take_steps(r, &dirs, t0, at, t0 + a.duration, true, &mut rotation_steps)
                .await?;
        }
        anyhow::Ok(())
    };
    let (records, spread, renewed) = tokio::select! {
        r = async { tokio::join!(run_faults, spread, renew, rotate) } => {
            r.3?;
            (r.0?, r.1?, r.2?)
        }
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the run directory is {}", dir.display()),
    };

    // Stop the workload, heal everything, then wait for the backlog to drain.
    for i in 0..a.nodes {
        match mesh.procs[i].state {
            State::Frozen => {
                if let Some(pid) = mesh.pid(i) {
                    signal(pid, libc::SIGCONT);
                }
                mesh.procs[i].state = State::Up;
            }
            State::Down => mesh.spawn(i)?,
            State::Up => {}
        }
    }
    for d in &dirs {
        let _ = control(d, json!({"cmd": "faults", "heal_all": true})).await;
    }
    // The rotation's steps not taken while the faults ran are taken now, before the drain
    // (which needs every node on keys its peers accept).
    if let Some(r) = &rotation
        && (rotation_steps.len() < rotation::STEPS.len()
            || rotation_steps.iter().any(|s| s.all_took_after_s.is_none()))
    {
        let until = Instant::now() + ROTATION_WAIT;
        rotation::take_steps(
            r,
            &dirs,
            t0,
            |_| Instant::now(),
            until,
            false,
            &mut rotation_steps,
        )
        .await?;
    }
    std::fs::write(dir.join(worker::STOP_FILE), b"")?;
    let stop_deadline = Instant::now() + Duration::from_secs(20);
    while dirs.iter().any(|d| !d.join(worker::STOPPED_FILE).exists())
        && Instant::now() < stop_deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let load_end = Instant::now();
    println!(
        "chaos: workload stopped at {:.1}s; waiting up to {} for every accepted message to be handled",
        t0.elapsed().as_secs_f64(),
        humantime::format_duration(a.drain_timeout)
    );
    let drain_deadline = load_end + a.drain_timeout;
    let (mut idle_polls, mut prev_handled) = (0, u64::MAX);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (journals, torn) = read_journals(&dirs)?;
        let f = checker::check(&journals, torn, a.services, &[]);
        if f.lost == 0 {
            break;
        }
        // Nothing handled for a while: what is missing will not come.
        idle_polls = if f.handled_events == prev_handled {
            idle_polls + 1
        } else {
            0
        };
        prev_handled = f.handled_events;
        if idle_polls >= IDLE_GIVE_UP || Instant::now() >= drain_deadline {
            println!(
                "chaos: {} accepted messages still unhandled; {}",
                f.lost,
                if idle_polls >= IDLE_GIVE_UP {
                    "nothing was handled for 15s, giving up"
                } else {
                    "drain timeout"
                }
            );
            break;
        }
    }
    let final_drain = load_end.elapsed().as_secs_f64();
    sampler.abort();
    // Every node is up and healed now: the nodes that take lists must all hold it, every
    // node must present its renewed certificate, and none may still say it is revoked.
    let mesh_ca = match (spread, renewed, revoked_node) {
        (Some((revoked_at, reached, knew)), Some((renewed_at, until, readmitted)), Some(r)) => {
            let all: Vec<usize> = (0..a.nodes).collect();
            let renewed = move |status: &serde_json::Value| {
                status
                    .get("mesh_certificate_expires")
                    .and_then(serde_json::Value::as_u64)
                    .is_some_and(|secs| secs >= until)
            };
            let deadline = Instant::now() + MESH_CA_WAIT;
            let (mut holding, mut presenting, mut still_revoked);
            loop {
                // One status of each node answers all three.
                let all_statuses = statuses(&dirs, &all).await;
                holding = list_holders
                    .iter()
                    .filter(|&&i| all_statuses[i].as_ref().is_some_and(holds_list))
                    .count();
                presenting = count(&all_statuses, renewed);
                still_revoked = count(&all_statuses, says_revoked);
                let done =
                    holding == list_holders.len() && presenting == all.len() && still_revoked == 0;
                if done || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Some(MeshCaRun {
                revoked_node: r,
                revoked_at_s: revoked_at.as_secs_f64(),
                reached_all_after_s: reached.map(|d| d.as_secs_f64()),
                sent_while_cut_off: 0,
                handled_while_cut_off: 0,
                knew_after_s: knew.map(|d| d.as_secs_f64()),
                nodes_still_revoked: still_revoked,
                nodes_holding: holding,
                nodes_expected: list_holders.len(),
                renewed_at_s: renewed_at.as_secs_f64(),
                readmitted_after_s: readmitted.map(|d| d.as_secs_f64()),
                nodes_renewed: presenting,
                nodes: all.len(),
            })
        }
        _ => None,
    };

    // Every node must hold the key file's keys, the new key alone, at the end, and a node
    // started on them must be admitted by every other on new connections: node-0 restarts.
    let key_rotation = match &rotation {
        Some(_) => {
            let nodes_on_new_key =
                rotation::nodes_on_file(&dirs, Instant::now() + ROTATION_WAIT).await;
            let rejoined_after_s = rejoin(&mut mesh, 0, &dirs).await?.map(|d| d.as_secs_f64());
            match rejoined_after_s {
                Some(after) => println!(
                    "chaos: node-0, restarted on the new key alone, was connected to every \
                     other node {after:.2}s after it started"
                ),
                None => println!(
                    "chaos: node-0, restarted on the new key alone, was not connected to every \
                     other node within {}",
                    humantime::format_duration(ROTATION_WAIT)
                ),
            }
            Some(rotation::KeyRotationRun {
                nodes_on_new_key,
                steps: rotation_steps,
                nodes: a.nodes,
                rejoined_after_s,
            })
        }
        None => None,
    };

    // Stop the nodes gracefully.
    for i in 0..a.nodes {
        if let Some(pid) = mesh.pid(i) {
            signal(pid, libc::SIGTERM);
        }
    }
    for i in 0..a.nodes {
        if !mesh.reap(i, Duration::from_secs(15)).await {
            println!("chaos: node-{i} did not stop within 15s of SIGTERM; killed");
        }
    }

    let (journals, torn) = read_journals(&dirs)?;
    let kept = read_logs(&dirs);
    let mut findings = checker::check_with_logs(&journals, torn, a.services, &records, &kept);
    // What the revoked node sent while it was cut off (every other node held the list, and
    // its renewed certificate was not written yet) must not have reached another node that
    // holds lists before the renewal.
    findings.mesh_ca = mesh_ca.map(|mut m| {
        if let Some(after) = m.reached_all_after_s {
            let journal_us = |s: f64| t0_us + (s * 1e6) as u64;
            (m.sent_while_cut_off, m.handled_while_cut_off) = checker::cut_off(
                &journals,
                m.revoked_node,
                &cutting_off,
                journal_us(m.revoked_at_s + after),
                journal_us(m.renewed_at_s),
            );
        }
        m
    });
    findings.key_rotation = key_rotation;
    // The report names when a lost or late message was seen in Unix time, to find it in the
    // nodes' logs: the run's start on the wall clock plus the monotonic time since.
    let unix_of = |us: u64| t0_unix_us.saturating_add(us).saturating_sub(t0_us);
    for l in findings
        .lost_messages
        .iter_mut()
        .chain(&mut findings.undrained_messages)
    {
        l.accepted_us = unix_of(l.accepted_us);
    }
    for v in &mut findings.order_examples {
        v.at_us = unix_of(v.at_us);
    }
    let secs_of = |us: u64| us.saturating_sub(t0_us) as f64 / 1e6;
    for d in &mut findings.duplicate_examples {
        (d.previous_at_s, d.at_s) = (secs_of(d.previous_at_us), secs_of(d.at_us));
        (d.previous_at_us, d.at_us) = (unix_of(d.previous_at_us), unix_of(d.at_us));
    }
    for d in findings.drain_slowest.iter_mut().flatten() {
        (d.accepted_us, d.handled_us) = (unix_of(d.accepted_us), unix_of(d.handled_us));
    }
    let faults: Vec<FaultView> = records
        .iter()
        .zip(&findings.drain_seconds)
        .zip(&findings.drain_slowest)
        .map(|((r, d), slowest)| FaultView {
            kind: r.kind.to_string(),
            target: r
                .targets
                .iter()
                .map(|t| format!("node-{t}"))
                .collect::<Vec<_>>()
                .join("|"),
            start: secs_of(r.start_us),
            end: secs_of(r.end_us),
            drain_seconds: *d,
            slowest: slowest.clone(),
        })
        .collect();
    let p = progress
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let report = RunReport {
        settings: json!({
            "nodes": a.nodes, "services": a.services,
            "duration_s": a.duration.as_secs_f64(), "rate": a.rate, "keys": a.keys,
            "request_rate": a.request_rate,
            "seed": a.seed, "faults": kinds.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "fault_interval_s": a.fault_interval.as_secs_f64(),
            "publish_percent": a.publish_percent, "misbehave": a.misbehave,
            "handler_failures": a.handler_failures,
            "slow_handlers": a.slow_handlers,
            "slow_handler_time_s": a.slow_handler_time.as_secs_f64(),
            "ack_timeout_s": a.ack_timeout.as_secs_f64(),
            "no_ready_wait": a.no_ready_wait,
            "mixed_protocols": a.mixed_protocols,
            "mesh_ca": a.mesh_ca,
            "rotate_key": a.rotate_key,
        }),
        findings,
        faults,
        samples: p.samples.clone(),
        peak_backlog: p.peak,
        peak_backlog_per_node: p.peak_per_node.clone(),
        final_drain_seconds: final_drain,
        dir: dir.display().to_string(),
    };
    drop(p);
    print!("{}", report.table());
    if let Some(path) = &a.report {
        report.write(path)?;
        println!(
            "report: {} and {}",
            path.display(),
            path.with_extension("html").display()
        );
    }
    let f = &report.findings;
    if !f.ok() {
        bail!(
            "chaos: invariants broken: {} lost, {} undrained (still in their senders' logs), {} \
             out of key order, {} phantom, {} connections closed for a protocol fault (the \
             nodes' logs say why), {} replies to the wrong request, {} requests never ended, \
             {} past their deadline, {}, {}; journals kept in {}",
            f.lost,
            f.undrained,
            f.order_violations,
            f.phantoms,
            f.protocol_faults,
            f.requests_wrong,
            f.requests_unended,
            f.requests_late,
            f.mesh_ca.as_ref().map_or_else(
                || "no mesh CA".to_string(),
                |r| format!(
                    "the revocation list held by {} of {} nodes, {} messages of the revoked \
                     node handled elsewhere while it was cut off, the renewed certificate \
                     presented by {} of {} ({} still saying they are revoked)",
                    r.nodes_holding,
                    r.nodes_expected,
                    r.handled_while_cut_off,
                    r.nodes_renewed,
                    r.nodes,
                    r.nodes_still_revoked
                )
            ),
            f.key_rotation.as_ref().map_or_else(
                || "no key rotation".to_string(),
                |r| format!("key rotation: {}", r.text())
            ),
            dir.display()
        );
    }
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Restarts node `i` gracefully and waits up to [`ROTATION_WAIT`] until it has a connection
/// to every other node: the time that took from its start, or `None`.
async fn rejoin(mesh: &mut Mesh, i: usize, dirs: &[PathBuf]) -> anyhow::Result<Option<Duration>> {
    if let Some(pid) = mesh.pid(i) {
        signal(pid, libc::SIGTERM);
    }
    if !mesh.reap(i, Duration::from_secs(15)).await {
        println!("chaos: node-{i} did not stop within 15s of SIGTERM; killed");
    }
    mesh.spawn(i)?;
    let started = Instant::now();
    let deadline = started + ROTATION_WAIT;
    while Instant::now() < deadline {
        if backlog(dirs[i].clone())
            .await
            .is_some_and(|(_, connections)| connections + 1 >= dirs.len())
        {
            return Ok(Some(started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(None)
}

/// Longest wait, once the faults are healed, for every node to take a `--rotate-key` run's
/// steps not taken while they ran, and then at the end for every node to answer that it holds
/// the new key alone.
const ROTATION_WAIT: Duration = Duration::from_secs(15);

/// Longest wait, after the drain, for every node to hold a `--mesh-ca` run's revocation
/// list and present its renewed certificate.
const MESH_CA_WAIT: Duration = Duration::from_secs(15);
/// How long a `--mesh-ca` run's first certificates are valid.
const FIRST_VALIDITY: Duration = Duration::from_secs(86_400);
/// How long its renewed certificates are valid: longer, so a node's status tells which it
/// presents.
const RENEWED_VALIDITY: Duration = Duration::from_secs(2 * 86_400);

/// Makes a `--mesh-ca` run's CA (anew, in the run directory's [`worker::CA_DIR`]) and a
/// certificate for each node's identity (its data directory's, created here when it has
/// none), bound to its service of `services`.
fn mesh_ca_setup(run_dir: &Path, data_dirs: &[PathBuf], services: usize) -> anyhow::Result<()> {
    let ca_dir = run_dir.join(worker::CA_DIR);
    // A run directory used again gets a new CA: its old list revoked a node's certificate.
    if ca_dir.exists() {
        std::fs::remove_dir_all(&ca_dir)
            .with_context(|| format!("removing the old CA in {}", ca_dir.display()))?;
    }
    CaKey::create(&ca_dir, "chaos")?;
    issue_certificates(&ca_dir, data_dirs, services, FIRST_VALIDITY)?;
    Ok(())
}

/// Issues each node a certificate valid for `valid_for` (into its data directory, for its
/// identity there, created when it has none) from the CA in `ca_dir`, bound to the node's
/// service of `services` ([`worker::service_of`]), so that every run checks that peers
/// take the services the certificates name. Returns a time, in
/// seconds since the Unix epoch, that every one of them is valid until and a certificate
/// valid half as long, issued before, is not.
fn issue_certificates(
    ca_dir: &Path,
    data_dirs: &[PathBuf],
    services: usize,
    valid_for: Duration,
) -> anyhow::Result<u64> {
    let ca = CaKey::load(ca_dir)?;
    let issued_at = journal::unix_now_us() / 1_000_000;
    for (i, d) in data_dirs.iter().enumerate() {
        let node = Identity::load_or_create(d)?.node_id();
        let service = worker::service_of(i, services);
        write_replacing(
            &d.join(worker::NODE_CERT),
            ca.issue_for_services(&node, valid_for, &[&service])?
                .as_bytes(),
        )?;
    }
    Ok(issued_at + valid_for.as_secs() * 3 / 4)
}

/// Adds the certificate the node of `data_dir` holds now to the revocation list in `ca_dir`.
fn revoke(ca_dir: &Path, data_dir: &Path) -> anyhow::Result<()> {
    let file = data_dir.join(worker::NODE_CERT);
    let pem = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let serial = peerbus::NodeCert::from_pem(&file.display().to_string(), &pem)?.serial();
    let ca = CaKey::load(ca_dir)?;
    let path = ca_dir.join(CA_CRL_FILE);
    let list = ca.revoke_continuing(&path, [serial.as_str()], peerbus::CRL_NEXT_UPDATE)?;
    write_replacing(&path, list.as_bytes())?;
    Ok(())
}

/// Whether a node's status says it holds a revocation list that revokes a certificate.
fn holds_list(status: &serde_json::Value) -> bool {
    status
        .get("mesh_ca_revoked")
        .and_then(serde_json::Value::as_u64)
        .is_some_and(|n| n >= 1)
}

/// Polls `done` every 250 ms until it answers true, then prints what `say` makes of the
/// seconds since `since` (a time of the run started at `t0`) and returns them.
async fn time_until(
    t0: Instant,
    since: Duration,
    mut done: impl AsyncFnMut() -> bool,
    say: impl FnOnce(f64) -> String,
) -> Duration {
    while !done().await {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = t0.elapsed() - since;
    println!("chaos: {}", say(after.as_secs_f64()));
    after
}

/// Whether a node's status says its own certificate is revoked.
fn says_revoked(status: &serde_json::Value) -> bool {
    status
        .get("mesh_certificate_revoked")
        .is_some_and(serde_json::Value::is_string)
}

/// The statuses of the nodes `which`, in that order (`None` for a node that does not
/// answer), asked at once.
async fn statuses(dirs: &[PathBuf], which: &[usize]) -> Vec<Option<serde_json::Value>> {
    let mut set = tokio::task::JoinSet::new();
    for (slot, &i) in which.iter().enumerate() {
        let d = dirs[i].clone();
        set.spawn(async move {
            let v = control(&d, json!({"cmd": "status"})).await;
            (
                slot,
                v.and_then(|mut v| v.get_mut("status").map(serde_json::Value::take)),
            )
        });
    }
    let mut out = vec![None; which.len()];
    while let Some(r) = set.join_next().await {
        if let Ok((slot, status)) = r {
            out[slot] = status;
        }
    }
    out
}

/// How many of `statuses` `test` accepts.
fn count(
    statuses: &[Option<serde_json::Value>],
    test: impl Fn(&serde_json::Value) -> bool,
) -> usize {
    statuses.iter().flatten().filter(|s| test(s)).count()
}

/// Every node's journal events, by node index.
type Journals = Vec<(usize, Vec<journal::Event>)>;

/// The copies still in the stopped nodes' logs (each node's data directory is its run
/// directory): for each (origin, per-origin sequence) in a payload there, the logs that hold
/// it. A store that cannot be read (a node still running, a damaged file) adds nothing, so
/// what it held counts as lost: the check errs on the side of failing. The stores' own
/// limits (`max_log_entries`, `max_log_bytes`) bound what is read.
fn read_logs(dirs: &[PathBuf]) -> checker::Kept {
    let mut kept = checker::Kept::new();
    for (i, d) in dirs.iter().enumerate() {
        let entries = match control::offline_entries(d, usize::MAX) {
            Ok(entries) => entries,
            Err(e) => {
                println!("chaos: could not read node-{i}'s log after the run: {e}");
                continue;
            }
        };
        for e in entries {
            if let Ok(p) = serde_json::from_str::<journal::Payload>(&e.payload) {
                kept.entry((p.o, p.g)).or_default().push(e.log);
            }
        }
    }
    kept
}

/// Reads every node's journal; also returns how many lines were torn.
fn read_journals(dirs: &[PathBuf]) -> anyhow::Result<(Journals, usize)> {
    let mut out = Vec::new();
    let mut torn = 0;
    for (i, d) in dirs.iter().enumerate() {
        let (events, bad) = journal::read(&worker::journal_path(d))
            .with_context(|| format!("reading the journal of node-{i}"))?;
        torn += bad;
        out.push((i, events));
    }
    Ok((out, torn))
}

/// Injects one planned fault and lifts it; returns what happened when.
async fn inject(mesh: &mut Mesh, f: &Planned) -> anyhow::Result<FaultRecord> {
    let target = f.targets[0];
    let start_us = journal::now_us();
    let mut down_us = start_us;
    match f.kind {
        FaultKind::Kill => {
            if let Some(pid) = mesh.pid(target) {
                signal(pid, libc::SIGKILL);
            }
            mesh.reap(target, Duration::from_secs(5)).await;
            down_us = journal::now_us();
            tokio::time::sleep(f.hold).await;
            mesh.spawn(target)?;
        }
        FaultKind::Freeze => {
            let pid = mesh.pid(target);
            if let Some(pid) = pid {
                signal(pid, libc::SIGSTOP);
                mesh.procs[target].state = State::Frozen;
            }
            tokio::time::sleep(f.hold).await;
            if let Some(pid) = pid {
                signal(pid, libc::SIGCONT);
                mesh.procs[target].state = State::Up;
            }
        }
        FaultKind::Restart => {
            if let Some(pid) = mesh.pid(target) {
                signal(pid, libc::SIGTERM);
            }
            if !mesh.reap(target, Duration::from_secs(15)).await {
                println!("chaos: node-{target} did not stop within 15s of SIGTERM; killed");
            }
            mesh.spawn(target)?;
        }
        FaultKind::Partition => {
            let (x, y) = (f.targets[0], f.targets[1]);
            let (dx, dy) = (
                mesh.procs[x].data_dir.clone(),
                mesh.procs[y].data_dir.clone(),
            );
            let (ax, ay) = (mesh.procs[x].addr, mesh.procs[y].addr);
            let cut =
                |other: SocketAddr| json!({"cmd": "faults", "partition": [other.to_string()]});
            let okx = control(&dx, cut(ay)).await.is_some();
            let oky = control(&dy, cut(ax)).await.is_some();
            if !(okx && oky) {
                println!("chaos: partition node-{x}|node-{y}: a node did not take it");
            }
            tokio::time::sleep(f.hold).await;
            let heal = |other: SocketAddr| json!({"cmd": "faults", "heal": [other.to_string()]});
            let _ = control(&dx, heal(ay)).await;
            let _ = control(&dy, heal(ax)).await;
        }
        FaultKind::OneWay => {
            // `x` drops what `y` sends it; `y` still hears `x`.
            let (x, y) = (f.targets[0], f.targets[1]);
            let dx = mesh.procs[x].data_dir.clone();
            let ay = mesh.procs[y].addr.to_string();
            if control(&dx, json!({"cmd": "faults", "deaf": [ay]}))
                .await
                .is_none()
            {
                println!("chaos: one-way partition node-{x}<-node-{y}: the node did not take it");
            }
            tokio::time::sleep(f.hold).await;
            let _ = control(&dx, json!({"cmd": "faults", "heal": [ay]})).await;
        }
    }
    let end_us = journal::now_us();
    println!(
        "chaos: {} {} for {:.1}s",
        f.kind,
        f.targets
            .iter()
            .map(|t| format!("node-{t}"))
            .collect::<Vec<_>>()
            .join("|"),
        (end_us - start_us) as f64 / 1e6
    );
    Ok(FaultRecord {
        kind: f.kind,
        targets: f.targets.clone(),
        start_us,
        down_us,
        end_us,
    })
}

/// Every second: tail the journals, poll every node's backlog, print a progress line.
async fn sampler(
    dirs: Vec<PathBuf>,
    t0: Instant,
    progress: Arc<Mutex<Progress>>,
    faults_done: Arc<AtomicUsize>,
) {
    let mut tail = journal::Tail::default();
    let (mut prev_acc, mut prev_handled, mut prev_t) = (0u64, 0u64, 0.0f64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: sample from one second in
    loop {
        tick.tick().await;
        let polled = poll_all(&dirs).await;
        for d in &dirs {
            tail.poll(&worker::journal_path(d));
        }
        let t = t0.elapsed().as_secs_f64();
        let dt = (t - prev_t).max(0.001);
        let sent = (tail.accepted - prev_acc) as f64 / dt;
        let handled = (tail.handled - prev_handled) as f64 / dt;
        (prev_acc, prev_handled, prev_t) = (tail.accepted, tail.handled, t);
        let answered = polled.iter().filter(|p| p.is_some()).count();
        let backlog: u64 = polled.iter().flatten().map(|(b, _)| b).sum();
        let mut p = progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (i, v) in polled.iter().enumerate() {
            if let Some((b, _)) = v {
                p.peak_per_node[i] = p.peak_per_node[i].max(*b);
            }
        }
        p.peak = p.peak.max(backlog);
        p.samples.push(Sample {
            t,
            sent_per_s: sent,
            handled_per_s: handled,
            backlog,
            answered,
        });
        drop(p);
        println!(
            "[{t:6.1}s] sent {sent:6.0}/s  handled {handled:6.0}/s  accepted {}  handled {}  faults {}  backlog {backlog}  nodes answering {answered}/{}",
            tail.accepted,
            tail.handled,
            faults_done.load(Ordering::Relaxed),
            dirs.len()
        );
    }
}
