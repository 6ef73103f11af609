//! Sender-side delivery state: the logs of entries waiting for, or in flight
//! to, a consumer; which instance gets what; acks, nacks, timeouts, retries
//! and expiry.
//!
//! Invariants:
//! - an entry leaves a log only when acknowledged, expired or dead-lettered,
//!   and each of these is reported as a [`Settled`] output;
//! - an entry with key `k` is transmitted only when every earlier unsettled
//!   entry with key `k` is in flight to the same instance (pipelining on one
//!   connection) — so a key moves to another instance only after its
//!   in-flight entries are settled or their instance is gone;
//! - an instance never holds more unacknowledged entries than it granted
//!   credits for.

use std::collections::{BTreeMap, BTreeSet, btree_map};
use std::sync::Arc;

use peerbus_transport::NodeId;
use smol_str::{SmolStr, SmolStrBuilder, format_smolstr};

use super::FastMap;
use super::recipients::{self, Recipients};
use super::routing::{rendezvous, topic_matches};
use super::seqset::SeqSet;
use super::wire::{Data, Envelope, Interest};

/// Most entries one [`Outbox::poll`] looks at per log. Bounds the work per
/// event when a long backlog sits behind a key that cannot move.
pub const SCAN_BUDGET_PER_POLL: usize = 65_536;

/// Who consumes a log.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Every instance of a service competes for `send`s to it.
    Service(SmolStr),
    /// A subscriber group: instances with an interest in this group.
    Group(SmolStr),
    /// One node's ephemeral subscriptions: online-only copies, dropped when it disconnects.
    Node(NodeId),
}

impl Target {
    /// The log's name: `svc:<service>`, `grp:<group>` or `eph:<node id>` (kept inline, not
    /// allocated, up to 23 bytes).
    pub fn log_name(&self) -> SmolStr {
        let prefixed = |prefix: &str, name: &str| {
            let mut s = SmolStrBuilder::new();
            s.push_str(prefix);
            s.push_str(name);
            s.finish()
        };
        match self {
            Target::Service(s) => prefixed("svc:", s),
            Target::Group(g) => prefixed("grp:", g),
            Target::Node(n) => format_smolstr!("eph:{n}"),
        }
    }

    /// Whether copies for this target are online-only (not stored, no receipt).
    pub fn is_ephemeral(&self) -> bool {
        matches!(self, Target::Node(_))
    }

    /// Parses a log name back into its target.
    pub fn from_log_name(name: &str) -> Option<Target> {
        if let Some(s) = name.strip_prefix("svc:") {
            Some(Target::Service(s.into()))
        } else {
            if let Some(g) = name.strip_prefix("grp:") {
                Some(Target::Group(g.into()))
            } else {
                name.strip_prefix("eph:")
                    .and_then(|n| n.parse().ok())
                    .map(Target::Node)
            }
        }
    }
}

/// Retry and timeout policy.
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    /// An in-flight entry with no ack after this long is sent again.
    pub ack_timeout_ms: u64,
    /// Attempts (handler failures and ack timeouts) before an entry is dead-lettered.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `backoff_max_ms`, with ±50 % jitter.
    pub backoff_base_ms: u64,
    /// Cap of the retry delay.
    pub backoff_max_ms: u64,
    /// Seed of the jitter generator (tests pass a fixed one).
    pub seed: u64,
    /// First sequence number of a log that has none stored. For a node with a data directory
    /// the runtime passes the Unix time in ms × 1,000,000, so a log whose stored counter was
    /// lost (a quarantined record, a deleted store file next to a kept identity) never reuses
    /// numbers that receivers' dedup windows have seen — which would drop new messages as
    /// duplicates. Room: a log can take a million entries per millisecond of downtime before it
    /// catches up with the base of a later start. A node without one has a new identity each
    /// run and passes 1.
    pub seq_base: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            ack_timeout_ms: 30_000,
            max_attempts: 10,
            backoff_base_ms: 200,
            backoff_max_ms: 30_000,
            seed: 0x9e37_79b9_7f4a_7c15,
            seq_base: 1,
        }
    }
}

/// How an entry left its log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A consumer handled it and acknowledged.
    Acked {
        /// The instance that acknowledged.
        by: NodeId,
    },
    /// Released without delivery: its subscriber group was unsubscribed.
    Released {
        /// Why.
        reason: String,
    },
    /// Given up: moved to the dead-letter store with this reason.
    DeadLettered {
        /// Why (`ttl expired`, `handler rejected: …`, `gave up after N attempts`).
        reason: String,
    },
}

/// An entry that left its log, with the receipt it was appended with (see
/// [`Outbox::append_with_receipt`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled<R = ()> {
    /// Its sequence number (in the log `env.log`).
    pub seq: u64,
    /// The entry itself (for the dead-letter store).
    pub env: Arc<Envelope>,
    /// Attempts made.
    pub attempts: u32,
    /// What happened.
    pub outcome: Outcome,
    /// The entry's receipt: whatever the caller wants told of the outcome.
    pub receipt: Option<R>,
}

/// A frame for the runtime to put on the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct Transmit {
    /// The receiving instance.
    pub peer: NodeId,
    /// The connection generation it must go out on.
    pub conn: u64,
    /// Whether the entry went out before: a retry, or a resend after its connection was lost
    /// or replaced, which keeps its attempt number (only failures count as attempts).
    pub resend: bool,
    /// The frame.
    pub frame: Data,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Appended but not yet durable in the store: not sent, and later entries of its key wait.
    Staged,
    Pending,
    InFlight {
        peer: NodeId,
        conn: u64,
        sent_at: u64,
    },
}

#[derive(Debug)]
struct Entry<R> {
    /// Shared with the frames that carry it: a delivery clones the pointer, not the strings.
    env: Arc<Envelope>,
    /// Handed back in the entry's [`Settled`], so the caller keeps no map of its own.
    receipt: Option<R>,
    state: State,
    not_before: u64,
    expires_at: Option<u64>,
    attempts: u32,
    /// It was in flight on a connection that closed or was replaced, so its peer may have
    /// handled it: without a key, it goes back to an instance it was sent to when one is
    /// connected, whose dedup window drops it if so (a key's instance is chosen by the key).
    lost_in_flight: bool,
    /// The nodes it was sent to: only they may ack it.
    sent_to: recipients::Mask,
    /// The connection generation its last failed attempt timed out on (no ack in time); 0
    /// when its handler failed it, or it never failed. When that connection is gone, the
    /// attempt's backoff ends ([`Outbox::requeue_peer`]).
    timed_out_on: u64,
}

/// One unsettled entry as [`Outbox::entries`] shows it.
#[derive(Clone, Debug)]
pub struct EntrySnapshot {
    /// The message.
    pub env: Arc<Envelope>,
    /// Where it stands.
    pub state: EntryState,
    /// Delivery attempts that failed (a nack, an ack timeout) so far.
    pub attempts: u32,
    /// Not sent before this time (engine ms; 0: at once).
    pub not_before: u64,
    /// When it expires (engine ms); `None`: never.
    pub expires_at: Option<u64>,
}

/// Where an unsettled entry stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// Appended, its store commit not done yet.
    Staged,
    /// Waiting for a consumer (none connected, no credit, its key's earlier entries, a
    /// backoff or delay).
    Waiting,
    /// Sent to this node, not acknowledged yet.
    InFlight(NodeId),
}

#[derive(Debug)]
struct Log<R> {
    /// Who consumes it (parsed from its name once, not on every dispatch); `None` for a name
    /// that names no target (never dispatched).
    target: Option<Target>,
    entries: BTreeMap<u64, Entry<R>>,
    /// Payload bytes of the entries.
    bytes: usize,
    /// Unsettled seqs per key, and what dispatch last learnt of their chain.
    keys: FastMap<SmolStr, KeySeqs>,
    /// Counts the entries that went from in flight back to waiting (a nack, a timeout, a lost
    /// peer): a [`KeyRun`] made before the last one may be out of date.
    returns: u64,
    next_seq: u64,
    /// No entry below this seq is `Pending` (they are in flight or staged): dispatch starts
    /// here instead of walking the in-flight window at the head of the log each time. Every
    /// transition to `Pending` lowers it ([`now_waiting`]); dispatch raises it.
    pending_from: u64,
    /// `(expires_at, seq)` of the entries with a TTL, soonest first: the expiry pass reads
    /// the ones due instead of walking every entry.
    expiring: BTreeSet<(u64, u64)>,
    /// `(sent_at, seq)` of the entries in flight, oldest first: the ack-timeout pass reads
    /// the ones overdue, and a lost peer's entries are found, without walking the entries
    /// that wait (an offline consumer's backlog).
    in_flight: BTreeSet<(u64, u64)>,
}

/// Takes entry `seq` out of its log's `in_flight` index if `state` is in flight: it is
/// leaving that state (settled, replaced, or back to waiting).
fn left_flight(in_flight: &mut BTreeSet<(u64, u64)>, seq: u64, state: &State) {
    if let State::InFlight { sent_at, .. } = *state {
        in_flight.remove(&(sent_at, seq));
    }
}

/// The unsettled entries of one key of a log.
#[derive(Debug)]
struct KeySeqs {
    seqs: SeqSet,
    /// Set by dispatch when it sends one of them: the chain up to it, so the next entry of the
    /// key need not look at every earlier one again ([`Log::key_chain`]).
    run: Option<KeyRun>,
}

/// Every unsettled entry of a key up to `upto` was in flight to `peer` when dispatch sent
/// `upto` there, and still is while the log's `returns` count is what it was then (no entry
/// of the log went back to waiting since; entries that settled only leave the set).
/// *Why:* a key with many entries in flight (one key, or a few, under load) made each of its
/// sends look at all of them: with 256 in flight, 3.07 µs per dispatched entry against 0.15
/// with 256 keys (`--example outbox_bench`).
#[derive(Clone, Copy, Debug)]
struct KeyRun {
    upto: u64,
    peer: NodeId,
    returns: u64,
}

/// What the earlier unsettled entries of a key allow for the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chain {
    /// None unsettled: any instance may take it.
    Free,
    /// All in flight to this peer: it may follow them there (pipelined, still in order).
    Follows(NodeId),
    /// One waits (pending, staged) or they are split over peers: it must wait.
    Blocked,
}

impl<R> Log<R> {
    fn new(name: &str) -> Self {
        Self {
            target: Target::from_log_name(name),
            entries: BTreeMap::new(),
            bytes: 0,
            keys: FastMap::default(),
            returns: 0,
            next_seq: 0,
            pending_from: 0,
            expiring: BTreeSet::new(),
            in_flight: BTreeSet::new(),
        }
    }

    /// `e` left the log: its key's chain, its expiry and its place in flight forget it.
    fn forget(&mut self, e: &Entry<R>) {
        forget_key(&mut self.keys, &e.env);
        if let Some(t) = e.expires_at {
            self.expiring.remove(&(t, e.env.seq));
        }
        left_flight(&mut self.in_flight, e.env.seq, &e.state);
    }

    /// The log's figures for `status`, from its indexes: no walk of its entries, which
    /// `status` (every 500 ms for each viewer of the mesh page) would make in core for the
    /// whole backlog kept for absent consumers.
    fn stats(&self) -> LogStats {
        self.debug_check_in_flight();
        LogStats {
            waiting: self.entries.len() - self.in_flight.len(),
            in_flight: self.in_flight.len(),
            oldest_created_ms: self.entries.values().next().map(|e| e.env.created_at_ms),
        }
    }

