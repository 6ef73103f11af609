//! Store tests: one scenario checked against both stores, a model-based property test,
//! corruption, locking, crash and full-disk behaviour.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use peerbus_transport::NodeId;
use proptest::prelude::*;

use super::*;
use crate::engine::wire::Kind;

fn entry(log: &str, seq: u64, size: usize) -> StoredEntry {
    StoredEntry {
        env: Envelope {
            origin: NodeId::from_bytes([1; 32]),
            log: log.into(),
            seq,
            kind: Kind::Send,
            destination: "orders".into(),
            key: Some(format!("k{}", seq % 3).into()),
            headers: vec![("traceparent".into(), "00-ab-cd-01".into())].into(),
            content_type: None,
            created_at_ms: seq,
            attempt: 1,
            payload: Bytes::from(vec![7u8; size]),
        }
        .into(),
        expires_at_ms: None,
        not_before_ms: Some(seq),
    }
}

fn dead(seq: u64) -> DeadLetter {
    DeadLetter {
        id: 0,
        env: Envelope::clone(&entry("svc:orders", seq, 8).env),
        reason: "ttl expired".into(),
        attempts: 2,
        dead_at_ms: 5,
    }
}

fn window(origin: u8, log: &str, floor: u64) -> WindowSnapshot {
    WindowSnapshot {
        origin: NodeId::from_bytes([origin; 32]),
        log: log.into(),
        floor,
        handled: vec![floor + 1, floor + 3],
    }
}

fn ids(rec: &Recovered) -> Vec<(String, u64)> {
    rec.entries
        .iter()
        .map(|e| (e.env.log.to_string(), e.env.seq))
        .collect()
}

/// The same scenario against any store. `open` gives the store "after a restart": every
/// store it returned before has been dropped.
fn check(open: &mut dyn FnMut() -> Box<dyn Store>) {
    {
        let mut store = open();
        store
            .commit(Batch {
                append: (1..=5)
                    .map(|s| entry("svc:orders", s, 16))
                    .chain([entry("grp:audit", 1, 4)])
                    .collect(),
                next_seqs: vec![("svc:orders".into(), 6), ("grp:audit".into(), 2)],
                windows: vec![window(2, "svc:x", 3), window(2, "svc:y", 1)],
                ..Batch::default()
            })
            .expect("commit");
        store
            .commit(Batch {
                append: vec![entry("svc:orders", 6, 16)],
                remove: vec![
                    ("svc:orders".into(), 2),
                    ("svc:orders".into(), 4),
                    ("svc:orders".into(), 6),
                    ("svc:nothing".into(), 1),
                ],
                windows: vec![window(2, "svc:x", 9)],
                next_seqs: vec![("svc:orders".into(), 7)],
                dead: vec![dead(2), dead(4)],
                groups: vec![],
            })
            .expect("commit");
        store.commit(Batch::default()).expect("empty commit");
    }
    let mut s2 = open();
    let rec = s2.recover().expect("recover");
    assert_eq!(
        ids(&rec),
        vec![
            ("grp:audit".into(), 1),
            ("svc:orders".into(), 1),
            ("svc:orders".into(), 3),
            ("svc:orders".into(), 5)
        ],
        "what is left, sorted by (log, seq)"
    );
    assert_eq!(rec.entries[1], entry("svc:orders", 1, 16));
    assert_eq!(
        rec.next_seqs,
        vec![("grp:audit".into(), 2), ("svc:orders".into(), 7)]
    );
    assert_eq!(
        rec.windows,
        vec![window(2, "svc:x", 9), window(2, "svc:y", 1)]
    );
    assert_eq!(rec.dead_letters, 2);
    assert!(rec.corrupt.is_empty());

    let dl = s2.dead_letters(10).expect("list");
    assert_eq!(
        dl.iter().map(|d| d.env.seq).collect::<Vec<_>>(),
        vec![2, 4],
        "oldest first"
    );
    assert!(dl[0].id > 0 && dl[1].id > dl[0].id, "ids assigned in order");
    assert_eq!(dl[0].reason, "ttl expired");
    assert_eq!(s2.dead_letters(1).expect("list").len(), 1, "limit");
    let taken = s2.take_dead_letters(&[dl[0].id, 999]).expect("take");
    assert_eq!(taken, vec![dl[0].clone()]);
    s2.commit(Batch {
        dead: vec![dead(7)],
        ..Batch::default()
    })
    .expect("commit");
    drop(s2);

    let mut s3 = open();
    let left = s3.dead_letters(10).expect("list");
    assert_eq!(
        left.iter().map(|d| d.env.seq).collect::<Vec<_>>(),
        vec![4, 7],
        "take is durable; a new letter sorts last"
    );
    assert!(left[1].id > dl[1].id, "ids are not reused");
    assert_eq!(s3.recover().expect("recover").dead_letters, 2);
}

#[test]
fn redb_round_trip_survives_reopen() {
    for durability in [
        Durability::Fsync,
        Durability::Interval(Duration::from_secs(3600)),
        Durability::Memory,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        check(&mut || Box::new(RedbStore::open(&path, durability).expect("open")));
    }
}

