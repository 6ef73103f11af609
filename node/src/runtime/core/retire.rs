//! Retiring the loser of a tie-break between two connections to one live peer.
//!
//! Two nodes that find each other at once both dial, and both keep the connection dialled by
//! the smaller id. Either may have taken the other connection first and sent requests on it,
//! so the loser is not closed at once: it is *retired*. No new work goes on it and entries
//! arriving on it are dropped unhandled (their sender redelivers them on the kept connection,
//! as after a close), but its readers and writer run on: replies to the requests it carries,
//! in both directions, still travel on it. Once a side has no request of its own waiting on
//! it, it says so with [`Control::Retired`]; the side that has said it and heard it closes the
//! connection. A retired connection closes at the latest its linger after it was retired
//! (`NodeBuilder::retired_linger`, 30 s by default), or at the deadline of the last request
//! sent on it, ours or the peer's, when that is later (a handler may run for as long as its
//! request's timeout); requests still waiting then fail as on any lost connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use peerbus_transport::{CloseCode, Connection, NodeId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Core, Link, Out};
use crate::engine::wire::Control;
use crate::runtime::conn;

/// How much longer than its linger (`NodeBuilder::retired_linger`, 30 s by default) the
/// deadline of a peer's request can keep a retired connection open (engine ms): the peer
/// chooses the deadline.
const SERVING_HOLD_MAX: u64 = 60 * 60_000;
/// Most retired connections open at once; retiring one more closes the oldest. A tie-break
/// retires at most one connection per pair of nodes, so only peers that dial again and again
/// come near it.
pub(super) const MAX_RETIRING: usize = 256;
/// How long a node whose link the peer retired waits for the peer's kept connection before
/// it dials the peer itself.
const REDIAL_AFTER_RETIRED: Duration = Duration::from_millis(200);

/// A retired connection (see the module docs).
pub(super) struct Retiring {
    pub(super) peer: NodeId,
    /// The peer's run the connection belongs to.
    incarnation: u64,
    conn: Connection,
    tx: mpsc::Sender<Out>,
    pub(super) cancel: CancellationToken,
    /// We sent [`Control::Retired`] on it.
    said: bool,
    /// The peer sent [`Control::Retired`] on it.
    heard: bool,
    /// When it closes at the latest (engine time, ms), unless `serving` is later.
    until: u64,
    /// The latest deadline of the peer's requests that arrived on it (its lane readers raise
    /// it): we may still be answering them, so it stays open until then.
    serving: Arc<AtomicU64>,
}

impl Retiring {
    /// Asks the connection's writer to deliver what it has queued and finish (`Out::Close`):
    /// frames sent just before a link moved to another connection are on this one. The
    /// receiver resolves once the peer acknowledged them, or at once when the writer is gone
    /// or its queue is full.
    pub(super) fn close_writer(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = self.tx.try_send(Out::Close(tx));
        rx
    }

    /// What the connection carried so far.
    pub(super) fn traffic(&self) -> peerbus_transport::Traffic {
        self.conn.traffic()
    }

    /// When it closes at the latest: its linger after it was retired, or later at the
    /// deadline of a request sent on it, ours or the peer's (a peer's by at most
    /// [`SERVING_HOLD_MAX`] more).
    fn closes_at(&self) -> u64 {
        let serving = self.serving.load(Ordering::Relaxed);
        self.until
            .max(serving.min(self.until.saturating_add(SERVING_HOLD_MAX)))
    }
}

impl Core {
    /// Retires `old`, the connection to `peer` that lost the tie-break to a newer one (or that
    /// the peer retired: `heard`). The caller took it out of the links and the outbox.
    pub(super) fn retire(&mut self, peer: NodeId, old: Link, heard: bool) {
        old.gone.store(true, Ordering::Release);
        let now = self.now();
        let latest = crate::runtime::lock(&self.shared.requests).retire(peer, old.generation, now);
        let retiring = Retiring {
            peer,
            incarnation: old.incarnation,
            conn: old.conn,
            tx: old.tx,
            cancel: old.cancel,
            said: false,
            heard,
            until: now
                .saturating_add(self.shared.retired_linger_ms)
                .max(latest),
            serving: old.serving,
        };
        self.add_retiring(old.generation, retiring);
    }

    /// Retires a newly arrived connection that lost the tie-break to the one we have: it
    /// runs like any connection, without being registered as the peer's link.
    pub(super) fn retire_new(&mut self, r: conn::Ready) {
        let handles = self.connection_handles(&r, true);
        let generation = handles.generation;
        let retiring = Retiring {
            peer: r.hello.node_id,
            incarnation: r.hello.incarnation,
            conn: r.conn.clone(),
            tx: handles.out.clone(),
            cancel: handles.cancel.clone(),
            said: false,
            heard: false,
            until: self.now().saturating_add(self.shared.retired_linger_ms),
            serving: handles.serving.clone(),
        };
        conn::spawn_connection(self.shared.clone(), r, handles);
        self.add_retiring(generation, retiring);
    }

    fn add_retiring(&mut self, generation: u64, retiring: Retiring) {
        if self.retiring.len() >= MAX_RETIRING
            && let Some(oldest) = self.retiring.keys().min().copied()
        {
            warn!(
                limit = MAX_RETIRING,
                "too many retired connections open; closing the oldest"
            );
            self.close_retired(oldest);
        }
        self.connections_retired += 1;
        self.retiring.insert(generation, retiring);
        self.settle_retired(generation);
    }

