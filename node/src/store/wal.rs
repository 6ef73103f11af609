//! The side log, `peerbus.wal` and `peerbus.wal.1`: where `Fsync` and `Interval` commits
//! land.
//!
//! Every commit appends its batch here with one `write`. With
//! [`Durability::Fsync`](super::Durability::Fsync) the file is then
//! `fdatasync`'d before the commit returns (unless the commit only removes
//! settled entries: the next fsync covers those); with
//! [`Durability::Interval`](super::Durability::Interval) it is fsync'd once
//! per interval, and once `write` returns the kernel has the bytes, so they
//! survive a crash of the process. A sequential append and one fsync of one
//! file is the cheapest durable write there is: the database (redb) is only
//! written by checkpoints (`redb.rs`), which apply everything logged since the
//! last one and store a new *epoch* number in the database; commits then go to
//! the other file. Opening the store replays the records of the stored epoch, so
//! records that are already in the database are never applied twice.
//!
//! There are two files, one for even epochs and one for odd ones ([`Wal`]), so a
//! checkpoint can *carry* young entries over instead of writing them to the
//! database: it writes them as the first record of the next epoch, at the start
//! of the other file, and fsyncs that before the database commit. While
//! consumers keep up, most entries a checkpoint finds unsettled are the ones in
//! flight, acknowledged soon after; written to the database, each cost an insert
//! and a delete there.
//!
//! Each file is reused in place: a new epoch's records overwrite an older
//! epoch's from the start. Overwriting blocks the file already has lets
//! `fdatasync` flush the data alone, without the file size (`dd oflag=dsync` of
//! 32 KiB blocks on this project's ext4 test machine: 0.17 ms each overwriting,
//! 0.29 ms appending); a node also grows both files with zeros when it opens the
//! store (`RedbStore::preallocate_side_log`), so even the first round
//! overwrites. Reading stops at the first record of another epoch (the remains
//! of an earlier one) or the first damaged one. A clean stop zeroes the header
//! of the first record of both files, so they hold no record and keep their
//! blocks: the next start need not write them again (two files of 17 MiB of zeros
//! and their fsyncs took 81 ms on this project's test machine).
//!
//! Record: `u32` body length (LE), `u32` CRC-32 of the body (LE), body =
//! bincode of `(epoch, Batch)`. Reading stops at the first record that is
//! short or fails its checksum: after a power loss that is the torn tail of
//! the last unsynced write, whose commit never returned.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Batch, GroupState, StoreError};

/// Past this many bytes in the side log's current file the store checkpoints (which moves to
/// the other file): the file,
/// the replay after a crash and the free space a checkpoint needs stay bounded, and after the
/// first round the records overwrite blocks the file already has (see the module docs).
///
/// 16 MiB rather than less because each checkpoint writes to the database the entries still
/// in flight, which are deleted again soon after: with 4 MiB, `peerbus bench` spent 6–7% of
/// `send/fsync/1KiB` in checkpoints, and 36–41% with 256 callers instead of 64 (its rate then
/// 81–84k msg/s against 108–112k with 16 MiB, where checkpoints took 1.5–1.7% and 17–19%).
/// The cost is two preallocated files of 17 MiB per node and up to 16 MiB to replay after a
/// crash (about 120 ms for a full one of 1 KiB entries; ARCHITECTURE, "What holds the fsync
/// send").
pub(super) const WAL_MAX_BYTES: u64 = 16 << 20;

/// A record as serde writes it: [`encode_record`] writes the same bytes, and the tests hold
/// it to that.
#[cfg(test)]
#[derive(Serialize)]
struct RecordRef<'a> {
    epoch: u64,
    append: &'a [super::StoredEntry],
    rest: BatchRest<'a>,
}

/// A group change as side logs written before group versions hold it: `Some(patterns)`
/// remembers the group, `None` forgets it (it was released).
type LegacyGroup = (String, Option<Vec<String>>);

/// The fields of a record's batch after `append`, in their order: bincode writes a struct as
/// its fields one after another, so [`encode_record`] writes these through serde after the
/// entries. `legacy_groups` is always written empty: group changes go in `groups`, after it,
/// so a record of an older version (which ends before `groups`) can never be read as one of
/// this version, nor the other way round.
#[derive(Serialize)]
struct BatchRest<'a> {
    remove: &'a [(smol_str::SmolStr, u64)],
    windows: &'a [crate::engine::inbox::WindowSnapshot],
    next_seqs: &'a [(String, u64)],
    dead: &'a [super::DeadLetter],
    legacy_groups: &'a [LegacyGroup],
    groups: &'a [(String, Option<GroupState>)],
}