#[test]
fn memory_store_behaves_the_same() {
    type Shared = std::sync::Arc<std::sync::Mutex<MemoryStore>>;
    struct Handle(Shared);
    impl Store for Handle {
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
            self.0.lock().expect("lock").sync()
        }
        fn stats(&self) -> StoreStats {
            self.0.lock().expect("lock").stats()
        }
    }
    let shared = Shared::default();
    check(&mut || Box::new(Handle(shared.clone())));
}

#[test]
fn second_open_names_the_owner_pid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
    for err in [
        RedbStore::open(dir.path(), Durability::Fsync).expect_err("in use"),
        RedbStore::open_read_only(dir.path()).expect_err("in use"),
    ] {
        let text = err.to_string();
        assert!(
            text.contains(&format!("in use by pid {}", std::process::id())),
            "{text}"
        );
        assert!(matches!(err, StoreError::InUse { pid: Some(_), .. }));
    }
}

#[test]
fn lock_is_released_on_drop() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(RedbStore::open(dir.path(), Durability::Fsync).expect("open"));
    drop(RedbStore::open(dir.path(), Durability::Fsync).expect("reopen"));
}

#[test]
fn corrupt_record_is_quarantined_not_returned() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
        s.commit(Batch {
            append: (1..=3).map(|i| entry("svc:a", i, 8)).collect(),
            ..Batch::default()
        })
        .expect("commit");
        s.damage_entry("svc:a", 2);
    }
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("reopen");
    let rec = s.recover().expect("recover");
    assert_eq!(
        ids(&rec),
        vec![("svc:a".into(), 1), ("svc:a".into(), 3)],
        "the others are returned"
    );
    assert_eq!(rec.corrupt.len(), 1);
    assert_eq!(rec.corrupt[0].table, "entries");
    assert_eq!(rec.corrupt[0].key, "svc:a#2");
    assert_eq!(rec.corrupt[0].reason, "checksum mismatch");
    // Moved, not deleted: a second recovery is clean and the bytes are in quarantine.
    assert!(s.recover().expect("again").corrupt.is_empty());
    drop(s);
    let db = ::redb::ReadOnlyDatabase::open(dir.path().join(STORE_FILE)).expect("raw open");
    let read = ::redb::ReadableDatabase::begin_read(&db).expect("read");
    let q = read
        .open_table(::redb::TableDefinition::<&str, &[u8]>::new("quarantine"))
        .expect("table");
    assert!(q.get("entries/svc:a#2").expect("get").is_some());
}

/// What a store logs while `f` runs (on this thread).
fn logs_of(f: impl FnOnce()) -> String {
    #[derive(Clone, Default)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let capture = Capture::default();
    let writer = capture.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = capture.0.lock().expect("log buffer").clone();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn a_store_that_could_not_open_says_so_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let garbage = vec![0x5a; 64 * 1024];
    std::fs::write(dir.path().join(STORE_FILE), &garbage).expect("write");
    let logs = logs_of(|| {
        let err = RedbStore::open(dir.path(), Durability::Fsync).expect_err("garbage");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    });
    // The error is the whole story: dropping the half-made store tried to open the file
    // again for a final sync and logged the same corruption as a warning.
    assert!(!logs.contains("final store sync failed"), "{logs}");
    // The lock is released and the file left as it was, for the user to move aside.
    let again = RedbStore::open(dir.path(), Durability::Fsync).expect_err("garbage again");
    assert!(matches!(again, StoreError::Corrupt { .. }), "{again}");
    let kept = std::fs::read(dir.path().join(STORE_FILE)).expect("read");
    assert!(kept == garbage, "the corrupt file was changed");
}

#[test]
fn garbage_or_truncated_file_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(STORE_FILE), vec![0x5a; 64 * 1024]).expect("write");
    let err = RedbStore::open(dir.path(), Durability::Fsync).expect_err("garbage");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("move it aside"), "{err}");

    // A real file, cut at many lengths: a clear error or intact records only, never a panic.
    let src = tempfile::tempdir().expect("tempdir");
    {
        let mut s = RedbStore::open(src.path(), Durability::Fsync).expect("open");
        for chunk in 0..4u64 {
            s.commit(Batch {
                append: (chunk * 100..chunk * 100 + 100)
                    .map(|i| entry("svc:a", i, 512))
                    .collect(),
                ..Batch::default()
            })
            .expect("commit");
        }
    }
    let real = std::fs::read(src.path().join(STORE_FILE)).expect("read");
    let mut outcomes = BTreeMap::new();
    for cut in [
        0,
        1,
        100,
        512,
        4096,
        4097,
        real.len() / 3,
        real.len() / 2,
        real.len() - 1,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(STORE_FILE), &real[..cut]).expect("write");
        let outcome =
            std::panic::catch_unwind(|| match RedbStore::open(dir.path(), Durability::Fsync) {
                Err(e) => format!("error: {e}"),
                Ok(mut s) => match s.recover() {
                    Ok(rec) => {
                        assert!(
                            rec.entries
                                .iter()
                                .all(|e| e == &entry("svc:a", e.env.seq, 512))
                        );
                        format!("ok: {} entries", rec.entries.len())
                    }
                    Err(e) => format!("recover error: {e}"),
                },
            })
            .unwrap_or_else(|_| panic!("panicked on a file cut to {cut} bytes"));
        outcomes.insert(cut, outcome);
    }
    // A zero-length file is a fresh store; anything else cut short must not be silently empty.
    eprintln!("{outcomes:#?}");
}

