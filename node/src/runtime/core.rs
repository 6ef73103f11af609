//! The core actor: owns the outbox, the connection table, receipts and
//! pending requests. Everything reaches it through [`CoreMsg`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use peerbus_discovery::DiscoveryEvent;
use peerbus_transport::{CloseCode, Connection, NodeId, Traffic};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

use super::storage::{Clock, Durable, StagedCall, StoreOp};
use super::{Inbound, MAX_KNOWN_PEERS, Shared, conn, requests};
use crate::admin::EventKind;
use crate::engine::FastMap;
use crate::engine::outbox::{Outbox, OutboxConfig, Outcome, Settled, Target, Transmit};
use crate::engine::wire::{
    Control, Data, Envelope, GroupState, Hello, Interest, MAX_ACK_RUN_SEQS,
    REVOCATION_LISTS_VERSION,
};
use crate::error::{DeliveryError, RequestError, SendError};
use crate::node::{CallReply, CopyReceipt, PeerInfo, PeerState, Status};
use crate::store::{DeadLetter, StoredEntry};

mod groups;
mod retire;
mod stall;
mod topics;

use groups::{Changes, KnownGroups, MAX_KNOWN_GROUPS, MAX_RELEASED_GROUPS};
use retire::Retiring;
use topics::TopicCache;

/// Ticks of the timer work (retries, ack timeouts, expiry, request deadlines) while core has
/// any ([`Core::timed_work`]).
const TICK: Duration = Duration::from_millis(50);
/// Ticks while core has no timed work: an idle node wakes once a second instead of twenty
/// times. The 50 ms tick was about 85% of an idle node's CPU (`peerbus node` alone on
/// loopback: 2–3 ms of CPU a second, 0.3 with one tick a second).
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Most messages core handles before it dispatches and flushes acks.
const BATCH: usize = 512;
/// An iteration of core that found fewer messages than this yields once before it dispatches
/// and flushes: the callers its answers just woke make their next calls meanwhile, so one
/// dispatch (one wake of a connection's writer, one stream write) carries many entries.
/// Without it, under load core ran an iteration per `send` (about 18,000 iterations for
/// 20,000 sends in `peerbus bench`; about 1,000 with it). The cost is one task yield, paid
/// only when a `send`/`publish` arrived: a request alone is sent at once (with the yield on
/// every iteration, `peerbus bench --only request` gave p50 1.38–1.41 times the raw ping-pong
/// in three runs; without it on requests, 1.01–1.38 in five).
const SMALL_BATCH: usize = 8;

/// The pace of core's ticks, shared with the callers that put requests in the request table
/// without core (see `Requests::quiet`): core learns of those only from the table, so the
/// first one while core ticks slowly wakes it ([`Ticks::request_started`]), and the request's
/// deadline is swept on the fast tick. Everything else that needs the fast tick reaches core
/// as a message.
#[derive(Debug, Default)]
pub(crate) struct Ticks {
    /// Core ticks every [`IDLE_TICK`] (or is about to look whether it may).
    slow: AtomicBool,
    /// Wakes core to tick fast again. One stored permit at most.
    hurry: tokio::sync::Notify,
}

impl Ticks {
    /// Whether core ticks slowly (every [`IDLE_TICK`]); set by `Core::timed_work`.
    fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    /// A caller put a request in the table: wakes core if it ticks slowly. Cheap otherwise
    /// (one relaxed load).
    pub(crate) fn request_started(&self) {
        if self.is_slow() {
            self.hurry.notify_one();
        }
    }
}

/// Who gets a copy of a `send` (one target, no `Vec`) or a `publish` (any number).
pub(crate) enum Targets {
    /// A `send`, or a replayed dead letter.
    One(Target),
    /// A `publish`: one copy per target (shared with [`TopicCache`]).
    Many(Arc<[Target]>),
    /// A `publish` whose targets core finds when the call arrives ([`Core::topic_targets`]),
    /// so that a publish costs one message to core, like a send; core turns it into `Many`
    /// before anything else looks at it.
    Topic(String),
}

impl Targets {
    fn as_slice(&self) -> &[Target] {
        match self {
            Targets::One(t) => std::slice::from_ref(t),
            Targets::Many(v) => v,
            Targets::Topic(_) => &[],
        }
    }

    /// Whether there is certainly no target (a topic's targets are not known yet).
    pub(crate) fn is_empty(&self) -> bool {
        !matches!(self, Targets::Topic(_)) && self.as_slice().is_empty()
    }
}

/// One message of a `send`/`publish` call, before it is stored.
pub(crate) struct Item {
    /// Already in the `Arc` its log entry keeps, made by the caller (core made it before):
    /// inline, the envelope made every call to core 352 bytes, copied at each move of it.
    pub(crate) env: Arc<Envelope>,
    pub(crate) ttl_ms: Option<u64>,
    pub(crate) delay_ms: Option<u64>,
}

/// A `send`/`publish` (or one of their batch forms) waiting to be stored: every message goes
/// to every target, in order, as one call.
pub(crate) struct Append {
    pub(crate) targets: Targets,
    /// The call's first message (the only one of a `send` or `publish`).
    pub(crate) first: Item,
    /// A batch's other messages, in order (empty, and not allocated, for a single message).
    pub(crate) rest: Vec<Item>,
    /// Engine time after which a full log fails the call with a backpressure error.
    pub(crate) deadline: u64,
    /// Answered with the number of copies stored; each stored copy carries a receipt of it.
    pub(crate) reply: CallReply,
}

/// Frames for one connection's writer task.
#[derive(Debug)]
pub(crate) enum Out {
    Control(Control),
    Data {
        lane: usize,
        frame: Data,
    },
    /// The node is stopping: write what was queued before this, finish the control stream,
    /// answer once the peer acknowledged all of it, and write nothing more.
    Close(oneshot::Sender<()>),
}

/// A local handler finished an entry: `Ok` acks it to its origin, `Err((reason, permanent))`
/// nacks it (`permanent`: dead-letter at once).
pub(crate) struct Completion {
    /// The entry (its origin, log and seq say which one).
    pub(crate) env: Arc<Envelope>,
    /// The handler's verdict.
    pub(crate) result: Result<(), (String, bool)>,
}

/// Which connected instances of a service [`CoreMsg::Instances`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Every one.
    Any,
    /// Those that take the service's messages (the instances a `send` goes to).
    Consumer,
    /// Those that serve requests (the instances a `request` goes to).
    Server,
}

/// Messages to the core actor.
pub(crate) enum CoreMsg {
    /// Store and deliver one entry per target; answer with the number of copies stored.
    Append(Append),
    /// The store writer finished a group commit.
    Durable(Durable),
    /// A durable group was unsubscribed for good here: forget it everywhere, release its backlog.
    ReleaseGroup(String),
    /// A handshake finished.
    PeerReady(Box<conn::Ready>),
    /// A connection closed; `stalled` when the peer closed it as stalled (`core/stall.rs`).
    PeerGone {
        peer: NodeId,
        generation: u64,
        reason: String,
        stalled: bool,
    },
    /// A stalled connection's probe completed a handshake with its peer (`core/stall.rs`).
    Reachable { peer: NodeId, generation: u64 },
    /// This node did not run for a while, and a new pause epoch began: replace every
    /// connection opened before it (`super::pause`, `Core::catch_up_pause`).
    Paused,
    /// A dial attempt failed.
    DialFailed {
        peer: Option<NodeId>,
        refused: bool,
        error: String,
    },
    /// Revocation lists this node took (from its files or a peer): pass them on to every
    /// peer that reads them (`super::revocations`).
    Revocations(Vec<Bytes>),
    /// A control frame from a peer.
    Control {
        peer: NodeId,
        generation: u64,
        frame: Control,
    },
    /// Start and write a request (when its caller did not: see [`requests::Requests::quiet`]);
    /// the reply (or error) comes back on `reply`.
    Request {
        service: String,
        /// Behind a pointer, as in `Scatter`: these calls should not size every message to
        /// core. The `Arc` becomes the request frame's.
        env: Arc<Envelope>,
        budget_ms: u64,
        reply: oneshot::Sender<Result<Bytes, RequestError>>,
    },
    /// Send a request to every serving instance of a service, or every node subscribed to a
    /// topic; replies stream into `replies`, `started` says how many were asked.
    Scatter {
        target: ScatterTarget,
        env: Box<Envelope>,
        budget_ms: u64,
        replies: mpsc::Sender<(NodeId, Result<Bytes, String>)>,
        started: oneshot::Sender<usize>,
    },
    /// Local handler finished an entry: ack or nack it to its origin.
    Completed(Completion),
    /// Several [`CoreMsg::Completed`] at once: a handler worker's batch (at most its queue's
    /// size, `WORKER_QUEUE` in `subscription.rs`).
    CompletedBatch(Vec<Completion>),
    /// A discovery event.
    Discovery(DiscoveryEvent),
    /// Local interests changed: tell every peer.
    InterestsChanged,
    /// Status snapshot.
    Status(oneshot::Sender<Status>),
    /// Dead-letters every waiting entry of a log (`Node::dead_letter_waiting`): how many, or
    /// `None` when no such log holds an entry.
    DeadLetterWaiting {
        log: String,
        reply: oneshot::Sender<Option<usize>>,
    },
    /// The first unsettled entries of the logs (at most `limit`).
    Entries {
        limit: usize,
        reply: oneshot::Sender<Vec<crate::control::LogEntryView>>,
    },
    /// Instances currently connected for a service.
    Instances {
        service: String,
        /// Which of them.
        role: Role,
        reply: oneshot::Sender<Vec<NodeId>>,
    },
    /// Begin shutdown: say goodbye to every peer, report the unsettled count.
    Goodbye(oneshot::Sender<()>),
    /// How far a shutdown has settled: see [`Quiet`].
    Quiet(oneshot::Sender<Quiet>),
    /// End of a shutdown: every connection's writer writes what is queued, finishes its
    /// control stream and answers on its receiver once the peer acknowledged it.
    Close(oneshot::Sender<Vec<oneshot::Receiver<()>>>),
}

