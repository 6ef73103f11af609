//! Connections: accepting, dialing with backoff, the hello exchange, and the
//! per-connection writer and reader tasks.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt as _;
use peerbus_transport::{
    CloseCode, ConnectError, Connection, ConnectionError, FrameError, FrameReceiver, FrameSender,
    NodeId,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use super::core::{Completion, CoreMsg, Out, local_hello};
use super::{
    ConnState, Inbound, InboundRequest, MAX_INBOUND_LANES, MAX_PENDING_HANDSHAKES, Shared,
};
use crate::engine::outbox::NOT_HERE_PREFIX;
use crate::engine::routing::topic_matches;
use crate::engine::wire::{
    ALPN_V4, Control, ControlV4, Data, Dialect, Envelope, Hello, MIN_PROTOCOL_VERSION,
    REQUEST_STREAM_REUSE_VERSION, REQUEST_STREAMS_VERSION, negotiate,
};

/// How long the hello exchange may take after the transport handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole accept-side handshake (TLS, mesh proof, hello) may take.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Redial backoff: starts here, doubles, capped at [`DIAL_BACKOFF_MAX`], ±50 % jitter.
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Cap of the redial backoff.
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Frames taken from the outgoing queue before one flush.
const WRITE_BATCH: usize = 1024;
/// Buffered bytes on one stream that force a flush mid-batch.
const FLUSH_BYTES: usize = 1 << 20;

/// A connection whose hello exchange finished.
pub(crate) struct Ready {
    pub(crate) conn: Connection,
    pub(crate) hello: Hello,
    /// The protocol version both sides speak on it.
    pub(crate) version: u32,
    pub(crate) ctl_tx: FrameSender,
    pub(crate) ctl_rx: FrameReceiver,
}

/// Sends `ours` and receives the peer's hello on a new control stream: the dialer opens the
/// stream and speaks first.
async fn exchange<H: serde::Serialize + serde::de::DeserializeOwned>(
    conn: &Connection,
    ours: &H,
) -> Result<(FrameSender, FrameReceiver, H), String> {
    let (mut tx, mut rx) = if conn.is_dialer() {
        let (mut tx, rx) = conn.open_bi().await.map_err(|e| e.to_string())?;
        tx.send(ours).await.map_err(|e| e.to_string())?;
        (tx, rx)
    } else {
        conn.accept_bi().await.map_err(|e| e.to_string())?
    };
    let theirs = match rx.recv::<H>().await {
        Ok(Some(h)) => h,
        Ok(None) => return Err("peer closed the control stream before hello".to_string()),
        Err(e) => return Err(e.to_string()),
    };
    if !conn.is_dialer() {
        tx.send(ours).await.map_err(|e| e.to_string())?;
    }
    Ok((tx, rx, theirs))
}

async fn handshake(shared: &Shared, conn: Connection) -> Result<Ready, String> {
    let ours = local_hello(shared);
    // The ALPN id says which hello the peer sends: a build of protocol 4 offers only
    // `ALPN_V4` and speaks 4; the negotiated hello names a range of versions.
    let v4 = conn.alpn() == ALPN_V4;
    let exchanged = async {
        if v4 {
            let (tx, rx, ControlV4::Hello(h)) =
                exchange(&conn, &ControlV4::Hello(ours.to_v4())).await?;
            Ok::<_, String>((tx, rx, Hello::from(h)))
        } else {
            match exchange(&conn, &Control::Hello(Box::new(ours))).await? {
                (tx, rx, Control::Hello(h)) => Ok((tx, rx, *h)),
                (_, _, other) => Err(format!("expected hello, got {other:?}")),
            }
        }
    };
    let (tx, rx, hello) = tokio::time::timeout(HELLO_TIMEOUT, exchanged)
        .await
        .map_err(|_| "hello not received within 5s".to_string())??;
    if hello.node_id != conn.peer_id() {
        conn.close(
            CloseCode::ProtocolViolation,
            "hello node id differs from certificate",
        );
        return Err(format!(
            "hello claims node {} but the certificate proves {}",
            hello.node_id,
            conn.peer_id()
        ));
    }
    if hello.mesh != shared.mesh {
        conn.close(CloseCode::ProtocolViolation, "different mesh");
        return Err(format!(
            "peer is in mesh `{}`, we are in `{}`",
            hello.mesh, shared.mesh
        ));
    }
    // A certificate bound to services (`peerbus ca issue --service`) admits its node as one
    // of them only: a member cannot take another service's messages by claiming its name.
    if let Some(why) = conn
        .peer_mesh_certificate()
        .and_then(|c| c.refuses_service(&hello.service))
    {
        let reason = format!("refusing node {} as a peer: {why}", hello.node_id.short());
        warn!(peer = %hello.node_id.short(), claimed = %hello.service, %why, "refusing a peer that claims a service its mesh certificate does not name");
        conn.close(CloseCode::MeshProofFailed, &reason);
        return Err(reason);
    }
    let version = if v4 {
        (hello.version == MIN_PROTOCOL_VERSION)
            .then_some(MIN_PROTOCOL_VERSION)
            .ok_or_else(|| {
                format!(
                    "peer speaks protocol version {} on a protocol {MIN_PROTOCOL_VERSION} connection",
                    hello.version
                )
            })
    } else {
        negotiate(
            shared.min_protocol..=shared.protocol,
            hello.min_version..=hello.version,
        )
    };
    let version = version.inspect_err(|_| {
        conn.close(CloseCode::ProtocolViolation, "unsupported protocol version");
    })?;
    Ok(Ready {
        conn,
        hello,
        version,
        ctl_tx: tx,
        ctl_rx: rx,
    })
}

/// Accepts incoming connections until the node stops.
pub(crate) async fn accept_loop(shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let incoming = tokio::select! {
            i = shared.endpoint.accept() => i,
            () = shared.cancel.cancelled() => None,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!(
                addr = %incoming.remote_addr(),
                limit = MAX_PENDING_HANDSHAKES,
                "too many handshakes in progress; refusing a connection"
            );
            continue;
        };
        let shared2 = shared.clone();
        let addr = incoming.remote_addr();
        shared.tracker.spawn(
            async move {
                let _permit = permit;
                let res = tokio::time::timeout(ACCEPT_TIMEOUT, async {
                    let conn = incoming.complete().await.map_err(|e| e.to_string())?;
                    handshake(&shared2, conn).await
                })
                .await;
                match res {
                    Ok(Ok(ready)) => {
                        let _ = shared2.core.send(CoreMsg::PeerReady(Box::new(ready))).await;
                    }
                    Ok(Err(e)) => debug!(%addr, error = %e, "incoming connection failed"),
                    Err(_) => debug!(%addr, "incoming handshake timed out"),
                }
            }
            .instrument(info_span!("accept", %addr)),
        );
    }
}

