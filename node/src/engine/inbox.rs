//! Receiver-side delivery state: the dedup window per `(origin, log)` and
//! the per-key block that keeps a failed key's later entries from overtaking it.
//!
//! Invariant: an entry reaches a handler only through [`Inbox::admit`]
//! returning [`Admit::Handle`], and at most once per window unless the window
//! was forced to forget it (see [`MAX_HANDLED_PER_WINDOW`]).

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};

use peerbus_transport::NodeId;

/// The inbox's maps: foldhash like [`super::FastMap`], from hashbrown so an entry is found by a
/// borrowed `(origin, &log, …)` key: admitting and completing an entry allocates nothing.
type Map<K, V> = hashbrown::HashMap<K, V, foldhash::fast::RandomState>;
type Set<K> = hashbrown::HashSet<K, foldhash::fast::RandomState>;

/// Owned map key: an `(origin, log)` window, optionally narrowed to one seq or one key.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Owned<T> {
    origin: NodeId,
    log: String,
    rest: T,
}

/// The borrowed form of [`Owned`], for lookups.
struct Borrowed<'a, T> {
    origin: NodeId,
    log: &'a str,
    rest: T,
}

// `String` hashes as its `str`, so both forms hash alike (hashbrown's `Equivalent` contract).
impl<T: Hash> Hash for Owned<T> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self.origin, self.log.as_str(), &self.rest).hash(h);
    }
}

impl<T: Hash> Hash for Borrowed<'_, T> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self.origin, self.log, &self.rest).hash(h);
    }
}

impl<R: PartialEq<T>, T> hashbrown::Equivalent<Owned<T>> for Borrowed<'_, R> {
    fn equivalent(&self, k: &Owned<T>) -> bool {
        self.origin == k.origin && self.rest == k.rest && self.log == k.log
    }
}

impl<R: Copy, T: From<R>> From<&Borrowed<'_, R>> for Owned<T> {
    fn from(b: &Borrowed<'_, R>) -> Self {
        Owned {
            origin: b.origin,
            log: b.log.to_string(),
            rest: T::from(b.rest),
        }
    }
}

fn at<T>(origin: NodeId, log: &str, rest: T) -> Borrowed<'_, T> {
    Borrowed { origin, log, rest }
}

/// The value of `key` in `map`, inserting `value` first when it has none (the key is only
/// copied then).
fn get_or_insert<'m, R, T, V>(
    map: &'m mut Map<Owned<T>, V>,
    key: &Borrowed<'_, R>,
    value: V,
) -> &'m mut V
where
    R: Copy + Hash + PartialEq<T>,
    T: Hash + Eq + From<R>,
{
    match map.entry_ref(key) {
        hashbrown::hash_map::EntryRef::Occupied(o) => o.into_mut(),
        hashbrown::hash_map::EntryRef::Vacant(v) => v.insert_with_key(key.into(), value),
    }
}

/// Most handled sequence numbers remembered above a window's floor. The
/// origin advances the floor as its log settles, so this is only reached when
/// one key of a log is stuck at the origin for a long time. Past it the oldest
/// handled seq is forgotten: a later retransmission of exactly that seq would
/// reach the handler again (a duplicate, never a loss).
pub const MAX_HANDLED_PER_WINDOW: usize = 100_000;

/// Most dedup windows (distinct `(origin, log)` pairs) kept. Past it the
/// [`EVICTED_WINDOWS`] least recently used windows with no entry being handled
/// are dropped (duplicates possible for their retransmissions, never loss).
pub const MAX_WINDOWS: usize = 65_536;

/// Windows dropped at once when [`MAX_WINDOWS`] is reached. Finding the least
/// recently used windows walks all of them, so dropping a sixteenth at a time
/// does that walk once per 4,096 new windows instead of once per new window
/// (`cargo run --release -p peerbus-node --example inbox_bench`).
pub const EVICTED_WINDOWS: usize = MAX_WINDOWS / 16;

/// Most keys blocked behind a failed entry at once. Past it new failures are
/// still nacked but do not block their key; order for such a key then relies
/// on the origin's own gating.
pub const MAX_BLOCKED_KEYS: usize = 100_000;

