//! What durability costs on the write path behind `send`, and what group commit buys back.
//!
//! Run: `cargo run --release -p peerbus-node --example store_bench [dir]`
//! (the directory defaults to a fresh one under the system temp dir; use a path on the disk
//! you care about: fsync cost is a property of the disk, not of peerbus).
//!
//! Each line commits 1 KiB entries for about half a second in batches of the given size (the
//! store writer folds every `send` that queued during the previous commit into one batch), and
//! removes them again in the same commits, as delivery would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use peerbus_node::engine::wire::{Envelope, Kind};
use peerbus_node::store::{Batch, Durability, MemoryStore, RedbStore, Store, StoredEntry};
use peerbus_node::{Bytes, NodeId};

const RUN: Duration = Duration::from_millis(500);

fn entry(seq: u64, payload: &Bytes) -> StoredEntry {
    StoredEntry {
        env: Envelope {
            origin: NodeId::from_bytes([1; 32]),
            log: "svc:bench".into(),
            seq,
            kind: Kind::Send,
            destination: "bench".into(),
            key: None,
            headers: Default::default(),
            content_type: None,
            created_at_ms: 0,
            attempt: 1,
            payload: payload.clone(),
        }
        .into(),
        expires_at_ms: None,
        not_before_ms: None,
    }
}

fn run(name: &str, store: &mut dyn Store, batch: u64) -> Result<(), Box<dyn std::error::Error>> {
    let payload = Bytes::from(vec![0xa5u8; 1024]);
    let (mut seq, mut commits) = (0u64, 0u64);
    let fsyncs_before = store.stats().fsyncs;
    let start = Instant::now();
    while start.elapsed() < RUN {
        // Remove what the previous commit appended: the log stays short, as with live delivery.
        let remove = (seq.saturating_sub(batch)..seq)
            .map(|s| ("svc:bench".into(), s))
            .collect();
        let append = (seq..seq + batch).map(|s| entry(s, &payload)).collect();
        store.commit(Batch {
            append,
            remove,
            ..Batch::default()
        })?;
        seq += batch;
        commits += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{name:<22} batch {batch:>4}: {:>9.0} commits/s {:>10.0} entries/s {:>7} fsyncs",
        commits as f64 / secs,
        seq as f64 / secs,
        store.stats().fsyncs - fsyncs_before,
    );
    Ok(())
}

fn fresh(root: &Path, name: &str) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let dir = root.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(dir)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = match std::env::args().nth(1) {
        Some(d) => PathBuf::from(d),
        None => std::env::temp_dir().join(format!("peerbus-store-bench-{}", std::process::id())),
    };
    println!("store bench in {} (1 KiB entries)", root.display());
    for batch in [1, 16, 256] {
        let mut s = RedbStore::open(&fresh(&root, "fsync")?, Durability::Fsync)?;
        run("Fsync", &mut s, batch)?;
    }
    for batch in [1, 16, 256] {
        let interval = Durability::Interval(Duration::from_millis(100));
        let mut s = RedbStore::open(&fresh(&root, "interval")?, interval)?;
        run("Interval(100ms)", &mut s, batch)?;
    }
    for batch in [1, 256] {
        run("MemoryStore", &mut MemoryStore::new(), batch)?;
    }
    std::fs::remove_dir_all(&root)?;
    Ok(())
}
