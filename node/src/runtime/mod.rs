//! The tokio runtime that drives the engine.
//!
//! Tasks (all tracked by one `TaskTracker`, all cancelled through child
//! tokens of the node's root `CancellationToken`):
//! - **core** (`core.rs`): owns the [`Outbox`](crate::engine::outbox::Outbox),
//!   the connection table and pending receipts; keeps the routes of the shared
//!   request table ([`requests`]) in step with its connections. Fed by one bounded
//!   channel ([`CORE_QUEUE`]); never awaits anything but that channel and its
//!   tick, so it cannot deadlock with connection tasks (it only `try_send`s to
//!   them).
//! - **accept loop** and **dialers** (`conn.rs`): turn transport connections
//!   into peers (hello exchange), then hand them to core.
//! - **per connection**: one writer (coalesces frames from a bounded queue
//!   into large stream writes) and readers for the control stream and each
//!   data lane. Inbound deliveries go straight to the local subscription
//!   queues; when those are full the lane stops reading and QUIC flow control
//!   pushes back on the sender.
//! - **discovery pump**: forwards discovery events to core.
//!
//! Requests live in [`Shared::requests`], not in core: while few are in flight a caller
//! routes its request there (instance, breaker, bulkhead) and writes it to the connection
//! itself, else core does; the requester's lane reader answers the caller from there (see
//! [`requests`]). A caller in a task, to a peer of protocol 6 or later, writes its request on
//! a stream of its own and reads the reply there itself. The server's lane reader (or, for
//! such a stream, its request-stream acceptor) starts the `serve` handler (polled in place,
//! in a task of its own, or through the serve queue when `serve_concurrency` is reached) and
//! the reply goes out on the request's stream, the connection's direct stream or its writer.
//!
//! Shutdown order (see [`crate::Node::shutdown`]): stop discovery and
//! accepting, say goodbye to peers, wait (up to the grace period) for local
//! handlers and acks, close connections, cancel and join every task.

pub(crate) mod cert;
pub(crate) mod conn;
pub(crate) mod core;
pub(crate) mod pause;
pub(crate) mod requests;
mod revocations;
pub(crate) mod storage;

pub(crate) use cert::CHECK_EVERY as CERT_CHECK_EVERY;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use peerbus_discovery::{
    Discovery, DiscoveryEvent, DnsDiscovery, MdnsDiscovery, PROTOCOL_VERSION, PeerRecord,
    StaticDiscovery,
};
use peerbus_transport::{
    Endpoint, EndpointConfig, Identity, MAX_MESH_KEYS, Membership, MeshKey, NodeCert, NodeId,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::builder::{MembershipChoice, NodeBuilder};
use crate::engine::inbox::Inbox;
use crate::engine::outbox::OutboxConfig;
use crate::engine::wire::{
    ALPN_NEGOTIATED, ALPN_V4, Envelope, FIRST_NEGOTIATED_VERSION, Interest, MIN_PROTOCOL_VERSION,
};
use crate::error::StartError;
use crate::node::{Node, NodeInner};
use crate::store::{Durability, MemoryStore, RedbStore, Store};

/// Capacity of the core actor's queue. Producers (API calls, connection
/// readers) wait when it is full.
pub(crate) const CORE_QUEUE: usize = 4096;
/// Capacity of each connection's outgoing frame queue. Core `try_send`s into
/// it; deliveries are bounded by the peer's credits, acks are batched, so a
/// full queue means the peer stopped reading: the connection is closed.
pub(crate) const LINK_QUEUE: usize = 16_384;
/// Capacity of each local lane's queue (entries this node delivers to itself, see
/// `conn::spawn_local_lanes`). Core `try_send`s into it. What is in flight to the local
/// node is bounded by its credits (the prefetch window), so the queue only fills when
/// timed-out entries are resent while their first copy still waits; an entry that finds it
/// full stays in flight and is resent after the ack timeout.
pub(crate) const LOCAL_LANE_QUEUE: usize = 16_384;
/// Capacity of a local subscription's queue (per subscription).
pub(crate) const SUBSCRIPTION_QUEUE: usize = 1024;
/// Capacity of the request queue feeding `serve`.
pub(crate) const SERVE_QUEUE: usize = 1024;
/// Most local subscriptions on one node.
pub(crate) const MAX_SUBSCRIPTIONS: usize = 1024;
/// Most peers the node remembers (discovered or connected); a gone one makes room for a new
/// one, and a peer that connects is remembered even past it (connections are bounded on
/// their own).
pub(crate) const MAX_KNOWN_PEERS: usize = 4096;
/// Handshakes (TLS + mesh proof + hello) running at once on the accept side.
pub(crate) const MAX_PENDING_HANDSHAKES: usize = 64;
/// Unidirectional streams a peer may open towards us per connection: its data lanes (at most
/// [`MAX_LANES`](crate::MAX_LANES)) and its direct stream (`conn::DirectStream`), plus one for
/// builds that allowed 64 lanes.
pub(crate) const MAX_INBOUND_LANES: usize = 64 + 1;

/// An entry arriving for a local consumer.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub(crate) env: Arc<Envelope>,
    pub(crate) floor: u64,
    pub(crate) key_floor: Option<u64>,
    /// The connection it arrived on, gone once that connection is closed, timed out or
    /// replaced. The sender then redelivers the entry, so a queued copy whose connection is
    /// gone must not reach a handler.
    pub(crate) conn: ConnState,
    /// When it arrived. A copy that waited here at least the ack timeout was already timed
    /// out (and possibly given to another instance) by its sender.
    pub(crate) received: Instant,
}

