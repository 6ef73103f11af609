//! W3C trace context (`traceparent`, `tracestate`) carried on every message.
//!
//! Every `send`, `publish` and `request` carries a `traceparent` header:
//! - the one the caller set explicitly, if any;
//! - otherwise a child of the **current trace context**: peerbus sets it
//!   around every handler it runs (`Subscription::handle`, `serve`), so a
//!   handler that sends onwards continues the trace of the message it handles;
//!   code outside handlers can set it with [`scope`] (for example from an
//!   OpenTelemetry span context);
//! - otherwise a new trace, unless the node was built with
//!   [`NodeBuilder::start_traces(false)`](crate::NodeBuilder::start_traces): then none.
//!
//! Handlers run inside a `tracing` span named `message` with `trace_id`,
//! `span_id`, the message id and its destination as fields, so logs of one
//! trace can be found across services.

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::engine::wire::{Envelope, Headers, TraceBytes};

tokio::task_local! {
    static CURRENT: Current;
}

thread_local! {
    /// Where new trace and span ids come from: a fast generator per thread (xoshiro256++),
    /// seeded from the OS-seeded `ThreadRng`. Ids must be unique and unpredictable enough to
    /// not collide, not secret; `ThreadRng`'s ChaCha for every message sent was a visible
    /// part of the send profile.
    static IDS: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

/// What [`current`] reads the context from.
enum Current {
    /// Set by [`scope`].
    Context(TraceContext),
    /// The message a handler runs for, whose headers are only parsed when [`current`] is
    /// called (most handlers never ask).
    Message(Arc<Envelope>),
}

/// Header name of the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// Header name of the W3C trace state.
pub const TRACESTATE: &str = "tracestate";

/// A W3C trace context: trace id, the id of the span that sent the message, flags, and the
/// vendor `tracestate` (passed through unchanged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// 16-byte trace id (never all zero).
    pub trace_id: [u8; 16],
    /// 8-byte id of the parent span (never all zero).
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
    /// The `tracestate` header, if any.
    pub state: Option<String>,
}

impl TraceContext {
    /// A new trace (random ids, sampled).
    pub fn new_root() -> Self {
        Self {
            trace_id: nonzero(),
            span_id: nonzero(),
            flags: 1,
            state: None,
        }
    }

    /// A child in the same trace: same trace id and state, a new span id.
    pub fn child(&self) -> Self {
        Self {
            span_id: nonzero(),
            ..self.clone()
        }
    }

