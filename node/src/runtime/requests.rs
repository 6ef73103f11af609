//! The requests in flight: one table that callers, lane readers and core share.
//!
//! While few requests are in flight ([`Requests::quiet`]), a caller routes its own request
//! under the table's lock (the instance, the service's bulkhead and breaker, a correlation
//! id) and writes it to that instance's connection itself ([`Started::send_own`]: from a
//! task, on a stream of its own whose reply it reads itself); otherwise core does both
//! ([`Started::send`]). The lane reader a reply arrives on takes its request out under the
//! same lock, does its bookkeeping (in-flight counts, breaker) and answers the caller. Core
//! keeps the table's routes in step with its links, ends the requests whose deadline passed
//! on its tick, fails those of a connection that ended, and sends scatters.
//!
//! *Why:* core owned this state, so every request took a hop through core on its way out,
//! and every reply's bookkeeping waited for core. A lone request made from a task paid for
//! the hop with a wake of tokio's other worker thread (ARCHITECTURE, "Requests").

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt as _;
use peerbus_transport::{CloseCode, FrameReceiver, FrameSender, NodeId};
use tokio::sync::{mpsc, oneshot};

use super::Shared;
use super::conn::{DirectStream, StreamRequest};
use super::core::Out;
use crate::engine::FastMap;
use crate::engine::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::engine::wire::{Data, Envelope};
use crate::error::RequestError;
use crate::node::BreakerStatus;

/// Request guards per destination service.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Guards {
    pub(crate) breaker: BreakerConfig,
    pub(crate) max_in_flight_per_service: usize,
}

/// Most services with a breaker (one per destination a node requests).
const MAX_BREAKERS: usize = 4096;

/// A requested service's breaker, and its bulkhead's count.
struct ServiceGuard {
    breaker: Breaker,
    /// Its single requests in flight (scatters do not count).
    in_flight: usize,
}

/// Where a scatter's replies go: the instance and its reply (or error text).
pub(crate) type Collector = mpsc::Sender<(NodeId, Result<Bytes, String>)>;

/// Who waits for a request's reply.
enum Sink {
    /// One caller of `Node::request`. Its request counts for the service's breaker and
    /// bulkhead.
    One(oneshot::Sender<Result<Bytes, RequestError>>),
    /// A scatter: every reply goes to its collector.
    Many(Collector),
}

struct Pending {
    peer: NodeId,
    /// The generation of the connection it went out on: only that connection's end fails it.
    generation: u64,
    service: String,
    /// Engine ms.
    deadline: u64,
    sink: Sink,
}

/// A connected peer as requests see it: core adds it with its link
/// ([`Requests::link_up`]) and takes it out when the link ends or is retired.
pub(crate) struct Route {
    /// The link's connection generation.
    generation: u64,
    /// The peer's service.
    service: String,
    /// It serves requests.
    serves: bool,
    /// It said goodbye: no new requests.
    draining: bool,
    /// Where its requests are written.
    way: Arc<Way>,
    /// Requests in flight to it on this connection.
    outstanding: usize,
}

impl Route {
    /// A route to a new link (not draining, nothing in flight).
    pub(crate) fn new(generation: u64, service: String, serves: bool, way: Way) -> Self {
        Self {
            generation,
            service,
            serves,
            draining: false,
            way: Arc::new(way),
            outstanding: 0,
        }
    }
}

/// How a request reaches its instance: the connection's direct stream when it is free,
/// else the connection's writer.
pub(crate) struct Way {
    pub(crate) direct: Arc<DirectStream>,
    pub(crate) tx: mpsc::Sender<Out>,
}

/// A caller starts and writes its request itself while fewer requests than this are in
/// flight on the node ([`Requests::quiet`]); otherwise core does, for all the requests that
/// reached it meanwhile (ARCHITECTURE, "Requests").
pub(crate) const QUIET_BELOW: usize = 2;

/// A route [`Requests::take_route`] counted a request on.
struct Taken {
    peer: NodeId,
    /// The route's connection generation.
    generation: u64,
    way: Arc<Way>,
}

/// A request [`Requests::start`] refused: why, and the caller's reply channel, unused.
pub(crate) type Refused = (RequestError, oneshot::Sender<Result<Bytes, RequestError>>);

/// A request the table counts, to be written by whoever started it ([`Started::send`]).
pub(crate) struct Started {
    corr: u64,
    frame: Data,
    peer: NodeId,
    way: Arc<Way>,
}

/// The stream a request went out on by itself ([`Started::send_own`]), where its caller reads
/// the reply.
pub(crate) struct ReplyStream {
    rx: FrameReceiver,
    /// The stream's sending side, kept for the next request once the reply is read, when the
    /// peer serves several requests per stream (`REQUEST_STREAM_REUSE_VERSION`).
    tx: Option<FrameSender>,
    /// The request's correlation id.
    corr: u64,
    /// The instance asked.
    peer: NodeId,
    /// The connection it went out on (its dialect, and its closing on a violation).
    way: Arc<Way>,
}

