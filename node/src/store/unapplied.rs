//! Changes that are in the side log but not yet in the database.
//!
//! A `Fsync` or `Interval` store writes each commit to the side log (`wal.rs`) and folds it in
//! here; a *checkpoint* (`RedbStore::checkpoint`) later applies everything folded in one durable
//! database transaction and moves the side log to a new epoch. An entry appended and removed
//! between two checkpoints (the normal life of a message its consumer acknowledges quickly)
//! never reaches the database: folding its removal drops its append. A checkpoint that
//! commits bring on carries the youngest unsettled entries over to the new epoch's side-log
//! file instead ([`Unapplied::split`]): they stay here, and the next checkpoint writes those
//! still unsettled to the database.
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
    /// removal can simply forget the change. `carried`: a checkpoint already carried it over
    /// to the next side-log file once (see [`Unapplied::split`]); the next one writes it to
    /// the database.
    Put {
        entry: StoredEntry,
        fresh: bool,
        carried: bool,
    },
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
    /// Approximate bytes of the entries to put ([`entry_bytes`] each).
    put_bytes: usize,
    /// Of those, the bytes of fresh entries not carried before: what a checkpoint may carry
    /// (see [`Unapplied::database_bytes`]).
    young_bytes: usize,
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

    /// Approximate bytes a checkpoint would write for entries if it carried none over.
    #[cfg(test)]
    pub(super) fn put_bytes(&self) -> usize {
        self.put_bytes
    }

    /// Approximate bytes a checkpoint that carries up to `max_carry` bytes of young entries
    /// over would write to the database for entries: what it needs in free space.
    pub(super) fn database_bytes(&self, max_carry: usize) -> usize {
        self.put_bytes - self.young_bytes.min(max_carry)
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
            self.put(entry, |e| (!in_db(&e.env.log, e.env.seq), false));
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
                        .entry(log.to_string())
                        .or_default()
                        .insert(seq, Change::Delete);
                    (None, true)
                }
            };
            if added {
                self.entry_changes += 1;
            }
            if let Some(Change::Put {
                entry,
                fresh,
                carried,
            }) = old
            {
                let size = entry_bytes(&entry);
                self.put_bytes -= size;
                self.young_bytes -= if fresh && !carried { size } else { 0 };
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

    /// Folds in the put of `entry`. A put that replaces one keeps that one's flags (so it is
    /// young as that was); one that replaces a delete is neither fresh nor carried; a new one
    /// takes `new_flags(&entry)`, as `(fresh, carried)`.
    fn put(&mut self, entry: StoredEntry, new_flags: impl FnOnce(&StoredEntry) -> (bool, bool)) {
        let seq = entry.env.seq;
        let changes = self.entries.entry_ref(entry.env.log.as_str()).or_default();
        let (fresh, carried) = match changes.get(&seq) {
            Some(Change::Put { fresh, carried, .. }) => (*fresh, *carried),
            Some(Change::Delete) => (false, false),
            None => new_flags(&entry),
        };
        let young = fresh && !carried;
        let size = entry_bytes(&entry);
        self.put_bytes += size;
        self.young_bytes += if young { size } else { 0 };
        let put = Change::Put {
            entry,
            fresh,
            carried,
        };
        match changes.insert(seq, put) {
            Some(Change::Put { entry: old, .. }) => {
                let size = entry_bytes(&old);
                self.put_bytes -= size;
                self.young_bytes -= if young { size } else { 0 };
            }
            Some(Change::Delete) => {}
            None => self.entry_changes += 1,
        }
    }

    /// The folded change as one batch (entries in key order), as a checkpoint that carries
    /// nothing over writes it.
    #[cfg(test)]
    pub(super) fn to_batch(&self) -> Batch {
        self.split(0, 0).0
    }

    /// The folded change split for a checkpoint that carries young entries over: the batch
    /// for the database (entries in key order), and the entries to carry to the next
    /// side-log file. Those are the youngest (latest `created_at_ms`, then highest seq) of
    /// the fresh entries not carried before, up to `max_bytes` (as [`entry_bytes`] counts
    /// them) and `max_entries`. Leaves `self` as it is: once the checkpoint is committed the
    /// caller hands the carried entries to [`Unapplied::keep_carried`].
    pub(super) fn split(&self, max_bytes: usize, max_entries: usize) -> (Batch, Vec<StoredEntry>) {
        let mut batch = Batch::default();
        let mut young = Vec::new();
        for (log, changes) in &self.entries {
            for (seq, change) in changes {
                match change {
                    Change::Put {
                        entry,
                        fresh: true,
                        carried: false,
                    } if max_entries > 0 => young.push(entry),
                    Change::Put { entry, .. } => batch.append.push(entry.clone()),
                    Change::Delete => batch.remove.push((log.as_str().into(), *seq)),
                }
            }
        }
        young.sort_unstable_by_key(|e| std::cmp::Reverse((e.env.created_at_ms, e.env.seq)));
        let (mut bytes, mut carried) = (0, Vec::new());
        for entry in young {
            let size = entry_bytes(entry);
            if carried.len() < max_entries && bytes + size <= max_bytes {
                bytes += size;
                carried.push(entry.clone());
            } else {
                batch.append.push(entry.clone());
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
        (batch, carried)
    }

    /// Forgets everything (after a reopen replayed the side log).
    pub(super) fn clear(&mut self) {
        *self = Unapplied::default();
    }

    /// After a checkpoint: forgets everything but the entries it carried over, which stay
    /// unapplied (fresh, and marked so that the next checkpoint writes them to the database).
    pub(super) fn keep_carried(&mut self, carried: Vec<StoredEntry>) {
        self.clear();
        for entry in carried {
            self.put(entry, |_| (true, true));
        }
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
                headers: Default::default(),
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
            remove: remove.into_iter().map(|(l, s)| (l.into(), s)).collect(),
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
        assert_eq!(b.remove, vec![("svc:a".into(), 3)]);
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
        assert_eq!(b.remove, vec![("svc:b".into(), 3)]);
        u.fold(batch(vec![], vec![("svc:a", 2), ("svc:b", 11)]), &db_max);
        assert_eq!(u.len(), 1, "the delete of svc:b#3 stays");
        assert_eq!(u.put_bytes(), 0);
    }

    #[test]
    fn a_split_carries_the_youngest_fresh_entries_within_its_bounds_once() {
        let mut u = Unapplied::default();
        let db_max = HashMap::from([("svc:a".to_string(), 2)]);
        // #2 is in the database (a replacement, not fresh); #3..=#6 are fresh.
        u.fold(
            batch((2..=6).map(|q| entry("svc:a", q, 1)).collect(), vec![]),
            &db_max,
        );
        let one = entry_bytes(&entry("svc:a", 3, 1));
        let seqs = |es: &[StoredEntry]| es.iter().map(|e| e.env.seq).collect::<Vec<_>>();
        // What a checkpoint would write to the database, by how much it may carry.
        assert_eq!(u.database_bytes(0), 5 * one);
        assert_eq!(u.database_bytes(2 * one), 3 * one);
        assert_eq!(
            u.database_bytes(usize::MAX),
            one,
            "only #2 cannot be carried"
        );
        // Room for two by bytes: the two youngest fresh ones.
        let (b, carried) = u.split(2 * one + 1, 10);
        assert_eq!(seqs(&carried), vec![6, 5]);
        assert_eq!(seqs(&b.append), vec![2, 3, 4]);
        // By count.
        assert_eq!(seqs(&u.split(usize::MAX, 3).1), vec![6, 5, 4]);
        assert!(
            u.split(0, 0).1.is_empty(),
            "a full checkpoint carries nothing"
        );
        // Once carried, they stay unapplied and the next split writes them.
        u.keep_carried(carried);
        assert_eq!((u.len(), u.put_bytes()), (2, 2 * one));
        assert_eq!(u.database_bytes(usize::MAX), 2 * one, "not carried twice");
        u.fold(batch(vec![entry("svc:a", 7, 1)], vec![]), &db_max);
        assert_eq!(u.database_bytes(usize::MAX), 2 * one);
        let (b, carried) = u.split(usize::MAX, usize::MAX);
        assert_eq!(seqs(&carried), vec![7]);
        assert_eq!(seqs(&b.append), vec![5, 6]);
        // A carried entry settled before the next checkpoint is simply dropped.
        u.fold(
            batch(vec![], vec![("svc:a", 5), ("svc:a", 6), ("svc:a", 7)]),
            &db_max,
        );
        assert!(u.is_empty());
        assert_eq!((u.database_bytes(0), u.young_bytes), (0, 0));
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
