//! `peerbus chaos-worker` (hidden): one node of a chaos run, as its own OS process.
//!
//! It builds a node with mDNS off, static seeds and a fault injector, subscribes its service
//! to the chaos topic as a durable group, handles sends to its service, echoes requests to
//! it, and, once the orchestrator's `go` file exists, drives keyed sends and publishes (and
//! requests, when `--request-rate` is above 0) until the `stop` file appears. Everything it
//! sends and handles goes to its journal first; a request's outcome, once it ended.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use peerbus::{
    CloseCounts, DeliveryCounts, Faults, HandlerError, Message, Node, Outgoing, RequestError,
};
use tokio::signal::unix::{SignalKind, signal};

use super::journal::{self, Event, Journal, Payload};
use super::schedule::SplitMix64;

/// The topic every service subscribes to (as a durable group named after the service).
pub(crate) const TOPIC: &str = "chaos.events";
/// File (in the run directory) whose existence starts the workload.
pub(crate) const GO_FILE: &str = "go";
/// File (in the run directory) whose existence stops the workload.
pub(crate) const STOP_FILE: &str = "stop";
/// File a worker creates in its data directory once its workload has stopped.
pub(crate) const STOPPED_FILE: &str = "load-stopped";
/// Longest wait, before the workload (re)starts, for a connection to every service.
const READY_WAIT: Duration = Duration::from_secs(5);
/// Keyed handlers run at once per subscription.
const HANDLER_CONCURRENCY: usize = 8;
/// Most sending tasks per worker (each owns a disjoint set of keys and sends one at a time,
/// so per-key order at the sender is the order of the per-key sequence).
const MAX_SENDERS: usize = 8;

/// Arguments of the hidden `chaos-worker` command (set by `peerbus chaos`).
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// This node's index in the run.
    #[arg(long)]
    index: usize,
    /// Number of services (`svc-0` … `svc-<S-1>`); this node serves `svc-<index % S>`.
    #[arg(long)]
    services: usize,
    /// The run directory (mesh key, go and stop files).
    #[arg(long)]
    run_dir: PathBuf,
    /// This node's data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// QUIC listen address (fixed, so restarts keep it).
    #[arg(long)]
    listen: SocketAddr,
    /// The other nodes' addresses (static seeds).
    #[arg(long = "seed-peer")]
    seed_peers: Vec<SocketAddr>,
    /// Messages per second this worker sends.
    #[arg(long)]
    rate: f64,
    /// Keys per worker (`k0` …).
    #[arg(long)]
    keys: usize,
    /// Share of messages published on the topic instead of sent to a service, in percent.
    #[arg(long)]
    publish_percent: u32,
    /// Requests per second this worker makes (0: none).
    #[arg(long, default_value_t = 0.0)]
    request_rate: f64,
    /// Seed of the workload's choices.
    #[arg(long)]
    seed: u64,
    /// Handler failures on purpose, per thousand handled messages (see `peerbus chaos
    /// --handler-failures`).
    #[arg(long, default_value_t = 0)]
    handler_failures: u32,
    /// Slow handler runs on purpose, per thousand handled messages (see `peerbus chaos
    /// --slow-handlers`).
    #[arg(long, default_value_t = 0)]
    slow_handlers: u32,
    /// How long a slow handler run takes.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "20ms")]
    slow_handler_time: Duration,
    /// The node's ack timeout (see `peerbus chaos --ack-timeout`).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    ack_timeout: Duration,
    /// Test-only misbehaviour, to prove the checker fails: `drop-every=N` acknowledges every
    /// Nth handled message without journaling it (a loss).
    #[arg(long)]
    misbehave: Option<String>,
    /// Start (and resume after a restart) sending at once, without waiting for a connection
    /// to every service first.
    #[arg(long)]
    no_ready_wait: bool,
    /// Serve the admin endpoint and live mesh page here (loopback).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// The highest protocol version this node speaks (default: this build's).
    #[arg(long)]
    max_protocol_version: Option<u32>,
    /// Membership by the run's mesh CA (`<run-dir>/ca/ca.crt`, and this node's certificate
    /// `<data-dir>/node.crt`) instead of the run's mesh key. The files are read again every
    /// second.
    #[arg(long)]
    mesh_ca: bool,
    /// The mesh CA's revocation list file this node reads (again every second); with
    /// `--mesh-ca`.
    #[arg(long, requires = "mesh_ca")]
    mesh_crl: Option<PathBuf>,
}

