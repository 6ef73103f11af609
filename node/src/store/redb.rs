//! The redb store: one database file in the data directory, guarded by an
//! exclusive lock file that names the owning process.
//!
//! With `Fsync` and `Interval` durability a [`Store::commit`] is one record
//! appended to the side log `peerbus.wal` (fsync'd at once with `Fsync`,
//! once per interval with `Interval`) and folded into [`Unapplied`]; a
//! *checkpoint* applies what was folded to the database in one durable
//! transaction. An entry appended and removed between two checkpoints never
//! reaches the database, so a quickly acknowledged message costs one sequential
//! write instead of a B-tree insert, a delete and a database fsync.
//! With `Memory` durability a commit is one non-durable redb transaction.
//!
//! Invariant: a durable database commit of a logged store stores a new
//! side-log epoch, whose file starts with a record written and fsync'd before
//! that commit: the entries a checkpoint carried over, or none (see `wal.rs`).
//! It happens only when nothing but those entries is unapplied (a checkpoint,
//! or after one).
//! Invariant: every record in the side log of the current epoch has been
//! folded into `unapplied`, and `unapplied` holds nothing else. A failed
//! checkpoint leaves both as they were; the database is reopened (without a
//! replay) before the next operation, as redb asks after an I/O error.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::{
    Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use tracing::{info, warn};

use super::record::{describe_key, entry_key, open_sealed, parse_entry_key, seal, window_key};
use super::unapplied::Unapplied;
use super::wal::{WAL_MAX_BYTES, Wal};
use super::{
    Batch, CorruptRecord, DeadLetter, Durability, Recovered, Store, StoreError, StoreStats,
    StoredEntry,
};
use crate::engine::inbox::WindowSnapshot;
use crate::engine::wire::GroupState;

/// Database file name inside the data directory.
pub const STORE_FILE: &str = "peerbus.redb";
/// Lock file name inside the data directory (holds the owner's pid).
pub const LOCK_FILE: &str = "peerbus.lock";
/// Side log of [`Durability::Fsync`] and [`Durability::Interval`] stores inside the data
/// directory, for even epochs (holding no record after a clean stop).
pub const WAL_FILE: &str = "peerbus.wal";
/// The side log's file for odd epochs, beside [`WAL_FILE`] (holding no record after a clean
/// stop). A
/// checkpoint writes the entries it carries over at the start of the file of the next epoch
/// (ARCHITECTURE, "Durability").
pub const WAL_FILE_ODD: &str = "peerbus.wal.1";

/// Most changes held unapplied (entries to put or delete, windows, …) before a checkpoint
/// writes them to the database: bounds the memory they take and the replay after a crash.
const MAX_UNAPPLIED: usize = 65_536;
/// Most bytes of entries held unapplied: bounds the free space a checkpoint needs (a backlog
/// moves into the database in steps of this size; entries acknowledged quickly never count).
const MAX_UNAPPLIED_BYTES: usize = 4 << 20;
/// Most bytes of entries a checkpoint carries over to the next side-log file instead of
/// writing them to the database: a quarter of the side log's bound. Young entries a
/// checkpoint could carry do not count towards [`MAX_UNAPPLIED_BYTES`] up to this much
/// ([`Unapplied::database_bytes`]), so that bound stays the free space a checkpoint needs;
/// unsettled entries take up to both in memory (most of them shared with the outbox).
const CARRY_MAX_BYTES: usize = (WAL_MAX_BYTES / 4) as usize;
/// Most entries a checkpoint carries over: a quarter of [`MAX_UNAPPLIED`], which they still
/// count towards (the next checkpoint writes those still unsettled to the database).
const CARRY_MAX_ENTRIES: usize = MAX_UNAPPLIED / 4;
/// Longest time between checkpoints while commits come.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

pub(super) const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
const SEQS: TableDefinition<&str, &[u8]> = TableDefinition::new("seqs");
const WINDOWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("windows");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Known durable groups as stores written before group versions hold them: group name ->
/// sealed `(group, patterns)`, read as version 1. A group's row moves to [`GROUP_STATES`] when
/// the group next changes.
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
/// Known durable groups, released ones included: group name -> sealed `(group, GroupState)`.
const GROUP_STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("group_states");
const QUARANTINE: TableDefinition<&str, &[u8]> = TableDefinition::new("quarantine");

const META_NEXT_DEAD: &str = "next_dead_id";
const META_WAL_EPOCH: &str = "wal_epoch";

enum Db {
    Rw(Database),
    Ro(ReadOnlyDatabase),
}

/// A store in `<data_dir>/peerbus.redb`.
///
/// Opening takes `<data_dir>/peerbus.lock` for as long as the value lives; dropping it makes
/// everything committed durable (a final fsync) and releases the lock.
pub struct RedbStore {
    /// `None` after an I/O error: redb must be reopened before the next operation.
    db: Option<Db>,
    dir: PathBuf,
    path: PathBuf,
    durability: Durability,
    /// Present with `Fsync` and `Interval` durability (see the module docs).
    wal: Option<Wal>,
    /// Committed to the side log, not yet to the database.
    unapplied: Unapplied,
    /// Per log, the highest seq the database may hold (see [`Unapplied::fold`]).
    db_max: HashMap<String, u64>,
    /// The side log has records not yet fsync'd (`Interval`).
    unsynced: bool,
    /// The side log has not been replayed since this value was created: `unapplied` does not
    /// hold its records yet. Once it has, a reopen after an error keeps `unapplied` and the side
    /// log as they are (a failed checkpoint changed neither), so it needs no free space.
    needs_replay: bool,
    /// The next move to a new epoch panics after writing the epoch's first record, as redb
    /// might (tests).
    #[cfg(test)]
    panic_in_epoch_move: bool,
    last_checkpoint: Instant,
    /// Side-log epoch stored in the database.
    epoch: u64,
    /// Commits since the last fsync (`Memory` mode).
    pending: bool,
    /// Checkpoint before the next commit: the side log could not be cut back, so what it holds
    /// must move to a new epoch.
    force_durable: bool,
    last_fsync: Instant,
    fsyncs: u64,
    commits: u64,
    /// Checkpoints made, the entries they wrote and their time (for [`StoreStats`]).
    checkpoints: u64,
    checkpointed_entries: u64,
    checkpoint_micros: u64,
    carried_entries: u64,
    /// Size of the database file as last read for [`Store::stats`]; `None` once a database
    /// commit, open or compaction may have changed it (a side-log commit does not, so the
    /// writer's stats after each commit need no `stat`).
    db_bytes: std::cell::Cell<Option<u64>>,
    /// The database was open at least once. Until it has been, there is nothing to make
    /// durable, so dropping the store only releases the lock (a store whose open failed, a
    /// corrupt file say, otherwise tried the open again and logged its error a second time).
    opened: bool,
    _lock: File,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("read_only", &matches!(self.db, Some(Db::Ro(_))))
            .finish_non_exhaustive()
    }
}