    /// Debug builds check the in-flight index against the entries in flight (tests run every
    /// pass and `status` through it).
    fn debug_check_in_flight(&self) {
        debug_assert!(
            self.in_flight.iter().copied().eq(self
                .entries
                .iter()
                .filter_map(|(seq, e)| match e.state {
                    State::InFlight { sent_at, .. } => Some((sent_at, *seq)),
                    _ => None,
                })
                .collect::<BTreeSet<_>>()),
            "the in-flight index of {:?} drifted",
            self.target
        );
    }

    /// How the unsettled entries of `key` before `seq` constrain entry `seq`. Those up to
    /// the key's [`KeyRun`], when it is still good, are known to be in flight to its peer;
    /// only the ones after it are looked at.
    fn key_chain(&self, key: &str, seq: u64) -> Chain {
        let Some(k) = self.keys.get(key) else {
            return Chain::Free;
        };
        let (mut follows, from) = match k.run {
            Some(run) if run.returns == self.returns && run.upto < seq => {
                let any = k.seqs.first().is_some_and(|first| first <= run.upto);
                (any.then_some(run.peer), run.upto + 1)
            }
            _ => (None, 0),
        };
        let chain = self.walk_chain(&k.seqs, from..seq, &mut follows);
        // Tests run debug builds: there every answer is checked against a walk of them all.
        #[cfg(debug_assertions)]
        if from > 0 {
            let all = self.walk_chain(&k.seqs, 0..seq, &mut None);
            assert_eq!(chain, all, "the chain of key {key} before {seq} drifted");
        }
        chain
    }

    /// The chain of the unsettled entries `seqs` in `range`, after earlier ones in flight to
    /// `follows` (if any).
    fn walk_chain(
        &self,
        seqs: &SeqSet,
        range: std::ops::Range<u64>,
        follows: &mut Option<NodeId>,
    ) -> Chain {
        for s in seqs.range(range) {
            match self.entries.get(&s).map(|e| &e.state) {
                Some(State::InFlight { peer, .. }) => match *follows {
                    None => *follows = Some(*peer),
                    Some(p) if p == *peer => {}
                    Some(_) => return Chain::Blocked,
                },
                Some(State::Pending | State::Staged) => return Chain::Blocked,
                None => {}
            }
        }
        follows.map_or(Chain::Free, Chain::Follows)
    }

    fn floor(&self) -> u64 {
        self.entries.keys().next().copied().unwrap_or(self.next_seq)
    }
}

#[derive(Clone, Debug)]
struct Peer {
    conn: u64,
    service: String,
    interests: Vec<Interest>,
    credits: u32,
    in_flight: u32,
    draining: bool,
}

/// What an ack did: see [`Outbox::on_ack`].
#[derive(Debug)]
pub struct Acked<R> {
    /// The entries it settled.
    pub settled: Vec<Settled<R>>,
    /// Seqs of entries the acking node was never sent: left unsettled. A correct node never
    /// sends one.
    pub refused: usize,
}

/// Per-log figures for `status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LogStats {
    /// Entries not yet sent (or waiting for a retry).
    pub waiting: usize,
    /// Entries sent and not yet acknowledged.
    pub in_flight: usize,
    /// Creation time (ms since epoch) of the log's head, its unsettled entry with the lowest
    /// seq: the oldest one, as this node stamps its entries in seq order (only a wall clock
    /// set back makes a later entry look older).
    pub oldest_created_ms: Option<u64>,
}

/// The sender side of every log of this node. `R` is an opaque receipt an entry may carry
/// (see [`Outbox::append_with_receipt`]); it comes back in the entry's [`Settled`].
#[derive(Debug)]
pub struct Outbox<R = ()> {
    config: OutboxConfig,
    logs: BTreeMap<String, Log<R>>,
    peers: FastMap<NodeId, Peer>,
    /// Which nodes each entry went to (its `sent_to` bits).
    recipients: Recipients,
    /// Scratch of [`Outbox::dispatch_into`]: the candidates of one log (empty between calls).
    candidates: Vec<NodeId>,
    /// Scratch of [`Outbox::dispatch_into`]: the candidates that consume one topic.
    consumers: Vec<NodeId>,
    /// The logs dispatch visits: each log that got a waiting entry since dispatch last found
    /// nothing waiting in it (at most one name per log).
    ready: BTreeSet<String>,
    /// Logs with entries waiting and no instance (no connected peer consumes them: a group
    /// or service whose nodes are all away), as of [`Outbox::peer_changes`] `parked_at`:
    /// dispatch skips them until that changes, then visits them again.
    parked: BTreeSet<String>,
    parked_at: u64,
    /// Logs with entries waiting whose every instance has used up its credit, by the
    /// instances they wait on (each such log under each of its instances): dispatch skips
    /// them until one of those instances gets credit back ([`credit_back`]) or the peers
    /// change, then visits them again. At most one name per connected peer and log; all go
    /// back to `ready` when the peers change.
    starved: FastMap<NodeId, BTreeSet<String>>,
    rng: u64,
    round_robin: u64,
    total_bytes: usize,
    /// Entries in all logs (so [`Outbox::len`], asked before every append, walks no logs).
    total_entries: usize,
    /// No TTL expiry falls before this time: `check_timers` skips its expiry pass until
    /// then. Lowered when an entry with a TTL is inserted; recomputed by each pass.
    timer_due: u64,
    /// No ack timeout falls before this time: `check_timers` skips its walk over the entries
    /// until then. Lowered when an entry goes in flight; recomputed by each walk. (Apart from
    /// `timer_due` because entries with TTLs sent one after another make an expiry due on
    /// every tick, while an ack timeout is due only when an ack is late.)
    ack_due: u64,
    /// Counts changes to what the peers consume (a peer up or down, a new service or new
    /// interests, a goodbye): see [`Outbox::peer_changes`].
    peer_changes: u64,
    /// The connections on which an ack timed out since they came up: only their close walks
    /// the entries to end those timeouts' backoffs ([`Outbox::requeue_peer`]), not every
    /// close. At most one per connection, taken out when it closes.
    timed_out_conns: BTreeSet<u64>,
}

impl Outbox {
    /// An empty outbox whose entries carry no receipt.
    pub fn new(config: OutboxConfig) -> Self {
        Self::with_receipts(config)
    }
}

/// The log named `name`, created empty when there is none (no allocation when it exists).
/// Always `Some`; an `Option` only because the map cannot hand out the entry without an owned
/// key.
fn log_mut<'a, R>(logs: &'a mut BTreeMap<String, Log<R>>, name: &str) -> Option<&'a mut Log<R>> {
    if !logs.contains_key(name) {
        logs.insert(name.to_string(), Log::new(name));
    }
    logs.get_mut(name)
}

/// An entry in flight to `peer` settled or went back to waiting: one credit of `peer` is free
/// again, so the logs that stopped for want of its credit are visited again. Every drop of a
/// peer's `in_flight` goes through here: one that missed it would leave those logs unsent
/// until the peers change.
fn credit_back(
    peers: &mut FastMap<NodeId, Peer>,
    starved: &mut FastMap<NodeId, BTreeSet<String>>,
    ready: &mut BTreeSet<String>,
    peer: NodeId,
) {
    if let Some(p) = peers.get_mut(&peer) {
        p.in_flight = p.in_flight.saturating_sub(1);
    }
    if !starved.is_empty()
        && let Some(mut logs) = starved.remove(&peer)
    {
        ready.append(&mut logs);
    }
}

/// Entry `seq` of log `name` started or went back to waiting (`Pending`): the log's scan
/// starts no later than it (`pending_from`), dispatch visits the log again (`ready`), and the
/// expiry pass comes by the entry's TTL (`timer_due`). Every transition to `Pending` goes
/// through here: one that missed a part would leave its entry unsent or unexpired.
fn now_waiting(
    pending_from: &mut u64,
    ready: &mut BTreeSet<String>,
    timer_due: &mut u64,
    name: &str,
    seq: u64,
    expires_at: Option<u64>,
) {
    *pending_from = (*pending_from).min(seq);
    if !ready.contains(name) {
        ready.insert(name.to_string());
    }
    if let Some(t) = expires_at {
        *timer_due = (*timer_due).min(t);
    }
}

impl<R> Outbox<R> {
    /// An empty outbox whose entries may carry a receipt of type `R`.
    pub fn with_receipts(config: OutboxConfig) -> Self {
        let rng = config.seed | 1;
        Self {
            config,
            logs: BTreeMap::new(),
            peers: FastMap::default(),
            recipients: Recipients::default(),
            candidates: Vec::new(),
            consumers: Vec::new(),
            ready: BTreeSet::new(),
            parked: BTreeSet::new(),
            parked_at: 0,
            starved: FastMap::default(),
            rng,
            round_robin: 0,
            total_bytes: 0,
            total_entries: 0,
            timer_due: 0,
            ack_due: 0,
            peer_changes: 0,
            timed_out_conns: BTreeSet::new(),
        }
    }

    /// A number that changes whenever what the peers consume may change: a peer came or
    /// went, changed its service, announced new interests or said goodbye. An answer that
    /// depends only on that (the logs with no instance, [`Outbox::groups_for`],
    /// [`Outbox::ephemeral_for`]) stays true while the number stays the same.
    pub fn peer_changes(&self) -> u64 {
        self.peer_changes
    }

    /// Assigns the next sequence number of `target`'s log and appends `env`
    /// (whose `origin`, `kind`, `destination`, `key` … the caller filled in).
    /// Returns the entry as stored, with `log` and `seq` set. An envelope given in an `Arc`
    /// that nothing else holds is stored in it as it is; a shared one is copied.
    ///
    /// With `staged`, the entry is not sent until [`Outbox::mark_durable`] (the store has it).
    pub fn append(
        &mut self,
        target: &Target,
        env: impl Into<Arc<Envelope>>,
        now: u64,
        ttl_ms: Option<u64>,
        not_before_ms: Option<u64>,
        staged: bool,
    ) -> Arc<Envelope> {
        self.append_with_receipt(target, env, now, ttl_ms, not_before_ms, staged, None)
    }

    /// [`Outbox::append`] of an entry that carries `receipt`: the entry's [`Settled`] hands it
    /// back, whichever way the entry leaves its log (dropping the outbox drops it).
    #[allow(clippy::too_many_arguments)]
    pub fn append_with_receipt(
        &mut self,
        target: &Target,
        env: impl Into<Arc<Envelope>>,
        now: u64,
        ttl_ms: Option<u64>,
        not_before_ms: Option<u64>,
        staged: bool,
        receipt: Option<R>,
    ) -> Arc<Envelope> {
        let name = target.log_name();
        let base = self.config.seq_base.max(1);
        let seq = match log_mut(&mut self.logs, &name) {
            Some(log) => {
                let seq = if log.next_seq == 0 {
                    base
                } else {
                    log.next_seq
                };
                log.next_seq = seq + 1;
                seq
            }
            None => base,
        };
        let mut env = env.into();
        let e = Arc::make_mut(&mut env);
        e.log = name;
        e.seq = seq;
        e.attempt = e.attempt.max(1);
        let state = if staged {
            State::Staged
        } else {
            State::Pending
        };
        self.insert(
            env.clone(),
            receipt,
            ttl_ms.map(|t| now + t),
            not_before_ms.unwrap_or(0),
            state,
            0,
        );
        env
    }

