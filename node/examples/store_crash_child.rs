//! Used by the store's crash tests (not a user example): commits 50 batches to the store in
//! the directory given as the first argument, in mode `fsync` or `interval` (second argument),
//! with a checkpoint after the 26th, then exits without closing the store, as a crash right
//! after the commits returned would.
//!
//! `cargo run -p peerbus-node --example store_crash_child -- DIR fsync`

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use peerbus_node::engine::wire::{Envelope, Kind};
use peerbus_node::store::{Batch, DeadLetter, Durability, RedbStore, Store, StoredEntry};
use peerbus_transport::NodeId;

fn entry(seq: u64) -> StoredEntry {
    StoredEntry {
        env: Envelope {
            origin: NodeId::from_bytes([1; 32]),
            log: "svc:a".into(),
            seq,
            kind: Kind::Send,
            destination: "orders".into(),
            key: Some(format!("k{}", seq % 3).into()),
            headers: vec![("traceparent".into(), "00-ab-cd-01".into())].into(),
            content_type: None,
            created_at_ms: seq,
            attempt: 1,
            payload: Bytes::from(vec![7u8; 100]),
        }
        .into(),
        expires_at_ms: None,
        not_before_ms: Some(seq),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(mode)) = (args.next(), args.next()) else {
        eprintln!("usage: store_crash_child DIR fsync|interval");
        std::process::exit(2);
    };
    let durability = match mode.as_str() {
        "fsync" => Durability::Fsync,
        _ => Durability::Interval(Duration::from_secs(3600)),
    };
    let mut s = match RedbStore::open(Path::new(&dir), durability) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("open: {e}");
            std::process::exit(1);
        }
    };
    for i in 0..50u64 {
        let batch = Batch {
            append: vec![entry(i)],
            remove: i
                .checked_sub(10)
                .map(|r| ("svc:a".into(), r))
                .into_iter()
                .collect(),
            next_seqs: vec![("svc:a".into(), i + 1)],
            dead: if i % 10 == 0 {
                vec![DeadLetter {
                    id: 0,
                    env: Envelope::clone(&entry(i).env),
                    reason: "ttl expired".into(),
                    attempts: 2,
                    dead_at_ms: 5,
                }]
            } else {
                vec![]
            },
            ..Batch::default()
        };
        if let Err(e) = s.commit(batch) {
            eprintln!("commit: {e}");
            std::process::exit(1);
        }
        // Halfway, move everything into the database: the crash then leaves entries there
        // that later side-log records remove, as well as records that append.
        if i == 25
            && let Err(e) = s.checkpoint()
        {
            eprintln!("checkpoint: {e}");
            std::process::exit(1);
        }
    }
    // Like kill -9 after the commits returned: no destructor runs.
    std::process::exit(0);
}
