//! The redb store: one database file in the data directory, guarded by an
//! exclusive lock file that names the owning process.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::warn;

use super::{
    Batch, CorruptRecord, DeadLetter, Durability, Recovered, Store, StoreError, StoreStats,
    StoredEntry,
};
use crate::engine::inbox::WindowSnapshot;

/// Database file name inside the data directory.
pub const STORE_FILE: &str = "peerbus.redb";
/// Lock file name inside the data directory (holds the owner's pid).
pub const LOCK_FILE: &str = "peerbus.lock";

const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
const SEQS: TableDefinition<&str, u64> = TableDefinition::new("seqs");
const WINDOWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("windows");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const QUARANTINE: TableDefinition<&str, &[u8]> = TableDefinition::new("quarantine");

const META_NEXT_DEAD: &str = "next_dead_id";

/// A store in `<data_dir>/peerbus.redb`.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    durability: Durability,
    last_fsync: Instant,
    stats: StoreStats,
    _lock: File,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    /// Opens (creating) `<dir>/peerbus.redb`, holding `<dir>/peerbus.lock` for as long as the
    /// store lives. A second process gets [`StoreError::InUse`] with the first one's pid; a
    /// damaged file gets [`StoreError::Corrupt`].
    pub fn open(dir: &Path, durability: Durability) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let lock = lock_dir(dir)?;
        let path = dir.join(STORE_FILE);
        // redb asserts (panics) on some damaged files, e.g. one truncated below its header's
        // layout; contain that here and report it like any other corruption.
        let opened = std::panic::catch_unwind(|| Database::create(&path)).map_err(|panic| {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the database panicked while opening it".into());
            StoreError::Corrupt {
                path: path.clone(),
                reason,
            }
        })?;
        let db = opened.map_err(|e| db_error(&path, e.into()))?;
        // Create every table so readers never meet a missing one.
        let txn = db.begin_write().map_err(|e| db_error(&path, e.into()))?;
        {
            let open = |e: redb::TableError| db_error(&path, e.into());
            txn.open_table(ENTRIES).map_err(open)?;
            txn.open_table(SEQS).map_err(open)?;
            txn.open_table(WINDOWS).map_err(open)?;
            txn.open_table(DEAD).map_err(open)?;
            txn.open_table(META).map_err(open)?;
            txn.open_table(QUARANTINE).map_err(open)?;
        }
        txn.commit().map_err(|e| db_error(&path, e.into()))?;
        let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        Ok(RedbStore {
            db,
            path,
            durability,
            last_fsync: Instant::now(),
            stats: StoreStats {
                fsyncs: 0,
                commits: 0,
                file_bytes,
            },
            _lock: lock,
        })
    }

    /// Opens a stopped node's directory to inspect it (`peerbus status`, `dlq list`). Fails with
    /// [`StoreError::InUse`] while a node runs there. Reading may quarantine corrupt records.
    pub fn open_read_only(dir: &Path) -> Result<RedbStore, StoreError> {
        if !dir.join(STORE_FILE).exists() {
            return Err(io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no peerbus store here"),
            ));
        }
        RedbStore::open(dir, Durability::Fsync)
    }

    /// Shrinks the file after many entries were removed.
    pub fn compact(&mut self) -> Result<bool, StoreError> {
        let done = self
            .db
            .compact()
            .map_err(|e| db_error(&self.path, e.into()))?;
        self.stats.file_bytes = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        Ok(done)
    }

    fn begin(&mut self, force_fsync: bool) -> Result<(WriteTransaction, bool), StoreError> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| db_error(&self.path, e.into()))?;
        let fsync = match self.durability {
            Durability::Fsync => true,
            Durability::Interval(every) => force_fsync || self.last_fsync.elapsed() >= every,
            Durability::Memory => force_fsync,
        };
        let level = if fsync {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        txn.set_durability(level)
            .map_err(|e| StoreError::Db(e.to_string()))?;
        Ok((txn, fsync))
    }

    fn finish(&mut self, txn: WriteTransaction, fsync: bool) -> Result<(), StoreError> {
        txn.commit().map_err(|e| db_error(&self.path, e.into()))?;
        self.stats.commits += 1;
        if fsync {
            self.stats.fsyncs += 1;
            self.last_fsync = Instant::now();
        }
        Ok(())
    }
}

