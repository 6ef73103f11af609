//! In-process network fault injection: a UDP socket for the QUIC endpoint that loses,
//! duplicates, delays and reorders datagrams, and cuts off chosen peers, all changeable at
//! run time through a cloneable [`Faults`] handle.
//!
//! Off by default: only an [`EndpointConfig`](crate::EndpointConfig) whose `faults` is
//! `Some` binds the faulty socket; otherwise the endpoint uses quinn's socket untouched.
//!
//! # What happens to a datagram
//!
//! On **send**, in this order:
//! 1. [`Faults::block_all`] set, or the destination [`Faults::partition`]ed: dropped. These
//!    checks do not consume randomness.
//! 2. One decision is drawn from the seeded PRNG (always exactly four draws per datagram, so
//!    the decision sequence depends only on the seed and the number of datagrams):
//!    lost with probability `loss`; otherwise sent twice with probability `duplicate`; held
//!    back for `delay ± jitter` (uniform, at least zero); and with probability `reorder` held
//!    back a further `max(delay + jitter, 5 ms)` so that later datagrams overtake it.
//! 3. A datagram with no hold leaves at once. A held one waits in a queue of at most
//!    4096 datagrams (beyond it, it is dropped and counted) and is released by a
//!    tokio task; at release, block and partition are checked again.
//!
//! On **receive**: datagrams from a partitioned or [`Faults::deafen`]ed address, or any
//! datagram while blocked, are dropped (a deafened address is a one-way partition: what we
//! send still reaches it). Loss, duplication and delay apply on send only (give both ends
//! faults to affect both directions).
//!
//! Segmentation offload: the faulty socket asks quinn for one datagram per transmit (no GSO)
//! and splits a multi-segment transmit anyway, so every decision is per datagram. Received
//! GRO batches come from one source address and are kept or dropped as a whole.
//!
//! Determinism: the decision sequence is a pure function of the seed and the number of
//! datagrams offered. End-to-end runs over real sockets are not bit-exact (timers, and quinn
//! offers a datagram again after the kernel said "would block").

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashSet};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, TokioRuntime, UdpPoller};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

/// Most datagrams held back (delayed or reordered) at once per socket: 4096, a few MiB at
/// most. A datagram that would exceed it is dropped and counted in [`FaultStats::dropped`].
pub(crate) const MAX_HELD: usize = 4096;
/// Longest a datagram is ever held back (60 s); larger delays are cut to this.
const MAX_HOLD: Duration = Duration::from_secs(60);
/// Least extra hold of a reordered datagram, so that reordering happens even without delay.
const REORDER_HOLD: Duration = Duration::from_millis(5);
/// How long the release task waits for the real socket to become writable before checking
/// again (also bounds how long it outlives a dropped socket).
const WRITABLE_WAIT: Duration = Duration::from_millis(100);
/// Receive batches looked at in one `poll_recv` before yielding, when all of them were dropped.
const MAX_RECV_ROUNDS: usize = 64;

/// What faults to inject. The default injects none.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultConfig {
    /// Probability (0..=1) that a sent datagram is lost.
    pub loss: f64,
    /// Probability (0..=1) that a sent datagram (not lost) goes out twice.
    pub duplicate: f64,
    /// Probability (0..=1) that a sent datagram is held back an extra
    /// `max(delay + jitter, 5 ms)`, so that datagrams sent after it overtake it.
    pub reorder: f64,
    /// Every sent datagram is held back this long (plus or minus `jitter`).
    pub delay: Duration,
    /// Uniform variation of `delay`, either way (the hold never goes below zero). Jitter
    /// larger than the gap between datagrams reorders them too.
    pub jitter: Duration,
    /// Seed of the decision PRNG. [`Faults::set`] reseeds with it.
    pub seed: u64,
}

/// Counters of a [`Faults`] handle, over every socket that uses it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Datagrams handed to the real socket (duplicates and released held datagrams included).
    pub sent: u64,
    /// Datagrams dropped: lost, partitioned, deafened (received) or blocked (sent or received),
    /// over the bound of 4096 held datagrams, or refused by the real socket at release.
    pub dropped: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Datagrams held back (delayed or reordered) before sending.
    pub delayed: u64,
    /// Datagrams chosen for reordering (also counted in `delayed`).
    pub reordered: u64,
}

