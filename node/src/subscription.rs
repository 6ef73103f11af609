//! Receiving: [`Subscription`] (a stream of [`Delivery`]s) and its handler
//! form, [`Subscription::handle`].

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info_span, warn};

use crate::engine::inbox::Admit;
use crate::engine::outbox::BLOCKED_PREFIX;
use crate::engine::routing::stable_hash;
use crate::error::HandlerError;
use crate::message::Message;
use crate::runtime::core::{Completion, CoreMsg};
use crate::runtime::{self, Inbound, Shared};

/// Queue depth of each worker of [`Subscription::handle`], and the most entries a worker (or
/// the dispatcher feeding the workers) takes out of its queue at once: a worker holds at most
/// twice this many entries, queued and taken.
const WORKER_QUEUE: usize = 64;

/// Messages for this node: `send`s to its service ([`crate::Node::messages`]) or publishes on
/// a subscribed topic ([`crate::Node::subscribe`]). Dropping a topic subscription unsubscribes.
pub struct Subscription {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Inbound>,
    sub_id: Option<u64>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("sub_id", &self.sub_id)
            .finish_non_exhaustive()
    }
}

/// One message handed to the application. Acknowledge it with [`Delivery::ack`] once handled;
/// [`Delivery::retry`] asks for redelivery later, [`Delivery::reject`] dead-letters it.
/// Dropping a delivery without any of these counts as a retry.
///
/// Per-key order holds when each delivery is finished before the next is taken from the same
/// subscription (or when using [`Subscription::handle`], which does this per key).
pub struct Delivery {
    msg: Message,
    shared: Arc<Shared>,
    done: bool,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("msg", &self.msg)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    pub(crate) fn new(
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Inbound>,
        sub_id: Option<u64>,
    ) -> Self {
        Self { shared, rx, sub_id }
    }

    /// The next message to handle; `None` once the node shuts down.
    pub async fn next(&mut self) -> Option<Delivery> {
        loop {
            let inbound = tokio::select! {
                r = self.rx.recv() => r?,
                () = self.shared.cancel.cancelled() => return None,
            };
            if let Some(d) = admit(&self.shared, inbound).await {
                return Some(d);
            }
        }
    }

