//! Durable groups released lately (`Node::unsubscribe_group`), remembered for a while so
//! news older than the release cannot bring a group back.
//!
//! Group sets only grow by gossip (`Control::Groups`), so a peer that has not heard of a
//! release yet (a connection made around it, a node that was down) would teach the group
//! back for good. For [`RELEASED_GROUP_MEMORY`] after a release, gossip naming the group is
//! ignored, and the node that released it tells every peer it connects to meanwhile
//! (`Control::GroupGone`), which also reaches a node that was down during the release. A
//! subscriber's own interests still teach the group (it was subscribed again), and forget the
//! release.

use std::collections::BTreeMap;

/// How long a release is remembered (engine ms).
pub(super) const RELEASED_GROUP_MEMORY: u64 = 60_000;

/// Releases remembered at once; one more forgets the oldest.
pub(super) const MAX_RELEASED_GROUPS: usize = 1024;

/// One remembered release.
#[derive(Clone, Copy, Debug)]
struct Release {
    /// When (engine ms).
    at: u64,
    /// This node released it (its own `unsubscribe_group`), rather than hearing of it.
    here: bool,
}

/// Groups released lately (see the module docs), at most [`MAX_RELEASED_GROUPS`].
#[derive(Debug, Default)]
pub(super) struct ReleasedGroups {
    groups: BTreeMap<String, Release>,
}

impl ReleasedGroups {
    /// Remembers that `group` was released at `now` (`here`: by this node).
    pub(super) fn release(&mut self, group: &str, now: u64, here: bool) {
        self.groups
            .retain(|_, r| now.saturating_sub(r.at) < RELEASED_GROUP_MEMORY);
        if !self.groups.contains_key(group)
            && self.groups.len() >= MAX_RELEASED_GROUPS
            && let Some(oldest) = self
                .groups
                .iter()
                .min_by_key(|(_, r)| r.at)
                .map(|(g, _)| g.clone())
        {
            self.groups.remove(&oldest);
        }
        let here = here || self.groups.get(group).is_some_and(|r| r.here);
        self.groups
            .insert(group.to_string(), Release { at: now, here });
    }

    /// Whether `group` was released less than [`RELEASED_GROUP_MEMORY`] before `now`: gossip
    /// about it is older news.
    pub(super) fn is_recent(&self, group: &str, now: u64) -> bool {
        self.groups
            .get(group)
            .is_some_and(|r| now.saturating_sub(r.at) < RELEASED_GROUP_MEMORY)
    }

    /// `group` was subscribed again: its release is over.
    pub(super) fn forget(&mut self, group: &str) {
        self.groups.remove(group);
    }

    /// The groups this node released less than [`RELEASED_GROUP_MEMORY`] before `now`: a peer
    /// that connects is told of them.
    pub(super) fn released_here(&self, now: u64) -> impl Iterator<Item = &str> {
        self.groups
            .iter()
            .filter(move |(_, r)| r.here && now.saturating_sub(r.at) < RELEASED_GROUP_MEMORY)
            .map(|(g, _)| g.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_is_remembered_for_its_time_and_forgotten_on_resubscribe() {
        let mut r = ReleasedGroups::default();
        r.release("billing", 1_000, true);
        r.release("audit", 1_000, false);
        assert!(r.is_recent("billing", 1_000 + RELEASED_GROUP_MEMORY - 1));
        assert!(!r.is_recent("billing", 1_000 + RELEASED_GROUP_MEMORY));
        assert!(!r.is_recent("other", 1_000));
        // Only our own releases are announced.
        assert_eq!(r.released_here(2_000).collect::<Vec<_>>(), ["billing"]);
        assert_eq!(
            r.released_here(1_000 + RELEASED_GROUP_MEMORY).count(),
            0,
            "an old release is not announced"
        );
        r.forget("billing");
        assert!(!r.is_recent("billing", 2_000));
        assert_eq!(r.released_here(2_000).count(), 0);
    }

    #[test]
    fn hearing_of_our_own_release_keeps_it_ours() {
        let mut r = ReleasedGroups::default();
        r.release("billing", 1_000, true);
        r.release("billing", 1_500, false);
        assert_eq!(r.released_here(1_600).collect::<Vec<_>>(), ["billing"]);
    }

    #[test]
    fn at_most_the_limit_is_remembered_and_the_oldest_goes_first() {
        let mut r = ReleasedGroups::default();
        for i in 0..MAX_RELEASED_GROUPS {
            r.release(&format!("g{i}"), i as u64, false);
        }
        r.release("newest", MAX_RELEASED_GROUPS as u64, false);
        assert_eq!(r.groups.len(), MAX_RELEASED_GROUPS);
        assert!(!r.is_recent("g0", MAX_RELEASED_GROUPS as u64));
        assert!(r.is_recent("g1", MAX_RELEASED_GROUPS as u64));
        assert!(r.is_recent("newest", MAX_RELEASED_GROUPS as u64));
    }
}
