//! One demo service: a node with its role's handlers. Runs as `peerbus demo-service` (a child
//! process of `peerbus demo`) or as a task of `peerbus demo --in-process`.
//!
//! Network: every node listens on 127.0.0.1 with mDNS off; the others find `payments`
//! through a static seed (its address) and it learns them from their connections.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use peerbus::{Bytes, Durability, HandlerError, Message, Node, NodeId, Outgoing, PeerState};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};

use super::event::{Backlog, Event, Reporter};

/// The topic payments publishes on.
pub(crate) const TOPIC: &str = "payment.succeeded";
/// The subscriber groups, in summary order.
pub(crate) const GROUPS: [&str; 3] = ["orders", "notifications", "points"];
/// Instances payments waits for before paying: (service, count).
const CAST: [(&str, usize); 4] = [
    ("accounts", 1),
    ("orders", 2),
    ("notifications", 1),
    ("points", 1),
];
/// Customers (partition keys) the checkouts cycle through.
const CUSTOMERS: u64 = 8;
/// Each customer's opening balance, in cents: enough for any demo run.
const OPENING_BALANCE: u64 = 1_000_000_000;
/// Deadline of each balance request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long payments waits for the other services.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between seeing every instance and the first checkout.
const SETTLE: Duration = Duration::from_secs(1);
/// How often payments reports its backlog and peers.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// Handler concurrency of consumers (keys in parallel; one key runs in order).
const CONSUMER_CONCURRENCY: usize = 4;

/// What a demo node does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Role {
    /// Drives checkouts: asks `accounts`, publishes `payment.succeeded`.
    Payments,
    /// Answers balance requests.
    Accounts,
    /// Durable group `orders`.
    Orders,
    /// Durable group `notifications`.
    Notifications,
    /// Durable group `points`.
    Points,
}

impl Role {
    /// The node's service name (and its group, for consumers).
    pub(crate) fn service(self) -> &'static str {
        match self {
            Role::Payments => "payments",
            Role::Accounts => "accounts",
            Role::Orders => "orders",
            Role::Notifications => "notifications",
            Role::Points => "points",
        }
    }
}

/// `peerbus demo-service` (hidden): one node of the demo. Reports JSON lines on stdout; stops
/// gracefully when stdin closes.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct ServiceArgs {
    /// What the node does.
    #[arg(long, value_enum)]
    pub(crate) role: Role,
    /// Mesh name.
    #[arg(long)]
    pub(crate) demo_mesh: String,
    /// Mesh key file.
    #[arg(long)]
    pub(crate) demo_key_file: PathBuf,
    /// Data directory (store, identity).
    #[arg(long)]
    pub(crate) demo_dir: PathBuf,
    /// Address of payments (every role but payments).
    #[arg(long)]
    pub(crate) payments_addr: Option<SocketAddr>,
    /// Serve the admin endpoint and live mesh page here (payments).
    #[arg(long)]
    pub(crate) admin: Option<SocketAddr>,
    /// Checkouts per second (payments).
    #[arg(long, default_value_t = 20)]
    pub(crate) rate: u32,
    /// How long payments pays.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
}

/// The payload of `payment.succeeded`.
#[derive(Debug, Serialize, Deserialize)]
struct Payment {
    order: u64,
    customer: String,
    seq: u64,
    amount_cents: u64,
}

/// A balance request to `accounts`.
#[derive(Debug, Serialize, Deserialize)]
struct Debit {
    customer: String,
    amount_cents: u64,
}

/// `peerbus demo-service`: runs until stdin closes.
pub(crate) async fn run_child(args: &ServiceArgs) -> Result<()> {
    let (tx, rx) = oneshot::channel();
    // Blocking read in a thread of its own: tokio's stdin feature is not enabled.
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(());
    });
    let result = run(args, Reporter::Stdout, rx).await;
    if let Err(e) = &result {
        let _ = Reporter::Stdout
            .report(Event::Failed {
                error: format!("{e:#}"),
            })
            .await;
    }
    result
}

