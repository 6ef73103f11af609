//! The store writer: one OS thread that owns the [`Store`] and commits what
//! core hands it in groups (group commit: every op that queued up while the
//! previous commit ran goes into the next one, so many `send` callers share
//! one fsync).
//!
//! Core never waits on it: it `try_send`s ops and learns the outcome from a
//! [`CoreMsg::Durable`] message.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use peerbus_transport::NodeId;
use smol_str::SmolStr;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use super::core::CoreMsg;
use crate::engine::inbox::WindowSnapshot;
use crate::engine::wire::Envelope;
use crate::node::CallReply;
use crate::store::{Batch, DeadLetter, Store, StoredEntry};

/// Capacity of the store writer's queue. When it is full `send` fails with a
/// backpressure error instead of waiting inside core.
pub(crate) const STORE_QUEUE: usize = 65_536;
/// Most ops folded into one commit.
const MAX_GROUP: usize = 8192;

/// An entry of `(origin or log owner, log, seq)` identity.
pub(crate) type AckRef = (NodeId, String, u64);

/// Work for the store writer.
pub(crate) enum StoreOp {
    /// The copies one `send`/`publish` call stored (core staged them; they become sendable
    /// once durable). Their logs' next sequence numbers are stored with them.
    Append(StagedCall),
    /// Settled entries to delete.
    Remove(Vec<(SmolStr, u64)>),
    /// A dedup window changed because a handler finished `ack`: persist it, then send the ack.
    Window(WindowSnapshot, AckRef),
    /// An entry was dead-lettered.
    Dead(DeadLetter),
    /// A known durable group changed: `Some(state)` stores its state (a released one is kept
    /// as a tombstone), `None` forgets it (so a restarted publisher keeps copies for every
    /// group it knew, and still knows which ones were released).
    Group(String, Option<crate::engine::wire::GroupState>),
    /// List dead letters (oldest first).
    ListDead(usize, oneshot::Sender<Result<Vec<DeadLetter>, String>>),
    /// Remove dead letters by id and return them (for replay).
    TakeDead(Vec<u64>, oneshot::Sender<Result<Vec<DeadLetter>, String>>),
    /// Make everything committed so far durable now (the `Interval` timer).
    Sync,
    /// Commit what is queued, sync, and end the writer thread.
    Stop,
}

/// One call's staged copies and its reply. The writer answers the call itself once the commit
/// ends (after it queued the [`Durable`] report that makes the copies sendable), so core keeps
/// no map from entries to calls and the caller does not wait for core to pass the answer on.
pub(crate) struct StagedCall {
    /// The copies, one per target log.
    pub(crate) entries: Vec<StoredEntry>,
    /// Answered once the copies are durable (or failed to store).
    pub(crate) reply: CallReply,
}

/// Outcome of one group commit, reported to core.
#[derive(Debug, Default)]
pub(crate) struct Durable {
    /// The copies the commit covered (shared with the outbox entries waiting for it).
    pub(crate) appended: Vec<Arc<Envelope>>,
    /// Acks that may be sent now.
    pub(crate) acks: Vec<AckRef>,
    /// Set when the commit failed: appended entries were not stored.
    pub(crate) error: Option<String>,
}

/// How many dead letters the store keeps (`NodeBuilder::max_dead_letters`): past `max`, the
/// writer drops the oldest, counts them in `dropped` and logs a warning.
pub(crate) struct DeadLetterBound {
    /// Most dead letters kept.
    pub(crate) max: usize,
    /// Dead letters the store holds: the recovered count when the node starts, then kept up
    /// to date by the writer (`Status::dead_letters` reads it).
    pub(crate) stored: Arc<std::sync::atomic::AtomicUsize>,
    /// Counts the dead letters dropped for room.
    pub(crate) dropped: Arc<crate::admin::metrics::Count>,
}

