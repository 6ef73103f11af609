//! The in-memory store.

use std::collections::BTreeMap;

use super::{Batch, DeadLetter, Recovered, Store, StoreError, StoreStats, StoredEntry};
use crate::engine::inbox::WindowSnapshot;

/// A store that keeps everything in memory: lost when the process ends.
#[derive(Default, Debug)]
pub struct MemoryStore {
    entries: BTreeMap<(String, u64), StoredEntry>,
    seqs: BTreeMap<String, u64>,
    windows: BTreeMap<(Vec<u8>, String), WindowSnapshot>,
    dead: BTreeMap<u64, DeadLetter>,
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
        for mut d in batch.dead {
            self.next_dead += 1;
            d.id = self.next_dead;
            self.dead.insert(d.id, d);
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
            corrupt: vec![],
        })
    }
    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self.dead.values().take(limit).cloned().collect())
    }
    fn take_dead_letters(&mut self, ids: &[u64]) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(ids.iter().filter_map(|i| self.dead.remove(i)).collect())
    }
    fn sync(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
    fn stats(&self) -> StoreStats {
        StoreStats {
            fsyncs: 0,
            commits: self.commits,
            file_bytes: 0,
        }
    }
}