    /// The store has made `seq` of `log` durable: it may be sent now.
    pub fn mark_durable(&mut self, log: &str, seq: u64) {
        if let Some(l) = self.logs.get_mut(log)
            && let Some(e) = l.entries.get_mut(&seq)
            && e.state == State::Staged
        {
            e.state = State::Pending;
            let expires_at = e.expires_at;
            now_waiting(
                &mut l.pending_from,
                &mut self.ready,
                &mut self.timer_due,
                log,
                seq,
                expires_at,
            );
        }
    }

    /// Drops a staged entry the store failed to write (its `send` reports the error).
    pub fn discard_staged(&mut self, log: &str, seq: u64) {
        if let Some(l) = self.logs.get_mut(log)
            && l.entries
                .get(&seq)
                .is_some_and(|e| e.state == State::Staged)
            && let Some(e) = l.entries.remove(&seq)
        {
            l.bytes -= e.env.payload.len();
            self.total_bytes -= e.env.payload.len();
            self.total_entries -= 1;
            l.forget(&e);
            self.recipients.settled(e.sent_to, &self.peers);
        }
    }

    /// Unsettled bytes (payloads) across all logs and in one log.
    pub fn bytes(&self, log: &str) -> (usize, usize) {
        let one = self.logs.get(log).map_or(0, |l| l.bytes);
        (self.total_bytes, one)
    }

    /// Puts back an entry recovered from the store after a restart.
    /// `expires_at`/`not_before` are absolute (same clock as `now`). Any node may ack it: the
    /// nodes an earlier run sent it to are not known.
    pub fn restore(&mut self, env: Arc<Envelope>, expires_at: Option<u64>, not_before: u64) {
        if let Some(log) = log_mut(&mut self.logs, &env.log) {
            log.next_seq = log.next_seq.max(env.seq + 1);
        }
        let untracked = recipients::UNTRACKED;
        self.insert(env, None, expires_at, not_before, State::Pending, untracked);
    }

    /// Makes sure the next seq of `log` is above `seq` (sequence numbers are
    /// never reused, even after the entries holding them were settled).
    pub fn bump_seq(&mut self, log: &str, next: u64) {
        if let Some(l) = log_mut(&mut self.logs, log) {
            l.next_seq = l.next_seq.max(next);
        }
    }

    /// Next seq each log will hand out (persisted so seqs survive restarts).
    pub fn next_seqs(&self) -> impl Iterator<Item = (&str, u64)> {
        self.logs.iter().map(|(n, l)| (n.as_str(), l.next_seq))
    }

    fn insert(
        &mut self,
        env: Arc<Envelope>,
        receipt: Option<R>,
        expires_at: Option<u64>,
        not_before: u64,
        state: State,
        sent_to: recipients::Mask,
    ) {
        let Some(log) = log_mut(&mut self.logs, &env.log) else {
            return;
        };
        if let Some(k) = &env.key {
            // The key is cloned only for its first unsettled entry.
            match log.keys.get_mut(k.as_str()) {
                Some(k) => {
                    k.seqs.insert(env.seq);
                }
                None => {
                    let seqs = SeqSet::one(env.seq);
                    log.keys.insert(k.clone(), KeySeqs { seqs, run: None });
                }
            }
        }
        if state == State::Pending {
            now_waiting(
                &mut log.pending_from,
                &mut self.ready,
                &mut self.timer_due,
                &env.log,
                env.seq,
                expires_at,
            );
        } else if let Some(t) = expires_at {
            // A staged entry expires by its TTL too.
            self.timer_due = self.timer_due.min(t);
        }
        let attempts = env.attempt.saturating_sub(1);
        let size = env.payload.len();
        let seq = env.seq;
        let entry = Entry {
            env,
            receipt,
            state,
            not_before,
            expires_at,
            attempts,
            sent_to,
            timed_out_on: 0,
            lost_in_flight: false,
        };
        match log.entries.insert(seq, entry) {
            None => {
                log.bytes += size;
                self.total_bytes += size;
                self.total_entries += 1;
            }
            Some(old) => {
                if let Some(t) = old.expires_at {
                    log.expiring.remove(&(t, seq));
                }
                left_flight(&mut log.in_flight, seq, &old.state);
            }
        }
        if let Some(t) = expires_at {
            log.expiring.insert((t, seq));
        }
    }

    /// A connection to `peer` is ready (generation `conn`).
    pub fn peer_up(
        &mut self,
        peer: NodeId,
        conn: u64,
        service: String,
        interests: Vec<Interest>,
        credits: u32,
    ) {
        // A new connection replaces an old one: what was in flight on the old
        // one is sent again (the receiver's dedup window drops what it had), and what timed
        // out on it waits no longer.
        let old = self.peers.get(&peer).map(|p| p.conn);
        self.requeue_peer(peer, old);
        self.peer_changes += 1;
        self.peers.insert(
            peer,
            Peer {
                conn,
                service,
                interests,
                credits: credits.max(1),
                in_flight: 0,
                draining: false,
            },
        );
    }

