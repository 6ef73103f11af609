//! The durable subscriber groups a node knows of, released ones included, and how news of
//! them merges.
//!
//! Every group has a [`GroupState`]: a version (a Lamport counter) and its topic patterns,
//! none once released. Nodes gossip states (`Control::Groups`: the full set on a new
//! connection, then each change) and keep, for each group, the newest one: the higher version
//! wins; on a tie a live state wins over a released one and two live states take the union of
//! their patterns. The merge is commutative, associative and idempotent, so every node ends
//! with the same states whatever order the news arrives in, and gossip stops once nothing
//! changes.
//!
//! A release (`Node::unsubscribe_group`) makes the next version, released; a subscription to
//! a group held as released (a node's own interests, or a connected peer's) makes the next
//! version, live. Released states are kept (tombstones, persisted like live ones), so a node
//! that comes back with a group that was released while it was away loses to the tombstone
//! and forgets the group, instead of teaching it back to everyone.

use std::collections::{BTreeMap, BTreeSet};

use tracing::warn;

use crate::engine::routing::{MAX_SUBJECT_LEN, topic_matches};
use crate::engine::wire::GroupState;

/// Most live durable subscriber groups a node remembers (learnt from peers and gossip, and
/// persisted in the store so a restarted publisher still keeps their copies; groups beyond it
/// are ignored with a warning, also when restoring).
pub(super) const MAX_KNOWN_GROUPS: usize = 1024;
/// Most released groups (tombstones) a node remembers; one more forgets the one with the
/// lowest version, which older news could then bring back.
pub(super) const MAX_RELEASED_GROUPS: usize = 1024;
/// Most topic patterns remembered per durable group.
pub(super) const MAX_PATTERNS_PER_GROUP: usize = 64;

/// Whether a group name or pattern a peer told of is short enough to keep
/// ([`MAX_SUBJECT_LEN`]); a longer one is ignored, with a warning.
fn fits(name: &str) -> bool {
    if name.len() <= MAX_SUBJECT_LEN {
        return true;
    }
    warn!(
        bytes = name.len(),
        limit = MAX_SUBJECT_LEN,
        "durable group name or pattern too long; ignoring it"
    );
    false
}

/// What a change did, for core to act on.
#[derive(Debug, Default)]
pub(super) struct Changes {
    /// Groups whose state changed, with the new state: to store and pass on.
    pub(super) changed: Vec<(String, GroupState)>,
    /// Groups released now that were not released here before (live or unknown): their
    /// backlog, if any, is to be released.
    pub(super) released: Vec<String>,
    /// Tombstones dropped to stay within [`MAX_RELEASED_GROUPS`]: to delete from the store.
    pub(super) forgotten: Vec<String>,
}

impl Changes {
    /// Whether nothing changed.
    pub(super) fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.forgotten.is_empty()
    }
}

/// A live group: its version and topic patterns (never empty).
#[derive(Clone, Debug, Default)]
struct Live {
    version: u64,
    patterns: BTreeSet<String>,
}

/// The groups a node knows of (see the module docs), within [`MAX_KNOWN_GROUPS`] live ones
/// with [`MAX_PATTERNS_PER_GROUP`] patterns each and [`MAX_RELEASED_GROUPS`] released ones.
/// Live and released groups are kept apart, so finding a publish's groups never walks the
/// tombstones.
#[derive(Debug, Default)]
pub(super) struct KnownGroups {
    live: BTreeMap<String, Live>,
    /// Released groups (tombstones): their versions.
    released: BTreeMap<String, u64>,
    /// Counts changes to the live groups and their patterns (what [`KnownGroups::matching`]
    /// reads), so a cache of its answers knows when they may be out of date.
    changes: u64,
}

impl KnownGroups {
    /// The groups recovered from the store, within the limits (a store written with larger
    /// limits is cut, with a warning).
    pub(super) fn restore(stored: Vec<(String, GroupState)>) -> KnownGroups {
        let mut known = KnownGroups::default();
        let total = stored.len();
        let mut changes = Changes::default();
        for (group, state) in stored {
            known.merge(&group, state, &[], &mut changes);
        }
        let kept = known.live.len() + known.released.len();
        if kept < total {
            warn!(
                stored = total,
                kept, "more durable groups stored than a node remembers; ignoring the rest"
            );
        }
        known
    }