    /// Parses a `traceparent` value (version 00), with an optional `tracestate`.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (v, t, s, f) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || v != "00" || t.len() != 32 || s.len() != 16 || f.len() != 2 {
            return None;
        }
        let [flags] = hex::<1>(f)?;
        Self::from_ids(hex(t)?, hex(s)?, flags, tracestate)
    }

    /// A context from the 25 bytes of a `traceparent` (trace id, span id, flags): `None` if
    /// either id is all zero.
    fn from_bytes(b: &TraceBytes, tracestate: Option<&str>) -> Option<Self> {
        let (trace_id, rest) = b.split_first_chunk::<16>()?;
        let (span_id, flags) = rest.split_first_chunk::<8>()?;
        Self::from_ids(*trace_id, *span_id, *flags.first()?, tracestate)
    }

    /// A context of these ids and flags: `None` if either id is all zero (invalid in W3C
    /// trace context).
    fn from_ids(
        trace_id: [u8; 16],
        span_id: [u8; 8],
        flags: u8,
        tracestate: Option<&str>,
    ) -> Option<Self> {
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
            state: tracestate.map(str::to_string),
        })
    }

    /// The 25 bytes of its `traceparent`: trace id, span id, flags.
    fn bytes(&self) -> TraceBytes {
        let mut b = [0; 25];
        b[..16].copy_from_slice(&self.trace_id);
        b[16..24].copy_from_slice(&self.span_id);
        b[24] = self.flags;
        b
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        crate::engine::wire::traceparent_text(&self.bytes())
    }

    /// The trace id as 32 hex characters.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The span id as 16 hex characters.
    pub fn span_id_hex(&self) -> String {
        to_hex(&self.span_id)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

/// The trace context of the running handler (or of an enclosing [`scope`]).
pub fn current() -> Option<TraceContext> {
    CURRENT
        .try_with(|c| match c {
            Current::Context(ctx) => Some(ctx.clone()),
            Current::Message(env) => of_headers(&env.headers),
        })
        .ok()
        .flatten()
}

/// Runs `fut` with `ctx` as the current trace context: messages it sends continue `ctx`.
pub async fn scope<F: Future>(ctx: TraceContext, fut: F) -> F::Output {
    CURRENT.scope(Current::Context(ctx), fut).await
}

/// Runs a handler's `fut` with the trace context of the message `env` carries (none if it
/// carries none) as the current one, parsed only if asked for.
pub(crate) async fn scope_message<F: Future>(env: Arc<Envelope>, fut: F) -> F::Output {
    CURRENT.scope(Current::Message(env), fut).await
}

/// Adds `traceparent` (and `tracestate`) to outgoing headers unless the caller set one: a
/// child of the current trace context, or else (when `new_roots`) a new trace.
///
/// The `traceparent` is kept as bytes ([`Headers`]): stamping allocates nothing unless the
/// context has a `tracestate`.
pub(crate) fn stamp(headers: &mut Headers, new_roots: bool) {
    if headers.has_traceparent() {
        return;
    }
    let ctx = match current() {
        Some(c) => c.child(),
        None if new_roots => TraceContext::new_root(),
        None => return,
    };
    headers.push_trace(ctx.bytes());
    if let Some(state) = &ctx.state
        && headers.text(TRACESTATE).is_none()
    {
        headers.push(TRACESTATE, state.clone());
    }
}

/// The trace context a message carries: from its first `traceparent` header (the one
/// [`Headers::get`] returns), none if that one is not valid.
pub(crate) fn of_headers(headers: &Headers) -> Option<TraceContext> {
    let state = headers.text(TRACESTATE);
    match headers.first_trace() {
        Some(b) => TraceContext::from_bytes(b, state),
        None => TraceContext::parse(headers.text(TRACEPARENT)?, state),
    }
}

fn nonzero<const N: usize>() -> [u8; N] {
    IDS.with_borrow_mut(|rng| {
        loop {
            let b: [u8; N] = rng.random();
            if b != [0; N] {
                return b;
            }
        }
    })
}

/// Lower-case hex digits of `b`, in one allocation (a handled message's span records its
/// trace and span ids).
fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(b.len() * 2);
    for x in b {
        out.push(DIGITS[usize::from(x >> 4)]);
        out.push(DIGITS[usize::from(x & 0xf)]);
    }
    String::from_utf8(out).unwrap_or_default()
}