/// The run's mesh CA directory, in the run directory (`peerbus chaos --mesh-ca`).
pub(crate) const CA_DIR: &str = "ca";
/// A node's certificate from the run's mesh CA, in its data directory.
pub(crate) const NODE_CERT: &str = "node.crt";
/// How often a node of a `--mesh-ca` run reads its CA, certificate and list files again.
const MESH_FILES_EVERY: Duration = Duration::from_secs(1);

/// The service of node `index` in a run with `services` services.
pub(crate) fn service_of(index: usize, services: usize) -> String {
    format!("svc-{}", index % services.max(1))
}

/// Runs the worker until SIGTERM/SIGINT or until its parent (the orchestrator) is gone.
pub(crate) async fn run(a: &WorkerArgs) -> anyhow::Result<()> {
    let drop_every = match a.misbehave.as_deref() {
        None => None,
        Some(m) => match m
            .strip_prefix("drop-every=")
            .and_then(|n| n.parse::<u64>().ok())
        {
            Some(n) if n > 0 => Some(n),
            _ => bail!("unknown --misbehave `{m}` (expected drop-every=N, N > 0)"),
        },
    };
    let service = service_of(a.index, a.services);
    let _ = std::fs::remove_file(a.data_dir.join(STOPPED_FILE));
    let journal = Arc::new(Journal::open(&a.data_dir).context("opening the journal")?);
    let resume = journal::resume(&a.data_dir, a.index).context("reading the journal")?;
    let mut builder = Node::builder(service.clone())
        .mesh("chaos")
        .data_dir(&a.data_dir)
        .listen(a.listen)
        .no_mdns()
        .ack_timeout(a.ack_timeout)
        // Never dead-letter for the count of attempts: with a short `--ack-timeout` a message
        // queued behind slow handlers times out again and again, and a dead letter would be
        // reported lost. (Handlers fail only a message's first attempts.)
        .max_attempts(u32::MAX)
        .faults(Faults::new(a.seed ^ a.index as u64));
    builder = if a.mesh_ca {
        builder
            .mesh_ca_files(
                a.run_dir.join(CA_DIR).join(peerbus::CA_CERT_FILE),
                a.data_dir.join(NODE_CERT),
            )
            .mesh_cert_check_every(MESH_FILES_EVERY)
    } else {
        builder.mesh_key_file(a.run_dir.join("mesh.key"))
    };
    if let Some(list) = &a.mesh_crl {
        builder = builder.mesh_crl_file(list);
    }
    for s in &a.seed_peers {
        builder = builder.seed(*s);
    }
    if let Some(admin) = a.admin {
        builder = builder.admin(admin);
    }
    if let Some(v) = a.max_protocol_version {
        builder = builder.max_protocol_version(v);
    }
    let node = builder.start().await.context("starting the node")?;
    journal.write(&Event::Start {
        t: journal::now_us(),
        node: a.index,
        pid: std::process::id(),
    })?;

    // Consumers: sends to our service, and our service's group on the topic.
    let handled = Arc::new(AtomicU64::new(0));
    let sends = node.messages()?;
    let group = node.subscribe(TOPIC).await?;
    for (sub, consumer) in [
        (sends, Arc::<str>::from(format!("svc:{service}"))),
        (group, Arc::<str>::from(format!("grp:{service}"))),
    ] {
        let journal = journal.clone();
        let handled = handled.clone();
        let by = a.index;
        let seed = a.seed ^ (a.index as u64).rotate_left(32);
        let faults = HandlerFaults {
            drop_every,
            failures: Drawn {
                per_mille: a.handler_failures,
                seed,
            },
            slow: Drawn {
                per_mille: a.slow_handlers,
                seed: seed ^ SLOW_SALT,
            },
            slow_time: a.slow_handler_time,
        };
        tokio::spawn(sub.handle(HANDLER_CONCURRENCY, move |msg: Message| {
            let run = handled.fetch_add(1, Ordering::Relaxed) + 1;
            let journal = journal.clone();
            let consumer = consumer.clone();
            async move {
                if faults.slow.hit(run) {
                    // Holds this worker, and so every key queued behind it: the deep
                    // consumer queues a slow service has, with its retries in flight.
                    tokio::time::sleep(faults.slow_time).await;
                }
                handle(&journal, &msg, by, &consumer, run, faults)
            }
        }));
    }

    // Requests to our service: echoed.
    node.serve(|req| async move { Ok(req.payload().clone()) })
        .await?;

    // The workload.
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(workload(
        node.clone(),
        a.clone_load(),
        resume,
        journal.clone(),
        stop.clone(),
    ));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let parent = std::os::unix::process::parent_id();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut counts = CountJournal::default();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                if std::os::unix::process::parent_id() != parent {
                    // The orchestrator is gone: do not outlive it.
                    break;
                }
                if a.run_dir.join(STOP_FILE).exists() && !stop.swap(true, Ordering::Relaxed) {
                    tracing::info!("workload stopping");
                }
                // Cheap (a few atomic reads) and journalled only when a count grew, so
                // every tick: a SIGKILL loses at most the last tick's closes and counts.
                counts.sample(&node, &journal, a.index)?;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), load).await;
    counts.sample(&node, &journal, a.index)?;
    node.shutdown().await;
    Ok(())
}

