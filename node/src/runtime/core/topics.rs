//! The targets of recent publishes, by topic.
//!
//! Finding who gets a copy of a publish walks every connected peer's interests and every
//! known durable group's patterns ([`Core::topic_targets`](super::Core)): up to
//! [`MAX_KNOWN_GROUPS`](super::MAX_KNOWN_GROUPS) groups of
//! [`MAX_PATTERNS_PER_GROUP`](super::groups::MAX_PATTERNS_PER_GROUP) patterns each, for
//! every publish. The answer only changes when an interest or a group does, so it is kept
//! per topic and thrown away as a whole when either changes.

use std::sync::Arc;

use crate::engine::FastMap;
#[cfg(doc)]
use crate::engine::outbox::Outbox;
use crate::engine::outbox::Target;

/// Most topics whose targets are kept. One more empties the cache: a node that publishes to
/// more topics than this pays the full walk again, not unbounded memory.
pub(super) const TOPIC_CACHE_ENTRIES: usize = 1024;
/// Most targets kept over all topics (a topic can match every one of the 1,024 groups a node
/// knows): an answer that would pass it empties the cache first.
pub(super) const TOPIC_CACHE_TARGETS: usize = 65_536;

/// The targets of the topics published to since the interests and groups last changed.
#[derive(Debug, Default)]
pub(super) struct TopicCache {
    /// What the answers were computed from: [`Outbox::peer_changes`] and
    /// [`KnownGroups::changes`](super::groups::KnownGroups::changes) at the time.
    computed_at: (u64, u64),
    targets: FastMap<String, Arc<[Target]>>,
    /// The targets in `targets`, over all topics.
    kept: usize,
}

impl TopicCache {
    /// The targets of `topic` as of `now` (the peer and group change counts): the kept
    /// answer when nothing changed since it was computed, else `compute`'s, which is kept.
    pub(super) fn get_or_compute(
        &mut self,
        topic: &str,
        now: (u64, u64),
        compute: impl FnOnce() -> Vec<Target>,
    ) -> Arc<[Target]> {
        if self.computed_at != now {
            self.clear();
            self.computed_at = now;
        }
        if let Some(t) = self.targets.get(topic) {
            return t.clone();
        }
        let targets: Arc<[Target]> = compute().into();
        if self.targets.len() >= TOPIC_CACHE_ENTRIES
            || self.kept + targets.len() > TOPIC_CACHE_TARGETS
        {
            self.clear();
        }
        self.kept += targets.len();
        self.targets.insert(topic.to_string(), targets.clone());
        targets
    }

    fn clear(&mut self) {
        self.targets.clear();
        self.kept = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str) -> Target {
        Target::Group(name.into())
    }

    #[test]
    fn an_answer_is_kept_until_interests_or_groups_change() {
        let mut cache = TopicCache::default();
        let mut computed = 0;
        let mut get = |cache: &mut TopicCache, topic: &str, now, answer: &str| {
            cache.get_or_compute(topic, now, || {
                computed += 1;
                vec![group(answer)]
            })
        };
        assert_eq!(&*get(&mut cache, "a", (0, 0), "g1"), &[group("g1")]);
        // Kept: the second answer is not computed.
        assert_eq!(&*get(&mut cache, "a", (0, 0), "other"), &[group("g1")]);
        assert_eq!(&*get(&mut cache, "b", (0, 0), "g2"), &[group("g2")]);
        // An interest changed, then a group: computed again each time.
        assert_eq!(&*get(&mut cache, "a", (1, 0), "g3"), &[group("g3")]);
        assert_eq!(&*get(&mut cache, "a", (1, 1), "g4"), &[group("g4")]);
        assert_eq!(&*get(&mut cache, "b", (1, 1), "g5"), &[group("g5")]);
        assert_eq!(computed, 5);
    }

    #[test]
    fn the_cache_stays_within_its_bounds() {
        let mut cache = TopicCache::default();
        for i in 0..TOPIC_CACHE_ENTRIES * 3 + 7 {
            let topic = format!("t.{i}");
            let t = cache.get_or_compute(&topic, (0, 0), || vec![group(&topic)]);
            assert_eq!(&*t, &[group(&topic)]);
            assert!(cache.targets.len() <= TOPIC_CACHE_ENTRIES);
        }
        // Topics that each match a thousand groups: bounded by the targets kept.
        let many: Vec<Target> = (0..1000).map(|g| group(&format!("g{g}"))).collect();
        for i in 0..200 {
            let t = cache.get_or_compute(&format!("all.{i}"), (0, 0), || many.clone());
            assert_eq!(t.len(), 1000);
            assert!(
                cache.kept <= TOPIC_CACHE_TARGETS,
                "{} targets kept",
                cache.kept
            );
            assert_eq!(
                cache.kept,
                cache.targets.values().map(|t| t.len()).sum::<usize>()
            );
        }
    }
}