impl<'a> BatchRest<'a> {
    fn of(batch: &'a Batch) -> Self {
        BatchRest {
            remove: &batch.remove,
            windows: &batch.windows,
            next_seqs: &batch.next_seqs,
            dead: &batch.dead,
            legacy_groups: &[],
            groups: &batch.groups,
        }
    }
}

/// Appends the body of a record, `(epoch, batch)` in bincode's standard layout. The entries,
/// nearly all of a record's bytes, are written by the hand-written envelope writer (serde's
/// generic path through bincode was a visible part of the store thread's time); the rest goes
/// through serde.
fn encode_record(epoch: u64, batch: &Batch, out: &mut Vec<u8>) -> Result<(), StoreError> {
    use crate::engine::wire::encode::{opt_u64, varint};
    varint(out, epoch);
    varint(out, batch.append.len() as u64);
    for e in &batch.append {
        e.env.encode(out);
        opt_u64(out, e.expires_at_ms);
        opt_u64(out, e.not_before_ms);
    }
    bincode::serde::encode_into_std_write(BatchRest::of(batch), out, bincode::config::standard())
        .map_err(|e| StoreError::Db(format!("cannot encode a side-log record: {e}")))?;
    Ok(())
}

/// A record of this version, as read.
#[derive(serde::Deserialize)]
struct Record {
    epoch: u64,
    batch: DiskBatch,
}

/// [`Batch`] as a record of this version holds it (see [`BatchRest`]): the fields of an
/// older record's batch, then the versioned group changes.
#[derive(serde::Deserialize)]
struct DiskBatch {
    older: BatchV2,
    groups: Vec<(String, Option<GroupState>)>,
}

impl Record {
    fn into_parts(self) -> (u64, Batch) {
        let DiskBatch { older, groups } = self.batch;
        let BatchV2 {
            older,
            groups: legacy,
        } = older;
        let mut all: Vec<_> = legacy.into_iter().map(legacy_group).collect();
        all.extend(groups);
        let batch = Batch {
            append: older.append,
            remove: older.remove,
            windows: older.windows,
            next_seqs: older.next_seqs,
            dead: older.dead,
            groups: all,
        };
        (self.epoch, batch)
    }
}

/// A group change of a side log written before group versions, as a state: a remembered
/// group is version 1 (what stores of that version read as too), a forgotten one a tombstone
/// of version 2, which wins over the version 1 that other nodes' old stores still give it.
fn legacy_group((group, patterns): LegacyGroup) -> (String, Option<GroupState>) {
    let state = match patterns {
        Some(patterns) => GroupState {
            version: 1,
            patterns,
        },
        None => GroupState {
            version: 2,
            patterns: Vec::new(),
        },
    };
    (group, Some(state))
}

/// A record written before group versions (bincode is not self-describing, so its shorter
/// body fails to decode as [`Record`]); its group changes are read with [`legacy_group`].
#[derive(Serialize, serde::Deserialize)]
struct RecordV2 {
    epoch: u64,
    batch: BatchV2,
}

/// [`Batch`] with groups as they were before versions.
#[derive(Serialize, serde::Deserialize)]
struct BatchV2 {
    older: BatchV1,
    groups: Vec<LegacyGroup>,
}

/// A record written before [`Batch`] had `groups` (bincode is not self-describing, so the
/// shorter body fails to decode as [`Record`] or [`RecordV2`]); replayed with no group
/// changes, so a side log left by an older version after a crash is not dropped.
#[derive(Serialize, serde::Deserialize)]
struct RecordV1 {
    epoch: u64,
    batch: BatchV1,
}

/// [`Batch`] without `groups`.
#[derive(Serialize, serde::Deserialize)]
struct BatchV1 {
    append: Vec<super::StoredEntry>,
    remove: Vec<(smol_str::SmolStr, u64)>,
    windows: Vec<crate::engine::inbox::WindowSnapshot>,
    next_seqs: Vec<(String, u64)>,
    dead: Vec<super::DeadLetter>,
}