impl DeadLetterBound {
    /// Counts `n` dead letters taken out of the store.
    fn take_off(&self, n: usize) {
        let _ = self
            .stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_sub(n))
            });
    }
}

/// Starts the writer thread. It stops when every sender is dropped.
pub(crate) fn spawn(
    mut store: Box<dyn Store>,
    mut rx: mpsc::Receiver<StoreOp>,
    core: mpsc::Sender<CoreMsg>,
    stats: Arc<std::sync::Mutex<crate::store::StoreStats>>,
    commit_latency: Arc<crate::admin::metrics::Latency>,
    dead: DeadLetterBound,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("peerbus-store".into())
        .spawn(move || {
            let mut writer = Writer {
                store: &mut *store,
                rx: &mut rx,
                ops: Vec::new(),
                dead,
            };
            while let Some(stop) = writer.round(&core, &stats, &commit_latency) {
                if stop {
                    break;
                }
            }
            if let Err(e) = store.sync() {
                warn!(error = %e, "final store sync failed");
            }
        })
}

/// Keeps at most this many queued ops' worth of buffer between rounds.
const KEEP_OPS: usize = 1024;

/// The writer thread's state between rounds.
struct Writer<'a> {
    store: &'a mut dyn Store,
    rx: &'a mut mpsc::Receiver<StoreOp>,
    /// Ops taken from the queue in one go (reused; at most [`MAX_GROUP`]).
    ops: Vec<StoreOp>,
    /// The dead letters the store holds (`stored`, kept up to date) and their limit.
    dead: DeadLetterBound,
}