    /// Runs `handler` for every message until the node shuts down. Messages with the same key
    /// run one at a time, in order; up to `concurrency` keys run in parallel. `Ok` acknowledges;
    /// [`HandlerError::Retry`] redelivers later (the key waits); [`HandlerError::Reject`]
    /// dead-letters at the sender. A handler that panics counts as a `Retry` (logged); the
    /// other messages go on being handled.
    pub async fn handle<F, Fut>(mut self, concurrency: usize, handler: F)
    where
        F: Fn(Message) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let workers: Vec<mpsc::Sender<Inbound>> = (0..concurrency.max(1))
            .map(|i| {
                let (tx, mut rx) = mpsc::channel::<Inbound>(WORKER_QUEUE);
                let shared = self.shared.clone();
                let handler = handler.clone();
                self.shared.tracker.spawn(
                    async move {
                        // Taken from the queue in batches (one wake-up and one release of
                        // queue room for many entries); the batch is at most the queue's size.
                        let mut batch = Vec::with_capacity(WORKER_QUEUE);
                        let mut done = Completions::default();
                        while rx.recv_many(&mut batch, WORKER_QUEUE).await > 0 {
                            for inbound in batch.drain(..) {
                                // Admission happens here, right before the run, so a failure of
                                // key K blocks K's later entries that were already queued.
                                let Some(mut d) = admit(&shared, inbound).await else {
                                    continue;
                                };
                                let span = message_span(d.message());
                                let run = handler(d.message().clone());
                                let run = crate::trace::scope_message(d.msg.env.clone(), run)
                                    .instrument(span);
                                let mut run = std::pin::pin!(run);
                                // A handler that finishes without waiting leaves the earlier
                                // outcomes queued; one that waits sends them first. A panic is
                                // caught: it must not end this worker (and with it the
                                // subscription's handling).
                                let result = match std::future::poll_fn(|cx| {
                                    Poll::Ready(std::panic::catch_unwind(AssertUnwindSafe(|| {
                                        run.as_mut().poll(cx)
                                    })))
                                })
                                .await
                                {
                                    Ok(Poll::Ready(r)) => Ok(r),
                                    Ok(Poll::Pending) => {
                                        done.flush(&shared).await;
                                        AssertUnwindSafe(run).catch_unwind().await
                                    }
                                    Err(panic) => Err(panic),
                                };
                                let result = match result {
                                    Ok(Ok(())) => Ok(()),
                                    Ok(Err(HandlerError::Retry(r))) => Err((r, false)),
                                    Ok(Err(HandlerError::Reject(r))) => Err((r, true)),
                                    Err(_) => {
                                        warn!(
                                            id = %d.message().id(),
                                            "a message handler panicked; the message is retried"
                                        );
                                        Err((HANDLER_PANICKED.to_string(), false))
                                    }
                                };
                                done.push(&shared, d.complete(result)).await;
                            }
                            done.flush(&shared).await;
                        }
                    }
                    .instrument(info_span!("handler", worker = i)),
                );
                tx
            })
            .collect();
        let mut rr: usize = 0;
        // Taken from the subscription queue in batches of up to `WORKER_QUEUE` entries.
        let mut batch = Vec::with_capacity(WORKER_QUEUE);
        loop {
            let taken = tokio::select! {
                n = self.rx.recv_many(&mut batch, WORKER_QUEUE) => n,
                () = self.shared.cancel.cancelled() => 0,
            };
            if taken == 0 {
                break;
            }
            for inbound in batch.drain(..) {
                let idx = match &inbound.env.key {
                    Some(k) => {
                        (stable_hash(&[inbound.env.log.as_bytes(), k.as_bytes()])
                            % workers.len() as u64) as usize
                    }
                    None => {
                        rr = rr.wrapping_add(1);
                        rr % workers.len()
                    }
                };
                if workers[idx].send(inbound).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The reason a message whose handler panicked is retried with.
const HANDLER_PANICKED: &str = "the message's handler panicked";

/// How long a handled entry's outcome may wait in a worker's [`Completions`] for the rest of
/// its batch: once the oldest waited this long, the next outcome sends them all.
const COMPLETIONS_WAIT: Duration = Duration::from_millis(1);

/// Outcomes a handler worker owes core, sent as one [`CoreMsg::CompletedBatch`] per batch of
/// entries taken from its queue (at most [`WORKER_QUEUE`]) instead of one message each.
///
/// The dedup window records each outcome at once ([`Delivery::complete`]); only the message
/// to core (and so the ack to the sender) waits. It waits only while handlers finish without
/// waiting themselves (a handler that waits sends the queue first) and at most about
/// [`COMPLETIONS_WAIT`] plus one handler's run. A nack goes out at once, with the outcomes
/// before it, so it precedes the nacks core sends for later entries of its key.
#[derive(Default)]
struct Completions {
    pending: Vec<Completion>,
    since: Option<Instant>,
}

impl Completions {
    async fn push(&mut self, shared: &Shared, c: Completion) {
        let failed = c.result.is_err();
        self.pending.push(c);
        let since = *self.since.get_or_insert_with(Instant::now);
        if failed || self.pending.len() >= WORKER_QUEUE || since.elapsed() >= COMPLETIONS_WAIT {
            self.flush(shared).await;
        }
    }

    async fn flush(&mut self, shared: &Shared) {
        self.since = None;
        let msg = match self.pending.len() {
            0 => return,
            1 => match self.pending.pop() {
                Some(c) => CoreMsg::Completed(c),
                None => return,
            },
            // The next batch starts at this one's size: grown from empty, its vector was
            // reallocated several times per batch.
            n => {
                CoreMsg::CompletedBatch(std::mem::replace(&mut self.pending, Vec::with_capacity(n)))
            }
        };
        let _ = shared.core.send(msg).await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(id) = self.sub_id {
            runtime::write(&self.shared.routes)
                .subs
                .retain(|s| s.id != id);
            let _ = self.shared.core.try_send(CoreMsg::InterestsChanged);
        }
    }
}

/// The `message` span a handler runs in, and the trace context to make current.
pub(crate) fn handler_span(msg: &Message) -> (tracing::Span, Option<crate::trace::TraceContext>) {
    let ctx = msg.trace_context();
    let span = info_span!(
        "message",
        id = %msg.id(),
        destination = %msg.destination(),
        trace_id = ctx.as_ref().map(|c| c.trace_id_hex()).unwrap_or_default(),
        span_id = ctx.as_ref().map(|c| c.span_id_hex()).unwrap_or_default(),
        attempt = msg.attempt(),
    );
    (span, ctx)
}

/// The `message` span of [`handler_span`], with the same fields, for a handler run inside
/// [`crate::trace::scope_message`]: the trace context is only parsed when the span is
/// enabled.
fn message_span(msg: &Message) -> tracing::Span {
    let span = info_span!(
        "message",
        id = %msg.id(),
        destination = %msg.destination(),
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
        attempt = msg.attempt(),
    );
    if !span.is_disabled() {
        let ctx = msg.trace_context();
        let hex =
            |f: fn(&crate::trace::TraceContext) -> String| ctx.as_ref().map(f).unwrap_or_default();
        span.record("trace_id", hex(crate::trace::TraceContext::trace_id_hex));
        span.record("span_id", hex(crate::trace::TraceContext::span_id_hex));
    }
    span
}

/// Why a queued entry must not reach a handler any more, if it must not: its connection is
/// gone (closed, timed out, replaced), this node did not run for a while since its connection
/// opened (the connection is being replaced: see [`runtime::pause`]), or it is a first attempt
/// that waited here at least the ack timeout (this node's, taken as the sender's).
///
/// Its sender redelivers it in each case (to this node or another instance), so running it
/// now could only repeat it, and repeat it late: after newer entries of its key were handled
/// elsewhere. Not acking it is what the sender expects.
///
/// Redeliveries (attempt 2 and later) are never dropped for their age: on a consumer whose
/// queue takes about the ack timeout to drain, every copy would otherwise wait that long and
/// be dropped again, until the sender dead-lettered the entry. Such a consumer now handles
/// each entry's second copy at the latest.
fn stale_reason(shared: &Shared, inbound: &Inbound) -> Option<Stale> {
    let now = Instant::now();
    if inbound.conn.is_gone() {
        Some(Stale::ConnectionGone("its connection is gone"))
    } else if inbound.conn.outlived_a_pause(&shared.pause, now) {
        Some(Stale::ConnectionGone(
            "this node did not run for a while since its connection opened",
        ))
    } else if inbound.env.attempt <= 1
        && now.saturating_duration_since(inbound.received) >= shared.ack_timeout
    {
        Some(Stale::TimedOut)
    } else {
        None
    }
}

/// Why [`stale_reason`] dropped an entry.
enum Stale {
    /// Its connection is gone or going (why): the sender resends every unsettled entry of the
    /// connection, in order.
    ConnectionGone(&'static str),
    /// Its first attempt waited past the ack timeout on a connection that lives on.
    TimedOut,
}

impl Stale {
    /// Why, for the log.
    fn why(&self) -> &'static str {
        match self {
            Stale::ConnectionGone(why) => why,
            Stale::TimedOut => "its first attempt waited longer than the ack timeout",
        }
    }
}

/// Runs the dedup window and key block for an arriving entry; `Some` when the
/// application should handle it. A stale entry ([`stale_reason`]) is dropped first, as if it
/// never arrived.
async fn admit(shared: &Arc<Shared>, inbound: Inbound) -> Option<Delivery> {
    if let Some(stale) = stale_reason(shared, &inbound) {
        let env = &inbound.env;
        let why = stale.why();
        debug!(origin = %env.origin.short(), log = %env.log, seq = env.seq, why, "stale delivery dropped unhandled; its sender redelivers it");
        if matches!(stale, Stale::TimedOut) {
            // The connection lives on: later entries of the key may be queued behind this one
            // and must not overtake its redelivery. (A gone connection's queued entries are all
            // stale, and the sender resends its unsettled entries in order.)
            runtime::lock(&shared.inbox)
                .drop_stale((env.origin, &env.log, env.seq), env.key.as_deref());
        }
        return None;
    }
    let Inbound {
        env,
        floor,
        key_floor,
        ..
    } = inbound;
    let decision = runtime::lock(&shared.inbox).admit(
        (env.origin, &env.log, env.seq),
        floor,
        env.key.as_deref(),
        key_floor,
    );
    let reply = match decision {
        Admit::Handle => {
            shared.counters.delivered.fetch_add(1, Ordering::Relaxed);
            return Some(Delivery {
                msg: Message::shared(env),
                shared: shared.clone(),
                done: false,
            });
        }
        Admit::Duplicate => {
            shared
                .counters
                .duplicates_dropped
                .fetch_add(1, Ordering::Relaxed);
            debug!(origin = %env.origin.short(), log = %env.log, seq = env.seq, "duplicate dropped, acknowledging again");
            Ok(())
        }
        Admit::InProgress => return None,
        Admit::Blocked { behind } => Err((format!("{BLOCKED_PREFIX} {behind}"), false)),
    };
    let _ = shared
        .core
        .send(CoreMsg::Completed(Completion { env, result: reply }))
        .await;
    None
}

impl Delivery {
    /// The message.
    pub fn message(&self) -> &Message {
        &self.msg
    }

    /// Handled: acknowledge to the sender. The dedup window records it first, so a
    /// retransmission will not reach a handler again.
    pub async fn ack(mut self) {
        self.finish(Ok(())).await;
    }

    /// Not handled now: the sender redelivers after a backoff (this counts as an attempt).
    pub async fn retry(mut self, reason: impl Into<String>) {
        self.finish(Err((reason.into(), false))).await;
    }

    /// Never going to work: the sender moves it to its dead-letter store.
    pub async fn reject(mut self, reason: impl Into<String>) {
        self.finish(Err((reason.into(), true))).await;
    }

    /// Records the outcome in the dedup window (so a retransmission of an acked entry never
    /// reaches a handler again) and returns what core must hear of it.
    fn complete(&mut self, result: Result<(), (String, bool)>) -> Completion {
        self.done = true;
        let env = &self.msg.env;
        runtime::lock(&self.shared.inbox).complete(
            (env.origin, &env.log, env.seq),
            env.key.as_deref(),
            result.is_ok(),
        );
        Completion {
            env: env.clone(),
            result,
        }
    }

    async fn finish(&mut self, result: Result<(), (String, bool)>) {
        let c = self.complete(result);
        let _ = self.shared.core.send(CoreMsg::Completed(c)).await;
    }
}

impl std::ops::Deref for Delivery {
    type Target = Message;
    fn deref(&self) -> &Message {
        &self.msg
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if !self.done {
            let c = self.complete(Err(("delivery dropped without ack".into(), false)));
            // If the queue is full the ack timeout redelivers it instead.
            let _ = self.shared.core.try_send(CoreMsg::Completed(c));
        }
    }
}