impl From<RecordV2> for Record {
    fn from(r: RecordV2) -> Record {
        Record {
            epoch: r.epoch,
            batch: DiskBatch {
                older: r.batch,
                groups: Vec::new(),
            },
        }
    }
}

impl From<RecordV1> for Record {
    fn from(r: RecordV1) -> Record {
        Record::from(RecordV2 {
            epoch: r.epoch,
            batch: BatchV2 {
                older: r.batch,
                groups: Vec::new(),
            },
        })
    }
}

/// One side-log file, open.
#[derive(Debug)]
pub(super) struct WalFile {
    file: File,
    path: PathBuf,
    len: u64,
    /// The record being written, reused between appends (capacity kept up to
    /// [`KEEP_BUFFER_BYTES`]).
    buf: Vec<u8>,
}

/// Largest record buffer kept between appends; a larger batch's buffer is released after it.
const KEEP_BUFFER_BYTES: usize = 1 << 20;

impl WalFile {
    /// Opens (creating) a side-log file.
    pub(super) fn open(path: &Path) -> Result<WalFile, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| super::redb::io_error(path, e))?;
        let len = file
            .metadata()
            .map_err(|e| super::redb::io_error(path, e))?
            .len();
        Ok(WalFile {
            file,
            path: path.to_path_buf(),
            len,
            buf: Vec::new(),
        })
    }

    /// Bytes of records written since the file was last emptied (the write position; at
    /// open, the file's size).
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The batches of `epoch`, oldest first. A record of another epoch or a torn or damaged
    /// one ends the list.
    pub(super) fn read(&mut self, epoch: u64) -> Result<Vec<Batch>, StoreError> {
        let mut bytes = Vec::new();
        let mut f = File::open(&self.path).map_err(|e| super::redb::io_error(&self.path, e))?;
        f.read_to_end(&mut bytes)
            .map_err(|e| super::redb::io_error(&self.path, e))?;
        let mut out = Vec::new();
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let Some(record) = next_record(&mut rest) else {
                tracing::info!(
                    path = %self.path.display(),
                    bytes = rest.len(),
                    "the store's side log ends before its last bytes (a write that never \
                     completed, or what is left of an earlier epoch's records)"
                );
                break;
            };
            let (record_epoch, batch) = record.into_parts();
            if record_epoch != epoch {
                break;
            }
            out.push(batch);
        }
        Ok(out)
    }

    /// Appends one batch with a single `write`; on failure the file is cut back to where it was.
    pub(super) fn append(&mut self, epoch: u64, batch: &Batch) -> Result<(), StoreError> {
        let mut rec = std::mem::take(&mut self.buf);
        rec.clear();
        rec.extend_from_slice(&[0; 8]);
        let written = self.encode_and_write(epoch, batch, &mut rec);
        if rec.capacity() <= KEEP_BUFFER_BYTES {
            self.buf = rec;
        }
        written
    }

    /// Encodes the record into `rec` (which holds 8 placeholder bytes for its header) and
    /// writes it with one `write`.
    fn encode_and_write(
        &mut self,
        epoch: u64,
        batch: &Batch,
        rec: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        encode_record(epoch, batch, rec)?;
        let body = rec.get(8..).unwrap_or_default();
        let len = u32::try_from(body.len())
            .map_err(|_| StoreError::Db("a batch over 4 GiB cannot be stored".into()))?;
        let crc = crc32fast::hash(body);
        rec[..4].copy_from_slice(&len.to_le_bytes());
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        let before = self.len;
        match self.file.write_all_at(rec, before) {
            Ok(()) => {
                self.len += rec.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.cut(before);
                Err(super::redb::io_error(&self.path, e))
            }
        }
    }

    /// Makes everything appended so far durable (`fdatasync`).
    pub(super) fn sync(&mut self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(|e| super::redb::io_error(&self.path, e))
    }

    /// Shortens the file to `len` bytes (drops what a failed commit appended).
    /// Moves the write position back to `len` and overwrites the record header there with
    /// zeros, so a record a failed commit wrote is never read. If that write fails the position
    /// stays where it was: the caller sees `len()` unchanged and checkpoints, which moves to a
    /// new epoch.
    pub(super) fn cut(&mut self, len: u64) {
        match self.file.write_all_at(&[0; 8], len) {
            Ok(()) => self.len = len,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot cut back the store's side log");
            }
        }
    }

    /// Empties the log after a checkpoint started a new epoch: the next record is written at
    /// the start (the records left behind belong to an older epoch).
    pub(super) fn clear(&mut self) {
        self.len = 0;
    }

    /// Grows the file with zeros to `bytes` (when smaller) and makes that durable: records
    /// that overwrite blocks the file has, holding data, let `fdatasync` skip the file's size
    /// and block map. Zeros read as the end of the log.
    pub(super) fn preallocate(&mut self, bytes: u64) -> Result<(), StoreError> {
        let io = |e| super::redb::io_error(&self.path, e);
        let mut at = self.file.metadata().map_err(io)?.len();
        if at >= bytes {
            return Ok(());
        }
        // A static block of zeros: a heap buffer stayed resident (about 3 MiB more RSS for an
        // idle node, measured with `peerbus bench --only memory`).
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        while at < bytes {
            let n = (bytes - at).min(ZEROS.len() as u64);
            let chunk = ZEROS.get(..n as usize).unwrap_or_default();
            self.file.write_all_at(chunk, at).map_err(io)?;
            at += n;
        }
        self.file.sync_all().map_err(io)
    }

    /// Leaves the file with no record (a clean stop): zeroes the header of its first record
    /// and makes that durable, keeping the file's blocks for the next start.
    pub(super) fn empty(&mut self) -> Result<(), StoreError> {
        let io = |e| super::redb::io_error(&self.path, e);
        self.file.write_all_at(&[0; 8], 0).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.len = 0;
        Ok(())
    }

    /// Whether the file at `path` holds no record: missing, shorter than a record header, or
    /// starting with a zeroed one (what [`WalFile::empty`] and preallocation leave).
    fn holds_no_record(path: &Path) -> bool {
        let mut header = [0u8; 8];
        match File::open(path) {
            Ok(f) => match f.read_exact_at(&mut header, 0) {
                Ok(()) => header == [0; 8],
                Err(e) => e.kind() == std::io::ErrorKind::UnexpectedEof,
            },
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }
}