#[test]
fn flipped_bytes_in_the_file_never_panic() {
    let src = tempfile::tempdir().expect("tempdir");
    {
        let mut s = RedbStore::open(src.path(), Durability::Fsync).expect("open");
        s.commit(Batch {
            append: (0..300).map(|i| entry("svc:a", i, 200)).collect(),
            ..Batch::default()
        })
        .expect("commit");
    }
    let real = std::fs::read(src.path().join(STORE_FILE)).expect("read");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..40 {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = real.clone();
        for _ in 0..8 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let at = (rng % bytes.len() as u64) as usize;
            bytes[at] ^= (rng >> 32) as u8 | 1;
        }
        std::fs::write(dir.path().join(STORE_FILE), &bytes).expect("write");
        let r = std::panic::catch_unwind(|| {
            if let Ok(mut s) = RedbStore::open(dir.path(), Durability::Fsync) {
                if let Ok(rec) = s.recover() {
                    for e in &rec.entries {
                        assert_eq!(e, &entry("svc:a", e.env.seq, 200), "damaged data returned");
                    }
                }
                let _ = s.dead_letters(10);
                let _ = s.commit(Batch {
                    append: vec![entry("svc:b", 1, 10)],
                    ..Batch::default()
                });
            }
        });
        assert!(r.is_ok(), "panicked");
    }
}

#[test]
fn removed_entries_do_not_grow_the_file_and_compact_shrinks_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s =
        RedbStore::open(dir.path(), Durability::Interval(Duration::from_secs(60))).expect("open");
    s.sync().expect("sync");
    let start = s.stats().file_bytes;
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
            remove: (base..base + 2000).map(|i| ("svc:a".into(), i)).collect(),
            ..Batch::default()
        })
        .expect("remove");
    }
    s.sync().expect("sync");
    let grown = s.stats().file_bytes;
    while s.compact().expect("compact") {}
    let end = s.stats().file_bytes;
    eprintln!("file bytes: start {start}, after 10k appends+removes {grown}, compacted {end}");
    assert!(
        end <= start + 256 * 1024,
        "start {start}, grown {grown}, compacted {end}"
    );
    assert!(s.recover().expect("recover").entries.is_empty());
}

#[test]
fn checkpoints_count_the_unsettled_entries_they_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
    let base = s.stats();
    s.commit(Batch {
        append: (1..=5).map(|q| entry("svc:a", q, 64)).collect(),
        ..Batch::default()
    })
    .expect("commit");
    s.commit(Batch {
        remove: vec![("svc:a".into(), 1), ("svc:a".into(), 2)],
        ..Batch::default()
    })
    .expect("commit");
    assert_eq!(s.stats().checkpoints, base.checkpoints, "none due yet");
    s.checkpoint().expect("checkpoint");
    let after = s.stats();
    assert_eq!(after.checkpoints - base.checkpoints, 1);
    assert_eq!(
        after.checkpointed_entries - base.checkpointed_entries,
        3,
        "the two settled entries never reach the database"
    );
    s.checkpoint().expect("an empty checkpoint");
    assert_eq!(s.stats().checkpoints, after.checkpoints, "nothing to move");
}

fn appended(log: &str, seqs: std::ops::RangeInclusive<u64>) -> Batch {
    Batch {
        append: seqs.map(|q| entry(log, q, 64)).collect(),
        ..Batch::default()
    }
}

fn removed(log: &str, seqs: &[u64]) -> Batch {
    Batch {
        remove: seqs.iter().map(|q| (log.into(), *q)).collect(),
        ..Batch::default()
    }
}

/// Ends `s` as a crash would, opens its directory again (an `Fsync` store) and returns the
/// entries it recovers; the reopened store is then stopped cleanly.
fn crash_and_recover(s: RedbStore, dir: &Path) -> Vec<(String, u64)> {
    s.crash();
    let mut s = RedbStore::open(dir, Durability::Fsync).expect("reopen after a crash");
    ids(&s.recover().expect("recover"))
}