/// A small deterministic PRNG: xorshift64* seeded through splitmix64.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x9E37_79B9_7F4A_7C15 } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The fate of one sent datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    /// Lost.
    Drop,
    /// Sent `copies` times (1 or 2) after `hold`.
    Send {
        copies: u8,
        hold: Duration,
        reordered: bool,
    },
}

/// Draws the decision for one datagram: always four draws from `rng`.
fn decide(cfg: &FaultConfig, rng: &mut Rng) -> Decision {
    let (lost, dup, reorder, jitter) = (rng.unit(), rng.unit(), rng.unit(), rng.unit());
    if lost < cfg.loss {
        return Decision::Drop;
    }
    let mut hold = cfg.delay.min(MAX_HOLD);
    if !cfg.jitter.is_zero() {
        let secs =
            hold.as_secs_f64() + (jitter * 2.0 - 1.0) * cfg.jitter.min(MAX_HOLD).as_secs_f64();
        hold = Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::ZERO);
    }
    let reordered = reorder < cfg.reorder;
    if reordered {
        let extra = cfg.delay.saturating_add(cfg.jitter).max(REORDER_HOLD);
        hold = hold.saturating_add(extra);
    }
    Decision::Send {
        copies: if dup < cfg.duplicate { 2 } else { 1 },
        hold: hold.min(MAX_HOLD),
        reordered,
    }
}

/// Mutable fault settings.
#[derive(Debug)]
struct State {
    config: FaultConfig,
    rng: Rng,
    partitioned: HashSet<SocketAddr>,
    /// Addresses whose datagrams we drop on receive only ([`Faults::deafen`]).
    deaf: HashSet<SocketAddr>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    blocked: AtomicBool,
    sent: AtomicU64,
    dropped: AtomicU64,
    duplicated: AtomicU64,
    delayed: AtomicU64,
    reordered: AtomicU64,
}

/// A handle on the faults of one or more endpoints: cheap to clone, every clone controls the
/// same settings, and changes apply to the next datagram. Put it in
/// [`EndpointConfig::faults`](crate::EndpointConfig::faults) before binding.
#[derive(Clone)]
pub struct Faults {
    shared: Arc<Shared>,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("Faults")
            .field("config", &state.config)
            .field("partitioned", &state.partitioned)
            .field("deaf", &state.deaf)
            .field("blocked", &self.shared.blocked.load(Ordering::Relaxed))
            .field("stats", &self.stats())
            .finish()
    }
}

