//! Per-destination circuit breaker for requests.
//!
//! Closed: requests flow; outcomes are counted over a sliding window. When at
//! least `min_requests` outcomes in the window failed at a ratio of at least
//! `failure_ratio`, the breaker **opens**: requests fail fast for `cooldown`.
//! Then it is **half-open**: up to `half_open_probes` requests go through; a
//! success closes it, a failure opens it again.

use std::collections::VecDeque;

/// Breaker settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Sliding window over which outcomes count, in ms.
    pub window_ms: u64,
    /// Fewest outcomes in the window before the breaker may open.
    pub min_requests: usize,
    /// Failure ratio (0..=1) that opens the breaker.
    pub failure_ratio: f64,
    /// How long an open breaker refuses before probing, in ms.
    pub cooldown_ms: u64,
    /// Requests let through while half-open.
    pub half_open_probes: usize,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            window_ms: 10_000,
            min_requests: 20,
            failure_ratio: 0.5,
            cooldown_ms: 5_000,
            half_open_probes: 1,
        }
    }
}

/// Most outcomes remembered per breaker (older ones fall out of the window anyway).
pub const MAX_OUTCOMES: usize = 4096;

/// Where a breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Requests flow.
    Closed,
    /// Requests fail fast until the cool-down ends.
    Open,
    /// A few probe requests are let through.
    HalfOpen,
}

/// A request refused by an open breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Milliseconds until the breaker lets a probe through.
    pub retry_after_ms: u64,
}

