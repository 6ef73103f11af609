//! The one-node commands: `keygen`, `node`, `send`, `pub`, `sub`, `req`, `peers`.
//!
//! Each parses nothing itself (clap did), calls the library and prints.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::value_parser;
use peerbus::{MeshKey, Node, Outgoing, PeerInfo, PeerState, Subscription};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::common::{CLI_SERVICE, CommonArgs, UsageError, shutdown_signal};
use crate::output::{counted, message_json, peers_table, print_line, rate, state_name};
use crate::produce::{Batch, Dest};

/// How long `pub` waits for peers before publishing.
const PEERS_WAIT: Duration = Duration::from_secs(2);
/// How long `pub` lets discovery run at least.
const PEERS_MIN: Duration = Duration::from_secs(1);
/// How long the peer list must stay unchanged before `pub` publishes.
const PEERS_SETTLE: Duration = Duration::from_millis(300);

/// `peerbus keygen`.
#[derive(Debug, clap::Args)]
pub(crate) struct KeygenArgs {
    /// File to write the new key to (64 hex characters, mode 0600). An existing file is
    /// never overwritten.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

/// `peerbus node`.
#[derive(Debug, clap::Args)]
pub(crate) struct NodeArgs {
    /// The service this node is an instance of.
    #[arg(long, value_name = "NAME")]
    service: String,
    /// Print each message received as one JSON line on stdout (id, kind, from, service or
    /// topic, key, payload, attempt, redelivered). Messages are acknowledged either way.
    #[arg(long)]
    print: bool,
    /// Also subscribe to topics matching this pattern (repeatable; `*` matches one token, `>`
    /// the rest). `TOPIC@GROUP` joins durable group GROUP; plain `TOPIC` joins the service's
    /// own group. Groups are durable: publishers keep their copies while no member runs.
    #[arg(long, value_name = "TOPIC[@GROUP]")]
    subscribe: Vec<String>,
    /// Answer requests with their own payload.
    #[arg(long)]
    echo: bool,
    /// Serve the admin HTTP endpoint on this address: the live mesh page at `/`, `/status`
    /// (JSON), `/metrics` (Prometheus), `/healthz`. Plain HTTP without authentication: use
    /// loopback, e.g. `127.0.0.1:9090` (port 0 picks a free one; the log says which)
    /// [default: off].
    #[arg(long, env = "PEERBUS_ADMIN", value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,
}

/// `peerbus send`.
#[derive(Debug, clap::Args)]
pub(crate) struct SendArgs {
    /// The service to send to (one instance handles each message).
    service: String,
    #[command(flatten)]
    batch: BatchArgs,
    /// Return once the messages are durably stored (in --data-dir), without waiting for a
    /// consumer. A later `send` (or `node`) with the same --data-dir delivers what is left.
    #[arg(long)]
    no_wait: bool,
}

/// `peerbus pub`.
#[derive(Debug, clap::Args)]
pub(crate) struct PubArgs {
    /// The topic to publish on (each subscriber group gets one copy). `pub` first lets
    /// discovery run for 1 to 2 s: a subscriber group that no connected peer has announced by
    /// then gets no copy.
    topic: String,
    #[command(flatten)]
    batch: BatchArgs,
    /// Return once the copies are stored, without waiting for the groups to acknowledge them.
    #[arg(long)]
    no_wait: bool,
}

/// What `send` and `pub` send.
#[derive(Debug, clap::Args)]
pub(crate) struct BatchArgs {
    /// The payload (text). With --count, `{i}` becomes the message index (from 0) and `{i%M}`
    /// the index modulo M. `-` sends each line of stdin as one message instead, as the lines
    /// arrive (`tail -f app.log | peerbus pub logs -` works), until stdin ends; `{i}` in --key
    /// is then the line's index. A line may hold up to 16 MiB.
    pub(crate) payload: String,
    /// Partition key: messages with one key are handled in order. With --count, `{i}` and
    /// `{i%M}` work as in the payload.
    #[arg(long)]
    pub(crate) key: Option<String>,
    /// Send this many messages (pipelined: they do not wait for each other's acknowledgement).
    #[arg(long, value_name = "N", value_parser = value_parser!(u64).range(1..))]
    pub(crate) count: Option<u64>,
    /// Hand the messages to the node up to B at a time (`send_batch`/`publish_batch`): each
    /// call is stored in one commit, in order, or not at all. At most 1,024 (a call also ends
    /// before it would pass 16 MiB). From stdin, a call takes the lines that have arrived.
    #[arg(long, value_name = "B", default_value_t = 1,
          value_parser = value_parser!(u64).range(1..=peerbus::MAX_BATCH as u64))]
    pub(crate) batch: u64,
    /// How long to wait for a consumer; then how long each message may take to be stored, and
    /// to be acknowledged once stored (e.g. `500ms`, `1m`).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    #[command(flatten)]
    pub(crate) headers: HeaderArgs,
}