/// Whether the connection an [`Inbound`] entry arrived on is gone. Cloned and read for every
/// entry, so a peer connection's is an atomic flag: a `CancellationToken` takes a lock (shared
/// by the connection's tasks) to clone, drop or read.
#[derive(Clone, Debug)]
pub(crate) enum ConnState {
    /// A peer connection: `gone` is set by the connection's close watcher
    /// (`conn::spawn_connection`) once the connection's token is cancelled; `opened_in` is the
    /// [`pause`] epoch it opened in.
    Flag {
        gone: Arc<AtomicBool>,
        opened_in: u64,
    },
    /// The local lanes' "connection": the node's token.
    Token(CancellationToken),
}

impl ConnState {
    /// Whether the connection is gone.
    pub(crate) fn is_gone(&self) -> bool {
        match self {
            ConnState::Flag { gone, .. } => gone.load(Ordering::Acquire),
            ConnState::Token(t) => t.is_cancelled(),
        }
    }

    /// Whether the node did not run for a while since the connection opened, or is only now
    /// running again ([`pause::PauseWatch::fences`]): its peer may have given up on it, and
    /// core replaces it. Never for the local lanes.
    pub(crate) fn outlived_a_pause(&self, watch: &pause::PauseWatch, now: Instant) -> bool {
        match self {
            ConnState::Flag { opened_in, .. } => watch.fences_at(*opened_in, now),
            ConnState::Token(_) => false,
        }
    }
}

impl From<CancellationToken> for ConnState {
    fn from(t: CancellationToken) -> Self {
        ConnState::Token(t)
    }
}

/// A request arriving for the local `serve` handler.
pub(crate) struct InboundRequest {
    pub(crate) env: Arc<Envelope>,
    pub(crate) budget_ms: u64,
    /// Where the serve task's handler run sends the reply itself, without a hop through
    /// core: the outgoing queue of the connection the request came on (closed once that
    /// connection is gone, which means the requester is gone too), or the request's own
    /// stream.
    pub(crate) reply: conn::ReplyTo,
    /// The pause epoch the request's connection opened in: a request that waited for a slot
    /// across a pause of this node is not served ([`pause::PauseWatch::fences`]).
    pub(crate) opened_in: u64,
}

/// One request's handler run: its reply, or `None` when the requester's budget ran out first
/// (nobody waits for a reply then).
pub(crate) type ReplyFuture =
    std::pin::Pin<Box<dyn Future<Output = Option<Result<bytes::Bytes, String>>> + Send>>;

/// Makes the handler run of one request (its envelope and the requester's budget in ms). The
/// caller polls it: a lane reader polls it once itself and replies at once when it is ready
/// (`conn::lane_reader`), and otherwise hands it to a task (`conn::spawn_handler`); a handler
/// whose first polls are slow ([`FirstPollCost`]) is called and polled in a task from the start.
pub(crate) type ServeFn = Arc<dyn Fn(Arc<Envelope>, u64) -> ReplyFuture + Send + Sync>;

