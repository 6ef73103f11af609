//! The seeded fault schedule. The PRNG is written out here (splitmix64), so the same seed
//! gives the same schedule whatever crate versions are in use.

use std::fmt;
use std::time::Duration;

/// splitmix64: tiny, fast, and fully determined by its seed.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A number in `0.0..1.0`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The kinds of fault `peerbus chaos` injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum FaultKind {
    /// SIGKILL, then a restart with the same data directory after the fault's duration.
    Kill,
    /// SIGSTOP, then SIGCONT after the fault's duration.
    Freeze,
    /// SIGTERM (graceful shutdown), then a restart at once.
    Restart,
    /// Two nodes drop every datagram between them, healed after the fault's duration.
    Partition,
    /// The first of two nodes drops every datagram from the second, which still hears the
    /// first (a one-way partition), healed after the fault's duration.
    OneWay,
}

impl FaultKind {
    /// Parses `kill`, `freeze`, `restart`, `partition` or `oneway`.
    pub(crate) fn parse(s: &str) -> Option<FaultKind> {
        match s.trim() {
            "kill" => Some(FaultKind::Kill),
            "freeze" => Some(FaultKind::Freeze),
            "restart" => Some(FaultKind::Restart),
            "partition" => Some(FaultKind::Partition),
            "oneway" => Some(FaultKind::OneWay),
            _ => None,
        }
    }

    /// Whether the fault cuts the link between two nodes (both ways or one way).
    pub(crate) fn cuts_a_link(self) -> bool {
        matches!(self, FaultKind::Partition | FaultKind::OneWay)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultKind::Kill => "kill",
            FaultKind::Freeze => "freeze",
            FaultKind::Restart => "restart",
            FaultKind::Partition => "partition",
            FaultKind::OneWay => "oneway",
        })
    }
}

/// One planned fault.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Planned {
    /// What.
    pub(crate) kind: FaultKind,
    /// Node indexes: one, or two for a partition (for a one-way partition, the node that
    /// stops hearing the other first).
    pub(crate) targets: Vec<usize>,
    /// Offset from the start of the workload.
    pub(crate) at: Duration,
    /// How long the node stays down, frozen or cut off (unused for a graceful restart).
    pub(crate) hold: Duration,
}

/// The schedule: one fault per `interval`, the first after one interval of calm, each held
/// for 30–60 % of the interval (so faults never overlap), the last ending before `duration`.
/// Kinds and targets are drawn from `seed`.
pub(crate) fn plan(
    seed: u64,
    nodes: usize,
    kinds: &[FaultKind],
    interval: Duration,
    duration: Duration,
) -> Vec<Planned> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::new();
    if kinds.is_empty() || nodes == 0 || interval.is_zero() {
        return out;
    }
    let mut at = interval;
    loop {
        let hold = interval.mul_f64(0.3 + 0.3 * rng.unit());
        if at + hold >= duration {
            break;
        }
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let a = rng.below(nodes as u64) as usize;
        let targets = if kind.cuts_a_link() && nodes > 1 {
            let b = (a + 1 + rng.below(nodes as u64 - 1) as usize) % nodes;
            if kind == FaultKind::OneWay {
                vec![a, b]
            } else {
                vec![a.min(b), a.max(b)]
            }
        } else {
            vec![a]
        };
        out.push(Planned {
            kind,
            targets,
            at,
            hold,
        });
        at += interval;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // First outputs of the reference splitmix64 seeded with 0.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn same_seed_same_schedule_and_faults_never_overlap() {
        let kinds = [
            FaultKind::Kill,
            FaultKind::Freeze,
            FaultKind::Restart,
            FaultKind::Partition,
            FaultKind::OneWay,
        ];
        let i = Duration::from_secs(5);
        let d = Duration::from_secs(120);
        let a = plan(7, 5, &kinds, i, d);
        assert_eq!(a, plan(7, 5, &kinds, i, d));
        assert_ne!(a, plan(8, 5, &kinds, i, d));
        assert!(a.len() >= 20, "{} faults", a.len());
        for w in a.windows(2) {
            assert!(w[0].at + w[0].hold < w[1].at);
        }
        for f in &a {
            assert!(f.at + f.hold < d);
            assert!(f.targets.iter().all(|&t| t < 5));
            if f.kind.cuts_a_link() {
                assert_eq!(f.targets.len(), 2);
                assert_ne!(f.targets[0], f.targets[1]);
            }
        }
    }
}