/// Headers every message of a `send`, `pub`, `req` or `scatter` carries.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct HeaderArgs {
    /// Add a header (repeatable), for example `-H tenant=acme`: the name is everything before
    /// the first `=`. A `traceparent` given here continues that trace instead of starting one.
    #[arg(short = 'H', long = "header", value_name = "NAME=VALUE", value_parser = parse_header)]
    headers: Vec<(String, String)>,
}

impl HeaderArgs {
    /// `msg` with these headers added, in the order given.
    pub(crate) fn apply(&self, msg: Outgoing) -> Outgoing {
        self.headers
            .iter()
            .fold(msg, |msg, (name, value)| msg.header(name, value))
    }
}

/// A `NAME=VALUE` header: a name that is not empty and has no whitespace or control
/// characters; the value is the rest (it may be empty, or hold more `=`).
fn parse_header(arg: &str) -> Result<(String, String), String> {
    let (name, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("`{arg}` is not NAME=VALUE"))?;
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "`{name}` is not a header name (one or more characters, no spaces)"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "the value of header `{name}` holds a control character"
        ));
    }
    Ok((name.to_string(), value.to_string()))
}

/// `peerbus sub`.
#[derive(Debug, clap::Args)]
pub(crate) struct SubArgs {
    /// Topic pattern (`*` matches one token, `>` the rest).
    topic: String,
    /// Join durable subscriber group G: the group gets one copy of every message (shared with
    /// its other members), and publishers keep its copies while no member runs. Without it the
    /// subscription is ephemeral: online-only copies, nothing kept while `sub` is not running.
    #[arg(long, value_name = "G")]
    group: Option<String>,
    /// Insist on a durable subscription (needs --group).
    #[arg(long, requires = "group")]
    durable: bool,
    /// Exit once N messages were printed and acknowledged (the rest stay with the group or,
    /// for an ephemeral subscription, are not received).
    #[arg(long, value_name = "N", value_parser = value_parser!(u64).range(1..))]
    count: Option<u64>,
}

/// `peerbus req`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReqArgs {
    /// The service to ask.
    service: String,
    /// The request payload (text).
    payload: String,
    /// How long to wait for an instance and its reply together.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The request is safe to repeat: retry on timeouts and lost instances within --timeout.
    #[arg(long)]
    idempotent: bool,
    /// Attempts for an --idempotent request, including the first.
    #[arg(long, value_name = "N", default_value_t = 3, requires = "idempotent")]
    attempts: u32,
    #[command(flatten)]
    headers: HeaderArgs,
}

/// `peerbus scatter`.
#[derive(Debug, clap::Args)]
pub(crate) struct ScatterArgs {
    /// The service whose every instance is asked (or, with --topic, a topic).
    target: String,
    /// The request payload (text).
    payload: String,
    /// Collect replies until this much time has passed.
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    within: Duration,
    /// TARGET is a topic: ask every node subscribed to it.
    #[arg(long)]
    topic: bool,
    /// Stop after this many replies.
    #[arg(long, value_name = "N")]
    count: Option<usize>,
    /// How long to wait for discovery before asking.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = humantime::parse_duration)]
    wait: Duration,
    #[command(flatten)]
    headers: HeaderArgs,
}

/// `peerbus peers`.
#[derive(Debug, clap::Args)]
pub(crate) struct PeersArgs {
    /// Print again every second until Ctrl-C.
    #[arg(long)]
    watch: bool,
    /// Print JSON (one array per line) instead of a table.
    #[arg(long)]
    json: bool,
    /// How long to let discovery run before printing.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = humantime::parse_duration)]
    wait: Duration,
}