/// A raw key of a record found corrupt, to move it.
enum BadKey {
    Bytes(Vec<u8>),
    Str(String),
    Id(u64),
}

struct Bad {
    table: &'static str,
    key: BadKey,
    value: Vec<u8>,
    report: CorruptRecord,
}

impl RedbStore {
    /// Opens (creating) `<dir>/peerbus.redb` with the given durability.
    ///
    /// Takes an exclusive lock on `<dir>/peerbus.lock` and writes this process's pid into it: a
    /// second process (or a second open in this one) gets [`StoreError::InUse`] naming that pid.
    /// A damaged or truncated database file gives [`StoreError::Corrupt`]. After a crash the file
    /// is repaired first (redb walks it; this takes longer on large files) and the `Interval`
    /// side log is replayed.
    pub fn open(dir: &Path, durability: Durability) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        Self::open_in(dir, durability)
    }

    /// [`RedbStore::open`] for a directory that already holds a store (tooling that changes a
    /// stopped node's store): fails with [`StoreError::Io`] (not found) where `open` would
    /// make a new one.
    pub fn open_existing(dir: &Path, durability: Durability) -> Result<RedbStore, StoreError> {
        store_file_in(dir)?;
        Self::open_in(dir, durability)
    }

    fn open_in(dir: &Path, durability: Durability) -> Result<RedbStore, StoreError> {
        let lock = lock_dir(dir)?;
        let mut store = RedbStore::new(dir, durability, lock);
        store.open_rw()?;
        Ok(store)
    }

    /// Opens a stopped node's directory to inspect it (`peerbus status`, `dlq list`).
    ///
    /// Fails with [`StoreError::InUse`] while a node runs there, and with [`StoreError::Io`]
    /// (not found) when the directory holds no store. Nothing is written, except when the node
    /// did not stop cleanly: then the file is repaired and the side log replayed first, exactly
    /// as the node's next start would. [`Store::recover`] on a read-only store reports corrupt
    /// records without moving them to quarantine; [`Store::commit`] and
    /// [`Store::take_dead_letters`] fail.
    pub fn open_read_only(dir: &Path) -> Result<RedbStore, StoreError> {
        let path = store_file_in(dir)?;
        let lock = lock_dir(dir)?;
        let mut store = RedbStore::new(dir, Durability::Fsync, lock);
        let wal_empty = Wal::is_empty_in(dir);
        let opened = guard(&path, || {
            ReadOnlyDatabase::open(&path).map_err(|e| open_error(&path, e.into()))
        });
        match opened {
            Ok(db) if wal_empty => {
                store.db = Some(Db::Ro(db));
                store.opened = true;
                return Ok(store);
            }
            // Closed first: redb refuses a writable open while a reader holds the file.
            Ok(db) => drop(db),
            // redb asks for a repair (or cannot read a format): the writable open says which.
            Err(StoreError::Db(_)) => {}
            Err(e) => return Err(e),
        }
        info!(path = %path.display(), "store was not closed cleanly; repairing it before reading");
        store.open_rw()?;
        Ok(store)
    }

    fn new(dir: &Path, durability: Durability, lock: File) -> RedbStore {
        RedbStore {
            db: None,
            dir: dir.to_path_buf(),
            path: dir.join(STORE_FILE),
            durability,
            wal: None,
            unapplied: Unapplied::default(),
            db_max: HashMap::new(),
            unsynced: false,
            needs_replay: true,
            #[cfg(test)]
            panic_in_epoch_move: false,
            last_checkpoint: Instant::now(),
            epoch: 0,
            pending: false,
            force_durable: false,
            last_fsync: Instant::now(),
            fsyncs: 0,
            commits: 0,
            checkpoints: 0,
            checkpointed_entries: 0,
            checkpoint_micros: 0,
            carried_entries: 0,
            db_bytes: std::cell::Cell::new(None),
            opened: false,
            _lock: lock,
        }
    }

    /// Opens the database for writing, creates the tables and replays the side log.
    fn open_rw(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let db = guard(&path, || {
            Database::create(&path).map_err(|e| open_error(&path, e.into()))
        })?;
        let txn = db.begin_write().or_store(&path)?;
        let epoch = {
            txn.open_table(ENTRIES).or_store(&path)?;
            txn.open_table(SEQS).or_store(&path)?;
            txn.open_table(WINDOWS).or_store(&path)?;
            txn.open_table(DEAD).or_store(&path)?;
            txn.open_table(GROUPS).or_store(&path)?;
            txn.open_table(GROUP_STATES).or_store(&path)?;
            txn.open_table(QUARANTINE).or_store(&path)?;
            let meta = txn.open_table(META).or_store(&path)?;
            let epoch = meta.get(META_WAL_EPOCH).or_store(&path)?;
            epoch.and_then(|v| open_sealed::<u64>(v.value()).ok())
        };
        txn.commit().or_store(&path)?;
        self.db_bytes.set(None);
        self.epoch = epoch.unwrap_or(0);
        self.db = Some(Db::Rw(db));
        self.opened = true;
        self.fsyncs += 1;
        if !self.needs_replay {
            // `db_max` is still an upper bound: checkpoints raise it before they commit.
            return Ok(());
        }
        let logged = self.logged();
        if self.wal.is_none() && (logged || Wal::exists_in(&self.dir)) {
            self.wal = Some(Wal::open(&self.dir, self.epoch)?);
        }
        // Replaying applies every record of the current epoch, so nothing is unapplied after.
        self.unapplied.clear();
        let replayed = self.replay();
        // A store that no longer logs keeps no side log once its records are in the database.
        if !logged && self.wal.take().is_some() && replayed.is_ok() {
            Wal::remove_in(&self.dir)?;
        }
        if let Err(e) = replayed {
            // Retried by the next operation: nothing may be committed past an unreplayed log.
            self.db = None;
            return Err(e);
        }
        self.needs_replay = false;
        self.unsynced = false;
        self.last_checkpoint = Instant::now();
        if logged {
            self.db_max = self.read_db_max()?;
        }
        Ok(())
    }

    /// Whether commits go through the side log (`Fsync` and `Interval`).
    fn logged(&self) -> bool {
        self.durability != Durability::Memory
    }

    /// The highest stored seq of each log.
    fn read_db_max(&mut self) -> Result<HashMap<String, u64>, StoreError> {
        let path = self.path.clone();
        guard(&path.clone(), || self.read_db_max_inner(&path))
    }

    fn read_db_max_inner(&mut self, path: &Path) -> Result<HashMap<String, u64>, StoreError> {
        let read = self.reader()?;
        let entries = read.open_table(ENTRIES).or_store(path)?;
        let mut max = HashMap::new();
        for item in entries.iter().or_store(path)? {
            let (k, _) = item.or_store(path)?;
            if let Some((log, seq)) = parse_entry_key(k.value()) {
                let m = max.entry(log).or_insert(seq);
                *m = (*m).max(seq);
            }
        }
        Ok(max)
    }

    /// Applies everything committed to the side log but not yet to the database in one durable
    /// transaction that starts a new side-log epoch, whose file starts empty. The store
    /// checkpoints on its own after commits (at 65,536 unapplied changes, 4 MiB of unapplied
    /// entries, 16 MiB of side log, or 5 s while commits come; those checkpoints carry young
    /// unsettled entries over to the next epoch's file instead), before reading, and when it
    /// is dropped; call it to do it now.
    ///
    /// If it fails, nothing is lost: the side log still holds every commit, and the database is
    /// reopened (replaying the side log) before the next operation.
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.checkpoint_carrying(false)
    }

    /// A checkpoint; with `carry`, the young entries not yet settled (within
    /// [`CARRY_MAX_BYTES`] and [`CARRY_MAX_ENTRIES`], each at most once) are written to the
    /// start of the next epoch's side-log file instead of the database, where most would be
    /// deleted again soon after (ARCHITECTURE, "Durability"). Only the checkpoints that
    /// commits bring on carry: the others come before a read of the database or a clean stop,
    /// which need everything there.
    fn checkpoint_carrying(&mut self, carry: bool) -> Result<(), StoreError> {
        let path = self.path.clone();
        let r = guard(&path, || self.checkpoint_inner(carry));
        if r.is_err() && matches!(self.db, Some(Db::Rw(_))) {
            warn!(path = %self.path.display(), "store checkpoint failed; reopening the database (replaying its side log) before the next operation");
            self.db = None;
        }
        r
    }

    fn checkpoint_inner(&mut self, carry: bool) -> Result<(), StoreError> {
        if self.db.is_none() {
            self.open_rw()?;
        }
        if !matches!(self.db, Some(Db::Rw(_))) || self.wal.is_none() {
            return Ok(());
        }
        let has_commits = self.wal.as_ref().is_some_and(Wal::has_commits);
        if self.unapplied.is_empty() && !has_commits && !self.force_durable {
            self.last_checkpoint = Instant::now();
            return Ok(());
        }
        let started = Instant::now();
        let path = self.path.clone();
        let (mut batch, carried) = self.split_for_checkpoint(carry);
        let entries = batch.append.len() as u64;
        // Raised before the commit: an upper bound stays right whether or not the commit lands,
        // so a reopen after a failure need not read the entries again.
        for e in &batch.append {
            match self.db_max.get_mut(e.env.log.as_str()) {
                Some(m) => *m = (*m).max(e.env.seq),
                None => {
                    self.db_max.insert(e.env.log.to_string(), e.env.seq);
                }
            }
        }
        let txn = self.begin(true)?;
        apply(&txn, &mut batch, &path)?;
        self.finish_carrying(txn, true, &carried)?;
        self.carried_entries += carried.append.len() as u64;
        self.unapplied.keep_carried(carried.append);
        self.unsynced = false;
        self.last_checkpoint = Instant::now();
        self.checkpoints += 1;
        self.checkpointed_entries += entries;
        self.checkpoint_micros += started.elapsed().as_micros() as u64;
        Ok(())
    }

    /// What a checkpoint writes: the batch for the database, and the first record of the next
    /// epoch's side-log file (the young entries it carries over when `carry`, else nothing).
    fn split_for_checkpoint(&self, carry: bool) -> (Batch, Batch) {
        let (max_bytes, max_entries) = if carry {
            (CARRY_MAX_BYTES, CARRY_MAX_ENTRIES)
        } else {
            (0, 0)
        };
        let (batch, carried) = self.unapplied.split(max_bytes, max_entries);
        let first = Batch {
            append: carried,
            ..Batch::default()
        };
        (batch, first)
    }

    /// Applies the side log's records of the stored epoch (if there is a side log) in one
    /// durable commit that starts a new epoch (whose file starts with an empty record, see
    /// [`Wal`]).
    fn replay(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let epoch = self.epoch;
        let Some(wal) = &mut self.wal else {
            return Ok(());
        };
        let (batches, next) = wal.read(epoch)?;
        if batches.is_empty() {
            wal.switch(epoch, 0);
            return Ok(());
        }
        let n = batches.len();
        let txn = self.begin(true)?;
        for mut b in batches {
            apply(&txn, &mut b, &path)?;
        }
        // A new epoch: these records are never applied again.
        self.commit_epoch(txn, next, &Batch::default())?;
        info!(
            batches = n,
            "replayed the store's side log (commits not yet fsync'd when the node stopped)"
        );
        Ok(())
    }

    /// Grows the side log with zeros to what one round of records between checkpoints takes
    /// (17 MiB), so commits overwrite blocks the file already has and each fsync flushes the
    /// records alone, not the file's size and block map (on this project's ext4 test machine,
    /// `dd oflag=dsync` of 32 KiB blocks took 0.17 ms each overwriting and 0.29 ms appending).
    /// A node calls it once after opening; a clean
    /// stop empties the file again. Does nothing with `Memory` durability or read-only. An error
    /// (a full disk) only means commits stay slower.
    pub fn preallocate_side_log(&mut self) -> Result<(), StoreError> {
        match &mut self.wal {
            Some(wal) if matches!(self.db, Some(Db::Rw(_))) => {
                wal.preallocate(WAL_MAX_BYTES + (1 << 20))
            }
            _ => Ok(()),
        }
    }

    /// Shrinks the file after many entries were removed: freed pages are given back to the
    /// file system. Checkpoints (and so makes everything committed durable) first. Returns
    /// whether the file changed.
    pub fn compact(&mut self) -> Result<bool, StoreError> {
        self.sync()?;
        self.checkpoint()?;
        let path = self.path.clone();
        self.db_bytes.set(None);
        self.rw()?.compact().or_store(&path)
    }

    /// Bytes of the database file (read again only after it may have changed).
    fn db_file_bytes(&self) -> u64 {
        if let Some(n) = self.db_bytes.get() {
            return n;
        }
        match std::fs::metadata(&self.path) {
            Ok(m) => {
                self.db_bytes.set(Some(m.len()));
                m.len()
            }
            Err(_) => 0,
        }
    }

    /// The writable database, reopened after an earlier I/O error.
    fn rw(&mut self) -> Result<&mut Database, StoreError> {
        if self.db.is_none() {
            self.open_rw()?;
        }
        match &mut self.db {
            Some(Db::Rw(db)) => Ok(db),
            _ => Err(StoreError::Db(format!(
                "{} is open read-only (for inspection); stop using it to change data",
                self.path.display()
            ))),
        }
    }

    fn reader(&mut self) -> Result<ReadTransaction, StoreError> {
        if self.db.is_none() {
            self.open_rw()?;
        }
        let path = &self.path;
        match &self.db {
            Some(Db::Rw(db)) => db.begin_read().or_store(path),
            Some(Db::Ro(db)) => db.begin_read().or_store(path),
            None => Err(StoreError::Db("store closed".into())),
        }
    }

    /// Whether a commit now must fsync the side log.
    fn sync_due(&self) -> bool {
        match self.durability {
            Durability::Fsync => true,
            Durability::Interval(every) => self.last_fsync.elapsed() >= every,
            Durability::Memory => false,
        }
    }

    /// Whether a commit should be followed by a checkpoint.
    fn checkpoint_due(&self) -> bool {
        self.unapplied.len() >= MAX_UNAPPLIED
            || self.unapplied.database_bytes(CARRY_MAX_BYTES) >= MAX_UNAPPLIED_BYTES
            || self.wal.as_ref().is_some_and(|w| w.len() >= WAL_MAX_BYTES)
            || self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY
    }

    fn begin(&mut self, durable: bool) -> Result<WriteTransaction, StoreError> {
        let path = self.path.clone();
        let mut txn = self.rw()?.begin_write().or_store(&path)?;
        let level = if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        txn.set_durability(level)
            .map_err(|e| StoreError::Db(e.to_string()))?;
        Ok(txn)
    }

    /// Commits; a durable commit also starts a new side-log epoch, in the other file (which
    /// starts with an empty record, see [`Wal`]).
    fn finish(&mut self, txn: WriteTransaction, durable: bool) -> Result<(), StoreError> {
        self.finish_carrying(txn, durable, &Batch::default())
    }

    /// [`RedbStore::finish`], whose new epoch's file starts with the entries of `carried`
    /// (the young entries a checkpoint leaves in the side log).
    fn finish_carrying(
        &mut self,
        txn: WriteTransaction,
        durable: bool,
        carried: &Batch,
    ) -> Result<(), StoreError> {
        if durable && self.wal.is_some() {
            return self.commit_epoch(txn, self.epoch + 1, carried);
        }
        self.commit_txn(txn, durable)
    }

    /// Commits `txn` durably as the move to side-log epoch `next`: `next`'s first record
    /// (`carried`, or nothing) is written at the start of its file and fsync'd before the
    /// database stores the epoch, then the side log goes on in that file. Every move to an
    /// epoch goes through here, checkpoints and replays alike, so a record an abandoned move
    /// left in that file is never read (ARCHITECTURE, "Durability"). The side log stays in
    /// `self` throughout, so a failure anywhere (a panic inside redb included, which the
    /// caller's `guard` turns into an error) leaves the store able to commit again.
    fn commit_epoch(
        &mut self,
        txn: WriteTransaction,
        next: u64,
        carried: &Batch,
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let Some(wal) = &mut self.wal else {
            return Err(StoreError::Db("the store's side log is not open".into()));
        };
        let first = wal.prepare(next, carried)?;
        self.fsyncs += 1;
        #[cfg(test)]
        if std::mem::take(&mut self.panic_in_epoch_move) {
            panic!("injected: the database library failed moving to epoch {next}");
        }
        {
            let mut meta = txn.open_table(META).or_store(&path)?;
            meta.insert(META_WAL_EPOCH, seal(&next)?.as_slice())
                .or_store(&path)?;
        }
        self.commit_txn(txn, true)?;
        self.epoch = next;
        if let Some(wal) = &mut self.wal {
            wal.switch(next, first);
        }
        Ok(())
    }

    /// Commits `txn` (durably or not) and counts it.
    fn commit_txn(&mut self, txn: WriteTransaction, durable: bool) -> Result<(), StoreError> {
        let committed = txn.commit().or_store(&self.path);
        self.db_bytes.set(None);
        committed?;
        self.commits += 1;
        if durable {
            self.fsyncs += 1;
            self.last_fsync = Instant::now();
            self.pending = false;
            self.force_durable = false;
        } else {
            self.pending = true;
        }
        Ok(())
    }

    /// After an I/O error redb refuses further work until reopened: drop it now, reopen lazily.
    fn after<T>(&mut self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Io { .. } | StoreError::Full { .. }) = &r
            && matches!(self.db, Some(Db::Rw(_)))
        {
            warn!(path = %self.path.display(), "store I/O failed; reopening the database before the next operation");
            self.db = None;
        }
        r
    }

    fn commit_inner(&mut self, mut batch: Batch) -> Result<(), StoreError> {
        if !self.logged() {
            let path = self.path.clone();
            let txn = self.begin(false)?;
            apply(&txn, &mut batch, &path)?;
            return self.finish(txn, false);
        }
        self.rw()?;
        if self.force_durable {
            self.checkpoint_carrying(true)?;
        }
        // A batch that only removes entries is not synced on its own: losing it in a crash
        // sends those entries again (the at-least-once promise allows a duplicate), and the
        // next synced commit, a sync or a checkpoint makes it durable with everything
        // before it. So `Fsync`'s callers never wait behind an fsync that holds no send.
        let sync = self.sync_due() && !batch.only_removes();
        let Some(wal) = &mut self.wal else {
            return Err(StoreError::Db("the store's side log is not open".into()));
        };
        let before = wal.len();
        let mut written = wal.append(self.epoch, &batch);
        if written.is_ok() && sync {
            written = wal.sync();
            if written.is_err() {
                wal.cut(before);
            }
        }
        if let Err(e) = written {
            if wal.len() != before {
                self.force_durable = true;
            }
            return Err(e);
        }
        self.commits += 1;
        if sync {
            self.fsyncs += 1;
            // Only `Interval` reads it (with `Fsync` every commit but a removal syncs): no
            // clock read.
            if matches!(self.durability, Durability::Interval(_)) {
                self.last_fsync = Instant::now();
            }
            self.unsynced = false;
        } else {
            self.unsynced = true;
        }
        self.unapplied.fold(batch, &self.db_max);
        if self.checkpoint_due()
            && let Err(e) = self.checkpoint_carrying(true)
        {
            // The commit itself is safe in the side log; the next one retries.
            warn!(error = %e, path = %self.path.display(), "store checkpoint failed");
        }
        Ok(())
    }

    fn recover_inner(&mut self) -> Result<Recovered, StoreError> {
        self.checkpoint()?;
        let path = self.path.clone();
        let mut rec = Recovered::default();
        let mut bad: Vec<Bad> = Vec::new();
        let mut flag = |table: &'static str, key: BadKey, raw: &[u8], value: &[u8], reason| {
            bad.push(Bad {
                table,
                key,
                value: value.to_vec(),
                report: CorruptRecord {
                    table,
                    key: describe_key(table, raw),
                    reason,
                },
            })
        };
        {
            let read = self.reader()?;
            let entries = read.open_table(ENTRIES).or_store(&path)?;
            for item in entries.iter().or_store(&path)? {
                let (k, v) = item.or_store(&path)?;
                let (k, v) = (k.value(), v.value());
                match open_sealed::<StoredEntry>(v) {
                    Ok(e) if entry_key(&e.env.log, e.env.seq) == k => rec.entries.push(e),
                    Ok(_) => flag(
                        "entries",
                        BadKey::Bytes(k.to_vec()),
                        k,
                        v,
                        "key does not match the record".into(),
                    ),
                    Err(reason) => flag("entries", BadKey::Bytes(k.to_vec()), k, v, reason),
                }
            }
            let seqs = read.open_table(SEQS).or_store(&path)?;
            for item in seqs.iter().or_store(&path)? {
                let (k, v) = item.or_store(&path)?;
                let (k, v) = (k.value(), v.value());
                match open_sealed::<u64>(v) {
                    Ok(next) => rec.next_seqs.push((k.to_string(), next)),
                    Err(reason) => {
                        flag("seqs", BadKey::Str(k.to_string()), k.as_bytes(), v, reason)
                    }
                }
            }
            let windows = read.open_table(WINDOWS).or_store(&path)?;
            for item in windows.iter().or_store(&path)? {
                let (k, v) = item.or_store(&path)?;
                let (k, v) = (k.value(), v.value());
                match open_sealed::<WindowSnapshot>(v) {
                    Ok(w) if window_key(&w.origin, &w.log) == k => rec.windows.push(w),
                    Ok(_) => flag(
                        "windows",
                        BadKey::Bytes(k.to_vec()),
                        k,
                        v,
                        "key does not match the record".into(),
                    ),
                    Err(reason) => flag("windows", BadKey::Bytes(k.to_vec()), k, v, reason),
                }
            }
            let dead = read.open_table(DEAD).or_store(&path)?;
            for item in dead.iter().or_store(&path)? {
                let (k, v) = item.or_store(&path)?;
                let (id, v) = (k.value(), v.value());
                match open_sealed::<DeadLetter>(v) {
                    Ok(d) if d.id == id => rec.dead_letters += 1,
                    Ok(_) => flag(
                        "dead",
                        BadKey::Id(id),
                        id.to_string().as_bytes(),
                        v,
                        "key does not match the record".into(),
                    ),
                    Err(reason) => {
                        flag("dead", BadKey::Id(id), id.to_string().as_bytes(), v, reason)
                    }
                }
            }
            // Legacy rows first: a group's state replaces its legacy row (which is removed when
            // the state is written, so both only meet after a crash in between: never).
            let mut groups = BTreeMap::new();
            read_groups(
                &read,
                (GROUPS, "groups"),
                &path,
                |(g, patterns): (String, Vec<String>)| {
                    let state = GroupState {
                        version: 1,
                        patterns,
                    };
                    (g, state)
                },
                &mut groups,
                &mut flag,
            )?;
            read_groups(
                &read,
                (GROUP_STATES, "group_states"),
                &path,
                |(g, state): (String, GroupState)| (g, state),
                &mut groups,
                &mut flag,
            )?;
            rec.groups = groups.into_iter().collect();
            let meta = read.open_table(META).or_store(&path)?;
            for item in meta.iter().or_store(&path)? {
                let (k, v) = item.or_store(&path)?;
                let (k, v) = (k.value(), v.value());
                if let Err(reason) = open_sealed::<u64>(v) {
                    flag("meta", BadKey::Str(k.to_string()), k.as_bytes(), v, reason);
                }
            }
        }
        // Keys are ordered by (log, seq) except for log names with NUL bytes; sorting an already
        // sorted vector is linear.
        rec.entries
            .sort_by(|a, b| (&a.env.log, a.env.seq).cmp(&(&b.env.log, b.env.seq)));
        rec.corrupt = bad.iter().map(|b| b.report.clone()).collect();
        if !bad.is_empty() {
            self.quarantine(&bad)?;
        }
        Ok(rec)
    }

    fn quarantine(&mut self, bad: &[Bad]) -> Result<(), StoreError> {
        if matches!(self.db, Some(Db::Ro(_))) {
            for b in bad {
                warn!(table = b.table, key = %b.report.key, reason = %b.report.reason,
                    "corrupt store record skipped (read-only: left in place)");
            }
            return Ok(());
        }
        let path = self.path.clone();
        let txn = self.begin(self.durability != Durability::Memory)?;
        {
            let mut q = txn.open_table(QUARANTINE).or_store(&path)?;
            for b in bad {
                let name = format!("{}/{}", b.table, b.report.key);
                q.insert(name.as_str(), b.value.as_slice())
                    .or_store(&path)?;
                match (&b.key, b.table) {
                    (BadKey::Bytes(k), "entries") => {
                        txn.open_table(ENTRIES)
                            .or_store(&path)?
                            .remove(k.as_slice())
                            .or_store(&path)?;
                    }
                    (BadKey::Bytes(k), _) => {
                        txn.open_table(WINDOWS)
                            .or_store(&path)?
                            .remove(k.as_slice())
                            .or_store(&path)?;
                    }
                    (BadKey::Str(k), "seqs") => {
                        txn.open_table(SEQS)
                            .or_store(&path)?
                            .remove(k.as_str())
                            .or_store(&path)?;
                    }
                    (BadKey::Str(k), "groups") => {
                        txn.open_table(GROUPS)
                            .or_store(&path)?
                            .remove(k.as_str())
                            .or_store(&path)?;
                    }
                    (BadKey::Str(k), "group_states") => {
                        txn.open_table(GROUP_STATES)
                            .or_store(&path)?
                            .remove(k.as_str())
                            .or_store(&path)?;
                    }
                    (BadKey::Str(k), _) => {
                        txn.open_table(META)
                            .or_store(&path)?
                            .remove(k.as_str())
                            .or_store(&path)?;
                    }
                    (BadKey::Id(id), _) => {
                        txn.open_table(DEAD)
                            .or_store(&path)?
                            .remove(*id)
                            .or_store(&path)?;
                    }
                }
                warn!(table = b.table, key = %b.report.key, reason = %b.report.reason,
                    quarantine_key = %name, "corrupt store record moved to quarantine");
            }
        }
        let durable = self.durability != Durability::Memory;
        self.finish(txn, durable)
    }

    fn take_inner(&mut self, ids: &[u64]) -> Result<Vec<DeadLetter>, StoreError> {
        self.checkpoint()?;
        let path = self.path.clone();
        let durable = self.durability != Durability::Memory;
        let txn = self.begin(durable)?;
        let mut out = Vec::new();
        {
            let mut dead = txn.open_table(DEAD).or_store(&path)?;
            let mut q = txn.open_table(QUARANTINE).or_store(&path)?;
            for &id in ids {
                let Some(v) = dead.remove(id).or_store(&path)? else {
                    continue;
                };
                let v = v.value().to_vec();
                match open_sealed::<DeadLetter>(&v) {
                    Ok(d) => out.push(d),
                    Err(reason) => {
                        let name = format!("dead/{id}");
                        q.insert(name.as_str(), v.as_slice()).or_store(&path)?;
                        warn!(id, %reason, quarantine_key = %name, "corrupt dead letter moved to quarantine instead of replay");
                    }
                }
            }
        }
        self.finish(txn, durable)?;
        Ok(out)
    }

    fn dead_inner(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.checkpoint()?;
        let path = self.path.clone();
        let read = self.reader()?;
        let dead = read.open_table(DEAD).or_store(&path)?;
        let mut out = Vec::new();
        for item in dead.iter().or_store(&path)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.or_store(&path)?;
            match open_sealed::<DeadLetter>(v.value()) {
                Ok(d) => out.push(d),
                Err(reason) => {
                    warn!(id = k.value(), %reason, "corrupt dead letter skipped (recovery quarantines it)")
                }
            }
        }
        Ok(out)
    }

    fn sync_inner(&mut self) -> Result<(), StoreError> {
        if !matches!(self.db, Some(Db::Rw(_))) {
            return Ok(());
        }
        if let Some(wal) = &mut self.wal {
            if self.unsynced {
                wal.sync()?;
                self.fsyncs += 1;
                self.last_fsync = Instant::now();
                self.unsynced = false;
            }
            return Ok(());
        }
        if !self.pending {
            return Ok(());
        }
        let txn = self.begin(true)?;
        self.finish(txn, true)
    }

    /// A checkpoint as commits bring on, carrying young entries over (tests).
    #[cfg(test)]
    pub(super) fn checkpoint_as_commits_do(&mut self) -> Result<(), StoreError> {
        self.checkpoint_carrying(true)
    }

    /// Writes the next epoch's first record, with the entries a checkpoint would carry, and
    /// stops there, as a checkpoint whose database commit failed or never happened (tests).
    #[cfg(test)]
    pub(super) fn prepare_and_abandon_a_checkpoint(&mut self) {
        let (_, first) = self.split_for_checkpoint(true);
        let wal = self.wal.as_mut().expect("a logged store");
        wal.prepare(self.epoch + 1, &first).expect("prepare");
    }

    /// Makes the next move to a new epoch panic after it wrote the epoch's first record, as a
    /// failure inside redb would (tests).
    #[cfg(test)]
    pub(super) fn panic_in_next_epoch_move(&mut self) {
        self.panic_in_epoch_move = true;
    }

    /// Ends this value as a crash of the process would: no checkpoint, nothing emptied (what
    /// was written is in the files), the lock released (tests).
    #[cfg(test)]
    pub(super) fn crash(mut self) {
        self.opened = false;
    }

    /// Flips a byte of one stored entry's value (tests of corruption handling).
    #[cfg(test)]
    pub(super) fn damage_entry(&mut self, log: &str, seq: u64) {
        self.damage(ENTRIES, entry_key(log, seq).as_slice());
    }

    /// Flips a byte of one stored group record (tests of corruption handling).
    #[cfg(test)]
    pub(super) fn damage_group(&mut self, group: &str) {
        self.damage(GROUP_STATES, group);
    }

    /// Stores a group row as stores written before group versions did (tests of reading them).
    #[cfg(test)]
    pub(super) fn put_legacy_group(&mut self, group: &str, patterns: &[&str]) {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        let txn = self.begin(true).expect("begin");
        {
            let mut t = txn.open_table(GROUPS).expect("table");
            let value = seal(&(group, patterns)).expect("seal");
            t.insert(group, value.as_slice()).expect("insert");
        }
        self.finish(txn, true).expect("commit");
    }

    /// Flips the last byte of the value under `key` in `table`.
    #[cfg(test)]
    fn damage<K: redb::Key + 'static>(
        &mut self,
        table: redb::TableDefinition<'_, K, &[u8]>,
        key: K::SelfType<'_>,
    ) {
        self.checkpoint().expect("checkpoint");
        let txn = self.begin(true).expect("begin");
        {
            let mut t = txn.open_table(table).expect("table");
            let mut v = t.get(&key).expect("get").expect("present").value().to_vec();
            let last = v.len() - 1;
            v[last] ^= 0x5a;
            t.insert(&key, v.as_slice()).expect("insert");
        }
        self.finish(txn, true).expect("commit");
    }
}

