//! Events waiting for space in the caller's channel, coalesced per peer.
//!
//! Discovery must never drop an event, yet must not grow without bound while the
//! caller is slow. Only the newest event about a peer matters (an `Up` carries the
//! whole record; `Down` after `Up` means down), so a peer has at most one queued
//! event, and the queue is bounded by the number of peers.

use std::collections::{HashMap, VecDeque};

use crate::{DiscoveryEvent, NodeId};

/// Per-peer coalescing queue, first-queued first-out.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    order: VecDeque<NodeId>,
    latest: HashMap<NodeId, DiscoveryEvent>,
}

impl Pending {
    /// Queues `event` about `peer`, replacing any event about `peer` still queued.
    pub(crate) fn push(&mut self, peer: NodeId, event: DiscoveryEvent) {
        if self.latest.insert(peer, event).is_none() {
            self.order.push_back(peer);
        }
    }

    /// The oldest queued event.
    pub(crate) fn pop(&mut self) -> Option<DiscoveryEvent> {
        while let Some(peer) = self.order.pop_front() {
            if let Some(event) = self.latest.remove(&peer) {
                return Some(event);
            }
        }
        None
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_newest_event_per_peer_in_first_queued_order() {
        let a = NodeId::from_bytes([1; 32]);
        let b = NodeId::from_bytes([2; 32]);
        let mut p = Pending::default();
        p.push(a, DiscoveryEvent::Down(a));
        p.push(b, DiscoveryEvent::Down(b));
        p.push(a, DiscoveryEvent::Seed(([127, 0, 0, 1], 1).into()));
        assert_eq!(
            p.pop(),
            Some(DiscoveryEvent::Seed(([127, 0, 0, 1], 1).into()))
        );
        assert!(!p.is_empty());
        assert_eq!(p.pop(), Some(DiscoveryEvent::Down(b)));
        assert_eq!(p.pop(), None);
        assert!(p.is_empty());
    }
}