/// What a shutting-down node still waits for (answer to [`CoreMsg::Quiet`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quiet {
    /// Unsettled entries of this node's logs.
    pub(crate) unsettled: usize,
    /// Handled entries whose ack waits for its dedup window to be persisted or flushed.
    pub(crate) acks_pending: usize,
    /// This node's entries delivered to a peer and not yet acked or timed out. Closing with
    /// any of them would resend them after a restart although their handlers may have run.
    pub(crate) in_flight: usize,
}

struct Link {
    generation: u64,
    tx: mpsc::Sender<Out>,
    conn: Connection,
    incarnation: u64,
    service: String,
    serves: bool,
    /// Whether the peer takes its service's messages (an instance for `send`).
    consumes: bool,
    cancel: CancellationToken,
    /// The connection's [`super::ConnState`] flag: set when it closes or is retired.
    gone: Arc<AtomicBool>,
    /// The [`super::pause`] epoch the connection opened in: a later one closes it.
    opened_in: u64,
    /// The latest deadline (engine ms) of the peer's requests that arrived on it (set by its
    /// lane readers): once retired, it stays open until then.
    serving: Arc<AtomicU64>,
    /// The peer retired this connection (see `Core::link_retired_by_peer`): it carries our
    /// requests until the connection the peer keeps arrives, and no deliveries.
    peer_retired: bool,
    /// The protocol version the connection speaks.
    protocol: u32,
    /// What the connection received lately, and its probe while it is stalled (`stall.rs`).
    rx: stall::RxWatch,
}

struct Known {
    service: Option<String>,
    addrs: Vec<SocketAddr>,
    advertised: bool,
    dialing: Option<CancellationToken>,
    state: PeerState,
    last_error: Option<String>,
    /// Deliveries sent to this peer (retries included), entries of ours it acknowledged, and
    /// entries of its that our handlers finished: the live page's link rates.
    delivered_to: u64,
    acked_by: u64,
    handled_from: u64,
    /// What this peer's closed connections carried ([`Core::bank_traffic`]); the open ones'
    /// figures are added when asked.
    traffic: Traffic,
}

impl Known {
    /// A peer first heard of now, in `state`.
    fn new(state: PeerState, advertised: bool) -> Self {
        Known {
            service: None,
            addrs: Vec::new(),
            advertised,
            dialing: None,
            state,
            last_error: None,
            delivered_to: 0,
            acked_by: 0,
            handled_from: 0,
            traffic: Traffic::default(),
        }
    }
}

/// Who a scatter request goes to.
#[derive(Clone, Debug)]
pub(crate) enum ScatterTarget {
    /// Every connected instance of the service that serves requests.
    Service(String),
    /// Every connected node with an interest matching the topic (and serving requests).
    Topic(String),
}

/// The connection generation of the local node in the outbox (real connections count from 1).
const LOCAL_CONN: u64 = 0;
/// Dead letters of one settle that are each logged at warn and shown as a mesh event; the
/// rest get one line and one event (an operator's `dlq move` of a whole log, or a burst of
/// expiries, would write thousands, and push every other event out of the page's list).
const DEAD_LETTER_WARNINGS: usize = 8;

/// The local node as a consumer of its own logs: it is a peer in the outbox (same credits,
/// rendezvous, retries, ack timeout and dead letters as any instance), its deliveries go
/// through the local lanes instead of a connection, and its acks and nacks are applied to the
/// outbox directly.
struct LocalPeer {
    /// Queues of the local lane tasks (`conn::spawn_local_lanes`).
    lanes: Vec<mpsc::Sender<Inbound>>,
    /// Whether the outbox currently counts us as an instance of our service: `messages()`
    /// was taken and its subscription is alive.
    service: bool,
    /// Ids of the local subscriptions the outbox's view of our interests was built from.
    subs: Vec<u64>,
}

struct Core {
    shared: Arc<Shared>,
    /// Every stored copy carries its call's receipt, handed back when it settles (and answered
    /// [`DeliveryError::Stopped`] when the outbox is dropped with it).
    outbox: Outbox<CopyReceipt>,
    links: FastMap<NodeId, Link>,
    known: FastMap<NodeId, Known>,
    /// The buffer each dispatch fills and drains (empty between dispatches; its capacity is
    /// at most one dispatch's deliveries, bounded by the peers' credits).
    transmits: Vec<Transmit>,
    next_generation: u64,
    /// Acks to send on the next flush, per origin and log (as many origins as send to this
    /// node between two flushes, each with its few logs; emptied by every flush).
    pending_acks: BTreeMap<NodeId, Vec<(String, Vec<u64>)>>,
    /// Durable groups seen in any node's interests or heard of, kept after their instances
    /// leave so a publisher keeps copies for a group whose instances are all down, and released
    /// ones, so older news cannot bring them back (see [`groups`]).
    known_groups: KnownGroups,
    /// The targets of recent publishes, by topic (see [`topics`]).
    topic_cache: TopicCache,
    /// Released groups whose backlog waits for no connected node's interests to name them
    /// (see [`Core::release_backlogs`]); a subset of the released groups, so at most
    /// [`groups::MAX_RELEASED_GROUPS`].
    deferred_releases: BTreeSet<String>,
    seeds: Vec<SocketAddr>,
    seed_dialing: HashMap<SocketAddr, CancellationToken>,
    closing: bool,
    store: mpsc::Sender<StoreOp>,
    clock: Clock,
    /// `send` calls waiting for room in a full log, oldest first.
    parked: std::collections::VecDeque<Append>,
    limits: Limits,
    last_sync: u64,
    /// A `send`/`publish` arrived since the last dispatch (see [`SMALL_BATCH`]).
    appended: bool,
    /// With [`Durability::Interval`](crate::store::Durability::Interval): a store write was
    /// queued since the last tick's sync, so core keeps the fast tick until it syncs.
    unsynced: std::cell::Cell<bool>,
    local: LocalPeer,
    /// Connections that lost a tie-break and close once their requests are answered, by
    /// generation (at most [`retire::MAX_RETIRING`]).
    retiring: FastMap<u64, Retiring>,
    /// Connections retired since start (see `Status::connections_retired`).
    connections_retired: u64,
    /// The probes of stalled connections that may run at once (`core/stall.rs`).
    probes: Arc<tokio::sync::Semaphore>,
    /// Peers whose stalled connection was replaced (`core/stall.rs`), or who retired the
    /// connection we used (`core/retire.rs`), with that connection's generation and when its
    /// entries in flight stop waiting for the peer's next connection. At most one per peer.
    held: FastMap<NodeId, (u64, u64)>,
    /// The pause epoch and the summed length of the pauses (ms) that core has handled
    /// (`Core::catch_up_pause`).
    pauses_seen: (u64, u64),
}

/// Log size limits (see `NodeBuilder::max_log_entries` and friends).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) log_entries: usize,
    pub(crate) total_bytes: usize,
    pub(crate) max_parked: usize,
}

/// What core starts with.
pub(crate) struct CoreInit {
    pub(crate) cfg: OutboxConfig,
    pub(crate) store: mpsc::Sender<StoreOp>,
    pub(crate) recovered: Option<crate::store::Recovered>,
    pub(crate) start_unix_ms: u64,
    pub(crate) limits: Limits,
    /// Engine time before which recovered entries are not sent (`NodeBuilder::recovered_hold`).
    pub(crate) recovered_hold_ms: u64,
}

pub(crate) async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<CoreMsg>, init: CoreInit) {
    let clock = Clock {
        start_unix_ms: init.start_unix_ms,
    };
    let mut outbox = Outbox::with_receipts(init.cfg);
    let mut known_groups = KnownGroups::default();
    if let Some(rec) = init.recovered {
        for (log, next) in &rec.next_seqs {
            outbox.bump_seq(log, *next);
        }
        for e in rec.entries {
            let expires = e.expires_at_ms.map(|t| clock.engine_time(t));
            // Held until the instances this node knew have had time to connect: sent to the
            // first one that did, an entry another instance handled would be handled twice.
            let not_before = e
                .not_before_ms
                .map_or(0, |t| clock.engine_time(t))
                .max(init.recovered_hold_ms);
            outbox.restore(e.env, expires, not_before);
        }
        known_groups = KnownGroups::restore(rec.groups);
        let (live, released) = known_groups.counts();
        if live + released > 0 {
            info!(
                live,
                released, "restored known durable groups from the store"
            );
        }
        if !outbox.is_empty() {
            info!(
                entries = outbox.len(),
                hold_ms = init.recovered_hold_ms,
                "resuming delivery of entries recovered from the store after the recovered hold"
            );
        }
    }
    // The local node consumes its own logs like any instance (see `LocalPeer`); what it
    // consumes is filled in by `refresh_local` below.
    outbox.peer_up(
        shared.id,
        LOCAL_CONN,
        String::new(),
        Vec::new(),
        shared.prefetch,
    );
    let local = LocalPeer {
        lanes: conn::spawn_local_lanes(&shared),
        service: false,
        subs: Vec::new(),
    };
    let known_groups_released = known_groups.released_names().cloned().collect();
    let mut core = Core {
        shared: shared.clone(),
        outbox,
        links: FastMap::default(),
        known: FastMap::default(),
        transmits: Vec::new(),
        next_generation: 1,
        pending_acks: BTreeMap::new(),
        known_groups,
        topic_cache: TopicCache::default(),
        // A group released before the restart whose backlog was still kept (a peer's interests
        // named it when the node stopped): released at the first look, below.
        deferred_releases: known_groups_released,
        seeds: Vec::new(),
        seed_dialing: HashMap::new(),
        closing: false,
        store: init.store,
        clock,
        parked: std::collections::VecDeque::new(),
        limits: init.limits,
        last_sync: 0,
        appended: false,
        unsynced: std::cell::Cell::new(false),
        local,
        retiring: FastMap::default(),
        connections_retired: 0,
        probes: Arc::new(tokio::sync::Semaphore::new(stall::MAX_PROBES)),
        held: FastMap::default(),
        pauses_seen: (0, 0),
    };
    core.refresh_local(true);
    // The next tick: after TICK, or IDLE_TICK while core has no timed work. Each tick is set
    // from the end of the last, so a late one does not bring a burst.
    let tick = tokio::time::sleep(TICK);
    tokio::pin!(tick);
    loop {
        let mut ticked = false;
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                core.handle(msg);
                // Only sends gain from the wait; a request alone goes out at once.
                if 1 + core.drain(&mut rx) < SMALL_BATCH && core.appended {
                    tokio::task::yield_now().await;
                    core.drain(&mut rx);
                }
            }
            () = &mut tick => {
                core.on_tick();
                ticked = true;
            }
            () = shared.ticks.hurry.notified() => {}
            () = shared.cancel.cancelled() => break,
        }
        core.dispatch();
        core.flush_acks();
        core.appended = false;
        // Fast ticks look again at each tick; slow ones at every wake, so the first work
        // brings the fast tick back at once.
        if ticked || shared.ticks.is_slow() {
            let busy = core.timed_work();
            if ticked || busy {
                let next = if busy { TICK } else { IDLE_TICK };
                tick.as_mut().reset(tokio::time::Instant::now() + next);
            }
        }
    }
    core.stop();
}

