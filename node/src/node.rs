//! [`Node`]: the handle a service holds.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use peerbus_discovery::Discovery;
use peerbus_transport::{MeshCa, MeshKey, NodeCert, NodeId, Traffic};
use serde::Serialize;
use smol_str::SmolStr;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info, warn};

use crate::builder::NodeBuilder;
use crate::engine::outbox::{LogStats, Target};
use crate::engine::routing::validate_subject;
use crate::engine::wire::{Envelope, Headers, Interest, Kind};
use crate::error::{
    AdminError, DeliveryError, HandlerError, RenewError, RequestError, SendError, SubscribeError,
};
use crate::message::{Message, Outgoing, now_unix_ms};
use crate::runtime::cert::{FileOutcome, MeshReload};
use crate::runtime::core::{Append, CoreMsg, Item, Role, ScatterTarget, Targets};
use crate::runtime::storage::StoreOp;
use crate::runtime::{self, InboundRequest, LocalSub, MAX_SUBSCRIPTIONS, SERVE_QUEUE, Shared};
use crate::store::DeadLetter;
use crate::store::Durability;
use crate::subscription::Subscription;

/// How long a shutting-down node must see no handler running and no ack pending before it
/// closes its connections: frames its peers sent before they saw its goodbye arrive meanwhile.
const QUIET_SETTLE: Duration = Duration::from_millis(150);

/// Least time a stopping node gives its peers to acknowledge the last frames it sent them
/// (acks, its goodbye, group news) before it closes the connections, which would discard
/// frames not yet delivered: it waits until the shutdown grace ends, or this long after the
/// quiet wait if that is later. A few round trips on any network that works, longer on an
/// overloaded machine; a frozen or partitioned peer holds a shutdown up to then.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// A running peerbus node, embedded in a service. Cheap to clone; every clone
/// is the same node. Stop it with [`Node::shutdown`].
#[derive(Clone)]
pub struct Node {
    pub(crate) shared: Arc<Shared>,
    pub(crate) inner: Arc<NodeInner>,
}

pub(crate) struct NodeInner {
    pub(crate) discoveries: Mutex<Vec<Box<dyn Discovery>>>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) admin_addr: Option<SocketAddr>,
    pub(crate) stopped: Mutex<bool>,
    pub(crate) store_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub(crate) store: mpsc::Sender<crate::runtime::storage::StoreOp>,
    pub(crate) span: tracing::Span,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.shared.id)
            .field("service", &self.shared.service)
            .field("mesh", &self.shared.mesh)
            .finish()
    }
}

/// How this node sees a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerState {
    /// Announced by discovery; not dialed yet.
    Discovered,
    /// Dialing.
    Connecting,
    /// Connected and past the mesh proof.
    Connected,
    /// Dial or connection failed; retrying while it is advertised.
    Unreachable,
    /// The peer refused us (for example a mesh key mismatch).
    Refused,
    /// No longer advertised and not connected.
    Gone,
}

/// What a node's delivery counters show since it started ([`Node::delivery_counts`]): the
/// counts its `peerbus_messages_{sent,acknowledged,redelivered,received,delivered}_total`
/// and `peerbus_duplicates_dropped_total` metrics show.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeliveryCounts {
    /// Entries stored by `send`/`publish` (one per group copy).
    pub sent: u64,
    /// Entries of this node acknowledged by a consumer.
    pub acked: u64,
    /// Entries sent again: after a nack, an ack timeout, a lost peer or to another instance.
    pub redelivered: u64,
    /// Entries that arrived for local handlers, duplicates and stale copies included.
    pub received: u64,
    /// Entries handed to local handlers.
    pub delivered: u64,
    /// Retransmissions the dedup window dropped before they reached a handler.
    pub duplicates_dropped: u64,
}

/// A peer as this node sees it.
#[derive(Clone, Debug, Serialize)]
pub struct PeerInfo {
    /// Its node id.
    #[serde(serialize_with = "ser_display")]
    pub node_id: NodeId,
    /// Its service (empty until known).
    pub service: String,
    /// Addresses it was found at.
    pub addrs: Vec<SocketAddr>,
    /// Connection state.
    pub state: PeerState,
    /// Round-trip time when connected, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// The last connection error, if any.
    pub last_error: Option<String>,
    /// Deliveries this node sent to the peer since it started (retries included).
    pub delivered_to: u64,
    /// Entries of this node the peer acknowledged since this node started.
    pub acked_by: u64,
    /// Entries from the peer that this node's handlers finished since it started.
    pub handled_from: u64,
    /// Which side dialed the current connection (both ends agree: one connection per pair).
    #[serde(serialize_with = "ser_opt_display")]
    pub dialer: Option<NodeId>,
    /// Whether the peer is connected and takes its service's messages (its `messages()` stream
    /// is taken and alive): only then does a `send` to its service go to it.
    pub consumes: bool,
    /// What the connections to the peer carried since this node started, as QUIC counts it
    /// (UDP payload bytes with headers, encryption, acknowledgements and retransmissions; see
    /// [`Traffic`]).
    pub traffic: Traffic,
    /// The wire protocol version the current connection speaks (the highest both nodes know);
    /// `None` when not connected. A mesh in the middle of an upgrade shows some peers on an
    /// older version.
    pub protocol: Option<u32>,
}

