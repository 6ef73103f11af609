//! Metrics: per-node counters kept in atomics (for the admin endpoint's own
//! `/metrics`) and emitted through the [`metrics`] facade (for whatever
//! recorder the embedding program installed).
//!
//! The library never installs a global recorder: several nodes can live in
//! one process, and the program owns that choice. Facade handles are
//! registered when the node starts, so install a recorder before starting
//! nodes. Every series carries a `node` label (the node id).
//!
//! Counters are incremented where the event happens; gauges (backlog, peers,
//! RTT, store figures) are sampled every second by a task of the
//! node, and computed afresh when `/metrics` is rendered.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use peerbus_transport::{CloseCode, NodeId};

use crate::node::{Node, PeerState, Status};
use crate::store::StoreStats;

/// How often the node publishes its gauges to the metrics facade.
pub(crate) const FACADE_SAMPLE: Duration = Duration::from_secs(1);

/// Entries stored by `send`/`publish` (one per group copy).
pub const MESSAGES_SENT: &str = "peerbus_messages_sent_total";
/// Requests whose reply their caller read on the request's own stream (made from a task, to
/// an instance of protocol 6 or later, while the node had few requests in flight).
pub const REQUESTS_OWN_STREAM: &str = "peerbus_requests_own_stream_total";
/// Request streams this node opened for such requests: one per request to an instance of
/// protocol 6, far fewer to one of protocol 7 or later, which serves several requests per
/// stream.
pub const REQUEST_STREAMS_OPENED: &str = "peerbus_request_streams_opened_total";
/// Entries that arrived for local handlers (queued for them), before the dedup window and
/// the stale checks: `received - delivered` counts duplicates, stale copies and the entries
/// still queued.
pub const MESSAGES_RECEIVED: &str = "peerbus_messages_received_total";
/// Entries handed to local handlers.
pub const MESSAGES_DELIVERED: &str = "peerbus_messages_delivered_total";
/// Entries of this node acknowledged by a consumer.
pub const MESSAGES_ACKNOWLEDGED: &str = "peerbus_messages_acknowledged_total";
/// Deliveries sent again (retries, reconnects, another instance).
pub const MESSAGES_REDELIVERED: &str = "peerbus_messages_redelivered_total";
/// Entries given up and moved to the dead-letter store.
pub const MESSAGES_DEAD_LETTERED: &str = "peerbus_messages_dead_lettered_total";
/// Dead letters dropped, oldest first, to keep the dead-letter store within
/// `NodeBuilder::max_dead_letters`.
pub const DEAD_LETTERS_DROPPED: &str = "peerbus_dead_letters_dropped_total";
/// Retransmissions dropped by the dedup window before reaching a handler.
pub const DUPLICATES_DROPPED: &str = "peerbus_duplicates_dropped_total";
/// Unsettled entries (waiting + in flight) per destination log.
pub const BACKLOG_ENTRIES: &str = "peerbus_backlog_entries";
/// Entries sent and not yet acknowledged, per destination log.
pub const IN_FLIGHT_ENTRIES: &str = "peerbus_in_flight_entries";
/// Age of the oldest unsettled entry per destination log.
pub const BACKLOG_OLDEST_AGE: &str = "peerbus_backlog_oldest_age_seconds";
/// Peers with an open connection.
pub const PEERS_CONNECTED: &str = "peerbus_peers_connected";
/// Retired connections still open (see `Status::retiring_connections`).
pub const CONNECTIONS_RETIRING: &str = "peerbus_connections_retiring";
/// Connections this node closed, per close code (`code="protocol_violation"`, …), with the
/// refusals of a revoked certificate and the closes for a dropped mesh key apart
/// (`code="revoked_certificate"`, `code="retired_mesh_key"`, not `mesh_proof_failed`).
pub const CONNECTIONS_CLOSED: &str = "peerbus_connections_closed_total";
/// Known peers per state.
pub const PEERS: &str = "peerbus_peers";
/// Known durable subscriber groups, live and released (tombstones).
pub const DURABLE_GROUPS: &str = "peerbus_durable_groups";
/// Smoothed round-trip time of the connection to each connected peer.
pub const CONNECTION_RTT: &str = "peerbus_connection_rtt_seconds";
/// UDP payload bytes sent to each known peer since the node started (QUIC's count: headers,
/// encryption, acknowledgements and retransmissions included).
pub const PEER_SENT_BYTES: &str = "peerbus_peer_sent_bytes_total";
/// UDP payload bytes received from each known peer since the node started.
pub const PEER_RECEIVED_BYTES: &str = "peerbus_peer_received_bytes_total";
/// Packets to each known peer that QUIC declared lost (and resent what they carried).
pub const PEER_LOST_PACKETS: &str = "peerbus_peer_lost_packets_total";
/// Requests waiting for a reply.
pub const REQUESTS_IN_FLIGHT: &str = "peerbus_requests_in_flight";
/// `send`/`publish` calls waiting for room in a full log (backpressure).
pub const SENDS_WAITING: &str = "peerbus_sends_waiting";
/// 1 for each mesh key this node holds, by fingerprint (`MeshKey::fingerprint`) and role:
/// `proved` for the one it proves, `accepted` for the others of a rotation's step (mesh keys
/// only; one dropped reads 0). `count by (fingerprint) (peerbus_mesh_key_info{role="proved"}
/// == 1)` shows how far a rotation has come across the fleet.
pub const MESH_KEY_INFO: &str = "peerbus_mesh_key_info";
/// When this node's mesh certificate ends, in seconds since the Unix epoch (membership by a
/// mesh CA only): alert well before it.
pub const MESH_CERTIFICATE_EXPIRES: &str = "peerbus_mesh_certificate_expiration_timestamp_seconds";
/// 1 once a peer's refusal or a revocation list of the mesh CA said this node's own
/// certificate is revoked (`Status::mesh_certificate_revoked`), until it presents a new one;
/// 0 otherwise (membership by a mesh CA only).
pub const MESH_CERTIFICATE_REVOKED: &str = "peerbus_mesh_certificate_revoked";
/// Certificates the mesh CA's revocation lists in use revoke (membership by a mesh CA only):
/// every node should show the same number once a new list has reached them all.
pub const MESH_CA_REVOKED: &str = "peerbus_mesh_ca_revoked_certificates";
/// The CRL number of each mesh CA revocation list in use, by CA (membership by a mesh CA,
/// lists numbered below 2^53 only): every node should show the same numbers once a new list
/// has reached them all.
pub const MESH_CA_LIST_NUMBER: &str = "peerbus_mesh_ca_revocation_list_number";
/// When each mesh CA revocation list in use is due to be replaced (its nextUpdate), in
/// seconds since the Unix epoch, by CA (membership by a mesh CA, lists that name a time):
/// alert when it passes, as the CA may have revoked more since.
pub const MESH_CA_LIST_NEXT_UPDATE: &str =
    "peerbus_mesh_ca_revocation_list_next_update_timestamp_seconds";