impl Writer<'_> {
    /// Takes every queued op (waiting for the first), commits them as one group and reports
    /// to core. `None` when every sender is gone, `Some(true)` after a `Stop`.
    fn round(
        &mut self,
        core: &mpsc::Sender<CoreMsg>,
        stats: &std::sync::Mutex<crate::store::StoreStats>,
        commit_latency: &crate::admin::metrics::Latency,
    ) -> Option<bool> {
        self.ops.clear();
        if self.ops.capacity() > KEEP_OPS {
            self.ops.shrink_to(KEEP_OPS);
        }
        if self.rx.blocking_recv_many(&mut self.ops, MAX_GROUP) == 0 {
            return None;
        }
        let mut batch = Batch::default();
        let mut report = Durable::default();
        // Each call's reply, with its first copy (for an error's destination) and its count.
        let mut answers: Vec<(CallReply, Arc<Envelope>, usize)> = Vec::new();
        let mut queries = Vec::new();
        let mut stop = false;
        let mut sync = false;
        {
            // Sized once: growing them entry by entry was a visible part of the writer's time.
            let (calls, appends, removes) =
                self.ops.iter().fold((0, 0, 0), |(c, a, r), op| match op {
                    StoreOp::Append(call) => (c + 1, a + call.entries.len(), r),
                    StoreOp::Remove(ids) => (c, a, r + ids.len()),
                    _ => (c, a, r),
                });
            batch.append.reserve(appends);
            batch.remove.reserve(removes);
            report.appended.reserve(appends);
            answers.reserve(calls);
            for op in self.ops.drain(..) {
                match op {
                    StoreOp::Append(StagedCall { entries, reply }) => {
                        for e in &entries {
                            raise_next_seq(&mut batch.next_seqs, &e.env.log, e.env.seq + 1);
                        }
                        report
                            .appended
                            .extend(entries.iter().map(|e| e.env.clone()));
                        if let Some(first) = entries.first() {
                            answers.push((reply, first.env.clone(), entries.len()));
                        }
                        batch.append.extend(entries);
                    }
                    StoreOp::Remove(ids) => batch.remove.extend(ids),
                    StoreOp::Window(w, ack) => {
                        // Only the newest snapshot of a window matters.
                        batch
                            .windows
                            .retain(|o| !(o.origin == w.origin && o.log == w.log));
                        batch.windows.push(w);
                        report.acks.push(ack);
                    }
                    StoreOp::Dead(d) => batch.dead.push(d),
                    StoreOp::Group(group, patterns) => {
                        // Only the newest state of a group matters.
                        batch.groups.retain(|(g, _)| *g != group);
                        batch.groups.push((group, patterns));
                    }
                    q @ (StoreOp::ListDead(..) | StoreOp::TakeDead(..)) => queries.push(q),
                    StoreOp::Sync => sync = true,
                    StoreOp::Stop => stop = true,
                }
            }
        }
        if !batch.is_empty() {
            let new_dead = batch.dead.len();
            let started = std::time::Instant::now();
            let result = self.store.commit(batch);
            commit_latency.record(started.elapsed());
            match result {
                Ok(()) => {
                    self.dead.stored.fetch_add(new_dead, Ordering::Relaxed);
                }
                Err(e) => {
                    error!(error = %e, "store commit failed; the affected sends report it");
                    report.error = Some(e.to_string());
                }
            }
        }
        if sync && let Err(e) = self.store.sync() {
            warn!(error = %e, "periodic store sync failed");
        }
        for q in queries {
            match q {
                StoreOp::ListDead(limit, tx) => {
                    let _ = tx.send(self.store.dead_letters(limit).map_err(|e| e.to_string()));
                }
                StoreOp::TakeDead(ids, tx) => {
                    let taken = self.store.take_dead_letters(&ids);
                    if let Ok(t) = &taken {
                        self.dead.take_off(t.len());
                    }
                    let _ = tx.send(taken.map_err(|e| e.to_string()));
                }
                _ => {}
            }
        }
        self.drop_oldest_dead_letters();
        *super::lock(stats) = self.store.stats();
        let error = report.error.clone();
        if stop {
            // Core is gone: the calls are answered as stored (or not) all the same.
            answer(answers, error.as_deref());
            return Some(true);
        }
        // Core may already be gone during shutdown: then nobody needs the report.
        if !report.appended.is_empty() || !report.acks.is_empty() || report.error.is_some() {
            let _ = core
                .try_send(CoreMsg::Durable(report))
                .or_else(|e| match e {
                    mpsc::error::TrySendError::Full(m) => core.blocking_send(m).map_err(|_| ()),
                    mpsc::error::TrySendError::Closed(_) => Err(()),
                });
        }
        // Only now: a caller that sends again at once must reach core after the report, so
        // its next copy is staged behind the ones this commit made sendable.
        answer(answers, error.as_deref());
        Some(false)
    }

    /// Drops the oldest dead letters past the limit (a failure leaves them for the next
    /// round).
    fn drop_oldest_dead_letters(&mut self) {
        let excess = self
            .dead
            .stored
            .load(Ordering::Relaxed)
            .saturating_sub(self.dead.max);
        if excess == 0 {
            return;
        }
        let dropped = self.store.dead_letters(excess).and_then(|oldest| {
            let ids: Vec<u64> = oldest.iter().map(|d| d.id).collect();
            self.store.take_dead_letters(&ids)
        });
        match dropped {
            Ok(d) => {
                self.dead.take_off(d.len());
                self.dead
                    .dropped
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
                warn!(
                    dropped = d.len(),
                    max = self.dead.max,
                    "the dead-letter store is full: dropped its oldest dead letters"
                );
            }
            Err(e) => warn!(error = %e, "could not drop the oldest dead letters"),
        }
    }
}

/// Answers the calls of a commit: the number of copies stored, or the commit's error.
fn answer(answers: Vec<(CallReply, Arc<Envelope>, usize)>, error: Option<&str>) {
    for (reply, first, copies) in answers {
        reply.send(match error {
            None => Ok(copies),
            Some(reason) => Err(crate::error::SendError::Store {
                destination: first.destination.to_string(),
                reason: reason.to_owned(),
            }),
        });
    }
}