/// The side log's two files, `peerbus.wal` for even epochs and `peerbus.wal.1` for odd ones:
/// the records of an epoch are in the file of its parity, and the file of the other parity
/// holds only records of older epochs, or the first record of the next epoch while a
/// checkpoint is being made.
///
/// Moving to a new epoch writes that epoch's first record at the start of its file and
/// fsyncs it *before* the database stores the new epoch ([`Wal::prepare`]), and makes it the
/// file commits go to after ([`Wal::switch`]). That record holds the young entries a
/// checkpoint carries over instead of writing them to the database (none, for every other
/// move). So the file of the stored epoch always starts with a record that its own move
/// wrote: a record left in the other file by a checkpoint that failed or crashed before its
/// database commit (of an epoch never stored) is overwritten by the next move's before that
/// epoch can be stored, and what follows it there ends the log as before (a damaged record
/// or one of another epoch).
#[derive(Debug)]
pub(super) struct Wal {
    files: [WalFile; 2],
    /// The file of the current epoch (its parity), where commits go.
    active: usize,
    /// Bytes of the current epoch's first record, written by the move to it (see
    /// [`Wal::has_commits`]).
    first: u64,
}

/// The side-log files inside a data directory: index `epoch % 2`.
pub(super) const WAL_FILES: [&str; 2] = [super::redb::WAL_FILE, super::redb::WAL_FILE_ODD];

impl Wal {
    /// Opens (creating) both files of the side log in `dir`; commits go to the file of
    /// `epoch`, from its end.
    pub(super) fn open(dir: &Path, epoch: u64) -> Result<Wal, StoreError> {
        Ok(Wal {
            files: [
                WalFile::open(&dir.join(WAL_FILES[0]))?,
                WalFile::open(&dir.join(WAL_FILES[1]))?,
            ],
            active: parity(epoch),
            first: 0,
        })
    }

    /// Whether `dir` has no side-log record at all (no file, or files that hold none, as a
    /// clean stop leaves them): a stopped node's directory can then be read without a replay.
    pub(super) fn is_empty_in(dir: &Path) -> bool {
        WAL_FILES
            .iter()
            .all(|f| WalFile::holds_no_record(&dir.join(f)))
    }