/// Connections this node refused or closed because the peer's certificate is revoked
/// (membership by a mesh CA only; also counted in [`CONNECTIONS_CLOSED`] as
/// `mesh_proof_failed`).
pub const MESH_CA_REFUSED_REVOKED: &str = "peerbus_mesh_ca_refused_revoked_total";
/// Circuit breaker state per requested service (0 closed, 1 half-open, 2 open).
pub const BREAKER_STATE: &str = "peerbus_breaker_state";
/// Timer ticks of the node's core: 20 a second while it has timed work, one a second when
/// idle (see `Status::core_ticks`).
pub const CORE_TICKS: &str = "peerbus_core_ticks_total";
/// Times the node noticed it had not run for two seconds or more (a stopped or paused process,
/// a blocked runtime) and replaced its connections (see `Status::pauses`).
pub const PAUSES: &str = "peerbus_pauses_total";
/// Durable (fsync'd) store commits.
pub const STORE_FSYNCS: &str = "peerbus_store_fsyncs_total";
/// Store commits.
pub const STORE_COMMITS: &str = "peerbus_store_commits_total";
/// Time one group commit took (a histogram).
pub const STORE_COMMIT_SECONDS: &str = "peerbus_store_commit_seconds";
/// Store checkpoints (what the side log held moved to the database).
pub const STORE_CHECKPOINTS: &str = "peerbus_store_checkpoints_total";
/// Entries checkpoints wrote to the database (those not yet settled when each ran).
pub const STORE_CHECKPOINTED_ENTRIES: &str = "peerbus_store_checkpointed_entries_total";
/// Time spent in checkpoints, in microseconds (a counter: the `metrics` facade counts in
/// integers); commits wait meanwhile.
pub const STORE_CHECKPOINT_MICROS: &str = "peerbus_store_checkpoint_micros_total";
/// Entries checkpoints carried over to the next side-log file instead of the database.
pub const STORE_CARRIED_ENTRIES: &str = "peerbus_store_carried_entries_total";
/// Size of the store file.
pub const STORE_FILE_BYTES: &str = "peerbus_store_file_bytes";
/// Constant 1 with the node's identity as labels.
pub const NODE_INFO: &str = "peerbus_node_info";

/// A monotonic counter: an atomic for this node's own `/metrics`, mirrored
/// into the metrics facade. Its methods mirror `AtomicU64`'s.
pub(crate) struct Count {
    local: AtomicU64,
    facade: metrics::Counter,
}