/// What the node's [`Node::connections_closed`] and [`Node::delivery_counts`] showed at the
/// last sample, so that each `closes` and `counts` journal line carries only the growth since.
#[derive(Default)]
struct CountJournal {
    last: CloseCounts,
    last_counts: DeliveryCounts,
}

impl CountJournal {
    /// Journals the close codes and the recovery counters that grew since the last sample, if
    /// any did.
    fn sample(&mut self, node: &Node, journal: &Journal, index: usize) -> std::io::Result<()> {
        let counts = node.delivery_counts();
        let (redelivered, duplicates_dropped) = (
            counts
                .redelivered
                .saturating_sub(self.last_counts.redelivered),
            counts
                .duplicates_dropped
                .saturating_sub(self.last_counts.duplicates_dropped),
        );
        self.last_counts = counts;
        if redelivered > 0 || duplicates_dropped > 0 {
            journal.write(&Event::Counts {
                t: journal::now_us(),
                node: index,
                redelivered,
                duplicates_dropped,
            })?;
        }
        let now = node.connections_closed();
        // A refusal of a revoked certificate (a `--mesh-ca` run revokes a running node's) is
        // journaled apart from the other `mesh_proof_failed` closes: it is not a fault.
        let codes: BTreeMap<String, u64> = now
            .by_cause()
            .zip(self.last.by_cause())
            .map(|((name, n), (_, before))| (name.to_string(), n.saturating_sub(before)))
            .filter(|&(_, grew)| grew > 0)
            .collect();
        self.last = now;
        if codes.is_empty() {
            return Ok(());
        }
        journal.write(&Event::Closes {
            t: journal::now_us(),
            node: index,
            codes,
        })
    }
}

/// The part of the arguments the workload needs.
#[derive(Clone, Debug)]
struct Load {
    index: usize,
    services: usize,
    run_dir: PathBuf,
    data_dir: PathBuf,
    rate: f64,
    keys: usize,
    publish_percent: u32,
    request_rate: f64,
    seed: u64,
    ready_wait: bool,
}