    /// The peer announced new interests.
    pub fn peer_interests(&mut self, peer: NodeId, interests: Vec<Interest>) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.interests = interests;
            self.peer_changes += 1;
        }
    }

    /// The peer's service changed. The local node registers itself as a peer (see
    /// `runtime::core`) and uses this to become, or stop being, an instance of its service:
    /// an empty name matches no service (service names are never empty).
    pub fn peer_service(&mut self, peer: NodeId, service: String) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.service = service;
            self.peer_changes += 1;
        }
    }

    /// The peer said goodbye: send it nothing new, keep waiting for acks.
    pub fn peer_draining(&mut self, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.draining = true;
            self.peer_changes += 1;
        }
    }

    /// Moves the ack deadline of every entry in flight `by` ms later: the node did not run
    /// for that long (`runtime::pause`), so no ack could be read meanwhile, and an entry is
    /// not a peer's failure for it.
    pub fn postpone_in_flight(&mut self, by: u64) {
        if by == 0 {
            return;
        }
        for log in self.logs.values_mut() {
            if log.in_flight.is_empty() {
                continue;
            }
            let moved: BTreeSet<(u64, u64)> = std::mem::take(&mut log.in_flight)
                .into_iter()
                .map(|(sent_at, seq)| (sent_at.saturating_add(by), seq))
                .collect();
            for &(later, seq) in &moved {
                if let Some(State::InFlight { sent_at, .. }) =
                    log.entries.get_mut(&seq).map(|e| &mut e.state)
                {
                    *sent_at = later;
                }
            }
            log.in_flight = moved;
            log.debug_check_in_flight();
        }
        self.ack_due = self.ack_due.saturating_add(by);
    }

    /// The connection `conn` to `peer` is gone: its in-flight entries go back
    /// to waiting, to be sent to another instance or on reconnect.
    pub fn peer_down(&mut self, peer: NodeId, conn: u64) {
        if self.peers.get(&peer).is_some_and(|p| p.conn == conn) {
            self.peers.remove(&peer);
            self.peer_changes += 1;
            self.recipients.gone(peer);
            self.requeue_peer(peer, Some(conn));
            // Online-only copies for its ephemeral subscriptions go with it.
            self.release_log(
                &Target::Node(peer).log_name(),
                "ephemeral subscriber disconnected",
            );
        }
    }

    /// Sends again what was in flight to `peer`, and ends the backoff of the entries whose
    /// last attempt timed out on its connection `gone` when that connection is gone.
    ///
    /// *Why the backoff ends:* the backoff after an ack timeout is there for an instance
    /// that is alive but slow (more attempts would only queue behind the first). One whose
    /// connection closed is not working through them, and holding them back only delays
    /// them, and every later entry of their keys, when it or another instance is there.
    /// Those entries are found by walking every entry, and only when an ack timed out on
    /// that connection (`timed_out_conns`): connections close far less often than entries
    /// move, and a close with no timeout walks nothing.
    fn requeue_peer(&mut self, peer: NodeId, gone: Option<u64>) {
        let gone = gone.filter(|c| self.timed_out_conns.remove(c));
        for (name, log) in &mut self.logs {
            let (mut lowest, mut earliest) = (None::<u64>, None::<u64>);
            let entries = &mut log.entries;
            let returns = &mut log.returns;
            log.in_flight.retain(|&(_, seq)| {
                let Some(e) = entries.get_mut(&seq) else {
                    return true;
                };
                if !matches!(e.state, State::InFlight { peer: p, .. } if p == peer) {
                    return true;
                }
                e.state = State::Pending;
                e.lost_in_flight = true;
                *returns = returns.wrapping_add(1);
                lowest = Some(lowest.map_or(seq, |l| l.min(seq)));
                earliest = earliest.into_iter().chain(e.expires_at).min();
                false
            });
            if let Some(conn) = gone {
                for (&seq, e) in entries.iter_mut() {
                    if e.timed_out_on != conn || e.state != State::Pending {
                        continue;
                    }
                    e.timed_out_on = 0;
                    e.not_before = 0;
                    lowest = Some(lowest.map_or(seq, |l| l.min(seq)));
                    earliest = earliest.into_iter().chain(e.expires_at).min();
                }
            }
            if let Some(seq) = lowest {
                now_waiting(
                    &mut log.pending_from,
                    &mut self.ready,
                    &mut self.timer_due,
                    name,
                    seq,
                    earliest,
                );
            }
        }
    }

    /// Whether a connection generation is the current one for the peer.
    pub fn is_current(&self, peer: NodeId, conn: u64) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.conn == conn)
    }

    /// Live instances that consume `target` (connected, not draining).
    pub fn instances(&self, target: &Target) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(id, p)| !p.draining && consumes(id, p, target, None))
            .map(|(id, _)| *id)
            .collect();
        v.sort();
        v
    }

    /// The groups (from connected peers' interests) whose patterns match `topic`.
    pub fn groups_for(&self, topic: &str) -> BTreeSet<String> {
        self.peers
            .values()
            .flat_map(|p| p.interests.iter())
            .filter(|i| topic_matches(&i.pattern, topic))
            .filter_map(|i| i.group.clone())
            .collect()
    }

    /// The topic patterns connected peers (this node included; only `peer` when given)
    /// subscribe to `group` with, sorted, without duplicates: empty when no current interest
    /// names the group.
    pub fn group_patterns(&self, group: &str, peer: Option<NodeId>) -> Vec<String> {
        let patterns: BTreeSet<String> = self
            .peers
            .iter()
            .filter(|(id, _)| peer.is_none_or(|p| p == **id))
            .flat_map(|(_, p)| p.interests.iter())
            .filter(|i| i.group.as_deref() == Some(group))
            .map(|i| i.pattern.clone())
            .collect();
        patterns.into_iter().collect()
    }

    /// The peer acknowledged `seqs` of `log`. Entries it was never sent stay unsettled and are
    /// counted in [`Acked::refused`]; seqs of no unsettled entry (settled already) are skipped.
    pub fn on_ack(&mut self, peer: NodeId, log_name: &str, seqs: &[u64]) -> Acked<R> {
        let mut out = Acked {
            settled: Vec::with_capacity(seqs.len()),
            refused: 0,
        };
        let Some(log) = self.logs.get_mut(log_name) else {
            return out;
        };
        for seq in seqs {
            let e = match log.entries.entry(*seq) {
                btree_map::Entry::Occupied(o) if self.recipients.may_ack(peer, o.get().sent_to) => {
                    o.remove()
                }
                btree_map::Entry::Occupied(_) => {
                    out.refused += 1;
                    continue;
                }
                btree_map::Entry::Vacant(_) => continue,
            };
            log.bytes -= e.env.payload.len();
            self.total_bytes -= e.env.payload.len();
            self.total_entries -= 1;
            if let State::InFlight { peer: p, .. } = e.state {
                credit_back(&mut self.peers, &mut self.starved, &mut self.ready, p);
            }
            log.forget(&e);
            self.recipients.settled(e.sent_to, &self.peers);
            out.settled.push(Settled {
                seq: *seq,
                attempts: e.attempts.max(1),
                env: e.env,
                outcome: Outcome::Acked { by: peer },
                receipt: e.receipt,
            });
        }
        out
    }

    /// The peer's handler failed on `seq` of `log`: retry later, or dead-letter
    /// when attempts are exhausted. `permanent` dead-letters at once.
    pub fn on_nack(
        &mut self,
        peer: NodeId,
        log_name: &str,
        seq: u64,
        reason: &str,
        permanent: bool,
        now: u64,
    ) -> Option<Settled<R>> {
        let max_attempts = self.config.max_attempts;
        let delay = self.backoff_for(seq);
        let log = self.logs.get_mut(log_name)?;
        let e = log.entries.get_mut(&seq)?;
        if !matches!(e.state, State::InFlight { peer: p, .. } if p == peer) {
            return None;
        }
        credit_back(&mut self.peers, &mut self.starved, &mut self.ready, peer);
        left_flight(&mut log.in_flight, seq, &e.state);
        e.state = State::Pending;
        log.returns = log.returns.wrapping_add(1);
        now_waiting(
            &mut log.pending_from,
            &mut self.ready,
            &mut self.timer_due,
            log_name,
            seq,
            e.expires_at,
        );
        // A nack caused by an earlier failure of the same key is not this entry's failure.
        if reason.starts_with(BLOCKED_PREFIX) || reason.starts_with(NOT_HERE_PREFIX) {
            return None;
        }
        e.attempts += 1;
        if permanent || e.attempts >= max_attempts {
            let why = if permanent {
                format!("handler rejected: {reason}")
            } else {
                format!(
                    "gave up after {} attempts; last error: {reason}",
                    e.attempts
                )
            };
            return self.dead_letter(log_name, seq, why);
        }
        let delay = delay(e.attempts);
        e.not_before = now + delay;
        // The handler failed: this backoff sheds load, whatever becomes of the connection.
        // (`time_out` marks the entries whose ack timed out, after this.)
        e.timed_out_on = 0;
        None
    }

    fn backoff_for(&mut self, _seq: u64) -> impl Fn(u32) -> u64 + use<R> {
        // xorshift64*: deterministic jitter for a given seed.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let r = self.rng;
        let base = self.config.backoff_base_ms;
        let max = self.config.backoff_max_ms;
        move |attempt: u32| {
            let exp = base
                .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
                .min(max);
            let half = exp / 2;
            half + r % (exp - half + 1)
        }
    }

    fn dead_letter(&mut self, log_name: &str, seq: u64, reason: String) -> Option<Settled<R>> {
        let log = self.logs.get_mut(log_name)?;
        let e = log.entries.remove(&seq)?;
        log.bytes -= e.env.payload.len();
        self.total_bytes -= e.env.payload.len();
        self.total_entries -= 1;
        if let State::InFlight { peer, .. } = e.state {
            credit_back(&mut self.peers, &mut self.starved, &mut self.ready, peer);
        }
        log.forget(&e);
        self.recipients.settled(e.sent_to, &self.peers);
        Some(Settled {
            seq,
            attempts: e.attempts,
            env: e.env,
            outcome: Outcome::DeadLettered { reason },
            receipt: e.receipt,
        })
    }

    /// Empties a log (its group was unsubscribed, or its ephemeral subscriber left). Every
    /// entry leaves as [`Outcome::Released`].
    pub fn release_log(&mut self, log_name: &str, reason: &str) -> Vec<Settled<R>> {
        let Some(log) = self.logs.remove(log_name) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(log.entries.len());
        for (seq, e) in log.entries {
            if let State::InFlight { peer, .. } = e.state {
                credit_back(&mut self.peers, &mut self.starved, &mut self.ready, peer);
            }
            self.total_bytes -= e.env.payload.len();
            self.total_entries -= 1;
            self.recipients.settled(e.sent_to, &self.peers);
            out.push(Settled {
                seq,
                attempts: e.attempts,
                env: e.env,
                outcome: Outcome::Released {
                    reason: reason.to_string(),
                },
                receipt: e.receipt,
            });
        }
        // Keep sequence numbers increasing if the log comes back.
        self.bump_seq(log_name, log.next_seq);
        out
    }

    /// Connected peers with an ephemeral (group-less) interest matching `topic`.
    pub fn ephemeral_for(&self, topic: &str) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                !p.draining
                    && p.interests
                        .iter()
                        .any(|i| i.group.is_none() && topic_matches(&i.pattern, topic))
            })
            .map(|(id, _)| *id)
            .collect();
        v.sort();
        v
    }

    /// Moves every waiting entry of `log_name` out of its log as dead-lettered with `reason`:
    /// an operator gave up on them (their consumers are gone for good). Entries in flight,
    /// and staged ones, stay and settle as usual. `None` when no such log holds an entry.
    pub fn dead_letter_waiting(&mut self, log_name: &str, reason: &str) -> Option<Vec<Settled<R>>> {
        let log = self.logs.get(log_name).filter(|l| !l.entries.is_empty())?;
        let waiting: Vec<u64> = log
            .entries
            .iter()
            .filter(|(_, e)| e.state == State::Pending)
            .map(|(&seq, _)| seq)
            .collect();
        Some(
            waiting
                .into_iter()
                .filter_map(|seq| self.dead_letter(log_name, seq, reason.to_string()))
                .collect(),
        )
    }

    /// Moves an entry out of its log by hand (for `dlq`-style tooling and tests).
    pub fn remove(&mut self, log_name: &str, seq: u64, reason: &str) -> Option<Settled<R>> {
        self.dead_letter(log_name, seq, reason.to_string())
    }

    /// Expires entries, resends timed-out ones, and hands waiting entries to
    /// instances with credit. Returns frames to send and entries that left.
    pub fn poll(&mut self, now: u64) -> (Vec<Transmit>, Vec<Settled<R>>) {
        let settled = self.check_timers(now);
        (self.dispatch(now), settled)
    }

    /// Timer work only: expiry and ack timeouts (reads the due part of each log's expiry and
    /// in-flight indexes; call it on a tick, not per event).
    pub fn check_timers(&mut self, now: u64) -> Vec<Settled<R>> {
        let mut settled = Vec::new();
        self.expire_and_time_out(now, &mut settled);
        settled
    }

    /// Hands waiting entries to instances with credit (cheap when nothing can move).
    pub fn dispatch(&mut self, now: u64) -> Vec<Transmit> {
        let mut tx = Vec::new();
        self.dispatch_into(now, &mut tx);
        tx
    }

    /// [`Outbox::dispatch`] into a caller's buffer (appended to), so a busy caller reuses one
    /// allocation: a fresh `Vec` of a full credit window per dispatch cost page faults.
    pub fn dispatch_into(&mut self, now: u64, tx: &mut Vec<Transmit>) {
        let mut candidates = std::mem::take(&mut self.candidates);
        let mut consumers = std::mem::take(&mut self.consumers);
        let mut cx = Dispatch {
            peers: &mut self.peers,
            recipients: &mut self.recipients,
            round_robin: &mut self.round_robin,
            ack_due: &mut self.ack_due,
            ack_timeout_ms: self.config.ack_timeout_ms,
            now,
        };
        if self.parked_at != self.peer_changes {
            // A peer came, went or changed what it consumes: the parked logs may have one,
            // and the starved ones new instances with credit.
            self.ready.append(&mut self.parked);
            for (_, mut logs) in self.starved.drain() {
                self.ready.append(&mut logs);
            }
            self.parked_at = self.peer_changes;
        }
        // Visited in name order, as the logs are kept.
        for name in std::mem::take(&mut self.ready) {
            let Some(log) = self.logs.get_mut(&name) else {
                continue;
            };
            match cx.log(log, &mut candidates, &mut consumers, tx) {
                Visit::Done => {}
                Visit::Waiting => {
                    self.ready.insert(name);
                }
                Visit::NoInstance => {
                    self.parked.insert(name);
                }
                Visit::Starved => {
                    for c in &candidates {
                        let logs = self.starved.entry(*c).or_default();
                        if !logs.contains(&name) {
                            logs.insert(name.clone());
                        }
                    }
                }
            }
            candidates.clear();
        }
        // Tests run debug builds: every dispatch in them checks that each log it did not
        // visit has no entry waiting, or is parked and still has no instance, or is starved
        // under each of its instances and they still have no credit; and that dispatching it
        // again on the spot sends nothing.
        #[cfg(debug_assertions)]
        for (name, log) in &mut self.logs {
            if self.ready.contains(name) {
                continue;
            }
            let waiting = log
                .entries
                .range(log.pending_from..)
                .any(|(_, e)| e.state == State::Pending);
            let mut sent = Vec::new();
            let visit = cx.log(log, &mut candidates, &mut consumers, &mut sent);
            let starved = visit == Visit::Starved
                && candidates
                    .iter()
                    .all(|c| self.starved.get(c).is_some_and(|l| l.contains(name)));
            candidates.clear();
            let parked = self.parked.contains(name) && visit == Visit::NoInstance;
            assert!(
                sent.is_empty() && (!waiting || parked || starved),
                "dispatch did not visit log {name}, which had something to send ({} sent, \
                 {visit:?})",
                sent.len()
            );
        }
        self.candidates = candidates;
        self.consumers = consumers;
    }

    fn expire_and_time_out(&mut self, now: u64, settled: &mut Vec<Settled<R>>) {
        let ack_due = now >= self.ack_due;
        // Also with an ack timeout due, as when both were one walk: an entry that went back
        // to waiting past its TTL (a handler's nack, a lost peer) expires then at the latest.
        if now >= self.timer_due || ack_due {
            self.expire(now, settled);
        }
        if ack_due {
            self.time_out(now, settled);
        }
    }

    /// Dead-letters the waiting entries whose TTL has passed, from each log's `expiring`
    /// (due ones first), and sets `timer_due` to the next expiry. An entry in flight (or
    /// staged) past its TTL stays until it waits again (a nack, a lost peer): that lowers
    /// `timer_due`, so the next pass takes it, and dispatch does not send it meanwhile.
    fn expire(&mut self, now: u64, settled: &mut Vec<Settled<R>>) {
        let mut expired = Vec::new();
        let mut due = u64::MAX;
        for (name, log) in &self.logs {
            debug_assert_eq!(
                log.expiring.len(),
                log.entries
                    .values()
                    .filter(|e| e.expires_at.is_some())
                    .count(),
                "the expiry index of {name} drifted"
            );
            for &(t, seq) in &log.expiring {
                if t > now {
                    due = due.min(t);
                    break;
                }
                if log
                    .entries
                    .get(&seq)
                    .is_some_and(|e| e.state == State::Pending)
                {
                    expired.push((name.clone(), seq));
                }
            }
        }
        self.timer_due = due;
        for (name, seq) in expired {
            settled.extend(self.dead_letter(&name, seq, "ttl expired".into()));
        }
        debug_assert!(
            self.logs.values().all(|l| l
                .entries
                .values()
                .all(|e| e.state != State::Pending || e.expires_at.is_none_or(|t| t > now))),
            "a waiting entry past its TTL was left"
        );
    }

    /// Sends again (after a backoff) the entries in flight whose ack is overdue, from each
    /// log's `in_flight` (oldest first), and sets `ack_due` to the next ack timeout.
    fn time_out(&mut self, now: u64, settled: &mut Vec<Settled<R>>) {
        let ack_timeout = self.config.ack_timeout_ms;
        let mut timed_out = Vec::new();
        let mut due = u64::MAX;
        for (name, log) in &self.logs {
            log.debug_check_in_flight();
            for &(sent_at, seq) in &log.in_flight {
                if sent_at + ack_timeout > now {
                    // The next pass is due at the earliest ack timeout still ahead.
                    due = due.min(sent_at + ack_timeout);
                    break;
                }
                if let Some(State::InFlight { peer, conn, .. }) =
                    log.entries.get(&seq).map(|e| &e.state)
                {
                    timed_out.push((name.clone(), seq, *peer, *conn));
                }
            }
        }
        self.ack_due = due;
        for (name, seq, peer, conn) in timed_out {
            let reason = format!("no ack within {ack_timeout} ms");
            match self.on_nack(peer, &name, seq, &reason, false, now) {
                Some(dead) => settled.push(dead),
                None => {
                    if let Some(e) = self
                        .logs
                        .get_mut(&name)
                        .and_then(|l| l.entries.get_mut(&seq))
                    {
                        e.timed_out_on = conn;
                        self.timed_out_conns.insert(conn);
                    }
                }
            }
        }
    }

    /// The earliest time (same clock as `now`) at which [`Outbox::poll`] has
    /// timer work: a retry becoming due, an ack timeout, or an expiry. Walks every entry
    /// (retries have no index): for tests and tools, not a node's loop, which ticks.
    pub fn next_deadline(&self) -> Option<u64> {
        let ack_timeout = self.config.ack_timeout_ms;
        let mut best: Option<u64> = None;
        let mut consider = |t: u64| best = Some(best.map_or(t, |b: u64| b.min(t)));
        for log in self.logs.values() {
            for e in log.entries.values() {
                match e.state {
                    State::Pending => {
                        if e.not_before > 0 {
                            consider(e.not_before);
                        }
                        if let Some(t) = e.expires_at {
                            consider(t);
                        }
                    }
                    State::InFlight { sent_at, .. } => consider(sent_at + ack_timeout),
                    State::Staged => {}
                }
            }
        }
        best
    }

    /// The first `limit` unsettled entries, by log name and then seq (a log's entries from
    /// its oldest), each with where it stands.
    pub fn entries(&self, limit: usize) -> Vec<EntrySnapshot> {
        self.logs
            .values()
            .flat_map(|log| log.entries.values())
            .take(limit)
            .map(|e| EntrySnapshot {
                env: e.env.clone(),
                state: match e.state {
                    State::Staged => EntryState::Staged,
                    State::Pending => EntryState::Waiting,
                    State::InFlight { peer, .. } => EntryState::InFlight(peer),
                },
                attempts: e.attempts,
                not_before: e.not_before,
                expires_at: e.expires_at,
            })
            .collect()
    }

    /// Figures per log.
    pub fn stats(&self) -> BTreeMap<String, LogStats> {
        self.logs
            .iter()
            .map(|(n, l)| (n.clone(), l.stats()))
            .collect()
    }

    /// Total unsettled entries.
    pub fn len(&self) -> usize {
        debug_assert_eq!(
            self.total_entries,
            self.logs.values().map(|l| l.entries.len()).sum::<usize>(),
            "the entry count drifted"
        );
        self.total_entries
    }

    /// Whether no entry is unsettled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unsettled entries of one log.
    pub fn log_len(&self, log: &str) -> usize {
        self.logs.get(log).map_or(0, |l| l.entries.len())
    }

    /// Whether a connected peer has an interest matching `topic` (any group).
    pub fn peer_matches_topic(&self, peer: NodeId, topic: &str) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.interests.iter().any(|i| topic_matches(&i.pattern, topic)))
    }

    /// Peers that said goodbye and get no new work.
    pub fn draining_peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.peers
            .iter()
            .filter(|(_, p)| p.draining)
            .map(|(id, _)| *id)
    }

    /// Connected peers and their service.
    pub fn peers(&self) -> impl Iterator<Item = (NodeId, &str)> {
        self.peers.iter().map(|(id, p)| (*id, p.service.as_str()))
    }
}