/// `peerbus release-group`.
#[derive(Debug, clap::Args)]
pub(crate) struct ReleaseGroupArgs {
    /// The durable subscriber group to release.
    group: String,
    /// How long to look for a node that knows the group.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Writes a new mesh key.
pub(crate) fn keygen(args: &KeygenArgs) -> Result<()> {
    let key = MeshKey::write_new(&args.out)
        .with_context(|| format!("could not write a mesh key to {}", args.out.display()))?;
    print_line(&format!(
        "wrote a new mesh key to {} (fingerprint {})",
        args.out.display(),
        key.fingerprint()
    ))
}

/// Runs a node until Ctrl-C or SIGTERM.
pub(crate) async fn node(common: &CommonArgs, args: &NodeArgs) -> Result<()> {
    let mut builder = common.builder(&args.service)?;
    if let Some(addr) = args.admin {
        builder = builder.admin(addr);
    }
    let node = builder
        .start()
        .await
        .with_context(|| format!("could not start a node for service `{}`", args.service))?;
    info!(node = %node.id(), service = %args.service, mesh = %common.mesh, listen = %node.local_addr(), "node running; Ctrl-C to stop");
    if let Some(addr) = node.admin_addr() {
        info!("live mesh page: http://{addr}/  (also /status, /metrics, /healthz)");
    }
    let reloads = tokio::spawn(reload_on_hangup(node.clone()));
    let result = run_node(&node, args).await;
    reloads.abort();
    node.shutdown().await;
    result
}

/// Reads the node's mesh files (CA files, or its key file) again at every SIGHUP (as
/// `peerbus reload` asks through the control socket), logging what it did with each.
async fn reload_on_hangup(node: Node) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "could not watch SIGHUP: `peerbus reload` still works");
                return;
            }
        };
        while hangups.recv().await.is_some() {
            match node.reload_mesh_files().await {
                Ok(r) => info!(files = %r, "SIGHUP: read the mesh files again"),
                Err(e) => warn!(error = %e, "SIGHUP: nothing to read again"),
            }
        }
    }
    #[cfg(not(unix))]
    drop(node);
}

async fn run_node(node: &Node, args: &NodeArgs) -> Result<()> {
    let handled = Arc::new(AtomicU64::new(0));
    let mut receivers = JoinSet::new();
    let inbox = node
        .messages()
        .context("could not take the service inbox")?;
    receivers.spawn(receive(inbox, args.print, handled.clone(), None));
    for spec in &args.subscribe {
        let sub = match spec.split_once('@') {
            Some((topic, group)) => node.subscribe_group(topic, group).await,
            None => node.subscribe(spec).await,
        }
        .with_context(|| format!("could not subscribe to `{spec}`"))?;
        receivers.spawn(receive(sub, args.print, handled.clone(), None));
    }
    let _serving = if args.echo {
        Some(
            node.serve(|req| async move { Ok(req.payload().clone()) })
                .await
                .context("could not serve requests")?,
        )
    } else {
        None
    };
    let result = until_signal(&mut receivers, &handled).await;
    info!(handled = handled.load(Ordering::Relaxed), "stopping");
    result
}

/// Waits for Ctrl-C or SIGTERM, or for a receiver that took all it was asked to, logging
/// progress; fails early if a receiver fails (for example because stdout was closed).
async fn until_signal(
    receivers: &mut JoinSet<Result<Received>>,
    handled: &AtomicU64,
) -> Result<()> {
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut last = 0;
    loop {
        tokio::select! {
            r = &mut signal => return r,
            Some(r) = receivers.join_next() => {
                match r.context("a receiver task panicked")?? {
                    Received::Enough => return Ok(()),
                    Received::Stopped => bail!("the node stopped receiving"),
                }
            }
            _ = tick.tick() => {
                let n = handled.load(Ordering::Relaxed);
                if n != last {
                    info!(handled = n, "messages acknowledged");
                    last = n;
                }
            }
        }
    }
}

/// Why a receiver ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum Received {
    /// It took as many messages as it was asked to.
    Enough,
    /// The node stopped delivering.
    Stopped,
}

/// Takes messages until the node stops, or until `limit` of them were taken: prints each one
/// (with `print`), then acknowledges it.
async fn receive(
    mut sub: Subscription,
    print: bool,
    handled: Arc<AtomicU64>,
    limit: Option<u64>,
) -> Result<Received> {
    let mut taken = 0;
    while let Some(delivery) = sub.next().await {
        if print {
            // On error the delivery is dropped unacknowledged, so it will be redelivered.
            print_line(&message_json(&delivery).to_string())?;
        }
        delivery.ack().await;
        handled.fetch_add(1, Ordering::Relaxed);
        taken += 1;
        if limit.is_some_and(|n| taken >= n) {
            return Ok(Received::Enough);
        }
    }
    Ok(Received::Stopped)
}