/// Most refused entries the blocked keys wait for, over all keys (see [`Inbox`]'s `blocked`).
/// Under load a blocked key waits for about as many as the origin had in flight to this node
/// when the key failed. Past it a refused entry is still nacked but not waited for; order for
/// its key then relies on the origin's own gating, as past [`MAX_BLOCKED_KEYS`].
pub const MAX_HOLES: usize = 1_000_000;

/// What to do with an arriving entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Run the handler.
    Handle,
    /// Already handled: acknowledge again, do not run the handler.
    Duplicate,
    /// A copy is being handled right now: ignore this one (its ack will follow).
    InProgress,
    /// An earlier entry of the same key failed, or was refused because of such a failure, and
    /// has not come back yet: nack.
    Blocked {
        /// The first refused seq this key waits for.
        behind: u64,
    },
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Window {
    floor: u64,
    handled: BTreeSet<u64>,
    /// The entries of this window a handler is running for (kept in the window so admitting an
    /// entry copies no log name; its capacity is kept, so a busy window allocates nothing).
    in_progress: Set<u64>,
    stamp: u64,
}

/// Identifies one entry at a receiver.
pub type EntryRef<'a> = (NodeId, &'a str, u64);

/// Receiver-side dedup and key-block state.
#[derive(Debug, Default)]
pub struct Inbox {
    /// Dedup window per `(origin, log)`, with the entries being handled. A window with an
    /// entry being handled is never evicted, so there are at most [`MAX_WINDOWS`] plus the
    /// number of entries being handled.
    windows: Map<Owned<()>, Window>,
    /// Per `(origin, log, key)`: the refused seqs the key waits for (its *holes*): one that
    /// failed or was dropped stale, and every later one of the key refused while it waited.
    /// The key's entries below the first hole are handled; the first hole is handled when it
    /// comes back; any other entry is refused (nacked) and becomes a hole itself. The origin
    /// sends a key's refused entries again in order, so they come back in order; a hole the
    /// origin settled meanwhile (below its key floor) is forgotten. *Why every refused one:*
    /// waiting only for the failed seq let entries the origin had sent before it heard of the
    /// refusals overtake the refused ones once the failed one came back (the engine
    /// simulation, `handler_failures_are_retried_in_key_order`, seed 38).
    blocked: Map<Owned<String>, BTreeSet<u64>>,
    /// Holes over all blocked keys (at most [`MAX_HOLES`]).
    holes: usize,
    /// Entries a handler is running for, over all windows.
    in_progress: usize,
    clock: u64,
}

/// A persisted dedup window, as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WindowSnapshot {
    /// Origin node.
    pub origin: NodeId,
    /// Origin's log name.
    pub log: String,
    /// Everything below is settled at the origin.
    pub floor: u64,
    /// Handled seqs at or above the floor.
    pub handled: Vec<u64>,
}

impl Inbox {
    /// An empty inbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Restores windows persisted by an earlier run.
    pub fn restore(snapshots: impl IntoIterator<Item = WindowSnapshot>) -> Self {
        let mut inbox = Self::new();
        for s in snapshots {
            // Restored in order, each as used once: eviction drops the first ones first.
            inbox.clock += 1;
            inbox.windows.insert(
                Owned {
                    origin: s.origin,
                    log: s.log,
                    rest: (),
                },
                Window {
                    floor: s.floor,
                    handled: s.handled.into_iter().collect(),
                    stamp: inbox.clock,
                    ..Window::default()
                },
            );
        }
        inbox
    }

    /// The current state of one window, for persisting.
    pub fn snapshot(&self, origin: NodeId, log: &str) -> Option<WindowSnapshot> {
        self.windows
            .get(&at(origin, log, ()))
            .map(|w| WindowSnapshot {
                origin,
                log: log.to_string(),
                floor: w.floor,
                handled: w.handled.iter().copied().collect(),
            })
    }