/// Runs the service until `stop` fires (or its sender is dropped), then shuts the node down.
pub(crate) async fn run(
    args: &ServiceArgs,
    out: Reporter,
    stop: oneshot::Receiver<()>,
) -> Result<()> {
    let mut builder = Node::builder(args.role.service())
        .mesh(&args.demo_mesh)
        .mesh_key_file(&args.demo_key_file)
        .data_dir(&args.demo_dir)
        .durability(Durability::Fsync)
        .listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .no_mdns()
        .ack_timeout(Duration::from_secs(3))
        .shutdown_grace(Duration::from_millis(500));
    if let Some(seed) = args.payments_addr {
        builder = builder.seed(seed);
    } else if args.role != Role::Payments {
        bail!(
            "{} needs --payments-addr (the address of payments)",
            args.role.service()
        );
    }
    if let Some(admin) = args.admin {
        if !admin.ip().is_loopback() {
            bail!("--admin {admin}: the demo serves its page on loopback only");
        }
        builder = builder.admin(admin);
    }
    let node = builder
        .start()
        .await
        .with_context(|| format!("could not start {}", args.role.service()))?;
    out.report(Event::Ready {
        addr: node.local_addr(),
        node: node.id().short(),
        admin: node.admin_addr(),
    })
    .await?;
    let result = tokio::select! {
        r = play(args, &node, &out) => r,
        _ = stop => Ok(()),
    };
    node.shutdown().await;
    result
}

/// The role's work; returns only on failure or, for payments, never after the load (it keeps
/// reporting its backlog until stopped).
async fn play(args: &ServiceArgs, node: &Node, out: &Reporter) -> Result<()> {
    match args.role {
        Role::Payments => pay(args, node, out).await,
        Role::Accounts => {
            let balances: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
            let _serving = node
                .serve(move |req| std::future::ready(debit(&balances, req.payload())))
                .await
                .context("accounts could not serve")?;
            std::future::pending().await
        }
        Role::Orders | Role::Notifications | Role::Points => {
            let group = args.role.service();
            let sub = node
                .subscribe_group(TOPIC, group)
                .await
                .with_context(|| format!("{group} could not subscribe"))?;
            let out = out.clone();
            sub.handle(CONSUMER_CONCURRENCY, move |msg: Message| {
                let out = out.clone();
                async move {
                    let p: Payment = msg.json().map_err(HandlerError::reject)?;
                    out.report(Event::Handled {
                        group: group.to_string(),
                        order: p.order,
                        key: p.customer,
                        seq: p.seq,
                        attempt: msg.attempt(),
                    })
                    .await
                    .map_err(HandlerError::retry)
                }
            })
            .await;
            std::future::pending().await
        }
    }
}

/// Accounts: deducts a checkout's amount, answers the new balance.
fn debit(balances: &Mutex<HashMap<String, u64>>, payload: &Bytes) -> Result<Bytes, HandlerError> {
    let d: Debit = serde_json::from_slice(payload).map_err(HandlerError::reject)?;
    let mut balances = balances.lock().unwrap_or_else(PoisonError::into_inner);
    let balance = balances
        .entry(d.customer.clone())
        .or_insert(OPENING_BALANCE);
    let Some(left) = balance.checked_sub(d.amount_cents) else {
        return Err(HandlerError::reject(format!(
            "{}: insufficient funds",
            d.customer
        )));
    };
    *balance = left;
    Ok(Bytes::from(left.to_string()))
}

/// Payments: waits for the cast, runs the checkouts, then keeps reporting.
async fn pay(args: &ServiceArgs, node: &Node, out: &Reporter) -> Result<()> {
    let watcher = watch(node.clone(), out.clone());
    tokio::pin!(watcher);
    let load = async {
        for (service, count) in CAST {
            if !node
                .wait_for_instances(service, count, DISCOVERY_TIMEOUT)
                .await
            {
                bail!(
                    "payments did not see {count} instance(s) of {service} within {}s",
                    DISCOVERY_TIMEOUT.as_secs()
                );
            }
        }
        // Connected instances are counted from their handshake; a consumer that subscribed
        // just after it announces its group a moment later. Let those announcements land, so
        // the first payment already has a copy for every group.
        tokio::time::sleep(SETTLE).await;
        checkouts(args, node, out).await
    };
    tokio::select! {
        r = load => r?,
        r = &mut watcher => return r,
    }
    watcher.await
}