impl Store for RedbStore {
    fn commit(&mut self, batch: Batch) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |e: redb::Error| db_error(&path, e);
        let (txn, fsync) = self.begin(false)?;
        {
            let mut entries = txn.open_table(ENTRIES).map_err(|e| err(e.into()))?;
            for e in &batch.append {
                let value = seal(e)?;
                entries
                    .insert(
                        entry_key(&e.env.log, e.env.seq).as_slice(),
                        value.as_slice(),
                    )
                    .map_err(|e| err(e.into()))?;
            }
            for (log, seq) in &batch.remove {
                entries
                    .remove(entry_key(log, *seq).as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            let mut seqs = txn.open_table(SEQS).map_err(|e| err(e.into()))?;
            for (log, next) in &batch.next_seqs {
                seqs.insert(log.as_str(), *next)
                    .map_err(|e| err(e.into()))?;
            }
            let mut windows = txn.open_table(WINDOWS).map_err(|e| err(e.into()))?;
            for w in &batch.windows {
                let value = seal(w)?;
                windows
                    .insert(window_key(w).as_slice(), value.as_slice())
                    .map_err(|e| err(e.into()))?;
            }
            if !batch.dead.is_empty() {
                let mut meta = txn.open_table(META).map_err(|e| err(e.into()))?;
                let mut next = meta
                    .get(META_NEXT_DEAD)
                    .map_err(|e| err(e.into()))?
                    .map_or(1, |v| v.value());
                let mut dead = txn.open_table(DEAD).map_err(|e| err(e.into()))?;
                for d in &batch.dead {
                    let mut d = d.clone();
                    d.id = next;
                    next += 1;
                    let value = seal(&d)?;
                    dead.insert(d.id, value.as_slice())
                        .map_err(|e| err(e.into()))?;
                }
                meta.insert(META_NEXT_DEAD, next)
                    .map_err(|e| err(e.into()))?;
            }
        }
        self.finish(txn, fsync)?;
        if batch.remove.len() > 4096 || self.stats.commits.is_multiple_of(1024) {
            self.stats.file_bytes = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        }
        Ok(())
    }

    fn recover(&mut self) -> Result<Recovered, StoreError> {
        let path = self.path.clone();
        let err = |e: redb::Error| db_error(&path, e);
        let mut rec = Recovered::default();
        let mut bad: Vec<(&'static str, Vec<u8>, Vec<u8>)> = Vec::new();
        {
            let read = self.db.begin_read().map_err(|e| err(e.into()))?;
            let entries = read.open_table(ENTRIES).map_err(|e| err(e.into()))?;
            for item in entries.iter().map_err(|e| err(e.into()))? {
                let (k, v) = item.map_err(|e| err(e.into()))?;
                match open_sealed::<StoredEntry>(v.value()) {
                    Ok(e) => rec.entries.push(e),
                    Err(reason) => {
                        rec.corrupt.push(CorruptRecord {
                            table: "entries",
                            key: describe_entry_key(k.value()),
                            reason,
                        });
                        bad.push(("entries", k.value().to_vec(), v.value().to_vec()));
                    }
                }
            }
            let seqs = read.open_table(SEQS).map_err(|e| err(e.into()))?;
            for item in seqs.iter().map_err(|e| err(e.into()))? {
                let (k, v) = item.map_err(|e| err(e.into()))?;
                rec.next_seqs.push((k.value().to_string(), v.value()));
            }
            let windows = read.open_table(WINDOWS).map_err(|e| err(e.into()))?;
            for item in windows.iter().map_err(|e| err(e.into()))? {
                let (k, v) = item.map_err(|e| err(e.into()))?;
                match open_sealed::<WindowSnapshot>(v.value()) {
                    Ok(w) => rec.windows.push(w),
                    Err(reason) => {
                        rec.corrupt.push(CorruptRecord {
                            table: "windows",
                            key: hex(k.value()),
                            reason,
                        });
                        bad.push(("windows", k.value().to_vec(), v.value().to_vec()));
                    }
                }
            }
            let dead = read.open_table(DEAD).map_err(|e| err(e.into()))?;
            rec.dead_letters = dead.len().map_err(|e| err(e.into()))? as usize;
        }
        rec.entries
            .sort_by(|a, b| (&a.env.log, a.env.seq).cmp(&(&b.env.log, b.env.seq)));
        if !bad.is_empty() {
            self.quarantine(&bad)?;
        }
        Ok(rec)
    }

    fn dead_letters(&mut self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let path = self.path.clone();
        let err = |e: redb::Error| db_error(&path, e);
        let read = self.db.begin_read().map_err(|e| err(e.into()))?;
        let dead = read.open_table(DEAD).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for item in dead.iter().map_err(|e| err(e.into()))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| err(e.into()))?;
            match open_sealed::<DeadLetter>(v.value()) {
                Ok(d) => out.push(d),
                Err(reason) => warn!(id = k.value(), %reason, "corrupt dead letter skipped"),
            }
        }
        Ok(out)
    }

