//! `peerbus demo`: several services in one process, on loopback only.
//!
//! The cast, by node count: `payments` (drives the load: sends to `orders`, publishes
//! `payment.succeeded`, asks `accounts`), `orders#1`, `orders#2` (handle sends and, as group
//! `orders`, the publishes), `accounts` (answers requests; group `accounts`), then with five
//! nodes or more `notifications` (group `notifications`) and further `orders` instances.
//! Midway the last `orders` instance shuts down and starts again; its keys move to the other
//! instances meanwhile, and the timeline shows it being found again.
//!
//! Every node uses [`Interfaces::Loopback`], listens on 127.0.0.1 and shares one in-memory
//! mesh key in a mesh of its own, whatever the common options say. The counts in the summary
//! come from receipts, replies and handler calls.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use clap::value_parser;
use peerbus::{
    Bytes, HandlerError, Interfaces, MeshKey, Message, MessageId, MessageKind, Node, NodeId,
    Outgoing, PeerState,
};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior, sleep_until};

use crate::output::print_line;

/// Topic `payments` publishes on.
const TOPIC: &str = "payment.succeeded";
/// Time between two rounds of load (one send, one publish, one request each).
const ROUND: Duration = Duration::from_millis(300);
/// Most rounds of load, whatever the duration.
const MAX_ROUNDS: u64 = 1_000;
/// Shortest load phase, even when discovery took most of `--duration`.
const MIN_LOAD: Duration = Duration::from_secs(2);
/// How long the nodes may take to find each other.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for the last acknowledgements after the load stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of each request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How often each node's peer list is checked for the timeline.
const WATCH_EVERY: Duration = Duration::from_millis(50);

/// `peerbus demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct DemoArgs {
    /// Nodes to run (4 to 12): payments, orders#1, orders#2, accounts, then notifications and
    /// more orders instances.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = value_parser!(u32).range(4..=12))]
    nodes: u32,
    /// How long to run the load (discovery, the restart and the final drain are within or
    /// shortly after it).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

/// What a demo node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Payments,
    Orders(u32),
    Accounts,
    Notifications,
}

impl Role {
    fn service(self) -> &'static str {
        match self {
            Role::Payments => "payments",
            Role::Orders(_) => "orders",
            Role::Accounts => "accounts",
            Role::Notifications => "notifications",
        }
    }

    fn name(self) -> String {
        match self {
            Role::Orders(i) => format!("orders#{i}"),
            other => other.service().to_string(),
        }
    }

    /// The cast for `n` nodes.
    fn cast(n: u32) -> Vec<Role> {
        let mut roles = vec![
            Role::Payments,
            Role::Orders(1),
            Role::Orders(2),
            Role::Accounts,
        ];
        if n >= 5 {
            roles.push(Role::Notifications);
        }
        roles.extend((3..).map(Role::Orders).take(n.saturating_sub(5) as usize));
        roles
    }
}

/// Shared state of a demo run: the clock, names for node ids, and the honest counts.
struct Demo {
    start: Instant,
    mesh: String,
    key: MeshKey,
    names: Mutex<HashMap<NodeId, String>>,
    /// Pairs of nodes currently connected, as the timeline last reported them.
    pairs: Mutex<HashSet<(NodeId, NodeId)>>,
    /// Copies handled by handlers: (group, message id). Redeliveries count once.
    received: Mutex<HashSet<(String, MessageId)>>,
    stop_watching: AtomicBool,
    /// Copies stored by `send`/`publish` (from receipts).
    sent: AtomicU64,
    /// Copies acknowledged (from receipts).
    acked: AtomicU64,
    /// Sends or publishes that failed or were not delivered.
    failed: AtomicU64,
    requests: AtomicU64,
    replies: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Demo {
    /// Prints one timeline line. Output errors are ignored: the timeline is a show.
    fn say(&self, text: impl AsRef<str>) {
        let t = self.start.elapsed().as_secs_f64();
        let _ = print_line(&format!("[{t:5.2}s] {}", text.as_ref()));
    }

    fn name_of(&self, id: NodeId, service: &str) -> String {
        lock(&self.names)
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("{service}({})", id.short()))
    }

    fn builder(&self, service: &str) -> peerbus::NodeBuilder {
        Node::builder(service)
            .mesh(&self.mesh)
            .mesh_key(self.key.clone())
            .interfaces(Interfaces::Loopback)
            .listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .ack_timeout(Duration::from_secs(5))
            .shutdown_grace(Duration::from_secs(1))
    }