impl Faults {
    /// A handle injecting no faults yet, whose PRNG is seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Faults {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    config: FaultConfig {
                        seed,
                        ..FaultConfig::default()
                    },
                    rng: Rng::new(seed),
                    partitioned: HashSet::new(),
                    deaf: HashSet::new(),
                }),
                blocked: AtomicBool::new(false),
                sent: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                duplicated: AtomicU64::new(0),
                delayed: AtomicU64::new(0),
                reordered: AtomicU64::new(0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the loss, duplication, reordering and delay settings, and reseeds the PRNG
    /// with `config.seed`. Datagrams already held back keep their release time.
    pub fn set(&self, config: FaultConfig) {
        let mut state = self.lock();
        state.rng = Rng::new(config.seed);
        state.config = config;
    }

    /// The current settings.
    pub fn config(&self) -> FaultConfig {
        self.lock().config.clone()
    }

    /// Drops every datagram to and from the UDP address `addr` (a peer endpoint's
    /// `local_addr`) until [`heal`](Self::heal)ed.
    pub fn partition(&self, addr: SocketAddr) {
        self.lock().partitioned.insert(addr);
    }

    /// Drops every datagram received from `addr` until [`heal`](Self::heal)ed, while what we
    /// send to it still leaves: a one-way partition, in which the peer hears us and we do not
    /// hear it (a lost return route, a one-way firewall rule).
    pub fn deafen(&self, addr: SocketAddr) {
        self.lock().deaf.insert(addr);
    }

    /// Ends the partition from `addr`, both ways or one way.
    pub fn heal(&self, addr: SocketAddr) {
        let mut state = self.lock();
        state.partitioned.remove(&addr);
        state.deaf.remove(&addr);
    }

    /// Ends every partition, both ways or one way (not [`block_all`](Self::block_all)).
    pub fn heal_all(&self) {
        let mut state = self.lock();
        state.partitioned.clear();
        state.deaf.clear();
    }

    /// Whether datagrams to and from `addr` are dropped by a partition.
    pub fn is_partitioned(&self, addr: SocketAddr) -> bool {
        self.lock().partitioned.contains(&addr)
    }

    /// With `true`, drops every datagram in and out (a frozen or cut-off node) until called
    /// with `false`. Independent of partitions.
    pub fn block_all(&self, blocked: bool) {
        self.shared.blocked.store(blocked, Ordering::Relaxed);
    }

    /// The counters so far.
    pub fn stats(&self) -> FaultStats {
        let s = &self.shared;
        FaultStats {
            sent: s.sent.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            duplicated: s.duplicated.load(Ordering::Relaxed),
            delayed: s.delayed.load(Ordering::Relaxed),
            reordered: s.reordered.load(Ordering::Relaxed),
        }
    }

    fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether traffic with `addr` is cut (blocked or partitioned).
    fn cut(&self, addr: SocketAddr) -> bool {
        self.shared.blocked.load(Ordering::Relaxed) || self.lock().partitioned.contains(&addr)
    }

    /// Whether what `addr` sends us is cut (blocked, partitioned or deafened).
    fn cut_in(&self, addr: SocketAddr) -> bool {
        self.cut(addr) || self.lock().deaf.contains(&addr)
    }

    /// The fate of the next datagram sent to `to`.
    fn on_send(&self, to: SocketAddr) -> Decision {
        if self.shared.blocked.load(Ordering::Relaxed) {
            return Decision::Drop;
        }
        let mut state = self.lock();
        if state.partitioned.contains(&to) {
            return Decision::Drop;
        }
        let State { config, rng, .. } = &mut *state;
        decide(config, rng)
    }
}

/// A datagram held back until `at`.
struct Held {
    at: Instant,
    seq: u64,
    destination: SocketAddr,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<IpAddr>,
    contents: Vec<u8>,
}

impl Held {
    fn transmit(&self) -> Transmit<'_> {
        Transmit {
            destination: self.destination,
            ecn: self.ecn,
            contents: &self.contents,
            segment_size: None,
            src_ip: self.src_ip,
        }
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    /// Reversed, so that the max-heap pops the earliest release first.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Held>,
    next_seq: u64,
}

/// What the release task does next.
enum Step {
    /// Nothing held: wait for a push.
    Idle,
    /// Sleep until the next release (or a push).
    Until(Instant),
    /// The real socket would block: wait until it is writable.
    Blocked(Arc<dyn AsyncUdpSocket>),
}

/// The faulty socket: quinn's tokio socket plus [`Faults`].
pub(crate) struct FaultySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    faults: Faults,
    queue: Mutex<Queue>,
    wake: Arc<Notify>,
}

impl fmt::Debug for FaultySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultySocket")
            .field("inner", &self.inner)
            .field("faults", &self.faults)
            .finish()
    }
}

/// Wraps the bound `sock` in a faulty socket controlled by `faults`. Needs a tokio runtime
/// (it spawns the task releasing held datagrams).
pub(crate) fn wrap(
    sock: std::net::UdpSocket,
    faults: Faults,
) -> io::Result<Arc<dyn AsyncUdpSocket>> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|e| io::Error::other(format!("no tokio runtime: {e}")))?;
    let inner = TokioRuntime.wrap_udp_socket(sock)?;
    let wake = Arc::new(Notify::new());
    let socket = Arc::new(FaultySocket {
        inner,
        faults,
        queue: Mutex::new(Queue::default()),
        wake: wake.clone(),
    });
    handle.spawn(release_task(Arc::downgrade(&socket), wake));
    Ok(socket)
}

