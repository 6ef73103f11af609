//! Noticing that this node did not run for a while, and fencing the connections that were open
//! across it.
//!
//! A node can stop running while its peers go on: its process was stopped (`SIGSTOP`, a
//! debugger), its VM or container was paused, or every thread of its runtime was blocked.
//! Nothing it had received is lost, but while it did not run its QUIC endpoint sent no acks or
//! keep-alives, so a peer may have timed its connection out (the idle timeout, 3 s) and given
//! what was in flight on it to another instance. Once the node runs again it would handle the
//! entries queued for its handlers, and those its socket buffered meanwhile, although the
//! other instance had handled them already, and after newer entries of their keys: the key
//! goes back in time for a consumer that keeps state per key (docs/CHAOS.md, finding 4).
//!
//! So a task beats every [`BEAT`]; a beat that comes [`PAUSE`] or more after the one before
//! means the node did not run meanwhile (a paused process; a tokio timer is not that late on a
//! runtime that runs). It starts a new *epoch*, and core closes every connection opened in an
//! earlier one with [`CloseCode::Stalled`](peerbus_transport::CloseCode::Stalled), as it closes
//! a stalled connection (`core/stall.rs`): both sides dial again at once, and what either had
//! in flight on the old connection waits for the peer's new one, where the peer's dedup window
//! drops what was handled. Until then nothing that arrived on a connection of an earlier epoch
//! reaches a handler ([`PauseWatch::fences`]), and neither does anything that arrives while
//! the beat is overdue: after a pause the handler workers may run before this task does.
//! As a sender, core moves its ack deadlines on by the pause and times nothing out while the
//! beat is overdue (`Core::catch_up_pause`): no ack could be read meanwhile, and the peers
//! that had its entries get them again on their new connections.
//!
//! A shorter pause changes nothing: no peer gave up on the node, and a peer that found the
//! connection stalled (`core/stall.rs`) keeps what was in flight on it for the node. What it
//! costs: one timer wake-up every [`BEAT`] per node, and after a pause of [`PAUSE`] or more a
//! reconnect to every peer, which fails the requests in flight on the old connections
//! (`peer_lost`), as a stalled connection's replacement does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

use super::Shared;
use super::core::CoreMsg;

/// How often the watch beats.
pub(crate) const BEAT: Duration = Duration::from_millis(250);
/// The shortest time between two beats that counts as a pause. A peer gives up on a
/// connection that received nothing for the idle timeout (3 s), and the node's last datagram
/// before a pause may be one keep-alive interval (500 ms) older than the pause: so a peer may
/// have given up after a pause of 2.5 s, never after a shorter one. The beats around a pause
/// are at least the pause apart and at most one [`BEAT`] more, so this notices every pause of
/// 2 s or more (every one after which a peer may have given up) and some of 1.75–2 s. (At a
/// second, every freeze of 1.2–2.4 s in a chaos run replaced the node's connections, and 145
/// requests failed as `peer_lost` where none had without: ARCHITECTURE.)
pub(crate) const PAUSE: Duration = Duration::from_millis(2_000);

/// The node's pause watch: when it last beat, and how many pauses it noticed.
#[derive(Debug)]
pub(crate) struct PauseWatch {
    /// The watch's clock starts here.
    origin: Instant,
    /// When the watch last beat (ms since `origin`).
    beat_ms: AtomicU64,
    /// Pauses noticed so far: the current epoch.
    epoch: AtomicU64,
    /// The pauses noticed so far, summed (ms between the beats around each).
    paused_ms: AtomicU64,
}

impl PauseWatch {
    /// A watch that beat just now, in epoch 0.
    pub(crate) fn new() -> Self {
        PauseWatch {
            origin: Instant::now(),
            beat_ms: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            paused_ms: AtomicU64::new(0),
        }
    }

    /// The current epoch: the number of pauses noticed so far. A connection records the one it
    /// opened in.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The pauses noticed so far: the current epoch, and their lengths summed (ms). The sum
    /// may already hold a pause whose epoch is not counted yet (the next call has it).
    pub(crate) fn noticed(&self) -> (u64, u64) {
        let epoch = self.epoch();
        (epoch, self.paused_ms.load(Ordering::Acquire))
    }