    fn take_dead_letters(&mut self, ids: &[u64]) -> Result<Vec<DeadLetter>, StoreError> {
        let path = self.path.clone();
        let err = |e: redb::Error| db_error(&path, e);
        let (txn, fsync) = self.begin(true)?;
        let mut out = Vec::new();
        {
            let mut dead = txn.open_table(DEAD).map_err(|e| err(e.into()))?;
            for id in ids {
                if let Some(v) = dead.remove(*id).map_err(|e| err(e.into()))? {
                    match open_sealed::<DeadLetter>(v.value()) {
                        Ok(d) => out.push(d),
                        Err(reason) => warn!(id, %reason, "corrupt dead letter dropped on replay"),
                    }
                }
            }
        }
        self.finish(txn, fsync)?;
        Ok(out)
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        let (txn, fsync) = self.begin(true)?;
        self.finish(txn, fsync)
    }

    fn stats(&self) -> StoreStats {
        self.stats.clone()
    }
}

impl RedbStore {
    fn quarantine(&mut self, bad: &[(&'static str, Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let err = |e: redb::Error| db_error(&path, e);
        let (txn, fsync) = self.begin(true)?;
        {
            let mut q = txn.open_table(QUARANTINE).map_err(|e| err(e.into()))?;
            for (table, key, value) in bad {
                let name = format!("{table}/{}", hex(key));
                q.insert(name.as_str(), value.as_slice())
                    .map_err(|e| err(e.into()))?;
                match *table {
                    "entries" => {
                        let mut t = txn.open_table(ENTRIES).map_err(|e| err(e.into()))?;
                        t.remove(key.as_slice()).map_err(|e| err(e.into()))?;
                    }
                    _ => {
                        let mut t = txn.open_table(WINDOWS).map_err(|e| err(e.into()))?;
                        t.remove(key.as_slice()).map_err(|e| err(e.into()))?;
                    }
                }
                warn!(record = %name, "corrupt store record moved to quarantine");
            }
        }
        self.finish(txn, fsync)
    }
}

/// Key of an entry: u16 length of the log name, the name, the seq big-endian (so the table is
/// ordered by log, then seq).
fn entry_key(log: &str, seq: u64) -> Vec<u8> {
    let name = log.as_bytes();
    let len = u16::try_from(name.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(2 + name.len() + 8);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(&name[..usize::from(len)]);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn describe_entry_key(k: &[u8]) -> String {
    let parsed = (|| {
        let len = usize::from(u16::from_be_bytes([*k.first()?, *k.get(1)?]));
        let name = std::str::from_utf8(k.get(2..2 + len)?).ok()?;
        let seq = u64::from_be_bytes(k.get(2 + len..2 + len + 8)?.try_into().ok()?);
        Some(format!("{name}#{seq}"))
    })();
    parsed.unwrap_or_else(|| hex(k))
}

fn window_key(w: &WindowSnapshot) -> Vec<u8> {
    let mut k = w.origin.as_bytes().to_vec();
    k.extend_from_slice(w.log.as_bytes());
    k
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// CRC-32 of the encoding, then the encoding.
fn seal<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    let body = bincode::serde::encode_to_vec(v, bincode::config::standard())
        .map_err(|e| StoreError::Db(format!("cannot encode a record: {e}")))?;
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn open_sealed<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (crc, body) = bytes
        .split_at_checked(4)
        .ok_or("record shorter than its checksum")?;
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != want {
        return Err("checksum mismatch".into());
    }
    let (v, used) = bincode::serde::decode_from_slice(body, bincode::config::standard())
        .map_err(|e| format!("does not decode: {e}"))?;
    if used != body.len() {
        return Err("trailing bytes".into());
    }
    Ok(v)
}

fn io(path: &Path, e: std::io::Error) -> StoreError {
    if e.kind() == std::io::ErrorKind::StorageFull {
        StoreError::Full {
            path: path.to_path_buf(),
        }
    } else {
        StoreError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

fn db_error(path: &Path, e: redb::Error) -> StoreError {
    match e {
        redb::Error::Io(io_err) => io(path, io_err),
        redb::Error::Corrupted(reason) => StoreError::Corrupt {
            path: path.to_path_buf(),
            reason,
        },
        redb::Error::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.to_path_buf(),
            pid: None,
        },
        other => {
            let text = other.to_string();
            if text.contains("corrupt") || text.contains("Corrupt") || text.contains("invalid") {
                StoreError::Corrupt {
                    path: path.to_path_buf(),
                    reason: text,
                }
            } else {
                StoreError::Db(text)
            }
        }
    }
}

/// Takes the exclusive lock of a data directory and writes our pid into it.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            return Err(StoreError::InUse {
                path: dir.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(io(&path, e)),
    }
    f.set_len(0).map_err(|e| io(&path, e))?;
    f.rewind().map_err(|e| io(&path, e))?;
    writeln!(f, "{}", std::process::id()).map_err(|e| io(&path, e))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::wire::{Envelope, Kind};
    use crate::store::MemoryStore;
    use bytes::Bytes;
    use peerbus_transport::NodeId;

    fn entry(log: &str, seq: u64, size: usize) -> StoredEntry {
        StoredEntry {
            env: Envelope {
                origin: NodeId::from_bytes([1; 32]),
                log: log.into(),
                seq,
                kind: Kind::Send,
                destination: "orders".into(),
                key: Some(format!("k{}", seq % 3)),
                headers: vec![("h".into(), "v".into())],
                content_type: None,
                created_at_ms: seq,
                attempt: 1,
                payload: Bytes::from(vec![7u8; size]),
            },
            expires_at_ms: None,
            not_before_ms: Some(seq),
        }
    }

    fn dead(seq: u64) -> DeadLetter {
        DeadLetter {
            id: 0,
            env: entry("svc:orders", seq, 8).env,
            reason: "ttl expired".into(),
            attempts: 2,
            dead_at_ms: 5,
        }
    }

    /// The same scenario against any store: what is left after commits is what a fresh
    /// open recovers. `open` drops nothing itself: each store is dropped before the next open.
    fn check(open: &mut dyn FnMut() -> Box<dyn Store>) {
        let window = WindowSnapshot {
            origin: NodeId::from_bytes([2; 32]),
            log: "svc:x".into(),
            floor: 3,
            handled: vec![4, 6],
        };
        {
            let mut store = open();
            store
                .commit(Batch {
                    append: (1..=5)
                        .map(|s| entry("svc:orders", s, 16))
                        .chain([entry("grp:audit", 1, 4)])
                        .collect(),
                    next_seqs: vec![("svc:orders".into(), 6), ("grp:audit".into(), 2)],
                    windows: vec![window.clone()],
                    ..Batch::default()
                })
                .expect("commit");
            store
                .commit(Batch {
                    remove: vec![("svc:orders".into(), 2), ("svc:orders".into(), 4)],
                    dead: vec![dead(2), dead(4)],
                    ..Batch::default()
                })
                .expect("commit");
        }
        let mut s2 = open();
        let rec = s2.recover().expect("recover");
        let ids: Vec<(String, u64)> = rec
            .entries
            .iter()
            .map(|e| (e.env.log.clone(), e.env.seq))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("grp:audit".into(), 1),
                ("svc:orders".into(), 1),
                ("svc:orders".into(), 3),
                ("svc:orders".into(), 5)
            ]
        );
        assert_eq!(rec.entries[1], entry("svc:orders", 1, 16));
        let mut seqs = rec.next_seqs.clone();
        seqs.sort();
        assert_eq!(
            seqs,
            vec![("grp:audit".into(), 2), ("svc:orders".into(), 6)]
        );
        assert_eq!(rec.windows, vec![window]);
        assert_eq!(rec.dead_letters, 2);
        assert!(rec.corrupt.is_empty());
        let dl = s2.dead_letters(10).expect("list");
        assert_eq!(
            dl.iter().map(|d| d.env.seq).collect::<Vec<_>>(),
            vec![2, 4],
            "oldest first"
        );
        assert_eq!(dl[0].reason, "ttl expired");
        let taken = s2.take_dead_letters(&[dl[0].id]).expect("take");
        assert_eq!(taken.len(), 1);
        drop(s2);
        let mut s3 = open();
        let left = s3.dead_letters(10).expect("list");
        assert_eq!(
            left.iter().map(|d| d.env.seq).collect::<Vec<_>>(),
            vec![4],
            "take is durable"
        );
    }

    #[test]
    fn redb_round_trip_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        check(&mut || Box::new(RedbStore::open(&path, Durability::Fsync).expect("open")));
    }