/// Sends to a service and waits for every acknowledgement.
pub(crate) async fn send(common: &CommonArgs, args: &SendArgs) -> Result<()> {
    if args.no_wait && common.data_dir.is_none() {
        return Err(UsageError(
            "--no-wait needs --data-dir: without one, stored messages die with this process".into(),
        )
        .into());
    }
    let batch = Batch::new(&args.batch)?;
    let node = common.start(CLI_SERVICE).await?;
    let result = if args.no_wait {
        store_batch(&node, &args.service, batch).await
    } else {
        send_batch(&node, &args.service, batch).await
    };
    if let Ok(summary) = &result {
        print_line(summary)?;
    }
    node.shutdown().await;
    result.map(drop)
}

/// `send --no-wait`: store durably and return.
async fn store_batch(node: &Node, service: &str, batch: Batch) -> Result<String> {
    let sent = batch
        .run(node, Dest::Service(service), false, &format!("`{service}`"))
        .await?;
    let waiting = log_backlog(node, service).await;
    Ok(format!(
        "stored {} for {service} ({waiting} waiting in the log); a later run with the \
         same --data-dir delivers them{}",
        counted(sent.messages, "message", "messages"),
        sent.cut_short()
    ))
}

/// Entries of `service`'s log not yet acknowledged.
async fn log_backlog(node: &Node, service: &str) -> usize {
    node.status()
        .await
        .and_then(|s| {
            s.logs
                .get(&format!("svc:{service}"))
                .map(|l| l.waiting + l.in_flight)
        })
        .unwrap_or(0)
}

