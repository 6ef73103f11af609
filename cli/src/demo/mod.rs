//! `peerbus demo`: the payment story, told by real services on loopback.
//!
//! The cast: `payments` handles checkouts (a request to `accounts` debits the customer, then
//! it publishes `payment.succeeded` keyed by customer, durably: fsync'd before it counts as
//! sent); `orders` (two instances sharing the work), `notifications` and `points` consume it
//! as durable groups. Each is a node of its own, in a process of its own (the same binary, run
//! as the hidden `peerbus demo-service`), or with `--in-process` a task of this process.
//!
//! The plot: at 30% of the load `notifications` is killed with SIGKILL (with `--in-process`
//! it is shut down instead); payments keeps paying and the timeline shows the notifications
//! backlog growing in payments' log. At 60% it starts again on the same data directory and
//! the backlog drains, in key order. The services report every payment accepted and every
//! handler run; [`check`] turns these reports into the summary, and the demo exits 0 only
//! when nothing was lost and no key went out of order.
//!
//! Network safety: every node listens on 127.0.0.1 with mDNS off and finds payments through
//! a static seed; the mesh key is generated for the run, in a temporary directory that also
//! holds the data directories and is removed at the end.

mod check;
mod event;
mod service;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, IsTerminal as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::ValueEnum as _;
use peerbus::MeshKey;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::output::print_line;
use check::{Checker, Figures};
use event::{Backlog, Event, REPORT_QUEUE, Report, Reporter};
use service::{GROUPS, TOPIC};
pub(crate) use service::{Role, ServiceArgs, run_child as run_service};

/// Most checkouts a run may make (`--rate` × `--duration`); bounds the checker's memory.
pub(crate) const MAX_ORDERS: u64 = 300_000;
/// How long the services may take to start and report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait, after the load, for every copy to be handled.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped service may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the orchestrator checks its schedule.
const TICK: Duration = Duration::from_millis(250);
/// Share of the load after which notifications is killed, and restarted (per mille).
const KILL_AT: u32 = 300;
const RESTART_AT: u32 = 600;
/// The instance that is killed and restarted.
const VICTIM: &str = "notifications";

/// `peerbus demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// How long payments keeps paying (the kill is at 30%, the restart at 60%).
    #[arg(long, value_name = "DUR", default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Checkouts per second (1 to 500; a target: checkouts run one at a time).
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
    rate: u32,
    /// Plain log lines without colors, for scripts (the default when stdout is not a terminal).
    #[arg(long)]
    no_ui: bool,
    /// Run every node in this process instead of one process per node (notifications is then
    /// shut down rather than SIGKILLed).
    #[arg(long)]
    in_process: bool,
    /// Where payments serves the live mesh page and its admin endpoint (/status, /metrics);
    /// loopback only. Port 0 picks a free one; the address is printed.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    admin: SocketAddr,
}

/// A running service.
enum Member {
    /// A child process; its stdout is read by a thread.
    Proc(Child),
    /// A task of this process (`--in-process`).
    Task {
        stop: Option<oneshot::Sender<()>>,
        handle: JoinHandle<Result<()>>,
    },
}