/// The local `serve` handler, as lane readers reach it.
pub(crate) struct Server {
    /// One per handler running (`serve_concurrency`).
    pub(crate) permits: Arc<Semaphore>,
    /// Starts a handler. A lane reader that gets a permit at once calls it itself, so the
    /// request reaches its handler without a hop through a queue.
    pub(crate) run: ServeFn,
    /// Requests that found every permit taken ([`SERVE_QUEUE`] of them; a lane reader waits
    /// for room, which pushes back on the requester): the serve task starts them in order as
    /// permits come free.
    pub(crate) queue: mpsc::Sender<InboundRequest>,
    /// How long the handler's first polls take: whether a lane reader may run it itself.
    pub(crate) first_poll: FirstPollCost,
}

/// A moving average of how long a `serve` handler's first poll takes (each new poll weighs
/// 1/8), in nanoseconds. A lane reader polls the handler itself only while that stays under
/// [`SLOW_FIRST_POLL`] (`conn::lane_reader`); the tasks it starts otherwise keep recording, so
/// a handler that gets cheap is polled inline again.
#[derive(Debug, Default)]
pub(crate) struct FirstPollCost(AtomicU64);

/// A handler whose first poll takes longer than this on average runs in a task of its own, so
/// that the requests behind it on the stream need not wait for it and several such handlers
/// run on several cores at once. A task costs a few microseconds (its spawn, and the reply's
/// hop through the connection's writer), small beside such a handler.
pub(crate) const SLOW_FIRST_POLL: std::time::Duration = std::time::Duration::from_micros(10);

impl FirstPollCost {
    /// Adds one first poll that took `took`. Lane readers record concurrently; a lost
    /// update only drops one sample.
    pub(crate) fn record(&self, took: std::time::Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX) / 8;
        let old = self.0.load(Ordering::Relaxed);
        self.0
            .store((old - old / 8).saturating_add(ns), Ordering::Relaxed);
    }

    /// Whether the first polls are slow on average.
    pub(crate) fn slow(&self) -> bool {
        self.0.load(Ordering::Relaxed) > SLOW_FIRST_POLL.as_nanos() as u64
    }
}

pub(crate) struct LocalSub {
    pub(crate) id: u64,
    pub(crate) interest: Interest,
    pub(crate) tx: mpsc::Sender<Inbound>,
}

/// Where inbound traffic goes on this node.
pub(crate) struct Routes {
    pub(crate) service_tx: mpsc::Sender<Inbound>,
    pub(crate) service_rx: Option<mpsc::Receiver<Inbound>>,
    pub(crate) subs: Vec<LocalSub>,
    pub(crate) serve: Option<Arc<Server>>,
    pub(crate) next_sub: u64,
}

impl Routes {
    /// Whether anything here takes inbound work now: a live `messages()` stream, a
    /// subscription or a `serve` handler. A node that takes none handles no delivery that
    /// reaches it: those for its service wait unread in the stream's queue (their sender
    /// redelivers them once its ack timeout passes or the connection closes), the rest are
    /// nacked ("no local consumer").
    pub(crate) fn consumes(&self) -> bool {
        self.takes_messages() || !self.subs.is_empty() || self.serve.is_some()
    }

    /// Whether the `messages()` stream of this node's service is taken and still alive.
    pub(crate) fn takes_messages(&self) -> bool {
        self.service_rx.is_none() && !self.service_tx.is_closed()
    }