/// Dials `addrs` until connected or cancelled, with capped exponential backoff and jitter,
/// starting after `delay`; a new mesh certificate or CA here cuts a backoff short
/// ([`Shared::membership_changed`]). `expected` pins the peer's node id (None for seeds, whose id is
/// learnt from the certificate).
pub(crate) async fn dial_loop(
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    expected: Option<NodeId>,
    delay: Duration,
    cancel: CancellationToken,
) {
    let span = info_span!("dial", peer = ?expected.map(|p| p.short()), addrs = ?addrs);
    async move {
        if !delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = cancel.cancelled() => return,
            }
        }
        let mut attempt: u32 = 0;
        let mut last_error = String::new();
        loop {
            for addr in &addrs {
                if cancel.is_cancelled() {
                    return;
                }
                let res = tokio::select! {
                    r = shared.endpoint.connect(*addr, expected) => r,
                    () = cancel.cancelled() => return,
                };
                let error = match res {
                    Ok(conn) if conn.peer_id() == shared.id => {
                        // A seed at this node's own address: a headless service lists every
                        // pod, this one too, and a shared seed list names every node. Before
                        // the hello, so the node does not see itself as a peer; never again,
                        // as nothing else will answer there while this node runs.
                        conn.close(CloseCode::Normal, "connected to itself");
                        debug!(%addr, "this seed is this node itself; not dialing it again");
                        return;
                    }
                    Ok(conn) => match handshake(&shared, conn).await {
                        Ok(ready) => {
                            let _ = shared.core.send(CoreMsg::PeerReady(Box::new(ready))).await;
                            return;
                        }
                        Err(e) => (false, e),
                    },
                    Err(e) => (
                        matches!(
                            e,
                            ConnectError::Refused { .. } | ConnectError::NoCommonProtocol
                        ),
                        e.to_string(),
                    ),
                };
                // Warn once per distinct failure; repeats of the same one are debug. Losing
                // the tie-break of two nodes dialling each other at once is routine.
                let tie_break = error.1.contains(CloseCode::DuplicateConnection.describe());
                if error.1 != last_error && !tie_break {
                    warn!(%addr, error = %error.1, "could not connect; will retry");
                    last_error.clone_from(&error.1);
                } else {
                    debug!(%addr, error = %error.1, attempt, "could not connect");
                }
                let _ = shared
                    .core
                    .send(CoreMsg::DialFailed {
                        peer: expected,
                        refused: error.0,
                        error: error.1,
                    })
                    .await;
            }
            attempt = attempt.saturating_add(1);
            let base = DIAL_BACKOFF_MIN
                .saturating_mul(1u32 << attempt.min(16))
                .min(DIAL_BACKOFF_MAX)
                .as_millis() as u64;
            let jittered = base / 2 + rand::random::<u64>() % (base / 2 + 1);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(jittered)) => {}
                // A new certificate or CA here: the refusal may be over, dial now and back
                // off from the start.
                () = shared.redial.notified() => attempt = 0,
                () = cancel.cancelled() => return,
            }
        }
    }
    .instrument(span)
    .await;
}

/// What core and a connection's tasks share, made by `Core::connection_handles`.
pub(crate) struct ConnHandles {
    /// Which run of the connection to its peer this is (core's generation counter).
    pub(crate) generation: u64,
    /// The sending side of the writer's queue `rx` (core keeps a clone): the lane readers and
    /// the serve handlers reply through it.
    pub(crate) out: mpsc::Sender<Out>,
    /// The writer's queue.
    pub(crate) rx: mpsc::Receiver<Out>,
    /// Stops every task of the connection.
    pub(crate) cancel: CancellationToken,
    /// The connection's [`ConnState`] flag: the close watcher sets it, and core sets it when
    /// it retires the connection.
    pub(crate) gone: Arc<AtomicBool>,
    /// The [`super::pause`] epoch the connection opened in.
    pub(crate) opened_in: u64,
    /// The latest deadline (engine ms) of the peer's requests that arrived on it, raised by
    /// the lane readers, so a retired connection stays open while they may still be answered.
    pub(crate) serving: Arc<AtomicU64>,
    /// The connection's [`DirectStream`]: core writes requests there, the lane readers replies.
    pub(crate) direct: Arc<DirectStream>,
}

/// Starts the writer, readers and close watcher of an accepted connection.
pub(crate) fn spawn_connection(shared: Arc<Shared>, ready: Ready, handles: ConnHandles) {
    let ConnHandles {
        generation,
        out,
        rx,
        cancel,
        gone,
        opened_in,
        serving,
        direct,
    } = handles;
    let Ready {
        conn,
        hello,
        version,
        ctl_tx,
        ctl_rx,
    } = ready;
    let peer = hello.node_id;
    let dialect = Dialect::of(version);
    let span = info_span!("peer", peer = %peer.short(), service = %hello.service, generation);
    let t = &shared.tracker;
    t.spawn(
        writer(
            conn.clone(),
            ctl_tx,
            rx,
            shared.lanes,
            dialect,
            cancel.clone(),
        )
        .instrument(span.clone()),
    );
    let lanes = LaneContext {
        shared: shared.clone(),
        peer,
        dialect,
        out: out.clone(),
        cancel: cancel.clone(),
        gone: gone.clone(),
        opened_in,
        serving,
        replies: direct,
    };
    t.spawn(
        control_reader(shared.clone(), peer, generation, ctl_rx, cancel.clone())
            .instrument(span.clone()),
    );
    if version >= REQUEST_STREAMS_VERSION {
        t.spawn(request_stream_acceptor(lanes.clone(), conn.clone()).instrument(span.clone()));
    }
    t.spawn(lane_acceptor(lanes, conn.clone()).instrument(span.clone()));
    let shared2 = shared.clone();
    let mut trust = conn.trust_changes();
    t.spawn(
        async move {
            let mut member_until = conn.membership_expires();
            let (reason, stalled) = loop {
                break tokio::select! {
                    e = conn.closed() => {
                        // The peer replaced a connection it found stalled: it is reachable, and
                        // dials again at once. Or the connection outlived a pause of this node,
                        // and QUIC's idle timer saw it before the pause watch did: the peer may
                        // have handled what was in flight, and dials again too.
                        let stalled = matches!(
                            e,
                            ConnectionError::ClosedByPeer { code: CloseCode::Stalled, .. }
                        ) || shared2.pause.fences(opened_in);
                        (e.to_string(), stalled)
                    }
                    () = cancel.cancelled() => {
                        conn.close(CloseCode::Shutdown, "connection replaced or node stopping");
                        ("closed locally".to_string(), false)
                    }
                    () = membership_ends(member_until) => {
                        let why = "the peer's mesh certificate expired";
                        warn!(%peer, "closing the connection: {why}; it connects again only with a \
                            renewed one");
                        conn.close(CloseCode::MeshProofFailed, why);
                        (why.to_string(), false)
                    }
                    Ok(()) = trust.changed() => {
                        // The mesh CA, its revocation lists or the mesh keys changed: the
                        // peer's certificate may be from a CA no longer trusted, or revoked,
                        // or the key it proved dropped (a rotation's last step).
                        match shared2.endpoint.recheck(&conn) {
                            Ok(until) => {
                                member_until = until;
                                continue;
                            }
                            Err(why) => {
                                warn!(%peer, reason = %why, "closing the connection");
                                conn.close(CloseCode::MeshProofFailed, &why);
                                (why, false)
                            }
                        }
                    }
                };
            };
            cancel.cancel();
            gone.store(true, Ordering::Release);
            let _ = shared2
                .core
                .send(CoreMsg::PeerGone {
                    peer,
                    generation,
                    reason,
                    stalled,
                })
                .await;
        }
        .instrument(span),
    );
}