impl WorkerArgs {
    fn clone_load(&self) -> Load {
        Load {
            index: self.index,
            services: self.services,
            run_dir: self.run_dir.clone(),
            data_dir: self.data_dir.clone(),
            rate: self.rate,
            keys: self.keys,
            publish_percent: self.publish_percent,
            request_rate: self.request_rate,
            seed: self.seed,
            ready_wait: !self.no_ready_wait,
        }
    }
}

/// The attempts of a message that may fail on purpose (`--handler-failures`): later ones are
/// handled, so every message is handled in the end, well before the sender's attempts run out.
const MAX_FAILED_ATTEMPTS: u32 = 3;

/// Mixed into the seed of the slow runs' draw, so that slow runs and failures are not the
/// same runs.
const SLOW_SALT: u64 = 0x5105_4a9d_1e37_c0de;

/// What a worker's handlers do wrong on purpose.
#[derive(Clone, Copy)]
struct HandlerFaults {
    /// `--misbehave drop-every=N`: every Nth run acknowledges without journaling (a loss).
    drop_every: Option<u64>,
    /// `--handler-failures`: runs that ask for a retry.
    failures: Drawn,
    /// `--slow-handlers`: runs that take `slow_time` before they journal.
    slow: Drawn,
    /// How long a slow run takes.
    slow_time: Duration,
}

/// `per_mille` of the handler runs, chosen by splitmix64 (the schedule's generator) seeded
/// with `seed` and the run's number.
#[derive(Clone, Copy)]
struct Drawn {
    per_mille: u32,
    seed: u64,
}

impl Drawn {
    /// Whether run number `run` is one of the drawn runs.
    fn hit(self, run: u64) -> bool {
        self.per_mille > 0
            && SplitMix64::new(self.seed ^ run).below(1000) < u64::from(self.per_mille)
    }

    /// Whether run number `run`, attempt `attempt` of its message, fails: a drawn run among
    /// the message's first [`MAX_FAILED_ATTEMPTS`].
    fn fail(self, run: u64, attempt: u32) -> bool {
        attempt <= MAX_FAILED_ATTEMPTS && self.hit(run)
    }
}

fn handle(
    journal: &Journal,
    msg: &Message,
    by: usize,
    consumer: &str,
    count: u64,
    faults: HandlerFaults,
) -> Result<(), HandlerError> {
    let HandlerFaults {
        drop_every,
        failures,
        ..
    } = faults;
    let p: Payload = msg
        .json()
        .map_err(|e| HandlerError::Reject(format!("not a chaos payload: {e}")))?;
    if failures.fail(count, msg.attempt()) {
        // Nothing journaled: the sender redelivers it, and its key waits for it.
        return Err(HandlerError::Retry(
            "failing on purpose (--handler-failures)".into(),
        ));
    }
    if drop_every.is_some_and(|n| count.is_multiple_of(n)) {
        return Ok(()); // misbehaving on purpose: acknowledged, never handled
    }
    journal
        .write(&Event::Handled {
            t: journal::now_us(),
            p,
            by,
            c: consumer.to_string(),
        })
        .map_err(|e| HandlerError::Retry(format!("journal write failed: {e}")))
}

