//! The in-memory store: the same behaviour as [`RedbStore`](super::RedbStore), nothing on disk.

use std::collections::BTreeMap;

use super::{Batch, DeadLetter, Recovered, Store, StoreError, StoreStats, StoredEntry};
use crate::engine::inbox::WindowSnapshot;
use crate::engine::wire::GroupState;
use smol_str::SmolStr;

/// A store that keeps everything in memory: all of it is lost when the process ends.
#[derive(Default, Debug, Clone)]
pub struct MemoryStore {
    entries: BTreeMap<(SmolStr, u64), StoredEntry>,
    seqs: BTreeMap<String, u64>,
    windows: BTreeMap<(Vec<u8>, String), WindowSnapshot>,
    dead: BTreeMap<u64, DeadLetter>,
    groups: BTreeMap<String, GroupState>,
    next_dead: u64,
    commits: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn commit(&mut self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        for e in batch.append {
            self.entries.insert((e.env.log.clone(), e.env.seq), e);
        }
        for k in batch.remove {
            self.entries.remove(&k);
        }
        for w in batch.windows {
            self.windows
                .insert((w.origin.as_bytes().to_vec(), w.log.clone()), w);
        }
        for (l, s) in batch.next_seqs {
            self.seqs.insert(l, s);
        }
        let above_last = self.dead.last_key_value().map(|(k, _)| k.saturating_add(1));
        let mut next = self.next_dead.max(above_last.unwrap_or(1)).max(1);
        for mut d in batch.dead {
            if d.id == 0 {
                d.id = next;
            }
            next = next.max(d.id.saturating_add(1));
            self.dead.insert(d.id, d);
        }
        self.next_dead = next;
        for (g, state) in batch.groups {
            match state {
                Some(s) => self.groups.insert(g, s),
                None => self.groups.remove(&g),
            };
        }
        self.commits += 1;
        Ok(())
    }

    fn recover(&mut self) -> Result<Recovered, StoreError> {
        Ok(Recovered {
            entries: self.entries.values().cloned().collect(),
            next_seqs: self.seqs.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            windows: self.windows.values().cloned().collect(),
            dead_letters: self.dead.len(),
            groups: self
                .groups
                .iter()
                .map(|(g, s)| (g.clone(), s.clone()))
                .collect(),
            corrupt: vec![],
        })
    }

    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self.dead.values().take(limit).cloned().collect())
    }

    fn take_dead_letters(&mut self, ids: &[u64]) -> Result<Vec<DeadLetter>, StoreError> {
        self.commits += 1;
        Ok(ids.iter().filter_map(|i| self.dead.remove(i)).collect())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.commits,
            ..StoreStats::default()
        }
    }
}