    /// A number that changes whenever the answer of [`KnownGroups::matching`] may change.
    pub(super) fn changes(&self) -> u64 {
        self.changes
    }

    /// The live groups with a pattern matching `topic`.
    pub(super) fn matching<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a String> {
        self.live
            .iter()
            .filter(move |(_, l)| l.patterns.iter().any(|p| topic_matches(p, topic)))
            .map(|(g, _)| g)
    }

    /// What is known of `group`.
    fn state(&self, group: &str) -> Option<GroupState> {
        if let Some(l) = self.live.get(group) {
            return Some(GroupState {
                version: l.version,
                patterns: l.patterns.iter().cloned().collect(),
            });
        }
        self.released.get(group).map(|&version| GroupState {
            version,
            patterns: Vec::new(),
        })
    }

    /// Every group's state, released ones included, by name (a new connection's `Groups`
    /// frame).
    pub(super) fn states(&self) -> Vec<(String, GroupState)> {
        let names: BTreeSet<&String> = self.live.keys().chain(self.released.keys()).collect();
        names
            .into_iter()
            .filter_map(|g| Some((g.clone(), self.state(g)?)))
            .collect()
    }

    /// The groups held as released.
    pub(super) fn released_names(&self) -> impl Iterator<Item = &String> {
        self.released.keys()
    }

    /// Whether `group` is held as released.
    pub(super) fn is_released(&self, group: &str) -> bool {
        self.released.contains_key(group)
    }

    /// How many live groups and how many released ones are known.
    pub(super) fn counts(&self) -> (usize, usize) {
        (self.live.len(), self.released.len())
    }

    /// `group` is subscribed with `pattern`: by this node (`local`), or by a connected peer as
    /// its hello or `Interests` frame says. A local subscription to a group held as released
    /// makes it live again, with the next version. A peer's does not: its interests may be
    /// older than the release (a hello built before it, on a second connection), so only the
    /// subscriber's own node revives a group, when the release reaches it.
    pub(super) fn subscribed(
        &mut self,
        group: &str,
        pattern: &str,
        local: bool,
        out: &mut Changes,
    ) {
        if !fits(group) || !fits(pattern) || (!local && self.is_released(group)) {
            return;
        }
        if let Some(l) = self.live.get_mut(group) {
            if l.patterns.len() >= MAX_PATTERNS_PER_GROUP || l.patterns.contains(pattern) {
                return;
            }
            l.patterns.insert(pattern.to_string());
            self.changes += 1;
        } else {
            if !self.room_for_live(group) {
                return;
            }
            let version = self.released.remove(group).unwrap_or(0).saturating_add(1);
            let patterns = BTreeSet::from([pattern.to_string()]);
            self.live
                .insert(group.to_string(), Live { version, patterns });
            self.changes += 1;
        }
        if let Some(state) = self.state(group) {
            out.changed.push((group.to_string(), state));
        }
    }

    /// This node releases `group` (`Node::unsubscribe_group`): the next version, released,
    /// known or not.
    pub(super) fn release(&mut self, group: &str, out: &mut Changes) {
        let version = self.state(group).map_or(0, |s| s.version).saturating_add(1);
        let state = GroupState {
            version,
            patterns: Vec::new(),
        };
        self.adopt(group, state, out);
    }

    /// Merges `theirs`, a peer's news of `group`. `live` holds the patterns this node itself
    /// subscribes to the group with: a release that would win while the group is subscribed
    /// here makes it live again instead, with the next version.
    pub(super) fn merge(
        &mut self,
        group: &str,
        mut theirs: GroupState,
        live: &[String],
        out: &mut Changes,
    ) {
        let had_patterns = !theirs.patterns.is_empty();
        theirs.patterns.retain(|p| fits(p));
        if !fits(group) || (had_patterns && theirs.patterns.is_empty()) {
            // Nothing of it can be kept (and a live state must not read as a release).
            return;
        }
        theirs.patterns.sort_unstable();
        theirs.patterns.dedup();
        theirs.patterns.truncate(MAX_PATTERNS_PER_GROUP);
        let ours = self.state(group);
        let wins = match &ours {
            None => true,
            Some(o) if theirs.version != o.version => theirs.version > o.version,
            // A tie: live beats released, and two live states take the union (below).
            Some(_) => !theirs.is_released(),
        };
        if !wins {
            return;
        }
        if theirs.is_released() && !live.is_empty() {
            // Still read here: the subscription is newer news than the release.
            theirs = GroupState {
                version: theirs.version.saturating_add(1),
                patterns: live.iter().take(MAX_PATTERNS_PER_GROUP).cloned().collect(),
            };
        }
        let union = ours.is_some_and(|o| {
            o.version == theirs.version && !o.is_released() && !theirs.is_released()
        });
        if union {
            for p in &theirs.patterns {
                self.subscribed(group, p, false, out);
            }
        } else {
            self.adopt(group, theirs, out);
        }
    }