/// Reads a table of group records (`name` in reports) keyed by group name into `into` (later
/// tables replace earlier ones' groups); `decode` gives a record's group name and state. A record that does
/// not decode or whose name is not its key is flagged (see `recover_inner`). A table that a
/// store of an older version never created reads as empty (read-only opens do not create it).
fn read_groups<T: serde::de::DeserializeOwned>(
    read: &ReadTransaction,
    (table, name): (TableDefinition<&str, &[u8]>, &'static str),
    path: &Path,
    decode: impl Fn(T) -> (String, GroupState),
    into: &mut BTreeMap<String, GroupState>,
    flag: &mut impl FnMut(&'static str, BadKey, &[u8], &[u8], String),
) -> Result<(), StoreError> {
    let rows = match read.open_table(table) {
        Ok(rows) => rows,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(db_error(path, e.into())),
    };
    for item in rows.iter().or_store(path)? {
        let (k, v) = item.or_store(path)?;
        let (k, v) = (k.value(), v.value());
        let key = || BadKey::Str(k.to_string());
        match open_sealed::<T>(v).map(&decode) {
            Ok((g, state)) if g == k => {
                into.insert(g, state);
            }
            Ok(_) => flag(
                name,
                key(),
                k.as_bytes(),
                v,
                "key does not match the record".into(),
            ),
            Err(reason) => flag(name, key(), k.as_bytes(), v, reason),
        }
    }
    Ok(())
}

/// Writes a batch into a transaction, assigning ids to new dead letters (in place, so the side
/// log records them and a replay writes the same ids).
fn apply(txn: &WriteTransaction, batch: &mut Batch, path: &Path) -> Result<(), StoreError> {
    {
        let mut entries = txn.open_table(ENTRIES).or_store(path)?;
        for e in &batch.append {
            entries
                .insert(
                    entry_key(&e.env.log, e.env.seq).as_slice(),
                    seal(e)?.as_slice(),
                )
                .or_store(path)?;
        }
        for (log, seq) in &batch.remove {
            entries
                .remove(entry_key(log, *seq).as_slice())
                .or_store(path)?;
        }
    }
    if !batch.windows.is_empty() {
        let mut windows = txn.open_table(WINDOWS).or_store(path)?;
        for w in &batch.windows {
            windows
                .insert(
                    window_key(&w.origin, &w.log).as_slice(),
                    seal(w)?.as_slice(),
                )
                .or_store(path)?;
        }
    }
    if !batch.next_seqs.is_empty() {
        let mut seqs = txn.open_table(SEQS).or_store(path)?;
        for (log, next) in &batch.next_seqs {
            seqs.insert(log.as_str(), seal(next)?.as_slice())
                .or_store(path)?;
        }
    }
    if !batch.dead.is_empty() {
        let mut meta = txn.open_table(META).or_store(path)?;
        let mut dead = txn.open_table(DEAD).or_store(path)?;
        let stored = meta
            .get(META_NEXT_DEAD)
            .or_store(path)?
            .and_then(|v| open_sealed::<u64>(v.value()).ok());
        let above_last = dead
            .last()
            .or_store(path)?
            .map(|(k, _)| k.value().saturating_add(1));
        let mut next = stored.unwrap_or(1).max(above_last.unwrap_or(1)).max(1);
        for d in &mut batch.dead {
            if d.id == 0 {
                d.id = next;
            }
            next = next.max(d.id.saturating_add(1));
            dead.insert(d.id, seal(&*d)?.as_slice()).or_store(path)?;
        }
        meta.insert(META_NEXT_DEAD, seal(&next)?.as_slice())
            .or_store(path)?;
    }
    if !batch.groups.is_empty() {
        let mut legacy = txn.open_table(GROUPS).or_store(path)?;
        let mut states = txn.open_table(GROUP_STATES).or_store(path)?;
        for (g, state) in &batch.groups {
            legacy.remove(g.as_str()).or_store(path)?;
            match state {
                Some(s) => {
                    states
                        .insert(g.as_str(), seal(&(g, s))?.as_slice())
                        .or_store(path)?;
                }
                None => {
                    states.remove(g.as_str()).or_store(path)?;
                }
            }
        }
    }
    Ok(())
}

impl Store for RedbStore {
    fn commit(&mut self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let r = self.commit_inner(batch);
        self.after(r)
    }

    fn recover(&mut self) -> Result<Recovered, StoreError> {
        let path = self.path.clone();
        let r = guard(&path, || self.recover_inner());
        self.after(r)
    }

    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let path = self.path.clone();
        let r = guard(&path, || self.dead_inner(limit));
        self.after(r)
    }

    fn take_dead_letters(&mut self, ids: &[u64]) -> Result<Vec<DeadLetter>, StoreError> {
        let r = self.take_inner(ids);
        self.after(r)
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        let r = self.sync_inner();
        self.after(r)
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            fsyncs: self.fsyncs,
            commits: self.commits,
            file_bytes: self.db_file_bytes() + self.wal.as_ref().map_or(0, Wal::len),
            checkpoints: self.checkpoints,
            checkpointed_entries: self.checkpointed_entries,
            checkpoint_micros: self.checkpoint_micros,
            carried_entries: self.carried_entries,
        }
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        if !self.opened {
            return;
        }
        let r = if self.logged() {
            // A clean stop leaves a side log with no record: `open_read_only` relies on it.
            self.checkpoint().and_then(|()| match &mut self.wal {
                Some(wal) if matches!(self.db, Some(Db::Rw(_))) => wal.empty(),
                _ => Ok(()),
            })
        } else {
            self.sync()
        };
        if let Err(e) = r {
            warn!(error = %e, path = %self.path.display(), "final store sync failed");
        }
    }
}

