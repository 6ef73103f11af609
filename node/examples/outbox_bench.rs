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
//! - *starved dispatch*: as *dispatch*, but the backlog is logs of durable groups whose one
//!   instance (a 51st peer, subscribed to all of them) has used up its credit (50 entries in
//!   flight) and acks nothing, 10 entries each.
//! - *dispatch and ack out of credit*: 3 or 10 durable group logs share one instance with
//!   credit for 20; each round appends 10 entries to every log, then dispatches and acks what
//!   went until all went (what a busy consumer's credit does to the logs it serves). Per
//!   entry, against the per-entry cost of the 20-entry dispatch.
//! - *keys in flight*: 16 entries of 64, 16, 4 or 1 keys dispatched per round to one instance
//!   that has 256 in flight (the round's acks free the credit), against 256 keys: what a key's
//!   earlier entries in flight cost the chain check of its next one.
//! - *group dispatch*: the same 20 entries published to a durable group of 1, 3 or 10
//!   instances, each subscribed with 1, 3 or 5 patterns (one matching), keyed (256 keys) or
//!   not, against the baseline above: choosing among a group's instances by topic.
//! - *timer pass*: entries with a 10-minute TTL wait for a service with no instance, created
//!   evenly over 100 s, and the pass runs every 50 ms for 10 s from the first expiry on, as
//!   core's tick does: each pass dead-letters the entries that expired since the last one.
//!   The baseline holds only the entries created in the first 10 s (a tenth): the same
//!   expiries, none of the rest waiting.
//! - *ack-timeout pass*: 10,000 entries were sent to a live instance over 5 s, 20 every 10 ms,
//!   and no ack comes; the pass runs every 50 ms from the first ack timeout on, each sending
//!   back to waiting the entries that timed out since the last one, beside a backlog of
//!   waiting entries for a service with no instance. The baseline has no backlog.
//! - *status*: the per-log figures `status` asks for (`Outbox::stats`), 10 logs of 10
//!   entries each beside a backlog of waiting entries for a service with no instance. The
//!   baseline has no backlog.

use std::time::Instant;

use peerbus_node::engine::outbox::{Outbox, OutboxConfig, Target};
use peerbus_node::engine::wire::{Data, Envelope, Interest, Kind};
use peerbus_node::{Bytes, NodeId};

fn envelope(kind: Kind, destination: &str) -> Envelope {
    Envelope {
        origin: NodeId::from_bytes([0; 32]),
        log: Default::default(),
        seq: 0,
        kind,
        destination: destination.into(),
        key: None,
        headers: Default::default(),
        content_type: None,
        created_at_ms: 0,
        attempt: 1,
        payload: Bytes::from_static(b"x"),
    }
}

/// Connects 50 peers with 5 group interests each.
fn fifty_peers(outbox: &mut Outbox) {
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
}