    /// Decides what to do with entry `seq` of `(origin, log)`.
    ///
    /// `floor` and `key_floor` come from the origin (see [`crate::engine::wire::Data::Deliver`]).
    pub fn admit(
        &mut self,
        (origin, log, seq): EntryRef<'_>,
        floor: u64,
        key: Option<&str>,
        key_floor: Option<u64>,
    ) -> Admit {
        self.clock += 1;
        let stamp = self.clock;
        let wkey = at(origin, log, ());
        if self.windows.len() >= MAX_WINDOWS && !self.windows.contains_key(&wkey) {
            self.evict_windows();
        }
        // One lookup of the window serves the whole decision.
        let w = get_or_insert(&mut self.windows, &wkey, Window::default());
        w.stamp = stamp;
        if floor > w.floor {
            w.floor = floor;
            // In place: `split_off` built a new tree each time the floor moved (every entry).
            while w.handled.first().is_some_and(|&s| s < floor) {
                w.handled.pop_first();
            }
        }
        if seq < w.floor || w.handled.contains(&seq) {
            return Admit::Duplicate;
        }
        if w.in_progress.contains(&seq) {
            return Admit::InProgress;
        }
        if let Some(k) = key {
            let bkey = at(origin, log, k);
            if let Some(holes) = self.blocked.get_mut(&bkey) {
                // What the origin settled (below its key floor) does not come back.
                if let Some(kf) = key_floor {
                    while holes.first().is_some_and(|&h| h < kf) {
                        holes.pop_first();
                        self.holes -= 1;
                    }
                }
                match holes.first().copied() {
                    Some(first) if seq > first => {
                        if self.holes < MAX_HOLES && holes.insert(seq) {
                            self.holes += 1;
                        }
                        return Admit::Blocked { behind: first };
                    }
                    Some(first) if seq == first => {
                        holes.pop_first();
                        self.holes -= 1;
                    }
                    // Earlier than every hole (or none left): handled, in order.
                    _ => {}
                }
                if holes.is_empty() {
                    self.blocked.remove(&bkey);
                }
            }
        }
        w.in_progress.insert(seq);
        self.in_progress += 1;
        Admit::Handle
    }

    /// Records the outcome of a handler run started by [`Inbox::admit`].
    pub fn complete(&mut self, (origin, log, seq): EntryRef<'_>, key: Option<&str>, ok: bool) {
        let wkey = at(origin, log, ());
        if ok {
            let w = get_or_insert(&mut self.windows, &wkey, Window::default());
            if w.in_progress.remove(&seq) {
                self.in_progress -= 1;
            }
            if seq >= w.floor {
                w.handled.insert(seq);
                if w.handled.len() > MAX_HANDLED_PER_WINDOW {
                    w.handled.pop_first();
                }
            }
            return;
        }
        if let Some(w) = self.windows.get_mut(&wkey)
            && w.in_progress.remove(&seq)
        {
            self.in_progress -= 1;
        }
        if let Some(k) = key {
            self.hold(origin, log, k, seq);
        }
    }

    /// Makes `seq` a hole of its key: the key's later entries are refused until it is back.
    fn hold(&mut self, origin: NodeId, log: &str, key: &str, seq: u64) {
        let bkey = at(origin, log, key);
        if self.holes >= MAX_HOLES
            || (self.blocked.len() >= MAX_BLOCKED_KEYS && !self.blocked.contains_key(&bkey))
        {
            return;
        }
        if get_or_insert(&mut self.blocked, &bkey, BTreeSet::new()).insert(seq) {
            self.holes += 1;
        }
    }

    /// Records that entry `seq` was dropped before its handler started because its sender had
    /// already timed it out (it waited locally for the ack timeout, on a connection that is
    /// still up). Nothing is remembered about the entry itself, so its redelivery is handled
    /// as if this copy never arrived. Its key, if it has one and the entry is neither handled
    /// nor being handled, is blocked behind it as after a failure: later entries of the key
    /// queued behind the dropped one are nacked instead of overtaking its redelivery. The
    /// block ends like any other (the entry comes back, or `key_floor` passes it).
    pub fn drop_stale(&mut self, (origin, log, seq): EntryRef<'_>, key: Option<&str>) {
        let Some(k) = key else { return };
        let known = self.windows.get(&at(origin, log, ())).is_some_and(|w| {
            seq < w.floor || w.handled.contains(&seq) || w.in_progress.contains(&seq)
        });
        if known {
            return;
        }
        self.hold(origin, log, k, seq);
    }

    /// Forgets entries being handled for a connection that went away, so
    /// their redelivery is handled (the handler's outcome still counts).
    pub fn is_in_progress(&self, (origin, log, seq): EntryRef<'_>) -> bool {
        self.windows
            .get(&at(origin, log, ()))
            .is_some_and(|w| w.in_progress.contains(&seq))
    }

    /// Whether no entry is being handled right now.
    pub fn is_idle(&self) -> bool {
        self.in_progress == 0
    }