impl Drop for Member {
    fn drop(&mut self) {
        match self {
            Member::Proc(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Member::Task { handle, .. } => handle.abort(),
        }
    }
}

impl Member {
    /// Stops the service gracefully (closes a child's stdin) and waits for it, killing it after
    /// [`STOP_TIMEOUT`].
    async fn stop(mut self) {
        match &mut self {
            Member::Proc(child) => {
                drop(child.stdin.take());
                let deadline = Instant::now() + STOP_TIMEOUT;
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Member::Task { stop, handle } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                let _ = tokio::time::timeout(STOP_TIMEOUT, handle).await;
            }
        }
    }
}

/// The temporary directory of a run, removed when dropped.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The orchestrator: starts the cast, follows the plot, keeps the books.
struct Demo {
    start: Instant,
    ui: bool,
    in_process: bool,
    /// Where payments serves the admin endpoint and live mesh page.
    admin: SocketAddr,
    dir: PathBuf,
    mesh: String,
    key_file: PathBuf,
    rate: u32,
    duration: Duration,
    tx: mpsc::Sender<Report>,
    members: BTreeMap<String, Member>,
    checker: Checker,
    /// Latest backlog per group, as payments reported it.
    backlog: BTreeMap<String, Backlog>,
    declined: u64,
    /// Duplicates narrated so far (the first few are).
    duplicates_shown: u64,
    /// Distinct orders per group at the last status line, for rates.
    last_delivered: HashMap<String, u64>,
    last_sent: u64,
}

/// Runs the demo; fails (after printing the summary) unless the invariants held.
pub(crate) async fn run(args: &DemoArgs) -> Result<()> {
    if u64::from(args.rate) * args.duration.as_secs().max(1) > MAX_ORDERS {
        return Err(crate::common::UsageError(format!(
            "--rate × --duration allows at most {MAX_ORDERS} checkouts"
        ))
        .into());
    }
    if args.duration < Duration::from_secs(2) {
        return Err(crate::common::UsageError("--duration must be at least 2s".into()).into());
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mesh = format!("demo-{}-{nanos:x}", std::process::id());
    let dir = RunDir(std::env::temp_dir().join(format!("peerbus-{mesh}")));
    std::fs::create_dir_all(&dir.0)
        .with_context(|| format!("could not create {}", dir.0.display()))?;
    let key_file = dir.0.join("mesh.key");
    MeshKey::write_new(&key_file).context("could not write the demo's mesh key")?;
    let (tx, mut rx) = mpsc::channel(REPORT_QUEUE);
    let mut demo = Demo {
        start: Instant::now(),
        ui: !args.no_ui && std::io::stdout().is_terminal(),
        in_process: args.in_process,
        admin: args.admin,
        dir: dir.0.clone(),
        mesh,
        key_file,
        rate: args.rate,
        duration: args.duration,
        tx,
        members: BTreeMap::new(),
        checker: Checker::new(&GROUPS),
        backlog: BTreeMap::new(),
        declined: 0,
        duplicates_shown: 0,
        last_delivered: HashMap::new(),
        last_sent: 0,
    };
    let result = demo.play(&mut rx).await;
    if let Err(e) = &result {
        demo.say(format!("demo stopped early: {e:#}"));
    }
    demo.say("stopping every service");
    let mut members = std::mem::take(&mut demo.members);
    let payments = members.remove("payments");
    let stopping = async {
        // The others first, all at once, then payments: a consumer whose seed stopped first
        // would only log failed redials while it stops.
        let mut others = tokio::task::JoinSet::new();
        for (_, m) in members {
            others.spawn(m.stop());
        }
        while others.join_next().await.is_some() {}
        if let Some(p) = payments {
            p.stop().await;
        }
    };
    tokio::pin!(stopping);
    // Keep reading while the services stop: their last reports still count (a late duplicate
    // is still a duplicate), and a closed pipe would fail their shutdown.
    loop {
        tokio::select! {
            () = &mut stopping => break,
            report = rx.recv() => match report {
                Some(report) => demo.book(report),
                None => break,
            },
        }
    }
    while let Ok(report) = rx.try_recv() {
        demo.book(report);
    }
    let figures = demo.checker.figures();
    demo.print_summary(&figures)?;
    result?;
    if !figures.held() {
        bail!(
            "the invariants did not hold: {} lost, {} order violations, {} sent",
            figures.lost,
            figures.order_violations,
            figures.sent
        );
    }
    Ok(())
}

impl Demo {
    /// Books a late report (while the services stop) without narrating it.
    fn book(&mut self, report: Report) {
        match report.event {
            Event::Handled {
                group,
                order,
                key,
                seq,
                ..
            } => {
                self.checker.handled(&group, &report.from, order, &key, seq);
            }
            Event::Accepted { order, key, seq } => self.checker.accepted(order, &key, seq),
            _ => {}
        }
    }

    /// Prints one timeline line. Output errors are ignored: the timeline is a show.
    fn say(&self, text: impl AsRef<str>) {
        let t = self.start.elapsed().as_secs_f64();
        let _ = print_line(&format!("[{t:6.2}s] {}", text.as_ref()));
    }

    /// `text` in bold (UI mode).
    fn bold(&self, text: &str) -> String {
        self.paint("1", text)
    }

    fn paint(&self, sgr: &str, text: &str) -> String {
        if self.ui {
            format!("\x1b[{sgr}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn args(&self, role: Role, name: &str, seed: Option<SocketAddr>) -> ServiceArgs {
        ServiceArgs {
            role,
            demo_mesh: self.mesh.clone(),
            demo_key_file: self.key_file.clone(),
            demo_dir: self.dir.join(name.replace('#', "-")),
            payments_addr: seed,
            admin: (role == Role::Payments).then_some(self.admin),
            rate: self.rate,
            duration: self.duration,
        }
    }

    /// Starts `name` in a process of its own or as a task.
    fn spawn(&mut self, name: &str, args: ServiceArgs) -> Result<()> {
        let member = if self.in_process {
            let (stop, stop_rx) = oneshot::channel();
            let out = Reporter::Channel {
                from: name.to_string(),
                tx: self.tx.clone(),
            };
            let handle = tokio::spawn(async move {
                let r = service::run(&args, out.clone(), stop_rx).await;
                if let Err(e) = &r {
                    let _ = out
                        .report(Event::Failed {
                            error: format!("{e:#}"),
                        })
                        .await;
                }
                let _ = out.report(Event::Closed).await;
                r
            });
            Member::Task {
                stop: Some(stop),
                handle,
            }
        } else {
            Member::Proc(spawn_child(name, &args, self.tx.clone())?)
        };
        self.members.insert(name.to_string(), member);
        Ok(())
    }

    /// The whole plot; returns when every copy was handled, or on a failure.
    async fn play(&mut self, rx: &mut mpsc::Receiver<Report>) -> Result<()> {
        let how = if self.in_process {
            "one process"
        } else {
            "one process per node"
        };
        self.say(format!(
            "peerbus demo: payments, accounts, orders ×2, notifications, points on 127.0.0.1 \
             ({how}; mesh {:?} with a fresh mesh key; static seeds, mDNS off)",
            self.mesh
        ));
        self.spawn("payments", self.args(Role::Payments, "payments", None))?;
        let seed = self.wait_ready(rx).await?;
        for (role, name) in [
            (Role::Accounts, "accounts"),
            (Role::Orders, "orders#1"),
            (Role::Orders, "orders#2"),
            (Role::Notifications, VICTIM),
            (Role::Points, "points"),
        ] {
            self.spawn(name, self.args(role, name, Some(seed)))?;
        }

        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        let mut load_start: Option<Instant> = None;
        let mut load_done: Option<Instant> = None;
        let mut killed = false;
        let mut restarted: Option<Instant> = None;
        let mut caught_up = false;
        let mut drain = Drain::default();
        let ready_by = self.start + READY_TIMEOUT;
        loop {
            tokio::select! {
                report = rx.recv() => {
                    let Some(Report { from, event }) = report else {
                        bail!("every service is gone");
                    };
                    match event {
                        Event::LoadStarted { rate } => {
                            load_start = Some(Instant::now());
                            self.say(self.bold(&format!(
                                "every service is connected: paying {rate} checkouts/s for {} \
                                 (debit at accounts, then publish {TOPIC} keyed by customer)",
                                humantime::format_duration(self.duration)
                            )));
                        }
                        Event::LoadDone { checkouts } => {
                            load_done = Some(Instant::now());
                            self.say(self.bold(&format!(
                                "payments stopped paying after {checkouts} checkouts; waiting \
                                 for every copy to be handled"
                            )));
                        }
                        Event::Handled { order, attempt, .. }
                            if from == VICTIM && restarted.is_some() =>
                        {
                            drain.note(order, attempt);
                            self.on_event(&from, event)?;
                        }
                        Event::Closed if from == VICTIM && killed && restarted.is_none() => {}
                        event => self.on_event(&from, event)?,
                    }
                }
                r = tokio::signal::ctrl_c() => {
                    r.context("could not watch Ctrl-C")?;
                    bail!("interrupted");
                }
                _ = tick.tick() => {
                    ticks += 1;
                    let now = Instant::now();
                    let Some(started) = load_start else {
                        if now > ready_by {
                            bail!(
                                "payments did not start paying within {}s",
                                READY_TIMEOUT.as_secs()
                            );
                        }
                        continue;
                    };
                    if ticks.is_multiple_of(4) {
                        self.status_line(killed && restarted.is_none());
                    }
                    if !killed && now >= started + self.duration * KILL_AT / 1000 {
                        killed = true;
                        self.kill_victim();
                    }
                    if killed && restarted.is_none()
                        && now >= started + self.duration * RESTART_AT / 1000
                    {
                        let waiting = self.backlog.get(VICTIM).map_or(0, Backlog::total);
                        self.say(self.paint("32;1", &format!(
                            "restarting {VICTIM} on the same data directory ({waiting} \
                             payments wait for it in payments' log)"
                        )));
                        self.spawn(VICTIM, self.args(Role::Notifications, VICTIM, Some(seed)))?;
                        restarted = Some(now);
                    }
                    if restarted.is_some() && !caught_up && drain.count > 0 {
                        let sent = self.checker.sent();
                        let done = self.checker.delivered_to(VICTIM);
                        if self.backlog.get(VICTIM).map_or(0, Backlog::total) == 0 && done == sent {
                            caught_up = true;
                            self.say_caught_up(&drain);
                        } else if ticks.is_multiple_of(4) {
                            self.say(format!(
                                "{VICTIM} draining: {} handled since its restart ({})",
                                drain.count,
                                drain.describe()
                            ));
                        }
                    }
                    if let Some(done) = load_done {
                        let f = self.checker.figures();
                        if f.lost == 0 && restarted.is_some() {
                            if !caught_up {
                                self.say_caught_up(&drain);
                            }
                            self.say(format!(
                                "every copy handled: {} payments × {} groups",
                                f.sent,
                                GROUPS.len()
                            ));
                            return Ok(());
                        }
                        if now >= done + DRAIN_TIMEOUT {
                            self.say(format!(
                                "{} copies still unhandled {}s after the load",
                                f.lost,
                                DRAIN_TIMEOUT.as_secs()
                            ));
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// The victim handled every payment accepted so far.
    fn say_caught_up(&self, drain: &Drain) {
        let violations = self
            .checker
            .figures()
            .groups
            .iter()
            .find(|(g, _)| g == VICTIM)
            .map_or(0, |(_, g)| g.order_violations);
        let order = if violations == 0 {
            "in key order".to_string()
        } else {
            format!("with {violations} ORDER VIOLATIONS")
        };
        self.say(self.paint(
            "32;1",
            &format!(
                "{VICTIM} caught up: {} handled since its restart ({}), every payment so far \
                 handled, {order}",
                drain.count,
                drain.describe()
            ),
        ));
    }

    /// Waits for payments' address.
    async fn wait_ready(&mut self, rx: &mut mpsc::Receiver<Report>) -> Result<SocketAddr> {
        let deadline = self.start + READY_TIMEOUT;
        loop {
            let report = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .map_err(|_| anyhow!("payments did not start within {}s", READY_TIMEOUT.as_secs()))?
                .ok_or_else(|| anyhow!("payments is gone"))?;
            if let Event::Ready { addr, .. } = &report.event {
                let addr = *addr;
                self.on_event(&report.from, report.event)?;
                return Ok(addr);
            }
            self.on_event(&report.from, report.event)?;
        }
    }

    /// Books and narrates one report; fails when payments fails.
    fn on_event(&mut self, from: &str, event: Event) -> Result<()> {
        match event {
            Event::Ready { addr, node, admin } => {
                self.say(format!("{from} is up: node {node} on {addr}"));
                if let Some(admin) = admin {
                    self.say(format!(
                        "live mesh page: http://{admin}/  (also /status, /metrics; up while the demo runs)"
                    ));
                }
            }
            Event::Peer {
                service,
                node,
                up,
                why,
            } => {
                if up {
                    self.say(format!("payments connected to {service} (node {node})"));
                } else {
                    let why = why.unwrap_or_else(|| "connection closed".into());
                    let service = if service.is_empty() {
                        "a peer"
                    } else {
                        &service
                    };
                    self.say(self.paint(
                        "33",
                        &format!("payments lost {service} (node {node}): {why}"),
                    ));
                }
            }
            Event::Accepted { order, key, seq } => self.checker.accepted(order, &key, seq),
            Event::Declined { order, reason } => {
                self.declined += 1;
                if self.declined <= 5 {
                    self.say(format!("checkout {order} declined: {reason}"));
                }
            }
            Event::Handled {
                group,
                order,
                key,
                seq,
                attempt,
            } => match self.checker.handled(&group, from, order, &key, seq) {
                Some(check::Outcome::OutOfOrder) => self.say(self.paint(
                    "31;1",
                    &format!(
                        "ORDER VIOLATION: {from} handled order {order} ({key} #{seq}) after a \
                         later payment of {key}"
                    ),
                )),
                Some(check::Outcome::Duplicate) => {
                    self.duplicates_shown += 1;
                    if self.duplicates_shown <= 5 {
                        self.say(format!(
                            "{from} handled order {order} again (attempt {attempt}): a duplicate, \
                             allowed by at-least-once delivery"
                        ));
                    }
                }
                Some(check::Outcome::First) | None => {}
            },
            Event::Backlog { logs } => {
                self.backlog = logs.into_iter().map(|b| (b.group.clone(), b)).collect();
            }
            Event::Failed { error } => {
                self.say(self.paint("31;1", &format!("{from} failed: {error}")));
                if from == "payments" {
                    bail!("payments failed: {error}");
                }
            }
            Event::Closed => {
                self.say(self.paint("31", &format!("{from} exited")));
                if from == "payments" {
                    bail!("payments exited");
                }
            }
            Event::LoadStarted { .. } | Event::LoadDone { .. } => {}
        }
        Ok(())
    }

    /// SIGKILLs the victim (or shuts it down, in process).
    fn kill_victim(&mut self) {
        let Some(member) = self.members.remove(VICTIM) else {
            return;
        };
        let waiting = self.backlog.get(VICTIM).map_or(0, Backlog::total);
        let what = match &member {
            Member::Proc(child) => format!("SIGKILL {VICTIM} (pid {})", child.id()),
            Member::Task { .. } => format!("stopping {VICTIM} (in process: a shutdown)"),
        };
        self.say(self.paint(
            "31;1",
            &format!(
                "{what}; payments keeps paying, its copies for {VICTIM} wait in payments' log \
                 ({waiting} now)"
            ),
        ));
        match member {
            // Dropping a process member kills it with SIGKILL (std's `Child::kill` on Unix).
            Member::Proc(_) => drop(member),
            Member::Task { .. } => {
                tokio::spawn(member.stop());
            }
        }
    }

    /// One line per second: payments, handling rates, backlog per group.
    fn status_line(&mut self, victim_down: bool) {
        let sent = self.checker.sent();
        let paid = sent - self.last_sent;
        self.last_sent = sent;
        let mut rates = Vec::new();
        for g in GROUPS {
            let now = self.checker.delivered_to(g);
            let before = self.last_delivered.insert(g.to_string(), now).unwrap_or(0);
            rates.push(format!("{g} {}", now - before));
        }
        let backlog: Vec<String> = GROUPS
            .iter()
            .map(|g| {
                let b = self.backlog.get(*g);
                let total = b.map_or(0, Backlog::total);
                let in_flight = b.map_or(0, |b| b.in_flight);
                let mut text = format!("{g} {total}");
                if in_flight > 0 {
                    text.push_str(&format!(" ({in_flight} in flight)"));
                }
                if self.ui && total > 0 {
                    let bar = "█".repeat(total.div_ceil(10).min(30));
                    let color = if victim_down && *g == VICTIM {
                        "31"
                    } else {
                        "33"
                    };
                    text.push(' ');
                    text.push_str(&self.paint(color, &bar));
                }
                text
            })
            .collect();
        self.say(format!(
            "paid {sent} (+{paid}/s) | handled/s: {} | backlog at payments: {}",
            rates.join(", "),
            backlog.join(", ")
        ));
    }

    /// The summary table, then the summary line (the very last line).
    fn print_summary(&self, f: &Figures) -> Result<()> {
        print_line("")?;
        print_line(&self.bold(&format!(
            "{:<15} {:>9} {:>6} {:>10} {:>16}  by instance",
            "group", "delivered", "lost", "duplicates", "order violations"
        )))?;
        for (group, g) in &f.groups {
            let by: Vec<String> = g
                .by_instance
                .iter()
                .map(|(i, n)| format!("{i}={n}"))
                .collect();
            print_line(&format!(
                "{:<15} {:>9} {:>6} {:>10} {:>16}  {}",
                group,
                g.delivered,
                g.lost,
                g.duplicates,
                g.order_violations,
                by.join(" ")
            ))?;
        }
        for example in self.checker.examples() {
            print_line(&format!("  violation: {example}"))?;
        }
        print_line(&format!(
            "sent = payments accepted durably ({} checkouts declined); delivered = distinct \
             (group, payment) pairs handled; duplicates = extra handler runs (at-least-once \
             after a kill)",
            self.declined
        ))?;
        let verdict = if f.held() {
            self.paint("32;1", "invariants held: nothing lost, every key in order")
        } else {
            self.paint("31;1", "INVARIANTS BROKEN")
        };
        print_line(&verdict)?;
        print_line(&f.summary_line())
    }
}

/// What the restarted victim handled: the drain.
#[derive(Debug, Default)]
struct Drain {
    count: u64,
    first: Option<u64>,
    last: Option<u64>,
    redelivered: u64,
}

impl Drain {
    fn note(&mut self, order: u64, attempt: u32) {
        self.count += 1;
        self.first.get_or_insert(order);
        self.last = Some(order);
        if attempt > 1 {
            self.redelivered += 1;
        }
    }

    fn describe(&self) -> String {
        match (self.first, self.last) {
            (Some(a), Some(b)) => format!(
                "orders {a} … {b}, {} of them on a second attempt",
                self.redelivered
            ),
            _ => "nothing yet".into(),
        }
    }
}

/// Starts `peerbus demo-service` for `name`; a thread forwards its JSON lines to `tx`.
fn spawn_child(name: &str, args: &ServiceArgs, tx: mpsc::Sender<Report>) -> Result<Child> {
    let exe = std::env::current_exe().context("could not find the peerbus binary")?;
    let mut child = Command::new(exe)
        .arg("demo-service")
        .args(child_args(args))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("could not start {name}"))?;
    let stdout = child
        .stdout
        .take()
        .context("the child's stdout is not piped")?;
    let from = name.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let event = match serde_json::from_str::<Event>(&line) {
                Ok(e) => e,
                Err(e) => Event::Failed {
                    error: format!("unreadable report {line:?}: {e}"),
                },
            };
            let report = Report {
                from: from.clone(),
                event,
            };
            if tx.blocking_send(report).is_err() {
                return;
            }
        }
        let _ = tx.blocking_send(Report {
            from,
            event: Event::Closed,
        });
    });
    Ok(child)
}

/// The command line of `peerbus demo-service` for `args`.
fn child_args(args: &ServiceArgs) -> Vec<OsString> {
    let role = args.role.to_possible_value().map_or_else(
        || args.role.service().to_string(),
        |v| v.get_name().to_string(),
    );
    let mut v: Vec<OsString> = vec![
        "--role".into(),
        role.into(),
        "--demo-mesh".into(),
        args.demo_mesh.clone().into(),
        "--demo-key-file".into(),
        path(&args.demo_key_file),
        "--demo-dir".into(),
        path(&args.demo_dir),
        "--rate".into(),
        args.rate.to_string().into(),
        "--duration".into(),
        humantime::format_duration(args.duration).to_string().into(),
    ];
    if let Some(seed) = args.payments_addr {
        v.push("--payments-addr".into());
        v.push(seed.to_string().into());
    }
    if let Some(admin) = args.admin {
        v.push("--admin".into());
        v.push(admin.to_string().into());
    }
    v
}

fn path(p: &Path) -> OsString {
    p.as_os_str().to_owned()
}
