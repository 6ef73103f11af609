//! Which nodes an unsettled entry was sent to, so that only they may acknowledge it.
//!
//! An ack settles an entry by log and seq. Without a check, any connected node could settle
//! entries it was never sent (a buggy or hostile member of the mesh): their receipts would say
//! acknowledged while no consumer ever handled them. The check must still let a node ack an
//! entry it was sent on an earlier attempt (its connection dropped, the entry went to another
//! instance, and the first handler finished anyway), so an entry remembers every node it was
//! sent to, not only the last.
//!
//! Each entry keeps a [`Mask`]: one bit per recipient, in a table of at most
//! [`TRACKED_RECIPIENTS`] nodes. A node keeps its bit while it is connected or any unsettled
//! entry carries the bit, so a bit never names two nodes for the same entry. When the table
//! is full, a new recipient is not tracked: the entries sent to it take [`UNTRACKED`], which
//! lets any node ack them (the check gives way; it never refuses a correct ack). Entries
//! recovered from the store after a restart carry [`UNTRACKED`] too: the nodes an earlier run
//! sent them to are not known.

use peerbus_transport::NodeId;

use super::FastMap;

/// Recipients tracked at once (bits of a [`Mask`] besides [`UNTRACKED`]). A node whose
/// entries go to more distinct live nodes than this at a time checks acks only for the first
/// ones; see the module docs.
pub const TRACKED_RECIPIENTS: usize = 63;

/// The set of recipients of one entry.
pub type Mask = u64;

/// The bit of a [`Mask`] that lets any node acknowledge the entry.
pub const UNTRACKED: Mask = 1 << 63;

/// The table of tracked recipients: node ↔ bit, and how many unsettled entries carry each bit.
#[derive(Debug)]
pub struct Recipients {
    /// The bit of each tracked node.
    bits: FastMap<NodeId, u8>,
    /// The node of each bit in use.
    nodes: [Option<NodeId>; TRACKED_RECIPIENTS],
    /// Unsettled entries whose mask carries each bit.
    refs: [u32; TRACKED_RECIPIENTS],
}

impl Default for Recipients {
    fn default() -> Self {
        Self {
            bits: FastMap::default(),
            nodes: [None; TRACKED_RECIPIENTS],
            refs: [0; TRACKED_RECIPIENTS],
        }
    }
}

impl Recipients {
    /// Adds `node` to an entry's `mask` as it is sent to it, giving the node a bit if it has
    /// none and one is free, else marking the entry [`UNTRACKED`].
    pub fn sent(&mut self, node: NodeId, mask: &mut Mask) {
        let bit = match self.bits.get(&node) {
            Some(b) => Some(*b),
            None => self.assign(node),
        };
        match bit {
            Some(b) => {
                let m = 1 << b;
                if *mask & m == 0 {
                    *mask |= m;
                    if let Some(r) = self.refs.get_mut(usize::from(b)) {
                        *r += 1;
                    }
                }
            }
            None => *mask |= UNTRACKED,
        }
    }

    /// Whether `node` may acknowledge an entry with `mask`.
    pub fn may_ack(&self, node: NodeId, mask: Mask) -> bool {
        mask & UNTRACKED != 0 || self.bits.get(&node).is_some_and(|b| mask & (1 << b) != 0)
    }

    /// Whether an entry with `mask` was sent to `node` (known only for a tracked node).
    pub fn was_sent(&self, node: NodeId, mask: Mask) -> bool {
        self.bits.get(&node).is_some_and(|b| mask & (1 << b) != 0)
    }

    /// An entry with `mask` left its log. `connected` holds the nodes still connected: a bit
    /// no unsettled entry carries is freed once its node is gone.
    pub fn settled<V>(&mut self, mask: Mask, connected: &FastMap<NodeId, V>) {
        let mut rest = mask & !UNTRACKED;
        while rest != 0 {
            let b = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            if let Some(r) = self.refs.get_mut(b) {
                *r = r.saturating_sub(1);
                if *r == 0
                    && self
                        .nodes
                        .get(b)
                        .copied()
                        .flatten()
                        .is_some_and(|n| !connected.contains_key(&n))
                {
                    self.free(b);
                }
            }
        }
    }

