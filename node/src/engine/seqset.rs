//! [`SeqSet`]: the unsettled seqs of one key of a log, with the usual case, one entry, kept
//! inline.
//!
//! *Why:* with the bench's 256 keys most keys have one entry unsettled at a time, and a
//! `BTreeSet` of one seq allocates a node for it: 0.4 of the 7.4 allocations per 64 B send
//! (a sampling allocator in a scratch build).

use std::collections::{BTreeSet, btree_set};
use std::ops::Range;

/// A set of seqs that allocates nothing while it holds one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SeqSet {
    /// Exactly one seq.
    One(u64),
    /// Any number, none included (a set that grew past one stays here until it is dropped).
    Many(BTreeSet<u64>),
}

impl SeqSet {
    /// A set of `seq` alone.
    pub(crate) fn one(seq: u64) -> SeqSet {
        SeqSet::One(seq)
    }

    /// Adds `seq`.
    pub(crate) fn insert(&mut self, seq: u64) {
        match self {
            SeqSet::One(first) if *first == seq => {}
            SeqSet::One(first) => *self = SeqSet::Many(BTreeSet::from([*first, seq])),
            SeqSet::Many(set) => {
                set.insert(seq);
            }
        }
    }

    /// Removes `seq`; whether it was there.
    pub(crate) fn remove(&mut self, seq: u64) -> bool {
        match self {
            SeqSet::One(only) if *only == seq => {
                *self = SeqSet::Many(BTreeSet::new());
                true
            }
            SeqSet::One(_) => false,
            SeqSet::Many(set) => set.remove(&seq),
        }
    }

    /// Whether the set holds no seq.
    pub(crate) fn is_empty(&self) -> bool {
        match self {
            SeqSet::One(_) => false,
            SeqSet::Many(set) => set.is_empty(),
        }
    }

    /// The lowest seq.
    pub(crate) fn first(&self) -> Option<u64> {
        match self {
            SeqSet::One(only) => Some(*only),
            SeqSet::Many(set) => set.first().copied(),
        }
    }

    /// The seqs in `range`, lowest first.
    pub(crate) fn range(&self, range: Range<u64>) -> SeqRange<'_> {
        match self {
            SeqSet::One(only) => SeqRange::One(range.contains(only).then_some(*only)),
            SeqSet::Many(set) => SeqRange::Many(set.range(range)),
        }
    }
}

/// The seqs of a [`SeqSet`] in a range ([`SeqSet::range`]).
pub(crate) enum SeqRange<'a> {
    /// The one seq, if it is in the range.
    One(Option<u64>),
    /// The seqs of a larger set in the range.
    Many(btree_set::Range<'a, u64>),
}

impl Iterator for SeqRange<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        match self {
            SeqRange::One(only) => only.take(),
            SeqRange::Many(range) => range.next().copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64),
        Remove(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..12u64).prop_map(Op::Insert),
            (0..12u64).prop_map(Op::Remove)
        ]
    }

    proptest! {
        /// Whatever is inserted and removed, the set answers as a `BTreeSet` does.
        #[test]
        fn answers_as_a_btree_set(first in 0..12u64, ops in proptest::collection::vec(op(), 0..40), lo in 0..13u64, hi in 0..13u64) {
            let mut set = SeqSet::one(first);
            let mut model = BTreeSet::from([first]);
            for op in ops {
                match op {
                    Op::Insert(s) => {
                        set.insert(s);
                        model.insert(s);
                    }
                    Op::Remove(s) => prop_assert_eq!(set.remove(s), model.remove(&s)),
                }
                prop_assert_eq!(set.is_empty(), model.is_empty());
                prop_assert_eq!(set.first(), model.first().copied());
                let range = lo.min(hi)..lo.max(hi);
                prop_assert_eq!(
                    set.range(range.clone()).collect::<Vec<_>>(),
                    model.range(range).copied().collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn one_seq_stays_inline_until_a_second_comes() {
        let mut set = SeqSet::one(5);
        set.insert(5);
        assert_eq!(set, SeqSet::One(5));
        set.insert(7);
        assert_eq!(set, SeqSet::Many(BTreeSet::from([5, 7])));
        let mut alone = SeqSet::one(3);
        assert!(!alone.remove(4));
        assert!(alone.remove(3));
        assert!(alone.is_empty());
        assert_eq!(alone.first(), None);
    }
}