impl ReplyStream {
    /// Reads the reply from the stream and does its bookkeeping in the table, as for a reply
    /// a lane reader reads: the answer, unless the table had answered the request already (at
    /// its deadline, say). `None` when the stream ends without the reply (the server replied
    /// through its writer, or the connection failed) or carries something else (the
    /// connection is then closed): the lane readers or core answer it through the caller's
    /// reply channel then. A stream the peer serves further requests on is kept for the
    /// connection's next request once its reply is read ([`DirectStream::reuse`]).
    ///
    /// The caller waits here without also polling its reply channel: an answer given
    /// through the channel would wake it once more after it has read the reply itself, and
    /// that wake-up, in the run queue of a busy worker, can hand the task to the other
    /// worker (measured: `request/in-task/p50` rose from 50 to 55–59 µs).
    pub(crate) async fn read(mut self, shared: &Shared) -> Option<Result<Bytes, RequestError>> {
        let (peer, dialect) = (self.peer, self.way.direct.dialect());
        let frame = self
            .rx
            .recv_shared(|body| Data::decode_from(body, dialect, peer))
            .await;
        let (corr, result) = match frame {
            Ok(Some(Data::Reply { corr, result })) => (corr, result),
            Ok(Some(_)) => {
                // As the server does with anything but a request: a peer that answers a
                // request with something else is broken or hostile. Closing the connection
                // fails its requests at once (`PeerLost`), where ignoring the frame left
                // this one waiting until its deadline.
                tracing::warn!(
                    "peer sent a delivery or a request on a request stream; closing the connection"
                );
                self.way.direct.conn().close(
                    CloseCode::ProtocolViolation,
                    "not a reply on a request stream",
                );
                return None;
            }
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "request stream ended without a reply");
                return None;
            }
        };
        let Self {
            mut rx, tx, way, ..
        } = self;
        match tx {
            Some(tx) if corr == self.corr => way.direct.reuse(tx, rx),
            _ => read_end(&mut rx),
        }
        let now = shared.now();
        let answer = super::lock(&shared.requests).reply(peer, corr, result, now)?;
        match answer {
            // Ours: the channel was never polled, so dropping its sender wakes no one.
            Answer::One(_, result) if corr == self.corr => {
                shared
                    .counters
                    .requests_own_stream
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Some(result)
            }
            other => {
                other.give();
                None
            }
        }
    }
}

/// Reads the end of a request stream `rx` when it is there already (it usually comes with
/// the stream's one frame). A stream dropped before its end was read would have QUIC ask the
/// peer to stop sending (a `STOP_SENDING` frame, and a `RESET_STREAM` back): two more
/// frames, and wake-ups, per request.
pub(crate) fn read_end(rx: &mut FrameReceiver) {
    let _ = rx.recv::<()>().now_or_never();
}

impl Started {
    /// Sends the request for its own caller: on a stream of its own when the peer takes
    /// request streams, the caller then reading the reply there ([`ReplyStream`]); else as
    /// [`Started::send`] does.
    pub(crate) fn send_own(self, shared: &Shared) -> Option<ReplyStream> {
        // Only a caller that runs in a task reads its reply faster itself. One outside the
        // runtime's tasks (in `block_on`, as in a `#[tokio::main]` function) is woken from a
        // worker thread either way, and the stream's own opening and closing cost it more
        // than the lane reader's hop: `request/p50` rose from 86–92 to 94–95 µs (three
        // alternating pairs; ARCHITECTURE, "Requests").
        if tokio::task::try_id().is_none() {
            self.send(shared);
            return None;
        }
        match self.way.direct.try_request_stream(&self.frame, shared) {
            StreamRequest::Sent(rx, tx) => Some(ReplyStream {
                rx,
                tx,
                corr: self.corr,
                peer: self.peer,
                way: self.way,
            }),
            StreamRequest::Failed => None,
            StreamRequest::NotSent => {
                self.send(shared);
                None
            }
        }
    }

    /// Writes the request on its connection's direct stream, or queues it to the writer when
    /// the stream is busy. A writer whose queue is full has a peer that stopped reading: the
    /// connection is closed, and core fails its requests.
    pub(crate) fn send(self, shared: &Shared) {
        if self.way.direct.try_request(&self.frame, &shared.tracker) {
            return;
        }
        let lane = (self.corr % shared.lanes as u64) as usize;
        let out = Out::Data {
            lane,
            frame: self.frame,
        };
        super::core::try_queue(&self.way.tx, self.way.direct.conn(), out);
    }
}

/// An answer owed to a caller or a scatter's collector, given once the table's lock is
/// released ([`Answer::give`]).
#[must_use]
pub(crate) enum Answer {
    One(
        oneshot::Sender<Result<Bytes, RequestError>>,
        Result<Bytes, RequestError>,
    ),
    Many(Collector, NodeId, Result<Bytes, String>),
}

impl Answer {
    /// Answers. A caller that stopped waiting, or a collector that is full or done, misses
    /// it.
    pub(crate) fn give(self) {
        match self {
            Answer::One(tx, result) => {
                let _ = tx.send(result);
            }
            Answer::Many(tx, peer, result) => {
                let _ = tx.try_send((peer, result));
            }
        }
    }
}