    #[test]
    fn memory_store_behaves_the_same() {
        type SharedMem = std::sync::Arc<std::sync::Mutex<MemoryStore>>;
        struct Shared(SharedMem);
        impl Store for Shared {
            fn commit(&mut self, b: Batch) -> Result<(), StoreError> {
                self.0.lock().expect("lock").commit(b)
            }
            fn recover(&mut self) -> Result<Recovered, StoreError> {
                self.0.lock().expect("lock").recover()
            }
            fn dead_letters(&mut self, l: usize) -> Result<Vec<DeadLetter>, StoreError> {
                self.0.lock().expect("lock").dead_letters(l)
            }
            fn take_dead_letters(&mut self, ids: &[u64]) -> Result<Vec<DeadLetter>, StoreError> {
                self.0.lock().expect("lock").take_dead_letters(ids)
            }
            fn sync(&mut self) -> Result<(), StoreError> {
                Ok(())
            }
            fn stats(&self) -> StoreStats {
                StoreStats::default()
            }
        }
        let shared: SharedMem = SharedMem::default();
        check(&mut || Box::new(Shared(shared.clone())));
    }

    #[test]
    fn second_open_names_the_owner_pid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
        let err = RedbStore::open(dir.path(), Durability::Fsync).expect_err("in use");
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(matches!(err, StoreError::InUse { .. }));
    }

    #[test]
    fn corrupt_record_is_quarantined_not_returned() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
            s.commit(Batch {
                append: vec![entry("svc:a", 1, 8), entry("svc:a", 2, 8)],
                ..Batch::default()
            })
            .expect("commit");
            // Flip a byte of one record's value.
            let txn = s.db.begin_write().expect("txn");
            {
                let mut t = txn.open_table(ENTRIES).expect("table");
                let key = entry_key("svc:a", 2);
                let mut v = t
                    .get(key.as_slice())
                    .expect("get")
                    .expect("present")
                    .value()
                    .to_vec();
                let last = v.len() - 1;
                v[last] ^= 0xff;
                t.insert(key.as_slice(), v.as_slice()).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("reopen");
        let rec = s.recover().expect("recover");
        assert_eq!(rec.entries.len(), 1);
        assert_eq!(rec.entries[0].env.seq, 1);
        assert_eq!(rec.corrupt.len(), 1);
        assert_eq!(rec.corrupt[0].key, "svc:a#2");
        assert_eq!(rec.corrupt[0].reason, "checksum mismatch");
        // Quarantined: a second recovery is clean.
        assert!(s.recover().expect("again").corrupt.is_empty());
    }

    #[test]
    fn garbage_or_truncated_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(STORE_FILE), vec![0x5a; 64 * 1024]).expect("write");
        let err = RedbStore::open(dir.path(), Durability::Fsync).expect_err("garbage");
        assert!(err.to_string().contains(STORE_FILE), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
            s.commit(Batch {
                append: (1..200).map(|i| entry("svc:a", i, 512)).collect(),
                ..Batch::default()
            })
            .expect("commit");
        }
        let p = dir.path().join(STORE_FILE);
        let len = std::fs::metadata(&p).expect("meta").len();
        let f = OpenOptions::new().write(true).open(&p).expect("open");
        f.set_len(len / 3).expect("truncate");
        drop(f);
        // Either a clear error or a recovery that returns only intact records: never a panic.
        match RedbStore::open(dir.path(), Durability::Fsync) {
            Err(e) => assert!(
                e.to_string().contains(STORE_FILE) || e.to_string().contains("store"),
                "{e}"
            ),
            Ok(mut s) => {
                let _ = s.recover();
            }
        }
    }

    #[test]
    fn removed_entries_do_not_grow_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedbStore::open(
            dir.path(),
            Durability::Interval(std::time::Duration::from_secs(60)),
        )
        .expect("open");
        let p = dir.path().join(STORE_FILE);
        let mut sizes = Vec::new();
        for round in 0..5u64 {
            let base = round * 2000;
            s.commit(Batch {
                append: (base..base + 2000)
                    .map(|i| entry("svc:a", i, 1024))
                    .collect(),
                ..Batch::default()
            })
            .expect("append");
            s.commit(Batch {
                remove: (base..base + 2000)
                    .map(|i| ("svc:a".to_string(), i))
                    .collect(),
                ..Batch::default()
            })
            .expect("remove");
            s.sync().expect("sync");
            sizes.push(std::fs::metadata(&p).expect("meta").len());
        }
        // Space freed by removals is reused: the file does not grow round after round.
        assert!(
            sizes[4] <= sizes[1] + sizes[1] / 2,
            "file keeps growing: {sizes:?}"
        );
        assert!(s.recover().expect("recover").entries.is_empty());
    }
}