/// A snapshot of a node's state, for `peerbus status` and the admin endpoint.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// This node's id.
    #[serde(serialize_with = "ser_display")]
    pub node_id: NodeId,
    /// This node's service.
    pub service: String,
    /// This node's mesh.
    pub mesh: String,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Known peers.
    pub peers: Vec<PeerInfo>,
    /// Open connections (at most one per peer), not counting retired ones.
    pub connections: usize,
    /// Retired connections still open: when two nodes dial each other at once, both keep
    /// the connection dialled by the smaller id, and the other one stays open (carrying no
    /// new work) until the requests sent on it are answered.
    pub retiring_connections: usize,
    /// Connections retired since start (see `retiring_connections`).
    pub connections_retired: u64,
    /// Connections this node closed since start, by close code
    /// ([`CloseCode::name`](peerbus_transport::CloseCode::name): `protocol_violation`,
    /// `malformed_frame`, `mesh_proof_failed`, …; every code, zeros included), with the
    /// refusals of a revoked certificate apart as `revoked_certificate`
    /// ([`CloseCounts::by_cause`](peerbus_transport::CloseCounts::by_cause)): they close
    /// with `mesh_proof_failed` on the wire, but are a revoked node that keeps dialling, not
    /// a mismatched peer; likewise the live connections closed because their peer proved a
    /// mesh key this node dropped, as `retired_mesh_key`. A growing count of the protocol
    /// codes means a peer that misbehaves or runs an incompatible build; each close is also
    /// logged (warn) with the peer and the reason.
    pub connections_closed: BTreeMap<String, u64>,
    /// Per destination log: waiting, in flight, oldest.
    pub logs: BTreeMap<String, LogStats>,
    /// Dead letters the node's store holds (what `peerbus dlq list` lists), as its writer
    /// thread last counted them: a new one counts once its commit is done; replays, moves
    /// back and drops past `NodeBuilder::max_dead_letters` take theirs off.
    /// `peerbus_messages_dead_lettered_total` counts every one since start.
    pub dead_letters: usize,
    /// Entries stored by `send`/`publish` since start (one per group copy).
    pub sent: u64,
    /// Entries acknowledged by receivers since start.
    pub acked: u64,
    /// Entries that arrived for local handlers since start and were queued for them,
    /// duplicates and stale copies included (`received - delivered` counts those and the
    /// entries still queued).
    pub received: u64,
    /// Entries handed to local handlers since start.
    pub delivered: u64,
    /// Entries sent again (retries, reconnects) since start.
    pub redelivered: u64,
    /// Requests waiting for a reply.
    pub requests_in_flight: usize,
    /// Requests since start whose caller read the reply on the request's own stream: made
    /// from a task, to an instance of protocol 6 or later, while the node had few requests in
    /// flight (see ARCHITECTURE, "Requests"). The others are answered through the node's
    /// lane readers.
    pub requests_own_stream: u64,
    /// Request streams this node opened for those requests: one per request to an instance
    /// of protocol 6; to one of protocol 7 or later a stream is kept for the next requests,
    /// so far fewer.
    pub request_streams_opened: u64,
    /// Timer ticks of the node's core since start. Core ticks every 50 ms while it has timed
    /// work (unsettled entries, requests in flight, calls waiting for room, retired
    /// connections, writes not yet synced with `Durability::Interval`) and once a second
    /// otherwise, so an idle node seldom wakes.
    pub core_ticks: u64,
    /// Times since start this node noticed that it had not run for two seconds or more: its
    /// process was stopped or paused, or its runtime's threads were blocked (a handler that
    /// blocks them does that). Each time it replaced every connection that was open, since
    /// a peer may have given up on it and given its entries to another instance, and dropped
    /// unhandled what had arrived on them (their senders send it again). See ARCHITECTURE,
    /// "Liveness and reconnects".
    pub pauses: u64,
    /// `send`/`publish` calls waiting for room in a full log (backpressure; at most
    /// `max_log_entries` of them, and 65,536); each fails with [`SendError::Backpressure`]
    /// once its `send_timeout` passes.
    pub sends_waiting: usize,
    /// Connections that received nothing for a second (stalled, say by a partition) whose
    /// peer is being dialled now to see if it answers a new connection; at most 16 at once,
    /// the others wait for a free slot (ARCHITECTURE, "Liveness and reconnects").
    pub stall_probes: usize,
    /// When this node's mesh certificate ends, in seconds since the Unix epoch, with
    /// membership by a mesh CA (after a renewal, the new one's); `None` otherwise. Peers refuse
    /// the node from then on.
    pub mesh_certificate_expires: Option<u64>,
    /// The services this node's mesh certificate binds it to (`peerbus ca issue --service`;
    /// empty: any), with membership by a mesh CA; `None` otherwise.
    pub mesh_certificate_services: Option<Vec<String>>,
    /// The fingerprints ([`MeshKey::fingerprint`](peerbus_transport::MeshKey::fingerprint))
    /// of the mesh keys this node proves (the first) and accepts now: one key, or those of a
    /// rotation's step. Empty with a mesh CA or an open mesh.
    pub mesh_keys: Vec<String>,
    /// Why this node's mesh certificate is revoked, once a peer refused it as revoked (the
    /// refusal names its serial number) or a revocation list of its CA said so (one a peer
    /// passed on, or its `--mesh-crl` file read again): its peers refuse it until it presents
    /// a new certificate (`peerbus ca issue`), which clears this
    /// ([`Endpoint::own_certificate_revoked`](peerbus_transport::Endpoint::own_certificate_revoked)).
    /// `None` otherwise, and without a mesh CA.
    pub mesh_certificate_revoked: Option<String>,
    /// How many certificates the mesh CA's revocation lists in use revoke
    /// ([`NodeBuilder::mesh_crl_file`](crate::NodeBuilder::mesh_crl_file)), with membership
    /// by a mesh CA; `None` otherwise. Every node of a mesh should show the same number once
    /// a new list has reached them all.
    pub mesh_ca_revoked: Option<usize>,
    /// The mesh CA's revocation lists in use, one per CA key: each one's CA, CRL number, issue
    /// time and count of revoked certificates. Every node of a mesh shows the same numbers
    /// once a new list has reached them all. Empty without a mesh CA or lists.
    pub mesh_ca_lists: Vec<peerbus_transport::RevocationListInfo>,
    /// Connections this node refused or closed since start because the peer's certificate
    /// is revoked, with membership by a mesh CA; `None` otherwise: `connections_closed`'s
    /// `revoked_certificate`. A count that keeps growing is a revoked node that still runs
    /// and dials.
    pub mesh_ca_refused_revoked: Option<u64>,
    /// Circuit breaker and bulkhead per requested service.
    pub breakers: BTreeMap<String, BreakerStatus>,
    /// Durable subscriber groups this node knows of (a `publish` keeps copies for the live
    /// ones whose patterns match), with their versions; a released group has no patterns and
    /// is kept as a tombstone (see [`Node::unsubscribe_group`]).
    pub groups: BTreeMap<String, crate::engine::wire::GroupState>,
}

/// A requested service's circuit breaker and bulkhead.
#[derive(Clone, Debug, Serialize)]
pub struct BreakerStatus {
    /// Closed, open or half-open.
    pub state: crate::engine::breaker::BreakerState,
    /// Requests that ended within the breaker's window.
    pub requests_in_window: usize,
    /// Of those, failures (timeouts, lost instances, handler errors).
    pub failures_in_window: usize,
    /// Requests waiting for a reply now.
    pub in_flight: usize,
    /// The bulkhead: most requests in flight to this service.
    pub max_in_flight: usize,
}

fn ser_opt_display<S: serde::Serializer>(id: &Option<NodeId>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.collect_str(id),
        None => s.serialize_none(),
    }
}

fn ser_display<S: serde::Serializer>(id: &NodeId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// Awaitable acknowledgement of a `send` or `publish`.
///
/// The message is already accepted when you hold a receipt; awaiting
/// [`Receipt::acked`] waits until every copy was handled by a consumer.
#[must_use = "dropping a receipt is fine, but then you do not learn when the message was handled"]
pub struct Receipt {
    /// `None` when no copy was stored.
    ticket: Option<Arc<Ticket>>,
    copies: usize,
}

impl std::fmt::Debug for Receipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipt")
            .field("copies", &self.copies)
            .finish_non_exhaustive()
    }
}

impl Receipt {
    /// How many copies were stored (1 for `send`; one per subscriber group for `publish`).
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// Waits until every copy was acknowledged by a consumer's handler. Fails as soon as one
    /// copy fails (dead-lettered, released, or the node stopped first).
    pub async fn acked(self) -> Result<(), DeliveryError> {
        let Some(ticket) = self.ticket else {
            return Ok(());
        };
        let copies = self.copies;
        std::future::poll_fn(|cx| ticket.poll_acked(cx, copies)).await
    }
}

/// What a `send`/`publish` caller and core share, one allocation per call: whether core
/// accepted the call (and how many copies it stored), and how those copies ended. Core answers
/// through a [`CallReply`] and one [`CopyReceipt`] per copy; only the caller's task waits on
/// it (first for the answer, then through its [`Receipt`]), so one waker slot is enough.
#[derive(Default)]
pub(crate) struct Ticket {
    state: Mutex<TicketState>,
}

#[derive(Default)]
struct TicketState {
    /// Core's answer to the call, until the caller takes it.
    answer: Option<Result<usize, SendError>>,
    /// Whether core answered (the answer may have been taken since).
    answered: bool,
    /// Copies settled so far.
    settled: usize,
    /// Why the first failed copy failed.
    failed: Option<DeliveryError>,
    /// The caller's task, when it waits.
    waker: Option<Waker>,
}