async fn send_batch(node: &Node, service: &str, batch: Batch) -> Result<String> {
    let timeout = batch.timeout;
    if !node.wait_for_consumers(service, 1, timeout).await {
        return Err(no_instance_error(node, service, timeout).await);
    }
    let sent = batch
        .run(node, Dest::Service(service), true, &format!("`{service}`"))
        .await?;
    // Entries an earlier run left in this data directory are delivered too: wait for them.
    let deadline = Instant::now() + timeout;
    let mut leftover = log_backlog(node, service).await;
    let earlier = leftover;
    while leftover > 0 {
        if Instant::now() >= deadline {
            bail!("{leftover} entries left by an earlier run are still waiting for `{service}`");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        leftover = log_backlog(node, service).await;
    }
    let also = if earlier > 0 {
        format!(" (and {earlier} left by an earlier run)")
    } else {
        String::new()
    };
    Ok(format!(
        "sent {} to {service}{also}, all acknowledged in {}{}",
        counted(sent.copies, "message", "messages"),
        rate(sent.copies, sent.elapsed),
        sent.cut_short()
    ))
}

/// Publishes to a topic and waits for every acknowledgement.
pub(crate) async fn publish(common: &CommonArgs, args: &PubArgs) -> Result<()> {
    let batch = Batch::new(&args.batch)?;
    let node = common.start(CLI_SERVICE).await?;
    let result = publish_batch(&node, &args.topic, batch, args.no_wait).await;
    if let Ok(summary) = &result {
        print_line(summary)?;
    }
    node.shutdown().await;
    result.map(drop)
}

async fn publish_batch(node: &Node, topic: &str, batch: Batch, no_wait: bool) -> Result<String> {
    // Subscriber groups are learnt from connected peers (their hello carries their
    // interests), so give discovery a moment.
    let wait = batch.timeout.min(PEERS_WAIT);
    if !wait_for_peers(node, wait).await {
        warn!(
            "no peer connected within {}; publishing anyway",
            fmt_dur(wait)
        );
    }
    let sent = batch
        .run(node, Dest::Topic(topic), !no_wait, "subscriber groups")
        .await?;
    let n = sent.messages;
    if no_wait {
        return Ok(format!(
            "published {} to {topic}: {} stored{}",
            counted(n, "message", "messages"),
            counted(sent.copies, "group copy", "group copies"),
            sent.cut_short()
        ));
    }
    if sent.copies == 0 {
        warn!(topic, "no subscriber group is known for this topic");
        return Ok(format!(
            "published {} to {topic}: no subscriber group is known, nothing was stored{}",
            counted(n, "message", "messages"),
            sent.cut_short()
        ));
    }
    Ok(format!(
        "published {} to {topic} as {}, all acknowledged in {}{}",
        counted(n, "message", "messages"),
        counted(sent.copies, "group copy", "group copies"),
        rate(sent.copies, sent.elapsed),
        sent.cut_short()
    ))
}

/// Subscribes and prints every message as a JSON line until Ctrl-C or SIGTERM.
pub(crate) async fn sub(common: &CommonArgs, args: &SubArgs) -> Result<()> {
    let node = common.start(CLI_SERVICE).await?;
    let result = async {
        let sub = match &args.group {
            Some(group) => node.subscribe_group(&args.topic, group).await,
            None => node.subscribe_ephemeral(&args.topic).await,
        }
        .with_context(|| format!("could not subscribe to `{}`", args.topic))?;
        let handled = Arc::new(AtomicU64::new(0));
        let mut receivers = JoinSet::new();
        receivers.spawn(receive(sub, true, handled.clone(), args.count));
        until_signal(&mut receivers, &handled).await
    }
    .await;
    node.shutdown().await;
    result
}

/// How long `req`, once it found instances of a service, waits for one of them to say that
/// it serves (each says so just after it connects) before it sends the request anyway.
const SERVE_WORD: Duration = Duration::from_secs(1);

/// Sends one request and prints the reply.
pub(crate) async fn req(common: &CommonArgs, args: &ReqArgs) -> Result<()> {
    let node = common.start(CLI_SERVICE).await?;
    let result = async {
        let deadline = Instant::now() + args.timeout;
        if !node
            .wait_for_instances(&args.service, 1, args.timeout)
            .await
        {
            return Err(no_instance_error(&node, &args.service, args.timeout).await);
        }
        // An instance that serves says so right after it connects: give that word a moment
        // to arrive before a request could take "no responders" for an answer.
        let left = deadline.saturating_duration_since(Instant::now());
        node.wait_for_servers(&args.service, 1, SERVE_WORD.min(left))
            .await;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let mut opts = peerbus::RequestOptions::new(left);
        if args.idempotent {
            opts = opts.idempotent().max_attempts(args.attempts);
        }
        let msg = args.headers.apply(Outgoing::new(args.payload.clone()));
        let reply = node.request_with(&args.service, msg, opts).await?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }
    .await;
    if let Ok(reply) = &result {
        print_line(reply)?;
    }
    node.shutdown().await;
    result.map(drop)
}

/// Asks every instance (or topic subscriber) and prints each reply.
pub(crate) async fn scatter(common: &CommonArgs, args: &ScatterArgs) -> Result<()> {
    let node = common.start(CLI_SERVICE).await?;
    let result = async {
        // Every instance should be asked: let discovery settle first.
        wait_for_peers(&node, args.wait).await;
        let t0 = Instant::now();
        let msg = args.headers.apply(Outgoing::new(args.payload.clone()));
        let replies = if args.topic {
            node.scatter_topic(&args.target, msg, args.within, args.count)
                .await
        } else {
            node.scatter(&args.target, msg, args.within, args.count)
                .await
        }?;
        for r in &replies {
            match &r.result {
                Ok(b) => print_line(&format!(
                    "{}: {}",
                    r.from.short(),
                    String::from_utf8_lossy(b)
                ))?,
                Err(e) => print_line(&format!("{}: error: {e}", r.from.short()))?,
            }
        }
        let ok = replies.iter().filter(|r| r.result.is_ok()).count();
        print_line(&format!(
            "{} replies ({ok} ok) from {} within {} ms",
            replies.len(),
            args.target,
            t0.elapsed().as_millis()
        ))?;
        if replies.is_empty() {
            bail!(
                "no reply from `{}` within {}",
                args.target,
                fmt_dur(args.within)
            );
        }
        Ok(())
    }
    .await;
    node.shutdown().await;
    result
}

/// Prints the peers an ephemeral node finds.
pub(crate) async fn peers(common: &CommonArgs, args: &PeersArgs) -> Result<()> {
    let node = common.start(CLI_SERVICE).await?;
    let result = async {
        tokio::time::sleep(args.wait).await;
        print_peers(&node.peers().await, args.json)?;
        if !args.watch {
            return Ok(());
        }
        let signal = shutdown_signal();
        tokio::pin!(signal);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                r = &mut signal => return r,
                _ = tick.tick() => {
                    if !args.json {
                        print_line("")?;
                    }
                    print_peers(&node.peers().await, args.json)?;
                }
            }
        }
    }
    .await;
    node.shutdown().await;
    result
}

