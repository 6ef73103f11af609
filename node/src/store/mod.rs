//! The durable log behind a small trait.
//!
//! [`RedbStore`] keeps one redb database file, `peerbus.redb`, in the node's
//! data directory; [`MemoryStore`] keeps the same data in memory (for
//! [`Durability::Memory`] and tests). The runtime's store writer calls
//! [`Store::commit`] with one [`Batch`] per group commit: one batch is one
//! record appended to the side log `peerbus.wal` and, with
//! [`Durability::Fsync`], one fsync, however many `send` calls it carries.
//! Checkpoints move what the side log holds into the database; an entry
//! removed before the next checkpoint (a message acknowledged quickly) is never
//! written to the database at all.
//!
//! Every record is stored as a CRC-32 of its bytes followed by its bincode
//! encoding. A record whose checksum or decoding fails is never returned as
//! data: [`Store::recover`] moves it to a `quarantine` table and reports it
//! with its table and key.
//!
//! Removed entries are deleted, so the file stops growing once delivery keeps
//! up: redb reuses the freed pages, and [`RedbStore::compact`] gives them back
//! to the file system.
//!
//! Known durable subscriber groups (group name -> [`GroupState`]: version and topic patterns,
//! learnt from peers) are stored too, in a `group_states` table, so a restarted publisher keeps
//! copies for every group it knew before any peer announces them again, and keeps the groups
//! it knows were released (tombstones), so older news of them cannot bring them back. Stores
//! written before versions existed hold a `groups` table of patterns alone: its rows read as
//! version 1 and move to `group_states` when the group next changes. The runtime remembers at
//! most 1024 live groups with at most 64 patterns each and 1024 released ones, so the tables
//! stay small.
//!
//! Memory: the node keeps the index of its whole log in memory (the outbox),
//! so [`Store::recover`] reads every stored entry, window and next-seq at once
//! (dead letters are only counted). Memory at start is therefore proportional
//! to the undelivered log, which the runtime bounds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use crate::engine::inbox::WindowSnapshot;
use crate::engine::wire::{Envelope, GroupState};

mod memory;
mod record;
mod redb;
#[cfg(test)]
mod tests;
mod unapplied;
mod wal;

pub use self::memory::MemoryStore;
pub use self::redb::{LOCK_FILE, RedbStore, STORE_FILE, WAL_FILE, WAL_FILE_ODD};

/// A log entry as stored, keyed by `(env.log, env.seq)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredEntry {
    /// The message (shared with the outbox entry it was stored for).
    pub env: Arc<Envelope>,
    /// When it expires and goes to the dead-letter store (Unix ms); `None`: never.
    pub expires_at_ms: Option<u64>,
    /// Not delivered before this time (Unix ms); `None`: at once.
    pub not_before_ms: Option<u64>,
}

/// A message that will not be delivered, kept with the reason until it is replayed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Id in the dead-letter store. Committing a dead letter with id 0 assigns the next free
    /// id (ids only grow, so id order is arrival order); a non-zero id is kept and replaces any
    /// dead letter with that id.
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

/// One atomic change: [`Store::commit`] applies all of it or nothing, in this order: append,
/// remove (so an entry appended and removed in one batch is gone), windows, next seqs, dead
/// letters, groups. Later items for the same key win.
#[derive(Clone, Default, Debug, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// New entries.
    pub append: Vec<StoredEntry>,
    /// Entries to delete.
    pub remove: Vec<(SmolStr, u64)>,
    /// Dedup windows.
    pub windows: Vec<WindowSnapshot>,
    /// Next sequence numbers.
    pub next_seqs: Vec<(String, u64)>,
    /// Dead letters.
    pub dead: Vec<DeadLetter>,
    /// Known durable subscriber groups: `Some(state)` stores the group's state (replacing
    /// what was stored; a released state is a tombstone), `None` forgets it (unknown: no-op).
    pub groups: Vec<(String, Option<GroupState>)>,
}

impl Batch {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.nothing_but_removes()
    }

    /// Whether the batch does nothing but remove entries (settled ones): nothing in it
    /// needs to be durable before anybody is answered.
    pub fn only_removes(&self) -> bool {
        !self.remove.is_empty() && self.nothing_but_removes()
    }

    /// Whether every part but `remove` is empty. Names every field, so a new one must be
    /// placed here (a part that must be durable would otherwise ride along unsynced).
    fn nothing_but_removes(&self) -> bool {
        let Batch {
            append,
            remove: _,
            windows,
            next_seqs,
            dead,
            groups,
        } = self;
        append.is_empty()
            && windows.is_empty()
            && next_seqs.is_empty()
            && dead.is_empty()
            && groups.is_empty()
    }
}

/// A stored record that failed its checksum or did not decode; it was moved to the
/// `quarantine` table (under `"<table>/<key>"`) and is not part of the recovered data.
#[derive(Clone, Debug)]
pub struct CorruptRecord {
    /// The table it was in: `entries`, `seqs`, `windows`, `dead`, `meta`, `groups` or
    /// `group_states`.
    pub table: &'static str,
    /// Its key, readable: `log#seq` for entries, `origin/log` for windows, the log name for
    /// seqs and the group name for groups, the id for dead letters (hex when the key itself is
    /// damaged).
    pub key: String,
    /// What was wrong (`checksum mismatch`, …).
    pub reason: String,
}