impl Ticket {
    /// Updates the state and wakes the caller.
    fn update(&self, f: impl FnOnce(&mut TicketState)) {
        let waker = {
            let mut st = runtime::lock(&self.state);
            f(&mut st);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Core's answer: the number of copies stored, or why the call failed.
    fn poll_answer(&self, cx: &mut Context<'_>) -> Poll<Result<usize, SendError>> {
        let mut st = runtime::lock(&self.state);
        if let Some(answer) = st.answer.take() {
            return Poll::Ready(answer);
        }
        if st.answered {
            return Poll::Ready(Err(SendError::Stopped));
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Every one of `copies` settled (`Ok`), or one failed.
    fn poll_acked(&self, cx: &mut Context<'_>, copies: usize) -> Poll<Result<(), DeliveryError>> {
        let mut st = runtime::lock(&self.state);
        if let Some(e) = &st.failed {
            return Poll::Ready(Err(e.clone()));
        }
        if st.settled >= copies {
            return Poll::Ready(Ok(()));
        }
        st.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Core's answer to one `send`/`publish` call. Dropped unanswered (core stopped first), it
/// answers [`SendError::Stopped`].
pub(crate) struct CallReply(Option<Arc<Ticket>>);

impl CallReply {
    /// Answers the call: `Ok(copies stored)` or why it failed.
    pub(crate) fn send(mut self, answer: Result<usize, SendError>) {
        if let Some(t) = self.0.take() {
            t.update(|st| {
                st.answer = Some(answer);
                st.answered = true;
            });
        }
    }

    /// A receipt for one copy of this call.
    pub(crate) fn copy_receipt(&self) -> CopyReceipt {
        CopyReceipt(self.0.clone())
    }
}

#[cfg(test)]
impl CallReply {
    /// A reply and the ticket that receives its answer, for tests of what answers calls.
    pub(crate) fn for_test() -> (CallReply, Arc<Ticket>) {
        let ticket = Arc::new(Ticket::default());
        (CallReply(Some(ticket.clone())), ticket)
    }
}

#[cfg(test)]
impl Ticket {
    /// The answer to the call, once there is one (`None` before).
    pub(crate) fn answer_now(&self) -> Option<Result<usize, SendError>> {
        runtime::lock(&self.state).answer.take()
    }
}

impl Drop for CallReply {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.update(|st| {
                st.answer = Some(Err(SendError::Stopped));
                st.answered = true;
            });
        }
    }
}

/// How one stored copy of a call ended. Dropped unsettled (core stopped first, or the copy was
/// discarded), it counts as [`DeliveryError::Stopped`].
pub(crate) struct CopyReceipt(Option<Arc<Ticket>>);

impl std::fmt::Debug for CopyReceipt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CopyReceipt")
    }
}

impl CopyReceipt {
    /// Reports how the copy ended.
    pub(crate) fn send(mut self, result: Result<(), DeliveryError>) {
        if let Some(t) = self.0.take() {
            settle_copy(&t, result);
        }
    }
}

impl Drop for CopyReceipt {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            settle_copy(&t, Err(DeliveryError::Stopped));
        }
    }
}

fn settle_copy(t: &Ticket, result: Result<(), DeliveryError>) {
    t.update(|st| {
        st.settled += 1;
        if let Err(e) = result
            && st.failed.is_none()
        {
            st.failed = Some(e);
        }
    });
}

/// A running `serve` handler; dropping it does not stop serving (use [`ServeHandle::stop`]).
pub struct ServeHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeHandle").finish_non_exhaustive()
    }
}

impl ServeHandle {
    /// Stops taking new requests; peers are told this node no longer serves.
    pub async fn stop(self) {
        runtime::write(&self.shared.routes).serve = None;
        let _ = self.shared.core.send(CoreMsg::InterestsChanged).await;
    }
}

impl Node {
    /// Starts configuring a node for `service`. See [`NodeBuilder`].
    pub fn builder(service: impl Into<String>) -> NodeBuilder {
        NodeBuilder::new(service)
    }

    /// This node's id (its public key).
    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    /// This node's service name.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// This node's mesh name.
    pub fn mesh(&self) -> &str {
        &self.shared.mesh
    }