/// Releases held datagrams when due; ends once the socket is dropped.
async fn release_task(socket: Weak<FaultySocket>, wake: Arc<Notify>) {
    loop {
        let step = match socket.upgrade() {
            Some(s) => s.release_due(),
            None => return,
        };
        match step {
            Step::Idle => wake.notified().await,
            Step::Until(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
            Step::Blocked(inner) => {
                let mut poller = inner.create_io_poller();
                let writable = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx));
                let _ = tokio::time::timeout(WRITABLE_WAIT, writable).await;
            }
        }
    }
}

impl Drop for FaultySocket {
    fn drop(&mut self) {
        // Stored as a permit if the task is busy: it then finds the socket gone and ends.
        self.wake.notify_one();
    }
}

impl FaultySocket {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds a copy of one datagram until `now + hold`; drops it when the queue is full.
    fn hold(&self, t: &Transmit<'_>, contents: &[u8], hold: Duration) {
        let mut q = self.queue();
        if q.heap.len() >= MAX_HELD {
            Faults::count(&self.faults.shared.dropped, 1);
            return;
        }
        let at = Instant::now() + hold;
        let earliest = q.heap.peek().is_none_or(|h| at < h.at);
        let seq = q.next_seq;
        q.next_seq = q.next_seq.wrapping_add(1);
        q.heap.push(Held {
            at,
            seq,
            destination: t.destination,
            ecn: t.ecn,
            src_ip: t.src_ip,
            contents: contents.to_vec(),
        });
        drop(q);
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Sends every held datagram that is due; says what to wait for next.
    fn release_due(&self) -> Step {
        let shared = &self.faults.shared;
        let mut q = self.queue();
        let now = Instant::now();
        while let Some(head) = q.heap.peek() {
            if head.at > now {
                return Step::Until(head.at);
            }
            if self.faults.cut(head.destination) {
                q.heap.pop();
                Faults::count(&shared.dropped, 1);
                continue;
            }
            match self.inner.try_send(&head.transmit()) {
                Ok(()) => Faults::count(&shared.sent, 1),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Step::Blocked(self.inner.clone());
                }
                Err(e) => {
                    debug!(to = %head.destination, error = %e, "fault injection: held datagram not sent");
                    Faults::count(&shared.dropped, 1);
                }
            }
            q.heap.pop();
        }
        Step::Idle
    }

    /// Sends one datagram now, counting it.
    fn send_now(&self, t: &Transmit<'_>, contents: &[u8]) -> io::Result<()> {
        self.inner.try_send(&Transmit {
            destination: t.destination,
            ecn: t.ecn,
            contents,
            segment_size: None,
            src_ip: t.src_ip,
        })?;
        Faults::count(&self.faults.shared.sent, 1);
        Ok(())
    }
}

