//! Changes that are in the side log but not yet in the database.
//!
//! A `Fsync` or `Interval` store writes each commit to the side log (`wal.rs`) and folds it in
//! here; a *checkpoint* (`RedbStore::checkpoint`) later applies everything folded in one durable
//! database transaction and empties the side log. An entry appended and removed between two
//! checkpoints (the normal life of a message its consumer acknowledges quickly) never reaches
//! the database: folding its removal drops its append.
//!
//! Folding keeps the meaning of applying the batches one after another (`Batch`: append, then
//! remove, then the rest; later items for the same key win). To drop an append and its removal
//! together it must know the database cannot hold an older version of the entry: an entry is
//! *fresh* when its seq is above every seq of its log in the database (`db_max`, read once
//! when the database is opened and raised by each checkpoint).

use std::collections::HashMap;

use peerbus_transport::NodeId;

use super::{Batch, DeadLetter, StoredEntry};
use crate::engine::FastMap;
use crate::engine::inbox::WindowSnapshot;

/// A map keyed by log name, from hashbrown so a `&str` finds (or adds) a log's slot without
/// copying the name first.
type LogMap<V> = hashbrown::HashMap<String, V, foldhash::fast::RandomState>;

/// What a checkpoint does to one entry key.
#[derive(Debug)]
enum Change {
    /// Insert (or replace) it. `fresh`: the database holds no version of it, so a later
    /// removal can simply forget the change.
    Put { entry: StoredEntry, fresh: bool },
    /// Delete it from the database.
    Delete,
}

/// The folded change since the last checkpoint. Its size is bounded by the caller, which
/// checkpoints once [`Unapplied::len`] reaches its limit.
#[derive(Debug, Default)]
pub(super) struct Unapplied {
    /// Per log, per seq: looked up by the log name as a `&str`, so folding an entry of a log
    /// already present copies no name.
    entries: LogMap<FastMap<u64, Change>>,
    /// Changes in `entries`.
    entry_changes: usize,
    windows: FastMap<(NodeId, String), WindowSnapshot>,
    next_seqs: FastMap<String, u64>,
    dead: Vec<DeadLetter>,
    groups: Vec<(String, Option<crate::engine::wire::GroupState>)>,
    /// Approximate bytes of the entries to put (see [`Unapplied::put_bytes`]).
    put_bytes: usize,
}

/// Roughly what an entry takes in the database: its payload and names plus fixed fields.
fn entry_bytes(e: &StoredEntry) -> usize {
    e.env.payload.len() + e.env.log.len() + e.env.destination.len() + 64
}

impl Unapplied {
    /// Changes a checkpoint would make (entries to put or delete, windows, next seqs, dead
    /// letters and group changes).
    pub(super) fn len(&self) -> usize {
        self.entry_changes
            + self.windows.len()
            + self.next_seqs.len()
            + self.dead.len()
            + self.groups.len()
    }

    /// Approximate bytes a checkpoint would write for entries: what it needs in free space.
    pub(super) fn put_bytes(&self) -> usize {
        self.put_bytes
    }