    pub(crate) fn interests(&self) -> Vec<Interest> {
        let mut v: Vec<Interest> = self.subs.iter().map(|s| s.interest.clone()).collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Counters for status output, `/metrics` and the metrics facade.
pub(crate) use crate::admin::metrics::Counters;

/// State shared by the node handle, core and connection tasks.
pub(crate) struct Shared {
    pub(crate) id: NodeId,
    /// This node's ephemeral log name (`eph:<id>`), computed once for inbound routing.
    pub(crate) eph_log: String,
    pub(crate) service: String,
    pub(crate) mesh: String,
    pub(crate) incarnation: u64,
    pub(crate) prefetch: u32,
    pub(crate) lanes: usize,
    /// The highest protocol version this node speaks (`NodeBuilder::max_protocol_version`).
    pub(crate) protocol: u32,
    /// The lowest it negotiates on `ALPN_NEGOTIATED` connections (at least 5;
    /// `NodeBuilder::min_protocol_version`).
    pub(crate) min_protocol: u32,
    pub(crate) max_message_size: usize,
    pub(crate) serve_concurrency: usize,
    /// Messages sent outside any trace start one (`NodeBuilder::start_traces`).
    pub(crate) start_traces: bool,
    pub(crate) shutdown_grace: std::time::Duration,
    /// How long a retired connection stays open at most (engine ms; see `core/retire.rs`).
    pub(crate) retired_linger_ms: u64,
    /// This node's ack timeout, taken as its senders' too: an inbound entry that waited
    /// locally this long before its handler would start is dropped as stale.
    pub(crate) ack_timeout: std::time::Duration,
    pub(crate) send_timeout: std::time::Duration,
    pub(crate) store_stats: Arc<Mutex<crate::store::StoreStats>>,
    /// Dead letters the store holds, as its writer thread counts them (`Status::dead_letters`).
    pub(crate) dead_letters_stored: Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) durability: Durability,
    pub(crate) started: Instant,
    pub(crate) core: mpsc::Sender<core::CoreMsg>,
    /// The requests in flight and the routes for new ones (see [`requests`]).
    pub(crate) requests: Mutex<requests::Requests>,
    pub(crate) inbox: Mutex<Inbox>,
    pub(crate) routes: RwLock<Routes>,
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
    /// The fault injector this node's socket goes through, when built with
    /// [`NodeBuilder::faults`] (reached by the control socket's `faults` command).
    pub(crate) faults: Option<peerbus_transport::Faults>,
    pub(crate) counters: Counters,
    /// Mesh events for the admin page (peer up/down, refusals, dead letters).
    pub(crate) events: crate::admin::events::Events,
    pub(crate) endpoint: Endpoint,
    /// Signalled by core whenever a connected peer comes, goes, says goodbye or starts or stops
    /// taking its service's messages: [`Node::wait_for_instances`](crate::Node) waits on it
    /// instead of polling. A watch channel keeps one pending notice, however many it missed.
    pub(crate) peers_changed: tokio::sync::watch::Sender<()>,
    /// Core's timer ticks: fast (every 50 ms) while it has timed work, slow (every second)
    /// when idle. See [`core::Ticks`].
    pub(crate) ticks: core::Ticks,
    /// Notices when the node did not run for a while (see [`pause`]).
    pub(crate) pause: pause::PauseWatch,
    /// Revocation lists to check and pass on (see [`revocations`]; [`revocations::QUEUE`]).
    pub(crate) revocations: mpsc::Sender<revocations::News>,
    /// Asks the mesh CA file watcher ([`cert::watch`]) to read its files now
    /// ([`cert::RELOAD_QUEUE`]); closed when the node has no mesh CA files.
    pub(crate) reloads: mpsc::Sender<cert::ReloadRequest>,
    /// Wakes every dial loop waiting out its backoff ([`Shared::membership_changed`]).
    pub(crate) redial: tokio::sync::Notify,
    /// The mesh key file (`--mesh-key-file`) and the keys the builder added to it
    /// (`also_accept`), read again by [`Node::reload_mesh_files`](crate::Node); `None`
    /// without a key file.
    pub(crate) key_file: Option<(std::path::PathBuf, Vec<MeshKey>)>,
}

/// The mesh keys a node proves (the first of `keys`) and accepts: `keys` (a key file's, or
/// the builder's key), then each of `also` not among them; at most [`MAX_MESH_KEYS`].
pub(crate) fn key_set(mut keys: Vec<MeshKey>, also: &[MeshKey]) -> Result<Vec<MeshKey>, String> {
    for k in also {
        if !keys.contains(k) {
            keys.push(k.clone());
        }
    }
    if keys.len() > MAX_MESH_KEYS {
        return Err(format!(
            "{} mesh keys: a node takes at most {MAX_MESH_KEYS}",
            keys.len()
        ));
    }
    Ok(keys)
}

impl Shared {
    /// This node took a new mesh certificate, CA or mesh keys: peers that refused it, or that
    /// it refused, may take it now, so every dial loop waiting out its backoff dials again at
    /// once instead of seconds later.
    pub(crate) fn membership_changed(&self) {
        self.redial.notify_waiters();
    }

    /// Presents `cert` from now on, unless it is bound to other services than this node's
    /// ([`Shared::refuses_own`]) or the endpoint refuses it; then redials at once. Why not,
    /// when refused (the certificate in use stays).
    pub(crate) fn renew_certificate(&self, cert: &NodeCert) -> Result<(), String> {
        if let Some(why) = self.refuses_own(cert) {
            return Err(why);
        }
        self.endpoint
            .renew_certificate(cert)
            .map_err(|e| e.to_string())?;
        self.membership_changed();
        Ok(())
    }