/// The checkpoints that commits bring on carry the young unsettled entries over to the next
/// side-log file instead of the database, once each: the next checkpoint writes those still
/// there to the database. A crash in between loses none of them.
#[test]
fn checkpoints_carry_young_entries_over_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
    let base = s.stats();
    s.commit(appended("svc:a", 1..=3)).expect("commit");
    s.commit(removed("svc:a", &[1])).expect("commit");
    s.checkpoint_as_commits_do().expect("checkpoint");
    let first = s.stats();
    assert_eq!(first.carried_entries - base.carried_entries, 2);
    assert_eq!(first.checkpointed_entries, base.checkpointed_entries);
    s.commit(appended("svc:a", 4..=4)).expect("commit");
    s.commit(removed("svc:a", &[2])).expect("commit");
    s.checkpoint_as_commits_do().expect("checkpoint");
    let second = s.stats();
    assert_eq!(
        second.checkpointed_entries - first.checkpointed_entries,
        1,
        "#3 was carried once already: now it goes to the database"
    );
    assert_eq!(second.carried_entries - first.carried_entries, 1, "#4");
    assert_eq!(
        crash_and_recover(s, dir.path()),
        vec![("svc:a".into(), 3), ("svc:a".into(), 4)]
    );
    assert!(
        wal::Wal::is_empty_in(dir.path()),
        "a clean stop leaves no record"
    );
}

/// A clean stop leaves both side-log files with no record but keeps their preallocated
/// blocks, so the next start writes nothing to them, and a stopped node's directory is read
/// without a repair.
#[test]
fn a_clean_stop_keeps_the_preallocated_side_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
    s.preallocate_side_log().expect("preallocate");
    s.commit(appended("svc:a", 1..=3)).expect("commit");
    s.checkpoint_as_commits_do().expect("checkpoint");
    s.commit(removed("svc:a", &[1])).expect("commit");
    drop(s);
    let sizes = || {
        [WAL_FILE, WAL_FILE_ODD].map(|f| {
            std::fs::metadata(dir.path().join(f))
                .expect("side log")
                .len()
        })
    };
    let kept = sizes();
    assert!(kept.iter().all(|&n| n > 16 << 20), "{kept:?}");
    assert!(wal::Wal::is_empty_in(dir.path()));
    let mut ro = RedbStore::open_read_only(dir.path()).expect("inspect");
    assert!(format!("{ro:?}").contains("read_only: true"), "no repair");
    assert_eq!(
        ids(&ro.recover().expect("recover")),
        vec![("svc:a".into(), 2), ("svc:a".into(), 3)]
    );
    drop(ro);
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("reopen");
    s.preallocate_side_log().expect("preallocate");
    assert_eq!(sizes(), kept);
    s.commit(removed("svc:a", &[2])).expect("commit");
    assert_eq!(crash_and_recover(s, dir.path()), vec![("svc:a".into(), 3)]);
}

/// A checkpoint that wrote the next epoch's first record (with the entries it carries) and
/// went no further leaves that record in the other file. Whatever later moves to that epoch
/// writes its own first record over it, so entries removed meanwhile never come back, even
/// when the process dies right after the move.
#[test]
fn an_abandoned_checkpoint_never_brings_entries_back() {
    for durability in [
        Durability::Fsync,
        Durability::Interval(Duration::from_secs(3600)),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedbStore::open(dir.path(), durability).expect("open");
        s.commit(appended("svc:a", 1..=2)).expect("commit");
        s.prepare_and_abandon_a_checkpoint();
        s.commit(removed("svc:a", &[1])).expect("commit");
        s.crash();
        // The replay moves to the epoch the abandoned checkpoint had prepared.
        let s = RedbStore::open(dir.path(), durability).expect("reopen after a crash");
        s.crash();
        let mut s = RedbStore::open(dir.path(), durability).expect("reopen after a crash");
        let rec = s.recover().expect("recover");
        assert_eq!(ids(&rec), vec![("svc:a".into(), 2)], "{durability:?}");
    }
}

/// A panic inside the move to a new epoch (redb's, say) fails that checkpoint, but the store
/// keeps its side log: later commits go on, and a crash after them loses nothing.
#[test]
fn a_panic_while_moving_to_a_new_epoch_keeps_the_side_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
    s.commit(appended("svc:a", 1..=2)).expect("commit");
    s.panic_in_next_epoch_move();
    let err = s.checkpoint().expect_err("the checkpoint fails");
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    s.commit(appended("svc:a", 3..=3))
        .expect("a commit after the failure");
    s.commit(removed("svc:a", &[1])).expect("commit");
    assert_eq!(
        crash_and_recover(s, dir.path()),
        vec![("svc:a".into(), 2), ("svc:a".into(), 3)]
    );
}

/// Side logs written before there were two files kept every epoch in `peerbus.wal`; a store
/// left so at an odd epoch after a crash is replayed from there, and the replay does not
/// touch that file before the database holds what it read.
#[test]
fn a_side_log_of_one_file_at_an_odd_epoch_is_replayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
    s.commit(appended("svc:a", 1..=1)).expect("commit");
    s.checkpoint().expect("checkpoint: epoch 1, an odd one");
    s.commit(appended("svc:a", 2..=3)).expect("commit");
    s.commit(removed("svc:a", &[1])).expect("commit");
    s.crash();
    // What an older version leaves: the odd epoch's records in `peerbus.wal`.
    let odd = dir.path().join(WAL_FILE_ODD);
    let even = dir.path().join(WAL_FILE);
    std::fs::rename(&odd, &even).expect("move the records");
    let legacy = std::fs::read(&even).expect("read");
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("reopen");
    assert_eq!(
        std::fs::read(&even).expect("read"),
        legacy,
        "the replay moved on to an odd epoch, whose file is the other one"
    );
    assert_eq!(
        ids(&s.recover().expect("recover")),
        vec![("svc:a".into(), 2), ("svc:a".into(), 3)]
    );
    s.commit(removed("svc:a", &[2])).expect("commit");
    assert_eq!(crash_and_recover(s, dir.path()), vec![("svc:a".into(), 3)]);
}