    /// `node` disconnected: its bit is freed unless an unsettled entry still carries it.
    pub fn gone(&mut self, node: NodeId) {
        if let Some(b) = self.bits.get(&node).map(|b| usize::from(*b))
            && self.refs.get(b) == Some(&0)
        {
            self.free(b);
        }
    }

    fn assign(&mut self, node: NodeId) -> Option<u8> {
        let b = self.nodes.iter().position(Option::is_none)?;
        let slot = self.nodes.get_mut(b)?;
        *slot = Some(node);
        let b = u8::try_from(b).ok()?;
        self.bits.insert(node, b);
        Some(b)
    }

    fn free(&mut self, b: usize) {
        if let Some(node) = self.nodes.get_mut(b).and_then(Option::take) {
            self.bits.remove(&node);
        }
    }

    /// Nodes holding a bit (for tests and status).
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.bits.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    /// The connected nodes, as the outbox's peer map.
    fn connected(nodes: &[NodeId]) -> FastMap<NodeId, ()> {
        nodes.iter().map(|n| (*n, ())).collect()
    }

    #[test]
    fn only_the_nodes_an_entry_was_sent_to_may_ack_it() {
        let mut r = Recipients::default();
        let mut mask = 0;
        assert!(!r.may_ack(id(1), mask), "an entry never sent");
        r.sent(id(1), &mut mask);
        r.sent(id(2), &mut mask);
        r.sent(id(1), &mut mask);
        assert!(r.may_ack(id(1), mask) && r.may_ack(id(2), mask));
        assert!(!r.may_ack(id(3), mask));
        assert!(r.may_ack(id(3), UNTRACKED), "an entry from the store");
    }

    #[test]
    fn a_bit_outlives_its_node_while_an_entry_carries_it() {
        let mut r = Recipients::default();
        let (mut a, mut b) = (0, 0);
        r.sent(id(1), &mut a);
        r.sent(id(1), &mut b);
        r.gone(id(1));
        // Node 2 must not get node 1's bit while `b` still carries it.
        r.settled(a, &connected(&[]));
        let mut c = 0;
        r.sent(id(2), &mut c);
        assert!(!r.may_ack(id(2), b), "node 2 was never sent b");
        assert!(
            r.may_ack(id(1), b),
            "node 1 can still ack b after a reconnect"
        );
        r.settled(b, &connected(&[]));
        assert_eq!(r.tracked(), 1, "node 1's bit is free once b settled");
        // A connected node keeps its bit with no entry in flight.
        r.settled(c, &connected(&[id(2)]));
        assert_eq!(r.tracked(), 1);
        let mut d = 0;
        r.sent(id(2), &mut d);
        assert_eq!(d, c, "the same bit");
    }

    #[test]
    fn past_the_table_entries_are_untracked_and_anyone_may_ack_them() {
        let mut r = Recipients::default();
        let mut masks = Vec::new();
        for n in 0..TRACKED_RECIPIENTS as u8 {
            let mut m = 0;
            r.sent(id(n), &mut m);
            assert_eq!(m & UNTRACKED, 0);
            masks.push(m);
        }
        let mut full = 0;
        r.sent(id(200), &mut full);
        assert_eq!(full, UNTRACKED);
        assert!(r.may_ack(id(201), full));
        // Node 0 leaves and its only entry settles: its bit goes to the next new node.
        r.gone(id(0));
        r.settled(masks[0], &connected(&[]));
        let mut m = 0;
        r.sent(id(200), &mut m);
        assert_eq!(m, masks[0]);
    }
}