    /// Starts the node for `role` with its handlers and a timeline watcher.
    async fn start_node(self: &Arc<Self>, role: Role) -> Result<(Node, JoinHandle<()>)> {
        let name = role.name();
        let node = self
            .builder(role.service())
            .start()
            .await
            .with_context(|| format!("could not start {name}"))?;
        lock(&self.names).insert(node.id(), name.clone());
        match role {
            Role::Payments => {}
            Role::Orders(_) => {
                let inbox = node.messages().context("orders inbox")?;
                tokio::spawn(inbox.handle(4, self.handler(&name, "orders")));
                self.subscribe(&node, &name).await?;
            }
            Role::Accounts => {
                let answered = name.clone();
                node.serve(move |req| {
                    let who = req.payload_text();
                    let cents = who.bytes().map(u64::from).sum::<u64>() * 7 % 100_000;
                    let reply = format!("{who}: balance {}.{:02} EUR", cents / 100, cents % 100);
                    tracing::debug!(node = %answered, "answered a request");
                    std::future::ready(Ok::<Bytes, HandlerError>(Bytes::from(reply)))
                })
                .await
                .context("accounts serve")?;
                self.subscribe(&node, &name).await?;
            }
            Role::Notifications => self.subscribe(&node, &name).await?,
        }
        self.say(format!(
            "{name} started (node {}, {})",
            node.id().short(),
            node.local_addr()
        ));
        let watcher = tokio::spawn(self.clone().watch(node.clone(), name));
        Ok((node, watcher))
    }

    async fn subscribe(self: &Arc<Self>, node: &Node, name: &str) -> Result<()> {
        let sub = node
            .subscribe(TOPIC)
            .await
            .with_context(|| format!("{name} subscribe"))?;
        tokio::spawn(sub.handle(4, self.handler(name, node.service())));
        Ok(())
    }

    /// A handler that reports and counts each message `name` handles for `group`.
    fn handler(
        self: &Arc<Self>,
        name: &str,
        group: &str,
    ) -> impl Fn(Message) -> std::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static
    {
        let demo = self.clone();
        let name = name.to_string();
        let group = group.to_string();
        move |msg: Message| {
            let first = lock(&demo.received).insert((group.clone(), msg.id()));
            let what = match msg.kind() {
                MessageKind::Publish => format!("{} {:?}", msg.destination(), msg.payload_text()),
                _ => format!("send {:?}", msg.payload_text()),
            };
            let key = msg.key().map(|k| format!(" (key {k})")).unwrap_or_default();
            let again = match (msg.redelivered(), first) {
                (false, _) => String::new(),
                (true, true) => format!(", redelivered: attempt {}", msg.attempt()),
                (true, false) => format!(", duplicate: attempt {}", msg.attempt()),
            };
            demo.say(format!("{name} handled {what}{key}{again}"));
            std::future::ready(Ok(()))
        }
    }