    /// Proves `keys[0]` and accepts all of `keys` from now on, if the endpoint takes them
    /// (1 to [`MAX_MESH_KEYS`], none twice, a keyed node); then redials at once. Why not,
    /// when refused (the keys in use stay).
    pub(crate) fn renew_keys(&self, keys: Vec<MeshKey>) -> Result<(), String> {
        self.endpoint.renew_keys(keys).map_err(|e| e.to_string())?;
        info!("took new mesh keys: proving the first, accepting all of them");
        self.membership_changed();
        Ok(())
    }

    /// Why `cert` cannot be this node's certificate: it is bound to services other than
    /// the one this node runs ([`NodeCert::services`]). Renewals check it; `start()` checks
    /// the first certificate the same way.
    pub(crate) fn refuses_own(&self, cert: &NodeCert) -> Option<String> {
        cert.refuses_service(&self.service)
            .map(|why| format!("this node runs `{}`: {why}", self.service))
    }

    /// Tells [`Shared::peers_changed`]'s waiters that the connected peers changed.
    pub(crate) fn notify_peers_changed(&self) {
        self.peers_changed.send_replace(());
    }

    /// Milliseconds since the node started: the engine's clock.
    pub(crate) fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Locks a std mutex, recovering the data if a panicking thread poisoned it
/// (every critical section leaves the data consistent).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) async fn start(b: NodeBuilder) -> Result<Node, StartError> {
    if b.service.is_empty() || b.service.contains(char::is_whitespace) {
        return Err(StartError::Config(format!(
            "service name `{}` must be non-empty and contain no spaces",
            b.service
        )));
    }
    if b.max_message_size.saturating_add(64 * 1024) > b.max_frame_size {
        return Err(StartError::Config(format!(
            "max_message_size {} must stay at least 64 KiB below max_frame_size {}",
            b.max_message_size, b.max_frame_size
        )));
    }
    let protocols = MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION;
    for (name, v) in [
        ("max_protocol_version", b.max_protocol_version),
        ("min_protocol_version", b.min_protocol_version),
    ] {
        if !protocols.contains(&v) {
            return Err(StartError::Config(format!(
                "{name} {v} is not one this build speaks ({}..={})",
                protocols.start(),
                protocols.end()
            )));
        }
    }
    if b.min_protocol_version > b.max_protocol_version {
        return Err(StartError::Config(format!(
            "min_protocol_version {} is above max_protocol_version {}",
            b.min_protocol_version, b.max_protocol_version
        )));
    }
    let keyed = |keys: Vec<MeshKey>| {
        let keys = key_set(keys, &b.also_accept).map_err(StartError::Config)?;
        Membership::from_keys(keys).ok_or(StartError::NoMembership)
    };
    if b.mesh_crl.is_some() && !matches!(b.membership, MembershipChoice::CaFiles { .. }) {
        return Err(StartError::Config(
            "a mesh CA revocation list file needs the mesh CA's files (mesh_ca_files, \
             --mesh-ca and --mesh-cert)"
                .into(),
        ));
    }
    let membership = match &b.membership {
        MembershipChoice::Unset => return Err(StartError::NoMembership),
        MembershipChoice::Key(k) => keyed(vec![k.clone()])?,
        MembershipChoice::KeyFile(p) => keyed(MeshKey::load_all(p)?)?,
        MembershipChoice::Ca(..) | MembershipChoice::CaFiles { .. }
            if !b.also_accept.is_empty() =>
        {
            return Err(StartError::Config(
                "a mesh CA takes no mesh keys to accept: while the CA is replaced, its file \
                 holds the certificates of both CAs"
                    .into(),
            ));
        }
        MembershipChoice::Ca(ca, cert) => Membership::Ca {
            ca: ca.clone(),
            cert: cert.clone(),
        },
        MembershipChoice::CaFiles { ca, cert } => Membership::Ca {
            ca: cert::load_trust(ca, b.mesh_crl.as_deref())?,
            cert: NodeCert::load(cert)?,
        },
        MembershipChoice::Insecure if !b.also_accept.is_empty() => {
            return Err(StartError::Config(
                "an open mesh accepts every peer: it takes no mesh keys to accept".into(),
            ));
        }
        MembershipChoice::Insecure => {
            warn!(
                mesh = %b.mesh,
                "INSECURE OPEN MESH: no mesh key; any node that finds this one can exchange \
                 messages with it. Use a mesh key (`peerbus keygen`) outside demos."
            );
            Membership::InsecureOpen
        }
    };
    if let Membership::Ca { cert, .. } = &membership
        && let Some(why) = cert.refuses_service(&b.service)
    {
        return Err(StartError::Config(format!(
            "this node cannot run service `{}`: {why} (issue it one for this service: \
             `peerbus ca issue --service {}`)",
            b.service, b.service
        )));
    }
    let identity = match &b.data_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| StartError::DataDir {
                path: dir.display().to_string(),
                reason: e.to_string(),
            })?;
            Identity::load_or_create(dir)?
        }
        None => Identity::generate()?,
    };
    let id = identity.node_id();
    let membership = revocations::with_kept_lists(membership, b.data_dir.as_deref());

    // The durable log: redb in the data directory unless durability is Memory.
    let durability = match (&b.data_dir, b.durability) {
        (Some(_), Some(d)) => d,
        (Some(_), None) => Durability::Fsync,
        (None, _) => Durability::Memory,
    };
    let (store, recovered): (Box<dyn Store>, _) = match (&b.data_dir, &durability) {
        (Some(dir), Durability::Fsync | Durability::Interval(_)) => {
            let mut st = RedbStore::open(dir, durability).map_err(StartError::Store)?;
            let rec = st.recover().map_err(StartError::Store)?;
            if let Err(e) = st.preallocate_side_log() {
                warn!(error = %e, "cannot preallocate the store's side log; commits stay slower");
            }
            for c in &rec.corrupt {
                warn!(table = c.table, key = %c.key, reason = %c.reason, "corrupt store record quarantined");
            }
            (Box::new(st), Some(rec))
        }
        _ => (Box::new(MemoryStore::new()), None),
    };
    let dead_letters_stored = recovered.as_ref().map_or(0, |r| r.dead_letters);
    let inbox = match &recovered {
        Some(r) => Inbox::restore(r.windows.iter().cloned()),
        None => Inbox::new(),
    };
    // The admin endpoint binds first: a bad address fails `start()` before anything runs.
    let admin_listener = b.admin.map(crate::admin::bind).transpose()?;
    let listen = b.default_listen();
    let ca_in_use = match &membership {
        Membership::Ca { ca, cert } => Some((ca.clone(), cert.clone())),
        _ => None,
    };
    let mut endpoint_config = EndpointConfig::new(identity, membership, listen);
    endpoint_config.max_frame_size = b.max_frame_size;
    endpoint_config.faults = b.faults.clone();
    // One ALPN id per hello layout, newest first: a node that negotiates versions still
    // speaks protocol 4 to a build that offers only its id.
    endpoint_config.alpn = Vec::new();
    if b.max_protocol_version >= FIRST_NEGOTIATED_VERSION {
        endpoint_config.alpn.push(ALPN_NEGOTIATED.to_vec());
    }
    if b.min_protocol_version <= MIN_PROTOCOL_VERSION {
        endpoint_config.alpn.push(ALPN_V4.to_vec());
    }
    let endpoint = Endpoint::bind(endpoint_config)?;
    let local_addr = endpoint.local_addr();

    let (core_tx, core_rx) = mpsc::channel(CORE_QUEUE);
    let (revocations_tx, revocations_rx) = mpsc::channel(revocations::QUEUE);
    let (reloads_tx, reloads_rx) = mpsc::channel(cert::RELOAD_QUEUE);
    let (service_tx, service_rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let shared = Arc::new(Shared {
        id,
        eph_log: crate::engine::outbox::Target::Node(id)
            .log_name()
            .to_string(),
        service: b.service.clone(),
        mesh: b.mesh.clone(),
        incarnation: rand::random(),
        prefetch: b.prefetch,
        lanes: b.lanes,
        protocol: b.max_protocol_version,
        min_protocol: b.min_protocol_version.max(FIRST_NEGOTIATED_VERSION),
        max_message_size: b.max_message_size,
        serve_concurrency: b.serve_concurrency,
        start_traces: b.start_traces,
        shutdown_grace: b.shutdown_grace,
        retired_linger_ms: u64::try_from(b.retired_linger.as_millis()).unwrap_or(u64::MAX),
        ack_timeout: b.ack_timeout,
        send_timeout: b.send_timeout,
        store_stats: Arc::new(Mutex::new(crate::store::StoreStats::default())),
        dead_letters_stored: Arc::new(std::sync::atomic::AtomicUsize::new(dead_letters_stored)),
        durability,
        started: Instant::now(),
        core: core_tx.clone(),
        requests: Mutex::new(requests::Requests::new(
            requests::Guards {
                breaker: b.breaker,
                max_in_flight_per_service: b.max_in_flight_per_service,
            },
            b.max_requests_in_flight,
        )),
        inbox: Mutex::new(inbox),
        routes: RwLock::new(Routes {
            service_tx,
            service_rx: Some(service_rx),
            subs: Vec::new(),
            serve: None,
            next_sub: 1,
        }),
        cancel: cancel.clone(),
        tracker: tracker.clone(),
        counters: Counters::new(&id),
        events: crate::admin::events::Events::new(),
        endpoint: endpoint.clone(),
        faults: b.faults.clone(),
        peers_changed: tokio::sync::watch::Sender::new(()),
        ticks: core::Ticks::default(),
        pause: pause::PauseWatch::new(),
        revocations: revocations_tx,
        reloads: reloads_tx,
        redial: tokio::sync::Notify::new(),
        key_file: match &b.membership {
            MembershipChoice::KeyFile(path) => Some((path.clone(), b.also_accept.clone())),
            _ => None,
        },
    });
    let span = info_span!("node", node = %id.short(), service = %b.service);
    info!(parent: &span, %local_addr, mesh = %b.mesh, "node started");
    if let Some((_, cert)) = &ca_in_use {
        cert::report(&span, cert, "this node's mesh certificate is valid");
    }

    let outbox_cfg = OutboxConfig {
        ack_timeout_ms: b.ack_timeout.as_millis() as u64,
        max_attempts: b.max_attempts,
        backoff_base_ms: b.retry_backoff.0.as_millis() as u64,
        backoff_max_ms: b.retry_backoff.1.as_millis() as u64,
        seed: rand::random(),
        // A node without a data directory has an identity of its own run, so its logs are new
        // to every receiver: they start at 1, and their sequence numbers take one to five
        // bytes on the wire instead of nine (four of them per message: a 64 B send went from
        // 253 to 230 bytes both ways in `peerbus bench`; its CPU time did not move beyond the
        // VM's noise). A kept identity may have used any number before, whatever its store
        // remembers: see `OutboxConfig::seq_base`.
        seq_base: if b.data_dir.is_some() {
            crate::message::now_unix_ms().saturating_mul(1_000_000)
        } else {
            1
        },
    };
    let (store_tx, store_rx) = mpsc::channel(storage::STORE_QUEUE);
    let store_thread = storage::spawn(
        store,
        store_rx,
        core_tx.clone(),
        shared.store_stats.clone(),
        shared.counters.commit_latency.clone(),
        storage::DeadLetterBound {
            max: b.max_dead_letters,
            stored: shared.dead_letters_stored.clone(),
            dropped: shared.counters.dead_letters_dropped.clone(),
        },
    )
    .map_err(|e| StartError::DataDir {
        path: b
            .data_dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
        reason: format!("could not start the store writer thread: {e}"),
    })?;
    let init = core::CoreInit {
        cfg: outbox_cfg,
        store: store_tx.clone(),
        recovered,
        start_unix_ms: crate::message::now_unix_ms().saturating_sub(shared.now()),
        limits: core::Limits {
            log_entries: b.max_log_entries,
            total_bytes: b.max_log_bytes,
            max_parked: b.max_log_entries.min(65_536),
        },
        recovered_hold_ms: u64::try_from(b.recovered_hold.as_millis()).unwrap_or(u64::MAX),
    };
    tracker.spawn(core::run(shared.clone(), core_rx, init).instrument(span.clone()));
    drop(core_tx);
    tracker.spawn(conn::accept_loop(shared.clone()).instrument(span.clone()));
    tracker.spawn(pause::watch(shared.clone()).instrument(span.clone()));
    tracker.spawn(revocations::run(
        shared.clone(),
        revocations_rx,
        b.data_dir.clone(),
        span.clone(),
    ));
    if let (
        MembershipChoice::CaFiles {
            ca: ca_file,
            cert: cert_file,
        },
        Some((ca, cert)),
    ) = (&b.membership, ca_in_use)
    {
        let files = cert::Files {
            ca: ca_file.clone(),
            cert: cert_file.clone(),
            crl: b.mesh_crl.clone(),
            every: b
                .mesh_cert_check_every
                .max(std::time::Duration::from_millis(100)),
        };
        tracker.spawn(cert::watch(
            shared.clone(),
            files,
            (ca, cert),
            reloads_rx,
            cancel.clone(),
            span.clone(),
        ));
    }

    // Discovery: user-supplied sources, seeds, and mDNS unless turned off.
    let mut discoveries: Vec<Box<dyn Discovery>> = b.discoveries;
    if !b.seeds.is_empty() {
        discoveries.push(Box::new(StaticDiscovery::new(b.seeds.clone())));
    }
    if !b.dns_seeds.is_empty() {
        discoveries.push(Box::new(
            DnsDiscovery::new(b.dns_seeds.clone()).refresh(b.dns_refresh),
        ));
    }
    let want_mdns = b.mdns && (b.interfaces.is_some() || discoveries.is_empty());
    if want_mdns {
        let ifs = b
            .interfaces
            .clone()
            .unwrap_or(peerbus_discovery::Interfaces::All);
        discoveries.push(Box::new(MdnsDiscovery::new(ifs)));
    }
    let record = PeerRecord {
        node_id: id,
        service: b.service.clone(),
        mesh: b.mesh.clone(),
        protocol_version: b.max_protocol_version,
        addrs: vec![local_addr],
    };
    let (disc_tx, mut disc_rx) =
        mpsc::channel::<DiscoveryEvent>(peerbus_discovery::EVENT_CHANNEL_CAPACITY);
    for d in discoveries.iter_mut() {
        if let Err(e) = d.start(record.clone(), disc_tx.clone()) {
            cancel.cancel();
            endpoint.close().await;
            return Err(e.into());
        }
        info!(parent: &span, discovery = d.name(), "discovery started");
    }
    drop(disc_tx);
    {
        let shared = shared.clone();
        tracker.spawn(
            async move {
                loop {
                    let ev = tokio::select! {
                        ev = disc_rx.recv() => ev,
                        () = shared.cancel.cancelled() => None,
                    };
                    let Some(ev) = ev else { break };
                    if shared
                        .core
                        .send(core::CoreMsg::Discovery(ev))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
            .instrument(span.clone()),
        );
    }
    let admin_addr = match &admin_listener {
        Some(l) => Some(l.local_addr().map_err(|e| StartError::Admin {
            addr: b.admin.unwrap_or(local_addr),
            reason: e.to_string(),
        })?),
        None => None,
    };
    let node = Node {
        shared,
        inner: Arc::new(NodeInner {
            discoveries: Mutex::new(discoveries),
            local_addr,
            admin_addr,
            stopped: Mutex::new(false),
            store_thread: Mutex::new(Some(store_thread)),
            store: store_tx,
            span: span.clone(),
        }),
    };
    node.shared
        .tracker
        .spawn(crate::admin::metrics::facade_sampler(node.clone()).instrument(span.clone()));
    if let (Some(l), Some(addr)) = (admin_listener, admin_addr)
        && let Err(e) = crate::admin::spawn(&node, l, addr, b.faults.clone())
    {
        node.shutdown().await;
        return Err(e);
    }
    if let Some(dir) = &b.data_dir {
        node.shared
            .tracker
            .spawn(crate::control::serve(node.clone(), dir.clone()).instrument(span));
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{FirstPollCost, SLOW_FIRST_POLL};

    /// A handler turns slow after a few slow first polls and cheap again after a few more
    /// quick ones: a single stall (a preempted thread) does not move it for long.
    #[test]
    fn first_polls_turn_slow_and_back_with_the_handler() {
        let cost = FirstPollCost::default();
        assert!(!cost.slow(), "a new handler is polled inline");
        cost.record(Duration::from_micros(1));
        assert!(!cost.slow());
        for _ in 0..3 {
            cost.record(SLOW_FIRST_POLL * 4);
        }
        assert!(cost.slow(), "three polls of 40 µs");
        let mut quick = 0;
        while cost.slow() {
            cost.record(Duration::from_micros(1));
            quick += 1;
            assert!(quick < 20, "still slow after {quick} quick polls");
        }
        assert!(quick >= 2, "one quick poll undid three slow ones");
        // One stall of 1 ms makes it slow until some 20 quick polls have passed.
        cost.record(Duration::from_millis(1));
        assert!(cost.slow());
        let mut quick = 0;
        while cost.slow() {
            cost.record(Duration::from_micros(1));
            quick += 1;
        }
        assert!(
            (15..=30).contains(&quick),
            "{quick} quick polls after a stall"
        );
    }
}
