//! The peerbus cases: two or more nodes in this process on 127.0.0.1.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use peerbus::{
    Bytes, Durability, HandlerError, Interfaces, MemoryNetwork, MeshKey, Node, NodeBuilder,
    Outgoing, Receipt, SendError,
};

/// Concurrent callers of `send`/`publish`/`request` in the throughput cases.
pub(crate) const CALLERS: usize = 64;
/// Concurrent callers of `send_batch` in the batch cases.
const BATCH_CALLERS: usize = 8;
/// Handler concurrency of the consumers.
const HANDLER_CONCURRENCY: usize = 8;

/// A two-or-more node mesh in this process: in-memory discovery, QUIC on 127.0.0.1.
pub(crate) struct Mesh {
    net: MemoryNetwork,
    key: MeshKey,
}

impl Mesh {
    pub(crate) fn new() -> Self {
        Self {
            net: MemoryNetwork::new(),
            key: MeshKey::generate(),
        }
    }

    pub(crate) fn node(&self, service: &str) -> Result<NodeBuilder> {
        Ok(Node::builder(service)
            .mesh("bench")
            .mesh_key(self.key.clone())
            .listen("127.0.0.1:0".parse().context("loopback address")?)
            .discovery(self.net.discovery())
            .prefetch(1024))
    }
}

/// A consumer that counts what its handler saw.
fn count_handled(node: &Node) -> Result<Arc<AtomicU64>> {
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    let msgs = node.messages().context("subscribing to messages")?;
    tokio::spawn(msgs.handle(HANDLER_CONCURRENCY, move |_m| {
        counter.fetch_add(1, Ordering::Relaxed);
        async { Ok::<(), HandlerError>(()) }
    }));
    Ok(seen)
}