impl AsyncUdpSocket for FaultySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, t: &Transmit<'_>) -> io::Result<()> {
        let shared = &self.faults.shared;
        let size = t.segment_size.unwrap_or(t.contents.len()).max(1);
        let mut first = true;
        for datagram in t.contents.chunks(size) {
            let was_first = std::mem::replace(&mut first, false);
            let (copies, hold, reordered) = match self.faults.on_send(t.destination) {
                Decision::Drop => {
                    Faults::count(&shared.dropped, 1);
                    continue;
                }
                Decision::Send {
                    copies,
                    hold,
                    reordered,
                } => (copies, hold, reordered),
            };
            if copies > 1 {
                Faults::count(&shared.duplicated, u64::from(copies - 1));
            }
            if !hold.is_zero() {
                Faults::count(&shared.delayed, 1);
                if reordered {
                    Faults::count(&shared.reordered, 1);
                }
                for _ in 0..copies {
                    self.hold(t, datagram, hold);
                }
                continue;
            }
            for copy in 0..copies {
                match self.send_now(t, datagram) {
                    Ok(()) => {}
                    // Nothing of this transmit went out yet: let quinn wait and offer it again.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && was_first && copy == 0 => {
                        return Err(e);
                    }
                    // Part of it went out: queue the rest for the release task.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.hold(t, datagram, Duration::ZERO);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.faults.shared;
        for _ in 0..MAX_RECV_ROUNDS {
            let n = ready!(self.inner.poll_recv(cx, bufs, meta))?;
            let mut kept = 0;
            for i in 0..n.min(meta.len()).min(bufs.len()) {
                let m = meta[i];
                let fits = i == kept || bufs[kept].len() >= m.len;
                if self.faults.cut_in(m.addr) || !fits {
                    let segments = if m.stride == 0 {
                        1
                    } else {
                        m.len.div_ceil(m.stride).max(1)
                    };
                    Faults::count(&shared.dropped, segments as u64);
                    continue;
                }
                if kept != i {
                    let (low, high) = bufs.split_at_mut(i);
                    low[kept][..m.len].copy_from_slice(&high[0][..m.len]);
                    meta[kept] = m;
                }
                kept += 1;
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
        // Everything read was dropped: yield, and come back at once.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// One datagram per transmit: no GSO, so that each datagram gets its own decision.
    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lossy(seed: u64) -> FaultConfig {
        FaultConfig {
            loss: 0.1,
            duplicate: 0.05,
            reorder: 0.05,
            delay: Duration::from_millis(5),
            jitter: Duration::from_millis(2),
            seed,
        }
    }

    fn decisions(faults: &Faults, n: usize) -> Vec<Decision> {
        let to = SocketAddr::from(([127, 0, 0, 1], 9));
        (0..n).map(|_| faults.on_send(to)).collect()
    }

    #[test]
    fn same_seed_same_decisions() {
        let a = Faults::new(0);
        let b = Faults::new(0);
        a.set(lossy(42));
        b.set(lossy(42));
        let (da, db) = (decisions(&a, 10_000), decisions(&b, 10_000));
        assert_eq!(da, db);
        let drops = da.iter().filter(|d| **d == Decision::Drop).count();
        assert!(
            (800..1200).contains(&drops),
            "{drops} drops of 10000 at 10%"
        );

        // Reseeding with the same seed replays the sequence; another seed differs.
        a.set(lossy(42));
        assert_eq!(decisions(&a, 10_000), da);
        a.set(lossy(43));
        assert_ne!(decisions(&a, 10_000), da);
    }

    #[test]
    fn decision_bounds() {
        let mut rng = Rng::new(7);
        let cfg = lossy(7);
        for _ in 0..10_000 {
            if let Decision::Send {
                copies,
                hold,
                reordered,
            } = decide(&cfg, &mut rng)
            {
                assert!(copies == 1 || copies == 2);
                assert!(hold >= Duration::from_millis(3));
                let max = if reordered { 14 } else { 7 };
                assert!(hold <= Duration::from_millis(max), "{hold:?}");
            }
        }
        // No faults: never dropped, never held.
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            assert_eq!(
                decide(&FaultConfig::default(), &mut rng),
                Decision::Send {
                    copies: 1,
                    hold: Duration::ZERO,
                    reordered: false
                }
            );
        }
    }

    #[test]
    fn partition_and_block_drop_without_randomness() {
        let f = Faults::new(3);
        f.set(lossy(3));
        let peer: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 4000));
        let other: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 4001));
        f.partition(peer);
        assert!(f.cut(peer) && !f.cut(other));
        assert_eq!(f.on_send(peer), Decision::Drop);
        f.block_all(true);
        assert!(f.cut(other));
        f.block_all(false);
        f.heal(peer);
        assert!(!f.cut(peer));
        // The cut datagram consumed no randomness.
        let g = Faults::new(3);
        g.set(lossy(3));
        assert_eq!(f.on_send(other), g.on_send(other));
        f.partition(peer);
        f.partition(other);
        f.heal_all();
        assert!(!f.cut(peer) && !f.cut(other));
    }

    #[test]
    fn a_deafened_address_is_cut_on_receive_only() {
        let f = Faults::new(3);
        let peer: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 4000));
        let other: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 4001));
        f.deafen(peer);
        assert!(f.cut_in(peer) && !f.cut(peer) && !f.cut_in(other));
        assert_ne!(f.on_send(peer), Decision::Drop);
        f.heal(peer);
        assert!(!f.cut_in(peer));
        f.deafen(peer);
        f.heal_all();
        assert!(!f.cut_in(peer));
    }
}