#[test]
fn fsync_counts_follow_the_durability() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = || Batch {
        append: vec![entry("svc:a", 1, 8)],
        ..Batch::default()
    };
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
    let base = s.stats();
    for _ in 0..3 {
        s.commit(one()).expect("commit");
    }
    s.sync().expect("sync (nothing pending)");
    assert_eq!(s.stats().fsyncs - base.fsyncs, 3);
    assert_eq!(s.stats().commits - base.commits, 3);
    drop(s);

    let mut s =
        RedbStore::open(dir.path(), Durability::Interval(Duration::from_secs(3600))).expect("open");
    let base = s.stats();
    for _ in 0..3 {
        s.commit(one()).expect("commit");
    }
    assert_eq!(
        s.stats().fsyncs,
        base.fsyncs,
        "no fsync within the interval"
    );
    s.sync().expect("sync");
    assert_eq!(s.stats().fsyncs, base.fsyncs + 1);
    drop(s);

    let mut s = RedbStore::open(dir.path(), Durability::Interval(Duration::ZERO)).expect("open");
    let base = s.stats();
    s.commit(one()).expect("commit");
    assert_eq!(s.stats().fsyncs, base.fsyncs + 1, "zero interval is Fsync");
}

/// With `Fsync`, a batch that only removes (settled) entries is written but not synced on
/// its own: the next sync, or the next commit that syncs, covers it. A process crash before
/// either keeps it (the page cache has it); an OS crash could bring the entries back, to be
/// sent again.
#[test]
fn removals_alone_are_synced_with_the_next_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
    s.commit(appended("svc:a", 1..=3)).expect("commit");
    let base = s.stats();
    s.commit(removed("svc:a", &[1])).expect("commit");
    assert_eq!(s.stats().fsyncs, base.fsyncs, "removals alone: no fsync");
    s.sync().expect("sync");
    assert_eq!(s.stats().fsyncs, base.fsyncs + 1, "a sync covers them");
    s.commit(removed("svc:a", &[2])).expect("commit");
    s.commit(appended("svc:a", 4..=4)).expect("commit");
    assert_eq!(s.stats().fsyncs, base.fsyncs + 2, "an append syncs");
    s.commit(removed("svc:a", &[3])).expect("commit");
    assert_eq!(s.stats().commits, base.commits + 4);
    assert_eq!(
        crash_and_recover(s, dir.path()),
        vec![("svc:a".into(), 4)],
        "every removal was written before the crash"
    );
}

#[test]
fn read_only_open_reads_a_stopped_node_and_refuses_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        RedbStore::open_read_only(dir.path()),
        Err(StoreError::Io { .. })
    ));
    {
        let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
        s.commit(Batch {
            append: vec![entry("svc:a", 1, 8)],
            dead: vec![dead(1)],
            ..Batch::default()
        })
        .expect("commit");
    }
    let mut ro = RedbStore::open_read_only(dir.path()).expect("read-only");
    assert_eq!(ro.recover().expect("recover").entries.len(), 1);
    assert_eq!(ro.dead_letters(10).expect("list").len(), 1);
    assert!(
        ro.commit(Batch {
            append: vec![entry("svc:a", 2, 8)],
            ..Batch::default()
        })
        .is_err()
    );
    assert!(ro.take_dead_letters(&[1]).is_err());
    assert!(matches!(
        RedbStore::open(dir.path(), Durability::Fsync),
        Err(StoreError::InUse { .. })
    ));
}

/// Stale side-log records (a crash between a durable commit and emptying the side log) are
/// never applied again: a removed entry does not come back.
#[test]
fn stale_side_log_records_are_not_replayed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = dir.path().join(WAL_FILE);
    let stale = {
        let mut s = RedbStore::open(dir.path(), Durability::Interval(Duration::from_secs(3600)))
            .expect("open");
        s.commit(Batch {
            append: vec![entry("svc:a", 1, 8)],
            ..Batch::default()
        })
        .expect("commit");
        let stale = std::fs::read(&wal).expect("read side log");
        assert!(!stale.is_empty(), "the commit is in the side log");
        s.checkpoint().expect("checkpoint");
        s.commit(Batch {
            remove: vec![("svc:a".into(), 1)],
            ..Batch::default()
        })
        .expect("commit");
        stale
    };
    std::fs::write(&wal, &stale).expect("restore stale side log");
    let mut ro = RedbStore::open_read_only(dir.path()).expect("inspect");
    assert!(ro.recover().expect("recover").entries.is_empty());
    drop(ro);
    std::fs::write(&wal, &stale).expect("restore stale side log again");
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("reopen");
    assert!(s.recover().expect("recover").entries.is_empty());
    drop(s);
    assert!(
        wal::Wal::is_empty_in(dir.path()),
        "a clean stop leaves no record"
    );
}