    /// The QUIC address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The address of the admin HTTP endpoint (status, metrics, live mesh page), when it was
    /// turned on with [`NodeBuilder::admin`]. With port 0 asked for, this is the port chosen.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.inner.admin_addr
    }

    /// Presents `cert` from now on in place of this node's mesh certificate (membership by a
    /// mesh CA): for a service that gets renewed certificates from elsewhere than a file
    /// ([`NodeBuilder::mesh_ca_files`](crate::NodeBuilder::mesh_ca_files) reads its file
    /// again by itself). Refused when the node has no mesh CA, or `cert` is for another node,
    /// not from a trusted CA, not valid now, or bound to services other than this node's
    /// ([`NodeCert::services`]).
    pub fn renew_mesh_certificate(&self, cert: &NodeCert) -> Result<(), RenewError> {
        self.shared.renew_certificate(cert).map_err(RenewError)
    }

    /// Trusts `ca` from now on in place of this node's mesh CA certificates, and closes live
    /// connections to peers it does not accept. Refused when the node has no mesh CA, or `ca`
    /// does not accept this node's own certificate (renew that first).
    pub fn renew_mesh_ca(&self, ca: MeshCa) -> Result<(), RenewError> {
        self.shared
            .endpoint
            .renew_trust(ca)
            .map_err(|e| RenewError(e.to_string()))?;
        self.shared.membership_changed();
        Ok(())
    }

    /// Proves `keys[0]` and accepts a peer that proves any of `keys` from now on, in place of
    /// the mesh keys this node holds (the builder's, [`also_accept_mesh_keys`] included, or its
    /// key file's): a key rotation's step in place for a service that gets its keys from
    /// elsewhere than a file, a secrets manager say ([`Node::reload_mesh_files`] reads a
    /// [`mesh_key_file`] again). Take each step on every node before the next, as with
    /// files (README: "Rotating the mesh key"). Live connections whose peer proved a key not
    /// in `keys` are closed (`retired_mesh_key` in [`Status::connections_closed`]); a peer
    /// that proves one of `keys` connects again at once. Refused, with the keys in use kept,
    /// when the node has no mesh key (a mesh CA or an open mesh), or `keys` is empty, holds
    /// more than [`MAX_MESH_KEYS`](peerbus_transport::MAX_MESH_KEYS) keys or one key twice.
    ///
    /// [`also_accept_mesh_keys`]: crate::NodeBuilder::also_accept_mesh_keys
    /// [`mesh_key_file`]: crate::NodeBuilder::mesh_key_file
    pub fn renew_mesh_keys(&self, keys: Vec<MeshKey>) -> Result<(), RenewError> {
        self.shared.renew_keys(keys).map_err(RenewError)
    }

    /// Reads this node's mesh files now and takes what changed.
    /// - Mesh CA files (the CA certificate file, its revocation lists, this node's
    ///   certificate), which the node also reads by itself every
    ///   [`NodeBuilder::mesh_cert_check_every`](crate::NodeBuilder::mesh_cert_check_every):
    ///   for an operator who just revoked a member (`peerbus ca revoke`) or renewed a
    ///   certificate and does not want to wait for the next look. A new list or CA file
    ///   checks live connections again and is passed on to peers.
    /// - A mesh key file ([`NodeBuilder::mesh_key_file`](crate::NodeBuilder::mesh_key_file)),
    ///   read only when asked: the node proves its first key and accepts all of them from
    ///   now on, so a key rotation's steps need no restarts. Live connections whose peer
    ///   proved a key the file still holds stay; the others are closed (counted as
    ///   `retired_mesh_key`): dropping a key cuts off whoever was admitted by it, and a
    ///   peer that proves a key in use connects again at once.
    ///
    /// A new certificate, CA or key set makes this node dial the peers it waits for at once.
    /// Says, per file, whether it was unchanged, taken or refused (the one in use stays, and
    /// why is given). Fails with [`AdminError::NoMeshFiles`] on a node without such files,
    /// and with [`AdminError::Stopped`] once it shuts down.
    pub async fn reload_mesh_files(&self) -> Result<MeshReload, AdminError> {
        if self.is_shutting_down() {
            return Err(AdminError::Stopped);
        }
        if let Some((path, also)) = &self.shared.key_file {
            return Ok(MeshReload {
                key_file: Some(self.reload_key_file(path.clone(), also.clone()).await),
                ..MeshReload::default()
            });
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.shared
            .reloads
            .send(reply)
            .await
            .map_err(|_| AdminError::NoMeshFiles)?;
        answer.await.map_err(|_| AdminError::Stopped)
    }

    /// Reads the mesh key file at `path` again (with the builder's `also` keys) and proves
    /// and accepts its keys from now on when they changed.
    async fn reload_key_file(&self, path: std::path::PathBuf, also: Vec<MeshKey>) -> FileOutcome {
        let read = tokio::task::spawn_blocking(move || {
            MeshKey::load_all(&path)
                .map_err(|e| e.to_string())
                .and_then(|keys| runtime::key_set(keys, &also))
        })
        .await
        .unwrap_or_else(|e| Err(format!("reading the key file failed: {e}")));
        let keys = match read {
            Ok(keys) => keys,
            Err(why) => {
                warn!(error = %why, "keeping the mesh keys in use");
                return FileOutcome::Refused(why);
            }
        };
        if keys == self.shared.endpoint.mesh_keys() {
            return FileOutcome::Unchanged;
        }
        match self.shared.renew_keys(keys) {
            Ok(()) => FileOutcome::Taken,
            Err(why) => FileOutcome::Refused(why),
        }
    }

    /// Whether [`Node::shutdown`] has begun (or finished).
    pub(crate) fn is_shutting_down(&self) -> bool {
        *runtime::lock(&self.inner.stopped) || self.shared.cancel.is_cancelled()
    }

    /// Sends to one live instance of `service` (a node of that service that takes its
    /// [`Node::messages`]). Returns once the message is accepted into the
    /// local log; await [`Receipt::acked`] to learn that an instance handled it. While no
    /// instance is reachable the message waits in the log.
    pub async fn send(
        &self,
        service: &str,
        msg: impl Into<Outgoing>,
    ) -> Result<Receipt, SendError> {
        self.append(Kind::Send, service, std::iter::once(msg.into()))
            .await
    }

    /// Sends every message of `batch` to `service`, in order, as one call: they are accepted
    /// into the local log together (with [`Durability::Fsync`], in
    /// one group commit) or not at all, and each is then delivered on its own to one live
    /// instance, like a [`Node::send`] of it. The receipt covers them all
    /// ([`Receipt::copies`] is the batch's length).
    ///
    /// One call instead of one per message saves the per-call work on this node: use it to
    /// push many messages at once. A batch holds at most [`MAX_BATCH`] messages and
    /// [`MAX_BATCH_BYTES`] of payloads, headers and keys (or one message's
    /// `max_message_size`, when that is larger); a larger one fails with
    /// [`SendError::BatchTooLarge`] and nothing is stored. An empty batch stores nothing.
    pub async fn send_batch<M: Into<Outgoing>>(
        &self,
        service: &str,
        batch: impl IntoIterator<Item = M>,
    ) -> Result<Receipt, SendError> {
        self.append(Kind::Send, service, batch.into_iter().map(Into::into))
            .await
    }

    /// Publishes to `topic`: each durable subscriber group whose pattern matches gets one copy,
    /// handled by one of its instances; each connected ephemeral subscriber gets an online-only
    /// copy. Groups are learnt from peers' announced interests, including groups whose instances
    /// are all down now (their copies wait in the log) and groups other nodes told us of. The
    /// receipt covers the durable copies.
    pub async fn publish(
        &self,
        topic: &str,
        msg: impl Into<Outgoing>,
    ) -> Result<Receipt, SendError> {
        self.append(Kind::Publish, topic, std::iter::once(msg.into()))
            .await
    }

    /// Publishes every message of `batch` to `topic`, in order, as one call: each subscriber
    /// group gets a copy of each message, as with [`Node::publish`], and all copies are
    /// accepted into the local log together or not at all. The receipt covers every durable
    /// copy ([`Receipt::copies`] is the batch's length times the number of groups). The
    /// limits of [`Node::send_batch`] apply.
    pub async fn publish_batch<M: Into<Outgoing>>(
        &self,
        topic: &str,
        batch: impl IntoIterator<Item = M>,
    ) -> Result<Receipt, SendError> {
        self.append(Kind::Publish, topic, batch.into_iter().map(Into::into))
            .await
    }

    /// Builds the envelopes of a `send`/`publish` call of one or more messages (checking the
    /// destination, each message's size and a batch's limits) and submits them.
    async fn append(
        &self,
        kind: Kind,
        destination: &str,
        msgs: impl Iterator<Item = Outgoing>,
    ) -> Result<Receipt, SendError> {
        validate_subject(destination, false).map_err(|reason| SendError::InvalidDestination {
            destination: destination.to_string(),
            reason,
        })?;
        // A message's envelope, and the size that counts against the batch's bytes.
        let item = |msg: Outgoing| -> Result<(Item, usize), SendError> {
            let (ttl, after, size) = (msg.ttl, msg.deliver_after, msg.size());
            let item = Item {
                env: Arc::new(self.envelope(kind, destination, msg)?),
                ttl_ms: ttl.map(|d| d.as_millis() as u64),
                delay_ms: after.map(|d| d.as_millis() as u64),
            };
            Ok((item, size))
        };
        let mut msgs = msgs.peekable();
        let Some(first) = msgs.next() else {
            return Ok(Receipt {
                ticket: None,
                copies: 0,
            });
        };
        let (first, mut bytes) = item(first)?;
        let mut rest = Vec::new();
        if msgs.peek().is_some() {
            let max_bytes = MAX_BATCH_BYTES.max(self.shared.max_message_size);
            for msg in msgs {
                let (it, size) = item(msg)?;
                bytes += size;
                let messages = rest.len() + 2;
                if messages > MAX_BATCH || bytes > max_bytes {
                    return Err(SendError::BatchTooLarge {
                        messages,
                        bytes,
                        max_messages: MAX_BATCH,
                        max_bytes,
                    });
                }
                rest.push(it);
            }
        }
        let targets = match kind {
            Kind::Publish => Targets::Topic(destination.to_string()),
            _ => Targets::One(Target::Service(destination.into())),
        };
        self.submit(targets, first, rest).await
    }

    /// Hands a call's messages to core as one [`CoreMsg::Append`] and answers with its receipt.
    async fn submit(
        &self,
        targets: Targets,
        first: Item,
        rest: Vec<Item>,
    ) -> Result<Receipt, SendError> {
        let ticket = Arc::new(Ticket::default());
        let deadline = self.shared.now() + self.shared.send_timeout.as_millis() as u64;
        self.core(CoreMsg::Append(Append {
            targets,
            first,
            rest,
            deadline,
            reply: CallReply(Some(ticket.clone())),
        }))
        .await
        .map_err(|()| SendError::Stopped)?;
        let copies = std::future::poll_fn(|cx| ticket.poll_answer(cx)).await?;
        Ok(Receipt {
            ticket: (copies > 0).then_some(ticket),
            copies,
        })
    }

    /// Sends a request to one instance of `service` that serves requests and waits for its
    /// reply. Fails at once with [`RequestError::NoResponders`] when none is connected, and with
    /// [`RequestError::Timeout`] when `timeout` passes. The responder sees the time left.
    /// Never retried: see [`Node::request_with`] for idempotent requests.
    pub async fn request(
        &self,
        service: &str,
        msg: impl Into<Outgoing>,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        self.request_with(service, msg, RequestOptions::new(timeout))
            .await
    }

    /// A request with options. With [`RequestOptions::idempotent`], a request that timed out,
    /// lost its instance or found no responder is retried (backoff with jitter) until it
    /// succeeds, `max_attempts` are spent or the overall timeout passes; each attempt gets an
    /// equal share of the time left. Handler errors, an open breaker and a full bulkhead are
    /// never retried.
    pub async fn request_with(
        &self,
        service: &str,
        msg: impl Into<Outgoing>,
        opts: RequestOptions,
    ) -> Result<Bytes, RequestError> {
        validate_subject(service, false).map_err(RequestError::Invalid)?;
        let msg = msg.into();
        let env = self
            .envelope(Kind::Request, service, msg)
            .map_err(|e| RequestError::Invalid(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + opts.timeout;
        let attempts = if opts.idempotent {
            opts.max_attempts.max(1)
        } else {
            1
        };
        let mut backoff = opts.backoff;
        let mut env = Some(env);
        for attempt in 1..=attempts {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let share = left / (attempts - attempt + 1);
            // The last attempt takes the envelope; earlier ones send a copy.
            let next = if attempt == attempts {
                env.take()
            } else {
                env.clone()
            };
            let Some(mut env) = next else { break };
            env.attempt = attempt;
            let result = self.request_once(service, Arc::new(env), share).await;
            let retryable = matches!(
                result,
                Err(RequestError::Timeout { .. }
                    | RequestError::PeerLost { .. }
                    | RequestError::NoResponders { .. })
            );
            if result.is_ok() || !retryable || attempt == attempts {
                return result.map_err(|e| match e {
                    RequestError::Timeout { service, .. } => RequestError::Timeout {
                        service,
                        after: opts.timeout,
                    },
                    other => other,
                });
            }
            let jitter = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            tokio::time::sleep(jitter.min(left)).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        Err(RequestError::Timeout {
            service: service.to_string(),
            after: opts.timeout,
        })
    }

    async fn request_once(
        &self,
        service: &str,
        env: Arc<Envelope>,
        timeout: Duration,
    ) -> Result<Bytes, RequestError> {
        if self.shared.cancel.is_cancelled() {
            return Err(RequestError::Stopped);
        }
        // The deadline also bounds the wait for room in core's queue: a congested node must
        // not hold a caller past its timeout.
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || RequestError::Timeout {
            service: service.to_string(),
            after: timeout,
        };
        let (tx, rx) = oneshot::channel();
        let budget_ms = timeout.as_millis() as u64;
        // With few requests in flight the caller routes and writes its request itself, else
        // core does (see `Requests::quiet`).
        let now = self.shared.now();
        let started = {
            let mut requests = runtime::lock(&self.shared.requests);
            if requests.quiet() {
                Ok(requests.start(service, env, budget_ms, tx, now))
            } else {
                Err((env, tx))
            }
        };
        if matches!(started, Ok(Ok(_))) {
            // The request is in the table: core sweeps its deadline on its ticks, and an idle
            // core ticks slowly.
            self.shared.ticks.request_started();
        }
        let mut own = None;
        match started {
            Ok(started) => own = started.map_err(|(e, _)| e)?.send_own(&self.shared),
            Err((env, tx)) => {
                let queued = self.core(CoreMsg::Request {
                    service: service.to_string(),
                    env,
                    budget_ms,
                    reply: tx,
                });
                tokio::time::timeout_at(deadline, queued)
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|()| RequestError::Stopped)?;
            }
        }
        // A request on a stream of its own: its caller reads the reply there (or the lane
        // readers or core answer it, whichever comes first).
        let answered = async {
            if let Some(stream) = own
                && let Some(result) = stream.read(&self.shared).await
            {
                return Ok(result);
            }
            rx.await
        };
        match tokio::time::timeout_at(deadline, answered).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RequestError::Stopped),
            // Core forgets the request when its deadline passes (it sweeps on every tick).
            Err(_) => Err(timed_out()),
        }
    }

    /// Scatter-gather: sends one request to every connected instance of `service` that serves
    /// requests and collects replies until `within` passes or `max_replies` arrived. Returns
    /// what arrived (possibly nothing); [`RequestError::NoResponders`] when no instance exists.
    pub async fn scatter(
        &self,
        service: &str,
        msg: impl Into<Outgoing>,
        within: Duration,
        max_replies: Option<usize>,
    ) -> Result<Vec<ScatterReply>, RequestError> {
        self.scatter_to(
            ScatterTarget::Service(service.to_string()),
            msg.into(),
            within,
            max_replies,
        )
        .await
    }

    /// Scatter-gather to every connected node subscribed to a topic matching `topic` (their
    /// `serve` handler answers; the request's destination is the topic).
    pub async fn scatter_topic(
        &self,
        topic: &str,
        msg: impl Into<Outgoing>,
        within: Duration,
        max_replies: Option<usize>,
    ) -> Result<Vec<ScatterReply>, RequestError> {
        self.scatter_to(
            ScatterTarget::Topic(topic.to_string()),
            msg.into(),
            within,
            max_replies,
        )
        .await
    }

    async fn scatter_to(
        &self,
        target: ScatterTarget,
        msg: Outgoing,
        within: Duration,
        max_replies: Option<usize>,
    ) -> Result<Vec<ScatterReply>, RequestError> {
        let name = match &target {
            ScatterTarget::Service(s) | ScatterTarget::Topic(s) => s.clone(),
        };
        validate_subject(&name, false).map_err(RequestError::Invalid)?;
        let env = self
            .envelope(Kind::Request, &name, msg)
            .map_err(|e| RequestError::Invalid(e.to_string()))?;
        let (tx, mut rx) = mpsc::channel(MAX_SCATTER);
        let (started_tx, started_rx) = oneshot::channel();
        self.core(CoreMsg::Scatter {
            target,
            env: Box::new(env),
            budget_ms: within.as_millis() as u64,
            replies: tx,
            started: started_tx,
        })
        .await
        .map_err(|()| RequestError::Stopped)?;
        let asked = started_rx.await.map_err(|_| RequestError::Stopped)?;
        if asked == 0 {
            return Err(RequestError::NoResponders { service: name });
        }
        let want = max_replies.unwrap_or(asked).min(asked);
        let mut out = Vec::with_capacity(want);
        let deadline = tokio::time::Instant::now() + within;
        while out.len() < want {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((from, result))) => out.push(ScatterReply { from, result }),
                Ok(None) | Err(_) => break,
            }
        }
        Ok(out)
    }

    /// Serves requests addressed to this node's service with `handler`, running up to
    /// `serve_concurrency` at once. The handler's `Ok` bytes are the reply; its `Err` text is
    /// returned to the requester as [`RequestError::Remote`], and so are a reply over the
    /// node's maximum message size and a panic in the handler.
    ///
    /// The handler is called and its future first polled on the task that read the request
    /// off the connection, and a handler that is ready at once is answered from there (the
    /// fastest reply); one that waits goes on in a task of its own. Meanwhile that task reads
    /// nothing else, so a handler whose first polls take more than about 10 µs on average
    /// (it computes before it answers) is called in a task of its own from then on: the
    /// requests behind it are not held up, and several run at once on a multi-threaded
    /// runtime. Work that blocks for long still holds a runtime worker: move it to
    /// `tokio::task::spawn_blocking`.
    pub async fn serve<F, Fut>(&self, handler: F) -> Result<ServeHandle, SubscribeError>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<InboundRequest>(SERVE_QUEUE);
        let permits = Arc::new(tokio::sync::Semaphore::new(self.shared.serve_concurrency));
        let run = serve_fn(handler, self.shared.max_message_size);
        {
            let mut routes = runtime::write(&self.shared.routes);
            if routes.serve.is_some() {
                return Err(SubscribeError::AlreadyTaken);
            }
            routes.serve = Some(Arc::new(runtime::Server {
                permits: permits.clone(),
                run: run.clone(),
                queue: tx,
                first_poll: runtime::FirstPollCost::default(),
            }));
        }
        let shared = self.shared.clone();
        let cancel = shared.cancel.clone();
        let task_shared = shared.clone();
        // Starts the requests that found every permit taken, in order. Ends once `serve` is
        // stopped (the queue's sender goes with the route) or the node stops.
        shared.tracker.spawn(
            async move {
                let shared = task_shared;
                loop {
                    let req = tokio::select! {
                        r = rx.recv() => r,
                        () = cancel.cancelled() => None,
                    };
                    let Some(req) = req else { break };
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        break;
                    };
                    let corr = req.env.seq;
                    if shared.pause.fences(req.opened_in) {
                        // It waited for a slot while this node did not run: as a request
                        // that arrives on such a connection (`conn::serve_request`).
                        debug!(
                            corr,
                            "queued request dropped unserved: this node did not run for a \
                             while since its connection opened"
                        );
                        continue;
                    }
                    let deadline =
                        tokio::time::Instant::now() + Duration::from_millis(req.budget_ms);
                    let reply = runtime::conn::start_handler(&run, req.env, req.budget_ms, corr);
                    runtime::conn::spawn_handler(&shared, reply, permit, req.reply, corr, deadline);
                }
            }
            .instrument(self.inner.span.clone()),
        );
        self.core(CoreMsg::InterestsChanged)
            .await
            .map_err(|()| SubscribeError::Stopped)?;
        Ok(ServeHandle { shared })
    }

    /// The stream of messages sent to this node's service (`send`). Can be taken once.
    pub fn messages(&self) -> Result<Subscription, SubscribeError> {
        let rx = runtime::write(&self.shared.routes)
            .service_rx
            .take()
            .ok_or(SubscribeError::AlreadyTaken)?;
        // Core notices on its next dispatch anyway (within a tick); this tells peers sooner
        // that we are now an instance of our service.
        let _ = self.shared.core.try_send(CoreMsg::InterestsChanged);
        Ok(Subscription::new(self.shared.clone(), rx, None))
    }

    /// Subscribes to topics matching `pattern` as a member of this node's service group: each
    /// message is handled by one instance of the service.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, SubscribeError> {
        let group = self.shared.service.clone();
        self.subscribe_group(pattern, &group).await
    }

    /// Subscribes to topics matching `pattern` in the durable subscriber group `group`: the
    /// group gets one copy of each message, handled by one of its live instances, and
    /// publishers keep the group's copies while none of its instances runs (until the group is
    /// released with [`Node::unsubscribe_group`]).
    pub async fn subscribe_group(
        &self,
        pattern: &str,
        group: &str,
    ) -> Result<Subscription, SubscribeError> {
        validate_subject(group, false).map_err(|reason| SubscribeError::InvalidPattern {
            pattern: group.to_string(),
            reason: format!("group name: {reason}"),
        })?;
        self.add_subscription(pattern, Some(group.to_string()))
            .await
    }

    /// An ephemeral subscription: online-only copies of messages published on topics matching
    /// `pattern`, to this node only, while it is connected. Nothing is kept for it while it is
    /// away; copies in flight when it disconnects are dropped. For taps, dashboards, caches.
    pub async fn subscribe_ephemeral(&self, pattern: &str) -> Result<Subscription, SubscribeError> {
        self.add_subscription(pattern, None).await
    }

    async fn add_subscription(
        &self,
        pattern: &str,
        group: Option<String>,
    ) -> Result<Subscription, SubscribeError> {
        validate_subject(pattern, true).map_err(|reason| SubscribeError::InvalidPattern {
            pattern: pattern.to_string(),
            reason,
        })?;
        let (tx, rx) = mpsc::channel(runtime::SUBSCRIPTION_QUEUE);
        let id = {
            let mut routes = runtime::write(&self.shared.routes);
            if routes.subs.len() >= MAX_SUBSCRIPTIONS {
                return Err(SubscribeError::TooMany {
                    limit: MAX_SUBSCRIPTIONS,
                });
            }
            let id = routes.next_sub;
            routes.next_sub += 1;
            let interest = Interest {
                pattern: pattern.to_string(),
                group,
            };
            routes.subs.push(LocalSub { id, interest, tx });
            id
        };
        self.core(CoreMsg::InterestsChanged)
            .await
            .map_err(|()| SubscribeError::Stopped)?;
        Ok(Subscription::new(self.shared.clone(), rx, Some(id)))
    }

    /// Unsubscribes durable group `group` for good: this node's subscriptions in it stop, every
    /// node forgets the group, and publishers release the copies they kept for it (their
    /// receipts fail with [`DeliveryError::Released`]). Dropping a [`Subscription`] does not do
    /// this: a group outlives its instances until it is released.
    ///
    /// The release is a newer version of the group that every node keeps (a tombstone, stored
    /// by nodes with a data directory), so a node that was away and still knows the group
    /// forgets it when it comes back. A node still subscribed to the group when the release
    /// reaches it subscribes it again, with a newer version still: a release never takes a
    /// group away from a live subscriber. Subscribing to the group later also brings it back.
    pub async fn unsubscribe_group(&self, group: &str) -> Result<(), SubscribeError> {
        runtime::write(&self.shared.routes)
            .subs
            .retain(|s| s.interest.group.as_deref() != Some(group));
        self.core(CoreMsg::InterestsChanged)
            .await
            .map_err(|()| SubscribeError::Stopped)?;
        self.core(CoreMsg::ReleaseGroup(group.to_string()))
            .await
            .map_err(|()| SubscribeError::Stopped)
    }

    /// Peers this node knows of, with their state.
    pub async fn peers(&self) -> Vec<PeerInfo> {
        self.status().await.map(|s| s.peers).unwrap_or_default()
    }

    /// A snapshot of this node's state; `None` if the node is stopped.
    pub async fn status(&self) -> Option<Status> {
        let (tx, rx) = oneshot::channel();
        self.core(CoreMsg::Status(tx)).await.ok()?;
        rx.await.ok()
    }

    /// The first `limit` messages this node's logs hold, not yet acknowledged by a consumer:
    /// by log name, then from each log's oldest, each waiting or in flight (and to whom).
    /// `None` once the node stopped (read a stopped node's with
    /// [`offline_entries`](crate::control::offline_entries)).
    pub async fn log_entries(&self, limit: usize) -> Option<Vec<crate::control::LogEntryView>> {
        let (reply, rx) = oneshot::channel();
        self.core(CoreMsg::Entries { limit, reply }).await.ok()?;
        rx.await.ok()
    }

    /// Durable subscriber groups this node knows of, released ones included (see
    /// [`Status::groups`]); empty once the node stopped.
    pub async fn groups(&self) -> BTreeMap<String, crate::engine::wire::GroupState> {
        self.status().await.map(|s| s.groups).unwrap_or_default()
    }

    /// Connected nodes of `service` (not saying goodbye). A [`Node::send`] to `service` goes
    /// only to those of them that take their messages ([`PeerInfo::consumes`]): see
    /// [`Node::consumers`].
    pub async fn instances(&self, service: &str) -> Vec<NodeId> {
        self.connected(service, Role::Any).await
    }

    /// Connected nodes of `service` (not saying goodbye) that take their service's messages
    /// ([`Node::messages`] is taken and alive there): the instances a [`Node::send`] to
    /// `service` is delivered to now.
    pub async fn consumers(&self, service: &str) -> Vec<NodeId> {
        self.connected(service, Role::Consumer).await
    }

    /// Connected nodes of `service` (not saying goodbye) that serve requests
    /// ([`Node::serve`] runs there): the instances a [`Node::request`] to `service` may go to.
    pub async fn servers(&self, service: &str) -> Vec<NodeId> {
        self.connected(service, Role::Server).await
    }

    async fn connected(&self, service: &str, role: Role) -> Vec<NodeId> {
        let (tx, rx) = oneshot::channel();
        if self
            .core(CoreMsg::Instances {
                service: service.to_string(),
                role,
                reply: tx,
            })
            .await
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Waits until at least `count` [instances](Node::instances) of `service` are connected,
    /// or `timeout` passes. Returns whether they were found. Wakes on each change of the
    /// connected peers, not on a timer.
    pub async fn wait_for_instances(&self, service: &str, count: usize, timeout: Duration) -> bool {
        self.wait_for_connected(service, Role::Any, count, timeout)
            .await
    }

    /// Waits until at least `count` [consumers](Node::consumers) of `service` (instances that
    /// take its messages) are connected, or `timeout` passes. Returns whether they were found.
    pub async fn wait_for_consumers(&self, service: &str, count: usize, timeout: Duration) -> bool {
        self.wait_for_connected(service, Role::Consumer, count, timeout)
            .await
    }

    /// Waits until at least `count` [servers](Node::servers) of `service` are connected, or
    /// `timeout` passes. Returns whether they were found. A node says it serves just after it
    /// connects, so a [`Node::request`] sent as soon as an instance is connected can still fail
    /// with [`RequestError::NoResponders`]; this waits for that word.
    pub async fn wait_for_servers(&self, service: &str, count: usize, timeout: Duration) -> bool {
        self.wait_for_connected(service, Role::Server, count, timeout)
            .await
    }

    async fn wait_for_connected(
        &self,
        service: &str,
        role: Role,
        count: usize,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = self.shared.peers_changed.subscribe();
        loop {
            // Marked seen before looking: a change after the look wakes the wait below.
            changed.borrow_and_update();
            if self.connected(service, role).await.len() >= count {
                return true;
            }
            tokio::select! {
                r = changed.changed() => {
                    if r.is_err() {
                        return false;
                    }
                }
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Shuts down in order: stop discovery and accepting, tell peers goodbye, wait up to the
    /// shutdown grace for in-flight handlers and acks (local handlers' acks to their senders,
    /// and peers' acks for this node's own deliveries), wait (within the grace, or at least
    /// 1 s) until every peer acknowledged the last frames sent to it (acks, the goodbye, a
    /// group released just before), close connections, join every task.
    /// With a durable store no new deliveries go out once shutdown begins (they wait in the
    /// store for the restart); with [`Durability::Memory`] delivering goes on during the grace,
    /// so a node with a backlog may use all of it.
    /// Messages still unacknowledged stay in the log (kept on disk with a data directory).
    pub async fn shutdown(&self) {
        {
            let mut stopped = runtime::lock(&self.inner.stopped);
            if *stopped {
                return;
            }
            *stopped = true;
        }
        let span = self.inner.span.clone();
        async {
            // 1. Stop discovery (mDNS goodbye) so nobody new dials us.
            for d in runtime::lock(&self.inner.discoveries).iter_mut() {
                d.stop();
            }
            // 2. Goodbye: peers stop sending us new work.
            let (tx, rx) = oneshot::channel();
            if self.core(CoreMsg::Goodbye(tx)).await.is_ok() {
                let _ = rx.await;
            }
            // 3. Let handlers finish and acks go out, and let our own in-flight entries be
            //    acked (or time out), bounded by the grace period: closing with entries in
            //    flight would resend them after a restart although peers handled them. (With
            //    a durable store core sends no new entries once closing.) Quiet must hold for
            //    QUIET_SETTLE: work sent just before our goodbye reached the peers is still on
            //    its way, and handling it without acking would redeliver it elsewhere.
            //    A node that consumes nothing (a one-shot `peerbus send`, say) handles nothing
            //    that arrives meanwhile, so it has no settle to wait for and no acks to flush.
            let consumes = runtime::read(&self.shared.routes).consumes();
            let settle = if consumes {
                QUIET_SETTLE
            } else {
                Duration::ZERO
            };
            let deadline = tokio::time::Instant::now() + self.shared.shutdown_grace;
            let mut quiet_since: Option<tokio::time::Instant> = None;
            loop {
                let (tx, rx) = oneshot::channel();
                if self.core(CoreMsg::Quiet(tx)).await.is_err() {
                    break;
                }
                let Ok(quiet) = rx.await else {
                    break;
                };
                let handling = !runtime::lock(&self.shared.inbox).is_idle();
                let now = tokio::time::Instant::now();
                if quiet.acks_pending == 0 && quiet.in_flight == 0 && !handling {
                    let since = *quiet_since.get_or_insert(now);
                    if now.duration_since(since) >= settle {
                        break;
                    }
                } else {
                    quiet_since = None;
                }
                if now >= deadline {
                    debug!(
                        unsettled = quiet.unsettled,
                        in_flight = quiet.in_flight,
                        acks_pending = quiet.acks_pending,
                        handling,
                        "shutdown grace over; closing anyway"
                    );
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Deliver what is queued for the peers (the last acks, the goodbye, news of a
            // group released just before): closing the connections would discard it. Each
            // writer finishes its control stream and answers once the peer acknowledged it,
            // within what is left of the grace but at least CLOSE_FLUSH (a peer that stopped
            // answering never does).
            let flush_until = deadline.max(tokio::time::Instant::now() + CLOSE_FLUSH);
            let (tx, rx) = oneshot::channel();
            if self.core(CoreMsg::Close(tx)).await.is_ok()
                && let Ok(closed) = rx.await
            {
                let all = futures_util::future::join_all(closed);
                if tokio::time::timeout_at(flush_until, all).await.is_err() {
                    debug!("a peer did not acknowledge our last frames; closing anyway");
                }
            }
            // 4. Cancel every task, close the endpoint (connections close with `Shutdown`).
            self.shared.cancel.cancel();
            self.shared.endpoint.close().await;
            // 5. Join.
            self.shared.tracker.close();
            if tokio::time::timeout(Duration::from_secs(5), self.shared.tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!("some tasks did not stop within 5s of shutdown");
            }
            // 6. The store writer commits what is queued and syncs once core is gone.
            let store_thread = runtime::lock(&self.inner.store_thread).take();
            let _ = self.inner.store.send(StoreOp::Stop).await;
            if let Some(t) = store_thread {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            info!("node stopped");
        }
        .instrument(span)
        .await;
    }

    fn envelope(
        &self,
        kind: Kind,
        destination: &str,
        msg: Outgoing,
    ) -> Result<Envelope, SendError> {
        let size = msg.size();
        if size > self.shared.max_message_size {
            return Err(SendError::TooLarge {
                size,
                max: self.shared.max_message_size,
            });
        }
        Ok(Envelope {
            origin: self.shared.id,
            log: SmolStr::default(),
            seq: 0,
            kind,
            destination: destination.into(),
            key: msg.key,
            headers: {
                let mut h = Headers::from(msg.headers);
                crate::trace::stamp(&mut h, self.shared.start_traces);
                h
            },
            content_type: msg.content_type,
            created_at_ms: now_unix_ms(),
            attempt: 1,
            payload: msg.payload,
        })
    }

    async fn core(&self, msg: CoreMsg) -> Result<(), ()> {
        if self.shared.cancel.is_cancelled() {
            return Err(());
        }
        self.shared.core.send(msg).await.map_err(|_| ())
    }

    /// Dead letters of this node (entries it gave up delivering), oldest first, at most `limit`.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, AdminError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .store
            .send(StoreOp::ListDead(limit, tx))
            .await
            .map_err(|_| AdminError::Stopped)?;
        rx.await
            .map_err(|_| AdminError::Stopped)?
            .map_err(AdminError::Store)
    }

    /// Moves every message waiting in `log` (`svc:<service>`, `grp:<group>`, as
    /// [`Status::logs`] names them) to the dead-letter store, where
    /// [`Node::replay_dead_letters`] can send them again: for a service gone for good, whose
    /// messages would otherwise wait until their TTL, if any. Each one's receipt is answered
    /// [`DeliveryError::DeadLettered`]. Messages in flight stay and settle as usual. Returns how
    /// many moved.
    pub async fn dead_letter_waiting(&self, log: &str) -> Result<usize, AdminError> {
        let (reply, rx) = oneshot::channel();
        self.core(CoreMsg::DeadLetterWaiting {
            log: log.to_string(),
            reply,
        })
        .await
        .map_err(|_| AdminError::Stopped)?;
        rx.await
            .map_err(|_| AdminError::Stopped)?
            .ok_or_else(|| AdminError::NoSuchLog(log.to_string()))
    }

    /// Re-sends dead letters (all of them when `ids` is `None`) to their original destination as
    /// new entries, attempts reset. Returns how many were re-sent.
    pub async fn replay_dead_letters(&self, ids: Option<&[u64]>) -> Result<usize, AdminError> {
        let ids: Vec<u64> = match ids {
            Some(ids) => ids.to_vec(),
            None => self
                .dead_letters(usize::MAX)
                .await?
                .iter()
                .map(|d| d.id)
                .collect(),
        };
        let (tx, rx) = oneshot::channel();
        self.inner
            .store
            .send(StoreOp::TakeDead(ids, tx))
            .await
            .map_err(|_| AdminError::Stopped)?;
        let letters = rx
            .await
            .map_err(|_| AdminError::Stopped)?
            .map_err(AdminError::Store)?;
        let mut n = 0;
        for d in letters {
            let Some(target) = Target::from_log_name(&d.env.log) else {
                continue;
            };
            let mut env = d.env;
            env.origin = self.shared.id;
            env.attempt = 1;
            env.created_at_ms = now_unix_ms();
            let item = Item {
                env: Arc::new(env),
                ttl_ms: None,
                delay_ms: None,
            };
            match self.submit(Targets::One(target), item, Vec::new()).await {
                Ok(_receipt) => n += 1,
                Err(SendError::Stopped) => return Err(AdminError::Stopped),
                Err(e) => return Err(AdminError::Store(e.to_string())),
            }
        }
        Ok(n)
    }

    /// Durability of this node's log.
    pub fn durability(&self) -> Durability {
        self.shared.durability
    }

    /// Store figures: commits, fsyncs, file size.
    pub fn store_stats(&self) -> crate::store::StoreStats {
        runtime::lock(&self.shared.store_stats).clone()
    }

    /// Connections this node closed since start, counted by [`CloseCode`](crate::CloseCode)
    /// (what [`Status::connections_closed`] shows by name). Read without asking the node's
    /// actor, so it is cheap to poll and answers even while the node is busy.
    pub fn connections_closed(&self) -> crate::CloseCounts {
        self.shared.endpoint.local_closes()
    }

    /// Counter of messages handed to local handlers (for tests and status).
    pub fn delivered_count(&self) -> u64 {
        self.shared.counters.delivered.load(Ordering::Relaxed)
    }

    /// This node's delivery counters since start. Read without asking the node's actor, so it
    /// is cheap to poll and answers even while the node is busy.
    pub fn delivery_counts(&self) -> DeliveryCounts {
        self.shared.counters.delivery_counts()
    }
}

/// Most replies one scatter-gather collects (and so instances it asks).
pub(crate) const MAX_SCATTER: usize = 4096;

/// Most messages in one [`Node::send_batch`] or [`Node::publish_batch`] call. A batch is
/// stored in one go (one group commit), and its envelopes wait in memory until then.
pub const MAX_BATCH: usize = 1024;

/// Most bytes of payloads, headers and keys in one batch (or one message's
/// `max_message_size`, when that is larger): what one group commit may have to write at once.
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Options of [`Node::request_with`].
#[derive(Clone, Copy, Debug)]
pub struct RequestOptions {
    timeout: Duration,
    idempotent: bool,
    max_attempts: u32,
    backoff: Duration,
}

impl RequestOptions {
    /// One attempt with this overall timeout.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            idempotent: false,
            max_attempts: 3,
            backoff: Duration::from_millis(50),
        }
    }

    /// The request may be repeated safely: retry it on timeouts, lost instances and missing
    /// responders (default attempts: 3).
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Attempts for an idempotent request, including the first. Default 3.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// First retry delay (doubles per retry, capped at 2 s, jittered). Default 50 ms.
    pub fn backoff(mut self, d: Duration) -> Self {
        self.backoff = d;
        self
    }
}

/// How a request reaches `handler`: each request's run is a future (with the handler's span,
/// its trace context and the requester's budget as a timeout) that the lane reader the request
/// arrived on polls once itself, replying at once when the handler is ready without waiting
/// (`conn::lane_reader`), and otherwise hands to a task of its own (`conn::spawn_handler`).
/// A reply over `max_reply` bytes (the node's maximum message size) becomes an error for its
/// requester: its frame could not be sent.
fn serve_fn<F, Fut>(handler: F, max_reply: usize) -> runtime::ServeFn
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, HandlerError>> + Send + 'static,
{
    let handler = Arc::new(handler);
    Arc::new(move |env: Arc<Envelope>, budget_ms: u64| {
        let budget = Duration::from_millis(budget_ms);
        let request = Request {
            msg: Message::shared(env),
            budget,
        };
        let (span, ctx) = crate::subscription::handler_span(&request.msg);
        let run = tokio::time::timeout(budget, handler(request));
        Box::pin(
            async move {
                let run = match ctx {
                    Some(ctx) => crate::trace::scope(ctx, run).await,
                    None => run.await,
                };
                match run {
                    Ok(Ok(b)) if b.len() > max_reply => Some(Err(format!(
                        "the reply is {} bytes, over the maximum message size of {max_reply} bytes",
                        b.len()
                    ))),
                    Ok(Ok(b)) => Some(Ok(b)),
                    Ok(Err(e)) => Some(Err(e.to_string())),
                    Err(_) => None, // the requester has given up already
                }
            }
            .instrument(span),
        )
    })
}

/// One answer of a scatter-gather.
#[derive(Clone, Debug)]
pub struct ScatterReply {
    /// The node that answered.
    pub from: NodeId,
    /// Its reply, or its handler's error text.
    pub result: Result<Bytes, String>,
}

/// A request as a `serve` handler sees it.
#[derive(Debug, Clone)]
pub struct Request {
    msg: Message,
    budget: Duration,
}

impl Request {
    /// The request message.
    pub fn message(&self) -> &Message {
        &self.msg
    }

    /// The request payload.
    pub fn payload(&self) -> &Bytes {
        self.msg.payload()
    }

    /// How long the requester was willing to wait when it sent the request (its deadline
    /// travels with the request). The handler is abandoned when it passes.
    pub fn budget(&self) -> Duration {
        self.budget
    }
}

impl std::ops::Deref for Request {
    type Target = Message;
    fn deref(&self) -> &Message {
        &self.msg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the node takes inbound work now (what decides its shutdown settle).
    fn consumes(node: &Node) -> bool {
        runtime::read(&node.shared.routes).consumes()
    }

    #[tokio::test]
    async fn a_node_consumes_while_a_stream_subscription_or_server_is_alive() {
        let net = peerbus_discovery::MemoryNetwork::new();
        let node = Node::builder("orders")
            .mesh_key(peerbus_transport::MeshKey::generate())
            .listen("127.0.0.1:0".parse().expect("addr"))
            .discovery(net.discovery())
            .start()
            .await
            .expect("start");
        assert!(!consumes(&node), "a one-shot sender consumes nothing");
        let messages = node.messages().expect("messages");
        assert!(consumes(&node), "its service's stream is taken");
        drop(messages);
        assert!(!consumes(&node), "the stream is gone");
        let sub = node.subscribe("orders.>").await.expect("subscribe");
        assert!(consumes(&node), "a subscription");
        drop(sub);
        assert!(!consumes(&node), "the subscription is gone");
        let server = node
            .serve(|_m| async { Ok::<_, HandlerError>(Bytes::new()) })
            .await
            .expect("serve");
        assert!(consumes(&node), "a request handler");
        server.stop().await;
        assert!(!consumes(&node), "the handler stopped");
        node.shutdown().await;
    }

    /// A receipt for `copies` copies of a call core answered, and the call's reply.
    fn answered(copies: usize) -> (Receipt, CallReply) {
        let ticket = Arc::new(Ticket::default());
        let reply = CallReply(Some(ticket.clone()));
        let receipt = Receipt {
            ticket: Some(ticket),
            copies,
        };
        (receipt, reply)
    }

    async fn answer_of(ticket: &Ticket) -> Result<usize, SendError> {
        std::future::poll_fn(|cx| ticket.poll_answer(cx)).await
    }

    #[tokio::test]
    async fn a_call_core_never_answered_fails_as_stopped() {
        let ticket = Arc::new(Ticket::default());
        drop(CallReply(Some(ticket.clone())));
        assert!(matches!(answer_of(&ticket).await, Err(SendError::Stopped)));
        let ticket = Arc::new(Ticket::default());
        CallReply(Some(ticket.clone())).send(Ok(2));
        assert_eq!(answer_of(&ticket).await.ok(), Some(2));
    }

    #[tokio::test]
    async fn acked_waits_for_every_copy() {
        let (receipt, reply) = answered(2);
        let (first, second) = (reply.copy_receipt(), reply.copy_receipt());
        reply.send(Ok(2));
        let waiting = tokio::spawn(receipt.acked());
        first.send(Ok(()));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one copy of two is still unsettled");
        second.send(Ok(()));
        assert_eq!(waiting.await.ok(), Some(Ok(())));
    }

    #[tokio::test]
    async fn acked_fails_with_the_first_failed_copy_and_a_dropped_one_is_stopped() {
        let (receipt, reply) = answered(3);
        let copies = [
            reply.copy_receipt(),
            reply.copy_receipt(),
            reply.copy_receipt(),
        ];
        reply.send(Ok(3));
        let [a, b, c] = copies;
        b.send(Err(DeliveryError::Released {
            reason: "gone".into(),
        }));
        a.send(Err(DeliveryError::Stopped));
        assert_eq!(
            receipt.acked().await,
            Err(DeliveryError::Released {
                reason: "gone".into()
            }),
            "the first failure wins, before the last copy settles"
        );
        drop(c);
        let (receipt, reply) = answered(1);
        drop(reply.copy_receipt());
        reply.send(Ok(1));
        assert_eq!(receipt.acked().await, Err(DeliveryError::Stopped));
    }
}
