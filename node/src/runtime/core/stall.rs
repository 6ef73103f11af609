//! Noticing a connection that a healed network left stalled, and replacing it.
//!
//! While a network path is dark, QUIC resends nothing until its probe timeout fires, and that
//! timeout doubles with every probe that goes unanswered (about 26 ms × 2^k on loopback; quinn
//! has no setting that caps it). After a partition shorter than the idle timeout (3 s), the
//! connection survives, but its next probe can be a second or more after the path came back:
//! until then the entries in flight on it, and every later entry of their keys, wait.
//!
//! So core watches what each connection receives. One that received no datagram for
//! [`STALL_AFTER`] (a healthy one gets the peer's keep-alives, every 500 ms, and the acks of
//! its own) is *stalled*, and a probe task dials the peer again, a fresh QUIC handshake every
//! [`PROBE_INTERVAL`] (or four round trips, when that is longer): a new connection does not
//! wait for the old one's backoff. A handshake
//! that completes (the mesh proof included) shows that the path is back and the peer answers;
//! if the old connection still received nothing, core closes it with [`CloseCode::Stalled`]
//! and handles the close as a lost connection (requests on it fail, and both sides dial at
//! once), except for its entries in flight: they stay the peer's for up to
//! [`RECONNECT_HOLD`], and go out again on its new connection, where its dedup window drops
//! those it had handled (another instance would handle them a second time). The peer, told
//! by the close code, holds what was in flight on its side the same way. A connection that
//! receives again before that is left alone, and its probe stops. The probe connection
//! itself is closed as soon as it is up; the peer sees a handshake that ended before its
//! hello. At most [`MAX_PROBES`] probes run at once (`Status::stall_probes` counts them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use peerbus_transport::{CloseCode, NodeId};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{Core, CoreMsg};
use crate::runtime::Shared;

/// How long a connection may receive no datagram before it counts as stalled (engine ms):
/// twice the keep-alive interval (`DEFAULT_KEEP_ALIVE`, 500 ms), at which a healthy peer
/// sends at least a ping, and a third of the idle timeout (3 s), which closes it for good.
const STALL_AFTER: u64 = 1_000;
/// How often a stalled connection's probe starts a new handshake with the peer, and how long
/// each one may take; four round trips of the connection (as it measured them before the
/// stall) when that is longer, up to [`PROBE_MAX`]. A handshake whose first packet was lost
/// would wait for QUIC's initial probe timeout (about a second); a new one is quicker. At most
/// one probe runs per connection, and it ends with its connection (the idle timeout, 3 s, at
/// the latest), so a stall makes at most 20 handshakes, about 1.2 KB each.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Longest a probe's handshake may take (a path whose round trip is 250 ms or more).
const PROBE_MAX: Duration = Duration::from_secs(1);
/// How long the entries in flight on a replaced connection wait for the peer to reconnect
/// (engine ms) before they go back to waiting, for any instance. The peer has just answered
/// a handshake and both sides dial at once, so it is usually back within a few round trips;
/// on its new connection they go out again and its dedup window drops what it had handled,
/// where another instance would have handled those a second time.
pub(super) const RECONNECT_HOLD: u64 = 1_000;
/// The UDP receive buffer a node asks for while it catches up after a pause (bytes), and for
/// how long ([`Core::catch_up_pause`]). Its default one (208 KiB on Linux) is full of what its
/// peers sent while it did not run, their keep-alives and the stall probes' handshakes, and
/// the replies to its reconnects were dropped until it had read that: a reconnect then waited
/// for QUIC's initial probe timeout, a second (ARCHITECTURE, "Liveness and reconnects").
const CATCH_UP_RX_BUFFER: usize = 2 * 1024 * 1024;
/// See [`CATCH_UP_RX_BUFFER`]: a few round trips of reconnects, with room to spare.
const CATCH_UP_PERIOD: Duration = Duration::from_secs(2);
/// Most probes that run at once on a node: a node whose own network went dark stalls every
/// connection at once, and probing them all would start a handshake per peer every
/// [`PROBE_INTERVAL`]. The others wait for a free slot at a later tick.
pub(super) const MAX_PROBES: usize = 16;

/// What core knows about a connection's received datagrams (a field of its link).
#[derive(Debug)]
pub(super) struct RxWatch {
    /// Datagrams the connection had received when core last looked.
    datagrams: u64,
    /// When that count last moved (engine ms).
    moved_at: u64,
    /// The probe task of a stalled connection (see the module docs), while it runs.
    probe: Option<CancellationToken>,
}