/// Makes `messages` calls of `call(i)` (a `send`, `send_batch` or `publish`) from `callers`
/// concurrent tasks, each making its calls one after another, then waits until every receipt
/// is acked.
async fn run_callers<F, Fut>(callers: usize, messages: usize, call: F) -> Result<()>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Receipt, SendError>> + Send,
{
    let mut tasks = Vec::with_capacity(callers);
    for caller in 0..callers {
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            // Sized up front: growing it was a fifth of an allocation per message, the
            // bench's own work.
            let mut receipts = Vec::with_capacity(messages.div_ceil(callers));
            for i in (caller..messages).step_by(callers) {
                receipts.push(call(i).await?);
            }
            for r in receipts {
                r.acked().await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("caller task")??;
    }
    Ok(())
}

/// The figures of a send case.
pub(crate) struct SendFigures {
    pub(crate) msgs_per_s: f64,
    /// CPU time (user + system, every thread of this process) per message: unlike the rate,
    /// it barely moves when other work shares the machine.
    pub(crate) cpu_us_per_msg: f64,
    /// UDP payload bytes both ways between the two nodes (QUIC's count) per message: the
    /// envelope, acks and QUIC's own overhead on top of the payload. Unlike the rate, it does
    /// not move with the machine's speed.
    pub(crate) wire_bytes_per_msg: f64,
    /// UDP datagrams both ways per message: how many messages (and acks) QUIC packs into a
    /// packet. Like the bytes, it does not move with the machine's speed.
    pub(crate) datagrams_per_msg: f64,
    pub(crate) fsyncs: u64,
    /// The sender's store checkpoints during the run: entries they wrote to the database,
    /// their time, and the entries they carried over to the next side-log file instead.
    pub(crate) checkpointed_entries: u64,
    pub(crate) checkpoint_time: Duration,
    pub(crate) carried_entries: u64,
    /// Messages sent.
    pub(crate) messages: usize,
}

/// UDP payload bytes and datagrams `node` exchanged with all its peers so far, both ways.
async fn wire(node: &Node) -> Wire {
    node.status().await.map_or(Wire::default(), |s| {
        s.peers.iter().fold(Wire::default(), |w, p| {
            let t = Wire::of(&p.traffic);
            Wire {
                bytes: w.bytes + t.bytes,
                datagrams: w.datagrams + t.datagrams,
            }
        })
    })
}

/// What [`wire`] counts.
#[derive(Clone, Copy, Default)]
pub(crate) struct Wire {
    /// UDP payload bytes, both ways.
    pub(crate) bytes: u64,
    /// UDP datagrams, both ways.
    pub(crate) datagrams: u64,
}

impl Wire {
    /// What one connection's QUIC counters say, both ways.
    pub(crate) fn of(t: &peerbus::Traffic) -> Self {
        Self {
            bytes: t.bytes_sent + t.bytes_received,
            datagrams: t.datagrams_sent + t.datagrams_received,
        }
    }

    /// What was exchanged since `before`, per message of `messages`: (bytes, datagrams).
    pub(crate) fn per_message(self, before: Wire, messages: f64) -> (f64, f64) {
        (
            self.bytes.saturating_sub(before.bytes) as f64 / messages,
            self.datagrams.saturating_sub(before.datagrams) as f64 / messages,
        )
    }
}

/// CPU time this process has used so far (user + system, all threads).
pub(crate) fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the pointer it is given, which points to
    // zeroed memory of that type; RUSAGE_SELF is always a valid `who`.
    #[allow(unsafe_code)]
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return Duration::ZERO;
        }
        usage.assume_init()
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// `messages` sends of `size` bytes from one node to another, each acknowledged by the
/// receiver's handler: messages/s from the first send to the last ack. With `batch` 1, from
/// [`CALLERS`] callers of `send` at a time; with more, from [`BATCH_CALLERS`] callers of
/// `send_batch`, `batch` messages per call. Message `i` has key `k{i % keys}`.
pub(crate) async fn send(
    durability: Durability,
    size: usize,
    messages: usize,
    (batch, keys): (usize, usize),
    dir: &Path,
) -> Result<SendFigures> {
    let mesh = Mesh::new();
    let mut builder = mesh.node("payments")?.durability(durability);
    if durability != Durability::Memory {
        builder = builder.data_dir(dir);
    }
    let sender = builder.start().await.context("starting the sender")?;
    let receiver = mesh
        .node("orders")?
        .start()
        .await
        .context("starting the receiver")?;
    count_handled(&receiver)?;
    if !sender
        .wait_for_consumers("orders", 1, Duration::from_secs(10))
        .await
    {
        bail!("the receiver was never discovered");
    }
    let payload = Bytes::from(vec![0x42u8; size]);
    // The keys are made once: formatting one per message was two of the run's seven and a
    // half allocations per message, work of the bench rather than of the send.
    let keys: Arc<[String]> = (0..keys.max(1)).map(|k| format!("k{k}")).collect();
    let msg = move |i: usize| Outgoing::new(payload.clone()).key(&keys[i % keys.len()]);
    let before = sender.store_stats();
    let wire0 = wire(&sender).await;
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let callers = sender.clone();
    if batch <= 1 {
        run_callers(CALLERS, messages, move |i| {
            let sender = callers.clone();
            let msg = msg(i);
            async move { sender.send("orders", msg).await }
        })
        .await?;
    } else {
        let calls = messages.div_ceil(batch);
        run_callers(BATCH_CALLERS, calls, move |call| {
            let sender = callers.clone();
            let first = call * batch;
            let batch: Vec<Outgoing> = (first..(first + batch).min(messages)).map(&msg).collect();
            async move { sender.send_batch("orders", batch).await }
        })
        .await?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu0);
    let after = sender.store_stats();
    let (wire_bytes_per_msg, datagrams_per_msg) =
        wire(&sender).await.per_message(wire0, messages as f64);
    sender.shutdown().await;
    receiver.shutdown().await;
    Ok(SendFigures {
        msgs_per_s: messages as f64 / secs,
        cpu_us_per_msg: cpu.as_secs_f64() * 1e6 / messages as f64,
        wire_bytes_per_msg,
        datagrams_per_msg,
        fsyncs: after.fsyncs - before.fsyncs,
        checkpointed_entries: after.checkpointed_entries - before.checkpointed_entries,
        checkpoint_time: Duration::from_micros(after.checkpoint_micros - before.checkpoint_micros),
        carried_entries: after.carried_entries - before.carried_entries,
        messages,
    })
}