impl Core {
    /// Handles the messages queued already, at most [`BATCH`]; returns how many.
    fn drain(&mut self, rx: &mut mpsc::Receiver<CoreMsg>) -> usize {
        let mut n = 0;
        while n < BATCH {
            match rx.try_recv() {
                Ok(m) => self.handle(m),
                Err(_) => break,
            }
            n += 1;
        }
        n
    }

    fn now(&self) -> u64 {
        self.shared.now()
    }

    /// Whether core has work its ticks do: entries in the outbox (ack timeouts, retries,
    /// TTLs, delayed entries, parked logs), calls parked for room in the log, requests in
    /// flight, retired connections, or (with `Durability::Interval`) store writes not yet
    /// synced. Marks the ticks slow first and fast again when there is work: a caller that
    /// puts a request in the table after core looked sees `slow` and wakes it (the table's
    /// lock orders the two).
    fn timed_work(&self) -> bool {
        self.shared.ticks.slow.store(true, Ordering::Relaxed);
        let busy = !self.outbox.is_empty()
            || !self.parked.is_empty()
            || !self.retiring.is_empty()
            || self.unsynced.get()
            || super::lock(&self.shared.requests).len() > 0;
        if busy {
            self.shared.ticks.slow.store(false, Ordering::Relaxed);
        }
        busy
    }

    /// Queues `op` to the store writer without waiting; every store operation core makes
    /// goes through here. With `Durability::Interval` a write (anything but the sync itself)
    /// waits for the tick's sync, so core keeps ticking fast until then.
    // `try_send`'s own result: a full queue hands the operation back, so the caller can
    // answer for it (a cold path; boxing it would allocate on every write).
    #[allow(clippy::result_large_err)]
    fn to_store(&self, op: StoreOp) -> Result<(), mpsc::error::TrySendError<StoreOp>> {
        if matches!(
            self.shared.durability,
            crate::store::Durability::Interval(_)
        ) && !matches!(op, StoreOp::Sync)
        {
            self.unsynced.set(true);
        }
        self.store.try_send(op)
    }

    /// Whether entries and dedup windows go to a durable store (not
    /// [`Durability::Memory`](crate::store::Durability::Memory)).
    fn persistent(&self) -> bool {
        self.shared.durability != crate::store::Durability::Memory
    }

    fn handle(&mut self, msg: CoreMsg) {
        match msg {
            CoreMsg::Append(mut a) => {
                self.appended = true;
                if let Targets::Topic(topic) = &a.targets {
                    a.targets = Targets::Many(self.topic_targets(topic));
                    if a.targets.is_empty() {
                        // Nobody subscribes: nothing to store, nothing to wait for.
                        a.reply.send(Ok(0));
                        return;
                    }
                }
                if !self.parked.is_empty() {
                    self.park(a);
                } else {
                    self.append(a);
                }
            }
            CoreMsg::Durable(d) => self.on_durable(d),
            CoreMsg::ReleaseGroup(group) => self.release_group(&group),
            CoreMsg::Revocations(lists) => self.pass_on_revocations(lists, None),
            CoreMsg::PeerReady(ready) => self.peer_ready(*ready),
            CoreMsg::PeerGone {
                peer,
                generation,
                reason,
                stalled,
            } => {
                let hold_until = stalled.then(|| self.now() + stall::RECONNECT_HOLD);
                self.peer_gone(peer, generation, &reason, hold_until);
            }
            CoreMsg::Reachable { peer, generation } => self.peer_reachable(peer, generation),
            CoreMsg::Paused => self.catch_up_pause(),
            CoreMsg::DialFailed {
                peer,
                refused,
                error,
            } => {
                if let Some(k) = peer.and_then(|p| self.known.get_mut(&p)) {
                    if refused && k.state != PeerState::Refused {
                        self.shared.events.emit(
                            EventKind::Refused,
                            peer,
                            k.service.as_deref(),
                            error.clone(),
                        );
                    }
                    if k.state != PeerState::Connected {
                        k.state = if refused {
                            PeerState::Refused
                        } else {
                            PeerState::Unreachable
                        };
                    }
                    k.last_error = Some(error);
                } else if refused {
                    self.shared
                        .events
                        .emit(EventKind::Refused, None, None, error);
                }
            }
            CoreMsg::Control {
                peer,
                generation,
                frame,
            } => self.on_control(peer, generation, frame),
            CoreMsg::Request {
                service,
                env,
                budget_ms,
                reply,
            } => {
                let now = self.shared.now();
                let started =
                    super::lock(&self.shared.requests).start(&service, env, budget_ms, reply, now);
                match started {
                    Ok(request) => request.send(&self.shared),
                    Err((error, reply)) => {
                        let _ = reply.send(Err(error));
                    }
                }
            }
            CoreMsg::Scatter {
                target,
                env,
                budget_ms,
                replies,
                started,
            } => {
                let n = self.scatter(target, &env, budget_ms, replies);
                let _ = started.send(n);
            }
            CoreMsg::Completed(c) => self.completed(c),
            CoreMsg::CompletedBatch(cs) => {
                for c in cs {
                    self.completed(c);
                }
            }
            CoreMsg::Discovery(ev) => self.on_discovery(ev),
            CoreMsg::InterestsChanged => {
                self.refresh_local(false);
                let (interests, serves) = {
                    let r = super::read(&self.shared.routes);
                    (r.interests(), r.serve.is_some())
                };
                for l in self.links.values() {
                    try_out(l, Out::Control(Control::Interests(interests.clone())));
                    try_out(l, Out::Control(Control::Serves(serves)));
                }
            }
            CoreMsg::Status(reply) => {
                let _ = reply.send(self.status());
            }
            CoreMsg::DeadLetterWaiting { log, reply } => {
                let moved = self
                    .outbox
                    .dead_letter_waiting(&log, crate::control::MOVED_BY_OPERATOR);
                let n = moved.as_ref().map(Vec::len);
                if let Some(n) = n {
                    info!(%log, entries = n, "moving the log's waiting entries to the dead letters");
                }
                self.settle(moved.unwrap_or_default());
                let _ = reply.send(n);
            }
            CoreMsg::Entries { limit, reply } => {
                let clock = &self.clock;
                let views = self
                    .outbox
                    .entries(limit)
                    .iter()
                    .map(|e| crate::control::LogEntryView::of_entry(e, |t| clock.unix_time(t)))
                    .collect();
                let _ = reply.send(views);
            }
            CoreMsg::Instances {
                service,
                role,
                reply,
            } => {
                let mut v: Vec<NodeId> = self
                    .links
                    .iter()
                    .filter(|(id, l)| {
                        l.service == service
                            && match role {
                                Role::Any => true,
                                Role::Consumer => l.consumes,
                                Role::Server => l.serves,
                            }
                            && !self.outbox.is_draining(**id)
                    })
                    .map(|(id, _)| *id)
                    .collect();
                v.sort();
                let _ = reply.send(v);
            }
            CoreMsg::Goodbye(reply) => {
                self.closing = true;
                // Like a peer that said goodbye: no new local work, in-flight entries may
                // still be acked.
                self.outbox.peer_draining(self.shared.id);
                for (_, k) in self.known.iter_mut() {
                    if let Some(c) = k.dialing.take() {
                        c.cancel();
                    }
                }
                for c in self.seed_dialing.values() {
                    c.cancel();
                }
                // A peer that went away is not waited for now (what is in flight drains).
                self.end_holds(u64::MAX);
                for l in self.links.values() {
                    try_out(l, Out::Control(Control::Goodbye));
                }
                let _ = reply.send(());
            }
            CoreMsg::Close(reply) => {
                let mut closed = Vec::with_capacity(self.links.len() + self.retiring.len());
                for l in self.links.values() {
                    let (tx, rx) = oneshot::channel();
                    try_out(l, Out::Close(tx));
                    closed.push(rx);
                }
                closed.extend(self.retiring.values().map(|r| r.close_writer()));
                let _ = reply.send(closed);
            }
            CoreMsg::Quiet(reply) => {
                let in_flight = if self.outbox.is_empty() {
                    0
                } else {
                    self.outbox.stats().values().map(|s| s.in_flight).sum()
                };
                let _ = reply.send(Quiet {
                    unsettled: self.outbox.len(),
                    acks_pending: self
                        .pending_acks
                        .values()
                        .flatten()
                        .map(|(_, seqs)| seqs.len())
                        .sum(),
                    in_flight,
                });
            }
        }
    }