impl RxWatch {
    /// Starts watching at `now`.
    pub(super) fn new(now: u64) -> Self {
        RxWatch {
            datagrams: 0,
            moved_at: now,
            probe: None,
        }
    }
}

impl Core {
    /// Looks at what each connection received since the last tick: starts a probe for one
    /// that received nothing for [`STALL_AFTER`], stops the probe of one that receives again.
    pub(super) fn watch_stalls(&mut self, now: u64) {
        let mut stalled = Vec::new();
        for (peer, l) in &mut self.links {
            let datagrams = l.conn.traffic().datagrams_received;
            let rx = &mut l.rx;
            if datagrams != rx.datagrams {
                rx.datagrams = datagrams;
                rx.moved_at = now;
                if let Some(probe) = rx.probe.take() {
                    debug!(peer = %peer.short(), "connection receives again; probe stopped");
                    probe.cancel();
                }
            } else if now.saturating_sub(rx.moved_at) >= STALL_AFTER && rx.probe.is_none() {
                let Ok(slot) = self.probes.clone().try_acquire_owned() else {
                    continue;
                };
                let token = l.cancel.child_token();
                rx.probe = Some(token.clone());
                let wait = (l.conn.rtt() * 4).clamp(PROBE_INTERVAL, PROBE_MAX);
                stalled.push((*peer, l.generation, l.conn.remote_addr(), wait, token, slot));
            }
        }
        for (peer, generation, addr, wait, token, slot) in stalled {
            debug!(peer = %peer.short(), %addr, "connection stalled; probing the peer");
            let target = ProbeTarget {
                peer,
                generation,
                addr,
            };
            let probe = probe(self.shared.clone(), target, wait, token);
            self.shared.tracker.spawn(async move {
                probe.await;
                drop(slot);
            });
        }
    }

    /// A probe of the connection `generation` to `peer` reached the peer: closes that
    /// connection if it is still the peer's and still receives nothing.
    pub(super) fn peer_reachable(&mut self, peer: NodeId, generation: u64) {
        let now = self.now();
        let Some(l) = self.links.get_mut(&peer) else {
            return;
        };
        if l.generation != generation {
            return;
        }
        l.rx.probe = None;
        if l.conn.traffic().datagrams_received != l.rx.datagrams {
            // It came back on its own while the probe ran.
            return;
        }
        let dark = now.saturating_sub(l.rx.moved_at);
        info!(peer = %peer.short(), dark_ms = dark, "connection stalled while the peer answers a new one; reconnecting");
        self.replace_stalled(
            peer,
            generation,
            "no packets on this connection; the peer answered a new one",
            &format!("connection stalled for {dark} ms after the network came back; reconnecting"),
        );
    }

    /// A new connection from `peer` is up while our link to it received nothing for
    /// [`STALL_AFTER`]: the same proof a probe looks for, that the path is back and the peer
    /// answers. Replaces that link as [`Core::peer_reachable`] does, so that the new
    /// connection becomes the link instead of losing a tie-break to a dead one. The peer
    /// dials again only once it gave up on the old connection (its idle timeout or its own
    /// probe): keeping the old one made it retire the new one, wait for a connection that
    /// never came, and dial once more as this node's probe reconnected too, two dials that
    /// met in another tie-break. (Its probe, if one runs, ends with it.)
    pub(super) fn replace_if_stalled(&mut self, peer: NodeId, incarnation: u64) {
        let now = self.now();
        let Some(l) = self
            .links
            .get(&peer)
            .filter(|l| l.incarnation == incarnation && !l.peer_retired)
        else {
            return;
        };
        // `moved_at` is when a tick last saw the count move: nothing arrived since then
        // when the count is unchanged, so the link is dark for at least `now - moved_at`.
        let dark = now.saturating_sub(l.rx.moved_at);
        if l.conn.traffic().datagrams_received != l.rx.datagrams || dark < STALL_AFTER {
            return;
        }
        let generation = l.generation;
        info!(peer = %peer.short(), dark_ms = dark, "connection stalled while a new one to the peer is up; replacing it");
        self.replace_stalled(
            peer,
            generation,
            "no packets on this connection; a new one is up",
            &format!("connection stalled for {dark} ms while a new one came up"),
        );
    }

    /// Closes `peer`'s connection `generation` with [`CloseCode::Stalled`] (`told`, the
    /// reason the peer reads) and handles it as lost (`why`, the reason logged), except that
    /// what was in flight on it waits [`RECONNECT_HOLD`] for the peer's next connection: the
    /// peer may have handled it, and both sides dial again at once.
    fn replace_stalled(&mut self, peer: NodeId, generation: u64, told: &str, why: &str) {
        if let Some(l) = self.links.get(&peer).filter(|l| l.generation == generation) {
            l.conn.close(CloseCode::Stalled, told);
        }
        let until = self.now() + RECONNECT_HOLD;
        self.peer_gone(peer, generation, why, Some(until));
    }