async fn workload(
    node: Node,
    l: Load,
    resume: journal::Resume,
    journal: Arc<Journal>,
    stop: Arc<AtomicBool>,
) {
    // Wait for the go signal (already there after a restart).
    while !l.run_dir.join(GO_FILE).exists() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Readiness, as a service would wait for it: connected to an instance of every service
    // (bounded; a service whose only instance is this node never gets one).
    let ready_deadline = tokio::time::Instant::now() + READY_WAIT;
    for j in (0..l.services).filter(|_| l.ready_wait) {
        let svc = service_of(j, l.services);
        let left = ready_deadline.saturating_duration_since(tokio::time::Instant::now());
        node.wait_for_instances(&svc, 1, left).await;
    }
    let next_g = Arc::new(AtomicU64::new(resume.next_g));
    // One counter per (destination, key): at most keys × (services + 1) entries.
    let next_n = Arc::new(Mutex::new(resume.next_n));
    let senders = l.keys.clamp(1, MAX_SENDERS);
    let period = Duration::from_secs_f64(senders as f64 / l.rate.max(0.001));
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..senders {
        let keys: Vec<String> = (0..l.keys)
            .filter(|k| k % senders == task)
            .map(|k| format!("k{k}"))
            .collect();
        let (node, l, journal, stop) = (node.clone(), l.clone(), journal.clone(), stop.clone());
        let (next_g, next_n) = (next_g.clone(), next_n.clone());
        tasks.spawn(async move {
            let mut rng = SplitMix64::new(
                l.seed ^ ((l.index as u64) << 32) ^ (task as u64) ^ journal::now_us(),
            );
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let k = keys[rng.below(keys.len() as u64) as usize].clone();
                let publish = rng.below(100) < u64::from(l.publish_percent);
                let d = if publish {
                    TOPIC.to_string()
                } else {
                    service_of(rng.below(l.services as u64) as usize, l.services)
                };
                let g = next_g.fetch_add(1, Ordering::Relaxed);
                let n = {
                    let mut map = next_n
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let n = map.entry((d.clone(), k.clone())).or_default();
                    *n += 1;
                    *n - 1
                };
                let p = Payload {
                    o: l.index,
                    g,
                    d: d.clone(),
                    k: k.clone(),
                    n,
                };
                if let Err(e) = send_one(&node, &journal, p, publish).await {
                    tracing::error!(error = %e, "journal write failed; stopping the workload");
                    break;
                }
            }
        });
    }
    if l.request_rate > 0.0 {
        tasks.spawn(requests(
            node.clone(),
            l.clone(),
            journal.clone(),
            stop.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
    let _ = std::fs::write(l.data_dir.join(STOPPED_FILE), b"");
}

/// How long a chaos request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Most requests of one worker in flight at once: a request that would start beyond it is
/// skipped (requests are not logged; only their replies are checked).
const MAX_REQUESTS_IN_FLIGHT: usize = 64;

/// Makes `request_rate` requests per second, each to a random service, each in a task of its
/// own (at most [`MAX_REQUESTS_IN_FLIGHT`] at once), and journals each before it starts and
/// how it ended: a reply must be the echo of its own request, and every request must end by
/// its deadline.
async fn requests(node: Node, l: Load, journal: Arc<Journal>, stop: Arc<AtomicBool>) {
    let started_us = journal::now_us();
    let mut rng = SplitMix64::new(l.seed ^ ((l.index as u64) << 40) ^ started_us);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / l.request_rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = tokio::task::JoinSet::new();
    let mut r = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        while calls.try_join_next().is_some() {}
        if stop.load(Ordering::Relaxed) || calls.len() >= MAX_REQUESTS_IN_FLIGHT {
            continue;
        }
        r += 1;
        let svc = service_of(rng.below(l.services as u64) as usize, l.services);
        // Unique per worker run, so a reply that reached the wrong caller cannot match.
        let body = format!("{}:{started_us}:{r}", l.index);
        let (node, journal, o) = (node.clone(), journal.clone(), l.index);
        calls.spawn(async move {
            let ev = Event::RequestBegun {
                t: journal::now_us(),
                o,
                run: started_us,
                r,
                svc: svc.clone(),
                timeout_ms: REQUEST_TIMEOUT.as_millis() as u64,
            };
            write_or_log(&journal, &ev);
            let begun = std::time::Instant::now();
            let result = node.request(&svc, body.clone(), REQUEST_TIMEOUT).await;
            let ms = begun.elapsed().as_millis() as u64;
            let (outcome, wrong) = match &result {
                Ok(reply) => ("ok", reply[..] != *body.as_bytes()),
                Err(e) => (request_error_kind(e), false),
            };
            let ev = Event::Request {
                t: journal::now_us(),
                o,
                run: started_us,
                r,
                svc,
                outcome: outcome.to_string(),
                ms,
                wrong,
            };
            write_or_log(&journal, &ev);
        });
    }
    while calls.join_next().await.is_some() {}
}

/// Journals a request's event; a failed write is logged (the checker then misses that request
/// and reports what it cannot match).
fn write_or_log(journal: &Journal, ev: &Event) {
    if let Err(e) = journal.write(ev) {
        tracing::error!(error = %e, "journal write failed");
    }
}

/// A short name for how a request failed, for the journal.
fn request_error_kind(e: &RequestError) -> &'static str {
    match e {
        RequestError::NoResponders { .. } => "no_responders",
        RequestError::Timeout { .. } => "timeout",
        RequestError::Remote { .. } => "remote",
        RequestError::PeerLost { .. } => "peer_lost",
        RequestError::BreakerOpen { .. } => "breaker_open",
        RequestError::Bulkhead { .. } => "bulkhead",
        RequestError::TooManyInFlight { .. } => "too_many_in_flight",
        RequestError::Stopped => "stopped",
        _ => "other",
    }
}