/// Releases a durable group (see [`ReleaseGroupArgs`]) and says what happened.
pub(crate) async fn release_group(common: &CommonArgs, args: &ReleaseGroupArgs) -> Result<()> {
    let node = common.start(CLI_SERVICE).await?;
    let result = release(&node, &args.group, args.timeout).await;
    if let Ok(summary) = &result {
        print_line(summary)?;
    }
    // Shutdown waits until the peers acknowledged the release.
    node.shutdown().await;
    result.map(drop)
}

/// How often `release-group` looks whether a peer told it of the group.
const GROUP_POLL: Duration = Duration::from_millis(50);
/// Least time `release-group` waits, after releasing, for a node still subscribed to the
/// group to bring it back (its answer takes a round trip). It waits [`GROUP_COMEBACK_RTTS`]
/// round trips of the slowest connected peer when that is longer, at most
/// [`GROUP_COMEBACK_MAX`], so a slow link or a busy machine does not miss the answer.
const GROUP_COMEBACK: Duration = Duration::from_secs(1);
/// Round trips of the slowest connected peer `release-group` waits for a comeback.
const GROUP_COMEBACK_RTTS: f64 = 10.0;
/// Most time `release-group` waits for a comeback.
const GROUP_COMEBACK_MAX: Duration = Duration::from_secs(5);

async fn release(node: &Node, group: &str, timeout: Duration) -> Result<String> {
    // A node learns every group's state from each peer it connects to. Releasing a group
    // before that would make a release older than the state the mesh holds, which loses.
    let deadline = Instant::now() + timeout;
    let known = loop {
        if let Some(state) = node.groups().await.remove(group) {
            break state;
        }
        if Instant::now() >= deadline {
            bail!(
                "no node this one reached knows durable group `{group}` ({} connected within \
                 {}): nothing to release",
                connected(node).await,
                fmt_dur(timeout)
            );
        }
        tokio::time::sleep(GROUP_POLL).await;
    };
    if known.is_released() {
        return Ok(format!(
            "durable group {group} is already released (version {})",
            known.version
        ));
    }
    node.unsubscribe_group(group)
        .await
        .with_context(|| format!("could not release durable group `{group}`"))?;
    let slowest_ms = node
        .peers()
        .await
        .iter()
        .filter_map(|p| p.rtt_ms)
        .fold(0.0, f64::max);
    let wait = Duration::try_from_secs_f64(slowest_ms * GROUP_COMEBACK_RTTS / 1000.0)
        .unwrap_or(GROUP_COMEBACK_MAX)
        .clamp(GROUP_COMEBACK, GROUP_COMEBACK_MAX);
    let until = Instant::now() + wait;
    let now = loop {
        let now = node.groups().await.remove(group).unwrap_or_default();
        if !now.is_released() || Instant::now() >= until {
            break now;
        }
        tokio::time::sleep(GROUP_POLL).await;
    };
    if !now.is_released() {
        bail!(
            "durable group `{group}` is still subscribed by a running node (it came back as \
             version {} on {}): stop its subscribers, then release it",
            now.version,
            now.patterns.join(", ")
        );
    }
    let told = connected(node).await;
    Ok(format!(
        "released durable group {group} (version {}): told {}; publishers drop the copies they \
         kept for it",
        now.version,
        counted(told as u64, "connected node", "connected nodes")
    ))
}

/// How many peers are connected.
async fn connected(node: &Node) -> usize {
    node.peers()
        .await
        .iter()
        .filter(|p| p.state == PeerState::Connected)
        .count()
}

fn print_peers(peers: &[PeerInfo], json: bool) -> Result<()> {
    if json {
        print_line(&serde_json::to_string(peers).context("could not encode peers as JSON")?)
    } else {
        print_line(peers_table(peers).trim_end())
    }
}