    fn on_tick(&mut self) {
        self.shared
            .counters
            .core_ticks
            .fetch_add(1, Ordering::Relaxed);
        if self.shared.pause.overdue(std::time::Instant::now()) {
            // This node has just run again after a pause that its watch has not seen yet:
            // every ack deadline and hold looks due, though no ack could be read meanwhile.
            // The watch runs next; until it has, nothing times out.
            return;
        }
        self.catch_up_pause();
        let now = self.now();
        // Interval durability: sync at least once per interval even when no commit comes.
        if let crate::store::Durability::Interval(every) = self.shared.durability {
            let every = (every.as_millis() as u64).max(1);
            if now.saturating_sub(self.last_sync) >= every {
                self.last_sync = now;
                self.unsynced.set(false);
                self.store_op(StoreOp::Sync);
            }
        }
        self.expire_parked(now);
        let settled = self.outbox.check_timers(now);
        self.settle(settled);
        // Requests whose deadline passed: a failure for the breaker.
        let expired = super::lock(&self.shared.requests).expire(now);
        requests::give_all(expired);
        self.settle_all_retired();
        self.expire_retired(now);
        self.end_holds(now);
        if !self.closing {
            self.watch_stalls(now);
        }
    }

    fn dispatch(&mut self) {
        if self.closing && self.persistent() {
            // Shutting down: what is in flight drains (see `Node::shutdown`); the rest stays
            // in the store and goes out after the restart.
            return;
        }
        self.refresh_local(false);
        let now = self.now();
        let lanes = self.shared.lanes;
        let mut transmits = std::mem::take(&mut self.transmits);
        self.outbox.dispatch_into(now, &mut transmits);
        for t in transmits.drain(..) {
            let redelivered = &self.shared.counters.redelivered;
            if t.peer == self.shared.id {
                if t.resend {
                    redelivered.fetch_add(1, Ordering::Relaxed);
                }
                self.deliver_local(t.frame);
                continue;
            }
            let Some(l) = self.links.get(&t.peer) else {
                continue;
            };
            if l.generation != t.conn {
                continue;
            }
            if t.resend {
                redelivered.fetch_add(1, Ordering::Relaxed);
            }
            let lane = match &t.frame {
                Data::Deliver { env, .. } => {
                    crate::engine::routing::lane_for(&env.log, env.key.as_deref(), lanes, env.seq)
                }
                _ => 0,
            };
            if let Some(k) = self.known.get_mut(&t.peer) {
                k.delivered_to += 1;
            }
            if let Data::Deliver { env, .. } = &t.frame {
                trace!(
                    peer = %t.peer.short(),
                    id = %format_args!("{}/{}/{}", env.origin, env.log, env.seq),
                    destination = %env.destination,
                    attempt = env.attempt,
                    "deliver"
                );
            }
            try_out(
                l,
                Out::Data {
                    lane,
                    frame: t.frame,
                },
            );
        }
        self.transmits = transmits;
    }

    fn flush_acks(&mut self) {
        let mut local_settled = false;
        for (peer, logs) in std::mem::take(&mut self.pending_acks) {
            for (log, seqs) in logs {
                if peer == self.shared.id {
                    let acked = self.outbox.on_ack(peer, &log, &seqs);
                    debug_assert_eq!(acked.refused, 0, "this node acked what it was never sent");
                    local_settled |= !acked.settled.is_empty();
                    self.settle(acked.settled);
                } else if let Some(l) = self.links.get(&peer) {
                    try_out(l, Out::Control(Control::Ack { log, seqs }));
                }
            }
        }
        // Local acks freed credit now; do not wait for the next event to use it.
        if local_settled {
            self.dispatch();
        }
    }

