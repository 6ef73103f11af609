//! What a backlog kept for absent consumers costs the outbox's regular work: the dispatch
//! core runs after every batch of sends, and the timer pass it runs every 50 ms tick.
//!
//! Run: `cargo run --release -p peerbus-node --example outbox_bench`
//!
//! Each line times one operation with a backlog of the given size against a baseline of the
//! same run, and prints the ratio (ARCHITECTURE, "Hot path notes").
//! - *dispatch*: 50 peers with 5 group interests each are connected; the backlog is logs of
//!   durable groups that none of them consumes (their instances are all away), 10 entries each,
//!   so the dispatch sends nothing. The baseline is a dispatch that sends 20 new entries of a
//!   service to one of those peers, with no backlog: about what core dispatches per iteration
//!   under load. The ratio is what the idle backlog costs next to that work.
//! - *timer pass*: entries with a 10-minute TTL wait for a service with no instance, created
//!   evenly over 100 s, and the pass runs every 50 ms for 10 s from the first expiry on, as
//!   core's tick does: each pass dead-letters the entries that expired since the last one.
//!   The baseline holds only the entries created in the first 10 s (a tenth): the same
//!   expiries, none of the rest waiting.

use std::time::Instant;

use peerbus_node::engine::outbox::{Outbox, OutboxConfig, Target};
use peerbus_node::engine::wire::{Envelope, Interest, Kind};
use peerbus_node::{Bytes, NodeId};

fn envelope(kind: Kind, destination: &str) -> Envelope {
    Envelope {
        origin: NodeId::from_bytes([0; 32]),
        log: String::new(),
        seq: 0,
        kind,
        destination: destination.into(),
        key: None,
        headers: Vec::new(),
        content_type: None,
        created_at_ms: 0,
        attempt: 1,
        payload: Bytes::from_static(b"x"),
    }
}

/// Microseconds per `dispatch_into` with `offline` backlogged group logs.
fn dispatch(offline: usize) -> f64 {
    let mut outbox: Outbox = Outbox::new(OutboxConfig::default());
    for p in 0..50u8 {
        let interests = (0..5)
            .map(|i| Interest {
                pattern: format!("t{p}.{i}.>"),
                group: Some(format!("live{p}-{i}")),
            })
            .collect();
        outbox.peer_up(
            NodeId::from_bytes([p + 1; 32]),
            1,
            format!("svc{p}"),
            interests,
            100,
        );
    }
    for g in 0..offline {
        for _ in 0..10 {
            let env = envelope(Kind::Publish, "audit.event");
            outbox.append(
                &Target::Group(format!("offline{g}")),
                env,
                0,
                None,
                None,
                false,
            );
        }
    }
    let mut tx = Vec::new();
    let rounds = 20_000;
    let start = Instant::now();
    for _ in 0..rounds {
        outbox.dispatch_into(1, &mut tx);
        assert!(tx.is_empty(), "nothing can be sent");
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
}

/// Microseconds per timer pass (`check_timers`) with `entries` TTL'd entries created evenly
/// over `span_ms`, and how many the passes dead-lettered in all.
fn timer_pass(entries: u64, span_ms: u64) -> (f64, usize) {
    let mut outbox: Outbox = Outbox::new(OutboxConfig::default());
    let target = Target::Service("absent".into());
    for i in 0..entries {
        let created = i * span_ms / entries.max(1);
        let env = envelope(Kind::Send, "absent");
        outbox.append(&target, env, created, Some(600_000), None, false);
    }
    let passes = 200;
    let mut expired = 0;
    let start = Instant::now();
    for k in 0..passes {
        expired += outbox.check_timers(600_000 + k * 50).len();
    }
    (start.elapsed().as_secs_f64() * 1e6 / passes as f64, expired)
}

/// Microseconds per `dispatch_into` that sends 20 new entries to a live instance (appended
/// and acked outside the timing).
fn dispatch_twenty() -> f64 {
    let mut outbox: Outbox = Outbox::new(OutboxConfig::default());
    let peer = NodeId::from_bytes([1; 32]);
    outbox.peer_up(peer, 1, "orders".into(), Vec::new(), 1_000);
    let target = Target::Service("orders".into());
    let mut tx = Vec::new();
    let rounds = 20_000;
    let mut timed = std::time::Duration::ZERO;
    for _ in 0..rounds {
        let seqs: Vec<u64> = (0..20)
            .map(|_| {
                outbox
                    .append(
                        &target,
                        envelope(Kind::Send, "orders"),
                        1,
                        None,
                        None,
                        false,
                    )
                    .seq
            })
            .collect();
        let start = Instant::now();
        outbox.dispatch_into(1, &mut tx);
        timed += start.elapsed();
        assert_eq!(tx.len(), 20, "every entry sent");
        tx.clear();
        outbox.on_ack(peer, &target.log_name(), &seqs);
    }
    timed.as_secs_f64() * 1e6 / f64::from(rounds)
}

fn main() {
    let busy = dispatch_twenty();
    for offline in [10, 100, 1000] {
        let us = dispatch(offline);
        println!(
            "dispatch   {offline:>7} offline groups: {us:>8.2} µs  (sending 20 entries: {busy:.2} µs, \
             ratio {:.2})",
            us / busy
        );
    }
    for entries in [10_000, 100_000, 1_000_000] {
        let (us, expired) = timer_pass(entries, 100_000);
        let (base, base_expired) = timer_pass(entries / 10, 10_000);
        println!(
            "timer pass {entries:>7} TTL'd entries: {us:>8.2} µs  (a tenth: {base:.2} µs, ratio \
             {:.1}; {expired} and {base_expired} expired)",
            us / base
        );
    }
}