/// Gives every answer (after the table's lock is released).
pub(crate) fn give_all(answers: Vec<Answer>) {
    for a in answers {
        a.give();
    }
}

/// The requests in flight, the routes to the peers that may take new ones, and the
/// services' breakers and bulkheads. Bounded: at most `max_in_flight` requests
/// (`NodeBuilder::max_requests_in_flight`), [`MAX_BREAKERS`] services' guards (more only
/// while none can be forgotten: each is open or has requests in flight), one route per link,
/// and one retired entry per retired connection with requests (core keeps at most
/// `retire::MAX_RETIRING` of them).
pub(crate) struct Requests {
    routes: FastMap<NodeId, Route>,
    pending: HashMap<u64, Pending>,
    /// Requests still waiting on each retired connection, by generation.
    retired: FastMap<u64, usize>,
    /// From hashbrown so that a request finds (or adds) its service's guard by `&str`, with
    /// one hash and no copy of the name unless it is new.
    services: hashbrown::HashMap<String, ServiceGuard, foldhash::fast::RandomState>,
    next_corr: u64,
    /// No request in `pending` has a deadline before this (`u64::MAX`: none may): the tick
    /// walks `pending` only once this has passed, then sets it to the earliest deadline left.
    /// Lowered by every new request; an ended request leaves it as it is (still a bound).
    /// *Why:* with requests of a few seconds, the walk of up to `max_in_flight` requests ran
    /// on every tick (every 50 ms) and found nothing due.
    due: u64,
    guards: Guards,
    max_in_flight: usize,
    /// The node stopped: new requests fail with [`RequestError::Stopped`].
    stopped: bool,
}

impl Requests {
    pub(crate) fn new(guards: Guards, max_in_flight: usize) -> Self {
        Self {
            routes: FastMap::default(),
            pending: HashMap::new(),
            retired: FastMap::default(),
            services: hashbrown::HashMap::default(),
            next_corr: 1,
            due: u64::MAX,
            guards,
            max_in_flight,
            stopped: false,
        }
    }

    /// Whether few requests are in flight on the node (fewer than [`QUIET_BELOW`]): then a
    /// caller starts and writes its request itself, else it hands it to core.
    ///
    /// *Why:* under load, core starts and writes all the requests that reached it meanwhile
    /// before the connection's driver runs, so they leave in a few packets and the table
    /// stays on core's thread. With every caller writing its own request (each waking the
    /// driver, which tokio runs next on the same thread: probably a packet per request),
    /// `request/throughput` with 64 callers fell by a quarter, and by 5–12% with callers
    /// starting their requests and core writing them. A lone caller is spared the hop
    /// through core.
    pub(crate) fn quiet(&self) -> bool {
        self.pending.len() < QUIET_BELOW
    }

    /// A new link to `peer` (replacing any route to it).
    pub(crate) fn link_up(&mut self, peer: NodeId, route: Route) {
        self.routes.insert(peer, route);
    }

    /// The peer says whether it serves requests.
    pub(crate) fn set_serves(&mut self, peer: NodeId, serves: bool) {
        if let Some(r) = self.routes.get_mut(&peer) {
            r.serves = serves;
        }
    }

    /// The peer said goodbye: it takes no new requests.
    pub(crate) fn set_draining(&mut self, peer: NodeId) {
        if let Some(r) = self.routes.get_mut(&peer) {
            r.draining = true;
        }
    }

    /// Starts a request to one instance of `service`: the least busy one that serves, if the
    /// bulkhead and breaker allow. Fails at once, leaving nothing behind, otherwise.
    pub(crate) fn start(
        &mut self,
        service: &str,
        env: Arc<Envelope>,
        budget_ms: u64,
        reply: oneshot::Sender<Result<Bytes, RequestError>>,
        now: u64,
    ) -> Result<Started, Refused> {
        match self.admit(service, now) {
            Ok(peer) => {
                // `admit` found the peer among the routes, under the same lock.
                let Some(taken) = self.take_route(peer) else {
                    let service = service.to_string();
                    return Err((RequestError::NoResponders { service }, reply));
                };
                if let Some(g) = self.services.get_mut(service) {
                    g.in_flight += 1;
                }
                let sink = Sink::One(reply);
                Ok(self.begin(taken, service.to_string(), env, budget_ms, sink, now))
            }
            Err(e) => Err((e, reply)),
        }
    }