    /// Drops the [`EVICTED_WINDOWS`] least recently used windows with no entry being handled
    /// (one whose entries are all idle can always be rebuilt from the origin's floor; dropping
    /// one with a handler running would let a redelivered copy run beside it). Stamps are
    /// unique, so no more than that many go.
    fn evict_windows(&mut self) {
        let mut stamps: Vec<u64> = self
            .windows
            .values()
            .filter(|w| w.in_progress.is_empty())
            .map(|w| w.stamp)
            .collect();
        let Some(last) = EVICTED_WINDOWS.min(stamps.len()).checked_sub(1) else {
            return;
        };
        let (_, &mut cutoff, _) = stamps.select_nth_unstable(last);
        self.windows
            .retain(|_, w| !(w.in_progress.is_empty() && w.stamp <= cutoff));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a() -> NodeId {
        NodeId::from_bytes([1; 32])
    }

    #[test]
    fn duplicates_are_recognised_until_the_floor_passes() {
        let mut i = Inbox::new();
        assert_eq!(i.admit((a(), "svc:x", 5), 0, None, None), Admit::Handle);
        assert_eq!(i.admit((a(), "svc:x", 5), 0, None, None), Admit::InProgress);
        i.complete((a(), "svc:x", 5), None, true);
        assert_eq!(i.admit((a(), "svc:x", 5), 0, None, None), Admit::Duplicate);
        // Origin says all below 6 is settled: still a duplicate, and the set is pruned.
        assert_eq!(i.admit((a(), "svc:x", 5), 6, None, None), Admit::Duplicate);
        assert_eq!(i.snapshot(a(), "svc:x").map(|s| s.handled.len()), Some(0));
        assert_eq!(i.admit((a(), "svc:x", 7), 6, None, None), Admit::Handle);
    }

    #[test]
    fn a_failed_key_waits_for_every_entry_it_refused_not_only_the_failed_one() {
        let mut i = Inbox::new();
        assert_eq!(i.admit((a(), "l", 1), 0, Some("k"), Some(1)), Admit::Handle);
        i.complete((a(), "l", 1), Some("k"), false);
        // seq 2 of the same key was pipelined: it must wait for 1.
        assert_eq!(
            i.admit((a(), "l", 2), 0, Some("k"), Some(1)),
            Admit::Blocked { behind: 1 }
        );
        // Other keys flow.
        assert_eq!(
            i.admit((a(), "l", 3), 0, Some("other"), Some(3)),
            Admit::Handle
        );
        // 1 comes back and is handled; 2 has not come back yet.
        assert_eq!(i.admit((a(), "l", 1), 0, Some("k"), Some(1)), Admit::Handle);
        i.complete((a(), "l", 1), Some("k"), true);
        // 4, which the origin sent before it heard that 2 was refused, must not overtake 2.
        assert_eq!(
            i.admit((a(), "l", 4), 0, Some("k"), Some(2)),
            Admit::Blocked { behind: 2 }
        );
        // They come back in order.
        assert_eq!(i.admit((a(), "l", 2), 0, Some("k"), Some(2)), Admit::Handle);
        i.complete((a(), "l", 2), Some("k"), true);
        assert_eq!(i.admit((a(), "l", 4), 0, Some("k"), Some(4)), Admit::Handle);
        i.complete((a(), "l", 4), Some("k"), true);
        assert_eq!(i.admit((a(), "l", 5), 0, Some("k"), Some(5)), Admit::Handle);
        assert_eq!(i.holes, 0);
        assert!(i.blocked.is_empty());
    }

    #[test]
    fn an_entry_before_every_hole_is_handled_and_the_holes_stay() {
        let mut i = Inbox::new();
        i.drop_stale((a(), "l", 5), Some("k"));
        // 3 is earlier than the hole: handling it keeps the key in order.
        assert_eq!(i.admit((a(), "l", 3), 0, Some("k"), Some(3)), Admit::Handle);
        i.complete((a(), "l", 3), Some("k"), true);
        assert_eq!(
            i.admit((a(), "l", 7), 0, Some("k"), Some(5)),
            Admit::Blocked { behind: 5 }
        );
        // The origin settled 5 and 7 elsewhere: its key floor passes both holes.
        assert_eq!(i.admit((a(), "l", 9), 0, Some("k"), Some(9)), Admit::Handle);
        assert_eq!(i.holes, 0);
    }

    #[test]
    fn dead_lettered_head_unblocks_its_key() {
        let mut i = Inbox::new();
        assert_eq!(i.admit((a(), "l", 1), 0, Some("k"), Some(1)), Admit::Handle);
        i.complete((a(), "l", 1), Some("k"), false);
        // The origin gave up on 1 (dead letter): key_floor moves past it.
        assert_eq!(i.admit((a(), "l", 2), 0, Some("k"), Some(2)), Admit::Handle);
    }

    #[test]
    fn a_stale_drop_is_forgotten_but_holds_its_key_until_it_returns() {
        let mut i = Inbox::new();
        // k@1 went stale in the local queue: dropped unhandled.
        i.drop_stale((a(), "l", 1), Some("k"));
        // k@2, queued behind it, must not overtake the redelivery of 1.
        assert_eq!(
            i.admit((a(), "l", 2), 0, Some("k"), Some(1)),
            Admit::Blocked { behind: 1 }
        );
        // The redelivery of 1 is handled as if the dropped copy never arrived.
        assert_eq!(i.admit((a(), "l", 1), 0, Some("k"), Some(1)), Admit::Handle);
        i.complete((a(), "l", 1), Some("k"), true);
        assert_eq!(i.admit((a(), "l", 2), 0, Some("k"), Some(2)), Admit::Handle);
    }

    #[test]
    fn a_stale_drop_handled_elsewhere_unblocks_through_the_key_floor() {
        let mut i = Inbox::new();
        i.drop_stale((a(), "l", 1), Some("k"));
        // Another instance handled 1; the origin's key floor moved past it.
        assert_eq!(i.admit((a(), "l", 2), 0, Some("k"), Some(2)), Admit::Handle);
    }

    #[test]
    fn a_stale_copy_of_a_handled_entry_blocks_nothing() {
        let mut i = Inbox::new();
        assert_eq!(i.admit((a(), "l", 1), 0, Some("k"), Some(1)), Admit::Handle);
        i.complete((a(), "l", 1), Some("k"), true);
        i.drop_stale((a(), "l", 1), Some("k"));
        assert_eq!(i.admit((a(), "l", 2), 0, Some("k"), Some(1)), Admit::Handle);
    }

    #[test]
    fn a_window_with_an_entry_being_handled_is_not_evicted() {
        let mut i = Inbox::new();
        assert_eq!(i.admit((a(), "busy", 1), 0, None, None), Admit::Handle);
        // One window more than fit: the least recently used idle ones go, but not "busy"
        // (the oldest), whose entry is still being handled.
        for n in 0..MAX_WINDOWS {
            let log = format!("l{n}");
            assert_eq!(i.admit((a(), &log, 1), 0, None, None), Admit::Handle);
            i.complete((a(), &log, 1), None, true);
        }
        assert_eq!(i.windows.len(), MAX_WINDOWS + 1 - EVICTED_WINDOWS);
        // The oldest idle ones went, the youngest stayed.
        let evicted = format!("l{}", EVICTED_WINDOWS - 1);
        for log in ["l0", evicted.as_str()] {
            assert_eq!(i.admit((a(), log, 1), 0, None, None), Admit::Handle);
            i.complete((a(), log, 1), None, true);
        }
        let kept = format!("l{EVICTED_WINDOWS}");
        assert_eq!(i.admit((a(), &kept, 1), 0, None, None), Admit::Duplicate);
        assert!(i.is_in_progress((a(), "busy", 1)));
        assert_eq!(i.admit((a(), "busy", 1), 0, None, None), Admit::InProgress);
        assert!(!i.is_idle());
        i.complete((a(), "busy", 1), None, true);
        assert!(i.is_idle());
        assert_eq!(i.admit((a(), "busy", 1), 0, None, None), Admit::Duplicate);
    }

    #[test]
    fn restore_keeps_dedup_across_restarts() {
        let mut i = Inbox::new();
        assert_eq!(i.admit((a(), "l", 1), 0, None, None), Admit::Handle);
        i.complete((a(), "l", 1), None, true);
        let snap = i.snapshot(a(), "l").expect("window");
        let mut j = Inbox::restore([snap]);
        assert_eq!(j.admit((a(), "l", 1), 0, None, None), Admit::Duplicate);
    }
}