    /// Whether the watch has not beaten for [`PAUSE`] at `now`: the node has just run again
    /// after a pause that the watch has not seen yet, or is still in it.
    pub(crate) fn overdue(&self, now: Instant) -> bool {
        self.ms(now)
            .saturating_sub(self.beat_ms.load(Ordering::Acquire))
            >= pause_ms()
    }

    /// Whether an entry that came on a connection opened in epoch `opened_in` must not reach a
    /// handler: a pause was noticed since that connection opened, or one is under way (no
    /// beat for [`PAUSE`]), which only a connection of an earlier epoch can have outlived.
    pub(crate) fn fences(&self, opened_in: u64) -> bool {
        self.fences_at(opened_in, Instant::now())
    }

    /// [`PauseWatch::fences`] at `now`.
    pub(crate) fn fences_at(&self, opened_in: u64, now: Instant) -> bool {
        // The beat first: the watch starts a new epoch before it beats again.
        self.overdue(now) || self.epoch() > opened_in
    }

    /// Beats at `now`; returns the time since the last beat (ms, at most one [`BEAT`] longer
    /// than the node did not run) if that was a pause, after starting a new epoch.
    fn beat(&self, now: Instant) -> Option<u64> {
        let now = self.ms(now);
        let gap = now.saturating_sub(self.beat_ms.load(Ordering::Acquire));
        let paused = (gap >= pause_ms()).then(|| {
            // The length first, so that whoever sees the new epoch sees it too.
            self.paused_ms.fetch_add(gap, Ordering::AcqRel);
            self.epoch.fetch_add(1, Ordering::AcqRel);
            gap
        });
        self.beat_ms.store(now, Ordering::Release);
        paused
    }

    fn ms(&self, at: Instant) -> u64 {
        duration_ms(at.saturating_duration_since(self.origin))
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn pause_ms() -> u64 {
    duration_ms(PAUSE)
}

/// The watch task: beats every [`BEAT`] until the node stops, and tells core of each pause
/// ([`CoreMsg::Paused`]).
pub(crate) async fn watch(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(BEAT) => {}
            () = shared.cancel.cancelled() => return,
        }
        let Some(paused_ms) = shared.pause.beat(Instant::now()) else {
            continue;
        };
        shared.counters.pauses.fetch_add(1, Ordering::Relaxed);
        warn!(
            paused_ms,
            "this node did not run for {paused_ms} ms (stopped, paused, or its runtime blocked); \
             replacing the connections that were open, whose peers may have given up on it"
        );
        if shared.core.send(CoreMsg::Paused).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_beat_starts_an_epoch_and_fences_older_connections() {
        let w = PauseWatch::new();
        let t0 = w.origin;
        assert!(!w.fences(0), "a connection of this epoch");
        // On time, and late by less than a pause: nothing.
        assert_eq!(w.beat(t0 + BEAT), None);
        let last = BEAT + PAUSE - Duration::from_millis(1);
        assert_eq!(w.beat(t0 + last), None);
        assert_eq!(w.epoch(), 0);
        // A pause and more since the last beat.
        let late = last + PAUSE + Duration::from_millis(500);
        assert_eq!(
            w.beat(t0 + late),
            Some(duration_ms(PAUSE + Duration::from_millis(500)))
        );
        assert_eq!(w.epoch(), 1);
        assert_eq!(
            w.noticed(),
            (1, duration_ms(PAUSE + Duration::from_millis(500))),
            "core reads the pause's length with its epoch"
        );
        assert!(w.fences(0), "a connection opened before the pause");
        // The watch's clock is the test's `t0 + late`, in the future of the real clock: the
        // beat is not overdue, so only the epoch decides.
        assert!(!w.fences(1), "a connection opened after it");
    }

    #[test]
    fn an_overdue_beat_fences_every_connection_before_the_watch_runs() {
        let w = PauseWatch::new();
        // The watch last beat a pause ago, and has not run since.
        let origin = w.origin;
        let w = PauseWatch {
            origin: origin.checked_sub(PAUSE).expect("an instant a pause ago"),
            ..w
        };
        assert_eq!(w.epoch(), 0);
        assert!(w.overdue(Instant::now()), "core's tick waits for the watch");
        assert!(w.fences(0), "fenced while the beat is overdue");
        assert!(w.beat(Instant::now()).is_some(), "then the watch notices");
        assert!(w.fences(0) && !w.fences(1));
        assert!(!w.overdue(Instant::now()));
    }
}