    /// Whether a new request to `service` may go out now, and to which instance: the least
    /// busy one that serves, if the bulkhead and breaker allow.
    fn admit(&mut self, service: &str, now: u64) -> Result<NodeId, RequestError> {
        if self.stopped {
            return Err(RequestError::Stopped);
        }
        if self.pending.len() >= self.max_in_flight {
            return Err(RequestError::TooManyInFlight {
                limit: self.max_in_flight,
            });
        }
        let corr = self.next_corr;
        let Some(peer) = self
            .routes
            .iter()
            .filter(|(_, r)| r.serves && !r.draining && r.service == service)
            .min_by_key(|(id, r)| {
                (
                    r.outstanding,
                    crate::engine::routing::stable_hash(&[id.as_bytes(), &corr.to_le_bytes()]),
                )
            })
            .map(|(id, _)| *id)
        else {
            return Err(RequestError::NoResponders {
                service: service.to_string(),
            });
        };
        // Bulkhead, then breaker: both fail fast, before anything is sent.
        if self.services.len() >= MAX_BREAKERS && !self.services.contains_key(service) {
            // Forget a closed breaker with nothing in flight to make room; open ones are
            // kept, and so are counts still in use.
            let victim = self
                .services
                .iter()
                .find(|(_, g)| g.in_flight == 0 && g.breaker.state(now) == BreakerState::Closed)
                .map(|(k, _)| k.clone());
            if let Some(v) = victim {
                self.services.remove(&v);
            }
        }
        let breaker = self.guards.breaker;
        let guard = self
            .services
            .entry_ref(service)
            .or_insert_with(|| ServiceGuard {
                breaker: Breaker::new(breaker),
                in_flight: 0,
            });
        let limit = self.guards.max_in_flight_per_service;
        if guard.in_flight >= limit {
            return Err(RequestError::Bulkhead {
                service: service.to_string(),
                limit,
            });
        }
        if let Err(r) = guard.breaker.allow(now) {
            return Err(RequestError::BreakerOpen {
                service: service.to_string(),
                retry_after: std::time::Duration::from_millis(r.retry_after_ms),
            });
        }
        Ok(peer)
    }

    /// Starts one request of a scatter to each of `peers` (as many as the limit on requests
    /// in flight leaves room for; none that has no route); their replies go to `replies`.
    pub(crate) fn scatter(
        &mut self,
        peers: Vec<NodeId>,
        name: &str,
        env: &Envelope,
        budget_ms: u64,
        replies: &Collector,
        now: u64,
    ) -> Vec<Started> {
        if self.stopped {
            return Vec::new();
        }
        let room = self.max_in_flight.saturating_sub(self.pending.len());
        let peers: Vec<NodeId> = peers
            .into_iter()
            .filter(|p| self.routes.contains_key(p))
            .take(room)
            .collect();
        let mut started = Vec::with_capacity(peers.len());
        for peer in peers {
            let Some(taken) = self.take_route(peer) else {
                continue;
            };
            let sink = Sink::Many(replies.clone());
            let env = Arc::new(env.clone());
            started.push(self.begin(taken, name.to_string(), env, budget_ms, sink, now));
        }
        started
    }

    /// Counts one more request in flight on the route to `peer` (`None`, counting nothing,
    /// without a route).
    fn take_route(&mut self, peer: NodeId) -> Option<Taken> {
        let r = self.routes.get_mut(&peer)?;
        r.outstanding += 1;
        Some(Taken {
            peer,
            generation: r.generation,
            way: r.way.clone(),
        })
    }

    /// Records a request under the next correlation id, on the route
    /// [`Requests::take_route`] counted it on, and hands back what to write.
    fn begin(
        &mut self,
        Taken {
            peer,
            generation,
            way,
        }: Taken,
        service: String,
        mut env: Arc<Envelope>,
        budget_ms: u64,
        sink: Sink,
        now: u64,
    ) -> Started {
        let corr = self.next_corr;
        self.next_corr += 1;
        // The caller's own envelope: set in place, not copied.
        Arc::make_mut(&mut env).seq = corr;
        let deadline = now.saturating_add(budget_ms);
        self.due = self.due.min(deadline);
        self.pending.insert(
            corr,
            Pending {
                peer,
                generation,
                service,
                deadline,
                sink,
            },
        );
        Started {
            corr,
            frame: Data::Request { budget_ms, env },
            peer,
            way,
        }
    }

    /// A reply to `corr` arrived from `peer`: the request's bookkeeping, and its answer. Only
    /// the instance the request went to may answer it; a late reply (the request ended) or
    /// one from another peer is dropped.
    pub(crate) fn reply(
        &mut self,
        peer: NodeId,
        corr: u64,
        result: Result<Bytes, String>,
        now: u64,
    ) -> Option<Answer> {
        let Entry::Occupied(entry) = self.pending.entry(corr) else {
            return None;
        };
        if entry.get().peer != peer {
            return None;
        }
        let p = entry.remove();
        self.finish(&p, result.is_ok(), now);
        Some(match p.sink {
            Sink::One(tx) => Answer::One(
                tx,
                result.map_err(|message| RequestError::Remote {
                    service: p.service,
                    message,
                }),
            ),
            Sink::Many(tx) => Answer::Many(tx, peer, result),
        })
    }