/// Everything recovered at start.
#[derive(Default, Debug)]
pub struct Recovered {
    /// Stored entries, sorted by `(log, seq)`.
    pub entries: Vec<StoredEntry>,
    /// Next sequence number per log, sorted by log.
    pub next_seqs: Vec<(String, u64)>,
    /// Persisted dedup windows.
    pub windows: Vec<WindowSnapshot>,
    /// Number of dead letters stored (list them with [`Store::dead_letters`]).
    pub dead_letters: usize,
    /// Known durable subscriber groups with their states (released ones included), sorted by
    /// group name.
    pub groups: Vec<(String, GroupState)>,
    /// Records found corrupt and quarantined (empty when all is well).
    pub corrupt: Vec<CorruptRecord>,
}

/// How durable `send`/`publish` are when they return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Each group commit is appended to the side log (`peerbus.wal`) and fsync'd before
    /// [`Store::commit`] returns, so before any of its `send` calls return. Survives process
    /// crashes, OS crashes and power loss (as far as the disk honours fsync). Concurrent sends
    /// share one fsync. The default with a data directory. A commit that only removes settled
    /// entries is written but not fsync'd on its own: the next fsync covers it, and an OS crash
    /// before then can bring those entries back to be sent again (a duplicate, never a loss).
    Fsync,
    /// Commits are not fsync'd; the next commit after the interval has elapsed is (and so is
    /// [`Store::sync`], a stop, and every checkpoint, at the latest once 16 MiB are logged).
    /// Every commit is written with one `write` to the side log (`peerbus.wal`) before it
    /// returns, so it **survives a process crash** (kill -9, panic, abort): the next open
    /// replays it. An **OS crash or power loss loses the commits since the last fsync**: at
    /// most one interval's worth while commits keep coming; if they stop, the unsynced tail
    /// waits for the next commit, `sync` or stop. `Interval(Duration::ZERO)` behaves like
    /// `Fsync`.
    Interval(Duration),
    /// Nothing is written to disk: every entry not yet acknowledged is lost when the process
    /// stops, crashes or restarts. The default without a data directory (the node then uses
    /// [`MemoryStore`]). A [`RedbStore`] opened with `Memory` never fsyncs and reaches the file
    /// only when it is dropped cleanly or [`Store::sync`] is called.
    Memory,
}

/// Store figures since the store was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// fsyncs: of the side log (one per `Fsync` commit, one per interval with `Interval`) and
    /// of the database (each checkpoint, and the commit made when opening).
    pub fsyncs: u64,
    /// Commits: one per non-empty [`Store::commit`] (a side-log record, or a database
    /// transaction with `Memory`), plus `Memory` syncs, dead-letter takes and quarantine moves.
    pub commits: u64,
    /// Bytes of the database file plus the side log (0 in memory).
    pub file_bytes: u64,
    /// Checkpoints: database transactions that moved what the side log held (see
    /// [`RedbStore::checkpoint`]). 0 without a side log.
    pub checkpoints: u64,
    /// Entries those checkpoints wrote to the database: the ones not yet settled when each
    /// ran, except those carried over ([`StoreStats::carried_entries`]). While consumers keep
    /// up these are the entries in flight, written to the database and soon deleted again, so
    /// many of them per message sent is a cost of load, not of backlog.
    pub checkpointed_entries: u64,
    /// Time spent in checkpoints, in microseconds; commits wait meanwhile.
    pub checkpoint_micros: u64,
    /// Entries checkpoints carried over into the next side-log file instead of writing them
    /// to the database: young entries not yet settled, each carried at most once (a
    /// checkpoint carries at most 4 MiB of them; the next one writes those still unsettled to
    /// the database).
    pub carried_entries: u64,
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
    /// The database file is damaged beyond reading (single damaged records are quarantined
    /// instead, see [`Store::recover`]).
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
    /// The disk is full (`ENOSPC`). Nothing of the failed call was stored.
    #[error("disk full writing {}: nothing of this batch was stored; free space and retry", path.display())]
    Full {
        /// The file.
        path: PathBuf,
    },
    /// Any other I/O error on the data directory, its lock file or the database file.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error (in the message, not a [`source`](std::error::Error::source)).
        error: std::io::Error,
    },
    /// Any other database error (including use of a read-only store for writing).
    #[error("store: {0}")]
    Db(String),
}

/// A durable (or in-memory) log.
///
/// After [`StoreError::Io`] or [`StoreError::Full`] nothing of the failed call was stored and
/// the store is still usable: it reopens its file on the next call (retry once space is free).
pub trait Store: Send + 'static {
    /// Applies a batch atomically (all or nothing) with the store's [`Durability`]. An empty
    /// batch does nothing.
    fn commit(&mut self, batch: Batch) -> Result<(), StoreError>;
    /// Everything persisted, for a restart: entries sorted by `(log, seq)`, next seqs, windows,
    /// known groups and the dead-letter count. Records whose checksum fails, that do not decode or whose key
    /// does not match their content are moved to the `quarantine` table, logged at warn and
    /// reported in [`Recovered::corrupt`] — never returned as data.
    fn recover(&mut self) -> Result<Recovered, StoreError>;
    /// At most `limit` dead letters, oldest first (corrupt ones are skipped and logged).
    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError>;
    /// Removes the dead letters with these ids and returns them, in the order asked (for
    /// replay). Unknown ids are ignored. Durable when it returns, except with
    /// [`Durability::Memory`].
    fn take_dead_letters(&mut self, ids: &[u64]) -> Result<Vec<DeadLetter>, StoreError>;
    /// Makes everything committed so far durable now (an fsync when anything is unsynced).
    fn sync(&mut self) -> Result<(), StoreError>;
    /// Figures since opening.
    fn stats(&self) -> StoreStats;
}