/// Waits (at most `max`) until a peer is connected, [`PEERS_MIN`] has passed and the peer list
/// has been quiet for [`PEERS_SETTLE`]: no peer still being dialed, no new connection. The
/// peers answering the first mDNS query are then connected and their subscriber groups known
/// (one early answer, e.g. to an earlier query, can come well before the rest). Returns
/// whether any peer is connected.
async fn wait_for_peers(node: &Node, max: Duration) -> bool {
    let start = Instant::now();
    let deadline = start + max;
    let mut connected = 0;
    let mut changed = Instant::now();
    loop {
        let peers = node.peers().await;
        let now = Instant::now();
        let n = peers
            .iter()
            .filter(|p| p.state == PeerState::Connected)
            .count();
        if n != connected {
            connected = n;
            changed = now;
        }
        let dialing = peers
            .iter()
            .any(|p| matches!(p.state, PeerState::Discovered | PeerState::Connecting));
        let settled = now.duration_since(changed) >= PEERS_SETTLE;
        if connected > 0 && !dialing && settled && now.duration_since(start) >= PEERS_MIN {
            return true;
        }
        if now >= deadline {
            return connected > 0;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Why no instance of `service` was found: a peer refusing our membership, connected nodes of
/// the service that take no messages, or nothing at all.
async fn no_instance_error(node: &Node, service: &str, waited: Duration) -> anyhow::Error {
    let peers = node.peers().await;
    let waited = fmt_dur(waited);
    let refusing: Vec<&PeerInfo> = peers.iter().filter(|p| refuses_membership(p)).collect();
    if let Some(p) = refusing.first() {
        let reason = refusal_reason(p);
        // A revoked node is told so by the reason itself (with what to do about it).
        let advice = if peerbus::says_revoked(reason) {
            ""
        } else {
            "; use the mesh's key file (--mesh-key-file) or a certificate from its CA \
             (--mesh-ca, --mesh-cert)"
        };
        return anyhow!(
            "peer refused: mesh membership refused: {} peer(s) of mesh \"{}\" do not accept \
             this node as a member, and no instance of service \"{service}\" was reachable \
             within {waited}{advice}; for example {} of service \"{}\": {reason}",
            refusing.len(),
            node.mesh(),
            p.node_id.short(),
            p.service,
        );
    }
    if let Some(p) = peers.iter().find(|p| p.state == PeerState::Refused) {
        return anyhow!(
            "peer refused: {} (peer {} of service \"{}\"); no instance of service \
             \"{service}\" found within {waited}",
            refusal_reason(p),
            p.node_id.short(),
            p.service,
        );
    }
    let idle = peers
        .iter()
        .filter(|p| p.service == service && p.state == PeerState::Connected)
        .count();
    if idle > 0 {
        return anyhow!(
            "no instance of service \"{service}\" takes messages: {idle} node(s) of it are \
             connected but none took its messages stream within {waited}"
        );
    }
    let mut msg = format!("no instance of service \"{service}\" found within {waited}");
    let unreachable: Vec<&PeerInfo> = peers.iter().filter(|p| p.service == service).collect();
    if let Some(p) = unreachable.first() {
        msg.push_str(&format!(
            " ({} discovered but {}{})",
            unreachable.len(),
            state_name(p),
            p.last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    anyhow!(msg)
}

/// Why `peer` refused this node, as its last error says.
fn refusal_reason(peer: &PeerInfo) -> &str {
    let reason = peer.last_error.as_deref().unwrap_or("no reason given");
    reason.strip_prefix("peer refused: ").unwrap_or(reason)
}

fn refuses_membership(peer: &PeerInfo) -> bool {
    let error = peer
        .last_error
        .as_deref()
        .unwrap_or_default()
        .to_lowercase();
    error.contains("mesh key") || error.contains("mesh proof") || error.contains("membership")
}

fn fmt_dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::parse_header;

    #[test]
    fn a_header_is_split_at_its_first_equals_sign() {
        let ok = |n: &str, v: &str| Ok((n.to_string(), v.to_string()));
        assert_eq!(parse_header("tenant=acme"), ok("tenant", "acme"));
        assert_eq!(parse_header("q=a=b"), ok("q", "a=b"));
        assert_eq!(parse_header("flag="), ok("flag", ""));
        for bad in [
            "tenant",
            "=acme",
            "two words=x",
            "tab\there=x",
            "x=line\nbreak",
        ] {
            let err = parse_header(bad).expect_err(bad);
            assert!(!err.is_empty(), "{bad}");
        }
    }
}