    /// Whether a checkpoint would change nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.entry_changes == 0
            && self.windows.is_empty()
            && self.next_seqs.is_empty()
            && self.dead.is_empty()
            && self.groups.is_empty()
    }

    /// Folds a committed batch in. `db_max` holds, per log, the highest seq the database may
    /// hold (a log missing from it has no entries there).
    pub(super) fn fold(&mut self, batch: Batch, db_max: &HashMap<String, u64>) {
        let Batch {
            append,
            remove,
            windows,
            next_seqs,
            dead,
            groups,
        } = batch;
        let in_db = |log: &str, seq: u64| db_max.get(log).is_some_and(|max| seq <= *max);
        for entry in append {
            let seq = entry.env.seq;
            let changes = self.entries.entry_ref(entry.env.log.as_str()).or_default();
            let fresh = match changes.get(&seq) {
                Some(Change::Put { fresh, .. }) => *fresh,
                Some(Change::Delete) => false,
                None => !in_db(&entry.env.log, seq),
            };
            self.put_bytes += entry_bytes(&entry);
            match changes.insert(seq, Change::Put { entry, fresh }) {
                Some(Change::Put { entry: old, .. }) => self.put_bytes -= entry_bytes(&old),
                Some(Change::Delete) => {}
                None => self.entry_changes += 1,
            }
        }
        for (log, seq) in remove {
            let (old, added) = match self.entries.get_mut(log.as_str()) {
                Some(changes) => match changes.get(&seq) {
                    Some(Change::Put { fresh: true, .. }) => (changes.remove(&seq), false),
                    None if !in_db(&log, seq) => (None, false),
                    None => (changes.insert(seq, Change::Delete), true),
                    Some(_) => (changes.insert(seq, Change::Delete), false),
                },
                None if !in_db(&log, seq) => (None, false),
                None => {
                    self.entries
                        .entry(log)
                        .or_default()
                        .insert(seq, Change::Delete);
                    (None, true)
                }
            };
            if added {
                self.entry_changes += 1;
            }
            if let Some(Change::Put { entry, fresh }) = old {
                self.put_bytes -= entry_bytes(&entry);
                if fresh {
                    self.entry_changes -= 1;
                }
            }
        }
        for w in windows {
            self.windows.insert((w.origin, w.log.clone()), w);
        }
        self.next_seqs.extend(next_seqs);
        self.dead.extend(dead);
        self.groups.extend(groups);
    }

    /// The folded change as one batch (entries in key order), leaving `self` as it is: the
    /// caller clears it once the checkpoint is committed.
    pub(super) fn to_batch(&self) -> Batch {
        let mut batch = Batch::default();
        for (log, changes) in &self.entries {
            for (seq, change) in changes {
                match change {
                    Change::Put { entry, .. } => batch.append.push(entry.clone()),
                    Change::Delete => batch.remove.push((log.clone(), *seq)),
                }
            }
        }
        batch
            .append
            .sort_unstable_by(|a, b| (&a.env.log, a.env.seq).cmp(&(&b.env.log, b.env.seq)));
        batch.remove.sort_unstable();
        batch.windows = self.windows.values().cloned().collect();
        batch.next_seqs = self
            .next_seqs
            .iter()
            .map(|(log, seq)| (log.clone(), *seq))
            .collect();
        batch.dead = self.dead.clone();
        batch.groups = self.groups.clone();
        batch
    }

    /// Forgets everything (after a checkpoint, or after a reopen replayed the side log).
    pub(super) fn clear(&mut self) {
        *self = Unapplied::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::wire::{Envelope, Kind};
    use std::sync::Arc;

    fn entry(log: &str, seq: u64, tag: u8) -> StoredEntry {
        StoredEntry {
            env: Arc::new(Envelope {
                origin: NodeId::from_bytes([1; 32]),
                log: log.into(),
                seq,
                kind: Kind::Send,
                destination: "orders".into(),
                key: None,
                headers: Vec::new(),
                content_type: None,
                created_at_ms: 0,
                attempt: 1,
                payload: vec![tag].into(),
            }),
            expires_at_ms: None,
            not_before_ms: None,
        }
    }

    fn batch(append: Vec<StoredEntry>, remove: Vec<(&str, u64)>) -> Batch {
        Batch {
            append,
            remove: remove
                .into_iter()
                .map(|(l, s)| (l.to_string(), s))
                .collect(),
            ..Batch::default()
        }
    }

    #[test]
    fn a_fresh_entry_appended_then_removed_leaves_nothing() {
        let mut u = Unapplied::default();
        let db_max = HashMap::from([("svc:a".to_string(), 4)]);
        u.fold(batch(vec![entry("svc:a", 5, 1)], vec![]), &db_max);
        u.fold(batch(vec![], vec![("svc:a", 5)]), &db_max);
        assert!(u.is_empty());
        assert_eq!((u.len(), u.put_bytes()), (0, 0));
    }

    #[test]
    fn an_entry_the_database_may_hold_is_deleted_there() {
        let mut u = Unapplied::default();
        let db_max = HashMap::from([("svc:a".to_string(), 4)]);
        // Replaced, then removed: the database's older version must go.
        u.fold(batch(vec![entry("svc:a", 3, 1)], vec![]), &db_max);
        u.fold(batch(vec![], vec![("svc:a", 3), ("svc:a", 9)]), &db_max);
        let b = u.to_batch();
        assert!(b.append.is_empty());
        assert_eq!(b.remove, vec![("svc:a".to_string(), 3)]);
    }

    #[test]
    fn changes_are_counted_per_entry_across_logs() {
        let mut u = Unapplied::default();
        let db_max = HashMap::from([("svc:b".to_string(), 10)]);
        u.fold(
            batch(
                vec![
                    entry("svc:a", 1, 1),
                    entry("svc:a", 2, 1),
                    entry("svc:b", 11, 1),
                ],
                vec![("svc:b", 3), ("svc:c", 4)],
            ),
            &db_max,
        );
        // Three puts and one delete (svc:c has nothing in the database: nothing to delete).
        assert_eq!(u.len(), 4);
        // Replacing a put and deleting again change nothing; dropping a fresh put does.
        u.fold(
            batch(vec![entry("svc:a", 2, 2)], vec![("svc:b", 3), ("svc:a", 1)]),
            &db_max,
        );
        assert_eq!(u.len(), 3);
        let b = u.to_batch();
        let puts: Vec<_> = b
            .append
            .iter()
            .map(|e| (e.env.log.as_str(), e.env.seq, e.env.payload[0]))
            .collect();
        assert_eq!(puts, vec![("svc:a", 2, 2), ("svc:b", 11, 1)]);
        assert_eq!(b.remove, vec![("svc:b".to_string(), 3)]);
        u.fold(batch(vec![], vec![("svc:a", 2), ("svc:b", 11)]), &db_max);
        assert_eq!(u.len(), 1, "the delete of svc:b#3 stays");
        assert_eq!(u.put_bytes(), 0);
    }

    #[test]
    fn appended_again_after_its_removal_is_put_and_stays_fresh() {
        let mut u = Unapplied::default();
        let db_max = HashMap::new();
        u.fold(batch(vec![entry("svc:a", 1, 1)], vec![]), &db_max);
        u.fold(batch(vec![], vec![("svc:a", 1)]), &db_max);
        u.fold(batch(vec![entry("svc:a", 1, 2)], vec![]), &db_max);
        let b = u.to_batch();
        assert_eq!(b.append.len(), 1);
        assert_eq!(b.append[0].env.payload.as_ref(), &[2]);
        u.fold(batch(vec![], vec![("svc:a", 1)]), &db_max);
        assert!(u.is_empty(), "still fresh: never in the database");
        assert_eq!(u.put_bytes(), 0);
    }
}
