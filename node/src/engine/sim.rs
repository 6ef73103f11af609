//! Deterministic simulation of one sender and several instances of a
//! service: connections that drop and come back, handler failures, receiver
//! restarts (with the dedup window restored from its persisted snapshot),
//! simulated time. No sockets, no sleeps.
//!
//! Checked after each run: no appended entry is lost, per-key order holds at
//! the handlers, and no entry reaches a handler twice.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use peerbus_transport::NodeId;
use smol_str::SmolStr;

use super::inbox::{Admit, Inbox, WindowSnapshot};
use super::outbox::{BLOCKED_PREFIX, Outbox, OutboxConfig, Outcome, Target};
use super::wire::{Data, Envelope, Kind};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.next() % 1000 < per_mille
    }
}

enum Reply {
    Ack(SmolStr, u64),
    Nack(SmolStr, u64, String),
}

struct Receiver {
    id: NodeId,
    inbox: Inbox,
    persisted: HashMap<String, WindowSnapshot>,
    conn: u64,
    up: bool,
    /// Frames on the wire towards this receiver (ordered, like a QUIC stream).
    inbound: VecDeque<Data>,
    /// Acks on the wire back to the sender.
    outbound: VecDeque<Reply>,
}

struct Faults {
    drop_conn: u64,
    crash: u64,
    fail_handler: u64,
    /// A first attempt dropped unhandled as stale (it waited out the ack timeout in the
    /// receiver's queue), on a connection that lives on: the receiver blocks its key, and the
    /// sender's ack timeout sends it again.
    stale: u64,
    /// The sender's ack timeout (ms of simulated time; a step is 1–5 ms). Short, it times out
    /// entries still queued at a live receiver, which then come back after a backoff, or at
    /// once when their connection drops.
    ack_timeout_ms: u64,
}

fn env(origin: NodeId, key: &str, i: u64) -> Envelope {
    Envelope {
        origin,
        log: SmolStr::default(),
        seq: 0,
        kind: Kind::Send,
        destination: "svc".into(),
        key: Some(key.into()),
        headers: Default::default(),
        content_type: None,
        created_at_ms: 0,
        attempt: 1,
        payload: Bytes::from(i.to_le_bytes().to_vec()),
    }
}

