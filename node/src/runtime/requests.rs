//! The requests in flight: one table that callers, lane readers and core share.
//!
//! While few requests are in flight ([`Requests::quiet`]), a caller routes its own request
//! under the table's lock (the instance, the service's bulkhead and breaker, a correlation
//! id) and writes it to that instance's connection itself ([`Started::send_own`]: from a
//! task, on a stream of its own whose reply it reads itself); otherwise core does both
//! ([`Started::send`]). The lane reader a reply arrives on takes its request out under the same lock,
//! does its bookkeeping (in-flight counts, breaker) and answers the caller. Core keeps the
//! table's routes in step with its links, ends the requests whose deadline passed on its
//! tick, fails those of a connection that ended, and sends scatters.
//!
//! *Why:* core owned this state, so every request took a hop through core on its way out,
//! and every reply's bookkeeping waited for core. A lone request made from a task paid for
//! the hop with a wake of tokio's other worker thread (ARCHITECTURE, "Requests").

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt as _;
use peerbus_transport::{CloseCode, FrameReceiver, NodeId};
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
    /// reply channel then.
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
        read_end(&mut self.rx);
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
        match self
            .way
            .direct
            .try_request_stream(&self.frame, &shared.tracker)
        {
            StreamRequest::Sent(rx) => Some(ReplyStream {
                rx,
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
    services: HashMap<String, ServiceGuard>,
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
            services: HashMap::new(),
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
        env: Envelope,
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
        if !self.services.contains_key(service) {
            if self.services.len() >= MAX_BREAKERS {
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
            let guard = ServiceGuard {
                breaker: Breaker::new(self.guards.breaker),
                in_flight: 0,
            };
            self.services.insert(service.to_string(), guard);
        }
        let Some(guard) = self.services.get_mut(service) else {
            return Err(RequestError::NoResponders {
                service: service.to_string(),
            });
        };
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
            let env = env.clone();
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
        mut env: Envelope,
        budget_ms: u64,
        sink: Sink,
        now: u64,
    ) -> Started {
        let corr = self.next_corr;
        self.next_corr += 1;
        env.seq = corr;
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