    /// Whether `dir` has a side-log file.
    pub(super) fn exists_in(dir: &Path) -> bool {
        WAL_FILES.iter().any(|f| dir.join(f).exists())
    }

    /// Deletes both files of the side log in `dir` (after a replay into a store that no longer
    /// logs).
    pub(super) fn remove_in(dir: &Path) -> Result<(), StoreError> {
        for f in WAL_FILES {
            let path = dir.join(f);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(super::redb::io_error(&path, e)),
            }
        }
        Ok(())
    }

    fn current(&mut self) -> &mut WalFile {
        &mut self.files[self.active]
    }

    /// Bytes of records written in the current epoch's file (the write position; at open,
    /// the file's size).
    pub(super) fn len(&self) -> u64 {
        self.files[self.active].len()
    }

    /// Whether the current epoch's file holds records of commits, not just the first record
    /// its move wrote (whose entries, if any, are still unapplied).
    pub(super) fn has_commits(&self) -> bool {
        self.len() > self.first
    }

    /// The batches of the stored epoch `epoch`, oldest first, from the file of its parity,
    /// and the epoch a replay of them moves to: the next one whose file is not the one they
    /// were read from, which must stay as it is until the database has them.
    ///
    /// Side logs written before there were two files kept every epoch in `peerbus.wal`: an
    /// odd epoch with no record in its own file is looked for there too (that file holds no
    /// odd epoch's records otherwise), and its replay then moves two epochs on.
    pub(super) fn read(&mut self, epoch: u64) -> Result<(Vec<Batch>, u64), StoreError> {
        self.active = parity(epoch);
        let mut batches = self.files[self.active].read(epoch)?;
        if batches.is_empty() && self.active == 1 {
            batches = self.files[0].read(epoch)?;
            if !batches.is_empty() {
                self.active = 0;
            }
        }
        let next = if parity(epoch + 1) == self.active {
            epoch + 2
        } else {
            epoch + 1
        };
        Ok((batches, next))
    }

    /// Appends one batch of the current epoch to its file with a single `write`; on failure
    /// the file is cut back to where it was.
    pub(super) fn append(&mut self, epoch: u64, batch: &Batch) -> Result<(), StoreError> {
        debug_assert_eq!(parity(epoch), self.active, "a record of another epoch");
        self.current().append(epoch, batch)
    }

    /// Makes everything appended to the current epoch's file durable (`fdatasync`).
    pub(super) fn sync(&mut self) -> Result<(), StoreError> {
        self.current().sync()
    }

    /// Cuts the current epoch's file back to `len` (see [`WalFile::cut`]).
    pub(super) fn cut(&mut self, len: u64) {
        self.current().cut(len);
    }

    /// Writes `first`, the first record of the next epoch `epoch`, at the start of that
    /// epoch's file and makes it durable; returns its length for [`Wal::switch`]. Called
    /// before the database stores `epoch`: until then the record is never read (see the type's
    /// docs), and if that commit fails the next move writes its own over it.
    pub(super) fn prepare(&mut self, epoch: u64, first: &Batch) -> Result<u64, StoreError> {
        let next = parity(epoch);
        debug_assert_ne!(next, self.active, "the next epoch's file is the other one");
        let file = &mut self.files[next];
        file.clear();
        let written = file.append(epoch, first).and_then(|()| file.sync());
        let len = file.len();
        // Whatever happens, this file is not written again before the next `prepare`.
        file.clear();
        written.map(|()| len)
    }

    /// Makes `epoch` (now stored in the database) the current epoch: commits go to its file,
    /// after the `len` bytes [`Wal::prepare`] wrote.
    pub(super) fn switch(&mut self, epoch: u64, len: u64) {
        self.active = parity(epoch);
        self.current().len = len;
        self.first = len;
    }

    /// Grows both files with zeros to `bytes` each (see [`WalFile::preallocate`]).
    pub(super) fn preallocate(&mut self, bytes: u64) -> Result<(), StoreError> {
        for file in &mut self.files {
            file.preallocate(bytes)?;
        }
        Ok(())
    }

    /// Leaves both files with no record (a clean stop, after a checkpoint that carried
    /// nothing), keeping their blocks (see [`WalFile::empty`]).
    pub(super) fn empty(&mut self) -> Result<(), StoreError> {
        for file in &mut self.files {
            file.empty()?;
        }
        self.first = 0;
        Ok(())
    }
}