    /// Ends the requests whose deadline passed before `now` (none, without a walk, before
    /// [`Requests::due`]): a failure for the breaker, [`RequestError::Timeout`] for a caller
    /// still waiting. A scatter's collector has its own deadline and gets nothing.
    pub(crate) fn expire(&mut self, now: u64) -> Vec<Answer> {
        if now <= self.due {
            return Vec::new();
        }
        let mut due = u64::MAX;
        let mut past = Vec::new();
        for (corr, r) in &self.pending {
            if r.deadline < now {
                past.push(*corr);
            } else {
                due = due.min(r.deadline);
            }
        }
        self.due = due;
        let mut answers = Vec::new();
        for corr in past {
            if let Some(p) = self.pending.remove(&corr) {
                self.finish(&p, false, now);
                if let Sink::One(tx) = p.sink {
                    let error = RequestError::Timeout {
                        service: p.service,
                        after: std::time::Duration::from_millis(0),
                    };
                    answers.push(Answer::One(tx, Err(error)));
                }
            }
        }
        answers
    }

    /// The connection of `generation` to `peer` ended: its route goes, and its requests fail
    /// ([`RequestError::PeerLost`], or an error reply for a scatter).
    pub(crate) fn fail_on(&mut self, peer: NodeId, generation: u64, now: u64) -> Vec<Answer> {
        self.drop_route(peer, generation);
        let lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, r)| r.peer == peer && r.generation == generation)
            .map(|(c, _)| *c)
            .collect();
        let mut answers = Vec::with_capacity(lost.len());
        for corr in lost {
            if let Some(p) = self.pending.remove(&corr) {
                self.finish(&p, false, now);
                answers.push(match p.sink {
                    Sink::One(tx) => {
                        Answer::One(tx, Err(RequestError::PeerLost { service: p.service }))
                    }
                    Sink::Many(tx) => Answer::Many(tx, peer, Err("instance went away".into())),
                });
            }
        }
        self.retired.remove(&generation);
        answers
    }

    /// The connection of `generation` to `peer` is retired: its route goes, and its requests
    /// stay in flight on it (it stays open for their replies). Returns the latest of their
    /// deadlines (`now` if none).
    pub(crate) fn retire(&mut self, peer: NodeId, generation: u64, now: u64) -> u64 {
        self.drop_route(peer, generation);
        let (n, latest) = self
            .pending
            .values()
            .filter(|r| r.peer == peer && r.generation == generation)
            .fold((0, now), |(n, latest), r| (n + 1, latest.max(r.deadline)));
        if n > 0 {
            self.retired.insert(generation, n);
        }
        latest
    }

    /// Takes out the route to `peer` if it is the one of connection `generation` (a newer
    /// connection's route stays).
    fn drop_route(&mut self, peer: NodeId, generation: u64) {
        if self
            .routes
            .get(&peer)
            .is_some_and(|r| r.generation == generation)
        {
            self.routes.remove(&peer);
        }
    }

    /// Requests still waiting on the retired connection of `generation`.
    pub(crate) fn retired_in_flight(&self, generation: u64) -> usize {
        self.retired.get(&generation).copied().unwrap_or(0)
    }

    /// Bookkeeping when a request ends: its connection's and its service's in-flight counts,
    /// and (for a single request) the breaker.
    fn finish(&mut self, p: &Pending, ok: bool, now: u64) {
        match self.routes.get_mut(&p.peer) {
            Some(r) if r.generation == p.generation => {
                r.outstanding = r.outstanding.saturating_sub(1);
            }
            _ => {
                if let Some(n) = self.retired.get_mut(&p.generation) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.retired.remove(&p.generation);
                    }
                }
            }
        }
        if !matches!(p.sink, Sink::One(_)) {
            return;
        }
        if let Some(g) = self.services.get_mut(&p.service) {
            g.in_flight = g.in_flight.saturating_sub(1);
            g.breaker.record(now, ok);
        }
    }

    /// Requests in flight.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Each requested service's breaker and bulkhead, for `status`.
    pub(crate) fn breakers(&self, now: u64) -> impl Iterator<Item = (String, BreakerStatus)> {
        self.services.iter().map(move |(svc, g)| {
            let mut b = g.breaker.clone();
            let (requests, failures) = b.window(now);
            let status = BreakerStatus {
                state: b.state(now),
                requests_in_window: requests,
                failures_in_window: failures,
                in_flight: g.in_flight,
                max_in_flight: self.guards.max_in_flight_per_service,
            };
            (svc.clone(), status)
        })
    }

    /// The node stops: every request ends with [`RequestError::Stopped`] (a scatter's
    /// collector just ends), and new ones fail with it.
    pub(crate) fn stop(&mut self) -> Vec<Answer> {
        self.stopped = true;
        self.routes.clear();
        self.retired.clear();
        self.pending
            .drain()
            .filter_map(|(_, p)| match p.sink {
                Sink::One(tx) => Some(Answer::One(tx, Err(RequestError::Stopped))),
                Sink::Many(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use peerbus_transport::{Connection, Endpoint, EndpointConfig, Identity, Membership, MeshKey};

    use super::*;
    use crate::engine::wire::Kind;

    /// Two endpoints on 127.0.0.1 and a connection between them: the routes' way. The table
    /// never writes on it; every route of these tests shares it.
    struct Net {
        conn: Connection,
        _ends: (Endpoint, Endpoint, Connection),
    }

    async fn net() -> Net {
        let key = MeshKey::generate();
        let endpoint = || {
            let id = Identity::generate().expect("identity");
            let listen = "127.0.0.1:0".parse().expect("addr");
            Endpoint::bind(EndpointConfig::new(
                id,
                Membership::Key(key.clone()),
                listen,
            ))
            .expect("bind")
        };
        let (a, b) = (endpoint(), endpoint());
        let accepting = b.clone();
        let accepted = tokio::spawn(async move {
            let incoming = accepting.accept().await.expect("endpoint open");
            incoming.complete().await.expect("accept")
        });
        let conn = a
            .connect(b.local_addr(), Some(b.node_id()))
            .await
            .expect("connect");
        let other = accepted.await.expect("join");
        Net {
            conn,
            _ends: (a, b, other),
        }
    }

    impl Net {
        fn route(&self, generation: u64, service: &str) -> Route {
            let way = Way {
                direct: Arc::new(DirectStream::new(
                    self.conn.clone(),
                    crate::engine::wire::REQUEST_STREAMS_VERSION,
                )),
                tx: mpsc::channel(1).0,
            };
            Route::new(generation, service.to_string(), true, way)
        }
    }

    fn peer(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    fn request_env() -> Envelope {
        Envelope {
            origin: peer(0),
            log: Default::default(),
            seq: 0,
            kind: Kind::Request,
            destination: "echo".into(),
            key: None,
            headers: Default::default(),
            content_type: None,
            created_at_ms: 0,
            attempt: 1,
            payload: Bytes::from_static(b"ping"),
        }
    }

    type Waiting = oneshot::Receiver<Result<Bytes, RequestError>>;

    /// Starts a request to `service` with `budget_ms` at `now`: its correlation id, the
    /// instance it went to, and where its answer arrives.
    fn start(
        t: &mut Requests,
        service: &str,
        budget_ms: u64,
        now: u64,
    ) -> Result<(u64, NodeId, Waiting), RequestError> {
        let (tx, rx) = oneshot::channel();
        match t.start(service, Arc::new(request_env()), budget_ms, tx, now) {
            Ok(s) => Ok((s.corr, s.peer, rx)),
            Err((e, _)) => Err(e),
        }
    }

    fn table(max_per_service: usize, max_in_flight: usize) -> Requests {
        let guards = Guards {
            breaker: BreakerConfig::default(),
            max_in_flight_per_service: max_per_service,
        };
        Requests::new(guards, max_in_flight)
    }

    /// A table (generous limits) with one route: `peer(1)`, instance of `echo`, on connection
    /// generation 1.
    async fn one_echo() -> (Net, Requests) {
        let net = net().await;
        let mut t = table(100, 100);
        t.link_up(peer(1), net.route(1, "echo"));
        (net, t)
    }

    fn in_flight(t: &Requests, service: &str) -> usize {
        t.breakers(0)
            .find(|(s, _)| s == service)
            .map_or(0, |(_, b)| b.in_flight)
    }

    /// Gives `answer` and returns what its caller got.
    fn answered(answer: Option<Answer>, mut rx: Waiting) -> Result<Bytes, RequestError> {
        answer.expect("an answer").give();
        rx.try_recv().expect("answered")
    }

    #[tokio::test]
    async fn only_the_instance_asked_answers_and_only_once() {
        let net = net().await;
        let mut t = table(8, 100);
        t.link_up(peer(1), net.route(1, "echo"));
        t.link_up(peer(2), net.route(2, "other"));
        let (corr, to, rx) = start(&mut t, "echo", 1_000, 0).expect("started");
        assert_eq!(to, peer(1), "the only instance of `echo`");
        assert_eq!((t.len(), in_flight(&t, "echo")), (1, 1));

        // A reply from another peer, or to a request never made, answers nothing.
        assert!(t.reply(peer(2), corr, Ok(Bytes::new()), 1).is_none());
        assert!(t.reply(peer(1), corr + 100, Ok(Bytes::new()), 1).is_none());
        assert_eq!(t.len(), 1);

        let got = answered(
            t.reply(peer(1), corr, Ok(Bytes::from_static(b"pong")), 2),
            rx,
        );
        assert_eq!(got.expect("the reply"), Bytes::from_static(b"pong"));
        assert_eq!((t.len(), in_flight(&t, "echo")), (0, 0));
        // A second reply (a duplicate, or one that lost a race with the deadline) is dropped.
        assert!(t.reply(peer(1), corr, Ok(Bytes::new()), 3).is_none());

        // An error reply reaches the caller as the service's error.
        let (corr, _, rx) = start(&mut t, "echo", 1_000, 4).expect("started");
        match answered(t.reply(peer(1), corr, Err("no".into()), 5), rx) {
            Err(RequestError::Remote { service, message }) => {
                assert_eq!((service.as_str(), message.as_str()), ("echo", "no"));
            }
            other => panic!("expected a remote error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn requests_go_to_the_least_busy_instance_that_serves_and_takes_new_work() {
        let net = net().await;
        let mut t = table(100, 100);
        for n in 1..=3 {
            t.link_up(peer(n), net.route(u64::from(n), "echo"));
        }
        t.set_serves(peer(3), false);
        let mut count = HashMap::new();
        let mut to_first = Vec::new();
        for i in 0..10 {
            let (corr, to, _rx) = start(&mut t, "echo", 1_000, i).expect("started");
            *count.entry(to).or_insert(0) += 1;
            if to == peer(1) {
                to_first.push(corr);
            }
        }
        assert_eq!(count.get(&peer(1)), Some(&5));
        assert_eq!(count.get(&peer(2)), Some(&5));
        assert_eq!(count.get(&peer(3)), None, "it does not serve");
        // Once the first has answered its five, it is the less busy one.
        for corr in to_first {
            t.reply(peer(1), corr, Ok(Bytes::new()), 10)
                .expect("answered")
                .give();
        }
        for i in 0..5 {
            let (_, to, _rx) = start(&mut t, "echo", 1_000, 10 + i).expect("started");
            assert_eq!(to, peer(1), "request {i} after the replies");
        }
        // One that said goodbye takes no new requests.
        t.set_draining(peer(1));
        for i in 0..4 {
            let (_, to, _rx) = start(&mut t, "echo", 1_000, 10 + i).expect("started");
            assert_eq!(to, peer(2));
        }
        t.set_draining(peer(2));
        assert!(matches!(
            start(&mut t, "echo", 1_000, 20),
            Err(RequestError::NoResponders { .. })
        ));
        assert!(matches!(
            start(&mut t, "nobody", 1_000, 20),
            Err(RequestError::NoResponders { .. })
        ));
    }

    #[tokio::test]
    async fn the_bulkhead_and_the_node_limit_refuse_at_once_and_free_up_as_requests_end() {
        let net = net().await;
        let mut t = table(2, 3);
        t.link_up(peer(1), net.route(1, "echo"));
        t.link_up(peer(2), net.route(2, "web"));
        let (a, _, _ra) = start(&mut t, "echo", 1_000, 0).expect("first");
        let (_b, _, _rb) = start(&mut t, "echo", 1_000, 0).expect("second");
        assert!(matches!(
            start(&mut t, "echo", 1_000, 0),
            Err(RequestError::Bulkhead { limit: 2, .. })
        ));
        let (_c, _, _rc) = start(&mut t, "web", 1_000, 0).expect("another service");
        assert!(matches!(
            start(&mut t, "web", 1_000, 0),
            Err(RequestError::TooManyInFlight { limit: 3 })
        ));
        // A refused request leaves nothing behind.
        assert_eq!(
            (t.len(), in_flight(&t, "echo"), in_flight(&t, "web")),
            (3, 2, 1)
        );
        t.reply(peer(1), a, Ok(Bytes::new()), 1)
            .expect("answered")
            .give();
        assert_eq!(in_flight(&t, "echo"), 1);
        let (_d, _, _rd) = start(&mut t, "echo", 1_000, 2).expect("room again");
    }

    #[tokio::test]
    async fn deadlines_end_requests_on_the_tick_and_the_walk_waits_for_the_earliest() {
        let (_net, mut t) = one_echo().await;
        let (_, _, short) = start(&mut t, "echo", 100, 0).expect("started");
        let (_, _, middle) = start(&mut t, "echo", 150, 0).expect("started");
        let (long, _, long_rx) = start(&mut t, "echo", 1_000, 0).expect("started");
        assert_eq!(t.due, 100);
        assert!(t.expire(100).is_empty(), "due at 100, not past it");
        // At 150 the first is past its deadline, the second only at it.
        let answers = t.expire(150);
        assert_eq!(answers.len(), 1);
        give_all(answers);
        assert!(matches!(
            short.await.expect("answered"),
            Err(RequestError::Timeout { .. })
        ));
        assert_eq!(t.due, 150);
        give_all(t.expire(151));
        assert!(matches!(
            middle.await.expect("answered"),
            Err(RequestError::Timeout { .. })
        ));
        assert_eq!(t.due, 1_000, "the next walk waits for the long one");
        assert!(t.expire(500).is_empty());
        assert_eq!((t.len(), in_flight(&t, "echo")), (1, 1));
        // Its reply, just in time.
        let got = answered(t.reply(peer(1), long, Ok(Bytes::new()), 999), long_rx);
        assert!(got.is_ok());
        assert!(t.expire(2_000).is_empty());
        assert_eq!(t.due, u64::MAX, "nothing left that may come due");
        let failures = t.breakers(2_000).next().expect("echo's breaker").1;
        assert_eq!(
            (failures.requests_in_window, failures.failures_in_window),
            (3, 2)
        );
    }

    #[tokio::test]
    async fn a_connection_that_ends_fails_its_own_requests_only() {
        let (net, mut t) = one_echo().await;
        let (_, _, old) = start(&mut t, "echo", 1_000, 0).expect("started");
        // The peer reconnects: its new connection replaces the route; the request in flight
        // on the old one stays its own.
        t.link_up(peer(1), net.route(2, "echo"));
        let (new_corr, _, new_rx) = start(&mut t, "echo", 1_000, 0).expect("started");
        let answers = t.fail_on(peer(1), 1, 1);
        assert_eq!(answers.len(), 1);
        give_all(answers);
        assert!(matches!(
            old.await.expect("answered"),
            Err(RequestError::PeerLost { .. })
        ));
        // The new connection's route and request are untouched.
        let (_, to, _r) = start(&mut t, "echo", 1_000, 2).expect("the route is there");
        assert_eq!(to, peer(1));
        assert!(answered(t.reply(peer(1), new_corr, Ok(Bytes::new()), 3), new_rx).is_ok());
        // Its end fails the rest.
        let answers = t.fail_on(peer(1), 2, 4);
        assert_eq!(answers.len(), 1);
        give_all(answers);
        assert_eq!((t.len(), in_flight(&t, "echo")), (0, 0));
        assert!(matches!(
            start(&mut t, "echo", 1_000, 5),
            Err(RequestError::NoResponders { .. })
        ));
    }

    #[tokio::test]
    async fn a_retired_connection_keeps_its_requests_until_they_end() {
        let (net, mut t) = one_echo().await;
        let (a, _, ra) = start(&mut t, "echo", 1_000, 0).expect("started");
        let (b, _, _rb) = start(&mut t, "echo", 5_000, 0).expect("started");
        assert_eq!(t.retire(peer(1), 1, 10), 5_000, "the latest deadline on it");
        assert_eq!(t.retired_in_flight(1), 2);
        // No new request goes to it, but its replies still count.
        assert!(matches!(
            start(&mut t, "echo", 1_000, 11),
            Err(RequestError::NoResponders { .. })
        ));
        assert!(answered(t.reply(peer(1), a, Ok(Bytes::new()), 12), ra).is_ok());
        assert_eq!(t.retired_in_flight(1), 1);
        t.reply(peer(1), b, Ok(Bytes::new()), 13)
            .expect("answered")
            .give();
        assert_eq!(t.retired_in_flight(1), 0);
        assert!(
            t.retired.is_empty(),
            "an emptied retired connection is forgotten"
        );
        // A retired connection with nothing in flight is not remembered at all.
        t.link_up(peer(1), net.route(2, "echo"));
        assert_eq!(t.retire(peer(1), 2, 20), 20);
        assert!(t.retired.is_empty());
    }

    #[tokio::test]
    async fn the_guards_kept_are_bounded_and_an_open_breaker_is_never_the_one_forgotten() {
        let net = net().await;
        let mut t = table(100, 2 * MAX_BREAKERS);
        t.link_up(peer(1), net.route(1, "flaky"));
        let min = BreakerConfig::default().min_requests;
        for i in 0..min as u64 {
            start(&mut t, "flaky", 10, i).expect("started");
        }
        give_all(t.expire(100));
        assert!(matches!(
            start(&mut t, "flaky", 10, 101),
            Err(RequestError::BreakerOpen { .. })
        ));
        // As many other services as guards are kept, each with a request in flight: none
        // can be forgotten (the open breaker has nothing in flight, but it is open), so the
        // table holds one guard more than its bound.
        let mut asked = Vec::new();
        for n in 0..=MAX_BREAKERS as u32 {
            let mut id = [7; 32];
            id[..4].copy_from_slice(&n.to_le_bytes());
            let (peer_n, service) = (NodeId::from_bytes(id), format!("s{n}"));
            t.link_up(peer_n, net.route(2 + u64::from(n), &service));
            if n < MAX_BREAKERS as u32 {
                let (corr, _, _rx) = start(&mut t, &service, 60_000, 200).expect("started");
                asked.push((peer_n, corr));
            }
        }
        assert_eq!(t.services.len(), MAX_BREAKERS + 1);
        // One answered: its closed breaker, with nothing in flight, makes room for the next
        // service; the open one stays.
        let (first, corr) = asked[0];
        t.reply(first, corr, Ok(Bytes::new()), 201)
            .expect("answered")
            .give();
        let last = format!("s{MAX_BREAKERS}");
        start(&mut t, &last, 60_000, 202).expect("started");
        assert_eq!(t.services.len(), MAX_BREAKERS + 1);
        assert!(!t.services.contains_key("s0"), "the one that could go went");
        assert!(matches!(
            start(&mut t, "flaky", 10, 203),
            Err(RequestError::BreakerOpen { .. })
        ));
    }

    #[tokio::test]
    async fn a_stopped_table_fails_every_caller_and_takes_no_more() {
        let (_net, mut t) = one_echo().await;
        let (_, _, waiting) = start(&mut t, "echo", 1_000, 0).expect("started");
        give_all(t.stop());
        assert!(matches!(
            waiting.await.expect("answered"),
            Err(RequestError::Stopped)
        ));
        assert_eq!(t.len(), 0);
        assert!(matches!(
            start(&mut t, "echo", 1_000, 1),
            Err(RequestError::Stopped)
        ));
    }
}