fn run(seed: u64, receivers: usize, messages: u64, keys: u64, faults: Faults) {
    let origin = NodeId::from_bytes([9; 32]);
    let mut rng = Rng(seed | 1);
    let mut ob = Outbox::new(OutboxConfig {
        ack_timeout_ms: faults.ack_timeout_ms,
        max_attempts: 1_000,
        backoff_base_ms: 10,
        backoff_max_ms: 200,
        seed,
        seq_base: 1,
    });
    let target = Target::Service("svc".into());
    let mut rx: Vec<Receiver> = (0..receivers)
        .map(|i| Receiver {
            id: NodeId::from_bytes([i as u8 + 1; 32]),
            inbox: Inbox::new(),
            persisted: HashMap::new(),
            conn: 1,
            up: true,
            inbound: VecDeque::new(),
            outbound: VecDeque::new(),
        })
        .collect();
    for r in &rx {
        ob.peer_up(r.id, r.conn, "svc".into(), vec![], 64);
    }
    // Handled (key -> list of (payload index, receiver)), and everything appended.
    let mut handled: HashMap<String, Vec<(u64, usize)>> = HashMap::new();
    let mut appended: BTreeMap<u64, String> = BTreeMap::new();
    let mut settled = 0u64;
    let mut now = 0u64;
    let mut next_msg = 0u64;
    let mut steps = 0u64;
    while settled < messages {
        steps += 1;
        assert!(
            steps < 2_000_000,
            "simulation did not converge (seed {seed}): {settled}/{messages}"
        );
        now += 1 + rng.next() % 5;
        // Append a few.
        for _ in 0..(rng.next() % 4) {
            if next_msg < messages {
                let key = format!("k{}", rng.next() % keys);
                let e = ob.append(&target, env(origin, &key, next_msg), now, None, None, false);
                appended.insert(next_msg, key);
                let _ = e;
                next_msg += 1;
            }
        }
        // Faults.
        for r in rx.iter_mut() {
            if r.up && rng.chance(faults.drop_conn) {
                // Connection dies: whatever was on the wire is lost.
                r.up = false;
                r.inbound.clear();
                r.outbound.clear();
                ob.peer_down(r.id, r.conn);
            } else if r.up && rng.chance(faults.crash) {
                // Process crash: in-memory state lost, persisted windows kept.
                r.up = false;
                r.inbound.clear();
                r.outbound.clear();
                r.inbox = Inbox::restore(r.persisted.values().cloned());
                ob.peer_down(r.id, r.conn);
            } else if !r.up && rng.chance(50) {
                r.up = true;
                r.conn += 1;
                ob.peer_up(r.id, r.conn, "svc".into(), vec![], 64);
            }
        }
        // Sender work.
        let (tx, dead) = ob.poll(now);
        assert!(dead.is_empty(), "nothing should be dead-lettered: {dead:?}");
        for t in tx {
            let r = rx.iter_mut().find(|r| r.id == t.peer).expect("peer");
            if r.up && r.conn == t.conn {
                r.inbound.push_back(t.frame);
            }
        }
        // Receivers handle a few frames, in order.
        for (ri, r) in rx.iter_mut().enumerate() {
            for _ in 0..(rng.next() % 8) {
                let Some(Data::Deliver {
                    floor,
                    key_floor,
                    env,
                }) = r.inbound.pop_front()
                else {
                    break;
                };
                let id = (env.origin, env.log.as_str(), env.seq);
                if env.attempt <= 1 && rng.chance(faults.stale) {
                    r.inbox.drop_stale(id, env.key.as_deref());
                    continue;
                }
                match r.inbox.admit(id, floor, env.key.as_deref(), key_floor) {
                    Admit::Handle => {
                        if rng.chance(faults.fail_handler) {
                            r.inbox.complete(id, env.key.as_deref(), false);
                            r.outbound.push_back(Reply::Nack(
                                env.log.clone(),
                                env.seq,
                                "boom".into(),
                            ));
                        } else {
                            let idx = u64::from_le_bytes(env.payload[..8].try_into().expect("8"));
                            handled
                                .entry(env.key.as_deref().unwrap_or_default().to_string())
                                .or_default()
                                .push((idx, ri));
                            r.inbox.complete(id, env.key.as_deref(), true);
                            if let Some(s) = r.inbox.snapshot(env.origin, &env.log) {
                                r.persisted.insert(env.log.to_string(), s);
                            }
                            r.outbound.push_back(Reply::Ack(env.log.clone(), env.seq));
                        }
                    }
                    Admit::Duplicate => r.outbound.push_back(Reply::Ack(env.log.clone(), env.seq)),
                    Admit::InProgress => {}
                    Admit::Blocked { behind } => r.outbound.push_back(Reply::Nack(
                        env.log.clone(),
                        env.seq,
                        format!("{BLOCKED_PREFIX} {behind}"),
                    )),
                }
            }
            // Replies reach the sender (in order, some per step).
            for _ in 0..(rng.next() % 8) {
                match r.outbound.pop_front() {
                    Some(Reply::Ack(log, seq)) => {
                        let acked = ob.on_ack(r.id, &log, &[seq]);
                        // A receiver acks only what it was sent, on this connection or an
                        // earlier one: never refused.
                        assert_eq!(acked.refused, 0, "{log}@{seq} acked by {:?}", r.id);
                        for s in acked.settled {
                            assert!(matches!(s.outcome, Outcome::Acked { .. }));
                            settled += 1;
                        }
                    }
                    Some(Reply::Nack(log, seq, why)) => {
                        assert!(ob.on_nack(r.id, &log, seq, &why, false, now).is_none());
                    }
                    None => break,
                }
            }
        }
    }
    // No loss: every appended entry was handled at least once.
    let mut seen: HashMap<u64, Vec<usize>> = HashMap::new();
    for list in handled.values() {
        for (i, r) in list {
            seen.entry(*i).or_default().push(*r);
        }
    }
    for i in appended.keys() {
        assert!(
            seen.contains_key(i),
            "seed {seed}: entry {i} was acknowledged but never handled"
        );
    }
    // The dedup window: never twice at the same receiver, across connection
    // drops and crashes. A repeat on another instance happens only when a
    // fault lost the first instance's ack (at-least-once).
    let faulty = faults.drop_conn + faults.crash > 0;
    for (i, rs) in &seen {
        let mut distinct = rs.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(
            distinct.len(),
            rs.len(),
            "seed {seed}: entry {i} handled twice by one receiver"
        );
        assert!(
            faulty || rs.len() == 1,
            "seed {seed}: entry {i} handled {} times without faults",
            rs.len()
        );
    }
    // Per-key order: at every receiver each key's entries arrive in increasing order, and the
    // first handling of each entry (across receivers) is in increasing order too. A fault may
    // replay a prefix on another instance; it never lets a later entry overtake an earlier one.
    for (k, list) in &handled {
        let mut first_seen = std::collections::HashSet::new();
        let firsts: Vec<u64> = list
            .iter()
            .filter(|(i, _)| first_seen.insert(*i))
            .map(|(i, _)| *i)
            .collect();
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "seed {seed}: key {k} out of order: {list:?}"
        );
        for r in 0..receivers {
            let at_r: Vec<u64> = list
                .iter()
                .filter(|(_, x)| *x == r)
                .map(|(i, _)| *i)
                .collect();
            assert!(
                at_r.windows(2).all(|w| w[0] < w[1]),
                "seed {seed}: key {k} out of order at receiver {r}: {at_r:?}"
            );
        }
    }
    assert!(ob.is_empty());
}