/// `messages` publishes of `size` bytes to `groups` subscriber groups on other nodes:
/// copies/s (messages/s × groups) until every copy was acknowledged, and the CPU time (every
/// node of the mesh, as for sends) and the publisher's wire bytes both ways per copy.
pub(crate) async fn publish(groups: usize, size: usize, messages: usize) -> Result<SendFigures> {
    let mesh = Mesh::new();
    let publisher = mesh
        .node("pub")?
        .start()
        .await
        .context("starting the publisher")?;
    let mut subscribers = Vec::new();
    for g in 0..groups {
        let n = mesh
            .node(&format!("group{g}"))?
            .start()
            .await
            .context("starting a subscriber")?;
        let s = n.subscribe("bench.>").await.context("subscribing")?;
        tokio::spawn(s.handle(HANDLER_CONCURRENCY, |_m| async {
            Ok::<(), HandlerError>(())
        }));
        subscribers.push(n);
    }
    let payload = Bytes::from(vec![0x42u8; size]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = publisher.publish("bench.warmup", payload.clone()).await?;
        if r.copies() == groups {
            r.acked().await?;
            break;
        }
        if Instant::now() > deadline {
            bail!("the publisher never learnt all {groups} groups");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wire0 = wire(&publisher).await;
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let callers = publisher.clone();
    run_callers(CALLERS, messages, move |_| {
        let p = callers.clone();
        let payload = payload.clone();
        async move { p.publish("bench.tick", payload).await }
    })
    .await?;
    let copies = (messages * groups) as f64;
    let rate = copies / t0.elapsed().as_secs_f64();
    let cpu_us = cpu_time().saturating_sub(cpu0).as_secs_f64() * 1e6 / copies;
    let (wire_bytes_per_msg, datagrams_per_msg) = wire(&publisher).await.per_message(wire0, copies);
    publisher.shutdown().await;
    for n in subscribers {
        n.shutdown().await;
    }
    Ok(SendFigures {
        msgs_per_s: rate,
        cpu_us_per_msg: cpu_us,
        wire_bytes_per_msg,
        datagrams_per_msg,
        fsyncs: 0,
        checkpointed_entries: 0,
        checkpoint_time: Duration::ZERO,
        carried_entries: 0,
        messages: messages * groups,
    })
}

/// Two nodes for the request/reply cases: `client` and an `echo` service that answers every
/// request with its payload, after `work` of CPU time spent in the handler (none for the
/// latency cases).
pub(crate) struct Echo {
    client: Node,
    server: Node,
    /// A second client whose sends are `Durability::Fsync`, in its own data directory: for
    /// [`Echo::durable_acks`]. Started when [`Echo::start`] is given a directory.
    durable: Option<Node>,
}

impl Echo {
    /// Starts both nodes and waits until the client's requests are answered and its sends
    /// have a consumer (the server also takes the `echo` service's messages, acknowledging
    /// each at once), then warms both paths with `warm` requests and `warm` sends.
    /// With `durable_dir`, also starts [`Echo::durable`] there and warms it with `warm`
    /// sends.
    pub(crate) async fn start(
        warm: usize,
        work: Duration,
        durable_dir: Option<&Path>,
    ) -> Result<Self> {
        let mesh = Mesh::new();
        let server = mesh
            .node("echo")?
            .start()
            .await
            .context("starting the server")?;
        server
            .serve(move |r| async move {
                // Busy, not asleep: a handler that computes its answer before it returns.
                let t = Instant::now();
                while t.elapsed() < work {
                    std::hint::spin_loop();
                }
                Ok(r.payload().clone())
            })
            .await
            .context("serving")?;
        let messages = server.messages().context("subscribing to messages")?;
        tokio::spawn(messages.handle(1, |_m| async { Ok::<(), HandlerError>(()) }));
        let client = mesh
            .node("client")?
            .start()
            .await
            .context("starting the client")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while client
            .request("echo", "warm", Duration::from_millis(500))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("the echo service never answered");
            }
        }
        if !client
            .wait_for_consumers("echo", 1, Duration::from_secs(20))
            .await
        {
            bail!("the echo service never took its messages");
        }
        let durable = match durable_dir {
            Some(dir) => {
                let node = mesh
                    .node("durable-client")?
                    .durability(Durability::Fsync)
                    .data_dir(dir)
                    .start()
                    .await
                    .context("starting the durable client")?;
                if !node
                    .wait_for_consumers("echo", 1, Duration::from_secs(20))
                    .await
                {
                    bail!("the echo service never took the durable client's messages");
                }
                Some(node)
            }
            None => None,
        };
        let echo = Self {
            client,
            server,
            durable,
        };
        echo.rounds(warm).await?;
        echo.acks(warm).await?;
        echo.durable_acks(warm).await?;
        Ok(echo)
    }

    /// Latencies of `rounds` sends (`Durability::Fsync`, 4 bytes) from the durable client,
    /// one after another, each from the call until its receipt says the handler acknowledged
    /// it: what [`Echo::acks`] measures, plus the fsync of the entry (and whatever else the
    /// sender's store writer does meanwhile). Empty without a durable client.
    pub(crate) async fn durable_acks(&self, rounds: usize) -> Result<Vec<Duration>> {
        let Some(node) = &self.durable else {
            return Ok(Vec::new());
        };
        acks_from(node, rounds).await
    }

    /// Latencies of `rounds` sends (`Durability::Memory`, 4 bytes), one after another, each
    /// from the call until its receipt says the handler acknowledged it: the round trip of the
    /// delivery path, as [`Echo::rounds`] is of the request path.
    pub(crate) async fn acks(&self, rounds: usize) -> Result<Vec<Duration>> {
        acks_from(&self.client, rounds).await
    }

    /// The fsyncs the durable client's store has made so far (0 without one).
    pub(crate) fn durable_fsyncs(&self) -> u64 {
        self.durable.as_ref().map_or(0, |n| n.store_stats().fsyncs)
    }

    /// Latencies of `rounds` requests, one after another.
    pub(crate) async fn rounds(&self, rounds: usize) -> Result<Vec<Duration>> {
        time_each(rounds, || async {
            self.client
                .request("echo", "ping", Duration::from_secs(5))
                .await?;
            anyhow::Ok(())
        })
        .await
    }

    /// Requests/s of `total` requests from [`CALLERS`] concurrent callers.
    pub(crate) async fn throughput(&self, total: usize) -> Result<f64> {
        let t0 = Instant::now();
        let mut tasks = Vec::with_capacity(CALLERS);
        for caller in 0..CALLERS {
            let client = self.client.clone();
            tasks.push(tokio::spawn(async move {
                for _ in (caller..total).step_by(CALLERS) {
                    client
                        .request("echo", "ping", Duration::from_secs(5))
                        .await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await.context("caller task")??;
        }
        Ok(total as f64 / t0.elapsed().as_secs_f64())
    }

    pub(crate) async fn shutdown(self) {
        self.client.shutdown().await;
        if let Some(node) = self.durable {
            node.shutdown().await;
        }
        self.server.shutdown().await;
    }
}

/// Latencies of `rounds` 4-byte sends from `node` to the `echo` service, one after another,
/// each from the call until its receipt says the handler acknowledged it.
async fn acks_from(node: &Node, rounds: usize) -> Result<Vec<Duration>> {
    time_each(rounds, || async {
        node.send("echo", "ping").await?.acked().await?;
        anyhow::Ok(())
    })
    .await
}

/// How long each of `rounds` calls of `call` took, one after another.
async fn time_each<F, Fut>(rounds: usize, mut call: F) -> Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut lat = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        call().await?;
        lat.push(t.elapsed());
    }
    Ok(lat)
}

/// The figures of the backlog case.
pub(crate) struct BacklogFigures {
    pub(crate) drain_seconds: f64,
    pub(crate) disk_bytes_per_entry: f64,
}

/// `entries` sends of `size` bytes to a service with no instance yet (buffered durably in the
/// sender's log), then its receiver starts: seconds until every entry was handled, and the
/// sender's store size per buffered entry.
pub(crate) async fn backlog(entries: usize, size: usize, dir: &Path) -> Result<BacklogFigures> {
    let mesh = Mesh::new();
    let sender = mesh
        .node("payments")?
        .data_dir(dir)
        .durability(Durability::Fsync)
        .start()
        .await
        .context("starting the sender")?;
    let payload = Bytes::from(vec![0x42u8; size]);
    let empty = sender.store_stats().file_bytes;
    let mut tasks = Vec::with_capacity(CALLERS);
    for caller in 0..CALLERS {
        let sender = sender.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            for i in (caller..entries).step_by(CALLERS) {
                let msg = Outgoing::new(payload.clone()).key(format!("k{}", i % 256));
                // The receipt is dropped: the entry stays in the log until handled.
                let _receipt = sender.send("orders", msg).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("sender task")??;
    }
    let full = sender.store_stats().file_bytes;
    let disk_bytes_per_entry = full.saturating_sub(empty) as f64 / entries as f64;

    let t0 = Instant::now();
    let receiver = mesh
        .node("orders")?
        .start()
        .await
        .context("starting the receiver")?;
    let seen = count_handled(&receiver)?;
    let deadline = t0 + Duration::from_secs(120);
    while seen.load(Ordering::Relaxed) < entries as u64 {
        if Instant::now() > deadline {
            bail!(
                "backlog not drained after 120 s: {} of {entries}",
                seen.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drain_seconds = t0.elapsed().as_secs_f64();
    sender.shutdown().await;
    receiver.shutdown().await;
    Ok(BacklogFigures {
        drain_seconds,
        disk_bytes_per_entry,
    })
}

/// Discovery over mDNS on the loopback interface: seconds from a sender node's start until its
/// first message was handled by a peer that started just before it.
pub(crate) async fn discovery() -> Result<f64> {
    let key = MeshKey::generate();
    let mesh_name = format!("bench-{}", std::process::id());
    let node = |service: &str| -> Result<NodeBuilder> {
        Ok(Node::builder(service)
            .mesh(mesh_name.clone())
            .mesh_key(key.clone())
            .listen("127.0.0.1:0".parse().context("loopback address")?)
            .interfaces(Interfaces::Loopback))
    };
    let receiver = node("orders")?
        .start()
        .await
        .context("starting the receiver")?;
    let seen = count_handled(&receiver)?;
    let t0 = Instant::now();
    let sender = node("payments")?
        .start()
        .await
        .context("starting the sender")?;
    let receipt = sender.send("orders", "hello").await?;
    tokio::time::timeout(Duration::from_secs(30), receipt.acked())
        .await
        .context("no delivery within 30 s")??;
    let secs = t0.elapsed().as_secs_f64();
    if seen.load(Ordering::Relaxed) == 0 {
        bail!("acknowledged but never handled");
    }
    sender.shutdown().await;
    receiver.shutdown().await;
    Ok(secs)
}

/// CPU this process uses while two connected nodes in it do nothing, in milliseconds per
/// second over `window`: first with no request in flight, then with `requests` of the
/// client's requests waiting (deadlines of a minute) for a server whose handler holds them.
/// What it shows is the cost of work on core's timer that grows with the requests in flight
/// (ARCHITECTURE, "Requests").
pub(crate) async fn idle_cpu(requests: usize, window: Duration) -> Result<(f64, f64)> {
    let mesh = Mesh::new();
    let client = mesh
        .node("web")?
        .max_requests_in_flight(requests + 1)
        .max_requests_in_flight_per_service(requests + 1)
        .start()
        .await
        .context("starting the client")?;
    let server = mesh
        .node("hold")?
        .serve_concurrency(requests + 1)
        .start()
        .await
        .context("starting the server")?;
    // Every handler waits until this turns true, however late it starts.
    let (release, held) = tokio::sync::watch::channel(false);
    server
        .serve(move |_req| {
            let mut held = held.clone();
            async move {
                let _ = held.wait_for(|go| *go).await;
                Ok(Bytes::from_static(b"done"))
            }
        })
        .await
        .context("serving")?;
    if !client
        .wait_for_instances("hold", 1, Duration::from_secs(10))
        .await
    {
        bail!("the server was never discovered");
    }
    let idle = |window: Duration| async move {
        let (cpu0, t0) = (cpu_time(), Instant::now());
        tokio::time::sleep(window).await;
        cpu_time().saturating_sub(cpu0).as_secs_f64() * 1e3 / t0.elapsed().as_secs_f64()
    };
    let none = idle(window).await;
    let calls: Vec<_> = (0..requests)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.request("hold", "x", Duration::from_secs(60)).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = client.status().await.map_or(0, |s| s.requests_in_flight);
        if n >= requests {
            break;
        }
        if Instant::now() > deadline {
            bail!("{n} of {requests} requests in flight after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The requests' own sends and first polls settle before the window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with = idle(window).await;
    let _ = release.send(true);
    for call in calls {
        let _ = call.await;
    }
    client.shutdown().await;
    server.shutdown().await;
    Ok((none, with))
}

/// Resident memory of an idle `peerbus node` process (this binary), in bytes, after it has
/// run for a moment on loopback with no peers.
pub(crate) async fn idle_rss(dir: &Path) -> Result<u64> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut child = std::process::Command::new(exe)
        .args(["--insecure-open-mesh", "--interface", "loopback"])
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(["node", "--service", "idle"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting an idle node")?;
    let pid = child.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"));
    // Stop the idle node whatever the reading gave.
    let _ = child.kill();
    let _ = child.wait();
    let status = status.context("reading /proc/<pid>/status (Linux only)")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS in /proc/<pid>/status")?;
    Ok(kib * 1024)
}