/// Completes when a peer's membership ends ([`Connection::membership_expires`]); never for a
/// peer whose membership does not expire.
async fn membership_ends(until: Option<SystemTime>) {
    match until {
        Some(t) => {
            let left = t.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(left).await;
        }
        None => std::future::pending().await,
    }
}

async fn writer(
    conn: Connection,
    mut ctl: FrameSender,
    mut rx: mpsc::Receiver<Out>,
    lanes: usize,
    dialect: Dialect,
    cancel: CancellationToken,
) {
    let mut lane_tx: Vec<Option<FrameSender>> = (0..lanes).map(|_| None).collect();
    let mut dirty = vec![false; lanes];
    let mut closing = None;
    let result: Result<(), FrameError> = async {
        while closing.is_none() {
            let first = tokio::select! {
                m = rx.recv() => m,
                () = cancel.cancelled() => None,
            };
            let Some(first) = first else { return Ok(()) };
            let mut dirty_ctl = false;
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(out) = next.take() {
                match out {
                    Out::Close(done) => {
                        // Nothing after it is written: the frames before it are flushed below.
                        closing = Some(done);
                        break;
                    }
                    Out::Control(c) => {
                        let c = match (c, dialect) {
                            (Control::Ack { log, seqs }, Dialect::PeerOrigin) => {
                                Control::ack_runs(log, seqs)
                            }
                            (c, _) => c,
                        };
                        if !refused(ctl.push(&c))? {
                            dirty_ctl = true;
                            if ctl.buffered_bytes() >= FLUSH_BYTES {
                                ctl.flush().await?;
                            }
                        }
                    }
                    Out::Data { lane, frame } => {
                        let lane = lane % lanes;
                        let slot = &mut lane_tx[lane];
                        if slot.is_none() {
                            *slot = Some(conn.open_uni().await?);
                        }
                        if let Some(s) = slot.as_mut()
                            && !refused(push_data(s, &frame, dialect))?
                        {
                            dirty[lane] = true;
                            if s.buffered_bytes() >= FLUSH_BYTES {
                                s.flush().await?;
                            }
                        }
                    }
                }
                taken += 1;
                if taken < WRITE_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            for (i, d) in dirty.iter_mut().enumerate() {
                if std::mem::take(d)
                    && let Some(s) = lane_tx[i].as_mut()
                {
                    s.flush().await?;
                }
            }
            if dirty_ctl {
                ctl.flush().await?;
            }
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        debug!(error = %e, "writer stopped");
        return;
    }
    if let Some(done) = closing {
        // Acks, goodbye and group news sent last must reach the peer before the connection
        // closes, which would discard them: finish the control stream and wait until the peer
        // acknowledged all of it (the node bounds the wait).
        let delivered = tokio::select! {
            r = ctl.finish_delivered() => r,
            () = cancel.cancelled() => Ok(()),
        };
        if let Err(e) = delivered {
            debug!(error = %e, "control stream not delivered before closing");
        }
        let _ = done.send(());
    }
}

/// Buffers a data frame on `s` in the connection's `dialect`; a large payload goes to QUIC as
/// it is, not copied.
fn push_data(s: &mut FrameSender, frame: &Data, dialect: Dialect) -> Result<(), FrameError> {
    s.push_encoded_with_payload(
        |buf| {
            frame.encode_head_in(buf, dialect);
        },
        frame.payload(),
    )
}

/// Whether the writer must skip a frame it could not buffer because it is over the maximum
/// frame size (logged; nothing was buffered, so the stream is intact). Ending the writer
/// instead left the connection up with nothing sent on it any more: every later delivery,
/// ack and reply to the peer was lost. Other errors end the writer.
fn refused(pushed: Result<(), FrameError>) -> Result<bool, FrameError> {
    match pushed {
        Ok(()) => Ok(false),
        Err(e @ FrameError::TooLarge { .. }) => {
            warn!(error = %e, "frame dropped: over the maximum frame size");
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

async fn control_reader(
    shared: Arc<Shared>,
    peer: NodeId,
    generation: u64,
    mut rx: FrameReceiver,
    cancel: CancellationToken,
) {
    loop {
        let frame = tokio::select! {
            f = rx.recv::<Control>() => f,
            () = cancel.cancelled() => return,
        };
        match frame {
            Ok(Some(frame)) => {
                if shared
                    .core
                    .send(CoreMsg::Control {
                        peer,
                        generation,
                        frame,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "control stream ended");
                return;
            }
        }
    }
}

/// What every data lane reader of one connection shares.
#[derive(Clone)]
struct LaneContext {
    shared: Arc<Shared>,
    peer: NodeId,
    /// How the peer writes envelopes (see `Dialect`).
    dialect: Dialect,
    /// The connection's outgoing queue (see `spawn_connection`).
    out: mpsc::Sender<Out>,
    cancel: CancellationToken,
    /// Set once `cancel` is cancelled or core retired the connection (see
    /// [`super::ConnState`]).
    gone: Arc<AtomicBool>,
    /// The [`super::pause`] epoch the connection opened in.
    opened_in: u64,
    /// The latest deadline (engine ms) of the peer's requests that arrived on the connection.
    serving: Arc<AtomicU64>,
    /// Where the lane readers write the replies of handlers that answered without waiting.
    replies: Arc<DirectStream>,
}

/// The connection's direct stream: one more unidirectional stream, opened by the first frame
/// written on it, for frames written without the hop through the writer task: the replies of
/// handlers that answered at once, written by the lane reader that read the request, and
/// requests, written by their callers or by core (see `runtime::requests`). A task hop cost a
/// request about 8 µs of its 54 µs in a raw quinn model of these tasks (two cores). Whoever
/// finds the stream busy (another task writing) queues its frame to the writer instead. The
/// peer reads it like any lane (neither requests nor replies need an order).
pub(crate) struct DirectStream {
    conn: Connection,
    /// How envelopes travel on the connection (requests carry one).
    dialect: Dialect,
    /// Whether the peer accepts request streams (`REQUEST_STREAMS_VERSION`).
    request_streams: bool,
    /// Whether the peer serves more than one request on a request stream, one after another
    /// (`REQUEST_STREAM_REUSE_VERSION`): its caller then keeps the stream for the next
    /// request ([`DirectStream::reuse`]).
    reuse_request_streams: bool,
    /// Request streams whose last request was answered, kept for the next ones: at most
    /// [`IDLE_REQUEST_STREAMS`].
    idle_request_streams: std::sync::Mutex<Vec<(FrameSender, FrameReceiver)>>,
    state: tokio::sync::Mutex<Direct>,
}

/// Request streams a connection keeps open for its next requests once their last request was
/// answered ([`DirectStream::reuse`]). Requests go on streams of their own only while the
/// node has fewer than two in flight (`Requests::quiet`), so a few cover them; each one kept
/// holds a task on the server, which waits for its next request.
pub(crate) const IDLE_REQUEST_STREAMS: usize = 4;

/// What [`DirectStream::try_request_stream`] did.
// Made once per request and moved straight into its `ReplyStream`: boxing the stream would
// cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub(crate) enum StreamRequest {
    /// Nothing: the peer takes no request streams, or none could be opened at once. The
    /// request is still to be sent.
    NotSent,
    /// The request went out on a stream of its own; the reply may come back on it.
    /// With its sending side when the peer serves further requests on it
    /// (`REQUEST_STREAM_REUSE_VERSION`) and the request was written whole.
    Sent(FrameReceiver, Option<FrameSender>),
    /// The stream failed while the request was written: the connection is failing, and the
    /// request ends with it (or at its deadline), as one the writer could not send.
    Failed,
}

/// The direct stream once opened, and whether a task flushes it.
#[derive(Default)]
struct Direct {
    stream: Option<FrameSender>,
    /// A task flushes what a request left buffered when QUIC could not take it at once: until
    /// it is done, requests are queued to the writer. So at most one such task runs per
    /// connection, and the buffer holds at most what one write could not hand over.
    flushing: bool,
}

impl DirectStream {
    /// How envelopes travel on the connection.
    pub(crate) fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The connection.
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The direct stream of `conn`, which speaks protocol `version`.
    pub(crate) fn new(conn: Connection, version: u32) -> Self {
        Self {
            conn,
            dialect: Dialect::of(version),
            request_streams: version >= REQUEST_STREAMS_VERSION,
            reuse_request_streams: version >= REQUEST_STREAM_REUSE_VERSION,
            idle_request_streams: std::sync::Mutex::new(Vec::new()),
            state: tokio::sync::Mutex::new(Direct::default()),
        }
    }

    /// The request `frame` on a bidirectional stream of its own, opened and written without
    /// waiting, its side ended: its caller then reads the reply there itself, instead of being
    /// woken by the lane reader that would read it from the peer's direct stream (about
    /// 20 µs of a request made from a task; ARCHITECTURE, "Requests").
    ///
    /// A peer of `REQUEST_STREAM_REUSE_VERSION` serves further requests on the stream, one
    /// after another: the request then goes on a stream kept from an earlier one when there
    /// is one ([`DirectStream::reuse`]), and the stream is not ended. Opening and ending a
    /// stream per request cost a raw quinn model of it 13–15% of its round trip.
    pub(crate) fn try_request_stream(&self, frame: &Data, shared: &Shared) -> StreamRequest {
        if !self.request_streams {
            return StreamRequest::NotSent;
        }
        let tracker = &shared.tracker;
        if self.reuse_request_streams {
            return self.request_on_kept_stream(frame, shared);
        }
        let Some((mut tx, rx)) = self.open_request_stream(shared) else {
            return StreamRequest::NotSent;
        };
        if push_data(&mut tx, frame, self.dialect).is_err() {
            // Nothing was buffered; the writer says why it drops it.
            return StreamRequest::NotSent;
        }
        let mut finish = Box::pin(tx.finish());
        match finish.as_mut().now_or_never() {
            Some(Ok(())) => StreamRequest::Sent(rx, None),
            Some(Err(e)) => {
                debug!(error = %e, "request dropped: its stream failed");
                StreamRequest::Failed
            }
            // Flow control holds the stream back: the rest goes out from a task.
            None => {
                tracker.spawn(async move {
                    if let Err(e) = finish.await {
                        debug!(error = %e, "request dropped: its stream failed");
                    }
                });
                StreamRequest::Sent(rx, None)
            }
        }
    }

    /// A new request stream, counted in `Status::request_streams_opened`; `None` when none
    /// can be opened at once (QUIC's stream limit, or the connection is closing).
    fn open_request_stream(&self, shared: &Shared) -> Option<(FrameSender, FrameReceiver)> {
        let (tx, rx) = self.conn.open_bi().now_or_never()?.ok()?;
        shared
            .counters
            .request_streams_opened
            .fetch_add(1, Ordering::Relaxed);
        Some((tx, rx))
    }

    /// [`DirectStream::try_request_stream`] to a peer that serves several requests per
    /// stream: on a kept stream, else on a new one, written without waiting and not ended.
    /// A kept stream whose write fails (the peer ended it meanwhile) is dropped and the next
    /// one tried: at most [`IDLE_REQUEST_STREAMS`] kept ones, then a new one.
    fn request_on_kept_stream(&self, frame: &Data, shared: &Shared) -> StreamRequest {
        loop {
            let kept = super::lock(&self.idle_request_streams).pop();
            let (mut tx, rx, reused) = match kept {
                Some((tx, mut rx)) => {
                    if !still_open(&mut rx) {
                        continue;
                    }
                    (tx, rx, true)
                }
                None => match self.open_request_stream(shared) {
                    Some((tx, rx)) => (tx, rx, false),
                    None => return StreamRequest::NotSent,
                },
            };
            if push_data(&mut tx, frame, self.dialect).is_err() {
                // Nothing was buffered; the writer says why it drops it.
                self.reuse(tx, rx);
                return StreamRequest::NotSent;
            }
            match tx.flush().now_or_never() {
                Some(Ok(())) => return StreamRequest::Sent(rx, Some(tx)),
                Some(Err(e)) if reused => {
                    debug!(error = %e, "a kept request stream failed; trying another");
                }
                Some(Err(e)) => {
                    debug!(error = %e, "request dropped: its stream failed");
                    return StreamRequest::Failed;
                }
                // Flow control holds the stream back: a task writes the rest and ends the
                // stream, which then serves this request only.
                None => {
                    shared.tracker.spawn(async move {
                        if let Err(e) = tx.finish().await {
                            debug!(error = %e, "request dropped: its stream failed");
                        }
                    });
                    return StreamRequest::Sent(rx, None);
                }
            }
        }
    }

    /// Keeps a request stream whose request was answered for a later request, unless
    /// [`IDLE_REQUEST_STREAMS`] are kept already (it is then ended: dropping its sending side
    /// ends it, and the server's task ends with it).
    pub(crate) fn reuse(&self, tx: FrameSender, mut rx: FrameReceiver) {
        if !still_open(&mut rx) {
            return;
        }
        let mut idle = super::lock(&self.idle_request_streams);
        if idle.len() < IDLE_REQUEST_STREAMS {
            idle.push((tx, rx));
        }
    }

    /// Writes the reply to request `corr` on the direct stream, or, when another task is
    /// writing there, queues it to the writer (`out`). Waits while QUIC flow control holds the
    /// stream back: a requester that does not read its replies stops its own requests there.
    async fn reply(
        &self,
        out: &mpsc::Sender<Out>,
        lanes: usize,
        corr: u64,
        result: Result<Bytes, String>,
    ) {
        let Ok(mut state) = self.state.try_lock() else {
            send_reply(out, lanes, corr, result);
            return;
        };
        let stream = &mut state.stream;
        if stream.is_none() {
            match self.conn.open_uni().await {
                Ok(s) => *stream = Some(s),
                Err(e) => {
                    debug!(corr, error = %e, "reply dropped: cannot open the direct stream");
                    return;
                }
            }
        }
        let Some(s) = stream.as_mut() else { return };
        let frame = Data::Reply { corr, result };
        // A reply carries no envelope: it reads the same in every dialect.
        if let Err(e) = push_data(s, &frame, Dialect::PeerOrigin) {
            // Nothing was buffered (replies over the maximum message size never get here).
            warn!(corr, error = %e, "reply dropped: it cannot be sent as a frame");
            return;
        }
        if let Err(e) = s.flush().await {
            // The connection is gone (the requester learns that); a later frame opens a new
            // stream if it is not.
            debug!(corr, error = %e, "reply dropped: the direct stream failed");
            *stream = None;
        }
    }

    /// A request `frame`, written on the direct stream without waiting: `false` when the
    /// caller must queue it to the writer instead (another task is writing, the stream cannot
    /// be opened at once, or the frame cannot be encoded). What QUIC does not take at once
    /// stays buffered in order, and one task is started to flush it.
    pub(crate) fn try_request(self: &Arc<Self>, frame: &Data, tracker: &TaskTracker) -> bool {
        let Ok(mut state) = self.state.try_lock() else {
            return false;
        };
        // While a flush waits for QUIC, nothing more is buffered here: what the stream holds
        // stays at what one write could not hand over.
        if state.flushing {
            return false;
        }
        let stream = &mut state.stream;
        if stream.is_none() {
            match self.conn.open_uni().now_or_never() {
                Some(Ok(s)) => *stream = Some(s),
                _ => return false,
            }
        }
        let Some(s) = stream.as_mut() else {
            return false;
        };
        if push_data(s, frame, self.dialect).is_err() {
            // Nothing was buffered; the writer says why it drops it.
            return false;
        }
        match s.flush().now_or_never() {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                // The connection is failing: the request ends with it (or at its deadline),
                // as one the writer could not send.
                debug!(error = %e, "request dropped: the direct stream failed");
                *stream = None;
            }
            // Flow control holds the stream back: the flush goes on in a task of its own, and
            // later requests go to the writer until it is done.
            None => {
                state.flushing = true;
                let this = self.clone();
                tracker.spawn(async move {
                    let mut state = this.state.lock().await;
                    if let Some(s) = state.stream.as_mut()
                        && let Err(e) = s.flush().await
                    {
                        debug!(error = %e, "requests dropped: the direct stream failed");
                        state.stream = None;
                    }
                    state.flushing = false;
                });
            }
        }
        true
    }
}

async fn lane_acceptor(cx: LaneContext, conn: Connection) {
    let mut lanes = 0usize;
    loop {
        let rx = tokio::select! {
            r = conn.accept_uni() => r,
            () = cx.cancel.cancelled() => return,
        };
        let Ok(rx) = rx else { return };
        lanes += 1;
        if lanes > MAX_INBOUND_LANES {
            warn!(
                limit = MAX_INBOUND_LANES,
                "peer opened too many lanes; closing"
            );
            conn.close(CloseCode::ProtocolViolation, "too many lanes");
            return;
        }
        cx.shared
            .tracker
            .spawn(lane_reader(cx.clone(), rx).instrument(tracing::Span::current()));
    }
}

async fn lane_reader(cx: LaneContext, mut rx: FrameReceiver) {
    let LaneContext {
        shared,
        peer,
        dialect,
        cancel,
        gone,
        opened_in,
        replies,
        ..
    } = &cx;
    let (peer, dialect) = (*peer, *dialect);
    loop {
        let frame = tokio::select! {
            f = rx.recv_shared(|body| Data::decode_from(body, dialect, peer)) => f,
            () = cancel.cancelled() => return,
        };
        let frame = match frame {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                debug!(error = %e, "lane ended");
                return;
            }
        };
        let env = match &frame {
            Data::Deliver { env, .. } => Some(&**env),
            Data::Request { env, .. } => Some(&**env),
            Data::Reply { .. } => None,
        };
        if let Some(env) = env
            && env.origin != peer
        {
            // A peer speaks only for itself: the ack of a message that claims another origin
            // would go to that node and settle its entry of that seq, and the dedup window
            // would drop that node's real message of that seq as a duplicate. (Only protocol
            // 4 puts origins on the wire; from 5 on the origin is the peer.)
            warn!(
                claimed = %env.origin.short(),
                log = %env.log,
                seq = env.seq,
                "peer sent a message under another node's id; closing the connection"
            );
            replies
                .conn
                .close(CloseCode::ProtocolViolation, "message from another origin");
            return;
        }
        match frame {
            Data::Deliver {
                floor,
                key_floor,
                env,
            } => {
                let inbound = Inbound {
                    env,
                    floor,
                    key_floor,
                    conn: ConnState::Flag {
                        gone: gone.clone(),
                        opened_in: *opened_in,
                    },
                    received: Instant::now(),
                };
                if !hand_over(shared, inbound, cancel).await {
                    return;
                }
            }
            Data::Request { budget_ms, env } => {
                if !serve_request(&cx, env, budget_ms, ReplyOn::Direct).await {
                    return;
                }
            }
            Data::Reply { corr, result } => {
                // The caller (or a scatter's collector) is answered from here, and the
                // request's bookkeeping done, under the requests' lock: core is not woken.
                let now = shared.now();
                let answer = super::lock(&shared.requests).reply(peer, corr, result, now);
                if let Some(answer) = answer {
                    answer.give();
                }
            }
        }
    }
}

/// Where the reply to a request goes when its handler answers at its first poll: the
/// connection's direct stream, or the request's own stream (`REQUEST_STREAMS_VERSION`).
/// A handler that waits, or waits for a `serve_concurrency` slot, replies through the
/// writer, or on the request's own stream ([`ReplyOn::later`]). An error reply for a node
/// that serves nothing goes through the writer, and a request stream then just ends.
enum ReplyOn {
    Direct,
    Stream(FrameSender),
}

impl ReplyOn {
    /// Where the reply goes when the handler runs in a task of its own (or waits for a
    /// `serve_concurrency` slot): the connection's writer (`out`) instead of the direct
    /// stream; the request's own stream stays its own.
    fn later(self, out: &mpsc::Sender<Out>) -> ReplyTo {
        match self {
            ReplyOn::Direct => ReplyTo::Writer(out.clone()),
            ReplyOn::Stream(stream) => ReplyTo::Stream(stream),
        }
    }
}

/// Where a handler that runs in a task of its own sends its reply: the connection's writer,
/// or the request's own stream (its caller reads it there).
pub(crate) enum ReplyTo {
    Writer(mpsc::Sender<Out>),
    Stream(FrameSender),
}

/// Serves a request that arrived on the connection (`cx`) with the time it may take
/// (`budget_ms`): its handler's first poll runs here. `false` once the connection's tasks are
/// cancelled.
///
/// Not when this node did not run for a while since the connection opened
/// ([`super::pause`]): the connection is being replaced, and its requester gave up on it (its
/// idle timeout) or sees the request fail with the close; running the handler now would run
/// what the requester counts as failed, perhaps after asking another instance.
async fn serve_request(cx: &LaneContext, env: Arc<Envelope>, budget_ms: u64, on: ReplyOn) -> bool {
    let LaneContext {
        shared,
        out,
        cancel,
        replies,
        opened_in,
        ..
    } = cx;
    let corr = env.seq;
    let server = match admit_request(cx, corr, budget_ms) {
        None => return true,
        Some(Ok(server)) => server,
        Some(Err(not_serving)) => {
            send_reply(out, shared.lanes, corr, Err(not_serving));
            return true;
        }
    };
    let Ok(permit) = server.permits.clone().try_acquire_owned() else {
        let request = InboundRequest {
            env,
            budget_ms,
            reply: on.later(out),
            opened_in: *opened_in,
        };
        let queued = tokio::select! {
            r = server.queue.send(request) => r.is_ok(),
            () = cancel.cancelled() => return false,
        };
        if !queued {
            let result = Err(format!("`{}` stopped serving requests", shared.service));
            send_reply(out, shared.lanes, corr, result);
        }
        return true;
    };
    // The handler's first poll runs here: one that answers without waiting is
    // replied to from this task (see `DirectStream`); one that waits goes on in a
    // task of its own. A handler whose first polls are slow (it computes before
    // it answers) starts in a task of its own: the requests behind it on this
    // stream need not wait for it, and such handlers run on several cores at once.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(budget_ms);
    if server.first_poll.slow() {
        let server = server.clone();
        let timed: super::ReplyFuture = Box::pin(async move {
            match start_and_poll(&server, env, budget_ms, corr).await {
                (_, Poll::Ready(result)) => result,
                (reply, Poll::Pending) => reply.await,
            }
        });
        spawn_handler(shared, timed, permit, on.later(out), corr, deadline);
        return true;
    }
    let (reply, first) = start_and_poll(&server, env, budget_ms, corr).await;
    match first {
        Poll::Ready(result) => {
            drop(permit);
            if let Some(result) = result {
                let written = async {
                    match on {
                        ReplyOn::Direct => replies.reply(out, shared.lanes, corr, result).await,
                        ReplyOn::Stream(stream) => reply_on_stream(stream, corr, result).await,
                    }
                };
                tokio::select! {
                    () = written => {}
                    () = cancel.cancelled() => return false,
                }
            }
        }
        Poll::Pending => {
            spawn_handler(shared, reply, permit, on.later(out), corr, deadline);
        }
    }
    true
}

/// How serving request `corr`, which may take `budget_ms`, starts: `None` when it is dropped
/// unserved ([`paused_since_opened`]); else the connection is kept open for its budget
/// (`serving`, should it be retired meanwhile), and this is the node's serve handler, or the
/// error to reply with when the node serves none.
fn admit_request(
    cx: &LaneContext,
    corr: u64,
    budget_ms: u64,
) -> Option<Result<Arc<super::Server>, String>> {
    let shared = &cx.shared;
    if paused_since_opened(shared, cx.opened_in, corr) {
        return None;
    }
    cx.serving
        .fetch_max(shared.now().saturating_add(budget_ms), Ordering::Relaxed);
    let serve = super::read(&shared.routes).serve.clone();
    Some(serve.ok_or_else(|| format!("`{}` does not serve requests", shared.service)))
}

/// Whether this node did not run for a while since the connection a request `corr` came on
/// opened in pause epoch `opened_in` ([`super::pause`]): the request is then dropped
/// unserved (see [`serve_request`]), which this logs.
fn paused_since_opened(shared: &Shared, opened_in: u64, corr: u64) -> bool {
    let fenced = shared.pause.fences(opened_in);
    if fenced {
        debug!(
            corr,
            "request dropped unserved: this node did not run for a while since its connection opened"
        );
    }
    fenced
}

/// Writes the reply to request `corr` on the request's own stream and ends it. Waits while
/// QUIC flow control holds the stream back, as [`DirectStream::reply`] does.
async fn reply_on_stream(mut stream: FrameSender, corr: u64, result: Result<Bytes, String>) {
    if !push_reply(&mut stream, corr, result) {
        return;
    }
    if let Err(e) = stream.finish().await {
        // The requester stopped waiting, or the connection is gone (the requester learns
        // that).
        debug!(corr, error = %e, "reply dropped: the request's stream failed");
    }
}

/// Buffers the reply to request `corr` on `stream`, to be flushed; `false` (logged) when it
/// cannot be sent as a frame.
fn push_reply(stream: &mut FrameSender, corr: u64, result: Result<Bytes, String>) -> bool {
    let frame = Data::Reply { corr, result };
    // A reply carries no envelope: it reads the same in every dialect.
    let pushed = push_data(stream, &frame, Dialect::PeerOrigin);
    if let Err(e) = &pushed {
        warn!(corr, error = %e, "reply dropped: it cannot be sent as a frame");
    }
    pushed.is_ok()
}

/// Whether the server side of a kept request stream is still open: nothing more came on it
/// since its last reply (the server ends it only when it gives up on the stream).
fn still_open(rx: &mut FrameReceiver) -> bool {
    rx.recv::<()>().now_or_never().is_none()
}

/// Accepts the request streams the peer opens (`REQUEST_STREAMS_VERSION`): one request
/// each. A request whose frame is all there is served from this task, as a lane reader
/// serves one; one still arriving is read and served in a task of its own (QUIC bounds the
/// streams open at once per connection, `MAX_STREAMS` in the transport). Unlike a lane
/// reader it need not check the envelope's origin: these connections speak protocol 5 or
/// later, whose envelopes leave it out and read back as the peer's.
///
/// On a connection of `REQUEST_STREAM_REUSE_VERSION` each stream has a task of its own that
/// serves its requests one after another ([`serve_request_stream`]).
async fn request_stream_acceptor(cx: LaneContext, conn: Connection) {
    let reuse = cx.replies.reuse_request_streams;
    loop {
        let accepted = tokio::select! {
            r = conn.accept_bi() => r,
            () = cx.cancel.cancelled() => return,
        };
        let Ok((tx, mut rx)) = accepted else { return };
        if reuse {
            let cx = cx.clone();
            cx.shared
                .tracker
                .clone()
                .spawn(serve_request_stream(cx, tx, rx));
            continue;
        }
        let (peer, dialect) = (cx.peer, cx.dialect);
        let decode = move |body| Data::decode_from(body, dialect, peer);
        let read = rx.recv_shared(decode).now_or_never();
        match read {
            Some(frame) => {
                super::requests::read_end(&mut rx);
                if !serve_stream_request(&cx, frame, tx).await {
                    return;
                }
            }
            None => {
                let cx = cx.clone();
                cx.shared.tracker.clone().spawn(async move {
                    let frame = tokio::select! {
                        f = rx.recv_shared(decode) => f,
                        () = cx.cancel.cancelled() => return,
                    };
                    super::requests::read_end(&mut rx);
                    serve_stream_request(&cx, frame, tx).await;
                });
            }
        }
    }
}

/// Serves the requests of one request stream of a connection of
/// `REQUEST_STREAM_REUSE_VERSION`, one after another, each reply written on the stream,
/// until the requester ends it. A requester sends the next request only once it has read
/// the last reply (or gave up on the stream, which ends it), so a handler that waits holds
/// up no other request: each stream has its own task, as a raw quinn echo server would.
/// Ends the stream, and with it the requester's wait for a reply there, when a request
/// cannot be answered on it (this node paused since the connection opened, the reply could
/// not be written), so the requester is answered by its deadline or the connection's end.
async fn serve_request_stream(cx: LaneContext, mut tx: FrameSender, mut rx: FrameReceiver) {
    let (peer, dialect) = (cx.peer, cx.dialect);
    loop {
        let frame = tokio::select! {
            f = rx.recv_shared(|body| Data::decode_from(body, dialect, peer)) => f,
            () = cx.cancel.cancelled() => return,
        };
        match frame {
            Ok(Some(Data::Request { budget_ms, env })) => {
                if !serve_on_stream(&cx, env, budget_ms, &mut tx).await {
                    return;
                }
            }
            // The requester is done with the stream.
            Ok(None) => {
                let _ = tx.finish().await;
                return;
            }
            Ok(Some(_)) => {
                warn!(
                    "peer sent a delivery or a reply on a request stream; closing the connection"
                );
                cx.replies.conn.close(
                    CloseCode::ProtocolViolation,
                    "not a request on a request stream",
                );
                return;
            }
            Err(e) => {
                debug!(error = %e, "request stream ended");
                return;
            }
        }
    }
}

/// Serves one request of a reused request stream ([`serve_request_stream`]) in the stream's
/// own task: the handler is polled and awaited here, within the node's `serve_concurrency`,
/// and its reply written on `tx`. `false` when the stream is to end (see there).
async fn serve_on_stream(
    cx: &LaneContext,
    env: Arc<Envelope>,
    budget_ms: u64,
    tx: &mut FrameSender,
) -> bool {
    let LaneContext {
        shared,
        cancel,
        opened_in,
        ..
    } = cx;
    let corr = env.seq;
    let Some(serve) = admit_request(cx, corr, budget_ms) else {
        return false;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(budget_ms);
    let result = match serve {
        Err(not_serving) => Some(Err(not_serving)),
        Ok(server) => {
            let permit = match server.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => tokio::select! {
                    p = server.permits.clone().acquire_owned() => match p {
                        Ok(permit) => permit,
                        Err(_) => return false,
                    },
                    // The requester stopped waiting.
                    () = tokio::time::sleep_until(deadline) => return false,
                    () = cancel.cancelled() => return false,
                },
            };
            // As for a request that waited in the serve queue: a pause while this one waited
            // for its slot replaces the connection, and its requester counts it as failed.
            if paused_since_opened(shared, *opened_in, corr) {
                return false;
            }
            let (reply, first) = start_and_poll(&server, env, budget_ms, corr).await;
            let result = match first {
                Poll::Ready(result) => result,
                Poll::Pending => tokio::select! {
                    r = AssertUnwindSafe(reply).catch_unwind() => {
                        r.unwrap_or_else(|_| Some(handler_panicked(corr)))
                    }
                    () = cancel.cancelled() => return false,
                },
            };
            drop(permit);
            result
        }
    };
    // `None`: the requester's budget ran out first, and it stopped waiting.
    let Some(result) = result else { return true };
    if !push_reply(tx, corr, result) {
        return false;
    }
    // Waits while QUIC flow control holds the stream back, as `DirectStream::reply` does.
    let written = tokio::select! {
        w = tokio::time::timeout_at(deadline, tx.flush()) => w,
        () = cancel.cancelled() => return false,
    };
    match written {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            debug!(corr, error = %e, "reply dropped: the request's stream failed");
            false
        }
        Err(_) => {
            debug!(
                corr,
                "reply dropped: the request's stream stayed blocked until its deadline"
            );
            false
        }
    }
}

/// Serves the frame read from a request stream (see [`request_stream_acceptor`]): it must be
/// a request. `false` once the connection is closed or its tasks are cancelled.
async fn serve_stream_request(
    cx: &LaneContext,
    frame: Result<Option<Data>, FrameError>,
    tx: FrameSender,
) -> bool {
    match frame {
        Ok(Some(Data::Request { budget_ms, env })) => {
            serve_request(cx, env, budget_ms, ReplyOn::Stream(tx)).await
        }
        // The requester gave up before it wrote its request.
        Ok(None) => true,
        Ok(Some(_)) => {
            warn!("peer sent a delivery or a reply on a request stream; closing the connection");
            cx.replies.conn.close(
                CloseCode::ProtocolViolation,
                "not a request on a request stream",
            );
            false
        }
        Err(e) => {
            debug!(error = %e, "request stream ended");
            true
        }
    }
}

/// The reply to a request whose handler panicked.
const HANDLER_PANICKED: &str = "the request's handler panicked";

/// Calls the handler (`run`) for a request: its run, which a panic in the handler's own call
/// (before any future exists) makes an error reply, as a panic in a poll does.
pub(crate) fn start_handler(
    run: &super::ServeFn,
    env: Arc<Envelope>,
    budget_ms: u64,
    corr: u64,
) -> super::ReplyFuture {
    std::panic::catch_unwind(AssertUnwindSafe(|| run(env, budget_ms)))
        .unwrap_or_else(|_| Box::pin(std::future::ready(Some(handler_panicked(corr)))))
}

/// Calls `server`'s handler for a request and polls its run once, recording how long both
/// took in the handler's [`FirstPollCost`](super::FirstPollCost): the run, and that poll's
/// outcome.
async fn start_and_poll(
    server: &super::Server,
    env: Arc<Envelope>,
    budget_ms: u64,
    corr: u64,
) -> (super::ReplyFuture, Poll<Option<Result<Bytes, String>>>) {
    let started = Instant::now();
    let mut reply = start_handler(&server.run, env, budget_ms, corr);
    let first = poll_handler_once(&mut reply, corr).await;
    server.first_poll.record(started.elapsed());
    (reply, first)
}

/// Polls a handler's run once from the calling task (a lane reader). A panic in the handler is
/// caught there and becomes its reply, as in a handler's own task ([`spawn_handler`]): it
/// must not end the lane reader.
async fn poll_handler_once(
    reply: &mut super::ReplyFuture,
    corr: u64,
) -> Poll<Option<Result<Bytes, String>>> {
    std::future::poll_fn(|cx| {
        Poll::Ready(
            match std::panic::catch_unwind(AssertUnwindSafe(|| reply.as_mut().poll(cx))) {
                Ok(polled) => polled,
                Err(_) => Poll::Ready(Some(handler_panicked(corr))),
            },
        )
    })
    .await
}

/// Logs a handler's panic; its reply.
fn handler_panicked(corr: u64) -> Result<Bytes, String> {
    warn!(
        corr,
        "a request's handler panicked; the requester gets an error"
    );
    Err(HANDLER_PANICKED.to_string())
}

/// Runs a request's handler in a task of its own, which keeps `permit` (a `serve_concurrency`
/// slot) while it runs and sends the reply where `to` says: queued to the connection's
/// writer, or written on the request's own stream, waiting for room until `deadline`.
pub(crate) fn spawn_handler(
    shared: &Shared,
    reply: super::ReplyFuture,
    permit: OwnedSemaphorePermit,
    to: ReplyTo,
    corr: u64,
    deadline: tokio::time::Instant,
) {
    let lanes = shared.lanes;
    shared.tracker.spawn(async move {
        let _permit = permit;
        let reply = AssertUnwindSafe(reply)
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Some(handler_panicked(corr)));
        let Some(result) = reply else { return };
        match to {
            ReplyTo::Writer(out) => queue_reply(&out, lanes, corr, result, deadline).await,
            ReplyTo::Stream(stream) => {
                let written = reply_on_stream(stream, corr, result);
                if tokio::time::timeout_at(deadline, written).await.is_err() {
                    debug!(
                        corr,
                        "reply dropped: the request's stream stayed blocked until its deadline"
                    );
                }
            }
        }
    });
}

/// Queues the reply to request `corr` on the connection it came on (`out`), on the lane core
/// would pick. Like core, never waits: a full queue means the requester stopped reading (core
/// closes such a connection on its next write) and a closed one that it is gone; either way
/// the reply is dropped and the requester times out or has failed already.
pub(crate) fn send_reply(
    out: &mpsc::Sender<Out>,
    lanes: usize,
    corr: u64,
    result: Result<Bytes, String>,
) {
    let lane = (corr % lanes.max(1) as u64) as usize;
    let frame = Data::Reply { corr, result };
    match out.try_send(Out::Data { lane, frame }) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            warn!(
                corr,
                limit = super::LINK_QUEUE,
                "reply dropped: the requester's outgoing queue is full"
            );
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            debug!(corr, "reply dropped: requester no longer connected");
        }
    }
}