/// The index of `epoch`'s file in [`WAL_FILES`].
fn parity(epoch: u64) -> usize {
    (epoch % 2) as usize
}

fn next_record(rest: &mut &[u8]) -> Option<Record> {
    let (len, tail) = rest.split_first_chunk::<4>()?;
    let (crc, tail) = tail.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    let body = tail.get(..len)?;
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        return None;
    }
    let config = bincode::config::standard();
    let rec = match bincode::serde::decode_from_slice::<Record, _>(body, config) {
        Ok((rec, used)) if used == len => rec,
        _ => match bincode::serde::decode_from_slice::<RecordV2, _>(body, config) {
            Ok((rec, used)) if used == len => rec.into(),
            _ => match bincode::serde::decode_from_slice::<RecordV1, _>(body, config) {
                Ok((rec, used)) if used == len => rec.into(),
                _ => return None,
            },
        },
    };
    *rest = &tail[len..];
    Some(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch_strategy() -> impl Strategy<Value = Batch> {
        use crate::engine::wire::tests::env_strategy;
        let entry = (
            env_strategy(),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(env, expires_at_ms, not_before_ms)| super::super::StoredEntry {
                    env: std::sync::Arc::new(env),
                    expires_at_ms,
                    not_before_ms,
                },
            );
        let ids = || proptest::collection::vec((".{0,8}", any::<u64>()), 0..4);
        let window = (
            any::<u8>(),
            ".{0,8}",
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..4),
        )
            .prop_map(
                |(o, log, floor, handled)| crate::engine::inbox::WindowSnapshot {
                    origin: peerbus_transport::NodeId::from_bytes([o; 32]),
                    log,
                    floor,
                    handled,
                },
            );
        let dead = (
            env_strategy(),
            any::<u64>(),
            ".{0,8}",
            any::<u32>(),
            any::<u64>(),
        )
            .prop_map(
                |(env, id, reason, attempts, dead_at_ms)| super::super::DeadLetter {
                    id,
                    env,
                    reason,
                    attempts,
                    dead_at_ms,
                },
            );
        let groups = proptest::collection::vec(
            (
                ".{0,6}",
                proptest::option::of((any::<u64>(), proptest::collection::vec(".{0,6}", 0..3))),
            ),
            0..3,
        )
        .prop_map(|groups| {
            groups
                .into_iter()
                .map(|(g, s)| {
                    (
                        g,
                        s.map(|(version, patterns)| GroupState { version, patterns }),
                    )
                })
                .collect::<Vec<_>>()
        });
        (
            proptest::collection::vec(entry, 0..4),
            ids(),
            proptest::collection::vec(window, 0..3),
            ids(),
            proptest::collection::vec(dead, 0..2),
            groups,
        )
            .prop_map(|(append, remove, windows, next_seqs, dead, groups)| Batch {
                append,
                remove: remove
                    .into_iter()
                    .map(|(l, s): (String, u64)| (l.into(), s))
                    .collect(),
                windows,
                next_seqs,
                dead,
                groups,
            })
    }

    proptest! {
        /// The hand-written record writer must write exactly serde's bytes: the reader (and
        /// side logs written before it) decode with serde.
        #[test]
        fn records_are_written_as_serde_writes_them(epoch in any::<u64>(), batch in batch_strategy()) {
            let mut ours = Vec::new();
            encode_record(epoch, &batch, &mut ours).expect("encode");
            let serde = bincode::serde::encode_to_vec(RecordRef { epoch, append: &batch.append, rest: BatchRest::of(&batch) }, bincode::config::standard())
                .expect("serde");
            prop_assert_eq!(&ours, &serde);
            let back: (Record, usize) = bincode::serde::decode_from_slice(&ours, bincode::config::standard())
                .expect("decode");
            prop_assert_eq!(back.1, ours.len());
            let (back_epoch, back_batch) = back.0.into_parts();
            prop_assert_eq!(back_epoch, epoch);
            prop_assert_eq!(back_batch, batch);
        }

        #[test]
        fn reading_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut rest = bytes.as_slice();
            while next_record(&mut rest).is_some() {}
        }
    }

    /// A record as the side log frames it: length, checksum, body.
    fn framed<T: Serialize>(body: &T) -> Vec<u8> {
        let body = bincode::serde::encode_to_vec(body, bincode::config::standard()).expect("enc");
        let mut rec = Vec::new();
        rec.extend_from_slice(&u32::try_from(body.len()).expect("len").to_le_bytes());
        rec.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        rec.extend_from_slice(&body);
        rec
    }

    #[test]
    fn records_of_older_versions_are_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        let no_groups = RecordV1 {
            epoch: 3,
            batch: BatchV1 {
                append: vec![],
                remove: vec![("svc:a".into(), 7)],
                windows: vec![],
                next_seqs: vec![("svc:a".into(), 9)],
                dead: vec![],
            },
        };
        let unversioned = RecordV2 {
            epoch: 3,
            batch: BatchV2 {
                older: BatchV1 {
                    append: vec![],
                    remove: vec![],
                    windows: vec![],
                    next_seqs: vec![],
                    dead: vec![],
                },
                groups: vec![
                    ("billing".into(), Some(vec!["orders.*".into()])),
                    ("audit".into(), None),
                ],
            },
        };
        let mut bytes = framed(&no_groups);
        bytes.extend(framed(&unversioned));
        std::fs::write(&path, &bytes).expect("write");
        let mut wal = WalFile::open(&path).expect("open");
        let new = Batch {
            groups: vec![(
                "billing".into(),
                Some(GroupState {
                    version: 5,
                    patterns: vec!["orders.*".into()],
                }),
            )],
            ..Batch::default()
        };
        wal.append(3, &new).expect("append");
        let want_no_groups = Batch {
            remove: vec![("svc:a".into(), 7)],
            next_seqs: vec![("svc:a".into(), 9)],
            ..Batch::default()
        };
        let want_unversioned = Batch {
            groups: vec![
                (
                    "billing".into(),
                    Some(GroupState {
                        version: 1,
                        patterns: vec!["orders.*".into()],
                    }),
                ),
                (
                    "audit".into(),
                    Some(GroupState {
                        version: 2,
                        patterns: vec![],
                    }),
                ),
            ],
            ..Batch::default()
        };
        assert_eq!(
            wal.read(3).expect("read"),
            vec![want_no_groups, want_unversioned, new]
        );
    }

    #[test]
    fn preallocated_zeros_read_as_the_end_of_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        let mut wal = WalFile::open(&path).expect("open");
        wal.preallocate(3 << 20).expect("preallocate");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 3 << 20);
        assert!(wal.read(1).expect("read").is_empty());
        let b = Batch {
            next_seqs: vec![("svc:a".to_string(), 7)],
            ..Batch::default()
        };
        wal.append(1, &b).expect("append");
        assert_eq!(wal.read(1).expect("read"), vec![b]);
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len(),
            3 << 20,
            "written in place"
        );
    }

    #[test]
    fn a_torn_tail_or_an_older_epoch_ends_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        let mut wal = WalFile::open(&path).expect("open");
        let b = |log: &str| Batch {
            next_seqs: vec![(log.to_string(), 1)],
            ..Batch::default()
        };
        // Epoch 1 wrote three records; epoch 2 reuses the file and has written two so far.
        wal.append(1, &b("old1")).expect("append");
        wal.append(1, &b("old2")).expect("append");
        wal.append(1, &b("old3")).expect("append");
        wal.clear();
        wal.append(2, &b("a")).expect("append");
        wal.append(2, &b("b")).expect("append");
        assert_eq!(wal.read(2).expect("read"), vec![b("a"), b("b")]);
        assert!(wal.read(3).expect("read").is_empty());
        // A record a failed commit wrote is cut off.
        let end = wal.len();
        wal.append(2, &b("failed")).expect("append");
        wal.cut(end);
        assert_eq!(wal.read(2).expect("read"), vec![b("a"), b("b")]);
        // A torn write ends the log too.
        wal.append(2, &b("c")).expect("append");
        let full = wal.len();
        wal.append(2, &b("torn")).expect("append");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("reopen")
            .set_len(full + 5)
            .expect("tear");
        assert_eq!(wal.read(2).expect("read"), vec![b("a"), b("b"), b("c")]);
        let size = std::fs::metadata(&path).expect("meta").len();
        wal.empty().expect("empty");
        assert!(wal.read(2).expect("read").is_empty(), "no record left");
        assert!(WalFile::holds_no_record(&path));
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len(),
            size,
            "blocks kept"
        );
    }
}