    /// Settles every retired connection (on core's tick): the requests that waited on one
    /// may have ended since (their replies are taken by lane readers, which do not tell
    /// core), so it may now be done.
    pub(super) fn settle_all_retired(&mut self) {
        if self.retiring.is_empty() {
            return;
        }
        let generations: Vec<u64> = self.retiring.keys().copied().collect();
        for g in generations {
            self.settle_retired(g);
        }
    }

    /// Our requests sent on the retired connection of `generation` and still waiting for
    /// their replies.
    fn retired_requests(&self, generation: u64) -> usize {
        crate::runtime::lock(&self.shared.requests).retired_in_flight(generation)
    }

    /// The peer sent [`Control::Retired`] on the connection of `generation`.
    pub(super) fn on_retired(&mut self, peer: NodeId, generation: u64) {
        if let Some(r) = self.retiring.get_mut(&generation) {
            if r.peer == peer {
                r.heard = true;
                self.settle_retired(generation);
            }
        } else if self
            .links
            .get(&peer)
            .is_some_and(|l| l.generation == generation)
        {
            self.link_retired_by_peer(peer);
        }
    }

    /// The peer retired the connection we use as our link to it: it keeps another one, which
    /// is usually on its way to us (its handshake finished on the peer's side first).
    /// Deliveries sent on this one would be dropped there, so the outbox stops using it; what
    /// was in flight on it waits up to `RECONNECT_HOLD` (1 s) to go out again on the kept one.
    /// The peer still answers requests on it, so it stays our link for them until the kept one
    /// arrives and replaces it (`Core::peer_ready`). Should none come (the one the peer keeps
    /// may be dead on our side), we dial the peer after [`REDIAL_AFTER_RETIRED`]; the kept
    /// one's arrival cancels that dial.
    fn link_retired_by_peer(&mut self, peer: NodeId) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        if link.peer_retired {
            return;
        }
        debug!(peer = %peer.short(), "the peer retired the connection we use");
        link.peer_retired = true;
        link.gone.store(true, Ordering::Release);
        let (generation, addr) = (link.generation, link.conn.remote_addr());
        if self.closing {
            self.outbox.peer_down(peer, generation);
            return;
        }
        // What was in flight on it waits for the kept connection, as after a stall (the peer
        // lives on, and its dedup window drops what it had handled): put back to waiting at
        // once, a key's entries went to another instance. Both sides dial at once after a
        // stalled connection is replaced, so this follows a replacement often.
        let until = self.now().saturating_add(super::stall::RECONNECT_HOLD);
        self.hold_in_flight(peer, generation, until);
        if self.known.get(&peer).is_some_and(|k| k.advertised) {
            self.start_dial_after(peer, REDIAL_AFTER_RETIRED);
        }
        if self.seeds.contains(&addr) {
            self.spawn_seed_dial(addr, REDIAL_AFTER_RETIRED);
        }
    }

    /// Says [`Control::Retired`] once no request of ours waits on the connection, and closes
    /// it once the peer said it too.
    fn settle_retired(&mut self, generation: u64) {
        if self.retired_requests(generation) > 0 {
            return;
        }
        let Some(r) = self.retiring.get_mut(&generation) else {
            return;
        };
        if !r.said {
            r.said = true;
            if r.tx.try_send(Out::Control(Control::Retired)).is_err() {
                // A full queue on a connection that only carries replies: the peer stopped
                // reading it.
                self.close_retired(generation);
                return;
            }
        }
        if r.heard {
            self.close_retired(generation);
        }
    }

    /// Closes the retired connection of `generation`; requests still waiting on it fail.
    pub(super) fn close_retired(&mut self, generation: u64) {
        let Some(r) = self.retiring.remove(&generation) else {
            return;
        };
        r.conn
            .close(CloseCode::DuplicateConnection, "retired connection closed");
        r.cancel.cancel();
        self.bank_traffic(r.peer, &r.conn);
        let requests = self.retired_requests(generation);
        if requests > 0 {
            debug!(peer = %r.peer.short(), requests, "retired connection closed with requests waiting");
        }
        self.fail_requests_on(r.peer, generation);
    }

    /// Closes the retired connections to `peer` from another run of it than `incarnation`:
    /// they are dead.
    pub(super) fn close_retired_of(&mut self, peer: NodeId, incarnation: u64) {
        let doomed: Vec<u64> = self
            .retiring
            .iter()
            .filter(|(_, r)| r.peer == peer && r.incarnation != incarnation)
            .map(|(g, _)| *g)
            .collect();
        for g in doomed {
            self.close_retired(g);
        }
    }

    /// Whether a retired connection to `peer` is open.
    pub(super) fn has_retired(&self, peer: NodeId) -> bool {
        self.retiring.values().any(|r| r.peer == peer)
    }

    /// Closes retired connections whose time is up.
    pub(super) fn expire_retired(&mut self, now: u64) {
        if self.retiring.is_empty() {
            return;
        }
        let due: Vec<u64> = self
            .retiring
            .iter()
            .filter(|(_, r)| r.closes_at() <= now)
            .map(|(g, _)| *g)
            .collect();
        for g in due {
            if let Some(r) = self.retiring.get(&g) {
                let requests = self.retired_requests(g);
                debug!(peer = %r.peer.short(), requests, said = r.said, heard = r.heard, "retired connection open too long; closing it");
            }
            self.close_retired(g);
        }
    }
}