// ---- crash tests: a child process commits and exits without closing the store ----

/// The child: `node/examples/store_crash_child.rs`, which `cargo test` builds next to the
/// test binaries (`<target>/<profile>/examples/`). It commits and exits without closing the
/// store. Its batches match `assert_all_commits_survived`. A child older than the store's
/// source predates the code under test (a filtered `cargo test --lib` rebuilds the tests,
/// not the examples), so it is built again through cargo, as a missing one is.
fn crash(mode: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("exe");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let child = profile
        .join("examples")
        .join(format!("store_crash_child{}", std::env::consts::EXE_SUFFIX));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let source = Path::new(env!("CARGO_MANIFEST_DIR"));
    let newest_source = std::fs::read_dir(source.join("src/store"))
        .into_iter()
        .flatten()
        .filter_map(|f| modified(&f.ok()?.path()))
        .chain(modified(&source.join("examples/store_crash_child.rs")))
        .max();
    let fresh = matches!((modified(&child), newest_source), (Some(c), Some(s)) if c >= s);
    let status = if fresh {
        std::process::Command::new(&child)
            .arg(dir.path())
            .arg(mode)
            .status()
            .expect("run child")
    } else {
        // Not built yet, or maybe stale (see above): build it.
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "run",
                "--quiet",
                "-p",
                "peerbus-node",
                "--example",
                "store_crash_child",
                "--",
            ])
            .arg(dir.path())
            .arg(mode)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo run the child")
    };
    assert!(status.success(), "child failed: {status}");
    dir
}

fn assert_all_commits_survived(rec: &Recovered) {
    assert_eq!(
        rec.entries.iter().map(|e| e.env.seq).collect::<Vec<_>>(),
        (40..50).collect::<Vec<_>>()
    );
    assert_eq!(rec.next_seqs, vec![("svc:a".into(), 50)]);
    assert_eq!(rec.dead_letters, 5);
}

#[test]
fn fsync_commits_survive_a_process_crash() {
    let dir = crash("fsync");
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open after crash");
    assert_all_commits_survived(&s.recover().expect("recover"));
}

#[test]
fn interval_commits_survive_a_process_crash() {
    let dir = crash("interval");
    assert!(
        // The child's checkpoint moved to epoch 1, whose file is the odd one.
        std::fs::metadata(dir.path().join(WAL_FILE_ODD))
            .expect("side log")
            .len()
            > 0,
        "the unsynced commits are only in the side log"
    );
    // Inspection of the crashed directory already sees them (it repairs and replays first).
    let mut ro = RedbStore::open_read_only(dir.path()).expect("read-only after crash");
    assert_all_commits_survived(&ro.recover().expect("recover"));
    drop(ro);
    let mut s = RedbStore::open(dir.path(), Durability::Interval(Duration::from_secs(1)))
        .expect("open after crash");
    assert_all_commits_survived(&s.recover().expect("recover"));
    assert_eq!(s.dead_letters(10).expect("list").len(), 5);
}

// ---- full disk ----

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// The disk fills up while entries are committed (none removed). Freeing space must let the
/// store go on: the freed space must hold a checkpoint of what the side log holds unapplied
/// (at most `MAX_UNAPPLIED_BYTES` of entries, which take about three times that in the
/// database), so the test frees 16 MiB.
#[test]
fn full_disk_is_reported_and_retry_works_after_freeing_space() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED full_disk test: cannot mount a small tmpfs here (needs root)");
        return;
    }
    let _mount = Mount(dir.path().to_path_buf());
    let data = dir.path().join("data");
    let filler = dir.path().join("filler");
    std::fs::write(&filler, vec![0u8; 16 << 20]).expect("filler");
    let mut s = RedbStore::open(&data, Durability::Fsync).expect("open");
    let mut stored = 0u64;
    let err = loop {
        let batch = Batch {
            append: (stored..stored + 16)
                .map(|i| entry("svc:a", i, 1024))
                .collect(),
            ..Batch::default()
        };
        match s.commit(batch) {
            Ok(()) => stored += 16,
            Err(e) => break e,
        }
        assert!(stored < 100_000, "never filled up");
    };
    assert!(matches!(err, StoreError::Full { .. }), "{err:?}");
    assert!(err.to_string().contains("disk full"), "{err}");
    std::fs::remove_file(&filler).expect("free space");
    s.commit(Batch {
        append: vec![entry("svc:b", 1, 8)],
        ..Batch::default()
    })
    .expect("retry after freeing space");
    let rec = s.recover().expect("recover");
    assert_eq!(
        rec.entries.len() as u64,
        stored + 1,
        "nothing of the failed batch stored"
    );
}

// ---- the model ----

#[derive(Debug, Clone)]
enum Op {
    Commit(Batch),
    Take(Vec<u64>),
    Reopen,
    /// A checkpoint as commits bring on: young entries are carried over, not written.
    Checkpoint,
    /// The next epoch's first record is written and the checkpoint goes no further (its
    /// database commit failed, or the process died there).
    AbandonedCheckpoint,
    /// The process dies: no checkpoint, no emptied side log.
    Crash,
}