/// Seeds each faulty scenario runs. Twenty were too few: seed 38 of the handler failures found
/// a per-key order violation that the first twenty did not (see the inbox's key blocks).
const SEEDS: u64 = 200;
/// Seeds of the stale-drop scenario.
const STALE_SEEDS: u64 = 30;

#[test]
fn clean_network_delivers_everything_in_order() {
    run(
        1,
        3,
        2_000,
        17,
        Faults {
            drop_conn: 0,
            crash: 0,
            fail_handler: 0,
            stale: 0,
            ack_timeout_ms: 2_000,
        },
    );
}

#[test]
fn dropped_connections_lose_nothing_and_keep_key_order() {
    for seed in 1..=SEEDS {
        run(
            seed,
            3,
            1_500,
            13,
            Faults {
                drop_conn: 5,
                crash: 0,
                fail_handler: 0,
                stale: 0,
                ack_timeout_ms: 2_000,
            },
        );
    }
}

#[test]
fn handler_failures_are_retried_in_key_order() {
    for seed in 1..=SEEDS {
        run(
            seed,
            2,
            1_000,
            7,
            Faults {
                drop_conn: 0,
                crash: 0,
                fail_handler: 30,
                stale: 0,
                ack_timeout_ms: 2_000,
            },
        );
    }
}

#[test]
fn receiver_crashes_with_persisted_windows_cause_no_duplicates() {
    for seed in 1..=SEEDS {
        run(
            seed,
            3,
            1_000,
            11,
            Faults {
                drop_conn: 3,
                crash: 3,
                fail_handler: 10,
                stale: 0,
                ack_timeout_ms: 2_000,
            },
        );
    }
}

#[test]
fn stale_drops_keep_key_order_and_lose_nothing() {
    // Fewer seeds: each stale drop waits out the sender's ack timeout, so a run takes longer.
    for seed in 1..=STALE_SEEDS {
        run(
            seed,
            3,
            500,
            7,
            Faults {
                drop_conn: 2,
                crash: 2,
                fail_handler: 20,
                stale: 20,
                ack_timeout_ms: 2_000,
            },
        );
    }
}

/// Ack timeouts shorter than a receiver's queue, with connections that drop: entries time out
/// while still queued, come back after a backoff, and the backoff ends when the connection
/// they timed out on drops (the outbox's `requeue_peer`). Nothing is lost and key order holds.
#[test]
fn short_ack_timeouts_with_dropped_connections_keep_key_order() {
    for seed in 1..=SEEDS {
        run(
            seed,
            3,
            600,
            7,
            Faults {
                drop_conn: 10,
                crash: 2,
                fail_handler: 10,
                stale: 0,
                ack_timeout_ms: 4,
            },
        );
    }
}