    /// Reports connections made and lost, as seen from `node`, until it stops or the demo ends.
    async fn watch(self: Arc<Self>, node: Node, name: String) {
        let me = node.id();
        let mut connected: HashSet<NodeId> = HashSet::new();
        while !self.stop_watching.load(Ordering::Relaxed) {
            let Some(status) = node.status().await else {
                break;
            };
            for p in &status.peers {
                let pair = (me.min(p.node_id), me.max(p.node_id));
                let other = self.name_of(p.node_id, &p.service);
                if p.state == PeerState::Connected {
                    if connected.insert(p.node_id) && lock(&self.pairs).insert(pair) {
                        let rtt = p
                            .rtt_ms
                            .map(|ms| format!(", rtt {ms:.1} ms"))
                            .unwrap_or_default();
                        self.say(format!("{name} discovered {other} and connected{rtt}"));
                    }
                } else if connected.remove(&p.node_id) && lock(&self.pairs).remove(&pair) {
                    let why = p.last_error.as_deref().unwrap_or("disconnected");
                    self.say(format!("{name} lost {other} ({why})"));
                }
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    }
}

/// Runs the demo; fails (after printing the summary) unless every copy sent was handled and
/// acknowledged and every request answered.
pub(crate) async fn run(args: &DemoArgs) -> Result<()> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let demo = Arc::new(Demo {
        start: Instant::now(),
        mesh: format!("demo-{}-{nanos:x}", std::process::id()),
        key: MeshKey::generate(),
        names: Mutex::default(),
        pairs: Mutex::default(),
        received: Mutex::default(),
        stop_watching: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        replies: AtomicU64::new(0),
    });
    let cast = Role::cast(args.nodes);
    demo.say(format!(
        "starting {} nodes on 127.0.0.1 in mesh {:?} (mDNS on loopback only, one in-memory mesh \
         key); load runs for {}",
        cast.len(),
        demo.mesh,
        humantime::format_duration(args.duration)
    ));

    let mut nodes: Vec<(Role, Node)> = Vec::new();
    let mut watchers = Vec::new();
    let mut result = async {
        for role in &cast {
            let (node, watcher) = demo.start_node(*role).await?;
            nodes.push((*role, node));
            watchers.push(watcher);
        }
        play(&demo, &cast, &mut nodes, &mut watchers, args.duration).await
    }
    .await;

    demo.stop_watching.store(true, Ordering::Relaxed);
    for w in watchers {
        let _ = w.await;
    }
    demo.say("shutting down");
    for (_, node) in &nodes {
        node.shutdown().await;
    }

    let sent = demo.sent.load(Ordering::Relaxed);
    let acked = demo.acked.load(Ordering::Relaxed);
    let failed = demo.failed.load(Ordering::Relaxed);
    let received = lock(&demo.received).len() as u64;
    let requests = demo.requests.load(Ordering::Relaxed);
    let replies = demo.replies.load(Ordering::Relaxed);
    if result.is_ok() {
        result = if sent == 0 {
            Err(anyhow::anyhow!("demo: nothing was sent"))
        } else if acked != sent || received != sent || failed != 0 {
            Err(anyhow::anyhow!(
                "demo: {sent} copies sent, {received} handled, {acked} acknowledged, {failed} \
                 failed"
            ))
        } else if replies != requests {
            Err(anyhow::anyhow!(
                "demo: {requests} requests, only {replies} replies"
            ))
        } else {
            Ok(())
        };
    }
    print_line(&format!(
        "summary: sent={sent} received={received} requests={requests} replies={replies}"
    ))?;
    result
}

/// Discovery, load, the restart midway, and the drain.
async fn play(
    demo: &Arc<Demo>,
    cast: &[Role],
    nodes: &mut Vec<(Role, Node)>,
    watchers: &mut Vec<JoinHandle<()>>,
    duration: Duration,
) -> Result<()> {
    let payments = nodes
        .iter()
        .find(|(r, _)| *r == Role::Payments)
        .map(|(_, n)| n.clone())
        .context("no payments node")?;
    let mut wanted: HashMap<&str, usize> = HashMap::new();
    for role in cast.iter().filter(|r| **r != Role::Payments) {
        *wanted.entry(role.service()).or_default() += 1;
    }
    for (service, count) in &wanted {
        if !payments
            .wait_for_instances(service, *count, DISCOVERY_TIMEOUT)
            .await
        {
            bail!(
                "payments did not find {count} instance(s) of {service} within {}s over mDNS on \
                 loopback (is multicast enabled on lo?)",
                DISCOVERY_TIMEOUT.as_secs()
            );
        }
    }
    demo.say("payments sees every service; starting the load");

    let load_start = Instant::now();
    // At least a little load, however long discovery took.
    let load_end = (demo.start + duration).max(load_start + MIN_LOAD);
    let phase = load_end.saturating_duration_since(load_start);
    let restart_role = cast
        .iter()
        .rev()
        .copied()
        .find(|r| matches!(r, Role::Orders(_)));
    let restart = restart_role.map(|role| {
        let idx = nodes.iter().position(|(r, _)| *r == role);
        let old = idx.map(|i| nodes.remove(i).1);
        let demo = demo.clone();
        tokio::spawn(async move {
            sleep_until(load_start + phase / 3).await;
            let name = role.name();
            if let Some(old) = old {
                demo.say(format!(
                    "{name} shutting down (its keys move to the other instances)"
                ));
                old.shutdown().await;
                demo.say(format!("{name} stopped"));
            }
            sleep_until(load_start + phase * 3 / 5).await;
            demo.say(format!("{name} starting again"));
            demo.start_node(role)
                .await
                .map(|(node, watcher)| (role, node, watcher))
        })
    });

    let mut pending = JoinSet::new();
    let mut tick = tokio::time::interval(ROUND);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut round = 0u64;
    while round < MAX_ROUNDS {
        tick.tick().await;
        if Instant::now() >= load_end {
            break;
        }
        one_round(demo, &payments, round, &mut pending).await;
        round += 1;
    }
    demo.say(format!(
        "load stopped after {round} rounds; waiting for the last acknowledgements"
    ));

    if let Some(restart) = restart {
        let (role, node, watcher) = restart.await.context("the restart task failed")??;
        nodes.push((role, node));
        watchers.push(watcher);
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while pending.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        demo.say(format!(
            "{} receipts or requests still open after {}s",
            pending.len(),
            DRAIN_TIMEOUT.as_secs()
        ));
    } else {
        demo.say(format!(
            "all {} copies acknowledged",
            demo.acked.load(Ordering::Relaxed)
        ));
    }
    Ok(())
}

/// One send to `orders`, one publish on [`TOPIC`], one request to `accounts`; their outcomes
/// are reported by tasks in `pending`.
async fn one_round(demo: &Arc<Demo>, payments: &Node, n: u64, pending: &mut JoinSet<()>) {
    let key = format!("customer-{}", n % 4);
    let sent_at = Instant::now();
    match payments
        .send("orders", Outgoing::new(format!("order {n}")).key(&key))
        .await
    {
        Ok(receipt) => {
            demo.sent
                .fetch_add(receipt.copies() as u64, Ordering::Relaxed);
            let demo = demo.clone();
            pending.spawn(async move {
                let copies = receipt.copies() as u64;
                match receipt.acked().await {
                    Ok(()) => {
                        demo.acked.fetch_add(copies, Ordering::Relaxed);
                        let ms = sent_at.elapsed().as_millis();
                        demo.say(format!("payments -> orders: send #{n} acked ({ms} ms)"));
                    }
                    Err(e) => {
                        demo.failed.fetch_add(copies, Ordering::Relaxed);
                        demo.say(format!("payments -> orders: send #{n} not delivered: {e}"));
                    }
                }
            });
        }
        Err(e) => {
            demo.failed.fetch_add(1, Ordering::Relaxed);
            demo.say(format!("payments -> orders: send #{n} failed: {e}"));
        }
    }

    match payments
        .publish(TOPIC, Outgoing::new(format!("payment {n}")).key(&key))
        .await
    {
        Ok(receipt) => {
            let copies = receipt.copies() as u64;
            demo.sent.fetch_add(copies, Ordering::Relaxed);
            let demo = demo.clone();
            pending.spawn(async move {
                match receipt.acked().await {
                    Ok(()) => {
                        demo.acked.fetch_add(copies, Ordering::Relaxed);
                        let ms = sent_at.elapsed().as_millis();
                        demo.say(format!(
                            "payments -> {TOPIC}: publish #{n} acked by {copies} groups ({ms} ms)"
                        ));
                    }
                    Err(e) => {
                        demo.failed.fetch_add(copies, Ordering::Relaxed);
                        demo.say(format!(
                            "payments -> {TOPIC}: publish #{n} not delivered: {e}"
                        ));
                    }
                }
            });
        }
        Err(e) => {
            demo.failed.fetch_add(1, Ordering::Relaxed);
            demo.say(format!("payments -> {TOPIC}: publish #{n} failed: {e}"));
        }
    }

    demo.requests.fetch_add(1, Ordering::Relaxed);
    let demo = demo.clone();
    let payments = payments.clone();
    pending.spawn(async move {
        let asked = Instant::now();
        match payments
            .request("accounts", key.as_str(), REQUEST_TIMEOUT)
            .await
        {
            Ok(reply) => {
                demo.replies.fetch_add(1, Ordering::Relaxed);
                let ms = asked.elapsed().as_millis();
                let text = String::from_utf8_lossy(&reply);
                demo.say(format!(
                    "payments -> accounts: request #{n} replied {text:?} ({ms} ms)"
                ));
            }
            Err(e) => demo.say(format!("payments -> accounts: request #{n} failed: {e}")),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::Role;

    #[test]
    fn cast_grows_with_node_count() {
        let names = |n| {
            Role::cast(n)
                .into_iter()
                .map(Role::name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(4), ["payments", "orders#1", "orders#2", "accounts"]);
        assert_eq!(
            names(7),
            [
                "payments",
                "orders#1",
                "orders#2",
                "accounts",
                "notifications",
                "orders#3",
                "orders#4"
            ]
        );
    }
}