/// Like [`send_reply`], for a serve handler's answer: waits for room in a full queue until
/// `deadline` (when the requester stops waiting), so a busy connection delays a reply instead
/// of losing it. Holding the handler's task (and its concurrency permit) meanwhile is the
/// back-pressure on a requester that does not read its replies.
pub(crate) async fn queue_reply(
    out: &mpsc::Sender<Out>,
    lanes: usize,
    corr: u64,
    result: Result<Bytes, String>,
    deadline: tokio::time::Instant,
) {
    let lane = (corr % lanes.max(1) as u64) as usize;
    let frame = Data::Reply { corr, result };
    match tokio::time::timeout_at(deadline, out.send(Out::Data { lane, frame })).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => debug!(corr, "reply dropped: requester no longer connected"),
        Err(_) => warn!(
            corr,
            limit = super::LINK_QUEUE,
            "reply dropped: the requester's outgoing queue stayed full until its deadline"
        ),
    }
}

/// Hands an arriving entry to its local subscription queue, waiting for room (which is what
/// pushes back on the sender), or nacks it as not consumed here. False when the node is
/// stopping and the caller should end.
async fn hand_over(shared: &Shared, inbound: Inbound, cancel: &CancellationToken) -> bool {
    let target = route(shared, &inbound.env.log, &inbound.env.destination);
    let unsent = match target {
        Some(tx) => tokio::select! {
            r = tx.send(inbound) => r.err().map(|e| e.0),
            () = cancel.cancelled() => return false,
        },
        None => Some(inbound),
    };
    if unsent.is_none() {
        shared.counters.received.fetch_add(1, Ordering::Relaxed);
    }
    if let Some(Inbound { env, .. }) = unsent {
        let reason = format!("{NOT_HERE_PREFIX}: no local consumer for `{}`", env.log);
        let msg = CoreMsg::Completed(Completion {
            env,
            result: Err((reason, false)),
        });
        if shared.core.send(msg).await.is_err() {
            return false;
        }
    }
    true
}