impl std::fmt::Debug for Count {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Count")
            .field(&self.local.load(Ordering::Relaxed))
            .finish()
    }
}

impl Count {
    /// A counter named `name` with label `node`.
    pub(crate) fn new(name: &'static str, node: &str) -> Self {
        Self {
            local: AtomicU64::new(0),
            facade: metrics::counter!(name, "node" => node.to_string()),
        }
    }

    /// Adds `n`; returns the previous value.
    pub(crate) fn fetch_add(&self, n: u64, order: Ordering) -> u64 {
        self.facade.increment(n);
        self.local.fetch_add(n, order)
    }

    /// The current value.
    pub(crate) fn load(&self, order: Ordering) -> u64 {
        self.local.load(order)
    }
}

/// Upper bounds (seconds) of the commit latency histogram's buckets.
const COMMIT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A fixed-bucket latency histogram (store commit time).
pub(crate) struct Latency {
    buckets: [AtomicU64; COMMIT_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
    facade: metrics::Histogram,
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latency")
            .field("count", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Latency {
    /// The store commit histogram of `node`.
    pub(crate) fn store_commit(node: &str) -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
            facade: metrics::histogram!(STORE_COMMIT_SECONDS, "node" => node.to_string()),
        }
    }

    /// Records one observation.
    pub(crate) fn record(&self, d: Duration) {
        let secs = d.as_secs_f64();
        self.facade.record(secs);
        if let Some(i) = COMMIT_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// The node's counters: status output, `/metrics` and the facade.
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) sent: Count,
    pub(crate) received: Count,
    pub(crate) delivered: Count,
    pub(crate) acked: Count,
    pub(crate) redelivered: Count,
    pub(crate) dead_lettered: Count,
    /// Dead letters dropped for room, counted by the store writer thread.
    pub(crate) dead_letters_dropped: Arc<Count>,
    pub(crate) duplicates_dropped: Count,
    pub(crate) requests_own_stream: Count,
    pub(crate) request_streams_opened: Count,
    /// Core's timer ticks.
    pub(crate) core_ticks: Count,
    /// Pauses the node noticed (`runtime::pause`).
    pub(crate) pauses: Count,
    /// Store commit time, recorded by the store writer thread.
    pub(crate) commit_latency: Arc<Latency>,
}

impl Counters {
    /// The delivery counters now: what [`Node::delivery_counts`] and [`Status`] show.
    pub(crate) fn delivery_counts(&self) -> crate::node::DeliveryCounts {
        crate::node::DeliveryCounts {
            sent: self.sent.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            redelivered: self.redelivered.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            duplicates_dropped: self.duplicates_dropped.load(Ordering::Relaxed),
        }
    }

    /// Counters of node `id`, registered with the facade under `node="<id>"`.
    pub(crate) fn new(id: &NodeId) -> Self {
        let node = id.to_string();
        Self {
            sent: Count::new(MESSAGES_SENT, &node),
            received: Count::new(MESSAGES_RECEIVED, &node),
            delivered: Count::new(MESSAGES_DELIVERED, &node),
            acked: Count::new(MESSAGES_ACKNOWLEDGED, &node),
            redelivered: Count::new(MESSAGES_REDELIVERED, &node),
            dead_lettered: Count::new(MESSAGES_DEAD_LETTERED, &node),
            dead_letters_dropped: Arc::new(Count::new(DEAD_LETTERS_DROPPED, &node)),
            duplicates_dropped: Count::new(DUPLICATES_DROPPED, &node),
            requests_own_stream: Count::new(REQUESTS_OWN_STREAM, &node),
            request_streams_opened: Count::new(REQUEST_STREAMS_OPENED, &node),
            core_ticks: Count::new(CORE_TICKS, &node),
            pauses: Count::new(PAUSES, &node),
            commit_latency: Arc::new(Latency::store_commit(&node)),
        }
    }
}

fn breaker_value(s: crate::engine::breaker::BreakerState) -> f64 {
    use crate::engine::breaker::BreakerState;
    match s {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
    }
}

fn state_name(s: PeerState) -> &'static str {
    match s {
        PeerState::Discovered => "discovered",
        PeerState::Connecting => "connecting",
        PeerState::Connected => "connected",
        PeerState::Unreachable => "unreachable",
        PeerState::Refused => "refused",
        PeerState::Gone => "gone",
    }
}

const ALL_STATES: [PeerState; 6] = [
    PeerState::Discovered,
    PeerState::Connecting,
    PeerState::Connected,
    PeerState::Unreachable,
    PeerState::Refused,
    PeerState::Gone,
];

