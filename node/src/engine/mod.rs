//! The delivery engine: plain data structures and functions.
//!
//! **Rule: the engine performs no I/O.** No tokio, no sockets, no files, no
//! `Instant::now()`. Time comes in as `now` (milliseconds on a clock the
//! caller chooses), events come in as method calls, and what should happen
//! comes out as values ([`outbox::Transmit`], [`outbox::Settled`],
//! [`inbox::Admit`]). That keeps every delivery rule testable with simulated
//! time, loss, reordering and restarts (see `tests` in each module and
//! `sim.rs`).

pub mod breaker;
pub mod inbox;
pub mod outbox;
pub mod routing;
pub mod wire;

#[cfg(test)]
mod sim;