/// Starts the local lanes: entries this node's outbox delivers to itself go through them
/// to the same routing as entries arriving on a QUIC lane, without touching the network.
/// One task per lane, so (as on a connection) one key stays in order and a full
/// subscription queue only holds back the keys of its lane. Each queue holds
/// [`LOCAL_LANE_QUEUE`](super::LOCAL_LANE_QUEUE) entries; core only `try_send`s into them.
pub(crate) fn spawn_local_lanes(shared: &Arc<Shared>) -> Vec<mpsc::Sender<Inbound>> {
    (0..shared.lanes.max(1))
        .map(|lane| {
            let (tx, mut rx) = mpsc::channel::<Inbound>(super::LOCAL_LANE_QUEUE);
            let s = shared.clone();
            let cancel = shared.cancel.child_token();
            shared.tracker.spawn(
                async move {
                    loop {
                        let inbound = tokio::select! {
                            i = rx.recv() => i,
                            () = cancel.cancelled() => None,
                        };
                        let Some(inbound) = inbound else { break };
                        if !hand_over(&s, inbound, &cancel).await {
                            break;
                        }
                    }
                }
                .instrument(info_span!("local_lane", lane)),
            );
            tx
        })
        .collect()
}

/// The local queue an entry of `log` (addressed to `destination`) belongs in.
fn route(shared: &Shared, log: &str, destination: &str) -> Option<mpsc::Sender<Inbound>> {
    let routes = super::read(&shared.routes);
    if let Some(svc) = log.strip_prefix("svc:") {
        return (svc == shared.service).then(|| routes.service_tx.clone());
    }
    if log.starts_with("eph:") {
        if log != shared.eph_log {
            return None;
        }
        return routes
            .subs
            .iter()
            .find(|s| s.interest.group.is_none() && topic_matches(&s.interest.pattern, destination))
            .map(|s| s.tx.clone());
    }
    let group = log.strip_prefix("grp:")?;
    routes
        .subs
        .iter()
        .find(|s| {
            s.interest.group.as_deref() == Some(group)
                && topic_matches(&s.interest.pattern, destination)
        })
        .map(|s| s.tx.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_skips_a_frame_over_the_limit_and_stops_on_other_errors() {
        assert!(!refused(Ok(())).expect("buffered"));
        let too_large = FrameError::TooLarge { len: 10, max: 5 };
        assert!(refused(Err(too_large)).expect("skipped, writer goes on"));
        let broken = FrameError::Truncated;
        assert!(refused(Err(broken)).is_err(), "other errors end the writer");
    }
}