/// Stores `next` as `log`'s next sequence number unless the batch already raises it as far
/// (the log name is copied once per log and batch, not once per entry).
fn raise_next_seq(next_seqs: &mut Vec<(String, u64)>, log: &str, next: u64) {
    match next_seqs.iter_mut().rev().find(|(l, _)| l == log) {
        Some((_, n)) => *n = (*n).max(next),
        None => next_seqs.push((log.to_owned(), next)),
    }
}

/// Converts an absolute engine time to Unix ms for the store and back.
pub(crate) struct Clock {
    pub(crate) start_unix_ms: u64,
}

impl Clock {
    pub(crate) fn unix_time(&self, engine_ms: u64) -> u64 {
        self.start_unix_ms + engine_ms
    }

    pub(crate) fn engine_time(&self, unix_ms: u64) -> u64 {
        unix_ms.saturating_sub(self.start_unix_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SendError;
    use crate::store::{MemoryStore, Recovered, StoreError, StoreStats};

    /// A store whose commits fail (a full disk, say).
    struct Failing;

    impl Store for Failing {
        fn commit(&mut self, _batch: Batch) -> Result<(), StoreError> {
            Err(StoreError::Db("no space left on device".into()))
        }
        fn recover(&mut self) -> Result<Recovered, StoreError> {
            Ok(Recovered::default())
        }
        fn dead_letters(&mut self, _limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
            Ok(Vec::new())
        }
        fn take_dead_letters(&mut self, _ids: &[u64]) -> Result<Vec<DeadLetter>, StoreError> {
            Ok(Vec::new())
        }
        fn sync(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
        fn stats(&self) -> StoreStats {
            StoreStats::default()
        }
    }

    fn entry(log: &str, seq: u64) -> StoredEntry {
        StoredEntry {
            env: Arc::new(Envelope {
                origin: NodeId::from_bytes([7; 32]),
                log: log.into(),
                seq,
                kind: crate::engine::wire::Kind::Send,
                destination: "orders".into(),
                key: None,
                headers: Default::default(),
                content_type: None,
                created_at_ms: 0,
                attempt: 1,
                payload: bytes::Bytes::from_static(b"x"),
            }),
            expires_at_ms: None,
            not_before_ms: None,
        }
    }

    /// Sends one call of `copies` to a writer over `store`; returns core's report and the
    /// call's answer. Core's queue is full at first (a placeholder report holds its one slot),
    /// and the call must not be answered until the writer could queue its report behind it.
    fn one_call(store: Box<dyn Store>, copies: u64) -> (Durable, Result<usize, SendError>) {
        let (tx, rx) = mpsc::channel(8);
        let (core_tx, mut core_rx) = mpsc::channel(1);
        core_tx
            .try_send(CoreMsg::Durable(Durable::default()))
            .expect("fill core's queue");
        let latency = Arc::new(crate::admin::metrics::Latency::store_commit("test"));
        let thread = spawn(
            store,
            rx,
            core_tx,
            Arc::default(),
            latency,
            bound(usize::MAX),
        )
        .expect("spawn");
        let (reply, ticket) = CallReply::for_test();
        let entries = (1..=copies).map(|s| entry("svc:orders", s)).collect();
        tx.blocking_send(StoreOp::Append(StagedCall { entries, reply }))
            .expect("queue");
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            ticket.answer_now().is_none(),
            "the call was answered before core could have the report"
        );
        assert!(matches!(core_rx.try_recv(), Ok(CoreMsg::Durable(d)) if d.appended.is_empty()));
        let answer = loop {
            if let Some(a) = ticket.answer_now() {
                break a;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        let Ok(CoreMsg::Durable(report)) = core_rx.try_recv() else {
            panic!("the call was answered before core had the report");
        };
        drop(tx);
        thread.join().expect("writer");
        (report, answer)
    }

    fn bound(max: usize) -> DeadLetterBound {
        DeadLetterBound {
            max,
            stored: Arc::default(),
            dropped: Arc::new(crate::admin::metrics::Count::new("test_dropped", "test")),
        }
    }

    fn dead(seq: u64) -> DeadLetter {
        DeadLetter {
            id: 0,
            env: Envelope::clone(&entry("svc:orders", seq).env),
            reason: "ttl expired".into(),
            attempts: 1,
            dead_at_ms: 0,
        }
    }

    /// Past its limit the dead-letter store keeps the newest, counts what it dropped, and
    /// counts a replay's takes as room made.
    #[test]
    fn the_dead_letter_store_keeps_its_newest_within_its_limit() {
        let (tx, rx) = mpsc::channel(64);
        let (core_tx, _core_rx) = mpsc::channel(64);
        let latency = Arc::new(crate::admin::metrics::Latency::store_commit("test"));
        let limit = bound(3);
        let (dropped, stored) = (limit.dropped.clone(), limit.stored.clone());
        let thread = spawn(
            Box::new(MemoryStore::new()),
            rx,
            core_tx,
            Arc::default(),
            latency,
            limit,
        )
        .expect("spawn");
        let list = |tx: &mpsc::Sender<StoreOp>| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.blocking_send(StoreOp::ListDead(100, reply))
                .expect("queue");
            let seqs: Vec<u64> = answer
                .blocking_recv()
                .expect("answered")
                .expect("listed")
                .iter()
                .map(|d| d.env.seq)
                .collect();
            seqs
        };
        for seq in 1..=5 {
            tx.blocking_send(StoreOp::Dead(dead(seq))).expect("queue");
        }
        // The list is answered after the round that stored them, and trims after it: the
        // next round's list shows the trimmed store.
        let _ = list(&tx);
        assert_eq!(list(&tx), [3, 4, 5]);
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
        assert_eq!(stored.load(Ordering::Relaxed), 3);
        // A take makes room: one more fits without a drop.
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.blocking_send(StoreOp::TakeDead(vec![3], reply))
            .expect("queue");
        assert_eq!(
            answer
                .blocking_recv()
                .expect("answered")
                .expect("taken")
                .len(),
            1
        );
        tx.blocking_send(StoreOp::Dead(dead(6))).expect("queue");
        let _ = list(&tx);
        assert_eq!(list(&tx), [4, 5, 6]);
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
        assert_eq!(stored.load(Ordering::Relaxed), 3);
        drop(tx);
        thread.join().expect("writer");
    }

    #[test]
    fn a_stored_call_is_answered_with_its_copies_after_core_has_them() {
        let (report, answer) = one_call(Box::new(MemoryStore::new()), 2);
        assert_eq!(answer.expect("stored"), 2);
        assert!(report.error.is_none());
        let ids: Vec<_> = report
            .appended
            .iter()
            .map(|e| (e.log.as_str(), e.seq))
            .collect();
        assert_eq!(ids, [("svc:orders", 1), ("svc:orders", 2)]);
    }

    #[test]
    fn a_failed_commit_fails_its_calls_and_tells_core() {
        let (report, answer) = one_call(Box::new(Failing), 1);
        match answer {
            Err(SendError::Store {
                destination,
                reason,
            }) => {
                assert_eq!(destination, "orders");
                assert!(reason.contains("no space left"), "{reason}");
            }
            other => panic!("expected a store error, got {other:?}"),
        }
        assert!(report.error.is_some());
        assert_eq!(report.appended.len(), 1, "core drops the staged copy");
    }

    #[test]
    fn next_sequence_numbers_are_raised_once_per_log() {
        let mut next = Vec::new();
        raise_next_seq(&mut next, "svc:a", 5);
        raise_next_seq(&mut next, "svc:b", 2);
        raise_next_seq(&mut next, "svc:a", 3);
        raise_next_seq(&mut next, "svc:a", 9);
        assert_eq!(next, [("svc:a".to_string(), 9), ("svc:b".to_string(), 2)]);
    }
}