    /// Handles the pauses the node's watch noticed since core last looked
    /// (`super::super::pause`): this node did not run, and a new epoch began. Nothing that
    /// was in flight could be acked meanwhile, so every ack deadline, and every hold of a
    /// replaced connection, moves on by the pauses' length; then every connection opened
    /// before the epoch is closed as stalled, as [`Core::peer_reachable`] closes one, for the
    /// same reason (the peer may have given up on it) and with the same hold of what was in
    /// flight on it. Runs when the watch says so ([`CoreMsg::Paused`]) or at a tick that comes
    /// first; the second call finds nothing new.
    pub(super) fn catch_up_pause(&mut self) {
        let (epoch, total_ms) = self.shared.pause.noticed();
        let (seen_epoch, seen_ms) = self.pauses_seen;
        if epoch <= seen_epoch {
            return;
        }
        self.pauses_seen = (epoch, total_ms);
        self.shared
            .endpoint
            .widen_receive_buffer(CATCH_UP_RX_BUFFER, CATCH_UP_PERIOD);
        let paused_ms = total_ms.saturating_sub(seen_ms);
        self.outbox.postpone_in_flight(paused_ms);
        for (_, until) in self.held.values_mut() {
            *until = until.saturating_add(paused_ms);
        }
        let fenced: Vec<(NodeId, u64)> = self
            .links
            .iter()
            .filter(|(_, l)| l.opened_in < epoch)
            .map(|(peer, l)| (*peer, l.generation))
            .collect();
        info!(
            paused_ms,
            connections = fenced.len(),
            "replacing the connections that were open while this node did not run"
        );
        let why = format!("this node did not run for {paused_ms} ms; reconnecting");
        for (peer, generation) in fenced {
            self.replace_stalled(
                peer,
                generation,
                "this node did not run for a while; reconnecting",
                &why,
            );
        }
    }

    /// Keeps what was in flight on `peer`'s connection `generation` (replaced, or retired by
    /// the peer) for that peer until `until`: the peer gets no new entries meanwhile, and its
    /// next connection sends them again ([`Core::end_holds`] ends a hold that outlives it).
    pub(super) fn hold_in_flight(&mut self, peer: NodeId, generation: u64, until: u64) {
        self.outbox.peer_draining(peer);
        self.held.insert(peer, (generation, until));
    }

    /// Ends the holds of replaced (or retired) connections whose peer did not reconnect
    /// within [`RECONNECT_HOLD`]: what was in flight to it goes back to waiting, for another
    /// instance (a no-op for a peer that reconnected, which sent it again then).
    pub(super) fn end_holds(&mut self, now: u64) {
        if self.held.is_empty() {
            return;
        }
        let due: Vec<(NodeId, u64)> = self
            .held
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(peer, (generation, _))| (*peer, *generation))
            .collect();
        if due.is_empty() {
            return;
        }
        for (peer, generation) in due {
            self.held.remove(&peer);
            self.outbox.peer_down(peer, generation);
        }
        self.release_backlogs();
    }
}

/// The stalled connection a probe is for.
struct ProbeTarget {
    peer: NodeId,
    generation: u64,
    addr: SocketAddr,
}

/// Dials the peer of a stalled connection, a new handshake every `wait`, until one completes
/// (then tells core, [`CoreMsg::Reachable`]) or `cancel` fires (the connection received again
/// or closed).
async fn probe(
    shared: Arc<Shared>,
    target: ProbeTarget,
    wait: Duration,
    cancel: CancellationToken,
) {
    let ProbeTarget {
        peer,
        generation,
        addr,
    } = target;
    loop {
        let attempt = tokio::time::timeout(wait, shared.endpoint.connect(addr, Some(peer)));
        let res = tokio::select! {
            r = attempt => r,
            () = cancel.cancelled() => return,
        };
        match res {
            Ok(Ok(conn)) => {
                conn.close(CloseCode::Normal, "reachability probe");
                let _ = shared
                    .core
                    .send(CoreMsg::Reachable { peer, generation })
                    .await;
                return;
            }
            // Refused or unreachable at once (a port nobody listens on): wait before the next.
            Ok(Err(e)) => {
                debug!(peer = %peer.short(), error = %e, "probe failed");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = cancel.cancelled() => return,
                }
            }
            // The handshake did not complete in time: start a new one at once.
            Err(_) => {}
        }
    }
}