async fn send_one(
    node: &Node,
    journal: &Journal,
    p: Payload,
    publish: bool,
) -> std::io::Result<()> {
    let (o, g, d, k) = (p.o, p.g, p.d.clone(), p.k.clone());
    let body = serde_json::to_vec(&p).map_err(std::io::Error::other)?;
    journal.write(&Event::Intent {
        t: journal::now_us(),
        p,
        publish,
    })?;
    let msg = Outgoing::new(body).key(k);
    let result = if publish {
        node.publish(&d, msg).await
    } else {
        node.send(&d, msg).await
    };
    let t = journal::now_us();
    match result {
        Ok(receipt) => journal.write(&Event::Accepted {
            t,
            o,
            g,
            copies: receipt.copies(),
        }),
        Err(e) => journal.write(&Event::Failed {
            t,
            o,
            g,
            err: e.to_string(),
        }),
    }
}

/// The journal path of a data directory.
pub(crate) fn journal_path(data_dir: &Path) -> PathBuf {
    data_dir.join(journal::JOURNAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_failures_hit_about_their_share_and_spare_later_attempts() {
        let f = Drawn {
            per_mille: 30,
            seed: 7,
        };
        let failed = (0..100_000).filter(|&run| f.fail(run, 1)).count();
        assert!((2_500..3_500).contains(&failed), "{failed} of 100,000");
        assert!(!(0..10_000).any(|run| f.fail(run, MAX_FAILED_ATTEMPTS + 1)));
        let none = Drawn {
            per_mille: 0,
            seed: 7,
        };
        assert!(!(0..10_000).any(|run| none.fail(run, 1)));
    }

    #[test]
    fn slow_runs_hit_about_their_share_and_are_drawn_apart_from_failures() {
        let failures = Drawn {
            per_mille: 100,
            seed: 7,
        };
        let slow = Drawn {
            per_mille: 100,
            seed: 7 ^ SLOW_SALT,
        };
        let hits = (0..100_000).filter(|&run| slow.hit(run)).count();
        assert!((9_000..11_000).contains(&hits), "{hits} of 100,000");
        // Independent draws: about 1% of runs are both, not 10%.
        let both = (0..100_000)
            .filter(|&run| slow.hit(run) && failures.hit(run))
            .count();
        assert!((500..1_500).contains(&both), "{both} of 100,000");
        let all = Drawn {
            per_mille: 1000,
            seed: 7,
        };
        assert!((0..10_000).all(|run| all.hit(run)));
    }
}