/// Reason prefix of a nack sent because an earlier entry of the same key failed.
/// Such nacks do not count as an attempt.
pub const BLOCKED_PREFIX: &str = "blocked behind";

/// Reason prefix of a nack sent because the receiver no longer consumes the
/// log (it unsubscribed, or is shutting down). Does not count as an attempt.
pub const NOT_HERE_PREFIX: &str = "not consumed here";

/// The tie-break of a keyless entry among instances with the same load: an order that
/// changes with each entry sent (`rr` counts them), so ties spread evenly. Node ids are
/// ed25519 public keys, whose first 8 bytes (the low bits of a point's coordinate) are
/// spread already; MurmurHash3's 64-bit finalizer mixes `rr` in.
///
/// *Why not `stable_hash`:* it is FNV-1a over the 32-byte id and `rr`, 40 multiplies one
/// after another, for every candidate of every entry (a dispatch of 20 entries to a group
/// of 10 instances took 4.4 times one to a single service in `--example outbox_bench`, now
/// 2.7), and `rr`, its last bytes, barely moved the high bits that decide the order: three
/// idle instances got 127, 6 and 167 of 300 entries in
/// `keyless_entries_spread_over_instances_with_the_same_load`, and up to 157 apart over 200
/// sets of random ids in a simulation (47 with this mix).
fn stable_rr(id: &NodeId, rr: u64) -> u64 {
    let head = id
        .as_bytes()
        .first_chunk::<8>()
        .copied()
        .unwrap_or_default();
    let mut h = u64::from_le_bytes(head) ^ rr.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn forget_key(keys: &mut FastMap<SmolStr, KeySeqs>, env: &Envelope) {
    if let Some(k) = &env.key
        && let Some(set) = keys.get_mut(k)
    {
        set.seqs.remove(env.seq);
        if set.seqs.is_empty() {
            keys.remove(k);
        }
    }
}

fn consumes(id: &NodeId, p: &Peer, target: &Target, topic: Option<&str>) -> bool {
    match target {
        Target::Service(s) => &p.service == s,
        Target::Node(n) => n == id,
        Target::Group(g) => p.interests.iter().any(|i| {
            i.group.as_deref() == Some(g.as_str())
                && topic.is_none_or(|t| topic_matches(&i.pattern, t))
        }),
    }
}

/// The least loaded of the connected `instances` that a keyless entry goes to (only those
/// with credit left when `with_credit`), ties broken by [`stable_rr`].
fn least_loaded<'a>(
    peers: &FastMap<NodeId, Peer>,
    instances: impl Iterator<Item = &'a NodeId>,
    with_credit: bool,
    rr: u64,
) -> Option<NodeId> {
    instances
        .filter_map(|c| peers.get(c).map(|p| (c, p)))
        .filter(|(_, p)| !with_credit || p.in_flight < p.credits)
        .min_by_key(|(c, p)| (p.in_flight, stable_rr(c, rr)))
        .map(|(c, _)| *c)
}

/// Whether every one of `candidates` (a log's instances) has used up its credit.
fn all_out_of_credit(peers: &FastMap<NodeId, Peer>, candidates: &[NodeId]) -> bool {
    candidates
        .iter()
        .all(|c| peers.get(c).is_none_or(|p| p.in_flight >= p.credits))
}

/// One dispatch's view of the outbox beside the log it walks.
struct Dispatch<'a> {
    peers: &'a mut FastMap<NodeId, Peer>,
    recipients: &'a mut Recipients,
    round_robin: &'a mut u64,
    ack_due: &'a mut u64,
    ack_timeout_ms: u64,
    now: u64,
}