/// Microseconds per `dispatch_into` that has nothing to send, over `rounds` calls.
fn idle_dispatch(outbox: &mut Outbox, rounds: u32) -> f64 {
    let mut tx = Vec::new();
    let start = Instant::now();
    for _ in 0..rounds {
        outbox.dispatch_into(1, &mut tx);
        assert!(tx.is_empty(), "nothing can be sent");
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
}

/// Microseconds per `dispatch_into` with `offline` backlogged group logs.
fn dispatch(offline: usize) -> f64 {
    let mut outbox: Outbox = Outbox::new(OutboxConfig::default());
    fifty_peers(&mut outbox);
    for g in 0..offline {
        for _ in 0..10 {
            let env = envelope(Kind::Publish, "audit.event");
            outbox.append(
                &Target::Group(format!("offline{g}").into()),
                env,
                0,
                None,
                None,
                false,
            );
        }
    }
    idle_dispatch(&mut outbox, 20_000)
}

/// Microseconds per `dispatch_into` with `groups` logs of durable groups whose one instance
/// (among 50 other peers) has used up its credit (50) and acks nothing: the entries wait for
/// credit, so the dispatch sends nothing.
fn dispatch_starved(groups: usize) -> f64 {
    let mut outbox: Outbox = Outbox::new(OutboxConfig::default());
    fifty_peers(&mut outbox);
    let interests = (0..groups)
        .map(|g| Interest {
            pattern: "audit.>".into(),
            group: Some(format!("audit{g}")),
        })
        .collect();
    let stalled = NodeId::from_bytes([200; 32]);
    outbox.peer_up(stalled, 1, "audit".into(), interests, 50);
    let mut tx = Vec::new();
    for g in 0..groups {
        for _ in 0..10 {
            let env = envelope(Kind::Publish, "audit.event");
            let target = Target::Group(format!("audit{g}").into());
            outbox.append(&target, env, 0, None, None, false);
        }
        outbox.dispatch_into(0, &mut tx);
    }
    assert_eq!(tx.len(), 50, "the instance's credit is used up");
    idle_dispatch(&mut outbox, 2_000)
}

/// Microseconds per entry to dispatch and ack entries of `logs` durable groups whose one
/// instance has credit for 20: each round appends 10 entries to every log, then dispatches and
/// acks what went until all went, so most dispatches end with every log out of credit.
fn dispatch_out_of_credit(logs: usize) -> f64 {
    let mut outbox: Outbox = Outbox::new(OutboxConfig::default());
    let peer = NodeId::from_bytes([1; 32]);
    let interests = (0..logs)
        .map(|g| Interest {
            pattern: "audit.>".into(),
            group: Some(format!("audit{g}")),
        })
        .collect();
    outbox.peer_up(peer, 1, "audit".into(), interests, 20);
    let targets: Vec<Target> = (0..logs)
        .map(|g| Target::Group(format!("audit{g}").into()))
        .collect();
    let mut tx = Vec::new();
    let rounds = 2_000;
    let start = Instant::now();
    for _ in 0..rounds {
        for target in &targets {
            for _ in 0..10 {
                let env = envelope(Kind::Publish, "audit.event");
                outbox.append(target, env, 1, None, None, false);
            }
        }
        let mut sent = 0;
        while sent < logs * 10 {
            outbox.dispatch_into(1, &mut tx);
            assert!(!tx.is_empty() && tx.len() <= 20, "up to the credit");
            sent += tx.len();
            for t in tx.drain(..) {
                if let Data::Deliver { env, .. } = t.frame {
                    outbox.on_ack(peer, &env.log, &[env.seq]);
                }
            }
        }
    }
    start.elapsed().as_secs_f64() * 1e6 / (rounds as f64 * logs as f64 * 10.0)
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

/// Microseconds per timer pass (`check_timers`) while entries in flight time out without
/// acks, beside `backlog` entries waiting for an absent service, and how many timed out.
fn ack_timeout_pass(backlog: u64) -> (f64, usize) {
    let config = OutboxConfig::default();
    let ack_timeout = config.ack_timeout_ms;
    let mut outbox: Outbox = Outbox::new(config);
    let absent = Target::Service("absent".into());
    for _ in 0..backlog {
        outbox.append(
            &absent,
            envelope(Kind::Send, "absent"),
            0,
            None,
            None,
            false,
        );
    }
    let peer = NodeId::from_bytes([1; 32]);
    outbox.peer_up(peer, 1, "orders".into(), Vec::new(), 100_000);
    let orders = Target::Service("orders".into());
    let mut tx = Vec::new();
    for round in 0..500u64 {
        for _ in 0..20 {
            let env = envelope(Kind::Send, "orders");
            outbox.append(&orders, env, round * 10, None, None, false);
        }
        outbox.dispatch_into(round * 10, &mut tx);
    }
    assert_eq!(tx.len(), 10_000, "every entry in flight");
    let passes = 100;
    let start = Instant::now();
    for k in 0..passes {
        outbox.check_timers(ack_timeout + k * 50);
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / passes as f64;
    let in_flight = outbox.stats().get("svc:orders").map_or(0, |s| s.in_flight);
    (us, 10_000 - in_flight)
}

/// Microseconds per `stats` call (what `status` asks of the outbox) with 10 logs of 10
/// entries each beside `backlog` entries waiting for an absent service.
fn stats_call(backlog: u64) -> f64 {
    let mut outbox: Outbox = Outbox::new(OutboxConfig::default());
    for i in 0..backlog {
        let env = envelope(Kind::Send, "absent");
        outbox.append(&Target::Service("absent".into()), env, i, None, None, false);
    }
    for s in 0..10 {
        for _ in 0..10 {
            let target = Target::Service(format!("svc{s}").into());
            outbox.append(&target, envelope(Kind::Send, "x"), 0, None, None, false);
        }
    }
    let calls: u32 = 200;
    let mut waiting = 0;
    let start = Instant::now();
    for _ in 0..calls {
        waiting += outbox.stats().values().map(|s| s.waiting).sum::<usize>();
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(calls);
    assert_eq!(waiting as u64, (backlog + 100) * u64::from(calls));
    us
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

/// Microseconds per entry for a `dispatch_into` that sends 16 new entries with `keys` keys
/// (round robin) to one instance that has 256 in flight, as under steady load: each round
/// appends 16 entries, dispatches them and acks the 16 oldest in flight (outside the timing),
/// so a key has about 256 / `keys` earlier entries in flight when one of its entries goes.
fn dispatch_in_flight_keys(keys: usize) -> f64 {
    let mut outbox: Outbox = Outbox::new(OutboxConfig::default());
    let peer = NodeId::from_bytes([1; 32]);
    outbox.peer_up(peer, 1, "orders".into(), Vec::new(), 256 + 16);
    let target = Target::Service("orders".into());
    let log = target.log_name();
    let mut tx = Vec::new();
    let mut next = 0usize;
    let mut append = |outbox: &mut Outbox| {
        let mut env = envelope(Kind::Send, "orders");
        env.key = Some(format!("k{}", next % keys).into());
        next += 1;
        outbox.append(&target, env, 1, None, None, false).seq
    };
    let mut in_flight = std::collections::VecDeque::new();
    for _ in 0..256 {
        in_flight.push_back(append(&mut outbox));
    }
    outbox.dispatch_into(1, &mut tx);
    assert_eq!(tx.len(), 256, "the window goes out");
    tx.clear();
    let rounds = 20_000;
    let mut timed = std::time::Duration::ZERO;
    for _ in 0..rounds {
        for _ in 0..16 {
            in_flight.push_back(append(&mut outbox));
        }
        let start = Instant::now();
        outbox.dispatch_into(1, &mut tx);
        timed += start.elapsed();
        assert_eq!(tx.len(), 16, "every new entry sent");
        tx.clear();
        let acked: Vec<u64> = in_flight.drain(..16).collect();
        outbox.on_ack(peer, &log, &acked);
    }
    timed.as_secs_f64() * 1e6 / (f64::from(rounds) * 16.0)
}

/// Microseconds per `dispatch_into` that sends 20 new entries of a topic to a durable group
/// of `instances` instances subscribed with `patterns` patterns each (one of them matching),
/// with 256 keys or none.
fn dispatch_group(instances: u8, patterns: usize, keyed: bool) -> f64 {
    let mut outbox: Outbox = Outbox::new(OutboxConfig::default());
    for p in 0..instances {
        let interests = (0..patterns)
            .map(|i| Interest {
                pattern: if i == 0 {
                    "order.>".into()
                } else {
                    format!("other{i}.*.x")
                },
                group: Some("billing".into()),
            })
            .collect();
        outbox.peer_up(
            NodeId::from_bytes([p + 1; 32]),
            1,
            "billing".into(),
            interests,
            1_000_000,
        );
    }
    let target = Target::Group("billing".into());
    let mut tx = Vec::new();
    let rounds = 20_000;
    let mut timed = std::time::Duration::ZERO;
    let mut sent = 0u64;
    for _ in 0..rounds {
        for _ in 0..20 {
            let mut env = envelope(Kind::Publish, "order.placed.eu");
            if keyed {
                env.key = Some(format!("k{}", sent % 256).into());
            }
            sent += 1;
            outbox.append(&target, env, 1, None, None, false);
        }
        let start = Instant::now();
        outbox.dispatch_into(1, &mut tx);
        timed += start.elapsed();
        assert_eq!(tx.len(), 20, "every entry sent");
        for t in tx.drain(..) {
            if let Data::Deliver { env, .. } = t.frame {
                outbox.on_ack(t.peer, &target.log_name(), &[env.seq]);
            }
        }
    }
    timed.as_secs_f64() * 1e6 / f64::from(rounds)
}

fn main() {
    let busy = dispatch_twenty();
    for (instances, patterns) in [(1, 1), (3, 3), (10, 5)] {
        for keyed in [false, true] {
            let us = dispatch_group(instances, patterns, keyed);
            println!(
                "dispatch   20 to a group of {instances:>2} x {patterns} patterns{}: {us:>8.2} µs  \
                 (to a service: {busy:.2} µs, ratio {:.2})",
                if keyed { ", keyed" } else { "       " },
                us / busy
            );
        }
    }
    let spread = dispatch_in_flight_keys(256);
    for keys in [64, 16, 4, 1] {
        let us = dispatch_in_flight_keys(keys);
        println!(
            "dispatch   16 of {keys:>3} keys, 256 in flight: {us:>6.3} µs per entry  (256 keys: \
             {spread:.3} µs, ratio {:.2})",
            us / spread
        );
    }
    for offline in [10, 100, 1000] {
        let us = dispatch(offline);
        println!(
            "dispatch   {offline:>7} offline groups: {us:>8.2} µs  (sending 20 entries: {busy:.2} µs, \
             ratio {:.2})",
            us / busy
        );
    }
    for groups in [10, 100, 1000] {
        let us = dispatch_starved(groups);
        println!(
            "dispatch   {groups:>7} groups out of credit: {us:>8.2} µs  (sending 20 entries: \
             {busy:.2} µs, ratio {:.2})",
            us / busy
        );
    }
    for logs in [3, 10] {
        let us = dispatch_out_of_credit(logs);
        println!(
            "dispatch and ack, {logs:>2} logs sharing 20 credits: {us:>6.3} µs per entry  \
             (sending 20 entries: {:.3} µs per entry, ratio {:.2})",
            busy / 20.0,
            us / (busy / 20.0)
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
    let base = stats_call(0);
    for backlog in [10_000, 100_000, 1_000_000] {
        let us = stats_call(backlog);
        println!(
            "status,           {backlog:>7} waiting: {us:>8.2} µs  (none waiting: {base:.2} µs, \
             ratio {:.1})",
            us / base
        );
    }
    let (base, base_timed_out) = ack_timeout_pass(0);
    for backlog in [10_000, 100_000, 1_000_000] {
        let (us, timed_out) = ack_timeout_pass(backlog);
        println!(
            "ack-timeout pass, {backlog:>7} waiting: {us:>8.2} µs  (none waiting: {base:.2} µs, \
             ratio {:.1}; {timed_out} and {base_timed_out} timed out)",
            us / base
        );
    }
}
