//! The delivery engine: plain data structures and functions.
//!
//! **Rule: the engine performs no I/O.** No tokio, no sockets, no files, no
//! `Instant::now()`. Time comes in as `now` (milliseconds on a clock the
//! caller chooses), events come in as method calls, and what should happen
//! comes out as values ([`outbox::Transmit`], [`outbox::Settled`],
//! [`inbox::Admit`]). That keeps every delivery rule testable with simulated
//! time, loss, reordering and restarts (see `tests` in each module and
//! `sim.rs`).

/// A hash map with a fast, per-process randomly seeded hasher (foldhash) for the maps a
/// node touches on every message (log keys, receipts, dedup windows). std's SipHash was a
/// visible part of the send profile; foldhash keeps a random seed, so keys chosen by a
/// remote peer cannot be picked to collide.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

pub mod breaker;
pub mod inbox;
pub mod outbox;
pub mod recipients;
pub mod routing;
pub(crate) mod seqset;
pub mod wire;

#[cfg(test)]
mod sim;