fn batch_strategy() -> impl Strategy<Value = Batch> {
    let log = prop_oneof![Just("svc:a"), Just("svc:b"), Just("grp:c")];
    let e = (log.clone(), 0u64..12, 0usize..40).prop_map(|(l, s, n)| entry(l, s, n));
    let r = (log.clone(), 0u64..12).prop_map(|(l, s)| (l.to_string(), s));
    let w = (0u8..3, log.clone(), 0u64..100).prop_map(|(o, l, f)| window(o, l, f));
    let n = (log, 0u64..100).prop_map(|(l, s)| (l.to_string(), s));
    let d = (0u64..5, 0u64..30).prop_map(|(id, s)| DeadLetter { id, ..dead(s) });
    let g = (
        prop_oneof![Just("g1"), Just("g2"), Just("g3")],
        proptest::option::of((0u64..4, proptest::collection::vec("[a-z.*>]{1,6}", 0..3))),
    )
        .prop_map(|(g, s)| {
            let state = s.map(|(version, patterns)| GroupState { version, patterns });
            (g.to_string(), state)
        });
    (
        proptest::collection::vec(e, 0..6),
        proptest::collection::vec(r, 0..6),
        proptest::collection::vec(w, 0..3),
        proptest::collection::vec(n, 0..3),
        proptest::collection::vec(d, 0..3),
        proptest::collection::vec(g, 0..3),
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

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => batch_strategy().prop_map(Op::Commit),
        1 => proptest::collection::vec(0u64..12, 0..4).prop_map(Op::Take),
        1 => Just(Op::Reopen),
        2 => Just(Op::Checkpoint),
        1 => Just(Op::AbandonedCheckpoint),
        2 => Just(Op::Crash),
    ]
}

/// The simplest thing that could be right.
#[derive(Default)]
struct Model {
    entries: BTreeMap<(smol_str::SmolStr, u64), StoredEntry>,
    seqs: BTreeMap<String, u64>,
    windows: BTreeMap<([u8; 32], String), WindowSnapshot>,
    dead: BTreeMap<u64, DeadLetter>,
    next_dead: u64,
    groups: BTreeMap<String, GroupState>,
}

impl Model {
    fn commit(&mut self, b: &Batch) {
        for e in &b.append {
            self.entries
                .insert((e.env.log.clone(), e.env.seq), e.clone());
        }
        for k in &b.remove {
            self.entries.remove(k);
        }
        for w in &b.windows {
            self.windows
                .insert((*w.origin.as_bytes(), w.log.clone()), w.clone());
        }
        for (l, s) in &b.next_seqs {
            self.seqs.insert(l.clone(), *s);
        }
        for d in &b.dead {
            let mut d = d.clone();
            if d.id == 0 {
                self.next_dead = self.next_dead.max(1);
                d.id = self.next_dead;
            }
            self.next_dead = self.next_dead.max(d.id + 1);
            self.dead.insert(d.id, d);
        }
        for (g, s) in &b.groups {
            match s {
                Some(s) => self.groups.insert(g.clone(), s.clone()),
                None => self.groups.remove(g),
            };
        }
    }
}