    /// A delivery the outbox chose the local node for: onto its local lane (same lane choice
    /// as a connection, so one key stays in order). Core never waits: a full lane leaves the
    /// entry in flight, to be resent after the ack timeout.
    fn deliver_local(&mut self, frame: Data) {
        let Data::Deliver {
            floor,
            key_floor,
            env,
        } = frame
        else {
            return;
        };
        let lanes = self.local.lanes.len().max(1);
        let lane = crate::engine::routing::lane_for(&env.log, env.key.as_deref(), lanes, env.seq);
        trace!(
            id = %format_args!("{}/{}/{}", env.origin, env.log, env.seq),
            destination = %env.destination,
            attempt = env.attempt,
            "deliver locally"
        );
        let Some(tx) = self.local.lanes.get(lane) else {
            return;
        };
        match tx.try_send(Inbound {
            env,
            floor,
            key_floor,
            // The local "connection" lasts as long as the node.
            conn: self.shared.cancel.clone().into(),
            received: std::time::Instant::now(),
        }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => warn!(
                limit = super::LOCAL_LANE_QUEUE,
                "local lane full: the entry is resent after the ack timeout"
            ),
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Brings the outbox's view of what the local node consumes up to date with its routes:
    /// an instance of its service while `messages()` is taken and alive, a member of the groups
    /// (and ephemeral patterns) of its subscriptions. Cheap when nothing changed (a read lock
    /// and a comparison of subscription ids), so core runs it before every dispatch: a dropped
    /// subscription only `try_send`s its notice.
    fn refresh_local(&mut self, force: bool) {
        let (service, subs, interests) = {
            let r = super::read(&self.shared.routes);
            let service = r.takes_messages();
            if !force
                && service == self.local.service
                && r.subs
                    .iter()
                    .map(|s| s.id)
                    .eq(self.local.subs.iter().copied())
            {
                return;
            }
            let subs: Vec<u64> = r.subs.iter().map(|s| s.id).collect();
            (service, subs, r.interests())
        };
        let id = self.shared.id;
        let name = instance_of(&self.shared.service, service);
        self.outbox.peer_service(id, name);
        if service != self.local.service {
            // Peers send to our service only while we take its messages.
            for l in self.links.values() {
                try_out(l, Out::Control(Control::Consumes(service)));
            }
        }
        // Our own groups are known groups like any peer's: a publish here keeps their copies
        // after the local subscription goes away.
        self.remember_groups(&interests, true);
        self.outbox.peer_interests(id, interests);
        self.release_backlogs();
        self.local.service = service;
        self.local.subs = subs;
    }

    fn settle(&mut self, settled: Vec<Settled<CopyReceipt>>) {
        let any = !settled.is_empty();
        let persistent = self.persistent();
        // One store op for all of them.
        let mut removed = Vec::with_capacity(if persistent { settled.len() } else { 0 });
        let mut dead_lettered = 0usize;
        for s in settled {
            if persistent {
                removed.push((s.env.log.clone(), s.seq));
            }
            if let Outcome::DeadLettered { reason } = &s.outcome {
                self.store_op(StoreOp::Dead(DeadLetter {
                    id: 0,
                    env: Envelope::clone(&s.env),
                    reason: reason.clone(),
                    attempts: s.attempts,
                    dead_at_ms: crate::message::now_unix_ms(),
                }));
            }
            let result = match &s.outcome {
                Outcome::Acked { by } => {
                    trace!(
                        peer = %by.short(),
                        id = %format_args!("{}/{}/{}", s.env.origin, s.env.log, s.seq),
                        destination = %s.env.destination,
                        "acknowledged"
                    );
                    if let Some(k) = self.known.get_mut(by) {
                        k.acked_by += 1;
                    }
                    self.shared.counters.acked.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Outcome::Released { reason } => Err(DeliveryError::Released {
                    reason: reason.clone(),
                }),
                Outcome::DeadLettered { reason } => {
                    self.shared
                        .counters
                        .dead_lettered
                        .fetch_add(1, Ordering::Relaxed);
                    dead_lettered += 1;
                    if dead_lettered <= DEAD_LETTER_WARNINGS {
                        warn!(log = %s.env.log, seq = s.seq, attempts = s.attempts, %reason, "dead-lettered");
                        self.shared.events.emit(
                            EventKind::DeadLetter,
                            None,
                            None,
                            format!(
                                "{}#{} after {} attempts: {reason}",
                                s.env.log, s.seq, s.attempts
                            ),
                        );
                    }
                    Err(DeliveryError::DeadLettered {
                        reason: reason.clone(),
                    })
                }
            };
            if let Some(receipt) = s.receipt {
                receipt.send(result);
            }
        }
        if dead_lettered > DEAD_LETTER_WARNINGS {
            let more = dead_lettered - DEAD_LETTER_WARNINGS;
            warn!(more, "dead-lettered more entries at once (not each logged)");
            self.shared.events.emit(
                EventKind::DeadLetter,
                None,
                None,
                format!("and {more} more dead-lettered at once"),
            );
        }
        if !removed.is_empty() {
            self.store_op(StoreOp::Remove(removed));
        }
        if any {
            self.unpark();
        }
    }

    fn store_op(&self, op: StoreOp) {
        if self.to_store(op).is_err() {
            warn!(
                limit = super::storage::STORE_QUEUE,
                "store queue full: a removal or dead letter is not persisted yet (it is \
                 replayed as a duplicate after a crash, never lost)"
            );
        }
    }

    /// A local handler finished an entry: ack or nack it to its origin. With a durable store
    /// the ack waits until the dedup window that now includes `seq` is persisted (so a crash
    /// after the ack can never make the handler run again for it).
    fn completed(&mut self, c: Completion) {
        let Completion { env, result } = c;
        let (origin, seq) = (env.origin, env.seq);
        match result {
            Ok(()) => {
                if let Some(k) = self.known.get_mut(&origin) {
                    k.handled_from += 1;
                }
                self.ack_after_persist(origin, &env.log, seq);
            }
            Err((reason, permanent)) if origin == self.shared.id => {
                let now = self.now();
                let settled = self
                    .outbox
                    .on_nack(origin, &env.log, seq, &reason, permanent, now);
                self.settle(settled.into_iter().collect());
            }
            Err((reason, permanent)) => {
                if let Some(l) = self.links.get(&origin) {
                    try_out(
                        l,
                        Out::Control(Control::Nack {
                            log: env.log.to_string(),
                            seq,
                            reason,
                            permanent,
                        }),
                    );
                }
            }
        }
    }

    fn ack_after_persist(&mut self, origin: NodeId, log: &str, seq: u64) {
        if !self.persistent() {
            // Nothing survives a restart of an in-memory node: ack at once.
            self.queue_ack(origin, log, seq);
            return;
        }
        let snap = super::lock(&self.shared.inbox).snapshot(origin, log);
        let Some(snap) = snap else {
            self.queue_ack(origin, log, seq);
            return;
        };
        if let Err(e) = self.to_store(StoreOp::Window(snap, (origin, log.to_owned(), seq)))
            && let StoreOp::Window(_, (o, l, s)) = e.into_inner()
        {
            warn!("store queue full: acking without persisting the dedup window first");
            self.queue_ack(o, &l, s);
        }
    }

    /// Queues the ack of `(origin, log, seq)` for the next [`Core::flush_acks`]; the log name
    /// is copied only for the first ack of its log since the last flush.
    fn queue_ack(&mut self, origin: NodeId, log: &str, seq: u64) {
        let logs = self.pending_acks.entry(origin).or_default();
        match logs.iter_mut().find(|(l, _)| l == log) {
            Some((_, seqs)) => seqs.push(seq),
            None => logs.push((log.to_owned(), vec![seq])),
        }
    }

    /// Who gets a copy of a publish on `topic` ([`find_topic_targets`]), from the
    /// answers kept since the interests and groups last changed.
    fn topic_targets(&mut self, topic: &str) -> Arc<[Target]> {
        let now = (self.outbox.peer_changes(), self.known_groups.changes());
        let (outbox, known_groups) = (&self.outbox, &self.known_groups);
        let targets = self.topic_cache.get_or_compute(topic, now, || {
            find_topic_targets(outbox, known_groups, topic)
        });
        // Tests run debug builds: every publish in them checks the kept answer.
        debug_assert_eq!(
            &*targets,
            &find_topic_targets(outbox, known_groups, topic)[..],
            "a kept answer for topic {topic} is out of date"
        );
        targets
    }

    /// Whether a call to `targets` must wait for room: the total of all logs, or one of its
    /// logs, is full.
    fn over_limit(&self, targets: &Targets) -> bool {
        let (total, _) = self.outbox.bytes("");
        if total >= self.limits.total_bytes {
            return true;
        }
        // No log can be full while all of them hold fewer entries than one may.
        if self.outbox.len() < self.limits.log_entries {
            return false;
        }
        targets
            .as_slice()
            .iter()
            .any(|t| self.outbox.log_len(&t.log_name()) >= self.limits.log_entries)
    }

    fn park(&mut self, a: Append) {
        if self.parked.len() >= self.limits.max_parked {
            a.reply.send(Err(SendError::Backpressure {
                destination: a.first.env.destination.to_string(),
                entries: self.outbox.len(),
                waited: Duration::ZERO,
            }));
            return;
        }
        self.parked.push_back(a);
    }

    fn unpark(&mut self) {
        while let Some(a) = self.parked.pop_front() {
            if self.over_limit(&a.targets) {
                self.parked.push_front(a);
                break;
            }
            self.append(a);
        }
    }

    fn expire_parked(&mut self, now: u64) {
        let mut keep = std::collections::VecDeque::with_capacity(self.parked.len());
        for a in self.parked.drain(..) {
            if a.deadline <= now {
                let entries = self.outbox.len();
                a.reply.send(Err(SendError::Backpressure {
                    destination: a.first.env.destination.to_string(),
                    entries,
                    waited: Duration::from_millis(now.saturating_sub(a.deadline)),
                }));
            } else {
                keep.push_back(a);
            }
        }
        self.parked = keep;
    }

    fn append(&mut self, a: Append) {
        if self.over_limit(&a.targets) {
            self.park(a);
            return;
        }
        let now = self.now();
        // With a durable store an entry waits (staged) until its commit; in memory there is
        // nothing to wait for, so it is sendable at once and `send` returns at once.
        let staged = self.persistent();
        let Append {
            targets,
            first,
            rest,
            reply,
            ..
        } = a;
        let targets = targets.as_slice();
        let mut copies = 0;
        let mut stored = Vec::new();
        let last = targets.len().saturating_sub(1);
        for item in std::iter::once(first).chain(rest) {
            // The envelope is copied for every target but the last, which takes it (the outbox
            // copies an envelope it does not hold alone).
            let mut env = Some(item.env);
            let not_before = item.delay_ms.map(|d| now + d);
            for (i, t) in targets.iter().enumerate() {
                let copy = if i == last { env.take() } else { env.clone() };
                let Some(copy) = copy else { break };
                if t.is_ephemeral() {
                    // Online-only: not stored, no receipt; dropped if its subscriber disconnects.
                    self.outbox
                        .append(t, copy, now, item.ttl_ms, not_before, false);
                    self.shared.counters.sent.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let receipt = Some(reply.copy_receipt());
                let e = self.outbox.append_with_receipt(
                    t,
                    copy,
                    now,
                    item.ttl_ms,
                    not_before,
                    staged,
                    receipt,
                );
                copies += 1;
                self.shared.counters.sent.fetch_add(1, Ordering::Relaxed);
                if staged {
                    stored.push(StoredEntry {
                        expires_at_ms: item.ttl_ms.map(|t| self.clock.unix_time(now + t)),
                        not_before_ms: item.delay_ms.map(|d| self.clock.unix_time(now + d)),
                        env: e,
                    });
                }
            }
        }
        if stored.is_empty() {
            reply.send(Ok(copies));
            return;
        }
        let call = StagedCall {
            entries: stored,
            reply,
        };
        if let Err(e) = self.to_store(StoreOp::Append(call)) {
            let StoreOp::Append(call) = e.into_inner() else {
                return;
            };
            for e in &call.entries {
                self.outbox.discard_staged(&e.env.log, e.env.seq);
            }
            let destination = call
                .entries
                .first()
                .map(|e| e.env.destination.to_string())
                .unwrap_or_default();
            call.reply.send(Err(SendError::Backpressure {
                destination,
                entries: self.outbox.len(),
                waited: Duration::ZERO,
            }));
        }
    }

    /// A group commit ended: its copies become sendable (or, if it failed, are dropped; the
    /// store writer answers the calls).
    fn on_durable(&mut self, d: Durable) {
        for env in &d.appended {
            if d.error.is_some() {
                self.outbox.discard_staged(&env.log, env.seq);
            } else {
                self.outbox.mark_durable(&env.log, env.seq);
            }
        }
        for (origin, log, seq) in d.acks {
            self.queue_ack(origin, &log, seq);
        }
    }

    /// Whether `peer` can have been sent entries of `log`: a service's log goes only to
    /// instances of that service (whether or not they take its messages now), a node's
    /// ephemeral log only to that node. A group's log goes to any node that subscribed to the
    /// group at some point; for it, and for every entry, the outbox checks that the entry
    /// itself was sent to `peer` (`Outbox::on_ack`).
    fn may_ack(&self, peer: NodeId, log: &str) -> bool {
        match log.split_once(':') {
            Some(("svc", service)) => self.links.get(&peer).is_some_and(|l| l.service == service),
            Some(("eph", _)) => log == Target::Node(peer).log_name(),
            _ => true,
        }
    }

    /// Closes the current connection to `peer`, which broke the protocol (its closing path
    /// then hands what was in flight to it to other instances).
    fn close_for_violation(&self, peer: NodeId, reason: &str) {
        if let Some(l) = self.links.get(&peer) {
            l.conn.close(CloseCode::ProtocolViolation, reason);
        }
    }

    /// `peer` acknowledged `seqs` of our log `log`.
    fn peer_acked(&mut self, peer: NodeId, log: &str, seqs: &[u64]) {
        // A buggy or hostile member would settle entries it was never sent: their receipts
        // would say acknowledged and their handlers would never run.
        let refused = if self.may_ack(peer, log) {
            let acked = self.outbox.on_ack(peer, log, seqs);
            self.settle(acked.settled);
            acked.refused
        } else {
            seqs.len()
        };
        if refused > 0 {
            warn!(peer = %peer.short(), %log, refused, "peer acknowledged entries that were never sent to it; closing the connection");
            self.close_for_violation(peer, "ack of entries never sent to this node");
        }
    }

    fn on_control(&mut self, peer: NodeId, generation: u64, frame: Control) {
        if matches!(frame, Control::Retired) {
            self.on_retired(peer, generation);
            return;
        }
        // Group states are versioned, so news of them is good from any of the peer's
        // connections, a retired one too: a release sent on a connection the other side
        // retired meanwhile (two nodes that dialed each other at once) would be lost.
        if let Control::Groups(groups) = frame {
            self.merge_groups(groups);
            return;
        }
        // Revocation lists are signed by the mesh CA: good from any connection, as groups.
        if let Control::Revocations(lists) = frame {
            let news = super::revocations::News::FromPeer(peer, lists);
            if self.shared.revocations.try_send(news).is_err() {
                debug!(peer = %peer.short(), "revocation lists waiting to be checked are many; dropping the peer's (others pass them on too)");
            }
            return;
        }
        if self
            .links
            .get(&peer)
            .is_none_or(|l| l.generation != generation)
        {
            return;
        }
        match frame {
            Control::Ack { log, seqs } => self.peer_acked(peer, &log, &seqs),
            Control::AckRuns { log, runs } => match Control::expand_runs(&runs) {
                Some(seqs) => self.peer_acked(peer, &log, &seqs),
                None => {
                    warn!(peer = %peer.short(), %log, "peer acknowledged more than {MAX_ACK_RUN_SEQS} entries in one frame; closing the connection");
                    self.close_for_violation(peer, "too many acks in one frame");
                }
            },
            Control::Nack {
                log,
                seq,
                reason,
                permanent,
            } => {
                let now = self.now();
                let settled = self
                    .outbox
                    .on_nack(peer, &log, seq, &reason, permanent, now);
                self.settle(settled.into_iter().collect());
            }
            Control::Interests(interests) => {
                self.remember_groups(&interests, false);
                self.outbox.peer_interests(peer, interests);
                self.release_backlogs();
            }
            Control::Goodbye => {
                info!(peer = %peer.short(), "peer is shutting down");
                self.outbox.peer_draining(peer);
                super::lock(&self.shared.requests).set_draining(peer);
                self.shared.notify_peers_changed();
                // Do not redial it when the connection closes; discovery announces it again
                // when it comes back.
                if let Some(k) = self.known.get_mut(&peer) {
                    k.advertised = false;
                    if let Some(c) = k.dialing.take() {
                        c.cancel();
                    }
                }
            }
            Control::Serves(serves) => {
                if let Some(l) = self.links.get_mut(&peer)
                    && l.serves != serves
                {
                    l.serves = serves;
                    super::lock(&self.shared.requests).set_serves(peer, serves);
                    self.shared.notify_peers_changed();
                }
            }
            Control::Consumes(consumes) => {
                if let Some(l) = self.links.get_mut(&peer) {
                    l.consumes = consumes;
                    let service = instance_of(&l.service, consumes);
                    self.outbox.peer_service(peer, service);
                    self.shared.notify_peers_changed();
                }
            }
            Control::Hello(_) => {
                if let Some(l) = self.links.get(&peer) {
                    l.conn.close(CloseCode::ProtocolViolation, "second hello");
                }
            }
            // Handled above, whichever connection they came on.
            Control::Retired | Control::Groups(_) | Control::Revocations(_) => {}
        }
    }

    /// Sends revocation lists to `to`, or to every peer, where the connection's protocol
    /// reads them ([`REVOCATION_LISTS_VERSION`]). A list larger than this node's largest
    /// message is not sent: the operator gives it to each node by file.
    fn pass_on_revocations(&self, lists: Vec<Bytes>, to: Option<&Link>) {
        let max = self.shared.max_message_size;
        let (fit, large): (Vec<Bytes>, Vec<Bytes>) =
            lists.into_iter().partition(|l| l.len() <= max);
        if !large.is_empty() {
            warn!(
                lists = large.len(),
                max_message_size = max,
                "a mesh CA revocation list is too large to pass on to peers; give it to each node by its file (--mesh-crl)"
            );
        }
        if fit.is_empty() {
            return;
        }
        let frame = Control::Revocations(fit);
        match to {
            Some(l) => try_out(l, Out::Control(frame)),
            None => {
                for l in self
                    .links
                    .values()
                    .filter(|l| l.protocol >= REVOCATION_LISTS_VERSION)
                {
                    try_out(l, Out::Control(frame.clone()));
                }
            }
        }
    }

    /// Merges a peer's news of durable groups (see [`KnownGroups::merge`]).
    fn merge_groups(&mut self, groups: Vec<(String, GroupState)>) {
        let mut changes = Changes::default();
        for (g, state) in groups
            .into_iter()
            .take(MAX_KNOWN_GROUPS + MAX_RELEASED_GROUPS)
        {
            let live = if state.is_released() {
                self.outbox.group_patterns(&g, Some(self.shared.id))
            } else {
                Vec::new()
            };
            self.known_groups.merge(&g, state, &live, &mut changes);
        }
        self.groups_changed(changes);
    }

    /// Learns the durable groups in a node's own `interests`: this node's (`local`, which
    /// subscribes a group held as released again, with a newer version) or a peer's (see
    /// [`KnownGroups::subscribed`]). What changed is stored and passed on.
    fn remember_groups(&mut self, interests: &[Interest], local: bool) {
        let mut changes = Changes::default();
        for i in interests {
            if let Some(g) = &i.group {
                self.known_groups
                    .subscribed(g, &i.pattern, local, &mut changes);
            }
        }
        self.groups_changed(changes)
    }

    /// Releases the backlog of the released groups that no connected node's interests name
    /// any more. A group released while a connected peer's interests still named it keeps its
    /// backlog until they do not (an update or the peer's disconnection): those interests may
    /// be older than the release, or the peer still subscribes and answers the release with a
    /// newer live version, which must find the group's copies kept.
    fn release_backlogs(&mut self) {
        if self.deferred_releases.is_empty() {
            return;
        }
        for group in std::mem::take(&mut self.deferred_releases) {
            if !self.known_groups.is_released(&group) {
                continue; // live again: its backlog stays
            }
            if !self.outbox.group_patterns(&group, None).is_empty() {
                self.deferred_releases.insert(group);
                continue;
            }
            let released = self.outbox.release_log(
                &Target::Group(group.as_str().into()).log_name(),
                &format!("subscriber group `{group}` was unsubscribed"),
            );
            if !released.is_empty() {
                info!(
                    group,
                    entries = released.len(),
                    "released the backlog of an unsubscribed group"
                );
            }
            self.settle(released);
        }
    }

    /// Acts on changes of the known groups: stores them, releases the backlog of groups
    /// released now, and tells every peer the new states (a peer that had them changes
    /// nothing, so the news stops once everyone has it).
    fn groups_changed(&mut self, mut changes: Changes) {
        if changes.is_empty() {
            return;
        }
        // Only the newest state of a group matters (a union adds its patterns one by one).
        let mut newest: BTreeMap<String, GroupState> = BTreeMap::new();
        for (g, state) in changes.changed.drain(..) {
            newest.insert(g, state);
        }
        for (group, state) in &newest {
            debug!(
                group,
                version = state.version,
                released = state.is_released(),
                "durable group changed"
            );
        }
        if self.persistent() {
            for (g, state) in &newest {
                self.store_op(StoreOp::Group(g.clone(), Some(state.clone())));
            }
            for g in &changes.forgotten {
                self.store_op(StoreOp::Group(g.clone(), None));
            }
        }
        self.deferred_releases.extend(changes.released);
        self.release_backlogs();
        if !newest.is_empty() {
            let frame = Control::Groups(newest.into_iter().collect());
            for l in self.links.values() {
                try_out(l, Out::Control(frame.clone()));
            }
        }
    }

    /// Releases a durable group for good (`Node::unsubscribe_group`): a newer version, released,
    /// which every node adopts, forgetting the group and releasing its backlog.
    fn release_group(&mut self, group: &str) {
        let mut changes = Changes::default();
        self.known_groups.release(group, &mut changes);
        self.groups_changed(changes);
    }

    fn scatter(
        &mut self,
        target: ScatterTarget,
        env: &Envelope,
        budget_ms: u64,
        replies: mpsc::Sender<(NodeId, Result<Bytes, String>)>,
    ) -> usize {
        let peers: Vec<NodeId> = self
            .links
            .iter()
            .filter(|(id, l)| {
                l.serves
                    && !self.outbox.is_draining(**id)
                    && match &target {
                        ScatterTarget::Service(s) => &l.service == s,
                        ScatterTarget::Topic(t) => self.outbox.peer_matches_topic(**id, t),
                    }
            })
            .map(|(id, _)| *id)
            .collect();
        let name = match &target {
            ScatterTarget::Service(s) | ScatterTarget::Topic(s) => s,
        };
        let now = self.shared.now();
        let started =
            super::lock(&self.shared.requests).scatter(peers, name, env, budget_ms, &replies, now);
        let n = started.len();
        for request in started {
            request.send(&self.shared);
        }
        n
    }

    fn on_discovery(&mut self, ev: DiscoveryEvent) {
        if self.closing {
            return;
        }
        match ev {
            DiscoveryEvent::Up(rec) => {
                if rec.node_id == self.shared.id {
                    return;
                }
                if !self.room_in_known(rec.node_id) {
                    warn!(
                        limit = MAX_KNOWN_PEERS,
                        "too many known peers, none of them gone; ignoring a discovered one"
                    );
                    return;
                }
                let k = self
                    .known
                    .entry(rec.node_id)
                    .or_insert_with(|| Known::new(PeerState::Discovered, true));
                k.service = Some(rec.service.clone());
                k.addrs = rec.addrs.clone();
                k.advertised = true;
                debug!(peer = %rec.node_id.short(), service = %rec.service, addrs = ?rec.addrs, "discovered");
                if !self.links.contains_key(&rec.node_id) {
                    self.start_dial(rec.node_id);
                }
            }
            DiscoveryEvent::Down(id) => {
                if let Some(k) = self.known.get_mut(&id) {
                    k.advertised = false;
                    if let Some(c) = k.dialing.take() {
                        c.cancel();
                    }
                    if !self.links.contains_key(&id) {
                        k.state = PeerState::Gone;
                    }
                }
            }
            DiscoveryEvent::Seed(addr) => {
                if !self.seeds.contains(&addr) {
                    self.seeds.push(addr);
                }
                self.start_seed_dial(addr);
            }
            DiscoveryEvent::SeedGone(addr) => self.seed_gone(addr),
        }
    }

    /// The seed `addr` left its DNS records: its dial loop stops, and no node is dialed there
    /// any more. A node known only there is gone: its redial stops too. A live connection to
    /// it stays, as the connection is the truth about liveness, but is not redialed once it
    /// ends, unless the address comes back. (A node that moved to a new address keeps only
    /// the new one, so its addresses do not pile up as it moves again and again.)
    fn seed_gone(&mut self, addr: SocketAddr) {
        self.seeds.retain(|s| *s != addr);
        if let Some(c) = self.seed_dialing.remove(&addr) {
            c.cancel();
        }
        for (peer, k) in &mut self.known {
            if !k.addrs.contains(&addr) {
                continue;
            }
            k.addrs.retain(|a| *a != addr);
            if !k.addrs.is_empty() {
                continue;
            }
            debug!(peer = %peer.short(), %addr, "seed left the DNS records");
            k.advertised = false;
            if let Some(c) = k.dialing.take() {
                c.cancel();
            }
            if !self.links.contains_key(peer) {
                k.state = PeerState::Gone;
            }
        }
    }

    /// Whether `peer` fits in the known peers: it is there, there is room (fewer than
    /// [`MAX_KNOWN_PEERS`]), or a gone peer (no longer advertised, not connected, not
    /// dialed) made room, the first one found; what it loses is that peer's figures. Nodes
    /// that come and go with fresh identities (containers without a data directory) would
    /// otherwise fill the map for good, and a node would then ignore every new peer.
    fn room_in_known(&mut self, peer: NodeId) -> bool {
        if self.known.len() < MAX_KNOWN_PEERS || self.known.contains_key(&peer) {
            return true;
        }
        let gone = self.known.iter().find(|(id, k)| {
            k.state == PeerState::Gone && k.dialing.is_none() && !self.links.contains_key(*id)
        });
        let Some(gone) = gone.map(|(id, _)| *id) else {
            return false;
        };
        self.known.remove(&gone);
        true
    }

    fn start_dial(&mut self, peer: NodeId) {
        self.start_dial_after(peer, Duration::ZERO);
    }

    /// Dials `peer` (unless a dial is under way) after `delay`.
    fn start_dial_after(&mut self, peer: NodeId, delay: Duration) {
        let Some(k) = self.known.get_mut(&peer) else {
            return;
        };
        if k.dialing.as_ref().is_some_and(|c| !c.is_cancelled()) || k.addrs.is_empty() {
            return;
        }
        let token = self.shared.cancel.child_token();
        k.dialing = Some(token.clone());
        if k.state != PeerState::Connected {
            k.state = PeerState::Connecting;
        }
        let shared = self.shared.clone();
        let addrs = k.addrs.clone();
        self.shared
            .tracker
            .spawn(conn::dial_loop(shared, addrs, Some(peer), delay, token));
    }

    /// Dials the seed `addr` unless a dial is under way or a peer there is connected.
    fn start_seed_dial(&mut self, addr: SocketAddr) {
        if self.links.values().any(|l| l.conn.remote_addr() == addr) {
            return;
        }
        self.spawn_seed_dial(addr, Duration::ZERO);
    }

    /// Dials the seed `addr` after `delay`, unless a dial of it is under way.
    fn spawn_seed_dial(&mut self, addr: SocketAddr, delay: Duration) {
        if self.seed_dial_under_way(&addr) {
            return;
        }
        let token = self.shared.cancel.child_token();
        self.seed_dialing.insert(addr, token.clone());
        let shared = self.shared.clone();
        self.shared
            .tracker
            .spawn(conn::dial_loop(shared, vec![addr], None, delay, token));
    }

    /// A new generation, writer queue, cancel token, flags and direct stream for the
    /// connection `r`, about to start (`gone`: whether it starts out retired).
    fn connection_handles(&mut self, r: &conn::Ready, gone: bool) -> conn::ConnHandles {
        let generation = self.next_generation;
        self.next_generation += 1;
        let (out, rx) = mpsc::channel(super::LINK_QUEUE);
        conn::ConnHandles {
            generation,
            out,
            rx,
            cancel: self.shared.cancel.child_token(),
            gone: Arc::new(AtomicBool::new(gone)),
            opened_in: self.shared.pause.epoch(),
            serving: Arc::new(AtomicU64::new(0)),
            direct: Arc::new(conn::DirectStream::new(r.conn.clone(), r.version)),
        }
    }

    fn peer_ready(&mut self, r: conn::Ready) {
        let peer = r.hello.node_id;
        let local = self.shared.id;
        if self.closing {
            r.conn.close(CloseCode::Shutdown, "node is shutting down");
            return;
        }
        if peer == local {
            // A seed that is our own address: the local node is its own peer already.
            r.conn
                .close(CloseCode::ProtocolViolation, "connected to itself");
            return;
        }
        // Retired connections of an earlier run of the peer are dead.
        self.close_retired_of(peer, r.hello.incarnation);
        // So is a link that receives nothing while the peer reaches us on a new one.
        self.replace_if_stalled(peer, r.hello.incarnation);
        // A tie-break between two connections of a live peer is no news for the event feed
        // (the connections retired above and here are of this run of the peer).
        let restarted = self
            .links
            .get(&peer)
            .map(|l| l.incarnation != r.hello.incarnation)
            .or_else(|| self.has_retired(peer).then_some(false));
        if let Some(existing) = self.links.get(&peer) {
            let preferred_dialer = local.min(peer);
            let dialer_of = |c: &Connection| if c.is_dialer() { local } else { peer };
            // Replaced when the peer restarted (the old connection is dead) or retired it
            // (it keeps another one: this, or one after it), else by the tie-break.
            let replace = existing.incarnation != r.hello.incarnation
                || existing.peer_retired
                || (dialer_of(&r.conn) == preferred_dialer
                    && dialer_of(&existing.conn) != preferred_dialer);
            if !replace {
                // The peer may have taken this one first and sent requests on it.
                debug!(peer = %peer.short(), "duplicate connection: keeping the existing one, retiring the new one");
                self.retire_new(r);
                return;
            }
            if let Some(old) = self.links.remove(&peer) {
                self.outbox.peer_down(peer, old.generation);
                if restarted == Some(true) {
                    debug!(peer = %peer.short(), "the peer restarted: closing its old connection");
                    old.conn
                        .close(CloseCode::DuplicateConnection, "duplicate connection");
                    self.bank_traffic(peer, &old.conn);
                    old.cancel.cancel();
                    self.fail_requests_on(peer, old.generation);
                } else {
                    debug!(peer = %peer.short(), "duplicate connection: retiring the existing one");
                    let heard = old.peer_retired;
                    self.retire(peer, old, heard);
                }
            }
        }
        let handles = self.connection_handles(&r, false);
        let generation = handles.generation;
        self.remember_groups(&r.hello.interests, false);
        self.outbox.peer_up(
            peer,
            generation,
            instance_of(&r.hello.service, r.hello.consumes),
            r.hello.interests.clone(),
            r.hello.credits,
        );
        let addr = r.conn.remote_addr();
        info!(peer = %peer.short(), service = %r.hello.service, %addr, dialer = r.conn.is_dialer(), protocol = r.version, "peer connected");
        match restarted {
            None => self.shared.events.emit(
                EventKind::PeerUp,
                Some(peer),
                Some(&r.hello.service),
                format!("connected ({addr})"),
            ),
            Some(true) => self.shared.events.emit(
                EventKind::PeerUp,
                Some(peer),
                Some(&r.hello.service),
                format!("reconnected: the peer restarted ({addr})"),
            ),
            Some(false) => {}
        }
        // A connected peer is known even past the limit (connections have their own).
        self.room_in_known(peer);
        let k = self
            .known
            .entry(peer)
            .or_insert_with(|| Known::new(PeerState::Connected, false));
        k.service = Some(r.hello.service.clone());
        if !k.addrs.contains(&addr) && r.conn.is_dialer() {
            k.addrs.push(addr);
        }
        k.state = PeerState::Connected;
        k.last_error = None;
        if self.seeds.contains(&addr) {
            k.advertised = true;
            if let Some(c) = self.seed_dialing.remove(&addr) {
                c.cancel();
            }
        }
        if let Some(c) = k.dialing.take() {
            c.cancel();
        }
        let link = Link {
            generation,
            tx: handles.out.clone(),
            conn: r.conn.clone(),
            incarnation: r.hello.incarnation,
            service: r.hello.service.clone(),
            serves: r.hello.serves,
            consumes: r.hello.consumes,
            cancel: handles.cancel.clone(),
            gone: handles.gone.clone(),
            opened_in: handles.opened_in,
            serving: handles.serving.clone(),
            peer_retired: false,
            protocol: r.version,
            rx: stall::RxWatch::new(self.now()),
        };
        let way = requests::Way {
            direct: handles.direct.clone(),
            tx: handles.out.clone(),
        };
        let route = requests::Route::new(generation, r.hello.service.clone(), r.hello.serves, way);
        super::lock(&self.shared.requests).link_up(peer, route);
        self.links.insert(peer, link);
        self.shared.notify_peers_changed();
        conn::spawn_connection(self.shared.clone(), r, handles);
        if let Some(l) = self.links.get(&peer) {
            // Our hello was built before this connection was registered: an interest or
            // `serve` change in between never reached this peer. Send the current state once.
            let (interests, serves, consumes) = {
                let r = super::read(&self.shared.routes);
                (r.interests(), r.serve.is_some(), r.takes_messages())
            };
            try_out(l, Out::Control(Control::Interests(interests)));
            try_out(l, Out::Control(Control::Serves(serves)));
            try_out(l, Out::Control(Control::Consumes(consumes)));
            // Every group we know, released ones included: a peer that was away learns of
            // releases, and its older news of them loses.
            try_out(l, Out::Control(Control::Groups(self.known_groups.states())));
            if l.protocol >= REVOCATION_LISTS_VERSION {
                let lists = self.shared.endpoint.revocation_lists();
                if !lists.is_empty() {
                    let lists = lists.into_iter().map(Bytes::from).collect();
                    self.pass_on_revocations(lists, Some(l));
                }
            }
        }
    }

    /// The connection `generation` to `peer` closed. With `hold_until`, what was in flight
    /// to the peer stays its own until then (it gets no new entries meanwhile): if it
    /// reconnects first, that goes out again on the new connection (see `core/stall.rs`).
    fn peer_gone(&mut self, peer: NodeId, generation: u64, reason: &str, hold_until: Option<u64>) {
        if self
            .retiring
            .get(&generation)
            .is_some_and(|r| r.peer == peer)
        {
            debug!(peer = %peer.short(), %reason, "retired connection closed");
            self.close_retired(generation);
            return;
        }
        if self
            .links
            .get(&peer)
            .is_none_or(|l| l.generation != generation)
        {
            return;
        }
        if let Some(l) = self.links.remove(&peer) {
            l.cancel.cancel();
            self.bank_traffic(peer, &l.conn);
            if self.seeds.contains(&l.conn.remote_addr()) && !self.closing {
                self.start_seed_dial(l.conn.remote_addr());
            }
            self.shared.notify_peers_changed();
        }
        info!(peer = %peer.short(), %reason, "peer disconnected");
        let service = self.known.get(&peer).and_then(|k| k.service.as_deref());
        self.shared
            .events
            .emit(EventKind::PeerDown, Some(peer), service, reason);
        match hold_until.filter(|_| !self.closing) {
            Some(until) => self.hold_in_flight(peer, generation, until),
            None => {
                self.outbox.peer_down(peer, generation);
                self.release_backlogs();
            }
        }
        self.fail_requests_on(peer, generation);
        let advertised = self.known.get(&peer).is_some_and(|k| k.advertised);
        if let Some(k) = self.known.get_mut(&peer) {
            k.state = if advertised {
                PeerState::Unreachable
            } else {
                PeerState::Gone
            };
            k.last_error = Some(reason.to_string());
        }
        // A seed is redialed by its own loop (started above): a second, per-peer loop to the
        // same address made a second connection, and a tie-break retired one of them.
        if advertised && !self.closing && !self.seed_loops_reach(peer) {
            self.start_dial(peer);
        }
    }

    /// Whether a seed's dial loop is under way for every address `peer` is known at.
    fn seed_loops_reach(&self, peer: NodeId) -> bool {
        self.known.get(&peer).is_some_and(|k| {
            !k.addrs.is_empty() && k.addrs.iter().all(|a| self.seed_dial_under_way(a))
        })
    }

    /// Whether the dial loop of the seed `addr` runs.
    fn seed_dial_under_way(&self, addr: &SocketAddr) -> bool {
        self.seed_dialing
            .get(addr)
            .is_some_and(|c| !c.is_cancelled())
    }

    /// Fails the requests that went to `peer` on the connection of `generation`, which ended.
    fn fail_requests_on(&mut self, peer: NodeId, generation: u64) {
        let now = self.shared.now();
        let lost = super::lock(&self.shared.requests).fail_on(peer, generation, now);
        requests::give_all(lost);
    }

    /// Adds what a connection to `peer` that ends now carried to the peer's figures.
    fn bank_traffic(&mut self, peer: NodeId, conn: &Connection) {
        let t = conn.traffic();
        if let Some(k) = self.known.get_mut(&peer) {
            k.traffic += t;
        }
    }

    /// `banked` (a peer's closed connections) plus what its open connections carried so far,
    /// the retired ones still open included.
    fn traffic_with(&self, peer: NodeId, banked: Traffic) -> Traffic {
        let open = self.links.get(&peer).map(|l| l.conn.traffic());
        let retiring = self
            .retiring
            .values()
            .filter(|r| r.peer == peer)
            .map(Retiring::traffic);
        open.into_iter()
            .chain(retiring)
            .fold(banked, |sum, t| sum + t)
    }

    fn status(&self) -> Status {
        let (requests_in_flight, breakers) = {
            let requests = super::lock(&self.shared.requests);
            let breakers = requests.breakers(self.shared.now()).collect();
            (requests.len(), breakers)
        };
        let mut peers: Vec<PeerInfo> = self
            .known
            .iter()
            .map(|(id, k)| PeerInfo {
                node_id: *id,
                service: k.service.clone().unwrap_or_default(),
                addrs: k.addrs.clone(),
                state: k.state,
                rtt_ms: self
                    .links
                    .get(id)
                    .map(|l| l.conn.rtt().as_secs_f64() * 1000.0),
                last_error: k.last_error.clone(),
                delivered_to: k.delivered_to,
                acked_by: k.acked_by,
                handled_from: k.handled_from,
                dialer: self.links.get(id).map(|l| {
                    if l.conn.is_dialer() {
                        self.shared.id
                    } else {
                        *id
                    }
                }),
                consumes: self.links.get(id).is_some_and(|l| l.consumes),
                traffic: self.traffic_with(*id, k.traffic),
                protocol: self.links.get(id).map(|l| l.protocol),
            })
            .collect();
        peers.sort_by(|a, b| (&a.service, a.node_id).cmp(&(&b.service, b.node_id)));
        let c = &self.shared.counters;
        let d = c.delivery_counts();
        // One snapshot serves the closes by code and those of revoked certificates, one
        // count of the lists' revocations both fields that depend on them.
        let closes = self.shared.endpoint.local_closes();
        let revoked = self.shared.endpoint.revoked_certificates();
        Status {
            node_id: self.shared.id,
            service: self.shared.service.clone(),
            mesh: self.shared.mesh.clone(),
            listen: self.shared.endpoint.local_addr(),
            peers,
            connections: self.links.len(),
            retiring_connections: self.retiring.len(),
            connections_retired: self.connections_retired,
            connections_closed: closes
                .by_cause()
                .map(|(cause, n)| (cause.to_string(), n))
                .collect(),
            logs: self.outbox.stats(),
            dead_letters: self.shared.dead_letters_stored.load(Ordering::Relaxed),
            sent: d.sent,
            acked: d.acked,
            received: d.received,
            delivered: d.delivered,
            redelivered: d.redelivered,
            requests_in_flight,
            requests_own_stream: c.requests_own_stream.load(Ordering::Relaxed),
            request_streams_opened: c.request_streams_opened.load(Ordering::Relaxed),
            core_ticks: c.core_ticks.load(Ordering::Relaxed),
            pauses: c.pauses.load(Ordering::Relaxed),
            sends_waiting: self.parked.len(),
            stall_probes: stall::MAX_PROBES.saturating_sub(self.probes.available_permits()),
            mesh_certificate_expires: self
                .shared
                .endpoint
                .certificate_expires()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            mesh_certificate_services: self.shared.endpoint.certificate_services(),
            mesh_keys: self
                .shared
                .endpoint
                .mesh_keys()
                .iter()
                .map(peerbus_transport::MeshKey::fingerprint)
                .collect(),
            mesh_certificate_revoked: self.shared.endpoint.own_certificate_revoked(),
            mesh_ca_revoked: revoked,
            mesh_ca_lists: self.shared.endpoint.revocation_list_info(),
            // Counted with a mesh CA only (which alone has revocation lists).
            mesh_ca_refused_revoked: revoked.map(|_| closes.revoked_certificates()),
            breakers,
            groups: self.known_groups.states().into_iter().collect(),
        }
    }

    fn stop(&mut self) {
        for l in self.links.values() {
            l.cancel.cancel();
        }
        for r in self.retiring.values() {
            r.cancel.cancel();
        }
        // The receipts of unsettled copies answer `DeliveryError::Stopped` when the outbox
        // goes with core.
        for a in self.parked.drain(..) {
            a.reply.send(Err(SendError::Stopped));
        }
        let stopped = super::lock(&self.shared.requests).stop();
        requests::give_all(stopped);
    }
}

/// Who gets a copy of a publish on `topic`: every durable group known to subscribe to it
/// (from connected peers, groups seen before, and groups other nodes told us of), and every
/// connected node with a matching ephemeral subscription.
fn find_topic_targets(
    outbox: &Outbox<CopyReceipt>,
    known_groups: &KnownGroups,
    topic: &str,
) -> Vec<Target> {
    let mut groups: BTreeSet<String> = outbox.groups_for(topic);
    groups.extend(known_groups.matching(topic).cloned());
    let mut targets: Vec<Target> = groups
        .into_iter()
        .map(|g| Target::Group(g.into()))
        .collect();
    targets.extend(outbox.ephemeral_for(topic).into_iter().map(Target::Node));
    targets
}

fn try_out(l: &Link, out: Out) {
    try_queue(&l.tx, &l.conn, out);
}

/// Queues `out` to the writer of `conn` (its queue `tx`) without waiting. A full queue means
/// the peer stopped reading: the connection is closed, and what was sent on it is failed or
/// sent again when core learns it ended.
pub(crate) fn try_queue(tx: &mpsc::Sender<Out>, conn: &Connection, out: Out) {
    match tx.try_send(out) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            warn!(
                peer = %conn.peer_id().short(),
                limit = super::LINK_QUEUE,
                "outgoing queue full: the peer stopped reading; closing the connection"
            );
            conn.close(CloseCode::Unresponsive, "peer stopped reading");
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

impl<R> Outbox<R> {
    /// Whether the peer said goodbye.
    pub(crate) fn is_draining(&self, peer: NodeId) -> bool {
        self.draining_peers().any(|p| p == peer)
    }
}

/// The service name a peer is an instance of in the outbox: its own while it takes its
/// messages, none (an empty name, which matches no service) while it does not.
fn instance_of(service: &str, consumes: bool) -> String {
    if consumes {
        service.to_string()
    } else {
        String::new()
    }
}

/// Records a hello for a connection: used by `conn` to build ours.
pub(crate) fn local_hello(shared: &Shared) -> Hello {
    let routes = super::read(&shared.routes);
    Hello {
        version: shared.protocol,
        node_id: shared.id,
        service: shared.service.clone(),
        mesh: shared.mesh.clone(),
        interests: routes.interests(),
        serves: routes.serve.is_some(),
        credits: shared.prefetch,
        incarnation: shared.incarnation,
        consumes: routes.takes_messages(),
        min_version: shared.min_protocol,
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of;

    /// Every message to core, frame to a writer and queued transmit is copied at each move
    /// (into a channel's slot, out of it, into a future's state): sized by their largest
    /// variant, they were 352, 256 and 288 bytes while a send needs about 40 (ARCHITECTURE,
    /// "Hot path notes"). A large new variant belongs behind a pointer.
    #[test]
    fn what_moves_per_message_stays_small() {
        let sizes = [
            ("CoreMsg", size_of::<super::CoreMsg>(), 128),
            ("Out", size_of::<super::Out>(), 64),
            ("Transmit", size_of::<crate::engine::outbox::Transmit>(), 96),
            ("Data", size_of::<crate::engine::wire::Data>(), 48),
        ];
        for (name, size, most) in sizes {
            assert!(size <= most, "{name} is {size} bytes, over {most}");
        }
    }
}