impl Dispatch<'_> {
    /// Hands the waiting entries of one log to its instances with credit. `candidates` and
    /// `consumers` are scratch buffers (`candidates` empty).
    fn log<R>(
        &mut self,
        log: &mut Log<R>,
        candidates: &mut Vec<NodeId>,
        consumers: &mut Vec<NodeId>,
        tx: &mut Vec<Transmit>,
    ) -> Visit {
        let now = self.now;
        let Some(target) = log.target.as_ref() else {
            return Visit::Done;
        };
        let floor = log.floor();
        let mut cursor = log.pending_from.max(floor);
        // Nothing at or after `pending_from`: nothing is waiting (the common case for a log
        // whose entries are all in flight).
        if log.entries.range(cursor..).next().is_none() {
            return Visit::Done;
        }
        candidates.extend(
            self.peers
                .iter()
                .filter(|(id, p)| !p.draining && consumes(id, p, target, None))
                .map(|(id, _)| *id),
        );
        if candidates.is_empty() {
            return Visit::NoInstance;
        }
        candidates.sort();
        // Nothing can move while every candidate is out of credit: skip the scan (the
        // common case under load, where the log head is a full window in flight).
        let any_credit = candidates
            .iter()
            .any(|c| self.peers.get(c).is_some_and(|p| p.in_flight < p.credits));
        if !any_credit {
            return Visit::Starved;
        }
        // Walk the pending entries from `pending_from`; the in-flight window before it is
        // skipped. An entry becomes in flight in place, so a later entry of the same key
        // sees it through `key_chain`.
        // `pending_from` may rise to the first entry still pending after this scan.
        let mut first_left: Option<u64> = None;
        // Set when the scan stopped because no instance has credit left.
        let mut starved = false;
        let mut scanned = 0usize;
        // The candidates that consume the topic of `consumers_of` (its destination), found
        // once for a run of entries with the same topic instead of for each (ARCHITECTURE,
        // "Hot path notes").
        let mut consumers_of: Option<Arc<Envelope>> = None;
        while let Some((&seq, e)) = log.entries.range(cursor..).next() {
            cursor = seq + 1;
            scanned += 1;
            if scanned > SCAN_BUDGET_PER_POLL {
                first_left = first_left.or(Some(seq));
                break;
            }
            if e.state != State::Pending {
                continue;
            }
            let key = e.env.key.as_deref();
            // One past its TTL is not sent again: it waits for the expiry pass, due by then
            // (every return to waiting lowers `timer_due` to the entry's expiry).
            let blocked_by_time = e.not_before > now || e.expires_at.is_some_and(|t| t <= now);
            let topic = e.env.destination.as_str();
            if !blocked_by_time && consumers_of.as_ref().is_none_or(|c| c.destination != topic) {
                consumers.clear();
                consumers.extend(candidates.iter().copied().filter(|c| {
                    self.peers
                        .get(c)
                        .is_some_and(|p| consumes(c, p, target, Some(topic)))
                }));
                consumers_of = Some(e.env.clone());
            }
            let chosen: Option<NodeId> = match key {
                _ if blocked_by_time => None,
                Some(k) => match log.key_chain(k, seq) {
                    Chain::Blocked => None,
                    Chain::Follows(p) => Some(p),
                    Chain::Free => rendezvous(k, consumers.iter()),
                },
                // Back to an instance that may have handled it, when one is connected: it
                // waits for that one's credit (or its reconnect, while it is held).
                None if e.lost_in_flight => {
                    let had = consumers
                        .iter()
                        .filter(|c| self.recipients.was_sent(**c, e.sent_to));
                    least_loaded(self.peers, had, false, *self.round_robin).or_else(|| {
                        least_loaded(self.peers, consumers.iter(), true, *self.round_robin)
                    })
                }
                None => least_loaded(self.peers, consumers.iter(), true, *self.round_robin),
            };
            let Some(peer_id) = chosen else {
                first_left = first_left.or(Some(seq));
                // Stop when no instance of this log has credit left: a keyless entry found no
                // instance for want of credit, and nothing after it can move either. Walking
                // on made every ack's dispatch scan the whole backlog (a publish with no key
                // spent 54% of its dispatch time in the walk).
                if all_out_of_credit(self.peers, candidates) {
                    starved = true;
                    break;
                }
                continue;
            };
            let Some(peer) = self.peers.get_mut(&peer_id) else {
                first_left = first_left.or(Some(seq));
                continue;
            };
            if peer.in_flight >= peer.credits || peer.draining {
                // The key sticks to its instance: wait for credit, do not move it (the entry
                // stays pending, which holds back the later entries of its key).
                first_left = first_left.or(Some(seq));
                // Stop when no instance of this log has credit left (not every peer: others,
                // the local node among them, may consume other logs only).
                if all_out_of_credit(self.peers, candidates) {
                    starved = true;
                    break;
                }
                continue;
            }
            let key_floor = key.and_then(|k| log.keys.get(k)?.seqs.first());
            let mut env = e.env.clone();
            if env.attempt != e.attempts + 1 {
                // Copies the envelope only if an earlier frame of it is still queued.
                Arc::make_mut(&mut env).attempt = e.attempts + 1;
            }
            peer.in_flight += 1;
            let conn = peer.conn;
            *self.round_robin = self.round_robin.wrapping_add(1);
            let mut resend = false;
            if let Some(e) = log.entries.get_mut(&seq) {
                resend = e.sent_to != 0;
                e.lost_in_flight = false;
                // It was pending (the scan skips every other entry): not in the index yet.
                e.state = State::InFlight {
                    peer: peer_id,
                    conn,
                    sent_at: now,
                };
                log.in_flight.insert((now, seq));
                self.recipients.sent(peer_id, &mut e.sent_to);
            }
            // Every earlier unsettled entry of the key is in flight to this peer (the chain
            // said so, or there was none), and now this one too.
            if let Some(k) = env.key.as_deref().and_then(|k| log.keys.get_mut(k)) {
                k.run = Some(KeyRun {
                    upto: seq,
                    peer: peer_id,
                    returns: log.returns,
                });
            }
            *self.ack_due = (*self.ack_due).min(now + self.ack_timeout_ms);
            tx.push(Transmit {
                peer: peer_id,
                conn,
                resend,
                frame: Data::Deliver {
                    floor,
                    key_floor,
                    env,
                },
            });
        }
        // Everything before the first entry left pending (or before the cursor when the
        // scan reached the end) is now in flight or staged.
        log.pending_from = first_left.unwrap_or(cursor);
        match first_left {
            None => Visit::Done,
            Some(_) if starved => Visit::Starved,
            Some(_) => Visit::Waiting,
        }
    }
}