fn run_model(ops: &[Op], durability: Durability) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redb = RedbStore::open(dir.path(), durability).expect("open");
    let mut mem = MemoryStore::new();
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Commit(b) => {
                model.commit(b);
                redb.commit(b.clone()).expect("commit");
                mem.commit(b.clone()).expect("commit");
            }
            Op::Take(ids) => {
                let want: Vec<_> = ids.iter().filter_map(|i| model.dead.remove(i)).collect();
                assert_eq!(redb.take_dead_letters(ids).expect("take"), want);
                assert_eq!(mem.take_dead_letters(ids).expect("take"), want);
            }
            Op::Reopen => {
                drop(redb);
                redb = RedbStore::open(dir.path(), durability).expect("reopen");
            }
            Op::Checkpoint => redb.checkpoint_as_commits_do().expect("checkpoint"),
            Op::AbandonedCheckpoint => redb.prepare_and_abandon_a_checkpoint(),
            Op::Crash => {
                redb.crash();
                redb = RedbStore::open(dir.path(), durability).expect("reopen after a crash");
            }
        }
    }
    drop(redb);
    let mut redb = RedbStore::open(dir.path(), durability).expect("reopen");
    for store in [&mut redb as &mut dyn Store, &mut mem] {
        let rec = store.recover().expect("recover");
        assert_eq!(
            rec.entries,
            model.entries.values().cloned().collect::<Vec<_>>()
        );
        assert_eq!(
            rec.next_seqs,
            model
                .seqs
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            rec.windows,
            model.windows.values().cloned().collect::<Vec<_>>()
        );
        assert_eq!(rec.dead_letters, model.dead.len());
        assert_eq!(
            rec.groups,
            model
                .groups
                .iter()
                .map(|(g, p)| (g.clone(), p.clone()))
                .collect::<Vec<_>>()
        );
        assert!(rec.corrupt.is_empty());
        assert_eq!(
            store.dead_letters(usize::MAX).expect("list"),
            model.dead.values().cloned().collect::<Vec<_>>()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn any_sequence_of_batches_recovers_like_the_model(
        ops in proptest::collection::vec(op_strategy(), 0..25),
        interval in any::<bool>(),
    ) {
        let durability = if interval {
            Durability::Interval(Duration::from_secs(3600))
        } else {
            Durability::Fsync
        };
        run_model(&ops, durability);
    }
}

/// A stored state of `name`: `version` with `patterns` (none: released).
fn state(version: u64, patterns: &[&str]) -> GroupState {
    GroupState {
        version,
        patterns: patterns.iter().map(|p| p.to_string()).collect(),
    }
}

fn group(name: &str, version: u64, patterns: &[&str]) -> (String, Option<GroupState>) {
    (name.to_string(), Some(state(version, patterns)))
}

fn check_groups(store: &mut dyn Store, want: &[(&str, u64, &[&str])]) {
    let rec = store.recover().expect("recover");
    let want: Vec<(String, GroupState)> = want
        .iter()
        .map(|(g, v, p)| (g.to_string(), state(*v, p)))
        .collect();
    assert_eq!(rec.groups, want);
    assert!(rec.corrupt.is_empty(), "{:?}", rec.corrupt);
}

#[test]
fn known_groups_round_trip_are_removed_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut mem = MemoryStore::new();
    let mut redb = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
    let batches = [
        Batch {
            groups: vec![
                group("billing", 1, &["orders.*"]),
                group("audit", 1, &["orders.>", "payments.>"]),
                group("legacy", 3, &[]),
            ],
            ..Batch::default()
        },
        // Replaced by the later item for the same group; an unknown removal is a no-op.
        Batch {
            groups: vec![
                group("billing", 1, &["orders.created"]),
                group("billing", 2, &["orders.*", "refunds.*"]),
                ("nobody".to_string(), None),
            ],
            ..Batch::default()
        },
    ];
    for b in &batches {
        redb.commit(b.clone()).expect("commit");
        mem.commit(b.clone()).expect("commit");
    }
    let all: &[(&str, u64, &[&str])] = &[
        ("audit", 1, &["orders.>", "payments.>"]),
        ("billing", 2, &["orders.*", "refunds.*"]),
        ("legacy", 3, &[]),
    ];
    check_groups(&mut redb, all);
    check_groups(&mut mem, all);
    drop(redb);
    let mut redb = RedbStore::open(dir.path(), Durability::Fsync).expect("reopen");
    check_groups(&mut redb, all);

    let forget = Batch {
        groups: vec![("audit".to_string(), None), group("legacy", 4, &["l.*"])],
        ..Batch::default()
    };
    redb.commit(forget.clone()).expect("commit");
    mem.commit(forget).expect("commit");
    let left: &[(&str, u64, &[&str])] = &[
        ("billing", 2, &["orders.*", "refunds.*"]),
        ("legacy", 4, &["l.*"]),
    ];
    check_groups(&mut mem, left);
    drop(redb);
    let mut redb = RedbStore::open(dir.path(), Durability::Fsync).expect("reopen");
    check_groups(&mut redb, left);
    drop(redb);
    let mut ro = RedbStore::open_read_only(dir.path()).expect("read-only");
    check_groups(&mut ro, left);
}

/// Stores written before group versions kept a group's patterns alone: they read as version
/// 1, and the group's first new state replaces them for good.
#[test]
fn unversioned_group_rows_read_as_version_one_until_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
        s.put_legacy_group("billing", &["orders.*"]);
        s.put_legacy_group("audit", &["orders.>"]);
    }
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("reopen");
    check_groups(
        &mut s,
        &[("audit", 1, &["orders.>"]), ("billing", 1, &["orders.*"])],
    );
    s.commit(Batch {
        groups: vec![group("billing", 2, &[]), ("audit".to_string(), None)],
        ..Batch::default()
    })
    .expect("commit");
    s.checkpoint().expect("checkpoint");
    drop(s);
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("reopen");
    check_groups(&mut s, &[("billing", 2, &[])]);
}

#[test]
fn a_corrupt_group_record_is_quarantined() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("open");
        s.commit(Batch {
            groups: vec![group("ok", 1, &["a.*"]), group("bad", 2, &["b.*"])],
            ..Batch::default()
        })
        .expect("commit");
        s.damage_group("bad");
    }
    let mut s = RedbStore::open(dir.path(), Durability::Fsync).expect("reopen");
    let rec = s.recover().expect("recover");
    assert_eq!(rec.groups, vec![("ok".to_string(), state(1, &["a.*"]))]);
    assert_eq!(rec.corrupt.len(), 1, "{:?}", rec.corrupt);
    assert_eq!(rec.corrupt[0].table, "group_states");
    assert_eq!(rec.corrupt[0].key, "bad");
    // Moved out: the next recovery finds it no more.
    let again = s.recover().expect("recover");
    assert!(again.corrupt.is_empty(), "{:?}", again.corrupt);
    assert_eq!(again.groups.len(), 1);
}