/// Age in seconds of an entry created at `created_ms` (Unix ms), at `now_ms`.
fn age_secs(created_ms: Option<u64>, now_ms: u64) -> f64 {
    created_ms.map_or(0.0, |c| now_ms.saturating_sub(c) as f64 / 1000.0)
}

/// Publishes the node's gauges to the metrics facade every [`FACADE_SAMPLE`] until it stops.
pub(crate) async fn facade_sampler(node: Node) {
    let cancel = node.shared.cancel.clone();
    let id = node.id().to_string();
    let mut tick = tokio::time::interval(FACADE_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Destinations and peers seen before: their gauges drop to 0 when they disappear.
    let mut last_logs: Vec<String> = Vec::new();
    // The mesh keys published last, so a key dropped since (or moved from one role to the
    // other) reads 0 instead of staying at 1.
    let mut last_keys: Vec<(String, &'static str)> = Vec::new();
    let mut last_peers: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => break,
        }
        let Some(s) = node.status().await else { break };
        let store = node.store_stats();
        let now = crate::message::now_unix_ms();
        let node_label = id.clone();
        for (log, st) in &s.logs {
            let labels = [("node", node_label.clone()), ("destination", log.clone())];
            metrics::gauge!(BACKLOG_ENTRIES, &labels).set((st.waiting + st.in_flight) as f64);
            metrics::gauge!(IN_FLIGHT_ENTRIES, &labels).set(st.in_flight as f64);
            metrics::gauge!(BACKLOG_OLDEST_AGE, &labels).set(age_secs(st.oldest_created_ms, now));
        }
        for log in last_logs.iter().filter(|l| !s.logs.contains_key(*l)) {
            let labels = [("node", node_label.clone()), ("destination", log.clone())];
            metrics::gauge!(BACKLOG_ENTRIES, &labels).set(0.0);
            metrics::gauge!(IN_FLIGHT_ENTRIES, &labels).set(0.0);
            metrics::gauge!(BACKLOG_OLDEST_AGE, &labels).set(0.0);
        }
        last_logs = s.logs.keys().cloned().collect();
        metrics::gauge!(PEERS_CONNECTED, "node" => node_label.clone()).set(s.connections as f64);
        metrics::gauge!(CONNECTIONS_RETIRING, "node" => node_label.clone())
            .set(s.retiring_connections as f64);
        for (code, n) in &s.connections_closed {
            metrics::counter!(CONNECTIONS_CLOSED, "node" => node_label.clone(), "code" => code.clone())
                .absolute(*n);
        }
        let (live, released) = group_counts(&s);
        metrics::gauge!(DURABLE_GROUPS, "node" => node_label.clone(), "state" => "live")
            .set(live as f64);
        metrics::gauge!(DURABLE_GROUPS, "node" => node_label.clone(), "state" => "released")
            .set(released as f64);
        for st in ALL_STATES {
            let n = s.peers.iter().filter(|p| p.state == st).count();
            metrics::gauge!(PEERS, "node" => node_label.clone(), "state" => state_name(st))
                .set(n as f64);
        }
        let mut peers_now = Vec::new();
        for p in &s.peers {
            let peer = p.node_id.to_string();
            let rtt = p.rtt_ms.map_or(0.0, |ms| ms / 1000.0);
            metrics::gauge!(CONNECTION_RTT, "node" => node_label.clone(), "peer" => peer.clone())
                .set(rtt);
            let t = p.traffic;
            metrics::counter!(PEER_SENT_BYTES, "node" => node_label.clone(), "peer" => peer.clone())
                .absolute(t.bytes_sent);
            metrics::counter!(PEER_RECEIVED_BYTES, "node" => node_label.clone(), "peer" => peer.clone())
                .absolute(t.bytes_received);
            metrics::counter!(PEER_LOST_PACKETS, "node" => node_label.clone(), "peer" => peer.clone())
                .absolute(t.packets_lost);
            peers_now.push(peer);
        }
        for gone in last_peers.iter().filter(|p| !peers_now.contains(*p)) {
            metrics::gauge!(CONNECTION_RTT, "node" => node_label.clone(), "peer" => gone.clone())
                .set(0.0);
        }
        last_peers = peers_now;
        metrics::gauge!(REQUESTS_IN_FLIGHT, "node" => node_label.clone())
            .set(s.requests_in_flight as f64);
        metrics::gauge!(SENDS_WAITING, "node" => node_label.clone()).set(s.sends_waiting as f64);
        let keys_now: Vec<(String, &'static str)> = key_roles(&s)
            .map(|(f, role)| (f.to_string(), role))
            .collect();
        for (fingerprint, role) in last_keys.iter().filter(|k| !keys_now.contains(k)) {
            metrics::gauge!(MESH_KEY_INFO, "node" => node_label.clone(),
                "fingerprint" => fingerprint.clone(), "role" => *role)
            .set(0.0);
        }
        for (fingerprint, role) in &keys_now {
            metrics::gauge!(MESH_KEY_INFO, "node" => node_label.clone(),
                "fingerprint" => fingerprint.clone(), "role" => *role)
            .set(1.0);
        }
        last_keys = keys_now;
        if let Some(t) = s.mesh_certificate_expires {
            metrics::gauge!(MESH_CERTIFICATE_EXPIRES, "node" => node_label.clone()).set(t as f64);
            metrics::gauge!(MESH_CERTIFICATE_REVOKED, "node" => node_label.clone()).set(
                if s.mesh_certificate_revoked.is_some() {
                    1.0
                } else {
                    0.0
                },
            );
        }
        if let Some(n) = s.mesh_ca_revoked {
            metrics::gauge!(MESH_CA_REVOKED, "node" => node_label.clone()).set(n as f64);
        }
        if let Some(n) = s.mesh_ca_refused_revoked {
            metrics::counter!(MESH_CA_REFUSED_REVOKED, "node" => node_label.clone()).absolute(n);
        }
        for (ca, number) in list_numbers(&s) {
            metrics::gauge!(MESH_CA_LIST_NUMBER, "node" => node_label.clone(), "ca" => ca)
                .set(number);
        }
        for (ca, next) in list_next_updates(&s) {
            metrics::gauge!(MESH_CA_LIST_NEXT_UPDATE, "node" => node_label.clone(), "ca" => ca)
                .set(next as f64);
        }
        for (svc, b) in &s.breakers {
            metrics::gauge!(BREAKER_STATE, "node" => node_label.clone(), "service" => svc.clone())
                .set(breaker_value(b.state));
        }
        metrics::counter!(STORE_FSYNCS, "node" => node_label.clone()).absolute(store.fsyncs);
        metrics::counter!(STORE_COMMITS, "node" => node_label.clone()).absolute(store.commits);
        for (name, _, value) in checkpoint_counters(&store) {
            metrics::counter!(name, "node" => node_label.clone()).absolute(value);
        }
        metrics::gauge!(STORE_FILE_BYTES, "node" => node_label).set(store.file_bytes as f64);
    }
}

/// The store's checkpoint counters, as `(name, help, value)`: one list for `/metrics` and
/// the facade.
fn checkpoint_counters(store: &StoreStats) -> [(&'static str, &'static str, u64); 4] {
    [
        (
            STORE_CHECKPOINTS,
            "Store checkpoints (the side log moved to the database).",
            store.checkpoints,
        ),
        (
            STORE_CHECKPOINTED_ENTRIES,
            "Entries checkpoints wrote to the database (not yet settled when each ran).",
            store.checkpointed_entries,
        ),
        (
            STORE_CHECKPOINT_MICROS,
            "Microseconds spent in store checkpoints; commits wait meanwhile.",
            store.checkpoint_micros,
        ),
        (
            STORE_CARRIED_ENTRIES,
            "Entries checkpoints carried over to the next side-log file instead of the database.",
            store.carried_entries,
        ),
    ]
}

/// Escapes a Prometheus label value.
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes `# HELP` and `# TYPE` lines.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Each mesh key of `s` by fingerprint, with its role: `proved` (the first), `accepted`.
fn key_roles(s: &Status) -> impl Iterator<Item = (&str, &'static str)> {
    s.mesh_keys
        .iter()
        .enumerate()
        .map(|(i, f)| (f.as_str(), if i == 0 { "proved" } else { "accepted" }))
}

/// The numbered revocation lists in use, by CA subject, with numbers a gauge holds exactly
/// (below 2^53): what [`MESH_CA_LIST_NUMBER`] shows.
fn list_numbers(s: &Status) -> Vec<(String, f64)> {
    const EXACT: u64 = 1 << 53;
    s.mesh_ca_lists
        .iter()
        .filter_map(|l| {
            let n: u64 = l.number.as_deref()?.parse().ok()?;
            (n < EXACT).then(|| (l.ca.clone(), n as f64))
        })
        .collect()
}

/// The revocation lists in use that name a next update, by CA subject: what
/// [`MESH_CA_LIST_NEXT_UPDATE`] shows.
fn list_next_updates(s: &Status) -> Vec<(String, u64)> {
    s.mesh_ca_lists
        .iter()
        .filter_map(|l| Some((l.ca.clone(), l.next_update?)))
        .collect()
}

/// Writes the gauge `name` with one sample per CA subject of `values` (and its header when
/// there is any), each labelled with the node labels `node` and the CA.
fn per_ca_gauge<T: std::fmt::Display>(
    out: &mut String,
    node: &str,
    name: &str,
    help: &str,
    values: Vec<(String, T)>,
) {
    if !values.is_empty() {
        head(out, name, "gauge", help);
    }
    for (ca, value) in values {
        let _ = writeln!(out, "{name}{{{node},ca=\"{}\"}} {value}", esc(&ca));
    }
}

/// How many known durable groups are live and how many released.
fn group_counts(s: &Status) -> (usize, usize) {
    let released = s.groups.values().filter(|g| g.is_released()).count();
    (s.groups.len() - released, released)
}

/// Renders a node's metrics in the Prometheus text exposition format (0.0.4).
pub(crate) fn render(s: &Status, store: &StoreStats, counters: &Counters, now_ms: u64) -> String {
    let mut out = String::with_capacity(4096);
    let node = esc(&s.node_id.to_string());
    let n = format!("node=\"{node}\"");

    head(
        &mut out,
        NODE_INFO,
        "gauge",
        "The node's identity (always 1).",
    );
    let _ = writeln!(
        out,
        "{NODE_INFO}{{{n},service=\"{}\",mesh=\"{}\",listen=\"{}\"}} 1",
        esc(&s.service),
        esc(&s.mesh),
        s.listen
    );
    let counter_rows: [(&str, &str, &Count); 12] = [
        (
            MESSAGES_SENT,
            "Entries stored by send/publish (one per subscriber group copy).",
            &counters.sent,
        ),
        (
            MESSAGES_RECEIVED,
            "Entries that arrived for this node's handlers and were queued for them, \
             duplicates and stale copies included.",
            &counters.received,
        ),
        (
            MESSAGES_DELIVERED,
            "Entries handed to this node's handlers.",
            &counters.delivered,
        ),
        (
            MESSAGES_ACKNOWLEDGED,
            "Entries of this node acknowledged by a consumer.",
            &counters.acked,
        ),
        (
            MESSAGES_REDELIVERED,
            "Deliveries sent again (retries, reconnects, another instance).",
            &counters.redelivered,
        ),
        (
            MESSAGES_DEAD_LETTERED,
            "Entries moved to the dead-letter store.",
            &counters.dead_lettered,
        ),
        (
            DEAD_LETTERS_DROPPED,
            "Dead letters dropped, oldest first, to keep the dead-letter store within its limit.",
            &counters.dead_letters_dropped,
        ),
        (
            DUPLICATES_DROPPED,
            "Retransmissions dropped by the dedup window.",
            &counters.duplicates_dropped,
        ),
        (
            REQUESTS_OWN_STREAM,
            "Requests whose caller read the reply on the request's own stream.",
            &counters.requests_own_stream,
        ),
        (
            REQUEST_STREAMS_OPENED,
            "Request streams opened for requests answered on their own stream.",
            &counters.request_streams_opened,
        ),
        (
            CORE_TICKS,
            "Timer ticks of the node's core: 20 a second while it has timed work, one a \
             second when idle.",
            &counters.core_ticks,
        ),
        (
            PAUSES,
            "Times the node noticed it had not run for two seconds or more and replaced its \
             connections.",
            &counters.pauses,
        ),
    ];
    for (name, help, c) in counter_rows {
        head(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name}{{{n}}} {}", c.load(Ordering::Relaxed));
    }

    head(
        &mut out,
        BACKLOG_ENTRIES,
        "gauge",
        "Unsettled entries (waiting + in flight) per destination log.",
    );
    for (log, st) in &s.logs {
        let _ = writeln!(
            out,
            "{BACKLOG_ENTRIES}{{{n},destination=\"{}\"}} {}",
            esc(log),
            st.waiting + st.in_flight
        );
    }
    head(
        &mut out,
        IN_FLIGHT_ENTRIES,
        "gauge",
        "Entries sent and not yet acknowledged per destination log.",
    );
    for (log, st) in &s.logs {
        let _ = writeln!(
            out,
            "{IN_FLIGHT_ENTRIES}{{{n},destination=\"{}\"}} {}",
            esc(log),
            st.in_flight
        );
    }
    head(
        &mut out,
        BACKLOG_OLDEST_AGE,
        "gauge",
        "Age of the oldest unsettled entry per destination log.",
    );
    for (log, st) in &s.logs {
        let _ = writeln!(
            out,
            "{BACKLOG_OLDEST_AGE}{{{n},destination=\"{}\"}} {:.3}",
            esc(log),
            age_secs(st.oldest_created_ms, now_ms)
        );
    }

    head(
        &mut out,
        PEERS_CONNECTED,
        "gauge",
        "Peers with an open connection.",
    );
    let _ = writeln!(out, "{PEERS_CONNECTED}{{{n}}} {}", s.connections);
    head(
        &mut out,
        CONNECTIONS_RETIRING,
        "gauge",
        "Connections that lost the tie-break to a second one with the same peer, open until \
         the requests they carry are answered.",
    );
    let _ = writeln!(
        out,
        "{CONNECTIONS_RETIRING}{{{n}}} {}",
        s.retiring_connections
    );
    // The codes that blame the peer come from the one list of them.
    let faults: Vec<&str> = CloseCode::ALL
        .iter()
        .filter(|c| c.is_protocol_fault())
        .map(|c| c.name())
        .collect();
    head(
        &mut out,
        CONNECTIONS_CLOSED,
        "counter",
        &format!(
            "Connections this node closed, per close code: {} name a misbehaving or mismatched \
             peer, {} a frozen or overloaded one, {} a network path that went dark and came \
             back (reconnected at once), {} a peer whose certificate the mesh CA revoked, {} \
             a live connection whose peer proved a mesh key this node dropped (both closed as \
             {} on the wire).",
            faults.join(", "),
            CloseCode::Unresponsive.name(),
            CloseCode::Stalled.name(),
            peerbus_transport::CloseCounts::REVOKED_CERTIFICATE,
            peerbus_transport::CloseCounts::RETIRED_MESH_KEY,
            CloseCode::MeshProofFailed.name()
        ),
    );
    for (code, count) in &s.connections_closed {
        let _ = writeln!(
            out,
            "{CONNECTIONS_CLOSED}{{{n},code=\"{}\"}} {count}",
            esc(code)
        );
    }
    head(
        &mut out,
        DURABLE_GROUPS,
        "gauge",
        "Known durable subscriber groups: live (publishers keep their copies) and released.",
    );
    let (live, released) = group_counts(s);
    let _ = writeln!(out, "{DURABLE_GROUPS}{{{n},state=\"live\"}} {live}");
    let _ = writeln!(out, "{DURABLE_GROUPS}{{{n},state=\"released\"}} {released}");
    head(&mut out, PEERS, "gauge", "Known peers per state.");
    for st in ALL_STATES {
        let count = s.peers.iter().filter(|p| p.state == st).count();
        let _ = writeln!(out, "{PEERS}{{{n},state=\"{}\"}} {count}", state_name(st));
    }
    head(
        &mut out,
        CONNECTION_RTT,
        "gauge",
        "Smoothed round-trip time of the connection to each connected peer.",
    );
    for p in &s.peers {
        if let Some(ms) = p.rtt_ms {
            let _ = writeln!(
                out,
                "{CONNECTION_RTT}{{{n},peer=\"{}\",service=\"{}\"}} {:.6}",
                esc(&p.node_id.to_string()),
                esc(&p.service),
                ms / 1000.0
            );
        }
    }
    /// A per-peer counter: its name, help and figure.
    type PeerCounter = (
        &'static str,
        &'static str,
        fn(&peerbus_transport::Traffic) -> u64,
    );
    let peer_counters: [PeerCounter; 3] = [
        (
            PEER_SENT_BYTES,
            "UDP payload bytes sent to each known peer (QUIC's count).",
            |t| t.bytes_sent,
        ),
        (
            PEER_RECEIVED_BYTES,
            "UDP payload bytes received from each known peer (QUIC's count).",
            |t| t.bytes_received,
        ),
        (
            PEER_LOST_PACKETS,
            "Packets to each known peer that QUIC declared lost.",
            |t| t.packets_lost,
        ),
    ];
    for (name, help, figure) in peer_counters {
        head(&mut out, name, "counter", help);
        for p in &s.peers {
            let _ = writeln!(
                out,
                "{name}{{{n},peer=\"{}\",service=\"{}\"}} {}",
                esc(&p.node_id.to_string()),
                esc(&p.service),
                figure(&p.traffic)
            );
        }
    }
    head(
        &mut out,
        REQUESTS_IN_FLIGHT,
        "gauge",
        "Requests waiting for a reply.",
    );
    let _ = writeln!(out, "{REQUESTS_IN_FLIGHT}{{{n}}} {}", s.requests_in_flight);
    head(
        &mut out,
        SENDS_WAITING,
        "gauge",
        "send/publish calls waiting for room in a full log (backpressure); each fails with \
         Backpressure once its send_timeout passes.",
    );
    let _ = writeln!(out, "{SENDS_WAITING}{{{n}}} {}", s.sends_waiting);
    if !s.mesh_keys.is_empty() {
        head(
            &mut out,
            MESH_KEY_INFO,
            "gauge",
            "1 for each mesh key this node holds, by fingerprint: role proved for the one it \
             proves, accepted for the others of a key rotation's step.",
        );
        for (fingerprint, role) in key_roles(s) {
            let _ = writeln!(
                out,
                "{MESH_KEY_INFO}{{{n},fingerprint=\"{}\",role=\"{role}\"}} 1",
                esc(fingerprint)
            );
        }
    }
    if let Some(t) = s.mesh_certificate_expires {
        head(
            &mut out,
            MESH_CERTIFICATE_EXPIRES,
            "gauge",
            "When this node's mesh certificate ends, in seconds since the Unix epoch.",
        );
        let _ = writeln!(out, "{MESH_CERTIFICATE_EXPIRES}{{{n}}} {t}");
        head(
            &mut out,
            MESH_CERTIFICATE_REVOKED,
            "gauge",
            "1 once a peer's refusal or a revocation list of the mesh CA said this node's \
             certificate is revoked (its peers refuse it until it presents a new one), else 0.",
        );
        let revoked = u8::from(s.mesh_certificate_revoked.is_some());
        let _ = writeln!(out, "{MESH_CERTIFICATE_REVOKED}{{{n}}} {revoked}");
    }
    if let Some(revoked) = s.mesh_ca_revoked {
        head(
            &mut out,
            MESH_CA_REVOKED,
            "gauge",
            "Certificates the mesh CA's revocation lists in use revoke.",
        );
        let _ = writeln!(out, "{MESH_CA_REVOKED}{{{n}}} {revoked}");
    }
    if let Some(refused) = s.mesh_ca_refused_revoked {
        head(
            &mut out,
            MESH_CA_REFUSED_REVOKED,
            "counter",
            "Connections this node refused or closed because the peer's certificate is revoked \
             (also counted as mesh_proof_failed closes).",
        );
        let _ = writeln!(out, "{MESH_CA_REFUSED_REVOKED}{{{n}}} {refused}");
    }
    per_ca_gauge(
        &mut out,
        &n,
        MESH_CA_LIST_NUMBER,
        "The CRL number of each mesh CA revocation list in use, by CA.",
        list_numbers(s),
    );
    per_ca_gauge(
        &mut out,
        &n,
        MESH_CA_LIST_NEXT_UPDATE,
        "When each mesh CA revocation list in use is due to be replaced (nextUpdate), in \
         seconds since the Unix epoch, by CA.",
        list_next_updates(s),
    );
    head(
        &mut out,
        BREAKER_STATE,
        "gauge",
        "Circuit breaker per requested service: 0 closed, 1 half-open, 2 open.",
    );
    for (svc, b) in &s.breakers {
        let _ = writeln!(
            out,
            "{BREAKER_STATE}{{{n},service=\"{}\"}} {}",
            esc(svc),
            breaker_value(b.state)
        );
    }

    head(
        &mut out,
        STORE_FSYNCS,
        "counter",
        "Durable (fsync'd) store commits.",
    );
    let _ = writeln!(out, "{STORE_FSYNCS}{{{n}}} {}", store.fsyncs);
    head(&mut out, STORE_COMMITS, "counter", "Store commits.");
    let _ = writeln!(out, "{STORE_COMMITS}{{{n}}} {}", store.commits);
    head(
        &mut out,
        STORE_FILE_BYTES,
        "gauge",
        "Size of the store file in bytes.",
    );
    let _ = writeln!(out, "{STORE_FILE_BYTES}{{{n}}} {}", store.file_bytes);
    for (name, help, value) in checkpoint_counters(store) {
        head(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name}{{{n}}} {value}");
    }

    let lat = &counters.commit_latency;
    head(
        &mut out,
        STORE_COMMIT_SECONDS,
        "histogram",
        "Time one store group commit took.",
    );
    let mut cumulative = 0;
    for (i, le) in COMMIT_BUCKETS.iter().enumerate() {
        cumulative += lat.buckets[i].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{STORE_COMMIT_SECONDS}_bucket{{{n},le=\"{le}\"}} {cumulative}"
        );
    }
    let count = lat.count.load(Ordering::Relaxed);
    let _ = writeln!(
        out,
        "{STORE_COMMIT_SECONDS}_bucket{{{n},le=\"+Inf\"}} {count}"
    );
    let sum = lat.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
    let _ = writeln!(out, "{STORE_COMMIT_SECONDS}_sum{{{n}}} {sum:.9}");
    let _ = writeln!(out, "{STORE_COMMIT_SECONDS}_count{{{n}}} {count}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn latency_buckets_count_each_observation_once() {
        let l = Latency::store_commit("n");
        l.record(Duration::from_micros(50));
        l.record(Duration::from_millis(3));
        l.record(Duration::from_secs(10));
        assert_eq!(l.count(), 3);
        let in_buckets: u64 = l.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        // The 10 s observation is above every finite bucket: only in +Inf (the count).
        assert_eq!(in_buckets, 2);
        assert_eq!(l.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(l.buckets[5].load(Ordering::Relaxed), 1);
    }
}
