//! What a receiver's dedup windows cost at their limit ([`MAX_WINDOWS`]): every entry from a
//! new `(origin, log)` pair then makes room for its window.
//!
//! Run: `cargo run --release -p peerbus-node --example inbox_bench`
//!
//! Times admitting and completing one entry of a new window, 20,000 times: with the inbox
//! full (each new window evicts) against the same with an empty inbox (no eviction), in the
//! same run, and prints the ratio (ARCHITECTURE, "Hot path notes").

use std::time::Instant;

use peerbus_node::NodeId;
use peerbus_node::engine::inbox::{Admit, Inbox, MAX_WINDOWS};

/// Microseconds per admission of an entry from a new window, after `existing` windows.
fn new_windows(existing: usize) -> f64 {
    let mut inbox = Inbox::new();
    let origin = NodeId::from_bytes([1; 32]);
    let logs: Vec<String> = (0..existing + 20_000)
        .map(|n| format!("svc:l{n}"))
        .collect();
    for log in &logs[..existing] {
        inbox.admit((origin, log, 1), 0, None, None);
        inbox.complete((origin, log, 1), None, true);
    }
    let start = Instant::now();
    for log in &logs[existing..] {
        let admitted = inbox.admit((origin, log, 1), 0, None, None);
        assert_eq!(admitted, Admit::Handle);
        inbox.complete((origin, log, 1), None, true);
    }
    start.elapsed().as_secs_f64() * 1e6 / 20_000.0
}

fn main() {
    let empty = new_windows(0);
    let full = new_windows(MAX_WINDOWS);
    println!(
        "new window, {MAX_WINDOWS} kept: {full:>8.3} µs  (none kept: {empty:.3} µs, ratio {:.1})",
        full / empty
    );
}