    /// Replaces what is held of `group` with `state`, within the limits.
    fn adopt(&mut self, group: &str, state: GroupState, out: &mut Changes) {
        let was_live = self.live.contains_key(group);
        let was_released = self.released.contains_key(group);
        if state.is_released() {
            if !was_released && !self.room_for_released(group, state.version, was_live, out) {
                return;
            }
            self.live.remove(group);
            self.released.insert(group.to_string(), state.version);
            if !was_released {
                out.released.push(group.to_string());
            }
        } else {
            if !was_live && !self.room_for_live(group) {
                return;
            }
            self.released.remove(group);
            let live = Live {
                version: state.version,
                patterns: state.patterns.iter().cloned().collect(),
            };
            self.live.insert(group.to_string(), live);
        }
        self.changes += 1;
        out.changed.push((group.to_string(), state));
    }

    /// Whether `group` (not live here) may become live: false, with a warning, at the limit.
    fn room_for_live(&self, group: &str) -> bool {
        if self.live.len() < MAX_KNOWN_GROUPS {
            return true;
        }
        warn!(
            limit = MAX_KNOWN_GROUPS,
            group, "too many durable groups known; ignoring one"
        );
        false
    }

    /// Whether a tombstone of `group` (not released here) at `version` may be kept: at the
    /// limit the tombstone with the lowest version goes (reported in `out.forgotten`), unless
    /// that would be this one. A live group's release always gets its room (`live`): the
    /// release must take effect here.
    fn room_for_released(
        &mut self,
        group: &str,
        version: u64,
        live: bool,
        out: &mut Changes,
    ) -> bool {
        if self.released.len() < MAX_RELEASED_GROUPS {
            return true;
        }
        let Some((oldest, oldest_version)) = self
            .released
            .iter()
            .min_by_key(|(_, v)| **v)
            .map(|(g, v)| (g.clone(), *v))
        else {
            return false;
        };
        if oldest_version >= version && !live {
            warn!(
                limit = MAX_RELEASED_GROUPS,
                group, "too many released durable groups known; ignoring an old release"
            );
            return false;
        }
        self.released.remove(&oldest);
        out.forgotten.push(oldest);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(version: u64, patterns: &[&str]) -> GroupState {
        GroupState {
            version,
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn released(version: u64) -> GroupState {
        live(version, &[])
    }

    fn state_of(k: &KnownGroups, group: &str) -> Option<GroupState> {
        k.state(group)
    }

    /// Merges `news` in order into an empty set of groups; the states it ends with.
    fn merged(news: &[(&str, GroupState)]) -> Vec<(String, GroupState)> {
        let mut k = KnownGroups::default();
        for (g, s) in news {
            k.merge(g, s.clone(), &[], &mut Changes::default());
        }
        k.states()
    }

    #[test]
    fn the_newer_version_wins_and_a_tie_goes_to_the_live_state() {
        let mut k = KnownGroups::default();
        let mut out = Changes::default();
        k.merge("billing", live(1, &["orders.*"]), &[], &mut out);
        k.merge("billing", released(2), &[], &mut out);
        assert_eq!(out.released, ["billing"], "a newer release wins");
        assert_eq!(k.counts(), (0, 1));

        let mut out = Changes::default();
        k.merge("billing", live(1, &["orders.*"]), &[], &mut out);
        assert!(out.is_empty(), "older news loses: {out:?}");
        assert_eq!(state_of(&k, "billing"), Some(released(2)));

        k.merge("billing", live(2, &["orders.*"]), &[], &mut out);
        assert_eq!(state_of(&k, "billing"), Some(live(2, &["orders.*"])));
        let mut out = Changes::default();
        k.merge("billing", released(2), &[], &mut out);
        assert!(out.is_empty(), "a tie does not release a live group");
        k.merge("billing", live(2, &["refunds.*"]), &[], &mut out);
        assert_eq!(
            state_of(&k, "billing"),
            Some(live(2, &["orders.*", "refunds.*"])),
            "a tie of live states takes the union"
        );
        assert_eq!(k.counts(), (1, 0));
    }

    #[test]
    fn any_order_of_the_same_news_ends_in_the_same_states() {
        let news = [
            ("billing", live(1, &["orders.*"])),
            ("billing", released(2)),
            ("billing", live(2, &["refunds.*"])),
            ("audit", live(3, &["a.>"])),
            ("audit", live(3, &["b.>"])),
            ("audit", released(3)),
            ("gone", released(4)),
            ("gone", live(1, &["x"])),
        ];
        let want = merged(&news);
        assert_eq!(
            want,
            [
                ("audit".to_string(), live(3, &["a.>", "b.>"])),
                ("billing".to_string(), live(2, &["refunds.*"])),
                ("gone".to_string(), released(4)),
            ]
        );
        // Every rotation and the reverse.
        for shift in 0..news.len() {
            let mut order = news.to_vec();
            order.rotate_left(shift);
            assert_eq!(merged(&order), want, "rotated by {shift}");
            order.reverse();
            assert_eq!(merged(&order), want, "reversed, rotated by {shift}");
        }
    }

    #[test]
    fn a_subscription_revives_a_released_group_with_the_next_version() {
        let mut k = KnownGroups::default();
        let mut out = Changes::default();
        k.subscribed("billing", "orders.*", true, &mut out);
        assert_eq!(
            out.changed,
            [("billing".to_string(), live(1, &["orders.*"]))]
        );
        let mut out = Changes::default();
        k.subscribed("billing", "orders.*", true, &mut out);
        assert!(out.is_empty(), "nothing new");

        let mut out = Changes::default();
        k.release("billing", &mut out);
        assert_eq!(out.changed, [("billing".to_string(), released(2))]);
        assert_eq!(out.released, ["billing"]);
        assert_eq!(k.matching("orders.created").count(), 0);

        let mut out = Changes::default();
        k.subscribed("billing", "orders.*", false, &mut out);
        assert!(
            out.is_empty(),
            "a peer's interests do not revive a released group"
        );
        k.subscribed("billing", "orders.*", true, &mut out);
        assert_eq!(
            out.changed,
            [("billing".to_string(), live(3, &["orders.*"]))]
        );
        assert_eq!(
            k.matching("orders.created").collect::<Vec<_>>(),
            ["billing"]
        );
    }

    #[test]
    fn a_release_of_a_group_still_subscribed_here_revives_it() {
        let mut k = KnownGroups::default();
        k.merge(
            "billing",
            live(4, &["orders.*"]),
            &[],
            &mut Changes::default(),
        );
        let mut out = Changes::default();
        k.merge("billing", released(5), &["orders.*".to_string()], &mut out);
        assert!(out.released.is_empty(), "the backlog is kept");
        assert_eq!(
            out.changed,
            [("billing".to_string(), live(6, &["orders.*"]))]
        );
    }

    #[test]
    fn unknown_releases_are_kept_so_older_news_loses() {
        let mut k = KnownGroups::default();
        let mut out = Changes::default();
        k.release("billing", &mut out);
        assert_eq!(out.released, ["billing"], "any backlog kept for it goes");
        assert_eq!(state_of(&k, "billing"), Some(released(1)));
        let mut out = Changes::default();
        k.merge("billing", released(1), &[], &mut out);
        assert!(out.is_empty(), "the same news again changes nothing");
        let mut out = Changes::default();
        k.merge("billing", live(1, &["orders.*"]), &[], &mut out);
        assert_eq!(
            state_of(&k, "billing"),
            Some(live(1, &["orders.*"])),
            "a tie goes to the live state"
        );
    }

    #[test]
    fn limits_hold_and_the_oldest_tombstone_goes_first() {
        let mut k = KnownGroups::default();
        let mut out = Changes::default();
        for i in 0..MAX_KNOWN_GROUPS + 5 {
            k.subscribed(&format!("g{i}"), "t", true, &mut out);
        }
        assert_eq!(k.counts(), (MAX_KNOWN_GROUPS, 0));
        for i in 0..MAX_PATTERNS_PER_GROUP + 5 {
            k.subscribed("g0", &format!("p{i}"), true, &mut out);
        }
        assert_eq!(
            state_of(&k, "g0").map(|s| s.patterns.len()),
            Some(MAX_PATTERNS_PER_GROUP)
        );

        let mut k = KnownGroups::default();
        for i in 0..MAX_RELEASED_GROUPS {
            k.merge(&format!("r{i}"), released(10 + i as u64), &[], &mut out);
        }
        let mut out = Changes::default();
        k.merge("older", released(5), &[], &mut out);
        assert!(out.is_empty(), "older than every tombstone kept: {out:?}");
        k.merge("newer", released(5_000), &[], &mut out);
        assert_eq!(out.forgotten, ["r0"]);
        assert_eq!(k.counts(), (0, MAX_RELEASED_GROUPS));
        assert_eq!(state_of(&k, "newer"), Some(released(5_000)));
    }

    #[test]
    fn a_live_group_is_released_even_with_every_tombstone_newer() {
        let mut k = KnownGroups::default();
        let mut out = Changes::default();
        for i in 0..MAX_RELEASED_GROUPS {
            k.merge(&format!("r{i}"), released(100 + i as u64), &[], &mut out);
        }
        k.subscribed("billing", "orders.*", true, &mut out);
        let mut out = Changes::default();
        k.release("billing", &mut out);
        assert_eq!(out.released, ["billing"]);
        assert_eq!(out.forgotten, ["r0"]);
        assert_eq!(k.counts(), (0, MAX_RELEASED_GROUPS));
        assert_eq!(k.matching("orders.created").count(), 0);
    }

    /// A version is a peer's word: the highest one cannot overflow (it saturates, so a
    /// subscription still wins the tie over a release at that version).
    #[test]
    fn the_highest_version_saturates() {
        let mut k = KnownGroups::default();
        let mut out = Changes::default();
        k.merge("billing", released(u64::MAX), &[], &mut out);
        k.subscribed("billing", "orders.*", true, &mut out);
        assert_eq!(state_of(&k, "billing"), Some(live(u64::MAX, &["orders.*"])));
        k.release("billing", &mut out);
        assert_eq!(state_of(&k, "billing"), Some(released(u64::MAX)));
        k.merge(
            "billing",
            released(u64::MAX),
            &["orders.*".to_string()],
            &mut out,
        );
        assert_eq!(
            state_of(&k, "billing"),
            Some(released(u64::MAX)),
            "not newer news"
        );
        k.merge("billing", live(u64::MAX, &["a.*"]), &[], &mut out);
        assert_eq!(state_of(&k, "billing"), Some(live(u64::MAX, &["a.*"])));
    }

    #[test]
    fn names_and_patterns_over_the_limit_are_ignored() {
        let long = "x".repeat(MAX_SUBJECT_LEN + 1);
        let mut k = KnownGroups::default();
        let mut out = Changes::default();
        k.subscribed(&long, "orders.*", true, &mut out);
        k.subscribed("billing", &long, true, &mut out);
        k.merge(&long, live(1, &["a"]), &[], &mut out);
        k.merge(
            "audit",
            GroupState {
                version: 1,
                patterns: vec![long.clone()],
            },
            &[],
            &mut out,
        );
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(
            k.counts(),
            (0, 0),
            "a live state whose patterns all go is not a release"
        );
        k.merge(
            "audit",
            GroupState {
                version: 2,
                patterns: vec![long, "a.*".into()],
            },
            &[],
            &mut out,
        );
        assert_eq!(state_of(&k, "audit"), Some(live(2, &["a.*"])));
    }

    #[test]
    fn restoring_keeps_what_was_stored() {
        let stored = vec![
            ("audit".to_string(), released(3)),
            ("billing".to_string(), live(2, &["orders.*"])),
        ];
        let k = KnownGroups::restore(stored.clone());
        assert_eq!(k.states(), stored);
        assert_eq!(k.counts(), (1, 1));
    }
}