/// `N` bytes from exactly `2 * N` hex digits (either case); no allocation, as this runs for
/// every message handled.
fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = nibble(digits[2 * i])? << 4 | nibble(digits[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_garbage() {
        let c = TraceContext::new_root();
        let back = TraceContext::parse(&c.traceparent(), None).expect("parse");
        assert_eq!(back, c);
        let child = c.child();
        assert_eq!(child.trace_id, c.trace_id);
        assert_ne!(child.span_id, c.span_id);
        for bad in [
            "",
            "00-abc-def-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-zzf067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad}");
        }
        let w3c = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("k=v"),
        )
        .expect("w3c example");
        assert_eq!(w3c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(w3c.state.as_deref(), Some("k=v"));
    }

    #[test]
    fn new_ids_do_not_repeat_within_or_across_threads() {
        let ids = || {
            (0..10_000)
                .map(|_| {
                    let c = TraceContext::new_root();
                    assert_eq!(c.traceparent().len(), 55);
                    (c.trace_id, c.span_id)
                })
                .collect::<Vec<_>>()
        };
        let other = std::thread::spawn(ids).join().expect("thread");
        let mine = ids();
        let traces: std::collections::HashSet<_> =
            mine.iter().chain(&other).map(|(t, _)| *t).collect();
        let spans: std::collections::HashSet<_> =
            mine.iter().chain(&other).map(|(_, s)| *s).collect();
        assert_eq!(traces.len(), 20_000);
        assert_eq!(spans.len(), 20_000);
    }

    #[tokio::test]
    async fn stamping_continues_the_current_trace() {
        let mut h = Headers::new();
        stamp(&mut h, true);
        let root = of_headers(&h).expect("root stamped");
        let mut inner = Headers::new();
        scope(root.clone(), async { stamp(&mut inner, true) }).await;
        let child = of_headers(&inner).expect("child stamped");
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        let env = |headers| {
            Arc::new(Envelope {
                origin: peerbus_transport::NodeId::from_bytes([1; 32]),
                log: "svc:x".into(),
                seq: 1,
                kind: crate::engine::wire::Kind::Send,
                destination: "x".into(),
                key: None,
                headers,
                content_type: None,
                created_at_ms: 0,
                attempt: 1,
                payload: bytes::Bytes::new(),
            })
        };
        let mut from_message = Headers::new();
        scope_message(env(h.clone()), async { stamp(&mut from_message, true) }).await;
        let child = of_headers(&from_message).expect("child of the message stamped");
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        let mut untraced = Headers::new();
        scope_message(env(Headers::new()), async { stamp(&mut untraced, true) }).await;
        let new = of_headers(&untraced).expect("new root stamped");
        assert_ne!(new.trace_id, root.trace_id);
        let mut explicit = Headers::from(vec![(TRACEPARENT.to_string(), "x".to_string())]);
        stamp(&mut explicit, true);
        assert_eq!(explicit.len(), 1, "an explicit header is kept");
    }

    #[tokio::test]
    async fn a_stamped_trace_reads_as_the_headers_a_sender_would_have_written() {
        let mut root = TraceContext::new_root();
        root.state = Some("vendor=1".into());
        let mut h = Headers::from(vec![("tenant".to_string(), "acme".to_string())]);
        scope(root.clone(), async { stamp(&mut h, true) }).await;
        let child = of_headers(&h).expect("stamped");
        assert_eq!(child.state.as_deref(), Some("vendor=1"));
        let text = child.traceparent();
        assert_eq!(
            h.to_vec(),
            [
                ("tenant".to_string(), "acme".to_string()),
                (TRACEPARENT.to_string(), text.clone()),
                (TRACESTATE.to_string(), "vendor=1".to_string()),
            ]
        );
        assert_eq!(h.get(TRACEPARENT).as_deref(), Some(text.as_str()));
        assert_eq!(TraceContext::parse(&text, Some("vendor=1")), Some(child));
    }

    #[test]
    fn the_context_comes_from_the_first_traceparent_as_the_header_does() {
        const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        // A malformed one first: the header reads as it, and there is no context, though a
        // usual one (kept as bytes) follows.
        let h = Headers::from(vec![pair(TRACEPARENT, "00-bad"), pair(TRACEPARENT, TP)]);
        assert!(h.trace().is_some(), "the usual one is kept as bytes");
        assert_eq!(h.get(TRACEPARENT).as_deref(), Some("00-bad"));
        assert_eq!(of_headers(&h), None);
        // The same from the compact wire form, with the bytes after the text one.
        let b = *h.trace().expect("bytes");
        let wire =
            Headers::from_parts(vec![pair(TRACEPARENT, "00-bad")], Some((1, b))).expect("in range");
        assert_eq!(wire, h);
        assert_eq!(of_headers(&wire), None);
        // A valid text one first (upper-case digits stay text) is the context.
        let upper = TP.to_uppercase();
        let h = Headers::from(vec![pair(TRACEPARENT, &upper), pair(TRACEPARENT, TP)]);
        let ctx = of_headers(&h).expect("the first one is valid");
        assert_eq!(Some(ctx), TraceContext::parse(&upper, None));
        // With the bytes first, they are the context.
        let h = Headers::from(vec![pair(TRACEPARENT, TP), pair(TRACEPARENT, "00-bad")]);
        assert_eq!(of_headers(&h), TraceContext::parse(TP, None));
    }

    #[tokio::test]
    async fn without_new_roots_only_a_current_trace_is_continued() {
        let mut outside = Headers::new();
        stamp(&mut outside, false);
        assert!(outside.is_empty(), "no trace started: {outside:?}");
        let root = TraceContext::new_root();
        let mut inner = Headers::new();
        scope(root.clone(), async { stamp(&mut inner, false) }).await;
        let child = of_headers(&inner).expect("the current trace continued");
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
    }
}
