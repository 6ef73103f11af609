//! The durable log behind a small trait.
//!
//! [`RedbStore`] keeps one redb database file, `peerbus.redb`, in the node's
//! data directory; [`MemoryStore`] keeps the same data in memory (for
//! [`Durability::Memory`] and tests). The runtime's store writer calls
//! [`Store::commit`] with one [`Batch`] per group commit.
//!
//! Every record is stored as a CRC-32 of its bytes followed by its bincode
//! encoding. A record whose checksum or decoding fails is never returned as
//! data: [`Store::recover`] moves it to a `quarantine` table and reports it
//! with its table and key.
//!
//! The node keeps the index of its whole log in memory (the outbox), so
//! recovery reads every stored entry once at start.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::inbox::WindowSnapshot;
use crate::engine::wire::Envelope;

mod memory;
mod redb;

pub use self::memory::MemoryStore;
pub use self::redb::{LOCK_FILE, RedbStore, STORE_FILE};

/// An entry as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredEntry {
    /// The message.
    pub env: Envelope,
    /// Absolute expiry (Unix ms).
    pub expires_at_ms: Option<u64>,
    /// Absolute not-before (Unix ms).
    pub not_before_ms: Option<u64>,
}

/// A dead letter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Store-assigned id (0 before it is stored).
    pub id: u64,
    /// The message.
    pub env: Envelope,
    /// Why.
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// When (Unix ms).
    pub dead_at_ms: u64,
}

/// One atomic change.
#[derive(Default, Debug)]
pub struct Batch {
    /// New entries.
    pub append: Vec<StoredEntry>,
    /// Entries to delete.
    pub remove: Vec<(String, u64)>,
    /// Dedup windows.
    pub windows: Vec<WindowSnapshot>,
    /// Next sequence numbers.
    pub next_seqs: Vec<(String, u64)>,
    /// Dead letters.
    pub dead: Vec<DeadLetter>,
}

impl Batch {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.append.is_empty()
            && self.remove.is_empty()
            && self.windows.is_empty()
            && self.next_seqs.is_empty()
            && self.dead.is_empty()
    }
}

/// A record that failed its checksum.
#[derive(Clone, Debug)]
pub struct CorruptRecord {
    /// Table.
    pub table: &'static str,
    /// Key.
    pub key: String,
    /// Why.
    pub reason: String,
}

/// Everything recovered at start.
#[derive(Default, Debug)]
pub struct Recovered {
    /// Entries, by (log, seq).
    pub entries: Vec<StoredEntry>,
    /// Next seqs.
    pub next_seqs: Vec<(String, u64)>,
    /// Windows.
    pub windows: Vec<WindowSnapshot>,
    /// Dead letters count.
    pub dead_letters: usize,
    /// Corrupt records.
    pub corrupt: Vec<CorruptRecord>,
}

/// How durable `send`/`publish` are when they return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Each group commit is fsync'd before any of its `send` calls return. Survives process
    /// crashes, OS crashes and power loss (as far as the disk honours fsync). The default with a
    /// data directory. Concurrent sends share one fsync.
    Fsync,
    /// Commits are written to the file at once but fsync'd at most once per interval. Survives
    /// a process crash (the OS has the data); an OS crash or power loss can lose the entries of
    /// the last interval.
    Interval(Duration),
    /// Nothing is written to disk. Every entry not yet acknowledged is lost when the process
    /// stops, crashes or restarts. The default without a data directory.
    Memory,
}

/// Store figures since the store was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// fsyncs performed.
    pub fsyncs: u64,
    /// Commits (group commits) performed.
    pub commits: u64,
    /// Size of the database file in bytes (0 in memory).
    pub file_bytes: u64,
}

/// The store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process holds the data directory.
    #[error(
        "data directory {} is already in use by {}; stop that node or use another --data-dir",
        path.display(),
        pid.map_or_else(|| "another process".to_string(), |p| format!("pid {p}"))
    )]
    InUse {
        /// The data directory.
        path: PathBuf,
        /// The pid written in its lock file, when readable.
        pid: Option<u32>,
    },
    /// The database file is damaged beyond reading.
    #[error(
        "store file {} is corrupt ({reason}); move it aside to start with an empty log (its \
         unsent entries are then lost)",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What the database reported.
        reason: String,
    },
    /// The disk is full.
    #[error("disk full writing {}: nothing of this batch was stored; free space and retry", path.display())]
    Full {
        /// The file.
        path: PathBuf,
    },
    /// An I/O error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Any other database error.
    #[error("store: {0}")]
    Db(String),
}

/// A durable (or in-memory) log.
pub trait Store: Send + 'static {
    /// Applies a batch atomically (all or nothing) with the store's durability.
    fn commit(&mut self, batch: Batch) -> Result<(), StoreError>;
    /// Everything persisted, for a restart. Corrupt records are quarantined and reported in
    /// [`Recovered::corrupt`], never returned as data.
    fn recover(&mut self) -> Result<Recovered, StoreError>;
    /// Dead letters, oldest first, at most `limit`.
    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;
    /// Removes the dead letters with these ids and returns them (for replay).
    fn take_dead_letters(&mut self, ids: &[u64]) -> Result<Vec<DeadLetter>, StoreError>;
    /// Makes everything committed so far durable now.
    fn sync(&mut self) -> Result<(), StoreError>;
    /// Figures since opening.
    fn stats(&self) -> StoreStats;
}