/// `--rate` checkouts a second for `--duration`, one after the other so each customer's
/// payments are published in order.
async fn checkouts(args: &ServiceArgs, node: &Node, out: &Reporter) -> Result<()> {
    let rate = args.rate.max(1);
    out.report(Event::LoadStarted { rate }).await?;
    let end = Instant::now() + args.duration;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut seqs: HashMap<String, u64> = HashMap::new();
    let mut order = 0u64;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        order += 1;
        let customer = format!("customer-{}", order % CUSTOMERS);
        let amount_cents = 100 + order * 37 % 9_900;
        let event = match checkout(node, order, &customer, amount_cents, &mut seqs).await {
            Ok(seq) => Event::Accepted {
                order,
                key: customer,
                seq,
            },
            Err(e) => Event::Declined {
                order,
                reason: format!("{e:#}"),
            },
        };
        out.report(event).await?;
    }
    out.report(Event::LoadDone { checkouts: order }).await
}

/// One checkout: debit synchronously, then publish the outcome keyed by customer. Returns the
/// payment's per-customer sequence once it is durably in the log.
async fn checkout(
    node: &Node,
    order: u64,
    customer: &str,
    amount_cents: u64,
    seqs: &mut HashMap<String, u64>,
) -> Result<u64> {
    let debit = Outgoing::json(&Debit {
        customer: customer.to_string(),
        amount_cents,
    })?;
    node.request("accounts", debit, REQUEST_TIMEOUT)
        .await
        .context("accounts did not debit")?;
    let seq = seqs.get(customer).copied().unwrap_or(0) + 1;
    let payment = Payment {
        order,
        customer: customer.to_string(),
        seq,
        amount_cents,
    };
    let receipt = node
        .publish(TOPIC, Outgoing::json(&payment)?.key(customer))
        .await
        .context("publish failed")?;
    seqs.insert(customer.to_string(), seq);
    // Accepted means durable (fsync'd); the orchestrator checks delivery from the consumers'
    // reports, so the acknowledgements need not be awaited here.
    drop(receipt);
    Ok(seq)
}

/// Reports payments' peers as they come and go, and its group backlogs, until the node stops.
async fn watch(node: Node, out: Reporter) -> Result<()> {
    let mut up: HashMap<NodeId, bool> = HashMap::new();
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(status) = node.status().await else {
            return Ok(());
        };
        for p in &status.peers {
            let now_up = p.state == PeerState::Connected;
            let was_up = up.insert(p.node_id, now_up).unwrap_or(false);
            if now_up != was_up {
                out.report(Event::Peer {
                    service: p.service.clone(),
                    node: p.node_id.short(),
                    up: now_up,
                    why: p.last_error.clone(),
                })
                .await?;
            }
        }
        let logs = status
            .logs
            .iter()
            .filter_map(|(log, s)| {
                Some(Backlog {
                    group: log.strip_prefix("grp:")?.to_string(),
                    waiting: s.waiting,
                    in_flight: s.in_flight,
                })
            })
            .collect();
        out.report(Event::Backlog { logs }).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debit_deducts_and_refuses_overdrafts() {
        let balances = Mutex::new(HashMap::new());
        let req = |amount: u64| {
            Bytes::from(
                serde_json::to_vec(&Debit {
                    customer: "c".into(),
                    amount_cents: amount,
                })
                .expect("encode"),
            )
        };
        let left = debit(&balances, &req(100)).expect("first debit");
        assert_eq!(left, Bytes::from((OPENING_BALANCE - 100).to_string()));
        assert!(debit(&balances, &req(OPENING_BALANCE)).is_err());
        assert!(debit(&balances, &Bytes::from_static(b"not json")).is_err());
    }
}