/// Runs `f`, turning a panic inside the database library (it asserts on some damaged files)
/// into [`StoreError::Corrupt`].
fn guard<T>(path: &Path, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".into());
        Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("the database library failed reading it: {what}"),
        })
    })
}

/// Maps redb results into [`StoreError`]s that name the file.
trait OrStore<T> {
    fn or_store(self, path: &Path) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> OrStore<T> for Result<T, E> {
    fn or_store(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|e| db_error(path, e.into()))
    }
}

/// An I/O error on `path`; a full disk becomes [`StoreError::Full`].
/// The store file of `dir`, or a not-found error when it has none.
fn store_file_in(dir: &Path) -> Result<std::path::PathBuf, StoreError> {
    let path = dir.join(STORE_FILE);
    if path.exists() {
        return Ok(path);
    }
    Err(io_error(
        dir,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no peerbus store ({STORE_FILE}) in this directory"),
        ),
    ))
}

pub(super) fn io_error(path: &Path, e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC) {
        StoreError::Full {
            path: path.to_path_buf(),
        }
    } else {
        StoreError::Io {
            path: path.to_path_buf(),
            error: e,
        }
    }
}

fn db_error(path: &Path, e: redb::Error) -> StoreError {
    match e {
        redb::Error::Io(e) => io_error(path, e),
        redb::Error::PreviousIo => io_error(
            path,
            std::io::Error::other("an earlier I/O error left the database closed"),
        ),
        redb::Error::Corrupted(reason) => StoreError::Corrupt {
            path: path.to_path_buf(),
            reason,
        },
        redb::Error::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.to_path_buf(),
            pid: None,
        },
        redb::Error::UpgradeRequired(v) => StoreError::Db(format!(
            "{} uses redb file format {v}, which this version cannot read",
            path.display()
        )),
        other => StoreError::Db(format!("{}: {other}", path.display())),
    }
}