/// One destination's breaker.
#[derive(Clone, Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: BreakerState,
    opened_at: u64,
    probes_in_flight: usize,
    outcomes: VecDeque<(u64, bool)>,
    /// Failures among `outcomes`, kept as they come and go (a request's verdict must not
    /// walk the whole window).
    failed: usize,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: BreakerState::Closed,
            opened_at: 0,
            probes_in_flight: 0,
            outcomes: VecDeque::new(),
            failed: 0,
        }
    }

    /// Whether a request may go now. A `Ok` in half-open state counts as a probe.
    pub fn allow(&mut self, now: u64) -> Result<(), Refused> {
        if self.state == BreakerState::Open {
            let until = self.opened_at + self.cfg.cooldown_ms;
            if now < until {
                return Err(Refused {
                    retry_after_ms: until - now,
                });
            }
            self.state = BreakerState::HalfOpen;
            self.probes_in_flight = 0;
        }
        if self.state == BreakerState::HalfOpen {
            if self.probes_in_flight >= self.cfg.half_open_probes {
                return Err(Refused {
                    retry_after_ms: self.cfg.cooldown_ms.min(1_000),
                });
            }
            self.probes_in_flight += 1;
        }
        Ok(())
    }

    /// Records the outcome of a request that [`Breaker::allow`] let through.
    pub fn record(&mut self, now: u64, ok: bool) {
        match self.state {
            BreakerState::HalfOpen => {
                self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
                if ok {
                    self.state = BreakerState::Closed;
                    self.clear();
                } else {
                    self.open(now);
                }
            }
            BreakerState::Open => {}
            BreakerState::Closed => {
                self.outcomes.push_back((now, ok));
                self.failed += usize::from(!ok);
                if self.outcomes.len() > MAX_OUTCOMES {
                    self.pop_oldest();
                }
                self.trim(now);
                let n = self.outcomes.len();
                let failed = self.failed;
                if n >= self.cfg.min_requests && failed as f64 >= self.cfg.failure_ratio * n as f64
                {
                    self.open(now);
                }
            }
        }
    }

    fn open(&mut self, now: u64) {
        self.state = BreakerState::Open;
        self.opened_at = now;
        self.clear();
    }

    fn clear(&mut self) {
        self.outcomes.clear();
        self.failed = 0;
    }

    fn pop_oldest(&mut self) {
        if let Some((_, ok)) = self.outcomes.pop_front() {
            self.failed = self.failed.saturating_sub(usize::from(!ok));
        }
    }

    fn trim(&mut self, now: u64) {
        while self
            .outcomes
            .front()
            .is_some_and(|(t, _)| t + self.cfg.window_ms < now)
        {
            self.pop_oldest();
        }
    }

    /// Current state (an open breaker whose cool-down passed reports half-open).
    pub fn state(&self, now: u64) -> BreakerState {
        match self.state {
            BreakerState::Open if now >= self.opened_at + self.cfg.cooldown_ms => {
                BreakerState::HalfOpen
            }
            s => s,
        }
    }

    /// Outcomes in the current window: (total, failed).
    pub fn window(&mut self, now: u64) -> (usize, usize) {
        self.trim(now);
        (self.outcomes.len(), self.failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The failure count follows the window as outcomes enter, fall out of it by age and by
    /// the [`MAX_OUTCOMES`] cap.
    #[test]
    fn window_counts_follow_age_and_cap() {
        let lenient = BreakerConfig {
            min_requests: usize::MAX,
            ..cfg()
        };
        let mut b = Breaker::new(lenient);
        // One outcome per millisecond, every third a failure: only the last `window_ms`
        // (1 s) of them stay.
        let total = MAX_OUTCOMES as u64 + 300;
        for t in 0..total {
            b.record(t, t % 3 != 0);
        }
        let oldest = total - 1 - 1_000;
        let kept: Vec<u64> = (oldest..total).collect();
        let failed = kept.iter().filter(|t| *t % 3 == 0).count();
        assert_eq!(b.window(total - 1), (kept.len(), failed));
        // The cap: a burst within one millisecond keeps only the newest MAX_OUTCOMES.
        let mut b = Breaker::new(lenient);
        for i in 0..MAX_OUTCOMES + 7 {
            b.record(5, i % 2 == 0);
        }
        let failed = (7..MAX_OUTCOMES + 7).filter(|i| i % 2 == 1).count();
        assert_eq!(b.window(5), (MAX_OUTCOMES, failed));
    }

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            window_ms: 1_000,
            min_requests: 4,
            failure_ratio: 0.5,
            cooldown_ms: 500,
            half_open_probes: 1,
        }
    }

    #[test]
    fn opens_on_failure_ratio_then_half_opens_and_closes_on_success() {
        let mut b = Breaker::new(cfg());
        for (t, ok) in [(0, true), (10, false), (20, true)] {
            b.allow(t).expect("closed");
            b.record(t, ok);
        }
        assert_eq!(
            b.state(20),
            BreakerState::Closed,
            "too few requests to judge"
        );
        b.allow(30).expect("closed");
        b.record(30, false);
        assert_eq!(b.state(30), BreakerState::Open, "2 of 4 failed");
        assert_eq!(
            b.allow(100),
            Err(Refused {
                retry_after_ms: 430
            })
        );
        // Cool-down over: one probe passes, a second waits.
        b.allow(530).expect("probe");
        assert!(b.allow(531).is_err());
        b.record(540, true);
        assert_eq!(b.state(540), BreakerState::Closed);
        b.allow(541).expect("closed again");
    }

    #[test]
    fn a_failed_probe_reopens() {
        let mut b = Breaker::new(cfg());
        for t in 0..4 {
            b.allow(t).expect("closed");
            b.record(t, false);
        }
        assert!(b.allow(10).is_err());
        b.allow(600).expect("probe");
        b.record(610, false);
        assert_eq!(b.state(610), BreakerState::Open);
        assert!(b.allow(700).is_err());
    }

    #[test]
    fn old_failures_leave_the_window() {
        let mut b = Breaker::new(cfg());
        for t in 0..3 {
            b.allow(t).expect("closed");
            b.record(t, false);
        }
        for t in 2_000..2_004 {
            b.allow(t).expect("closed");
            b.record(t, t % 4 != 0);
        }
        assert_eq!(
            b.state(2_004),
            BreakerState::Closed,
            "1 of 4 in the window failed"
        );
    }
}