/// What dispatch found in a log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Visit {
    /// Nothing waiting: visit it again once an entry waits.
    Done,
    /// Entries wait (for their key, their time, or the scan's budget): visit it again next
    /// dispatch.
    Waiting,
    /// Entries wait and every instance of the log has used up its credit: visit it again
    /// once one of them gets credit back or a peer changes.
    Starved,
    /// Entries wait and no connected peer consumes the log: visit it again once a peer
    /// changes.
    NoInstance,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    use crate::engine::wire::Kind;

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    /// The seq a transmit delivers.
    fn seq_of(t: &Transmit) -> u64 {
        match &t.frame {
            Data::Deliver { env, .. } => env.seq,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn env(key: Option<&str>) -> Envelope {
        Envelope {
            origin: id(9),
            log: SmolStr::default(),
            seq: 0,
            kind: Kind::Send,
            destination: "svc".into(),
            key: key.map(SmolStr::from),
            headers: Default::default(),
            content_type: None,
            created_at_ms: 0,
            attempt: 1,
            payload: Bytes::from_static(b"x"),
        }
    }

    fn outbox() -> Outbox {
        Outbox::new(OutboxConfig {
            ack_timeout_ms: 1_000,
            max_attempts: 3,
            backoff_base_ms: 100,
            backoff_max_ms: 1_000,
            seed: 7,
            seq_base: 1,
        })
    }

    fn target() -> Target {
        Target::Service("svc".into())
    }

    #[test]
    fn waits_while_no_instance_then_sends_in_order() {
        let mut ob = outbox();
        for _ in 0..5 {
            ob.append(&target(), env(Some("k")), 0, None, None, false);
        }
        assert!(
            ob.dispatch(0).is_empty(),
            "no instance: nothing sent, nothing lost"
        );
        assert_eq!(ob.len(), 5);
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        let seqs: Vec<u64> = ob.dispatch(1).iter().map(seq_of).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_peer_without_a_service_becomes_an_instance_when_it_takes_one() {
        // How the local node joins and leaves its service (`peer_service`).
        let mut ob = outbox();
        ob.peer_up(id(1), 0, String::new(), vec![], 100);
        ob.append(&target(), env(Some("k")), 0, None, None, false);
        assert!(ob.dispatch(0).is_empty(), "an empty service matches none");
        assert!(ob.instances(&target()).is_empty());
        ob.peer_service(id(1), "svc".into());
        assert_eq!(ob.instances(&target()), vec![id(1)]);
        let tx = ob.dispatch(1);
        assert_eq!(tx.len(), 1);
        assert_eq!(tx[0].peer, id(1));
        // Leaving the service sends it nothing new; the ack of what it holds still counts.
        ob.peer_service(id(1), String::new());
        ob.append(&target(), env(Some("k2")), 0, None, None, false);
        assert!(ob.dispatch(2).is_empty());
        let settled = ob.on_ack(id(1), &target().log_name(), &[1]);
        assert_eq!(settled.settled.len(), 1);
        assert_eq!(ob.len(), 1);
    }

    #[test]
    fn a_group_backlog_goes_out_once_a_connected_peer_joins_the_group() {
        let mut ob = outbox();
        let group = Target::Group("audit".into());
        ob.peer_up(id(1), 1, "billing".into(), vec![], 100);
        let placed = Envelope {
            kind: Kind::Publish,
            destination: "order.placed".into(),
            ..env(None)
        };
        ob.append(&group, placed, 0, None, None, false);
        // Twice: the second dispatch skips the log (no peer changed since the first).
        assert!(ob.dispatch(0).is_empty(), "no instance of the group");
        assert!(ob.dispatch(1).is_empty(), "still none");
        let interest = |group: Option<&str>| Interest {
            pattern: "order.>".into(),
            group: group.map(str::to_string),
        };
        ob.peer_interests(id(1), vec![interest(None)]);
        assert!(
            ob.dispatch(2).is_empty(),
            "an ephemeral interest is no group"
        );
        ob.peer_interests(id(1), vec![interest(None), interest(Some("audit"))]);
        let tx = ob.dispatch(3);
        assert_eq!(tx.len(), 1, "the connected peer joined the group");
        assert_eq!(tx[0].peer, id(1));
    }

    #[test]
    fn keyless_entries_spread_over_instances_with_the_same_load() {
        // Each entry is acked before the next is sent, so every choice is a tie of three
        // idle instances: the tie-break alone spreads them.
        let mut ob = outbox();
        for b in 1..=3 {
            ob.peer_up(id(b), 1, "svc".into(), vec![], 100);
        }
        let mut got = FastMap::<NodeId, usize>::default();
        for now in 0..300 {
            ob.append(&target(), env(None), now, None, None, false);
            let tx = ob.dispatch(now);
            assert_eq!(tx.len(), 1);
            let Data::Deliver { env, .. } = &tx[0].frame else {
                panic!("unexpected {:?}", tx[0].frame);
            };
            *got.entry(tx[0].peer).or_default() += 1;
            assert_eq!(ob.on_ack(tx[0].peer, &env.log, &[env.seq]).settled.len(), 1);
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got.values().all(|n| (70..=130).contains(n)), "{got:?}");
    }

    /// Three entries of one key to an instance with one credit: the first goes out, the
    /// others wait behind it.
    fn one_in_flight_two_waiting() -> Outbox {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 1);
        for _ in 0..3 {
            ob.append(&target(), env(Some("k")), 0, None, None, false);
        }
        assert_eq!(ob.dispatch(0).len(), 1);
        ob
    }

    /// The entries listed show which wait and which are in flight, to whom, and a nack's
    /// failed attempt and backoff.
    #[test]
    fn entries_show_what_waits_and_what_is_in_flight_to_whom() {
        let mut ob = one_in_flight_two_waiting();
        let all = ob.entries(10);
        let seqs: Vec<u64> = all.iter().map(|e| e.env.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(all[0].state, EntryState::InFlight(id(1)));
        assert_eq!(all[1].state, EntryState::Waiting);
        assert!(all.iter().all(|e| e.attempts == 0));
        assert_eq!(ob.entries(2).len(), 2);
        // A nack brings it back to waiting, one failed attempt on, with its backoff.
        let log = target().log_name();
        assert!(ob.on_nack(id(1), &log, 1, "busy", false, 5).is_none());
        let first = &ob.entries(1)[0];
        assert_eq!((first.state, first.attempts), (EntryState::Waiting, 1));
        assert!(first.not_before > 5, "{first:?}");
    }

    /// An operator's move dead-letters the waiting entries of a log and leaves the one in
    /// flight to settle; an empty or unknown log is `None`.
    #[test]
    fn an_operator_dead_letters_what_waits_and_leaves_what_is_in_flight() {
        let mut ob = one_in_flight_two_waiting();
        let log = target().log_name();
        let moved = ob
            .dead_letter_waiting(&log, "gone")
            .expect("the log holds entries");
        let seqs: Vec<u64> = moved.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, [2, 3]);
        assert!(
            moved.iter().all(
                |s| matches!(&s.outcome, Outcome::DeadLettered { reason } if reason == "gone")
            )
        );
        assert_eq!(ob.len(), 1, "the one in flight stays");
        assert_eq!(ob.on_ack(id(1), &log, &[1]).settled.len(), 1);
        assert!(ob.is_empty());
        assert!(
            ob.dead_letter_waiting(&log, "gone").is_none(),
            "an empty log"
        );
        assert!(ob.dead_letter_waiting("svc:nobody", "gone").is_none());
    }

    /// A keyless entry that was in flight on a connection that closed goes back to the
    /// instance it was sent to, which may have handled it (its dedup window then drops it),
    /// though another instance is less loaded; a new keyless entry goes to the less loaded.
    #[test]
    fn a_keyless_entry_lost_in_flight_goes_back_to_its_instance() {
        let mut ob = outbox();
        for b in 1..=2 {
            ob.peer_up(id(b), 1, "svc".into(), vec![], 100);
        }
        ob.append(&target(), env(None), 0, None, None, false);
        let first = ob.dispatch(0);
        assert_eq!(first.len(), 1);
        let had = first[0].peer;
        let other = if had == id(1) { id(2) } else { id(1) };
        // Its connection is replaced; before the entry goes out again, the instance that had
        // it gets a direct entry (`eph:` logs are dispatched first), so it is the busier one.
        ob.peer_up(had, 2, "svc".into(), vec![], 100);
        ob.append(&Target::Node(had), env(None), 1, None, None, false);
        ob.append(&target(), env(None), 1, None, None, false);
        let again = ob.dispatch(1);
        let svc = target().log_name();
        let to = |seq: u64| {
            again
                .iter()
                .find(|t| matches!(&t.frame, Data::Deliver { env, .. } if env.log == svc && env.seq == seq))
                .map(|t| t.peer)
        };
        assert_eq!(to(1), Some(had), "the lost entry goes back: {again:?}");
        assert_eq!(to(2), Some(other), "a new one goes to the less loaded");
    }

    #[test]
    fn credits_bound_what_is_in_flight() {
        let mut ob = outbox();
        for _ in 0..10 {
            ob.append(&target(), env(None), 0, None, None, false);
        }
        ob.peer_up(id(1), 1, "svc".into(), vec![], 4);
        assert_eq!(ob.dispatch(0).len(), 4);
        assert!(ob.dispatch(0).is_empty());
        assert_eq!(ob.on_ack(id(1), "svc:svc", &[1, 2]).settled.len(), 2);
        assert_eq!(ob.dispatch(0).len(), 2);
    }

    #[test]
    fn staged_entries_wait_for_the_store_and_block_their_key() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        let a = ob.append(&target(), env(Some("k")), 0, None, None, true);
        ob.append(&target(), env(Some("k")), 0, None, None, false);
        assert!(
            ob.dispatch(0).is_empty(),
            "key k waits behind its staged head"
        );
        ob.mark_durable(&a.log, a.seq);
        assert_eq!(ob.dispatch(0).len(), 2);
    }

    #[test]
    fn ttl_expiry_dead_letters_with_reason() {
        let mut ob = outbox();
        ob.append(&target(), env(None), 0, Some(500), None, false);
        assert!(ob.check_timers(499).is_empty());
        let dead = ob.check_timers(500);
        assert_eq!(dead.len(), 1);
        assert_ttl_expired(&dead[0]);
        assert!(ob.is_empty());
    }

    fn assert_ttl_expired<R>(settled: &Settled<R>) {
        assert_eq!(
            settled.outcome,
            Outcome::DeadLettered {
                reason: "ttl expired".into()
            }
        );
    }

    #[test]
    fn a_staged_entry_goes_out_once_durable() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        let a = ob.append(&target(), env(None), 0, None, None, true);
        assert!(ob.dispatch(0).is_empty(), "staged: not sent yet");
        ob.mark_durable(&a.log, a.seq);
        assert_eq!(ob.dispatch(1).len(), 1, "durable: sent");
    }

    fn seqs<R>(settled: &[Settled<R>]) -> Vec<u64> {
        settled.iter().map(|s| s.seq).collect()
    }

    #[test]
    fn waiting_entries_expire_in_ttl_order_and_in_flight_ones_once_back() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 1);
        for ttl in [300, 100, 200] {
            ob.append(&target(), env(None), 0, Some(ttl), None, false);
        }
        // Seq 1 (TTL 300) goes in flight; 2 (TTL 100) and 3 (TTL 200) wait for credit.
        assert_eq!(ob.dispatch(0).len(), 1);
        assert!(ob.check_timers(99).is_empty());
        assert_eq!(seqs(&ob.check_timers(100)), vec![2]);
        assert!(ob.check_timers(150).is_empty());
        assert_eq!(seqs(&ob.check_timers(250)), vec![3]);
        assert!(
            ob.check_timers(400).is_empty(),
            "in flight past its TTL: it stays"
        );
        assert_eq!(ob.len(), 1);
        // Its handler fails: waiting again past its TTL, it is not sent again but expires.
        assert!(
            ob.on_nack(id(1), "svc:svc", 1, "boom", false, 500)
                .is_none()
        );
        assert!(
            ob.dispatch(900).is_empty(),
            "an expired entry is not sent again"
        );
        let dead = ob.check_timers(900);
        assert_eq!(seqs(&dead), vec![1]);
        assert_ttl_expired(&dead[0]);
        assert!(ob.is_empty());
    }

    #[test]
    fn an_entry_in_flight_to_a_lost_peer_past_its_ttl_expires() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        ob.append(&target(), env(None), 0, Some(100), None, false);
        assert_eq!(ob.dispatch(0).len(), 1);
        assert!(ob.check_timers(200).is_empty(), "in flight: it stays");
        ob.peer_down(id(1), 1);
        ob.peer_up(id(2), 1, "svc".into(), vec![], 100);
        assert!(
            ob.dispatch(300).is_empty(),
            "not sent to the other instance"
        );
        assert_eq!(seqs(&ob.check_timers(300)), vec![1]);
        assert!(ob.is_empty());
    }

    #[test]
    fn exhausted_attempts_dead_letter_and_retries_back_off() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        ob.append(&target(), env(None), 0, None, None, false);
        let mut now = 0;
        for attempt in 1..=3 {
            let tx = ob.dispatch(now);
            assert_eq!(tx.len(), 1, "attempt {attempt} sent");
            if let Data::Deliver { env, .. } = &tx[0].frame {
                assert_eq!(env.attempt, attempt);
            }
            let settled = ob.on_nack(id(1), "svc:svc", 1, "boom", false, now);
            if attempt < 3 {
                assert!(settled.is_none());
                assert!(ob.dispatch(now).is_empty(), "backoff holds the retry");
                now = ob.next_deadline().expect("retry scheduled");
            } else {
                let s = settled.expect("dead-lettered");
                assert!(
                    matches!(s.outcome, Outcome::DeadLettered { ref reason } if reason.contains("3 attempts"))
                );
            }
        }
        assert!(ob.is_empty());
    }

    #[test]
    fn rejection_dead_letters_at_once_and_other_keys_keep_flowing() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        ob.append(&target(), env(Some("bad")), 0, None, None, false);
        ob.append(&target(), env(Some("bad")), 0, None, None, false);
        ob.append(&target(), env(Some("good")), 0, None, None, false);
        assert_eq!(ob.dispatch(0).len(), 3);
        // `bad`@1 fails (retryable): bad@2 was pipelined and the receiver blocks it.
        assert!(ob.on_nack(id(1), "svc:svc", 1, "boom", false, 0).is_none());
        assert!(
            ob.on_nack(id(1), "svc:svc", 2, "blocked behind 1", false, 0)
                .is_none()
        );
        assert_eq!(
            ob.on_ack(id(1), "svc:svc", &[3]).settled.len(),
            1,
            "the good key flowed"
        );
        // Nothing of `bad` moves before its head's backoff.
        assert!(ob.dispatch(0).is_empty());
        let due = ob.next_deadline().expect("deadline");
        let tx = ob.dispatch(due);
        assert_eq!(tx.len(), 2, "head and its follower go again, in order");
        let s = ob
            .on_nack(id(1), "svc:svc", 1, "poison", true, due)
            .expect("rejected");
        assert!(matches!(s.outcome, Outcome::DeadLettered { .. }));
    }

    #[test]
    fn scheduled_delivery_waits_for_its_time() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        ob.append(&target(), env(None), 0, None, Some(5_000), false);
        assert!(ob.dispatch(4_999).is_empty());
        assert_eq!(ob.dispatch(5_000).len(), 1);
    }

    #[test]
    fn ack_timeout_resends() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        ob.append(&target(), env(None), 0, None, None, false);
        assert_eq!(ob.dispatch(0).len(), 1);
        assert!(ob.check_timers(999).is_empty());
        assert!(ob.check_timers(1_000).is_empty());
        let due = ob.next_deadline().expect("retry");
        assert_eq!(ob.dispatch(due).len(), 1, "resent after the ack timeout");
    }

    /// A transmit says whether its entry went out before, whatever its attempt number: a
    /// resend after a lost connection keeps attempt 1 (it is not a failure), and is still
    /// counted as redelivered.
    #[test]
    fn a_transmit_says_whether_its_entry_went_out_before() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        ob.append(&target(), env(Some("k")), 0, None, None, false);
        let first = ob.dispatch(0);
        assert_eq!(first.iter().map(|t| t.resend).collect::<Vec<_>>(), [false]);
        // The connection is lost and a new one comes: the entry goes out again, still at
        // attempt 1.
        ob.peer_down(id(1), 1);
        ob.peer_up(id(1), 2, "svc".into(), vec![], 100);
        ob.append(&target(), env(Some("k")), 1, None, None, false);
        let again = ob.dispatch(1);
        assert_eq!(again.iter().map(seq_of).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(
            again.iter().map(|t| t.resend).collect::<Vec<_>>(),
            [true, false]
        );
        let Data::Deliver { env, .. } = &again[0].frame else {
            panic!("a delivery");
        };
        assert_eq!(env.attempt, 1, "a lost connection is no failed attempt");
        // An ack timeout is one; its resend is a resend too.
        assert!(ob.check_timers(1_001).is_empty());
        // After the backoff (at most 300 ms for a first failure).
        let retry = ob.dispatch(1_500);
        assert!(
            retry.len() == 2 && retry.iter().all(|t| t.resend),
            "{retry:?}"
        );
    }

    /// A pause of the node moves every ack deadline on by its length: an entry sent before it
    /// times out an ack timeout (1 s) of running time after it was sent, not at once.
    #[test]
    fn a_pause_postpones_the_ack_deadlines_of_entries_in_flight() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        ob.append(&target(), env(Some("k")), 0, None, None, false);
        assert_eq!(ob.dispatch(0).len(), 1);
        ob.append(&target(), env(Some("j")), 500, None, None, false);
        assert_eq!(ob.dispatch(500).len(), 1);
        let in_flight = |ob: &Outbox| ob.stats()[target().log_name().as_str()].in_flight;
        // The node did not run from 600 to 4,600 ms.
        ob.postpone_in_flight(4_000);
        assert!(ob.check_timers(4_600).is_empty());
        assert_eq!(in_flight(&ob), 2, "nothing timed out at once");
        assert_eq!(ob.next_deadline(), Some(5_000));
        ob.check_timers(5_000);
        assert_eq!(in_flight(&ob), 1, "the first entry's deadline, postponed");
        ob.check_timers(5_500);
        assert_eq!(in_flight(&ob), 0, "the second entry's");
    }

    /// A backoff after an ack timeout ends when the connection the ack timed out on closes
    /// (here: replaced by a new one, and gone): the entry goes out again at once, and the
    /// later entries of its key after it. A backoff after a handler failure does not end.
    #[test]
    fn a_timeout_backoff_ends_when_its_connection_is_gone() {
        for replaced in [true, false] {
            let mut ob = outbox();
            ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
            ob.append(&target(), env(Some("k")), 0, None, None, false);
            ob.append(&target(), env(Some("f")), 0, None, None, false);
            let tx = ob.dispatch(0);
            assert_eq!(tx.iter().map(seq_of).collect::<Vec<_>>(), vec![1, 2]);
            let log = target().log_name();
            // #2's handler fails; #1 times out; both wait out a backoff (100–200 ms).
            assert!(ob.on_nack(id(1), &log, 2, "boom", false, 950).is_none());
            assert!(ob.check_timers(1_000).is_empty());
            ob.append(&target(), env(Some("k")), 1_000, None, None, false);
            assert!(
                ob.dispatch(1_001).is_empty(),
                "the backoffs hold #1, #2 and #3 (behind #1, its key)"
            );
            if replaced {
                ob.peer_up(id(1), 2, "svc".into(), vec![], 100);
            } else {
                ob.peer_down(id(1), 1);
                ob.peer_up(id(1), 2, "svc".into(), vec![], 100);
            }
            let tx = ob.dispatch(1_002);
            assert_eq!(
                tx.iter().map(|t| (seq_of(t), t.conn)).collect::<Vec<_>>(),
                vec![(1, 2), (3, 2)],
                "replaced: {replaced}"
            );
            let retry = ob.next_deadline().expect("#2's backoff");
            assert!(retry > 1_002, "#2 still waits ({retry})");
            assert_eq!(
                ob.dispatch(retry).iter().map(seq_of).collect::<Vec<_>>(),
                vec![2]
            );
        }
    }

    /// What dispatch remembers of a key's chain (`KeyRun`: all up to #3 in flight to the
    /// peer) ends when entries go back to waiting: after a lost peer, #1 may not go (past its
    /// TTL) and holds back #2 to #4, #4 included, which came after what was remembered.
    #[test]
    fn a_lost_peer_ends_what_dispatch_remembered_of_a_key() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        ob.append(&target(), env(Some("k")), 0, Some(100), None, false);
        ob.append(&target(), env(Some("k")), 0, None, None, false);
        assert_eq!(
            ob.dispatch(0).iter().map(seq_of).collect::<Vec<_>>(),
            vec![1, 2]
        );
        ob.append(&target(), env(Some("k")), 1, None, None, false);
        assert_eq!(
            ob.dispatch(1).iter().map(seq_of).collect::<Vec<_>>(),
            vec![3],
            "#3 follows #1 and #2"
        );
        ob.append(&target(), env(Some("k")), 2, None, None, false);
        ob.peer_down(id(1), 1);
        ob.peer_up(id(1), 2, "svc".into(), vec![], 100);
        assert!(
            ob.dispatch(200).is_empty(),
            "#1, past its TTL, holds its key"
        );
        assert_eq!(ob.check_timers(200).len(), 1, "#1 expired");
        assert_eq!(
            ob.dispatch(201).iter().map(seq_of).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
    }

    /// An entry whose ack timed out and whose handler then failed it waits out the
    /// handler's backoff, whatever becomes of the connection.
    #[test]
    fn a_handler_backoff_after_a_timeout_outlasts_the_connection() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        ob.append(&target(), env(Some("k")), 0, None, None, false);
        assert_eq!(ob.dispatch(0).len(), 1);
        let log = target().log_name();
        assert!(ob.check_timers(1_000).is_empty());
        let due = ob.next_deadline().expect("the retry");
        assert_eq!(ob.dispatch(due).len(), 1, "sent again after the timeout");
        assert!(ob.on_nack(id(1), &log, 1, "boom", false, due + 1).is_none());
        ob.peer_up(id(1), 2, "svc".into(), vec![], 100);
        assert!(
            ob.dispatch(due + 2).is_empty(),
            "the handler's backoff holds"
        );
        let retry = ob.next_deadline().expect("the handler's retry");
        assert_eq!(ob.dispatch(retry).len(), 1);
    }

    /// The ack-timeout pass reads the in-flight index: entries sent at different times time
    /// out each at its own deadline, an ack, a nack and a lost peer each take theirs out, and
    /// entries waiting elsewhere are untouched. (Debug builds check the index against the
    /// entries on every pass.)
    #[test]
    fn entries_in_flight_time_out_each_at_its_deadline() {
        let mut ob = outbox();
        let absent = Target::Service("absent".into());
        for _ in 0..50 {
            ob.append(&absent, env(None), 0, None, None, false);
        }
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        let mut sent = Vec::new();
        for t in [0, 100, 200, 300, 400] {
            ob.append(&target(), env(None), t, None, None, false);
            let tx = ob.dispatch(t);
            assert_eq!(tx.len(), 1);
            sent.push(seq_of(&tx[0]));
        }
        let log = target().log_name();
        let in_flight = |ob: &Outbox| ob.stats()[log.as_str()].in_flight;
        // #2 is acked, #3 nacked (back to waiting, in its backoff): three remain in flight.
        ob.on_ack(id(1), &log, &sent[1..2]);
        assert!(
            ob.on_nack(id(1), &log, sent[2], "boom", false, 250)
                .is_none()
        );
        assert_eq!(in_flight(&ob), 3);
        // The ack timeout is 1 s: #1 (sent at 0) is overdue at 1,000, #4 (300) at 1,300.
        ob.check_timers(999);
        assert_eq!(in_flight(&ob), 3);
        ob.check_timers(1_000);
        assert_eq!(in_flight(&ob), 2, "#1 timed out");
        ob.check_timers(1_299);
        assert_eq!(in_flight(&ob), 2);
        ob.check_timers(1_300);
        assert_eq!(in_flight(&ob), 1, "#4 timed out");
        ob.peer_down(id(1), 1);
        assert_eq!(in_flight(&ob), 0, "#5 went back to waiting with its peer");
        ob.check_timers(5_000);
        assert_eq!(ob.stats()["svc:absent"].waiting, 50);
        assert_eq!(ob.len(), 54);
    }

    /// `stats` reads the indexes: waiting and in-flight counts follow sends, acks, nacks and
    /// a lost peer, and the oldest creation time is the head's, moving on when it settles.
    #[test]
    fn status_figures_follow_the_log() {
        let mut ob = outbox();
        let log = target().log_name();
        for t in [10, 20, 30, 40] {
            let mut e = env(None);
            e.created_at_ms = t;
            ob.append(&target(), e, t, None, None, false);
        }
        let figures = |ob: &Outbox| {
            let s = &ob.stats()[log.as_str()];
            (s.waiting, s.in_flight, s.oldest_created_ms)
        };
        assert_eq!(figures(&ob), (4, 0, Some(10)));
        ob.peer_up(id(1), 1, "svc".into(), vec![], 2);
        let seqs: Vec<u64> = ob.dispatch(50).iter().map(seq_of).collect();
        assert_eq!(figures(&ob), (2, 2, Some(10)), "two credits: two in flight");
        ob.on_ack(id(1), &log, &seqs[..1]);
        assert_eq!(figures(&ob), (2, 1, Some(20)), "the head settled");
        assert!(
            ob.on_nack(id(1), &log, seqs[1], "boom", false, 60)
                .is_none()
        );
        assert_eq!(figures(&ob), (3, 0, Some(20)));
        let sent = ob.dispatch(10_000);
        assert_eq!(figures(&ob), (1, 2, Some(20)));
        ob.peer_down(id(1), 1);
        assert_eq!(
            figures(&ob),
            (3, 0, Some(20)),
            "back to waiting with their peer"
        );
        assert_eq!(sent.len(), 2);
        assert!(!ob.stats().contains_key("svc:absent"));
    }

    /// Logs whose one instance has used up its credit are not visited until it gets credit
    /// back: an ack, a nack, a dead letter and a released log each let exactly one more entry
    /// go, and nothing goes without one. (Debug builds check on every dispatch that no log
    /// left unvisited could send.)
    #[test]
    fn logs_out_of_credit_move_when_credit_comes_back() {
        let mut ob = outbox();
        let interests = (0..4)
            .map(|g| Interest {
                pattern: "t.>".into(),
                group: Some(format!("g{g}")),
            })
            .collect();
        ob.peer_up(id(1), 1, "audit".into(), interests, 1);
        for g in 0..4 {
            for _ in 0..2 {
                let mut e = env(None);
                e.kind = Kind::Publish;
                e.destination = "t.x".into();
                ob.append(
                    &Target::Group(format_smolstr!("g{g}")),
                    e,
                    0,
                    None,
                    None,
                    false,
                );
            }
        }
        let mut sent = ob.dispatch(0);
        assert_eq!(sent.len(), 1, "one credit");
        let log_of = |t: &Transmit| match &t.frame {
            Data::Deliver { env, .. } => env.log.clone(),
            other => panic!("unexpected {other:?}"),
        };
        let mut released = 0;
        for step in ["ack", "nack", "dead letter", "release"] {
            assert!(ob.dispatch(1).is_empty(), "no credit before the {step}");
            let t = sent.pop().expect("one in flight");
            let (log, seq) = (log_of(&t), seq_of(&t));
            match step {
                "ack" => assert_eq!(ob.on_ack(id(1), &log, &[seq]).settled.len(), 1),
                "nack" => assert!(ob.on_nack(id(1), &log, seq, "boom", false, 1).is_none()),
                "dead letter" => assert!(ob.on_nack(id(1), &log, seq, "bad", true, 1).is_some()),
                _ => released = ob.release_log(&log, "unsubscribed").len(),
            }
            sent = ob.dispatch(1);
            assert_eq!(sent.len(), 1, "one entry goes after the {step}");
        }
        assert!(released > 0);
        assert_eq!(ob.len(), 8 - 2 - released, "one acked, one dead-lettered");
    }

    #[test]
    fn keyed_entries_stick_to_their_instance_until_settled() {
        let mut ob = outbox();
        ob.peer_up(id(1), 1, "svc".into(), vec![], 100);
        ob.append(&target(), env(Some("k")), 0, None, None, false);
        let first = ob.dispatch(0);
        assert_eq!(first.len(), 1);
        let owner = first[0].peer;
        // A second instance joins: k's in-flight entry pins its next one to the same owner.
        ob.peer_up(id(2), 1, "svc".into(), vec![], 100);
        ob.append(&target(), env(Some("k")), 0, None, None, false);
        let second = ob.dispatch(0);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].peer, owner);
        // The owner disappears: both go to the survivor, in order.
        ob.peer_down(owner, 1);
        let moved: Vec<u64> = ob
            .dispatch(0)
            .into_iter()
            .map(|t| match t.frame {
                Data::Deliver { env, .. } => env.seq,
                _ => 0,
            })
            .collect();
        assert_eq!(moved, vec![1, 2]);
    }
}