/// Errors while opening: a file too short to hold what its header describes is corrupt.
fn open_error(path: &Path, e: redb::Error) -> StoreError {
    match e {
        redb::Error::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
            ) =>
        {
            StoreError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        }
        redb::Error::RepairAborted => StoreError::Db(format!(
            "{} was not closed cleanly and needs a repair",
            path.display()
        )),
        other => db_error(path, other),
    }
}

/// Attempts to take a data directory's lock beyond the first, [`LOCK_RETRY_PAUSE`] apart.
const LOCK_RETRIES: u32 = 10;
/// Pause between attempts to take a data directory's lock.
const LOCK_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Takes the exclusive lock of a data directory and writes our pid into it.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_error(&path, e))?;
    // A lock just released can stay held for a moment by a process forked from ours (until it
    // execs and closes its inherited copy): retry briefly before naming an owner.
    let mut tries = 0;
    let locked = loop {
        match f.try_lock() {
            Err(TryLockError::WouldBlock) if tries < LOCK_RETRIES => {
                tries += 1;
                std::thread::sleep(LOCK_RETRY_PAUSE);
            }
            other => break other,
        }
    };
    match locked {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            return Err(StoreError::InUse {
                path: dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(io_error(&path, e)),
    }
    f.set_len(0).map_err(|e| io_error(&path, e))?;
    f.rewind().map_err(|e| io_error(&path, e))?;
    writeln!(f, "{}", std::process::id()).map_err(|e| io_error(&path, e))?;
    Ok(f)
}
